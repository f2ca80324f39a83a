//! Where the client's next unit of work runs, and borrowing a connection
//! there. The rules are the router's (`plan_unit`, `balance::choose`); this
//! file gathers the facts (the unit's statements, the session's hints and
//! read-your-writes position, the nodes' health) and acts on the answer.

use super::analysis::{Placements, Planned, UnitRoutes, LARGE_STATEMENT};
use super::attach::{Placed, Purpose};
use super::pending::{Kind, Pending};
use super::Session;
use crate::health::{now_ms, ReadRequest};
use crate::protocol::backend::{self, sqlstate, PgError};
use crate::protocol::frontend;
use shardline_config::{PoolMode, ReadYourWrites};
use shardline_router::memo::ShapeMemo;
use shardline_router::shards::{
    combine, resolve, resolve_noting, shard_by_key, KeyInput, Placement, SqlText,
};
use shardline_router::{
    classify::{Class, Source},
    lone_transaction_end, plan_unit, Route, Target, UnitFacts, UnitPlan,
};
use std::sync::atomic::Ordering::Relaxed;

/// What a simple query's own steps read of its route (`query_facts`).
pub(super) struct QueryFacts {
    /// The text may change the session (`Route::effects`).
    pub effects: bool,
    /// State it leaves on the connection (`Route::session_state`).
    pub session_state: Option<&'static str>,
    /// What it means to the result cache, when the cache is on.
    pub cache: Option<std::sync::Arc<shardline_router::cacheable::CacheUse>>,
}

/// FunctionCall messages run arbitrary functions: writes.
const FUNCTION_CALL: Route = Route {
    class: Class::Write,
    source: Source::Parsed,
    role_hint: None,
    shards: None,
    one_key: None,
    session_state: None,
    // Not known (a non-UTF-8 text has no effect the proxy reads anyway).
    effects: true,
    cache: None,
};

/// The primary's WAL position after a commit, for read-your-writes: the
/// flush position, which a commit reaches before it is acknowledged, and
/// which replicas can have (WAL inserted but not flushed may never reach
/// them if the primary is lost); with synchronous_commit = off, the insert
/// position, which covers the commit record before it is written.
pub(super) const WAL_POSITION_SQL: &str =
    "SELECT (CASE WHEN current_setting('synchronous_commit') = 'off' \
     THEN pg_current_wal_insert_lsn() ELSE pg_current_wal_flush_lsn() END - '0/0'::pg_lsn)::bigint";

/// The statements a unit's Binds refer to: the unit's own Parses first (a
/// driver may send Parse and its Bind together), then the session's.
#[derive(Default)]
pub(super) struct UnitStatements<'a> {
    /// Each statement parsed so far (a unit's few on the stack).
    parsed: smallvec::SmallVec<[UnitStatement<'a>; 2]>,
}

/// A Parse of the unit: name, route and definition.
type UnitStatement<'a> = (&'a [u8], Route, &'a [u8]);

impl<'a> UnitStatements<'a> {
    /// Records a Parse of the unit, routed `route`.
    pub fn parse(&mut self, p: &frontend::ParseMsg<'a>, route: Route) {
        self.parsed.retain(|(name, ..)| *name != p.name);
        self.parsed.push((p.name, route, p.definition));
    }

    /// Route and Parse definition of the statement `name` a Bind names.
    pub fn bound<'s>(&'s self, session: &'s Session, name: &[u8]) -> Option<(Route, &'s [u8])> {
        match self.parsed.iter().find(|(n, ..)| *n == name) {
            Some((_, r, d)) => Some((r.clone(), *d)),
            None => session.session_statement(name),
        }
    }
}

/// A statement text to place: the text, the parameter types its Parse
/// declared, and where the unit's routes keep it (`None`: look it up).
type ToPlace<'a> = (&'a [u8], &'a [u32], Option<usize>);

/// The session effect of a Parse's statement text, looked for only when
/// its route says the shape may have one (a text that is not UTF-8 has
/// none).
pub(super) fn parse_effect(
    route: &Route,
    query: &[u8],
) -> Option<shardline_router::effect::Effect> {
    if !route.effects {
        return None;
    }
    crate::protocol::text(query).and_then(shardline_router::effect::statement_effect)
}

/// Statements that only read or write: no transaction control, settings
/// or session state among them (what a pipeline run at a Flush may take
/// to other shards, `Session::runs_as_pipeline`).
fn plain(routes: &[Route]) -> bool {
    !routes.is_empty()
        && routes.iter().all(|r| {
            matches!(r.class, Class::Read | Class::Write) && !r.effects && r.session_state.is_none()
        })
}

/// A BEGIN (or the text holding it) asks for what a hot standby refuses:
/// READ WRITE or SERIALIZABLE. (Read as words anywhere in the text: a
/// name holding them keeps the transaction on the primary, as before.)
/// Asked of each BEGIN an extended unit binds: it allocates nothing.
pub(super) fn standby_refuses(begin: &[u8]) -> bool {
    let holds = |word: &[u8]| {
        begin
            .windows(word.len())
            .any(|w| w.eq_ignore_ascii_case(word))
    };
    holds(b"write") || holds(b"serializable")
}

/// The query text of a Parse definition (`query\0` then parameter types).
pub(super) fn definition_query(definition: &[u8]) -> &[u8] {
    let end = memchr::memchr(0, definition).unwrap_or(definition.len());
    &definition[..end]
}

/// A named portal (a cursor) over rows of several shards, bound in one
/// unit and fetched in the next or in batches: each shard's connection
/// would hold a part of it, and a later Execute would read one of them.
fn cursor_refusal() -> Placement {
    Placement::refused(shardline_router::shards::Refusal::unsupported(
        shardline_router::shards::Construct::Cursor,
        "a cursor (a named portal) over rows of several shards is not supported unless it is bound and executed to its last row in one unit: fetch the rows whole, or put the sharding key in its WHERE clause",
    ))
}

/// The unnamed portal over rows of several shards, executed again after
/// an Execute with a row limit: the rows past the limit are gone.
fn refetch_refusal() -> Placement {
    Placement::refused(shardline_router::shards::Refusal::unsupported(
        shardline_router::shards::Construct::Cursor,
        "executing the unnamed portal again after an Execute with a row limit is not supported over rows of several shards: execute it without a limit, or put the sharding key in its WHERE clause",
    ))
}

/// What the unit's unnamed portal is bound to, for its Executes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Portal {
    /// Rows of one shard (or not bound in this unit).
    OneShard,
    /// Rows of several shards.
    Spread,
    /// Rows of several shards, executed once with a row limit.
    Fetched,
}

/// Checkout failures that mean the node is unreachable (not a busy pool or
/// a refused login): the node is banned and the read tried elsewhere.
fn unreachable(e: &PgError) -> bool {
    matches!(
        e.code.as_ref(),
        sqlstate::CANNOT_CONNECT | sqlstate::CONNECTION_FAILURE | sqlstate::CANNOT_CONNECT_NOW
    ) || e.code == sqlstate::ADMIN_SHUTDOWN
}

/// Whether node `i` of `shard` is a replica a read may try: up, not
/// banned, not tried for this unit.
fn usable_replica(shard: &crate::health::ShardHealth, i: usize, tried: u64) -> bool {
    let n = &shard.nodes[i];
    n.role() == crate::health::Role::Replica
        && tried & bit(i) == 0
        && !n.is_down()
        && !n.is_banned()
}

/// Whether `shard` has a replica a read may try.
fn candidates_up(shard: &crate::health::ShardHealth, tried: u64) -> bool {
    (0..shard.nodes.len()).any(|i| usable_replica(shard, i, tried))
}

fn bit(node: usize) -> u64 {
    1u64 << node.min(63)
}

/// One route in this many is timed (`route_timed`), and the proxy's first
/// (so `avg_route_ns` has a figure from the first statement on): two
/// clock reads per statement cost more (about 2% of the proxy's CPU on
/// short reads) than an average needs.
const ROUTE_TIMING_SAMPLE: u32 = 64;

/// Routes one statement text's bytes as `route_timed` does (a text that
/// is not UTF-8 routes as a function call: to the primary, unparsed).
fn route_bytes(shared: &crate::Shared, sql: &[u8]) -> Route {
    route_utf8(shared, crate::protocol::text(sql))
}

/// Routes a statement text checked for UTF-8 (`None`: it is not, and
/// routes as a function call).
fn route_utf8(shared: &crate::Shared, text: Option<&str>) -> Route {
    match text {
        Some(text) => route_timed(shared, text, None),
        None => FUNCTION_CALL,
    }
}

/// The session's memory of the texts it routed (`ShapeMemo`), and where
/// the constants of the text routed are noted.
type Noting<'a> = (&'a mut ShapeMemo, &'a mut Vec<(usize, usize)>);

/// Routes one statement text through the shared cache (with `noting`,
/// through the session's memory of its texts first); one in
/// `ROUTE_TIMING_SAMPLE` (and the proxy's first) is timed into
/// `route_nanos`/`routes_timed`. No lock is held while the text is shaped
/// or parsed (`SharedRouter::route`).
/// With `noting`, where the text's constants are is noted.
fn route_timed(shared: &crate::Shared, text: &str, noting: Option<Noting<'_>>) -> Route {
    thread_local!(static ROUTED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) });
    let n = ROUTED.with(|c| {
        let n = c.get().wrapping_add(1);
        c.set(n);
        n
    });
    let route = |noting: Option<Noting<'_>>| match noting {
        Some((memo, c)) => memo.route_noting(&shared.router, text, c),
        None => shared.router.route(text),
    };
    // (The load is of a line written only when a route is timed.)
    if !n.is_multiple_of(ROUTE_TIMING_SAMPLE) && shared.routes_timed.load(Relaxed) > 0 {
        return route(noting);
    }
    let started = std::time::Instant::now();
    let route = route(noting);
    let nanos = started.elapsed().as_nanos() as u64;
    shared.route_nanos.fetch_add(nanos, Relaxed);
    shared.routes_timed.fetch_add(1, Relaxed);
    shared.events.routing.observe(nanos);
    route
}

impl Session {
    /// Routes a statement text checked for UTF-8 as `route_utf8` does,
    /// through the session's memory of its texts first. (A plan being
    /// made borrows the memory; nothing routes through `&self` meanwhile.)
    fn route_remembered(&self, text: Option<&str>) -> Route {
        let Some(text) = text else {
            return FUNCTION_CALL;
        };
        match self.analysis.memo.try_lock() {
            Ok(mut memo) => {
                let memo = &mut *memo;
                route_timed(
                    &self.shared,
                    text,
                    Some((&mut memo.shapes, &mut memo.constants)),
                )
            }
            Err(_) => route_timed(&self.shared, text, None),
        }
    }

    /// Routes one statement text through the session's memory of its
    /// texts and the shared cache (a large one from the routes
    /// `route_large_ahead` made).
    pub(super) fn route_text(&self, sql: &[u8]) -> Route {
        self.analysis
            .route_kept(sql)
            .cloned()
            .unwrap_or_else(|| self.route_remembered(crate::protocol::text(sql)))
    }

    /// What a simple query's own steps read of its text's route
    /// (`on_query`), taken where the unit's plan kept the route, without
    /// copying it; `utf8` gives the text as a string when it is UTF-8,
    /// checked at most once for the caller's other uses.
    pub(super) fn query_facts<'t>(
        &self,
        sql: &'t [u8],
        utf8: &mut impl FnMut() -> Option<&'t str>,
    ) -> QueryFacts {
        let of = |r: &Route| QueryFacts {
            effects: r.effects,
            session_state: r.session_state,
            cache: if self.shared.caching {
                r.cache.clone()
            } else {
                None
            },
        };
        match self.analysis.route_kept(sql) {
            Some(route) => of(route),
            None => of(&self.route_remembered(utf8())),
        }
    }

    /// Routes `sql` as `route_text` does and records it, with where its
    /// constants are when known, in `routed` (the unit's routes being
    /// planned): the route, and where `routed` keeps it (`None`: not kept).
    fn route_into(
        &self,
        routed: &mut UnitRoutes,
        memo: &mut ShapeMemo,
        sql: &[u8],
    ) -> (Route, Option<usize>) {
        let mut scratch = std::mem::take(&mut routed.scratch);
        let (route, text, known) = match self.analysis.routes.entry(sql) {
            Some((text, route, Some(c))) => {
                scratch.clear();
                scratch.extend_from_slice(c);
                (route.clone(), Some(text), true)
            }
            Some((text, route, None)) => (route.clone(), Some(text), false),
            // Never kept (longer than the buffer).
            None if sql.len() >= LARGE_STATEMENT => (self.route_text(sql), None, false),
            None => match crate::protocol::text(sql) {
                Some(text) => (
                    route_timed(&self.shared, text, Some((memo, &mut scratch))),
                    Some(text),
                    true,
                ),
                None => (FUNCTION_CALL, None, false),
            },
        };
        let kept = text.and_then(|text| routed.push(text, &route, known.then_some(&scratch[..])));
        routed.scratch = scratch;
        (route, kept)
    }

    /// Routes the large statement texts (Query, Parse) of the unit at the
    /// front of `client_in` on the blocking pool, for `route_text` to find;
    /// routes made for texts no longer there are dropped.
    pub(super) async fn route_large_ahead(&mut self) {
        if self.client_in.len() < LARGE_STATEMENT && self.analysis.large.is_empty() {
            return;
        }
        let mut texts: Vec<(usize, usize)> = Vec::new();
        let base = self.client_in.as_ptr() as usize;
        for (tag, body) in self.unit_messages() {
            let text = match tag {
                frontend::QUERY => frontend::query(body).ok(),
                frontend::PARSE => frontend::parse(body).ok().map(|p| p.query),
                _ => None,
            };
            if let Some(t) = text.filter(|t| t.len() >= LARGE_STATEMENT) {
                let start = t.as_ptr() as usize - base;
                texts.push((start, start + t.len()));
            }
        }
        let buf = &self.client_in;
        self.analysis
            .large
            .retain(|(t, _)| texts.iter().any(|&(s, e)| buf[s..e] == t[..]));
        for (s, e) in texts {
            if self
                .analysis
                .large
                .iter()
                .any(|(t, _)| self.client_in[s..e] == t[..])
            {
                continue;
            }
            let text = bytes::Bytes::copy_from_slice(&self.client_in[s..e]);
            let shared = self.shared.clone();
            let routed = text.clone();
            let route = tokio::task::spawn_blocking(move || route_bytes(&shared, &routed)).await;
            if let Ok(route) = route {
                self.analysis.large.push((text, route));
            }
        }
    }

    /// The placement of statements of `route` whose Parse definition (or
    /// simple query text) is `definition`, with a Bind's parameters (empty
    /// for a simple query).
    pub(super) fn place(
        &self,
        route: &Route,
        definition: &[u8],
        params: &[shardline_router::shards::Param<'_>],
    ) -> Placement {
        self.place_each(route, definition, params)
            .into_iter()
            .reduce(combine)
            .unwrap_or(Placement::Anywhere)
    }

    /// The placement of each statement of a query string (one per
    /// statement the router parsed; none without sharding).
    pub(super) fn place_each(
        &self,
        route: &Route,
        definition: &[u8],
        params: &[shardline_router::shards::Param<'_>],
    ) -> Placements {
        let (query, types) = frontend::definition_parts(definition);
        let input = (query, &types[..], None);
        self.place_each_in(&self.analysis.routes, route, input, params, None)
    }

    /// `place_each`, reading constants `routes` noted for the text, and
    /// noting in `routes` the keys the statements are placed by.
    fn place_noting(
        &self,
        routes: &mut UnitRoutes,
        route: &Route,
        query: ToPlace<'_>,
        params: &[shardline_router::shards::Param<'_>],
    ) -> Placements {
        let mut keys = std::mem::take(&mut routes.keys);
        let placed = self.place_each_in(routes, route, query, params, Some(&mut keys));
        routes.keys = keys;
        placed
    }

    /// The unit planned last runs now: the keys it was placed by count in
    /// the hot-key report (once: they are let go).
    pub(super) fn count_keys(&mut self) {
        if let Some(hot) = &self.shared.hot_keys {
            if !self.analysis.routes.keys.is_empty() {
                // When the unit arrived (the meter's clock read, not
                // another).
                let at = self
                    .meter
                    .unit_started()
                    .unwrap_or_else(crate::clock::Mono::now);
                let client = u64::from(self.client.info.peer.port());
                hot.record(at, client, &self.analysis.routes.keys);
                self.analysis.routes.keys.clear();
            }
        }
    }

    /// `place_each`, reading constants `routes` noted for the text (and
    /// noting keys in `seen`): the text, its declared parameter types, and
    /// where `routes` keeps it when the caller knows (else looked up).
    fn place_each_in(
        &self,
        routes: &UnitRoutes,
        route: &Route,
        (query, param_types, kept): ToPlace<'_>,
        params: &[shardline_router::shards::Param<'_>],
        mut seen: Option<&mut Vec<shardline_router::shards::KeySeen>>,
    ) -> Placements {
        let (Some(sh), Some(templates)) = (&self.shared.sharding, &route.shards) else {
            return Placements::new();
        };
        // A key read from a parameter needs no text. Else: the unit's plan
        // routed this text, kept as a string with where the shape found its
        // constants.
        let from_params = matches!(
            route.one_key,
            Some(shardline_router::shards::OneKey {
                src: shardline_router::shards::KeySrc::Param { .. },
                ..
            })
        );
        let found = match kept {
            _ if from_params => None,
            Some(i) => routes.at(i),
            None => routes
                .entry(query)
                .map(|(text, _, constants)| (text, constants)),
        };
        // (Not kept: checked as UTF-8 only if a key is read from a constant.)
        let (sql, constants) = match found {
            Some((text, constants)) => (SqlText::Str(text), constants),
            None => (SqlText::Bytes(query), None),
        };
        let input = KeyInput {
            sql,
            params,
            param_types,
            session_shard: self.session_shard.as_deref(),
            session_key: self.session_key.as_deref(),
            constants,
        };
        if let Some(k) = &route.one_key {
            // The usual statement: one key's shard.
            if let Some(shard) = shard_by_key(k, sh, &input, seen.as_deref_mut()) {
                debug_assert_eq!(
                    Placement::One(shard),
                    resolve(&templates[0], sh, &input),
                    "one key places as the general path"
                );
                return smallvec::smallvec![Placement::One(shard)];
            }
        }
        match seen {
            Some(seen) => templates
                .iter()
                .map(|t| {
                    self.cursor_place(t)
                        .unwrap_or_else(|| resolve_noting(t, sh, &input, seen))
                })
                .collect(),
            None => templates
                .iter()
                .map(|t| {
                    self.cursor_place(t)
                        .unwrap_or_else(|| resolve(t, sh, &input))
                })
                .collect(),
        }
    }

    /// A FETCH, MOVE or CLOSE of a cursor this transaction declared: the
    /// shard it was declared on (in a transaction on several shards the
    /// attached one may be another).
    fn cursor_place(&self, t: &shardline_router::shards::Template) -> Option<Placement> {
        let Some(shardline_router::shards::CursorName::Reads(name)) = &t.cursor_name else {
            return None;
        };
        let (_, shard) = self.spanning.cursors.iter().find(|(c, _)| c == name)?;
        Some(Placement::One(*shard))
    }

    /// A statement `route` ran on the attached server: a cursor it
    /// declares is remembered with that server's shard.
    pub(super) fn note_cursor(&mut self, route: &Route) {
        let Some(templates) = &route.shards else {
            return;
        };
        let Some(shard) = self.attached_shard() else {
            return;
        };
        for t in templates.iter() {
            if let Some(shardline_router::shards::CursorName::Declares(name)) = &t.cursor_name {
                self.spanning.cursors.retain(|(c, _)| c != name);
                self.spanning.cursors.push((name.clone(), shard));
            }
        }
    }

    /// The route and Parse definition of a statement the session holds
    /// (the unnamed one for an empty name).
    pub(super) fn session_statement(&self, name: &[u8]) -> Option<(Route, &[u8])> {
        if name.is_empty() {
            self.unnamed
                .as_ref()
                .map(|u| (u.route.clone(), &u.definition[..]))
        } else {
            self.statements
                .get(name)
                .map(|s| (s.route.clone(), &s.definition[..]))
        }
    }

    /// The complete messages of the unit at the front of `client_in`
    /// (`protocol::unit_messages`).
    pub(super) fn unit_messages(&self) -> impl Iterator<Item = (u8, &[u8])> {
        crate::protocol::unit_messages(&self.client_in, self.shared.max_message_size)
    }

    /// Whether a unit on one shard that asked for results before its Sync
    /// runs as a pipeline, which later parts may take to other shards:
    /// with several shards, under transaction pooling, when it holds only
    /// reads and writes; outside a transaction, when no connection is kept
    /// for the client; inside one, when other shards may join it (two-phase
    /// commit: `may_join`). Transaction control, settings and session
    /// state stay on the connection they began on. (Reads alone outside a
    /// transaction run outside the proxy's, each leg on a replica while its
    /// primary is down, as a cursor read at a Flush on one connection
    /// does: `run_fanout`.)
    fn runs_as_pipeline(&self, routes: &[Route]) -> bool {
        let in_txn =
            self.txn.has_begin() || self.server.as_ref().is_some_and(|s| s.tx_status != b'I');
        self.shared
            .sharding
            .as_ref()
            .is_some_and(|sh| sh.shard_count() > 1)
            && self.mode() == PoolMode::Transaction
            && if in_txn {
                self.may_join()
            } else {
                self.server.is_none()
            }
            && plain(routes)
    }

    /// Decides where the unit at the front of `client_in` runs, from the
    /// messages buffered so far (up to its Sync).
    pub(super) fn plan_unit(&mut self) -> Planned {
        // Asked several times per unit (before borrowing, then whether the
        // unit fits the connection, ...): planned once.
        let begin = self.txn.has_begin();
        if let Some(planned) = self.analysis.planned(&self.client_in, begin) {
            return planned.clone();
        }
        // Filled while planning (the previous plan's routes still answer
        // meanwhile: a unit is planned again after each event), then kept
        // for the unit's later steps; the two buffers swap.
        let mut routed = self.analysis.start();
        let mut memo = std::mem::take(&mut self.analysis.memo_mut().shapes);
        let planned = if self.shared.caching {
            let mut written = std::mem::take(&mut self.cache_writes);
            let planned = self.plan_unit_now(&mut routed, &mut memo, Some(&mut written));
            self.cache_writes = written;
            planned
        } else {
            self.plan_unit_now(&mut routed, &mut memo, None)
        };
        self.analysis.memo_mut().shapes = memo;
        self.analysis
            .keep(&self.client_in, begin, routed, planned.clone());
        planned
    }

    /// Plans the unit at the front of `client_in`; `routed` gets each
    /// statement text routed, with its route.
    /// With the result cache on, `written` gathers the tables the unit's
    /// statements write.
    fn plan_unit_now(
        &self,
        routed: &mut UnitRoutes,
        memo: &mut ShapeMemo,
        written: Option<&mut super::cached::Written>,
    ) -> Planned {
        let sharded = self.shared.sharding.is_some();
        if self.mode() == PoolMode::Session && !sharded {
            // The connection is the client's for the whole session.
            return Planned {
                plan: UnitPlan::Run {
                    target: match self.session_role {
                        Some(shardline_router::RoleHint::Replica) => Target::Replica,
                        _ => Target::Primary,
                    },
                    writes: false,
                },
                place: match self.session_shard.as_deref().map(|s| {
                    self.shared
                        .sharding
                        .as_ref()
                        .and_then(|sh| sh.shard_index(s))
                }) {
                    Some(Some(i)) => Placement::One(i),
                    _ => Placement::Anywhere,
                },
                complete: true,
                reads_only: false,
                begins_reading: false,
                executes: true,
            };
        }
        // A unit's few routes on the stack: planning allocates nothing.
        let mut routes: smallvec::SmallVec<[Route; 4]> = smallvec::SmallVec::new();
        let mut place = Placement::Anywhere;
        let (mut complete, mut simple_single, mut lone_end) = (false, false, None);
        let mut statements = UnitStatements::default();
        let mut executes = false;
        // Each Bind's own placement, for a pipeline over several shards.
        let mut binds = Placements::new();
        // Named portals bound to a statement over several shards and not
        // yet executed to their last row in this unit (`cursor_refusal`).
        let mut spread_portals: smallvec::SmallVec<[&[u8]; 2]> = smallvec::SmallVec::new();
        let mut fetched_in_batches = false;
        let mut unnamed = Portal::OneShard;
        let mut refetched = false;
        let mut prepared_to_flush = false;
        // An extended unit that executes one BEGIN and nothing else
        // (pgbench's extended and prepared modes send BEGIN so): the Binds
        // and Executes seen, whether a Bind's statement is a BEGIN, and any
        // message besides Parse, Bind, Describe, Execute and Sync.
        let (mut bound, mut executed, mut binds_begin, mut other) = (0u8, 0u8, false, false);
        // With the BEGIN held: what a Bind of a lone COMMIT or ROLLBACK
        // ends the transaction with (nothing ran: answered by the proxy).
        let mut binds_end = None;
        // A Flush after something ran: the client asks for results before
        // its Sync.
        let mut flushed = false;
        // The unit begins a transaction that, so far, only reads: a query
        // string `BEGIN; SELECT ...`, or Binds of a BEGIN, then of reads
        // (PgJDBC with autocommit off sends its BEGIN so, with the first
        // statement). While the primary is down it may begin on a replica,
        // as a held BEGIN's first read does (`Planned::begins_reading`).
        let mut begins_reading = false;
        let mut begin_then_reads: Option<bool> = None;
        // A Query, Bind, Execute or FunctionCall runs something (set in
        // their arms): a Bind starts running its statement, so in a
        // transaction it takes the deferred BEGIN, and it is placed by its
        // parameters (a cursor's portal is bound in a unit of its own).
        for (tag, body) in self.unit_messages() {
            match tag {
                frontend::QUERY => {
                    executes = true;
                    let text = frontend::query(body).unwrap_or_default();
                    let (route, kept) = self.route_into(routed, memo, text);
                    if matches!(route.class, Class::Begin { .. }) {
                        let s = String::from_utf8_lossy(text);
                        simple_single = shardline_router::lexer::split_statements(&s).len() == 1;
                        // A BEGIN with the statements of its transaction,
                        // which only read (`classify::reading_transaction`;
                        // or set).
                        begins_reading = route.class == (Class::Begin { read_only: false })
                            && !simple_single
                            && !standby_refuses(text);
                    }
                    if self.txn.has_begin() {
                        lone_end = crate::protocol::text(text).and_then(lone_transaction_end);
                    }
                    if sharded {
                        let each = self.place_noting(routed, &route, (text, &[], kept), &[]);
                        place = each.iter().cloned().fold(place, combine);
                        // Statements of one query string on different
                        // shards, each on one.
                        binds = each;
                    }
                    routes.push(route);
                    complete = true;
                    break;
                }
                frontend::PARSE => {
                    if let Ok(p) = frontend::parse(body) {
                        // A name taken fails the Parse (42P05): not a
                        // BEGIN the proxy may answer.
                        other |= !p.name.is_empty() && self.statements.contains_key(p.name);
                        let (route, _) = self.route_into(routed, memo, p.query);
                        statements.parse(&p, route.clone());
                        routes.push(route);
                    }
                }
                frontend::BIND => {
                    executes = true;
                    bound = bound.saturating_add(1);
                    if let Ok(b) = frontend::bind(body) {
                        // An unknown statement fails on any node.
                        if let Some((route, definition)) = statements.bound(self, b.statement) {
                            binds_begin = matches!(route.class, Class::Begin { .. });
                            begin_then_reads = Some(match begin_then_reads {
                                None => {
                                    route.class == (Class::Begin { read_only: false })
                                        && !standby_refuses(definition_query(definition))
                                }
                                Some(so_far) => so_far && route.class == Class::Read,
                            });
                            if route.class == Class::TransactionControl && self.txn.has_begin() {
                                binds_end = crate::protocol::text(definition_query(definition))
                                    .and_then(lone_transaction_end);
                            }
                            if sharded {
                                let params = frontend::bind_params(b.rest).unwrap_or_default();
                                let (query, types) = frontend::definition_parts(definition);
                                let mut each = self.place_noting(
                                    routed,
                                    &route,
                                    (query, &types, None),
                                    &params,
                                );
                                // (One statement, the usual case: its own.)
                                let here = match each.len() {
                                    0 | 1 => each.pop().unwrap_or(Placement::Anywhere),
                                    _ => each.into_iter().fold(Placement::Anywhere, combine),
                                };
                                let several = matches!(
                                    here,
                                    Placement::Many(_)
                                        | Placement::Merge(_)
                                        | Placement::Split(_)
                                        | Placement::CopySplit(_)
                                );
                                if b.portal.is_empty() {
                                    unnamed = if several {
                                        Portal::Spread
                                    } else {
                                        Portal::OneShard
                                    };
                                } else if several {
                                    spread_portals.push(b.portal);
                                }
                                binds.push(here.clone());
                                place = combine(place, here);
                            }
                            routes.push(route);
                        }
                    }
                }
                frontend::EXECUTE if !spread_portals.is_empty() || unnamed != Portal::OneShard => {
                    executes = true;
                    executed = executed.saturating_add(1);
                    if let Ok((portal, max_rows)) = frontend::execute(body) {
                        if portal.is_empty() {
                            // The shards' rows past a row limit are dropped
                            // (`lockstep::RowLimits`): the portal cannot be
                            // executed again for the rest.
                            match unnamed {
                                Portal::Fetched => refetched = true,
                                Portal::Spread if max_rows > 0 => unnamed = Portal::Fetched,
                                _ => {}
                            }
                        } else if let Some(i) = spread_portals.iter().position(|p| *p == portal) {
                            if max_rows > 0 {
                                fetched_in_batches = true;
                            } else {
                                spread_portals.swap_remove(i);
                            }
                        }
                    }
                }
                frontend::EXECUTE => {
                    executes = true;
                    executed = executed.saturating_add(1);
                }
                frontend::FUNCTION_CALL => {
                    executes = true;
                    routes.push(FUNCTION_CALL);
                    complete = true;
                    break;
                }
                frontend::SYNC => {
                    complete = true;
                    break;
                }
                frontend::FLUSH if !executes && !routes.is_empty() && self.splits_at_flush() => {
                    // The proxy ends the server's unit here
                    // (`prepare_only_segment`): planned as a unit that
                    // only prepares, whatever follows.
                    prepared_to_flush = true;
                    break;
                }
                frontend::FLUSH => {
                    flushed |= executes;
                    other = true;
                }
                frontend::DESCRIBE => {}
                _ => other = true,
            }
        }
        if complete && !other && bound == 1 && executed == 1 {
            // One BEGIN executed by the extended protocol: held as a
            // simple query's would be (`defer_begin`); one COMMIT or
            // ROLLBACK of a transaction still held, answered as a simple
            // one is (`end_empty`).
            simple_single |= binds_begin;
            lone_end = lone_end.or(binds_end);
        }
        if matches!(place, Placement::Refused(_)) {
            // Executions of one pipeline (or statements of one query string)
            // on different shards, each on its own: run once the Sync is
            // here, or a Flush asks for results before it.
            if let Some(mask) = shardline_router::shards::pipeline_shards(&binds) {
                // (At a Flush its later messages run on the same shards,
                // `pipeline.rs`.)
                place = if complete || flushed {
                    Placement::Pipeline(mask)
                } else {
                    Placement::refused(shardline_router::shards::Refusal::unsupported(
                        shardline_router::shards::Construct::Batch,
                        "a pipeline whose executions need different shards runs once its Sync or a Flush arrives: send them within 1 MiB of messages",
                    ))
                };
            } else {
                place = shardline_router::shards::batch_refusal(&binds, place);
            }
        }
        let reads_only = !routes.is_empty() && routes.iter().all(|r| r.class == Class::Read);
        begins_reading |= begin_then_reads == Some(true) && bound > 1;
        if flushed && !complete && self.runs_as_pipeline(&routes) {
            // Asked for results before its Sync: run as a pipeline
            // (`pipeline.rs`), so that a later part may need another shard
            // (psycopg's pipeline mode fetching each result), joining it
            // then. A first part that may run anywhere (no sharded table)
            // runs where the transaction is, or on the default shard while
            // a node of it is up (else on one connection wherever one can
            // serve it: `serving_shard`).
            let first = match place {
                Placement::One(s) => Some(s),
                Placement::Anywhere => self.attached_shard().or_else(|| {
                    let d = self.shard_for(&place)?;
                    let nodes = &self.shared.topology.shards[d].nodes;
                    nodes.iter().any(|n| !n.is_down()).then_some(d)
                }),
                _ => None,
            };
            // A transaction whose first part only reads, on a shard whose
            // primary is down, begins on a replica as on one connection
            // (read-only there, `UnitFacts::deferred_begin`): the
            // pipeline's legs would be the transaction's, on primaries.
            let on_replica = |s: usize| {
                self.server.is_none()
                    && self.txn.has_begin()
                    && reads_only
                    && self.shared.topology.shards[s].writer().is_err()
            };
            if let Some(s) = first.filter(|&s| !on_replica(s)) {
                place = Placement::Pipeline(shardline_router::sharding::mask_of(s));
            }
        }
        if fetched_in_batches || !spread_portals.is_empty() {
            // A portal left open on several shards' connections would be
            // fetched from one of them later. (A unit not complete yet is
            // run only when it acts, on a Flush: a portal over several
            // shards then waits for an Execute that cannot be merged.)
            place = cursor_refusal();
        }
        if refetched {
            place = refetch_refusal();
        }
        if matches!(place, Placement::Pipeline(_)) {
            // Its executor sends each execution where it was placed here.
            routed.parts = binds;
        }
        if let Some(written) = written {
            for r in &routes {
                written.note(r.cache_use());
            }
        }
        if self.mode() == PoolMode::Session {
            // The connection is the client's for the whole session.
            let plan = UnitPlan::Run {
                target: match self.session_role {
                    Some(shardline_router::RoleHint::Replica) => Target::Replica,
                    _ => Target::Primary,
                },
                writes: false,
            };
            return Planned {
                plan,
                place,
                complete,
                reads_only: false,
                begins_reading: false,
                executes: true,
            };
        }
        let plan = plan_unit(&UnitFacts {
            routes: &routes,
            simple_single,
            complete: complete || prepared_to_flush,
            deferred_begin: self.txn.begin().map(|b| self.begin_access(b)),
            sharded,
            lone_end,
            session_role: self.session_role,
            executes,
        });
        Planned {
            plan,
            place,
            complete,
            reads_only,
            begins_reading,
            // Until its Sync, the rest of the unit may still execute
            // (unless a Flush ends the part that prepares).
            executes: executes || !(complete || prepared_to_flush),
        }
    }

    /// Whether the BEGIN held (a Query message) opens a READ ONLY
    /// transaction.
    fn begin_access(&self, begin: &[u8]) -> shardline_router::Access {
        let text = begin.get(5..).and_then(|b| frontend::query(b).ok());
        match text.map(|t| self.route_text(t).class) {
            Some(Class::Begin { read_only: true }) => shardline_router::Access::ReadOnly,
            _ => shardline_router::Access::ReadWrite,
        }
    }

    /// The shard a single-shard placement runs on (`None`: several).
    pub(super) fn shard_for(&self, place: &Placement) -> Option<usize> {
        let default = self.shared.sharding.as_ref().map_or(0, |s| s.default_shard);
        match place {
            Placement::Anywhere => Some(default),
            Placement::One(s) => Some(*s),
            Placement::Spread => {
                let n = self.shared.topology.shards.len() as u64;
                Some((self.shared.spread.fetch_add(1, Relaxed) % n.max(1)) as usize)
            }
            _ => None,
        }
    }

    /// Borrows a server connection for the next unit, on the node `target`
    /// calls for. A read that cannot reach its node tries another.
    /// `read`: the unit only reads (so far), so an unavailable primary
    /// sends it to a replica. `again`: the unit only reads whatever its
    /// target (a transaction sent with its reads), so it may run again
    /// elsewhere as a replica's read may.
    pub(super) async fn attach_server(
        &mut self,
        target: Target,
        writes: bool,
        (read, again): (bool, bool),
        shard_index: usize,
    ) -> Result<(), PgError> {
        let mut tried = self.rerun.tried;
        let borrowed = self.borrow(shard_index, target, read, &mut tried).await;
        self.rerun.tried = tried;
        let (conn, node, placed) = borrowed?;
        // A replica writes nothing (a write that comes fails there).
        let writes = writes && placed == Target::Primary;
        self.fill_on(placed);
        self.meter.place(crate::stats::Kind::One {
            shard: shard_index as u16,
            node: node.min(u8::MAX as usize) as u8,
            replica: placed == Target::Replica,
        });
        // A read may be sent again elsewhere until an answer reaches the
        // client; so may one that read-your-writes placed on the primary
        // (a replica that has the user's writes can serve it), and a
        // transaction sent with its reads (its primary lost, a replica).
        if (target == Target::Replica || again) && conn.tx_status == b'I' {
            self.rerun.keep(self.meter.mark(&self.client_out));
        }
        self.finish_attach(
            placed,
            writes,
            Placed {
                shard: shard_index,
                node,
                conn,
            },
        );
        Ok(())
    }

    /// Borrows a connection on shard `shard_index` for `target`, banning
    /// and skipping unreachable readers (`tried`: nodes that failed for
    /// this unit). Returns the connection, its node and the target it
    /// serves (a read may fall back to the primary). `read`: what is sent
    /// only reads (a replica target, or the primary for a unit whose rest
    /// may write): an unavailable primary sends it to a replica.
    pub(super) async fn borrow(
        &self,
        shard_index: usize,
        target: Target,
        read: bool,
        tried: &mut u64,
    ) -> Result<(crate::pool::PooledConnection, usize, Target), PgError> {
        let shared = &self.shared;
        let user = &self.login.user;
        let shard = &shared.topology.shards[shard_index];
        let pools = &user.pools.shards[shard_index];
        let lb = &shared.balancing;
        let read = read || target == Target::Replica;
        let mut target = target;
        if read && self.fill.is_some() {
            // A result cache fill reads the primary; still a read, so an
            // unavailable primary sends it to a replica (and it is not kept).
            target = Target::Primary;
        }
        if target == Target::Replica
            && shard.nodes.len() == 1
            && shard.nodes[0].role() == crate::health::Role::Primary
            && !lb.primary_reads
            && lb.fallback_to_primary
        {
            // No replica to choose (a shard of one node, its primary):
            // where the reader's search would end, without it.
            target = Target::Primary;
        }
        let ryw = &user.ryw[shard_index];
        let primary_until = ryw.primary_until.load(Relaxed);
        if target == Target::Replica
            && lb.read_your_writes != ReadYourWrites::Off
            && ((primary_until > 0 && now_ms() < primary_until)
                || ryw
                    .positions_pending
                    .load(std::sync::atomic::Ordering::SeqCst)
                    > 0)
        {
            tracing::trace!(
                primary_until,
                pending = ryw.positions_pending.load(Relaxed),
                "read to the primary: a write's position is pending"
            );
            target = Target::Primary;
        }
        loop {
            let node = match target {
                Target::Primary => {
                    let w = match shard.writer() {
                        Ok(w) if read && *tried & bit(w) != 0 => {
                            // The read failed on the primary: a replica.
                            return self.replica_past_writes(shard_index, tried).await;
                        }
                        Ok(w) => w,
                        Err(e) if read && e.code == sqlstate::CONNECTION_FAILURE => {
                            return self.replica_past_writes(shard_index, tried).await;
                        }
                        Err(e) => return Err(e),
                    };
                    if *tried & bit(w) != 0 {
                        return Err(PgError::error(
                            sqlstate::CONNECTION_FAILURE,
                            format!(
                                "shard {}: no node could serve the query (last tried: {})",
                                shard.name, shard.nodes[w].address
                            ),
                        ));
                    }
                    w
                }
                Target::Replica => {
                    let in_use = |i: usize| pools.nodes[i].in_use();
                    let req = ReadRequest {
                        strategy: lb.strategy,
                        zone: lb.zone.as_deref(),
                        client: self.client_hash,
                        min_lsn: if lb.read_your_writes == ReadYourWrites::Lsn {
                            ryw.lsn.load(Relaxed)
                        } else {
                            0
                        },
                        exclude: *tried,
                        primary_reads: lb.primary_reads,
                        in_use: &in_use,
                    };
                    let chosen = match shard.reader(&req) {
                        Some(i) => Some(i),
                        // Behind the user's last write as last seen: wait
                        // briefly for a replica to replay it.
                        None => shard.wait_for_position(&req, lb.replica_wait).await,
                    };
                    match chosen {
                        Some(i) => i,
                        None if lb.fallback_to_primary => {
                            if req.min_lsn > 0
                                && shard.reader(&ReadRequest { min_lsn: 0, ..req }).is_some()
                            {
                                shared.events.ryw_primary_reads.fetch_add(1, Relaxed);
                            }
                            tracing::trace!(min_lsn = req.min_lsn, "read to the primary: no replica past the user's position");
                            target = Target::Primary;
                            continue;
                        }
                        None => {
                            return Err(PgError::error(
                                sqlstate::CANNOT_CONNECT_NOW,
                                format!(
                                    "shard {}: no replica is available for reads (down, banned or lagging) and replica_fallback_to_primary is off",
                                    shard.name
                                ),
                            ))
                        }
                    }
                }
            };
            // An idle connection at once (nearly every unit), else the
            // checkout that opens one or waits.
            let got = match pools.nodes[node].try_checkout() {
                Some(conn) => Ok(conn),
                None => pools.nodes[node].checkout_slow(Some(&self.client)).await,
            };
            match got {
                Ok(conn) => return Ok((conn, node, target)),
                Err(e) if unreachable(&e) => {
                    *tried |= bit(node);
                    shard.nodes[node].ban(shared.ban_time, &e.message);
                    if target == Target::Primary && read {
                        return self.replica_past_writes(shard_index, tried).await;
                    }
                    if target == Target::Primary {
                        // One code for a primary that cannot be used, however
                        // it failed (refused, shutting down, lost): 08006,
                        // as when the checker has already marked it down.
                        return Err(PgError {
                            code: sqlstate::CONNECTION_FAILURE.into(),
                            message: format!(
                                "shard {}: primary {} is unavailable ({}); writes fail until it is back or a replica is promoted",
                                shard.name, shard.nodes[node].address, e.message
                            ),
                            ..e
                        });
                    }
                }
                Err(e) if e.code == sqlstate::TOO_MANY_CONNECTIONS && self.mode() == PoolMode::Session => {
                    return Err(e.with_hint(
                        "each session-pooled client holds a server connection for its whole session: raise pool_size, close idle clients, or use transaction pooling",
                    ))
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A read whose primary is unavailable (down, unreachable, or it failed
    /// there): a replica that has replayed past the user's writes on this
    /// shard. Replicas' positions as of the last health check may be stale,
    /// so each is asked its replay position directly; commits of the user's
    /// whose position is still being asked (`positions_pending`) are waited
    /// for. The primary is taken instead as soon as one answers again (the
    /// lost one back, or a promoted replica). Gives up after
    /// `health.interval + 2 × health.timeout` (the time a lost primary
    /// takes to be noticed and its connections cut) with `57P03`, a read
    /// error naming the shard.
    async fn replica_past_writes(
        &self,
        shard_index: usize,
        tried: &mut u64,
    ) -> Result<(crate::pool::PooledConnection, usize, Target), PgError> {
        let shared = self.shared.clone();
        let user = self.login.user.clone();
        let shard = &shared.topology.shards[shard_index];
        let pools = &user.pools.shards[shard_index];
        let lb = &shared.balancing;
        let ryw = &user.ryw[shard_index];
        let wait = shared.health.interval + 2 * shared.health.timeout;
        let deadline = crate::timer::Instant::now() + wait;
        let mut why = "no replica is up";
        loop {
            // The primary answers again, or a replica was promoted: it has
            // every write, so the read goes there.
            if let Some(w) = shard.writer().ok().filter(|&w| *tried & bit(w) == 0) {
                match pools.nodes[w].checkout(Some(&self.client)).await {
                    Ok(conn) => return Ok((conn, w, Target::Primary)),
                    Err(e) if unreachable(&e) => {
                        *tried |= bit(w);
                        shard.nodes[w].ban(shared.ban_time, &e.message);
                    }
                    Err(e) => return Err(e),
                }
            }
            let pending = ryw
                .positions_pending
                .load(std::sync::atomic::Ordering::SeqCst)
                > 0;
            let unknown = match lb.read_your_writes {
                ReadYourWrites::Off => false,
                _ => now_ms() < ryw.primary_until.load(Relaxed),
            };
            let need = match lb.read_your_writes {
                ReadYourWrites::Lsn => ryw.lsn.load(Relaxed),
                _ => 0,
            };
            if pending {
                why = "a commit's position is still being asked";
            } else if unknown {
                why = "the position of the user's last write is unknown";
            } else {
                // Known to be far enough: the balancing strategy's choice;
                // else every replica up, asked.
                let mut candidates: Vec<usize> = {
                    let in_use = |i: usize| pools.nodes[i].in_use();
                    let req = ReadRequest {
                        strategy: lb.strategy,
                        zone: lb.zone.as_deref(),
                        client: self.client_hash,
                        min_lsn: need,
                        exclude: *tried,
                        primary_reads: false,
                        in_use: &in_use,
                    };
                    shard.reader(&req).into_iter().collect()
                };
                let chosen = candidates.first().copied();
                candidates.extend(
                    (0..shard.nodes.len())
                        .filter(|&i| Some(i) != chosen && usable_replica(shard, i, *tried)),
                );
                if !candidates.is_empty() {
                    why = "no replica has replayed the user's last write yet";
                }
                for (k, i) in candidates.into_iter().enumerate() {
                    let mut conn = match pools.nodes[i].checkout(Some(&self.client)).await {
                        Ok(c) => c,
                        Err(e) if unreachable(&e) => {
                            *tried |= bit(i);
                            shard.nodes[i].ban(shared.ban_time, &e.message);
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    if k == 0 && shard.nodes[i].lsn() >= need {
                        return Ok((conn, i, Target::Replica));
                    }
                    let replayed = conn
                        .simple_query("SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint")
                        .await
                        .ok()
                        .and_then(|(rows, _)| rows.first().cloned())
                        .and_then(|r| r.first().cloned().flatten())
                        .and_then(|v| v.parse::<u64>().ok());
                    if replayed.is_some_and(|lsn| lsn >= need) {
                        return Ok((conn, i, Target::Replica));
                    }
                    conn.give_back();
                }
            }
            if crate::timer::Instant::now() >= deadline {
                let message = if candidates_up(shard, *tried) {
                    format!(
                        "shard {}: the primary is unavailable and no replica can serve this read ({why}) after {wait:?}; read-your-writes keeps the user's reads on nodes that have their writes",
                        shard.name
                    )
                } else {
                    // Nothing to do with the user's writes: the shard is out.
                    format!(
                        "shard {}: the primary is unavailable and no replica is up (waited {wait:?} for one of them)",
                        shard.name
                    )
                };
                return Err(PgError::error(sqlstate::CANNOT_CONNECT_NOW, message));
            }
            crate::timer::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Queues the session's replay and deferred BEGIN on a newly borrowed
    /// connection and attaches it.
    fn finish_attach(&mut self, target: Target, writes: bool, mut conn: Placed) {
        if *conn.vars != *self.vars {
            let sql = self.vars.replay_sql(&conn.vars);
            if !sql.is_empty() {
                frontend::write_query(&mut self.server_out, &sql);
                // The replay drops the connection's unnamed statement.
                conn.unnamed_token = 0;
                self.pending.push_back(Pending::swallow(Kind::Query {
                    effects: Default::default(),
                }));
            }
            conn.vars = self.vars.clone();
        }
        // A deferred BEGIN goes out with the first unit that runs something
        // (`client.rs`), not with one that only prepares a statement.
        self.client.attach(conn.addr.clone(), conn.pid, conn.secret);
        // Set by the first statement the unit runs (`client.rs`): a unit
        // that only prepares writes nothing, and waits for no position.
        self.wrote = false;
        self.purpose = Purpose::of(
            target == Target::Replica && self.mode() == PoolMode::Transaction,
            writes,
        );
        self.server = Some(conn);
    }

    /// A lone BEGIN: answered now, sent with the transaction's first statement.
    pub(super) fn defer_begin(&mut self) -> Result<(), super::End> {
        if self.client_in.first() != Some(&frontend::QUERY) {
            return self.defer_extended_begin();
        }
        let Some(frame) =
            crate::protocol::next_frame(&mut self.client_in, usize::MAX).map_err(|e| {
                super::End::Fatal(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()))
            })?
        else {
            return Ok(());
        };
        self.txn.set_begin(frame.bytes);
        backend::command_complete(&mut self.client_out, "BEGIN");
        backend::ready_for_query(&mut self.client_out, b'T');
        Ok(())
    }

    /// A BEGIN by the extended protocol, alone in its unit (Parse, Bind,
    /// Describe, Execute, Sync; the Parse left out for a statement
    /// prepared before): held as the one opening a longer unit is
    /// (`hold_extended_begin`), its Sync answered.
    fn defer_extended_begin(&mut self) -> Result<(), super::End> {
        let frames = self.take_unit()?;
        self.hold_extended_begin(&frames)?;
        backend::ready_for_query(&mut self.client_out, b'T');
        Ok(())
    }

    /// COMMIT or ROLLBACK of a transaction that never reached a server.
    pub(super) fn end_empty(&mut self, tag: &'static str) -> Result<(), super::End> {
        let frames = self.take_unit()?;
        self.txn = super::txn::Txn::Plain;
        self.answer_alone(&frames, tag)?;
        backend::ready_for_query(&mut self.client_out, b'I');
        Ok(())
    }

    /// After a unit that may have written: remember where the primary's WAL
    /// was once it committed (`lsn`) or when it did (`primary_window`).
    /// Returns true when a position query was queued (release waits for it).
    pub(super) fn after_write(&mut self) -> bool {
        if !std::mem::take(&mut self.wrote) {
            return false;
        }
        let Some(shard) = self.attached_shard() else {
            return false;
        };
        match self.shared.balancing.read_your_writes {
            ReadYourWrites::Off => false,
            ReadYourWrites::PrimaryWindow => {
                let until = now_ms() + self.shared.balancing.primary_window.as_millis() as u64;
                self.login.user.ryw[shard]
                    .primary_until
                    .fetch_max(until, Relaxed);
                false
            }
            ReadYourWrites::Lsn => {
                let Some(probe) = self
                    .position_pending
                    .take()
                    .or_else(|| self.position_guard())
                else {
                    return false;
                };
                // The insert position covers the commit record even when
                // synchronous_commit = off has not written it yet.
                self.send_own_query(WAL_POSITION_SQL);
                self.pending
                    .push_back(Pending::swallow(Kind::LsnProbe(probe)));
                true
            }
        }
    }

    /// Whether a write on `shard` has its WAL position learned: `lsn`
    /// read-your-writes, and the shard has replicas to read from (a shard
    /// that is its primary alone serves every read from it: nothing to wait
    /// for, no position query).
    pub(super) fn learns_positions(&self, shard: usize) -> bool {
        self.shared.balancing.read_your_writes == ReadYourWrites::Lsn
            && self.shared.topology.shards[shard].nodes.len() > 1
    }

    /// Whether a write on the attached connection's shard has its WAL
    /// position learned (`learns_positions`); nothing attached: no.
    pub(super) fn learns_positions_here(&self) -> bool {
        self.attached_shard()
            .is_some_and(|shard| self.learns_positions(shard))
    }

    /// Marks a commit on the attached shard whose position is to be learned
    /// (`lsn` read-your-writes only).
    pub(super) fn position_guard(&self) -> Option<crate::PositionPending> {
        let shard = self.attached_shard()?;
        self.learns_positions_here().then(|| {
            crate::PositionPending::new(self.login.user.clone(), shard, self.shared.ban_time)
        })
    }

    /// The shard of the attached server.
    pub(super) fn attached_shard(&self) -> Option<usize> {
        self.server.as_ref().map(|s| s.shard)
    }

    /// At the end of a session: waits for the answers to position queries
    /// still in flight (the client had its reply and left), so the user's
    /// other connections read past the commit from replicas again.
    pub(super) async fn finish_positions(&mut self) {
        use tokio::io::AsyncWriteExt;
        if self.wrote && self.pending.is_empty() && self.server.is_some() && !self.unit.is_open() {
            // Left before the connection was released.
            if self.server.as_ref().is_some_and(|s| s.tx_status == b'I') {
                self.after_write();
            }
        }
        while matches!(self.pending.front(), Some(p) if matches!(p.kind, Kind::LsnProbe(_))) {
            let Some(conn) = self.server.as_mut() else {
                return;
            };
            if !self.server_out.is_empty() {
                if conn.writer().write_all(&self.server_out).await.is_err() {
                    return;
                }
                self.server_out.clear();
            }
            let Ok(msg) = conn.raw_message().await else {
                return;
            };
            if self.on_server_message(msg[0], &msg).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::plain;

    #[test]
    fn only_plain_reads_and_writes_run_as_a_pipeline_at_a_flush() {
        let mut router = shardline_router::Router::new(Default::default(), 16, None);
        let mut routes =
            |texts: &[&str]| -> Vec<_> { texts.iter().map(|t| router.route(t)).collect() };
        let insert = "INSERT INTO users (id, name) VALUES ($1, $2) RETURNING id";
        let select = "SELECT name FROM users WHERE id = $1";
        assert!(plain(&routes(&[insert])));
        assert!(plain(&routes(&[select, insert])));
        assert!(plain(&routes(&["UPDATE users SET name = $1", select])));
        // Reads alone too (psycopg's pipeline fetching each row by key).
        assert!(plain(&routes(&[select])));
        assert!(!plain(&routes(&[])));
        // Transaction control, settings and session state too.
        for other in [
            "BEGIN",
            "COMMIT",
            "SAVEPOINT a",
            "SET search_path = a",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "CREATE TEMP TABLE t (a int)",
            "SELECT pg_advisory_lock(1)",
            "PREPARE p AS SELECT 1",
        ] {
            assert!(!plain(&routes(&[insert, other])), "{other}");
            assert!(!plain(&routes(&[select, other])), "{other}");
        }
    }

    #[test]
    fn a_standby_refuses_read_write_and_serializable() {
        for begin in [
            "BEGIN READ WRITE",
            "begin isolation level Serializable",
            "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY",
        ] {
            assert!(super::standby_refuses(begin.as_bytes()), "{begin}");
        }
        for begin in [
            "BEGIN",
            "BEGIN READ ONLY",
            "begin isolation level repeatable read",
            "",
        ] {
            assert!(!super::standby_refuses(begin.as_bytes()), "{begin}");
        }
    }
}
