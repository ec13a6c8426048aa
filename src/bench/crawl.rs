//! `harvest bench crawl` and `harvest bench frontier`: one crawl of a generated site served
//! in-process on loopback. `crawl` keeps the crawl state in memory by default, so the figure is
//! the engine's (fetch, decode, parse, extract); with `--store` it checkpoints into a real sled
//! store in a temporary directory, as a worker does. `frontier` crawls a tree of many small pages
//! (millions of distinct URLs) through a sled store and reports peak memory. Like `scrapy bench`,
//! the site and the crawler share this machine's cores.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::sitegen::{SiteOptions, serve};
use harvest::engine::MemoryCrawlState;
use harvest::engine::{EngineSettings, ScrapeJob, compile, parse_config_text};
use harvest::job::{CheckpointSink, CommitError, JobOutcome, StopSignal};
use harvest::local::{kinds, open_local};
use harvest::store::{CheckpointBatch, ResumeState};
use harvest::{ClientContext, SessionStatus, SubmitRequest};

/// The config every crawl bench runs: the README's example (examples/catalog.toml).
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

/// Counts what the engine commits into its in-memory state (the figure without a store).
struct CountingSink {
    pages: AtomicU64,
    records: AtomicU64,
    errors: AtomicU64,
    commits: AtomicU64,
    state: Arc<MemoryCrawlState>,
}

impl CountingSink {
    fn add(&self, b: &CheckpointBatch) {
        self.pages.fetch_add(b.pages, Ordering::Relaxed);
        self.records
            .fetch_add(b.records.len() as u64, Ordering::Relaxed);
        self.errors
            .fetch_add(b.usage.http_errors, Ordering::Relaxed);
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.state.apply(b);
    }
}

#[async_trait]
impl CheckpointSink for CountingSink {
    async fn commit(&self, batch: CheckpointBatch) -> Result<(), CommitError> {
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
/// (per host too: the site is one host) and returns `{pages, records, seconds, pages_per_sec,
/// records_per_sec, peak_rss_mb, ...}`: in memory (the engine's figure), or with `store`
/// through the runtime over a sled store in a temporary directory (`harvest bench crawl
/// --store`: the figure with durable checkpoints).
pub async fn crawl_with(
    products: usize,
    concurrency: usize,
    store: bool,
) -> Result<serde_json::Value, BenchError> {
    let site = serve(SiteOptions {
        products,
        per_list: 20,
        specials: false,
        tree: 0,
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
    let mut out = run(&config, store).await?;
    site.shutdown().await;
    out["bench"] = serde_json::json!("crawl");
    out["products"] = serde_json::json!(products);
    out["concurrency"] = serde_json::json!(concurrency);
    Ok(out)
}

/// `harvest bench crawl --compare N`: after one round that is not counted, N rounds of the
/// crawl without the store, then with it, alternating (so that drifting machine load hits both
/// alike), and the median pages/s of each with their ratio: the cost of durable checkpoints,
/// measured on one machine in one run. Each round's own ratio is reported too (`pair_ratios`,
/// `pair_ratio_min`, `pair_ratio_max`): the in-memory run alone varies by a fifth between runs
/// on a shared 2-core machine. A store round's rate is its crawl's own, from the submission to
/// the durable completion; `ratio_with_setup` counts opening and closing the store as well.
pub async fn compare(
    products: usize,
    concurrency: usize,
    rounds: usize,
) -> Result<serde_json::Value, BenchError> {
    let rounds = rounds.max(1);
    // One round first that is not counted: the first in-memory crawl of a process ran slower
    // than the later ones (its round's ratio read 1.20-1.45 where the others read 1.00-1.20).
    for store in [false, true] {
        crawl_with(products, concurrency, store).await?;
    }
    let mut memory = Vec::with_capacity(rounds);
    let mut sled = Vec::with_capacity(rounds);
    let mut sled_with_setup = Vec::with_capacity(rounds);
    let mut pages = None;
    for _ in 0..rounds {
        for store in [false, true] {
            let out = crawl_with(products, concurrency, store).await?;
            // Both crawls fetch the whole site each round, or the rates compare nothing.
            match (pages, out["pages"].as_u64()) {
                (_, None) => return Err(BenchError::Crawl(format!("no page count in {out}"))),
                (None, Some(n)) => pages = Some(n),
                (Some(p), Some(n)) if p != n => {
                    return Err(BenchError::Crawl(format!(
                        "one round fetched {p} pages, another {n}"
                    )));
                }
                _ => {}
            }
            let rate = out["pages_per_sec"].as_f64().unwrap_or(0.0);
            if store {
                sled.push(rate);
                sled_with_setup.push(out["pages_per_sec_with_setup"].as_f64().unwrap_or(0.0));
            } else {
                memory.push(rate);
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    let (m, s) = (median(&mut memory.clone()), median(&mut sled.clone()));
    let s_setup = median(&mut sled_with_setup.clone());
    // Each round's own ratio (its two runs were next to each other), so that a reader sees how
    // far one round's figure strays from the median's before judging the ratio against a line.
    let pair_ratios: Vec<f64> = memory
        .iter()
        .zip(&sled)
        .map(|(m, s)| s / m.max(1e-9))
        .collect();
    Ok(serde_json::json!({
        "bench": "crawl_compare",
        "products": products,
        "concurrency": concurrency,
        "rounds": rounds,
        "pages": pages,
        "memory_pages_per_sec": m,
        "sled_pages_per_sec": s,
        "ratio": s / m.max(1e-9),
        // The same with the store's opening and closing counted in each store round.
        "sled_with_setup_pages_per_sec": s_setup,
        "ratio_with_setup": s_setup / m.max(1e-9),
        "pair_ratios": pair_ratios,
        "pair_ratio_min": pair_ratios.iter().copied().reduce(f64::min),
        "pair_ratio_max": pair_ratios.iter().copied().reduce(f64::max),
        "memory_samples": memory,
        "sled_samples": sled,
        "peak_rss_mb": peak_rss_mb(),
    }))
}

/// `harvest bench frontier`: crawls a tree of `urls` small pages (10 links each, so the frontier
/// grows to most of the site) checkpointing into a real sled store in a temporary directory, and
/// returns `{urls, pages, pages_per_sec, peak_rss_mb, ...}`. The crawl state stays bounded in
/// memory (frontier window, seen cache); the store holds the rest.
pub async fn frontier(urls: usize, concurrency: usize) -> Result<serde_json::Value, BenchError> {
    let site = serve(SiteOptions {
        products: 0,
        per_list: 1,
        specials: false,
        tree: urls,
    })
    .await
    .map_err(BenchError::Site)?;
    let config = serde_json::json!({
        "name": "frontier",
        "start_urls": [site.url("/n/0")],
        "limits": {"max_pages": urls as u64 + 10, "max_depth": 64, "max_records": urls as u64 + 10},
        "http": {
            "concurrency": concurrency,
            "per_host_concurrency": concurrency,
            "obey_robots_txt": false,
        },
        "follow": [{"selector": "a.c", "page": "node"}],
        "start_page": "node",
        "pages": {"node": {"fields": {"title": "h1"}}},
    });
    let mut out = run(&config, true).await?;
    let total_hits = site.total_hits();
    site.shutdown().await;
    out["bench"] = serde_json::json!("frontier");
    out["urls"] = serde_json::json!(urls);
    out["concurrency"] = serde_json::json!(concurrency);
    out["site_hits"] = serde_json::json!(total_hits);
    Ok(out)
}

async fn run(config: &serde_json::Value, store: bool) -> Result<serde_json::Value, BenchError> {
    let started = Instant::now();
    // With the store, the crawl's own time runs from its submission to its durable completion,
    // as a served worker's does; opening and closing the store is reported apart
    // (`setup_seconds`), as the start of a process that then runs many crawls.
    let mut crawl_time = None;
    let (pages, records, errors, commits) = if store {
        let (counts, took) = served(config).await?;
        crawl_time = Some(took);
        counts
    } else {
        let cfg = Arc::new(
            compile(config, &BTreeMap::new()).map_err(|e| BenchError::Config(e.to_string()))?,
        );
        let state = Arc::new(MemoryCrawlState::new());
        let sink = Arc::new(CountingSink {
            pages: AtomicU64::new(0),
            records: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            state: state.clone(),
        });
        let job = ScrapeJob::new(EngineSettings::default());
        // On the runtime's worker threads, as a worker's attempt runs (the `--store` crawl
        // above): awaited in place, the crawl would run on the thread that blocks on `main`,
        // and every wake-up of it from a worker would cross threads through a futex (ten times
        // the futex calls of the crawl with a store, and a slower baseline).
        let counting = sink.clone();
        let outcome = tokio::spawn(async move {
            job.crawl(
                cfg,
                ResumeState::default(),
                state,
                counting,
                StopSignal::new(),
            )
            .await
        })
        .await
        .map_err(|e| BenchError::Crawl(format!("the crawl's task ended: {e}")))?;
        match outcome {
            JobOutcome::Completed(b) => sink.add(&b),
            JobOutcome::Stopped(_) => return Err(BenchError::Crawl("stopped".into())),
            JobOutcome::Failed { error, .. } => return Err(BenchError::Crawl(error.message)),
        }
        (
            sink.pages.load(Ordering::Relaxed),
            sink.records.load(Ordering::Relaxed),
            sink.errors.load(Ordering::Relaxed),
            sink.commits.load(Ordering::Relaxed),
        )
    };
    let total = started.elapsed();
    let seconds = crawl_time.unwrap_or(total).as_secs_f64();
    let setup = crawl_time.map(|c| total.saturating_sub(c).as_secs_f64());
    Ok(serde_json::json!({
        "store": if store { "sled" } else { "memory" },
        "pages": pages,
        "records": records,
        "http_errors": errors,
        "checkpoints": commits,
        "seconds": seconds,
        "setup_seconds": setup,
        "pages_per_sec": pages as f64 / seconds.max(1e-9),
        "pages_per_sec_with_setup": pages as f64 / total.as_secs_f64().max(1e-9),
        "records_per_sec": records as f64 / seconds.max(1e-9),
        "peak_rss_mb": peak_rss_mb(),
    }))
}

/// The crawl as `harvest serve` runs it: the runtime over a sled store in a temporary directory,
/// whose one worker claims the session and commits every checkpoint under its lease, and nothing
/// else. (Not `harvest run`'s path, which also writes every record as a JSON line and has each
/// checkpoint batch cloned for that writer: work a served worker does not do.) Returns pages,
/// records, HTTP errors and checkpoints, as the session counted them,
/// and the time from the submission to the durable completion (without opening the store and
/// the service, and shutting them down).
async fn served(
    config: &serde_json::Value,
) -> Result<((u64, u64, u64, u64), Duration), BenchError> {
    let crawl = |what: &str, e: &dyn std::fmt::Display| BenchError::Crawl(format!("{what}: {e}"));
    let dir = tempfile::TempDir::new().map_err(|e| crawl("a temporary directory", &e))?;
    // `harvest run`'s service and jobs, without its record printer.
    let harvest = open_local(dir.path(), kinds(&EngineSettings::default()), None)
        .await
        .map_err(|e| crawl("opening the service", &e))?;
    let submitted = Instant::now();
    let handle = harvest
        .submit(SubmitRequest {
            config: config.clone(),
            client: ClientContext::of("bench"),
            ..SubmitRequest::default()
        })
        .await
        .map_err(|e| crawl("submitting the crawl", &e))?;
    harvest.start();
    // Bounded by the crawl's own limits; an hour is far past any bench size.
    let ended = handle
        .await_completion(Duration::from_secs(3600))
        .await
        .map_err(|e| crawl("waiting for the crawl", &e))?;
    let took = submitted.elapsed();
    harvest
        .shutdown(Duration::ZERO)
        .await
        .map_err(|e| crawl("shutting down", &e))?;
    let s = ended.ok_or_else(|| BenchError::Crawl("did not end within an hour".into()))?;
    if s.status != SessionStatus::Completed {
        let why = s.error.map(|e| e.message).unwrap_or_default();
        return Err(BenchError::Crawl(format!("{:?}: {why}", s.status)));
    }
    let counts = (
        s.metrics.pages_processed,
        s.records,
        s.usage.http_errors,
        s.checkpoints,
    );
    Ok((counts, took))
}
