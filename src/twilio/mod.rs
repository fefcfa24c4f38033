//! Everything that knows Twilio: the signature, the inbound form, keywords.

pub mod keywords;
pub mod signature;
pub mod webhook;
