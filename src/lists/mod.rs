//! Lists: an opt-out list in (`import`), the suppression list out
//! (`export`), a campaign's numbers checked before it goes out (`check`).
//! The command line and the admin API both call these, so they answer alike.
//! `read` is the pure part: CSV headers, dates and line numbers.

pub mod check;
pub mod export;
pub mod import;
pub mod read;
