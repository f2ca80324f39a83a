//! Which shards a statement reaches.
//!
//! A statement is analysed once per shape (the parse cache's key) into a
//! [`Template`]: the tables it touches, and where its sharding key comes
//! from — the n-th constant of the text, or the n-th bound parameter — but
//! not the key's value. [`resolve`] then reads the values from the
//! statement's own constants or from a Bind's parameters and gives the
//! [`Placement`], without parsing again.
//!
//! The rules (SPEC "Routing rules"): a key in `WHERE key = v`, `key IN
//! (...)`, `key = ANY($n)`, AND/OR of those, joins of co-located tables on
//! the key, INSERT column lists; no key → every shard; unsharded tables →
//! the default shard; reference tables → any one shard for reads, every
//! shard for writes; DDL → every shard. Whatever would give a wrong answer
//! across shards is refused with SQLSTATE 0A000 saying why.

use crate::hash::KeyValue;
use crate::hint::Hint;
use crate::sharding::{mask_of, ShardMask, Sharding, TableKind};
use sqlparser::ast::{
    BinaryOperator, CopySource, Expr, FromTable, GroupByExpr, ObjectName, ObjectNamePart,
    OnConflictAction, OnInsert, Query, SelectItem, SetExpr, Statement, TableFactor, TableObject,
    TableWithJoins, UnaryOperator, Value, Visit, Visitor,
};
use std::ops::ControlFlow;

mod analyze;
mod constants;
mod literals;
mod resolve;
mod split;

pub use analyze::*;
pub use constants::*;
use literals::*;
pub use resolve::*;
pub use split::*;

/// Where one key value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeySrc {
    /// The n-th constant of the statement text (0-based, in the order the
    /// parse cache's `shape` finds them); `negative` for `-5`.
    Const {
        ordinal: u16,
        negative: bool,
    },
    /// Bound parameter `$n` (1-based), read as `ty` unless the statement
    /// declares its type.
    Param {
        n: u16,
        ty: ParamType,
    },
    Null,
    /// An expression the proxy does not evaluate.
    Unknown,
}

/// The type a bound parameter has on the server, as far as the statement
/// says (a cast on it or on the column it is compared with).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamType {
    /// The key column's own type (no cast).
    Column,
    Int,
    Text,
    Uuid,
    Float,
    /// Any other type: its value is not read as a key.
    Other,
}

impl ParamType {
    /// The class of a type named in a cast (`$1::int8`, `id::text`).
    pub fn of_cast(data_type: &sqlparser::ast::DataType) -> ParamType {
        let name = data_type.to_string().to_ascii_lowercase();
        let base = name.split('(').next().unwrap_or("").trim();
        match base {
            "smallint" | "int" | "integer" | "bigint" | "int2" | "int4" | "int8" => ParamType::Int,
            "text" | "varchar" | "character varying" | "char" | "character" | "bpchar" | "name" => {
                ParamType::Text
            }
            "uuid" => ParamType::Uuid,
            "real" | "float" | "float4" | "float8" | "double precision" => ParamType::Float,
            _ => ParamType::Other,
        }
    }

    /// The class of a parameter type OID a Parse declared (0: none).
    pub fn of_oid(oid: u32) -> Option<ParamType> {
        Some(match oid {
            0 => return None,
            20 | 21 | 23 => ParamType::Int,
            25 | 1043 | 1042 | 19 | 705 => ParamType::Text,
            2950 => ParamType::Uuid,
            700 | 701 => ParamType::Float,
            _ => ParamType::Other,
        })
    }
}

/// Which keys a condition allows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyExpr {
    /// Any key: no restriction found.
    All,
    Keys(Vec<KeySrc>),
    /// `key = ANY($n)`: an array parameter.
    AnyParam(u16),
    And(Vec<KeyExpr>),
    Or(Vec<KeyExpr>),
}

/// Where a statement's rows live.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// No table (SELECT 1, SET, BEGIN ...) or only system catalogs: runs
    /// anywhere (the transaction's shard, else the default shard).
    Anywhere,
    /// Unsharded tables (perhaps with reference tables): the default shard.
    Default,
    /// Only reference tables: a read on any one shard, a write on all.
    Reference,
    /// Sharded tables of one group.
    Sharded {
        group: usize,
        key: KeyExpr,
        /// A multi-row INSERT: `key` lists each row's key; rows of
        /// different shards are split.
        rows: bool,
        /// An UPDATE (or ON CONFLICT DO UPDATE) assigns the key column.
        key_change: Option<KeySrc>,
    },
    /// Every shard: DDL and utility statements.
    AllShards,
}

/// A refusal: SQLSTATE and message, and for a 0A000 the construct refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
    /// What was refused, for a 0A000 (`None`: a bad value, not a construct).
    pub construct: Option<Construct>,
}

impl Refusal {
    /// A 0A000 refusal: the proxy cannot run this construct exactly.
    pub fn unsupported(construct: Construct, message: impl Into<String>) -> Refusal {
        Refusal {
            code: "0A000",
            message: message.into(),
            construct: Some(construct),
        }
    }

    /// A refusal of a value (a key, a count, a shard's name), not a construct.
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
            construct: None,
        }
    }
}

/// The constructs the proxy refuses with 0A000 (counted by the metric
/// `refusals_total`, labelled by [`Construct::label`]). The router's own
/// refusals and the session's (transactions, pooling, batches) share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Construct {
    /// A statement the parser could not read that names a table spread over shards.
    Unparsed,
    /// CREATE TABLE ... AS across shards.
    CreateTableAs,
    /// SQL PREPARE of a statement whose answer depends on the shard.
    SqlPrepare,
    /// An unsharded table with a sharded one.
    MixedTables,
    /// A sharded table read in a subquery, CTE or set-operation branch
    /// without a key of one shard.
    Subquery,
    /// Tables of different table groups in one statement.
    CrossGroupJoin,
    /// Sharded tables joined on something other than their keys.
    JoinOffKey,
    /// UNION, INTERSECT or EXCEPT over a sharded table.
    SetOperation,
    /// An outer join keeping rows of a table every shard holds, on several shards.
    OuterJoin,
    /// An INSERT whose rows cannot be placed (not VALUES, a key that is not a constant).
    Insert,
    /// A COPY that cannot be split by shard.
    Copy,
    /// A cursor over several shards.
    Cursor,
    /// An UPDATE that sets the sharding key in a way the proxy cannot check.
    KeyChange,
    /// UPDATE or DELETE without a key while `sharding.broadcast_writes` is off.
    BroadcastWrite,
    /// Statements sent together (one query string, one pipeline) that
    /// reach different shards in a way the proxy cannot run.
    Batch,
    /// A result the proxy cannot merge exactly across shards.
    Merge,
    /// A statement that needs another shard than its transaction's, or a
    /// transaction on several shards that cannot be run as one.
    Transaction,
    /// Session state (SET, LISTEN, temporary tables...) under transaction pooling.
    SessionState,
    /// A session-pooled client's connection is already chosen.
    SessionPooling,
    /// EXPLAIN ANALYZE of a write on several shards.
    Explain,
    /// MERGE into a sharded table on several shards.
    MergeInto,
    /// CREATE VIEW over a sharded table on several shards.
    View,
    /// A DO block naming a sharded table, on several shards.
    DoBlock,
}

impl Construct {
    pub const ALL: [Construct; 23] = [
        Construct::Unparsed,
        Construct::CreateTableAs,
        Construct::SqlPrepare,
        Construct::MixedTables,
        Construct::Subquery,
        Construct::CrossGroupJoin,
        Construct::JoinOffKey,
        Construct::SetOperation,
        Construct::OuterJoin,
        Construct::Insert,
        Construct::Copy,
        Construct::Cursor,
        Construct::KeyChange,
        Construct::BroadcastWrite,
        Construct::Batch,
        Construct::Merge,
        Construct::Transaction,
        Construct::SessionState,
        Construct::SessionPooling,
        Construct::Explain,
        Construct::MergeInto,
        Construct::View,
        Construct::DoBlock,
    ];

    /// The metric's label.
    pub fn label(self) -> &'static str {
        match self {
            Construct::Unparsed => "unparsed",
            Construct::CreateTableAs => "create_table_as",
            Construct::SqlPrepare => "sql_prepare",
            Construct::MixedTables => "mixed_tables",
            Construct::Subquery => "subquery",
            Construct::CrossGroupJoin => "cross_group_join",
            Construct::JoinOffKey => "join_off_key",
            Construct::SetOperation => "set_operation",
            Construct::OuterJoin => "outer_join",
            Construct::Insert => "insert",
            Construct::Copy => "copy",
            Construct::Cursor => "cursor",
            Construct::KeyChange => "key_change",
            Construct::BroadcastWrite => "broadcast_write",
            Construct::Batch => "batch",
            Construct::Merge => "merge",
            Construct::Transaction => "transaction",
            Construct::SessionState => "session_state",
            Construct::SessionPooling => "session_pooling",
            Construct::Explain => "explain",
            Construct::MergeInto => "merge_into",
            Construct::View => "view",
            Construct::DoBlock => "do_block",
        }
    }

    /// Its position in [`Construct::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// What an EXPLAIN does with the statement it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Explain {
    /// Not an EXPLAIN.
    No,
    /// Plans it.
    Plan,
    /// EXPLAIN ANALYZE: runs it.
    Analyze,
}

/// What a statement's shape says about its shards.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Template {
    pub scope: Scope,
    pub write: bool,
    /// Reading from several shards needs this merge (a construct name
    /// such as "ORDER BY"): the proxy plans it with `scatter::plan`.
    pub needs_merge: Option<&'static str>,
    /// Refused wherever it would run.
    pub refusal: Option<Refusal>,
    /// EXPLAIN: shows one shard's plan rather than running everywhere.
    pub explain: Explain,
    /// COPY ... FROM STDIN into a sharded or reference table.
    pub copy_in: Option<CopyIn>,
    /// A leading `/* shardline: shard=... key=... */` comment.
    pub hint: Option<Hint>,
    /// `DECLARE ... CURSOR FOR` this query: the cursor lives on one
    /// connection, so its rows must come from one shard.
    pub cursor: bool,
    /// The cursor the statement declares (DECLARE) or reads (FETCH, MOVE,
    /// CLOSE): in a transaction on several shards the proxy runs a read of
    /// it where it was declared.
    pub cursor_name: Option<CursorName>,
    /// Exact on one shard, wrong on several: refused when it would run on
    /// more than one (an outer join keeping the rows of a reference table
    /// or VALUES list, which every shard would return).
    pub spread_refusal: Option<Refusal>,
    /// Keys of the subqueries, CTEs and set-operation branches that read
    /// sharded tables below the top level, each with its group: every one
    /// must name one shard, the same one, and the statement runs there.
    pub pinned: Vec<(usize, KeyExpr)>,
    /// A DO block: run as it is on every shard, refused on several when
    /// its text names a sharded table. Read from the text at each
    /// placement (`resolve`): the shape the template is cached under
    /// blanks the block's body, a string constant.
    pub do_block: bool,
}

/// A cursor named by a statement, case-folded as Postgres folds it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CursorName {
    /// `DECLARE name CURSOR ...`.
    Declares(String),
    /// `FETCH ... name`, `MOVE ... name`, `CLOSE name`.
    Reads(String),
}

/// COPY FROM STDIN into a table spread over shards.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CopyIn {
    /// The key column's position among the copied columns (`None`: the
    /// COPY names no columns; the table's own order decides).
    pub key_column: Option<usize>,
    /// The key column's name, and the table, to look its position up.
    pub column: String,
    pub table: String,
    pub csv: bool,
    pub binary: bool,
    pub header: bool,
    pub delimiter: u8,
    pub null: String,
    pub quote: u8,
    pub escape: u8,
}

impl Template {
    fn new(scope: Scope, write: bool) -> Template {
        Template {
            scope,
            write,
            needs_merge: None,
            refusal: None,
            explain: Explain::No,
            copy_in: None,
            hint: None,
            cursor: false,
            cursor_name: None,
            spread_refusal: None,
            pinned: Vec::new(),
            do_block: false,
        }
    }

    fn refused(r: Refusal) -> Template {
        Template {
            refusal: Some(r),
            ..Template::new(Scope::Anywhere, true)
        }
    }
}
