//! `cargo bench --bench engine`: the scraper's CPU-bound hot paths, through the public engine
//! API, with no network and no store.
//!
//! - `engine/extract/product_page`: what the crawler does with a fetched product page: decode the
//!   body (`extract::decode`) and run `extract::extract_page` with `examples/catalog.toml`'s
//!   compiled follow rules and `[pages.product]` fields. The page is `fixtures/product.html`,
//!   the generated test shop's product page 42 (the tour's and `harvest bench crawl`'s site):
//!   633 bytes, so the figure is per-page overhead (HTML parse, 2 follow selectors, 5 fields, one
//!   regex) rather than the cost of a large real-world page, which grows with its size.
//! - `engine/extract/list_page`: the same for a list page (`fixtures/list.html`, the shop's
//!   `/list/1.html`): no record, 21 links resolved and canonicalized.
//! - `engine/validate/catalog`: `parse_config_text` + `compile` of `examples/catalog.toml`:
//!   what a submission's validation and every attempt's start cost.
//! - `engine/validate/twenty_rules`: the same for `fixtures/twenty_rules.toml` (4 follow rules,
//!   20 fields each with a regex): the validation cost of a heavier config, mostly regex
//!   compilation.
//!
//! How to read them: per-iteration times of pure CPU work on one thread; on a loaded machine
//! they move by tens of percent, so compare runs on one machine only. Each bench checks once,
//! before timing, that its input does what it should (a record with the expected fields, links
//! found, 20 regexes compiled), so a broken fixture fails instead of timing nothing.
//!
//! Sample sizes and times are set per group (below) so that `cargo bench` finishes in a few
//! minutes on 2 cores: these take microseconds, so 50 samples over 3 s are millions of runs.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use url::Url;

use harvest::engine::extract::{decode, extract_page};
use harvest::engine::{CompiledConfig, compile, parse_config_text};

const CATALOG: &str = include_str!("../examples/catalog.toml");
const TWENTY_RULES: &str = include_str!("fixtures/twenty_rules.toml");
const PRODUCT_HTML: &[u8] = include_bytes!("fixtures/product.html");
const LIST_HTML: &[u8] = include_bytes!("fixtures/list.html");
/// The shop's address in `examples/catalog.toml`; the fixture pages' links are relative to it.
const SHOP: &str = "http://127.0.0.1:18080";

fn validate(text: &str) -> CompiledConfig {
    let value = parse_config_text(text).expect("the bench config parses");
    compile(&value, &BTreeMap::new()).expect("the bench config compiles")
}

/// Decodes and extracts one fetched page as the crawler does, for a page of type `page`.
fn crawl_page(cfg: &CompiledConfig, page: Option<&str>, url: &Url, body: &[u8]) -> usize {
    let (text, _had_errors) = decode(body, Some("text/html; charset=utf-8"));
    let page = page.and_then(|p| cfg.pages.get(p));
    let out = extract_page(cfg, page, url, &text);
    out.records.len() + out.links.len()
}

fn extract(c: &mut Criterion) {
    let cfg = validate(CATALOG);
    let product_url = Url::parse(&format!("{SHOP}/product/42.html")).expect("a URL");
    let list_url = Url::parse(&format!("{SHOP}/list/1.html")).expect("a URL");

    // What each page gives, checked once so that the timed runs do real work.
    let (text, had_errors) = decode(PRODUCT_HTML, Some("text/html; charset=utf-8"));
    assert!(!had_errors, "the product fixture is UTF-8");
    let product = extract_page(&cfg, cfg.pages.get("product"), &product_url, &text);
    let record = serde_json::json!({
        "title": "Product 42",
        "price": 42.42,
        "sku": "SKU-000042",
        "image": format!("{SHOP}/img/42.jpg"),
        "tags": ["tag-2", "all"],
    });
    assert_eq!(product.records, vec![record], "the product page's record");
    let (text, _) = decode(LIST_HTML, Some("text/html; charset=utf-8"));
    let list = extract_page(&cfg, None, &list_url, &text);
    assert_eq!(list.links.len(), 21, "20 product links and a next link");
    assert!(list.records.is_empty(), "a list page has no page type");

    let mut g = c.benchmark_group("engine/extract");
    // Tens of microseconds per page: 50 samples over 3 s.
    g.sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Bytes(PRODUCT_HTML.len() as u64));
    g.bench_function("product_page", |b| {
        b.iter(|| {
            crawl_page(
                &cfg,
                black_box(Some("product")),
                &product_url,
                black_box(PRODUCT_HTML),
            )
        })
    });
    g.throughput(Throughput::Bytes(LIST_HTML.len() as u64));
    g.bench_function("list_page", |b| {
        b.iter(|| crawl_page(&cfg, black_box(None), &list_url, black_box(LIST_HTML)))
    });
    g.finish();
}

fn config_validation(c: &mut Criterion) {
    let heavy = validate(TWENTY_RULES);
    let regexes = heavy
        .pages
        .values()
        .flat_map(|p| &p.fields)
        .filter(|f| f.regex.is_some())
        .count();
    assert_eq!(
        (heavy.follow.len(), regexes),
        (4, 20),
        "the heavy config's follow rules and fields with a regex"
    );

    let mut g = c.benchmark_group("engine/validate");
    // Tens of microseconds to a few milliseconds per config: 50 samples over 3 s.
    g.sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("catalog", |b| b.iter(|| validate(black_box(CATALOG))));
    g.bench_function("twenty_rules", |b| {
        b.iter(|| validate(black_box(TWENTY_RULES)))
    });
    g.finish();
}

criterion_group!(benches, extract, config_validation);
criterion_main!(benches);
