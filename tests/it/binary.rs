//! The release command line, run the way the container runs it: configured
//! only by environment variables, stopped with SIGTERM.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;

use crate::common::{eventually, eventually_some, send_signed, stop_params, PUBLIC_URL, TOKEN};

const BIN: &str = env!("CARGO_BIN_EXE_optout-relay");

/// A public URL that is not the example's placeholder, for a `check-config` that passes.
const REAL_PUBLIC_URL: &str = "https://optout.hospital.test";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn command(dir: &std::path::Path, port: u16) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("OPTOUT_RELAY__SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("OPTOUT_RELAY__SERVER__PUBLIC_URL", PUBLIC_URL)
        .env("OPTOUT_RELAY__TWILIO__AUTH_TOKENS", TOKEN)
        .env("OPTOUT_RELAY__LOG__FORMAT", "json")
        .env("RUST_LOG", "debug,hyper=info,sqlx=warn,reqwest=info");
    c
}

/// A spawned `serve` that is killed if the test ends before it stopped it:
/// a failed assertion must not leave a server behind holding the test
/// runner's pipes (the runner would then wait for it forever).
struct Running(Mutex<Child>);

impl Running {
    fn new(child: Child) -> Running {
        Running(Mutex::new(child))
    }
}

impl std::ops::Deref for Running {
    type Target = Mutex<Child>;
    fn deref(&self) -> &Mutex<Child> {
        &self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let child = self.0.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `healthy` (the binary's own `healthcheck`) until it passes; the server must not exit meanwhile.
async fn wait_healthy(child: &Mutex<Child>, healthy: impl Fn() -> bool) {
    eventually("the server answers its healthcheck", || async {
        assert!(child.lock().unwrap().try_wait().unwrap().is_none(), "server exited early");
        healthy()
    })
    .await;
}

fn healthcheck(dir: &std::path::Path, port: u16) -> bool {
    command(dir, port).arg("healthcheck").stderr(Stdio::null()).status().unwrap().success()
}

/// Sends SIGTERM (what `docker stop` sends) and waits for the exit.
async fn terminate(child: &Mutex<Child>) -> ExitStatus {
    let pid = child.lock().unwrap().id();
    assert!(Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success());
    eventually_some("the exit after SIGTERM", || async { child.lock().unwrap().try_wait().unwrap() }).await
}

fn stderr_of(child: &Mutex<Child>) -> String {
    let mut logs = String::new();
    child.lock().unwrap().stderr.take().unwrap().read_to_string(&mut logs).unwrap();
    logs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_the_embedded_default_answers_then_stops_cleanly_on_sigterm() {
    optout_relay::install_tls_provider();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = Running::new(command(dir.path(), port).arg("serve").stderr(Stdio::piped()).spawn().unwrap());
    wait_healthy(&child, || healthcheck(dir.path(), port)).await;

    // A signed STOP over real HTTP to the real binary.
    let params = stop_params("SMbin1", "+14155550101", "STOP", Some("STOP"));
    let url = format!("http://127.0.0.1:{port}/twilio/messages");
    assert_eq!(send_signed(&reqwest::Client::new(), &url, &params).await, 200);
    assert!(dir.path().join("optout-relay.db").exists(), "the default SQLite file is created in the working directory");

    let exit = terminate(&child).await;
    assert!(exit.success(), "exit status {exit:?}");

    let logs = stderr_of(&child);
    assert!(logs.contains("+1415***0101"), "phone masked in the request log:\n{logs}");
    assert!(!logs.contains("+14155550101"), "full phone number leaked into logs");
    assert!(!logs.contains(TOKEN), "auth token leaked into logs");
    assert!(logs.contains("\"outcome\":\"accepted\""), "one line per request with its outcome:\n{logs}");
    assert!(logs.contains("request_id"), "request id logged");
    assert!(logs.contains("latency_ms"), "latency logged");
}

#[test]
fn healthcheck_fails_when_nothing_listens() {
    let dir = tempfile::tempdir().unwrap();
    let status = command(dir.path(), free_port()).arg("healthcheck").stderr(Stdio::null()).status().unwrap();
    assert!(!status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_a_token_starts_but_warns_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = Running::new(
        command(dir.path(), port)
            .env_remove("OPTOUT_RELAY__TWILIO__AUTH_TOKENS")
            .arg("serve")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_healthy(&child, || healthcheck(dir.path(), port)).await;
    assert!(terminate(&child).await.success());
    let logs = stderr_of(&child);
    assert!(logs.contains("every webhook will be refused"), "{logs}");
}

#[test]
fn check_config_lists_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[server]\npublic_url = \"ftp://x\"\n[database]\nurl = \"mysql://x\"\n[keywords]\ndefault_region = \"ZZZ\"\n[relay]\nworkers = 0\n",
    )
    .unwrap();
    let out = command(dir.path(), free_port())
        .env_remove("OPTOUT_RELAY__SERVER__PUBLIC_URL")
        .args(["check-config", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in ["server.public_url", "database.url", "keywords.default_region", "relay.workers"] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    // A typo in a key is refused, not ignored.
    std::fs::write(&file, "[server]\nlisten_addr = \"127.0.0.1:1\"\n").unwrap();
    let out = command(dir.path(), free_port()).args(["check-config", "--config"]).arg(&file).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("listen_addr"));
    // Another command refuses to start, listing the problems as plain lines.
    let out = command(dir.path(), free_port()).args(["serve", "--config"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("  - server.listen_addr in ") && err.contains("check-config"), "{err}");
}

/// check-config fails on what would leave the service unable to work, lists
/// every problem of a file that does not read in one run, with the variable
/// to set, and shows each REDCap failure once.
#[test]
fn check_config_fails_when_the_service_could_not_work() {
    let dir = tempfile::tempdir().unwrap();
    let check = |tweak: &dyn Fn(&mut Command)| {
        let mut c = command(dir.path(), free_port());
        c.env("OPTOUT_RELAY__SERVER__PUBLIC_URL", REAL_PUBLIC_URL);
        tweak(&mut c);
        let out = c.arg("check-config").output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string())
    };
    let (code, text) = check(&|_| {});
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("does not exist yet; serve creates it"), "{text}");
    assert!(!dir.path().join("optout-relay.db").exists(), "check-config created the database");

    let (code, text) = check(&|c| {
        c.env_remove("OPTOUT_RELAY__TWILIO__AUTH_TOKENS");
    });
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("FAIL no Twilio credential") && text.contains("OPTOUT_RELAY__TWILIO__AUTH_TOKENS"), "{text}");

    let (code, text) = check(&|c| {
        c.env("OPTOUT_RELAY__SERVER__PUBLIC_URL", "https://optout.example.org");
    });
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("FAIL server.public_url https://optout.example.org is the example's placeholder"), "{text}");

    let (code, text) = check(&|c| {
        c.env("OPTOUT_RELAY__DATABASE__URL", "postgres://postgres@127.0.0.1:1/nothing_listens")
            .env("OPTOUT_RELAY__DATABASE__ACQUIRE_TIMEOUT", "1s");
    });
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("FAIL database (postgres): ") && text.contains("OPTOUT_RELAY__DATABASE__URL"), "{text}");
    let (code, text) = check(&|c| {
        c.env("OPTOUT_RELAY__DATABASE__URL", "sqlite://no/such/dir/relay.db?mode=rwc");
    });
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("FAIL database: the directory of the SQLite file"), "{text}");

    // A file with several mistakes and a token left out: all of them at once, each once.
    let file = dir.path().join("typos.toml");
    std::fs::write(&file, "[server]\nlisten_adress = \"0.0.0.0:8080\"\n[relay]\nworkrs = 2\n[redcap]\nurl = \"https://r.hospital.test/api/\"\nphone_field = \"phone\"\n").unwrap();
    let (code, text) = check(&|c| {
        c.args(["--config", file.to_str().unwrap()]);
    });
    assert_eq!(code, Some(1), "{text}");
    for needle in [
        "FAIL server.listen_adress in ",
        "FAIL relay.workrs in ",
        "FAIL redcap.optout_field is missing: set optout_field in [redcap] or the environment variable OPTOUT_RELAY__REDCAP__OPTOUT_FIELD",
        "FAIL redcap.token is empty (set OPTOUT_RELAY__REDCAP__TOKEN)",
    ] {
        assert!(text.contains(needle), "{needle:?} in\n{text}");
    }
    assert!(!text.contains('`') && !text.contains("default."), "{text}");
    assert!(text.contains("4 problem(s)"), "{text}");
}

/// Operator commands open the database `serve` or `migrate` made, and create none.
#[test]
fn operator_commands_refuse_a_database_that_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    for args in [&["status"][..], &["status", "+14155550101"], &["opt-out", "+14155550101"], &["replay", "--dead"]] {
        let out = command(dir.path(), free_port()).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        let expected =
            format!("error: store unavailable: no database at {}", dir.path().join("optout-relay.db").display());
        assert!(err.starts_with(&expected) && err.contains("optout-relay migrate"), "{args:?}: {err}");
        assert!(!err.contains("\u{1b}["), "colour codes in a pipe: {err:?}");
        assert!(!dir.path().join("optout-relay.db").exists(), "{args:?} created the database");
    }
    // An existing file without the schema is not quietly migrated either.
    std::fs::write(dir.path().join("optout-relay.db"), b"").unwrap();
    let out = command(dir.path(), free_port()).arg("status").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no schema for this version"));
}

/// Pretty logs written to a pipe carry no colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pretty_logs_into_a_pipe_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = Running::new(
        command(dir.path(), port)
            .env("OPTOUT_RELAY__LOG__FORMAT", "pretty")
            .arg("serve")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_healthy(&child, || healthcheck(dir.path(), port)).await;
    assert!(terminate(&child).await.success());
    let logs = stderr_of(&child);
    assert!(logs.contains("INFO") && logs.contains("handled"), "{logs}");
    assert!(!logs.contains('\u{1b}'), "colour codes in a pipe: {logs:?}");
}

#[test]
fn migrate_creates_the_schema_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let status = command(dir.path(), free_port()).arg("migrate").status().unwrap();
        assert!(status.success());
    }
    assert!(dir.path().join("optout-relay.db").exists());
}

#[test]
fn check_config_asks_redcap_and_refuses_a_date_only_field() {
    use crate::common::fake_redcap::{FakeProject, FakeRedcap};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let token = "0123456789ABCDEF0123456789ABCDEF";
    let good = rt.block_on(FakeRedcap::start(FakeProject::new(
        token,
        &[("record_id", "f", ""), ("phone", "f", ""), ("opted_out_at", "f", "datetime_ymd")],
    )));
    let date_only = rt.block_on(FakeRedcap::start(FakeProject::new(
        token,
        &[("record_id", "f", ""), ("phone", "f", ""), ("opted_out_at", "f", "date_ymd")],
    )));
    let dir = tempfile::tempdir().unwrap();
    let run = |url: &str, tok: &str| {
        command(dir.path(), free_port())
            .env("OPTOUT_RELAY__SERVER__PUBLIC_URL", REAL_PUBLIC_URL)
            .env("OPTOUT_RELAY__REDCAP__URL", url)
            .env("OPTOUT_RELAY__REDCAP__TOKEN", tok)
            .env("OPTOUT_RELAY__REDCAP__PHONE_FIELD", "phone")
            .env("OPTOUT_RELAY__REDCAP__OPTOUT_FIELD", "opted_out_at")
            .arg("check-config")
            .output()
            .unwrap()
    };
    let out = run(&good.url, token);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("configuration OK"), "{text}");
    assert!(!text.contains(token), "token printed: {text}");

    let out = run(&date_only.url, token);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success(), "{text}");
    // Each failure is printed once, and the count says how many there are.
    let fails: Vec<&str> = text.lines().filter(|l| l.starts_with("FAIL ")).collect();
    assert!(fails.iter().any(|l| l.starts_with("FAIL redcap: ")), "{text}");
    let mut unique = fails.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), fails.len(), "{text}");
    assert!(text.contains(&format!("\n{} problem(s)", fails.len())), "{text}");
    for fail in &fails {
        assert_eq!(text.matches(&fail["FAIL ".len()..]).count(), 1, "said twice: {fail}\n{text}");
    }

    let out = run(&good.url, "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success(), "a refused token fails the check: {text}");
    assert!(!text.contains("FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF"), "token printed: {text}");
    drop(rt);
}

/// The runtime stage of the Dockerfile, read from the file itself: its ENV,
/// ENTRYPOINT + CMD and HEALTHCHECK command, so the test follows the image.
struct Image {
    env: Vec<(String, String)>,
    start: Vec<String>,
    healthcheck: Vec<String>,
}

fn image_from_dockerfile() -> Image {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    let runtime = &text[text.rfind("\nFROM ").expect("a FROM line")..];
    // Join continuation lines.
    let joined = runtime.replace("\\\n", " ");
    let json_array = |line: &str| -> Vec<String> {
        let start = line.find('[').expect("exec form");
        serde_json::from_str(&line[start..line.rfind(']').unwrap() + 1]).unwrap()
    };
    let (mut env, mut entrypoint, mut cmd, mut healthcheck) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for line in joined.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("ENV ") {
            for kv in rest.split_whitespace() {
                let (k, v) = kv.split_once('=').unwrap();
                env.push((k.to_owned(), v.to_owned()));
            }
        } else if line.starts_with("ENTRYPOINT ") {
            entrypoint = json_array(line);
        } else if line.starts_with("CMD ") {
            cmd = json_array(line);
        } else if line.starts_with("HEALTHCHECK ") {
            healthcheck = json_array(&line[line.find(" CMD ").unwrap()..]);
        }
    }
    assert_eq!(entrypoint.first().map(String::as_str), Some("/usr/local/bin/optout-relay"));
    assert_eq!(healthcheck.first().map(String::as_str), Some("/usr/local/bin/optout-relay"));
    let start = entrypoint.into_iter().skip(1).chain(cmd).collect();
    Image { env, start, healthcheck: healthcheck.into_iter().skip(1).collect() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_images_start_and_healthcheck_commands_work_as_written() {
    let image = image_from_dockerfile();
    assert_eq!(image.start, ["serve"]);
    assert_eq!(image.healthcheck, ["healthcheck"]);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let run = |args: &[String]| {
        let mut c = Command::new(BIN);
        c.current_dir(dir.path()).env_clear().args(args);
        for (k, v) in &image.env {
            // The image listens on 0.0.0.0:8080; here any free port, same address.
            let v =
                if k == "OPTOUT_RELAY__SERVER__LISTEN" { v.replace(":8080", &format!(":{port}")) } else { v.clone() };
            c.env(k, v);
        }
        c
    };
    let healthy = || run(&image.healthcheck).stderr(Stdio::null()).status().unwrap().success();
    assert!(!healthy(), "unhealthy before start");
    let server = Running::new(run(&image.start).stderr(Stdio::piped()).spawn().unwrap());
    wait_healthy(&server, healthy).await;
    assert!(terminate(&server).await.success(), "SIGTERM (docker stop) exits 0");
    let logs = stderr_of(&server);
    assert!(
        logs.lines().filter(|l| !l.trim().is_empty()).all(|l| l.trim_start().starts_with('{')),
        "JSON logs in the image:\n{logs}"
    );
    assert!(dir.path().join("optout-relay.db").exists(), "SQLite in the working directory (the image's volume)");
}

#[test]
fn operator_commands_answer_without_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let run = |args: &[&str]| command(dir.path(), port).args(args).output().unwrap();
    assert!(run(&["migrate"]).status.success());
    let out = run(&["opt-out", "(415) 555-0188", "--note", "called in", "--source", "desk:amy"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(&["status", "415.555.0188"]);
    assert!(out.status.success());
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["phone"], "+14155550188");
    assert_eq!(status["opted_out"], true);
    assert_eq!(status["events"][0]["source"], "staff:desk:amy");
    let out = run(&["opt-in", "+14155550188"]);
    assert!(out.status.success());
    let status: serde_json::Value = serde_json::from_slice(&run(&["status", "4155550188"]).stdout).unwrap();
    assert_eq!(status["opted_out"], false);
    assert!(!run(&["status", "not-a-number"]).status.success());
    let out = run(&["replay", "--dead"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("re-queued 0"));
}

/// The REDCap sink the sink commands use: nothing listens there, so a running
/// `serve` backs off.
fn with_unreachable_redcap(c: &mut Command) -> &mut Command {
    c.env("OPTOUT_RELAY__REDCAP__URL", "http://127.0.0.1:9/api/")
        .env("OPTOUT_RELAY__REDCAP__TOKEN", "0123456789ABCDEF0123456789ABCDEF")
        .env("OPTOUT_RELAY__REDCAP__PHONE_FIELD", "phone")
        .env("OPTOUT_RELAY__REDCAP__OPTOUT_FIELD", "opted_out_at")
}

/// The `[email]` shorthand: a sink named `email`, not a REDCap one.
fn with_email(c: &mut Command) -> &mut Command {
    c.env("OPTOUT_RELAY__EMAIL__SMTP_HOST", "127.0.0.1")
        .env("OPTOUT_RELAY__EMAIL__SMTP_PORT", "9")
        .env("OPTOUT_RELAY__EMAIL__FROM", "relay@example.org")
        .env("OPTOUT_RELAY__EMAIL__TO", "ops@example.org")
}

fn stdout_json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
}

/// `status` without a phone lists the sinks (health, backlog); `retry SINK`
/// makes a failing sink due now; `resync` refuses a sink that is unknown or
/// not REDCap, saying so. Against the database a `serve` left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_commands_report_release_and_refuse_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let run = |args: &[&str]| with_unreachable_redcap(&mut command(dir.path(), port)).args(args).output().unwrap();

    // Before any `serve`, the sink is configured but unknown to the store.
    assert!(run(&["migrate"]).status.success());
    let out = run(&["status"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let sinks = stdout_json(&out);
    assert_eq!(sinks[0]["name"], "redcap", "{sinks}");
    assert_eq!(sinks[0]["type"], "redcap");
    assert_eq!(sinks[0]["health"], "unknown");
    let out = run(&["retry", "redcap"]);
    assert!(!out.status.success(), "nothing to release before the sink ever ran");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has not run yet"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let server = Running::new(
        with_unreachable_redcap(&mut command(dir.path(), port)).arg("serve").stderr(Stdio::null()).spawn().unwrap(),
    );
    wait_healthy(&server, || healthcheck(dir.path(), port)).await;
    let out = run(&["opt-out", "415-555-0189", "--source", "desk:amy"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let sinks = eventually_some("the sink backing off, as `status` prints it", || async {
        let out = run(&["status"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let sinks = stdout_json(&out);
        (sinks[0]["health"] == "backing_off").then_some(sinks)
    })
    .await;
    assert_eq!(sinks.as_array().unwrap().len(), 1, "{sinks}");
    assert_eq!(sinks[0]["waiting"], 1, "{sinks}");
    assert!(sinks[0]["oldest_waiting_seconds"].as_i64().is_some(), "{sinks}");
    assert!(sinks[0]["failing_since"].is_string() && sinks[0]["last_error"].is_string(), "{sinks}");
    assert!(terminate(&server).await.success());

    // The phone: the sink should hold the opt-out and holds nothing yet.
    let status = stdout_json(&run(&["status", "4155550189"]));
    assert_eq!(status["sinks"][0]["sink"], "redcap", "{status}");
    assert_eq!(status["sinks"][0]["target"]["opted_out"], true);
    assert!(status["sinks"][0]["written"].is_null());
    assert_eq!(status["sinks"][0]["in_sync"], false);

    // Released on demand: due now.
    let before = chrono::Utc::now().timestamp_millis();
    let out = run(&["retry", "redcap"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("sink redcap is due now"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let db = format!("sqlite://{}", dir.path().join("optout-relay.db").display());
    let due =
        crate::common::query_texts(&db, "SELECT CAST(next_probe_at AS TEXT) FROM sinks WHERE name = 'redcap'").await;
    let due: i64 = due[0].parse().unwrap();
    assert!(due >= before - 1000 && due <= chrono::Utc::now().timestamp_millis(), "next_probe_at {due}, now {before}");

    // Unknown sinks and a sink that is not REDCap: a clear refusal, exit ≠ 0.
    for args in [&["retry", "nosuch"][..], &["resync", "nosuch"][..]] {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            err.contains("no sink") && err.contains("nosuch") && err.contains("in the configuration"),
            "{args:?}: {err}"
        );
    }
    let out =
        with_email(with_unreachable_redcap(&mut command(dir.path(), port))).args(["resync", "email"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("email is not a configured REDCap sink"), "{err}");
}

/// The `[sinks.study_a]` file the check-config tests use, pointing at `url`.
fn named_sink_file(dir: &std::path::Path, url: &str) -> std::path::PathBuf {
    let file = dir.join("sinks.toml");
    std::fs::write(
        &file,
        format!(
            "[sinks.study_a]\ntype = \"redcap\"\nurl = \"{url}\"\nphone_field = \"phone\"\n\
             optout_field = \"opted_out_at\"\nscopes = [\"MG11111111111111111111111111111111\"]\n"
        ),
    )
    .unwrap();
    file
}

const STUDY_A_TOKEN: &str = "0123456789ABCDEF0123456789ABCDEF";

fn check_named_sink(dir: &std::path::Path, file: &std::path::Path, token: Option<&str>) -> std::process::Output {
    let mut c = command(dir, free_port());
    c.env("OPTOUT_RELAY__SERVER__PUBLIC_URL", REAL_PUBLIC_URL);
    if let Some(t) = token {
        c.env("OPTOUT_RELAY__SINKS__STUDY_A__TOKEN", t);
    }
    c.args(["check-config", "--config"]).arg(file).output().unwrap()
}

/// `check-config` with a named sink table, its token from the environment:
/// valid; without the token, refused naming it.
#[test]
fn check_config_accepts_a_named_sink_table() {
    use crate::common::fake_redcap::{FakeProject, FakeRedcap};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let good = rt.block_on(FakeRedcap::start(FakeProject::new(
        STUDY_A_TOKEN,
        &[("record_id", "f", ""), ("phone", "f", ""), ("opted_out_at", "f", "datetime_ymd")],
    )));
    let dir = tempfile::tempdir().unwrap();
    let file = named_sink_file(dir.path(), &good.url);
    let out = check_named_sink(dir.path(), &file, Some(STUDY_A_TOKEN));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("configuration OK"), "{text}");
    assert!(!text.contains(STUDY_A_TOKEN), "token printed: {text}");

    let out = check_named_sink(dir.path(), &file, None);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success(), "no token, yet: {text}");
    assert!(text.contains("OPTOUT_RELAY__SINKS__STUDY_A__TOKEN"), "{text}");
    // A bad sink name is a problem too.
    std::fs::write(&file, std::fs::read_to_string(&file).unwrap().replace("study_a", "Study A")).unwrap();
    let out = check_named_sink(dir.path(), &file, Some(STUDY_A_TOKEN));
    assert!(!out.status.success());
    drop(rt);
}

/// ...and REDCap is asked about a named REDCap sink as about the `[redcap]`
/// shorthand: a date-only opt-out field fails the check.
#[test]
fn check_config_asks_redcap_about_a_named_sink() {
    use crate::common::fake_redcap::{FakeProject, FakeRedcap};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let good = rt.block_on(FakeRedcap::start(FakeProject::new(
        STUDY_A_TOKEN,
        &[("record_id", "f", ""), ("phone", "f", ""), ("opted_out_at", "f", "datetime_ymd")],
    )));
    let date_only = rt.block_on(FakeRedcap::start(FakeProject::new(
        STUDY_A_TOKEN,
        &[("record_id", "f", ""), ("phone", "f", ""), ("opted_out_at", "f", "date_ymd")],
    )));
    let dir = tempfile::tempdir().unwrap();
    let out = check_named_sink(dir.path(), &named_sink_file(dir.path(), &good.url), Some(STUDY_A_TOKEN));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(good.calls() > 0, "REDCap was not asked about sink study_a: {text}");

    let out = check_named_sink(dir.path(), &named_sink_file(dir.path(), &date_only.url), Some(STUDY_A_TOKEN));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success(), "a date-only field in study_a passes: {text}");
    assert!(text.contains("FAIL") && text.contains("study_a"), "{text}");

    let out = check_named_sink(dir.path(), &named_sink_file(dir.path(), &good.url), Some(&"F".repeat(32)));
    assert!(!out.status.success(), "a refused token fails the check");
    drop(rt);
}

/// `send-test` signs as Twilio does for the configured public URL and posts
/// to the running service: 200 and a real event on the right configuration,
/// 403 and a hint naming public_url on the wrong one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_posts_a_signed_webhook_and_prints_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let public = format!("http://127.0.0.1:{port}");
    let with_public = |c: &mut Command| {
        c.env("OPTOUT_RELAY__SERVER__PUBLIC_URL", &public);
    };
    let mut serve = command(dir.path(), port);
    with_public(&mut serve);
    let child = Running::new(serve.arg("serve").stderr(Stdio::piped()).spawn().unwrap());
    wait_healthy(&child, || healthcheck(dir.path(), port)).await;

    let run = |args: &[&str], tweak: &dyn Fn(&mut Command)| {
        let mut c = command(dir.path(), port);
        with_public(&mut c);
        tweak(&mut c);
        c.args(args).output().unwrap()
    };
    let out = run(&["send-test", "STOP", "(415) 555-0123"], &|_| {});
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("POST {public}/twilio/messages")), "{text}");
    assert!(text.contains("200 OK") && text.contains("<Response></Response>"), "{text}");
    assert!(text.contains("optout-relay status +14155550123"), "{text}");
    let status = stdout_json(&run(&["status", "+14155550123"], &|_| {}));
    assert_eq!(status["opted_out"], true, "{status}");
    assert_eq!(status["events"][0]["source"], "twilio");
    assert_eq!(status["events"][0]["scope"], "+15005550006");

    // START through --url, naming a Messaging Service: the opt-out is taken back in that scope.
    let url = format!("{public}/twilio/messages");
    let out = run(&["send-test", "START", "+14155550123", "--url", &url, "--messaging-service-sid", "MGtest"], &|_| {});
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let status = stdout_json(&run(&["status", "+14155550123"], &|_| {}));
    assert_eq!(status["events"][0]["kind"], "opt_in", "{status}");
    assert_eq!(status["events"][0]["scope"], "MGtest", "{status}");

    // A token the service does not have: refused as Twilio's would be, with the likely causes.
    let out = run(&["send-test", "STOP", "+14155550124"], &|c| {
        c.env("OPTOUT_RELAY__TWILIO__AUTH_TOKENS", "not-the-token");
    });
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("403 Forbidden") && text.contains("server.public_url"), "{text}");
    // The URL the client signs for is not the one the service knows (another host name, say).
    let other = format!("http://localhost:{port}/twilio/messages");
    let out = run(&["send-test", "STOP", "+14155550124", "--url", &other], &|_| {});
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("403"));
    // No token at all: a plain message, not a request.
    let out = run(&["send-test", "HELP", "+14155550124"], &|c| {
        c.env_remove("OPTOUT_RELAY__TWILIO__AUTH_TOKENS");
    });
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("OPTOUT_RELAY__TWILIO__AUTH_TOKENS"));
    let refused = stdout_json(&run(&["status", "+14155550124"], &|_| {}));
    assert_eq!(refused["events"].as_array().map(Vec::len), Some(0), "{refused}");
    assert!(terminate(&child).await.success());

    // Nothing listening: said so, non-zero.
    let out = run(&["send-test", "STOP", "+14155550125"], &|_| {});
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("Is `optout-relay serve` running"));
}

/// Before any request, `/metrics` describes every series and shows each
/// counter at 0 for its known labels (per configured sink, per task).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_describe_every_series_from_the_start() {
    optout_relay::install_tls_provider();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = Running::new(
        with_unreachable_redcap(&mut command(dir.path(), port)).arg("serve").stderr(Stdio::null()).spawn().unwrap(),
    );
    wait_healthy(&child, || healthcheck(dir.path(), port)).await;
    let scrape =
        || async { reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap().text().await.unwrap() };
    // The relay's workers start once migrations are applied and the sinks registered.
    let text = eventually_some("the relay worker's panic counter", || async {
        let text = scrape().await;
        text.contains("optout_task_panics_total{task=\"relay-redcap-0\"} 0\n").then_some(text)
    })
    .await;
    assert!(terminate(&child).await.success());
    for series in [
        "optout_webhooks_total",
        "optout_events_total",
        "optout_deliveries_total",
        "optout_delivery_attempts_total",
        "optout_pending_deliveries",
        "optout_oldest_pending_delivery_age_seconds",
        "optout_dead_deliveries",
        "optout_sink_up",
        "optout_sink_failing_seconds",
        "optout_task_panics_total",
        "optout_queue_stats_up",
        "optout_queue_stats_last_success_timestamp_seconds",
        "optout_changes_waiting",
        "optout_requests_held_for_schema_total",
    ] {
        assert!(text.contains(&format!("# HELP {series} ")), "{series} not described:\n{text}");
    }
    for outcome in optout_relay::metrics::WEBHOOK_OUTCOMES {
        assert!(text.contains(&format!("optout_webhooks_total{{outcome=\"{outcome}\"}} 0\n")), "{outcome}:\n{text}");
        let streams = format!("optout_webhooks_total{{outcome=\"{outcome}\",channel=\"event_streams\"}} 0\n");
        assert!(text.contains(&streams), "{streams}\n{text}");
    }
    for kind in ["opt_out", "opt_in", "help"] {
        assert!(text.contains(&format!("optout_events_total{{kind=\"{kind}\"}} 0\n")), "{kind}:\n{text}");
    }
    for outcome in optout_relay::metrics::DELIVERY_OUTCOMES {
        let line = format!("optout_deliveries_total{{sink=\"redcap\",outcome=\"{outcome}\"}} 0\n");
        assert!(text.contains(&line), "{line}\n{text}");
    }
    assert!(text.contains("optout_delivery_attempts_total{sink=\"redcap\"} 0\n"), "{text}");
    assert!(text.contains("optout_task_panics_total{task=\"batch-writer-0\"} 0\n"), "{text}");
    assert!(text.contains("optout_pending_deliveries{sink=\"redcap\"} 0\n"), "{text}");
}

/// The relay's lines name the delivery (row) id, the event id and the
/// attempt; a failure's lines say when the next attempt comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_log_lines_carry_the_delivery_the_event_the_attempt_and_the_next_attempt() {
    use crate::common::fake_redcap::{FakeProject, FakeRedcap, Fault};
    optout_relay::install_tls_provider();
    let token = "0123456789ABCDEF0123456789ABCDEF";
    let redcap = FakeRedcap::start(
        FakeProject::new(
            token,
            &[("record_id", "f", ""), ("phone", "f", ""), ("opted_out_at", "f", "datetime_seconds_ymd")],
        )
        .with_record("1", None, &[("phone", "(415) 555-0177"), ("opted_out_at", "")])
        .with_record("2", None, &[("phone", "(415) 555-0178"), ("opted_out_at", "")]),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let configured = || {
        let mut c = command(dir.path(), port);
        c.env("OPTOUT_RELAY__REDCAP__URL", &redcap.url)
            .env("OPTOUT_RELAY__REDCAP__TOKEN", token)
            .env("OPTOUT_RELAY__REDCAP__PHONE_FIELD", "phone")
            .env("OPTOUT_RELAY__REDCAP__OPTOUT_FIELD", "opted_out_at");
        c
    };
    let child = Running::new(
        configured()
            .env("OPTOUT_RELAY__RELAY__RETRY_BASE", "30s")
            .env("OPTOUT_RELAY__RELAY__RETRY_CAP", "60s")
            // Read only at the end: few enough lines that the pipe never fills.
            .env("RUST_LOG", "info,sqlx=warn")
            .arg("serve")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_healthy(&child, || healthcheck(dir.path(), port)).await;
    // Ready means migrated; the sinks are registered a moment later. Under
    // load a STOP sent in between reaches REDCap by the start-up backfill,
    // not by a worker, and this test follows the worker's log lines.
    let db = format!("sqlite://{}?mode=ro", dir.path().join("optout-relay.db").display());
    eventually("the sink registered", || async {
        use sqlx::Connection;
        let Ok(mut conn) = sqlx::SqliteConnection::connect(&db).await else { return false };
        let n: Result<i64, _> = sqlx::query_scalar("SELECT COUNT(*) FROM sinks").fetch_one(&mut conn).await;
        n.is_ok_and(|n| n == 1)
    })
    .await;
    let url = format!("http://127.0.0.1:{port}/twilio/messages");
    let client = reqwest::Client::new();
    let stop = stop_params("SMlog1", "+14155550177", "STOP", Some("STOP"));
    assert_eq!(send_signed(&client, &url, &stop).await, 200);
    eventually("the first record stamped", || async {
        redcap.value("1", None, "opted_out_at").is_some_and(|v| !v.is_empty())
    })
    .await;

    redcap.set_fault(Fault::Status500);
    let stop = stop_params("SMlog2", "+14155550178", "STOP", Some("STOP"));
    assert_eq!(send_signed(&client, &url, &stop).await, 200);
    let status = || {
        let out = configured().args(["status", "+14155550178"]).output().unwrap();
        stdout_json(&out)
    };
    eventually("the second phone's failed attempt recorded", || async {
        status()["sinks"][0]["last_error"].is_string()
    })
    .await;
    assert!(terminate(&child).await.success());

    let logs = stderr_of(&child);
    let lines: Vec<serde_json::Value> = logs.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let with = |message: &str| lines.iter().filter(|l| l["message"] == message).cloned().collect::<Vec<_>>();
    let written = with("sink brought to target");
    assert_eq!(written.len(), 1, "{logs}");
    let w = &written[0];
    assert_eq!(
        (w["sink"].as_str(), w["attempt"].as_i64(), w["opted_out"].as_bool()),
        (Some("redcap"), Some(1), Some(true)),
        "{w}"
    );
    assert!(w["delivery_id"].as_i64().is_some() && w["event_id"].as_i64().is_some(), "{w}");

    let failed = with("not written; retried when the sink's backoff ends (next_attempt_at on the sink's line)");
    assert!(!failed.is_empty(), "{logs}");
    let f = &failed[0];
    assert_eq!(f["attempt"].as_i64(), Some(1), "{f}");
    assert!(f["delivery_id"].as_i64().is_some() && f["event_id"].as_i64() > w["event_id"].as_i64(), "{f}");
    assert_ne!(f["delivery_id"], w["delivery_id"]);
    let sink_line = with("sink failing; backing off");
    let next = sink_line[0]["next_attempt_at"].as_str().unwrap_or_else(|| panic!("{logs}"));
    let next = chrono::DateTime::parse_from_rfc3339(next).unwrap();
    assert!(next > chrono::Utc::now() + chrono::Duration::seconds(10), "30s ± 20% from the failure: {next}");
    assert!(!logs.contains("+14155550177") && !logs.contains("+14155550178"), "phones unmasked");
}
