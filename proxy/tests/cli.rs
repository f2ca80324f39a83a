//! The `shardline` command line: config errors are reported once, clearly, with
//! a failing exit code, and nothing starts.

use std::process::Command;

fn shardline(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shardline"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let path =
        std::env::temp_dir().join(format!("shardline-cli-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn missing_config_file() {
    let (ok, out) = shardline(&["--config", "/nonexistent/shardline.toml"]);
    assert!(!ok);
    assert!(
        out.contains("/nonexistent/shardline.toml") && out.contains("cannot read file"),
        "{out}"
    );
}

#[test]
fn invalid_config_names_file_and_key() {
    let path = write_config(
        "bad",
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[[users]]\nname = \"a\"\ndatabase = \"a\"\nauth = \"trust\"\n\
         [[shards]]\nname = \"s0\"\nprimary = { host = \"127.0.0.1\", port = \"x\" }\n",
    );
    for args in [
        &["--config", path.to_str().unwrap()][..],
        &["check", "--config", path.to_str().unwrap()][..],
    ] {
        let (ok, out) = shardline(args);
        assert!(!ok, "{out}");
        assert!(
            out.contains(path.to_str().unwrap()),
            "names the file: {out}"
        );
        assert!(
            out.contains("shards[0].primary.port"),
            "names the key: {out}"
        );
        assert_eq!(out.lines().count(), 1, "one message: {out}");
    }
    let _ = std::fs::remove_file(path);
}

#[test]
fn check_reports_unreachable_nodes() {
    // Port 1 on loopback: nothing listens there.
    let path = write_config(
        "unreachable",
        "[pool]\nconnect_timeout = \"2s\"\n[[users]]\nname = \"a\"\ndatabase = \"a\"\nauth = \"trust\"\n\
         [[shards]]\nname = \"s0\"\nprimary = { host = \"127.0.0.1\", port = 1 }\n",
    );
    let (ok, out) = shardline(&["check", "--config", path.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(out.contains("configuration is valid"), "{out}");
    assert!(out.contains("FAIL") && out.contains("127.0.0.1:1"), "{out}");
    let _ = std::fs::remove_file(path);
}

#[test]
fn help_lists_the_commands() {
    let (ok, out) = shardline(&["--help"]);
    assert!(ok);
    assert!(out.contains("demo") && out.contains("check"), "{out}");
}
