//! Pushes generated inputs through the property checks of
//! `tests/properties/checks.rs` (the same generators and assertions as the
//! property tests): by default 1,000,000 in all, 200,000 per parser. Each
//! family runs twice from the same seed: first generating only (the
//! baseline: what the generators cost), then generating and checking; the
//! difference is the parsers and their checks. A failed property panics,
//! naming the input. Run through `bench/properties.sh`.
//!
//!   cargo run --release --example properties [-- TOTAL_INPUTS]

#[path = "../tests/properties/checks.rs"]
mod checks;

use std::hint::black_box;
use std::time::{Duration, Instant};

use checks::*;
use optout_relay::config::KeywordsConfig;
use optout_relay::twilio::keywords::Keywords;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

fn runner(seed: u8) -> TestRunner {
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[seed; 32]);
    TestRunner::new_with_rng(Config::default(), rng)
}

/// (generation only, generation + checks) for `n` inputs of `strategy`.
fn measure<S: Strategy>(seed: u8, n: u64, strategy: &S, check: impl Fn(&S::Value)) -> (Duration, Duration) {
    let mut r = runner(seed);
    let started = Instant::now();
    for _ in 0..n {
        black_box(strategy.new_tree(&mut r).map(|t| t.current()).unwrap_or_else(|e| panic!("{e}")));
    }
    let generate = started.elapsed();
    let mut r = runner(seed);
    let started = Instant::now();
    for _ in 0..n {
        let value = strategy.new_tree(&mut r).map(|t| t.current()).unwrap_or_else(|e| panic!("{e}"));
        check(&value);
    }
    (generate, started.elapsed())
}

fn main() {
    let total: u64 = std::env::args().nth(1).map_or(1_000_000, |a| a.parse().expect("TOTAL_INPUTS is a number"));
    let n = total.div_ceil(5);
    let classifier = Keywords::new(&KeywordsConfig::default());
    println!(
        "{:<10} {:>9} {:>13} {:>13} {:>13} {:>12}",
        "parser", "inputs", "generate s", "gen+check s", "check s", "check µs/in"
    );
    let mut all = 0;
    let mut report = |name: &str, (generate, both): (Duration, Duration)| {
        let check = both.saturating_sub(generate);
        println!(
            "{name:<10} {n:>9} {:>13.2} {:>13.2} {:>13.2} {:>12.2}",
            generate.as_secs_f64(),
            both.as_secs_f64(),
            check.as_secs_f64(),
            check.as_secs_f64() * 1e6 / n as f64
        );
        all += n;
    };
    let form_inputs = (prop::collection::vec(any::<u8>(), 0..256), pairs());
    report("form", measure(1, n, &form_inputs, |(bytes, p)| form(bytes, p)));
    let signature_inputs = (
        "[A-Za-z0-9]{1,40}",
        url(),
        pairs(),
        text(),
        prop::option::of(prop_oneof![text(), "key=[a-z]{1,4},algorithm=HMAC_SHA(1|256)"]),
    );
    report(
        "signature",
        measure(2, n, &signature_inputs, |(token, url, p, garbage, settings)| {
            signature(token, url, p, garbage, settings.as_deref())
        }),
    );
    report("phone", measure(3, n, &(phone_text(), region()), |(raw, region)| phone(raw, *region)));
    let keyword_inputs =
        (text(), prop::option::of(prop_oneof![text(), "(STOP|START|HELP|stop|Start)"]), dressed_keyword());
    report(
        "keywords",
        measure(4, n, &keyword_inputs, |(body, t, (dressed, kind))| {
            keywords(&classifier, body, t.as_deref(), dressed, *kind)
        }),
    );
    let redcap_inputs = (
        prop_oneof![100u16..600, Just(200u16)],
        prop_oneof![text(), json().prop_map(|v| v.to_string())],
        json(),
        export(),
        0u64..20,
        0usize..20,
    );
    report(
        "redcap",
        measure(5, n, &redcap_inputs, |(status, body, value, rows, count, sent)| {
            redcap(*status, body, value, rows, *count, *sent)
        }),
    );
    println!("{all} generated inputs, every property held");
}
