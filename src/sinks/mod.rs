//! Systems of record that learn about opt-outs. Each sink takes a batch of
//! due deliveries and applies them all, or fails the batch with an error the
//! relay classifies for its retry schedule.

pub mod redcap;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::domain::{EventKind, Phone};

/// One delivery as a sink sees it. A batch holds at most one item per phone.
#[derive(Debug, Clone)]
pub struct DeliveryItem {
    pub id: i64,
    pub phone: Phone,
    /// `OptOut` or `OptIn` (help events are never relayed).
    pub kind: EventKind,
    /// When the person's message arrived: the time stamped downstream.
    pub received_at: DateTime<Utc>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    /// Timeouts, connection errors, 5xx, 429: retry with backoff.
    #[error("{message}")]
    Transient { message: String, retry_after: Option<Duration> },
    /// The sink refuses what we send (bad token, unknown field): retry slowly,
    /// log loudly — an operator has to fix something.
    #[error("{0}")]
    Misconfigured(String),
}

/// The configured sinks.
pub enum Sink {
    Redcap(redcap::RedcapSink),
}

impl Sink {
    pub fn name(&self) -> &'static str {
        match self {
            Sink::Redcap(_) => redcap::SINK_NAME,
        }
    }

    /// Applies every item; on success returns one result per item, in order
    /// (what was changed, e.g. `{"records": ["12", "40"]}`), recorded on the delivery.
    pub async fn apply(&self, items: &[DeliveryItem]) -> Result<Vec<Value>, SinkError> {
        match self {
            Sink::Redcap(s) => s.apply(items).await,
        }
    }
}
