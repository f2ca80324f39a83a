//! Routing hints written by the application: a leading comment
//! `/* shardline: role=primary */` on one statement, or
//! `SET shardline.role = primary | replica | auto` for the session.

use crate::lexer::Lexer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RoleHint {
    Primary,
    Replica,
}

/// What a leading hint comment asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Hint {
    pub role: Option<RoleHint>,
    /// `shard=NAME`: run on that shard.
    pub shard: Option<String>,
    /// `key=VALUE`: run on the shard owning that key.
    pub key: Option<String>,
    /// `cache=30s`: the result cache keeps the statement's result this long
    /// (ms); `cache=off` is 0: the statement bypasses the cache.
    pub cache: Option<u64>,
}

/// `cache=30s`, `cache=500ms`, `cache=off`.
fn cache_ttl(value: &str) -> Option<u64> {
    let v = value.trim().trim_matches('\'');
    if v.eq_ignore_ascii_case("off") || v == "0" {
        return Some(0);
    }
    shardline_config::parse_duration(v)
        .ok()
        .map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64)
}

fn role(value: &str) -> Option<RoleHint> {
    match value
        .trim()
        .trim_matches('\'')
        .to_ascii_lowercase()
        .as_str()
    {
        "primary" | "write" => Some(RoleHint::Primary),
        "replica" | "read" => Some(RoleHint::Replica),
        _ => None,
    }
}

/// Reads `shardline:` hints from the comments before the first token.
pub fn leading_hint(sql: &str) -> Option<Hint> {
    let mut rest = sql.trim_start();
    let mut hint = Hint::default();
    let mut found = false;
    while let Some(body) = rest.strip_prefix("/*") {
        let end = body.find("*/")?;
        let comment = body[..end].trim();
        if let Some(pairs) = comment.strip_prefix("shardline:") {
            for pair in pairs
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|p| !p.is_empty())
            {
                match pair.split_once('=') {
                    Some(("role", v)) => hint.role = role(v),
                    Some(("shard", v)) => hint.shard = Some(unquote(v)),
                    Some(("key", v)) => hint.key = Some(unquote(v)),
                    Some(("cache", v)) => match cache_ttl(v) {
                        Some(ms) => hint.cache = Some(ms),
                        None => continue,
                    },
                    _ => continue,
                }
                found = true;
            }
        }
        rest = body[end + 2..].trim_start();
    }
    found.then_some(hint)
}

fn unquote(v: &str) -> String {
    let v = v.trim();
    v.strip_prefix('\'')
        .and_then(|x| x.strip_suffix('\''))
        .map_or_else(|| v.to_string(), |x| x.replace("''", "'"))
}

/// A proxy setting of the session (`SET shardline.<name> = value`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionSetting {
    /// `shardline.role`; `None` = automatic.
    Role(Option<RoleHint>),
    /// `shardline.shard`; `None` = automatic.
    Shard(Option<String>),
    /// `shardline.sharding_key`; `None` = automatic.
    Key(Option<String>),
    /// `SHOW shardline.<name>`: the setting's name.
    Show(&'static str),
}

/// `SET [SESSION] shardline.role|shard|sharding_key = ...` or `RESET ...`:
/// the setting, or `None` if the statement is not one of them.
pub fn session_setting(stmt: &str) -> Option<SessionSetting> {
    let mut tokens: Vec<_> = Lexer::new(stmt).take(12).collect();
    // psql and most tools end a statement with a semicolon.
    while tokens.last().is_some_and(|t| t.text == ";") {
        tokens.pop();
    }
    let w = |i: usize| {
        tokens
            .get(i)
            .map(|t| t.text.to_ascii_lowercase())
            .unwrap_or_default()
    };
    let (set, at) = match (w(0).as_str(), w(1).as_str()) {
        ("set", "session") => (true, 2),
        ("set", _) => (true, 1),
        ("reset", _) | ("show", _) => (false, 1),
        _ => return None,
    };
    if w(at) != "shardline" || w(at + 1) != "." {
        return None;
    }
    let name = w(at + 2);
    if w(0) == "show" {
        if tokens.len() > at + 3 {
            return None;
        }
        return ["role", "shard", "sharding_key"]
            .into_iter()
            .find(|n| *n == name)
            .map(SessionSetting::Show);
    }
    let value = if set {
        match w(at + 3).as_str() {
            "=" | "to" => {}
            _ => return None,
        }
        if tokens.len() > at + 5 {
            return None;
        }
        Some(unquote(tokens.get(at + 4)?.text))
    } else {
        if tokens.len() > at + 3 {
            return None;
        }
        None
    };
    setting(&name, value)
}

/// The proxy setting `shardline.<name>` given `value` (`None`, `auto` or
/// `default`: automatic), as SET or the startup options give it; `None`
/// for a name that is not one.
pub fn setting(name: &str, value: Option<String>) -> Option<SessionSetting> {
    let value = value.filter(|v| !matches!(v.to_ascii_lowercase().as_str(), "auto" | "default"));
    match name.to_ascii_lowercase().as_str() {
        "role" => Some(SessionSetting::Role(value.as_deref().and_then(role))),
        "shard" => Some(SessionSetting::Shard(value)),
        "sharding_key" => Some(SessionSetting::Key(value)),
        _ => None,
    }
}

/// `SET shardline.role = ...` / `RESET shardline.role`: `Some(new session
/// role)` (`None` inside = back to automatic), or `None` if the statement is
/// not about it.
pub fn session_role(stmt: &str) -> Option<Option<RoleHint>> {
    match session_setting(stmt)? {
        SessionSetting::Role(r) => Some(r),
        _ => None,
    }
}

/// The W3C trace context a statement carries in a comment, as
/// sqlcommenter writes it (`/*traceparent='00-<32 hex>-<16 hex>-<2 hex>'*/`,
/// at the end or the start of the statement; the value may be URL-encoded
/// or unquoted): `version-trace_id-parent_id-flags`, checked for shape.
pub fn traceparent(sql: &str) -> Option<&str> {
    let mut found = None;
    crate::lexer::scan_tokens(sql, |spot| {
        if let (None, crate::lexer::Spot::Comment(start, end)) = (found, spot) {
            found = trace_in(&sql[start..end]);
        }
    });
    found
}

fn trace_in(comment: &str) -> Option<&str> {
    let at = comment.find("traceparent=")?;
    let value = comment[at + "traceparent=".len()..].trim_start_matches(['\'', '"']);
    let value = &value[..value.len().min(55)];
    let b = value.as_bytes();
    let hex = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_hexdigit);
    (b.len() == 55
        && hex(0..2)
        && b[2] == b'-'
        && hex(3..35)
        && b[35] == b'-'
        && hex(36..52)
        && b[52] == b'-'
        && hex(53..55))
    .then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_read_from_sqlcommenter_comments() {
        let id = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for sql in [
            format!("SELECT 1 /*controller='index',traceparent='{id}'*/"),
            format!("/*traceparent='{id}'*/ SELECT 1"),
            format!("SELECT 1 /* traceparent={id} */"),
        ] {
            assert_eq!(traceparent(&sql), Some(id), "{sql}");
        }
        for sql in [
            "SELECT 'traceparent=00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'"
                .to_string(),
            "SELECT 1 /*traceparent='00-short-01'*/".to_string(),
            "SELECT 1".to_string(),
        ] {
            assert_eq!(traceparent(&sql), None, "{sql}");
        }
    }

    #[test]
    fn comment_hints() {
        assert_eq!(
            leading_hint("/* shardline: role=primary */ SELECT 1"),
            Some(Hint {
                role: Some(RoleHint::Primary),
                ..Hint::default()
            })
        );
        assert_eq!(
            leading_hint("  /* app */ /*shardline: role=replica*/SELECT 1"),
            Some(Hint {
                role: Some(RoleHint::Replica),
                ..Hint::default()
            })
        );
        assert_eq!(
            leading_hint("SELECT 1 /* shardline: role=primary */"),
            None,
            "only leading comments count"
        );
        let h = leading_hint("/* shardline: shard=s1, key='it''s' */ SELECT 1").unwrap();
        assert_eq!(
            (h.shard.as_deref(), h.key.as_deref()),
            (Some("s1"), Some("it's"))
        );
        assert_eq!(leading_hint("/* shardline: colour=red */ SELECT 1"), None);
        let cache = |sql: &str| leading_hint(sql).and_then(|h| h.cache);
        assert_eq!(cache("/* shardline: cache=30s */ SELECT 1"), Some(30_000));
        assert_eq!(
            cache("/* shardline: cache=250ms, role=replica */ SELECT 1"),
            Some(250)
        );
        assert_eq!(cache("/* shardline: cache=off */ SELECT 1"), Some(0));
        assert_eq!(leading_hint("/* shardline: cache=soon */ SELECT 1"), None);
        assert_eq!(leading_hint("/* unterminated"), None);
    }

    #[test]
    fn session_roles() {
        assert_eq!(
            session_role("SET shardline.role = replica"),
            Some(Some(RoleHint::Replica))
        );
        assert_eq!(
            session_role("set session shardline.role to 'primary'"),
            Some(Some(RoleHint::Primary))
        );
        assert_eq!(session_role("SET shardline.role = auto"), Some(None));
        assert_eq!(session_role("RESET shardline.role"), Some(None));
        assert_eq!(session_role("SET search_path = a"), None);
        assert_eq!(session_role("SELECT 1"), None);
    }

    #[test]
    fn session_settings() {
        use SessionSetting::*;
        assert_eq!(
            session_setting("SET shardline.shard = s1"),
            Some(Shard(Some("s1".into())))
        );
        assert_eq!(
            session_setting("set shardline.shard to 'auto'"),
            Some(Shard(None))
        );
        assert_eq!(
            session_setting("RESET shardline.sharding_key"),
            Some(Key(None))
        );
        assert_eq!(
            session_setting("SET shardline.sharding_key = '42'"),
            Some(Key(Some("42".into())))
        );
        assert_eq!(
            session_setting("SET shardline.sharding_key = 42"),
            Some(Key(Some("42".into())))
        );
        assert_eq!(
            session_setting("SET shardline.role = replica"),
            Some(Role(Some(RoleHint::Replica)))
        );
        assert_eq!(session_setting("SET shardline.colour = red"), None);
        assert_eq!(
            session_setting("SHOW shardline.shard"),
            Some(SessionSetting::Show("shard"))
        );
        assert_eq!(session_setting("show shardline.colour"), None);
        assert_eq!(session_setting("SHOW shardline.role extra"), None);
        assert_eq!(session_setting("SET shardline.shard = s1, s2"), None);
        // As psql sends them: ended by a semicolon (or several).
        assert_eq!(
            session_setting("SET shardline.role = primary;"),
            Some(Role(Some(RoleHint::Primary)))
        );
        assert_eq!(
            session_setting("SHOW shardline.role ;"),
            Some(SessionSetting::Show("role"))
        );
        assert_eq!(
            session_setting("RESET shardline.shard;;"),
            Some(Shard(None))
        );
        assert_eq!(session_setting("SHOW shardline.role extra;"), None);
    }
}
