//! Autoscaling schedules: local-time windows (days, start–end, IANA time zone) with their
//! own replica bounds. Zones come from the tz database bundled with `jiff`, so a host
//! without tzdata evaluates them the same way.
//!
//! A window with `end` after `start` is active on each listed day from `start` (inclusive)
//! to `end` (exclusive); one with `end` before `start` crosses midnight and belongs to the
//! day it starts on. No `days` means every day. `end` may be `24:00`.
use std::fmt;

use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::AutoscalingSpec;
use crate::spec::at_most;
use crate::spec::model::MAX_REPLICAS;
use crate::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Weekday {
    fn from_jiff(d: jiff::civil::Weekday) -> Weekday {
        use jiff::civil::Weekday as J;
        match d {
            J::Monday => Weekday::Mon,
            J::Tuesday => Weekday::Tue,
            J::Wednesday => Weekday::Wed,
            J::Thursday => Weekday::Thu,
            J::Friday => Weekday::Fri,
            J::Saturday => Weekday::Sat,
            J::Sunday => Weekday::Sun,
        }
    }

    fn previous(self) -> Weekday {
        match self {
            Weekday::Mon => Weekday::Sun,
            Weekday::Tue => Weekday::Mon,
            Weekday::Wed => Weekday::Tue,
            Weekday::Thu => Weekday::Wed,
            Weekday::Fri => Weekday::Thu,
            Weekday::Sat => Weekday::Fri,
            Weekday::Sun => Weekday::Sat,
        }
    }
}

/// A local time of day, `HH:MM` from `00:00` to `24:00`, kept as minutes after midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimeOfDay(u16);

impl TimeOfDay {
    pub const MIDNIGHT_END: TimeOfDay = TimeOfDay(24 * 60);

    pub fn new(hour: u16, minute: u16) -> Option<TimeOfDay> {
        let m = hour.checked_mul(60)?.checked_add(minute)?;
        (minute < 60 && m <= 24 * 60).then_some(TimeOfDay(m))
    }

    pub fn minutes(self) -> u16 {
        self.0
    }
}

impl fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02}", self.0 / 60, self.0 % 60)
    }
}

impl std::str::FromStr for TimeOfDay {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parsed = s.split_once(':').and_then(|(h, m)| {
            let ok = |p: &str| (1..=2).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit());
            if !ok(h) || m.len() != 2 || !ok(m) {
                return None;
            }
            TimeOfDay::new(h.parse().ok()?, m.parse().ok()?)
        });
        parsed.ok_or_else(|| format!("{s:?} is not a time of day HH:MM from 00:00 to 24:00"))
    }
}

impl Serialize for TimeOfDay {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TimeOfDay {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = TimeOfDay;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a time of day \"HH:MM\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TimeOfDay, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

fn utc() -> String {
    "UTC".to_string()
}

/// A time window with its own bounds. Unset `min`/`max` keep the spec's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Days the window starts on; empty: every day.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub days: Vec<Weekday>,
    pub start: TimeOfDay,
    pub end: TimeOfDay,
    /// IANA time zone name, e.g. `Europe/Berlin`. Default `UTC`.
    #[serde(default = "utc")]
    pub time_zone: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
}

/// The replica bounds in force, and which schedule set them (`None`: the spec's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub min: u32,
    pub max: u32,
    pub schedule: Option<usize>,
}

impl Bounds {
    pub fn clamp(&self, n: u32) -> u32 {
        n.clamp(self.min, self.max)
    }
}

impl Schedule {
    /// The bounds this schedule sets, the spec's filling the unset side.
    pub fn bounds(&self, spec: &AutoscalingSpec) -> (u32, u32) {
        (self.min.unwrap_or(spec.min), self.max.unwrap_or(spec.max))
    }

    /// Whether the window covers `unix_ms`. An unknown zone (refused by `validate`) never is.
    pub fn is_active(&self, unix_ms: i64) -> bool {
        let (Ok(tz), Ok(ts)) = (TimeZone::get(&self.time_zone), Timestamp::from_millisecond(unix_ms)) else {
            return false;
        };
        let local = tz.to_datetime(ts);
        let day = Weekday::from_jiff(local.weekday());
        let now = TimeOfDay(local.hour() as u16 * 60 + local.minute() as u16);
        let listed = |d: Weekday| self.days.is_empty() || self.days.contains(&d);
        if self.start < self.end {
            listed(day) && self.start <= now && now < self.end
        } else {
            (listed(day) && now >= self.start) || (listed(day.previous()) && now < self.end)
        }
    }

    pub(super) fn validate(&self, at: &str, spec: &AutoscalingSpec) -> Result<(), ApiError> {
        if self.start == TimeOfDay::MIDNIGHT_END {
            return Err(ApiError::invalid(format!("{at}.start"), "24:00 is only valid as an end; use 00:00"));
        }
        if self.start == self.end {
            return Err(ApiError::invalid(
                format!("{at}.end"),
                format!("{} is the same as start, an empty window", self.end),
            ));
        }
        for (i, d) in self.days.iter().enumerate() {
            if self.days[..i].contains(d) {
                return Err(ApiError::invalid(format!("{at}.days"), format!("{d:?} is listed twice").to_lowercase()));
            }
        }
        if TimeZone::get(&self.time_zone).is_err() {
            return Err(ApiError::invalid(
                format!("{at}.time_zone"),
                format!(
                    "{:?} is not a known IANA time zone (e.g. UTC, Europe/Berlin, America/New_York)",
                    self.time_zone
                ),
            ));
        }
        if self.min.is_none() && self.max.is_none() {
            return Err(ApiError::invalid(at, "sets neither min nor max"));
        }
        if let Some(max) = self.max {
            at_most(&format!("{at}.max"), max, MAX_REPLICAS)?;
        }
        let (min, max) = self.bounds(spec);
        if min > max {
            return Err(match (self.min, self.max) {
                (Some(_), Some(_)) => {
                    ApiError::invalid(format!("{at}.min"), format!("{min} is greater than {at}.max {max}"))
                }
                (Some(_), None) => {
                    ApiError::invalid(format!("{at}.min"), format!("{min} is greater than the spec's max {max}"))
                }
                _ => ApiError::invalid(format!("{at}.max"), format!("{max} is less than the spec's min {min}")),
            });
        }
        Ok(())
    }
}

pub(super) fn bounds_at(spec: &AutoscalingSpec, unix_ms: i64) -> Bounds {
    for (i, s) in spec.schedules.iter().enumerate() {
        if s.is_active(unix_ms) {
            let (min, max) = s.bounds(spec);
            return Bounds { min, max, schedule: Some(i) };
        }
    }
    Bounds { min: spec.min, max: spec.max, schedule: None }
}
