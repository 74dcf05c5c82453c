//! `Price`: exact money, never binary floating point.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::ValidationError;

/// A non-negative amount with exactly two decimal places (scale 2), stored as a decimal.
///
/// The scale is part of the Avro contract (`decimal(12, 2)`), so every `Price` is normalised to
/// it on construction and arithmetic never rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "Decimal", into = "Decimal")]
pub struct Price(Decimal);

impl Price {
    /// Decimal places of every price.
    pub const SCALE: u32 = 2;
    /// Total significant digits a price may have (the Avro `precision`).
    pub const PRECISION: u32 = 12;

    /// Zero, the default price of a book.
    pub const ZERO: Price = Price(Decimal::from_parts(0, 0, 0, false, Self::SCALE));

    /// Validates `amount`: not negative, at most two decimal places, at most 12 digits.
    pub fn new(amount: Decimal) -> Result<Self, ValidationError> {
        if amount.is_sign_negative() && !amount.is_zero() {
            return Err(ValidationError::new("price", "must not be negative"));
        }
        let mut normalised = amount.normalize();
        if normalised.scale() > Self::SCALE {
            return Err(ValidationError::new(
                "price",
                "must have at most 2 decimal places",
            ));
        }
        normalised.rescale(Self::SCALE);
        if normalised.mantissa().unsigned_abs() >= 10u128.pow(Self::PRECISION) {
            return Err(ValidationError::new(
                "price",
                "must be below 10,000,000,000.00",
            ));
        }
        Ok(Price(normalised))
    }

    /// Builds a price from minor units (cents).
    pub fn from_cents(cents: i64) -> Result<Self, ValidationError> {
        Self::new(Decimal::new(cents, Self::SCALE))
    }

    /// The amount in minor units (cents): the unscaled value of the Avro decimal.
    pub fn cents(&self) -> i64 {
        // Precision 12 keeps the mantissa far inside i64.
        self.0.mantissa() as i64
    }

    /// The amount as a decimal with scale 2.
    pub fn amount(&self) -> Decimal {
        self.0
    }
}

impl Default for Price {
    fn default() -> Self {
        Price::ZERO
    }
}

impl fmt::Display for Price {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Price {
    type Err = ValidationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let not_a_number = || ValidationError::new("price", "must be a decimal number like 12.99");
        // rust_decimal also reads `1_000` as 1000 and takes a leading `+`: a typo would become
        // a price, and other languages' readers of the same text would refuse it.
        if !is_plain_decimal(text) {
            return Err(not_a_number());
        }
        Price::new(Decimal::from_str_exact(text).map_err(|_| not_a_number())?)
    }
}

/// Digits with at most one decimal point among or before them, after an optional minus sign:
/// `12`, `12.99`, `.5`, `-1`.
fn is_plain_decimal(text: &str) -> bool {
    let unsigned = text.strip_prefix('-').unwrap_or(text);
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let digits = |part: &str| part.bytes().all(|byte| byte.is_ascii_digit());
    !(whole.is_empty() && fraction.is_empty())
        && digits(whole)
        && digits(fraction)
        && !(unsigned.ends_with('.'))
}

impl TryFrom<Decimal> for Price {
    type Error = ValidationError;

    fn try_from(amount: Decimal) -> Result<Self, Self::Error> {
        Price::new(amount)
    }
}

impl From<Price> for Decimal {
    fn from(price: Price) -> Decimal {
        price.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_normalises_to_two_decimal_places() {
        let price: Price = "12.9".parse().unwrap();
        assert_eq!(price.to_string(), "12.90");
        assert_eq!(price.cents(), 1290);
        assert_eq!("15.990".parse::<Price>().unwrap().cents(), 1599);
        assert_eq!(Price::ZERO.to_string(), "0.00");
    }

    #[test]
    fn rejects_negative_fractional_cents_and_garbage() {
        assert_eq!("-0.01".parse::<Price>().unwrap_err().field, "price");
        assert!("1.001".parse::<Price>().is_err());
        assert!("twelve".parse::<Price>().is_err());
        for typo in [
            "1_0", "+5", "1.2.3", "5.", ".", "-", "", "1e2", "12,99", "0x10", "1 0",
        ] {
            assert_eq!(
                typo.parse::<Price>().unwrap_err().rule,
                "must be a decimal number like 12.99",
                "{typo:?}"
            );
        }
        assert_eq!(".5".parse::<Price>().unwrap().cents(), 50);
        assert_eq!(" 7 ".parse::<Price>().unwrap().cents(), 700);
        assert!("10000000000.00".parse::<Price>().is_err());
        assert!("9999999999.99".parse::<Price>().is_ok());
    }

    #[test]
    fn cents_round_trip_exactly() {
        for cents in [0, 1, 99, 1299, 1599, 999_999_999_999] {
            assert_eq!(Price::from_cents(cents).unwrap().cents(), cents);
        }
    }
}
