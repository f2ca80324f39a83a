//! A multi-row INSERT split into one INSERT per shard.

use super::*;

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
        sql: sql.into(),
        params,
        param_types,
        session_shard: None,
        session_key: None,
        constants: None,
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
pub(super) type SplitPart = (usize, String, Vec<usize>);

/// The parse-and-print split.
pub(super) fn split_by_parse(sh: &Sharding, input: &KeyInput) -> Result<Vec<SplitPart>, Refusal> {
    let sql = input.sql.text();
    let cannot = || Refusal::unsupported(Construct::Insert, "this INSERT cannot be split by shard");
    let statements =
        sqlparser::parser::Parser::parse_sql(&sqlparser::dialect::PostgreSqlDialect {}, sql)
            .map_err(|_| cannot())?;
    let [Statement::Insert(ins)] = statements.as_slice() else {
        return Err(Refusal::unsupported(
            Construct::Batch,
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
pub(super) fn rows_by_shard(
    g: &crate::sharding::Group,
    srcs: &[KeySrc],
    input: &KeyInput,
) -> Result<Vec<(usize, Vec<usize>)>, Option<Refusal>> {
    let values = Values::new(input);
    let mut by_shard: Vec<(usize, Vec<usize>)> = Vec::new();
    for (i, src) in srcs.iter().enumerate() {
        let key = key_value(src, g, &values).map_err(|_| None)?;
        let shard = g
            .shard_of(key.as_ref())
            .map_err(|e| Some(Refusal::invalid("22023", e)))?;
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
pub(super) fn split_by_text(
    sh: &Sharding,
    t: &Template,
    input: &KeyInput,
) -> Option<Result<Vec<SplitPart>, Refusal>> {
    let sql = input.sql.text();
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
pub(super) type ValuesRows = (usize, Vec<(usize, usize)>, usize);

/// Finds the row list of `... VALUES (...), (...) ...` at the top level:
/// where the rows start, each row's span (parentheses included), and where
/// the text after the last row starts.
pub(super) fn values_rows(sql: &str) -> Option<ValuesRows> {
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

pub(super) fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}
