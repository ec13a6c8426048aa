//! The kinds of work a session can do, told apart by its config: a JSON object is a scraper
//! config ([`crate::engine`]), a string of XML (its first non-blank character `<`) a Web-Harvest
//! config ([`crate::webharvest`]). [`Kinds`] is the one [`Job`] the service runs: it hands each
//! session to its kind, at submission (validation) and at every attempt.
//!
//! To add a kind: write its [`Job`], give it a config shape the others do not claim, and
//! dispatch on it here ([`kind_of`]).

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::engine::{ConfigError, EngineSettings, ScrapeJob};
use crate::job::{ConfigRejected, Job, JobContext, JobOutcome};
use crate::webharvest::{WebHarvestJob, WebHarvestSettings, is_webharvest_config};

/// Which kind of work a config asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A scraper config (TOML or JSON, stored as a JSON object).
    Scrape,
    /// A Web-Harvest XML config (stored as a JSON string holding the XML).
    WebHarvest,
}

/// The kind of a stored config, if it is one.
pub fn kind_of(config: &serde_json::Value) -> Option<Kind> {
    match config {
        serde_json::Value::Object(_) => Some(Kind::Scrape),
        serde_json::Value::String(s) if is_webharvest_config(s) => Some(Kind::WebHarvest),
        _ => None,
    }
}

/// Reads a config's text, of any kind, into the JSON value a session stores: Web-Harvest XML as
/// a string, TOML or JSON as an object.
pub fn parse_config_text(text: &str) -> Result<serde_json::Value, ConfigError> {
    if is_webharvest_config(text) {
        Ok(serde_json::Value::String(text.to_string()))
    } else {
        crate::engine::parse_config_text(text)
    }
}

/// Every kind, dispatched by config.
#[derive(Debug, Clone)]
pub struct Kinds {
    scrape: ScrapeJob,
    webharvest: WebHarvestJob,
}

impl Kinds {
    /// The scraper with `engine` settings and Web-Harvest with `webharvest` settings.
    pub fn new(engine: EngineSettings, webharvest: WebHarvestSettings) -> Kinds {
        Kinds {
            scrape: ScrapeJob::new(engine),
            webharvest: WebHarvestJob::new(webharvest),
        }
    }

    fn job(&self, config: &serde_json::Value) -> Result<&dyn Job, ConfigRejected> {
        match kind_of(config) {
            Some(Kind::Scrape) => Ok(&self.scrape),
            Some(Kind::WebHarvest) => Ok(&self.webharvest),
            None => Err(ConfigRejected::new(
                "config must be a table (a JSON object, or TOML text) or a Web-Harvest XML \
                 document (text starting with `<`)",
            )),
        }
    }
}

#[async_trait]
impl Job for Kinds {
    fn validate(
        &self,
        config: &serde_json::Value,
        params: &BTreeMap<String, String>,
    ) -> Result<(), ConfigRejected> {
        self.job(config)?.validate(config, params)
    }

    async fn run(&self, ctx: JobContext) -> JobOutcome {
        match self.job(&ctx.session.job.config) {
            Ok(job) => job.run(ctx).await,
            Err(e) => JobOutcome::Failed {
                error: crate::session::SessionError::new(
                    crate::session::ErrorKind::InvalidConfig,
                    e.to_string(),
                ),
                retry: crate::job::Retry::Never,
                batch: crate::store::CheckpointBatch::default(),
            },
        }
    }
}
