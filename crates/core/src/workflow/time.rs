//! Time-of-day arithmetic for waits and send windows, in the contact's (or a fixed) time zone,
//! across daylight-saving changes. Pure: "now" is always passed in.

use super::{SendWindow, TimezoneChoice, WaitSpec};
use chrono::{
    DateTime, Datelike, LocalResult, NaiveDateTime, NaiveTime, TimeDelta, TimeZone, Utc, Weekday,
};
use chrono_tz::Tz;

/// The zone a time of day refers to: a fixed zone, or the contact's own when it is a valid IANA
/// name, else `default_tz` (`HERALD_TIMEZONE`).
pub fn resolve_timezone(choice: &TimezoneChoice, contact_tz: Option<&str>, default_tz: Tz) -> Tz {
    match choice {
        TimezoneChoice::Fixed(tz) => *tz,
        TimezoneChoice::Contact => contact_tz
            .and_then(|name| name.parse().ok())
            .unwrap_or(default_tz),
    }
}

/// The first instant at or after `now` whose local time in `tz` is `at`, on one of `days` (every
/// day when empty). A local time that a daylight-saving gap skips moves to the first instant after
/// the gap (02:30 on a spring-forward night becomes 03:00); one that a fold repeats is taken at
/// its earlier occurrence.
pub fn next_local_time(
    now: DateTime<Utc>,
    at: NaiveTime,
    days: &[Weekday],
    tz: Tz,
) -> DateTime<Utc> {
    let today = now.with_timezone(&tz).date_naive();
    // From yesterday: a gap can push yesterday's time past midnight. Eight days ahead covers a
    // weekly slot that passed earlier today.
    (-1..=8)
        .filter_map(|offset| today.checked_add_signed(TimeDelta::days(offset)))
        .filter(|date| days.is_empty() || days.contains(&date.weekday()))
        .map(|date| local_to_utc(date.and_time(at), tz))
        .find(|instant| *instant >= now)
        .unwrap_or(now)
}

/// The instant of a local time: the earliest one in a fold, the end of the gap in a gap.
fn local_to_utc(local: NaiveDateTime, tz: Tz) -> DateTime<Utc> {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => t.with_timezone(&Utc),
        LocalResult::None => first_instant_reaching(local, tz),
    }
}

/// The first instant whose local time is at or after `local`, found by bisection over a window
/// of a day either side (every UTC offset is within it). Local time only rises within such a
/// window around a gap, so the bisection is sound.
fn first_instant_reaching(local: NaiveDateTime, tz: Tz) -> DateTime<Utc> {
    let reaches = |secs: i64| {
        DateTime::from_timestamp(secs, 0)
            .is_some_and(|t| t.with_timezone(&tz).naive_local() >= local)
    };
    let centre = local.and_utc().timestamp();
    let (mut before, mut after) = (centre - 86_400, centre + 86_400);
    while after - before > 1 {
        let mid = before + (after - before) / 2;
        if reaches(mid) {
            after = mid;
        } else {
            before = mid;
        }
    }
    DateTime::from_timestamp(after, 0).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// `now + duration`, saturating instead of overflowing.
pub fn add_duration(now: DateTime<Utc>, duration: crate::Duration) -> DateTime<Utc> {
    i64::try_from(duration.as_secs())
        .ok()
        .and_then(TimeDelta::try_seconds)
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

impl SendWindow {
    /// `now` when the window is open at `now` in `tz`, else its next opening.
    pub fn next_open(&self, now: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
        let local = now.with_timezone(&tz);
        let (open, close) = self.between;
        let day_allowed = self.days.is_empty() || self.days.contains(&local.weekday());
        if day_allowed && (open..close).contains(&local.time()) {
            now
        } else {
            next_local_time(now, open, &self.days, tz)
        }
    }
}

impl WaitSpec {
    /// When the wait is over: after the duration, at the next such local time, or (waiting for an
    /// event) when the timeout runs out. The zone is resolved as by [`resolve_timezone`].
    pub fn deadline(
        &self,
        now: DateTime<Utc>,
        contact_tz: Option<&str>,
        default_tz: Tz,
    ) -> DateTime<Utc> {
        match self {
            WaitSpec::For(duration) => add_duration(now, *duration),
            WaitSpec::Until { at, days, timezone } => next_local_time(
                now,
                *at,
                days,
                resolve_timezone(timezone, contact_tz, default_tz),
            ),
            WaitSpec::Event { timeout, .. } => add_duration(now, *timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono_tz::{America::New_York, Europe::Berlin, UTC};

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn hm(h: u32, m: u32) -> NaiveTime {
        NaiveTime::from_hms_opt(h, m, 0).unwrap()
    }

    #[test]
    fn resolves_the_contact_zone_with_fallbacks() {
        let contact = TimezoneChoice::Contact;
        assert_eq!(
            resolve_timezone(&contact, Some("Europe/Berlin"), UTC),
            Berlin
        );
        assert_eq!(
            resolve_timezone(&contact, Some("Mars/Olympus"), New_York),
            New_York
        );
        assert_eq!(resolve_timezone(&contact, None, New_York), New_York);
        assert_eq!(
            resolve_timezone(
                &TimezoneChoice::Fixed(Berlin),
                Some("America/New_York"),
                UTC
            ),
            Berlin
        );
    }

    #[test]
    fn next_local_time_today_later_or_tomorrow() {
        // 08:00 in Berlin (CET, +1): 09:00 is later today.
        assert_eq!(
            next_local_time(utc("2026-01-15T07:00:00Z"), hm(9, 0), &[], Berlin),
            utc("2026-01-15T08:00:00Z")
        );
        // Exactly at 09:00: now.
        assert_eq!(
            next_local_time(utc("2026-01-15T08:00:00Z"), hm(9, 0), &[], Berlin),
            utc("2026-01-15T08:00:00Z")
        );
        // Just after: tomorrow.
        assert_eq!(
            next_local_time(utc("2026-01-15T08:00:01Z"), hm(9, 0), &[], Berlin),
            utc("2026-01-16T08:00:00Z")
        );
        // The local date decides: 23:30 UTC on the 15th is already the 16th in Berlin.
        assert_eq!(
            next_local_time(utc("2026-01-15T23:30:00Z"), hm(9, 0), &[], Berlin),
            utc("2026-01-16T08:00:00Z")
        );
    }

    #[test]
    fn next_local_time_keeps_to_allowed_days() {
        // Thursday 2026-01-15, after 09:00; the next Monday is the 19th.
        let now = utc("2026-01-15T12:00:00Z");
        assert_eq!(
            next_local_time(now, hm(9, 0), &[Weekday::Mon], Berlin),
            utc("2026-01-19T08:00:00Z")
        );
        // Thursday itself, later on: a week ahead.
        assert_eq!(
            next_local_time(now, hm(9, 0), &[Weekday::Thu], Berlin),
            utc("2026-01-22T08:00:00Z")
        );
        assert_eq!(
            next_local_time(now, hm(13, 0), &[Weekday::Thu], Berlin),
            utc("2026-01-15T12:00:00Z")
        );
    }

    #[test]
    fn berlin_spring_forward_gap_moves_to_the_end_of_the_gap() {
        // 2026-03-29: 02:00 CET jumps to 03:00 CEST (01:00 UTC). 02:30 does not exist.
        let now = utc("2026-03-28T12:00:00Z");
        assert_eq!(
            next_local_time(now, hm(2, 30), &[], Berlin),
            utc("2026-03-29T01:00:00Z")
        );
        // The day after, 02:30 CEST exists again.
        assert_eq!(
            next_local_time(utc("2026-03-29T02:00:00Z"), hm(2, 30), &[], Berlin),
            utc("2026-03-30T00:30:00Z")
        );
        // 09:00 on the change day is in summer time.
        assert_eq!(
            next_local_time(now, hm(9, 0), &[Weekday::Sun], Berlin),
            utc("2026-03-29T07:00:00Z")
        );
    }

    #[test]
    fn berlin_fall_back_fold_takes_the_earlier_instant() {
        // 2026-10-25: 03:00 CEST falls back to 02:00 CET; 02:30 happens at 00:30 and 01:30 UTC.
        let now = utc("2026-10-24T12:00:00Z");
        assert_eq!(
            next_local_time(now, hm(2, 30), &[], Berlin),
            utc("2026-10-25T00:30:00Z")
        );
        // Once the first 02:30 has passed, the repeat is not taken: the next day's is.
        assert_eq!(
            next_local_time(utc("2026-10-25T00:31:00Z"), hm(2, 30), &[], Berlin),
            utc("2026-10-26T01:30:00Z")
        );
        assert_eq!(
            next_local_time(now, hm(9, 0), &[], Berlin),
            utc("2026-10-25T08:00:00Z")
        );
    }

    #[test]
    fn new_york_spring_forward() {
        // 2026-03-08: 02:00 EST jumps to 03:00 EDT (07:00 UTC). Now is Saturday 10:00 EST.
        let now = utc("2026-03-07T15:00:00Z");
        assert_eq!(
            next_local_time(now, hm(2, 15), &[], New_York),
            utc("2026-03-08T07:00:00Z")
        );
        assert_eq!(
            next_local_time(now, hm(9, 0), &[Weekday::Sun], New_York),
            utc("2026-03-08T13:00:00Z")
        );
        assert_eq!(
            next_local_time(now, hm(9, 0), &[Weekday::Sat], New_York),
            utc("2026-03-14T13:00:00Z")
        );
    }

    fn window(days: Vec<Weekday>) -> SendWindow {
        SendWindow {
            days,
            between: (hm(9, 0), hm(18, 0)),
            timezone: TimezoneChoice::Contact,
        }
    }

    #[test]
    fn send_window_open_now_or_next_opening() {
        let weekdays = window(vec![
            Weekday::Mon,
            Weekday::Tue,
            Weekday::Wed,
            Weekday::Thu,
            Weekday::Fri,
        ]);
        // Thursday 10:00 Berlin: open.
        let open = utc("2026-01-15T09:00:00Z");
        assert_eq!(weekdays.next_open(open, Berlin), open);
        // Thursday 18:00 Berlin: closed (the end is exclusive), opens Friday 09:00.
        assert_eq!(
            weekdays.next_open(utc("2026-01-15T17:00:00Z"), Berlin),
            utc("2026-01-16T08:00:00Z")
        );
        // Thursday 07:00 Berlin: opens at 09:00 the same day.
        assert_eq!(
            weekdays.next_open(utc("2026-01-15T06:00:00Z"), Berlin),
            utc("2026-01-15T08:00:00Z")
        );
        // Saturday noon: Monday 09:00.
        assert_eq!(
            weekdays.next_open(utc("2026-01-17T11:00:00Z"), Berlin),
            utc("2026-01-19T08:00:00Z")
        );
        // Every day, Saturday noon: open.
        assert_eq!(
            window(vec![]).next_open(utc("2026-01-17T11:00:00Z"), Berlin),
            utc("2026-01-17T11:00:00Z")
        );
        // The same instant is open in Berlin and closed in New York (05:00 there).
        assert_eq!(
            weekdays.next_open(open, New_York),
            utc("2026-01-15T14:00:00Z")
        );
    }

    #[test]
    fn wait_deadlines() {
        let now = utc("2026-03-07T12:00:00Z");
        let two_days = WaitSpec::For("2d".parse().unwrap());
        assert_eq!(
            two_days.deadline(now, None, UTC),
            utc("2026-03-09T12:00:00Z")
        );
        let until = WaitSpec::Until {
            at: hm(9, 0),
            days: vec![],
            timezone: TimezoneChoice::Contact,
        };
        // 07:00 in New York: 09:00 is later today; 13:00 in Berlin: tomorrow.
        assert_eq!(
            until.deadline(now, Some("America/New_York"), UTC),
            utc("2026-03-07T14:00:00Z")
        );
        assert_eq!(
            until.deadline(now, Some("not a zone"), Berlin),
            utc("2026-03-08T08:00:00Z")
        );
        let event = WaitSpec::Event {
            event: crate::EventType::LessonCompleted,
            timeout: "3d".parse().unwrap(),
        };
        assert_eq!(event.deadline(now, None, UTC), utc("2026-03-10T12:00:00Z"));
        let forever = WaitSpec::For(crate::Duration::from_secs(u64::MAX));
        assert_eq!(forever.deadline(now, None, UTC), DateTime::<Utc>::MAX_UTC);
    }
}
