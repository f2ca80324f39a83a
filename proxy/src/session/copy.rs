//! COPY FROM STDIN into a sharded table, split row by row as it streams:
//! text and CSV rows are cut at their line ends (quotes and escapes
//! followed across CopyData messages), binary-format tuples by their field
//! lengths (asyncpg's `copy_records_to_table`, PgJDBC's and pgx's binary
//! copies); each row goes to the shard owning its key. The header (a CSV
//! header line; the binary signature and its flags) and the binary
//! trailer go to every shard.

use crate::protocol::frontend;
use bytes::{BufMut, BytesMut};
use shardline_router::shards::CopyIn;

/// The binary COPY signature.
const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// Appends one COPY row to the output of the shard owning its key (a header
/// line to every shard's).
pub(super) fn route_row(
    g: &shardline_router::sharding::Group,
    shards: &[usize],
    outs: &mut [BytesMut],
    row: &[u8],
    key: KeyField,
) -> Result<(), String> {
    let shard = match key {
        KeyField::Header => {
            for o in outs.iter_mut() {
                put_copy_data(o, row);
            }
            return Ok(());
        }
        KeyField::Null => g.shard_of(None)?,
        KeyField::Value(v) => match g.key_from_text(&v) {
            Some(k) => g.shard_of(Some(&k))?,
            None => return Err(format!("invalid sharding key \"{v}\" in COPY data")),
        },
        KeyField::Binary(v) => match g.key_from_binary(&v) {
            Some(k) => g.shard_of(Some(&k))?,
            None => {
                return Err(format!(
                    "invalid sharding key in binary COPY data ({} bytes; the key column's type is read in its binary format)",
                    v.len()
                ))
            }
        },
    };
    if let Some(i) = shards.iter().position(|&s| s == shard) {
        put_copy_data(&mut outs[i], row);
    }
    Ok(())
}

pub(super) fn put_copy_data(out: &mut BytesMut, row: &[u8]) {
    out.put_u8(frontend::COPY_DATA);
    out.put_i32(row.len() as i32 + 4);
    out.extend_from_slice(row);
}

/// The key field of one COPY row.
pub(super) enum KeyField {
    /// A CSV header line, or the binary header or trailer: to every shard.
    Header,
    Null,
    Value(String),
    /// A binary-format field: the column type's send format.
    Binary(Vec<u8>),
}

/// Cuts COPY text/CSV data into rows (across CopyData boundaries) and
/// reads each row's key field.
pub(super) struct RowSplitter {
    c: CopyIn,
    partial: BytesMut,
    header_pending: bool,
    /// Binary: the trailer (-1) arrived; nothing may follow.
    ended: bool,
}

impl RowSplitter {
    pub(super) fn new(c: CopyIn) -> RowSplitter {
        RowSplitter {
            header_pending: c.header || c.binary,
            c,
            partial: BytesMut::new(),
            ended: false,
        }
    }

    pub(super) fn push(
        &mut self,
        data: &[u8],
        mut emit: impl FnMut(&[u8], KeyField) -> Result<(), String>,
    ) -> Result<(), String> {
        if self.c.binary {
            self.partial.extend_from_slice(data);
            return self.binary_tuples(&mut emit);
        }
        self.partial.extend_from_slice(data);
        let mut start = 0;
        let mut in_quotes = false;
        let buf = std::mem::take(&mut self.partial);
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            if self.c.csv {
                if b == self.c.quote {
                    in_quotes = !in_quotes;
                } else if in_quotes && b == self.c.escape && self.c.escape != self.c.quote {
                    i += 1;
                }
            } else if b == b'\\' {
                i += 2;
                continue;
            }
            if b == b'\n' && !in_quotes {
                let row = &buf[start..=i];
                self.row(row, &mut emit)?;
                start = i + 1;
            }
            i += 1;
        }
        self.partial = BytesMut::from(&buf[start..]);
        Ok(())
    }

    pub(super) fn finish(
        &mut self,
        mut emit: impl FnMut(&[u8], KeyField) -> Result<(), String>,
    ) -> Result<(), String> {
        if self.partial.is_empty() {
            return Ok(());
        }
        if self.c.binary {
            return Err("binary COPY data ends inside a tuple".into());
        }
        let rest = std::mem::take(&mut self.partial);
        self.row(&rest, &mut emit)
    }

    /// Emits every complete binary piece in `partial`: the header, each
    /// tuple with its key field, the trailer; keeps an incomplete tail.
    fn binary_tuples(
        &mut self,
        emit: &mut impl FnMut(&[u8], KeyField) -> Result<(), String>,
    ) -> Result<(), String> {
        let buf = std::mem::take(&mut self.partial);
        let mut pos = 0;
        let be32 = |b: &[u8]| i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        loop {
            let rest = &buf[pos..];
            if self.header_pending {
                if rest.len() < 19 {
                    break;
                }
                if &rest[..11] != SIGNATURE {
                    return Err("COPY file signature not recognized".into());
                }
                let ext = be32(&rest[15..19]);
                let len = usize::try_from(ext)
                    .ok()
                    .and_then(|e| e.checked_add(19))
                    .ok_or("invalid COPY file header (extension length)")?;
                if rest.len() < len {
                    break;
                }
                emit(&rest[..len], KeyField::Header)?;
                self.header_pending = false;
                pos += len;
                continue;
            }
            if rest.is_empty() {
                break;
            }
            if self.ended {
                return Err("binary COPY data after the file trailer".into());
            }
            if rest.len() < 2 {
                break;
            }
            let fields = i16::from_be_bytes([rest[0], rest[1]]);
            if fields == -1 {
                emit(&rest[..2], KeyField::Header)?;
                self.ended = true;
                pos += 2;
                continue;
            }
            let want = self.c.key_column.unwrap_or(usize::MAX);
            if fields < 0 || want >= fields as usize {
                return Err("a COPY row has fewer columns than the key's position".into());
            }
            // Each field: its length (-1: NULL), then its bytes.
            let mut p = 2;
            let mut key = None;
            let mut complete = true;
            for f in 0..fields as usize {
                let Some(head) = rest.get(p..p + 4) else {
                    complete = false;
                    break;
                };
                let len = be32(head);
                p += 4;
                let value = if len < 0 {
                    None
                } else {
                    let Some(v) = rest.get(p..p + len as usize) else {
                        complete = false;
                        break;
                    };
                    p += len as usize;
                    Some(v)
                };
                if f == want {
                    key = Some(value.map_or(KeyField::Null, |v| KeyField::Binary(v.to_vec())));
                }
            }
            if !complete {
                break;
            }
            emit(&rest[..p], key.unwrap_or(KeyField::Null))?;
            pos += p;
        }
        self.partial = BytesMut::from(&buf[pos..]);
        Ok(())
    }

    fn row(
        &mut self,
        row: &[u8],
        emit: &mut impl FnMut(&[u8], KeyField) -> Result<(), String>,
    ) -> Result<(), String> {
        if std::mem::take(&mut self.header_pending) {
            return emit(row, KeyField::Header);
        }
        let line = row.strip_suffix(b"\n").unwrap_or(row);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if !self.c.csv && line == b"\\." {
            return Ok(());
        }
        let field = self
            .field(line)
            .ok_or("a COPY row has fewer columns than the key's position")?;
        emit(row, field)
    }

    fn field(&self, line: &[u8]) -> Option<KeyField> {
        let want = self.c.key_column?;
        let d = self.c.delimiter;
        let mut col = 0;
        let mut i = 0;
        let mut cur: Vec<u8> = Vec::new();
        let mut quoted_any = false;
        let mut in_quotes = false;
        while i <= line.len() {
            let end = i == line.len();
            let b = if end { d } else { line[i] };
            if self.c.csv {
                if in_quotes {
                    if b == self.c.escape && line.get(i + 1) == Some(&self.c.quote) && !end {
                        cur.push(self.c.quote);
                        i += 2;
                        continue;
                    }
                    if b == self.c.quote && !end {
                        in_quotes = false;
                        i += 1;
                        continue;
                    }
                    if !end {
                        cur.push(b);
                        i += 1;
                        continue;
                    }
                } else if b == self.c.quote && !end {
                    in_quotes = true;
                    quoted_any = true;
                    i += 1;
                    continue;
                }
            } else if b == b'\\' && !end {
                let next = *line.get(i + 1)?;
                cur.push(match next {
                    b'n' => b'\n',
                    b't' => b'\t',
                    b'r' => b'\r',
                    b'b' => 8,
                    b'f' => 12,
                    b'v' => 11,
                    b'N' => {
                        if col == want && cur.is_empty() {
                            // \N alone is NULL.
                            i += 2;
                            if i == line.len() || line[i] == d {
                                return Some(KeyField::Null);
                            }
                            continue;
                        }
                        b'N'
                    }
                    other => other,
                });
                i += 2;
                continue;
            }
            if b == d {
                if col == want {
                    let text = String::from_utf8_lossy(&cur).into_owned();
                    if self.c.csv && !quoted_any && text == self.c.null {
                        return Some(KeyField::Null);
                    }
                    return Some(KeyField::Value(text));
                }
                col += 1;
                cur.clear();
                quoted_any = false;
                i += 1;
                continue;
            }
            cur.push(b);
            i += 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(csv: bool, key: usize) -> CopyIn {
        CopyIn {
            key_column: Some(key),
            column: "id".into(),
            table: "t".into(),
            csv,
            binary: false,
            header: false,
            delimiter: if csv { b',' } else { b'\t' },
            null: if csv { String::new() } else { "\\N".into() },
            quote: b'"',
            escape: b'"',
        }
    }

    fn keys(c: CopyIn, chunks: &[&[u8]]) -> Vec<String> {
        let mut s = RowSplitter::new(c);
        let mut out = Vec::new();
        let mut f = |row: &[u8], k: KeyField| {
            out.push(match k {
                KeyField::Header => "H".to_string(),
                KeyField::Null => "NULL".to_string(),
                KeyField::Value(v) => format!("{v}|{}", String::from_utf8_lossy(row).trim_end()),
                KeyField::Binary(v) => format!("{v:?}|{}", row.len()),
            });
            Ok(())
        };
        for c in chunks {
            s.push(c, &mut f).unwrap();
        }
        s.finish(&mut f).unwrap();
        out
    }

    #[test]
    fn text_rows_split_across_chunks() {
        let got = keys(
            copy(false, 1),
            &[b"a\t1\tx\nb\\\tq\t2", b"2\ty\n\\N\t\\N\n", b"c\t3"],
        );
        assert_eq!(got, vec!["1|a\t1\tx", "22|b\\\tq\t22\ty", "NULL", "3|c\t3"]);
    }

    #[test]
    fn csv_quotes_hold_newlines_and_delimiters() {
        let got = keys(
            copy(true, 0),
            &[b"\"1\",\"a,\nb\"\n", b"2,\"x\"\"y\"\n,z\n"],
        );
        assert_eq!(got, vec!["1|\"1\",\"a,\nb\"", "2|2,\"x\"\"y\"", "NULL"]);
    }

    /// A binary COPY stream: header, tuples (id int8, name text or NULL),
    /// trailer.
    fn binary_stream(rows: &[(i64, Option<&str>)]) -> Vec<u8> {
        let mut b = SIGNATURE.to_vec();
        b.extend_from_slice(&0i32.to_be_bytes());
        b.extend_from_slice(&0i32.to_be_bytes());
        for (id, name) in rows {
            b.extend_from_slice(&2i16.to_be_bytes());
            b.extend_from_slice(&8i32.to_be_bytes());
            b.extend_from_slice(&id.to_be_bytes());
            match name {
                Some(n) => {
                    b.extend_from_slice(&(n.len() as i32).to_be_bytes());
                    b.extend_from_slice(n.as_bytes());
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b
    }

    #[test]
    fn binary_tuples_split_at_any_chunk_boundary() {
        let stream = binary_stream(&[(1, Some("a")), (258, None), (-3, Some("ccc"))]);
        let mut c = copy(false, 0);
        c.binary = true;
        let want = vec![
            "H".to_string(),
            format!("{:?}|{}", 1i64.to_be_bytes().to_vec(), 2 + 12 + 5),
            format!("{:?}|{}", 258i64.to_be_bytes().to_vec(), 2 + 12 + 4),
            format!("{:?}|{}", (-3i64).to_be_bytes().to_vec(), 2 + 12 + 7),
            "H".to_string(),
        ];
        // Whole, byte by byte, and in uneven chunks: the same pieces.
        for size in [stream.len(), 1, 5, 13] {
            let chunks: Vec<&[u8]> = stream.chunks(size).collect();
            assert_eq!(keys(c.clone(), &chunks), want, "chunks of {size}");
        }
        // The key in the second column: NULL there.
        let mut c2 = c.clone();
        c2.key_column = Some(1);
        assert_eq!(keys(c2, &[&stream])[2], "NULL");
    }

    #[test]
    fn broken_binary_streams_are_errors() {
        let mut c = copy(false, 0);
        c.binary = true;
        let run = |c: &CopyIn, data: &[u8]| {
            let mut s = RowSplitter::new(c.clone());
            let mut f = |_: &[u8], _: KeyField| Ok(());
            s.push(data, &mut f).and_then(|_| s.finish(&mut f))
        };
        let stream = binary_stream(&[(1, Some("a"))]);
        assert!(run(&c, &stream).is_ok());
        assert!(
            run(&c, &stream[..stream.len() - 4]).is_err(),
            "ends inside a tuple"
        );
        assert!(
            run(&c, b"PGCOPY\nXXXXXXXXXXXXXXXXXXXX").is_err(),
            "signature"
        );
        let mut after = stream.clone();
        after.extend_from_slice(&stream[19..]);
        assert!(run(&c, &after).is_err(), "data after the trailer");
        let mut c3 = c.clone();
        c3.key_column = Some(2);
        assert!(run(&c3, &stream).is_err(), "too few columns");
    }
}
