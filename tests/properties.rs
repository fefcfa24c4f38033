//! Property tests of the parsers that take outside input: the webhook form,
//! the signature, phone numbers, keywords and REDCap's answers. No panic on
//! any input; round trips where they exist. The checks and generators live
//! in `properties/checks.rs`, shared with the million-input bench
//! (`bench/properties.sh`). CI runs proptest's default 256 cases each;
//! `PROPTEST_CASES=10000 cargo test --test properties` runs more.

#[path = "properties/checks.rs"]
mod checks;

use checks::*;
use optout_relay::config::KeywordsConfig;
use optout_relay::twilio::keywords::Keywords;
use proptest::prelude::*;

proptest! {
    // The case count follows PROPTEST_CASES (default 256); no failure files:
    // a failing case is printed, shrunk, and belongs in a table-driven test.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_form_decoder_takes_any_bytes_and_round_trips_pairs(bytes in prop::collection::vec(any::<u8>(), 0..256), pairs in pairs()) {
        form(&bytes, &pairs);
    }

    #[test]
    fn signatures_verify_as_computed_and_garbage_never_passes(
        token in "[A-Za-z0-9]{1,40}",
        url in url(),
        pairs in pairs(),
        garbage in text(),
        settings in prop::option::of(prop_oneof![text(), "key=[a-z]{1,4},algorithm=HMAC_SHA(1|256)"]),
    ) {
        signature(&token, &url, &pairs, &garbage, settings.as_deref());
    }

    #[test]
    fn phone_numbers_parse_to_e164_without_panic_and_valid_ones_are_accepted(raw in phone_text(), region in region()) {
        phone(&raw, region);
    }

    #[test]
    fn keywords_classify_however_dressed_and_any_text_without_panic(
        body in text(),
        opt_out_type in prop::option::of(prop_oneof![text(), "(STOP|START|HELP|stop|Start)"]),
        (dressed, kind) in dressed_keyword(),
    ) {
        let k = Keywords::new(&KeywordsConfig::default());
        keywords(&k, &body, opt_out_type.as_deref(), &dressed, kind);
    }

    #[test]
    fn redcap_answers_parse_without_panic_and_exports_read_back(
        status in prop_oneof![100u16..600, Just(200u16)],
        body in prop_oneof![text(), json().prop_map(|v| v.to_string())],
        value in json(),
        rows in export(),
        count in 0u64..20,
        sent in 0usize..20,
    ) {
        redcap(status, &body, &value, &rows, count, sent);
    }
}

/// Found by the phone property: `+1000001` once parsed to `+10001` (which
/// read back as `+101`) and the satellite number `+881000243106163` lost a
/// zero at each pass. Only numbers valid for their region are phones now, and
/// both read back as themselves (`checks::phone` asserts it for every input).
#[test]
fn e164_reads_back_as_itself() {
    use optout_relay::domain::Phone;
    use phonenumber::country::Id;
    let mut failures = Vec::new();
    for (raw, region) in [("+1000001", Id::GB), ("+1000001", Id::US), ("+881000243106163", Id::US)] {
        if let Ok(p) = Phone::parse(raw, region) {
            let again = Phone::parse(p.as_str(), region);
            if again.as_ref() != Ok(&p) {
                failures.push(format!("parse {raw:?} -> {p} -> {again:?}"));
            }
        }
        if let Some(p) = Phone::parse_valid(raw, region) {
            let again = Phone::parse_valid(p.as_str(), region);
            if again.as_ref() != Some(&p) {
                failures.push(format!("parse_valid {raw:?} -> {p} -> {again:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
