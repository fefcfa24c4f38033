//! Configuration layers: file, DATABASE_URL, OPTOUT_RELAY__ environment.
//! One test function, because the environment is process-wide.

use std::path::Path;

use optout_relay::config::Config;
use secrecy::ExposeSecret;

#[test]
fn example_file_and_environment_layers() {
    // The documented example parses, and nothing in it is a problem.
    let example = Config::load(Some(Path::new("config.example.toml"))).expect("config.example.toml parses");
    assert_eq!(example.problems(), Vec::<String>::new());
    assert_eq!(example.server.public_url.as_deref(), Some("https://optout.example.org"));
    assert!(example.redcap.is_none());

    // Built-in defaults with no file.
    let d = Config::default();
    assert_eq!(d.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(d.server.max_body_bytes, 65536);
    assert_eq!(d.database.url.expose_secret(), "sqlite://optout-relay.db?mode=rwc");
    assert!(d.twilio.validate_signatures);
    assert!(d.keywords.opt_out.iter().any(|k| k == "REVOKE"));

    // Environment beats the file; DATABASE_URL is honoured; a numeric token stays text.
    std::env::set_var("DATABASE_URL", "postgres://u@127.0.0.1/db1");
    std::env::set_var("OPTOUT_RELAY__TWILIO__AUTH_TOKENS", "12345");
    std::env::set_var("OPTOUT_RELAY__SERVER__MAX_BODY_BYTES", "2048");
    std::env::set_var("OPTOUT_RELAY__REDCAP__URL", "https://redcap.example.edu/api/");
    std::env::set_var("OPTOUT_RELAY__REDCAP__TOKEN", "0123456789ABCDEF0123456789ABCDEF");
    std::env::set_var("OPTOUT_RELAY__REDCAP__PHONE_FIELD", "phone");
    std::env::set_var("OPTOUT_RELAY__REDCAP__OPTOUT_FIELD", "opted_out_at");
    let c = Config::load(Some(Path::new("config.example.toml"))).unwrap();
    assert_eq!(c.database.url.expose_secret(), "postgres://u@127.0.0.1/db1");
    assert_eq!(c.twilio.auth_tokens.len(), 1);
    assert_eq!(c.twilio.auth_tokens[0].expose_secret(), "12345");
    assert_eq!(c.server.max_body_bytes, 2048);
    let r = c.redcap.as_ref().expect("redcap section from the environment");
    assert_eq!(r.max_calls_per_minute, 300);
    assert_eq!(r.timezone, "UTC");
    assert_eq!(c.sink_names(), vec!["redcap"]);
    // Secrets never show in a Debug print.
    let debug = format!("{c:?}");
    assert!(!debug.contains("0123456789ABCDEF0123456789ABCDEF") && !debug.contains("12345\""), "{debug}");

    std::env::set_var("OPTOUT_RELAY__DATABASE__URL", "postgres://u@127.0.0.1/db2");
    std::env::set_var("OPTOUT_RELAY__TWILIO__AUTH_TOKENS", "[tokenA, tokenB]");
    let c = Config::load(None).unwrap();
    assert_eq!(
        c.database.url.expose_secret(),
        "postgres://u@127.0.0.1/db2",
        "prefixed variable wins over DATABASE_URL"
    );
    assert_eq!(c.twilio.auth_tokens.len(), 2);

    // Bad values are reported all at once.
    std::env::set_var("OPTOUT_RELAY__REDCAP__TIMEZONE", "Mars/Olympus");
    std::env::set_var("OPTOUT_RELAY__REDCAP__MAX_CALLS_PER_MINUTE", "1000");
    let problems = Config::load(None).unwrap().problems();
    assert!(problems.iter().any(|p| p.contains("redcap.timezone")), "{problems:?}");
    assert!(problems.iter().any(|p| p.contains("max_calls_per_minute")), "{problems:?}");

    // A missing --config file is an error, not a silent default.
    assert!(Config::load(Some(Path::new("/nonexistent/optout-relay.toml"))).is_err());
}
