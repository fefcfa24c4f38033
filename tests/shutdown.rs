//! Graceful shutdown: stop accepting, finish what is in flight, exit cleanly.

mod common;

use std::time::{Duration, Instant};

use common::fake_redcap::{FakeProject, FakeRedcap};
use common::*;
use secrecy::SecretString;
use sqlx::Connection;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_at_shutdown_is_finished_and_committed() {
    let app = spawn_app(Backend::Sqlite).await;
    // Hold SQLite's write lock so the webhook's commit has to wait.
    let mut blocker = sqlx::SqliteConnection::connect(&app.db_url).await.unwrap();
    sqlx::query("BEGIN IMMEDIATE").execute(&mut blocker).await.unwrap();

    let params = stop_params("SMinflight", "+14155550301", "STOP", Some("STOP"));
    let sig = optout_relay::twilio::signature::compute(TOKEN, &format!("{PUBLIC_URL}/twilio/messages"), &params);
    let request = app
        .client
        .post(app.url("/twilio/messages"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", sig)
        .body(encode(&params))
        .send();
    let in_flight = tokio::spawn(request);
    tokio::time::sleep(Duration::from_millis(300)).await;

    app.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // No longer accepting new connections.
    assert!(tokio::net::TcpStream::connect(app.addr).await.is_err(), "still accepting after shutdown");

    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    let res = in_flight.await.unwrap().unwrap();
    assert_eq!(res.status(), 200, "the request in flight is answered");
    let result = tokio::time::timeout(Duration::from_secs(10), app.handle).await.expect("server stops").unwrap();
    assert!(result.is_ok());

    let store = optout_relay::store::Store::connect_lazy(&base_config(&app.db_url).database).unwrap();
    assert_eq!(store.event_count().await.unwrap(), 1, "and committed");
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
    fake.set_latency(Duration::from_millis(700));
    let app = spawn_app_with(Backend::Postgres, |c| {
        let mut r = redcap_config(&fake.url);
        r.token = SecretString::from("0123456789ABCDEF0123456789ABCDEF");
        c.redcap = Some(r);
        c.relay.poll_interval = Duration::from_millis(20);
    })
    .await;
    app.post_signed(&stop_params("SMhand", "+14155550302", "STOP", Some("STOP")), TOKEN).await;
    // Wait until the worker is inside its REDCap calls.
    let started = Instant::now();
    while fake.calls() == 0 {
        assert!(started.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let store = app.store.clone();
    let db_url = app.db_url.clone();
    app.shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(15), app.handle)
        .await
        .expect("stops within the grace period")
        .unwrap();
    assert!(result.is_ok());
    assert!(fake.value("1", None, "opted_out_at").is_some_and(|v| !v.is_empty()), "the delivery in hand was completed");
    // The store was closed on the way out; read the outcome through a new pool.
    drop(store);
    let fresh = optout_relay::store::Store::connect_lazy(&base_config(&db_url).database).unwrap();
    let rows = fresh.deliveries(None, 10).await.unwrap();
    assert_eq!(rows[0].status, "done", "settled before exit, not left to a lease");
    fresh.close().await;
    drop_database(&db_url).await;
}
