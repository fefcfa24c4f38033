//! Importing a list: each usable row becomes an event recorded (and relayed)
//! like a webhook's, through the same `record_events` path, a batch of rows
//! per transaction.
//!
//! Memory stays bounded whatever the file's size: the CSV is read on a
//! blocking thread and handed over a small channel a batch at a time, and
//! only the report (counts and the invalid rows) grows with the file.
//!
//! **Idempotent.** Each row's event gets a MessageSid derived from what it
//! says — phone, scope, kind and time (or "undated") — so the same row
//! imported again is the same event, and the unique MessageSid makes it a
//! duplicate ("unchanged"). The source is left out on purpose: the same
//! list uploaded through the API and then the CLI, or renamed, is still the
//! same facts. An undated row is "now" when first imported and a duplicate
//! after, so a re-upload cannot move it to a later time.
//!
//! **History-aware.** A row older than the newest event known for its scope
//! and phone is recorded as history and changes no state: `record_events`
//! only moves a state to a newer (said-at, id) — an old list never undoes a
//! later START.

use std::io::Read;

use chrono::{DateTime, Utc};
use phonenumber::country;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::read::{InvalidRow, ListError, ListReader, ListRow};
use crate::domain::{storable, EventKind, MessageSid, ORGANISATION_SCOPE};
use crate::store::{NewEvent, RecordOutcome, Store, StoreError};

/// Rows per transaction: large enough that a batch costs one round trip
/// for many rows, small enough that a batch's arrays stay a few hundred KB.
pub const BATCH: usize = 1000;

/// Invalid rows listed in a report; past this they are only counted, so a
/// file of garbage cannot make the report the size of the file.
pub const MAX_LISTED_INVALID: usize = 100_000;

/// Whether a list's rows (those without a kind column) are opt-outs or
/// opt-ins; a `help` is no list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum ImportKind {
    #[default]
    OptOut,
    OptIn,
}

impl From<ImportKind> for EventKind {
    fn from(k: ImportKind) -> EventKind {
        match k {
            ImportKind::OptOut => EventKind::OptOut,
            ImportKind::OptIn => EventKind::OptIn,
        }
    }
}

/// What an import does with rows that do not say for themselves.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Default scope; `None`: organisation-wide.
    pub scope: Option<String>,
    /// Who or what the list came from, kept as `import:<source>` on each event.
    pub source: String,
    /// Default kind.
    pub kind: EventKind,
    /// Read and check everything, record nothing.
    pub dry_run: bool,
    /// Numbers without a country code are read in this region.
    pub region: country::Id,
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ImportReport {
    /// Rows read (the header and blank lines not counted).
    pub rows_read: u64,
    /// New events recorded (on a dry run: would be recorded).
    pub recorded: u64,
    /// Rows already known (imported before, or repeated in the file): nothing recorded.
    pub unchanged: u64,
    /// How many rows could not be used.
    pub invalid_count: u64,
    /// Each invalid row with its line number, value and reason (the first 100,000).
    pub invalid: Vec<InvalidRow>,
    /// Nothing was recorded.
    pub dry_run: bool,
}

impl ImportReport {
    /// The report for a person at a terminal (`optout-relay import`).
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(out, "rows read: {}", self.rows_read);
        if self.dry_run {
            let _ = writeln!(out, "dry run: nothing recorded");
            let _ = writeln!(out, "would record: {}", self.recorded);
        } else {
            let _ = writeln!(out, "recorded:  {}", self.recorded);
        }
        let _ = writeln!(out, "unchanged: {} (already known)", self.unchanged);
        let _ = writeln!(out, "invalid:   {}", self.invalid_count);
        for row in &self.invalid {
            let _ = writeln!(out, "  line {}: {:?}: {}", row.line, row.value, row.reason);
        }
        if (self.invalid.len() as u64) < self.invalid_count {
            let _ = writeln!(out, "  … and {} more", self.invalid_count - self.invalid.len() as u64);
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    List(#[from] ListError),
    /// The store failed part-way; the batches before it are recorded, and
    /// importing the file again records only the rest.
    #[error("{error} (after {recorded} rows recorded; importing the file again records only the rest)")]
    Store { error: StoreError, recorded: u64 },
}

/// One batch from the reader thread.
struct Batch {
    rows: Vec<ListRow>,
    invalid: Vec<InvalidRow>,
    read: u64,
}

/// Reads `input` as a list and records it in batches. `recorded_batch` is
/// called after each batch that recorded something (the server wakes the
/// relay with it).
pub async fn import<R: Read + Send + 'static>(
    store: &Store,
    input: R,
    opts: &ImportOptions,
    recorded_batch: impl Fn(),
) -> Result<ImportReport, ImportError> {
    let (tx, mut rx) = mpsc::channel::<Result<Batch, ListError>>(2);
    let region = opts.region;
    let reader = tokio::task::spawn_blocking(move || read_batches(input, region, &tx));
    let mut report = ImportReport { dry_run: opts.dry_run, ..ImportReport::default() };
    while let Some(batch) = rx.recv().await {
        let batch = batch?;
        report.rows_read += batch.read;
        report.invalid_count += batch.invalid.len() as u64;
        let room = MAX_LISTED_INVALID.saturating_sub(report.invalid.len());
        report.invalid.extend(batch.invalid.into_iter().take(room));
        let events: Vec<NewEvent> = batch.rows.into_iter().map(|row| event_of(row, opts)).collect();
        let (recorded, unchanged) = record(store, &events, opts.dry_run)
            .await
            .map_err(|error| ImportError::Store { error, recorded: report.recorded })?;
        report.recorded += recorded;
        report.unchanged += unchanged;
        if recorded > 0 && !opts.dry_run {
            recorded_batch();
        }
    }
    // The reader's result only matters if it panicked (its errors came over the channel).
    reader.await.map_err(|e| ListError::Io(std::io::Error::other(format!("the reader failed: {e}"))))?;
    Ok(report)
}

/// Records a batch (or, on a dry run, asks which of it is known); returns
/// (recorded, unchanged).
async fn record(store: &Store, events: &[NewEvent], dry_run: bool) -> Result<(u64, u64), StoreError> {
    if events.is_empty() {
        return Ok((0, 0));
    }
    if dry_run {
        let sids: Vec<&str> = events.iter().map(|e| e.message_sid.as_str()).collect();
        let known = store.known_message_sids(&sids).await?;
        let mut seen = std::collections::HashSet::new();
        let new = sids.iter().filter(|s| !known.contains(**s) && seen.insert(**s)).count() as u64;
        return Ok((new, events.len() as u64 - new));
    }
    let outcomes = store.record_events(events).await?;
    let recorded = outcomes.iter().filter(|o| matches!(o, RecordOutcome::Recorded(_))).count() as u64;
    Ok((recorded, outcomes.len() as u64 - recorded))
}

/// On the blocking thread: the file in batches of [`BATCH`] rows, until its
/// end, an I/O error, or the importer stops listening.
fn read_batches<R: Read>(input: R, region: country::Id, tx: &mpsc::Sender<Result<Batch, ListError>>) {
    let mut reader = match ListReader::new(input, region) {
        Ok(r) => r,
        Err(e) => {
            let _ = tx.blocking_send(Err(e));
            return;
        }
    };
    let mut batch = Batch { rows: Vec::with_capacity(BATCH), invalid: Vec::new(), read: 0 };
    loop {
        let next = reader.next_row();
        let end = match next {
            Ok(Some(row)) => {
                batch.read += 1;
                match row {
                    Ok(row) => batch.rows.push(row),
                    Err(invalid) => batch.invalid.push(invalid),
                }
                false
            }
            Ok(None) => true,
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        if end || batch.read as usize >= BATCH {
            let full =
                std::mem::replace(&mut batch, Batch { rows: Vec::with_capacity(BATCH), invalid: Vec::new(), read: 0 });
            if tx.blocking_send(Ok(full)).is_err() || end {
                return;
            }
        }
    }
}

/// The event a row stands for.
pub fn event_of(row: ListRow, opts: &ImportOptions) -> NewEvent {
    let scope = row
        .scope
        .or_else(|| opts.scope.clone())
        .map(|s| storable(s.trim().to_owned()))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| ORGANISATION_SCOPE.to_owned());
    let kind = row.kind.unwrap_or(opts.kind);
    let source = format!("import:{}", storable(opts.source.trim().to_owned()));
    NewEvent {
        message_sid: import_sid(row.phone.as_str(), &scope, kind, row.at),
        account_sid: None,
        messaging_service_sid: None,
        scope,
        from_raw: row.raw,
        phone: row.phone,
        to: None,
        kind,
        body: row.note.unwrap_or_default(),
        params: json!({ "source": source, "line": row.line }),
        received_at: row.at.unwrap_or_else(Utc::now),
        source,
    }
}

/// `IM` + 32 hex digits of SHA-256 over what the row says: the same row is
/// always the same MessageSid (Twilio's are `SM`/`MM` + 32: never equal).
pub fn import_sid(phone: &str, scope: &str, kind: EventKind, at: Option<DateTime<Utc>>) -> MessageSid {
    let at = at.map_or_else(|| "undated".to_owned(), |t| t.timestamp_millis().to_string());
    let digest = Sha256::digest(format!("{phone}\n{scope}\n{}\n{at}", kind.as_str()).as_bytes());
    let sid = format!("IM{}", hex::encode(&digest[..16]));
    MessageSid::parse(&sid).unwrap_or_else(|| unreachable!("IM + hex is a valid sid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_row_is_always_the_same_sid_and_any_difference_is_another() {
        let t = Some(Utc::now());
        let a = import_sid("+14155550101", "organisation", EventKind::OptOut, t);
        assert_eq!(a, import_sid("+14155550101", "organisation", EventKind::OptOut, t));
        assert_eq!(a.as_str().len(), 34);
        assert!(a.as_str().starts_with("IM"));
        for other in [
            import_sid("+14155550102", "organisation", EventKind::OptOut, t),
            import_sid("+14155550101", "MG1", EventKind::OptOut, t),
            import_sid("+14155550101", "organisation", EventKind::OptIn, t),
            import_sid("+14155550101", "organisation", EventKind::OptOut, None),
        ] {
            assert_ne!(a, other);
        }
    }
}
