//! The PostgreSQL wire protocol, IO-free: splitting byte buffers into frames,
//! reading the fields the proxy needs out of a frame without copying it, and
//! building the few messages the proxy writes itself.
//!
//! A frame keeps its raw bytes (tag, length and body) so the data path forwards
//! exactly what the peer sent; inspection borrows from those bytes.

pub mod backend;
pub mod frontend;
pub mod rows;
pub mod startup;

use bytes::{Bytes, BytesMut};

/// One protocol message with its 5-byte header (tag + length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub bytes: Bytes,
}

impl Frame {
    /// The message body, after the tag and length.
    pub fn body(&self) -> &[u8] {
        &self.bytes[5..]
    }
}

/// Why a peer's bytes cannot be framed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("invalid message length {0}")]
    BadLength(i32),
    #[error("message of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge { len: usize, max: usize },
}

/// Reads the header at the start of `buf`: `(tag, total length including tag)`.
#[inline]
pub fn peek_header(buf: &[u8], max: usize) -> Result<Option<(u8, usize)>, FrameError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::BadLength(len));
    }
    let total = len as usize + 1;
    if total > max {
        return Err(FrameError::TooLarge { len: total, max });
    }
    Ok(Some((buf[0], total)))
}

/// How many bytes at the front of `buf` are whole messages whose tags
/// `is_run` takes, none longer than `max`: the run ends at any other
/// message, at one not all here, or at a malformed or oversized one (the
/// caller's framing reports it). Copied whole by whoever forwards them.
#[inline]
pub fn run_of(buf: &[u8], max: usize, is_run: impl Fn(u8) -> bool) -> usize {
    let mut pos = 0;
    while let [tag, a, b, c, d, ..] = buf[pos..] {
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        if !is_run(tag) || len < 4 || len >= max || buf.len() - pos <= len {
            break;
        }
        pos += len + 1;
    }
    pos
}

/// The complete frames at the front of `buf`, as `(tag, body)`, without
/// consuming them; stops at a partial or malformed one.
pub fn complete_frames(buf: &[u8], max: usize) -> impl Iterator<Item = (u8, &[u8])> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        let (tag, len) = peek_header(&buf[pos..], max).ok()??;
        if buf.len() - pos < len {
            return None;
        }
        let body = &buf[pos + 5..pos + len];
        pos += len;
        Some((tag, body))
    })
}

/// The complete messages of the unit at the front of `buf`, as `(tag,
/// body)`, without consuming them: up to and including the first that ends
/// a unit (a simple Query, a FunctionCall or a Sync), or every complete one
/// when that has not come. The one definition of a unit's extent that the
/// steps reading the buffered unit share (planning, the arrival check, the
/// spanning transaction's checks; `Session::take_unit` takes the same).
pub fn unit_messages(buf: &[u8], max: usize) -> impl Iterator<Item = (u8, &[u8])> {
    let mut ended = false;
    complete_frames(buf, max).take_while(move |&(tag, _)| {
        let more = !ended;
        ended = ends_unit(tag);
        more
    })
}

/// A message that ends a unit: a simple Query, a FunctionCall, a Sync.
#[inline]
pub fn ends_unit(tag: u8) -> bool {
    matches!(
        tag,
        frontend::QUERY | frontend::FUNCTION_CALL | frontend::SYNC
    )
}

/// A statement's bytes as text (`None`: not UTF-8). Statements are nearly
/// always ASCII, which a word-at-a-time check confirms in a fraction of a
/// full UTF-8 validation's instructions; anything else is validated.
#[inline]
pub fn text(b: &[u8]) -> Option<&str> {
    if b.is_ascii() {
        // SAFETY: ASCII bytes are UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(b) })
    } else {
        std::str::from_utf8(b).ok()
    }
}

/// Splits one complete frame off the front of `buf`, or returns `None` (and
/// reserves room for the rest of a partly received frame).
pub fn next_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, FrameError> {
    match peek_header(buf, max)? {
        Some((tag, total)) if buf.len() >= total => Ok(Some(Frame {
            tag,
            bytes: buf.split_to(total).freeze(),
        })),
        Some((_, total)) => {
            buf.reserve(total - buf.len());
            Ok(None)
        }
        None => Ok(None),
    }
}

/// A cursor over a message body for reading C strings and integers.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    #[inline]
    pub fn cstr(&mut self) -> Option<&'a [u8]> {
        // The unnamed statement and portal, most drivers' usual names:
        // no search.
        if let [0, rest @ ..] = self.buf {
            self.buf = rest;
            return Some(&[]);
        }
        let end = memchr::memchr(0, self.buf)?;
        let s = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Some(s)
    }

    pub fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.cstr()?).ok()
    }

    pub fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.buf.split_first()?;
        self.buf = rest;
        Some(b)
    }

    pub fn i16(&mut self) -> Option<i16> {
        let v = self.buf.get(..2)?;
        let v = i16::from_be_bytes([v[0], v[1]]);
        self.buf = &self.buf[2..];
        Some(v)
    }

    pub fn i32(&mut self) -> Option<i32> {
        let v = self.buf.get(..4)?;
        let v = i32::from_be_bytes([v[0], v[1], v[2], v[3]]);
        self.buf = &self.buf[4..];
        Some(v)
    }

    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let v = self.buf.get(..n)?;
        self.buf = &self.buf[n..];
        Some(v)
    }

    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }
}

/// A message of `tag` with `body` (for tests).
#[cfg(test)]
pub(crate) fn test_message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_text_is_ascii_or_checked_utf8() {
        assert_eq!(text(b"SELECT 1"), Some("SELECT 1"));
        assert_eq!(text(b""), Some(""));
        let utf8 = "SELECT 'h\u{e9}llo \u{1f600}'";
        assert_eq!(text(utf8.as_bytes()), Some(utf8));
        // Cut inside a character, a lone continuation byte, an overlong NUL.
        assert_eq!(text(&utf8.as_bytes()[..utf8.len() - 2]), None);
        assert_eq!(text(b"SELECT \x80"), None);
        assert_eq!(text(b"SELECT \xc0\x80"), None);
        // Long enough for the word-at-a-time check, non-ASCII at each end.
        let long = format!("\u{e9}{}\u{e9}", "x".repeat(100));
        assert_eq!(text(long.as_bytes()), Some(long.as_str()));
        let mut bad = long.clone().into_bytes();
        bad[101] = 0xff;
        assert_eq!(text(&bad), None);
    }

    #[test]
    fn a_run_takes_whole_messages_of_its_tags_within_the_limit() {
        let m = test_message;
        let copy = |t: u8| t == b'd';
        let buf = [m(b'd', b"12"), m(b'd', &[b'x'; 100]), m(b'c', b"")].concat();
        assert_eq!(run_of(&buf, usize::MAX, copy), 7 + 105);
        // A message of 105 bytes is past a limit of 100: the run stops before it.
        assert_eq!(run_of(&buf, 100, copy), 7);
        assert_eq!(run_of(&buf, 105, copy), 7 + 105);
        assert_eq!(run_of(&buf[..50], usize::MAX, copy), 7);
        assert_eq!(run_of(&buf[7..], 10, copy), 0);
    }

    #[test]
    fn a_unit_is_framed_up_to_its_end() {
        let m = test_message;
        let tags = |buf: &[u8], max| unit_messages(buf, max).map(|(t, _)| t).collect::<Vec<_>>();
        let extended = [
            m(b'P', b"\0SELECT 1\0\0\0"),
            m(b'B', b"\0\0\0\0\0\0\0\0"),
            m(b'E', b"\0\0\0\0\0"),
            m(b'S', b""),
            m(b'Q', b"SELECT 2\0"),
        ]
        .concat();
        assert_eq!(
            tags(&extended, usize::MAX),
            b"PBES",
            "the next unit is not this one's"
        );
        let first = unit_messages(&extended, usize::MAX).next();
        assert_eq!(first, Some((b'P', &b"\0SELECT 1\0\0\0"[..])));
        // A unit whose Sync has not come: every complete message so far.
        let cut = &extended[..extended.len() - 19];
        assert_eq!(tags(cut, usize::MAX), b"PBE");
        assert_eq!(tags(&cut[..cut.len() - 1], usize::MAX), b"PB");
        // A simple query is a unit alone; FunctionCall likewise.
        let simple = &extended[extended.len() - 14..];
        assert_eq!(
            unit_messages(simple, usize::MAX).collect::<Vec<_>>(),
            [(b'Q', &b"SELECT 2\0"[..])]
        );
        assert_eq!(
            tags(&[m(b'F', b"x"), m(b'S', b"")].concat(), usize::MAX),
            b"F"
        );
        // Nothing framed past a message over the limit or malformed.
        assert_eq!(tags(&extended, 10), b"");
        assert_eq!(tags(b"Q\xff\xff\xff\xff", 99), b"");
        assert!(ends_unit(b'Q') && ends_unit(b'F') && ends_unit(b'S') && !ends_unit(b'H'));
    }

    #[test]
    fn frames_split_and_wait_for_more() {
        let mut buf = BytesMut::from(&b"Q\0\0\0\x0bSELECT\0Z\0\0\0"[..]);
        let f = next_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(f.tag, b'Q');
        assert_eq!(f.body(), b"SELECT\0");
        assert_eq!(next_frame(&mut buf, 1024), Ok(None));
        buf.extend_from_slice(b"\x05I");
        let f = next_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!((f.tag, f.body()), (b'Z', &b"I"[..]));
        assert!(buf.is_empty());
    }

    #[test]
    fn bad_lengths_are_errors_not_panics() {
        let mut buf = BytesMut::from(&b"Q\0\0\0\x02"[..]);
        assert_eq!(next_frame(&mut buf, 1024), Err(FrameError::BadLength(2)));
        let mut buf = BytesMut::from(&b"Q\xff\xff\xff\xff"[..]);
        assert_eq!(next_frame(&mut buf, 1024), Err(FrameError::BadLength(-1)));
        let mut buf = BytesMut::from(&b"Q\0\x10\0\0"[..]);
        assert!(matches!(
            next_frame(&mut buf, 1024),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn reader_never_reads_past_the_end() {
        let mut r = Reader::new(b"ab\0\0\x01");
        assert_eq!(r.str(), Some("ab"));
        assert_eq!(r.i16(), Some(1));
        assert_eq!(r.i32(), None);
        assert_eq!(r.cstr(), None);
        assert_eq!(r.u8(), None);
    }

    #[test]
    fn empty_strings_are_read_as_any_other() {
        let mut r = Reader::new(b"\0\0name\0\0");
        assert_eq!(r.cstr(), Some(&b""[..]));
        assert_eq!(r.cstr(), Some(&b""[..]));
        assert_eq!(r.cstr(), Some(&b"name"[..]));
        assert_eq!(r.rest(), b"\0");
        assert_eq!(r.cstr(), Some(&b""[..]));
        assert_eq!(r.cstr(), None);
    }
}
