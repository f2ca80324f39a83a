//! The router never panics, whatever the text: arbitrary strings, SQL-ish
//! noise, and nesting deep enough to exhaust a recursive parser.

use proptest::prelude::*;
use shardline_router::sharding::Sharding;
use shardline_router::shards::{resolve, KeyInput};
use shardline_router::{classify, hint, lexer, Class, Options, Router};
use std::sync::Arc;

fn sharded_router() -> (Router, Arc<Sharding>) {
    let c = shardline_config::Config::from_toml(
        r#"
        [[users]]
        name = "a"
        password = "a"
        database = "a"
        [[sharding.tables]]
        name = "users"
        column = "id"
        [[shards]]
        name = "s0"
        primary = { host = "h", port = 1 }
        [[shards]]
        name = "s1"
        primary = { host = "h", port = 2 }
        "#,
        "t",
    )
    .expect("config");
    let sh = Arc::new(Sharding::from_config(&c));
    (Router::new(Options::default(), 16, Some(sh.clone())), sh)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text(text in "\\PC{0,100}") {
        let _ = classify(&text, &Options::default());
        let _ = hint::leading_hint(&text);
        let _ = hint::session_role(&text);
        for piece in lexer::split_statements(&text) {
            prop_assert!(text.contains(piece));
        }
    }

    #[test]
    fn sql_shaped_noise(text in "(SELECT|WITH|INSERT|INTO|VALUES|BEGIN|SET|EXPLAIN|FOR|UPDATE|FROM|WHERE|users|id|IN|ANY|=|\\$1|E|\\(|\\)|'|\"|\\$\\$|;|,|/\\*|\\*/|--|\n|a|1|-| )*") {
        let mut r = Router::new(Options::default(), 16, None);
        let _ = r.route(&text);
        let (mut sharded, sh) = sharded_router();
        let route = sharded.route(&text);
        let params: &[(i16, Option<&[u8]>)] = &[(1, Some(b"\x01\x02")), (0, Some(b"{1,\"2"))];
        let input = KeyInput { sql: &text, params, session_shard: None, session_key: None };
        for t in route.shards.expect("sharded").iter() {
            let _ = resolve(t, &sh, &input);
        }
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    for depth in [100, 1_000, 20_000] {
        let sql = format!("SELECT {}1{}", "(".repeat(depth), ")".repeat(depth));
        // Whatever the parser makes of it, the answer is a class, and an
        // unparseable SELECT is a write.
        let (class, _) = classify(&sql, &Options::default());
        assert!(matches!(class, Class::Read | Class::Write));
    }
}
