//! Graceful shutdown: stop accepting, finish what is in flight, exit cleanly.

use std::time::Duration;

use crate::common::fake_redcap::{CallKind, FakeProject, FakeRedcap};
use crate::common::*;
use secrecy::SecretString;
use sqlx::Connection;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_at_shutdown_is_finished_and_committed() {
    // Generous, so only the behaviour is tested, not the machine's speed.
    let app = spawn_app_with(Backend::Postgres, |c| c.server.shutdown_grace = PATIENCE).await;
    // Hold a lock that lets the webhook read but not insert its event, so its commit has to wait.
    let mut blocker = sqlx::PgConnection::connect(&app.db_url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query("LOCK TABLE events IN EXCLUSIVE MODE").execute(&mut blocker).await.unwrap();

    let params = stop_params("SMinflight", "+14155550301", "STOP", Some("STOP"));
    let (client, url) = (app.client.clone(), app.url("/twilio/messages"));
    let in_flight = tokio::spawn(async move { send_signed(&client, &url, &params).await });
    eventually("the webhook waiting on the lock", || async {
        let sql =
            "SELECT pid::text FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'";
        !query_texts(&app.db_url, sql).await.is_empty()
    })
    .await;

    app.shutdown.cancel();
    eventually("no longer accepting new connections", || async {
        tokio::net::TcpStream::connect(app.addr).await.is_err()
    })
    .await;
    assert!(!in_flight.is_finished(), "answered before the lock was released");

    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    assert_eq!(in_flight.await.unwrap(), 200, "the request in flight is answered");
    let result = tokio::time::timeout(PATIENCE, app.handle).await.expect("server stops").unwrap();
    assert!(result.is_ok());

    let store = optout_relay::store::Store::connect_lazy(&base_config(&app.db_url).database).unwrap();
    assert_eq!(event_count(&store).await, 1, "and committed");
    store.close().await;
    drop_database(&app.db_url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_in_hand_at_shutdown_is_finished() {
    let fake = FakeRedcap::start(
        FakeProject::new(
            "0123456789ABCDEF0123456789ABCDEF",
            &[("record_id", "f", ""), ("phone", "f", ""), ("opted_out_at", "f", "")],
        )
        .with_record("1", None, &[("phone", "4155550302")]),
    )
    .await;
    // The worker's first REDCap call waits until shutdown has been signalled.
    let first_call = fake.hold_next(CallKind::Metadata);
    let app = spawn_app_with(Backend::Postgres, |c| {
        let mut r = redcap_config(&fake.url);
        r.token = SecretString::from("0123456789ABCDEF0123456789ABCDEF");
        r.request_timeout = PATIENCE;
        c.redcap = Some(r);
        c.relay.poll_interval = Duration::from_millis(20);
        c.server.shutdown_grace = PATIENCE;
    })
    .await;
    app.post_signed(&stop_params("SMhand", "+14155550302", "STOP", Some("STOP")), TOKEN).await;
    eventually("the worker inside its REDCap calls", || async { fake.calls() > 0 }).await;
    let store = app.store.clone();
    let db_url = app.db_url.clone();
    app.shutdown.cancel();
    first_call.open();
    let result = tokio::time::timeout(PATIENCE, app.handle).await.expect("stops").unwrap();
    assert!(result.is_ok());
    assert!(fake.value("1", None, "opted_out_at").is_some_and(|v| !v.is_empty()), "the delivery in hand was completed");
    assert_eq!(fake.calls_of(CallKind::Import), 1, "the import came after shutdown was signalled");
    // The store was closed on the way out; read the outcome through a new pool.
    drop(store);
    let fresh = optout_relay::store::Store::connect_lazy(&base_config(&db_url).database).unwrap();
    let rows = deliveries(&fresh, None).await;
    assert_eq!(rows[0].status, "done", "settled before exit, not left to a lease");
    assert_eq!(rows[0].written_opted_out, Some(true), "what was written is recorded");
    fresh.close().await;
    drop_database(&db_url).await;
}
