//! Key extraction and placement: which shards a statement reaches.

use shardline_config::Config;
use shardline_router::hash::KeyValue;
use shardline_router::sharding::{mask_of, Sharding};
use shardline_router::shards::{
    resolve, resolve_noting, shard_by_key, Construct, KeyInput, KeySeen, Placement,
};
use shardline_router::{classify::Options, Router};
use std::sync::Arc;

const CONFIG: &str = r#"
[[users]]
name = "app"
password = "app"
database = "app"

[sharding]
function = "pg_hash"
pinned = [{ key = 1000000, shard = "s2" }]

[[sharding.tables]]
name = "users"
column = "id"
[[sharding.tables]]
name = "orders"
column = "user_id"
[[sharding.tables]]
name = "events"
column = "device"
group = "devices"

[[sharding.groups]]
name = "devices"
function = "consistent"
key_type = "uuid"

[[reference_tables]]
name = "countries"

[[shards]]
name = "s0"
primary = { host = "127.0.0.1", port = 5432 }
[[shards]]
name = "s1"
primary = { host = "127.0.0.1", port = 5433 }
[[shards]]
name = "s2"
primary = { host = "127.0.0.1", port = 5434 }
"#;

struct T {
    router: Router,
    sh: Arc<Sharding>,
    /// The keys the last statement placed was placed by.
    seen: Vec<KeySeen>,
}

impl T {
    fn new() -> T {
        T::from(CONFIG)
    }

    fn from(toml: &str) -> T {
        let c = Config::from_toml(toml, "test").expect("config");
        let sh = Arc::new(Sharding::from_config(&c));
        T {
            router: Router::new(Options::default(), 100, Some(sh.clone())),
            sh,
            seen: Vec::new(),
        }
    }

    fn place_with(&mut self, sql: &str, params: &[(i16, Option<&[u8]>)]) -> Vec<Placement> {
        self.place_typed(sql, params, &[])
    }

    /// With the parameter types a Parse declared.
    fn place_typed(
        &mut self,
        sql: &str,
        params: &[(i16, Option<&[u8]>)],
        param_types: &[u32],
    ) -> Vec<Placement> {
        let route = self.router.route(sql);
        let one_key = route.one_key;
        let input = KeyInput {
            sql: sql.into(),
            params,
            param_types,
            session_shard: None,
            session_key: None,
            constants: None,
        };
        let templates = route.shards.expect("sharded");
        let placed: Vec<Placement> = templates
            .iter()
            .map(|t| resolve(t, &self.sh, &input))
            .collect();
        // The same with the constants the shape found (as the proxy
        // resolves a routed text): every case here places alike.
        let mut constants = Vec::new();
        shardline_router::cache::shape_noting(sql, &mut String::new(), &mut constants);
        let noted = KeyInput {
            constants: Some(&constants),
            ..input
        };
        let again: Vec<Placement> = templates
            .iter()
            .map(|t| resolve(t, &self.sh, &noted))
            .collect();
        assert_eq!(placed, again, "constants from the shape: {sql}");
        // Noting the keys places alike.
        self.seen.clear();
        let noting: Vec<Placement> = templates
            .iter()
            .map(|t| resolve_noting(t, &self.sh, &noted, &mut self.seen))
            .collect();
        assert_eq!(placed, noting, "noting keys: {sql}");
        // The one-key shortcut, for a text that has one, places alike and
        // notes the same keys (or leaves the statement to the general path).
        if let Some(k) = &one_key {
            let mut seen = Vec::new();
            if let Some(s) = shard_by_key(k, &self.sh, &noted, Some(&mut seen)) {
                assert_eq!(placed, vec![Placement::One(s)], "one key: {sql}");
                assert_eq!(seen, self.seen, "one key's notes: {sql}");
            }
        }
        placed
    }

    /// `(group, key, shard)` of each key the last statement was placed by.
    fn seen(&self) -> Vec<(usize, KeyValue, usize)> {
        self.seen
            .iter()
            .map(|k| (k.group, k.key.clone(), k.shard))
            .collect()
    }

    /// The one placement of `sql` with typed parameters.
    fn typed(&mut self, sql: &str, params: &[(i16, Option<&[u8]>)], types: &[u32]) -> Placement {
        let mut all = self.place_typed(sql, params, types);
        assert_eq!(all.len(), 1, "{sql}");
        all.remove(0)
    }

    fn with_params(&mut self, sql: &str, params: &[(i16, Option<&[u8]>)]) -> Placement {
        self.typed(sql, params, &[])
    }

    fn place(&mut self, sql: &str) -> Placement {
        let mut all = self.place_with(sql, &[]);
        assert_eq!(all.len(), 1, "{sql}");
        all.remove(0)
    }

    /// The shard `pg_hash` gives an int key of the default group.
    fn of(&self, k: i64) -> usize {
        self.sh.groups[0]
            .shard_of(Some(&KeyValue::Int(k)))
            .expect("shard")
    }
}

fn refused(p: &Placement) -> &str {
    match p {
        Placement::Refused(r) => {
            assert_eq!(r.code, "0A000", "{}", r.message);
            &r.message
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn point_statements_reach_the_key_owner() {
    let mut t = T::new();
    for k in [0i64, 1, 7, -5, 42, 123456789] {
        let want = Placement::One(t.of(k));
        for sql in [
            format!("SELECT * FROM users WHERE id = {k}"),
            format!("SELECT name FROM users u WHERE u.id = {k} AND name <> 'x'"),
            format!("select * from public.users where {k} = id"),
            format!("UPDATE users SET name = 'n' WHERE id = {k}"),
            format!("DELETE FROM users WHERE id = '{k}'"),
            format!("INSERT INTO users (id, name) VALUES ({k}, 'a') RETURNING id"),
            format!("INSERT INTO users (name, id) VALUES ('a', {k}) ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name"),
            format!("SELECT * FROM orders WHERE user_id = {k}::bigint"),
            format!("SELECT * FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id = {k}"),
            format!("SELECT * FROM users u, orders o WHERE o.user_id = u.id AND o.user_id = {k}"),
            format!("SELECT * FROM users u LEFT JOIN countries c ON c.code = u.country WHERE id = {k}"),
        ] {
            assert_eq!(t.place(&sql), want, "{sql}");
        }
    }
}

/// The statements placed by one key and nothing else are known from
/// their text (`Route::one_key`); anything that could place one elsewhere
/// leaves it to the general path.
#[test]
fn one_key_statements_are_known_from_their_text() {
    let mut t = T::new();
    for sql in [
        "SELECT * FROM users WHERE id = 42",
        "SELECT * FROM users WHERE id = $1",
        "UPDATE users SET name = 'x' WHERE id = -7",
        "INSERT INTO users (id, name) VALUES (7, 'a')",
        "DELETE FROM events WHERE device = $1",
    ] {
        assert!(t.router.route(sql).one_key.is_some(), "{sql}");
    }
    for sql in [
        "SELECT * FROM users",
        "SELECT * FROM users WHERE id IN (1, 2)",
        "SELECT * FROM countries",
        "/* shardline: shard=s1 */ SELECT * FROM users WHERE id = 1",
        "SELECT * FROM users WHERE id = 1; SELECT * FROM users WHERE id = 2",
        "UPDATE users SET id = 2 WHERE id = 1",
        "DECLARE c CURSOR FOR SELECT * FROM users WHERE id = 1",
        "INSERT INTO users (id, name) VALUES (1, 'a'), (2, 'b')",
    ] {
        assert_eq!(t.router.route(sql).one_key, None, "{sql}");
    }
}

/// An integer key written as a constant in any of the forms the server
/// reads is placed by its value: plain digits (read in place), a minus
/// sign, leading zeros, 19 digits, underscores, quoted, escaped and
/// dollar-quoted strings; a value no bigint holds reaches every shard,
/// where the server reports its own error.
#[test]
fn integer_key_constants_in_every_written_form() {
    let mut t = T::new();
    let all = Placement::Many(t.sh.all_shards());
    for (constant, key) in [
        ("42", Some(42i64)),
        ("-42", Some(-42)),
        ("007", Some(7)),
        ("0", Some(0)),
        ("-0", Some(0)),
        ("123456789012345678", Some(123456789012345678)),
        ("9223372036854775807", Some(i64::MAX)),
        ("-9223372036854775808", Some(i64::MIN)),
        ("1_000", Some(1000)),
        ("'42'", Some(42)),
        ("' 42 '", Some(42)),
        ("E'42'", Some(42)),
        ("$$42$$", Some(42)),
        ("99999999999999999999", None),
        ("'4x2'", None),
    ] {
        let sql = format!("SELECT * FROM users WHERE id = {constant}");
        let want = key.map_or(all.clone(), |k| Placement::One(t.of(k)));
        assert_eq!(t.place(&sql), want, "{sql}");
    }
}

/// The keys a placement was decided by are noted with their group and
/// owner (the hot-key report counts them); NULL keys, reads without a key
/// An integer key in a text parameter is read from its bytes when it is
/// written plainly, and by the general parse otherwise: both give the
/// key the binary parameter gives.
#[test]
fn integer_keys_in_text_parameters_read_as_binary_ones() {
    let mut t = T::new();
    let sql = "SELECT * FROM users WHERE id = $1";
    for (text, key) in [
        ("42", 42i64),
        ("-42", -42),
        ("0042", 42),
        (" 42", 42),
        ("42 ", 42),
        ("+42", 42),
        ("123456789012345678", 123456789012345678),
        ("1234567890123456789", 1234567890123456789),
        ("1000000", 1000000),
    ] {
        let binary = key.to_be_bytes();
        let by_text = t.with_params(sql, &[(0, Some(text.as_bytes()))]);
        let noted = t.seen();
        let by_binary = t.with_params(sql, &[(1, Some(&binary[..]))]);
        assert_eq!(by_text, by_binary, "{text:?}");
        assert_eq!(noted, t.seen(), "{text:?}");
        assert_eq!(noted[0].1, KeyValue::Int(key), "{text:?}");
    }
    // Not an integer: on every shard, as a server would fail it there.
    let all = t.with_params(sql, &[(0, Some(b"4x2"))]);
    assert!(matches!(all, Placement::Many(_)), "{all:?}");
}

/// and reference tables note none.
#[test]
fn the_keys_a_statement_is_placed_by_are_noted() {
    let mut t = T::new();
    let int = |k: i64, t: &T| (0, KeyValue::Int(k), t.of(k));
    t.place("SELECT * FROM users WHERE id = 42");
    assert_eq!(t.seen(), vec![int(42, &t)]);
    t.place("SELECT * FROM users WHERE id IN (7, 1000000)");
    assert_eq!(t.seen(), vec![int(7, &t), (0, KeyValue::Int(1000000), 2)]);
    t.with_params(
        "SELECT * FROM orders WHERE user_id = $1",
        &[(0, Some(b"5"))],
    );
    assert_eq!(t.seen(), vec![int(5, &t)]);
    t.with_params(
        "SELECT * FROM users WHERE id = ANY($1)",
        &[(0, Some(b"{3,4}"))],
    );
    assert_eq!(t.seen(), vec![int(3, &t), int(4, &t)]);
    t.place("INSERT INTO users (id) VALUES (1), (2)");
    assert_eq!(t.seen(), vec![int(1, &t), int(2, &t)]);
    t.place("/* shardline: key=9 */ SELECT * FROM users");
    assert_eq!(t.seen(), vec![int(9, &t)]);
    let device = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
    t.place(&format!("SELECT * FROM events WHERE device = '{device}'"));
    let seen = t.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (seen[0].0, &seen[0].1),
        (1, &t.sh.groups[1].key_from_text(device).unwrap())
    );
    for none in [
        "SELECT * FROM users",
        "SELECT * FROM users WHERE id IS NULL",
        "SELECT * FROM countries",
        "SELECT 1",
    ] {
        t.place(none);
        assert_eq!(t.seen(), vec![], "{none}");
    }
    let many: Vec<String> = (0..200).map(|k| k.to_string()).collect();
    t.place(&format!(
        "SELECT * FROM users WHERE id IN ({})",
        many.join(",")
    ));
    assert_eq!(t.seen.len(), shardline_router::shards::MAX_KEYS_NOTED);
}

#[test]
fn in_lists_any_and_or_reach_the_owning_subset() {
    let mut t = T::new();
    let want = |t: &T, keys: &[i64]| keys.iter().fold(0, |m, k| m | mask_of(t.of(*k)));
    let m = want(&t, &[1, 2]);
    let expect = |m: u64| match m.count_ones() {
        1 => Placement::One(m.trailing_zeros() as usize),
        _ => Placement::Many(m),
    };
    assert_eq!(t.place("SELECT * FROM users WHERE id IN (1, 2)"), expect(m));
    assert_eq!(
        t.place("SELECT * FROM users WHERE id = 1 OR id = 2"),
        expect(m)
    );
    assert_eq!(
        t.place("SELECT * FROM users WHERE (id = 1 OR id = 2) AND id = 1"),
        Placement::One(t.of(1))
    );
    assert_eq!(
        t.place("SELECT * FROM users WHERE id = ANY('{1,2}')"),
        Placement::Many(t.sh.all_shards()),
        "a constant array is not read (only parameters and ARRAY[...])"
    );
    assert_eq!(
        t.place("SELECT * FROM users WHERE id = ANY(ARRAY[1, 2])"),
        expect(m)
    );
    let p = t.place_with(
        "SELECT * FROM users WHERE id = ANY($1)",
        &[(0, Some(b"{1,2}"))],
    );
    assert_eq!(p, vec![expect(m)]);
    // Binary int8 array: ndim 1, no nulls, int8 oid 20, 2 elements, lbound 1.
    let mut arr = Vec::new();
    for x in [1i32, 0, 20, 2, 1] {
        arr.extend_from_slice(&x.to_be_bytes());
    }
    for k in [1i64, 2] {
        arr.extend_from_slice(&8i32.to_be_bytes());
        arr.extend_from_slice(&k.to_be_bytes());
    }
    let p = t.place_with(
        "SELECT * FROM users WHERE id = ANY($1::bigint[])",
        &[(1, Some(&arr))],
    );
    assert_eq!(p, vec![expect(m)]);
    // OR with a non-key condition: every shard.
    assert_eq!(
        t.place("SELECT * FROM users WHERE id = 1 OR name = 'x'"),
        Placement::Many(t.sh.all_shards())
    );
}

#[test]
fn parameters_route_per_execution_in_text_and_binary() {
    let mut t = T::new();
    let sql = "SELECT * FROM users WHERE id = $1";
    for k in [3i64, 4, 5, 6] {
        let text = k.to_string();
        let p = t.place_with(sql, &[(0, Some(text.as_bytes()))]);
        assert_eq!(p, vec![Placement::One(t.of(k))]);
        let bin = k.to_be_bytes();
        let p = t.place_with(sql, &[(1, Some(&bin))]);
        assert_eq!(p, vec![Placement::One(t.of(k))]);
        let bin4 = (k as i32).to_be_bytes();
        let p = t.place_with(sql, &[(1, Some(&bin4))]);
        assert_eq!(p, vec![Placement::One(t.of(k))], "int4 hashes as int8");
    }
    // The cache served every execution after the first.
    assert_eq!(t.router.stats().misses, 1);
}

#[test]
fn constants_are_read_from_each_text_while_the_shape_is_cached() {
    let mut t = T::new();
    for k in 0..50i64 {
        let sql = format!("SELECT abalance, 'it''s' FROM users WHERE name = E'a\\'b' AND id = {k}");
        assert_eq!(t.place(&sql), Placement::One(t.of(k)), "{sql}");
    }
    assert_eq!(t.router.stats().misses, 1);
}

/// A key constant is found by its position whatever characters come
/// before it: multi-byte ones on earlier lines and on its own line.
#[test]
fn key_constants_are_found_after_multibyte_text() {
    let mut t = T::new();
    for k in [1i64, 42, 777] {
        let want = Placement::One(t.of(k));
        for sql in [
            format!("SELECT 'é', 'ü'\n FROM users\n WHERE name <> 'ø日' AND id = {k}"),
            format!("SELECT 'é'\r\n, 1 FROM users WHERE\n\nid = {k} -- ü\n"),
            format!("SELECT '{}' FROM users WHERE id = {k}", "x".repeat(100_000)),
        ] {
            assert_eq!(t.place(&sql), want, "{sql}");
        }
    }
}

#[test]
fn multi_row_inserts_split_by_shard() {
    let mut t = T::new();
    let (a, b) = (0..100)
        .flat_map(|x| (0..100).map(move |y| (x, y)))
        .find(|&(x, y)| t.of(x) != t.of(y))
        .expect("two keys on different shards");
    let sql = format!("INSERT INTO users (id, name) VALUES ({a}, 'a'), ({b}, 'b')");
    assert_eq!(
        t.place(&sql),
        Placement::Split(mask_of(t.of(a)) | mask_of(t.of(b)))
    );
    let sql = format!("INSERT INTO users (id, name) VALUES ({a}, 'a'), ({a}, 'b')");
    assert_eq!(t.place(&sql), Placement::One(t.of(a)));
}

#[test]
fn pinned_keys_override_the_function() {
    let mut t = T::new();
    assert_eq!(
        t.place("SELECT * FROM users WHERE id = 1000000"),
        Placement::One(2)
    );
}

#[test]
fn groups_place_with_their_own_function_and_key_type() {
    let mut t = T::new();
    let u = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
    let g = &t.sh.groups[1];
    let want = g
        .shard_of(Some(&KeyValue::Uuid(
            shardline_router::hash::parse_uuid(u).expect("uuid"),
        )))
        .expect("shard");
    assert_eq!(
        t.place(&format!("SELECT * FROM events WHERE device = '{u}'")),
        Placement::One(want)
    );
    let msg = refused(&t.place(
        "SELECT * FROM users u JOIN events e ON e.device = u.id::text::uuid WHERE u.id = 1",
    ))
    .to_string();
    assert!(msg.contains("different groups"), "{msg}");
}

#[test]
fn what_cannot_be_answered_exactly_is_refused() {
    let mut t = T::new();
    for (sql, says, construct) in [
        (
            "SELECT * FROM users u JOIN orders o ON o.amount > 1",
            "joined on something other",
            Construct::JoinOffKey,
        ),
        (
            "SELECT * FROM users WHERE id IN (SELECT id FROM orders)",
            "subquery",
            Construct::Subquery,
        ),
        (
            "SELECT * FROM users u JOIN pgbench_accounts a ON a.aid = u.id",
            "not sharded",
            Construct::MixedTables,
        ),
        (
            "UPDATE users SET id = 5 WHERE name = 'x'",
            "sharding key",
            Construct::KeyChange,
        ),
        (
            "INSERT INTO users VALUES (1, 'x')",
            "name its columns",
            Construct::Insert,
        ),
        (
            "INSERT INTO users (name) VALUES ('x')",
            "key column a value",
            Construct::Insert,
        ),
        (
            "INSERT INTO users (id) SELECT user_id FROM orders",
            "VALUES",
            Construct::Insert,
        ),
        (
            "SELECT id FROM users UNION SELECT user_id FROM orders",
            "UNION",
            Construct::SetOperation,
        ),
        (
            "COPY users (name) FROM STDIN",
            "key column",
            Construct::Copy,
        ),
        (
            "CREATE TABLE big AS SELECT * FROM users",
            "CREATE TABLE ... AS",
            Construct::CreateTableAs,
        ),
        // CREATE TABLE ... AS by another name: each shard made its own
        // table of its own rows.
        (
            "SELECT id, name INTO users_copy FROM users WHERE id < 50",
            "SELECT ... INTO",
            Construct::CreateTableAs,
        ),
        (
            "SELECT * INTO TEMP t FROM users WHERE id = 7",
            "SELECT ... INTO",
            Construct::CreateTableAs,
        ),
        (
            "(SELECT id INTO t FROM users) UNION ALL SELECT user_id FROM orders",
            "SELECT ... INTO",
            Construct::CreateTableAs,
        ),
        // Its EXECUTE would run where it was prepared, whatever the key.
        (
            "PREPARE p AS SELECT * FROM users WHERE id = $1",
            "SQL PREPARE",
            Construct::SqlPrepare,
        ),
        (
            "PREPARE p AS SELECT count(*) FROM users",
            "SQL PREPARE",
            Construct::SqlPrepare,
        ),
        (
            "PREPARE p (text) AS INSERT INTO countries VALUES ($1)",
            "SQL PREPARE",
            Construct::SqlPrepare,
        ),
        // The prepared statement's own refusal comes first.
        (
            "PREPARE p AS SELECT id FROM users UNION SELECT user_id FROM orders",
            "UNION",
            Construct::SetOperation,
        ),
    ] {
        let p = t.place(sql);
        let msg = refused(&p);
        assert!(msg.contains(says), "{sql}: {msg}");
        let Placement::Refused(r) = &p else {
            unreachable!()
        };
        assert_eq!(r.construct, Some(construct), "{sql}");
    }
    // The same answer on every shard: SQL PREPARE runs anywhere.
    for sql in [
        "PREPARE p AS SELECT $1::int + 1",
        "PREPARE p AS SELECT name FROM countries WHERE code = $1",
        "EXECUTE p(1)",
    ] {
        assert_eq!(t.place(sql), Placement::Anywhere, "{sql}");
    }
    // Keys on one shard: the same constructs are fine.
    assert_eq!(
        t.place("SELECT count(*) FROM users WHERE id = 7"),
        Placement::One(t.of(7))
    );
    assert_eq!(
        t.place("SELECT * FROM users WHERE id = 7 ORDER BY name LIMIT 1"),
        Placement::One(t.of(7))
    );
}

#[test]
fn a_key_may_change_within_its_shard() {
    let mut t = T::new();
    let a = 11i64;
    let same = (0..1000)
        .find(|&x| x != a && t.of(x) == t.of(a))
        .expect("same shard");
    let other = (0..1000)
        .find(|&x| t.of(x) != t.of(a))
        .expect("other shard");
    assert_eq!(
        t.place(&format!("UPDATE users SET id = {same} WHERE id = {a}")),
        Placement::One(t.of(a))
    );
    // Each refusal says why.
    let other_shard =
        refused(&t.place(&format!("UPDATE users SET id = {other} WHERE id = {a}"))).to_string();
    assert!(
        other_shard.contains("owned by another shard"),
        "{other_shard}"
    );
    let expression =
        refused(&t.place(&format!("UPDATE users SET id = id + 1 WHERE id = {a}"))).to_string();
    assert!(
        expression.contains("only to a constant or a parameter"),
        "{expression}"
    );
    let no_key = refused(&t.place("UPDATE users SET id = 5 WHERE name = 'x'")).to_string();
    assert!(no_key.contains("must name the row's key"), "{no_key}");
}

#[test]
fn tables_without_keys_unsharded_and_reference() {
    let mut t = T::new();
    let all = Placement::Many(t.sh.all_shards());
    assert_eq!(t.place("SELECT * FROM users"), all);
    assert_eq!(t.place("SELECT * FROM users WHERE name = 'x'"), all);
    assert_eq!(t.place("UPDATE users SET name = 'x'"), all);
    assert_eq!(t.place("DELETE FROM orders WHERE amount > 10"), all);
    assert_eq!(t.place("CREATE TABLE t (a int)"), all);
    assert_eq!(t.place("ALTER TABLE users ADD COLUMN x int"), all);
    assert_eq!(t.place("VACUUM ANALYZE users"), all);
    assert_eq!(t.place("TRUNCATE users"), all);
    assert_eq!(t.place("TRUNCATE pgbench_history"), Placement::One(0));
    assert_eq!(
        t.place("SELECT * FROM pgbench_accounts WHERE aid = 5"),
        Placement::One(0)
    );
    assert_eq!(
        t.place("UPDATE pgbench_accounts SET abalance = 1"),
        Placement::One(0)
    );
    assert_eq!(t.place("SELECT * FROM countries"), Placement::Spread);
    assert_eq!(
        t.place("INSERT INTO countries VALUES ('fr', 'France')"),
        all
    );
    assert_eq!(t.place("SELECT 1"), Placement::Anywhere);
    assert_eq!(
        t.place("SELECT * FROM pg_catalog.pg_class"),
        Placement::Anywhere
    );
    assert_eq!(t.place("BEGIN"), Placement::Anywhere);
    assert_eq!(t.place("SET search_path = public"), Placement::Anywhere);
    assert_eq!(t.place("EXPLAIN SELECT * FROM users"), Placement::One(0));
    assert_eq!(t.place("DO $$ BEGIN PERFORM 1; END $$"), all);
    // Unreadable by the proxy's parser: refused (0A000, not a syntax error
    // Postgres might not raise) when it names a sharded or reference
    // table; else run where unsharded tables live, for the server to answer.
    let p = t.place("SELECT * FROM users FOR NO KEY UPDATE OF users SKIP LOCKED NOWAIT x");
    assert!(
        matches!(p, Placement::Refused(ref r) if r.code == "0A000" && r.message.contains("\"users\"")),
        "{p:?}"
    );
    let p = t.place("SELECT id FROM users WHERE id = 5 ORDER BY id::text COLLATE \"C\"");
    assert!(
        matches!(p, Placement::Refused(ref r) if r.code == "0A000"),
        "{p:?}"
    );
    assert_eq!(t.place("SELEC 1"), Placement::One(t.sh.default_shard));
    assert_eq!(
        t.place("SELECT x::text COLLATE \"C\" FROM audit_log ORDER BY 1"),
        Placement::One(t.sh.default_shard)
    );
}

#[test]
fn hints_override_parsing() {
    let mut t = T::new();
    assert_eq!(
        t.place("/* shardline: shard=s1 */ SELECT * FROM users ORDER BY id"),
        Placement::One(1)
    );
    assert_eq!(
        t.place("/* shardline: shard=s2 */ SELECT ((( unparseable"),
        Placement::One(2)
    );
    assert_eq!(
        t.place("/* shardline: key=42 */ SELECT * FROM users"),
        Placement::One(t.of(42))
    );
    let p = t.place("/* shardline: shard=nope */ SELECT 1");
    assert!(matches!(p, Placement::Refused(ref r) if r.message.contains("no shard is named")));
    let input = KeyInput {
        sql: "SELECT * FROM users".into(),
        params: &[],
        param_types: &[],
        session_shard: None,
        session_key: Some("42"),
        constants: None,
    };
    let route = t.router.route("SELECT * FROM users");
    assert_eq!(
        resolve(&route.shards.expect("s")[0], &t.sh, &input),
        Placement::One(t.of(42))
    );
}

#[test]
fn copy_from_is_split_and_copy_to_reads_everywhere() {
    let mut t = T::new();
    assert_eq!(
        t.place("COPY users (id, name) FROM STDIN"),
        Placement::CopySplit(t.sh.all_shards())
    );
    assert_eq!(
        t.place("COPY users FROM STDIN WITH (FORMAT csv)"),
        Placement::CopySplit(t.sh.all_shards())
    );
    assert_eq!(
        t.place("COPY countries FROM STDIN"),
        Placement::CopySplit(t.sh.all_shards())
    );
    assert_eq!(
        t.place("COPY pgbench_accounts FROM STDIN"),
        Placement::One(0)
    );
    assert_eq!(
        t.place("COPY users TO STDOUT"),
        Placement::Many(t.sh.all_shards())
    );
    refused(&t.place("COPY users (name) FROM STDIN"));
}

#[test]
fn consistent_hashing_by_default() {
    let toml = CONFIG.replace("function = \"pg_hash\"\n", "");
    let mut t = T::from(&toml);
    for k in 0..200i64 {
        let want = t.sh.groups[0]
            .shard_of(Some(&KeyValue::Int(k)))
            .expect("shard");
        assert_eq!(
            t.place(&format!("SELECT * FROM users WHERE id = {k}")),
            Placement::One(want)
        );
    }
}

#[test]
fn split_inserts_keep_every_row_once() {
    let mut t = T::new();
    let row = |k: i64| format!("({k}, 'n''{k}', -{k}.5, '),(' || $${k}$$)");
    let rows: Vec<String> = (0..20).map(row).collect();
    let sql = format!(
        "insert into users (id, name, score, note) values {} on conflict (id) do nothing returning id",
        rows.join(",\n ")
    );
    let template = t.router.route(&sql).shards.expect("sharded")[0].clone();
    // By the lexer (with the template), and by parsing (without).
    for template in [Some(&template), None] {
        let parts =
            shardline_router::shards::split_insert(&sql, &t.sh, template, &[], &[]).expect("split");
        assert!(parts.len() > 1);
        let mut seen = Vec::new();
        for part in &parts {
            let (shard, text) = (&part.shard, &part.sql);
            assert!(part.params.is_empty());
            let lower = text.to_ascii_lowercase();
            assert!(
                lower.contains("returning id") && lower.contains("on conflict"),
                "{text}"
            );
            // The lexer keeps the statement's own text around the rows.
            assert_eq!(
                template.is_some(),
                text.starts_with("insert into"),
                "{text}"
            );
            for k in 0..20i64 {
                if text.contains(&row(k)) {
                    assert_eq!(*shard, t.of(k), "{text}");
                    seen.push(k);
                }
            }
        }
        let mut rows: Vec<usize> = parts.iter().flat_map(|p| p.rows.clone()).collect();
        rows.sort();
        assert_eq!(rows, (0..20).collect::<Vec<_>>());
        seen.sort();
        assert_eq!(seen, (0..20).collect::<Vec<_>>(), "{parts:?}");
    }
}

/// Rows whose keys are bound parameters (SQLAlchemy's insertmanyvalues,
/// JDBC's reWriteBatchedInserts): each part holds its rows, binds only the
/// parameters its text references, renumbered from `$1`, including those
/// outside the rows (ON CONFLICT ... SET name = $7).
#[test]
fn split_inserts_with_parameters_renumber_them() {
    let mut t = T::new();
    let keys: Vec<i64> = (0..12).collect();
    let rows: Vec<String> = (0..keys.len())
        .map(|i| format!("(${}::BIGINT, ${})", 2 * i + 1, 2 * i + 2))
        .collect();
    let last = 2 * keys.len() + 1;
    let sql = format!(
        "INSERT INTO users (id, name) VALUES {} ON CONFLICT (id) DO UPDATE SET name = ${last} RETURNING id, '$1'",
        rows.join(", ")
    );
    let values: Vec<Vec<u8>> = keys
        .iter()
        .flat_map(|k| [k.to_string().into_bytes(), format!("n{k}").into_bytes()])
        .chain([b"upd".to_vec()])
        .collect();
    let params: Vec<(i16, Option<&[u8]>)> = values.iter().map(|v| (0, Some(&v[..]))).collect();
    let template = t.router.route(&sql).shards.expect("sharded")[0].clone();
    for template in [Some(&template), None] {
        let parts = shardline_router::shards::split_insert(&sql, &t.sh, template, &params, &[])
            .expect("split");
        assert!(parts.len() > 1, "{parts:?}");
        let mut seen = Vec::new();
        for part in &parts {
            // Two parameters per row, then the one after the rows.
            let mut want = Vec::new();
            for &r in &part.rows {
                assert_eq!(part.shard, t.of(keys[r]), "{part:?}");
                want.extend([2 * r, 2 * r + 1]);
                seen.push(r);
            }
            want.push(last - 1);
            assert_eq!(part.params, want, "{part:?}");
            let n = part.params.len();
            assert!(
                part.sql.contains(&format!("SET name = ${n}")),
                "{}",
                part.sql
            );
            assert!(!part.sql.contains(&format!("${}", n + 1)), "{}", part.sql);
            assert!(part.sql.contains("'$1'"), "strings untouched: {}", part.sql);
        }
        seen.sort();
        assert_eq!(seen, (0..keys.len()).collect::<Vec<_>>());
    }
}

#[test]
fn renumbering_skips_strings_names_and_comments() {
    use shardline_router::shards::renumber_params;
    let (sql, order) = renumber_params(
        "SELECT $3, '$1', \"a$1\", b$1, $$ $2 $$, /* $2 */ $5 -- $1\n, $3, é$4, $4",
    );
    assert_eq!(
        sql,
        "SELECT $1, '$1', \"a$1\", b$1, $$ $2 $$, /* $2 */ $2 -- $1\n, $1, é$4, $3"
    );
    assert_eq!(order, vec![2, 4, 3]);
}

/// An outer join that keeps the rows of a reference table or a VALUES
/// list (every shard holds them) is exact on one shard only: on several,
/// each unmatched row would come back once per shard. Refused there,
/// whichever way the join is written; fine when the key pins one shard,
/// or when the kept side is sharded.
#[test]
fn outer_joins_keeping_replicated_rows_are_refused_on_several_shards() {
    let mut t = T::new();
    for sql in [
        "SELECT c.code, count(u.id) FROM countries c LEFT JOIN users u ON u.country = c.code GROUP BY c.code",
        "SELECT c.code, u.id FROM countries c LEFT JOIN users u ON u.country = c.code",
        "SELECT c.code, u.id FROM users u RIGHT JOIN countries c ON u.country = c.code",
        "SELECT c.code, u.id FROM countries c FULL JOIN users u ON u.country = c.code",
        "SELECT v.x, u.name FROM (VALUES (1), (2)) v(x) LEFT JOIN users u ON u.id = v.x",
        "SELECT c.code FROM countries c LEFT JOIN users u ON u.country = c.code WHERE u.id IS NULL",
    ] {
        let msg = refused(&t.place(sql)).to_string();
        assert!(msg.contains("outer join keeps the rows of"), "{sql}: {msg}");
    }
    // One shard: exact.
    assert_eq!(
        t.place("SELECT c.code, u.id FROM countries c LEFT JOIN users u ON u.country = c.code WHERE u.id = 7"),
        Placement::One(t.of(7))
    );
    // The kept side sharded: every shard keeps its own rows.
    assert!(matches!(
        t.place("SELECT u.id, c.name FROM users u LEFT JOIN countries c ON u.country = c.code"),
        Placement::Many(_)
    ));
    assert!(matches!(
        t.place("SELECT u.id, o.id FROM users u LEFT JOIN orders o ON o.user_id = u.id"),
        Placement::Many(_)
    ));
}

/// A set-returning function in FROM is no table: joined to a sharded table
/// (inner) it runs on every shard; keeping its rows in an outer join is
/// refused like a reference table's. Set operations over sharded tables
/// that are not answered are refused by their own name.
#[test]
fn functions_in_from_and_set_operations() {
    let mut t = T::new();
    assert!(matches!(
        t.place("SELECT g, u.name FROM generate_series(1, 3) g JOIN users u ON u.id = g"),
        Placement::Many(_)
    ));
    assert_eq!(
        t.place(
            "SELECT g, u.name FROM generate_series(1, 3) g JOIN users u ON u.id = g WHERE u.id = 2"
        ),
        Placement::One(t.of(2))
    );
    let msg = refused(
        &t.place("SELECT g, u.name FROM generate_series(1, 3) g LEFT JOIN users u ON u.id = g"),
    )
    .to_string();
    assert!(msg.contains("a function"), "{msg}");
    let msg =
        refused(&t.place("SELECT id FROM users UNION SELECT user_id FROM orders")).to_string();
    assert!(msg.starts_with("UNION over sharded table"), "{msg}");
    let msg =
        refused(&t.place("SELECT id FROM users EXCEPT SELECT user_id FROM orders")).to_string();
    assert!(msg.starts_with("EXCEPT"), "{msg}");
    assert_eq!(
        t.place("SELECT code FROM countries UNION SELECT code FROM countries"),
        Placement::Spread
    );
}

/// EXISTS / NOT EXISTS correlated on the co-located key, and `key IN
/// (SELECT key FROM ...)`: each outer row's matches live on its shard, so
/// every shard answers for its own rows. Uncorrelated subqueries, NOT IN,
/// and an unqualified outer reference (Postgres resolves it to the inner
/// table) stay refused.
#[test]
fn subqueries_on_the_colocated_key() {
    let mut t = T::new();
    for sql in [
        "SELECT u.id FROM users u WHERE EXISTS (SELECT 1 FROM orders o WHERE o.user_id = u.id AND o.amount > 900)",
        "SELECT u.id FROM users u WHERE u.age > 3 AND NOT EXISTS (SELECT 1 FROM orders o WHERE u.id = o.user_id)",
        "SELECT id FROM users WHERE id IN (SELECT user_id FROM orders WHERE amount > 900)",
        "SELECT o.id FROM orders o WHERE EXISTS (SELECT 1 FROM users u WHERE u.id = o.user_id AND u.age > 80)",
    ] {
        assert!(matches!(t.place(sql), Placement::Many(_)), "{sql}");
    }
    assert_eq!(
        t.place("SELECT u.id FROM users u WHERE u.id = 5 AND EXISTS (SELECT 1 FROM orders o WHERE o.user_id = u.id)"),
        Placement::One(t.of(5))
    );
    assert!(matches!(
        t.place("SELECT count(*) FROM users u WHERE EXISTS (SELECT 1 FROM orders o WHERE o.user_id = u.id)"),
        Placement::Merge(_)
    ));
    for sql in [
        "SELECT u.id FROM users u WHERE EXISTS (SELECT 1 FROM orders o WHERE o.amount > 900)",
        "SELECT id FROM users WHERE id NOT IN (SELECT user_id FROM orders)",
        "SELECT id FROM users WHERE EXISTS (SELECT 1 FROM orders WHERE user_id = id)",
        "SELECT id FROM users WHERE country IN (SELECT country FROM users WHERE age > 80)",
        "SELECT u.id FROM users u WHERE EXISTS (SELECT 1 FROM orders o JOIN users v ON v.id = o.user_id WHERE o.user_id = u.id)",
        "SELECT u.id FROM users u WHERE u.age > 3 OR EXISTS (SELECT 1 FROM orders o WHERE o.user_id = u.id)",
    ] {
        refused(&t.place(sql));
    }
}

/// `key IS NULL` on the nullable side of an outer join holds for the rows
/// without a match, on every shard: it does not name the NULL key's shard.
#[test]
fn key_is_null_on_the_nullable_side_is_not_a_key() {
    let mut t = T::new();
    assert!(matches!(
        t.place(
            "SELECT o.id FROM orders o LEFT JOIN users u ON u.id = o.user_id WHERE u.id IS NULL"
        ),
        Placement::Many(_)
    ));
    assert!(matches!(
        t.place("SELECT u.id FROM orders o RIGHT JOIN users u ON u.id = o.user_id WHERE o.user_id IS NULL"),
        Placement::Many(_)
    ));
    // On the preserved side (or without a join) it still names the NULL
    // key's shard, as before.
    assert!(matches!(
        t.place("SELECT id FROM users WHERE id IS NULL"),
        Placement::One(_)
    ));
}

#[test]
fn broadcast_writes_can_be_refused() {
    let toml = CONFIG.replace("[sharding]\n", "[sharding]\nbroadcast_writes = false\n");
    let mut t = T::from(&toml);
    let msg = refused(&t.place("UPDATE users SET name = 'x'")).to_string();
    assert!(msg.contains("broadcast_writes"), "{msg}");
    refused(&t.place("DELETE FROM orders WHERE amount > 1"));
    // With the key, or DDL, or reference tables: unaffected.
    assert_eq!(
        t.place("UPDATE users SET name = 'x' WHERE id = 3"),
        Placement::One(t.of(3))
    );
    assert_eq!(
        t.place("CREATE INDEX ON users (name)"),
        Placement::Many(t.sh.all_shards())
    );
    assert_eq!(
        t.place("DELETE FROM countries"),
        Placement::Many(t.sh.all_shards())
    );
}

#[test]
fn range_and_list_functions() {
    let toml = CONFIG.replace(
        "function = \"pg_hash\"\n",
        "function = \"range\"\nranges = [{ shard = \"s0\", to = 100 }, { shard = \"s1\", from = 100, to = 200 }, { shard = \"s2\", from = 200 }]\n",
    );
    let mut t = T::from(&toml);
    for (k, s) in [
        (-5i64, 0usize),
        (99, 0),
        (100, 1),
        (199, 1),
        (200, 2),
        (i64::MAX, 2),
    ] {
        assert_eq!(
            t.place(&format!("SELECT * FROM users WHERE id = {k}")),
            Placement::One(s),
            "{k}"
        );
    }
    let toml = CONFIG.replace(
        "function = \"pg_hash\"\npinned = [{ key = 1000000, shard = \"s2\" }]\n",
        "function = \"list\"\nlists = [{ shard = \"s1\", values = [1, 2] }, { shard = \"s0\", values = [3] }]\n",
    );
    let mut t = T::from(&toml);
    assert_eq!(
        t.place("SELECT * FROM users WHERE id = 2"),
        Placement::One(1)
    );
    assert_eq!(
        t.place("SELECT * FROM users WHERE id = 3"),
        Placement::One(0)
    );
    let p = t.place("SELECT * FROM users WHERE id = 4");
    assert!(
        matches!(p, Placement::Refused(ref r) if r.code == "22023" && r.message.contains("no list")),
        "{p:?}"
    );
}

/// A parameter is read as the type it has on the server: the declared type
/// of the Parse, a cast on it, or a cast on the column compared with it.
/// A value that is not one key reaches every shard instead of a wrong one.
#[test]
fn parameters_are_read_as_their_own_type() {
    let mut t = T::new();
    let all = Placement::Many(t.sh.all_shards());
    for k in [5i64, 42, 1234, -7] {
        let one = Placement::One(t.of(k));
        let f8 = (k as f64).to_be_bytes();
        let int8 = k.to_be_bytes();
        let text = k.to_string();
        let sql = "SELECT * FROM users WHERE id = $1";
        // Declared float8, binary: 5.0 is key 5, not the int8 bit pattern.
        assert_eq!(t.typed(sql, &[(1, Some(&f8))], &[701]), one);
        // Declared int8 / none: the column's type.
        assert_eq!(t.typed(sql, &[(1, Some(&int8))], &[20]), one);
        assert_eq!(t.typed(sql, &[(1, Some(&int8))], &[0]), one);
        // Declared text or float8 in text format.
        assert_eq!(t.typed(sql, &[(0, Some(text.as_bytes()))], &[25]), one);
        let fraction = format!("{k}.5");
        assert_eq!(t.typed(sql, &[(0, Some(fraction.as_bytes()))], &[701]), all);
        // Numeric is not read: every shard.
        assert_eq!(t.typed(sql, &[(0, Some(text.as_bytes()))], &[1700]), all);
        // A cast on the parameter gives its type.
        assert_eq!(
            t.with_params(
                "SELECT * FROM users WHERE id = $1::float8",
                &[(1, Some(&f8))]
            ),
            one
        );
        assert_eq!(
            t.with_params(
                "SELECT * FROM users WHERE id = $1::numeric",
                &[(0, Some(text.as_bytes()))]
            ),
            all
        );
        // A cast on the column: `id::text = $1` binary is text, not an integer.
        assert_eq!(
            t.with_params(
                "SELECT * FROM users WHERE id::text = $1",
                &[(1, Some(text.as_bytes()))]
            ),
            one
        );
    }
    // `id::float8 = 5` holds for one key but is not read as one; a text key
    // cast to an integer holds for many ('5', '05'): every shard.
    assert_eq!(t.place("SELECT * FROM users WHERE id::float8 = 5"), all);
}

/// A pipeline or query string whose statements each run on one shard (or on
/// several: a migration's DDL beside its keyed INSERTs), on several shards
/// in all, is run statement by statement, each where it belongs. Merged
/// reads and split INSERTs cannot share a unit.
#[test]
fn pipelines_of_single_and_several_shard_statements() {
    use shardline_router::shards::pipeline_shards;
    let one = |s| Placement::One(s);
    assert_eq!(pipeline_shards(&[one(0), one(1), one(0)]), Some(0b11));
    assert_eq!(
        pipeline_shards(&[one(2), Placement::Anywhere, one(0)]),
        Some(0b101)
    );
    assert_eq!(pipeline_shards(&[one(1), one(1)]), None);
    assert_eq!(pipeline_shards(&[one(1), Placement::Anywhere]), None);
    assert_eq!(
        pipeline_shards(&[Placement::Many(0b111), one(0), one(1)]),
        Some(0b111)
    );
    assert_eq!(
        pipeline_shards(&[one(2), Placement::Many(0b011)]),
        Some(0b111)
    );
    assert_eq!(
        pipeline_shards(&[one(0), Placement::Merge(0b11), one(1)]),
        None
    );
    assert_eq!(
        pipeline_shards(&[Placement::Many(0b11), Placement::Merge(0b11)]),
        None
    );
    assert_eq!(pipeline_shards(&[one(0), Placement::Split(0b11)]), None);
}

/// Statements sent together that cannot run as a pipeline: a merged read
/// among them is named as the reason (not their different shards, which
/// the other statements' placements alone would give); a statement
/// refused on its own account keeps its reason.
#[test]
fn a_merged_read_among_statements_for_several_shards_is_the_reason_given() {
    use shardline_router::shards::{batch_refusal, combine, Construct, Refusal};
    let message = |p: &Placement| match p {
        Placement::Refused(r) => r.message.clone(),
        other => panic!("not refused: {other:?}"),
    };
    let parts = [Placement::One(0), Placement::One(1), Placement::Merge(0b11)];
    let combined = parts.iter().cloned().reduce(combine).unwrap();
    assert!(message(&combined).contains("reach different shards"));
    let given = message(&batch_refusal(&parts, combined));
    assert!(given.contains("merged across shards"), "{given}");
    // Without a merge, or with a statement refused on its own, as combined.
    let parts = [Placement::One(0), Placement::One(1), Placement::Split(0b11)];
    let combined = parts.iter().cloned().reduce(combine).unwrap();
    assert_eq!(
        message(&batch_refusal(&parts, combined.clone())),
        message(&combined)
    );
    let own = Placement::refused(Refusal::unsupported(Construct::Batch, "its own reason"));
    let parts = [Placement::One(0), own, Placement::Merge(0b11)];
    let combined = parts.iter().cloned().reduce(combine).unwrap();
    assert_eq!(message(&batch_refusal(&parts, combined)), "its own reason");
}

/// Subqueries, CTEs and set-operation branches whose every sharded read is
/// pinned by its own WHERE to keys of one shard: the statement runs whole
/// there. Keys of different shards, an unpinned part, or a top level
/// spanning shards stay refused.
#[test]
fn subqueries_ctes_and_branches_pinned_to_one_shard() {
    let mut t = T::new();
    let a = 11i64;
    let same = (0..1000)
        .find(|&x| x != a && t.of(x) == t.of(a))
        .expect("same shard");
    let other = (0..1000).find(|&x| t.of(x) != t.of(a)).expect("other");
    for sql in [
        format!("SELECT * FROM (SELECT id, name FROM users WHERE id = {a}) s"),
        format!("WITH mine AS (SELECT * FROM orders WHERE user_id = {a}) SELECT count(*) FROM mine"),
        format!("SELECT name FROM users WHERE id = {a} AND age > (SELECT avg(age) FROM users WHERE id IN ({a}, {same}))"),
        format!("SELECT c.name, (SELECT count(*) FROM orders o WHERE o.user_id = {a}) FROM countries c"),
        format!("SELECT id FROM users WHERE id = {a} UNION SELECT user_id FROM orders WHERE user_id = {same} ORDER BY 1 LIMIT 3"),
        format!("SELECT id FROM users WHERE id = {a} UNION ALL SELECT 0 FROM countries"),
        format!("UPDATE users SET age = (SELECT count(*) FROM orders WHERE user_id = {a}) WHERE id = {a}"),
        format!("DELETE FROM orders WHERE user_id = {a} AND amount < (SELECT avg(amount) FROM orders WHERE user_id = {a})"),
    ] {
        assert_eq!(t.place(&sql), Placement::One(t.of(a)), "{sql}");
    }
    // A bound parameter pins as well as a constant.
    let key = a.to_string();
    assert_eq!(
        t.with_params(
            "WITH m AS (SELECT * FROM users WHERE id = $1) SELECT * FROM m",
            &[(0, Some(key.as_bytes()))]
        ),
        Placement::One(t.of(a))
    );
    for sql in [
        format!("SELECT * FROM (SELECT id FROM users WHERE id IN ({a}, {other})) s"),
        format!("SELECT id FROM users WHERE id = {a} UNION SELECT user_id FROM orders WHERE user_id = {other}"),
        format!("SELECT * FROM users WHERE age > (SELECT avg(age) FROM users WHERE id = {a})"),
        "SELECT * FROM (SELECT id FROM users) s".to_string(),
        format!("WITH m AS (SELECT * FROM users WHERE id = {a}) SELECT * FROM m JOIN orders o ON o.user_id = m.id"),
        format!("SELECT id FROM users WHERE id = {a} UNION SELECT user_id FROM orders"),
        format!("SELECT id FROM users WHERE id = {a} UNION SELECT aid FROM pgbench_accounts"),
    ] {
        refused(&t.place(&sql));
    }
}

/// UNION ALL of plain SELECTs over sharded tables: each row comes from one
/// shard, so the shards' answers concatenate. With a branch every shard
/// would repeat (a reference table), DISTINCT or grouping inside, or
/// ORDER BY/LIMIT over the whole, it is refused instead.
#[test]
fn union_all_of_sharded_reads_concatenates() {
    let mut t = T::new();
    for sql in [
        "SELECT id FROM users UNION ALL SELECT user_id FROM orders",
        "SELECT id FROM users WHERE age > 3 UNION ALL SELECT u.id FROM users u JOIN orders o ON o.user_id = u.id UNION ALL SELECT id FROM users",
        "SELECT id::text FROM users UNION ALL SELECT device::text FROM events",
    ] {
        assert!(matches!(t.place(sql), Placement::Many(_)), "{sql}");
    }
    for sql in [
        "SELECT id FROM users UNION SELECT user_id FROM orders",
        "SELECT id FROM users UNION ALL SELECT 1 FROM countries",
        "SELECT id FROM users UNION ALL SELECT 1",
        "SELECT count(*) FROM users UNION ALL SELECT user_id FROM orders",
        "SELECT DISTINCT id FROM users UNION ALL SELECT user_id FROM orders",
        "SELECT id FROM users UNION ALL SELECT user_id FROM orders ORDER BY 1",
        "SELECT id FROM users UNION ALL SELECT user_id FROM orders LIMIT 5",
    ] {
        refused(&t.place(sql));
    }
}

#[test]
fn cursors_are_named_as_postgres_folds_them() {
    use shardline_router::shards::CursorName;
    let mut t = T::new();
    let mut name = |sql: &str| {
        t.router.route(sql).shards.expect("sharded")[0]
            .cursor_name
            .clone()
    };
    assert_eq!(
        name("DECLARE Cur CURSOR FOR SELECT * FROM users WHERE id = 1"),
        Some(CursorName::Declares("cur".into()))
    );
    assert_eq!(
        name("DECLARE \"Cur\" CURSOR FOR SELECT * FROM users WHERE id = 1"),
        Some(CursorName::Declares("Cur".into()))
    );
    for (sql, cursor) in [
        ("FETCH NEXT FROM Cur", "cur"),
        ("FETCH 10 IN \"Cur\"", "Cur"),
        ("CLOSE cur", "cur"),
        ("MOVE FORWARD 5 IN cur;", "cur"),
        ("MOVE cur", "cur"),
    ] {
        assert_eq!(name(sql), Some(CursorName::Reads(cursor.into())), "{sql}");
    }
    assert_eq!(name("CLOSE ALL"), None);
    assert_eq!(name("SELECT 1"), None);
}

/// EXPLAIN of a statement on several shards shows one shard's plan (the
/// lowest-numbered one); EXPLAIN ANALYZE runs its statement, so one of a
/// write on several shards is refused: it would write one shard's part
/// only (an INSERT's rows for other shards on that shard). With a key, or
/// without ANALYZE, it runs where the statement would.
#[test]
fn explain_analyze_of_a_write_on_several_shards_is_refused() {
    let mut t = T::new();
    let (a, b) = (1i64, (2..).find(|&k| t.of(k) != t.of(1)).unwrap());
    let lowest = Placement::One(t.of(a).min(t.of(b)));
    for sql in [
        "EXPLAIN SELECT count(*) FROM users".to_string(),
        "EXPLAIN ANALYZE SELECT count(*) FROM users".into(),
        "EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM users ORDER BY id LIMIT 3".into(),
        "EXPLAIN UPDATE users SET name = 'x'".into(),
        "EXPLAIN (ANALYZE false) DELETE FROM users".into(),
        "EXPLAIN (ANALYZE off, COSTS off) DELETE FROM users".into(),
    ] {
        assert_eq!(t.place(&sql), Placement::One(0), "every shard's: {sql}");
    }
    let sql = format!("EXPLAIN INSERT INTO users (id, name) VALUES ({a}, 'a'), ({b}, 'b')");
    assert_eq!(t.place(&sql), lowest, "{sql}");
    for sql in [
        "EXPLAIN ANALYZE UPDATE users SET name = 'x'".to_string(),
        "EXPLAIN (ANALYZE) DELETE FROM users WHERE id > 10".into(),
        "EXPLAIN (ANALYZE true, TIMING off) DELETE FROM users".into(),
        "explain analyze verbose update users set name = name".into(),
        format!("EXPLAIN ANALYZE INSERT INTO users (id, name) VALUES ({a}, 'a'), ({b}, 'b')"),
        "EXPLAIN ANALYZE INSERT INTO countries (code) VALUES ('fr')".into(),
    ] {
        assert!(
            refused(&t.place(&sql)).starts_with("EXPLAIN ANALYZE runs the write"),
            "{sql}"
        );
        let Placement::Refused(r) = t.place(&sql) else {
            unreachable!()
        };
        assert_eq!(r.construct, Some(Construct::Explain), "{sql}");
    }
    for k in [a, b] {
        for sql in [
            format!("EXPLAIN ANALYZE UPDATE users SET name = 'x' WHERE id = {k}"),
            format!("EXPLAIN ANALYZE INSERT INTO users (id, name) VALUES ({k}, 'a')"),
        ] {
            assert_eq!(t.place(&sql), Placement::One(t.of(k)), "{sql}");
        }
    }
}

/// MERGE with a sharded table does not say which shard each row belongs
/// to: run on every shard, a WHEN NOT MATCHED ... INSERT inserted its row
/// on each. Refused unless a hint names the shard; into a reference table
/// it is a write of every shard, into an unsharded one the default's.
#[test]
fn merge_with_a_sharded_table_runs_only_where_a_hint_says() {
    let mut t = T::new();
    let into_users =
        "MERGE INTO users u USING (VALUES (7::bigint, 'x')) v(id, name) ON u.id = v.id \
                      WHEN MATCHED THEN UPDATE SET name = v.name \
                      WHEN NOT MATCHED THEN INSERT (id, name) VALUES (v.id, v.name)";
    for sql in [
        into_users.to_string(),
        "MERGE INTO users u USING countries c ON u.country = c.code WHEN MATCHED THEN DELETE".into(),
        "MERGE INTO countries c USING users u ON u.country = c.code WHEN NOT MATCHED THEN INSERT (code) VALUES (u.country)".into(),
    ] {
        let p = t.place(&sql);
        assert!(refused(&p).starts_with("MERGE with a sharded table"), "{sql}");
        let Placement::Refused(r) = p else { unreachable!() };
        assert_eq!(r.construct, Some(Construct::MergeInto), "{sql}");
    }
    assert_eq!(
        t.place(&format!("/* shardline: shard=s1 */ {into_users}")),
        Placement::One(1)
    );
    assert_eq!(
        t.place("MERGE INTO countries c USING (VALUES ('fr', 'France')) v(code, name) ON c.code = v.code WHEN NOT MATCHED THEN INSERT VALUES (v.code, v.name)"),
        t.place("INSERT INTO countries (code, name) VALUES ('fr', 'France')"),
        "a reference table: every shard's copy, as its other writes"
    );
    // Into a reference table from a table only the default shard holds:
    // run on every shard, the others' copies would miss its rows.
    let p = t.place("MERGE INTO countries c USING settings s ON c.code = s.k WHEN NOT MATCHED THEN INSERT (code) VALUES (s.k)");
    assert!(
        refused(&p).starts_with("MERGE into a reference table"),
        "{p:?}"
    );
    assert_eq!(
        t.place("MERGE INTO settings s USING countries c ON s.k = c.code WHEN NOT MATCHED THEN INSERT (k) VALUES (c.code)"),
        Placement::One(t.sh.default_shard),
        "an unsharded table from a reference table: the default shard"
    );
    assert_eq!(
        t.place("MERGE INTO settings s USING (VALUES ('a', 1)) v(k, n) ON s.k = v.k WHEN NOT MATCHED THEN INSERT VALUES (v.k, v.n)"),
        Placement::One(t.sh.default_shard),
        "an unsharded table: the default shard"
    );
}

/// A view is read as an unsharded table (the default shard alone): made
/// on every shard over a sharded table, it would answer one shard's rows.
#[test]
fn a_view_over_a_sharded_table_is_made_only_where_a_hint_says() {
    let mut t = T::new();
    let all = Placement::Many(t.sh.all_shards());
    for sql in [
        "CREATE VIEW active_users AS SELECT * FROM users WHERE name <> ''",
        "CREATE OR REPLACE VIEW user5 AS SELECT * FROM users WHERE id = 5",
        "CREATE MATERIALIZED VIEW order_totals AS SELECT user_id, sum(amount) FROM orders GROUP BY user_id",
        "CREATE VIEW v AS SELECT c.name FROM countries c JOIN users u ON u.country = c.code",
        "CREATE VIEW v AS SELECT * FROM countries WHERE code IN (SELECT country FROM public.users)",
    ] {
        let p = t.place(sql);
        assert!(refused(&p).starts_with("a view over sharded table"), "{sql}: {p:?}");
        let Placement::Refused(r) = p else { unreachable!() };
        assert_eq!(r.construct, Some(Construct::View), "{sql}");
    }
    assert_eq!(
        t.place("/* shardline: shard=s1 */ CREATE VIEW active_users AS SELECT * FROM users"),
        Placement::One(1)
    );
    // The same rows on every shard: made on each, as other schema changes.
    assert_eq!(
        t.place("CREATE VIEW french AS SELECT * FROM countries WHERE code = 'fr'"),
        all
    );
    assert_eq!(t.place("CREATE VIEW one AS SELECT 1 AS n"), all);
    assert_eq!(
        t.place("CREATE VIEW rels AS SELECT relname FROM pg_catalog.pg_class"),
        all
    );
    assert_eq!(t.place("REFRESH MATERIALIZED VIEW order_totals"), all);
    assert_eq!(t.place("DROP VIEW active_users"), all);
}

/// A DO block runs as it is on every shard: one naming a sharded table,
/// in its code or in the text it EXECUTEs, is refused unless a hint names
/// the shard.
#[test]
fn a_do_block_naming_a_sharded_table_runs_only_where_a_hint_says() {
    let mut t = T::new();
    let all = Placement::Many(t.sh.all_shards());
    for (sql, table) in [
        (
            "DO $$ BEGIN INSERT INTO users (id, name) VALUES (5, 'x'); END $$",
            "users",
        ),
        (
            "DO $body$ BEGIN UPDATE public.orders SET amount = 0; END $body$",
            "orders",
        ),
        (
            "do LANGUAGE plpgsql $$BEGIN DELETE FROM \"users\"; END$$",
            "users",
        ),
        ("DO 'BEGIN EXECUTE ''DELETE FROM users''; END'", "users"),
        (
            "DO $$ BEGIN EXECUTE 'INSERT INTO orders VALUES (1)'; END $$",
            "orders",
        ),
        ("DO $$ BEGIN PERFORM count(*) FROM users$$", "users"),
    ] {
        let p = t.place(sql);
        assert!(
            refused(&p).starts_with("a DO block runs as it is on every shard")
                && refused(&p).contains(&format!("\"{table}\"")),
            "{sql}: {p:?}"
        );
        let Placement::Refused(r) = p else {
            unreachable!()
        };
        assert_eq!(r.construct, Some(Construct::DoBlock), "{sql}");
    }
    assert_eq!(
        t.place("/* shardline: shard=s1 */ DO $$ BEGIN DELETE FROM users WHERE id = 5; END $$"),
        Placement::One(1)
    );
    // No sharded table: every shard, as before (a reference table's copies
    // all take the same writes).
    assert_eq!(t.place("DO $$ BEGIN PERFORM 1; END $$"), all);
    assert_eq!(
        t.place("DO $$ BEGIN INSERT INTO countries VALUES ('fr', 'France'); END $$"),
        all
    );
    // Text the block builds its statements from may name the table in any
    // string (`format('DELETE FROM %I', 'users')`): every string is read,
    // a message's words too.
    let p = t.place("DO $$ BEGIN EXECUTE format('DELETE FROM %I', 'users'); END $$");
    assert!(refused(&p).contains("\"users\""), "{p:?}");
    let p = t.place("DO $$ BEGIN RAISE NOTICE 'users: %', 1; END $$");
    assert!(refused(&p).contains("\"users\""), "{p:?}");
}

/// `ONLY` (no inheritance children) was read by the parser as a table
/// named "ONLY" aliased by the real one, so `SELECT ... FROM ONLY users`
/// went to the default shard (one shard's rows) and a keyed `DELETE FROM
/// ONLY users` there too, whatever its key. Placed as without ONLY now.
#[test]
fn only_is_placed_as_its_table() {
    let mut t = T::new();
    for k in [1i64, 2, 3, 42, 600] {
        for (with_only, without) in [
            (
                format!("SELECT * FROM ONLY users WHERE id = {k}"),
                format!("SELECT * FROM users WHERE id = {k}"),
            ),
            (
                format!("DELETE FROM ONLY users WHERE id = {k}"),
                format!("DELETE FROM users WHERE id = {k}"),
            ),
            (
                format!("UPDATE only users SET name = 'x' WHERE id = {k}"),
                format!("UPDATE users SET name = 'x' WHERE id = {k}"),
            ),
            (
                format!("SELECT * FROM orders o JOIN ONLY users ON users.id = o.user_id WHERE o.user_id = {k}"),
                format!("SELECT * FROM orders o JOIN users ON users.id = o.user_id WHERE o.user_id = {k}"),
            ),
        ] {
            assert_eq!(t.place(&with_only), Placement::One(t.of(k)), "{with_only}");
            assert_eq!(t.place(&with_only), t.place(&without), "{with_only}");
        }
    }
    for (with_only, without) in [
        (
            "SELECT count(*) FROM ONLY users",
            "SELECT count(*) FROM users",
        ),
        ("DELETE FROM ONLY users", "DELETE FROM users"),
        ("SELECT * FROM ONLY countries", "SELECT * FROM countries"),
    ] {
        assert_eq!(t.place(with_only), t.place(without), "{with_only}");
    }
    // A table really named "only" (quoted) is that table.
    assert_eq!(
        t.place("SELECT * FROM \"only\" users"),
        t.place("SELECT * FROM settings users")
    );
}
