//! Rows streamed from one server to another: `COPY (SELECT ...) TO STDOUT`
//! on the source feeds `COPY ... FROM STDIN` on the target as the bytes
//! arrive, so memory holds a few messages, never a table. Rows are counted
//! from the stream itself, for progress.

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use std::pin::pin;

/// The COPY format used between servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Binary: no text conversion on either side (same column types).
    Binary,
    /// Text: for types without binary input/output.
    Text,
}

impl Format {
    pub fn sql(self) -> &'static str {
        match self {
            Format::Binary => "binary",
            Format::Text => "text",
        }
    }
}

/// Counts rows in a COPY stream cut anywhere.
///
/// Binary: an 11-byte signature, flags and an extension area, then per row
/// a field count (`-1` ends the data) and per field a length (`-1`: NULL)
/// and its bytes. Text: one line per row.
#[derive(Debug)]
pub struct RowCounter {
    format: Format,
    state: State,
    /// Bytes of a big-endian integer read so far.
    partial: [u8; 4],
    have: usize,
    /// Bytes still to skip (field data, header).
    skip: u64,
    fields_left: u16,
    pub rows: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Signature and flags are skipped; the extension length is next.
    HeaderExtension,
    FieldCount,
    FieldLength,
    Done,
}

impl RowCounter {
    pub fn new(format: Format) -> RowCounter {
        RowCounter {
            format,
            state: State::HeaderExtension,
            partial: [0; 4],
            have: 0,
            skip: 11 + 4,
            fields_left: 0,
            rows: 0,
        }
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        if self.format == Format::Text {
            self.rows += data.iter().filter(|&&b| b == b'\n').count() as u64;
            return;
        }
        while !data.is_empty() && self.state != State::Done {
            if self.skip > 0 {
                let n = (self.skip as usize).min(data.len());
                self.skip -= n as u64;
                data = &data[n..];
                continue;
            }
            let want = if self.state == State::FieldCount {
                2
            } else {
                4
            };
            let n = (want - self.have).min(data.len());
            self.partial[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have < want {
                return;
            }
            self.have = 0;
            match self.state {
                State::HeaderExtension => {
                    self.skip = u32::from_be_bytes(self.partial) as u64;
                    self.state = State::FieldCount;
                }
                State::FieldCount => {
                    let count = i16::from_be_bytes([self.partial[0], self.partial[1]]);
                    if count < 0 {
                        self.state = State::Done;
                    } else {
                        self.rows += 1;
                        self.fields_left = count as u16;
                        if count > 0 {
                            self.state = State::FieldLength;
                        }
                    }
                }
                State::FieldLength => {
                    let len = i32::from_be_bytes(self.partial);
                    self.skip = len.max(0) as u64;
                    self.fields_left -= 1;
                    if self.fields_left == 0 {
                        self.state = State::FieldCount;
                    }
                }
                State::Done => {}
            }
        }
    }
}

/// Streams `COPY (select) TO STDOUT` from `source` into `COPY into FROM
/// STDIN` on `target` (usually inside the caller's transaction). `on_rows`
/// is told each time more rows have passed. `stop_midway` is called once,
/// after the first message has been sent (a test hook).
/// Returns the rows the target stored.
pub async fn stream(
    source: &tokio_postgres::Client,
    target: &tokio_postgres::Transaction<'_>,
    select: &str,
    into: &str,
    format: Format,
    mut on_rows: impl FnMut(u64),
    mut stop_midway: impl FnMut(),
) -> Result<u64, CopyError> {
    let options = format!("(FORMAT {})", format.sql());
    let sink = target
        .copy_in::<_, Bytes>(&format!("COPY {into} FROM STDIN {options}"))
        .await
        .map_err(CopyError::Target)?;
    let mut sink = pin!(sink);
    let out = source
        .copy_out(&format!("COPY ({select}) TO STDOUT {options}"))
        .await
        .map_err(CopyError::Source)?;
    let mut out = pin!(out);
    let mut counter = RowCounter::new(format);
    let mut reported = 0;
    let mut first = true;
    while let Some(chunk) = out.next().await {
        let chunk = chunk.map_err(CopyError::Source)?;
        counter.feed(&chunk);
        sink.feed(chunk).await.map_err(CopyError::Target)?;
        if counter.rows >= reported + 1000 {
            on_rows(counter.rows - reported);
            reported = counter.rows;
        }
        if first {
            first = false;
            stop_midway();
        }
    }
    let stored = sink.as_mut().finish().await.map_err(CopyError::Target)?;
    on_rows(counter.rows - reported);
    Ok(stored)
}

/// Which side of a copy failed.
#[derive(Debug)]
pub enum CopyError {
    Source(tokio_postgres::Error),
    Target(tokio_postgres::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binary COPY stream of `rows` rows of (int8, text or NULL).
    fn binary(rows: u64) -> Vec<u8> {
        let mut b = b"PGCOPY\n\xff\r\n\0".to_vec();
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&4u32.to_be_bytes());
        b.extend_from_slice(b"ext!");
        for i in 0..rows {
            b.extend_from_slice(&2i16.to_be_bytes());
            b.extend_from_slice(&8i32.to_be_bytes());
            b.extend_from_slice(&(i as i64).to_be_bytes());
            if i % 3 == 0 {
                b.extend_from_slice(&(-1i32).to_be_bytes());
            } else {
                let text = "x".repeat(i as usize % 17);
                b.extend_from_slice(&(text.len() as i32).to_be_bytes());
                b.extend_from_slice(text.as_bytes());
            }
        }
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b
    }

    #[test]
    fn counts_binary_rows_however_the_stream_is_cut() {
        let data = binary(500);
        for cut in [1usize, 2, 3, 5, 7, 64, 4096, data.len()] {
            let mut c = RowCounter::new(Format::Binary);
            for piece in data.chunks(cut) {
                c.feed(piece);
            }
            assert_eq!(c.rows, 500, "pieces of {cut}");
            assert_eq!(c.state, State::Done);
        }
        let mut c = RowCounter::new(Format::Binary);
        c.feed(&binary(0));
        assert_eq!(c.rows, 0);
    }

    #[test]
    fn counts_text_rows() {
        let mut c = RowCounter::new(Format::Text);
        c.feed(b"1\ta\\nb\n2\t");
        c.feed(b"\\N\n");
        assert_eq!(c.rows, 2);
    }
}
