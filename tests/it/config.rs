//! Configuration layers: file, DATABASE_URL, OPTOUT_RELAY__ environment.

use std::path::Path;
use std::process::Command;

use optout_relay::config::Config;
use secrecy::ExposeSecret;

/// Set in the child process that runs the environment test.
const CHILD: &str = "OPTOUT_RELAY_TEST_ENV_CHILD";

/// The environment is process-wide and this binary's other tests run on
/// other threads, some of them loading configuration: the test re-runs
/// itself alone in a child process, where setting variables disturbs nobody.
#[test]
fn example_file_and_environment_layers() {
    if std::env::var_os(CHILD).is_none() {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["config::example_file_and_environment_layers", "--exact", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "the child ran no test:\n{text}");
        return;
    }
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

/// `email.ca_file` problems, from a config file (no environment is set here;
/// only this key's lines are looked at, as the test above may be setting
/// variables at the same time).
fn ca_file_problems(dir: &Path, tls: &str, ca_file: &Path) -> Vec<String> {
    let file = dir.join(format!("email-{tls}.toml"));
    let text = format!(
        "[email]\nsmtp_host = \"smtp.example.org\"\ntls = \"{tls}\"\nfrom = \"relay@example.org\"\nto = \"ops@example.org\"\nca_file = {:?}\n",
        ca_file.display().to_string()
    );
    std::fs::write(&file, text).unwrap();
    let config = Config::load(Some(&file)).expect("parses");
    assert_eq!(config.email.as_ref().unwrap().ca_file.as_deref(), Some(ca_file));
    config.problems().into_iter().filter(|p| p.contains("email.ca_file")).collect()
}

#[test]
fn email_ca_file_must_be_a_pem_certificate_used_with_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("ca.pem");
    let certificate = rcgen::generate_simple_self_signed(vec!["smtp.example.org".to_owned()]).unwrap();
    std::fs::write(&pem, certificate.cert.pem()).unwrap();
    assert_eq!(ca_file_problems(dir.path(), "starttls", &pem), Vec::<String>::new());
    assert_eq!(ca_file_problems(dir.path(), "tls", &pem), Vec::<String>::new());

    let problems = ca_file_problems(dir.path(), "none", &pem);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("email.tls"), "{problems:?}");

    let problems = ca_file_problems(dir.path(), "starttls", &dir.path().join("missing.pem"));
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("missing.pem"), "{problems:?}");

    let not_pem = dir.path().join("key.txt");
    std::fs::write(&not_pem, "just text").unwrap();
    let problems = ca_file_problems(dir.path(), "starttls", &not_pem);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("no PEM certificate"), "{problems:?}");
}
