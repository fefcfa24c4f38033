//! The phone → vanId mapping file of `optout-relay import-van-ids FILE.csv`:
//! the table the Parsons opt-out script takes, with columns `phone`,
//! `vanid` and, optionally, `committeeid` (names in any case, in any
//! order, other columns ignored). Pure: reading and checking only; the
//! command stores what it reads (`Store::import_van_ids`).
//!
//! Phones may be typed any way (`(415) 555-0101`, `+1 415…`, `4155550101`),
//! read in the configured default region. A row that cannot be used is
//! skipped with its line number and why, and the rest are read: one bad
//! line must not keep a whole list from VAN.

use std::collections::HashSet;
use std::io::Read;

use phonenumber::country;

use crate::domain::Phone;
use crate::store::VanIdRow;

/// What a file held.
#[derive(Debug, Default)]
pub struct MappingFile {
    /// Distinct usable rows, in file order.
    pub rows: Vec<VanIdRow>,
    /// Data lines read (the header not counted).
    pub lines: usize,
    /// Rows repeated within the file (kept once).
    pub repeated: usize,
    /// (line number, why), for the rows skipped.
    pub skipped: Vec<(u64, String)>,
}

/// Reads a mapping file. Fails only when the file as a whole cannot be
/// used (no `phone` or `vanid` column, not CSV at all).
pub fn read(input: impl Read, region: country::Id) -> Result<MappingFile, String> {
    let mut reader = csv::ReaderBuilder::new().flexible(true).trim(csv::Trim::All).from_reader(input);
    let headers = reader.headers().map_err(|e| format!("cannot read the header line: {e}"))?.clone();
    let column = |names: &[&str]| {
        headers.iter().position(|h| {
            let h = h.trim_start_matches('\u{feff}').trim().to_ascii_lowercase();
            names.contains(&h.as_str())
        })
    };
    let phone_col = column(&["phone"]);
    let van_col = column(&["vanid", "van_id"]);
    let committee_col = column(&["committeeid", "committee_id"]);
    let (Some(phone_col), Some(van_col)) = (phone_col, van_col) else {
        return Err(format!(
            "the header line must name the columns phone and vanid (and optionally committeeid); it has: {}",
            headers.iter().collect::<Vec<_>>().join(", ")
        ));
    };
    let mut out = MappingFile::default();
    let mut seen = HashSet::new();
    for (i, record) in reader.records().enumerate() {
        out.lines += 1;
        // Line numbers as an editor shows them: the header is line 1.
        let fallback = i as u64 + 2;
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map_or(fallback, |p| p.line());
                out.skipped.push((line, format!("not readable as CSV: {e}")));
                continue;
            }
        };
        let line = record.position().map_or(fallback, |p| p.line());
        let field = |col: usize| record.get(col).unwrap_or("").trim();
        match row(field(phone_col), field(van_col), committee_col.map_or("", field), region) {
            Ok(r) => {
                if seen.insert((r.phone.clone(), r.van_id, r.committee_id)) {
                    out.rows.push(r);
                } else {
                    out.repeated += 1;
                }
            }
            Err(why) => out.skipped.push((line, why)),
        }
    }
    Ok(out)
}

/// One row, or why it cannot be used. The phone is masked in the reason.
fn row(phone: &str, van_id: &str, committee: &str, region: country::Id) -> Result<VanIdRow, String> {
    if phone.is_empty() {
        return Err("no phone".to_owned());
    }
    let phone = Phone::parse(phone, region)
        .map_err(|_| format!("phone {} is not a valid number", crate::domain::mask(phone)))?;
    let van_id = positive(van_id).ok_or_else(|| format!("vanid {van_id:?} is not a positive whole number"))?;
    let committee_id = match committee {
        "" => None,
        c => Some(positive(c).ok_or_else(|| format!("committeeid {c:?} is not a positive whole number"))?),
    };
    Ok(VanIdRow { phone, van_id, committee_id })
}

/// A VAN id: digits only (a spreadsheet may have added `.0`).
fn positive(s: &str) -> Option<u64> {
    let s = s.strip_suffix(".0").unwrap_or(s);
    s.parse::<u64>().ok().filter(|n| *n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_str(s: &str) -> Result<MappingFile, String> {
        read(s.as_bytes(), country::Id::US)
    }

    #[test]
    fn the_parsons_table_reads_with_any_phone_format_and_column_order() {
        let f = read_str(
            "\u{feff}vanid,Phone,committeeid,name\n101,(415) 555-0101,55,Ann\n102,+1 415 555 0102,,Bo\n103,4155550103,55\n",
        )
        .unwrap();
        assert_eq!(f.lines, 3);
        assert!(f.skipped.is_empty(), "{:?}", f.skipped);
        let got: Vec<(&str, u64, Option<u64>)> =
            f.rows.iter().map(|r| (r.phone.as_str(), r.van_id, r.committee_id)).collect();
        assert_eq!(
            got,
            [("+14155550101", 101, Some(55)), ("+14155550102", 102, None), ("+14155550103", 103, Some(55))]
        );
    }

    #[test]
    fn bad_rows_are_skipped_with_their_line_and_why_and_repeats_kept_once() {
        let f = read_str(
            "phone,vanid,committeeid\n4155550101,101,1\nnot a phone,5,\n4155550102,abc,\n4155550103,0,\n\
             4155550104,7,x\n,8,\n4155550101,101,1\n4155550101,102,1\n",
        )
        .unwrap();
        assert_eq!((f.lines, f.rows.len(), f.repeated), (8, 2, 1));
        let lines: Vec<u64> = f.skipped.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, [3, 4, 5, 6, 7]);
        assert!(f.skipped[0].1.contains("is not a valid number"), "{:?}", f.skipped);
        assert!(f.skipped[1].1.contains("vanid \"abc\""), "{:?}", f.skipped);
        assert!(f.skipped[3].1.contains("committeeid \"x\""), "{:?}", f.skipped);
        assert_eq!(f.skipped[4].1, "no phone");
    }

    #[test]
    fn a_file_without_the_columns_is_refused_naming_what_it_has() {
        let err = read_str("number,id\n1,2\n").unwrap_err();
        assert!(err.contains("phone and vanid") && err.contains("number, id"), "{err}");
    }

    #[test]
    fn reasons_never_carry_a_whole_phone() {
        let f = read_str("phone,vanid\n+1 415 555 01019999,1\n").unwrap();
        assert!(!f.skipped[0].1.contains("5550101"), "{:?}", f.skipped);
    }
}
