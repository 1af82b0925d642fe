//! FC's cron expressions for scheduled provisioning actions:
//! `cron(Seconds Minutes Hours Day-of-month Month Day-of-week)` with `*`,
//! `?`, values, ranges, steps, lists, month and weekday names, and
//! croner's `L`, `W` and `#`; parsed and matched by the `croner` crate,
//! evaluated at minute granularity in an IANA time zone.

use croner::parser::{CronParser, Seconds, Year};
use jiff::tz::TimeZone;
use jiff::Timestamp;

/// A parsed cron expression.
#[derive(Debug, Clone)]
pub struct Cron {
    cron: croner::Cron,
}

impl PartialEq for Cron {
    fn eq(&self, other: &Self) -> bool {
        self.cron.as_str() == other.cron.as_str()
    }
}

impl Eq for Cron {}

impl Cron {
    /// `cron(...)` as FC writes it.
    pub fn parse(expr: &str) -> Result<Self, String> {
        let inner = expr
            .trim()
            .strip_prefix("cron(")
            .and_then(|s| s.strip_suffix(')'))
            .ok_or_else(|| {
                format!("schedule expression {expr:?} must be cron(S M H DoM Mon DoW)")
            })?;
        if inner.split_whitespace().count() != 6 {
            return Err(format!(
                "schedule expression {expr:?} must have 6 fields: seconds minutes hours \
                 day-of-month month day-of-week"
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Required)
            .year(Year::Disallowed)
            .build()
            .parse(inner)
            .map_err(|e| {
                format!(
                    "schedule expression {expr:?} is not valid (seconds minutes hours \
                     day-of-month month day-of-week): {e}"
                )
            })?;
        Ok(Self { cron })
    }

    /// Whether the expression fires within the minute starting at
    /// `minute_ms` (UTC), read in `tz`.
    pub fn fires_in_minute(&self, minute_ms: u64, tz: &TimeZone) -> bool {
        let Ok(start) = Timestamp::from_millisecond(minute_ms as i64) else {
            return false;
        };
        let start = start.to_zoned(tz.clone());
        match self.cron.find_next_occurrence(&start, true) {
            Ok(next) => next.timestamp().as_millisecond() < minute_ms as i64 + 60_000,
            Err(_) => false,
        }
    }
}

/// An IANA time zone name (FC's `timeZone`), UTC when absent.
pub fn time_zone(name: Option<&str>) -> Result<TimeZone, String> {
    match name {
        None | Some("") | Some("UTC") => Ok(TimeZone::UTC),
        Some(n) => TimeZone::get(n).map_err(|e| format!("time zone {n:?} is not known: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> u64 {
        s.parse::<Timestamp>().unwrap().as_millisecond() as u64
    }

    #[test]
    fn fields_parse_and_match() {
        let c = Cron::parse("cron(0 30 8 * * MON-FRI)").unwrap();
        let utc = TimeZone::UTC;
        // 2026-11-23 is a Monday.
        assert!(c.fires_in_minute(at("2026-11-23T08:30:00Z"), &utc));
        assert!(!c.fires_in_minute(at("2026-11-23T08:31:00Z"), &utc));
        assert!(
            !c.fires_in_minute(at("2026-11-22T08:30:00Z"), &utc),
            "Sunday"
        );
        let every = Cron::parse("cron(0 */15 * * * *)").unwrap();
        assert!(every.fires_in_minute(at("2026-11-23T13:45:00Z"), &utc));
        assert!(!every.fires_in_minute(at("2026-11-23T13:46:00Z"), &utc));
        let list = Cron::parse("cron(0 0 1,13 1 JAN ?)").unwrap();
        assert!(list.fires_in_minute(at("2027-01-01T13:00:00Z"), &utc));
        assert!(!list.fires_in_minute(at("2027-02-01T13:00:00Z"), &utc));
        let sunday = Cron::parse("cron(0 0 0 ? * 7)").unwrap();
        assert!(sunday.fires_in_minute(at("2026-11-22T00:00:00Z"), &utc));
        // A firing at second 30 falls in its minute.
        let half = Cron::parse("cron(30 0 8 * * *)").unwrap();
        assert!(half.fires_in_minute(at("2026-11-23T08:00:00Z"), &utc));
        assert!(!half.fires_in_minute(at("2026-11-23T08:01:00Z"), &utc));
        // What the hand-written parser lacked: the last day of the month
        // and the nth weekday.
        let last = Cron::parse("cron(0 0 12 L * ?)").unwrap();
        assert!(last.fires_in_minute(at("2026-11-30T12:00:00Z"), &utc));
        assert!(!last.fires_in_minute(at("2026-11-29T12:00:00Z"), &utc));
        let second_monday = Cron::parse("cron(0 0 9 ? * MON#2)").unwrap();
        assert!(second_monday.fires_in_minute(at("2026-11-09T09:00:00Z"), &utc));
        assert!(!second_monday.fires_in_minute(at("2026-11-16T09:00:00Z"), &utc));
    }

    #[test]
    fn time_zones_shift_the_schedule() {
        let c = Cron::parse("cron(0 0 8 * * *)").unwrap();
        let shanghai = time_zone(Some("Asia/Shanghai")).unwrap();
        // 08:00 in Shanghai is 00:00 UTC.
        assert!(c.fires_in_minute(at("2026-11-23T00:00:00Z"), &shanghai));
        assert!(!c.fires_in_minute(at("2026-11-23T08:00:00Z"), &shanghai));
        assert!(c.fires_in_minute(at("2026-11-23T08:00:00Z"), &TimeZone::UTC));
        assert!(time_zone(Some("Mars/Olympus")).is_err());
    }

    #[test]
    fn bad_expressions_say_what_is_wrong() {
        for (e, says) in [
            ("0 0 8 * * *", "must be cron("),
            ("cron(0 0 8 * *)", "6 fields"),
            ("cron(0 60 8 * * *)", "is not valid"),
            ("cron(0 0 8 32 * *)", "is not valid"),
            ("cron(0 0 8 * FOO *)", "is not valid"),
            ("cron(0 0 8 * * */0)", "is not valid"),
            ("cron(0 0 9-8 * * *)", "is not valid"),
            ("cron(0 0 8 * * * 2027)", "6 fields"),
        ] {
            let err = Cron::parse(e).unwrap_err();
            assert!(err.contains(says), "{e}: {err}");
        }
    }
}
