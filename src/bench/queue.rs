//! `harvest bench queue`: durable submit → claim → complete of no-op sessions.
//!
//! Three phases, each on a fresh store in a temporary directory:
//! 1. naive: 16 threads each doing sled `insert` + `flush` per write (the baseline group commit
//!    must beat);
//! 2. submit: 16 concurrent submitters, each waiting for its own durable acknowledgment;
//! 3. end to end: the same submitters with workers claiming and completing the sessions; latency
//!    is submit → COMPLETED per session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::config::Config;
use crate::event::EventKind;
use crate::job::NoopJob;
use crate::service::{Harvest, SubmitRequest};
use crate::session::SessionId;

/// Flags of `harvest bench queue`.
#[derive(Debug, Clone, clap::Args)]
pub struct QueueBenchArgs {
    /// Sessions per phase.
    #[arg(long, default_value_t = 50_000)]
    pub sessions: usize,
    /// Concurrent submitters.
    #[arg(long, default_value_t = 16)]
    pub submitters: usize,
    /// Worker slots in the end-to-end phase.
    #[arg(long, default_value_t = 64)]
    pub workers: usize,
    /// Writes in the naive baseline.
    #[arg(long, default_value_t = 5_000)]
    pub naive_writes: usize,
    /// Print only the JSON object (no progress on stderr).
    #[arg(long)]
    pub json: bool,
}

/// Runs the benchmark and prints its JSON object on stdout.
pub async fn main(args: QueueBenchArgs) -> anyhow::Result<()> {
    let out = run(&args).await?;
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

fn say(args: &QueueBenchArgs, msg: &str) {
    if !args.json {
        eprintln!("bench queue: {msg}");
    }
}

/// Runs all phases and returns the results.
pub async fn run(args: &QueueBenchArgs) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(
        args.sessions > 0 && args.submitters > 0,
        "sessions and submitters must be > 0"
    );
    say(
        args,
        "phase 1/3: naive sled insert + flush per write, 16 threads",
    );
    let naive = naive_baseline(args.naive_writes, 16)?;
    say(args, &format!("naive: {naive:.0} writes/s"));

    say(args, "phase 2/3: durable submissions");
    let (submit_per_sec, submit_lat) = {
        let dir = tempfile::tempdir()?;
        let harvest = open(dir.path(), 0).await?;
        let t0 = Instant::now();
        let lats = submit_all(&harvest, args.sessions, args.submitters, None).await?;
        let secs = t0.elapsed().as_secs_f64();
        harvest.shutdown(Duration::from_secs(1)).await?;
        (args.sessions as f64 / secs, lats)
    };
    say(args, &format!("submit: {submit_per_sec:.0}/s"));

    say(args, "phase 3/3: submit → claim → complete");
    let dir = tempfile::tempdir()?;
    let harvest = open(dir.path(), args.workers).await?;
    let submitted: Arc<Mutex<HashMap<SessionId, Instant>>> = Arc::default();
    let mut events = harvest.subscribe();
    let seen = submitted.clone();
    let total = args.sessions;
    let collector = tokio::spawn(async move {
        let mut lats = Vec::with_capacity(total);
        let mut last = Instant::now();
        let mut lagged = 0u64;
        while lats.len() + (lagged as usize) < total {
            match events.recv().await {
                Ok(e) if e.kind == EventKind::Completed => {
                    let at = Instant::now();
                    let start = seen.lock().ok().and_then(|m| m.get(&e.session_id).copied());
                    if let Some(s) = start {
                        lats.push(at - s);
                    }
                    last = at;
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => lagged += n,
                Err(_) => break,
            }
        }
        (lats, last, lagged)
    });
    harvest.start();
    let t0 = Instant::now();
    submit_all(&harvest, args.sessions, args.submitters, Some(submitted)).await?;
    let (mut lats, last, lagged) = tokio::time::timeout(Duration::from_secs(600), collector)
        .await
        .map_err(|_| anyhow::anyhow!("sessions did not complete within 600 s"))??;
    let e2e_secs = (last - t0).as_secs_f64();
    harvest.shutdown(Duration::from_secs(5)).await?;
    lats.sort();
    let mut submit_lat = submit_lat;
    submit_lat.sort();
    let sessions_per_sec = args.sessions as f64 / e2e_secs;
    say(args, &format!("end to end: {sessions_per_sec:.0}/s"));
    Ok(json!({
        "bench": "queue",
        "backend": "sled",
        "sessions": args.sessions,
        "submitters": args.submitters,
        "workers": args.workers,
        "submit_per_sec": submit_per_sec.round(),
        "submit_latency_p50_ms": super::quantile_ms(&submit_lat, 0.5),
        "submit_latency_p99_ms": super::quantile_ms(&submit_lat, 0.99),
        "sessions_per_sec": sessions_per_sec.round(),
        "latency_p50_ms": super::quantile_ms(&lats, 0.5),
        "latency_p99_ms": super::quantile_ms(&lats, 0.99),
        "events_lagged": lagged,
        "naive_insert_flush_per_sec": naive.round(),
        "submit_vs_naive": (submit_per_sec / naive * 100.0).round() / 100.0,
        "peak_rss_mb": super::peak_rss_mb().round(),
    }))
}

async fn open(dir: &std::path::Path, workers: usize) -> anyhow::Result<Harvest> {
    let mut cfg = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    cfg.workers.concurrency = workers;
    cfg.workers.poll_interval_ms = 100;
    Ok(Harvest::builder(cfg).job(Arc::new(NoopJob)).open().await?)
}

async fn submit_all(
    harvest: &Harvest,
    total: usize,
    submitters: usize,
    record: Option<Arc<Mutex<HashMap<SessionId, Instant>>>>,
) -> anyhow::Result<Vec<Duration>> {
    let mut tasks = Vec::new();
    for i in 0..submitters {
        let n = total / submitters + usize::from(i < total % submitters);
        let harvest = harvest.clone();
        let record = record.clone();
        tasks.push(tokio::spawn(async move {
            let mut lats = Vec::with_capacity(n);
            for _ in 0..n {
                let id = SessionId::generate();
                let t = Instant::now();
                if let Some(Ok(mut m)) = record.as_ref().map(|r| r.lock()) {
                    m.insert(id.clone(), t);
                }
                harvest
                    .submit(SubmitRequest::new(json!({"name": "noop"})).session_id(id))
                    .await?;
                lats.push(t.elapsed());
            }
            anyhow::Ok(lats)
        }));
    }
    let mut all = Vec::with_capacity(total);
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

/// 16 threads each inserting and flushing per write into one sled db: what a store without group
/// commit would do.
fn naive_baseline(writes: usize, threads: usize) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let db = sled::open(dir.path())?;
    let t0 = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let mut hs = Vec::new();
        for t in 0..threads {
            let db = db.clone();
            hs.push(s.spawn(move || -> anyhow::Result<()> {
                let value = vec![7u8; 300];
                for i in 0..writes / threads {
                    db.insert(format!("{t}/{i}"), value.as_slice())?;
                    db.flush()?;
                }
                Ok(())
            }));
        }
        for h in hs {
            h.join()
                .map_err(|_| anyhow::anyhow!("naive writer panicked"))??;
        }
        Ok(())
    })?;
    Ok((writes / threads * threads) as f64 / t0.elapsed().as_secs_f64())
}
