//! A throwaway database for one benchmark run: a SQLite file in a temp
//! directory, or a PostgreSQL database created beside the admin URL's and
//! dropped afterwards. Shared by the benchmark examples (`#[path]`-included).

use sqlx::Connection;

pub struct Db {
    pub url: String,
    pub pg_name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

/// `backend` is `postgres` or `sqlite`; `file` names the SQLite file.
pub async fn fresh_db(backend: &str, pg_admin_url: &str, file: &str) -> anyhow::Result<Db> {
    match backend {
        "sqlite" => {
            let dir = tempfile::tempdir()?;
            let url = format!("sqlite://{}?mode=rwc", dir.path().join(file).display());
            Ok(Db { url, pg_name: None, _dir: Some(dir) })
        }
        "postgres" => {
            let name = format!("optout_bench_{:016x}", rand::random::<u64>());
            let mut conn = sqlx::PgConnection::connect(pg_admin_url).await?;
            sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await?;
            let _ = conn.close().await;
            let root = pg_admin_url.rsplit_once('/').map_or(pg_admin_url, |(r, _)| r);
            Ok(Db { url: format!("{root}/{name}"), pg_name: Some(name), _dir: None })
        }
        other => anyhow::bail!("--backend must be postgres or sqlite, not {other:?}"),
    }
}

pub async fn drop_db(pg_admin_url: &str, db: &Db) {
    let Some(name) = &db.pg_name else { return };
    match sqlx::PgConnection::connect(pg_admin_url).await {
        Ok(mut conn) => {
            if let Err(e) =
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut conn).await
            {
                eprintln!("cannot drop database {name}: {e}");
            }
        }
        Err(e) => eprintln!("cannot drop database {name}: {e}"),
    }
}
