//! The session's side of the result cache (`crate::cache`): a cacheable
//! unit answered from the cache without a server, a miss read on the
//! primary and its reply kept as it is queued to the client, and the
//! tables a client wrote dropped at each ReadyForQuery it is sent.
//!
//! A unit is looked up when it arrives alone (nothing after it in the
//! client's buffer), outside a transaction, with no server attached, as a
//! read placed on replicas or merged across shards, and is one statement:
//! a simple query, or Parse (unnamed) / Bind / Describe / Execute / Sync,
//! or Bind / Execute / Sync of a statement prepared earlier. Its key is
//! the user, database, session variables, placement and the unit's
//! content with statement names replaced by their definitions.

use super::analysis::Planned;
use super::{End, Session};
use crate::cache::{Lookup, Ticket};
use crate::protocol::frontend;
use bytes::{Bytes, BytesMut};
use shardline_router::cacheable::{CacheUse, CachedRead};
use shardline_router::shards::Placement;
use shardline_router::{Target, UnitPlan};
use std::sync::Arc;
use std::time::Instant;

/// The tables a client wrote since it was last idle: dropped from the
/// cache at every ReadyForQuery queued to it until then.
#[derive(Default)]
pub(super) enum Written {
    #[default]
    Nothing,
    Tables(Vec<Box<str>>),
    Any,
}

impl Written {
    pub(super) fn note(&mut self, cache: &CacheUse) {
        match cache {
            CacheUse::Writes(tables) => self.note_tables(tables),
            CacheUse::WritesAny => *self = Written::Any,
            CacheUse::None | CacheUse::Read(_) => {}
        }
    }

    fn note_tables(&mut self, tables: &[Box<str>]) {
        match self {
            Written::Nothing => *self = Written::Tables(tables.to_vec()),
            Written::Tables(v) => {
                for t in tables {
                    if !v.contains(t) {
                        v.push(t.clone());
                    }
                }
            }
            Written::Any => {}
        }
    }
}

/// A miss being read: its reply as queued to the client.
pub(super) struct Fill {
    key: Bytes,
    read: Arc<CachedRead>,
    ticket: Ticket,
    expires: Instant,
    reply: BytesMut,
    /// Past the largest cacheable result (or not a unit it can keep).
    spoiled: bool,
}

/// A ReadyForQuery outside a transaction, as the cache's replies end.
const READY_IDLE: [u8; 6] = [b'Z', 0, 0, 0, 5, b'I'];

/// Messages a kept reply may hold.
const KEPT_REPLIES: &[u8] = b"12tTnDCI";

/// What the cache did with a unit.
pub(super) enum Cached {
    /// Answered from the cache.
    Hit,
    /// Not in the cache: read it on the primary and keep the reply.
    Fill,
    /// Not for the cache.
    Bypass,
}

impl Session {
    /// A statement about to run may write tables: noted for the next
    /// ReadyForQuery.
    pub(super) fn note_cache_use(&mut self, cache: &CacheUse) {
        self.cache_writes.note(cache);
    }

    /// The client's output grew from `from` (about to be written), with a
    /// ReadyForQuery of status `ready` among it.
    pub(super) fn cache_queued(&mut self, from: usize, ready: Option<u8>) {
        if let Some(fill) = self.fill.as_mut() {
            let new = &self.client_out[from.min(self.client_out.len())..];
            if !fill.spoiled {
                let limit = self.shared.config.cache.max_result_bytes + READY_IDLE.len();
                if fill.reply.len() + new.len() > limit {
                    fill.spoiled = true;
                    fill.reply = BytesMut::new();
                } else {
                    fill.reply.extend_from_slice(new);
                }
            }
        }
        let Some(status) = ready else {
            return;
        };
        // Before the write's ReadyForQuery leaves: its tables' results go.
        match &self.cache_writes {
            Written::Nothing => {}
            Written::Tables(t) => self.shared.result_cache.invalidate(t),
            Written::Any => self.shared.result_cache.invalidate_all(),
        }
        if status == b'I' && self.pending.is_empty() && self.client_in.is_empty() {
            // Idle, nothing in flight: every write noted has ended.
            self.cache_writes = Written::Nothing;
        }
        if let Some(fill) = self.fill.take() {
            self.keep_fill(*fill, status);
        }
    }

    fn keep_fill(&mut self, fill: Fill, status: u8) {
        let reply = &fill.reply[..];
        if fill.spoiled || status != b'I' || !reply.ends_with(&READY_IDLE) {
            return;
        }
        let body = &reply[..reply.len() - READY_IDLE.len()];
        // Only the answers of a successful read (no error, notice or
        // notification among them).
        let mut rest = body;
        while !rest.is_empty() {
            if rest.len() < 5 {
                return;
            }
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            if !KEPT_REPLIES.contains(&rest[0]) || len < 4 || rest.len() < len + 1 {
                return;
            }
            rest = &rest[len + 1..];
        }
        let kept = body.len();
        let body = fill.reply.freeze().slice(..kept);
        self.shared.result_cache.store(
            fill.key,
            &fill.read.tables,
            fill.ticket,
            body,
            fill.expires,
        );
    }

    /// A server chosen for the unit is a replica: a fill there could miss
    /// a write the cache has dropped results for; it is not kept.
    pub(super) fn fill_on(&mut self, target: Target) {
        if target == Target::Replica {
            self.fill = None;
        }
    }

    /// Looks the unit at the front of the client's buffer up in the cache
    /// (`planned`: where it would run). On a hit the unit is answered and
    /// taken off the buffer; on a miss `Fill` is noted, and `borrow` sends
    /// the read to the primary.
    pub(super) fn cache_lookup(&mut self, planned: &Planned) -> Result<Cached, End> {
        self.fill = None;
        if !self.cacheable_now(planned) {
            return Ok(Cached::Bypass);
        }
        let Some((key, route, parse_len)) = self.cache_key(planned) else {
            return Ok(Cached::Bypass);
        };
        let CacheUse::Read(read) = route.cache_use() else {
            return Ok(Cached::Bypass);
        };
        let tables = &read.tables;
        let cache = self.shared.result_cache.clone();
        let Some(ttl) = cache.ttl(tables, read.ttl_ms) else {
            return Ok(Cached::Bypass);
        };
        let now = Instant::now();
        match cache.lookup(&key, tables, now) {
            Lookup::Hit(reply) => {
                let unit_len = self.client_in.len();
                let unit = self.client_in.split_to(unit_len).freeze();
                if let Some(definition_len) = parse_len {
                    // The client's unnamed statement is now this one.
                    let total =
                        1 + u32::from_be_bytes([unit[1], unit[2], unit[3], unit[4]]) as usize;
                    let frame = crate::protocol::Frame {
                        tag: frontend::PARSE,
                        bytes: unit.slice(..total),
                    };
                    self.remember_unnamed(&frame, definition_len, None, route.clone());
                }
                self.meter.place(crate::stats::Kind::None);
                self.client_out.extend_from_slice(&reply);
                self.client_out.extend_from_slice(&READY_IDLE);
                Ok(Cached::Hit)
            }
            Lookup::Miss(ticket) => {
                // What is queued for the client already is not this
                // unit's: counted now, so the capture starts after it.
                self.count_queued();
                self.fill = Some(Box::new(Fill {
                    key: key.into(),
                    read: read.clone(),
                    ticket,
                    expires: now + ttl,
                    reply: BytesMut::new(),
                    spoiled: false,
                }));
                // `borrow` sends a fill to the primary.
                Ok(Cached::Fill)
            }
        }
    }

    /// Whether the session is where a cached answer may stand for the
    /// server's: no transaction, nothing attached or in flight, nothing
    /// written it has not seen end, and the unit a read for replicas or a
    /// merge.
    fn cacheable_now(&self, planned: &Planned) -> bool {
        self.shared.caching
            && self.server.is_none()
            && self.pending.is_empty()
            && !self.spanning.spans()
            && self.txn == super::txn::Txn::Plain
            && self.pinned.is_none()
            && self.mode() == shardline_config::PoolMode::Transaction
            && matches!(self.cache_writes, Written::Nothing)
            && self.inflow != super::unit::Inflow::SkipToSync
            && planned.complete
            && planned.reads_only
            && planned.executes
            && matches!(
                planned.plan,
                UnitPlan::Run {
                    target: Target::Replica,
                    writes: false
                }
            )
            && matches!(
                planned.place,
                Placement::One(_)
                    | Placement::Anywhere
                    | Placement::Spread
                    | Placement::Many(_)
                    | Placement::Merge(_)
            )
    }

    /// The unit's key and its statement's route, when the client's buffer
    /// holds exactly one cacheable unit; with the definition length of the
    /// unnamed Parse it opens with, if any. The key is built only once the
    /// statement is known to be a cacheable read.
    fn cache_key(
        &self,
        planned: &Planned,
    ) -> Option<(Vec<u8>, shardline_router::Route, Option<usize>)> {
        let unit = self.cache_unit()?;
        let CacheUse::Read(_) = unit.route.cache_use() else {
            return None;
        };
        let mut key = Vec::with_capacity(self.client_in.len() + 64);
        let user = &self.login.user;
        for part in [user.name.as_bytes(), user.database.as_bytes()] {
            key.extend_from_slice(&(part.len() as u32).to_le_bytes());
            key.extend_from_slice(part);
        }
        self.vars.write_key(&mut key);
        let (kind, mask) = match &planned.place {
            Placement::One(s) => (1u8, shardline_router::sharding::mask_of(*s)),
            Placement::Many(m) => (2, *m),
            Placement::Merge(m) => (3, *m),
            // Any shard answers alike (a reference table, one shard).
            _ => (0, 0),
        };
        key.push(kind);
        key.extend_from_slice(&mask.to_le_bytes());
        match unit.form {
            Form::Simple(text) => {
                key.push(b'Q');
                key.extend_from_slice(text);
            }
            Form::Extended {
                parse,
                definition,
                bind,
                describe,
            } => {
                key.push(b'X');
                key.push(u8::from(parse.is_some()));
                for part in [definition, bind] {
                    key.extend_from_slice(&(part.len() as u32).to_le_bytes());
                    key.extend_from_slice(part);
                }
                key.push(describe.unwrap_or(0));
            }
        }
        let parse_len = match unit.form {
            Form::Extended {
                parse: Some(len), ..
            } => Some(len),
            _ => None,
        };
        Some((key, unit.route, parse_len))
    }

    /// The one unit in the client's buffer, when it has a cacheable form:
    /// a simple query, or [Parse ""] Bind "" [Describe] Execute "" 0 Sync.
    fn cache_unit(&self) -> Option<Unit<'_>> {
        let mut messages = Messages(&self.client_in[..]);
        let (tag, body) = messages.next()?;
        if tag == frontend::QUERY {
            let text = frontend::query(body).ok()?;
            return messages.0.is_empty().then(|| Unit {
                route: self.route_text(text),
                form: Form::Simple(text),
            });
        }
        let (mut tag, mut body) = (tag, body);
        let mut parsed: Option<(&[u8], &[u8])> = None;
        if tag == frontend::PARSE {
            let p = frontend::parse(body).ok()?;
            if !p.name.is_empty() {
                return None;
            }
            parsed = Some((p.query, p.definition));
            (tag, body) = messages.next()?;
        }
        if tag != frontend::BIND {
            return None;
        }
        let b = frontend::bind(body).ok()?;
        if !b.portal.is_empty() {
            return None;
        }
        let (definition, route) = match (parsed, b.statement) {
            (Some((query, definition)), b"") => (definition, self.route_text(query)),
            (None, b"") => {
                let u = self.unnamed.as_ref()?;
                (&u.definition[..], u.route.clone())
            }
            (None, name) => {
                let s = self.statements.get(name)?;
                (&s.definition[..], s.route.clone())
            }
            (Some(_), _) => return None,
        };
        (tag, body) = messages.next()?;
        let mut describe = None;
        if tag == frontend::DESCRIBE {
            let (kind, name) = frontend::target(body, "Describe").ok()?;
            if name != b.statement && !(kind == b'P' && name.is_empty()) {
                return None;
            }
            describe = Some(kind);
            (tag, body) = messages.next()?;
        }
        if tag != frontend::EXECUTE || body != b"\0\0\0\0\0" {
            return None;
        }
        let (tag, _) = messages.next()?;
        if tag != frontend::SYNC || !messages.0.is_empty() {
            return None;
        }
        Some(Unit {
            route,
            form: Form::Extended {
                parse: parsed.map(|(_, d)| d.len()),
                definition,
                bind: b.rest,
                describe,
            },
        })
    }
}

/// A unit the cache may answer: its statement's route and its parts.
struct Unit<'a> {
    route: shardline_router::Route,
    form: Form<'a>,
}

enum Form<'a> {
    Simple(&'a [u8]),
    Extended {
        /// An unnamed Parse opens the unit: its definition's length.
        parse: Option<usize>,
        /// The statement's text and parameter types.
        definition: &'a [u8],
        /// The Bind after its names: parameter formats and values, result
        /// formats.
        bind: &'a [u8],
        /// Describe's kind (`S` or `P`).
        describe: Option<u8>,
    },
}

/// The whole messages at the front of a buffer, in order.
struct Messages<'a>(&'a [u8]);

impl<'a> Iterator for Messages<'a> {
    type Item = (u8, &'a [u8]);

    fn next(&mut self) -> Option<(u8, &'a [u8])> {
        let buf = self.0;
        if buf.len() < 5 {
            return None;
        }
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if len < 4 || buf.len() < len + 1 {
            return None;
        }
        self.0 = &buf[len + 1..];
        Some((buf[0], &buf[5..len + 1]))
    }
}
