//! REDCap: stamps or clears the opt-out field on every record whose phone
//! field holds the person's number. This file is the sink the relay calls;
//! its parts are the API client (`api`), the call limiter (`limiter`), row
//! matching (`matching`), timestamp formats (`timestamp`) and
//! `check-config` (`check`).
//!
//! A batch costs at most two API calls: one export of (record id, phone) for
//! every record, matched here, then one import of the opt-out field for the
//! matches (skipped when nothing matched). Matching on our side rather than
//! with `filterLogic` catches every way a number can be typed and never puts
//! webhook text into REDCap logic; a blank, short or invalid phone value
//! never matches, which is the bug of the module this replaces (see
//! `matching`).
//!
//! The record-id field (the first field of the metadata) and the opt-out
//! field's validation come from the project's metadata, fetched once and
//! cached for an hour (an hour so a project changed under us heals itself).
//!
//! Every call, retries and `check-config` included, waits its turn at one
//! spacing limiter: past its per-IP limit REDCap bans the IP for good.
//!
//! An import whose record count falls short of the records sent fails the
//! batch as transient: the deliveries stay pending with that message and are
//! sent again, which is safe because re-importing the same values changes
//! nothing.

mod api;
mod check;
mod limiter;
mod matching;
mod timestamp;

use std::sync::Arc;
use std::time::Duration;

use chrono_tz::Tz;
use phonenumber::country;
use serde_json::Value;
use tokio::time::Instant;

pub use check::CheckLine;

use self::api::{Api, Metadata, Op};
use self::matching::{import_rows, normalise, parse_export, plan_writes};
use self::timestamp::{format_timestamp, timestamp_style, TimestampStyle};
use super::{DeliveryItem, SinkError};
use crate::config::{RedcapConfig, TimestampFormat};
use crate::domain::EventKind;

/// The sink's name in the delivery queue.
pub const SINK_NAME: &str = "redcap";

/// How long the metadata is trusted before it is read again.
const METADATA_TTL: Duration = Duration::from_secs(3600);

/// The REDCap client. Cheap to clone; clones share the rate limiter and caches.
#[derive(Clone)]
pub struct RedcapSink {
    api: Api,
    phone_field: String,
    phone_event: Option<String>,
    optout_field: String,
    optout_event: Option<String>,
    zone: Tz,
    format: TimestampFormat,
    region: country::Id,
    schema: Arc<tokio::sync::Mutex<Option<Arc<Schema>>>>,
}

impl RedcapSink {
    /// Builds the HTTP client; refuses settings it cannot work with (URL,
    /// zone, call budget, empty field names). Makes no call.
    pub fn new(cfg: &RedcapConfig, default_region: country::Id) -> Result<RedcapSink, String> {
        let url = api::endpoint(&cfg.url)?;
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
        let api = Api::new(url, cfg.token.clone(), cfg.request_timeout, cfg.max_calls_per_minute)?;
        let non_empty = |v: &Option<String>| v.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned);
        Ok(RedcapSink {
            api,
            phone_field: cfg.phone_field.trim().to_owned(),
            phone_event: non_empty(&cfg.phone_event),
            optout_field: cfg.optout_field.trim().to_owned(),
            optout_event: non_empty(&cfg.optout_event),
            zone,
            format: cfg.timestamp_format,
            region: default_region,
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
            let answer = self.api.call(Op::Import, &params).await?;
            api::confirm_import(&answer, plan.records())?;
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

    /// The cached schema, read again when missing or older than the TTL.
    /// Only a usable schema is cached, so a fixed project is seen at once.
    async fn schema(&self) -> Result<Arc<Schema>, SinkError> {
        let mut slot = self.schema.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| s.fetched_at.elapsed() < METADATA_TTL) {
            return Ok(s.clone());
        }
        let raw = self.api.call(Op::Metadata, &[("content", "metadata")]).await?;
        let meta = Metadata::parse(&raw).map_err(SinkError::Misconfigured)?;
        let schema = Arc::new(
            Schema::from_metadata(&meta, &self.phone_field, &self.optout_field, self.format)
                .map_err(SinkError::Misconfigured)?,
        );
        *slot = Some(schema.clone());
        Ok(schema)
    }

    /// Exports (record id, phone) of every row, only in `phone_event` when it is set.
    async fn export_phones(&self, record_id: &str) -> Result<Value, SinkError> {
        let mut params = vec![("content", "record"), ("type", "flat"), ("fields[0]", record_id)];
        if self.phone_field != record_id {
            params.push(("fields[1]", self.phone_field.as_str()));
        }
        if let Some(ev) = &self.phone_event {
            params.push(("events[0]", ev.as_str()));
        }
        self.api.call(Op::Export, &params).await
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
