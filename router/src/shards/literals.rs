//! Constants read as the server reads them (quoted strings, escapes).

use std::borrow::Cow;

/// The value of the constant at `s..e` of `sql`, unquoted.
pub(super) fn constant_value(sql: &str, s: usize, e: usize) -> Cow<'_, str> {
    let raw = &sql[s..e];
    let escaped = s > 0 && matches!(sql.as_bytes()[s - 1], b'E' | b'e');
    if let Some(body) = raw.strip_prefix('\'') {
        let body = body.strip_suffix('\'').unwrap_or(body);
        if escaped {
            Cow::Owned(unescape(body))
        } else if body.contains("''") {
            Cow::Owned(body.replace("''", "'"))
        } else {
            Cow::Borrowed(body)
        }
    } else if let Some(after) = raw.strip_prefix('$') {
        let tag_end = after.find('$').map_or(raw.len(), |p| p + 2);
        let body_end = raw.len().saturating_sub(tag_end);
        Cow::Borrowed(raw.get(tag_end..body_end).unwrap_or_default())
    } else if raw.bytes().any(|b| b == b'_') {
        // (A byte loop: numbers are short, and a search's set-up costs
        // more than the few bytes it would skip.)
        Cow::Owned(raw.replace('_', ""))
    } else {
        // A plain number, the usual key: no copy.
        Cow::Borrowed(raw)
    }
}

pub(super) fn unescape(body: &str) -> String {
    let mut out = String::with_capacity(body.len());
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some('r') => out.push('\r'),
                Some('b') => out.push('\u{8}'),
                Some('f') => out.push('\u{c}'),
                Some(other) => out.push(other),
                None => {}
            },
            '\'' => {
                // '' inside E'...'
                if chars.clone().next() == Some('\'') {
                    chars.next();
                }
                out.push('\'');
            }
            c => out.push(c),
        }
    }
    out
}
