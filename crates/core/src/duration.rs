//! Human durations as marketers write them in YAML and operators in configuration: `30s`, `15m`,
//! `4h`, `2d`, `1w`.

use std::fmt;
use std::str::FromStr;

/// A non-negative span of time with whole-second precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration {
    /// Seconds, because no workflow step needs finer precision and integers compare exactly.
    secs: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid duration {input:?}: write a number followed by s, m, h, d or w (e.g. 30s, 15m, 4h, 2d, 1w)"
)]
pub struct DurationError {
    /// The text that failed to parse, echoed back so the user sees what was wrong.
    pub input: String,
}

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Self { secs }
    }
    pub const fn as_secs(self) -> u64 {
        self.secs
    }
    /// Milliseconds, saturating at `i64::MAX` (a duration is never negative).
    pub const fn as_millis(self) -> i64 {
        let secs = if self.secs > i64::MAX as u64 {
            i64::MAX
        } else {
            self.secs as i64
        };
        secs.saturating_mul(1000)
    }
    pub fn to_std(self) -> std::time::Duration {
        std::time::Duration::from_secs(self.secs)
    }
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = || DurationError {
            input: input.to_owned(),
        };
        let s = input.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits.parse().map_err(|_| err())?;
        let unit_secs = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            "w" => 604_800,
            _ => return Err(err()),
        };
        n.checked_mul(unit_secs)
            .map(Self::from_secs)
            .ok_or_else(err)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.secs;
        for (unit, size) in [("w", 604_800), ("d", 86_400), ("h", 3_600), ("m", 60)] {
            if s != 0 && s.is_multiple_of(size) {
                return write!(f, "{}{unit}", s / size);
            }
        }
        write!(f, "{s}s")
    }
}

impl<'de> serde::Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Duration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        for (text, secs) in [
            ("30s", 30),
            ("15m", 900),
            ("4h", 14_400),
            ("2d", 172_800),
            ("1w", 604_800),
            ("24h", 86_400),
        ] {
            assert_eq!(text.parse::<Duration>().unwrap().as_secs(), secs, "{text}");
        }
    }

    #[test]
    fn refuses_malformed_input() {
        for text in [
            "",
            "10",
            "h",
            "1.5h",
            "-1h",
            "2 days",
            "1y",
            "99999999999999999999s",
        ] {
            assert!(
                text.parse::<Duration>().is_err(),
                "{text:?} should not parse"
            );
        }
    }

    #[test]
    fn displays_in_the_largest_whole_unit() {
        assert_eq!("48h".parse::<Duration>().unwrap().to_string(), "2d");
        assert_eq!("90s".parse::<Duration>().unwrap().to_string(), "90s");
    }
}
