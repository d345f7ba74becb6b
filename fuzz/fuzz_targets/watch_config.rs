//! `filemapd watch` configuration files: parsing never panics.
#![no_main]
use filemapd::daemon::watch;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = watch::parse_config(text);
});
