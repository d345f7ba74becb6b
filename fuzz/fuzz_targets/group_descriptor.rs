//! DMS_GROUP descriptors in a region's aux_data (any process can write one): parsing never
//! panics, and what parses is written back so that it parses to the same descriptor.
#![no_main]
use filemapd::stats::{GroupDescriptor, id_set::IdSet};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(Some(descriptor)) = GroupDescriptor::parse(text) {
        let again = GroupDescriptor::parse(&descriptor.to_string())
            .expect("a written descriptor parses")
            .expect("a written descriptor carries the tag");
        assert_eq!(again, descriptor);
    }
    if let Ok(set) = IdSet::parse(text) {
        assert_eq!(IdSet::parse(&set.to_string()).expect("a written set parses"), set);
    }
});
