//! Compare-and-write: which of the slots a batch decides (see `matching`)
//! already hold their value, and what each item is told.
//!
//! Writing only what differs is what makes a convergence safe to repeat: the
//! relay runs the same one again after an uncertain write, a lost lease or a
//! resync, and a slot that already holds its value costs nothing and, more to
//! the point, is not written over with a value that might be stale a moment
//! later.

use std::collections::{HashMap, HashSet};

use serde_json::{json, Map, Value};

use super::matching::{ExportRow, Plan, Slot, Write};
use super::timestamp::same_moment;
use crate::sinks::Target;

/// What an item wants in the opt-out field of the slots it decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Want {
    /// The opt-out time, formatted as the field takes it.
    Stamp(String),
    /// Blank (an opt-in clears the field).
    Clear,
}

impl Want {
    /// The value written.
    pub(super) fn value(&self) -> &str {
        match self {
            Want::Stamp(v) => v,
            Want::Clear => "",
        }
    }

    /// Whether a field holding `current` already says this. Whitespace only
    /// counts as blank: writing "" over it would change nothing anyone reads.
    pub(super) fn held_by(&self, current: &str) -> bool {
        match self {
            Want::Stamp(v) => same_moment(current, v),
            Want::Clear => current.trim().is_empty(),
        }
    }
}

/// Which of two items takes a slot both reach (two numbers on one record):
/// an opt-out beats an opt-in, since texting someone who said STOP is the
/// harm this service exists to prevent; of two opt-outs the earlier wins, the
/// time since which the record should not have been texted. Ties keep the
/// first, so the choice does not depend on the order of equal items.
pub(super) fn beats(targets: &[Target]) -> impl Fn(usize, usize) -> bool + '_ {
    move |challenger, holder| match (targets[challenger], targets[holder]) {
        (Target::OptedOut { since: c }, Target::OptedOut { since: h }) => c < h,
        (Target::OptedOut { .. }, Target::OptedIn) => true,
        (Target::OptedIn, _) => false,
    }
}

/// The opt-out value of every exported slot. A slot the export does not
/// hold (a record with no data in the opt-out event yet) is blank.
pub(super) fn current_values(rows: &[ExportRow]) -> HashMap<Slot, String> {
    rows.iter().map(|r| (Slot::of(r), r.optout.clone())).collect()
}

/// The writes of `plan` whose slot does not already hold its item's value, in plan order.
pub(super) fn differing<'a>(plan: &'a Plan, wants: &[Want], current: &HashMap<Slot, String>) -> Vec<&'a Write> {
    plan.writes.iter().filter(|w| !wants[w.item].held_by(current.get(&w.slot).map_or("", String::as_str))).collect()
}

/// How many distinct records the writes touch: what REDCap's import count counts.
pub(super) fn distinct_records(writes: &[&Write]) -> usize {
    writes.iter().map(|w| w.slot.record.as_str()).collect::<HashSet<_>>().len()
}

/// One outcome per item, recorded by the relay and reported by email:
/// `records` the records its phone matched, `written` those this call wrote
/// for it, `unchanged` how many matched records it did not need to write,
/// `value` what its slots should now hold, and `events` (longitudinal
/// projects) where those slots are.
pub(super) fn outcomes(plan: &Plan, wants: &[Want], written: &[&Write], longitudinal: bool) -> Vec<Value> {
    let mut wrote: Vec<Vec<&str>> = vec![Vec::new(); wants.len()];
    for w in written {
        let list = &mut wrote[w.item];
        if !list.contains(&w.slot.record.as_str()) {
            list.push(&w.slot.record);
        }
    }
    let mut events: Vec<Vec<&str>> = vec![Vec::new(); wants.len()];
    for w in &plan.writes {
        if let Some(ev) = &w.slot.event {
            if !events[w.item].contains(&ev.as_str()) {
                events[w.item].push(ev);
            }
        }
    }
    wants
        .iter()
        .enumerate()
        .map(|(i, want)| {
            let matched = plan.matched.get(i).map_or(&[][..], Vec::as_slice);
            let mut out = Map::new();
            out.insert("records".into(), json!(matched));
            out.insert("written".into(), json!(wrote[i]));
            out.insert("unchanged".into(), json!(matched.len().saturating_sub(wrote[i].len())));
            if !matched.is_empty() {
                if longitudinal {
                    out.insert("events".into(), json!(events[i]));
                }
                out.insert("value".into(), json!(want.value()));
            }
            Value::Object(out)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn slot(record: &str) -> Slot {
        Slot { record: record.into(), event: None, repeat: None }
    }

    fn plan(writes: &[(&str, usize)], matched: &[&[&str]]) -> Plan {
        Plan {
            writes: writes.iter().map(|(r, i)| Write { slot: slot(r), item: *i }).collect(),
            matched: matched.iter().map(|m| m.iter().map(|r| (*r).to_owned()).collect()).collect(),
        }
    }

    #[test]
    fn only_slots_that_differ_are_written() {
        let stamp = Want::Stamp("2026-11-23 09:15".into());
        let p = plan(&[("1", 0), ("2", 0), ("3", 1), ("4", 1), ("5", 0)], &[&["1", "2", "5"], &["3", "4"]]);
        let current: HashMap<Slot, String> = [
            (slot("1"), "2026-11-23 09:15:00".to_owned()), // kept with seconds: the same
            (slot("2"), "2026-01-01 00:00".to_owned()),    // another stamp: differs
            (slot("3"), "  ".to_owned()),                  // blank enough
            (slot("4"), "2026-01-01 00:00".to_owned()),    // to clear
        ]
        .into_iter()
        .collect();
        // Slot 5 is not in the export: blank, so it is stamped.
        let wants = [stamp, Want::Clear];
        let written = differing(&p, &wants, &current);
        let records: Vec<&str> = written.iter().map(|w| w.slot.record.as_str()).collect();
        assert_eq!(records, ["2", "4", "5"]);
        assert_eq!(distinct_records(&written), 3);
        let out = outcomes(&p, &wants, &written, false);
        assert_eq!(
            out,
            [
                json!({"records": ["1", "2", "5"], "written": ["2", "5"], "unchanged": 1, "value": "2026-11-23 09:15"}),
                json!({"records": ["3", "4"], "written": ["4"], "unchanged": 1, "value": ""}),
            ]
        );
    }

    #[test]
    fn an_item_that_matched_nothing_says_so() {
        let p = plan(&[], &[&[]]);
        let out = outcomes(&p, &[Want::Clear], &[], true);
        assert_eq!(out, [json!({"records": [], "written": [], "unchanged": 0})]);
    }

    #[test]
    fn events_are_where_the_items_slots_are() {
        let mut p = plan(&[("1", 0), ("1", 0)], &[&["1"]]);
        p.writes[0].slot.event = Some("a".into());
        p.writes[1].slot.event = Some("b".into());
        let current: HashMap<Slot, String> =
            [(p.writes[0].slot.clone(), "2026-01-01 00:00".to_owned())].into_iter().collect();
        let wants = [Want::Stamp("2026-01-01 00:00".into())];
        let written = differing(&p, &wants, &current);
        assert_eq!(written.len(), 1);
        let out = outcomes(&p, &wants, &written, true);
        assert_eq!(
            out[0],
            json!({"records": ["1"], "written": ["1"], "unchanged": 0, "events": ["a", "b"], "value": "2026-01-01 00:00"})
        );
    }

    #[test]
    fn an_opt_out_beats_an_opt_in_and_the_earlier_opt_out_beats_the_later() {
        let early = Target::OptedOut { since: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() };
        let late = Target::OptedOut { since: Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap() };
        let targets = [Target::OptedIn, late, early, Target::OptedIn];
        let beats = beats(&targets);
        assert!(beats(1, 0), "an opt-out takes the slot from an opt-in");
        assert!(!beats(0, 1), "never the other way");
        assert!(beats(2, 1), "the earlier opt-out");
        assert!(!beats(1, 2));
        assert!(!beats(3, 0), "equal: the holder keeps it");
        assert!(!beats(2, 2));
    }
}
