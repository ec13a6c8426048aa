//! [`StoreError`]: what went wrong in the storage layer, as a type a caller can act on.
//!
//! A failure of the backend keeps its cause (`std::error::Error::source`) and says what the
//! store was doing; [`StoreError::is_unavailable`] tells a backend that could not be reached (the
//! PostgreSQL server went away, the pool timed out, the disk refused an I/O), worth retrying
//! later, from one that will not heal by waiting (corrupt data, a constraint violated, a bug, a
//! store that must be reopened). Every message carries its cause's text too, so a log line or an
//! API error that prints only the top error still says what failed.

use std::io::ErrorKind;
use std::sync::Arc;

use deadpool_postgres::PoolError;

use crate::session::SessionId;

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `session_insert` with an id that exists.
    #[error("session {0} already exists; an id can be reused only once its session is removed")]
    Duplicate(SessionId),
    /// A value could not be decoded.
    #[error("stored value at {key} is corrupt: {reason}")]
    Corrupt {
        /// The key (or table and id) of the value.
        key: String,
        /// What was wrong.
        reason: String,
    },
    /// The store, or one value in it, was written by a newer harvest.
    #[error(
        "{what} has schema version {found}, but this harvest understands up to {supported}; upgrade harvest"
    )]
    NewerVersion {
        /// The store, or the key of the value.
        what: String,
        /// The version found.
        found: u32,
        /// [`super::SCHEMA_VERSION`].
        supported: u32,
    },
    /// A sled operation failed.
    #[error("sled: {context}: {source}")]
    Sled {
        /// What the store was doing.
        context: String,
        /// sled's error.
        #[source]
        source: sled::Error,
    },
    /// A PostgreSQL connection or statement failed.
    #[error("PostgreSQL, {context}: {}", postgres_cause(.source))]
    Postgres {
        /// What the store was doing.
        context: String,
        /// The driver's error (the server's, with its SQLSTATE, when it sent one).
        #[source]
        source: tokio_postgres::Error,
    },
    /// No PostgreSQL connection could be had from the pool.
    #[error("PostgreSQL, {context}: {}", pool_cause(.source))]
    Pool {
        /// What the store was doing.
        context: String,
        /// The pool's error.
        #[source]
        source: PoolError,
    },
    /// A file or thread the store needs could not be opened or started.
    #[error("{context}: {source}")]
    Io {
        /// What the store was doing.
        context: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A value could not be encoded for storage (a bug: every stored type encodes).
    #[error("encoding a stored value: {source}")]
    Encode {
        /// The encoder's error.
        #[source]
        source: bincode::error::EncodeError,
    },
    /// A write was applied but could not be made durable: the sled store's flush to disk failed
    /// (`source`), or the thread that flushes stopped (no `source`). Sticky: after a failed sync
    /// the kernel may have dropped dirty pages, so no later write is acknowledged either until
    /// the store is reopened.
    #[error(
        "flushing the sled store to disk failed ({}; no write is acknowledged until harvest restarts); the write may be lost: check the disk",
        flush_cause(.source)
    )]
    NotDurable {
        /// The flush's error.
        #[source]
        source: Option<Arc<StoreError>>,
    },
    /// A sled batch failed half-way: its intent would be replayed over newer data, so the store
    /// refuses every write until it is reopened (which completes the batch).
    #[error(
        "sled: an earlier write failed half-way; restart harvest to complete it before writing more"
    )]
    Poisoned,
    /// A parameter was out of range (e.g. a limit of 0).
    #[error("invalid store request: {0}")]
    Invalid(String),
    /// Another process has the sled data directory open (sled holds a file lock on it).
    #[error(
        "the data directory {} is in use by another harvest{}; stop that one, or give this one \
         another `data_dir` (HARVEST_DATA_DIR); many processes share one store with \
         store = \"postgres\"",
        .path.display(),
        .pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    InUse {
        /// The data directory.
        path: std::path::PathBuf,
        /// The process that holds it, as its pid file says (when it still runs).
        pid: Option<u32>,
    },
}

impl StoreError {
    /// Whether the backend could not be reached, so that the same call may succeed later: the
    /// PostgreSQL server refused or closed the connection, reported that it is shutting down,
    /// out of connections or of resources, or the pool timed out; a sled or file-system I/O
    /// error, another process holding the sled data directory (it may be shutting down). `false`
    /// for everything waiting will not fix: corrupt or newer data, a refused request, a
    /// constraint the server enforced, an encoding bug, and a sled store that must be reopened
    /// ([`StoreError::NotDurable`], [`StoreError::Poisoned`]).
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Sled { source, .. } => matches!(source, sled::Error::Io(_)),
            StoreError::Postgres { source, .. } => postgres_unavailable(source),
            StoreError::Pool { source, .. } => match source {
                PoolError::Timeout(_) => true,
                PoolError::Backend(e) => postgres_unavailable(e),
                PoolError::PostCreateHook(deadpool_postgres::HookError::Backend(e)) => {
                    postgres_unavailable(e)
                }
                PoolError::PostCreateHook(deadpool_postgres::HookError::Message(_))
                | PoolError::Closed
                | PoolError::NoRuntimeSpecified => false,
            },
            StoreError::Io { .. } | StoreError::InUse { .. } => true,
            StoreError::Duplicate(_)
            | StoreError::Corrupt { .. }
            | StoreError::NewerVersion { .. }
            | StoreError::Encode { .. }
            | StoreError::NotDurable { .. }
            | StoreError::Poisoned
            | StoreError::Invalid(_) => false,
        }
    }
}

/// Whether a driver error means the server could not be reached or went away.
fn postgres_unavailable(e: &tokio_postgres::Error) -> bool {
    if let Some(db) = e.as_db_error() {
        // 08: connection exception; 53: insufficient resources (too many connections, out of
        // memory or disk); 57P01-57P03: the server is shutting down or starting; 57P05: it
        // closed an idle session.
        let code = db.code().code();
        return code.starts_with("08")
            || code.starts_with("53")
            || matches!(code, "57P01" | "57P02" | "57P03" | "57P05");
    }
    if e.is_closed() {
        return true;
    }
    // The driver's I/O errors (connecting, reading, writing) carry the `std::io::Error`;
    // malformed messages are I/O errors of these two kinds, and a protocol bug, not an outage.
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| !matches!(io.kind(), ErrorKind::InvalidData | ErrorKind::InvalidInput))
}

/// The server's message, SQLSTATE and detail; else the driver's error and its cause (the
/// driver's own text leaves the cause out: "error connecting to server").
fn postgres_cause(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{} ({}){}",
            db.message(),
            db.code().code(),
            db.detail().map(|d| format!("; {d}")).unwrap_or_default()
        ),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

fn pool_cause(e: &PoolError) -> String {
    match e {
        PoolError::Backend(e) => format!("{}; check that the server is up", postgres_cause(e)),
        PoolError::Timeout(_) => {
            format!("{e}; check that the server is up and that the pool is not exhausted")
        }
        other => other.to_string(),
    }
}

fn flush_cause(source: &Option<Arc<StoreError>>) -> String {
    match source {
        Some(e) => e.to_string(),
        None => "the flusher thread stopped".into(),
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use deadpool_postgres::TimeoutType;

    use super::*;

    fn io(kind: ErrorKind) -> std::io::Error {
        std::io::Error::new(kind, "test")
    }

    #[test]
    fn sled_io_errors_are_unavailable_and_corruption_is_not() {
        let err = |source| StoreError::Sled {
            context: "reading a session".into(),
            source,
        };
        let down = err(sled::Error::Io(io(ErrorKind::Other)));
        assert!(down.is_unavailable());
        assert!(
            down.source().is_some_and(|s| s.is::<sled::Error>()),
            "the cause is kept: {down:?}"
        );
        assert!(
            down.to_string().starts_with("sled: reading a session: "),
            "{down}"
        );
        assert!(!err(sled::Error::Corruption { at: None, bt: () }).is_unavailable());
        assert!(!err(sled::Error::ReportableBug("x".into())).is_unavailable());
        let io_err = StoreError::Io {
            context: "sled: syncing to disk".into(),
            source: io(ErrorKind::Other),
        };
        assert!(io_err.is_unavailable());
    }

    #[test]
    fn a_pool_timeout_is_unavailable_and_a_closed_pool_is_not() {
        let err = |source| StoreError::Pool {
            context: "getting a connection".into(),
            source,
        };
        let timeout = err(PoolError::Timeout(TimeoutType::Wait));
        assert!(timeout.is_unavailable());
        assert!(
            timeout.to_string().contains("pool is not exhausted"),
            "{timeout}"
        );
        assert!(!err(PoolError::Closed).is_unavailable());
        assert!(!err(PoolError::NoRuntimeSpecified).is_unavailable());
    }

    #[test]
    fn refusals_corruption_and_a_store_to_reopen_are_not_unavailable() {
        let flush_failed = StoreError::NotDurable {
            source: Some(Arc::new(StoreError::Io {
                context: "sled: syncing to disk".into(),
                source: io(ErrorKind::Other),
            })),
        };
        assert!(flush_failed.source().is_some(), "the flush's error is kept");
        assert!(
            flush_failed.to_string().contains("syncing to disk"),
            "{flush_failed}"
        );
        for e in [
            StoreError::Duplicate("a".parse().expect("id")),
            StoreError::Corrupt {
                key: "k".into(),
                reason: "r".into(),
            },
            StoreError::NewerVersion {
                what: "w".into(),
                found: 2,
                supported: 1,
            },
            StoreError::Invalid("limit 0".into()),
            StoreError::Poisoned,
            StoreError::NotDurable { source: None },
            flush_failed,
        ] {
            assert!(!e.is_unavailable(), "{e:?}");
        }
    }

    /// Connecting to a port nobody listens on (refused), and to one that closes the connection
    /// at once, are driver errors without a server message: both unavailable.
    #[tokio::test]
    async fn a_refused_or_dropped_connection_is_unavailable() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let dropper = tokio::spawn(async move {
            // Accepts one connection and closes it before the startup exchange.
            let _ = listener.accept().await;
        });
        let connect = |port: u16| async move {
            let url = format!("postgres://x@127.0.0.1:{port}/db?connect_timeout=5");
            match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok(_) => panic!("connected to a server that is not one"),
                Err(source) => StoreError::Postgres {
                    context: "connecting".into(),
                    source,
                },
            }
        };
        let dropped = connect(port).await;
        assert!(dropped.is_unavailable(), "{dropped:?}");
        dropper.await.expect("dropper");
        // The listener is gone now: the same port refuses.
        let refused = connect(port).await;
        assert!(refused.is_unavailable(), "{refused:?}");
        assert!(
            refused.to_string().contains("error connecting to server: "),
            "the message has the cause: {refused}"
        );
    }
}
