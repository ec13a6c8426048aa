//! The domain model: what a session is, who owns it and where it is in its life.
//!
//! Everything here is plain data. It is stored by the `store` module (bincode, versioned), shown
//! by the `api` module (JSON) and moved through its states only by compare-and-set methods of the
//! `Store` trait. Nothing in this module does I/O.

mod lifecycle;
mod v1;

pub use lifecycle::{CancelDecision, Progress, RequeueOutcome, Transition};
pub use v1::SessionV1;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Milliseconds since the Unix epoch. Time is always passed in (never read inside the store), so
/// tests control it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Timestamp {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Timestamp(ms)
    }

    /// Milliseconds since the epoch.
    pub fn millis(self) -> i64 {
        self.0
    }

    /// This instant plus a duration (saturating).
    #[allow(clippy::should_implement_trait)]
    pub fn add(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_add(d.as_millis().min(i64::MAX as u128) as i64),
        )
    }

    /// Time from `earlier` to `self`, zero when `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0).max(0) as u64)
    }

    /// RFC 3339 text in UTC with millisecond precision, e.g. `2026-11-25T16:22:40.123Z`.
    pub fn to_rfc3339(self) -> String {
        match chrono::DateTime::<chrono::Utc>::from_timestamp_millis(self.0) {
            Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            None => self.0.to_string(),
        }
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

// Human-readable formats (JSON) get RFC 3339 text; binary formats (the store) get the integer.
impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_rfc3339())
        } else {
            s.serialize_i64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            #[derive(Deserialize)]
            #[serde(untagged)]
            enum Repr {
                Millis(i64),
                Text(String),
            }
            match Repr::deserialize(d)? {
                Repr::Millis(ms) => Ok(Timestamp(ms)),
                Repr::Text(t) => chrono::DateTime::parse_from_rfc3339(&t)
                    .map(|t| Timestamp(t.timestamp_millis()))
                    .map_err(|e| serde::de::Error::custom(format!("bad timestamp {t:?}: {e}"))),
            }
        } else {
            Ok(Timestamp(i64::deserialize(d)?))
        }
    }
}

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

/// Per-session options. In JSON and TOML durations are whole seconds named `*_secs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionOptions {
    /// Wall clock of one attempt; exceeding it ends the session FAILED
    /// (`max_duration_exceeded`). `None`: no limit.
    pub max_duration_secs: Option<u64>,
    /// How long a terminal session and its data stay before cleanup. `None`: the service default.
    pub session_timeout_secs: Option<u64>,
    /// Keep usage counters (TokenUsage).
    pub token_tracking: bool,
    /// Attempts before a failing session ends FAILED. `None`: the service default.
    pub max_attempts: Option<u32>,
    /// Higher runs first.
    pub priority: i32,
    /// Not before this time.
    pub run_at: Option<Timestamp>,
    /// Remove the session's records once its client has read them all.
    pub remove_after_export: bool,
    /// Remove externally exported rows at cleanup.
    pub cleanup_external: bool,
}

impl SessionOptions {
    /// Largest `max_duration_secs` a submission may ask for: one year. Bounds keep every
    /// deadline computed from it well inside the range of the clocks.
    pub const MAX_DURATION_SECS: u64 = 365 * 86_400;

    /// Largest `session_timeout_secs` a submission may ask for: ten years.
    pub const MAX_TIMEOUT_SECS: u64 = 10 * 365 * 86_400;

    /// `max_duration_secs` as a duration, clamped to [`SessionOptions::MAX_DURATION_SECS`] (a
    /// value stored by an older build cannot overflow deadline arithmetic).
    pub fn max_duration(&self) -> Option<Duration> {
        self.max_duration_secs
            .map(|d| Duration::from_secs(d.min(Self::MAX_DURATION_SECS)))
    }
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            max_duration_secs: None,
            session_timeout_secs: None,
            token_tracking: true,
            max_attempts: None,
            priority: 0,
            run_at: None,
            remove_after_export: false,
            cleanup_external: true,
        }
    }
}

/// Session options as a caller gives them: only the keys present. Applied over a base (the
/// defaults for a submission; the agent's options for an agent's run, so that a run's options
/// replace the agent's defaults key by key). `null` clears a key that may be unset
/// (`max_duration_secs`, `session_timeout_secs`, `max_attempts`, `run_at`); an unknown key or a
/// bad value is refused with its name, as for [`SessionOptions`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptionsPatch {
    /// See [`SessionOptions::max_duration_secs`].
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_duration_secs: Option<Option<u64>>,
    /// See [`SessionOptions::session_timeout_secs`].
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub session_timeout_secs: Option<Option<u64>>,
    /// See [`SessionOptions::token_tracking`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_tracking: Option<bool>,
    /// See [`SessionOptions::max_attempts`].
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_attempts: Option<Option<u32>>,
    /// See [`SessionOptions::priority`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// See [`SessionOptions::run_at`].
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub run_at: Option<Option<Timestamp>>,
    /// See [`SessionOptions::remove_after_export`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove_after_export: Option<bool>,
    /// See [`SessionOptions::cleanup_external`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleanup_external: Option<bool>,
}

/// A key that is present, even as `null` (`Some(None)`), as opposed to absent (`None`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

impl OptionsPatch {
    /// `base` with every key this patch gives replaced.
    pub fn apply_to(&self, base: &SessionOptions) -> SessionOptions {
        let mut o = base.clone();
        if let Some(v) = self.max_duration_secs {
            o.max_duration_secs = v;
        }
        if let Some(v) = self.session_timeout_secs {
            o.session_timeout_secs = v;
        }
        if let Some(v) = self.token_tracking {
            o.token_tracking = v;
        }
        if let Some(v) = self.max_attempts {
            o.max_attempts = v;
        }
        if let Some(v) = self.priority {
            o.priority = v;
        }
        if let Some(v) = self.run_at {
            o.run_at = v;
        }
        if let Some(v) = self.remove_after_export {
            o.remove_after_export = v;
        }
        if let Some(v) = self.cleanup_external {
            o.cleanup_external = v;
        }
        o
    }
}

impl From<SessionOptions> for OptionsPatch {
    /// Every key set to the options' value.
    fn from(o: SessionOptions) -> OptionsPatch {
        OptionsPatch {
            max_duration_secs: Some(o.max_duration_secs),
            session_timeout_secs: Some(o.session_timeout_secs),
            token_tracking: Some(o.token_tracking),
            max_attempts: Some(o.max_attempts),
            priority: Some(o.priority),
            run_at: Some(o.run_at),
            remove_after_export: Some(o.remove_after_export),
            cleanup_external: Some(o.cleanup_external),
        }
    }
}

/// Progress of a session, over all its attempts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionMetrics {
    /// When its first attempt started.
    pub start_time: Option<Timestamp>,
    /// When the session ended.
    pub end_time: Option<Timestamp>,
    /// Pages fetched and processed (all attempts).
    pub pages_processed: u64,
    /// Elements processed (all attempts): the records extracted, for the scraper; the
    /// processors executed, for a Web-Harvest config.
    pub processed_elements: u64,
    /// Time spent running, in ended attempts.
    pub running_ms: u64,
    /// When the attempt running now started (`None` unless RUNNING).
    pub running_since: Option<Timestamp>,
}

impl SessionMetrics {
    /// From the first start to the end (or to `now` while not ended).
    pub fn duration(&self, now: Timestamp) -> Duration {
        match self.start_time {
            Some(start) => self.end_time.unwrap_or(now).since(start),
            None => Duration::ZERO,
        }
    }

    /// Time spent running, every attempt's, up to `now` for the one running.
    pub fn running_time(&self, now: Timestamp) -> Duration {
        let current = self.running_since.map_or(Duration::ZERO, |t| now.since(t));
        Duration::from_millis(self.running_ms) + current
    }

    /// Elements per second of running time (time between attempts, waiting in the queue,
    /// does not count).
    pub fn processing_rate(&self, now: Timestamp) -> f64 {
        let secs = self.running_time(now).as_secs_f64();
        if secs > 0.0 {
            self.processed_elements as f64 / secs
        } else {
            0.0
        }
    }
}

/// How one attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// The session COMPLETED.
    Completed,
    /// The session ended FAILED.
    Failed,
    /// The session ended CANCELLED.
    Cancelled,
    /// It failed and was queued for another attempt.
    Retried,
    /// Its worker handed it back unfinished (shutdown), without spending an attempt.
    HandedBack,
    /// Its worker stopped renewing the lease (died, or was cut off); taken back.
    LeaseExpired,
}

impl AttemptOutcome {
    /// The outcome of an attempt that ended the session in `status`.
    pub fn ended(status: SessionStatus) -> AttemptOutcome {
        match status {
            SessionStatus::Completed => AttemptOutcome::Completed,
            SessionStatus::Cancelled => AttemptOutcome::Cancelled,
            _ => AttemptOutcome::Failed,
        }
    }

    /// Snake-case name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Completed => "completed",
            AttemptOutcome::Failed => "failed",
            AttemptOutcome::Cancelled => "cancelled",
            AttemptOutcome::Retried => "retried",
            AttemptOutcome::HandedBack => "handed_back",
            AttemptOutcome::LeaseExpired => "lease_expired",
        }
    }

    /// The outcome named `s`.
    pub fn parse(s: &str) -> Option<AttemptOutcome> {
        [
            AttemptOutcome::Completed,
            AttemptOutcome::Failed,
            AttemptOutcome::Cancelled,
            AttemptOutcome::Retried,
            AttemptOutcome::HandedBack,
            AttemptOutcome::LeaseExpired,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
    }
}

/// One attempt of a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// Its number (the session's `attempt` while it ran).
    pub attempt: u32,
    /// When it was claimed.
    pub started_at: Timestamp,
    /// When it ended (`None` while running).
    pub ended_at: Option<Timestamp>,
    /// How it ended (`None` while running).
    pub outcome: Option<AttemptOutcome>,
}

/// Attempts a session remembers: the newest, when more ran (a session handed back at every
/// shutdown could otherwise grow without bound).
pub const ATTEMPTS_KEPT: usize = 20;

/// Usage counters of a session (the seed's TokenTracker). Summable per client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    /// HTTP requests sent (retries included).
    pub http_requests: u64,
    /// Requests that ended in an error (transport error or status >= 400).
    pub http_errors: u64,
    /// Response body bytes received.
    pub bytes_received: u64,
    /// Retries sent.
    pub retries: u64,
    /// URLs not fetched because robots.txt disallows them.
    pub robots_blocked: u64,
}

impl std::ops::AddAssign for TokenUsage {
    fn add_assign(&mut self, o: TokenUsage) {
        self.http_requests += o.http_requests;
        self.http_errors += o.http_errors;
        self.bytes_received += o.bytes_received;
        self.retries += o.retries;
        self.robots_blocked += o.robots_blocked;
    }
}

/// Why a session failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionError {
    /// A stable machine-readable kind (see [`ErrorKind`]).
    pub kind: ErrorKind,
    /// What happened, for a person.
    pub message: String,
}

impl SessionError {
    /// A new error.
    pub fn new(kind: impl Into<ErrorKind>, message: impl Into<String>) -> SessionError {
        SessionError {
            kind: kind.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

/// The kind of a [`SessionError`]: a stable snake_case name clients may branch on. Stored and
/// served as its name, so a kind added by a newer harvest reads back as [`ErrorKind::Other`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// An attempt ran longer than `max_duration_secs`.
    MaxDurationExceeded,
    /// The last attempt failed (or lost its lease without progress) and none are left.
    AttemptsExhausted,
    /// The attempt's worker stopped renewing its lease (it died or was cut off); retried.
    LeaseExpired,
    /// The job reported a failure.
    JobFailed,
    /// The job panicked (a bug; see the service log).
    JobPanicked,
    /// The session's config does not validate (only for configs stored by another version).
    InvalidConfig,
    /// An export sink failed.
    ExportFailed,
    /// The store failed while the attempt ran.
    StoreError,
    /// The HTTP client could not start.
    HttpClient,
    /// No start URL could be fetched.
    FetchFailed,
    /// More pages failed than `limits.max_error_ratio` allows.
    ErrorRatioExceeded,
    /// Any other kind, by name.
    Other(String),
}

impl ErrorKind {
    /// The kinds harvest itself names, in no particular order.
    pub const KNOWN: [ErrorKind; 11] = [
        ErrorKind::MaxDurationExceeded,
        ErrorKind::AttemptsExhausted,
        ErrorKind::LeaseExpired,
        ErrorKind::JobFailed,
        ErrorKind::JobPanicked,
        ErrorKind::InvalidConfig,
        ErrorKind::ExportFailed,
        ErrorKind::StoreError,
        ErrorKind::HttpClient,
        ErrorKind::FetchFailed,
        ErrorKind::ErrorRatioExceeded,
    ];

    /// The snake_case name.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorKind::MaxDurationExceeded => "max_duration_exceeded",
            ErrorKind::AttemptsExhausted => "attempts_exhausted",
            ErrorKind::LeaseExpired => "lease_expired",
            ErrorKind::JobFailed => "job_failed",
            ErrorKind::JobPanicked => "job_panicked",
            ErrorKind::InvalidConfig => "invalid_config",
            ErrorKind::ExportFailed => "export_failed",
            ErrorKind::StoreError => "store_error",
            ErrorKind::HttpClient => "http_client",
            ErrorKind::FetchFailed => "fetch_failed",
            ErrorKind::ErrorRatioExceeded => "error_ratio_exceeded",
            ErrorKind::Other(s) => s,
        }
    }
}

impl From<&str> for ErrorKind {
    fn from(s: &str) -> ErrorKind {
        ErrorKind::KNOWN
            .into_iter()
            .find(|k| k.as_str() == s)
            .unwrap_or_else(|| ErrorKind::Other(s.to_string()))
    }
}

impl From<String> for ErrorKind {
    fn from(s: String) -> ErrorKind {
        ErrorKind::from(s.as_str())
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for ErrorKind {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for ErrorKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

// As its name in every format (a string in bincode too), so stored values keep their layout.
impl Serialize for ErrorKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(ErrorKind::from(String::deserialize(d)?))
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
    /// The scraper config, normalized to JSON (validated at submission).
    #[serde(with = "json_text")]
    pub config: serde_json::Value,
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
mod tests {
    use super::*;

    #[test]
    fn session_id_rules() {
        assert!(SessionId::parse("ry37456r").is_ok());
        assert!(SessionId::parse("a.b_c:d-e").is_ok());
        assert_eq!(SessionId::parse(""), Err(SessionIdError::Empty));
        assert_eq!(
            SessionId::parse(&"x".repeat(129)),
            Err(SessionIdError::TooLong(129))
        );
        assert!(SessionId::parse(&"x".repeat(128)).is_ok());
        assert!(matches!(
            SessionId::parse("a/b"),
            Err(SessionIdError::BadChar('/', 1))
        ));
        assert!(matches!(
            SessionId::parse("a\nb"),
            Err(SessionIdError::BadChar('\n', 1))
        ));
        assert_eq!(SessionId::parse(".."), Err(SessionIdError::Dots));
        assert_eq!(SessionId::parse("a..b"), Err(SessionIdError::Dots));
        assert!(matches!(
            SessionId::parse("é"),
            Err(SessionIdError::BadChar('é', 0))
        ));
    }

    #[test]
    fn an_options_patch_replaces_only_the_keys_it_gives() {
        let base = SessionOptions {
            session_timeout_secs: Some(60),
            max_duration_secs: Some(10),
            ..SessionOptions::default()
        };
        let patch: OptionsPatch =
            serde_json::from_str(r#"{"priority": 1, "max_duration_secs": null}"#).unwrap();
        let o = patch.apply_to(&base);
        assert_eq!(
            (o.priority, o.session_timeout_secs, o.max_duration_secs),
            (1, Some(60), None)
        );
        let err = serde_json::from_str::<OptionsPatch>(r#"{"prio": 1}"#).unwrap_err();
        assert!(err.to_string().contains("prio"), "{err}");
        assert_eq!(
            OptionsPatch::from(base.clone()).apply_to(&SessionOptions::default()),
            base
        );
    }

    #[test]
    fn status_predicates() {
        use SessionStatus::*;
        for s in SessionStatus::ALL {
            assert_eq!(s.is_active(), !s.is_terminal());
            assert_eq!(s.as_str().parse::<SessionStatus>(), Ok(s));
        }
        assert!(Completed.is_successful() && !Failed.is_successful());
        assert!(Pending.is_active() && Running.is_active());
        assert_eq!(serde_json::to_string(&Cancelled).unwrap(), "\"CANCELLED\"");
    }

    #[test]
    fn timestamp_json_and_binary() {
        let t = Timestamp(1_764_087_760_123);
        let j = serde_json::to_string(&t).unwrap();
        assert_eq!(j, "\"2025-11-25T16:22:40.123Z\"");
        assert_eq!(serde_json::from_str::<Timestamp>(&j).unwrap(), t);
        let b = bincode::serde::encode_to_vec(t, bincode::config::standard()).unwrap();
        let (back, _): (Timestamp, usize) =
            bincode::serde::decode_from_slice(&b, bincode::config::standard()).unwrap();
        assert_eq!(back, t);
    }
}
