//! Router hot paths: a cache hit, and a cold parse + classify.
//! cargo bench -p shardline-router

use criterion::{criterion_group, criterion_main, Criterion};
use shardline_router::cache::route_uncached;
use shardline_router::{Options, Router};
use std::hint::black_box;

const POINT_SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = 48273";
const ORM_SELECT: &str = "SELECT \"users\".\"id\", \"users\".\"email\", \"users\".\"name\" FROM \"users\" WHERE \"users\".\"id\" = $1 LIMIT $2";

fn bench(c: &mut Criterion) {
    let options = Options::default();
    c.bench_function("cold parse+classify point select", |b| {
        b.iter(|| route_uncached(black_box(POINT_SELECT), &options))
    });
    c.bench_function("cold parse+classify ORM select", |b| {
        b.iter(|| route_uncached(black_box(ORM_SELECT), &options))
    });
    let mut router = Router::new(Options::default(), 10_000);
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
}

criterion_group!(benches, bench);
criterion_main!(benches);
