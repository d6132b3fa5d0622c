//! Calendar dates in UTC from Unix seconds (H. Hinnant's civil-from-days), for the places
//! that print or sign dates without a time-zone database: `flotilla audit`'s table and the
//! agent's S3 request signatures; and [`unix_ms`], the one reading of the wall clock in
//! milliseconds (for timestamps operators read and for what must survive a leader change;
//! decisions use the tokio clock).

/// Wall-clock milliseconds since the Unix epoch (0 before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A UTC instant split into its calendar fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UtcTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

impl UtcTime {
    pub fn from_unix(secs: u64) -> UtcTime {
        let (days, rem) = ((secs / 86_400) as i64, (secs % 86_400) as u32);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        UtcTime { year, month, day, hour: rem / 3600, minute: rem % 3600 / 60, second: rem % 60 }
    }
}

#[cfg(test)]
mod tests {
    use super::UtcTime;

    #[test]
    fn civil_dates_from_unix_seconds() {
        let t = |y, mo, d, h, mi, s| UtcTime { year: y, month: mo, day: d, hour: h, minute: mi, second: s };
        assert_eq!(UtcTime::from_unix(0), t(1970, 1, 1, 0, 0, 0));
        assert_eq!(UtcTime::from_unix(951_782_400 + 3661), t(2000, 2, 29, 1, 1, 1));
        assert_eq!(UtcTime::from_unix(1_369_353_600), t(2013, 5, 24, 0, 0, 0));
        assert_eq!(UtcTime::from_unix(1_796_563_845), t(2026, 12, 6, 13, 30, 45));
        assert_eq!(UtcTime::from_unix(4_107_542_399), t(2100, 2, 28, 23, 59, 59), "2100 is no leap year");
    }
}
