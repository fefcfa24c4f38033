//! Which rows of the project get the opt-out value: the export parsed, each
//! row's phone matched against the batch's numbers, the row (slot) each match
//! writes to, and the import rows that write the value and nothing else.
//! Whether a slot needs writing at all is `compare`'s business.
//!
//! Matching happens here rather than with `filterLogic`, so every way a number
//! can be typed is caught and no webhook text ever reaches REDCap logic. A
//! blank, short or invalid phone never matches.
//!
//! Repeating instruments: the opt-out field is written on the row the phone
//! came from only when both fields live on that same repeating instrument (or
//! the phone sits in a repeating event); otherwise it is written on the
//! record's non-repeating row, without `redcap_repeat_*` fields.

use std::collections::{HashMap, HashSet};

use phonenumber::country;
use serde_json::{json, Map, Value};

use super::api::text_of;
use crate::domain::Phone;

/// Digits of a wanted number looked for in a row before parsing it (see [`Tails`]).
const TAIL_DIGITS: usize = 7;

/// One row of the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ExportRow {
    pub(super) record: String,
    /// `redcap_event_name`: present exactly when the project is longitudinal.
    pub(super) event: Option<String>,
    pub(super) repeat_instrument: String,
    pub(super) repeat_instance: String,
    pub(super) phone: String,
    /// The opt-out field's value on this row ("" when it was not exported).
    pub(super) optout: String,
}

/// The export's rows. One without the record id or the phone field is refused:
/// a de-identified export silently drops identifiers such as phones. With
/// `optout_field`, a row without it is refused too: REDCap leaves out fields
/// of instruments the API user may not export, and reading such a field as
/// blank would make every opt-in look done and every opt-out look missing.
pub(super) fn parse_export(
    v: &Value,
    record_id: &str,
    phone_field: &str,
    optout_field: Option<&str>,
) -> Result<Vec<ExportRow>, String> {
    let rows = v.as_array().ok_or("REDCap's record export is not a JSON array")?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let obj = row.as_object().ok_or("REDCap's record export holds something that is not an object")?;
        let record = obj
            .get(record_id)
            .map(text_of)
            .filter(|r| !r.is_empty())
            .ok_or_else(|| format!("REDCap's record export lacks the record-id field `{record_id}`"))?;
        let phone = obj.get(phone_field).map(text_of).ok_or_else(|| {
            format!(
                "REDCap's record export lacks the phone field `{phone_field}`: the API user needs full \
                 (not de-identified) data export rights"
            )
        })?;
        let optout = match optout_field {
            Some(f) => obj.get(f).map(text_of).ok_or_else(|| {
                format!(
                    "REDCap's record export lacks the opt-out field `{f}`: the API user needs export rights to its \
                     instrument"
                )
            })?,
            None => String::new(),
        };
        let get = |k: &str| obj.get(k).map(text_of).unwrap_or_default();
        out.push(ExportRow {
            record,
            event: obj.get("redcap_event_name").map(text_of),
            repeat_instrument: get("redcap_repeat_instrument"),
            repeat_instance: get("redcap_repeat_instance"),
            phone,
            optout,
        });
    }
    Ok(out)
}

/// The E.164 of each row's phone when it may be one of `wanted`; None for
/// blanks, short codes, invalid numbers and numbers nobody in the batch has,
/// and for rows of other events than `phone_event` (exported only for their
/// opt-out value: a phone typed there is not the one the project uses).
/// Parsing is slow (libphonenumber), so rows that cannot hold a wanted number
/// are ruled out on their digits first.
pub(super) fn normalise(
    rows: &[ExportRow],
    wanted: &[Option<&str>],
    region: country::Id,
    phone_event: Option<&str>,
) -> Vec<Option<Phone>> {
    let tails = Tails::of(wanted.iter().flatten().copied());
    rows.iter()
        .map(|r| {
            let other_event = matches!((phone_event, r.event.as_deref()), (Some(p), Some(e)) if p != e);
            if other_event || r.phone.trim().is_empty() || !tails.may_hold(&r.phone) {
                return None;
            }
            Phone::parse_valid(&r.phone, region)
        })
        .collect()
}

/// The last digits of the wanted numbers. However a number is typed, its
/// subscriber digits come last and in one run once separators are dropped:
/// trunk prefixes, country codes and carrier tokens go in front, an
/// extension after. So a row whose digits contain no wanted tail cannot parse
/// to a wanted number and needs no parse.
struct Tails {
    lens: Vec<usize>,
    set: HashSet<(usize, u64)>,
}

impl Tails {
    fn of<'a>(e164s: impl Iterator<Item = &'a str>) -> Tails {
        let mut set = HashSet::new();
        for e164 in e164s {
            let digits: Vec<u8> = e164.bytes().filter(u8::is_ascii_digit).map(|b| b - b'0').collect();
            // At most the national number: a country code has up to 3 digits
            // and is left out when typed in the default region.
            let len = TAIL_DIGITS.min(digits.len().saturating_sub(3));
            if len > 0 {
                set.insert((len, value(&digits[digits.len() - len..])));
            }
        }
        let mut lens: Vec<usize> = set.iter().map(|(l, _)| *l).collect();
        lens.sort_unstable();
        lens.dedup();
        Tails { lens, set }
    }

    fn may_hold(&self, raw: &str) -> bool {
        // libphonenumber reads non-ASCII digits too; leave those to it.
        if !raw.is_ascii() {
            return true;
        }
        let mut digits = [0u8; 64];
        let mut n = 0;
        for b in raw.bytes().filter(u8::is_ascii_digit) {
            if n == digits.len() {
                return true;
            }
            digits[n] = b - b'0';
            n += 1;
        }
        self.lens.iter().any(|&len| n >= len && digits[..n].windows(len).any(|w| self.set.contains(&(len, value(w)))))
    }
}

fn value(digits: &[u8]) -> u64 {
    digits.iter().fold(0, |acc, &d| acc * 10 + u64::from(d))
}

/// Where one opt-out value goes: a record's row in an event (and repeat instance).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Slot {
    pub(super) record: String,
    pub(super) event: Option<String>,
    /// `(redcap_repeat_instrument, redcap_repeat_instance)`; `None` for the non-repeating row.
    pub(super) repeat: Option<(String, String)>,
}

impl Slot {
    /// The slot an exported row is: where its opt-out value lives.
    pub(super) fn of(row: &ExportRow) -> Slot {
        let repeat =
            (!row.repeat_instance.is_empty()).then(|| (row.repeat_instrument.clone(), row.repeat_instance.clone()));
        Slot { record: row.record.clone(), event: row.event.clone(), repeat }
    }
}

/// One slot the batch decides, and the item that decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Write {
    pub(super) slot: Slot,
    /// Index of the item whose value the slot should hold.
    pub(super) item: usize,
}

/// Every slot a batch decides, and what each item's phone matched.
#[derive(Debug, Default)]
pub(super) struct Plan {
    pub(super) writes: Vec<Write>,
    /// Per item: the distinct records its phone matched.
    pub(super) matched: Vec<Vec<String>>,
}

/// Decides every slot of a batch. `wanted[i]` is item i's E.164 phone (None:
/// nothing to write); `phones[j]` is row j's normalised phone. A blank or
/// invalid row phone is None and so never matches. When two items reach the
/// same slot (two numbers on one record), `beats(challenger, holder)` says
/// whether the challenger takes it.
pub(super) fn plan_writes(
    wanted: &[Option<&str>],
    rows: &[ExportRow],
    phones: &[Option<Phone>],
    optout_event: Option<&str>,
    optout_form: &str,
    beats: impl Fn(usize, usize) -> bool,
) -> Result<Plan, String> {
    let mut by_phone: HashMap<&str, Vec<usize>> = HashMap::new();
    for (j, p) in phones.iter().enumerate() {
        if let Some(p) = p {
            by_phone.entry(p.as_str()).or_default().push(j);
        }
    }
    let mut plan = Plan { writes: Vec::new(), matched: vec![Vec::new(); wanted.len()] };
    let mut index: HashMap<Slot, usize> = HashMap::new();
    for (i, phone) in wanted.iter().enumerate() {
        let Some(phone) = phone else { continue };
        for &j in by_phone.get(phone).map(Vec::as_slice).unwrap_or_default() {
            let row = &rows[j];
            if !plan.matched[i].contains(&row.record) {
                plan.matched[i].push(row.record.clone());
            }
            let slot = target_for(row, optout_event, optout_form)?;
            match index.get(&slot) {
                Some(&k) => {
                    if plan.writes[k].item != i && beats(i, plan.writes[k].item) {
                        plan.writes[k].item = i;
                    }
                }
                None => {
                    index.insert(slot.clone(), plan.writes.len());
                    plan.writes.push(Write { slot, item: i });
                }
            }
        }
    }
    Ok(plan)
}

/// The row the opt-out value goes to for a phone found on `row`.
pub(super) fn target_for(row: &ExportRow, optout_event: Option<&str>, optout_form: &str) -> Result<Slot, String> {
    let event = match (&row.event, optout_event) {
        (Some(_), Some(configured)) => Some(configured.to_owned()),
        (Some(matched), None) => Some(matched.clone()),
        (None, Some(configured)) => {
            return Err(format!("redcap.optout_event is `{configured}` but the project is not longitudinal"))
        }
        (None, None) => None,
    };
    let same_event = optout_event.is_none() || row.event.as_deref() == optout_event;
    let repeat = if row.repeat_instance.is_empty() || !same_event {
        None
    } else if row.repeat_instrument.is_empty() {
        // A repeating event: every instrument in it repeats, the opt-out field's too.
        Some((String::new(), row.repeat_instance.clone()))
    } else if row.repeat_instrument == optout_form {
        Some((row.repeat_instrument.clone(), row.repeat_instance.clone()))
    } else {
        None
    };
    Ok(Slot { record: row.record.clone(), event, repeat })
}

/// The import's `data`: one row per (slot, value), holding only the record
/// id, the event/repeat keys and the opt-out field, so nothing else is touched.
pub(super) fn import_rows<'a>(
    writes: impl Iterator<Item = (&'a Slot, &'a str)>,
    record_id: &str,
    optout_field: &str,
) -> Value {
    let rows = writes
        .map(|(slot, value)| {
            let mut row = Map::new();
            row.insert(record_id.to_owned(), json!(slot.record));
            if let Some(ev) = &slot.event {
                row.insert("redcap_event_name".into(), json!(ev));
            }
            if let Some((instrument, instance)) = &slot.repeat {
                row.insert("redcap_repeat_instrument".into(), json!(instrument));
                row.insert("redcap_repeat_instance".into(), json!(instance));
            }
            row.insert(optout_field.to_owned(), json!(value));
            Value::Object(row)
        })
        .collect();
    Value::Array(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(record: &str, event: Option<&str>, phone: &str) -> ExportRow {
        ExportRow {
            record: record.into(),
            event: event.map(Into::into),
            repeat_instrument: String::new(),
            repeat_instance: String::new(),
            phone: phone.into(),
            optout: String::new(),
        }
    }

    /// The later item takes a slot, whatever it writes.
    fn later(_: usize, _: usize) -> bool {
        true
    }

    /// Every row's phone parsed, without the digit precheck of [`normalise`].
    fn parse_every_phone(rows: &[ExportRow]) -> Vec<Option<Phone>> {
        rows.iter().map(|r| Phone::parse_valid(&r.phone, country::Id::US)).collect()
    }

    #[test]
    fn the_digit_precheck_keeps_every_typed_form_of_a_wanted_number() {
        let tails = Tails::of(["+14155550101", "+442079460958", "+5491112345678", "+6834002"].into_iter());
        for raw in [
            "(415) 555-0101",
            "415-555-0101",
            "4155550101",
            "+1 415 555 0101",
            "1-415-555-0101",
            "415.555.0101",
            "415-555-0101 ext. 12",
            "020 7946 0958",
            "+44 (0)20 7946 0958",
            "011 15 1234-5678",
            "+683 4002",
            "\u{ff14}\u{ff11}\u{ff15}5550101",
        ] {
            assert!(tails.may_hold(raw), "{raw}");
        }
        for raw in ["415-555-0102", "", "12345", "+44 20 7946 0959"] {
            assert!(!tails.may_hold(raw), "{raw}");
        }
    }

    #[test]
    fn the_precheck_changes_no_match() {
        let rows: Vec<ExportRow> =
            ["(415) 555-0101", "415-555-0102", "", "12345", "415.555.0101 x3", "+44 20 7946 0958"]
                .iter()
                .enumerate()
                .map(|(i, p)| row(&i.to_string(), None, p))
                .collect();
        let wanted = [Some("+14155550101"), Some("+442079460958")];
        let fast = normalise(&rows, &wanted, country::Id::US, None);
        let slow = parse_every_phone(&rows);
        for (j, (f, s)) in fast.iter().zip(&slow).enumerate() {
            let wanted_slow = s.as_ref().filter(|p| wanted.contains(&Some(p.as_str())));
            assert_eq!(f.as_ref(), wanted_slow, "row {j}");
        }
        assert!(fast[0].is_some() && fast[5].is_some());
        // An extension is dropped: the desk phone still matches.
        assert!(fast[4].is_some());
    }

    #[test]
    fn every_typed_format_matches_the_e164_number() {
        let formats = [
            "(415) 555-0101",
            "415-555-0101",
            "4155550101",
            "+1 415 555 0101",
            "1-415-555-0101",
            "415.555.0101",
            "415 555-0101",
        ];
        let rows: Vec<ExportRow> = formats.iter().enumerate().map(|(i, p)| row(&i.to_string(), None, p)).collect();
        let phones = parse_every_phone(&rows);
        let plan = plan_writes(&[Some("+14155550101")], &rows, &phones, None, "f", later).unwrap();
        let records: Vec<&str> = plan.writes.iter().map(|w| w.slot.record.as_str()).collect();
        assert_eq!(records, ["0", "1", "2", "3", "4", "5", "6"]);
        assert_eq!(plan.matched[0].len(), formats.len());
    }

    #[test]
    fn other_numbers_do_not_match() {
        let rows =
            vec![row("1", None, "415-555-0102"), row("2", None, "+44 20 7946 0958"), row("3", None, "(415) 555-0101")];
        let phones = parse_every_phone(&rows);
        let plan = plan_writes(&[Some("+14155550101")], &rows, &phones, None, "f", later).unwrap();
        assert_eq!(plan.writes.len(), 1);
        assert_eq!(plan.writes[0].slot.record, "3");
    }

    #[test]
    fn blank_and_short_code_phones_never_match() {
        let rows = vec![row("1", None, ""), row("2", None, "   "), row("3", None, "12345"), row("4", None, "n/a")];
        let phones = parse_every_phone(&rows);
        assert!(phones.iter().all(Option::is_none));
        // Whatever the item's number (a short code, a foreign number, even an empty string).
        for wanted in ["+12345", "12345", "", "+442079460958", "+14155550101"] {
            let plan = plan_writes(&[Some(wanted)], &rows, &phones, None, "f", later).unwrap();
            assert!(plan.writes.is_empty(), "{wanted:?}");
            assert!(plan.matched[0].is_empty());
        }
    }

    #[test]
    fn items_without_value_write_nothing() {
        let rows = vec![row("1", None, "4155550101")];
        let plan = plan_writes(&[None], &rows, &parse_every_phone(&rows), None, "f", later).unwrap();
        assert!(plan.writes.is_empty());
    }

    #[test]
    fn the_same_record_and_event_is_written_once_by_the_last_item() {
        // Record 1 holds two numbers in two events; optout_event sends both to one row.
        let rows = vec![
            row("1", Some("baseline_arm_1"), "415-555-0101"),
            row("1", Some("followup_arm_1"), "415-555-0102"),
            row("2", Some("baseline_arm_1"), "415-555-0102"),
        ];
        let phones = parse_every_phone(&rows);
        let plan = plan_writes(
            &[Some("+14155550101"), Some("+14155550102")],
            &rows,
            &phones,
            Some("consent_arm_1"),
            "f",
            later,
        )
        .unwrap();
        let got: Vec<(&str, Option<&str>, usize)> =
            plan.writes.iter().map(|w| (w.slot.record.as_str(), w.slot.event.as_deref(), w.item)).collect();
        assert_eq!(got, [("1", Some("consent_arm_1"), 1), ("2", Some("consent_arm_1"), 1)]);
        assert_eq!(plan.matched[0], ["1"]);
        assert_eq!(plan.matched[1], ["1", "2"]);

        // Without optout_event each matched event is its own row: no collision.
        let plan =
            plan_writes(&[Some("+14155550101"), Some("+14155550102")], &rows, &phones, None, "f", later).unwrap();
        let got: Vec<(&str, Option<&str>, usize)> =
            plan.writes.iter().map(|w| (w.slot.record.as_str(), w.slot.event.as_deref(), w.item)).collect();
        assert_eq!(
            got,
            [("1", Some("baseline_arm_1"), 0), ("1", Some("followup_arm_1"), 1), ("2", Some("baseline_arm_1"), 1)]
        );
    }

    #[test]
    fn optout_event_needs_a_longitudinal_export() {
        let rows = vec![row("1", None, "4155550101")];
        assert!(plan_writes(&[Some("+14155550101")], &rows, &parse_every_phone(&rows), Some("ev"), "f", later).is_err());
    }

    #[test]
    fn repeating_rows_write_the_instance_only_when_the_field_shares_it() {
        let mut r = row("1", None, "4155550101");
        r.repeat_instrument = "contacts".into();
        r.repeat_instance = "2".into();
        assert_eq!(target_for(&r, None, "contacts").unwrap().repeat, Some(("contacts".into(), "2".into())));
        assert_eq!(target_for(&r, None, "consent").unwrap().repeat, None);
        // A repeating event.
        let mut e = row("1", Some("visit_arm_1"), "4155550101");
        e.repeat_instance = "3".into();
        assert_eq!(target_for(&e, None, "consent").unwrap().repeat, Some((String::new(), "3".into())));
        assert_eq!(target_for(&e, Some("enrol_arm_1"), "consent").unwrap().repeat, None);
    }

    #[test]
    fn a_slot_reached_by_two_items_goes_to_the_one_that_beats_the_other() {
        // One record, two numbers (two instances), the opt-out field on the record row.
        let mut a = row("1", None, "4155550101");
        a.repeat_instrument = "contacts".into();
        a.repeat_instance = "1".into();
        let mut b = a.clone();
        b.phone = "4155550102".into();
        b.repeat_instance = "2".into();
        let rows = vec![a, b];
        let phones = parse_every_phone(&rows);
        let wanted = [Some("+14155550101"), Some("+14155550102")];
        let first_wins = plan_writes(&wanted, &rows, &phones, None, "consent", |_, _| false).unwrap();
        assert_eq!(first_wins.writes.len(), 1);
        assert_eq!(first_wins.writes[0].item, 0);
        let second_wins = plan_writes(&wanted, &rows, &phones, None, "consent", later).unwrap();
        assert_eq!(second_wins.writes[0].item, 1);
        assert_eq!(second_wins.matched, [vec!["1".to_owned()], vec!["1".to_owned()]]);
    }

    #[test]
    fn rows_outside_the_phone_event_never_match() {
        let rows = vec![row("1", Some("consent_arm_1"), "4155550101"), row("2", Some("enrol_arm_1"), "4155550101")];
        let phones = normalise(&rows, &[Some("+14155550101")], country::Id::US, Some("enrol_arm_1"));
        assert_eq!(phones[0], None);
        assert!(phones[1].is_some());
    }

    #[test]
    fn an_exported_row_is_its_own_slot() {
        let mut r = row("1", Some("ev"), "");
        assert_eq!(Slot::of(&r), Slot { record: "1".into(), event: Some("ev".into()), repeat: None });
        r.repeat_instrument = "contacts".into();
        r.repeat_instance = "2".into();
        assert_eq!(Slot::of(&r).repeat, Some(("contacts".into(), "2".into())));
        // The slot a phone on that row writes to, when the field shares its instrument, is the row itself.
        assert_eq!(target_for(&r, None, "contacts").unwrap(), Slot::of(&r));
    }

    #[test]
    fn import_rows_hold_only_the_keys_and_the_optout_field() {
        let a = Slot { record: "7".into(), event: None, repeat: None };
        let b = Slot { record: "9".into(), event: Some("ev_1".into()), repeat: None };
        let data = import_rows([(&a, "2026-01-01 10:00"), (&b, "")].into_iter(), "study_id", "optout_at");
        assert_eq!(
            data,
            json!([
                {"study_id": "7", "optout_at": "2026-01-01 10:00"},
                {"study_id": "9", "redcap_event_name": "ev_1", "optout_at": ""}
            ])
        );
    }

    #[test]
    fn export_rows_need_the_record_id_and_the_phone() {
        let ok = json!([{"study_id": "1", "redcap_event_name": "e1", "phone": "415"}, {"study_id": 2, "phone": ""}]);
        let rows = parse_export(&ok, "study_id", "phone", None).unwrap();
        assert_eq!(rows[0].event.as_deref(), Some("e1"));
        assert_eq!(rows[1].record, "2");
        assert!(parse_export(&json!([{"phone": "1"}]), "study_id", "phone", None).is_err());
        let e = parse_export(&json!([{"study_id": "1"}]), "study_id", "phone", None).unwrap_err();
        assert!(e.contains("de-identified"), "{e}");
        assert!(parse_export(&json!({"a": 1}), "study_id", "phone", None).is_err());
    }

    #[test]
    fn export_rows_carry_the_optout_value_when_asked() {
        let v = json!([{"study_id": "1", "phone": "415", "optout_at": "2026-01-01 10:00"}, {"study_id": "2", "phone": "", "optout_at": ""}]);
        let rows = parse_export(&v, "study_id", "phone", Some("optout_at")).unwrap();
        assert_eq!(rows[0].optout, "2026-01-01 10:00");
        assert_eq!(rows[1].optout, "");
        let e =
            parse_export(&json!([{"study_id": "1", "phone": ""}]), "study_id", "phone", Some("optout_at")).unwrap_err();
        assert!(e.contains("optout_at") && e.contains("export rights"), "{e}");
    }
}
