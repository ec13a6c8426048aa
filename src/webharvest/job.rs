//! The Web-Harvest interpreter as a [`Job`]: `JobSpec.config` is a JSON string holding the XML.
//!
//! Each attempt runs the config from the start (a Web-Harvest config cannot resume), in a fresh
//! copy of the session's directory, and commits its progress (HTTP requests as pages, usage, log
//! lines) every ~500 ms. Runtime errors of the config end the session FAILED with the processor's
//! path; only transport failures (timeouts, connection errors) are retried.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;

use super::host::{FetchHost, Host, HostSettings, LogLevel};
use super::run::{RunErrorKind, RunOutput, run_program};
use super::{Limits, parse, parse_within};
use crate::engine::NetGuard;
use crate::engine::config::HttpSettings;
use crate::job::{ConfigRejected, Job, JobContext, JobOutcome, Retry};
use crate::session::{Session, SessionError};
use crate::store::CheckpointBatch;

/// How Web-Harvest sessions run, independent of any one config.
#[derive(Debug, Clone, Default)]
pub struct WebHarvestSettings {
    /// The request-forgery guard; `None` lets sessions fetch any address (single-tenant use).
    pub guard: Option<NetGuard>,
    /// Where sessions' `file` directories go: `<dir>/<client_id>/<session_id>/`; `None` refuses
    /// `file`.
    pub export_dir: Option<PathBuf>,
    /// HTTP settings (the config's `obey-robots-txt` decides robots.txt).
    pub http: HttpSettings,
    /// Limits of one run.
    pub limits: Limits,
}

/// The Web-Harvest [`Job`].
#[derive(Debug, Clone, Default)]
pub struct WebHarvestJob {
    settings: WebHarvestSettings,
}

impl WebHarvestJob {
    /// A job with these settings.
    pub fn new(settings: WebHarvestSettings) -> WebHarvestJob {
        WebHarvestJob { settings }
    }

    /// The directory `file` is confined to for `session`, if file access is on: beside the
    /// session's export files, `<export dir>/<client>/<session>/` (the client as
    /// [`crate::sink::client_dir`] names it; a session id is a safe name by its rules).
    pub fn session_dir(&self, session: &Session) -> Option<PathBuf> {
        let dir = self.settings.export_dir.as_ref()?;
        Some(
            dir.join(crate::sink::client_dir(session.client.client_id()))
                .join(session.id.as_str()),
        )
    }

    /// Runs one attempt and also hands back what the run left (its session variables), for the
    /// caller to store with the final status. [`Job::run`] is this without the output.
    pub async fn run_session(&self, ctx: JobContext) -> (JobOutcome, Option<RunOutput>) {
        let invalid = |m: String| JobOutcome::Failed {
            error: SessionError::new("invalid_config", m),
            retry: Retry::Never,
            batch: CheckpointBatch::default(),
        };
        let Some(xml) = ctx.session.job.config.as_str() else {
            return (
                invalid("a Web-Harvest config is a string of XML".into()),
                None,
            );
        };
        // Parsing checks every literal regex and XPath: CPU work, kept off the runtime's threads.
        let text = xml.to_string();
        let parsed = tokio::task::spawn_blocking(move || parse(&text).map_err(|e| e.to_string()))
            .await
            .unwrap_or_else(|e| Err(format!("parsing stopped unexpectedly: {e}")));
        let program = match parsed {
            Ok(p) => Arc::new(p),
            Err(e) => return (invalid(format!("Web-Harvest config: {e}")), None),
        };
        let files_dir = self.session_dir(&ctx.session);
        if let Some(d) = &files_dir
            && d.exists()
        {
            // A new attempt starts over: what an earlier attempt wrote is redone.
            let d = d.clone();
            let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&d)).await;
            if let Ok(Err(e)) | Err(e) = removed.map_err(std::io::Error::other) {
                return (
                    JobOutcome::Failed {
                        error: SessionError::new(
                            "file_error",
                            format!("cannot clear the session's directory: {e}"),
                        ),
                        retry: Retry::Backoff,
                        batch: CheckpointBatch::default(),
                    },
                    None,
                );
            }
        }
        let limits = self.settings.limits.clone();
        let mut http = self.settings.http.clone();
        http.obey_robots_txt = program.obeys_robots();
        let host = FetchHost::new(
            HostSettings {
                http,
                guard: self.settings.guard.clone(),
                files_dir,
                max_file_bytes: limits.max_file_bytes,
                max_read_bytes: limits.max_variable_bytes as u64,
            },
            ctx.stop.clone(),
        );
        let host = match host {
            Ok(h) => Arc::new(h.with_sink(ctx.sink.clone())),
            Err(e) => {
                return (
                    JobOutcome::Failed {
                        error: SessionError::new("http_client", e),
                        retry: Retry::Backoff,
                        batch: CheckpointBatch::default(),
                    },
                    None,
                );
            }
        };
        let result = run_program(
            program,
            &ctx.session.job.params,
            host.clone() as Arc<dyn Host>,
            limits,
            ctx.stop.clone(),
        )
        .await;
        match result {
            Ok(out) => {
                if let Some(m) = &out.exit_message {
                    host.log(LogLevel::Info, &format!("exit: {m}"));
                }
                (JobOutcome::Completed(last_batch(&host, &out)), Some(out))
            }
            Err(e) => {
                let retry = match e.kind {
                    RunErrorKind::Http { retryable: true } | RunErrorKind::Internal => {
                        Retry::Backoff
                    }
                    _ => Retry::Never,
                };
                match e.kind {
                    RunErrorKind::Stopped | RunErrorKind::LeaseLost => {
                        let batch = last_batch(&host, &e.output);
                        (JobOutcome::Stopped(batch), Some(e.output))
                    }
                    kind => {
                        host.log(LogLevel::Error, &e.message);
                        let batch = last_batch(&host, &e.output);
                        (
                            JobOutcome::Failed {
                                error: SessionError::new(kind.as_str(), e.message),
                                retry,
                                batch,
                            },
                            Some(e.output),
                        )
                    }
                }
            }
        }
    }
}

/// A run's last batch: what the host holds, the processors executed since the last progress
/// report, and the session scope's variables as the session's context (stored with the final
/// status).
fn last_batch(host: &FetchHost, out: &RunOutput) -> CheckpointBatch {
    let mut batch = host.batch_upto(out.processors);
    batch.context = Some(out.variables.clone());
    batch
}

#[async_trait]
impl Job for WebHarvestJob {
    fn validate(
        &self,
        config: &serde_json::Value,
        _params: &BTreeMap<String, String>,
    ) -> Result<(), ConfigRejected> {
        let xml = config
            .as_str()
            .ok_or_else(|| ConfigRejected::new("a Web-Harvest config is a string of XML"))?;
        // The parse error (line, column, message) is kept as the rejection's source.
        parse_within(xml, crate::engine::config::VALIDATION_TIME_LIMIT)
            .map(|_| ())
            .map_err(ConfigRejected::new)
    }

    async fn run(&self, ctx: JobContext) -> JobOutcome {
        self.run_session(ctx).await.0
    }
}
