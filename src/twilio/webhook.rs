//! The inbound-message webhook's form, read into a typed [`Inbound`].

use phonenumber::country;
use serde_json::{Map, Value};

use crate::domain::{storable, MessageSid, Phone};

/// A signed inbound message, valid by construction.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub message_sid: MessageSid,
    pub account_sid: Option<String>,
    pub messaging_service_sid: Option<String>,
    pub from_raw: String,
    pub from: Phone,
    pub to: Option<String>,
    pub body: String,
    pub opt_out_type: Option<String>,
    /// Every field Twilio sent, for the audit trail (repeated names as arrays).
    pub params: Value,
}

impl Inbound {
    /// Where the opt-out applies: the Messaging Service (all its senders), or
    /// the number texted when the message did not come through a service.
    pub fn scope(&self) -> &str {
        self.messaging_service_sid.as_deref().or(self.to.as_deref()).unwrap_or("default")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("missing or invalid {0}")]
    MissingField(&'static str),
    #[error("From is not a phone number")]
    NotAPhone,
}

/// Decodes `application/x-www-form-urlencoded` into pairs, in order, repeats kept.
pub fn decode_form(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body).into_owned().collect()
}

pub fn parse_inbound(pairs: &[(String, String)], region: country::Id) -> Result<Inbound, WebhookError> {
    // Past the signature, every name and value is text the store must hold.
    let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| (storable(k.clone()), storable(v.clone()))).collect();
    let pairs = pairs.as_slice();
    let get = |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let non_empty = |name: &str| get(name).map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned);

    let message_sid = get("MessageSid")
        .or_else(|| get("SmsMessageSid"))
        .and_then(|s| MessageSid::parse(s.trim()))
        .ok_or(WebhookError::MissingField("MessageSid"))?;
    let from_raw = non_empty("From").ok_or(WebhookError::MissingField("From"))?;
    let from = Phone::parse(&from_raw, region).map_err(|_| WebhookError::NotAPhone)?;

    let mut params = Map::new();
    for (k, v) in pairs {
        match params.get_mut(k) {
            None => {
                params.insert(k.clone(), Value::String(v.clone()));
            }
            Some(Value::Array(list)) => list.push(Value::String(v.clone())),
            Some(existing) => {
                let first = existing.take();
                *existing = Value::Array(vec![first, Value::String(v.clone())]);
            }
        }
    }

    Ok(Inbound {
        message_sid,
        account_sid: non_empty("AccountSid"),
        messaging_service_sid: non_empty("MessagingServiceSid"),
        from_raw,
        from,
        to: non_empty("To"),
        body: get("Body").unwrap_or_default().to_owned(),
        opt_out_type: non_empty("OptOutType"),
        params: Value::Object(params),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_stop_webhook() {
        let pairs = decode_form(b"MessageSid=SM1&From=%2B14155550101&To=%2B15005550006&Body=STOP&OptOutType=STOP&MessagingServiceSid=MG1&X=a&X=b");
        let m = parse_inbound(&pairs, country::Id::US).unwrap();
        assert_eq!(m.message_sid.as_str(), "SM1");
        assert_eq!(m.from.as_str(), "+14155550101");
        assert_eq!(m.scope(), "MG1");
        assert_eq!(m.opt_out_type.as_deref(), Some("STOP"));
        assert_eq!(m.params["X"], serde_json::json!(["a", "b"]));
    }

    #[test]
    fn a_nul_anywhere_is_replaced_before_it_reaches_the_store() {
        let pairs = decode_form(b"MessageSid=SM1&From=%2B14155550101&Body=STOP%00&X%00Y=a%00b&OptOutType=STOP");
        let m = parse_inbound(&pairs, country::Id::US).unwrap();
        assert_eq!(m.body, "STOP\u{FFFD}");
        assert_eq!(m.params["X\u{FFFD}Y"], "a\u{FFFD}b");
        assert!(!m.params.to_string().contains("\\u0000"));
    }

    #[test]
    fn refuses_missing_fields_and_non_phones() {
        let p = decode_form(b"From=%2B14155550101");
        assert_eq!(parse_inbound(&p, country::Id::US).unwrap_err(), WebhookError::MissingField("MessageSid"));
        let p = decode_form(b"MessageSid=SM1");
        assert_eq!(parse_inbound(&p, country::Id::US).unwrap_err(), WebhookError::MissingField("From"));
        let p = decode_form(b"MessageSid=SM1&From=client%3Aalice");
        assert_eq!(parse_inbound(&p, country::Id::US).unwrap_err(), WebhookError::NotAPhone);
        let p = decode_form(b"MessageSid=SM1&From=%2B14155550101");
        assert_eq!(parse_inbound(&p, country::Id::US).unwrap().scope(), "default");
    }
}
