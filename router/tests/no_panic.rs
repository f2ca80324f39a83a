//! The router never panics, whatever the text: arbitrary strings, SQL-ish
//! noise, and nesting deep enough to exhaust a recursive parser.

use proptest::prelude::*;
use shardline_router::sharding::Sharding;
use shardline_router::shards::{resolve, KeyInput};
use shardline_router::{classify, hint, lexer, Class, Options, Router};
use std::sync::Arc;

/// The differential corpus's queries (without their prefixes).
fn corpus() -> Vec<String> {
    include_str!("../../tests/differential/corpus.sql")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("--"))
        .map(|l| {
            let l = l.trim_start_matches('!').trim_start();
            match l.strip_prefix('[') {
                Some(r) => r.split_once(']').map_or(r, |x| x.1).trim().to_string(),
                None => l.to_string(),
            }
        })
        .collect()
}

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
        let input = KeyInput { sql: text.as_str().into(), params, param_types: &[], session_shard: None, session_key: None, constants: None };
        for t in route.shards.expect("sharded").iter() {
            let _ = resolve(t, &sh, &input);
        }
    }

    /// Merge planning of SQL-shaped noise and of the differential corpus's
    /// queries, and the planned merge fed arbitrary RowDescriptions and
    /// rows: errors, never panics.
    #[test]
    fn merges_of_noise(
        text in prop_oneof![
            "(SELECT|DISTINCT|ON|count|sum|avg|min|max|\\(|\\)|\\*|id|name|users|FROM|GROUP|BY|ORDER|HAVING|LIMIT|OFFSET|DESC|NULLS|FIRST|COLLATE|\"C\"|FILTER|WHERE|\\$1|1|>|,| )*",
            proptest::sample::select(corpus()),
        ],
        width in 0usize..12,
        rows in proptest::collection::vec(
            proptest::collection::vec(proptest::option::of(proptest::collection::vec(any::<u8>(), 0..12)), 0..8),
            0..6,
        ),
        oids in proptest::collection::vec(prop_oneof![Just(16u32), Just(20), Just(23), Just(25), Just(701), Just(1700), Just(1184), Just(2950)], 0..6),
    ) {
        use shardline_router::gather::{client_columns, Collation, Compiled, FieldType};
        use shardline_router::merge::Format;
        let (_, sh) = sharded_router();
        let Ok(Some(plan)) = shardline_router::scatter::plan(&text, &sh) else {
            return Ok(());
        };
        let _ = client_columns(&plan, width);
        let fields: Vec<FieldType> = oids
            .iter()
            .enumerate()
            .map(|(i, &oid)| FieldType { oid, format: if i % 2 == 0 { Format::Text } else { Format::Binary } })
            .collect();
        let coll = Collation { c_order: true, deterministic: true };
        if let Ok(c) = Compiled::new(&plan, &fields, coll) {
            let mut g = c.grouper();
            for row in &rows {
                let values: Vec<Option<&[u8]>> = row.iter().map(|v| v.as_deref()).collect();
                let _ = c.sort_key(&values);
                let _ = c.distinct_key(&values);
                let _ = g.add(&values);
            }
            let _ = g.finish(Some(3), 1, |_| {});
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
