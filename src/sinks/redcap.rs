//! REDCap: stamps or clears the opt-out field on every record whose phone
//! field holds the person's number.
//!
//! A batch costs at most two API calls: one export of (record id, phone) for
//! every record, matched here, then one import of the opt-out field for the
//! matches (skipped when nothing matched). Matching on our side rather than
//! with `filterLogic` catches every way a number can be typed and never puts
//! webhook text into REDCap logic; a blank, short or invalid phone value
//! never matches, which is the bug of the module this replaces.
//!
//! The record-id field (the first field of the metadata) and the opt-out
//! field's validation come from the project's metadata, fetched once and
//! cached for an hour (an hour so a project changed under us heals itself).
//!
//! Every call, retries and `check-config` included, waits its turn at one
//! spacing limiter: past its per-IP limit REDCap bans the IP for good.
//!
//! Repeating instruments: the opt-out field is written on the row the phone
//! came from only when both fields live on that same repeating instrument (or
//! the phone sits in a repeating event); otherwise it is written on the
//! record's non-repeating row, without `redcap_repeat_*` fields.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use phonenumber::country;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Map, Value};
use tokio::time::Instant;

use super::{DeliveryItem, SinkError};
use crate::config::{RedcapConfig, TimestampFormat};
use crate::domain::{EventKind, Phone};

/// The sink's name in the delivery queue.
pub const SINK_NAME: &str = "redcap";

/// How long the metadata is trusted before it is read again.
const METADATA_TTL: Duration = Duration::from_secs(3600);
/// Digits of a wanted number looked for in a row before parsing it (see [`Tails`]).
const TAIL_DIGITS: usize = 7;
/// REDCap error texts (HTML pages on a 5xx) are cut to this for messages.
const MAX_MESSAGE_CHARS: usize = 500;

/// One line of `optout-relay check-config` for REDCap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLine {
    pub ok: bool,
    pub message: String,
}

impl CheckLine {
    fn ok(message: impl Into<String>) -> CheckLine {
        CheckLine { ok: true, message: message.into() }
    }
    fn fail(message: impl Into<String>) -> CheckLine {
        CheckLine { ok: false, message: message.into() }
    }
}

/// The REDCap client. Cheap to clone; clones share the rate limiter and caches.
#[derive(Clone)]
pub struct RedcapSink {
    client: reqwest::Client,
    url: String,
    /// Scheme, host and port only, for messages (never user info, path or query).
    host: String,
    token: SecretString,
    phone_field: String,
    phone_event: Option<String>,
    optout_field: String,
    optout_event: Option<String>,
    zone: Tz,
    format: TimestampFormat,
    timeout: Duration,
    region: country::Id,
    limiter: Limiter,
    schema: Arc<tokio::sync::Mutex<Option<Arc<Schema>>>>,
}

impl RedcapSink {
    /// Builds the HTTP client; refuses settings it cannot work with (URL,
    /// zone, call budget, empty field names). Makes no call.
    pub fn new(cfg: &RedcapConfig, default_region: country::Id) -> Result<RedcapSink, String> {
        let url = reqwest::Url::parse(cfg.url.trim()).map_err(|e| format!("redcap.url is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err("redcap.url must start with https:// or http://".to_owned());
        }
        let host = url.origin().ascii_serialization();
        let zone: Tz = cfg
            .timezone
            .trim()
            .parse()
            .map_err(|_| format!("redcap.timezone {:?} is not an IANA zone name", cfg.timezone))?;
        if !(1..=600).contains(&cfg.max_calls_per_minute) {
            return Err("redcap.max_calls_per_minute must be between 1 and 600".to_owned());
        }
        for (name, v) in [("phone_field", &cfg.phone_field), ("optout_field", &cfg.optout_field)] {
            if v.trim().is_empty() {
                return Err(format!("redcap.{name} is empty"));
            }
        }
        crate::install_tls_provider();
        let client = reqwest::Client::builder()
            .timeout(cfg.request_timeout)
            .connect_timeout(cfg.request_timeout.min(Duration::from_secs(10)))
            // A redirect would turn the POST into a GET without its body (and
            // REDCap answers 501); better to tell the operator the right URL.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("optout-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let non_empty = |v: &Option<String>| v.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned);
        Ok(RedcapSink {
            client,
            url: url.to_string(),
            host,
            token: cfg.token.clone(),
            phone_field: cfg.phone_field.trim().to_owned(),
            phone_event: non_empty(&cfg.phone_event),
            optout_field: cfg.optout_field.trim().to_owned(),
            optout_event: non_empty(&cfg.optout_event),
            zone,
            format: cfg.timestamp_format,
            timeout: cfg.request_timeout,
            region: default_region,
            limiter: Limiter::per_minute(cfg.max_calls_per_minute),
            schema: Arc::new(tokio::sync::Mutex::new(None)),
        })
    }

    /// Applies the batch: one export, one import (none if nothing matched).
    /// Returns one JSON value per item, in order.
    pub async fn apply(&self, items: &[DeliveryItem]) -> Result<Vec<Value>, SinkError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let schema = self.schema().await?;
        let result = self.apply_with(&schema, items).await;
        if let Err(SinkError::Misconfigured(_)) = &result {
            // The project may have changed under us (field renamed, validation
            // changed): read the metadata again before the next attempt.
            *self.schema.lock().await = None;
        }
        result
    }

    async fn apply_with(&self, schema: &Schema, items: &[DeliveryItem]) -> Result<Vec<Value>, SinkError> {
        let exported = self.export_phones(&schema.record_id).await?;
        let rows = parse_export(&exported, &schema.record_id, &self.phone_field).map_err(SinkError::Misconfigured)?;
        drop(exported);
        let longitudinal = rows.iter().any(|r| r.event.is_some());

        // What each item writes: the local time for an opt-out, "" (clears) for an opt-in.
        let values: Vec<Option<String>> = items
            .iter()
            .map(|item| match item.kind {
                EventKind::OptOut => Some(format_timestamp(item.received_at, self.zone, schema.style)),
                EventKind::OptIn => Some(String::new()),
                EventKind::Help => None,
            })
            .collect();
        let wanted: Vec<Option<String>> =
            items.iter().zip(&values).map(|(item, v)| v.as_ref().map(|_| item.phone.as_str().to_owned())).collect();
        // Parsing phone numbers is CPU work (milliseconds for a large project):
        // off the async workers, so webhooks on this runtime are not held up.
        let region = self.region;
        let (rows, wanted, phones) = tokio::task::spawn_blocking(move || {
            let borrowed: Vec<Option<&str>> = wanted.iter().map(Option::as_deref).collect();
            let phones = normalise(&rows, &borrowed, region);
            (rows, wanted, phones)
        })
        .await
        .map_err(|e| SinkError::Transient {
            message: format!("phone matching did not finish: {e}"),
            retry_after: None,
        })?;
        let wanted: Vec<Option<&str>> = wanted.iter().map(Option::as_deref).collect();
        let plan = plan_writes(&wanted, &rows, &phones, self.optout_event.as_deref(), &schema.optout_form)
            .map_err(SinkError::Misconfigured)?;

        if !plan.writes.is_empty() {
            let data = import_rows(&plan.writes, &schema.record_id, &self.optout_field, &values).to_string();
            let params = [
                ("content", "record"),
                ("type", "flat"),
                ("overwriteBehavior", "overwrite"),
                ("returnContent", "count"),
                ("data", data.as_str()),
            ];
            let answer = self.call(Op::Import, &params).await?;
            let sent = plan.writes.iter().map(|w| w.target.record.as_str()).collect::<HashSet<_>>().len();
            let count = answer.get("count").and_then(|c| c.as_u64().or_else(|| c.as_str()?.trim().parse().ok()));
            if count.is_none_or(|n| n < sent as u64) {
                tracing::warn!(
                    sink = SINK_NAME,
                    sent,
                    count = ?count,
                    "REDCap's import count is below the number of records sent"
                );
            }
        }

        tracing::info!(
            sink = SINK_NAME,
            items = items.len(),
            rows_exported = rows.len(),
            rows_written = plan.writes.len(),
            "REDCap batch applied"
        );
        Ok(plan.results(items, &values, longitudinal))
    }

    /// Checks the live project against the configuration, one line per fact.
    pub async fn check(&self) -> Vec<CheckLine> {
        let mut out = Vec::new();
        let project = match self.call(Op::Project, &[("content", "project")]).await {
            Ok(v) => v,
            Err(e) => {
                out.push(CheckLine::fail(e.to_string()));
                return out;
            }
        };
        let title = project.get("project_title").and_then(Value::as_str).unwrap_or("?");
        let pid = project.get("project_id").map(text_of).unwrap_or_default();
        out.push(CheckLine::ok(format!("REDCap at {} accepted the API token (project {pid} {title:?})", self.host)));
        let longitudinal = flag(project.get("is_longitudinal"));
        let repeating = flag(project.get("has_repeating_instruments_or_events"));

        let meta = match self
            .call(Op::Metadata, &[("content", "metadata")])
            .await
            .and_then(|v| Metadata::parse(&v).map_err(SinkError::Misconfigured))
        {
            Ok(m) => m,
            Err(e) => {
                out.push(CheckLine::fail(format!("cannot read the project's metadata: {e}")));
                return out;
            }
        };
        out.push(CheckLine::ok(format!("record-id field is `{}`", meta.record_id)));
        match meta.fields.get(&self.phone_field) {
            Some(f) => out.push(CheckLine::ok(format!(
                "phone field `{}` exists (instrument `{}`, validation {})",
                f.name,
                f.form,
                shown(&f.validation)
            ))),
            None => out.push(CheckLine::fail(format!(
                "redcap.phone_field `{}` is not a field of the project",
                self.phone_field
            ))),
        }
        match meta.fields.get(&self.optout_field) {
            Some(f) => out.push(CheckLine::ok(format!("opt-out field `{}` exists (instrument `{}`)", f.name, f.form))),
            None => out.push(CheckLine::fail(format!(
                "redcap.optout_field `{}` is not a field of the project",
                self.optout_field
            ))),
        }
        if let Some(f) = meta.fields.get(&self.optout_field) {
            if f.name == meta.record_id {
                out.push(CheckLine::fail(format!("redcap.optout_field `{}` is the record-id field", f.name)));
            }
            match timestamp_style(self.format, &f.field_type, &f.validation) {
                Ok(style) => out.push(CheckLine::ok(format!(
                    "opt-out field validation {}: an opt-out is stamped like {:?} ({}), an opt-in clears it",
                    shown(&f.validation),
                    format_timestamp(Utc::now(), self.zone, style),
                    self.zone
                ))),
                Err(why) => out.push(CheckLine::fail(format!("redcap.optout_field `{}` {why}", f.name))),
            }
        }

        let configured: Vec<(&str, &str)> = [("phone_event", &self.phone_event), ("optout_event", &self.optout_event)]
            .into_iter()
            .filter_map(|(name, ev)| ev.as_deref().map(|e| (name, e)))
            .collect();
        if !longitudinal {
            if configured.is_empty() {
                out.push(CheckLine::ok("project is classic (not longitudinal)"));
            }
            for (name, ev) in &configured {
                out.push(CheckLine::fail(format!(
                    "redcap.{name} is `{ev}` but the project is not longitudinal: remove it"
                )));
            }
        } else {
            if !configured.is_empty() {
                match self.call(Op::Events, &[("content", "event")]).await {
                    Ok(v) => {
                        let names: HashSet<String> = v
                            .as_array()
                            .map(|a| a.iter().filter_map(|e| e.get("unique_event_name").map(text_of)).collect())
                            .unwrap_or_default();
                        for (name, ev) in &configured {
                            if names.contains(*ev) {
                                out.push(CheckLine::ok(format!("{name} `{ev}` exists")));
                            } else {
                                out.push(CheckLine::fail(format!(
                                    "redcap.{name} `{ev}` is not a unique event name of the project"
                                )));
                            }
                        }
                    }
                    Err(e) => out.push(CheckLine::fail(format!("cannot read the project's events: {e}"))),
                }
            }
            if self.phone_event.is_none() {
                out.push(CheckLine::ok(
                    "project is longitudinal and redcap.phone_event is not set: the phone field is read in every event",
                ));
            }
            if self.optout_event.is_none() {
                out.push(CheckLine::ok(
                    "redcap.optout_event is not set: the opt-out field is written in the event where the phone matched",
                ));
            }
        }
        if repeating {
            out.push(CheckLine::ok(
                "project has repeating instruments or events: the opt-out field is written on the non-repeating row \
                 unless it shares the phone's repeating instrument",
            ));
        }

        // Reading the phones proves the export right, and that it is not a
        // de-identified one (which silently drops identifiers such as phones).
        if meta.fields.contains_key(&self.phone_field) {
            match self.export_phones(&meta.record_id).await {
                Ok(v) => match parse_export(&v, &meta.record_id, &self.phone_field) {
                    Ok(rows) => {
                        let valid = rows.iter().filter(|r| Phone::parse_valid(&r.phone, self.region).is_some()).count();
                        out.push(CheckLine::ok(format!(
                            "export works: {} row(s), {valid} with a valid phone number",
                            rows.len()
                        )));
                    }
                    Err(e) => out.push(CheckLine::fail(e)),
                },
                Err(e) => out.push(CheckLine::fail(format!("cannot export the phone field: {e}"))),
            }
        }
        out
    }

    /// The cached schema, read again when missing or older than the TTL.
    /// Only a usable schema is cached, so a fixed project is seen at once.
    async fn schema(&self) -> Result<Arc<Schema>, SinkError> {
        let mut slot = self.schema.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| s.fetched_at.elapsed() < METADATA_TTL) {
            return Ok(s.clone());
        }
        let raw = self.call(Op::Metadata, &[("content", "metadata")]).await?;
        let meta = Metadata::parse(&raw).map_err(SinkError::Misconfigured)?;
        let schema = Arc::new(
            Schema::from_metadata(&meta, &self.phone_field, &self.optout_field, self.format)
                .map_err(SinkError::Misconfigured)?,
        );
        *slot = Some(schema.clone());
        Ok(schema)
    }

    async fn export_phones(&self, record_id: &str) -> Result<Value, SinkError> {
        let mut params = vec![("content", "record"), ("type", "flat"), ("fields[0]", record_id)];
        if self.phone_field != record_id {
            params.push(("fields[1]", self.phone_field.as_str()));
        }
        if let Some(ev) = &self.phone_event {
            params.push(("events[0]", ev.as_str()));
        }
        self.call(Op::Export, &params).await
    }

    /// One API call: waits for the limiter, POSTs the form, classifies the answer.
    async fn call(&self, op: Op, params: &[(&str, &str)]) -> Result<Value, SinkError> {
        self.limiter.wait().await;
        let mut form: Vec<(&str, &str)> = Vec::with_capacity(params.len() + 3);
        form.push(("token", self.token.expose_secret()));
        form.push(("format", "json"));
        form.push(("returnFormat", "json"));
        form.extend_from_slice(params);
        let started = std::time::Instant::now();
        let result = async {
            let res = self.client.post(&self.url).form(&form).send().await.map_err(|e| self.transport_error(op, e))?;
            let status = res.status().as_u16();
            let retry_after = res
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let location =
                res.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
            let body = res.text().await.map_err(|e| self.transport_error(op, e))?;
            classify(op, status, retry_after, location.as_deref(), &body)
        }
        .await;
        crate::metrics::sink_call(SINK_NAME, op.label(), started.elapsed().as_secs_f64());
        tracing::debug!(
            sink = SINK_NAME,
            op = op.what(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            ok = result.is_ok(),
            "REDCap call"
        );
        // Belt and braces: REDCap never echoes the token, but no message of ours may carry it.
        result.map_err(|e| scrub(e, self.token.expose_secret()))
    }

    fn transport_error(&self, op: Op, e: reqwest::Error) -> SinkError {
        let e = e.without_url();
        if e.is_builder() {
            return SinkError::Misconfigured(format!("cannot build the REDCap {}: {e}", op.what()));
        }
        let message = if e.is_timeout() {
            format!("REDCap at {} did not answer the {} within {:?}", self.host, op.what(), self.timeout)
        } else {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            format!("cannot reach REDCap at {} for the {}: {text}", self.host, op.what())
        };
        SinkError::Transient { message, retry_after: None }
    }
}

/// Spaces calls at least `60 s / per_minute` apart, so no 60-second window
/// holds more than `per_minute` of them. Shared by every clone of the sink,
/// but per process: replicas behind one IP must split REDCap's limit.
#[derive(Clone)]
struct Limiter {
    interval: Duration,
    next: Arc<tokio::sync::Mutex<Instant>>,
}

impl Limiter {
    fn per_minute(per_minute: u32) -> Limiter {
        Limiter {
            interval: Duration::from_secs(60) / per_minute.max(1),
            next: Arc::new(tokio::sync::Mutex::new(Instant::now())),
        }
    }

    /// Reserves the next slot, then sleeps until it (the lock is not held while sleeping).
    async fn wait(&self) {
        let at = {
            let mut next = self.next.lock().await;
            let at = (*next).max(Instant::now());
            *next = at + self.interval;
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Project,
    Metadata,
    Events,
    Export,
    Import,
}

impl Op {
    /// Short label for metrics.
    fn label(self) -> &'static str {
        match self {
            Op::Project => "project",
            Op::Metadata => "metadata",
            Op::Events => "event",
            Op::Export => "export",
            Op::Import => "import",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Op::Project => "project info request",
            Op::Metadata => "metadata export",
            Op::Events => "event export",
            Op::Export => "record export",
            Op::Import => "record import",
        }
    }
}

/// Turns an HTTP answer into the JSON it carries or the sink error it means.
fn classify(
    op: Op,
    status: u16,
    retry_after: Option<Duration>,
    location: Option<&str>,
    body: &str,
) -> Result<Value, SinkError> {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let error_text = parsed.as_ref().and_then(|v| v.get("error")).map(text_of);
    let message = error_text.clone().unwrap_or_else(|| snippet(body));
    let what = op.what();
    match status {
        200..=299 => match parsed {
            _ if error_text.is_some() => Err(SinkError::Misconfigured(format!("REDCap refused the {what}: {message}"))),
            Some(v) => Ok(v),
            None => Err(SinkError::Transient {
                message: format!("REDCap answered the {what} with a body that is not JSON: {message}"),
                retry_after: None,
            }),
        },
        429 => {
            tracing::error!(
                sink = SINK_NAME,
                retry_after_secs = retry_after.map(|d| d.as_secs()),
                "REDCap answered 429: it is rate-limiting this IP, and past its limit it bans the IP until an \
                 administrator lifts the ban; check redcap.max_calls_per_minute and other API clients on this IP"
            );
            Err(SinkError::Transient {
                message: format!("REDCap is rate-limiting this IP (429) on the {what}: {message}"),
                retry_after,
            })
        }
        403 => Err(SinkError::Misconfigured(format!("REDCap refused the API token (403): {message}"))),
        400 => Err(SinkError::Misconfigured(format!("REDCap rejected the {what} (400): {message}"))),
        408 | 500..=599 => Err(SinkError::Transient {
            message: format!("REDCap answered {status} to the {what}: {message}"),
            retry_after,
        }),
        300..=399 => Err(SinkError::Misconfigured(format!(
            "REDCap answered the {what} with a redirect ({status}) to {}: set redcap.url to the final API address",
            location.unwrap_or("?")
        ))),
        _ => Err(SinkError::Misconfigured(format!("REDCap answered {status} to the {what}: {message}"))),
    }
}

fn scrub(e: SinkError, token: &str) -> SinkError {
    if token.is_empty() {
        return e;
    }
    match e {
        SinkError::Transient { message, retry_after } => {
            SinkError::Transient { message: message.replace(token, "[REDACTED]"), retry_after }
        }
        SinkError::Misconfigured(m) => SinkError::Misconfigured(m.replace(token, "[REDACTED]")),
    }
}

/// A body reduced to one short line for an error message.
fn snippet(body: &str) -> String {
    let one_line = body.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.is_empty() {
        return "(empty body)".to_owned();
    }
    match one_line.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((i, _)) => format!("{}…", &one_line[..i]),
        None => one_line,
    }
}

/// A JSON scalar as REDCap means it: strings as they are, numbers as text, null as blank.
fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// REDCap flags are `0`/`1`, as numbers or strings.
fn flag(v: Option<&Value>) -> bool {
    v.map(text_of).is_some_and(|s| s.trim() == "1" || s.trim().eq_ignore_ascii_case("true"))
}

fn shown(validation: &str) -> String {
    if validation.is_empty() {
        "none (free text)".to_owned()
    } else {
        validation.to_owned()
    }
}

/// What the metadata says about one field.
#[derive(Debug, Clone)]
struct FieldInfo {
    name: String,
    form: String,
    field_type: String,
    validation: String,
}

struct Metadata {
    /// The first field of the metadata.
    record_id: String,
    fields: HashMap<String, FieldInfo>,
}

impl Metadata {
    fn parse(v: &Value) -> Result<Metadata, String> {
        let rows = v.as_array().ok_or("REDCap's metadata export is not a JSON array")?;
        let mut record_id = None;
        let mut fields = HashMap::with_capacity(rows.len());
        for row in rows {
            let get = |k: &str| row.get(k).map(text_of).unwrap_or_default();
            let name = get("field_name");
            if name.is_empty() {
                continue;
            }
            record_id.get_or_insert_with(|| name.clone());
            let info = FieldInfo {
                name: name.clone(),
                form: get("form_name"),
                field_type: get("field_type"),
                validation: get("text_validation_type_or_show_slider_number").trim().to_ascii_lowercase(),
            };
            fields.insert(name, info);
        }
        let record_id = record_id.ok_or("REDCap's metadata lists no fields")?;
        Ok(Metadata { record_id, fields })
    }
}

/// What a batch needs from the metadata.
#[derive(Debug)]
struct Schema {
    record_id: String,
    style: TimestampStyle,
    optout_form: String,
    fetched_at: Instant,
}

impl Schema {
    fn from_metadata(
        meta: &Metadata,
        phone_field: &str,
        optout_field: &str,
        format: TimestampFormat,
    ) -> Result<Schema, String> {
        if !meta.fields.contains_key(phone_field) {
            return Err(format!("redcap.phone_field `{phone_field}` is not a field of the project"));
        }
        let optout = meta
            .fields
            .get(optout_field)
            .ok_or_else(|| format!("redcap.optout_field `{optout_field}` is not a field of the project"))?;
        if optout_field == meta.record_id {
            return Err(format!("redcap.optout_field `{optout_field}` is the record-id field"));
        }
        let style = timestamp_style(format, &optout.field_type, &optout.validation)
            .map_err(|why| format!("redcap.optout_field `{optout_field}` {why}"))?;
        Ok(Schema {
            record_id: meta.record_id.clone(),
            style,
            optout_form: optout.form.clone(),
            fetched_at: Instant::now(),
        })
    }
}

/// How an opt-out time is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimestampStyle {
    /// `YYYY-MM-DD HH:MM`
    Minutes,
    /// `YYYY-MM-DD HH:MM:SS`
    Seconds,
}

/// The style for a field of this type and validation. REDCap imports dates
/// as Y-M-D whatever the display order, so `_mdy`/`_dmy` change nothing.
/// Date-only and non-date validations cannot hold a time and are refused,
/// whatever the configured format, as the module we replace refused them.
fn timestamp_style(format: TimestampFormat, field_type: &str, validation: &str) -> Result<TimestampStyle, String> {
    let field_type = field_type.trim();
    if !(field_type.is_empty() || field_type == "text" || field_type == "notes") {
        return Err(format!("is a `{field_type}` field; it must be a text field (free text or datetime)"));
    }
    let natural = match validation.trim() {
        "" => TimestampStyle::Seconds,
        "datetime_ymd" | "datetime_mdy" | "datetime_dmy" => TimestampStyle::Minutes,
        "datetime_seconds_ymd" | "datetime_seconds_mdy" | "datetime_seconds_dmy" => TimestampStyle::Seconds,
        v if v.starts_with("date_") => {
            return Err(format!(
                "has the date-only validation {v}: the opt-out time needs a datetime or free-text field"
            ))
        }
        v => return Err(format!("has the validation {v}, which cannot hold a date and time")),
    };
    Ok(match format {
        TimestampFormat::Auto => natural,
        TimestampFormat::Minutes => TimestampStyle::Minutes,
        TimestampFormat::Seconds => TimestampStyle::Seconds,
    })
}

/// The wall-clock time in the project's zone: REDCap stores local times.
fn format_timestamp(at: DateTime<Utc>, zone: Tz, style: TimestampStyle) -> String {
    let local = at.with_timezone(&zone);
    match style {
        TimestampStyle::Minutes => local.format("%Y-%m-%d %H:%M").to_string(),
        TimestampStyle::Seconds => local.format("%Y-%m-%d %H:%M:%S").to_string(),
    }
}

/// One row of the phone export.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ExportRow {
    record: String,
    /// `redcap_event_name`: present exactly when the project is longitudinal.
    event: Option<String>,
    repeat_instrument: String,
    repeat_instance: String,
    phone: String,
}

fn parse_export(v: &Value, record_id: &str, phone_field: &str) -> Result<Vec<ExportRow>, String> {
    let rows = v.as_array().ok_or("REDCap's record export is not a JSON array")?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let obj = row.as_object().ok_or("REDCap's record export holds something that is not an object")?;
        let record = obj
            .get(record_id)
            .map(text_of)
            .filter(|r| !r.is_empty())
            .ok_or_else(|| format!("REDCap's record export lacks the record-id field `{record_id}`"))?;
        let phone = obj.get(phone_field).map(text_of).ok_or_else(|| {
            format!(
                "REDCap's record export lacks the phone field `{phone_field}`: the API user needs full \
                 (not de-identified) data export rights"
            )
        })?;
        let get = |k: &str| obj.get(k).map(text_of).unwrap_or_default();
        out.push(ExportRow {
            record,
            event: obj.get("redcap_event_name").map(text_of),
            repeat_instrument: get("redcap_repeat_instrument"),
            repeat_instance: get("redcap_repeat_instance"),
            phone,
        });
    }
    Ok(out)
}

/// The E.164 of each row's phone when it may be one of `wanted`; None for
/// blanks, short codes, invalid numbers and numbers nobody in the batch has.
/// Parsing is slow (libphonenumber), so rows that cannot hold a wanted number
/// are ruled out on their digits first.
fn normalise(rows: &[ExportRow], wanted: &[Option<&str>], region: country::Id) -> Vec<Option<Phone>> {
    let tails = Tails::of(wanted.iter().flatten().copied());
    rows.iter()
        .map(|r| {
            if r.phone.trim().is_empty() || !tails.may_hold(&r.phone) {
                return None;
            }
            Phone::parse_valid(&r.phone, region)
        })
        .collect()
}

/// The last digits of the wanted numbers. However a number is typed, its
/// subscriber digits come last and in one run once separators are dropped:
/// trunk prefixes, country codes and carrier tokens go in front, an
/// extension after. So a row whose digits contain no wanted tail cannot parse
/// to a wanted number and needs no parse.
struct Tails {
    lens: Vec<usize>,
    set: HashSet<(usize, u64)>,
}

impl Tails {
    fn of<'a>(e164s: impl Iterator<Item = &'a str>) -> Tails {
        let mut set = HashSet::new();
        for e164 in e164s {
            let digits: Vec<u8> = e164.bytes().filter(u8::is_ascii_digit).map(|b| b - b'0').collect();
            // At most the national number: a country code has up to 3 digits
            // and is left out when typed in the default region.
            let len = TAIL_DIGITS.min(digits.len().saturating_sub(3));
            if len > 0 {
                set.insert((len, value(&digits[digits.len() - len..])));
            }
        }
        let mut lens: Vec<usize> = set.iter().map(|(l, _)| *l).collect();
        lens.sort_unstable();
        lens.dedup();
        Tails { lens, set }
    }

    fn may_hold(&self, raw: &str) -> bool {
        // libphonenumber reads non-ASCII digits too; leave those to it.
        if !raw.is_ascii() {
            return true;
        }
        let mut digits = [0u8; 64];
        let mut n = 0;
        for b in raw.bytes().filter(u8::is_ascii_digit) {
            if n == digits.len() {
                return true;
            }
            digits[n] = b - b'0';
            n += 1;
        }
        self.lens.iter().any(|&len| n >= len && digits[..n].windows(len).any(|w| self.set.contains(&(len, value(w)))))
    }
}

fn value(digits: &[u8]) -> u64 {
    digits.iter().fold(0, |acc, &d| acc * 10 + u64::from(d))
}

/// Where one opt-out value goes: a record's row in an event (and repeat instance).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Target {
    record: String,
    event: Option<String>,
    /// `(redcap_repeat_instrument, redcap_repeat_instance)`; `None` for the non-repeating row.
    repeat: Option<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Write {
    target: Target,
    /// Index of the item whose value is written (the last one for this target).
    item: usize,
}

#[derive(Debug, Default)]
struct Plan {
    writes: Vec<Write>,
    /// Per item: the distinct records its phone matched.
    matched: Vec<Vec<String>>,
}

impl Plan {
    fn results(&self, items: &[DeliveryItem], values: &[Option<String>], longitudinal: bool) -> Vec<Value> {
        let mut written: Vec<(Vec<String>, Vec<String>)> = vec![(Vec::new(), Vec::new()); items.len()];
        for w in &self.writes {
            let (records, events) = &mut written[w.item];
            if !records.contains(&w.target.record) {
                records.push(w.target.record.clone());
            }
            if let Some(ev) = &w.target.event {
                if !events.contains(ev) {
                    events.push(ev.clone());
                }
            }
        }
        written
            .into_iter()
            .enumerate()
            .map(|(i, (records, events))| {
                let mut out = Map::new();
                let matched = self.matched.get(i).map_or(0, Vec::len);
                out.insert("records".into(), json!(records));
                out.insert("matched".into(), json!(matched));
                match &values[i] {
                    Some(v) if matched > 0 => {
                        if longitudinal {
                            out.insert("events".into(), json!(events));
                        }
                        out.insert("value".into(), json!(v));
                    }
                    Some(_) => {}
                    None => {
                        out.insert("skipped".into(), json!("help messages change nothing in REDCap"));
                    }
                }
                Value::Object(out)
            })
            .collect()
    }
}

/// Decides every write of a batch. `wanted[i]` is item i's E.164 phone (None:
/// nothing to write); `phones[j]` is row j's normalised phone. A blank or
/// invalid row phone is None and so never matches. When two items would write
/// the same row, the later item wins.
fn plan_writes(
    wanted: &[Option<&str>],
    rows: &[ExportRow],
    phones: &[Option<Phone>],
    optout_event: Option<&str>,
    optout_form: &str,
) -> Result<Plan, String> {
    let mut by_phone: HashMap<&str, Vec<usize>> = HashMap::new();
    for (j, p) in phones.iter().enumerate() {
        if let Some(p) = p {
            by_phone.entry(p.as_str()).or_default().push(j);
        }
    }
    let mut plan = Plan { writes: Vec::new(), matched: vec![Vec::new(); wanted.len()] };
    let mut index: HashMap<Target, usize> = HashMap::new();
    for (i, phone) in wanted.iter().enumerate() {
        let Some(phone) = phone else { continue };
        for &j in by_phone.get(phone).map(Vec::as_slice).unwrap_or_default() {
            let row = &rows[j];
            if !plan.matched[i].contains(&row.record) {
                plan.matched[i].push(row.record.clone());
            }
            let target = target_for(row, optout_event, optout_form)?;
            match index.get(&target) {
                Some(&k) => plan.writes[k].item = i,
                None => {
                    index.insert(target.clone(), plan.writes.len());
                    plan.writes.push(Write { target, item: i });
                }
            }
        }
    }
    Ok(plan)
}

/// The row the opt-out value goes to for a phone found on `row`.
fn target_for(row: &ExportRow, optout_event: Option<&str>, optout_form: &str) -> Result<Target, String> {
    let event = match (&row.event, optout_event) {
        (Some(_), Some(configured)) => Some(configured.to_owned()),
        (Some(matched), None) => Some(matched.clone()),
        (None, Some(configured)) => {
            return Err(format!("redcap.optout_event is `{configured}` but the project is not longitudinal"))
        }
        (None, None) => None,
    };
    let same_event = optout_event.is_none() || row.event.as_deref() == optout_event;
    let repeat = if row.repeat_instance.is_empty() || !same_event {
        None
    } else if row.repeat_instrument.is_empty() {
        // A repeating event: every instrument in it repeats, the opt-out field's too.
        Some((String::new(), row.repeat_instance.clone()))
    } else if row.repeat_instrument == optout_form {
        Some((row.repeat_instrument.clone(), row.repeat_instance.clone()))
    } else {
        None
    };
    Ok(Target { record: row.record.clone(), event, repeat })
}

/// The import's `data`: one row per write, holding only the record id, the
/// event/repeat keys and the opt-out field, so nothing else is touched.
fn import_rows(writes: &[Write], record_id: &str, optout_field: &str, values: &[Option<String>]) -> Value {
    let rows = writes
        .iter()
        .map(|w| {
            let mut row = Map::new();
            row.insert(record_id.to_owned(), json!(w.target.record));
            if let Some(ev) = &w.target.event {
                row.insert("redcap_event_name".into(), json!(ev));
            }
            if let Some((instrument, instance)) = &w.target.repeat {
                row.insert("redcap_repeat_instrument".into(), json!(instrument));
                row.insert("redcap_repeat_instance".into(), json!(instance));
            }
            row.insert(optout_field.to_owned(), json!(values[w.item].as_deref().unwrap_or_default()));
            Value::Object(row)
        })
        .collect();
    Value::Array(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    fn row(record: &str, event: Option<&str>, phone: &str) -> ExportRow {
        ExportRow {
            record: record.into(),
            event: event.map(Into::into),
            repeat_instrument: String::new(),
            repeat_instance: String::new(),
            phone: phone.into(),
        }
    }

    fn normalise(rows: &[ExportRow]) -> Vec<Option<Phone>> {
        rows.iter().map(|r| Phone::parse_valid(&r.phone, country::Id::US)).collect()
    }

    #[test]
    fn the_digit_precheck_keeps_every_typed_form_of_a_wanted_number() {
        let tails = Tails::of(["+14155550101", "+442079460958", "+5491112345678", "+6834002"].into_iter());
        for raw in [
            "(415) 555-0101",
            "415-555-0101",
            "4155550101",
            "+1 415 555 0101",
            "1-415-555-0101",
            "415.555.0101",
            "415-555-0101 ext. 12",
            "020 7946 0958",
            "+44 (0)20 7946 0958",
            "011 15 1234-5678",
            "+683 4002",
            "\u{ff14}\u{ff11}\u{ff15}5550101",
        ] {
            assert!(tails.may_hold(raw), "{raw}");
        }
        for raw in ["415-555-0102", "", "12345", "+44 20 7946 0959"] {
            assert!(!tails.may_hold(raw), "{raw}");
        }
    }

    #[test]
    fn the_precheck_changes_no_match() {
        let rows: Vec<ExportRow> =
            ["(415) 555-0101", "415-555-0102", "", "12345", "415.555.0101 x3", "+44 20 7946 0958"]
                .iter()
                .enumerate()
                .map(|(i, p)| row(&i.to_string(), None, p))
                .collect();
        let wanted = [Some("+14155550101"), Some("+442079460958")];
        let fast = super::normalise(&rows, &wanted, country::Id::US);
        let slow = normalise(&rows);
        for (j, (f, s)) in fast.iter().zip(&slow).enumerate() {
            let wanted_slow = s.as_ref().filter(|p| wanted.contains(&Some(p.as_str())));
            assert_eq!(f.as_ref(), wanted_slow, "row {j}");
        }
        assert!(fast[0].is_some() && fast[5].is_some());
        // An extension is dropped: the desk phone still matches.
        assert!(fast[4].is_some());
    }

    #[test]
    fn style_follows_the_validation_in_auto() {
        use TimestampStyle::*;
        for (v, want) in [
            ("", Seconds),
            ("datetime_ymd", Minutes),
            ("datetime_mdy", Minutes),
            ("datetime_dmy", Minutes),
            ("datetime_seconds_ymd", Seconds),
            ("datetime_seconds_mdy", Seconds),
            ("datetime_seconds_dmy", Seconds),
        ] {
            assert_eq!(timestamp_style(TimestampFormat::Auto, "text", v), Ok(want), "{v}");
        }
    }

    #[test]
    fn explicit_format_wins_over_validation() {
        assert_eq!(timestamp_style(TimestampFormat::Minutes, "text", ""), Ok(TimestampStyle::Minutes));
        assert_eq!(timestamp_style(TimestampFormat::Seconds, "text", "datetime_ymd"), Ok(TimestampStyle::Seconds));
        assert_eq!(timestamp_style(TimestampFormat::Minutes, "notes", ""), Ok(TimestampStyle::Minutes));
    }

    #[test]
    fn date_only_and_other_validations_are_refused_whatever_the_format() {
        for format in [TimestampFormat::Auto, TimestampFormat::Minutes, TimestampFormat::Seconds] {
            for v in ["date_ymd", "date_mdy", "date_dmy"] {
                let e = timestamp_style(format, "text", v).unwrap_err();
                assert!(e.contains("date-only"), "{e}");
            }
            assert!(timestamp_style(format, "text", "integer").is_err());
            assert!(timestamp_style(format, "radio", "").is_err());
        }
    }

    #[test]
    fn formats_in_the_project_zone() {
        let at = utc(2026, 11, 23, 14, 15, 7);
        assert_eq!(format_timestamp(at, chrono_tz::UTC, TimestampStyle::Seconds), "2026-11-23 14:15:07");
        assert_eq!(format_timestamp(at, chrono_tz::UTC, TimestampStyle::Minutes), "2026-11-23 14:15");
        assert_eq!(format_timestamp(at, chrono_tz::America::New_York, TimestampStyle::Seconds), "2026-11-23 09:15:07");
        assert_eq!(format_timestamp(at, chrono_tz::Asia::Kolkata, TimestampStyle::Minutes), "2026-11-23 19:45");
        // Crossing midnight changes the date too.
        assert_eq!(
            format_timestamp(utc(2026, 1, 1, 2, 0, 0), chrono_tz::America::Los_Angeles, TimestampStyle::Minutes),
            "2025-12-31 18:00"
        );
    }

    #[test]
    fn follows_daylight_saving_time() {
        let ny = chrono_tz::America::New_York;
        // Summer: UTC-4; winter: UTC-5.
        assert_eq!(format_timestamp(utc(2026, 7, 1, 16, 0, 0), ny, TimestampStyle::Minutes), "2026-07-01 12:00");
        assert_eq!(format_timestamp(utc(2026, 1, 15, 16, 0, 0), ny, TimestampStyle::Minutes), "2026-01-15 11:00");
        // 2026-03-08: 02:00 EST jumps to 03:00 EDT (07:00 UTC).
        assert_eq!(format_timestamp(utc(2026, 3, 8, 6, 59, 59), ny, TimestampStyle::Seconds), "2026-03-08 01:59:59");
        assert_eq!(format_timestamp(utc(2026, 3, 8, 7, 0, 0), ny, TimestampStyle::Seconds), "2026-03-08 03:00:00");
        // 2026-11-01: 02:00 EDT falls back to 01:00 EST; both 01:30s exist.
        assert_eq!(format_timestamp(utc(2026, 11, 1, 5, 30, 0), ny, TimestampStyle::Minutes), "2026-11-01 01:30");
        assert_eq!(format_timestamp(utc(2026, 11, 1, 6, 30, 0), ny, TimestampStyle::Minutes), "2026-11-01 01:30");
    }

    #[test]
    fn every_typed_format_matches_the_e164_number() {
        let formats = [
            "(415) 555-0101",
            "415-555-0101",
            "4155550101",
            "+1 415 555 0101",
            "1-415-555-0101",
            "415.555.0101",
            "415 555-0101",
        ];
        let rows: Vec<ExportRow> = formats.iter().enumerate().map(|(i, p)| row(&i.to_string(), None, p)).collect();
        let phones = normalise(&rows);
        let plan = plan_writes(&[Some("+14155550101")], &rows, &phones, None, "f").unwrap();
        let records: Vec<&str> = plan.writes.iter().map(|w| w.target.record.as_str()).collect();
        assert_eq!(records, ["0", "1", "2", "3", "4", "5", "6"]);
        assert_eq!(plan.matched[0].len(), formats.len());
    }

    #[test]
    fn other_numbers_do_not_match() {
        let rows =
            vec![row("1", None, "415-555-0102"), row("2", None, "+44 20 7946 0958"), row("3", None, "(415) 555-0101")];
        let phones = normalise(&rows);
        let plan = plan_writes(&[Some("+14155550101")], &rows, &phones, None, "f").unwrap();
        assert_eq!(plan.writes.len(), 1);
        assert_eq!(plan.writes[0].target.record, "3");
    }

    #[test]
    fn blank_and_short_code_phones_never_match() {
        let rows = vec![row("1", None, ""), row("2", None, "   "), row("3", None, "12345"), row("4", None, "n/a")];
        let phones = normalise(&rows);
        assert!(phones.iter().all(Option::is_none));
        // Whatever the item's number (a short code, a foreign number, even an empty string).
        for wanted in ["+12345", "12345", "", "+442079460958", "+14155550101"] {
            let plan = plan_writes(&[Some(wanted)], &rows, &phones, None, "f").unwrap();
            assert!(plan.writes.is_empty(), "{wanted:?}");
            assert!(plan.matched[0].is_empty());
        }
    }

    #[test]
    fn items_without_value_write_nothing() {
        let rows = vec![row("1", None, "4155550101")];
        let plan = plan_writes(&[None], &rows, &normalise(&rows), None, "f").unwrap();
        assert!(plan.writes.is_empty());
    }

    #[test]
    fn the_same_record_and_event_is_written_once_by_the_last_item() {
        // Record 1 holds two numbers in two events; optout_event sends both to one row.
        let rows = vec![
            row("1", Some("baseline_arm_1"), "415-555-0101"),
            row("1", Some("followup_arm_1"), "415-555-0102"),
            row("2", Some("baseline_arm_1"), "415-555-0102"),
        ];
        let phones = normalise(&rows);
        let plan =
            plan_writes(&[Some("+14155550101"), Some("+14155550102")], &rows, &phones, Some("consent_arm_1"), "f")
                .unwrap();
        let got: Vec<(&str, Option<&str>, usize)> =
            plan.writes.iter().map(|w| (w.target.record.as_str(), w.target.event.as_deref(), w.item)).collect();
        assert_eq!(got, [("1", Some("consent_arm_1"), 1), ("2", Some("consent_arm_1"), 1)]);
        assert_eq!(plan.matched[0], ["1"]);
        assert_eq!(plan.matched[1], ["1", "2"]);

        // Without optout_event each matched event is its own row: no collision.
        let plan = plan_writes(&[Some("+14155550101"), Some("+14155550102")], &rows, &phones, None, "f").unwrap();
        let got: Vec<(&str, Option<&str>, usize)> =
            plan.writes.iter().map(|w| (w.target.record.as_str(), w.target.event.as_deref(), w.item)).collect();
        assert_eq!(
            got,
            [("1", Some("baseline_arm_1"), 0), ("1", Some("followup_arm_1"), 1), ("2", Some("baseline_arm_1"), 1)]
        );
    }

    #[test]
    fn optout_event_needs_a_longitudinal_export() {
        let rows = vec![row("1", None, "4155550101")];
        assert!(plan_writes(&[Some("+14155550101")], &rows, &normalise(&rows), Some("ev"), "f").is_err());
    }

    #[test]
    fn repeating_rows_write_the_instance_only_when_the_field_shares_it() {
        let mut r = row("1", None, "4155550101");
        r.repeat_instrument = "contacts".into();
        r.repeat_instance = "2".into();
        assert_eq!(target_for(&r, None, "contacts").unwrap().repeat, Some(("contacts".into(), "2".into())));
        assert_eq!(target_for(&r, None, "consent").unwrap().repeat, None);
        // A repeating event.
        let mut e = row("1", Some("visit_arm_1"), "4155550101");
        e.repeat_instance = "3".into();
        assert_eq!(target_for(&e, None, "consent").unwrap().repeat, Some((String::new(), "3".into())));
        assert_eq!(target_for(&e, Some("enrol_arm_1"), "consent").unwrap().repeat, None);
    }

    #[test]
    fn import_rows_hold_only_the_keys_and_the_optout_field() {
        let writes = vec![
            Write { target: Target { record: "7".into(), event: None, repeat: None }, item: 0 },
            Write { target: Target { record: "9".into(), event: Some("ev_1".into()), repeat: None }, item: 1 },
        ];
        let data =
            import_rows(&writes, "study_id", "optout_at", &[Some("2026-01-01 10:00".into()), Some(String::new())]);
        assert_eq!(
            data,
            json!([
                {"study_id": "7", "optout_at": "2026-01-01 10:00"},
                {"study_id": "9", "redcap_event_name": "ev_1", "optout_at": ""}
            ])
        );
    }

    #[test]
    fn export_rows_need_the_record_id_and_the_phone() {
        let ok = json!([{"study_id": "1", "redcap_event_name": "e1", "phone": "415"}, {"study_id": 2, "phone": ""}]);
        let rows = parse_export(&ok, "study_id", "phone").unwrap();
        assert_eq!(rows[0].event.as_deref(), Some("e1"));
        assert_eq!(rows[1].record, "2");
        assert!(parse_export(&json!([{"phone": "1"}]), "study_id", "phone").is_err());
        let e = parse_export(&json!([{"study_id": "1"}]), "study_id", "phone").unwrap_err();
        assert!(e.contains("de-identified"), "{e}");
        assert!(parse_export(&json!({"a": 1}), "study_id", "phone").is_err());
    }

    #[test]
    fn answers_are_classified() {
        let op = Op::Export;
        assert_eq!(classify(op, 200, None, None, "[]").unwrap(), json!([]));
        assert!(matches!(classify(op, 200, None, None, r#"{"error":"x"}"#), Err(SinkError::Misconfigured(_))));
        assert!(matches!(classify(op, 200, None, None, "<html>"), Err(SinkError::Transient { .. })));
        assert!(matches!(classify(op, 500, None, None, "oops"), Err(SinkError::Transient { .. })));
        assert!(matches!(classify(op, 503, None, None, ""), Err(SinkError::Transient { .. })));
        match classify(op, 429, Some(Duration::from_secs(60)), None, "Too many") {
            Err(SinkError::Transient { retry_after, .. }) => assert_eq!(retry_after, Some(Duration::from_secs(60))),
            other => panic!("{other:?}"),
        }
        match classify(op, 403, None, None, r#"{"error":"You do not have permissions to use the API"}"#) {
            Err(SinkError::Misconfigured(m)) => {
                assert!(m.starts_with("REDCap refused the API token (403): You do not have permissions"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        match classify(
            op,
            400,
            None,
            None,
            r#"{"error":"The following values in the parameter \"fields\" are not valid: 'x'"}"#,
        ) {
            Err(SinkError::Misconfigured(m)) => assert!(m.contains("'x'"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(classify(op, 302, None, Some("https://x/"), ""), Err(SinkError::Misconfigured(_))));
        assert!(matches!(classify(op, 404, None, None, "nope"), Err(SinkError::Misconfigured(_))));
    }

    #[test]
    fn messages_never_carry_the_token() {
        let token = "ABCDEF0123456789ABCDEF0123456789";
        let e = scrub(SinkError::Misconfigured(format!("echo {token}")), token);
        assert!(!e.to_string().contains(token));
        let e = scrub(SinkError::Transient { message: token.into(), retry_after: None }, token);
        assert!(!e.to_string().contains(token));
    }

    #[test]
    fn long_bodies_are_cut() {
        let s = snippet(&"x ".repeat(2000));
        assert!(s.chars().count() <= MAX_MESSAGE_CHARS + 1);
        assert_eq!(snippet("  a\n  b "), "a b");
    }

    #[tokio::test]
    async fn limiter_spaces_calls_and_clones_share_it() {
        let limiter = Limiter::per_minute(600);
        let start = Instant::now();
        for _ in 0..3 {
            limiter.wait().await;
        }
        let three = start.elapsed();
        assert!(three >= Duration::from_millis(200) && three < Duration::from_millis(290), "{three:?}");
        limiter.clone().wait().await;
        assert!(start.elapsed() >= Duration::from_millis(300));
    }
}
