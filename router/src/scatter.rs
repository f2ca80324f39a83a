//! Planning a read that spans shards and needs a merge.
//!
//! [`plan`] turns a SELECT into what each shard runs and a [`MergePlan`]
//! the proxy executes on the shards' answers:
//!
//! - **Sorted**: ORDER BY stays on the shards; the proxy k-way merges the
//!   sorted streams, comparing sort keys as the server does (`merge`).
//!   Keys that are not output columns (an expression, a column left out of
//!   the select list) are appended as hidden trailing columns and stripped
//!   before the client sees a row. LIMIT n OFFSET m is pushed down as
//!   LIMIT n+m and applied after the merge. DISTINCT ON keeps the first row
//!   of each run of equal keys.
//! - **Grouped** (aggregates, GROUP BY, HAVING, DISTINCT): each shard
//!   aggregates its rows; the proxy combines the partial rows per group
//!   (counts and sums added, min/max compared, AVG rewritten to SUM and a
//!   hidden COUNT), then applies HAVING, ORDER BY and LIMIT/OFFSET.
//!
//! Groups that cannot span shards need no combining: a GROUP BY on the
//! sharding key, or a DISTINCT whose select list holds it, runs whole on
//! each shard and is only merged by order. What cannot be merged exactly is
//! refused with SQLSTATE 0A000 naming the construct.
//!
//! Types are not known here; [`crate::gather`] checks them against the
//! shards' RowDescription before any row reaches the client.

use crate::sharding::{Sharding, TableKind};
use crate::shards::{lower_name, Construct, Refusal, AGGREGATES};
use sqlparser::ast::{
    BinaryOperator, DuplicateTreatment, Expr, FunctionArg, FunctionArgExpr, FunctionArguments,
    GroupByExpr, Ident, LimitClause, ObjectNamePart, OrderByKind, Query, Select, SelectItem,
    SetExpr, Statement, TableFactor, UnaryOperator, Value, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::ops::ControlFlow;

/// A column of the shards' rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Col {
    /// The n-th field (0-based).
    Field(usize),
    /// The n-th visible field counted from the last visible one (an item
    /// after a `*`, whose width is known only from the RowDescription).
    FromEnd(usize),
    /// The n-th hidden trailing column.
    Hidden(usize),
}

impl Col {
    /// The field index, given how many fields are visible.
    pub fn index(self, visible: usize) -> Option<usize> {
        match self {
            Col::Field(i) => (i < visible).then_some(i),
            Col::FromEnd(k) => visible.checked_sub(k + 1),
            Col::Hidden(h) => Some(visible + h),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortKey {
    pub col: Col,
    pub descending: bool,
    pub nulls_first: bool,
    /// `COLLATE "C"` (or POSIX, ucs_basic): text compares bytewise whatever
    /// the database's collation.
    pub collate_c: bool,
}

/// A LIMIT or OFFSET: absent, a constant, or a bound parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    None,
    Const(u64),
    Param(u16),
}

/// How an aggregate column's partial values combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agg {
    Count,
    Sum,
    Min,
    Max,
    BoolAnd,
    BoolOr,
    /// AVG: this column holds the partial SUM, `count` the partial COUNT.
    Avg {
        count: Col,
    },
    /// `count(DISTINCT x)` off the sharding key: the shards also group by
    /// `x` (in column `value`); this column's partial count says whether a
    /// partial row holds a counted `x`. The result is the number of
    /// distinct `x` among those rows.
    CountDistinct {
        value: Col,
    },
}

/// A HAVING condition, evaluated on the combined groups.
#[derive(Debug, Clone, PartialEq)]
pub enum Cond {
    And(Box<Cond>, Box<Cond>),
    Or(Box<Cond>, Box<Cond>),
    Not(Box<Cond>),
    Cmp(Operand, CmpOp, Operand),
    IsNull(Operand, bool),
    Operand(Operand),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    Col(Col),
    Number(String),
    Str(String),
    Bool(bool),
    Null,
}

#[derive(Debug, Clone, PartialEq)]
pub enum GroupKeys {
    Cols(Vec<Col>),
    /// DISTINCT: every visible column.
    AllVisible,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Grouping {
    pub keys: GroupKeys,
    /// No GROUP BY: one row even when the shards send none.
    pub plain: bool,
    /// Aggregate columns; every other column keeps its group's first value.
    pub aggs: Vec<(Col, Agg)>,
    pub having: Option<Cond>,
}

/// What the proxy does with a cross-shard read.
#[derive(Debug, Clone, PartialEq)]
pub struct MergePlan {
    /// The statement each shard runs.
    pub sql: String,
    /// Trailing columns the client does not see.
    pub hidden: usize,
    pub sort: Vec<SortKey>,
    pub limit: Count,
    pub offset: Count,
    pub grouping: Option<Grouping>,
    /// DISTINCT ON: keep the first row of each run of equal values.
    pub distinct_on: Vec<Col>,
    /// FETCH FIRST ... WITH TIES: past the limit, rows sorting equal to the
    /// last one still come.
    pub with_ties: bool,
}

fn refuse(what: impl Into<String>) -> Refusal {
    refuse_because(what, "")
}

/// 0A000 naming the construct, and why when it is not obvious.
fn refuse_because(what: impl Into<String>, why: &str) -> Refusal {
    let why = if why.is_empty() {
        String::new()
    } else {
        format!(" ({why})")
    };
    Refusal::unsupported(
        Construct::Merge,
        format!(
            "cannot merge {} across shards{why}; add the sharding key to the WHERE clause, or a /* shardline: shard=NAME */ comment",
            what.into()
        ),
    )
}

/// Plans the merge of `sql` read from several shards: `Ok(None)` when the
/// shards' rows can simply be concatenated.
pub fn plan(sql: &str, sh: &Sharding) -> Result<Option<MergePlan>, Refusal> {
    let statements = Parser::parse_sql(&PostgreSqlDialect {}, sql)
        .map_err(|e| refuse(format!("a statement the proxy cannot parse ({e})")))?;
    let q = match statements.as_slice() {
        [Statement::Query(q)] => q,
        [Statement::Copy { .. }] => return Err(refuse(
            "COPY (SELECT ...) TO STDOUT of a query with ORDER BY, LIMIT, aggregates or DISTINCT",
        )),
        [other] => {
            return Err(refuse(
                format!("{}", other).chars().take(60).collect::<String>(),
            ))
        }
        _ => return Err(refuse("several statements in one query")),
    };
    let mut q = (**q).clone();
    // A CTE over reference tables (or none) holds the same rows on every
    // shard, like a reference table; one over a sharded table would see
    // one shard's rows.
    if let Some(with) = &q.with {
        let sharded = with.cte_tables.iter().any(|cte| {
            crate::shards::relations(&*cte.query)
                .iter()
                .any(|n| matches!(sh.table(n), TableKind::Sharded(_)))
        });
        if with.recursive || sharded {
            return Err(refuse("WITH"));
        }
    }
    let SetExpr::Select(sel) = &*q.body else {
        return Err(refuse(match &*q.body {
            SetExpr::SetOperation { op, .. } => format!("{op}"),
            _ => "this query form".into(),
        }));
    };
    let mut sel = (**sel).clone();
    let (limit, offset) = limits(&q)?;
    let with_ties = q.fetch.as_ref().is_some_and(|f| f.with_ties);
    let mut p = Planner::new(&sel, sh);
    let aggregated = !p.group_exprs.is_empty()
        || sel.having.is_some()
        || sel
            .projection
            .iter()
            .any(|i| item_expr(i).is_some_and(has_aggregate));
    if matches!(&sel.group_by, GroupByExpr::All(_))
        || matches!(&sel.group_by, GroupByExpr::Expressions(_, m) if !m.is_empty())
    {
        return Err(refuse("GROUP BY ALL, ROLLUP, CUBE or GROUPING SETS"));
    }
    if p.group_exprs
        .iter()
        .any(|e| matches!(e, Expr::Rollup(_) | Expr::Cube(_) | Expr::GroupingSets(_)))
    {
        return Err(refuse("ROLLUP, CUBE or GROUPING SETS"));
    }
    // GROUP BY the key, by name or by the position of a select item.
    let key_grouped = p.group_exprs.iter().any(|e| {
        p.is_key(e)
            || matches!(e, Expr::Value(v) if matches!(&v.value, Value::Number(n, _)
                if n.parse::<usize>().ok().and_then(|i| i.checked_sub(1))
                    .and_then(|i| sel.projection.get(i))
                    .and_then(item_expr)
                    .is_some_and(|x| p.is_key(x))))
    });
    p.check_windows(&q, aggregated && !key_grouped)?;
    let distinct = matches!(sel.distinct, Some(sqlparser::ast::Distinct::Distinct));
    let distinct_key = distinct
        && sel
            .projection
            .iter()
            .any(|i| item_expr(i).is_some_and(|e| p.is_key(e)));
    let plan = if aggregated && !key_grouped {
        if sel.distinct.is_some() {
            return Err(refuse("DISTINCT together with aggregates"));
        }
        p.grouped(&mut sel, &q, limit, offset)?
    } else if distinct && !distinct_key {
        p.distinct(&q, limit, offset)?
    } else {
        match p.sorted(&mut sel, &q, limit, offset, !distinct)? {
            Some(plan) => plan,
            None => return Ok(None),
        }
    };
    let grouped = plan.grouping.is_some() && !distinct;
    if with_ties && (plan.grouping.is_some() || !plan.distinct_on.is_empty() || distinct) {
        return Err(refuse(
            "FETCH FIRST ... WITH TIES over groups or DISTINCT rows",
        ));
    }
    *q.body = SetExpr::Select(Box::new(sel));
    if with_ties {
        // Each shard sends its first LIMIT + OFFSET rows and their ties:
        // every row sorting before the merged answer's last is among them.
        q.limit_clause = unused_params(limit, offset);
        if let Some(LimitClause::LimitOffset { limit: Some(n), .. }) = pushed_limit(limit, offset) {
            q.fetch = Some(sqlparser::ast::Fetch {
                with_ties: true,
                percent: false,
                quantity: Some(Expr::Nested(Box::new(n))),
            });
            q.limit_clause = None;
        }
    } else if grouped {
        q.order_by = None;
        q.limit_clause = unused_params(limit, offset);
        q.fetch = None;
    } else {
        q.fetch = None;
        // Without a LIMIT nothing is pushed down; an OFFSET parameter must
        // still be referenced (the Bind supplies it).
        q.limit_clause = pushed_limit(limit, offset).or_else(|| unused_params(limit, offset));
    }
    Ok(Some(MergePlan {
        sql: q.to_string(),
        with_ties,
        ..plan
    }))
}

/// The query's LIMIT and OFFSET (FETCH FIRST counts as LIMIT).
fn limits(q: &Query) -> Result<(Count, Count), Refusal> {
    let mut limit = Count::None;
    let mut offset = Count::None;
    match &q.limit_clause {
        None => {}
        Some(LimitClause::LimitOffset {
            limit: l,
            offset: o,
            limit_by,
        }) => {
            if !limit_by.is_empty() {
                return Err(refuse("LIMIT BY"));
            }
            if let Some(l) = l {
                limit = count(l, "LIMIT")?;
            }
            if let Some(o) = o {
                offset = count(&o.value, "OFFSET")?;
            }
        }
        Some(LimitClause::OffsetCommaLimit { .. }) => return Err(refuse("LIMIT m, n")),
    }
    if let Some(f) = &q.fetch {
        if f.percent {
            return Err(refuse("FETCH FIRST ... PERCENT"));
        }
        limit = match &f.quantity {
            Some(e) => count(e, "FETCH FIRST")?,
            None => Count::Const(1),
        };
    }
    Ok((limit, offset))
}

/// The value of an integer constant expression: numbers, parentheses,
/// unary minus, `+ - *` (exact; `None` past i128 or for anything else).
fn const_int(e: &Expr) -> Option<i128> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n.parse().ok(),
            _ => None,
        },
        Expr::Nested(inner) => const_int(inner),
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => const_int(expr)?.checked_neg(),
        Expr::UnaryOp {
            op: UnaryOperator::Plus,
            expr,
        } => const_int(expr),
        Expr::BinaryOp { left, op, right } => {
            let (a, b) = (const_int(left)?, const_int(right)?);
            match op {
                BinaryOperator::Plus => a.checked_add(b),
                BinaryOperator::Minus => a.checked_sub(b),
                BinaryOperator::Multiply => a.checked_mul(b),
                _ => None,
            }
        }
        _ => None,
    }
}

/// A LIMIT or OFFSET value: Postgres takes a bigint.
fn bigint(v: i128) -> Result<Count, Refusal> {
    match u64::try_from(v) {
        Ok(n) if n <= i64::MAX as u64 => Ok(Count::Const(n)),
        _ => Err(Refusal::invalid("22003", "bigint out of range")),
    }
}

fn count(e: &Expr, what: &str) -> Result<Count, Refusal> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => match n.parse::<i128>() {
                Ok(v) => bigint(v),
                Err(_) => Err(refuse(format!("{what} {n}"))),
            },
            Value::Null => Ok(Count::None),
            Value::Placeholder(p) => p
                .strip_prefix('$')
                .and_then(|n| n.parse().ok())
                .map(Count::Param)
                .ok_or_else(|| refuse(format!("{what} {p}"))),
            _ => Err(refuse(format!("{what} {e}"))),
        },
        Expr::Identifier(i) if i.value.eq_ignore_ascii_case("all") => Ok(Count::None),
        Expr::Nested(inner) => count(inner, what),
        // A constant expression (`(2 + 1)`, `-1`): its value; a negative
        // one gets Postgres's own error, wherever it runs.
        _ if const_int(e).is_some() => {
            let v = const_int(e).unwrap_or(0);
            if v < 0 {
                let what = if what == "FETCH FIRST" { "LIMIT" } else { what };
                return Err(Refusal::invalid(
                    if what == "OFFSET" { "2201X" } else { "2201W" },
                    format!("{what} must not be negative"),
                ));
            }
            bigint(v)
        }
        _ => Err(refuse(format!("{what} with an expression ({e})"))),
    }
}

/// The LIMIT each shard runs: enough rows for OFFSET + LIMIT.
fn pushed_limit(limit: Count, offset: Count) -> Option<LimitClause> {
    // LIMIT n + m saturates at bigint's largest value, as the shards' LIMIT
    // takes a bigint (and a larger limit is no limit anyway). Negative
    // parameters are refused before the statement runs.
    const MAX: u64 = i64::MAX as u64;
    let param = |n: u16| format!("${n}::int8");
    let capped = |l: &str, o: &str| format!("(LEAST({l}, {MAX} - {o}) + {o})");
    let text = match (limit, offset) {
        (Count::None, _) => return None,
        (Count::Const(l), Count::None) => l.min(MAX).to_string(),
        (Count::Const(l), Count::Const(o)) => l.saturating_add(o).min(MAX).to_string(),
        (Count::Param(l), Count::None | Count::Const(0)) => param(l),
        (Count::Param(l), Count::Const(o)) => capped(&param(l), &o.min(MAX).to_string()),
        (Count::Const(l), Count::Param(o)) => capped(
            &l.min(MAX).to_string(),
            &format!("GREATEST({}, 0)", param(o)),
        ),
        (Count::Param(l), Count::Param(o)) => {
            capped(&param(l), &format!("GREATEST({}, 0)", param(o)))
        }
    };
    let expr = Parser::new(&PostgreSqlDialect {})
        .try_with_sql(&text)
        .and_then(|mut p| p.parse_expr())
        .ok()?;
    Some(LimitClause::LimitOffset {
        limit: Some(expr),
        offset: None,
        limit_by: vec![],
    })
}

/// LIMIT and OFFSET applied by the proxy after a grouped merge: a bound
/// parameter must still appear in the shards' statement (the Bind supplies
/// it), so it is kept in an OFFSET that is always 0.
fn unused_params(limit: Count, offset: Count) -> Option<LimitClause> {
    let params: Vec<String> = [limit, offset]
        .iter()
        .filter_map(|c| match c {
            Count::Param(n) => Some(format!("0 * ${n}::int8")),
            _ => None,
        })
        .collect();
    if params.is_empty() {
        return None;
    }
    let expr = Parser::new(&PostgreSqlDialect {})
        .try_with_sql(&params.join(" + "))
        .and_then(|mut p| p.parse_expr())
        .ok()?;
    Some(LimitClause::LimitOffset {
        limit: None,
        offset: Some(sqlparser::ast::Offset {
            value: expr,
            rows: sqlparser::ast::OffsetRows::None,
        }),
        limit_by: vec![],
    })
}

fn item_expr(i: &SelectItem) -> Option<&Expr> {
    match i {
        SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => Some(e),
        _ => None,
    }
}

fn is_wildcard(i: &SelectItem) -> bool {
    matches!(
        i,
        SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)
    )
}

fn function_name(f: &sqlparser::ast::Function) -> String {
    match f.name.0.last() {
        Some(ObjectNamePart::Identifier(i)) if i.quote_style.is_some() => i.value.clone(),
        Some(ObjectNamePart::Identifier(i)) => i.value.to_ascii_lowercase(),
        Some(ObjectNamePart::Function(f)) => f.name.value.to_ascii_lowercase(),
        None => String::new(),
    }
}

/// An aggregate call at the top of `e`, with its name.
fn aggregate_call(e: &Expr) -> Option<(&sqlparser::ast::Function, String)> {
    let Expr::Function(f) = e else { return None };
    let name = function_name(f);
    (f.over.is_none() && AGGREGATES.contains(&name.as_str())).then_some((f, name))
}

struct Finder<F: FnMut(&Expr) -> bool> {
    test: F,
}

impl<F: FnMut(&Expr) -> bool> Visitor for Finder<F> {
    type Break = ();
    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if (self.test)(e) {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }
    fn pre_visit_query(&mut self, _q: &Query) -> ControlFlow<()> {
        // A subquery's aggregates are its own.
        ControlFlow::Continue(())
    }
}

fn contains<V: Visit>(node: &V, test: impl FnMut(&Expr) -> bool) -> bool {
    node.visit(&mut Finder { test }).is_break()
}

fn has_aggregate(e: &Expr) -> bool {
    contains(e, |x| aggregate_call(x).is_some())
}

fn is_c_collation(name: &str) -> bool {
    matches!(
        name.trim_matches('"').to_ascii_lowercase().as_str(),
        "c" | "posix" | "ucs_basic" | "c.utf8" | "c.utf-8" | "pg_catalog.c" | "pg_catalog.posix"
    )
}

struct Planner<'a> {
    sh: &'a Sharding,
    /// Qualifier and key column of each sharded table in FROM.
    keys: Vec<(String, String)>,
    /// FROM holds only plain tables: an unqualified key name is the key.
    plain_from: bool,
    group_exprs: Vec<Expr>,
    items: usize,
    /// Item index of each `*`.
    wildcards: Vec<usize>,
    hidden: Vec<SelectItem>,
    /// Aggregates added while resolving ORDER BY.
    pending_aggs: Vec<(Col, Agg)>,
    /// Arguments of `count(DISTINCT ...)`: the shards group by them too.
    distinct_groups: Vec<Expr>,
    aliases: Vec<Option<String>>,
    item_texts: Vec<Option<String>>,
    /// A `count(DISTINCT x)` off the key makes the shards group by `x` as
    /// well: a `count(DISTINCT key)` beside it is then counted over those
    /// finer groups, no longer summed.
    sub_grouped: bool,
}

impl<'a> Planner<'a> {
    fn new(sel: &Select, sh: &'a Sharding) -> Planner<'a> {
        let mut keys = Vec::new();
        let mut plain_from = true;
        for t in &sel.from {
            for (f, nullable) in crate::shards::from_item(t, sh).0 {
                match f {
                    TableFactor::Table {
                        name,
                        alias,
                        args: None,
                        ..
                    } => {
                        let n = lower_name(name);
                        // A key on the nullable side of an outer join is NULL
                        // in rows without a match, on every shard: grouping
                        // by it does not keep groups on one shard.
                        if let (TableKind::Sharded(rule), false) = (sh.table(&n), nullable) {
                            let q = alias
                                .as_ref()
                                .map(|a| a.name.value.to_ascii_lowercase())
                                .unwrap_or_else(|| n.rsplit('.').next().unwrap_or(&n).into());
                            keys.push((q, rule.column.clone()));
                        }
                    }
                    _ => plain_from = false,
                }
            }
        }
        let group_exprs = match &sel.group_by {
            GroupByExpr::Expressions(e, _) => e.clone(),
            GroupByExpr::All(_) => vec![],
        };
        Planner {
            sh,
            keys,
            plain_from,
            group_exprs,
            items: sel.projection.len(),
            wildcards: (0..sel.projection.len())
                .filter(|&i| is_wildcard(&sel.projection[i]))
                .collect(),
            hidden: Vec::new(),
            pending_aggs: Vec::new(),
            distinct_groups: Vec::new(),
            sub_grouped: false,
            aliases: sel
                .projection
                .iter()
                .map(|i| match i {
                    SelectItem::ExprWithAlias { alias, .. } => Some(ident(alias)),
                    SelectItem::UnnamedExpr(Expr::Identifier(id)) => Some(ident(id)),
                    SelectItem::UnnamedExpr(Expr::CompoundIdentifier(ids)) => ids.last().map(ident),
                    _ => None,
                })
                .collect(),
            item_texts: sel
                .projection
                .iter()
                .map(|i| item_expr(i).map(|e| e.to_string()))
                .collect(),
        }
    }

    /// Window functions are exact on the shards when every one is
    /// partitioned by the sharding key (each partition lives on one shard)
    /// over rows the shards hold whole: not over groups the proxy combines.
    fn check_windows(&self, q: &Query, combined_groups: bool) -> Result<(), Refusal> {
        use sqlparser::ast::WindowType;
        let by_key = |w: &WindowType| match w {
            WindowType::WindowSpec(spec) => spec.partition_by.iter().any(|e| self.is_key(e)),
            WindowType::NamedWindow(_) => false,
        };
        let other = contains(
            q,
            |e| matches!(e, Expr::Function(f) if f.over.as_ref().is_some_and(|w| !by_key(w))),
        );
        if other {
            return Err(refuse(
                "window functions not partitioned by the sharding key",
            ));
        }
        if combined_groups && contains(q, |e| matches!(e, Expr::Function(f) if f.over.is_some())) {
            return Err(refuse(
                "window functions over groups combined across shards",
            ));
        }
        Ok(())
    }

    /// A reference to the sharding key of a table in FROM.
    fn is_key(&self, e: &Expr) -> bool {
        let _ = self.sh;
        match e {
            Expr::Identifier(i) => self.plain_from && self.keys.iter().any(|(_, c)| *c == ident(i)),
            Expr::CompoundIdentifier(ids) if ids.len() >= 2 => {
                let (q, c) = (ident(&ids[ids.len() - 2]), ident(&ids[ids.len() - 1]));
                self.keys.iter().any(|(kq, kc)| *kq == q && *kc == c)
            }
            Expr::Nested(inner) => self.is_key(inner),
            _ => false,
        }
    }

    /// The column of select item `i`, when its field position is known.
    fn item_col(&self, i: usize) -> Option<Col> {
        if !self.wildcards.iter().any(|&w| w < i) {
            Some(Col::Field(i))
        } else if !self.wildcards.iter().any(|&w| w > i) {
            Some(Col::FromEnd(self.items - 1 - i))
        } else {
            None
        }
    }

    fn add_hidden(&mut self, e: Expr) -> Col {
        self.hidden.push(SelectItem::UnnamedExpr(e));
        Col::Hidden(self.hidden.len() - 1)
    }

    /// The output column an ORDER BY (or DISTINCT ON) expression names, as
    /// PostgreSQL resolves it: a position, an output column's name, an
    /// expression equal to a select item; else `None`.
    fn output_ref(&self, e: &Expr) -> Result<Option<Col>, Refusal> {
        if let Expr::Value(v) = e {
            if let Value::Number(n, _) = &v.value {
                let n: usize = n.parse().map_err(|_| refuse(format!("ORDER BY {n}")))?;
                return Ok(n.checked_sub(1).map(Col::Field));
            }
        }
        if let Expr::Identifier(id) = e {
            let name = ident(id);
            if let Some(i) = self
                .aliases
                .iter()
                .position(|a| a.as_deref() == Some(&name))
            {
                if let Some(c) = self.item_col(i) {
                    return Ok(Some(c));
                }
            }
        }
        let text = e.to_string();
        if let Some(i) = self
            .item_texts
            .iter()
            .position(|t| t.as_deref() == Some(&text))
        {
            return Ok(self.item_col(i));
        }
        Ok(None)
    }

    /// Sort keys, adding hidden columns for expressions that are not output
    /// columns (when `hide` allows; DISTINCT does not).
    fn sort_keys(
        &mut self,
        q: &Query,
        hide: bool,
        mut hidden_expr: impl FnMut(&mut Self, Expr) -> Result<Col, Refusal>,
    ) -> Result<Vec<SortKey>, Refusal> {
        let Some(ob) = &q.order_by else {
            return Ok(vec![]);
        };
        let OrderByKind::Expressions(exprs) = &ob.kind else {
            return Err(refuse("ORDER BY ALL"));
        };
        let mut keys = Vec::new();
        for o in exprs {
            let descending = match &o.options.sort {
                Some(sqlparser::ast::OrderBySort::Desc) => true,
                Some(sqlparser::ast::OrderBySort::Asc) | None => false,
                Some(sqlparser::ast::OrderBySort::Using(op)) => {
                    return Err(refuse(format!("ORDER BY ... USING {op}")))
                }
            };
            let mut collate_c = false;
            let mut bad_collation = None;
            let _ = o.expr.visit(&mut Finder {
                test: |x: &Expr| {
                    if let Expr::Collate { collation, .. } = x {
                        if !is_c_collation(&collation.to_string()) {
                            bad_collation = Some(collation.to_string());
                        }
                    }
                    false
                },
            });
            if let Expr::Collate { collation, .. } = &o.expr {
                collate_c = is_c_collation(&collation.to_string());
            }
            if let Some(c) = bad_collation {
                return Err(refuse_because(
                    format!("ORDER BY in collation {c}"),
                    "the proxy compares text as the C collation does",
                ));
            }
            let col = match self.output_ref(&o.expr)? {
                Some(c) => c,
                None if hide => hidden_expr(self, o.expr.clone())?,
                None => {
                    return Err(refuse_because(
                        format!("ORDER BY {} with DISTINCT", o.expr),
                        "order by output columns",
                    ))
                }
            };
            keys.push(SortKey {
                col,
                descending,
                nulls_first: o.options.nulls_first.unwrap_or(descending),
                collate_c,
            });
        }
        Ok(keys)
    }

    /// ORDER BY / LIMIT / DISTINCT ON merged from sorted streams.
    fn sorted(
        &mut self,
        sel: &mut Select,
        q: &Query,
        limit: Count,
        offset: Count,
        hide: bool,
    ) -> Result<Option<MergePlan>, Refusal> {
        let sort = self.sort_keys(q, hide, |p, e| Ok(p.add_hidden(e)))?;
        let mut distinct_on = Vec::new();
        if let Some(sqlparser::ast::Distinct::On(exprs)) = &sel.distinct {
            if sort.is_empty() {
                return Err(refuse("DISTINCT ON without ORDER BY"));
            }
            for e in exprs {
                let col = match self.output_ref(e)? {
                    Some(c) => c,
                    None => self.add_hidden(e.clone()),
                };
                distinct_on.push(col);
            }
        }
        if sort.is_empty() && limit == Count::None && offset == Count::None {
            return Ok(None);
        }
        sel.projection.append(&mut self.hidden.clone());
        Ok(Some(MergePlan {
            sql: String::new(),
            hidden: self.hidden.len(),
            sort,
            limit,
            offset,
            grouping: None,
            distinct_on,
            with_ties: false,
        }))
    }

    /// SELECT DISTINCT without the sharding key: rows deduplicated across
    /// shards. ORDER BY and LIMIT stay on the shards too (each shard's
    /// first n distinct rows hold the global first n).
    fn distinct(&mut self, q: &Query, limit: Count, offset: Count) -> Result<MergePlan, Refusal> {
        let sort = self.sort_keys(q, false, |_, _| unreachable_hidden())?;
        Ok(MergePlan {
            sql: String::new(),
            hidden: 0,
            sort,
            limit,
            offset,
            grouping: Some(Grouping {
                plain: false,
                keys: GroupKeys::AllVisible,
                aggs: vec![],
                having: None,
            }),
            distinct_on: vec![],
            with_ties: false,
        })
    }

    /// An aggregate (or plain expression) the merge needs as a hidden
    /// column; AVG becomes SUM plus a hidden COUNT.
    fn hidden_value(&mut self, e: Expr, aggs: &mut Vec<(Col, Agg)>) -> Result<Col, Refusal> {
        if aggregate_call(&e).is_some() {
            let (partial, extra, agg) = self.partial(&e)?;
            let col = self.add_hidden(partial);
            let agg = self.finish_partial(agg, extra);
            aggs.push((col, agg));
            return Ok(col);
        }
        if has_aggregate(&e) {
            return Err(refuse(format!(
                "an expression over aggregate results ({e})"
            )));
        }
        Ok(self.add_hidden(e))
    }

    /// The hidden columns an AVG or a `count(DISTINCT x)` needs besides its
    /// own, and the shards' extra grouping by `x`.
    fn finish_partial(&mut self, agg: Agg, extra: Option<Expr>) -> Agg {
        match (agg, extra) {
            (Agg::Avg { .. }, Some(count)) => Agg::Avg {
                count: self.add_hidden(count),
            },
            (Agg::CountDistinct { .. }, Some(x)) => {
                self.distinct_groups.push(x.clone());
                Agg::CountDistinct {
                    value: self.add_hidden(x),
                }
            }
            (a, _) => a,
        }
    }

    /// The partial aggregate each shard computes for aggregate call `e`,
    /// the extra partial AVG needs, and how partials combine.
    fn partial(&self, e: &Expr) -> Result<(Expr, Option<Expr>, Agg), Refusal> {
        let Some((f, name)) = aggregate_call(e) else {
            return Err(refuse(format!("{e}")));
        };
        if !f.within_group.is_empty() {
            return Err(refuse(format!("{name}() WITHIN GROUP")));
        }
        let FunctionArguments::List(list) = &f.args else {
            return Err(refuse(format!("{name}()")));
        };
        if !list.clauses.is_empty() {
            return Err(refuse(format!("{name}() with ORDER BY or other clauses")));
        }
        let distinct = matches!(list.duplicate_treatment, Some(DuplicateTreatment::Distinct));
        let arg_is_key = match list.args.as_slice() {
            [FunctionArg::Unnamed(FunctionArgExpr::Expr(a))] => self.is_key(a),
            _ => false,
        };
        let agg = match name.as_str() {
            "count" if distinct && (!arg_is_key || self.sub_grouped) => {
                let [FunctionArg::Unnamed(FunctionArgExpr::Expr(x))] = list.args.as_slice() else {
                    return Err(refuse(e.to_string()));
                };
                return Ok((
                    e.clone(),
                    Some(x.clone()),
                    Agg::CountDistinct {
                        value: Col::Hidden(0),
                    },
                ));
            }
            "count" => Agg::Count,
            "sum" | "avg" if distinct => return Err(refuse(format!("{name}(DISTINCT ...)"))),
            "sum" => Agg::Sum,
            "min" => Agg::Min,
            "max" => Agg::Max,
            "bool_and" | "every" => Agg::BoolAnd,
            "bool_or" => Agg::BoolOr,
            "avg" => {
                let mut sum = f.clone();
                sum.name = sqlparser::ast::ObjectName::from(vec![Ident::new("sum")]);
                let mut count = f.clone();
                count.name = sqlparser::ast::ObjectName::from(vec![Ident::new("count")]);
                return Ok((
                    Expr::Function(sum),
                    Some(Expr::Function(count)),
                    Agg::Avg {
                        count: Col::Hidden(0),
                    },
                ));
            }
            other => return Err(refuse(format!("the aggregate {other}()"))),
        };
        Ok((e.clone(), None, agg))
    }

    /// Aggregates and GROUP BY combined from partial rows.
    fn grouped(
        &mut self,
        sel: &mut Select,
        q: &Query,
        limit: Count,
        offset: Count,
    ) -> Result<MergePlan, Refusal> {
        let mut aggs = Vec::new();
        let off_key_distinct = |e: &Expr| {
            aggregate_call(e).is_some_and(|(f, name)| {
                let FunctionArguments::List(list) = &f.args else {
                    return false;
                };
                name == "count"
                    && matches!(list.duplicate_treatment, Some(DuplicateTreatment::Distinct))
                    && !matches!(list.args.as_slice(),
                        [FunctionArg::Unnamed(FunctionArgExpr::Expr(a))] if self.is_key(a))
            })
        };
        self.sub_grouped = sel.projection.iter().any(|i| contains(i, off_key_distinct))
            || sel
                .having
                .as_ref()
                .is_some_and(|h| contains(h, off_key_distinct));
        // Items: aggregates stay (AVG becomes SUM), others are group values.
        for i in 0..sel.projection.len() {
            let (expr, alias) = match &sel.projection[i] {
                SelectItem::UnnamedExpr(e) => (e.clone(), None),
                SelectItem::ExprWithAlias { expr, alias } => (expr.clone(), Some(alias.clone())),
                _ => continue,
            };
            if aggregate_call(&expr).is_some() {
                let Some(col) = self.item_col(i) else {
                    return Err(refuse("aggregates after several * in the select list"));
                };
                let (partial, extra, agg) = self.partial(&expr)?;
                if matches!(agg, Agg::Avg { .. }) {
                    // Named as PostgreSQL names it: the alias, or "avg".
                    sel.projection[i] = SelectItem::ExprWithAlias {
                        expr: partial,
                        alias: alias.unwrap_or_else(|| Ident::new("avg")),
                    };
                }
                let agg = self.finish_partial(agg, extra);
                aggs.push((col, agg));
            } else if has_aggregate(&expr) {
                return Err(refuse(format!(
                    "an expression over aggregate results ({expr})"
                )));
            }
        }
        // Group keys: positions name output fields; other expressions are
        // computed again as hidden columns.
        let mut keys = Vec::new();
        for e in self.group_exprs.clone() {
            if let Expr::Value(v) = &e {
                if let Value::Number(n, _) = &v.value {
                    let n: usize = n.parse().map_err(|_| refuse(format!("GROUP BY {n}")))?;
                    keys.push(Col::Field(n.saturating_sub(1)));
                    continue;
                }
            }
            if let Expr::Identifier(id) = &e {
                let name = ident(id);
                let shadowed = sel.projection.iter().any(|i| {
                    matches!(i, SelectItem::ExprWithAlias { alias, expr }
                        if ident(alias) == name
                            && !matches!(expr, Expr::Identifier(x) if ident(x) == name))
                });
                if shadowed {
                    return Err(refuse_because(
                        format!("GROUP BY {name}"),
                        "it names an output column; write its position or the expression",
                    ));
                }
            }
            keys.push(self.add_hidden(e));
        }
        let having = match sel.having.take() {
            Some(h) => Some(self.condition(&h, &mut aggs)?),
            None => None,
        };
        let sort = self.sort_keys(q, true, |p, e| {
            let mut a = Vec::new();
            let c = p.hidden_value(e, &mut a)?;
            p.pending_aggs.append(&mut a);
            Ok(c)
        })?;
        aggs.append(&mut self.pending_aggs);
        let plain = self.group_exprs.is_empty();
        if !self.distinct_groups.is_empty() {
            let constant = sel
                .projection
                .iter()
                .any(|i| !item_expr(i).is_some_and(has_aggregate));
            if plain && constant {
                return Err(refuse(
                    "count(DISTINCT ...) beside a column that is not an aggregate",
                ));
            }
            let mut by = self.group_exprs.clone();
            by.append(&mut self.distinct_groups);
            sel.group_by = GroupByExpr::Expressions(by, vec![]);
        }
        sel.projection.append(&mut self.hidden.clone());
        Ok(MergePlan {
            sql: String::new(),
            hidden: self.hidden.len(),
            sort,
            limit,
            offset,
            grouping: Some(Grouping {
                plain,
                keys: GroupKeys::Cols(keys),
                aggs,
                having,
            }),
            distinct_on: vec![],
            with_ties: false,
        })
    }

    fn condition(&mut self, e: &Expr, aggs: &mut Vec<(Col, Agg)>) -> Result<Cond, Refusal> {
        Ok(match e {
            Expr::Nested(inner) => self.condition(inner, aggs)?,
            Expr::BinaryOp { left, op, right } => {
                let cmp = match op {
                    BinaryOperator::And => {
                        return Ok(Cond::And(
                            Box::new(self.condition(left, aggs)?),
                            Box::new(self.condition(right, aggs)?),
                        ))
                    }
                    BinaryOperator::Or => {
                        return Ok(Cond::Or(
                            Box::new(self.condition(left, aggs)?),
                            Box::new(self.condition(right, aggs)?),
                        ))
                    }
                    BinaryOperator::Eq => CmpOp::Eq,
                    BinaryOperator::NotEq => CmpOp::NotEq,
                    BinaryOperator::Lt => CmpOp::Lt,
                    BinaryOperator::LtEq => CmpOp::LtEq,
                    BinaryOperator::Gt => CmpOp::Gt,
                    BinaryOperator::GtEq => CmpOp::GtEq,
                    _ => return Err(refuse(format!("HAVING {e}"))),
                };
                Cond::Cmp(self.operand(left, aggs)?, cmp, self.operand(right, aggs)?)
            }
            Expr::UnaryOp {
                op: UnaryOperator::Not,
                expr,
            } => Cond::Not(Box::new(self.condition(expr, aggs)?)),
            Expr::IsNull(x) => Cond::IsNull(self.operand(x, aggs)?, false),
            Expr::IsNotNull(x) => Cond::IsNull(self.operand(x, aggs)?, true),
            // x BETWEEN a AND b is x >= a AND x <= b (NULLs alike); NOT
            // BETWEEN its negation.
            Expr::Between {
                expr,
                negated,
                low,
                high,
            } => {
                let x = self.operand(expr, aggs)?;
                let both = Cond::And(
                    Box::new(Cond::Cmp(x.clone(), CmpOp::GtEq, self.operand(low, aggs)?)),
                    Box::new(Cond::Cmp(x, CmpOp::LtEq, self.operand(high, aggs)?)),
                );
                if *negated {
                    Cond::Not(Box::new(both))
                } else {
                    both
                }
            }
            // x IN (a, b) is x = a OR x = b; NOT IN its negation.
            Expr::InList {
                expr,
                list,
                negated,
            } if !list.is_empty() => {
                let x = self.operand(expr, aggs)?;
                let mut any: Option<Cond> = None;
                for v in list {
                    let eq = Cond::Cmp(x.clone(), CmpOp::Eq, self.operand(v, aggs)?);
                    any = Some(match any {
                        Some(prev) => Cond::Or(Box::new(prev), Box::new(eq)),
                        None => eq,
                    });
                }
                let any = any.unwrap_or(Cond::Operand(Operand::Null));
                if *negated {
                    Cond::Not(Box::new(any))
                } else {
                    any
                }
            }
            other => Cond::Operand(self.operand(other, aggs)?),
        })
    }

    fn operand(&mut self, e: &Expr, aggs: &mut Vec<(Col, Agg)>) -> Result<Operand, Refusal> {
        Ok(match e {
            Expr::Nested(inner) => self.operand(inner, aggs)?,
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => Operand::Number(n.clone()),
                Value::SingleQuotedString(s) => Operand::Str(s.clone()),
                Value::Boolean(b) => Operand::Bool(*b),
                Value::Null => Operand::Null,
                _ => Operand::Col(self.hidden_value(e.clone(), aggs)?),
            },
            Expr::UnaryOp {
                op: UnaryOperator::Minus,
                expr,
            } if matches!(&**expr, Expr::Value(v) if matches!(v.value, Value::Number(..))) => {
                Operand::Number(format!("-{expr}"))
            }
            other => Operand::Col(self.hidden_value(other.clone(), aggs)?),
        })
    }
}

fn unreachable_hidden() -> Result<Col, Refusal> {
    Err(refuse("ORDER BY an expression with DISTINCT"))
}

/// An identifier as PostgreSQL folds it.
fn ident(i: &Ident) -> String {
    if i.quote_style.is_some() {
        i.value.clone()
    } else {
        i.value.to_ascii_lowercase()
    }
}
