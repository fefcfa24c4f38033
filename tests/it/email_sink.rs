//! The email sink against the in-process fake SMTP server, over a real
//! SQLite store: what the captured messages say, to whom, and how failures
//! are classified.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use crate::common::fake_smtp::{FakeSmtp, Fault, Received};
use optout_relay::config::{DatabaseConfig, EmailConfig, EmailTls};
use optout_relay::domain::{EventKind, MessageSid, Phone};
use optout_relay::sinks::email::EmailSink;
use optout_relay::sinks::{DeliveryItem, SinkError};
use optout_relay::store::{NewEvent, RecordOutcome, Settle, Store};
use secrecy::SecretString;
use serde_json::{json, Value};

use crate::common::{settle_one, SERVICE};

const PHONE: &str = "+14155550101";
const LEASE: Duration = Duration::from_secs(60);

struct Env {
    _dir: tempfile::TempDir,
    store: Store,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = DatabaseConfig {
        url: SecretString::from(format!("sqlite://{}/t.db?mode=rwc", dir.path().display())),
        ..DatabaseConfig::default()
    };
    let store = Store::connect_lazy(&cfg).expect("store");
    store.migrate().await.expect("migrate");
    Env { _dir: dir, store }
}

fn config(port: u16, edit: impl FnOnce(&mut EmailConfig)) -> EmailConfig {
    let mut c = EmailConfig {
        smtp_host: "127.0.0.1".into(),
        smtp_port: Some(port),
        tls: EmailTls::None,
        username: None,
        password: None,
        from: "Opt-out relay <relay@example.org>".into(),
        to: vec!["ops@example.org".into(), "Study Team <irb@example.edu>".into()],
        timezone: "America/New_York".into(),
        timeout: Duration::from_secs(5),
        ca_file: None,
    };
    edit(&mut c);
    c
}

/// 2026-11-23 14:15:07 UTC = 09:15:07 in New York (EST, UTC-5).
fn november() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 14, 15, 7).unwrap()
}

/// Records one event with a delivery to each of `sinks`; returns its id.
async fn record(
    store: &Store,
    n: u32,
    phone: &str,
    kind: EventKind,
    body: &str,
    at: DateTime<Utc>,
    sinks: &[&str],
) -> i64 {
    let event = NewEvent {
        message_sid: MessageSid::parse(&format!("SM{n:032}")).unwrap(),
        account_sid: Some("AC00000000000000000000000000000001".into()),
        messaging_service_sid: Some(SERVICE.into()),
        scope: SERVICE.into(),
        phone: Phone::from_stored(phone.into()),
        from_raw: phone.into(),
        to: Some("+14155559999".into()),
        kind,
        body: body.into(),
        params: json!({ "Body": body }),
        received_at: at,
        source: "twilio".into(),
    };
    match store.record_events(&[event], sinks).await.unwrap()[..] {
        [RecordOutcome::Recorded(id)] => id,
        ref other => panic!("not recorded: {other:?}"),
    }
}

/// Claims every due REDCap delivery and ends each attempt with `how`.
async fn settle_redcap(store: &Store, how: Settle) -> usize {
    let claimed = store.claim("redcap", "w", 10, LEASE, false).await.unwrap();
    for d in &claimed {
        assert!(settle_one(store, d.id, "w", &how).await);
    }
    claimed.len()
}

/// Claims the email deliveries the way the relay does (waiting for the other sinks).
async fn claim_email(store: &Store) -> Vec<DeliveryItem> {
    store
        .claim("email", "w", 10, LEASE, true)
        .await
        .unwrap()
        .into_iter()
        .map(|d| DeliveryItem {
            id: d.id,
            event_id: d.event_id,
            phone: d.phone,
            kind: d.kind,
            received_at: d.received_at,
        })
        .collect()
}

fn sink(store: &Store, cfg: &EmailConfig) -> EmailSink {
    EmailSink::new(cfg, store.clone()).expect("email sink builds")
}

/// The one message captured, with the checks every notification passes.
fn only_message(fake: &FakeSmtp) -> Received {
    let messages = fake.messages();
    assert_eq!(messages.len(), 1, "{messages:#?}");
    let m = messages.into_iter().next().unwrap();
    assert_eq!(m.from, "relay@example.org");
    assert_eq!(m.to, vec!["ops@example.org".to_owned(), "irb@example.edu".to_owned()]);
    let to = m.header("To").unwrap();
    assert!(to.contains("ops@example.org") && to.contains("irb@example.edu"), "{to}");
    assert!(m.header("From").unwrap().contains("relay@example.org"));
    assert_eq!(m.header("Auto-Submitted").as_deref(), Some("auto-generated"));
    assert!(m.header("Content-Type").unwrap().starts_with("text/plain"));
    m
}

fn transient(r: &Result<Value, SinkError>) -> bool {
    matches!(r, Err(SinkError::Transient { .. }))
}

fn misconfigured(r: &Result<Value, SinkError>) -> bool {
    matches!(r, Err(SinkError::Misconfigured(_)))
}

#[tokio::test]
async fn opt_out_with_records_updated_sends_one_message_to_every_recipient() {
    let env = env().await;
    let fake = FakeSmtp::start().await;
    let event_id = record(&env.store, 1, PHONE, EventKind::OptOut, "Stop", november(), &["redcap", "email"]).await;
    settle_redcap(
        &env.store,
        Settle::Done(json!({"records": ["1", "7"], "matched": 2, "value": "2026-11-23 09:15:07"})),
    )
    .await;
    let items = claim_email(&env.store).await;
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].event_id, event_id);

    let out = sink(&env.store, &config(fake.port(), |_| {})).apply(&items).await;

    assert_eq!(out.len(), 1);
    let value = out[0].as_ref().expect("sent");
    assert_eq!(value["sent_to"], json!(["ops@example.org", "irb@example.edu"]));
    let m = only_message(&fake);
    assert_eq!(m.header("Message-ID").as_deref(), value["message_id"].as_str());
    assert!(value["smtp_reply"].as_str().unwrap().starts_with("250 "), "{value}");
    assert_eq!(m.header("Subject").as_deref(), Some("Opt-out: +1415***0101 texted STOP"));
    let body = m.body();
    assert!(body.starts_with("+14155550101 opted out of text messages (texted STOP).\n"), "{body}");
    assert!(body.contains("When:     2026-11-23 09:15:07 EST (2026-11-23 14:15:07 UTC)\n"), "{body}");
    assert!(body.contains("Phone:    +14155550101\n"), "{body}");
    assert!(body.contains(&format!("Scope:    Messaging Service {SERVICE}\n")), "{body}");
    assert!(body.contains("Message:  \"Stop\"\n"), "{body}");
    assert!(body.contains("  - REDCap records updated: 1, 7\n"), "{body}");
    assert!(body.contains(&format!("event #{event_id}, delivery #{}", items[0].id)), "{body}");
    // The full number is in the body only, never in the subject.
    assert!(!m.data.split("\r\n\r\n").next().unwrap().contains("5550101"), "headers leak the number");
}

#[tokio::test]
async fn opt_in_says_opted_back_in_in_summer_time() {
    let env = env().await;
    let fake = FakeSmtp::start().await;
    let july = Utc.with_ymd_and_hms(2026, 7, 4, 12, 0, 0).unwrap();
    record(&env.store, 1, PHONE, EventKind::OptIn, "START", july, &["redcap", "email"]).await;
    settle_redcap(&env.store, Settle::Done(json!({"records": ["7"], "matched": 1, "value": ""}))).await;

    let out = sink(&env.store, &config(fake.port(), |_| {})).apply(&claim_email(&env.store).await).await;

    assert!(out[0].is_ok(), "{out:?}");
    let m = only_message(&fake);
    assert_eq!(m.header("Subject").as_deref(), Some("Opt-in: +1415***0101 texted START"));
    let body = m.body();
    assert!(body.starts_with("+14155550101 opted back in to text messages (texted START).\n"), "{body}");
    assert!(body.contains("When:     2026-07-04 08:00:00 EDT (2026-07-04 12:00:00 UTC)\n"), "{body}");
    assert!(body.contains("Message:  \"START\"\n"), "{body}");
    assert!(body.contains("  - REDCap records updated: 7\n"), "{body}");
}

#[tokio::test]
async fn no_record_matched_is_reported_not_silent() {
    let env = env().await;
    let fake = FakeSmtp::start().await;
    record(&env.store, 1, PHONE, EventKind::OptOut, "Stop ça 🛑", november(), &["redcap", "email"]).await;
    settle_redcap(&env.store, Settle::Done(json!({"records": [], "matched": 0}))).await;

    let out = sink(&env.store, &config(fake.port(), |_| {})).apply(&claim_email(&env.store).await).await;

    assert!(out[0].is_ok(), "{out:?}");
    let body = only_message(&fake).body();
    assert!(body.contains("  - no REDCap record has this phone number\n"), "{body}");
    assert!(!body.contains("records updated"), "{body}");
    // Non-ASCII text arrives intact through the transfer encoding.
    assert!(body.contains("Message:  \"Stop ça 🛑\"\n"), "{body}");
}

#[tokio::test]
async fn dead_redcap_delivery_is_reported_as_failed_with_what_to_do() {
    let env = env().await;
    let fake = FakeSmtp::start().await;
    record(&env.store, 1, PHONE, EventKind::OptOut, "STOP", november(), &["redcap", "email"]).await;
    // Two failed attempts, then the relay gives up on the third.
    for _ in 0..2 {
        let error = "REDCap answered 403: You do not have API rights".to_owned();
        assert_eq!(
            settle_redcap(&env.store, Settle::Retry { at: Utc::now() - chrono::Duration::seconds(1), error }).await,
            1
        );
        assert!(claim_email(&env.store).await.is_empty(), "email claimed while REDCap is still pending");
    }
    let dead = "gave up after 3 attempts: REDCap answered 403: You do not have API rights".to_owned();
    settle_redcap(&env.store, Settle::Dead(dead)).await;

    let out = sink(&env.store, &config(fake.port(), |_| {})).apply(&claim_email(&env.store).await).await;

    assert!(out[0].is_ok(), "{out:?}");
    let m = only_message(&fake);
    assert_eq!(m.header("Subject").as_deref(), Some("Opt-out: +1415***0101 texted STOP - REDCap delivery FAILED"));
    let body = m.body();
    assert!(
        body.contains(
            "  - REDCap delivery FAILED after 3 attempts: gave up after 3 attempts: REDCap answered 403: You do not have API rights - an operator must replay it (optout-relay replay --dead)\n"
        ),
        "{body}"
    );
}

#[tokio::test]
async fn superseded_redcap_delivery_says_not_applied() {
    let env = env().await;
    let fake = FakeSmtp::start().await;
    record(&env.store, 1, PHONE, EventKind::OptOut, "STOP", november(), &["redcap", "email"]).await;
    settle_redcap(
        &env.store,
        Settle::Done(json!({"superseded": true, "note": "a newer change for this phone was already delivered"})),
    )
    .await;

    let out = sink(&env.store, &config(fake.port(), |_| {})).apply(&claim_email(&env.store).await).await;

    assert!(out[0].is_ok(), "{out:?}");
    let body = only_message(&fake).body();
    assert!(body.contains("  - REDCap: not applied: a newer change was already delivered\n"), "{body}");
}

#[tokio::test]
async fn without_other_sinks_the_change_was_recorded_only() {
    let env = env().await;
    let fake = FakeSmtp::start().await;
    record(&env.store, 1, PHONE, EventKind::OptOut, "STOP", november(), &["email"]).await;

    let out = sink(&env.store, &config(fake.port(), |c| c.timezone = "UTC".into()))
        .apply(&claim_email(&env.store).await)
        .await;

    assert!(out[0].is_ok(), "{out:?}");
    let body = only_message(&fake).body();
    assert!(body.contains("the change was recorded only; no other system (such as REDCap) is configured"), "{body}");
    assert!(body.contains("When:     2026-11-23 14:15:07 UTC\n"), "{body}");
}

#[tokio::test]
async fn email_waits_until_the_events_redcap_delivery_is_settled() {
    let env = env().await;
    record(&env.store, 1, PHONE, EventKind::OptOut, "STOP", november(), &["redcap", "email"]).await;

    assert!(claim_email(&env.store).await.is_empty(), "email claimable while REDCap is pending");
    // Claimed by a REDCap worker (leased) is still pending.
    let claimed = env.store.claim("redcap", "w", 10, LEASE, false).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert!(claim_email(&env.store).await.is_empty(), "email claimable while REDCap is in flight");

    assert!(settle_one(&env.store, claimed[0].id, "w", &Settle::Done(json!({"records": ["1"]}))).await);
    let items = claim_email(&env.store).await;
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].phone.as_str(), PHONE);
    assert_eq!(items[0].kind, EventKind::OptOut);
    assert_eq!(items[0].received_at, november());
}

#[tokio::test]
async fn logs_in_with_username_and_password() {
    let env = env().await;
    let fake = FakeSmtp::start_with_auth("relay-user", "pa55 w0rd").await;
    record(&env.store, 1, PHONE, EventKind::OptOut, "STOP", november(), &["email"]).await;
    record(&env.store, 2, "+14155550102", EventKind::OptOut, "STOP", november(), &["email"]).await;
    let cfg = config(fake.port(), |c| {
        c.username = Some("relay-user".into());
        c.password = Some(SecretString::from("pa55 w0rd"));
    });
    let email = sink(&env.store, &cfg);
    let items = claim_email(&env.store).await;

    // PLAIN when offered…
    let out = email.apply(&items[..1]).await;
    assert!(out[0].is_ok(), "{out:?}");
    // …and LOGIN on a new connection to a server that only offers LOGIN.
    fake.advertise_auth(&["LOGIN"]);
    fake.set_fault(Fault::Down).await;
    fake.set_fault(Fault::None).await;
    let out = email.apply(&items[1..]).await;
    assert!(out[0].is_ok(), "{out:?}");

    let messages = fake.messages();
    assert_eq!(messages.len(), 2);
    assert!(messages.iter().all(|m| m.auth_user.as_deref() == Some("relay-user")));
    let mechanisms: Vec<Option<&str>> = messages.iter().map(|m| m.auth_mechanism.as_deref()).collect();
    assert_eq!(mechanisms, vec![Some("PLAIN"), Some("LOGIN")]);
    assert_eq!(fake.auth_attempts(), 2);
}

#[tokio::test]
async fn wrong_password_is_misconfigured_fails_the_batch_with_one_login_and_never_shows_the_password() {
    let env = env().await;
    let fake = FakeSmtp::start_with_auth("relay-user", "right").await;
    record(&env.store, 1, PHONE, EventKind::OptOut, "STOP", november(), &["email"]).await;
    record(&env.store, 2, "+14155550102", EventKind::OptOut, "STOP", november(), &["email"]).await;
    let cfg = config(fake.port(), |c| {
        c.username = Some("relay-user".into());
        c.password = Some(SecretString::from("wrong-Secret"));
    });

    let out = sink(&env.store, &cfg).apply(&claim_email(&env.store).await).await;

    assert_eq!(out.len(), 2);
    assert!(out.iter().all(misconfigured), "{out:?}");
    let text = format!("{out:?}");
    assert!(text.contains("535"), "{text}");
    assert!(text.contains("email.password"), "{text}");
    assert!(!text.contains("wrong-Secret"), "{text}");
    // One refused login, not one per message (servers lock accounts out).
    assert_eq!(fake.auth_attempts(), 1);
    assert!(fake.messages().is_empty());
}

#[tokio::test]
async fn temporary_refusal_is_transient() {
    let env = env().await;
    let fake = FakeSmtp::start().await;
    fake.set_fault(Fault::RcptTransient).await;
    record(&env.store, 1, PHONE, EventKind::OptOut, "STOP", november(), &["email"]).await;

    let out = sink(&env.store, &config(fake.port(), |_| {})).apply(&claim_email(&env.store).await).await;

    assert!(transient(&out[0]), "{out:?}");
    assert!(format!("{out:?}").contains("451"), "{out:?}");
    assert!(fake.messages().is_empty());
}

#[tokio::test]
async fn permanent_refusal_is_misconfigured() {
    let env = env().await;
    let fake = FakeSmtp::start().await;
    fake.set_fault(Fault::RcptPermanent).await;
    record(&env.store, 1, PHONE, EventKind::OptOut, "STOP", november(), &["email"]).await;

    let out = sink(&env.store, &config(fake.port(), |_| {})).apply(&claim_email(&env.store).await).await;

    assert!(misconfigured(&out[0]), "{out:?}");
    assert!(format!("{out:?}").contains("550"), "{out:?}");
    assert!(fake.messages().is_empty());
}

#[tokio::test]
async fn server_down_is_transient_for_the_whole_batch_and_recovers() {
    let env = env().await;
    let fake = FakeSmtp::start().await;
    for n in 1..=3 {
        record(&env.store, n, &format!("+1415555010{n}"), EventKind::OptOut, "STOP", november(), &["email"]).await;
    }
    let items = claim_email(&env.store).await;
    assert_eq!(items.len(), 3);
    let email = sink(&env.store, &config(fake.port(), |_| {}));
    // A first message leaves a pooled connection, which the outage must not fool.
    assert!(email.apply(&items[..1]).await[0].is_ok());
    fake.set_fault(Fault::Down).await;

    let out = email.apply(&items[1..]).await;

    assert_eq!(out.len(), 2);
    assert!(out.iter().all(transient), "{out:?}");
    assert!(format!("{out:?}").contains("127.0.0.1:"), "{out:?}");
    assert_eq!(fake.messages().len(), 1);

    fake.set_fault(Fault::None).await;
    let out = email.apply(&items[1..]).await;
    assert!(out.iter().all(Result::is_ok), "{out:?}");
    assert_eq!(fake.messages().len(), 3);
}

#[tokio::test]
async fn one_refused_message_does_not_fail_the_others_in_the_batch() {
    let env = env().await;
    let fake = FakeSmtp::start().await;
    for n in 1..=3 {
        record(&env.store, n, &format!("+1415555010{n}"), EventKind::OptOut, "STOP", november(), &["redcap", "email"])
            .await;
    }
    assert_eq!(settle_redcap(&env.store, Settle::Done(json!({"records": ["1"]}))).await, 3);
    let items = claim_email(&env.store).await;
    assert_eq!(items.len(), 3);
    // The second transaction is refused for now; the first and third go through.
    fake.set_fault_for(Fault::RcptTransient, 1, Some(1)).await;

    let email = sink(&env.store, &config(fake.port(), |_| {}));
    let out = email.apply(&items).await;

    assert!(out[0].is_ok(), "{out:?}");
    assert!(transient(&out[1]), "{out:?}");
    assert!(out[2].is_ok(), "{out:?}");
    let subjects: Vec<String> = fake.messages().iter().map(|m| m.header("Subject").unwrap()).collect();
    assert_eq!(subjects, vec!["Opt-out: +1415***0101 texted STOP", "Opt-out: +1415***0103 texted STOP"]);
    let bodies: Vec<String> = fake.messages().iter().map(Received::body).collect();
    assert!(
        bodies[0].contains("Phone:    +14155550101\n") && bodies[1].contains("Phone:    +14155550103\n"),
        "{bodies:?}"
    );

    // A permanent refusal of one message is also that message's alone.
    fake.set_fault_for(Fault::RcptPermanent, 0, Some(1)).await;
    let out = email.apply(&items).await;
    assert!(misconfigured(&out[0]), "{out:?}");
    assert!(out[1].is_ok() && out[2].is_ok(), "{out:?}");
    assert_eq!(fake.messages().len(), 4);
}

#[tokio::test]
async fn bad_settings_are_refused_at_startup_naming_the_setting() {
    let env = env().await;
    let bad_to = config(25, |c| c.to = vec!["ops@example.org".into(), "not an address".into()]);
    let err = EmailSink::new(&bad_to, env.store.clone()).err().expect("refused");
    assert!(err.contains("email.to") && err.contains("not an address"), "{err}");

    let bad_from = config(25, |c| c.from = "relay at example".into());
    let err = EmailSink::new(&bad_from, env.store.clone()).err().expect("refused");
    assert!(err.contains("email.from"), "{err}");

    let bad_zone = config(25, |c| c.timezone = "Mars/Olympus".into());
    let err = EmailSink::new(&bad_zone, env.store.clone()).err().expect("refused");
    assert!(err.contains("email.timezone"), "{err}");

    let half_login = config(25, |c| c.username = Some("u".into()));
    assert!(EmailSink::new(&half_login, env.store.clone()).is_err());

    for tls in [EmailTls::Starttls, EmailTls::Tls] {
        assert!(EmailSink::new(&config(25, |c| c.tls = tls), env.store.clone()).is_ok());
    }
}

/// Writes the fake server's certificate where `email.ca_file` can point.
fn trust(fake: &FakeSmtp, dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("smtp-ca.pem");
    std::fs::write(&path, fake.certificate_pem()).unwrap();
    path
}

#[tokio::test]
async fn starttls_upgrades_the_session_before_anything_is_sent() {
    let env = env().await;
    let fake = FakeSmtp::start_with_starttls().await;
    record(&env.store, 1, PHONE, EventKind::OptOut, "STOP", november(), &["email"]).await;
    let ca = trust(&fake, &env._dir);
    let cfg = config(fake.port(), |c| {
        c.tls = EmailTls::Starttls;
        c.ca_file = Some(ca);
    });

    let out = sink(&env.store, &cfg).apply(&claim_email(&env.store).await).await;

    assert!(out[0].is_ok(), "{out:?}");
    let m = only_message(&fake);
    assert!(m.tls, "the message went over the upgraded session");
    assert_eq!(fake.tls_upgrades(), 1);
    assert!(m.body().contains("Phone:    +14155550101\n"));
}

#[tokio::test]
async fn starttls_with_credentials_logs_in_only_over_tls() {
    let env = env().await;
    let fake = FakeSmtp::start_with_auth_and_starttls("relay-user", "pa55 w0rd").await;
    record(&env.store, 1, PHONE, EventKind::OptOut, "STOP", november(), &["email"]).await;
    let ca = trust(&fake, &env._dir);
    let cfg = config(fake.port(), |c| {
        c.tls = EmailTls::Starttls;
        c.ca_file = Some(ca);
        c.username = Some("relay-user".into());
        c.password = Some(SecretString::from("pa55 w0rd"));
    });

    let out = sink(&env.store, &cfg).apply(&claim_email(&env.store).await).await;

    assert!(out[0].is_ok(), "{out:?}");
    let m = only_message(&fake);
    assert!(m.tls && m.auth_user.as_deref() == Some("relay-user"), "{m:?}");
    assert_eq!(fake.plaintext_auth_attempts(), 0, "the password never crossed the wire in clear");
}

#[tokio::test]
async fn required_starttls_that_the_server_does_not_offer_is_misconfigured_and_nothing_is_sent_in_clear() {
    let env = env().await;
    let fake = FakeSmtp::start().await;
    record(&env.store, 1, PHONE, EventKind::OptOut, "STOP", november(), &["email"]).await;
    let cfg = config(fake.port(), |c| c.tls = EmailTls::Starttls);

    let out = sink(&env.store, &cfg).apply(&claim_email(&env.store).await).await;

    assert!(misconfigured(&out[0]), "{out:?}");
    assert_eq!(fake.connections(), 1, "the server was reached");
    assert!(fake.messages().is_empty(), "no plaintext fallback");
    assert_eq!(fake.tls_upgrades(), 0);
}

#[tokio::test]
async fn a_certificate_nobody_trusts_is_refused() {
    let env = env().await;
    let fake = FakeSmtp::start_with_starttls().await;
    record(&env.store, 1, PHONE, EventKind::OptOut, "STOP", november(), &["email"]).await;
    // No ca_file: the self-signed certificate is not among the built-in roots.
    let cfg = config(fake.port(), |c| c.tls = EmailTls::Starttls);

    let out = sink(&env.store, &cfg).apply(&claim_email(&env.store).await).await;

    assert!(out[0].is_err(), "{out:?}");
    assert!(fake.messages().is_empty());
    assert_eq!(fake.tls_upgrades(), 0, "the handshake failed");
}

#[tokio::test]
async fn an_unreadable_or_empty_ca_file_is_refused_at_startup_naming_the_setting() {
    let env = env().await;
    let with_ca = |path: std::path::PathBuf| {
        config(25, |c| {
            c.tls = EmailTls::Starttls;
            c.ca_file = Some(path);
        })
    };
    let err = EmailSink::new(&with_ca(env._dir.path().join("nope.pem")), env.store.clone()).err().expect("refused");
    assert!(err.contains("email.ca_file") && err.contains("nope.pem"), "{err}");

    let empty = env._dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let err = EmailSink::new(&with_ca(empty), env.store.clone()).err().expect("refused");
    assert!(err.contains("email.ca_file") && err.contains("no PEM certificate"), "{err}");
}
