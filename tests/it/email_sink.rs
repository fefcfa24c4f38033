//! The email sink against the in-process fake SMTP server: what the captured
//! messages say, to whom, over which kind of connection, and how failures
//! are classified. The sink knows nothing of the store, so each test hands
//! it a `Notification` or `Alert` as the relay would.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use crate::common::fake_smtp::{FakeSmtp, Fault, Received};
use crate::common::SERVICE;
use optout_relay::config::{EmailConfig, EmailTls};
use optout_relay::domain::Phone;
use optout_relay::sinks::email::EmailSink;
use optout_relay::sinks::{Alert, Cause, Notification, ReportOutcome, SinkError, SinkReport, Target};
use secrecy::SecretString;
use serde_json::{json, Value};

const PHONE: &str = "+14155550101";

fn config(port: u16, edit: impl FnOnce(&mut EmailConfig)) -> EmailConfig {
    let mut c = EmailConfig {
        smtp_host: "127.0.0.1".into(),
        smtp_port: Some(port),
        tls: EmailTls::None,
        username: None,
        password: None,
        from: "Opt-out relay <relay@example.org>".into(),
        to: vec!["ops@example.org".into(), "Study Team <irb@example.edu>".into()],
        timezone: "America/New_York".into(),
        timeout: Duration::from_secs(5),
        ca_file: None,
        ..EmailConfig::new("127.0.0.1", "relay@example.org", vec![])
    };
    edit(&mut c);
    c
}

fn sink(cfg: &EmailConfig) -> EmailSink {
    EmailSink::new(cfg).expect("email sink builds")
}

/// 2026-11-23 14:15:07 UTC = 09:15:07 in New York (EST, UTC-5).
fn november() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 14, 15, 7).unwrap()
}

fn texted(body: &str, at: DateTime<Utc>) -> Cause {
    Cause { body: body.into(), scope: SERVICE.into(), source: "twilio".into(), said_at: at }
}

/// `phone` texted STOP in November; REDCap did `redcap` (no other sink when None).
fn opt_out(phone: &str, redcap: Option<ReportOutcome>) -> Notification {
    Notification {
        phone: Phone::from_stored(phone.into()),
        target: Target::OptedOut { since: november() },
        cause: Some(texted("STOP", november())),
        others: redcap.into_iter().map(|outcome| SinkReport { sink: "redcap".into(), outcome }).collect(),
    }
}

fn applied(detail: Value) -> ReportOutcome {
    ReportOutcome::Applied { at: november() + chrono::Duration::seconds(2), detail: Some(detail) }
}

/// The one message captured, with the checks every message passes.
fn only_message(fake: &FakeSmtp) -> Received {
    let messages = fake.messages();
    assert_eq!(messages.len(), 1, "{messages:#?}");
    let m = messages.into_iter().next().unwrap();
    assert_eq!(m.from, "relay@example.org");
    assert_eq!(m.to, vec!["ops@example.org".to_owned(), "irb@example.edu".to_owned()]);
    let to = m.header("To").unwrap();
    assert!(to.contains("ops@example.org") && to.contains("irb@example.edu"), "{to}");
    assert!(m.header("From").unwrap().contains("relay@example.org"));
    assert_eq!(m.header("Auto-Submitted").as_deref(), Some("auto-generated"));
    assert!(m.header("Content-Type").unwrap().starts_with("text/plain"));
    m
}

fn headers(m: &Received) -> &str {
    m.data.split("\r\n\r\n").next().unwrap()
}

fn transient<T: std::fmt::Debug>(r: &Result<T, SinkError>) -> bool {
    matches!(r, Err(SinkError::Transient { .. }))
}

fn misconfigured<T: std::fmt::Debug>(r: &Result<T, SinkError>) -> bool {
    matches!(r, Err(SinkError::Misconfigured(_)))
}

#[tokio::test]
async fn opt_out_with_records_written_sends_one_message_to_every_recipient() {
    let fake = FakeSmtp::start().await;
    let mut n = opt_out(PHONE, Some(applied(json!({"records": ["1", "7"], "written": ["7"]}))));
    n.cause = Some(texted("Stop", november()));

    let value = sink(&config(fake.port(), |_| {})).notify(&n).await.expect("sent");

    assert_eq!(value["sent_to"], json!(["ops@example.org", "irb@example.edu"]));
    let m = only_message(&fake);
    assert_eq!(m.header("Message-ID").as_deref(), value["message_id"].as_str());
    assert!(value["smtp_reply"].as_str().unwrap().starts_with("250 "), "{value}");
    assert_eq!(m.header("Subject").as_deref(), Some("Opt-out: +1415***0101 texted STOP"));
    let body = m.body();
    assert!(body.starts_with("+14155550101 opted out of text messages (texted STOP).\n"), "{body}");
    assert!(body.contains("Since:    2026-11-23 09:15:07 EST (2026-11-23 14:15:07 UTC)\n"), "{body}");
    assert!(body.contains("Phone:    +14155550101\n"), "{body}");
    assert!(body.contains(&format!("Scope:    Messaging Service {SERVICE}\n")), "{body}");
    assert!(body.contains("Message:  \"Stop\"\n"), "{body}");
    assert!(body.contains("  - REDCap: done at 2026-11-23 09:15:09 EST (2026-11-23 14:15:09 UTC).\n"), "{body}");
    assert!(body.contains("      Records with this number: 1, 7\n      Written: 7\n"), "{body}");
    // The full number is in the body only, never in a header.
    assert!(!headers(&m).contains("5550101"), "headers leak the number");
}

#[tokio::test]
async fn opt_in_says_opted_back_in_in_summer_time() {
    let fake = FakeSmtp::start().await;
    let july = Utc.with_ymd_and_hms(2026, 7, 4, 12, 0, 0).unwrap();
    let n = Notification {
        phone: Phone::from_stored(PHONE.into()),
        target: Target::OptedIn,
        cause: Some(texted("START", july)),
        others: vec![SinkReport {
            sink: "redcap".into(),
            outcome: applied(json!({"records": ["7"], "written": ["7"]})),
        }],
    };

    sink(&config(fake.port(), |_| {})).notify(&n).await.expect("sent");

    let m = only_message(&fake);
    assert_eq!(m.header("Subject").as_deref(), Some("Opt-in: +1415***0101 texted START"));
    let body = m.body();
    assert!(body.starts_with("+14155550101 opted back in to text messages (texted START).\n"), "{body}");
    assert!(body.contains("When:     2026-07-04 08:00:00 EDT (2026-07-04 12:00:00 UTC)\n"), "{body}");
    assert!(body.contains("Message:  \"START\"\n"), "{body}");
    assert!(body.contains("      Written: 7\n"), "{body}");
}

#[tokio::test]
async fn no_record_matched_is_reported_not_silent() {
    let fake = FakeSmtp::start().await;
    let mut n = opt_out(PHONE, Some(applied(json!({"records": [], "written": []}))));
    n.cause = Some(texted("Stop ça 🛑", november()));

    sink(&config(fake.port(), |_| {})).notify(&n).await.expect("sent");

    let body = only_message(&fake).body();
    assert!(body.contains("      No record has this phone number.\n"), "{body}");
    assert!(!body.contains("Written"), "{body}");
    // Non-ASCII text arrives intact through the transfer encoding.
    assert!(body.contains("Message:  \"Stop ça 🛑\"\n"), "{body}");
}

#[tokio::test]
async fn a_sink_that_gave_up_is_reported_as_failed_with_what_to_do() {
    let fake = FakeSmtp::start().await;
    let error = "REDCap answered 403: You do not have API rights".to_owned();
    let n = opt_out(PHONE, Some(ReportOutcome::GaveUp { error }));

    sink(&config(fake.port(), |_| {})).notify(&n).await.expect("sent");

    let m = only_message(&fake);
    assert_eq!(m.header("Subject").as_deref(), Some("Opt-out: +1415***0101 texted STOP - REDCap delivery FAILED"));
    let body = m.body();
    assert!(
        body.contains(
            "  - REDCap delivery FAILED: REDCap answered 403: You do not have API rights - the relay gave up; an operator must act.\n"
        ),
        "{body}"
    );
}

#[tokio::test]
async fn a_sink_still_trying_is_reported_with_its_last_error() {
    let fake = FakeSmtp::start().await;
    let since = november() + chrono::Duration::minutes(1);
    let n = opt_out(PHONE, Some(ReportOutcome::Waiting { since, error: Some("REDCap timed out after 30s".into()) }));

    sink(&config(fake.port(), |c| c.timezone = "UTC".into())).notify(&n).await.expect("sent");

    let m = only_message(&fake);
    assert_eq!(m.header("Subject").as_deref(), Some("Opt-out: +1415***0101 texted STOP - REDCap delivery waiting"));
    assert!(
        m.body().contains(
            "  - REDCap delivery waiting: not done yet, trying since 2026-11-23 14:16:07 UTC. Last error: REDCap timed out after 30s\n"
        ),
        "{}",
        m.body()
    );
}

#[tokio::test]
async fn without_other_sinks_the_change_was_recorded_only() {
    let fake = FakeSmtp::start().await;

    sink(&config(fake.port(), |c| c.timezone = "UTC".into())).notify(&opt_out(PHONE, None)).await.expect("sent");

    let body = only_message(&fake).body();
    assert!(body.contains("the change was recorded only; no other system (such as REDCap) is configured"), "{body}");
    assert!(body.contains("Since:    2026-11-23 14:15:07 UTC\n"), "{body}");
}

#[tokio::test]
async fn a_staff_change_says_who_made_it() {
    let fake = FakeSmtp::start().await;
    let mut n = opt_out(PHONE, None);
    n.cause = Some(Cause {
        body: "asked by phone".into(),
        scope: "organisation".into(),
        source: "staff:alice".into(),
        said_at: november(),
    });

    sink(&config(fake.port(), |_| {})).notify(&n).await.expect("sent");

    let m = only_message(&fake);
    assert_eq!(m.header("Subject").as_deref(), Some("Opt-out: +1415***0101 recorded by staff"));
    let body = m.body();
    assert!(body.starts_with("+14155550101 was opted out of text messages by staff (alice).\n"), "{body}");
    assert!(body.contains("Note:     \"asked by phone\"\n"), "{body}");
}

#[tokio::test]
async fn an_alert_and_its_recovery_reach_every_recipient() {
    let fake = FakeSmtp::start().await;
    let email = sink(&config(fake.port(), |_| {}));
    let mut a = Alert {
        sink: "redcap".into(),
        failing_since: november(),
        error: "cannot reach REDCap: connection refused".into(),
        waiting: 20,
        recovered: false,
    };

    email.alert(&a).await.expect("alert sent");

    let m = only_message(&fake);
    let subject = m.header("Subject").unwrap();
    assert!(subject.starts_with("[optout-relay] ALERT"), "{subject}");
    assert!(subject.contains("redcap") && subject.contains("20 phones waiting"), "{subject}");
    let body = m.body();
    assert!(
        body.starts_with(
            "Sink redcap has been failing since 2026-11-23 09:15:07 EST (2026-11-23 14:15:07 UTC) (20 phones waiting): cannot reach REDCap: connection refused.\n"
        ),
        "{body}"
    );
    assert!(body.contains("the FCC's 10-business-day deadline is at risk"), "{body}");

    a.recovered = true;
    email.alert(&a).await.expect("recovery sent");
    let messages = fake.messages();
    assert_eq!(messages.len(), 2);
    let subject = messages[1].header("Subject").unwrap();
    assert!(subject.starts_with("[optout-relay] recovered"), "{subject}");
    assert!(messages[1].body().starts_with("Sink redcap works again (failing since 2026-11-23 09:15:07 EST"));
    assert_eq!(messages[1].header("Auto-Submitted").as_deref(), Some("auto-generated"));
}

#[tokio::test]
async fn logs_in_with_username_and_password() {
    let fake = FakeSmtp::start_with_auth("relay-user", "pa55 w0rd").await;
    let cfg = config(fake.port(), |c| {
        c.username = Some("relay-user".into());
        c.password = Some(SecretString::from("pa55 w0rd"));
    });
    let email = sink(&cfg);

    // PLAIN when offered…
    email.notify(&opt_out(PHONE, None)).await.expect("sent with PLAIN");
    // …and LOGIN on a new connection to a server that only offers LOGIN.
    fake.advertise_auth(&["LOGIN"]);
    fake.set_fault(Fault::Down).await;
    fake.set_fault(Fault::None).await;
    email.notify(&opt_out("+14155550102", None)).await.expect("sent with LOGIN");

    let messages = fake.messages();
    assert_eq!(messages.len(), 2);
    assert!(messages.iter().all(|m| m.auth_user.as_deref() == Some("relay-user")));
    let mechanisms: Vec<Option<&str>> = messages.iter().map(|m| m.auth_mechanism.as_deref()).collect();
    assert_eq!(mechanisms, vec![Some("PLAIN"), Some("LOGIN")]);
    assert_eq!(fake.auth_attempts(), 2);
}

#[tokio::test]
async fn wrong_password_is_misconfigured_and_never_shows_the_password() {
    let fake = FakeSmtp::start_with_auth("relay-user", "right").await;
    // The server repeats what it was sent in its refusal: the sink must not pass it on.
    fake.echo_credentials_on_refusal();
    let cfg = config(fake.port(), |c| {
        c.username = Some("relay-user".into());
        c.password = Some(SecretString::from("wrong-Secret"));
    });
    let email = sink(&cfg);

    let sent = email.notify(&opt_out(PHONE, None)).await;
    let alert =
        Alert { sink: "redcap".into(), failing_since: november(), error: "e".into(), waiting: 1, recovered: false };
    let alerted = email.alert(&alert).await;

    assert!(misconfigured(&sent), "{sent:?}");
    assert!(misconfigured(&alerted), "{alerted:?}");
    for text in [format!("{sent:?}"), format!("{alerted:?}")] {
        assert!(text.contains("535"), "{text}");
        assert!(text.contains("email.password"), "{text}");
        assert!(text.contains("[REDACTED]"), "the echo was there to be scrubbed: {text}");
        assert!(!text.contains("wrong-Secret"), "{text}");
        assert!(!text.contains("d3JvbmctU2VjcmV0"), "base64 of the password: {text}");
    }
    // One login per message, never retried inside the sink (servers lock accounts out).
    assert_eq!(fake.auth_attempts(), 2);
    assert!(fake.messages().is_empty());
}

#[tokio::test]
async fn temporary_refusal_is_transient() {
    let fake = FakeSmtp::start().await;
    fake.set_fault(Fault::RcptTransient).await;

    let out = sink(&config(fake.port(), |_| {})).notify(&opt_out(PHONE, None)).await;

    assert!(transient(&out), "{out:?}");
    assert!(format!("{out:?}").contains("451"), "{out:?}");
    assert!(fake.messages().is_empty());
}

#[tokio::test]
async fn permanent_refusal_is_misconfigured() {
    let fake = FakeSmtp::start().await;
    fake.set_fault(Fault::RcptPermanent).await;

    let out = sink(&config(fake.port(), |_| {})).notify(&opt_out(PHONE, None)).await;

    assert!(misconfigured(&out), "{out:?}");
    assert!(format!("{out:?}").contains("550"), "{out:?}");
    assert!(fake.messages().is_empty());
}

#[tokio::test]
async fn server_down_is_transient_and_recovers() {
    let fake = FakeSmtp::start().await;
    let email = sink(&config(fake.port(), |_| {}));
    // A first message leaves a pooled connection, which the outage must not fool.
    email.notify(&opt_out("+14155550101", None)).await.expect("sent");
    fake.set_fault(Fault::Down).await;

    let out = email.notify(&opt_out("+14155550102", None)).await;
    let alerted = email
        .alert(&Alert {
            sink: "redcap".into(),
            failing_since: november(),
            error: "e".into(),
            waiting: 1,
            recovered: false,
        })
        .await;

    assert!(transient(&out), "{out:?}");
    assert!(transient(&alerted), "{alerted:?}");
    assert!(format!("{out:?}").contains("127.0.0.1:"), "{out:?}");
    assert_eq!(fake.messages().len(), 1);

    fake.set_fault(Fault::None).await;
    email.notify(&opt_out("+14155550102", None)).await.expect("sent after the outage");
    assert_eq!(fake.messages().len(), 2);
}

#[tokio::test]
async fn an_unreachable_server_is_transient() {
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();

    let out = sink(&config(port, |_| {})).notify(&opt_out(PHONE, None)).await;

    assert!(transient(&out), "{out:?}");
    assert!(format!("{out:?}").contains(&format!("127.0.0.1:{port}")), "{out:?}");
}

#[tokio::test]
async fn each_message_succeeds_or_fails_on_its_own() {
    let fake = FakeSmtp::start().await;
    let email = sink(&config(fake.port(), |_| {}));
    // The second transaction is refused for now; the first and third go through.
    fake.set_fault_for(Fault::RcptTransient, 1, Some(1)).await;

    let mut out = Vec::new();
    for n in 1..=3 {
        out.push(email.notify(&opt_out(&format!("+1415555010{n}"), None)).await);
    }

    assert!(out[0].is_ok(), "{out:?}");
    assert!(transient(&out[1]), "{out:?}");
    assert!(out[2].is_ok(), "{out:?}");
    let subjects: Vec<String> = fake.messages().iter().map(|m| m.header("Subject").unwrap()).collect();
    assert_eq!(subjects, vec!["Opt-out: +1415***0101 texted STOP", "Opt-out: +1415***0103 texted STOP"]);
    let bodies: Vec<String> = fake.messages().iter().map(Received::body).collect();
    assert!(
        bodies[0].contains("Phone:    +14155550101\n") && bodies[1].contains("Phone:    +14155550103\n"),
        "{bodies:?}"
    );
}

#[tokio::test]
async fn bad_settings_are_refused_at_startup_naming_the_setting() {
    let bad_to = config(25, |c| c.to = vec!["ops@example.org".into(), "not an address".into()]);
    let err = EmailSink::new(&bad_to).err().expect("refused");
    assert!(err.contains("email.to") && err.contains("not an address"), "{err}");

    let bad_from = config(25, |c| c.from = "relay at example".into());
    let err = EmailSink::new(&bad_from).err().expect("refused");
    assert!(err.contains("email.from"), "{err}");

    let bad_zone = config(25, |c| c.timezone = "Mars/Olympus".into());
    let err = EmailSink::new(&bad_zone).err().expect("refused");
    assert!(err.contains("email.timezone"), "{err}");

    let no_one = config(25, |c| c.to = vec![]);
    assert!(EmailSink::new(&no_one).err().expect("refused").contains("email.to"));

    let half_login = config(25, |c| c.username = Some("u".into()));
    assert!(EmailSink::new(&half_login).is_err());

    for tls in [EmailTls::Starttls, EmailTls::Tls] {
        assert!(EmailSink::new(&config(25, |c| c.tls = tls)).is_ok());
    }
}

/// Writes the fake server's certificate where `email.ca_file` can point.
fn trust(fake: &FakeSmtp, dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("smtp-ca.pem");
    std::fs::write(&path, fake.certificate_pem()).unwrap();
    path
}

#[tokio::test]
async fn starttls_upgrades_the_session_before_anything_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeSmtp::start_with_starttls().await;
    let cfg = config(fake.port(), |c| {
        c.tls = EmailTls::Starttls;
        c.ca_file = Some(trust(&fake, &dir));
    });

    sink(&cfg).notify(&opt_out(PHONE, None)).await.expect("sent");

    let m = only_message(&fake);
    assert!(m.tls, "the message went over the upgraded session");
    assert_eq!(fake.tls_upgrades(), 1);
    assert!(m.body().contains("Phone:    +14155550101\n"));
}

#[tokio::test]
async fn starttls_with_credentials_logs_in_only_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeSmtp::start_with_auth_and_starttls("relay-user", "pa55 w0rd").await;
    let cfg = config(fake.port(), |c| {
        c.tls = EmailTls::Starttls;
        c.ca_file = Some(trust(&fake, &dir));
        c.username = Some("relay-user".into());
        c.password = Some(SecretString::from("pa55 w0rd"));
    });

    sink(&cfg).notify(&opt_out(PHONE, None)).await.expect("sent");

    let m = only_message(&fake);
    assert!(m.tls && m.auth_user.as_deref() == Some("relay-user"), "{m:?}");
    assert_eq!(fake.plaintext_auth_attempts(), 0, "the password never crossed the wire in clear");
}

#[tokio::test]
async fn implicit_tls_speaks_tls_from_the_first_byte() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeSmtp::start_with_auth_and_implicit_tls("relay-user", "pa55 w0rd").await;
    let cfg = config(fake.port(), |c| {
        c.tls = EmailTls::Tls;
        c.ca_file = Some(trust(&fake, &dir));
        c.username = Some("relay-user".into());
        c.password = Some(SecretString::from("pa55 w0rd"));
    });

    sink(&cfg).notify(&opt_out(PHONE, None)).await.expect("sent");

    let m = only_message(&fake);
    assert!(m.tls && m.auth_user.as_deref() == Some("relay-user"), "{m:?}");
    assert_eq!(fake.plaintext_auth_attempts(), 0);
    assert_eq!(fake.tls_upgrades(), 0, "no STARTTLS: the session was TLS from the start");
}

#[tokio::test]
async fn implicit_tls_to_a_plaintext_server_sends_nothing() {
    let fake = FakeSmtp::start().await;
    let cfg = config(fake.port(), |c| c.tls = EmailTls::Tls);

    let out = sink(&cfg).notify(&opt_out(PHONE, None)).await;

    assert!(out.is_err(), "{out:?}");
    assert!(fake.messages().is_empty());
}

#[tokio::test]
async fn required_starttls_that_the_server_does_not_offer_is_misconfigured_and_nothing_is_sent_in_clear() {
    let fake = FakeSmtp::start().await;
    let cfg = config(fake.port(), |c| c.tls = EmailTls::Starttls);

    let out = sink(&cfg).notify(&opt_out(PHONE, None)).await;

    assert!(misconfigured(&out), "{out:?}");
    assert_eq!(fake.connections(), 1, "the server was reached");
    assert!(fake.messages().is_empty(), "no plaintext fallback");
    assert_eq!(fake.tls_upgrades(), 0);
}

#[tokio::test]
async fn a_certificate_nobody_trusts_is_refused() {
    let fake = FakeSmtp::start_with_starttls().await;
    // No ca_file: the self-signed certificate is not among the built-in roots.
    let cfg = config(fake.port(), |c| c.tls = EmailTls::Starttls);

    let out = sink(&cfg).notify(&opt_out(PHONE, None)).await;

    assert!(out.is_err(), "{out:?}");
    assert!(fake.messages().is_empty());
    assert_eq!(fake.tls_upgrades(), 0, "the handshake failed");
}

#[tokio::test]
async fn an_unreadable_or_empty_ca_file_is_refused_at_startup_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let with_ca = |path: std::path::PathBuf| {
        config(25, |c| {
            c.tls = EmailTls::Starttls;
            c.ca_file = Some(path);
        })
    };
    let err = EmailSink::new(&with_ca(dir.path().join("nope.pem"))).err().expect("refused");
    assert!(err.contains("email.ca_file") && err.contains("nope.pem"), "{err}");

    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let err = EmailSink::new(&with_ca(empty)).err().expect("refused");
    assert!(err.contains("email.ca_file") && err.contains("no PEM certificate"), "{err}");
}
