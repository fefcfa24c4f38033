//! The REDCap sink against the in-process fake REDCap: what ends up stored
//! in the project, which calls were made, and how failures are classified.
//! The sink converges: it reads the opt-out field, writes only what differs
//! from each phone's target, and says when a write's outcome is unknown.

use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};

use crate::common::eventually;
use crate::common::fake_redcap::{CallKind, FakeProject, FakeRedcap, Fault};
use optout_relay::config::{RedcapConfig, TimestampFormat};
use optout_relay::domain::Phone;
use optout_relay::sinks::redcap::{RedcapSink, ResyncReport};
use optout_relay::sinks::{Convergence, SinkError, Target};
use phonenumber::country;
use secrecy::SecretString;
use serde_json::{json, Value};

const TOKEN: &str = "0123456789ABCDEF0123456789ABCDEF";

/// A classic project whose record-id field is `study_id`, not `record_id`.
fn classic(optout_validation: &str) -> FakeProject {
    FakeProject::new(
        TOKEN,
        &[
            ("study_id", "enrolment", ""),
            ("first_name", "enrolment", ""),
            ("mobile", "contact", ""),
            ("optout_at", "contact", optout_validation),
            ("notes", "contact", ""),
        ],
    )
}

fn config(url: &str, edit: impl FnOnce(&mut RedcapConfig)) -> RedcapConfig {
    let mut c = RedcapConfig {
        url: url.to_owned(),
        token: SecretString::from(TOKEN),
        phone_field: "mobile".into(),
        phone_event: None,
        optout_field: "optout_at".into(),
        optout_event: None,
        timezone: "America/New_York".into(),
        timestamp_format: TimestampFormat::Auto,
        request_timeout: Duration::from_secs(5),
        max_calls_per_minute: 600,
        ..RedcapConfig::new(url, SecretString::from(TOKEN), "mobile", "optout_at")
    };
    edit(&mut c);
    c
}

fn sink(fake: &FakeRedcap, edit: impl FnOnce(&mut RedcapConfig)) -> RedcapSink {
    RedcapSink::new(&config(&fake.url, edit), country::Id::US).expect("sink builds")
}

/// 2026-11-23 14:15:07 UTC = 09:15:07 in New York (EST, UTC-5).
fn november() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 14, 15, 7).unwrap()
}

fn phone(e164: &str) -> Phone {
    Phone::from_stored(e164.to_owned())
}

/// Opted out since `since`.
fn opted_out(e164: &str, since: DateTime<Utc>) -> Convergence {
    Convergence { phone: phone(e164), target: Target::OptedOut { since } }
}

/// Opted out since November 23rd, 14:15:07 UTC.
fn opt_out(e164: &str) -> Convergence {
    opted_out(e164, november())
}

fn opt_in(e164: &str) -> Convergence {
    Convergence { phone: phone(e164), target: Target::OptedIn }
}

fn records(result: &Value) -> Vec<String> {
    result["records"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect()
}

fn written(result: &Value) -> Vec<String> {
    result["written"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect()
}

/// A deadline `d` from now, as the relay passes the end of its lease.
fn in_(d: Duration) -> Option<tokio::time::Instant> {
    Some(tokio::time::Instant::now() + d)
}

/// The rows the sink sent in its import(s).
fn imported_rows(fake: &FakeRedcap) -> Vec<Value> {
    fake.call_log()
        .iter()
        .filter(|c| c.kind == CallKind::Import)
        .flat_map(|c| serde_json::from_str::<Vec<Value>>(c.param("data").unwrap()).unwrap())
        .collect()
}

#[tokio::test]
async fn every_phone_format_is_matched_and_stamped_in_the_project_zone() {
    let formats = ["(415) 555-0101", "415-555-0101", "4155550101", "+1 415 555 0101", "1-415-555-0101", "415.555.0101"];
    let mut project = classic("datetime_seconds_ymd");
    for (i, f) in formats.iter().enumerate() {
        project = project.with_record(&format!("S-{i}"), None, &[("mobile", f), ("first_name", "Ada")]);
    }
    project = project.with_record("other", None, &[("mobile", "415-555-0102"), ("first_name", "Bob")]).with_record(
        "blank",
        None,
        &[("first_name", "Cy")],
    );
    let fake = FakeRedcap::start(project).await;
    let sink = sink(&fake, |_| {});

    let out = sink.converge(&[opt_out("+14155550101")], None).await.unwrap();

    assert_eq!(out.len(), 1);
    let want: Vec<String> = (0..formats.len()).map(|i| format!("S-{i}")).collect();
    assert_eq!(records(&out[0]), want);
    assert_eq!(written(&out[0]), want);
    assert_eq!(out[0]["unchanged"], 0);
    assert_eq!(out[0]["value"], "2026-11-23 09:15:07");
    assert!(out[0].get("events").is_none(), "classic project: {}", out[0]);
    for r in &want {
        assert_eq!(fake.value(r, None, "optout_at").as_deref(), Some("2026-11-23 09:15:07"), "{r}");
        assert_eq!(fake.value(r, None, "first_name").as_deref(), Some("Ada"), "{r}");
    }
    assert_eq!(fake.value("other", None, "optout_at").as_deref(), Some(""));
    assert_eq!(fake.value("blank", None, "optout_at").as_deref(), Some(""));
    assert_eq!(fake.record_count(), formats.len() + 2);

    // One metadata read, one export, one import; every call JSON, no filterLogic.
    assert_eq!(fake.calls_of(CallKind::Metadata), 1);
    assert_eq!(fake.calls_of(CallKind::Export), 1);
    assert_eq!(fake.calls_of(CallKind::Import), 1);
    assert_eq!(fake.calls(), 3);
    for call in fake.call_log() {
        assert_eq!(call.param("format"), Some("json"));
        assert_eq!(call.param("returnFormat"), Some("json"));
        assert!(!call.has_param("filterLogic"));
    }
    let log = fake.call_log();
    let export = log.iter().find(|c| c.kind == CallKind::Export).unwrap();
    // The record id, the phone, and the opt-out field to compare against.
    assert_eq!(export.param("fields[0]"), Some("study_id"));
    assert_eq!(export.param("fields[1]"), Some("mobile"));
    assert_eq!(export.param("fields[2]"), Some("optout_at"));
    assert!(!export.has_param("fields[3]"));
    assert!(!export.has_param("events[0]"));
    let import = log.iter().find(|c| c.kind == CallKind::Import).unwrap();
    assert_eq!(import.param("overwriteBehavior"), Some("overwrite"));
    assert_eq!(import.param("type"), Some("flat"));
    // Each row carries only the record id and the opt-out field.
    for row in imported_rows(&fake) {
        let keys: Vec<&String> = row.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["optout_at", "study_id"]);
    }
}

#[tokio::test]
async fn the_timestamp_follows_the_field_validation_the_format_and_daylight_saving() {
    // (validation, configured format, expected) for 2026-07-01 16:00:30 UTC = 12:00:30 EDT.
    let july = Utc.with_ymd_and_hms(2026, 7, 1, 16, 0, 30).unwrap();
    for (validation, format, want) in [
        ("datetime_ymd", TimestampFormat::Auto, "2026-07-01 12:00"),
        ("datetime_mdy", TimestampFormat::Auto, "2026-07-01 12:00"),
        ("datetime_dmy", TimestampFormat::Auto, "2026-07-01 12:00"),
        ("datetime_seconds_mdy", TimestampFormat::Auto, "2026-07-01 12:00:30"),
        ("", TimestampFormat::Auto, "2026-07-01 12:00:30"),
        ("", TimestampFormat::Minutes, "2026-07-01 12:00"),
        ("datetime_seconds_ymd", TimestampFormat::Minutes, "2026-07-01 12:00:00"),
    ] {
        let fake = FakeRedcap::start(classic(validation).with_record("1", None, &[("mobile", "4155550101")])).await;
        let sink = sink(&fake, |c| c.timestamp_format = format);
        let out = sink.converge(&[opted_out("+14155550101", july)], None).await.unwrap();
        // What REDCap stores (the fake normalises datetimes as REDCap does).
        assert_eq!(fake.value("1", None, "optout_at").as_deref(), Some(want), "{validation} {format:?}");
        assert_eq!(out[0]["records"], json!(["1"]));
    }

    // Another zone, in winter.
    let fake = FakeRedcap::start(classic("").with_record("1", None, &[("mobile", "4155550101")])).await;
    let sink = sink(&fake, |c| c.timezone = "Europe/Paris".into());
    sink.converge(&[opt_out("+14155550101")], None).await.unwrap();
    assert_eq!(fake.value("1", None, "optout_at").as_deref(), Some("2026-11-23 15:15:07"));
}

#[tokio::test]
async fn several_records_with_the_number_are_all_stamped() {
    let fake = FakeRedcap::start(
        classic("datetime_ymd")
            .with_record("10", None, &[("mobile", "(415) 555-0101")])
            .with_record("11", None, &[("mobile", "415-555-0199")])
            .with_record("12", None, &[("mobile", "+14155550101")]),
    )
    .await;
    let out = sink(&fake, |_| {}).converge(&[opt_out("+14155550101")], None).await.unwrap();
    assert_eq!(records(&out[0]), ["10", "12"]);
    assert_eq!(written(&out[0]), ["10", "12"]);
    assert_eq!(fake.value("10", None, "optout_at").as_deref(), Some("2026-11-23 09:15"));
    assert_eq!(fake.value("12", None, "optout_at").as_deref(), Some("2026-11-23 09:15"));
    assert_eq!(fake.value("11", None, "optout_at").as_deref(), Some(""));
}

#[tokio::test]
async fn no_match_is_success_and_makes_no_import() {
    let fake = FakeRedcap::start(classic("").with_record("1", None, &[("mobile", "415-555-0102")])).await;
    let out = sink(&fake, |_| {}).converge(&[opt_out("+14155550101"), opt_in("+14155550103")], None).await.unwrap();
    let nothing = json!({"records": [], "written": [], "unchanged": 0});
    assert_eq!(out, [nothing.clone(), nothing]);
    assert_eq!(fake.calls_of(CallKind::Import), 0);
    assert_eq!(fake.calls_of(CallKind::Export), 1);
    assert_eq!(fake.record_count(), 1);
    assert_eq!(fake.value("1", None, "optout_at").as_deref(), Some(""));
}

#[tokio::test]
async fn blank_phone_fields_are_never_stamped_whatever_the_number() {
    // The module this replaces stamped every blank-phone record for a short code.
    let fake = FakeRedcap::start(
        classic("")
            .with_record("1", None, &[("first_name", "no phone at all")])
            .with_record("2", None, &[("mobile", " ")])
            .with_record("3", None, &[("mobile", "12345")])
            .with_record("4", None, &[("mobile", "n/a")]),
    )
    .await;
    // Short codes are refused at the edge now; one recorded before that is still never matched.
    let short_code = Phone::from_stored("+12345".to_owned());
    let items = [opt_out(short_code.as_str()), opt_out("+442079460958"), opt_out(""), opt_out("+12345")];
    let out = sink(&fake, |_| {}).converge(&items, None).await.unwrap();
    assert!(out.iter().all(|r| r["records"] == json!([])), "{out:?}");
    assert_eq!(fake.calls_of(CallKind::Import), 0);
    for r in ["1", "2", "3", "4"] {
        assert_eq!(fake.value(r, None, "optout_at").as_deref(), Some(""), "{r}");
    }
}

#[tokio::test]
async fn opt_in_clears_the_field_and_touches_nothing_else() {
    let fake = FakeRedcap::start(
        classic("datetime_seconds_ymd")
            .with_record(
                "1",
                None,
                &[("mobile", "415.555.0101"), ("optout_at", "2026-01-01 08:00:00"), ("notes", "keep me")],
            )
            .with_record("2", None, &[("mobile", "415.555.0102"), ("optout_at", "2026-01-02 08:00:00")]),
    )
    .await;
    let out = sink(&fake, |_| {}).converge(&[opt_in("+14155550101")], None).await.unwrap();
    assert_eq!(out[0]["records"], json!(["1"]));
    assert_eq!(out[0]["value"], "");
    assert_eq!(fake.value("1", None, "optout_at").as_deref(), Some(""));
    assert_eq!(fake.value("1", None, "notes").as_deref(), Some("keep me"));
    assert_eq!(fake.value("1", None, "mobile").as_deref(), Some("415.555.0101"));
    assert_eq!(fake.value("2", None, "optout_at").as_deref(), Some("2026-01-02 08:00:00"));
    assert_eq!(fake.record_count(), 2);
}

#[tokio::test]
async fn a_mixed_batch_gets_one_result_per_item_in_order() {
    let fake = FakeRedcap::start(classic("").with_record("1", None, &[("mobile", "4155550101")]).with_record(
        "2",
        None,
        &[("mobile", "4155550102"), ("optout_at", "2026-01-01 00:00:00")],
    ))
    .await;
    let out = sink(&fake, |_| {})
        .converge(&[opt_out("+14155550101"), opt_in("+14155550102"), opt_in("+14155550109")], None)
        .await
        .unwrap();
    assert_eq!(out.len(), 3);
    assert_eq!(out[0], json!({"records": ["1"], "written": ["1"], "unchanged": 0, "value": "2026-11-23 09:15:07"}));
    assert_eq!(out[1], json!({"records": ["2"], "written": ["2"], "unchanged": 0, "value": ""}));
    assert_eq!(out[2], json!({"records": [], "written": [], "unchanged": 0}));
    assert_eq!(fake.value("1", None, "optout_at").as_deref(), Some("2026-11-23 09:15:07"));
    assert_eq!(fake.value("2", None, "optout_at").as_deref(), Some(""));
    assert_eq!(imported_rows(&fake).len(), 2);
}

const EVENTS: [&str; 3] = ["enrolment_arm_1", "followup_arm_1", "consent_arm_1"];

fn longitudinal() -> FakeProject {
    classic("datetime_ymd")
        .with_events(&EVENTS)
        .with_record("1", Some("enrolment_arm_1"), &[("mobile", "415-555-0101"), ("first_name", "Ada")])
        .with_record("1", Some("followup_arm_1"), &[("notes", "visit 2")])
        // Record 2 has the number only in the follow-up event.
        .with_record("2", Some("enrolment_arm_1"), &[("mobile", "")])
        .with_record("2", Some("followup_arm_1"), &[("mobile", "(415) 555-0101")])
}

#[tokio::test]
async fn longitudinal_with_phone_event_and_optout_event() {
    let fake = FakeRedcap::start(longitudinal()).await;
    let sink = sink(&fake, |c| {
        c.phone_event = Some("enrolment_arm_1".into());
        c.optout_event = Some("consent_arm_1".into());
    });
    let out = sink.converge(&[opt_out("+14155550101")], None).await.unwrap();
    // Only the enrolment phone is read: record 2's follow-up number is not.
    assert_eq!(
        out[0],
        json!({"records": ["1"], "written": ["1"], "unchanged": 0, "events": ["consent_arm_1"], "value": "2026-11-23 09:15"})
    );
    assert_eq!(fake.value("1", Some("consent_arm_1"), "optout_at").as_deref(), Some("2026-11-23 09:15"));
    assert_eq!(fake.value("1", Some("enrolment_arm_1"), "optout_at").as_deref(), Some(""));
    assert_eq!(fake.value("1", Some("enrolment_arm_1"), "first_name").as_deref(), Some("Ada"));
    assert_eq!(fake.value("2", Some("consent_arm_1"), "optout_at"), None);
    // The phone's event, and the opt-out event for what it holds there.
    let log = fake.call_log();
    let export = log.iter().find(|c| c.kind == CallKind::Export).unwrap();
    assert_eq!(export.param("events[0]"), Some("enrolment_arm_1"));
    assert_eq!(export.param("events[1]"), Some("consent_arm_1"));

    // So the same convergence again sees the stamp in the opt-out event and writes nothing.
    let out = sink.converge(&[opt_out("+14155550101")], None).await.unwrap();
    assert_eq!(out[0]["written"], json!([]));
    assert_eq!(out[0]["unchanged"], 1);
    assert_eq!(fake.calls_of(CallKind::Import), 1);
}

#[tokio::test]
async fn longitudinal_with_phone_event_only_writes_in_that_event() {
    let fake = FakeRedcap::start(longitudinal()).await;
    let sink = sink(&fake, |c| c.phone_event = Some("followup_arm_1".into()));
    let out = sink.converge(&[opt_out("+14155550101")], None).await.unwrap();
    assert_eq!(out[0]["records"], json!(["2"]));
    assert_eq!(out[0]["events"], json!(["followup_arm_1"]));
    assert_eq!(fake.value("2", Some("followup_arm_1"), "optout_at").as_deref(), Some("2026-11-23 09:15"));
    assert_eq!(fake.value("1", Some("followup_arm_1"), "optout_at").as_deref(), Some(""));
    assert_eq!(fake.value("1", Some("followup_arm_1"), "notes").as_deref(), Some("visit 2"));
}

#[tokio::test]
async fn longitudinal_without_events_reads_every_event_and_writes_where_the_phone_matched() {
    let fake = FakeRedcap::start(longitudinal()).await;
    let out = sink(&fake, |_| {}).converge(&[opt_out("+14155550101")], None).await.unwrap();
    assert_eq!(out[0]["records"], json!(["1", "2"]));
    assert_eq!(out[0]["events"], json!(["enrolment_arm_1", "followup_arm_1"]));
    assert_eq!(fake.value("1", Some("enrolment_arm_1"), "optout_at").as_deref(), Some("2026-11-23 09:15"));
    assert_eq!(fake.value("2", Some("followup_arm_1"), "optout_at").as_deref(), Some("2026-11-23 09:15"));
    assert_eq!(fake.value("1", Some("followup_arm_1"), "optout_at").as_deref(), Some(""));
    assert_eq!(fake.value("2", Some("enrolment_arm_1"), "optout_at").as_deref(), Some(""));
    let log = fake.call_log();
    assert!(!log.iter().find(|c| c.kind == CallKind::Export).unwrap().has_param("events[0]"));
}

#[tokio::test]
async fn longitudinal_optout_event_gets_one_write_per_record() {
    // Record 1 has the number in two events; the opt-out event is written once.
    let project = longitudinal().with_record("1", Some("followup_arm_1"), &[("mobile", "4155550101")]);
    let fake = FakeRedcap::start(project).await;
    let sink = sink(&fake, |c| c.optout_event = Some("consent_arm_1".into()));
    let out = sink.converge(&[opt_out("+14155550101")], None).await.unwrap();
    assert_eq!(out[0]["records"], json!(["1", "2"]));
    assert_eq!(out[0]["events"], json!(["consent_arm_1"]));
    let rows = imported_rows(&fake);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|r| r["redcap_event_name"] == "consent_arm_1"));
    for r in ["1", "2"] {
        assert_eq!(fake.value(r, Some("consent_arm_1"), "optout_at").as_deref(), Some("2026-11-23 09:15"));
    }
    // Then an opt-in clears it again.
    sink.converge(&[opt_in("+14155550101")], None).await.unwrap();
    for r in ["1", "2"] {
        assert_eq!(fake.value(r, Some("consent_arm_1"), "optout_at").as_deref(), Some(""));
    }
}

#[tokio::test]
async fn an_unknown_event_is_misconfigured() {
    let fake = FakeRedcap::start(longitudinal()).await;
    let sink = sink(&fake, |c| c.phone_event = Some("baseline_arm_9".into()));
    match sink.converge(&[opt_out("+14155550101")], None).await {
        Err(SinkError::Misconfigured(m)) => assert!(m.contains("baseline_arm_9"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(fake.calls_of(CallKind::Import), 0);
}

#[tokio::test]
async fn a_500_on_a_read_is_transient() {
    let fake = FakeRedcap::start(classic("").with_record("1", None, &[("mobile", "4155550101")])).await;
    fake.set_fault(Fault::Status500);
    let sink = sink(&fake, |_| {});
    match sink.converge(&[opt_out("+14155550101")], None).await {
        Err(SinkError::Transient { message, retry_after }) => {
            assert!(message.contains("500"), "{message}");
            assert_eq!(retry_after, None);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(fake.calls_of(CallKind::Import), 0);
    // Once REDCap is back the same batch goes through.
    fake.clear_fault();
    sink.converge(&[opt_out("+14155550101")], None).await.unwrap();
    assert_eq!(fake.value("1", None, "optout_at").as_deref(), Some("2026-11-23 09:15:07"));
}

#[tokio::test]
async fn a_read_that_times_out_is_transient() {
    let fake = FakeRedcap::start(classic("").with_record("1", None, &[("mobile", "4155550101")])).await;
    // Held far longer than the client waits: only the client's own timeout ends the call.
    fake.set_fault(Fault::Timeout(Duration::from_secs(600)));
    let sink = sink(&fake, |c| c.request_timeout = Duration::from_millis(300));
    match sink.converge(&[opt_out("+14155550101")], None).await {
        Err(SinkError::Transient { message, .. }) => assert!(message.contains("did not answer"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(fake.calls(), 1, "one call, given up on");
    assert_eq!(fake.value("1", None, "optout_at").as_deref(), Some(""));
}

#[tokio::test]
async fn an_unreachable_redcap_is_transient() {
    let fake = FakeRedcap::start(classic("")).await;
    let url = fake.url.clone();
    let addr = url.trim_start_matches("http://").trim_end_matches("/api/").to_owned();
    drop(fake);
    eventually("the fake's port refusing connections", || async {
        tokio::net::TcpStream::connect(&addr).await.is_err()
    })
    .await;
    let sink = RedcapSink::new(&config(&url, |_| {}), country::Id::US).unwrap();
    assert!(matches!(sink.converge(&[opt_out("+14155550101")], None).await, Err(SinkError::Transient { .. })));
}

#[tokio::test]
async fn a_refused_token_is_misconfigured_and_never_echoed() {
    let fake = FakeRedcap::start(classic("").with_record("1", None, &[("mobile", "4155550101")])).await;
    fake.set_fault(Fault::BadToken);
    let sink = sink(&fake, |_| {});
    match sink.converge(&[opt_out("+14155550101")], None).await {
        Err(SinkError::Misconfigured(m)) => {
            assert!(m.starts_with("REDCap refused the API token (403): You do not have permissions"), "{m}");
            assert!(!m.contains(TOKEN));
        }
        other => panic!("{other:?}"),
    }
    // A real token mismatch reads the same.
    fake.set_fault(Fault::None);
    fake.set_token("ZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZ");
    match sink.converge(&[opt_out("+14155550101")], None).await {
        Err(SinkError::Misconfigured(m)) => assert!(m.contains("403") && !m.contains(TOKEN), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(fake.value("1", None, "optout_at").as_deref(), Some(""));
}

#[tokio::test]
async fn a_429_is_transient_with_retry_after() {
    let fake = FakeRedcap::start(classic("").with_record("1", None, &[("mobile", "4155550101")])).await;
    fake.set_fault(Fault::Status429);
    match sink(&fake, |_| {}).converge(&[opt_out("+14155550101")], None).await {
        Err(SinkError::Transient { message, retry_after }) => {
            assert_eq!(retry_after, Some(Duration::from_secs(60)));
            assert!(message.contains("429"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // No hammering: the one refused call is all that was made.
    assert_eq!(fake.calls(), 1);
}

#[tokio::test]
async fn unknown_fields_are_misconfigured() {
    let fake = FakeRedcap::start(classic("").with_record("1", None, &[("mobile", "4155550101")])).await;
    match sink(&fake, |c| c.optout_field = "opted_out".into()).converge(&[opt_out("+14155550101")], None).await {
        Err(SinkError::Misconfigured(m)) => assert!(m.contains("opted_out"), "{m}"),
        other => panic!("{other:?}"),
    }
    match sink(&fake, |c| c.phone_field = "cell".into()).converge(&[opt_out("+14155550101")], None).await {
        Err(SinkError::Misconfigured(m)) => assert!(m.contains("cell"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Caught from the metadata, before any record is read or written.
    assert_eq!(fake.calls_of(CallKind::Export), 0);
    assert_eq!(fake.calls_of(CallKind::Import), 0);
}

#[tokio::test]
async fn a_date_only_field_is_misconfigured() {
    for validation in ["date_ymd", "date_mdy", "date_dmy"] {
        let fake = FakeRedcap::start(classic(validation).with_record("1", None, &[("mobile", "4155550101")])).await;
        for format in [TimestampFormat::Auto, TimestampFormat::Minutes] {
            match sink(&fake, |c| c.timestamp_format = format).converge(&[opt_out("+14155550101")], None).await {
                Err(SinkError::Misconfigured(m)) => assert!(m.contains(validation) && m.contains("date-only"), "{m}"),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(fake.calls_of(CallKind::Import), 0);
        assert_eq!(fake.value("1", None, "optout_at").as_deref(), Some(""));
    }
}

#[tokio::test]
async fn the_record_id_field_comes_from_the_metadata() {
    let fake = FakeRedcap::start(
        FakeProject::new(
            TOKEN,
            &[("participant_code", "intake", ""), ("phone_cell", "intake", ""), ("sms_stop", "sms", "")],
        )
        .with_record("P-0042", None, &[("phone_cell", "415 555 0101")]),
    )
    .await;
    let sink = sink(&fake, |c| {
        c.phone_field = "phone_cell".into();
        c.optout_field = "sms_stop".into();
    });
    let out = sink.converge(&[opt_out("+14155550101")], None).await.unwrap();
    assert_eq!(out[0]["records"], json!(["P-0042"]));
    assert_eq!(fake.value("P-0042", None, "sms_stop").as_deref(), Some("2026-11-23 09:15:07"));
    assert_eq!(imported_rows(&fake), [json!({"participant_code": "P-0042", "sms_stop": "2026-11-23 09:15:07"})]);
    assert_eq!(fake.record_count(), 1);
}

/// 500 distinct valid US numbers.
fn numbers(n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let typed = format!("(415) {}-{:04}", 230 + i / 100, 1000 + i % 100);
            let e164 = Phone::parse_valid(&typed, country::Id::US).unwrap_or_else(|| panic!("{typed} must be valid"));
            (typed, e164.as_str().to_owned())
        })
        .collect()
}

#[tokio::test]
async fn a_batch_of_500_costs_one_export_and_one_import() {
    let nums = numbers(1000);
    let mut project = classic("datetime_seconds_ymd");
    for (i, (typed, _)) in nums.iter().enumerate() {
        project = project.with_record(&(i + 1).to_string(), None, &[("mobile", typed)]);
    }
    let fake = FakeRedcap::start(project).await;
    let sink = sink(&fake, |_| {});
    // Every other record's number opts out.
    let items: Vec<Convergence> = (0..500).map(|k| opt_out(&nums[2 * k].1)).collect();

    let out = sink.converge(&items, None).await.unwrap();

    assert_eq!(out.len(), 500);
    for (k, r) in out.iter().enumerate() {
        assert_eq!(r["records"], json!([(2 * k + 1).to_string()]), "item {k}");
    }
    assert_eq!(fake.calls_of(CallKind::Export), 1);
    assert_eq!(fake.calls_of(CallKind::Import), 1);
    assert_eq!(fake.calls_of(CallKind::Metadata), 1);
    assert_eq!(fake.calls(), 3);
    for i in 0..1000 {
        let want = if i % 2 == 0 { "2026-11-23 09:15:07" } else { "" };
        assert_eq!(fake.value(&(i + 1).to_string(), None, "optout_at").as_deref(), Some(want), "record {}", i + 1);
    }

    // The same batch again: every field holds its target, so an export and nothing else.
    let out = sink.converge(&items, None).await.unwrap();
    assert!(out.iter().all(|r| r["written"] == json!([]) && r["unchanged"] == 1), "{:?}", &out[..2]);
    assert_eq!(fake.calls(), 4);

    // The next batch reuses the cached metadata: two record calls only.
    let items: Vec<Convergence> = (0..500).map(|k| opt_in(&nums[2 * k].1)).collect();
    sink.converge(&items, None).await.unwrap();
    assert_eq!(fake.calls_of(CallKind::Metadata), 1);
    assert_eq!(fake.calls(), 6);
    assert_eq!(fake.value("1", None, "optout_at").as_deref(), Some(""));
}

#[tokio::test]
async fn the_rate_limiter_spaces_every_call() {
    let fake = FakeRedcap::start(
        classic("")
            .with_record("1", None, &[("mobile", "4155550101")])
            .with_record("2", None, &[("mobile", "4155550102")])
            .with_record("3", None, &[("mobile", "4155550103")]),
    )
    .await;
    // 600/min: one call per 100 ms.
    let sink = sink(&fake, |c| c.max_calls_per_minute = 600);
    let started = Instant::now();
    sink.converge(&[opt_out("+14155550101")], None).await.unwrap();
    assert_eq!(fake.calls(), 3);
    assert!(started.elapsed() >= Duration::from_millis(200), "{:?}", started.elapsed());

    // Clones share the budget: two concurrent batches (an export and an
    // import each, on records of their own) take 4 slots, 3 after the last one.
    let other = sink.clone();
    let started = Instant::now();
    let (first, second) = ([opt_out("+14155550102")], [opt_out("+14155550103")]);
    let (a, b) = tokio::join!(sink.converge(&first, None), other.converge(&second, None));
    a.unwrap();
    b.unwrap();
    assert_eq!(fake.calls(), 7);
    assert!(started.elapsed() >= Duration::from_millis(300), "{:?}", started.elapsed());

    // check-config goes through the same limiter.
    let started = Instant::now();
    let lines = sink.check().await;
    assert!(lines.iter().all(|l| l.ok), "{lines:?}");
    let made = fake.calls() - 7;
    assert!(made >= 3, "{made}");
    assert!(
        started.elapsed() >= Duration::from_millis(100 * (made as u64 - 1)),
        "{made} calls in {:?}",
        started.elapsed()
    );
}

// Compare-and-write: only what differs from the target is written.

#[tokio::test]
async fn converging_twice_to_the_same_target_makes_no_second_import() {
    let fake = FakeRedcap::start(
        classic("datetime_seconds_ymd").with_record("1", None, &[("mobile", "4155550101")]).with_record(
            "2",
            None,
            &[("mobile", "(415) 555-0101")],
        ),
    )
    .await;
    let sink = sink(&fake, |_| {});
    let first = sink.converge(&[opt_out("+14155550101")], None).await.unwrap();
    assert_eq!(written(&first[0]), ["1", "2"]);
    assert_eq!(fake.calls_of(CallKind::Import), 1);

    let again = sink.converge(&[opt_out("+14155550101")], None).await.unwrap();
    assert_eq!(again[0], json!({"records": ["1", "2"], "written": [], "unchanged": 2, "value": "2026-11-23 09:15:07"}));
    assert_eq!(fake.calls_of(CallKind::Import), 1, "nothing differs, nothing imported");
    assert_eq!(fake.calls_of(CallKind::Export), 2);

    // One record changed by hand: only that one is written back.
    fake.set_value("2", None, "optout_at", "2026-01-01 00:00:00");
    let repaired = sink.converge(&[opt_out("+14155550101")], None).await.unwrap();
    assert_eq!(written(&repaired[0]), ["2"]);
    assert_eq!(repaired[0]["unchanged"], 1);
    assert_eq!(imported_rows(&fake).len(), 3, "two rows, then one");
    assert_eq!(fake.value("2", None, "optout_at").as_deref(), Some("2026-11-23 09:15:07"));
}

#[tokio::test]
async fn an_opt_in_on_a_blank_field_makes_no_import() {
    let fake = FakeRedcap::start(classic("").with_record("1", None, &[("mobile", "4155550101")])).await;
    let out = sink(&fake, |_| {}).converge(&[opt_in("+14155550101")], None).await.unwrap();
    assert_eq!(out[0], json!({"records": ["1"], "written": [], "unchanged": 1, "value": ""}));
    assert_eq!(fake.calls_of(CallKind::Import), 0);
    assert_eq!(fake.calls_of(CallKind::Export), 1);
}

#[tokio::test]
async fn a_stamp_redcap_normalised_is_not_written_again() {
    // Minutes written into a seconds field come back as `HH:MM:00`; seconds
    // written into a minutes field come back without them. Neither differs.
    for (validation, format, stored) in [
        ("datetime_seconds_ymd", TimestampFormat::Minutes, "2026-11-23 09:15:00"),
        ("datetime_ymd", TimestampFormat::Seconds, "2026-11-23 09:15"),
    ] {
        let fake = FakeRedcap::start(classic(validation).with_record("1", None, &[("mobile", "4155550101")])).await;
        let sink = sink(&fake, |c| c.timestamp_format = format);
        sink.converge(&[opt_out("+14155550101")], None).await.unwrap();
        assert_eq!(fake.value("1", None, "optout_at").as_deref(), Some(stored), "{validation}");
        let out = sink.converge(&[opt_out("+14155550101")], None).await.unwrap();
        assert_eq!(out[0]["unchanged"], 1, "{validation}");
        assert_eq!(fake.calls_of(CallKind::Import), 1, "{validation}");
    }
}

#[tokio::test]
async fn whatever_else_the_field_holds_is_overwritten_by_the_target() {
    let fake =
        FakeRedcap::start(
            classic("")
                .with_record("1", None, &[("mobile", "4155550101"), ("optout_at", "yes (phoned us)")])
                .with_record("2", None, &[("mobile", "4155550102"), ("optout_at", "2026-01-01 08:00:00")]),
        )
        .await;
    let sink = sink(&fake, |_| {});
    let later = Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap();
    let out = sink.converge(&[opt_out("+14155550101"), opted_out("+14155550102", later)], None).await.unwrap();
    assert_eq!(written(&out[0]), ["1"]);
    assert_eq!(written(&out[1]), ["2"]);
    assert_eq!(fake.value("1", None, "optout_at").as_deref(), Some("2026-11-23 09:15:07"));
    assert_eq!(fake.value("2", None, "optout_at").as_deref(), Some("2026-12-01 07:00:00"));
}

#[tokio::test]
async fn a_record_with_two_numbers_stays_stamped_when_one_opts_in() {
    // Record 1 holds both numbers (two contacts); the opt-out field is on the record row.
    let fake = FakeRedcap::start(repeating("consent")).await;
    fake.set_value("1", None, "optout_at", "2026-01-01 00:00:00");
    let sink = sink(&fake, |_| {});
    let out = sink.converge(&[opt_in("+14155550199"), opt_out("+14155550101")], None).await.unwrap();
    // The opt-out decides record 1's field: texting someone who said STOP is the harm to avoid.
    assert_eq!(out[0], json!({"records": ["1"], "written": [], "unchanged": 1, "value": ""}));
    assert_eq!(written(&out[1]), ["1", "2"]);
    assert_eq!(fake.value("1", None, "optout_at").as_deref(), Some("2026-11-23 09:15:07"));
}

#[tokio::test]
async fn a_repeating_instance_already_stamped_is_left_alone() {
    let fake = FakeRedcap::start(repeating("contacts")).await;
    let sink = sink(&fake, |_| {});
    sink.converge(&[opt_out("+14155550101")], None).await.unwrap();
    let out = sink.converge(&[opt_out("+14155550101")], None).await.unwrap();
    assert_eq!(out[0]["unchanged"], 2);
    assert_eq!(fake.calls_of(CallKind::Import), 1);
}

// Uncertainty: a write whose outcome is unknown says so, and running the
// same convergence again is the re-check.

#[tokio::test]
async fn a_timed_out_import_is_uncertain_and_the_next_convergence_repairs_its_late_landing() {
    let fake =
        FakeRedcap::start(classic("datetime_seconds_ymd").with_record("1", None, &[("mobile", "4155550101")])).await;
    let sink = sink(&fake, |c| c.request_timeout = Duration::from_millis(300));
    let first_stop = november();
    let second_stop = Utc.with_ymd_and_hms(2026, 11, 24, 10, 0, 0).unwrap();
    sink.converge(&[opted_out("+14155550101", first_stop)], None).await.unwrap();

    // A START whose import times out; REDCap runs it anyway, 3 s after it arrived.
    fake.apply_late_next_import(Duration::from_secs(3));
    match sink.converge(&[opt_in("+14155550101")], None).await {
        Err(SinkError::Uncertain(m)) => {
            assert!(m.contains("did not answer the record import") && m.contains("may still apply"), "{m}");
            assert!(!m.contains(TOKEN));
        }
        other => panic!("{other:?}"),
    }
    // The person texts STOP again before the START lands.
    let out = sink.converge(&[opted_out("+14155550101", second_stop)], None).await.unwrap();
    assert_eq!(written(&out[0]), ["1"]);
    assert_eq!(fake.value("1", None, "optout_at").as_deref(), Some("2026-11-24 05:00:00"));

    // The late START lands and clears the field...
    eventually("the timed-out START applied", || async { fake.late_imports_applied() == 1 }).await;
    assert_eq!(fake.value("1", None, "optout_at").as_deref(), Some(""));
    // ...and the relay's re-check (the same convergence) stamps it back.
    let imports = fake.calls_of(CallKind::Import);
    let out = sink.converge(&[opted_out("+14155550101", second_stop)], None).await.unwrap();
    assert_eq!(written(&out[0]), ["1"]);
    assert_eq!(fake.value("1", None, "optout_at").as_deref(), Some("2026-11-24 05:00:00"));
    assert_eq!(fake.calls_of(CallKind::Import), imports + 1);
    // Converged: the next re-check writes nothing.
    sink.converge(&[opted_out("+14155550101", second_stop)], None).await.unwrap();
    assert_eq!(fake.calls_of(CallKind::Import), imports + 1);
}

#[tokio::test]
async fn a_500_on_import_is_uncertain_while_a_500_on_export_is_transient() {
    let fake = FakeRedcap::start(classic("").with_record("1", None, &[("mobile", "4155550101")])).await;
    let sink = sink(&fake, |_| {});
    fake.fail_next(CallKind::Export, Fault::Status500);
    match sink.converge(&[opt_out("+14155550101")], None).await {
        Err(SinkError::Transient { message, .. }) => assert!(message.contains("500"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(fake.calls_of(CallKind::Import), 0, "a failed read writes nothing");

    fake.fail_next(CallKind::Import, Fault::Status500);
    match sink.converge(&[opt_out("+14155550101")], None).await {
        Err(SinkError::Uncertain(m)) => assert!(m.contains("500") && m.contains("record import"), "{m}"),
        other => panic!("{other:?}"),
    }
    // The re-check finds the field still blank (this 500 wrote nothing) and writes it.
    let out = sink.converge(&[opt_out("+14155550101")], None).await.unwrap();
    assert_eq!(written(&out[0]), ["1"]);
    assert_eq!(fake.value("1", None, "optout_at").as_deref(), Some("2026-11-23 09:15:07"));
}

#[tokio::test]
async fn a_short_import_count_is_uncertain() {
    let fake = FakeRedcap::start(classic("").with_record("1", None, &[("mobile", "4155550101")]).with_record(
        "2",
        None,
        &[("mobile", "4155550101")],
    ))
    .await;
    let sink = sink(&fake, |_| {});
    fake.fail_next(CallKind::Import, Fault::ShortCount);
    match sink.converge(&[opt_out("+14155550101")], None).await {
        Err(SinkError::Uncertain(m)) => assert!(m.contains("1 record(s) updated of 2 sent"), "{m}"),
        other => panic!("{other:?}"),
    }
    // The re-check writes only the record that was not saved.
    let out = sink.converge(&[opt_out("+14155550101")], None).await.unwrap();
    assert_eq!(written(&out[0]), ["2"]);
    assert_eq!(out[0]["unchanged"], 1);
}

#[tokio::test]
async fn an_import_whose_answer_is_cut_off_is_uncertain() {
    let fake = FakeRedcap::start(classic("").with_record("1", None, &[("mobile", "4155550101")])).await;
    let sink = sink(&fake, |_| {});
    fake.fail_next(CallKind::Import, Fault::CutAfterApply);
    match sink.converge(&[opt_out("+14155550101")], None).await {
        Err(SinkError::Uncertain(m)) => assert!(m.contains("record import") && m.contains("may have been"), "{m}"),
        other => panic!("{other:?}"),
    }
    // It was applied: the re-check sees the stamp and writes nothing.
    let out = sink.converge(&[opt_out("+14155550101")], None).await.unwrap();
    assert_eq!(out[0]["unchanged"], 1);
    assert_eq!(fake.calls_of(CallKind::Import), 1);
}

#[tokio::test]
async fn an_import_during_an_outage_is_uncertain_only_once_it_may_have_run() {
    let fake = FakeRedcap::start(classic("").with_record("1", None, &[("mobile", "4155550101")])).await;
    let sink = sink(&fake, |c| c.request_timeout = Duration::from_millis(300));
    // Metadata cached, then REDCap hangs: the export times out, nothing written: transient.
    sink.converge(&[opt_in("+14155550101")], None).await.unwrap();
    fake.set_fault(Fault::Timeout(Duration::from_secs(600)));
    assert!(matches!(sink.converge(&[opt_out("+14155550101")], None).await, Err(SinkError::Transient { .. })));
    // An export that works, then an import that hangs: uncertain.
    fake.fail_next(CallKind::Export, Fault::None);
    assert!(matches!(sink.converge(&[opt_out("+14155550101")], None).await, Err(SinkError::Uncertain(_))));
    fake.clear_fault();
}

// Leases: nothing is started that could not finish before the lease runs out.

#[tokio::test]
async fn a_deadline_too_close_makes_no_call_at_all() {
    let fake = FakeRedcap::start(classic("").with_record("1", None, &[("mobile", "4155550101")])).await;
    let sink = sink(&fake, |c| c.request_timeout = Duration::from_secs(5));
    // Out of time is not a failure of the sink: the relay puts the rows back
    // and leaves the sink's health alone.
    match sink.converge(&[opt_out("+14155550101")], in_(Duration::from_secs(4))).await {
        Err(SinkError::OutOfTime) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(fake.calls(), 0);
    // Already past: the same.
    let past = Some(tokio::time::Instant::now());
    assert!(matches!(sink.converge(&[opt_out("+14155550101")], past).await, Err(SinkError::OutOfTime)));
    assert_eq!(fake.calls(), 0);
    // With the worst case left, it goes through.
    let out = sink.converge(&[opt_out("+14155550101")], in_(sink.worst_case_batch())).await.unwrap();
    assert_eq!(written(&out[0]), ["1"]);
}

#[tokio::test]
async fn a_lease_that_runs_short_during_the_export_stops_before_the_import() {
    let fake = FakeRedcap::start(classic("").with_record("1", None, &[("mobile", "4155550101")])).await;
    let sink = sink(&fake, |c| c.request_timeout = Duration::from_secs(2));
    // 3 s of lease: enough to start the metadata read and the export, but the
    // export takes 1.5 s, and then less than the 2 s timeout is left.
    fake.delay_next(CallKind::Export, Duration::from_millis(1500));
    match sink.converge(&[opt_out("+14155550101")], in_(Duration::from_secs(3))).await {
        Err(SinkError::OutOfTime) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(fake.calls_of(CallKind::Export), 1);
    assert_eq!(fake.calls_of(CallKind::Import), 0);
    assert_eq!(fake.value("1", None, "optout_at").as_deref(), Some(""));
}

#[tokio::test]
async fn the_worst_case_batch_covers_three_calls_and_their_limiter_waits() {
    let fake = FakeRedcap::start(classic("")).await;
    let sink = sink(&fake, |c| {
        c.request_timeout = Duration::from_secs(10);
        c.max_calls_per_minute = 30;
    });
    assert_eq!(sink.request_timeout(), Duration::from_secs(10));
    assert_eq!(sink.worst_case_batch(), Duration::from_secs(3 * (10 + 2)));
}

// Resync: stamps what an opted-out phone's records lack, never clears.

#[tokio::test]
async fn resync_stamps_blank_and_differing_fields_and_never_clears() {
    let fake = FakeRedcap::start(
        classic("datetime_seconds_ymd")
            // Opted out, blank: stamped.
            .with_record("1", None, &[("mobile", "4155550101")])
            // Opted out, another time: stamped with the list's.
            .with_record("2", None, &[("mobile", "(415) 555-0101"), ("optout_at", "2026-01-01 08:00:00")])
            // Opted out, already right: left alone.
            .with_record("3", None, &[("mobile", "4155550102"), ("optout_at", "2026-11-23 09:15:07")])
            // Not on the list, stamped by staff: stays.
            .with_record("4", None, &[("mobile", "4155550199"), ("optout_at", "2026-02-02 10:00:00")])
            // Not on the list, blank: stays blank.
            .with_record("5", None, &[("mobile", "4155550198")]),
    )
    .await;
    let sink = sink(&fake, |_| {});
    let list = [(phone("+14155550101"), november()), (phone("+14155550102"), november())];
    let report = sink.resync(&list).await.unwrap();
    assert_eq!(report, ResyncReport { phones: 2, records_matched: 3, records_stamped: 2 });
    assert_eq!(
        serde_json::to_value(&report).unwrap(),
        json!({"phones": 2, "records_matched": 3, "records_stamped": 2})
    );
    for r in ["1", "2", "3"] {
        assert_eq!(fake.value(r, None, "optout_at").as_deref(), Some("2026-11-23 09:15:07"), "{r}");
    }
    assert_eq!(fake.value("4", None, "optout_at").as_deref(), Some("2026-02-02 10:00:00"));
    assert_eq!(fake.value("5", None, "optout_at").as_deref(), Some(""));
    // One export, one import of only the two that differed, never an overwrite (which could clear).
    assert_eq!(fake.calls_of(CallKind::Export), 1);
    assert_eq!(fake.calls_of(CallKind::Import), 1);
    let log = fake.call_log();
    let import = log.iter().find(|c| c.kind == CallKind::Import).unwrap();
    assert_eq!(import.param("overwriteBehavior"), Some("normal"));
    let mut rows = imported_rows(&fake);
    rows.sort_by_key(|r| r["study_id"].as_str().unwrap().to_owned());
    assert_eq!(
        rows,
        [
            json!({"study_id": "1", "optout_at": "2026-11-23 09:15:07"}),
            json!({"study_id": "2", "optout_at": "2026-11-23 09:15:07"})
        ]
    );

    // Run again: nothing differs, nothing imported.
    let report = sink.resync(&list).await.unwrap();
    assert_eq!(report.records_stamped, 0);
    assert_eq!(fake.calls_of(CallKind::Import), 1);
}

#[tokio::test]
async fn resync_stamps_a_record_added_after_the_stop() {
    let fake = FakeRedcap::start(classic("").with_record("1", None, &[("mobile", "4155550101")])).await;
    let sink = sink(&fake, |_| {});
    sink.converge(&[opt_out("+14155550101")], None).await.unwrap();
    // Enrolled later with the same number (and a number typed into an existing record).
    fake.set_value("7", None, "mobile", "+1 415 555 0101");
    fake.set_value("1", None, "notes", "enrolled before");
    let report = sink.resync(&[(phone("+14155550101"), november())]).await.unwrap();
    assert_eq!(report, ResyncReport { phones: 1, records_matched: 2, records_stamped: 1 });
    assert_eq!(fake.value("7", None, "optout_at").as_deref(), Some("2026-11-23 09:15:07"));
    assert_eq!(imported_rows(&fake).last().unwrap(), &json!({"study_id": "7", "optout_at": "2026-11-23 09:15:07"}));
}

#[tokio::test]
async fn resync_of_no_phones_makes_no_call() {
    let fake = FakeRedcap::start(classic("").with_record("1", None, &[("mobile", "4155550101")])).await;
    assert_eq!(sink(&fake, |_| {}).resync(&[]).await.unwrap(), ResyncReport::default());
    assert_eq!(fake.calls(), 0);
}

#[tokio::test]
async fn resync_imports_in_chunks_of_a_thousand_rows() {
    let nums = numbers(1200);
    let mut project = classic("datetime_seconds_ymd");
    for (i, (typed, _)) in nums.iter().enumerate() {
        project = project.with_record(&(i + 1).to_string(), None, &[("mobile", typed)]);
    }
    let fake = FakeRedcap::start(project).await;
    let list: Vec<(Phone, DateTime<Utc>)> = nums.iter().map(|(_, e164)| (phone(e164), november())).collect();
    let report = sink(&fake, |_| {}).resync(&list).await.unwrap();
    assert_eq!(report, ResyncReport { phones: 1200, records_matched: 1200, records_stamped: 1200 });
    assert_eq!(fake.calls_of(CallKind::Export), 1);
    let sizes: Vec<usize> = fake
        .call_log()
        .iter()
        .filter(|c| c.kind == CallKind::Import)
        .map(|c| serde_json::from_str::<Vec<Value>>(c.param("data").unwrap()).unwrap().len())
        .collect();
    assert_eq!(sizes, [1000, 200]);
    assert_eq!(fake.value("1200", None, "optout_at").as_deref(), Some("2026-11-23 09:15:07"));
}

#[tokio::test]
async fn a_resync_import_that_fails_is_uncertain() {
    let fake = FakeRedcap::start(classic("").with_record("1", None, &[("mobile", "4155550101")])).await;
    let sink = sink(&fake, |_| {});
    fake.fail_next(CallKind::Import, Fault::Status500);
    let list = [(phone("+14155550101"), november())];
    assert!(matches!(sink.resync(&list).await, Err(SinkError::Uncertain(_))));
    fake.fail_next(CallKind::Export, Fault::Status500);
    assert!(matches!(sink.resync(&list).await, Err(SinkError::Transient { .. })));
    assert_eq!(sink.resync(&list).await.unwrap().records_stamped, 1);
}

fn messages(lines: &[optout_relay::sinks::redcap::CheckLine]) -> String {
    lines.iter().map(|l| format!("{} {}\n", if l.ok { "ok  " } else { "FAIL" }, l.message)).collect()
}

#[tokio::test]
async fn check_reports_every_fact_of_a_good_configuration() {
    let fake =
        FakeRedcap::start(classic("datetime_ymd").with_record("1", None, &[("mobile", "4155550101")]).with_record(
            "2",
            None,
            &[("mobile", "")],
        ))
        .await;
    let lines = sink(&fake, |_| {}).check().await;
    let text = messages(&lines);
    assert!(lines.iter().all(|l| l.ok), "{text}");
    for needle in [
        "accepted the API token",
        "`study_id`",
        "phone field `mobile`",
        "opt-out field `optout_at`",
        "datetime_ymd",
        "classic",
        "2 row(s), 1 with a valid phone",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    assert!(!text.contains(TOKEN));
    // check never writes.
    assert_eq!(fake.calls_of(CallKind::Import), 0);
}

#[tokio::test]
async fn check_flags_a_date_only_field_and_a_missing_phone_field() {
    let fake = FakeRedcap::start(classic("date_mdy")).await;
    let lines = sink(&fake, |c| c.phone_field = "cell".into()).check().await;
    let text = messages(&lines);
    let failing: Vec<&str> = lines.iter().filter(|l| !l.ok).map(|l| l.message.as_str()).collect();
    assert_eq!(failing.len(), 2, "{text}");
    assert!(failing.iter().any(|m| m.contains("cell")), "{text}");
    assert!(failing.iter().any(|m| m.contains("date_mdy") && m.contains("date-only")), "{text}");
}

#[tokio::test]
async fn check_verifies_configured_events_of_a_longitudinal_project() {
    let fake = FakeRedcap::start(longitudinal()).await;
    let lines = sink(&fake, |c| {
        c.phone_event = Some("enrolment_arm_1".into());
        c.optout_event = Some("consent_arm_9".into());
    })
    .check()
    .await;
    let text = messages(&lines);
    assert!(lines.iter().any(|l| l.ok && l.message.contains("phone_event `enrolment_arm_1` exists")), "{text}");
    let failing: Vec<&str> = lines.iter().filter(|l| !l.ok).map(|l| l.message.as_str()).collect();
    assert_eq!(failing.len(), 1, "{text}");
    assert!(failing[0].contains("consent_arm_9"), "{text}");
    assert_eq!(fake.calls_of(CallKind::Event), 1);

    // Longitudinal without phone_event is fine: every event is read.
    let lines = sink(&fake, |_| {}).check().await;
    let text = messages(&lines);
    assert!(lines.iter().all(|l| l.ok), "{text}");
    assert!(text.contains("phone field is read in every event"), "{text}");
}

#[tokio::test]
async fn check_stops_at_a_refused_token() {
    let fake = FakeRedcap::start(classic("")).await;
    fake.set_fault(Fault::BadToken);
    let lines = sink(&fake, |_| {}).check().await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(!lines[0].ok);
    assert!(lines[0].message.contains("403") && !lines[0].message.contains(TOKEN), "{}", lines[0].message);
}

#[tokio::test]
async fn check_flags_events_configured_on_a_classic_project() {
    let fake = FakeRedcap::start(classic("")).await;
    let lines = sink(&fake, |c| c.optout_event = Some("consent_arm_1".into())).check().await;
    let failing: Vec<&str> = lines.iter().filter(|l| !l.ok).map(|l| l.message.as_str()).collect();
    assert_eq!(failing.len(), 1, "{lines:?}");
    assert!(failing[0].contains("not longitudinal"), "{}", failing[0]);
    assert_eq!(fake.calls_of(CallKind::Event), 0);
}

// The fake itself: the benchmark and the tests above rely on it behaving like REDCap.

async fn post(fake: &FakeRedcap, params: &[(&str, &str)]) -> (u16, String) {
    let mut form = vec![("token", TOKEN), ("format", "json"), ("returnFormat", "json")];
    form.extend_from_slice(params);
    let res = reqwest::Client::new().post(&fake.url).form(&form).send().await.unwrap();
    (res.status().as_u16(), res.text().await.unwrap())
}

#[tokio::test]
async fn the_fake_follows_the_api_rules() {
    optout_relay::install_tls_provider();
    let fake = FakeRedcap::start(
        classic("datetime_ymd").with_record("1", None, &[("mobile", "415-555-0101"), ("notes", "n1")]).with_record(
            "2",
            None,
            &[("mobile", "(650) 380-3405")],
        ),
    )
    .await;
    // The record id only when asked for.
    let (s, body) = post(&fake, &[("content", "record"), ("type", "flat"), ("fields[0]", "mobile")]).await;
    assert_eq!(s, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!([{"mobile": "415-555-0101"}, {"mobile": "(650) 380-3405"}])
    );
    // Comma lists.
    let (_, body) = post(&fake, &[("content", "record"), ("fields", "study_id,notes")]).await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!([{"study_id": "1", "notes": "n1"}, {"study_id": "2", "notes": ""}])
    );
    // filterLogic is refused: the relay must never send REDCap logic.
    let (s, body) =
        post(&fake, &[("content", "record"), ("fields[0]", "study_id"), ("filterLogic", "[notes] = 'n1'")]).await;
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("filterLogic"), "{body}");
    // Unknown field.
    let (s, body) = post(&fake, &[("content", "record"), ("fields[0]", "nope")]).await;
    assert_eq!(
        (s, body.as_str()),
        (400, r#"{"error":"The following values in the parameter \"fields\" are not valid: 'nope'"}"#)
    );
    // Normal import ignores blanks; overwrite clears; an unknown id creates a record.
    let (s, body) = post(
        &fake,
        &[("content", "record"), ("data", r#"[{"study_id":"1","notes":""},{"study_id":"3","notes":"new"}]"#)],
    )
    .await;
    assert_eq!((s, body.as_str()), (200, r#"{"count":2}"#));
    assert_eq!(fake.value("1", None, "notes").as_deref(), Some("n1"));
    assert_eq!(fake.value("3", None, "notes").as_deref(), Some("new"));
    assert_eq!(fake.record_count(), 3);
    let (_, body) = post(
        &fake,
        &[
            ("content", "record"),
            ("overwriteBehavior", "overwrite"),
            ("returnContent", "ids"),
            ("data", r#"[{"study_id":"1","notes":""}]"#),
        ],
    )
    .await;
    assert_eq!(body, r#"["1"]"#);
    assert_eq!(fake.value("1", None, "notes").as_deref(), Some(""));
    assert_eq!(fake.value("1", None, "mobile").as_deref(), Some("415-555-0101"));
    // Datetime validation on import.
    let (s, body) =
        post(&fake, &[("content", "record"), ("data", r#"[{"study_id":"1","optout_at":"11/23/2026 09:15"}]"#)]).await;
    assert_eq!(s, 400);
    let message = serde_json::from_str::<Value>(&body).unwrap()["error"].as_str().unwrap().to_owned();
    assert!(message.starts_with(r#""1","optout_at","11/23/2026 09:15","#), "{message}");
    let (s, _) =
        post(&fake, &[("content", "record"), ("data", r#"[{"study_id":"1","optout_at":"2026-11-23 09:15:59"}]"#)])
            .await;
    assert_eq!(s, 200);
    assert_eq!(fake.value("1", None, "optout_at").as_deref(), Some("2026-11-23 09:15"));
    // Unknown import field, wrong token, wrong method, unknown content.
    let (s, _) = post(&fake, &[("content", "record"), ("data", r#"[{"study_id":"1","bogus":"x"}]"#)]).await;
    assert_eq!(s, 400);
    fake.set_token("ZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZ");
    let (s, body) = post(&fake, &[("content", "project")]).await;
    assert_eq!((s, body.as_str()), (403, r#"{"error":"You do not have permissions to use the API"}"#));
    fake.set_token(TOKEN);
    assert_eq!(reqwest::get(&fake.url).await.unwrap().status().as_u16(), 501);
    let (s, _) = post(&fake, &[("content", "nonsense")]).await;
    assert_eq!(s, 400);
}

#[tokio::test]
async fn the_fake_longitudinal_import_needs_an_event() {
    optout_relay::install_tls_provider();
    let fake = FakeRedcap::start(longitudinal()).await;
    let (s, _) = post(&fake, &[("content", "record"), ("data", r#"[{"study_id":"1","notes":"x"}]"#)]).await;
    assert_eq!(s, 400);
    let (_, body) =
        post(&fake, &[("content", "record"), ("fields[0]", "study_id"), ("events[0]", "followup_arm_1")]).await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!([{"study_id": "1", "redcap_event_name": "followup_arm_1"}, {"study_id": "2", "redcap_event_name": "followup_arm_1"}])
    );
}

#[tokio::test]
async fn the_fake_exports_20000_records() {
    optout_relay::install_tls_provider();
    let mut project = classic("");
    for i in 0..20_000 {
        project = project.with_record(&i.to_string(), None, &[("mobile", &format!("(415) 555-{:04}", i % 10_000))]);
    }
    let fake = FakeRedcap::start(project).await;
    let form = [
        ("token", TOKEN),
        ("format", "json"),
        ("content", "record"),
        ("fields[0]", "study_id"),
        ("fields[1]", "mobile"),
    ];
    let body = reqwest::Client::new().post(&fake.url).form(&form).send().await.unwrap().text().await.unwrap();
    let rows: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(rows.len(), 20_000);
    assert_eq!(rows[12_345], json!({"study_id": "12345", "mobile": "(415) 555-2345"}));
}

// Repeating instruments: where the opt-out value goes.

/// Contacts repeat; the phone is on them. `optout_form` holds the opt-out field.
fn repeating(optout_form: &str) -> FakeProject {
    FakeProject::new(
        TOKEN,
        &[
            ("study_id", "enrolment", ""),
            ("first_name", "enrolment", ""),
            ("mobile", "contacts", ""),
            ("relation", "contacts", ""),
            ("optout_at", optout_form, "datetime_seconds_ymd"),
        ],
    )
    .with_repeating_forms(&["contacts"])
    .with_record("1", None, &[("first_name", "Ada")])
    .with_instance("1", None, "contacts", 1, &[("mobile", "415-555-0199"), ("relation", "self")])
    .with_instance("1", None, "contacts", 2, &[("mobile", "(415) 555-0101"), ("relation", "mother")])
    .with_instance("2", None, "contacts", 1, &[("mobile", "4155550101"), ("relation", "self")])
}

#[tokio::test]
async fn a_repeating_phone_with_the_opt_out_field_on_its_instrument_stamps_that_instance() {
    let fake = FakeRedcap::start(repeating("contacts")).await;
    let out = sink(&fake, |_| {}).converge(&[opt_out("+14155550101")], None).await.unwrap();

    assert_eq!(out[0]["records"], json!(["1", "2"]));
    let stamp = Some("2026-11-23 09:15:07");
    assert_eq!(fake.instance_value("1", None, "contacts", 2, "optout_at").as_deref(), stamp);
    assert_eq!(fake.instance_value("2", None, "contacts", 1, "optout_at").as_deref(), stamp);
    assert_eq!(fake.instance_value("1", None, "contacts", 1, "optout_at").as_deref(), Some(""), "another number");
    assert_eq!(fake.instance_value("1", None, "contacts", 2, "relation").as_deref(), Some("mother"));
    assert_eq!(fake.row("2", None), None, "no non-repeating row made up");
    let mut rows = imported_rows(&fake);
    rows.sort_by_key(|r| r["study_id"].as_str().unwrap().to_owned());
    assert_eq!(
        rows,
        [
            json!({"study_id": "1", "redcap_repeat_instrument": "contacts", "redcap_repeat_instance": "2", "optout_at": stamp}),
            json!({"study_id": "2", "redcap_repeat_instrument": "contacts", "redcap_repeat_instance": "1", "optout_at": stamp}),
        ]
    );

    // And the opt-in clears exactly those instances.
    sink(&fake, |_| {}).converge(&[opt_in("+14155550101")], None).await.unwrap();
    assert_eq!(fake.instance_value("1", None, "contacts", 2, "optout_at").as_deref(), Some(""));
    assert_eq!(fake.instance_value("2", None, "contacts", 1, "optout_at").as_deref(), Some(""));
}

#[tokio::test]
async fn a_repeating_phone_with_the_opt_out_field_on_a_plain_form_stamps_the_record_row() {
    let fake = FakeRedcap::start(repeating("consent")).await;
    let out = sink(&fake, |_| {}).converge(&[opt_out("+14155550101")], None).await.unwrap();

    assert_eq!(out[0]["records"], json!(["1", "2"]));
    let stamp = Some("2026-11-23 09:15:07");
    assert_eq!(fake.value("1", None, "optout_at").as_deref(), stamp);
    assert_eq!(fake.value("2", None, "optout_at").as_deref(), stamp);
    assert_eq!(fake.value("1", None, "first_name").as_deref(), Some("Ada"), "the rest of the row untouched");
    let mut rows = imported_rows(&fake);
    rows.sort_by_key(|r| r["study_id"].as_str().unwrap().to_owned());
    assert_eq!(rows, [json!({"study_id": "1", "optout_at": stamp}), json!({"study_id": "2", "optout_at": stamp})]);
}

// The fake itself: one-shot faults, short counts, late writes, repeating rules.

#[tokio::test]
async fn the_fakes_one_shot_faults_hit_only_the_next_call_of_their_kind() {
    optout_relay::install_tls_provider();
    let fake = FakeRedcap::start(classic("").with_record("1", None, &[("mobile", "4155550101")])).await;
    fake.fail_next(CallKind::Import, Fault::Status500);
    let export = [("content", "record"), ("fields[0]", "study_id")];
    let import = [("content", "record"), ("data", r#"[{"study_id":"1","notes":"x"}]"#)];
    assert_eq!(post(&fake, &export).await.0, 200, "an export is not the import the fault waits for");
    assert_eq!(post(&fake, &import).await.0, 500);
    assert_eq!(fake.value("1", None, "notes").as_deref(), Some(""), "a failed import writes nothing");
    assert_eq!(post(&fake, &import).await, (200, r#"{"count":1}"#.to_owned()));
    assert_eq!(fake.pending_faults(), 0);

    // A one-shot wins over the standing fault, for one call.
    fake.set_fault(Fault::Status500);
    fake.fail_next(CallKind::Export, Fault::None);
    assert_eq!(post(&fake, &export).await.0, 200);
    assert_eq!(post(&fake, &export).await.0, 500);
    let faults: Vec<Fault> = fake.call_log().into_iter().map(|c| c.fault).collect();
    assert_eq!(faults, [Fault::None, Fault::Status500, Fault::None, Fault::None, Fault::Status500]);
}

#[tokio::test]
async fn the_fakes_short_count_saves_and_counts_one_record_fewer() {
    optout_relay::install_tls_provider();
    let fake = FakeRedcap::start(classic("")).await;
    fake.fail_next(CallKind::Import, Fault::ShortCount);
    let data = r#"[{"study_id":"1","notes":"a"},{"study_id":"2","notes":"b"},{"study_id":"3","notes":"c"}]"#;
    assert_eq!(post(&fake, &[("content", "record"), ("data", data)]).await, (200, r#"{"count":2}"#.to_owned()));
    assert_eq!(fake.value("2", None, "notes").as_deref(), Some("b"));
    assert_eq!(fake.value("3", None, "notes"), None, "the record not counted was not saved");
}

#[tokio::test]
async fn the_fake_applies_a_late_import_after_the_client_gave_up() {
    optout_relay::install_tls_provider();
    let fake = FakeRedcap::start(classic("datetime_seconds_ymd").with_record(
        "1",
        None,
        &[("mobile", "4155550101"), ("optout_at", "2026-11-23 09:15:07")],
    ))
    .await;
    fake.apply_late_next_import(Duration::from_millis(100));
    // A START: clear the stamp. The client waits 200 ms.
    let client = reqwest::Client::builder().timeout(Duration::from_millis(200)).build().unwrap();
    let form = [
        ("token", TOKEN),
        ("format", "json"),
        ("content", "record"),
        ("overwriteBehavior", "overwrite"),
        ("data", r#"[{"study_id":"1","optout_at":""}]"#),
    ];
    let err = client.post(&fake.url).form(&form).send().await.expect_err("no answer in time");
    assert!(err.is_timeout(), "{err}");
    eventually("the START lands after all", || async { fake.value("1", None, "optout_at").as_deref() == Some("") })
        .await;
    assert_eq!(fake.late_imports_applied(), 1);
    let log = fake.call_log();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].fault, Fault::LateApply(Duration::from_millis(100)));
}

#[tokio::test]
async fn the_fake_keeps_repeating_rows_apart() {
    optout_relay::install_tls_provider();
    let fake = FakeRedcap::start(repeating("contacts")).await;
    // Every exported row carries the repeat keys; an instance row only its instrument's fields.
    let (_, body) = post(&fake, &[("content", "record"), ("fields", "study_id,first_name,mobile")]).await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!([
            {"study_id": "1", "redcap_repeat_instrument": "", "redcap_repeat_instance": "", "first_name": "Ada", "mobile": ""},
            {"study_id": "1", "redcap_repeat_instrument": "contacts", "redcap_repeat_instance": "1", "first_name": "", "mobile": "415-555-0199"},
            {"study_id": "1", "redcap_repeat_instrument": "contacts", "redcap_repeat_instance": "2", "first_name": "", "mobile": "(415) 555-0101"},
            {"study_id": "2", "redcap_repeat_instrument": "contacts", "redcap_repeat_instance": "1", "first_name": "", "mobile": "4155550101"},
        ])
    );
    // Instances are exported only for fields on their instrument.
    let (_, body) = post(&fake, &[("content", "record"), ("fields", "study_id,first_name")]).await;
    assert_eq!(serde_json::from_str::<Vec<Value>>(&body).unwrap().len(), 1);

    let import = |data: &'static str| {
        let fake = &fake;
        async move { post(fake, &[("content", "record"), ("data", data)]).await }
    };
    // A repeating form's field needs both keys; a plain form's field neither.
    assert_eq!(import(r#"[{"study_id":"1","relation":"aunt"}]"#).await.0, 400);
    assert_eq!(import(r#"[{"study_id":"1","redcap_repeat_instrument":"contacts","relation":"aunt"}]"#).await.0, 400);
    let plain_on_instance =
        r#"[{"study_id":"1","redcap_repeat_instrument":"contacts","redcap_repeat_instance":"1","first_name":"x"}]"#;
    assert_eq!(import(plain_on_instance).await.0, 400);
    let (s, body) = import(
        r#"[{"study_id":"1","redcap_repeat_instrument":"contacts","redcap_repeat_instance":"3","relation":"aunt"}]"#,
    )
    .await;
    assert_eq!((s, body.as_str()), (200, r#"{"count":1}"#));
    assert_eq!(fake.instance_value("1", None, "contacts", 3, "relation").as_deref(), Some("aunt"));
    assert_eq!(fake.instance_value("1", None, "contacts", 1, "relation").as_deref(), Some("self"));

    // A project without repeating forms has no repeat keys at all.
    let plain = FakeRedcap::start(classic("").with_record("1", None, &[("mobile", "4155550101")])).await;
    let (_, body) = post(&plain, &[("content", "record"), ("fields", "study_id,mobile")]).await;
    assert_eq!(body, r#"[{"study_id":"1","mobile":"4155550101"}]"#);
    let (s, _) = post(
        &plain,
        &[
            ("content", "record"),
            ("data", r#"[{"study_id":"1","redcap_repeat_instrument":"x","redcap_repeat_instance":"1"}]"#),
        ],
    )
    .await;
    assert_eq!(s, 400);
}
