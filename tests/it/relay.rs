//! The relay end to end: a signed webhook in, a stamped REDCap record (and a
//! mail to the study team) out, against in-process fakes of REDCap and SMTP
//! and both real stores.
//!
//! The relay converges: one row per (sink, phone), "done" when the sink holds
//! the phone's current target. A newer change supersedes a pending one, so
//! these tests check where REDCap ends and which writes it received, never
//! one write per event.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{NaiveDateTime, Utc};

use crate::both_backends;
use crate::common::fake_redcap::{CallKind, FakeProject, FakeRedcap, Fault};
use crate::common::fake_smtp::FakeSmtp;
use crate::common::*;
use optout_relay::config::{Config, EmailConfig, EmailTls};
use optout_relay::domain::{EventKind, MessageSid, Phone};
use optout_relay::startup::Application;
use optout_relay::store::{DeliveryRow, Failing, NewEvent, RetryOutcome, Settle, SinkFollow, Store};
use secrecy::SecretString;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const REDCAP_TOKEN: &str = "0123456789ABCDEF0123456789ABCDEF";
const FIELD: &str = "opted_out_at";
const COORDINATOR: &str = "coordinator@example.org";

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

/// Fast relay settings against `fake`. The lease must outlast a batch's worst
/// case (3 × request_timeout + 3 × the limiter's spacing), or the
/// configuration is refused.
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
        c.relay.lease = Duration::from_secs(10);
        c.relay.recheck_soon = Duration::from_millis(300);
        c.relay.recheck_late = Duration::from_secs(2);
    }
}

/// The notification email through `smtp` (plain SMTP, no login), times in New York.
fn mail_to(smtp: &FakeSmtp) -> EmailConfig {
    let mut e = EmailConfig::new("127.0.0.1", "optout-relay@example.org", vec![COORDINATOR.into()]);
    e.smtp_port = Some(smtp.port());
    e.tls = EmailTls::None;
    e.timezone = "America/New_York".into();
    e.timeout = Duration::from_secs(5);
    e
}

fn follow(sink: &str) -> SinkFollow {
    SinkFollow { sink: sink.into(), scopes: None, since_registered: false }
}

async fn pending(store: &Store) -> usize {
    deliveries(store, Some("pending")).await.len()
}

/// Nothing left to do: every change fanned out (the fan-out runs after the
/// webhook's answer, so "nothing pending" alone can come before its rows
/// exist) and no row pending. Changes first: a fan-out commits its rows and
/// the removal of its changes together.
async fn settled(store: &Store) -> bool {
    store.changes_waiting().await.expect("changes") == 0 && pending(store).await == 0
}

/// `phone`'s row of `sink`.
async fn row(store: &Store, sink: &str, phone: &str) -> Option<DeliveryRow> {
    let phone = Phone::from_stored(phone.to_owned());
    store.deliveries_of_phone(&phone).await.expect("rows").into_iter().find(|r| r.sink == sink)
}

async fn health(store: &Store, sink: &str) -> String {
    store.sink(sink).await.expect("sink").map(|s| s.health).unwrap_or_default()
}

fn stamped(fake: &FakeRedcap, record: &str) -> bool {
    fake.value(record, None, FIELD).is_some_and(|v| !v.is_empty())
}

/// Every value REDCap was sent for `record`'s opt-out field, in order.
fn writes_to(fake: &FakeRedcap, record: &str) -> Vec<String> {
    writes_by_record(fake).remove(record).unwrap_or_default()
}

/// Every value REDCap was sent for the opt-out field, by record, in order.
fn writes_by_record(fake: &FakeRedcap) -> HashMap<String, Vec<String>> {
    let mut writes: HashMap<String, Vec<String>> = HashMap::new();
    for call in fake.call_log().iter().filter(|c| c.kind == CallKind::Import) {
        let rows: serde_json::Value = serde_json::from_str(call.param("data").unwrap()).unwrap();
        for r in rows.as_array().unwrap() {
            writes
                .entry(r["study_id"].as_str().unwrap().to_owned())
                .or_default()
                .push(r[FIELD].as_str().unwrap().to_owned());
        }
    }
    writes
}

fn stamp_is_now_in_new_york(value: &str) {
    let t = NaiveDateTime::parse_from_str(value, "%Y-%m-%d %H:%M:%S")
        .unwrap_or_else(|_| panic!("not a datetime: {value:?}"));
    let now = Utc::now().with_timezone(&chrono_tz::America::New_York).naive_local();
    assert!((now - t).num_seconds().abs() < 60, "{value} is not the local time of the STOP ({now})");
}

async fn text(app: &TestApp, sid: &str, phone: &str, body: &str) {
    assert_eq!(app.post_signed(&stop_params(sid, phone, body, Some(body)), TOKEN).await.status(), 200, "{body}");
}

/// The id of the event recorded for `sid`.
async fn event_id(store: &Store, sid: &str) -> i64 {
    events(store).await.into_iter().find(|e| e.message_sid == sid).expect("event recorded").id
}

// ------------------------------------------------------------------ REDCap

async fn stop_stamps_every_record_with_that_number_in_any_format(b: Backend) {
    let formats = ["(415) 555-0101", "415-555-0101", "4155550101", "+1 415 555 0101", "1-415-555-0101", "415.555.0101"];
    let mut p = project();
    for (i, f) in formats.iter().enumerate() {
        p = p.with_record(&format!("{}", i + 1), None, &[("phone", f), ("name", "x")]);
    }
    p = p.with_record("7", None, &[("phone", "415-555-0199")]).with_record("8", None, &[("phone", "")]);
    let fake = FakeRedcap::start(p).await;
    let app = spawn_app_with(b, relay_to(&fake)).await;

    text(&app, "SMe2e1", "+14155550101", "STOP").await;
    eventually("all six records stamped", || async { (1..=6).all(|i| stamped(&fake, &i.to_string())) }).await;

    let stamp = fake.value("1", None, FIELD).unwrap();
    stamp_is_now_in_new_york(&stamp);
    for i in 1..=6 {
        assert_eq!(fake.value(&i.to_string(), None, FIELD).unwrap(), stamp, "record {i}");
        assert_eq!(fake.value(&i.to_string(), None, "name").unwrap(), "x", "other fields untouched");
    }
    assert_eq!(fake.value("7", None, FIELD).unwrap_or_default(), "", "another number");
    assert_eq!(fake.value("8", None, FIELD).unwrap_or_default(), "", "a blank phone never matches");
    assert_eq!(fake.record_count(), 8, "no record created");

    eventually("the phone's row done", || async { settled(&app.store).await }).await;
    let done = deliveries(&app.store, Some("done")).await;
    assert_eq!(done.len(), 1, "one row for the phone: {done:?}");
    assert_eq!(done[0].written_opted_out, Some(true));
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
    text(&app, "SMs1", "+14155550102", "STOP").await;
    eventually("stamped", || async { stamped(&fake, "1") }).await;
    text(&app, "SMs2", "+14155550102", "START").await;
    eventually("cleared", || async { fake.value("1", None, FIELD).as_deref() == Some("") }).await;
    eventually("done", || async { settled(&app.store).await }).await;
    let before = row(&app.store, "redcap", "+14155550102").await.unwrap();
    // HELP changes nothing and queues nothing: the row is not made pending again.
    text(&app, "SMs3", "+14155550102", "HELP").await;
    assert_eq!(event_count(&app.store).await, 3, "the HELP is recorded");
    let rows = deliveries(&app.store, None).await;
    assert_eq!(rows.len(), 1, "one row per (sink, phone): {rows:?}");
    assert_eq!((rows[0].status.as_str(), rows[0].event_id), ("done", before.event_id), "{rows:?}");
    assert_eq!(rows[0].written_opted_out, Some(false));
    assert_eq!(writes_to(&fake, "1").len(), 2, "a stamp and a clear");
    app.stop().await;
}

/// REDCap fails while a START, a STOP and a START arrive after a STOP that
/// landed: each is tried in turn, none lands; once REDCap is back the relay
/// writes the latest target once. The STOP in between is never written.
async fn a_stop_retried_after_a_later_start_never_restamps(b: Backend) {
    const PHONE: &str = "+14155550103";
    let fake = FakeRedcap::start(project().with_record("1", None, &[("phone", "415-555-0103")])).await;
    let app = spawn_app_with(b, relay_to(&fake)).await;
    text(&app, "SMo1", PHONE, "STOP").await;
    eventually("the first STOP landed", || async { stamped(&fake, "1") }).await;
    eventually("done", || async { settled(&app.store).await }).await;

    fake.set_fault(Fault::Status500);
    // After each change, two failed tries: at least one of them after the change.
    let mut tried = 0;
    for (sid, kind) in [("SMo2", "START"), ("SMo3", "STOP"), ("SMo4", "START")] {
        text(&app, sid, PHONE, kind).await;
        tried += 2;
        eventually(&format!("{kind} tried while REDCap fails"), || async {
            row(&app.store, "redcap", PHONE).await.is_some_and(|r| r.attempts >= tried)
        })
        .await;
    }
    let r = row(&app.store, "redcap", PHONE).await.unwrap();
    assert!(r.last_error.as_deref().is_some_and(|e| e.contains("500")), "{r:?}");
    assert_eq!(r.written_opted_out, Some(true), "nothing written while REDCap fails");

    fake.set_fault(Fault::None);
    eventually("converged", || async { row(&app.store, "redcap", PHONE).await.is_some_and(|r| r.status == "done") })
        .await;
    assert_eq!(fake.value("1", None, FIELD).as_deref(), Some(""), "the START is the last word");
    let writes = writes_to(&fake, "1");
    assert_eq!(writes.len(), 2, "the first STOP, then one write of the latest: {writes:?}");
    assert!(!writes[0].is_empty() && writes[1].is_empty(), "stamp then clear, in that order: {writes:?}");
    app.stop().await;
}

/// A STOP dead-lettered (REDCap failing longer than `relay.max_age`), then a
/// START: the START makes the row pending again and converges it to the
/// START. Nothing was ever written for the phone, so there is nothing to
/// clear: no REDCap call at all, the STOP is never stamped, nothing is left
/// to replay.
async fn a_start_after_a_dead_stop_converges_without_stamping(b: Backend) {
    const PHONE: &str = "+14155550104";
    let fake = FakeRedcap::start(project().with_record("1", None, &[("phone", "415-555-0104")])).await;
    fake.set_fault(Fault::Status500);
    let app = spawn_app_with(b, |c| {
        relay_to(&fake)(c);
        c.relay.max_age = Duration::from_secs(1);
    })
    .await;
    text(&app, "SMd1", PHONE, "STOP").await;
    eventually("STOP dead", || async { deliveries(&app.store, Some("dead")).await.len() == 1 }).await;
    let dead = row(&app.store, "redcap", PHONE).await.unwrap();
    assert!(dead.last_error.as_deref().is_some_and(|e| e.contains("500")), "{dead:?}");

    fake.set_fault(Fault::None);
    text(&app, "SMd2", PHONE, "START").await;
    let start = event_id(&app.store, "SMd2").await;
    eventually("the START converged", || async {
        row(&app.store, "redcap", PHONE).await.is_some_and(|r| r.status == "done" && r.event_id == Some(start))
    })
    .await;
    let r = row(&app.store, "redcap", PHONE).await.unwrap();
    assert_eq!(r.written_opted_out, Some(false), "{r:?}");
    assert_eq!(app.store.replay_dead(None).await.unwrap(), 0, "nothing left to replay");
    assert_eq!(fake.value("1", None, FIELD).unwrap_or_default(), "", "the STOP must not be stamped");
    assert_eq!(fake.calls_of(CallKind::Import), 0, "nothing to write");
    app.stop().await;
}

/// A STOP landed; then, REDCap failing longer than `relay.max_age`, a START
/// and a newer STOP are dead-lettered, and a START after them makes the row
/// pending and dead again. The replay re-checks the current target, the
/// START: one clear, and the dead STOP's stamp is never written.
async fn a_dead_row_replayed_rechecks_the_current_target(b: Backend) {
    const PHONE: &str = "+14155550124";
    let fake = FakeRedcap::start(project().with_record("1", None, &[("phone", "415-555-0124")])).await;
    let app = spawn_app_with(b, |c| {
        relay_to(&fake)(c);
        c.relay.max_age = Duration::from_secs(1);
    })
    .await;
    text(&app, "SMr0", PHONE, "STOP").await;
    eventually("the first STOP landed", || async {
        row(&app.store, "redcap", PHONE).await.is_some_and(|r| r.status == "done")
    })
    .await;
    let first = fake.value("1", None, FIELD).unwrap();

    fake.set_fault(Fault::Status500);
    text(&app, "SMr1", PHONE, "START").await;
    text(&app, "SMr2", PHONE, "STOP").await;
    let stop = event_id(&app.store, "SMr2").await;
    eventually("the newer STOP dead", || async {
        row(&app.store, "redcap", PHONE).await.is_some_and(|r| r.status == "dead" && r.event_id == Some(stop))
    })
    .await;
    text(&app, "SMr3", PHONE, "START").await;
    let start = event_id(&app.store, "SMr3").await;
    eventually("the START made the row pending, and it died again", || async {
        row(&app.store, "redcap", PHONE).await.is_some_and(|r| r.status == "dead" && r.event_id == Some(start))
    })
    .await;

    fake.set_fault(Fault::None);
    assert_eq!(app.store.replay_dead(None).await.unwrap(), 1);
    eventually("the replayed row converged", || async {
        row(&app.store, "redcap", PHONE).await.is_some_and(|r| r.status == "done")
    })
    .await;
    let r = row(&app.store, "redcap", PHONE).await.unwrap();
    assert_eq!(r.written_opted_out, Some(false), "converged to the START: {r:?}");
    assert_eq!(fake.value("1", None, FIELD).as_deref(), Some(""), "the START is the last word");
    assert_eq!(writes_to(&fake, "1"), [first, String::new()], "the first stamp, then one clear");
    app.stop().await;
}

/// A dead STOP is replayed and its import held in flight; a START arrives
/// meanwhile. No other worker takes the row while the write is in flight (a
/// second replay and a manual retry change nothing), and once the STOP's
/// write ends the row is converged again: the START's clear lands after it.
async fn a_start_recorded_while_a_replayed_stop_is_written_lands_after_it(b: Backend) {
    const PHONE: &str = "+14155550114";
    let fake = FakeRedcap::start(project().with_record("1", None, &[("phone", "415-555-0114")]).with_record(
        "2",
        None,
        &[("phone", "415-555-0115")],
    ))
    .await;
    fake.set_fault(Fault::Status500);
    let app = spawn_app_with(b, |c| {
        relay_to(&fake)(c);
        c.relay.max_age = Duration::from_secs(1);
        // The STOP's import is held on purpose below: the client must not give up on it.
        c.redcap.as_mut().unwrap().request_timeout = Duration::from_secs(10);
        c.relay.lease = Duration::from_secs(40);
    })
    .await;
    text(&app, "SMdf1", PHONE, "STOP").await;
    eventually("STOP dead", || async { deliveries(&app.store, Some("dead")).await.len() == 1 }).await;
    fake.set_fault(Fault::None);
    eventually("REDCap healthy again", || async { health(&app.store, "redcap").await == "ok" }).await;

    // The replayed STOP's import is held in flight (one worker busy with it).
    let stop_import = fake.hold_next(CallKind::Import);
    assert_eq!(app.store.replay_dead(None).await.unwrap(), 1);
    eventually("the STOP's import in flight", || async { fake.calls_of(CallKind::Import) == 1 }).await;
    text(&app, "SMdf2", PHONE, "START").await;
    let r = row(&app.store, "redcap", PHONE).await.unwrap();
    assert_eq!(r.status, "pending");
    assert_eq!(app.store.replay_dead(None).await.unwrap(), 0, "nothing dead: the row is in flight");
    assert_eq!(app.store.retry_delivery(r.id).await.unwrap(), RetryOutcome::NotRetryable, "leased");
    // Another phone's change, recorded after the START: once it is written,
    // the other worker has claimed since, and would have taken the row with it.
    text(&app, "SMdf3", "+14155550115", "STOP").await;
    eventually("the other phone's change written", || async {
        row(&app.store, "redcap", "+14155550115").await.is_some_and(|r| r.status == "done")
    })
    .await;
    assert!(stamped(&fake, "2"));
    assert_eq!(writes_to(&fake, "1").len(), 1, "the in-flight row was taken up beside its held write");

    stop_import.open();
    eventually("converged to the START", || async {
        row(&app.store, "redcap", PHONE).await.is_some_and(|r| r.status == "done" && r.written_opted_out == Some(false))
    })
    .await;
    assert_eq!(fake.value("1", None, FIELD).as_deref(), Some(""), "the START is the last word");
    let writes = writes_to(&fake, "1");
    assert_eq!(writes.len(), 2, "{writes:?}");
    assert!(!writes[0].is_empty() && writes[1].is_empty(), "the STOP's stamp, then the START's clear: {writes:?}");
    app.stop().await;
}

async fn redcap_down_then_up_loses_nothing(b: Backend) {
    const PHONE: &str = "+14155550105";
    let fake = FakeRedcap::start(project().with_record("1", None, &[("phone", "4155550105")])).await;
    fake.set_fault(Fault::Status500);
    let app = spawn_app_with(b, relay_to(&fake)).await;
    text(&app, "SMdn1", PHONE, "STOP").await;
    let error = eventually_some("a failed attempt recorded", || async {
        row(&app.store, "redcap", PHONE).await.and_then(|r| r.last_error)
    })
    .await;
    assert!(error.contains("500"), "{error}");
    // The row's outcome is recorded just before the sink's.
    eventually("REDCap backing off", || async { health(&app.store, "redcap").await == "backing_off" }).await;
    let sink = app.store.sink("redcap").await.unwrap().unwrap();
    assert!(sink.failing_since.is_some() && sink.last_error.as_deref().is_some_and(|e| e.contains("500")));
    assert_eq!(fake.value("1", None, FIELD).as_deref(), Some(""), "nothing written while REDCap fails");
    // Then REDCap hangs: every call is held past the client's 2 s timeout and does nothing.
    fake.set_fault(Fault::Timeout(Duration::from_secs(60)));
    let error = eventually_some("a timed-out attempt recorded", || async {
        row(&app.store, "redcap", PHONE).await.and_then(|r| r.last_error).filter(|e| !e.contains("500"))
    })
    .await;
    assert!(error.contains("did not answer"), "{error}");
    assert_eq!(fake.value("1", None, FIELD).as_deref(), Some(""), "nothing written while REDCap hangs");
    fake.set_fault(Fault::None);
    eventually("stamped once REDCap is back", || async { stamped(&fake, "1") }).await;
    eventually("done", || async { settled(&app.store).await }).await;
    let r = row(&app.store, "redcap", PHONE).await.unwrap();
    assert_eq!((r.status.as_str(), r.written_opted_out, r.last_error.as_deref()), ("done", Some(true), None));
    // The sink's health is recorded just after the row's outcome.
    eventually("REDCap healthy again", || async { health(&app.store, "redcap").await == "ok" }).await;
    let sink = app.store.sink("redcap").await.unwrap().unwrap();
    assert_eq!((sink.failing_since, sink.last_error), (None, None));
    app.stop().await;
}

/// An import answered 500 may or may not have landed: the records are read
/// again, the stamp written (it had not landed), and read once more later,
/// when nothing differs and nothing is written.
async fn an_import_answered_500_is_reread_and_stamps_once(b: Backend) {
    const PHONE: &str = "+14155550111";
    let fake = FakeRedcap::start(project().with_record("1", None, &[("phone", "4155550111")])).await;
    // Only the first import fails; the export before it and every later call succeed.
    fake.fail_next(CallKind::Import, Fault::Status500);
    let app = spawn_app_with(b, relay_to(&fake)).await;
    text(&app, "SMfi1", PHONE, "STOP").await;
    eventually("the write's outcome unknown", || async {
        row(&app.store, "redcap", PHONE).await.is_some_and(|r| r.uncertain)
    })
    .await;
    eventually("done after the late re-read", || async {
        row(&app.store, "redcap", PHONE).await.is_some_and(|r| r.status == "done" && !r.uncertain)
    })
    .await;
    stamp_is_now_in_new_york(&fake.value("1", None, FIELD).unwrap());
    let imports: Vec<Fault> =
        fake.call_log().into_iter().filter(|c| c.kind == CallKind::Import).map(|c| c.fault).collect();
    assert_eq!(imports, [Fault::Status500, Fault::None], "one failed import, then one that stamped");
    assert!(fake.calls_of(CallKind::Export) >= 3, "read, re-read, late re-read");
    assert_eq!(fake.pending_faults(), 0);
    let done = row(&app.store, "redcap", PHONE).await.unwrap();
    assert_eq!(done.result.as_ref().unwrap()["records"], json!(["1"]));
    app.stop().await;
}

async fn a_short_import_count_is_retried_until_every_record_is_written(b: Backend) {
    const PHONE: &str = "+14155550112";
    let p = project()
        .with_record("1", None, &[("phone", "415-555-0112")])
        .with_record("2", None, &[("phone", "(415) 555-0112")])
        .with_record("3", None, &[("phone", "4155550112")]);
    let fake = FakeRedcap::start(p).await;
    // The first import saves two of the three records and says so; the retry is
    // held until the test has seen the row waiting.
    fake.fail_next(CallKind::Import, Fault::ShortCount);
    let retry = fake.hold_next(CallKind::Import);
    let app = spawn_app_with(b, relay_to(&fake)).await;
    text(&app, "SMsc1", PHONE, "STOP").await;
    let error = eventually_some("the short count recorded on the pending row", || async {
        row(&app.store, "redcap", PHONE).await.filter(|r| r.status == "pending").and_then(|r| r.last_error)
    })
    .await;
    assert!(error.contains("reported 2 record(s) updated of 3 sent"), "{error}");
    assert!(stamped(&fake, "1") && stamped(&fake, "2") && !stamped(&fake, "3"), "the fake saved only what it counted");
    retry.open();
    eventually("done", || async {
        row(&app.store, "redcap", PHONE).await.is_some_and(|r| r.status == "done" && !r.uncertain)
    })
    .await;
    assert!(stamped(&fake, "3"), "the retry writes the record the first import missed");
    assert_eq!(fake.calls_of(CallKind::Import), 2, "the late re-read finds nothing to write");
    let writes = writes_to(&fake, "3");
    assert_eq!(writes.len(), 2, "sent twice, saved once: {writes:?}");
    assert_eq!(writes_to(&fake, "1").len(), 1, "a saved record is not written again");
    app.stop().await;
}

/// Reads work but every import comes back short: each write's outcome is
/// unknown, so the sink is failing all along. Its `failing_since` must hold
/// from the first failure (the alert runs on it) and its health must not
/// read `ok` in between while nothing lands.
async fn a_sink_whose_every_write_is_uncertain_stays_failing(b: Backend) {
    const PHONE: &str = "+14155550113";
    let fake = FakeRedcap::start(project().with_record("1", None, &[("phone", "4155550113")])).await;
    fake.set_fault(Fault::ShortCount);
    let app = spawn_app_with(b, relay_to(&fake)).await;
    text(&app, "SMun1", PHONE, "STOP").await;
    eventually("REDCap backing off", || async { health(&app.store, "redcap").await == "backing_off" }).await;
    let since = app.store.sink("redcap").await.unwrap().unwrap().failing_since;
    // About ten re-reads and re-writes (recheck_soon 300 ms), all short.
    let mut seen = Vec::new();
    let end = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < end {
        let s = app.store.sink("redcap").await.unwrap().unwrap();
        if s.health == "ok" || s.failing_since != since {
            seen.push((s.health, s.failing_since));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!stamped(&fake, "1"), "nothing lands while every import is short");
    assert!(fake.calls_of(CallKind::Import) >= 3, "re-written: {} imports", fake.calls_of(CallKind::Import));
    assert!(
        seen.is_empty(),
        "the sink read healthy, or its failure restarted, while failing since {since:?}: {seen:?}"
    );
    fake.set_fault(Fault::None);
    eventually("stamped once imports work", || async { stamped(&fake, "1") }).await;
    eventually("healthy", || async { health(&app.store, "redcap").await == "ok" }).await;
    app.stop().await;
}

async fn a_wrong_token_is_reported_and_everything_lands_once_fixed(b: Backend) {
    const PHONE: &str = "+14155550106";
    let fake = FakeRedcap::start(project().with_record("1", None, &[("phone", "4155550106")])).await;
    fake.set_fault(Fault::BadToken);
    let app = spawn_app_with(b, relay_to(&fake)).await;
    text(&app, "SMtk1", PHONE, "STOP").await;
    let err = eventually_some("403 recorded on the row", || async {
        row(&app.store, "redcap", PHONE).await.and_then(|r| r.last_error).filter(|e| e.contains("403"))
    })
    .await;
    assert!(!err.contains(REDCAP_TOKEN), "the token must never appear in an error: {err}");
    // The row's outcome is recorded just before the sink's.
    eventually("REDCap misconfigured", || async { health(&app.store, "redcap").await == "misconfigured" }).await;
    let sink = app.store.sink("redcap").await.unwrap().unwrap();
    assert!(!sink.last_error.unwrap_or_default().contains(REDCAP_TOKEN));
    fake.set_fault(Fault::None);
    eventually("stamped after the fix", || async { stamped(&fake, "1") }).await;
    eventually("healthy", || async { health(&app.store, "redcap").await == "ok" }).await;
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
    text(&app, "SMnm1", "+14155550107", "STOP").await;
    eventually("done", || async { deliveries(&app.store, Some("done")).await.len() == 1 }).await;
    let r = &deliveries(&app.store, Some("done")).await[0];
    assert_eq!(r.result.as_ref().unwrap()["records"], json!([]));
    assert_eq!(r.written_opted_out, Some(true), "the sink holds the target: no record has the number");
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
    text(&app, "SMl1", "+14155550108", "STOP").await;
    eventually("both records stamped", || async {
        fake.value("1", Some("enrol_arm_1"), FIELD).is_some_and(|v| !v.is_empty())
            && fake.value("2", Some("followup_arm_1"), FIELD).is_some_and(|v| !v.is_empty())
    })
    .await;
    assert_eq!(fake.value("1", Some("followup_arm_1"), FIELD).unwrap_or_default(), "");
    app.stop().await;
}

// ------------------------------------------------------------------- email

/// The mail waits for REDCap's outcome and names the records it updated.
async fn the_study_team_is_emailed_what_redcap_did(b: Backend) {
    let fake = FakeRedcap::start(project().with_record("41", None, &[("phone", "(415) 555-0110")])).await;
    let smtp = FakeSmtp::start().await;
    let app = spawn_app_with(b, |c| {
        relay_to(&fake)(c);
        c.email = Some(mail_to(&smtp));
    })
    .await;
    text(&app, "SMmail1", "+14155550110", "STOP").await;
    eventually("email sent", || async { !smtp.messages().is_empty() }).await;
    assert!(stamped(&fake, "41"), "REDCap was stamped first");
    let msg = &smtp.messages()[0];
    assert_eq!(msg.to, [COORDINATOR]);
    let subject = msg.header("Subject").unwrap_or_default();
    assert!(subject.contains("Opt-out") && !subject.contains("waiting"), "{subject}");
    let body = msg.body();
    assert!(body.contains("+14155550110"), "{body}");
    assert!(body.contains("REDCap: done at"), "REDCap's outcome: {body}");
    assert!(body.contains("Records with this number: 41"), "names the record updated: {body}");
    eventually("both rows done", || async { deliveries(&app.store, Some("done")).await.len() == 2 }).await;
    assert_eq!(smtp.messages().len(), 1);
    app.stop().await;
}

/// REDCap failing: the mail does not wait past `report_wait`; it says REDCap
/// is still waiting and why. REDCap's later success sends no second mail.
async fn the_mail_reports_redcap_still_waiting_with_its_error_after_report_wait(b: Backend) {
    let fake = FakeRedcap::start(project().with_record("42", None, &[("phone", "(415) 555-0116")])).await;
    fake.set_fault(Fault::Status500);
    let smtp = FakeSmtp::start().await;
    let app = spawn_app_with(b, |c| {
        relay_to(&fake)(c);
        let mut e = mail_to(&smtp);
        e.report_wait = Duration::from_secs(1);
        c.email = Some(e);
    })
    .await;
    text(&app, "SMmail2", "+14155550116", "STOP").await;
    eventually("email sent though REDCap fails", || async { !smtp.messages().is_empty() }).await;
    assert!(!stamped(&fake, "42"));
    let msg = &smtp.messages()[0];
    let subject = msg.header("Subject").unwrap_or_default();
    assert!(subject.contains("REDCap delivery waiting"), "{subject}");
    let body = msg.body();
    assert!(body.contains("REDCap delivery waiting: not done yet"), "{body}");
    assert!(body.contains("Last error: REDCap answered 500"), "{body}");

    fake.set_fault(Fault::None);
    eventually("stamped once REDCap is back", || async { stamped(&fake, "42") }).await;
    eventually("both rows done", || async { deliveries(&app.store, Some("done")).await.len() == 2 }).await;
    assert_eq!(smtp.messages().len(), 1, "a change is notified once");
    app.stop().await;
}

/// HELP changes no state: it queues nothing and sends no mail.
async fn a_help_message_sends_no_email(b: Backend) {
    let smtp = FakeSmtp::start().await;
    let app = spawn_app_with(b, |c| {
        c.relay.poll_interval = Duration::from_millis(50);
        c.email = Some(mail_to(&smtp));
    })
    .await;
    text(&app, "SMhelp1", "+14155550117", "HELP").await;
    // A change after it, as a sync point: once its mail is out, the HELP's would be too.
    text(&app, "SMhelp2", "+14155550118", "STOP").await;
    eventually("the STOP's email sent", || async { !smtp.messages().is_empty() }).await;
    eventually("done", || async { settled(&app.store).await }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let messages = smtp.messages();
    assert_eq!(messages.len(), 1, "{:?}", messages.iter().map(|m| m.header("Subject")).collect::<Vec<_>>());
    assert!(messages[0].body().contains("+14155550118"));
    assert!(row(&app.store, "email", "+14155550117").await.is_none(), "the HELP queued nothing");
    app.stop().await;
}

/// A refused login is misconfiguration: the email sink is marked so, and the
/// notifications waiting behind the first do not each try to log in (one
/// login per worker at most).
async fn a_refused_smtp_login_makes_the_email_sink_misconfigured_with_one_login(b: Backend) {
    let smtp = FakeSmtp::start_with_auth("relay", "right-password").await;
    let phones: Vec<String> = (0..6).map(|i| format!("+1415555{:04}", 7000 + i)).collect();
    let refs: Vec<&str> = phones.iter().map(String::as_str).collect();
    let dir = tempfile::tempdir().unwrap();
    let (url, store) = seeded_store(b, &dir, &refs, &[follow("email")]).await;
    let mut config = base_config(&url);
    config.relay.poll_interval = Duration::from_millis(50);
    config.relay.misconfigured_retry = Duration::from_secs(3600);
    let mut e = mail_to(&smtp);
    e.username = Some("relay".into());
    e.password = Some(SecretString::from("wrong-password"));
    config.email = Some(e);
    let (stop, handle) = serve(config).await;

    eventually("the email sink misconfigured", || async { health(&store, "email").await == "misconfigured" }).await;
    let sink = store.sink("email").await.unwrap().unwrap();
    let error = sink.last_error.unwrap_or_default();
    assert!(error.contains("refused the login"), "{error}");
    assert!(!error.contains("wrong-password"), "{error}");
    // Give the other notifications every chance to try.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The two workers may split the six between them at start (PostgreSQL's
    // SKIP LOCKED): one login each at most, then the sink waits.
    let logins = smtp.auth_attempts();
    assert!((1..=2).contains(&logins), "{logins} logins for six waiting notifications and two workers");
    assert!(smtp.messages().is_empty());
    assert_eq!(pending(&store).await, 6, "every notification still waits");
    stop.cancel();
    let _ = handle.await;
    drop_database(&url).await;
}

/// REDCap failing longer than `alert_after` is mailed, once; its recovery
/// too. The alert monitor looks at start and then every 15 s, so the sink is
/// found failing at start (its failure recorded by an earlier run) and the
/// recovery is mailed at the next look: this test takes about 16 s.
async fn a_failing_sink_is_alerted_by_mail_and_so_is_its_recovery(b: Backend) {
    let fake = FakeRedcap::start(project().with_record("1", None, &[("phone", "4155550120")])).await;
    fake.set_fault(Fault::Status500);
    let smtp = FakeSmtp::start().await;
    let dir = tempfile::tempdir().unwrap();
    // An earlier run: the sinks known, a STOP waiting for REDCap, which fails.
    let (url, store) = seeded_store(b, &dir, &[], &[]).await;
    store.register_sinks(&[follow("redcap"), follow("email")]).await.unwrap();
    store.record_events(&[new_stop("SMalert1", "+14155550120")]).await.unwrap();
    store.fan_out(&[follow("redcap")], u32::MAX).await.unwrap();
    store.sink_failed("redcap", Failing::BackingOff, 1, Utc::now(), "REDCap answered 500 to the export").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let mut config = base_config(&url);
    relay_to(&fake)(&mut config);
    let mut e = mail_to(&smtp);
    e.alert_after = Duration::from_secs(1);
    config.email = Some(e);
    let (stop, handle) = serve(config).await;
    eventually("the alert mailed", || async { !smtp.messages().is_empty() }).await;
    let alert = &smtp.messages()[0];
    let subject = alert.header("Subject").unwrap_or_default();
    assert!(subject.contains("ALERT: sink redcap is failing (1 phone waiting)"), "{subject}");
    assert!(alert.body().contains("500"), "{}", alert.body());
    assert!(store.sink("redcap").await.unwrap().unwrap().alerted_at.is_some());

    fake.set_fault(Fault::None);
    eventually("stamped once REDCap is back", || async { stamped(&fake, "1") }).await;
    eventually("the recovery mailed", || async { smtp.messages().len() >= 2 }).await;
    let messages = smtp.messages();
    let subject = messages[1].header("Subject").unwrap_or_default();
    assert!(subject.contains("recovered: sink redcap works again"), "{subject}");
    assert_eq!(messages.len(), 2, "one alert, one recovery");
    eventually("the alert cleared", || async {
        store.sink("redcap").await.unwrap().is_some_and(|s| s.alerted_at.is_none())
    })
    .await;
    stop.cancel();
    let _ = handle.await;
    drop_database(&url).await;
}

// ----------------------------------------------- seeded stores and replicas

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

/// Writes STOPs straight into a fresh store (as an earlier process would have).
async fn seeded_store(b: Backend, dir: &tempfile::TempDir, phones: &[&str], sinks: &[SinkFollow]) -> (String, Store) {
    let url = fresh_database(b, dir).await;
    let store = Store::connect_lazy(&base_config(&url).database).unwrap();
    store.migrate().await.unwrap();
    let events: Vec<NewEvent> = phones.iter().enumerate().map(|(i, p)| new_stop(&format!("SMseed{i}"), p)).collect();
    if !events.is_empty() {
        store.record_events(&events).await.unwrap();
        store.fan_out(sinks, u32::MAX).await.unwrap();
    }
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
    let (url, store) = seeded_store(b, &dir, &["+14155550109"], &[follow("redcap")]).await;
    // A worker claims it with a lease no test outlives, and dies without settling.
    let claimed = store.claim("redcap", "crashed-worker", 10, Duration::from_secs(3600)).await.unwrap();
    assert_eq!(claimed.len(), 1);
    // Another phone's change, free to take.
    store.record_events(&[new_stop("SMfree", "+14155550119")]).await.unwrap();
    store.fan_out(&[follow("redcap")], u32::MAX).await.unwrap();

    let mut config = base_config(&url);
    relay_to(&fake)(&mut config);
    let (stop, handle) = serve(config).await;
    // The running relay writes the free change, so it has claimed at least once
    // while the lease held; the leased row is left alone.
    eventually("the free change written", || async { deliveries(&store, Some("done")).await.len() == 1 }).await;
    assert!(stamped(&fake, "2"));
    assert_eq!(fake.value("1", None, FIELD).as_deref(), Some(""), "not touched while the lease holds");
    let leased = deliveries(&store, Some("pending")).await;
    assert_eq!((leased.len(), leased[0].id), (1, claimed[0].id));

    // The lease runs out (moved into the past rather than waited for).
    let expire = match b {
        Backend::Postgres => {
            "UPDATE sink_phones SET locked_until = now() - interval '1 second', next_attempt_at = now() - interval '1 second'
              WHERE locked_until IS NOT NULL"
        }
        Backend::Sqlite => "UPDATE sink_phones SET locked_until = 0, next_attempt_at = 0 WHERE locked_until IS NOT NULL",
    };
    exec(&url, &[expire]).await;
    eventually("retried after the lease expired", || async { stamped(&fake, "1") }).await;
    eventually("done", || async { settled(&store).await }).await;
    // The crashed worker, should it wake, can no longer settle the row.
    let failed = Settle::Failed { error: "late".into() };
    assert!(!settle_one(&store, &claimed[0], "crashed-worker", &failed).await, "its lease is gone");
    let r = deliveries(&store, None).await.into_iter().find(|d| d.id == claimed[0].id).unwrap();
    assert_eq!((r.status.as_str(), r.last_error), ("done", None));
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
    let (url, store) = seeded_store(b, &dir, &refs, &[follow("redcap")]).await;
    let mut config = base_config(&url);
    relay_to(&fake)(&mut config);
    config.relay.workers = 1;
    let (stop, handle) = serve(config).await;
    eventually("backlog written", || async { settled(&store).await }).await;
    assert!((0..120).all(|i| stamped(&fake, &format!("r{i}"))));
    assert_eq!(fake.calls_of(CallKind::Export), 1, "one export for the whole batch");
    assert_eq!(fake.calls_of(CallKind::Import), 1, "one import for the whole batch");
    stop.cancel();
    let _ = handle.await;
    drop_database(&url).await;
}

/// A second replica on `first`'s database, stopped with it.
async fn second_replica(first: &TestApp, tweak: impl FnOnce(&mut Config)) -> String {
    let mut config = base_config(&first.db_url);
    tweak(&mut config);
    let app = Application::build(config).await.unwrap();
    let addr = app.local_addr();
    tokio::spawn(app.run_until(first.shutdown.clone()));
    format!("http://{addr}/twilio/messages")
}

/// Two replicas on one PostgreSQL database, each phone's STOP, START, STOP
/// through alternating replicas: every record ends stamped. A newer change
/// supersedes a pending one, so a record may get fewer than three writes,
/// but the last one REDCap received is a stamp.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_postgres_end_every_record_at_the_latest_change() {
    let phones: Vec<String> = (0..20).map(|i| format!("+1415555{:04}", 5000 + i)).collect();
    let mut p = project();
    for (i, ph) in phones.iter().enumerate() {
        p = p.with_record(&format!("{i}"), None, &[("phone", &ph[2..])]);
    }
    let fake = FakeRedcap::start(p).await;
    fake.set_latency(Duration::from_millis(20));
    let first = spawn_app_with(Backend::Postgres, relay_to(&fake)).await;
    let second = second_replica(&first, relay_to(&fake)).await;

    // Per phone: STOP, START, STOP, each through a different replica, in order.
    let kinds = ["STOP", "START", "STOP"];
    let mut tasks = Vec::new();
    for (i, ph) in phones.iter().enumerate() {
        let (client, ph) = (first.client.clone(), ph.clone());
        let urls = [first.url("/twilio/messages"), second.clone()];
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
    eventually("all converged", || async { settled(&first.store).await }).await;
    let done = deliveries(&first.store, Some("done")).await;
    assert_eq!(done.len(), 20, "one row per phone");
    assert!(done.iter().all(|r| r.written_opted_out == Some(true)), "{done:?}");

    let writes = writes_by_record(&fake);
    for i in 0..20 {
        let record = i.to_string();
        let w = writes.get(&record).cloned().unwrap_or_default();
        assert!(w.last().is_some_and(|v| !v.is_empty()), "record {i}: the last write must be a stamp: {w:?}");
        assert!(w.len() <= 3, "record {i}: at most one write per change: {w:?}");
        assert!(!w[0].is_empty(), "record {i}: nothing to clear before the first stamp: {w:?}");
        assert!(stamped(&fake, &record), "record {i} ended cleared");
    }
    first.stop().await;
}

/// `relay_to` with the default backoff steps.
fn default_backoff_to(fake: &FakeRedcap) -> impl FnOnce(&mut Config) + '_ {
    move |c: &mut Config| {
        relay_to(fake)(c);
        c.relay.retry_base = Duration::from_secs(1);
        c.relay.retry_cap = Duration::from_secs(15);
    }
}

/// Two replicas share the sink's health: while REDCap is down, one probe per
/// backoff step in all, not one per replica or worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_postgres_probe_a_failing_redcap_once_per_step() {
    let phones: Vec<String> = (0..6).map(|i| format!("+1415555{:04}", 5100 + i)).collect();
    let mut p = project();
    for (i, ph) in phones.iter().enumerate() {
        p = p.with_record(&format!("{i}"), None, &[("phone", &ph[2..])]);
    }
    let fake = FakeRedcap::start(p).await;
    fake.set_fault(Fault::Status500);
    // The default backoff (1 s doubling, ±20 %): within 5 s at most 3 probes
    // (0.8 + 1.6 + 3.2 s > 5 s); replicas probing on their own would double it.
    let first = spawn_app_with(Backend::Postgres, default_backoff_to(&fake)).await;
    let second = second_replica(&first, default_backoff_to(&fake)).await;
    for (i, ph) in phones.iter().enumerate() {
        let params = stop_params(&format!("SMprobe{i}"), ph, "STOP", Some("STOP"));
        let url = if i % 2 == 0 { first.url("/twilio/messages") } else { second.clone() };
        assert_eq!(send_signed(&first.client, &url, &params).await, 200);
    }
    eventually("REDCap backing off", || async { health(&first.store, "redcap").await == "backing_off" }).await;
    // Let the batches claimed before the first failure end, then count.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let step = |s: &Store| {
        let s = s.clone();
        async move { s.sink("redcap").await.unwrap().unwrap().backoff_step }
    };
    fake.reset_calls();
    let before = step(&first.store).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let calls = fake.calls();
    let steps = step(&first.store).await - before;
    assert!(calls <= 4, "{calls} REDCap calls in 5 s of outage with two replicas (one replica: at most 3)");
    assert!(calls as i32 <= steps + 1, "{calls} calls for {steps} backoff steps: one probe per step");
    assert_eq!(fake.value("0", None, FIELD).unwrap_or_default(), "");

    fake.set_fault(Fault::None);
    eventually("every record stamped once REDCap is back", || async { (0..6).all(|i| stamped(&fake, &i.to_string())) })
        .await;
    eventually("all converged", || async { settled(&first.store).await }).await;
    first.stop().await;
}

both_backends!(
    stop_stamps_every_record_with_that_number_in_any_format,
    start_after_stop_clears_the_field,
    a_stop_retried_after_a_later_start_never_restamps,
    a_start_after_a_dead_stop_converges_without_stamping,
    a_dead_row_replayed_rechecks_the_current_target,
    a_start_recorded_while_a_replayed_stop_is_written_lands_after_it,
    redcap_down_then_up_loses_nothing,
    a_sink_whose_every_write_is_uncertain_stays_failing,
    a_wrong_token_is_reported_and_everything_lands_once_fixed,
    no_matching_record_is_done_with_zero_records,
    longitudinal_projects_stamp_the_event_where_the_phone_matched,
    an_import_answered_500_is_reread_and_stamps_once,
    a_short_import_count_is_retried_until_every_record_is_written,
    a_crashed_workers_lease_expires_and_the_delivery_is_retried,
    a_backlog_is_delivered_in_few_redcap_calls,
    the_study_team_is_emailed_what_redcap_did,
    the_mail_reports_redcap_still_waiting_with_its_error_after_report_wait,
    a_help_message_sends_no_email,
    a_refused_smtp_login_makes_the_email_sink_misconfigured_with_one_login,
    a_failing_sink_is_alerted_by_mail_and_so_is_its_recovery,
);
