//! `@stats_list` and `@stats_print` answers as the kernel might send them: parsing never
//! panics, and finding a group among parsed regions never does either.
#![no_main]
use filemapd::stats::{Group, region};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(regions) = region::parse_list(text) {
        for r in regions.iter().take(8) {
            let _ = Group::find(&regions, r.id);
        }
    }
    let _ = region::parse_counters(text);
});
