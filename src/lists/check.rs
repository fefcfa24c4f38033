//! Checking a campaign's numbers before it goes out: for each number as
//! given, its E.164 form and whether it is opted out (and since when), in
//! the order given. One store query for the whole batch; the answer per
//! number is the relay's own (`relay::target::effective`): with a scope,
//! that scope's state (a newer organisation-wide event deciding it);
//! without, opted out if any scope is.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use phonenumber::country;
use serde::Serialize;

use crate::domain::Phone;
use crate::relay::target::{by_phone, effective};
use crate::store::{Store, StoreError};

/// Most numbers one call may check.
pub const MAX_PHONES: usize = 10_000;

/// One number's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Checked {
    /// The number as given.
    pub phone: String,
    /// E.164, or `null` when it is not a phone number.
    pub e164: Option<String>,
    pub opted_out: bool,
    /// When the opt-out began (only when opted out).
    pub since: Option<DateTime<Utc>>,
    /// Why a number could not be checked (only then).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

pub async fn check(
    store: &Store,
    phones: &[String],
    scope: Option<&str>,
    region: country::Id,
) -> Result<Vec<Checked>, StoreError> {
    let parsed: Vec<Option<Phone>> = phones.iter().map(|p| Phone::parse(p, region).ok()).collect();
    let mut unique: Vec<Phone> = parsed.iter().flatten().cloned().collect();
    unique.sort();
    unique.dedup();
    let states = by_phone(store.states_of_many(&unique).await?);
    let follows = scope.map(|s| vec![s.to_owned()]);
    let mut decided: HashMap<&str, Option<DateTime<Utc>>> = HashMap::new();
    for (phone, rows) in &states {
        let since = effective(rows, follows.as_deref()).iter().filter(|e| e.opted_out).map(|e| e.since).min();
        decided.insert(phone.as_str(), since);
    }
    Ok(phones
        .iter()
        .zip(parsed)
        .map(|(given, phone)| match phone {
            None => Checked {
                phone: given.clone(),
                e164: None,
                opted_out: false,
                since: None,
                reason: Some("not a phone number".to_owned()),
            },
            Some(p) => {
                let since = decided.get(p.as_str()).copied().flatten();
                Checked {
                    phone: given.clone(),
                    e164: Some(p.as_str().to_owned()),
                    opted_out: since.is_some(),
                    since,
                    reason: None,
                }
            }
        })
        .collect())
}
