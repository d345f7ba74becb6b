/// Linking this crate needs the `bpf-linker` binary, which cargo does not know about: rebuild
/// when it changes, and say how to get it when it is missing.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => panic!("bpf-linker not found on PATH: run `cargo xtask setup`"),
    }
}
