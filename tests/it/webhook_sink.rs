//! The webhook sink end to end: the real app on both backends posting to an
//! in-process receiver that verifies every Standard Webhooks signature with
//! its own HMAC code (`common::webhook_receiver`), not the signing crate.

use std::time::Duration;

use crate::both_backends;
use crate::common::webhook_receiver::{Answer, Receiver};
use crate::common::*;
use optout_relay::config::{Config, SinkConfig, WebhookConfig};
use optout_relay::domain::Phone;
use optout_relay::store::{DeliveryRow, Store};
use secrecy::SecretString;

const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const PHONE: &str = "+14155550177";

fn hook_to(receiver: &Receiver) -> impl FnOnce(&mut Config) + '_ {
    move |c: &mut Config| {
        let mut w = WebhookConfig::new(&receiver.url, SecretString::from(SECRET));
        w.timeout = Duration::from_millis(700);
        c.sinks.insert("crm".to_owned(), SinkConfig::Webhook(w));
        c.relay.poll_interval = Duration::from_millis(50);
        c.relay.retry_base = Duration::from_millis(100);
        c.relay.retry_cap = Duration::from_millis(300);
        c.relay.misconfigured_retry = Duration::from_secs(3600);
        c.relay.lease = Duration::from_secs(5);
    }
}

async fn text(app: &TestApp, sid: &str, body: &str) {
    assert_eq!(app.post_signed(&stop_params(sid, PHONE, body, None), TOKEN).await.status(), 200, "{body}");
}

async fn row(store: &Store) -> Option<DeliveryRow> {
    let phone = Phone::from_stored(PHONE.to_owned());
    store.deliveries_of_phone(&phone).await.expect("rows").into_iter().find(|r| r.sink == "crm")
}

async fn done(store: &Store, opted_out: bool) -> DeliveryRow {
    eventually_some("the webhook delivered", || async {
        row(store).await.filter(|r| r.status == "done" && r.written_opted_out == Some(opted_out))
    })
    .await
}

async fn opt_out_and_opt_in_are_posted_signed_so_an_independent_receiver_verifies_them(b: Backend) {
    let receiver = Receiver::start(SECRET).await;
    let app = spawn_app_with(b, hook_to(&receiver)).await;

    text(&app, "SMhook1", "STOP").await;
    let r = done(&app.store, true).await;
    text(&app, "SMhook2", "START").await;
    done(&app.store, false).await;

    let got = receiver.deliveries();
    assert_eq!(got.len(), 2, "{got:#?}");
    assert!(got.iter().all(|d| d.verified), "every signature checks out: {got:#?}");
    let (out, back) = (&got[0].body, &got[1].body);
    assert_eq!(out["type"], "phone.opted_out");
    assert_eq!(out["data"]["phone"], PHONE);
    assert_eq!(out["data"]["scopes"], serde_json::json!([SERVICE]));
    assert_eq!(out["data"]["source"], "twilio");
    assert!(out["data"]["event_id"].as_i64().is_some(), "{out}");
    let since = out["data"]["since"].as_str().expect("since");
    assert!(chrono::DateTime::parse_from_rfc3339(since).is_ok(), "{since}");
    assert!(chrono::DateTime::parse_from_rfc3339(out["timestamp"].as_str().unwrap()).is_ok());
    assert_eq!(back["type"], "phone.opted_in");
    assert_eq!(back["data"]["since"], serde_json::Value::Null);
    assert_ne!(got[0].id, got[1].id, "two changes, two messages");
    // The delivery keeps the id and the answer's status.
    let result = r.result.expect("account");
    assert_eq!((result["webhook_id"].as_str(), result["status"].as_u64()), (Some(got[0].id.as_str()), Some(204)));
    app.stop().await;
}

async fn every_retry_of_one_delivery_keeps_its_webhook_id_and_body(b: Backend) {
    let receiver = Receiver::start(SECRET).await;
    receiver.answer_next(Answer::Status { status: 503, retry_after: None });
    receiver.answer_next(Answer::Status { status: 429, retry_after: Some(1) });
    // Longer than the sink's 700ms timeout.
    receiver.answer_next(Answer::Hang(Duration::from_millis(1500)));
    let app = spawn_app_with(b, hook_to(&receiver)).await;

    text(&app, "SMretry", "STOP").await;
    done(&app.store, true).await;
    let got = receiver.deliveries();
    assert_eq!(got.len(), 4, "503, 429, a timeout, then 204: {got:#?}");
    assert!(got.iter().all(|d| d.verified), "{got:#?}");
    assert!(got.iter().all(|d| d.id == got[0].id), "one delivery, one webhook-id: {got:#?}");
    assert!(got.iter().all(|d| d.raw == got[0].raw), "the same body every time");
    assert!(got[3].timestamp >= got[0].timestamp, "the timestamp is the attempt's");
    app.stop().await;
}

async fn a_410_gone_marks_the_sink_misconfigured_and_keeps_the_change(b: Backend) {
    let receiver = Receiver::start(SECRET).await;
    receiver.answer_next(Answer::Status { status: 410, retry_after: None });
    let app = spawn_app_with(b, hook_to(&receiver)).await;

    text(&app, "SMgone", "STOP").await;
    let health = eventually_some("the sink is misconfigured", || async {
        app.store.sink("crm").await.unwrap().filter(|h| h.health == "misconfigured")
    })
    .await;
    assert!(health.last_error.unwrap_or_default().contains("410"));
    // The sink's health is recorded before its rows are put back.
    let r = eventually_some("the row put back with the answer", || async {
        row(&app.store).await.filter(|r| r.last_error.as_deref().is_some_and(|e| e.contains("410")))
    })
    .await;
    assert_eq!(r.status, "pending", "nothing is lost: the change waits for the fix");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.deliveries().len(), 1, "not hammered after a 410");
    app.stop().await;
}

async fn a_receiver_that_refuses_the_signature_is_misconfigured(b: Backend) {
    // The receiver knows another secret: its 401 is the operator's to fix.
    let receiver = Receiver::start("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").await;
    let app = spawn_app_with(b, hook_to(&receiver)).await;
    text(&app, "SMsig", "STOP").await;
    eventually_some("the sink is misconfigured", || async {
        app.store.sink("crm").await.unwrap().filter(|h| h.health == "misconfigured")
    })
    .await;
    let got = receiver.deliveries();
    assert!(!got.is_empty() && got.iter().all(|d| !d.verified), "{got:#?}");
    app.stop().await;
}

async fn a_webhook_configured_later_receives_the_opt_outs_recorded_before_it(b: Backend) {
    let receiver = Receiver::start(SECRET).await;
    // Recorded while no sink was configured.
    let before = spawn_app(b).await;
    text(&before, "SMearly", "STOP").await;
    eventually("the STOP recorded", || async { opted_out(&before.store, PHONE).await == Some(true) }).await;

    // The same database, now with the webhook.
    let mut config = base_config(&before.db_url);
    hook_to(&receiver)(&mut config);
    let app = optout_relay::startup::Application::build(config).await.expect("build");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn(app.run_until(shutdown.clone()));
    let got = eventually_some("the backfilled delivery", || async {
        let d = receiver.deliveries();
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert_eq!(got[0].body["type"], "phone.opted_out");
    assert_eq!(got[0].body["data"]["phone"], PHONE);
    assert!(got[0].verified);
    done(&before.store, true).await;
    shutdown.cancel();
    let _ = tokio::time::timeout(PATIENCE, handle).await;
    before.stop().await;
}

both_backends!(
    a_webhook_configured_later_receives_the_opt_outs_recorded_before_it,
    opt_out_and_opt_in_are_posted_signed_so_an_independent_receiver_verifies_them,
    every_retry_of_one_delivery_keeps_its_webhook_id_and_body,
    a_410_gone_marks_the_sink_misconfigured_and_keeps_the_change,
    a_receiver_that_refuses_the_signature_is_misconfigured,
);
