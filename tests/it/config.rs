//! Configuration layers: file, DATABASE_URL, OPTOUT_RELAY__ environment.

use std::path::Path;
use std::process::Command;

use optout_relay::config::{Config, SinkConfig};
use secrecy::ExposeSecret;

/// Set in the child process that runs an environment test.
const CHILD: &str = "OPTOUT_RELAY_TEST_ENV_CHILD";

/// The environment is process-wide and this binary's other tests run on
/// other threads, some of them loading configuration: a test that sets
/// variables re-runs itself alone in a child process, where doing so disturbs
/// nobody. True in that child (go on), false in the parent (done: the child
/// passed).
fn in_child(test: &str) -> bool {
    if std::env::var_os(CHILD).is_some() {
        return true;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([&format!("config::{test}"), "--exact", "--test-threads=1"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "the child ran no test:\n{text}");
    false
}

#[test]
fn example_file_and_environment_layers() {
    if !in_child("example_file_and_environment_layers") {
        return;
    }
    // The documented example parses, and nothing in it is a problem.
    let example = Config::load(Some(Path::new("config.example.toml"))).expect("config.example.toml parses");
    assert_eq!(example.problems(), Vec::<String>::new());
    assert_eq!(example.server.public_url.as_deref(), Some("https://optout.example.org"));
    assert!(example.redcap.is_none());
    assert!(example.sinks().is_empty(), "the sinks are commented out");
    assert!(example.relay.retry_cap <= std::time::Duration::from_secs(15));

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
    let names: Vec<String> = c.sinks().into_iter().map(|(name, _)| name).collect();
    assert_eq!(names, ["redcap"]);
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

/// The commented-out sink tables of the example, uncommented, load: the keys
/// it documents exist, and only the tokens (left for the environment) are missing.
#[test]
fn example_sink_tables_load_when_uncommented() {
    let is_key = |k: &str| !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    let example = std::fs::read_to_string("config.example.toml").unwrap();
    let sinks_at = example.find("# Sinks:").expect("the sinks' part of the example");
    let (head, sinks_part) = example.split_at(sinks_at);
    let uncommented: String = head.to_owned()
        + &sinks_part
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest) if rest.starts_with('[') => rest,
                Some(rest) if rest.split_once(" = ").is_some_and(|(key, _)| is_key(key)) => rest,
                _ => line,
            })
            .map(|line| format!("{line}\n"))
            .collect::<String>();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("uncommented.toml");
    std::fs::write(&file, uncommented).unwrap();
    let c = Config::load(Some(&file)).expect("the uncommented example parses");
    let sinks: Vec<(String, &str)> = c.sinks().iter().map(|(n, s)| (n.clone(), s.kind())).collect();
    assert_eq!(
        sinks,
        [
            ("crm".to_owned(), "webhook"),
            ("email".to_owned(), "email"),
            ("redcap".to_owned(), "redcap"),
            ("study_b".to_owned(), "redcap"),
            ("van_state".to_owned(), "everyaction")
        ]
    );
    let SinkConfig::Redcap(b) = &c.sinks()[3].1 else { unreachable!() };
    assert_eq!(b.scopes.as_ref().map(Vec::len), Some(2));
    // Only the secrets, left for the environment, are missing.
    let problems: Vec<String> = c
        .problems()
        .into_iter()
        .filter(|p| {
            !p.contains("password")
                && !p.contains("token is empty")
                && !p.contains("api_key is empty")
                && !p.contains("secret is empty")
        })
        .collect();
    assert_eq!(problems, Vec::<String>::new());
}

/// `OPTOUT_RELAY__SINKS__NAME__KEY` reaches a named sink (figment lowercases
/// the name), alone or on top of the file's table; the shorthand's token too.
#[test]
fn sink_secrets_from_the_environment() {
    if !in_child("sink_secrets_from_the_environment") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sinks.toml");
    let project =
        "url = \"https://redcap.example.edu/api/\"\nphone_field = \"phone\"\noptout_field = \"opted_out_at\"\n";
    std::fs::write(
        &file,
        format!("[redcap]\n{project}\n[sinks.study_a]\ntype = \"redcap\"\n{project}scopes = [\"MG1\"]\n"),
    )
    .unwrap();
    // No token in the file: it loads, and the problem names the variable to set.
    let problems = Config::load(Some(&file)).expect("loads").problems();
    assert!(problems.iter().any(|p| p.contains("OPTOUT_RELAY__SINKS__STUDY_A__TOKEN")), "{problems:?}");

    std::env::set_var("OPTOUT_RELAY__REDCAP__TOKEN", "SHORTHANDTOKEN0123456789ABCDEF00");
    std::env::set_var("OPTOUT_RELAY__SINKS__STUDY_A__TOKEN", "STUDYATOKEN0123456789ABCDEF00000");
    // A sink the environment alone defines, scopes quoted to keep their +.
    std::env::set_var("OPTOUT_RELAY__SINKS__STUDY_B__TYPE", "redcap");
    std::env::set_var("OPTOUT_RELAY__SINKS__STUDY_B__URL", "https://redcap.example.edu/api/");
    std::env::set_var("OPTOUT_RELAY__SINKS__STUDY_B__TOKEN", "STUDYBTOKEN0123456789ABCDEF00000");
    std::env::set_var("OPTOUT_RELAY__SINKS__STUDY_B__PHONE_FIELD", "mobile");
    std::env::set_var("OPTOUT_RELAY__SINKS__STUDY_B__OPTOUT_FIELD", "stop_at");
    std::env::set_var("OPTOUT_RELAY__SINKS__STUDY_B__SCOPES", r#"["+14155550100", MG2]"#);
    let c = Config::load(Some(&file)).unwrap();
    assert_eq!(c.problems(), Vec::<String>::new());
    let sinks = c.sinks();
    let tokens: Vec<(&str, &str)> = sinks
        .iter()
        .map(|(name, sink)| match sink {
            SinkConfig::Redcap(r) => (name.as_str(), r.token.expose_secret()),
            other => panic!("{name} is not {}", other.kind()),
        })
        .collect();
    assert_eq!(
        tokens,
        [
            ("redcap", "SHORTHANDTOKEN0123456789ABCDEF00"),
            ("study_a", "STUDYATOKEN0123456789ABCDEF00000"),
            ("study_b", "STUDYBTOKEN0123456789ABCDEF00000"),
        ]
    );
    assert_eq!(sinks[1].1.scopes(), Some(&["MG1".to_owned()][..]), "the file's keys stay");
    assert_eq!(sinks[2].1.scopes(), Some(&["+14155550100".to_owned(), "MG2".to_owned()][..]));

    // Unquoted, a To number is read as a number: refused, not stripped of its +.
    std::env::set_var("OPTOUT_RELAY__SINKS__STUDY_B__SCOPES", "+14155550100");
    let err = Config::load(Some(&file)).unwrap_err().to_string();
    assert!(err.contains("14155550100") && err.contains("quote"), "{err}");
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

/// `.env.example` and the README name the same keys and values, every
/// variable either of them names is a key the service reads, and `--help`
/// says where configuration and the database come from.
#[test]
fn env_example_readme_and_help_agree() {
    if !in_child("env_example_readme_and_help_agree") {
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let example = std::fs::read_to_string(Path::new(root).join(".env.example")).unwrap();
    let readme = std::fs::read_to_string(Path::new(root).join("README.md")).unwrap();
    // Every variable, set or commented out, with its example value.
    let mut vars = Vec::new();
    for line in example.lines() {
        let line = line.trim_start_matches('#').trim();
        if let Some((name, value)) = line.split_once('=') {
            if name.starts_with("OPTOUT_RELAY__") && !name.contains(' ') {
                vars.push((name.to_owned(), value.to_owned()));
            }
        }
    }
    assert!(vars.len() > 20, "{vars:?}");
    let value_of = |name: &str| vars.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()).unwrap();
    for key in ["phone_field", "optout_field"] {
        let value = value_of(&format!("OPTOUT_RELAY__REDCAP__{}", key.to_uppercase()));
        assert!(
            readme.contains(&format!("{key} = \"{value}\"")),
            "README's [redcap] example has another {key} than {value}"
        );
    }
    // The README's variables, bar the patterns (SECTION__KEY, NAME).
    let mut named: Vec<String> = readme
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("OPTOUT_RELAY__") && !w.contains("SECTION") && !w.contains("__NAME__"))
        .map(str::to_owned)
        .collect();
    named.sort();
    named.dedup();
    for (name, value) in &vars {
        std::env::set_var(name, value);
    }
    for name in named.iter().filter(|n| std::env::var_os(n).is_none()) {
        std::env::set_var(name, "x");
    }
    let problems = match Config::load_all(None) {
        Ok(_) => Vec::new(),
        Err(u) => u.problems,
    };
    let unknown: Vec<&String> = problems.iter().filter(|p| p.contains("is not a key")).collect();
    assert!(unknown.is_empty(), "variables naming no key: {unknown:#?}");

    let help = Command::new(env!("CARGO_BIN_EXE_optout-relay")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for needle in [
        "OPTOUT_RELAY_CONFIG",
        "OPTOUT_RELAY__SECTION__KEY",
        "DATABASE_URL",
        "optout-relay.db in the working directory",
        "RUST_LOG",
    ] {
        assert!(help.contains(needle), "{needle} missing from --help:\n{help}");
    }
}

/// SECURITY.md names real keys and states their real defaults.
#[test]
fn security_md_names_real_keys_with_their_defaults() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let security = std::fs::read_to_string(root.join("SECURITY.md")).unwrap();
    let example = std::fs::read_to_string(root.join("config.example.toml")).unwrap();
    let sections = ["server", "database", "twilio", "keywords", "relay", "log", "admin"];
    let mut keys = Vec::new();
    for quoted in security.split('`').skip(1).step_by(2) {
        let Some((section, key)) = quoted.split_once('.') else { continue };
        if sections.contains(&section) && key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            keys.push((section, key));
        }
    }
    assert!(keys.len() >= 8, "{keys:?}");
    for (section, key) in keys {
        let start = example.find(&format!("\n[{section}]")).unwrap_or_else(|| panic!("[{section}] in the example"));
        let table = &example[start + 1..];
        let table = &table[..table[1..].find("\n[").map_or(table.len(), |i| i + 1)];
        assert!(
            table.lines().any(|l| l.trim_start_matches('#').trim_start().starts_with(&format!("{key} ")))
                || example.contains(&format!("[{section}.{key}]")),
            "SECURITY.md names {section}.{key}, which config.example.toml's [{section}] does not have"
        );
    }
    let d = Config::default();
    let redcap = optout_relay::config::RedcapConfig::new("https://r/api/", "t".to_owned().into(), "p", "o");
    for (key, default) in [
        ("`server.max_body_bytes`", format!("{} KiB", d.server.max_body_bytes / 1024)),
        ("`database.acquire_timeout`", format!("{} s", d.database.acquire_timeout.as_secs())),
        ("`server.shutdown_grace`", format!("{} s", d.server.shutdown_grace.as_secs())),
        ("`request_timeout` of the sink", format!("{} s", redcap.request_timeout.as_secs())),
        ("`max_calls_per_minute` of the sink", redcap.max_calls_per_minute.to_string()),
    ] {
        let row = security.lines().find(|l| l.contains(key)).unwrap_or_else(|| panic!("{key} in SECURITY.md"));
        assert!(row.contains(&format!("| {default} |")), "{key}: default {default} in {row}");
    }
}
