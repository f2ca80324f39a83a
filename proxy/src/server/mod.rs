//! Server side: one connection to a Postgres node (startup, authentication,
//! raw messages) and what it holds (statements, session variables). The
//! pools that keep them are `crate::pool`.

pub mod conn;
pub mod statements;
pub mod vars;

pub use conn::{ServerConnection, ServerError, ServerTarget};
