//! Reading an opt-out list: pure, no I/O beyond the `Read` it is given.
//!
//! Lists come from the tools people already use (a Numero contact export, a
//! Spoke opt-out export, the Parsons `phone, committeeid, vanid` table, a
//! spreadsheet), so a column is found by what its header says, not where it
//! is: case, spaces, underscores and hyphens are ignored, and each column we
//! read has the names those tools give it. Columns we do not read are
//! ignored. A file whose first line is already a phone number has no header:
//! it is read as a one-column list of numbers.
//!
//! Each row is read on its own: a row that cannot be used is reported with
//! its line number, value and reason, and the rest of the file still counts.
//! Only a file that cannot be read at all (no phone column, an I/O error)
//! fails as a whole.

use std::io::{BufRead, BufReader, Read};

use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};
use phonenumber::country;
use serde::Serialize;

use crate::domain::{storable, EventKind, Phone};

/// What a header names, once normalised (lowercase, no spaces, `_` or `-`).
const PHONE: &[&str] = &[
    "phone",
    "phonenumber",
    "number",
    "mobile",
    "mobilephone",
    "mobilenumber",
    "cell",
    "cellphone",
    "cellnumber",
    "primaryphone",
    "primaryphonenumber",
    "telephone",
    "contactphone",
    "smsnumber",
    "from",
];
const TIME: &[&str] = &[
    "optedoutat",
    "optoutdate",
    "optedoutdate",
    "optoutat",
    "optoutdatetime",
    "optedoutdatetime",
    "primaryphoneoptoutdate",
    "primaryphoneoptedoutdate",
    "date",
    "datetime",
    "timestamp",
    "time",
    "createdat",
    "created",
    "unsubscribedat",
    "revokedat",
];
const KIND: &[&str] = &["kind", "status", "optstatus", "optoutstatus"];
const SCOPE: &[&str] = &["scope", "messagingservicesid", "messagingservice"];
const NOTE: &[&str] = &["note", "notes", "comment", "comments", "reason", "reasoncode"];

/// The header names a phone column may have, for the error that finds none.
pub const PHONE_HEADERS: &str = "phone, phone number, number, mobile, cell, primary phone, telephone";

/// A time more than this far ahead is a typing mistake, not a record: it
/// would outrank every real STOP or START until then.
const FUTURE_SLACK: chrono::Duration = chrono::Duration::days(1);

/// Longest value echoed back in a report of an invalid row.
const ECHO_MAX: usize = 64;

/// The file as a whole could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("no phone column: the header names none of {PHONE_HEADERS} (found: {0})")]
    NoPhoneColumn(String),
    #[error("the file is empty")]
    Empty,
    #[error("cannot read the file: {0}")]
    Io(#[from] std::io::Error),
}

/// A row that cannot be used, as the report shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct InvalidRow {
    /// The line of the file the row starts on (the header is line 1).
    pub line: u64,
    /// The value at fault (cut to 64 characters).
    pub value: String,
    pub reason: String,
}

/// A usable row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListRow {
    pub line: u64,
    pub phone: Phone,
    /// The number as the file has it.
    pub raw: String,
    /// When the person said it; `None` when the file does not say (now, on import).
    pub at: Option<DateTime<Utc>>,
    /// From the row's kind/status column, else `None` (the import's default).
    pub kind: Option<EventKind>,
    /// From the row's scope column, else `None` (the import's default).
    pub scope: Option<String>,
    pub note: Option<String>,
}

/// Where each field we read is, by column index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Columns {
    phone: usize,
    time: Option<usize>,
    kind: Option<usize>,
    scope: Option<usize>,
    note: Option<usize>,
}

fn normalise(header: &str) -> String {
    header
        .trim_start_matches('\u{feff}')
        .chars()
        .filter(|c| !matches!(c, ' ' | '_' | '-' | '\t' | '\r' | '?' | '.'))
        .flat_map(char::to_lowercase)
        .collect()
}

/// The first column (in file order) of each field; `None` without a phone column.
fn columns(headers: &[String]) -> Option<Columns> {
    let names: Vec<String> = headers.iter().map(|h| normalise(h)).collect();
    let find = |aliases: &[&str]| names.iter().position(|n| aliases.contains(&n.as_str()));
    Some(Columns { phone: find(PHONE)?, time: find(TIME), kind: find(KIND), scope: find(SCOPE), note: find(NOTE) })
}

/// `opt_out`, `Opted Out`, `STOP`, `unsubscribed` → opt-out; `opt_in`,
/// `START`, `subscribed` → opt-in.
pub fn parse_kind(value: &str) -> Option<EventKind> {
    match normalise(value).as_str() {
        "optout" | "optedout" | "stop" | "unsubscribed" | "unsubscribe" | "out" => Some(EventKind::OptOut),
        "optin" | "optedin" | "start" | "subscribed" | "subscribe" | "in" => Some(EventKind::OptIn),
        _ => None,
    }
}

/// RFC 3339, `YYYY-MM-DD`, `MM/DD/YYYY` (the US order the tools export),
/// each with an optional time; a time without a zone is UTC.
pub fn parse_time(value: &str) -> Option<DateTime<Utc>> {
    let v = value.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(v) {
        return Some(t.with_timezone(&Utc));
    }
    for f in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z"] {
        if let Ok(t) = DateTime::parse_from_str(v, f) {
            return Some(t.with_timezone(&Utc));
        }
    }
    for f in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M", "%m/%d/%Y %H:%M:%S", "%m/%d/%Y %H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(v, f) {
            return Some(Utc.from_utc_datetime(&t));
        }
    }
    for f in ["%Y-%m-%d", "%m/%d/%Y"] {
        if let Ok(d) = NaiveDate::parse_from_str(v, f) {
            return d.and_hms_opt(0, 0, 0).map(|t| Utc.from_utc_datetime(&t));
        }
    }
    None
}

fn echo(value: &str) -> String {
    value.chars().take(ECHO_MAX).collect()
}

/// The field separator: a comma, unless the first line has none and has
/// semicolons (a European spreadsheet) or tabs.
fn separator(first_line: &[u8]) -> u8 {
    if first_line.contains(&b',') {
        b','
    } else if first_line.contains(&b';') {
        b';'
    } else if first_line.contains(&b'\t') {
        b'\t'
    } else {
        b','
    }
}

/// Rows of a list, one at a time, in file order.
pub struct ListReader<R: Read> {
    csv: csv::Reader<BufReader<std::io::Chain<R, &'static [u8]>>>,
    columns: Columns,
    /// A headerless file's first line, a row of its own, not yet returned (with its line).
    pending_first: Option<(u64, csv::ByteRecord)>,
    record: csv::ByteRecord,
    region: country::Id,
    now: DateTime<Utc>,
}

impl<R: Read> ListReader<R> {
    /// Reads the header (or finds there is none). Numbers without a country
    /// code are read in `region`.
    pub fn new(input: R, region: country::Id) -> Result<ListReader<R>, ListError> {
        // Every record ends with a newline, the last one too (an extra blank
        // line is skipped): what `line_of` counts on.
        let mut buffered = BufReader::with_capacity(64 * 1024, input.chain(&b"\n"[..]));
        let head = buffered.fill_buf()?;
        let first_line = head.split(|b| *b == b'\n').next().unwrap_or_default();
        let sep = separator(first_line);
        let mut csv = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .delimiter(sep)
            // A record ends at `\n` only (a `\r` before it is trimmed off
            // the last field), so the reader's line count is exact after
            // CRLF too: what `line_of` counts on.
            .terminator(csv::Terminator::Any(b'\n'))
            .from_reader(buffered);
        let mut first = csv::ByteRecord::new();
        if !csv.read_byte_record(&mut first).map_err(csv_io)? {
            return Err(ListError::Empty);
        }
        let headers: Vec<String> = first.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect();
        let (columns, pending_first) = match columns(&headers) {
            Some(c) => (c, None),
            None if headers.first().is_some_and(|h| Phone::parse(h, region).is_ok()) => {
                (Columns::default(), Some((line_of(&csv, &first), first)))
            }
            None => {
                let found = headers.iter().map(|h| echo(h.trim())).collect::<Vec<_>>().join(", ");
                return Err(ListError::NoPhoneColumn(found));
            }
        };
        Ok(ListReader { csv, columns, pending_first, record: csv::ByteRecord::new(), region, now: Utc::now() })
    }

    /// The next row: `Ok(Some(Ok(row)))`, `Ok(Some(Err(invalid)))`, or
    /// `Ok(None)` at the end. An I/O error ends the file.
    pub fn next_row(&mut self) -> Result<Option<Result<ListRow, InvalidRow>>, ListError> {
        loop {
            let (line, record) = match self.pending_first.take() {
                Some(first) => first,
                None => {
                    match self.csv.read_byte_record(&mut self.record) {
                        Ok(true) => {}
                        Ok(false) => return Ok(None),
                        Err(e) => match csv_error(e)? {
                            Some(invalid) => return Ok(Some(Err(invalid))),
                            None => continue,
                        },
                    }
                    (line_of(&self.csv, &self.record), std::mem::take(&mut self.record))
                }
            };
            let field = |i: Option<usize>| -> Option<String> {
                let raw = record.get(i?)?;
                let text = String::from_utf8_lossy(raw);
                let text = text.trim();
                (!text.is_empty()).then(|| storable(text.to_owned()))
            };
            // A row with nothing in it (`,,,` from a spreadsheet) is no row.
            if record.iter().all(|f| f.iter().all(u8::is_ascii_whitespace)) {
                continue;
            }
            return Ok(Some(self.row(line, &field)));
        }
    }

    fn row(&self, line: u64, field: &dyn Fn(Option<usize>) -> Option<String>) -> Result<ListRow, InvalidRow> {
        let c = &self.columns;
        let invalid = |value: &str, reason: &str| InvalidRow { line, value: echo(value), reason: reason.to_owned() };
        let Some(raw) = field(Some(c.phone)) else {
            return Err(invalid("", "no phone number"));
        };
        let phone = Phone::parse(&raw, self.region).map_err(|_| invalid(&raw, "not a phone number"))?;
        let at = match field(c.time) {
            None => None,
            Some(t) => match parse_time(&t) {
                None => return Err(invalid(&t, "not a date (YYYY-MM-DD, MM/DD/YYYY or RFC 3339)")),
                Some(at) if at > self.now + FUTURE_SLACK => return Err(invalid(&t, "a date in the future")),
                Some(at) => Some(at),
            },
        };
        let kind = match field(c.kind) {
            None => None,
            Some(k) => Some(parse_kind(&k).ok_or_else(|| invalid(&k, "not a kind (opt_out or opt_in)"))?),
        };
        Ok(ListRow { line, phone, raw, at, kind, scope: field(c.scope), note: field(c.note) })
    }
}

/// The line a record just read starts on. The record's own position is
/// where the reader stood before it, ahead of any blank lines it skipped;
/// the reader's position now is the line after the record's newline, less
/// the newlines inside its quoted fields.
fn line_of<R: Read>(csv: &csv::Reader<R>, record: &csv::ByteRecord) -> u64 {
    let inner = record.iter().map(|f| f.iter().filter(|b| **b == b'\n').count() as u64).sum::<u64>();
    csv.position().line().saturating_sub(1 + inner).max(1)
}

fn csv_io(e: csv::Error) -> ListError {
    match e.into_kind() {
        csv::ErrorKind::Io(io) => ListError::Io(io),
        other => ListError::Io(std::io::Error::other(format!("{other:?}"))),
    }
}

/// An I/O error ends the file; anything else the csv reader refuses is one
/// bad row (`None`: nothing to report for it).
fn csv_error(e: csv::Error) -> Result<Option<InvalidRow>, ListError> {
    let line = e.position().map_or(0, |p| p.line());
    match e.into_kind() {
        csv::ErrorKind::Io(io) => Err(ListError::Io(io)),
        other => Ok(Some(InvalidRow { line, value: String::new(), reason: format!("unreadable row: {other:?}") })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(text: &str) -> (Vec<ListRow>, Vec<InvalidRow>) {
        let mut r = ListReader::new(text.as_bytes(), country::Id::US).expect("readable");
        let (mut ok, mut bad) = (Vec::new(), Vec::new());
        while let Some(row) = r.next_row().expect("no io error") {
            match row {
                Ok(row) => ok.push(row),
                Err(e) => bad.push(e),
            }
        }
        (ok, bad)
    }

    #[test]
    fn headers_are_matched_whatever_their_case_spaces_and_underscores() {
        for header in ["phone", "Phone Number", "PRIMARY_PHONE", "Primary Phone", "cell", "Mobile", "\u{feff}phone"] {
            let (ok, bad) = read_all(&format!("{header},x\n(415) 555-0101,1\n"));
            assert_eq!(ok.len(), 1, "{header}: {bad:?}");
            assert_eq!(ok[0].phone.as_str(), "+14155550101");
            assert_eq!(ok[0].line, 2);
        }
    }

    #[test]
    fn the_tools_exports_read_without_editing() {
        // Numero: contact id, names, Primary Phone, Opt Out Date.
        let (ok, bad) = read_all(
            "Numero Contact ID,First Name,Last Name,Primary Phone,Opt Out Date\n\
             123,Ann,Lee,415-555-0101,03/04/2025\n",
        );
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(ok[0].at, Some(Utc.with_ymd_and_hms(2025, 3, 4, 0, 0, 0).unwrap()));
        // Parsons: phone, committeeid, vanid (no time: now, on import).
        let (ok, _) = read_all("phone,committeeid,vanid\n4155550102,1,99\n");
        assert_eq!((ok[0].phone.as_str(), ok[0].at), ("+14155550102", None));
        // Spoke: cell, created_at, reason_code.
        let (ok, _) = read_all("cell,created_at,reason_code\n+14155550103,2024-11-02 17:01:02+00,stop\n");
        assert_eq!(ok[0].at, Some(Utc.with_ymd_and_hms(2024, 11, 2, 17, 1, 2).unwrap()));
        assert_eq!(ok[0].note.as_deref(), Some("stop"));
    }

    #[test]
    fn times_in_each_format_read_as_utc() {
        let want = Utc.with_ymd_and_hms(2025, 1, 31, 0, 0, 0).unwrap();
        for v in ["2025-01-31", "01/31/2025", "1/31/2025", "2025-01-31T00:00:00Z", "2025-01-31T01:00:00+01:00"] {
            assert_eq!(parse_time(v), Some(want), "{v}");
        }
        for v in ["31/01/2025", "yesterday", "2025-13-01", ""] {
            assert_eq!(parse_time(v), None, "{v}");
        }
    }

    #[test]
    fn invalid_rows_name_their_line_value_and_reason_and_the_rest_still_count() {
        let (ok, bad) = read_all(
            "phone,date,status\n\
             4155550101,2025-01-01,opt_out\n\
             12345,2025-01-01,opt_out\n\
             \n\
             4155550102,someday,opt_out\n\
             4155550103,2025-01-01,maybe\n\
             ,2025-01-01,opt_out\n\
             4155550104,2999-01-01,\n\
             4155550105,,START\n",
        );
        let lines: Vec<(u64, &str, &str)> = bad.iter().map(|b| (b.line, b.value.as_str(), b.reason.as_str())).collect();
        assert_eq!(
            lines,
            vec![
                (3, "12345", "not a phone number"),
                (5, "someday", "not a date (YYYY-MM-DD, MM/DD/YYYY or RFC 3339)"),
                (6, "maybe", "not a kind (opt_out or opt_in)"),
                (7, "", "no phone number"),
                (8, "2999-01-01", "a date in the future"),
            ]
        );
        assert_eq!(ok.iter().map(|r| r.line).collect::<Vec<_>>(), vec![2, 9]);
        assert_eq!(ok[1].kind, Some(EventKind::OptIn));
    }

    #[test]
    fn line_numbers_count_blank_lines_quoted_newlines_and_a_last_line_without_newline() {
        let (ok, bad) = read_all("phone,note\r\n\r\n4155550101,\"two\nlines\"\r\n\n\n12345,x\n4155550102,end");
        assert_eq!(ok.iter().map(|r| r.line).collect::<Vec<_>>(), vec![3, 8]);
        assert_eq!(bad.iter().map(|r| r.line).collect::<Vec<_>>(), vec![7]);
    }

    #[test]
    fn a_file_without_a_phone_column_is_refused_whole_and_a_bare_list_has_no_header() {
        let err = ListReader::new("name,email\nAnn,a@example.org\n".as_bytes(), country::Id::US).err();
        assert!(matches!(err, Some(ListError::NoPhoneColumn(ref f)) if f == "name, email"), "{err:?}");
        assert!(matches!(ListReader::new("".as_bytes(), country::Id::US).err(), Some(ListError::Empty)));
        let (ok, _) = read_all("4155550101\n4155550102\n");
        assert_eq!(ok.iter().map(|r| r.line).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn semicolons_and_tabs_separate_when_the_header_has_no_comma() {
        let (ok, _) = read_all("Phone;Opt Out Date\n4155550101;2025-01-01\n");
        assert_eq!(ok.len(), 1);
        let (ok, _) = read_all("Phone\tOpt Out Date\n4155550101\t2025-01-01\n");
        assert_eq!(ok.len(), 1);
    }

    #[test]
    fn kinds_read_the_way_people_write_them() {
        for v in ["opt_out", "Opted Out", "STOP", "unsubscribed"] {
            assert_eq!(parse_kind(v), Some(EventKind::OptOut), "{v}");
        }
        for v in ["opt_in", "opt-in", "START", "subscribed"] {
            assert_eq!(parse_kind(v), Some(EventKind::OptIn), "{v}");
        }
        assert_eq!(parse_kind("help"), None);
    }
}
