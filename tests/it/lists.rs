//! Lists over real HTTP and the real binary, against both stores: a CSV
//! list imported (the tools' own exports, invalid rows by line, twice,
//! older than what is known, as a dry run), the suppression list exported
//! (CSV and JSON, by scope), a campaign's numbers checked, and the limits.

use std::process::Command;

use crate::both_backends;
use crate::common::*;
use secrecy::SecretString;
use serde_json::{json, Value};

const ADMIN: &str = "admin-token-for-lists";
const SCOPE_B: &str = "MGbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

fn with_admin(c: &mut optout_relay::config::Config) {
    c.admin.tokens = vec![SecretString::from(ADMIN)];
}

async fn spawn(b: Backend) -> TestApp {
    spawn_app_with(b, with_admin).await
}

/// POSTs a CSV list to /v1/imports with `query`; returns status and body.
async fn import(app: &TestApp, query: &str, csv: &str) -> (u16, Value) {
    let res = app
        .client
        .post(app.url(&format!("/v1/imports{query}")))
        .bearer_auth(ADMIN)
        .header("content-type", "text/csv")
        .body(csv.to_owned())
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn export(app: &TestApp, query: &str) -> (u16, String, String) {
    let res = app.client.get(app.url(&format!("/v1/opt-outs{query}"))).bearer_auth(ADMIN).send().await.unwrap();
    let status = res.status().as_u16();
    let ct = res.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    (status, ct, res.text().await.unwrap())
}

async fn check(app: &TestApp, body: Value) -> (u16, Value) {
    let res = app.client.post(app.url("/v1/phones/check")).bearer_auth(ADMIN).json(&body).send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// `+1415…` → the state of that phone in `scope`: (opted out, since).
async fn state(app: &TestApp, phone: &str, scope: &str) -> Option<(bool, String)> {
    let phone = optout_relay::domain::Phone::parse(phone, phonenumber::country::Id::US).unwrap();
    let states = app.store.states(&phone).await.unwrap();
    states.iter().find(|s| s.scope == scope).map(|s| (s.opted_out, s.since.to_rfc3339()))
}

fn counts(report: &Value) -> (u64, u64, u64, u64) {
    let n = |k: &str| report[k].as_u64().unwrap_or_else(|| panic!("{k} in {report}"));
    (n("rows_read"), n("recorded"), n("unchanged"), n("invalid_count"))
}

async fn the_tools_exports_import_without_editing(b: Backend) {
    let app = spawn(b).await;
    let numero = "Numero Contact ID,First Name,Last Name,Primary Phone,Opt Out Date\n\
                  1001,Ann,Lee,(415) 555-0101,03/04/2025\n\
                  1002,Bo,Kim,415.555.0102,2025-03-05\n";
    let (status, report) = import(&app, "?source=numero", numero).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(counts(&report), (2, 2, 0, 0));
    assert_eq!(state(&app, "+14155550101", "organisation").await, Some((true, "2025-03-04T00:00:00+00:00".into())));

    let spoke = "cell,created_at,reason_code,campaign_id\n+14155550103,2025-02-01 17:01:02+00,stop,7\n";
    let (status, report) = import(&app, "?source=spoke", spoke).await;
    assert_eq!((status, counts(&report)), (200, (1, 1, 0, 0)), "{report}");
    assert_eq!(state(&app, "+14155550103", "organisation").await, Some((true, "2025-02-01T17:01:02+00:00".into())));

    let parsons = "phone,committeeid,vanid\n4155550104,12,9001\n";
    let (status, report) = import(&app, &format!("?scope={SCOPE_B}"), parsons).await;
    assert_eq!((status, counts(&report)), (200, (1, 1, 0, 0)), "{report}");
    // No time: now. A scope given: that scope, not the organisation.
    assert_eq!(state(&app, "+14155550104", SCOPE_B).await.map(|s| s.0), Some(true));
    assert_eq!(state(&app, "+14155550104", "organisation").await, None);

    let events = events(&app.store).await;
    assert_eq!(events.len(), 4);
    assert!(events.iter().all(|e| e.kind == "opt_out" && e.message_sid.starts_with("IM")));
    assert_eq!(events[0].source, "import:numero");
    assert_eq!(events[3].source, "import:api");
    app.stop().await;
}

async fn invalid_rows_are_reported_with_their_line_numbers(b: Backend) {
    let app = spawn(b).await;
    let csv = "phone,date,status\n\
               4155550101,2025-01-01,opt_out\n\
               12345,2025-01-01,opt_out\n\
               \n\
               4155550102,someday,opt_out\n\
               4155550103,2025-01-01,START\n";
    let (status, report) = import(&app, "", csv).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(counts(&report), (4, 2, 0, 2));
    assert_eq!(
        report["invalid"],
        json!([
            {"line": 3, "value": "12345", "reason": "not a phone number"},
            {"line": 5, "value": "someday", "reason": "not a date (YYYY-MM-DD, MM/DD/YYYY or RFC 3339)"},
        ])
    );
    // The status column decides each row's kind.
    assert_eq!(state(&app, "+14155550103", "organisation").await.map(|s| s.0), Some(false));
    // A file with no phone column is refused whole, and says what it found.
    let (status, body) = import(&app, "", "name,email\nAnn,a@example.org\n").await;
    assert_eq!(status, 400);
    assert!(body["detail"].as_str().unwrap().contains("no phone column"), "{body}");
    assert_eq!(event_count(&app.store).await, 2);
    app.stop().await;
}

async fn the_same_file_twice_records_nothing_the_second_time(b: Backend) {
    let app = spawn(b).await;
    // Dated and undated rows, and a row repeated in the file.
    let csv = "phone,opted_out_at\n4155550101,2025-01-01\n4155550102,\n4155550101,2025-01-01\n";
    let (_, first) = import(&app, "", csv).await;
    assert_eq!(counts(&first), (3, 2, 1, 0), "{first}");
    let (_, second) = import(&app, "?source=again", csv).await;
    assert_eq!(counts(&second), (3, 0, 3, 0), "{second}");
    assert_eq!(event_count(&app.store).await, 2);
    app.stop().await;
}

async fn an_old_list_never_undoes_a_later_start(b: Backend) {
    let app = spawn(b).await;
    let phone = "+14155550177";
    assert_eq!(
        app.post_signed(&stop_params("SM00000000000000000000000000000001", phone, "STOP", Some("STOP")), TOKEN)
            .await
            .status(),
        200
    );
    assert_eq!(
        app.post_signed(&stop_params("SM00000000000000000000000000000002", phone, "START", Some("START")), TOKEN)
            .await
            .status(),
        200
    );
    assert_eq!(opted_out(&app.store, phone).await, Some(false));

    // Last year's list for that Messaging Service: kept as history, no change.
    let (_, report) = import(&app, &format!("?scope={SERVICE}"), "phone,date\n4155550177,2025-01-01\n").await;
    assert_eq!(counts(&report), (1, 1, 0, 0), "{report}");
    assert_eq!(opted_out(&app.store, phone).await, Some(false));
    assert_eq!(event_count(&app.store).await, 3, "the old row is kept as history");
    // The same list organisation-wide: older than the START, so the check
    // in that scope (and in every scope) still says opted in.
    import(&app, "", "phone,date\n4155550177,2025-01-01\n").await;
    let (_, body) = check(&app, json!({"phones": [phone], "scope": SERVICE})).await;
    assert_eq!(body["results"][0]["opted_out"], false, "{body}");
    let (_, body) = check(&app, json!({"phones": [phone]})).await;
    assert_eq!(body["results"][0]["opted_out"], false, "{body}");
    // A list newer than the START does opt the phone out again.
    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    import(&app, &format!("?scope={SERVICE}"), &format!("phone,date\n4155550177,{later}\n")).await;
    assert_eq!(opted_out(&app.store, phone).await, Some(true));
    app.stop().await;
}

async fn a_dry_run_records_nothing(b: Backend) {
    let app = spawn(b).await;
    let csv = "phone\n4155550101\n4155550102\nnope\n";
    import(&app, "", "phone\n4155550101\n").await;
    let (status, report) = import(&app, "?dry_run=true", csv).await;
    assert_eq!(status, 200);
    assert_eq!(counts(&report), (3, 1, 1, 1), "{report}");
    assert_eq!(report["dry_run"], true);
    assert_eq!(event_count(&app.store).await, 1);
    let (_, report) = import(&app, "", csv).await;
    assert_eq!(counts(&report), (3, 1, 1, 1), "{report}");
    assert_eq!(event_count(&app.store).await, 2);
    app.stop().await;
}

async fn export_lists_the_opted_out_phones_as_csv_and_json_by_scope(b: Backend) {
    let app = spawn(b).await;
    import(&app, "?source=org", "phone,date\n4155550101,2025-01-01\n4155550102,2025-01-02\n").await;
    import(&app, &format!("?scope={SCOPE_B}&source=b"), "phone,date\n4155550103,2025-01-03\n").await;
    // Opted in again: not listed.
    import(&app, "?kind=opt_in", "phone,date\n4155550102,2025-02-01\n").await;

    let (status, ct, csv) = export(&app, "").await;
    assert_eq!((status, ct.as_str()), (200, "text/csv; charset=utf-8"));
    assert_eq!(
        csv,
        "phone,scope,since,source\n\
         +14155550101,organisation,2025-01-01T00:00:00.000Z,import:org\n\
         +14155550103,MGbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb,2025-01-03T00:00:00.000Z,import:b\n"
    );
    // A scope: its own opt-outs and the organisation-wide ones.
    let (_, _, csv) = export(&app, &format!("?scope={SCOPE_B}")).await;
    assert_eq!(csv.lines().count(), 3, "{csv}");
    let (_, _, csv) = export(&app, "?scope=MGother").await;
    assert_eq!(
        csv.lines().skip(1).collect::<Vec<_>>(),
        vec!["+14155550101,organisation,2025-01-01T00:00:00.000Z,import:org"]
    );

    let (status, ct, body) = export(&app, "?format=json").await;
    assert_eq!((status, ct.as_str()), (200, "application/json"));
    let rows: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        rows,
        json!([
            {"phone": "+14155550101", "scope": "organisation", "since": "2025-01-01T00:00:00Z", "source": "import:org"},
            {"phone": "+14155550103", "scope": SCOPE_B, "since": "2025-01-03T00:00:00Z", "source": "import:b"},
        ])
    );
    let (status, _, _) = export(&app, "?format=xml").await;
    assert_eq!(status, 400);
    app.stop().await;
}

async fn check_answers_each_number_in_the_order_given(b: Backend) {
    let app = spawn(b).await;
    import(&app, "", "phone,date\n4155550101,2025-01-01\n").await;
    import(&app, &format!("?scope={SCOPE_B}"), "phone,date\n4155550102,2025-01-02\n").await;
    let phones = ["415-555-0102", "not a number", "(415) 555-0101", "4155550199", "+1 415 555 0101"];
    let (status, body) = check(&app, json!({"phones": phones})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"results": [
            {"phone": "415-555-0102", "e164": "+14155550102", "opted_out": true, "since": "2025-01-02T00:00:00Z"},
            {"phone": "not a number", "e164": null, "opted_out": false, "since": null, "reason": "not a phone number"},
            {"phone": "(415) 555-0101", "e164": "+14155550101", "opted_out": true, "since": "2025-01-01T00:00:00Z"},
            {"phone": "4155550199", "e164": "+14155550199", "opted_out": false, "since": null},
            {"phone": "+1 415 555 0101", "e164": "+14155550101", "opted_out": true, "since": "2025-01-01T00:00:00Z"},
        ]})
    );
    // In another scope, only the organisation-wide opt-out counts.
    let (_, body) = check(&app, json!({"phones": phones, "scope": "MGother"})).await;
    let out: Vec<bool> =
        body["results"].as_array().unwrap().iter().map(|r| r["opted_out"].as_bool().unwrap()).collect();
    assert_eq!(out, vec![false, false, true, false, true]);
    app.stop().await;
}

async fn limits_are_answered_clearly(b: Backend) {
    let app = spawn_app_with(b, |c| {
        with_admin(c);
        c.lists.max_import_bytes = 4096;
    })
    .await;
    let many: Vec<String> = (0..10_001).map(|i| format!("+1415555{:04}", i % 10_000)).collect();
    let (status, body) = check(&app, json!({"phones": many})).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("at most 10000"), "{body}");
    let (status, body) = check(&app, json!({"phones": &many[..10_000]})).await;
    assert_eq!((status, body["results"].as_array().map(Vec::len)), (200, Some(10_000)));

    let big = format!("phone\n{}", "4155550101\n".repeat(1000));
    let (status, _) = import(&app, "", &big).await;
    assert_eq!(status, 413);
    let res =
        app.client.post(app.url("/v1/imports")).bearer_auth(ADMIN).json(&json!({"phone": "1"})).send().await.unwrap();
    assert_eq!(res.status().as_u16(), 415);
    let (status, _) = import(&app, "?kind=help", "phone\n4155550101\n").await;
    assert_eq!(status, 400);
    let res = app.client.get(app.url("/v1/opt-outs")).send().await.unwrap();
    assert_eq!(res.status().as_u16(), 401);
    // The three routes are in the OpenAPI document, beside the staff opt-out on the same path.
    let doc: Value =
        app.client.get(app.url("/v1/openapi.json")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    for (path, method) in
        [("/v1/imports", "post"), ("/v1/opt-outs", "get"), ("/v1/opt-outs", "post"), ("/v1/phones/check", "post")]
    {
        assert!(doc["paths"][path][method].is_object(), "{method} {path} missing from the OpenAPI document");
    }
    let res = app.client.post(app.url("/v1/phones/check")).json(&json!({"phones": []})).send().await.unwrap();
    assert_eq!(res.status().as_u16(), 401);
    assert_eq!(event_count(&app.store).await, 0);
    app.stop().await;
}

fn cli(app: &TestApp, dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_optout-relay"))
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("OPTOUT_RELAY__DATABASE__URL", &app.db_url)
        .env("OPTOUT_RELAY__LOG__FORMAT", "json")
        .args(args)
        .output()
        .unwrap()
}

async fn the_cli_imports_and_exports(b: Backend) {
    let app = spawn(b).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("numero.csv");
    std::fs::write(&file, "Primary Phone,Opt Out Date\n415-555-0101,03/04/2025\nbad,\n").unwrap();
    let path = file.to_str().unwrap();
    let out = cli(&app, dir.path(), &["import", path, "--dry-run"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("dry run: nothing recorded") && text.contains("would record: 1"), "{text}");
    assert_eq!(event_count(&app.store).await, 0);

    let out = cli(&app, dir.path(), &["import", path, "--scope", SCOPE_B]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("rows read: 2") && text.contains("recorded:  1"), "{text}");
    assert!(text.contains("line 3: \"bad\": not a phone number"), "{text}");
    assert_eq!(events(&app.store).await[0].source, "import:numero.csv");

    let out = cli(&app, dir.path(), &["export", "--scope", SCOPE_B]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("phone,scope,since,source\n+14155550101,{SCOPE_B},2025-03-04T00:00:00.000Z,import:numero.csv\n")
    );
    let out = cli(&app, dir.path(), &["export", "--format", "json"]);
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["phone"], "+14155550101");

    // A file that cannot be read: non-zero.
    assert!(!cli(&app, dir.path(), &["import", "missing.csv"]).status.success());
    std::fs::write(dir.path().join("names.csv"), "name\nAnn\n").unwrap();
    let out = cli(&app, dir.path(), &["import", "names.csv"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no phone column"));
    app.stop().await;
}

both_backends!(
    the_tools_exports_import_without_editing,
    invalid_rows_are_reported_with_their_line_numbers,
    the_same_file_twice_records_nothing_the_second_time,
    an_old_list_never_undoes_a_later_start,
    a_dry_run_records_nothing,
    export_lists_the_opted_out_phones_as_csv_and_json_by_scope,
    check_answers_each_number_in_the_order_given,
    limits_are_answered_clearly,
    the_cli_imports_and_exports,
);
