//! The scraper engine against a generated shop on 127.0.0.1:0.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::sitegen::{Site, SiteOptions, paths, serve};
use async_trait::async_trait;
use harvest::engine::{
    BatchPolicy, EngineSettings, MemoryCrawlState, NetGuard, ScrapeJob, compile, parse_config_text,
};
use harvest::job::{
    CheckpointSink, CommitError, Job, JobContext, JobOutcome, StopReason, StopSignal,
};
use harvest::local::{Progress, run_local, run_local_resumable};
use harvest::session::{ClientContext, JobSpec, Session, SessionId, SessionStatus, Timestamp};
use harvest::store::{CheckpointBatch, ResumeState};
use serde_json::{Value, json};

const CATALOG: &str = include_str!("../../examples/catalog.toml");

/// Collects batches (and applies them to `state`, as a store would); can fire a stop signal or
/// lose the lease after `trip_after` commits.
#[derive(Default)]
struct MemorySink {
    batches: Mutex<Vec<CheckpointBatch>>,
    state: Arc<MemoryCrawlState>,
    trip_after: Option<usize>,
    stop: Option<StopSignal>,
    lose_lease: bool,
}

#[async_trait]
impl CheckpointSink for MemorySink {
    async fn commit(&self, batch: CheckpointBatch) -> Result<(), CommitError> {
        let mut b = self.batches.lock().unwrap();
        if self.lose_lease && self.trip_after.is_some_and(|n| b.len() >= n) {
            return Err(CommitError::LeaseLost);
        }
        self.state.apply(&batch);
        b.push(batch);
        if let (Some(n), Some(stop)) = (self.trip_after, &self.stop)
            && b.len() >= n
        {
            stop.stop(StopReason::Cancelled);
        }
        Ok(())
    }
}

fn catalog(site: &Site) -> Value {
    let mut cfg = parse_config_text(CATALOG).expect("examples/catalog.toml parses");
    cfg["start_urls"] = json!([site.url("/index.html")]);
    cfg
}

struct Run {
    outcome: JobOutcome,
    committed: Vec<CheckpointBatch>,
}

impl Run {
    /// Committed batches plus the final one (what the worker would commit).
    fn all(&self) -> Vec<&CheckpointBatch> {
        let last = match &self.outcome {
            JobOutcome::Completed(b) | JobOutcome::Stopped(b) => b,
            JobOutcome::Failed { batch, .. } => batch,
        };
        self.committed.iter().chain(std::iter::once(last)).collect()
    }
    fn records(&self) -> Vec<Value> {
        self.all()
            .iter()
            .flat_map(|b| b.records.iter().cloned())
            .collect()
    }
    fn pages(&self) -> u64 {
        self.all().iter().map(|b| b.pages).sum()
    }
    fn usage(&self) -> harvest::TokenUsage {
        let mut u = harvest::TokenUsage::default();
        for b in self.all() {
            u += b.usage;
        }
        u
    }
    fn log(&self) -> Vec<(String, String)> {
        self.all()
            .iter()
            .flat_map(|b| b.log.iter().map(|l| (l.level.clone(), l.message.clone())))
            .collect()
    }
    fn completed(&self) -> bool {
        matches!(self.outcome, JobOutcome::Completed(_))
    }
}

async fn run_with(
    config: &Value,
    settings: EngineSettings,
    sink: Arc<MemorySink>,
    resume: ResumeState,
    stop: StopSignal,
) -> Run {
    let cfg = Arc::new(compile(config, &BTreeMap::new()).expect("config compiles"));
    let job = ScrapeJob::new(settings);
    let outcome = tokio::time::timeout(
        Duration::from_secs(60),
        job.crawl(cfg, resume, sink.state.clone(), sink.clone(), stop),
    )
    .await
    .expect("crawl ends within 60 s");
    let committed = std::mem::take(&mut *sink.batches.lock().unwrap());
    Run { outcome, committed }
}

async fn run(config: &Value) -> Run {
    run_with(
        config,
        EngineSettings::default(),
        Arc::new(MemorySink::default()),
        ResumeState::default(),
        StopSignal::new(),
    )
    .await
}

async fn shop(products: usize, specials: bool) -> Site {
    serve(SiteOptions {
        products,
        per_list: 10,
        specials,
        tree: 0,
    })
    .await
    .expect("site starts")
}

fn by_sku(records: &[Value]) -> HashMap<String, Vec<Value>> {
    let mut m: HashMap<String, Vec<Value>> = HashMap::new();
    for r in records {
        let sku = r["sku"].as_str().unwrap_or("<none>").to_string();
        m.entry(sku).or_default().push(r.clone());
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_product_exactly_once_with_typed_fields() {
    let site = shop(57, true).await;
    let r = run(&catalog(&site)).await;
    assert!(r.completed(), "outcome: {:?}", r.outcome);
    let records = r.records();
    let skus = by_sku(&records);
    for i in 0..57 {
        let sku = format!("SKU-{i:06}");
        let recs = skus
            .get(&sku)
            .unwrap_or_else(|| panic!("{sku} missing; got {skus:?}"));
        assert_eq!(recs.len(), 1, "{sku} extracted {} times", recs.len());
        let rec = &recs[0];
        assert_eq!(rec["title"], json!(format!("Product {i}")));
        let price: f64 = format!("{i}.{:02}", i % 100).parse().unwrap();
        assert_eq!(rec["price"].as_f64(), Some(price), "{rec}");
        assert!(rec["price"].is_number());
        assert_eq!(rec["image"], json!(site.url(&format!("/img/{i}.jpg"))));
        assert_eq!(rec["tags"], json!([format!("tag-{}", i % 5), "all"]));
    }
    let product_records = records
        .iter()
        .filter(|r| r["sku"].as_str().is_some_and(|s| s.starts_with("SKU-")))
        .count();
    assert_eq!(product_records, 57);
    // 57 products + 6 list pages + latin1 + flaky + json; the redirect loop and the oversized
    // page failed, and a page never fetched is not a processed page.
    assert_eq!(r.pages(), 57 + 6 + 3, "log: {:?}", r.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn robots_txt_is_obeyed() {
    let site = shop(5, true).await;
    let r = run(&catalog(&site)).await;
    assert!(r.completed());
    assert_eq!(
        site.hits(paths::PRIVATE),
        0,
        "a disallowed page was fetched"
    );
    assert_eq!(
        site.hits("/robots.txt"),
        1,
        "robots.txt fetched once per host"
    );
    assert_eq!(r.usage().robots_blocked, 1);
    assert!(!by_sku(&r.records()).contains_key("PRIVATE"));

    let mut cfg = catalog(&site);
    cfg["http"]["obey_robots_txt"] = json!(false);
    let r = run(&cfg).await;
    assert_eq!(by_sku(&r.records()).get("PRIVATE").map(Vec::len), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cycle_is_fetched_once() {
    let site = shop(35, false).await;
    let r = run(&catalog(&site)).await;
    assert!(r.completed());
    // The last list page's `next` and a `#fragment` link lead back to /index.html.
    assert_eq!(site.hits("/index.html"), 1);
    for n in 1..site.list_pages() {
        assert_eq!(site.hits(&format!("/list/{n}.html")), 1);
    }
    for i in 0..35 {
        assert_eq!(site.hits(&format!("/product/{i}.html")), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_page_is_retried_after_retry_after() {
    let site = shop(2, true).await;
    let started = std::time::Instant::now();
    let r = run(&catalog(&site)).await;
    assert!(r.completed());
    assert_eq!(site.hits(paths::FLAKY), 2);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "Retry-After: 1 not honoured"
    );
    assert!(r.usage().retries >= 1);
    // The README says the log shows retries: a page that succeeded after one says so.
    assert!(
        r.log().iter().any(|(level, m)| level == "info"
            && m.contains(paths::FLAKY)
            && m.contains("fetched after 1 retry")
            && m.contains("503")),
        "{:?}",
        r.log()
    );
    let recs = by_sku(&r.records());
    assert_eq!(recs.get("FLAKY").map(Vec::len), Some(1));
    assert_eq!(recs["FLAKY"][0]["price"], json!(1.25));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latin1_page_is_decoded() {
    let site = shop(2, true).await;
    let r = run(&catalog(&site)).await;
    let recs = by_sku(&r.records());
    let rec = &recs.get("LATIN1").expect("latin-1 page extracted")[0];
    assert_eq!(rec["title"], json!("Café crème"));
    assert_eq!(rec["price"], json!(3.5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_loop_oversized_and_non_html_are_per_page_errors() {
    let site = shop(3, true).await;
    let r = run(&catalog(&site)).await;
    assert!(
        r.completed(),
        "a per-page error must not stop the crawl: {:?}",
        r.outcome
    );
    let log = r.log();
    let has = |level: &str, a: &str, b: &str| {
        log.iter()
            .any(|(l, m)| l == level && m.contains(a) && m.contains(b))
    };
    assert!(has("error", "loop-", "redirect loop"), "{log:?}");
    assert!(has("error", paths::HUGE, "max_body_bytes"), "{log:?}");
    assert!(has("warn", paths::JSON, "not HTML"), "{log:?}");
    // Every product still came through.
    assert_eq!(
        by_sku(&r.records())
            .keys()
            .filter(|k| k.starts_with("SKU-"))
            .count(),
        3
    );
    assert!(site.hits(paths::LOOP_A) <= 2 && site.hits(paths::LOOP_B) <= 2);
    assert!(r.usage().http_errors >= 2);
    assert!(
        r.usage().bytes_received < 6_000_000,
        "huge page must not be read whole"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_pages_is_honoured() {
    let site = shop(100, false).await;
    let mut cfg = catalog(&site);
    cfg["limits"]["max_pages"] = json!(10);
    let r = run(&cfg).await;
    assert!(r.completed());
    assert_eq!(r.pages(), 10);
    assert_eq!(site.total_hits(), 10 + 1, "10 pages and robots.txt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_depth_is_honoured() {
    let site = shop(100, false).await;
    let mut cfg = catalog(&site);
    cfg["limits"]["max_depth"] = json!(0);
    let r = run(&cfg).await;
    assert_eq!(r.pages(), 1);
    cfg["limits"]["max_depth"] = json!(1);
    let r = run(&cfg).await;
    // The index, its 10 products and the second list page.
    assert_eq!(r.pages(), 12);
    assert_eq!(r.records().len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_records_is_honoured() {
    let site = shop(100, false).await;
    let mut cfg = catalog(&site);
    cfg["limits"]["max_records"] = json!(7);
    let r = run(&cfg).await;
    assert!(r.completed());
    assert_eq!(r.records().len(), 7);
}

fn small_batches() -> EngineSettings {
    EngineSettings {
        batch: BatchPolicy {
            max_pages: 5,
            ..BatchPolicy::default()
        },
        ..EngineSettings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_crawl() {
    let site = shop(300, false).await;
    let mut cfg = catalog(&site);
    cfg["http"]["concurrency"] = json!(2);
    let stop = StopSignal::new();
    let sink = Arc::new(MemorySink {
        trip_after: Some(1),
        stop: Some(stop.clone()),
        ..MemorySink::default()
    });
    let r = run_with(&cfg, small_batches(), sink, ResumeState::default(), stop).await;
    assert!(
        matches!(r.outcome, JobOutcome::Stopped(_)),
        "{:?}",
        r.outcome
    );
    assert!(r.pages() < 50, "stopped late: {} pages", r.pages());
    assert!(site.total_hits() < 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_lease_stops_at_once_without_a_batch() {
    let site = shop(300, false).await;
    let sink = Arc::new(MemorySink {
        trip_after: Some(1),
        lose_lease: true,
        ..MemorySink::default()
    });
    let r = run_with(
        &catalog(&site),
        small_batches(),
        sink,
        ResumeState::default(),
        StopSignal::new(),
    )
    .await;
    match r.outcome {
        JobOutcome::Stopped(b) => assert!(b.is_empty()),
        o => panic!("expected Stopped, got {o:?}"),
    }
}

/// What a store would hand the next attempt after these committed batches: the counters, and a
/// sink whose committed state holds their frontier and seen set.
fn resume_from(batches: &[CheckpointBatch]) -> (ResumeState, Arc<MemorySink>) {
    let state = Arc::new(MemoryCrawlState::new());
    let mut rs = ResumeState::default();
    for b in batches {
        state.apply(b);
        rs.records += b.records.len() as u64;
        rs.metrics.pages_processed += b.pages;
        rs.usage += b.usage;
    }
    rs.frontier_len = state.frontier_len();
    let sink = Arc::new(MemorySink {
        state,
        ..MemorySink::default()
    });
    (rs, sink)
}

/// A crawl stopped after a few checkpoints (its uncommitted batch lost, as in a crash), then
/// resumed from what it committed: every product exactly once.
async fn crash_and_resume(settings: EngineSettings, products: usize) {
    let site = shop(products, false).await;
    let mut cfg = catalog(&site);
    cfg["http"]["concurrency"] = json!(4);
    let stop = StopSignal::new();
    let sink = Arc::new(MemorySink {
        trip_after: Some(3),
        stop: Some(stop.clone()),
        ..MemorySink::default()
    });
    let first = run_with(&cfg, settings.clone(), sink, ResumeState::default(), stop).await;
    assert!(matches!(first.outcome, JobOutcome::Stopped(_)));
    let (resume, sink) = resume_from(&first.committed);
    assert!(
        resume.frontier_len > 0,
        "the first attempt finished everything; test proves nothing"
    );
    let second = run_with(&cfg, settings, sink, resume, StopSignal::new()).await;
    assert!(second.completed());
    let mut records: Vec<Value> = first
        .committed
        .iter()
        .flat_map(|b| b.records.clone())
        .collect();
    records.extend(second.records());
    let skus = by_sku(&records);
    assert_eq!(skus.len(), products, "missing records");
    for (sku, recs) in &skus {
        assert_eq!(recs.len(), 1, "{sku} duplicated");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_a_crash_gives_no_duplicates() {
    crash_and_resume(small_batches(), 120).await;
}

/// A frontier window of 3 and a seen cache of 8 URLs: the crawl spills its frontier to the
/// committed state, refills from it and asks it about seen URLs, and still fetches each page once.
fn tiny_memory() -> EngineSettings {
    EngineSettings {
        batch: BatchPolicy {
            max_pages: 5,
            window: 3,
            seen_cache: 8,
            ..BatchPolicy::default()
        },
        ..EngineSettings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_window_and_seen_cache_fetch_each_page_once() {
    let site = shop(150, false).await;
    let mut cfg = catalog(&site);
    cfg["http"]["concurrency"] = json!(4);
    let r = run_with(
        &cfg,
        tiny_memory(),
        Arc::new(MemorySink::default()),
        ResumeState::default(),
        StopSignal::new(),
    )
    .await;
    assert!(r.completed());
    let skus = by_sku(&r.records());
    assert_eq!(skus.len(), 150, "missing records");
    assert!(skus.values().all(|v| v.len() == 1), "duplicated records");
    for i in 0..150 {
        assert_eq!(site.hits(&format!("/product/{i}.html")), 1, "product {i}");
    }
    assert_eq!(
        site.hits("/index.html"),
        1,
        "the cycle back to the first page"
    );
}

/// `harvest run --resume` with [`tiny_memory`] settings, writing into `buf`.
async fn over_sled(
    cfg: &Value,
    buf: &SharedBuf,
    progress: Progress,
    stop: StopSignal,
    dir: &std::path::Path,
) -> Result<harvest::local::RunSummary, harvest::local::RunError> {
    let out = Box::new(buf.clone());
    run_local_resumable(
        cfg,
        &BTreeMap::new(),
        tiny_memory(),
        out,
        progress,
        stop,
        dir,
    )
    .await
}

/// The same through a real sled store (`harvest run --resume`): the frontier spills to its
/// chunks, and seen-set lookups build its URL index from them while the crawl commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_window_and_seen_cache_over_sled_fetch_each_page_once() {
    let site = shop(150, false).await;
    let mut cfg = catalog(&site);
    cfg["http"]["concurrency"] = json!(4);
    let dir = tempfile::tempdir().unwrap();
    let buf = SharedBuf::default();
    let summary = over_sled(&cfg, &buf, Progress::Silent, StopSignal::new(), dir.path())
        .await
        .expect("runs");
    assert_eq!(summary.status, "completed");
    let skus = by_sku(&buf.records());
    assert_eq!(skus.len(), 150, "missing records");
    assert!(skus.values().all(|v| v.len() == 1), "duplicated records");
    for i in 0..150 {
        assert_eq!(site.hits(&format!("/product/{i}.html")), 1, "product {i}");
    }
    assert_eq!(site.hits("/index.html"), 1);
}

/// Stopped part-way and run again over the same directory: the second run resumes from the
/// store (frontier chunks, seen index, position hints counted from its next position), and
/// across both runs each record is written once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_sled_run_resumes_with_each_record_once() {
    let site = shop(150, false).await;
    let mut cfg = catalog(&site);
    cfg["http"]["concurrency"] = json!(4);
    let dir = tempfile::tempdir().unwrap();
    let buf = SharedBuf::default();
    let stop = StopSignal::new();
    let s2 = stop.clone();
    let progress = Progress::Callback(Arc::new(move |p| {
        if p.records >= 60 {
            s2.stop(StopReason::Shutdown);
        }
    }));
    let first = over_sled(&cfg, &buf, progress, stop, dir.path())
        .await
        .expect("first run");
    assert_ne!(first.status, "completed", "stopped part-way: {first}");
    let written = buf.records().len();
    assert!(
        (60..150).contains(&written),
        "{written} records before the stop"
    );
    let second = over_sled(&cfg, &buf, Progress::Silent, StopSignal::new(), dir.path())
        .await
        .expect("second run");
    assert_eq!(second.status, "completed");
    let skus = by_sku(&buf.records());
    assert_eq!(skus.len(), 150, "missing records");
    assert!(skus.values().all(|v| v.len() == 1), "duplicated records");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_a_tiny_window_gives_no_duplicates() {
    crash_and_resume(tiny_memory(), 150).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item_mode_gives_one_record_per_element_and_vars_substitute() {
    let site = shop(25, false).await;
    let text = r#"
        start_urls = ["{{base}}/index.html"]
        start_page = "list"
        [vars]
        base = "http://invalid.invalid"
        [[follow]]
        selector = "a.next"
        page = "list"
        [pages.list]
        item = "article.product"
        fields.name = "a.title"
        fields.url = { selector = "a.title", attr = "href", absolute_url = true }
        fields.teaser = { selector = ".teaser", regex = "([0-9.]+)", type = "number" }
        fields.missing = ".nothing-here"
    "#;
    let cfg = parse_config_text(text).unwrap();
    let params = BTreeMap::from([("base".to_string(), site.base_url().to_string())]);
    let compiled = Arc::new(compile(&cfg, &params).unwrap());
    let sink = Arc::new(MemorySink::default());
    let outcome = ScrapeJob::default()
        .crawl(
            compiled,
            ResumeState::default(),
            sink.state.clone(),
            sink.clone(),
            StopSignal::new(),
        )
        .await;
    let r = Run {
        outcome,
        committed: std::mem::take(&mut *sink.batches.lock().unwrap()),
    };
    let records = r.records();
    assert_eq!(records.len(), 25, "{records:?}");
    assert!(records.iter().any(|x| x["name"] == json!("Product 7")
        && x["url"] == json!(site.url("/product/7.html"))
        && x["teaser"] == json!(7.07)
        && x["missing"].is_null()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xpath_rules_and_fields_give_what_css_gives() {
    let site = shop(23, false).await;
    let css = run(&catalog(&site)).await;
    let text = r#"
        [[follow]]
        xpath = "//a[@class = 'next']/@href"
        [[follow]]
        xpath = "//article[@class = 'product']/a[@class = 'title']/@href"
        page = "product"
        [pages.product]
        fields.title = { xpath = "normalize-space(//h1)" }
        fields.price = { xpath = "//p[@class = 'price']/text()", regex = "([0-9]+\\.[0-9]+)", type = "number" }
        fields.sku   = { xpath = "//td[@class = 'sku']/text()" }
        fields.image = { xpath = "//img[@class = 'main']/@src", absolute_url = true }
        fields.tags  = { xpath = "//li[@class = 'tag']/text()", all = true }
        fields.row   = { xpath = "count(//table/tr)", type = "integer" }
        fields.broken = { xpath = "//h1[. = 'a' + 1]" }
    "#;
    let mut cfg = parse_config_text(text).unwrap();
    cfg["start_urls"] = json!([site.url("/index.html")]);
    let xp = run(&cfg).await;
    assert!(xp.completed(), "outcome: {:?}", xp.outcome);
    let (css, xp_records) = (by_sku(&css.records()), by_sku(&xp.records()));
    assert_eq!(xp_records.len(), 23, "{xp_records:?}");
    for (sku, recs) in &xp_records {
        assert_eq!(recs.len(), 1, "{sku}");
        let (a, b) = (&css[sku][0], &recs[0]);
        for f in ["title", "price", "sku", "image", "tags"] {
            assert_eq!(a[f], b[f], "{sku}.{f}: css {a} xpath {b}");
        }
        // Rows as the page has them: no <tbody> is added to a table without one.
        assert_eq!(b["row"], json!(2), "{b}");
        assert!(b["broken"].is_null(), "{b}");
    }
    // The expression that fails at run time says so in the log, page by page.
    let warns: Vec<_> = xp
        .log()
        .into_iter()
        .filter(|(l, m)| l == "warn" && m.contains("XPTY0004"))
        .collect();
    assert_eq!(warns.len(), 23, "{:?}", xp.log());
    assert!(warns[0].1.contains("/product/"), "{warns:?}");
}

fn session(config: Value) -> Session {
    Session {
        id: SessionId::parse("engine-test").unwrap(),
        tenant: None,
        seq: 1,
        client: ClientContext::of("test"),
        status: SessionStatus::Running,
        job: JobSpec {
            config: config.into(),
            params: BTreeMap::new(),
            agent: None,
        },
        options: Default::default(),
        attempt: 1,
        failures: 0,
        progress_this_attempt: false,
        lease: None,
        cancel_requested: false,
        run_at: Timestamp(0),
        created_at: Timestamp(0),
        updated_at: Timestamp(0),
        cleanup_at: None,
        metrics: Default::default(),
        usage: Default::default(),
        error: None,
        checkpoints: 0,
        records: 0,
        records_removed: 0,
        attempts: Vec::new(),
    }
}

async fn run_job(job: &ScrapeJob, config: Value) -> Run {
    let sink = Arc::new(MemorySink::default());
    let ctx = JobContext {
        session: session(config),
        resume: ResumeState::default(),
        state: sink.state.clone(),
        sink: sink.clone(),
        stop: StopSignal::new(),
    };
    let outcome = tokio::time::timeout(Duration::from_secs(60), job.run(ctx))
        .await
        .expect("ends");
    Run {
        outcome,
        committed: std::mem::take(&mut *sink.batches.lock().unwrap()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_refuses_loopback_unless_allow_listed() {
    let site = shop(3, false).await;
    let guarded = ScrapeJob::new(EngineSettings {
        guard: Some(NetGuard::default()),
        ..Default::default()
    });
    let r = run_job(&guarded, catalog(&site)).await;
    // Refused for good: FAILED, not "completed with nothing", and not worth another attempt.
    match &r.outcome {
        JobOutcome::Failed { error, retry, .. } => {
            assert_eq!(error.kind, "fetch_failed");
            assert!(error.message.contains("network guard"), "{}", error.message);
            assert_eq!(*retry, harvest::job::Retry::Never);
        }
        other => panic!("a crawl whose start URL the guard refused must fail: {other:?}"),
    }
    assert_eq!(r.pages(), 0, "a refused page is not a processed page");
    assert_eq!(site.total_hits(), 0, "the guard let a request through");
    assert!(r.records().is_empty());
    assert!(r.usage().http_errors >= 1);
    assert!(
        r.log().iter().any(|(l, m)| l == "error"
            && m.contains("refused: private or local address")
            && !m.contains("loopback")),
        "{:?}",
        r.log()
    );

    // A name is checked on the address it resolves to (the resolver path, not the IP literal).
    let mut by_name = catalog(&site);
    by_name["start_urls"] = json!([site.url("/index.html").replace("127.0.0.1", "localhost")]);
    let r = run_job(&guarded, by_name).await;
    assert_eq!(
        site.total_hits(),
        0,
        "the guard let a request to localhost through"
    );
    assert!(
        r.log()
            .iter()
            .any(|(l, m)| l == "error" && m.contains("network guard")),
        "{:?}",
        r.log()
    );

    let allowed = ScrapeJob::new(EngineSettings {
        guard: Some(NetGuard::from_cidrs(&["127.0.0.0/8"]).unwrap()),
        ..Default::default()
    });
    let r = run_job(&allowed, catalog(&site)).await;
    assert_eq!(r.records().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_run_refuses_a_bad_config_without_retry() {
    let r = run_job(&ScrapeJob::default(), json!({"start_urls": []})).await;
    match r.outcome {
        JobOutcome::Failed { error, retry, .. } => {
            assert_eq!(error.kind, "invalid_config");
            assert_eq!(retry, harvest::job::Retry::Never);
        }
        o => panic!("expected Failed, got {o:?}"),
    }
}

#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl SharedBuf {
    /// The JSON lines written so far.
    fn records(&self) -> Vec<Value> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect()
    }
}

impl std::io::Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_local_writes_json_lines_and_a_summary() {
    let site = shop(30, false).await;
    let buf = SharedBuf::default();
    let calls = Arc::new(Mutex::new(0u32));
    let c2 = calls.clone();
    let progress = Progress::Callback(Arc::new(move |_p| *c2.lock().unwrap() += 1));
    let summary = run_local(
        &catalog(&site),
        &BTreeMap::new(),
        EngineSettings::default(),
        Box::new(buf.clone()),
        progress,
        StopSignal::new(),
    )
    .await
    .expect("runs");
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 30);
    assert_eq!(summary.records, 30);
    assert_eq!(summary.pages, 33);
    assert_eq!(summary.status, "completed");
    assert!(summary.to_string().contains("30 records"), "{summary}");
    assert!(*calls.lock().unwrap() >= 1);

    let bad = run_local(
        &json!({"start_urls": ["ftp://x"]}),
        &BTreeMap::new(),
        EngineSettings::default(),
        Box::new(std::io::sink()),
        Progress::Silent,
        StopSignal::new(),
    )
    .await;
    assert!(bad.is_err_and(|e| e.to_string().contains("start_urls[0]")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_ms_spaces_requests_to_one_host() {
    let site = shop(4, false).await;
    let mut cfg = catalog(&site);
    cfg["http"]["delay_ms"] = json!(100);
    cfg["http"]["obey_robots_txt"] = json!(false);
    let started = std::time::Instant::now();
    let r = run(&cfg).await;
    // 5 pages, each 100 ms after the previous one on this host.
    assert_eq!(r.pages(), 5);
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "took {:?}",
        started.elapsed()
    );
}

/// A loopback server for robots.txt cases: `robots` answers /robots.txt (status, body),
/// `/page/{n}` is a small page, `/jump` redirects to `jump_to`. Counts hits per path.
struct RobotsSite {
    base: String,
    hits: Arc<Mutex<HashMap<String, u32>>>,
}

impl RobotsSite {
    async fn start(robots: (u16, &'static str), jump_to: Option<String>) -> RobotsSite {
        use axum::http::{StatusCode, header};
        use axum::response::IntoResponse;
        let hits: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let h = hits.clone();
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let h = h.clone();
            let jump_to = jump_to.clone();
            async move {
                let path = uri.path().to_string();
                *h.lock().unwrap().entry(path.clone()).or_default() += 1;
                let html = [(header::CONTENT_TYPE, "text/html")];
                match path.as_str() {
                    "/robots.txt" => {
                        (StatusCode::from_u16(robots.0).unwrap(), robots.1).into_response()
                    }
                    "/jump" => match jump_to {
                        Some(to) => (StatusCode::FOUND, [(header::LOCATION, to)]).into_response(),
                        None => StatusCode::NOT_FOUND.into_response(),
                    },
                    p if p.starts_with("/page/") => {
                        (html, format!("<html><body><h1>{p}</h1></body></html>")).into_response()
                    }
                    _ => StatusCode::NOT_FOUND.into_response(),
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        RobotsSite { base, hits }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn hits(&self, path: &str) -> u32 {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

fn titles(start_urls: Vec<String>) -> Value {
    json!({
        "start_urls": start_urls,
        "http": {"retries": 0},
        "pages": {"p": {"fields": {"title": "h1"}}},
        "start_page": "p",
    })
}

/// RFC 9309: a robots.txt answering 5xx (after retries) disallows the whole host, with a log
/// line that says why; one answering 4xx allows everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_robots_txt_disallows_its_host_and_a_missing_one_allows_it() {
    let down = RobotsSite::start((503, "busy"), None).await;
    let r = run(&titles(vec![down.url("/page/1"), down.url("/page/2")])).await;
    // Nothing could be fetched: FAILED, and retried (a robots.txt that is down may come back).
    match &r.outcome {
        JobOutcome::Failed { error, retry, .. } => {
            assert_eq!(error.kind, "fetch_failed");
            assert_eq!(*retry, harvest::job::Retry::Backoff);
        }
        other => panic!("nothing fetched must fail: {other:?}"),
    }
    assert!(r.records().is_empty(), "{:?}", r.records());
    assert_eq!(down.hits("/page/1") + down.hits("/page/2"), 0);
    assert_eq!(
        down.hits("/robots.txt"),
        3,
        "read once per session, with 2 retries"
    );
    assert_eq!(r.usage().robots_blocked, 2);
    assert!(
        r.log()
            .iter()
            .any(|(level, m)| level == "warn" && m.contains("robots.txt") && m.contains("503")),
        "{:?}",
        r.log()
    );

    let missing = RobotsSite::start((404, "no"), None).await;
    let r = run(&titles(vec![missing.url("/page/1")])).await;
    assert_eq!(r.records().len(), 1);
    assert_eq!(r.usage().robots_blocked, 0);
}

/// A redirect to another host is checked against that host's robots.txt before it is
/// followed; the robots.txt of the first host alone does not decide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_checked_against_the_robots_txt_of_its_target() {
    let target = RobotsSite::start((200, "User-agent: *\nDisallow: /page/secret\n"), None).await;
    let origin = RobotsSite::start((404, ""), Some(target.url("/page/secret"))).await;
    let r = run(&titles(vec![origin.url("/jump"), target.url("/page/open")])).await;
    assert!(r.completed());
    assert_eq!(origin.hits("/jump"), 1);
    assert_eq!(
        target.hits("/page/secret"),
        0,
        "followed into a disallowed path"
    );
    assert_eq!(target.hits("/page/open"), 1);
    assert_eq!(r.usage().robots_blocked, 1);
    assert_eq!(r.records().len(), 1, "{:?}", r.records());
}
