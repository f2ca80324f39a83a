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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Hint {
    pub role: Option<RoleHint>,
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
                if let Some(("role", v)) = pair.split_once('=') {
                    hint.role = role(v);
                    found = true;
                }
            }
        }
        rest = body[end + 2..].trim_start();
    }
    found.then_some(hint)
}

/// `SET shardline.role = ...` / `RESET shardline.role`: `Some(new session
/// role)` (`None` inside = back to automatic), or `None` if the statement is
/// not about it.
pub fn session_role(stmt: &str) -> Option<Option<RoleHint>> {
    let words: Vec<_> = Lexer::new(stmt)
        .take(8)
        .map(|t| t.text.to_ascii_lowercase())
        .collect();
    let w = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
    let (set, at) = match (w(0), w(1)) {
        ("set", "session") => (true, 2),
        ("set", _) => (true, 1),
        ("reset", _) => (false, 1),
        _ => return None,
    };
    if w(at) != "shardline" || w(at + 1) != "." || w(at + 2) != "role" {
        return None;
    }
    if !set {
        return Some(None);
    }
    let value = match w(at + 3) {
        "=" | "to" => w(at + 4),
        _ => return None,
    };
    Some(role(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comment_hints() {
        assert_eq!(
            leading_hint("/* shardline: role=primary */ SELECT 1"),
            Some(Hint {
                role: Some(RoleHint::Primary)
            })
        );
        assert_eq!(
            leading_hint("  /* app */ /*shardline: role=replica*/SELECT 1"),
            Some(Hint {
                role: Some(RoleHint::Replica)
            })
        );
        assert_eq!(
            leading_hint("SELECT 1 /* shardline: role=primary */"),
            None,
            "only leading comments count"
        );
        assert_eq!(
            leading_hint("/* shardline: shard=s1 */ SELECT 1"),
            None,
            "other keys are for later"
        );
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
}
