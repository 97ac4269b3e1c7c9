//! Money, exactly: amounts are integers of pico-dollars (1e-12 USD), so a
//! ledger's totals equal the sum of its rows to the last digit. A price of
//! "$0.15 per 1M tokens" is 150,000 pico-dollars per token; prices with up
//! to six decimals per million tokens are whole numbers in this unit. A leaf
//! module: the router prices with it, the ledger and budgets count in it.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Pico-dollars in one dollar.
const PICO_PER_USD: u128 = 1_000_000_000_000;

/// An amount of money in pico-dollars.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Usd(pub u64);

impl Usd {
    pub const ZERO: Usd = Usd(0);

    /// Parses a decimal dollar amount ("12", "0.000150"), exactly; at most
    /// 12 decimals.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a dollar amount (digits, at most 12 decimals)");
        let (whole, fraction) = text.trim().split_once('.').unwrap_or((text.trim(), ""));
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(whole) || (!fraction.is_empty() && !digits(fraction)) || fraction.len() > 12 {
            return Err(bad());
        }
        let whole: u128 = whole.parse().map_err(|_| bad())?;
        let padded = format!("{fraction:0<12}");
        let fraction: u128 = padded.parse().map_err(|_| bad())?;
        let pico = whole
            .checked_mul(PICO_PER_USD)
            .and_then(|w| w.checked_add(fraction))
            .ok_or_else(bad)?;
        u64::try_from(pico).map(Usd).map_err(|_| bad())
    }

    pub fn saturating_add(self, other: Usd) -> Usd {
        Usd(self.0.saturating_add(other.0))
    }

    /// For display and headers only; arithmetic stays in integers.
    pub fn as_f64(self) -> f64 {
        self.0 as f64 / PICO_PER_USD as f64
    }
}

impl std::iter::Sum for Usd {
    fn sum<I: Iterator<Item = Usd>>(iter: I) -> Usd {
        iter.fold(Usd::ZERO, Usd::saturating_add)
    }
}

/// Dollars with all twelve decimals, trailing zeros dropped ("0.00015").
impl fmt::Display for Usd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 as u128 / PICO_PER_USD;
        let fraction = self.0 as u128 % PICO_PER_USD;
        if fraction == 0 {
            return write!(f, "{whole}");
        }
        let digits = format!("{fraction:012}");
        write!(f, "{whole}.{}", digits.trim_end_matches('0'))
    }
}

impl Serialize for Usd {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// From a string ("0.15") or a number written in TOML/JSON (0.15), read
/// through its decimal text so that 0.15 stays exactly 0.15.
impl<'de> Deserialize<'de> for Usd {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Text {
            String(String),
            Integer(u64),
            Float(f64),
        }
        let text = match Text::deserialize(d)? {
            Text::String(s) => s,
            Text::Integer(n) => n.to_string(),
            // Rust prints the shortest text that reads back as the same
            // float: what the file said, for any price written by hand.
            Text::Float(x) if x >= 0.0 && x.is_finite() => x.to_string(),
            Text::Float(x) => return Err(serde::de::Error::custom(format!("{x} is not a price"))),
        };
        Usd::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollar_amounts_parse_and_print_exactly() {
        assert_eq!(Usd::parse("0.15").unwrap(), Usd(150_000_000_000));
        assert_eq!(Usd::parse("12").unwrap(), Usd(12 * 1_000_000_000_000));
        assert_eq!(Usd::parse("0.000000000001").unwrap(), Usd(1));
        assert_eq!(Usd::parse("2.5").unwrap().to_string(), "2.5");
        assert_eq!(Usd(1).to_string(), "0.000000000001");
        assert_eq!(Usd::ZERO.to_string(), "0");
        for bad in [
            "",
            "-1",
            "1.2.3",
            "0.0000000000001",
            "1e3",
            "abc",
            "99999999999",
        ] {
            assert!(Usd::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn amounts_read_from_toml_numbers_and_strings() {
        #[derive(Deserialize)]
        struct File {
            a: Usd,
            b: Usd,
            c: Usd,
        }
        let file: File = toml::from_str("a = 0.15\nb = \"2.50\"\nc = 3\n").unwrap();
        assert_eq!(file.a, Usd::parse("0.15").unwrap());
        assert_eq!(file.b.to_string(), "2.5");
        assert_eq!(file.c.to_string(), "3");
        assert!(toml::from_str::<File>("a = -1.0\nb = 1\nc = 1\n").is_err());
    }
}
