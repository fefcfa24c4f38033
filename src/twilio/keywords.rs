//! Classifying a message as opt-out, opt-in or help.
//!
//! Twilio's `OptOutType` wins when present (Advanced Opt-Out already decided).
//! Without it the whole message is compared with the keyword lists: trimmed,
//! case-insensitive, inner whitespace collapsed, trailing punctuation ignored,
//! so `Stop.`, `STOP!` and `opt  out` count but "please stop texting" does not.
//!
//! A message that is no whole-message keyword may still be a revocation the
//! FCC counts ("please stop texting me"): [`Keywords::classify_message`],
//! the one classification every source uses (Messaging webhook, Event
//! Streams, reconciliation), looks for a `[keywords] review` word or phrase
//! in it, as whole words ("weekend" does not contain "end", "opt-out"
//! contains "opt out"), and applies `review_policy`.

use crate::config::{KeywordsConfig, ReviewPolicy};
use crate::domain::EventKind;

pub struct Keywords {
    opt_out: Vec<String>,
    opt_in: Vec<String>,
    help: Vec<String>,
    /// Each review phrase as its words, lowercased.
    review: Vec<Vec<String>>,
    policy: ReviewPolicy,
}

/// What a message amounts to, once classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classified {
    /// A keyword (or `OptOutType`), or a review phrase under `review_policy = "opt_out"`.
    Event(EventKind),
    /// A possible revocation for staff to decide; `matched` is the phrase found.
    Review { matched: String },
    /// Nothing to record.
    Nothing,
}

impl Keywords {
    pub fn new(cfg: &KeywordsConfig) -> Keywords {
        let norm = |list: &[String]| list.iter().map(|k| normalise(k)).filter(|k| !k.is_empty()).collect();
        let review = cfg.review.iter().map(|p| words(p)).filter(|w| !w.is_empty()).collect();
        Keywords {
            opt_out: norm(&cfg.opt_out),
            opt_in: norm(&cfg.opt_in),
            help: norm(&cfg.help),
            review,
            policy: cfg.review_policy,
        }
    }

    /// The classification every source applies: keywords first, then the
    /// review phrases under the configured policy.
    pub fn classify_message(&self, opt_out_type: Option<&str>, body: &str) -> Classified {
        if let Some(kind) = self.classify(opt_out_type, body) {
            return Classified::Event(kind);
        }
        let Some(matched) = self.review_match(body) else { return Classified::Nothing };
        match self.policy {
            ReviewPolicy::Review => Classified::Review { matched },
            ReviewPolicy::OptOut => Classified::Event(EventKind::OptOut),
            ReviewPolicy::Ignore => Classified::Nothing,
        }
    }

    /// The first review phrase found in `body` as whole words, if any.
    pub fn review_match(&self, body: &str) -> Option<String> {
        let text = words(body);
        self.review
            .iter()
            .find(|phrase| text.windows(phrase.len()).any(|w| w == phrase.as_slice()))
            .map(|phrase| phrase.join(" "))
    }

    /// `opt_out_type` is Twilio's `OptOutType`; `body` the message text.
    pub fn classify(&self, opt_out_type: Option<&str>, body: &str) -> Option<EventKind> {
        match opt_out_type.map(|t| t.trim().to_ascii_uppercase()).as_deref() {
            Some("STOP") => return Some(EventKind::OptOut),
            Some("START") => return Some(EventKind::OptIn),
            Some("HELP") => return Some(EventKind::Help),
            _ => {}
        }
        let text = normalise(body);
        if text.is_empty() {
            None
        } else if self.opt_out.contains(&text) {
            Some(EventKind::OptOut)
        } else if self.opt_in.contains(&text) {
            Some(EventKind::OptIn)
        } else if self.help.contains(&text) {
            Some(EventKind::Help)
        } else {
            None
        }
    }
}

/// Lowercased words: letters and digits, with an apostrophe inside a word
/// kept (typographic ones made plain), so "Don’t" and "don't" agree.
fn words(s: &str) -> Vec<String> {
    s.to_lowercase()
        .replace(['\u{2019}', '\u{2018}', '`'], "'")
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .map(|w| w.trim_matches('\''))
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

fn normalise(s: &str) -> String {
    let trimmed = s.trim().trim_end_matches(|c: char| c.is_ascii_punctuation() || c.is_whitespace());
    let words: Vec<&str> = trimmed.split_whitespace().collect();
    words.join(" ").to_uppercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_opt_out_type_first_then_keywords() {
        let k = Keywords::new(&KeywordsConfig::default());
        let cases: &[(Option<&str>, &str, Option<EventKind>)] = &[
            (Some("STOP"), "anything", Some(EventKind::OptOut)),
            (Some("START"), "", Some(EventKind::OptIn)),
            (Some("HELP"), "info", Some(EventKind::Help)),
            (None, "STOP", Some(EventKind::OptOut)),
            (None, "  Stop. ", Some(EventKind::OptOut)),
            (None, "STOP!", Some(EventKind::OptOut)),
            (None, "opt out", Some(EventKind::OptOut)),
            (None, "Opt   Out!!", Some(EventKind::OptOut)),
            (None, "revoke", Some(EventKind::OptOut)),
            (None, "optout", Some(EventKind::OptOut)),
            (None, "unsubscribe", Some(EventKind::OptOut)),
            (None, "start", Some(EventKind::OptIn)),
            (None, "Yes", Some(EventKind::OptIn)),
            (None, "help?", Some(EventKind::Help)),
            (None, "please stop texting me", None),
            (None, "Stop ✋ por favor", None),
            (None, "", None),
            (None, "!!!", None),
            (Some("UNKNOWN"), "hello", None),
        ];
        for (t, body, want) in cases {
            assert_eq!(k.classify(*t, body), *want, "{t:?} {body:?}");
        }
    }

    #[test]
    fn review_phrases_match_whole_words_only() {
        let k = Keywords::new(&KeywordsConfig::default());
        let cases: &[(&str, Option<&str>)] = &[
            ("please stop texting me", Some("stop")),
            ("Stop ✋ por favor", Some("stop")),
            ("I want to OPT-OUT of this", Some("opt out")),
            ("Please remove me from your list", Some("remove me")),
            ("Don\u{2019}t text me again", Some("don't text")),
            ("cancel my appointment", Some("cancel")),
            ("see you this weekend", None),
            ("the end.", Some("end")),
            ("unstoppable", None),
            ("nonstop fun", None),
            ("I'll be there, thanks", None),
            ("quitting smoking is hard", None),
            ("", None),
        ];
        for (body, want) in cases {
            assert_eq!(k.review_match(body).as_deref(), *want, "{body:?}");
        }
    }

    #[test]
    fn the_review_policy_decides_what_a_review_phrase_becomes() {
        let with = |policy| Keywords::new(&KeywordsConfig { review_policy: policy, ..KeywordsConfig::default() });
        let body = "please stop texting me";
        assert_eq!(
            with(ReviewPolicy::Review).classify_message(None, body),
            Classified::Review { matched: "stop".into() }
        );
        assert_eq!(with(ReviewPolicy::OptOut).classify_message(None, body), Classified::Event(EventKind::OptOut));
        assert_eq!(with(ReviewPolicy::Ignore).classify_message(None, body), Classified::Nothing);
        // Keywords come first whatever the policy; other texts are nothing.
        let k = with(ReviewPolicy::Review);
        assert_eq!(k.classify_message(None, "STOP"), Classified::Event(EventKind::OptOut));
        assert_eq!(k.classify_message(Some("START"), "stop it"), Classified::Event(EventKind::OptIn));
        assert_eq!(k.classify_message(None, "see you at the weekend"), Classified::Nothing);
        let custom = KeywordsConfig { review: vec!["Basta Ya".into()], ..KeywordsConfig::default() };
        let k = Keywords::new(&custom);
        assert_eq!(k.review_match("¡basta ya, por favor!").as_deref(), Some("basta ya"));
        assert_eq!(k.review_match("please stop texting me"), None, "the list replaces the defaults");
    }

    #[test]
    fn configured_keywords_replace_the_defaults() {
        let cfg =
            KeywordsConfig { opt_out: vec!["ALTO".into()], opt_in: vec!["Sí".into()], ..KeywordsConfig::default() };
        let k = Keywords::new(&cfg);
        assert_eq!(k.classify(None, "alto"), Some(EventKind::OptOut));
        assert_eq!(k.classify(None, "SÍ"), Some(EventKind::OptIn));
        assert_eq!(k.classify(None, "STOP"), None);
    }
}
