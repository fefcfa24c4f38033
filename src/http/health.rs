//! `/healthz` (the process serves) and `/readyz` (the store answers, its
//! migrations are applied and no background task keeps panicking), with a
//! small JSON body naming each check.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::AppState;

pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `checks.tasks` is `"ok"`, or `{"status": "failing", "failing": [names]}`
/// when a supervised task keeps panicking (see `supervise` for when that is):
/// such a replica drops webhooks or stops a sink, so it is not ready.
pub async fn readyz(State(app): State<AppState>) -> (StatusCode, Json<Value>) {
    let r = app.store.readiness().await;
    let failing = app.tasks.failing();
    let ready = r.database && r.migrations && failing.is_empty();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let word = |ok: bool| if ok { "ok" } else { "failing" };
    let tasks = if failing.is_empty() { json!("ok") } else { json!({ "status": "failing", "failing": failing }) };
    (
        status,
        Json(json!({
            "status": if ready { "ready" } else { "not_ready" },
            "checks": { "database": word(r.database), "migrations": word(r.migrations), "tasks": tasks },
        })),
    )
}

/// The gauges are process-wide while a process may serve more than one app
/// (the tests do): setting them and rendering under one lock makes each
/// response show what its own scrape read, not a concurrent scrape's.
static SCRAPE: Mutex<()> = Mutex::const_new(());

/// Prometheus text. Queue gauges are read from the store now, so they are
/// exact at scrape time and the same on every replica; when the read fails
/// they keep their last values and `optout_queue_stats_up` reads 0.
pub async fn metrics(State(app): State<AppState>) -> Response {
    let Some(handle) = crate::metrics::handle() else {
        return (StatusCode::NOT_FOUND, "metrics recorder not installed\n").into_response();
    };
    // Read before taking the lock: a store that hangs must not hold up other scrapes.
    let stats = app.store.queue_stats().await;
    let health = app.store.sinks().await;
    let changes = app.store.changes_waiting().await;
    let reviews = app.store.review_stats().await;
    let _scrape = SCRAPE.lock().await;
    match stats.and_then(|s| health.map(|h| (s, h))) {
        Ok((stats, health)) => {
            let now = chrono::Utc::now();
            for sink in app.relay.sinks.iter().map(|s| s.name.as_str()) {
                let s = stats.iter().find(|s| s.sink == sink);
                let age = s
                    .and_then(|s| s.oldest_pending)
                    .map_or(0.0, |t| (now - t).num_milliseconds().max(0) as f64 / 1000.0);
                crate::metrics::queue(sink, s.map_or(0, |s| s.pending), age, s.map_or(0, |s| s.dead));
                let h = health.iter().find(|h| h.name == sink);
                let failing = h
                    .and_then(|h| h.failing_since)
                    .map_or(0.0, |t| (now - t).num_milliseconds().max(0) as f64 / 1000.0);
                crate::metrics::sink_health(sink, h.is_none_or(|h| h.health == "ok"), failing);
            }
            // Part of the same reading: a store that answered the two reads
            // above answers this one; if not, the gauge keeps its last value.
            if let Ok(n) = changes {
                crate::metrics::changes_waiting(n);
            }
            if let Ok(r) = reviews {
                let age = r.oldest.map_or(0.0, |t| (now - t).num_milliseconds().max(0) as f64 / 1000.0);
                crate::metrics::reviews(r.pending, age);
            }
            crate::metrics::queue_stats_read(true);
        }
        Err(e) => {
            tracing::warn!(error = %e, "queue gauges not refreshed");
            crate::metrics::queue_stats_read(false);
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
}
