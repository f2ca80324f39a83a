//! Every integration test against real Postgres servers, one module per
//! area (`cargo test -p shardline-tests --test integration online::` runs
//! one). One binary rather than one per file: a clean build links once and
//! needs a fraction of the disk. The container tier is its own binary
//! (`containers.rs`, feature `containers`).

mod admin;
mod auth;
mod bad_input;
mod batching;
mod cache;
mod demo;
mod differential;
mod drivers;
mod failover;
mod memory;
mod merge_order;
mod metrics;
mod online;
mod pooling;
mod protocol;
mod rebalance;
mod reload;
mod routing;
mod scatter;
mod sharding;
mod shutdown;
mod startup;
mod tools;
mod twophase;
