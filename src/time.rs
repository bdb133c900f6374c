//! Wall-clock instants as plain values.
//!
//! The core never reads a clock: every function that needs "now" takes a [`Timestamp`]. On wasm32
//! `std::time` panics, so the runtime builds one from `Date.now()` and hands it in.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Milliseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// An instant from milliseconds since the epoch.
    pub const fn from_millis(ms: i64) -> Self {
        Self(ms)
    }

    /// An instant from whole seconds since the epoch.
    pub const fn from_secs(s: i64) -> Self {
        Self(s * 1000)
    }

    /// Milliseconds since the epoch.
    pub const fn millis(self) -> i64 {
        self.0
    }

    /// Whole seconds since the epoch (rounded down).
    pub const fn secs(self) -> i64 {
        self.0.div_euclid(1000)
    }

    /// This instant moved forward by `d` (saturating).
    pub fn plus(self, d: Duration) -> Self {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Self(self.0.saturating_add(ms))
    }

    /// This instant moved back by `d` (saturating).
    pub fn minus(self, d: Duration) -> Self {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Self(self.0.saturating_sub(ms))
    }

    /// How long after `earlier` this instant is; zero when it is not later.
    pub fn since(self, earlier: Self) -> Duration {
        Duration::from_millis(u64::try_from(self.0 - earlier.0).unwrap_or(0))
    }

    /// The same instant as a chrono value.
    pub fn to_datetime(self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.0).unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    /// From a chrono value.
    pub fn from_datetime(dt: DateTime<Utc>) -> Self {
        Self(dt.timestamp_millis())
    }

    /// RFC 3339 with millisecond precision, `Z` suffix: `2026-11-23T10:15:00.000Z`.
    pub fn rfc3339(self) -> String {
        self.to_datetime().to_rfc3339_opts(SecondsFormat::Millis, true)
    }

    /// The compact form used in R2 folder names: `2026-11-23T101500Z`.
    pub fn folder_stamp(self) -> String {
        self.to_datetime().format("%Y-%m-%dT%H%M%SZ").to_string()
    }

    /// Parses RFC 3339.
    pub fn parse_rfc3339(s: &str) -> Option<Self> {
        DateTime::parse_from_rfc3339(s).ok().map(|d| Self::from_datetime(d.with_timezone(&Utc)))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.rfc3339())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse_rfc3339(&s).ok_or_else(|| serde::de::Error::custom(format!("not an RFC 3339 time: {s}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339_and_folder_stamp() {
        let t = Timestamp::from_millis(1_795_429_500_123);
        assert_eq!(t.rfc3339(), "2026-11-23T10:25:00.123Z");
        assert_eq!(t.folder_stamp(), "2026-11-23T102500Z");
    }

    #[test]
    fn serde_round_trips_through_rfc3339() {
        let t = Timestamp::from_millis(1_795_429_500_123);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, "\"2026-11-23T10:25:00.123Z\"");
        assert_eq!(serde_json::from_str::<Timestamp>(&json).unwrap(), t);
        assert!(serde_json::from_str::<Timestamp>("\"yesterday\"").is_err());
    }

    #[test]
    fn arithmetic_saturates_and_never_goes_negative() {
        let t = Timestamp::from_secs(100);
        assert_eq!(t.plus(Duration::from_millis(1500)).millis(), 101_500);
        assert_eq!(Timestamp::from_secs(90).since(t), Duration::ZERO);
        assert_eq!(t.since(Timestamp::from_secs(90)), Duration::from_secs(10));
    }
}
