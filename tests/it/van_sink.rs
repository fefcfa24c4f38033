//! The EveryAction / VAN sink end to end: the real app, a real database on
//! both backends, and the in-process fake VAN. Phones reach VAN through the
//! mapping (`import-van-ids`), however late it is imported.

use std::time::Duration;

use crate::both_backends;
use crate::common::fake_van::{FakeVan, VanFault};
use crate::common::*;
use optout_relay::config::{Config, EveryActionConfig, SinkConfig};
use optout_relay::domain::Phone;
use optout_relay::store::{DeliveryRow, Store, VanImport, VanSinkScope};
use secrecy::SecretString;

const APP: &str = "optout-relay-test";
const KEY: &str = "2d1f2a4e-6f1c-4f7e-9a1b-3c5d7e9f1a2b";
const PHONE: &str = "+14155550142";
const NUMBER: &str = "4155550142";

fn van_config(fake: &FakeVan, key: &str, committee_id: Option<u64>) -> EveryActionConfig {
    EveryActionConfig {
        url: fake.url.clone(),
        committee_id,
        max_calls_per_minute: 600,
        request_timeout: Duration::from_millis(700),
        ..EveryActionConfig::new(APP, SecretString::from(key.to_owned()))
    }
}

/// Fast relay settings and these VAN sinks.
fn with_sinks(sinks: Vec<(&'static str, EveryActionConfig)>) -> impl FnOnce(&mut Config) {
    move |c: &mut Config| {
        for (name, s) in sinks {
            c.sinks.insert(name.to_owned(), SinkConfig::Everyaction(s));
        }
        quick_relay(c);
    }
}

/// Imports a mapping file's text as `import-van-ids` does.
async fn import(store: &Store, csv: &str, sinks: &[(&str, Option<u64>)]) -> VanImport {
    let file = optout_relay::van_mapping::read(csv.as_bytes(), phonenumber::country::Id::US).expect("reads");
    assert!(file.skipped.is_empty(), "{:?}", file.skipped);
    let sinks: Vec<VanSinkScope> =
        sinks.iter().map(|(s, c)| VanSinkScope { sink: (*s).to_owned(), committee_id: *c }).collect();
    store.import_van_ids(&file.rows, &sinks).await.expect("import")
}

async fn text(app: &TestApp, sid: &str, body: &str) {
    assert_eq!(app.post_signed(&stop_params(sid, PHONE, body, None), TOKEN).await.status(), 200, "{body}");
}

async fn row(store: &Store, sink: &str) -> Option<DeliveryRow> {
    let phone = Phone::from_stored(PHONE.to_owned());
    store.deliveries_of_phone(&phone).await.expect("rows").into_iter().find(|r| r.sink == sink)
}

/// The sink's row once it is done and holds `opted_out`.
async fn done(store: &Store, sink: &str, opted_out: bool) -> DeliveryRow {
    eventually_some(&format!("{sink} done, opted_out = {opted_out}"), || async {
        row(store, sink).await.filter(|r| r.status == "done" && !r.uncertain && r.written_opted_out == Some(opted_out))
    })
    .await
}

async fn a_stop_opts_out_every_person_sharing_the_phone_and_a_start_opts_them_back_in(b: Backend) {
    let fake = FakeVan::start(APP, KEY, 1, &[101, 102, 300]).await;
    let app = spawn_app_with(b, with_sinks(vec![("van", van_config(&fake, KEY, None))])).await;
    import(&app.store, "phone,vanid\n(415) 555-0142,101\n415.555.0142,102\n4155550199,300\n", &[("van", None)]).await;

    text(&app, "SMvan1", "STOP").await;
    let r = done(&app.store, "van", true).await;
    assert_eq!(fake.opt_in_status(101, NUMBER).as_deref(), Some("O"));
    assert_eq!(fake.opt_in_status(102, NUMBER).as_deref(), Some("O"));
    assert_eq!(fake.opt_in_status(300, NUMBER), None, "another person's number is left alone");
    let calls = fake.person_calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls.iter().all(|c| c.authorised), "Basic auth with the application name and KEY|1");
    assert_eq!(calls[0].body, serde_json::json!({"phones": [{"phoneNumber": NUMBER, "phoneOptInStatus": "O"}]}));
    // The delivery keeps the vanIds and VAN's status.
    let result = r.result.expect("the sink's account");
    assert_eq!(result["van_ids"], serde_json::json!([101, 102]));
    assert_eq!(result["written"], serde_json::json!([101, 102]));
    assert_eq!(result["van_status"]["101"], "Processed");

    text(&app, "SMvan2", "START").await;
    done(&app.store, "van", false).await;
    assert_eq!(fake.opt_in_status(101, NUMBER).as_deref(), Some("I"));
    assert_eq!(fake.opt_in_status(102, NUMBER).as_deref(), Some("I"));
    app.stop().await;
}

async fn a_mapping_imported_after_the_stop_brings_van_to_the_target(b: Backend) {
    let fake = FakeVan::start(APP, KEY, 1, &[101]).await;
    let app = spawn_app_with(b, with_sinks(vec![("van", van_config(&fake, KEY, None))])).await;

    text(&app, "SMlate1", "STOP").await;
    // No vanId known: nothing to send, recorded and visible as such.
    let r = done(&app.store, "van", true).await;
    let skipped = r.result.expect("account")["skipped"].as_str().unwrap_or_default().to_owned();
    assert!(skipped.contains("no vanId is known"), "{skipped}");
    assert!(fake.person_calls().is_empty());

    let first = import(&app.store, "phone,vanid,committeeid\n+1 415 555 0142,101,\n", &[("van", None)]).await;
    assert_eq!(first, VanImport { added: 1, known: 0, requeued: 1 });
    eventually("VAN holds the opt-out", || async { fake.opt_in_status(101, NUMBER).as_deref() == Some("O") }).await;
    let r = done(&app.store, "van", true).await;
    assert_eq!(r.result.expect("account")["written"], serde_json::json!([101]));

    // Importing the same file again is idempotent: nothing new, nothing sent.
    let again = import(&app.store, "phone,vanid,committeeid\n4155550142,101,\n", &[("van", None)]).await;
    assert_eq!(again, VanImport { added: 0, known: 1, requeued: 0 });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fake.person_calls().len(), 1);
    app.stop().await;
}

async fn two_van_sinks_for_two_committees_each_update_their_own_people(b: Backend) {
    let (key_a, key_b) = ("aaaaaaaa-0000-0000-0000-00000000000a", "bbbbbbbb-0000-0000-0000-00000000000b");
    let van_a = FakeVan::start(APP, key_a, 1, &[101]).await;
    let van_b = FakeVan::start(APP, key_b, 0, &[201]).await;
    let mut b_config = van_config(&van_b, key_b, Some(2));
    b_config.database = "MyVoters".to_owned();
    let sinks = vec![("van_a", van_config(&van_a, key_a, Some(1))), ("van_b", b_config)];
    let app = spawn_app_with(b, with_sinks(sinks)).await;
    import(&app.store, "phone,vanid,committeeid\n4155550142,101,1\n4155550142,201,2\n", &[]).await;

    text(&app, "SMcom1", "STOP").await;
    done(&app.store, "van_a", true).await;
    done(&app.store, "van_b", true).await;
    assert_eq!(van_a.opt_in_status(101, NUMBER).as_deref(), Some("O"));
    assert_eq!(van_b.opt_in_status(201, NUMBER).as_deref(), Some("O"));
    // Each committee's key saw only its own people, with its own mode (|1, |0).
    let paths = |v: &FakeVan| v.person_calls().into_iter().map(|c| (c.path, c.authorised)).collect::<Vec<_>>();
    assert_eq!(paths(&van_a), [("people/101".to_owned(), true)]);
    assert_eq!(paths(&van_b), [("people/201".to_owned(), true)]);
    app.stop().await;
}

async fn an_unknown_van_id_is_done_with_a_note_and_never_retried(b: Backend) {
    let fake = FakeVan::start(APP, KEY, 1, &[101]).await;
    let app = spawn_app_with(b, with_sinks(vec![("van", van_config(&fake, KEY, None))])).await;
    import(&app.store, "phone,vanid\n4155550142,101\n4155550142,999\n", &[]).await;

    text(&app, "SMgone", "STOP").await;
    let r = done(&app.store, "van", true).await;
    let result = r.result.expect("account");
    assert_eq!(result["not_found"], serde_json::json!([999]));
    assert!(result["note"].as_str().unwrap_or_default().contains("999"), "{result}");
    assert_eq!(fake.opt_in_status(101, NUMBER).as_deref(), Some("O"), "the person who exists is updated");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let to_999 = fake.person_calls().iter().filter(|c| c.path == "people/999").count();
    assert_eq!(to_999, 1, "a 404 is not retried");
    assert_eq!(app.store.sink("van").await.unwrap().unwrap().health, "ok");
    app.stop().await;
}

async fn five_hundreds_429s_and_timeouts_are_retried_until_van_holds_the_target(b: Backend) {
    let fake = FakeVan::start(APP, KEY, 1, &[101]).await;
    let app = spawn_app_with(b, with_sinks(vec![("van", van_config(&fake, KEY, None))])).await;
    import(&app.store, "phone,vanid\n4155550142,101\n", &[]).await;
    fake.status_next(503, None);
    fake.status_next(429, Some(1));
    // Longer than the sink's 700ms timeout; VAN applies it anyway.
    fake.fail_next(VanFault::SlowApply(Duration::from_millis(1500)));

    text(&app, "SMflaky", "STOP").await;
    done(&app.store, "van", true).await;
    assert_eq!(fake.opt_in_status(101, NUMBER).as_deref(), Some("O"));
    let calls = fake.person_calls().len();
    assert!(calls >= 4, "503, 429, the timed-out call, then a write that answered: {calls} calls");
    app.stop().await;
}

async fn a_wrong_key_is_misconfigured_with_vans_answer(b: Backend) {
    let fake = FakeVan::start(APP, KEY, 1, &[101]).await;
    let app =
        spawn_app_with(b, with_sinks(vec![("van", van_config(&fake, "ffffffff-0000-0000-0000-000000000000", None))]))
            .await;
    import(&app.store, "phone,vanid\n4155550142,101\n", &[]).await;
    text(&app, "SMkey", "STOP").await;
    let health = eventually_some("the sink is misconfigured", || async {
        app.store.sink("van").await.unwrap().filter(|h| h.health == "misconfigured")
    })
    .await;
    let error = health.last_error.unwrap_or_default();
    assert!(error.contains("401") && error.contains("application_name"), "{error}");
    assert!(!error.contains("ffffffff"), "the key never reaches an error: {error}");
    let r = row(&app.store, "van").await.expect("row");
    assert_eq!(r.status, "pending");
    assert_eq!(fake.opt_in_status(101, NUMBER), None);
    app.stop().await;
}

async fn a_result_code_also_posts_a_do_not_text_canvass_response(b: Backend) {
    let fake = FakeVan::start(APP, KEY, 1, &[101]).await;
    let mut cfg = van_config(&fake, KEY, None);
    cfg.result_code_id = Some(130);
    let app = spawn_app_with(b, with_sinks(vec![("van", cfg)])).await;
    import(&app.store, "phone,vanid\n4155550142,101\n", &[]).await;
    text(&app, "SMdnt", "STOP").await;
    done(&app.store, "van", true).await;
    let responses = fake.canvass_responses();
    assert_eq!(responses.len(), 1, "{responses:?}");
    let (van_id, body) = &responses[0];
    assert_eq!(*van_id, 101);
    assert_eq!(body["resultCodeId"], 130);
    assert_eq!(body["canvassContext"]["contactTypeId"], 37);
    assert_eq!(body["canvassContext"]["phone"]["phoneNumber"], NUMBER);
    app.stop().await;
}

both_backends!(
    a_stop_opts_out_every_person_sharing_the_phone_and_a_start_opts_them_back_in,
    a_mapping_imported_after_the_stop_brings_van_to_the_target,
    two_van_sinks_for_two_committees_each_update_their_own_people,
    an_unknown_van_id_is_done_with_a_note_and_never_retried,
    five_hundreds_429s_and_timeouts_are_retried_until_van_holds_the_target,
    a_wrong_key_is_misconfigured_with_vans_answer,
    a_result_code_also_posts_a_do_not_text_canvass_response,
    the_notification_email_reports_what_van_did,
);

/// `optout-relay import-van-ids FILE.csv`, the real binary: what it prints,
/// its exit code when it skipped a line, and that running it twice is idempotent.
#[test]
fn import_van_ids_prints_what_it_read_skipped_and_queued_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_optout-relay"))
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("OPTOUT_RELAY__SINKS__VAN__TYPE", "everyaction")
            .env("OPTOUT_RELAY__SINKS__VAN__URL", "http://127.0.0.1:9/v4/")
            .env("OPTOUT_RELAY__SINKS__VAN__APPLICATION_NAME", APP)
            .env("OPTOUT_RELAY__SINKS__VAN__API_KEY", KEY)
            .args(args)
            .output()
            .unwrap()
    };
    assert!(run(&["migrate"]).status.success());
    assert!(run(&["opt-out", "(415) 555-0142"]).status.success());
    let csv = dir.path().join("people.csv");
    std::fs::write(&csv, "phone,vanid,committeeid\n4155550142,101,\n415-555-0143,102,\n555-01,7,\n4155550142,101,\n")
        .unwrap();

    let out = run(&["import-van-ids", "people.csv"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "a skipped line is a non-zero exit: {stdout}");
    for line in [
        "people.csv: 4 line(s) read, 2 usable row(s), 1 repeated in the file, 1 skipped",
        "  skipped line 4: phone *** is not a valid number",
        "2 new mapping row(s) stored, 0 already known; 2 row(s) in all",
        "1 phone(s) on the opt-out list queued for van (a running `serve` sends them)",
    ] {
        assert!(stdout.lines().any(|l| l == line), "{line:?} in\n{stdout}");
    }
    std::fs::write(&csv, "phone,vanid\n4155550142,101\n").unwrap();
    let out = run(&["import-van-ids", "people.csv"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("0 new mapping row(s) stored, 1 already known; 2 row(s) in all"), "{stdout}");
    assert!(stdout.contains("0 phone(s) on the opt-out list queued"), "{stdout}");

    let out = run(&["import-van-ids", "missing.csv"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open missing.csv"));
}

async fn the_notification_email_reports_what_van_did(b: Backend) {
    let fake = FakeVan::start(APP, KEY, 1, &[101]).await;
    let smtp = crate::common::fake_smtp::FakeSmtp::start().await;
    let mut mail =
        optout_relay::config::EmailConfig::new("127.0.0.1", "relay@example.org", vec!["ops@example.org".into()]);
    mail.smtp_port = Some(smtp.port());
    mail.tls = optout_relay::config::EmailTls::None;
    let sinks = with_sinks(vec![("van", van_config(&fake, KEY, None))]);
    let app = spawn_app_with(b, move |c| {
        sinks(c);
        c.email = Some(mail);
    })
    .await;
    import(&app.store, "phone,vanid\n4155550142,101\n4155550142,999\n", &[]).await;
    text(&app, "SMmail", "STOP").await;
    let body = eventually_some("the notification", || async { smtp.messages().first().map(|m| m.body()) }).await;
    assert!(body.contains("  - van: done at "), "{body}");
    assert!(body.contains("      Written: 101\n"), "{body}");
    assert!(body.contains("      Note: VAN has no person with vanId 999"), "{body}");
    app.stop().await;
}

/// The sink starts no call that could outlast the caller's deadline: the
/// items done before it are reported, the rest are not sent.
#[tokio::test]
async fn no_call_starts_that_the_deadline_would_cut_and_what_was_done_is_reported() {
    use optout_relay::sinks::everyaction::{EveryActionSink, VanItem};
    use optout_relay::sinks::{SinkError, Target};
    let fake = FakeVan::start(APP, KEY, 1, &[1, 2, 3]).await;
    let sink = EveryActionSink::new(&van_config(&fake, KEY, None)).expect("builds");
    let items: Vec<VanItem> = (1..=3)
        .map(|i| VanItem {
            phone: Phone::from_stored(format!("+1415555014{i}")),
            target: Target::OptedOut { since: chrono::Utc::now() },
            van_ids: vec![i],
        })
        .collect();
    // Room for the first calls (spaced 100ms apart), not for the third.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(700 + 150);
    let converged = sink.converge(&items, Some(deadline)).await;
    assert!(matches!(converged.error, Some(SinkError::OutOfTime)), "{converged:?}");
    assert!(converged.done.len() < items.len(), "{converged:?}");
    assert_eq!(fake.person_calls().len(), converged.done.len(), "nothing sent past the deadline");
    for (value, item) in converged.done.iter().zip(&items) {
        assert_eq!(value["written"], serde_json::json!(item.van_ids));
    }
}
