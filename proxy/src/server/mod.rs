//! Server side: raw connections to Postgres nodes and the pools that hold them.

pub mod conn;
pub mod pool;

pub use conn::{ServerConnection, ServerError, ServerTarget};
pub use pool::{NodePool, PoolSet};
