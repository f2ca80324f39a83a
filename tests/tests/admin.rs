//! The admin console: who may use it, its SHOW views in PgBouncer's
//! layouts against a live two-shard cluster, and the commands that act
//! (PAUSE / RESUME, KILL_CLIENT, RECONNECT, SHUTDOWN) under real clients.

use shardline_tests::{sqlstate, wait_for, Env, EnvOptions, ProxyProcess};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

const ADMIN: &str = "[admin]\nusers = [\"app\"]\n";

/// Two shards with a replica each, the demo's sharding, `app` an admin,
/// and `extra` appended (more `[admin]` settings).
async fn two_shards(admin_extra: &str) -> Env {
    let env = Env::demo_sharded(&format!("{ADMIN}{admin_extra}")).await;
    let c = env.connect().await;
    c.batch_execute(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE orders (id bigint, user_id bigint NOT NULL, amount numeric(12,2), PRIMARY KEY (user_id, id));
         CREATE TABLE countries (code text PRIMARY KEY, name text);",
    )
    .await
    .expect("tables on both shards");
    let rows: Vec<String> = (1..=40).map(|i| format!("({i}, 'u{i}')")).collect();
    c.batch_execute(&format!(
        "INSERT INTO users (id, name) VALUES {}",
        rows.join(", ")
    ))
    .await
    .expect("rows on both shards");
    env
}

async fn console_as(
    env: &Env,
    user: &str,
    password: &str,
) -> Result<Client, tokio_postgres::Error> {
    let conn = format!(
        "host=127.0.0.1 port={} user={user} password={password} dbname=shardline",
        env.port
    );
    let (client, connection) = tokio_postgres::connect(&conn, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

async fn console(env: &Env) -> Client {
    console_as(env, "app", "app")
        .await
        .expect("the admin console")
}

type Row = HashMap<String, Option<String>>;

/// A console statement's rows, and its columns in order.
async fn show(c: &Client, sql: &str) -> (Vec<String>, Vec<Row>) {
    let mut columns = Vec::new();
    let mut rows = Vec::new();
    for m in c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    {
        match m {
            SimpleQueryMessage::RowDescription(cols) => {
                columns = cols.iter().map(|c| c.name().to_string()).collect();
            }
            SimpleQueryMessage::Row(r) => {
                let row = r
                    .columns()
                    .iter()
                    .enumerate()
                    .map(|(i, col)| (col.name().to_string(), r.get(i).map(str::to_string)))
                    .collect();
                rows.push(row);
            }
            _ => {}
        }
    }
    (columns, rows)
}

fn get<'a>(row: &'a Row, column: &str) -> &'a str {
    row.get(column)
        .unwrap_or_else(|| panic!("no column {column} in {row:?}"))
        .as_deref()
        .unwrap_or("")
}

fn int(row: &Row, column: &str) -> i64 {
    get(row, column)
        .parse()
        .unwrap_or_else(|_| panic!("{column} is not a number in {row:?}"))
}

/// The id SHOW CLIENTS gives the client whose application_name is `name`.
pub(crate) async fn client_id(admin: &Client, name: &str) -> String {
    let (_, clients) = show(admin, "SHOW CLIENTS").await;
    clients
        .iter()
        .find(|r| get(r, "application_name") == name)
        .map(|r| get(r, "id").to_string())
        .unwrap_or_else(|| panic!("no client named {name} in {clients:?}"))
}

/// Waits until SHOW CLIENTS shows the client named `name` waiting (for a
/// connection, or held by PAUSE).
async fn wait_until_waiting(admin: &Client, name: &str, what: &str) {
    wait_for(what, || async move {
        let (_, clients) = show(admin, "SHOW CLIENTS").await;
        clients
            .iter()
            .any(|r| get(r, "application_name") == name && get(r, "state") == "waiting")
    })
    .await;
}

async fn connect_named(env: &Env, name: &str) -> Client {
    connect_to(&format!(
        "host=127.0.0.1 port={} user=app password=app dbname=app application_name={name}",
        env.port
    ))
    .await
}

/// A client connected with `conninfo`, its connection driven in a task.
async fn connect_to(conninfo: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .expect("connect");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A key of `users` stored on shard `shard` (read from the shard itself).
fn key_on(env: &Env, shard: usize) -> i64 {
    env.sql_shard(shard, "SELECT min(id) FROM users")
        .parse()
        .expect("a key on the shard")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_answers_in_pgbouncer_layouts_with_live_figures() {
    let env = two_shards("").await;
    let admin = console(&env).await;

    // SHOW POOLS: PgBouncer's columns first, in its order; a row per user
    // (its pools on every node summed: tools label by database and user).
    let (columns, pools) = show(&admin, "SHOW POOLS").await;
    let pgbouncer = [
        "database",
        "user",
        "cl_active",
        "cl_waiting",
        "cl_active_cancel_req",
        "cl_waiting_cancel_req",
        "sv_active",
        "sv_active_cancel",
        "sv_being_canceled",
        "sv_idle",
        "sv_used",
        "sv_tested",
        "sv_login",
        "maxwait",
        "maxwait_us",
        "pool_mode",
    ];
    assert_eq!(columns[..pgbouncer.len()], pgbouncer);
    let users = 9;
    assert_eq!(pools.len(), users, "{pools:?}");
    assert!(pools.iter().all(|r| int(r, "nodes") == 4), "{pools:?}");

    // A client in an open transaction on one shard: active on that shard's
    // primary, linked to the server connection SHOW SERVERS lists.
    let holder = connect_named(&env, "holder").await;
    let k0 = key_on(&env, 0);
    holder
        .batch_execute(&format!(
            "BEGIN; UPDATE users SET name = 'x' WHERE id = {k0}"
        ))
        .await
        .unwrap();
    let server_pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let id = client_id(&admin, "holder").await;
    let (_, clients) = show(&admin, "SHOW CLIENTS").await;
    let me = clients.iter().find(|r| get(r, "id") == id).unwrap();
    assert_eq!(get(me, "state"), "active");
    assert_eq!(int(me, "remote_pid"), i64::from(server_pid));
    assert_eq!(get(me, "database"), "app");
    let (_, servers) = show(&admin, "SHOW SERVERS").await;
    let s = servers
        .iter()
        .find(|r| int(r, "remote_pid") == i64::from(server_pid))
        .unwrap_or_else(|| panic!("server {server_pid} not in {servers:?}"));
    assert_eq!(get(s, "state"), "active");
    assert_eq!((get(s, "shard"), get(s, "role")), ("s0", "primary"));
    assert_eq!(
        i64::from_str_radix(get(s, "link"), 16).unwrap().to_string(),
        id,
        "the server links to its client"
    );
    let (_, pools) = show(&admin, "SHOW POOLS").await;
    let app = pools.iter().find(|r| get(r, "user") == "app").unwrap();
    assert_eq!(int(app, "cl_active"), 1, "{app:?}");
    assert!(int(app, "sv_active") >= 1, "{app:?}");
    let (_, databases) = show(&admin, "SHOW DATABASES").await;
    assert_eq!(databases.len(), 1, "one client database: {databases:?}");
    assert!(int(&databases[0], "current_connections") >= 1);
    holder.batch_execute("COMMIT").await.unwrap();

    // SHOW STATS counts transactions and queries as they are answered.
    let (_, before) = show(&admin, "SHOW STATS_TOTALS").await;
    let xacts_before = int(&before[0], "xact_count");
    let c = env.connect().await;
    for _ in 0..5 {
        c.batch_execute(&format!("SELECT * FROM users WHERE id = {k0}"))
            .await
            .unwrap();
    }
    c.batch_execute("BEGIN; SELECT 1; SELECT 2; COMMIT")
        .await
        .unwrap();
    let (_, after) = show(&admin, "SHOW STATS_TOTALS").await;
    assert_eq!(get(&after[0], "database"), "app");
    assert_eq!(int(&after[0], "xact_count") - xacts_before, 6, "{after:?}");
    assert!(int(&after[0], "bytes_received") > int(&before[0], "bytes_received"));
    let (columns, stats) = show(&admin, "SHOW STATS").await;
    assert_eq!(
        columns[..3],
        [
            "database",
            "total_server_assignment_count",
            "total_xact_count"
        ]
    );
    assert!(int(&stats[0], "total_query_count") >= int(&stats[0], "total_xact_count"));

    // Shardline's own views.
    let (_, shards) = show(&admin, "SHOW SHARDS").await;
    assert_eq!(shards.len(), 4);
    assert!(shards.iter().all(|r| get(r, "state") == "up"), "{shards:?}");
    let roles: Vec<&str> = shards.iter().map(|r| get(r, "role")).collect();
    assert_eq!(roles, ["primary", "replica", "primary", "replica"]);
    c.batch_execute("SELECT count(*) FROM users").await.unwrap();
    let (_, routing) = show(&admin, "SHOW ROUTING").await;
    let value = |name: &str| {
        routing
            .iter()
            .find(|r| get(r, "name") == name)
            .map(|r| int(r, "value"))
            .unwrap()
    };
    assert!(value("placed_one_shard") >= 5);
    assert!(value("placed_merge") + value("placed_fanout") >= 1);
    assert!(value("statements_routed") >= 5, "{routing:?}");
    assert_eq!(
        value("statements_routed"),
        value("cache_hits") + value("cache_misses"),
        "{routing:?}"
    );
    // Routing is timed from the proxy's first statement on (then one in 64).
    assert!(value("avg_route_ns") > 0, "{routing:?}");

    let (_, version) = show(&admin, "SHOW VERSION").await;
    assert!(get(&version[0], "version").starts_with("Shardline "));
    let (_, config) = show(&admin, "SHOW CONFIG").await;
    let size = config
        .iter()
        .find(|r| get(r, "key") == "pool.size")
        .unwrap();
    assert_eq!(get(size, "value"), "20");
    let (_, users_view) = show(&admin, "SHOW USERS").await;
    assert_eq!(users_view.len(), users);
    for what in [
        "HELP",
        "DATABASES",
        "LISTS",
        "MEM",
        "STATS_AVERAGES",
        "TRANSACTIONS",
        "READ_YOUR_WRITES",
    ] {
        let (columns, _) = show(&admin, &format!("SHOW {what}")).await;
        assert!(!columns.is_empty(), "SHOW {what}");
    }

    // psql, as an operator uses it.
    let (ok, out) = shardline_tests::psql(
        &format!("postgres://app:app@127.0.0.1:{}/shardline", env.port),
        &["-Atc", "SHOW LISTS"],
    );
    assert!(ok, "{out}");
    assert!(out.contains("used_clients|"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admins_reach_the_console_and_it_never_forwards() {
    let env = Env::start_with(EnvOptions {
        extra_toml: ADMIN.into(),
        ..EnvOptions::default()
    })
    .await
    .unwrap();
    // A user who is no admin: authenticated, then refused with 28000.
    let e = console_as(&env, "tinypool", "tiny-pw")
        .await
        .expect_err("refused");
    assert_eq!(sqlstate(&e).as_deref(), Some("28000"), "{e}");
    let msg = e.as_db_error().expect("a server error").message();
    assert!(msg.contains("admin.users"), "{msg}");
    // A wrong password looks like one anywhere else.
    let e = console_as(&env, "app", "wrong").await.expect_err("refused");
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{e}");
    let e = console_as(&env, "nobody", "x").await.expect_err("refused");
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{e}");

    // SQL is not forwarded: the console answers with its own error, and
    // the extended protocol (a driver's prepared query) is refused per unit.
    let admin = console(&env).await;
    let e = admin.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42601"), "{e}");
    let e = admin.query("SHOW POOLS", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("0A000"), "{e}");
    let (_, rows) = show(&admin, "show version;").await;
    assert_eq!(rows.len(), 1, "the console still answers");
    let before = env.server_backends(None);
    for _ in 0..3 {
        show(&admin, "SHOW SERVERS").await;
    }
    assert_eq!(
        env.server_backends(None),
        before,
        "no server connection for the console"
    );

    // Without [admin] there is no console: the database does not exist.
    let plain = Env::start().await.unwrap();
    let e = console_as(&plain, "app", "app")
        .await
        .expect_err("no console");
    assert_eq!(sqlstate(&e).as_deref(), Some("3D000"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_waits_for_open_transactions_then_holds_new_ones_until_resume() {
    let env = two_shards("").await;
    let admin = console(&env).await;
    let k0 = key_on(&env, 0);
    let k1 = key_on(&env, 1);

    // A transaction open on shard s0 when PAUSE comes: PAUSE waits for it.
    let open = connect_named(&env, "open").await;
    open.batch_execute(&format!(
        "BEGIN; UPDATE users SET name = 'p' WHERE id = {k0}"
    ))
    .await
    .unwrap();
    let pausing = {
        let admin = console(&env).await;
        tokio::spawn(async move { admin.simple_query("PAUSE").await.map(|_| Instant::now()) })
    };
    wait_for("PAUSE to take effect", || {
        let shared = env.proxy.as_ref().unwrap().shared.clone();
        async move { shared.admin.pause.mask() != 0 }
    })
    .await;
    // A new transaction is held (no error), on either shard.
    let held = connect_named(&env, "held").await;
    let held_write = tokio::spawn(async move {
        let r = held
            .batch_execute(&format!("UPDATE users SET name = 'h' WHERE id = {k1}"))
            .await;
        (r, Instant::now())
    });
    wait_until_waiting(&admin, "held", "the new transaction to be held").await;
    assert!(
        !pausing.is_finished(),
        "PAUSE returned while a transaction was open"
    );
    // The open transaction runs on and ends; then PAUSE returns.
    open.batch_execute(&format!("SELECT * FROM users WHERE id = {k0}; COMMIT"))
        .await
        .expect("an open transaction runs on during a pause");
    let paused_at = pausing.await.unwrap().expect("PAUSE succeeds");
    assert!(
        !held_write.is_finished(),
        "the held unit ran during the pause"
    );
    let (_, shards) = show(&admin, "SHOW SHARDS").await;
    assert!(shards.iter().all(|r| int(r, "paused") == 1), "{shards:?}");

    // RESUME: the held unit runs at once, without error.
    admin.simple_query("RESUME").await.unwrap();
    let resumed_at = Instant::now();
    let (r, done_at) = held_write.await.unwrap();
    r.expect("a held unit runs after RESUME");
    assert!(done_at >= paused_at);
    assert!(done_at.duration_since(resumed_at) < Duration::from_secs(5));
    assert_eq!(
        env.sql_shard(1, &format!("SELECT name FROM users WHERE id = {k1}")),
        "h"
    );
    let e = admin.simple_query("RESUME").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("55000"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_of_one_shard_holds_only_that_shard() {
    let env = two_shards("").await;
    let admin = console(&env).await;
    let k0 = key_on(&env, 0);
    let k1 = key_on(&env, 1);
    admin.simple_query("PAUSE s1").await.unwrap();
    let c = env.connect().await;
    // s0 runs.
    c.batch_execute(&format!("UPDATE users SET name = 'a' WHERE id = {k0}"))
        .await
        .expect("shard s0 is not paused");
    // s1 and a read of every shard wait.
    let c1 = env.connect().await;
    let on_s1 = tokio::spawn(async move {
        c1.batch_execute(&format!("UPDATE users SET name = 'b' WHERE id = {k1}"))
            .await
    });
    let c2 = env.connect().await;
    let everywhere =
        tokio::spawn(async move { c2.simple_query("SELECT count(*) FROM users").await });
    wait_for("two clients held", || {
        let admin = &admin;
        async move {
            let (_, clients) = show(admin, "SHOW CLIENTS").await;
            clients
                .iter()
                .filter(|r| get(r, "state") == "waiting")
                .count()
                == 2
        }
    })
    .await;
    let e = admin.simple_query("PAUSE nope").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42704"), "{e}");
    admin.simple_query("RESUME s1").await.unwrap();
    on_s1.await.unwrap().expect("runs after RESUME");
    everywhere.await.unwrap().expect("runs after RESUME");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_gives_up_naming_the_client_and_held_units_fail_after_max_hold() {
    let env = two_shards("pause_timeout = \"1s\"\nmax_hold = \"1s\"\n").await;
    let admin = console(&env).await;
    let k0 = key_on(&env, 0);
    let open = connect_named(&env, "stuck").await;
    open.batch_execute(&format!(
        "BEGIN; UPDATE users SET name = 's' WHERE id = {k0}"
    ))
    .await
    .unwrap();
    let id = client_id(&admin, "stuck").await;
    let e = admin.simple_query("PAUSE").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e}");
    let msg = e.as_db_error().unwrap().message().to_string();
    assert!(msg.contains(&format!("{id} (app@app")), "{msg}");
    // The pause is lifted: new transactions run.
    env.connect()
        .await
        .batch_execute("SELECT 1")
        .await
        .expect("not paused");
    open.batch_execute("COMMIT").await.unwrap();

    // A unit held longer than max_hold gets 57P03, and the client goes on.
    admin.simple_query("PAUSE").await.unwrap();
    let c = env.connect().await;
    let started = Instant::now();
    let e = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("57P03"), "{e}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    admin.simple_query("RESUME").await.unwrap();
    c.batch_execute("SELECT 1")
        .await
        .expect("the client carries on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_through_pause_and_resume_fails_nothing() {
    let env = two_shards("").await;
    let dir = shardline_tests::TempDir::new("pause-bench");
    let script = dir.write(
        "rw.sql",
        "\\set id random(1, 40)\nBEGIN;\nUPDATE users SET name = name WHERE id = :id;\nSELECT * FROM users WHERE id = :id;\nCOMMIT;\n",
    );
    let bench = shardline_tests::pgbench_script(env.port, 16, 6, &script);
    let admin = console(&env).await;
    let mut holds = Vec::new();
    let mut done = 0;
    for _ in 0..2 {
        let since = done;
        wait_for("transactions to run", || {
            let admin = &admin;
            async move {
                let (_, t) = show(admin, "SHOW STATS_TOTALS").await;
                int(&t[0], "xact_count") > since + 200
            }
        })
        .await;
        let (_, t) = show(&admin, "SHOW STATS_TOTALS").await;
        done = int(&t[0], "xact_count");
        let started = Instant::now();
        admin.simple_query("PAUSE").await.expect("PAUSE under load");
        tokio::time::sleep(Duration::from_millis(300)).await;
        admin.simple_query("RESUME").await.unwrap();
        holds.push(started.elapsed());
    }
    let (ok, out) = bench.join().unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    eprintln!("pauses (PAUSE to RESUME, 300 ms held): {holds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_client_ends_that_client_and_reconnect_replaces_connections() {
    let env = Env::start_with(EnvOptions {
        extra_toml: ADMIN.into(),
        replicas_per_shard: 0,
        ..EnvOptions::default()
    })
    .await
    .unwrap();
    let admin = console(&env).await;
    let victim = connect_named(&env, "victim").await;
    let bystander = connect_named(&env, "bystander").await;
    victim.batch_execute("SELECT 1").await.unwrap();
    let id = client_id(&admin, "victim").await;
    admin
        .simple_query(&format!("KILL_CLIENT {id}"))
        .await
        .unwrap();
    wait_for("the killed client to be gone", || {
        let admin = &admin;
        async move {
            let (_, clients) = show(admin, "SHOW CLIENTS").await;
            !clients
                .iter()
                .any(|r| get(r, "application_name") == "victim")
        }
    })
    .await;
    let e = victim.batch_execute("SELECT 1").await.unwrap_err();
    assert!(
        victim.is_closed() || sqlstate(&e).as_deref() == Some("57P01"),
        "{e}"
    );
    bystander
        .batch_execute("SELECT 1")
        .await
        .expect("the others carry on");
    let e = admin.simple_query("KILL_CLIENT 12345").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42704"), "{e}");

    // RECONNECT: the server connection in use is replaced once released.
    let before = backend_pid(&bystander).await;
    assert_eq!(
        before,
        backend_pid(&bystander).await,
        "one idle connection is reused"
    );
    admin.simple_query("RECONNECT").await.unwrap();
    let after = backend_pid(&bystander).await;
    assert_ne!(before, after, "RECONNECT closed the old connection");
    wait_for("the old server connection to close", || {
        let n = env.sql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = {before}"
        ));
        async move { n == "0" }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_client_ends_a_client_waiting_for_a_server_connection() {
    let env = Env::start_with(EnvOptions {
        extra_toml: ADMIN.into(),
        pool_toml: "checkout_timeout = \"20s\"\n".into(),
        replicas_per_shard: 0,
        ..EnvOptions::default()
    })
    .await
    .unwrap();
    let admin = console(&env).await;
    // Both of tinypool's connections held in open transactions.
    let a = env.connect_as("tinypool", "tiny-pw").await.unwrap();
    let b = env.connect_as("tinypool", "tiny-pw").await.unwrap();
    a.simple_query("BEGIN; SELECT 1").await.unwrap();
    b.simple_query("BEGIN; SELECT 1").await.unwrap();
    let waiter = connect_to(&format!(
        "host=127.0.0.1 port={} user=tinypool password=tiny-pw dbname=app application_name=waiter",
        env.port
    ))
    .await;
    let waiting = tokio::spawn(async move { waiter.simple_query("SELECT 1").await.map(|_| ()) });
    wait_until_waiting(&admin, "waiter", "the client to wait for a connection").await;
    let id = client_id(&admin, "waiter").await;
    let killed_at = Instant::now();
    admin
        .simple_query(&format!("KILL_CLIENT {id}"))
        .await
        .unwrap();
    // Ended at once, not when a connection frees up or the 20 s checkout
    // timeout passes.
    let ended = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting client ended")
        .unwrap();
    assert!(killed_at.elapsed() < Duration::from_secs(5));
    let e = ended.unwrap_err();
    assert!(
        e.is_closed() || sqlstate(&e).as_deref() == Some("57P01"),
        "{e}"
    );
    let (_, pools) = show(&admin, "SHOW POOLS").await;
    let tiny = pools
        .iter()
        .find(|r| get(r, "user") == "tinypool")
        .expect("tinypool's pools");
    assert_eq!(int(tiny, "cl_waiting"), 0, "{tiny:?}");
    // The holders' transactions are theirs still.
    a.simple_query("COMMIT").await.unwrap();
    b.simple_query("COMMIT").await.unwrap();
}

/// KILL_CLIENT ends a client held by PAUSE at once (57P01 or closed), not
/// at RESUME or `max_hold`; another held client stays held and runs after
/// RESUME.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_client_ends_a_client_held_by_pause() {
    let env = two_shards("").await;
    let admin = console(&env).await;
    let k0 = key_on(&env, 0);
    admin.simple_query("PAUSE").await.unwrap();
    /// A client named `name` reading the row of `key` in a task.
    async fn held(
        env: &Env,
        name: &str,
        key: i64,
    ) -> tokio::task::JoinHandle<Result<(), tokio_postgres::Error>> {
        let c = connect_named(env, name).await;
        tokio::spawn(async move {
            c.simple_query(&format!("SELECT name FROM users WHERE id = {key}"))
                .await
                .map(|_| ())
        })
    }
    let doomed = held(&env, "doomed", k0).await;
    let kept = held(&env, "kept", k0).await;
    wait_until_waiting(&admin, "doomed", "the client to be held").await;
    wait_until_waiting(&admin, "kept", "the other client to be held").await;
    let id = client_id(&admin, "doomed").await;
    admin
        .simple_query(&format!("KILL_CLIENT {id}"))
        .await
        .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), doomed)
        .await
        .expect("the held client ended at once")
        .unwrap()
        .unwrap_err();
    assert!(
        e.is_closed() || sqlstate(&e).as_deref() == Some("57P01"),
        "{e}"
    );
    // The session leaves the registry when its task ends, a moment after
    // the client has seen its connection close.
    wait_for("the killed client to leave SHOW CLIENTS", || async {
        let (_, clients) = show(&admin, "SHOW CLIENTS").await;
        !clients
            .iter()
            .any(|r| get(r, "application_name") == "doomed")
    })
    .await;
    assert!(!kept.is_finished(), "the other client ran during the pause");
    admin.simple_query("RESUME").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), kept)
        .await
        .expect("the other client ran after RESUME")
        .unwrap()
        .expect("without error");
}

async fn backend_pid(c: &Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pg_backend_pid")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_from_the_console_stops_the_process() {
    let env = Env::start_with(EnvOptions {
        replicas_per_shard: 0,
        ..EnvOptions::default()
    })
    .await
    .unwrap();
    let config = format!("{}\n{ADMIN}", env.shards_config(&[0], ""));
    let (mut proxy, client) = ProxyProcess::start(&config, &[]).await;
    client.batch_execute("SELECT 1").await.unwrap();
    let admin = connect_to(&format!(
        "host=127.0.0.1 port={} user=app password=app dbname=shardline",
        proxy.port
    ))
    .await;
    admin.simple_query("SHUTDOWN").await.unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = proxy.child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "still running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
    assert!(client.batch_execute("SELECT 1").await.is_err());
}

/// GET `path` from an HTTP server on 127.0.0.1 (the body, if it answered 200).
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200").then(|| body.to_string())
}

/// Debian's PgBouncer exporter (prometheus-pgbouncer-exporter) scrapes the
/// console, named `pgbouncer` here, as it scrapes PgBouncer's: SHOW LISTS,
/// STATS, POOLS and DATABASES by column name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pgbouncer_exporter_scrapes_the_console() {
    let env = Env::start_with(EnvOptions {
        extra_toml: "[admin]\nusers = [\"app\"]\ndatabase = \"pgbouncer\"\n".into(),
        ..EnvOptions::default()
    })
    .await
    .unwrap();
    let c = env.connect().await;
    for _ in 0..3 {
        c.batch_execute("SELECT 1").await.unwrap();
    }
    let port = shardline::cluster::free_port().unwrap();
    let mut exporter = std::process::Command::new("prometheus-pgbouncer-exporter")
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "--pgbouncer-host",
            "127.0.0.1",
            "--pgbouncer-port",
            &env.port.to_string(),
        ])
        .args(["--pgbouncer-user", "app"])
        .env("PGPASSWORD", "app")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("prometheus-pgbouncer-exporter (installed by scripts/setup-debian.sh)");
    let mut metrics = None;
    wait_for("the exporter's metrics", || {
        metrics = http_get(port, "/metrics").filter(|m| m.contains("pgbouncer_requests_total{"));
        let ok = metrics.is_some() || exporter.try_wait().ok().flatten().is_some();
        async move { ok }
    })
    .await;
    let _ = exporter.kill();
    let output = exporter.wait_with_output().unwrap();
    let metrics = metrics.unwrap_or_else(|| {
        panic!(
            "the exporter ended: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
    };
    assert!(value("pgbouncer_requests_total{database=\"app\"}") >= 3.0);
    assert!(value("pgbouncer_received_bytes_total{database=\"app\"}") > 0.0);
    assert_eq!(
        value("pgbouncer_active_clients{database=\"app\",user=\"app\"}"),
        0.0
    );
    assert_eq!(value("pgbouncer_pool_size{database=\"app\"}"), 20.0);
    assert_eq!(value("pgbouncer_users"), 9.0);
    assert!(
        value("pgbouncer_used_clients") >= 2.0,
        "the client and the exporter"
    );
}
