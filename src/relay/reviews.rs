//! Mail about new review items (possible revocations in free text): staff
//! hear of them within seconds, not when someone thinks to look at
//! `GET /v1/reviews`. Each pass claims the items no mail reported yet
//! (stamped in the store, so one replica reports each) and hands every
//! email sink a digest of those in the scopes it follows; an item whose
//! mail could not be sent is given back and reported on a later pass.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Relay;
use crate::domain::Phone;
use crate::sinks::{ReviewItem, SinkKind};
use crate::store::{ReviewRow, StoreError};

const LOOK_EVERY: Duration = Duration::from_secs(5);
/// Items per mail at most; more wait for the next pass.
const PER_MAIL: i64 = 50;

pub async fn report(relay: Arc<Relay>, shutdown: CancellationToken) {
    loop {
        if let Err(e) = pass(&relay).await {
            tracing::warn!(error = %e, "cannot report review items yet");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(LOOK_EVERY) => {},
        }
    }
}

async fn pass(relay: &Relay) -> Result<(), StoreError> {
    let rows = relay.store.claim_review_notices(PER_MAIL).await?;
    if rows.is_empty() {
        return Ok(());
    }
    let mut failed = false;
    for sink in &relay.sinks {
        let SinkKind::Email { sink: email, .. } = &sink.kind else { continue };
        let follows = |r: &&ReviewRow| sink.scopes.as_ref().is_none_or(|s| s.contains(&r.scope));
        let items: Vec<ReviewItem> = rows.iter().filter(follows).map(item).collect();
        if let Err(e) = email.reviews(&items).await {
            tracing::warn!(sink = %sink.name, error = %e, "cannot send the review mail; will try again");
            failed = true;
        }
    }
    if failed {
        // All are given back: a sink that did send may repeat itself, which
        // beats a sink that never reports an item.
        relay.store.release_review_notices(&rows.iter().map(|r| r.id).collect::<Vec<_>>()).await?;
    }
    Ok(())
}

fn item(r: &ReviewRow) -> ReviewItem {
    ReviewItem {
        id: r.id,
        phone: Phone::from_stored(r.phone.clone()),
        body: r.body.clone(),
        said_at: r.time,
        scope: r.scope.clone(),
        matched: r.matched.clone(),
    }
}
