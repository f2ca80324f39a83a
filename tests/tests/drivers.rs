//! The driver matrix: real drivers, as applications use them, against the
//! demo's topology (two shards, each a primary and a streaming replica,
//! two-phase commit on). Each driver writes keys in every batching it has
//! and reads them back; afterwards every row's physical shard is audited
//! against the owner of its key on the servers themselves.
//!
//! The programs and the audit are in `shardline_tests::drivers`; the
//! container tier runs them against the compose cluster too.

use shardline_config::Config;
use shardline_router::sharding::Sharding;
use shardline_tests::drivers::{self, run_driver};
use shardline_tests::Env;

async fn demo_topology() -> (Env, Sharding) {
    let env = Env::demo_sharded("").await;
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

/// psycopg 3, asyncpg, SQLAlchemy's ORM, psycopg2 (see `drivers::python`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_drivers() {
    let (env, sh) = demo_topology().await;
    let out = run_driver(&env, &sh, drivers::python(&env), 1000, &[]).await;
    println!("{out}");
}

/// node-postgres (see `drivers::node`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres() {
    let (env, sh) = demo_topology().await;
    let out = run_driver(&env, &sh, drivers::node(&env), 1000, &[]).await;
    println!("{out}");
}

/// PgJDBC (see `drivers::jdbc`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc() {
    let (env, sh) = demo_topology().await;
    let out = run_driver(&env, &sh, drivers::jdbc(&env), 1000, &[]).await;
    println!("{out}");
}

/// pgx (see `drivers::pgx`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgx() {
    let (env, sh) = demo_topology().await;
    let out = run_driver(&env, &sh, drivers::pgx(&env), 1000, &[]).await;
    println!("{out}");
}
