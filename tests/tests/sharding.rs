//! Sharding by key against real Postgres: two shards (each a primary), the
//! proxy in front. Placement is checked by the servers themselves: native
//! hash partitions that accept only their own rows, and direct queries on
//! each shard compared with the router's ring.

use shardline_config::Config;
use shardline_router::hash::{self, KeyValue};
use shardline_router::sharding::Sharding;
use shardline_tests::{sqlstate, Env, EnvOptions};
use std::collections::BTreeSet;

const SHARDING: &str = r#"
[sharding]
function = "consistent"

[[sharding.tables]]
name = "users"
column = "id"
[[sharding.tables]]
name = "orders"
column = "user_id"
[[sharding.tables]]
name = "items"
column = "id"
group = "native"
[[sharding.tables]]
name = "tags"
column = "name"
group = "native_text"

[[sharding.groups]]
name = "native"
function = "pg_hash"
[[sharding.groups]]
name = "native_text"
function = "pg_hash"
key_type = "text"

[[reference_tables]]
name = "countries"
"#;

/// The server's (or proxy's) error message.
fn text(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_string())
}

/// `sql` refused with 0A000 over the simple and the extended protocol
/// alike: the refusal's message.
async fn refused_both_ways(c: &tokio_postgres::Client, sql: &str) -> String {
    let mut messages = Vec::new();
    for simple in [true, false] {
        let err = if simple {
            c.simple_query(sql).await.map(|_| ())
        } else {
            c.query(sql, &[]).await.map(|_| ())
        }
        .expect_err("refused");
        assert_eq!(sqlstate(&err).as_deref(), Some("0A000"), "{sql}: {err}");
        messages.push(text(&err));
    }
    assert_eq!(messages[0], messages[1], "{sql}");
    messages.swap_remove(0)
}

async fn env() -> Env {
    Env::start_with(EnvOptions {
        shards: 2,
        replicas_per_shard: 0,
        extra_toml: SHARDING.into(),
        ..EnvOptions::default()
    })
    .await
    .expect("two shards")
}

fn sharding(env: &Env) -> Sharding {
    Sharding::from_config(&Config::from_toml(&env.config_text, "t").expect("config"))
}

/// The shard the config places an int key of `users` on.
fn owner(sh: &Sharding, k: i64) -> usize {
    sh.groups[0]
        .shard_of(Some(&KeyValue::Int(k)))
        .expect("shard")
}

async fn schema(env: &Env) {
    let c = env.connect().await;
    c.batch_execute(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text, country text);
         CREATE TABLE orders (id bigint, user_id bigint, amount numeric(12,2), PRIMARY KEY (user_id, id));
         CREATE TABLE countries (code text PRIMARY KEY, name text);",
    )
    .await
    .expect("DDL through the proxy");
}

/// Postgres's own hash functions agree with the router's on thousands of
/// values: integers at the extremes, unicode and empty text, uuids.
#[tokio::test]
async fn hashing_matches_the_servers_functions() {
    let env = Env::start_with(EnvOptions {
        replicas_per_shard: 0,
        ..EnvOptions::default()
    })
    .await
    .expect("env");
    let c = env.connect_shard(0).await;
    let mut rng = 0x2545F4914F6CDD1Du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut ints: Vec<i64> = vec![
        0,
        1,
        -1,
        i64::MIN,
        i64::MAX,
        i32::MIN as i64,
        i32::MAX as i64,
    ];
    ints.extend((0..3000).map(|_| next() as i64));
    ints.extend((0..1000).map(|_| (next() % 2000) as i64 - 1000));
    let rows = c
        .query(
            "SELECT k, hashint8extended(k, 8816678312871386365) FROM unnest($1::bigint[]) k",
            &[&ints],
        )
        .await
        .expect("server hashes");
    for r in &rows {
        let (k, h): (i64, i64) = (r.get(0), r.get(1));
        assert_eq!(KeyValue::Int(k).hash(), h as u64, "int {k}");
    }
    let alphabet: Vec<char> = "aZ09 _-éü中文😀\u{7f}'\"\\ß".chars().collect();
    let mut texts: Vec<String> = vec![String::new(), "a".into(), "😀".into()];
    for _ in 0..2000 {
        let len = (next() % 40) as usize;
        texts.push(
            (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect(),
        );
    }
    let rows = c
        .query(
            "SELECT k, hashtextextended(k, 8816678312871386365) FROM unnest($1::text[]) k",
            &[&texts],
        )
        .await
        .expect("server hashes");
    assert_eq!(rows.len(), texts.len());
    for r in &rows {
        let (k, h): (String, i64) = (r.get(0), r.get(1));
        assert_eq!(KeyValue::Text(k.clone()).hash(), h as u64, "text {k:?}");
    }
    let uuids: Vec<String> = (0..1000)
        .map(|_| {
            let (a, b) = (next(), next());
            format!(
                "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                a >> 32,
                (a >> 16) & 0xffff,
                a & 0xffff,
                b >> 48,
                b & 0xffff_ffff_ffff
            )
        })
        .collect();
    let rows = c
        .query(
            "SELECT k, uuid_hash_extended(k::uuid, 8816678312871386365) FROM unnest($1::text[]) k",
            &[&uuids],
        )
        .await
        .expect("server hashes");
    for r in &rows {
        let (k, h): (String, i64) = (r.get(0), r.get(1));
        let u = hash::parse_uuid(&k).expect("uuid");
        assert_eq!(KeyValue::Uuid(u).hash(), h as u64, "uuid {k}");
    }
    // Two-column keys combine as native partitioning does.
    c.batch_execute(
        "CREATE TABLE mc (a bigint, b text) PARTITION BY HASH (a, b);
         CREATE TABLE mc0 PARTITION OF mc FOR VALUES WITH (MODULUS 5, REMAINDER 0);
         CREATE TABLE mc1 PARTITION OF mc FOR VALUES WITH (MODULUS 5, REMAINDER 1);
         CREATE TABLE mc2 PARTITION OF mc FOR VALUES WITH (MODULUS 5, REMAINDER 2);
         CREATE TABLE mc3 PARTITION OF mc FOR VALUES WITH (MODULUS 5, REMAINDER 3);
         CREATE TABLE mc4 PARTITION OF mc FOR VALUES WITH (MODULUS 5, REMAINDER 4);
         INSERT INTO mc SELECT g, 't' || g FROM generate_series(-500, 500) g;",
    )
    .await
    .expect("partitioned table");
    let rows = c
        .query("SELECT a, b, tableoid::regclass::text FROM mc", &[])
        .await
        .expect("rows");
    for r in &rows {
        let (a, b, part): (i64, String, String) = (r.get(0), r.get(1), r.get(2));
        let h = hash::row_hash([Some(&KeyValue::Int(a)), Some(&KeyValue::Text(b))]);
        assert_eq!(format!("mc{}", h % 5), part, "({a}, ...)");
    }
}

/// `pg_hash` places rows exactly as native hash partitioning: each shard
/// holds only its own partition, so a misrouted row fails to insert.
#[tokio::test]
async fn pg_hash_placement_is_checked_by_native_partitions() {
    let env = env().await;
    for shard in 0..2 {
        env.sql_shard(
            shard,
            &format!(
                "CREATE TABLE items (id bigint, v text) PARTITION BY HASH (id);
                 CREATE TABLE items_{shard} PARTITION OF items FOR VALUES WITH (MODULUS 2, REMAINDER {shard});
                 CREATE TABLE tags (name text, n int) PARTITION BY HASH (name);
                 CREATE TABLE tags_{shard} PARTITION OF tags FOR VALUES WITH (MODULUS 2, REMAINDER {shard});
                 GRANT ALL ON items, tags TO app;"
            ),
        );
    }
    let c = env.connect().await;
    // One row at a time, by the simple and extended protocols.
    for k in -200i64..200 {
        c.batch_execute(&format!("INSERT INTO items (id, v) VALUES ({k}, 'simple')"))
            .await
            .unwrap_or_else(|e| panic!("simple insert {k}: {e}"));
        c.execute(
            "INSERT INTO items (id, v) VALUES ($1, 'extended')",
            &[&(k + 10_000)],
        )
        .await
        .unwrap_or_else(|e| panic!("extended insert {k}: {e}"));
    }
    // Multi-row INSERT split by shard, and COPY split by row.
    let values: Vec<String> = (20_000..20_500)
        .map(|k| format!("({k}, 'multi')"))
        .collect();
    let n = c
        .execute(
            &format!("INSERT INTO items (id, v) VALUES {}", values.join(",")),
            &[],
        )
        .await
        .expect("multi-row insert");
    assert_eq!(n, 500);
    let names: Vec<String> = (0..300).map(|i| format!("tag-{i}-ü")).collect();
    for (i, name) in names.iter().enumerate() {
        c.execute(
            "INSERT INTO tags (name, n) VALUES ($1, $2)",
            &[name, &(i as i32)],
        )
        .await
        .unwrap_or_else(|e| panic!("tag {name}: {e}"));
    }
    let rows = c
        .query(
            "SELECT id FROM items WHERE id = ANY($1)",
            &[&vec![1i64, 2, 3]],
        )
        .await
        .expect("ANY over both shards");
    assert_eq!(rows.len(), 3);
    let mut per_shard = Vec::new();
    for shard in 0..2 {
        let n: i64 = env
            .sql_shard(shard, "SELECT count(*) FROM items")
            .parse()
            .expect("count");
        let t: i64 = env
            .sql_shard(shard, "SELECT count(*) FROM tags")
            .parse()
            .expect("count");
        per_shard.push((n, t));
    }
    assert_eq!(per_shard.iter().map(|p| p.0).sum::<i64>(), 1300);
    assert_eq!(per_shard.iter().map(|p| p.1).sum::<i64>(), 300);
    assert!(
        per_shard.iter().all(|p| p.0 > 0 && p.1 > 0),
        "{per_shard:?}"
    );
}

/// Consistent hashing: 10k rows loaded through the proxy, each shard
/// queried directly holds only the keys the ring gives it.
#[tokio::test]
async fn consistent_ring_places_every_row_where_the_ring_says() {
    let env = env().await;
    schema(&env).await;
    let sh = sharding(&env);
    let c = env.connect().await;
    for chunk in (0..10_000i64).collect::<Vec<_>>().chunks(1000) {
        let values: Vec<String> = chunk
            .iter()
            .map(|k| format!("({k}, 'u{k}', 'fr')"))
            .collect();
        c.batch_execute(&format!(
            "INSERT INTO users (id, name, country) VALUES {}",
            values.join(",")
        ))
        .await
        .expect("insert");
    }
    let mut seen = 0;
    for shard in 0..2 {
        let ids = env.sql_shard(shard, "SELECT string_agg(id::text, ',') FROM users");
        for id in ids.split(',').filter(|s| !s.is_empty()) {
            let k: i64 = id.parse().expect("id");
            assert_eq!(owner(&sh, k), shard, "key {k} on the wrong shard");
            seen += 1;
        }
    }
    assert_eq!(seen, 10_000);
    // Reads without a key see every row once, concatenated.
    let rows = c
        .query("SELECT id FROM users WHERE country = 'fr'", &[])
        .await
        .expect("scatter");
    assert_eq!(rows.len(), 10_000);
    let n = c
        .execute("UPDATE users SET country = 'de' WHERE name LIKE 'u1%'", &[])
        .await
        .expect("broadcast");
    assert_eq!(
        n,
        1 + 10 + 100 + 1000,
        "the command tag sums every shard's count"
    );
    let deleted = c
        .execute("DELETE FROM users WHERE country = 'de'", &[])
        .await
        .expect("broadcast delete");
    assert_eq!(deleted, 1111);
    // Keyless reads that need a merge: every shard's rows, merged.
    let ids: Vec<i64> = c
        .query("SELECT id FROM users ORDER BY id", &[])
        .await
        .expect("merged ORDER BY")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in order");
    let count: i64 = c
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .expect("merged count")
        .get(0);
    let on_shards: i64 = (0..2)
        .map(|s| {
            env.sql_shard(s, "SELECT count(*) FROM users")
                .parse::<i64>()
                .unwrap()
        })
        .sum();
    assert_eq!((count, ids.len() as i64), (on_shards, on_shards));
    let err = c
        .query("SELECT id, row_number() OVER () FROM users", &[])
        .await
        .expect_err("window functions cannot be merged");
    assert_eq!(sqlstate(&err).as_deref(), Some("0A000"), "{err}");
    assert!(text(&err).contains("window functions"), "{err}");
}

/// Point statements reach exactly the owning shard; IN lists and ANY($1)
/// reach exactly the owning subset; prepared statements route per
/// execution; co-located joins run on one shard.
#[tokio::test]
async fn keys_route_to_their_shards() {
    let env = env().await;
    schema(&env).await;
    let sh = sharding(&env);
    let ports: Vec<i32> = (0..2)
        .map(|s| env.node_port(env.shard_primary(s)) as i32)
        .collect();
    let c = env.connect().await;
    for k in 0..40i64 {
        c.execute("INSERT INTO users (id, name) VALUES ($1, 'n')", &[&k])
            .await
            .expect("insert");
        c.execute(
            "INSERT INTO orders (id, user_id, amount) VALUES (1, $1, 9.5), (2, $1, 0.5)",
            &[&k],
        )
        .await
        .expect("co-located insert");
    }
    let stmt = c
        .prepare("SELECT inet_server_port() FROM users WHERE id = $1")
        .await
        .expect("prepare");
    for k in 0..40i64 {
        let port: i32 = c.query_one(&stmt, &[&k]).await.expect("point read").get(0);
        assert_eq!(port, ports[owner(&sh, k)], "prepared, key {k}");
        let rows = c
            .simple_query(&format!(
                "SELECT inet_server_port() FROM users WHERE id = {k}"
            ))
            .await
            .expect("simple");
        let port: i32 = rows
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|p| p.parse().ok()),
                _ => None,
            })
            .expect("a row");
        assert_eq!(port, ports[owner(&sh, k)], "simple, key {k}");
        let r = c
            .query_one(
                "UPDATE users SET name = 'm' WHERE id = $1 RETURNING inet_server_port()",
                &[&k],
            )
            .await
            .expect("update");
        assert_eq!(r.get::<_, i32>(0), ports[owner(&sh, k)]);
        let rows = c
            .query(
                "SELECT u.id, o.amount, inet_server_port() FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id = $1",
                &[&k],
            )
            .await
            .expect("co-located join");
        assert_eq!(rows.len(), 2);
    }
    // IN and ANY reach exactly the shards owning their keys.
    let same: Vec<i64> = (0..40).filter(|&k| owner(&sh, k) == 1).take(3).collect();
    let rows = c
        .query(
            "SELECT DISTINCT inet_server_port() FROM users WHERE id = ANY($1)",
            &[&same],
        )
        .await
        .expect("one shard: DISTINCT is fine");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, i32>(0), ports[1]);
    let both = [
        same[0],
        (0..40).find(|&k| owner(&sh, k) == 0).expect("a key on s0"),
    ];
    let rows = c
        .query(
            "SELECT inet_server_port(), id FROM users WHERE id IN ($1, $2)",
            &[&both[0], &both[1]],
        )
        .await
        .expect("two shards");
    let got: BTreeSet<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(got, ports.iter().copied().collect());
    // Hints.
    for (sql, port) in [
        (
            "/* shardline: shard=s1 */ SELECT inet_server_port()",
            ports[1],
        ),
        (
            "/* shardline: shard=s0 */ SELECT inet_server_port()",
            ports[0],
        ),
    ] {
        let r = c.query_one(sql, &[]).await.expect("hinted");
        assert_eq!(r.get::<_, i32>(0), port, "{sql}");
    }
    let k = same[0];
    let r = c
        .query_one(
            &format!("/* shardline: key={k} */ SELECT inet_server_port()"),
            &[],
        )
        .await
        .expect("key hint");
    assert_eq!(r.get::<_, i32>(0), ports[1]);
    c.batch_execute("SET shardline.shard = s1")
        .await
        .expect("set shard");
    let r = c
        .query_one("SELECT inet_server_port()", &[])
        .await
        .expect("session shard");
    assert_eq!(r.get::<_, i32>(0), ports[1]);
    c.batch_execute("RESET shardline.shard")
        .await
        .expect("reset shard");
    let err = c
        .batch_execute("SET shardline.shard = nope")
        .await
        .expect_err("unknown shard");
    assert_eq!(sqlstate(&err).as_deref(), Some("22023"));
}

/// What would be wrong across shards is refused, and a transaction that
/// would write on two shards leaves nothing behind.
#[tokio::test]
async fn refusals_leave_nothing_half_done() {
    let env = env().await;
    schema(&env).await;
    let sh = sharding(&env);
    let a = (0..100).find(|&k| owner(&sh, k) == 0).expect("s0 key");
    let b = (0..100).find(|&k| owner(&sh, k) == 1).expect("s1 key");
    let c = env.connect().await;
    c.execute("INSERT INTO users (id, name) VALUES ($1, 'a')", &[&a])
        .await
        .expect("insert");
    let err = c
        .execute(&format!("UPDATE users SET id = {b} WHERE id = {a}"), &[])
        .await
        .expect_err("key change across shards");
    assert_eq!(sqlstate(&err).as_deref(), Some("0A000"));
    assert!(text(&err).contains("sharding key"), "{err}");

    // A transaction on s0 that then writes on s1: refused at that statement.
    let k0 = (200..400).find(|&k| owner(&sh, k) == 0).expect("s0");
    let k1 = (200..400).find(|&k| owner(&sh, k) == 1).expect("s1");
    c.batch_execute("BEGIN").await.expect("begin");
    c.execute("INSERT INTO users (id, name) VALUES ($1, 'tx')", &[&k0])
        .await
        .expect("first shard");
    let err = c
        .execute("INSERT INTO users (id, name) VALUES ($1, 'tx')", &[&k1])
        .await
        .expect_err("second shard");
    assert_eq!(sqlstate(&err).as_deref(), Some("0A000"), "{err}");
    assert!(text(&err).contains("one shard"), "{err}");
    let err = c
        .execute("SELECT 1", &[])
        .await
        .expect_err("transaction is failed");
    assert_eq!(sqlstate(&err).as_deref(), Some("25P02"));
    c.batch_execute("COMMIT")
        .await
        .expect("commit becomes rollback");
    for shard in 0..2 {
        assert_eq!(
            env.sql_shard(shard, "SELECT count(*) FROM users WHERE name = 'tx'"),
            "0"
        );
    }
    // A transaction whose first statement needs every shard.
    c.batch_execute("BEGIN").await.expect("begin");
    let err = c
        .batch_execute("UPDATE users SET name = 'all'")
        .await
        .expect_err("broadcast in a transaction");
    assert_eq!(sqlstate(&err).as_deref(), Some("0A000"), "{err}");
    let err = c
        .batch_execute("SELECT 1")
        .await
        .expect_err("failed transaction");
    assert_eq!(sqlstate(&err).as_deref(), Some("25P02"));
    let end = c.simple_query("COMMIT").await.expect("commit");
    assert!(
        end.iter()
            .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::CommandComplete(0))),
        "COMMIT of a failed transaction rolls back"
    );
    assert_eq!(
        env.sql_shard(0, "SELECT count(*) FROM users WHERE name = 'all'"),
        "0"
    );
    // Session pooling: the session stays on the shard it started on.
    let sc = env
        .connect_as("sessionuser", "session-pw")
        .await
        .expect("session user");
    sc.query_one("SELECT count(*) FROM users WHERE id = $1", &[&a])
        .await
        .expect("s0");
    let err = sc
        .query_one("SELECT count(*) FROM users WHERE id = $1", &[&b])
        .await
        .expect_err("another shard in a pinned session");
    assert_eq!(sqlstate(&err).as_deref(), Some("0A000"));
    assert!(text(&err).contains("session pooling"), "{err}");
    // A multi-row INSERT spanning shards inside a transaction: refused too.
    c.batch_execute("BEGIN").await.expect("begin");
    let err = c
        .batch_execute(&format!(
            "INSERT INTO users (id, name) VALUES ({k0}, 'tx'), ({k1}, 'tx')"
        ))
        .await
        .expect_err("multi-shard write in a transaction");
    assert_eq!(sqlstate(&err).as_deref(), Some("0A000"));
    c.batch_execute("ROLLBACK").await.expect("rollback");
    // The session goes on working.
    let n: i64 = c
        .query_one("SELECT count(*) FROM users WHERE id = $1", &[&a])
        .await
        .expect("alive")
        .get(0);
    assert_eq!(n, 1);
    // Broadcast writes are all-or-nothing: a failure on one shard rolls
    // back the others.
    c.execute("INSERT INTO users (id, name) VALUES ($1, 'b')", &[&b])
        .await
        .expect("insert");
    env.sql_shard(
        1,
        "ALTER TABLE users ADD CONSTRAINT no_z CHECK (name <> 'z')",
    );
    let err = c
        .execute("UPDATE users SET name = 'z'", &[])
        .await
        .expect_err("fails on s1");
    assert_eq!(sqlstate(&err).as_deref(), Some("23514"));
    assert_eq!(
        env.sql_shard(0, &format!("SELECT name FROM users WHERE id = {a}")),
        "a"
    );
    // SELECT ... INTO is CREATE TABLE ... AS: run on every shard it made
    // a table of each shard's rows there (read later from the default
    // shard alone). Refused as that is, creating nothing.
    let err = c
        .batch_execute("SELECT id, name INTO users_copy FROM users")
        .await
        .expect_err("SELECT INTO across shards");
    assert_eq!(sqlstate(&err).as_deref(), Some("0A000"), "{err}");
    assert!(text(&err).contains("SELECT ... INTO"), "{err}");
    for shard in 0..2 {
        assert_eq!(
            env.sql_shard(
                shard,
                "SELECT count(*) FROM pg_class WHERE relname = 'users_copy'"
            ),
            "0",
            "no table on shard {shard}"
        );
    }
}

/// DDL reaches every shard; reference tables stay identical everywhere;
/// COPY splits rows by key in text, CSV and binary.
#[tokio::test]
async fn broadcast_reference_tables_and_copy() {
    let env = env().await;
    schema(&env).await;
    let sh = sharding(&env);
    for shard in 0..2 {
        assert_eq!(
            env.sql_shard(shard, "SELECT count(*) FROM pg_tables WHERE tablename IN ('users', 'orders', 'countries')"),
            "3"
        );
    }
    let c = env.connect().await;
    // Writes to a reference table run on every shard but answer as one
    // server: the tag and RETURNING rows of one shard, not one per shard.
    let n = c
        .execute(
            "INSERT INTO countries VALUES ('fr', 'France'), ('de', 'Germany')",
            &[],
        )
        .await
        .expect("reference insert");
    assert_eq!(n, 2, "one server's row count");
    let n = c
        .execute(
            "UPDATE countries SET name = 'République française' WHERE code = 'fr'",
            &[],
        )
        .await
        .expect("reference update");
    assert_eq!(n, 1);
    let rows = c
        .query(
            "UPDATE countries SET name = name WHERE code IN ('fr', 'de') RETURNING code",
            &[],
        )
        .await
        .expect("reference update returning");
    assert_eq!(rows.len(), 2, "RETURNING rows once");
    let msgs = c
        .simple_query("INSERT INTO countries VALUES ('it', 'Italia') RETURNING code; DELETE FROM countries WHERE code = 'it'")
        .await
        .expect("simple protocol");
    let counts: Vec<u64> = msgs
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .collect();
    assert_eq!(counts, vec![1, 1]);
    use futures_util::SinkExt;
    let sink = c
        .copy_in("COPY countries (code, name) FROM STDIN")
        .await
        .expect("copy into a reference table");
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"es\tEspana\npt\tPortugal\n"))
        .await
        .unwrap();
    assert_eq!(sink.finish().await.expect("copy done"), 2);
    c.execute("DELETE FROM countries WHERE code IN ('es', 'pt')", &[])
        .await
        .unwrap();
    // Copies that differ (written behind the proxy's back): the write
    // that finds them so fails (XX001) and changes nothing anywhere.
    env.sql_shard(1, "INSERT INTO countries VALUES ('xx', 'only on s1')");
    let err = c
        .execute(
            "UPDATE countries SET name = 'x' WHERE code IN ('fr', 'xx')",
            &[],
        )
        .await
        .expect_err("the shards disagree");
    assert_eq!(
        shardline_tests::sqlstate(&err).as_deref(),
        Some("XX001"),
        "{err:?}"
    );
    env.sql_shard(1, "DELETE FROM countries WHERE code = 'xx'");
    let dump = |shard| {
        env.sql_shard(
            shard,
            "SELECT string_agg(code || '=' || name, ',' ORDER BY code) FROM countries",
        )
    };
    assert_eq!(dump(0), dump(1));
    assert!(dump(0).contains("République"));
    for _ in 0..4 {
        let n: i64 = c
            .query_one("SELECT count(*) FROM countries", &[])
            .await
            .expect("read")
            .get(0);
        assert_eq!(n, 2);
    }
    // COPY FROM STDIN, text and CSV, split by key.
    let sink = c
        .copy_in("COPY users (id, name, country) FROM STDIN")
        .await
        .expect("copy text");
    let mut data = String::new();
    for k in 0..3000 {
        data.push_str(&format!("{k}\tname\\t{k}\t\\N\n"));
    }
    futures_util::pin_mut!(sink);
    for chunk in data.as_bytes().chunks(777) {
        sink.send(bytes::Bytes::copy_from_slice(chunk))
            .await
            .expect("send");
    }
    let n = sink.finish().await.expect("copy done");
    assert_eq!(n, 3000);
    let sink = c
        .copy_in("COPY users FROM STDIN WITH (FORMAT csv, HEADER true)")
        .await
        .expect("copy csv");
    futures_util::pin_mut!(sink);
    let mut csv = String::from("id,name,country\n");
    for k in 3000..4000 {
        csv.push_str(&format!("{k},\"a, \"\"quoted\"\"\nname\",fr\n"));
    }
    sink.send(bytes::Bytes::from(csv)).await.expect("send");
    assert_eq!(sink.finish().await.expect("csv done"), 1000);
    // Binary format (as asyncpg's copy_records_to_table and pgx send it):
    // tuples cut by their field lengths, keys read in int8's binary form.
    let sink = c
        .copy_in("COPY users (id, name) FROM STDIN (FORMAT binary)")
        .await
        .expect("copy binary");
    let writer = tokio_postgres::binary_copy::BinaryCopyInWriter::new(
        sink,
        &[
            tokio_postgres::types::Type::INT8,
            tokio_postgres::types::Type::TEXT,
        ],
    );
    futures_util::pin_mut!(writer);
    for k in 4000..4500i64 {
        let name = format!("binary {k}");
        writer.as_mut().write(&[&k, &name]).await.expect("row");
    }
    assert_eq!(writer.finish().await.expect("binary done"), 500);
    let name: String = c
        .query_one("SELECT name FROM users WHERE id = 4321", &[])
        .await
        .expect("binary row")
        .get(0);
    assert_eq!(name, "binary 4321");
    // A key the column type does not give (int4 sent for a bigint key is
    // fine; two bytes of garbage is not): refused, nothing written.
    let sink = c
        .copy_in("COPY users (id, name) FROM STDIN (FORMAT binary)")
        .await
        .expect("copy binary");
    let writer = tokio_postgres::binary_copy::BinaryCopyInWriter::new(
        sink,
        &[
            tokio_postgres::types::Type::TEXT,
            tokio_postgres::types::Type::TEXT,
        ],
    );
    futures_util::pin_mut!(writer);
    writer.as_mut().write(&[&"abc", &"x"]).await.expect("row");
    let err = writer.finish().await.expect_err("not a bigint key");
    assert_eq!(
        shardline_tests::sqlstate(&err).as_deref(),
        Some("22P04"),
        "{err:?}"
    );
    let mut total = 0;
    for shard in 0..2 {
        let ids = env.sql_shard(shard, "SELECT string_agg(id::text, ',') FROM users");
        for id in ids.split(',').filter(|s| !s.is_empty()) {
            let k: i64 = id.parse().expect("id");
            assert_eq!(owner(&sh, k), shard, "key {k}");
            total += 1;
        }
    }
    assert_eq!(total, 4500);
    let name: String = c
        .query_one("SELECT name FROM users WHERE id = 3001", &[])
        .await
        .expect("csv row")
        .get(0);
    assert_eq!(name, "a, \"quoted\"\nname");
    // COPY TO STDOUT reads every shard.
    let out = c.copy_out("COPY users TO STDOUT").await.expect("copy out");
    futures_util::pin_mut!(out);
    let mut lines = 0;
    use futures_util::StreamExt;
    while let Some(chunk) = out.next().await {
        lines += chunk.expect("data").iter().filter(|&&b| b == b'\n').count();
    }
    assert_eq!(
        lines, 4500,
        "one line per row (newlines in values are escaped)"
    );
}

/// pgbench's own schema is unsharded: it lives on the default shard and
/// pgbench runs unchanged through a sharded proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_unchanged_on_the_default_shard() {
    let env = env().await;
    let (ok, out) = env.pgbench(&["-i", "-s", "1", "-q"]);
    assert!(ok, "pgbench -i: {out}");
    for mode in ["simple", "extended", "prepared"] {
        let (ok, out) = env.pgbench(&["-n", "-T", "2", "-c", "4", "-M", mode]);
        assert!(ok, "pgbench -M {mode}: {out}");
        assert!(out.contains("number of failed transactions: 0"), "{out}");
    }
    assert_eq!(
        env.sql_shard(0, "SELECT count(*) FROM pgbench_accounts"),
        "100000"
    );
    assert_eq!(
        env.sql_shard(1, "SELECT count(*) FROM pgbench_accounts"),
        "0"
    );
}

/// Read-your-writes after writes on several shards: rows written by a
/// split INSERT or COPY are read back at once, although the replicas apply
/// WAL two seconds late.
#[tokio::test]
async fn reads_after_multi_shard_writes_see_them() {
    let env = Env::start_with(EnvOptions {
        shards: 2,
        replicas_per_shard: 1,
        extra_toml: SHARDING.into(),
        ..EnvOptions::default()
    })
    .await
    .expect("two shards with replicas");
    schema(&env).await;
    env.wait_healthy().await;
    for i in 0..env.backend.nodes().len() {
        if !env.backend.nodes()[i].is_primary {
            env.sql_on(
                i,
                "ALTER SYSTEM SET recovery_min_apply_delay = '2s'; SELECT pg_reload_conf();",
            );
            env.wait_sql_on(i, "SHOW recovery_min_apply_delay", "2s")
                .await;
        }
    }
    let c = env.connect().await;
    let values: Vec<String> = (0..20).map(|k| format!("({k}, 'split')")).collect();
    c.batch_execute(&format!(
        "INSERT INTO users (id, name) VALUES {}",
        values.join(",")
    ))
    .await
    .expect("split insert");
    for k in 0..20i64 {
        let n: i64 = c
            .query_one("SELECT count(*) FROM users WHERE id = $1", &[&k])
            .await
            .expect("read")
            .get(0);
        assert_eq!(n, 1, "key {k} read right after the split INSERT");
    }
    c.execute("UPDATE users SET name = 'broadcast'", &[])
        .await
        .expect("broadcast");
    for k in 0..20i64 {
        let name: String = c
            .query_one("SELECT name FROM users WHERE id = $1", &[&k])
            .await
            .expect("read")
            .get(0);
        assert_eq!(name, "broadcast", "key {k} after the broadcast UPDATE");
    }
}

/// The first cell of a simple query's first row.
fn first_cell(rows: &[tokio_postgres::SimpleQueryMessage]) -> Option<String> {
    rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    })
}

/// The name of user `k`, read with a simple query.
async fn name_of(
    c: &tokio_postgres::Client,
    k: i64,
) -> Result<Option<String>, tokio_postgres::Error> {
    c.simple_query(&format!("SELECT name FROM users WHERE id = {k}"))
        .await
        .map(|rows| first_cell(&rows))
}

/// An SQL `PREPARE` keeps the statement on one server connection, so its
/// `EXECUTE` would run on that connection's shard whatever its
/// parameters. With several shards, a prepared statement that would need
/// a key or every shard is refused (0A000, pointing to protocol-level
/// prepared statements) over both protocols, and the refusal pins nothing;
/// one that gives the same answer on any shard (no table, a reference
/// table read) runs, and the statements that pinned client sends for
/// another shard are refused naming the pin, never answered from the
/// wrong shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_prepare_is_placed_or_refused_on_several_shards() {
    let env = env().await;
    schema(&env).await;
    let sh = sharding(&env);
    let c = env.connect().await;
    let keys: Vec<i64> = (0..2)
        .map(|s| (0..100).find(|&k| owner(&sh, k) == s).expect("a key"))
        .collect();
    for &k in &keys {
        c.execute(
            "INSERT INTO users (id, name) VALUES ($1, $2)",
            &[&k, &format!("u{k}")],
        )
        .await
        .expect("insert");
    }
    c.batch_execute("INSERT INTO countries VALUES ('fr', 'France')")
        .await
        .expect("reference insert");
    for sql in [
        "PREPARE p AS SELECT name FROM users WHERE id = $1",
        "PREPARE n AS SELECT count(*) FROM users",
        "PREPARE u (bigint) AS UPDATE users SET name = 'x' WHERE id = $1",
        "PREPARE w AS INSERT INTO countries VALUES ($1, $2)",
        "prepare j as select o.amount from users u join orders o on o.user_id = u.id where u.id = $1",
    ] {
        let e = c.simple_query(sql).await.expect_err(sql);
        assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{sql}: {e}");
        assert!(text(&e).contains("PREPARE"), "{sql}: {e}");
        let e = c.query(sql, &[]).await.expect_err(sql);
        assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "extended {sql}: {e}");
    }
    // Nothing was prepared or pinned: each key is read on its own shard.
    for &k in &keys {
        let name = name_of(&c, k).await.expect("read after the refusals");
        assert_eq!(name, Some(format!("u{k}")), "key {k}");
        let e = c
            .simple_query(&format!("EXECUTE p({k})"))
            .await
            .expect_err("never prepared");
        assert_eq!(sqlstate(&e).as_deref(), Some("26000"), "{e}");
    }

    // The same answer on any shard: prepared and run.
    let rows = c
        .simple_query("PREPARE r AS SELECT name FROM countries WHERE code = $1; EXECUTE r('fr')")
        .await
        .expect("a reference read");
    assert_eq!(first_cell(&rows).as_deref(), Some("France"));
    let rows = c
        .simple_query("PREPARE one (int) AS SELECT $1 + 1; EXECUTE one(41)")
        .await
        .expect("no table");
    assert_eq!(first_cell(&rows).as_deref(), Some("42"));
    // The client now keeps one shard's connection for its prepared
    // statements. Between transactions its statements for other shards
    // run beside it, on connections borrowed for them: every key is read,
    // a keyless count is merged, DDL reaches every shard.
    for &k in &keys {
        let name = name_of(&c, k).await.expect("read while pinned");
        assert_eq!(name, Some(format!("u{k}")), "key {k}");
    }
    let rows = c
        .simple_query("SELECT count(*) FROM users")
        .await
        .expect("merged while pinned");
    assert_eq!(first_cell(&rows).as_deref(), Some("2"));
    c.batch_execute("CREATE TABLE pinned_ddl (id int)")
        .await
        .expect("DDL while pinned");
    // A statement refused wherever it would run gets its own reason, not
    // the pin's.
    let e = c
        .simple_query("PREPARE q AS SELECT name FROM users WHERE id = $1")
        .await
        .expect_err("refused while pinned");
    assert!(text(&e).contains("SQL PREPARE of a statement"), "{e}");
    for shard in 0..2 {
        assert_eq!(
            env.sql_shard(
                shard,
                "SELECT count(*) FROM pg_tables WHERE tablename = 'pinned_ddl'"
            ),
            "1"
        );
    }
    // Its transaction stays on the kept connection: another shard's key
    // there is refused, naming what keeps it.
    let mut answered = 0;
    for &k in &keys {
        c.batch_execute("BEGIN").await.expect("begin");
        let own = c
            .simple_query("EXECUTE one(1)")
            .await
            .expect("the prepared statement, in the transaction");
        assert_eq!(first_cell(&own).as_deref(), Some("2"));
        match name_of(&c, k).await {
            Ok(name) => {
                assert_eq!(name, Some(format!("u{k}")), "key {k}");
                answered += 1;
            }
            Err(e) => {
                assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{e}");
                let m = text(&e);
                assert!(
                    m.contains("SQL PREPARE") && !m.contains("session pooling"),
                    "{m}"
                );
            }
        }
        c.batch_execute("ROLLBACK").await.expect("rollback");
    }
    assert_eq!(
        answered, 1,
        "one shard's key is read in the kept connection's transaction"
    );
    let rows = c.simple_query("EXECUTE r('fr')").await.expect("again");
    assert_eq!(first_cell(&rows).as_deref(), Some("France"));
    // DISCARD ALL gives the connection back: every key is read again.
    c.batch_execute("DISCARD ALL").await.expect("discard");
    for &k in &keys {
        let name = name_of(&c, k).await.expect("read after DISCARD ALL");
        assert_eq!(name, Some(format!("u{k}")), "key {k}");
    }
}

/// A client kept on its connection by session state (here a session
/// advisory lock, as schema migration tools take one) still reaches every
/// shard between transactions: DDL for every shard and writes by key run
/// on connections borrowed for them, while the kept connection keeps the
/// lock, and the unlock runs there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_client_reaches_every_shard_between_transactions() {
    let env = env().await;
    schema(&env).await;
    let sh = sharding(&env);
    let c = env.connect().await;
    let keys: Vec<i64> = (0..2)
        .map(|s| (0..100).find(|&k| owner(&sh, k) == s).expect("a key"))
        .collect();
    c.batch_execute("SELECT pg_advisory_lock(4242)")
        .await
        .expect("lock");
    c.batch_execute("CREATE TABLE migrated (id bigint PRIMARY KEY)")
        .await
        .expect("DDL for every shard while pinned");
    for &k in &keys {
        c.execute("INSERT INTO users (id, name) VALUES ($1, 'm')", &[&k])
            .await
            .expect("a write by key while pinned");
    }
    let held = |shard: usize| {
        env.sql_shard(
            shard,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242",
        )
    };
    let locked: Vec<String> = (0..2).map(held).collect();
    assert_eq!(
        locked.iter().filter(|n| n.as_str() == "1").count(),
        1,
        "the lock is held on one shard: {locked:?}"
    );
    for shard in 0..2 {
        assert_eq!(
            env.sql_shard(
                shard,
                "SELECT count(*) FROM pg_tables WHERE tablename = 'migrated'"
            ),
            "1"
        );
        assert_eq!(
            env.sql_shard(shard, "SELECT count(*) FROM users WHERE name = 'm'"),
            "1"
        );
    }
    c.batch_execute("SELECT pg_advisory_unlock(4242)")
        .await
        .expect("unlock on the kept connection");
    assert_eq!((0..2).map(held).collect::<Vec<_>>(), ["0", "0"]);
}

/// EXPLAIN ANALYZE runs the statement it explains. One of a write on
/// several shards ran on one shard only: a DELETE without a key deleted
/// that shard's rows and left the others', and an INSERT of rows for both
/// shards wrote them all on one (the other's rows where no keyed read
/// finds them). Refused now, writing nothing; with a key it runs on the
/// key's shard, and EXPLAIN without ANALYZE shows one shard's plan.
#[tokio::test]
async fn explain_analyze_of_a_write_on_several_shards_writes_nothing() {
    let env = env().await;
    schema(&env).await;
    let sh = sharding(&env);
    let keys: Vec<i64> = (1..=20).collect();
    let c = env.connect().await;
    for k in &keys {
        c.execute("INSERT INTO users (id, name) VALUES ($1, 'before')", &[k])
            .await
            .expect("insert");
    }
    let on = |shard: usize| keys.iter().filter(|&&k| owner(&sh, k) == shard).count();
    assert!(on(0) > 0 && on(1) > 0, "rows on both shards");
    let (a, b) = (
        (100..).find(|&k| owner(&sh, k) == 0).expect("s0 key"),
        (100..).find(|&k| owner(&sh, k) == 1).expect("s1 key"),
    );
    for sql in [
        "EXPLAIN ANALYZE DELETE FROM users WHERE id <= 20".to_string(),
        "EXPLAIN (ANALYZE, COSTS off) UPDATE users SET name = 'explained'".into(),
        format!("EXPLAIN ANALYZE INSERT INTO users (id, name) VALUES ({a}, 'explained'), ({b}, 'explained')"),
    ] {
        let message = refused_both_ways(&c, &sql).await;
        assert!(message.contains("EXPLAIN ANALYZE"), "{sql}: {message}");
    }
    for shard in 0..2 {
        assert_eq!(
            env.sql_shard(shard, "SELECT count(*) FROM users WHERE name = 'before'"),
            on(shard).to_string(),
            "shard {shard}'s rows are all there, unchanged"
        );
        assert_eq!(
            env.sql_shard(
                shard,
                &format!("SELECT count(*) FROM users WHERE id IN ({a}, {b})")
            ),
            "0",
            "nothing inserted on shard {shard}"
        );
    }
    // With a key: run on its shard.
    for k in [a, b] {
        let plan = c
            .simple_query(&format!(
                "EXPLAIN ANALYZE INSERT INTO users (id, name) VALUES ({k}, 'explained')"
            ))
            .await
            .expect("a keyed write explained");
        assert!(first_cell(&plan).is_some_and(|l| l.starts_with("Insert on users")));
        assert_eq!(
            env.sql_shard(
                owner(&sh, k),
                &format!("SELECT name FROM users WHERE id = {k}")
            ),
            "explained",
            "on its key's shard"
        );
    }
    // Without ANALYZE: a plan, nothing written.
    let plan = c
        .simple_query("EXPLAIN DELETE FROM users")
        .await
        .expect("a plan");
    assert!(first_cell(&plan).is_some_and(|l| l.starts_with("Delete on users")));
    let rows = c
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .expect("count");
    assert_eq!(rows.get::<_, i64>(0), 22);
}

/// MERGE into a sharded table ran on every shard: its WHEN NOT MATCHED
/// INSERT put the row on each (MERGE 2, one row on a shard that does not
/// own its key). Refused now, writing nothing; with a shard hint it runs
/// there; into a reference table every shard's copy gets the row, and
/// the client one tag.
#[tokio::test]
async fn merge_into_a_sharded_table_writes_nothing_unless_a_shard_is_named() {
    let env = env().await;
    schema(&env).await;
    let sh = sharding(&env);
    let c = env.connect().await;
    let merge = |k: i64| {
        format!(
            "MERGE INTO users u USING (VALUES ({k}::bigint, 'merged')) v(id, name) ON u.id = v.id \
             WHEN MATCHED THEN UPDATE SET name = v.name \
             WHEN NOT MATCHED THEN INSERT (id, name) VALUES (v.id, v.name)"
        )
    };
    let k = 7001;
    let message = refused_both_ways(&c, &merge(k)).await;
    assert!(
        message.starts_with("MERGE with a sharded table"),
        "{message}"
    );
    for shard in 0..2 {
        assert_eq!(
            env.sql_shard(shard, &format!("SELECT count(*) FROM users WHERE id = {k}")),
            "0",
            "nothing merged on shard {shard}"
        );
    }
    let owner_name = format!("s{}", owner(&sh, k));
    let n = c
        .execute(
            &format!("/* shardline: shard={owner_name} */ {}", merge(k)),
            &[],
        )
        .await
        .expect("MERGE on the shard a hint names");
    assert_eq!(n, 1);
    for shard in 0..2 {
        assert_eq!(
            env.sql_shard(shard, &format!("SELECT count(*) FROM users WHERE id = {k}")),
            if shard == owner(&sh, k) { "1" } else { "0" },
            "shard {shard}"
        );
    }
    let n = c
        .execute(
            "MERGE INTO countries c USING (VALUES ('fr', 'France')) v(code, name) ON c.code = v.code \
             WHEN NOT MATCHED THEN INSERT VALUES (v.code, v.name)",
            &[],
        )
        .await
        .expect("MERGE into a reference table");
    assert_eq!(n, 1, "one tag, as one server's");
    for shard in 0..2 {
        assert_eq!(
            env.sql_shard(shard, "SELECT name FROM countries WHERE code = 'fr'"),
            "France",
            "shard {shard}'s copy"
        );
    }
    // From a table only the default shard holds: refused, no copy changed.
    c.batch_execute("CREATE TABLE plain (code text, name text)")
        .await
        .unwrap();
    c.batch_execute("INSERT INTO plain VALUES ('de', 'Germany')")
        .await
        .unwrap();
    let err = c
        .execute(
            "MERGE INTO countries c USING plain p ON c.code = p.code \
             WHEN NOT MATCHED THEN INSERT VALUES (p.code, p.name)",
            &[],
        )
        .await
        .expect_err("refused");
    assert_eq!(sqlstate(&err).as_deref(), Some("0A000"), "{err}");
    for shard in 0..2 {
        assert_eq!(
            env.sql_shard(shard, "SELECT count(*) FROM countries WHERE code = 'de'"),
            "0",
            "shard {shard}'s copy"
        );
    }
}

/// `ONLY` in FROM, UPDATE and DELETE: each statement reaches the shards
/// it would without it. The parser had read ONLY as a table name, so
/// these went to the default shard: a count saw its rows alone, and a
/// keyed UPDATE or DELETE of the other shard's row changed nothing.
#[tokio::test]
async fn only_reaches_the_shards_of_its_table() {
    let env = env().await;
    schema(&env).await;
    let sh = sharding(&env);
    let c = env.connect().await;
    let keys: Vec<i64> = (1..=20).collect();
    for k in &keys {
        c.execute("INSERT INTO users (id, name) VALUES ($1, 'n')", &[k])
            .await
            .expect("insert");
    }
    let count = |rows: Vec<tokio_postgres::Row>| rows[0].get::<_, i64>(0);
    assert_eq!(
        count(
            c.query("SELECT count(*) FROM ONLY users", &[])
                .await
                .unwrap()
        ),
        20
    );
    let default = sh.default_shard;
    for k in keys.iter().filter(|&&k| owner(&sh, k) != default).take(3) {
        let n = c
            .execute(
                &format!("UPDATE ONLY users SET name = 'only' WHERE id = {k}"),
                &[],
            )
            .await
            .unwrap();
        assert_eq!(n, 1, "UPDATE ONLY of key {k}");
        let got = c
            .query_one("SELECT name FROM ONLY users WHERE id = $1", &[k])
            .await
            .unwrap();
        assert_eq!(got.get::<_, String>(0), "only");
        let n = c
            .execute("DELETE FROM ONLY users WHERE id = $1", &[k])
            .await
            .unwrap();
        assert_eq!(n, 1, "DELETE FROM ONLY of key {k}");
        assert_eq!(
            env.sql_shard(
                owner(&sh, *k),
                &format!("SELECT count(*) FROM users WHERE id = {k}")
            ),
            "0"
        );
    }
    assert_eq!(
        count(
            c.query("SELECT count(*) FROM ONLY users", &[])
                .await
                .unwrap()
        ),
        17
    );
}

/// A view over a sharded table is read on the default shard alone, and a
/// DO block runs as it is on every shard: made or run on every shard, the
/// view would answer one shard's rows and the block write its rows on
/// each. Both are refused unless a hint names the shard, creating and
/// writing nothing; over reference tables alone they run on every shard.
#[tokio::test]
async fn views_and_do_blocks_over_sharded_tables_run_only_where_a_shard_is_named() {
    let env = env().await;
    schema(&env).await;
    let sh = sharding(&env);
    let c = env.connect().await;
    for k in 1..=20i64 {
        c.execute("INSERT INTO users (id, name) VALUES ($1, 'u')", &[&k])
            .await
            .expect("insert");
    }
    let relations = |shard: usize, names: &str| {
        env.sql_shard(
            shard,
            &format!("SELECT count(*) FROM pg_class WHERE relname IN ({names})"),
        )
    };
    for sql in [
        "CREATE VIEW named AS SELECT * FROM users WHERE name = 'u'",
        "CREATE MATERIALIZED VIEW totals AS SELECT count(*) FROM users",
    ] {
        let message = refused_both_ways(&c, sql).await;
        assert!(
            message.starts_with("a view over sharded table \"users\""),
            "{sql}: {message}"
        );
    }
    for shard in 0..2 {
        assert_eq!(relations(shard, "'named', 'totals'"), "0", "shard {shard}");
    }
    c.batch_execute("/* shardline: shard=s1 */ CREATE VIEW named AS SELECT * FROM users")
        .await
        .expect("a view on the shard a hint names");
    assert_eq!(relations(0, "'named'"), "0");
    assert_eq!(relations(1, "'named'"), "1");
    // Over a reference table: on every shard, each the same rows.
    c.batch_execute(
        "INSERT INTO countries VALUES ('fr', 'France');
         CREATE VIEW french AS SELECT name FROM countries WHERE code = 'fr'",
    )
    .await
    .expect("a view over a reference table");
    for shard in 0..2 {
        assert_eq!(relations(shard, "'french'"), "1", "shard {shard}");
    }
    let row = c.query_one("SELECT name FROM french", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "France");

    // A DO block inserting a row: refused, no row on any shard.
    let k = (100..)
        .find(|&k| owner(&sh, k) != sh.default_shard)
        .expect("a key off the default shard");
    let block = format!("DO $$ BEGIN INSERT INTO users (id, name) VALUES ({k}, 'do'); END $$");
    let message = refused_both_ways(&c, &block).await;
    assert!(
        message.starts_with("a DO block runs as it is on every shard"),
        "{message}"
    );
    let written =
        |shard: usize| env.sql_shard(shard, "SELECT count(*) FROM users WHERE name = 'do'");
    for shard in 0..2 {
        assert_eq!(written(shard), "0", "nothing written on shard {shard}");
    }
    let o = owner(&sh, k);
    c.batch_execute(&format!("/* shardline: shard=s{o} */ {block}"))
        .await
        .expect("the block on the shard a hint names");
    for shard in 0..2 {
        let expected = if shard == o { "1" } else { "0" };
        assert_eq!(written(shard), expected, "shard {shard}");
    }
    // No sharded table named: every shard's copy of the reference table.
    c.batch_execute("DO $$ BEGIN INSERT INTO countries VALUES ('de', 'Germany'); END $$")
        .await
        .expect("a block over a reference table");
    for shard in 0..2 {
        assert_eq!(
            env.sql_shard(shard, "SELECT name FROM countries WHERE code = 'de'"),
            "Germany",
            "shard {shard}'s copy"
        );
    }
}
