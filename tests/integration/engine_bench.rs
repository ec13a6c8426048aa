//! `harvest bench crawl` as an ignored test, for measuring in a release build:
//! `cargo test --release --test integration engine_bench -- --ignored --nocapture`.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test: run it in release"]
async fn bench_crawl_10k_products_at_64() {
    let products = std::env::var("HARVEST_BENCH_PRODUCTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let r = harvest::bench::crawl::crawl(products, 64)
        .await
        .expect("bench runs");
    println!("{r}");
    assert_eq!(r["records"], serde_json::json!(products));
}

/// `harvest bench frontier` at 100,000 distinct URLs through a real sled store: every page once,
/// one record each, and memory bounded. In CI, in release (about 30 s):
/// `cargo test --release --test integration engine_bench::bench_frontier_100k -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run it in release (see the doc comment)"]
async fn bench_frontier_100k_urls_in_bounded_memory() {
    let urls = std::env::var("HARVEST_BENCH_URLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let r = harvest::bench::crawl::frontier(urls, 64)
        .await
        .expect("bench runs");
    println!("{r}");
    assert_eq!(r["pages"], serde_json::json!(urls), "{r}");
    assert_eq!(r["records"], serde_json::json!(urls), "{r}");
    assert_eq!(
        r["site_hits"],
        serde_json::json!(urls),
        "each URL fetched once: {r}"
    );
    let rss = r["peak_rss_mb"].as_f64().unwrap_or(0.0);
    assert!(rss <= 200.0, "peak RSS {rss} MB > 200 MB: {r}");
}
