//! Durable storage: events, the current opt-out state, and the delivery queue.
//!
//! One implementation over two backends: PostgreSQL for production and an
//! embedded SQLite file as the zero-setup default. Each method's body is
//! written once and compiled once per backend by [`on_pool!`]: the SQL is
//! the same text wherever the dialects agree (both take `$1` placeholders),
//! rows map through one `FromRow` per type, and instants go through
//! [`codec::Ts`], which is `TIMESTAMPTZ` on one side and integer
//! milliseconds on the other. The few statements that differ — the batch
//! insert (PostgreSQL does a whole batch in one statement), the claim's row
//! locks, how a write transaction starts — come from [`dialect`].
//!
//! Why a macro over a pool enum rather than a trait with two impls: a trait
//! would still need every method written twice (or a generic impl whose
//! sqlx bounds are longer than the SQL); the macro says each query once and
//! the compiler still checks it against both drivers.

pub mod batch;
mod codec;
mod dialect;
mod fan_out;
mod health;
mod ingest;
mod model;
mod queue;
mod read;

use std::str::FromStr;
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use crate::config::DatabaseConfig;

pub use health::Failing;
pub use model::*;
pub use queue::Settled;

static PG_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or gave no connection in time: retryable.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store query failed: {0}")]
    Query(String),
    /// A stored row that cannot be read back (a bad time, bad JSON, an
    /// unknown kind): named, so an operator can find and mend it.
    #[error("stored row cannot be read: {0}")]
    Corrupt(String),
    #[error("migration failed: {0}")]
    Migrate(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => {
                StoreError::Unavailable(e.to_string())
            }
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => StoreError::Corrupt(e.to_string()),
            other => StoreError::Query(other.to_string()),
        }
    }
}

#[derive(Clone)]
enum Pool {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Runs `$body` with `$pool` bound to the backend's pool. The body is
/// expanded (and type-checked) once per backend.
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.pool {
            $crate::store::Pool::Postgres($pool) => $body,
            $crate::store::Pool::Sqlite($pool) => $body,
        }
    };
}
pub(crate) use on_pool;

/// Decodes fetched rows into `$ty`, naming the table and row id of one that
/// cannot be read instead of guessing a value for it.
macro_rules! decode_rows {
    ($rows:expr, $ty:ty, $table:literal) => {{
        use sqlx::Row as _;
        $rows
            .iter()
            .map(|r| {
                <$ty as sqlx::FromRow<'_, _>>::from_row(r).map_err(|e| {
                    let id: Option<i64> = r.try_get("id").ok();
                    $crate::store::StoreError::Corrupt(format!(
                        "{} row {}: {e}",
                        $table,
                        id.map_or_else(|| "?".to_owned(), |i| i.to_string())
                    ))
                })
            })
            .collect::<Result<Vec<$ty>, $crate::store::StoreError>>()
    }};
}
pub(crate) use decode_rows;

#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

impl Store {
    /// Opens a pool without connecting yet, so the service can start (and
    /// report not-ready) while the database is still coming up.
    pub fn connect_lazy(cfg: &DatabaseConfig) -> Result<Store, StoreError> {
        let url = cfg.url.expose_secret();
        let bad_url = |e: sqlx::Error| StoreError::Query(format!("bad database url: {e}"));
        let pool = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let opts = PgConnectOptions::from_str(url).map_err(bad_url)?;
            Pool::Postgres(
                PgPoolOptions::new()
                    .max_connections(cfg.max_connections)
                    .acquire_timeout(cfg.acquire_timeout)
                    // A ping before every acquire is a round trip on the webhook's hot
                    // path; a broken connection fails its query instead, and the
                    // batch writer answers 503 so Twilio retries.
                    .test_before_acquire(false)
                    .connect_lazy_with(opts),
            )
        } else if url.starts_with("sqlite:") {
            // WAL with synchronous = FULL: an answered webhook survives a power cut.
            let opts = SqliteConnectOptions::from_str(url)
                .map_err(bad_url)?
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .foreign_keys(true)
                .busy_timeout(Duration::from_secs(5));
            Pool::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(cfg.max_connections.max(1))
                    .acquire_timeout(cfg.acquire_timeout)
                    .connect_lazy_with(opts),
            )
        } else {
            return Err(StoreError::Query("database.url must be postgres://… or sqlite:…".into()));
        };
        Ok(Store { pool })
    }

    pub fn backend(&self) -> &'static str {
        match self.pool {
            Pool::Postgres(_) => "postgres",
            Pool::Sqlite(_) => "sqlite",
        }
    }

    fn migrator(&self) -> &'static sqlx::migrate::Migrator {
        match self.pool {
            Pool::Postgres(_) => &PG_MIGRATOR,
            Pool::Sqlite(_) => &SQLITE_MIGRATOR,
        }
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        let migrator = self.migrator();
        on_pool!(self, pool => migrator.run(pool).await).map_err(|e| StoreError::Migrate(e.to_string()))
    }

    pub async fn readiness(&self) -> Readiness {
        let latest = self.migrator().iter().map(|m| m.version).max().unwrap_or(0);
        let database = on_pool!(self, pool => sqlx::query("SELECT 1").execute(pool).await.is_ok());
        let migrations = database
            && on_pool!(self, pool => sqlx::query_scalar::<_, i64>(
                "SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations WHERE success"
            )
            .fetch_one(pool)
            .await
            .is_ok_and(|v| v >= latest));
        Readiness { database, migrations }
    }

    pub async fn close(&self) {
        on_pool!(self, pool => pool.close().await)
    }
}
