//! Executing a [`MergePlan`] on the shards' rows: pure, values in and out.
//!
//! [`Compiled::new`] checks the plan against the shards' RowDescription
//! (every sort key, group key and aggregate must have a type the proxy
//! compares or adds exactly, and text order must be the C collation's) and
//! resolves columns to field positions. The proxy then feeds it each
//! row's values, decoded from the wire once (`proxy/src/protocol/rows.rs`):
//! [`Compiled::sort_key`] for the k-way merge, [`Grouper`] for combining
//! partial aggregates; the client sees the first [`Compiled::visible`]
//! values of a row. The router reads no protocol message.

use crate::merge::{compare, decode, FloatKey, Format, Kind, NumKey, Value};
use crate::numeric::Num;
use crate::scatter::{Agg, CmpOp, Col, Cond, Count, GroupKeys, MergePlan, Operand, SortKey};
use crate::shards::{Construct, Refusal};
use std::cmp::Ordering;
use std::collections::BTreeMap;

const INT8: u32 = crate::merge::oid::INT8;
const NUMERIC: u32 = crate::merge::oid::NUMERIC;
const BOOL: u32 = crate::merge::oid::BOOL;
const NAME: u32 = crate::merge::oid::NAME;

/// What the database's collations allow the proxy to do with text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Collation {
    /// Text orders bytewise (C, POSIX, C.UTF-8 everywhere).
    pub c_order: bool,
    /// Equal text is equal bytes (no nondeterministic collation).
    pub deterministic: bool,
}

fn unsupported(message: impl Into<String>) -> Refusal {
    Refusal::unsupported(Construct::Merge, message)
}

fn bad_row() -> Refusal {
    Refusal::invalid("08P01", "a shard sent a malformed DataRow")
}

/// One field of a RowDescription: type and format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldType {
    pub oid: u32,
    pub format: Format,
}

/// What the client's RowDescription keeps of the shards': the first
/// `visible` fields (the rest are the plan's hidden columns), with the AVG
/// columns among them typed `numeric`, as PostgreSQL types them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientColumns {
    pub visible: usize,
    /// Positions of the AVG columns.
    pub numeric: Vec<usize>,
}

/// The client's columns of a merge whose shards answer `fields` columns.
pub fn client_columns(plan: &MergePlan, fields: usize) -> Result<ClientColumns, Refusal> {
    let visible = fields
        .checked_sub(plan.hidden)
        .ok_or_else(|| Refusal::invalid("XX000", "the shards' rows lack the merge's columns"))?;
    Ok(ClientColumns {
        visible,
        numeric: avg_fields(plan, visible),
    })
}

fn avg_fields(plan: &MergePlan, visible: usize) -> Vec<usize> {
    plan.grouping
        .iter()
        .flat_map(|g| &g.aggs)
        .filter(|(_, a)| matches!(a, Agg::Avg { .. }))
        .filter_map(|(c, _)| c.index(visible))
        .collect()
}

/// The shards' columns as a merge plan reads them: where each plan column
/// is, and what the proxy can do with its type under the database's
/// collations (`Compiled::new`).
struct Columns<'a> {
    fields: &'a [FieldType],
    /// Each field's kind of value (AVG's sum read as numeric), if the
    /// proxy can compare it.
    kinds: Vec<Option<Kind>>,
    /// Fields the client sees (the rest are the plan's hidden columns).
    visible: usize,
    coll: Collation,
}

fn is_text(k: Kind) -> bool {
    matches!(k, Kind::Text | Kind::Bpchar)
}

impl<'a> Columns<'a> {
    fn new(plan: &MergePlan, fields: &'a [FieldType], coll: Collation) -> Result<Self, Refusal> {
        let visible = fields.len().checked_sub(plan.hidden).ok_or_else(|| {
            Refusal::invalid("XX000", "the shards' rows lack the merge's columns")
        })?;
        let mut kinds: Vec<Option<Kind>> = fields.iter().map(|f| Kind::of_type(f.oid)).collect();
        for i in avg_fields(plan, visible) {
            if let Some(k) = kinds.get_mut(i) {
                *k = Some(Kind::Numeric);
            }
        }
        Ok(Columns {
            fields,
            kinds,
            visible,
            coll,
        })
    }

    /// The field a plan column names.
    fn field(&self, c: Col) -> Result<usize, Refusal> {
        c.index(self.visible)
            .filter(|&i| i < self.fields.len())
            .ok_or_else(|| {
                unsupported("ORDER BY or GROUP BY names a column the query does not return")
            })
    }

    /// The kind of field `i`, or why `what` cannot be merged on it.
    fn kind_of(&self, i: usize, what: &str) -> Result<Kind, Refusal> {
        self.kinds[i].ok_or_else(|| {
            unsupported(format!(
                "cannot merge {what} on a {} column across shards",
                type_name(self.fields[i].oid)
            ))
        })
    }

    /// Field `i` compared for equality (grouping, DISTINCT).
    fn equality(&self, i: usize, what: &str) -> Result<(usize, Kind, Format), Refusal> {
        let kind = self.kind_of(i, what)?;
        if is_text(kind) && !self.coll.deterministic {
            return Err(unsupported(format!(
                "cannot merge {what} on text across shards under a nondeterministic collation"
            )));
        }
        Ok((i, kind, self.fields[i].format))
    }

    /// An ORDER BY key: text only in C order.
    fn sort_col(&self, k: &SortKey) -> Result<SortCol, Refusal> {
        let i = self.field(k.col)?;
        let kind = self.kind_of(i, "ORDER BY")?;
        if is_text(kind) && self.fields[i].oid != NAME && !k.collate_c && !self.coll.c_order {
            return Err(unsupported(
                "cannot merge ORDER BY on text across shards: the database's collation is not C, and the proxy compares text only as C does; add COLLATE \"C\" or the sharding key",
            ));
        }
        Ok(SortCol {
            field: i,
            kind,
            format: self.fields[i].format,
            descending: k.descending,
            nulls_first: k.nulls_first,
        })
    }

    /// How the partial values of aggregate `agg` in field `i` combine.
    fn combine(&self, agg: &Agg, i: usize) -> Result<Combine, Refusal> {
        let oid = self.fields[i].oid;
        let want = |ok: bool, what: &str| {
            if ok {
                return Ok(());
            }
            Err(unsupported(format!(
                "cannot merge {what} of {} values across shards{}",
                type_name(oid),
                if matches!(oid, 700 | 701) {
                    ": floating-point sums depend on the order of additions; cast to numeric"
                } else {
                    ""
                }
            )))
        };
        Ok(match agg {
            Agg::Count => {
                want(oid == INT8, "count")?;
                Combine::Count
            }
            Agg::Sum => {
                want(oid == INT8 || oid == NUMERIC, "sum")?;
                if oid == INT8 {
                    Combine::SumInt
                } else {
                    Combine::SumNum
                }
            }
            Agg::Min | Agg::Max => {
                let kind = self.kind_of(i, "min/max")?;
                if is_text(kind) && oid != NAME && !self.coll.c_order {
                    return Err(unsupported(
                        "cannot merge min/max of text across shards: the database's collation is not C",
                    ));
                }
                if matches!(agg, Agg::Min) {
                    Combine::Min(kind)
                } else {
                    Combine::Max(kind)
                }
            }
            Agg::BoolAnd | Agg::BoolOr => {
                want(oid == BOOL, "bool_and/bool_or")?;
                if matches!(agg, Agg::BoolAnd) {
                    Combine::BoolAnd
                } else {
                    Combine::BoolOr
                }
            }
            Agg::CountDistinct { value } => {
                want(oid == INT8, "count(DISTINCT)")?;
                let (value, kind, format) =
                    self.equality(self.field(*value)?, "count(DISTINCT)")?;
                Combine::CountDistinct {
                    value,
                    kind,
                    format,
                }
            }
            Agg::Avg { count } => {
                want(oid == INT8 || oid == NUMERIC, "avg")?;
                Combine::Avg {
                    int: oid == INT8,
                    count: self.field(*count)?,
                }
            }
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct SortCol {
    field: usize,
    kind: Kind,
    format: Format,
    descending: bool,
    nulls_first: bool,
}

#[derive(Debug, Clone, Copy)]
enum Combine {
    Count,
    SumInt,
    SumNum,
    Min(Kind),
    Max(Kind),
    BoolAnd,
    BoolOr,
    /// The partial sum (int8 or numeric) and the field of its count.
    Avg {
        int: bool,
        count: usize,
    },
    /// Distinct values of field `value` among rows with a partial count.
    CountDistinct {
        value: usize,
        kind: Kind,
        format: Format,
    },
}

#[derive(Debug, Clone)]
enum COperand {
    Field(usize, Kind),
    Lit(Operand),
}

#[derive(Debug, Clone)]
enum CCond {
    And(Box<CCond>, Box<CCond>),
    Or(Box<CCond>, Box<CCond>),
    Not(Box<CCond>),
    Cmp(COperand, CmpOp, COperand),
    IsNull(COperand, bool),
    Operand(COperand),
}

/// A plan checked against the shards' fields.
#[derive(Debug, Clone)]
pub struct Compiled {
    visible: usize,
    formats: Vec<Format>,
    sort: Vec<SortCol>,
    distinct_on: Vec<(usize, Kind, Format)>,
    grouped: bool,
    plain: bool,
    keys: Vec<(usize, Kind, Format)>,
    aggs: Vec<(usize, Combine)>,
    having: Option<CCond>,
}

fn type_name(oid: u32) -> String {
    match oid {
        crate::merge::oid::FLOAT4 => "real".into(),
        crate::merge::oid::FLOAT8 => "double precision".into(),
        1186 => "interval".into(),
        790 => "money".into(),
        114 | 3802 => "json".into(),
        _ => format!("type oid {oid}"),
    }
}

impl Compiled {
    pub fn new(
        plan: &MergePlan,
        fields: &[FieldType],
        coll: Collation,
    ) -> Result<Compiled, Refusal> {
        let cols = Columns::new(plan, fields, coll)?;
        let sort = plan
            .sort
            .iter()
            .map(|k| cols.sort_col(k))
            .collect::<Result<_, _>>()?;
        let distinct_on = plan
            .distinct_on
            .iter()
            .map(|c| cols.equality(cols.field(*c)?, "DISTINCT ON"))
            .collect::<Result<_, _>>()?;
        let (mut keys, mut aggs, mut having) = (Vec::new(), Vec::new(), None);
        if let Some(g) = &plan.grouping {
            keys = match &g.keys {
                GroupKeys::AllVisible => (0..cols.visible)
                    .map(|i| cols.equality(i, "DISTINCT"))
                    .collect::<Result<_, _>>()?,
                GroupKeys::Cols(c) => c
                    .iter()
                    .map(|c| cols.equality(cols.field(*c)?, "GROUP BY"))
                    .collect::<Result<_, _>>()?,
            };
            aggs = g
                .aggs
                .iter()
                .map(|(c, agg)| {
                    let i = cols.field(*c)?;
                    Ok((i, cols.combine(agg, i)?))
                })
                .collect::<Result<_, Refusal>>()?;
            if let Some(h) = &g.having {
                let field = |c| {
                    let i = cols.field(c)?;
                    Ok((i, cols.kind_of(i, "HAVING")?))
                };
                having = Some(compile_cond(h, &field, coll)?);
            }
        }
        Ok(Compiled {
            visible: cols.visible,
            formats: fields.iter().map(|f| f.format).collect(),
            sort,
            distinct_on,
            grouped: plan.grouping.is_some(),
            plain: plan.grouping.as_ref().is_some_and(|g| g.plain),
            keys,
            aggs,
            having,
        })
    }

    pub fn grouped(&self) -> bool {
        self.grouped
    }

    /// Whether merged rows need their values compared at all.
    pub fn sorted(&self) -> bool {
        !self.sort.is_empty()
    }

    /// Columns of the shards' rows.
    pub fn width(&self) -> usize {
        self.formats.len()
    }

    /// Columns the client sees: the first of each row (the rest are hidden).
    pub fn visible(&self) -> usize {
        self.visible
    }

    /// Whether rows are compared for DISTINCT ON (`distinct_key`).
    pub fn distinct(&self) -> bool {
        !self.distinct_on.is_empty()
    }

    /// The sort key of a shard's row.
    pub fn sort_key(&self, values: &[Option<&[u8]>]) -> Result<Vec<Option<Value>>, Refusal> {
        self.sort
            .iter()
            .map(|s| decoded(values, s.field, s.kind, s.format))
            .collect()
    }

    pub fn compare(&self, a: &[Option<Value>], b: &[Option<Value>]) -> Ordering {
        for (s, (x, y)) in self.sort.iter().zip(a.iter().zip(b)) {
            let o = compare(x.as_ref(), y.as_ref(), s.descending, s.nulls_first);
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    }

    /// The DISTINCT ON values of a row.
    pub fn distinct_key(
        &self,
        values: &[Option<&[u8]>],
    ) -> Result<Option<Vec<Option<Value>>>, Refusal> {
        if self.distinct_on.is_empty() {
            return Ok(None);
        }
        self.distinct_on
            .iter()
            .map(|&(i, k, f)| decoded(values, i, k, f))
            .collect::<Result<_, _>>()
            .map(Some)
    }

    pub fn grouper(&self) -> Grouper<'_> {
        Grouper {
            c: self,
            index: BTreeMap::new(),
            groups: Vec::new(),
            bytes: 0,
        }
    }
}

fn decoded(
    values: &[Option<&[u8]>],
    i: usize,
    kind: Kind,
    format: Format,
) -> Result<Option<Value>, Refusal> {
    match values.get(i).ok_or_else(bad_row)? {
        None => Ok(None),
        Some(b) => decode(kind, format, b)
            .map(Some)
            .map_err(|e| Refusal::invalid("XX000", e)),
    }
}

fn compile_cond(
    c: &Cond,
    field: &dyn Fn(Col) -> Result<(usize, Kind), Refusal>,
    coll: Collation,
) -> Result<CCond, Refusal> {
    let op = |o: &Operand| -> Result<COperand, Refusal> {
        Ok(match o {
            Operand::Col(c) => {
                let (i, k) = field(*c)?;
                COperand::Field(i, k)
            }
            lit => COperand::Lit(lit.clone()),
        })
    };
    Ok(match c {
        Cond::And(a, b) => CCond::And(
            Box::new(compile_cond(a, field, coll)?),
            Box::new(compile_cond(b, field, coll)?),
        ),
        Cond::Or(a, b) => CCond::Or(
            Box::new(compile_cond(a, field, coll)?),
            Box::new(compile_cond(b, field, coll)?),
        ),
        Cond::Not(a) => CCond::Not(Box::new(compile_cond(a, field, coll)?)),
        Cond::IsNull(o, negated) => CCond::IsNull(op(o)?, *negated),
        Cond::Operand(o) => CCond::Operand(op(o)?),
        Cond::Cmp(a, cmp, b) => {
            let (a, b) = (op(a)?, op(b)?);
            let kinds = [&a, &b].map(|x| match x {
                COperand::Field(_, k) => Some(*k),
                _ => None,
            });
            for k in kinds.iter().flatten() {
                let text = matches!(k, Kind::Text | Kind::Bpchar);
                if text && !matches!(cmp, CmpOp::Eq | CmpOp::NotEq) && !coll.c_order {
                    return Err(unsupported(
                        "cannot evaluate HAVING with a text ordering across shards: the database's collation is not C",
                    ));
                }
            }
            if let [Some(x), Some(y)] = kinds {
                if domain(x) != domain(y) {
                    return Err(unsupported("HAVING compares values of different types"));
                }
            }
            CCond::Cmp(a, *cmp, b)
        }
    })
}

/// Values comparable with each other: integers and numerics compare as
/// numbers.
fn domain(k: Kind) -> u8 {
    match k {
        Kind::Int | Kind::Oid | Kind::Numeric => 0,
        Kind::Float => 1,
        Kind::Text | Kind::Bpchar => 2,
        Kind::Bool => 3,
        Kind::Date => 4,
        Kind::Timestamp => 5,
        Kind::TimestampTz => 6,
        Kind::Uuid => 7,
    }
}

fn as_number(v: Value) -> Value {
    match v {
        Value::Int(i) => NumKey::parse(&i.to_string()).map_or(Value::Int(i), Value::Numeric),
        other => other,
    }
}

/// A row's decoded sort key.
pub type SortValues = Vec<Option<Value>>;

/// One group's state: the first row's values and each aggregate's.
struct Group {
    first: Vec<Option<Vec<u8>>>,
    accs: Vec<Acc>,
}

#[derive(Debug, Clone)]
enum Acc {
    Count(i64),
    SumInt(Option<i128>),
    SumNum(Option<Num>),
    Best(Option<(Value, Vec<u8>)>),
    Bool(Option<bool>),
    Avg(Option<Num>, i64),
    Distinct(std::collections::BTreeSet<Value>),
}

/// Combines partial rows into groups; `finish` gives the client's rows.
pub struct Grouper<'c> {
    c: &'c Compiled,
    index: BTreeMap<Vec<Option<Value>>, usize>,
    groups: Vec<Group>,
    /// Estimated bytes held (`bytes`).
    bytes: usize,
}

/// Estimated heap bytes of one group besides its values: the map entry,
/// the group's vectors, per column a value slot in the key and the row.
const GROUP_OVERHEAD: usize = 160;
const COLUMN_OVERHEAD: usize = 56;
/// Per value kept for a count(DISTINCT): the set's node share and the value.
const DISTINCT_OVERHEAD: usize = 64;

fn int8(v: &[u8], format: Format) -> Result<i64, Refusal> {
    match format {
        Format::Binary => v.try_into().map(i64::from_be_bytes).map_err(|_| bad_row()),
        Format::Text => std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad_row),
    }
}

fn numeric(v: &[u8], format: Format) -> Result<Num, Refusal> {
    match format {
        Format::Binary => Num::from_binary(v),
        Format::Text => std::str::from_utf8(v).ok().and_then(Num::parse),
    }
    .ok_or_else(bad_row)
}

impl Grouper<'_> {
    /// Adds one shard's partial row.
    pub fn add(&mut self, values: &[Option<&[u8]>]) -> Result<(), Refusal> {
        let c = self.c;
        if values.len() != c.formats.len() {
            return Err(bad_row());
        }
        let key = c
            .keys
            .iter()
            .map(|&(i, k, f)| decoded(values, i, k, f))
            .collect::<Result<Vec<_>, _>>()?;
        let g = match self.index.get(&key) {
            Some(&g) => g,
            None => {
                // The key decoded and the row's values copied: about twice
                // the row's bytes.
                let row_bytes: usize = values.iter().map(|v| 4 + v.map_or(0, <[u8]>::len)).sum();
                self.bytes += GROUP_OVERHEAD + c.formats.len() * COLUMN_OVERHEAD + 2 * row_bytes;
                self.groups.push(Group {
                    first: values.iter().map(|v| v.map(<[u8]>::to_vec)).collect(),
                    accs: c.aggs.iter().map(|(_, a)| empty_acc(a)).collect(),
                });
                self.index.insert(key, self.groups.len() - 1);
                self.groups.len() - 1
            }
        };
        let group = &mut self.groups[g];
        for ((i, combine), acc) in c.aggs.iter().zip(group.accs.iter_mut()) {
            let (i, format) = (*i, c.formats[*i]);
            let Some(v) = values[i] else {
                continue;
            };
            match (combine, acc) {
                (Combine::Count, Acc::Count(n)) => *n += int8(v, format)?,
                (Combine::SumInt, Acc::SumInt(s)) => {
                    *s = Some(s.unwrap_or(0) + int8(v, format)? as i128)
                }
                (Combine::SumNum, Acc::SumNum(s)) => {
                    let x = numeric(v, format)?;
                    *s = Some(match s.take() {
                        Some(t) => t.add(&x),
                        None => x,
                    });
                }
                (Combine::Min(k) | Combine::Max(k), Acc::Best(best)) => {
                    let x = decode(*k, format, v).map_err(|e| Refusal::invalid("XX000", e))?;
                    let better = match best {
                        None => true,
                        Some((b, _)) => {
                            let o = x.cmp(b);
                            if matches!(combine, Combine::Min(_)) {
                                o == Ordering::Less
                            } else {
                                o == Ordering::Greater
                            }
                        }
                    };
                    if better {
                        *best = Some((x, v.to_vec()));
                    }
                }
                (Combine::BoolAnd | Combine::BoolOr, Acc::Bool(b)) => {
                    let x = matches!(decode(Kind::Bool, format, v), Ok(Value::Bool(true)));
                    *b = Some(match (b.take(), combine) {
                        (None, _) => x,
                        (Some(y), Combine::BoolAnd) => x && y,
                        (Some(y), _) => x || y,
                    });
                }
                (
                    Combine::CountDistinct {
                        value,
                        kind,
                        format: vf,
                    },
                    Acc::Distinct(set),
                ) if int8(v, format)? > 0 => {
                    if let Some(x) = decoded(values, *value, *kind, *vf)? {
                        let len = values[*value].map_or(0, <[u8]>::len);
                        if set.insert(x) {
                            self.bytes += DISTINCT_OVERHEAD + len;
                        }
                    }
                }
                (Combine::Avg { int, count }, Acc::Avg(s, n)) => {
                    let x = if *int {
                        Num::from_i128(int8(v, format)? as i128)
                    } else {
                        numeric(v, format)?
                    };
                    *s = Some(match s.take() {
                        Some(t) => t.add(&x),
                        None => x,
                    });
                    if let Some(cv) = values[*count] {
                        *n += int8(cv, c.formats[*count])?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// An estimate of the memory the groups hold, in bytes (what
    /// `routing.merge_memory` bounds).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Number of groups held.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// The combined rows, filtered by HAVING, sorted, cut by OFFSET and
    /// LIMIT, each given to `row` (the values the client sees); the row count.
    pub fn finish(
        self,
        limit: Option<u64>,
        offset: u64,
        row: impl FnMut(&[Option<Vec<u8>>]),
    ) -> Result<u64, Refusal> {
        let c = self.c;
        c.finish_groups(self.into_groups(), limit, offset, row)
    }

    /// The groups without the plan, to finish elsewhere
    /// (`Compiled::finish_groups`, e.g. on another thread).
    pub fn into_groups(self) -> Groups {
        Groups(self.groups)
    }
}

/// A grouper's groups, apart from its plan.
pub struct Groups(Vec<Group>);

impl Groups {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Compiled {
    /// `Grouper::finish` for groups taken out of their grouper.
    pub fn finish_groups(
        &self,
        groups: Groups,
        limit: Option<u64>,
        offset: u64,
        mut row: impl FnMut(&[Option<Vec<u8>>]),
    ) -> Result<u64, Refusal> {
        let c = self;
        let mut groups = groups.0;
        if groups.is_empty() && c.plain {
            // An aggregate without GROUP BY answers one row, even for no input.
            groups.push(Group {
                first: vec![None; c.formats.len()],
                accs: c.aggs.iter().map(|(_, a)| empty_acc(a)).collect(),
            });
        }
        let mut rows: Vec<(SortValues, Vec<Option<Vec<u8>>>)> = Vec::new();
        for mut g in groups {
            for ((i, combine), acc) in c.aggs.iter().zip(g.accs) {
                g.first[*i] = final_value(combine, acc, c.formats[*i])?;
            }
            let values: Vec<Option<&[u8]>> = g.first.iter().map(|v| v.as_deref()).collect();
            if let Some(h) = &c.having {
                if eval(h, &values, c)? != Some(true) {
                    continue;
                }
            }
            let key = c
                .sort
                .iter()
                .map(|s| decoded(&values, s.field, s.kind, s.format))
                .collect::<Result<Vec<_>, _>>()?;
            rows.push((key, g.first));
        }
        if !c.sort.is_empty() {
            rows.sort_by(|a, b| c.compare(&a.0, &b.0));
        }
        let mut n = 0;
        for (_, values) in rows
            .iter()
            .skip(offset.min(usize::MAX as u64) as usize)
            .take(limit.unwrap_or(u64::MAX).min(usize::MAX as u64) as usize)
        {
            row(&values[..c.visible]);
            n += 1;
        }
        Ok(n)
    }
}

/// An aggregate's state before any partial row.
fn empty_acc(a: &Combine) -> Acc {
    match a {
        Combine::Count => Acc::Count(0),
        Combine::SumInt => Acc::SumInt(None),
        Combine::SumNum => Acc::SumNum(None),
        Combine::Min(_) | Combine::Max(_) => Acc::Best(None),
        Combine::BoolAnd | Combine::BoolOr => Acc::Bool(None),
        Combine::Avg { .. } => Acc::Avg(None, 0),
        Combine::CountDistinct { .. } => Acc::Distinct(Default::default()),
    }
}

fn final_value(combine: &Combine, acc: Acc, format: Format) -> Result<Option<Vec<u8>>, Refusal> {
    let int = |v: i64| match format {
        Format::Binary => v.to_be_bytes().to_vec(),
        Format::Text => v.to_string().into_bytes(),
    };
    let num = |v: Num| match format {
        Format::Binary => {
            let mut out = Vec::new();
            v.to_binary(&mut out);
            out
        }
        Format::Text => v.to_text().into_bytes(),
    };
    Ok(match acc {
        Acc::Count(n) => Some(int(n)),
        Acc::SumInt(None) | Acc::SumNum(None) | Acc::Best(None) | Acc::Bool(None) => None,
        Acc::SumInt(Some(s)) => {
            Some(int(i64::try_from(s).map_err(|_| {
                Refusal::invalid("22003", "bigint out of range")
            })?))
        }
        Acc::SumNum(Some(s)) => Some(num(s)),
        Acc::Best(Some((_, raw))) => Some(raw),
        Acc::Bool(Some(b)) => Some(match format {
            Format::Binary => vec![b as u8],
            Format::Text => {
                if b {
                    b"t".to_vec()
                } else {
                    b"f".to_vec()
                }
            }
        }),
        Acc::Distinct(set) => Some(int(set.len() as i64)),
        Acc::Avg(_, 0) | Acc::Avg(None, _) => None,
        Acc::Avg(Some(s), n) => {
            let _ = combine;
            Some(num(s.div_count(n as u64)))
        }
    })
}

/// Three-valued HAVING evaluation.
fn eval(c: &CCond, values: &[Option<&[u8]>], comp: &Compiled) -> Result<Option<bool>, Refusal> {
    Ok(match c {
        CCond::And(a, b) => match (eval(a, values, comp)?, eval(b, values, comp)?) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (Some(true), Some(true)) => Some(true),
            _ => None,
        },
        CCond::Or(a, b) => match (eval(a, values, comp)?, eval(b, values, comp)?) {
            (Some(true), _) | (_, Some(true)) => Some(true),
            (Some(false), Some(false)) => Some(false),
            _ => None,
        },
        CCond::Not(a) => eval(a, values, comp)?.map(|b| !b),
        CCond::IsNull(o, negated) => {
            let null = match o {
                COperand::Field(i, _) => values.get(*i).ok_or_else(bad_row)?.is_none(),
                COperand::Lit(l) => *l == Operand::Null,
            };
            Some(null != *negated)
        }
        CCond::Operand(o) => match operand(o, None, values, comp)? {
            None => None,
            Some(Value::Bool(b)) => Some(b),
            Some(_) => return Err(unsupported("HAVING with a non-boolean condition")),
        },
        CCond::Cmp(a, op, b) => {
            let kind = |o: &COperand| match o {
                COperand::Field(_, k) => Some(*k),
                _ => None,
            };
            let (x, y) = (
                operand(a, kind(b), values, comp)?,
                operand(b, kind(a), values, comp)?,
            );
            match (x, y) {
                (Some(x), Some(y)) => {
                    if std::mem::discriminant(&x) != std::mem::discriminant(&y) {
                        return Err(unsupported("HAVING compares values of different types"));
                    }
                    let o = x.cmp(&y);
                    Some(match op {
                        CmpOp::Eq => o == Ordering::Equal,
                        CmpOp::NotEq => o != Ordering::Equal,
                        CmpOp::Lt => o == Ordering::Less,
                        CmpOp::LtEq => o != Ordering::Greater,
                        CmpOp::Gt => o == Ordering::Greater,
                        CmpOp::GtEq => o != Ordering::Less,
                    })
                }
                _ => None,
            }
        }
    })
}

/// An operand's value in its comparison domain; a literal takes the kind
/// of the column it is compared with.
fn operand(
    o: &COperand,
    other: Option<Kind>,
    values: &[Option<&[u8]>],
    comp: &Compiled,
) -> Result<Option<Value>, Refusal> {
    let v =
        match o {
            COperand::Field(i, k) => decoded(values, *i, *k, comp.formats[*i])?,
            COperand::Lit(Operand::Null) => None,
            COperand::Lit(Operand::Bool(b)) => Some(Value::Bool(*b)),
            COperand::Lit(Operand::Number(n)) => Some(match other {
                Some(Kind::Float) => Value::Float(FloatKey::new(
                    n.parse()
                        .map_err(|_| unsupported(format!("HAVING with {n}")))?,
                )),
                _ => Value::Numeric(
                    NumKey::parse(n).ok_or_else(|| unsupported(format!("HAVING with {n}")))?,
                ),
            }),
            COperand::Lit(Operand::Str(s)) => match other {
                Some(k) => Some(decode(k, Format::Text, s.as_bytes()).map_err(|_| {
                    unsupported(format!("HAVING compares a {k:?} value with '{s}'"))
                })?),
                None => Some(Value::Bytes(s.as_bytes().to_vec())),
            },
            COperand::Lit(Operand::Col(_)) => None,
        };
    Ok(v.map(as_number))
}

/// The LIMIT or OFFSET value, from a constant or a bound parameter.
pub fn count_value(
    c: Count,
    params: &[crate::shards::Param<'_>],
    what: &str,
) -> Result<Option<u64>, Refusal> {
    let v: i64 = match c {
        Count::None => return Ok(None),
        Count::Const(n) => return Ok(Some(n)),
        Count::Param(n) => {
            let Some(&(format, value)) = params.get((n as usize).wrapping_sub(1)) else {
                return Err(Refusal::invalid(
                    "08P01",
                    format!("{what} parameter ${n} is missing"),
                ));
            };
            let Some(v) = value else { return Ok(None) };
            if format == 1 {
                match v.len() {
                    2 => i16::from_be_bytes([v[0], v[1]]) as i64,
                    4 => i32::from_be_bytes([v[0], v[1], v[2], v[3]]) as i64,
                    8 => i64::from_be_bytes(v.try_into().map_err(|_| bad_row())?),
                    _ => {
                        return Err(Refusal::invalid(
                            "22P03",
                            format!("invalid {what} parameter"),
                        ))
                    }
                }
            } else {
                std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .ok_or_else(|| Refusal::invalid("22P02", format!("invalid {what} parameter")))?
            }
        }
    };
    if v < 0 {
        return Err(Refusal::invalid(
            if what == "OFFSET" { "2201X" } else { "2201W" },
            format!("{what} must not be negative"),
        ));
    }
    Ok(Some(v as u64))
}
