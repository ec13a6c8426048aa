//! Soak: sessions submitted continuously for `HARVEST_SOAK_SECS` (default 60) with a 1 s
//! session timeout and a 1 s maintenance interval, against an in-process service on sled. At the
//! end: the store drained to no session key at all (nothing leaked), the process's memory is flat
//! (VmRSS, last third against first third), and no session was ever stuck.
//!
//! The soak runs in a child process (this test binary, running only the ignored
//! `soak::soak_process`), so its memory is measured without the other tests that share the
//! parent process.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use harvest::Harvest;
use harvest::config::Config;
use harvest::job::{Job, JobContext, JobOutcome};
use harvest::service::SubmitRequest;
use harvest::session::{
    ClientContext, FrontierEntry, LogLine, SessionOptions, SessionStatus, Timestamp,
};
use harvest::store::{CheckpointBatch, SessionList};
use serde_json::json;

const CHILD_ENV: &str = "HARVEST_SOAK_CHILD";

/// At most this many PENDING sessions: the submitter waits above it, so the queue measures the
/// service rather than the submitter's speed.
const MAX_PENDING: u64 = 200;

/// A session older than this still PENDING or RUNNING counts as stuck.
const STUCK_AFTER: Duration = Duration::from_secs(20);

/// Commits records, frontier, seen URLs and a log line, then completes.
struct SmallCrawl;

#[async_trait]
impl Job for SmallCrawl {
    fn validate(
        &self,
        _: &serde_json::Value,
        _: &BTreeMap<String, String>,
    ) -> Result<(), harvest::job::ConfigRejected> {
        Ok(())
    }
    async fn run(&self, ctx: JobContext) -> JobOutcome {
        let batch = CheckpointBatch {
            records: (0..5)
                .map(|i| json!({"i": i, "pad": "x".repeat(200)}))
                .collect(),
            frontier_add: vec![FrontierEntry {
                url: "http://127.0.0.1:1/a".into(),
                depth: 1,
                page: None,
            }],
            seen_add: vec!["http://127.0.0.1:1/".into()],
            log: vec![LogLine {
                at: Timestamp::now(),
                level: "info".into(),
                message: "page".into(),
            }],
            pages: 1,
            ..Default::default()
        };
        if ctx.sink.commit(batch).await.is_err() {
            return JobOutcome::Stopped(CheckpointBatch::default());
        }
        JobOutcome::Completed(CheckpointBatch::default())
    }
}

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn mean(v: &[u64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.iter().sum::<u64>() as f64 / v.len() as f64
}

#[test]
fn soak_sessions_with_short_timeouts_stay_bounded() {
    let secs: u64 = std::env::var("HARVEST_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut child = std::process::Command::new(exe)
        .args(["soak::soak_process", "--exact", "--ignored", "--nocapture"])
        .env(CHILD_ENV, "1")
        .env("HARVEST_SOAK_SECS", secs.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start the soak process");
    // Bounded: the soak, its drain (≤ 60 s) and slack for a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(secs + 180);
    let status = loop {
        match child.try_wait().expect("wait for the soak process") {
            Some(st) => break st,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                panic!("the soak process did not end within {} s", secs + 180);
            }
            None => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut o, &mut out);
    }
    let result = out.lines().find(|l| l.starts_with("SOAK_RESULT "));
    assert!(
        status.success(),
        "the soak failed ({status}); its output:\n{out}"
    );
    let result = result.unwrap_or_else(|| panic!("no SOAK_RESULT line in:\n{out}"));
    eprintln!("{result}");
}

/// The soak itself; run by `soak_sessions_with_short_timeouts_stay_bounded` in a child process.
#[test]
#[ignore = "run in a child process by soak_sessions_with_short_timeouts_stay_bounded"]
fn soak_process() {
    if std::env::var(CHILD_ENV).is_err() {
        eprintln!("skipped: run by soak_sessions_with_short_timeouts_stay_bounded");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(soak());
}

async fn soak() {
    let secs: u64 = std::env::var("HARVEST_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let dir = tempfile::TempDir::new().expect("temp dir");
    let mut cfg = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    cfg.workers.concurrency = 4;
    cfg.workers.lease_secs = 5;
    cfg.sessions.maintenance_interval_secs = 1;
    cfg.sessions.default_timeout_secs = 1;
    let harvest = Harvest::builder(cfg)
        .job(Arc::new(SmallCrawl))
        .open()
        .await
        .expect("open harvest");
    harvest.start();

    let submitted = Arc::new(AtomicU64::new(0));
    let run_for = Duration::from_secs(secs);
    let submitter = {
        let h = harvest.clone();
        let submitted = submitted.clone();
        tokio::spawn(async move {
            let end = tokio::time::Instant::now() + run_for;
            let mut events = h.subscribe();
            while tokio::time::Instant::now() < end {
                let counts = h
                    .store()
                    .session_counts(h.clock().now())
                    .await
                    .expect("counts");
                let pending = counts
                    .by_status
                    .get(&SessionStatus::Pending)
                    .copied()
                    .unwrap_or(0);
                if pending >= MAX_PENDING {
                    // Wait for the service to make progress (any event), at most 100 ms.
                    let _ = tokio::time::timeout(Duration::from_millis(100), events.recv()).await;
                    continue;
                }
                for _ in 0..20 {
                    let req = SubmitRequest::new(json!({"name": "soak"}))
                        .client(ClientContext::of("soak"))
                        .options(SessionOptions {
                            session_timeout_secs: Some(1),
                            ..SessionOptions::default()
                        });
                    h.submit(req).await.expect("submit");
                    submitted.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    let mut rss = Vec::new();
    let mut totals = Vec::new();
    let mut stuck_checks = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let end = tokio::time::Instant::now() + run_for;
    while tokio::time::Instant::now() < end {
        tick.tick().await;
        rss.push(vm_rss_kib());
        let now = harvest.clock().now();
        let counts = harvest.store().session_counts(now).await.expect("counts");
        totals.push(counts.by_status.values().sum::<u64>());
        for status in [SessionStatus::Pending, SessionStatus::Running] {
            let page = harvest
                .list(SessionList {
                    status: Some(status),
                    limit: 1000,
                    ..Default::default()
                })
                .await
                .expect("list");
            for s in &page.sessions {
                let age = now.millis().saturating_sub(s.created_at.millis());
                assert!(
                    age < STUCK_AFTER.as_millis() as i64,
                    "session {} is stuck {status} after {age} ms: {s:?}",
                    s.id
                );
            }
            stuck_checks += page.sessions.len() as u64;
        }
    }
    submitter.await.expect("submitter");

    // Drain: every session ends, then expires (timeout 1 s, maintenance every 1 s).
    let drain_deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let drained = loop {
        let counts = harvest
            .store()
            .session_counts(harvest.clock().now())
            .await
            .expect("counts");
        let total: u64 = counts.by_status.values().sum();
        if total == 0 {
            break true;
        }
        if tokio::time::Instant::now() > drain_deadline {
            eprintln!("not drained after 60 s: {counts:?}");
            break false;
        }
        tick.tick().await;
    };
    assert!(drained, "sessions are left after the drain");
    harvest
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
    drop(harvest);

    // No leaked keys: only the store's own bookkeeping is left, in any tree.
    let db = crate::store_sled::reopening(|| sled::open(dir.path()));
    let mut left = Vec::new();
    for name in db.tree_names() {
        let tree = db.open_tree(&name).expect("tree");
        for kv in tree.iter() {
            let (k, _) = kv.expect("key");
            left.push(k.escape_ascii().to_string());
        }
    }
    assert!(
        left.len() <= 4,
        "keys left after every session expired: {} (first: {:?})",
        left.len(),
        &left[..left.len().min(20)]
    );

    let n = rss.len();
    let third = (n / 3).max(1);
    let first = mean(&rss[..third.min(n)]);
    let last = mean(&rss[n.saturating_sub(third)..]);
    let submitted = submitted.load(Ordering::Relaxed);
    println!(
        "SOAK_RESULT {}",
        json!({
            "secs": secs,
            "submitted": submitted,
            "sessions_per_sec": submitted as f64 / secs.max(1) as f64,
            "max_sessions_in_store": totals.iter().max(),
            "rss_kib_first_third": first,
            "rss_kib_last_third": last,
            "rss_kib_max": rss.iter().max(),
            "active_sessions_checked": stuck_checks,
            "keys_left": left.len(),
        })
    );
    assert!(submitted > 0, "nothing was submitted");
    // Generous: allocator and sled cache noise, but not growth with the sessions submitted.
    assert!(
        last <= first * 1.5 + 32.0 * 1024.0,
        "memory grew: {first:.0} KiB in the first third, {last:.0} KiB in the last ({rss:?})"
    );
    let max_total = totals.iter().copied().max().unwrap_or(0);
    assert!(
        max_total <= MAX_PENDING + 20 + 5000,
        "the store held {max_total} sessions at once: {totals:?}"
    );
}
