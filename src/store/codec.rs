//! One Rust type per column meaning, two column types: what lets the store's
//! SQL and row mapping be written once for both backends.
//!
//! An instant is `TIMESTAMPTZ` on PostgreSQL (operators query it with SQL)
//! and INTEGER milliseconds since the Unix epoch on SQLite, so comparisons
//! there are numeric, never textual. A value that cannot be an instant (text
//! in an INTEGER column, a number outside chrono's range) is a decode error,
//! never a silent 1970.

use chrono::{DateTime, TimeZone, Utc};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueRef};
use sqlx::sqlite::{SqliteArgumentValue, SqliteTypeInfo, SqliteValueRef};
use sqlx::{Decode, Encode, Postgres, Sqlite, Type, ValueRef};

/// A UTC instant as the store keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ts(pub DateTime<Utc>);

impl From<Ts> for DateTime<Utc> {
    fn from(t: Ts) -> Self {
        t.0
    }
}

impl Type<Postgres> for Ts {
    fn type_info() -> PgTypeInfo {
        <DateTime<Utc> as Type<Postgres>>::type_info()
    }
}

impl Encode<'_, Postgres> for Ts {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        <DateTime<Utc> as Encode<Postgres>>::encode_by_ref(&self.0, buf)
    }
}

impl<'r> Decode<'r, Postgres> for Ts {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(Ts(<DateTime<Utc> as Decode<Postgres>>::decode(value)?))
    }
}

impl Type<Sqlite> for Ts {
    fn type_info() -> SqliteTypeInfo {
        <i64 as Type<Sqlite>>::type_info()
    }
    fn compatible(ty: &SqliteTypeInfo) -> bool {
        <i64 as Type<Sqlite>>::compatible(ty)
    }
}

impl<'q> Encode<'q, Sqlite> for Ts {
    fn encode_by_ref(&self, buf: &mut Vec<SqliteArgumentValue<'q>>) -> Result<IsNull, BoxDynError> {
        <i64 as Encode<Sqlite>>::encode(self.0.timestamp_millis(), buf)
    }
}

impl<'r> Decode<'r, Sqlite> for Ts {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        let ms = <i64 as Decode<Sqlite>>::decode(value)?;
        from_millis(ms).map(Ts).ok_or_else(|| format!("{ms} is not a time in milliseconds since 1970").into())
    }
}

/// A nullable instant (`completed_at`): NULL decodes as `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptTs(pub Option<DateTime<Utc>>);

impl From<OptTs> for Option<DateTime<Utc>> {
    fn from(t: OptTs) -> Self {
        t.0
    }
}

impl<DB: sqlx::Database> Type<DB> for OptTs
where
    Ts: Type<DB>,
{
    fn type_info() -> DB::TypeInfo {
        <Ts as Type<DB>>::type_info()
    }
    fn compatible(ty: &DB::TypeInfo) -> bool {
        <Ts as Type<DB>>::compatible(ty)
    }
}

impl<'r, DB: sqlx::Database> Decode<'r, DB> for OptTs
where
    Ts: Decode<'r, DB>,
{
    fn decode(value: <DB as sqlx::Database>::ValueRef<'r>) -> Result<Self, BoxDynError> {
        if value.is_null() {
            return Ok(OptTs(None));
        }
        Ok(OptTs(Some(<Ts as Decode<'r, DB>>::decode(value)?.0)))
    }
}

/// Milliseconds since the epoch, refusing what chrono cannot represent.
pub fn from_millis(ms: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(ms).single()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_round_trip_and_out_of_range_is_refused() {
        let t = Utc.with_ymd_and_hms(2026, 11, 23, 14, 15, 7).unwrap();
        assert_eq!(from_millis(t.timestamp_millis()), Some(t));
        assert_eq!(from_millis(i64::MAX), None);
    }
}
