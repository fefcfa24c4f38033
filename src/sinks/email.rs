//! Notification email: one message per opt-out/opt-in change, to every
//! configured address, saying what happened and what the other sinks did
//! with it. It replaces the REDCap module's "Notification Email", which was
//! silent when no record matched; here staff also hear about changes that
//! matched nothing and, above all, about REDCap updates that failed.
//!
//! The relay claims an email delivery only once the same event's other
//! deliveries are no longer pending, so their outcome is known when the
//! message is written; it is read back from the store.

use base64::Engine as _;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use lettre::message::header::{Header, HeaderName, HeaderValue};
use lettre::message::{Mailbox, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};

use super::{DeliveryItem, SinkError, EMAIL_SINK};
use crate::config::{EmailConfig, EmailTls};
use crate::domain::EventKind;
use crate::store::{DeliveryFilter, DeliveryRow, EventFilter, EventRow, Store};

/// How many of an event's deliveries are read to report on (one per sink).
const DELIVERY_LOOKUP_LIMIT: i64 = 50;
/// Longest quoted message text or error in a notification; the rest is cut.
const MAX_QUOTED_CHARS: usize = 500;

/// Sends the notification email over SMTP (a pooled lettre transport).
pub struct EmailSink {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    /// `host:port`, for error messages.
    server: String,
    from: Mailbox,
    to: Vec<Mailbox>,
    tz: Tz,
    store: Store,
    /// Kept only to scrub it from error text, should a server ever echo it.
    password: Option<SecretString>,
}

impl EmailSink {
    /// Builds the transport (nothing is connected yet) and checks the
    /// addresses and zone. The error names the offending setting.
    pub fn new(cfg: &EmailConfig, store: Store) -> Result<EmailSink, String> {
        // STARTTLS/TLS use rustls without a built-in provider choice.
        crate::install_tls_provider();
        let from: Mailbox =
            cfg.from.parse().map_err(|e| format!("email.from {:?} is not a valid address: {e}", cfg.from))?;
        if cfg.to.is_empty() {
            return Err("email.to must list at least one address".to_owned());
        }
        let to = cfg
            .to
            .iter()
            .map(|a| a.parse::<Mailbox>().map_err(|e| format!("email.to {a:?} is not a valid address: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let tz: Tz =
            cfg.timezone.parse().map_err(|_| format!("email.timezone {:?} is not an IANA zone name", cfg.timezone))?;
        let host = cfg.smtp_host.trim();
        if host.is_empty() {
            return Err("email.smtp_host is empty".to_owned());
        }
        let plain = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host);
        let builder = match cfg.tls {
            EmailTls::None => plain,
            // Required STARTTLS: no credentials or mail go out if the server
            // does not offer it (no downgrade by a man in the middle).
            EmailTls::Starttls => plain.tls(Tls::Required(tls_parameters(cfg, host)?)),
            EmailTls::Tls => plain.tls(Tls::Wrapper(tls_parameters(cfg, host)?)),
        };
        let mut builder = builder.port(cfg.port()).timeout(Some(cfg.timeout));
        match (&cfg.username, &cfg.password) {
            (Some(user), Some(password)) => {
                builder = builder.credentials(Credentials::new(user.clone(), password.expose_secret().to_owned()));
            }
            (None, None) => {}
            _ => return Err("email.username and email.password go together".to_owned()),
        }
        Ok(EmailSink {
            transport: builder.build(),
            server: format!("{host}:{}", cfg.port()),
            from,
            to,
            tz,
            store,
            password: cfg.password.clone().filter(|p| !p.expose_secret().is_empty()),
        })
    }

    /// Sends one message per item, in order; each item gets its own outcome.
    /// When the server cannot be reached or refuses our login, the rest of
    /// the batch fails with the same error without being tried: each would
    /// wait out the timeout (outliving the lease) or count towards an
    /// account lockout.
    pub async fn apply(&self, items: &[DeliveryItem]) -> Vec<Result<Value, SinkError>> {
        let mut out = Vec::with_capacity(items.len());
        let mut halted: Option<SinkError> = None;
        for item in items {
            if let Some(error) = &halted {
                out.push(Err(error.clone()));
                continue;
            }
            match self.send_one(item).await {
                Ok(value) => out.push(Ok(value)),
                Err(Failure { error, halt }) => {
                    if halt {
                        halted = Some(error.clone());
                    }
                    out.push(Err(error));
                }
            }
        }
        out
    }

    async fn send_one(&self, item: &DeliveryItem) -> Result<Value, Failure> {
        if !item.kind.changes_consent() {
            // Help events are never relayed; should one arrive, nobody needs mail about it.
            return Ok(json!({ "skipped": "help messages are not reported" }));
        }
        let event = self.find_event(item).await?;
        let others = self.other_deliveries(item).await?;
        let notice = compose(item, self.tz, event.as_ref(), &others);
        let message_id =
            format!("<optout-relay.{}.{:016x}@{}>", item.id, rand::random::<u64>(), self.from.email.domain());
        let message = self.message(&notice, &message_id).map_err(|e| Failure {
            error: SinkError::Misconfigured(format!("cannot build the notification email: {e}")),
            halt: false,
        })?;
        let response = self.transport.send(message).await.map_err(|e| {
            let mut failure = classify(&e, &self.server);
            failure.error = self.scrub(failure.error);
            failure
        })?;
        tracing::debug!(delivery = item.id, phone = %item.phone.masked(), "notification email sent");
        let reply = format!("{} {}", response.code(), response.message().collect::<Vec<_>>().join(" "));
        Ok(json!({
            "sent_to": self.to.iter().map(|m| m.email.to_string()).collect::<Vec<_>>(),
            "message_id": message_id,
            "smtp_reply": reply.trim_end(),
        }))
    }

    /// The event's own row (its text and scope), if the store still has it.
    async fn find_event(&self, item: &DeliveryItem) -> Result<Option<EventRow>, Failure> {
        // Ids ascend, so the first event of this phone after `id - 1` is the one, if it exists.
        let filter = EventFilter {
            phone: Some(item.phone.as_str().to_owned()),
            after_id: Some(item.event_id - 1),
            limit: 1,
            ..EventFilter::default()
        };
        let rows = self.store.list_events(&filter).await.map_err(|e| Failure::store(&e))?;
        Ok(rows.into_iter().find(|e| e.id == item.event_id))
    }

    /// The same event's deliveries to the other sinks.
    async fn other_deliveries(&self, item: &DeliveryItem) -> Result<Vec<DeliveryRow>, Failure> {
        let filter =
            DeliveryFilter { event_id: Some(item.event_id), limit: DELIVERY_LOOKUP_LIMIT, ..DeliveryFilter::default() };
        let rows = self.store.list_deliveries(&filter).await.map_err(|e| Failure::store(&e))?;
        Ok(rows.into_iter().filter(|d| d.sink != EMAIL_SINK).collect())
    }

    fn message(&self, notice: &Notice, message_id: &str) -> Result<Message, lettre::error::Error> {
        let mut builder = Message::builder()
            .from(self.from.clone())
            .subject(notice.subject.clone())
            .message_id(Some(message_id.to_owned()))
            // Asks vacation responders and ticket systems not to answer.
            .header(AutoSubmitted);
        for to in &self.to {
            builder = builder.to(to.clone());
        }
        builder.singlepart(SinglePart::plain(notice.body.clone()))
    }

    /// Removes the SMTP password (as typed and as sent in AUTH LOGIN) from error text.
    fn scrub(&self, error: SinkError) -> SinkError {
        let Some(password) = &self.password else { return error };
        let secret = password.expose_secret();
        let encoded = base64::engine::general_purpose::STANDARD.encode(secret);
        let clean = |s: String| s.replace(secret, "[REDACTED]").replace(&encoded, "[REDACTED]");
        match error {
            SinkError::Transient { message, retry_after } => {
                SinkError::Transient { message: clean(message), retry_after }
            }
            SinkError::Misconfigured(message) => SinkError::Misconfigured(clean(message)),
            SinkError::Uncertain(message) => SinkError::Uncertain(clean(message)),
        }
    }
}

/// What one failed item means: the error to record, and whether the rest of
/// the batch should fail the same way without being tried.
struct Failure {
    error: SinkError,
    halt: bool,
}

impl Failure {
    /// The store holds what the message reports; without it, try again later.
    fn store(e: &crate::store::StoreError) -> Failure {
        Failure {
            error: SinkError::Transient {
                message: format!("cannot read the event's deliveries for the notification: {e}"),
                retry_after: None,
            },
            halt: true,
        }
    }
}

/// Maps an SMTP error to the relay's retry classes.
fn classify(e: &lettre::transport::smtp::Error, server: &str) -> Failure {
    let transient = |message: String| SinkError::Transient { message, retry_after: None };
    if e.is_permanent() {
        // 530 (authentication required), 534, 535 (credentials invalid), 538: the login.
        if e.status().is_some_and(|c| c.to_string().starts_with("53")) {
            return Failure {
                error: SinkError::Misconfigured(format!(
                    "SMTP server {server} refused the login (check email.username and email.password): {e}"
                )),
                halt: true,
            };
        }
        return Failure {
            error: SinkError::Misconfigured(format!("SMTP server {server} refused the message: {e}")),
            halt: false,
        };
    }
    if e.is_transient() {
        return Failure {
            error: transient(format!("SMTP server {server} answered a temporary failure: {e}")),
            halt: false,
        };
    }
    if e.is_timeout() {
        return Failure { error: transient(format!("SMTP server {server} timed out: {e}")), halt: true };
    }
    if e.is_client() {
        // e.g. STARTTLS required but not offered, or no AUTH mechanism in common.
        return Failure { error: SinkError::Misconfigured(format!("cannot send through {server}: {e}")), halt: true };
    }
    // Connection refused, DNS, TLS handshake, connection dropped, garbled reply.
    Failure { error: transient(format!("cannot reach SMTP server {server}: {e}")), halt: true }
}

/// The server's certificate must name `host` and chain to a built-in root
/// or to one of `email.ca_file`'s.
fn tls_parameters(cfg: &EmailConfig, host: &str) -> Result<TlsParameters, String> {
    let mut params = TlsParameters::builder(host.to_owned());
    if let Some(pem) = cfg.extra_roots()? {
        let roots = Certificate::from_pem(&pem).map_err(|e| format!("email.ca_file: {e}"))?;
        params = params.add_root_certificate(roots);
    }
    params.build().map_err(|e| format!("email.smtp_host {host:?}: {e}"))
}

/// `Auto-Submitted: auto-generated` (RFC 3834).
#[derive(Clone)]
struct AutoSubmitted;

impl Header for AutoSubmitted {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("Auto-Submitted")
    }

    fn parse(_s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(AutoSubmitted)
    }

    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), "auto-generated".to_owned())
    }
}

/// A notification's subject and plain-text body.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Notice {
    subject: String,
    body: String,
}

/// Writes the notification for one item. `event` is the event's row when
/// found; `others` are the event's deliveries to the other sinks.
fn compose(item: &DeliveryItem, tz: Tz, event: Option<&EventRow>, others: &[DeliveryRow]) -> Notice {
    let staff = event.and_then(|e| e.source.strip_prefix("staff:"));
    let phone = item.phone.as_str();
    let mut body = String::new();
    let headline = match (item.kind, staff) {
        (EventKind::OptOut, None) => format!("{phone} opted out of text messages (texted STOP)."),
        (EventKind::OptIn, None) => format!("{phone} opted back in to text messages (texted START)."),
        (EventKind::OptOut, Some(who)) => {
            format!("{phone} was opted out of text messages by staff ({}).", one_line(who))
        }
        (EventKind::OptIn, Some(who)) => {
            format!("{phone} was opted back in to text messages by staff ({}).", one_line(who))
        }
        (EventKind::Help, _) => format!("{phone} asked for help (texted HELP); nothing changes."),
    };
    body.push_str(&headline);
    body.push_str("\n\n");
    body.push_str(&format!("When:     {}\n", when(item.received_at, tz)));
    body.push_str(&format!("Phone:    {phone}\n"));
    if let Some(e) = event {
        body.push_str(&format!("Scope:    {}\n", scope_label(&e.scope)));
        if !e.body.trim().is_empty() {
            let label = if staff.is_some() { "Note:    " } else { "Message: " };
            body.push_str(&format!("{label} {:?}\n", cut(e.body.trim(), MAX_QUOTED_CHARS)));
        }
    }
    body.push_str("\nWhat the other systems did:\n");
    if others.is_empty() {
        body.push_str("  - Nothing: the change was recorded only; no other system (such as REDCap) is configured.\n");
    }
    for row in others {
        body.push_str(&format!("  - {}\n", describe(row)));
    }
    body.push_str(&format!("\nSent by optout-relay (event #{}, delivery #{}).\n", item.event_id, item.id));

    let masked = item.phone.masked();
    let mut subject = match (item.kind, staff) {
        (EventKind::OptOut, None) => format!("Opt-out: {masked} texted STOP"),
        (EventKind::OptIn, None) => format!("Opt-in: {masked} texted START"),
        (EventKind::OptOut, Some(_)) => format!("Opt-out: {masked} recorded by staff"),
        (EventKind::OptIn, Some(_)) => format!("Opt-in: {masked} recorded by staff"),
        (EventKind::Help, _) => format!("Help: {masked} texted HELP"),
    };
    // Failures in the subject, so they stand out in an inbox.
    let failed: Vec<String> = others.iter().filter(|d| d.status == "dead").map(|d| sink_label(&d.sink)).collect();
    if !failed.is_empty() {
        subject.push_str(&format!(" - {} delivery FAILED", failed.join(", ")));
    }
    Notice { subject, body }
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

/// What one other sink did with the event.
fn describe(row: &DeliveryRow) -> String {
    let label = sink_label(&row.sink);
    let attempts = |n: i32| if n == 1 { "1 attempt".to_owned() } else { format!("{n} attempts") };
    match row.status.as_str() {
        "done" => describe_done(&label, row.result.as_ref()),
        "dead" => format!(
            "{label} delivery FAILED after {}: {} - an operator must replay it (optout-relay replay --dead)",
            attempts(row.attempts),
            row.last_error
                .as_deref()
                .map_or_else(|| "no error recorded".to_owned(), |e| cut(&one_line(e), MAX_QUOTED_CHARS)),
        ),
        // The relay waits for these, so this is only seen after a manual retry.
        "pending" => match &row.last_error {
            Some(e) => format!(
                "{label} delivery not finished yet ({} so far, last error: {})",
                attempts(row.attempts),
                cut(&one_line(e), MAX_QUOTED_CHARS)
            ),
            None => format!("{label} delivery not finished yet"),
        },
        other => format!("{label} delivery is {}", one_line(other)),
    }
}

/// A done delivery's result, read defensively: sinks other than REDCap, or
/// older versions of it, may record something else.
fn describe_done(label: &str, result: Option<&Value>) -> String {
    let Some(result) = result else { return format!("{label}: delivered") };
    if result.get("superseded").and_then(Value::as_bool) == Some(true) {
        return format!("{label}: not applied: a newer change was already delivered");
    }
    if let Some(records) = result.get("records").and_then(Value::as_array) {
        let ids: Vec<String> = records
            .iter()
            .filter_map(|r| match r {
                Value::String(s) => Some(one_line(s)),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .collect();
        return if ids.is_empty() {
            format!("no {label} record has this phone number")
        } else {
            format!("{label} records updated: {}", ids.join(", "))
        };
    }
    if let Some(skipped) = result.get("skipped").and_then(Value::as_str) {
        return format!("{label}: skipped ({})", one_line(skipped));
    }
    format!("{label}: delivered")
}

fn sink_label(sink: &str) -> String {
    match sink {
        "redcap" => "REDCap".to_owned(),
        other => one_line(other),
    }
}

/// The webhook's scope: a Messaging Service SID, the number texted, or `default`.
fn scope_label(scope: &str) -> String {
    if scope.starts_with("MG") {
        format!("Messaging Service {scope}")
    } else if scope.starts_with('+') {
        format!("the number {scope}")
    } else {
        one_line(scope)
    }
}

/// Control characters (newlines included) become spaces, so stored text cannot reshape the message.
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

    use super::*;
    use crate::domain::Phone;

    fn item(kind: EventKind) -> DeliveryItem {
        DeliveryItem {
            id: 34,
            event_id: 12,
            phone: Phone::from_stored("+14155550101".into()),
            kind,
            // 09:15:07 in New York (EST, UTC-5).
            received_at: Utc.with_ymd_and_hms(2026, 11, 23, 14, 15, 7).unwrap(),
        }
    }

    fn event(body: &str, source: &str) -> EventRow {
        EventRow {
            id: 12,
            message_sid: "SM00000000000000000000000000000001".into(),
            scope: "MG11111111111111111111111111111111".into(),
            phone: "+14155550101".into(),
            kind: "opt_out".into(),
            body: body.into(),
            source: source.into(),
            received_at: Utc.with_ymd_and_hms(2026, 11, 23, 14, 15, 7).unwrap(),
        }
    }

    fn row(sink: &str, status: &str, attempts: i32, last_error: Option<&str>, result: Option<Value>) -> DeliveryRow {
        let now = Utc::now();
        DeliveryRow {
            id: 33,
            event_id: 12,
            sink: sink.into(),
            phone: "+14155550101".into(),
            kind: "opt_out".into(),
            status: status.into(),
            attempts,
            last_error: last_error.map(str::to_owned),
            result,
            created_at: now,
            next_attempt_at: now,
            completed_at: Some(now),
        }
    }

    fn ny() -> Tz {
        "America/New_York".parse().unwrap()
    }

    #[test]
    fn opt_out_with_records_names_them_and_the_local_and_utc_time() {
        let redcap = row("redcap", "done", 1, None, Some(json!({"records": ["1", "7"], "matched": 2, "value": "x"})));
        let n = compose(&item(EventKind::OptOut), ny(), Some(&event("Stop", "twilio")), &[redcap]);
        assert_eq!(n.subject, "Opt-out: +1415***0101 texted STOP");
        assert!(n.body.starts_with("+14155550101 opted out of text messages (texted STOP).\n"), "{}", n.body);
        assert!(n.body.contains("When:     2026-11-23 09:15:07 EST (2026-11-23 14:15:07 UTC)\n"), "{}", n.body);
        assert!(n.body.contains("Phone:    +14155550101\n"));
        assert!(n.body.contains("Scope:    Messaging Service MG11111111111111111111111111111111\n"));
        assert!(n.body.contains("Message:  \"Stop\"\n"), "{}", n.body);
        assert!(n.body.contains("  - REDCap records updated: 1, 7\n"), "{}", n.body);
        assert!(n.body.contains("event #12, delivery #34"));
    }

    #[test]
    fn opt_in_says_opted_back_in() {
        let redcap = row("redcap", "done", 1, None, Some(json!({"records": [7]})));
        let n = compose(&item(EventKind::OptIn), ny(), Some(&event("START", "twilio")), &[redcap]);
        assert_eq!(n.subject, "Opt-in: +1415***0101 texted START");
        assert!(n.body.starts_with("+14155550101 opted back in to text messages (texted START)."));
        assert!(n.body.contains("REDCap records updated: 7"), "{}", n.body);
    }

    #[test]
    fn no_matching_record_is_said_plainly() {
        let redcap = row("redcap", "done", 1, None, Some(json!({"records": [], "matched": 0})));
        let n = compose(&item(EventKind::OptOut), ny(), None, &[redcap]);
        assert!(n.body.contains("  - no REDCap record has this phone number\n"), "{}", n.body);
        // The event row was not found: no scope or message lines, the rest still there.
        assert!(!n.body.contains("Scope:"));
        assert!(!n.body.contains("Message:"));
        assert!(n.body.contains("Phone:    +14155550101"));
    }

    #[test]
    fn dead_delivery_is_a_failure_in_subject_and_body() {
        let err = "gave up after 12 attempts: REDCap answered 403:\nYou do not have API rights";
        let redcap = row("redcap", "dead", 12, Some(err), None);
        let n = compose(&item(EventKind::OptOut), ny(), None, &[redcap]);
        assert_eq!(n.subject, "Opt-out: +1415***0101 texted STOP - REDCap delivery FAILED");
        assert!(
            n.body.contains(
                "  - REDCap delivery FAILED after 12 attempts: gave up after 12 attempts: REDCap answered 403: You do not have API rights - an operator must replay it (optout-relay replay --dead)\n"
            ),
            "{}",
            n.body
        );
    }

    #[test]
    fn superseded_delivery_says_not_applied() {
        let redcap = row("redcap", "done", 1, None, Some(json!({"superseded": true, "note": "…"})));
        let n = compose(&item(EventKind::OptOut), ny(), None, &[redcap]);
        assert!(n.body.contains("  - REDCap: not applied: a newer change was already delivered\n"), "{}", n.body);
        assert!(!n.subject.contains("FAILED"));
    }

    #[test]
    fn no_other_sink_means_recorded_only() {
        let n = compose(&item(EventKind::OptOut), ny(), None, &[]);
        assert!(n.body.contains("the change was recorded only"), "{}", n.body);
    }

    #[test]
    fn results_are_read_defensively() {
        assert_eq!(describe_done("REDCap", None), "REDCap: delivered");
        assert_eq!(describe_done("REDCap", Some(&json!({"records": "1"}))), "REDCap: delivered");
        assert_eq!(
            describe_done("REDCap", Some(&json!({"records": ["a\nb", null, 3]}))),
            "REDCap records updated: a b, 3"
        );
        assert_eq!(describe_done("REDCap", Some(&json!({"skipped": "help"}))), "REDCap: skipped (help)");
        assert_eq!(describe(&row("ehr", "done", 1, None, Some(json!({})))), "ehr: delivered");
    }

    #[test]
    fn subject_masks_the_number_and_body_has_it_in_full() {
        for kind in [EventKind::OptOut, EventKind::OptIn] {
            let n = compose(&item(kind), ny(), None, &[]);
            assert!(n.subject.contains("+1415***0101"), "{}", n.subject);
            assert!(!n.subject.contains("5550101"), "{}", n.subject);
            assert!(n.body.contains("+14155550101"));
        }
    }

    #[test]
    fn staff_events_say_who_recorded_them() {
        let n = compose(&item(EventKind::OptOut), ny(), Some(&event("asked by phone", "staff:alice")), &[]);
        assert_eq!(n.subject, "Opt-out: +1415***0101 recorded by staff");
        assert!(n.body.starts_with("+14155550101 was opted out of text messages by staff (alice)."));
        assert!(n.body.contains("Note:     \"asked by phone\"\n"), "{}", n.body);
    }

    #[test]
    fn utc_zone_shows_the_time_once_and_summer_time_is_named() {
        assert_eq!(when(Utc.with_ymd_and_hms(2026, 11, 23, 14, 15, 7).unwrap(), Tz::UTC), "2026-11-23 14:15:07 UTC");
        assert_eq!(
            when(Utc.with_ymd_and_hms(2026, 7, 4, 12, 0, 0).unwrap(), ny()),
            "2026-07-04 08:00:00 EDT (2026-07-04 12:00:00 UTC)"
        );
    }

    #[test]
    fn long_or_multiline_message_text_is_quoted_on_one_line_and_cut() {
        let long = "x".repeat(600);
        let n =
            compose(&item(EventKind::OptOut), ny(), Some(&event(&format!("STOP\r\nBcc: a@b\n{long}"), "twilio")), &[]);
        let line = n.body.lines().find(|l| l.starts_with("Message:")).unwrap();
        assert!(line.contains("STOP\\r\\nBcc: a@b\\n"), "{line}");
        assert!(line.ends_with("...\""), "{line}");
        assert!(!n.body.contains("\nBcc:"));
    }
}
