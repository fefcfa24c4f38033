//! `X-Twilio-Signature`, computed exactly as Twilio's helper libraries do.
//!
//! The signed string is the full URL Twilio requested followed, for a form
//! body, by every parameter name and value (names sorted byte-wise, each
//! name's distinct values sorted). The URL is built by string concatenation
//! of the configured public base URL and the raw path and query the server
//! received; it is never round-tripped through a URL parser, which would
//! add slashes, re-encode quotes, lowercase the host or drop ports, each of
//! which changes the signed string. Twilio is inconsistent about the default
//! port, so the URL is tried both with and without it.

use std::collections::{BTreeMap, BTreeSet};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Why a request was refused. Logged, never sent to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no X-Twilio-Signature header")]
    Missing,
    #[error("X-Twilio-Signature is not base64")]
    Malformed,
    #[error("signature does not match any configured credential")]
    Mismatch,
    #[error("signature settings name a SharedKey that is not configured")]
    UnknownSharedKey,
    #[error("unsupported signature algorithm")]
    UnsupportedAlgorithm,
    #[error("bodySHA256 does not match the body")]
    BodyHashMismatch,
    #[error("no credential configured: every webhook is refused")]
    NoCredentials,
}

/// The body as the signature sees it.
pub enum SignedBody<'a> {
    /// Decoded form pairs, in arrival order, repeated names kept.
    Form(&'a [(String, String)]),
    /// A raw JSON (or other non-form) body, covered by `bodySHA256` in the query.
    Raw(&'a [u8]),
}

/// Checks signatures against every configured credential and base URL.
pub struct Verifier {
    auth_tokens: Vec<SecretString>,
    shared_keys: BTreeMap<String, SecretString>,
}

enum Algorithm {
    Sha1,
    Sha256,
}

impl Verifier {
    pub fn new(auth_tokens: Vec<SecretString>, shared_keys: BTreeMap<String, SecretString>) -> Verifier {
        Verifier { auth_tokens, shared_keys }
    }

    pub fn has_credentials(&self) -> bool {
        !self.auth_tokens.is_empty() || !self.shared_keys.is_empty()
    }

    /// `urls` are the candidate full URLs (base + path + query) in order of
    /// likelihood; `settings` is `X-Twilio-Webhooks-Signature-Settings`.
    pub fn verify(
        &self,
        urls: &[String],
        signature: Option<&str>,
        settings: Option<&str>,
        body: SignedBody<'_>,
    ) -> Result<(), SignatureError> {
        let signature = signature.map(str::trim).filter(|s| !s.is_empty()).ok_or(SignatureError::Missing)?;
        let expected = B64.decode(signature).map_err(|_| SignatureError::Malformed)?;

        let (algorithm, keys): (Algorithm, Vec<&SecretString>) = match parse_settings(settings)? {
            Some(key_id) => {
                let key = self.shared_keys.get(key_id).ok_or(SignatureError::UnknownSharedKey)?;
                (Algorithm::Sha256, vec![key])
            }
            None => (Algorithm::Sha1, self.auth_tokens.iter().collect()),
        };
        if keys.is_empty() {
            return Err(SignatureError::NoCredentials);
        }

        let suffix = match body {
            SignedBody::Form(pairs) => form_suffix(pairs),
            SignedBody::Raw(_) => String::new(),
        };
        let mut body_hash_failed = false;
        for url in urls {
            if let SignedBody::Raw(raw) = body {
                // A non-form body is covered only through the hash in the URL.
                match query_param(url, "bodySHA256") {
                    Some(h) if body_hash_matches(h, raw) => {}
                    _ => {
                        body_hash_failed = true;
                        continue;
                    }
                }
            }
            for variant in port_variants(url) {
                let mut signed = variant;
                signed.push_str(&suffix);
                for key in &keys {
                    if mac_matches(&algorithm, key.expose_secret().as_bytes(), signed.as_bytes(), &expected) {
                        return Ok(());
                    }
                }
            }
        }
        Err(if body_hash_failed { SignatureError::BodyHashMismatch } else { SignatureError::Mismatch })
    }
}

/// Whether `claimed` (the hex `bodySHA256` of the URL, either case) is the
/// SHA-256 of `raw`, compared in constant time as twilio-python does.
fn body_hash_matches(claimed: &str, raw: &[u8]) -> bool {
    let actual = hex::encode(Sha256::digest(raw));
    let claimed = claimed.to_ascii_lowercase();
    // The lengths differ only for a malformed hash: no secret in that.
    claimed.len() == actual.len() && bool::from(claimed.as_bytes().ct_eq(actual.as_bytes()))
}

/// `Verify` in constant time (`Mac::verify_slice`).
fn mac_matches(algorithm: &Algorithm, key: &[u8], data: &[u8], expected: &[u8]) -> bool {
    match algorithm {
        Algorithm::Sha1 => Hmac::<Sha1>::new_from_slice(key).map(|mut m| {
            m.update(data);
            m.verify_slice(expected).is_ok()
        }),
        Algorithm::Sha256 => Hmac::<Sha256>::new_from_slice(key).map(|mut m| {
            m.update(data);
            m.verify_slice(expected).is_ok()
        }),
    }
    .unwrap_or(false)
}

/// Computes a signature the way Twilio does (used by tests, benchmarks and
/// anyone who wants to sign a request by hand).
pub fn compute(token: &str, url: &str, pairs: &[(String, String)]) -> String {
    let mut signed = url.to_owned();
    signed.push_str(&form_suffix(pairs));
    let mut mac =
        Hmac::<Sha1>::new_from_slice(token.as_bytes()).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(signed.as_bytes());
    B64.encode(mac.finalize().into_bytes())
}

/// HMAC-SHA256 variant for SharedKey signatures.
pub fn compute_sha256(secret: &str, url: &str, pairs: &[(String, String)]) -> String {
    let mut signed = url.to_owned();
    signed.push_str(&form_suffix(pairs));
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(signed.as_bytes());
    B64.encode(mac.finalize().into_bytes())
}

/// `name value` for each name sorted byte-wise and each of its distinct
/// values sorted. (Sorting the concatenated `name+value` strings instead is a
/// known bug in one library and gives a different string.)
fn form_suffix(pairs: &[(String, String)]) -> String {
    let mut by_name: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (k, v) in pairs {
        by_name.entry(k.as_str()).or_default().insert(v.as_str());
    }
    let mut out = String::with_capacity(pairs.iter().map(|(k, v)| k.len() + v.len()).sum());
    for (name, values) in by_name {
        for value in values {
            out.push_str(name);
            out.push_str(value);
        }
    }
    out
}

/// `key=<id>,algorithm=HMAC_SHA256` → `Some(id)`; no header or no algorithm → legacy SHA-1.
fn parse_settings(header: Option<&str>) -> Result<Option<&str>, SignatureError> {
    let Some(header) = header else { return Ok(None) };
    let mut key = None;
    let mut algorithm = None;
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some((k, v)) if k.trim().eq_ignore_ascii_case("key") => key = Some(v.trim()),
            Some((k, v)) if k.trim().eq_ignore_ascii_case("algorithm") => algorithm = Some(v.trim()),
            _ => {}
        }
    }
    match algorithm {
        None => Ok(None),
        Some(a) if a.eq_ignore_ascii_case("HMAC_SHA256") => key.map(Some).ok_or(SignatureError::UnknownSharedKey),
        Some(_) => Err(SignatureError::UnsupportedAlgorithm),
    }
}

/// The URL as given, then with the default port removed or added.
fn port_variants(url: &str) -> Vec<String> {
    let mut out = vec![url.to_owned()];
    let (scheme, default_port) = if url.starts_with("https://") {
        ("https://", "443")
    } else if url.starts_with("http://") {
        ("http://", "80")
    } else {
        return out;
    };
    let rest = &url[scheme.len()..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    // Userinfo is never in a Twilio webhook URL, but a host must not be confused with it.
    let host_start = authority.rfind('@').map_or(0, |i| i + 1);
    let host_port = &authority[host_start..];
    // Leave IPv6 literals' colons alone: the port follows the closing bracket.
    let port_sep = match host_port.rfind(']') {
        Some(b) => host_port[b..].find(':').map(|i| b + i),
        None => host_port.rfind(':'),
    };
    match port_sep {
        Some(i) if &host_port[i + 1..] == default_port => {
            out.push(format!("{scheme}{}{}{tail}", &authority[..host_start], &host_port[..i]));
        }
        Some(_) => {}
        None => out.push(format!("{scheme}{authority}:{default_port}{tail}")),
    }
    out
}

/// The raw value of a query parameter (no decoding needed for a hex hash).
fn query_param<'a>(url: &'a str, name: &str) -> Option<&'a str> {
    let query = url.split_once('?')?.1;
    let query = query.split('#').next().unwrap_or(query);
    query.split('&').find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn fixture() -> Vec<(String, String)> {
        pairs(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675309"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
        ])
    }

    fn verifier(token: &str) -> Verifier {
        Verifier::new(vec![SecretString::from(token)], BTreeMap::new())
    }

    const URL: &str = "https://mycompany.com/myapp.php?foo=1&bar=2";

    #[test]
    fn published_vectors_compute_exactly() {
        let p = fixture();
        let cases = [
            (URL, "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
            ("https://mycompany.com:443/myapp.php?foo=1&bar=2", "kvajT1Ptam85bY51eRf/AJRuM3w="),
            ("http://mycompany.com:80/myapp.php?foo=1&bar=2", "0ZXoZLH/DfblKGATFgpif+LLRf4="),
            ("http://mycompany.com:1234/myapp.php?foo=1&bar=2", "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="),
            ("https://MyCompany.com/myapp.php?foo=1&bar=2", "g9IN/x4Cft2g517EjYvEvM/W7LU="),
        ];
        for (url, sig) in cases {
            assert_eq!(compute("12345", url, &p), sig, "{url}");
        }
    }

    #[test]
    fn names_sort_bytewise_not_as_concatenated_strings() {
        let mut p = fixture();
        p.extend(pairs(&[("ReasonConferenceEnded", "test"), ("Reason", "Participant")]));
        assert_eq!(compute("12345", URL, &p), "vOEb5UThFn24KEfnOFLQY2AE5FY=");
        assert!(verifier("12345")
            .verify(&[URL.into()], Some("95+Bu0JVPi0r/SsESZCVf0dWAjw="), None, SignedBody::Form(&p))
            .is_err());
    }

    #[test]
    fn repeated_keys_are_sorted_and_deduplicated() {
        let p = pairs(&[
            ("Sid", "CA123"),
            ("SidAccount", "AC123"),
            ("Digits", "5678"),
            ("Digits", "1234"),
            ("Digits", "1234"),
        ]);
        assert_eq!(compute("12345", URL, &p), "IK+Dwps556ElfBT0I3Rgjkr1wJU=");
        let p = pairs(&[("Ticket", "b"), ("Ticket", "a"), ("From", "+12349013030")]);
        assert_eq!(compute("12345", "https://mycompany.com/myapp.php", &p), "lOr++WvcC/KeaRf5KdZJ0R/Ebyk=");
    }

    #[test]
    fn empty_and_special_values() {
        let p = pairs(&[("Digits", ""), ("CallSid", "CA1234567890ABCDE"), ("EmptyParam", "")]);
        assert_eq!(compute("12345", URL, &p), "9HHp/OqQMEwdrVebHDdA/+tqjX8=");
        let p = pairs(&[
            ("Message", "Hello & goodbye! @#$%^*()"),
            ("From", "+1 (415) 867-5309"),
            ("Special", "unicode: ñáéíóú"),
        ]);
        assert_eq!(compute("12345", URL, &p), "dCPiR4WtQ6QFN6pJh81CtlCcWLQ=");
    }

    #[test]
    fn quotes_in_the_query_stay_as_received() {
        assert_eq!(
            compute("s3cr3t", "https://example.com/path?test=param'WithQuote", &[]),
            "GfI7onHX/KQ2k1oVS3cUTVk4IEw="
        );
        assert_eq!(
            compute("s3cr3t", "https://example.com/path?test=param%27WithQuote", &[]),
            "HkuXLxVQ7zHv9LmGpzlLuGaxhJY="
        );
    }

    #[test]
    fn accepts_with_and_without_the_default_port() {
        let p = pairs(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+12349013030"),
            ("Digits", "1234"),
            ("From", "+12349013030"),
            ("To", "+18005551212"),
        ]);
        let v = verifier("12345");
        // Signed without the port, requested without it.
        assert!(v.verify(&[URL.into()], Some("0/KCTR6DLpKmkAf8muzZqo1nDgQ="), None, SignedBody::Form(&p)).is_ok());
        // Signed with :443, while the configured URL has no port.
        assert!(v.verify(&[URL.into()], Some("EpDEmp1PyjDYp77YxYU3GILBWzE="), None, SignedBody::Form(&p)).is_ok());
        // Signed without the port, while the configured URL has :443.
        let with_port = "https://mycompany.com:443/myapp.php?foo=1&bar=2".to_owned();
        assert!(v.verify(&[with_port], Some("0/KCTR6DLpKmkAf8muzZqo1nDgQ="), None, SignedBody::Form(&p)).is_ok());
        // A non-default port is never dropped.
        let other = "https://mycompany.com:8443/myapp.php?foo=1&bar=2".to_owned();
        assert_eq!(
            v.verify(&[other], Some("0/KCTR6DLpKmkAf8muzZqo1nDgQ="), None, SignedBody::Form(&p)),
            Err(SignatureError::Mismatch)
        );
        // No params at all.
        assert!(v.verify(&[URL.into()], Some("zYQTYrRWXE7LtzbG4PfP7/bkkGo="), None, SignedBody::Form(&[])).is_ok());
    }

    #[test]
    fn shared_key_uses_hmac_sha256() {
        let p = pairs(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+12349013030"),
            ("Digits", "1234"),
            ("From", "+12349013030"),
            ("To", "+18005551212"),
        ]);
        assert_eq!(compute_sha256("12345", URL, &p), "Rmm4Vzj+Ky7JGoWXMCsZDZuHDszLr9xvdbvitrDr4/M=");
        let mut keys = BTreeMap::new();
        keys.insert("KS1".to_owned(), SecretString::from("12345"));
        let v = Verifier::new(vec![SecretString::from("other")], keys);
        let settings = Some("key=KS1,algorithm=HMAC_SHA256");
        let sig = Some("Rmm4Vzj+Ky7JGoWXMCsZDZuHDszLr9xvdbvitrDr4/M=");
        assert!(v.verify(&[URL.into()], sig, settings, SignedBody::Form(&p)).is_ok());
        assert_eq!(
            v.verify(&[URL.into()], sig, Some("key=KS2,algorithm=HMAC_SHA256"), SignedBody::Form(&p)),
            Err(SignatureError::UnknownSharedKey)
        );
        assert_eq!(
            v.verify(&[URL.into()], sig, Some("key=KS1,algorithm=MD5"), SignedBody::Form(&p)),
            Err(SignatureError::UnsupportedAlgorithm)
        );
        // The SHA-1 signature of the same request is not accepted under a SHA-256 setting.
        assert!(v.verify(&[URL.into()], Some("0/KCTR6DLpKmkAf8muzZqo1nDgQ="), settings, SignedBody::Form(&p)).is_err());
    }

    #[test]
    fn json_body_is_covered_by_body_sha256() {
        let body = br#"{"property": "value", "boolean": true}"#;
        let hash = "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620";
        let url = format!("{URL}&bodySHA256={hash}");
        let v = verifier("12345");
        assert!(v
            .verify(std::slice::from_ref(&url), Some("a9nBmqA0ju/hNViExpshrM61xv4="), None, SignedBody::Raw(body))
            .is_ok());
        assert_eq!(
            v.verify(std::slice::from_ref(&url), Some("a9nBmqA0ju/hNViExpshrM61xv4="), None, SignedBody::Raw(b"{}")),
            Err(SignatureError::BodyHashMismatch)
        );
        // Twilio sends the hash in lower case; an upper-case copy is the same hash.
        assert!(body_hash_matches(&hash.to_ascii_uppercase(), body));
        assert!(!body_hash_matches(&hash[..63], body));
        assert!(!body_hash_matches("", body));
        // No bodySHA256 in the URL: the body is not covered, so refused.
        assert_eq!(
            v.verify(&[URL.into()], Some("a9nBmqA0ju/hNViExpshrM61xv4="), None, SignedBody::Raw(body)),
            Err(SignatureError::BodyHashMismatch)
        );
        // A right body hash under a signature over another URL is refused.
        let other = url.replace("foo=1", "foo=2");
        assert_eq!(
            v.verify(&[other], Some("a9nBmqA0ju/hNViExpshrM61xv4="), None, SignedBody::Raw(body)),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn opt_out_webhook_vectors() {
        let token = "abcdef0123456789abcdef0123456789";
        let url = "https://optout.example.org/twilio/messages".to_owned();
        let account = format!("AC{}", "0".repeat(32));
        let service = format!("MG{}", "1".repeat(32));
        let mut p = pairs(&[
            ("MessageSid", "SM00000000000000000000000000000001"),
            ("AccountSid", &account),
            ("MessagingServiceSid", &service),
            ("From", "+14155550101"),
            ("To", "+15005550006"),
            ("Body", "STOP"),
            ("OptOutType", "STOP"),
        ]);
        let v = verifier(token);
        assert!(v
            .verify(std::slice::from_ref(&url), Some("6d+SmBi886STPr4lwH0fXaLz5rM="), None, SignedBody::Form(&p))
            .is_ok());
        p[5].1 = "Stop ✋ por favor".to_owned();
        assert!(v
            .verify(std::slice::from_ref(&url), Some("ivgtYvSZPDMHLLGAzju1b4l5Q3U="), None, SignedBody::Form(&p))
            .is_ok());
        // Any change to a signed value is refused.
        p[3].1 = "+14155550102".to_owned();
        assert_eq!(
            v.verify(&[url], Some("ivgtYvSZPDMHLLGAzju1b4l5Q3U="), None, SignedBody::Form(&p)),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn rotation_accepts_either_token_and_refuses_others() {
        let p = fixture();
        let v = Verifier::new(vec![SecretString::from("new-token"), SecretString::from("12345")], BTreeMap::new());
        assert!(v.verify(&[URL.into()], Some("RSOYDt4T1cUTdK1PDd93/VVr8B8="), None, SignedBody::Form(&p)).is_ok());
        let v = verifier("wrong");
        assert_eq!(
            v.verify(&[URL.into()], Some("RSOYDt4T1cUTdK1PDd93/VVr8B8="), None, SignedBody::Form(&p)),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(v.verify(&[URL.into()], None, None, SignedBody::Form(&p)), Err(SignatureError::Missing));
        assert_eq!(
            v.verify(&[URL.into()], Some("not base64!"), None, SignedBody::Form(&p)),
            Err(SignatureError::Malformed)
        );
        let none = Verifier::new(vec![], BTreeMap::new());
        assert_eq!(
            none.verify(&[URL.into()], Some("RSOYDt4T1cUTdK1PDd93/VVr8B8="), None, SignedBody::Form(&p)),
            Err(SignatureError::NoCredentials)
        );
    }

    #[test]
    fn port_variants_edit_only_the_authority() {
        assert_eq!(port_variants("https://h.org/p?x=1"), vec!["https://h.org/p?x=1", "https://h.org:443/p?x=1"]);
        assert_eq!(port_variants("http://h.org:80"), vec!["http://h.org:80", "http://h.org"]);
        assert_eq!(port_variants("https://h.org:8443/p"), vec!["https://h.org:8443/p"]);
        assert_eq!(port_variants("https://[::1]/p"), vec!["https://[::1]/p", "https://[::1]:443/p"]);
    }
}
