//! `shardline-rebalance` against real Postgres: three primaries; the old
//! config uses two of them, the new one all three (and back). Data is
//! loaded through a proxy running the old config; placement afterwards is
//! checked row by row with the router, content with checksums computed
//! independently of the tool, and answers through a proxy running the new
//! config against the answers before the move.

use shardline::fuzz::Rng;
use shardline_config::Config;
use shardline_router::hash::KeyValue;
use shardline_router::sharding::Sharding;
use shardline_tests::{
    killed_at_if_reached, rebalance_binary, start_proxy, Env, EnvOptions, Killed, TempDir,
};
use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TABLES: &str = r#"
[sharding]
function = "consistent"

[[sharding.tables]]
name = "users"
column = "id"
[[sharding.tables]]
name = "orders"
column = "user_id"
[[sharding.tables]]
name = "events"
column = "user_id"
[[sharding.tables]]
name = "accounts"
column = "id"
group = "by_uuid"
[[sharding.tables]]
name = "tags"
column = "name"
group = "by_text"

[[sharding.groups]]
name = "by_uuid"
key_type = "uuid"
[[sharding.groups]]
name = "by_text"
key_type = "text"

[[reference_tables]]
name = "countries"
"#;

const SCHEMA: &str = "
CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, balance numeric(12,2), created timestamptz DEFAULT now(),
    name_length int4 GENERATED ALWAYS AS (length(name)) STORED);
CREATE TABLE orders (id bigint NOT NULL, user_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE, amount numeric, note text, PRIMARY KEY (user_id, id));
CREATE INDEX orders_note ON orders (note);
CREATE TABLE events (user_id bigint NOT NULL, what text NOT NULL);
CREATE TABLE accounts (id uuid PRIMARY KEY, owner text, data jsonb);
CREATE TABLE tags (name text PRIMARY KEY, hits int4 NOT NULL DEFAULT 0);
CREATE TABLE countries (code text PRIMARY KEY, name text NOT NULL);
";

/// (table, key column, key type as the router reads it).
const SHARDED: [(&str, &str); 5] = [
    ("users", "id"),
    ("orders", "user_id"),
    ("events", "user_id"),
    ("accounts", "id"),
    ("tags", "name"),
];

const USERS: i64 = 50_000;
const ORDERS: i64 = 50_000;
const ACCOUNTS: i64 = 10_000;
const TAGS: i64 = 10_000;
/// Rows of `events`, a table without a primary key.
const EVENTS: i64 = 5_000;

fn user_id(i: i64) -> i64 {
    // Spread over the key space, negatives included.
    (i * 2_654_435_761) % 1_000_000_007 - 500_000_000
}

fn uuid(i: i64) -> String {
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (i as u64).wrapping_mul(0x9E37_79B9) as u32,
        i % 0xffff,
        i % 0xfff,
        (i * 7) % 0xfff,
        i
    )
}

/// Runs the tool; returns (exit code, stdout, stderr).
fn tool(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(rebalance_binary().expect("shardline-rebalance binary"))
        .args(args)
        .output()
        .expect("run shardline-rebalance");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the tool, which must fail (exit code 1) saying `says`.
fn refused(args: &[&str], says: &str) {
    let (code, out, err) = tool(args);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains(says), "{err}");
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

async fn copy_rows(
    client: &tokio_postgres::Client,
    copy: &str,
    rows: impl Iterator<Item = String>,
) {
    use futures_util::SinkExt as _;
    let sink = client.copy_in::<_, bytes::Bytes>(copy).await.expect(copy);
    let mut sink = std::pin::pin!(sink);
    let mut buf = String::new();
    for row in rows {
        buf.push_str(&row);
        buf.push('\n');
        if buf.len() > 64 * 1024 {
            sink.send(bytes::Bytes::from(std::mem::take(&mut buf)))
                .await
                .expect(copy);
        }
    }
    sink.send(bytes::Bytes::from(buf)).await.expect(copy);
    sink.as_mut().finish().await.expect(copy);
}

/// Schema and data, through a proxy running `text` (the old config).
async fn load(text: &str) {
    let (_proxy, c) = start_proxy(text).await;
    c.batch_execute(SCHEMA)
        .await
        .expect("schema through the proxy");
    copy_rows(
        &c,
        "COPY countries (code, name) FROM STDIN",
        (0..250).map(|i| format!("c{i:03}\tCountry {i} ü")),
    )
    .await;
    copy_rows(
        &c,
        "COPY users (id, name, balance, created) FROM STDIN",
        (0..USERS).map(|i| {
            format!(
                "{}\tuser {i}{}\t{}.{:02}\t2026-01-01 00:00:00+00",
                user_id(i),
                if i % 7 == 0 { " ñ" } else { "" },
                i * 3,
                i % 100
            )
        }),
    )
    .await;
    copy_rows(
        &c,
        "COPY orders (id, user_id, amount, note) FROM STDIN",
        (0..ORDERS).map(|i| {
            let note = if i % 5 == 0 {
                "\\N".to_string()
            } else {
                format!("note\\t{i}")
            };
            format!("{i}\t{}\t{}.5\t{note}", user_id(i % USERS), i % 1000)
        }),
    )
    .await;
    copy_rows(
        &c,
        "COPY events (user_id, what) FROM STDIN",
        (0..EVENTS).map(|i| format!("{}\tevent {}", user_id(i % 1_000), i % 2)),
    )
    .await;
    copy_rows(
        &c,
        "COPY accounts (id, owner, data) FROM STDIN",
        (0..ACCOUNTS).map(|i| format!("{}\towner {i}\t{{\"n\": {i}}}", uuid(i))),
    )
    .await;
    copy_rows(
        &c,
        "COPY tags (name, hits) FROM STDIN",
        (0..TAGS).map(|i| format!("tag-é-{i}\t{}", i % 17)),
    )
    .await;
}

/// Per table, over all shards: (rows, sum of row hashes): content
/// independent of placement, computed without the tool.
fn content(env: &Env, shards: &[usize]) -> BTreeMap<String, (i64, i128)> {
    let mut out = BTreeMap::new();
    for (table, _) in SHARDED.iter().chain([&("countries", "code")]) {
        let mut total = (0i64, 0i128);
        for &s in shards {
            if table == &"countries" && s != shards[0] {
                continue;
            }
            let line = env.sql_shard(
                s,
                &format!("SELECT count(*) || ' ' || coalesce(sum(hashtext(t::text)::int8), 0) FROM {table} t"),
            );
            let mut parts = line.split_whitespace();
            total.0 += parts.next().unwrap().parse::<i64>().unwrap();
            total.1 += parts.next().unwrap().parse::<i128>().unwrap();
        }
        out.insert(table.to_string(), total);
    }
    out
}

/// Keys of a table on a shard, as text.
fn keys_on(env: &Env, shard: usize, table: &str, column: &str) -> Vec<String> {
    env.sql_shard(shard, &format!("SELECT {column}::text FROM {table}"))
        .lines()
        .map(str::to_string)
        .collect()
}

/// For every table, per shard index: rows whose owner under `config`
/// is another shard (by the router), and the row count.
fn placement(
    env: &Env,
    shards: &[usize],
    config: &str,
) -> BTreeMap<(String, usize), (usize, usize)> {
    let c = Config::from_toml(config, "t.toml").unwrap();
    let sharding = Sharding::from_config(&c);
    let mut out = BTreeMap::new();
    for (table, column) in SHARDED {
        let group = &sharding.groups[sharding.tables[table].group];
        for &s in shards {
            let keys = keys_on(env, s, table, column);
            let wrong = keys
                .iter()
                .filter(|k| {
                    let key = group.key_from_text(k).expect("key parses");
                    let owner = group.shard_of(Some(&key)).unwrap();
                    sharding.shard_names[owner] != format!("s{s}")
                })
                .count();
            out.insert((table.to_string(), s), (wrong, keys.len()));
        }
    }
    out
}

/// Answers through a proxy: point reads by each key type, a co-located
/// join, a keyless read (sorted here) and the reference table.
async fn answers(text: &str) -> Vec<String> {
    let (_proxy, c) = start_proxy(text).await;
    let mut out = Vec::new();
    for i in (0..USERS).step_by(397) {
        let row = c
            .query_opt(
                "SELECT u.name, u.balance::text, count(o.id) FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id = $1 GROUP BY u.name, u.balance",
                &[&user_id(i)],
            )
            .await
            .expect("point read");
        out.push(format!(
            "{:?}",
            row.map(|r| (
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, i64>(2)
            ))
        ));
    }
    for i in (0..ACCOUNTS).step_by(211) {
        let rows = c
            .simple_query(&format!(
                "SELECT owner, data::text FROM accounts WHERE id = '{}'",
                uuid(i)
            ))
            .await
            .expect("uuid read");
        out.push(format!(
            "{:?}",
            rows.iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) =>
                        Some((r.get(0).map(str::to_string), r.get(1).map(str::to_string))),
                    _ => None,
                })
                .collect::<Vec<_>>()
        ));
    }
    for i in (0..TAGS).step_by(173) {
        let row = c
            .query_opt(
                "SELECT hits FROM tags WHERE name = $1",
                &[&format!("tag-é-{i}")],
            )
            .await
            .expect("text read");
        out.push(format!("{:?}", row.map(|r| r.get::<_, i32>(0))));
    }
    let mut ids: Vec<i64> = c
        .query("SELECT id FROM users", &[])
        .await
        .expect("keyless read")
        .iter()
        .map(|r| r.get(0))
        .collect();
    ids.sort_unstable();
    out.push(format!(
        "{} users, first {:?}, last {:?}",
        ids.len(),
        ids.first(),
        ids.last()
    ));
    for _ in 0..6 {
        // Reference reads go to any shard: each must have every row.
        let n: i64 = c
            .query_one("SELECT count(*) FROM countries", &[])
            .await
            .expect("reference read")
            .get(0);
        out.push(format!("countries {n}"));
    }
    out
}

/// Rows per (table, from, to) that the router says move between configs.
fn expected_moves(
    env: &Env,
    shards: &[usize],
    old: &str,
    new: &str,
) -> BTreeMap<(String, String, String), i64> {
    let old_c = Config::from_toml(old, "old.toml").unwrap();
    let new_c = Config::from_toml(new, "new.toml").unwrap();
    let (a, b) = (Sharding::from_config(&old_c), Sharding::from_config(&new_c));
    let mut out = BTreeMap::new();
    for (table, column) in SHARDED {
        let (ga, gb) = (
            &a.groups[a.tables[table].group],
            &b.groups[b.tables[table].group],
        );
        for &s in shards {
            for k in keys_on(env, s, table, column) {
                let key = ga.key_from_text(&k).unwrap();
                let from = &a.shard_names[ga.shard_of(Some(&key)).unwrap()];
                let to = &b.shard_names[gb.shard_of(Some(&key)).unwrap()];
                if from != to {
                    *out.entry((table.to_string(), from.clone(), to.clone()))
                        .or_default() += 1;
                }
            }
        }
    }
    out
}

fn plan_moves(json: &str) -> BTreeMap<(String, String, String), i64> {
    let v: serde_json::Value = serde_json::from_str(json).expect("plan --json is JSON");
    v["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .map(|t| {
            (
                (
                    t["table"].as_str().unwrap().to_string(),
                    t["from"].as_str().unwrap().to_string(),
                    t["to"].as_str().unwrap().to_string(),
                ),
                t["rows"].as_i64().unwrap(),
            )
        })
        .collect()
}

fn assert_placed(env: &Env, shards: &[usize], config: &str) {
    for ((table, shard), (wrong, rows)) in placement(env, shards, config) {
        assert_eq!(
            wrong, 0,
            "{wrong} of {rows} rows of {table} on s{shard} are not where the config places them"
        );
    }
}

fn left_steps(env: &Env, shard: usize) -> String {
    env.sql_shard(
        shard,
        "SELECT count(*) FILTER (WHERE state <> 'done') || ' ' || count(*) FROM shardline.rebalance_steps",
    )
}

/// A finished (or aborted) run leaves nothing on the servers: its records
/// and the `shardline` schema are gone.
fn assert_no_records(env: &Env, shards: &[usize]) {
    for &s in shards {
        assert_eq!(
            env.sql_shard(
                s,
                "SELECT count(*) FROM pg_namespace WHERE nspname = 'shardline'"
            ),
            "0",
            "the run's records are left on s{s}"
        );
    }
}

/// `shards` primaries without replicas (the tool works on primaries).
async fn start(shards: usize) -> Env {
    Env::start_with(EnvOptions {
        shards,
        replicas_per_shard: 0,
        ..Default::default()
    })
    .await
    .expect("the servers start")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_to_three_shards_and_shrink_back() {
    let env = start(3).await;
    let files = TempDir::new("rebalance-grow");
    let two = env.shards_config(&[0, 1], TABLES);
    let three = env.shards_config(&[0, 1, 2], TABLES);
    load(&two).await;
    // s2 has no tables yet: --create-tables makes them from s0's definition.
    let before = content(&env, &[0, 1]);
    assert_eq!(before["users"].0, USERS);
    assert_placed(&env, &[0, 1], &two);
    let answers_before = answers(&two).await;

    let old_path = files.write("old.toml", &two);
    let new_path = files.write("new.toml", &three);
    let expected = expected_moves(&env, &[0, 1], &two, &three);
    assert!(expected.keys().all(|(_, _, to)| to == "s2"), "{expected:?}");
    let moving: i64 = expected.values().sum();
    let total: i64 = before.values().map(|v| v.0).sum::<i64>() - 250;
    let share = moving as f64 / total as f64;
    assert!(
        (0.2..0.45).contains(&share),
        "consistent hashing moves about a third: {share}"
    );

    // plan: the same rows the router says, changing nothing.
    let (code, out, err) = tool(&[
        "plan",
        "--from",
        path(&old_path),
        "--to",
        path(&new_path),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(plan_moves(&out), expected);
    let (code, out, err) = tool(&["plan", "--from", path(&old_path), "--to", path(&new_path)]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("Shards added: s2") && out.contains("users") && out.contains("countries"),
        "{out}"
    );
    println!("{out}");
    assert_eq!(content(&env, &[0, 1]), before, "plan changed nothing");

    // apply without --writes-stopped refuses.
    let (code, _, err) = tool(&["apply", "--from", path(&old_path), "--to", path(&new_path)]);
    assert_eq!(code, 1);
    assert!(err.contains("--writes-stopped"), "{err}");
    // Without --create-tables: the missing tables are named.
    let (code, _, err) = tool(&[
        "apply",
        "--from",
        path(&old_path),
        "--to",
        path(&new_path),
        "--writes-stopped",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("table users does not exist on shard s2") && err.contains("--create-tables"),
        "{err}"
    );

    let (code, out, err) = tool(&[
        "apply",
        "--from",
        path(&old_path),
        "--to",
        path(&new_path),
        "--writes-stopped",
        "--create-tables",
        "--chunk-rows",
        "7000",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    println!("{out}");
    assert!(
        out.contains(&format!(
            "Moved {} rows",
            shardline_rebalance_count(moving + 250)
        )),
        "{out}"
    );
    // The new config is installed where the old one was; the old one kept.
    assert_eq!(std::fs::read_to_string(&old_path).unwrap(), three);
    assert_eq!(
        std::fs::read_to_string(files.dir.join("old.toml.before-rebalance")).unwrap(),
        two
    );

    assert_eq!(content(&env, &[0, 1, 2]), before);
    assert_placed(&env, &[0, 1, 2], &three);
    let on_s2: i64 = SHARDED
        .iter()
        .map(|(t, c)| keys_on(&env, 2, t, c).len() as i64)
        .sum();
    assert_eq!(on_s2, moving, "only the reassigned rows moved");
    assert_eq!(env.sql_shard(2, "SELECT count(*) FROM countries"), "250");
    assert_eq!(
        env.sql_shard(
            2,
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'orders_note'"
        ),
        "1",
        "indexes created"
    );
    assert_no_records(&env, &[0, 1, 2]);

    let (code, out, err) = tool(&["verify", "--config", path(&new_path)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("Every row is on its shard."), "{out}");
    // Running apply again: every row is in place, nothing moves, nothing
    // is left behind.
    let (code, out, err) = tool(&[
        "apply",
        "--from",
        path(&files.dir.join("old.toml.before-rebalance")),
        "--to",
        path(&new_path),
        "--writes-stopped",
        "--config-out",
        path(&files.dir.join("again.toml")),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Nothing to move"), "{out}");
    assert_no_records(&env, &[0, 1, 2]);

    assert_eq!(
        answers(&three).await,
        answers_before,
        "the same answers through the proxy after the move"
    );

    // Shrink back: every row of s2 returns; s2 ends empty.
    let back_from = files.write("three.toml", &three);
    let back_to = files.write("two.toml", &two);
    let expected_back = expected_moves(&env, &[0, 1, 2], &three, &two);
    assert!(expected_back.keys().all(|(_, from, _)| from == "s2"));
    assert_eq!(expected_back.values().sum::<i64>(), moving);
    let (code, out, err) = tool(&[
        "plan",
        "--from",
        path(&back_from),
        "--to",
        path(&back_to),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(plan_moves(&out), expected_back);
    let back = [
        "apply",
        "--from",
        path(&back_from),
        "--to",
        path(&back_to),
        "--writes-stopped",
    ];
    // Killed once every row left s2; then a late write lands on s2 (writes
    // were not stopped everywhere). Before, apply reported success and the
    // row was lost with the removed shard; now apply refuses to install the
    // config until the row is moved.
    apply_killed_at("finish", &back);
    let late = {
        let c = Config::from_toml(&three, "t.toml").unwrap();
        let sharding = Sharding::from_config(&c);
        let group = &sharding.groups[sharding.tables["users"].group];
        (USERS + 1..)
            .map(user_id)
            .find(|&k| {
                let key = group.key_from_text(&k.to_string()).expect("key parses");
                sharding.shard_names[group.shard_of(Some(&key)).unwrap()] == "s2"
            })
            .unwrap()
    };
    env.sql_shard(
        2,
        &format!("INSERT INTO users VALUES ({late}, 'late', 0, now())"),
    );
    // And one on a kept shard that the new config places on the other one
    // (before, apply exited 0 and the row was not found by key).
    let stray = (USERS + 1..)
        .map(|i| user_id(i).to_string())
        .find(|k| user_owner(&two, k) == 1)
        .unwrap();
    env.sql_shard(
        0,
        &format!("INSERT INTO users VALUES ({stray}, 'stray', 0, now())"),
    );
    let (code, out, err) = tool(&back);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains("shard s2 (removed by the new config) holds 1 rows of users")
            && err.contains(
                "shard s0 holds 1 rows of users that the new config places on other shards"
            )
            && err.contains("the new config was not installed"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&back_from).unwrap(), three);
    // The operator takes the late rows off (here: they are dropped); the
    // rerun installs the config.
    env.sql_shard(2, &format!("DELETE FROM users WHERE id = {late}"));
    env.sql_shard(0, &format!("DELETE FROM users WHERE id = {stray}"));
    let (code, out, err) = tool(&back);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("Nothing to move"), "{out}");
    assert_eq!(std::fs::read_to_string(&back_from).unwrap(), two);
    for (t, c) in SHARDED {
        assert!(
            keys_on(&env, 2, t, c).is_empty(),
            "{t} left on the removed shard"
        );
    }
    assert_eq!(content(&env, &[0, 1]), before);
    assert_placed(&env, &[0, 1], &two);
    let (code, out, err) = tool(&["verify", "--config", path(&back_to)]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(answers(&two).await, answers_before);
    assert_no_records(&env, &[0, 1, 2]);

    // The same move again, with the same configs (s2 kept, empty): the rows
    // move again. Before, the first run's records made this one report
    // "already completed" and leave a third of the users unreachable.
    let again_from = files.write("two-again.toml", &two);
    let again_to = files.write("three-again.toml", &three);
    let (code, out, err) = tool(&[
        "apply",
        "--from",
        path(&again_from),
        "--to",
        path(&again_to),
        "--writes-stopped",
        "--chunk-rows",
        "7000",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains(&format!("Moved {} rows", shardline_rebalance_count(moving))),
        "{out}"
    );
    assert_eq!(content(&env, &[0, 1, 2]), before);
    assert_placed(&env, &[0, 1, 2], &three);
    assert_eq!(answers(&three).await, answers_before);
    assert_no_records(&env, &[0, 1, 2]);
}

fn shardline_rebalance_count(n: i64) -> String {
    shardline_rebalance::plan::count(n)
}

/// Runs apply until it prints that it stopped at `point`, then kills it
/// with SIGKILL; it must get there.
fn apply_killed_at(point: &str, args: &[&str]) {
    if let Killed::Ended(code, err) = killed_at_if_reached(point, args) {
        panic!("apply ended ({code}) before reaching {point}:\n{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_any_point_a_rerun_finishes_the_same() {
    let env = start(3).await;
    let files = TempDir::new("rebalance-crash");
    // s2 gets its tables up front here (created by hand, as an operator would).
    for stmt in SCHEMA.split(';').filter(|s| !s.trim().is_empty()) {
        env.sql_shard(2, stmt);
    }
    env.sql_shard(2, "GRANT ALL ON ALL TABLES IN SCHEMA public TO app");
    let two = env.shards_config(&[0, 1], TABLES);
    let three = env.shards_config(&[0, 1, 2], TABLES);
    load(&two).await;
    let before = content(&env, &[0, 1]);
    let old_path = files.write("old.toml", &two);
    let new_path = files.write("new.toml", &three);
    let moving: i64 = expected_moves(&env, &[0, 1], &two, &three).values().sum();
    let args = [
        "apply",
        "--from",
        path(&old_path),
        "--to",
        path(&new_path),
        "--writes-stopped",
        "--chunk-rows",
        "5000",
    ];

    // In the middle of the third chunk's COPY.
    apply_killed_at("copy:3", &args);
    let copied_once = left_steps(&env, 2);
    // plan names the unfinished run instead of saying apply refuses.
    let (code, out, err) = tool(&["plan", "--from", path(&old_path), "--to", path(&new_path)]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("A run of this rebalance is recorded on the servers")
            && !out.contains("apply refuses"),
        "{out}"
    );
    // While one apply runs, another stops at once (before, it failed on a
    // duplicate key in the progress tables).
    let mut first = Command::new(rebalance_binary().unwrap())
        .args(args)
        .env("SHARDLINE_REBALANCE_STOP_AT", "verify")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = first.stderr.take().unwrap();
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        if line.contains("stopped at verify") {
            break;
        }
    }
    refused(&args, "another shardline-rebalance is running");
    unsafe { libc::kill(first.id() as i32, libc::SIGKILL) };
    first.wait().unwrap();
    // After every copy, before verifying.
    apply_killed_at("verify", &args);
    assert_eq!(
        std::fs::read_to_string(&old_path).unwrap(),
        two,
        "config untouched until the end"
    );
    // Between deleting a range on its source and recording it on the target.
    apply_killed_at("delete:2", &args);
    // And once more a little later.
    apply_killed_at("delete:5", &args);
    // After every delete, while the run's records are removed.
    apply_killed_at("finish", &args);
    // The config cannot be written: the message says the rows are moved,
    // and the next run writes it.
    let nowhere = files.dir.join("missing-dir").join("new.toml");
    let mut unwritable = args.to_vec();
    unwritable.extend(["--config-out", path(&nowhere)]);
    refused(
        &unwritable,
        "every row is moved and verified, but the new config could not be written",
    );
    let (code, out, err) = tool(&args);
    assert_eq!(code, 0, "{out}\n{err}");

    assert_eq!(
        content(&env, &[0, 1, 2]),
        before,
        "every row exactly once (copied, steps {copied_once})"
    );
    assert_placed(&env, &[0, 1, 2], &three);
    let on_s2: i64 = SHARDED
        .iter()
        .map(|(t, c)| keys_on(&env, 2, t, c).len() as i64)
        .sum();
    assert_eq!(on_s2, moving);
    assert_eq!(std::fs::read_to_string(&old_path).unwrap(), three);
    let (code, out, _) = tool(&["verify", "--config", path(&new_path)]);
    assert_eq!(code, 0, "{out}");
    assert_no_records(&env, &[0, 1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_stops_with_a_clear_message_and_loses_nothing() {
    let env = start(3).await;
    let files = TempDir::new("rebalance-bad");
    let two = env.shards_config(&[0, 1], TABLES);
    load(&two).await;
    let before = content(&env, &[0, 1]);
    let old_path = files.write("old.toml", &two);
    let apply = |to: &Path| {
        tool(&[
            "apply",
            "--from",
            path(&old_path),
            "--to",
            path(to),
            "--writes-stopped",
        ])
    };

    // A config whose key column differs cannot be reached by moving rows.
    let rekeyed = files.write(
        "rekeyed.toml",
        &env.shards_config(
            &[0, 1, 2],
            &TABLES.replace("column = \"user_id\"", "column = \"id\""),
        ),
    );
    let (code, _, err) = tool(&["plan", "--from", path(&old_path), "--to", path(&rekeyed)]);
    assert_eq!(code, 1);
    assert!(
        err.contains(
            "table orders: its key column is user_id in the old config and id in the new one"
        ),
        "{err}"
    );

    // An unreachable node.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = closed.local_addr().unwrap().port();
    drop(closed);
    let unreachable = files.write(
        "unreachable.toml",
        &format!(
            "{}[[shards]]\nname = \"s9\"\nprimary = {{ host = \"127.0.0.1\", port = {dead_port} }}\n{TABLES}",
            env.shards_config( &[0, 1], "")
        ),
    );
    let (code, _, err) = apply(&unreachable);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("shard s9 (127.0.0.1:{dead_port}) is unreachable")),
        "{err}"
    );

    let three = files.write("three.toml", &env.shards_config(&[0, 1, 2], TABLES));
    // A wrong password is a refused login, not an unreachable server.
    let (code, _, err) = tool(&[
        "plan",
        "--from",
        path(&old_path),
        "--to",
        path(&three),
        "--password",
        "wrong",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("refused the tool's login")
            && err.contains("28P01")
            && !err.contains("unreachable"),
        "{err}"
    );

    // A table outside the config referencing a sharded one: deleting moved
    // users would cascade into it.
    env.sql_shard(0, "CREATE TABLE audit (user_id bigint REFERENCES users (id) ON DELETE CASCADE); INSERT INTO audit SELECT id FROM users");
    let (code, _, err) = apply(&three);
    assert_eq!(code, 1);
    assert!(
        err.contains("table audit references users (foreign key audit_user_id_fkey)"),
        "{err}"
    );
    env.sql_shard(0, "DROP TABLE audit");
    // Missing target tables.
    let (code, _, err) = apply(&three);
    assert_eq!(code, 1);
    assert!(err.contains("does not exist on shard s2"), "{err}");
    // Mismatched columns.
    for stmt in SCHEMA.split(';').filter(|s| !s.trim().is_empty()) {
        env.sql_shard(2, &stmt.replace("hits int4", "hits int8"));
    }
    env.sql_shard(2, "GRANT ALL ON ALL TABLES IN SCHEMA public TO app");
    let (code, _, err) = apply(&three);
    assert_eq!(code, 1);
    assert!(
        err.contains("table tags on shard s2")
            && err.contains("column hits is bigint there, integer here"),
        "{err}"
    );
    env.sql_shard(2, "DROP TABLE tags; CREATE TABLE tags (name text PRIMARY KEY, hits int4 NOT NULL DEFAULT 0); GRANT ALL ON tags TO app");
    // Refused up front, each naming what to do (before, each ran: the
    // other schema's rows stayed unreachable, the cascade deleted rows that
    // stay, the trigger fired on copied and deleted rows). Per case: the
    // shard, what makes it, what the message says, what undoes it.
    let cases: [(usize, &str, &str, &str); 4] = [
        (
            0,
            "CREATE SCHEMA tenant2; CREATE TABLE tenant2.users (id bigint PRIMARY KEY)",
            "a table users exists in schema(s) tenant2",
            "DROP SCHEMA tenant2 CASCADE",
        ),
        (
            1,
            "ALTER TABLE users ADD CONSTRAINT users_self FOREIGN KEY (id) REFERENCES users (id) ON DELETE CASCADE",
            "table users has a foreign key to itself (users_self)",
            "ALTER TABLE users DROP CONSTRAINT users_self",
        ),
        (
            0,
            "ALTER TABLE orders ADD CONSTRAINT orders_by_id FOREIGN KEY (id) REFERENCES users (id) NOT VALID",
            "foreign key orders_by_id from orders (id) to users (id) does not follow the sharding key",
            "ALTER TABLE orders DROP CONSTRAINT orders_by_id",
        ),
        (
            2,
            "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$; \
             CREATE TRIGGER orders_touch BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION touch()",
            "table orders has trigger orders_touch",
            "DROP TRIGGER orders_touch ON orders; DROP FUNCTION touch()",
        ),
    ];
    for (shard, make, says, undo) in cases {
        env.sql_shard(shard, make);
        let (code, _, err) = apply(&three);
        assert_eq!(code, 1, "{make}");
        assert!(
            err.contains(&format!("on shard s{shard}"))
                && err.contains(says)
                && err.contains("Nothing was changed"),
            "{make}: {err}"
        );
        env.sql_shard(shard, undo);
    }
    assert_no_records(&env, &[0, 1, 2]);
    // A target already holding a row the old config places elsewhere.
    env.sql_shard(
        2,
        &format!(
            "INSERT INTO users VALUES ({}, 'intruder', 0, now())",
            user_id(1)
        ),
    );
    let (code, _, err) = apply(&three);
    assert_eq!(code, 1);
    assert!(
        err.contains("shard s2")
            && err.contains("holds 1 rows of users that the old config places on other shards"),
        "{err}"
    );
    // A reference table that differs on the new shard.
    env.sql_shard(
        2,
        "DELETE FROM users; INSERT INTO countries VALUES ('zz', 'Elsewhere')",
    );
    let (code, _, err) = apply(&three);
    assert_eq!(code, 1);
    assert!(
        err.contains("reference table countries on new shard s2"),
        "{err}"
    );

    // Nothing was lost or moved by any of these, and the config is untouched.
    assert_eq!(content(&env, &[0, 1]), before);
    assert_placed(&env, &[0, 1], &two);
    assert_eq!(std::fs::read_to_string(&old_path).unwrap(), two);
    assert_eq!(env.sql_shard(2, "SELECT count(*) FROM users"), "0");

    // An interrupted run can be undone before anything was deleted.
    env.sql_shard(2, "DELETE FROM countries");
    let args = [
        "apply",
        "--from",
        path(&old_path),
        "--to",
        path(&three),
        "--writes-stopped",
        "--chunk-rows",
        "9000",
    ];
    apply_killed_at("verify", &args);
    assert!(
        env.sql_shard(2, "SELECT count(*) FROM users") != "0",
        "copied before the kill"
    );
    let (code, out, err) = tool(&["abort", "--from", path(&old_path), "--to", path(&three)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("removed"), "{out}");
    for (t, c) in SHARDED.iter().chain([&("countries", "code")]) {
        assert!(
            keys_on(&env, 2, t, c).is_empty(),
            "{t} left on s2 after abort"
        );
    }
    assert_no_records(&env, &[0, 1, 2]);
    assert_eq!(
        content(&env, &[0, 1]),
        before,
        "the old placement is intact after abort"
    );
    // An abort killed halfway: apply refuses until abort has finished (it
    // used to plan only targets without steps, and leave moved rows'
    // children on the old shards).
    apply_killed_at("verify", &args);
    let abort = ["abort", "--from", path(&old_path), "--to", path(&three)];
    apply_killed_at("abort:3", &abort);
    refused(&args, "an abort of this rebalance was interrupted");
    let (code, out, err) = tool(&abort);
    assert_eq!(code, 0, "{out}{err}");
    assert_no_records(&env, &[0, 1, 2]);
    assert_eq!(content(&env, &[0, 1]), before);
    assert_eq!(env.sql_shard(2, "SELECT count(*) FROM users"), "0");
    assert_placed(&env, &[0, 1], &two);
    let (code, _, err) = tool(&["abort", "--from", path(&old_path), "--to", path(&three)]);
    assert_eq!(code, 1);
    assert!(err.contains("nothing to abort"), "{err}");
    // A copied row that differs from its source stops the run at
    // verification, before anything is deleted; --recopy-changed copies it
    // again from the source, verifies and goes on.
    apply_killed_at("verify", &args);
    let id = env.sql_shard(2, "SELECT min(id) FROM users");
    env.sql_shard(
        2,
        &format!("UPDATE users SET balance = balance + 1 WHERE id = {id}"),
    );
    let (code, _, err) = tool(&args);
    assert_eq!(code, 1);
    assert!(
        err.contains("verification failed for users")
            && err.contains("Nothing was deleted")
            && err.contains("--recopy-changed"),
        "{err}"
    );
    assert_eq!(
        content(&env, &[0, 1]),
        before,
        "nothing deleted after a failed verification"
    );
    let recopy: Vec<&str> = args.iter().copied().chain(["--recopy-changed"]).collect();
    apply_killed_at("delete:1", &recopy);
    let balance = format!("SELECT balance FROM users WHERE id = {id}");
    assert_eq!(
        env.sql_shard(2, &balance),
        env.sql_shard(user_owner(&two, &id), &balance),
        "the copy is the source's row again"
    );
    // Once deletes have started, abort refuses: only apply finishes.
    let (code, _, err) = tool(&["abort", "--from", path(&old_path), "--to", path(&three)]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot be undone, only finished"), "{err}");
    // Writes to verified ranges before their delete (writes were not
    // stopped): every user renamed, a moving user deleted with its orders
    // (ON DELETE CASCADE), a new moving user with an order. The delete
    // catches them and deletes nothing from those ranges ...
    let three_text = env.shards_config(&[0, 1, 2], TABLES);
    let moving = |shard: usize| {
        keys_on(&env, shard, "users", "id")
            .into_iter()
            .find(|k| user_owner(&three_text, k) == 2)
            .expect("a user moving to s2")
    };
    let deleted_user = moving(1);
    let saved_user = env.sql_shard(
        1,
        &format!("SELECT format('(%s, %L, %L, %L)', id, name, balance, created) FROM users WHERE id = {deleted_user}"),
    );
    let mut saved_orders = std::collections::BTreeSet::new();
    for s in [1, 2] {
        let rows = env.sql_shard(
            s,
            &format!("SELECT format('(%s, %s, %L, %L)', id, user_id, amount, note) FROM orders WHERE user_id = {deleted_user}"),
        );
        saved_orders.extend(rows.lines().filter(|l| !l.is_empty()).map(String::from));
    }
    assert!(!saved_orders.is_empty(), "the deleted user has orders");
    let late_user = (9_000_000_000i64..)
        .map(|k| k.to_string())
        .find(|k| user_owner(&three_text, k) == 2)
        .unwrap();
    let late_home = user_owner(&two, &late_user);
    for s in [0, 1] {
        env.sql_shard(
            s,
            "UPDATE users SET name = name || '!'; UPDATE events SET what = what || '!'",
        );
    }
    env.sql_shard(1, &format!("DELETE FROM users WHERE id = {deleted_user}"));
    env.sql_shard(
        late_home,
        &format!(
            "INSERT INTO users (id, name, balance) VALUES ({late_user}, 'late user!', 1); \
             INSERT INTO orders (id, user_id, amount) VALUES (1, {late_user}, 2)"
        ),
    );
    let (code, _, err) = tool(&args);
    assert_eq!(code, 1);
    assert!(
        err.contains("the rows changed on the source after they were copied and verified")
            && err.contains("--recopy-changed"),
        "{err}"
    );
    let (code, _, err) = tool(&args);
    assert_eq!(code, 1, "still changed: {err}");
    // A foreign key from a reference table into a moving table (the
    // up-front checks look at sharded tables and tables outside the
    // config): the delete's own count catches the row its SET NULL changed
    // (before, only the rows the delete returned were counted, and a
    // reference row changed on one shard only).
    let moving_user = moving(0);
    for s in [0, 1, 2] {
        env.sql_shard(s, "ALTER TABLE countries ADD COLUMN owner bigint");
    }
    env.sql_shard(
        0,
        &format!(
            "ALTER TABLE countries ADD CONSTRAINT countries_owner FOREIGN KEY (owner) REFERENCES users (id) ON DELETE SET NULL; \
             UPDATE countries SET owner = {moving_user} WHERE code = 'c001'"
        ),
    );
    // (--recopy-changed copies the changed ranges again first; the users
    // delete then finds the reference row it would change.)
    let (code, _, err) = tool(&recopy);
    assert_eq!(code, 1);
    assert!(
        err.contains("countries: 0 inserted, 1 updated, 0 deleted"),
        "{err}"
    );
    for table in ["users", "orders", "events"] {
        assert!(
            err.lines().any(|l| l.starts_with(&format!("{table} "))
                && l.contains("had changed since it was copied")),
            "{table} copied again: {err}"
        );
    }
    assert_eq!(
        env.sql_shard(0, "SELECT owner FROM countries WHERE code = 'c001'"),
        moving_user,
        "rolled back"
    );
    for s in [0, 1, 2] {
        env.sql_shard(s, "ALTER TABLE countries DROP COLUMN owner");
    }
    // ... and --recopy-changed moves them as they are now.
    let (code, out, err) = tool(&recopy);
    assert_eq!(code, 0, "{out}{err}");
    assert_placed(&env, &[0, 1, 2], &three_text);
    for s in [0, 1, 2] {
        assert_eq!(
            env.sql_shard(
                s,
                "SELECT (SELECT count(*) FROM users WHERE name NOT LIKE '%!') + (SELECT count(*) FROM events WHERE what NOT LIKE '%!')"
            ),
            "0",
            "every rename moved (s{s})"
        );
        let expected = if s == 2 { "1 1" } else { "0 0" };
        assert_eq!(
            env.sql_shard(
                s,
                &format!(
                    "SELECT (SELECT count(*) FROM users WHERE id = {late_user}) || ' ' || (SELECT count(*) FROM orders WHERE user_id = {late_user})"
                )
            ),
            expected,
            "the late user and order on s{s}"
        );
        assert_eq!(
            env.sql_shard(
                s,
                &format!(
                    "SELECT (SELECT count(*) FROM users WHERE id = {deleted_user}) + (SELECT count(*) FROM orders WHERE user_id = {deleted_user})"
                )
            ),
            "0",
            "the deleted user and its orders stay deleted (s{s})"
        );
    }
    // Undo the writes: the content is then exactly what was loaded.
    env.sql_shard(
        2,
        &format!(
            "DELETE FROM users WHERE id = {late_user}; \
             INSERT INTO users (id, name, balance, created) VALUES {saved_user}; \
             INSERT INTO orders (id, user_id, amount, note) VALUES {}",
            saved_orders.into_iter().collect::<Vec<_>>().join(", ")
        ),
    );
    for s in [0, 1, 2] {
        env.sql_shard(
            s,
            "UPDATE users SET name = rtrim(name, '!'); UPDATE events SET what = rtrim(what, '!')",
        );
    }
    assert_eq!(content(&env, &[0, 1, 2]), before);
    assert_placed(&env, &[0, 1, 2], &three_text);
}

/// The index (in `config`'s shards) of the shard `config` gives user `key`.
fn user_owner(config: &str, key: &str) -> usize {
    let c = Config::from_toml(config, "t.toml").unwrap();
    let sharding = Sharding::from_config(&c);
    let group = &sharding.groups[sharding.tables["users"].group];
    let key = group.key_from_text(key).expect("key parses");
    group.shard_of(Some(&key)).unwrap()
}

/// The placement SQL the tool runs on the servers gives, for every key, the
/// shard the router gives: every sharding function, pinned keys, NULLs,
/// extreme values, each key type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_sql_agrees_with_the_router_on_the_server() {
    let env = start(1).await;
    env.sql_shard(
        0,
        "CREATE TABLE keys_int (k bigint);
         INSERT INTO keys_int SELECT (g * 2654435761) % 1000000007 - 500000000 FROM generate_series(1, 3000) g;
         INSERT INTO keys_int VALUES (NULL), (0), (-1), (1), (7), (-3), (99), (100), (9223372036854775807), (-9223372036854775808);
         CREATE TABLE keys_text (k text);
         INSERT INTO keys_text SELECT 'key ' || g || repeat('é', g % 5) FROM generate_series(1, 2000) g;
         INSERT INTO keys_text VALUES (NULL), (''), ('o''k'), ('tag-7');
         CREATE TABLE keys_uuid (k uuid);
         INSERT INTO keys_uuid SELECT md5(g::text)::uuid FROM generate_series(1, 2000) g;
         INSERT INTO keys_uuid VALUES (NULL);",
    );
    let base = |default: &str, other: &str| {
        format!(
            "[sharding]\n{default}\n[[sharding.tables]]\nname = \"keys_int\"\ncolumn = \"k\"\n[[sharding.tables]]\nname = \"keys_text\"\ncolumn = \"k\"\ngroup = \"t\"\n[[sharding.tables]]\nname = \"keys_uuid\"\ncolumn = \"k\"\ngroup = \"u\"\n[[sharding.groups]]\nname = \"t\"\nkey_type = \"text\"\n{other}\n[[sharding.groups]]\nname = \"u\"\nkey_type = \"uuid\"\n{other}\n"
        )
    };
    let variants = [
        base("function = \"consistent\"\nvnodes = 64", "function = \"consistent\""),
        base("function = \"pg_hash\"", "function = \"pg_hash\""),
        base(
            "function = \"consistent\"\npinned = [{ key = 7, shard = \"s2\" }, { key = -3, shard = \"s0\" }]",
            "function = \"consistent\"\npinned = [{ key = \"tag-7\", shard = \"s1\" }]",
        )
        .replacen(
            "key_type = \"uuid\"\nfunction = \"consistent\"\npinned = [{ key = \"tag-7\", shard = \"s1\" }]",
            "key_type = \"uuid\"\nfunction = \"consistent\"",
            1,
        ),
        base(
            "function = \"range\"\nranges = [{ shard = \"s0\", to = 0 }, { shard = \"s1\", from = 0, to = 100 }, { shard = \"s2\", from = 100 }]",
            "function = \"pg_hash\"",
        ),
        base(
            "function = \"list\"\nlists = [{ shard = \"s1\", values = [1, 7, 99] }, { shard = \"s2\", values = [-1] }]",
            "function = \"pg_hash\"",
        ),
    ];
    for tables in variants {
        let mut text =
            String::from("[[users]]\nname = \"app\"\npassword = \"app\"\ndatabase = \"app\"\n");
        for s in 0..3 {
            text.push_str(&format!(
                "[[shards]]\nname = \"s{s}\"\nprimary = {{ host = \"127.0.0.1\", port = {} }}\n",
                5000 + s
            ));
        }
        text.push_str(&tables);
        let config = Config::from_toml(&text, "t.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
        let placement = shardline_rebalance::layout::Placement::new(&config);
        let sharding = Sharding::from_config(&config);
        let mut checked = 0;
        for spec in &placement.tables {
            let group = &sharding.groups[spec.group];
            let out = env.sql_shard(
                0,
                &format!(
                    "SELECT coalesce(k::text, '<null>') || '|' || coalesce(({})::text, '-') FROM {}",
                    placement.owner_sql(spec),
                    spec.name
                ),
            );
            for line in out.lines() {
                let (key, owner) = line.rsplit_once('|').unwrap();
                let key = (key != "<null>").then(|| group.key_from_text(key).expect("key parses"));
                let want = group
                    .shard_of(key.as_ref())
                    .map_or("-".to_string(), |s| s.to_string());
                assert_eq!(owner, want, "{} key {key:?} under\n{tables}", spec.name);
                checked += 1;
            }
            // The form without array subscripts (online moves' row filters)
            // agrees with it, and a publication accepts it.
            for s in 0..3 {
                let is = placement.owner_is_sql(spec, s);
                let differ = env.sql_shard(
                    0,
                    &format!(
                        "SELECT count(*) FROM {} WHERE (({}) = {s}) IS DISTINCT FROM ({is})",
                        spec.name,
                        placement.owner_sql(spec)
                    ),
                );
                assert_eq!(differ, "0", "{} shard {s}: {is}", spec.name);
                env.sql_shard(
                    0,
                    &format!(
                        "CREATE PUBLICATION owner_is FOR TABLE {} WHERE ({is}); DROP PUBLICATION owner_is",
                        spec.name
                    ),
                );
            }
        }
        assert_eq!(checked, 3010 + 2004 + 2001);
    }
}

/// Changing the sharding function moves rows both ways between the same
/// shards: each is source and target at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_change_swaps_rows_between_shards() {
    let env = start(2).await;
    let files = TempDir::new("rebalance-swap");
    let ring = env.shards_config(&[0, 1], TABLES);
    let hashed = env.shards_config(
        &[0, 1],
        &TABLES.replace("function = \"consistent\"", "function = \"pg_hash\""),
    );
    load(&ring).await;
    let before = content(&env, &[0, 1]);
    let expected = expected_moves(&env, &[0, 1], &ring, &hashed);
    assert!(expected.contains_key(&("users".into(), "s0".into(), "s1".into())));
    assert!(expected.contains_key(&("users".into(), "s1".into(), "s0".into())));
    let from = files.write("ring.toml", &ring);
    let to = files.write("hashed.toml", &hashed);
    let (code, out, err) = tool(&["plan", "--from", path(&from), "--to", path(&to), "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(plan_moves(&out), expected);
    // Killed once between deletes: the rerun must not take the rows copied
    // into a shard for rows to delete from it. This run copies in text format.
    apply_killed_at(
        "delete:3",
        &[
            "apply",
            "--from",
            path(&from),
            "--to",
            path(&to),
            "--writes-stopped",
            "--chunk-rows",
            "4000",
            "--format",
            "text",
        ],
    );
    let (code, out, err) = tool(&[
        "apply",
        "--from",
        path(&from),
        "--to",
        path(&to),
        "--writes-stopped",
        "--chunk-rows",
        "4000",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(content(&env, &[0, 1]), before);
    assert_placed(&env, &[0, 1], &hashed);
    let (code, out, _) = tool(&["verify", "--config", path(&to)]);
    assert_eq!(code, 0, "{out}");
    // The old placement is now wrong on both shards, and verify says so.
    let (code, out, _) = tool(&[
        "verify",
        "--config",
        path(&files.dir.join("ring.toml.before-rebalance")),
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("misplaced rows"), "{out}");
}

/// A seeded sequence of moves between four placements (two shards; three;
/// three with another sharding function; two with a different second
/// shard), each interrupted at random points before it is run to the end:
/// the tool killed while it copies, verifies, deletes or removes its
/// records, or an abort killed halfway and then finished (refused once
/// rows were deleted). After every move each row exists exactly once over
/// all shards, on its owner under the new config; shards outside the
/// config hold no sharded row; reference tables are identical on the
/// config's shards; no record is left; `verify` is clean.
/// `SHARDLINE_REBALANCE_SEED` and `SHARDLINE_REBALANCE_MOVES` (default 7
/// and 4) make a longer run, e.g. `SHARDLINE_REBALANCE_MOVES=30`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_moves_killed_at_random_points_lose_nothing() {
    let var = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let seed = var("SHARDLINE_REBALANCE_SEED", 7);
    let moves = var("SHARDLINE_REBALANCE_MOVES", 4);
    let env = start(3).await;
    let files = TempDir::new("rebalance-random");
    // s2 is outside the first placement: its tables exist up front.
    for stmt in SCHEMA.split(';').filter(|s| !s.trim().is_empty()) {
        env.sql_shard(2, stmt);
    }
    env.sql_shard(2, "GRANT ALL ON ALL TABLES IN SCHEMA public TO app");
    let hashed = TABLES.replace("function = \"consistent\"", "function = \"pg_hash\"");
    let placements: Vec<(&str, Vec<usize>, String)> = vec![
        ("s0+s1", vec![0, 1], env.shards_config(&[0, 1], TABLES)),
        (
            "s0+s1+s2",
            vec![0, 1, 2],
            env.shards_config(&[0, 1, 2], TABLES),
        ),
        (
            "s0+s1+s2 pg_hash",
            vec![0, 1, 2],
            env.shards_config(&[0, 1, 2], &hashed),
        ),
        ("s0+s2", vec![0, 2], env.shards_config(&[0, 2], TABLES)),
    ];
    load(&placements[0].2).await;
    let before = content(&env, &[0, 1, 2]);
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut current = 0;
    for m in 0..moves {
        let next = loop {
            let n = rng.below(placements.len());
            if n != current {
                break n;
            }
        };
        let from = files.write(&format!("move{m}.toml"), &placements[current].2);
        let to = files.write(&format!("move{m}-to.toml"), &placements[next].2);
        let apply = [
            "apply",
            "--from",
            path(&from),
            "--to",
            path(&to),
            "--writes-stopped",
            "--chunk-rows",
            "6000",
        ];
        let abort = ["abort", "--from", path(&from), "--to", path(&to)];
        let mut story = vec![format!(
            "move {m}: {} -> {}",
            placements[current].0, placements[next].0
        )];
        let mut done = false;
        for _ in 0..rng.below(4) {
            let point = match rng.below(6) {
                0 => format!("copy:{}", 1 + rng.below(8)),
                1 => "verify".to_string(),
                2 => format!("delete:{}", 1 + rng.below(10)),
                3 => "finish".to_string(),
                _ => "abort".to_string(),
            };
            story.push(point.clone());
            if point != "abort" {
                if let Killed::Ended(code, err) = killed_at_if_reached(&point, &apply) {
                    assert_eq!(code, 0, "{}: {err}", story.join(", "));
                    done = true;
                    break;
                }
                continue;
            }
            // Copies made, then an abort killed halfway, then finished.
            if let Killed::Ended(code, err) = killed_at_if_reached("verify", &apply) {
                assert_eq!(code, 0, "{}: {err}", story.join(", "));
                done = true;
                break;
            }
            let halfway = format!("abort:{}", 1 + rng.below(6));
            let refused = match killed_at_if_reached(&halfway, &abort) {
                Killed::There => {
                    let (code, out, err) = tool(&abort);
                    assert_eq!(code, 0, "{}: {out}{err}", story.join(", "));
                    false
                }
                Killed::Ended(0, _) => false,
                Killed::Ended(_, err) => {
                    assert!(
                        err.contains("cannot be undone, only finished"),
                        "{}: {err}",
                        story.join(", ")
                    );
                    true
                }
            };
            if !refused {
                // Undone: the old placement is intact, nothing recorded.
                assert_eq!(content(&env, &[0, 1, 2]), before, "{}", story.join(", "));
                assert_placed(&env, &placements[current].1, &placements[current].2);
                assert_no_records(&env, &[0, 1, 2]);
            }
        }
        if !done {
            let (code, out, err) = tool(&apply);
            assert_eq!(code, 0, "{}: {out}\n{err}", story.join(", "));
        }
        println!("{}", story.join(", "));
        let what = story.join(", ");
        assert_eq!(content(&env, &[0, 1, 2]), before, "{what}");
        let (shards, config) = (&placements[next].1, &placements[next].2);
        assert_placed(&env, shards, config);
        for s in (0..3).filter(|s| !shards.contains(s)) {
            for (t, c) in SHARDED {
                assert!(
                    keys_on(&env, s, t, c).is_empty(),
                    "{what}: {t} left on s{s}"
                );
            }
        }
        let countries: Vec<String> = shards
            .iter()
            .map(|&s| {
                env.sql_shard(
                    s,
                    "SELECT count(*) || ' ' || sum(hashtext(c::text)::int8) FROM countries c",
                )
            })
            .collect();
        assert!(
            countries.windows(2).all(|w| w[0] == w[1]),
            "{what}: {countries:?}"
        );
        assert_no_records(&env, &[0, 1, 2]);
        assert_eq!(std::fs::read_to_string(&from).unwrap(), *config, "{what}");
        let (code, out, err) = tool(&["verify", "--config", path(&to)]);
        assert_eq!(code, 0, "{what}: {out}{err}");
        current = next;
    }
}

/// The tool's sessions commit synchronously and give up on a held lock,
/// whatever the server's defaults: a delete receipt it saw committed must
/// survive a crash (with `synchronous_commit = off` a source lost its
/// delete and rows were duplicated), and a lock held elsewhere must not
/// stall a run unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tools_sessions_commit_synchronously_and_time_out_on_locks() {
    use shardline_rebalance::db::{Login, Servers};
    let env = start(1).await;
    env.sql_shard(
        0,
        "ALTER SYSTEM SET synchronous_commit = off; ALTER SYSTEM SET lock_timeout = 0; SELECT pg_reload_conf()",
    );
    env.wait_sql_on(env.shard_primary(0), "SHOW synchronous_commit", "off")
        .await;
    let node = shardline_config::Node {
        host: "127.0.0.1".into(),
        port: env.node_port(0),
        zone: None,
    };
    let login = Login {
        user: "app".into(),
        password: Some("app".into()),
        database: "app".into(),
    };
    let servers = Servers::connect(&["s0".into()], &[node], &[0], &login)
        .await
        .expect("connect");
    let c = servers.get(0).await.unwrap();
    let show = |name: &'static str| {
        let c = &c;
        async move {
            let row = c.query_one(&format!("SHOW {name}"), &[]).await.unwrap();
            row.get::<_, String>(0)
        }
    };
    assert_eq!(show("synchronous_commit").await, "on");
    assert_eq!(show("lock_timeout").await, "30s");
    env.sql_shard(0, "ALTER SYSTEM RESET ALL; SELECT pg_reload_conf()");
}

/// What one client of the load saw.
#[derive(Default)]
struct ClientLog {
    /// Increments acknowledged, by key.
    acked: BTreeMap<i64, i64>,
    failed: Vec<String>,
    /// The longest a transaction took (a client held by PAUSE waits).
    longest: Duration,
}

/// `clients` clients on `port` incrementing random keys of `accts` in
/// transactions (and reading one now and then) until `stop` is set.
fn run_load(
    port: u16,
    clients: usize,
    rows: i64,
    seed: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<ClientLog>> {
    (0..clients)
        .map(|i| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut log = ClientLog::default();
                let mut rng = Rng(seed + i as u64);
                let conn = format!("host=127.0.0.1 port={port} user=app password=app dbname=app");
                let (c, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
                    .await
                    .expect("a load client");
                tokio::spawn(connection);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = 1 + rng.below(rows as usize) as i64;
                    let started = Instant::now();
                    let sql = if rng.chance(20) {
                        format!("SELECT n FROM accts WHERE id = {key}")
                    } else {
                        format!("BEGIN; UPDATE accts SET n = n + 1 WHERE id = {key}; COMMIT")
                    };
                    match c.batch_execute(&sql).await {
                        Ok(()) if sql.starts_with("BEGIN") => {
                            *log.acked.entry(key).or_default() += 1;
                        }
                        Ok(()) => {}
                        Err(e) => log.failed.push(format!("{sql}: {e}")),
                    }
                    log.longest = log.longest.max(started.elapsed());
                }
                log
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_with_admin_holds_two_proxies_clients_instead_of_failing_them() {
    const ROWS: i64 = 20_000;
    let env = start(3).await;
    let files = TempDir::new("rebalance-admin");
    let tables = "[sharding]\nfunction = \"consistent\"\n\n[[sharding.tables]]\nname = \"accts\"\ncolumn = \"id\"\n\n[admin]\nusers = [\"app\"]\n";
    let two = env.shards_config(&[0, 1], tables);
    let three = env.shards_config(&[0, 1, 2], tables);
    let config = files.write("shardline.toml", &two);
    let new = files.write("new.toml", &three);
    for s in 0..3 {
        env.sql_shard(
            s,
            "CREATE TABLE accts (id bigint PRIMARY KEY, n bigint NOT NULL DEFAULT 0); GRANT ALL ON accts TO app;",
        );
    }
    // Two proxies on the one config file (each on its own port), and a
    // third on a file of its own that the move leaves out.
    let (a, client) = shardline_tests::ProxyProcess::start_file(&config).await;
    let (b, _) = shardline_tests::ProxyProcess::start_file(&config).await;
    let left_out_config = files.write("left-out.toml", &two);
    let (left_out, left_out_client) =
        shardline_tests::ProxyProcess::start_file(&left_out_config).await;
    for chunk in (1..=ROWS).collect::<Vec<_>>().chunks(2_000) {
        let values: Vec<String> = chunk.iter().map(|k| format!("({k})")).collect();
        client
            .batch_execute(&format!(
                "INSERT INTO accts (id) VALUES {}",
                values.join(",")
            ))
            .await
            .expect("rows on both shards");
    }

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = run_load(a.port, 8, ROWS, 1, stop.clone());
    load.extend(run_load(b.port, 8, ROWS, 100, stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let admin = |p: u16| format!("postgres://app:app@127.0.0.1:{p}/shardline");
    let args = [
        "apply".to_string(),
        "--from".into(),
        path(&config).into(),
        "--to".into(),
        path(&new).into(),
        "--admin".into(),
        admin(a.port),
        "--admin".into(),
        admin(b.port),
    ];
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tool(&args)
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("paused 2 proxies"), "{out}");
    assert!(
        out.contains("2 proxies reloaded with the new placement"),
        "{out}"
    );
    // Traffic goes on through the new placement, then stops.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked: BTreeMap<i64, i64> = BTreeMap::new();
    let mut longest = Vec::new();
    for task in load {
        let log = task.await.unwrap();
        assert!(
            log.failed.is_empty(),
            "a client saw errors: {:?}",
            log.failed
        );
        for (k, n) in log.acked {
            *acked.entry(k).or_default() += n;
        }
        longest.push(log.longest);
    }
    // Every row once, on the shard the new config places it, with every
    // acknowledged increment.
    let sharding = Sharding::from_config(&Config::from_toml(&three, "new.toml").unwrap());
    let group = &sharding.groups[sharding.tables["accts"].group];
    let mut stored: BTreeMap<i64, i64> = BTreeMap::new();
    let mut on_s2 = 0;
    for s in 0..3 {
        let rows = env.sql_shard(s, "SELECT id || ':' || n FROM accts");
        for line in rows.lines().filter(|l| !l.is_empty()) {
            let (id, n) = line.split_once(':').unwrap();
            let previous = stored.insert(id.parse().unwrap(), n.parse().unwrap());
            assert!(previous.is_none(), "row {id} is on two shards");
            let key = group.key_from_text(id).expect("key parses");
            let owner = group.shard_of(Some(&key)).unwrap();
            assert_eq!(sharding.shard_names[owner], format!("s{s}"), "row {id}");
            on_s2 += usize::from(s == 2);
        }
    }
    assert_eq!(stored.len() as i64, ROWS);
    assert!(on_s2 > 0, "rows moved to the new shard");
    for (k, n) in &stored {
        assert_eq!(*n, acked.get(k).copied().unwrap_or(0), "key {k}");
    }
    // The proxy left out of --admin runs the old placement: it refuses
    // instead of answering from it (its health check reads the placement
    // the shards record), until it is reloaded with the new config.
    let probe = "SELECT n FROM accts WHERE id = 1";
    let started = Instant::now();
    let e = loop {
        if let Err(e) = left_out_client.simple_query(probe).await {
            break e;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the left-out proxy still answers from the old placement"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        shardline_tests::sqlstate(&e).as_deref(),
        Some("55000"),
        "{e}"
    );
    let msg = e.as_db_error().unwrap();
    assert!(
        msg.message().contains("was not reloaded"),
        "{}",
        msg.message()
    );
    assert!(msg.hint().unwrap_or("").contains("RELOAD"), "{e}");
    std::fs::write(&left_out_config, &three).unwrap();
    let (ok, reload) = shardline_tests::psql(&admin(left_out.port), &["-c", "RELOAD"]);
    assert!(ok, "{reload}");
    let rows = left_out_client
        .simple_query(probe)
        .await
        .expect("reloaded, it answers");
    assert!(rows.len() >= 2, "{rows:?}");

    longest.sort();
    let writes: i64 = acked.values().sum();
    eprintln!(
        "apply --admin under load: {writes} increments acknowledged, none failed; longest transaction per client: median {:?}, max {:?}; {}",
        longest[longest.len() / 2],
        longest[longest.len() - 1],
        out.lines().last().unwrap_or("")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_with_admin_that_fails_before_deleting_resumes_the_proxies() {
    let env = start(3).await;
    let files = TempDir::new("rebalance-admin-fails");
    let tables = "[sharding]\nfunction = \"consistent\"\n\n[[sharding.tables]]\nname = \"accts\"\ncolumn = \"id\"\n\n[admin]\nusers = [\"app\"]\n";
    let two = env.shards_config(&[0, 1], tables);
    let config = files.write("shardline.toml", &two);
    let new = files.write("new.toml", &env.shards_config(&[0, 1, 2], tables));
    // The new shard has no table and --create-tables is not given: the
    // run stops before it copies anything.
    for s in 0..2 {
        env.sql_shard(
            s,
            "CREATE TABLE accts (id bigint PRIMARY KEY, n bigint NOT NULL DEFAULT 0); GRANT ALL ON accts TO app;",
        );
    }
    let (proxy, client) = shardline_tests::ProxyProcess::start_file(&config).await;
    client
        .batch_execute("INSERT INTO accts (id) VALUES (1), (2), (3), (4)")
        .await
        .unwrap();
    let admin = format!("postgres://app:app@127.0.0.1:{}/shardline", proxy.port);
    let args = [
        "apply",
        "--from",
        path(&config),
        "--to",
        path(&new),
        "--admin",
        &admin,
    ];
    let (code, out, err) = tool(&args);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("paused 1 proxies"), "{out}");
    assert!(
        err.contains("--create-tables")
            && err.contains("the proxies are resumed on the old config"),
        "{err}"
    );
    // Not paused: a write runs at once, on the old placement, which the
    // shards still hold (nothing recorded a new one).
    let started = Instant::now();
    client
        .batch_execute("UPDATE accts SET n = n + 1 WHERE id = 1")
        .await
        .expect("the proxy is resumed");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        env.sql_shard(
            0,
            "SELECT to_regclass('shardline_placement.current') IS NULL"
        ),
        "t"
    );
    // The rows are where they were.
    let held: i64 = (0..2)
        .map(|s| {
            env.sql_shard(s, "SELECT count(*) FROM accts")
                .parse::<i64>()
                .unwrap()
        })
        .sum();
    assert_eq!(held, 4);

    // A failure after rows were deleted (here: the new config cannot be
    // written): the proxies stay paused, and the tool says what to run.
    env.sql_shard(
        2,
        "CREATE TABLE accts (id bigint PRIMARY KEY, n bigint NOT NULL DEFAULT 0); GRANT ALL ON accts TO app;",
    );
    let nowhere = files.path("missing-dir").join("shardline.toml");
    let mut args = args.to_vec();
    args.extend(["--config-out", path(&nowhere)]);
    let (code, out, err) = tool(&args);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("the proxies stay paused") && err.contains("Run the same apply again"),
        "{err}"
    );
    let (ok, shards) = shardline_tests::psql(&admin, &["-Atc", "SHOW SHARDS"]);
    assert!(ok, "{shards}");
    assert!(
        shards.lines().all(|l| l.split('|').nth(10) == Some("1")),
        "every shard paused: {shards}"
    );
    // Run again as told: it finishes (the config written), reloads and resumes.
    let (code, out, err) = tool(&args[..args.len() - 2]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1 proxies reloaded"), "{out}");
    client
        .batch_execute("UPDATE accts SET n = n + 1 WHERE id = 2")
        .await
        .expect("resumed on the new placement");
}

/// `clients` clients each sending `each` reads of `orders` through the
/// proxy on `port`, a `hot_percent` share of them for key 42 and the rest
/// for keys spread over 1..=`keys`; half prepared (a Bind's parameter),
/// half simple queries (a constant).
async fn skewed_reads(port: u16, clients: u64, each: usize, keys: usize, hot_percent: u64) {
    let mut tasks = Vec::new();
    for i in 0..clients {
        tasks.push(tokio::spawn(async move {
            let conn = format!("host=127.0.0.1 port={port} user=app password=app dbname=app");
            let (c, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
                .await
                .expect("a load client");
            tokio::spawn(connection);
            let by_key = c
                .prepare("SELECT count(*) FROM orders WHERE user_id = $1")
                .await
                .unwrap();
            let mut rng = Rng(1000 + i);
            for n in 0..each {
                let key = if rng.chance(hot_percent) {
                    42
                } else {
                    1 + rng.below(keys) as i64
                };
                if n % 2 == 0 {
                    c.query_one(&by_key, &[&key])
                        .await
                        .expect("a prepared read");
                } else {
                    c.simple_query(&format!(
                        "SELECT count(*) FROM orders WHERE user_id = {key}"
                    ))
                    .await
                    .expect("a simple read");
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// SHOW HOT_KEYS through the console at `admin`: rows of
/// (group, key, shard, statements, group_percent).
fn show_hot_keys(admin: &str) -> Vec<(String, String, String, i64, f64)> {
    let (ok, out) = shardline_tests::psql(admin, &["-Atc", "SHOW HOT_KEYS"]);
    assert!(ok, "{out}");
    out.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            (
                f[0].to_string(),
                f[1].to_string(),
                f[2].to_string(),
                f[3].parse().unwrap(),
                f[5].parse().unwrap(),
            )
        })
        .collect()
}

/// The celebrity-key fix end to end: under a load where one key takes
/// 40% of the statements, SHOW HOT_KEYS names it; pinning it to a shard of
/// its own (weight 0: no other key goes there) and `apply --admin` moves
/// that key's rows and nothing else; the reloaded proxy serves the key
/// from its new shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_the_report_names_moves_to_a_shard_of_its_own() {
    const KEYS: i64 = 500;
    let env = start(3).await;
    let files = TempDir::new("rebalance-hot-key");
    let tables = "[sharding]\nfunction = \"consistent\"\n\n[[sharding.tables]]\nname = \"orders\"\ncolumn = \"user_id\"\n\n[admin]\nusers = [\"app\"]\n";
    let two = env.shards_config(&[0, 1], tables);
    let pinned_tables = tables.replace(
        "function = \"consistent\"\n",
        "function = \"consistent\"\npinned = [{ key = 42, shard = \"s2\" }]\n",
    );
    let three = env
        .shards_config(&[0, 1, 2], &pinned_tables)
        .replace("name = \"s2\"\n", "name = \"s2\"\nweight = 0\n");
    let config = files.write("shardline.toml", &two);
    let new = files.write("new.toml", &three);
    for s in 0..3 {
        env.sql_shard(
            s,
            "CREATE TABLE orders (user_id bigint NOT NULL, id bigint NOT NULL, PRIMARY KEY (user_id, id)); GRANT ALL ON orders TO app;",
        );
    }
    let (proxy, client) = shardline_tests::ProxyProcess::start_file(&config).await;
    // Key 42 has 50 orders; every other key 3.
    let rows: Vec<String> = (1..=KEYS)
        .flat_map(|k| (0..if k == 42 { 50 } else { 3 }).map(move |i| format!("({k}, {i})")))
        .collect();
    client
        .batch_execute(&format!(
            "INSERT INTO orders (user_id, id) VALUES {}",
            rows.join(",")
        ))
        .await
        .expect("rows on both shards");
    let admin = format!("postgres://app:app@127.0.0.1:{}/shardline", proxy.port);
    let sharding = |text: &str| Sharding::from_config(&Config::from_toml(text, "t").unwrap());
    let (old, pinned) = (sharding(&two), sharding(&three));
    let owner = |sh: &Sharding, k: i64| {
        sh.shard_names[sh.groups[0].shard_of(Some(&KeyValue::Int(k))).unwrap()].clone()
    };
    let hot_home = owner(&old, 42);

    skewed_reads(proxy.port, 8, 300, KEYS as usize, 40).await;
    let report = show_hot_keys(&admin);
    println!("SHOW HOT_KEYS under the skewed load: {report:?}");
    let top = &report[0];
    assert_eq!(
        (top.0.as_str(), top.1.as_str()),
        ("default", "42"),
        "{report:?}"
    );
    assert_eq!(top.2, hot_home);
    assert!(top.4 >= 30.0, "key 42 takes at least 30%: {report:?}");
    assert!(
        report[1..].iter().all(|r| r.4 < 5.0),
        "no other key is hot: {report:?}"
    );
    let (ok, skew) = shardline_tests::psql(&admin, &["-Atc", "SHOW SKEW"]);
    assert!(ok, "{skew}");
    let share = |shard: &str| -> f64 {
        let line = skew
            .lines()
            .find(|l| l.starts_with(&format!("{shard}|")))
            .expect(shard);
        line.split('|').nth(2).unwrap().parse().unwrap()
    };
    let other = if hot_home == "s0" { "s1" } else { "s0" };
    assert!(share(&hot_home) > share(other) + 20.0, "{skew}");

    // The plan moves key 42's 50 rows to s2, and nothing else.
    let (code, out, err) = tool(&[
        "plan",
        "--from",
        path(&config),
        "--to",
        path(&new),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let moves = plan_moves(&out);
    assert_eq!(
        moves,
        BTreeMap::from([(
            ("orders".to_string(), hot_home.clone(), "s2".to_string()),
            50
        )]),
        "{out}"
    );
    for k in (1..=KEYS).filter(|k| *k != 42) {
        assert_eq!(owner(&pinned, k), owner(&old, k), "key {k} stays");
    }
    let (code, out, err) = tool(&[
        "apply",
        "--from",
        path(&config),
        "--to",
        path(&new),
        "--admin",
        &admin,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("1 proxies reloaded with the new placement"),
        "{out}"
    );

    // Only key 42's rows are on s2; every row is still there once.
    assert_eq!(
        env.sql_shard(
            2,
            "SELECT count(*) || ' ' || count(DISTINCT user_id) || ' ' || min(user_id) FROM orders"
        ),
        "50 1 42"
    );
    let total: i64 = (0..3)
        .map(|s| {
            env.sql_shard(s, "SELECT count(*) FROM orders")
                .parse::<i64>()
                .unwrap()
        })
        .sum();
    assert_eq!(total, (KEYS - 1) * 3 + 50);
    // Through the reloaded proxy the key is read and written on s2.
    let n: i64 = client
        .query_one("SELECT count(*) FROM orders WHERE user_id = $1", &[&42i64])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 50);
    client
        .batch_execute("INSERT INTO orders (user_id, id) VALUES (42, 1000)")
        .await
        .unwrap();
    assert_eq!(
        env.sql_shard(
            2,
            "SELECT count(*) FROM orders WHERE user_id = 42 AND id = 1000"
        ),
        "1"
    );
    // The report starts again on the new placement, and names the key's
    // new shard.
    skewed_reads(proxy.port, 2, 100, KEYS as usize, 40).await;
    let report = show_hot_keys(&admin);
    assert_eq!(
        (report[0].1.as_str(), report[0].2.as_str()),
        ("42", "s2"),
        "{report:?}"
    );
}

/// The tool's lock is a server session's: a run that has just failed
/// frees it only once the server has seen its connections close, a moment
/// after the tool dropped them. The tool then reads what that run left
/// (whether deletes began, to resume the proxies or keep them paused) with
/// a run of its own: taking the lock failed at once, which kept the
/// proxies paused after a failure that deleted nothing. A lock freed
/// within the wait (3 s) is taken; one held longer is another run's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tools_lock_is_awaited_briefly_before_another_run_is_named() {
    /// `apply.rs::RUN_LOCK`.
    const RUN_LOCK: i64 = 0x5368_6172_646c_696e;
    let env = start(2).await;
    let files = TempDir::new("rebalance-lock");
    let tables = "[sharding]\nfunction = \"consistent\"\n\n[[sharding.tables]]\nname = \"accts\"\ncolumn = \"id\"\n";
    for s in 0..2 {
        env.sql_shard(
            s,
            "CREATE TABLE accts (id bigint PRIMARY KEY); GRANT ALL ON accts TO app;",
        );
    }
    let old = files.write("old.toml", &env.shards_config(&[0], tables));
    let new = files.write("new.toml", &env.shards_config(&[0, 1], tables));
    let args: Vec<String> = ["abort", "--from", path(&old), "--to", path(&new)]
        .map(String::from)
        .to_vec();
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            tool(&args)
        })
    };
    let hold = || async {
        let c = env.connect_shard(0).await;
        let held: bool = c
            .query_one("SELECT pg_try_advisory_lock($1)", &[&RUN_LOCK])
            .await
            .unwrap()
            .get(0);
        assert!(held);
        c
    };
    // Freed once the run has asked for it: taken, and the run goes on
    // (nothing is recorded, so abort says there is nothing to undo).
    let holder = hold().await;
    let holder_pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let watcher = env.connect_shard(0).await;
    let aborting = run(args.clone());
    let started = Instant::now();
    loop {
        let asked: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_try_advisory_lock%' AND pid NOT IN ($1, pg_backend_pid())",
                &[&holder_pid],
            )
            .await
            .unwrap()
            .get(0);
        // (A run that does not wait is over before it is seen.)
        if asked > 0 || aborting.is_finished() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the run never asked for the lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(holder);
    let (code, out, err) = aborting.await.unwrap();
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("nothing to abort"), "{err}");
    // Held throughout: another run's.
    let holder = hold().await;
    let (code, out, err) = run(args).await.unwrap();
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("another shardline-rebalance is running"),
        "{err}"
    );
    drop(holder);
}
