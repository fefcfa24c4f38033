//! Systems of record that learn about opt-outs.

pub mod redcap;
