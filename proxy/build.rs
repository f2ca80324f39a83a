//! Release builds of the `shardline` binary place the functions a proxy runs
//! together at the start of its code, hottest first, in the order of
//! `hot-code.txt` (written by `scripts/hot-code.sh` from callgrind runs).
//! A proxy's resident code is then the pages those functions fill, not
//! every page that a function it ran shares with code it never runs
//! (ARCHITECTURE.md, "Resident memory"; the figures are in the README's
//! benchmark section).
//!
//! The order is given to the linker with `--symbol-ordering-file`, an LLD
//! option: used only where LLD is rustc's own linker (x86_64 Linux, GNU,
//! rustc 1.90 or later, no linker chosen in the build's flags). Functions
//! the list names that the binary no longer has are skipped, and functions
//! it does not name keep the linker's order. `SHARDLINE_CODE_ORDER=off`
//! leaves the order to the linker.

use std::env;
use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=hot-code.txt");
    println!("cargo:rerun-if-env-changed=SHARDLINE_CODE_ORDER");
    if env::var("PROFILE").as_deref() != Ok("release")
        || env::var("SHARDLINE_CODE_ORDER").as_deref() == Ok("off")
        || !links_with_lld()
    {
        return;
    }
    let Ok(dir) = env::var("CARGO_MANIFEST_DIR") else {
        return;
    };
    let list = Path::new(&dir).join("hot-code.txt");
    if list.is_file() {
        println!(
            "cargo:rustc-link-arg-bin=shardline=-Wl,--symbol-ordering-file={}",
            list.display()
        );
        println!("cargo:rustc-link-arg-bin=shardline=-Wl,--no-warn-symbol-ordering");
    }
}

/// Whether the binary is linked by rustc's own LLD: the default for
/// x86_64-unknown-linux-gnu since rustc 1.90, unless the build picks a
/// linker (`linker = ...`, `-C linker`, `-C link-arg=-fuse-ld=...`,
/// `-C linker-features`).
fn links_with_lld() -> bool {
    if env::var("TARGET").as_deref() != Ok("x86_64-unknown-linux-gnu")
        || env::var_os("RUSTC_LINKER").is_some()
    {
        return false;
    }
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if flags.contains("linker") || flags.contains("fuse-ld") {
        return false;
    }
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = Command::new(rustc).arg("-V").output() else {
        return false;
    };
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let version = String::from_utf8_lossy(&out.stdout);
    let mut parts = version
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (1, 90)
}
