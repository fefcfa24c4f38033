//! Exporting the suppression list: every phone currently opted out, with
//! its scope, since when, and the source of the event that decided it.
//!
//! "Currently opted out" is what the relay would hold a sink to
//! (`relay::target::effective`): a scope's own state unless a newer
//! organisation-wide event decides it, and the organisation-wide state alone
//! for a phone with no scope of its own. With a scope filter, the states of
//! that scope and organisation-wide count; without, every scope does.
//!
//! Streamed: the store sends rows as the database returns them (by phone,
//! so one phone's rows are together), they are turned into output here a
//! phone at a time, and handed on in chunks of about 64 KB over a small
//! channel: memory does not grow with the list. JSON is one array written
//! incrementally (`[`, rows, `]`), so any JSON reader takes it whole; a
//! failure part-way ends the stream with an error rather than a complete-
//! looking document.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::relay::target::effective;
use crate::store::{SourcedState, StateRow, Store, StoreError};

/// Bytes gathered before a chunk is handed on.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Csv,
    Json,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Csv => "text/csv; charset=utf-8",
            Format::Json => "application/json",
        }
    }
}

/// One row of the export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ListedOptOut {
    /// E.164.
    pub phone: String,
    /// The scope it holds in (`organisation`: every scope).
    pub scope: String,
    /// When the opt-out began.
    pub since: DateTime<Utc>,
    /// Where the deciding event came from (`twilio`, `staff:…`, `import:…`).
    pub source: String,
}

/// The opted-out rows of one phone's states (all of them, or those of
/// `scope` and organisation-wide).
pub fn opted_out_of(rows: &[SourcedState], scope: Option<&str>) -> Vec<ListedOptOut> {
    let states: Vec<StateRow> = rows.iter().map(|r| r.state.clone()).collect();
    let follows = scope.map(|s| vec![s.to_owned()]);
    let source_of = |scope: &str| rows.iter().find(|r| r.state.scope == scope).map(|r| r.source.clone());
    effective(&states, follows.as_deref())
        .into_iter()
        .filter(|e| e.opted_out)
        .map(|e| {
            let decided_by = if e.by_organisation { crate::domain::ORGANISATION_SCOPE } else { e.scope.as_str() };
            ListedOptOut {
                phone: rows.first().map(|r| r.state.phone.clone()).unwrap_or_default(),
                source: source_of(decided_by).unwrap_or_default(),
                scope: e.scope,
                since: e.since,
            }
        })
        .collect()
}

/// Writes rows in one format, with its opening and closing.
struct Writer {
    format: Format,
    buf: Vec<u8>,
    rows: u64,
}

impl Writer {
    fn new(format: Format) -> Writer {
        let mut buf = Vec::with_capacity(CHUNK + 1024);
        buf.extend_from_slice(match format {
            Format::Csv => b"phone,scope,since,source\n",
            Format::Json => b"[",
        });
        Writer { format, buf, rows: 0 }
    }

    fn row(&mut self, r: &ListedOptOut) {
        let since = r.since.to_rfc3339_opts(SecondsFormat::Millis, true);
        match self.format {
            Format::Csv => {
                let mut w = csv::WriterBuilder::new().has_headers(false).from_writer(&mut self.buf);
                // Writing to a Vec cannot fail.
                let _ = w.write_record([r.phone.as_str(), r.scope.as_str(), since.as_str(), r.source.as_str()]);
                let _ = w.flush();
            }
            Format::Json => {
                if self.rows > 0 {
                    self.buf.push(b',');
                }
                self.buf.push(b'\n');
                let _ = serde_json::to_writer(&mut self.buf, r);
            }
        }
        self.rows += 1;
    }

    fn finish(&mut self) {
        if self.format == Format::Json {
            self.buf.extend_from_slice(if self.rows > 0 { b"\n]\n" } else { b"]\n" });
        }
    }

    fn take(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK + 1024))
    }
}

/// Starts the export; its output arrives on the receiver in chunks, an
/// `Err` (then nothing) if the store fails part-way. Dropping the receiver
/// stops it.
pub fn export(store: Store, scope: Option<String>, format: Format) -> mpsc::Receiver<Result<Vec<u8>, StoreError>> {
    let (out, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let (rows_tx, rows_rx) = mpsc::channel(1024);
        let produce = async {
            store.send_states_for_export(scope.as_deref(), &rows_tx).await;
            drop(rows_tx);
        };
        tokio::join!(produce, write_all(rows_rx, scope.as_deref(), format, &out));
    });
    rx
}

async fn write_all(
    mut rows: mpsc::Receiver<Result<SourcedState, StoreError>>,
    scope: Option<&str>,
    format: Format,
    out: &mpsc::Sender<Result<Vec<u8>, StoreError>>,
) {
    let mut w = Writer::new(format);
    let mut phone: Vec<SourcedState> = Vec::new();
    while let Some(row) = rows.recv().await {
        let row = match row {
            Ok(r) => r,
            Err(e) => {
                let _ = out.send(Err(e)).await;
                return;
            }
        };
        if phone.first().is_some_and(|p| p.state.phone != row.state.phone) {
            for r in opted_out_of(&phone, scope) {
                w.row(&r);
            }
            phone.clear();
            if w.buf.len() >= CHUNK && out.send(Ok(w.take())).await.is_err() {
                return; // the client went away: dropping `rows` stops the query
            }
        }
        phone.push(row);
    }
    for r in opted_out_of(&phone, scope) {
        w.row(&r);
    }
    w.finish();
    let _ = out.send(Ok(w.take())).await;
}

/// Why an export written to a file or terminal stopped.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the export: {0}")]
    Io(#[from] std::io::Error),
}

/// The export written to `out` (`optout-relay export`), flushed at the end.
pub async fn write_to(
    store: Store,
    scope: Option<String>,
    format: Format,
    out: &mut impl std::io::Write,
) -> Result<(), ExportError> {
    let mut rx = export(store, scope, format);
    while let Some(chunk) = rx.recv().await {
        out.write_all(&chunk?)?;
    }
    out.flush()?;
    Ok(())
}
