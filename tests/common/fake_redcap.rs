//! An in-process fake REDCap API for integration tests and the benchmark.
//!
//! It follows the real API's shape (see shared/notes/redcap.md): one POST
//! endpoint taking a form, `content` choosing the call, a `data` parameter
//! making a record call an import; state kept per (record, event); the
//! record-id field exported only when asked for; blanks ignored on a normal
//! import and cleared on an overwrite one; an import of an unknown record id
//! creating the record; 403/400/429 shapes; switchable faults and latency.
//! Exports are written straight into a string so 20,000 records take a few
//! milliseconds. No repeating instruments or events, no DAGs, no arms beyond 1.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
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

/// What the fake project holds when it starts.
#[derive(Debug, Clone)]
pub struct FakeProject {
    /// 32 alphanumerics, as REDCap issues them.
    pub token: String,
    pub fields: Vec<FakeField>,
    /// Unique event names; empty for a classic project.
    pub events: Vec<String>,
    /// (record id, event (None in a classic project), field → value).
    pub records: Vec<(String, Option<String>, HashMap<String, String>)>,
}

impl FakeProject {
    /// A classic project; `fields` are (field_name, form_name, validation), the first the record id.
    pub fn new(token: &str, fields: &[(&str, &str, &str)]) -> FakeProject {
        FakeProject {
            token: token.into(),
            fields: fields.iter().map(|(n, f, v)| FakeField::new(n, f, v)).collect(),
            events: Vec::new(),
            records: Vec::new(),
        }
    }

    /// Makes the project longitudinal with these unique event names.
    pub fn with_events(mut self, events: &[&str]) -> FakeProject {
        self.events = events.iter().map(|e| (*e).to_owned()).collect();
        self
    }

    pub fn with_record(mut self, record: &str, event: Option<&str>, values: &[(&str, &str)]) -> FakeProject {
        let values = values.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        self.records.push((record.into(), event.map(str::to_owned), values));
        self
    }
}

/// A fault every call answers with until it is switched off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    None,
    /// 500 with an HTML page.
    Status500,
    /// Sleeps this long, then answers normally (a client with a shorter timeout gives up).
    Timeout(Duration),
    /// 429 with a plain-text body and `Retry-After: 60`, as a banned IP sees.
    Status429,
    /// 403 as if the token were wrong.
    BadToken,
}

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

struct Record {
    id: String,
    /// One slot per event (one slot in a classic project); None: no data in that event.
    slots: Vec<Option<HashMap<String, String>>>,
}

struct Inner {
    token: String,
    fields: Vec<FakeField>,
    field_index: HashMap<String, usize>,
    events: Vec<String>,
    records: Vec<Record>,
    by_id: HashMap<String, usize>,
    calls: Vec<Call>,
    fault: Fault,
    latency: Duration,
}

impl Inner {
    fn longitudinal(&self) -> bool {
        !self.events.is_empty()
    }
    fn record_id_field(&self) -> &str {
        self.fields.first().map_or("record_id", |f| f.field_name.as_str())
    }
    fn slot_count(&self) -> usize {
        self.events.len().max(1)
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
                let slots = vec![None; self.slot_count()];
                self.records.push(Record { id: id.to_owned(), slots });
                self.by_id.insert(id.to_owned(), self.records.len() - 1);
                self.records.len() - 1
            }
        };
        &mut self.records[idx]
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
            records: Vec::new(),
            by_id: HashMap::new(),
            calls: Vec::new(),
            fault: Fault::None,
            latency: Duration::ZERO,
        };
        for (id, event, values) in project.records {
            let slot = inner.event_slot(event.as_deref()).unwrap_or_else(|| panic!("record {id}: bad event {event:?}"));
            let rid = inner.record_id_field().to_owned();
            for k in values.keys() {
                assert!(inner.field_index.contains_key(k), "record {id}: unknown field {k}");
            }
            let rec = inner.record_mut(&id);
            let data = rec.slots[slot].get_or_insert_with(HashMap::new);
            data.extend(values.into_iter().filter(|(k, v)| *k != rid && !v.is_empty()));
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

    /// A stored value: None when the record has no data in that event (or the
    /// event is wrong for the project); `Some("")` for a blank field.
    pub fn value(&self, record: &str, event: Option<&str>, field: &str) -> Option<String> {
        let inner = self.inner();
        let slot = inner.event_slot(event)?;
        let rec = &inner.records[*inner.by_id.get(record)?];
        let data = rec.slots[slot].as_ref()?;
        if field == inner.record_id_field() {
            return Some(rec.id.clone());
        }
        Some(data.get(field).cloned().unwrap_or_default())
    }

    /// Every non-blank value of a record-event (record-id field excluded).
    pub fn row(&self, record: &str, event: Option<&str>) -> Option<HashMap<String, String>> {
        let inner = self.inner();
        let slot = inner.event_slot(event)?;
        inner.records[*inner.by_id.get(record)?].slots[slot].clone()
    }

    /// Sets a value directly (creating the record-event), bypassing the API.
    pub fn set_value(&self, record: &str, event: Option<&str>, field: &str, value: &str) {
        let mut inner = self.inner();
        let slot = inner.event_slot(event).expect("event fits the project");
        let data = inner.record_mut(record).slots[slot].get_or_insert_with(HashMap::new);
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

    pub fn set_fault(&self, fault: Fault) {
        self.inner().fault = fault;
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
        let logged = params.iter().filter(|(k, _)| k != "token").cloned().collect();
        inner.calls.push(Call { kind, params: logged });
        (inner.fault.clone(), inner.latency)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match fault {
        Fault::None => {}
        Fault::Status500 => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, "text/html")],
                "<html><body><h1>Internal Server Error</h1></body></html>",
            )
                .into_response()
        }
        Fault::Timeout(d) => tokio::time::sleep(d).await,
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

    let mut inner = lock(&state);
    if get("token") != Some(inner.token.as_str()) || inner.token.is_empty() {
        return error(StatusCode::FORBIDDEN, NO_PERMISSION);
    }
    if get("format") != Some("json") {
        // Real REDCap would answer XML; nothing here speaks it.
        return bad_request("The fake REDCap only speaks format=json");
    }
    match get("content") {
        Some("record") => match get("data") {
            Some(data) => import(&mut inner, data, get("overwriteBehavior"), get("returnContent")),
            None => {
                if get("type").is_some_and(|t| t != "flat") {
                    return bad_request("The fake REDCap only exports type=flat");
                }
                export(&inner, &params)
            }
        },
        Some("metadata") => metadata(&inner, &list(&params, "fields")),
        Some("project") => {
            let body = serde_json::json!({
                "project_id": 1,
                "project_title": "Fake project",
                "is_longitudinal": i32::from(inner.longitudinal()),
                "has_repeating_instruments_or_events": 0,
                "record_autonumbering_enabled": 0,
                "in_production": 0,
            });
            json_response(StatusCode::OK, body.to_string())
        }
        Some("event") => {
            if !inner.longitudinal() {
                return bad_request("You cannot export events for classic projects");
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
    }
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

fn export(inner: &Inner, params: &[(String, String)]) -> Response {
    let rid = inner.record_id_field();
    let requested = list(params, "fields");
    let unknown: Vec<String> = requested.iter().filter(|f| !inner.field_index.contains_key(*f)).cloned().collect();
    if !unknown.is_empty() {
        return invalid_values("fields", &unknown);
    }
    // Metadata order, whatever the order asked.
    let fields: Vec<&str> = inner
        .fields
        .iter()
        .map(|f| f.field_name.as_str())
        .filter(|f| requested.is_empty() || requested.iter().any(|r| r == f))
        .collect();
    let events = list(params, "events");
    let unknown: Vec<String> = events.iter().filter(|e| !inner.events.contains(e)).cloned().collect();
    if !unknown.is_empty() {
        return invalid_values("events", &unknown);
    }
    let event_ok: Vec<bool> = (0..inner.slot_count())
        .map(|i| events.is_empty() || inner.events.get(i).is_some_and(|e| events.contains(e)))
        .collect();
    let records: HashSet<String> = list(params, "records").into_iter().collect();
    let filter = match params.iter().find(|(k, _)| k == "filterLogic").map(|(_, v)| v.trim()).filter(|v| !v.is_empty())
    {
        Some(text) => match Filter::parse(text, inner) {
            Ok(f) => Some(f),
            Err(e) => return bad_request(&format!("The parameter \"filterLogic\" is not valid: {e}")),
        },
        None => None,
    };

    let mut out = String::with_capacity(inner.records.len() * 64 + 2);
    out.push('[');
    let mut first = true;
    for rec in &inner.records {
        if !records.is_empty() && !records.contains(&rec.id) {
            continue;
        }
        for (slot, data) in rec.slots.iter().enumerate() {
            let Some(data) = data else { continue };
            if !event_ok[slot] {
                continue;
            }
            if let Some(f) = &filter {
                if !f.eval(inner, rec, slot) {
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
            // redcap_event_name follows the record id, or opens the row without it.
            let rid_first = fields.first() == Some(&rid);
            if inner.longitudinal() && !rid_first {
                pair(&mut out, "redcap_event_name", &inner.events[slot]);
            }
            for (n, field) in fields.iter().enumerate() {
                if *field == rid {
                    pair(&mut out, field, &rec.id);
                } else {
                    pair(&mut out, field, data.get(*field).map_or("", String::as_str));
                }
                if n == 0 && rid_first && inner.longitudinal() {
                    pair(&mut out, "redcap_event_name", &inner.events[slot]);
                }
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

/// (record, event slot, field → value) of one validated import row.
type RowWrite = (String, usize, Vec<(String, String)>);

fn import(inner: &mut Inner, data: &str, overwrite: Option<&str>, return_content: Option<&str>) -> Response {
    let overwrite = match overwrite.unwrap_or("normal") {
        "normal" => false,
        "overwrite" => true,
        _ => return bad_request("The value of the parameter \"overwriteBehavior\" is not valid"),
    };
    let rows: Vec<serde_json::Map<String, serde_json::Value>> = match serde_json::from_str::<serde_json::Value>(data) {
        Ok(serde_json::Value::Array(items)) => {
            let mut rows = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    serde_json::Value::Object(o) => rows.push(o),
                    _ => return bad_request("The data being imported is not formatted correctly"),
                }
            }
            rows
        }
        _ => return bad_request("The data being imported is not formatted correctly"),
    };
    let rid = inner.record_id_field().to_owned();
    let mut problems = Vec::new();
    let mut unknown_fields: Vec<String> = Vec::new();
    // (record, slot, field → value) after validation; applied only if all rows pass.
    let mut writes: Vec<RowWrite> = Vec::with_capacity(rows.len());
    for row in &rows {
        let text = |v: &serde_json::Value| -> Option<String> {
            match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                serde_json::Value::Null => Some(String::new()),
                _ => None,
            }
        };
        let Some(record) = row.get(&rid).and_then(text).filter(|r| !r.trim().is_empty()) else {
            return bad_request(&format!("The record ID field \"{rid}\" is missing or blank in the data"));
        };
        let event = row.get("redcap_event_name").and_then(text).unwrap_or_default();
        let slot = if inner.longitudinal() {
            if event.is_empty() {
                return bad_request(
                    "The data being imported is for a longitudinal project and must include the redcap_event_name field",
                );
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
        for k in ["redcap_repeat_instrument", "redcap_repeat_instance"] {
            if row.get(k).and_then(text).is_some_and(|v| !v.is_empty()) {
                return bad_request("This project has no repeating instruments or events");
            }
        }
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
            match validate(&inner.fields[idx].validation, &value) {
                Ok(stored) => values.push((k.clone(), stored)),
                Err(message) => problems.push(csv_line(&record, k, &value, message)),
            }
        }
        writes.push((record, slot, values));
    }
    if !unknown_fields.is_empty() {
        let lines: Vec<String> = unknown_fields
            .iter()
            .map(|f| csv_line("", f, "", "The field is not a real data field in this project"))
            .collect();
        return bad_request(&lines.join("\n"));
    }
    if !problems.is_empty() {
        return bad_request(&problems.join("\n"));
    }
    let mut ids: Vec<String> = Vec::new();
    let mut seen = HashSet::new();
    for (record, slot, values) in writes {
        if seen.insert(record.clone()) {
            ids.push(record.clone());
        }
        let data = inner.record_mut(&record).slots[slot].get_or_insert_with(HashMap::new);
        for (k, v) in values {
            if v.is_empty() {
                if overwrite {
                    data.remove(&k);
                }
            } else {
                data.insert(k, v);
            }
        }
    }
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

/// A `filterLogic` expression: comparisons of `[field]` or `[event][field]`
/// with quoted strings or numbers, joined by `and`/`or`, with parentheses.
enum Filter {
    Or(Box<Filter>, Box<Filter>),
    And(Box<Filter>, Box<Filter>),
    Cmp(Operand, String, Operand),
}

enum Operand {
    Field { event: Option<usize>, field: String },
    Literal(String),
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ref(String),
    Lit(String),
    Op(String),
    Word(String),
    Open,
    Close,
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '[' => {
                let end = chars[i..].iter().position(|&c| c == ']').ok_or("unclosed [")? + i;
                out.push(Token::Ref(chars[i + 1..end].iter().collect()));
                i = end + 1;
            }
            '\'' | '"' => {
                let end = chars[i + 1..].iter().position(|&x| x == c).ok_or("unclosed quote")? + i + 1;
                out.push(Token::Lit(chars[i + 1..end].iter().collect()));
                i = end + 1;
            }
            '(' => {
                out.push(Token::Open);
                i += 1;
            }
            ')' => {
                out.push(Token::Close);
                i += 1;
            }
            '=' | '<' | '>' | '!' => {
                let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
                if ["<>", "!=", "<=", ">="].contains(&two.as_str()) {
                    out.push(Token::Op(two));
                    i += 2;
                } else if c == '!' {
                    return Err("unexpected !".into());
                } else {
                    out.push(Token::Op(c.to_string()));
                    i += 1;
                }
            }
            c if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' => {
                let end = chars[i..]
                    .iter()
                    .position(|&x| !(x.is_ascii_alphanumeric() || x == '.' || x == '-' || x == '_'))
                    .map_or(chars.len(), |p| p + i);
                out.push(Token::Word(chars[i..end].iter().collect()));
                i = end;
            }
            other => return Err(format!("unexpected {other:?}")),
        }
    }
    Ok(out)
}

impl Filter {
    fn parse(text: &str, inner: &Inner) -> Result<Filter, String> {
        let tokens = tokenize(text)?;
        let mut pos = 0;
        let f = Filter::or(&tokens, &mut pos, inner)?;
        if pos != tokens.len() {
            return Err(format!("unexpected {:?}", tokens[pos]));
        }
        Ok(f)
    }

    fn or(t: &[Token], pos: &mut usize, inner: &Inner) -> Result<Filter, String> {
        let mut left = Filter::and(t, pos, inner)?;
        while matches!(t.get(*pos), Some(Token::Word(w)) if w.eq_ignore_ascii_case("or")) {
            *pos += 1;
            left = Filter::Or(Box::new(left), Box::new(Filter::and(t, pos, inner)?));
        }
        Ok(left)
    }

    fn and(t: &[Token], pos: &mut usize, inner: &Inner) -> Result<Filter, String> {
        let mut left = Filter::atom(t, pos, inner)?;
        while matches!(t.get(*pos), Some(Token::Word(w)) if w.eq_ignore_ascii_case("and")) {
            *pos += 1;
            left = Filter::And(Box::new(left), Box::new(Filter::atom(t, pos, inner)?));
        }
        Ok(left)
    }

    fn atom(t: &[Token], pos: &mut usize, inner: &Inner) -> Result<Filter, String> {
        if t.get(*pos) == Some(&Token::Open) {
            *pos += 1;
            let f = Filter::or(t, pos, inner)?;
            if t.get(*pos) != Some(&Token::Close) {
                return Err("missing )".into());
            }
            *pos += 1;
            return Ok(f);
        }
        let left = Filter::operand(t, pos, inner)?;
        let op = match t.get(*pos) {
            Some(Token::Op(op)) => op.clone(),
            other => return Err(format!("expected an operator, found {other:?}")),
        };
        *pos += 1;
        let right = Filter::operand(t, pos, inner)?;
        Ok(Filter::Cmp(left, op, right))
    }

    fn operand(t: &[Token], pos: &mut usize, inner: &Inner) -> Result<Operand, String> {
        let token = t.get(*pos).cloned().ok_or("unexpected end")?;
        *pos += 1;
        match token {
            Token::Lit(s) => Ok(Operand::Literal(s)),
            Token::Word(w) if w.parse::<f64>().is_ok() => Ok(Operand::Literal(w)),
            Token::Ref(first) => {
                let (event, field) = match t.get(*pos) {
                    Some(Token::Ref(second)) => {
                        *pos += 1;
                        let e =
                            inner.events.iter().position(|e| *e == first).ok_or(format!("unknown event {first}"))?;
                        (Some(e), second.clone())
                    }
                    _ => (None, first),
                };
                if !inner.field_index.contains_key(&field) {
                    return Err(format!("unknown field {field}"));
                }
                Ok(Operand::Field { event, field })
            }
            other => Err(format!("unexpected {other:?}")),
        }
    }

    fn eval(&self, inner: &Inner, rec: &Record, slot: usize) -> bool {
        match self {
            Filter::Or(a, b) => a.eval(inner, rec, slot) || b.eval(inner, rec, slot),
            Filter::And(a, b) => a.eval(inner, rec, slot) && b.eval(inner, rec, slot),
            Filter::Cmp(l, op, r) => {
                let (l, r) = (operand_value(l, inner, rec, slot), operand_value(r, inner, rec, slot));
                let ord = match (l.parse::<f64>(), r.parse::<f64>()) {
                    (Ok(a), Ok(b)) => a.partial_cmp(&b),
                    _ => Some(l.as_str().cmp(r.as_str())),
                };
                // Numbers compare as numbers ('7' = '7.0'), blanks only equal blanks.
                let equal = l == r || ord == Some(std::cmp::Ordering::Equal) && !l.is_empty() && !r.is_empty();
                match op.as_str() {
                    "=" => equal,
                    "<>" | "!=" => !equal,
                    "<" => ord == Some(std::cmp::Ordering::Less),
                    ">" => ord == Some(std::cmp::Ordering::Greater),
                    "<=" => matches!(ord, Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)),
                    ">=" => matches!(ord, Some(std::cmp::Ordering::Greater | std::cmp::Ordering::Equal)),
                    _ => false,
                }
            }
        }
    }
}

fn operand_value(o: &Operand, inner: &Inner, rec: &Record, slot: usize) -> String {
    match o {
        Operand::Literal(s) => s.clone(),
        Operand::Field { event, field } => {
            if *field == inner.record_id_field() {
                return rec.id.clone();
            }
            let slot = event.unwrap_or(slot);
            rec.slots.get(slot).and_then(Option::as_ref).and_then(|d| d.get(field)).cloned().unwrap_or_default()
        }
    }
}
