//! The properties of the parsers that take outside input, and the generators
//! of their inputs, shared by `tests/properties.rs` (proptest runs them and
//! shrinks a failure to a minimal case) and `examples/properties.rs` (the
//! bench pushes a million generated inputs through them). Each check
//! panics when a property fails: in the tests that is a failing case, in the
//! bench an abort.

#![allow(dead_code)] // each includer uses part of it

use std::collections::BTreeMap;

use optout_relay::config::KeywordsConfig;
use optout_relay::domain::{EventKind, Phone};
use optout_relay::sinks::redcap::answers;
use optout_relay::sinks::SinkError;
use optout_relay::twilio::keywords::Keywords;
use optout_relay::twilio::signature::{compute, SignatureError, SignedBody, Verifier};
use optout_relay::twilio::webhook::decode_form;
use phonenumber::country;
use proptest::prelude::*;
use secrecy::SecretString;
use serde_json::{json, Value};

// ---- generators -----------------------------------------------------------

/// Text as a hostile client sends it: any Unicode, controls and NUL included.
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[ -~]{0,40}", "[\\x00-\\x1f%+&=#?]{0,12}"]
}

/// Form pairs as Twilio sends them, and as nobody should.
pub fn pairs() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec((prop_oneof!["[A-Za-z]{1,16}", text()], text()), 0..12)
}

/// The URL Twilio calls: scheme, host, maybe a port, a path, a query.
pub fn url() -> impl Strategy<Value = String> {
    "https?://[a-z]{1,10}(\\.[a-z]{2,6}){0,2}(:[0-9]{1,5})?(/[A-Za-z0-9_.~%-]{0,10}){0,3}(\\?[a-z]{1,5}=[A-Za-z0-9%]{0,8}(&[a-z]{1,5}=[a-z0-9]{0,5}){0,2})?"
}

/// Anything typed into a phone field or sent as `From`, with a bias toward
/// things that look like numbers.
pub fn phone_text() -> impl Strategy<Value = String> {
    prop_oneof![
        text(),
        "(whatsapp:|tel:|sms:)?\\+?[0-9 ().-]{0,20}",
        "\\+[1-9][0-9]{6,14}",
        "\\(?[2-9][0-9]{2}\\)?[ .-]?[2-9][0-9]{2}[ .-]?[0-9]{4}( ?(x|ext\\.?) ?[0-9]{1,5})?",
    ]
}

pub fn region() -> impl Strategy<Value = country::Id> {
    prop::sample::select(vec![country::Id::US, country::Id::GB, country::Id::DE, country::Id::IN, country::Id::BR])
}

/// A keyword of the default lists dressed as people type it: any case,
/// spaces around and inside, trailing punctuation.
pub fn dressed_keyword() -> impl Strategy<Value = (String, EventKind)> {
    let words: Vec<(String, EventKind)> = {
        let k = KeywordsConfig::default();
        let tag = |list: &[String], kind: EventKind| list.iter().map(move |w| (w.clone(), kind)).collect::<Vec<_>>();
        [tag(&k.opt_out, EventKind::OptOut), tag(&k.opt_in, EventKind::OptIn), tag(&k.help, EventKind::Help)].concat()
    };
    (prop::sample::select(words), any::<u64>(), "[ \\t\\n]{0,3}", "[ \\t]{0,3}", "[.!?,;: ]{0,4}").prop_map(
        |((word, kind), case_bits, before, inner, after)| {
            let cased: String = word
                .chars()
                .enumerate()
                .map(|(i, c)| if case_bits >> (i % 64) & 1 == 1 { c.to_ascii_lowercase() } else { c })
                .collect();
            let spaced = cased.replace(' ', &format!(" {inner}"));
            (format!("{before}{spaced}{after}"), kind)
        },
    )
}

/// Any JSON a server could answer, a few levels deep.
pub fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        text().prop_map(Value::from),
        Just(Value::from("record_id")),
        Just(Value::from("phone")),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("field_name".to_owned()),
                    Just("record_id".to_owned()),
                    Just("phone".to_owned()),
                    Just("count".to_owned()),
                    Just("error".to_owned()),
                    text()
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A well-formed record export: (record id, phone, opt-out value) rows.
pub fn export() -> impl Strategy<Value = Vec<(String, String, String)>> {
    prop::collection::vec(("[A-Za-z0-9-]{1,8}", text(), text()), 0..8)
}

// ---- checks ---------------------------------------------------------------

/// Any bytes decode (invalid UTF-8 and bad escapes included), and pairs
/// encoded as a browser or Twilio encodes them decode to themselves.
pub fn form(bytes: &[u8], pairs: &[(String, String)]) {
    let _ = decode_form(bytes);
    let encoded = form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish();
    assert_eq!(decode_form(encoded.as_bytes()), pairs, "round trip of {encoded:?}");
}

/// A signature computed as Twilio computes it verifies, whatever the order
/// of the fields; another token's does not; garbage never panics and never passes.
pub fn signature(token: &str, url: &str, pairs: &[(String, String)], garbage: &str, settings: Option<&str>) {
    let verifier = Verifier::new(vec![SecretString::from(token.to_owned())], BTreeMap::new());
    let urls = [url.to_owned()];
    let sig = compute(token, url, pairs);
    assert_eq!(verifier.verify(&urls, Some(&sig), None, SignedBody::Form(pairs)), Ok(()), "{url} {pairs:?}");
    let mut reversed = pairs.to_vec();
    reversed.reverse();
    assert_eq!(verifier.verify(&urls, Some(&sig), None, SignedBody::Form(&reversed)), Ok(()), "field order");
    let other = compute(&format!("{token}x"), url, pairs);
    assert_eq!(
        verifier.verify(&urls, Some(&other), None, SignedBody::Form(pairs)),
        Err(SignatureError::Mismatch),
        "another token's signature passed"
    );
    let refused = verifier.verify(&urls, Some(garbage), settings, SignedBody::Form(pairs));
    assert!(refused.is_err() || garbage == sig, "garbage {garbage:?} passed");
    let _ = verifier.verify(&urls, Some(garbage), settings, SignedBody::Raw(garbage.as_bytes()));
}

/// Parsing never panics; what it gives is E.164; a number valid for its
/// region is one the webhook accepts too; the mask hides the middle. That
/// what it gives reads back as itself does not hold yet: see
/// `e164_reads_back_as_itself` in tests/properties.rs.
pub fn phone(raw: &str, region: country::Id) {
    let e164 = |p: &Phone| {
        let s = p.as_str();
        assert!(s.starts_with('+') && s.len() > 1 && s[1..].bytes().all(|b| b.is_ascii_digit()), "{raw:?} -> {s}");
    };
    let parsed = Phone::parse(raw, region);
    if let Ok(p) = &parsed {
        e164(p);
        // The same person is one number: what we store reads back as itself.
        assert_eq!(Phone::parse(p.as_str(), region).as_ref(), Ok(p), "{raw:?} -> {p} does not read back");
        let (s, masked) = (p.as_str(), p.masked());
        assert!(s.len() < 8 || !masked.contains(&s[1..]), "{s} unmasked: {masked}");
    }
    if let Some(p) = Phone::parse_valid(raw, region) {
        e164(&p);
        assert_eq!(Phone::parse_valid(p.as_str(), region).as_ref(), Some(&p), "{raw:?} -> {p} does not read back");
        // Extensions are read by parse_valid only (a phone field may hold one; Twilio's From never does).
        if !raw.chars().any(char::is_alphabetic) {
            assert!(parsed.is_ok(), "{raw:?} is valid ({p}) yet refused as a From");
        }
    }
}

/// Any text classifies without panic; a keyword however dressed is its kind;
/// a keyword inside a sentence is nothing.
pub fn keywords(k: &Keywords, body: &str, opt_out_type: Option<&str>, dressed: &str, kind: EventKind) {
    let _ = k.classify(opt_out_type, body);
    assert_eq!(k.classify(None, dressed), Some(kind), "{dressed:?}");
    assert_eq!(k.classify(None, &format!("please {dressed} now")), None, "{dressed:?} in a sentence");
}

/// Whatever a server answers is classified without panic; a JSON body with
/// a 2xx is that JSON unless it carries an `error`; the parsers of metadata,
/// exports and import counts take any JSON; a well-formed export reads
/// back as written; an import count covers what was sent exactly when it is
/// at least that.
pub fn redcap(status: u16, body: &str, value: &Value, rows: &[(String, String, String)], count: u64, sent: usize) {
    for writes in [false, true] {
        let answer = answers::classify(status, body, writes);
        if (200..300).contains(&status) {
            if let Ok(v) = serde_json::from_str::<Value>(body) {
                if v.get("error").is_none() {
                    assert_eq!(answer.as_ref().ok(), Some(&v), "{status} {body:?}");
                }
            }
        }
        let text = value.to_string();
        let as_json = answers::classify(status, &text, writes);
        if (200..300).contains(&status) && value.get("error").is_none() {
            // Compared with the text read back: a float's last digit may differ from the generated one.
            let read_back: Value = serde_json::from_str(&text).expect("serde_json reads what it wrote");
            assert_eq!(as_json.as_ref().ok(), Some(&read_back));
        }
    }
    let _ = answers::metadata_fields(value);
    let _ = answers::export_rows(value, "record_id", "phone", Some("opted_out_at"));
    let _ = answers::confirm_import(value, sent);
    let export: Value = rows
        .iter()
        .map(|(r, p, o)| json!({"record_id": r, "phone": p, "opted_out_at": o, "other": 1}))
        .collect::<Vec<_>>()
        .into();
    let read = answers::export_rows(&export, "record_id", "phone", Some("opted_out_at")).expect("a well-formed export");
    assert_eq!(read, rows);
    let confirmed = answers::confirm_import(&json!({ "count": count }), sent);
    assert_eq!(confirmed.is_ok(), count >= sent as u64, "count {count} of {sent}");
    if let Err(e) = confirmed {
        assert!(matches!(e, SinkError::Uncertain(_)), "a short count is uncertain, not {e:?}");
    }
    let _ = answers::same_moment(body, &value.to_string());
}
