//! REDCap: brings the opt-out field of every record whose phone field holds
//! a person's number to what the opt-out list says now: the opt-out time
//! when opted out, blank when opted in. This file is the sink the relay
//! calls; its parts are the API client (`api`), the call limiter
//! (`limiter`), the project's metadata (`schema`), the record calls
//! (`records`), row matching (`matching`), compare-and-write (`compare`),
//! timestamp formats (`timestamp`) and `check-config` (`check`).
//!
//! **Converge, compare and write.** A batch ([`RedcapSink::converge`]) costs
//! at most three calls: the metadata (cached for an hour, so a project
//! changed under us heals itself), one export of (record id, phone, opt-out
//! field) for every record, then one import of only the slots whose field
//! does not already hold its target (none if all do). Matching on our side
//! rather than with `filterLogic` catches every way a number can be typed and
//! never puts webhook text into REDCap logic; a blank, short or invalid phone
//! never matches (the bug of the module this replaces). Writing only what
//! differs makes a convergence harmless to repeat, which is what the relay
//! does after any doubt: the same call is the re-check.
//!
//! **Leases.** The relay passes the end of its lease. A call that could not
//! finish before it is not started (checked after the limiter wait, right
//! before sending): a write sent by a worker whose lease has run out could
//! land after a newer worker's write and undo it. [`RedcapSink::worst_case_batch`]
//! is the lease a batch needs, which the relay checks at start.
//!
//! **Uncertainty.** An import that times out, loses its connection, gets a
//! 5xx or reports fewer records than sent is [`SinkError::Uncertain`]:
//! REDCap (PHP) may run it anyway, even after the client has given up, so
//! the relay reads again soon and again once a late request could have
//! finished. A failed read is only transient: nothing was written.
//!
//! **Resync** ([`RedcapSink::resync`]) repairs drift: records enrolled after
//! the STOP, a number typed in later, writes lost or undone. It stamps every
//! record of an opted-out phone whose field is blank or differs, and never
//! clears a field, so a stamp staff typed for a number not on the list stays.
//!
//! Every call, retries and `check-config` included, waits its turn at one
//! spacing limiter: past its per-IP limit REDCap bans the IP for good.

mod api;
mod check;
mod compare;
pub(crate) mod limiter;
mod matching;
mod records;
mod schema;
mod timestamp;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use phonenumber::country;
use serde::Serialize;
use serde_json::Value;
use tokio::time::Instant;

pub use check::CheckLine;

/// REDCap's answers as the sink reads them, for the property tests and the
/// property bench (`tests/properties.rs`, `examples/properties.rs`): each
/// takes whatever a server sends and must answer, never panic.
pub mod answers {
    use serde_json::Value;

    use super::{api, matching, timestamp};
    use crate::sinks::SinkError;

    /// An HTTP answer to a record import (`writes`) or export: its JSON, or the error it means.
    pub fn classify(status: u16, body: &str, writes: bool) -> Result<Value, SinkError> {
        let op = if writes { api::Op::Import } else { api::Op::Export };
        api::classify(op, status, None, None, body)
    }

    /// The metadata export: how many fields it names.
    pub fn metadata_fields(v: &Value) -> Result<usize, String> {
        api::Metadata::parse(v).map(|m| m.fields.len())
    }

    /// The record export: its rows' (record id, phone, opt-out value).
    pub fn export_rows(
        v: &Value,
        record_id: &str,
        phone_field: &str,
        optout_field: Option<&str>,
    ) -> Result<Vec<(String, String, String)>, String> {
        let rows = matching::parse_export(v, record_id, phone_field, optout_field)?;
        Ok(rows.into_iter().map(|r| (r.record, r.phone, r.optout)).collect())
    }

    /// An import's `{"count": N}` against the records sent.
    pub fn confirm_import(answer: &Value, sent: usize) -> Result<(), SinkError> {
        api::confirm_import(answer, sent)
    }

    /// Whether a stamp read back from REDCap is the one written.
    pub fn same_moment(current: &str, wanted: &str) -> bool {
        timestamp::same_moment(current, wanted)
    }
}

use self::api::{Api, Metadata, Op};
use self::compare::{beats, differing, distinct_records, outcomes, Want};
use self::schema::Schema;
use self::timestamp::format_timestamp;
use super::{Convergence, SinkError, Target};
use crate::config::{RedcapConfig, TimestampFormat};
use crate::domain::Phone;

/// The sink's name in the delivery queue.
pub const SINK_NAME: &str = "redcap";

/// How long the metadata is trusted before it is read again.
const METADATA_TTL: Duration = Duration::from_secs(3600);

/// The most calls one convergence makes: metadata, export, import.
const CONVERGE_CALLS: u32 = 3;

/// Rows per import in a resync, which may stamp a whole project at once:
/// small enough that one import finishes well inside the request timeout.
const RESYNC_IMPORT_ROWS: usize = 1000;

/// What a resync did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ResyncReport {
    /// Opted-out phones looked for.
    pub phones: usize,
    /// Distinct records holding one of them.
    pub records_matched: usize,
    /// Distinct records whose field was blank or differed, and was stamped.
    pub records_stamped: usize,
}

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
    /// The same sink under the name it has in the configuration (metrics,
    /// logs); `redcap` until named.
    pub fn named(mut self, name: &str) -> RedcapSink {
        self.api = self.api.named(name);
        self
    }

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
        // The import writes the opt-out field: were it the phone field, it would overwrite the number.
        if cfg.phone_field.trim() == cfg.optout_field.trim() {
            return Err("redcap.phone_field and redcap.optout_field must be different fields".to_owned());
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

    /// How long one REDCap call may take, its answer read included.
    pub fn request_timeout(&self) -> Duration {
        self.api.timeout()
    }

    /// The longest a [`RedcapSink::converge`] call can take when this sink is
    /// its only caller: each of its calls (metadata, export, import) waits
    /// its limiter slot, then up to the request timeout. A lease shorter than
    /// this could run out between the checks and the end of the import.
    pub fn worst_case_batch(&self) -> Duration {
        (self.api.timeout() + self.api.spacing()) * CONVERGE_CALLS
    }

    /// Brings every item's records to its target; returns one JSON value per
    /// item, in order (`records` matched, `written`, `unchanged`, `value`,
    /// and `events` in a longitudinal project). Writes only the slots that
    /// differ: none when all hold their target already. No call is started
    /// with less than the request timeout left before `deadline` (the end of
    /// the caller's lease): that is a transient error, nothing written.
    pub async fn converge(&self, items: &[Convergence], deadline: Option<Instant>) -> Result<Vec<Value>, SinkError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let result = self.converge_with(items, deadline).await;
        self.forget_schema_after(&result).await;
        result
    }

    async fn converge_with(&self, items: &[Convergence], deadline: Option<Instant>) -> Result<Vec<Value>, SinkError> {
        let schema = self.schema(deadline).await?;
        let phones: Vec<String> = items.iter().map(|c| c.phone.as_str().to_owned()).collect();
        let snapshot = self.read(&schema, phones.clone(), deadline).await?;
        let wants: Vec<Want> = items.iter().map(|c| self.want(&schema, c.target)).collect();
        let targets: Vec<Target> = items.iter().map(|c| c.target).collect();
        let plan = self.plan(&schema, &snapshot, &phones, beats(&targets))?;
        let written = differing(&plan, &wants, &snapshot.current);
        // Overwrite: an opt-in's "" must clear the field (a normal import ignores blanks).
        self.import(&schema, &written, &wants, true, usize::MAX, deadline).await?;
        tracing::info!(
            sink = %self.api.sink(),
            items = items.len(),
            rows_exported = snapshot.rows.len(),
            rows_decided = plan.writes.len(),
            rows_written = written.len(),
            "REDCap batch converged"
        );
        Ok(outcomes(&plan, &wants, &written, snapshot.longitudinal()))
    }

    /// Stamps every record of an opted-out phone (with the time its opt-out
    /// began) whose opt-out field is blank or holds something else. Never
    /// clears a field: only stamps are sent, with a normal import that
    /// ignores blanks anyway. A record holding two listed numbers gets the
    /// earlier time. One export, then imports of up to 1,000 rows.
    pub async fn resync(&self, opted_out: &[(Phone, DateTime<Utc>)]) -> Result<ResyncReport, SinkError> {
        if opted_out.is_empty() {
            return Ok(ResyncReport::default());
        }
        let result = self.resync_with(opted_out).await;
        self.forget_schema_after(&result).await;
        result
    }

    async fn resync_with(&self, opted_out: &[(Phone, DateTime<Utc>)]) -> Result<ResyncReport, SinkError> {
        let schema = self.schema(None).await?;
        let phones: Vec<String> = opted_out.iter().map(|(p, _)| p.as_str().to_owned()).collect();
        let snapshot = self.read(&schema, phones.clone(), None).await?;
        let targets: Vec<Target> = opted_out.iter().map(|(_, since)| Target::OptedOut { since: *since }).collect();
        let wants: Vec<Want> = targets.iter().map(|t| self.want(&schema, *t)).collect();
        let plan = self.plan(&schema, &snapshot, &phones, beats(&targets))?;
        let written = differing(&plan, &wants, &snapshot.current);
        self.import(&schema, &written, &wants, false, RESYNC_IMPORT_ROWS, None).await?;
        let records_matched = plan.matched.iter().flatten().collect::<HashSet<_>>().len();
        let report =
            ResyncReport { phones: opted_out.len(), records_matched, records_stamped: distinct_records(&written) };
        tracing::info!(
            sink = %self.api.sink(),
            phones = report.phones,
            records_matched = report.records_matched,
            records_stamped = report.records_stamped,
            "REDCap resync done"
        );
        Ok(report)
    }

    /// What the field should say for a target.
    fn want(&self, schema: &Schema, target: Target) -> Want {
        match target {
            Target::OptedOut { since } => Want::Stamp(format_timestamp(since, self.zone, schema.style)),
            Target::OptedIn => Want::Clear,
        }
    }

    /// The project may have changed under us (field renamed, validation
    /// changed): after a misconfiguration, read the metadata again next time.
    async fn forget_schema_after<T>(&self, result: &Result<T, SinkError>) {
        if let Err(SinkError::Misconfigured(_)) = result {
            *self.schema.lock().await = None;
        }
    }

    /// The cached schema, read again when missing or older than the TTL.
    /// Only a usable schema is cached, so a fixed project is seen at once.
    /// One metadata read, whatever the cache holds: how a failing sink with
    /// nothing to write finds out it works again (token, URL, project).
    pub async fn probe(&self) -> Result<(), SinkError> {
        *self.schema.lock().await = None;
        self.schema(None).await.map(|_| ())
    }

    async fn schema(&self, deadline: Option<Instant>) -> Result<Arc<Schema>, SinkError> {
        let mut slot = self.schema.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| s.fetched_at.elapsed() < METADATA_TTL) {
            return Ok(s.clone());
        }
        let raw = self.api.call_within(Op::Metadata, &[("content", "metadata")], deadline).await?;
        let meta = Metadata::parse(&raw).map_err(SinkError::Misconfigured)?;
        let schema = Arc::new(
            Schema::from_metadata(&meta, &self.phone_field, &self.optout_field, self.format)
                .map_err(SinkError::Misconfigured)?,
        );
        *slot = Some(schema.clone());
        Ok(schema)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn config(request_timeout: Duration, max_calls_per_minute: u32) -> RedcapConfig {
        RedcapConfig {
            request_timeout,
            max_calls_per_minute,
            ..RedcapConfig::new(
                "https://redcap.example.org/api/",
                SecretString::from("0123456789ABCDEF0123456789ABCDEF"),
                "mobile",
                "optout_at",
            )
        }
    }

    fn sink(request_timeout: Duration, max_calls_per_minute: u32) -> RedcapSink {
        RedcapSink::new(&config(request_timeout, max_calls_per_minute), country::Id::US).unwrap()
    }

    #[test]
    fn the_opt_out_field_cannot_be_the_phone_field() {
        let mut cfg = config(Duration::from_secs(5), 60);
        cfg.optout_field = " mobile ".into();
        let e = RedcapSink::new(&cfg, country::Id::US).err().unwrap();
        assert!(e.contains("must be different"), "{e}");
    }

    #[test]
    fn the_worst_case_is_three_calls_each_with_its_limiter_wait() {
        let s = sink(Duration::from_secs(5), 60);
        assert_eq!(s.request_timeout(), Duration::from_secs(5));
        assert_eq!(s.worst_case_batch(), Duration::from_secs(3 * (5 + 1)));
        assert_eq!(sink(Duration::from_secs(30), 600).worst_case_batch(), Duration::from_millis(3 * 30_100));
    }
}
