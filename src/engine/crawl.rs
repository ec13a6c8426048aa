//! The crawl loop of one attempt: a frontier, a seen set, up to `concurrency` page tasks in
//! flight, and checkpoints handed to the sink in bounded batches.
//!
//! Invariant for exactly-once records across resumes: a URL enters `seen_add`/`frontier_add` in
//! the batch of the page that discovered it, and enters `frontier_done` in the batch that holds
//! its page's records. A resumed attempt refetches every frontier entry, and nothing else.

use std::collections::{HashSet, VecDeque};
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
use crate::job::{CheckpointSink, JobOutcome, StopReason, StopSignal};
use crate::session::{FrontierEntry, LogLine, Timestamp, TokenUsage};
use crate::store::{CheckpointBatch, ResumeState};

/// When a batch is handed to the sink: whichever limit comes first.
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
}

impl Default for BatchPolicy {
    fn default() -> Self {
        BatchPolicy {
            interval: Duration::from_millis(100),
            max_pages: 500,
            max_records: 5000,
            max_log_lines: 100,
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
    kind: Kind,
    records: Vec<Value>,
    links: Vec<(String, Option<Arc<str>>)>,
    usage: TokenUsage,
    log: Vec<(&'static str, String)>,
}

async fn process(
    cfg: Arc<CompiledConfig>,
    fetcher: Arc<Fetcher>,
    stop: StopSignal,
    entry: FrontierEntry,
) -> PageOutcome {
    let mut out = PageOutcome {
        entry,
        kind: Kind::Fetched,
        records: Vec::new(),
        links: Vec::new(),
        usage: TokenUsage::default(),
        log: Vec::new(),
    };
    let url = match Url::parse(&out.entry.url) {
        Ok(u) => u,
        Err(e) => {
            out.kind = Kind::Failed;
            out.log
                .push(("error", format!("{}: not a URL: {e}", out.entry.url)));
            return out;
        }
    };
    match fetcher.fetch(&url, &stop, &mut out.usage).await {
        Ok(f) => {
            let (text, had_errors) = decode(&f.body, f.content_type.as_deref());
            if had_errors {
                out.log.push((
                    "warn",
                    format!("{url}: invalid bytes for its charset were replaced"),
                ));
            }
            let page = out.entry.page.as_deref().and_then(|p| cfg.pages.get(p));
            let ex = extract_page(&cfg, page, &f.url, &text);
            out.records = ex.records;
            out.links = ex.links;
        }
        Err(PageError::RobotsBlocked) => {
            out.kind = Kind::Blocked;
            out.log.push((
                "info",
                format!("{url}: not fetched, robots.txt disallows it"),
            ));
        }
        Err(PageError::Stopped) => out.kind = Kind::Stopped,
        Err(e @ PageError::NotHtml(_)) => {
            out.log.push(("warn", format!("{url}: {e}")));
        }
        Err(e) => {
            out.kind = Kind::Failed;
            out.log.push(("error", format!("{url}: {e}")));
        }
    }
    out
}

struct Crawl {
    cfg: Arc<CompiledConfig>,
    frontier: VecDeque<FrontierEntry>,
    seen: HashSet<String>,
    pages_done: u64,
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

    fn enqueue(&mut self, url: String, depth: u32, page: Option<String>, in_flight: usize) {
        // The in-memory frontier never holds more than the pages still allowed: bounded memory,
        // and a link dropped here is not marked seen, so another page can rediscover it.
        let budget = self.cfg.limits.max_pages;
        if self.pages_done + in_flight as u64 + self.frontier.len() as u64 >= budget {
            return;
        }
        if self.seen.contains(&url) {
            return;
        }
        self.seen.insert(url.clone());
        let entry = FrontierEntry {
            url: url.clone(),
            depth,
            page,
        };
        self.batch.seen_add.push(url);
        self.batch.frontier_add.push(entry.clone());
        self.frontier.push_back(entry);
    }

    fn merge(&mut self, o: PageOutcome, in_flight: usize) {
        self.batch.usage += o.usage;
        for (level, msg) in o.log {
            self.log(level, msg);
        }
        match o.kind {
            // Left in the stored frontier: the next attempt fetches it.
            Kind::Stopped => return,
            Kind::Blocked => {
                self.batch.frontier_done.push(o.entry.url);
                return;
            }
            Kind::Fetched | Kind::Failed => {}
        }
        self.pages_done += 1;
        self.batch.pages += 1;
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
        let depth = o.entry.depth + 1;
        if depth <= self.cfg.limits.max_depth && !self.records_full {
            for (url, page) in o.links {
                self.enqueue(url, depth, page.map(|p| p.to_string()), in_flight);
            }
        }
        self.batch.frontier_done.push(o.entry.url);
    }

    fn batch_full(&self) -> bool {
        self.batch.pages >= self.policy.max_pages
            || self.batch.records.len() >= self.policy.max_records
    }
}

/// Runs one attempt to its end. Never touches the store: progress goes to `sink`.
pub async fn crawl(
    cfg: Arc<CompiledConfig>,
    fetcher: Arc<Fetcher>,
    resume: ResumeState,
    sink: Arc<dyn CheckpointSink>,
    stop: StopSignal,
    policy: BatchPolicy,
) -> JobOutcome {
    let resuming = !resume.frontier.is_empty() || !resume.seen.is_empty();
    let mut c = Crawl {
        cfg: cfg.clone(),
        frontier: VecDeque::new(),
        seen: resume.seen.into_iter().collect(),
        pages_done: resume.metrics.pages_processed,
        records_total: resume.records,
        records_full: resume.records >= cfg.limits.max_records,
        batch: CheckpointBatch::default(),
        suppressed_logs: 0,
        policy,
    };
    if resuming {
        c.frontier = resume.frontier.into();
    } else {
        for u in &cfg.start_urls {
            c.enqueue(u.clone(), 0, cfg.start_page.clone(), 0);
        }
    }
    let concurrency = cfg.http.concurrency;
    let mut in_flight: JoinSet<PageOutcome> = JoinSet::new();
    let mut stopping = false;
    let mut last_commit = Instant::now();
    // Bounded: every iteration either dispatches a frontier entry (at most max_pages), merges
    // a finished task, commits, or observes the stop; it ends when nothing is in flight.
    loop {
        if stop.is_stopped() {
            stopping = true;
        }
        while !stopping
            && !c.records_full
            && in_flight.len() < concurrency
            && c.pages_done + (in_flight.len() as u64) < cfg.limits.max_pages
        {
            let Some(entry) = c.frontier.pop_front() else {
                break;
            };
            let (cfg, fetcher, stop) = (cfg.clone(), fetcher.clone(), stop.clone());
            let url = entry.url.clone();
            in_flight.spawn(async move {
                match std::panic::AssertUnwindSafe(process(cfg, fetcher, stop, entry.clone()))
                    .catch_unwind()
                    .await
                {
                    Ok(o) => o,
                    Err(_) => PageOutcome {
                        entry,
                        kind: Kind::Failed,
                        records: Vec::new(),
                        links: Vec::new(),
                        usage: TokenUsage::default(),
                        log: vec![(
                            "error",
                            format!("{url}: internal error while processing the page"),
                        )],
                    },
                }
            });
        }
        if in_flight.is_empty() {
            break;
        }
        let deadline = last_commit + c.policy.interval;
        let has_progress = !c.batch.is_empty();
        tokio::select! {
            biased;
            _ = stop.stopped(), if !stopping => {
                stopping = true;
                if stop.reason() == Some(StopReason::LeaseLost) {
                    in_flight.abort_all();
                    return JobOutcome::Stopped(CheckpointBatch::default());
                }
            }
            Some(res) = in_flight.join_next() => {
                // Tasks catch their own panics; a JoinError here means the task was aborted.
                if let Ok(o) = res {
                    let n = in_flight.len();
                    c.merge(o, n);
                }
            }
            _ = tokio::time::sleep_until(deadline), if has_progress => {}
        }
        if !c.batch.is_empty() && (c.batch_full() || last_commit.elapsed() >= c.policy.interval) {
            let batch = c.take_batch();
            last_commit = Instant::now();
            if sink.commit(batch).await.is_err() {
                in_flight.abort_all();
                return JobOutcome::Stopped(CheckpointBatch::default());
            }
        }
    }
    let batch = c.take_batch();
    if stopping {
        JobOutcome::Stopped(batch)
    } else {
        JobOutcome::Completed(batch)
    }
}
