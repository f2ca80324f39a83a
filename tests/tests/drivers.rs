//! The driver matrix: real drivers, as applications use them, against the
//! demo's topology (two shards, each a primary and a streaming replica,
//! two-phase commit on). Each driver writes keys in every batching it has
//! and reads them back; afterwards every row's physical shard is audited
//! against the owner of its key on the servers themselves.
//!
//! Drivers are installed by `scripts/setup-debian.sh` (psycopg 3, asyncpg,
//! SQLAlchemy and psycopg2 from PyPI, node-postgres from npm, PgJDBC and
//! pgx from Debian's packages).

use shardline_config::Config;
use shardline_router::sharding::Sharding;
use shardline_tests::{Env, EnvOptions};

const SHARDING: &str = r#"
[sharding]
function = "consistent"
two_phase_commit = true

[[sharding.tables]]
name = "users"
column = "id"
[[sharding.tables]]
name = "orders"
column = "user_id"
"#;

async fn demo_topology() -> (Env, Sharding) {
    let env = Env::start_with(EnvOptions {
        shards: 2,
        replicas_per_shard: 1,
        extra_toml: SHARDING.into(),
        ..EnvOptions::default()
    })
    .await
    .expect("two shards with replicas");
    env.wait_healthy().await;
    let c = env.connect().await;
    c.batch_execute(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE orders (id bigint, user_id bigint NOT NULL, amount numeric(12,2), PRIMARY KEY (user_id, id));",
    )
    .await
    .expect("schema through the proxy");
    let sh = Sharding::from_config(&Config::from_toml(&env.config_text, "t").expect("config"));
    (env, sh)
}

/// Runs a driver program (its arguments: the proxy's URL, then the first
/// key to use) and checks that every key it reports is on the servers, each
/// on its shard, and nothing else.
async fn run_driver(env: &Env, sh: &Sharding, mut cmd: std::process::Command) -> String {
    cmd.arg("1000");
    let (ok, out) = tokio::task::spawn_blocking(move || shardline_tests::run(&mut cmd))
        .await
        .unwrap();
    assert!(
        ok && out.contains("all checks passed"),
        "drivers are installed by scripts/setup-debian.sh:\n{out}"
    );
    let written: Vec<i64> = out
        .lines()
        .find_map(|l| l.strip_prefix("keys "))
        .expect("the written keys")
        .split(',')
        .map(|k| k.parse().unwrap())
        .collect();
    assert_eq!(shardline_tests::audit_users(env, sh, 2), written, "{out}");
    out
}

/// `program script URL`, the script under `tests/`.
fn script(program: &str, script: &str, url: String) -> std::process::Command {
    let mut cmd = std::process::Command::new(program);
    cmd.arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(script))
        .arg(url);
    cmd
}

/// psycopg 3 (plain, prepared, pipeline, binary, transactions, a pipeline
/// spanning shards), asyncpg (statement cache on and off, cursors,
/// executemany, binary COPY), SQLAlchemy's ORM (flushes, relationships),
/// psycopg2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_drivers() {
    let (env, sh) = demo_topology().await;
    let cmd = script(
        "python3",
        "drivers/python_drivers.py",
        env.url("app", "app"),
    );
    let out = run_driver(&env, &sh, cmd).await;
    println!("{out}");
}

/// node-postgres: named queries, unnamed ones, pg-cursor, a pool of 20.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres() {
    let (env, sh) = demo_topology().await;
    let cmd = script(
        "node",
        "drivers/node/node_drivers.js",
        env.url("app", "app"),
    );
    let out = run_driver(&env, &sh, cmd).await;
    println!("{out}");
}

/// PgJDBC (Debian's package): prepared statements past prepareThreshold,
/// a batch across shards in autocommit, a transaction with a fetch-size
/// cursor, rollback() after a refused statement, CopyManager.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc() {
    let (env, sh) = demo_topology().await;
    let jar = "/usr/share/java/postgresql.jar";
    let classes = shardline_tests::TempDir::new("jdbc");
    let source =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("drivers/jdbc/JdbcDrivers.java");
    let (ok, out) = shardline_tests::run(
        std::process::Command::new("javac")
            .args(["-cp", jar, "-d"])
            .arg(classes.path(""))
            .arg(source),
    );
    assert!(ok, "javac (installed by scripts/setup-debian.sh):\n{out}");
    let mut cmd = std::process::Command::new("java");
    cmd.arg("-cp")
        .arg(format!("{}:{jar}", classes.path("").display()))
        .arg("JdbcDrivers")
        .arg(format!(
            "jdbc:postgresql://127.0.0.1:{}/app?user=app&password=app",
            env.port
        ));
    let out = run_driver(&env, &sh, cmd).await;
    println!("{out}");
}

/// pgx (Debian's v4, built in GOPATH mode): the statement cache preparing
/// named statements, "describe" mode, no cache, the simple protocol; in
/// each, batches across shards (in autocommit and in transactions) and
/// CopyFrom (binary COPY); a pool of goroutines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgx() {
    let (env, sh) = demo_topology().await;
    let build = shardline_tests::TempDir::new("pgx");
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("drivers/pgx");
    let binary = build.path("pgx-drivers");
    let (ok, out) = shardline_tests::run(
        std::process::Command::new("go")
            .args(["build", "-o"])
            .arg(&binary)
            .arg(".")
            .current_dir(&source)
            .env("GO111MODULE", "off")
            .env("GOPATH", "/usr/share/gocode")
            .env("GOCACHE", build.path("cache"))
            .env("GOFLAGS", ""),
    );
    assert!(
        ok,
        "go build of the pgx driver program (Go and pgx installed by scripts/setup-debian.sh):\n{out}"
    );
    let mut cmd = std::process::Command::new(&binary);
    cmd.arg(env.url("app", "app"));
    let out = run_driver(&env, &sh, cmd).await;
    println!("{out}");
}
