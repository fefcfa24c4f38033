//! The `sinks` table: which sinks the relay has known, and each sink's
//! health, shared by all workers and replicas so an outage costs one probe
//! per backoff step, not one per worker or per row. Also the backfill that
//! gives a sink the opt-outs recorded without it.

use chrono::{DateTime, Utc};

use super::codec::Ts;
use super::dialect::Dialect;
use super::{decode_rows, on_pool, SinkFollow, SinkRow, Store, StoreError};
use crate::domain::ORGANISATION_SCOPE;

const SINK_COLUMNS: &str = "SELECT name, health, failing_since, backoff_step, next_probe_at, last_error, alerted_at, \
                            resynced_at, created_at FROM sinks";

/// A sink's failure, as the relay classified it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failing {
    BackingOff,
    Misconfigured,
}

impl Failing {
    fn as_str(self) -> &'static str {
        match self {
            Failing::BackingOff => "backing_off",
            Failing::Misconfigured => "misconfigured",
        }
    }
}

impl Store {
    /// Registers the configured sinks at start and makes every one due at
    /// once: a restart (after fixing a token, say) ends a backoff. Returns
    /// the names of the sinks seen for the first time.
    pub async fn register_sinks(&self, sinks: &[SinkFollow]) -> Result<Vec<String>, StoreError> {
        let now = Ts(Utc::now());
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let mut added = Vec::new();
            for s in sinks {
                let new: Option<String> = sqlx::query_scalar(
                    "INSERT INTO sinks (name, created_at, updated_at) VALUES ($1, $2, $2)
                     ON CONFLICT (name) DO NOTHING RETURNING name",
                )
                .bind(&s.sink)
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?;
                sqlx::query("UPDATE sinks SET next_probe_at = $2, updated_at = $2 WHERE name = $1")
                    .bind(&s.sink)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                added.extend(new);
            }
            tx.commit().await?;
            Ok(added)
        })
    }

    /// Gives `sink` a pending row for every phone opted out in a scope it
    /// follows (or organisation-wide) that it has no row for: a sink added
    /// later, or absent from the configuration (or from an old replica's)
    /// while opt-outs were recorded, or whose scopes grew, still receives
    /// them. A row it already has is left alone, and rows it never wrote
    /// are never cleared. Returns how many rows were added.
    pub async fn backfill(&self, sink: &SinkFollow) -> Result<u64, StoreError> {
        let now = Ts(Utc::now());
        on_pool!(self, pool => {
            let mut q = sqlx::QueryBuilder::new(
                "INSERT INTO sink_phones (sink, phone, status, event_id, next_attempt_at, queued_at, created_at, updated_at)
                 SELECT ",
            );
            q.push_bind(&sink.sink).push(", phone, 'pending', MAX(event_id), ");
            q.push_bind(now).push(", ").push_bind(now).push(", ").push_bind(now).push(", ").push_bind(now);
            q.push(" FROM opt_out_state WHERE opted_out");
            if let Some(scopes) = &sink.scopes {
                q.push(" AND scope IN (").push_bind(ORGANISATION_SCOPE);
                for scope in scopes {
                    q.push(", ").push_bind(scope);
                }
                q.push(")");
            }
            q.push(" GROUP BY phone ON CONFLICT (phone, sink) DO NOTHING");
            Ok(q.build().execute(pool).await?.rows_affected())
        })
    }

    /// Every known sink, by name.
    pub async fn sinks(&self) -> Result<Vec<SinkRow>, StoreError> {
        on_pool!(self, pool => {
            let sql = format!("{SINK_COLUMNS} ORDER BY name");
            let rows = sqlx::query(&sql).fetch_all(pool).await?;
            decode_rows!(rows, SinkRow, "sinks")
        })
    }

    /// One sink's row.
    pub async fn sink(&self, name: &str) -> Result<Option<SinkRow>, StoreError> {
        let rows = on_pool!(self, pool => {
            let sql = format!("{SINK_COLUMNS} WHERE name = $1");
            let rows = sqlx::query(&sql).bind(name).fetch_all(pool).await?;
            decode_rows!(rows, SinkRow, "sinks")?
        });
        Ok(rows.into_iter().next())
    }

    /// Takes the next probe of a failing sink: true for the one caller (of
    /// every worker and replica) that moved `next_probe_at` from a due time
    /// to `next`.
    pub async fn take_probe(&self, name: &str, next: DateTime<Utc>) -> Result<bool, StoreError> {
        let now = Ts(Utc::now());
        on_pool!(self, pool => {
            let done = sqlx::query(
                "UPDATE sinks SET next_probe_at = $2, updated_at = $3
                  WHERE name = $1 AND health <> 'ok' AND (next_probe_at IS NULL OR next_probe_at <= $3)",
            )
            .bind(name)
            .bind(Ts(next))
            .bind(now)
            .execute(pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    /// Records a failure: the sink backs off until `next_probe_at`; its run of
    /// failures keeps its start. `step` is the backoff step now reached.
    pub async fn sink_failed(
        &self,
        name: &str,
        how: Failing,
        step: i32,
        next_probe_at: DateTime<Utc>,
        error: &str,
    ) -> Result<(), StoreError> {
        let now = Ts(Utc::now());
        on_pool!(self, pool => {
            sqlx::query(
                "UPDATE sinks SET health = $2, failing_since = COALESCE(failing_since, $5),
                        -- A worker that read the health before another failure must not lower the step.
                        backoff_step = CASE WHEN backoff_step > $3 THEN backoff_step ELSE $3 END,
                        next_probe_at = $4, last_error = $6, updated_at = $5
                  WHERE name = $1",
            )
            .bind(name)
            .bind(how.as_str())
            .bind(step.max(0))
            .bind(Ts(next_probe_at))
            .bind(now)
            .bind(error)
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    /// Records that the sink works (a probe or a batch succeeded). Keeps
    /// `alerted_at`, so the alert monitor can say it recovered.
    pub async fn sink_ok(&self, name: &str) -> Result<(), StoreError> {
        let now = Ts(Utc::now());
        on_pool!(self, pool => {
            sqlx::query(
                "UPDATE sinks SET health = 'ok', failing_since = NULL, backoff_step = 0, next_probe_at = NULL,
                        last_error = NULL, updated_at = $2
                  WHERE name = $1 AND health <> 'ok'",
            )
            .bind(name)
            .bind(now)
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    /// Makes a backing-off or misconfigured sink due at once (an operator's
    /// retry). Returns false for an unknown sink.
    pub async fn release_sink(&self, name: &str) -> Result<bool, StoreError> {
        self.probe_at(name, Utc::now()).await
    }

    /// Moves the sink's next probe to `at`, keeping its health and backoff step.
    pub async fn probe_at(&self, name: &str, at: DateTime<Utc>) -> Result<bool, StoreError> {
        let now = Ts(Utc::now());
        on_pool!(self, pool => {
            let done = sqlx::query("UPDATE sinks SET next_probe_at = $2, updated_at = $3 WHERE name = $1")
                .bind(name)
                .bind(Ts(at))
                .bind(now)
                .execute(pool)
                .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    /// Whether anything at all waits for `sink` (due or not).
    pub async fn has_pending(&self, sink: &str) -> Result<bool, StoreError> {
        on_pool!(self, pool => {
            let one: Option<i64> =
                sqlx::query_scalar("SELECT id FROM sink_phones WHERE sink = $1 AND status = 'pending' LIMIT 1")
                    .bind(sink)
                    .fetch_optional(pool)
                    .await?;
            Ok(one.is_some())
        })
    }

    /// Sets or clears `alerted_at` only if it is still `expected`: one
    /// replica sends each alert.
    pub async fn mark_alerted(
        &self,
        name: &str,
        expected: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> Result<bool, StoreError> {
        on_pool!(self, pool => {
            let mut q = sqlx::QueryBuilder::new("UPDATE sinks SET alerted_at = ");
            q.push_bind(to.map(Ts)).push(" WHERE name = ").push_bind(name);
            match expected {
                Some(at) => q.push(" AND alerted_at = ").push_bind(Ts(at)),
                None => q.push(" AND alerted_at IS NULL"),
            };
            Ok(q.build().execute(pool).await?.rows_affected() == 1)
        })
    }

    /// Takes the sink's periodic resync if the last one is at least
    /// `interval` old: true for the one caller that moved `resynced_at`.
    pub async fn take_resync(&self, name: &str, interval: std::time::Duration) -> Result<bool, StoreError> {
        let now = Utc::now();
        let before = now - chrono::Duration::from_std(interval).unwrap_or(chrono::Duration::hours(1));
        on_pool!(self, pool => {
            let done = sqlx::query(
                "UPDATE sinks SET resynced_at = $2 WHERE name = $1 AND (resynced_at IS NULL OR resynced_at <= $3)",
            )
            .bind(name)
            .bind(Ts(now))
            .bind(Ts(before))
            .execute(pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    /// Sets when the sink's last resync counts as done: now after one that
    /// worked (`optout-relay resync` included, so the periodic one counts
    /// from it), or a time that makes the next try come sooner than a full
    /// interval after one that failed.
    pub async fn set_resynced_at(&self, name: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            sqlx::query("UPDATE sinks SET resynced_at = $2 WHERE name = $1")
                .bind(name)
                .bind(Ts(at))
                .execute(pool)
                .await?;
            Ok(())
        })
    }
}
