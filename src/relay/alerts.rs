//! Mail when a sink has been failing longer than the email sink's
//! `alert_after`, and when it works again: an outage is heard of in minutes,
//! not when something is dead-lettered days later. One replica sends each
//! alert (the store's `alerted_at` is taken by compare-and-set).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::Relay;
use crate::sinks::{Alert, SinkKind};
use crate::store::StoreError;

const LOOK_EVERY: Duration = Duration::from_secs(15);

pub async fn watch(relay: Arc<Relay>, shutdown: CancellationToken) {
    loop {
        if let Err(e) = look(&relay).await {
            tracing::warn!(error = %e, "cannot read sink health for alerts");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(LOOK_EVERY) => {},
        }
    }
}

async fn look(relay: &Relay) -> Result<(), StoreError> {
    let Some((email_name, email, alert_after)) = relay.sinks.iter().find_map(|s| match &s.kind {
        SinkKind::Email { sink, alert_after, .. } => Some((s.name.as_str(), sink, *alert_after)),
        _ => None,
    }) else {
        return Ok(());
    };
    let now = Utc::now();
    let after = chrono::Duration::from_std(alert_after).unwrap_or(chrono::Duration::minutes(15));
    let stats = relay.store.queue_stats().await?;
    for row in relay.store.sinks().await? {
        if relay.sink(&row.name).is_none() {
            continue;
        }
        let waiting = stats.iter().find(|s| s.sink == row.name).map_or(0, |s| s.pending) as u64;
        let alert = match (row.failing_since, row.alerted_at) {
            (Some(since), None) if now - since >= after => Alert {
                sink: row.name.clone(),
                failing_since: since,
                error: row.last_error.clone().unwrap_or_default(),
                waiting,
                recovered: false,
            },
            (None, Some(alerted)) => Alert {
                sink: row.name.clone(),
                failing_since: alerted - after,
                error: String::new(),
                waiting,
                recovered: true,
            },
            _ => continue,
        };
        if row.name == email_name {
            // The mail would go through the failing sink itself.
            if !alert.recovered {
                tracing::error!(sink = %row.name, since = %alert.failing_since, "the email sink has been failing too long");
            }
            relay.store.mark_alerted(&row.name, row.alerted_at, (!alert.recovered).then_some(now)).await?;
            continue;
        }
        let (expected, to) = if alert.recovered { (row.alerted_at, None) } else { (None, Some(now)) };
        if !relay.store.mark_alerted(&row.name, expected, to).await? {
            continue; // another replica sends it
        }
        if let Err(e) = email.alert(&alert).await {
            tracing::warn!(sink = %row.name, error = %e, "cannot send the alert mail; will try again");
            relay.store.mark_alerted(&row.name, to, expected).await?;
        } else {
            tracing::info!(sink = %row.name, recovered = alert.recovered, "alert mail sent");
        }
    }
    Ok(())
}
