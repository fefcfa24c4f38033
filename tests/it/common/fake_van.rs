//! An in-process fake of the EveryAction / NGP VAN API (v4), as far as the
//! opt-out sink uses it (see shared/notes/everyaction.md):
//! - HTTP Basic auth: user = application name, password = `KEY|mode`;
//!   anything else is a 401 with VAN's `{"errors": [...]}` shape;
//! - `POST /v4/people/{vanId}` with `{"phones": [...]}` updates that
//!   person's phones (`phoneOptInStatus` I, U or O; a number VAN would not
//!   take is a 400), answers `{"vanId", "status": "Processed"}`; an unknown
//!   vanId is a 404 (VAN never creates a person when the vanId is given);
//! - `POST /v4/people/{vanId}/canvassResponses`: 204, refusing
//!   `resultCodeId` together with `responses` (400) as VAN does;
//! - `GET /v4/apiKeyProfiles`: 200 with the key's profile.
//!
//! Faults are one-shot, each taken by the next call (`fail_next`): a status
//! (5xx, 429 with `Retry-After`, 400 with a VAN error) or a hold longer than
//! the client waits, after which the update is applied anyway (a timeout).
#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Value};

#[derive(Debug, Clone)]
pub enum VanFault {
    /// Answer this status (with `Retry-After` when given) and do nothing.
    Status { status: u16, retry_after: Option<u64>, body: String },
    /// Hold the call this long, then apply it and answer normally: a client
    /// with a shorter timeout gives up first, the update lands anyway.
    SlowApply(Duration),
}

/// One call the fake received.
#[derive(Debug, Clone)]
pub struct VanCall {
    pub path: String,
    pub authorised: bool,
    pub body: Value,
}

#[derive(Default)]
struct Inner {
    user: String,
    password: String,
    /// vanId -> phone number (10 digits) -> phoneOptInStatus.
    people: BTreeMap<u64, BTreeMap<String, String>>,
    canvass: Vec<(u64, Value)>,
    calls: Vec<VanCall>,
    faults: VecDeque<VanFault>,
}

#[derive(Clone)]
pub struct FakeVan {
    pub url: String,
    inner: Arc<Mutex<Inner>>,
}

impl FakeVan {
    /// A VAN committee whose key is `application_name` / `KEY|mode`, holding `people` (vanIds).
    pub async fn start(application_name: &str, key: &str, mode: u8, people: &[u64]) -> FakeVan {
        let inner = Inner {
            user: application_name.to_owned(),
            password: format!("{key}|{mode}"),
            people: people.iter().map(|id| (*id, BTreeMap::new())).collect(),
            ..Inner::default()
        };
        let inner = Arc::new(Mutex::new(inner));
        let app = Router::new()
            .route("/v4/people/{van_id}", post(update_person))
            .route("/v4/people/{van_id}/canvassResponses", post(canvass_response))
            .route("/v4/apiKeyProfiles", get(profile))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the fake VAN");
        let url = format!("http://{}/v4/", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeVan { url, inner }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The next call answers with `fault` instead.
    pub fn fail_next(&self, fault: VanFault) {
        self.lock().faults.push_back(fault);
    }

    pub fn status_next(&self, status: u16, retry_after: Option<u64>) {
        self.fail_next(VanFault::Status {
            status,
            retry_after,
            body: format!("{{\"errors\":[{{\"text\":\"{status}\"}}]}}"),
        });
    }

    /// What VAN holds for this person's number (10 digits), if anything.
    pub fn opt_in_status(&self, van_id: u64, number: &str) -> Option<String> {
        self.lock().people.get(&van_id)?.get(number).cloned()
    }

    pub fn calls(&self) -> Vec<VanCall> {
        self.lock().calls.clone()
    }

    /// Updates to people (not canvass responses, not reads) the fake received.
    pub fn person_calls(&self) -> Vec<VanCall> {
        self.calls()
            .into_iter()
            .filter(|c| c.path.starts_with("people/") && !c.path.ends_with("canvassResponses"))
            .collect()
    }

    pub fn canvass_responses(&self) -> Vec<(u64, Value)> {
        self.lock().canvass.clone()
    }
}

type Shared = Arc<Mutex<Inner>>;

fn lock(s: &Shared) -> MutexGuard<'_, Inner> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn van_error(status: StatusCode, code: &str, text: &str) -> Response {
    (status, axum::Json(json!({"errors": [{"code": code, "text": text}]}))).into_response()
}

fn authorised(inner: &Inner, headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return false };
    let Some(encoded) = value.strip_prefix("Basic ") else { return false };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else { return false };
    let expected = format!("{}:{}", inner.user, inner.password);
    decoded == expected.as_bytes()
}

/// Records the call; answers the auth failure or the next fault, if any.
fn gate(s: &Shared, path: String, headers: &HeaderMap, body: &Bytes) -> Result<Option<Duration>, Box<Response>> {
    let mut inner = lock(s);
    let ok = authorised(&inner, headers);
    let parsed = serde_json::from_slice(body).unwrap_or(Value::Null);
    inner.calls.push(VanCall { path, authorised: ok, body: parsed });
    if !ok {
        return Err(Box::new(van_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "Authorization has been denied for this request.",
        )));
    }
    match inner.faults.pop_front() {
        None => Ok(None),
        Some(VanFault::SlowApply(d)) => Ok(Some(d)),
        Some(VanFault::Status { status, retry_after, body }) => {
            let mut res =
                (StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), body).into_response();
            res.headers_mut().insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
            if let Some(secs) = retry_after {
                res.headers_mut().insert(header::RETRY_AFTER, secs.to_string().parse().unwrap());
            }
            Err(Box::new(res))
        }
    }
}

/// VAN's US phone format: digits, optional leading 1.
fn van_number(s: &str) -> bool {
    let d = s.strip_prefix('1').filter(|r| r.len() == 10).unwrap_or(s).as_bytes();
    d.len() == 10
        && d.iter().all(u8::is_ascii_digit)
        && (b'2'..=b'9').contains(&d[0])
        && (b'0'..=b'8').contains(&d[1])
        && (b'2'..=b'9').contains(&d[3])
}

async fn update_person(State(s): State<Shared>, Path(van_id): Path<u64>, headers: HeaderMap, body: Bytes) -> Response {
    let delay = match gate(&s, format!("people/{van_id}"), &headers, &body) {
        Ok(d) => d,
        Err(res) => return *res,
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return van_error(StatusCode::BAD_REQUEST, "INVALID_PARAMETER", "The request body is not valid JSON.");
    };
    let mut inner = lock(&s);
    let Some(person) = inner.people.get_mut(&van_id) else {
        return van_error(StatusCode::NOT_FOUND, "NOT_FOUND", "The specified resource cannot be found.");
    };
    let phones = v.get("phones").and_then(Value::as_array).cloned().unwrap_or_default();
    for p in &phones {
        let number = p.get("phoneNumber").and_then(Value::as_str).unwrap_or("");
        let status = p.get("phoneOptInStatus").and_then(Value::as_str).unwrap_or("U");
        if !van_number(number) || !matches!(status, "I" | "U" | "O") {
            return van_error(
                StatusCode::BAD_REQUEST,
                "INVALID_PARAMETER",
                "'phoneNumber' or 'phoneOptInStatus' is invalid",
            );
        }
    }
    for p in phones {
        let number = p["phoneNumber"].as_str().unwrap_or("");
        let number = number.strip_prefix('1').filter(|r| r.len() == 10).unwrap_or(number);
        person.insert(number.to_owned(), p["phoneOptInStatus"].as_str().unwrap_or("U").to_owned());
    }
    (StatusCode::OK, axum::Json(json!({"vanId": van_id, "status": "Processed"}))).into_response()
}

async fn canvass_response(
    State(s): State<Shared>,
    Path(van_id): Path<u64>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(res) = gate(&s, format!("people/{van_id}/canvassResponses"), &headers, &body) {
        return *res;
    }
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut inner = lock(&s);
    if !inner.people.contains_key(&van_id) {
        return van_error(StatusCode::NOT_FOUND, "NOT_FOUND", "The specified resource cannot be found.");
    }
    if !v["resultCodeId"].is_null() && !v["responses"].is_null() {
        return van_error(StatusCode::BAD_REQUEST, "INVALID_PARAMETER", "resultCodeId cannot be set with responses");
    }
    inner.canvass.push((van_id, v));
    StatusCode::NO_CONTENT.into_response()
}

async fn profile(State(s): State<Shared>, headers: HeaderMap) -> Response {
    if let Err(res) = gate(&s, "apiKeyProfiles".to_owned(), &headers, &Bytes::new()) {
        return *res;
    }
    axum::Json(json!([{"databaseName": "MyCampaign", "apiKeyTypeName": "Custom Integration"}])).into_response()
}
