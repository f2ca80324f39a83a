//! Session variables a client set (at startup or with SET outside a
//! transaction). Under transaction pooling a client's next transaction may run
//! on another server connection, so each connection records the variables in
//! effect on it, and the session replays the client's set when they differ.

use shardline_router::effect::Effect;
use std::sync::Arc;

/// Sorted by name; compared whole. Values are the statements that set them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct SessionVars {
    entries: Vec<(String, String)>,
}

/// Startup parameters that are not session variables.
const NOT_VARIABLES: &[&str] = &["user", "database", "options", "replication"];

impl SessionVars {
    /// Variables from a client's StartupMessage, including `options=-c k=v`.
    pub fn from_startup(params: &[(String, String)]) -> SessionVars {
        let mut vars = SessionVars::default();
        for (name, value) in startup_settings(params) {
            // The proxy's own settings are not the servers'.
            if !name.to_ascii_lowercase().starts_with("shardline.") {
                vars.set_value(&name, &value);
            }
        }
        vars
    }

    fn set_value(&mut self, name: &str, value: &str) {
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
            || name.is_empty()
        {
            return;
        }
        let stmt = format!("SET {name} TO {}", quote_literal(value));
        self.put(&name.to_ascii_lowercase(), stmt);
    }

    fn put(&mut self, name: &str, statement: String) {
        match self.entries.binary_search_by(|(k, _)| k.as_str().cmp(name)) {
            Ok(i) => self.entries[i].1 = statement,
            Err(i) => self.entries.insert(i, (name.to_string(), statement)),
        }
    }

    /// The variables written out whole, for a key that must tell every
    /// two different sets apart (the result cache's).
    pub fn write_key(&self, out: &mut Vec<u8>) {
        for (name, value) in &self.entries {
            for part in [name, value] {
                out.extend_from_slice(&(part.len() as u32).to_le_bytes());
                out.extend_from_slice(part.as_bytes());
            }
        }
        out.push(0xff);
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Applies a committed effect; returns the new variables if they changed.
    pub fn apply(self: &Arc<Self>, effect: &Effect) -> Option<Arc<SessionVars>> {
        let mut next = (**self).clone();
        match effect {
            Effect::Set { name, statement } => next.put(name, statement.clone()),
            Effect::Reset(name) => next.entries.retain(|(k, _)| k != name),
            Effect::ResetAll | Effect::DiscardAll => next.entries.clear(),
            Effect::Deallocate(_) | Effect::Listen | Effect::HoldCursor => return None,
        }
        (next != **self).then(|| Arc::new(next))
    }

    /// SQL that turns a connection with `current` variables into one with `self`.
    pub fn replay_sql(&self, current: &SessionVars) -> String {
        let mut sql = String::new();
        if !current.is_empty() {
            sql.push_str("RESET ALL;");
        }
        for (_, stmt) in &self.entries {
            sql.push_str(stmt);
            sql.push(';');
        }
        sql
    }
}

/// The settings a StartupMessage makes, in order: its parameters that are
/// settings, and `options=-c name=value ...` where it stands.
pub fn startup_settings(params: &[(String, String)]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (k, v) in params {
        if k == "options" {
            out.extend(parse_options(v));
        } else if !NOT_VARIABLES.contains(&k.as_str()) && !k.starts_with("_pq_.") {
            out.push((k.clone(), v.clone()));
        }
    }
    out
}

fn quote_literal(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

/// `-c name=value --name=value` as libpq passes them (backslash escapes spaces).
fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let kv = if w == "-c" {
            it.next()
        } else if let Some(rest) = w.strip_prefix("--") {
            Some(rest.to_string())
        } else {
            w.strip_prefix("-c").map(str::to_string)
        };
        if let Some((k, v)) = kv.as_deref().and_then(|s| s.split_once('=')) {
            out.push((k.replace('-', "_"), v.to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    #[test]
    fn startup_params_become_variables() {
        let v = SessionVars::from_startup(&[
            p("user", "app"),
            p("database", "app"),
            p("application_name", "it's"),
            p(
                "options",
                "-c search_path=a,b --statement-timeout=5s -cwork_mem=1MB",
            ),
        ]);
        assert_eq!(
            v.get("application_name"),
            Some("SET application_name TO 'it''s'")
        );
        assert_eq!(v.get("search_path"), Some("SET search_path TO 'a,b'"));
        assert_eq!(
            v.get("statement_timeout"),
            Some("SET statement_timeout TO '5s'")
        );
        assert_eq!(v.get("work_mem"), Some("SET work_mem TO '1MB'"));
        assert_eq!(v.get("user"), None);
    }

    #[test]
    fn effects_and_replay() {
        let v = Arc::new(SessionVars::default());
        let v2 = v
            .apply(&Effect::Set {
                name: "x.y".into(),
                statement: "SET x.y = 1".into(),
            })
            .unwrap();
        assert_eq!(v2.replay_sql(&v), "SET x.y = 1;");
        assert_eq!(v.replay_sql(&v2), "RESET ALL;");
        assert!(v2
            .apply(&Effect::Set {
                name: "x.y".into(),
                statement: "SET x.y = 1".into()
            })
            .is_none());
        let v3 = v2.apply(&Effect::Reset("x.y".into())).unwrap();
        assert_eq!(*v3, *v);
        assert!(v.apply(&Effect::ResetAll).is_none());
    }
}
