//! From a [`Template`] and the statement's constants or a Bind's
//! parameters to its [`Placement`], without parsing again.

use super::*;

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
    Refused(Box<Refusal>),
}

impl Placement {
    /// A refusal (boxed: the placements a unit carries stay small).
    pub fn refused(r: Refusal) -> Placement {
        Placement::Refused(Box::new(r))
    }
}

/// The shards of a pipeline (`parts`: one placement per Bind) or of a query
/// string (one per statement) whose statements need different shards: each
/// runs on its key's shard, and one on several shards (DDL, a write or a
/// read without a key) on each of its own. `None` when one placement covers
/// them all, or a statement must be merged or split, or is refused.
pub fn pipeline_shards(parts: &[Placement]) -> Option<ShardMask> {
    let mut mask: ShardMask = 0;
    for p in parts {
        match p {
            Placement::One(s) => mask |= mask_of(*s),
            Placement::Many(m) => mask |= m,
            Placement::Anywhere | Placement::Spread => {}
            _ => return None,
        }
    }
    (mask.count_ones() > 1).then_some(mask)
}

/// A bound parameter: format (1 is binary) and value (`None` is NULL).
pub type Param<'a> = (i16, Option<&'a [u8]>);

/// A statement's text as the caller has it: a string, or bytes checked
/// for UTF-8 only when a key is read from one of its constants (a
/// statement placed by its parameters never needs its text).
#[derive(Debug, Clone, Copy)]
pub enum SqlText<'a> {
    Str(&'a str),
    Bytes(&'a [u8]),
}

impl<'a> From<&'a str> for SqlText<'a> {
    fn from(s: &'a str) -> Self {
        SqlText::Str(s)
    }
}

impl<'a> SqlText<'a> {
    /// The text; empty when it is not UTF-8 (no constant is read from it).
    pub fn text(self) -> &'a str {
        match self {
            SqlText::Str(s) => s,
            SqlText::Bytes(b) => std::str::from_utf8(b).unwrap_or(""),
        }
    }
}

/// The values a statement's keys are read from.
pub struct KeyInput<'a> {
    /// The statement text (for constants).
    pub sql: SqlText<'a>,
    /// Bound parameters: `(format, value)`; format 1 is binary.
    pub params: &'a [Param<'a>],
    /// The parameter type OIDs the statement's Parse declared (0: none).
    pub param_types: &'a [u32],
    /// The session's `shardline.shard` / `shardline.sharding_key`.
    pub session_shard: Option<&'a str>,
    pub session_key: Option<&'a str>,
    /// Where each constant of `sql` is, when known (`shape_noting` found
    /// them while routing the text); `None`: scanned when a key needs one.
    pub constants: Option<&'a [(usize, usize)]>,
}

/// A sharding key a statement was placed by: its table group, its value,
/// and the shard that owns it (what the hot-key report counts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySeen {
    pub group: usize,
    pub shard: usize,
    pub key: KeyValue,
}

/// At most this many keys are noted for one statement (a long IN list or a
/// multi-row INSERT notes its first ones).
pub const MAX_KEYS_NOTED: usize = 64;

/// The placement of a statement from its template and key values.
pub fn resolve(t: &Template, sh: &Sharding, input: &KeyInput) -> Placement {
    resolve_in(t, sh, input, None)
}

/// [`resolve`], adding to `seen` the keys (not NULL) the placement was
/// decided by: from the statement's key columns, or a key hint.
pub fn resolve_noting(
    t: &Template,
    sh: &Sharding,
    input: &KeyInput,
    seen: &mut Vec<KeySeen>,
) -> Placement {
    resolve_in(t, sh, input, Some(std::cell::RefCell::new(seen)))
}

fn resolve_in(
    t: &Template,
    sh: &Sharding,
    input: &KeyInput,
    seen: Option<std::cell::RefCell<&mut Vec<KeySeen>>>,
) -> Placement {
    if let Some(placed) = by_one_key(t, sh, input, seen.as_ref()) {
        debug_assert_eq!(
            placed,
            resolve_general(t, sh, input, None),
            "the one-key shortcut places as the general path"
        );
        return placed;
    }
    resolve_general(t, sh, input, seen)
}

/// Every statement's placement: hints, the session's shard or key, the
/// key expression, pinned parts, key changes, and the refusals.
fn resolve_general(
    t: &Template,
    sh: &Sharding,
    input: &KeyInput,
    seen: Option<std::cell::RefCell<&mut Vec<KeySeen>>>,
) -> Placement {
    let hint = t.hint.as_ref();
    let shard_hint = hint
        .and_then(|h| h.shard.as_deref())
        .or(input.session_shard);
    if let Some(name) = shard_hint {
        return match sh.shard_index(name) {
            Some(i) => Placement::One(i),
            None => Placement::refused(Refusal::invalid(
                "22023",
                format!(
                    "no shard is named \"{name}\" (shards: {})",
                    sh.shard_names.join(", ")
                ),
            )),
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
            let key = g.key_from_text(k);
            return match key.as_ref().map(|v| (v, g.shard_of(Some(v)))) {
                Some((v, Ok(s))) => {
                    if let Some(seen) = &seen {
                        note(&mut seen.borrow_mut(), g, v, s);
                    }
                    Placement::One(s)
                }
                Some((_, Err(e))) => Placement::refused(Refusal::invalid("22023", e)),
                None => Placement::refused(Refusal::invalid(
                    "22P02",
                    format!(
                        "sharding key hint \"{k}\" is not a valid {:?} key",
                        g.key_type
                    ),
                )),
            };
        }
    }
    if let Some(r) = &t.refusal {
        return Placement::refused(r.clone());
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
            let values = Values {
                seen,
                ..Values::new(input)
            };
            let mask = match key_mask(key, g, sh, &values) {
                Ok(m) => m,
                Err(e) => return Placement::refused(Refusal::invalid("22023", e)),
            };
            let mask = match pinned_mask(t, mask, sh, &values) {
                Ok(m) => m,
                Err(r) => return Placement::refused(r),
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
                    return Placement::refused(Refusal::unsupported(Construct::KeyChange, message));
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
    if t.do_block && matches!(placement, Placement::Many(_)) {
        if let Some(refusal) = analyze::do_block_refusal(input.sql.text(), sh) {
            return Placement::refused(refusal);
        }
    }
    match placement {
        Placement::Many(_) | Placement::Split(_) if t.spread_refusal.is_some() => {
            Placement::refused(t.spread_refusal.clone().unwrap_or_else(|| Refusal::unsupported(Construct::OuterJoin, "")))
        }
        Placement::Many(_) | Placement::Split(_) if t.cursor => Placement::refused(Refusal::unsupported(
            Construct::Cursor,
            "a cursor over rows of several shards is not supported: declare it with the sharding key in its WHERE clause (or a /* shardline: shard=NAME */ comment)",
        )),
        Placement::Many(_) | Placement::Split(_) if t.explain == Explain::Analyze && t.write => {
            Placement::refused(Refusal::unsupported(
                Construct::Explain,
                "EXPLAIN ANALYZE runs the write it explains, and its plan would come from one shard while the write needs several: run the statement itself, EXPLAIN it without ANALYZE, or name one shard (its key, or a /* shardline: shard=NAME */ comment)",
            ))
        }
        Placement::Many(mask) | Placement::Split(mask) if t.explain != Explain::No => {
            Placement::One(mask.trailing_zeros() as usize)
        }
        Placement::Many(_) if t.copy_in.is_some() => Placement::CopySplit(sh.all_shards()),
        Placement::Many(mask) if !t.write && t.needs_merge.is_some() => Placement::Merge(mask),
        Placement::Many(_)
            if !sh.broadcast_writes
                && matches!(t.scope, Scope::Sharded { .. }) =>
        {
            Placement::refused(Refusal::unsupported(
                Construct::BroadcastWrite,
                "UPDATE or DELETE without the sharding key would run on every shard, and sharding.broadcast_writes is off",
            ))
        }
        other => other,
    }
}

/// The usual statement, placed by one key and nothing else (`WHERE id =
/// 42`, `WHERE id = $1`, a one-row INSERT): its table group and where the
/// key is read from. Found once per statement text (`Route::one_key`), so
/// placing it costs reading the key and finding its shard
/// ([`shard_by_key`]), not the general path's steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OneKey {
    pub group: usize,
    pub src: KeySrc,
}

/// The [`OneKey`] of a text's statements: one statement, of one sharded
/// group, restricted by one key and nothing that could place it elsewhere
/// (a hint, a refusal, COPY, pinned parts, a key change, a cursor it
/// declares or reads).
pub fn one_key(templates: &[Template]) -> Option<OneKey> {
    let [t] = templates else {
        return None;
    };
    let Scope::Sharded {
        group,
        key: KeyExpr::Keys(srcs),
        key_change: None,
        ..
    } = &t.scope
    else {
        return None;
    };
    let [src] = srcs.as_slice() else {
        return None;
    };
    let plain = t.hint.is_none()
        && t.refusal.is_none()
        && t.copy_in.is_none()
        && t.pinned.is_empty()
        && t.cursor_name.is_none();
    plain.then_some(OneKey {
        group: *group,
        src: *src,
    })
}

/// The shard that owns the key a [`OneKey`] statement reads, as the
/// general path places it, noting the key (not NULL) in `seen`. `None`
/// when the general path must decide: the session names a shard or key,
/// or the key cannot be read or placed (it then refuses or spreads).
pub fn shard_by_key(
    k: &OneKey,
    sh: &Sharding,
    input: &KeyInput,
    seen: Option<&mut Vec<KeySeen>>,
) -> Option<usize> {
    if input.session_shard.is_some() || input.session_key.is_some() {
        return None;
    }
    let g = &sh.groups[k.group];
    let key = key_value(&k.src, g, &Values::new(input)).ok()?;
    let shard = g.shard_of(key.as_ref()).ok()?;
    if let (Some(seen), Some(key)) = (seen, &key) {
        note(seen, g, key, shard);
    }
    Some(shard)
}

/// [`shard_by_key`] for a template that has a [`OneKey`].
fn by_one_key(
    t: &Template,
    sh: &Sharding,
    input: &KeyInput,
    seen: Option<&std::cell::RefCell<&mut Vec<KeySeen>>>,
) -> Option<Placement> {
    let k = one_key(std::slice::from_ref(t))?;
    let shard = match seen {
        Some(seen) => shard_by_key(&k, sh, input, Some(&mut seen.borrow_mut())),
        None => shard_by_key(&k, sh, input, None),
    }?;
    Some(Placement::One(shard))
}

/// The one shard a statement with pinned subqueries, CTEs or branches
/// runs on (`Template::pinned`): every restricted part names the same
/// single shard, the top level's `mask` included. A part whose keys
/// contradict themselves (`id = 1 AND id = 2`) reads no rows anywhere and
/// does not count.
pub(super) fn pinned_mask(
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
        let m = m.map_err(|e| Refusal::invalid("22023", e))?;
        if m == 0 {
            continue;
        }
        if m.count_ones() > 1 || (one != 0 && one != m) {
            return Err(Refusal::unsupported(
                Construct::Subquery,
                "the statement's subqueries, CTEs or set-operation branches read rows of different shards (or the statement reads several shards): it runs whole only on one shard; name keys of one shard in each, or add a /* shardline: shard=NAME */ comment",
            ));
        }
        one = m;
    }
    Ok(one)
}

/// The value of one key source.
pub(super) fn key_value(
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
            // A plain number for an integer key, the usual case, is read in
            // place: it is its own value (no quotes, `$` or `_`).
            if g.key_type == shardline_config::KeyType::Bigint {
                let raw = values.constant_raw(ordinal as usize).ok_or(())?;
                if let Some(v) = crate::sharding::plain_digits(raw.as_bytes()) {
                    return Ok(Some(KeyValue::Int(if negative { -v } else { v })));
                }
            }
            let text = values.constant(ordinal as usize).ok_or(())?;
            let key = if negative {
                g.key_from_text(&format!("-{text}"))
            } else {
                g.key_from_text(&text)
            };
            key.map(Some).ok_or(())
        }
    }
}

/// The key a bound parameter of type `ty` holds; `None` when its value is
/// not one key (a fraction, a type the proxy does not read): the statement
/// then runs wherever the key could be.
pub(super) fn param_key(
    g: &crate::sharding::Group,
    ty: ParamType,
    binary: bool,
    v: &[u8],
) -> Option<KeyValue> {
    // An integer read from a parameter, as the key column reads it.
    let int = |n: i64| match g.key_type {
        shardline_config::KeyType::Bigint => Some(KeyValue::Int(n)),
        _ => g.key_from_text(&n.to_string()),
    };
    let integral = |f: f64| (f.fract() == 0.0 && f.abs() < 9.0e18).then(|| int(f as i64))?;
    match (ty, binary) {
        (ParamType::Column, true) => g.key_from_binary(v),
        (ParamType::Other, _) => None,
        (ParamType::Float, false) => integral(std::str::from_utf8(v).ok()?.trim().parse().ok()?),
        (_, false) => match crate::sharding::plain_int(v) {
            // The usual integer key, read from its bytes.
            Some(n) if g.key_type == shardline_config::KeyType::Bigint => Some(KeyValue::Int(n)),
            _ => g.key_from_text(std::str::from_utf8(v).ok()?),
        },
        (ParamType::Int, true) => {
            let n = match v.len() {
                2 => i16::from_be_bytes(v.try_into().ok()?) as i64,
                4 => i32::from_be_bytes(v.try_into().ok()?) as i64,
                8 => i64::from_be_bytes(v.try_into().ok()?),
                _ => return None,
            };
            int(n)
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
pub(super) struct Values<'a, 'b, 'c> {
    input: &'b KeyInput<'a>,
    /// The text, checked when first read.
    sql: std::cell::OnceCell<&'a str>,
    spans: std::cell::OnceCell<Vec<(usize, usize)>>,
    /// Where the keys read are noted, when asked (`resolve_noting`).
    seen: Option<std::cell::RefCell<&'c mut Vec<KeySeen>>>,
}

fn note(seen: &mut Vec<KeySeen>, g: &crate::sharding::Group, key: &KeyValue, shard: usize) {
    if seen.len() < MAX_KEYS_NOTED {
        seen.push(KeySeen {
            group: g.index,
            shard,
            key: key.clone(),
        });
    }
}

impl<'a, 'b> Values<'a, 'b, '_> {
    pub(super) fn new(input: &'b KeyInput<'a>) -> Self {
        Values {
            input,
            sql: match input.sql {
                SqlText::Str(s) => std::cell::OnceCell::from(s),
                SqlText::Bytes(_) => std::cell::OnceCell::new(),
            },
            spans: std::cell::OnceCell::new(),
            seen: None,
        }
    }

    fn sql(&self) -> &'a str {
        self.sql.get_or_init(|| self.input.sql.text())
    }

    /// `key` of group `g`, owned by `shard`, decided where a statement runs.
    fn noted(&self, g: &crate::sharding::Group, key: Option<&KeyValue>, shard: usize) {
        if let (Some(seen), Some(key)) = (&self.seen, key) {
            note(&mut seen.borrow_mut(), g, key, shard);
        }
    }

    /// The value of the statement's `n`-th constant.
    fn constant(&self, n: usize) -> Option<std::borrow::Cow<'a, str>> {
        let (s, e) = self.span(n)?;
        self.sql().get(s..e)?;
        Some(constant_value(self.sql(), s, e))
    }

    /// The `n`-th constant as written (quotes and all).
    fn constant_raw(&self, n: usize) -> Option<&'a str> {
        let (s, e) = self.span(n)?;
        self.sql().get(s..e)
    }

    /// Where the `n`-th constant is (as the caller gave, or scanned):
    /// read with `str::get`, so a span a caller got wrong reads nothing.
    fn span(&self, n: usize) -> Option<(usize, usize)> {
        if let Some(known) = self.input.constants {
            return known.get(n).copied();
        }
        let spans = self.spans.get_or_init(|| {
            let mut v = Vec::new();
            crate::lexer::scan_constants(self.sql(), |s, e| v.push((s, e)));
            v
        });
        spans.get(n).copied()
    }
}

pub(super) fn key_mask(
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
                    Ok(v) => {
                        let shard = g.shard_of(v.as_ref())?;
                        values.noted(g, v.as_ref(), shard);
                        m |= mask_of(shard);
                    }
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
            let Some(elements) = array_elements(format, v, g) else {
                return Ok(sh.all_shards());
            };
            let mut m = 0;
            for v in elements {
                let shard = g.shard_of(v.as_ref())?;
                values.noted(g, v.as_ref(), shard);
                m |= mask_of(shard);
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
pub(super) fn array_elements(
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

/// A read whose rows are merged across shards, sent with other statements
/// (in one query string, or one pipeline up to Sync): refused, as the
/// merge needs the unit to itself.
pub fn merged_read_not_alone() -> Placement {
    Placement::refused(Refusal::unsupported(
        Construct::Batch,
        "a statement whose rows are merged across shards (ORDER BY, LIMIT, aggregates, DISTINCT) must be sent alone, not with other statements in one query string or pipeline",
    ))
}

/// Why statements sent together that do not run as a pipeline (see
/// [`pipeline_shards`]) are refused, when `combined` (their placements
/// combined) is the refusal: a merged read among them is named as the
/// reason rather than their different shards, unless one of them is
/// refused on its own account (that reason stands).
pub fn batch_refusal(parts: &[Placement], combined: Placement) -> Placement {
    let merges = parts.iter().any(|p| matches!(p, Placement::Merge(_)));
    let refused = parts.iter().any(|p| matches!(p, Placement::Refused(_)));
    if merges && !refused && matches!(combined, Placement::Refused(_)) {
        merged_read_not_alone()
    } else {
        combined
    }
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
        (Merge(_), _) | (_, Merge(_)) => merged_read_not_alone(),
        _ => Placement::refused(Refusal::unsupported(
            Construct::Batch,
            "statements sent together (in one query string, or in one pipeline up to Sync) reach different shards; send them separately",
        )),
    }
}
