//! The words of the two messages: a notification of one phone's change, and
//! an alert about a failing sink. Pure functions of what the relay hands
//! over, so every wording is unit-tested without a server.
//!
//! Everything that came from outside (message text, sink names, errors,
//! staff names) is put on one line and cut, so stored text can neither
//! reshape the message nor bury the facts under a wall of text.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde_json::Value;

use crate::sinks::{Alert, Cause, Notification, ReportOutcome, ReviewItem, SinkReport, Target};

/// Longest quoted message text or error; the rest is cut.
const MAX_QUOTED_CHARS: usize = 500;

/// A message's subject and plain-text body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Notice {
    pub subject: String,
    pub body: String,
}

/// The notification of one phone's change: what changed, what caused it,
/// and what every other sink did. The subject masks the number; the body,
/// read by the study team, has it in full.
pub(super) fn notification(n: &Notification, tz: Tz) -> Notice {
    let phone = n.phone.as_str();
    let origin = n.cause.as_ref().map(|c| Origin::of(&c.source));
    let opted_out = n.target.is_opted_out();

    let mut body = headline(phone, opted_out, origin.as_ref());
    body.push_str("\n\n");
    match n.target {
        Target::OptedOut { since } => body.push_str(&format!("Since:    {}\n", when(since, tz))),
        Target::OptedIn => {
            if let Some(c) = &n.cause {
                body.push_str(&format!("When:     {}\n", when(c.said_at, tz)));
            }
        }
    }
    body.push_str(&format!("Phone:    {phone}\n"));
    if let (Some(c), Some(origin)) = (&n.cause, &origin) {
        describe_cause(&mut body, c, origin, n.target, tz);
    }
    body.push_str("\nWhat the other systems did:\n");
    if n.others.is_empty() {
        body.push_str("  - Nothing: the change was recorded only; no other system (such as REDCap) is configured.\n");
    }
    for report in &n.others {
        body.push_str(&describe_report(report, tz));
    }
    body.push_str("\nSent by optout-relay.\n");

    let masked = n.phone.masked();
    let (label, verb) = if opted_out { ("Opt-out", "STOP") } else { ("Opt-in", "START") };
    let mut subject = match &origin {
        Some(Origin::Text) => format!("{label}: {masked} texted {verb}"),
        Some(Origin::Staff(_)) => format!("{label}: {masked} recorded by staff"),
        Some(Origin::Other(source)) => format!("{label}: {masked} ({source})"),
        None => format!("{label}: {masked}"),
    };
    // Failures in the subject, so they stand out in an inbox.
    let failed = labels(&n.others, |o| matches!(o, ReportOutcome::GaveUp { .. }));
    if !failed.is_empty() {
        subject.push_str(&format!(" - {} delivery FAILED", failed.join(", ")));
    }
    let waiting = labels(&n.others, |o| matches!(o, ReportOutcome::Waiting { .. }));
    if !waiting.is_empty() {
        subject.push_str(&format!(" - {} delivery waiting", waiting.join(", ")));
    }
    Notice { subject, body }
}

/// The alert about a sink that has been failing too long, or that works again.
pub(super) fn alert(a: &Alert, tz: Tz) -> Notice {
    let sink = one_line(&a.sink);
    let since = when(a.failing_since, tz);
    if a.recovered {
        return Notice {
            subject: format!("[optout-relay] recovered: sink {sink} works again"),
            body: format!(
                "Sink {sink} works again (failing since {since}); waiting changes are being delivered.\n\n\
                 Sent by optout-relay.\n"
            ),
        };
    }
    let phones = if a.waiting == 1 { "1 phone".to_owned() } else { format!("{} phones", a.waiting) };
    let error = cut(&one_line(a.error.trim()), MAX_QUOTED_CHARS);
    // The sentence ends with the error; one full stop, whether or not the error has its own.
    let stop = if error.ends_with('.') { "" } else { "." };
    Notice {
        subject: format!("[optout-relay] ALERT: sink {sink} is failing ({phones} waiting)"),
        body: format!(
            "Sink {sink} has been failing since {since} ({phones} waiting): {error}{stop}\n\n\
             Opt-outs are kept and will be delivered when it works again; if this lasts, \
             the FCC's 10-business-day deadline is at risk.\n\n\
             `optout-relay status` or GET /v1/sinks shows every sink's health.\n\n\
             Sent by optout-relay.\n",
        ),
    }
}

/// New review items: messages that may be revocations in the person's own
/// words, each with when it was said (the FCC's clock), the number, the
/// text and what matched, and how to decide. The subject masks no number
/// because it names none.
pub(super) fn reviews(items: &[ReviewItem], tz: Tz) -> Notice {
    let count = if items.len() == 1 { "1 message".to_owned() } else { format!("{} messages", items.len()) };
    let mut body = format!(
        "{count} may revoke consent in the sender's own words and wait for a decision. \
         Nothing is relayed until staff decide; the FCC's 10-business-day clock runs from when it was said.\n\n"
    );
    for item in items {
        let text = cut(&one_line(item.body.trim()), MAX_QUOTED_CHARS);
        body.push_str(&format!(
            "Review {id}: {phone}, {when}, scope {scope}\n  \"{text}\" (matched \"{matched}\")\n\n",
            id = item.id,
            phone = item.phone.as_str(),
            when = when(item.said_at, tz),
            scope = one_line(&item.scope),
            matched = one_line(&item.matched),
        ));
    }
    body.push_str(
        "Decide with POST /v1/reviews/{id} {\"decision\": \"opt_out\" | \"dismiss\", \"note\": \"...\"}; \
         GET /v1/reviews lists what is pending.\n\nSent by optout-relay.\n",
    );
    Notice { subject: format!("[optout-relay] review: {count} may revoke consent"), body }
}

/// Who or what made the change, from a cause's `source`.
enum Origin {
    /// A text message through Twilio.
    Text,
    /// Recorded by a member of staff (the name after `staff:`).
    Staff(String),
    /// Anything else (imports, later sources), named as recorded.
    Other(String),
}

impl Origin {
    fn of(source: &str) -> Origin {
        match source {
            "twilio" => Origin::Text,
            s => match s.strip_prefix("staff:") {
                Some(who) => Origin::Staff(one_line(who)),
                None => Origin::Other(one_line(s)),
            },
        }
    }
}

fn headline(phone: &str, opted_out: bool, origin: Option<&Origin>) -> String {
    let change = if opted_out { "opted out of text messages" } else { "opted back in to text messages" };
    match origin {
        Some(Origin::Text) => {
            let keyword = if opted_out { "STOP" } else { "START" };
            format!("{phone} {change} (texted {keyword}).")
        }
        Some(Origin::Staff(who)) => format!("{phone} was {change} by staff ({who})."),
        Some(Origin::Other(source)) => format!("{phone} was {change} ({source})."),
        None => format!("{phone} is now {change}."),
    }
}

/// The cause's scope, source and text, and when it was said if that is not
/// already the `Since:` line.
fn describe_cause(body: &mut String, c: &Cause, origin: &Origin, target: Target, tz: Tz) {
    if matches!(target, Target::OptedOut { since } if since != c.said_at) {
        body.push_str(&format!("Said at:  {}\n", when(c.said_at, tz)));
    }
    body.push_str(&format!("Scope:    {}\n", scope_label(&c.scope)));
    let source = match origin {
        Origin::Text => "a text message (Twilio)".to_owned(),
        Origin::Staff(who) => format!("staff ({who})"),
        Origin::Other(source) => source.clone(),
    };
    body.push_str(&format!("Source:   {source}\n"));
    let text = c.body.trim();
    if !text.is_empty() {
        let label = if matches!(origin, Origin::Text) { "Message: " } else { "Note:    " };
        // Debug quoting shows control characters as escapes, on one line.
        body.push_str(&format!("{label} {:?}\n", cut(text, MAX_QUOTED_CHARS)));
    }
}

/// What one other sink did, as one bullet (and its indented details).
fn describe_report(report: &SinkReport, tz: Tz) -> String {
    let label = sink_label(&report.sink);
    match &report.outcome {
        ReportOutcome::Applied { at, detail } => {
            let mut out = format!("  - {label}: done at {}.\n", when(*at, tz));
            if let Some(detail) = detail {
                out.push_str(&describe_detail(detail));
            }
            out
        }
        ReportOutcome::Waiting { since, error } => match error {
            Some(e) => format!(
                "  - {label} delivery waiting: not done yet, trying since {}. Last error: {}\n",
                when(*since, tz),
                cut(&one_line(e.trim()), MAX_QUOTED_CHARS)
            ),
            None => format!("  - {label} delivery waiting: not done yet, waiting since {}.\n", when(*since, tz)),
        },
        ReportOutcome::GaveUp { error } => format!(
            "  - {label} delivery FAILED: {} - the relay gave up; an operator must act.\n",
            cut(&one_line(error.trim()), MAX_QUOTED_CHARS)
        ),
    }
}

/// A sink's own account of what it wrote, read defensively: sinks other
/// than REDCap, or older versions of it, may record something else.
/// `records` are the records holding the phone, `written` those changed now
/// (a compare-and-write leaves alone the ones that already held the target).
fn describe_detail(detail: &Value) -> String {
    let ids = |key: &str| -> Option<Vec<String>> {
        let list = detail.get(key)?.as_array()?;
        Some(
            list.iter()
                .filter_map(|r| match r {
                    Value::String(s) => Some(cut(&one_line(s), MAX_QUOTED_CHARS)),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
                .collect(),
        )
    };
    let records = ids("records");
    let mut out = String::new();
    match &records {
        Some(records) if records.is_empty() => out.push_str("      No record has this phone number.\n"),
        Some(records) => out.push_str(&format!("      Records with this number: {}\n", records.join(", "))),
        None => {}
    }
    match ids("written") {
        // Nothing written because nothing matched: the line above says so.
        Some(written) if written.is_empty() && records.as_ref().is_some_and(|r| !r.is_empty()) => {
            out.push_str("      Written: none (they already held this)\n");
        }
        Some(written) if !written.is_empty() => {
            out.push_str(&format!("      Written: {}\n", written.join(", ")));
        }
        _ => {}
    }
    if out.is_empty() {
        if let Some(skipped) = detail.get("skipped").and_then(Value::as_str) {
            out.push_str(&format!("      Skipped: {}\n", cut(&one_line(skipped), MAX_QUOTED_CHARS)));
        }
    }
    // A sink's remark on what it could not do (VAN: a vanId it has no person for).
    if let Some(note) = detail.get("note").and_then(Value::as_str) {
        out.push_str(&format!("      Note: {}\n", cut(&one_line(note), MAX_QUOTED_CHARS)));
    }
    out
}

/// The labels of the other sinks whose outcome matches.
fn labels(others: &[SinkReport], pick: impl Fn(&ReportOutcome) -> bool) -> Vec<String> {
    others.iter().filter(|r| pick(&r.outcome)).map(|r| sink_label(&r.sink)).collect()
}

/// `2026-11-23 09:15:07 EST (2026-11-23 14:15:07 UTC)`, or only the UTC time
/// when the zone is UTC.
fn when(at: DateTime<Utc>, tz: Tz) -> String {
    let utc = at.format("%Y-%m-%d %H:%M:%S UTC").to_string();
    let local = at.with_timezone(&tz).format("%Y-%m-%d %H:%M:%S %Z").to_string();
    if local == utc {
        utc
    } else {
        format!("{local} ({utc})")
    }
}

/// The study team knows the default sink as REDCap; other sinks by their name.
fn sink_label(sink: &str) -> String {
    match sink {
        "redcap" => "REDCap".to_owned(),
        other => one_line(other),
    }
}

/// A cause's scope: a Messaging Service SID, the number texted, or the
/// whole organisation (staff and imports).
fn scope_label(scope: &str) -> String {
    if scope.starts_with("MG") {
        format!("Messaging Service {}", one_line(scope))
    } else if scope.starts_with('+') {
        format!("the number {}", one_line(scope))
    } else if scope == "organisation" {
        "the whole organisation (every scope)".to_owned()
    } else {
        one_line(scope)
    }
}

/// Control characters (newlines included) become spaces.
fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde_json::json;

    use super::*;
    use crate::domain::Phone;

    /// 2026-11-23 14:15:07 UTC = 09:15:07 in New York (EST, UTC-5).
    fn november() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 23, 14, 15, 7).unwrap()
    }

    fn ny() -> Tz {
        "America/New_York".parse().unwrap()
    }

    fn text(body: &str) -> Cause {
        Cause {
            body: body.into(),
            scope: "MG11111111111111111111111111111111".into(),
            source: "twilio".into(),
            said_at: november(),
        }
    }

    fn change(target: Target, cause: Option<Cause>, others: Vec<SinkReport>) -> Notification {
        Notification { phone: Phone::from_stored("+14155550101".into()), target, cause, others }
    }

    fn out() -> Target {
        Target::OptedOut { since: november() }
    }

    fn redcap(outcome: ReportOutcome) -> SinkReport {
        SinkReport { sink: "redcap".into(), outcome }
    }

    fn applied(detail: Value) -> ReportOutcome {
        ReportOutcome::Applied { at: november() + chrono::Duration::seconds(2), detail: Some(detail) }
    }

    #[test]
    fn opt_out_with_records_shows_matched_and_written_and_the_local_and_utc_time() {
        let n = change(
            out(),
            Some(text("Stop")),
            vec![redcap(applied(json!({"records": ["1", "7"], "written": ["7"], "value": "x"})))],
        );
        let notice = notification(&n, ny());
        assert_eq!(notice.subject, "Opt-out: +1415***0101 texted STOP");
        let b = &notice.body;
        assert!(b.starts_with("+14155550101 opted out of text messages (texted STOP).\n\n"), "{b}");
        assert!(b.contains("Since:    2026-11-23 09:15:07 EST (2026-11-23 14:15:07 UTC)\n"), "{b}");
        assert!(b.contains("Phone:    +14155550101\n"), "{b}");
        assert!(b.contains("Scope:    Messaging Service MG11111111111111111111111111111111\n"), "{b}");
        assert!(b.contains("Source:   a text message (Twilio)\n"), "{b}");
        assert!(b.contains("Message:  \"Stop\"\n"), "{b}");
        assert!(!b.contains("Said at:"), "said when the opt-out began: {b}");
        assert!(
            b.contains(
                "  - REDCap: done at 2026-11-23 09:15:09 EST (2026-11-23 14:15:09 UTC).\n      Records with this number: 1, 7\n      Written: 7\n"
            ),
            "{b}"
        );
    }

    #[test]
    fn opt_in_says_opted_back_in_and_when() {
        let n = change(
            Target::OptedIn,
            Some(text("START")),
            vec![redcap(applied(json!({"records": [7], "written": [7]})))],
        );
        let notice = notification(&n, ny());
        assert_eq!(notice.subject, "Opt-in: +1415***0101 texted START");
        let b = &notice.body;
        assert!(b.starts_with("+14155550101 opted back in to text messages (texted START).\n"), "{b}");
        assert!(b.contains("When:     2026-11-23 09:15:07 EST (2026-11-23 14:15:07 UTC)\n"), "{b}");
        assert!(!b.contains("Since:"), "{b}");
        assert!(b.contains("      Records with this number: 7\n      Written: 7\n"), "{b}");
    }

    #[test]
    fn nothing_matched_is_said_plainly() {
        let n = change(out(), Some(text("STOP")), vec![redcap(applied(json!({"records": [], "written": []})))]);
        let b = notification(&n, ny()).body;
        assert!(b.contains("      No record has this phone number.\n"), "{b}");
        assert!(!b.contains("Written"), "{b}");
    }

    #[test]
    fn records_that_already_held_the_target_were_not_written() {
        let b = describe_detail(&json!({"records": ["3"], "written": []}));
        assert_eq!(b, "      Records with this number: 3\n      Written: none (they already held this)\n");
    }

    #[test]
    fn details_are_read_defensively() {
        assert_eq!(describe_detail(&json!({})), "");
        assert_eq!(describe_detail(&json!({"records": "1"})), "");
        assert_eq!(describe_detail(&json!({"records": ["a\nb", null, 3]})), "      Records with this number: a b, 3\n");
        assert_eq!(describe_detail(&json!({"written": ["9"]})), "      Written: 9\n");
        assert_eq!(describe_detail(&json!({"skipped": "nothing\nto do"})), "      Skipped: nothing to do\n");
        assert_eq!(
            describe_detail(&json!({"written": [101], "note": "VAN has no person with vanId 999"})),
            "      Written: 101\n      Note: VAN has no person with vanId 999\n"
        );
        let n = change(
            out(),
            None,
            vec![SinkReport { sink: "ehr".into(), outcome: ReportOutcome::Applied { at: november(), detail: None } }],
        );
        assert!(notification(&n, Tz::UTC).body.contains("  - ehr: done at 2026-11-23 14:15:07 UTC.\n"));
    }

    #[test]
    fn waiting_sink_says_since_when_and_its_last_error() {
        let since = november() + chrono::Duration::minutes(1);
        let n = change(
            out(),
            Some(text("STOP")),
            vec![redcap(ReportOutcome::Waiting { since, error: Some("REDCap answered 503:\nbusy".into()) })],
        );
        let notice = notification(&n, ny());
        assert_eq!(notice.subject, "Opt-out: +1415***0101 texted STOP - REDCap delivery waiting");
        assert!(
            notice.body.contains(
                "  - REDCap delivery waiting: not done yet, trying since 2026-11-23 09:16:07 EST (2026-11-23 14:16:07 UTC). Last error: REDCap answered 503: busy\n"
            ),
            "{}",
            notice.body
        );
        let quiet = change(out(), None, vec![redcap(ReportOutcome::Waiting { since, error: None })]);
        assert!(notification(&quiet, Tz::UTC)
            .body
            .contains("  - REDCap delivery waiting: not done yet, waiting since 2026-11-23 14:16:07 UTC.\n"));
    }

    #[test]
    fn gave_up_is_a_failure_in_subject_and_body_with_what_to_do() {
        let error = "REDCap answered 403:\nYou do not have API rights";
        let n = change(out(), Some(text("STOP")), vec![redcap(ReportOutcome::GaveUp { error: error.into() })]);
        let notice = notification(&n, ny());
        assert_eq!(notice.subject, "Opt-out: +1415***0101 texted STOP - REDCap delivery FAILED");
        assert!(
            notice.body.contains(
                "  - REDCap delivery FAILED: REDCap answered 403: You do not have API rights - the relay gave up; an operator must act.\n"
            ),
            "{}",
            notice.body
        );
    }

    #[test]
    fn every_other_sink_is_reported_in_order() {
        let n = change(
            out(),
            None,
            vec![
                redcap(applied(json!({"records": ["1"], "written": ["1"]}))),
                SinkReport { sink: "study_b".into(), outcome: ReportOutcome::GaveUp { error: "403".into() } },
            ],
        );
        let notice = notification(&n, Tz::UTC);
        assert_eq!(notice.subject, "Opt-out: +1415***0101 - study_b delivery FAILED");
        let redcap_at = notice.body.find("  - REDCap: done").unwrap();
        let study_b_at = notice.body.find("  - study_b delivery FAILED").unwrap();
        assert!(redcap_at < study_b_at, "{}", notice.body);
    }

    #[test]
    fn staff_cause_says_who_and_quotes_the_note() {
        let cause = Cause {
            body: "asked by phone".into(),
            scope: "organisation".into(),
            source: "staff:alice".into(),
            said_at: november(),
        };
        let notice = notification(&change(out(), Some(cause.clone()), vec![]), ny());
        assert_eq!(notice.subject, "Opt-out: +1415***0101 recorded by staff");
        let b = &notice.body;
        assert!(b.starts_with("+14155550101 was opted out of text messages by staff (alice).\n"), "{b}");
        assert!(b.contains("Scope:    the whole organisation (every scope)\n"), "{b}");
        assert!(b.contains("Source:   staff (alice)\n"), "{b}");
        assert!(b.contains("Note:     \"asked by phone\"\n"), "{b}");
        let back = notification(&change(Target::OptedIn, Some(cause), vec![]), ny());
        assert_eq!(back.subject, "Opt-in: +1415***0101 recorded by staff");
        assert!(back.body.starts_with("+14155550101 was opted back in to text messages by staff (alice).\n"));
    }

    #[test]
    fn no_other_sink_means_recorded_only() {
        let b = notification(&change(out(), Some(text("STOP")), vec![]), Tz::UTC).body;
        assert!(
            b.contains(
                "What the other systems did:\n  - Nothing: the change was recorded only; no other system (such as REDCap) is configured.\n"
            ),
            "{b}"
        );
        assert!(b.contains("Since:    2026-11-23 14:15:07 UTC\n"), "{b}");
    }

    #[test]
    fn without_a_cause_only_the_change_is_told() {
        let notice = notification(&change(out(), None, vec![]), ny());
        assert_eq!(notice.subject, "Opt-out: +1415***0101");
        assert!(notice.body.starts_with("+14155550101 is now opted out of text messages.\n"), "{}", notice.body);
        assert!(!notice.body.contains("Scope:") && !notice.body.contains("Message:"), "{}", notice.body);
        let back = notification(&change(Target::OptedIn, None, vec![]), ny());
        assert!(!back.body.contains("When:"), "{}", back.body);
    }

    #[test]
    fn a_cause_said_before_the_opt_out_began_shows_both_times() {
        let mut cause = text("STOP");
        cause.said_at = november() - chrono::Duration::hours(1);
        let b = notification(&change(out(), Some(cause), vec![]), Tz::UTC).body;
        assert!(b.contains("Since:    2026-11-23 14:15:07 UTC\n"), "{b}");
        assert!(b.contains("Said at:  2026-11-23 13:15:07 UTC\n"), "{b}");
    }

    #[test]
    fn subject_masks_the_number_and_body_has_it_in_full() {
        for target in [out(), Target::OptedIn] {
            let n = notification(&change(target, Some(text("x")), vec![]), ny());
            assert!(n.subject.contains("+1415***0101"), "{}", n.subject);
            assert!(!n.subject.contains("5550101"), "{}", n.subject);
            assert!(n.body.contains("+14155550101"));
        }
    }

    #[test]
    fn long_or_multiline_message_text_is_quoted_on_one_line_and_cut() {
        let long = "x".repeat(600);
        let b = notification(&change(out(), Some(text(&format!("STOP\r\nBcc: a@b\n{long}"))), vec![]), ny()).body;
        let line = b.lines().find(|l| l.starts_with("Message:")).unwrap();
        assert!(line.contains("STOP\\r\\nBcc: a@b\\n"), "{line}");
        assert!(line.ends_with("...\""), "{line}");
        assert_eq!(line.matches('x').count(), 500 - "STOP\r\nBcc: a@b\n".len(), "{line}");
        assert!(!b.contains("\nBcc:"));
    }

    #[test]
    fn review_mail_lists_each_item_with_its_time_number_text_and_how_to_decide() {
        let region = crate::domain::parse_region("US").expect("US");
        let item = |id, body: &str| ReviewItem {
            id,
            phone: crate::domain::Phone::parse("+14155550101", region).expect("phone"),
            body: body.into(),
            said_at: november(),
            scope: "MG1".into(),
            matched: "stop texting".into(),
        };
        let n = reviews(&[item(7, "please stop texting me"), item(8, "line one\nline two")], Tz::UTC);
        assert_eq!(n.subject, "[optout-relay] review: 2 messages may revoke consent");
        assert!(n.body.contains("Review 7: +14155550101, "), "{}", n.body);
        assert!(n.body.contains("\"please stop texting me\" (matched \"stop texting\")"), "{}", n.body);
        assert!(n.body.contains("\"line one line two\""), "text from outside is put on one line: {}", n.body);
        assert!(n.body.contains("POST /v1/reviews/{id}"), "{}", n.body);
        assert!(!n.subject.contains("4155550101"), "no number in the subject");
        assert_eq!(reviews(&[item(9, "stop")], Tz::UTC).subject, "[optout-relay] review: 1 message may revoke consent");
    }

    #[test]
    fn alert_says_since_when_how_many_wait_and_what_is_at_risk() {
        let a = Alert {
            sink: "redcap".into(),
            failing_since: november(),
            error: "REDCap answered 503:\nService Unavailable.".into(),
            waiting: 12,
            recovered: false,
        };
        let notice = alert(&a, ny());
        assert_eq!(notice.subject, "[optout-relay] ALERT: sink redcap is failing (12 phones waiting)");
        assert!(
            notice.body.starts_with(
                "Sink redcap has been failing since 2026-11-23 09:15:07 EST (2026-11-23 14:15:07 UTC) (12 phones waiting): REDCap answered 503: Service Unavailable.\n\n\
                 Opt-outs are kept and will be delivered when it works again; if this lasts, the FCC's 10-business-day deadline is at risk.\n"
            ),
            "{}",
            notice.body
        );
        let one = alert(&Alert { waiting: 1, error: "x".repeat(600), ..a }, Tz::UTC);
        assert!(one.subject.ends_with("(1 phone waiting)"), "{}", one.subject);
        assert!(one.body.contains("(1 phone waiting): "), "{}", one.body);
        assert!(one.body.contains(&format!("{}...\n", "x".repeat(500))), "cut: {}", one.body);
    }

    #[test]
    fn recovered_alert_says_it_works_again() {
        let a = Alert {
            sink: "study_a".into(),
            failing_since: november(),
            error: "timed out".into(),
            waiting: 0,
            recovered: true,
        };
        let notice = alert(&a, ny());
        assert_eq!(notice.subject, "[optout-relay] recovered: sink study_a works again");
        assert!(
            notice.body.starts_with(
                "Sink study_a works again (failing since 2026-11-23 09:15:07 EST (2026-11-23 14:15:07 UTC)); waiting changes are being delivered.\n"
            ),
            "{}",
            notice.body
        );
        assert!(!notice.body.contains("timed out"));
    }

    #[test]
    fn sink_names_cannot_reshape_the_alert() {
        let a = Alert {
            sink: "evil\r\nBcc: x@y".into(),
            failing_since: november(),
            error: "e".into(),
            waiting: 2,
            recovered: false,
        };
        let notice = alert(&a, Tz::UTC);
        assert!(!notice.subject.contains('\n') && !notice.body.contains("\nBcc"), "{notice:?}");
    }

    #[test]
    fn utc_zone_shows_the_time_once_and_summer_time_is_named() {
        assert_eq!(when(november(), Tz::UTC), "2026-11-23 14:15:07 UTC");
        assert_eq!(
            when(Utc.with_ymd_and_hms(2026, 7, 4, 12, 0, 0).unwrap(), ny()),
            "2026-07-04 08:00:00 EDT (2026-07-04 12:00:00 UTC)"
        );
    }
}
