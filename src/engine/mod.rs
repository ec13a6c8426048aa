//! The scraper engine: the [`Job`] every session runs (DESIGN §4).
//!
//! A config (TOML or JSON, see [`config`]) is compiled once per attempt; the crawl fetches
//! politely ([`fetch`]), decodes and extracts ([`extract`]) and hands its progress to a
//! [`CheckpointSink`] in bounded batches ([`crawl`]). The engine never touches the store: the
//! worker's sink commits under the lease, `harvest run`'s sink ([`run_local`]) prints JSON lines.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::job::{
    CheckpointSink, CrawlState, Job, JobContext, JobOutcome, LeaseLost, Retry, StopSignal,
};
use crate::session::{LogLine, SessionError, TokenUsage};
use crate::store::{CheckpointBatch, ResumeState};

pub mod canon;
pub mod config;
pub mod crawl;
pub mod extract;
pub mod fetch;
pub mod guard;
pub mod state;

pub use config::{CompiledConfig, ConfigError, ScraperConfig, compile, parse_config_text};
pub use crawl::BatchPolicy;
pub use guard::{GuardConfigError, GuardRefused, NetGuard};
pub use state::MemoryCrawlState;

/// How the engine runs, independent of any one config.
#[derive(Debug, Clone, Default)]
pub struct EngineSettings {
    /// The request-forgery guard; `None` lets sessions fetch any address (single-tenant use).
    pub guard: Option<NetGuard>,
    /// When batches are committed.
    pub batch: BatchPolicy,
}

/// Errors of a local run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The config does not validate.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The HTTP client could not be built (TLS roots, resolver).
    #[error("cannot start the HTTP client: {0}")]
    Client(String),
    /// Records could not be written (e.g. stdout closed).
    #[error("cannot write records: {0}")]
    Output(std::io::Error),
    /// The `--resume` directory's store failed or holds something else.
    #[error("resume store: {0}")]
    Store(String),
}

/// The scraper as a [`Job`].
#[derive(Debug, Clone, Default)]
pub struct ScrapeJob {
    settings: EngineSettings,
}

impl ScrapeJob {
    /// A scraper with these settings.
    pub fn new(settings: EngineSettings) -> ScrapeJob {
        ScrapeJob { settings }
    }

    /// Runs one crawl of an already compiled config (what [`Job::run`] and [`run_local`] do).
    pub async fn crawl(
        &self,
        cfg: Arc<CompiledConfig>,
        resume: ResumeState,
        state: Arc<dyn CrawlState>,
        sink: Arc<dyn CheckpointSink>,
        stop: StopSignal,
    ) -> JobOutcome {
        let fetcher = match fetch::Fetcher::new(&cfg.http, self.settings.guard.clone()) {
            Ok(f) => Arc::new(f),
            Err(e) => {
                return JobOutcome::Failed {
                    error: SessionError::new(
                        "http_client",
                        format!("cannot start the HTTP client: {e}"),
                    ),
                    retry: Retry::Backoff,
                    batch: CheckpointBatch::default(),
                };
            }
        };
        crawl::crawl(cfg, fetcher, resume, state, sink, stop, self.settings.batch).await
    }
}

#[async_trait]
impl Job for ScrapeJob {
    fn validate(
        &self,
        config: &serde_json::Value,
        params: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        compile(config, params)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn run(&self, ctx: JobContext) -> JobOutcome {
        let cfg = match compile(&ctx.session.job.config, &ctx.session.job.params) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                return JobOutcome::Failed {
                    error: SessionError::new("invalid_config", e.to_string()),
                    retry: Retry::Never,
                    batch: CheckpointBatch::default(),
                };
            }
        };
        self.crawl(cfg, ctx.resume, ctx.state, ctx.sink, ctx.stop)
            .await
    }
}

/// Progress of a local run, given to a [`Progress::Callback`] after every batch.
#[derive(Debug, Clone, Default)]
pub struct RunProgress {
    /// Pages fetched so far.
    pub pages: u64,
    /// Records written so far.
    pub records: u64,
    /// Usage so far.
    pub usage: TokenUsage,
    /// The log lines of the latest batch.
    pub log: Vec<LogLine>,
}

/// How a local run reports progress.
#[derive(Clone, Default)]
pub enum Progress {
    /// Nothing.
    #[default]
    Silent,
    /// An indicatif spinner on stderr when stderr is a terminal, warnings and errors printed
    /// above it; when stderr is not a terminal, only the warnings and errors.
    Stderr,
    /// Called after every batch.
    Callback(Arc<dyn Fn(&RunProgress) + Send + Sync>),
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Progress::Silent => "Silent",
            Progress::Stderr => "Stderr",
            Progress::Callback(_) => "Callback",
        })
    }
}

/// What a local run did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The config's name.
    pub name: String,
    /// `completed`, `stopped` or `failed`.
    pub status: &'static str,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// Pages fetched.
    pub pages: u64,
    /// Records written.
    pub records: u64,
    /// Usage.
    pub usage: TokenUsage,
    /// Wall time.
    pub seconds: f64,
}

impl std::fmt::Display for RunSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let u = &self.usage;
        write!(
            f,
            "{}: {} — {} pages, {} records in {:.2} s ({:.0} pages/s); {} requests, {} errors, {} retries, {} blocked by robots.txt, {} bytes",
            self.name,
            self.status,
            self.pages,
            self.records,
            self.seconds,
            self.pages as f64 / self.seconds.max(1e-9),
            u.http_requests,
            u.http_errors,
            u.retries,
            u.robots_blocked,
            u.bytes_received,
        )?;
        if let Some(e) = &self.error {
            write!(f, "; error: {e}")?;
        }
        Ok(())
    }
}

struct LocalState {
    out: std::io::BufWriter<Box<dyn Write + Send>>,
    progress: RunProgress,
    write_error: Option<std::io::Error>,
    bar: Option<indicatif::ProgressBar>,
}

/// Where a local run commits before its records are written out.
enum LocalTarget {
    /// In memory: nothing survives the process.
    Memory(Arc<MemoryCrawlState>),
    /// A session in a local sled store (`--resume DIR`).
    Store {
        store: Arc<dyn crate::store::Store>,
        attempt: crate::store::AttemptRef,
    },
}

/// A lease no local run outlives: nothing else ever reclaims a `--resume` directory's session
/// while the process holds the directory (sled locks it).
const LOCAL_LEASE: Duration = Duration::from_secs(10 * 365 * 86400);

/// `harvest run`'s sink: commits (in memory, or to the `--resume` store), then writes the
/// committed records as JSON lines and reports progress.
struct LocalSink {
    state: Mutex<LocalState>,
    mode: Progress,
    target: LocalTarget,
}

impl LocalSink {
    /// Commits `batch` (with the final status when `finish` says so) to the target.
    async fn commit_to_target(
        &self,
        batch: &CheckpointBatch,
        finish: Option<crate::session::SessionStatus>,
        error: Option<SessionError>,
    ) -> Result<(), EngineError> {
        match &self.target {
            LocalTarget::Memory(m) => {
                m.apply(batch);
                Ok(())
            }
            LocalTarget::Store { store, attempt } => {
                let now = crate::session::Timestamp::now();
                let applied = match finish {
                    Some(status) => store
                        .session_finish_if_running(crate::store::SessionFinish {
                            attempt: attempt.clone(),
                            status,
                            error,
                            batch: batch.clone(),
                            cleanup_at: now.add(LOCAL_LEASE),
                            now,
                        })
                        .await
                        .map_err(|e| EngineError::Store(e.to_string()))?,
                    None if batch.is_empty() => true,
                    None => store
                        .checkpoint_commit_if_running(crate::store::CheckpointCommit {
                            attempt: attempt.clone(),
                            batch: batch.clone(),
                            lease: LOCAL_LEASE,
                            now,
                        })
                        .await
                        .map_err(|e| EngineError::Store(e.to_string()))?,
                };
                if applied {
                    Ok(())
                } else {
                    Err(EngineError::Store(
                        "the run's session in the resume directory changed under this run; \
                         is another harvest using the directory?"
                            .into(),
                    ))
                }
            }
        }
    }

    fn write(&self, batch: CheckpointBatch) -> Result<(), LeaseLost> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let st = &mut *st;
        for r in &batch.records {
            let res = serde_json::to_writer(&mut st.out, r)
                .map_err(std::io::Error::from)
                .and_then(|_| st.out.write_all(b"\n"));
            if let Err(e) = res {
                st.write_error = Some(e);
                // Nobody reads the records any more: stop the crawl.
                return Err(LeaseLost);
            }
        }
        if let Err(e) = st.out.flush() {
            st.write_error = Some(e);
            return Err(LeaseLost);
        }
        st.progress.pages += batch.pages;
        st.progress.records += batch.records.len() as u64;
        st.progress.usage += batch.usage;
        st.progress.log = batch.log;
        match &self.mode {
            Progress::Silent => {}
            Progress::Callback(cb) => cb(&st.progress),
            Progress::Stderr => {
                for l in st.progress.log.iter().filter(|l| l.level != "info") {
                    let line = format!("{}: {}", l.level, l.message);
                    match &st.bar {
                        Some(bar) => bar.println(line),
                        None => eprintln!("{line}"),
                    }
                }
                if let Some(bar) = &st.bar {
                    bar.set_message(format!(
                        "{} pages, {} records, {} errors",
                        st.progress.pages, st.progress.records, st.progress.usage.http_errors
                    ));
                    bar.tick();
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl CheckpointSink for LocalSink {
    async fn commit(&self, batch: CheckpointBatch) -> Result<(), LeaseLost> {
        // Committed first, written second: a record is on stdout only once it can never be
        // produced again by a resumed run.
        if let Err(e) = self.commit_to_target(&batch, None, None).await {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.write_error = Some(std::io::Error::other(e.to_string()));
            return Err(LeaseLost);
        }
        self.write(batch)
    }
}

/// Runs one crawl locally (`harvest run CONFIG [--param k=v]`): records go to `out` as JSON
/// lines, progress as `progress` says, and the summary comes back (print it with `Display`).
///
/// `config` is the JSON form (use [`parse_config_text`] on a file's text); `params` override its
/// `[vars]`. A bad config is an `Err` before anything is fetched; per-page errors only show in the
/// summary and the progress log. Fire `stop` (e.g. on Ctrl-C) to end the crawl between steps.
/// Its frontier and seen set are kept in memory; see [`run_local_resumable`] for a run that
/// survives being stopped or killed.
pub async fn run_local(
    config: &serde_json::Value,
    params: &BTreeMap<String, String>,
    settings: EngineSettings,
    out: Box<dyn Write + Send>,
    progress: Progress,
    stop: StopSignal,
) -> Result<RunSummary, EngineError> {
    let cfg = Arc::new(compile(config, params)?);
    let mem = Arc::new(MemoryCrawlState::new());
    run_local_with(
        cfg,
        settings,
        out,
        progress,
        stop,
        LocalTarget::Memory(mem.clone()),
        mem,
        ResumeState::default(),
    )
    .await
}

/// The id of the one session a `--resume` directory holds.
const LOCAL_SESSION: &str = "local";

/// Like [`run_local`], but checkpoints into a sled store in `dir` (created if needed) and resumes
/// from it: run it again with the same config after Ctrl-C or a kill, and it continues where the
/// last checkpoint left off (`harvest run --resume DIR`).
///
/// Records are written to `out` right after the checkpoint holding them is committed, so a
/// resumed run writes only records no earlier run wrote, and across runs each record is written
/// once. The one exception is a kill in the instant between a commit and the write that follows
/// it: those records are in `dir` but were not written (at most one batch, ~100 ms of work). A
/// directory whose run completed writes nothing more; one holding another config is refused.
pub async fn run_local_resumable(
    config: &serde_json::Value,
    params: &BTreeMap<String, String>,
    settings: EngineSettings,
    out: Box<dyn Write + Send>,
    progress: Progress,
    stop: StopSignal,
    dir: &std::path::Path,
) -> Result<RunSummary, EngineError> {
    use crate::session::{JobSpec, Session, SessionId, SessionOptions, SessionStatus, Timestamp};
    use crate::store::{LeaseReclaim, SessionClaim, SessionInsert, Store};

    let cfg = Arc::new(compile(config, params)?);
    let store_err = |e: crate::store::StoreError| EngineError::Store(e.to_string());
    std::fs::create_dir_all(dir).map_err(|e| {
        EngineError::Store(format!(
            "cannot create the resume directory {}: {e}",
            dir.display()
        ))
    })?;
    let store: Arc<dyn Store> =
        Arc::new(crate::store::sled::SledStore::open(dir).map_err(store_err)?);
    let id = SessionId::parse(LOCAL_SESSION)
        .map_err(|e| EngineError::Store(format!("the local session id: {e}")))?;
    let now = Timestamp::now();
    match store.session_get(&id).await.map_err(store_err)? {
        None => {
            let session = Session::pending(
                id.clone(),
                crate::session::ClientContext::of("local"),
                JobSpec {
                    config: config.clone(),
                    params: params.clone(),
                    agent: None,
                },
                SessionOptions {
                    // Each run is an attempt; a local run is never given up on.
                    max_attempts: Some(u32::MAX),
                    ..SessionOptions::default()
                },
                now,
            );
            store
                .session_insert(SessionInsert {
                    session,
                    single_agent: None,
                })
                .await
                .map_err(store_err)?;
        }
        Some(s) if s.job.config != *config || s.job.params != *params => {
            let _ = store.close().await;
            return Err(EngineError::Store(format!(
                "{} holds a run of another config or other params; resume with the same ones, \
                 or use another directory",
                dir.display()
            )));
        }
        Some(s) if s.status.is_terminal() => {
            let _ = store.close().await;
            return Ok(RunSummary {
                name: cfg.name.clone(),
                status: "already completed",
                error: s.error.map(|e| e.message),
                pages: s.metrics.pages_processed,
                records: s.metrics.processed_elements,
                usage: s.usage,
                seconds: 0.0,
            });
        }
        Some(s) if s.status == SessionStatus::Running => {
            // Killed: its lease belongs to a process that is gone (sled locks the directory).
            store
                .leases_reclaim(LeaseReclaim {
                    expired_before: Timestamp(i64::MAX),
                    limit: 1,
                    backoff: Duration::ZERO,
                    cleanup_after: LOCAL_LEASE,
                    now,
                })
                .await
                .map_err(store_err)?;
        }
        Some(_) => {}
    }
    let claimed = store
        .session_claim(SessionClaim {
            owner: "harvest-run".into(),
            limit: 1,
            lease: LOCAL_LEASE,
            now: Timestamp(i64::MAX / 2),
        })
        .await
        .map_err(store_err)?;
    let Some(session) = claimed.into_iter().find(|s| s.id == id) else {
        let _ = store.close().await;
        return Err(EngineError::Store(format!(
            "the run in {} could not be resumed (it is not pending); remove the directory to \
             start over",
            dir.display()
        )));
    };
    let resume = store.resume_load(&id).await.map_err(store_err)?;
    let attempt = crate::store::AttemptRef {
        id: id.clone(),
        attempt: session.attempt,
        owner: "harvest-run".into(),
    };
    let state = Arc::new(crate::worker::StoreCrawlState::new(store.clone(), id));
    let result = run_local_with(
        cfg,
        settings,
        out,
        progress,
        stop,
        LocalTarget::Store {
            store: store.clone(),
            attempt,
        },
        state,
        resume,
    )
    .await;
    let closed = store.close().await.map_err(store_err);
    let summary = result?;
    closed?;
    Ok(summary)
}

#[allow(clippy::too_many_arguments)]
async fn run_local_with(
    cfg: Arc<CompiledConfig>,
    settings: EngineSettings,
    out: Box<dyn Write + Send>,
    progress: Progress,
    stop: StopSignal,
    target: LocalTarget,
    state: Arc<dyn CrawlState>,
    resume: ResumeState,
) -> Result<RunSummary, EngineError> {
    let bar = match progress {
        Progress::Stderr if std::io::IsTerminal::is_terminal(&std::io::stderr()) => {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(Duration::from_millis(200));
            Some(bar)
        }
        _ => None,
    };
    let sink = Arc::new(LocalSink {
        state: Mutex::new(LocalState {
            out: std::io::BufWriter::with_capacity(64 * 1024, out),
            progress: RunProgress {
                pages: resume.metrics.pages_processed,
                records: resume.records,
                usage: resume.usage,
                log: Vec::new(),
            },
            write_error: None,
            bar,
        }),
        mode: progress,
        target,
    });
    let started = Instant::now();
    let job = ScrapeJob::new(settings);
    let outcome = job
        .crawl(cfg.clone(), resume, state, sink.clone(), stop)
        .await;
    let (status, error, last, finish) = match outcome {
        JobOutcome::Completed(b) => (
            "completed",
            None,
            b,
            Some(crate::session::SessionStatus::Completed),
        ),
        JobOutcome::Stopped(b) => ("stopped", None, b, None),
        JobOutcome::Failed {
            error,
            batch,
            retry,
        } => {
            let finish = (retry == Retry::Never).then_some(crate::session::SessionStatus::Failed);
            ("failed", Some(error), batch, finish)
        }
    };
    // The last batch commits together with the final status; a stopped run leaves its session
    // running, for the next run to resume.
    let committed = {
        let has_error = sink
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_error
            .is_some();
        if has_error {
            Ok(())
        } else {
            sink.commit_to_target(&last, finish, error.clone()).await
        }
    };
    let write_result = match &committed {
        Ok(()) => sink.write(last),
        Err(_) => Ok(()),
    };
    let error = error.map(|e| e.message);
    let mut st = sink.state.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(bar) = st.bar.take() {
        bar.finish_and_clear();
    }
    committed?;
    if let Some(e) = st.write_error.take() {
        return Err(EngineError::Output(e));
    }
    if write_result.is_err() {
        return Err(EngineError::Output(std::io::Error::other(
            "records could not be written",
        )));
    }
    if let Some(e) = error
        .as_ref()
        .filter(|e| e.starts_with("cannot start the HTTP client"))
    {
        return Err(EngineError::Client(e.clone()));
    }
    Ok(RunSummary {
        name: cfg.name.clone(),
        status,
        error,
        pages: st.progress.pages,
        records: st.progress.records,
        usage: st.progress.usage,
        seconds: started.elapsed().as_secs_f64(),
    })
}
