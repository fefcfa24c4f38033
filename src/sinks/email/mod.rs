//! Notification email: one message per change of a phone's opt-out state,
//! to every configured address, saying what changed, what caused it and
//! what the other sinks did; and an alert when a sink has been failing too
//! long. It replaces the REDCap module's "Notification Email", which was
//! silent when no record matched; here staff also hear about changes that
//! matched nothing and, above all, about REDCap updates that failed.
//!
//! The sink knows nothing of the store: the relay hands it a `Notification`
//! (the change, its cause and the other sinks' outcomes) or an `Alert`, and
//! this module only writes and sends. `compose` holds the words, `mod` the
//! SMTP side: transport, TLS, and what each failure means for a retry.

mod compose;

use base64::Engine as _;
use chrono_tz::Tz;
use lettre::message::header::{Header, HeaderName, HeaderValue};
use lettre::message::{Mailbox, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};

use self::compose::Notice;
use super::{Alert, Notification, ReviewItem, SinkError};
use crate::config::{EmailConfig, EmailTls};

/// Sends the notification email over SMTP (a pooled lettre transport).
pub struct EmailSink {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    /// `host:port`, for error messages.
    server: String,
    from: Mailbox,
    to: Vec<Mailbox>,
    tz: Tz,
    /// Kept only to scrub it from error text, should a server ever echo it.
    password: Option<SecretString>,
    /// The SMTP timeout: the longest one message can take.
    timeout: std::time::Duration,
}

/// What the server said to a message it accepted.
struct Sent {
    message_id: String,
    reply: String,
}

impl EmailSink {
    /// Builds the transport (nothing is connected yet) and checks the
    /// addresses and zone. The error names the offending setting.
    pub fn new(cfg: &EmailConfig) -> Result<EmailSink, String> {
        // STARTTLS/TLS use rustls without a built-in provider choice.
        crate::install_tls_provider();
        let from: Mailbox =
            cfg.from.parse().map_err(|e| format!("email.from {:?} is not a valid address: {e}", cfg.from))?;
        if cfg.to.is_empty() {
            return Err("email.to must list at least one address".to_owned());
        }
        let to = cfg
            .to
            .iter()
            .map(|a| a.parse::<Mailbox>().map_err(|e| format!("email.to {a:?} is not a valid address: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let tz: Tz =
            cfg.timezone.parse().map_err(|_| format!("email.timezone {:?} is not an IANA zone name", cfg.timezone))?;
        let host = cfg.smtp_host.trim();
        if host.is_empty() {
            return Err("email.smtp_host is empty".to_owned());
        }
        let plain = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host);
        let builder = match cfg.tls {
            EmailTls::None => plain,
            // Required STARTTLS: no credentials or mail go out if the server
            // does not offer it (no downgrade by a man in the middle).
            EmailTls::Starttls => plain.tls(Tls::Required(tls_parameters(cfg, host)?)),
            EmailTls::Tls => plain.tls(Tls::Wrapper(tls_parameters(cfg, host)?)),
        };
        let mut builder = builder.port(cfg.port()).timeout(Some(cfg.timeout));
        match (&cfg.username, &cfg.password) {
            (Some(user), Some(password)) => {
                builder = builder.credentials(Credentials::new(user.clone(), password.expose_secret().to_owned()));
            }
            (None, None) => {}
            _ => return Err("email.username and email.password go together".to_owned()),
        }
        Ok(EmailSink {
            transport: builder.build(),
            server: format!("{host}:{}", cfg.port()),
            from,
            to,
            tz,
            password: cfg.password.clone().filter(|p| !p.expose_secret().is_empty()),
            timeout: cfg.timeout,
        })
    }

    /// The longest sending one message can take (`email.timeout`).
    pub fn timeout(&self) -> std::time::Duration {
        self.timeout
    }

    /// Sends the notification of one phone's change. On success the value
    /// says where it went and what the server answered; the relay records it.
    /// Errors: login refused or message refused (5xx) → `Misconfigured`;
    /// a temporary refusal (4xx), a timeout or no connection → `Transient`.
    /// Nothing is retried here: the relay owns retries and the sink's backoff.
    pub async fn notify(&self, n: &Notification) -> Result<Value, SinkError> {
        let sent = self.send(compose::notification(n, self.tz)).await?;
        tracing::debug!(phone = %n.phone.masked(), "notification email sent");
        Ok(json!({
            "sent_to": self.to.iter().map(|m| m.email.to_string()).collect::<Vec<_>>(),
            "message_id": sent.message_id,
            "smtp_reply": sent.reply,
        }))
    }

    /// Sends the alert about a failing sink (or its recovery). Errors are
    /// classified as for `notify`.
    pub async fn alert(&self, a: &Alert) -> Result<(), SinkError> {
        self.send(compose::alert(a, self.tz)).await?;
        tracing::info!(sink = %a.sink, recovered = a.recovered, "alert email sent");
        Ok(())
    }

    /// Reports new review items in one message (a digest of however many
    /// the relay hands over). Errors are classified as for `notify`.
    pub async fn reviews(&self, items: &[ReviewItem]) -> Result<(), SinkError> {
        if items.is_empty() {
            return Ok(());
        }
        self.send(compose::reviews(items, self.tz)).await?;
        tracing::info!(items = items.len(), "review mail sent");
        Ok(())
    }

    /// Checks the server answers (connect, TLS, login, NOOP) without
    /// sending anything: how a failing email sink with nothing to send finds
    /// out it works again.
    pub async fn probe(&self) -> Result<(), SinkError> {
        match self.transport.test_connection().await {
            Ok(true) => Ok(()),
            Ok(false) => Err(SinkError::Transient {
                message: format!("SMTP server {} did not answer NOOP", self.server),
                retry_after: None,
            }),
            Err(e) => Err(self.scrub(classify(&e, &self.server))),
        }
    }

    async fn send(&self, notice: Notice) -> Result<Sent, SinkError> {
        let message_id = format!("<optout-relay.{:032x}@{}>", rand::random::<u128>(), self.from.email.domain());
        let message = self
            .message(notice, &message_id)
            .map_err(|e| SinkError::Misconfigured(format!("cannot build the email: {e}")))?;
        let response = self.transport.send(message).await.map_err(|e| self.scrub(classify(&e, &self.server)))?;
        let reply = format!("{} {}", response.code(), response.message().collect::<Vec<_>>().join(" "));
        Ok(Sent { message_id, reply: reply.trim_end().to_owned() })
    }

    fn message(&self, notice: Notice, message_id: &str) -> Result<Message, lettre::error::Error> {
        let mut builder = Message::builder()
            .from(self.from.clone())
            .subject(notice.subject)
            .message_id(Some(message_id.to_owned()))
            // Asks vacation responders and ticket systems not to answer.
            .header(AutoSubmitted);
        for to in &self.to {
            builder = builder.to(to.clone());
        }
        builder.singlepart(SinglePart::plain(notice.body))
    }

    /// Removes the SMTP password (as typed and as sent in AUTH PLAIN/LOGIN) from error text.
    fn scrub(&self, error: SinkError) -> SinkError {
        let Some(password) = &self.password else { return error };
        let secret = password.expose_secret();
        let encoded = base64::engine::general_purpose::STANDARD.encode(secret);
        let clean = |s: String| s.replace(secret, "[REDACTED]").replace(&encoded, "[REDACTED]");
        match error {
            SinkError::Transient { message, retry_after } => {
                SinkError::Transient { message: clean(message), retry_after }
            }
            SinkError::Misconfigured(message) => SinkError::Misconfigured(clean(message)),
            SinkError::Uncertain(message) => SinkError::Uncertain(clean(message)),
            SinkError::OutOfTime => SinkError::OutOfTime,
        }
    }
}

/// Maps an SMTP error to the relay's retry classes. A message is never
/// `Uncertain`: resending a notification at worst sends it twice.
fn classify(e: &lettre::transport::smtp::Error, server: &str) -> SinkError {
    let transient = |message: String| SinkError::Transient { message, retry_after: None };
    if e.is_permanent() {
        // 530 (authentication required), 534, 535 (credentials invalid), 538: the login.
        if e.status().is_some_and(|c| c.to_string().starts_with("53")) {
            return SinkError::Misconfigured(format!(
                "SMTP server {server} refused the login (check email.username and email.password): {e}"
            ));
        }
        return SinkError::Misconfigured(format!("SMTP server {server} refused the message: {e}"));
    }
    if e.is_transient() {
        return transient(format!("SMTP server {server} answered a temporary failure: {e}"));
    }
    if e.is_timeout() {
        return transient(format!("SMTP server {server} timed out: {e}"));
    }
    if e.is_client() {
        // e.g. STARTTLS required but not offered, or no AUTH mechanism in common.
        return SinkError::Misconfigured(format!("cannot send through {server}: {e}"));
    }
    // Connection refused, DNS, TLS handshake, connection dropped, garbled reply.
    transient(format!("cannot reach SMTP server {server}: {e}"))
}

/// The server's certificate must name `host` and chain to a built-in root
/// or to one of `email.ca_file`'s.
fn tls_parameters(cfg: &EmailConfig, host: &str) -> Result<TlsParameters, String> {
    let mut params = TlsParameters::builder(host.to_owned());
    if let Some(pem) = cfg.extra_roots()? {
        let roots = Certificate::from_pem(&pem).map_err(|e| format!("email.ca_file: {e}"))?;
        params = params.add_root_certificate(roots);
    }
    params.build().map_err(|e| format!("email.smtp_host {host:?}: {e}"))
}

/// `Auto-Submitted: auto-generated` (RFC 3834).
#[derive(Clone)]
struct AutoSubmitted;

impl Header for AutoSubmitted {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("Auto-Submitted")
    }

    fn parse(_s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(AutoSubmitted)
    }

    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), "auto-generated".to_owned())
    }
}
