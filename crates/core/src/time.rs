//! Points in time as herald stores and compares them.

use chrono::{DateTime, Utc};
use std::fmt;
use std::ops::{Add, Sub};
use std::time::Duration;

/// A point in time: milliseconds since the Unix epoch, UTC. Its own type so that a time cannot be
/// passed where a span, a count or a limit is expected (all three are integers too); spans are
/// [`std::time::Duration`]. Serialised as the bare number, as a row's `*_ms` field always was in
/// JSON (the admin API's `*_at` fields are RFC 3339, from [`Display`](fmt::Display)).
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
#[cfg_attr(feature = "sqlx", derive(sqlx::Type), sqlx(transparent))]
pub struct Timestamp(i64);

impl Timestamp {
    pub const fn from_millis(ms: i64) -> Self {
        Self(ms)
    }

    /// Milliseconds since the epoch: what the databases store.
    pub const fn millis(self) -> i64 {
        self.0
    }

    pub fn from_datetime(at: DateTime<Utc>) -> Self {
        Self(at.timestamp_millis())
    }

    /// The calendar time (the epoch itself for a time chrono cannot represent, which no stored
    /// time is).
    pub fn to_datetime(self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.0).unwrap_or_default()
    }

    /// How long after `earlier` this is; zero when it is not later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(u64::try_from(self.0.saturating_sub(earlier.0)).unwrap_or(0))
    }
}

/// Whole milliseconds of a span, saturating: no span herald handles comes near `i64::MAX` ms.
fn span_millis(span: Duration) -> i64 {
    i64::try_from(span.as_millis()).unwrap_or(i64::MAX)
}

/// Later by `span`, saturating at the end of time rather than wrapping into the past.
impl Add<Duration> for Timestamp {
    type Output = Self;
    fn add(self, span: Duration) -> Self {
        Self(self.0.saturating_add(span_millis(span)))
    }
}

/// Earlier by `span`, saturating.
impl Sub<Duration> for Timestamp {
    type Output = Self;
    fn sub(self, span: Duration) -> Self {
        Self(self.0.saturating_sub(span_millis(span)))
    }
}

/// RFC 3339 with milliseconds (`2026-01-01T00:00:00.123Z`): how herald writes a time for
/// people and in the events it makes.
impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            &self
                .to_datetime()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        )
    }
}

/// As [`Display`](fmt::Display), so that a failing test's times read like the admin API's.
impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Read as the integer it is stored as, as `sqlx(transparent)` does for the store's readers.
#[cfg(feature = "rusqlite")]
impl rusqlite::types::FromSql for Timestamp {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        i64::column_result(value).map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates_instead_of_wrapping() {
        let t = Timestamp::from_millis(1_000);
        assert_eq!(t + Duration::from_secs(2), Timestamp::from_millis(3_000));
        assert_eq!(
            t - Duration::from_millis(1_500),
            Timestamp::from_millis(-500)
        );
        assert_eq!(
            Timestamp::from_millis(i64::MAX - 1) + Duration::from_secs(1),
            Timestamp::from_millis(i64::MAX)
        );
        assert_eq!(
            Timestamp::from_millis(0) + Duration::MAX,
            Timestamp::from_millis(i64::MAX)
        );
        assert_eq!(
            Timestamp::from_millis(i64::MIN + 1) - Duration::from_secs(1),
            Timestamp::from_millis(i64::MIN)
        );
    }

    #[test]
    fn since_is_zero_for_a_time_not_earlier() {
        let t = Timestamp::from_millis(5_000);
        assert_eq!(
            t.since(Timestamp::from_millis(2_000)),
            Duration::from_secs(3)
        );
        assert_eq!(t.since(t), Duration::ZERO);
        assert_eq!(Timestamp::from_millis(2_000).since(t), Duration::ZERO);
    }

    #[test]
    fn converts_to_and_from_calendar_time_and_json() {
        let t = Timestamp::from_millis(1_767_225_600_123);
        assert_eq!(Timestamp::from_datetime(t.to_datetime()), t);
        assert_eq!(t.to_string(), "2026-01-01T00:00:00.123Z");
        assert_eq!(serde_json::to_string(&t).unwrap(), "1767225600123");
        assert_eq!(
            serde_json::from_str::<Timestamp>("1767225600123").unwrap(),
            t
        );
    }
}
