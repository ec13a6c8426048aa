//! The crawl loop of one attempt: up to `concurrency` page tasks in flight, progress handed to
//! the sink in bounded batches, and only bounded state in memory.
//!
//! # Memory
//!
//! The frontier and the seen set live in the committed checkpoints (the store), read through the
//! job's [`CrawlState`]. In memory the crawl keeps:
//! - a window of the frontier (at most [`BatchPolicy::window`] entries, oldest first). New URLs go
//!   to the window while it has room and nothing older waits in the store; otherwise they are
//!   only committed ("spilled"), and the window is refilled from the committed frontier, in the
//!   order URLs were added, when it runs low. A refill first commits the batch, then continues
//!   after the last position it read, skipping URLs it holds (in the window or in flight);
//! - a cache of seen URLs (two generations, at most about [`BatchPolicy::seen_cache`] URLs),
//!   rotated only right after a commit so that every uncommitted URL is in it. A URL the cache
//!   does not know is looked up in the committed seen set, unless the cache is still complete (a
//!   fresh attempt that never rotated it);
//! - the uncommitted batches: the one being committed and the one filling (each bounded by the
//!   batch policy; a full batch waits for the commit before it takes more pages).
//!
//! # Checkpoints
//!
//! At most one commit is in flight, on its own task, while the crawl goes on and the next batch
//! fills: the store's work (applying the batch, waiting for its flush) overlaps with fetching and
//! parsing. Batches commit one at a time, in order. A refill and the end of the attempt first
//! wait for the commit in flight (a refill reads the committed frontier; the last batch commits
//! with the final status). The seen cache rotates only when a commit completes, which drops the
//! URLs cached before the previous completion: all of them were in batches taken before this one
//! completed, so all are committed.
//!
//! # Exactly once
//!
//! A URL enters `seen_add`/`frontier_add` in the batch of the page that discovered it, and
//! enters `frontier_done` in the batch that holds its page's records. A resumed attempt refetches
//! every committed frontier entry, and nothing else: the pages in flight at a crash and the
//! uncommitted batch are redone, their records were never committed.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use serde_json::Value;
use tokio::task::JoinSet;
use tokio::time::Instant;
use url::Url;

use super::config::CompiledConfig;
use super::extract::{decode, extract_page};
use super::fetch::{Fetcher, PageError};
use crate::job::{
    CheckpointSink, CommitError, CrawlState, JobOutcome, Retry, StopReason, StopSignal,
};
use crate::session::{
    ContextValue, ErrorKind, FrontierEntry, LogLine, SessionError, Timestamp, TokenUsage,
};
use crate::store::{CheckpointBatch, FRONTIER_PAGE_MAX, FrontierDone, ResumeState};

/// When a batch is handed to the sink (whichever limit comes first), and how much crawl state
/// stays in memory.
#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    /// Longest time progress waits before it is committed.
    pub interval: Duration,
    /// Most pages per batch.
    pub max_pages: u64,
    /// Most records per batch.
    pub max_records: usize,
    /// Most log lines per batch; more are summarized in one line.
    pub max_log_lines: usize,
    /// Most frontier entries held in memory; the rest is read back from the committed frontier.
    pub window: usize,
    /// About how many seen URLs are cached in memory in front of the committed seen set.
    pub seen_cache: usize,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        BatchPolicy {
            interval: Duration::from_millis(100),
            max_pages: 500,
            max_records: 5000,
            max_log_lines: 100,
            // 10k entries of ~100 bytes: ~1 MB, and a refill (one store read) every 5k pages.
            window: 10_000,
            // 16-byte fingerprints: a few MB, twice the window's reach many times over.
            seen_cache: 200_000,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Fetched,
    Failed,
    Blocked,
    Stopped,
}

struct PageOutcome {
    entry: FrontierEntry,
    /// The entry's frontier position (see [`Crawl::next_pos`]).
    pos: u64,
    kind: Kind,
    records: Vec<Value>,
    links: Vec<(String, Option<Arc<str>>)>,
    usage: TokenUsage,
    log: Vec<(&'static str, String)>,
    /// Why it was not fetched (failed or blocked), and whether another attempt may fare better
    /// (a timeout, a refused connection, a 5xx) or not (a 404, the network guard, robots.txt).
    failure: Option<(String, bool)>,
}

async fn process(
    cfg: Arc<CompiledConfig>,
    fetcher: Arc<Fetcher>,
    stop: StopSignal,
    entry: FrontierEntry,
    pos: u64,
) -> PageOutcome {
    let mut out = PageOutcome {
        entry,
        pos,
        kind: Kind::Fetched,
        records: Vec::new(),
        links: Vec::new(),
        usage: TokenUsage::default(),
        log: Vec::new(),
        failure: None,
    };
    let url = match Url::parse(&out.entry.url) {
        Ok(u) => u,
        Err(e) => {
            out.kind = Kind::Failed;
            let msg = format!("{}: not a URL: {e}", out.entry.url);
            out.failure = Some((msg.clone(), false));
            out.log.push(("error", msg));
            return out;
        }
    };
    match fetcher.fetch(&url, &stop, &mut out.usage).await {
        Ok(f) => {
            if let Some((n, last)) = &f.retried {
                let retries = if *n == 1 { "retry" } else { "retries" };
                out.log.push((
                    "info",
                    format!("{url}: fetched after {n} {retries} (last failure: {last})"),
                ));
            }
            let (text, had_errors) = decode(&f.body, f.content_type.as_deref());
            if had_errors {
                out.log.push((
                    "warn",
                    format!("{url}: invalid bytes for its charset were replaced"),
                ));
            }
            let page = out.entry.page.as_deref().and_then(|p| cfg.pages.get(p));
            let ex = extract_page(&cfg, page, &f.url, &text);
            for e in ex.errors {
                out.log.push(("warn", format!("{url}: {e}")));
            }
            out.records = ex.records;
            out.links = ex.links;
        }
        Err(PageError::RobotsBlocked) => {
            out.kind = Kind::Blocked;
            let msg = format!("{url}: not fetched, robots.txt disallows it");
            out.failure = Some((msg.clone(), false));
            out.log.push(("info", msg));
        }
        Err(e @ PageError::RobotsUnreachable(_)) => {
            out.kind = Kind::Blocked;
            let msg = format!("{url}: not fetched: {e}");
            out.failure = Some((msg.clone(), true));
            out.log.push(("warn", msg));
        }
        Err(PageError::Stopped) => out.kind = Kind::Stopped,
        Err(e @ PageError::NotHtml(_)) => {
            out.log.push(("warn", format!("{url}: {e}")));
        }
        Err(e) => {
            out.kind = Kind::Failed;
            let msg = format!("{url}: {e}");
            out.failure = Some((msg.clone(), e.is_transient()));
            out.log.push(("error", msg));
        }
    }
    out
}

/// Seen URLs in two generations: lookups see both; a rotation drops the older one.
///
/// It holds 128-bit fingerprints, not the URLs: 16 bytes a URL instead of ~150 with a `String`
/// (`harvest bench frontier --urls 1000000`: ~40 MB of peak RSS less at 200k cached URLs). Two
/// URLs share a fingerprint with a probability of about 2^-128 per pair (keyed SipHash, random
/// keys per cache), far below any other failure of the crawl: the cache never claims a URL seen
/// that was not.
struct SeenCache {
    current: HashSet<u128>,
    previous: HashSet<u128>,
    keys: (RandomState, RandomState),
    cap: usize,
    /// No URL was ever dropped: together with a fresh attempt, the cache knows every seen URL.
    complete: bool,
}

impl SeenCache {
    fn new(cap: usize, complete: bool) -> SeenCache {
        SeenCache {
            current: HashSet::new(),
            previous: HashSet::new(),
            keys: (RandomState::new(), RandomState::new()),
            cap,
            complete,
        }
    }

    fn fingerprint(&self, url: &str) -> u128 {
        (u128::from(self.keys.0.hash_one(url)) << 64) | u128::from(self.keys.1.hash_one(url))
    }

    fn contains(&self, url: &str) -> bool {
        let f = self.fingerprint(url);
        self.current.contains(&f) || self.previous.contains(&f)
    }

    fn insert(&mut self, url: &str) {
        let f = self.fingerprint(url);
        if !self.previous.contains(&f) {
            self.current.insert(f);
        }
    }

    /// Called only right after a commit: nothing uncommitted is dropped.
    fn maybe_rotate(&mut self) {
        if self.current.len() >= self.cap / 2 {
            self.previous = std::mem::take(&mut self.current);
            self.complete = false;
        }
    }
}

struct Crawl {
    cfg: Arc<CompiledConfig>,
    /// The oldest frontier entries not yet dispatched (at most `policy.window`), with their
    /// positions.
    window: VecDeque<(FrontierEntry, u64)>,
    /// URLs in the window or in flight: a refill skips them.
    held: HashSet<String>,
    /// Frontier entries not done: committed ones, this batch's additions, the window, in flight.
    frontier_len: u64,
    /// Some frontier entries are neither held nor read yet: they wait in the store.
    spilled: bool,
    /// The last committed frontier position read.
    cursor: u64,
    /// The position the store gives the next URL this attempt adds: new URLs take consecutive
    /// positions, batches commit in order, and only this attempt adds to the session's frontier.
    /// Sent with each done URL so that the store need not look the URL up.
    next_pos: u64,
    seen: SeenCache,
    pages_done: u64,
    /// Pages this attempt fetched, and tried but could not fetch (failed, or refused).
    fetched: u64,
    failed: u64,
    /// The last page failure (see [`PageOutcome::failure`]).
    last_failure: Option<(String, bool)>,
    records_total: u64,
    records_full: bool,
    batch: CheckpointBatch,
    suppressed_logs: usize,
    policy: BatchPolicy,
}

impl Crawl {
    fn log(&mut self, level: &str, message: String) {
        if self.batch.log.len() < self.policy.max_log_lines {
            self.batch.log.push(LogLine {
                at: Timestamp::now(),
                level: level.into(),
                message,
            });
        } else {
            self.suppressed_logs += 1;
        }
    }

    fn take_batch(&mut self) -> CheckpointBatch {
        if self.suppressed_logs > 0 {
            let n = std::mem::take(&mut self.suppressed_logs);
            self.batch.log.push(LogLine {
                at: Timestamp::now(),
                level: "warn".into(),
                message: format!("{n} more log lines in this checkpoint were dropped"),
            });
        }
        std::mem::take(&mut self.batch)
    }

    /// Of these URLs (unique, none in the cache), which the committed seen set holds.
    async fn seen_in_store(
        &self,
        state: &dyn CrawlState,
        urls: &[String],
    ) -> Result<Vec<bool>, crate::job::CrawlStateError> {
        if self.seen.complete || urls.is_empty() {
            return Ok(vec![false; urls.len()]);
        }
        let mut out = Vec::with_capacity(urls.len());
        for chunk in urls.chunks(FRONTIER_PAGE_MAX) {
            out.extend(state.seen_filter(chunk.to_vec()).await?);
        }
        Ok(out)
    }

    /// The links worth a look in the committed seen set: not cached, each once.
    fn candidates(&self, links: &[(String, Option<Arc<str>>)]) -> Vec<String> {
        let mut seen_here = HashSet::new();
        links
            .iter()
            .filter(|(u, _)| !self.seen.contains(u) && seen_here.insert(u.as_str()))
            .map(|(u, _)| u.clone())
            .collect()
    }

    fn enqueue(&mut self, url: String, depth: u32, page: Option<String>) {
        // Never more frontier than pages still allowed: a link dropped here is not marked seen, so
        // another page can rediscover it.
        // (`frontier_len` counts the pages in flight too: they are not done.)
        let budget = self.cfg.limits.max_pages;
        if self.pages_done + self.frontier_len >= budget {
            return;
        }
        if self.seen.contains(&url) {
            return;
        }
        self.seen.insert(&url);
        let entry = FrontierEntry {
            url: url.clone(),
            depth,
            page,
        };
        self.batch.seen_add.push(url);
        self.frontier_len += 1;
        let pos = self.next_pos;
        self.next_pos += 1;
        if !self.spilled && self.window.len() < self.policy.window {
            self.held.insert(entry.url.clone());
            self.window.push_back((entry.clone(), pos));
        } else {
            self.spilled = true;
        }
        self.batch.frontier_add.push(entry);
    }

    /// Merges a finished page. `stored_seen[i]`: whether `candidates[i]` (see
    /// [`Crawl::candidates`]) is in the committed seen set.
    fn merge(&mut self, o: PageOutcome, stored_seen: &[(String, bool)]) {
        self.held.remove(&o.entry.url);
        self.batch.usage += o.usage;
        for (level, msg) in o.log {
            self.log(level, msg);
        }
        let transient = o.failure.as_ref().is_some_and(|(_, t)| *t);
        if o.failure.is_some() {
            self.failed += 1;
            self.last_failure = o.failure;
        }
        match o.kind {
            // Left in the stored frontier: the next attempt fetches it.
            Kind::Stopped => return,
            // A failure that may pass (a timeout, a refused connection, a 5xx after the
            // retries) also stays in the stored frontier: not fetched again by this attempt,
            // but by a next one (a crawl that fetched nothing is retried for that).
            Kind::Failed if transient => {
                self.pages_done += 1;
                return;
            }
            Kind::Blocked => {
                self.frontier_len = self.frontier_len.saturating_sub(1);
                self.batch.frontier_done.push(FrontierDone {
                    url: o.entry.url,
                    pos: Some(o.pos),
                });
                return;
            }
            Kind::Fetched | Kind::Failed => {}
        }
        // Done before its links are counted against the page budget (a failed page spends it
        // too); only a fetched page counts as processed.
        self.frontier_len = self.frontier_len.saturating_sub(1);
        self.pages_done += 1;
        if o.kind == Kind::Fetched {
            self.fetched += 1;
            self.batch.pages += 1;
        }
        let max_records = self.cfg.limits.max_records;
        for r in o.records {
            if self.records_total >= max_records {
                self.records_full = true;
                break;
            }
            self.records_total += 1;
            self.batch.records.push(r);
        }
        if self.records_total >= max_records {
            self.records_full = true;
        }
        for (url, seen) in stored_seen {
            if *seen {
                self.seen.insert(url);
            }
        }
        let depth = o.entry.depth + 1;
        if depth <= self.cfg.limits.max_depth && !self.records_full {
            for (url, page) in o.links {
                self.enqueue(url, depth, page.map(|p| p.to_string()));
            }
        }
        self.batch.frontier_done.push(FrontierDone {
            url: o.entry.url,
            pos: Some(o.pos),
        });
    }

    /// Why a crawl that ran to its end failed, if it did: nothing was ever fetched (no start URL
    /// could be; earlier attempts count, as `before` pages), or more than `max_error_ratio` of
    /// the pages this attempt tried failed. Retried when the last failure may pass.
    fn failure(&self, before: u64) -> Option<(SessionError, Retry)> {
        let retry = |transient: bool| {
            if transient {
                Retry::Backoff
            } else {
                Retry::Never
            }
        };
        if before + self.fetched == 0 && !self.cfg.start_urls.is_empty() {
            let (why, transient) = self
                .last_failure
                .clone()
                .unwrap_or_else(|| ("every start URL was already seen".into(), false));
            let error = SessionError::new(
                ErrorKind::FetchFailed,
                format!("no start URL could be fetched; the last failure: {why}"),
            );
            return Some((error, retry(transient)));
        }
        let max = self.cfg.limits.max_error_ratio?;
        let tried = self.fetched + self.failed;
        let ratio = self.failed as f64 / tried.max(1) as f64;
        if tried == 0 || ratio <= max {
            return None;
        }
        let (why, transient) = self.last_failure.clone().unwrap_or_default();
        let error = SessionError::new(
            ErrorKind::ErrorRatioExceeded,
            format!(
                "{} of {tried} pages failed ({:.0}%, more than limits.max_error_ratio = {max}); the last failure: {why}",
                self.failed,
                ratio * 100.0
            ),
        );
        Some((error, retry(transient)))
    }

    fn batch_full(&self) -> bool {
        self.batch.pages >= self.policy.max_pages
            || self.batch.records.len() >= self.policy.max_records
    }

    /// Reads committed frontier entries after the cursor into the window, skipping held URLs.
    /// The batch must have been committed first (so the store's frontier is complete).
    async fn refill(&mut self, state: &dyn CrawlState) -> Result<(), crate::job::CrawlStateError> {
        // Bounded: each round either adds to the window, skips held URLs (at most window +
        // concurrency of them in all), or ends at the end of the stored frontier.
        for _ in 0..1_000_000 {
            let want = self
                .policy
                .window
                .saturating_sub(self.window.len())
                .clamp(1, FRONTIER_PAGE_MAX);
            if self.window.len() >= self.policy.window {
                return Ok(());
            }
            let items = state.frontier_page(self.cursor, want).await?;
            let exhausted = items.len() < want;
            for it in items {
                self.cursor = self.cursor.max(it.pos);
                if !self.held.contains(&it.entry.url) {
                    self.held.insert(it.entry.url.clone());
                    self.window.push_back((it.entry, it.pos));
                }
            }
            if exhausted {
                self.spilled = false;
                return Ok(());
            }
        }
        Ok(())
    }
}

/// What woke the crawl loop.
enum Event {
    Stop,
    Committed(Result<(), CommitError>),
    Page(Result<PageOutcome, tokio::task::JoinError>),
    Tick,
}

/// Checkpoint commits, at most one in flight while the crawl goes on (the sink's work, e.g. a
/// store write and its flush, overlaps with fetching and parsing). Batches commit one at a time
/// and in order, so a URL's records still commit with or before its `frontier_done`.
struct Pipeline {
    sink: Arc<dyn CheckpointSink>,
    in_flight: Option<tokio::task::JoinHandle<Result<(), CommitError>>>,
}

impl Pipeline {
    fn new(sink: Arc<dyn CheckpointSink>) -> Pipeline {
        Pipeline {
            sink,
            in_flight: None,
        }
    }

    fn busy(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Starts committing `batch`. Only when not [`Pipeline::busy`].
    fn start(&mut self, batch: CheckpointBatch) {
        debug_assert!(self.in_flight.is_none(), "one commit in flight at most");
        let sink = self.sink.clone();
        self.in_flight = Some(tokio::spawn(async move { sink.commit(batch).await }));
    }

    /// Resolves when the commit in flight is done (never, when none is).
    async fn done(&mut self) -> Result<(), CommitError> {
        let Some(handle) = self.in_flight.as_mut() else {
            return std::future::pending().await;
        };
        let res = handle.await;
        self.in_flight = None;
        // A commit task that panicked committed nothing we can count on: stop the attempt.
        res.unwrap_or_else(|_| Err(CommitError::Abandoned("the commit task panicked".into())))
    }

    /// Waits for the commit in flight, if any.
    async fn finish(&mut self) -> Result<(), CommitError> {
        if self.busy() {
            self.done().await
        } else {
            Ok(())
        }
    }

    /// Waits for the commit in flight, then commits `batch` (if not empty) and waits for it too.
    async fn commit_now(&mut self, batch: CheckpointBatch) -> Result<(), CommitError> {
        self.finish().await?;
        if batch.is_empty() {
            return Ok(());
        }
        self.sink.commit(batch).await
    }
}

fn lease_lost(mut in_flight: JoinSet<PageOutcome>) -> JobOutcome {
    in_flight.abort_all();
    JobOutcome::Stopped(CheckpointBatch::default())
}

fn state_failed(e: crate::job::CrawlStateError, batch: CheckpointBatch) -> JobOutcome {
    JobOutcome::Failed {
        error: SessionError::new("store_error", e.to_string()),
        retry: Retry::Backoff,
        batch,
    }
}

/// Runs one attempt to its end. Never touches the store: progress goes to `sink`, committed state
/// is read through `state`.
pub async fn crawl(
    cfg: Arc<CompiledConfig>,
    fetcher: Arc<Fetcher>,
    resume: ResumeState,
    state: Arc<dyn CrawlState>,
    sink: Arc<dyn CheckpointSink>,
    stop: StopSignal,
    policy: BatchPolicy,
) -> JobOutcome {
    let policy = BatchPolicy {
        window: policy.window.max(1),
        seen_cache: policy.seen_cache.max(2),
        ..policy
    };
    // Nothing was ever committed (usage counts even a page robots.txt blocked): the cache is
    // all there is to know about seen URLs until it first drops some.
    let fresh = resume.frontier_len == 0
        && resume.records == 0
        && resume.metrics.pages_processed == 0
        && resume.usage == TokenUsage::default();
    let mut c = Crawl {
        cfg: cfg.clone(),
        window: VecDeque::new(),
        held: HashSet::new(),
        frontier_len: resume.frontier_len,
        spilled: resume.frontier_len > 0,
        cursor: 0,
        next_pos: resume.frontier_next.max(1),
        seen: SeenCache::new(policy.seen_cache, fresh),
        pages_done: resume.metrics.pages_processed,
        fetched: 0,
        failed: 0,
        last_failure: None,
        records_total: resume.records,
        records_full: resume.records >= cfg.limits.max_records,
        batch: CheckpointBatch::default(),
        suppressed_logs: 0,
        policy,
    };
    // Start URLs go through the seen set like any link: a resumed attempt skips them.
    let starts: Vec<(String, Option<Arc<str>>)> =
        cfg.start_urls.iter().map(|u| (u.clone(), None)).collect();
    let cands = c.candidates(&starts);
    match c.seen_in_store(state.as_ref(), &cands).await {
        Ok(flags) => {
            for (u, seen) in cands.into_iter().zip(flags) {
                if seen {
                    c.seen.insert(&u);
                } else {
                    c.enqueue(u, 0, cfg.start_page.clone());
                }
            }
        }
        Err(e) => return state_failed(e, CheckpointBatch::default()),
    }
    let concurrency = cfg.http.concurrency;
    let mut in_flight: JoinSet<PageOutcome> = JoinSet::new();
    let mut commits = Pipeline::new(sink);
    let mut stopping = false;
    let mut last_commit = Instant::now();
    // Bounded: every iteration either refills the window (only while entries wait in the store),
    // dispatches a frontier entry (at most max_pages), merges a finished task, finishes or starts
    // a commit, or observes the stop; it ends when nothing is in flight.
    loop {
        if stop.is_stopped() {
            stopping = true;
        }
        let can_dispatch = !stopping
            && !c.records_full
            && c.pages_done + (in_flight.len() as u64) < cfg.limits.max_pages;
        if can_dispatch && c.spilled && c.window.len() <= c.policy.window / 2 {
            // A refill reads the committed frontier: everything found so far must be in it.
            let batch = c.take_batch();
            last_commit = Instant::now();
            if commits.commit_now(batch).await.is_err() {
                return lease_lost(in_flight);
            }
            c.seen.maybe_rotate();
            if let Err(e) = c.refill(state.as_ref()).await {
                in_flight.abort_all();
                return state_failed(e, CheckpointBatch::default());
            }
        }
        while !stopping
            && !c.records_full
            && in_flight.len() < concurrency
            && c.pages_done + (in_flight.len() as u64) < cfg.limits.max_pages
        {
            let Some((entry, pos)) = c.window.pop_front() else {
                break;
            };
            let (cfg, fetcher, stop) = (cfg.clone(), fetcher.clone(), stop.clone());
            let url = entry.url.clone();
            in_flight.spawn(async move {
                match std::panic::AssertUnwindSafe(process(cfg, fetcher, stop, entry.clone(), pos))
                    .catch_unwind()
                    .await
                {
                    Ok(o) => o,
                    Err(_) => PageOutcome {
                        entry,
                        pos,
                        kind: Kind::Failed,
                        records: Vec::new(),
                        links: Vec::new(),
                        usage: TokenUsage::default(),
                        log: vec![(
                            "error",
                            format!("{url}: internal error while processing the page"),
                        )],
                        failure: Some((
                            format!("{url}: internal error while processing the page"),
                            false,
                        )),
                    },
                }
            });
        }
        if in_flight.is_empty() {
            break;
        }
        let deadline = last_commit + c.policy.interval;
        // While a commit is in flight its completion wakes the loop, not the deadline.
        let wait_deadline = !c.batch.is_empty() && !commits.busy();
        // A full batch does not grow while the previous one commits: pages wait in their tasks.
        let take_pages = !(c.batch_full() && commits.busy());
        let event = tokio::select! {
            biased;
            _ = stop.stopped(), if !stopping => Event::Stop,
            res = commits.done(), if commits.busy() => Event::Committed(res),
            Some(res) = in_flight.join_next(), if take_pages => Event::Page(res),
            _ = tokio::time::sleep_until(deadline), if wait_deadline => Event::Tick,
        };
        match event {
            Event::Stop => {
                stopping = true;
                if stop.reason().is_some_and(StopReason::writes_nothing) {
                    commits.finish().await.ok();
                    return lease_lost(in_flight);
                }
            }
            Event::Committed(res) => {
                if res.is_err() {
                    return lease_lost(in_flight);
                }
                // Everything in the cache's older generation was in this commit or before it:
                // batches are taken in order, one at a time.
                c.seen.maybe_rotate();
            }
            // Tasks catch their own panics; a JoinError here means the task was aborted.
            Event::Page(Ok(o)) => {
                // Looked up before anything is merged: a failed lookup leaves the batch whole.
                let depth_ok = o.entry.depth < c.cfg.limits.max_depth;
                let cands = if o.kind == Kind::Fetched && depth_ok {
                    c.candidates(&o.links)
                } else {
                    Vec::new()
                };
                let flags = match c.seen_in_store(state.as_ref(), &cands).await {
                    Ok(f) => f,
                    Err(e) => {
                        commits.finish().await.ok();
                        in_flight.abort_all();
                        return state_failed(e, CheckpointBatch::default());
                    }
                };
                let stored: Vec<(String, bool)> = cands.into_iter().zip(flags).collect();
                c.merge(o, &stored);
            }
            Event::Page(Err(_)) | Event::Tick => {}
        }
        if !c.batch.is_empty()
            && !commits.busy()
            && (c.batch_full() || last_commit.elapsed() >= c.policy.interval)
        {
            last_commit = Instant::now();
            commits.start(c.take_batch());
        }
    }
    // The last batch goes with the final status: the commit before it must be in first.
    if commits.finish().await.is_err() {
        return JobOutcome::Stopped(CheckpointBatch::default());
    }
    let mut batch = c.take_batch();
    // The session's context: the variables the crawl ran with.
    batch.context = Some(
        c.cfg
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), ContextValue::Text(v.clone())))
            .collect(),
    );
    if stopping {
        return JobOutcome::Stopped(batch);
    }
    match c.failure(resume.metrics.pages_processed) {
        Some((error, retry)) => JobOutcome::Failed {
            error,
            retry,
            batch,
        },
        None => JobOutcome::Completed(batch),
    }
}
