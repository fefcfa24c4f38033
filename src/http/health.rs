//! `/healthz` (the process serves) and `/readyz` (the store answers and its
//! migrations are applied), with a small JSON body naming each check.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::AppState;

pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

pub async fn readyz(State(app): State<AppState>) -> (StatusCode, Json<Value>) {
    let r = app.store.readiness().await;
    let ready = r.database && r.migrations;
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let word = |ok: bool| if ok { "ok" } else { "failing" };
    (
        status,
        Json(json!({
            "status": if ready { "ready" } else { "not_ready" },
            "checks": { "database": word(r.database), "migrations": word(r.migrations) },
        })),
    )
}

/// Prometheus text. Queue gauges are read from the store now, so they are
/// exact at scrape time and the same on every replica.
pub async fn metrics(State(app): State<AppState>) -> Response {
    let Some(handle) = crate::metrics::handle() else {
        return (StatusCode::NOT_FOUND, "metrics recorder not installed\n").into_response();
    };
    match app.store.queue_stats().await {
        Ok(stats) => {
            let now = chrono::Utc::now();
            for sink in &app.sinks {
                let s = stats.iter().find(|s| s.sink == *sink);
                let age = s
                    .and_then(|s| s.oldest_pending)
                    .map_or(0.0, |t| (now - t).num_milliseconds().max(0) as f64 / 1000.0);
                crate::metrics::queue(sink, s.map_or(0, |s| s.pending), age, s.map_or(0, |s| s.dead));
            }
        }
        Err(e) => tracing::warn!(error = %e, "queue gauges not refreshed"),
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
}
