//! The scraper engine: the [`Job`] a session with a TOML or JSON scraper config runs.
//!
//! A config (TOML or JSON, see [`config`]) is compiled once per attempt; the crawl fetches
//! politely ([`fetch`]), decodes and extracts ([`extract`]) and hands its progress to a
//! [`CheckpointSink`] in bounded batches ([`crawl`]). The engine never touches the store: the
//! worker's sink commits under the lease, and the committed frontier and seen set come back
//! through a read-only [`CrawlState`].

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::job::{
    CheckpointSink, ConfigRejected, CrawlState, Job, JobContext, JobOutcome, Retry, StopSignal,
};
use crate::session::{ErrorKind, SessionError};
use crate::store::{CheckpointBatch, ResumeState};

pub mod canon;
pub mod config;
pub mod crawl;
mod diagnose;
pub mod extract;
pub mod fetch;
pub mod guard;
pub mod state;
pub(crate) mod xml;

pub use config::{
    CompiledConfig, ConfigError, ScraperConfig, compile, compile_within, parse_config_text,
};
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
                        ErrorKind::HttpClient,
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
    ) -> Result<(), ConfigRejected> {
        compile_within(config, params, config::VALIDATION_TIME_LIMIT)
            .map(|_| ())
            .map_err(ConfigRejected::new)
    }

    async fn run(&self, ctx: JobContext) -> JobOutcome {
        // Compiling (selectors, regexes) is CPU work of up to seconds for a large config: on the
        // blocking pool, so the runtime's threads keep serving requests meanwhile.
        let config = ctx.session.job.config.clone();
        let params = ctx.session.job.params.clone();
        let compiled = tokio::task::spawn_blocking(move || compile(&config, &params))
            .await
            .unwrap_or_else(|e| {
                Err(ConfigError::Syntax(format!(
                    "compiling the config stopped unexpectedly: {e}"
                )))
            });
        let cfg = match compiled {
            Ok(c) => Arc::new(c),
            Err(e) => {
                return JobOutcome::Failed {
                    error: SessionError::new(ErrorKind::InvalidConfig, e.to_string()),
                    retry: Retry::Never,
                    batch: CheckpointBatch::default(),
                };
            }
        };
        self.crawl(cfg, ctx.resume, ctx.state, ctx.sink, ctx.stop)
            .await
    }
}
