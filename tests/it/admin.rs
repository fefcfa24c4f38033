//! The admin API over real HTTP, against both stores.

use std::time::Duration;

use crate::both_backends;
use crate::common::fake_redcap::{FakeProject, FakeRedcap, Fault};
use crate::common::*;
use chrono::{DateTime, Utc};
use secrecy::SecretString;
use serde_json::{json, Value};

const ADMIN: &str = "admin-token-for-tests";

fn with_admin(c: &mut optout_relay::config::Config) {
    c.admin.tokens = vec![SecretString::from("other-token"), SecretString::from(ADMIN)];
    // A REDCap that is never there, tried once: deliveries die fast.
    c.redcap = Some(redcap_config("http://127.0.0.1:9/api/"));
    c.relay.max_attempts = 1;
    c.relay.poll_interval = Duration::from_millis(50);
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

    // The delivery is attempted once (REDCap unreachable) and dead-lettered.
    let status = wait_for(&app, "/v1/phones/4155550177", |v| v["events"][0]["deliveries"][0]["status"] == "dead").await;
    assert_eq!(status["phone"], "+14155550177");
    assert_eq!(status["opted_out"], true);
    assert_eq!(status["states"][0]["scope"], "organisation");
    assert_eq!(status["events"][0]["source"], "staff:desk:amy");
    assert_eq!(status["events"][0]["body"], "called the front desk");
    assert_eq!(status["events"][0]["deliveries"][0]["sink"], "redcap");
    assert!(status["events"][0]["deliveries"][0]["last_error"].as_str().unwrap().contains("gave up"));

    // Opt back in: the newest event wins.
    let (status, _) = post(&app, "/v1/opt-ins", json!({"phone": "+1 415 555 0177", "source": "desk:amy"})).await;
    assert_eq!(status, 201);
    let (_, s) = get(&app, "/v1/phones/+14155550177", Some(ADMIN)).await;
    assert_eq!(s["opted_out"], false);
    assert_eq!(s["events"][0]["kind"], "opt_in", "newest first");

    // Bad input is a clear 400.
    assert_eq!(post(&app, "/v1/opt-outs", json!({"phone": "not a phone", "source": "x"})).await.0, 400);
    assert_eq!(post(&app, "/v1/opt-outs", json!({"phone": "4155550177"})).await.0, 400, "source is required");
    assert_eq!(post(&app, "/v1/opt-outs", json!({"phone": "4155550177", "source": " "})).await.0, 400);
    assert_eq!(get(&app, "/v1/phones/hello", Some(ADMIN)).await.0, 400);
    app.stop().await;
}

/// When a delivery died, from its JSON.
fn died_at(delivery: &Value) -> DateTime<Utc> {
    delivery["completed_at"].as_str().expect("a dead delivery has completed_at").parse().expect("an RFC 3339 time")
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

    let dead = wait_for(&app, "/v1/deliveries?status=dead&sink=redcap", |v| {
        v["items"].as_array().is_some_and(|a| a.len() == 5)
    })
    .await;
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
    assert!(fake.calls() > calls_before, "the retried delivery never reached REDCap");
    let again = again["items"].as_array().unwrap();
    assert_eq!(again.len(), 5);
    let retried = again.iter().find(|d| d["id"] == first).unwrap();
    assert_eq!(retried["attempts"], 1, "attempts start over, and one was made: {retried}");
    assert!(retried["last_error"].as_str().unwrap().contains("500"), "{retried}");
    for before in &items[1..] {
        let now = again.iter().find(|d| d["id"] == before["id"]).unwrap();
        assert_eq!(now, before, "only the retried delivery changes");
    }

    // Then all of them: each is attempted again.
    let calls_before = fake.calls();
    let (status, body) = post(&app, "/v1/deliveries/retry-dead", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(body["requeued"], 5);
    let retried_at = died_at(retried);
    wait_for(&app, "/v1/deliveries?status=dead", |v| {
        v["items"].as_array().is_some_and(|a| a.len() == 5 && a.iter().all(|d| died_at(d) > retried_at))
    })
    .await;
    assert!(fake.calls() > calls_before, "the dead deliveries never reached REDCap again");
    app.stop().await;
}

async fn openapi_document_describes_the_api(b: Backend) {
    let app = spawn_app_with(b, with_admin).await;
    let (status, doc) = get(&app, "/v1/openapi.json", Some(ADMIN)).await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/phones/{phone}",
        "/v1/events",
        "/v1/deliveries",
        "/v1/deliveries/{id}/retry",
        "/v1/deliveries/retry-dead",
        "/v1/opt-outs",
        "/v1/opt-ins",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
    assert!(doc["components"]["schemas"]["PhoneStatus"].is_object());
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    app.stop().await;
}

both_backends!(
    admin_api_is_absent_without_tokens,
    bearer_token_is_required,
    staff_opt_out_is_recorded_relayed_and_visible,
    events_and_deliveries_are_listed_with_filters_and_pages,
    openapi_document_describes_the_api,
);
