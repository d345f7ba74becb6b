//! `filemapd watch` configuration files, both formats: parsing never panics.
#![no_main]
use filemapd::daemon::watch;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = watch::parse_config(text);
    let _ = watch::parse_toml(text);
});
