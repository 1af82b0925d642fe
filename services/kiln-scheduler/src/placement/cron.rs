//! FC's cron expressions for scheduled provisioning actions:
//! `cron(Seconds Minutes Hours Day-of-month Month Day-of-week)`, each field
//! `*`, `?`, a value, a range `a-b`, a step `*/n` or `a-b/n`, or a list of
//! those; months and weekdays also by name (JAN, MON). Evaluated at minute
//! granularity in an IANA time zone.

use jiff::tz::TimeZone;
use jiff::Timestamp;

/// A parsed cron expression: one bit per allowed value of each field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    seconds: u64,
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    days_any: bool,
    weekdays_any: bool,
}

const MONTHS: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const WEEKDAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

fn value(s: &str, names: &[&str], base: u32) -> Option<u32> {
    if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
        return Some(i as u32 + base);
    }
    s.parse().ok()
}

fn field(s: &str, lo: u32, hi: u32, names: &[&str], name: &str) -> Result<u64, String> {
    let bad = || format!("cron {name} field {s:?} is not valid (values {lo}-{hi})");
    let mut bits = 0u64;
    for item in s.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, st)) => (
                r,
                st.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(bad)?,
            ),
            None => (item, 1),
        };
        let base = if names.len() == 7 { 0 } else { 1 };
        let (a, b) = match range {
            "*" | "?" => (lo, hi),
            r => match r.split_once('-') {
                Some((a, b)) => (
                    value(a, names, base).ok_or_else(bad)?,
                    value(b, names, base).ok_or_else(bad)?,
                ),
                None => {
                    let v = value(r, names, base).ok_or_else(bad)?;
                    // `a/n` means from a to the end.
                    (v, if item.contains('/') { hi } else { v })
                }
            },
        };
        if a < lo || b > hi || a > b {
            return Err(bad());
        }
        let mut v = a;
        while v <= b {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok(bits)
}

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
        let f: Vec<&str> = inner.split_whitespace().collect();
        if f.len() != 6 {
            return Err(format!(
                "schedule expression {expr:?} must have 6 fields: seconds minutes hours \
                 day-of-month month day-of-week"
            ));
        }
        let mut weekdays = field(f[5], 0, 7, &WEEKDAYS, "day-of-week")?;
        if weekdays & (1 << 7) != 0 {
            weekdays |= 1; // 7 is Sunday too
        }
        Ok(Self {
            seconds: field(f[0], 0, 59, &[], "seconds")?,
            minutes: field(f[1], 0, 59, &[], "minutes")?,
            hours: field(f[2], 0, 23, &[], "hours")?,
            days: field(f[3], 1, 31, &[], "day-of-month")?,
            months: field(f[4], 1, 12, &MONTHS, "month")?,
            weekdays,
            days_any: matches!(f[3], "*" | "?"),
            weekdays_any: matches!(f[5], "*" | "?"),
        })
    }

    /// Whether the expression fires within the minute starting at
    /// `minute_ms` (UTC), read in `tz`.
    pub fn fires_in_minute(&self, minute_ms: u64, tz: &TimeZone) -> bool {
        let Ok(ts) = Timestamp::from_millisecond(minute_ms as i64) else {
            return false;
        };
        let dt = ts.to_zoned(tz.clone()).datetime();
        let bit = |set: u64, v: i8| set & (1 << v as u32) != 0;
        let day_ok = bit(self.days, dt.day());
        let weekday_ok = bit(self.weekdays, dt.weekday().to_sunday_zero_offset());
        let date_ok = match (self.days_any, self.weekdays_any) {
            (true, true) => true,
            (false, true) => day_ok,
            (true, false) => weekday_ok,
            (false, false) => day_ok || weekday_ok,
        };
        self.seconds != 0
            && bit(self.minutes, dt.minute())
            && bit(self.hours, dt.hour())
            && bit(self.months, dt.month())
            && date_ok
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
            ("cron(0 60 8 * * *)", "minutes"),
            ("cron(0 0 8 32 * *)", "day-of-month"),
            ("cron(0 0 8 * FOO *)", "month"),
            ("cron(0 0 8 * * */0)", "day-of-week"),
            ("cron(0 0 9-8 * * *)", "hours"),
        ] {
            let err = Cron::parse(e).unwrap_err();
            assert!(err.contains(says), "{e}: {err}");
        }
    }
}
