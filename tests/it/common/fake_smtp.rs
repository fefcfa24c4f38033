//! A minimal in-process SMTP server for the email sink's tests: ESMTP with
//! optional STARTTLS or implicit TLS (a self-signed certificate made at
//! start, for 127.0.0.1 and localhost), AUTH PLAIN/LOGIN against one configured user,
//! and switchable faults. Every accepted message is kept with its envelope,
//! raw data and whether its session was upgraded to TLS.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// A message the server accepted.
#[derive(Debug, Clone)]
pub struct Received {
    pub from: String,
    pub to: Vec<String>,
    /// The DATA as sent (CRLF line ends, dot-stuffing removed).
    pub data: String,
    /// The user the session authenticated as, if it did.
    pub auth_user: Option<String>,
    /// The AUTH mechanism that session used (`PLAIN`, `LOGIN`).
    pub auth_mechanism: Option<String>,
    /// Whether the session was TLS (upgraded with STARTTLS, or implicit) when the message came.
    pub tls: bool,
}

impl Received {
    /// A header's value, unfolded (first occurrence, name case-insensitive).
    pub fn header(&self, name: &str) -> Option<String> {
        let (head, _) = self.split();
        let mut found: Option<String> = None;
        for line in head.split("\r\n") {
            if let Some(value) = found.as_mut() {
                if line.starts_with(' ') || line.starts_with('\t') {
                    value.push_str(line);
                    continue;
                }
                break;
            }
            if let Some((n, v)) = line.split_once(':') {
                if n.eq_ignore_ascii_case(name) {
                    found = Some(v.trim_start().to_owned());
                }
            }
        }
        found.map(|v| v.trim().to_owned())
    }

    /// The body, decoded from its Content-Transfer-Encoding, with LF line ends.
    pub fn body(&self) -> String {
        let (_, raw) = self.split();
        let encoding = self.header("Content-Transfer-Encoding").unwrap_or_default().to_ascii_lowercase();
        let text = match encoding.as_str() {
            "quoted-printable" => decode_quoted_printable(raw),
            "base64" => {
                let compact: String = raw.chars().filter(|c| !c.is_whitespace()).collect();
                let bytes = base64::engine::general_purpose::STANDARD.decode(compact).expect("base64 body");
                String::from_utf8(bytes).expect("utf-8 body")
            }
            _ => raw.to_owned(),
        };
        text.replace("\r\n", "\n")
    }

    fn split(&self) -> (&str, &str) {
        self.data.split_once("\r\n\r\n").unwrap_or((self.data.as_str(), ""))
    }
}

fn decode_quoted_printable(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' {
            if bytes[i + 1..].starts_with(b"\r\n") {
                i += 3; // soft line break
                continue;
            }
            if let Some(hex) = raw.get(i + 1..i + 3) {
                if let Ok(b) = u8::from_str_radix(hex, 16) {
                    out.push(b);
                    i += 3;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).expect("utf-8 body")
}

/// What the server does wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Stops listening (connections are refused) and drops open sessions.
    Down,
    /// `451 4.3.0` to RCPT TO.
    RcptTransient,
    /// `550 5.1.1` to RCPT TO.
    RcptPermanent,
}

struct State {
    messages: Vec<Received>,
    fault: Fault,
    /// RCPT faults: transactions to let through first, then how many to fail
    /// (None: every one).
    fault_skip: u32,
    fault_times: Option<u32>,
    credentials: Option<(String, String)>,
    mechanisms: Vec<&'static str>,
    auth_attempts: u32,
    connections: u32,
    /// Offered in EHLO when set.
    starttls: Option<TlsAcceptor>,
    /// Every connection starts with a TLS handshake when set (port 465 style).
    implicit_tls: Option<TlsAcceptor>,
    /// A refused login's reply repeats the password, plain and base64, as a
    /// careless server might: the client must not pass it on.
    echo_credentials: bool,
    /// Sessions upgraded with STARTTLS.
    upgrades: u32,
    /// AUTH commands received on a session that was not (yet) TLS.
    plaintext_auth_attempts: u32,
}

pub struct FakeSmtp {
    addr: SocketAddr,
    /// The self-signed certificate STARTTLS or implicit TLS presents (PEM).
    certificate_pem: Option<String>,
    state: Arc<Mutex<State>>,
    accept: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    sessions: Sessions,
}

/// Open sessions' tasks, so an outage can drop them.
type Sessions = Arc<Mutex<Vec<JoinHandle<()>>>>;

impl FakeSmtp {
    /// A server without credentials: it advertises AUTH but refuses every login.
    pub async fn start() -> FakeSmtp {
        Self::start_inner(None, Tls::None).await
    }

    /// A server that requires a login as `user`/`password` before MAIL.
    pub async fn start_with_auth(user: &str, password: &str) -> FakeSmtp {
        Self::start_inner(Some((user.to_owned(), password.to_owned())), Tls::None).await
    }

    /// A server that offers STARTTLS with a self-signed certificate for
    /// 127.0.0.1 and localhost (see `certificate_pem`).
    pub async fn start_with_starttls() -> FakeSmtp {
        Self::start_inner(None, Tls::Starttls).await
    }

    /// STARTTLS offered and a login as `user`/`password` required before MAIL.
    pub async fn start_with_auth_and_starttls(user: &str, password: &str) -> FakeSmtp {
        Self::start_inner(Some((user.to_owned(), password.to_owned())), Tls::Starttls).await
    }

    /// A server that speaks TLS from the first byte (port 465 style), with
    /// the same self-signed certificate as `start_with_starttls`, and
    /// requires a login as `user`/`password` before MAIL.
    pub async fn start_with_auth_and_implicit_tls(user: &str, password: &str) -> FakeSmtp {
        Self::start_inner(Some((user.to_owned(), password.to_owned())), Tls::Implicit).await
    }

    async fn start_inner(credentials: Option<(String, String)>, tls: Tls) -> FakeSmtp {
        let (acceptor, certificate_pem) = match tls {
            Tls::None => (None, None),
            Tls::Starttls | Tls::Implicit => {
                let (acceptor, pem) = self_signed_acceptor();
                (Some(acceptor), Some(pem))
            }
        };
        let (starttls, implicit_tls) = if tls == Tls::Implicit { (None, acceptor) } else { (acceptor, None) };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake SMTP");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(State {
            messages: Vec::new(),
            fault: Fault::None,
            fault_skip: 0,
            fault_times: None,
            credentials,
            mechanisms: vec!["PLAIN", "LOGIN"],
            auth_attempts: 0,
            connections: 0,
            starttls,
            implicit_tls,
            echo_credentials: false,
            upgrades: 0,
            plaintext_auth_attempts: 0,
        }));
        let sessions = Sessions::default();
        let accept = tokio::spawn(accept_loop(listener, state.clone(), sessions.clone()));
        FakeSmtp { addr, certificate_pem, state, accept: tokio::sync::Mutex::new(Some(accept)), sessions }
    }

    /// The certificate STARTTLS presents, PEM: a client trusts the server by adding it as a root.
    pub fn certificate_pem(&self) -> &str {
        self.certificate_pem.as_deref().expect("started with TLS")
    }

    /// Sessions upgraded with STARTTLS.
    pub fn tls_upgrades(&self) -> u32 {
        self.lock().upgrades
    }

    /// AUTH commands received before a session was upgraded to TLS.
    pub fn plaintext_auth_attempts(&self) -> u32 {
        self.lock().plaintext_auth_attempts
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn messages(&self) -> Vec<Received> {
        self.lock().messages.clone()
    }

    /// AUTH commands received (successful or not).
    pub fn auth_attempts(&self) -> u32 {
        self.lock().auth_attempts
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> u32 {
        self.lock().connections
    }

    /// Makes a refused login's reply repeat the password (see `State::echo_credentials`).
    pub fn echo_credentials_on_refusal(&self) {
        self.lock().echo_credentials = true;
    }

    /// The AUTH mechanisms advertised in EHLO (default PLAIN and LOGIN).
    pub fn advertise_auth(&self, mechanisms: &[&'static str]) {
        self.lock().mechanisms = mechanisms.to_vec();
    }

    /// Sets a fault for every transaction from now on (`Fault::None` heals,
    /// listening again on the same port after `Fault::Down`).
    pub async fn set_fault(&self, fault: Fault) {
        self.set_fault_for(fault, 0, None).await;
    }

    /// Lets `skip` transactions through, then applies an RCPT fault to the
    /// next `times` ones (None: all).
    pub async fn set_fault_for(&self, fault: Fault, skip: u32, times: Option<u32>) {
        {
            let mut s = self.lock();
            s.fault = fault;
            s.fault_skip = skip;
            s.fault_times = times;
        }
        let mut accept = self.accept.lock().await;
        match fault {
            Fault::Down => {
                if let Some(task) = accept.take() {
                    task.abort();
                    // Wait until the listener is dropped, so connecting is refused from now on.
                    let _ = task.await;
                }
                let open: Vec<JoinHandle<()>> = std::mem::take(&mut *self.sessions.lock().expect("sessions"));
                for task in open {
                    task.abort();
                    let _ = task.await;
                }
            }
            _ => {
                if accept.is_none() {
                    let listener = TcpListener::bind(self.addr).await.expect("listen again on the same port");
                    *accept = Some(tokio::spawn(accept_loop(listener, self.state.clone(), self.sessions.clone())));
                }
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("fake SMTP state")
    }
}

impl Drop for FakeSmtp {
    fn drop(&mut self) {
        if let Ok(mut accept) = self.accept.try_lock() {
            if let Some(task) = accept.take() {
                task.abort();
            }
        }
        if let Ok(mut open) = self.sessions.lock() {
            for task in open.drain(..) {
                task.abort();
            }
        }
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<Mutex<State>>, sessions: Sessions) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        state.lock().expect("state").connections += 1;
        let task = tokio::spawn(session(stream, state.clone()));
        let mut open = sessions.lock().expect("sessions");
        open.retain(|t| !t.is_finished());
        open.push(task);
    }
}

/// How a server speaks TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tls {
    None,
    Starttls,
    Implicit,
}

/// The SMTP transaction in progress on one connection.
#[derive(Default)]
struct Transaction {
    from: Option<String>,
    to: Vec<String>,
}

/// A session's byte stream, plain or TLS: one type so the dialogue is written once.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Reads lines and writes replies on one connection (tokio's `BufReader` writes through).
type Conn = BufReader<Box<dyn Stream>>;

async fn session(stream: TcpStream, state: Arc<Mutex<State>>) {
    let implicit = state.lock().expect("state").implicit_tls.clone();
    let (mut conn, mut tls): (Conn, bool) = match implicit {
        Some(acceptor) => {
            let Ok(secured) = acceptor.accept(stream).await else { return };
            (BufReader::new(Box::new(secured)), true)
        }
        None => (BufReader::new(Box::new(stream)), false),
    };
    let mut auth_user: Option<String> = None;
    let mut auth_mechanism: Option<String> = None;
    let mut tx = Transaction::default();
    if reply(&mut conn, "220 fake.smtp.test ESMTP ready").await.is_err() {
        return;
    }
    loop {
        let Some(line) = read_line(&mut conn).await else { return };
        let fault = state.lock().expect("state").fault;
        if fault == Fault::Down {
            // Drop the connection without an answer, like a server that went away.
            return;
        }
        let upper = line.to_ascii_uppercase();
        let verb = upper.split_whitespace().next().unwrap_or("").to_owned();
        let answer: String = match verb.as_str() {
            "EHLO" | "HELO" => {
                tx = Transaction::default();
                let (mechanisms, offers_tls) = {
                    let s = state.lock().expect("state");
                    (s.mechanisms.join(" "), s.starttls.is_some())
                };
                let mut lines = vec!["250-fake.smtp.test greets you".to_owned(), "250-8BITMIME".to_owned()];
                if offers_tls && !tls {
                    lines.push("250-STARTTLS".to_owned());
                }
                if !mechanisms.is_empty() {
                    lines.push(format!("250-AUTH {mechanisms}"));
                }
                lines.push("250 SIZE 10485760".to_owned());
                lines.join("\r\n")
            }
            "AUTH" => {
                let words: Vec<&str> = line.split_whitespace().collect();
                let mechanism = words.get(1).map(|m| m.to_ascii_uppercase()).unwrap_or_default();
                let initial = words.get(2).map(|s| (*s).to_owned());
                let Some((user, password)) = (match mechanism.as_str() {
                    "PLAIN" => auth_plain(&mut conn, initial).await,
                    "LOGIN" => auth_login(&mut conn, initial).await,
                    _ => {
                        if reply(&mut conn, "504 5.5.4 Unrecognized authentication type").await.is_err() {
                            return;
                        }
                        continue;
                    }
                }) else {
                    return;
                };
                let mut s = state.lock().expect("state");
                s.auth_attempts += 1;
                if !tls {
                    s.plaintext_auth_attempts += 1;
                }
                if s.credentials.as_ref().is_some_and(|(u, p)| *u == user && *p == password) {
                    auth_user = Some(user);
                    auth_mechanism = Some(mechanism.clone());
                    "235 2.7.0 Authentication successful".to_owned()
                } else if s.echo_credentials {
                    let encoded = base64::engine::general_purpose::STANDARD.encode(&password);
                    format!("535 5.7.8 Authentication credentials invalid for {user} / {password} ({encoded})")
                } else {
                    "535 5.7.8 Authentication credentials invalid".to_owned()
                }
            }
            "MAIL" => {
                let needs_auth = state.lock().expect("state").credentials.is_some();
                if needs_auth && auth_user.is_none() {
                    "530 5.7.0 Authentication required".to_owned()
                } else {
                    tx = Transaction { from: Some(address(&line)), to: Vec::new() };
                    "250 2.1.0 Ok".to_owned()
                }
            }
            "RCPT" => {
                if tx.from.is_none() {
                    "503 5.5.1 Need MAIL before RCPT".to_owned()
                } else {
                    // A fault applies once per transaction, at its first recipient.
                    match if tx.to.is_empty() { take_fault(&state) } else { Fault::None } {
                        Fault::RcptTransient => "451 4.3.0 Mailbox temporarily unavailable, try again later".to_owned(),
                        Fault::RcptPermanent => "550 5.1.1 Mailbox unavailable".to_owned(),
                        _ => {
                            tx.to.push(address(&line));
                            "250 2.1.5 Ok".to_owned()
                        }
                    }
                }
            }
            "DATA" => {
                if tx.to.is_empty() {
                    "503 5.5.1 Need RCPT before DATA".to_owned()
                } else {
                    if reply(&mut conn, "354 End data with <CR><LF>.<CR><LF>").await.is_err() {
                        return;
                    }
                    let mut data: Vec<String> = Vec::new();
                    loop {
                        let Some(l) = read_line(&mut conn).await else { return };
                        if l == "." {
                            break;
                        }
                        data.push(l.strip_prefix('.').map(str::to_owned).unwrap_or(l));
                    }
                    let done = std::mem::take(&mut tx);
                    let mut s = state.lock().expect("state");
                    s.messages.push(Received {
                        from: done.from.unwrap_or_default(),
                        to: done.to,
                        data: data.join("\r\n"),
                        auth_user: auth_user.clone(),
                        auth_mechanism: auth_mechanism.clone(),
                        tls,
                    });
                    format!("250 2.0.0 Ok: queued as Q{}", s.messages.len())
                }
            }
            "RSET" => {
                tx = Transaction::default();
                "250 2.0.0 Ok".to_owned()
            }
            "NOOP" => "250 2.0.0 Ok".to_owned(),
            "STARTTLS" => {
                let acceptor = state.lock().expect("state").starttls.clone();
                match acceptor {
                    Some(acceptor) if !tls => {
                        // Anything the client sent after STARTTLS before the handshake
                        // would be plaintext injected into the TLS session (CVE-2011-0411).
                        if !conn.buffer().is_empty() {
                            let _ = reply(&mut conn, "501 5.5.1 Pipelined data after STARTTLS").await;
                            return;
                        }
                        if reply(&mut conn, "220 2.0.0 Ready to start TLS").await.is_err() {
                            return;
                        }
                        let Ok(upgraded) = acceptor.accept(conn.into_inner()).await else { return };
                        conn = BufReader::new(Box::new(upgraded));
                        tls = true;
                        state.lock().expect("state").upgrades += 1;
                        // RFC 3207: the client starts over with EHLO; nothing from before counts.
                        auth_user = None;
                        auth_mechanism = None;
                        tx = Transaction::default();
                        continue;
                    }
                    Some(_) => "503 5.5.1 TLS already active".to_owned(),
                    None => "454 4.7.0 TLS not available".to_owned(),
                }
            }
            "QUIT" => {
                let _ = reply(&mut conn, "221 2.0.0 Bye").await;
                return;
            }
            _ => "502 5.5.2 Command not recognized".to_owned(),
        };
        if reply(&mut conn, &answer).await.is_err() {
            return;
        }
    }
}

/// The fault for the transaction starting now, counting it against skip/times.
fn take_fault(state: &Arc<Mutex<State>>) -> Fault {
    let mut s = state.lock().expect("state");
    if matches!(s.fault, Fault::None | Fault::Down) {
        return Fault::None;
    }
    if s.fault_skip > 0 {
        s.fault_skip -= 1;
        return Fault::None;
    }
    match s.fault_times {
        Some(0) => Fault::None,
        Some(n) => {
            s.fault_times = Some(n - 1);
            s.fault
        }
        None => s.fault,
    }
}

/// `AUTH PLAIN [initial]`: `authzid \0 user \0 password`, base64.
async fn auth_plain(conn: &mut Conn, initial: Option<String>) -> Option<(String, String)> {
    let encoded = match initial {
        Some(i) => i,
        None => {
            reply(conn, "334 ").await.ok()?;
            read_line(conn).await?
        }
    };
    let decoded = decode64(&encoded);
    let mut parts = decoded.split('\0').skip(1);
    Some((parts.next().unwrap_or("").to_owned(), parts.next().unwrap_or("").to_owned()))
}

/// `AUTH LOGIN [user]`: user and password in turn, base64.
async fn auth_login(conn: &mut Conn, initial: Option<String>) -> Option<(String, String)> {
    let user = match initial {
        Some(i) => i,
        None => {
            reply(conn, "334 VXNlcm5hbWU6").await.ok()?;
            read_line(conn).await?
        }
    };
    reply(conn, "334 UGFzc3dvcmQ6").await.ok()?;
    let password = read_line(conn).await?;
    Some((decode64(&user), decode64(&password)))
}

fn decode64(s: &str) -> String {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s.trim()).unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The address in `MAIL FROM:<a@b> …` / `RCPT TO:<a@b>`.
fn address(line: &str) -> String {
    match (line.find('<'), line.find('>')) {
        (Some(start), Some(end)) if start < end => line[start + 1..end].to_owned(),
        _ => line.split_once(':').map(|(_, a)| a.trim().to_owned()).unwrap_or_default(),
    }
}

async fn read_line(conn: &mut Conn) -> Option<String> {
    let mut buf = Vec::new();
    match conn.read_until(b'\n', &mut buf).await {
        Ok(0) | Err(_) => None,
        Ok(_) => {
            let text = String::from_utf8_lossy(&buf).into_owned();
            Some(text.trim_end_matches(['\r', '\n']).to_owned())
        }
    }
}

async fn reply(conn: &mut Conn, text: &str) -> std::io::Result<()> {
    conn.write_all(format!("{text}\r\n").as_bytes()).await?;
    conn.flush().await
}

/// A TLS acceptor with a fresh self-signed certificate for 127.0.0.1 and
/// localhost, and that certificate as PEM.
fn self_signed_acceptor() -> (TlsAcceptor, String) {
    let names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
    let certified = rcgen::generate_simple_self_signed(names).expect("self-signed certificate");
    let key = rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der()).expect("key DER");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .expect("server TLS config");
    (TlsAcceptor::from(Arc::new(config)), certified.cert.pem())
}
