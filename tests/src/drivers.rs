//! The driver matrix's programs (`tests/drivers/`), run against any [`Env`]
//! with the demo's tables: the process tier's topology (`tests/drivers.rs`)
//! and the compose cluster (`tests/containers.rs`). Each program writes keys
//! from a first key on in every batching its driver has, reads them back and
//! prints the keys it wrote; [`run_driver`] then audits every row's shard on
//! the servers themselves.
//!
//! Drivers are installed by `scripts/setup-debian.sh` (psycopg 3, asyncpg,
//! SQLAlchemy and psycopg2 from PyPI, node-postgres from npm, PgJDBC and pgx
//! from Debian's packages).

use crate::{Env, TempDir};

use shardline_router::sharding::Sharding;
use std::path::Path;
use std::process::Command;

/// A driver program ready to run, and the build directory it needs kept.
pub struct Driver {
    pub name: &'static str,
    cmd: Command,
    _build: Option<TempDir>,
}

/// Runs `driver` with `first_key`, and checks that the users on the servers
/// are exactly `before` and the keys it reports, each on its shard.
pub async fn run_driver(
    env: &Env,
    sh: &Sharding,
    driver: Driver,
    first_key: i64,
    before: &[i64],
) -> String {
    let out = run_checks(driver, &[first_key.to_string()]).await;
    let mut expected: Vec<i64> = out
        .lines()
        .find_map(|l| l.strip_prefix("keys "))
        .expect("the written keys")
        .split(',')
        .map(|k| k.parse().unwrap())
        .chain(before.iter().copied())
        .collect();
    expected.sort();
    assert_eq!(crate::audit_users(env, sh, 2), expected, "{out}");
    out
}

/// Runs `driver` with `args` after its own and checks that it passed all
/// its checks; its output.
pub async fn run_checks(mut driver: Driver, args: &[String]) -> String {
    driver.cmd.args(args);
    let mut cmd = driver.cmd;
    let (ok, out) = tokio::task::spawn_blocking(move || crate::run(&mut cmd))
        .await
        .unwrap();
    assert!(
        ok && out.contains("all checks passed"),
        "{} (drivers are installed by scripts/setup-debian.sh):\n{out}",
        driver.name
    );
    out
}

fn source(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// `program script URL`, the script under `tests/`.
fn script(name: &'static str, program: &str, path: &str, url: String) -> Driver {
    let mut cmd = Command::new(program);
    cmd.arg(source(path)).arg(url);
    Driver {
        name,
        cmd,
        _build: None,
    }
}

/// psycopg 3 (plain, prepared, pipeline, binary, transactions, a pipeline
/// spanning shards), asyncpg (statement cache on and off, cursors,
/// executemany, binary COPY), SQLAlchemy's ORM (flushes, relationships),
/// psycopg2.
pub fn python(env: &Env) -> Driver {
    script(
        "python drivers",
        "python3",
        "drivers/python_drivers.py",
        env.url("app", "app"),
    )
}

/// node-postgres: named queries, unnamed ones, pg-cursor, a pool of 20.
pub fn node(env: &Env) -> Driver {
    script(
        "node-postgres",
        "node",
        "drivers/node/node_drivers.js",
        env.url("app", "app"),
    )
}

/// PgJDBC (Debian's package): prepared statements past prepareThreshold,
/// a batch across shards in autocommit, a transaction with a fetch-size
/// cursor, rollback() after a refused statement, CopyManager.
pub fn jdbc(env: &Env) -> Driver {
    java(env, "PgJDBC", "JdbcDrivers")
}

/// PgJDBC with autocommit off while a shard's primary is down
/// (`tests/drivers/jdbc/JdbcPrimaryDown.java`): its BEGIN goes in one unit
/// with each transaction's first statement.
pub fn jdbc_primary_down(env: &Env) -> Driver {
    java(env, "PgJDBC, a primary down", "JdbcPrimaryDown")
}

/// `tests/drivers/jdbc/CLASS.java` compiled against Debian's PgJDBC, run
/// with the proxy's URL.
fn java(env: &Env, name: &'static str, class: &str) -> Driver {
    let jar = "/usr/share/java/postgresql.jar";
    let classes = TempDir::new("jdbc");
    let (ok, out) = crate::run(
        Command::new("javac")
            .args(["-cp", jar, "-d"])
            .arg(classes.path(""))
            .arg(source(&format!("drivers/jdbc/{class}.java"))),
    );
    assert!(ok, "javac (installed by scripts/setup-debian.sh):\n{out}");
    let mut cmd = Command::new("java");
    cmd.arg("-cp")
        .arg(format!("{}:{jar}", classes.path("").display()))
        .arg(class)
        .arg(format!(
            "jdbc:postgresql://127.0.0.1:{}/app?user=app&password=app",
            env.port
        ));
    Driver {
        name,
        cmd,
        _build: Some(classes),
    }
}

/// pgx (Debian's v4, built in GOPATH mode): the statement cache preparing
/// named statements, "describe" mode, no cache, the simple protocol; in
/// each, batches across shards (in autocommit and in transactions) and
/// CopyFrom (binary COPY); a pool of goroutines.
pub fn pgx(env: &Env) -> Driver {
    let build = TempDir::new("pgx");
    let binary = build.path("pgx-drivers");
    let (ok, out) = crate::run(
        Command::new("go")
            .args(["build", "-o"])
            .arg(&binary)
            .arg(".")
            .current_dir(source("drivers/pgx"))
            .env("GO111MODULE", "off")
            .env("GOPATH", "/usr/share/gocode")
            .env("GOCACHE", build.path("cache"))
            .env("GOFLAGS", ""),
    );
    assert!(
        ok,
        "go build of the pgx driver program (Go and pgx installed by scripts/setup-debian.sh):\n{out}"
    );
    let mut cmd = Command::new(&binary);
    cmd.arg(env.url("app", "app"));
    Driver {
        name: "pgx",
        cmd,
        _build: Some(build),
    }
}
