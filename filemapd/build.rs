//! Builds the kernel half (filemapd-ebpf) for bpfel-unknown-none with the toolchain named in
//! filemapd-ebpf/rust-toolchain.toml, so that `include_bytes_aligned!` can embed it.
use std::{fs, path::Path};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let ebpf_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../filemapd-ebpf");
    let toolchain_file = ebpf_dir.join("rust-toolchain.toml");
    println!("cargo:rerun-if-changed={}", toolchain_file.display());
    let toolchain = ebpf_toolchain(
        &fs::read_to_string(&toolchain_file)
            .with_context(|| format!("reading {}", toolchain_file.display()))?,
    )
    .ok_or_else(|| anyhow!("no channel in {}", toolchain_file.display()))?;
    let ebpf_dir = ebpf_dir.canonicalize()?;
    let package = aya_build::Package {
        name: "filemapd-ebpf",
        root_dir: ebpf_dir.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?,
        ..Default::default()
    };
    // aya-build relays the inner cargo's stderr as `cargo:warning`s, which cargo prints on
    // every build of this crate, cached or not: "Compiling"/"Finished" status lines. A quiet
    // inner cargo keeps those back, while its errors and the compiler's messages still come.
    // SAFETY: the build script is single-threaded here; the variable is read by the child.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain)).context(
        "building the eBPF programs failed (missing nightly, rust-src or bpf-linker? \
         run `cargo xtask setup`)",
    )
}

/// The `channel = "..."` value of a rust-toolchain.toml.
fn ebpf_toolchain(toml: &str) -> Option<String> {
    toml.lines()
        .filter_map(|line| line.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|value| value.trim().trim_matches('"').to_string())
        .next()
}
