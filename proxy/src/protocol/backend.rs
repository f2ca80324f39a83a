//! Messages the proxy writes to clients itself (everything else is forwarded as
//! the server sent it), and reading the server messages the proxy acts on.

use super::Reader;
use bytes::{BufMut, BytesMut};

pub const PARSE_COMPLETE: u8 = b'1';
pub const BIND_COMPLETE: u8 = b'2';
pub const CLOSE_COMPLETE: u8 = b'3';
pub const NOTIFICATION: u8 = b'A';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const DATA_ROW: u8 = b'D';
pub const COPY_DATA: u8 = b'd';
pub const ERROR_RESPONSE: u8 = b'E';
pub const COPY_IN_RESPONSE: u8 = b'G';
pub const COPY_OUT_RESPONSE: u8 = b'H';
pub const EMPTY_QUERY: u8 = b'I';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const NOTICE_RESPONSE: u8 = b'N';
pub const AUTHENTICATION: u8 = b'R';
pub const PARAMETER_STATUS: u8 = b'S';
pub const ROW_DESCRIPTION: u8 = b'T';
pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
pub const COPY_BOTH_RESPONSE: u8 = b'W';
pub const READY_FOR_QUERY: u8 = b'Z';
pub const NO_DATA: u8 = b'n';
pub const PORTAL_SUSPENDED: u8 = b's';
pub const PARAMETER_DESCRIPTION: u8 = b't';
pub const NEGOTIATE_PROTOCOL: u8 = b'v';

/// Appends a message, letting `body` write its payload; the length is patched in.
#[inline]
pub fn put_message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    let start = buf.len();
    buf.put_u8(tag);
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - start - 1) as i32;
    buf[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
}

pub fn put_cstr(buf: &mut BytesMut, s: &[u8]) {
    buf.put_slice(s);
    buf.put_u8(0);
}

/// ErrorResponse / NoticeResponse severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
    Warning,
    Notice,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Warning => "WARNING",
            Severity::Notice => "NOTICE",
        }
    }
}

/// An error (or notice) the proxy reports in Postgres's own format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    pub severity: Severity,
    /// SQLSTATE: one of ours (`sqlstate`) or a server's, passed on.
    pub code: std::borrow::Cow<'static, str>,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl PgError {
    pub fn new(
        severity: Severity,
        code: impl Into<std::borrow::Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        PgError {
            severity,
            code: code.into(),
            message: message.into(),
            detail: None,
            hint: None,
        }
    }
    pub fn error(
        code: impl Into<std::borrow::Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self::new(Severity::Error, code, message)
    }
    pub fn fatal(
        code: impl Into<std::borrow::Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self::new(Severity::Fatal, code, message)
    }
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn encode(&self, buf: &mut BytesMut) {
        let tag = match self.severity {
            Severity::Error | Severity::Fatal => ERROR_RESPONSE,
            _ => NOTICE_RESPONSE,
        };
        put_message(buf, tag, |b| {
            for field in [b'S', b'V'] {
                b.put_u8(field);
                put_cstr(b, self.severity.as_str().as_bytes());
            }
            b.put_u8(b'C');
            put_cstr(b, self.code.as_bytes());
            b.put_u8(b'M');
            put_cstr(b, self.message.as_bytes());
            if let Some(d) = &self.detail {
                b.put_u8(b'D');
                put_cstr(b, d.as_bytes());
            }
            if let Some(h) = &self.hint {
                b.put_u8(b'H');
                put_cstr(b, h.as_bytes());
            }
            b.put_u8(0);
        });
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.severity.as_str(),
            self.code,
            self.message
        )
    }
}

/// SQLSTATE codes the proxy itself raises.
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const IN_FAILED_SQL_TRANSACTION: &str = "25P02";
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const CANNOT_CONNECT: &str = "08001";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const QUERY_CANCELED: &str = "57014";
    pub const INTERNAL_ERROR: &str = "XX000";
    pub const INVALID_SQL_STATEMENT_NAME: &str = "26000";
    pub const SYNTAX_ERROR: &str = "42601";
    pub const UNDEFINED_OBJECT: &str = "42704";
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
}

/// A RowDescription of one text column `name`, and a row per value.
pub fn text_rows(buf: &mut BytesMut, name: &str, values: &[&str]) {
    put_message(buf, ROW_DESCRIPTION, |b| {
        b.extend_from_slice(&1i16.to_be_bytes());
        put_cstr(b, name.as_bytes());
        b.extend_from_slice(&0i32.to_be_bytes()); // table
        b.extend_from_slice(&0i16.to_be_bytes()); // column
        b.extend_from_slice(&25i32.to_be_bytes()); // text
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes()); // text format
    });
    for v in values {
        put_message(buf, DATA_ROW, |b| {
            b.extend_from_slice(&1i16.to_be_bytes());
            b.extend_from_slice(&(v.len() as i32).to_be_bytes());
            b.extend_from_slice(v.as_bytes());
        });
    }
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    buf.put_slice(&[READY_FOR_QUERY, 0, 0, 0, 5, status]);
}

pub fn empty_message(buf: &mut BytesMut, tag: u8) {
    buf.put_slice(&[tag, 0, 0, 0, 4]);
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    put_message(buf, COMMAND_COMPLETE, |b| put_cstr(b, tag.as_bytes()));
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    put_message(buf, PARAMETER_STATUS, |b| {
        put_cstr(b, name.as_bytes());
        put_cstr(b, value.as_bytes());
    });
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    put_message(buf, BACKEND_KEY_DATA, |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    });
}

pub fn auth_request(buf: &mut BytesMut, code: i32, payload: &[u8]) {
    put_message(buf, AUTHENTICATION, |b| {
        b.put_i32(code);
        b.put_slice(payload);
    });
}

pub fn negotiate_protocol_version(buf: &mut BytesMut, minor: i32, unsupported: &[&str]) {
    put_message(buf, NEGOTIATE_PROTOCOL, |b| {
        b.put_i32(minor);
        b.put_i32(unsupported.len() as i32);
        for o in unsupported {
            put_cstr(b, o.as_bytes());
        }
    });
}

/// The fields of a server's ErrorResponse or NoticeResponse that the proxy reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

pub fn parse_error_fields(body: &[u8]) -> ErrorFields {
    let mut r = Reader::new(body);
    let mut f = ErrorFields::default();
    while let Some(kind) = r.u8() {
        if kind == 0 {
            break;
        }
        let Some(v) = r.cstr() else { break };
        let v = String::from_utf8_lossy(v).into_owned();
        match kind {
            b'V' => f.severity = v,
            b'S' if f.severity.is_empty() => f.severity = v,
            b'C' => f.code = v,
            b'M' => f.message = v,
            _ => {}
        }
    }
    f
}

/// Why the server is about to close the connection, from a notice's body:
/// a WARNING in class 57P (operator intervention), which Postgres sends
/// only as a backend exits (57P01 in an immediate shutdown, 57P02 after
/// another backend crashed).
pub fn farewell_reason(body: &[u8]) -> Option<String> {
    let fields = parse_error_fields(body);
    (fields.severity == "WARNING" && fields.code.starts_with("57P"))
        .then(|| format!("{} {}", fields.code, fields.message))
}

/// The command tag of a CommandComplete body, e.g. `"SELECT 1"`.
pub fn command_tag(body: &[u8]) -> &[u8] {
    body.split(|&b| b == 0).next().unwrap_or_default()
}

/// How many bytes at the front of `buf` are whole DataRow and CopyData
/// messages: a run of rows, ended by any other message or by one not all
/// here (or malformed: the caller's framing reports it). Executors copy a
/// run to the client at once: rows end no pending entry and change no
/// state.
#[inline]
pub fn rows_run(buf: &[u8]) -> usize {
    super::run_of(buf, usize::MAX, |tag| matches!(tag, DATA_ROW | COPY_DATA))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_warning_of_class_57p_says_the_server_closes() {
        let body = |fields: &[(u8, &str)]| {
            let mut b = Vec::new();
            for (kind, value) in fields {
                b.push(*kind);
                b.extend_from_slice(value.as_bytes());
                b.push(0);
            }
            b.push(0);
            b
        };
        let shutdown = "terminating connection due to immediate shutdown command";
        let farewell = |sev: &str, code: &str| {
            super::farewell_reason(&body(&[
                (b'S', sev),
                (b'V', sev),
                (b'C', code),
                (b'M', shutdown),
            ]))
        };
        assert_eq!(
            farewell("WARNING", "57P01").as_deref(),
            Some("57P01 terminating connection due to immediate shutdown command")
        );
        assert!(
            farewell("WARNING", "57P02").is_some(),
            "crash of another backend"
        );
        assert_eq!(farewell("WARNING", "01000"), None, "a plain warning");
        assert_eq!(farewell("NOTICE", "57P01"), None);
        // The localized severity is not read when the unlocalized one is there.
        let localized = body(&[(b'S', "WARNUNG"), (b'V', "WARNING"), (b'C', "57P01")]);
        assert!(super::farewell_reason(&localized).is_some());
        assert_eq!(super::farewell_reason(&[]), None, "empty");
    }

    use super::*;

    use crate::protocol::test_message as message;

    #[test]
    fn a_run_of_rows_ends_at_another_message_or_a_partial_row() {
        let rows: Vec<u8> = [
            message(DATA_ROW, b"\0\x01\0\0\0\x01x"),
            message(COPY_DATA, b"1\tx\n"),
            message(DATA_ROW, b""),
        ]
        .concat();
        let end = message(COMMAND_COMPLETE, b"SELECT 2\0");
        let whole = [rows.clone(), end.clone()].concat();
        assert_eq!(rows_run(&whole), rows.len());
        assert_eq!(rows_run(&end), 0);
        assert_eq!(rows_run(&[]), 0);
        // Cut anywhere inside the rows: only the whole ones before the cut.
        let starts = [0, 12, 21, rows.len()];
        for cut in 0..=rows.len() {
            let whole_before = starts.iter().copied().filter(|&s| s <= cut).max().unwrap();
            assert_eq!(rows_run(&rows[..cut]), whole_before, "cut at {cut}");
        }
        // A length under 4 is not a message: the run stops before it.
        let bad = [message(DATA_ROW, b"ab"), vec![DATA_ROW, 0, 0, 0, 2]].concat();
        assert_eq!(rows_run(&bad), 7);
    }

    #[test]
    fn error_response_layout() {
        let mut b = BytesMut::new();
        PgError::error("08P01", "bad").with_hint("h").encode(&mut b);
        assert_eq!(b[0], ERROR_RESPONSE);
        let len = i32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        assert_eq!(len + 1, b.len());
        let f = parse_error_fields(&b[5..]);
        assert_eq!(
            (f.severity.as_str(), f.code.as_str(), f.message.as_str()),
            ("ERROR", "08P01", "bad")
        );
    }

    #[test]
    fn fixed_messages() {
        let mut b = BytesMut::new();
        ready_for_query(&mut b, b'T');
        command_complete(&mut b, "SET");
        assert_eq!(&b[..], b"Z\0\0\0\x05TC\0\0\0\x08SET\0");
        assert_eq!(command_tag(b"SELECT 3\0"), b"SELECT 3");
        assert_eq!(command_tag(b""), b"");
    }
}
