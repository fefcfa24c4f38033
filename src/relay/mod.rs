//! The delivery engine: workers that claim due deliveries and apply them to sinks.
