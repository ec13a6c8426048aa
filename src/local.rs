//! One local run without a service (`harvest run CONFIG`): the same runtime as `harvest serve`
//! (a worker claiming the session, checkpoints committed under its lease) over an embedded sled
//! store, with records written as JSON lines as soon as each checkpoint holding them commits.
//!
//! [`run_local`] keeps its store in a temporary directory; [`run_local_resumable`] keeps it in a
//! directory of the caller's (`--resume DIR`), so a run stopped with Ctrl-C or killed continues
//! where its last checkpoint left off when started again, and across runs each record is written
//! once.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::engine::EngineSettings;
use crate::job::{ConfigRejected, Job, StopSignal};
use crate::kinds::Kinds;
use crate::runtime::CommitObserver;
use crate::service::{Harvest, HarvestError, SubmitRequest};
use crate::session::{
    ClientContext, ErrorKind, LogLine, Session, SessionId, SessionOptions, SessionStatus,
    TokenUsage,
};
use crate::store::CheckpointBatch;

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
    /// `completed`, `stopped`, `failed`, `cancelled`, or `already completed` (a resume
    /// directory whose run had ended).
    pub status: &'static str,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// Pages fetched (all runs over a resume directory).
    pub pages: u64,
    /// Records written (all runs over a resume directory).
    pub records: u64,
    /// Usage.
    pub usage: TokenUsage,
    /// Wall time of this run.
    pub seconds: f64,
    /// The session's context when it ended (a Web-Harvest config's variables, a scraper
    /// config's `[vars]`).
    pub context: Option<crate::session::Context>,
}

impl RunSummary {
    /// Whether the crawl ended COMPLETED (in this run or an earlier one over the directory).
    pub fn is_completed(&self) -> bool {
        self.status == "completed" || (self.status == "already completed" && self.error.is_none())
    }
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

/// Why a local run could not run or finish.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The config does not validate.
    #[error(transparent)]
    Config(#[from] ConfigRejected),
    /// The HTTP client could not be built (TLS roots, resolver).
    #[error("cannot start the HTTP client: {0}")]
    Client(String),
    /// Records could not be written (e.g. stdout closed).
    #[error("cannot write records: {0}")]
    Output(#[source] std::io::Error),
    /// The run's store failed, or the resume directory holds something else.
    #[error("{0}")]
    Store(String),
    /// The embedded service failed.
    #[error(transparent)]
    Service(#[from] HarvestError),
}

/// The id of the one session a run's directory holds.
const LOCAL_SESSION: &str = "local";

/// Runs one crawl locally (`harvest run CONFIG [--param k=v]`): records go to `out` as JSON
/// lines, progress as `progress` says, and the summary comes back (print it with `Display`).
///
/// `config` is the stored form (use [`crate::kinds::parse_config_text`] on a file's text: a
/// scraper config, or Web-Harvest XML); `params` override its `[vars]`. A bad config is an `Err` before anything is fetched; per-page
/// errors only show in the summary and the progress log. Fire `stop` (e.g. on Ctrl-C) to end the
/// crawl after the pages in flight. The crawl state lives in a temporary store; see
/// [`run_local_resumable`] for a run that survives being stopped or killed.
pub async fn run_local(
    config: &serde_json::Value,
    params: &BTreeMap<String, String>,
    settings: EngineSettings,
    out: Box<dyn Write + Send>,
    progress: Progress,
    stop: StopSignal,
) -> Result<RunSummary, RunError> {
    let job = kinds(&settings);
    job.validate(config, params)?;
    let dir = tempfile::TempDir::new()
        .map_err(|e| RunError::Store(format!("cannot create a temporary directory: {e}")))?;
    run_in(config, params, job, out, progress, stop, dir.path()).await
}

/// The service of a local run: one worker over a sled store in `dir` (created if needed),
/// running `job`, with `observer` told of every committed checkpoint. Not started.
pub async fn open_local(
    dir: &Path,
    job: Kinds,
    observer: Option<Arc<dyn CommitObserver>>,
) -> Result<Harvest, RunError> {
    let store = crate::store::sled::SledStore::open(dir)
        .map_err(|e| RunError::Store(format!("resume store: {e}")))?;
    let mut service = Config::default();
    service.workers.concurrency = 1;
    service.data_dir = dir.to_path_buf();
    let mut builder = Harvest::builder(service)
        .store(Arc::new(store))
        .job(Arc::new(job));
    if let Some(observer) = observer {
        builder = builder.observe_commits(observer);
    }
    Ok(builder.open().await?)
}

/// The jobs of a local run: the scraper, and Web-Harvest with its files under `./exports` (as
/// the service's default `export.dir`).
pub fn kinds(settings: &EngineSettings) -> Kinds {
    let webharvest = crate::webharvest::WebHarvestSettings {
        guard: settings.guard.clone(),
        export_dir: Some(Config::default().export.dir),
        ..Default::default()
    };
    Kinds::new(settings.clone(), webharvest)
}

/// Like [`run_local`], but checkpoints into a sled store in `dir` (created if needed) and resumes
/// from it: run it again with the same config after Ctrl-C or a kill, and it continues where the
/// last checkpoint left off (`harvest run --resume DIR`).
///
/// Records are written to `out` right after the checkpoint holding them is committed, so a
/// resumed run writes only records no earlier run wrote, and across runs each record is written
/// once. The one exception is a kill in the instant between a commit and the write that follows
/// it: those records are in `dir` but were not written (at most one batch, ~100 ms of work). A
/// directory whose run ended writes nothing more; one holding another config is refused.
pub async fn run_local_resumable(
    config: &serde_json::Value,
    params: &BTreeMap<String, String>,
    settings: EngineSettings,
    out: Box<dyn Write + Send>,
    progress: Progress,
    stop: StopSignal,
    dir: &Path,
) -> Result<RunSummary, RunError> {
    let job = kinds(&settings);
    job.validate(config, params)?;
    std::fs::create_dir_all(dir).map_err(|e| {
        RunError::Store(format!(
            "cannot create the resume directory {}: {e}",
            dir.display()
        ))
    })?;
    run_in(config, params, job, out, progress, stop, dir).await
}

async fn run_in(
    config: &serde_json::Value,
    params: &BTreeMap<String, String>,
    job: Kinds,
    out: Box<dyn Write + Send>,
    progress: Progress,
    stop: StopSignal,
    dir: &Path,
) -> Result<RunSummary, RunError> {
    let name = config
        .get("name")
        .and_then(|n| n.as_str())
        .unwrap_or("run")
        .to_string();
    let started = Instant::now();
    let printer = Arc::new(Printer::new(out, progress));
    let harvest = open_local(dir, job, Some(printer.clone() as Arc<dyn CommitObserver>)).await?;
    let id = SessionId::parse(LOCAL_SESSION)
        .map_err(|e| RunError::Store(format!("the local session id: {e}")))?;
    let existing = harvest.get(&id).await?;
    match existing {
        None => {
            let req = SubmitRequest {
                config: config.clone(),
                params: params.clone(),
                client: ClientContext::of("local"),
                options: SessionOptions {
                    // Kept until the directory is removed: its end is what a rerun reports.
                    session_timeout_secs: Some(SessionOptions::MAX_TIMEOUT_SECS),
                    ..SessionOptions::default()
                },
                session_id: Some(id.clone()),
                ..SubmitRequest::default()
            };
            harvest.submit(req).await?;
        }
        Some(s) if s.job.config != *config || s.job.params != *params => {
            let _ = harvest.shutdown(Duration::ZERO).await;
            return Err(RunError::Store(format!(
                "{} holds a run of another config or other params; resume with the same ones, \
                 or use another directory",
                dir.display()
            )));
        }
        Some(s) if s.status.is_terminal() => {
            let mut summary = summary_of(&name, &s, started);
            summary.status = "already completed";
            summary.context = harvest.context(&s.id).await?;
            let _ = harvest.shutdown(Duration::ZERO).await;
            return Ok(summary);
        }
        Some(s) => printer.start_from(&s),
    }
    harvest.start();
    let handle = harvest.handle(id);
    // Bounded by the crawl's own limits (max_pages, max_duration); each round waits at most an
    // hour before looking again.
    let ended = loop {
        tokio::select! {
            done = handle.await_completion(Duration::from_secs(3600)) => {
                if let Some(s) = done? {
                    break Some(s);
                }
            }
            _ = stop.stopped() => break None,
            _ = printer.failed.notified() => break None,
        }
    };
    // Stopped: the worker hands the session back (PENDING, no attempt spent) after committing
    // and writing what the pages in flight found.
    harvest.shutdown(Duration::ZERO).await?;
    if let Some(e) = printer.take_error() {
        return Err(RunError::Output(e));
    }
    let stopped = ended.is_none();
    let session = match ended {
        Some(s) => s,
        None => harvest
            .get(handle.id())
            .await?
            .ok_or_else(|| RunError::Store("the run's session is gone".into()))?,
    };
    let mut summary = summary_of(&name, &session, started);
    summary.context = harvest.context(&session.id).await?;
    if stopped {
        summary.status = "stopped";
    }
    if let Some(e) = session
        .error
        .as_ref()
        .filter(|e| e.kind == ErrorKind::HttpClient)
    {
        return Err(RunError::Client(e.message.clone()));
    }
    Ok(summary)
}

fn summary_of(name: &str, s: &Session, started: Instant) -> RunSummary {
    RunSummary {
        name: name.to_string(),
        status: match s.status {
            SessionStatus::Completed => "completed",
            SessionStatus::Failed => "failed",
            SessionStatus::Cancelled => "cancelled",
            SessionStatus::Pending | SessionStatus::Running => "stopped",
        },
        error: s.error.as_ref().map(|e| e.message.clone()),
        pages: s.metrics.pages_processed,
        records: s.records,
        usage: s.usage,
        seconds: started.elapsed().as_secs_f64(),
        context: None,
    }
}

/// Writes the records of every committed checkpoint, in commit order, and reports progress.
struct Printer {
    state: Mutex<PrintState>,
    mode: Progress,
    /// Woken when writing failed (nobody reads the records any more: stop the run).
    failed: tokio::sync::Notify,
}

struct PrintState {
    out: std::io::BufWriter<Box<dyn Write + Send>>,
    progress: RunProgress,
    error: Option<std::io::Error>,
    bar: Option<indicatif::ProgressBar>,
}

impl Printer {
    fn new(out: Box<dyn Write + Send>, mode: Progress) -> Printer {
        let bar = match mode {
            Progress::Stderr if std::io::IsTerminal::is_terminal(&std::io::stderr()) => {
                let bar = indicatif::ProgressBar::new_spinner();
                bar.enable_steady_tick(Duration::from_millis(200));
                Some(bar)
            }
            _ => None,
        };
        Printer {
            state: Mutex::new(PrintState {
                out: std::io::BufWriter::with_capacity(64 * 1024, out),
                progress: RunProgress::default(),
                error: None,
                bar,
            }),
            mode,
            failed: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PrintState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts from where an earlier run over the same directory stopped.
    fn start_from(&self, s: &Session) {
        let mut st = self.lock();
        st.progress.pages = s.metrics.pages_processed;
        st.progress.records = s.records;
        st.progress.usage = s.usage;
    }

    fn take_error(&self) -> Option<std::io::Error> {
        let mut st = self.lock();
        if let Some(bar) = st.bar.take() {
            bar.finish_and_clear();
        }
        st.error.take()
    }

    fn write(&self, batch: &CheckpointBatch) -> Result<(), std::io::Error> {
        let mut st = self.lock();
        let st = &mut *st;
        for r in &batch.records {
            serde_json::to_writer(&mut st.out, r).map_err(std::io::Error::from)?;
            st.out.write_all(b"\n")?;
        }
        st.out.flush()?;
        st.progress.pages += batch.pages;
        st.progress.records += batch.records.len() as u64;
        st.progress.usage += batch.usage;
        st.progress.log = batch.log.clone();
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

impl CommitObserver for Printer {
    fn committed(&self, _session: &Session, batch: &CheckpointBatch) -> Result<(), String> {
        if self.lock().error.is_some() {
            return Err("records can no longer be written".into());
        }
        self.write(batch).map_err(|e| {
            let msg = e.to_string();
            self.lock().error = Some(e);
            self.failed.notify_one();
            msg
        })
    }
}
