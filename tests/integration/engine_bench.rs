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
