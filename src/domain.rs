//! Values that are valid by construction: past the HTTP edge, a `Phone`, a
//! `MessageSid` or an `EventKind` needs no further checking.

use std::fmt;

use phonenumber::country;
use serde::{Deserialize, Serialize};

/// Scope of a revocation staff recorded (or an import holds) without naming
/// one: the whole organisation, since the FCC rule lets a person revoke "by
/// any reasonable means". Such an event counts in every scope.
pub const ORGANISATION_SCOPE: &str = "organisation";

/// A phone number in E.164 (`+14155550101`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Phone(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a phone number")]
pub struct NotAPhone;

/// Reads a region code such as `US` (case-insensitive).
pub fn parse_region(code: &str) -> Option<country::Id> {
    code.trim().to_ascii_uppercase().parse::<country::Id>().ok()
}

impl Phone {
    /// Parses a number however it was typed (`(415) 555-0101`, `+1 415…`,
    /// `1-415-555-0101`, `whatsapp:+1415…`, `tel:+1415…`), reading numbers
    /// without a country code in `region`. Only a number valid for its region
    /// is one: a short code (`12345`), a 16-digit run or a number one digit
    /// short is refused, and so is an address on any channel but WhatsApp
    /// and `tel:` (`messenger:…`, `client:…`), which no sink could match.
    pub fn parse(raw: &str, region: country::Id) -> Result<Phone, NotAPhone> {
        let text = strip_known_channel(raw.trim()).ok_or(NotAPhone)?;
        // libphonenumber accepts letters as keypad digits ("1-800-FLOWERS"), which
        // would let any word become a "number"; a phone field of ours holds digits.
        // Longer than any typed number with spaces: not worth parsing.
        if text.is_empty() || text.len() > 64 || text.chars().any(|c| c.is_alphabetic()) {
            return Err(NotAPhone);
        }
        let number = phonenumber::parse(Some(region), text).map_err(|_| NotAPhone)?;
        if !phonenumber::is_valid(&number) {
            return Err(NotAPhone);
        }
        Ok(Phone(number.format().mode(phonenumber::Mode::E164).to_string()))
    }

    /// Like [`Phone::parse`] but only for numbers that are valid for their
    /// region: what the relay matches on, so a short code or a stray digit run
    /// never matches anything.
    pub fn parse_valid(raw: &str, region: country::Id) -> Option<Phone> {
        let text = strip_extension(strip_channel(raw.trim()));
        if text.is_empty() || text.chars().any(|c| c.is_alphabetic()) {
            return None;
        }
        let number = phonenumber::parse(Some(region), text).ok()?;
        if !phonenumber::is_valid(&number) {
            return None;
        }
        Some(Phone(number.format().mode(phonenumber::Mode::E164).to_string()))
    }

    /// Rebuilds a stored value (already E.164).
    pub fn from_stored(e164: String) -> Phone {
        Phone(e164)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `+1415***0101`: enough to tell numbers apart in a log, not to dial one.
    pub fn masked(&self) -> String {
        mask(&self.0)
    }
}

impl fmt::Display for Phone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Masks the middle of a phone-like string for logs.
pub fn mask(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= 6 {
        return "***".to_owned();
    }
    let (head, tail) = if chars.len() >= 10 { (5, 4) } else { (2, 2) };
    let mut out: String = chars[..head].iter().collect();
    out.push_str("***");
    out.extend(&chars[chars.len() - tail..]);
    out
}

/// Masks every phone-like run (seven digits or more, with the separators
/// people type) in free text: a request path such as `/v1/phones/+1415…`, a
/// rejection message that echoes its input.
pub fn mask_phones_in(text: &str) -> String {
    let phone_char = |c: char| c.is_ascii_digit() || matches!(c, '+' | '-' | '.' | '(' | ')' | ' ');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(phone_char) {
        out.push_str(&rest[..start]);
        let run_len = rest[start..].find(|c: char| !phone_char(c)).unwrap_or(rest.len() - start);
        let run = &rest[start..start + run_len];
        // Only the part from the first digit (or `+`, `(`) to the last digit is the number.
        let lead = run.find(|c: char| c.is_ascii_digit() || c == '+' || c == '(').unwrap_or(run.len());
        let end = run.rfind(|c: char| c.is_ascii_digit()).map_or(lead, |i| i + 1).max(lead);
        let number = &run[lead..end];
        out.push_str(&run[..lead]);
        if number.chars().filter(char::is_ascii_digit).count() >= 7 {
            out.push_str(&mask(number));
        } else {
            out.push_str(number);
        }
        out.push_str(&run[end..]);
        rest = &rest[start + run_len..];
    }
    out.push_str(rest);
    out
}

/// `415-555-0101 x12`, `… ext. 12`, `… extension 12`, `… #12` → the number
/// without its extension: a desk phone typed into a text field still matches.
fn strip_extension(s: &str) -> &str {
    let lower = s.to_ascii_lowercase();
    for marker in ["extension", "ext.", "ext", "x", "#"] {
        if let Some(i) = lower.rfind(marker) {
            let tail = &lower[i + marker.len()..];
            if i > 0 && !tail.trim().is_empty() && tail.trim().chars().all(|c| c.is_ascii_digit()) {
                return s[..i].trim_end_matches([' ', ',', ';']);
            }
        }
    }
    s
}

/// `whatsapp:+1415…`, `tel:+1415…` → the number; a bare number as it is;
/// any other `scheme:` (`messenger:`, `client:`, `rcs:`) → None.
fn strip_known_channel(s: &str) -> Option<&str> {
    match s.split_once(':') {
        None => Some(s),
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("whatsapp") || scheme.eq_ignore_ascii_case("tel") => {
            Some(rest.trim())
        }
        Some(_) => None,
    }
}

/// `whatsapp:+1415…`, `messenger:…`, `sms:…` → the address after the channel:
/// for matching what people typed into a sink's phone field.
fn strip_channel(s: &str) -> &str {
    match s.split_once(':') {
        Some((scheme, rest)) if !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphabetic()) => rest.trim(),
        _ => s,
    }
}

/// Text as the store can hold it: U+0000 becomes U+FFFD (the replacement
/// character). PostgreSQL's `text` and `jsonb` cannot hold a NUL at all, so a
/// message carrying one would fail to commit on every retry and look like an
/// outage; the replacement keeps the rest of the text and marks where the
/// NUL was. Applied where text enters the domain, after the signature (which
/// covers the bytes as sent).
pub fn storable(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    }
}

/// Twilio's message id (`SM…`/`MM…`, 34 characters). Accepted leniently (any
/// 2-64 ASCII alphanumerics) because it is only a deduplication key here.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageSid(String);

impl MessageSid {
    pub fn parse(s: &str) -> Option<MessageSid> {
        let ok = (2..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric());
        ok.then(|| MessageSid(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What an inbound message means for the person's consent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    OptOut,
    OptIn,
    /// Recorded for the audit trail; changes nothing downstream.
    Help,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::OptOut => "opt_out",
            EventKind::OptIn => "opt_in",
            EventKind::Help => "help",
        }
    }
    pub fn parse(s: &str) -> Option<EventKind> {
        match s {
            "opt_out" => Some(EventKind::OptOut),
            "opt_in" => Some(EventKind::OptIn),
            "help" => Some(EventKind::Help),
            _ => None,
        }
    }
    /// Whether the event changes the opt-out state (and so is relayed).
    pub fn changes_consent(self) -> bool {
        !matches!(self, EventKind::Help)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_common_us_format_to_the_same_e164() {
        for raw in [
            "(415) 555-0101",
            "415-555-0101",
            "4155550101",
            "+1 415 555 0101",
            "1-415-555-0101",
            "415.555.0101",
            "+14155550101",
            "whatsapp:+14155550101",
        ] {
            assert_eq!(Phone::parse(raw, country::Id::US).unwrap().as_str(), "+14155550101", "{raw}");
        }
    }

    #[test]
    fn refuses_text_that_is_no_number() {
        for raw in ["", "   ", "abc", "STOP", "1-800-FLOWERS", "12", "whatsapp:"] {
            assert_eq!(Phone::parse(raw, country::Id::US), Err(NotAPhone), "{raw:?}");
        }
    }

    #[test]
    fn only_numbers_valid_for_their_region_on_known_channels_are_phones() {
        for raw in [
            "12345",
            "+12345",
            "1234567890123456",
            "+1234567890123456",
            "+1415555010",
            "+1 415 555 012",
            "messenger:+14155550101",
            "client:alice",
            "rcs:+14155550101",
            "whatsapp:12345",
            "+1415555010\0",
        ] {
            assert_eq!(Phone::parse(raw, country::Id::US), Err(NotAPhone), "{raw:?}");
        }
        for raw in ["tel:+14155550101", "TEL:+1-415-555-0101", "WhatsApp:+14155550101", "whatsapp: +1 415 555 0101"] {
            assert_eq!(Phone::parse(raw, country::Id::US).unwrap().as_str(), "+14155550101", "{raw}");
        }
        assert_eq!(Phone::parse("+44 20 7946 0958", country::Id::US).unwrap().as_str(), "+442079460958");
        assert_eq!(Phone::parse("020 7946 0958", country::Id::GB).unwrap().as_str(), "+442079460958");
    }

    #[test]
    fn short_codes_are_never_valid_for_matching() {
        assert_eq!(Phone::parse_valid("12345", country::Id::US), None);
        assert_eq!(Phone::parse_valid("", country::Id::US), None);
        assert_eq!(Phone::parse_valid("+44 20 7946 0958", country::Id::US).unwrap().as_str(), "+442079460958");
    }

    #[test]
    fn extensions_are_ignored_for_matching() {
        for raw in [
            "415-555-0101 x12",
            "(415) 555-0101 ext. 12",
            "415.555.0101 extension 7",
            "4155550101 #3",
            "415 555 0101 X 99",
        ] {
            assert_eq!(Phone::parse_valid(raw, country::Id::US).unwrap().as_str(), "+14155550101", "{raw}");
        }
        assert_eq!(Phone::parse_valid("call me x", country::Id::US), None);
    }

    #[test]
    fn masks_the_middle() {
        assert_eq!(mask("+14155550101"), "+1415***0101");
        assert_eq!(mask("12345678"), "12***78");
        assert_eq!(mask("123"), "***");
    }

    #[test]
    fn nul_becomes_the_replacement_character_and_nothing_else_changes() {
        assert_eq!(storable("STOP\0now".to_owned()), "STOP\u{FFFD}now");
        assert_eq!(storable("\0\0".to_owned()), "\u{FFFD}\u{FFFD}");
        assert_eq!(storable("héllo ☎".to_owned()), "héllo ☎");
    }

    #[test]
    fn phone_like_runs_in_text_are_masked_and_the_rest_kept() {
        assert_eq!(mask_phones_in("/v1/phones/+14155550101"), "/v1/phones/+1415***0101");
        assert_eq!(mask_phones_in("/v1/phones/%2B14155550101"), "/v1/phones/%2B14155***0101");
        assert_eq!(
            mask_phones_in("invalid type: integer `14155550101`, expected a string at line 1 column 25"),
            "invalid type: integer `14155***0101`, expected a string at line 1 column 25"
        );
        assert_eq!(mask_phones_in("call (415) 555-0101 now"), "call (415)***0101 now");
        assert_eq!(mask_phones_in("/v1/deliveries/12/retry"), "/v1/deliveries/12/retry");
        assert_eq!(mask_phones_in("short 12345 code"), "short 12345 code");
        assert_eq!(mask_phones_in(""), "");
        assert_eq!(mask_phones_in("ünïcode 4155550101 ☎"), "ünïcode 41555***0101 ☎");
    }

    #[test]
    fn message_sid_is_alphanumeric() {
        assert!(MessageSid::parse("SM00000000000000000000000000000001").is_some());
        assert!(MessageSid::parse("").is_none());
        assert!(MessageSid::parse("SM' OR 1=1").is_none());
    }
}
