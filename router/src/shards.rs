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

/// A refusal: SQLSTATE and message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
}

impl Refusal {
    /// A 0A000 refusal: the proxy cannot run this exactly.
    pub fn unsupported(message: impl Into<String>) -> Refusal {
        Refusal {
            code: "0A000",
            message: message.into(),
        }
    }
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
    pub explain: bool,
    /// COPY ... FROM STDIN into a sharded or reference table.
    pub copy_in: Option<CopyIn>,
    /// A leading `/* shardline: shard=... key=... */` comment.
    pub hint: Option<Hint>,
    /// `DECLARE ... CURSOR FOR` this query: the cursor lives on one
    /// connection, so its rows must come from one shard.
    pub cursor: bool,
    /// Exact on one shard, wrong on several: refused when it would run on
    /// more than one (an outer join keeping the rows of a reference table
    /// or VALUES list, which every shard would return).
    pub spread_refusal: Option<Refusal>,
    /// Keys of the subqueries, CTEs and set-operation branches that read
    /// sharded tables below the top level, each with its group: every one
    /// must name one shard, the same one, and the statement runs there.
    pub pinned: Vec<(usize, KeyExpr)>,
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
            explain: false,
            copy_in: None,
            hint: None,
            cursor: false,
            spread_refusal: None,
            pinned: Vec::new(),
        }
    }

    fn refused(r: Refusal) -> Template {
        Template {
            refusal: Some(r),
            ..Template::new(Scope::Anywhere, true)
        }
    }
}

/// Maps sqlparser's value positions (line, column) to constant ordinals.
pub struct Constants {
    /// Per line, where each character starts (columns count characters).
    lines: Vec<Line>,
    /// Start offsets of the constants, in order.
    starts: Vec<usize>,
    text_len: usize,
}

/// Where a line's characters start: ASCII lines by arithmetic (no per
/// character table, so a 32 MB string constant costs nothing here).
enum Line {
    Ascii { start: usize, end: usize },
    Chars(Vec<usize>),
}

impl Line {
    fn offset(&self, col: usize) -> Option<usize> {
        match self {
            Line::Ascii { start, end } => Some(start + col).filter(|o| o < end),
            Line::Chars(offsets) => offsets.get(col).copied(),
        }
    }
}

impl Constants {
    pub fn new(sql: &str) -> Constants {
        let mut lines = Vec::new();
        let mut start = 0;
        for piece in sql.split_inclusive('\n') {
            let end = start + piece.len();
            lines.push(if piece.is_ascii() {
                Line::Ascii { start, end }
            } else {
                Line::Chars(piece.char_indices().map(|(i, _)| start + i).collect())
            });
            start = end;
        }
        if sql.is_empty() || sql.ends_with('\n') {
            // The (empty) line after the last newline.
            lines.push(Line::Ascii { start, end: start });
        }
        let mut starts = Vec::new();
        crate::lexer::scan_constants(sql, |s, _| starts.push(s));
        Constants {
            lines,
            starts,
            text_len: sql.len(),
        }
    }

    fn ordinal(&self, span: sqlparser::tokenizer::Span) -> Option<u16> {
        let offset = |l: sqlparser::tokenizer::Location| -> Option<usize> {
            let line = self.lines.get((l.line as usize).checked_sub(1)?)?;
            let col = (l.column as usize).checked_sub(1)?;
            Some(line.offset(col).unwrap_or(self.text_len))
        };
        let (start, end) = (offset(span.start)?, offset(span.end)?);
        let i = self.starts.partition_point(|&s| s < start);
        let s = *self.starts.get(i)?;
        (s <= end.max(start)).then_some(i as u16)
    }
}

/// Analyses one parsed statement.
pub fn analyze(stmt: &Statement, consts: &Constants, sh: &Sharding) -> Template {
    let a = Analyzer { consts, sh };
    a.statement(stmt)
}

/// The template for a statement sqlparser could not read: utility commands
/// recognised by their first keyword go to every shard; a statement naming
/// no sharded or reference table goes to the default shard; anything else
/// can only run where a hint sends it.
pub fn analyze_unparsed(sql: &str, error: &str, sh: &Sharding) -> Template {
    let first = crate::lexer::first_keyword(sql).to_ascii_lowercase();
    if first == "copy" {
        // COPY with options sqlparser does not know (FREEZE ...): placed by
        // its table when that table lives on one shard.
        let words = crate::lexer::leading_words(sql, 4);
        let mut table = words.get(1).cloned().unwrap_or_default();
        if words.get(2).map(String::as_str) == Some(".") {
            table = format!("{table}.{}", words.get(3).cloned().unwrap_or_default());
        }
        if !table.is_empty() && table != "(" && sh.table(&table) == TableKind::Unsharded {
            return Template::new(Scope::Default, true);
        }
    }
    match first.as_str() {
        "do" | "vacuum" | "analyze" | "analyse" | "reindex" | "cluster" | "refresh"
        | "checkpoint" | "create" | "alter" | "drop" | "comment" | "grant" | "revoke"
        | "import" | "security" => Template::new(Scope::AllShards, true),
        "begin" | "start" | "commit" | "end" | "rollback" | "abort" | "savepoint" | "release"
        | "set" | "reset" | "discard" | "deallocate" | "show" | "listen" | "unlisten"
        | "notify" | "prepare" | "execute" | "fetch" | "move" | "close" => {
            Template::new(Scope::Anywhere, true)
        }
        // Postgres may read what the proxy's parser does not. Naming only
        // unsharded tables (or none), it runs where those live, and the
        // server answers (a syntax error too); naming a sharded or
        // reference table, the proxy cannot place it.
        _ => {
            let spread = crate::lexer::Lexer::new(sql).find_map(|t| {
                let name = t.ident();
                (!name.is_empty()
                    && !name.starts_with('\'')
                    && sh.table(&name) != TableKind::Unsharded)
                    .then_some(name)
            });
            match spread {
                Some(table) => Template::refused(Refusal::unsupported(format!(
                    "the proxy could not read this statement to find its shard ({error}), and it names table \"{table}\", which is not on one shard; add a /* shardline: shard=NAME */ or /* shardline: key=VALUE */ comment"
                ))),
                None => Template::new(Scope::Default, true),
            }
        }
    }
}

struct Analyzer<'a> {
    consts: &'a Constants,
    sh: &'a Sharding,
}

/// A table of the statement's top-level FROM (or the target of DML).
struct Rel {
    /// How the statement refers to it (alias or table name), lowercase.
    alias: String,
    name: String,
    kind: TableKind,
    /// On the nullable side of an outer join: its columns may be NULL in
    /// rows it has no part in.
    nullable: bool,
}

/// How a join keeps the rows of its sides.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outer {
    No,
    /// The left side's rows are kept; the right side may be NULL.
    Left,
    Right,
    Full,
}

fn outer(op: &sqlparser::ast::JoinOperator) -> Outer {
    use sqlparser::ast::JoinOperator as J;
    match op {
        J::Left(_)
        | J::LeftOuter(_)
        | J::Semi(_)
        | J::LeftSemi(_)
        | J::Anti(_)
        | J::LeftAnti(_)
        | J::OuterApply => Outer::Left,
        J::Right(_) | J::RightOuter(_) | J::RightSemi(_) | J::RightAnti(_) => Outer::Right,
        J::FullOuter(_) => Outer::Full,
        _ => Outer::No,
    }
}

/// The relations of one FROM item (its first, then each join's), each
/// with whether an outer join may extend it with NULLs; and, when an outer
/// join keeps the rows of a side without a sharded table (a reference
/// table, a VALUES list, a function, a subquery) against a side with one,
/// that side's description: every shard holds those rows, so each shard
/// would return the ones without a match.
pub(crate) fn from_item<'a>(
    t: &'a TableWithJoins,
    sh: &Sharding,
) -> (Vec<(&'a TableFactor, bool)>, Option<String>) {
    let sharded = |f: &TableFactor| match f {
        TableFactor::Table {
            name, args: None, ..
        } => matches!(sh.table(&lower_name(name)), TableKind::Sharded(_)),
        _ => false,
    };
    let describe = |f: &TableFactor| match f {
        TableFactor::Table {
            name, args: None, ..
        } => format!("table \"{}\"", lower_name(name)),
        TableFactor::Table { .. } => "a function".to_string(),
        TableFactor::Derived { subquery, .. } if matches!(&*subquery.body, SetExpr::Values(_)) => {
            "a VALUES list".to_string()
        }
        TableFactor::Derived { .. } => "a subquery".to_string(),
        TableFactor::Function { .. } | TableFactor::TableFunction { .. } => {
            "a function".to_string()
        }
        _ => "a relation".to_string(),
    };
    let mut factors: Vec<(&TableFactor, bool)> = vec![(&t.relation, false)];
    let mut keeps = None;
    for j in &t.joins {
        let left_sharded = factors.iter().any(|(f, _)| sharded(f));
        let right_sharded = sharded(&j.relation);
        match outer(&j.join_operator) {
            Outer::No => factors.push((&j.relation, false)),
            Outer::Left => {
                if !left_sharded && right_sharded {
                    keeps.get_or_insert_with(|| describe(factors[0].0));
                }
                factors.push((&j.relation, true));
            }
            Outer::Right => {
                if left_sharded && !right_sharded {
                    keeps.get_or_insert_with(|| describe(&j.relation));
                }
                factors.iter_mut().for_each(|f| f.1 = true);
                factors.push((&j.relation, false));
            }
            Outer::Full => {
                if left_sharded != right_sharded {
                    let side = if left_sharded {
                        &j.relation
                    } else {
                        factors[0].0
                    };
                    keeps.get_or_insert_with(|| describe(side));
                }
                factors.iter_mut().for_each(|f| f.1 = true);
                factors.push((&j.relation, true));
            }
        }
    }
    (factors, keeps)
}

pub(crate) fn lower_name(n: &ObjectName) -> String {
    n.0.iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(i) if i.quote_style.is_some() => i.value.clone(),
            ObjectNamePart::Identifier(i) => i.value.to_ascii_lowercase(),
            ObjectNamePart::Function(f) => f.name.value.to_ascii_lowercase(),
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn is_catalog(name: &str) -> bool {
    name.starts_with("pg_")
        || name.starts_with("pg_catalog.")
        || name.starts_with("information_schema.")
}

/// Aggregate functions: a SELECT using one reads a global value.
pub(crate) const AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "min",
    "max",
    "avg",
    "array_agg",
    "string_agg",
    "bool_and",
    "bool_or",
    "every",
    "bit_and",
    "bit_or",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "xmlagg",
    "percentile_cont",
    "percentile_disc",
    "mode",
    "corr",
    "covar_pop",
    "covar_samp",
    "regr_count",
    "range_agg",
];

/// Finds aggregates and window functions in a SELECT's projection.
struct MergeFinder {
    found: Option<&'static str>,
}

impl Visitor for MergeFinder {
    type Break = ();
    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = e {
            if f.over.is_some() {
                self.found = Some("window functions");
                return ControlFlow::Break(());
            }
            let name = f.name.to_string().to_ascii_lowercase();
            let name = name.rsplit('.').next().unwrap_or(&name);
            if AGGREGATES.contains(&name) {
                self.found = Some("aggregate functions");
                return ControlFlow::Break(());
            }
        }
        if matches!(
            e,
            Expr::Subquery(_) | Expr::Exists { .. } | Expr::InSubquery { .. }
        ) {
            // Subqueries are judged by the tables they read, not here.
            return ControlFlow::Continue(());
        }
        ControlFlow::Continue(())
    }
}

/// Every relation name in a statement, at any depth, except CTE names.
struct Relations {
    names: Vec<String>,
    ctes: Vec<String>,
    /// Set-returning functions in FROM (`generate_series(1, 3)`): named
    /// like relations, but no table.
    functions: Vec<String>,
}

impl Visitor for Relations {
    type Break = ();
    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        if let Some(with) = &q.with {
            for cte in &with.cte_tables {
                self.ctes.push(cte.alias.name.value.to_ascii_lowercase());
            }
        }
        ControlFlow::Continue(())
    }
    fn pre_visit_relation(&mut self, r: &ObjectName) -> ControlFlow<()> {
        self.names.push(lower_name(r));
        ControlFlow::Continue(())
    }
    fn pre_visit_table_factor(&mut self, f: &TableFactor) -> ControlFlow<()> {
        if let TableFactor::Table {
            name,
            args: Some(_),
            ..
        } = f
        {
            self.functions.push(lower_name(name));
        }
        ControlFlow::Continue(())
    }
}

pub(crate) fn relations<V: Visit>(node: &V) -> Vec<String> {
    let mut r = Relations {
        names: Vec::new(),
        ctes: Vec::new(),
        functions: Vec::new(),
    };
    let _ = node.visit(&mut r);
    let ctes = r.ctes;
    let mut functions = r.functions;
    r.names
        .into_iter()
        .filter(|n| {
            if let Some(i) = functions.iter().position(|f| f == n) {
                functions.swap_remove(i);
                return false;
            }
            !ctes.contains(n)
        })
        .collect()
}

impl Analyzer<'_> {
    fn statement(&self, stmt: &Statement) -> Template {
        match stmt {
            Statement::Query(q) => self.query(q, stmt),
            Statement::Insert(ins) => self.insert(ins, stmt),
            Statement::Update(u) => {
                let mut rels = Vec::new();
                self.add_from(&u.table, &mut rels);
                if let Some(from) = &u.from {
                    let tables = match from {
                        sqlparser::ast::UpdateTableFromKind::BeforeSet(t)
                        | sqlparser::ast::UpdateTableFromKind::AfterSet(t) => t,
                    };
                    for t in tables {
                        self.add_from(t, &mut rels);
                    }
                }
                let mut assigned = Vec::new();
                for a in &u.assignments {
                    match &a.target {
                        sqlparser::ast::AssignmentTarget::ColumnName(n) => {
                            assigned.push((lower_name(n), Some(&a.value)))
                        }
                        sqlparser::ast::AssignmentTarget::Tuple(names) => {
                            assigned.extend(names.iter().map(|n| (lower_name(n), None)))
                        }
                    }
                }
                self.dml(stmt, &rels, u.selection.as_ref(), &assigned)
            }
            Statement::Delete(d) => {
                let mut rels = Vec::new();
                let from = match &d.from {
                    FromTable::WithFromKeyword(t) | FromTable::WithoutKeyword(t) => t,
                };
                for t in from.iter().chain(d.using.iter().flatten()) {
                    self.add_from(t, &mut rels);
                }
                self.dml(stmt, &rels, d.selection.as_ref(), &[])
            }
            Statement::Truncate(t) => {
                let all_unsharded = t
                    .table_names
                    .iter()
                    .all(|n| self.sh.table(&lower_name(&n.name)) == TableKind::Unsharded);
                let scope = if all_unsharded {
                    Scope::Default
                } else {
                    Scope::AllShards
                };
                Template::new(scope, true)
            }
            Statement::Copy {
                source,
                to,
                options,
                legacy_options,
                ..
            } => self.copy(stmt, source, *to, options, legacy_options),
            Statement::Explain { statement, .. } => {
                let mut t = self.statement(statement);
                t.explain = true;
                t.needs_merge = None;
                t
            }
            Statement::Declare { stmts } => match stmts.as_slice() {
                [sqlparser::ast::Declare {
                    for_query: Some(q), ..
                }] => {
                    // Placed as its query, read where its rows are.
                    let mut t = self.query(q, &Statement::Query(q.clone()));
                    t.cursor = true;
                    t.needs_merge = None;
                    t
                }
                _ => Template::new(Scope::Anywhere, true),
            },
            // On the connection that holds the cursor (its transaction's).
            Statement::Fetch { .. } | Statement::Close { .. } => {
                Template::new(Scope::Anywhere, true)
            }
            Statement::CreateTable(c) if c.query.is_some() => {
                Template::refused(Refusal::unsupported(
                    "CREATE TABLE ... AS across shards: create the table, then fill it with INSERT",
                ))
            }
            Statement::StartTransaction { .. }
            | Statement::Commit { .. }
            | Statement::Rollback { .. }
            | Statement::Savepoint { .. }
            | Statement::ReleaseSavepoint { .. }
            | Statement::Set(_)
            | Statement::Reset(_)
            | Statement::Discard { .. }
            | Statement::Deallocate { .. }
            | Statement::ShowVariable { .. }
            | Statement::ShowVariables { .. }
            | Statement::Prepare { .. }
            | Statement::Execute { .. }
            | Statement::Call(_)
            | Statement::LISTEN { .. }
            | Statement::UNLISTEN { .. }
            | Statement::NOTIFY { .. } => Template::new(Scope::Anywhere, true),
            // Schema changes, utility statements: every shard's primary.
            _ => Template::new(Scope::AllShards, true),
        }
    }

    /// Adds a FROM item's tables (and joins) to `rels`.
    /// The sharded tables read by subqueries in the AND-chain of a WHERE
    /// clause that are co-located with the outer rows: `EXISTS` / `NOT
    /// EXISTS` correlated on the key (`o.user_id = u.id`, the outer side
    /// qualified), and `outer_key IN (SELECT key FROM t ...)`. For each
    /// outer row, the rows such a subquery can match live on that row's
    /// shard, so each shard answers it for its own rows. (NOT IN is left
    /// out: a NULL key on another shard would change its answer.)
    fn colocated_subqueries(&self, e: &Expr, rels: &[Rel], out: &mut Vec<String>) {
        match e {
            Expr::Nested(inner) => self.colocated_subqueries(inner, rels, out),
            Expr::BinaryOp {
                left,
                op: BinaryOperator::And,
                right,
            } => {
                self.colocated_subqueries(left, rels, out);
                self.colocated_subqueries(right, rels, out);
            }
            Expr::Exists { subquery, .. } => {
                out.extend(self.colocated(subquery, rels, None));
            }
            Expr::InSubquery {
                expr,
                subquery,
                negated: false,
            } => {
                if let Some(i) = self.key_ref(expr, rels) {
                    out.extend(self.colocated(subquery, rels, Some(i)));
                }
            }
            _ => {}
        }
    }

    /// The one sharded table a subquery reads, when its rows for an outer
    /// row live on that row's shard (see `colocated_subqueries`); `in_key`:
    /// the outer key an IN compares with the subquery's single column.
    fn colocated(&self, q: &Query, rels: &[Rel], in_key: Option<usize>) -> Option<String> {
        if q.with.is_some() {
            return None;
        }
        let SetExpr::Select(sel) = &*q.body else {
            return None;
        };
        let [t] = sel.from.as_slice() else {
            return None;
        };
        let TableFactor::Table {
            name,
            alias,
            args: None,
            ..
        } = &t.relation
        else {
            return None;
        };
        if !t.joins.is_empty() {
            return None;
        }
        let n = lower_name(name);
        let TableKind::Sharded(rule) = self.sh.table(&n) else {
            return None;
        };
        let sharded_inside = relations(q)
            .iter()
            .filter(|x| matches!(self.sh.table(x), TableKind::Sharded(_)))
            .count();
        if sharded_inside != 1 {
            return None;
        }
        let inner = Rel {
            alias: alias
                .as_ref()
                .map(|a| a.name.value.to_ascii_lowercase())
                .unwrap_or_else(|| n.rsplit('.').next().unwrap_or(&n).to_string()),
            name: n.clone(),
            kind: TableKind::Sharded(rule.clone()),
            nullable: false,
        };
        let same_group =
            |i: usize| matches!(&rels[i].kind, TableKind::Sharded(r) if r.group == rule.group);
        match in_key {
            Some(i) => {
                let [item] = sel.projection.as_slice() else {
                    return None;
                };
                let (SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. }) = item
                else {
                    return None;
                };
                (same_group(i) && self.key_ref(e, std::slice::from_ref(&inner)).is_some())
                    .then_some(n)
            }
            None => {
                let w = sel.selection.as_ref()?;
                self.correlates_keys(w, &inner, rels, &same_group)
                    .then_some(n)
            }
        }
    }

    /// Whether the AND-chain of `w` equates the inner table's key with an
    /// outer table's key, the outer one qualified by an outer alias (an
    /// unqualified name resolves to the inner table first).
    fn correlates_keys(
        &self,
        w: &Expr,
        inner: &Rel,
        rels: &[Rel],
        same_group: &dyn Fn(usize) -> bool,
    ) -> bool {
        match w {
            Expr::Nested(e) => self.correlates_keys(e, inner, rels, same_group),
            Expr::BinaryOp {
                left,
                op: BinaryOperator::And,
                right,
            } => {
                self.correlates_keys(left, inner, rels, same_group)
                    || self.correlates_keys(right, inner, rels, same_group)
            }
            Expr::BinaryOp {
                left,
                op: BinaryOperator::Eq,
                right,
            } => {
                let outer = |e: &Expr| match e {
                    Expr::CompoundIdentifier(ids)
                        if ids.len() >= 2
                            && ids[ids.len() - 2].value.to_ascii_lowercase() != inner.alias =>
                    {
                        self.key_ref(e, rels).filter(|&i| same_group(i))
                    }
                    _ => None,
                };
                let is_inner = |e: &Expr| self.key_ref(e, std::slice::from_ref(inner)).is_some();
                (is_inner(left) && outer(right).is_some())
                    || (is_inner(right) && outer(left).is_some())
            }
            _ => false,
        }
    }

    /// Adds the tables of one FROM item; returns what an outer join of it
    /// keeps that every shard holds (see `from_item`).
    fn add_from(&self, t: &TableWithJoins, rels: &mut Vec<Rel>) -> Option<String> {
        let (factors, keeps) = from_item(t, self.sh);
        for (f, nullable) in factors {
            if let TableFactor::Table {
                name,
                alias,
                args: None,
                ..
            } = f
            {
                let n = lower_name(name);
                let alias = alias
                    .as_ref()
                    .map(|a| a.name.value.to_ascii_lowercase())
                    .unwrap_or_else(|| n.rsplit('.').next().unwrap_or(&n).to_string());
                rels.push(Rel {
                    alias,
                    kind: self.sh.table(&n),
                    name: n,
                    nullable,
                });
            }
        }
        keeps
    }

    /// The key column this expression names, as `(alias index)`.
    fn key_ref(&self, e: &Expr, rels: &[Rel]) -> Option<usize> {
        let (qualifier, column) = match e {
            Expr::Identifier(i) => (None, i.value.to_ascii_lowercase()),
            Expr::CompoundIdentifier(parts) if parts.len() >= 2 => (
                Some(parts[parts.len() - 2].value.to_ascii_lowercase()),
                parts[parts.len() - 1].value.to_ascii_lowercase(),
            ),
            Expr::Nested(inner) => return self.key_ref(inner, rels),
            Expr::Cast {
                expr, data_type, ..
            } => {
                // `id::text = '5'` holds for one key at most, `name::int = 5`
                // for many ('5', '05'): only casts to text or to the key's
                // own kind keep the comparison a key.
                let i = self.key_ref(expr, rels)?;
                let TableKind::Sharded(rule) = &rels[i].kind else {
                    return None;
                };
                use shardline_config::KeyType;
                let keeps = matches!(
                    (
                        self.sh.groups[rule.group].key_type,
                        ParamType::of_cast(data_type),
                    ),
                    (_, ParamType::Text)
                        | (KeyType::Bigint, ParamType::Int)
                        | (KeyType::Uuid, ParamType::Uuid)
                );
                return keeps.then_some(i);
            }
            _ => return None,
        };
        rels.iter().position(|r| match &r.kind {
            TableKind::Sharded(rule) => {
                rule.column == column && qualifier.as_ref().is_none_or(|q| *q == r.alias)
            }
            _ => false,
        })
    }

    fn value_src(&self, e: &Expr) -> KeySrc {
        match e {
            Expr::Value(v) => match &v.value {
                Value::Placeholder(p) => {
                    p.strip_prefix('$')
                        .and_then(|n| n.parse().ok())
                        .map_or(KeySrc::Unknown, |n| KeySrc::Param {
                            n,
                            ty: ParamType::Column,
                        })
                }
                Value::Null => KeySrc::Null,
                Value::Number(..)
                | Value::SingleQuotedString(_)
                | Value::EscapedStringLiteral(_)
                | Value::DollarQuotedString(_) => {
                    self.consts
                        .ordinal(v.span)
                        .map_or(KeySrc::Unknown, |ordinal| KeySrc::Const {
                            ordinal,
                            negative: false,
                        })
                }
                _ => KeySrc::Unknown,
            },
            Expr::UnaryOp {
                op: UnaryOperator::Minus,
                expr,
            } => match self.value_src(expr) {
                KeySrc::Const { ordinal, negative } => KeySrc::Const {
                    ordinal,
                    negative: !negative,
                },
                _ => KeySrc::Unknown,
            },
            Expr::Cast {
                expr, data_type, ..
            } => match self.value_src(expr) {
                KeySrc::Param {
                    n,
                    ty: ParamType::Column,
                } => KeySrc::Param {
                    n,
                    ty: ParamType::of_cast(data_type),
                },
                other => other,
            },
            Expr::Nested(expr) => self.value_src(expr),
            _ => KeySrc::Unknown,
        }
    }

    /// The cast on the column side of `column = value`, which gives an
    /// uncast parameter on the other side its type.
    fn column_cast(e: &Expr) -> ParamType {
        match e {
            Expr::Nested(inner) => Self::column_cast(inner),
            Expr::Cast { data_type, .. } => ParamType::of_cast(data_type),
            _ => ParamType::Column,
        }
    }

    /// `keys(values)` for values compared with `column`.
    fn keys_compared(&self, column: &Expr, values: &[&Expr]) -> KeyExpr {
        let cast = Self::column_cast(column);
        match self.keys(values) {
            KeyExpr::Keys(srcs) if cast != ParamType::Column => KeyExpr::Keys(
                srcs.into_iter()
                    .map(|s| match s {
                        KeySrc::Param {
                            n,
                            ty: ParamType::Column,
                        } => KeySrc::Param { n, ty: cast },
                        other => other,
                    })
                    .collect(),
            ),
            other => other,
        }
    }

    /// The keys a condition allows. `links` collects key = key equalities
    /// between tables (join conditions).
    fn key_expr(&self, e: &Expr, rels: &[Rel], links: &mut Vec<(usize, usize)>) -> KeyExpr {
        match e {
            Expr::Nested(inner) => self.key_expr(inner, rels, links),
            Expr::BinaryOp { left, op, right } => match op {
                BinaryOperator::And => KeyExpr::And(vec![
                    self.key_expr(left, rels, links),
                    self.key_expr(right, rels, links),
                ]),
                BinaryOperator::Or => {
                    // Equalities under OR do not join tables.
                    let mut ignored = Vec::new();
                    KeyExpr::Or(vec![
                        self.key_expr(left, rels, &mut ignored),
                        self.key_expr(right, rels, &mut ignored),
                    ])
                }
                BinaryOperator::Eq => match (self.key_ref(left, rels), self.key_ref(right, rels)) {
                    (Some(a), Some(b)) => {
                        links.push((a, b));
                        KeyExpr::All
                    }
                    (Some(_), None) => self.keys_compared(left, &[right]),
                    (None, Some(_)) => self.keys_compared(right, &[left]),
                    (None, None) => KeyExpr::All,
                },
                _ => KeyExpr::All,
            },
            Expr::InList {
                expr,
                list,
                negated: false,
            } if self.key_ref(expr, rels).is_some() => {
                let refs: Vec<&Expr> = list.iter().collect();
                self.keys_compared(expr, &refs)
            }
            // On the nullable side of an outer join, `key IS NULL` holds
            // for the rows without a match, on every shard.
            Expr::IsNull(inner) => match self.key_ref(inner, rels) {
                Some(i) if !rels[i].nullable => KeyExpr::Keys(vec![KeySrc::Null]),
                _ => KeyExpr::All,
            },
            Expr::AnyOp {
                left,
                compare_op: BinaryOperator::Eq,
                right,
                ..
            } if self.key_ref(left, rels).is_some() => {
                let mut r: &Expr = right;
                while let Expr::Cast { expr, .. } | Expr::Nested(expr) = r {
                    r = expr;
                }
                match r {
                    Expr::Array(arr) => {
                        let refs: Vec<&Expr> = arr.elem.iter().collect();
                        self.keys(&refs)
                    }
                    // An array parameter compared with the column itself.
                    _ => match (self.value_src(r), Self::column_cast(left)) {
                        (KeySrc::Param { n, .. }, ParamType::Column) => KeyExpr::AnyParam(n),
                        _ => KeyExpr::All,
                    },
                }
            }
            _ => KeyExpr::All,
        }
    }

    fn keys(&self, values: &[&Expr]) -> KeyExpr {
        let srcs: Vec<KeySrc> = values.iter().map(|v| self.value_src(v)).collect();
        if srcs.contains(&KeySrc::Unknown) {
            KeyExpr::All
        } else {
            KeyExpr::Keys(srcs)
        }
    }

    /// Scope of a statement reading or writing `rels` (its top-level
    /// tables) filtered by `conditions`; `all` names every relation at any
    /// depth. Sharded tables read below the top level are allowed when
    /// `inner` (the statement, and the top-level SELECT) shows each is
    /// pinned to keys (see `pins`): they come back with their keys.
    #[allow(clippy::type_complexity)]
    fn scope(
        &self,
        rels: &[Rel],
        conditions: &[(&Expr, bool)],
        all: &[String],
        inner: Option<(&Statement, Option<&sqlparser::ast::Select>)>,
    ) -> Result<(Scope, Vec<(usize, KeyExpr)>), Refusal> {
        let sharded: Vec<usize> = (0..rels.len())
            .filter(|&i| matches!(rels[i].kind, TableKind::Sharded(_)))
            .collect();
        let kind_of = |n: &String| {
            if is_catalog(n) {
                None
            } else {
                Some(self.sh.table(n))
            }
        };
        let unsharded = all
            .iter()
            .find(|n| kind_of(n) == Some(TableKind::Unsharded));
        let any_sharded = all
            .iter()
            .find(|n| matches!(kind_of(n), Some(TableKind::Sharded(_))));
        let any_reference = all.iter().any(|n| kind_of(n) == Some(TableKind::Reference));
        if let (Some(u), Some(s)) = (unsharded, any_sharded) {
            return Err(Refusal::unsupported(format!(
                "the statement mixes table \"{u}\", which is not sharded (it lives on the default shard), with sharded table \"{s}\""
            )));
        }
        let below = || {
            let refusal = Refusal::unsupported(format!(
                "sharded table \"{}\" is read in a subquery or CTE; the proxy routes only statements whose sharded tables are in the top-level FROM, or whose subqueries and CTEs name keys of one shard (or add a /* shardline: shard=NAME */ comment)",
                any_sharded.map(String::as_str).unwrap_or("?")
            ));
            match inner {
                Some((whole, top)) => match self.pins(whole, top) {
                    Ok(pins) if !pins.is_empty() => Ok(pins),
                    Ok(_) => Err(refusal),
                    Err(r) => Err(r),
                },
                None => Err(refusal),
            }
        };
        if sharded.is_empty() {
            if any_sharded.is_some() {
                let pins = below()?;
                let scope = Scope::Sharded {
                    group: pins[0].0,
                    key: pins[0].1.clone(),
                    rows: false,
                    key_change: None,
                };
                return Ok((scope, pins));
            }
            let scope = if unsharded.is_some() {
                Scope::Default
            } else if any_reference {
                Scope::Reference
            } else {
                Scope::Anywhere
            };
            return Ok((scope, Vec::new()));
        }
        let occurrences = all
            .iter()
            .filter(|n| matches!(kind_of(n), Some(TableKind::Sharded(_))))
            .count();
        let pins = if occurrences > sharded.len() {
            below()?
        } else {
            Vec::new()
        };
        let group_of = |i: usize| match &rels[i].kind {
            TableKind::Sharded(r) => r.group,
            _ => usize::MAX,
        };
        let group = group_of(sharded[0]);
        if let Some(&other) = sharded.iter().find(|&&i| group_of(i) != group) {
            return Err(Refusal::unsupported(format!(
                "tables \"{}\" and \"{}\" are sharded in different groups, so their rows are not co-located",
                rels[sharded[0]].name, rels[other].name
            )));
        }
        let mut links = Vec::new();
        let mut keys = Vec::new();
        for (cond, restricts) in conditions {
            let k = self.key_expr(cond, rels, &mut links);
            if *restricts {
                keys.push(k);
            }
        }
        // Every sharded table must be joined to the others on the key.
        let mut component: Vec<usize> = (0..rels.len()).collect();
        fn root(c: &mut [usize], mut i: usize) -> usize {
            while c[i] != i {
                i = c[i];
            }
            i
        }
        for (a, b) in links {
            let (ra, rb) = (root(&mut component, a), root(&mut component, b));
            component[ra] = rb;
        }
        let first = root(&mut component, sharded[0]);
        if let Some(&other) = sharded.iter().find(|&&i| root(&mut component, i) != first) {
            return Err(Refusal::unsupported(format!(
                "tables \"{}\" and \"{}\" are joined on something other than their sharding keys, so matching rows may be on different shards",
                rels[sharded[0]].name, rels[other].name
            )));
        }
        let key = match keys.len() {
            0 => KeyExpr::All,
            1 => keys.pop().unwrap_or(KeyExpr::All),
            _ => KeyExpr::And(keys),
        };
        let scope = Scope::Sharded {
            group,
            key,
            rows: false,
            key_change: None,
        };
        Ok((scope, pins))
    }

    /// The tables of one SELECT's FROM, the conditions that decide its
    /// key (`true`: the condition restricts the rows: WHERE and inner joins'
    /// ON), and what an outer join in it keeps that every shard holds.
    fn select_parts<'s>(
        &self,
        sel: &'s sqlparser::ast::Select,
    ) -> (Vec<Rel>, Vec<(&'s Expr, bool)>, Option<String>) {
        let mut rels = Vec::new();
        let mut conditions: Vec<(&Expr, bool)> = Vec::new();
        let mut keeps = None;
        for t in &sel.from {
            if let Some(k) = self.add_from(t, &mut rels) {
                keeps.get_or_insert(k);
            }
            for j in &t.joins {
                use sqlparser::ast::JoinOperator as J;
                let (c, inner) = match &j.join_operator {
                    J::Join(c) | J::Inner(c) => (c, true),
                    J::Left(c)
                    | J::LeftOuter(c)
                    | J::Right(c)
                    | J::RightOuter(c)
                    | J::FullOuter(c)
                    | J::CrossJoin(c)
                    | J::Semi(c)
                    | J::LeftSemi(c)
                    | J::RightSemi(c)
                    | J::Anti(c)
                    | J::LeftAnti(c)
                    | J::RightAnti(c) => (c, false),
                    _ => continue,
                };
                if let sqlparser::ast::JoinConstraint::On(e) = c {
                    conditions.push((e, inner));
                }
            }
        }
        if let Some(w) = &sel.selection {
            conditions.push((w, true));
        }
        (rels, conditions, keeps)
    }

    /// What a SELECT's rows from several shards need before they are the
    /// answer one Postgres gives (DISTINCT, GROUP BY, aggregates ...).
    fn select_merge(sel: &sqlparser::ast::Select) -> Option<&'static str> {
        let mut needs_merge = None;
        if sel.distinct.is_some() {
            needs_merge = Some("DISTINCT");
        }
        let grouped = match &sel.group_by {
            GroupByExpr::All(_) => true,
            GroupByExpr::Expressions(e, _) => !e.is_empty(),
        };
        if grouped {
            needs_merge = Some("GROUP BY");
        } else if sel.having.is_some() {
            needs_merge = Some("HAVING");
        }
        let mut f = MergeFinder { found: None };
        for item in &sel.projection {
            if let SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } = item {
                let _ = e.visit(&mut f);
            }
        }
        f.found.or(needs_merge)
    }

    /// The keys of the SELECTs below the top level that read sharded tables
    /// (subqueries, CTEs, set-operation branches; `top` is the one the
    /// caller analysed): each must be pinned by its own WHERE to keys, so
    /// the statement can run whole on their shard.
    fn pins(
        &self,
        whole: &Statement,
        top: Option<&sqlparser::ast::Select>,
    ) -> Result<Vec<(usize, KeyExpr)>, Refusal> {
        struct Inner<'a, 'b> {
            an: &'a Analyzer<'b>,
            top: Option<*const sqlparser::ast::Select>,
            pins: Vec<(usize, KeyExpr)>,
            refusal: Option<Refusal>,
        }
        impl Inner<'_, '_> {
            fn body(&mut self, body: &SetExpr) -> Result<(), Refusal> {
                match body {
                    SetExpr::Select(sel) if Some(&**sel as *const _) != self.top => {
                        if let Some(pin) = self.an.pinned_select(sel)? {
                            self.pins.push(pin);
                        }
                        Ok(())
                    }
                    SetExpr::SetOperation { left, right, .. } => {
                        self.body(left)?;
                        self.body(right)
                    }
                    // Nested queries are visited on their own.
                    _ => Ok(()),
                }
            }
        }
        impl Visitor for Inner<'_, '_> {
            type Break = ();
            fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
                match self.body(&q.body) {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(r) => {
                        self.refusal = Some(r);
                        ControlFlow::Break(())
                    }
                }
            }
        }
        let mut v = Inner {
            an: self,
            top: top.map(|t| t as *const _),
            pins: Vec::new(),
            refusal: None,
        };
        let _ = whole.visit(&mut v);
        match v.refusal {
            Some(r) => Err(r),
            None => Ok(v.pins),
        }
    }

    /// A SELECT below the top level: `None` when it reads no sharded table,
    /// else its group and key, refused when no key pins it.
    fn pinned_select(
        &self,
        sel: &sqlparser::ast::Select,
    ) -> Result<Option<(usize, KeyExpr)>, Refusal> {
        let (rels, conditions, _) = self.select_parts(sel);
        let names: Vec<String> = rels.iter().map(|r| r.name.clone()).collect();
        let Some(table) = rels
            .iter()
            .find(|r| matches!(r.kind, TableKind::Sharded(_)))
        else {
            return Ok(None);
        };
        match self.scope(&rels, &conditions, &names, None)? {
            (Scope::Sharded { group, key, .. }, _) if key != KeyExpr::All => {
                Ok(Some((group, key)))
            }
            _ => Err(Refusal::unsupported(format!(
                "sharded table \"{}\" is read in a subquery, CTE or set operation without its sharding key: the proxy runs such a statement only when every one of them names keys of one shard in its WHERE clause (or add a /* shardline: shard=NAME */ comment)",
                table.name
            ))),
        }
    }

    /// UNION ALL of plain SELECTs each reading sharded tables (no DISTINCT,
    /// grouping or aggregate in a branch, no ORDER BY/LIMIT over the whole):
    /// every row comes from one shard, so the shards' answers concatenated
    /// are the answer. Its shards: every branch's.
    fn union_all(&self, q: &Query) -> Option<(usize, KeyExpr)> {
        fn leaves<'q>(e: &'q SetExpr, out: &mut Vec<&'q sqlparser::ast::Select>) -> bool {
            match e {
                SetExpr::Select(s) => {
                    out.push(s);
                    true
                }
                SetExpr::SetOperation {
                    op: sqlparser::ast::SetOperator::Union,
                    set_quantifier: sqlparser::ast::SetQuantifier::All,
                    left,
                    right,
                } => leaves(left, out) && leaves(right, out),
                _ => false,
            }
        }
        if q.order_by.is_some() || q.limit_clause.is_some() || q.fetch.is_some() {
            return None;
        }
        let mut selects = Vec::new();
        if !leaves(&q.body, &mut selects) {
            return None;
        }
        let mut group = None;
        let mut keys = Vec::new();
        for sel in selects {
            if Self::select_merge(sel).is_some() {
                return None;
            }
            let (rels, conditions, keeps) = self.select_parts(sel);
            if keeps.is_some() {
                return None;
            }
            let names: Vec<String> = relations(sel);
            match self.scope(&rels, &conditions, &names, None) {
                Ok((Scope::Sharded { group: g, key, .. }, _)) => {
                    if *group.get_or_insert(g) != g {
                        // Keys of different groups do not combine: every
                        // shard (each row is still on one).
                        keys.push(KeyExpr::All);
                    }
                    keys.push(key)
                }
                _ => return None,
            }
        }
        Some((group?, KeyExpr::Or(keys)))
    }

    fn query(&self, q: &Query, whole: &Statement) -> Template {
        let class = crate::classify::classify_statement(whole, &Default::default());
        let write = class != crate::classify::Class::Read;
        let mut all = relations(whole);
        let mut rels = Vec::new();
        let mut conditions: Vec<(&Expr, bool)> = Vec::new();
        let mut needs_merge = None;
        let mut keeps = None;
        let mut top = None;
        match &*q.body {
            SetExpr::Select(sel) => {
                top = Some(&**sel);
                (rels, conditions, keeps) = self.select_parts(sel);
                if let Some(w) = &sel.selection {
                    // Subqueries whose rows for each outer row live on that
                    // row's shard are answered there: not counted as
                    // sharded tables read elsewhere.
                    let mut colocated = Vec::new();
                    self.colocated_subqueries(w, &rels, &mut colocated);
                    for name in colocated {
                        if let Some(i) = all.iter().position(|n| *n == name) {
                            all.remove(i);
                        }
                    }
                }
                needs_merge = Self::select_merge(sel);
            }
            SetExpr::SetOperation { op, .. } => {
                needs_merge = Some(match op {
                    sqlparser::ast::SetOperator::Union => "UNION",
                    sqlparser::ast::SetOperator::Intersect => "INTERSECT",
                    _ => "EXCEPT",
                });
            }
            _ => {}
        }
        if q.order_by.is_some() {
            needs_merge = Some("ORDER BY");
        }
        if let Some(l) = &q.limit_clause {
            needs_merge = Some(match l {
                sqlparser::ast::LimitClause::LimitOffset { limit: None, .. } => "OFFSET",
                _ => "LIMIT",
            });
        }
        if q.fetch.is_some() {
            needs_merge = Some("FETCH FIRST");
        }
        if let SetExpr::SetOperation { op, .. } = &*q.body {
            let sharded = all
                .iter()
                .find(|n| !is_catalog(n) && matches!(self.sh.table(n), TableKind::Sharded(_)));
            if let Some(table) = sharded {
                let refusal = Refusal::unsupported(format!(
                    "{op} over sharded table \"{table}\" is not supported: each branch would see one shard's rows; pin every branch to keys of one shard, run the branches separately, or add a /* shardline: shard=NAME */ comment"
                ));
                if let Some(u) = all
                    .iter()
                    .find(|n| !is_catalog(n) && self.sh.table(n) == TableKind::Unsharded)
                {
                    return Template::refused(Refusal::unsupported(format!(
                        "the statement mixes table \"{u}\", which is not sharded (it lives on the default shard), with sharded table \"{table}\""
                    )));
                }
                return match (self.pins(whole, None), self.union_all(q)) {
                    (Ok(pins), _) if !pins.is_empty() => {
                        let mut t = Template::new(
                            Scope::Sharded {
                                group: pins[0].0,
                                key: pins[0].1.clone(),
                                rows: false,
                                key_change: None,
                            },
                            write,
                        );
                        t.pinned = pins;
                        t
                    }
                    (_, Some((group, key))) if q.with.is_none() => Template::new(
                        Scope::Sharded {
                            group,
                            key,
                            rows: false,
                            key_change: None,
                        },
                        write,
                    ),
                    _ => Template::refused(refusal),
                };
            }
        }
        let mut t = match self.scope(&rels, &conditions, &all, Some((whole, top))) {
            Ok((scope, pinned)) => {
                let mut t = Template::new(scope, write);
                t.pinned = pinned;
                t
            }
            Err(r) => return Template::refused(r),
        };
        t.needs_merge = needs_merge;
        t.spread_refusal = keeps.map(|side| {
            Refusal::unsupported(format!(
                "an outer join keeps the rows of {side}, which every shard holds: on several shards each row without a match would come back once per shard; add the sharding key to the WHERE clause (or a /* shardline: shard=NAME */ comment), or join the other way round"
            ))
        });
        t
    }

    fn insert(&self, ins: &sqlparser::ast::Insert, whole: &Statement) -> Template {
        let TableObject::TableName(name) = &ins.table else {
            return Template::new(Scope::AllShards, true);
        };
        let table = lower_name(name);
        let all = relations(whole);
        match self.sh.table(&table) {
            TableKind::Sharded(rule) => {
                let sources: Vec<&String> = all.iter().skip(1).collect();
                if let Some(other) = sources.iter().find(|n| !is_catalog(n)) {
                    return Template::refused(Refusal::unsupported(format!(
                        "INSERT into sharded table \"{table}\" reads table \"{other}\"; the proxy splits only INSERT ... VALUES"
                    )));
                }
                let Some(pos) = ins
                    .columns
                    .iter()
                    .position(|c| lower_name(c).rsplit('.').next() == Some(rule.column.as_str()))
                else {
                    let why = if ins.columns.is_empty() {
                        "name its columns"
                    } else {
                        "give the key column a value"
                    };
                    return Template::refused(Refusal::unsupported(format!(
                        "INSERT into sharded table \"{table}\" must {why}: the proxy places each row by its \"{}\"",
                        rule.column
                    )));
                };
                let rows = match ins.source.as_deref().map(|q| &*q.body) {
                    Some(SetExpr::Values(v)) => &v.rows,
                    _ => {
                        return Template::refused(Refusal::unsupported(format!(
                            "INSERT into sharded table \"{table}\" must use VALUES: the proxy places each row by its \"{}\"",
                            rule.column
                        )))
                    }
                };
                let keys: Vec<KeySrc> = rows
                    .iter()
                    .map(|r| {
                        r.content
                            .get(pos)
                            .map_or(KeySrc::Unknown, |e| self.value_src(e))
                    })
                    .collect();
                if keys.contains(&KeySrc::Unknown) {
                    return Template::refused(Refusal::unsupported(format!(
                        "INSERT into sharded table \"{table}\": each row's \"{}\" must be a constant or a parameter",
                        rule.column
                    )));
                }
                let mut key_change = None;
                if let Some(OnInsert::OnConflict(oc)) = &ins.on {
                    if let OnConflictAction::DoUpdate(du) = &oc.action {
                        for a in &du.assignments {
                            if let sqlparser::ast::AssignmentTarget::ColumnName(n) = &a.target {
                                let excluded_key = matches!(&a.value, Expr::CompoundIdentifier(p)
                                    if p.len() == 2
                                    && p[0].value.eq_ignore_ascii_case("excluded")
                                    && p[1].value.eq_ignore_ascii_case(&rule.column));
                                if lower_name(n) == rule.column && !excluded_key {
                                    key_change = Some(self.value_src(&a.value));
                                }
                            }
                        }
                    }
                }
                Template::new(
                    Scope::Sharded {
                        group: rule.group,
                        key: KeyExpr::Keys(keys),
                        rows: true,
                        key_change,
                    },
                    true,
                )
            }
            TableKind::Reference => {
                if let Some(other) = all
                    .iter()
                    .skip(1)
                    .find(|n| !is_catalog(n) && self.sh.table(n) != TableKind::Reference)
                {
                    return Template::refused(Refusal::unsupported(format!(
                        "INSERT into reference table \"{table}\" reads table \"{other}\", which is not on every shard"
                    )));
                }
                Template::new(Scope::Reference, true)
            }
            TableKind::Unsharded => {
                let rels = vec![Rel {
                    alias: table.clone(),
                    name: table.clone(),
                    kind: TableKind::Unsharded,
                    nullable: false,
                }];
                match self.scope(&rels, &[], &all, None) {
                    Ok((scope, _)) => Template::new(scope, true),
                    Err(r) => Template::refused(r),
                }
            }
        }
    }

    /// UPDATE and DELETE: key from WHERE; `assigned` columns (UPDATE SET).
    fn dml(
        &self,
        whole: &Statement,
        rels: &[Rel],
        selection: Option<&Expr>,
        assigned: &[(String, Option<&Expr>)],
    ) -> Template {
        let all = relations(whole);
        let conditions: Vec<(&Expr, bool)> = selection.map(|s| (s, true)).into_iter().collect();
        let (mut scope, pinned) = match self.scope(rels, &conditions, &all, Some((whole, None))) {
            Ok(s) => s,
            Err(r) => return Template::refused(r),
        };
        if let Scope::Sharded { key_change, .. } = &mut scope {
            let target = &rels[0];
            if let TableKind::Sharded(rule) = &target.kind {
                for (col, value) in assigned {
                    if col.rsplit('.').next() == Some(rule.column.as_str()) {
                        *key_change = Some(value.map_or(KeySrc::Unknown, |v| self.value_src(v)));
                    }
                }
            }
        }
        let mut t = Template::new(scope, true);
        t.pinned = pinned;
        t
    }

    fn copy(
        &self,
        whole: &Statement,
        source: &CopySource,
        to: bool,
        options: &[sqlparser::ast::CopyOption],
        legacy: &[sqlparser::ast::CopyLegacyOption],
    ) -> Template {
        let (table, columns) = match source {
            CopySource::Query(q) => {
                let mut t = self.query(q, whole);
                t.write = false;
                return t;
            }
            CopySource::Table {
                table_name,
                columns,
            } => (lower_name(table_name), columns),
        };
        let kind = self.sh.table(&table);
        if to {
            let scope = match kind {
                TableKind::Sharded(r) => Scope::Sharded {
                    group: r.group,
                    key: KeyExpr::All,
                    rows: false,
                    key_change: None,
                },
                TableKind::Reference => Scope::Reference,
                TableKind::Unsharded if is_catalog(&table) => Scope::Anywhere,
                TableKind::Unsharded => Scope::Default,
            };
            return Template::new(scope, false);
        }
        let (scope, column) = match kind {
            TableKind::Sharded(r) => (
                Scope::Sharded {
                    group: r.group,
                    key: KeyExpr::All,
                    rows: true,
                    key_change: None,
                },
                r.column,
            ),
            TableKind::Reference => (Scope::Reference, String::new()),
            TableKind::Unsharded => return Template::new(Scope::Default, true),
        };
        let mut c = CopyIn {
            key_column: columns
                .iter()
                .position(|i| i.value.to_ascii_lowercase() == column),
            column,
            table,
            csv: false,
            binary: false,
            header: false,
            delimiter: b'\t',
            null: "\\N".into(),
            quote: b'"',
            escape: b'"',
        };
        if !columns.is_empty() && c.key_column.is_none() && matches!(scope, Scope::Sharded { .. }) {
            return Template::refused(Refusal::unsupported(format!(
                "COPY into sharded table \"{}\" must include the key column \"{}\"",
                c.table, c.column
            )));
        }
        use sqlparser::ast::{CopyLegacyCsvOption, CopyLegacyOption, CopyOption};
        let mut explicit_null = false;
        for o in options {
            match o {
                CopyOption::Format(f) => match f.value.to_ascii_lowercase().as_str() {
                    "csv" => c.csv = true,
                    "binary" => c.binary = true,
                    _ => {}
                },
                CopyOption::Delimiter(d) => c.delimiter = *d as u8,
                CopyOption::Header(h) => c.header = *h,
                CopyOption::Null(n) => {
                    c.null = n.clone();
                    explicit_null = true;
                }
                CopyOption::Quote(q) => c.quote = *q as u8,
                CopyOption::Escape(e) => c.escape = *e as u8,
                _ => {}
            }
        }
        for o in legacy {
            match o {
                CopyLegacyOption::Binary => c.binary = true,
                CopyLegacyOption::Delimiter(d) => c.delimiter = *d as u8,
                CopyLegacyOption::Null(n) => {
                    c.null = n.clone();
                    explicit_null = true;
                }
                CopyLegacyOption::Csv(opts) => {
                    c.csv = true;
                    for x in opts {
                        match x {
                            CopyLegacyCsvOption::Header => c.header = true,
                            CopyLegacyCsvOption::Quote(q) => c.quote = *q as u8,
                            CopyLegacyCsvOption::Escape(e) => c.escape = *e as u8,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if c.csv {
            if c.delimiter == b'\t'
                && !options
                    .iter()
                    .any(|o| matches!(o, CopyOption::Delimiter(_)))
                && !legacy
                    .iter()
                    .any(|o| matches!(o, CopyLegacyOption::Delimiter(_)))
            {
                c.delimiter = b',';
            }
            if !explicit_null {
                c.null = String::new();
            }
            if !options.iter().any(|o| matches!(o, CopyOption::Escape(_))) {
                c.escape = c.quote;
            }
        }
        let mut t = Template::new(scope, true);
        t.copy_in = Some(c);
        t
    }
}

/// Where a statement runs, once its key values are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// No table: the transaction's shard, else the default shard.
    Anywhere,
    /// A reference-table read: any one shard (balanced).
    Spread,
    One(usize),
    /// Several shards (every one: broadcast or a read without a key).
    Many(ShardMask),
    /// A read on several shards whose rows must be merged (ORDER BY,
    /// LIMIT, aggregates, DISTINCT): planned by `scatter::plan`.
    Merge(ShardMask),
    /// A multi-row INSERT whose rows belong to several shards: split it.
    Split(ShardMask),
    /// COPY FROM STDIN to split row by row over these shards.
    CopySplit(ShardMask),
    /// A pipeline (several executions before one Sync) whose executions
    /// each run on one shard, not all the same: each runs on its own.
    Pipeline(ShardMask),
    Refused(Refusal),
}

/// The shards of a pipeline whose executions (`parts`, one placement per
/// Bind) each need one shard, but not all the same one; `None` when they
/// share a shard, or when one needs several shards or is refused.
pub fn pipeline_shards(parts: &[Placement]) -> Option<ShardMask> {
    let mut mask: ShardMask = 0;
    for p in parts {
        match p {
            Placement::One(s) => mask |= mask_of(*s),
            Placement::Anywhere | Placement::Spread => {}
            _ => return None,
        }
    }
    (mask.count_ones() > 1).then_some(mask)
}

/// A bound parameter: format (1 is binary) and value (`None` is NULL).
pub type Param<'a> = (i16, Option<&'a [u8]>);

/// The values a statement's keys are read from.
pub struct KeyInput<'a> {
    /// The statement text (for constants).
    pub sql: &'a str,
    /// Bound parameters: `(format, value)`; format 1 is binary.
    pub params: &'a [Param<'a>],
    /// The parameter type OIDs the statement's Parse declared (0: none).
    pub param_types: &'a [u32],
    /// The session's `shardline.shard` / `shardline.sharding_key`.
    pub session_shard: Option<&'a str>,
    pub session_key: Option<&'a str>,
}

/// The placement of a statement from its template and key values.
pub fn resolve(t: &Template, sh: &Sharding, input: &KeyInput) -> Placement {
    let hint = t.hint.as_ref();
    let shard_hint = hint
        .and_then(|h| h.shard.as_deref())
        .or(input.session_shard);
    if let Some(name) = shard_hint {
        return match sh.shard_index(name) {
            Some(i) => Placement::One(i),
            None => Placement::Refused(Refusal {
                code: "22023",
                message: format!(
                    "no shard is named \"{name}\" (shards: {})",
                    sh.shard_names.join(", ")
                ),
            }),
        };
    }
    let key_hint = hint.and_then(|h| h.key.as_deref()).or(input.session_key);
    if let Some(k) = key_hint {
        if !matches!(t.scope, Scope::Anywhere) || hint.is_some_and(|h| h.key.is_some()) {
            let group = match &t.scope {
                Scope::Sharded { group, .. } => *group,
                _ => 0,
            };
            let g = &sh.groups[group];
            return match g.key_from_text(k).map(|v| g.shard_of(Some(&v))) {
                Some(Ok(s)) => Placement::One(s),
                Some(Err(e)) => Placement::Refused(Refusal {
                    code: "22023",
                    message: e,
                }),
                None => Placement::Refused(Refusal {
                    code: "22P02",
                    message: format!(
                        "sharding key hint \"{k}\" is not a valid {:?} key",
                        g.key_type
                    ),
                }),
            };
        }
    }
    if let Some(r) = &t.refusal {
        return Placement::Refused(r.clone());
    }
    let placement = match &t.scope {
        Scope::Anywhere => Placement::Anywhere,
        Scope::Default => Placement::One(sh.default_shard),
        Scope::Reference if t.write => Placement::Many(sh.all_shards()),
        Scope::Reference => Placement::Spread,
        Scope::AllShards => Placement::Many(sh.all_shards()),
        Scope::Sharded {
            group,
            key,
            rows,
            key_change,
        } => {
            let g = &sh.groups[*group];
            let values = Values::new(input);
            let mask = match key_mask(key, g, sh, &values) {
                Ok(m) => m,
                Err(e) => {
                    return Placement::Refused(Refusal {
                        code: "22023",
                        message: e,
                    })
                }
            };
            let mask = match pinned_mask(t, mask, sh, &values) {
                Ok(m) => m,
                Err(r) => return Placement::Refused(r),
            };
            if let Some(change) = key_change {
                let refusal = match key_value(change, g, &values) {
                    _ if mask.count_ones() != 1 => Some(
                        "an UPDATE that sets the sharding key must name the row's key in its WHERE clause, so the proxy can check the new key stays on the row's shard",
                    ),
                    Ok(v) if g.shard_of(v.as_ref()).ok().map(mask_of) == Some(mask) => None,
                    Ok(_) => Some(
                        "an UPDATE may not change a row's sharding key to a value owned by another shard: the row would have to move between shards; delete it and insert it again instead",
                    ),
                    Err(_) => Some(
                        "an UPDATE may set the sharding key only to a constant or a parameter (the proxy checks the new key stays on the row's shard)",
                    ),
                };
                if let Some(message) = refusal {
                    return Placement::Refused(Refusal::unsupported(message));
                }
            }
            if t.copy_in.is_some() {
                return Placement::CopySplit(sh.all_shards());
            }
            match mask.count_ones() {
                0 => Placement::One(sh.default_shard),
                1 => Placement::One(mask.trailing_zeros() as usize),
                _ if *rows => Placement::Split(mask),
                _ => Placement::Many(mask),
            }
        }
    };
    match placement {
        Placement::Many(_) | Placement::Split(_) if t.spread_refusal.is_some() => {
            Placement::Refused(t.spread_refusal.clone().unwrap_or_else(|| Refusal::unsupported("")))
        }
        Placement::Many(_) | Placement::Split(_) if t.cursor => Placement::Refused(Refusal::unsupported(
            "a cursor over rows of several shards is not supported: declare it with the sharding key in its WHERE clause (or a /* shardline: shard=NAME */ comment)",
        )),
        Placement::Many(mask) if t.explain => Placement::One(mask.trailing_zeros() as usize),
        Placement::Many(_) if t.copy_in.is_some() => Placement::CopySplit(sh.all_shards()),
        Placement::Many(mask) if !t.write && t.needs_merge.is_some() => Placement::Merge(mask),
        Placement::Many(_)
            if !sh.broadcast_writes
                && matches!(t.scope, Scope::Sharded { .. }) =>
        {
            Placement::Refused(Refusal::unsupported(
                "UPDATE or DELETE without the sharding key would run on every shard, and sharding.broadcast_writes is off",
            ))
        }
        other => other,
    }
}

/// The one shard a statement with pinned subqueries, CTEs or branches
/// runs on (`Template::pinned`): every restricted part names the same
/// single shard, the top level's `mask` included. A part whose keys
/// contradict themselves (`id = 1 AND id = 2`) reads no rows anywhere and
/// does not count.
fn pinned_mask(
    t: &Template,
    mask: ShardMask,
    sh: &Sharding,
    values: &Values,
) -> Result<ShardMask, Refusal> {
    if t.pinned.is_empty() {
        return Ok(mask);
    }
    let mut one: ShardMask = 0;
    for m in std::iter::once(Ok(mask)).chain(
        t.pinned
            .iter()
            .map(|(group, key)| key_mask(key, &sh.groups[*group], sh, values)),
    ) {
        let m = m.map_err(|e| Refusal {
            code: "22023",
            message: e,
        })?;
        if m == 0 {
            continue;
        }
        if m.count_ones() > 1 || (one != 0 && one != m) {
            return Err(Refusal::unsupported(
                "the statement's subqueries, CTEs or set-operation branches read rows of different shards (or the statement reads several shards): it runs whole only on one shard; name keys of one shard in each, or add a /* shardline: shard=NAME */ comment",
            ));
        }
        one = m;
    }
    Ok(one)
}

/// The value of one key source.
fn key_value(
    src: &KeySrc,
    g: &crate::sharding::Group,
    values: &Values,
) -> Result<Option<KeyValue>, ()> {
    let input = values.input;
    match *src {
        KeySrc::Null => Ok(None),
        KeySrc::Unknown => Err(()),
        KeySrc::Param { n, ty } => {
            let i = (n as usize).wrapping_sub(1);
            let (format, value) = *input.params.get(i).ok_or(())?;
            let Some(v) = value else { return Ok(None) };
            // A type the Parse declared wins over what the text implies.
            let declared = input
                .param_types
                .get(i)
                .copied()
                .and_then(ParamType::of_oid);
            param_key(g, declared.unwrap_or(ty), format == 1, v)
                .map(Some)
                .ok_or(())
        }
        KeySrc::Const { ordinal, negative } => {
            let text = values.constant(ordinal as usize).ok_or(())?;
            let text = if negative { format!("-{text}") } else { text };
            g.key_from_text(&text).map(Some).ok_or(())
        }
    }
}

/// The key a bound parameter of type `ty` holds; `None` when its value is
/// not one key (a fraction, a type the proxy does not read): the statement
/// then runs wherever the key could be.
fn param_key(
    g: &crate::sharding::Group,
    ty: ParamType,
    binary: bool,
    v: &[u8],
) -> Option<KeyValue> {
    let integral = |f: f64| {
        (f.fract() == 0.0 && f.abs() < 9.0e18).then(|| g.key_from_text(&(f as i64).to_string()))?
    };
    match (ty, binary) {
        (ParamType::Column, true) => g.key_from_binary(v),
        (ParamType::Other, _) => None,
        (ParamType::Float, false) => integral(std::str::from_utf8(v).ok()?.trim().parse().ok()?),
        (_, false) => g.key_from_text(std::str::from_utf8(v).ok()?),
        (ParamType::Int, true) => {
            let n = match v.len() {
                2 => i16::from_be_bytes(v.try_into().ok()?) as i64,
                4 => i32::from_be_bytes(v.try_into().ok()?) as i64,
                8 => i64::from_be_bytes(v.try_into().ok()?),
                _ => return None,
            };
            g.key_from_text(&n.to_string())
        }
        (ParamType::Text, true) => g.key_from_text(std::str::from_utf8(v).ok()?),
        (ParamType::Uuid, true) => match g.key_type {
            shardline_config::KeyType::Uuid => g.key_from_binary(v),
            _ => None,
        },
        (ParamType::Float, true) => match v.len() {
            4 => integral(f32::from_be_bytes(v.try_into().ok()?) as f64),
            8 => integral(f64::from_be_bytes(v.try_into().ok()?)),
            _ => None,
        },
    }
}

/// Key values read from one statement: its constants (scanned once, when
/// a key needs one) and its parameters.
struct Values<'a, 'b> {
    input: &'b KeyInput<'a>,
    spans: std::cell::OnceCell<Vec<(usize, usize)>>,
}

impl<'a, 'b> Values<'a, 'b> {
    fn new(input: &'b KeyInput<'a>) -> Self {
        Values {
            input,
            spans: std::cell::OnceCell::new(),
        }
    }

    fn constant(&self, n: usize) -> Option<String> {
        let spans = self.spans.get_or_init(|| {
            let mut v = Vec::new();
            crate::lexer::scan_constants(self.input.sql, |s, e| v.push((s, e)));
            v
        });
        let (s, e) = *spans.get(n)?;
        Some(constant_value(self.input.sql, s, e))
    }
}

/// The value of the constant at `s..e` of `sql`, unquoted.
fn constant_value(sql: &str, s: usize, e: usize) -> String {
    let raw = &sql[s..e];
    let escaped = s > 0 && matches!(sql.as_bytes()[s - 1], b'E' | b'e');
    if let Some(body) = raw.strip_prefix('\'') {
        let body = body.strip_suffix('\'').unwrap_or(body);
        if escaped {
            unescape(body)
        } else {
            body.replace("''", "'")
        }
    } else if let Some(after) = raw.strip_prefix('$') {
        let tag_end = after.find('$').map_or(raw.len(), |p| p + 2);
        let body_end = raw.len().saturating_sub(tag_end);
        raw.get(tag_end..body_end).unwrap_or_default().to_string()
    } else {
        raw.replace('_', "")
    }
}

fn unescape(body: &str) -> String {
    let mut out = String::with_capacity(body.len());
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some('r') => out.push('\r'),
                Some('b') => out.push('\u{8}'),
                Some('f') => out.push('\u{c}'),
                Some(other) => out.push(other),
                None => {}
            },
            '\'' => {
                // '' inside E'...'
                if chars.clone().next() == Some('\'') {
                    chars.next();
                }
                out.push('\'');
            }
            c => out.push(c),
        }
    }
    out
}

fn key_mask(
    key: &KeyExpr,
    g: &crate::sharding::Group,
    sh: &Sharding,
    values: &Values,
) -> Result<ShardMask, String> {
    let input = values.input;
    Ok(match key {
        KeyExpr::All => sh.all_shards(),
        KeyExpr::Keys(srcs) => {
            let mut m = 0;
            for s in srcs {
                match key_value(s, g, values) {
                    Ok(v) => m |= mask_of(g.shard_of(v.as_ref())?),
                    // A value the column type would reject: every shard
                    // reports the server's own error.
                    Err(()) => return Ok(sh.all_shards()),
                }
            }
            m
        }
        KeyExpr::AnyParam(n) => {
            let Some(&(format, Some(v))) = input.params.get((*n as usize).wrapping_sub(1)) else {
                return Ok(sh.all_shards());
            };
            let Some(values) = array_elements(format, v, g) else {
                return Ok(sh.all_shards());
            };
            let mut m = 0;
            for v in values {
                m |= mask_of(g.shard_of(v.as_ref())?);
            }
            m
        }
        KeyExpr::And(xs) => {
            let mut m = sh.all_shards();
            for x in xs {
                m &= key_mask(x, g, sh, values)?;
            }
            m
        }
        KeyExpr::Or(xs) => {
            let mut m = 0;
            for x in xs {
                m |= key_mask(x, g, sh, values)?;
            }
            m
        }
    })
}

/// Elements of an array parameter, text (`{1,2,"x"}`) or binary format.
fn array_elements(
    format: i16,
    v: &[u8],
    g: &crate::sharding::Group,
) -> Option<Vec<Option<KeyValue>>> {
    if format == 1 {
        let int =
            |b: &[u8]| -> Option<i32> { Some(i32::from_be_bytes(b.get(..4)?.try_into().ok()?)) };
        let ndim = int(v)?;
        if ndim == 0 {
            return Some(Vec::new());
        }
        if ndim != 1 {
            return None;
        }
        let count = int(v.get(12..)?)?;
        let mut pos = 20;
        let mut out = Vec::new();
        for _ in 0..count {
            let len = int(v.get(pos..)?)?;
            pos += 4;
            if len < 0 {
                out.push(None);
                continue;
            }
            let e = v.get(pos..pos + len as usize)?;
            pos += len as usize;
            out.push(Some(g.key_from_binary(e)?));
        }
        return Some(out);
    }
    let s = std::str::from_utf8(v).ok()?.trim();
    let inner = s.strip_prefix('{')?.strip_suffix('}')?;
    if inner.trim().is_empty() {
        return Some(Vec::new());
    }
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut was_quoted = false;
    let mut chars = inner.chars();
    let mut push = |cur: &mut String, was_quoted: bool| -> Option<()> {
        let item = if was_quoted {
            cur.clone()
        } else {
            cur.trim().to_string()
        };
        if !was_quoted && item.eq_ignore_ascii_case("null") {
            out.push(None);
        } else {
            out.push(Some(g.key_from_text(&item)?));
        }
        cur.clear();
        Some(())
    };
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                was_quoted = true;
            }
            '\\' if quoted => cur.push(chars.next()?),
            ',' if !quoted => {
                push(&mut cur, was_quoted)?;
                was_quoted = false;
            }
            '{' | '}' if !quoted => return None,
            c => cur.push(c),
        }
    }
    push(&mut cur, was_quoted)?;
    Some(out)
}

/// The placement of statements sent together (one simple query, or one
/// extended-protocol unit): they must agree on their shards.
pub fn combine(a: Placement, b: Placement) -> Placement {
    use Placement::*;
    match (a, b) {
        (r @ Refused(_), _) | (_, r @ Refused(_)) => r,
        (Anywhere, x) | (x, Anywhere) => x,
        (Spread, Spread) => Spread,
        (Spread, One(s)) | (One(s), Spread) => One(s),
        (One(a), One(b)) if a == b => One(a),
        (Many(a), Many(b)) if a == b => Many(a),
        (Spread, Many(m)) | (Many(m), Spread) => Many(m),
        (Merge(_), _) | (_, Merge(_)) => Refused(Refusal::unsupported(
            "a statement whose rows are merged across shards (ORDER BY, LIMIT, aggregates, DISTINCT) must be sent alone, not with other statements in one query string or pipeline",
        )),
        _ => Refused(Refusal::unsupported(
            "statements sent together (in one query string, or in one pipeline up to Sync) reach different shards; send them separately",
        )),
    }
}

/// One shard's part of a split multi-row INSERT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InsertPart {
    pub shard: usize,
    /// The statement for that shard: its rows only, and its bound
    /// parameters numbered `$1..` in the order of `params`.
    pub sql: String,
    /// The client's parameters (0-based) the part binds, in its numbering.
    /// Empty for a statement without parameters.
    pub params: Vec<usize>,
    /// The INSERT's rows (0-based) the part holds, in their order.
    pub rows: Vec<usize>,
}

/// Splits a multi-row `INSERT ... VALUES` by shard: one statement per
/// shard holding that shard's rows, in their original order. Only for the
/// text of a statement whose template is `Scope::Sharded { rows: true }`.
/// Keys bound as parameters are read from `params` (typed by the Parse's
/// `param_types`); each part then binds only the parameters its text
/// references, renumbered from `$1`.
///
/// With the statement's `template`, the rows are cut out of the text with
/// the lexer (no parse); otherwise, or when the text has a shape the lexer
/// does not follow, the statement is parsed and printed again.
pub fn split_insert(
    sql: &str,
    sh: &Sharding,
    template: Option<&Template>,
    params: &[Param],
    param_types: &[u32],
) -> Result<Vec<InsertPart>, Refusal> {
    let input = KeyInput {
        sql,
        params,
        param_types,
        session_shard: None,
        session_key: None,
    };
    let parts = match template.and_then(|t| split_by_text(sh, t, &input)) {
        Some(parts) => parts?,
        None => split_by_parse(sh, &input)?,
    };
    Ok(parts
        .into_iter()
        .map(|(shard, text, rows)| {
            let (sql, params) = if params.is_empty() {
                (text, Vec::new())
            } else {
                renumber_params(&text)
            };
            InsertPart {
                shard,
                sql,
                params,
                rows,
            }
        })
        .collect())
}

/// A shard, its statement text, the rows it holds.
type SplitPart = (usize, String, Vec<usize>);

/// The parse-and-print split.
fn split_by_parse(sh: &Sharding, input: &KeyInput) -> Result<Vec<SplitPart>, Refusal> {
    let sql = input.sql;
    let cannot = || Refusal::unsupported("this INSERT cannot be split by shard");
    let statements =
        sqlparser::parser::Parser::parse_sql(&sqlparser::dialect::PostgreSqlDialect {}, sql)
            .map_err(|_| cannot())?;
    let [Statement::Insert(ins)] = statements.as_slice() else {
        return Err(Refusal::unsupported(
            "a multi-row INSERT whose rows belong to several shards must be sent alone",
        ));
    };
    let TableObject::TableName(name) = &ins.table else {
        return Err(cannot());
    };
    let TableKind::Sharded(rule) = sh.table(&lower_name(name)) else {
        return Err(cannot());
    };
    let pos = ins
        .columns
        .iter()
        .position(|c| lower_name(c).rsplit('.').next() == Some(rule.column.as_str()))
        .ok_or_else(cannot)?;
    let Some(SetExpr::Values(values)) = ins.source.as_deref().map(|q| &*q.body) else {
        return Err(cannot());
    };
    let consts = Constants::new(sql);
    let a = Analyzer {
        consts: &consts,
        sh,
    };
    let srcs: Vec<KeySrc> = values
        .rows
        .iter()
        .map(|row| {
            row.content
                .get(pos)
                .map_or(KeySrc::Unknown, |e| a.value_src(e))
        })
        .collect();
    let by_shard = rows_by_shard(&sh.groups[rule.group], &srcs, input)
        .map_err(|r| r.unwrap_or_else(cannot))?;
    let mut out = Vec::new();
    for (shard, rows) in by_shard {
        let mut part = ins.clone();
        if let Some(q) = part.source.as_mut() {
            if let SetExpr::Values(v) = &mut *q.body {
                v.rows = rows.iter().map(|&i| values.rows[i].clone()).collect();
            }
        }
        out.push((shard, Statement::Insert(part).to_string(), rows));
    }
    Ok(out)
}

/// Row indexes grouped by the shard owning each row's key, shards in
/// order. `Err(None)`: a key could not be read; `Err(Some)`: no shard holds it.
fn rows_by_shard(
    g: &crate::sharding::Group,
    srcs: &[KeySrc],
    input: &KeyInput,
) -> Result<Vec<(usize, Vec<usize>)>, Option<Refusal>> {
    let values = Values::new(input);
    let mut by_shard: Vec<(usize, Vec<usize>)> = Vec::new();
    for (i, src) in srcs.iter().enumerate() {
        let key = key_value(src, g, &values).map_err(|_| None)?;
        let shard = g.shard_of(key.as_ref()).map_err(|e| {
            Some(Refusal {
                code: "22023",
                message: e,
            })
        })?;
        match by_shard.iter_mut().find(|(s, _)| *s == shard) {
            Some((_, rows)) => rows.push(i),
            None => by_shard.push((shard, vec![i])),
        }
    }
    by_shard.sort_by_key(|(s, _)| *s);
    Ok(by_shard)
}

/// The lexer's split: `prefix VALUES (row), (row) ... suffix`, each row
/// placed by the template's key source for it. `None`: not that shape.
fn split_by_text(
    sh: &Sharding,
    t: &Template,
    input: &KeyInput,
) -> Option<Result<Vec<SplitPart>, Refusal>> {
    let sql = input.sql;
    let Scope::Sharded {
        group,
        key: KeyExpr::Keys(srcs),
        rows: true,
        ..
    } = &t.scope
    else {
        return None;
    };
    let (prefix_end, rows, suffix_start) = values_rows(sql)?;
    if rows.len() != srcs.len() {
        return None;
    }
    let by_shard = match rows_by_shard(&sh.groups[*group], srcs, input) {
        Ok(b) => b,
        Err(None) => return None,
        Err(Some(r)) => return Some(Err(r)),
    };
    let (prefix, suffix) = (&sql[..prefix_end], &sql[suffix_start..]);
    Some(Ok(by_shard
        .into_iter()
        .map(|(shard, idx)| {
            let mut text = String::with_capacity(sql.len() / 2);
            text.push_str(prefix);
            for (n, &i) in idx.iter().enumerate() {
                if n > 0 {
                    text.push_str(", ");
                }
                text.push_str(&sql[rows[i].0..rows[i].1]);
            }
            text.push_str(suffix);
            (shard, text, idx)
        })
        .collect()))
}

/// Renumbers the bound parameters a statement references (`$n` outside
/// strings, quoted names and comments) as `$1, $2, ...` in the order they
/// first appear; returns the new text and, per new number, the old
/// parameter (0-based).
pub fn renumber_params(sql: &str) -> (String, Vec<usize>) {
    let b = sql.as_bytes();
    // Bytes, not chars: tokens are cut at ASCII bytes only, so the text
    // stays valid UTF-8 as a whole.
    let mut out: Vec<u8> = Vec::with_capacity(sql.len());
    let mut order: Vec<usize> = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$'
            && b.get(i + 1).is_some_and(u8::is_ascii_digit)
            && (i == 0 || !is_word(b[i - 1]))
        {
            let mut j = i + 1;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            match sql[i + 1..j].parse::<usize>() {
                Ok(n) if n > 0 => {
                    let new = match order.iter().position(|&o| o == n - 1) {
                        Some(p) => p + 1,
                        None => {
                            order.push(n - 1);
                            order.len()
                        }
                    };
                    out.push(b'$');
                    out.extend_from_slice(new.to_string().as_bytes());
                }
                _ => out.extend_from_slice(&b[i..j]),
            }
            i = j;
            continue;
        }
        let j = crate::lexer::skip_token(b, i);
        out.extend_from_slice(&b[i..j]);
        i = j;
    }
    (
        String::from_utf8(out)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
        order,
    )
}

/// Where the rows start, each row's span, where the rest starts.
type ValuesRows = (usize, Vec<(usize, usize)>, usize);

/// Finds the row list of `... VALUES (...), (...) ...` at the top level:
/// where the rows start, each row's span (parentheses included), and where
/// the text after the last row starts.
fn values_rows(sql: &str) -> Option<ValuesRows> {
    let b = sql.as_bytes();
    let word_at = |i: usize, w: &str| {
        b.len() >= i + w.len()
            && b[i..i + w.len()].eq_ignore_ascii_case(w.as_bytes())
            && (i == 0 || !is_word(b[i - 1]))
            && b.get(i + w.len()).is_none_or(|c| !is_word(*c))
    };
    // The first top-level VALUES.
    let (mut i, mut depth) = (0, 0i32);
    let start = loop {
        if i >= b.len() {
            return None;
        }
        match b[i] {
            b'(' => depth += 1,
            b')' => depth -= 1,
            _ if depth == 0 && word_at(i, "values") => break i + "values".len(),
            _ => {}
        }
        i = crate::lexer::skip_token(b, i);
    };
    let mut rows = Vec::new();
    let mut i = start;
    loop {
        while i < b.len() && (b[i].is_ascii_whitespace()) {
            i += 1;
        }
        if b.get(i) != Some(&b'(') {
            return None;
        }
        let row_start = i;
        let mut depth = 0i32;
        loop {
            match b.get(i)? {
                b'(' => depth += 1,
                b')' => depth -= 1,
                _ => {}
            }
            i = crate::lexer::skip_token(b, i);
            if depth == 0 {
                break;
            }
        }
        rows.push((row_start, i));
        let mut j = i;
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        if b.get(j) == Some(&b',') {
            i = j + 1;
            continue;
        }
        // Comments between rows are not followed: parse instead.
        if b.get(j..j + 2).is_some_and(|x| x == b"--" || x == b"/*") {
            return None;
        }
        return Some((start, rows, i));
    }
}

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}
