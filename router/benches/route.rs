//! Router hot paths: a cache hit, a cold parse + classify, and sharded
//! routing (cache hit + key read + hash + ring lookup).
//! cargo bench -p shardline-router

use criterion::{criterion_group, criterion_main, Criterion};
use shardline_router::cache::route_uncached;
use shardline_router::hash::KeyValue;
use shardline_router::sharding::Sharding;
use shardline_router::shards::{resolve, KeyInput};
use shardline_router::{Options, Router};
use std::hint::black_box;
use std::sync::Arc;

const POINT_SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = 48273";
const ORM_SELECT: &str = "SELECT \"users\".\"id\", \"users\".\"email\", \"users\".\"name\" FROM \"users\" WHERE \"users\".\"id\" = $1 LIMIT $2";

fn sharding() -> Arc<Sharding> {
    let c = shardline_config::Config::from_toml(
        r#"
        [[users]]
        name = "a"
        password = "a"
        database = "a"
        [[sharding.tables]]
        name = "users"
        column = "id"
        [[shards]]
        name = "s0"
        primary = { host = "h", port = 1 }
        [[shards]]
        name = "s1"
        primary = { host = "h", port = 2 }
        "#,
        "bench",
    )
    .expect("config");
    Arc::new(Sharding::from_config(&c))
}

fn bench(c: &mut Criterion) {
    let options = Options::default();
    c.bench_function("cold parse+classify point select", |b| {
        b.iter(|| route_uncached(black_box(POINT_SELECT), &options, None))
    });
    c.bench_function("cold parse+classify ORM select", |b| {
        b.iter(|| route_uncached(black_box(ORM_SELECT), &options, None))
    });
    let mut router = Router::new(Options::default(), 10_000, None);
    router.route(POINT_SELECT);
    c.bench_function("cache hit", |b| {
        b.iter(|| router.route(black_box(POINT_SELECT)))
    });
    // The same shape with another constant: what pgbench -M simple sends.
    c.bench_function("cache hit, other constant", |b| {
        b.iter(|| {
            router.route(black_box(
                "SELECT abalance FROM pgbench_accounts WHERE aid = 7",
            ))
        })
    });

    let sh = sharding();
    let mut sharded = Router::new(Options::default(), 10_000, Some(sh.clone()));
    c.bench_function("sharded: cold parse+classify+analyse point select", |b| {
        b.iter(|| {
            route_uncached(
                black_box("SELECT name FROM users WHERE id = 48273"),
                &options,
                Some(&sh),
            )
        })
    });
    // A point query by key, simple protocol: cache hit, constant read, hash, ring.
    let sql = "SELECT name FROM users WHERE id = 48273";
    sharded.route(sql);
    c.bench_function(
        "sharded: point query by constant key (cache hit + place)",
        |b| {
            b.iter(|| {
                let route = sharded.route(black_box(sql));
                let input = KeyInput {
                    sql: sql.into(),
                    params: &[],
                    param_types: &[],
                    session_shard: None,
                    session_key: None,
                    constants: None,
                };
                resolve(&route.shards.expect("sharded")[0], &sh, &input)
            })
        },
    );
    // Extended protocol: the template from Parse, the key from Bind's parameter.
    let route = sharded.route("SELECT name FROM users WHERE id = $1");
    let template = route.shards.expect("sharded")[0].clone();
    let param = 48273i64.to_be_bytes();
    c.bench_function("sharded: place a Bind (binary int8 key)", |b| {
        b.iter(|| {
            let params = [(1i16, Some(&param[..]))];
            let input = KeyInput {
                sql: "SELECT name FROM users WHERE id = $1".into(),
                params: &params,
                param_types: &[],
                session_shard: None,
                session_key: None,
                constants: None,
            };
            resolve(black_box(&template), &sh, &input)
        })
    });
    c.bench_function("hash int8 + ring lookup", |b| {
        b.iter(|| sh.groups[0].shard_of(Some(&KeyValue::Int(black_box(48273)))))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
