//! Reconciliation from Twilio's message log, and `backfill`: against an
//! in-process fake of `Messages.json` (Basic auth, date filters, paging by
//! `next_page_uri`, 429/5xx/401), recording through the webhook's path, one
//! event per MessageSid whichever way it came in.

use std::process::Command;
use std::time::{Duration, Instant};

use chrono::{DateTime, Timelike, Utc};
use optout_relay::config::TwilioConfig;
use optout_relay::reconcile::{listings, ReconcileError, Reconciler};
use optout_relay::store::Store;
use optout_relay::twilio::keywords::Keywords;
use optout_relay::twilio::messages::{MessagesClient, MessagesError};
use secrecy::SecretString;

use crate::both_backends;
use crate::common::fake_twilio::{FakeMessage, FakeTwilio, ACCOUNT, AUTH_TOKEN};
use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_optout-relay");

/// Whole seconds, as Twilio's `date_sent` carries them.
fn ago(d: chrono::Duration) -> DateTime<Utc> {
    (Utc::now() - d).with_nanosecond(0).expect("a time")
}

fn twilio_config(fake: &FakeTwilio) -> TwilioConfig {
    TwilioConfig {
        account_sid: Some(ACCOUNT.to_owned()),
        api_base: fake.base.clone(),
        auth_tokens: vec![SecretString::from(AUTH_TOKEN)],
        ..TwilioConfig::default()
    }
}

fn reconciler(store: &Store, cfg: &TwilioConfig) -> Reconciler {
    let keywords = Keywords::new(&optout_relay::config::KeywordsConfig::default());
    let client = MessagesClient::from_config(cfg).expect("client");
    Reconciler::new(client, store.clone(), keywords, phonenumber::country::Id::US, true, None)
}

fn event_of<'a>(events: &'a [optout_relay::store::EventRow], sid: &str) -> Option<&'a optout_relay::store::EventRow> {
    events.iter().find(|e| e.message_sid == sid)
}

/// The service reads the log every `interval`: a STOP that reached no
/// endpoint is recorded (said when it was sent, source `reconcile`) and
/// counted; a STOP the webhook delivered stays one event; outbound
/// messages, other texts and messages before the window are left alone.
async fn reconciliation_finds_a_stop_the_webhook_missed_and_does_not_duplicate_one_it_delivered(b: Backend) {
    let missed_at = ago(chrono::Duration::hours(3));
    let fake = FakeTwilio::start(vec![
        FakeMessage::inbound("SMrec0000000000000000000000000001", "+14155554101", "Stop.", missed_at),
        FakeMessage::outbound(
            "SMrec0000000000000000000000000002",
            "+14155554102",
            "STOP",
            ago(chrono::Duration::hours(2)),
        ),
        FakeMessage::inbound(
            "SMrec0000000000000000000000000003",
            "+14155554103",
            "thanks!",
            ago(chrono::Duration::hours(1)),
        ),
        FakeMessage::inbound(
            "SMrec0000000000000000000000000004",
            "+14155554104",
            "STOP",
            ago(chrono::Duration::days(20)),
        ),
    ])
    .await;
    let base = fake.base.clone();
    let app = spawn_app_with(b, |c| {
        c.twilio.account_sid = Some(ACCOUNT.to_owned());
        c.twilio.api_base = base;
        c.reconcile.interval = Some(Duration::from_secs(1));
    })
    .await;

    // The webhook delivers one STOP; the log then shows it too.
    let delivered = "SMrec0000000000000000000000000005";
    let res = app.post_signed(&stop_params(delivered, "+14155554105", "STOP", Some("STOP")), TOKEN).await;
    assert_eq!(res.status(), 200);
    fake.add(FakeMessage::inbound(delivered, "+14155554105", "STOP", ago(chrono::Duration::minutes(5))));
    let seen = fake.requests().len();
    // Two more runs: the one that started before the message was added has finished.
    eventually("two runs after the delivered STOP was in the log", || async {
        fake.requests().iter().skip(seen).filter(|r| r.status == 200).count() >= 2
    })
    .await;

    let events = events(&app.store).await;
    let missed = event_of(&events, "SMrec0000000000000000000000000001").expect("the missed STOP is recorded");
    assert_eq!((missed.kind.as_str(), missed.source.as_str()), ("opt_out", "reconcile"));
    assert_eq!(missed.received_at, missed_at, "recorded as said when Twilio received it");
    assert_eq!(missed.phone, "+14155554101");
    assert_eq!(missed.scope, SERVICE, "scoped to the Messaging Service, as the webhook scopes it");
    assert_eq!(opted_out(&app.store, "+14155554101").await, Some(true));

    let delivered_events: Vec<_> = events.iter().filter(|e| e.message_sid == delivered).collect();
    assert_eq!(delivered_events.len(), 1, "one event per MessageSid: {events:?}");
    assert_eq!(delivered_events[0].source, "twilio", "the webhook's event stands");
    for sid in
        ["SMrec0000000000000000000000000002", "SMrec0000000000000000000000000003", "SMrec0000000000000000000000000004"]
    {
        assert!(event_of(&events, sid).is_none(), "{sid} must not be recorded: {events:?}");
    }
    assert_eq!(events.len(), 2, "{events:?}");

    // Each run lists from the GMT day the 2-day lookback reaches, authenticated as the account.
    let first = &fake.requests()[0];
    let want_since = (Utc::now() - chrono::Duration::days(2)).date_naive().format("%Y-%m-%d").to_string();
    assert_eq!(first.param("DateSent>"), Some(want_since.as_str()));
    assert_eq!(first.param("PageSize"), Some("1000"));
    assert_eq!(first.user.as_deref(), Some(ACCOUNT));

    let text = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let missed_line = text
        .lines()
        .find(|l| l.starts_with("optout_reconcile_missed_total{kind=\"opt_out\"}"))
        .unwrap_or_else(|| panic!("no missed opt-out series in\n{text}"));
    let count: f64 = missed_line.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("a number");
    assert!(count >= 1.0, "{missed_line}");
    app.stop().await;
}

/// 429 (with Retry-After) and 5xx are retried, waiting at least what
/// Retry-After asks; the run then succeeds and records.
async fn rate_limits_and_server_errors_are_retried_honouring_retry_after(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database(b, &dir).await;
    let store = Store::connect_lazy(&base_config(&db).database).unwrap();
    store.migrate().await.unwrap();
    let fake = FakeTwilio::start(vec![FakeMessage::inbound(
        "SMretry000000000000000000000000001",
        "+14155554201",
        "unsubscribe",
        ago(chrono::Duration::hours(1)),
    )])
    .await;
    fake.fail_next(429, Some(2));
    fake.fail_next(503, None);
    let started = Instant::now();
    let since = Utc::now().date_naive() - chrono::Duration::days(1);
    let summary = reconciler(&store, &twilio_config(&fake)).run(&listings(&[], since, None)).await.expect("a run");
    assert!(started.elapsed() >= Duration::from_secs(2), "Retry-After: 2 was honoured ({:?})", started.elapsed());
    let statuses: Vec<u16> = fake.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [429, 503, 200]);
    assert_eq!(summary.missed_opt_outs, 1, "{summary:?}");
    assert_eq!(events(&store).await.len(), 1);
    store.close().await;
    drop_database(&db).await;
}

/// A 401 is a configuration mistake: one request, no retry, an error that
/// says which keys to check, nothing recorded.
async fn a_401_is_a_clear_error_and_not_retried(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database(b, &dir).await;
    let store = Store::connect_lazy(&base_config(&db).database).unwrap();
    store.migrate().await.unwrap();
    let fake = FakeTwilio::start(vec![FakeMessage::inbound(
        "SMauth0000000000000000000000000001",
        "+14155554301",
        "STOP",
        ago(chrono::Duration::hours(1)),
    )])
    .await;
    let mut cfg = twilio_config(&fake);
    cfg.auth_tokens = vec![SecretString::from("not-the-token")];
    let since = Utc::now().date_naive();
    let err = reconciler(&store, &cfg).run(&listings(&[], since, None)).await.expect_err("refused");
    assert!(matches!(err, ReconcileError::Twilio(MessagesError::Unauthorized)), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("401") && text.contains("twilio.account_sid"), "{text}");
    assert!(!text.contains("not-the-token"), "the secret is not in the message");
    assert_eq!(fake.requests().len(), 1, "a 401 is not retried");
    assert!(events(&store).await.is_empty());

    // An API key, when configured, is what authenticates.
    fake.allow_api_key("SK00000000000000000000000000000009", "key-secret");
    cfg.api_key_sid = Some("SK00000000000000000000000000000009".into());
    cfg.api_key_secret = Some(SecretString::from("key-secret"));
    let summary = reconciler(&store, &cfg).run(&listings(&[], since, None)).await.expect("a run");
    assert_eq!(summary.missed_opt_outs, 1);
    assert_eq!(
        fake.requests().last().and_then(|r| r.user.clone()).as_deref(),
        Some("SK00000000000000000000000000000009")
    );
    store.close().await;
    drop_database(&db).await;
}

/// `[reconcile] to`: one listing per number texted, each filtered by `To`.
async fn listing_per_number_filters_by_to(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database(b, &dir).await;
    let store = Store::connect_lazy(&base_config(&db).database).unwrap();
    store.migrate().await.unwrap();
    let mut other = FakeMessage::inbound(
        "SMto00000000000000000000000000001",
        "+14155554401",
        "STOP",
        ago(chrono::Duration::hours(1)),
    );
    other.to = "+15005550099".into();
    other.messaging_service_sid = None;
    let fake = FakeTwilio::start(vec![
        other,
        FakeMessage::inbound(
            "SMto00000000000000000000000000002",
            "+14155554402",
            "STOP",
            ago(chrono::Duration::hours(1)),
        ),
    ])
    .await;
    let since = Utc::now().date_naive() - chrono::Duration::days(1);
    let summary = reconciler(&store, &twilio_config(&fake))
        .run(&listings(&["+15005550006".to_owned()], since, None))
        .await
        .expect("a run");
    assert_eq!(summary.missed_opt_outs, 1, "{summary:?}");
    let events = events(&store).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].message_sid, "SMto00000000000000000000000000002");
    assert_eq!(fake.requests()[0].param("To"), Some("+15005550006"));
    store.close().await;
    drop_database(&db).await;
}

fn backfill(db: &str, base: &str, args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    Command::new(BIN)
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("OPTOUT_RELAY__DATABASE__URL", db)
        .env("OPTOUT_RELAY__TWILIO__AUTH_TOKENS", AUTH_TOKEN)
        .env("OPTOUT_RELAY__TWILIO__ACCOUNT_SID", ACCOUNT)
        .env("OPTOUT_RELAY__TWILIO__API_BASE", base)
        .env("OPTOUT_RELAY__LOG__FORMAT", "json")
        .arg("backfill")
        .args(args)
        .output()
        .expect("run the binary")
}

/// `optout-relay backfill --since … --until …` reads those GMT days (paging
/// past 1000 messages), records what is missing and prints a summary; run
/// again, it records nothing twice.
async fn backfill_records_a_range_of_days_once(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database(b, &dir).await;
    let store = Store::connect_lazy(&base_config(&db).database).unwrap();
    store.migrate().await.unwrap();
    let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
    let mut log = vec![
        FakeMessage::inbound("SMbf00000000000000000000000000001", "+14155554501", "STOP", at("2026-03-01T23:59:59Z")),
        FakeMessage::inbound("SMbf00000000000000000000000000002", "+14155554502", "cancel", at("2026-03-02T08:00:00Z")),
        FakeMessage::inbound("SMbf00000000000000000000000000003", "+14155554503", "START", at("2026-03-03T12:00:00Z")),
        FakeMessage::inbound("SMbf00000000000000000000000000004", "+14155554504", "hello", at("2026-03-03T12:00:00Z")),
        // Outside the days asked for.
        FakeMessage::inbound("SMbf00000000000000000000000000005", "+14155554505", "STOP", at("2026-02-28T23:59:59Z")),
        FakeMessage::inbound("SMbf00000000000000000000000000006", "+14155554506", "STOP", at("2026-03-04T00:00:00Z")),
    ];
    // Enough newer outbound traffic that the inbound messages are on the second page.
    for n in 0..1100 {
        log.push(FakeMessage::outbound(
            &format!("SMout{n:029}"),
            "+14155559999",
            "Your visit is tomorrow",
            at("2026-03-03T18:00:00Z"),
        ));
    }
    let fake = FakeTwilio::start(log).await;
    let base = fake.base.clone();
    let (db2, base2) = (db.clone(), base.clone());
    let out = tokio::task::spawn_blocking(move || {
        backfill(&db2, &base2, &["--since", "2026-03-01", "--until", "2026-03-03"])
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let json_end = stdout.find("\n}").expect("a JSON summary") + 2;
    let summary: serde_json::Value = serde_json::from_str(&stdout[..json_end]).expect("JSON");
    assert_eq!(summary["pages"], 2, "{stdout}");
    assert_eq!(summary["inbound"], 4, "{stdout}");
    assert_eq!(summary["missed_opt_outs"], 2, "{stdout}");
    assert_eq!(summary["missed_opt_ins"], 1, "{stdout}");
    assert_eq!(summary["not_keywords"], 1, "{stdout}");
    assert_eq!(summary["already_recorded"], 0, "{stdout}");
    assert!(stdout.contains("2 opt-out(s)"), "{stdout}");

    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].param("DateSent>"), Some("2026-03-01"));
    assert_eq!(requests[0].param("DateSent<"), Some("2026-03-03"));
    assert!(requests[1].param("PageToken").is_some(), "the second page came by next_page_uri");

    let events = events(&store).await;
    let sids: Vec<&str> = events.iter().map(|e| e.message_sid.as_str()).collect();
    assert_eq!(sids.len(), 3, "{sids:?}");
    for sid in
        ["SMbf00000000000000000000000000001", "SMbf00000000000000000000000000002", "SMbf00000000000000000000000000003"]
    {
        let e = event_of(&events, sid).unwrap_or_else(|| panic!("{sid} recorded: {sids:?}"));
        assert_eq!(e.source, "reconcile");
    }
    // Said on 2 March, then START on 3 March: the newest wins.
    let stop2 = event_of(&events, "SMbf00000000000000000000000000002").unwrap();
    assert_eq!(stop2.received_at, at("2026-03-02T08:00:00Z"));
    assert_eq!(opted_out(&store, "+14155554502").await, Some(true));
    assert_eq!(opted_out(&store, "+14155554503").await, Some(false));

    let db2 = db.clone();
    let again =
        tokio::task::spawn_blocking(move || backfill(&db2, &base, &["--since", "2026-03-01", "--until", "2026-03-03"]))
            .await
            .unwrap();
    let stdout = String::from_utf8_lossy(&again.stdout).to_string();
    assert!(again.status.success(), "{stdout}");
    assert!(stdout.contains("\"already_recorded\": 3") && stdout.contains("\"missed_opt_outs\": 0"), "{stdout}");
    assert_eq!(crate::common::events(&store).await.len(), 3, "nothing recorded twice");
    store.close().await;
    drop_database(&db).await;
}

both_backends!(
    reconciliation_finds_a_stop_the_webhook_missed_and_does_not_duplicate_one_it_delivered,
    rate_limits_and_server_errors_are_retried_honouring_retry_after,
    a_401_is_a_clear_error_and_not_retried,
    listing_per_number_filters_by_to,
    backfill_records_a_range_of_days_once,
);

/// Bad arguments and a missing account are refused before anything is read.
#[test]
fn backfill_refuses_bad_dates_and_a_missing_account() {
    let db = "sqlite::memory:";
    let out = backfill(db, "http://127.0.0.1:9", &["--since", "1 March"]);
    assert_eq!(out.status.code(), Some(2), "clap refuses the date");
    assert!(String::from_utf8_lossy(&out.stderr).contains("YYYY-MM-DD"));
    let out = backfill(db, "http://127.0.0.1:9", &["--since", "2026-03-02", "--until", "2026-03-01"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("before --since"));
    let out = Command::new(BIN)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("OPTOUT_RELAY__DATABASE__URL", db)
        .args(["backfill", "--since", "2026-03-01"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("twilio.account_sid"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Switching reconciliation on without an account or a credential is a
/// configuration problem, named.
#[test]
fn reconcile_needs_an_account_and_a_credential() {
    let mut c = optout_relay::config::Config::default();
    assert!(c.problems().iter().all(|p| !p.contains("reconcile")), "off by default: {:?}", c.problems());
    c.reconcile.interval = Some(Duration::from_secs(600));
    let problems = c.problems().join("\n");
    assert!(problems.contains("twilio.account_sid"), "{problems}");
    assert!(problems.contains("no credential for Twilio's API"), "{problems}");
    c.twilio.account_sid = Some(ACCOUNT.into());
    c.twilio.api_key_sid = Some("SK1".into());
    let problems = c.problems().join("\n");
    assert!(problems.contains("api_key_sid and twilio.api_key_secret go together"), "{problems}");
    c.twilio.api_key_secret = Some(SecretString::from("s"));
    c.reconcile.to = vec!["15005550006".into()];
    let problems = c.problems().join("\n");
    assert!(problems.contains("reconcile.to"), "{problems}");
    c.reconcile.to = vec!["+15005550006".into()];
    assert!(c.problems().iter().all(|p| !p.contains("reconcile") && !p.contains("api_key")), "{:?}", c.problems());
}
