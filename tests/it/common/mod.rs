//! Shared test setup: the real application on a random port, over a real
//! PostgreSQL database (fresh per test) or a real SQLite file (fresh per
//! test), driven over real HTTP; the one `eventually` helper; direct reads
//! of a test's database.
#![allow(dead_code)]

pub mod fake_redcap;
pub mod fake_smtp;
pub mod fake_twilio;
pub mod fake_van;
pub mod webhook_receiver;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use optout_relay::config::Config;
use optout_relay::startup::Application;
use optout_relay::store::{DeliveryFilter, DeliveryRow, EventFilter, EventRow, Store};
use optout_relay::twilio::signature::compute;
use secrecy::SecretString;
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

pub const TOKEN: &str = "abcdef0123456789abcdef0123456789";
pub const PUBLIC_URL: &str = "https://optout.example.org";
pub const SERVICE: &str = "MG11111111111111111111111111111111";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// Where the Postgres tests create their databases. CI starts PostgreSQL on
/// 127.0.0.1:5432 with trust auth (see .ci/run).
pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A fresh, empty database for one test; returns its URL. Dropped by name
/// prefix at the start of the next run, so a failed test leaves it for a look.
pub async fn fresh_database(backend: Backend, dir: &tempfile::TempDir) -> String {
    match backend {
        Backend::Sqlite => format!("sqlite://{}?mode=rwc", dir.path().join("relay.db").display()),
        Backend::Postgres => {
            let name = format!("optout_test_{}", rand::random::<u64>());
            let mut conn = sqlx::PgConnection::connect(&admin_url())
                .await
                .expect("PostgreSQL must be running for the tests (see .ci/run)");
            sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.expect("create database");
            let base = admin_url();
            let root = base.rsplit_once('/').map_or(base.as_str(), |(r, _)| r).to_owned();
            format!("{root}/{name}")
        }
    }
}

/// Drops a test's PostgreSQL database (a no-op for SQLite, whose file goes with its temp dir).
pub async fn drop_database(db_url: &str) {
    let Some(name) = db_url.rsplit('/').next().filter(|n| n.starts_with("optout_test_")) else { return };
    if let Ok(mut conn) = sqlx::PgConnection::connect(&admin_url()).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut conn).await;
    }
}

pub fn base_config(db_url: &str) -> Config {
    let mut c = Config::default();
    c.server.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    c.server.public_url = Some(PUBLIC_URL.to_owned());
    c.server.shutdown_grace = Duration::from_secs(5);
    c.database.url = SecretString::from(db_url.to_owned());
    c.database.max_connections = 5;
    c.twilio.auth_tokens = vec![SecretString::from(TOKEN)];
    c
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub store: Store,
    pub client: reqwest::Client,
    pub shutdown: CancellationToken,
    pub handle: tokio::task::JoinHandle<std::io::Result<()>>,
    pub db_url: String,
    _dir: tempfile::TempDir,
}

/// Builds the app the way `serve` does, applies migrations, serves it.
pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, |_| {}).await
}

pub async fn spawn_app_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> TestApp {
    optout_relay::install_tls_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let db_url = fresh_database(backend, &dir).await;
    let mut config = base_config(&db_url);
    tweak(&mut config);
    let migrate = config.database.run_migrations_on_start;
    let app = Application::build(config).await.expect("build app");
    let store = app.store().clone();
    if migrate {
        store.migrate().await.expect("migrate");
    }
    let addr = app.local_addr();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(app.run_until(shutdown.clone()));
    TestApp { addr, store, client: reqwest::Client::new(), shutdown, handle, db_url, _dir: dir }
}

/// A Twilio-like inbound message.
pub fn stop_params(sid: &str, from: &str, body: &str, opt_out_type: Option<&str>) -> Vec<(String, String)> {
    let mut p = vec![
        ("MessageSid".to_owned(), sid.to_owned()),
        ("SmsSid".to_owned(), sid.to_owned()),
        ("AccountSid".to_owned(), format!("AC{}", "0".repeat(32))),
        ("MessagingServiceSid".to_owned(), SERVICE.to_owned()),
        ("From".to_owned(), from.to_owned()),
        ("To".to_owned(), "+15005550006".to_owned()),
        ("Body".to_owned(), body.to_owned()),
        ("NumMedia".to_owned(), "0".to_owned()),
        ("SmsStatus".to_owned(), "received".to_owned()),
        ("ApiVersion".to_owned(), "2010-04-01".to_owned()),
    ];
    if let Some(t) = opt_out_type {
        p.push(("OptOutType".to_owned(), t.to_owned()));
    }
    p
}

/// Posts `params` to `url` (any server) signed with `TOKEN` over `PUBLIC_URL`, as Twilio would.
pub async fn send_signed(client: &reqwest::Client, url: &str, params: &[(String, String)]) -> reqwest::StatusCode {
    let sig = compute(TOKEN, &format!("{PUBLIC_URL}/twilio/messages"), params);
    client
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", sig)
        .body(encode(params))
        .send()
        .await
        .expect("request")
        .status()
}

pub fn encode(params: &[(String, String)]) -> String {
    let mut ser = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        ser.append_pair(k, v);
    }
    ser.finish()
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Posts `params` signed with `token` over `PUBLIC_URL` + path.
    pub async fn post_signed(&self, params: &[(String, String)], token: &str) -> reqwest::Response {
        let sig = compute(token, &format!("{PUBLIC_URL}/twilio/messages"), params);
        self.post_raw("/twilio/messages", encode(params), "application/x-www-form-urlencoded", Some(&sig), &[]).await
    }

    pub async fn post_raw(
        &self,
        path: &str,
        body: String,
        content_type: &str,
        signature: Option<&str>,
        extra: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut req = self.client.post(self.url(path)).header("content-type", content_type).body(body);
        if let Some(s) = signature {
            req = req.header("x-twilio-signature", s);
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        req.send().await.expect("request")
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(PATIENCE, self.handle).await;
        drop_database(&self.db_url).await;
    }
}

/// How long `eventually` waits: far beyond any healthy run, so only a real
/// failure (not a busy machine) gets there.
pub const PATIENCE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

/// Polls `condition` until it holds; panics naming `what` after `PATIENCE`.
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_some(what, || {
        let check = condition();
        async move { check.await.then_some(()) }
    })
    .await
}

/// Polls `probe` until it yields a value, and returns it; panics naming `what` after `PATIENCE`.
pub async fn eventually_some<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "gave up after {PATIENCE:?} waiting for: {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// Every delivery, optionally of one status, in id order.
pub async fn deliveries(store: &Store, status: Option<&str>) -> Vec<DeliveryRow> {
    let filter = DeliveryFilter { status: status.map(str::to_owned), limit: 10_000, ..Default::default() };
    store.list_deliveries(&filter).await.expect("list deliveries")
}

/// Every event, in id order.
pub async fn events(store: &Store) -> Vec<EventRow> {
    store.list_events(&EventFilter { limit: 10_000, ..Default::default() }).await.expect("list events")
}

pub async fn event_count(store: &Store) -> usize {
    events(store).await.len()
}

/// Whether `phone` is opted out in the messaging service `SERVICE`; None: no state yet.
pub async fn opted_out(store: &Store, phone: &str) -> Option<bool> {
    let phone = optout_relay::domain::Phone::parse(phone, phonenumber::country::Id::US).expect("a valid phone");
    let states = store.states(&phone).await.expect("states");
    states.iter().find(|s| s.scope == SERVICE).map(|s| s.opted_out)
}

/// Runs statements on a test's database, outside the application.
pub async fn exec(db_url: &str, statements: &[&str]) {
    if db_url.starts_with("postgres") {
        let mut c = sqlx::PgConnection::connect(db_url).await.expect("connect");
        for s in statements {
            sqlx::query(s).execute(&mut c).await.expect(s);
        }
    } else {
        let mut c = sqlx::SqliteConnection::connect(db_url).await.expect("connect");
        for s in statements {
            sqlx::query(s).execute(&mut c).await.expect(s);
        }
    }
}

/// The text column of each row a query returns, read outside the application
/// (for what no store method exposes, such as an event's raw `From`).
pub async fn query_texts(db_url: &str, sql: &str) -> Vec<String> {
    if db_url.starts_with("postgres") {
        let mut c = sqlx::PgConnection::connect(db_url).await.expect("connect");
        sqlx::query_scalar(sql).fetch_all(&mut c).await.expect(sql)
    } else {
        let mut c = sqlx::SqliteConnection::connect(db_url).await.expect("connect");
        sqlx::query_scalar(sql).fetch_all(&mut c).await.expect(sql)
    }
}

/// Runs one test body against both backends; attributes before a name (such
/// as `#[ignore = "why"]`) go on both of its tests.
#[macro_export]
macro_rules! both_backends {
    ($($(#[$meta:meta])* $name:ident),* $(,)?) => {
        mod postgres {
            $(
                $(#[$meta])*
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name($crate::common::Backend::Postgres).await }
            )*
        }
        mod sqlite {
            $(
                $(#[$meta])*
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name($crate::common::Backend::Sqlite).await }
            )*
        }
    };
}

/// Relay settings for tests that follow a sink through its faults: quick
/// polls and probes, a short lease, re-reads within seconds; a refusing sink
/// is not retried during the test.
pub fn quick_relay(c: &mut Config) {
    c.relay.poll_interval = Duration::from_millis(50);
    c.relay.retry_base = Duration::from_millis(100);
    c.relay.retry_cap = Duration::from_millis(400);
    c.relay.misconfigured_retry = Duration::from_secs(3600);
    c.relay.lease = Duration::from_secs(5);
    c.relay.recheck_soon = Duration::from_millis(300);
    c.relay.recheck_late = Duration::from_secs(2);
}

/// A REDCap sink configuration pointing at `url`.
pub fn redcap_config(url: &str) -> optout_relay::config::RedcapConfig {
    optout_relay::config::RedcapConfig {
        url: url.to_owned(),
        token: SecretString::from("A".repeat(32)),
        phone_field: "phone".to_owned(),
        phone_event: None,
        optout_field: "opted_out_at".to_owned(),
        optout_event: None,
        timezone: "UTC".to_owned(),
        timestamp_format: optout_relay::config::TimestampFormat::Auto,
        request_timeout: Duration::from_secs(5),
        max_calls_per_minute: 600,
        scopes: None,
        resync_interval: Duration::ZERO,
    }
}

/// Ends one claimed row's pass as a worker would; false when `owner` no
/// longer holds its lease.
pub async fn settle_one(
    store: &optout_relay::store::Store,
    claimed: &optout_relay::store::ClaimedPhone,
    owner: &str,
    how: &optout_relay::store::Settle,
) -> bool {
    let now = chrono::Utc::now();
    let settled = optout_relay::store::Settled { id: claimed.id, generation: claimed.generation, how: how.clone() };
    store.settle_many(owner, &[settled], now - chrono::Duration::days(3), (now, now), now).await.expect("settle") == 1
}
