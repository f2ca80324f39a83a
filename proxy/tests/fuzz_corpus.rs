//! Every committed fuzz input (`fuzz/corpus/<target>/`: real driver traffic,
//! statements, and whatever `scripts/fuzz.sh` found worth keeping) replayed
//! through its target's entry point, then a brief seeded run of random
//! mutations of them (bit flips, interesting bytes, cut and repeated spans,
//! splices of two inputs): none may panic. This is the fuzzing every test
//! run does; the coverage-guided search runs with `scripts/fuzz.sh`.

use shardline::fuzz::Rng;
use std::path::Path;
use std::time::{Duration, Instant};

/// Mutated inputs per target, and the time they may take at most.
const MUTATIONS: usize = 40_000;
const MUTATION_TIME: Duration = Duration::from_secs(8);

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut inputs = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        run(&data);
        // Truncated at every tenth byte: partial messages, as a network cuts them.
        for cut in (0..data.len()).step_by(10) {
            run(&data[..cut]);
        }
        inputs.push(data);
    }
    assert!(!inputs.is_empty(), "no inputs in {}", dir.display());
    inputs.sort();
    mutate(target, &inputs, run);
}

/// Runs `MUTATIONS` mutated corpus inputs through `run` (fewer if they take
/// longer than `MUTATION_TIME`); a panic names the seed and the input.
fn mutate(target: &str, inputs: &[Vec<u8>], run: fn(&[u8])) {
    const INTERESTING: [u8; 8] = [0, 0xff, 0x7f, 0x80, b'\'', b';', b'$', b'\n'];
    let mut rng = Rng(0x5eed_0000_0000_0001 ^ target.len() as u64);
    let started = Instant::now();
    let mut done = 0;
    while done < MUTATIONS && started.elapsed() < MUTATION_TIME {
        let mut data = inputs[rng.below(inputs.len())].clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(data.len());
            match rng.below(6) {
                0 if !data.is_empty() => data[at] ^= 1 << rng.below(8),
                1 if !data.is_empty() => data[at] = INTERESTING[rng.below(INTERESTING.len())],
                2 => {
                    let end = (at + 1 + rng.below(16)).min(data.len());
                    data.drain(at..end);
                }
                3 => {
                    let end = (at + 1 + rng.below(64)).min(data.len());
                    let span = data[at..end].to_vec();
                    data.splice(at..at, span);
                }
                4 => {
                    let other = &inputs[rng.below(inputs.len())];
                    let from = rng.below(other.len());
                    data.truncate(at);
                    data.extend_from_slice(&other[from..]);
                }
                _ => {
                    // A length field (any 4 bytes) made huge or negative.
                    if data.len() >= at + 4 {
                        let v = [0u32, u32::MAX, i32::MAX as u32, 4][rng.below(4)];
                        data[at..at + 4].copy_from_slice(&v.to_be_bytes());
                    }
                }
            }
        }
        if std::panic::catch_unwind(|| run(&data)).is_err() {
            panic!("{target}: mutated input {done} panicked: {data:?}");
        }
        done += 1;
    }
    eprintln!("{target}: {done} mutated inputs in {:?}", started.elapsed());
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
