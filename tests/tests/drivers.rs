//! The driver matrix: real drivers, as applications use them, against the
//! demo's topology (two shards, each a primary and a streaming replica,
//! two-phase commit on). Each driver writes keys in every batching it has
//! and reads them back; afterwards every row's physical shard is audited
//! against the owner of its key on the servers themselves.
//!
//! Drivers are installed by `scripts/setup-debian.sh` (psycopg 3, asyncpg,
//! SQLAlchemy from PyPI).

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
        "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL);
         CREATE TABLE orders (id bigint, user_id bigint NOT NULL, amount numeric(12,2), PRIMARY KEY (user_id, id));",
    )
    .await
    .expect("schema through the proxy");
    let sh = Sharding::from_config(&Config::from_toml(&env.config_text, "t").expect("config"));
    (env, sh)
}

/// Runs a driver script (`program script URL BASE`) and checks that every
/// key it reports is on the servers, each on its shard, and nothing else.
async fn run_driver(env: &Env, sh: &Sharding, program: &str, script: &str) -> String {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let url = env.url("app", "app");
    let program = program.to_string();
    let (ok, out) = tokio::task::spawn_blocking(move || {
        shardline_tests::run(
            std::process::Command::new(program)
                .arg(script)
                .arg(url)
                .arg("1000"),
        )
    })
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

/// psycopg 3 (plain, prepared, pipeline, binary, transactions, a pipeline
/// spanning shards), asyncpg (statement cache on and off, cursors,
/// executemany, binary COPY), SQLAlchemy's ORM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_drivers() {
    let (env, sh) = demo_topology().await;
    let out = run_driver(&env, &sh, "python3", "drivers/python_drivers.py").await;
    println!("{out}");
}

/// node-postgres: named queries, unnamed ones, pg-cursor, a pool of 20.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres() {
    let (env, sh) = demo_topology().await;
    let out = run_driver(&env, &sh, "node", "drivers/node/node_drivers.js").await;
    println!("{out}");
}
