//! Operator actions shared by the admin API and the command line, so both
//! answer the same question the same way.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};

use crate::domain::{EventKind, MessageSid, Phone};
use crate::relay::target::{effective, held, target, Effective};
use crate::sinks::Sink;
use crate::store::{EventRow, Held, NewEvent, RecordOutcome, StateRow, Store, StoreError};

pub use crate::domain::ORGANISATION_SCOPE;

/// How many of a phone's events `phone_status` shows: the newest ones.
pub const PHONE_HISTORY_LIMIT: i64 = 500;

/// "Is this number opted out, since when, and does every sink hold it?"
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PhoneStatus {
    pub phone: String,
    /// True when any scope's state (organisation-wide events counted) is opted out.
    pub opted_out: bool,
    /// Each scope's state, the organisation-wide events taken into account.
    pub scopes: Vec<Effective>,
    /// The stored newest event per scope (`organisation` included).
    pub states: Vec<StateRow>,
    /// Per configured sink: what it should hold, what was last written, when.
    pub sinks: Vec<SinkTarget>,
    /// The newest events (up to [`PHONE_HISTORY_LIMIT`]), newest first.
    pub events: Vec<EventRow>,
}

/// One sink's view of one phone.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SinkTarget {
    pub sink: String,
    /// What the sink should hold now.
    pub target: Held,
    /// What was last written there (`null`: nothing ever).
    pub written: Option<Held>,
    pub written_at: Option<DateTime<Utc>>,
    /// The sink holds its target (as far as the relay knows).
    pub in_sync: bool,
    /// `pending`, `done`, `dead`, or `none` (the sink never had work for it).
    pub status: String,
    /// The last write's outcome is unknown; a re-read is scheduled.
    pub uncertain: bool,
    pub last_error: Option<String>,
    /// What the sink said it did (e.g. REDCap record ids).
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
}

pub async fn phone_status(store: &Store, sinks: &[Arc<Sink>], phone: &Phone) -> Result<PhoneStatus, StoreError> {
    let states = store.states(phone).await?;
    let rows = store.deliveries_of_phone(phone).await?;
    let events = store.recent_events(phone, PHONE_HISTORY_LIMIT).await?;
    let scopes = effective(&states, None);
    let sinks = sinks
        .iter()
        .map(|sink| {
            let want = held(target(&states, sink.scopes.as_deref()));
            let row = rows.iter().find(|r| r.sink == sink.name);
            let written = row.and_then(|r| r.written());
            let uncertain = row.is_some_and(|r| r.uncertain);
            SinkTarget {
                sink: sink.name.clone(),
                target: want,
                written,
                written_at: row.and_then(|r| r.written_at),
                // Never written and opted in: nothing of ours is there to clear.
                in_sync: !uncertain && (written == Some(want) || (written.is_none() && !want.opted_out)),
                status: row.map_or_else(|| "none".to_owned(), |r| r.status.clone()),
                uncertain,
                last_error: row.and_then(|r| r.last_error.clone()),
                result: row.and_then(|r| r.result.clone()),
            }
        })
        .collect();
    Ok(PhoneStatus {
        phone: phone.as_str().to_owned(),
        opted_out: scopes.iter().any(|s| s.opted_out),
        scopes,
        states,
        sinks,
        events,
    })
}

/// A sink's health as operators see it (`GET /v1/sinks`, `optout-relay status`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SinkStatus {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// `ok`, `backing_off` or `misconfigured` (`unknown` before its first start).
    pub health: String,
    /// When the current run of failures began.
    pub failing_since: Option<DateTime<Utc>>,
    pub next_probe_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// Phones waiting for this sink.
    pub waiting: i64,
    /// How long the oldest of them has waited, in seconds.
    pub oldest_waiting_seconds: Option<i64>,
    /// Phones given up on after relay.max_age (replay with `replay --dead`).
    pub dead: i64,
    pub last_resync_at: Option<DateTime<Utc>>,
}

pub async fn sinks_status(store: &Store, sinks: &[Arc<Sink>]) -> Result<Vec<SinkStatus>, StoreError> {
    let rows = store.sinks().await?;
    let stats = store.queue_stats().await?;
    let now = Utc::now();
    Ok(sinks
        .iter()
        .map(|sink| {
            let row = rows.iter().find(|r| r.name == sink.name);
            let q = stats.iter().find(|s| s.sink == sink.name);
            SinkStatus {
                name: sink.name.clone(),
                kind: sink.type_name().to_owned(),
                health: row.map_or_else(|| "unknown".to_owned(), |r| r.health.clone()),
                failing_since: row.and_then(|r| r.failing_since),
                next_probe_at: row.and_then(|r| r.next_probe_at),
                last_error: row.and_then(|r| r.last_error.clone()),
                waiting: q.map_or(0, |q| q.pending),
                oldest_waiting_seconds: q.and_then(|q| q.oldest_pending).map(|t| (now - t).num_seconds().max(0)),
                dead: q.map_or(0, |q| q.dead),
                last_resync_at: row.and_then(|r| r.resynced_at),
            }
        })
        .collect())
}

/// A revocation (or a renewed consent) received another way: by phone,
/// email, letter. It becomes an event like a webhook's and is relayed the same way.
pub fn staff_event(
    phone: Phone,
    kind: EventKind,
    scope: Option<String>,
    note: Option<String>,
    source: &str,
) -> NewEvent {
    let sid = format!("ST{:032x}", rand::random::<u128>());
    let source = format!("staff:{}", source.trim());
    NewEvent {
        message_sid: MessageSid::parse(&sid).unwrap_or_else(|| unreachable!("ST + hex is a valid sid")),
        account_sid: None,
        messaging_service_sid: None,
        scope: scope.filter(|s| !s.trim().is_empty()).unwrap_or_else(|| ORGANISATION_SCOPE.to_owned()),
        from_raw: phone.as_str().to_owned(),
        phone,
        to: None,
        kind,
        body: note.unwrap_or_default(),
        params: json!({ "source": source }),
        received_at: Utc::now(),
        source,
    }
}

/// Records a staff event directly (command line: no server needed).
pub async fn record(store: &Store, event: NewEvent) -> Result<i64, StoreError> {
    match store.record_events(std::slice::from_ref(&event)).await?.first() {
        Some(RecordOutcome::Recorded(id)) => Ok(*id),
        _ => Err(StoreError::Query("event was not recorded".into())),
    }
}

/// The path of the inbound-message webhook, below `server.public_url`.
pub const WEBHOOK_PATH: &str = "/twilio/messages";

/// Twilio's magic test number: what `send-test` says was texted when no
/// `--to` is given (the scope of the event, unless a Messaging Service is named).
pub const TEST_TO: &str = "+15005550006";

/// The keyword `send-test` sends, as Advanced Opt-Out reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "UPPER")]
pub enum TestKeyword {
    Stop,
    Start,
    Help,
}

impl TestKeyword {
    pub fn as_str(self) -> &'static str {
        match self {
            TestKeyword::Stop => "STOP",
            TestKeyword::Start => "START",
            TestKeyword::Help => "HELP",
        }
    }
}

/// The URL Twilio would call: `--url` when given, else `server.public_url` +
/// [`WEBHOOK_PATH`], else the listen address (a service without `public_url`
/// checks signatures against the Host it is called on). A `#fragment` of
/// connection overrides is Twilio's, never sent: it is dropped.
pub fn webhook_url(config: &crate::config::Config, url: Option<&str>) -> String {
    let full = match (url, config.server.public_url.as_deref()) {
        (Some(url), _) => url.to_owned(),
        (None, Some(base)) => {
            let base = base.split('#').next().unwrap_or(base);
            format!("{}{WEBHOOK_PATH}", base.trim_end_matches('/'))
        }
        (None, None) => {
            let mut addr = config.server.listen;
            // A wildcard listen address is reached through loopback.
            if addr.ip().is_unspecified() {
                addr.set_ip(if addr.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            format!("http://{addr}{WEBHOOK_PATH}")
        }
    };
    match full.split_once('#') {
        Some((url, _)) => url.to_owned(),
        None => full,
    }
}

/// The form of an inbound message the way Twilio's Messaging Service posts
/// it with Advanced Opt-Out on (`OptOutType` set), a fresh `MessageSid` each
/// time, so a repeat is a new event rather than a duplicate.
pub fn test_webhook(
    keyword: TestKeyword,
    from: &Phone,
    to: &str,
    messaging_service_sid: Option<&str>,
) -> Vec<(String, String)> {
    let sid = format!("SM{:032x}", rand::random::<u128>());
    let mut form = vec![
        ("ToCountry", "US".to_owned()),
        ("SmsMessageSid", sid.clone()),
        ("NumMedia", "0".to_owned()),
        ("SmsSid", sid.clone()),
        ("SmsStatus", "received".to_owned()),
        ("Body", keyword.as_str().to_owned()),
        ("To", to.to_owned()),
        ("OptOutType", keyword.as_str().to_owned()),
        ("NumSegments", "1".to_owned()),
        ("MessageSid", sid),
        ("AccountSid", format!("AC{}", "0".repeat(32))),
        ("From", from.as_str().to_owned()),
        ("ApiVersion", "2010-04-01".to_owned()),
    ];
    if let Some(service) = messaging_service_sid {
        form.push(("MessagingServiceSid", service.to_owned()));
    }
    form.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::twilio::webhook::{decode_form, parse_inbound};

    #[test]
    fn the_test_webhook_reads_as_the_keyword_it_names_with_a_fresh_sid() {
        let phone = Phone::parse("+14155550101", phonenumber::country::Id::US).unwrap();
        let keywords = crate::twilio::keywords::Keywords::new(&crate::config::KeywordsConfig::default());
        for (word, kind) in [
            (TestKeyword::Stop, EventKind::OptOut),
            (TestKeyword::Start, EventKind::OptIn),
            (TestKeyword::Help, EventKind::Help),
        ] {
            let form = test_webhook(word, &phone, TEST_TO, Some("MG1"));
            let encoded = form_urlencoded::Serializer::new(String::new()).extend_pairs(&form).finish();
            let inbound = parse_inbound(&decode_form(encoded.as_bytes()), phonenumber::country::Id::US).unwrap();
            assert_eq!(inbound.from, phone);
            assert_eq!(inbound.scope(), "MG1");
            assert_eq!(keywords.classify(inbound.opt_out_type.as_deref(), &inbound.body), Some(kind));
        }
        let a = test_webhook(TestKeyword::Stop, &phone, TEST_TO, None);
        let b = test_webhook(TestKeyword::Stop, &phone, TEST_TO, None);
        let sid = |f: &[(String, String)]| f.iter().find(|(k, _)| k == "MessageSid").unwrap().1.clone();
        assert_ne!(sid(&a), sid(&b));
        assert!(a.iter().all(|(k, _)| k != "MessagingServiceSid"));
    }

    #[test]
    fn the_webhook_url_is_the_override_else_public_url_else_the_listen_address() {
        let mut c = Config::default();
        assert_eq!(webhook_url(&c, None), "http://127.0.0.1:8080/twilio/messages");
        c.server.listen = "0.0.0.0:9000".parse().unwrap();
        assert_eq!(webhook_url(&c, None), "http://127.0.0.1:9000/twilio/messages");
        c.server.public_url = Some("https://optout.example.org/relay/#rc=3".to_owned());
        assert_eq!(webhook_url(&c, None), "https://optout.example.org/relay/twilio/messages");
        assert_eq!(
            webhook_url(&c, Some("http://10.0.0.5:8080/twilio/messages")),
            "http://10.0.0.5:8080/twilio/messages"
        );
    }
}
