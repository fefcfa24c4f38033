//! Free-text revocations for review: a message that is no keyword but reads
//! like one ("please stop texting me") is held for staff, listed by
//! `GET /v1/reviews`, decided once by `POST /v1/reviews/{id}`; an opt-out
//! decision is relayed like any other. One item per MessageSid whichever
//! way the message came in.

use std::time::Duration;

use optout_relay::config::{Config, EmailConfig, EmailTls, ReviewPolicy, TwilioConfig};
use optout_relay::reconcile::{listings, Reconciler};
use optout_relay::twilio::keywords::Keywords;
use optout_relay::twilio::messages::MessagesClient;
use secrecy::SecretString;
use serde_json::{json, Value};

use crate::both_backends;
use crate::common::fake_redcap::{FakeProject, FakeRedcap};
use crate::common::fake_smtp::FakeSmtp;
use crate::common::fake_twilio::{FakeMessage, FakeTwilio, ACCOUNT, AUTH_TOKEN};
use crate::common::*;

const ADMIN: &str = "admin-token-for-review-tests";
const REDCAP_TOKEN: &str = "0123456789ABCDEF0123456789ABCDEF";
const FIELD: &str = "opted_out_at";

fn with_admin(c: &mut Config) {
    c.admin.tokens = vec![SecretString::from(ADMIN)];
}

async fn get_json(app: &TestApp, path: &str) -> (u16, Value) {
    let res = app.client.get(app.url(path)).bearer_auth(ADMIN).send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn decide(app: &TestApp, id: &Value, body: Value) -> (u16, Value) {
    let res =
        app.client.post(app.url(&format!("/v1/reviews/{id}"))).bearer_auth(ADMIN).json(&body).send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// The whole flow: a webhook with "please stop texting me" (retried once)
/// → one pending item, nothing relayed, a mail to staff → an `opt_out`
/// decision → a staff opt-out stamped in REDCap; a second decision is 409.
async fn a_free_text_revocation_is_held_decided_and_relayed(b: Backend) {
    let project = FakeProject::new(
        REDCAP_TOKEN,
        &[("study_id", "enrol", ""), ("phone", "enrol", ""), (FIELD, "enrol", "datetime_seconds_ymd")],
    )
    .with_record("1", None, &[("phone", "(415) 555-6001")]);
    let redcap = FakeRedcap::start(project).await;
    let smtp = FakeSmtp::start().await;
    let (redcap_url, smtp_port) = (redcap.url.clone(), smtp.port());
    let app = spawn_app_with(b, move |c| {
        with_admin(c);
        let mut r = redcap_config(&redcap_url);
        r.token = SecretString::from(REDCAP_TOKEN);
        r.optout_field = FIELD.into();
        c.redcap = Some(r);
        c.email = Some(EmailConfig {
            smtp_port: Some(smtp_port),
            tls: EmailTls::None,
            timezone: "UTC".into(),
            report_wait: Duration::from_millis(200),
            ..EmailConfig::new("127.0.0.1", "relay@example.org", vec!["staff@example.org".into()])
        });
        c.relay.poll_interval = Duration::from_millis(50);
    })
    .await;

    let params = stop_params("SMrev00000000000000000000000000001", "+14155556001", "please stop texting me", None);
    assert_eq!(app.post_signed(&params, TOKEN).await.status(), 200);
    assert_eq!(app.post_signed(&params, TOKEN).await.status(), 200, "a retried webhook is answered the same");

    let (status, pending) = get_json(&app, "/v1/reviews").await;
    assert_eq!(status, 200);
    let items = pending.as_array().expect("an array");
    assert_eq!(items.len(), 1, "one item per MessageSid: {pending}");
    let item = &items[0];
    assert_eq!(item["phone"], "+14155556001");
    assert_eq!(item["body"], "please stop texting me");
    assert_eq!(item["scope"], SERVICE);
    assert_eq!(item["matched"], "stop");
    assert_eq!(item["status"], "pending");
    assert!(item["time"].as_str().is_some_and(|t| t.starts_with("20")), "{item}");
    assert_eq!(event_count(&app.store).await, 0, "nothing is recorded as an opt-out before staff decide");
    assert_eq!(opted_out(&app.store, "+14155556001").await, None);

    // Staff hear of it by mail.
    let mail = eventually_some("the review mail", || async {
        smtp.messages().into_iter().find(|m| m.header("Subject").is_some_and(|s| s.contains("review")))
    })
    .await;
    assert_eq!(mail.header("Subject").as_deref(), Some("[optout-relay] review: 1 message may revoke consent"));
    assert!(mail.body().contains("\"please stop texting me\""), "{}", mail.body());
    assert!(mail.body().contains("+14155556001"), "{}", mail.body());
    assert_eq!(redcap.value("1", None, FIELD).unwrap_or_default(), "", "not relayed before the decision");

    let (status, decided) =
        decide(&app, &item["id"], json!({"decision": "opt_out", "note": "called back, confirmed"})).await;
    assert_eq!(status, 200, "{decided}");
    assert_eq!(decided["status"], "opted_out");
    assert_eq!(decided["note"], "called back, confirmed");
    let event_id = decided["event_id"].as_i64().expect("the opt-out recorded");

    let events = events(&app.store).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].id, event_id);
    assert_eq!((events[0].kind.as_str(), events[0].source.as_str()), ("opt_out", "staff:review"));
    assert_eq!(events[0].scope, SERVICE);
    assert_eq!(
        events[0].received_at.to_rfc3339(),
        item["time"]
            .as_str()
            .map(|t| { chrono::DateTime::parse_from_rfc3339(t).unwrap().with_timezone(&chrono::Utc).to_rfc3339() })
            .unwrap(),
        "said when the person said it"
    );
    assert_eq!(opted_out(&app.store, "+14155556001").await, Some(true));
    eventually_some("REDCap stamped", || async { redcap.value("1", None, FIELD).filter(|v| !v.is_empty()) }).await;

    let (status, again) = decide(&app, &item["id"], json!({"decision": "dismiss"})).await;
    assert_eq!(status, 409, "{again}");
    assert_eq!(again["code"], "conflict");
    assert_eq!(get_json(&app, "/v1/reviews").await.1, json!([]), "nothing pending");
    assert_eq!(event_count(&app.store).await, 1);
    app.stop().await;
}

/// A dismissal records nothing; unknown ids, bad decisions and missing
/// tokens get their answers; the gauges are on /metrics.
async fn dismissal_and_refusals(b: Backend) {
    let app = spawn_app_with(b, with_admin).await;
    let params = stop_params("SMrev00000000000000000000000000002", "+14155556002", "Remove me from this list!", None);
    assert_eq!(app.post_signed(&params, TOKEN).await.status(), 200);
    let (_, pending) = get_json(&app, "/v1/reviews").await;
    let id = pending[0]["id"].clone();
    assert_eq!(pending[0]["matched"], "remove me");

    assert_eq!(app.client.get(app.url("/v1/reviews")).send().await.unwrap().status(), 401);
    assert_eq!(decide(&app, &id, json!({"decision": "maybe"})).await.0, 400);
    assert_eq!(decide(&app, &json!(999_999), json!({"decision": "dismiss"})).await.0, 404);
    let text = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("optout_reviews_pending "), "{text}");
    assert!(text.contains("optout_oldest_pending_review_age_seconds "), "{text}");

    let (status, decided) = decide(&app, &id, json!({"decision": "dismiss", "note": "asked to move a visit"})).await;
    assert_eq!(status, 200, "{decided}");
    assert_eq!(decided["status"], "dismissed");
    assert_eq!(decided["event_id"], Value::Null);
    assert_eq!(decide(&app, &id, json!({"decision": "opt_out"})).await.0, 409);
    assert_eq!(event_count(&app.store).await, 0, "a dismissal records nothing");
    assert_eq!(get_json(&app, "/v1/reviews").await.1, json!([]));

    let doc = get_json(&app, "/v1/openapi.json").await.1;
    assert!(doc["paths"]["/v1/reviews"]["get"].is_object(), "documented");
    assert!(doc["paths"]["/v1/reviews/{id}"]["post"].is_object(), "documented");
    app.stop().await;
}

/// `review_policy = "opt_out"` relays such a message at once; `"ignore"`
/// drops it; whole words only ("weekend" is no "end") under any policy.
async fn the_review_policy_decides(b: Backend) {
    let app = spawn_app_with(b, |c| {
        with_admin(c);
        c.keywords.review_policy = ReviewPolicy::OptOut;
    })
    .await;
    let p = stop_params("SMrev00000000000000000000000000003", "+14155556003", "pls stop texting me", None);
    assert_eq!(app.post_signed(&p, TOKEN).await.status(), 200);
    let p = stop_params("SMrev00000000000000000000000000004", "+14155556004", "see you this weekend", None);
    assert_eq!(app.post_signed(&p, TOKEN).await.status(), 200);
    let events = events(&app.store).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (events[0].message_sid.as_str(), events[0].kind.as_str()),
        ("SMrev00000000000000000000000000003", "opt_out")
    );
    assert_eq!(opted_out(&app.store, "+14155556003").await, Some(true));
    assert_eq!(get_json(&app, "/v1/reviews").await.1, json!([]));
    app.stop().await;

    let app = spawn_app_with(b, |c| {
        with_admin(c);
        c.keywords.review_policy = ReviewPolicy::Ignore;
    })
    .await;
    let p = stop_params("SMrev00000000000000000000000000005", "+14155556005", "pls stop texting me", None);
    assert_eq!(app.post_signed(&p, TOKEN).await.status(), 200);
    assert_eq!(event_count(&app.store).await, 0);
    assert_eq!(get_json(&app, "/v1/reviews").await.1, json!([]));
    app.stop().await;
}

/// The webhook and reconciliation classify alike: the log's copy of a held
/// message makes no second item; a message only the log has becomes one.
async fn one_item_per_message_across_sources(b: Backend) {
    let app = spawn_app_with(b, with_admin).await;
    let sid = "SMrev00000000000000000000000000006";
    let p = stop_params(sid, "+14155556006", "Please don't text me anymore", None);
    assert_eq!(app.post_signed(&p, TOKEN).await.status(), 200);
    let now = chrono::Utc::now();
    let fake = FakeTwilio::start(vec![
        FakeMessage::inbound(sid, "+14155556006", "Please don't text me anymore", now - chrono::Duration::minutes(5)),
        FakeMessage::inbound("SMrev00000000000000000000000000007", "+14155556007", "I want to opt-out", now),
    ])
    .await;
    let cfg = TwilioConfig {
        account_sid: Some(ACCOUNT.into()),
        api_base: fake.base.clone(),
        auth_tokens: vec![SecretString::from(AUTH_TOKEN)],
        ..TwilioConfig::default()
    };
    let keywords = Keywords::new(&optout_relay::config::KeywordsConfig::default());
    let reconciler = Reconciler::new(
        MessagesClient::from_config(&cfg).unwrap(),
        app.store.clone(),
        keywords,
        phonenumber::country::Id::US,
        true,
        None,
    );
    let summary = reconciler.run(&listings(&[], now.date_naive() - chrono::Duration::days(1), None)).await.unwrap();
    assert_eq!(summary.new_reviews, 1, "{summary:?}");
    let (_, pending) = get_json(&app, "/v1/reviews").await;
    let items = pending.as_array().unwrap();
    let mut sids: Vec<&str> = items.iter().filter_map(|i| i["message_sid"].as_str()).collect();
    sids.sort_unstable();
    assert_eq!(sids, [sid, "SMrev00000000000000000000000000007"], "{pending}");
    let from_log = items.iter().find(|i| i["message_sid"] == "SMrev00000000000000000000000000007").unwrap();
    assert_eq!(from_log["source"], "reconcile");
    assert_eq!(from_log["matched"], "opt out");
    assert_eq!(event_count(&app.store).await, 0);
    app.stop().await;
}

both_backends!(
    a_free_text_revocation_is_held_decided_and_relayed,
    dismissal_and_refusals,
    the_review_policy_decides,
    one_item_per_message_across_sources,
);
