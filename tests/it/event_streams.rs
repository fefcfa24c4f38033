//! `POST /twilio/events`, Twilio Event Streams' webhook sink: signed as Twilio
//! signs JSON requests, recorded through the webhook's path, one event per
//! MessageSid whichever way it came in.
//!
//! Requests are signed here independently of the service's signer: HMAC-SHA1
//! over the URL (with `bodySHA256` in its query), base64, and the body's
//! SHA-256 in hex, computed with the hmac/sha1/sha2 crates directly.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::SecretString;
use serde_json::{json, Value};
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::both_backends;
use crate::common::fake_redcap::{FakeProject, FakeRedcap};
use crate::common::*;
use optout_relay::config::Config;

const PATH: &str = "/twilio/events";

fn sha256_hex(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

fn hmac_sha1_b64(token: &str, url: &str) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(token.as_bytes()).expect("any key length");
    mac.update(url.as_bytes());
    B64.encode(mac.finalize().into_bytes())
}

/// An inbound-message CloudEvent as Event Streams sends it (schema v5+, so
/// `optOutType` when Advanced Opt-Out matched).
fn message(sid: &str, from: &str, body: &str, opt_out_type: Option<&str>, timestamp: &str) -> Value {
    let mut data = json!({
        "messageSid": sid,
        "timestamp": timestamp,
        "accountSid": format!("AC{}", "0".repeat(32)),
        "eventName": "com.twilio.messaging.inbound-message.received",
        "from": from,
        "to": "+15005550006",
        "numMedia": 0,
        "numSegments": 1,
        "body": body,
        "messagingServiceSid": SERVICE,
        "recipients": [],
    });
    if let Some(t) = opt_out_type {
        data["optOutType"] = json!(t);
    }
    json!({
        "specversion": "1.0",
        "type": "com.twilio.messaging.inbound-message.received",
        "source": format!("/2010-04-01/Accounts/AC{}/Messages/{sid}.json", "0".repeat(32)),
        "id": format!("EZ{sid}"),
        "dataschema": "https://events-schemas.twilio.com/Messaging.InboundMessageV1/5",
        "datacontenttype": "application/json",
        "time": timestamp,
        "data": data,
    })
}

fn test_event() -> Value {
    json!({
        "specversion": "1.0",
        "type": "com.twilio.eventstreams.test-event",
        "source": "Sink",
        "id": "EZtest",
        "dataschema": "https://events-schemas.twilio.com/EventStreams.TestSink/2",
        "datacontenttype": "application/json",
        "time": "2026-11-23T17:45:04.000Z",
        "data": {"test_id": "EZtest", "sink_sid": "DG1"},
    })
}

/// Posts `body` as Twilio would: `?bodySHA256=<hash of what is sent>`, signed
/// over `PUBLIC_URL` + path + query with `token`.
async fn post_signed(app: &TestApp, body: &str, token: &str) -> reqwest::Response {
    let path = format!("{PATH}?bodySHA256={}", sha256_hex(body.as_bytes()));
    let sig = hmac_sha1_b64(token, &format!("{PUBLIC_URL}{path}"));
    app.post_raw(&path, body.to_owned(), "application/json", Some(&sig), &[]).await
}

async fn post_events(app: &TestApp, events: &Value) -> reqwest::Response {
    post_signed(app, &events.to_string(), TOKEN).await
}

async fn events_of_source(app: &TestApp, source: &str) -> usize {
    events(&app.store).await.iter().filter(|e| e.source == source).count()
}

async fn an_opt_out_by_event_streams_is_recorded_at_the_time_it_was_said(b: Backend) {
    let app = spawn_app(b).await;
    let said = "2026-11-23T17:45:04.123Z";
    let res = post_events(&app, &json!([message("SMes1", "+14155552101", "STOP", Some("STOP"), said)])).await;
    assert_eq!(res.status(), 200);
    let summary: Value = res.json().await.unwrap();
    assert_eq!(summary, json!({"recorded": 1, "duplicates": 0, "ignored": 0}));
    let rows = events(&app.store).await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!((row.message_sid.as_str(), row.kind.as_str()), ("SMes1", "opt_out"));
    assert_eq!(
        (row.source.as_str(), row.scope.as_str(), row.phone.as_str()),
        ("event_streams", SERVICE, "+14155552101")
    );
    assert_eq!(row.received_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true), said);
    assert_eq!(opted_out(&app.store, "+14155552101").await, Some(true));
    // The whole CloudEvent is kept for the audit trail.
    let params = query_texts(&app.db_url, "SELECT CAST(params AS TEXT) FROM events").await;
    let params: Value = serde_json::from_str(&params[0]).unwrap();
    assert_eq!(params["data"]["optOutType"], "STOP");
    app.stop().await;
}

async fn keywords_classify_when_opt_out_type_is_absent(b: Backend) {
    let app = spawn_app(b).await;
    let now = chrono::Utc::now().to_rfc3339();
    let batch = json!([
        message("SMkw1", "+14155552201", "  Stop. ", None, &now),
        message("SMkw2", "+14155552202", "please stop texting me", None, &now),
        message("SMkw3", "+14155552203", "anything", Some("START"), &now),
    ]);
    let res = post_events(&app, &batch).await;
    assert_eq!(res.status(), 200);
    // Free text that reads like a revocation is held for staff review (issue #10), not recorded.
    assert_eq!(res.json::<Value>().await.unwrap(), json!({"recorded": 2, "duplicates": 0, "ignored": 0, "reviews": 1}));
    assert_eq!(opted_out(&app.store, "+14155552201").await, Some(true));
    assert_eq!(opted_out(&app.store, "+14155552202").await, None, "free text is not a keyword");
    let held = query_texts(&app.db_url, "SELECT message_sid FROM reviews").await;
    assert_eq!(held, ["SMkw2"], "held for review");
    assert_eq!(opted_out(&app.store, "+14155552203").await, Some(false));
    app.stop().await;
}

async fn wrong_or_missing_signatures_and_hashes_are_refused(b: Backend) {
    let app = spawn_app(b).await;
    let now = chrono::Utc::now().to_rfc3339();
    let body = json!([message("SMsig1", "+14155552301", "STOP", Some("STOP"), &now)]).to_string();
    let hash = sha256_hex(body.as_bytes());
    let path = format!("{PATH}?bodySHA256={hash}");
    let good_sig = hmac_sha1_b64(TOKEN, &format!("{PUBLIC_URL}{path}"));

    // No signature at all.
    let res = app.post_raw(&path, body.clone(), "application/json", None, &[]).await;
    assert_eq!(res.status(), 403);
    // A wrong token.
    assert_eq!(post_signed(&app, &body, "wrong-token").await.status(), 403);
    // The URL signed correctly, but the body is not the one hashed.
    let tampered = body.replace("+14155552301", "+14155552399");
    let res = app.post_raw(&path, tampered, "application/json", Some(&good_sig), &[]).await;
    assert_eq!(res.status(), 403);
    // A bodySHA256 that is not the body's, signed as such.
    let wrong_hash_path = format!("{PATH}?bodySHA256={}", sha256_hex(b"something else"));
    let sig = hmac_sha1_b64(TOKEN, &format!("{PUBLIC_URL}{wrong_hash_path}"));
    let res = app.post_raw(&wrong_hash_path, body.clone(), "application/json", Some(&sig), &[]).await;
    assert_eq!(res.status(), 403);
    // No bodySHA256 at all: the body would be covered by nothing.
    let sig = hmac_sha1_b64(TOKEN, &format!("{PUBLIC_URL}{PATH}"));
    let res = app.post_raw(PATH, body.clone(), "application/json", Some(&sig), &[]).await;
    assert_eq!(res.status(), 403);
    // Body parameters are not part of the signed string: a form-style signature is refused.
    let form_sig = optout_relay::twilio::signature::compute(
        TOKEN,
        &format!("{PUBLIC_URL}{path}"),
        &[("body".to_owned(), body.clone())],
    );
    let res = app.post_raw(&path, body.clone(), "application/json", Some(&form_sig), &[]).await;
    assert_eq!(res.status(), 403);
    assert_eq!(event_count(&app.store).await, 0, "nothing refused is recorded");

    // The same request, correctly signed, is accepted.
    let res = app.post_raw(&path, body, "application/json", Some(&good_sig), &[]).await;
    assert_eq!(res.status(), 200);
    assert_eq!(event_count(&app.store).await, 1);
    app.stop().await;
}

async fn the_same_message_by_both_channels_is_one_event(b: Backend) {
    let app = spawn_app(b).await;
    let now = chrono::Utc::now().to_rfc3339();
    // Webhook first, then Event Streams.
    assert_eq!(
        app.post_signed(&stop_params("SMboth1", "+14155552401", "STOP", Some("STOP")), TOKEN).await.status(),
        200
    );
    let res = post_events(&app, &json!([message("SMboth1", "+14155552401", "STOP", Some("STOP"), &now)])).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["duplicates"], 1);
    // Event Streams first, then the webhook.
    let res = post_events(&app, &json!(message("SMboth2", "+14155552402", "STOP", Some("STOP"), &now))).await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        app.post_signed(&stop_params("SMboth2", "+14155552402", "STOP", Some("STOP")), TOKEN).await.status(),
        200
    );
    // Event Streams delivers at least once: its own redelivery too.
    let res = post_events(&app, &json!(message("SMboth2", "+14155552402", "STOP", Some("STOP"), &now))).await;
    assert_eq!(res.status(), 200);

    let rows = events(&app.store).await;
    let sids: Vec<(&str, &str)> = rows.iter().map(|e| (e.message_sid.as_str(), e.source.as_str())).collect();
    assert_eq!(sids, [("SMboth1", "twilio"), ("SMboth2", "event_streams")]);
    app.stop().await;
}

async fn test_events_and_other_types_are_answered_and_not_recorded(b: Backend) {
    let app = spawn_app(b).await;
    let res = post_events(&app, &test_event()).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap(), json!({"recorded": 0, "duplicates": 0, "ignored": 1}));
    let mut other = test_event();
    other["type"] = json!("com.twilio.messaging.message.delivered");
    assert_eq!(post_events(&app, &json!([other, test_event()])).await.status(), 200);
    assert_eq!(post_events(&app, &json!([])).await.status(), 200);
    assert_eq!(event_count(&app.store).await, 0);
    app.stop().await;
}

async fn a_batch_records_every_message(b: Backend) {
    let app = spawn_app(b).await;
    let batch = json!([
        message("SMbat1", "+14155552501", "STOP", Some("STOP"), "2026-11-23T10:00:00Z"),
        test_event(),
        message("SMbat2", "(415) 555-2502", "unsubscribe", None, "2026-11-23T10:00:01Z"),
    ]);
    let res = post_events(&app, &batch).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap(), json!({"recorded": 2, "duplicates": 0, "ignored": 1}));
    assert_eq!(events_of_source(&app, "event_streams").await, 2);
    assert_eq!(opted_out(&app.store, "+14155552501").await, Some(true));
    assert_eq!(opted_out(&app.store, "+14155552502").await, Some(true));
    app.stop().await;
}

/// Order is not guaranteed: a STOP said after a START but delivered before
/// it still wins, by the events' own timestamps.
async fn the_events_own_timestamps_decide_which_is_newest(b: Backend) {
    let app = spawn_app(b).await;
    let stop = message("SMord2", "+14155552601", "STOP", Some("STOP"), "2026-11-23T10:00:05Z");
    let start = message("SMord1", "+14155552601", "START", Some("START"), "2026-11-23T10:00:00Z");
    assert_eq!(post_events(&app, &json!([stop])).await.status(), 200);
    assert_eq!(post_events(&app, &json!([start])).await.status(), 200);
    assert_eq!(opted_out(&app.store, "+14155552601").await, Some(true));
    app.stop().await;
}

async fn bad_bodies_get_400_and_oversized_413(b: Backend) {
    let app = spawn_app_with(b, |c| c.server.max_body_bytes = 4096).await;
    for body in ["{not json", "", "\"STOP\"", "[1, 2]", r#"[{"no": "type"}]"#] {
        let res = post_signed(&app, body, TOKEN).await;
        assert_eq!(res.status(), 400, "{body:?}");
        let detail: Value = res.json().await.unwrap();
        assert_eq!(detail["code"], "bad_request", "{body:?}");
    }
    // An inbound message we cannot read is refused (400) after its readable
    // neighbour was recorded: nothing readable is held hostage.
    let now = chrono::Utc::now().to_rfc3339();
    let mut no_sid = message("SMx", "+14155552701", "STOP", Some("STOP"), &now);
    no_sid["data"].as_object_mut().unwrap().remove("messageSid");
    let batch = json!([no_sid, message("SMbad2", "+14155552702", "STOP", Some("STOP"), &now)]);
    let res = post_events(&app, &batch).await;
    assert_eq!(res.status(), 400);
    let detail: Value = res.json().await.unwrap();
    assert!(detail["detail"].as_str().unwrap().contains("data.messageSid"), "{detail}");
    assert_eq!(events(&app.store).await.iter().map(|e| e.message_sid.clone()).collect::<Vec<_>>(), ["SMbad2"]);
    // A keyword from an address that is no phone number cannot be recorded.
    let res = post_events(&app, &json!([message("SMbad3", "messenger:12345", "STOP", None, &now)])).await;
    assert_eq!(res.status(), 400);
    // Other text from such an address is simply not an opt-out.
    let res = post_events(&app, &json!([message("SMbad4", "messenger:12345", "hello", None, &now)])).await;
    assert_eq!(res.status(), 200);

    let big = json!([message("SMbig", "+14155552703", &"a".repeat(5000), None, &now)]).to_string();
    assert_eq!(post_signed(&app, &big, TOKEN).await.status(), 413);
    assert_eq!(event_count(&app.store).await, 1);
    app.stop().await;
}

async fn store_down_answers_503(b: Backend) {
    let app = spawn_app_with(b, |c| {
        c.database.run_migrations_on_start = false;
        c.database.acquire_timeout = Duration::from_secs(1);
        c.database.url = SecretString::from(match b {
            Backend::Postgres => "postgres://postgres@127.0.0.1:1/none".to_owned(),
            Backend::Sqlite => "sqlite:///nonexistent-dir/for/sure/relay.db?mode=rwc".to_owned(),
        });
    })
    .await;
    let now = chrono::Utc::now().to_rfc3339();
    let res = post_events(&app, &json!([message("SMdown", "+14155552801", "STOP", Some("STOP"), &now)])).await;
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    // A test event needs no store: it is still answered.
    assert_eq!(post_events(&app, &test_event()).await.status(), 200);
    app.stop().await;
}

async fn a_failing_commit_answers_503_and_the_retry_records_it(b: Backend) {
    let app = spawn_app(b).await;
    let trigger: &[&str] = match b {
        Backend::Postgres => &[
            "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'disk full'; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER refuse BEFORE INSERT ON changes FOR EACH ROW EXECUTE FUNCTION refuse()",
        ],
        Backend::Sqlite => {
            &["CREATE TRIGGER refuse BEFORE INSERT ON changes BEGIN SELECT RAISE(ABORT, 'disk full'); END"]
        }
    };
    exec(&app.db_url, trigger).await;
    let now = chrono::Utc::now().to_rfc3339();
    let batch = json!([
        message("SMfail1", "+14155552901", "STOP", Some("STOP"), &now),
        message("SMfail2", "+14155552902", "STOP", Some("STOP"), &now),
    ]);
    assert_eq!(post_events(&app, &batch).await.status(), 503);
    assert_eq!(event_count(&app.store).await, 0, "nothing half-written");
    let drop = if b == Backend::Postgres { "DROP TRIGGER refuse ON changes" } else { "DROP TRIGGER refuse" };
    exec(&app.db_url, &[drop]).await;
    // Event Streams retries the same delivery.
    assert_eq!(post_events(&app, &batch).await.status(), 200);
    assert_eq!(event_count(&app.store).await, 2);
    app.stop().await;
}

const REDCAP_TOKEN: &str = "0123456789ABCDEF0123456789ABCDEF";
const FIELD: &str = "opted_out_at";

fn relay_to(fake: &FakeRedcap) -> impl FnOnce(&mut Config) + '_ {
    move |c: &mut Config| {
        let mut r = redcap_config(&fake.url);
        r.token = SecretString::from(REDCAP_TOKEN);
        r.optout_field = FIELD.into();
        r.request_timeout = Duration::from_secs(2);
        c.redcap = Some(r);
        c.relay.poll_interval = Duration::from_millis(50);
        c.relay.retry_base = Duration::from_millis(100);
        c.relay.retry_cap = Duration::from_millis(300);
        c.relay.lease = Duration::from_secs(10);
    }
}

async fn an_opt_out_by_event_streams_reaches_redcap(b: Backend) {
    let project = FakeProject::new(
        REDCAP_TOKEN,
        &[("study_id", "enrol", ""), ("phone", "enrol", ""), (FIELD, "enrol", "datetime_seconds_ymd")],
    )
    .with_record("1", None, &[("phone", "(415) 555-3001")])
    .with_record("2", None, &[("phone", "415-555-3002")]);
    let fake = FakeRedcap::start(project).await;
    let app = spawn_app_with(b, relay_to(&fake)).await;
    let res =
        post_events(&app, &json!([message("SMrc1", "+14155553001", "STOP", Some("STOP"), "2026-11-23T17:45:04Z")]))
            .await;
    assert_eq!(res.status(), 200);
    let stamp =
        eventually_some("record 1 stamped", || async { fake.value("1", None, FIELD).filter(|v| !v.is_empty()) }).await;
    // Stamped with when the person said it (UTC sink), not when it arrived.
    assert_eq!(stamp, "2026-11-23 17:45:04");
    eventually("nothing pending", || async { deliveries(&app.store, Some("pending")).await.is_empty() }).await;
    assert_eq!(fake.value("2", None, FIELD).unwrap_or_default(), "", "another phone's record is untouched");
    app.stop().await;
}

async fn metrics_count_event_streams_outcomes(b: Backend) {
    let app = spawn_app(b).await;
    let now = chrono::Utc::now().to_rfc3339();
    post_events(&app, &json!([message("SMmet1", "+14155553101", "STOP", Some("STOP"), &now), test_event()])).await;
    post_signed(&app, &test_event().to_string(), "wrong").await;
    let text = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for outcome in ["accepted", "ignored", "bad_signature"] {
        let needle = format!("optout_webhooks_total{{outcome=\"{outcome}\",channel=\"event_streams\"}}");
        assert!(text.contains(&needle), "{needle} missing from\n{text}");
    }
    app.stop().await;
}

both_backends!(
    an_opt_out_by_event_streams_is_recorded_at_the_time_it_was_said,
    keywords_classify_when_opt_out_type_is_absent,
    wrong_or_missing_signatures_and_hashes_are_refused,
    the_same_message_by_both_channels_is_one_event,
    test_events_and_other_types_are_answered_and_not_recorded,
    a_batch_records_every_message,
    the_events_own_timestamps_decide_which_is_newest,
    bad_bodies_get_400_and_oversized_413,
    store_down_answers_503,
    a_failing_commit_answers_503_and_the_retry_records_it,
    an_opt_out_by_event_streams_reaches_redcap,
    metrics_count_event_streams_outcomes,
);

/// The real binary's log, driven with a STOP, a refused keyword from a
/// non-phone address and a forged delivery: no phone number in clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phone_numbers_are_masked_in_the_log() {
    optout_relay::install_tls_provider();
    let logs = crate::hostile::logs_of_binary(&[], |base| async move {
        let client = reqwest::Client::new();
        let post = |events: Value, token: &'static str| {
            let body = events.to_string();
            let path = format!("{PATH}?bodySHA256={}", sha256_hex(body.as_bytes()));
            let sig = hmac_sha1_b64(token, &format!("{PUBLIC_URL}{path}"));
            client
                .post(format!("{base}{path}"))
                .header("content-type", "application/json")
                .header("x-twilio-signature", sig)
                .body(body)
                .send()
        };
        let now = chrono::Utc::now().to_rfc3339();
        let stop = json!([message("SMlog1", "+14155553201", "STOP", Some("STOP"), &now)]);
        assert_eq!(post(stop, TOKEN).await.unwrap().status(), 200);
        let odd = json!([message("SMlog2", "tel:+1 415 555 320", "STOP", None, &now)]);
        assert_eq!(post(odd, TOKEN).await.unwrap().status(), 400);
        let forged = json!([message("SMlog3", "+14155553203", "STOP", Some("STOP"), &now)]);
        assert_eq!(post(forged, "wrong").await.unwrap().status(), 403);
    })
    .await;
    for digits in ["4155553201", "555 320", "4155553203"] {
        assert!(!logs.contains(digits), "{digits} in the log:\n{logs}");
    }
    assert!(logs.contains("+1415***3201"), "the recorded phone is logged, masked:\n{logs}");
    assert!(logs.contains("request refused"), "the refusal is logged:\n{logs}");
}
