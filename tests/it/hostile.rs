//! Hostile input (issue #12): slow and oversize clients are cut off, odd
//! bytes and odd numbers get a clear answer, nothing in the log gives a
//! phone number away.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::both_backends;
use crate::common::*;

/// Short enough that the tests run fast; the cut-offs are asserted to
/// happen, never how quickly.
const SHORT: Duration = Duration::from_millis(300);
/// Longer than any test waits: a limit set to this never fires in a test.
const NEVER: Duration = Duration::from_secs(3600);

async fn app_with_deadlines(header_read: Duration, body: Duration, idle: Duration) -> TestApp {
    spawn_app_with(Backend::Sqlite, |c| {
        c.server.header_read_timeout = header_read;
        c.server.body_timeout = body;
        c.server.idle_timeout = idle;
    })
    .await
}

/// Reads until the server closes the connection (or resets it); panics if
/// it is still open after `PATIENCE`.
async fn read_until_closed(stream: &mut (impl AsyncReadExt + Unpin)) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(PATIENCE, read_all).await.expect("the server closed the connection");
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads until `needle` has arrived; panics after `PATIENCE`.
async fn read_until(stream: &mut (impl AsyncReadExt + Unpin), needle: &str) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    let read = async {
        while !String::from_utf8_lossy(&out).contains(needle) {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(PATIENCE, read).await.expect("an answer");
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(text.contains(needle), "expected {needle:?} in {text:?}");
    text
}

/// Writes `head` and then one byte of `trickle` every 50 ms, for ever, until
/// the server closes the connection; returns what the server sent.
async fn trickle(app: &TestApp, head: &str, trickle: u8) -> (String, bool) {
    let stream = TcpStream::connect(app.addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    write.write_all(head.as_bytes()).await.unwrap();
    let writer = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if write.write_all(&[trickle]).await.is_err() {
                return;
            }
        }
    });
    let answer = read_until_closed(&mut read).await;
    // The writer never stops by itself: if it is still running, the server
    // closed while the client was still sending.
    let still_sending = !writer.is_finished();
    writer.abort();
    (answer, still_sending)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_trickled_one_byte_at_a_time_are_cut_off() {
    let app = app_with_deadlines(SHORT, NEVER, NEVER).await;
    let (answer, still_sending) =
        trickle(&app, "POST /twilio/messages HTTP/1.1\r\nHost: optout.example.org\r\nX-Padding: ", b'a').await;
    assert!(still_sending, "closed by the server, not by the client giving up");
    assert!(!answer.contains("200 OK"), "no request was served: {answer:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_sends_a_request_is_closed() {
    let app = app_with_deadlines(SHORT, NEVER, NEVER).await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let answer = read_until_closed(&mut stream).await;
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    // Headers may take an hour: what closes the connection is the idle limit.
    let app = app_with_deadlines(NEVER, NEVER, SHORT).await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let first = read_until(&mut stream, "\r\n\r\n").await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first:?}");
    assert!(!first.to_ascii_lowercase().contains("connection: close"), "kept alive: {first:?}");
    // A second request on the same connection is served: keep-alive works...
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    read_until(&mut stream, "HTTP/1.1 200").await;
    // ...and then, with nothing sent, the server hangs up.
    read_until_closed(&mut stream).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickled_one_byte_at_a_time_gets_408() {
    let app = app_with_deadlines(NEVER, SHORT, NEVER).await;
    let head = "POST /twilio/messages HTTP/1.1\r\nHost: x\r\n\
                Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 60000\r\n\r\nBody=";
    let (answer, still_sending) = trickle(&app, head, b'a').await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(still_sending, "answered and closed while the client was still sending");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_declared_length_gets_413_before_any_body() {
    // With no body deadline, waiting for the body would hang the test.
    let app = app_with_deadlines(NEVER, NEVER, NEVER).await;
    for path in ["/twilio/messages", "/v1/opt-outs", "/nowhere"] {
        let mut stream = TcpStream::connect(app.addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: 999999999\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let answer = read_until_closed(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{path}: {answer:?}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_with_an_oversize_length_gets_413_not_100() {
    let app = app_with_deadlines(NEVER, NEVER, NEVER).await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(
            b"POST /twilio/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
              Content-Length: 999999999\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    let answer = read_until_closed(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    assert!(!answer.contains("100 Continue"), "{answer:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_within_the_limit_still_works() {
    let app = app_with_deadlines(NEVER, NEVER, NEVER).await;
    let params = stop_params("SMcontinue", "+14155550401", "STOP", Some("STOP"));
    let sig = optout_relay::twilio::signature::compute(TOKEN, &format!("{PUBLIC_URL}/twilio/messages"), &params);
    let body = encode(&params);
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /twilio/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         X-Twilio-Signature: {sig}\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    read_until(&mut stream, "HTTP/1.1 100 Continue\r\n\r\n").await;
    stream.write_all(body.as_bytes()).await.unwrap();
    read_until(&mut stream, "</Response>").await;
    assert_eq!(event_count(&app.store).await, 1);
    app.stop().await;
}

/// A body over the limit without a declared length (chunked) is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_over_the_limit_gets_413() {
    let app = app_with_deadlines(NEVER, NEVER, NEVER).await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(
            b"POST /twilio/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
              Transfer-Encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 70_000, "a".repeat(70_000));
    let _ = stream.write_all(chunk.as_bytes()).await;
    let answer = read_until(&mut stream, "\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    app.stop().await;
}

const ADMIN: &str = "admin-token-for-hostile-tests";

async fn app_with_admin(backend: Backend) -> TestApp {
    spawn_app_with(backend, |c| c.admin.tokens = vec![secrecy::SecretString::from(ADMIN)]).await
}

async fn a_nul_byte_in_a_signed_webhook_is_stored_as_the_replacement_character(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut params = stop_params("SMnul1", "+14155550402", "STOP\0 please", Some("STOP"));
    params.push(("Odd\0Name".to_owned(), "odd\0value".to_owned()));
    let res = app.post_signed(&params, TOKEN).await;
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap_or_default());
    let events = events(&app.store).await;
    assert_eq!(events.len(), 1, "the opt-out is recorded");
    assert_eq!(events[0].body, "STOP\u{FFFD} please");
    assert_eq!(events[0].kind, "opt_out");
    let params_text = query_texts(&app.db_url, "SELECT CAST(params AS TEXT) FROM events").await;
    assert!(params_text[0].contains("odd\u{FFFD}value"), "{params_text:?}");
    // Twilio's retry of the same message is a duplicate, not a second failure.
    assert_eq!(app.post_signed(&params, TOKEN).await.status(), 200);
    assert_eq!(event_count(&app.store).await, 1);
    app.stop().await;
}

async fn a_nul_byte_in_admin_json_is_stored_as_the_replacement_character(backend: Backend) {
    let app = app_with_admin(backend).await;
    let body = serde_json::json!({
        "phone": "+14155550403", "note": "called\u{0}in", "source": "desk\u{0}1", "scope": "MG\u{0}x"
    });
    let res = app.client.post(app.url("/v1/opt-outs")).bearer_auth(ADMIN).json(&body).send().await.unwrap();
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap_or_default());
    let events = events(&app.store).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].body, "called\u{FFFD}in");
    assert_eq!(events[0].source, "staff:desk\u{FFFD}1");
    assert_eq!(events[0].scope, "MG\u{FFFD}x");
    // A NUL in a query filter matches nothing instead of failing the store.
    let res = app.client.get(app.url("/v1/deliveries?sink=a%00b")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(res.status(), 200);
    app.stop().await;
}

both_backends!(
    a_nul_byte_in_a_signed_webhook_is_stored_as_the_replacement_character,
    a_nul_byte_in_admin_json_is_stored_as_the_replacement_character,
    the_first_webhook_on_a_fresh_database_is_recorded_not_refused,
);

/// The release binary, configured by environment, logging JSON at debug.
fn binary(dir: &std::path::Path, port: u16) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_optout-relay"));
    c.current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("OPTOUT_RELAY__SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("OPTOUT_RELAY__SERVER__PUBLIC_URL", PUBLIC_URL)
        .env("OPTOUT_RELAY__TWILIO__AUTH_TOKENS", TOKEN)
        .env("OPTOUT_RELAY__ADMIN__TOKENS", ADMIN)
        .env("OPTOUT_RELAY__LOG__FORMAT", "json")
        .env("RUST_LOG", "debug,hyper=info,sqlx=warn,reqwest=info");
    c
}

/// Runs the binary, lets `drive` talk to it at its base URL, stops it with
/// SIGTERM and returns everything it logged.
pub(crate) async fn logs_of_binary<F, Fut>(env: &[(&str, &str)], drive: F) -> String
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut command = binary(dir.path(), port);
    command.envs(env.iter().copied());
    let mut child = KillOnDrop(command.arg("serve").stderr(std::process::Stdio::piped()).spawn().unwrap());
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    eventually("the binary answers /healthz", || {
        let (client, url) = (client.clone(), format!("{base}/readyz"));
        async move { client.get(url).send().await.is_ok_and(|r| r.status() == 200) }
    })
    .await;
    drive(base).await;
    let kill = std::process::Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let mut logs = String::new();
    child.0.stderr.take().unwrap().read_to_string(&mut logs).unwrap();
    assert!(child.0.wait().unwrap().success());
    logs
}

/// A child process that a failed test does not leave running.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phone_numbers_in_request_paths_and_rejections_are_masked_in_the_log() {
    optout_relay::install_tls_provider();
    let logs = logs_of_binary(&[], |base| async move {
        let client = reqwest::Client::new();
        let get = |path: &str| client.get(format!("{base}{path}")).bearer_auth(ADMIN).send();
        assert_eq!(get("/v1/phones/+14155550121").await.unwrap().status(), 200);
        assert_eq!(get("/v1/phones/(415)%20555-0122").await.unwrap().status(), 200);
        assert_eq!(get("/v1/phones/+14155550124abc").await.unwrap().status(), 400);
        let post =
            |body: serde_json::Value| client.post(format!("{base}/v1/opt-outs")).bearer_auth(ADMIN).json(&body).send();
        // serde's message quotes the value it could not read.
        let res = post(serde_json::json!({ "phone": 14155550123_u64, "source": "desk" })).await.unwrap();
        assert_eq!(res.status(), 400);
        let res = post(serde_json::json!({ "phone": "+1 415 555 012", "source": "desk" })).await.unwrap();
        assert_eq!(res.status(), 400);
    })
    .await;
    for digits in ["4155550121", "555-0122", "4155550124", "4155550123", "555 012\""] {
        assert!(!logs.contains(digits), "{digits} in the log:\n{logs}");
    }
    assert!(logs.contains("/v1/phones/+1415***0121"), "the path is logged, masked:\n{logs}");
    assert!(logs.contains("request refused"), "the rejections are logged:\n{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_valid_numbers_on_known_channels_are_accepted_from_twilio() {
    let app = spawn_app(Backend::Sqlite).await;
    for (i, from) in
        ["12345", "+12345", "+1234567890123456", "+1415555050", "messenger:+14155550501", "xyz:+14155550501"]
            .iter()
            .enumerate()
    {
        let res = app.post_signed(&stop_params(&format!("SMbad{i}"), from, "STOP", Some("STOP")), TOKEN).await;
        assert_eq!(res.status(), 400, "From={from}");
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["code"], "bad_request", "From={from}");
    }
    assert_eq!(event_count(&app.store).await, 0, "none of them recorded");
    for (sid, from) in [("SMtel", "tel:+14155550502"), ("SMwa", "whatsapp:+14155550503")] {
        assert_eq!(app.post_signed(&stop_params(sid, from, "STOP", Some("STOP")), TOKEN).await.status(), 200);
    }
    let phones: Vec<String> = events(&app.store).await.into_iter().map(|e| e.phone).collect();
    assert_eq!(phones, ["+14155550502", "+14155550503"]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_valid_numbers_are_accepted_by_the_admin_api() {
    let app = app_with_admin(Backend::Sqlite).await;
    for phone in ["12345", "+1234567890123456", "messenger:+14155550504"] {
        let body = serde_json::json!({ "phone": phone, "source": "desk" });
        let res = app.client.post(app.url("/v1/opt-outs")).bearer_auth(ADMIN).json(&body).send().await.unwrap();
        assert_eq!(res.status(), 400, "{phone}");
        let path = format!("/v1/phones/{}", phone.replace('+', "%2B"));
        let res = app.client.get(app.url(&path)).bearer_auth(ADMIN).send().await.unwrap();
        assert_eq!(res.status(), 400, "{path}");
    }
    assert_eq!(event_count(&app.store).await, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_are_404_without_asking_for_a_token() {
    let with_admin = app_with_admin(Backend::Sqlite).await;
    let without_admin = spawn_app(Backend::Sqlite).await;
    for app in [&with_admin, &without_admin] {
        for path in ["/", "/index.php", "/.env", "/twilio", "/v1", "/v2/phones/x", "/healthz/x"] {
            let res = app.client.get(app.url(path)).send().await.unwrap();
            assert_eq!(res.status(), 404, "GET {path}");
            assert!(res.headers().get("www-authenticate").is_none(), "GET {path}");
            let body: serde_json::Value = res.json().await.unwrap();
            assert_eq!(body["code"], "not_found", "GET {path}");
        }
        let res = app.client.post(app.url("/wp-login.php")).body("x").send().await.unwrap();
        assert_eq!(res.status(), 404);
    }
    // The admin routes themselves still want the token.
    let res = with_admin.client.get(with_admin.url("/v1/sinks")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    with_admin.stop().await;
    without_admin.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_answers_413_for_a_body_over_the_limit_and_415_for_a_non_json_body() {
    let app = app_with_admin(Backend::Sqlite).await;
    let post = |body: String, content_type: Option<&str>| {
        let mut req = app.client.post(app.url("/v1/opt-outs")).bearer_auth(ADMIN).body(body);
        if let Some(t) = content_type {
            req = req.header("content-type", t);
        }
        req.send()
    };
    let huge = serde_json::json!({ "phone": "+14155550601", "source": "desk", "note": "x".repeat(70_000) }).to_string();
    assert_eq!(post(huge, Some("application/json")).await.unwrap().status(), 413);
    let fine = serde_json::json!({ "phone": "+14155550601", "source": "desk" }).to_string();
    for content_type in [Some("text/plain"), Some("application/x-www-form-urlencoded"), None] {
        let res = post(fine.clone(), content_type).await.unwrap();
        assert_eq!(res.status(), 415, "{content_type:?}");
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["code"], "unsupported_media_type");
    }
    assert_eq!(event_count(&app.store).await, 0);
    assert_eq!(post(fine, Some("application/json")).await.unwrap().status(), 201, "the same body as JSON is taken");
    app.stop().await;
}

/// The app on a fresh database, built and run the way `serve` runs it:
/// migrations are left to the app (`spawn_app` applies them first).
struct FreshApp {
    addr: std::net::SocketAddr,
    db_url: String,
    store: optout_relay::store::Store,
    shutdown: tokio_util::sync::CancellationToken,
    handle: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

impl FreshApp {
    /// `before` runs on the fresh database before the app starts.
    async fn start(backend: Backend, before: &[&str]) -> FreshApp {
        optout_relay::install_tls_provider();
        let dir = tempfile::tempdir().unwrap();
        let db_url = fresh_database(backend, &dir).await;
        if !before.is_empty() {
            exec(&db_url, before).await;
        }
        let app = optout_relay::startup::Application::build(base_config(&db_url)).await.expect("build app");
        let (addr, store) = (app.local_addr(), app.store().clone());
        let shutdown = tokio_util::sync::CancellationToken::new();
        let handle = tokio::spawn(app.run_until(shutdown.clone()));
        FreshApp { addr, db_url, store, shutdown, handle, _dir: dir }
    }

    /// Sends a signed STOP from `phone`; the answer's status.
    fn stop_from(&self, sid: &str, phone: &str) -> tokio::task::JoinHandle<reqwest::StatusCode> {
        let url = format!("http://{}/twilio/messages", self.addr);
        let params = stop_params(sid, phone, "STOP", Some("STOP"));
        tokio::spawn(async move { send_signed(&reqwest::Client::new(), &url, &params).await })
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(PATIENCE, self.handle).await;
        drop_database(&self.db_url).await;
    }
}

async fn the_first_webhook_on_a_fresh_database_is_recorded_not_refused(backend: Backend) {
    let app = FreshApp::start(backend, &[]).await;
    // At once: the migrations have only just started, if at all.
    let answer = app.stop_from("SMfirst", "+14155550701").await.unwrap();
    assert_eq!(answer, 200);
    assert_eq!(event_count(&app.store).await, 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_is_held_while_the_migrations_cannot_run_and_recorded_once_they_have() {
    // sqlx's own bookkeeping table, as its migrator creates it, locked by
    // this test: the migrator blocks on its first read of it.
    let migrations_table = "CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL, \
        installed_on TIMESTAMPTZ NOT NULL DEFAULT now(), success BOOLEAN NOT NULL, checksum BYTEA NOT NULL, \
        execution_time BIGINT NOT NULL)";
    optout_relay::install_tls_provider();
    let dir = tempfile::tempdir().unwrap();
    let db_url = fresh_database(Backend::Postgres, &dir).await;
    exec(&db_url, &[migrations_table]).await;
    let mut blocker = <sqlx::PgConnection as sqlx::Connection>::connect(&db_url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query("LOCK TABLE _sqlx_migrations IN ACCESS EXCLUSIVE MODE").execute(&mut blocker).await.unwrap();

    let app = optout_relay::startup::Application::build(base_config(&db_url)).await.expect("build app");
    let (addr, store) = (app.local_addr(), app.store().clone());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn(app.run_until(shutdown.clone()));
    eventually("the migrations waiting on the lock", || async {
        let sql =
            "SELECT pid::text FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'";
        !query_texts(&db_url, sql).await.is_empty()
    })
    .await;

    let held_so_far = || async move {
        let text = reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap();
        text.lines()
            .find(|l| l.starts_with("optout_requests_held_for_schema_total"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = held_so_far().await;
    let url = format!("http://{addr}/twilio/messages");
    let params = stop_params("SMheld", "+14155550702", "STOP", Some("STOP"));
    let held = tokio::spawn(async move { send_signed(&reqwest::Client::new(), &url, &params).await });
    // Before the hold it was a 503 at once; now the request waits for the schema.
    eventually("the webhook held for the schema", || async { held_so_far().await > before }).await;
    assert!(!held.is_finished(), "answered while the schema was missing");

    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    assert_eq!(held.await.unwrap(), 200, "answered once the migrations ran");
    assert_eq!(event_count(&store).await, 1, "and recorded");
    shutdown.cancel();
    let _ = tokio::time::timeout(PATIENCE, handle).await;
    drop_database(&db_url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_403_log_line_names_the_urls_the_signature_was_checked_against() {
    optout_relay::install_tls_provider();
    // A public_url with basic-auth credentials, as Twilio allows: they stay out of the log.
    let env = [
        ("OPTOUT_RELAY__SERVER__PUBLIC_URL", "https://relay:pw-in-url@optout.example.org/prefix#rc=2"),
        ("OPTOUT_RELAY__SERVER__ALTERNATE_PUBLIC_URLS", "[\"https://fallback.example.net:8443\"]"),
    ];
    let logs = logs_of_binary(&env, |base| async move {
        let params = stop_params("SM403", "+14155550801", "STOP", Some("STOP"));
        let sig = optout_relay::twilio::signature::compute("wrong-token", "https://optout.example.org", &params);
        let res = reqwest::Client::new()
            .post(format!("{base}/twilio/messages?q=secretquery"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-twilio-signature", sig)
            .body(encode(&params))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 403);
    })
    .await;
    let line = logs.lines().find(|l| l.contains("signature refused")).unwrap_or_else(|| panic!("no 403 line:\n{logs}"));
    assert!(
        line.contains(
            "checked against https://optout.example.org/prefix/twilio/messages, \
             https://fallback.example.net:8443/twilio/messages"
        ),
        "{line}"
    );
    for secret in ["pw-in-url", "secretquery", TOKEN] {
        assert!(!logs.contains(secret), "{secret} in the log:\n{logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_says_what_the_admin_api_does() {
    let app = app_with_admin(Backend::Sqlite).await;
    let doc: serde_json::Value =
        app.client.get(app.url("/v1/openapi.json")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    let op = |path: &str, method: &str| doc["paths"][path][method].clone();
    // Filters are query parameters, not path parameters, and none is required.
    for path in ["/v1/events", "/v1/deliveries"] {
        let params = op(path, "get")["parameters"].as_array().cloned().unwrap_or_default();
        assert!(!params.is_empty(), "{path}");
        for p in &params {
            assert_eq!(p["in"], "query", "{path}: {p}");
            assert_ne!(p["required"], true, "{path}: {p}");
        }
    }
    // What the API refuses, the schema refuses: kind and status are enums.
    let events = op("/v1/events", "get")["parameters"].to_string();
    assert!(events.contains("EventKind"), "{events}");
    let kinds = doc["components"]["schemas"]["EventKind"].to_string();
    for k in ["opt_out", "opt_in", "help"] {
        assert!(kinds.contains(k), "{kinds}");
    }
    let statuses = doc["components"]["schemas"]["DeliveryStatus"].to_string();
    for s in ["pending", "dead", "done"] {
        assert!(statuses.contains(s), "{statuses}");
    }
    // Every operation documents 401, each store-backed one 503, with the error body.
    let mut operations = 0;
    for (path, methods) in doc["paths"].as_object().unwrap() {
        for (method, operation) in methods.as_object().unwrap() {
            operations += 1;
            let responses = &operation["responses"];
            for status in ["401", "503"] {
                let schema = responses[status]["content"]["application/json"]["schema"]["$ref"].as_str();
                assert_eq!(schema, Some("#/components/schemas/ErrorBody"), "{method} {path} {status}");
            }
        }
    }
    // 9, the two review endpoints (issue #10), the lists: import, export, check (issue #11).
    assert_eq!(operations, 14);
    for status in ["400", "404", "409", "413", "415"] {
        assert!(op("/v1/reviews/{id}", "post")["responses"][status].is_object(), "/v1/reviews/{{id}} {status}");
    }
    for path in ["/v1/opt-outs", "/v1/opt-ins"] {
        for status in ["400", "413", "415"] {
            assert!(op(path, "post")["responses"][status].is_object(), "{path} {status}");
        }
    }
    // And the answers are what it says: an error body has the documented fields.
    let res = app.client.get(app.url("/v1/events?kind=maybe")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(res.status(), 400);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["code"], "bad_request");
    assert!(body["detail"].is_string());
    let res = app.client.post(app.url("/v1/deliveries/x/retry")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(res.json::<serde_json::Value>().await.unwrap()["code"], "bad_request");
    app.stop().await;
}
