//! Supervised background tasks and the signals an operator alerts on:
//! `/readyz` reports the tasks, and `/metrics` says whether the queue gauges
//! could be read at this scrape.

use std::time::Duration;

use crate::both_backends;
use crate::common::*;

/// The value of an unlabelled sample in Prometheus text, if present.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn scrape(app: &TestApp) -> String {
    let res = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    res.text().await.unwrap()
}

async fn readyz_reports_the_background_tasks(b: Backend) {
    // A sink, so relay workers run beside the batch writers.
    let app = spawn_app_with(b, |c| c.redcap = Some(redcap_config("http://127.0.0.1:1/api/"))).await;
    let res = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["status"], "ready");
    assert_eq!(body["checks"]["tasks"], "ok", "{body}");
    assert_eq!(body["checks"]["database"], "ok");
    assert_eq!(body["checks"]["migrations"], "ok");
    app.stop().await;
}

async fn the_queue_gauges_say_they_were_read(b: Backend) {
    let app = spawn_app(b).await;
    let before = chrono::Utc::now().timestamp() as f64;
    let text = scrape(&app).await;
    assert_eq!(sample(&text, "optout_queue_stats_up"), Some(1.0), "{text}");
    let stamped = sample(&text, "optout_queue_stats_last_success_timestamp_seconds").expect("timestamp present");
    assert!(stamped >= before - 1.0, "stamped at this scrape: {stamped} < {before}");
    assert!(text.contains("# HELP optout_queue_stats_up"), "described:\n{text}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_gauges_say_when_the_store_could_not_be_read() {
    let app = spawn_app_with(Backend::Postgres, |c| c.database.acquire_timeout = Duration::from_secs(1)).await;
    let text = scrape(&app).await;
    assert_eq!(sample(&text, "optout_queue_stats_up"), Some(1.0), "healthy first:\n{text}");

    // The database goes away under the running app (its connections are
    // terminated), so the scrape's query really fails.
    drop_database(&app.db_url).await;
    let text = scrape(&app).await;
    assert_eq!(sample(&text, "optout_queue_stats_up"), Some(0.0), "the failed read is visible:\n{text}");
    // The gauges are process-wide and other tests' apps scrape meanwhile, so
    // only the presence of the last-success stamp is this test's to check.
    assert!(sample(&text, "optout_queue_stats_last_success_timestamp_seconds").is_some(), "stamp kept");
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503, "and the database check fails too");
    app.stop().await;
}

both_backends!(readyz_reports_the_background_tasks, the_queue_gauges_say_they_were_read);
