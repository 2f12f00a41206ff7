//! Kubernetes quantities (`1Gi`, `500m`, `1.5e3`), read exactly.
//!
//! The apiserver rewrites the quantities of built-in objects into a
//! canonical form (`1024Mi` → `1Gi`, `0.5` → `500m`) and rounds resource
//! lists up to thousandths, so a desired object written the user's way never
//! matches the live one literally. [`same`] compares them by value instead.
//!
//! Values are held as an integer count of nano-units in an `i128`: a
//! quantity is a decimal number times a power of ten or of two, which a float
//! cannot hold exactly (`0.1`, `1.023Ki`), and nano is the apiserver's own
//! finest precision.

use thiserror::Error;

/// Why a string is not a quantity we can compare by value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum QuantityError {
    #[error("{0:?} is not a quantity: {1}")]
    Malformed(String, &'static str),
    #[error("{0:?} is out of the range this operator compares exactly")]
    OutOfRange(String),
}

/// How finely the apiserver stores a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Plain quantities (`emptyDir.sizeLimit`): rounded up to nano-units.
    Nano,
    /// Resource lists (`resources.requests`, `.limits`, `overhead`): the
    /// apiserver also rounds these up to milli-units (`1.1n` → `1m`).
    Milli,
}

const NANOS_PER_MILLI: i128 = 1_000_000;

/// The value of `text` in nano-units, rounded away from zero when it is
/// finer than that (as the apiserver rounds).
///
/// The grammar is the apiserver's: an optional sign, digits with an optional
/// decimal point, then one suffix: none, a decimal one (`n u m k M G T P E`),
/// a binary one (`Ki Mi Gi Ti Pi Ei`) or an exponent (`e3`, `E-2`).
pub fn nanos(text: &str) -> Result<i128, QuantityError> {
    let malformed = |why| QuantityError::Malformed(text.to_string(), why);
    let out_of_range = || QuantityError::OutOfRange(text.to_string());

    let (negative, rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(number_len);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err(malformed("no digits"));
    }
    if fraction.contains('.') {
        return Err(malformed("more than one decimal point"));
    }
    let (power_of_ten, power_of_two) = suffix_powers(suffix).ok_or_else(|| malformed("unknown suffix"))?;

    // Digits of the mantissa as one integer, and the power of ten that
    // scales it to nano-units. Zeros that change nothing are dropped first,
    // so long spellings of small numbers still fit.
    let fraction = fraction.trim_end_matches('0');
    let digits = format!("{whole}{fraction}");
    let digits = digits.trim_start_matches('0');
    let mantissa: i128 = if digits.is_empty() { 0 } else { digits.parse().map_err(|_| out_of_range())? };
    let fraction_len = i64::try_from(fraction.len()).map_err(|_| out_of_range())?;
    let scale = power_of_ten.checked_add(9 - fraction_len).ok_or_else(out_of_range)?;

    let scaled = mantissa.checked_mul(pow(2, power_of_two).ok_or_else(out_of_range)?).ok_or_else(out_of_range)?;
    let magnitude = if mantissa == 0 {
        0
    } else if scale >= 0 {
        let factor = u32::try_from(scale).ok().and_then(|s| pow(10, s)).ok_or_else(out_of_range)?;
        scaled.checked_mul(factor).ok_or_else(out_of_range)?
    } else {
        match u32::try_from(-scale).ok().and_then(|s| pow(10, s)) {
            Some(divisor) => div_round_up(scaled, divisor),
            // Finer than 10^-38 nano-units: one nano-unit after rounding up.
            None => 1,
        }
    };
    Ok(if negative { -magnitude } else { magnitude })
}

/// Whether two quantities are the same value once stored at `precision`.
/// Strings that are not quantities are never the same as anything, so the
/// caller can fall back to comparing them literally.
pub fn same(a: &str, b: &str, precision: Precision) -> bool {
    match (nanos(a), nanos(b)) {
        (Ok(a), Ok(b)) => stored(a, precision) == stored(b, precision),
        _ => false,
    }
}

/// `nanos` as the apiserver stores it at `precision`.
fn stored(nanos: i128, precision: Precision) -> i128 {
    match precision {
        Precision::Nano => nanos,
        Precision::Milli => {
            let sign = nanos.signum();
            div_round_up(nanos.abs(), NANOS_PER_MILLI) * NANOS_PER_MILLI * sign
        }
    }
}

/// The powers of ten and of two a suffix stands for; `None`: not a suffix.
fn suffix_powers(suffix: &str) -> Option<(i64, u32)> {
    let powers = match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        _ => {
            let exponent = suffix.strip_prefix(['e', 'E'])?;
            let digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            // Absurd exponents are out of range, not malformed: clamp them.
            let value = exponent.parse::<i64>().unwrap_or(if exponent.starts_with('-') { -1000 } else { 1000 });
            (value.clamp(-1000, 1000), 0)
        }
    };
    Some(powers)
}

fn pow(base: i128, exponent: u32) -> Option<i128> {
    base.checked_pow(exponent)
}

/// `n / d` rounded away from zero, for `n >= 0`, `d > 0`.
fn div_round_up(n: i128, d: i128) -> i128 {
    n / d + i128::from(n % d != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GI: i128 = 1 << 30;
    const NANO: i128 = 1_000_000_000;

    #[test]
    fn suffixes_and_forms() {
        let cases: &[(&str, i128)] = &[
            ("0", 0),
            ("1", NANO),
            ("+5", 5 * NANO),
            ("-0.5", -NANO / 2),
            (".5", NANO / 2),
            ("5.", 5 * NANO),
            ("500m", NANO / 2),
            ("1n", 1),
            ("1.5u", 1500),
            ("1k", 1000 * NANO),
            ("1M", 1_000_000 * NANO),
            ("1E", 10i128.pow(18) * NANO),
            ("1Ki", 1024 * NANO),
            ("1Gi", GI * NANO),
            ("1.5Gi", 3 * GI / 2 * NANO),
            ("1536Mi", 3 * GI / 2 * NANO),
            ("1Ei", (1i128 << 60) * NANO),
            ("1e3", 1000 * NANO),
            ("1E3", 1000 * NANO),
            ("1e+3", 1000 * NANO),
            ("12e-1", 12 * NANO / 10),
            ("2.5E-2", 25 * NANO / 1000),
            ("1.023Ki", 1_047_552 * NANO / 1000),
            ("0.001Ki", 1_024_000_000),
            ("1e29", 10i128.pow(38)),
        ];
        for (text, expected) in cases {
            assert_eq!(nanos(text), Ok(*expected), "{text}");
        }
    }

    #[test]
    fn finer_than_nano_rounds_away_from_zero() {
        assert_eq!(nanos("0.1n"), Ok(1));
        assert_eq!(nanos("1.1n"), Ok(2));
        assert_eq!(nanos("-1.1n"), Ok(-2));
        assert_eq!(nanos("1e-10"), Ok(1));
        assert_eq!(nanos("1e-1000"), Ok(1), "clamped, still rounds up");
        assert_eq!(nanos("0.0000000001Ki"), Ok(103), "102.4n");
        assert_eq!(nanos("0e-1000"), Ok(0));
    }

    #[test]
    fn zeros_that_change_nothing_do_not_count_against_the_range() {
        let long_zero = format!("{}1.5{}", "0".repeat(60), "0".repeat(60));
        assert_eq!(nanos(&long_zero), Ok(3 * NANO / 2));
        assert_eq!(nanos("1.0000000000000000000001"), Ok(NANO + 1));
    }

    #[test]
    fn malformed_and_out_of_range() {
        for text in ["", "-", "+", ".", "Gi", "1m1", "10mi", "1e", "1e+", "1.2.3", "1 Gi", " 1", "1Gi ", "one", "1x"] {
            assert!(matches!(nanos(text), Err(QuantityError::Malformed(..))), "{text:?}: {:?}", nanos(text));
        }
        for text in ["1e30", "1e1000", "99999999999999999999999999999999999999999", "99999999999999999999Ei"] {
            assert!(matches!(nanos(text), Err(QuantityError::OutOfRange(_))), "{text:?}: {:?}", nanos(text));
        }
    }

    /// Pairs the apiserver of the local control plane stored for the first
    /// spelling (StatefulSet dry-run): each must compare equal.
    #[test]
    fn the_apiservers_canonical_forms_are_the_same_value() {
        let nano = [("1024Mi", "1Gi"), ("0.5", "500m"), ("1.5Gi", "1536Mi"), ("1.5k", "1500"), ("0.1n", "1n")];
        for (written, stored) in nano {
            assert!(same(written, stored, Precision::Nano), "{written} vs {stored}");
        }
        let milli = [("0.1n", "1m"), ("123456789n", "124m"), ("1.5u", "1m"), ("1e-10", "1e-3"), ("1000m", "1")];
        for (written, stored) in milli {
            assert!(same(written, stored, Precision::Milli), "{written} vs {stored}");
        }
        assert!(!same("123456789n", "124m", Precision::Nano));
        assert!(!same("1Gi", "1G", Precision::Nano));
        assert!(!same("1", "1k", Precision::Milli));
        assert!(!same("lots", "lots", Precision::Nano), "not a quantity: not a value to compare");
    }

    const DECIMAL: [(&str, u32); 6] = [("", 0), ("k", 3), ("M", 6), ("G", 9), ("T", 12), ("P", 15)];
    const BINARY: [(&str, u32); 5] = [("Ki", 10), ("Mi", 20), ("Gi", 30), ("Ti", 40), ("Pi", 50)];

    proptest! {
        #[test]
        fn never_panics(text in "\\PC{0,40}") {
            let _ = nanos(&text);
        }

        #[test]
        fn integers_with_any_suffix(n in -(1i64 << 40)..(1i64 << 40), d in 0..DECIMAL.len(), b in 0..BINARY.len()) {
            let (suffix, ten) = DECIMAL[d];
            prop_assert_eq!(nanos(&format!("{n}{suffix}")), Ok(i128::from(n) * 10i128.pow(ten + 9)));
            let (suffix, two) = BINARY[b];
            prop_assert_eq!(nanos(&format!("{n}{suffix}")), Ok(i128::from(n) * (1i128 << two) * NANO));
        }

        /// One value in nano-units, spelt every way the grammar allows,
        /// is one value.
        #[test]
        fn every_spelling_of_a_value_is_that_value(value in -(1i128 << 80)..(1i128 << 80), zeros in 0usize..4) {
            let sign = if value < 0 { "-" } else { "" };
            let magnitude = value.abs();
            let (whole, fraction) = (magnitude / NANO, magnitude % NANO);
            let pad = "0".repeat(zeros);
            let spellings = [
                format!("{sign}{magnitude}n"),
                format!("{sign}{magnitude}e-9"),
                format!("{sign}{pad}{whole}.{fraction:09}{pad}"),
                format!("{sign}{whole}.{fraction:09}e0"),
                format!("{sign}{whole}{fraction:09}E-9"),
            ];
            for spelling in &spellings {
                prop_assert_eq!(nanos(spelling), Ok(value), "{}", spelling);
            }
            if magnitude % 1_000_000 == 0 {
                prop_assert_eq!(nanos(&format!("{sign}{}m", magnitude / 1_000_000)), Ok(value));
            }
        }

        /// `n` of one binary unit is `n * 1024` of the unit below, and a
        /// fraction of the unit above when it is exact.
        #[test]
        fn binary_units_agree(n in 0i64..(1 << 40), b in 1..BINARY.len()) {
            let (unit, _) = BINARY[b];
            let (below, _) = BINARY[b - 1];
            let n = i128::from(n);
            let (in_unit, in_below) = (format!("{n}{unit}"), format!("{}{below}", n * 1024));
            prop_assert!(same(&in_unit, &in_below, Precision::Nano));
            // n/1024 of the next unit up, written as a decimal fraction (exact: 1/1024 has 10 decimals).
            if b + 1 < BINARY.len() {
                let (above, _) = BINARY[b + 1];
                let scaled = n * 10i128.pow(10) / 1024;
                let text = format!("{}.{:010}{above}", scaled / 10i128.pow(10), scaled % 10i128.pow(10));
                prop_assert!(same(&text, &in_unit, Precision::Nano), "{}", text);
            }
        }

        #[test]
        fn different_values_differ(a in any::<i64>(), b in any::<i64>()) {
            prop_assume!(a != b);
            let (milli_a, milli_b) = (format!("{a}m"), format!("{b}m"));
            prop_assert!(!same(&milli_a, &milli_b, Precision::Milli));
            let (nano_a, nano_b) = (format!("{a}n"), format!("{b}n"));
            prop_assert!(!same(&nano_a, &nano_b, Precision::Nano));
        }
    }
}
