//! The integration tests, as one binary: one link of the whole stack instead
//! of one per file. Each module is an area of the specification; `common`
//! builds the app the way `serve` does and holds the in-process fakes of
//! REDCap and SMTP.

mod common;

mod admin;
mod binary;
mod config;
mod converge;
mod email_sink;
mod event_streams;
mod hostile;
mod ingest;
mod lists;
mod reconcile;
mod redcap_sink;
mod relay;
mod reviews;
mod shutdown;
mod store;
mod supervise;
mod van_sink;
mod webhook_sink;
