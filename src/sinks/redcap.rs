//! REDCap: stamps or clears the opt-out field on every matching record.

/// The sink's name in the delivery queue.
pub const SINK_NAME: &str = "redcap";
