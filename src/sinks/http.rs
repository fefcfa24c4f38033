//! What the HTTP sinks (EveryAction, webhook) share: one client per sink,
//! and reading a failed call the same way for both.

use std::time::Duration;

/// The longest piece of a server's answer quoted in an error.
const MAX_QUOTED_CHARS: usize = 300;

/// A client with the sink's timeout that never follows a redirect (a
/// redirect turns a POST into a GET without its body; the operator should
/// configure the final URL instead).
pub(super) fn client(timeout: Duration) -> Result<reqwest::Client, String> {
    crate::install_tls_provider();
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("optout-relay/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// `Retry-After` in seconds (the HTTP-date form is rare on APIs and ignored).
pub(super) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// A call that got no complete answer.
pub(super) struct NoAnswer {
    /// The error and its causes, on one line, without the URL.
    pub text: String,
    /// A connection was made, so the request may have reached the server.
    pub connected: bool,
    pub timed_out: bool,
}

pub(super) fn no_answer(e: reqwest::Error) -> NoAnswer {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    NoAnswer { text, connected: !e.is_connect() && !e.is_builder(), timed_out: e.is_timeout() }
}

/// A body reduced to one short line for an error message.
pub(super) fn snippet(body: &str) -> String {
    snippet_at(body, MAX_QUOTED_CHARS)
}

/// [`snippet`] cut after `max` characters (REDCap's own messages are longer).
pub(super) fn snippet_at(body: &str, max: usize) -> String {
    let one_line = body.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.is_empty() {
        return "(empty body)".to_owned();
    }
    match one_line.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &one_line[..i]),
        None => one_line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snippets_are_one_short_line() {
        assert_eq!(snippet("  a\n b  "), "a b");
        assert_eq!(snippet(""), "(empty body)");
        assert!(snippet(&"x ".repeat(1000)).chars().count() <= MAX_QUOTED_CHARS + 1);
    }

    #[test]
    fn retry_after_reads_seconds_only() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(reqwest::header::RETRY_AFTER, " 30 ".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(30)));
        h.insert(reqwest::header::RETRY_AFTER, "Wed, 21 Oct 2026 07:28:00 GMT".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }
}
