//! Shardline's routing logic, pure: no sockets, no clock, no pools. Input is
//! statement text (and, later, bound parameters and session facts); output is
//! data the proxy acts on. Everything here is unit-tested and benchmarked alone.
//!
//! Today: read/write classification (`classify`), routing hints in leading
//! comments (`hint`), a bounded cache of results keyed by statement text
//! (`cache`), where a unit of work runs (`plan`), which replica serves a read
//! (`balance`), and the small SQL lexer
//! shared with the proxy (`lexer`).

pub mod balance;
pub mod cache;
pub mod cacheable;
pub mod classify;
pub mod effect;
pub mod gather;
pub mod hash;
pub mod hint;
pub mod lexer;
pub mod memo;
pub mod merge;
pub mod numeric;
pub mod plan;
pub mod scatter;
pub mod sharding;
pub mod shards;

pub use cache::{Route, Router, SharedRouter};
pub use classify::{classify, Class, Options, Source};
pub use hint::{Hint, RoleHint};
pub use plan::{lone_transaction_end, plan_unit, Access, Target, UnitFacts, UnitPlan};
