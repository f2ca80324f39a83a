//! Named prepared statements under transaction pooling.
//!
//! Clients name statements as they like; on servers every statement is named
//! after its definition (`_sl_<n>`, one number per distinct query text and
//! parameter types, shared by all clients). So names never collide, and a
//! statement one client prepared on a connection is reused by the next client
//! that prepares the same text. Each server connection remembers which
//! statements it holds (bounded, least recently used closed first); a client's
//! Bind or Describe on a connection that lacks the statement prepares it there
//! first.

use bytes::Bytes;
use shardline_router::effect::Effect;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// A statement definition and the name it has on every server.
#[derive(Debug)]
pub struct Statement {
    pub id: u64,
    pub server_name: Box<[u8]>,
    /// Query, NUL, parameter count and types: the Parse body after the name.
    pub definition: Bytes,
    /// What executing it does to the session (SET, RESET ...), if anything.
    pub effect: Option<Effect>,
    /// Read or write, decided once when it is first prepared.
    pub route: shardline_router::Route,
}

/// Process-wide map from definitions to server-side names. It holds its
/// statements weakly: a statement lives while a client has it prepared or a
/// server connection holds it, and is forgotten after (the map is swept of
/// dead entries whenever it has doubled since the last sweep, so it stays
/// within twice the statements in use).
#[derive(Default)]
pub struct StatementRegistry {
    map: Mutex<Registry>,
}

/// Statement ids (and so server-side names) are unique in the process, not
/// per registry: a reload builds a new registry while server connections
/// keep what the old one's statements prepared on them.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

#[derive(Default)]
struct Registry {
    by_definition: HashMap<Bytes, Weak<Statement>>,
    /// Entries after the last sweep.
    swept: usize,
}

impl StatementRegistry {
    pub fn intern(
        &self,
        definition: &[u8],
        effect: Option<Effect>,
        route: shardline_router::Route,
    ) -> Arc<Statement> {
        let mut reg = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = reg.by_definition.get(definition).and_then(Weak::upgrade) {
            return s;
        }
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed) + 1;
        let definition = Bytes::copy_from_slice(definition);
        let stmt = Arc::new(Statement {
            id,
            server_name: format!("_sl_{id}").into_bytes().into_boxed_slice(),
            definition: definition.clone(),
            effect,
            route,
        });
        reg.by_definition.insert(definition, Arc::downgrade(&stmt));
        if reg.by_definition.len() >= 2 * reg.swept.max(512) {
            reg.by_definition.retain(|_, s| s.strong_count() > 0);
            reg.by_definition.shrink_to_fit();
            reg.swept = reg.by_definition.len();
        }
        stmt
    }

    /// Statements known (some perhaps no longer in use, until the next sweep).
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.by_definition.len()).unwrap_or(0)
    }

    /// Statements some client or server connection holds.
    pub fn in_use(&self) -> usize {
        self.map
            .lock()
            .map(|m| {
                m.by_definition
                    .values()
                    .filter(|s| s.strong_count() > 0)
                    .count()
            })
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The statements one server connection holds, with least-recently-used
/// eviction (constant time per use).
pub struct ServerStatements {
    held: lru::LruCache<u64, Arc<Statement>>,
}

impl ServerStatements {
    /// Nothing is allocated until statements are held (a connection that
    /// never prepares one costs nothing).
    pub fn new(capacity: usize) -> Self {
        ServerStatements {
            held: lru::LruCache::sparse(
                std::num::NonZeroUsize::new(capacity.max(1)).expect("at least one"),
            ),
        }
    }

    /// Whether the statement is prepared here (and marks it used).
    pub fn contains(&mut self, id: u64) -> bool {
        self.held.get(&id).is_some()
    }

    /// Records a statement as prepared; returns one to close if over capacity.
    pub fn insert(&mut self, stmt: &Arc<Statement>) -> Option<Arc<Statement>> {
        match self.held.push(stmt.id, stmt.clone()) {
            Some((id, evicted)) if id != stmt.id => Some(evicted),
            _ => None,
        }
    }

    pub fn remove(&mut self, id: u64) {
        self.held.pop(&id);
    }

    pub fn clear(&mut self) {
        self.held.clear();
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read() -> shardline_router::Route {
        shardline_router::cache::route_uncached("SELECT 1", &Default::default(), None)
    }

    /// Statements nobody holds are forgotten: 100,000 distinct texts
    /// prepared and dropped one after another leave the registry within
    /// twice its sweep floor, while one still held keeps its name.
    #[test]
    fn statements_nobody_holds_are_forgotten() {
        let r = StatementRegistry::default();
        let kept = r.intern(b"SELECT 'kept'\0\0\0", None, read());
        for i in 0..100_000 {
            let text = format!("SELECT {i}\0\0\0");
            drop(r.intern(text.as_bytes(), None, read()));
        }
        assert!(r.len() <= 1024, "{} entries", r.len());
        assert_eq!(r.in_use(), 1);
        let again = r.intern(b"SELECT 'kept'\0\0\0", None, read());
        assert_eq!(again.server_name, kept.server_name);
    }

    #[test]
    fn same_definition_same_name() {
        let r = StatementRegistry::default();
        let a = r.intern(b"SELECT 1\0\0\0", None, read());
        let b = r.intern(b"SELECT 1\0\0\0", None, read());
        let c = r.intern(b"SELECT 2\0\0\0", None, read());
        assert!(Arc::ptr_eq(&a, &b));
        assert_ne!(a.server_name, c.server_name);
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn evicts_least_recently_used() {
        let r = StatementRegistry::default();
        let s: Vec<_> = (0..3)
            .map(|i| r.intern(format!("SELECT {i}\0\0\0").as_bytes(), None, read()))
            .collect();
        let mut held = ServerStatements::new(2);
        assert!(held.insert(&s[0]).is_none());
        assert!(held.insert(&s[1]).is_none());
        assert!(held.contains(s[0].id));
        let evicted = held.insert(&s[2]).unwrap();
        assert_eq!(evicted.id, s[1].id);
        assert!(held.contains(s[0].id) && held.contains(s[2].id) && !held.contains(s[1].id));
    }
}
