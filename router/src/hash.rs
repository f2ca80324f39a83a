//! Key hashing identical to PostgreSQL's `PARTITION BY HASH`.
//!
//! Rows placed by Shardline then agree with native hash partitions, and
//! Postgres itself can check the placement (`hashint8extended(k, seed)`,
//! `satisfies_hash_partition`). The functions are Bob Jenkins' lookup3 as
//! PostgreSQL's `hashfn.c` uses it, with the partition seed.

/// `HASH_PARTITION_SEED` in PostgreSQL's `partition.h`.
pub const SEED: u64 = 0x7A5B_2236_7996_DCFD;

/// A sharding key value, typed as the key column is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyValue {
    /// smallint, integer and bigint hash alike.
    Int(i64),
    /// text and varchar (deterministic collations hash the bytes).
    Text(String),
    /// uuid, as its 16 bytes.
    Uuid([u8; 16]),
}

impl KeyValue {
    /// The column hash: `hashint8extended`, `hashtextextended` or
    /// `uuid_hash_extended` with the partition seed.
    pub fn hash(&self) -> u64 {
        match self {
            KeyValue::Int(v) => hash_int8(*v, SEED),
            KeyValue::Text(s) => hash_bytes(s.as_bytes(), SEED),
            KeyValue::Uuid(u) => hash_bytes(u, SEED),
        }
    }
}

/// The key as its column's text output (`42`, `abc`,
/// `a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11`).
impl std::fmt::Display for KeyValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyValue::Int(v) => write!(f, "{v}"),
            KeyValue::Text(s) => f.write_str(s),
            KeyValue::Uuid(u) => {
                for (i, b) in u.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        f.write_str("-")?;
                    }
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }
    }
}

/// The row hash native partitioning computes for a key of several columns
/// (NULL columns are skipped, as Postgres skips them).
pub fn row_hash<'a>(columns: impl IntoIterator<Item = Option<&'a KeyValue>>) -> u64 {
    columns
        .into_iter()
        .flatten()
        .fold(0, |acc, v| hash_combine64(acc, v.hash()))
}

/// PostgreSQL's `hash_combine64`.
pub fn hash_combine64(a: u64, b: u64) -> u64 {
    a ^ (b
        .wrapping_add(0x49a0_f4dd_15e5_a8e3)
        .wrapping_add(a << 54)
        .wrapping_add(a >> 7))
}

/// `hashint8extended`: folds the high half into the low half so that int2,
/// int4 and int8 of equal value hash alike.
pub fn hash_int8(v: i64, seed: u64) -> u64 {
    let lo = v as u32;
    let hi = (v >> 32) as u32;
    let folded = if v >= 0 { lo ^ hi } else { lo ^ !hi };
    hash_uint32(folded, seed)
}

fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

fn finish(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

fn start(len: u32, seed: u64) -> (u32, u32, u32) {
    let init = 0x9e37_79b9u32.wrapping_add(len).wrapping_add(3_923_095);
    let (mut a, mut b, mut c) = (init, init, init);
    if seed != 0 {
        a = a.wrapping_add((seed >> 32) as u32);
        b = b.wrapping_add(seed as u32);
        mix(&mut a, &mut b, &mut c);
    }
    (a, b, c)
}

/// `hash_uint32_extended`.
pub fn hash_uint32(k: u32, seed: u64) -> u64 {
    let (mut a, mut b, mut c) = start(4, seed);
    a = a.wrapping_add(k);
    finish(&mut a, &mut b, &mut c);
    ((b as u64) << 32) | c as u64
}

/// `hash_bytes_extended` (little-endian byte order, as on every platform
/// Postgres runs on here; the result does not depend on alignment).
pub fn hash_bytes(key: &[u8], seed: u64) -> u64 {
    let (mut a, mut b, mut c) = start(key.len() as u32, seed);
    let word = |k: &[u8]| u32::from_le_bytes([k[0], k[1], k[2], k[3]]);
    let mut k = key;
    while k.len() >= 12 {
        a = a.wrapping_add(word(&k[0..4]));
        b = b.wrapping_add(word(&k[4..8]));
        c = c.wrapping_add(word(&k[8..12]));
        mix(&mut a, &mut b, &mut c);
        k = &k[12..];
    }
    // The last 0..11 bytes; the lowest byte of c is left for the length.
    let byte = |i: usize, shift: u32| (k[i] as u32) << shift;
    let n = k.len();
    if n >= 9 {
        for i in 8..n {
            c = c.wrapping_add(byte(i, 8 * (i as u32 - 7)));
        }
    }
    for i in 4..n.min(8) {
        b = b.wrapping_add(byte(i, 8 * (i as u32 - 4)));
    }
    for i in 0..n.min(4) {
        a = a.wrapping_add(byte(i, 8 * i as u32));
    }
    finish(&mut a, &mut b, &mut c);
    ((b as u64) << 32) | c as u64
}

/// Parses a uuid in any of the spellings Postgres accepts: hex digits with
/// optional hyphens (after any group of four digits), optional braces.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let s = s.trim();
    let s = s
        .strip_prefix('{')
        .and_then(|r| r.strip_suffix('}'))
        .unwrap_or(s);
    let mut out = [0u8; 16];
    let mut digits = 0;
    let mut prev_hyphen = true;
    for ch in s.chars() {
        if ch == '-' {
            if prev_hyphen || digits % 4 != 0 {
                return None;
            }
            prev_hyphen = true;
            continue;
        }
        let v = ch.to_digit(16)? as u8;
        if digits >= 32 {
            return None;
        }
        out[digits / 2] |= if digits % 2 == 0 { v << 4 } else { v };
        digits += 1;
        prev_hyphen = false;
    }
    (digits == 32 && !prev_hyphen).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values from PostgreSQL 15 (`SELECT hashint8extended(42, 8816678312871386365)` ...).
    #[test]
    fn matches_the_server() {
        let s = |v: i64| v as u64;
        assert_eq!(hash_int8(0, SEED), s(-4403592609991167795));
        assert_eq!(hash_int8(42, SEED), s(7363975540656877951));
        assert_eq!(hash_int8(-1, SEED), s(-5017072347659237694));
        assert_eq!(hash_bytes(b"", SEED), s(-5700645584453517373));
        assert_eq!(hash_bytes(b"hello", SEED), s(-2635279551741001039));
        assert_eq!(
            hash_bytes("héllo wörld, this is long".as_bytes(), SEED),
            s(463676755887696533)
        );
        assert_eq!(hash_bytes(b"abc", 0), s(-6747756470228489321));
        let u = parse_uuid("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap();
        assert_eq!(KeyValue::Uuid(u).hash(), s(424513190990560493));
    }

    #[test]
    fn uuid_spellings() {
        let a = parse_uuid("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
        assert!(a.is_some());
        for s in [
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
        ] {
            assert_eq!(parse_uuid(s), a, "{s}");
        }
        // Shown as the server writes it.
        assert_eq!(
            KeyValue::Uuid(a.unwrap()).to_string(),
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
        );
        assert_eq!(KeyValue::Int(-7).to_string(), "-7");
        for s in [
            "",
            "a0eebc99",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1g",
            "-a0eebc999c0b4ef8bb6d6bb9bd380a11",
        ] {
            assert_eq!(parse_uuid(s), None, "{s}");
        }
    }
}
