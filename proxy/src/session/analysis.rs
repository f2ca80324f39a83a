//! What the session knows of the unit at the front of the client's
//! buffer, made once per state of the buffer by `Session::plan_unit`:
//! where it runs (`Planned`: the router's plan and the statements'
//! placement), each statement text with its route and where its constants
//! are, and the sharding keys it is placed by (`UnitRoutes`). Every later
//! step of the unit (`on_query`, `on_parse`, the fan-out, the slow-query
//! log, the hot-key count) reads the unit here instead of analysing its
//! text again.

use shardline_router::shards::Placement;
use shardline_router::{Route, UnitPlan};

/// Statement texts at least this long are routed on the blocking pool
/// before their unit is planned (`route_large_ahead`): lexing and parsing
/// them would hold the worker thread, and every other session on it.
pub(super) const LARGE_STATEMENT: usize = 64 * 1024;

/// Where the next unit runs: primary or replica, and which shards.
#[derive(Clone)]
pub(super) struct Planned {
    pub plan: UnitPlan,
    pub place: Placement,
    /// Every message of the unit has arrived.
    pub complete: bool,
    /// Every statement of the unit is a read.
    pub reads_only: bool,
    /// The unit begins a transaction and its other statements only read
    /// (a query string `BEGIN; SELECT ...; COMMIT`, an extended unit of a
    /// BEGIN and reads), and its BEGIN asks for nothing a hot standby
    /// refuses: while the primary is down it begins on a replica, as the
    /// same statements sent one by one do.
    pub begins_reading: bool,
    /// The unit runs something (a query, an Execute, a function call), not
    /// only Parse/Describe/Close.
    pub executes: bool,
}

/// Whether two statement texts are the same. Texts of one shape, and of
/// one length, differ mostly in their constants, toward the end: their
/// last eight bytes are compared first.
fn same_text(a: &[u8], b: &[u8]) -> bool {
    let tail = |t: &[u8]| t.last_chunk::<8>().map(|c| u64::from_ne_bytes(*c));
    a.len() == b.len() && tail(a) == tail(b) && a == b
}

/// Each statement's placement, on the stack for a statement or two.
pub(super) type Placements = smallvec::SmallVec<[Placement; 2]>;

/// Where a constant is in a statement text: start and end offsets.
type Span = (usize, usize);

/// The routes of the statement texts of the unit last planned, by text
/// (a copy): the later steps of the same unit (`on_query`, `on_parse`, the
/// fan-out) find a statement's route here instead of shaping its text
/// again. Keyed by content, so a hit is right whatever happened to the
/// buffer since; `plan_unit` refills it for each unit.
///
/// With each text, where its constants are when the shape found them
/// (`SharedRouter::route_noting`): `place_each` reads a key from them
/// instead of scanning the text again.
#[derive(Default)]
pub(super) struct UnitRoutes {
    /// The texts, one after the other: only texts that are UTF-8 (the
    /// others have no route of their own to keep), so a text found here
    /// is read as a string without checking it again.
    texts: String,
    constants: Vec<Span>,
    /// Text, route, constants (none: not known).
    routes: Vec<(
        std::ops::Range<usize>,
        Route,
        Option<std::ops::Range<usize>>,
    )>,
    /// Where `Session::route_into` has the shape note a text's constants.
    pub(super) scratch: Vec<Span>,
    /// The sharding keys the unit is placed by (at most
    /// `MAX_KEYS_NOTED`), until the unit runs and they are counted.
    pub(super) keys: Vec<shardline_router::shards::KeySeen>,
    /// When the unit is a pipeline over several shards
    /// (`Placement::Pipeline`): each execution's placement, in order (a
    /// Bind's whose statement is known, or a query string's statement's),
    /// so its executor sends each where the plan put it.
    pub(super) parts: Placements,
}

impl UnitRoutes {
    /// Statements kept per unit; a longer unit's later statements are
    /// routed again (through the shared cache) when looked up.
    const MAX: usize = 32;
    /// Bytes of text kept per unit: every session holds two of these
    /// buffers for its lifetime, so a long statement (a 32 MB query) is
    /// not copied here; it is routed again when looked up.
    const MAX_BYTES: usize = 4096;

    pub(super) fn clear(&mut self) {
        self.texts.clear();
        self.constants.clear();
        self.routes.clear();
        self.keys.clear();
        self.parts.clear();
    }

    /// Keeps `text`'s route; its index, or `None` when it does not fit.
    pub(super) fn push(
        &mut self,
        text: &str,
        route: &Route,
        constants: Option<&[Span]>,
    ) -> Option<usize> {
        let fits = self.texts.len() + text.len() <= Self::MAX_BYTES
            && self.constants.len() + constants.map_or(0, <[_]>::len) <= Self::MAX_BYTES / 8;
        if self.routes.len() < Self::MAX && fits {
            let start = self.texts.len();
            // Exact: the buffers never hold more than their bounds.
            self.texts.reserve_exact(text.len());
            self.texts.push_str(text);
            let constants = constants.map(|c| {
                let first = self.constants.len();
                self.constants.reserve_exact(c.len());
                self.constants.extend_from_slice(c);
                first..self.constants.len()
            });
            self.routes
                .push((start..self.texts.len(), route.clone(), constants));
            return Some(self.routes.len() - 1);
        }
        None
    }

    /// The text kept at `i` (as `push` said) and where its constants are.
    pub(super) fn at(&self, i: usize) -> Option<(&str, Option<&[Span]>)> {
        let (r, _, c) = self.routes.get(i)?;
        Some((
            &self.texts[r.clone()],
            c.clone().map(|c| &self.constants[c]),
        ))
    }

    /// `text` as kept (a string), its route and where its constants are
    /// (when known).
    pub(super) fn entry(&self, text: &[u8]) -> Option<(&str, &Route, Option<&[Span]>)> {
        // (From the last: the text placed is most often the one just routed.)
        self.routes
            .iter()
            .rev()
            .find(|(r, ..)| same_text(&self.texts.as_bytes()[r.clone()], text))
            .map(|(r, route, c)| {
                (
                    &self.texts[r.clone()],
                    route,
                    c.clone().map(|c| &self.constants[c]),
                )
            })
    }

    pub(super) fn get(&self, text: &[u8]) -> Option<&Route> {
        self.entry(text).map(|(_, route, _)| route)
    }

    /// The statement texts kept, in order.
    pub(super) fn texts(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|(r, ..)| &self.texts[r.clone()])
    }
}

/// The analysis of the unit at the front of `client_in`, kept for the
/// buffer's start and length it was made for: between the points that
/// forget it (`Session::forget_plan`: every event, client bytes read or put
/// back, a session effect) the buffer only loses messages from its front,
/// so start and length name its content. The statements' routes outlive a
/// forgotten plan: keyed by text, they answer for the same texts while the
/// unit is planned again.
#[derive(Default)]
pub(super) struct UnitAnalysis {
    /// The buffer's start and length, and whether the client's BEGIN was
    /// held, when the plan was made (`None`: forgotten).
    made_for: Option<(usize, usize, bool)>,
    planned: Option<Planned>,
    /// The routes of the unit's statement texts and its keys.
    /// (Boxed, as `spare`: the two swap at every plan, by pointer.)
    pub(super) routes: Box<UnitRoutes>,
    /// The buffer the next plan fills; it and `routes` swap, so the
    /// previous plan's routes answer while the next is made.
    spare: Option<Box<UnitRoutes>>,
    /// Routes of the very large statement texts of the client's next unit,
    /// made on the blocking pool (`Session::route_large_ahead`).
    pub(super) large: Vec<(bytes::Bytes, Route)>,
    /// The statement texts this session routed last (`ShapeMemo`): a text
    /// that differs from one only in its constants takes its route
    /// without being shaped or looked up. Lent to `plan_unit_now` while it
    /// plans; behind a lock (never contended: one session uses it) so
    /// that routing one text through `&Session` (`Session::route_text`,
    /// `query_facts`: a statement of an open transaction, which is not
    /// planned) uses it too.
    pub(super) memo: std::sync::Mutex<Memo>,
}

/// The session's memory of its texts, and where the constants of the text
/// it last matched are (filled by the match, not read here).
#[derive(Default)]
pub(super) struct Memo {
    pub(super) shapes: shardline_router::memo::ShapeMemo,
    pub(super) constants: Vec<(usize, usize)>,
}

impl UnitAnalysis {
    /// The plan made for `buf` as it is now, if it is still known.
    pub(super) fn planned(&self, buf: &[u8], begin: bool) -> Option<&Planned> {
        let key = (buf.as_ptr() as usize, buf.len(), begin);
        self.planned.as_ref().filter(|_| self.made_for == Some(key))
    }

    /// An empty buffer for the next plan's routes (given back by `keep`).
    pub(super) fn start(&mut self) -> Box<UnitRoutes> {
        let mut routed = self.spare.take().unwrap_or_default();
        routed.clear();
        routed
    }

    /// Keeps the plan made for `buf` and the routes it made.
    pub(super) fn keep(
        &mut self,
        buf: &[u8],
        begin: bool,
        routed: Box<UnitRoutes>,
        planned: Planned,
    ) {
        self.spare = Some(std::mem::replace(&mut self.routes, routed));
        self.made_for = Some((buf.as_ptr() as usize, buf.len(), begin));
        self.planned = Some(planned);
    }

    /// Forgotten: planned again when next asked.
    pub(super) fn forget(&mut self) {
        self.made_for = None;
    }

    /// Forgets everything the router made (a reload replaced it).
    pub(super) fn reset(&mut self) {
        self.forget();
        self.routes.clear();
        self.spare = None;
        self.large.clear();
        self.memo_mut().shapes.forget();
    }

    /// The memory of texts, to change (a poisoned lock only means a panic
    /// elsewhere: the memory is still whole).
    pub(super) fn memo_mut(&mut self) -> &mut Memo {
        self.memo.get_mut().unwrap_or_else(|e| e.into_inner())
    }

    /// The route kept for `sql`: routed with the unit's plan, or ahead of
    /// it when large.
    pub(super) fn route_kept(&self, sql: &[u8]) -> Option<&Route> {
        if let Some(route) = self.routes.get(sql) {
            return Some(route);
        }
        if sql.len() >= LARGE_STATEMENT {
            if let Some((_, route)) = self.large.iter().find(|(t, _)| t[..] == *sql) {
                return Some(route);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardline_router::classify::Class;

    fn route(class: Class) -> Route {
        Route {
            class,
            source: shardline_router::classify::Source::Parsed,
            role_hint: None,
            shards: None,
            one_key: None,
            session_state: None,
            effects: false,
            cache: None,
        }
    }

    /// A unit's routes are found by text (not by where the text was), a
    /// text not routed in the unit is not found, and a long unit keeps its
    /// first `MAX` statements only.
    #[test]
    fn unit_routes_answer_by_text() {
        let mut u = UnitRoutes::default();
        u.push("SELECT 1", &route(Class::Read), Some(&[(7, 8)]));
        u.push("UPDATE t SET a = 1", &route(Class::Write), None);
        assert_eq!(
            u.entry(b"SELECT 1").map(|(text, _, c)| (text, c)),
            Some(("SELECT 1", Some(&[(7, 8)][..])))
        );
        let copy = b"SELECT 1".to_vec();
        assert_eq!(u.get(&copy).map(|r| r.class), Some(Class::Read));
        assert_eq!(
            u.get(b"UPDATE t SET a = 1").map(|r| r.class),
            Some(Class::Write)
        );
        assert!(u.get(b"SELECT 2").is_none());
        assert!(u.get(b"SELECT").is_none());
        u.clear();
        assert!(u.get(b"SELECT 1").is_none());
        for i in 0..UnitRoutes::MAX + 5 {
            u.push(&format!("SELECT {i}"), &route(Class::Read), None);
        }
        assert!(u
            .get(format!("SELECT {}", UnitRoutes::MAX - 1).as_bytes())
            .is_some());
        assert!(u
            .get(format!("SELECT {}", UnitRoutes::MAX).as_bytes())
            .is_none());
        // Long texts are not kept: the buffer stays small for the session.
        u.clear();
        let long = "x".repeat(UnitRoutes::MAX_BYTES + 1);
        u.push(&long, &route(Class::Read), None);
        assert!(u.get(long.as_bytes()).is_none());
        assert!(u.texts.capacity() <= UnitRoutes::MAX_BYTES);
    }

    /// Texts are the same only byte for byte, whatever their length
    /// (under eight bytes there is no tail to compare first).
    #[test]
    fn texts_are_compared_whole() {
        assert!(same_text(
            b"SELECT 1 FROM t WHERE id = 42",
            b"SELECT 1 FROM t WHERE id = 42"
        ));
        assert!(!same_text(
            b"SELECT 1 FROM t WHERE id = 42",
            b"SELECT 1 FROM t WHERE id = 43"
        ));
        assert!(!same_text(
            b"SELECT 2 FROM t WHERE id = 42",
            b"SELECT 1 FROM t WHERE id = 42"
        ));
        assert!(!same_text(b"SELECT 1", b"SELECT 10"));
        assert!(same_text(b"BEGIN", b"BEGIN"));
        assert!(!same_text(b"BEGIN", b"BEGIn"));
        assert!(same_text(b"", b""));
    }

    /// A plan answers only for the buffer it was made for, and not once
    /// forgotten; the routes it made answer until a reset.
    #[test]
    fn a_plan_answers_for_its_buffer_only() {
        let mut a = UnitAnalysis::default();
        let buf = b"Q....SELECT 1".to_vec();
        let planned = Planned {
            plan: UnitPlan::Run {
                target: shardline_router::Target::Replica,
                writes: false,
            },
            place: Placement::Anywhere,
            complete: true,
            reads_only: true,
            begins_reading: false,
            executes: true,
        };
        let mut routed = a.start();
        routed.push("SELECT 1", &route(Class::Read), None);
        a.keep(&buf, false, routed, planned);
        assert!(a.planned(&buf, false).is_some());
        assert!(a.planned(&buf, true).is_none(), "a BEGIN held since");
        assert!(a.planned(&buf[1..], false).is_none(), "a message taken");
        a.forget();
        assert!(a.planned(&buf, false).is_none());
        assert!(
            a.route_kept(b"SELECT 1").is_some(),
            "routes outlive the plan"
        );
        a.reset();
        assert!(a.route_kept(b"SELECT 1").is_none());
    }
}
