//! Prometheus metrics. Call sites use the `metrics` facade; this module
//! installs the recorder once per process and renders `GET /metrics`.
//!
//! Queue gauges (pending deliveries, age of the oldest pending one, dead
//! letters) are read from the store at scrape time, so they are exact and
//! every replica reports the shared queue. When that read fails the queue
//! gauges keep their last values, so `optout_queue_stats_up` (0/1) and
//! `optout_queue_stats_last_success_timestamp_seconds` say whether they are
//! current: alert on `optout_queue_stats_up == 0`, or on the timestamp
//! falling behind.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Seconds: webhook handling is milliseconds, REDCap calls up to the timeout.
const BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Installs the global recorder (first call) and returns its handle. `None`
/// if another recorder was installed first (then metrics are not rendered).
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder =
                PrometheusBuilder::new().set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS).ok()?;
            let handle = builder.install_recorder().ok()?;
            describe();
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("optout_webhooks_total", "Webhooks answered, by outcome");
    describe_counter!("optout_events_total", "Events recorded, by kind");
    describe_counter!("optout_deliveries_total", "Deliveries finished or retried, by sink and outcome");
    describe_counter!("optout_delivery_attempts_total", "Delivery attempts made, by sink");
    describe_gauge!("optout_pending_deliveries", "Deliveries waiting, by sink");
    describe_gauge!(
        "optout_oldest_pending_delivery_age_seconds",
        Unit::Seconds,
        "Age of the oldest pending delivery, by sink: the FCC's 10-business-day clock"
    );
    describe_gauge!("optout_dead_deliveries", "Dead-lettered deliveries awaiting an operator, by sink");
    describe_gauge!("optout_sink_up", "1 while the sink works, 0 while it is backing off or misconfigured, by sink");
    describe_gauge!(
        "optout_sink_failing_seconds",
        Unit::Seconds,
        "How long the sink's current run of failures has lasted (0 while it works), by sink"
    );
    describe_gauge!(
        "optout_queue_stats_up",
        "1 when the queue gauges (pending, oldest age, dead) were read from the store at this scrape; \
         0 when the read failed and they still show the last values read"
    );
    describe_gauge!(
        "optout_queue_stats_last_success_timestamp_seconds",
        Unit::Seconds,
        "Unix time of the last scrape that read the queue gauges from the store (absent until one did)"
    );
    describe_counter!(
        "optout_task_panics_total",
        "Panics of supervised background tasks (batch-writer-N, relay-SINK-N, migrations), by task; \
         each is followed by a restart after a backoff unless the service is shutting down"
    );
    describe_gauge!(
        "optout_changes_waiting",
        "Consent changes recorded and not yet fanned out to the sinks' queues (normally 0; it grows while the \
         relay steps aside for a burst of webhooks, and falls once the burst has passed; growing otherwise: \
         the fan-out is stuck)"
    );
    describe_histogram!(
        "optout_relay_yield_seconds",
        Unit::Seconds,
        "Each wait of a relay task (worker, fan-out) stepping aside while ingest recorded more than \
         relay.yield_above events a second; the sum is the relay's total delay"
    );
    describe_counter!(
        "optout_requests_held_for_schema_total",
        "Writes held at start until this process's migrations were applied"
    );
    describe_counter!(
        "optout_reconcile_missed_total",
        "Events found in Twilio's message log (reconciliation, backfill) that no endpoint had delivered, by kind"
    );
    describe_counter!("optout_reconcile_runs_total", "Periodic reconciliation runs, by outcome (ok, failed)");
    describe_counter!(
        "optout_reviews_total",
        "Review items created: messages that read like a revocation without being a keyword, held for staff"
    );
    describe_gauge!("optout_reviews_pending", "Review items waiting for a staff decision");
    describe_gauge!(
        "optout_oldest_pending_review_age_seconds",
        Unit::Seconds,
        "Age of the oldest pending review item, from when the person said it: the FCC's clock runs on it too"
    );
    describe_histogram!("optout_webhook_duration_seconds", Unit::Seconds, "Webhook handling time");
    describe_histogram!("optout_sink_call_duration_seconds", Unit::Seconds, "Calls to a sink's API, by sink and call");
}

/// Every webhook outcome (`ApiError::outcome` and the handler's 200s).
pub const WEBHOOK_OUTCOMES: &[&str] =
    &["accepted", "duplicate", "ignored", "bad_signature", "rejected", "store_unavailable"];
/// Every event kind (`EventKind::as_str`).
pub const EVENT_KINDS: &[&str] = &["opt_out", "opt_in", "help"];
/// Every outcome of a (sink, phone) row (see [`delivery`]).
pub const DELIVERY_OUTCOMES: &[&str] = &["written", "unchanged", "skipped", "uncertain", "failed", "dead"];

/// Creates every counter at 0 for its known labels, so that `/metrics`
/// shows every series from the start: `rate()` and `increase()` need a first
/// sample of 0, and an operator looking at a fresh service sees what will be
/// counted. Gauges are set at each scrape; task panic counters when the task
/// starts ([`task_started`]). Histograms appear with their first observation
/// (the exporter renders none before; a made-up 0 s sample would be a lie).
pub fn register(sinks: &[&str]) {
    if handle().is_none() {
        return;
    }
    for outcome in WEBHOOK_OUTCOMES {
        metrics::counter!("optout_webhooks_total", "outcome" => *outcome).absolute(0);
        metrics::counter!("optout_webhooks_total", "outcome" => *outcome, "channel" => "event_streams").absolute(0);
    }
    metrics::counter!("optout_requests_held_for_schema_total").increment(0);
    for kind in EVENT_KINDS {
        metrics::counter!("optout_events_total", "kind" => *kind).absolute(0);
        metrics::counter!("optout_reconcile_missed_total", "kind" => *kind).absolute(0);
    }
    for outcome in ["ok", "failed"] {
        metrics::counter!("optout_reconcile_runs_total", "outcome" => outcome).absolute(0);
    }
    metrics::counter!("optout_reviews_total").absolute(0);
    for sink in sinks {
        for outcome in DELIVERY_OUTCOMES {
            metrics::counter!("optout_deliveries_total", "sink" => (*sink).to_owned(), "outcome" => *outcome)
                .increment(0);
        }
        metrics::counter!("optout_delivery_attempts_total", "sink" => (*sink).to_owned()).increment(0);
    }
}

/// A supervised task started: its panic counter shows 0 until it panics.
pub fn task_started(task: &str) {
    metrics::counter!("optout_task_panics_total", "task" => task.to_owned()).increment(0);
}

pub fn webhook(outcome: &'static str) {
    metrics::counter!("optout_webhooks_total", "outcome" => outcome).increment(1);
}

/// Event Streams deliveries, per CloudEvent (a refusal of a whole delivery
/// once), under the webhook's metric and outcome words with
/// `channel="event_streams"`, so one query sees both ways in.
pub fn event_stream(outcome: &'static str) {
    metrics::counter!("optout_webhooks_total", "outcome" => outcome, "channel" => "event_streams").increment(1);
}

pub fn event(kind: &'static str) {
    metrics::counter!("optout_events_total", "kind" => kind).increment(1);
}

/// Rows settled by outcome: `written`, `unchanged`, `skipped` (nothing the sink
/// can take, e.g. no vanId), `uncertain`, `failed`, `dead`.
pub fn delivery(sink: &str, outcome: &'static str, n: u64) {
    metrics::counter!("optout_deliveries_total", "sink" => sink.to_owned(), "outcome" => outcome).increment(n);
}

pub fn attempts(sink: &str, n: u64) {
    metrics::counter!("optout_delivery_attempts_total", "sink" => sink.to_owned()).increment(n);
}

pub fn sink_call(sink: &str, call: &'static str, seconds: f64) {
    metrics::histogram!("optout_sink_call_duration_seconds", "sink" => sink.to_owned(), "call" => call).record(seconds);
}

pub fn webhook_latency(seconds: f64) {
    metrics::histogram!("optout_webhook_duration_seconds").record(seconds);
}

pub fn queue(sink: &str, pending: i64, oldest_age_seconds: f64, dead: i64) {
    let sink = sink.to_owned();
    metrics::gauge!("optout_pending_deliveries", "sink" => sink.clone()).set(pending as f64);
    metrics::gauge!("optout_oldest_pending_delivery_age_seconds", "sink" => sink.clone()).set(oldest_age_seconds);
    metrics::gauge!("optout_dead_deliveries", "sink" => sink).set(dead as f64);
}

/// Changes not yet fanned out (read from the store at each scrape).
/// Seconds a relay task waited for a burst of webhooks to pass.
pub fn relay_yield(seconds: f64) {
    metrics::histogram!("optout_relay_yield_seconds").record(seconds);
}

pub fn changes_waiting(n: i64) {
    metrics::gauge!("optout_changes_waiting").set(n as f64);
}

/// A sink's health: 1 while it works, and how long its current run of
/// failures has lasted (0 while it works).
pub fn sink_health(sink: &str, ok: bool, failing_seconds: f64) {
    let sink = sink.to_owned();
    metrics::gauge!("optout_sink_up", "sink" => sink.clone()).set(if ok { 1.0 } else { 0.0 });
    metrics::gauge!("optout_sink_failing_seconds", "sink" => sink).set(failing_seconds);
}

/// Whether the queue gauges were refreshed at this scrape; on success also
/// stamps the time, so a stale reading can be told from a quiet queue.
pub fn queue_stats_read(ok: bool) {
    metrics::gauge!("optout_queue_stats_up").set(if ok { 1.0 } else { 0.0 });
    if ok {
        let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
        metrics::gauge!("optout_queue_stats_last_success_timestamp_seconds").set(now);
    }
}

pub fn task_panic(task: &str) {
    metrics::counter!("optout_task_panics_total", "task" => task.to_owned()).increment(1);
}

/// An event found in Twilio's message log that no endpoint had delivered.
pub fn reconcile_missed(kind: &'static str) {
    metrics::counter!("optout_reconcile_missed_total", "kind" => kind).increment(1);
}

/// A periodic reconciliation run ended: `ok` or `failed`.
pub fn reconcile_run(outcome: &'static str) {
    metrics::counter!("optout_reconcile_runs_total", "outcome" => outcome).increment(1);
}

/// A review item was created.
pub fn review_created() {
    metrics::counter!("optout_reviews_total").increment(1);
}

/// Pending review items and the age of the oldest (read from the store at each scrape).
pub fn reviews(pending: i64, oldest_age_seconds: f64) {
    metrics::gauge!("optout_reviews_pending").set(pending as f64);
    metrics::gauge!("optout_oldest_pending_review_age_seconds").set(oldest_age_seconds);
}
