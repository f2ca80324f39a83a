//! A small SQL lexer: enough to split a simple query into statements, read
//! leading keywords and comments, without parsing. Used where a full parse is
//! not needed (session bookkeeping, hints) or not possible (the fallback
//! classifier).

/// The first keyword of `sql`, after whitespace and comments.
pub fn first_keyword(sql: &str) -> &str {
    Lexer::new(sql).next().map(|t| t.text).unwrap_or("")
}

/// Splits a simple query into statements, ignoring semicolons inside quotes,
/// dollar quotes and comments. Empty statements are dropped.
pub fn split_statements(sql: &str) -> Vec<&str> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b';' => {
                push_stmt(&mut out, &sql[start..i]);
                start = i + 1;
                i += 1;
            }
            _ => i = skip_token(b, i),
        }
    }
    push_stmt(&mut out, &sql[start..]);
    out
}

fn push_stmt<'a>(out: &mut Vec<&'a str>, s: &'a str) {
    if Lexer::new(s).next().is_some() {
        out.push(s.trim());
    }
}

/// Skips one lexical unit starting at `i` (quote, comment, dollar quote or one byte).
pub fn skip_token(b: &[u8], i: usize) -> usize {
    match b[i] {
        b'\'' => skip_quoted(b, i, b'\'', i > 0 && (b[i - 1] == b'E' || b[i - 1] == b'e')),
        b'"' => skip_quoted(b, i, b'"', false),
        b'-' if b.get(i + 1) == Some(&b'-') => b[i..]
            .iter()
            .position(|&c| c == b'\n')
            .map_or(b.len(), |p| i + p + 1),
        b'/' if b.get(i + 1) == Some(&b'*') => skip_block_comment(b, i),
        b'$' => skip_dollar(b, i),
        _ => i + 1,
    }
}

fn skip_quoted(b: &[u8], i: usize, q: u8, backslash: bool) -> usize {
    let mut j = i + 1;
    while j < b.len() {
        if backslash && b[j] == b'\\' {
            j += 2;
            continue;
        }
        if b[j] == q {
            if b.get(j + 1) == Some(&q) {
                j += 2;
                continue;
            }
            return j + 1;
        }
        j += 1;
    }
    b.len()
}

fn skip_block_comment(b: &[u8], i: usize) -> usize {
    let mut depth = 0;
    let mut j = i;
    while j + 1 < b.len() {
        if b[j] == b'/' && b[j + 1] == b'*' {
            depth += 1;
            j += 2;
        } else if b[j] == b'*' && b[j + 1] == b'/' {
            depth -= 1;
            j += 2;
            if depth == 0 {
                return j;
            }
        } else {
            j += 1;
        }
    }
    b.len()
}

fn skip_dollar(b: &[u8], i: usize) -> usize {
    // $tag$ ... $tag$, where tag is empty or an identifier; `$1` is a parameter.
    let mut j = i + 1;
    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] >= 0x80) {
        j += 1;
    }
    if j >= b.len() || b[j] != b'$' || (j > i + 1 && b[i + 1].is_ascii_digit()) {
        return i + 1;
    }
    let tag = &b[i..=j];
    let body = j + 1;
    b[body..]
        .windows(tag.len())
        .position(|w| w == tag)
        .map_or(b.len(), |p| body + p + tag.len())
}

/// The bytes `scan_constants` looks at: a constant's first byte, or a
/// token's (quoted identifier, comment) that may hide a constant-like byte.
static MAY_START_TOKEN: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = b'0';
    while c <= b'9' {
        t[c as usize] = true;
        c += 1;
    }
    t[b'\'' as usize] = true;
    t[b'$' as usize] = true;
    t[b'"' as usize] = true;
    t[b'-' as usize] = true;
    t[b'/' as usize] = true;
    t
};

/// Eight bytes at once: a word with a 0x80 bit in each byte that may
/// start a token (`"`, `$`, `'` and their neighbours 0x22..=0x27; `-`, `/`,
/// the digits and `.` between them, 0x2D..=0x39). A superset of
/// `MAY_START_TOKEN` in ASCII (the byte loop decides), and no byte of
/// 0x80 or more, which none starts. Each byte is computed within its own
/// eight bits (its low seven plus at most 127 never carry out), so the
/// lowest flag is the first such byte.
#[inline]
fn may_start_in(w: u64) -> u64 {
    const ONES: u64 = u64::MAX / 255;
    const HIGH: u64 = ONES * 0x80;
    const LOW7: u64 = ONES * 0x7f;
    // Bytes strictly between `m` and `n` (m, n at most 127 and 128), from
    // the bit-twiddling "hasbetween".
    let between = |m: u64, n: u64| {
        let low = w & LOW7;
        (ONES * (127 + n) - low) & !w & (low + ONES * (127 - m)) & HIGH
    };
    between(0x21, 0x28) | between(0x2c, 0x3a)
}

/// What [`scan_tokens`] reports: a constant (number, string, dollar
/// string) or a block comment, with its start and end offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spot {
    Constant(usize, usize),
    Comment(usize, usize),
}

/// Calls `f(start, end)` for each constant of `sql` (number, string, dollar
/// string), in order. The one scanner behind `shape` and the sharding key's
/// constant ordinals, so both count constants alike.
pub fn scan_constants(sql: &str, mut f: impl FnMut(usize, usize)) {
    scan_tokens(sql, |spot| {
        if let Spot::Constant(start, end) = spot {
            f(start, end)
        }
    })
}

/// [`scan_constants`], also reporting each block comment (`/* ... */`).
pub fn scan_tokens(sql: &str, mut f: impl FnMut(Spot)) {
    let b = sql.as_bytes();
    let mut i = 0;
    while i < b.len() {
        // Runs of letters, spaces and punctuation, eight bytes at a time.
        while let Some(chunk) = b.get(i..i + 8) {
            let w = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
            let flags = may_start_in(w);
            if flags != 0 {
                i += flags.trailing_zeros() as usize / 8;
                break;
            }
            i += 8;
        }
        let Some(&c) = b.get(i) else { break };
        if !MAY_START_TOKEN[c as usize] {
            // Most bytes of a statement: letters, spaces, punctuation.
            i += 1;
            continue;
        }
        let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_' || x == b'$' || x >= 0x80;
        let (end, constant) = match c {
            b'\'' => (skip_token(b, i), true),
            b'$' => match skip_token(b, i) {
                j if j > i + 1 => (j, true),
                _ => (i + 1, false),
            },
            b'0'..=b'9' if i == 0 || !word(b[i - 1]) => (number_end(b, i), true),
            b'"' | b'-' | b'/' => {
                let end = skip_token(b, i);
                if c == b'/' && end > i + 1 {
                    f(Spot::Comment(i, end));
                }
                (end, false)
            }
            _ => (i + 1, false),
        };
        if constant {
            f(Spot::Constant(i, end));
        }
        i = end;
    }
}

/// Where the number starting at `i` (a digit not preceded by a word byte)
/// ends: digits, '.', an exponent with its sign, hex digits, underscores.
#[inline]
pub fn number_end(b: &[u8], i: usize) -> usize {
    let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_' || x == b'$' || x >= 0x80;
    let mut j = i + 1;
    // (Digits first: most of a number, and one comparison.)
    while j < b.len()
        && (b[j].is_ascii_digit()
            || word(b[j])
            || b[j] == b'.'
            || ((b[j] == b'+' || b[j] == b'-') && matches!(b[j - 1], b'e' | b'E')))
    {
        j += 1;
    }
    j
}

/// A token: a word, a quoted identifier/string, or one punctuation byte.
#[derive(Debug, Clone, Copy)]
pub struct Token<'a> {
    pub text: &'a str,
    pub quoted: bool,
}

impl Token<'_> {
    pub fn lower(&self) -> String {
        if self.quoted {
            String::new()
        } else {
            self.text.to_ascii_lowercase()
        }
    }

    /// The identifier this token names: unquoted and case-folded, or as quoted.
    pub fn ident(&self) -> String {
        if self.quoted {
            self.text.trim_matches('"').replace("\"\"", "\"")
        } else {
            self.text.to_ascii_lowercase()
        }
    }
}

pub struct Lexer<'a> {
    s: &'a str,
    i: usize,
}

impl<'a> Lexer<'a> {
    pub fn new(s: &'a str) -> Self {
        Lexer { s, i: 0 }
    }
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        let b = self.s.as_bytes();
        loop {
            while self.i < b.len() && b[self.i].is_ascii_whitespace() {
                self.i += 1;
            }
            if self.i >= b.len() {
                return None;
            }
            let starts_comment = (b[self.i] == b'-' && b.get(self.i + 1) == Some(&b'-'))
                || (b[self.i] == b'/' && b.get(self.i + 1) == Some(&b'*'));
            if starts_comment {
                self.i = skip_token(b, self.i);
                continue;
            }
            break;
        }
        let start = self.i;
        let c = b[start];
        let (end, quoted) = if c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80 {
            let mut j = start;
            while j < b.len()
                && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b'$' || b[j] >= 0x80)
            {
                j += 1;
            }
            (j, false)
        } else if c == b'"' || c == b'\'' {
            (skip_token(b, start), c == b'"')
        } else {
            // One byte, but never split a UTF-8 sequence.
            let mut j = start + 1;
            while j < b.len() && !self.s.is_char_boundary(j) {
                j += 1;
            }
            (j, false)
        };
        self.i = end;
        Some(Token {
            text: &self.s[start..end],
            quoted,
        })
    }
}

/// The words of `sql` (identifiers and keywords, as written), skipping
/// punctuation, quoted strings and comments; nothing is allocated.
pub fn words(sql: &str) -> impl Iterator<Item = &str> {
    Lexer::new(sql)
        .filter(|t| {
            !t.quoted
                && t.text
                    .as_bytes()
                    .first()
                    .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
        })
        .map(|t| t.text)
}

/// The first `n` words (identifiers and keywords, lowercased), skipping
/// punctuation, quoted strings and comments.
pub fn leading_words(sql: &str, n: usize) -> Vec<String> {
    words(sql).take(n).map(str::to_ascii_lowercase).collect()
}

/// Statements Postgres refuses inside a transaction block (VACUUM, CREATE
/// DATABASE, ... CONCURRENTLY, ALTER SYSTEM): never wrapped in one.
pub fn refuses_transaction_block(sql: &str) -> bool {
    let words = leading_words(sql, 5);
    let w = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
    match w(0) {
        "vacuum" | "checkpoint" => true,
        "create" | "drop" if w(1) == "database" || w(1) == "tablespace" => true,
        "alter" if w(1) == "system" => true,
        "create" | "drop" | "reindex" | "refresh" => words.iter().any(|x| x == "concurrently"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_bytes_at_once_flag_every_byte_that_may_start_a_token() {
        for v in 0..=255u8 {
            let flagged = matches!(v, 0x22..=0x27 | 0x2d..=0x39);
            assert!(flagged || !MAY_START_TOKEN[v as usize], "{v:#x}");
            for k in 0..8 {
                let mut bytes = [b'a'; 8];
                bytes[k] = v;
                let flags = may_start_in(u64::from_le_bytes(bytes));
                if flagged {
                    assert_eq!(flags.trailing_zeros() as usize / 8, k, "{v:#x} at {k}");
                } else {
                    assert_eq!(flags, 0, "{v:#x} at {k}");
                }
            }
        }
        // Bytes of 0x80 and more around a flagged one change nothing.
        let flags = may_start_in(u64::from_le_bytes([
            0xc3, 0xa9, 0xff, b'\'', 0x80, b'9', 0, 0x7f,
        ]));
        assert_eq!(flags.trailing_zeros() / 8, 3);
        assert_eq!(flags.count_ones(), 2);
    }

    #[test]
    fn tokens_are_found_at_every_offset() {
        let tail =
            "x = 'a''b' AND y=12.5e-3 /* c */ AND z = $1 -- d\n AND w = $q$ e $q$ AND \"9\" = 7";
        let spots = |sql: &str| {
            let mut v = Vec::new();
            scan_tokens(sql, |s| v.push(s));
            v
        };
        let want = spots(tail);
        assert_eq!(want.len(), 5, "{want:?}");
        for pad in ["", " ", "é", "abcdefg", "\u{1F600}"] {
            for n in 0..17 {
                let prefix = pad.repeat(n);
                let shift = |s: &Spot| match *s {
                    Spot::Constant(a, b) => Spot::Constant(a + prefix.len(), b + prefix.len()),
                    Spot::Comment(a, b) => Spot::Comment(a + prefix.len(), b + prefix.len()),
                };
                let got = spots(&format!("{prefix}{tail}"));
                assert_eq!(
                    got,
                    want.iter().map(shift).collect::<Vec<_>>(),
                    "{pad:?} x {n}"
                );
            }
        }
    }

    #[test]
    fn splitting_respects_quotes_and_comments() {
        let s = "SELECT 'a;b', \"c;d\", $$e;f$$, $x$g;$x$, E'\\';' -- h;\n; /* i; /* j; */ */ SELECT $1";
        assert_eq!(split_statements(s).len(), 2);
        assert_eq!(split_statements(";;  ;"), Vec::<&str>::new());
        // Unterminated constructs never panic.
        for s in [
            "'abc", "\"abc", "$$abc", "/* abc", "-- abc", "$", "$a", "E'\\",
        ] {
            let _ = split_statements(s);
        }
    }

    #[test]
    fn leading_words_skip_noise() {
        assert_eq!(leading_words("/* x */ BEGIN; -- y\n", 3), ["begin"]);
        assert_eq!(
            leading_words("  START TRANSACTION READ ONLY", 8),
            ["start", "transaction", "read", "only"]
        );
        assert_eq!(leading_words("SELECT 'a b', \"Q\"", 8), ["select"]);
    }
}
