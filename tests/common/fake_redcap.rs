//! Only so `examples/relay_bench.rs`, which includes this path, keeps
//! building: the fake lives with the integration tests in
//! `tests/it/common/fake_redcap.rs`. Delete this file once the example's
//! `#[path]` points there.

#[path = "../it/common/fake_redcap.rs"]
mod fake;

pub use fake::*;
