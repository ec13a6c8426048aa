//! Agents: named, saved scraper configs with default params and options, an optional cron
//! schedule, and a concurrency rule (`sessions = "multiple" | "single"`).
//!
//! `single`: at most one active session of the agent at a time (checked atomically with the
//! insert by the store) and a new run first removes the previous runs' data, since only the last
//! run matters. `multiple`: concurrent runs, each with its own data and cleanup.

use std::collections::BTreeMap;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{Harvest, HarvestError, SessionHandle, SubmitRequest};
use crate::session::{
    ClientContext, OptionsPatch, SessionId, SessionOptions, SessionStatus, Timestamp,
};
use crate::store::{Agent, AgentSessions, SessionList};

/// What a client saves under an agent's name.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    /// The scraper config (JSON).
    pub config: serde_json::Value,
    /// Default params of its runs.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Default options of its runs.
    #[serde(default)]
    pub options: SessionOptions,
    /// Cron expression with seconds (`sec min hour day month weekday`), e.g. `0 */15 * * * *`.
    #[serde(default)]
    pub schedule: Option<String>,
    /// `multiple` (default) or `single`.
    #[serde(default)]
    pub sessions: AgentSessions,
}

/// One run of an agent: params and options override the agent's defaults key by key.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRun {
    /// Params merged over the agent's.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Options merged over the agent's, key by key.
    #[serde(default)]
    pub options: OptionsPatch,
    /// A caller-chosen session id.
    #[serde(default)]
    pub session_id: Option<SessionId>,
}

/// Checks an agent name (same alphabet and length as session ids).
pub fn validate_name(name: &str) -> Result<(), HarvestError> {
    SessionId::parse(name).map(|_| ()).map_err(|e| {
        HarvestError::Invalid(format!(
            "agent name: {}",
            e.to_string().replace("session id", "name")
        ))
    })
}

/// Checks a cron expression (6 fields, with seconds).
pub fn validate_schedule(expr: &str) -> Result<(), HarvestError> {
    if expr.split_whitespace().count() != 6 {
        return Err(HarvestError::Invalid(format!(
            "schedule: {expr:?} must have 6 fields (sec min hour day month weekday), e.g. \"0 */15 * * * *\""
        )));
    }
    croner::Cron::from_str(expr)
        .map(|_| ())
        .map_err(|e| HarvestError::Invalid(format!("schedule: {expr:?}: {e}")))
}

impl Harvest {
    /// Saves (creates or replaces) a client's agent after validating its name, config and
    /// schedule.
    pub async fn agent_put(
        &self,
        client_id: &str,
        name: &str,
        spec: AgentSpec,
    ) -> Result<Agent, HarvestError> {
        validate_name(name)?;
        spec.options.check().map_err(HarvestError::Invalid)?;
        let mut spec = spec;
        let (config, params) = self
            .check_config(
                std::mem::take(&mut spec.config),
                std::mem::take(&mut spec.params),
            )
            .await?;
        spec.config = config;
        spec.params = params;
        if let Some(s) = spec.schedule.clone() {
            self.off_runtime(move || validate_schedule(&s)).await??;
        }
        let agent = Agent {
            name: name.to_string(),
            client_id: client_id.to_string(),
            config: spec.config,
            params: spec.params,
            options: spec.options,
            schedule: spec.schedule,
            sessions: spec.sessions,
            updated_at: self.clock().now(),
        };
        self.store().agent_put(agent.clone()).await?;
        Ok(agent)
    }

    /// A client's agent.
    pub async fn agent_get(
        &self,
        client_id: &str,
        name: &str,
    ) -> Result<Option<Agent>, HarvestError> {
        Ok(self.store().agent_get(client_id, name).await?)
    }

    /// Deletes a client's agent (its sessions stay until their own cleanup).
    pub async fn agent_delete(&self, client_id: &str, name: &str) -> Result<bool, HarvestError> {
        Ok(self.store().agent_delete(client_id, name).await?)
    }

    /// A client's agents (`None`: every client's).
    pub async fn agent_list(&self, client_id: Option<&str>) -> Result<Vec<Agent>, HarvestError> {
        let all = self.store().agent_list().await?;
        Ok(all
            .into_iter()
            .filter(|a| client_id.is_none_or(|c| a.client_id == c))
            .collect())
    }

    /// Whether the agent has a PENDING or RUNNING session.
    pub async fn agent_active_session(
        &self,
        agent: &Agent,
    ) -> Result<Option<SessionId>, HarvestError> {
        for status in [SessionStatus::Running, SessionStatus::Pending] {
            let page = self
                .store()
                .session_list(SessionList {
                    client_id: Some(agent.client_id.clone()),
                    status: Some(status),
                    agent: Some(agent.name.clone()),
                    limit: 1,
                    cursor: None,
                })
                .await?;
            if let Some(s) = page.sessions.into_iter().next() {
                return Ok(Some(s.id));
            }
        }
        Ok(None)
    }

    /// Starts a run of a client's agent. A `single` agent with an active run refuses with
    /// [`HarvestError::Conflict`]; otherwise its earlier runs' data is removed once the new run
    /// is durable.
    pub async fn agent_run(
        &self,
        client_id: &str,
        name: &str,
        run: AgentRun,
    ) -> Result<SessionHandle, HarvestError> {
        let agent = self
            .agent_get(client_id, name)
            .await?
            .ok_or_else(|| HarvestError::AgentNotFound(name.to_string()))?;
        let mut params = agent.params.clone();
        params.extend(run.params);
        let single = agent.sessions == AgentSessions::Single;
        // An agent saved before `max_attempts` was bounded keeps running, at the bound; a run's
        // own value over it is still refused.
        let mut saved = agent.options.clone();
        saved.max_attempts = saved
            .max_attempts
            .map(|n| n.min(SessionOptions::MAX_ATTEMPTS));
        let req = SubmitRequest {
            config: agent.config.clone(),
            params,
            client: ClientContext::of(client_id),
            options: run.options.apply_to(&saved),
            session_id: run.session_id,
            agent: Some(agent.name.clone()),
            single_agent: single,
        };
        let handle = self.submit(req).await?;
        if single {
            self.remove_previous_runs(&agent, handle.id()).await?;
        }
        Ok(handle)
    }

    /// Removes every terminal session of `agent` except `keep`.
    async fn remove_previous_runs(
        &self,
        agent: &Agent,
        keep: &SessionId,
    ) -> Result<(), HarvestError> {
        for status in [
            SessionStatus::Completed,
            SessionStatus::Failed,
            SessionStatus::Cancelled,
        ] {
            loop {
                let page = self
                    .store()
                    .session_list(SessionList {
                        client_id: Some(agent.client_id.clone()),
                        status: Some(status),
                        agent: Some(agent.name.clone()),
                        limit: 100,
                        cursor: None,
                    })
                    .await?;
                let ids: Vec<crate::session::SessionKey> = page
                    .sessions
                    .iter()
                    .map(crate::session::Session::key)
                    .filter(|k| &k.id != keep)
                    .collect();
                if ids.is_empty() {
                    break;
                }
                for id in ids {
                    if let Some(s) = self.store().session_remove(&id).await? {
                        self.effects().removed(std::slice::from_ref(&s)).await;
                    }
                }
            }
        }
        Ok(())
    }
}

/// One cron tick of an agent: a run, unless its previous run is still active.
pub async fn fire(harvest: &Harvest, client_id: &str, name: &str) {
    fire_tick(harvest, client_id, name, None).await
}

/// One cron tick of an agent at its scheduled instant `tick` (`None`: an id of its own). A tick
/// another process already fired is skipped.
pub async fn fire_tick(harvest: &Harvest, client_id: &str, name: &str, tick: Option<Timestamp>) {
    let agent = match harvest.agent_get(client_id, name).await {
        Ok(Some(a)) => a,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(agent = name, error = %e, "cron: cannot read agent");
            return;
        }
    };
    match harvest.agent_active_session(&agent).await {
        Ok(Some(active)) => {
            tracing::info!(agent = name, session = %active, "cron: previous run still active; skipping this tick");
            crate::metrics::agent_run_skipped();
            return;
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(agent = name, error = %e, "cron: cannot check the agent's runs");
            return;
        }
    }
    let run = AgentRun {
        session_id: tick.and_then(|t| crate::runtime::cron_session_id(client_id, name, t)),
        ..Default::default()
    };
    match harvest.agent_run(client_id, name, run).await {
        Ok(h) => {
            crate::metrics::agent_run_fired();
            tracing::info!(agent = name, session = %h.id(), "cron: started a run");
        }
        Err(HarvestError::Duplicate(id)) => {
            tracing::info!(agent = name, session = %id, "cron: this tick already ran (another process fired it)");
        }
        Err(e) => tracing::warn!(agent = name, error = %e, "cron: run refused"),
    }
}
