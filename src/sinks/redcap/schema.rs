//! What a batch needs from the project's metadata: the record-id field, the
//! opt-out field's instrument and the timestamp style its validation takes.
//! The sink caches it (see `METADATA_TTL` in the sink) so a batch usually
//! costs no metadata call.

use tokio::time::Instant;

use super::api::Metadata;
use super::timestamp::{timestamp_style, TimestampStyle};
use crate::config::TimestampFormat;

/// What a batch needs from the metadata.
#[derive(Debug)]
pub(super) struct Schema {
    pub(super) record_id: String,
    pub(super) style: TimestampStyle,
    pub(super) optout_form: String,
    pub(super) fetched_at: Instant,
}

impl Schema {
    /// Refuses a configuration the project cannot satisfy: either field
    /// missing, the opt-out field being the record id (writing it would make
    /// new records), or a field that cannot hold a date and time.
    pub(super) fn from_metadata(
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
