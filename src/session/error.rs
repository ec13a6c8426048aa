//! Why a session failed: a stable kind and a message for a person.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

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
