//! REDCap: stamps or clears the opt-out field on every matching record.

use serde_json::Value;

use super::{DeliveryItem, SinkError};

/// The sink's name in the delivery queue.
pub const SINK_NAME: &str = "redcap";

/// PLACEHOLDER until the REDCap client lands.
pub struct RedcapSink;

impl RedcapSink {
    pub fn new(_cfg: &crate::config::RedcapConfig, _region: phonenumber::country::Id) -> Result<RedcapSink, String> {
        Ok(RedcapSink)
    }

    pub async fn apply(&self, _items: &[DeliveryItem]) -> Result<Vec<Value>, SinkError> {
        Err(SinkError::Misconfigured("REDCap sink not implemented yet".into()))
    }
}
