//! Reading the client messages the proxy must understand, and re-encoding the
//! few it rewrites (prepared statement names). Borrowed views, no copies.

use super::backend::{put_cstr, put_message};
use super::Reader;
use bytes::BytesMut;

pub const BIND: u8 = b'B';
pub const CLOSE: u8 = b'C';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const COPY_FAIL: u8 = b'f';
pub const DESCRIBE: u8 = b'D';
pub const EXECUTE: u8 = b'E';
pub const FLUSH: u8 = b'H';
pub const FUNCTION_CALL: u8 = b'F';
pub const PARSE: u8 = b'P';
pub const PASSWORD: u8 = b'p';
pub const QUERY: u8 = b'Q';
pub const SYNC: u8 = b'S';
pub const TERMINATE: u8 = b'X';

/// Whether a client's message reads as its handler will read it: one that
/// does not ends the client's session (08P01) when it is handled, so a
/// unit is not held back for its Sync behind it.
pub fn well_formed(tag: u8, body: &[u8]) -> bool {
    match tag {
        PARSE => parse(body).is_ok(),
        BIND => bind(body).is_ok(),
        DESCRIBE => target(body, "Describe").is_ok(),
        CLOSE => target(body, "Close").is_ok(),
        EXECUTE => execute(body).is_ok(),
        QUERY => query(body).is_ok(),
        _ => is_known_tag(tag),
    }
}

/// Whether `tag` is a message a client may send after startup.
pub fn is_known_tag(tag: u8) -> bool {
    matches!(
        tag,
        BIND | CLOSE
            | COPY_DATA
            | COPY_DONE
            | COPY_FAIL
            | DESCRIBE
            | EXECUTE
            | FLUSH
            | FUNCTION_CALL
            | PARSE
            | QUERY
            | SYNC
            | TERMINATE
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed {0} message")]
pub struct Malformed(pub &'static str);

/// Parse: statement name, then the query and parameter types (`rest`).
#[derive(Debug, PartialEq, Eq)]
pub struct ParseMsg<'a> {
    pub name: &'a [u8],
    pub query: &'a [u8],
    /// Query text, its NUL and the parameter type list: what defines the statement.
    pub definition: &'a [u8],
}

pub fn parse(body: &[u8]) -> Result<ParseMsg<'_>, Malformed> {
    let m = Malformed("Parse");
    let mut r = Reader::new(body);
    let name = r.cstr().ok_or(m)?;
    let definition = r.rest();
    let query = r.cstr().ok_or(m)?;
    let n = r.i16().ok_or(m)?;
    if n < 0 || r.rest().len() != n as usize * 4 {
        return Err(m);
    }
    Ok(ParseMsg {
        name,
        query,
        definition,
    })
}

/// Bind: portal and statement names; `rest` is formats, values and result formats.
#[derive(Debug, PartialEq, Eq)]
pub struct BindMsg<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    pub rest: &'a [u8],
}

pub fn bind(body: &[u8]) -> Result<BindMsg<'_>, Malformed> {
    let m = Malformed("Bind");
    let mut r = Reader::new(body);
    let portal = r.cstr().ok_or(m)?;
    let statement = r.cstr().ok_or(m)?;
    Ok(BindMsg {
        portal,
        statement,
        rest: r.rest(),
    })
}

/// A Bind's parameters, on the stack for up to four (moved by value:
/// a larger inline array costs a copy of it on every return).
pub type Params<'a> = smallvec::SmallVec<[shardline_router::shards::Param<'a>; 4]>;

/// A Bind's parameters as `(format, value)` (format 1 is binary; `None`
/// is NULL), from `BindMsg::rest`. `None` when malformed.
pub fn bind_params(rest: &[u8]) -> Option<Params<'_>> {
    let mut r = Reader::new(rest);
    let nformats = r.i16()?.max(0) as usize;
    let formats = r.bytes(2 * nformats)?;
    let format_at = |i: usize| {
        Some(i16::from_be_bytes([
            *formats.get(2 * i)?,
            formats[2 * i + 1],
        ]))
    };
    let n = r.i16()?.max(0) as usize;
    let mut out = Params::with_capacity(n);
    for i in 0..n {
        let format = match nformats {
            0 => 0,
            1 => format_at(0)?,
            _ => format_at(i)?,
        };
        let len = r.i32()?;
        let value = if len < 0 {
            None
        } else {
            Some(r.bytes(len as usize)?)
        };
        out.push((format, value));
    }
    Some(out)
}

/// A Bind's parameters and result formats (the part after the statement
/// name) for a statement with `extra` more result columns than the client's:
/// a list of one format per column gets text for the extra ones (one code,
/// or none, already applies to every column).
pub fn with_extra_result_columns(rest: &[u8], extra: usize) -> Option<Vec<u8>> {
    let mut r = Reader::new(rest);
    let nformats = r.i16()?.max(0) as usize;
    for _ in 0..nformats {
        r.i16()?;
    }
    let n = r.i16()?.max(0) as usize;
    for _ in 0..n {
        let len = r.i32()?;
        if len > 0 {
            r.bytes(len as usize)?;
        }
    }
    let params_end = rest.len() - r.rest().len();
    let nresults = r.i16()?.max(0) as usize;
    let mut codes = Vec::with_capacity(nresults + extra);
    for _ in 0..nresults {
        codes.push(r.i16()?);
    }
    let mut out = rest[..params_end].to_vec();
    if nresults > 1 && extra > 0 {
        codes.resize(nresults + extra, 0);
    }
    out.extend_from_slice(&(codes.len() as i16).to_be_bytes());
    for c in codes {
        out.extend_from_slice(&c.to_be_bytes());
    }
    Some(out)
}

/// Describe or Close: `b'S'` statement or `b'P'` portal, and its name.
pub fn target<'a>(body: &'a [u8], what: &'static str) -> Result<(u8, &'a [u8]), Malformed> {
    let m = Malformed(what);
    let mut r = Reader::new(body);
    let kind = r.u8().ok_or(m)?;
    let name = r.cstr().ok_or(m)?;
    if !matches!(kind, b'S' | b'P') || !r.rest().is_empty() {
        return Err(m);
    }
    Ok((kind, name))
}

/// Execute: portal name (the row limit is left in the raw frame).
pub fn execute_portal(body: &[u8]) -> Result<&[u8], Malformed> {
    execute(body).map(|(portal, _)| portal)
}

/// Execute: the portal, and the most rows to return (0: every row).
pub fn execute(body: &[u8]) -> Result<(&[u8], i32), Malformed> {
    let m = Malformed("Execute");
    let mut r = Reader::new(body);
    let portal = r.cstr().ok_or(m)?;
    let max_rows = r.i32().ok_or(m)?;
    Ok((portal, max_rows))
}

/// Query: the SQL text.
pub fn query(body: &[u8]) -> Result<&[u8], Malformed> {
    let m = Malformed("Query");
    let mut r = Reader::new(body);
    let q = r.cstr().ok_or(m)?;
    Ok(q)
}

/// A Bind's `rest` that binds only the parameters `picks` (0-based, in
/// that order; each with its own format code), with the original result
/// formats. `None` when `rest` is malformed or a pick is out of range.
pub fn bind_rest_subset(rest: &[u8], picks: &[usize]) -> Option<Vec<u8>> {
    let params = bind_params(rest)?;
    // The result formats follow the parameters.
    let mut r = Reader::new(rest);
    let nformats = r.i16()?.max(0) as usize;
    r.bytes(2 * nformats)?;
    let n = r.i16()?.max(0);
    for _ in 0..n {
        let len = r.i32()?;
        if len > 0 {
            r.bytes(len as usize)?;
        }
    }
    let results = r.rest();
    let mut out = Vec::with_capacity(rest.len());
    out.extend_from_slice(&(picks.len() as i16).to_be_bytes());
    for &i in picks {
        out.extend_from_slice(&params.get(i)?.0.to_be_bytes());
    }
    out.extend_from_slice(&(picks.len() as i16).to_be_bytes());
    for &i in picks {
        match params[i].1 {
            Some(v) => {
                out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                out.extend_from_slice(v);
            }
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    out.extend_from_slice(results);
    Some(out)
}

/// A Parse definition: the query, its NUL, and the parameter types.
pub fn definition(query: &str, types: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(query.len() + 3 + 4 * types.len());
    out.extend_from_slice(query.as_bytes());
    out.push(0);
    out.extend_from_slice(&(types.len() as i16).to_be_bytes());
    for t in types {
        out.extend_from_slice(&t.to_be_bytes());
    }
    out
}

/// A Parse definition's query text and declared parameter types, in one
/// scan. A simple query's text (no NUL) is all query and declares none.
pub fn definition_parts(definition: &[u8]) -> (&[u8], ParamTypes) {
    let Some(end) = memchr::memchr(0, definition) else {
        return (definition, ParamTypes::new());
    };
    let query = &definition[..end];
    let mut r = Reader::new(&definition[end + 1..]);
    let Some(n) = r.i16() else {
        return (query, ParamTypes::new());
    };
    let mut types = ParamTypes::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        match r.i32() {
            Some(oid) => types.push(oid as u32),
            None => return (query, ParamTypes::new()),
        }
    }
    (query, types)
}

/// A Parse's declared parameter types, on the stack for up to eight.
pub type ParamTypes = smallvec::SmallVec<[u32; 8]>;

/// The parameter type OIDs a Parse definition (`query\0`, count, OIDs)
/// declares; empty when it declares none or is cut short.
pub fn definition_param_types(definition: &[u8]) -> ParamTypes {
    definition_parts(definition).1
}

pub fn write_parse(buf: &mut BytesMut, name: &[u8], definition: &[u8]) {
    put_message(buf, PARSE, |b| {
        put_cstr(b, name);
        b.extend_from_slice(definition);
    });
}

pub fn write_bind(buf: &mut BytesMut, portal: &[u8], statement: &[u8], rest: &[u8]) {
    put_message(buf, BIND, |b| {
        put_cstr(b, portal);
        put_cstr(b, statement);
        b.extend_from_slice(rest);
    });
}

pub fn write_target(buf: &mut BytesMut, tag: u8, kind: u8, name: &[u8]) {
    put_message(buf, tag, |b| {
        b.extend_from_slice(&[kind]);
        put_cstr(b, name);
    });
}

pub fn write_execute(buf: &mut BytesMut, portal: &[u8], max_rows: i32) {
    put_message(buf, EXECUTE, |b| {
        put_cstr(b, portal);
        b.extend_from_slice(&max_rows.to_be_bytes());
    });
}

pub fn write_sync(buf: &mut BytesMut) {
    put_message(buf, SYNC, |_| {});
}

pub fn write_flush(buf: &mut BytesMut) {
    put_message(buf, FLUSH, |_| {});
}

pub fn write_query(buf: &mut BytesMut, sql: &str) {
    put_message(buf, QUERY, |b| put_cstr(b, sql.as_bytes()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition_parts(d: &[u8]) -> (&[u8], Vec<u32>) {
        let (query, types) = super::definition_parts(d);
        (query, types.to_vec())
    }

    #[test]
    fn malformed_messages_are_told_apart() {
        assert!(well_formed(PARSE, b"s\0SELECT 1\0\0\0"));
        // Five types announced, none sent.
        assert!(!well_formed(PARSE, b"s\0SELECT 1\0\0\x05"));
        assert!(well_formed(EXECUTE, b"\0\0\0\0\0"));
        assert!(!well_formed(EXECUTE, b"\0\0"));
        assert!(!well_formed(QUERY, b"SELECT 1"));
        assert!(well_formed(SYNC, b""));
        assert!(!well_formed(b'z', b"hello"));
    }

    #[test]
    fn a_definition_splits_into_its_query_and_declared_types() {
        let d = definition("SELECT $1, $2", &[20, 25]);
        assert_eq!(definition_parts(&d), (&b"SELECT $1, $2"[..], vec![20, 25]));
        assert_eq!(definition_param_types(&d).to_vec(), vec![20, 25]);
        // More than fit on the stack.
        let many: Vec<u32> = (1..=20).collect();
        assert_eq!(definition_parts(&definition("SELECT 1", &many)).1, many);
        // A simple query's text: all query, no types.
        assert_eq!(definition_parts(b"SELECT 1"), (&b"SELECT 1"[..], vec![]));
        // Types cut short: none read.
        assert_eq!(
            definition_parts(b"SELECT $1\0\0\x02\0\0\0\x14"),
            (&b"SELECT $1"[..], vec![])
        );
        assert_eq!(definition_parts(b"SELECT 1\0"), (&b"SELECT 1"[..], vec![]));
    }

    #[test]
    fn a_bind_subset_keeps_each_parameter_with_its_format() {
        // Formats [0, 1, 0]; values 'a', x'0102', NULL; result formats [1].
        let rest = [
            0, 3, 0, 0, 0, 1, 0, 0, // formats
            0, 3, 0, 0, 0, 1, b'a', 0, 0, 0, 2, 1, 2, 255, 255, 255, 255, // values
            0, 1, 0, 1, // result formats
        ];
        let out = bind_rest_subset(&rest, &[2, 1]).unwrap();
        assert_eq!(
            bind_params(&out).unwrap().to_vec(),
            vec![(0, None), (1, Some(&[1u8, 2][..]))]
        );
        assert_eq!(&out[out.len() - 4..], &[0, 1, 0, 1]);
        // One format code for all: each picked parameter keeps it.
        let rest = [0, 1, 0, 1, 0, 2, 0, 0, 0, 1, 7, 0, 0, 0, 1, 8, 0, 0];
        let out = bind_rest_subset(&rest, &[1]).unwrap();
        assert_eq!(
            bind_params(&out).unwrap().to_vec(),
            vec![(1, Some(&[8u8][..]))]
        );
        // Twelve parameters, each with its own format: more than fit on
        // the stack; a format list shorter than the parameters is refused.
        let mut rest = vec![0, 12];
        for i in 0..12 {
            rest.extend([0, (i % 2) as u8]);
        }
        rest.extend([0, 12]);
        for i in 0..12u8 {
            rest.extend([0, 0, 0, 1, i]);
        }
        let want: Vec<(i16, Option<&[u8]>)> = (0..12u8)
            .map(|i| {
                (
                    i16::from(i % 2),
                    Some(&rest[rest.len() - 60 + 5 * i as usize + 4..][..1]),
                )
            })
            .collect();
        assert_eq!(bind_params(&rest).unwrap().to_vec(), want);
        rest[1] = 11;
        rest.drain(24..26);
        assert!(bind_params(&rest).is_none());
        assert!(bind_rest_subset(&rest, &[2]).is_none());
        assert!(bind_rest_subset(&rest[..9], &[0]).is_none());
    }

    #[test]
    fn a_bind_gets_result_formats_for_extra_columns() {
        // One text parameter 'ab', then result formats [1, 0].
        let mut rest = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 2, b'a', b'b', 0, 2, 0, 1, 0, 0];
        let out = with_extra_result_columns(&rest, 2).unwrap();
        assert_eq!(&out[..12], &rest[..12]);
        assert_eq!(&out[12..], &[0, 4, 0, 1, 0, 0, 0, 0, 0, 0]);
        // One code (or none) already covers every column.
        rest.truncate(12);
        rest.extend_from_slice(&[0, 1, 0, 1]);
        assert_eq!(with_extra_result_columns(&rest, 2).unwrap(), rest);
        assert!(with_extra_result_columns(&rest[..5], 2).is_none());
    }

    #[test]
    fn parse_and_rewrite() {
        let mut b = BytesMut::new();
        write_parse(&mut b, b"s1", b"SELECT $1\0\0\x01\0\0\0\x17");
        let p = parse(&b[5..]).unwrap();
        assert_eq!(p.name, b"s1");
        assert_eq!(p.query, b"SELECT $1");
        assert_eq!(p.definition, b"SELECT $1\0\0\x01\0\0\0\x17");
        assert!(
            parse(b"s1\0SELECT\0\0\x02\0\0\0\x17").is_err(),
            "type list too short"
        );
        assert!(parse(b"s1").is_err());
    }

    #[test]
    fn bind_and_targets() {
        let mut b = BytesMut::new();
        write_bind(&mut b, b"", b"stmt", b"\0\0\0\0\0\0");
        let m = bind(&b[5..]).unwrap();
        assert_eq!(
            (m.portal, m.statement, m.rest),
            (&b""[..], &b"stmt"[..], &b"\0\0\0\0\0\0"[..])
        );
        let mut b = BytesMut::new();
        write_target(&mut b, CLOSE, b'S', b"x");
        assert_eq!(target(&b[5..], "Close").unwrap(), (b'S', &b"x"[..]));
        assert!(target(b"Qx\0", "Close").is_err());
        assert!(target(b"S", "Close").is_err());
        assert_eq!(execute_portal(b"p\0\0\0\0\0").unwrap(), b"p");
        assert!(execute_portal(b"p\0\0").is_err());
        assert_eq!(query(b"SELECT 1\0").unwrap(), b"SELECT 1");
        assert!(query(b"SELECT 1").is_err());
    }
}
