//! Session routes: submit, get, list, cancel, close, the session's log, and checking a config
//! without submitting it.
//!
//! Handlers validate input, check that the caller owns the session (another client's session is
//! a 404), call [`Harvest`](crate::Harvest), and answer with a [`SessionView`].

use std::collections::{BTreeMap, HashMap};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ApiJson, ApiPath, ApiQuery, ErrorBody, ErrorDetail};
use super::view::{
    BatchBody, BatchItemView, BatchView, ContextView, ListQuery, LogQuery, LogView,
    SessionListView, SessionView, SubmitBody, ValidView, ValidateBody, VariableView,
};
use crate::service::SubmitRequest;
use crate::session::{ClientContext, Session, SessionId, SessionOptions, SessionStatus};
use crate::store::{CancelOutcome, SessionList};

/// Converts a config given as text (TOML, or JSON when it starts with `{`) to the JSON value the
/// service takes, with the engine's parser (errors name the line and field).
pub fn config_from_text(text: &str) -> Result<serde_json::Value, String> {
    crate::kinds::parse_config_text(text).map_err(|e| e.to_string())
}

/// [`config_from_text`] on the blocking pool (a large TOML text takes a while to parse), a
/// bounded number at a time.
pub(crate) async fn config_from_text_off_runtime(
    st: &AppState,
    text: String,
) -> Result<serde_json::Value, ApiError> {
    st.harvest
        .off_runtime(move || config_from_text(&text))
        .await?
        .map_err(text_refused)
}

/// A config text that does not parse.
fn text_refused(m: String) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_config",
        format!("invalid config: {m}"),
    )
}

/// The `config` of a request body as the JSON object the service takes: an object as is, a
/// string parsed as TOML (or JSON) on the blocking pool.
pub(crate) async fn config_from_body(
    st: &AppState,
    config: serde_json::Value,
) -> Result<serde_json::Value, ApiError> {
    match config {
        serde_json::Value::Null => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the body needs `config` (a JSON object, or a string of TOML or of Web-Harvest XML) or `agent` (a saved agent's name)",
        )),
        serde_json::Value::String(text) => config_from_text_off_runtime(st, text).await,
        v @ serde_json::Value::Object(_) => Ok(v),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_config",
            "invalid config: `config` must be a JSON object, or a string of TOML or of Web-Harvest XML",
        )),
    }
}

/// Check a config without submitting it: the same validation as `POST /v1/sessions`, nothing
/// stored.
#[utoipa::path(
    post,
    path = "/v1/configs/validate",
    tag = "sessions",
    request_body = ValidateBody,
    responses(
        (status = 200, description = "The config is valid; here it is as JSON", body = ValidView),
        (status = 400, description = "Invalid JSON, TOML, config or params; the message names the field", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 413, description = "Body over server.max_body_bytes", body = ErrorBody),
        (status = 415, description = "Body is not application/json", body = ErrorBody),
    )
)]
pub async fn validate_config(
    State(st): State<AppState>,
    _caller: Caller,
    ApiJson(body): ApiJson<ValidateBody>,
) -> Result<axum::Json<ValidView>, ApiError> {
    let config = config_from_body(&st, body.config).await?;
    let params = params_to_strings(body.params)?;
    let (config, _) = st.harvest.check_config(config, params).await?;
    Ok(axum::Json(ValidView {
        valid: true,
        config,
    }))
}

/// A session id a client chose: valid, and not one of the ids starting with `_` that harvest
/// reserves for itself (cron runs), so no tenant can take one before harvest uses it.
pub(crate) fn client_session_id(raw: &str) -> Result<SessionId, ApiError> {
    let id = SessionId::parse(raw).map_err(crate::service::HarvestError::from)?;
    if raw == "batch" {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_session_id",
            "session id \"batch\" is reserved: /v1/sessions/batch is the batch submit route",
        ));
    }
    if raw.starts_with('_') {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_session_id",
            format!("session id {raw:?}: ids starting with \"_\" are reserved for harvest"),
        ));
    }
    Ok(id)
}

/// Parses a session id from a path; a malformed id cannot name a session, so it is a 404 like
/// any unknown one (the message says why).
pub(crate) fn path_id(raw: &str) -> Result<SessionId, ApiError> {
    SessionId::parse(raw).map_err(|e| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("session {raw:?} not found: {e}"),
        )
    })
}

/// The session if it exists and the caller owns it; 404 otherwise.
pub(crate) async fn owned_session(
    st: &AppState,
    caller: &Caller,
    id: &SessionId,
) -> Result<Session, ApiError> {
    // Resolved within the caller's tenant (or among its sessions stored before ids were
    // scoped): another tenant's session of the same id is never returned.
    match st.harvest.resolve(caller.client_id(), id).await? {
        Some(s) if caller.owns(&s) => Ok(s),
        _ => Err(ApiError::session_not_found(id)),
    }
}

fn view(st: &AppState, s: &Session) -> SessionView {
    SessionView::of(s, st.harvest.clock().now())
}

pub(crate) fn params_to_strings(
    params: BTreeMap<String, serde_json::Value>,
) -> Result<BTreeMap<String, String>, ApiError> {
    let mut out = BTreeMap::new();
    for (k, v) in params {
        let text = match v {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            _ => {
                return Err(ApiError::invalid(format!(
                    "params.{k}: must be a string, number or boolean"
                )));
            }
        };
        out.insert(k, text);
    }
    Ok(out)
}

/// Submit a session.
#[utoipa::path(
    post,
    path = "/v1/sessions",
    tag = "sessions",
    request_body = SubmitBody,
    responses(
        (status = 201, description = "Submitted and durable", body = SessionView),
        (status = 400, description = "Invalid JSON, TOML, config, options or session id", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "`agent` names no agent of this client", body = ErrorBody),
        (status = 409, description = "A session with this id exists in the caller's tenant, or a single-session agent is busy", body = ErrorBody),
        (status = 429, description = "The client has `max_pending` PENDING sessions (`quota_exceeded`); retry after `Retry-After` seconds", body = ErrorBody),
        (status = 413, description = "Body over server.max_body_bytes", body = ErrorBody),
        (status = 415, description = "Body is not application/json", body = ErrorBody),
    )
)]
pub async fn submit(
    State(st): State<AppState>,
    caller: Caller,
    ApiJson(mut body): ApiJson<SubmitBody>,
) -> Result<Response, ApiError> {
    if let Some(agent) = body.agent.take() {
        return submit_agent_run(st, caller, agent, body).await;
    }
    let req = submit_request(&st, &caller, body).await?;
    let handle = st.harvest.submit(req).await?;
    let session = handle.session().await?;
    Ok((StatusCode::CREATED, axum::Json(view(&st, &session))).into_response())
}

/// The service's request for a submission body without `agent`: its config parsed, the
/// caller's client id imposed, options over the defaults, params as text, the id checked.
async fn submit_request(
    st: &AppState,
    caller: &Caller,
    body: SubmitBody,
) -> Result<SubmitRequest, ApiError> {
    let config = config_from_body(st, body.config).await?;
    let client_body = body.client.unwrap_or_default();
    // A tenant's sessions always carry its own id, whatever the body says.
    let client_id = match caller.client_id() {
        Some(id) => id.to_string(),
        None => client_body.client_id.unwrap_or_default(),
    };
    let mut client = ClientContext::builder().client_id(client_id);
    for (k, v) in client_body.metadata {
        client = client.metadata(k, v);
    }
    let mut req = SubmitRequest::new(config).client(client.build()).options(
        body.options
            .unwrap_or_default()
            .apply_to(&SessionOptions::default()),
    );
    req.params = params_to_strings(body.params)?;
    if let Some(id) = body.session_id {
        req = req.session_id(client_session_id(&id)?);
    }
    Ok(req)
}

/// Submit many sessions at once: one durable flush for the batch, one result per item.
#[utoipa::path(
    post,
    path = "/v1/sessions/batch",
    tag = "sessions",
    request_body = BatchBody,
    responses(
        (status = 200, description = "Per item, in order: 201 and the new id, or the item's own error; created items are durable", body = BatchView),
        (status = 400, description = "Invalid JSON, an empty batch or one over 1000 items", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 413, description = "Body over server.max_body_bytes", body = ErrorBody),
        (status = 415, description = "Body is not application/json", body = ErrorBody),
    )
)]
pub async fn submit_batch(
    State(st): State<AppState>,
    caller: Caller,
    ApiJson(mut body): ApiJson<BatchBody>,
) -> Result<Response, ApiError> {
    let max = crate::service::MAX_BATCH;
    if body.items.is_empty() || body.items.len() > max {
        return Err(ApiError::invalid(format!(
            "items: a batch holds 1 to {max} submissions, not {}",
            body.items.len()
        )));
    }
    // Config texts parsed in one turn of the blocking pool, not one turn per item, and each
    // distinct text once: a batch is mostly one config's runs with different params.
    let texts: Vec<Option<String>> = body
        .items
        .iter_mut()
        .map(|item| match &mut item.config {
            serde_json::Value::String(text) => Some(std::mem::take(text)),
            _ => None,
        })
        .collect();
    let parsed: Vec<Option<Result<serde_json::Value, String>>> = st
        .harvest
        .off_runtime(move || {
            let mut seen: HashMap<&str, Result<serde_json::Value, String>> = HashMap::new();
            texts
                .iter()
                .map(|t| {
                    t.as_deref()
                        .map(|t| seen.entry(t).or_insert_with(|| config_from_text(t)).clone())
                })
                .collect()
        })
        .await?;
    // Items refused here keep their place: `None` marks one passed on to the service.
    let mut refused: Vec<Option<ApiError>> = Vec::with_capacity(body.items.len());
    let mut reqs = Vec::new();
    for (mut item, parsed) in body.items.into_iter().zip(parsed) {
        if item.agent.is_some() {
            refused.push(Some(ApiError::invalid(
                "agent: an agent's run cannot be part of a batch; POST /v1/sessions with `agent`",
            )));
            continue;
        }
        match parsed {
            Some(Ok(config)) => item.config = config,
            Some(Err(m)) => {
                refused.push(Some(text_refused(m)));
                continue;
            }
            None => {}
        }
        match submit_request(&st, &caller, item).await {
            Ok(req) => {
                refused.push(None);
                reqs.push(req);
            }
            Err(e) => refused.push(Some(e)),
        }
    }
    let mut stored = st.harvest.submit_many(reqs).await?.into_iter();
    let mut results = Vec::with_capacity(refused.len());
    for r in refused {
        let outcome = match r {
            Some(e) => Err(e),
            None => match stored.next() {
                Some(Ok(session)) => Ok(session),
                Some(Err(e)) => Err(ApiError::from(e)),
                None => Err(ApiError::invalid("a batch item was lost")),
            },
        };
        results.push(match outcome {
            Ok(session) => BatchItemView {
                status: StatusCode::CREATED.as_u16(),
                id: Some(session.id.to_string()),
                error: None,
            },
            Err(e) => BatchItemView {
                status: e.status.as_u16(),
                id: None,
                error: Some(ErrorDetail {
                    code: e.code.to_string(),
                    message: e.message,
                }),
            },
        });
    }
    let created = results.iter().filter(|r| r.id.is_some()).count();
    Ok(axum::Json(BatchView {
        created,
        failed: results.len() - created,
        items: results,
    })
    .into_response())
}

/// `POST /v1/sessions` with `agent`: a run of the caller's saved agent.
async fn submit_agent_run(
    st: AppState,
    caller: Caller,
    agent: String,
    body: SubmitBody,
) -> Result<Response, ApiError> {
    if !body.config.is_null() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "give either `config` or `agent`, not both",
        ));
    }
    crate::service::agents::validate_name(&agent)?;
    let client_id = match caller.client_id() {
        Some(id) => id.to_string(),
        None => body.client.and_then(|c| c.client_id).unwrap_or_default(),
    };
    let session_id = match body.session_id {
        Some(id) => Some(client_session_id(&id)?),
        None => None,
    };
    let run = crate::service::AgentRun {
        params: params_to_strings(body.params)?,
        options: body.options.unwrap_or_default(),
        session_id,
    };
    let handle = st.harvest.agent_run(&client_id, &agent, run).await?;
    let session = handle.session().await?;
    Ok((StatusCode::CREATED, axum::Json(view(&st, &session))).into_response())
}

/// One session.
#[utoipa::path(
    get,
    path = "/v1/sessions/{id}",
    tag = "sessions",
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "The session, with its `job` (config and params)", body = SessionView),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such session (or another client's)", body = ErrorBody),
    )
)]
pub async fn get_session(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<SessionView>, ApiError> {
    let id = path_id(&id)?;
    let s = owned_session(&st, &caller, &id).await?;
    let mut v = view(&st, &s);
    v.job = Some(super::view::JobView::of(&s));
    Ok(axum::Json(v))
}

/// Sessions, newest first, paginated.
#[utoipa::path(
    get,
    path = "/v1/sessions",
    tag = "sessions",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of sessions", body = SessionListView),
        (status = 400, description = "Bad status, limit or cursor", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "client_id names another client", body = ErrorBody),
    )
)]
pub async fn list_sessions(
    State(st): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<axum::Json<SessionListView>, ApiError> {
    let client_id = scope_client(&caller, q.client_id)?;
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(
            s.parse::<SessionStatus>()
                .map_err(|m| ApiError::invalid(format!("status: {m}")))?,
        ),
    };
    let limit = match q.limit {
        None => 50,
        Some(n @ 1..=1000) => n as usize,
        Some(n) => {
            return Err(ApiError::invalid(format!(
                "limit: {n} is out of range; use 1..=1000"
            )));
        }
    };
    if let Some(c) = &q.cursor
        && (c.is_empty() || c.len() > 512)
    {
        return Err(ApiError::invalid(
            "cursor: not a cursor; pass the next_cursor of the previous page unchanged",
        ));
    }
    let page = st
        .harvest
        .list(SessionList {
            client_id,
            status,
            agent: q.agent.filter(|a| !a.is_empty()),
            limit,
            cursor: q.cursor,
        })
        .await?;
    let now = st.harvest.clock().now();
    Ok(axum::Json(SessionListView {
        sessions: page
            .sessions
            .iter()
            .map(|s| SessionView::of(s, now))
            .collect(),
        next_cursor: page.next_cursor,
    }))
}

/// The client filter a caller may use: tenants are held to their own id (asking for another
/// client's is a 404, as if that client had nothing).
pub(crate) fn scope_client(
    caller: &Caller,
    requested: Option<String>,
) -> Result<Option<String>, ApiError> {
    let requested = requested.filter(|c| !c.is_empty());
    match (caller.client_id(), requested) {
        (None, r) => Ok(r),
        (Some(own), None) => Ok(Some(own.to_string())),
        (Some(own), Some(r)) if r == own => Ok(Some(r)),
        (Some(_), Some(r)) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("client {r:?} not found"),
        )),
    }
}

/// Cancel a session (idempotent).
#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/cancel",
    tag = "sessions",
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 202, description = "Cancelled (PENDING), cancel requested (RUNNING), or already CANCELLED", body = SessionView),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such session (or another client's)", body = ErrorBody),
        (status = 409, description = "Already COMPLETED or FAILED", body = ErrorBody),
    )
)]
pub async fn cancel(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let id = path_id(&id)?;
    let key = owned_session(&st, &caller, &id).await?.key();
    let session = match st.harvest.cancel(&key).await? {
        CancelOutcome::Cancelled(s) | CancelOutcome::Requested(s) => s,
        CancelOutcome::AlreadyTerminal(s) if s.status == SessionStatus::Cancelled => s,
        CancelOutcome::AlreadyTerminal(s) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!(
                    "session {id} already ended {}; only an active session can be cancelled",
                    s.status
                ),
            ));
        }
        CancelOutcome::NotFound => return Err(ApiError::session_not_found(&id)),
    };
    Ok((StatusCode::ACCEPTED, axum::Json(view(&st, &session))).into_response())
}

/// Close a session: remove it and all its data now. Answers the session as it was removed.
#[utoipa::path(
    delete,
    path = "/v1/sessions/{id}",
    tag = "sessions",
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "Removed; the session as it was", body = SessionView),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such session (or another client's)", body = ErrorBody),
    )
)]
pub async fn close(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<SessionView>, ApiError> {
    let id = path_id(&id)?;
    let key = owned_session(&st, &caller, &id).await?.key();
    match st.harvest.close(&key).await? {
        Some(s) => Ok(axum::Json(view(&st, &s))),
        None => Err(ApiError::session_not_found(&id)),
    }
}

/// A session's context: its variables when it ended.
#[utoipa::path(
    get,
    path = "/v1/sessions/{id}/context",
    tag = "sessions",
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "The variables: a text, or a list of texts, by name", body = ContextView),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such session (or another client's), or it has no context yet", body = ErrorBody),
    )
)]
pub async fn context(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<ContextView>, ApiError> {
    let id = path_id(&id)?;
    let key = owned_session(&st, &caller, &id).await?.key();
    let variables = st.harvest.context(&key).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("session {id} has no context yet: variables are stored when it ends"),
        )
    })?;
    Ok(axum::Json(ContextView { variables }))
}

/// One variable of a session's context.
#[utoipa::path(
    get,
    path = "/v1/sessions/{id}/context/{name}",
    tag = "sessions",
    params(
        ("id" = String, Path, description = "Session id"),
        ("name" = String, Path, description = "Variable name"),
    ),
    responses(
        (status = 200, description = "The variable", body = VariableView),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such session (or another client's), no context, or no such variable", body = ErrorBody),
    )
)]
pub async fn context_variable(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath((id, name)): ApiPath<(String, String)>,
) -> Result<axum::Json<VariableView>, ApiError> {
    let id = path_id(&id)?;
    let key = owned_session(&st, &caller, &id).await?.key();
    let variables = st.harvest.context(&key).await?.unwrap_or_default();
    let value = variables.get(&name).cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("session {id} has no variable {name:?} in its context"),
        )
    })?;
    Ok(axum::Json(VariableView { name, value }))
}

/// The last lines of a session's log.
#[utoipa::path(
    get,
    path = "/v1/sessions/{id}/log",
    tag = "sessions",
    params(("id" = String, Path, description = "Session id"), LogQuery),
    responses(
        (status = 200, description = "Log lines, oldest first", body = LogView),
        (status = 400, description = "Bad limit", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such session (or another client's)", body = ErrorBody),
    )
)]
pub async fn log(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<LogQuery>,
) -> Result<axum::Json<LogView>, ApiError> {
    let id = path_id(&id)?;
    let limit = match q.limit {
        None => 1000,
        Some(n @ 1..=1000) => n as usize,
        Some(n) => {
            return Err(ApiError::invalid(format!(
                "limit: {n} is out of range; use 1..=1000"
            )));
        }
    };
    let s = owned_session(&st, &caller, &id).await?;
    let lines = st
        .harvest
        .store()
        .log_tail(&s.key(), limit)
        .await
        .map_err(crate::service::HarvestError::from)?;
    Ok(axum::Json(LogView {
        lines: lines.into_iter().map(Into::into).collect(),
    }))
}
