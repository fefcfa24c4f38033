//! `/healthz` (the process serves) and `/readyz` (the store answers and its
//! migrations are applied), with a small JSON body naming each check.

use axum::extract::State;
use axum::http::StatusCode;
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
