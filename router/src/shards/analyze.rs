//! From a parsed statement to its [`Template`]: tables, joins, where the
//! sharding key comes from, what is refused.

use super::*;

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
    if matches!(first.as_str(), "fetch" | "move" | "close") {
        // The cursor is the statement's last word (`MOVE FORWARD 5 IN c`).
        let last = crate::lexer::Lexer::new(sql)
            .filter(|t| t.text != ";")
            .last()
            .map(|t| t.ident())
            .filter(|n| n != "all" || first != "close");
        return Template {
            cursor_name: last.map(CursorName::Reads),
            ..Template::new(Scope::Anywhere, true)
        };
    }
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
    if first == "do" {
        // Run as it is on every shard: one naming a sharded table would
        // write (or read) that table on each, whatever its rows' keys
        // (`resolve` reads the text: `do_block_refusal`).
        return Template {
            do_block: true,
            ..Template::new(Scope::AllShards, true)
        };
    }
    match first.as_str() {
        "vacuum" | "analyze" | "analyse" | "reindex" | "cluster" | "refresh" | "checkpoint"
        | "create" | "alter" | "drop" | "comment" | "grant" | "revoke" | "import" | "security" => {
            Template::new(Scope::AllShards, true)
        }
        "begin" | "start" | "commit" | "end" | "rollback" | "abort" | "savepoint" | "release"
        | "set" | "reset" | "discard" | "deallocate" | "show" | "listen" | "unlisten"
        | "notify" | "execute" => Template::new(Scope::Anywhere, true),
        "prepare"
            if crate::lexer::leading_words(sql, 2)
                .get(1)
                .is_some_and(|w| w.eq_ignore_ascii_case("transaction")) =>
        {
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
                Some(table) => Template::refused(Refusal::unsupported(Construct::Unparsed, format!(
                    "the proxy could not read this statement to find its shard ({error}), and it names table \"{table}\", which is not on one shard; add a /* shardline: shard=NAME */ or /* shardline: key=VALUE */ comment"
                ))),
                None => Template::new(Scope::Default, true),
            }
        }
    }
}

/// A DO block (`sql`) on several shards: refused when it names a sharded
/// table.
pub(super) fn do_block_refusal(sql: &str, sh: &Sharding) -> Option<Refusal> {
    names_sharded_table(sql, sh, 2).map(|table| {
        Refusal::unsupported(Construct::DoBlock, format!(
            "a DO block runs as it is on every shard, and this one names sharded table \"{table}\": the rows it writes would be written on each shard, whatever their keys; send its statements themselves (placed by their keys), or name the shard (a /* shardline: shard=NAME */ comment)"
        ))
    })
}

/// The first sharded table `sql` names, looking inside its string
/// constants too (a DO block's body, the text its EXECUTE runs) down to
/// `depth` levels of quoting. Words are also cut at `$` (a dollar-quoted
/// body's delimiters stick to the words beside them).
fn names_sharded_table(sql: &str, sh: &Sharding, depth: usize) -> Option<String> {
    crate::lexer::Lexer::new(sql).find_map(|t| {
        if let Some(inner) = t.text.strip_prefix('\'') {
            let inner = inner.strip_suffix('\'').unwrap_or(inner).replace("''", "'");
            return (depth > 0)
                .then(|| names_sharded_table(&inner, sh, depth - 1))
                .flatten();
        }
        let name = t.ident();
        let parts = if t.quoted {
            vec![name.as_str()]
        } else {
            name.split('$').collect()
        };
        parts
            .into_iter()
            .find(|n| !n.is_empty() && matches!(sh.table(n), TableKind::Sharded(_)))
            .map(str::to_string)
    })
}

pub(super) struct Analyzer<'a> {
    pub(super) consts: &'a Constants,
    pub(super) sh: &'a Sharding,
}

/// A table of the statement's top-level FROM (or the target of DML).
pub(super) struct Rel {
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
pub(super) enum Outer {
    No,
    /// The left side's rows are kept; the right side may be NULL.
    Left,
    Right,
    Full,
}

pub(super) fn outer(op: &sqlparser::ast::JoinOperator) -> Outer {
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

pub(super) fn is_catalog(name: &str) -> bool {
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
pub(super) struct MergeFinder {
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
pub(super) struct Relations {
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

/// `FROM ONLY t` (and `JOIN ONLY t`, `UPDATE ONLY t`, `DELETE FROM ONLY
/// t`): the parser reads `ONLY` as a table of that name aliased `t`, so
/// `t` went unseen and the statement to the default shard. Made table `t`
/// again before the statements are analysed; ONLY leaves out inheritance
/// children, which no placement depends on, and the servers get the text
/// as it was written.
pub(crate) fn unwrap_only(statements: &mut [Statement]) {
    struct OnlyTables;
    impl sqlparser::ast::VisitorMut for OnlyTables {
        type Break = ();
        fn pre_visit_table_factor(&mut self, f: &mut TableFactor) -> ControlFlow<()> {
            if let TableFactor::Table {
                name,
                alias,
                args: None,
                ..
            } = f
            {
                let only = matches!(name.0.as_slice(), [part] if part
                    .as_ident()
                    .is_some_and(|i| i.quote_style.is_none() && i.value.eq_ignore_ascii_case("only")));
                if only && alias.as_ref().is_some_and(|a| a.columns.is_empty()) {
                    if let Some(a) = alias.take() {
                        *name = sqlparser::ast::ObjectName::from(vec![a.name]);
                    }
                }
            }
            ControlFlow::Continue(())
        }
    }
    for s in statements {
        let _ = sqlparser::ast::VisitMut::visit(s, &mut OnlyTables);
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

/// Whether a query creates a table (`SELECT ... INTO t`), in any branch.
fn selects_into(body: &SetExpr) -> bool {
    match body {
        SetExpr::Select(s) => s.into.is_some(),
        SetExpr::SetOperation { left, right, .. } => selects_into(left) || selects_into(right),
        SetExpr::Query(q) => selects_into(&q.body),
        _ => false,
    }
}

impl Analyzer<'_> {
    fn statement(&self, stmt: &Statement) -> Template {
        match stmt {
            Statement::Query(q) if selects_into(&q.body) => {
                Template::refused(Refusal::unsupported(
                    Construct::CreateTableAs,
                    "SELECT ... INTO (CREATE TABLE ... AS) across shards: create the table, then fill it with INSERT",
                ))
            }
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
            Statement::Merge(m) => self.merge(stmt, &m.table),
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
            Statement::Explain {
                statement,
                analyze,
                options,
                ..
            } => {
                let mut t = self.statement(statement);
                t.explain = if crate::classify::explain_analyzes(*analyze, options) {
                    Explain::Analyze
                } else {
                    Explain::Plan
                };
                t.needs_merge = None;
                t
            }
            Statement::Declare { stmts } => match stmts.as_slice() {
                [sqlparser::ast::Declare {
                    for_query: Some(q),
                    names,
                    ..
                }] => {
                    // Placed as its query, read where its rows are.
                    let mut t = self.query(q, &Statement::Query(q.clone()));
                    t.cursor = true;
                    t.cursor_name = names.first().map(|n| CursorName::Declares(folded(n)));
                    t.needs_merge = None;
                    t
                }
                _ => Template::new(Scope::Anywhere, true),
            },
            // On the connection that holds the cursor (its transaction's,
            // or in a transaction on several shards the one it was
            // declared on).
            Statement::Fetch { name, .. } => Template {
                cursor_name: Some(CursorName::Reads(folded(name))),
                ..Template::new(Scope::Anywhere, true)
            },
            Statement::Close { cursor } => Template {
                cursor_name: match cursor {
                    sqlparser::ast::CloseCursor::Specific { name } => {
                        Some(CursorName::Reads(folded(name)))
                    }
                    sqlparser::ast::CloseCursor::All => None,
                },
                ..Template::new(Scope::Anywhere, true)
            },
            Statement::CreateTable(c) if c.query.is_some() => {
                Template::refused(Refusal::unsupported(
                    Construct::CreateTableAs,
                    "CREATE TABLE ... AS across shards: create the table, then fill it with INSERT",
                ))
            }
            Statement::CreateView(v) => self.create_view(&v.query),
            Statement::Prepare { statement, .. } => self.sql_prepare(statement),
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
            | Statement::Execute { .. }
            | Statement::Call(_)
            | Statement::LISTEN { .. }
            | Statement::UNLISTEN { .. }
            | Statement::NOTIFY { .. } => Template::new(Scope::Anywhere, true),
            // Schema changes, utility statements: every shard's primary.
            _ => Template::new(Scope::AllShards, true),
        }
    }

    /// MERGE: where its tables are. Into (or from) a sharded table it
    /// runs only on one shard a hint names: the statement does not say
    /// which shard each of its rows belongs to, and run on every shard a
    /// WHEN NOT MATCHED ... INSERT would insert a row on each. Into a
    /// reference table, on every shard (as its other writes), refused when
    /// it reads a table only the default shard holds (the other shards'
    /// copies would not get its rows); else on the default shard.
    fn merge(&self, whole: &Statement, target: &TableFactor) -> Template {
        let kinds: Vec<TableKind> = relations(whole)
            .iter()
            .filter(|n| !is_catalog(n))
            .map(|n| self.sh.table(n))
            .collect();
        let into_reference = matches!(target, TableFactor::Table { name, .. }
            if self.sh.table(&lower_name(name)) == TableKind::Reference);
        if into_reference && kinds.contains(&TableKind::Unsharded) {
            return Template::refused(Refusal::unsupported(
                Construct::MergeInto,
                "MERGE into a reference table reads a table that is only on the default shard: the other shards' copies would not get its rows",
            ));
        }
        if kinds.iter().any(|k| matches!(k, TableKind::Sharded(_))) {
            return Template {
                spread_refusal: Some(Refusal::unsupported(
                    Construct::MergeInto,
                    "MERGE with a sharded table: the statement does not say which shard each row belongs to, and run on every shard it would insert a row on each; use INSERT ... ON CONFLICT, UPDATE or DELETE (placed by their keys), or name the shard (a /* shardline: shard=NAME */ comment)",
                )),
                ..Template::new(Scope::AllShards, true)
            };
        }
        let scope = if kinds.contains(&TableKind::Unsharded) {
            Scope::Default
        } else if kinds.is_empty() {
            Scope::Anywhere
        } else {
            Scope::Reference
        };
        Template::new(scope, true)
    }

    /// CREATE [MATERIALIZED] VIEW: on every shard, as other schema
    /// changes. The proxy reads a view as an unsharded table, on the
    /// default shard alone: one over a sharded table would answer that
    /// shard's rows only, so it is refused unless a hint names the shard.
    fn create_view(&self, query: &Query) -> Template {
        let over_sharded = relations(query)
            .iter()
            .filter(|n| !is_catalog(n))
            .find(|n| matches!(self.sh.table(n), TableKind::Sharded(_)))
            .cloned();
        Template {
            spread_refusal: over_sharded.map(|table| {
                Refusal::unsupported(Construct::View, format!(
                    "a view over sharded table \"{table}\" would be read on the default shard alone (the proxy places a view as an unsharded table), answering that shard's rows only; query the table itself (reads are merged across shards), or name the shard (a /* shardline: shard=NAME */ comment) to create the view there"
                ))
            }),
            ..Template::new(Scope::AllShards, true)
        }
    }

    /// SQL `PREPARE`: the statement stays on the server connection that
    /// prepared it, and every `EXECUTE` runs there whatever its
    /// parameters. It runs anywhere when its answer is the same on every
    /// shard (no table, or a read of reference tables); one that needs a
    /// key, the default shard or every shard is refused (its refusal
    /// first, when the statement itself is refused).
    fn sql_prepare(&self, statement: &Statement) -> Template {
        let inner = self.statement(statement);
        if inner.refusal.is_some() {
            return inner;
        }
        let same_everywhere = match inner.scope {
            Scope::Anywhere => true,
            Scope::Reference => !inner.write,
            _ => false,
        };
        if same_everywhere && inner.pinned.is_empty() {
            return Template::new(Scope::Anywhere, true);
        }
        Template::refused(Refusal::unsupported(
            Construct::SqlPrepare,
            "SQL PREPARE of a statement on sharded, unsharded or written reference tables: its EXECUTE would run on the one shard that prepared it, whatever its parameters; use protocol-level prepared statements (a driver's prepare), which are placed by their parameters at each execution",
        ))
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

    pub(super) fn value_src(&self, e: &Expr) -> KeySrc {
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
            return Err(Refusal::unsupported(Construct::MixedTables, format!(
                "the statement mixes table \"{u}\", which is not sharded (it lives on the default shard), with sharded table \"{s}\""
            )));
        }
        let below = || {
            let refusal = Refusal::unsupported(Construct::Subquery, format!(
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
            return Err(Refusal::unsupported(Construct::CrossGroupJoin, format!(
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
            return Err(Refusal::unsupported(Construct::JoinOffKey, format!(
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
            _ => Err(Refusal::unsupported(Construct::Subquery, format!(
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
                let refusal = Refusal::unsupported(Construct::SetOperation, format!(
                    "{op} over sharded table \"{table}\" is not supported: each branch would see one shard's rows; pin every branch to keys of one shard, run the branches separately, or add a /* shardline: shard=NAME */ comment"
                ));
                if let Some(u) = all
                    .iter()
                    .find(|n| !is_catalog(n) && self.sh.table(n) == TableKind::Unsharded)
                {
                    return Template::refused(Refusal::unsupported(Construct::MixedTables, format!(
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
            Refusal::unsupported(Construct::OuterJoin, format!(
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
                    return Template::refused(Refusal::unsupported(Construct::Insert, format!(
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
                    return Template::refused(Refusal::unsupported(Construct::Insert, format!(
                        "INSERT into sharded table \"{table}\" must {why}: the proxy places each row by its \"{}\"",
                        rule.column
                    )));
                };
                let rows = match ins.source.as_deref().map(|q| &*q.body) {
                    Some(SetExpr::Values(v)) => &v.rows,
                    _ => {
                        return Template::refused(Refusal::unsupported(Construct::Insert, format!(
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
                    return Template::refused(Refusal::unsupported(Construct::Insert, format!(
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
                    return Template::refused(Refusal::unsupported(Construct::Insert, format!(
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
            return Template::refused(Refusal::unsupported(
                Construct::Copy,
                format!(
                    "COPY into sharded table \"{}\" must include the key column \"{}\"",
                    c.table, c.column
                ),
            ));
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

/// An identifier as Postgres names it: unquoted ones are folded to lower case.
fn folded(name: &sqlparser::ast::Ident) -> String {
    match name.quote_style {
        Some(_) => name.value.clone(),
        None => name.value.to_lowercase(),
    }
}
