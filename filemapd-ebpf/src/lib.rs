#![no_std]
// Only the binary target matters; this library target lets filemapd name the crate as a
// build-dependency so cargo rebuilds the daemon when the programs change.
