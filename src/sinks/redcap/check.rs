//! `optout-relay check-config` for REDCap: the live project read against the
//! configuration, one line per fact, so an operator sees every problem at
//! once instead of the first one a delivery trips over.

use std::collections::HashSet;

use chrono::Utc;
use serde_json::Value;

use super::api::{text_of, Metadata, Op};
use super::matching::parse_export;
use super::timestamp::{format_timestamp, timestamp_style};
use super::RedcapSink;
use crate::domain::Phone;
use crate::sinks::SinkError;

/// One line of `optout-relay check-config` for REDCap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLine {
    pub ok: bool,
    pub message: String,
}

impl CheckLine {
    fn ok(message: impl Into<String>) -> CheckLine {
        CheckLine { ok: true, message: message.into() }
    }
    fn fail(message: impl Into<String>) -> CheckLine {
        CheckLine { ok: false, message: message.into() }
    }
}

impl RedcapSink {
    /// Checks the live project against the configuration, one line per fact.
    pub async fn check(&self) -> Vec<CheckLine> {
        let mut out = Vec::new();
        let project = match self.api.call(Op::Project, &[("content", "project")]).await {
            Ok(v) => v,
            Err(e) => {
                out.push(CheckLine::fail(e.to_string()));
                return out;
            }
        };
        let title = project.get("project_title").and_then(Value::as_str).unwrap_or("?");
        let pid = project.get("project_id").map(text_of).unwrap_or_default();
        out.push(CheckLine::ok(format!(
            "REDCap at {} accepted the API token (project {pid} {title:?})",
            self.api.host()
        )));
        let longitudinal = flag(project.get("is_longitudinal"));
        let repeating = flag(project.get("has_repeating_instruments_or_events"));

        let meta = match self
            .api
            .call(Op::Metadata, &[("content", "metadata")])
            .await
            .and_then(|v| Metadata::parse(&v).map_err(SinkError::Misconfigured))
        {
            Ok(m) => m,
            Err(e) => {
                out.push(CheckLine::fail(format!("cannot read the project's metadata: {e}")));
                return out;
            }
        };
        out.push(CheckLine::ok(format!("record-id field is `{}`", meta.record_id)));
        match meta.fields.get(&self.phone_field) {
            Some(f) => out.push(CheckLine::ok(format!(
                "phone field `{}` exists (instrument `{}`, validation {})",
                f.name,
                f.form,
                shown(&f.validation)
            ))),
            None => out.push(CheckLine::fail(format!(
                "redcap.phone_field `{}` is not a field of the project",
                self.phone_field
            ))),
        }
        match meta.fields.get(&self.optout_field) {
            Some(f) => out.push(CheckLine::ok(format!("opt-out field `{}` exists (instrument `{}`)", f.name, f.form))),
            None => out.push(CheckLine::fail(format!(
                "redcap.optout_field `{}` is not a field of the project",
                self.optout_field
            ))),
        }
        if let Some(f) = meta.fields.get(&self.optout_field) {
            if f.name == meta.record_id {
                out.push(CheckLine::fail(format!("redcap.optout_field `{}` is the record-id field", f.name)));
            }
            match timestamp_style(self.format, &f.field_type, &f.validation) {
                Ok(style) => out.push(CheckLine::ok(format!(
                    "opt-out field validation {}: an opt-out is stamped like {:?} ({}), an opt-in clears it",
                    shown(&f.validation),
                    format_timestamp(Utc::now(), self.zone, style),
                    self.zone
                ))),
                Err(why) => out.push(CheckLine::fail(format!("redcap.optout_field `{}` {why}", f.name))),
            }
        }

        let configured: Vec<(&str, &str)> = [("phone_event", &self.phone_event), ("optout_event", &self.optout_event)]
            .into_iter()
            .filter_map(|(name, ev)| ev.as_deref().map(|e| (name, e)))
            .collect();
        // The opt-out field is exported below only where the export cannot
        // fail on a bad optout_event already reported above.
        let mut optout_event_ok = self.optout_event.is_none();
        if !longitudinal {
            if configured.is_empty() {
                out.push(CheckLine::ok("project is classic (not longitudinal)"));
            }
            for (name, ev) in &configured {
                out.push(CheckLine::fail(format!(
                    "redcap.{name} is `{ev}` but the project is not longitudinal: remove it"
                )));
            }
        } else {
            if !configured.is_empty() {
                match self.api.call(Op::Events, &[("content", "event")]).await {
                    Ok(v) => {
                        let names: HashSet<String> = v
                            .as_array()
                            .map(|a| a.iter().filter_map(|e| e.get("unique_event_name").map(text_of)).collect())
                            .unwrap_or_default();
                        for (name, ev) in &configured {
                            if names.contains(*ev) {
                                optout_event_ok |= *name == "optout_event";
                                out.push(CheckLine::ok(format!("{name} `{ev}` exists")));
                            } else {
                                out.push(CheckLine::fail(format!(
                                    "redcap.{name} `{ev}` is not a unique event name of the project"
                                )));
                            }
                        }
                    }
                    Err(e) => out.push(CheckLine::fail(format!("cannot read the project's events: {e}"))),
                }
            }
            if self.phone_event.is_none() {
                out.push(CheckLine::ok(
                    "project is longitudinal and redcap.phone_event is not set: the phone field is read in every event",
                ));
            }
            if self.optout_event.is_none() {
                out.push(CheckLine::ok(
                    "redcap.optout_event is not set: the opt-out field is written in the event where the phone matched",
                ));
            }
        }
        if repeating {
            out.push(CheckLine::ok(
                "project has repeating instruments or events: the opt-out field is written on the non-repeating row \
                 unless it shares the phone's repeating instrument",
            ));
        }

        // Reading the phones proves the export right, and that it is not a
        // de-identified one (which silently drops identifiers such as phones);
        // reading the opt-out field too proves the sink can compare before it
        // writes (REDCap leaves out fields of instruments the user may not export).
        if meta.fields.contains_key(&self.phone_field) {
            let optout =
                (optout_event_ok && meta.fields.contains_key(&self.optout_field)).then_some(self.optout_field.as_str());
            match self.export(&meta.record_id, optout.is_some(), None).await {
                Ok(v) => match parse_export(&v, &meta.record_id, &self.phone_field, optout) {
                    Ok(rows) => {
                        let valid = rows.iter().filter(|r| Phone::parse_valid(&r.phone, self.region).is_some()).count();
                        out.push(CheckLine::ok(format!(
                            "export works: {} row(s), {valid} with a valid phone number",
                            rows.len()
                        )));
                    }
                    Err(e) => out.push(CheckLine::fail(e)),
                },
                Err(e) => out.push(CheckLine::fail(format!("cannot export the phone field: {e}"))),
            }
        }
        out
    }
}

/// REDCap flags are `0`/`1`, as numbers or strings.
fn flag(v: Option<&Value>) -> bool {
    v.map(text_of).is_some_and(|s| s.trim() == "1" || s.trim().eq_ignore_ascii_case("true"))
}

/// A validation as an operator reads it.
fn shown(validation: &str) -> String {
    if validation.is_empty() {
        "none (free text)".to_owned()
    } else {
        validation.to_owned()
    }
}
