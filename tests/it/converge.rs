//! Converge, don't fire: each fault that broke the replaying relay, injected
//! from outside (a frozen worker, an import REDCap applies after the client
//! gave up, a START to another service, a record enrolled after the STOP, a
//! sink configured later, an outage, a wrong token fixed by a restart), and
//! the sink still ends in the opt-out list's current state.

use std::time::Duration;

use chrono::Utc;

use crate::both_backends;
use crate::common::fake_redcap::{CallKind, FakeProject, FakeRedcap, Fault};
use crate::common::*;
use optout_relay::config::Config;
use optout_relay::domain::Phone;
use optout_relay::sinks::{Convergence, Target};
use optout_relay::startup::Application;
use optout_relay::store::{Held, Settle, Settled, Store};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

const REDCAP_TOKEN: &str = "0123456789ABCDEF0123456789ABCDEF";
const FIELD: &str = "opted_out_at";
const PHONE: &str = "+14155550142";

fn project() -> FakeProject {
    FakeProject::new(
        REDCAP_TOKEN,
        &[("study_id", "enrol", ""), ("phone", "enrol", ""), (FIELD, "enrol", "datetime_seconds_ymd")],
    )
    .with_record("1", None, &[("phone", "(415) 555-0142")])
}

/// Fast relay settings against `fake`; the sink keeps its default backoff
/// unless a test says otherwise.
fn relay_to(fake: &FakeRedcap) -> impl FnOnce(&mut Config) + '_ {
    move |c: &mut Config| {
        let mut r = redcap_config(&fake.url);
        r.token = SecretString::from(REDCAP_TOKEN);
        r.request_timeout = Duration::from_secs(1);
        c.redcap = Some(r);
        quick_relay(c);
        // After the fake applies a timed-out import late (2.5 s after it was sent).
        c.relay.recheck_late = Duration::from_secs(4);
    }
}

async fn serve(config: Config) -> (CancellationToken, tokio::task::JoinHandle<std::io::Result<()>>, Store) {
    let app = Application::build(config).await.expect("build");
    let store = app.store().clone();
    store.migrate().await.expect("migrate");
    let token = CancellationToken::new();
    (token.clone(), tokio::spawn(app.run_until(token)), store)
}

async fn text(app: &TestApp, sid: &str, body: &str, service: &str) {
    let mut params = stop_params(sid, PHONE, body, None);
    for (k, v) in params.iter_mut() {
        if k == "MessagingServiceSid" {
            *v = service.to_owned();
        }
    }
    assert_eq!(app.post_signed(&params, TOKEN).await.status(), 200, "{body} accepted");
}

fn stamped(fake: &FakeRedcap, record: &str) -> bool {
    fake.value(record, None, FIELD).is_some_and(|v| !v.is_empty())
}

/// The phone's row of `sink`, as the admin API shows it.
async fn row(store: &Store, sink: &str) -> Option<optout_relay::store::DeliveryRow> {
    let phone = Phone::from_stored(PHONE.to_owned());
    store.deliveries_of_phone(&phone).await.expect("rows").into_iter().find(|r| r.sink == sink)
}

async fn in_sync(store: &Store) -> bool {
    row(store, "redcap").await.is_some_and(|r| r.status == "done" && !r.uncertain)
}

// ------------------------------------------------------------ frozen worker

/// A worker claims the STOP, freezes past its lease, and resumes to send an
/// older START after another worker wrote the STOP: the write under a lost
/// lease is re-read and the field ends stamped.
async fn a_frozen_worker_resumed_after_its_lease_was_taken_cannot_leave_the_field_cleared(b: Backend) {
    let fake = FakeRedcap::start(project()).await;
    let app = spawn_app_with(b, relay_to(&fake)).await;
    text(&app, "SMfrz1", "START", SERVICE).await;
    eventually("the START converged", || async { in_sync(&app.store).await }).await;
    text(&app, "SMfrz2", "STOP", SERVICE).await;
    eventually("the STOP stamped", || async { stamped(&fake, "1") }).await;
    eventually("in sync", || async { in_sync(&app.store).await }).await;

    // The frozen worker: it had claimed the row (lease long gone), then resumes
    // and sends what it held, an opt-in, straight to REDCap.
    let frozen = redcap_sink(&fake);
    frozen
        .converge(&[Convergence { phone: Phone::from_stored(PHONE.into()), target: Target::OptedIn }], None)
        .await
        .expect("the stale write reaches REDCap");
    assert!(!stamped(&fake, "1"), "the stale write cleared the field");
    // It settles what it wrote: its lease is lost, so the row is owed a re-read.
    let r = row(&app.store, "redcap").await.expect("row");
    let now = Utc::now();
    let stale = Settled {
        id: r.id,
        generation: 0,
        how: Settle::Written { held: Held { opted_out: false, since: None }, result: None },
    };
    let held = app
        .store
        .settle_many("frozen-worker", &[stale], now - chrono::Duration::days(3), (now, now), now)
        .await
        .expect("settle");
    assert_eq!(held, 0, "the frozen worker no longer holds the lease");
    eventually("the field stamped again", || async { stamped(&fake, "1") }).await;
    eventually("in sync", || async { in_sync(&app.store).await }).await;
    app.stop().await;
}

// ------------------------------------------------------- late-applied import

/// A START import times out at the client and REDCap applies it after the
/// newer STOP landed: the late re-read restamps the field.
async fn an_import_applied_after_its_timeout_is_undone_by_the_late_recheck(b: Backend) {
    let fake = FakeRedcap::start(project()).await;
    let app = spawn_app_with(b, relay_to(&fake)).await;
    text(&app, "SMlate1", "STOP", SERVICE).await;
    eventually("stamped", || async { stamped(&fake, "1") }).await;
    eventually("in sync", || async { in_sync(&app.store).await }).await;

    // The START's import: the client gives up at 1 s, REDCap applies it at 2.5 s.
    fake.apply_late_next_import(Duration::from_millis(2500));
    text(&app, "SMlate2", "START", SERVICE).await;
    eventually("the START's write is uncertain", || async {
        row(&app.store, "redcap").await.is_some_and(|r| r.uncertain)
    })
    .await;
    text(&app, "SMlate3", "STOP", SERVICE).await;
    eventually("the late START landed", || async { fake.late_imports_applied() == 1 }).await;
    eventually("restamped by the late re-read", || async { stamped(&fake, "1") }).await;
    eventually("in sync", || async { in_sync(&app.store).await }).await;
    assert!(stamped(&fake, "1"));
    app.stop().await;
}

// ------------------------------------------------------ START on another service

async fn a_start_on_another_service_leaves_the_stop_of_the_first_standing(b: Backend) {
    let fake = FakeRedcap::start(project()).await;
    let app = spawn_app_with(b, relay_to(&fake)).await;
    text(&app, "SMsvc1", "STOP", "MGaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa").await;
    eventually("stamped", || async { stamped(&fake, "1") }).await;
    text(&app, "SMsvc2", "START", "MGbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb").await;
    eventually("the START considered", || async { in_sync(&app.store).await }).await;
    // Give a wrong relay every chance to clear it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(stamped(&fake, "1"), "a START to another service cleared the field");
    let r = row(&app.store, "redcap").await.expect("row");
    assert_eq!(r.written_opted_out, Some(true));
    app.stop().await;
}

// -------------------------------------------------- record added after the STOP

async fn a_record_enrolled_after_the_stop_is_stamped_by_the_resync(b: Backend) {
    let fake = FakeRedcap::start(project()).await;
    let app = spawn_app_with(b, |c| {
        relay_to(&fake)(c);
        if let Some(r) = c.redcap.as_mut() {
            r.resync_interval = Duration::from_secs(1);
        }
    })
    .await;
    text(&app, "SMenr1", "STOP", SERVICE).await;
    eventually("stamped", || async { stamped(&fake, "1") }).await;
    // Enrolled later, the number typed another way; and a staff stamp on a
    // record of an opted-in number that the resync must leave alone.
    fake.set_value("2", None, "phone", "415.555.0142");
    fake.set_value("3", None, "phone", "4155550199");
    fake.set_value("3", None, FIELD, "2026-01-01 00:00:00");
    eventually("the new record stamped by the resync", || async { stamped(&fake, "2") }).await;
    assert_eq!(fake.value("2", None, FIELD), fake.value("1", None, FIELD), "the same opt-out time");
    assert_eq!(fake.value("3", None, FIELD).as_deref(), Some("2026-01-01 00:00:00"), "never cleared or changed");
    app.stop().await;
}

// ----------------------------------------------------------- sink added later

async fn a_sink_configured_after_the_opt_outs_receives_them_at_start(b: Backend) {
    let fake = FakeRedcap::start(project().with_record("2", None, &[("phone", "4155550143")])).await;
    // First run: no sink; two STOPs and one STOP-then-START are recorded.
    let first = spawn_app(b).await;
    text(&first, "SMadd1", "STOP", SERVICE).await;
    let other = stop_params("SMadd2", "+14155550143", "STOP", None);
    assert_eq!(first.post_signed(&other, TOKEN).await.status(), 200);
    let url = first.db_url.clone();
    first.shutdown.cancel();
    let _ = first.handle.await;

    // Second run: the REDCap sink is configured. No command is run.
    let mut config = base_config(&url);
    relay_to(&fake)(&mut config);
    let (stop, handle, _store) = serve(config).await;
    eventually("both opted-out phones stamped", || async { stamped(&fake, "1") && stamped(&fake, "2") }).await;
    stop.cancel();
    let _ = handle.await;
    drop_database(&url).await;
}

// ------------------------------------------------------------ outage recovery

/// With the default backoff: a 10 s outage costs a handful of calls, and the
/// waiting opt-outs land within seconds of REDCap answering again, in one
/// export and one import.
async fn after_an_outage_the_backlog_lands_at_once_in_one_batch(b: Backend) {
    let phones: Vec<String> = (0..20).map(|i| format!("+1415555{:04}", 6000 + i)).collect();
    let mut p = project();
    for (i, ph) in phones.iter().enumerate() {
        p = p.with_record(&format!("o{i}"), None, &[("phone", &ph[2..])]);
    }
    let fake = FakeRedcap::start(p).await;
    let app = spawn_app_with(b, |c| {
        relay_to(&fake)(c);
        let defaults = optout_relay::config::RelayConfig::default();
        c.relay.retry_base = defaults.retry_base;
        c.relay.retry_cap = defaults.retry_cap;
    })
    .await;
    fake.set_fault(Fault::Status500);
    for (i, ph) in phones.iter().enumerate() {
        let params = stop_params(&format!("SMout{i}"), ph, "STOP", None);
        assert_eq!(app.post_signed(&params, TOKEN).await.status(), 200);
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = fake.calls();
    assert!(during <= 8, "{during} REDCap calls during a 10 s outage");
    fake.set_fault(Fault::None);
    fake.reset_calls();
    let back = std::time::Instant::now();
    eventually("every opt-out landed", || async {
        (0..20).all(|i| fake.value(&format!("o{i}"), None, FIELD).is_some_and(|v| !v.is_empty()))
    })
    .await;
    let took = back.elapsed();
    assert!(took < Duration::from_secs(20), "took {took:?} after REDCap came back");
    assert!(fake.calls_of(CallKind::Export) <= 3, "{} exports", fake.calls_of(CallKind::Export));
    app.stop().await;
}

// ------------------------------------------------------- ingest comes first

/// During a stream of webhooks above `relay.yield_above` the relay steps
/// aside: each worker takes a batch once per `yield_max` instead of at every
/// wake-up (so REDCap sees a handful of exports, not one per limiter slot),
/// yet a STOP sent during the stream is stamped before the stream ends, and
/// everything is written once it has passed.
async fn during_a_burst_the_relay_steps_aside_but_is_not_starved(b: Backend) {
    let fake = FakeRedcap::start(project()).await;
    let app = spawn_app_with(b, |c| {
        relay_to(&fake)(c);
        c.relay.yield_above = 5;
        c.relay.yield_max = Duration::from_secs(2);
    })
    .await;
    let stream = Duration::from_secs(8);
    let started = std::time::Instant::now();
    let (mut sent, mut stop_sent, mut stamped_at) = (0, false, None);
    while started.elapsed() < stream {
        // Numbers nobody in the project has: each costs the relay an export.
        let params = stop_params(&format!("SMburst{sent}"), &format!("+1212555{:04}", sent), "STOP", None);
        assert_eq!(app.post_signed(&params, TOKEN).await.status(), 200);
        sent += 1;
        if !stop_sent && started.elapsed() >= Duration::from_secs(1) {
            text(&app, "SMburstStop", "STOP", SERVICE).await;
            stop_sent = true;
        }
        if stop_sent && stamped_at.is_none() && stamped(&fake, "1") {
            stamped_at = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let exports = fake.calls_of(CallKind::Export);
    assert!(sent > 5 * 8 * 2, "the stream ({sent} webhooks in 8 s) must be well above relay.yield_above");
    assert!(stamped_at.is_some(), "the STOP sent at 1 s was not stamped before the stream ended at 8 s");
    // Two workers, one batch each per 2 s over 8 s (and a first pass each):
    // about 10 exports. Without stepping aside, one per limiter slot: ~40.
    assert!(exports <= 14, "{exports} exports during an 8 s stream of {sent} webhooks");
    eventually("every phone of the stream settled", || async {
        // Changes first: the fan-out took one batch per 2 s during the stream.
        app.store.changes_waiting().await.expect("changes") == 0
            && app.store.queue_stats().await.expect("stats").iter().all(|s| s.pending == 0)
    })
    .await;
    app.stop().await;
}

// ---------------------------------------------------------- restart after fix

/// A wrong token makes the sink misconfigured (retry in an hour here); fixing
/// it and restarting makes it due at once.
async fn a_restart_after_fixing_the_token_delivers_at_once(b: Backend) {
    let fake = FakeRedcap::start(project()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let url = fresh_database(b, &dir).await;
    let mut config = base_config(&url);
    relay_to(&fake)(&mut config);
    if let Some(r) = config.redcap.as_mut() {
        r.token = SecretString::from("F".repeat(32));
    }
    let (stop, handle, store) = serve(config).await;
    // A staff opt-out (organisation-wide), recorded as the CLI does.
    let event = optout_relay::ops::staff_event(
        Phone::from_stored(PHONE.into()),
        optout_relay::domain::EventKind::OptOut,
        None,
        None,
        "test",
    );
    optout_relay::ops::record(&store, event).await.expect("record");
    eventually("the sink is misconfigured", || async {
        store.sink("redcap").await.ok().flatten().is_some_and(|s| s.health == "misconfigured")
    })
    .await;
    assert!(!stamped(&fake, "1"));
    stop.cancel();
    let _ = handle.await;

    let mut config = base_config(&url);
    relay_to(&fake)(&mut config);
    let (stop, handle, store) = serve(config).await;
    eventually("stamped soon after the restart", || async { stamped(&fake, "1") }).await;
    eventually("healthy", || async { store.sink("redcap").await.ok().flatten().is_some_and(|s| s.health == "ok") })
        .await;
    stop.cancel();
    let _ = handle.await;
    drop_database(&url).await;
}

// ------------------------------------------- sinks added later, and repairs

/// Restarted with a REDCap sink that was absent while an opt-out came in
/// (and with a new email sink): the REDCap sink is backfilled, the email
/// sink sends nothing about the past.
async fn a_restart_backfills_a_known_sink_and_never_mails_the_past(b: Backend) {
    let fake = FakeRedcap::start(project().with_record("2", None, &[("phone", "4155550143")])).await;
    let smtp = crate::common::fake_smtp::FakeSmtp::start().await;
    let app = spawn_app_with(b, relay_to(&fake)).await;
    text(&app, "SMbf1", "STOP", SERVICE).await;
    eventually("stamped", || async { stamped(&fake, "1") }).await;
    let url = app.db_url.clone();
    app.shutdown.cancel();
    let _ = app.handle.await;

    // A run without the sink records another STOP.
    let (stop, handle, store) = serve(base_config(&url)).await;
    let event = optout_relay::ops::staff_event(
        Phone::from_stored("+14155550143".into()),
        optout_relay::domain::EventKind::OptOut,
        None,
        None,
        "test",
    );
    optout_relay::ops::record(&store, event).await.expect("record");
    stop.cancel();
    let _ = handle.await;

    // The sink is back, and an email sink is new.
    let mut config = base_config(&url);
    relay_to(&fake)(&mut config);
    let mut email =
        optout_relay::config::EmailConfig::new("127.0.0.1", "relay@example.org", vec!["team@example.org".into()]);
    email.smtp_port = Some(smtp.port());
    email.tls = optout_relay::config::EmailTls::None;
    config.email = Some(email);
    let (stop, handle, store) = serve(config).await;
    eventually("the STOP recorded without the sink is stamped", || async { stamped(&fake, "2") }).await;
    eventually("the email sink registered", || async { store.sink("email").await.ok().flatten().is_some() }).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(smtp.messages().is_empty(), "a new email sink mailed {} past opt-outs", smtp.messages().len());
    stop.cancel();
    let _ = handle.await;
    drop_database(&url).await;
}

/// A field cleared by hand after the STOP landed: an operator's retry of the
/// row asks REDCap again and restamps it (the row said it held the target).
async fn an_operators_retry_checks_the_sink_itself(b: Backend) {
    let fake = FakeRedcap::start(project()).await;
    let app = spawn_app_with(b, relay_to(&fake)).await;
    text(&app, "SMrt1", "STOP", SERVICE).await;
    eventually("stamped", || async { stamped(&fake, "1") }).await;
    eventually("in sync", || async { in_sync(&app.store).await }).await;
    let stamp = fake.value("1", None, FIELD);
    fake.set_value("1", None, FIELD, "");
    let r = row(&app.store, "redcap").await.expect("row");
    assert_eq!(app.store.retry_delivery(r.id).await.expect("retry"), optout_relay::store::RetryOutcome::Requeued);
    eventually("restamped", || async { fake.value("1", None, FIELD) == stamp }).await;
    app.stop().await;
}

/// A resync run by hand (`optout-relay resync`) counts as the sink's last
/// one, so the periodic resync does not run it again at once.
async fn a_resync_by_hand_counts_as_the_last_resync(b: Backend) {
    let fake = FakeRedcap::start(project()).await;
    let app = spawn_app_with(b, relay_to(&fake)).await;
    text(&app, "SMrs1", "STOP", SERVICE).await;
    eventually("stamped", || async { stamped(&fake, "1") }).await;
    let before = Utc::now();
    let sink = optout_relay::sinks::Sink {
        name: "redcap".into(),
        scopes: None,
        kind: optout_relay::sinks::SinkKind::Redcap {
            sink: redcap_sink(&fake),
            resync_interval: Duration::from_secs(3600),
        },
    };
    let report = optout_relay::relay::resync::run(&app.store, &sink, Utc::now()).await.expect("resync");
    assert_eq!(report.phones, 1);
    let health = app.store.sink("redcap").await.expect("read").expect("registered");
    assert!(health.resynced_at.is_some_and(|t| t >= before), "resynced_at = {:?}", health.resynced_at);
    app.stop().await;
}

fn redcap_sink(fake: &FakeRedcap) -> optout_relay::sinks::redcap::RedcapSink {
    let mut r = redcap_config(&fake.url);
    r.token = SecretString::from(REDCAP_TOKEN);
    optout_relay::sinks::redcap::RedcapSink::new(&r, phonenumber::country::Id::US).expect("sink")
}

both_backends!(
    a_frozen_worker_resumed_after_its_lease_was_taken_cannot_leave_the_field_cleared,
    an_import_applied_after_its_timeout_is_undone_by_the_late_recheck,
    a_start_on_another_service_leaves_the_stop_of_the_first_standing,
    a_record_enrolled_after_the_stop_is_stamped_by_the_resync,
    a_sink_configured_after_the_opt_outs_receives_them_at_start,
    after_an_outage_the_backlog_lands_at_once_in_one_batch,
    during_a_burst_the_relay_steps_aside_but_is_not_starved,
    a_restart_after_fixing_the_token_delivers_at_once,
    a_restart_backfills_a_known_sink_and_never_mails_the_past,
    an_operators_retry_checks_the_sink_itself,
    a_resync_by_hand_counts_as_the_last_resync,
);
