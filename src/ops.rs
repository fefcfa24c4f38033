//! Operator actions shared by the admin API and the command line, so both
//! answer the same question the same way.

use std::collections::HashMap;

use chrono::Utc;
use serde::Serialize;
use serde_json::json;

use crate::domain::{EventKind, MessageSid, Phone};
use crate::store::{DeliveryRow, EventRow, NewEvent, RecordOutcome, StateRow, Store, StoreError};

/// Scope of a revocation staff recorded without naming one: the whole
/// organisation, since the FCC rule lets a person revoke "by any reasonable means".
pub const ORGANISATION_SCOPE: &str = "organisation";

/// How many of a phone's events `phone_status` shows: the newest ones.
pub const PHONE_HISTORY_LIMIT: i64 = 500;

/// "Is this number opted out, since when, and did REDCap get it?"
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PhoneStatus {
    pub phone: String,
    /// True when any scope's newest event is an opt-out.
    pub opted_out: bool,
    pub states: Vec<StateRow>,
    /// The newest events (up to [`PHONE_HISTORY_LIMIT`]), newest first, each with its deliveries.
    pub events: Vec<EventWithDeliveries>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventWithDeliveries {
    #[serde(flatten)]
    pub event: EventRow,
    pub deliveries: Vec<DeliveryRow>,
}

pub async fn phone_status(store: &Store, phone: &Phone) -> Result<PhoneStatus, StoreError> {
    let states = store.states(phone).await?;
    let events = store.recent_events(phone, PHONE_HISTORY_LIMIT).await?;
    let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
    let mut by_event: HashMap<i64, Vec<DeliveryRow>> = HashMap::new();
    for d in store.deliveries_of_events(&ids).await? {
        by_event.entry(d.event_id).or_default().push(d);
    }
    let events = events
        .into_iter()
        .map(|event| {
            let deliveries = by_event.remove(&event.id).unwrap_or_default();
            EventWithDeliveries { event, deliveries }
        })
        .collect();
    Ok(PhoneStatus { phone: phone.as_str().to_owned(), opted_out: states.iter().any(|s| s.opted_out), states, events })
}

/// A revocation (or a renewed consent) received another way: by phone,
/// email, letter. It becomes an event like a webhook's and is relayed the same way.
pub fn staff_event(
    phone: Phone,
    kind: EventKind,
    scope: Option<String>,
    note: Option<String>,
    source: &str,
) -> NewEvent {
    let sid = format!("ST{:032x}", rand::random::<u128>());
    let source = format!("staff:{}", source.trim());
    NewEvent {
        message_sid: MessageSid::parse(&sid).unwrap_or_else(|| unreachable!("ST + hex is a valid sid")),
        account_sid: None,
        messaging_service_sid: None,
        scope: scope.filter(|s| !s.trim().is_empty()).unwrap_or_else(|| ORGANISATION_SCOPE.to_owned()),
        from_raw: phone.as_str().to_owned(),
        phone,
        to: None,
        kind,
        body: note.unwrap_or_default(),
        params: json!({ "source": source }),
        received_at: Utc::now(),
        source,
    }
}

/// Records a staff event directly (command line: no server needed).
pub async fn record(store: &Store, event: NewEvent, sinks: &[&str]) -> Result<i64, StoreError> {
    match store.record_events(std::slice::from_ref(&event), sinks).await?.first() {
        Some(RecordOutcome::Recorded(id)) => Ok(*id),
        _ => Err(StoreError::Query("event was not recorded".into())),
    }
}
