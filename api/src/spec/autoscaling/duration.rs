//! Durations in autoscaling specs: an integer is seconds; a string is one or more
//! `<digits><unit>` parts with units `ms`, `s`, `m`, `h` (`180s`, `5m`, `1m30s`, `500ms`).
//! Stored canonically as `"<n>s"`, or `"<n>ms"` when not whole seconds.
use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A non-negative duration with millisecond resolution.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpecDuration(u64);

impl SpecDuration {
    pub const ZERO: SpecDuration = SpecDuration(0);

    pub const fn from_secs(s: u64) -> Self {
        SpecDuration(s * 1000)
    }

    pub const fn from_millis(ms: u64) -> Self {
        SpecDuration(ms)
    }

    pub const fn as_millis(self) -> u64 {
        self.0
    }
}

impl fmt::Display for SpecDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (secs, millis) = (self.0 / 1000, self.0 % 1000);
        if millis == 0 {
            write!(f, "{secs}s")
        } else {
            write!(f, "{}ms", self.0)
        }
    }
}

impl std::str::FromStr for SpecDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a duration; write seconds (180) or a string like 180s, 5m, 1m30s, 500ms");
        let s = text.trim();
        if s.is_empty() {
            return Err(bad());
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            return s.parse::<u64>().ok().and_then(|n| n.checked_mul(1000)).map(SpecDuration).ok_or_else(bad);
        }
        let mut total: u64 = 0;
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            let unit_len = rest[digits..].bytes().take_while(u8::is_ascii_alphabetic).count();
            if digits == 0 || unit_len == 0 {
                return Err(bad());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
            let scale = match &rest[digits..digits + unit_len] {
                "ms" => 1,
                "s" => 1000,
                "m" => 60_000,
                "h" => 3_600_000,
                _ => return Err(bad()),
            };
            total = n.checked_mul(scale).and_then(|v| total.checked_add(v)).ok_or_else(bad)?;
            rest = &rest[digits + unit_len..];
        }
        Ok(SpecDuration(total))
    }
}

impl Serialize for SpecDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpecDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = SpecDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration: whole seconds (180) or a string like 180s, 5m, 500ms")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SpecDuration, E> {
                v.checked_mul(1000).map(SpecDuration).ok_or_else(|| E::custom(format!("{v} seconds is too long")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SpecDuration, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("{v} is negative; a duration is at least 0"))),
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<SpecDuration, E> {
                Err(E::custom(format!("{v} is not whole seconds; write a string like 1500ms")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SpecDuration, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}
