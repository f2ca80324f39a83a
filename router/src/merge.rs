//! Comparing result values as PostgreSQL orders them, for merging sorted
//! streams from several shards.
//!
//! A sort column's values arrive in text or binary format; `decode` turns one
//! into a [`Value`] whose order (`compare`) is the server's default btree
//! order for its type: NaN above every number (float and numeric), `-0 = 0`,
//! numeric by value whatever its scale (`1.0 = 1.00`), infinities at the
//! ends of dates and timestamps, `bpchar` without its trailing blanks,
//! timestamptz by instant whatever the offset it is printed with.
//!
//! Text compares byte by byte: that is the order of the `C` and `C.UTF-8`
//! collations (UTF-8 bytes sort as code points). Other collations order text
//! differently, so a merge of text keys is valid only under those two; the
//! planner must refuse otherwise.
//!
//! `tests/tests/merge_order.rs` holds every kind, in both formats, to a
//! server's own ranking (text under `C` and `C.utf8`). The cross-shard merge
//! (`gather`) compares sort keys, group keys and MIN/MAX with it.

use crate::numeric::Num;
use postgres_protocol::types;
use std::cmp::Ordering;

/// Type OIDs (`pg_type.oid`).
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
}

/// How values of a type are decoded and compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    /// int2, int4, int8.
    Int,
    /// oid: unsigned.
    Oid,
    Float,
    Numeric,
    /// text, varchar, name: bytes.
    Text,
    /// character(n): bytes without trailing blanks.
    Bpchar,
    Date,
    Timestamp,
    TimestampTz,
    Uuid,
}

impl Kind {
    /// The kind of a type, or `None` when merging cannot compare it.
    pub fn of_type(oid: u32) -> Option<Kind> {
        Some(match oid {
            oid::BOOL => Kind::Bool,
            oid::INT2 | oid::INT4 | oid::INT8 => Kind::Int,
            oid::OID => Kind::Oid,
            oid::FLOAT4 | oid::FLOAT8 => Kind::Float,
            oid::NUMERIC => Kind::Numeric,
            oid::TEXT | oid::VARCHAR | oid::NAME => Kind::Text,
            oid::BPCHAR => Kind::Bpchar,
            oid::DATE => Kind::Date,
            oid::TIMESTAMP => Kind::Timestamp,
            oid::TIMESTAMPTZ => Kind::TimestampTz,
            oid::UUID => Kind::Uuid,
            _ => return None,
        })
    }
}

/// The wire format of a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Binary,
}

/// A decoded sort value. Values of one kind compare with `Ord`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Value {
    Bool(bool),
    /// Integers; dates in days and timestamps in microseconds since
    /// 2000-01-01 (UTC for timestamptz), infinities at the ends.
    Int(i64),
    Float(FloatKey),
    Numeric(NumKey),
    Bytes(Vec<u8>),
}

/// A float in PostgreSQL's order: NaN above everything and equal to
/// itself, `-0 = 0`.
#[derive(Debug, Clone, Copy)]
pub struct FloatKey(f64);

impl FloatKey {
    pub fn new(v: f64) -> FloatKey {
        FloatKey(v)
    }
}

impl PartialEq for FloatKey {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for FloatKey {}

impl PartialOrd for FloatKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for FloatKey {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self.0.is_nan(), other.0.is_nan()) {
            (true, true) => Ordering::Equal,
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            // -0 == 0 under partial_cmp.
            (false, false) => self.0.partial_cmp(&other.0).unwrap_or(Ordering::Equal),
        }
    }
}

/// A numeric sort value: equal and ordered by value, whatever its display
/// scale (`1.0 = 1.00`), any precision.
#[derive(Debug, Clone)]
pub struct NumKey(pub Num);

impl NumKey {
    /// From decimal text: `-12.340`, `NaN`, `Infinity`, `-Infinity`.
    pub fn parse(s: &str) -> Option<NumKey> {
        Num::parse(s).map(NumKey)
    }
}

impl PartialEq for NumKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.cmp_value(&other.0) == Ordering::Equal
    }
}

impl Eq for NumKey {}

impl PartialOrd for NumKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for NumKey {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.cmp_value(&other.0)
    }
}

/// Decodes one non-NULL value of a sort column.
pub fn decode(kind: Kind, format: Format, b: &[u8]) -> Result<Value, String> {
    let bad = || {
        format!(
            "cannot compare a {kind:?} value in {format:?} format: {:?}",
            String::from_utf8_lossy(&b[..b.len().min(40)])
        )
    };
    let text = || std::str::from_utf8(b).map_err(|_| bad());
    let value = match (kind, format) {
        (Kind::Bool, Format::Text) => match b {
            b"t" => Some(Value::Bool(true)),
            b"f" => Some(Value::Bool(false)),
            _ => None,
        },
        (Kind::Bool, Format::Binary) => types::bool_from_sql(b).ok().map(Value::Bool),
        (Kind::Int | Kind::Oid, Format::Text) => text()?.parse().ok().map(Value::Int),
        (Kind::Oid, Format::Binary) => types::oid_from_sql(b).ok().map(|x| Value::Int(x as i64)),
        (Kind::Int, Format::Binary) => match b.len() {
            2 => types::int2_from_sql(b).ok().map(i64::from),
            4 => types::int4_from_sql(b).ok().map(i64::from),
            _ => types::int8_from_sql(b).ok(),
        }
        .map(Value::Int),
        (Kind::Float, Format::Text) => match text()? {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            t => t.parse().ok(),
        }
        .map(|f| Value::Float(FloatKey(f))),
        (Kind::Float, Format::Binary) => match b.len() {
            4 => types::float4_from_sql(b).ok().map(f64::from),
            _ => types::float8_from_sql(b).ok(),
        }
        .map(|f| Value::Float(FloatKey(f))),
        (Kind::Numeric, Format::Text) => NumKey::parse(text()?).map(Value::Numeric),
        (Kind::Numeric, Format::Binary) => Num::from_binary(b).map(|n| Value::Numeric(NumKey(n))),
        (Kind::Text | Kind::Uuid, _) => Some(Value::Bytes(b.to_vec())),
        (Kind::Bpchar, _) => {
            let end = b.iter().rposition(|&c| c != b' ').map_or(0, |i| i + 1);
            Some(Value::Bytes(b[..end].to_vec()))
        }
        (Kind::Date, Format::Binary) => match types::date_from_sql(b).ok() {
            Some(i32::MAX) => Some(i64::MAX),
            Some(i32::MIN) => Some(i64::MIN),
            d => d.map(i64::from),
        }
        .map(Value::Int),
        (Kind::Timestamp | Kind::TimestampTz, Format::Binary) => {
            types::timestamp_from_sql(b).ok().map(Value::Int)
        }
        (Kind::Date, Format::Text) => parse_date(text()?).map(Value::Int),
        (Kind::Timestamp, Format::Text) => parse_timestamp(text()?, false).map(Value::Int),
        (Kind::TimestampTz, Format::Text) => parse_timestamp(text()?, true).map(Value::Int),
    };
    value.ok_or_else(bad)
}

/// Compares two values of one sort key (`None`: NULL). NULLs sort last
/// ascending and first descending unless `nulls_first` says otherwise.
pub fn compare(
    a: Option<&Value>,
    b: Option<&Value>,
    descending: bool,
    nulls_first: bool,
) -> Ordering {
    match (a, b) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => {
            if nulls_first {
                Ordering::Less
            } else {
                Ordering::Greater
            }
        }
        (Some(_), None) => {
            if nulls_first {
                Ordering::Greater
            } else {
                Ordering::Less
            }
        }
        (Some(x), Some(y)) if descending => y.cmp(x),
        (Some(x), Some(y)) => x.cmp(y),
    }
}

/// Days from 2000-01-01 to a proleptic Gregorian date (astronomical year).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468 - 10_957
}

/// `YYYY-MM-DD[ BC]`, `infinity`, `-infinity` (DateStyle ISO) → days.
fn parse_date(s: &str) -> Option<i64> {
    match era(s) {
        Ok((s, bc)) => ymd(s, bc),
        Err(infinite) => Some(infinite),
    }
}

/// A date or timestamp's text without its ` BC` suffix (and whether it had
/// one), or `Err` with the value of `infinity` / `-infinity`.
fn era(s: &str) -> Result<(&str, bool), i64> {
    match s {
        "infinity" => Err(i64::MAX),
        "-infinity" => Err(i64::MIN),
        _ => Ok(match s.strip_suffix(" BC") {
            Some(rest) => (rest, true),
            None => (s, false),
        }),
    }
}

fn ymd(s: &str, bc: bool) -> Option<i64> {
    let mut parts = s.splitn(3, '-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next()?.parse().ok()?;
    let d: i64 = parts.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || y < 1 {
        return None;
    }
    let year = if bc { 1 - y } else { y };
    Some(days_from_civil(year, m, d))
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff][±HH[:MM[:SS]]][ BC]` (DateStyle ISO) →
/// microseconds since 2000-01-01 00:00 (UTC when `zoned`).
fn parse_timestamp(s: &str, zoned: bool) -> Option<i64> {
    let (s, bc) = match era(s) {
        Ok(v) => v,
        Err(infinite) => return Some(infinite),
    };
    let (date, time) = s.split_once(' ')?;
    let days = ymd(date, bc)?;
    let (clock, offset) = if zoned {
        let at = time.rfind(['+', '-'])?;
        (&time[..at], Some(&time[at..]))
    } else {
        (time, None)
    };
    let (hms, fraction) = clock.split_once('.').unwrap_or((clock, ""));
    let mut hms = hms.split(':');
    let h: i64 = hms.next()?.parse().ok()?;
    let m: i64 = hms.next()?.parse().ok()?;
    let sec: i64 = hms.next()?.parse().ok()?;
    if fraction.len() > 6 || !fraction.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let micros: i64 = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<6}").parse().ok()?
    };
    let mut total = ((days * 24 + h) * 60 + m) * 60 + sec;
    if let Some(off) = offset {
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let mut parts = off[1..].split(':');
        let oh: i64 = parts.next()?.parse().ok()?;
        let om: i64 = parts.next().map_or(Some(0), |p| p.parse().ok())?;
        let os: i64 = parts.next().map_or(Some(0), |p| p.parse().ok())?;
        total -= sign * ((oh * 60 + om) * 60 + os);
    }
    Some(total * 1_000_000 + micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(kind: Kind, s: &str) -> Value {
        decode(kind, Format::Text, s.as_bytes()).unwrap()
    }

    /// Each text value decodes to less than the next.
    fn ascending(kind: Kind, texts: &[&str]) {
        for w in texts.windows(2) {
            assert!(t(kind, w[0]) < t(kind, w[1]), "{w:?}");
        }
    }

    #[test]
    fn numeric_compares_by_value_at_any_precision() {
        let order = [
            "-Infinity",
            "-100000000000000000000.5",
            "-2",
            "-1.5",
            "-0.000001",
            "0",
            "0.000001",
            "1",
            "1.5",
            "10",
            "99999999999999999999999999.9999",
            "Infinity",
            "NaN",
        ];
        ascending(Kind::Numeric, &order);
        assert_eq!(t(Kind::Numeric, "1.0"), t(Kind::Numeric, "1.000"));
        assert_eq!(t(Kind::Numeric, "-0.00"), t(Kind::Numeric, "0"));
        assert_eq!(t(Kind::Numeric, "007"), t(Kind::Numeric, "7"));
    }

    /// A binary numeric from its 16-bit words (count, weight, sign, scale, digits).
    fn numeric(words: &[u16]) -> Value {
        let b: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
        decode(Kind::Numeric, Format::Binary, &b).unwrap()
    }

    #[test]
    fn numeric_binary_reads_as_its_text() {
        // 12345.678: digits 1 2345 6780, weight 1, dscale 3.
        assert_eq!(
            numeric(&[3, 1, 0, 3, 1, 2345, 6780]),
            t(Kind::Numeric, "12345.678")
        );
        // -0.000012: digit 1200 at weight -2 (1200 × 10000^-2).
        assert_eq!(
            numeric(&[1, (-2i16) as u16, 0x4000, 6, 1200]),
            t(Kind::Numeric, "-0.000012")
        );
        // 20000: digit 2 at weight 1.
        assert_eq!(numeric(&[1, 1, 0, 0, 2]), t(Kind::Numeric, "20000"));
        assert_eq!(numeric(&[0, 0, 0xC000, 0]), t(Kind::Numeric, "NaN"));
    }

    #[test]
    fn floats_put_nan_last_and_zeroes_together() {
        let order = [
            "-Infinity",
            "-1e300",
            "-1",
            "0",
            "1e-300",
            "1",
            "Infinity",
            "NaN",
        ];
        ascending(Kind::Float, &order);
        assert_eq!(t(Kind::Float, "-0"), t(Kind::Float, "0"));
        assert_eq!(t(Kind::Float, "NaN"), t(Kind::Float, "NaN"));
    }

    #[test]
    fn dates_and_timestamps_in_iso_text() {
        assert_eq!(t(Kind::Date, "2000-01-01"), Value::Int(0));
        assert_eq!(t(Kind::Date, "2000-03-01"), Value::Int(60));
        assert_eq!(t(Kind::Date, "1999-12-31"), Value::Int(-1));
        assert!(t(Kind::Date, "0001-01-01 BC") < t(Kind::Date, "0001-01-01"));
        assert!(t(Kind::Date, "-infinity") < t(Kind::Date, "4713-01-01 BC"));
        assert_eq!(
            t(Kind::Timestamp, "2000-01-01 00:00:01.5"),
            Value::Int(1_500_000)
        );
        assert_eq!(
            t(Kind::TimestampTz, "2000-01-01 05:30:00+05:30"),
            Value::Int(0)
        );
        assert_eq!(
            t(Kind::TimestampTz, "1999-12-31 19:00:00-05"),
            Value::Int(0)
        );
        // The same instant printed across a DST change compares equal.
        assert_eq!(
            t(Kind::TimestampTz, "2024-10-27 02:30:00+02"),
            t(Kind::TimestampTz, "2024-10-27 01:30:00+01")
        );
        assert!(decode(Kind::Timestamp, Format::Text, b"01/02/2024 10:00").is_err());
    }

    #[test]
    fn nulls_and_direction() {
        let one = Value::Int(1);
        let two = Value::Int(2);
        assert_eq!(
            compare(Some(&one), Some(&two), false, false),
            Ordering::Less
        );
        assert_eq!(
            compare(Some(&one), Some(&two), true, false),
            Ordering::Greater
        );
        assert_eq!(compare(None, Some(&one), false, false), Ordering::Greater);
        assert_eq!(compare(None, Some(&one), false, true), Ordering::Less);
        assert_eq!(compare(None, None, true, true), Ordering::Equal);
    }

    #[test]
    fn bpchar_ignores_trailing_blanks() {
        assert_eq!(t(Kind::Bpchar, "ab   "), t(Kind::Bpchar, "ab"));
        assert!(t(Kind::Bpchar, "a ") < t(Kind::Bpchar, "a!"));
    }

    #[test]
    fn no_panic_on_any_bytes() {
        let kinds = [
            Kind::Bool,
            Kind::Int,
            Kind::Oid,
            Kind::Float,
            Kind::Numeric,
            Kind::Text,
            Kind::Bpchar,
            Kind::Date,
            Kind::Timestamp,
            Kind::TimestampTz,
            Kind::Uuid,
        ];
        let inputs: [&[u8]; 8] = [
            b"",
            b"-",
            b"\xff\xfe",
            b"1.2.3",
            b"2024-13-45 99:99:99+99:99",
            &[0, 5, 0x80, 0, 0x40, 0, 0, 0],
            &[0, 1, 0, 0, 0, 0, 0, 0, 0xff, 0xff],
            b" BC",
        ];
        for k in kinds {
            for f in [Format::Text, Format::Binary] {
                for i in inputs {
                    let _ = decode(k, f, i);
                }
            }
        }
    }
}
