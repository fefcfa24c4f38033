//! Where PostgreSQL and SQLite differ, said once per backend: how a write
//! transaction starts and how a claim keeps other replicas off its rows.
//! Everything else in the store is the same SQL for both.

use std::sync::LazyLock;

use sqlx::{PgPool, SqlitePool, Transaction};

pub(super) trait Dialect {
    type Db: sqlx::Database;

    /// Starts a transaction that will write.
    async fn begin_write(&self) -> Result<Transaction<'static, Self::Db>, sqlx::Error>;

    /// The claim statement (see `queue::claim_sql`).
    fn claim_sql() -> &'static str;
}

impl Dialect for PgPool {
    type Db = sqlx::Postgres;

    async fn begin_write(&self) -> Result<Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        self.begin().await
    }

    fn claim_sql() -> &'static str {
        // SKIP LOCKED: replicas claiming at once take disjoint rows instead of
        // waiting for each other.
        static SQL: LazyLock<String> = LazyLock::new(|| super::queue::claim_sql("FOR UPDATE SKIP LOCKED"));
        &SQL
    }
}

impl Dialect for SqlitePool {
    type Db = sqlx::Sqlite;

    async fn begin_write(&self) -> Result<Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        // BEGIN IMMEDIATE takes the write lock up front instead of upgrading a
        // read lock mid-transaction, which SQLite may refuse with SQLITE_BUSY.
        self.begin_with("BEGIN IMMEDIATE").await
    }

    fn claim_sql() -> &'static str {
        // One writer at a time: the UPDATE itself is the lock.
        static SQL: LazyLock<String> = LazyLock::new(|| super::queue::claim_sql(""));
        &SQL
    }
}
