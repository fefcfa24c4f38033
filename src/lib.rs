//! optout-relay: makes sure a person who texts STOP is never texted again by
//! anyone in the organisation.
//!
//! The path of a webhook reads as the module list: `http` (router, handlers,
//! error mapping) → `twilio` (signature, form, keywords) → `store` (events,
//! state, delivery queue) → `relay` (workers, retry policy, ordering) →
//! `sinks` (REDCap, …). `startup` builds the whole application in one place;
//! `supervise` restarts the background loops it starts if they panic.

pub mod config;
pub mod domain;
pub mod http;
pub mod lists;
pub mod metrics;
pub mod ops;
pub mod reconcile;
pub mod relay;
pub mod sinks;
pub mod startup;
pub mod store;
pub mod supervise;
pub mod telemetry;
pub mod twilio;
pub mod van_mapping;

/// reqwest is built with rustls but without a default crypto provider (ring
/// instead of aws-lc: no C build, smaller binary), so one is installed before
/// any client is built. Idempotent.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
