//! Cross-shard merge planning (`scatter::plan`) and the pure merge steps
//! (`gather`): what each shard runs, and how partial rows combine.

use shardline_config::Config;
use shardline_router::gather::{client_columns, ClientColumns, Collation, Compiled, FieldType};
use shardline_router::merge::Format;
use shardline_router::scatter::{plan, Agg, Col, Count, MergePlan};
use shardline_router::sharding::Sharding;
use shardline_router::shards::{resolve, Construct, KeyInput, Placement};
use shardline_router::{classify::Options, Router};
use std::sync::Arc;

const CONFIG: &str = r#"
[[users]]
name = "app"
password = "app"
database = "app"

[sharding]
function = "pg_hash"

[[sharding.tables]]
name = "users"
column = "id"
[[sharding.tables]]
name = "orders"
column = "user_id"

[[reference_tables]]
name = "countries"

[[shards]]
name = "s0"
primary = { host = "127.0.0.1", port = 5432 }
[[shards]]
name = "s1"
primary = { host = "127.0.0.1", port = 5433 }
"#;

fn sharding() -> Arc<Sharding> {
    let c = Config::from_toml(CONFIG, "test").expect("config");
    Arc::new(Sharding::from_config(&c))
}

fn planned(sql: &str) -> MergePlan {
    plan(sql, &sharding())
        .unwrap_or_else(|r| panic!("{sql}: refused: {}", r.message))
        .unwrap_or_else(|| panic!("{sql}: no merge planned"))
}

fn refusal(sql: &str) -> String {
    match plan(sql, &sharding()) {
        Err(r) => {
            assert_eq!(r.code, "0A000");
            assert_eq!(r.construct, Some(Construct::Merge), "{sql}");
            r.message
        }
        Ok(p) => panic!("{sql}: planned {p:?}"),
    }
}

#[test]
fn reads_needing_a_merge_are_placed_for_merging() {
    let sh = sharding();
    let mut router = Router::new(Options::default(), 100, Some(sh.clone()));
    for sql in [
        "SELECT * FROM users ORDER BY id",
        "SELECT * FROM users LIMIT 3",
        "SELECT count(*) FROM users",
        "SELECT country, count(*) FROM users GROUP BY country",
        "SELECT DISTINCT country FROM users",
        "SELECT id, row_number() OVER () FROM users",
    ] {
        let route = router.route(sql);
        let input = KeyInput {
            sql: sql.into(),
            params: &[],
            param_types: &[],
            session_shard: None,
            session_key: None,
            constants: None,
        };
        let p = resolve(&route.shards.expect("sharded")[0], &sh, &input);
        assert_eq!(p, Placement::Merge(sh.all_shards()), "{sql}");
    }
}

#[test]
fn order_by_stays_on_the_shards_and_hidden_keys_are_appended() {
    let p = planned("SELECT id, name FROM users ORDER BY id");
    assert_eq!((p.hidden, p.sort[0].col), (0, Col::Field(0)));
    assert_eq!(p.sql, "SELECT id, name FROM users ORDER BY id");

    let p = planned("SELECT name FROM users ORDER BY id DESC LIMIT 20");
    assert_eq!(
        p.sql,
        "SELECT name, id FROM users ORDER BY id DESC LIMIT 20"
    );
    assert_eq!(p.hidden, 1);
    assert!(p.sort[0].descending && p.sort[0].nulls_first);
    assert_eq!(p.sort[0].col, Col::Hidden(0));

    // Output names and positions are output columns; expressions are hidden.
    let p = planned("SELECT id, score * 2 AS double FROM users ORDER BY double NULLS FIRST, 1");
    assert_eq!(p.hidden, 0);
    assert_eq!(
        p.sort.iter().map(|k| k.col).collect::<Vec<_>>(),
        [Col::Field(1), Col::Field(0)]
    );
    let p = planned("SELECT * FROM users ORDER BY lower(name), id");
    assert_eq!(p.hidden, 2, "{}", p.sql);
    assert!(
        p.sql.starts_with("SELECT *, lower(name), id FROM users"),
        "{}",
        p.sql
    );
    assert!(planned("SELECT name FROM users ORDER BY name COLLATE \"C\"").sort[0].collate_c);
}

#[test]
fn limit_and_offset_are_pushed_down_as_their_sum() {
    let p = planned("SELECT id FROM users ORDER BY id LIMIT 10 OFFSET 5");
    assert!(p.sql.ends_with("ORDER BY id LIMIT 15"), "{}", p.sql);
    assert_eq!((p.limit, p.offset), (Count::Const(10), Count::Const(5)));
    let p = planned("SELECT id FROM users ORDER BY id OFFSET 1990");
    assert!(p.sql.ends_with("ORDER BY id"), "{}", p.sql);
    let p = planned("SELECT id FROM users ORDER BY id LIMIT $1 OFFSET $2");
    assert!(
        p.sql.ends_with(
            "LIMIT (LEAST($1::INT8, 9223372036854775807 - GREATEST($2::INT8, 0)) + GREATEST($2::INT8, 0))"
        ),
        "{}",
        p.sql
    );
    assert_eq!((p.limit, p.offset), (Count::Param(1), Count::Param(2)));
    // The sum saturates at bigint's largest value (the shards' LIMIT is a
    // bigint; Postgres answers such a query).
    let p = planned("SELECT id FROM users ORDER BY id LIMIT 9223372036854775807 OFFSET 1");
    assert!(p.sql.ends_with("LIMIT 9223372036854775807"), "{}", p.sql);
    let p = planned("SELECT id FROM users ORDER BY id LIMIT $1 OFFSET 3");
    assert!(
        p.sql
            .ends_with("LIMIT (LEAST($1::INT8, 9223372036854775807 - 3) + 3)"),
        "{}",
        p.sql
    );
    // OFFSET $1 alone: nothing to push down, but $1 stays referenced.
    let p = planned("SELECT id FROM users ORDER BY id OFFSET $1");
    assert!(
        p.sql.ends_with("ORDER BY id OFFSET 0 * $1::INT8"),
        "{}",
        p.sql
    );
    assert_eq!((p.limit, p.offset), (Count::None, Count::Param(1)));
    let p = planned("SELECT id FROM users ORDER BY id FETCH FIRST 7 ROWS ONLY");
    assert!(p.sql.ends_with("LIMIT 7"), "{}", p.sql);
    // Without ORDER BY, LIMIT still needs the proxy to count.
    assert_eq!(
        planned("SELECT id FROM users LIMIT 3").limit,
        Count::Const(3)
    );
}

#[test]
fn aggregates_are_combined_from_partials_and_avg_becomes_sum_and_count() {
    let p = planned("SELECT avg(age), count(*), sum(score), min(name), bool_or(active) FROM users");
    assert_eq!(
        p.sql,
        "SELECT sum(age) AS avg, count(*), sum(score), min(name), bool_or(active), count(age) FROM users"
    );
    let g = p.grouping.expect("grouped");
    assert_eq!(
        g.aggs,
        [
            (
                Col::Field(0),
                Agg::Avg {
                    count: Col::Hidden(0)
                }
            ),
            (Col::Field(1), Agg::Count),
            (Col::Field(2), Agg::Sum),
            (Col::Field(3), Agg::Min),
            (Col::Field(4), Agg::BoolOr),
        ]
    );
    let p = planned(
        "SELECT city, count(*) FROM users GROUP BY city HAVING count(*) > 100 ORDER BY 2 DESC LIMIT 3",
    );
    // HAVING, ORDER BY and LIMIT run after the merge; the group key and
    // HAVING's aggregate are hidden columns.
    assert_eq!(
        p.sql,
        "SELECT city, count(*), city, count(*) FROM users GROUP BY city"
    );
    assert_eq!((p.hidden, p.limit), (2, Count::Const(3)));
    assert!(p.grouping.unwrap().having.is_some());
}

#[test]
fn groups_on_the_sharding_key_are_not_combined() {
    // Every group lives on one shard: rows are only merged by order.
    assert_eq!(
        plan(
            "SELECT user_id, sum(amount) FROM orders GROUP BY user_id",
            &sharding()
        )
        .unwrap(),
        None
    );
    let p = planned(
        "SELECT user_id, string_agg(status, ',') FROM orders GROUP BY user_id ORDER BY 1 LIMIT 5",
    );
    assert!(p.grouping.is_none());
    assert!(
        p.sql.contains("GROUP BY user_id ORDER BY 1 LIMIT 5"),
        "{}",
        p.sql
    );
    assert_eq!(
        plan(
            "SELECT DISTINCT user_id FROM orders WHERE amount > 900",
            &sharding()
        )
        .unwrap(),
        None
    );
    // count(DISTINCT key): key values never repeat across shards.
    assert!(planned("SELECT count(DISTINCT id) FROM users")
        .grouping
        .is_some());
}

/// A key from the nullable side of an outer join is NULL in the rows
/// without a match, on every shard: grouping or DISTINCT by it is merged
/// across shards (one NULL group), not left to each shard.
#[test]
fn keys_on_the_nullable_side_of_outer_joins_are_not_group_keys() {
    for sql in [
        "SELECT o.user_id, count(*) FROM users u LEFT JOIN orders o ON o.user_id = u.id GROUP BY o.user_id",
        "SELECT o.user_id, count(*) FROM orders o RIGHT JOIN users u ON o.user_id = u.id GROUP BY o.user_id",
        "SELECT o.user_id, count(*) FROM users u FULL JOIN orders o ON o.user_id = u.id GROUP BY o.user_id",
    ] {
        let p = planned(sql);
        assert!(p.grouping.is_some(), "{sql}: {p:?}");
    }
    let p =
        planned("SELECT DISTINCT o.user_id FROM users u LEFT JOIN orders o ON o.user_id = u.id");
    assert!(p.grouping.is_some() || !p.sort.is_empty(), "{p:?}");
    // The preserved side's key still keeps every group on one shard.
    assert_eq!(
        plan(
            "SELECT u.id, count(o.id) FROM users u LEFT JOIN orders o ON o.user_id = u.id GROUP BY u.id",
            &sharding()
        )
        .unwrap(),
        None
    );
}

/// `count(DISTINCT key)` is a sum of the shards' counts only while the
/// shards group by the query's groups alone: beside a `count(DISTINCT x)`
/// (the shards then group by x too) it is counted like any other.
#[test]
fn count_distinct_key_beside_another_count_distinct_is_counted() {
    let p = planned("SELECT count(DISTINCT user_id), count(DISTINCT status) FROM orders");
    let aggs = &p.grouping.expect("grouped").aggs;
    assert!(
        aggs.iter()
            .all(|(_, a)| matches!(a, Agg::CountDistinct { .. })),
        "{aggs:?}"
    );
    let p = planned("SELECT count(DISTINCT user_id), count(*) FROM orders");
    let aggs = &p.grouping.expect("grouped").aggs;
    assert!(aggs.iter().all(|(_, a)| *a == Agg::Count), "{aggs:?}");
}

/// HAVING with BETWEEN and IN lists, LIMIT/OFFSET as constant expressions,
/// GROUP BY the key's position: merged (or left to the shards) exactly.
#[test]
fn having_between_constant_limits_and_key_positions() {
    let p = planned(
        "SELECT country, count(*) FROM users GROUP BY country HAVING count(*) BETWEEN 2 AND 5",
    );
    assert!(p.grouping.expect("grouped").having.is_some());
    let p = planned(
        "SELECT country, count(*) FROM users GROUP BY country HAVING count(*) NOT IN (1, 2)",
    );
    assert!(p.grouping.expect("grouped").having.is_some());
    let p = planned("SELECT id FROM users ORDER BY id LIMIT (2 + 1) OFFSET 2 * 3");
    assert_eq!((p.limit, p.offset), (Count::Const(3), Count::Const(6)));
    assert!(p.sql.ends_with("LIMIT 9"), "{}", p.sql);
    match plan(
        "SELECT id FROM users ORDER BY id LIMIT 9223372036854775808",
        &sharding(),
    ) {
        Err(r) => assert_eq!(r.code, "22003"),
        Ok(p) => panic!("planned {p:?}"),
    }
    // GROUP BY 1 naming the key: every group on one shard, any aggregate.
    assert_eq!(
        plan(
            "SELECT user_id, avg(amount), sum(DISTINCT qty) FROM orders GROUP BY 1",
            &sharding()
        )
        .unwrap(),
        None
    );
}

/// Window functions partitioned by the sharding key are computed whole on
/// each shard: concatenated, or merged by order; others are refused.
#[test]
fn windows_partitioned_by_the_key_run_on_the_shards() {
    assert_eq!(
        plan(
            "SELECT user_id, id, rank() OVER (PARTITION BY user_id ORDER BY amount DESC) FROM orders",
            &sharding()
        )
        .unwrap(),
        None
    );
    let p = planned(
        "SELECT user_id, id, sum(amount) OVER (PARTITION BY o.user_id, status ORDER BY id) FROM orders o ORDER BY 1, 2 LIMIT 5",
    );
    assert!(p.grouping.is_none() && !p.sort.is_empty(), "{p:?}");
    // Grouped by the key: every group and partition on one shard.
    assert_eq!(
        plan(
            "SELECT user_id, count(*), rank() OVER (PARTITION BY user_id ORDER BY count(*)) FROM orders GROUP BY user_id",
            &sharding()
        )
        .unwrap(),
        None
    );
    for sql in [
        "SELECT id, row_number() OVER (ORDER BY id) FROM users",
        "SELECT status, rank() OVER (PARTITION BY status ORDER BY amount) FROM orders",
        "SELECT status, count(*), rank() OVER (PARTITION BY status ORDER BY count(*)) FROM orders GROUP BY status",
        "SELECT id, rank() OVER w FROM users WINDOW w AS (PARTITION BY id)",
    ] {
        assert!(refusal(sql).contains("window functions"), "{sql}");
    }
}

/// A CTE over reference tables holds the same rows on every shard: merged
/// reads keep it in the shards' statement. Over a sharded table, or
/// recursive, it stays refused.
#[test]
fn ctes_over_reference_tables_merge() {
    let p = planned(
        "WITH big AS (SELECT code FROM countries WHERE population > 100) \
         SELECT u.country, count(*) FROM users u JOIN big ON big.code = u.country GROUP BY u.country",
    );
    assert!(p.grouping.is_some());
    assert!(p.sql.starts_with("WITH big AS"), "{}", p.sql);
    for sql in [
        "WITH o AS (SELECT * FROM orders) SELECT count(*) FROM o",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT count(*) FROM users, r",
    ] {
        assert!(refusal(sql).contains("WITH"), "{sql}");
    }
}

/// Negative LIMIT and OFFSET constants get Postgres's own errors.
#[test]
fn negative_limits_are_postgres_errors() {
    for (sql, code) in [
        ("SELECT id FROM users ORDER BY id LIMIT -1", "2201W"),
        ("SELECT id FROM users ORDER BY id OFFSET -1", "2201X"),
    ] {
        match plan(sql, &sharding()) {
            Err(r) => assert_eq!(r.code, code, "{sql}: {}", r.message),
            Ok(p) => panic!("{sql}: planned {p:?}"),
        }
    }
}

#[test]
fn what_cannot_be_merged_exactly_is_refused_naming_it() {
    for (sql, says) in [
        (
            "SELECT id, row_number() OVER (ORDER BY id) FROM users",
            "window functions",
        ),
        (
            "SELECT 1, count(DISTINCT city) FROM users",
            "not an aggregate",
        ),
        ("SELECT sum(DISTINCT age) FROM users", "sum(DISTINCT"),
        ("SELECT string_agg(name, ',') FROM users", "string_agg"),
        (
            "SELECT count(*) + 1 FROM users",
            "expression over aggregate",
        ),
        (
            "SELECT id FROM users UNION SELECT user_id FROM orders",
            "UNION",
        ),
        (
            "WITH x AS (SELECT id FROM users) SELECT count(*) FROM x",
            "WITH",
        ),
        (
            "SELECT DISTINCT ON (city) city, id FROM users",
            "DISTINCT ON without ORDER BY",
        ),
        (
            "SELECT name FROM users ORDER BY name COLLATE \"de_DE\"",
            "collation",
        ),
        (
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY age) FROM users",
            "WITHIN GROUP",
        ),
        (
            "SELECT DISTINCT city FROM users ORDER BY lower(city)",
            "DISTINCT",
        ),
        (
            "SELECT id FROM users ORDER BY id LIMIT random()::int",
            "LIMIT",
        ),
        (
            "SELECT lower(city) AS c, count(*) FROM users GROUP BY c",
            "names an output column",
        ),
        (
            "COPY (SELECT id FROM users ORDER BY id) TO STDOUT",
            "COPY (SELECT ...)",
        ),
        (
            "SELECT id FROM users ORDER BY id; SELECT 1",
            "several statements",
        ),
    ] {
        let msg = refusal(sql);
        assert!(msg.contains(says), "{sql}: {msg}");
    }
}

/// The shards' columns: (name, type oid, format) as a RowDescription
/// gives them (the name only documents the test).
fn description(fields: &[(&str, u32, i16)]) -> Vec<FieldType> {
    fields
        .iter()
        .map(|&(_, oid, format)| FieldType {
            oid,
            format: if format == 1 {
                Format::Binary
            } else {
                Format::Text
            },
        })
        .collect()
}

fn row<'a>(values: &[Option<&'a str>]) -> Vec<Option<&'a [u8]>> {
    values.iter().map(|v| v.map(str::as_bytes)).collect()
}

/// Collects a grouper's finished rows as text.
fn texts(out: &mut Vec<Vec<Option<String>>>) -> impl FnMut(&[Option<Vec<u8>>]) + '_ {
    |values| {
        out.push(
            values
                .iter()
                .map(|v| v.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()))
                .collect(),
        )
    }
}

const C: Collation = Collation {
    c_order: true,
    deterministic: true,
};

#[test]
fn partial_rows_combine_as_one_server_would_answer() {
    let p = planned(
        "SELECT city, count(*), sum(age), avg(score), min(name), bool_and(active) FROM users GROUP BY city HAVING sum(age) > 10 ORDER BY city NULLS FIRST",
    );
    let fields = [
        ("city", 25, 0),
        ("count", 20, 0),
        ("sum", 20, 0),
        ("avg", 1700, 0),
        ("min", 25, 0),
        ("bool_and", 16, 0),
        ("count", 20, 0), // avg's count
        ("city", 25, 0),  // group key
        ("sum", 20, 0),   // HAVING's sum
    ];
    let desc = description(&fields);
    let ft: Vec<FieldType> = desc.clone();
    let c = Compiled::new(&p, &ft, C).expect("compiles");
    // The client sees six columns, avg typed numeric.
    assert_eq!(
        client_columns(&p, desc.len()).unwrap(),
        ClientColumns {
            visible: 6,
            numeric: vec![3]
        }
    );
    let mut g = c.grouper();
    // Shard 0 and shard 1's partials for "Bern" and NULL; "Chur" fails HAVING.
    for r in [
        [
            Some("Bern"),
            Some("2"),
            Some("70"),
            Some("3.50"),
            Some("b"),
            Some("t"),
            Some("2"),
            Some("Bern"),
            Some("70"),
        ],
        [
            None,
            Some("1"),
            Some("20"),
            None,
            Some("z"),
            Some("f"),
            Some("0"),
            None,
            Some("20"),
        ],
        [
            Some("Chur"),
            Some("1"),
            Some("5"),
            Some("1.0"),
            Some("c"),
            Some("t"),
            Some("1"),
            Some("Chur"),
            Some("5"),
        ],
        [
            Some("Bern"),
            Some("1"),
            Some("30"),
            Some("1.255"),
            Some("a"),
            Some("f"),
            Some("1"),
            Some("Bern"),
            Some("30"),
        ],
    ] {
        g.add(&row(&r)).unwrap();
    }
    assert_eq!(g.len(), 3);
    let mut out = Vec::new();
    assert_eq!(g.finish(None, 0, texts(&mut out)).unwrap(), 2);
    let s = |x: &str| Some(x.to_string());
    assert_eq!(
        out,
        [
            // NULL group first; avg of no values is NULL.
            vec![None, s("1"), s("20"), None, s("z"), s("f")],
            // 4.755 / 3 at numeric_div's scale.
            vec![
                s("Bern"),
                s("3"),
                s("100"),
                s("1.5850000000000000"),
                s("a"),
                s("f")
            ],
        ]
    );
}

#[test]
fn types_and_collations_that_cannot_merge_exactly_are_refused() {
    let sum = planned("SELECT sum(weight) FROM orders");
    let desc = description(&[("sum", 701, 0)]);
    let ft = desc.clone();
    let r = Compiled::new(&sum, &ft, C).unwrap_err();
    assert!(r.message.contains("floating-point"), "{}", r.message);

    let by_name = planned("SELECT id, name FROM users ORDER BY name");
    let desc = description(&[("id", 20, 0), ("name", 25, 0)]);
    let ft = desc.clone();
    let icu = Collation {
        c_order: false,
        deterministic: true,
    };
    assert!(Compiled::new(&by_name, &ft, C).is_ok());
    let r = Compiled::new(&by_name, &ft, icu).unwrap_err();
    assert!(r.message.contains("collation is not C"), "{}", r.message);
    // COLLATE "C" is exact in any database; numbers need no collation.
    let c_name = planned("SELECT id, name FROM users ORDER BY name COLLATE \"C\"");
    assert!(Compiled::new(&c_name, &ft, icu).is_ok());
    assert!(Compiled::new(&planned("SELECT id, name FROM users ORDER BY id"), &ft, icu).is_ok());
    let by_interval = planned("SELECT id, name FROM users ORDER BY 2");
    let desc = description(&[("id", 20, 0), ("name", 1186, 0)]);
    let ft = desc.clone();
    assert!(Compiled::new(&by_interval, &ft, C)
        .unwrap_err()
        .message
        .contains("interval"));
}

#[test]
fn a_bigint_sum_past_its_range_fails_as_on_the_server() {
    let p = planned("SELECT sum(age) FROM users");
    let desc = description(&[("sum", 20, 1)]);
    let ft = desc.clone();
    let c = Compiled::new(&p, &ft, C).unwrap();
    let mut g = c.grouper();
    for _ in 0..2 {
        let v = i64::MAX.to_be_bytes();
        g.add(&[Some(&v[..])]).unwrap();
    }
    let e = g.finish(None, 0, |_| {}).unwrap_err();
    assert_eq!(
        (e.code, e.message.as_str()),
        ("22003", "bigint out of range")
    );
}

#[test]
fn sorted_rows_lose_their_hidden_columns() {
    let p = planned("SELECT name FROM users ORDER BY id");
    let desc = description(&[("name", 25, 0), ("id", 20, 0)]);
    let ft = desc.clone();
    let c = Compiled::new(&p, &ft, C).unwrap();
    let a = row(&[Some("x"), Some("10")]);
    let b = row(&[Some("y"), Some("9")]);
    let (ka, kb) = (c.sort_key(&a).unwrap(), c.sort_key(&b).unwrap());
    assert_eq!(c.compare(&ka, &kb), std::cmp::Ordering::Greater);
    // The client sees the first column only.
    assert_eq!((c.visible(), c.width()), (1, 2));
}

#[test]
fn a_grouped_merge_keeps_its_limit_parameters_referenced() {
    let p = planned("SELECT city, count(*) FROM users GROUP BY city ORDER BY 1 LIMIT $1 OFFSET $2");
    assert!(
        p.sql
            .ends_with("GROUP BY city OFFSET 0 * $1::INT8 + 0 * $2::INT8"),
        "{}",
        p.sql
    );
    assert_eq!((p.limit, p.offset), (Count::Param(1), Count::Param(2)));
}

#[test]
fn count_distinct_off_the_key_groups_the_shards_by_its_argument() {
    let p = planned("SELECT active, count(DISTINCT city), count(*) FROM users GROUP BY active");
    assert_eq!(
        p.sql,
        "SELECT active, count(DISTINCT city), count(*), city, active FROM users GROUP BY active, city"
    );
    let g = p.grouping.clone().expect("grouped");
    assert_eq!(
        g.aggs,
        [
            (
                Col::Field(1),
                Agg::CountDistinct {
                    value: Col::Hidden(0)
                }
            ),
            (Col::Field(2), Agg::Count),
        ]
    );
    // Partial rows per (active, city); a city counts where its partial
    // count(DISTINCT) is above 0 (not NULL, FILTER passed).
    let desc = description(&[
        ("active", 16, 0),
        ("count", 20, 0),
        ("count", 20, 0),
        ("city", 25, 0),
        ("active", 16, 0),
    ]);
    let ft = desc.clone();
    let c = Compiled::new(&p, &ft, C).unwrap();
    let mut groups = c.grouper();
    for r in [
        [Some("t"), Some("1"), Some("4"), Some("Bern"), Some("t")],
        [Some("t"), Some("1"), Some("2"), Some("Bern"), Some("t")], // the other shard
        [Some("t"), Some("1"), Some("1"), Some("Chur"), Some("t")],
        [Some("t"), Some("0"), Some("3"), None, Some("t")],
        [Some("f"), Some("0"), Some("5"), None, Some("f")],
    ] {
        groups.add(&row(&r)).unwrap();
    }
    let mut got = Vec::new();
    groups.finish(None, 0, texts(&mut got)).unwrap();
    got.sort();
    let s = |x: &str| Some(x.to_string());
    assert_eq!(
        got,
        [vec![s("f"), s("0"), s("5")], vec![s("t"), s("2"), s("10")]]
    );

    // Without GROUP BY and without rows, one row: 0, as the server answers.
    let p = planned("SELECT count(DISTINCT city), sum(age) FROM users");
    assert!(p.sql.ends_with("FROM users GROUP BY city"), "{}", p.sql);
    let desc = description(&[("count", 20, 0), ("sum", 20, 0), ("city", 25, 0)]);
    let ft = desc.clone();
    let c = Compiled::new(&p, &ft, C).unwrap();
    let mut out = Vec::new();
    assert_eq!(c.grouper().finish(None, 0, texts(&mut out)).unwrap(), 1);
    assert_eq!(out, [vec![s("0"), None]]);
}

/// FETCH FIRST n ROWS WITH TIES: each shard sends its first LIMIT + OFFSET
/// rows with their ties (every row sorting before the answer's last is
/// among them); the merge keeps the ties past the limit. Over groups or
/// DISTINCT rows it is refused.
#[test]
fn fetch_first_with_ties_is_pushed_down_and_merged() {
    let p =
        planned("SELECT id, age FROM users ORDER BY age OFFSET 3 FETCH FIRST 10 ROWS WITH TIES");
    assert!(p.with_ties);
    assert!(
        p.sql
            .ends_with("ORDER BY age FETCH FIRST (13) ROWS WITH TIES"),
        "{}",
        p.sql
    );
    let p = planned("SELECT id, age FROM users ORDER BY age FETCH FIRST $1 ROWS WITH TIES");
    assert!(
        p.sql.ends_with("FETCH FIRST ($1::INT8) ROWS WITH TIES"),
        "{}",
        p.sql
    );
    assert!(!planned("SELECT id FROM users ORDER BY id FETCH FIRST 3 ROWS ONLY").with_ties);
    for sql in [
        "SELECT DISTINCT age FROM users ORDER BY age FETCH FIRST 3 ROWS WITH TIES",
        "SELECT age, count(*) FROM users GROUP BY age ORDER BY 2 FETCH FIRST 2 ROWS WITH TIES",
    ] {
        assert!(refusal(sql).contains("WITH TIES"), "{sql}");
    }
}
