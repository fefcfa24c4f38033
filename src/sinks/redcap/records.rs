//! The sink's record calls: one export read into a [`Snapshot`] (rows,
//! phones matched, what each slot holds), the slots each phone decides, and
//! the import of what differs, each call with the caller's deadline.

use std::collections::HashMap;

use serde_json::Value;
use tokio::time::Instant;

use super::api::{self, Op};
use super::compare::{current_values, distinct_records, Want};
use super::matching::{import_rows, normalise, parse_export, plan_writes, ExportRow, Plan, Slot, Write};
use super::schema::Schema;
use super::RedcapSink;
use crate::domain::Phone;
use crate::sinks::SinkError;

/// The project as one export saw it.
pub(super) struct Snapshot {
    pub(super) rows: Vec<ExportRow>,
    /// Per row: its phone in E.164 when it may be one of the batch's.
    pub(super) phones: Vec<Option<Phone>>,
    /// The opt-out field of every exported slot.
    pub(super) current: HashMap<Slot, String>,
}

impl Snapshot {
    pub(super) fn longitudinal(&self) -> bool {
        self.rows.iter().any(|r| r.event.is_some())
    }
}

impl RedcapSink {
    /// Exports the project and matches its phones against `wanted` (E.164).
    pub(super) async fn read(
        &self,
        schema: &Schema,
        wanted: Vec<String>,
        deadline: Option<Instant>,
    ) -> Result<Snapshot, SinkError> {
        let exported = self.export(&schema.record_id, true, deadline).await?;
        let rows = parse_export(&exported, &schema.record_id, &self.phone_field, Some(&self.optout_field))
            .map_err(SinkError::Misconfigured)?;
        drop(exported);
        // Parsing phone numbers is CPU work (milliseconds for a large project):
        // off the async workers, so webhooks on this runtime are not held up.
        let (region, phone_event) = (self.region, self.phone_event.clone());
        let (rows, phones) = tokio::task::spawn_blocking(move || {
            let borrowed: Vec<Option<&str>> = wanted.iter().map(|p| Some(p.as_str())).collect();
            let phones = normalise(&rows, &borrowed, region, phone_event.as_deref());
            (rows, phones)
        })
        .await
        .map_err(|e| SinkError::Transient {
            message: format!("phone matching did not finish: {e}"),
            retry_after: None,
        })?;
        let current = current_values(&rows);
        Ok(Snapshot { rows, phones, current })
    }

    /// The slots each phone decides.
    pub(super) fn plan(
        &self,
        schema: &Schema,
        snapshot: &Snapshot,
        phones: &[String],
        beats: impl Fn(usize, usize) -> bool,
    ) -> Result<Plan, SinkError> {
        let wanted: Vec<Option<&str>> = phones.iter().map(|p| Some(p.as_str())).collect();
        plan_writes(&wanted, &snapshot.rows, &snapshot.phones, self.optout_event.as_deref(), &schema.optout_form, beats)
            .map_err(SinkError::Misconfigured)
    }

    /// Imports the writes, `chunk` rows per call; nothing when there are none.
    /// Every call must report all its records written, or the write is uncertain.
    pub(super) async fn import(
        &self,
        schema: &Schema,
        writes: &[&Write],
        wants: &[Want],
        overwrite: bool,
        chunk: usize,
        deadline: Option<Instant>,
    ) -> Result<(), SinkError> {
        for part in writes.chunks(chunk.max(1)) {
            let rows = part.iter().map(|w| (&w.slot, wants[w.item].value()));
            let data = import_rows(rows, &schema.record_id, &self.optout_field).to_string();
            let params = [
                ("content", "record"),
                ("type", "flat"),
                ("overwriteBehavior", if overwrite { "overwrite" } else { "normal" }),
                ("returnContent", "count"),
                ("data", data.as_str()),
            ];
            let answer = self.api.call_within(Op::Import, &params, deadline).await?;
            api::confirm_import(&answer, distinct_records(part))?;
        }
        Ok(())
    }

    /// Exports the record id, the phone and (`with_optout`) the opt-out field
    /// of every row. With `phone_event` set, only that event is read, plus
    /// `optout_event` where the opt-out field is written.
    pub(super) async fn export(
        &self,
        record_id: &str,
        with_optout: bool,
        deadline: Option<Instant>,
    ) -> Result<Value, SinkError> {
        let mut fields = vec![record_id];
        if self.phone_field != record_id {
            fields.push(&self.phone_field);
        }
        if with_optout {
            fields.push(&self.optout_field);
        }
        let mut events: Vec<&str> = Vec::new();
        if let Some(pe) = &self.phone_event {
            events.push(pe);
            if with_optout {
                events.extend(self.optout_event.as_deref().filter(|oe| oe != pe));
            }
        }
        let keys: Vec<String> = (0..fields.len())
            .map(|i| format!("fields[{i}]"))
            .chain((0..events.len()).map(|i| format!("events[{i}]")))
            .collect();
        let mut params = vec![("content", "record"), ("type", "flat")];
        params.extend(keys.iter().map(String::as_str).zip(fields.iter().chain(&events).copied()));
        self.api.call_within(Op::Export, &params, deadline).await
    }
}
