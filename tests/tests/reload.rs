//! Live reload (admin RELOAD, SIGHUP) of the `shardline` binary's config
//! file: applied whole under load without failing a transaction, refused
//! whole when the file is wrong, and a removed user's sessions ended at
//! their next transaction boundary.

use shardline_tests::{sqlstate, wait_for, Env, EnvOptions, ProxyProcess};
use std::collections::HashMap;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

/// One shard: its primary and the replicas `replicas` (cluster indexes),
/// pools of `size`, users `app` (an admin) and, when `leaver`, `leaver`.
fn config(env: &Env, size: usize, replicas: &[usize], leaver: bool) -> String {
    let replicas: Vec<String> = replicas
        .iter()
        .map(|&r| format!("{{ host = \"127.0.0.1\", port = {} }}", env.node_port(r)))
        .collect();
    let leaver = if leaver {
        "[[users]]\nname = \"leaver\"\npassword = \"leaver-pw\"\ndatabase = \"app\"\nserver_user = \"app\"\nserver_password = \"app\"\n\n"
    } else {
        ""
    };
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\n[pool]\nsize = {size}\ncheckout_timeout = \"10s\"\n\n\
         [[users]]\nname = \"app\"\npassword = \"app\"\ndatabase = \"app\"\n\n{leaver}\
         [admin]\nusers = [\"app\"]\n\n\
         [[shards]]\nname = \"s0\"\nprimary = {{ host = \"127.0.0.1\", port = {} }}\nreplicas = [{}]\n",
        env.node_port(env.shard_primary(0)),
        replicas.join(", ")
    )
}

async fn rows(c: &Client, sql: &str) -> Vec<HashMap<String, String>> {
    c.simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_string(), r.get(i).unwrap_or("").to_string()))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

async fn setting(admin: &Client, key: &str) -> String {
    rows(admin, "SHOW CONFIG")
        .await
        .into_iter()
        .find(|r| r["key"] == key)
        .map(|r| r["value"].clone())
        .unwrap_or_else(|| panic!("no {key} in SHOW CONFIG"))
}

async fn xacts(admin: &Client) -> u64 {
    rows(admin, "SHOW STATS_TOTALS").await[0]["xact_count"]
        .parse()
        .expect("a count")
}

async fn env_with_accounts() -> Env {
    let env = Env::start_with(EnvOptions {
        replicas_per_shard: 2,
        ..EnvOptions::default()
    })
    .await
    .expect("a primary and two replicas");
    env.sql(
        "CREATE TABLE acct (id int PRIMARY KEY, n int NOT NULL);
         INSERT INTO acct SELECT g, 0 FROM generate_series(1, 100) g;
         GRANT ALL ON acct TO app;",
    );
    env.wait_healthy().await;
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_pgbench_fail_no_transaction() {
    let env = env_with_accounts().await;
    let replicas = env.replicas();
    let (proxy, _client) = ProxyProcess::start(&config(&env, 4, &replicas[..1], false), &[]).await;
    let admin = proxy.console().await;
    let dir = shardline_tests::TempDir::new("reload-bench");
    let script = dir.write(
        "rw.sql",
        "\\set id random(1, 100)\nBEGIN;\nUPDATE acct SET n = n + 1 WHERE id = :id;\nCOMMIT;\nSELECT n FROM acct WHERE id = :id;\n",
    );
    let bench = shardline_tests::pgbench_script(proxy.port, 16, 8, &script);
    wait_for("the load to run", || async { xacts(&admin).await > 300 }).await;

    // 1. The pools grow (RELOAD).
    proxy.rewrite_config(&config(&env, 8, &replicas[..1], false));
    let reply = admin.simple_query("RELOAD").await.expect("RELOAD applies");
    drop(reply);
    assert_eq!(setting(&admin, "pool.size").await, "8");
    let pools = rows(&admin, "SHOW POOLS").await;
    assert_eq!(pools[0]["nodes"], "2", "{pools:?}");

    // 2. A replica joins (SIGHUP), and reads reach it.
    let at = xacts(&admin).await;
    wait_for("more load", || async { xacts(&admin).await > at + 200 }).await;
    proxy.rewrite_config(&config(&env, 8, &replicas, false));
    // SAFETY: kill(2) on the process this test started.
    unsafe { libc::kill(proxy.pid() as i32, libc::SIGHUP) };
    wait_for("the new replica in SHOW SHARDS", || async {
        rows(&admin, "SHOW SHARDS").await.len() == 3
    })
    .await;
    let new_port = env.node_port(replicas[1]).to_string();
    wait_for("reads on the new replica", || async {
        rows(&admin, "SHOW SERVERS")
            .await
            .iter()
            .any(|r| r["port"] == new_port)
    })
    .await;

    // 3. A file with a syntax error: refused whole, the running config stays.
    proxy.rewrite_config(&format!(
        "{}\n[pool\nsize = 2\n",
        config(&env, 2, &replicas, false)
    ));
    let e = admin.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("F0000"), "{e}");
    let msg = e.as_db_error().unwrap().message().to_string();
    assert!(
        msg.contains("running configuration stays") && msg.contains("line"),
        "{msg}"
    );
    assert_eq!(setting(&admin, "pool.size").await, "8");
    assert_eq!(rows(&admin, "SHOW SHARDS").await.len(), 3);

    let (ok, out) = bench.join().unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    // Every committed increment is there once: the sum is the count.
    let done: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no transaction count in {out}"));
    assert_eq!(env.sql("SELECT sum(n) FROM acct"), done.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_user_ends_at_its_next_transaction_boundary() {
    let env = env_with_accounts().await;
    let replicas = env.replicas();
    let (proxy, _client) = ProxyProcess::start(&config(&env, 4, &replicas[..1], true), &[]).await;
    let conn = format!(
        "host=127.0.0.1 port={} user=leaver password=leaver-pw dbname=app",
        proxy.port
    );
    let (leaver, connection) = tokio_postgres::connect(&conn, NoTls).await.unwrap();
    tokio::spawn(connection);
    leaver
        .batch_execute("BEGIN; UPDATE acct SET n = n + 1 WHERE id = 1")
        .await
        .unwrap();
    proxy.rewrite_config(&config(&env, 4, &replicas[..1], false));
    let (ok, out) = shardline_tests::psql(
        &format!("postgres://app:app@127.0.0.1:{}/shardline", proxy.port),
        &["-c", "RELOAD"],
    );
    assert!(ok, "{out}");
    assert!(out.contains("user leaver@app removed"), "{out}");
    // Its open transaction ends as the client decides.
    leaver
        .batch_execute("UPDATE acct SET n = n + 1 WHERE id = 1; COMMIT")
        .await
        .expect("a transaction open at the reload commits");
    assert_eq!(env.sql("SELECT n FROM acct WHERE id = 1"), "2");
    // Then the session ends, and the user can no longer log in.
    let e = leaver.batch_execute("SELECT 1").await.unwrap_err();
    assert!(
        leaver.is_closed() || sqlstate(&e).as_deref() == Some("57P01"),
        "{e}"
    );
    let Err(e) = tokio_postgres::connect(&conn, NoTls).await else {
        panic!("a removed user logged in");
    };
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_need_a_restart_are_named_and_the_rest_applies() {
    let env = env_with_accounts().await;
    let replicas = env.replicas();
    let (proxy, client) = ProxyProcess::start(&config(&env, 4, &replicas[..1], false), &[]).await;
    let other_port = shardline::cluster::free_port().unwrap();
    proxy.rewrite_config(&config(&env, 6, &replicas[..1], false).replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{other_port}\""),
    ));
    let (ok, out) = shardline_tests::psql(
        &format!("postgres://app:app@127.0.0.1:{}/shardline", proxy.port),
        &["-c", "RELOAD"],
    );
    assert!(ok, "{out}");
    assert!(out.contains("pool.size: 4 -> 6"), "{out}");
    assert!(out.contains("proxy.listen stays 127.0.0.1:"), "{out}");
    let admin = proxy.console().await;
    assert_eq!(setting(&admin, "pool.size").await, "6");
    assert_eq!(
        setting(&admin, "proxy.listen").await,
        format!("127.0.0.1:{}", proxy.port)
    );
    client
        .batch_execute("SELECT 1")
        .await
        .expect("clients carry on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smaller_pool_closes_connections_down_to_its_size() {
    let env = env_with_accounts().await;
    let (proxy, _client) = ProxyProcess::start(&config(&env, 4, &[], false), &[]).await;
    let admin = proxy.console().await;
    let conn = format!(
        "host=127.0.0.1 port={} user=app password=app dbname=app",
        proxy.port
    );
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (c, connection) = tokio_postgres::connect(&conn, NoTls).await.unwrap();
        tokio::spawn(connection);
        clients.push(c);
    }
    // Four transactions at once: four server connections.
    for c in &clients {
        c.batch_execute("BEGIN; SELECT 1").await.unwrap();
    }
    assert_eq!(env.server_backends(None), 4);
    // Two of them are lent when the pool shrinks to two, two idle after.
    for c in &clients[..2] {
        c.batch_execute("COMMIT").await.unwrap();
    }
    proxy.rewrite_config(&config(&env, 2, &[], false));
    admin.simple_query("RELOAD").await.expect("RELOAD applies");
    assert_eq!(setting(&admin, "pool.size").await, "2");
    // The idle ones over the size are closed at once, the lent ones as
    // they come back.
    wait_for("idle connections closed", || async {
        env.server_backends(None) == 2
    })
    .await;
    for c in &clients[2..] {
        c.batch_execute("COMMIT").await.unwrap();
    }
    // (Both lent ones came back to a pool of two: kept.)
    assert_eq!(env.server_backends(None), 2);
    // Two transactions hold the pool; a third waits for one of them.
    clients[0].batch_execute("BEGIN; SELECT 1").await.unwrap();
    clients[1].batch_execute("BEGIN; SELECT 1").await.unwrap();
    let third = clients.pop().unwrap();
    let waiting = tokio::spawn(async move { third.simple_query("SELECT 1").await.map(|_| third) });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a third connection was lent by a pool of two"
    );
    assert_eq!(env.server_backends(None), 2);
    clients[0].batch_execute("COMMIT").await.unwrap();
    waiting
        .await
        .unwrap()
        .expect("the waiting client runs once one is free");
    clients[1].batch_execute("COMMIT").await.unwrap();
    // And it grows again.
    proxy.rewrite_config(&config(&env, 3, &[], false));
    admin.simple_query("RELOAD").await.expect("RELOAD applies");
    for c in &clients[..3] {
        c.batch_execute("BEGIN; SELECT 1").await.unwrap();
    }
    assert_eq!(env.server_backends(None), 3);
}

/// PAUSE, a client held on shard s1, a RELOAD that removes s1, RESUME: the
/// held client runs at once (on s0, where the new config places its key),
/// instead of waiting `max_hold` on the removed shard's pause. Then a
/// PAUSE and RELOAD that add s1 back hold the new shard too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_releases_clients_held_on_a_shard_a_reload_removed() {
    let env = Env::primaries(2).await;
    let tables = "[sharding]\nfunction = \"consistent\"\n[[sharding.tables]]\nname = \"t\"\ncolumn = \"id\"\n\n[admin]\nusers = [\"app\"]\nmax_hold = \"5s\"\n";
    let two = env.shards_config(&[0, 1], tables);
    let one = env.shards_config(&[0], tables);
    for s in 0..2 {
        env.sql_shard(
            s,
            "CREATE TABLE t (id bigint PRIMARY KEY); GRANT ALL ON t TO app;",
        );
    }
    let sharding = shardline_router::sharding::Sharding::from_config(
        &shardline_config::Config::from_toml(&two, "t").unwrap(),
    );
    let group = &sharding.groups[0];
    let key = (1i64..)
        .find(|&k| {
            group
                .shard_of(Some(&shardline_router::hash::KeyValue::Int(k)))
                .ok()
                == Some(1)
        })
        .unwrap();
    let (proxy, _c) = ProxyProcess::start(&two, &[]).await;
    let admin = format!("postgres://app:app@127.0.0.1:{}/shardline", proxy.port);
    let console = |sql: &'static str| {
        let admin = admin.clone();
        async move {
            let (ok, out) =
                tokio::task::spawn_blocking(move || shardline_tests::psql(&admin, &["-c", sql]))
                    .await
                    .unwrap();
            assert!(ok, "{sql}: {out}");
        }
    };
    console("PAUSE").await;
    let port = proxy.port;
    let held = tokio::spawn(async move {
        let c = shardline_tests::connect_app(port).await.expect("a client");
        let started = std::time::Instant::now();
        let r = c
            .simple_query(&format!("SELECT count(*) FROM t WHERE id = {key}"))
            .await
            .map(|_| ());
        (r, started.elapsed())
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "a paused proxy answered");
    proxy.rewrite_config(&one);
    console("RELOAD").await;
    console("RESUME").await;
    let (r, waited) = held.await.unwrap();
    r.expect("the held client runs once resumed");
    assert!(
        waited < std::time::Duration::from_secs(5),
        "held {waited:?}"
    );

    // Paused with one shard, reloaded with two: the added shard is held too.
    console("PAUSE").await;
    proxy.rewrite_config(&two);
    console("RELOAD").await;
    let held = tokio::spawn(async move {
        let c = shardline_tests::connect_app(port).await.expect("a client");
        c.simple_query(&format!("SELECT count(*) FROM t WHERE id = {key}"))
            .await
            .map(|_| ())
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "the added shard was not paused");
    console("RESUME").await;
    held.await.unwrap().expect("runs once resumed");
}
