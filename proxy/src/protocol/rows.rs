//! RowDescription and DataRow, read and written where the proxy builds a
//! result of its own: merged rows across shards, and the rows of its own
//! queries on a server connection. Everywhere else they pass as bytes.

use super::Reader;
use bytes::BytesMut;
use shardline_router::gather::{ClientColumns, FieldType};
use shardline_router::merge::{oid, Format};

/// The size of a field's description after its name: table oid, column
/// number, type oid, type size, type modifier, format.
const FIELD_TAIL: usize = 18;

/// Each field of a RowDescription message (tag and length included): its
/// name (with the NUL) and the 18 bytes that follow it.
fn fields(msg: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let mut r = Reader::new(msg.get(5..)?);
    let n = r.i16()?;
    (0..n.max(0))
        .map(|_| {
            let rest = r.rest();
            let name = &rest[..r.cstr()?.len() + 1];
            Some((name, r.bytes(FIELD_TAIL)?))
        })
        .collect()
}

/// The type and format of each field of a RowDescription message.
pub fn row_description(msg: &[u8]) -> Option<Vec<FieldType>> {
    let fields = fields(msg)?;
    Some(
        fields
            .into_iter()
            .map(|(_, f)| FieldType {
                oid: u32::from_be_bytes([f[6], f[7], f[8], f[9]]),
                format: if i16::from_be_bytes([f[16], f[17]]) == 1 {
                    Format::Binary
                } else {
                    Format::Text
                },
            })
            .collect(),
    )
}

/// The RowDescription the client sees of a merge: the first
/// `cols.visible` fields, the AVG ones typed `numeric` (no table column,
/// no size or modifier), as PostgreSQL types them.
pub fn client_row_description(msg: &[u8], cols: &ClientColumns) -> Option<Vec<u8>> {
    let fields = fields(msg)?;
    if fields.len() < cols.visible {
        return None;
    }
    let mut out = Vec::with_capacity(msg.len());
    out.extend_from_slice(&[super::backend::ROW_DESCRIPTION, 0, 0, 0, 0]);
    out.extend_from_slice(&(cols.visible as i16).to_be_bytes());
    for (i, (name, f)) in fields.into_iter().take(cols.visible).enumerate() {
        out.extend_from_slice(name);
        if cols.numeric.contains(&i) {
            out.extend_from_slice(&[0; 6]);
            out.extend_from_slice(&oid::NUMERIC.to_be_bytes());
            out.extend_from_slice(&(-1i16).to_be_bytes());
            out.extend_from_slice(&(-1i32).to_be_bytes());
            out.extend_from_slice(&f[16..18]);
        } else {
            out.extend_from_slice(f);
        }
    }
    let len = (out.len() - 1) as u32;
    out[1..5].copy_from_slice(&len.to_be_bytes());
    Some(out)
}

/// The values of a DataRow message (tag and length included).
pub fn row_values(msg: &[u8]) -> Option<Vec<Option<&[u8]>>> {
    let mut r = Reader::new(msg.get(5..)?);
    let n = r.i16()?;
    (0..n.max(0))
        .map(|_| match r.i32()? {
            len if len < 0 => Some(None),
            len => r.bytes(len as usize).map(Some),
        })
        .collect()
}

/// Appends a DataRow of `values`.
pub fn data_row<'a>(values: impl ExactSizeIterator<Item = Option<&'a [u8]>>, out: &mut BytesMut) {
    let start = out.len();
    out.extend_from_slice(&[super::backend::DATA_ROW, 0, 0, 0, 0]);
    out.extend_from_slice(&(values.len() as i16).to_be_bytes());
    for v in values {
        match v {
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(b) => {
                out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                out.extend_from_slice(b);
            }
        }
    }
    let len = (out.len() - start - 1) as u32;
    out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A RowDescription of (name, type oid, format) fields.
    fn description(fields: &[(&str, u32, i16)]) -> Vec<u8> {
        let mut out = vec![b'T', 0, 0, 0, 0];
        out.extend_from_slice(&(fields.len() as i16).to_be_bytes());
        for (name, oid, format) in fields {
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            out.extend_from_slice(&7u32.to_be_bytes()); // table
            out.extend_from_slice(&1i16.to_be_bytes()); // column
            out.extend_from_slice(&oid.to_be_bytes());
            out.extend_from_slice(&8i16.to_be_bytes());
            out.extend_from_slice(&(-1i32).to_be_bytes());
            out.extend_from_slice(&format.to_be_bytes());
        }
        let len = (out.len() - 1) as u32;
        out[1..5].copy_from_slice(&len.to_be_bytes());
        out
    }

    #[test]
    fn descriptions_read_and_cut_for_the_client() {
        let d = description(&[("city", 25, 0), ("avg", 20, 1), ("hidden", 20, 0)]);
        assert_eq!(
            row_description(&d).unwrap(),
            [
                FieldType {
                    oid: 25,
                    format: Format::Text
                },
                FieldType {
                    oid: 20,
                    format: Format::Binary
                },
                FieldType {
                    oid: 20,
                    format: Format::Text
                },
            ]
        );
        let client = client_row_description(
            &d,
            &ClientColumns {
                visible: 2,
                numeric: vec![1],
            },
        )
        .unwrap();
        let mut want = description(&[("city", 25, 0), ("avg", oid::NUMERIC, 1)]);
        // The AVG field: no table or column, no size or modifier.
        let avg = want.len() - FIELD_TAIL;
        want[avg..avg + 6].fill(0);
        want[avg + 10..avg + 12].copy_from_slice(&(-1i16).to_be_bytes());
        assert_eq!(client, want);
        for cut in 0..d.len() - 1 {
            let mut short = d[..cut].to_vec();
            if short.len() >= 5 {
                short[1..5].copy_from_slice(&((cut as u32).saturating_sub(1)).to_be_bytes());
            }
            assert!(row_description(&short).is_none(), "cut at {cut}");
        }
    }

    #[test]
    fn rows_round_trip_and_refuse_short_input() {
        let mut out = BytesMut::new();
        let values = [Some(&b"ab"[..]), None, Some(&b""[..])];
        data_row(values.iter().copied(), &mut out);
        assert_eq!(row_values(&out).unwrap(), values);
        for cut in 0..out.len() {
            assert!(row_values(&out[..cut]).is_none(), "cut at {cut}");
        }
    }
}
