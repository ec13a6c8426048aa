//! `harvest bench queue`: durable submit → claim → complete of no-op sessions.
//!
//! With `--store postgres --database-url URL`, phases 2 and 3 also run on PostgreSQL, in a fresh
//! schema dropped afterwards, and the result holds both backends' figures from the same run
//! (PostgreSQL's at the top level, sled's under `"sled"`).
//!
//! Phases, each on a fresh store (a temporary directory, or a fresh schema):
//! 1. naive: 16 threads each doing sled `insert` + `flush` per write, and the same plus an
//!    `fdatasync` of sled's log per write — the durability harvest acknowledges with
//!    (`naive_fdatasync_per_sec`, the baseline the group commit must beat); on PostgreSQL, 16
//!    connections each committing one INSERT per write;
//! 2. submit: 16 concurrent submitters, each waiting for its own durable acknowledgment (every
//!    submission carries the same config, so after the first its check is remembered, as for
//!    an agent's runs: see `service::validation::Passed`); `submit_cpu_us_per_session` is this
//!    process's CPU time (every thread) over the phase per submission;
//! 3. end to end: the same submitters with workers claiming and completing the sessions; latency
//!    is submit → COMPLETED per session. The submitters do not wait for the workers, so when
//!    they outpace them a backlog builds and this latency is mostly queueing: see 3b;
//!    3b. paced: then, on the same store, `--paced` sessions submitted open loop at half the
//!    end-to-end rate just measured (each at its scheduled time, whatever the others are
//!    doing); latency submit → COMPLETED at that load (`paced_latency_*`). `paced_per_sec` is
//!    that offered rate, not a measured one: the phase measures latency at a known load;
//! 4. idle latency: one session at a time into an idle queue, submit → `started`;
//! 5. burn down: `--burn` sessions submitted in batches of 1000 (`submit_many`) with no worker
//!    running, then the workers started, claiming `--prefetch` sessions ahead of their free
//!    slots: `burn_per_sec` is sessions / time until the last COMPLETED, and
//!    `burn_cpu_us_per_session` this process's CPU time (every thread) over the same span per
//!    session: on a shared machine whose speed changes from run to run, the CPU a session costs
//!    moves less than the rate (on PostgreSQL it leaves out the server's);
//!    5b. the same-run baseline of the burn-down: as many sessions burned down through the
//!    store's own calls, without the worker runtime (no attempts, jobs, events or leases kept):
//!    4 tasks each claiming 256 and finishing them as one batch, until none is left
//!    (`store_burn_per_sec`, and `store_burn_cpu_us_per_session` as above). It is the ceiling
//!    the runtime works under on this store and this machine in this run; `burn_vs_store` is
//!    the ratio.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use harvest::config::Config;
use harvest::event::EventKind;
use harvest::job::NoopJob;
use harvest::service::{Harvest, SubmitRequest};
use harvest::session::SessionId;

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
    /// Sessions of the burn-down phase (submitted in batches, then run); 0 skips it.
    #[arg(long, default_value_t = 50_000)]
    pub burn: usize,
    /// Sessions each worker process claims ahead of its free slots in the burn-down phase
    /// (`workers.prefetch`; the other phases use the default, 0).
    #[arg(long, default_value_t = 256)]
    pub prefetch: usize,
    /// Sessions of the idle-latency phase (one at a time); 0 skips it.
    #[arg(long, default_value_t = 200)]
    pub idle: usize,
    /// Sessions of the paced phase (submitted at half the end-to-end rate); 0 skips it.
    #[arg(long, default_value_t = 2_000)]
    pub paced: usize,
    /// Print only the JSON object (no progress on stderr).
    #[arg(long)]
    pub json: bool,
    /// Backend to measure (`postgres` also measures sled, for comparison).
    #[arg(long, value_enum, default_value_t = BenchStore::Sled)]
    pub store: BenchStore,
    /// PostgreSQL URL for `--store postgres` (a fresh schema is created and dropped).
    #[arg(long, env = "HARVEST_DATABASE_URL")]
    pub database_url: Option<String>,
}

/// Which backend `harvest bench queue` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchStore {
    /// Embedded sled in a temporary directory.
    Sled,
    /// PostgreSQL at `--database-url`, in a fresh schema.
    Postgres,
}

/// Where one measurement's store lives, and how to remove it afterwards.
enum Backend<'a> {
    Sled,
    Postgres(&'a str),
}

/// Keeps a measurement's data: a temporary directory, or a schema dropped by [`Place::remove`].
struct Place {
    _dir: tempfile::TempDir,
    schema: Option<(String, String)>,
}

impl Place {
    async fn remove(self) -> anyhow::Result<()> {
        if let Some((url, schema)) = self.schema {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            let conn = tokio::spawn(conn);
            client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                .await?;
            drop(client);
            let _ = conn.await;
        }
        Ok(())
    }
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
    let naive = naive_baseline(args.naive_writes, 16, false)?;
    say(args, &format!("naive: {naive:.0} writes/s"));
    let naive_sync = naive_baseline(args.naive_writes, 16, true)?;
    say(
        args,
        &format!("naive with fdatasync: {naive_sync:.0} writes/s"),
    );

    let mut sled = phases(args, Backend::Sled).await?;
    sled["naive_insert_flush_per_sec"] = json!(naive.round());
    sled["naive_fdatasync_per_sec"] = json!(naive_sync.round());
    if let Some(submit) = sled["submit_per_sec"].as_f64() {
        sled["submit_vs_naive"] = json!((submit / naive * 100.0).round() / 100.0);
        sled["submit_vs_naive_fdatasync"] = json!((submit / naive_sync * 100.0).round() / 100.0);
    }
    let mut out = match args.store {
        BenchStore::Sled => sled,
        BenchStore::Postgres => {
            let url = args.database_url.as_deref().ok_or_else(|| {
                anyhow::anyhow!("--store postgres needs --database-url (or HARVEST_DATABASE_URL)")
            })?;
            let mut pg = phases(args, Backend::Postgres(url)).await?;
            say(
                args,
                "naive PostgreSQL: one INSERT committed per write, 16 connections",
            );
            let naive_pg = naive_postgres(url, args.naive_writes, 16).await?;
            say(args, &format!("naive PostgreSQL: {naive_pg:.0} writes/s"));
            pg["naive_fdatasync_per_sec"] = json!(naive_pg.round());
            if let Some(submit) = pg["submit_per_sec"].as_f64() {
                pg["submit_vs_naive_fdatasync"] =
                    json!((submit / naive_pg * 100.0).round() / 100.0);
            }
            pg["sled"] = sled;
            pg
        }
    };
    out["peak_rss_mb"] = json!(super::peak_rss_mb().round());
    Ok(out)
}

/// Phases 2 and 3 on one backend.
async fn phases(args: &QueueBenchArgs, backend: Backend<'_>) -> anyhow::Result<serde_json::Value> {
    let name = match backend {
        Backend::Sled => "sled",
        Backend::Postgres(_) => "postgres",
    };
    say(args, &format!("phase 2/3 ({name}): durable submissions"));
    let (submit_per_sec, submit_cpu, submit_lat) = {
        let (harvest, place) = open(&backend, 0, 0).await?;
        let t0 = Instant::now();
        let cpu0 = super::process_cpu_secs();
        let lats = submit_all(&harvest, args.sessions, args.submitters, None).await?;
        let cpu = super::process_cpu_secs() - cpu0;
        let secs = t0.elapsed().as_secs_f64();
        harvest.shutdown(Duration::from_secs(1)).await?;
        place.remove().await?;
        (
            args.sessions as f64 / secs,
            cpu * 1e6 / args.sessions as f64,
            lats,
        )
    };
    say(args, &format!("submit: {submit_per_sec:.0}/s"));

    say(
        args,
        &format!("phase 3/3 ({name}): submit → claim → complete"),
    );
    let (harvest, place) = open(&backend, args.workers, 0).await?;
    let submitted: Arc<Mutex<HashMap<SessionId, Instant>>> = Arc::default();
    let collector = completions(&harvest, submitted.clone(), args.sessions);
    harvest.start();
    let t0 = Instant::now();
    submit_all(&harvest, args.sessions, args.submitters, Some(submitted)).await?;
    let (mut lats, last, lagged) = collector.await?;
    let e2e_secs = (last - t0).as_secs_f64();
    lats.sort();
    let mut submit_lat = submit_lat;
    submit_lat.sort();
    let sessions_per_sec = args.sessions as f64 / e2e_secs;
    say(args, &format!("end to end: {sessions_per_sec:.0}/s"));
    let paced_rate = sessions_per_sec / 2.0;
    let paced = if args.paced > 0 {
        say(
            args,
            &format!(
                "phase 3b ({name}): {} sessions at {paced_rate:.0}/s, half the end-to-end rate",
                args.paced
            ),
        );
        let mut lats = paced_run(&harvest, args.paced, paced_rate).await?;
        lats.sort();
        Some(lats)
    } else {
        None
    };
    harvest.shutdown(Duration::from_secs(5)).await?;
    place.remove().await?;

    let idle = idle_latency(args, &backend).await?;
    let burn = burn_down(args, &backend).await?;
    Ok(json!({
        "bench": "queue",
        "backend": name,
        "sessions": args.sessions,
        "submitters": args.submitters,
        "workers": args.workers,
        "submit_per_sec": submit_per_sec.round(),
        "submit_cpu_us_per_session": (submit_cpu * 10.0).round() / 10.0,
        "submit_latency_p50_ms": super::quantile_ms(&submit_lat, 0.5),
        "submit_latency_p99_ms": super::quantile_ms(&submit_lat, 0.99),
        "sessions_per_sec": sessions_per_sec.round(),
        "latency_p50_ms": super::quantile_ms(&lats, 0.5),
        "latency_p99_ms": super::quantile_ms(&lats, 0.99),
        "events_lagged": lagged,
        "paced_per_sec": paced.as_ref().map(|_| paced_rate.round()),
        "paced_latency_p50_ms": paced.as_ref().map(|l| super::quantile_ms(l, 0.5)),
        "paced_latency_p99_ms": paced.as_ref().map(|l| super::quantile_ms(l, 0.99)),
        "idle_latency_p50_ms": idle.as_ref().map(|l| super::quantile_ms(l, 0.5)),
        "idle_latency_p99_ms": idle.as_ref().map(|l| super::quantile_ms(l, 0.99)),
        "burn_sessions": args.burn,
        "batch_submit_per_sec": burn.map(|b| b.submit_per_sec.round()),
        "burn_per_sec": burn.map(|b| b.per_sec.round()),
        "burn_cpu_us_per_session": burn.map(|b| (b.cpu_us_per_session * 10.0).round() / 10.0),
        "store_burn_per_sec": burn.map(|b| b.store.per_sec.round()),
        "store_burn_cpu_us_per_session": burn
            .map(|b| (b.store.cpu_us_per_session * 10.0).round() / 10.0),
        "burn_vs_store": burn.map(|b| (b.per_sec / b.store.per_sec * 100.0).round() / 100.0),
        "burn_prefetch": args.prefetch,
    }))
}

/// Collects the latency submit → COMPLETED of `total` sessions whose submission instants
/// `submitted` holds (subscribed before the first submission): the latencies, when the last
/// completed, and how many events the subscription lost. Gives up after 600 s.
fn completions(
    harvest: &Harvest,
    submitted: Arc<Mutex<HashMap<SessionId, Instant>>>,
    total: usize,
) -> impl std::future::Future<Output = anyhow::Result<(Vec<Duration>, Instant, u64)>> + use<> {
    let mut events = harvest.subscribe();
    let collector = tokio::spawn(async move {
        let mut lats = Vec::with_capacity(total);
        let mut last = Instant::now();
        let mut lagged = 0u64;
        while lats.len() + (lagged as usize) < total {
            match events.recv().await {
                Ok(e) if e.kind == EventKind::Completed => {
                    let at = Instant::now();
                    let start = submitted
                        .lock()
                        .ok()
                        .and_then(|m| m.get(&e.session_id).copied());
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
    async move {
        tokio::time::timeout(Duration::from_secs(600), collector)
            .await
            .map_err(|_| anyhow::anyhow!("sessions did not complete within 600 s"))?
            .map_err(anyhow::Error::from)
    }
}

/// Phase 3b: `total` sessions submitted open loop at `rate` per second (each at its scheduled
/// instant, in a task of its own, so a slow submission delays no other) into a running
/// harvest; their latencies submit → COMPLETED.
async fn paced_run(harvest: &Harvest, total: usize, rate: f64) -> anyhow::Result<Vec<Duration>> {
    let submitted: Arc<Mutex<HashMap<SessionId, Instant>>> = Arc::default();
    let collector = completions(harvest, submitted.clone(), total);
    let every = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let t0 = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        tokio::time::sleep_until(t0 + every.mul_f64(i as f64)).await;
        let harvest = harvest.clone();
        let submitted = submitted.clone();
        tasks.spawn(async move { submit_noop(&harvest, Some(&submitted)).await });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(collector.await?.0)
}

/// Phase 4: one session at a time into an idle queue (workers waiting), submit → `started`.
async fn idle_latency(
    args: &QueueBenchArgs,
    backend: &Backend<'_>,
) -> anyhow::Result<Option<Vec<Duration>>> {
    if args.idle == 0 {
        return Ok(None);
    }
    say(args, "idle queue: submit → started, one at a time");
    let (harvest, place) = open(backend, 4, 0).await?;
    harvest.start();
    let mut events = harvest.subscribe();
    // Let the workers reach their idle wait.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut lats = Vec::with_capacity(args.idle);
    for _ in 0..args.idle {
        let (id, t) = submit_noop(&harvest, None).await?;
        let started = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match events.recv().await {
                    Ok(e) if e.kind == EventKind::Started && e.session_id == id => {
                        return Ok(Instant::now());
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(e) => return Err(anyhow::anyhow!("events closed: {e}")),
                }
            }
        })
        .await
        .map_err(|_| anyhow::anyhow!("an idle-queue session did not start within 10 s"))??;
        lats.push(started - t);
        // Back to idle: the session completes at once (no-op job).
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    harvest.shutdown(Duration::from_secs(5)).await?;
    place.remove().await?;
    lats.sort();
    Ok(Some(lats))
}

/// What phase 5 measured.
#[derive(Clone, Copy)]
struct Burn {
    /// Batch submits per second.
    submit_per_sec: f64,
    /// Sessions burned down per second.
    per_sec: f64,
    /// This process's CPU time during the burn-down, per session, in microseconds.
    cpu_us_per_session: f64,
    /// The same-run baseline: the store's calls alone (phase 5b).
    store: StoreBurn,
}

/// Phase 5: `--burn` sessions submitted in batches with no worker running, then burned down by
/// `--workers` worker slots.
async fn burn_down(args: &QueueBenchArgs, backend: &Backend<'_>) -> anyhow::Result<Option<Burn>> {
    if args.burn == 0 {
        return Ok(None);
    }
    say(
        args,
        &format!("burn down: {} sessions in batches of 1000", args.burn),
    );
    let (harvest, place) = open(backend, args.workers, args.prefetch).await?;
    let t0 = Instant::now();
    submit_batches(&harvest, args.burn).await?;
    let submit_secs = t0.elapsed().as_secs_f64();
    say(
        args,
        &format!("batch submit: {:.0}/s", args.burn as f64 / submit_secs),
    );
    let cpu0 = super::process_cpu_secs();
    let t1 = Instant::now();
    harvest.start();
    let deadline = t1 + Duration::from_secs(600);
    // Done when no session is PENDING or RUNNING: two one-row index reads per poll. Counting
    // by status instead (`session_counts`) is a scan of every session on PostgreSQL, about
    // 11 ms for 50,000 rows, and polling it every 20 ms took a sixth of this machine's CPU
    // away from the queue being measured.
    while !burned(&harvest).await? {
        anyhow::ensure!(
            Instant::now() < deadline,
            "burn down: not all of {} sessions ended in 600 s",
            args.burn
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let burn_secs = t1.elapsed().as_secs_f64();
    let burn_cpu = super::process_cpu_secs() - cpu0;
    let done = harvest
        .store()
        .session_counts(harvest.clock().now())
        .await?
        .by_status
        .get(&harvest::session::SessionStatus::Completed)
        .copied()
        .unwrap_or(0);
    anyhow::ensure!(
        done as usize == args.burn,
        "burn down: {done} of {} sessions completed",
        args.burn
    );
    let burn = args.burn as f64 / burn_secs;
    // Said before the shutdown and the removal of the bench's sessions, so that the line's time
    // ends the phase in a profile of it (as the store-alone phase's own lines do).
    say(args, &format!("burn down: {burn:.0}/s"));
    harvest.shutdown(Duration::from_secs(5)).await?;
    place.remove().await?;
    let store = store_burn(args, backend).await?;
    say(
        args,
        &format!(
            "store alone: {:.0}/s (the runtime at {:.2}×)",
            store.per_sec,
            burn / store.per_sec
        ),
    );
    Ok(Some(Burn {
        submit_per_sec: args.burn as f64 / submit_secs,
        per_sec: burn,
        cpu_us_per_session: burn_cpu * 1e6 / args.burn as f64,
        store,
    }))
}

/// Submits `total` no-op sessions in batches of [`harvest::service::MAX_BATCH`] from 4 tasks.
async fn submit_batches(harvest: &Harvest, total: usize) -> anyhow::Result<()> {
    let per_task = total.div_ceil(4);
    let mut batches = Vec::new();
    for task in 0..4 {
        let harvest = harvest.clone();
        let n = per_task.min(total.saturating_sub(task * per_task));
        batches.push(tokio::spawn(async move {
            let mut left = n;
            while left > 0 {
                let k = left.min(harvest::service::MAX_BATCH);
                let reqs = (0..k)
                    .map(|_| SubmitRequest::new(json!({"name": "noop"})))
                    .collect();
                for r in harvest.submit_many(reqs).await? {
                    r?;
                }
                left -= k;
            }
            anyhow::Ok(())
        }));
    }
    for b in batches {
        b.await??;
    }
    Ok(())
}

/// Phase 5b: `--burn` sessions submitted as in phase 5, then burned down by 4 tasks calling the
/// store directly: claim 256, finish them COMPLETED in one `session_finish_many`, until a claim
/// comes back empty. Sessions per second over the burn-down.
async fn store_burn(args: &QueueBenchArgs, backend: &Backend<'_>) -> anyhow::Result<StoreBurn> {
    const CLAIM: usize = 256;
    const TASKS: usize = 4;
    let (harvest, place) = open(backend, 0, 0).await?;
    submit_batches(&harvest, args.burn).await?;
    say(args, "store alone: burning down");
    let cpu0 = super::process_cpu_secs();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let harvest = harvest.clone();
        tasks.push(tokio::spawn(async move {
            let store = harvest.store();
            let mut done = 0usize;
            for round in 0u64.. {
                let now = harvest.clock().now();
                let owner = format!("bench-{task}-{round}");
                let claimed = store
                    .session_claim(harvest::store::SessionClaim {
                        owner: owner.clone(),
                        limit: CLAIM,
                        lease: Duration::from_secs(600),
                        now,
                    })
                    .await?;
                if claimed.is_empty() {
                    break;
                }
                let finishes: Vec<_> = claimed
                    .iter()
                    .map(|s| harvest::store::SessionFinish {
                        attempt: harvest::store::AttemptRef {
                            id: s.key(),
                            attempt: s.attempt,
                            owner: owner.clone(),
                        },
                        status: harvest::session::SessionStatus::Completed,
                        error: None,
                        batch: Default::default(),
                        cleanup_after: Duration::from_secs(3600),
                        now,
                    })
                    .collect();
                for r in store.session_finish_many(&finishes).await? {
                    anyhow::ensure!(
                        r?.is_some(),
                        "store burn-down: a claimed session did not finish"
                    );
                    done += 1;
                }
            }
            anyhow::Ok(done)
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = super::process_cpu_secs() - cpu0;
    say(args, "store alone: burnt down");
    anyhow::ensure!(
        done == args.burn,
        "store burn-down: {done} of {} sessions completed",
        args.burn
    );
    harvest.shutdown(Duration::from_secs(5)).await?;
    place.remove().await?;
    Ok(StoreBurn {
        per_sec: args.burn as f64 / secs,
        cpu_us_per_session: cpu * 1e6 / args.burn as f64,
    })
}

/// What phase 5b measured.
#[derive(Clone, Copy)]
struct StoreBurn {
    /// Sessions burned down per second through the store's calls alone.
    per_sec: f64,
    /// This process's CPU time over that burn-down, per session, in microseconds.
    cpu_us_per_session: f64,
}

/// Whether no session is left PENDING or RUNNING.
async fn burned(harvest: &Harvest) -> anyhow::Result<bool> {
    for status in [
        harvest::session::SessionStatus::Pending,
        harvest::session::SessionStatus::Running,
    ] {
        let page = harvest
            .store()
            .session_list(harvest::store::SessionList {
                client_id: None,
                status: Some(status),
                agent: None,
                limit: 1,
                cursor: None,
            })
            .await?;
        if !page.sessions.is_empty() {
            return Ok(false);
        }
    }
    Ok(true)
}

async fn open(
    backend: &Backend<'_>,
    workers: usize,
    prefetch: usize,
) -> anyhow::Result<(Harvest, Place)> {
    let dir = tempfile::tempdir()?;
    let mut cfg = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    let mut place = Place {
        _dir: dir,
        schema: None,
    };
    if let Backend::Postgres(url) = backend {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let schema = format!("harvest_bench_{}_{nanos}", std::process::id());
        cfg.store = harvest::config::StoreKind::Postgres;
        cfg.database_url = Some(url.to_string());
        cfg.database_schema = schema.clone();
        place.schema = Some((url.to_string(), schema));
    }
    cfg.workers.concurrency = workers;
    cfg.workers.prefetch = prefetch;
    cfg.workers.poll_interval_ms = 100;
    match Harvest::builder(cfg).job(Arc::new(NoopJob)).open().await {
        Ok(h) => Ok((h, place)),
        Err(e) => {
            let _ = place.remove().await;
            Err(e.into())
        }
    }
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
                let (_, t) = submit_noop(&harvest, record.as_deref()).await?;
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

/// Submits one no-op session, its submission instant noted in `record`; once it is
/// acknowledged, its id and that instant.
async fn submit_noop(
    harvest: &Harvest,
    record: Option<&Mutex<HashMap<SessionId, Instant>>>,
) -> anyhow::Result<(SessionId, Instant)> {
    let id = SessionId::generate();
    let t = Instant::now();
    if let Some(Ok(mut m)) = record.map(|r| r.lock()) {
        m.insert(id.clone(), t);
    }
    harvest
        .submit(SubmitRequest::new(json!({"name": "noop"})).session_id(id.clone()))
        .await?;
    Ok((id, t))
}

/// 16 threads each inserting and flushing per write into one sled db: what a store without group
/// commit would do. With `fdatasync`, each write also syncs sled's log file, as harvest's flusher
/// does (sled's own flush does not make the file's size durable): the same durability as an
/// acknowledged submit.
fn naive_baseline(writes: usize, threads: usize, fdatasync: bool) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let db = sled::open(dir.path())?;
    let log = std::fs::File::open(dir.path().join("db"))?;
    let log = &log;
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
                    if fdatasync {
                        log.sync_data()?;
                    }
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

/// PostgreSQL's equal-durability naive loop: `threads` connections each committing one
/// ~300-byte INSERT per write (a commit waits for its WAL flush, as an acknowledged submit
/// does), in a fresh schema dropped afterwards.
async fn naive_postgres(url: &str, writes: usize, threads: usize) -> anyhow::Result<f64> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let schema = format!("harvest_bench_naive_{}_{nanos}", std::process::id());
    let place = Place {
        _dir: tempfile::tempdir()?,
        schema: Some((url.to_string(), schema.clone())),
    };
    let (admin, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let conn = tokio::spawn(conn);
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA {schema}; CREATE TABLE {schema}.t (k text PRIMARY KEY, v text NOT NULL)"
        ))
        .await?;
    drop(admin);
    let _ = conn.await;
    let per = (writes / threads).max(1);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..threads {
        let (url, schema) = (url.to_string(), schema.clone());
        tasks.push(tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            let conn = tokio::spawn(conn);
            let stmt = client
                .prepare(&format!("INSERT INTO {schema}.t (k, v) VALUES ($1, $2)"))
                .await?;
            let value = "x".repeat(300);
            for i in 0..per {
                client
                    .execute(&stmt, &[&format!("{t}/{i}"), &value])
                    .await?;
            }
            drop(client);
            let _ = conn.await;
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let rate = (per * threads) as f64 / t0.elapsed().as_secs_f64();
    place.remove().await?;
    Ok(rate)
}
