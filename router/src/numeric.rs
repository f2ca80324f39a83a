//! Exact `numeric` arithmetic for combining partial aggregates: the sum of
//! per-shard sums, and AVG as that sum divided by the summed counts.
//!
//! The results must be byte-for-byte what one PostgreSQL would print, so the
//! rules are the server's: a sum keeps the largest display scale of its
//! inputs; a division picks its scale with `select_div_scale` (at least 16
//! significant digits, never less than either input's scale) and rounds the
//! exact quotient half away from zero; the binary form is `numeric_send`'s
//! (base-10000 digits with leading and trailing zero digits stripped, zero
//! with weight 0 and a positive sign).

use std::cmp::Ordering;

/// A numeric value: finite with an exact digit string, or a special value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Num {
    NaN,
    PosInf,
    NegInf,
    Finite {
        negative: bool,
        /// The unscaled integer (value × 10^scale), least significant digit
        /// first, no high zero digits (zero: empty).
        digits: Vec<u8>,
        /// Display scale: digits after the decimal point.
        scale: u16,
    },
}

const NUMERIC_MIN_SIG_DIGITS: i32 = 16;
const NUMERIC_MAX_DISPLAY_SCALE: i32 = 1000;

impl Num {
    pub fn zero() -> Num {
        Num::Finite {
            negative: false,
            digits: Vec::new(),
            scale: 0,
        }
    }

    pub fn from_i128(v: i128) -> Num {
        let mut digits = Vec::new();
        let mut m = v.unsigned_abs();
        while m > 0 {
            digits.push((m % 10) as u8);
            m /= 10;
        }
        Num::Finite {
            negative: v < 0,
            digits,
            scale: 0,
        }
    }

    /// Parses the server's text output (`-12.340`, `NaN`, `Infinity`).
    pub fn parse(s: &str) -> Option<Num> {
        match s {
            "NaN" => return Some(Num::NaN),
            "Infinity" => return Some(Num::PosInf),
            "-Infinity" => return Some(Num::NegInf),
            _ => {}
        }
        let (negative, body) = match s.strip_prefix('-') {
            Some(r) => (true, r),
            None => (false, s.strip_prefix('+').unwrap_or(s)),
        };
        let (int, frac) = body.split_once('.').unwrap_or((body, ""));
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        if !int.bytes().chain(frac.bytes()).all(|c| c.is_ascii_digit()) {
            return None;
        }
        let scale = u16::try_from(frac.len()).ok()?;
        let digits = int
            .bytes()
            .chain(frac.bytes())
            .rev()
            .map(|c| c - b'0')
            .collect();
        Some(Num::finite(negative, digits, scale))
    }

    /// Reads `numeric_send`'s binary form.
    pub fn from_binary(b: &[u8]) -> Option<Num> {
        let word =
            |i: usize| -> Option<i16> { b.get(i..i + 2).map(|x| i16::from_be_bytes([x[0], x[1]])) };
        let (n, weight, sign, dscale) = (word(0)?, word(2)?, word(4)? as u16, word(6)?);
        match sign {
            0xC000 => return Some(Num::NaN),
            0xD000 => return Some(Num::PosInf),
            0xF000 => return Some(Num::NegInf),
            0x0000 | 0x4000 => {}
            _ => return None,
        }
        if n < 0 || dscale < 0 || b.len() != 8 + 2 * n as usize {
            return None;
        }
        // Decimal digits, most significant first, with the exponent of the first.
        let mut big = Vec::with_capacity(4 * n as usize);
        for i in 0..n as usize {
            let d = word(8 + 2 * i)?;
            if !(0..10000).contains(&d) {
                return None;
            }
            big.extend_from_slice(&[
                (d / 1000) as u8,
                (d / 100 % 10) as u8,
                (d / 10 % 10) as u8,
                (d % 10) as u8,
            ]);
        }
        // The last digit's exponent is 4*(weight - n + 1); we want exponent -dscale.
        let last_exp = 4 * (weight as i32 - n as i32 + 1);
        let target = -(dscale as i32);
        let mut le: Vec<u8> = big.into_iter().rev().collect();
        if last_exp > target {
            let pad = (last_exp - target) as usize;
            le.splice(0..0, std::iter::repeat_n(0, pad));
        } else if last_exp < target {
            let cut = (target - last_exp) as usize;
            le.drain(..cut.min(le.len()));
        }
        Some(Num::finite(sign == 0x4000, le, dscale as u16))
    }

    fn finite(negative: bool, mut digits: Vec<u8>, scale: u16) -> Num {
        while digits.last() == Some(&0) {
            digits.pop();
        }
        Num::Finite {
            negative: negative && !digits.is_empty(),
            digits,
            scale,
        }
    }

    /// Order by value whatever the display scale (`1.0 = 1.00`), with
    /// the server's place for special values: `-Infinity` < numbers <
    /// `Infinity` < `NaN`.
    pub fn cmp_value(&self, other: &Num) -> Ordering {
        let rank = |n: &Num| match n {
            Num::NegInf => 0,
            Num::Finite { .. } => 1,
            Num::PosInf => 2,
            Num::NaN => 3,
        };
        match (self, other) {
            (
                Num::Finite {
                    negative: na,
                    digits: da,
                    scale: sa,
                },
                Num::Finite {
                    negative: nb,
                    digits: db,
                    scale: sb,
                },
            ) => {
                let s = (*sa).max(*sb);
                let magnitude = cmp_mag(&rescaled(da, s - sa), &rescaled(db, s - sb));
                match (na, nb) {
                    (false, false) => magnitude,
                    (true, true) => magnitude.reverse(),
                    (true, false) => Ordering::Less,
                    (false, true) => Ordering::Greater,
                }
            }
            _ => rank(self).cmp(&rank(other)),
        }
    }

    /// The exact sum; the display scale is the larger of the two.
    pub fn add(&self, other: &Num) -> Num {
        use Num::*;
        match (self, other) {
            (NaN, _) | (_, NaN) | (PosInf, NegInf) | (NegInf, PosInf) => NaN,
            (PosInf, _) | (_, PosInf) => PosInf,
            (NegInf, _) | (_, NegInf) => NegInf,
            (
                Finite {
                    negative: na,
                    digits: da,
                    scale: sa,
                },
                Finite {
                    negative: nb,
                    digits: db,
                    scale: sb,
                },
            ) => {
                let scale = (*sa).max(*sb);
                let a = rescaled(da, scale - sa);
                let b = rescaled(db, scale - sb);
                if na == nb {
                    return Num::finite(*na, add_mag(&a, &b), scale);
                }
                match cmp_mag(&a, &b) {
                    Ordering::Equal => Num::finite(false, Vec::new(), scale),
                    Ordering::Greater => Num::finite(*na, sub_mag(&a, &b), scale),
                    Ordering::Less => Num::finite(*nb, sub_mag(&b, &a), scale),
                }
            }
        }
    }

    /// `self / count` as `numeric_div` computes AVG (`sum / count`): the
    /// scale from `select_div_scale`, the exact quotient rounded half away
    /// from zero. `count` must not be zero.
    pub fn div_count(&self, count: u64) -> Num {
        let Some((negative, digits, scale)) = self.finite_parts() else {
            return self.clone();
        };
        let (w1, f1) = weight_and_first(digits, scale);
        let count_digits: Vec<u8> = Num::from_i128(count as i128).digits_le();
        let (w2, f2) = weight_and_first(&count_digits, 0);
        let mut qweight = w1 - w2;
        if f1 <= f2 {
            qweight -= 1;
        }
        let rscale = (NUMERIC_MIN_SIG_DIGITS - qweight * 4)
            .max(scale as i32)
            .clamp(0, NUMERIC_MAX_DISPLAY_SCALE) as u16;
        // q = round(U * 10^(rscale - scale) / count)
        let n = rescaled(digits, rscale - scale);
        let mut q = Vec::with_capacity(n.len());
        let mut rem: u128 = 0;
        for &d in n.iter().rev() {
            rem = rem * 10 + d as u128;
            q.push((rem / count as u128) as u8);
            rem %= count as u128;
        }
        q.reverse();
        if rem * 2 >= count as u128 {
            q = add_mag(&q, &[1]);
        }
        Num::finite(negative, q, rscale)
    }

    /// Sign, digits and scale of a finite value.
    fn finite_parts(&self) -> Option<(bool, &[u8], u16)> {
        match self {
            Num::Finite {
                negative,
                digits,
                scale,
            } => Some((*negative, digits, *scale)),
            _ => None,
        }
    }

    fn digits_le(&self) -> Vec<u8> {
        match self {
            Num::Finite { digits, .. } => digits.clone(),
            _ => Vec::new(),
        }
    }

    /// The server's text output.
    pub fn to_text(&self) -> String {
        let (negative, digits, scale) = match self {
            Num::NaN => return "NaN".into(),
            Num::PosInf => return "Infinity".into(),
            Num::NegInf => return "-Infinity".into(),
            Num::Finite {
                negative,
                digits,
                scale,
            } => (*negative, digits, *scale as usize),
        };
        let len = digits.len().max(scale + 1);
        let mut s = String::with_capacity(len + 2);
        if negative {
            s.push('-');
        }
        for i in (0..len).rev() {
            s.push((b'0' + digits.get(i).copied().unwrap_or(0)) as char);
            if i == scale && scale > 0 {
                s.push('.');
            }
        }
        s
    }

    /// `numeric_send`'s binary form.
    pub fn to_binary(&self, out: &mut Vec<u8>) {
        let put = |out: &mut Vec<u8>, v: i16| out.extend_from_slice(&v.to_be_bytes());
        let Some((negative, digits, scale)) = self.finite_parts() else {
            let sign: u16 = match self {
                Num::NaN => 0xC000,
                Num::PosInf => 0xD000,
                _ => 0xF000,
            };
            for v in [0, 0, sign as i16, 0] {
                put(out, v);
            }
            return;
        };
        // Base-10000 groups aligned at the decimal point: group g covers
        // exponents 4g .. 4g+3 (g may be negative).
        let exp_of = |i: usize| i as i32 - scale as i32;
        let mut groups: std::collections::BTreeMap<i32, i16> = Default::default();
        for (i, &d) in digits.iter().enumerate() {
            let e = exp_of(i);
            let g = e.div_euclid(4);
            let pow = [1, 10, 100, 1000][(e - 4 * g) as usize];
            *groups.entry(g).or_default() += d as i16 * pow;
        }
        groups.retain(|_, v| *v != 0);
        let (Some((&low, _)), Some((&high, _))) =
            (groups.first_key_value(), groups.last_key_value())
        else {
            for v in [0, 0, 0, scale as i16] {
                put(out, v);
            }
            return;
        };
        let n = high - low + 1;
        for v in [
            n as i16,
            high as i16,
            if negative { 0x4000 } else { 0 },
            scale as i16,
        ] {
            put(out, v);
        }
        for g in (low..=high).rev() {
            put(out, groups.get(&g).copied().unwrap_or(0));
        }
    }
}

/// Digits multiplied by 10^by (zeros prepended, least significant first).
fn rescaled(d: &[u8], by: u16) -> Vec<u8> {
    let mut v = vec![0; by as usize];
    v.extend_from_slice(d);
    v
}

fn add_mag(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(a.len().max(b.len()) + 1);
    let mut carry = 0;
    for i in 0..a.len().max(b.len()) {
        let s = a.get(i).copied().unwrap_or(0) + b.get(i).copied().unwrap_or(0) + carry;
        out.push(s % 10);
        carry = s / 10;
    }
    if carry > 0 {
        out.push(carry);
    }
    out
}

/// `a - b` for `a >= b`.
fn sub_mag(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(a.len());
    let mut borrow = 0i8;
    for (i, &x) in a.iter().enumerate() {
        let mut d = x as i8 - b.get(i).copied().unwrap_or(0) as i8 - borrow;
        borrow = 0;
        if d < 0 {
            d += 10;
            borrow = 1;
        }
        out.push(d as u8);
    }
    out
}

fn cmp_mag(a: &[u8], b: &[u8]) -> Ordering {
    let trim = |v: &[u8]| v.iter().rposition(|&d| d != 0).map_or(0, |p| p + 1);
    let (la, lb) = (trim(a), trim(b));
    la.cmp(&lb)
        .then_with(|| a[..la].iter().rev().cmp(b[..lb].iter().rev()))
}

/// The base-10000 weight and value of the first non-zero digit group, as
/// `select_div_scale` reads them (zero: weight 0, digit 0).
fn weight_and_first(digits: &[u8], scale: u16) -> (i32, i32) {
    let Some(top) = digits.iter().rposition(|&d| d != 0) else {
        return (0, 0);
    };
    let e = top as i32 - scale as i32;
    let g = e.div_euclid(4);
    let mut first = 0;
    for k in (4 * g..4 * g + 4).rev() {
        let i = k + scale as i32;
        let d = if i >= 0 {
            digits.get(i as usize).copied().unwrap_or(0)
        } else {
            0
        };
        first = first * 10 + d as i32;
    }
    (g, first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Num {
        Num::parse(s).unwrap()
    }

    #[test]
    fn text_round_trips_with_its_scale() {
        for s in [
            "0",
            "0.000",
            "-0.5",
            "12.340",
            "100",
            "-123456789012345678901234567890.1",
        ] {
            assert_eq!(n(s).to_text(), s);
        }
        assert_eq!(n("-0.00").to_text(), "0.00");
        assert_eq!(n(".5").to_text(), "0.5");
        for bad in ["", "-", "1e5", "1.2.3", "abc", "."] {
            assert!(Num::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn sums_keep_the_largest_scale_and_cross_zero() {
        assert_eq!(n("1.5").add(&n("2.25")).to_text(), "3.75");
        assert_eq!(n("1.50").add(&n("-1.5")).to_text(), "0.00");
        assert_eq!(n("-10").add(&n("3.001")).to_text(), "-6.999");
        assert_eq!(n("999.99").add(&n("0.01")).to_text(), "1000.00");
        assert_eq!(n("5").add(&Num::NaN), Num::NaN);
        assert_eq!(Num::PosInf.add(&Num::NegInf), Num::NaN);
        assert_eq!(Num::NegInf.add(&n("1")), Num::NegInf);
    }

    /// Expected values are what PostgreSQL 15 prints for `avg` / `numeric_div`
    /// (and `numeric_send` below).
    #[test]
    fn averages_round_like_numeric_div() {
        assert_eq!(n("10").div_count(4).to_text(), "2.5000000000000000");
        assert_eq!(n("2").div_count(3).to_text(), "0.66666666666666666667");
        assert_eq!(n("-2").div_count(3).to_text(), "-0.66666666666666666667");
        assert_eq!(n("1234567").div_count(7).to_text(), "176366.714285714286");
        assert_eq!(n("0").div_count(5).to_text(), "0.00000000000000000000");
        assert_eq!(n("12.345").div_count(2).to_text(), "6.1725000000000000");
        assert_eq!(n("100000").div_count(1).to_text(), "100000.000000000000");
        assert_eq!(Num::PosInf.div_count(3), Num::PosInf);
    }

    #[test]
    fn binary_matches_numeric_send() {
        let cases: &[(&str, &[i16])] = &[
            ("0", &[0, 0, 0, 0]),
            ("0.000", &[0, 0, 0, 3]),
            ("1", &[1, 0, 0, 0, 1]),
            ("10000", &[1, 1, 0, 0, 1]),
            ("-12345.678", &[3, 1, 0x4000, 3, 1, 2345, 6780]),
            ("0.0001", &[1, -1, 0, 4, 1]),
            ("0.00012", &[2, -1, 0, 5, 1, 2000]),
        ];
        for (text, words) in cases {
            let mut out = Vec::new();
            n(text).to_binary(&mut out);
            let expect: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
            assert_eq!(out, expect, "{text}");
            assert_eq!(Num::from_binary(&out).unwrap().to_text(), *text);
        }
        let mut out = Vec::new();
        Num::NaN.to_binary(&mut out);
        assert_eq!(Num::from_binary(&out), Some(Num::NaN));
        assert!(Num::from_binary(&[0, 1, 0, 0]).is_none());
        assert!(Num::from_binary(&[0, 1, 0, 0, 0, 0, 0, 0, 0x7f, 0]).is_none());
    }
}
