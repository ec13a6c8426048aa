//! The JSON shapes of the API: request bodies, query strings, and views of sessions.
//!
//! Views are separate structs rather than the stored [`Session`] serialized as is, so the wire
//! format is a deliberate contract (documented in the OpenAPI spec) and internal fields (lease,
//! seq, failures) never leak. The job spec (config and params) is shown to the session's owner
//! only in the single-session view, where "run again" needs it; lists and events leave it out
//! (a config can be large, and a progress event carries no news about it).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::event::Event;
use crate::session::{LogLine, OptionsPatch, Session, SessionOptions, Timestamp};

/// `POST /v1/sessions` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    /// The scraper config: a JSON object, or a string of TOML (or of JSON). Give either this or
    /// `agent`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub config: serde_json::Value,
    /// Run this saved agent (its config, params and options, overridden by this body's) instead
    /// of an inline `config`.
    #[serde(default)]
    pub agent: Option<String>,
    /// Parameters overriding the config's `[vars]` (scalar values; numbers and booleans are
    /// taken as their text).
    #[serde(default)]
    #[schema(value_type = Option<BTreeMap<String, Object>>)]
    pub params: BTreeMap<String, serde_json::Value>,
    /// Who submits it. With clients configured, `client_id` is the caller's, whatever is sent.
    #[serde(default)]
    pub client: Option<ClientBody>,
    /// Options; unset ones take the service defaults (for an `agent` run: the agent's, key by
    /// key).
    #[serde(default)]
    #[schema(value_type = Option<OptionsView>)]
    pub options: Option<OptionsPatch>,
    /// A caller-chosen unique id (1–128 characters of `[A-Za-z0-9._:-]`); default a UUID v7.
    #[serde(default)]
    pub session_id: Option<String>,
}

/// `POST /v1/sessions/batch` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchBody {
    /// The submissions (at most 1000), each as the body of `POST /v1/sessions` without `agent`.
    pub items: Vec<SubmitBody>,
}

/// `POST /v1/sessions/batch` answer: one result per submitted item, in order.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchView {
    /// Items created.
    pub created: usize,
    /// Items refused (each with its error).
    pub failed: usize,
    /// Per item, in the order given.
    pub items: Vec<BatchItemView>,
}

/// One item of a batch: `{status: 201, id}` when created, else `{status, error}` with what
/// `POST /v1/sessions` would have answered for it alone.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchItemView {
    /// 201 when created; else the item's own error status (400, 409, 429, ...).
    pub status: u16,
    /// The new session's id, when created.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Why the item was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<super::error::ErrorDetail>,
}

/// `POST /v1/configs/validate` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ValidateBody {
    /// The scraper config: a JSON object, or a string of TOML (or of JSON).
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
    /// Params as a submission would give them (scalar values).
    #[serde(default)]
    #[schema(value_type = Option<BTreeMap<String, Object>>)]
    pub params: BTreeMap<String, serde_json::Value>,
}

/// A config that validates.
#[derive(Debug, Serialize, ToSchema)]
pub struct ValidView {
    /// Always true (an invalid config is a 400 naming the field).
    pub valid: bool,
    /// The config as JSON (TOML converted), as a session would store it.
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
}

/// The submitter of a session.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientBody {
    /// Client id (ignored when the server has clients: the token decides).
    #[serde(default)]
    pub client_id: Option<String>,
    /// Immutable metadata, string to JSON value.
    #[serde(default)]
    #[schema(value_type = Option<BTreeMap<String, Object>>)]
    pub metadata: BTreeMap<String, serde_json::Value>,
}

/// Session options as JSON (durations in whole seconds).
#[derive(Debug, Serialize, ToSchema)]
pub struct OptionsView {
    /// Wall clock of one attempt; exceeding it ends the session FAILED. Null: no limit.
    pub max_duration_secs: Option<u64>,
    /// How long a terminal session and its data stay before automatic cleanup.
    pub session_timeout_secs: Option<u64>,
    /// Keep usage counters.
    pub token_tracking: bool,
    /// Attempts before a failing session ends FAILED.
    #[schema(minimum = 1, maximum = 10000)]
    pub max_attempts: Option<u32>,
    /// Higher runs first.
    pub priority: i32,
    /// Not before this time (RFC 3339).
    #[schema(value_type = Option<String>, format = DateTime)]
    pub run_at: Option<Timestamp>,
    /// Remove the records once they were all read.
    pub remove_after_export: bool,
    /// Remove externally exported rows at cleanup.
    pub cleanup_external: bool,
}

impl From<&SessionOptions> for OptionsView {
    fn from(o: &SessionOptions) -> OptionsView {
        OptionsView {
            max_duration_secs: o.max_duration_secs,
            session_timeout_secs: o.session_timeout_secs,
            token_tracking: o.token_tracking,
            max_attempts: o.max_attempts,
            priority: o.priority,
            run_at: o.run_at,
            remove_after_export: o.remove_after_export,
            cleanup_external: o.cleanup_external,
        }
    }
}

/// Who owns a session.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClientView {
    /// Client id ("" for the single user of a server without clients).
    pub client_id: String,
    /// Metadata given at submission.
    #[schema(value_type = BTreeMap<String, Object>)]
    pub metadata: BTreeMap<String, serde_json::Value>,
}

/// Progress of a session, over all its attempts.
#[derive(Debug, Serialize, ToSchema)]
pub struct MetricsView {
    /// When its first attempt started.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub start_time: Option<Timestamp>,
    /// When the session ended.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub end_time: Option<Timestamp>,
    /// From the first start to the end (or to now while not ended), in seconds.
    pub duration_secs: f64,
    /// Time spent running (every attempt's; not the time waiting between them), in seconds.
    pub running_secs: f64,
    /// Pages fetched and processed.
    pub pages_processed: u64,
    /// Elements processed: records extracted (the scraper), processors executed (a Web-Harvest
    /// config).
    pub processed_elements: u64,
    /// Elements per second of running time.
    pub processing_rate: f64,
}

/// One attempt of a session.
#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptView {
    /// Its number.
    pub attempt: u32,
    /// When it was claimed.
    #[schema(value_type = String, format = DateTime)]
    pub started_at: Timestamp,
    /// When it ended; null while running.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub ended_at: Option<Timestamp>,
    /// `running`, `completed`, `failed`, `cancelled`, `retried` (failed, run again),
    /// `handed_back` (its worker stopped; not counted against max_attempts) or `lease_expired`.
    pub outcome: String,
}

/// Usage counters.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageView {
    /// HTTP requests sent (retries included).
    pub http_requests: u64,
    /// Requests that ended in an error.
    pub http_errors: u64,
    /// Response body bytes received.
    pub bytes_received: u64,
    /// Retries sent.
    pub retries: u64,
    /// URLs skipped because robots.txt disallows them.
    pub robots_blocked: u64,
}

/// Why a session failed.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorView {
    /// Stable kind, e.g. `max_duration_exceeded`.
    pub kind: String,
    /// What happened.
    pub message: String,
}

/// A session as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionView {
    /// Unique id.
    pub id: String,
    /// PENDING, RUNNING, COMPLETED, FAILED or CANCELLED.
    #[schema(value_type = String, example = "PENDING")]
    pub status: crate::session::SessionStatus,
    /// Who owns it.
    pub client: ClientView,
    /// How many times it has been claimed.
    pub attempt: u32,
    /// Options, with service defaults filled in.
    pub options: OptionsView,
    /// Progress.
    pub metrics: MetricsView,
    /// Usage counters; null when the session's `token_tracking` is off.
    pub usage: Option<UsageView>,
    /// Its attempts, oldest first (the newest 20).
    pub attempts: Vec<AttemptView>,
    /// Why it failed (or the last retryable error while PENDING again).
    pub error: Option<ErrorView>,
    /// A client asked to cancel it while RUNNING.
    pub cancel_requested: bool,
    /// When it was submitted.
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    /// Last change.
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: Timestamp,
    /// Not claimed before this time.
    #[schema(value_type = String, format = DateTime)]
    pub run_at: Timestamp,
    /// When a terminal session will be removed.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub cleanup_at: Option<Timestamp>,
    /// The agent it runs for.
    pub agent: Option<String>,
    /// Records committed (all attempts).
    pub records: u64,
    /// Records still held: fewer than `records` once `remove_after_export` removed them (after
    /// an external sink had them, or a complete read).
    pub records_held: u64,
    /// What the session runs: only in `GET /v1/sessions/{id}`, absent from lists and events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<JobView>,
}

/// The job of a session: enough to submit the same run again.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobView {
    /// The scraper config, normalized to JSON.
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
    /// The session's params (they override the config's `[vars]`).
    pub params: BTreeMap<String, String>,
    /// The agent it runs for, if any.
    pub agent: Option<String>,
}

impl JobView {
    /// The job of a session.
    pub fn of(s: &Session) -> JobView {
        JobView {
            config: s.job.config.value().clone(),
            params: s.job.params.clone(),
            agent: s.job.agent.clone(),
        }
    }
}

impl SessionView {
    /// The view of a session at `now` (durations of running sessions count to `now`).
    pub fn of(s: &Session, now: Timestamp) -> SessionView {
        SessionView {
            id: s.id.to_string(),
            status: s.status,
            client: ClientView {
                client_id: s.client.client_id().to_string(),
                metadata: s.client.all_metadata().clone(),
            },
            attempt: s.attempt,
            options: OptionsView::from(&s.options),
            metrics: MetricsView {
                start_time: s.metrics.start_time,
                end_time: s.metrics.end_time,
                duration_secs: s.metrics.duration(now).as_secs_f64(),
                running_secs: s.metrics.running_time(now).as_secs_f64(),
                pages_processed: s.metrics.pages_processed,
                processed_elements: s.metrics.processed_elements,
                processing_rate: s.metrics.processing_rate(now),
            },
            usage: s.options.token_tracking.then_some(UsageView {
                http_requests: s.usage.http_requests,
                http_errors: s.usage.http_errors,
                bytes_received: s.usage.bytes_received,
                retries: s.usage.retries,
                robots_blocked: s.usage.robots_blocked,
            }),
            attempts: s
                .attempts
                .iter()
                .map(|a| AttemptView {
                    attempt: a.attempt,
                    started_at: a.started_at,
                    ended_at: a.ended_at,
                    outcome: a.outcome.map_or("running", |o| o.as_str()).to_string(),
                })
                .collect(),
            error: s.error.as_ref().map(|e| ErrorView {
                kind: e.kind.to_string(),
                message: e.message.clone(),
            }),
            cancel_requested: s.cancel_requested,
            created_at: s.created_at,
            updated_at: s.updated_at,
            run_at: s.run_at,
            cleanup_at: s.cleanup_at,
            agent: s.job.agent.clone(),
            records: s.records,
            records_held: s.records_held(),
            job: None,
        }
    }
}

/// A page of sessions.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionListView {
    /// Newest first.
    pub sessions: Vec<SessionView>,
    /// Pass as `cursor` for the next page; null at the end.
    pub next_cursor: Option<String>,
}

/// `GET /v1/sessions` query.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this client's sessions (with clients configured: must be the caller's own).
    pub client_id: Option<String>,
    /// Only sessions in this status (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED).
    pub status: Option<String>,
    /// Only runs of this agent (of the caller's agents).
    pub agent: Option<String>,
    /// Page size, 1..=1000 (default 50).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u64>,
    /// `next_cursor` of the previous page (opaque).
    pub cursor: Option<String>,
}

/// `GET /v1/sessions/{id}/records` query.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RecordsQuery {
    /// `json` (an array, the default), `jsonl` (one object per line) or `csv`.
    pub format: Option<String>,
    /// First record (0-based seq).
    #[param(minimum = 0)]
    pub offset: Option<u64>,
    /// At most this many records, 1..=10000; default: all of them, streamed.
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<u64>,
}

/// `GET /v1/sessions/{id}/log` query.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// The last this many lines, 1..=1000 (default 1000).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u64>,
}

/// `GET /v1/events` query.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only this client's sessions (with clients configured: must be the caller's own).
    pub client_id: Option<String>,
}

/// One line of a session's log.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogLineView {
    /// When.
    #[schema(value_type = String, format = DateTime)]
    pub at: Timestamp,
    /// `info`, `warn` or `error`.
    pub level: String,
    /// What.
    pub message: String,
}

impl From<LogLine> for LogLineView {
    fn from(l: LogLine) -> LogLineView {
        LogLineView {
            at: l.at,
            level: l.level,
            message: l.message,
        }
    }
}

/// A session's context: its variables when it ended.
#[derive(Debug, Serialize, ToSchema)]
pub struct ContextView {
    /// By name: a text (JSON string) or a list of texts (JSON array of strings).
    #[schema(value_type = BTreeMap<String, Object>)]
    pub variables: crate::session::Context,
}

/// One variable of a session's context.
#[derive(Debug, Serialize, ToSchema)]
pub struct VariableView {
    /// Its name.
    pub name: String,
    /// A text (JSON string) or a list of texts (JSON array of strings).
    #[schema(value_type = Object)]
    pub value: crate::session::ContextValue,
}

/// A session's log, oldest line first.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogView {
    /// The lines.
    pub lines: Vec<LogLineView>,
}

/// The `data` of one Server-Sent Event.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventView {
    /// created, started, progress, completed, failed, cancelled, requeued or removed.
    pub kind: String,
    /// Which session.
    pub session_id: String,
    /// Its owner.
    pub client_id: String,
    /// The session after the change (null for `removed` when it was already gone).
    pub session: Option<SessionView>,
}

impl EventView {
    /// The view of a bus event at `now`.
    pub fn of(e: &Event, now: Timestamp) -> EventView {
        EventView {
            kind: e.kind.as_str().to_string(),
            session_id: e.session_id.to_string(),
            client_id: e.client_id.clone(),
            session: e.session.as_deref().map(|s| SessionView::of(s, now)),
        }
    }
}

/// `/healthz` and `/readyz` answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthView {
    /// `ok` or `ready`.
    pub status: String,
}
