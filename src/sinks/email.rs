//! Notification email: one message per opt-out/opt-in change.

use serde_json::Value;

use super::{DeliveryItem, SinkError};
use crate::config::EmailConfig;
use crate::store::Store;

/// PLACEHOLDER until the email sink lands.
pub struct EmailSink;

impl EmailSink {
    pub fn new(_cfg: &EmailConfig, _store: Store) -> Result<EmailSink, String> {
        Ok(EmailSink)
    }

    pub async fn apply(&self, items: &[DeliveryItem]) -> Vec<Result<Value, SinkError>> {
        items.iter().map(|_| Err(SinkError::Misconfigured("email sink not implemented yet".into()))).collect()
    }
}
