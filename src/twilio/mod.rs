//! Everything that knows Twilio: the signature, the inbound form, Event
//! Streams' CloudEvents, keywords.

pub mod events;
pub mod keywords;
pub mod messages;
pub mod signature;
pub mod webhook;
