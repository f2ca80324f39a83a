//! `shardline-rebalance`: moves the rows whose shard changes between two
//! configs, verified and resumable.
//!
//! - [`layout`]: the two configs compared, placement as SQL (pure);
//! - [`db`]: connections, catalog checks, counts and checksums on the servers;
//! - [`copy`]: streaming rows from one server to another;
//! - [`apply`], [`plan`], [`verify`]: the three commands;
//! - [`online`]: moving rows with logical replication while traffic flows;
//! - [`hide`]: hiding moved rows on their old shards until they are deleted;
//! - [`proxies`]: the proxies' admin consoles around a move (`--admin`).

pub mod apply;
pub mod copy;
pub mod db;
pub mod hide;
pub mod layout;
pub mod online;
pub mod plan;
pub mod proxies;
pub mod verify;
