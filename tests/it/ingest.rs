//! The webhook endpoint, as Twilio and as a forger would call it, against
//! both stores. Each test reads as a line of the specification.

use crate::both_backends;
use crate::common::*;
use optout_relay::domain::Phone;
use optout_relay::twilio::signature::{compute, compute_sha256};
use secrecy::SecretString;

const EMPTY_TWIML: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response></Response>";

fn phone(s: &str) -> Phone {
    Phone::parse(s, phonenumber::country::Id::US).unwrap()
}

async fn stop_is_recorded_and_answered_with_empty_twiml(b: Backend) {
    let app = spawn_app(b).await;
    let res = app.post_signed(&stop_params("SM0001", "+14155550101", "STOP", Some("STOP")), TOKEN).await;
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/xml"));
    assert_eq!(res.text().await.unwrap(), EMPTY_TWIML);
    assert_eq!(event_count(&app.store).await, 1);
    assert_eq!(opted_out(&app.store, "+14155550101").await, Some(true));
    app.stop().await;
}

async fn start_clears_and_help_changes_nothing(b: Backend) {
    let app = spawn_app(b).await;
    let from = "+14155550102";
    for (sid, body, t) in [("SM1", "STOP", "STOP"), ("SM2", "HELP", "HELP"), ("SM3", "START", "START")] {
        let res = app.post_signed(&stop_params(sid, from, body, Some(t)), TOKEN).await;
        assert_eq!(res.status(), 200, "{sid}");
    }
    assert_eq!(event_count(&app.store).await, 3, "help is recorded too");
    assert_eq!(opted_out(&app.store, from).await, Some(false));
    // HELP after START leaves the state alone.
    app.post_signed(&stop_params("SM4", from, "info", Some("HELP")), TOKEN).await;
    assert_eq!(opted_out(&app.store, from).await, Some(false));
    app.stop().await;
}

async fn keywords_count_without_opt_out_type(b: Backend) {
    let app = spawn_app(b).await;
    for (i, body) in ["Stop.", "STOP!", "opt out", "Revoke", "unsubscribe "].iter().enumerate() {
        let from = format!("+1415555020{i}");
        let res = app.post_signed(&stop_params(&format!("SMk{i}"), &from, body, None), TOKEN).await;
        assert_eq!(res.status(), 200);
        assert_eq!(opted_out(&app.store, &from).await, Some(true), "{body}");
    }
    app.stop().await;
}

async fn other_messages_are_answered_but_not_recorded(b: Backend) {
    let app = spawn_app(b).await;
    for (i, body) in ["please stop texting me", "Stop ✋ por favor", "", "what?"].iter().enumerate() {
        let res = app.post_signed(&stop_params(&format!("SMo{i}"), "+14155550103", body, None), TOKEN).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.text().await.unwrap(), EMPTY_TWIML);
    }
    assert_eq!(event_count(&app.store).await, 0);
    app.stop().await;
}

async fn unsigned_or_wrongly_signed_requests_are_refused(b: Backend) {
    let app = spawn_app(b).await;
    let params = stop_params("SMx1", "+14155550104", "STOP", Some("STOP"));
    let body = encode(&params);
    let form = "application/x-www-form-urlencoded";
    // No signature.
    let res = app.post_raw("/twilio/messages", body.clone(), form, None, &[]).await;
    assert_eq!(res.status(), 403);
    assert_eq!(res.text().await.unwrap(), "", "no detail for a forger");
    // Signed with another token.
    assert_eq!(app.post_signed(&params, "not-the-token").await.status(), 403);
    // Garbage signature.
    assert_eq!(app.post_raw("/twilio/messages", body.clone(), form, Some("%%%"), &[]).await.status(), 403);
    // Right token, one value changed after signing.
    let sig = compute(TOKEN, &format!("{PUBLIC_URL}/twilio/messages"), &params);
    let forged = body.replace("%2B14155550104", "%2B14155550105");
    assert_eq!(app.post_raw("/twilio/messages", forged, form, Some(&sig), &[]).await.status(), 403);
    // Right token, signed over another host.
    let other = compute(TOKEN, "https://evil.example.org/twilio/messages", &params);
    assert_eq!(app.post_raw("/twilio/messages", body, form, Some(&other), &[]).await.status(), 403);
    assert_eq!(event_count(&app.store).await, 0);
    app.stop().await;
}

async fn signature_quirks_are_all_accepted(b: Backend) {
    let app = spawn_app_with(b, |c| {
        c.server.alternate_public_urls = vec!["https://fallback.example.org/".to_owned()];
    })
    .await;
    let form = "application/x-www-form-urlencoded";
    let mut n = 0;
    let mut send = |url_signed: String, path: &'static str, extra: Vec<(String, String)>| {
        n += 1;
        let mut params = stop_params(&format!("SMq{n}"), &format!("+1415555030{n}"), "STOP", Some("STOP"));
        params.extend(extra);
        let sig = compute(TOKEN, &url_signed, &params);
        let app = &app;
        async move { app.post_raw(path, encode(&params), form, Some(&sig), &[]).await.status() }
    };
    // Default port added by Twilio.
    assert_eq!(
        send("https://optout.example.org:443/twilio/messages".to_owned(), "/twilio/messages", vec![]).await,
        200
    );
    // Query string kept as received, percent-escapes not decoded.
    assert_eq!(
        send(format!("{PUBLIC_URL}/twilio/messages?src=a%27b&x=1"), "/twilio/messages?src=a%27b&x=1", vec![]).await,
        200
    );
    // Repeated keys and empty values.
    let extra = vec![
        ("Tag".into(), "b".into()),
        ("Tag".into(), "a".into()),
        ("Tag".into(), "a".into()),
        ("Empty".into(), String::new()),
    ];
    assert_eq!(send(format!("{PUBLIC_URL}/twilio/messages"), "/twilio/messages", extra).await, 200);
    // Unicode and reserved characters in a value; a field Twilio added without notice.
    let extra = vec![("Body2".into(), "Stop ✋ & = + %".into()), ("NewTwilioField".into(), "x".into())];
    assert_eq!(send(format!("{PUBLIC_URL}/twilio/messages"), "/twilio/messages", extra).await, 200);
    // The fallback URL Twilio calls when the primary fails is signed over itself.
    assert_eq!(send("https://fallback.example.org/twilio/messages".into(), "/twilio/messages", vec![]).await, 200);
    assert_eq!(event_count(&app.store).await, 5);
    // A raw quote in the query (an HTTP client library would escape it, Twilio does not).
    let params = stop_params("SMquote", "+14155550399", "STOP", Some("STOP"));
    let sig = compute(TOKEN, &format!("{PUBLIC_URL}/twilio/messages?test=param'WithQuote"), &params);
    let status = raw_post(app.addr, "/twilio/messages?test=param'WithQuote", &encode(&params), &sig).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(event_count(&app.store).await, 6);
    app.stop().await;
}

/// Sends a request byte for byte (no client-side URL normalisation); returns the status line.
async fn raw_post(addr: std::net::SocketAddr, path: &str, body: &str, sig: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: optout.example.org\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         X-Twilio-Signature: {sig}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.lines().next().unwrap_or_default().to_owned()
}

async fn shared_key_signatures_use_hmac_sha256(b: Backend) {
    let app = spawn_app_with(b, |c| {
        c.twilio.shared_keys.insert("KS123".into(), SecretString::from("shared-secret"));
    })
    .await;
    let params = stop_params("SMsk1", "+14155550401", "STOP", Some("STOP"));
    let url = format!("{PUBLIC_URL}/twilio/messages");
    let form = "application/x-www-form-urlencoded";
    let settings = ("x-twilio-webhooks-signature-settings", "key=KS123,algorithm=HMAC_SHA256");
    let good = compute_sha256("shared-secret", &url, &params);
    assert_eq!(app.post_raw("/twilio/messages", encode(&params), form, Some(&good), &[settings]).await.status(), 200);
    // The Auth Token's SHA-1 signature, valid on its own, does not pass under SharedKey settings.
    let params2 = stop_params("SMsk2", "+14155550402", "STOP", Some("STOP"));
    let sha1 = compute(TOKEN, &url, &params2);
    assert_eq!(app.post_raw("/twilio/messages", encode(&params2), form, Some(&sha1), &[settings]).await.status(), 403);
    assert_eq!(event_count(&app.store).await, 1, "refused under SharedKey settings");
    // Unknown key id.
    let params3 = stop_params("SMsk3", "+14155550403", "STOP", Some("STOP"));
    let unknown = ("x-twilio-webhooks-signature-settings", "key=KS999,algorithm=HMAC_SHA256");
    let sig = compute_sha256("shared-secret", &url, &params3);
    assert_eq!(app.post_raw("/twilio/messages", encode(&params3), form, Some(&sig), &[unknown]).await.status(), 403);
    assert_eq!(event_count(&app.store).await, 1);
    // The same SHA-1 signature without the settings header is accepted: the 403s above
    // came from the SharedKey rules, not from a signature that was wrong anyway.
    assert_eq!(app.post_raw("/twilio/messages", encode(&params2), form, Some(&sha1), &[]).await.status(), 200);
    let sids: Vec<String> = events(&app.store).await.into_iter().map(|e| e.message_sid).collect();
    assert_eq!(sids, ["SMsk1", "SMsk2"]);
    app.stop().await;
}

async fn rotated_tokens_are_both_accepted(b: Backend) {
    let app = spawn_app_with(b, |c| {
        c.twilio.auth_tokens = vec![SecretString::from("new-primary-token"), SecretString::from(TOKEN)];
    })
    .await;
    let r1 = app.post_signed(&stop_params("SMr1", "+14155550501", "STOP", Some("STOP")), "new-primary-token").await;
    let r2 = app.post_signed(&stop_params("SMr2", "+14155550502", "STOP", Some("STOP")), TOKEN).await;
    let r3 = app.post_signed(&stop_params("SMr3", "+14155550503", "STOP", Some("STOP")), "retired-token").await;
    assert_eq!((r1.status().as_u16(), r2.status().as_u16(), r3.status().as_u16()), (200, 200, 403));
    app.stop().await;
}

async fn replayed_message_sid_changes_nothing(b: Backend) {
    let app = spawn_app_with(b, with_sink).await;
    let from = "+14155550601";
    let stop = stop_params("SMdup", from, "STOP", Some("STOP"));
    assert_eq!(app.post_signed(&stop, TOKEN).await.status(), 200);
    assert_eq!(app.post_signed(&stop_params("SMlater", from, "START", Some("START")), TOKEN).await.status(), 200);
    // Twilio retries the STOP: same MessageSid, answered 200, nothing changes.
    for _ in 0..3 {
        assert_eq!(app.post_signed(&stop, TOKEN).await.status(), 200);
    }
    assert_eq!(event_count(&app.store).await, 2);
    assert_eq!(opted_out(&app.store, from).await, Some(false), "the retry must not re-opt-out");
    let start = events(&app.store).await.into_iter().find(|e| e.message_sid == "SMlater").expect("the START");
    // One row per sink and phone, made pending last by the START (the
    // retried STOP records no change).
    eventually("the START is the row's cause", || async {
        let rows = deliveries(&app.store, None).await;
        rows.len() == 1 && rows[0].event_id == Some(start.id)
    })
    .await;
    app.stop().await;
}

async fn concurrent_webhooks_are_each_recorded_once(b: Backend) {
    let app = spawn_app_with(b, with_sink).await;
    let mut tasks = Vec::new();
    for i in 0..60 {
        let params =
            stop_params(&format!("SMc{}", i % 40), &format!("+1415555{:04}", 1000 + i % 40), "STOP", Some("STOP"));
        let (client, url) = (app.client.clone(), app.url("/twilio/messages"));
        tasks.push(tokio::spawn(async move { send_signed(&client, &url, &params).await }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(event_count(&app.store).await, 40);
    eventually("one row per phone for the one sink", || async { deliveries(&app.store, None).await.len() == 40 }).await;
    app.stop().await;
}

async fn oversized_bodies_get_413(b: Backend) {
    let app = spawn_app(b).await;
    let mut params = stop_params("SMbig", "+14155550701", "STOP", Some("STOP"));
    params.push(("Padding".into(), "x".repeat(70 * 1024)));
    assert_eq!(app.post_signed(&params, TOKEN).await.status(), 413);
    assert_eq!(event_count(&app.store).await, 0);
    app.stop().await;
}

async fn wrong_content_type_gets_415(b: Backend) {
    let app = spawn_app(b).await;
    let params = stop_params("SMjson", "+14155550801", "STOP", Some("STOP"));
    let sig = compute(TOKEN, &format!("{PUBLIC_URL}/twilio/messages"), &params);
    let res = app
        .post_raw("/twilio/messages", "{\"From\":\"+14155550801\"}".into(), "application/json", Some(&sig), &[])
        .await;
    assert_eq!(res.status(), 415);
    let res = app.post_raw("/twilio/messages", encode(&params), "text/plain", Some(&sig), &[]).await;
    assert_eq!(res.status(), 415);
    assert_eq!(event_count(&app.store).await, 0);
    app.stop().await;
}

async fn signed_but_missing_fields_get_400(b: Backend) {
    let app = spawn_app(b).await;
    let full = stop_params("SMm1", "+14155550901", "STOP", Some("STOP"));
    let without = |name: &str| {
        full.iter().filter(|(k, _)| k != name && !(name == "MessageSid" && k == "SmsSid")).cloned().collect::<Vec<_>>()
    };
    assert_eq!(app.post_signed(&without("From"), TOKEN).await.status(), 400);
    assert_eq!(app.post_signed(&without("MessageSid"), TOKEN).await.status(), 400);
    let not_a_phone = stop_params("SMm2", "client:alice", "STOP", Some("STOP"));
    assert_eq!(app.post_signed(&not_a_phone, TOKEN).await.status(), 400);
    let bad_sid = stop_params("SM' OR '1'='1", "+14155550902", "STOP", Some("STOP"));
    assert_eq!(app.post_signed(&bad_sid, TOKEN).await.status(), 400);
    assert_eq!(event_count(&app.store).await, 0);
    app.stop().await;
}

async fn channel_prefixes_are_stripped_and_raw_value_kept(b: Backend) {
    let app = spawn_app(b).await;
    let res = app.post_signed(&stop_params("SMwa", "whatsapp:+14155551001", "STOP", Some("STOP")), TOKEN).await;
    assert_eq!(res.status(), 200);
    assert_eq!(opted_out(&app.store, "+14155551001").await, Some(true));
    let recorded = events(&app.store).await;
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].phone, "+14155551001", "the channel prefix is stripped");
    let raw = query_texts(&app.db_url, "SELECT from_raw FROM events").await;
    assert_eq!(raw, ["whatsapp:+14155551001"], "the From value is kept as Twilio sent it");
    app.stop().await;
}

async fn no_input_panics_the_server(b: Backend) {
    let app = spawn_app_with(b, |c| c.twilio.validate_signatures = false).await;
    let form = "application/x-www-form-urlencoded";
    let bodies = [
        String::new(),
        "%".into(),
        "%zz=%ff".into(),
        "From=%FF%FE&MessageSid=SM1".into(),
        "From&MessageSid".into(),
        "=&=&=".into(),
        "MessageSid=SMp1&From=%2B1".into(),
        "MessageSid=SMp2&From=%2B99999999999999999999999".into(),
        format!("MessageSid=SMp3&From=%2B14155551102&Body={}", "%E2%9C%8B".repeat(500)),
        "MessageSid=SMp4&From=%2B14155551103&OptOutType=STOP&OptOutType=START".into(),
    ];
    for body in bodies {
        let status = app.post_raw("/twilio/messages", body.clone(), form, None, &[]).await.status();
        assert!(status == 200 || status == 400, "{body:?} → {status}");
    }
    assert_eq!(app.client.get(app.url("/healthz")).send().await.unwrap().status(), 200, "still serving");
    app.stop().await;
}

async fn store_down_answers_503_and_records_nothing(b: Backend) {
    // A database that cannot be reached at all.
    let app = spawn_app_with(b, |c| {
        c.database.run_migrations_on_start = false;
        c.database.acquire_timeout = std::time::Duration::from_secs(1);
        c.database.url = SecretString::from(match b {
            Backend::Postgres => "postgres://postgres@127.0.0.1:1/none".to_owned(),
            Backend::Sqlite => "sqlite:///nonexistent-dir/for/sure/relay.db?mode=rwc".to_owned(),
        });
    })
    .await;
    let res = app.post_signed(&stop_params("SMdown", "+14155551201", "STOP", Some("STOP")), TOKEN).await;
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["checks"]["database"], "failing");
    assert_eq!(app.client.get(app.url("/healthz")).send().await.unwrap().status(), 200);
    app.stop().await;
}

async fn a_failing_commit_answers_503_and_leaves_nothing_half_written(b: Backend) {
    let app = spawn_app_with(b, with_sink).await;
    // Make the last write of the transaction (the change for the relay) fail.
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
    let stop = stop_params("SMhalf", "+14155551301", "STOP", Some("STOP"));
    assert_eq!(app.post_signed(&stop, TOKEN).await.status(), 503);
    assert_eq!(event_count(&app.store).await, 0, "no event without its change");
    assert_eq!(opted_out(&app.store, "+14155551301").await, None);
    // Fixed: Twilio's retry of the same message is recorded in full.
    let drop = if b == Backend::Postgres { "DROP TRIGGER refuse ON changes" } else { "DROP TRIGGER refuse" };
    exec(&app.db_url, &[drop]).await;
    assert_eq!(app.post_signed(&stop, TOKEN).await.status(), 200);
    assert_eq!(event_count(&app.store).await, 1);
    eventually("the sink's row", || async { deliveries(&app.store, None).await.len() == 1 }).await;
    app.stop().await;
}

async fn one_refused_event_does_not_fail_its_batch_neighbours(b: Backend) {
    let app = spawn_app(b).await;
    let poison: &[&str] = match b {
        Backend::Postgres => &[
            "CREATE FUNCTION poison() RETURNS trigger AS $$ BEGIN IF NEW.phone = '+14155559999' THEN RAISE EXCEPTION 'poison'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER poison BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION poison()",
        ],
        Backend::Sqlite => &["CREATE TRIGGER poison BEFORE INSERT ON events WHEN NEW.phone = '+14155559999' BEGIN SELECT RAISE(ABORT, 'poison'); END"],
    };
    exec(&app.db_url, poison).await;
    let mut tasks = Vec::new();
    for i in 0..30 {
        let from = if i == 15 { "+14155559999".to_owned() } else { format!("+1415555{:04}", 2000 + i) };
        let params = stop_params(&format!("SMpz{i}"), &from, "STOP", Some("STOP"));
        let (client, url) = (app.client.clone(), app.url("/twilio/messages"));
        tasks.push(tokio::spawn(async move { (i, send_signed(&client, &url, &params).await.as_u16()) }));
    }
    for t in tasks {
        let (i, status) = t.await.unwrap();
        assert_eq!(status, if i == 15 { 503 } else { 200 }, "request {i}");
    }
    assert_eq!(event_count(&app.store).await, 29);
    app.stop().await;
}

async fn a_batch_keeps_arrival_order_for_one_phone(b: Backend) {
    let app = spawn_app_with(b, with_sink).await;
    let event = |sid: &str, kind| optout_relay::store::NewEvent {
        message_sid: optout_relay::domain::MessageSid::parse(sid).unwrap(),
        account_sid: None,
        messaging_service_sid: Some(SERVICE.into()),
        scope: SERVICE.into(),
        phone: phone("+14155551501"),
        from_raw: "+14155551501".into(),
        to: None,
        kind,
        body: String::new(),
        params: serde_json::json!({}),
        received_at: chrono::Utc::now(),
        source: "twilio".into(),
    };
    use optout_relay::domain::EventKind::{OptIn, OptOut};
    // The STOP arrives first but its sid sorts last; both said at the same instant.
    let batch = [event("SMzzzz", OptOut), event("SMaaaa", OptIn)];
    app.store.record_events(&batch).await.unwrap();
    assert_eq!(opted_out(&app.store, "+14155551501").await, Some(false), "the later START wins");
    let recorded = events(&app.store).await;
    let sids: Vec<&str> = recorded.iter().map(|e| e.message_sid.as_str()).collect();
    assert_eq!(sids, ["SMzzzz", "SMaaaa"], "ids follow arrival order");
    eventually("the sink's row, made pending by the newest change (the START)", || async {
        let rows = deliveries(&app.store, None).await;
        rows.len() == 1 && rows[0].event_id == Some(recorded[1].id)
    })
    .await;
    app.stop().await;
}

async fn readyz_reports_each_check(b: Backend) {
    let app = spawn_app(b).await;
    let res = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["checks"]["database"], "ok");
    assert_eq!(body["checks"]["migrations"], "ok");
    let res = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    app.stop().await;
}

async fn readyz_fails_until_migrations_are_applied(b: Backend) {
    let app = spawn_app_with(b, |c| c.database.run_migrations_on_start = false).await;
    assert_eq!(app.client.get(app.url("/readyz")).send().await.unwrap().status(), 503);
    app.store.migrate().await.unwrap();
    assert_eq!(app.client.get(app.url("/readyz")).send().await.unwrap().status(), 200);
    app.stop().await;
}

async fn metrics_count_outcomes_and_report_the_queue(b: Backend) {
    let app = spawn_app_with(b, |c| {
        with_sink(c);
        // Keep the delivery pending: the sink points nowhere and retries late.
        c.relay.retry_base = std::time::Duration::from_secs(600);
        c.relay.retry_cap = std::time::Duration::from_secs(600);
    })
    .await;
    app.post_signed(&stop_params("SMmet1", "+14155551401", "STOP", Some("STOP")), TOKEN).await;
    app.post_signed(&stop_params("SMmet2", "+14155551402", "hello", None), TOKEN).await;
    app.post_signed(&stop_params("SMmet3", "+14155551403", "STOP", Some("STOP")), "wrong").await;
    // The sink's row is made pending by the fan-out, just after the answer.
    eventually("the sink's row counted as pending", || async {
        let text = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
        text.contains("optout_pending_deliveries{sink=\"redcap\"} 1")
    })
    .await;
    let res = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    for needle in [
        "optout_webhooks_total{outcome=\"accepted\"}",
        "optout_webhooks_total{outcome=\"ignored\"}",
        "optout_webhooks_total{outcome=\"bad_signature\"}",
        "optout_events_total{kind=\"opt_out\"}",
        "optout_webhook_duration_seconds_bucket",
        "optout_pending_deliveries{sink=\"redcap\"} 1",
        "optout_oldest_pending_delivery_age_seconds{sink=\"redcap\"}",
        "optout_dead_deliveries{sink=\"redcap\"} 0",
        // The STOP was fanned out to the sink's queue: no change waits.
        "optout_changes_waiting 0",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    app.stop().await;
}

/// Configures a REDCap sink (pointing nowhere useful) so ingest queues deliveries.
fn with_sink(c: &mut optout_relay::config::Config) {
    c.redcap = Some(toml_redcap("http://127.0.0.1:9/api/"));
}

fn toml_redcap(url: &str) -> optout_relay::config::RedcapConfig {
    redcap_config(url)
}

both_backends!(
    stop_is_recorded_and_answered_with_empty_twiml,
    start_clears_and_help_changes_nothing,
    keywords_count_without_opt_out_type,
    other_messages_are_answered_but_not_recorded,
    unsigned_or_wrongly_signed_requests_are_refused,
    signature_quirks_are_all_accepted,
    shared_key_signatures_use_hmac_sha256,
    rotated_tokens_are_both_accepted,
    replayed_message_sid_changes_nothing,
    concurrent_webhooks_are_each_recorded_once,
    oversized_bodies_get_413,
    wrong_content_type_gets_415,
    signed_but_missing_fields_get_400,
    channel_prefixes_are_stripped_and_raw_value_kept,
    no_input_panics_the_server,
    store_down_answers_503_and_records_nothing,
    a_failing_commit_answers_503_and_leaves_nothing_half_written,
    readyz_reports_each_check,
    a_batch_keeps_arrival_order_for_one_phone,
    one_refused_event_does_not_fail_its_batch_neighbours,
    readyz_fails_until_migrations_are_applied,
    metrics_count_outcomes_and_report_the_queue,
);
