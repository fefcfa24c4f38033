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
mod lists;
mod load;
mod model;
mod queue;
mod read;
mod reviews;
mod van_ids;

use std::str::FromStr;
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use crate::config::DatabaseConfig;

pub use health::Failing;
pub use lists::SourcedState;
pub use load::IngestLoad;
pub use model::*;
pub use queue::Settled;
pub use reviews::{Decided, Decision, NewReview, ReviewRow, ReviewStats};
pub use van_ids::{VanIdRow, VanImport, VanSinkScope};

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
        Store::connect(cfg, true)
    }

    /// `create`: whether a missing SQLite file may be created (as the URL's `mode=rwc` asks).
    fn connect(cfg: &DatabaseConfig, create: bool) -> Result<Store, StoreError> {
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
            let opts = if create { opts } else { opts.create_if_missing(false) };
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

    /// Opens a database that `serve` or `migrate` already created, for the
    /// operator commands: never creates an SQLite file (the default URL says
    /// `mode=rwc`, which would leave an empty database behind and fail later
    /// with "no such table"), and refuses a database without this version's
    /// schema. The errors say where it looked and what to do.
    pub async fn open_existing(cfg: &DatabaseConfig) -> Result<Store, StoreError> {
        if let Some(path) = sqlite_file(cfg)? {
            if !path.exists() {
                return Err(StoreError::Unavailable(format!(
                    "no database at {} (database.url names it relative to the working directory): \
                     run this where `optout-relay serve` runs, point OPTOUT_RELAY__DATABASE__URL (or \
                     DATABASE_URL) at its database, or create it with `optout-relay migrate`",
                    absolute(&path).display()
                )));
            }
        }
        let store = Store::connect(cfg, false)?;
        if let Err(e) = store.ping().await {
            store.close().await;
            return Err(e);
        }
        if !store.readiness().await.migrations {
            store.close().await;
            return Err(StoreError::Unavailable(
                "the database has no schema for this version: run `optout-relay migrate` (or start \
                 `serve`, which applies migrations) first"
                    .to_owned(),
            ));
        }
        Ok(store)
    }

    /// One round trip: the error says why the database cannot be reached.
    pub async fn ping(&self) -> Result<(), StoreError> {
        on_pool!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))
            .map_err(|e| StoreError::Unavailable(format!("cannot reach the database: {e}")))
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

/// The file an SQLite URL names (`None` for PostgreSQL or an in-memory database).
pub fn sqlite_file(cfg: &DatabaseConfig) -> Result<Option<std::path::PathBuf>, StoreError> {
    let url = cfg.url.expose_secret();
    if !url.starts_with("sqlite:") {
        return Ok(None);
    }
    let opts = SqliteConnectOptions::from_str(url).map_err(|e| StoreError::Query(format!("bad database url: {e}")))?;
    let path = opts.get_filename();
    if path.as_os_str().is_empty() || path.as_os_str() == ":memory:" || url.contains("mode=memory") {
        return Ok(None);
    }
    Ok(Some(path.to_path_buf()))
}

/// The path as the operator should look for it (relative to the working directory).
fn absolute(path: &std::path::Path) -> std::path::PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
