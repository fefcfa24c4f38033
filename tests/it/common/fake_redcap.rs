//! An in-process fake REDCap API for integration tests and the benchmark.
//!
//! It follows the real API's shape (see shared/notes/redcap.md): one POST
//! endpoint taking a form, `content` choosing the call, a `data` parameter
//! making a record call an import; state kept per (record, event, repeat
//! instance); the record-id field exported only when asked for; blanks
//! ignored on a normal import and cleared on an overwrite one; an import of
//! an unknown record id creating the record; 403/400/429 shapes.
//!
//! Repeating instruments: a project may name forms that repeat (in every
//! event they are in). Exports then carry `redcap_repeat_instrument` and
//! `redcap_repeat_instance` on every row (blank on non-repeating rows), an
//! instance row holding only its instrument's fields; an import row of a
//! repeating form needs both keys, a non-repeating row neither. Repeating
//! events, DAGs and arms beyond 1 are not modelled.
//!
//! Faults come two ways: a switch that every call answers with until it is
//! switched off (`set_fault`, `clear_fault`: an outage), and a queue of one-shot faults each taken by
//! the next call of its kind (`fail_next`, `delay_next`,
//! `apply_late_next_import`), so a test can break exactly one call.
//!
//! `filterLogic` is refused with a 400: the relay matches phones on its side
//! and must never send REDCap logic, so a regression shows up as a failure.
//!
//! Exports are written straight into a string so 20,000 records take a few
//! milliseconds.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;

/// One metadata row. The first field of a project is its record-id field.
#[derive(Debug, Clone)]
pub struct FakeField {
    pub field_name: String,
    pub form_name: String,
    /// `text_validation_type_or_show_slider_number`: "" (free text), `datetime_ymd`, `date_ymd`, …
    pub validation: String,
}

impl FakeField {
    pub fn new(field_name: &str, form_name: &str, validation: &str) -> FakeField {
        FakeField { field_name: field_name.into(), form_name: form_name.into(), validation: validation.into() }
    }
}

/// One seeded repeating-instrument row: (record, event, instrument, instance, field → value).
pub type SeedInstance = (String, Option<String>, String, u32, HashMap<String, String>);

/// What the fake project holds when it starts.
#[derive(Debug, Clone)]
pub struct FakeProject {
    /// 32 alphanumerics, as REDCap issues them.
    pub token: String,
    pub fields: Vec<FakeField>,
    /// Unique event names; empty for a classic project.
    pub events: Vec<String>,
    /// Forms (instruments) that repeat.
    pub repeating_forms: Vec<String>,
    /// Non-repeating rows: (record id, event (None in a classic project), field → value).
    pub records: Vec<(String, Option<String>, HashMap<String, String>)>,
    /// Rows of repeating instruments.
    pub instances: Vec<SeedInstance>,
}

impl FakeProject {
    /// A classic project; `fields` are (field_name, form_name, validation), the first the record id.
    pub fn new(token: &str, fields: &[(&str, &str, &str)]) -> FakeProject {
        FakeProject {
            token: token.into(),
            fields: fields.iter().map(|(n, f, v)| FakeField::new(n, f, v)).collect(),
            events: Vec::new(),
            repeating_forms: Vec::new(),
            records: Vec::new(),
            instances: Vec::new(),
        }
    }

    /// Makes the project longitudinal with these unique event names.
    pub fn with_events(mut self, events: &[&str]) -> FakeProject {
        self.events = events.iter().map(|e| (*e).to_owned()).collect();
        self
    }

    /// Makes these forms repeating instruments.
    pub fn with_repeating_forms(mut self, forms: &[&str]) -> FakeProject {
        self.repeating_forms = forms.iter().map(|f| (*f).to_owned()).collect();
        self
    }

    /// A record's non-repeating row in `event`.
    pub fn with_record(mut self, record: &str, event: Option<&str>, values: &[(&str, &str)]) -> FakeProject {
        self.records.push((record.into(), event.map(str::to_owned), owned(values)));
        self
    }

    /// Instance `instance` (from 1) of the repeating `instrument` of a record in `event`.
    pub fn with_instance(
        mut self,
        record: &str,
        event: Option<&str>,
        instrument: &str,
        instance: u32,
        values: &[(&str, &str)],
    ) -> FakeProject {
        self.instances.push((record.into(), event.map(str::to_owned), instrument.into(), instance, owned(values)));
        self
    }
}

fn owned(values: &[(&str, &str)]) -> HashMap<String, String> {
    values.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// What a call answers instead of (or on top of) doing its job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    None,
    /// 500 with an HTML page; nothing is done.
    Status500,
    /// Holds the call this long, then answers 504 without doing anything, as a
    /// proxy in front of a stuck REDCap does. A client with a shorter timeout
    /// gives up first.
    Timeout(Duration),
    /// Waits this long, then does the call and answers normally: a slow REDCap.
    /// A client with a shorter timeout gives up, and the call still takes effect.
    Delay(Duration),
    /// 429 with a plain-text body and `Retry-After: 60`, as a banned IP sees.
    Status429,
    /// 403 as if the token were wrong.
    BadToken,
    /// Imports: saves every record sent but the last and answers that smaller
    /// count (other calls are answered normally).
    ShortCount,
    /// Imports: never answers in time (the client times out) and applies the
    /// data anyway, as PHP runs on after the client has hung up: no sooner
    /// than this delay after the call arrived, and only once the client has
    /// gone (other calls are answered normally).
    LateApply(Duration),
    /// Waits until the test opens the gate, then does the call normally: lets a
    /// test look at the state between two calls without racing the client.
    Held(Gate),
    /// Imports: applies the data, then the connection breaks while the answer
    /// is being sent (headers out, body cut), as when a proxy or the network
    /// drops a finished request (other calls are answered normally).
    CutAfterApply,
}

/// Holds a call (`Fault::Held`) until opened; returned by `hold_next`.
#[derive(Clone)]
pub struct Gate(Arc<tokio::sync::Semaphore>);

impl Gate {
    fn new() -> Gate {
        Gate(Arc::new(tokio::sync::Semaphore::new(0)))
    }

    /// Lets the held call (and any later one waiting on this gate) go on.
    pub fn open(&self) {
        self.0.close();
    }

    async fn pass(&self) {
        // A closed semaphore is an open gate: acquiring fails at once.
        let _ = self.0.acquire().await;
    }
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_closed() { "Gate(open)" } else { "Gate(shut)" })
    }
}

impl PartialEq for Gate {
    fn eq(&self, other: &Gate) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Gate {}

/// How long a late-applied import holds its answer: longer than any client waits.
const LATE_HOLD: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallKind {
    Export,
    Import,
    Metadata,
    Project,
    Event,
    Other,
}

/// One API call as received (the token is left out).
#[derive(Debug, Clone)]
pub struct Call {
    pub kind: CallKind,
    pub params: Vec<(String, String)>,
    /// The fault this call was answered with.
    pub fault: Fault,
}

impl Call {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    pub fn has_param(&self, name: &str) -> bool {
        self.params.iter().any(|(k, _)| k == name)
    }
}

pub struct FakeRedcap {
    /// The API endpoint, `http://127.0.0.1:PORT/api/`.
    pub url: String,
    state: Arc<Mutex<Inner>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeRedcap {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Where a row lives in a record: the event's slot (0 in a classic project)
/// and, for a repeating instrument, (instrument, instance). `None` sorts
/// first, so a record's non-repeating row is exported before its instances.
type RowKey = (usize, Option<(String, u32)>);

struct Record {
    id: String,
    /// Rows holding data; a missing key is a row with no data at all.
    rows: BTreeMap<RowKey, HashMap<String, String>>,
}

struct Inner {
    token: String,
    fields: Vec<FakeField>,
    field_index: HashMap<String, usize>,
    events: Vec<String>,
    repeating_forms: Vec<String>,
    records: Vec<Record>,
    by_id: HashMap<String, usize>,
    calls: Vec<Call>,
    fault: Fault,
    /// One-shot faults, each taken by the next call of its kind.
    next_faults: VecDeque<(CallKind, Fault)>,
    latency: Duration,
    late_applied: usize,
}

impl Inner {
    fn longitudinal(&self) -> bool {
        !self.events.is_empty()
    }
    fn repeating(&self) -> bool {
        !self.repeating_forms.is_empty()
    }
    fn record_id_field(&self) -> &str {
        self.fields.first().map_or("record_id", |f| f.field_name.as_str())
    }
    fn form_of(&self, field: &str) -> Option<&str> {
        self.field_index.get(field).map(|&i| self.fields[i].form_name.as_str())
    }
    fn is_repeating_form(&self, form: &str) -> bool {
        self.repeating_forms.iter().any(|f| f == form)
    }
    fn event_slot(&self, event: Option<&str>) -> Option<usize> {
        match (self.longitudinal(), event) {
            (false, None) => Some(0),
            (true, Some(e)) => self.events.iter().position(|x| x == e),
            _ => None,
        }
    }
    fn record_mut(&mut self, id: &str) -> &mut Record {
        let idx = match self.by_id.get(id) {
            Some(&i) => i,
            None => {
                self.records.push(Record { id: id.to_owned(), rows: BTreeMap::new() });
                self.by_id.insert(id.to_owned(), self.records.len() - 1);
                self.records.len() - 1
            }
        };
        &mut self.records[idx]
    }
    fn row(&self, record: &str, key: &RowKey) -> Option<&HashMap<String, String>> {
        self.records[*self.by_id.get(record)?].rows.get(key)
    }
    /// The fault for a call of `kind` arriving now: a queued one-shot first.
    fn take_fault(&mut self, kind: CallKind) -> Fault {
        match self.next_faults.iter().position(|(k, _)| *k == kind) {
            Some(i) => self.next_faults.remove(i).map_or(Fault::None, |(_, f)| f),
            None => self.fault.clone(),
        }
    }
    fn seed(&mut self, record: &str, key: RowKey, values: HashMap<String, String>) {
        let rid = self.record_id_field().to_owned();
        let form = key.1.as_ref().map(|(i, _)| i.clone());
        for k in values.keys().filter(|k| **k != rid) {
            let field_form = self.form_of(k).unwrap_or_else(|| panic!("record {record}: unknown field {k}"));
            match &form {
                Some(i) => assert!(field_form == i, "record {record}: {k} is not on the repeating form {i}"),
                None => assert!(
                    !self.is_repeating_form(field_form),
                    "record {record}: {k} is on a repeating form: seed it with with_instance"
                ),
            }
        }
        let data = self.record_mut(record).rows.entry(key).or_default();
        data.extend(values.into_iter().filter(|(k, v)| *k != rid && !v.is_empty()));
    }
}

impl FakeRedcap {
    /// Serves the project on 127.0.0.1 at a free port.
    pub async fn start(project: FakeProject) -> FakeRedcap {
        assert!(!project.fields.is_empty(), "a REDCap project has at least its record-id field");
        let field_index = project.fields.iter().enumerate().map(|(i, f)| (f.field_name.clone(), i)).collect();
        let mut inner = Inner {
            token: project.token,
            fields: project.fields,
            field_index,
            events: project.events,
            repeating_forms: project.repeating_forms,
            records: Vec::new(),
            by_id: HashMap::new(),
            calls: Vec::new(),
            fault: Fault::None,
            next_faults: VecDeque::new(),
            latency: Duration::ZERO,
            late_applied: 0,
        };
        for (id, event, values) in project.records {
            let slot = inner.event_slot(event.as_deref()).unwrap_or_else(|| panic!("record {id}: bad event {event:?}"));
            inner.seed(&id, (slot, None), values);
        }
        for (id, event, instrument, instance, values) in project.instances {
            let slot = inner.event_slot(event.as_deref()).unwrap_or_else(|| panic!("record {id}: bad event {event:?}"));
            assert!(inner.is_repeating_form(&instrument), "{instrument} is not a repeating form of the project");
            assert!(instance >= 1, "repeat instances count from 1");
            inner.seed(&id, (slot, Some((instrument, instance))), values);
        }
        let state = Arc::new(Mutex::new(inner));
        let app =
            Router::new().route("/api/", any(handle)).layer(DefaultBodyLimit::disable()).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the fake REDCap");
        let addr = listener.local_addr().expect("local addr");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeRedcap { url: format!("http://{addr}/api/"), state, server }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        lock(&self.state)
    }

    /// A value of a record's non-repeating row: None when that row has no data
    /// (or the event is wrong for the project); `Some("")` for a blank field.
    pub fn value(&self, record: &str, event: Option<&str>, field: &str) -> Option<String> {
        let inner = self.inner();
        let slot = inner.event_slot(event)?;
        self.value_at(&inner, record, (slot, None), field)
    }

    /// A value of instance `instance` of a repeating instrument; None when that instance has no data.
    pub fn instance_value(
        &self,
        record: &str,
        event: Option<&str>,
        instrument: &str,
        instance: u32,
        field: &str,
    ) -> Option<String> {
        let inner = self.inner();
        let slot = inner.event_slot(event)?;
        self.value_at(&inner, record, (slot, Some((instrument.to_owned(), instance))), field)
    }

    fn value_at(&self, inner: &Inner, record: &str, key: RowKey, field: &str) -> Option<String> {
        let data = inner.row(record, &key)?;
        if field == inner.record_id_field() {
            return Some(record.to_owned());
        }
        Some(data.get(field).cloned().unwrap_or_default())
    }

    /// Every non-blank value of a record's non-repeating row (record-id field excluded).
    pub fn row(&self, record: &str, event: Option<&str>) -> Option<HashMap<String, String>> {
        let inner = self.inner();
        let slot = inner.event_slot(event)?;
        inner.row(record, &(slot, None)).cloned()
    }

    /// Sets a value of a non-repeating row directly (creating the row), bypassing the API.
    pub fn set_value(&self, record: &str, event: Option<&str>, field: &str, value: &str) {
        let mut inner = self.inner();
        let slot = inner.event_slot(event).expect("event fits the project");
        let data = inner.record_mut(record).rows.entry((slot, None)).or_default();
        if value.is_empty() {
            data.remove(field);
        } else {
            data.insert(field.to_owned(), value.to_owned());
        }
    }

    pub fn record_count(&self) -> usize {
        self.inner().records.len()
    }

    /// API calls received, faulted ones included (REDCap's limiter counts them all).
    pub fn calls(&self) -> usize {
        self.inner().calls.len()
    }

    pub fn calls_of(&self, kind: CallKind) -> usize {
        self.inner().calls.iter().filter(|c| c.kind == kind).count()
    }

    pub fn call_log(&self) -> Vec<Call> {
        self.inner().calls.clone()
    }

    pub fn reset_calls(&self) {
        self.inner().calls.clear();
    }

    /// A fault every call answers with until it is switched off (`Fault::None`).
    pub fn set_fault(&self, fault: Fault) {
        self.inner().fault = fault;
    }

    /// Ends the standing fault: REDCap is back.
    pub fn clear_fault(&self) {
        self.set_fault(Fault::None);
    }

    /// The next call of `kind` (only that one) answers with `fault`; queued
    /// one-shots are taken in order and win over `set_fault`.
    pub fn fail_next(&self, kind: CallKind, fault: Fault) {
        self.inner().next_faults.push_back((kind, fault));
    }

    /// The next call of `kind` is answered normally, but only after `delay`.
    pub fn delay_next(&self, kind: CallKind, delay: Duration) {
        self.fail_next(kind, Fault::Delay(delay));
    }

    /// The next import is never answered in time and lands anyway, once the
    /// client has given up and at least `delay` after it arrived.
    pub fn apply_late_next_import(&self, delay: Duration) {
        self.fail_next(CallKind::Import, Fault::LateApply(delay));
    }

    /// The next call of `kind` waits until the returned gate is opened, then goes on normally.
    pub fn hold_next(&self, kind: CallKind) -> Gate {
        let gate = Gate::new();
        self.fail_next(kind, Fault::Held(gate.clone()));
        gate
    }

    /// One-shot faults not yet taken by a call.
    pub fn pending_faults(&self) -> usize {
        self.inner().next_faults.len()
    }

    /// Late imports (`Fault::LateApply`) whose data has landed.
    pub fn late_imports_applied(&self) -> usize {
        self.inner().late_applied
    }

    /// Every call waits this long before it is answered.
    pub fn set_latency(&self, latency: Duration) {
        self.inner().latency = latency;
    }

    pub fn set_token(&self, token: &str) {
        self.inner().token = token.to_owned();
    }
}

fn lock(state: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json; charset=utf-8")], body).into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    json_response(status, serde_json::json!({ "error": message }).to_string())
}

fn bad_request(message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, message)
}

fn gateway_timeout() -> Response {
    (
        StatusCode::GATEWAY_TIMEOUT,
        [(header::CONTENT_TYPE, "text/html")],
        "<html><body>504 Gateway Time-out</body></html>",
    )
        .into_response()
}

const NO_PERMISSION: &str = "You do not have permissions to use the API";

async fn handle(State(state): State<Arc<Mutex<Inner>>>, method: Method, body: Bytes) -> Response {
    if method != Method::POST {
        return (StatusCode::NOT_IMPLEMENTED, "Not Implemented").into_response();
    }
    let params: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let get = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let kind = match (get("content"), get("data").is_some()) {
        (Some("record"), true) => CallKind::Import,
        (Some("record"), false) => CallKind::Export,
        (Some("metadata"), _) => CallKind::Metadata,
        (Some("project"), _) => CallKind::Project,
        (Some("event"), _) => CallKind::Event,
        _ => CallKind::Other,
    };
    let (fault, latency) = {
        let mut inner = lock(&state);
        let fault = inner.take_fault(kind);
        let logged = params.iter().filter(|(k, _)| k != "token").cloned().collect();
        inner.calls.push(Call { kind, params: logged, fault: fault.clone() });
        (fault, inner.latency)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match fault {
        Fault::None | Fault::ShortCount | Fault::LateApply(_) | Fault::CutAfterApply => {}
        Fault::Status500 => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, "text/html")],
                "<html><body><h1>Internal Server Error</h1></body></html>",
            )
                .into_response()
        }
        Fault::Timeout(d) => {
            tokio::time::sleep(d).await;
            return gateway_timeout();
        }
        Fault::Delay(d) => tokio::time::sleep(d).await,
        Fault::Held(ref gate) => gate.pass().await,
        Fault::Status429 => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::CONTENT_TYPE, "text/plain"), (header::RETRY_AFTER, "60")],
                "REDCap API rate limit exceeded: this IP address has been banned",
            )
                .into_response()
        }
        Fault::BadToken => return error(StatusCode::FORBIDDEN, NO_PERMISSION),
    }

    match answer(&state, &params, &fault) {
        Answer::Now(response) => response,
        Answer::Late(import, delay) => {
            // Dropped with this handler, i.e. when the client hangs up (or, should
            // it wait that long, when the hold ends).
            let (client_here, client_gone) = tokio::sync::oneshot::channel::<()>();
            let late = state.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay.saturating_sub(latency)).await;
                // Never before the client has given up: that is the point of this fault.
                let _ = client_gone.await;
                let mut inner = lock(&late);
                import.apply(&mut inner, None);
                inner.late_applied += 1;
            });
            tokio::time::sleep(LATE_HOLD).await;
            drop(client_here);
            gateway_timeout()
        }
    }
}

/// What a call does once its fault has let it through.
enum Answer {
    Now(Response),
    /// An import to apply later (`Fault::LateApply`).
    Late(Import, Duration),
}

/// The call itself, under the state's lock (so never across an await).
fn answer(state: &Mutex<Inner>, params: &[(String, String)], fault: &Fault) -> Answer {
    let get = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let mut inner = lock(state);
    let now = Answer::Now;
    if get("token") != Some(inner.token.as_str()) || inner.token.is_empty() {
        return now(error(StatusCode::FORBIDDEN, NO_PERMISSION));
    }
    if get("format") != Some("json") {
        // Real REDCap would answer XML; nothing here speaks it.
        return now(bad_request("The fake REDCap only speaks format=json"));
    }
    if params.iter().any(|(k, _)| k == "filterLogic") {
        // The relay matches phones itself and must never send REDCap logic built from webhook text.
        return now(bad_request("The fake REDCap refuses filterLogic: the relay must never send it"));
    }
    now(match get("content") {
        Some("record") => match get("data") {
            Some(data) => {
                let import = match Import::parse(&inner, data, get("overwriteBehavior")) {
                    Ok(i) => i,
                    Err(message) => return now(bad_request(&message)),
                };
                let limit = match fault {
                    Fault::LateApply(delay) => return Answer::Late(import, *delay),
                    Fault::ShortCount => Some(import.record_ids().len().saturating_sub(1)),
                    _ => None,
                };
                let ids = import.apply(&mut inner, limit);
                if *fault == Fault::CutAfterApply {
                    return now(cut_answer());
                }
                import_answer(&ids, get("returnContent"))
            }
            None => {
                if get("type").is_some_and(|t| t != "flat") {
                    return now(bad_request("The fake REDCap only exports type=flat"));
                }
                export(&inner, params)
            }
        },
        Some("metadata") => metadata(&inner, &list(params, "fields")),
        Some("project") => {
            let body = serde_json::json!({
                "project_id": 1,
                "project_title": "Fake project",
                "is_longitudinal": i32::from(inner.longitudinal()),
                "has_repeating_instruments_or_events": i32::from(inner.repeating()),
                "record_autonumbering_enabled": 0,
                "in_production": 0,
            });
            json_response(StatusCode::OK, body.to_string())
        }
        Some("event") => {
            if !inner.longitudinal() {
                return now(bad_request("You cannot export events for classic projects"));
            }
            let events: Vec<_> = inner
                .events
                .iter()
                .map(|e| {
                    serde_json::json!({"event_name": e, "arm_num": 1, "unique_event_name": e, "day_offset": 0, "offset_min": 0, "offset_max": 0, "custom_event_label": ""})
                })
                .collect();
            json_response(StatusCode::OK, serde_json::Value::Array(events).to_string())
        }
        _ => bad_request("The value of the parameter \"content\" is not valid"),
    })
}

/// A list parameter: `name[0]=a&name[1]=b`, `name[]=a` or `name=a,b`.
fn list(params: &[(String, String)], name: &str) -> Vec<String> {
    params
        .iter()
        .filter(|(k, _)| k == name || (k.starts_with(name) && k[name.len()..].starts_with('[')))
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn invalid_values(param: &str, bad: &[String]) -> Response {
    let quoted: Vec<String> = bad.iter().map(|b| format!("'{b}'")).collect();
    bad_request(&format!("The following values in the parameter \"{param}\" are not valid: {}", quoted.join(", ")))
}

fn metadata(inner: &Inner, only: &[String]) -> Response {
    let unknown: Vec<String> = only.iter().filter(|f| !inner.field_index.contains_key(*f)).cloned().collect();
    if !unknown.is_empty() {
        return invalid_values("fields", &unknown);
    }
    let rows: Vec<_> = inner
        .fields
        .iter()
        .filter(|f| only.is_empty() || only.contains(&f.field_name))
        .map(|f| {
            serde_json::json!({
                "field_name": f.field_name, "form_name": f.form_name, "section_header": "", "field_type": "text",
                "field_label": f.field_name, "select_choices_or_calculations": "", "field_note": "",
                "text_validation_type_or_show_slider_number": f.validation, "text_validation_min": "",
                "text_validation_max": "", "identifier": "", "branching_logic": "", "required_field": "",
                "custom_alignment": "", "question_number": "", "matrix_group_name": "", "matrix_ranking": "",
                "field_annotation": ""
            })
        })
        .collect();
    json_response(StatusCode::OK, serde_json::Value::Array(rows).to_string())
}

/// Rows in record order, then event, then the non-repeating row before its
/// instances. Columns: the record id (when asked for), `redcap_event_name`
/// (longitudinal), the repeat keys (projects with repeating forms), then the
/// fields asked for in metadata order. An instance row is exported only when
/// a field asked for is on its instrument, and holds only that instrument's
/// values; a non-repeating row leaves repeating forms' fields blank.
fn export(inner: &Inner, params: &[(String, String)]) -> Response {
    let rid = inner.record_id_field();
    let requested = list(params, "fields");
    let unknown: Vec<String> = requested.iter().filter(|f| !inner.field_index.contains_key(*f)).cloned().collect();
    if !unknown.is_empty() {
        return invalid_values("fields", &unknown);
    }
    // Metadata order, whatever the order asked; each with its form.
    let fields: Vec<(&str, &str)> = inner
        .fields
        .iter()
        .filter(|f| requested.is_empty() || requested.contains(&f.field_name))
        .map(|f| (f.field_name.as_str(), f.form_name.as_str()))
        .collect();
    let events = list(params, "events");
    let unknown: Vec<String> = events.iter().filter(|e| !inner.events.contains(e)).cloned().collect();
    if !unknown.is_empty() {
        return invalid_values("events", &unknown);
    }
    let event_ok: Vec<bool> = (0..inner.events.len().max(1))
        .map(|i| events.is_empty() || inner.events.get(i).is_some_and(|e| events.contains(e)))
        .collect();
    let records: HashSet<String> = list(params, "records").into_iter().collect();

    let mut out = String::with_capacity(inner.records.len() * 64 + 2);
    out.push('[');
    let mut first = true;
    for rec in &inner.records {
        if !records.is_empty() && !records.contains(&rec.id) {
            continue;
        }
        for ((slot, repeat), data) in &rec.rows {
            if !event_ok[*slot] {
                continue;
            }
            let instrument = repeat.as_ref().map(|(i, _)| i.as_str());
            if let Some(i) = instrument {
                if !fields.iter().any(|(f, form)| *f != rid && *form == i) {
                    continue;
                }
            }
            if !first {
                out.push(',');
            }
            first = false;
            out.push('{');
            let mut sep = false;
            let mut pair = |out: &mut String, k: &str, v: &str| {
                if sep {
                    out.push(',');
                }
                sep = true;
                push_json_str(out, k);
                out.push(':');
                push_json_str(out, v);
            };
            if fields.first().is_some_and(|(f, _)| *f == rid) {
                pair(&mut out, rid, &rec.id);
            }
            if inner.longitudinal() {
                pair(&mut out, "redcap_event_name", &inner.events[*slot]);
            }
            if inner.repeating() {
                pair(&mut out, "redcap_repeat_instrument", instrument.unwrap_or(""));
                let instance = repeat.as_ref().map(|(_, n)| n.to_string()).unwrap_or_default();
                pair(&mut out, "redcap_repeat_instance", &instance);
            }
            for (field, form) in &fields {
                if *field == rid {
                    continue;
                }
                let on_this_row = match instrument {
                    Some(i) => *form == i,
                    None => !inner.is_repeating_form(form),
                };
                let value = if on_this_row { data.get(*field).map_or("", String::as_str) } else { "" };
                pair(&mut out, field, value);
            }
            out.push('}');
        }
    }
    out.push(']');
    json_response(StatusCode::OK, out)
}

fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    // Almost every value needs no escaping: copy it whole.
    if !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

const SPECIAL: [&str; 4] =
    ["redcap_event_name", "redcap_repeat_instrument", "redcap_repeat_instance", "redcap_data_access_group"];

fn csv_line(record: &str, field: &str, value: &str, message: &str) -> String {
    let q = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    format!("{},{},{},{}", q(record), q(field), q(value), q(message))
}

/// One validated import row: the record, where in it, and field → value.
struct RowWrite {
    record: String,
    key: RowKey,
    values: Vec<(String, String)>,
}

/// An import that passed validation, ready to be applied (now or late).
struct Import {
    writes: Vec<RowWrite>,
    overwrite: bool,
}

impl Import {
    /// Checks every row the way REDCap does; nothing is written unless all pass.
    fn parse(inner: &Inner, data: &str, overwrite: Option<&str>) -> Result<Import, String> {
        let overwrite = match overwrite.unwrap_or("normal") {
            "normal" => false,
            "overwrite" => true,
            _ => return Err("The value of the parameter \"overwriteBehavior\" is not valid".to_owned()),
        };
        let not_formatted = || "The data being imported is not formatted correctly".to_owned();
        let rows: Vec<serde_json::Map<String, serde_json::Value>> =
            match serde_json::from_str::<serde_json::Value>(data) {
                Ok(serde_json::Value::Array(items)) => items
                    .into_iter()
                    .map(|item| match item {
                        serde_json::Value::Object(o) => Ok(o),
                        _ => Err(not_formatted()),
                    })
                    .collect::<Result<_, _>>()?,
                _ => return Err(not_formatted()),
            };
        let text = |v: &serde_json::Value| -> Option<String> {
            match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                serde_json::Value::Null => Some(String::new()),
                _ => None,
            }
        };
        let rid = inner.record_id_field().to_owned();
        let mut problems = Vec::new();
        let mut unknown_fields: Vec<String> = Vec::new();
        let mut writes = Vec::with_capacity(rows.len());
        for row in &rows {
            let Some(record) = row.get(&rid).and_then(text).filter(|r| !r.trim().is_empty()) else {
                return Err(format!("The record ID field \"{rid}\" is missing or blank in the data"));
            };
            let event = row.get("redcap_event_name").and_then(text).unwrap_or_default();
            let slot = if inner.longitudinal() {
                if event.is_empty() {
                    return Err("The data being imported is for a longitudinal project and must include the redcap_event_name field".to_owned());
                }
                match inner.events.iter().position(|e| *e == event) {
                    Some(s) => s,
                    None => {
                        problems.push(csv_line(&record, "redcap_event_name", &event, "The event name is not valid"));
                        continue;
                    }
                }
            } else {
                if row.contains_key("redcap_event_name") {
                    unknown_fields.push("redcap_event_name".into());
                }
                0
            };
            let instrument = row.get("redcap_repeat_instrument").and_then(text).unwrap_or_default();
            let instance = row.get("redcap_repeat_instance").and_then(text).unwrap_or_default();
            let repeat = match (instrument.is_empty(), instance.is_empty()) {
                (true, true) => None,
                _ if !inner.repeating() => {
                    return Err("This project has no repeating instruments or events".to_owned());
                }
                (false, false) => {
                    if !inner.is_repeating_form(&instrument) {
                        let m = "The instrument is not a repeating instrument in this project";
                        problems.push(csv_line(&record, "redcap_repeat_instrument", &instrument, m));
                        continue;
                    }
                    match instance.parse::<u32>() {
                        Ok(n) if n >= 1 => Some((instrument, n)),
                        _ => {
                            let m = "The repeat instance must be a whole number from 1";
                            problems.push(csv_line(&record, "redcap_repeat_instance", &instance, m));
                            continue;
                        }
                    }
                }
                (false, true) => {
                    let m = "A row of a repeating instrument needs redcap_repeat_instance";
                    problems.push(csv_line(&record, "redcap_repeat_instance", "", m));
                    continue;
                }
                (true, false) => {
                    // Only repeating events leave the instrument blank, and this fake has none.
                    let m = "redcap_repeat_instrument is blank but this project has no repeating events";
                    problems.push(csv_line(&record, "redcap_repeat_instrument", "", m));
                    continue;
                }
            };
            let mut values = Vec::new();
            for (k, v) in row {
                if *k == rid || SPECIAL.contains(&k.as_str()) {
                    continue;
                }
                let Some(&idx) = inner.field_index.get(k) else {
                    if !unknown_fields.contains(k) {
                        unknown_fields.push(k.clone());
                    }
                    continue;
                };
                let Some(value) = text(v) else {
                    problems.push(csv_line(&record, k, &v.to_string(), "The value is not a string or a number"));
                    continue;
                };
                let form = inner.fields[idx].form_name.as_str();
                match &repeat {
                    Some((i, _)) if form != i => {
                        let m = format!("The field is on the form {form}, not on the repeating instrument {i}");
                        problems.push(csv_line(&record, k, &value, &m));
                        continue;
                    }
                    None if inner.is_repeating_form(form) => {
                        let m = format!(
                            "The field is on the repeating instrument {form}: the row needs redcap_repeat_instrument \
                             and redcap_repeat_instance"
                        );
                        problems.push(csv_line(&record, k, &value, &m));
                        continue;
                    }
                    _ => {}
                }
                match validate(&inner.fields[idx].validation, &value) {
                    Ok(stored) => values.push((k.clone(), stored)),
                    Err(message) => problems.push(csv_line(&record, k, &value, message)),
                }
            }
            writes.push(RowWrite { record, key: (slot, repeat), values });
        }
        if !unknown_fields.is_empty() {
            let lines: Vec<String> = unknown_fields
                .iter()
                .map(|f| csv_line("", f, "", "The field is not a real data field in this project"))
                .collect();
            return Err(lines.join(
                "
",
            ));
        }
        if !problems.is_empty() {
            return Err(problems.join(
                "
",
            ));
        }
        Ok(Import { writes, overwrite })
    }

    /// Distinct record ids, in the order sent (what REDCap's count counts).
    fn record_ids(&self) -> Vec<String> {
        let mut seen = HashSet::new();
        self.writes.iter().filter(|w| seen.insert(w.record.as_str())).map(|w| w.record.clone()).collect()
    }

    /// Writes the rows of the first `limit` records sent (all: None); returns their ids.
    fn apply(&self, inner: &mut Inner, limit: Option<usize>) -> Vec<String> {
        let mut ids = self.record_ids();
        ids.truncate(limit.unwrap_or(ids.len()));
        for w in self.writes.iter().filter(|w| ids.contains(&w.record)) {
            let data = inner.record_mut(&w.record).rows.entry(w.key.clone()).or_default();
            for (k, v) in &w.values {
                if v.is_empty() {
                    if self.overwrite {
                        data.remove(k);
                    }
                } else {
                    data.insert(k.clone(), v.clone());
                }
            }
        }
        ids
    }
}

/// A 200 whose body breaks off: the server drops the connection mid-answer.
fn cut_answer() -> Response {
    let broken = futures_util::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "cut"))
    });
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], axum::body::Body::from_stream(broken))
        .into_response()
}

fn import_answer(ids: &[String], return_content: Option<&str>) -> Response {
    match return_content.unwrap_or("count") {
        "ids" | "auto_ids" => json_response(StatusCode::OK, serde_json::json!(ids).to_string()),
        "nothing" => (StatusCode::OK, "").into_response(),
        _ => json_response(StatusCode::OK, serde_json::json!({ "count": ids.len() }).to_string()),
    }
}

const BAD_FORMAT: &str =
    "The value you provided could not be validated because it does not follow the expected format. Please try again.";

/// REDCap's import check for date/time validations; returns the value as stored.
fn validate(validation: &str, value: &str) -> Result<String, &'static str> {
    if value.is_empty() {
        return Ok(String::new());
    }
    let v = value.trim().replacen('T', " ", 1);
    let seconds = chrono::NaiveDateTime::parse_from_str(&v, "%Y-%m-%d %H:%M:%S").ok();
    let minutes = chrono::NaiveDateTime::parse_from_str(&v, "%Y-%m-%d %H:%M").ok();
    if validation.starts_with("datetime_seconds_") {
        return match (seconds, minutes) {
            (Some(t), _) => Ok(t.format("%Y-%m-%d %H:%M:%S").to_string()),
            (None, Some(t)) => Ok(t.format("%Y-%m-%d %H:%M:00").to_string()),
            _ => Err(BAD_FORMAT),
        };
    }
    if validation.starts_with("datetime_") {
        return match seconds.or(minutes) {
            Some(t) => Ok(t.format("%Y-%m-%d %H:%M").to_string()),
            None => Err(BAD_FORMAT),
        };
    }
    if validation.starts_with("date_") {
        return match chrono::NaiveDate::parse_from_str(&v, "%Y-%m-%d") {
            Ok(d) => Ok(d.format("%Y-%m-%d").to_string()),
            Err(_) => Err(BAD_FORMAT),
        };
    }
    Ok(value.to_owned())
}
