//! Agent routes: save, read, list, delete and run a client's agents.
//!
//! An agent belongs to the client that saved it; another client's agent answers 404 exactly like
//! a missing one. Without `[[clients]]` configured, the single user's agents have the client id
//! `""` (as its sessions do). Runs are sessions like any other (`POST /v1/sessions` views,
//! events, records), tagged with the agent's name.
//!
//! `sessions = "single"`: a run while another run of the agent is PENDING or RUNNING is refused
//! with 409. Queueing such a run (`"queue": true`) is not supported: it is refused with 409 too,
//! with a message saying so, rather than accepted and silently run concurrently or dropped.

use std::collections::BTreeMap;
use std::str::FromStr;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ApiJson, ApiPath, ErrorBody};
use super::sessions::{config_from_text_off_runtime, params_to_strings};
use super::view::{OptionsView, SessionView};
use crate::service::{AgentRun, AgentSpec};
use crate::session::OptionsPatch;
use crate::session::{SessionOptions, Timestamp};
use crate::store::{Agent, AgentSessions};

/// `PUT /v1/agents/{name}` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentBody {
    /// The scraper config: a JSON object, or a string of TOML (or of JSON).
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
    /// Default params of its runs (scalar values).
    #[serde(default)]
    #[schema(value_type = Option<BTreeMap<String, Object>>)]
    pub params: BTreeMap<String, serde_json::Value>,
    /// Default options of its runs.
    #[serde(default)]
    #[schema(value_type = Option<OptionsView>)]
    pub options: Option<SessionOptions>,
    /// Cron expression with seconds (`sec min hour day month weekday`), e.g. `0 */15 * * * *`.
    #[serde(default)]
    pub schedule: Option<String>,
    /// `multiple` (default): concurrent runs, each with its own data; `single`: at most one
    /// active run, and a new run removes the previous runs' data.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "single")]
    pub sessions: Option<AgentSessions>,
}

/// `POST /v1/agents/{name}/run` body (every field optional; an empty body is `{}`).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentRunBody {
    /// Params merged over the agent's (scalar values).
    #[serde(default)]
    #[schema(value_type = Option<BTreeMap<String, Object>>)]
    pub params: BTreeMap<String, serde_json::Value>,
    /// Options merged over the agent's defaults, key by key.
    #[serde(default)]
    #[schema(value_type = Option<OptionsView>)]
    pub options: Option<OptionsPatch>,
    /// A caller-chosen unique session id.
    #[serde(default)]
    pub session_id: Option<String>,
    /// Queue the run behind an active run of a `single` agent. Not supported: such a run is
    /// refused with 409 whatever this says.
    #[serde(default)]
    pub queue: bool,
}

/// An agent as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentView {
    /// Its name (unique per client).
    pub name: String,
    /// Its owner.
    pub client_id: String,
    /// The scraper config (JSON).
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
    /// Default params.
    pub params: BTreeMap<String, String>,
    /// Default options.
    pub options: OptionsView,
    /// Cron schedule, if any.
    pub schedule: Option<String>,
    /// `multiple` or `single`.
    #[schema(value_type = String, example = "multiple")]
    pub sessions: AgentSessions,
    /// Last change.
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: Timestamp,
    /// When the schedule fires next (null without a schedule).
    #[schema(value_type = Option<String>, format = DateTime)]
    pub next_run_at: Option<Timestamp>,
}

impl AgentView {
    /// The view of an agent at `now` (which decides its next scheduled run).
    pub fn of(a: &Agent, now: Timestamp) -> AgentView {
        AgentView {
            name: a.name.clone(),
            client_id: a.client_id.clone(),
            config: a.config.clone(),
            params: a.params.clone(),
            options: OptionsView::from(&a.options),
            schedule: a.schedule.clone(),
            sessions: a.sessions,
            updated_at: a.updated_at,
            next_run_at: a.schedule.as_deref().and_then(|expr| next_tick(expr, now)),
        }
    }
}

/// The first instant of a cron expression after `now`.
fn next_tick(expr: &str, now: Timestamp) -> Option<Timestamp> {
    let cron = croner::Cron::from_str(expr).ok()?;
    let now = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(now.0)?;
    let next = cron.find_next_occurrence(&now, false).ok()?;
    Some(Timestamp(next.timestamp_millis()))
}

/// The caller's agents.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentListView {
    /// By name.
    pub agents: Vec<AgentView>,
}

/// The client id agents of this caller are saved under.
fn owner(caller: &Caller) -> &str {
    caller.client_id().unwrap_or("")
}

fn agent_not_found(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("agent {name:?} not found"),
    )
}

/// Save (create or replace) an agent.
#[utoipa::path(
    put,
    path = "/v1/agents/{name}",
    tag = "agents",
    params(("name" = String, Path, description = "Agent name (1-128 characters of [A-Za-z0-9._:-])")),
    request_body = AgentBody,
    responses(
        (status = 200, description = "Saved", body = AgentView),
        (status = 400, description = "Invalid name, config, options or schedule", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 413, description = "Body over server.max_body_bytes", body = ErrorBody),
        (status = 415, description = "Body is not application/json", body = ErrorBody),
    )
)]
pub async fn put_agent(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<AgentBody>,
) -> Result<axum::Json<AgentView>, ApiError> {
    let config = match body.config {
        serde_json::Value::String(text) => config_from_text_off_runtime(&st, text).await?,
        v @ serde_json::Value::Object(_) => v,
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_config",
                "config must be a JSON object or a string of TOML",
            ));
        }
    };
    let spec = AgentSpec {
        config,
        params: params_to_strings(body.params)?,
        options: body.options.unwrap_or_default(),
        schedule: body.schedule.filter(|s| !s.trim().is_empty()),
        sessions: body.sessions.unwrap_or_default(),
    };
    let agent = st.harvest.agent_put(owner(&caller), &name, spec).await?;
    Ok(axum::Json(AgentView::of(&agent, st.harvest.clock().now())))
}

/// One agent.
#[utoipa::path(
    get,
    path = "/v1/agents/{name}",
    tag = "agents",
    params(("name" = String, Path, description = "Agent name")),
    responses(
        (status = 200, description = "The agent", body = AgentView),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such agent (or another client's)", body = ErrorBody),
    )
)]
pub async fn get_agent(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<axum::Json<AgentView>, ApiError> {
    match st.harvest.agent_get(owner(&caller), &name).await? {
        Some(a) => Ok(axum::Json(AgentView::of(&a, st.harvest.clock().now()))),
        None => Err(agent_not_found(&name)),
    }
}

/// Delete an agent. Its sessions stay until their own cleanup.
#[utoipa::path(
    delete,
    path = "/v1/agents/{name}",
    tag = "agents",
    params(("name" = String, Path, description = "Agent name")),
    responses(
        (status = 200, description = "Deleted; the agent as it was", body = AgentView),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such agent (or another client's)", body = ErrorBody),
    )
)]
pub async fn delete_agent(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<axum::Json<AgentView>, ApiError> {
    let client = owner(&caller);
    let Some(agent) = st.harvest.agent_get(client, &name).await? else {
        return Err(agent_not_found(&name));
    };
    if !st.harvest.agent_delete(client, &name).await? {
        return Err(agent_not_found(&name));
    }
    Ok(axum::Json(AgentView::of(&agent, st.harvest.clock().now())))
}

/// The caller's agents, by name.
#[utoipa::path(
    get,
    path = "/v1/agents",
    tag = "agents",
    responses(
        (status = 200, description = "The caller's agents", body = AgentListView),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
    )
)]
pub async fn list_agents(
    State(st): State<AppState>,
    caller: Caller,
) -> Result<axum::Json<AgentListView>, ApiError> {
    let agents = st.harvest.agent_list(Some(owner(&caller))).await?;
    let now = st.harvest.clock().now();
    Ok(axum::Json(AgentListView {
        agents: agents.iter().map(|a| AgentView::of(a, now)).collect(),
    }))
}

/// Start a run of an agent: a new session with the agent's config, and params and options
/// merged over its defaults key by key.
#[utoipa::path(
    post,
    path = "/v1/agents/{name}/run",
    tag = "agents",
    params(("name" = String, Path, description = "Agent name")),
    request_body = AgentRunBody,
    responses(
        (status = 201, description = "The run's session, durable", body = SessionView),
        (status = 400, description = "Invalid params, options or session id", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such agent (or another client's)", body = ErrorBody),
        (status = 409, description = "A single-session agent has an active run (queueing is not supported), or the session id exists", body = ErrorBody),
    )
)]
pub async fn run_agent(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<AgentRunBody>,
) -> Result<Response, ApiError> {
    let session_id = match body.session_id {
        Some(id) => Some(super::sessions::client_session_id(&id)?),
        None => None,
    };
    let run = AgentRun {
        params: params_to_strings(body.params)?,
        options: body.options.unwrap_or_default(),
        session_id,
    };
    let handle = match st.harvest.agent_run(owner(&caller), &name, run).await {
        Ok(h) => h,
        Err(crate::service::HarvestError::AgentNotFound(_)) => return Err(agent_not_found(&name)),
        Err(crate::service::HarvestError::Conflict(m)) if body.queue => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!(
                    "{m}; queueing a run behind it (\"queue\": true) is not supported: retry when that run has ended"
                ),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    let session = handle.session().await?;
    let view = SessionView::of(&session, st.harvest.clock().now());
    Ok((StatusCode::CREATED, axum::Json(view)).into_response())
}
