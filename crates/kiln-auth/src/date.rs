//! `x-acs-date`: ISO 8601 UTC to the second, `2024-05-01T08:09:10Z`, as
//! both SDKs write it. Parsed by hand: it runs on every request and the
//! format is fixed.

/// Milliseconds since the Unix epoch, or `None` when `s` is not
/// `YYYY-MM-DDTHH:MM:SSZ` (an optional `.fraction` before the `Z` is
/// accepted and ignored) or names an impossible date.
pub fn parse_acs_date(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    match &b[19..] {
        [b'Z'] => {}
        [b'.', frac @ .., b'Z'] if !frac.is_empty() && frac.len() <= 9 => {
            if !frac.iter().all(u8::is_ascii_digit) {
                return None;
            }
        }
        _ => return None,
    }
    let num = |range: std::ops::Range<usize>| -> Option<u32> {
        let digits = &b[range];
        if !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(
            digits
                .iter()
                .fold(0u32, |n, d| n * 10 + u32::from(d - b'0')),
        )
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if year < 1970 || !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let days = days_from_civil(i64::from(year), month, day);
    let secs = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
    u64::try_from(secs).ok().map(|s| s * 1000)
}

/// Formats milliseconds since the epoch the way the SDKs do (seconds precision).
pub fn format_acs_date(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        // The calendar arithmetic already knows the leap-year rule.
        2 => {
            (days_from_civil(i64::from(year), 3, 1) - days_from_civil(i64::from(year), 2, 1)) as u32
        }
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Howard Hinnant's `days_from_civil`.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_instants() {
        assert_eq!(parse_acs_date("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_acs_date("2024-02-29T12:34:56Z"),
            Some(1_709_210_096_000)
        );
        assert_eq!(
            parse_acs_date("2024-02-29T12:34:56.789Z"),
            Some(1_709_210_096_000)
        );
        assert_eq!(
            parse_acs_date("2000-12-31T23:59:59Z"),
            Some(978_307_199_000)
        );
    }

    #[test]
    fn refuses_malformed_dates() {
        for bad in [
            "",
            "2024-02-30T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T00:60:00Z",
            "2024-01-01 00:00:00Z",
            "2024-01-01T00:00:00",
            "2024-01-01T00:00:00+08:00",
            "2024-01-01T00:00:00.Z",
            "2024-01-01T00:00:00.12aZ",
            "1969-12-31T23:59:59Z",
            "+024-01-01T00:00:00Z",
            "2024-01-01T00:00:00ZZ",
            "Thu, 06 Feb 2020 07:32:54 GMT",
            "２０２４-01-01T00:00:00Z",
        ] {
            assert_eq!(parse_acs_date(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn format_round_trips() {
        for ms in [
            0u64,
            978_307_199_000,
            1_709_210_096_000,
            4_102_444_800_000,
            253_402_300_799_000,
        ] {
            assert_eq!(parse_acs_date(&format_acs_date(ms)), Some(ms));
        }
        assert_eq!(format_acs_date(1_709_210_096_789), "2024-02-29T12:34:56Z");
    }
}
