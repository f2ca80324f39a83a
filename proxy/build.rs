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
//!
//! The same release link packs the program's relative relocations
//! (`-z pack-relative-relocs`) when the glibc of the machine that builds it
//! reads them (2.36 or later): unpacked, they are about 500 KB the loader
//! reads at every start, resident from then on.

use std::env;
use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=hot-code.txt");
    println!("cargo:rerun-if-env-changed=SHARDLINE_CODE_ORDER");
    if env::var("PROFILE").as_deref() != Ok("release") || !links_with_lld() {
        return;
    }
    if glibc_reads_packed_relocations() {
        // The program's relocations packed (DT_RELR): a position-independent
        // binary holds one per pointer in its read-only data, about 500 KB
        // of them, all read by the loader at every start and resident since.
        // Packed they take a few KB. Needs glibc 2.36 or later where the
        // binary runs; checked here on the machine that builds it (the
        // image builds on Debian bookworm's 2.36).
        println!("cargo:rustc-link-arg-bin=shardline=-Wl,-z,pack-relative-relocs");
    }
    if env::var("SHARDLINE_CODE_ORDER").as_deref() == Ok("off") {
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

/// Whether the binary is built for the machine that builds it and that
/// machine's glibc reads packed relative relocations (2.36 or later:
/// `getconf GNU_LIBC_VERSION` says "glibc 2.36").
fn glibc_reads_packed_relocations() -> bool {
    if env::var("HOST").ok() != env::var("TARGET").ok() {
        return false;
    }
    let Ok(out) = Command::new("getconf").arg("GNU_LIBC_VERSION").output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .strip_prefix("glibc ")
        .is_some_and(|version| major_minor(version) >= (2, 36))
}

/// "1.95.0" → (1, 95); what does not read as a number counts as 0.
fn major_minor(version: &str) -> (u32, u32) {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
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
    major_minor(version.split_whitespace().nth(1).unwrap_or_default()) >= (1, 90)
}
