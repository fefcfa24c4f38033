//! The relay end to end: a signed webhook in, a stamped REDCap record out,
//! against an in-process fake REDCap and both real stores.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{NaiveDateTime, Utc};

use crate::both_backends;
use crate::common::fake_redcap::{CallKind, FakeProject, FakeRedcap, Fault};
use crate::common::*;
use optout_relay::config::Config;
use optout_relay::domain::{EventKind, MessageSid, Phone};
use optout_relay::startup::Application;
use optout_relay::store::{NewEvent, Store};
use secrecy::SecretString;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const REDCAP_TOKEN: &str = "0123456789ABCDEF0123456789ABCDEF";
const FIELD: &str = "opted_out_at";

/// A classic project: `study_id` is the record id; the opt-out field has seconds.
fn project() -> FakeProject {
    FakeProject::new(
        REDCAP_TOKEN,
        &[
            ("study_id", "enrol", ""),
            ("name", "enrol", ""),
            ("phone", "enrol", ""),
            (FIELD, "enrol", "datetime_seconds_ymd"),
        ],
    )
}

fn relay_to(fake: &FakeRedcap) -> impl FnOnce(&mut Config) + '_ {
    move |c: &mut Config| {
        let mut r = redcap_config(&fake.url);
        r.token = SecretString::from(REDCAP_TOKEN);
        r.timezone = "America/New_York".into();
        r.request_timeout = Duration::from_secs(2);
        c.redcap = Some(r);
        c.relay.poll_interval = Duration::from_millis(50);
        c.relay.retry_base = Duration::from_millis(100);
        c.relay.retry_cap = Duration::from_millis(300);
        c.relay.misconfigured_retry = Duration::from_millis(300);
        c.relay.lease = Duration::from_secs(5);
    }
}

async fn pending(store: &Store) -> usize {
    deliveries(store, Some("pending")).await.len()
}

fn stamp_is_now_in_new_york(value: &str) {
    let t = NaiveDateTime::parse_from_str(value, "%Y-%m-%d %H:%M:%S")
        .unwrap_or_else(|_| panic!("not a datetime: {value:?}"));
    let now = Utc::now().with_timezone(&chrono_tz::America::New_York).naive_local();
    assert!((now - t).num_seconds().abs() < 60, "{value} is not the local time of the STOP ({now})");
}

async fn stop_stamps_every_record_with_that_number_in_any_format(b: Backend) {
    let formats = ["(415) 555-0101", "415-555-0101", "4155550101", "+1 415 555 0101", "1-415-555-0101", "415.555.0101"];
    let mut p = project();
    for (i, f) in formats.iter().enumerate() {
        p = p.with_record(&format!("{}", i + 1), None, &[("phone", f), ("name", "x")]);
    }
    p = p.with_record("7", None, &[("phone", "415-555-0199")]).with_record("8", None, &[("phone", "")]);
    let fake = FakeRedcap::start(p).await;
    let app = spawn_app_with(b, relay_to(&fake)).await;

    assert_eq!(
        app.post_signed(&stop_params("SMe2e1", "+14155550101", "STOP", Some("STOP")), TOKEN).await.status(),
        200
    );
    eventually("all six records stamped", || async {
        (1..=6).all(|i| fake.value(&i.to_string(), None, FIELD).is_some_and(|v| !v.is_empty()))
    })
    .await;

    let stamp = fake.value("1", None, FIELD).unwrap();
    stamp_is_now_in_new_york(&stamp);
    for i in 1..=6 {
        assert_eq!(fake.value(&i.to_string(), None, FIELD).unwrap(), stamp, "record {i}");
        assert_eq!(fake.value(&i.to_string(), None, "name").unwrap(), "x", "other fields untouched");
    }
    assert_eq!(fake.value("7", None, FIELD).unwrap_or_default(), "", "another number");
    assert_eq!(fake.value("8", None, FIELD).unwrap_or_default(), "", "a blank phone never matches");
    assert_eq!(fake.record_count(), 8, "no record created");

    eventually("delivery done", || async { pending(&app.store).await == 0 }).await;
    let done = deliveries(&app.store, Some("done")).await;
    let mut records: Vec<String> = done[0].result.as_ref().unwrap()["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    records.sort();
    assert_eq!(records, ["1", "2", "3", "4", "5", "6"]);
    app.stop().await;
}

async fn start_after_stop_clears_the_field(b: Backend) {
    let fake = FakeRedcap::start(project().with_record("1", None, &[("phone", "(415) 555-0102")])).await;
    let app = spawn_app_with(b, relay_to(&fake)).await;
    app.post_signed(&stop_params("SMs1", "+14155550102", "STOP", Some("STOP")), TOKEN).await;
    eventually("stamped", || async { fake.value("1", None, FIELD).is_some_and(|v| !v.is_empty()) }).await;
    app.post_signed(&stop_params("SMs2", "+14155550102", "START", Some("START")), TOKEN).await;
    eventually("cleared", || async { fake.value("1", None, FIELD).as_deref() == Some("") }).await;
    // HELP changes nothing and queues nothing.
    app.post_signed(&stop_params("SMs3", "+14155550102", "HELP", Some("HELP")), TOKEN).await;
    eventually("all done", || async { pending(&app.store).await == 0 }).await;
    assert_eq!(deliveries(&app.store, None).await.len(), 2);
    app.stop().await;
}

async fn a_stop_retried_after_a_later_start_never_restamps(b: Backend) {
    let fake = FakeRedcap::start(project().with_record("1", None, &[("phone", "415-555-0103")])).await;
    fake.set_fault(Fault::Status500);
    let app = spawn_app_with(b, relay_to(&fake)).await;
    app.post_signed(&stop_params("SMo1", "+14155550103", "STOP", Some("STOP")), TOKEN).await;
    app.post_signed(&stop_params("SMo2", "+14155550103", "START", Some("START")), TOKEN).await;
    // The STOP fails and is retried; the START waits behind it.
    eventually("STOP attempted twice", || async {
        deliveries(&app.store, None).await.iter().any(|d| d.kind == "opt_out" && d.attempts >= 2)
    })
    .await;
    let rows = deliveries(&app.store, None).await;
    let start = rows.iter().find(|d| d.kind == "opt_in").unwrap();
    assert_eq!(start.attempts, 0, "START must wait for the STOP before it");

    fake.set_fault(Fault::None);
    eventually("both delivered", || async { pending(&app.store).await == 0 }).await;
    assert_eq!(fake.value("1", None, FIELD).as_deref(), Some(""), "the START is the last word");
    let writes: Vec<String> = fake
        .call_log()
        .iter()
        .filter(|c| c.kind == CallKind::Import)
        .map(|c| {
            serde_json::from_str::<serde_json::Value>(c.param("data").unwrap()).unwrap()[0][FIELD]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(writes.len(), 2, "{writes:?}");
    assert!(!writes[0].is_empty() && writes[1].is_empty(), "stamp then clear, in that order: {writes:?}");
    app.stop().await;
}

async fn a_dead_stop_replayed_after_the_start_landed_is_superseded(b: Backend) {
    let fake = FakeRedcap::start(project().with_record(
        "1",
        None,
        &[("phone", "415-555-0104"), (FIELD, "2020-01-01 00:00:00")],
    ))
    .await;
    fake.set_fault(Fault::Status500);
    let app = spawn_app_with(b, |c| {
        relay_to(&fake)(c);
        c.relay.max_attempts = 1;
    })
    .await;
    app.post_signed(&stop_params("SMd1", "+14155550104", "STOP", Some("STOP")), TOKEN).await;
    eventually("STOP dead", || async { deliveries(&app.store, Some("dead")).await.len() == 1 }).await;
    fake.set_fault(Fault::None);
    app.post_signed(&stop_params("SMd2", "+14155550104", "START", Some("START")), TOKEN).await;
    // Landed in REDCap *and* settled: only a settled START makes the STOP superseded.
    eventually("START done", || async { deliveries(&app.store, Some("done")).await.len() == 1 }).await;
    assert_eq!(fake.value("1", None, FIELD).as_deref(), Some(""));

    assert_eq!(app.store.replay_dead(None).await.unwrap(), 1);
    eventually("replayed STOP settled", || async { pending(&app.store).await == 0 }).await;
    let rows = deliveries(&app.store, None).await;
    let stop = rows.iter().find(|d| d.kind == "opt_out").unwrap();
    assert_eq!(stop.status, "done");
    assert_eq!(stop.result.as_ref().unwrap()["superseded"], true);
    assert_eq!(fake.value("1", None, FIELD).as_deref(), Some(""), "the replayed STOP must not re-stamp");
    app.stop().await;
}

async fn a_dead_stop_replayed_while_the_start_is_in_flight_never_lands_after_it(b: Backend) {
    let fake = FakeRedcap::start(
        project().with_record("1", None, &[("phone", "415-555-0114"), (FIELD, "2020-01-01 00:00:00")]).with_record(
            "2",
            None,
            &[("phone", "415-555-0115")],
        ),
    )
    .await;
    fake.set_fault(Fault::Status500);
    let app = spawn_app_with(b, |c| {
        relay_to(&fake)(c);
        c.relay.max_attempts = 1;
        // The START's import is held on purpose below: the client must not give up on it.
        c.redcap.as_mut().unwrap().request_timeout = PATIENCE;
    })
    .await;
    app.post_signed(&stop_params("SMdf1", "+14155550114", "STOP", Some("STOP")), TOKEN).await;
    eventually("STOP dead", || async { deliveries(&app.store, Some("dead")).await.len() == 1 }).await;
    fake.set_fault(Fault::None);
    // The START's import is held in flight (one worker busy with it) while the operator replays the dead STOP.
    let start_import = fake.hold_next(CallKind::Import);
    app.post_signed(&stop_params("SMdf2", "+14155550114", "START", Some("START")), TOKEN).await;
    eventually("the START's import in flight", || async { fake.calls_of(CallKind::Import) == 1 }).await;
    assert_eq!(app.store.replay_dead(None).await.unwrap(), 1);
    // Another phone's change, recorded after the replay: once it is delivered, the
    // other worker has claimed since the replay, and would have taken the STOP with it.
    app.post_signed(&stop_params("SMdf3", "+14155550115", "STOP", Some("STOP")), TOKEN).await;
    eventually("the other phone's change delivered", || async {
        deliveries(&app.store, Some("done")).await.iter().any(|d| d.phone == "+14155550115")
    })
    .await;
    let stop = deliveries(&app.store, None).await.into_iter().find(|d| d.kind == "opt_out" && d.event_id == 1).unwrap();
    assert_eq!(stop.attempts, 0, "the replayed STOP was taken up while the newer START was in flight: {stop:?}");

    start_import.open();
    eventually("all settled", || async { pending(&app.store).await == 0 }).await;
    assert_eq!(fake.value("1", None, FIELD).as_deref(), Some(""), "the START is the last word");
    let stop = deliveries(&app.store, None).await.into_iter().find(|d| d.event_id == 1).unwrap();
    assert_eq!(stop.result.as_ref().unwrap()["superseded"], true, "{stop:?}");
    app.stop().await;
}

async fn redcap_down_then_up_loses_nothing(b: Backend) {
    let fake = FakeRedcap::start(project().with_record("1", None, &[("phone", "4155550105")])).await;
    fake.set_fault(Fault::Status500);
    let app = spawn_app_with(b, relay_to(&fake)).await;
    app.post_signed(&stop_params("SMdn1", "+14155550105", "STOP", Some("STOP")), TOKEN).await;
    let error = eventually_some("a failed attempt recorded", || async {
        deliveries(&app.store, Some("pending")).await.first().and_then(|d| d.last_error.clone())
    })
    .await;
    assert!(error.contains("500"), "{error}");
    assert_eq!(fake.value("1", None, FIELD).as_deref(), Some(""), "nothing written while REDCap fails");
    // Then REDCap hangs: every call is held past the client's 2 s timeout and does nothing.
    fake.set_fault(Fault::Timeout(Duration::from_secs(60)));
    let error = eventually_some("a timed-out attempt recorded", || async {
        deliveries(&app.store, Some("pending"))
            .await
            .first()
            .and_then(|d| d.last_error.clone())
            .filter(|e| !e.contains("500"))
    })
    .await;
    assert!(error.contains("did not answer"), "{error}");
    assert_eq!(fake.value("1", None, FIELD).as_deref(), Some(""), "nothing written while REDCap hangs");
    fake.set_fault(Fault::None);
    eventually("stamped once REDCap is back", || async { fake.value("1", None, FIELD).is_some_and(|v| !v.is_empty()) })
        .await;
    eventually("done", || async { pending(&app.store).await == 0 }).await;
    let done = deliveries(&app.store, Some("done")).await;
    assert!(done[0].attempts >= 3, "a failed, a timed-out and a good attempt: {:?}", done[0]);
    app.stop().await;
}

async fn a_failed_import_is_retried_and_stamps_once(b: Backend) {
    let fake = FakeRedcap::start(project().with_record("1", None, &[("phone", "4155550111")])).await;
    // Only the first import fails; the export before it and every later call succeed.
    fake.fail_next(CallKind::Import, Fault::Status500);
    let app = spawn_app_with(b, relay_to(&fake)).await;
    app.post_signed(&stop_params("SMfi1", "+14155550111", "STOP", Some("STOP")), TOKEN).await;
    eventually("done", || async { deliveries(&app.store, Some("done")).await.len() == 1 }).await;
    stamp_is_now_in_new_york(&fake.value("1", None, FIELD).unwrap());
    let imports: Vec<Fault> =
        fake.call_log().into_iter().filter(|c| c.kind == CallKind::Import).map(|c| c.fault).collect();
    assert_eq!(imports, [Fault::Status500, Fault::None], "one failed import, then one that stamped");
    assert_eq!(fake.pending_faults(), 0);
    let done = &deliveries(&app.store, Some("done")).await[0];
    assert_eq!(done.attempts, 2);
    assert_eq!(done.result.as_ref().unwrap()["records"], json!(["1"]));
    app.stop().await;
}

async fn a_short_import_count_is_retried_until_every_record_is_written(b: Backend) {
    let p = project()
        .with_record("1", None, &[("phone", "415-555-0112")])
        .with_record("2", None, &[("phone", "(415) 555-0112")])
        .with_record("3", None, &[("phone", "4155550112")]);
    let fake = FakeRedcap::start(p).await;
    // The first import saves two of the three records and says so; the retry is
    // held until the test has seen the delivery waiting.
    fake.fail_next(CallKind::Import, Fault::ShortCount);
    let retry = fake.hold_next(CallKind::Import);
    let app = spawn_app_with(b, relay_to(&fake)).await;
    app.post_signed(&stop_params("SMsc1", "+14155550112", "STOP", Some("STOP")), TOKEN).await;
    let error = eventually_some("the short count recorded on the pending delivery", || async {
        deliveries(&app.store, Some("pending")).await.first().and_then(|d| d.last_error.clone())
    })
    .await;
    assert!(error.contains("reported 2 record(s) updated of 3 sent"), "{error}");
    let stamped = |r: &str| fake.value(r, None, FIELD).is_some_and(|v| !v.is_empty());
    assert!(stamped("1") && stamped("2") && !stamped("3"), "the fake saved only what it counted");
    retry.open();
    eventually("done", || async { deliveries(&app.store, Some("done")).await.len() == 1 }).await;
    assert!(stamped("3"), "the retry writes the record the first import missed");
    assert_eq!(fake.calls_of(CallKind::Import), 2);
    assert_eq!(deliveries(&app.store, Some("done")).await[0].attempts, 2);
    app.stop().await;
}

async fn a_wrong_token_is_reported_and_everything_lands_once_fixed(b: Backend) {
    let fake = FakeRedcap::start(project().with_record("1", None, &[("phone", "4155550106")])).await;
    fake.set_fault(Fault::BadToken);
    let app = spawn_app_with(b, relay_to(&fake)).await;
    app.post_signed(&stop_params("SMtk1", "+14155550106", "STOP", Some("STOP")), TOKEN).await;
    eventually("403 recorded on the delivery", || async {
        let rows = deliveries(&app.store, Some("pending")).await;
        rows.first().and_then(|d| d.last_error.clone()).is_some_and(|e| e.contains("403"))
    })
    .await;
    let err = deliveries(&app.store, Some("pending")).await[0].last_error.clone().unwrap();
    assert!(!err.contains(REDCAP_TOKEN), "the token must never appear in an error: {err}");
    fake.set_fault(Fault::None);
    eventually("stamped after the fix", || async { fake.value("1", None, FIELD).is_some_and(|v| !v.is_empty()) }).await;
    app.stop().await;
}

async fn no_matching_record_is_done_with_zero_records(b: Backend) {
    let fake = FakeRedcap::start(project().with_record("1", None, &[("phone", "")]).with_record(
        "2",
        None,
        &[("phone", "415-555-0000")],
    ))
    .await;
    let app = spawn_app_with(b, relay_to(&fake)).await;
    app.post_signed(&stop_params("SMnm1", "+14155550107", "STOP", Some("STOP")), TOKEN).await;
    eventually("done", || async { deliveries(&app.store, Some("done")).await.len() == 1 }).await;
    let row = &deliveries(&app.store, Some("done")).await[0];
    assert_eq!(row.result.as_ref().unwrap()["records"], json!([]));
    assert_eq!(fake.calls_of(CallKind::Import), 0, "nothing to write, nothing written");
    assert_eq!(fake.value("1", None, FIELD).unwrap_or_default(), "");
    app.stop().await;
}

async fn longitudinal_projects_stamp_the_event_where_the_phone_matched(b: Backend) {
    let p = project()
        .with_events(&["enrol_arm_1", "followup_arm_1"])
        .with_record("1", Some("enrol_arm_1"), &[("phone", "415-555-0108")])
        .with_record("1", Some("followup_arm_1"), &[("phone", "")])
        .with_record("2", Some("followup_arm_1"), &[("phone", "(415) 555-0108")]);
    let fake = FakeRedcap::start(p).await;
    let app = spawn_app_with(b, relay_to(&fake)).await;
    app.post_signed(&stop_params("SMl1", "+14155550108", "STOP", Some("STOP")), TOKEN).await;
    eventually("both records stamped", || async {
        fake.value("1", Some("enrol_arm_1"), FIELD).is_some_and(|v| !v.is_empty())
            && fake.value("2", Some("followup_arm_1"), FIELD).is_some_and(|v| !v.is_empty())
    })
    .await;
    assert_eq!(fake.value("1", Some("followup_arm_1"), FIELD).unwrap_or_default(), "");
    app.stop().await;
}

async fn the_study_team_is_emailed_what_redcap_did(b: Backend) {
    let fake = FakeRedcap::start(project().with_record("41", None, &[("phone", "(415) 555-0110")])).await;
    let smtp = crate::common::fake_smtp::FakeSmtp::start().await;
    let app = spawn_app_with(b, |c| {
        relay_to(&fake)(c);
        c.email = Some(optout_relay::config::EmailConfig {
            smtp_host: "127.0.0.1".into(),
            smtp_port: Some(smtp.port()),
            tls: optout_relay::config::EmailTls::None,
            username: None,
            password: None,
            from: "optout-relay@example.org".into(),
            to: vec!["coordinator@example.org".into()],
            timezone: "America/New_York".into(),
            timeout: Duration::from_secs(5),
            ca_file: None,
        });
    })
    .await;
    app.post_signed(&stop_params("SMmail1", "+14155550110", "STOP", Some("STOP")), TOKEN).await;
    eventually("email sent", || async { !smtp.messages().is_empty() }).await;
    let msg = &smtp.messages()[0];
    assert_eq!(msg.to, ["coordinator@example.org"]);
    let body = msg.body();
    assert!(body.contains("+14155550110"), "{body}");
    assert!(body.contains("41"), "names the record updated: {body}");
    assert!(fake.value("41", None, FIELD).is_some_and(|v| !v.is_empty()), "REDCap was stamped first");
    eventually("both deliveries done", || async { deliveries(&app.store, Some("done")).await.len() == 2 }).await;
    app.stop().await;
}

/// A STOP as the webhook would record it.
fn new_stop(sid: &str, phone: &str) -> NewEvent {
    NewEvent {
        message_sid: MessageSid::parse(sid).unwrap(),
        account_sid: None,
        messaging_service_sid: Some(SERVICE.into()),
        scope: SERVICE.into(),
        phone: Phone::parse(phone, phonenumber::country::Id::US).unwrap(),
        from_raw: phone.into(),
        to: None,
        kind: EventKind::OptOut,
        body: "STOP".into(),
        params: json!({}),
        received_at: Utc::now(),
        source: "twilio".into(),
    }
}

/// Records one STOP with a REDCap delivery straight into the store.
async fn record_stop(store: &Store, sid: &str, phone: &str) {
    store.record_events(&[new_stop(sid, phone)], &["redcap"]).await.unwrap();
}

/// Writes events straight into a fresh store (as an earlier process would have).
async fn seeded_store(b: Backend, dir: &tempfile::TempDir, phones: &[&str], sinks: &[&str]) -> (String, Store) {
    let url = fresh_database(b, dir).await;
    let store = Store::connect_lazy(&base_config(&url).database).unwrap();
    store.migrate().await.unwrap();
    let events: Vec<NewEvent> = phones.iter().enumerate().map(|(i, p)| new_stop(&format!("SMseed{i}"), p)).collect();
    store.record_events(&events, sinks).await.unwrap();
    (url, store)
}

async fn serve(config: Config) -> (CancellationToken, tokio::task::JoinHandle<std::io::Result<()>>) {
    let app = Application::build(config).await.unwrap();
    let token = CancellationToken::new();
    (token.clone(), tokio::spawn(app.run_until(token)))
}

async fn a_crashed_workers_lease_expires_and_the_delivery_is_retried(b: Backend) {
    let fake = FakeRedcap::start(project().with_record("1", None, &[("phone", "4155550109")]).with_record(
        "2",
        None,
        &[("phone", "4155550119")],
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (url, store) = seeded_store(b, &dir, &["+14155550109"], &["redcap"]).await;
    // A worker claims it with a lease no test outlives, and dies without settling.
    let claimed = store.claim("redcap", "crashed-worker", 10, Duration::from_secs(3600), false).await.unwrap();
    assert_eq!(claimed.len(), 1);
    // Another phone's change, free to take.
    record_stop(&store, "SMfree", "+14155550119").await;

    let mut config = base_config(&url);
    relay_to(&fake)(&mut config);
    let (stop, handle) = serve(config).await;
    // The running relay delivers the free change, so it has claimed at least once
    // while the lease held; the leased change is left alone.
    eventually("the free change delivered", || async { deliveries(&store, Some("done")).await.len() == 1 }).await;
    assert!(fake.value("2", None, FIELD).is_some_and(|v| !v.is_empty()));
    assert_eq!(fake.value("1", None, FIELD).as_deref(), Some(""), "not touched while the lease holds");
    let leased = deliveries(&store, Some("pending")).await;
    assert_eq!((leased.len(), leased[0].id, leased[0].attempts), (1, claimed[0].id, 1));

    // The lease runs out (moved into the past rather than waited for).
    let expire = match b {
        Backend::Postgres => {
            "UPDATE deliveries SET locked_until = now() - interval '1 second', next_attempt_at = now() - interval '1 second'
              WHERE locked_until IS NOT NULL"
        }
        Backend::Sqlite => "UPDATE deliveries SET locked_until = 0, next_attempt_at = 0 WHERE locked_until IS NOT NULL",
    };
    exec(&url, &[expire]).await;
    eventually("retried after the lease expired", || async {
        fake.value("1", None, FIELD).is_some_and(|v| !v.is_empty())
    })
    .await;
    eventually("done", || async { pending(&store).await == 0 }).await;
    let done = deliveries(&store, Some("done")).await;
    assert_eq!(done.iter().find(|d| d.id == claimed[0].id).unwrap().attempts, 2);
    stop.cancel();
    let _ = handle.await;
    drop_database(&url).await;
}

async fn a_backlog_is_delivered_in_few_redcap_calls(b: Backend) {
    let phones: Vec<String> = (0..120).map(|i| format!("+1415555{:04}", 4000 + i)).collect();
    let mut p = project();
    for (i, ph) in phones.iter().enumerate() {
        p = p.with_record(&format!("r{i}"), None, &[("phone", &ph[2..])]);
    }
    let fake = FakeRedcap::start(p).await;
    let dir = tempfile::tempdir().unwrap();
    let refs: Vec<&str> = phones.iter().map(String::as_str).collect();
    let (url, store) = seeded_store(b, &dir, &refs, &["redcap"]).await;
    let mut config = base_config(&url);
    relay_to(&fake)(&mut config);
    config.relay.workers = 1;
    let (stop, handle) = serve(config).await;
    eventually("backlog delivered", || async { pending(&store).await == 0 }).await;
    assert!((0..120).all(|i| fake.value(&format!("r{i}"), None, FIELD).is_some_and(|v| !v.is_empty())));
    assert_eq!(fake.calls_of(CallKind::Export), 1, "one export for the whole batch");
    assert_eq!(fake.calls_of(CallKind::Import), 1, "one import for the whole batch");
    stop.cancel();
    let _ = handle.await;
    drop_database(&url).await;
}

/// Two replicas on one PostgreSQL database: every phone's changes land once each, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_postgres_apply_each_change_once_in_order() {
    let phones: Vec<String> = (0..20).map(|i| format!("+1415555{:04}", 5000 + i)).collect();
    let mut p = project();
    for (i, ph) in phones.iter().enumerate() {
        p = p.with_record(&format!("{i}"), None, &[("phone", &ph[2..])]);
    }
    let fake = FakeRedcap::start(p).await;
    fake.set_latency(Duration::from_millis(20));
    let first = spawn_app_with(Backend::Postgres, relay_to(&fake)).await;
    let mut config = base_config(&first.db_url);
    relay_to(&fake)(&mut config);
    let second_addr = {
        let app = Application::build(config).await.unwrap();
        let addr = app.local_addr();
        let token = first.shutdown.clone();
        tokio::spawn(app.run_until(token));
        addr
    };

    // Per phone: STOP, START, STOP — each through a different replica, in order.
    let kinds = ["STOP", "START", "STOP"];
    let mut tasks = Vec::new();
    for (i, ph) in phones.iter().enumerate() {
        let (client, ph) = (first.client.clone(), ph.clone());
        let urls = [first.url("/twilio/messages"), format!("http://{second_addr}/twilio/messages")];
        tasks.push(tokio::spawn(async move {
            for (n, kind) in kinds.iter().enumerate() {
                let params = stop_params(&format!("SMrep{i}x{n}"), &ph, kind, Some(kind));
                assert_eq!(send_signed(&client, &urls[(i + n) % 2], &params).await, 200);
                // Pacing, not waiting for anything: the order is already fixed by the
                // awaited answers; the gap lets the replicas claim between arrivals.
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    eventually("all delivered", || async { pending(&first.store).await == 0 }).await;
    assert_eq!(deliveries(&first.store, Some("done")).await.len(), 60);

    // Replay the writes REDCap received: per record, stamp / clear / stamp exactly.
    let mut writes: HashMap<String, Vec<bool>> = HashMap::new();
    for call in fake.call_log().iter().filter(|c| c.kind == CallKind::Import) {
        let rows: serde_json::Value = serde_json::from_str(call.param("data").unwrap()).unwrap();
        for row in rows.as_array().unwrap() {
            writes
                .entry(row["study_id"].as_str().unwrap().to_owned())
                .or_default()
                .push(!row[FIELD].as_str().unwrap().is_empty());
        }
    }
    for i in 0..20 {
        assert_eq!(writes.get(&i.to_string()).map(Vec::as_slice), Some(&[true, false, true][..]), "record {i}");
        assert!(fake.value(&i.to_string(), None, FIELD).is_some_and(|v| !v.is_empty()));
    }
    first.stop().await;
}

both_backends!(
    stop_stamps_every_record_with_that_number_in_any_format,
    start_after_stop_clears_the_field,
    a_stop_retried_after_a_later_start_never_restamps,
    a_dead_stop_replayed_after_the_start_landed_is_superseded,
    a_dead_stop_replayed_while_the_start_is_in_flight_never_lands_after_it,
    redcap_down_then_up_loses_nothing,
    a_wrong_token_is_reported_and_everything_lands_once_fixed,
    no_matching_record_is_done_with_zero_records,
    longitudinal_projects_stamp_the_event_where_the_phone_matched,
    a_failed_import_is_retried_and_stamps_once,
    a_short_import_count_is_retried_until_every_record_is_written,
    a_crashed_workers_lease_expires_and_the_delivery_is_retried,
    a_backlog_is_delivered_in_few_redcap_calls,
    the_study_team_is_emailed_what_redcap_did,
);
