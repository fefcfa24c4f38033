//! Twilio Event Streams: the CloudEvents a webhook sink receives, read into
//! typed items.
//!
//! A delivery is a JSON array of CloudEvents 1.0 (a single object is read as
//! a batch of one). Only `com.twilio.messaging.inbound-message.received`
//! matters here; every other type (Twilio's test deliveries included) is
//! kept as [`Item::Other`] so the caller can answer 2xx for it.
//!
//! The body is checked whole first: not JSON, or not objects with a `type`,
//! is refused as a whole ([`EventsError`]) — such a body did not come from
//! Twilio's sink. An inbound message that lacks what we need (its
//! `messageSid`, its `from`) is one [`Item::Invalid`], so its neighbours in
//! the batch can still be recorded.

use chrono::{DateTime, Utc};
use phonenumber::country;
use serde_json::{Map, Value};

use crate::domain::{storable, MessageSid, NotAPhone, Phone};

/// The one event type that carries an inbound message.
pub const INBOUND_MESSAGE_RECEIVED: &str = "com.twilio.messaging.inbound-message.received";

/// The whole delivery cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventsError {
    #[error("body is not JSON: {0}")]
    NotJson(String),
    #[error("body is neither a CloudEvent nor an array of them")]
    NotCloudEvents,
    #[error("event {0} is not a CloudEvent (an object with a string `type`)")]
    NotAnEvent(usize),
}

/// One inbound message from the stream, as much as we need of it.
#[derive(Debug, Clone)]
pub struct MessageEvent {
    pub message_sid: MessageSid,
    pub account_sid: Option<String>,
    pub messaging_service_sid: Option<String>,
    pub from_raw: String,
    pub to: Option<String>,
    pub body: String,
    pub opt_out_type: Option<String>,
    /// `data.timestamp`, when it parses (RFC 3339).
    pub timestamp: Option<DateTime<Utc>>,
    /// The whole CloudEvent, for the audit trail (text made storable).
    pub event: Value,
}

impl MessageEvent {
    /// Where the opt-out applies, as for the webhook: the Messaging Service,
    /// else the number texted.
    pub fn scope(&self) -> &str {
        self.messaging_service_sid.as_deref().or(self.to.as_deref()).unwrap_or("default")
    }

    pub fn phone(&self, region: country::Id) -> Result<Phone, NotAPhone> {
        Phone::parse(&self.from_raw, region)
    }

    /// When the person said it: the event's timestamp, or `now` when it is
    /// absent, unreadable or in the future (a skewed clock must not let one
    /// message outrank every later one for good).
    pub fn said_at(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        self.timestamp.filter(|t| *t <= now).unwrap_or(now)
    }
}

/// One CloudEvent of a delivery.
#[derive(Debug, Clone)]
pub enum Item {
    Message(Box<MessageEvent>),
    /// Any other type: answered, not recorded.
    Other(String),
    /// An inbound message we cannot record, and why (no phone number in it).
    Invalid(String),
}

/// Reads a delivery's raw body.
pub fn parse_batch(body: &[u8]) -> Result<Vec<Item>, EventsError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| EventsError::NotJson(e.to_string()))?;
    let events = match value {
        Value::Array(list) => list,
        one @ Value::Object(_) => vec![one],
        _ => return Err(EventsError::NotCloudEvents),
    };
    events
        .into_iter()
        .enumerate()
        .map(|(i, event)| {
            let event = make_storable(event);
            let kind = event.get("type").and_then(Value::as_str).ok_or(EventsError::NotAnEvent(i))?.to_owned();
            if kind != INBOUND_MESSAGE_RECEIVED {
                return Ok(Item::Other(kind));
            }
            Ok(match read_message(event) {
                Ok(m) => Item::Message(Box::new(m)),
                Err(missing) => Item::Invalid(format!("event {i}: missing or invalid {missing}")),
            })
        })
        .collect()
}

fn read_message(event: Value) -> Result<MessageEvent, &'static str> {
    let data = event.get("data").and_then(Value::as_object).ok_or("data")?;
    let text = |name: &str| data.get(name).and_then(Value::as_str).map(str::trim).filter(|v| !v.is_empty());
    let owned = |name: &str| text(name).map(str::to_owned);
    let message_sid = text("messageSid").and_then(MessageSid::parse).ok_or("data.messageSid")?;
    let from_raw = owned("from").ok_or("data.from")?;
    let timestamp = text("timestamp").and_then(|t| DateTime::parse_from_rfc3339(t).ok()).map(|t| t.with_timezone(&Utc));
    let message = MessageEvent {
        message_sid,
        account_sid: owned("accountSid"),
        messaging_service_sid: owned("messagingServiceSid"),
        from_raw,
        to: owned("to"),
        // The body as sent (not trimmed): the keywords normalise it themselves.
        body: data.get("body").and_then(Value::as_str).unwrap_or_default().to_owned(),
        opt_out_type: owned("optOutType"),
        timestamp,
        event: Value::Null,
    };
    Ok(MessageEvent { event, ..message })
}

/// Every string (keys too) with NUL replaced, as `storable` does for the
/// form: PostgreSQL's `jsonb` cannot hold `\u0000`.
fn make_storable(value: Value) -> Value {
    match value {
        Value::String(s) => Value::String(storable(s)),
        Value::Array(list) => Value::Array(list.into_iter().map(make_storable).collect()),
        Value::Object(map) => {
            Value::Object(map.into_iter().map(|(k, v)| (storable(k), make_storable(v))).collect::<Map<_, _>>())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn inbound(data: Value) -> Value {
        json!({
            "specversion": "1.0",
            "type": INBOUND_MESSAGE_RECEIVED,
            "source": "/2010-04-01/Accounts/AC0/Messages/SM1.json",
            "id": "EZ1",
            "dataschema": "https://events-schemas.twilio.com/Messaging.InboundMessageV1/5",
            "datacontenttype": "application/json",
            "time": "2026-11-23T17:45:04.000Z",
            "data": data,
        })
    }

    fn only(items: Vec<Item>) -> MessageEvent {
        match items.as_slice() {
            [Item::Message(m)] => (**m).clone(),
            other => panic!("expected one message, got {other:?}"),
        }
    }

    #[test]
    fn reads_an_array_and_a_single_object() {
        let data = json!({
            "messageSid": "SM00000000000000000000000000000001", "timestamp": "2026-11-23T17:45:04.123Z",
            "accountSid": "AC1", "from": "+14155550101", "to": "+15005550006", "body": "STOP",
            "messagingServiceSid": "MG1", "optOutType": "STOP", "numMedia": 0
        });
        let array = serde_json::to_vec(&json!([inbound(data.clone())])).unwrap();
        let m = only(parse_batch(&array).unwrap());
        assert_eq!(m.message_sid.as_str(), "SM00000000000000000000000000000001");
        assert_eq!((m.scope(), m.body.as_str(), m.opt_out_type.as_deref()), ("MG1", "STOP", Some("STOP")));
        assert_eq!(m.phone(country::Id::US).unwrap().as_str(), "+14155550101");
        assert_eq!(m.timestamp.unwrap().to_rfc3339(), "2026-11-23T17:45:04.123+00:00");
        assert_eq!(m.event["data"]["numMedia"], 0, "the whole event is kept");
        let object = serde_json::to_vec(&inbound(data)).unwrap();
        assert_eq!(only(parse_batch(&object).unwrap()).message_sid.as_str(), "SM00000000000000000000000000000001");
    }

    #[test]
    fn said_at_is_the_timestamp_unless_absent_unreadable_or_ahead() {
        let now = Utc::now();
        let at = |ts: Value| {
            let body =
                serde_json::to_vec(&inbound(json!({"messageSid": "SM1", "from": "+14155550101", "timestamp": ts})))
                    .unwrap();
            only(parse_batch(&body).unwrap()).said_at(now)
        };
        assert_eq!(at(json!("2026-01-02T03:04:05Z")).to_rfc3339(), "2026-01-02T03:04:05+00:00");
        assert_eq!(at(json!("2026-01-02T03:04:05-05:00")).to_rfc3339(), "2026-01-02T08:04:05+00:00");
        assert_eq!(at(json!("yesterday")), now);
        assert_eq!(at(json!(12)), now);
        assert_eq!(at(Value::Null), now);
        assert_eq!(at(json!("2999-01-01T00:00:00Z")), now);
    }

    #[test]
    fn other_types_are_kept_apart_and_bad_messages_are_items() {
        let body = serde_json::to_vec(&json!([
            {"type": "com.twilio.eventstreams.test-event", "data": {"test": "x"}},
            inbound(json!({"from": "+14155550101"})),
            inbound(json!({"messageSid": "SM' OR 1=1", "from": "+14155550101"})),
            inbound(json!({"messageSid": "SM2"})),
            {"type": INBOUND_MESSAGE_RECEIVED},
        ]))
        .unwrap();
        let items = parse_batch(&body).unwrap();
        assert!(matches!(&items[0], Item::Other(t) if t == "com.twilio.eventstreams.test-event"));
        let invalid: Vec<&str> =
            items[1..].iter().map(|i| if let Item::Invalid(why) = i { why.as_str() } else { "" }).collect();
        assert_eq!(
            invalid,
            [
                "event 1: missing or invalid data.messageSid",
                "event 2: missing or invalid data.messageSid",
                "event 3: missing or invalid data.from",
                "event 4: missing or invalid data",
            ]
        );
    }

    #[test]
    fn refuses_what_is_not_a_batch_of_cloud_events() {
        assert!(matches!(parse_batch(b"{not json"), Err(EventsError::NotJson(_))));
        assert!(matches!(parse_batch(b""), Err(EventsError::NotJson(_))));
        assert_eq!(parse_batch(b"\"STOP\"").unwrap_err(), EventsError::NotCloudEvents);
        assert_eq!(parse_batch(b"12").unwrap_err(), EventsError::NotCloudEvents);
        assert_eq!(parse_batch(br#"[{"type": "x"}, 3]"#).unwrap_err(), EventsError::NotAnEvent(1));
        assert_eq!(parse_batch(br#"[{"type": 5}]"#).unwrap_err(), EventsError::NotAnEvent(0));
        assert!(parse_batch(b"[]").unwrap().is_empty());
    }

    #[test]
    fn a_nul_anywhere_is_replaced() {
        let body = br#"{"type":"com.twilio.messaging.inbound-message.received",
            "data":{"messageSid":"SM1","from":"+14155550101","body":"STOP\u0000","x\u0000":["a\u0000"]}}"#;
        let m = only(parse_batch(body).unwrap());
        assert_eq!(m.body, "STOP\u{FFFD}");
        assert!(!m.event.to_string().contains("\\u0000"), "{}", m.event);
    }
}
