//! Which VAN person (vanId) holds a phone, per committee: the table the
//! Parsons opt-out script reads, imported with `optout-relay import-van-ids`.
//!
//! The relay reads it for each everyaction sink's batch ([`Store::van_ids_of`])
//! and hands the sink the vanIds; the sink never reads the store.
//!
//! An import that teaches the table a new vanId for a phone the opt-out list
//! has opted out (in any scope) makes that phone's row of every everyaction sink concerned pending
//! again, marked to be written even if the row says VAN holds its target:
//! the new person was never written. So a mapping imported after the STOP
//! brings VAN to the current target with nothing else to do; importing the
//! same file again changes nothing and sends nothing.

use std::collections::{BTreeMap, BTreeSet};

use chrono::Utc;
use sqlx::QueryBuilder;

use super::codec::Ts;
use super::dialect::Dialect;
use super::{on_pool, Store, StoreError};
use crate::domain::Phone;

/// One row of a mapping file, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VanIdRow {
    pub phone: Phone,
    pub van_id: u64,
    /// `None`: the file named no committee.
    pub committee_id: Option<u64>,
}

/// An everyaction sink as an import needs it: its name and committee.
#[derive(Debug, Clone)]
pub struct VanSinkScope {
    pub sink: String,
    /// `None`: the sink uses every mapping row.
    pub committee_id: Option<u64>,
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VanImport {
    /// Rows the table did not hold.
    pub added: u64,
    /// Rows it held already (an import run twice adds nothing).
    pub known: u64,
    /// (sink, phone) rows made pending: opted-out phones with a new vanId.
    pub requeued: u64,
}

/// Makes an everyaction sink's row of a phone pending and marks it to be
/// written (`uncertain`); inserts it if the sink has none. Only for a phone
/// opted out in some scope: a new person is never sent an opt-in, which
/// could undo an opt-out VAN got from elsewhere. `$1` sink, `$2` phone, `$3` now.
const REQUEUE: &str =
    "INSERT INTO sink_phones (sink, phone, status, next_attempt_at, queued_at, created_at, updated_at)
     SELECT $1, $2, 'pending', $3, $3, $3, $3
      WHERE EXISTS (SELECT 1 FROM opt_out_state WHERE phone = $2 AND opted_out)
     ON CONFLICT (phone, sink) DO UPDATE
        SET status = 'pending', generation = sink_phones.generation + 1, uncertain = TRUE,
            next_attempt_at = excluded.next_attempt_at, updated_at = excluded.updated_at,
            queued_at = CASE WHEN sink_phones.status = 'pending'
                             THEN sink_phones.queued_at ELSE excluded.queued_at END,
            attempts = CASE WHEN sink_phones.status = 'pending' THEN sink_phones.attempts ELSE 0 END";

impl Store {
    /// Adds the rows the table does not hold yet and requeues what they
    /// concern for `sinks` (see the module's doc), in one transaction.
    pub async fn import_van_ids(&self, rows: &[VanIdRow], sinks: &[VanSinkScope]) -> Result<VanImport, StoreError> {
        let now = Ts(Utc::now());
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let mut report = VanImport::default();
            // phone -> committees (0: none) that gained a vanId.
            let mut gained: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
            for r in rows {
                let committee = r.committee_id.unwrap_or(0);
                let added = sqlx::query(
                    "INSERT INTO van_ids (phone, van_id, committee_id, imported_at) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (phone, van_id, committee_id) DO NOTHING",
                )
                .bind(r.phone.as_str())
                .bind(id_column(r.van_id)?)
                .bind(id_column(committee)?)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if added == 1 {
                    report.added += 1;
                    gained.entry(r.phone.as_str()).or_default().insert(committee);
                } else {
                    report.known += 1;
                }
            }
            for sink in sinks {
                for (phone, committees) in &gained {
                    let concerned = sink.committee_id.is_none_or(|c| committees.contains(&c));
                    if !concerned {
                        continue;
                    }
                    report.requeued += sqlx::query(REQUEUE)
                        .bind(&sink.sink)
                        .bind(*phone)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                }
            }
            tx.commit().await?;
            Ok(report)
        })
    }

    /// The vanIds of each phone (in `committee`, or in any committee when
    /// `None`), distinct and sorted; a phone without one is absent.
    pub async fn van_ids_of(
        &self,
        phones: &[Phone],
        committee: Option<u64>,
    ) -> Result<BTreeMap<String, Vec<u64>>, StoreError> {
        let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        if phones.is_empty() {
            return Ok(out);
        }
        let rows: Vec<(String, i64)> = on_pool!(self, pool => {
            let mut q = QueryBuilder::new("SELECT DISTINCT phone, van_id FROM van_ids WHERE phone IN (");
            let mut list = q.separated(", ");
            for p in phones {
                list.push_bind(p.as_str());
            }
            q.push(")");
            if let Some(c) = committee {
                q.push(" AND committee_id = ").push_bind(id_column(c)?);
            }
            q.push(" ORDER BY phone, van_id");
            q.build_query_as().fetch_all(pool).await?
        });
        for (phone, van_id) in rows {
            let van_id = u64::try_from(van_id)
                .map_err(|_| StoreError::Corrupt(format!("van_ids row of a phone holds vanId {van_id}")))?;
            out.entry(phone).or_default().push(van_id);
        }
        Ok(out)
    }

    /// How many mapping rows the table holds (for the import's summary).
    pub async fn van_id_count(&self) -> Result<i64, StoreError> {
        Ok(on_pool!(self, pool => {
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM van_ids").fetch_one(pool).await?
        }))
    }
}

/// An id as the BIGINT column holds it.
fn id_column(id: u64) -> Result<i64, StoreError> {
    i64::try_from(id).map_err(|_| StoreError::Query(format!("VAN id {id} is out of range")))
}
