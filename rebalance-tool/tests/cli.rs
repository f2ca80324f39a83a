//! The `shardline-rebalance` command line, before it touches any database:
//! its help names every command, and a usage error or a config it cannot
//! read is reported clearly with the documented exit status (2 for usage,
//! 1 for an error), nothing else done.
//!
//! (Being an integration test of this package also makes `cargo test` build
//! the binary with the test build's features: the integration tests in
//! `tests/` start it, with its crash-test hooks, and find it built.)

use std::process::Command;

fn rebalance(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shardline-rebalance"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn help_names_every_command_and_the_exit_statuses() {
    let (code, out) = rebalance(&["--help"]);
    assert_eq!(code, Some(0), "{out}");
    for command in ["plan", "apply", "abort", "verify"] {
        assert!(out.contains(&format!("  {command} ")), "{command}: {out}");
    }
    assert!(out.contains("Exit status"), "{out}");
}

#[test]
fn an_unknown_command_is_a_usage_error() {
    let (code, out) = rebalance(&["bogus"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("unrecognized subcommand 'bogus'"), "{out}");
}

#[test]
fn a_config_it_cannot_read_is_named() {
    let (code, out) = rebalance(&[
        "plan",
        "--from",
        "/nonexistent/old.toml",
        "--to",
        "/nonexistent/new.toml",
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("reading /nonexistent/old.toml") && out.contains("No such file"),
        "{out}"
    );
}
