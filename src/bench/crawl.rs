//! `harvest bench crawl`: one crawl of a generated shop served in-process on loopback, with a
//! sink that only counts, so the figure is the engine's (fetch, decode, parse, extract), not a
//! store's. Like `scrapy bench`, the site and the crawler share this machine's cores.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use async_trait::async_trait;

use crate::engine::{EngineSettings, ScrapeJob, compile, parse_config_text};
use crate::job::{CheckpointSink, JobOutcome, LeaseLost, StopSignal};
use crate::sitegen::{SiteOptions, serve};
use crate::store::{CheckpointBatch, ResumeState};

/// The config every crawl bench runs: DESIGN §4's example (examples/catalog.toml).
pub const CATALOG_TOML: &str = include_str!("../../examples/catalog.toml");

/// Products per list page of the generated site.
const PER_LIST: usize = 20;

/// Why the bench could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The loopback site could not start.
    #[error("cannot start the test site on 127.0.0.1: {0}")]
    Site(std::io::Error),
    /// The bench config did not compile (a bug in the bench).
    #[error("bench config: {0}")]
    Config(String),
    /// The crawl did not complete.
    #[error("crawl did not complete: {0}")]
    Crawl(String),
}

#[derive(Default)]
struct CountingSink {
    pages: AtomicU64,
    records: AtomicU64,
    errors: AtomicU64,
}

impl CountingSink {
    fn add(&self, b: &CheckpointBatch) {
        self.pages.fetch_add(b.pages, Ordering::Relaxed);
        self.records
            .fetch_add(b.records.len() as u64, Ordering::Relaxed);
        self.errors
            .fetch_add(b.usage.http_errors, Ordering::Relaxed);
    }
}

#[async_trait]
impl CheckpointSink for CountingSink {
    async fn commit(&self, batch: CheckpointBatch) -> Result<(), LeaseLost> {
        self.add(&batch);
        Ok(())
    }
}

/// Peak resident set size of this process in MB (VmHWM), if the platform says.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Crawls a generated site of `products` product pages at `concurrency` requests in flight
/// (per host too: the site is one host) and returns
/// `{pages, records, seconds, pages_per_sec, records_per_sec, peak_rss_mb, ...}`.
pub async fn crawl(products: usize, concurrency: usize) -> Result<serde_json::Value, BenchError> {
    let site = serve(SiteOptions {
        products,
        per_list: 20,
        specials: false,
    })
    .await
    .map_err(BenchError::Site)?;
    let mut config =
        parse_config_text(CATALOG_TOML).map_err(|e| BenchError::Config(e.to_string()))?;
    config["start_urls"] = serde_json::json!([site.url("/index.html")]);
    config["limits"]["max_pages"] = serde_json::json!(products as u64 * 2 + 100);
    // The list pages form a chain (one `next` each): its length is the crawl's depth.
    config["limits"]["max_depth"] = serde_json::json!(products.div_ceil(PER_LIST) + 10);
    config["http"]["concurrency"] = serde_json::json!(concurrency);
    config["http"]["per_host_concurrency"] = serde_json::json!(concurrency);
    let cfg = Arc::new(
        compile(&config, &BTreeMap::new()).map_err(|e| BenchError::Config(e.to_string()))?,
    );
    let sink = Arc::new(CountingSink::default());
    let job = ScrapeJob::new(EngineSettings::default());
    let started = Instant::now();
    let outcome = job
        .crawl(cfg, ResumeState::default(), sink.clone(), StopSignal::new())
        .await;
    let seconds = started.elapsed().as_secs_f64();
    match &outcome {
        JobOutcome::Completed(b) => sink.add(b),
        JobOutcome::Stopped(_) => return Err(BenchError::Crawl("stopped".into())),
        JobOutcome::Failed { error, .. } => return Err(BenchError::Crawl(error.message.clone())),
    }
    site.shutdown().await;
    let pages = sink.pages.load(Ordering::Relaxed);
    let records = sink.records.load(Ordering::Relaxed);
    Ok(serde_json::json!({
        "bench": "crawl",
        "products": products,
        "concurrency": concurrency,
        "pages": pages,
        "records": records,
        "http_errors": sink.errors.load(Ordering::Relaxed),
        "seconds": seconds,
        "pages_per_sec": pages as f64 / seconds.max(1e-9),
        "records_per_sec": records as f64 / seconds.max(1e-9),
        "peak_rss_mb": peak_rss_mb(),
    }))
}
