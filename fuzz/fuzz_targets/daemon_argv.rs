//! dmfilemapd's command line, as dmstats (or a user) may spell it: parsing never panics.
#![no_main]
use filemapd::daemon::args;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|argv: Vec<String>| {
    let _ = args::parse(&argv);
});
