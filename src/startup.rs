//! The one place that builds the application. `main` and the tests both go
//! through [`Application::build`], so tests exercise what production runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::config::SinkConfig;
use crate::http::{self, AppState, Inner};
use crate::relay::{self, Relay};
use crate::sinks::email::EmailSink;
use crate::sinks::everyaction::EveryActionSink;
use crate::sinks::redcap::RedcapSink;
use crate::sinks::webhook::WebhookSink;
use crate::sinks::{Sink, SinkKind};
use crate::store::batch::BatchWriter;
use crate::store::{IngestLoad, Store};
use crate::supervise::{self, Tasks};
use crate::twilio::keywords::Keywords;
use crate::twilio::signature::Verifier;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    store: Store,
    config: Config,
    relay: Arc<Relay>,
    /// Every supervised background task, for `/readyz`.
    tasks: Tasks,
    /// Stops restarting batch writers; cancelled once the server has stopped.
    writers_stop: CancellationToken,
    /// Set once the migrations are applied; webhooks wait for it.
    schema_ready: tokio::sync::watch::Sender<bool>,
    /// Reading Twilio's message log every `[reconcile] interval`, when set.
    reconcile: Option<(crate::reconcile::Reconciler, Duration)>,
}

impl Application {
    /// Validates the config, opens the store (lazily: a database that is still
    /// starting makes `/readyz` fail, not the process), binds the listener.
    pub async fn build(config: Config) -> Result<Application, StartError> {
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(StartError::Config(problems.join("; ")));
        }
        let store = Store::connect_lazy(&config.database)?;
        let listener = TcpListener::bind(config.server.listen)
            .await
            .map_err(|source| StartError::Bind { addr: config.server.listen, source })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind { addr: config.server.listen, source })?;
        Self::warn_about(&config, addr);

        crate::metrics::handle();
        let twilio = &config.twilio;
        let region = config.keywords.region().ok_or_else(|| StartError::Config("keywords.default_region".into()))?;
        // `problems()` above refused a relay.lease a REDCap batch could outlive.
        let sinks = build_sinks(&config, region)?;
        crate::metrics::register(&sinks.iter().map(|s| s.name.as_str()).collect::<Vec<_>>());
        // Notified when a change was committed: wakes the relay's fan-out.
        let recorded = Arc::new(Notify::new());
        // Events committed per second: the relay steps aside during a burst.
        let load = Arc::new(IngestLoad::default());
        let relay = Arc::new(Relay::new(store.clone(), sinks, config.relay.clone(), recorded.clone(), load.clone()));
        // PostgreSQL overlaps commits from two writers; SQLite has one write lock.
        let writers = if store.backend() == "postgres" { 2 } else { 1 };
        let tasks = Tasks::new();
        let writers_stop = CancellationToken::new();
        let writer = BatchWriter::spawn(store.clone(), writers, recorded.clone(), load, &tasks, writers_stop.clone());
        // Without migrations at start the operator has run `migrate`: ready now.
        let (schema_ready, schema_ready_rx) = tokio::sync::watch::channel(!config.database.run_migrations_on_start);
        let state = AppState::new(Inner {
            store: store.clone(),
            writer,
            verifier: Verifier::new(twilio.auth_tokens.clone(), twilio.shared_keys.clone()),
            validate_signatures: twilio.validate_signatures,
            base_urls: config.server.public_url.iter().chain(&config.server.alternate_public_urls).cloned().collect(),
            keywords: Keywords::new(&config.keywords),
            region,
            mask_phones: config.log.mask_phones,
            relay: relay.clone(),
            tasks: tasks.clone(),
            schema_ready: schema_ready_rx,
            lists: config.lists.clone(),
        });
        let body = http::BodyRules { max_bytes: config.server.max_body_bytes, timeout: config.server.body_timeout };
        let router = http::router(state, body, config.admin.tokens.clone());
        let reconcile = build_reconciler(&config, &store, region, recorded)?;
        Ok(Application { listener, router, store, config, relay, tasks, writers_stop, schema_ready, reconcile })
    }

    fn warn_about(config: &Config, addr: SocketAddr) {
        let t = &config.twilio;
        if !t.validate_signatures {
            tracing::warn!("twilio.validate_signatures = false: ANYONE can forge opt-outs and opt-ins. Never run this way in production.");
        } else if t.auth_tokens.is_empty() && t.shared_keys.is_empty() {
            tracing::warn!(
                "no twilio.auth_tokens configured: every webhook will be refused with 403. \
                 Set OPTOUT_RELAY__TWILIO__AUTH_TOKENS to your Auth Token."
            );
        }
        if config.server.public_url.is_none() {
            tracing::warn!("server.public_url is not set: signatures are checked against the request's Host header, which fails behind most proxies");
        }
        if config.sinks().is_empty() {
            tracing::warn!("no sink configured ([redcap] or [sinks.NAME]): events are recorded but relayed nowhere");
        }
        tracing::info!(%addr, store = config.database.url.expose_secret().split(':').next().unwrap_or(""), "listening");
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.config.server.listen)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets
    /// requests in flight finish (bounded by `server.shutdown_grace`), and
    /// closes the pool.
    pub async fn run_until(self, shutdown: CancellationToken) -> std::io::Result<()> {
        if self.config.database.run_migrations_on_start {
            spawn_migrations(self.store.clone(), &self.tasks, shutdown.clone(), self.schema_ready.clone());
        }
        if let Some((reconciler, interval)) = self.reconcile.clone() {
            let (cfg, ready, stop) = (self.config.reconcile.clone(), self.schema_ready.subscribe(), shutdown.clone());
            supervise::spawn("reconcile".into(), &self.tasks, shutdown.clone(), move || {
                crate::reconcile::every(reconciler.clone(), cfg.clone(), interval, ready.clone(), stop.clone())
            });
        }
        let workers = Arc::new(std::sync::Mutex::new(Vec::new()));
        start_relay(self.relay.clone(), &self.tasks, shutdown.clone(), workers.clone());
        let grace = self.config.server.shutdown_grace;
        let signal = shutdown.clone();
        let deadlines = http::serve::Deadlines {
            header_read: self.config.server.header_read_timeout,
            idle: self.config.server.idle_timeout,
        };
        let server = async move {
            http::serve::serve(self.listener, self.router, deadlines, signal).await;
            Ok::<(), std::io::Error>(())
        };
        let bounded = async {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        let result = tokio::select! {
            r = server => r,
            () = bounded => {
                tracing::warn!(?grace, "requests still in flight after the shutdown grace period; exiting anyway");
                Ok(())
            }
        };
        // The requests are answered: a writer that panics now has nobody to serve.
        self.writers_stop.cancel();
        // Workers finish the batch in hand; a lease they cannot settle expires
        // and the delivery is retried, so a bounded wait loses nothing.
        let workers = std::mem::take(&mut *workers.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        let _ = tokio::time::timeout(grace, futures_util::future::join_all(workers)).await;
        self.store.close().await;
        tracing::info!("stopped");
        result
    }
}

/// The periodic reconciliation, when `[reconcile] interval` is set.
fn build_reconciler(
    config: &Config,
    store: &Store,
    region: phonenumber::country::Id,
    recorded: Arc<Notify>,
) -> Result<Option<(crate::reconcile::Reconciler, Duration)>, StartError> {
    let Some(interval) = config.reconcile.interval else { return Ok(None) };
    let client = crate::twilio::messages::MessagesClient::from_config(&config.twilio)
        .map_err(|e| StartError::Config(format!("reconcile: {e}")))?;
    let keywords = Keywords::new(&config.keywords);
    let reconciler = crate::reconcile::Reconciler::new(
        client,
        store.clone(),
        keywords,
        region,
        config.log.mask_phones,
        Some(recorded),
    );
    Ok(Some((reconciler, interval)))
}

/// One sink per configured sink (`[sinks.NAME]`, `[redcap]`, `[email]`).
pub fn build_sinks(config: &Config, region: phonenumber::country::Id) -> Result<Vec<Arc<Sink>>, StartError> {
    let mut sinks = Vec::new();
    for (name, cfg) in config.sinks() {
        let scopes = cfg.scopes().map(<[String]>::to_vec);
        let kind = match &cfg {
            SinkConfig::Redcap(c) => SinkKind::Redcap {
                sink: RedcapSink::new(c, region)
                    .map_err(|e| StartError::Config(format!("sink {name}: {e}")))?
                    .named(&name),
                resync_interval: c.resync_interval,
            },
            SinkConfig::Email(c) => SinkKind::Email {
                sink: EmailSink::new(c).map_err(|e| StartError::Config(format!("sink {name}: {e}")))?,
                alert_after: c.alert_after,
                report_wait: c.report_wait,
            },
            SinkConfig::Everyaction(c) => SinkKind::EveryAction {
                sink: EveryActionSink::new(c)
                    .map_err(|e| StartError::Config(format!("sink {name}: {e}")))?
                    .named(&name),
                committee_id: c.committee_id,
            },
            SinkConfig::Webhook(c) => SinkKind::Webhook {
                sink: WebhookSink::new(c).map_err(|e| StartError::Config(format!("sink {name}: {e}")))?.named(&name),
            },
        };
        sinks.push(Arc::new(Sink { name, scopes, kind }));
    }
    Ok(sinks)
}

/// Registers the sinks (which needs the migrations: retried until they are
/// applied), filling a new one with the opt-outs it follows and making every
/// sink due, then starts the relay's tasks into `handles`.
fn start_relay(
    relay: Arc<Relay>,
    tasks: &Tasks,
    shutdown: CancellationToken,
    handles: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
) {
    let tasks_for_relay = tasks.clone();
    let stop = shutdown.clone();
    let handle = tokio::spawn(async move {
        let follows = relay::follows(&relay.sinks);
        let mut delay = Duration::from_millis(200);
        loop {
            match register(&relay, &follows).await {
                Ok(()) => break,
                Err(e) => tracing::warn!(error = %e, "cannot register the sinks yet; retrying"),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
        let spawned = relay.clone().spawn(&tasks_for_relay, stop);
        handles.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(spawned);
    });
    drop(handle);
}

/// Registers every sink (each due at once) and backfills all but email
/// with the opt-outs recorded without them. Email is not backfilled: a new
/// mail sink would otherwise send one message per opt-out ever recorded.
async fn register(relay: &Relay, follows: &[crate::store::SinkFollow]) -> Result<(), crate::store::StoreError> {
    for name in relay.store.register_sinks(follows).await? {
        tracing::info!(sink = %name, "new sink");
    }
    for (sink, follow) in relay.sinks.iter().zip(follows) {
        // Systems of record get the list (a webhook subscriber too: it keeps one).
        if !matches!(sink.kind, SinkKind::Email { .. }) {
            let added = relay.store.backfill(follow).await?;
            if added > 0 {
                tracing::info!(sink = %sink.name, phones = added, "opt-outs recorded without this sink are queued for it");
            }
        }
    }
    Ok(())
}

/// Applies migrations, retrying while the database is unreachable so a
/// container can start before its database. Supervised as `migrations`; the
/// supervision ends once they are applied.
fn spawn_migrations(store: Store, tasks: &Tasks, shutdown: CancellationToken, ready: tokio::sync::watch::Sender<bool>) {
    supervise::spawn("migrations".into(), tasks, shutdown.clone(), move || {
        migrate_until_applied(store.clone(), shutdown.clone(), ready.clone())
    });
}

async fn migrate_until_applied(store: Store, shutdown: CancellationToken, ready: tokio::sync::watch::Sender<bool>) {
    let mut delay = Duration::from_millis(500);
    loop {
        match store.migrate().await {
            Ok(()) => {
                tracing::info!(backend = store.backend(), "migrations applied");
                ready.send_replace(true);
                return;
            }
            Err(e) => tracing::error!(error = %e, "cannot apply migrations yet; retrying"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}
