//! An in-process fake of Twilio's message log,
//! `GET /2010-04-01/Accounts/{AccountSid}/Messages.json`, following the
//! documented semantics (shared/notes/sources.md):
//! - Basic auth, AccountSid:AuthToken or an API key SID:secret; anything
//!   else is Twilio's 401 (`code` 20003); another account's path is 404.
//! - Filters `DateSent>` (on or after that GMT day), `DateSent<` (on or
//!   before), `DateSent` (that day), `To`, `From`; newest first.
//! - `PageSize` 1..=1000 (default 50; outside: 400), pages linked by
//!   `next_page_uri`, relative to the API base, null on the last page.
//! - One-shot faults (`fail_next`): 429 with `code` 20429 and an optional
//!   `Retry-After`, 5xx, 401.
//!
//! Every request is kept (`requests`), so a test can see the filters and
//! paging the client used.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{json, Value};

pub const ACCOUNT: &str = "AC00000000000000000000000000000000";
pub const AUTH_TOKEN: &str = super::TOKEN;

/// One message of the log.
#[derive(Debug, Clone)]
pub struct FakeMessage {
    pub sid: String,
    pub from: String,
    pub to: String,
    pub body: String,
    /// `inbound`, `outbound-api`, …
    pub direction: String,
    pub messaging_service_sid: Option<String>,
    pub date_sent: DateTime<Utc>,
}

impl FakeMessage {
    pub fn inbound(sid: &str, from: &str, body: &str, date_sent: DateTime<Utc>) -> FakeMessage {
        FakeMessage {
            sid: sid.into(),
            from: from.into(),
            to: "+15005550006".into(),
            body: body.into(),
            direction: "inbound".into(),
            messaging_service_sid: Some(super::SERVICE.into()),
            date_sent,
        }
    }

    pub fn outbound(sid: &str, to: &str, body: &str, date_sent: DateTime<Utc>) -> FakeMessage {
        FakeMessage {
            sid: sid.into(),
            from: "+15005550006".into(),
            to: to.into(),
            body: body.into(),
            direction: "outbound-api".into(),
            messaging_service_sid: Some(super::SERVICE.into()),
            date_sent,
        }
    }

    fn json(&self) -> Value {
        json!({
            "sid": self.sid,
            "account_sid": ACCOUNT,
            "messaging_service_sid": self.messaging_service_sid,
            "from": self.from,
            "to": self.to,
            "body": self.body,
            "direction": self.direction,
            "status": if self.direction == "inbound" { "received" } else { "delivered" },
            "num_segments": "1",
            "num_media": "0",
            "api_version": "2010-04-01",
            "price": null,
            "error_code": null,
            "date_created": rfc2822(self.date_sent),
            "date_updated": rfc2822(self.date_sent),
            "date_sent": rfc2822(self.date_sent),
            "uri": format!("/2010-04-01/Accounts/{ACCOUNT}/Messages/{}.json", self.sid),
        })
    }
}

fn rfc2822(t: DateTime<Utc>) -> String {
    t.format("%a, %d %b %Y %H:%M:%S +0000").to_string()
}

/// A request the fake received: the Basic auth user and the decoded query.
#[derive(Debug, Clone)]
pub struct Seen {
    pub user: Option<String>,
    pub query: Vec<(String, String)>,
    pub status: u16,
}

impl Seen {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Inner {
    messages: Vec<FakeMessage>,
    api_key: Option<(String, String)>,
    faults: VecDeque<(u16, Option<u64>)>,
    seen: Vec<Seen>,
}

pub struct FakeTwilio {
    pub base: String,
    state: Arc<Mutex<Inner>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeTwilio {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn lock(state: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FakeTwilio {
    pub async fn start(messages: Vec<FakeMessage>) -> FakeTwilio {
        let state = Arc::new(Mutex::new(Inner { messages, ..Inner::default() }));
        let app =
            Router::new().route("/2010-04-01/Accounts/{account}/Messages.json", get(list)).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the fake Twilio");
        let addr = listener.local_addr().expect("local addr");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeTwilio { base: format!("http://{addr}"), state, server }
    }

    pub fn add(&self, m: FakeMessage) {
        lock(&self.state).messages.push(m);
    }

    /// Accepts this API key (SK…) and secret besides the Auth Token.
    pub fn allow_api_key(&self, sid: &str, secret: &str) {
        lock(&self.state).api_key = Some((sid.into(), secret.into()));
    }

    /// The next request is answered with `status` (429, 500, 503, 401) and,
    /// when given, `Retry-After` seconds. Queued: one per call.
    pub fn fail_next(&self, status: u16, retry_after: Option<u64>) {
        lock(&self.state).faults.push_back((status, retry_after));
    }

    pub fn requests(&self) -> Vec<Seen> {
        lock(&self.state).seen.clone()
    }
}

fn error(status: StatusCode, code: u32, message: &str) -> Response {
    let body = json!({
        "code": code,
        "message": message,
        "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
        "status": status.as_u16(),
    });
    (status, Json(body)).into_response()
}

fn basic_auth(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// One query filter of the message list.
type Filter = Box<dyn Fn(&FakeMessage) -> bool>;

fn day(s: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()
}

async fn list(
    State(state): State<Arc<Mutex<Inner>>>,
    Path(account): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    let raw = raw.unwrap_or_default();
    let query: Vec<(String, String)> = form_urlencoded::parse(raw.as_bytes()).into_owned().collect();
    let auth = basic_auth(&headers);
    let mut inner = lock(&state);
    let response = answer(&mut inner, &account, &query, auth.as_ref());
    inner.seen.push(Seen { user: auth.map(|a| a.0), query, status: response.status().as_u16() });
    response
}

fn answer(inner: &mut Inner, account: &str, query: &[(String, String)], auth: Option<&(String, String)>) -> Response {
    if let Some((status, retry_after)) = inner.faults.pop_front() {
        let status = StatusCode::from_u16(status).expect("a status");
        let mut res = match status.as_u16() {
            429 => error(status, 20429, "Too Many Requests"),
            401 => error(status, 20003, "Authenticate"),
            _ => error(status, 20500, "Internal Server Error"),
        };
        if let Some(secs) = retry_after {
            res.headers_mut().insert(header::RETRY_AFTER, secs.to_string().parse().expect("header"));
        }
        return res;
    }
    let authenticated = match auth {
        Some((user, password)) if user == ACCOUNT && password == AUTH_TOKEN => true,
        Some((user, password)) => inner.api_key.as_ref().is_some_and(|(s, k)| s == user && k == password),
        None => false,
    };
    if !authenticated {
        return error(StatusCode::UNAUTHORIZED, 20003, "Authenticate");
    }
    if account != ACCOUNT {
        return error(StatusCode::NOT_FOUND, 20404, "The requested resource was not found");
    }
    let param = |name: &str| query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let page_size: usize = match param("PageSize").map(str::parse::<usize>) {
        None => 50,
        Some(Ok(n)) if (1..=1000).contains(&n) => n,
        Some(_) => return error(StatusCode::BAD_REQUEST, 20001, "PageSize must be between 1 and 1000"),
    };
    let mut filters: Vec<Filter> = Vec::new();
    for (name, value) in query {
        let value = value.clone();
        let filter: Filter = match name.as_str() {
            "DateSent>" | "DateSent<" | "DateSent" => {
                let Some(d) = day(&value) else {
                    return error(StatusCode::BAD_REQUEST, 20001, "Invalid DateSent");
                };
                match name.as_str() {
                    "DateSent>" => Box::new(move |m| m.date_sent.date_naive() >= d),
                    "DateSent<" => Box::new(move |m| m.date_sent.date_naive() <= d),
                    _ => Box::new(move |m| m.date_sent.date_naive() == d),
                }
            }
            "To" => Box::new(move |m| m.to == value),
            "From" => Box::new(move |m| m.from == value),
            _ => continue,
        };
        filters.push(filter);
    }
    let mut matching: Vec<&FakeMessage> = inner.messages.iter().filter(|m| filters.iter().all(|f| f(m))).collect();
    // Newest first, as Twilio lists them.
    matching.sort_by(|a, b| b.date_sent.cmp(&a.date_sent).then(b.sid.cmp(&a.sid)));
    let page: usize = param("Page").and_then(|p| p.parse().ok()).unwrap_or(0);
    let start = match param("PageToken") {
        Some(token) => match token.strip_prefix("PA").and_then(|n| n.parse::<usize>().ok()) {
            Some(offset) => offset,
            None => return error(StatusCode::BAD_REQUEST, 20001, "Invalid PageToken"),
        },
        None if page == 0 => 0,
        None => return error(StatusCode::BAD_REQUEST, 20001, "Page without PageToken"),
    };
    let end = (start + page_size).min(matching.len());
    let messages: Vec<Value> = matching.get(start..end).unwrap_or_default().iter().map(|m| m.json()).collect();
    let base_query: String = {
        let mut ser = form_urlencoded::Serializer::new(String::new());
        for (k, v) in query.iter().filter(|(k, _)| !matches!(k.as_str(), "Page" | "PageToken" | "PageSize")) {
            ser.append_pair(k, v);
        }
        ser.append_pair("PageSize", &page_size.to_string());
        ser.finish()
    };
    let path = format!("/2010-04-01/Accounts/{ACCOUNT}/Messages.json");
    let next = (end < matching.len()).then(|| format!("{path}?{base_query}&Page={}&PageToken=PA{end}", page + 1));
    Json(json!({
        "messages": messages,
        "uri": format!("{path}?{base_query}&Page={page}"),
        "first_page_uri": format!("{path}?{base_query}&Page=0"),
        "next_page_uri": next,
        "previous_page_uri": null,
        "page": page,
        "page_size": page_size,
        "start": start,
        "end": end.saturating_sub(1),
    }))
    .into_response()
}
