//! How an opt-out time is written into the opt-out field: which of REDCap's
//! two datetime shapes the field takes, and the wall-clock time in the
//! project's zone (REDCap stores local times, not instants).

use chrono::{DateTime, NaiveDateTime, Timelike, Utc};
use chrono_tz::Tz;

use crate::config::TimestampFormat;

/// How an opt-out time is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TimestampStyle {
    /// `YYYY-MM-DD HH:MM`
    Minutes,
    /// `YYYY-MM-DD HH:MM:SS`
    Seconds,
}

/// The style for a field of this type and validation. REDCap imports dates
/// as Y-M-D whatever the display order, so `_mdy`/`_dmy` change nothing.
/// Date-only and non-date validations cannot hold a time and are refused,
/// whatever the configured format, as the module we replace refused them.
pub(super) fn timestamp_style(
    format: TimestampFormat,
    field_type: &str,
    validation: &str,
) -> Result<TimestampStyle, String> {
    let field_type = field_type.trim();
    if !(field_type.is_empty() || field_type == "text" || field_type == "notes") {
        return Err(format!("is a `{field_type}` field; it must be a text field (free text or datetime)"));
    }
    let natural = match validation.trim() {
        "" => TimestampStyle::Seconds,
        "datetime_ymd" | "datetime_mdy" | "datetime_dmy" => TimestampStyle::Minutes,
        "datetime_seconds_ymd" | "datetime_seconds_mdy" | "datetime_seconds_dmy" => TimestampStyle::Seconds,
        v if v.starts_with("date_") => {
            return Err(format!(
                "has the date-only validation {v}: the opt-out time needs a datetime or free-text field"
            ))
        }
        v => return Err(format!("has the validation {v}, which cannot hold a date and time")),
    };
    Ok(match format {
        TimestampFormat::Auto => natural,
        TimestampFormat::Minutes => TimestampStyle::Minutes,
        TimestampFormat::Seconds => TimestampStyle::Seconds,
    })
}

/// The wall-clock time in the project's zone: REDCap stores local times.
pub(super) fn format_timestamp(at: DateTime<Utc>, zone: Tz, style: TimestampStyle) -> String {
    let local = at.with_timezone(&zone);
    match style {
        TimestampStyle::Minutes => local.format("%Y-%m-%d %H:%M").to_string(),
        TimestampStyle::Seconds => local.format("%Y-%m-%d %H:%M:%S").to_string(),
    }
}

/// Whether the field's `current` value already says `wanted`, the value we
/// would write. REDCap normalises datetimes on import (a minute value in a
/// seconds field gains `:00`, a seconds value in a minute field loses its
/// seconds), so a plain string comparison would see a difference after every
/// write and write again forever. The times are compared instead, at the
/// precision the field kept; any other text (a note, another format)
/// differs and is overwritten.
pub(super) fn same_moment(current: &str, wanted: &str) -> bool {
    let current = current.trim();
    if current == wanted {
        return true;
    }
    match (parse_local(current), parse_local(wanted)) {
        (Some((c, true)), Some((w, _))) => c == w,
        (Some((c, false)), Some((w, _))) => Some(c) == w.with_second(0),
        _ => false,
    }
}

/// A `YYYY-MM-DD HH:MM[:SS]` value (REDCap's import form, `T` allowed) and whether it has seconds.
fn parse_local(s: &str) -> Option<(NaiveDateTime, bool)> {
    let s = s.trim().replacen('T', " ", 1);
    if let Ok(t) = NaiveDateTime::parse_from_str(&s, "%Y-%m-%d %H:%M:%S") {
        return Some((t, true));
    }
    NaiveDateTime::parse_from_str(&s, "%Y-%m-%d %H:%M").ok().map(|t| (t, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    #[test]
    fn style_follows_the_validation_in_auto() {
        use TimestampStyle::*;
        for (v, want) in [
            ("", Seconds),
            ("datetime_ymd", Minutes),
            ("datetime_mdy", Minutes),
            ("datetime_dmy", Minutes),
            ("datetime_seconds_ymd", Seconds),
            ("datetime_seconds_mdy", Seconds),
            ("datetime_seconds_dmy", Seconds),
        ] {
            assert_eq!(timestamp_style(TimestampFormat::Auto, "text", v), Ok(want), "{v}");
        }
    }

    #[test]
    fn explicit_format_wins_over_validation() {
        assert_eq!(timestamp_style(TimestampFormat::Minutes, "text", ""), Ok(TimestampStyle::Minutes));
        assert_eq!(timestamp_style(TimestampFormat::Seconds, "text", "datetime_ymd"), Ok(TimestampStyle::Seconds));
        assert_eq!(timestamp_style(TimestampFormat::Minutes, "notes", ""), Ok(TimestampStyle::Minutes));
    }

    #[test]
    fn date_only_and_other_validations_are_refused_whatever_the_format() {
        for format in [TimestampFormat::Auto, TimestampFormat::Minutes, TimestampFormat::Seconds] {
            for v in ["date_ymd", "date_mdy", "date_dmy"] {
                let e = timestamp_style(format, "text", v).unwrap_err();
                assert!(e.contains("date-only"), "{e}");
            }
            assert!(timestamp_style(format, "text", "integer").is_err());
            assert!(timestamp_style(format, "radio", "").is_err());
        }
    }

    #[test]
    fn formats_in_the_project_zone() {
        let at = utc(2026, 11, 23, 14, 15, 7);
        assert_eq!(format_timestamp(at, chrono_tz::UTC, TimestampStyle::Seconds), "2026-11-23 14:15:07");
        assert_eq!(format_timestamp(at, chrono_tz::UTC, TimestampStyle::Minutes), "2026-11-23 14:15");
        assert_eq!(format_timestamp(at, chrono_tz::America::New_York, TimestampStyle::Seconds), "2026-11-23 09:15:07");
        assert_eq!(format_timestamp(at, chrono_tz::Asia::Kolkata, TimestampStyle::Minutes), "2026-11-23 19:45");
        // Crossing midnight changes the date too.
        assert_eq!(
            format_timestamp(utc(2026, 1, 1, 2, 0, 0), chrono_tz::America::Los_Angeles, TimestampStyle::Minutes),
            "2025-12-31 18:00"
        );
    }

    #[test]
    fn follows_daylight_saving_time() {
        let ny = chrono_tz::America::New_York;
        // Summer: UTC-4; winter: UTC-5.
        assert_eq!(format_timestamp(utc(2026, 7, 1, 16, 0, 0), ny, TimestampStyle::Minutes), "2026-07-01 12:00");
        assert_eq!(format_timestamp(utc(2026, 1, 15, 16, 0, 0), ny, TimestampStyle::Minutes), "2026-01-15 11:00");
        // 2026-03-08: 02:00 EST jumps to 03:00 EDT (07:00 UTC).
        assert_eq!(format_timestamp(utc(2026, 3, 8, 6, 59, 59), ny, TimestampStyle::Seconds), "2026-03-08 01:59:59");
        assert_eq!(format_timestamp(utc(2026, 3, 8, 7, 0, 0), ny, TimestampStyle::Seconds), "2026-03-08 03:00:00");
        // 2026-11-01: 02:00 EDT falls back to 01:00 EST; both 01:30s exist.
        assert_eq!(format_timestamp(utc(2026, 11, 1, 5, 30, 0), ny, TimestampStyle::Minutes), "2026-11-01 01:30");
        assert_eq!(format_timestamp(utc(2026, 11, 1, 6, 30, 0), ny, TimestampStyle::Minutes), "2026-11-01 01:30");
    }

    #[test]
    fn a_stamp_is_the_same_at_the_precision_the_field_kept() {
        // Written with seconds, kept in minutes (and the other way round).
        assert!(same_moment("2026-11-23 09:15", "2026-11-23 09:15:07"));
        assert!(same_moment("2026-11-23 09:15:00", "2026-11-23 09:15"));
        assert!(same_moment("2026-11-23 09:15:07", "2026-11-23 09:15:07"));
        assert!(same_moment(" 2026-11-23 09:15 ", "2026-11-23 09:15"));
        assert!(same_moment("2026-11-23T09:15", "2026-11-23 09:15"));
        // Another time, a blank, other text: different.
        assert!(!same_moment("2026-11-23 09:15:08", "2026-11-23 09:15:07"));
        assert!(!same_moment("2026-11-23 09:16", "2026-11-23 09:15:07"));
        assert!(!same_moment("2026-11-23 09:15:07", "2026-11-23 09:15"));
        assert!(!same_moment("", "2026-11-23 09:15"));
        assert!(!same_moment("11/23/2026 09:15", "2026-11-23 09:15"));
        assert!(!same_moment("opted out by phone", "2026-11-23 09:15"));
    }
}
