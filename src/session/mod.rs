//! The domain model: what a session is, who owns it and where it is in its life.
//!
//! Everything here is plain data. It is stored by the `store` module (bincode, versioned), shown
//! by the `api` module (JSON) and moved through its states only by compare-and-set methods of the
//! `Store` trait. Nothing in this module does I/O.

mod config;
mod error;
mod lifecycle;
mod options;
mod progress;
mod time;
mod v1;

pub use config::JobConfig;
pub use error::{ErrorKind, SessionError};
pub use lifecycle::{CancelDecision, Progress, RequeueOutcome, Transition};
pub use options::{OptionsPatch, SessionOptions};
pub use progress::{ATTEMPTS_KEPT, AttemptOutcome, AttemptRecord, SessionMetrics, TokenUsage};
pub use time::Timestamp;
pub use v1::SessionV1;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// JSON values inside stored structs: a JSON value in JSON, JSON text in bincode (which cannot
/// decode self-describing data).
pub(crate) mod json_text {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, T: Serialize>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            v.serialize(s)
        } else {
            let text = serde_json::to_string(v).map_err(serde::ser::Error::custom)?;
            s.serialize_str(&text)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: serde::de::DeserializeOwned>(
        d: D,
    ) -> Result<T, D::Error> {
        if d.is_human_readable() {
            T::deserialize(d)
        } else {
            let text = String::deserialize(d)?;
            serde_json::from_str(&text).map_err(serde::de::Error::custom)
        }
    }
}

/// Why a session id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionIdError {
    /// The id is the empty string.
    #[error("session id is empty; use 1 to 128 characters of [A-Za-z0-9._:-]")]
    Empty,
    /// The id is longer than 128 characters.
    #[error("session id is {0} characters long; the limit is 128")]
    TooLong(usize),
    /// The id has a character outside `[A-Za-z0-9._:-]`.
    #[error("session id has the character {0:?} at {1}; only [A-Za-z0-9._:-] are allowed")]
    BadChar(char, usize),
    /// The id is `.` or `..`, or contains `..`, which would read as a path.
    #[error("session id must not be or contain \"..\" or be \".\"")]
    Dots,
}

/// A session's id: a UUID v7 made by the service, or a caller's unique string of 1 to 128
/// characters of `[A-Za-z0-9._:-]`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct SessionId(String);

impl SessionId {
    /// A new time-ordered UUID v7 id.
    pub fn generate() -> SessionId {
        SessionId(uuid::Uuid::now_v7().to_string())
    }

    /// Validates a caller-supplied id.
    pub fn parse(s: &str) -> Result<SessionId, SessionIdError> {
        if s.is_empty() {
            return Err(SessionIdError::Empty);
        }
        let n = s.chars().count();
        if n > 128 {
            return Err(SessionIdError::TooLong(n));
        }
        for (i, c) in s.chars().enumerate() {
            if !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')) {
                return Err(SessionIdError::BadChar(c, i));
            }
        }
        if s == "." || s.contains("..") {
            return Err(SessionIdError::Dots);
        }
        Ok(SessionId(s.to_string()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for SessionId {
    type Err = SessionIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SessionId::parse(s)
    }
}

/// A session's identity in the store: its tenant's namespace and its id. Ids are unique within a
/// tenant only: two tenants may each have a session `a1`, and neither learns of the other's.
/// `client` is `None` without `[[clients]]` (one namespace, as when ids were global) and for
/// sessions stored before ids were scoped; otherwise the configured client's id (never empty).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SessionKey {
    /// The tenant (`None`: the single namespace).
    pub client: Option<String>,
    /// The id within it.
    pub id: SessionId,
}

impl SessionKey {
    /// The key of `id` in `client`'s namespace (`None` or `""`: the single namespace).
    pub fn new(client: Option<&str>, id: SessionId) -> SessionKey {
        SessionKey {
            client: client.filter(|c| !c.is_empty()).map(str::to_string),
            id,
        }
    }

    /// The key of `id` in the single namespace (no `[[clients]]`).
    pub fn single(id: SessionId) -> SessionKey {
        SessionKey { client: None, id }
    }

    /// The tenant as stored: `""` for the single namespace (a configured client id is never
    /// empty, so the encoding is one to one).
    pub fn tenant(&self) -> &str {
        self.client.as_deref().unwrap_or("")
    }
}

impl From<SessionId> for SessionKey {
    fn from(id: SessionId) -> SessionKey {
        SessionKey::single(id)
    }
}

impl From<&SessionKey> for SessionKey {
    fn from(key: &SessionKey) -> SessionKey {
        key.clone()
    }
}

impl From<&SessionId> for SessionKey {
    fn from(id: &SessionId) -> SessionKey {
        SessionKey::single(id.clone())
    }
}

/// `id`, or `client/id` within a tenant (for logs and error messages).
impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.client {
            None => f.write_str(self.id.as_str()),
            Some(c) => write!(f, "{c}/{}", self.id),
        }
    }
}

impl<'de> Deserialize<'de> for SessionId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SessionId::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Who submitted a session: a client id and metadata that never changes after creation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientContext {
    client_id: String,
    #[serde(with = "json_text", default)]
    metadata: BTreeMap<String, serde_json::Value>,
}

impl ClientContext {
    /// A context with only a client id.
    pub fn of(client_id: impl Into<String>) -> ClientContext {
        ClientContext {
            client_id: client_id.into(),
            metadata: BTreeMap::new(),
        }
    }

    /// A builder for a context with metadata.
    pub fn builder() -> ClientContextBuilder {
        ClientContextBuilder::default()
    }

    /// The client's id ("" for the anonymous single user).
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// One metadata value.
    pub fn metadata(&self, key: &str) -> Option<&serde_json::Value> {
        self.metadata.get(key)
    }

    /// All metadata.
    pub fn all_metadata(&self) -> &BTreeMap<String, serde_json::Value> {
        &self.metadata
    }
}

/// Builds a [`ClientContext`].
#[derive(Default, Debug)]
pub struct ClientContextBuilder {
    inner: ClientContext,
}

impl ClientContextBuilder {
    /// Sets the client id.
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.inner.client_id = id.into();
        self
    }

    /// Adds one metadata entry.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.inner.metadata.insert(key.into(), value.into());
        self
    }

    /// The finished, immutable context.
    pub fn build(self) -> ClientContext {
        self.inner
    }
}

/// Where a session is in its life. Terminal states never change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum SessionStatus {
    /// Submitted and durable; waiting for a worker (set by submit, and by a requeue).
    Pending,
    /// Claimed by a worker under a lease (set by claim).
    Running,
    /// The work finished and its records are committed (set by the worker that holds the lease).
    Completed,
    /// The work failed for good: attempts exhausted, a permanent error or `max_duration` (set by
    /// the worker, or by the store when a crashed session has no attempts left).
    Failed,
    /// Cancelled by a client (set by cancel when PENDING, by the worker when RUNNING).
    Cancelled,
}

impl SessionStatus {
    /// All statuses, in lifecycle order.
    pub const ALL: [SessionStatus; 5] = [
        SessionStatus::Pending,
        SessionStatus::Running,
        SessionStatus::Completed,
        SessionStatus::Failed,
        SessionStatus::Cancelled,
    ];

    /// COMPLETED, FAILED or CANCELLED.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            SessionStatus::Completed | SessionStatus::Failed | SessionStatus::Cancelled
        )
    }

    /// COMPLETED.
    pub fn is_successful(self) -> bool {
        self == SessionStatus::Completed
    }

    /// PENDING or RUNNING.
    pub fn is_active(self) -> bool {
        !self.is_terminal()
    }

    /// Upper-case name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Pending => "PENDING",
            SessionStatus::Running => "RUNNING",
            SessionStatus::Completed => "COMPLETED",
            SessionStatus::Failed => "FAILED",
            SessionStatus::Cancelled => "CANCELLED",
        }
    }

    /// Small integer used in store keys.
    pub fn code(self) -> u8 {
        self as u8
    }
}

impl fmt::Display for SessionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SessionStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SessionStatus::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!(
                    "unknown status {s:?}; expected one of PENDING, RUNNING, COMPLETED, FAILED, CANCELLED"
                )
            })
    }
}

/// One of a session's context variables: a text, or a list of texts (JSON: a string, or an
/// array of strings).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ContextValue {
    /// A text.
    Text(String),
    /// A list of texts.
    List(Vec<String>),
}

/// A session's context: its variables when it ended (a Web-Harvest config's top-level
/// variables; a scraper config's `[vars]` in effect), by name.
pub type Context = BTreeMap<String, ContextValue>;

/// What a session runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The scraper config, normalized to JSON (validated at submission); parsed on first read.
    pub config: JobConfig,
    /// Session parameters; they override the config's `[vars]`.
    pub params: BTreeMap<String, String>,
    /// The agent this session runs for, if any.
    pub agent: Option<String>,
}

/// A worker's claim on a running session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The worker that holds it (unique per worker task and process start).
    pub owner: String,
    /// When it runs out unless renewed.
    pub expires_at: Timestamp,
}

/// A session: everything the store keeps about one scrape job except its records, frontier and
/// log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// Unique id within its tenant.
    pub id: SessionId,
    /// The tenant whose namespace holds the id (see [`SessionKey`]). Part of the store key, not
    /// of the stored value: a store fills it in from the key it read the session under.
    #[serde(skip)]
    pub tenant: Option<String>,
    /// Submission order, assigned by the store; also the list cursor.
    pub seq: u64,
    /// Who owns it.
    pub client: ClientContext,
    /// Where it is in its life.
    pub status: SessionStatus,
    /// What it runs.
    pub job: JobSpec,
    /// Options given at submission, with service defaults filled in.
    pub options: SessionOptions,
    /// How many times it has been claimed; the fencing token of every compare-and-set.
    pub attempt: u32,
    /// Attempts that counted against `max_attempts` (a crash after committed progress does not).
    pub failures: u32,
    /// Whether the current attempt has committed a checkpoint.
    pub progress_this_attempt: bool,
    /// The lease while RUNNING.
    pub lease: Option<Lease>,
    /// A client asked to cancel while RUNNING; the worker ends it CANCELLED.
    pub cancel_requested: bool,
    /// Not claimed before this time (run_at, or a retry's backoff).
    pub run_at: Timestamp,
    /// When it was submitted.
    pub created_at: Timestamp,
    /// Last change.
    pub updated_at: Timestamp,
    /// When a terminal session is removed (set when it ends).
    pub cleanup_at: Option<Timestamp>,
    /// Progress.
    pub metrics: SessionMetrics,
    /// Usage counters.
    pub usage: TokenUsage,
    /// Why it failed (or the last retryable error while PENDING again).
    pub error: Option<SessionError>,
    /// Checkpoints committed (all attempts).
    pub checkpoints: u64,
    /// Records committed (all attempts): the next record's number.
    pub records: u64,
    /// Records no longer held, from the first (`remove_after_export` removed them once an
    /// external sink, or a complete read, had them); `records - records_removed` are held.
    pub records_removed: u64,
    /// Its attempts, oldest first (the newest [`ATTEMPTS_KEPT`]).
    pub attempts: Vec<AttemptRecord>,
}

impl Session {
    /// How long this session and its data stay once terminal: its own `session_timeout_secs`,
    /// else `default` (the service's).
    pub fn cleanup_after(&self, default: Duration) -> Duration {
        self.options
            .session_timeout_secs
            .map_or(default, Duration::from_secs)
    }

    /// A new PENDING session as submitted at `now`: due at `options.run_at` (or now), never
    /// claimed, nothing recorded. The store assigns `seq` when it inserts it.
    pub fn pending(
        id: SessionId,
        client: ClientContext,
        job: JobSpec,
        options: SessionOptions,
        now: Timestamp,
    ) -> Session {
        Session {
            id,
            tenant: None,
            seq: 0,
            client,
            status: SessionStatus::Pending,
            job,
            run_at: options.run_at.unwrap_or(now),
            options,
            attempt: 0,
            failures: 0,
            progress_this_attempt: false,
            lease: None,
            cancel_requested: false,
            created_at: now,
            updated_at: now,
            cleanup_at: None,
            metrics: SessionMetrics::default(),
            usage: TokenUsage::default(),
            error: None,
            checkpoints: 0,
            records: 0,
            records_removed: 0,
            attempts: Vec::new(),
        }
    }

    /// Its key in the store: tenant and id.
    pub fn key(&self) -> SessionKey {
        SessionKey {
            client: self.tenant.clone(),
            id: self.id.clone(),
        }
    }

    /// Records committed and still held.
    pub fn records_held(&self) -> u64 {
        self.records.saturating_sub(self.records_removed)
    }

    /// The effective max attempts (options value or 3).
    pub fn max_attempts(&self) -> u32 {
        self.options.max_attempts.unwrap_or(3).max(1)
    }
}

/// One extracted item, numbered within its session from 0.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Position within the session.
    pub seq: u64,
    /// The item.
    pub data: serde_json::Value,
}

/// A URL waiting to be fetched, with what the crawler needs to know about it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FrontierEntry {
    /// Canonical URL.
    pub url: String,
    /// Links followed from a start URL.
    pub depth: u32,
    /// Page type (key of `[pages]`), if the link rule named one.
    pub page: Option<String>,
}

/// One line of a session's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// When it was said.
    pub at: Timestamp,
    /// `info`, `warn` or `error`.
    pub level: String,
    /// What was said.
    pub message: String,
}

#[cfg(test)]
mod tests;
