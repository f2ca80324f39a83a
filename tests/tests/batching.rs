//! Every way drivers batch the extended protocol, against two shards: each
//! unit is placed by the key it really carries, whatever arrives together.
//! Rows are audited on the servers themselves (each row on the shard that
//! owns its key), and reads by key must find every row.
//!
//! The batchings are the ones real drivers send: a named Parse with its
//! Bind in one unit (PgJDBC past prepareThreshold, node-postgres named
//! queries, psycopg pipelines), Parse+Describe+Flush and the Bind in the
//! next unit (asyncpg), the unnamed statement the same way (asyncpg with
//! `statement_cache_size=0`), binary parameters, and parameters whose type
//! is not the key's.

use shardline_config::Config;
use shardline_router::hash::KeyValue;
use shardline_router::sharding::Sharding;
use shardline_tests::wire::{self, bind, describe, execute, flush, parse, query, sync};
use shardline_tests::{error_code, tags, Env, EnvOptions, RawClient, RawMessage};
use std::time::Duration;

const SHARDING: &str = r#"
[sharding]
function = "consistent"

[[sharding.tables]]
name = "users"
column = "id"
"#;

async fn two_shards() -> (Env, Sharding) {
    two_shards_with(SHARDING).await
}

async fn two_shards_with(sharding: &str) -> (Env, Sharding) {
    shards_with(2, sharding).await
}

/// `SHARDING` with two-phase commit: transactions may span shards.
fn two_phase() -> String {
    SHARDING.replace(
        "function = \"consistent\"",
        "function = \"consistent\"\ntwo_phase_commit = true",
    )
}

/// `shards` shards with `sharding`, and the table `users` through the proxy.
async fn shards_with(shards: usize, sharding: &str) -> (Env, Sharding) {
    replicated_shards_with(shards, 0, sharding).await
}

/// As `shards_with`, each shard with `replicas` streaming replicas.
async fn replicated_shards_with(shards: usize, replicas: usize, sharding: &str) -> (Env, Sharding) {
    let env = Env::start_with(EnvOptions {
        shards,
        replicas_per_shard: replicas,
        extra_toml: sharding.into(),
        ..EnvOptions::default()
    })
    .await
    .expect("the shards");
    let c = env.connect().await;
    c.batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, name text)")
        .await
        .expect("DDL through the proxy");
    let sh = Sharding::from_config(&Config::from_toml(&env.config_text, "t").expect("config"));
    (env, sh)
}

fn owner(sh: &Sharding, k: i64) -> usize {
    sh.groups[0]
        .shard_of(Some(&KeyValue::Int(k)))
        .expect("shard")
}

/// The first `n` keys that shard `s` owns.
fn keys_on(sh: &Sharding, s: usize, n: usize) -> Vec<i64> {
    (1..).filter(|&k| owner(sh, k) == s).take(n).collect()
}

/// Every row of `users` on the shard owning its key; how many there are.
fn audit(env: &Env, sh: &Sharding) -> usize {
    shardline_tests::audit_users(env, sh, 2).len()
}

/// Inserts users `keys` through the proxy.
async fn insert_users(env: &Env, keys: std::ops::RangeInclusive<i64>) {
    let c = env.connect().await;
    for k in keys {
        c.execute("INSERT INTO users (id, name) VALUES ($1, 'x')", &[&k])
            .await
            .unwrap();
    }
}

/// Reads messages until one with tag `until` (inclusive).
async fn until_tag(c: &mut RawClient, until: u8) -> Vec<RawMessage> {
    let mut out = Vec::new();
    loop {
        let m = c
            .recv(Duration::from_secs(10))
            .await
            .expect("an answer")
            .expect("connection open");
        let done = m.0 == until;
        out.push(m);
        if done {
            return out;
        }
    }
}

/// A bound parameter: format and value.
type Param<'a> = (i16, Option<&'a [u8]>);

const INSERT: &str = "INSERT INTO users (id, name) VALUES ($1, $2)";

fn text(k: i64) -> Vec<u8> {
    k.to_string().into_bytes()
}

/// A named Parse with its Bind, Parse+Describe+Flush then Bind, the unnamed
/// statement the same way, a statement prepared once and bound in later
/// units, binary parameters: every row lands on its key's shard, and a read
/// by key (batched the same ways) finds each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_batching_places_rows_by_key() {
    let (env, sh) = two_shards().await;
    let mut c = RawClient::login(env.port).await.unwrap();
    let name = |k: i64| format!("user {k}").into_bytes();
    // Named Parse, Bind, Execute, Sync in one write (JDBC, node-postgres).
    for k in 1..=20i64 {
        let stmt = format!("ins{k}");
        let r = c
            .exchange(&[
                parse(&stmt, INSERT, &[]),
                bind(&stmt, &[(0, Some(&text(k))), (0, Some(&name(k)))], 0),
                execute(),
                sync(),
            ])
            .await
            .unwrap();
        assert_eq!(tags(&r), b"12CZ", "key {k}: {r:?}");
    }
    // Parse + Describe + Flush, answers read, then Bind + Execute + Sync:
    // asyncpg's first execution of every statement (named), and every
    // execution with statement_cache_size=0 (unnamed).
    for k in 21..=60i64 {
        let stmt = if k <= 40 {
            format!("flush{k}")
        } else {
            String::new()
        };
        c.send(&[parse(&stmt, INSERT, &[]), describe(b'S', &stmt), flush()].concat())
            .await
            .unwrap();
        let r = until_tag(&mut c, b'n').await;
        assert_eq!(tags(&r), b"1tn", "key {k}: {r:?}");
        let r = c
            .exchange(&[
                bind(&stmt, &[(0, Some(&text(k))), (0, Some(&name(k)))], 0),
                execute(),
                sync(),
            ])
            .await
            .unwrap();
        assert_eq!(tags(&r), b"2CZ", "key {k}: {r:?}");
    }
    // Prepared once with its first Bind, bound alone afterwards.
    for k in 61..=80 {
        let mut unit = Vec::new();
        if k == 61 {
            unit.push(parse("again", INSERT, &[]));
        }
        unit.extend([
            bind("again", &[(0, Some(&text(k))), (0, Some(&name(k)))], 0),
            execute(),
            sync(),
        ]);
        let r = c.exchange(&unit).await.unwrap();
        assert!(tags(&r).ends_with(b"2CZ"), "key {k}: {r:?}");
    }
    // Binary int8 parameters, declared, with the Parse.
    for k in 81..=100i64 {
        let stmt = format!("bin{k}");
        let r = c
            .exchange(&[
                parse(&stmt, INSERT, &[20, 25]),
                bind(
                    &stmt,
                    &[(1, Some(&k.to_be_bytes())), (0, Some(&name(k)))],
                    0,
                ),
                execute(),
                sync(),
            ])
            .await
            .unwrap();
        assert_eq!(tags(&r), b"12CZ", "key {k}: {r:?}");
    }
    assert_eq!(audit(&env, &sh), 100, "every row, each on its shard");
    // Reads by key, batched the same ways, find every row.
    let select = "SELECT name FROM users WHERE id = $1";
    for k in 1..=100i64 {
        let units: Vec<Vec<Vec<u8>>> = vec![
            vec![
                parse(&format!("sel{k}"), select, &[]),
                bind(&format!("sel{k}"), &[(0, Some(&text(k)))], 0),
                execute(),
                sync(),
            ],
            vec![
                parse("", select, &[20]),
                bind("", &[(1, Some(&k.to_be_bytes()))], 0),
                execute(),
                sync(),
            ],
        ];
        for unit in units {
            let r = c.exchange(&unit).await.unwrap();
            let rows: Vec<_> = r.iter().filter(|m| m.0 == b'D').collect();
            assert_eq!(rows.len(), 1, "key {k}: {r:?}");
        }
        c.send(&[parse("", select, &[]), describe(b'S', ""), flush()].concat())
            .await
            .unwrap();
        until_tag(&mut c, b'T').await;
        let r = c
            .exchange(&[bind("", &[(0, Some(&text(k)))], 0), execute(), sync()])
            .await
            .unwrap();
        assert_eq!(tags(&r), b"2DCZ", "key {k} after Flush: {r:?}");
    }
}

/// A Parse that fails before a Flush: the rest of the client's unit is
/// skipped up to its Sync, as a server skips it, and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_parse_before_flush_skips_to_sync() {
    let (env, _sh) = two_shards().await;
    let mut c = RawClient::login(env.port).await.unwrap();
    c.send(
        &[
            parse("bad", "SELECT * FROM no_such_table WHERE id = $1", &[]),
            describe(b'S', "bad"),
            flush(),
        ]
        .concat(),
    )
    .await
    .unwrap();
    let r = until_tag(&mut c, b'E').await;
    assert_eq!(error_code(&r[0].1), "42P01", "{r:?}");
    let r = c
        .exchange(&[bind("bad", &[(0, Some(b"1"))], 0), execute(), sync()])
        .await
        .unwrap();
    assert_eq!(tags(&r), b"Z", "skipped to Sync: {r:?}");
    let r = c.exchange(&[query("SELECT 1")]).await.unwrap();
    assert_eq!(tags(&r), b"TDCZ", "{r:?}");
}

/// A parameter whose type is not the key's is read as what it is: a
/// binary float8 `5.0`, a binary text compared with `id::text`, a numeric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_are_read_as_their_own_type() {
    let (env, sh) = two_shards().await;
    insert_users(&env, 1..=40).await;
    assert_eq!(audit(&env, &sh), 40);
    let mut raw = RawClient::login(env.port).await.unwrap();
    for k in 1..=40i64 {
        let f = (k as f64).to_be_bytes();
        let t = text(k);
        let numeric_text = format!("{k}.0").into_bytes();
        let cases: Vec<(&str, &[u32], Param)> = vec![
            ("SELECT id FROM users WHERE id = $1", &[701], (1, Some(&f))),
            (
                "SELECT id FROM users WHERE id = $1::float8",
                &[],
                (1, Some(&f)),
            ),
            (
                "SELECT id FROM users WHERE id::text = $1",
                &[],
                (1, Some(&t)),
            ),
            (
                "SELECT id FROM users WHERE id::text = $1",
                &[25],
                (1, Some(&t)),
            ),
            (
                "SELECT id FROM users WHERE id = $1",
                &[1700],
                (0, Some(&numeric_text)),
            ),
            (
                "SELECT id FROM users WHERE id = $1",
                &[701],
                (0, Some(&numeric_text)),
            ),
        ];
        for (sql, types, p) in cases {
            let r = raw
                .exchange(&[parse("", sql, types), bind("", &[p], 0), execute(), sync()])
                .await
                .unwrap();
            let rows: Vec<_> = r.iter().filter(|m| m.0 == b'D').collect();
            assert_eq!(rows.len(), 1, "{sql} {types:?} key {k}: {r:?}");
        }
    }
}

/// A BEGIN sent by the extended protocol in a unit of its own (pgbench's
/// extended and prepared modes): answered by the proxy as the server
/// answers it and held, as a lone simple BEGIN is, so the transaction's
/// first statement chooses its shard. Before, it went to the default
/// shard at once, and a transaction whose key lives on the other shard was
/// refused (without two-phase commit). Its text (the isolation level)
/// reaches the server; a named BEGIN is bound again in the next
/// transaction without its Parse; BEGIN then COMMIT commits nothing, and
/// the COMMIT, nothing having run, reaches no server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extended_begin_alone_is_held_for_the_first_statement() {
    let (env, sh) = two_shards().await;
    let on = |s: usize| keys_on(&sh, s, 2);
    let (a, b) = (on(0), on(1));
    let mut c = RawClient::login(env.port).await.unwrap();
    let row = |k: i64| {
        [
            parse("", INSERT, &[]),
            bind("", &[(0, Some(&text(k))), (0, Some(b"x"))], 0),
            execute(),
            sync(),
        ]
        .concat()
    };
    let commit = || {
        [
            parse("", "COMMIT", &[]),
            bind("", &[], 0),
            execute(),
            sync(),
        ]
        .concat()
    };
    for (i, k) in [b[0], a[0], b[1]].into_iter().enumerate() {
        // Unnamed, as pgbench -M extended; named and then bound alone, as
        // pgbench -M prepared (its Describe of the statement too).
        let begin = match i {
            0 => [
                parse("", "BEGIN", &[]),
                bind("", &[], 0),
                describe(b'P', ""),
                execute(),
                sync(),
            ]
            .concat(),
            1 => [
                parse("b", "BEGIN ISOLATION LEVEL REPEATABLE READ", &[]),
                describe(b'S', "b"),
                bind("b", &[], 0),
                execute(),
                sync(),
            ]
            .concat(),
            _ => [bind("b", &[], 0), describe(b'P', ""), execute(), sync()].concat(),
        };
        let r = c.exchange(&[begin]).await.unwrap();
        let expected: &[u8] = match i {
            0 => b"12nCZ",
            1 => b"1tn2CZ",
            _ => b"2nCZ",
        };
        assert_eq!(tags(&r), expected, "{r:?}");
        assert_eq!(status(&r), b'T');
        let r = c.exchange(&[row(k)]).await.unwrap();
        assert_eq!(tags(&r), b"12CZ", "key {k}: {r:?}");
        assert_eq!(status(&r), b'T');
        // (After the key chose the shard.)
        if i > 0 {
            let r = c
                .exchange(&[query("SHOW transaction_isolation")])
                .await
                .unwrap();
            assert_eq!(tags(&r), b"TDCZ", "{r:?}");
            assert!(
                String::from_utf8_lossy(&r[1].1).contains("repeatable read"),
                "the BEGIN's own text: {r:?}"
            );
        }
        let r = c.exchange(&[commit()]).await.unwrap();
        assert_eq!(tags(&r), b"12CZ", "{r:?}");
        assert_eq!(status(&r), b'I');
    }
    assert_eq!(audit(&env, &sh), 3, "each row on its key's shard");
    // A BEGIN whose Parse names a statement already prepared fails as the
    // server fails it: 42P05, no transaction.
    let r = c
        .exchange(&[[
            parse("b", "BEGIN", &[]),
            bind("b", &[], 0),
            execute(),
            sync(),
        ]
        .concat()])
        .await
        .unwrap();
    assert_eq!(tags(&r), b"EZ", "{r:?}");
    assert_eq!(error_code(&r[0].1), "42P05");
    assert_eq!(status(&r), b'I');
    // BEGIN, then COMMIT: nothing ran, the session goes on.
    let r = c
        .exchange(&[[bind("b", &[], 0), execute(), sync()].concat()])
        .await
        .unwrap();
    assert_eq!(tags(&r), b"2CZ", "{r:?}");
    let r = c.exchange(&[commit()]).await.unwrap();
    assert_eq!(status(&r), b'I', "{r:?}");
    let r = c.exchange(&[query("SELECT 1")]).await.unwrap();
    assert_eq!(tags(&r), b"TDCZ", "{r:?}");
    // The COMMIT (or ROLLBACK) of a transaction in which nothing ran is
    // answered by the proxy, as a simple one is: it reaches no server, so
    // it is answered with every primary down, its messages each answered
    // as a server answers them (its named statement kept).
    for s in 0..2 {
        env.backend
            .stop_node(env.shard_primary(s), "immediate")
            .unwrap();
    }
    for end in ["COMMIT", "ROLLBACK"] {
        let r = c
            .exchange(&[[bind("b", &[], 0), execute(), sync()].concat()])
            .await
            .unwrap();
        assert_eq!(tags(&r), b"2CZ", "{r:?}");
        let r = c
            .exchange(&[[
                parse("e", end, &[]),
                describe(b'S', "e"),
                bind("e", &[], 0),
                describe(b'P', ""),
                execute(),
                sync(),
            ]
            .concat()])
            .await
            .unwrap();
        assert_eq!(tags(&r), b"1tn2nCZ", "{end}: {r:?}");
        assert_eq!(String::from_utf8_lossy(&r[5].1), format!("{end}\0"));
        assert_eq!(status(&r), b'I');
        let r = c.exchange(&[query("DEALLOCATE e")]).await.unwrap();
        assert_eq!(tags(&r), b"CZ", "the Parse was recorded: {r:?}");
    }
}

/// Sends `bind` with an Execute and a Flush; the answers up to `until`.
async fn flushed(c: &mut RawClient, bind: Vec<u8>, until: u8) -> Vec<RawMessage> {
    c.send(&[bind, execute(), flush()].concat()).await.unwrap();
    until_tag(c, until).await
}

/// A pipeline that asks for results before its Sync (a Flush after an
/// Execute: psycopg's pipeline mode when a result is fetched) runs at
/// that Flush on its first execution's shard. Executions behind the Flush
/// run each on its key's shard: the other shard joins the pipeline, and
/// the Sync commits both; a failure on either rolls back both. After a
/// server's error at a Flush, the messages up to the Sync are skipped, as
/// the server skips them, and the session goes on. Where the unit cannot
/// take another shard (run on one connection: more than the proxy holds
/// before its Sync, or inside a transaction), an execution for the other
/// shard is refused (0A000) instead of being written to the wrong shard,
/// and what ran before it is rolled back, as after any error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_run_at_a_flush_places_each_later_row() {
    let (env, sh) = two_shards().await;
    let on = |s: usize| keys_on(&sh, s, 7);
    let (a, b) = (on(0), on(1));
    let row = |k: i64| bind("ins", &[(0, Some(&text(k))), (0, Some(b"p"))], 0);
    let mut c = RawClient::login(env.port).await.unwrap();
    c.send(&[parse("ins", INSERT, &[]), row(a[0]), execute(), flush()].concat())
        .await
        .unwrap();
    assert_eq!(tags(&until_tag(&mut c, b'C').await), b"12C");
    // The same shard behind the Flush: runs there, committed at the Sync.
    assert_eq!(tags(&flushed(&mut c, row(a[1]), b'C').await), b"2C");
    let r = c.exchange(&[sync()]).await.unwrap();
    assert_eq!(tags(&r), b"Z", "{r:?}");
    assert_eq!(audit(&env, &sh), 2, "both rows, on their shard");
    // The other shard behind the Flush: it joins, and the Sync commits
    // both shards' rows.
    assert_eq!(tags(&flushed(&mut c, row(a[3]), b'C').await), b"2C");
    assert_eq!(tags(&flushed(&mut c, row(b[3]), b'C').await), b"2C");
    let r = c.exchange(&[sync()]).await.unwrap();
    assert_eq!(tags(&r), b"Z", "{r:?}");
    assert_eq!(status(&r), b'I');
    assert_eq!(audit(&env, &sh), 4, "each row on its shard");
    // A failure on the shard that joined rolls back the first one's part;
    // the rest up to the Sync is skipped.
    assert_eq!(tags(&flushed(&mut c, row(a[4]), b'C').await), b"2C");
    let r = flushed(&mut c, row(b[3]), b'E').await;
    assert_eq!(tags(&r), b"2E");
    assert_eq!(error_code(&r[1].1), "23505", "{r:?}");
    let r = c.exchange(&[row(b[4]), execute(), sync()]).await.unwrap();
    assert_eq!(tags(&r), b"Z", "skipped to the Sync: {r:?}");
    assert_eq!(status(&r), b'I');
    assert_eq!(audit(&env, &sh), 4, "nothing of the failed pipeline stays");
    // A server's error at a Flush, then more messages before the Sync:
    // skipped (nothing of them is answered), one error, the session goes on.
    c.send(&[row(a[2]), execute(), row(a[0]), execute(), flush()].concat())
        .await
        .unwrap();
    let r = until_tag(&mut c, b'E').await;
    assert_eq!(tags(&r), b"2C2E", "{r:?}");
    assert_eq!(error_code(&r[3].1), "23505");
    c.send(&[row(b[2]), execute(), flush()].concat())
        .await
        .unwrap();
    let r = c.exchange(&[sync()]).await.unwrap();
    assert_eq!(tags(&r), b"Z", "{r:?}");
    let r = c
        .exchange(&[query("SELECT count(*) FROM users")])
        .await
        .unwrap();
    assert_eq!(tags(&r), b"TDCZ", "{r:?}");
    assert_eq!(audit(&env, &sh), 4, "the failed pipeline rolled back");
    // More than the proxy holds (1 MiB) before the Sync, all for one shard:
    // run there before the Sync arrives; an execution for the other shard
    // after it is refused the same way, and nothing of the unit stays.
    let on_a: Vec<i64> = (1..)
        .filter(|&k| owner(&sh, k) == 0)
        .skip(7)
        .take(12)
        .collect();
    let big = vec![b'x'; 100 << 10];
    let mut unit = Vec::new();
    for &k in &on_a {
        unit.push(bind("ins", &[(0, Some(&text(k))), (0, Some(&big))], 0));
        unit.push(execute());
    }
    c.send(&unit.concat()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = c.exchange(&[row(b[1]), execute(), sync()]).await.unwrap();
    let t = tags(&r);
    assert_eq!(&t[t.len() - 2..], b"EZ", "{t:?}");
    let e = r.iter().find(|m| m.0 == b'E').unwrap();
    assert_eq!(error_code(&e.1), "0A000", "{r:?}");
    assert_eq!(audit(&env, &sh), 4, "nothing of the unit stays");
    // Inside a transaction, the part run at the Flush is the transaction's
    // (its BEGIN, held until a statement runs, goes first): ROLLBACK
    // takes it back.
    let r = c.exchange(&[query("BEGIN")]).await.unwrap();
    assert_eq!(tags(&r), b"CZ");
    assert_eq!(tags(&flushed(&mut c, row(a[2]), b'C').await), b"2C");
    let r = c.exchange(&[sync()]).await.unwrap();
    assert_eq!(status(&r), b'T', "{r:?}");
    let r = c.exchange(&[query("ROLLBACK")]).await.unwrap();
    assert_eq!(status(&r), b'I');
    assert_eq!(audit(&env, &sh), 4, "rolled back with its transaction");
    // Inside a transaction: the refusal fails it, as an error would.
    let r = c.exchange(&[query("BEGIN")]).await.unwrap();
    assert_eq!(tags(&r), b"CZ");
    assert_eq!(tags(&flushed(&mut c, row(a[2]), b'C').await), b"2C");
    let r = flushed(&mut c, row(b[0]), b'E').await;
    assert_eq!(error_code(&r[0].1), "0A000", "{r:?}");
    let r = c.exchange(&[sync()]).await.unwrap();
    assert_eq!(status(&r), b'E', "{r:?}");
    let r = c.exchange(&[query("ROLLBACK")]).await.unwrap();
    assert_eq!(tags(&r), b"CZ");
    assert_eq!(status(&r), b'I');
    assert_eq!(audit(&env, &sh), 4);
    // The unnamed statement of an earlier part, bound on the shard that
    // joins: prepared there first.
    let unnamed = |k: i64| bind("", &[(0, Some(&text(k))), (0, Some(b"u"))], 0);
    c.send(&[parse("", INSERT, &[]), unnamed(a[5]), execute(), flush()].concat())
        .await
        .unwrap();
    assert_eq!(tags(&until_tag(&mut c, b'C').await), b"12C");
    assert_eq!(tags(&flushed(&mut c, unnamed(b[5]), b'C').await), b"2C");
    assert_eq!(tags(&flushed(&mut c, unnamed(a[6]), b'C').await), b"2C");
    let r = c.exchange(&[sync()]).await.unwrap();
    assert_eq!(tags(&r), b"Z", "{r:?}");
    assert_eq!(audit(&env, &sh), 7, "each row on its shard");
}

/// Reads acted on at a Flush (psycopg's pipeline mode fetching each row by
/// key) run each on its key's shard, the other shard joining the pipeline:
/// a read there finds its row. A write after them opens the proxy's
/// transaction on every leg (on the shard that only read so far too):
/// a duplicate on one shard rolls back the other's row, and without the
/// duplicate the Sync commits both. The unnamed statement of the reading
/// part, gone from its connection with the proxy's BEGIN, is prepared
/// there again when bound after it. Read with a row limit (pg-cursor),
/// the rest is fetched from the same shard. A first part on no sharded
/// table runs on the default shard, and the keys after it on theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_of_reads_at_a_flush_reads_each_key_on_its_shard() {
    let (env, sh) = two_shards().await;
    let on = |s: usize| keys_on(&sh, s, 6);
    let (a, b) = (on(0), on(1));
    let proxy = env.connect().await;
    for &k in &[a[0], a[1], b[0], b[1]] {
        proxy
            .execute("INSERT INTO users (id, name) VALUES ($1, 'r')", &[&k])
            .await
            .unwrap();
    }
    let select = "SELECT id FROM users WHERE id = $1";
    let sel = |name: &str, k: i64| bind(name, &[(0, Some(&text(k)))], 0);
    let row = |k: i64| bind("ins", &[(0, Some(&text(k))), (0, Some(b"w"))], 0);
    let mut c = RawClient::login(env.port).await.unwrap();
    c.send(
        &[
            parse("sel", select, &[]),
            sel("sel", a[0]),
            execute(),
            flush(),
        ]
        .concat(),
    )
    .await
    .unwrap();
    let r = until_tag(&mut c, b'C').await;
    assert_eq!((tags(&r), ids(&r)), (b"12DC".to_vec(), vec![a[0]]));
    for k in [b[0], a[1], b[1]] {
        let r = flushed(&mut c, sel("sel", k), b'C').await;
        assert_eq!((tags(&r), ids(&r)), (b"2DC".to_vec(), vec![k]), "key {k}");
    }
    let r = c.exchange(&[sync()]).await.unwrap();
    assert_eq!((tags(&r), status(&r)), (b"Z".to_vec(), b'I'), "{r:?}");
    // Reads, then writes on both shards, then a duplicate: nothing stays.
    // (The INSERT prepared apart: a part that prepares a write is planned
    // as a write.)
    let r = c
        .exchange(&[parse("ins", INSERT, &[]), sync()])
        .await
        .unwrap();
    assert_eq!(tags(&r), b"1Z");
    c.send(&[sel("sel", a[0]), execute(), flush()].concat())
        .await
        .unwrap();
    assert_eq!(tags(&until_tag(&mut c, b'C').await), b"2DC");
    assert_eq!(tags(&flushed(&mut c, row(b[2]), b'C').await), b"2C");
    assert_eq!(tags(&flushed(&mut c, row(a[2]), b'C').await), b"2C");
    let r = flushed(&mut c, row(b[0]), b'E').await;
    assert_eq!(error_code(&r.last().unwrap().1), "23505", "{r:?}");
    let r = c.exchange(&[sync()]).await.unwrap();
    assert_eq!((tags(&r), status(&r)), (b"Z".to_vec(), b'I'), "{r:?}");
    assert_eq!(audit(&env, &sh), 4, "nothing of the failed pipeline stays");
    // A read of the other shard first, then a write on the first read's
    // shard by the unnamed statement the reading part prepared.
    c.send(&[parse("", select, &[]), sel("", b[0]), execute(), flush()].concat())
        .await
        .unwrap();
    assert_eq!(tags(&until_tag(&mut c, b'C').await), b"12DC");
    let r = flushed(&mut c, sel("", a[0]), b'C').await;
    assert_eq!(ids(&r), vec![a[0]]);
    c.send(&[row(a[3]), execute(), sel("", b[1]), execute(), flush()].concat())
        .await
        .unwrap();
    let r = until_tag(&mut c, b'C').await;
    assert_eq!(tags(&r), b"2C");
    let r = until_tag(&mut c, b'C').await;
    assert_eq!((tags(&r), ids(&r)), (b"2DC".to_vec(), vec![b[1]]), "{r:?}");
    assert_eq!(tags(&flushed(&mut c, row(b[3]), b'C').await), b"2C");
    let r = c.exchange(&[sync()]).await.unwrap();
    assert_eq!((tags(&r), status(&r)), (b"Z".to_vec(), b'I'), "{r:?}");
    assert_eq!(audit(&env, &sh), 6, "both rows, each on its shard");
    // A read with a row limit (suspended after its row), fetched to its
    // end after the Flush: on the same shard.
    for k in [b[1], a[1]] {
        c.send(
            &[
                parse("", select, &[]),
                sel("", k),
                wire::execute_rows(1),
                flush(),
            ]
            .concat(),
        )
        .await
        .unwrap();
        let r = until_tag(&mut c, b's').await;
        assert_eq!((tags(&r), ids(&r)), (b"12Ds".to_vec(), vec![k]), "{r:?}");
        let r = c.exchange(&[execute(), sync()]).await.unwrap();
        assert_eq!(tags(&r), b"CZ", "key {k}: {r:?}");
    }
    // A first part on no sharded table (a driver's `SELECT 1`), then a key
    // of each shard.
    c.send(
        &[
            parse("", "SELECT 1", &[]),
            bind("", &[], 0),
            execute(),
            flush(),
        ]
        .concat(),
    )
    .await
    .unwrap();
    assert_eq!(tags(&until_tag(&mut c, b'C').await), b"12DC");
    for k in [b[0], a[0]] {
        let r = flushed(&mut c, sel("sel", k), b'C').await;
        assert_eq!(ids(&r), vec![k], "key {k}: {r:?}");
    }
    let r = c.exchange(&[sync()]).await.unwrap();
    assert_eq!((tags(&r), status(&r)), (b"Z".to_vec(), b'I'), "{r:?}");
}

/// A pipeline spanning shards that asks for results before its Sync (a
/// Flush, as psycopg's `executemany(..., returning=True)` sends) runs
/// then, part by part on the same shards: each part answered, the next
/// read from the client, everything committed on every shard at the
/// Sync. An error in any part rolls back every shard's part, the rest up
/// to the Sync skipped. Run before its end, a pipeline may still write: a
/// write after reads runs in the proxy's transaction on every shard, and
/// is rolled back by a failure on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_spanning_shards_answers_at_each_flush() {
    let (env, sh) = two_shards().await;
    let on = |s: usize| keys_on(&sh, s, 4);
    let (a, b) = (on(0), on(1));
    let row = |k: i64| bind("ret", &[(0, Some(&text(k))), (0, Some(b"f"))], 0);
    let ret = "INSERT INTO users (id, name) VALUES ($1, $2) RETURNING id";
    let mut c = RawClient::login(env.port).await.unwrap();
    c.send(
        &[
            parse("ret", ret, &[]),
            row(a[0]),
            execute(),
            row(b[0]),
            execute(),
            flush(),
        ]
        .concat(),
    )
    .await
    .unwrap();
    let r = until_tag(&mut c, b'C').await;
    assert_eq!(tags(&r), b"12DC", "{r:?}");
    let r = until_tag(&mut c, b'C').await;
    assert_eq!(tags(&r), b"2DC", "{r:?}");
    assert_eq!(ids(&r), vec![b[0]]);
    // The next parts, on the same shards.
    let r = flushed(&mut c, row(b[1]), b'C').await;
    assert_eq!(ids(&r), vec![b[1]]);
    let r = c.exchange(&[row(a[1]), execute(), sync()]).await.unwrap();
    assert_eq!(tags(&r), b"2DCZ", "{r:?}");
    assert_eq!(status(&r), b'I');
    assert_eq!(audit(&env, &sh), 4, "every row, each on its shard");
    // A failure in a later part rolls back every shard's part.
    c.send(&[row(a[2]), execute(), row(b[2]), execute(), flush()].concat())
        .await
        .unwrap();
    assert_eq!(tags(&until_tag(&mut c, b'C').await), b"2DC");
    assert_eq!(tags(&until_tag(&mut c, b'C').await), b"2DC");
    let r = flushed(&mut c, row(a[0]), b'E').await;
    assert_eq!(error_code(&r.last().unwrap().1), "23505", "{r:?}");
    c.send(&[row(b[3]), execute(), flush()].concat())
        .await
        .unwrap();
    let r = c.exchange(&[sync()]).await.unwrap();
    assert_eq!(tags(&r), b"Z", "skipped to the Sync: {r:?}");
    assert_eq!(audit(&env, &sh), 4, "nothing of the failed pipeline stays");
    // Reads on both shards at the first Flush, then a write.
    let select = "SELECT id FROM users WHERE id = $1";
    c.send(
        &[
            parse("sel", select, &[]),
            bind("sel", &[(0, Some(&text(a[0])))], 0),
            execute(),
            bind("sel", &[(0, Some(&text(b[0])))], 0),
            execute(),
            flush(),
        ]
        .concat(),
    )
    .await
    .unwrap();
    assert_eq!(tags(&until_tag(&mut c, b'C').await), b"12DC");
    assert_eq!(tags(&until_tag(&mut c, b'C').await), b"2DC");
    let r = flushed(&mut c, row(a[3]), b'C').await;
    assert_eq!(ids(&r), vec![a[3]]);
    // In the proxy's transaction on every shard: a failure on the other
    // shard takes it back.
    let r = flushed(&mut c, row(b[0]), b'E').await;
    assert_eq!(error_code(&r.last().unwrap().1), "23505", "{r:?}");
    let r = c.exchange(&[sync()]).await.unwrap();
    assert_eq!(tags(&r), b"Z", "{r:?}");
    assert_eq!(audit(&env, &sh), 4);
    // Refused at its first Flush (it holds a SET): the error then, its
    // ReadyForQuery at the client's Sync, as a server answers.
    c.send(
        &[
            row(a[3]),
            execute(),
            row(b[3]),
            execute(),
            parse("", "SET application_name = 'x'", &[]),
            bind("", &[], 0),
            execute(),
            flush(),
        ]
        .concat(),
    )
    .await
    .unwrap();
    let r = until_tag(&mut c, b'E').await;
    assert_eq!(error_code(&r.last().unwrap().1), "0A000", "{r:?}");
    let r = c.exchange(&[row(a[3]), execute(), sync()]).await.unwrap();
    assert_eq!(tags(&r), b"Z", "one ReadyForQuery, at the Sync: {r:?}");
    assert_eq!(audit(&env, &sh), 4);
    let r = c.exchange(&[query("SELECT 1")]).await.unwrap();
    assert_eq!(tags(&r), b"TDCZ", "{r:?}");
}

/// Three shards: a pipeline that asked for results with rows for two of
/// them takes the third when a row after that Flush needs it, and the
/// Sync commits all three; a failure on the third rolls back the other
/// two's rows. A statement without a key in a later part runs on every
/// shard, joining those the pipeline had not used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_run_at_a_flush_takes_a_new_shard_when_a_row_needs_it() {
    let (env, sh) = shards_with(3, SHARDING).await;
    let on = |s: usize| keys_on(&sh, s, 3);
    let keys = [on(0), on(1), on(2)];
    let row = |k: i64| bind("ins", &[(0, Some(&text(k))), (0, Some(b"t"))], 0);
    let audit3 = || shardline_tests::audit_users(&env, &sh, 3).len();
    let mut c = RawClient::login(env.port).await.unwrap();
    let two_rows = |x: i64, y: i64| [row(x), execute(), row(y), execute(), flush()].concat();
    c.send(&[parse("ins", INSERT, &[]), two_rows(keys[0][0], keys[1][0])].concat())
        .await
        .unwrap();
    assert_eq!(tags(&until_tag(&mut c, b'C').await), b"12C");
    assert_eq!(tags(&until_tag(&mut c, b'C').await), b"2C");
    assert_eq!(tags(&flushed(&mut c, row(keys[2][0]), b'C').await), b"2C");
    let r = c.exchange(&[sync()]).await.unwrap();
    assert_eq!(tags(&r), b"Z", "{r:?}");
    assert_eq!(audit3(), 3, "each row on its shard");
    // A duplicate on the third shard, joined after the Flush: the rows of
    // the other two are rolled back.
    c.send(&two_rows(keys[0][1], keys[1][1])).await.unwrap();
    assert_eq!(tags(&until_tag(&mut c, b'C').await), b"2C");
    assert_eq!(tags(&until_tag(&mut c, b'C').await), b"2C");
    let r = flushed(&mut c, row(keys[2][0]), b'E').await;
    assert_eq!(tags(&r), b"2E");
    assert_eq!(error_code(&r[1].1), "23505", "{r:?}");
    let r = c.exchange(&[sync()]).await.unwrap();
    assert_eq!(tags(&r), b"Z", "{r:?}");
    assert_eq!(audit3(), 3, "nothing of the failed pipeline stays");
    // One shard's row, then an UPDATE without a key: on all three.
    assert_eq!(
        tags(
            &flushed(
                &mut c,
                [
                    parse("", INSERT, &[]),
                    bind("", &[(0, Some(&text(keys[0][2]))), (0, Some(b"t"))], 0)
                ]
                .concat(),
                b'C'
            )
            .await
        ),
        b"12C"
    );
    let update = "UPDATE users SET name = $1";
    let set = bind("", &[(0, Some(b"u"))], 0);
    let r = flushed(&mut c, [parse("", update, &[]), set].concat(), b'C').await;
    assert_eq!(tags(&r), b"12C", "{r:?}");
    assert_eq!(command_tag(&r[2]), "UPDATE 4", "{r:?}");
    let r = c.exchange(&[sync()]).await.unwrap();
    assert_eq!(tags(&r), b"Z", "{r:?}");
    assert_eq!(audit3(), 4);
    let r = c
        .exchange(&[query("SELECT count(*) FROM users WHERE name = 'u'")])
        .await
        .unwrap();
    assert_eq!(tags(&r), b"TDCZ", "{r:?}");
    assert_eq!(&r[1].1[r[1].1.len() - 1..], b"4", "{r:?}");
}

/// Executions for different shards in one pipeline (up to Sync), as
/// executemany and JDBC batches send them: each runs on its key's shard,
/// answers in the client's order; an error anywhere rolls back every
/// shard's part (the pipeline is one implicit transaction), and nothing is
/// forwarded after it. Reads too, rows in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_spanning_shards_runs_each_execution_on_its_shard() {
    let (env, sh) = two_shards().await;
    let on = |s: usize| keys_on(&sh, s, 3);
    let (a, b) = (on(0), on(1));
    let mut c = RawClient::login(env.port).await.unwrap();
    let keys = [a[0], b[0], a[1], b[1]];
    let mut unit = vec![parse("p", INSERT, &[])];
    for k in keys {
        unit.push(bind("p", &[(0, Some(&text(k))), (0, Some(b"x"))], 0));
        unit.push(execute());
    }
    unit.push(sync());
    let r = c.exchange(&unit).await.unwrap();
    assert_eq!(tags(&r), b"12C2C2C2CZ", "{r:?}");
    assert_eq!(audit(&env, &sh), 4, "every row on its shard");
    // Reads by key in one pipeline: each row in the order asked.
    let mut unit = vec![parse("q", "SELECT id FROM users WHERE id = $1", &[])];
    for k in [b[1], a[0], b[0], a[1]] {
        unit.push(bind("q", &[(0, Some(&text(k)))], 0));
        unit.push(execute());
    }
    unit.push(sync());
    let r = c.exchange(&unit).await.unwrap();
    let ids: Vec<String> = r
        .iter()
        .filter(|m| m.0 == b'D')
        .map(|m| String::from_utf8_lossy(&m.1[6..]).into_owned())
        .collect();
    assert_eq!(ids, [b[1], a[0], b[0], a[1]].map(|k| k.to_string()));
    // A duplicate key in the third execution: the first two are rolled
    // back on both shards, nothing after the error is answered.
    let mut unit = vec![];
    for k in [a[2], b[2], a[0], b[1]] {
        unit.push(bind("p", &[(0, Some(&text(k))), (0, Some(b"y"))], 0));
        unit.push(execute());
    }
    unit.push(sync());
    let r = c.exchange(&unit).await.unwrap();
    assert_eq!(tags(&r), b"2C2C2EZ", "{r:?}");
    assert_eq!(error_code(&r[5].1), "23505");
    assert_eq!(audit(&env, &sh), 4, "the failed pipeline left nothing");
    // The session goes on.
    let r = c
        .exchange(&[query("SELECT count(*) FROM users")])
        .await
        .unwrap();
    assert_eq!(tags(&r), b"TDCZ", "{r:?}");
    // A long pipeline (about 900 kB each way, as a big executemany sends;
    // over 400 kB per shard): written while the shards' answers are taken
    // in, so neither side blocks the other; every row lands, every answer
    // in order.
    let name = "n".repeat(400);
    let keys: Vec<i64> = (1000..3000).collect();
    let mut unit = vec![parse(
        "big",
        "INSERT INTO users (id, name) VALUES ($1, $2) RETURNING id, name",
        &[],
    )];
    for &k in &keys {
        unit.push(bind(
            "big",
            &[(0, Some(&text(k))), (0, Some(name.as_bytes()))],
            0,
        ));
        unit.push(execute());
    }
    unit.push(sync());
    c.send(&unit.concat()).await.unwrap();
    let r = until_tag(&mut c, b'Z').await;
    assert_eq!(status(&r), b'I', "{:?}", &r[r.len().saturating_sub(3)..]);
    let got: Vec<i64> = r
        .iter()
        .filter(|m| m.0 == b'D')
        .map(|m| {
            let len = u32::from_be_bytes(m.1[2..6].try_into().unwrap()) as usize;
            String::from_utf8_lossy(&m.1[6..6 + len]).parse().unwrap()
        })
        .collect();
    assert!(
        got == keys,
        "{} rows; first answers {:?}",
        got.len(),
        &r[..r.len().min(4)]
    );
    assert_eq!(audit(&env, &sh), 4 + keys.len());
}

/// A query string whose statements need different shards (psql -c "...;
/// ...", pgx's batches over the simple protocol): each statement runs on
/// its key's shard, answers in order; the string is one transaction, as on
/// one server: an error rolls back every shard's part; SET or COMMIT in
/// such a string is refused before anything runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_strings_spanning_shards_run_each_statement_on_its_shard() {
    let (env, sh) = two_shards().await;
    let on = |s: usize| keys_on(&sh, s, 3);
    let (a, b) = (on(0), on(1));
    let mut c = RawClient::login(env.port).await.unwrap();
    let sql = format!(
        "INSERT INTO users (id, name) VALUES ({}, 'a'); INSERT INTO users (id, name) VALUES ({}, 'b'); \
         SELECT id FROM users WHERE id = {}; INSERT INTO users (id, name) VALUES ({}, 'c'); \
         SELECT id FROM users WHERE id = {}",
        a[0], b[0], b[0], a[1], a[0]
    );
    let r = c.exchange(&[query(&sql)]).await.unwrap();
    assert_eq!(tags(&r), b"CCTDCCTDCZ", "{r:?}");
    assert_eq!(ids(&r), vec![b[0], a[0]]);
    assert_eq!(audit(&env, &sh), 3);
    // The third statement fails on one shard: the others' rows are rolled
    // back on both, nothing after the error is answered.
    let sql = format!(
        "INSERT INTO users (id, name) VALUES ({}, 'x'); INSERT INTO users (id, name) VALUES ({}, 'y'); \
         INSERT INTO users (id, name) VALUES ({}, 'dup'); INSERT INTO users (id, name) VALUES ({}, 'z')",
        b[1], a[2], b[0], b[2]
    );
    let r = c.exchange(&[query(&sql)]).await.unwrap();
    assert_eq!(tags(&r), b"CCEZ", "{r:?}");
    assert_eq!(error_code(&r[2].1), "23505");
    assert_eq!(audit(&env, &sh), 3, "the failed string left nothing");
    // Session settings cannot be split: refused, nothing runs.
    let sql = format!(
        "SET application_name = 'x'; INSERT INTO users (id, name) VALUES ({}, 'x'); INSERT INTO users (id, name) VALUES ({}, 'y')",
        a[2], b[2]
    );
    let r = c.exchange(&[query(&sql)]).await.unwrap();
    assert_eq!(tags(&r), b"EZ", "{r:?}");
    assert_eq!(error_code(&r[0].1), "0A000");
    assert_eq!(audit(&env, &sh), 3);
    // Nor can a merged read share the string: refused, the merge named.
    let sql = format!(
        "INSERT INTO users (id, name) VALUES ({}, 'x'); INSERT INTO users (id, name) VALUES ({}, 'y'); SELECT count(*) FROM users",
        a[2], b[2]
    );
    let r = c.exchange(&[query(&sql)]).await.unwrap();
    assert_eq!(tags(&r), b"EZ", "{r:?}");
    let e = shardline::protocol::backend::parse_error_fields(&r[0].1);
    assert_eq!(e.code, "0A000");
    assert!(e.message.contains("merged across shards"), "{}", e.message);
    assert_eq!(audit(&env, &sh), 3);
}

/// How many tables named `name` each of the two shards has.
fn on_shards(env: &Env, name: &str) -> Vec<String> {
    (0..2)
        .map(|s| {
            env.sql_shard(
                s,
                &format!("SELECT count(*) FROM pg_class WHERE relname = '{name}'"),
            )
            .trim()
            .to_string()
        })
        .collect()
}

/// A CommandComplete's tag.
fn command_tag(m: &RawMessage) -> String {
    String::from_utf8_lossy(&m.1[..m.1.len() - 1]).into_owned()
}

/// A migration sent as one query string (golang-migrate runs each file so,
/// Django's RunSQL and `psql -c` too): DDL runs on every shard beside the
/// keyed INSERTs on theirs, answered once; a read without a key gets every
/// shard's rows and one count; a failure anywhere rolls back the DDL on
/// every shard with the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_strings_with_ddl_run_it_on_every_shard() {
    let (env, sh) = two_shards_with(&format!(
        "{SHARDING}\n[[reference_tables]]\nname = \"countries\"\n"
    ))
    .await;
    let on = |s: usize| keys_on(&sh, s, 3);
    let (a, b) = (on(0), on(1));
    let mut c = RawClient::login(env.port).await.unwrap();
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS notes (id bigint PRIMARY KEY, body text); \
         INSERT INTO users (id, name) VALUES ({}, 'm'); INSERT INTO users (id, name) VALUES ({}, 'm'); \
         ALTER TABLE notes ADD COLUMN at int; CREATE TABLE IF NOT EXISTS notes (id int)",
        a[0], b[0]
    );
    let r = c.exchange(&[query(&sql)]).await.unwrap();
    // The second CREATE's notice ("already exists, skipping") comes once.
    assert_eq!(tags(&r), b"CCCCNCZ", "{r:?}");
    assert_eq!(command_tag(&r[0]), "CREATE TABLE");
    assert_eq!(command_tag(&r[1]), "INSERT 0 1");
    assert_eq!(command_tag(&r[3]), "ALTER TABLE");
    assert_eq!(on_shards(&env, "notes"), ["1", "1"]);
    assert_eq!(
        (0..2)
            .map(|s| env.sql_shard(s, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'notes' AND column_name = 'at'").trim().to_string())
            .collect::<Vec<_>>(),
        ["1", "1"]
    );
    assert_eq!(audit(&env, &sh), 2);
    // A reference table made and written with a keyed row: every shard
    // holds its copy, and the write is answered as by one server
    // (`INSERT 0 1`, not the shards' sum).
    let sql = format!(
        "CREATE TABLE countries (code text PRIMARY KEY); INSERT INTO countries VALUES ('fr') RETURNING code; \
         INSERT INTO users (id, name) VALUES ({}, 'k')",
        b[2]
    );
    let r = c.exchange(&[query(&sql)]).await.unwrap();
    assert_eq!(tags(&r), b"CTDCCZ", "{r:?}");
    assert_eq!(command_tag(&r[3]), "INSERT 0 1");
    assert_eq!(
        (0..2)
            .map(|s| env
                .sql_shard(s, "SELECT string_agg(code, ',') FROM countries")
                .trim()
                .to_string())
            .collect::<Vec<_>>(),
        ["fr", "fr"]
    );
    assert_eq!(audit(&env, &sh), 3);
    // A read without a key among keyed writes: every shard's rows, one
    // count.
    let sql = format!(
        "INSERT INTO users (id, name) VALUES ({}, 'm'); SELECT id FROM users WHERE name = 'm'; \
         UPDATE users SET name = 'n' WHERE name = 'm'",
        a[1]
    );
    let r = c.exchange(&[query(&sql)]).await.unwrap();
    assert_eq!(tags(&r), b"CTDDDCCZ", "{r:?}");
    let mut got = ids(&r);
    got.sort();
    let mut want = vec![a[0], a[1], b[0]];
    want.sort();
    assert_eq!(got, want);
    assert_eq!(command_tag(&r[5]), "SELECT 3");
    assert_eq!(command_tag(&r[6]), "UPDATE 3", "the shards' counts summed");
    // A failing INSERT (a key taken) after DDL: the DDL is rolled back on
    // both shards with the rows.
    let sql = format!(
        "CREATE TABLE tags (id int); INSERT INTO users (id, name) VALUES ({}, 'x'); \
         INSERT INTO users (id, name) VALUES ({}, 'dup')",
        b[1], a[0]
    );
    let r = c.exchange(&[query(&sql)]).await.unwrap();
    assert_eq!(tags(&r), b"CCEZ", "{r:?}");
    assert_eq!(error_code(&r[2].1), "23505");
    assert_eq!(
        on_shards(&env, "tags"),
        ["0", "0"],
        "rolled back on every shard"
    );
    assert_eq!(audit(&env, &sh), 4);
    // DDL failing on the shards (a table that is not there): nothing runs.
    let sql = format!(
        "INSERT INTO users (id, name) VALUES ({}, 'x'); DROP TABLE missing; INSERT INTO users (id, name) VALUES ({}, 'y')",
        b[1], a[2]
    );
    let r = c.exchange(&[query(&sql)]).await.unwrap();
    assert_eq!(tags(&r), b"CEZ", "{r:?}");
    assert_eq!(error_code(&r[1].1), "42P01");
    assert_eq!(audit(&env, &sh), 4);
    // COPY among them: refused before anything runs (its data would come
    // amid the other statements' answers).
    for copy in ["COPY users TO STDOUT", "COPY (SELECT 1) TO STDOUT"] {
        let sql = format!(
            "INSERT INTO users (id, name) VALUES ({}, 'x'); CREATE TABLE copied (id int); {copy}",
            b[1]
        );
        let r = c.exchange(&[query(&sql)]).await.unwrap();
        assert_eq!(tags(&r), b"EZ", "{copy}: {r:?}");
        assert_eq!(error_code(&r[0].1), "0A000");
        assert_eq!(on_shards(&env, "copied"), ["0", "0"]);
        assert_eq!(audit(&env, &sh), 4);
    }
}

/// A pipeline (PgJDBC's batch, psycopg's pipeline mode) holding DDL and a
/// write without a key beside keyed INSERTs: the DDL and the broadcast
/// write run on every shard, answered once (the write's count summed),
/// each INSERT on its key's shard; an error rolls back every shard's part,
/// DDL included. A row limit on a statement over several shards is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_with_ddl_run_it_on_every_shard() {
    let (env, sh) = two_shards().await;
    let on = |s: usize| keys_on(&sh, s, 3);
    let (a, b) = (on(0), on(1));
    let mut c = RawClient::login(env.port).await.unwrap();
    let unit = |ddl: &str, keys: &[i64], name: &[u8]| {
        let mut unit = vec![
            parse("", ddl, &[]),
            bind("", &[], 0),
            execute(),
            parse("ins", INSERT, &[]),
        ];
        for &k in keys {
            unit.push(bind("ins", &[(0, Some(&text(k))), (0, Some(name))], 0));
            unit.push(execute());
        }
        unit.push(parse(
            "",
            "UPDATE users SET name = 'all' WHERE name = $1",
            &[],
        ));
        unit.push(bind("", &[(0, Some(name))], 0));
        unit.push(execute());
        unit.push(sync());
        unit
    };
    let r = c
        .exchange(&unit(
            "CREATE TABLE events (id bigint)",
            &[a[0], b[0], a[1]],
            b"p",
        ))
        .await
        .unwrap();
    assert_eq!(tags(&r), b"12C12C2C2C12CZ", "{r:?}");
    assert_eq!(command_tag(&r[2]), "CREATE TABLE");
    assert_eq!(command_tag(&r[12]), "UPDATE 3", "the shards' counts summed");
    assert_eq!(on_shards(&env, "events"), ["1", "1"]);
    assert_eq!(audit(&env, &sh), 3);
    // A key taken: nothing of the unit stays, the DDL neither.
    let r = c
        .exchange(&unit(
            "CREATE TABLE events2 (id bigint)",
            &[b[1], a[0]],
            b"q",
        ))
        .await
        .unwrap();
    assert_eq!(tags(&r), b"12C12C2EZ", "{r:?}");
    assert_eq!(error_code(&r[7].1), "23505");
    assert_eq!(on_shards(&env, "events2"), ["0", "0"]);
    assert_eq!(audit(&env, &sh), 3);
    // Executions for both shards, then a read without a key, in one
    // pipeline: refused when the read is fetched with a row limit (it
    // cannot be fetched in part from several shards), or merged (it must
    // be sent alone, and the refusal says so); nothing runs.
    for (read, execute_read, why) in [
        ("SELECT id FROM users", wire::execute_rows(1), ""),
        (
            "SELECT count(*) FROM users",
            execute(),
            "merged across shards",
        ),
    ] {
        let r = c
            .exchange(&[
                parse("ins", INSERT, &[]),
                bind("ins", &[(0, Some(&text(a[2]))), (0, Some(b"r"))], 0),
                execute(),
                bind("ins", &[(0, Some(&text(b[2]))), (0, Some(b"r"))], 0),
                execute(),
                parse("", read, &[]),
                bind("", &[], 0),
                execute_read,
                sync(),
            ])
            .await
            .unwrap();
        assert_eq!(tags(&r), b"EZ", "{read}: {r:?}");
        let e = shardline::protocol::backend::parse_error_fields(&r[0].1);
        assert_eq!(e.code, "0A000", "{read}");
        assert!(e.message.contains(why), "{read}: {}", e.message);
        assert_eq!(audit(&env, &sh), 3);
    }
}

/// The ReadyForQuery status of an answer's last message.
fn status(r: &[RawMessage]) -> u8 {
    let z = r.last().expect("an answer");
    assert_eq!(z.0, b'Z', "{r:?}");
    z.1[0]
}

/// Inside a client's transaction (two-phase commit on), a pipeline that
/// asks for results before its Sync (psycopg's pipeline mode fetching each
/// result with autocommit off, its default) takes each later execution to
/// its key's shard, which joins the transaction: with the BEGIN held, sent
/// in the unit (psycopg's shape) or already run on a shard. Nothing is
/// visible before COMMIT; COMMIT makes all of it visible, ROLLBACK none;
/// an error on a shard that joined fails the whole transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_at_a_flush_takes_other_shards_into_the_client_transaction() {
    let (env, sh) = two_shards_with(&two_phase()).await;
    let on = |s: usize| keys_on(&sh, s, 6);
    let (a, b) = (on(0), on(1));
    let row = |k: i64| bind("ins", &[(0, Some(&text(k))), (0, Some(b"x"))], 0);
    let sel = |k: i64| bind("sel", &[(0, Some(&text(k)))], 0);
    let mut c = RawClient::login(env.port).await.unwrap();
    let r = c
        .exchange(&[
            parse("ins", INSERT, &[]),
            parse("sel", "SELECT id FROM users WHERE id = $1", &[]),
            sync(),
        ])
        .await
        .unwrap();
    assert_eq!(tags(&r), b"11Z");
    // The BEGIN held, then rows for both shards, each read back.
    let r = c.exchange(&[query("BEGIN")]).await.unwrap();
    assert_eq!(status(&r), b'T');
    for k in [a[0], b[0], a[1]] {
        assert_eq!(tags(&flushed(&mut c, row(k), b'C').await), b"2C", "key {k}");
        let r = flushed(&mut c, sel(k), b'C').await;
        assert_eq!(ids(&r), vec![k], "read in the transaction: {r:?}");
    }
    let r = c.exchange(&[sync()]).await.unwrap();
    assert_eq!((tags(&r), status(&r)), (b"Z".to_vec(), b'T'), "{r:?}");
    assert_eq!(audit(&env, &sh), 0, "not visible before COMMIT");
    let r = c.exchange(&[query("COMMIT")]).await.unwrap();
    assert_eq!((tags(&r), status(&r)), (b"CZ".to_vec(), b'I'), "{r:?}");
    assert_eq!(audit(&env, &sh), 3, "each row on its shard");
    // The BEGIN in the unit, by the extended protocol (psycopg's shape).
    c.send(
        &[
            parse("", "BEGIN", &[]),
            bind("", &[], 0),
            execute(),
            row(b[1]),
            execute(),
            flush(),
        ]
        .concat(),
    )
    .await
    .unwrap();
    assert_eq!(tags(&until_tag(&mut c, b'C').await), b"12C");
    assert_eq!(tags(&until_tag(&mut c, b'C').await), b"2C");
    assert_eq!(tags(&flushed(&mut c, row(a[2]), b'C').await), b"2C");
    let r = c.exchange(&[sync()]).await.unwrap();
    assert_eq!(status(&r), b'T', "{r:?}");
    let r = c.exchange(&[query("ROLLBACK")]).await.unwrap();
    assert_eq!((tags(&r), status(&r)), (b"CZ".to_vec(), b'I'), "{r:?}");
    assert_eq!(audit(&env, &sh), 3, "rolled back on both shards");
    // The transaction already run on one shard, then a pipeline whose
    // first row is on the other; COMMIT by two-phase commit.
    let r = c.exchange(&[query("BEGIN")]).await.unwrap();
    assert_eq!(status(&r), b'T');
    let r = c
        .exchange(&[query(&format!(
            "INSERT INTO users (id, name) VALUES ({}, 's')",
            a[3]
        ))])
        .await
        .unwrap();
    assert_eq!(status(&r), b'T', "{r:?}");
    assert_eq!(tags(&flushed(&mut c, row(b[3]), b'C').await), b"2C");
    assert_eq!(tags(&flushed(&mut c, row(a[4]), b'C').await), b"2C");
    let r = c.exchange(&[sync()]).await.unwrap();
    assert_eq!(status(&r), b'T', "{r:?}");
    let r = c.exchange(&[query("COMMIT")]).await.unwrap();
    assert_eq!((tags(&r), status(&r)), (b"CZ".to_vec(), b'I'), "{r:?}");
    assert_eq!(audit(&env, &sh), 6);
    // A duplicate on the shard that joined fails the transaction.
    let r = c.exchange(&[query("BEGIN")]).await.unwrap();
    assert_eq!(status(&r), b'T');
    assert_eq!(tags(&flushed(&mut c, row(a[5]), b'C').await), b"2C");
    let r = flushed(&mut c, row(b[0]), b'E').await;
    assert_eq!(error_code(&r.last().unwrap().1), "23505", "{r:?}");
    let r = c.exchange(&[sync()]).await.unwrap();
    assert_eq!((tags(&r), status(&r)), (b"Z".to_vec(), b'E'), "{r:?}");
    let r = c.exchange(&[query("COMMIT")]).await.unwrap();
    assert_eq!((tags(&r), status(&r)), (b"CZ".to_vec(), b'I'), "{r:?}");
    assert_eq!(audit(&env, &sh), 6, "the failed transaction left nothing");
}

/// Inside a client's transaction (two-phase commit on), a pipeline whose
/// executions need both shards runs each on its shard within the
/// transaction: nothing is visible before COMMIT, COMMIT makes all of it
/// visible, an error fails the whole transaction. PgJDBC's shape with
/// autocommit off, BEGIN in the same unit as the batch (or as a merged
/// read), begins the transaction on every shard the unit needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_and_merged_reads_join_the_client_transaction() {
    let (env, sh) = two_shards_with(&two_phase()).await;
    let on = |s: usize| keys_on(&sh, s, 4);
    let (a, b) = (on(0), on(1));
    let mut c = RawClient::login(env.port).await.unwrap();
    let batch = |keys: &[i64], name: &[u8]| {
        let mut unit = vec![];
        for &k in keys {
            unit.push(bind("p", &[(0, Some(&text(k))), (0, Some(name))], 0));
            unit.push(execute());
        }
        unit
    };
    // BEGIN alone, then the pipeline: in the transaction, not yet visible.
    let r = c.exchange(&[query("BEGIN")]).await.unwrap();
    assert_eq!((tags(&r), status(&r)), (b"CZ".to_vec(), b'T'));
    let mut unit = vec![parse("p", INSERT, &[])];
    unit.extend(batch(&[a[0], b[0]], b"t"));
    unit.push(sync());
    let r = c.exchange(&unit).await.unwrap();
    assert_eq!((tags(&r), status(&r)), (b"12C2CZ".to_vec(), b'T'), "{r:?}");
    assert_eq!(audit(&env, &sh), 0, "not visible before COMMIT");
    // The transaction's merged read sees its own rows on both shards.
    let r = c
        .exchange(&[query("SELECT count(*) FROM users")])
        .await
        .unwrap();
    assert_eq!(r[1].1[6..].to_vec(), b"2".to_vec(), "{r:?}");
    let r = c.exchange(&[query("COMMIT")]).await.unwrap();
    assert_eq!((tags(&r), status(&r)), (b"CZ".to_vec(), b'I'), "{r:?}");
    assert_eq!(audit(&env, &sh), 2);

    // PgJDBC with autocommit off: BEGIN, then the batch, one unit.
    let mut unit = vec![parse("", "BEGIN", &[]), bind("", &[], 0), execute()];
    unit.extend(batch(&[a[1], b[1], a[2]], b"j"));
    unit.push(sync());
    let r = c.exchange(&unit).await.unwrap();
    assert_eq!(
        (tags(&r), status(&r)),
        (b"12C2C2C2CZ".to_vec(), b'T'),
        "{r:?}"
    );
    let r = c.exchange(&[query("ROLLBACK")]).await.unwrap();
    assert_eq!(status(&r), b'I');
    assert_eq!(audit(&env, &sh), 2, "rolled back on both shards");
    // The same, then COMMIT over the extended protocol.
    let r = c.exchange(&unit).await.unwrap();
    assert_eq!(status(&r), b'T', "{r:?}");
    let r = c
        .exchange(&[
            parse("", "COMMIT", &[]),
            bind("", &[], 0),
            execute(),
            sync(),
        ])
        .await
        .unwrap();
    assert_eq!((tags(&r), status(&r)), (b"12CZ".to_vec(), b'I'), "{r:?}");
    assert_eq!(audit(&env, &sh), 5);

    // BEGIN with a merged read in one unit: the read runs, the
    // transaction is open.
    let r = c
        .exchange(&[
            parse("", "BEGIN", &[]),
            bind("", &[], 0),
            execute(),
            parse("", "SELECT count(*) FROM users", &[]),
            bind("", &[], 0),
            describe(b'P', ""),
            execute(),
            sync(),
        ])
        .await
        .unwrap();
    assert_eq!(
        (tags(&r), status(&r)),
        (b"12C12TDCZ".to_vec(), b'T'),
        "{r:?}"
    );
    assert_eq!(r[6].1[6..].to_vec(), b"5".to_vec());

    // An error in the pipeline fails the transaction everywhere: the next
    // statement gets 25P02, COMMIT rolls back the rows of the read's
    // transaction and of the pipeline alike.
    let r = c
        .exchange(&[query(&format!(
            "INSERT INTO users (id, name) VALUES ({}, 'gone')",
            b[3]
        ))])
        .await
        .unwrap();
    assert_eq!(status(&r), b'T', "{r:?}");
    let mut unit = batch(&[a[3], b[2], a[0]], b"dup");
    unit.push(sync());
    let r = c.exchange(&unit).await.unwrap();
    assert_eq!((tags(&r), status(&r)), (b"2C2C2EZ".to_vec(), b'E'), "{r:?}");
    assert_eq!(error_code(&r[5].1), "23505");
    let r = c.exchange(&[query("SELECT 1")]).await.unwrap();
    assert_eq!(error_code(&r[0].1), "25P02", "{r:?}");
    let r = c.exchange(&[query("COMMIT")]).await.unwrap();
    assert_eq!(status(&r), b'I', "{r:?}");
    assert_eq!(audit(&env, &sh), 5, "nothing of the failed transaction");

    // COMMIT inside a pipeline spanning shards cannot be split: refused
    // before anything runs.
    let mut unit = batch(&[a[3], b[3]], b"c");
    unit.extend([parse("", "COMMIT", &[]), bind("", &[], 0), execute()]);
    unit.push(sync());
    let r = c.exchange(&[query("BEGIN")]).await.unwrap();
    assert_eq!(status(&r), b'T');
    let r = c.exchange(&unit).await.unwrap();
    assert_eq!(error_code(&r[0].1), "0A000", "{r:?}");
    assert_eq!(status(&r), b'E');
    c.exchange(&[query("ROLLBACK")]).await.unwrap();
    assert_eq!(audit(&env, &sh), 5);

    // PgJDBC's rollback() after a refused statement, with the next unit
    // right behind it: the ROLLBACK is answered at once, and the next unit
    // runs after the transaction, not refused as part of it (25P02).
    let k = (9000..).find(|&k| owner(&sh, k) == 0).unwrap();
    c.exchange(&[query("BEGIN")]).await.unwrap();
    let r = c
        .exchange(&[query(&format!(
            "INSERT INTO users (id, name) VALUES ({k}, 'gone')"
        ))])
        .await
        .unwrap();
    assert_eq!(status(&r), b'T', "{r:?}");
    let r = c
        .exchange(&wire::unit(
            "SELECT u.id FROM users u JOIN users v ON v.name = u.name",
        ))
        .await
        .unwrap();
    assert_eq!(
        (error_code(&r[0].1), status(&r)),
        ("0A000".into(), b'E'),
        "{r:?}"
    );
    // Messages that arrive in pieces are judged once whole: a query cut in
    // two, then the ROLLBACK's messages ahead of their Sync.
    let q = query("SELECT 1");
    c.send(&q[..7]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.send(&q[7..]).await.unwrap();
    let r = c.until_ready().await.unwrap();
    assert_eq!(
        (error_code(&r[0].1), status(&r)),
        ("25P02".into(), b'E'),
        "{r:?}"
    );
    c.send(&[parse("", "ROLLBACK", &[]), bind("", &[], 0), execute()].concat())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let unit = [
        sync(),
        parse("", "SELECT count(*) FROM users WHERE id = $1", &[]),
        bind("", &[(0, Some(&text(k)))], 0),
        describe(b'P', ""),
        execute(),
        sync(),
    ];
    c.send(&unit.concat()).await.unwrap();
    let r = c.until_ready().await.unwrap();
    assert_eq!((tags(&r), status(&r)), (b"12CZ".to_vec(), b'I'), "{r:?}");
    let r = c.until_ready().await.unwrap();
    assert_eq!((tags(&r), status(&r)), (b"12TDCZ".to_vec(), b'I'), "{r:?}");
    assert_eq!(r[3].1[6..].to_vec(), b"0".to_vec(), "{r:?}");
}

/// The ids of an answer's DataRows (first column, text).
fn ids(r: &[RawMessage]) -> Vec<i64> {
    r.iter()
        .filter(|m| m.0 == b'D')
        .map(|m| String::from_utf8_lossy(&m.1[6..]).parse().unwrap())
        .collect()
}

/// A multi-row INSERT whose rows belong to both shards and whose values
/// are bound parameters (SQLAlchemy's insertmanyvalues flush): split by
/// shard, each part binding its own rows' parameters; RETURNING rows come
/// back in the order of the INSERT's rows; the parameter after the rows
/// (ON CONFLICT ... SET) reaches every part. In autocommit, prepared
/// earlier and bound alone, in binary, and inside a transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_row_inserts_with_parameters_are_split_by_shard() {
    let (env, sh) = two_shards_with(&two_phase()).await;
    let mut c = RawClient::login(env.port).await.unwrap();
    let statement = |n: usize| {
        let rows: Vec<String> = (0..n)
            .map(|i| format!("(${}::BIGINT, ${}::TEXT)", 2 * i + 1, 2 * i + 2))
            .collect();
        format!(
            "INSERT INTO users (id, name) VALUES {} ON CONFLICT (id) DO UPDATE SET name = ${} RETURNING id",
            rows.join(", "),
            2 * n + 1
        )
    };
    let values = |keys: &[i64], fmt: i16| -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        for k in keys {
            v.push(if fmt == 1 {
                k.to_be_bytes().to_vec()
            } else {
                text(*k)
            });
            v.push(format!("n{k}").into_bytes());
        }
        v.push(b"again".to_vec());
        v
    };
    let bound = |name: &str, vals: &[Vec<u8>], fmt: i16| {
        let params: Vec<Param> = vals
            .iter()
            .enumerate()
            .map(|(i, v)| {
                (
                    if i % 2 == 0 && i + 1 < vals.len() {
                        fmt
                    } else {
                        0
                    },
                    Some(&v[..]),
                )
            })
            .collect();
        bind(name, &params, 0)
    };
    // Unnamed, text parameters, keys alternating between the shards.
    let keys: Vec<i64> = (1..=10).collect();
    assert!(keys.iter().any(|&k| owner(&sh, k) == 0) && keys.iter().any(|&k| owner(&sh, k) == 1));
    let r = c
        .exchange(&[
            parse("", &statement(10), &[]),
            bound("", &values(&keys, 0), 0),
            describe(b'P', ""),
            execute(),
            sync(),
        ])
        .await
        .unwrap();
    assert_eq!(tags(&r)[..3], *b"12T", "{r:?}");
    assert_eq!(ids(&r), keys, "RETURNING in the INSERT's order");
    assert_eq!(&r[r.len() - 2].1[..], b"INSERT 0 10\0");
    assert_eq!(audit(&env, &sh), 10);
    // Prepared once (typed int8 and text), then bound alone in binary:
    // existing keys take the ON CONFLICT branch with the last parameter.
    let r = c
        .exchange(&[parse("many", &statement(4), &[20, 25]), sync()])
        .await
        .unwrap();
    assert_eq!(tags(&r), b"1Z");
    let keys = [12, 3, 11, 4];
    let r = c
        .exchange(&[bound("many", &values(&keys, 1), 1), execute(), sync()])
        .await
        .unwrap();
    assert_eq!(tags(&r), b"2DDDDCZ", "{r:?}");
    assert_eq!(ids(&r), keys);
    assert_eq!(audit(&env, &sh), 12);
    assert_eq!(
        env.sql_shard(owner(&sh, 3), "SELECT name FROM users WHERE id = 3"),
        "again"
    );
    // Inside a transaction: the parts join it; ROLLBACK leaves nothing.
    let r = c.exchange(&[query("BEGIN")]).await.unwrap();
    assert_eq!(status(&r), b'T');
    let keys: Vec<i64> = (20..26).collect();
    let r = c
        .exchange(&[
            parse("", &statement(6), &[]),
            bound("", &values(&keys, 0), 0),
            execute(),
            sync(),
        ])
        .await
        .unwrap();
    assert_eq!((ids(&r), status(&r)), (keys.clone(), b'T'), "{r:?}");
    let r = c
        .exchange(&[query("SELECT count(*) FROM users WHERE id >= 20")])
        .await
        .unwrap();
    assert_eq!(r[1].1[6..].to_vec(), b"6".to_vec(), "{r:?}");
    c.exchange(&[query("ROLLBACK")]).await.unwrap();
    assert_eq!(audit(&env, &sh), 12);
    // Constants, over the simple protocol: RETURNING in order too.
    let r = c
        .exchange(&[query(
            "INSERT INTO users (id, name) VALUES (30, 'a'), (31, 'b'), (32, 'c'), (33, 'd'), (34, 'e') RETURNING id",
        )])
        .await
        .unwrap();
    assert_eq!(ids(&r), vec![30, 31, 32, 33, 34], "{r:?}");
    assert_eq!(audit(&env, &sh), 17);
}

/// Cursors live on one connection: inside a transaction, a cursor over one
/// key (or a shard hint) runs on that shard and FETCH/MOVE/CLOSE follow it;
/// a cursor over several shards is refused; WITH HOLD (and LISTEN) are
/// refused under transaction pooling (they would outlive the transaction on
/// a shared connection), over the simple and the extended protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_follow_their_transaction() {
    let (env, sh) = two_shards().await;
    insert_users(&env, 1..=20).await;
    let c = env.connect().await;
    for k in [3i64, 4, 17] {
        c.batch_execute("BEGIN").await.unwrap();
        c.batch_execute(&format!(
            "DECLARE c CURSOR FOR SELECT id FROM users WHERE id = {k}"
        ))
        .await
        .unwrap();
        let rows = c.simple_query("FETCH 10 FROM c").await.unwrap();
        let ids: Vec<String> = rows
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(ids, [k.to_string()]);
        c.batch_execute("MOVE ABSOLUTE 0 IN c; CLOSE c; COMMIT")
            .await
            .unwrap();
    }
    // A shard hint places a keyless cursor on one shard.
    let shard = owner(&sh, 5);
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute(&format!(
        "/* shardline: shard=s{shard} */ DECLARE h CURSOR FOR SELECT id FROM users ORDER BY id"
    ))
    .await
    .unwrap();
    let n = c
        .simple_query("FETCH ALL FROM h")
        .await
        .unwrap()
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    let on_shard = (1..=20).filter(|&k| owner(&sh, k) == shard).count();
    assert_eq!(n, on_shard);
    c.batch_execute("COMMIT").await.unwrap();
    // Over several shards: refused, and the transaction can be rolled back.
    c.batch_execute("BEGIN").await.unwrap();
    let e = c
        .batch_execute("DECLARE a CURSOR FOR SELECT id FROM users")
        .await
        .expect_err("refused");
    assert_eq!(
        shardline_tests::sqlstate(&e).as_deref(),
        Some("0A000"),
        "{e}"
    );
    c.batch_execute("ROLLBACK").await.unwrap();
    // WITH HOLD under transaction pooling: refused, nothing left behind.
    let e = c
        .batch_execute("DECLARE held CURSOR WITH HOLD FOR SELECT id FROM users WHERE id = 1")
        .await
        .expect_err("refused");
    assert_eq!(
        shardline_tests::sqlstate(&e).as_deref(),
        Some("0A000"),
        "{e}"
    );
    let mut raw = RawClient::login(env.port).await.unwrap();
    let r = raw
        .exchange(&[
            parse("", "DECLARE held CURSOR WITH HOLD FOR SELECT 1", &[]),
            bind("", &[], 0),
            execute(),
            sync(),
        ])
        .await
        .unwrap();
    assert_eq!(tags(&r), b"EZ", "{r:?}");
    assert_eq!(error_code(&r[0].1), "0A000");
    for s in 0..2 {
        assert_eq!(env.sql_shard(s, "SELECT count(*) FROM pg_cursors"), "0");
    }
    // LISTEN over the extended protocol is refused as over the simple one
    // (its notifications would never reach this client).
    let r = raw
        .exchange(&[
            parse("", "LISTEN chan", &[]),
            bind("", &[], 0),
            execute(),
            sync(),
        ])
        .await
        .unwrap();
    assert_eq!(tags(&r), b"EZ", "{r:?}");
    assert_eq!(error_code(&r[0].1), "0A000");
}

/// A merged read whose parameter the client did not type, bound in binary
/// after a Describe in its own batch (asyncpg): the shards type it as the
/// server typed it for the client, so HAVING compares it as a count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untyped_binary_parameters_in_merged_reads() {
    let (env, _sh) = two_shards().await;
    insert_users(&env, 1..=40).await;
    let c = env.connect().await;
    c.batch_execute("UPDATE users SET name = 'n' || (id % 4)")
        .await
        .unwrap();
    let mut raw = RawClient::login(env.port).await.unwrap();
    let sql = "SELECT name, count(*) FROM users GROUP BY name HAVING count(*) > $1 ORDER BY name";
    for (stmt, limit) in [("", 9i64), ("having", 9), ("", 10)] {
        raw.send(&[parse(stmt, sql, &[]), describe(b'S', stmt), flush()].concat())
            .await
            .unwrap();
        let r = until_tag(&mut raw, b'T').await;
        // The client is told int8, as from one server.
        assert_eq!(r[1].1, [0, 1, 0, 0, 0, 20], "{r:?}");
        let r = raw
            .exchange(&[
                bind(stmt, &[(1, Some(&limit.to_be_bytes()))], 0),
                execute(),
                sync(),
            ])
            .await
            .unwrap();
        let rows = r.iter().filter(|m| m.0 == b'D').count();
        assert_eq!(rows, if limit == 9 { 4 } else { 0 }, "{r:?}");
        if !stmt.is_empty() {
            raw.exchange(&[shardline_tests::message(b'C', b"Shaving\0"), sync()])
                .await
                .unwrap();
        }
    }
}

/// Statements a client prepared in earlier units (psycopg's and PgJDBC's
/// prepared statements, asyncpg's cache), bound in a unit on several
/// shards after other messages were answered: a shard's connection that
/// lacks one is sent a Parse of the proxy's own in the middle of the
/// unit, and its answer is hidden at that place, not at the unit's start
/// (which cost the client its first answer and showed the proxy's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_prepared_earlier_answer_in_place_on_every_shard() {
    let (env, sh) = two_shards().await;
    insert_users(&env, 1..=6).await;
    let mut c = RawClient::login(env.port).await.unwrap();
    let mut prepare = async |name: &str, sql: &str| {
        let r = c.exchange(&[parse(name, sql, &[]), sync()]).await.unwrap();
        assert_eq!(tags(&r), b"1Z", "{name}: {r:?}");
    };
    prepare("r", "SELECT id FROM users WHERE name = $1").await;
    prepare("w", "UPDATE users SET name = name WHERE name = $1").await;
    prepare("k1", "SELECT name FROM users WHERE id = $1 /* one */").await;
    prepare("k2", "SELECT name FROM users WHERE id = $1 /* two */").await;
    prepare("r2", "SELECT id FROM users WHERE name = $1 /* again */").await;
    let x = (0, Some(&b"x"[..]));
    let six_rows = |r: &[RawMessage]| r.iter().filter(|m| m.0 == b'D').count();
    // The unnamed statement described and run on every shard, then a
    // prepared one.
    let r = c
        .exchange(&[
            parse("", "SELECT id FROM users WHERE id > $1", &[]),
            describe(b'S', ""),
            bind("", &[(0, Some(b"0"))], 0),
            execute(),
            bind("r", &[x], 0),
            execute(),
            sync(),
        ])
        .await
        .unwrap();
    let t: Vec<u8> = tags(&r).into_iter().filter(|&t| t != b'D').collect();
    assert_eq!(t, b"1tT2C2CZ", "{r:?}");
    assert_eq!(six_rows(&r), 12);
    // Two prepared statements, a read and a write, on every shard
    // (psycopg's pipeline mode).
    let r = c
        .exchange(&[
            bind("r2", &[x], 0),
            execute(),
            bind("w", &[x], 0),
            execute(),
            sync(),
        ])
        .await
        .unwrap();
    let t: Vec<u8> = tags(&r).into_iter().filter(|&t| t != b'D').collect();
    assert_eq!(t, b"2C2CZ", "{r:?}");
    assert_eq!(six_rows(&r), 6);
    let last_tag = r.iter().rev().find(|m| m.0 == b'C').map(|m| m.1.clone());
    assert_eq!(last_tag.as_deref(), Some(&b"UPDATE 6\0"[..]), "{r:?}");
    // Executions by key on each shard, each shard binding both
    // statements: on the shard whose connection lacks them, the second
    // is prepared after the first one's answers.
    let on = |s: usize| -> i64 { (1..=6).find(|&k| owner(&sh, k) == s).unwrap() };
    let (a, b) = (on(0), on(1));
    let r = c
        .exchange(&[
            bind("k1", &[(0, Some(&text(a)))], 0),
            execute(),
            bind("k2", &[(0, Some(&text(b)))], 0),
            execute(),
            bind("k1", &[(0, Some(&text(b)))], 0),
            execute(),
            bind("k2", &[(0, Some(&text(a)))], 0),
            execute(),
            sync(),
        ])
        .await
        .unwrap();
    assert_eq!(tags(&r), b"2DC2DC2DC2DCZ", "{r:?}");
    // The session goes on.
    let r = c.exchange(&[query("SELECT 1")]).await.unwrap();
    assert_eq!(tags(&r), b"TDCZ", "{r:?}");
}

/// A statement prepared by the proxy on a shard where its Parse fails
/// (the table is missing there) is not taken as prepared: once the table
/// exists, the next unit prepares it again instead of failing with 26000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parse_that_failed_on_a_shard_is_prepared_again() {
    let (env, _) = two_shards_with(&format!(
        "{SHARDING}\n[[sharding.tables]]\nname = \"items\"\ncolumn = \"id\"\n"
    ))
    .await;
    env.sql_on(
        env.shard_primary(0),
        "CREATE TABLE items (id bigint); ALTER TABLE items OWNER TO app",
    );
    // One server connection per shard: the next unit gets the same one.
    let mut c = RawClient::login_as(env.port, "trustsingle").await.unwrap();
    let r = c
        .exchange(&[parse("p", "SELECT id FROM items", &[]), sync()])
        .await
        .unwrap();
    assert_eq!(tags(&r), b"1Z", "{r:?}");
    let unit = [bind("p", &[], 0), execute(), sync()];
    let r = c.exchange(&unit).await.unwrap();
    assert_eq!(tags(&r), b"EZ", "{r:?}");
    assert_eq!(error_code(&r[0].1), "42P01", "{r:?}");
    env.sql_on(
        env.shard_primary(1),
        "CREATE TABLE items (id bigint); ALTER TABLE items OWNER TO app",
    );
    let r = c.exchange(&unit).await.unwrap();
    assert_eq!(tags(&r), b"2CZ", "{r:?}");
}

/// A unit acted on before its Sync that arrives while the connection of
/// the transaction just ended (ROLLBACK) still waits for the proxy's own
/// read-your-writes query is placed once that connection is released: a
/// pipeline in a new transaction (two-phase commit on) then takes a row
/// for the other shard into it instead of refusing it (0A000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_arriving_behind_a_rollback_takes_other_shards() {
    let (env, sh) = replicated_shards_with(2, 1, &two_phase()).await;
    let on = |s: usize| keys_on(&sh, s, 3);
    let (a, b) = (on(0), on(1));
    let mut c = RawClient::login(env.port).await.unwrap();
    let r = c
        .exchange(&[parse("ins", INSERT, &[]), sync()])
        .await
        .unwrap();
    assert_eq!(tags(&r), b"1Z");
    let row = |k: i64| bind("ins", &[(0, Some(&text(k))), (0, Some(b"x"))], 0);
    for round in 0..2 {
        let r = c.exchange(&[query("BEGIN")]).await.unwrap();
        assert_eq!(status(&r), b'T');
        let insert = format!("INSERT INTO users (id, name) VALUES ({}, 'r')", a[0]);
        let r = c.exchange(&[query(&insert)]).await.unwrap();
        assert_eq!(status(&r), b'T', "{r:?}");
        // ROLLBACK and the next transaction's first part in one write.
        c.send(
            &[
                query("ROLLBACK"),
                parse("", "BEGIN", &[]),
                bind("", &[], 0),
                execute(),
                row(a[1 + round]),
                execute(),
                flush(),
            ]
            .concat(),
        )
        .await
        .unwrap();
        let r = until_tag(&mut c, b'Z').await;
        assert_eq!(status(&r), b'I', "{r:?}");
        assert_eq!(tags(&until_tag(&mut c, b'C').await), b"12C");
        assert_eq!(tags(&until_tag(&mut c, b'C').await), b"2C");
        let r = flushed(&mut c, row(b[round]), b'C').await;
        assert_eq!(tags(&r), b"2C", "round {round}: {r:?}");
        let r = c.exchange(&[sync()]).await.unwrap();
        assert_eq!(status(&r), b'T', "{r:?}");
        let r = c.exchange(&[query("COMMIT")]).await.unwrap();
        assert_eq!((tags(&r), status(&r)), (b"CZ".to_vec(), b'I'), "{r:?}");
    }
    assert_eq!(shardline_tests::audit_users(&env, &sh, 2).len(), 4);
}

/// A Flush the client sends with the end of a transaction on several
/// shards (psycopg sends Sync and Flush at the end of a pipeline, then its
/// ROLLBACK) leaves nothing behind: it reached no connection, and the
/// connection borrowed next goes back to its pool. psycopg sends
/// DEALLOCATE ALL after a failed pipeline: the proxy answers it without a
/// connection, but one behind a comment is answered after a borrow (a
/// replica); the second round sends that one. Before, the Flush stayed
/// queued, went to that replica, and kept it attached (nothing answers a
/// Flush): the next transaction began there, and its writes failed
/// (25006) or were refused for another shard (0A000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_at_the_end_of_a_transaction_keeps_no_connection() {
    let (env, sh) = replicated_shards_with(2, 1, &two_phase()).await;
    env.wait_healthy().await;
    let on = |s: usize| keys_on(&sh, s, 3);
    let (a, b) = (on(0), on(1));
    let mut c = RawClient::login(env.port).await.unwrap();
    for round in 0..2 {
        let r = c.exchange(&[query("BEGIN")]).await.unwrap();
        assert_eq!(status(&r), b'T');
        for k in [a[0], b[0]] {
            let insert = format!("INSERT INTO users (id, name) VALUES ({k}, 'undone')");
            let r = c.exchange(&[query(&insert)]).await.unwrap();
            assert_eq!(status(&r), b'T', "{r:?}");
        }
        let r = c.exchange(&[flush(), query("ROLLBACK")]).await.unwrap();
        assert_eq!((tags(&r), status(&r)), (b"CZ".to_vec(), b'I'), "{r:?}");
        let deallocate = ["DEALLOCATE ALL", "/* after a borrow */ DEALLOCATE ALL"][round];
        let r = c.exchange(&[query(deallocate)]).await.unwrap();
        assert_eq!(tags(&r), b"CZ", "{r:?}");
        // psycopg's BEGIN in a pipeline: a unit of its own.
        let r = c.exchange(&wire::unit("BEGIN")).await.unwrap();
        assert_eq!(status(&r), b'T', "{r:?}");
        for k in [a[1 + round], b[1 + round]] {
            let insert = format!("INSERT INTO users (id, name) VALUES ({k}, 'kept')");
            let r = c.exchange(&[query(&insert)]).await.unwrap();
            assert_eq!(
                (tags(&r), status(&r)),
                (b"CZ".to_vec(), b'T'),
                "round {round}, key {k}: {r:?}"
            );
        }
        let r = c.exchange(&[query("COMMIT")]).await.unwrap();
        assert_eq!((tags(&r), status(&r)), (b"CZ".to_vec(), b'I'), "{r:?}");
    }
    assert_eq!(audit(&env, &sh), 4);
}
