//! The admin API over real HTTP, against both stores: phones with each
//! sink's target against what was written there, sinks with their health and
//! backlog, (sink, phone) rows, events, staff-recorded changes.

use std::time::Duration;

use crate::both_backends;
use crate::common::fake_redcap::{FakeProject, FakeRedcap, Fault};
use crate::common::*;
use chrono::{DateTime, Utc};
use secrecy::SecretString;
use serde_json::{json, Value};

const ADMIN: &str = "admin-token-for-tests";

const REDCAP_TOKEN: &str = "0123456789ABCDEF0123456789ABCDEF";
const FIELD: &str = "opted_out_at";
const SERVICE_A: &str = "MGaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

/// Admin tokens, and a REDCap that is never there with a `max_age` so short
/// that a phone is given up on after its first failed try (dead-lettering is
/// by age only); the sink's backoff is short, so retries come soon.
fn with_admin(c: &mut optout_relay::config::Config) {
    c.admin.tokens = vec![SecretString::from("other-token"), SecretString::from(ADMIN)];
    c.redcap = Some(redcap_config("http://127.0.0.1:9/api/"));
    c.relay.max_age = Duration::from_millis(1);
    c.relay.retry_base = Duration::from_millis(100);
    c.relay.retry_cap = Duration::from_millis(400);
    c.relay.poll_interval = Duration::from_millis(50);
}

/// A REDCap project holding one record for `phone`.
async fn fake_with_record(phone: &str) -> FakeRedcap {
    FakeRedcap::start(
        FakeProject::new(
            REDCAP_TOKEN,
            &[("record_id", "contact", ""), ("phone", "contact", ""), (FIELD, "contact", "datetime_seconds_ymd")],
        )
        .with_record("1", None, &[("phone", phone)]),
    )
    .await
}

/// A REDCap sink configuration for `fake`.
fn redcap_of(fake: &FakeRedcap) -> optout_relay::config::RedcapConfig {
    let mut r = redcap_config(&fake.url);
    r.token = SecretString::from(REDCAP_TOKEN);
    r
}

async fn get(app: &TestApp, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = app.client.get(app.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn post(app: &TestApp, path: &str, body: Value) -> (u16, Value) {
    let res = app.client.post(app.url(path)).bearer_auth(ADMIN).json(&body).send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// Polls `path` until `pred` holds for its body, and returns that body.
async fn wait_for<F: Fn(&Value) -> bool>(app: &TestApp, path: &str, pred: F) -> Value {
    let pred = &pred;
    eventually_some(&format!("a body of {path} that fits"), || async move {
        let (_, body) = get(app, path, Some(ADMIN)).await;
        pred(&body).then_some(body)
    })
    .await
}

async fn admin_api_is_absent_without_tokens(b: Backend) {
    let app = spawn_app(b).await;
    assert_eq!(get(&app, "/v1/events", Some(ADMIN)).await.0, 404);
    app.stop().await;
}

async fn bearer_token_is_required(b: Backend) {
    let app = spawn_app_with(b, with_admin).await;
    assert_eq!(get(&app, "/v1/events", None).await.0, 401);
    assert_eq!(get(&app, "/v1/events", Some("wrong")).await.0, 401);
    let res =
        app.client.get(app.url("/v1/events")).header("authorization", format!("Basic {ADMIN}")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    assert_eq!(get(&app, "/v1/events", Some(ADMIN)).await.0, 200);
    assert_eq!(get(&app, "/v1/events", Some("other-token")).await.0, 200, "either configured token");
    app.stop().await;
}

async fn staff_opt_out_is_recorded_relayed_and_visible(b: Backend) {
    let app = spawn_app_with(b, with_admin).await;
    let (status, rec) = post(
        &app,
        "/v1/opt-outs",
        json!({"phone": "(415) 555-0177", "note": "called the front desk", "source": "desk:amy"}),
    )
    .await;
    assert_eq!(status, 201, "{rec}");
    assert_eq!(rec["kind"], "opt_out");

    // The sink is tried once (REDCap unreachable) and, older than max_age, the phone is given up on.
    let status = wait_for(&app, "/v1/phones/4155550177", |v| v["sinks"][0]["status"] == "dead").await;
    assert_eq!(status["phone"], "+14155550177");
    assert_eq!(status["opted_out"], true);
    assert_eq!(status["states"][0]["scope"], "organisation");
    assert_eq!(status["scopes"][0]["scope"], "organisation");
    assert_eq!(status["scopes"][0]["by_organisation"], true);
    assert_eq!(status["events"][0]["source"], "staff:desk:amy");
    assert_eq!(status["events"][0]["body"], "called the front desk");
    let sink = &status["sinks"][0];
    assert_eq!(sink["sink"], "redcap");
    assert_eq!(sink["target"]["opted_out"], true);
    assert_eq!(sink["target"]["since"], status["states"][0]["since"], "{status}");
    assert!(sink["written"].is_null(), "nothing was ever written: {sink}");
    assert_eq!(sink["in_sync"], false);
    assert!(!sink["last_error"].as_str().unwrap().is_empty(), "{sink}");

    // Opt back in: the newest event wins.
    let (status, _) = post(&app, "/v1/opt-ins", json!({"phone": "+1 415 555 0177", "source": "desk:amy"})).await;
    assert_eq!(status, 201);
    let (_, s) = get(&app, "/v1/phones/+14155550177", Some(ADMIN)).await;
    assert_eq!(s["opted_out"], false);
    assert_eq!(s["events"][0]["kind"], "opt_in", "newest first");
    assert_eq!(s["sinks"][0]["target"], json!({"opted_out": false, "since": null}));
    assert_eq!(s["sinks"][0]["in_sync"], true, "nothing of ours to clear: {s}");

    // Bad input is a clear 400.
    assert_eq!(post(&app, "/v1/opt-outs", json!({"phone": "not a phone", "source": "x"})).await.0, 400);
    assert_eq!(post(&app, "/v1/opt-outs", json!({"phone": "4155550177"})).await.0, 400, "source is required");
    assert_eq!(post(&app, "/v1/opt-outs", json!({"phone": "4155550177", "source": " "})).await.0, 400);
    assert_eq!(get(&app, "/v1/phones/hello", Some(ADMIN)).await.0, 400);
    app.stop().await;
}

/// When a (sink, phone) row last changed (for a dead one: when it died), from its JSON.
fn died_at(row: &Value) -> DateTime<Utc> {
    row["updated_at"].as_str().expect("updated_at").parse().expect("an RFC 3339 time")
}

async fn events_and_deliveries_are_listed_with_filters_and_pages(b: Backend) {
    // A REDCap that answers 500 to every call: each attempt shows in the fake's call log.
    let project = FakeProject::new(
        &"A".repeat(32),
        &[("record_id", "contact", ""), ("phone", "contact", ""), ("opted_out_at", "contact", "")],
    );
    let fake = FakeRedcap::start(project).await;
    fake.set_fault(Fault::Status500);
    let app = spawn_app_with(b, |c| {
        with_admin(c);
        c.redcap = Some(redcap_config(&fake.url));
    })
    .await;
    assert_eq!(get(&app, "/v1/deliveries?status=sent", Some(ADMIN)).await.0, 400);
    for i in 0..5 {
        let from = format!("+1415555{:04}", 3000 + i);
        let kind = if i % 2 == 0 { "STOP" } else { "START" };
        assert_eq!(
            app.post_signed(&stop_params(&format!("SMad{i}"), &from, kind, Some(kind)), TOKEN).await.status(),
            200
        );
    }
    let (_, page) = get(&app, "/v1/events?limit=2", Some(ADMIN)).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    let after = page["next_after"].as_i64().unwrap();
    let (_, page2) = get(&app, &format!("/v1/events?limit=2&after={after}"), Some(ADMIN)).await;
    assert_eq!(page2["items"][0]["id"].as_i64().unwrap(), after + 1);
    let (_, outs) = get(&app, "/v1/events?kind=opt_out", Some(ADMIN)).await;
    assert_eq!(outs["items"].as_array().unwrap().len(), 3);
    assert!(outs["next_after"].is_null());
    let (_, one) = get(&app, "/v1/events?phone=(415)%20555-3001", Some(ADMIN)).await;
    assert_eq!(one["items"].as_array().unwrap().len(), 1);
    let (_, future) = get(&app, "/v1/events?since=2999-01-01T00:00:00Z", Some(ADMIN)).await;
    assert_eq!(future["items"].as_array().unwrap().len(), 0);
    assert_eq!(get(&app, "/v1/events?kind=maybe", Some(ADMIN)).await.0, 400);
    assert_eq!(get(&app, "/v1/deliveries?status=lost", Some(ADMIN)).await.0, 400);

    // The three STOPs are tried and given up on; the two STARTs are for phones
    // nothing was ever written for: nothing to clear, no call, done (the sink
    // is taken to hold "opted in").
    let dead = wait_for(&app, "/v1/deliveries?status=dead&sink=redcap", |v| {
        v["items"].as_array().is_some_and(|a| a.len() == 3)
    })
    .await;
    let (_, done) = get(&app, "/v1/deliveries?status=done", Some(ADMIN)).await;
    let done = done["items"].as_array().unwrap();
    assert_eq!(done.len(), 2, "{done:?}");
    assert!(
        done.iter().all(|d| d["written_opted_out"] == false && d["result"].is_null() && d["attempts"] == 0),
        "{done:?}"
    );
    let items = dead["items"].as_array().unwrap().clone();
    let first = items[0]["id"].as_i64().unwrap();
    let calls_before = fake.calls();

    // Retry one: it is attempted again (a new call to REDCap) and dies again, later; the others stay as they were.
    let (status, body) = post(&app, &format!("/v1/deliveries/{first}/retry"), json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"id": first, "status": "pending"}));
    assert_eq!(post(&app, "/v1/deliveries/999999/retry", json!({})).await.0, 404);
    let again = wait_for(&app, "/v1/deliveries?status=dead", |v| {
        v["items"].as_array().is_some_and(|a| a.iter().any(|d| d["id"] == first && died_at(d) > died_at(&items[0])))
    })
    .await;
    assert!(fake.calls() > calls_before, "the retried row never reached REDCap");
    let again = again["items"].as_array().unwrap();
    assert_eq!(again.len(), 3);
    let retried = again.iter().find(|d| d["id"] == first).unwrap();
    assert_eq!(retried["attempts"], 1, "attempts start over, and one was made: {retried}");
    assert!(retried["last_error"].as_str().unwrap().contains("500"), "{retried}");
    for before in &items[1..] {
        let now = again.iter().find(|d| d["id"] == before["id"]).unwrap();
        assert_eq!(now, before, "only the retried row changes");
    }
    // Filters by phone, in any format.
    let (_, one) = get(&app, "/v1/deliveries?phone=(415)%20555-3001", Some(ADMIN)).await;
    let one = one["items"].as_array().unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0]["phone"], "+14155553001");

    // Then all of them: each is attempted again.
    let calls_before = fake.calls();
    let (status, body) = post(&app, "/v1/deliveries/retry-dead", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(body["requeued"], 3);
    let retried_at = died_at(retried);
    wait_for(&app, "/v1/deliveries?status=dead", |v| {
        v["items"].as_array().is_some_and(|a| a.len() == 3 && a.iter().all(|d| died_at(d) > retried_at))
    })
    .await;
    assert!(fake.calls() > calls_before, "the dead rows never reached REDCap again");
    app.stop().await;
}

/// Per sink, the target against what was last written, and when: a sink
/// that follows another scope is not concerned (opted in, nothing written,
/// in sync).
async fn a_phone_shows_each_sinks_target_against_what_was_written(b: Backend) {
    let fake = fake_with_record("(415) 555-0190").await;
    let app = spawn_app_with(b, |c| {
        with_admin(c);
        c.relay.max_age = optout_relay::config::RelayConfig::default().max_age;
        c.redcap = Some(redcap_of(&fake));
        let mut other = redcap_of(&fake);
        other.scopes = Some(vec![SERVICE_A.to_owned()]);
        c.sinks.insert("study_a".to_owned(), optout_relay::config::SinkConfig::Redcap(other));
    })
    .await;
    assert_eq!(app.post_signed(&stop_params("SMph1", "+14155550190", "STOP", None), TOKEN).await.status(), 200);
    let status = wait_for(&app, "/v1/phones/4155550190", |v| v["sinks"][0]["in_sync"] == true).await;
    assert!(fake.value("1", None, FIELD).is_some_and(|v| !v.is_empty()), "stamped");
    assert_eq!(status["opted_out"], true);
    assert_eq!(status["scopes"].as_array().unwrap().len(), 1);
    assert_eq!(status["scopes"][0]["scope"], SERVICE);
    assert_eq!(status["scopes"][0]["opted_out"], true);
    assert_eq!(status["scopes"][0]["by_organisation"], false);
    assert_eq!(status["states"][0]["scope"], SERVICE);
    let sinks = status["sinks"].as_array().unwrap();
    let names: Vec<&str> = sinks.iter().map(|s| s["sink"].as_str().unwrap()).collect();
    assert_eq!(names, ["redcap", "study_a"], "every configured sink");
    let redcap = &sinks[0];
    assert_eq!(redcap["status"], "done");
    assert_eq!(redcap["target"]["opted_out"], true);
    assert_eq!(redcap["written"], redcap["target"], "written what it should hold: {redcap}");
    assert!(redcap["written_at"].is_string(), "{redcap}");
    assert_eq!(redcap["uncertain"], false);
    let study_a = &sinks[1];
    assert_eq!(study_a["target"], json!({"opted_out": false, "since": null}), "it follows another service");
    assert!(study_a["written"].is_null());
    assert_eq!((study_a["in_sync"].clone(), study_a["status"].clone()), (json!(true), json!("none")), "{study_a}");
    assert_eq!(status["events"][0]["message_sid"], "SMph1");
    app.stop().await;
}

/// `/v1/sinks`: every configured sink, its health, how many phones wait for
/// it and for how long.
async fn sinks_are_listed_with_their_health_and_backlog(b: Backend) {
    let fake = fake_with_record("4155550191").await;
    let app = spawn_app_with(b, |c| {
        with_admin(c);
        c.relay.max_age = optout_relay::config::RelayConfig::default().max_age;
        // Down, for good: REDCap refuses every connection.
        c.redcap = Some(redcap_config("http://127.0.0.1:9/api/"));
        let mut other = redcap_of(&fake);
        other.scopes = Some(vec![SERVICE_A.to_owned()]);
        c.sinks.insert("study_a".to_owned(), optout_relay::config::SinkConfig::Redcap(other));
    })
    .await;
    assert_eq!(get(&app, "/v1/sinks", None).await.0, 401);
    assert_eq!(app.post_signed(&stop_params("SMsk1", "+14155550191", "STOP", None), TOKEN).await.status(), 200);
    let list = wait_for(&app, "/v1/sinks", |v| v[0]["health"] == "backing_off").await;
    let sinks = list.as_array().unwrap();
    assert_eq!(sinks.len(), 2, "{list}");
    let down = &sinks[0];
    assert_eq!((down["name"].as_str(), down["type"].as_str()), (Some("redcap"), Some("redcap")));
    assert!(down["waiting"].as_i64().unwrap() >= 1, "{down}");
    assert!(down["oldest_waiting_seconds"].as_i64().is_some_and(|s| s >= 0), "{down}");
    assert!(down["failing_since"].is_string() && down["next_probe_at"].is_string(), "{down}");
    assert!(!down["last_error"].as_str().unwrap().is_empty(), "{down}");
    assert_eq!(down["dead"], 0);
    let up = &sinks[1];
    assert_eq!((up["name"].as_str(), up["health"].as_str()), (Some("study_a"), Some("ok")), "{up}");
    assert_eq!(up["waiting"], 0, "it does not follow the STOP's service");
    assert!(up["oldest_waiting_seconds"].is_null() && up["failing_since"].is_null(), "{up}");
    app.stop().await;
}

/// `POST /v1/sinks/{name}/retry` ends a backoff: the next probe goes now,
/// not after the hour the sink was told to wait.
async fn a_sink_is_released_from_its_backoff_on_demand(b: Backend) {
    let fake = fake_with_record("4155550192").await;
    fake.set_fault(Fault::Status500);
    let app = spawn_app_with(b, |c| {
        with_admin(c);
        c.relay.max_age = optout_relay::config::RelayConfig::default().max_age;
        c.relay.retry_base = Duration::from_secs(3600);
        c.relay.retry_cap = Duration::from_secs(3600);
        c.redcap = Some(redcap_of(&fake));
    })
    .await;
    assert_eq!(app.post_signed(&stop_params("SMrl1", "+14155550192", "STOP", None), TOKEN).await.status(), 200);
    let list = wait_for(&app, "/v1/sinks", |v| v[0]["health"] == "backing_off").await;
    let next: DateTime<Utc> = list[0]["next_probe_at"].as_str().unwrap().parse().unwrap();
    assert!(next > Utc::now() + chrono::Duration::minutes(30), "backing off for long: {next}");
    // (A second worker that passed the health gate before the failure was
    // recorded may still make one call: let it.)
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = fake.calls();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fake.calls(), calls, "no call while backing off");

    assert_eq!(app.client.post(app.url("/v1/sinks/redcap/retry")).send().await.unwrap().status(), 401);
    let (status, body) = post(&app, "/v1/sinks/nosuch/retry", json!({})).await;
    assert_eq!(status, 404, "{body}");
    fake.set_fault(Fault::None);
    let before = Utc::now();
    let (status, body) = post(&app, "/v1/sinks/redcap/retry", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["sink"], "redcap");
    eventually("a probe soon after the retry", || async { fake.calls() > calls }).await;
    eventually("stamped", || async { fake.value("1", None, FIELD).is_some_and(|v| !v.is_empty()) }).await;
    let list = wait_for(&app, "/v1/sinks", |v| v[0]["health"] == "ok").await;
    assert_eq!(list[0]["waiting"], 0, "{list}");
    assert!(Utc::now() - before < chrono::Duration::minutes(5));
    app.stop().await;
}

async fn openapi_document_describes_the_api(b: Backend) {
    let app = spawn_app_with(b, with_admin).await;
    let (status, doc) = get(&app, "/v1/openapi.json", Some(ADMIN)).await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/phones/{phone}",
        "/v1/sinks",
        "/v1/sinks/{name}/retry",
        "/v1/events",
        "/v1/deliveries",
        "/v1/deliveries/{id}/retry",
        "/v1/deliveries/retry-dead",
        "/v1/opt-outs",
        "/v1/opt-ins",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
    for schema in ["PhoneStatus", "SinkTarget", "SinkStatus", "DeliveryRow", "Held", "Effective"] {
        assert!(doc["components"]["schemas"][schema].is_object(), "schema {schema} missing");
    }
    let phone = &doc["components"]["schemas"]["PhoneStatus"]["properties"];
    for field in ["scopes", "states", "sinks", "events", "opted_out"] {
        assert!(phone[field].is_object(), "PhoneStatus.{field} missing: {phone}");
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    app.stop().await;
}

both_backends!(
    admin_api_is_absent_without_tokens,
    bearer_token_is_required,
    staff_opt_out_is_recorded_relayed_and_visible,
    events_and_deliveries_are_listed_with_filters_and_pages,
    a_phone_shows_each_sinks_target_against_what_was_written,
    sinks_are_listed_with_their_health_and_backlog,
    a_sink_is_released_from_its_backoff_on_demand,
    openapi_document_describes_the_api,
);
