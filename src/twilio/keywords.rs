//! Classifying a message as opt-out, opt-in or help.
//!
//! Twilio's `OptOutType` wins when present (Advanced Opt-Out already decided).
//! Without it the whole message is compared with the keyword lists: trimmed,
//! case-insensitive, inner whitespace collapsed, trailing punctuation ignored,
//! so `Stop.`, `STOP!` and `opt  out` count but "please stop texting" does not.

use crate::config::KeywordsConfig;
use crate::domain::EventKind;

pub struct Keywords {
    opt_out: Vec<String>,
    opt_in: Vec<String>,
    help: Vec<String>,
}

impl Keywords {
    pub fn new(cfg: &KeywordsConfig) -> Keywords {
        let norm = |list: &[String]| list.iter().map(|k| normalise(k)).filter(|k| !k.is_empty()).collect();
        Keywords { opt_out: norm(&cfg.opt_out), opt_in: norm(&cfg.opt_in), help: norm(&cfg.help) }
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
    fn configured_keywords_replace_the_defaults() {
        let cfg =
            KeywordsConfig { opt_out: vec!["ALTO".into()], opt_in: vec!["Sí".into()], ..KeywordsConfig::default() };
        let k = Keywords::new(&cfg);
        assert_eq!(k.classify(None, "alto"), Some(EventKind::OptOut));
        assert_eq!(k.classify(None, "SÍ"), Some(EventKind::OptIn));
        assert_eq!(k.classify(None, "STOP"), None);
    }
}
