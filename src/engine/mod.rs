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

use crate::job::{CheckpointSink, Job, JobContext, JobOutcome, LeaseLost, Retry, StopSignal};
use crate::session::{LogLine, SessionError, TokenUsage};
use crate::store::{CheckpointBatch, ResumeState};

pub mod canon;
pub mod config;
pub mod crawl;
pub mod extract;
pub mod fetch;
pub mod guard;

pub use config::{CompiledConfig, ConfigError, ScraperConfig, compile, parse_config_text};
pub use crawl::BatchPolicy;
pub use guard::{GuardConfigError, GuardRefused, NetGuard};

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
        crawl::crawl(cfg, fetcher, resume, sink, stop, self.settings.batch).await
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
        self.crawl(cfg, ctx.resume, ctx.sink, ctx.stop).await
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

/// `harvest run`'s sink: writes records as JSON lines and reports progress.
struct LocalSink {
    state: Mutex<LocalState>,
    mode: Progress,
}

impl LocalSink {
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
        self.write(batch)
    }
}

/// Runs one crawl locally (`harvest run CONFIG [--param k=v]`): records go to `out` as JSON
/// lines, progress as `progress` says, and the summary comes back (print it with `Display`).
///
/// `config` is the JSON form (use [`parse_config_text`] on a file's text); `params` override its
/// `[vars]`. A bad config is an `Err` before anything is fetched; per-page errors only show in the
/// summary and the progress log. Fire `stop` (e.g. on Ctrl-C) to end the crawl between steps.
pub async fn run_local(
    config: &serde_json::Value,
    params: &BTreeMap<String, String>,
    settings: EngineSettings,
    out: Box<dyn Write + Send>,
    progress: Progress,
    stop: StopSignal,
) -> Result<RunSummary, EngineError> {
    let cfg = Arc::new(compile(config, params)?);
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
            progress: RunProgress::default(),
            write_error: None,
            bar,
        }),
        mode: progress,
    });
    let started = Instant::now();
    let job = ScrapeJob::new(settings);
    let outcome = job
        .crawl(cfg.clone(), ResumeState::default(), sink.clone(), stop)
        .await;
    let (status, error, last) = match outcome {
        JobOutcome::Completed(b) => ("completed", None, b),
        JobOutcome::Stopped(b) => ("stopped", None, b),
        JobOutcome::Failed { error, batch, .. } => ("failed", Some(error.message), batch),
    };
    let write_result = sink.write(last);
    let mut st = sink.state.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(bar) = st.bar.take() {
        bar.finish_and_clear();
    }
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
