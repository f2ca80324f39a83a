//! Every committed fuzz input (`fuzz/corpus/<target>/`: real driver traffic,
//! statements, and whatever `scripts/fuzz.sh` found worth keeping) replayed
//! through its target's entry point: none may panic. The coverage-guided
//! search itself runs with `scripts/fuzz.sh`.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        run(&data);
        // Truncated at every tenth byte: partial messages, as a network cuts them.
        for cut in (0..data.len()).step_by(10) {
            run(&data[..cut]);
        }
        n += 1;
    }
    assert!(n > 0, "no inputs in {}", dir.display());
}

#[test]
fn client_messages() {
    replay("client_messages", shardline::fuzz::client_messages);
}

#[test]
fn login() {
    replay("login", shardline::fuzz::login);
}

#[test]
fn route() {
    replay("route", shardline::fuzz::route);
}
