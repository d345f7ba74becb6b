//! The torture run inside the device-mapper VM (see `filemapd_tests::torture`): two minutes
//! in `cargo xtask test`, longer with `cargo xtask torture --minutes N [--seed S]`.
use filemapd_tests::{require_device_mapper, torture};

#[test]
fn groups_survive_a_seeded_storm_of_changes_kills_and_foreign_regions() {
    require_device_mapper();
    let config = torture::Config::from_env().unwrap();
    eprintln!("torture seed {} (FILEMAPD_TORTURE_SEED)", config.seed);
    match torture::run(&config) {
        Ok(report) => println!("{report}"),
        Err(e) => panic!("{e:?}"),
    }
}
