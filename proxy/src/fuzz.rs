//! Entry points for fuzzing what clients control: the bytes of their
//! protocol messages, their startup packet and authentication answers, and
//! the SQL text the router reads. Each takes arbitrary bytes and must
//! return without panicking, whatever they are.
//!
//! The coverage-guided targets in `fuzz/` (run by `scripts/fuzz.sh`) call
//! these; `proxy/tests/fuzz_corpus.rs` replays the committed corpus through
//! them in every `cargo test`.

use crate::auth::{md5, scram};
use crate::protocol::{frontend, next_frame, startup};
use bytes::BytesMut;
use shardline_router::sharding::Sharding;
use shardline_router::shards::{resolve, split_insert, KeyInput, Param, SqlText};
use shardline_router::{Options, Router};
use std::sync::{Arc, OnceLock};

/// A small deterministic generator (xorshift64*) for seeded tests and
/// mutation runs: the same sequence for a seed, so a failure reproduces.
/// The seed must not be 0.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (0 for `n` = 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// True `percent` times in 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}

/// A stream of client messages after login: framed as the session frames
/// them (bounded by a message size), each read as its handler reads it.
pub fn client_messages(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = next_frame(&mut buf, 1 << 20) {
        let body = frame.body();
        match frame.tag {
            frontend::PARSE => {
                if let Ok(p) = frontend::parse(body) {
                    let types = frontend::definition_param_types(p.definition);
                    if let Ok(q) = std::str::from_utf8(p.query) {
                        let _ = frontend::definition(q, &types);
                    }
                }
            }
            frontend::BIND => {
                if let Ok(b) = frontend::bind(body) {
                    if let Some(params) = frontend::bind_params(b.rest) {
                        let picks: Vec<usize> = (0..params.len()).step_by(2).collect();
                        let _ = frontend::bind_rest_subset(b.rest, &picks);
                    }
                    let _ = frontend::with_extra_result_columns(b.rest, 2);
                }
            }
            frontend::DESCRIBE | frontend::CLOSE => {
                let _ = frontend::target(body, "Describe");
            }
            frontend::EXECUTE => {
                let _ = frontend::execute_portal(body);
            }
            frontend::QUERY => {
                if let Ok(q) = frontend::query(body) {
                    route(q);
                }
            }
            _ => {}
        }
    }
}

/// A startup packet, then a SCRAM exchange (the data's halves as the
/// client-first and client-final messages) against a mock verifier, and an
/// md5 answer.
pub fn login(data: &[u8]) {
    if let Ok(Some(len)) = startup::packet_len(data) {
        if len <= data.len() {
            let _ = startup::parse(&data[..len]);
        }
    }
    let _ = startup::parse(data);
    let (first, last) = data.split_at(data.len() / 2);
    let verifier = scram::Verifier::mock("fuzz");
    if let Ok((exchange, _)) = scram::ServerExchange::start(&verifier, "SCRAM-SHA-256", first) {
        let _ = exchange.finish(last);
    }
    let _ = md5::verify("md5fuzz", [1, 2, 3, 4], data);
}

/// SQL text (lossily decoded) through the router as a session uses it:
/// classification, shard placement with a key from text and parameters,
/// the merge plan, and INSERT splitting.
pub fn route(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (sharding, mut router) = sharded_router();
    let route = router.route(&text);
    let params: &[Param] = &[(1, Some(b"\x00\x00\x00\x07")), (0, Some(b"42")), (0, None)];
    let input = KeyInput {
        sql: SqlText::Str(&text),
        params,
        param_types: &[20, 25],
        session_shard: None,
        session_key: None,
        constants: None,
    };
    if let Some(templates) = &route.shards {
        for t in templates.iter() {
            let _ = resolve(t, sharding, &input);
            let _ = split_insert(&text, sharding, Some(t), params, &[20, 25]);
        }
    }
    let _ = shardline_router::scatter::plan(&text, sharding);
}

/// Two shards with the demo's tables (`users` by `id`, `orders` by
/// `user_id`, the reference table `countries`); a fresh router (and
/// routing cache) for each input.
fn sharded_router() -> (&'static Sharding, Router) {
    static SHARDING: OnceLock<Arc<Sharding>> = OnceLock::new();
    let sharding = SHARDING.get_or_init(|| {
        let text = format!(
            "[[users]]\nname = \"a\"\npassword = \"a\"\ndatabase = \"a\"\n{}\n\
             [[shards]]\nname = \"s0\"\nprimary = {{ host = \"h\", port = 1 }}\n\
             [[shards]]\nname = \"s1\"\nprimary = {{ host = \"h\", port = 2 }}\n",
            crate::demo::DEMO_SHARDING
        );
        let config =
            shardline_config::Config::from_toml(&text, "fuzz").expect("the fuzz config is valid");
        Arc::new(Sharding::from_config(&config))
    });
    (
        sharding,
        Router::new(Options::default(), 16, Some(sharding.clone())),
    )
}
