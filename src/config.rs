//! The service's own configuration (`config.toml`): every key has a default, environment
//! variables `HARVEST_*` override the file, and command-line flags override both (in `cli`).
//!
//! Unknown keys are refused with their path, so a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A configuration error, naming the key and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config: cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has a bad key or value.
    #[error("config: {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the key path.
        message: String,
    },
    /// A value is out of range, or keys do not go together.
    #[error("config: {key}: {message}")]
    Invalid {
        /// The key path, e.g. `workers.concurrency`.
        key: String,
        /// What is wrong and what to do.
        message: String,
    },
}

/// Which storage backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Embedded sled under `data_dir` (one process).
    #[default]
    Sled,
    /// PostgreSQL at `database_url` (many processes).
    Postgres,
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// sled directory.
    pub data_dir: PathBuf,
    /// Backend.
    pub store: StoreKind,
    /// PostgreSQL URL when `store = "postgres"`.
    pub database_url: Option<String>,
    /// PostgreSQL schema the store works in (created and migrated at start), so several
    /// deployments or tests can share one database. `[a-z_][a-z0-9_]*`, at most 63 bytes.
    pub database_schema: String,
    /// How long `serve` and `worker` wait at start for a PostgreSQL server that does not answer
    /// yet, retrying with backoff (0: give up at the first failure).
    pub database_wait_secs: u64,
    /// HTTP server.
    pub server: ServerConfig,
    /// Workers of this process.
    pub workers: WorkersConfig,
    /// Session defaults.
    pub sessions: SessionsConfig,
    /// Metrics.
    pub metrics: MetricsConfig,
    /// Request-forgery guard.
    pub http_guard: HttpGuardConfig,
    /// Logging.
    pub log: LogConfig,
    /// API clients (tenants). Empty: single user, loopback only.
    pub clients: Vec<ClientConfig>,
    /// Where sessions' `[export]` sinks write.
    pub export: ExportConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./data"),
            store: StoreKind::Sled,
            database_url: None,
            database_schema: "public".into(),
            database_wait_secs: 300,
            server: ServerConfig::default(),
            workers: WorkersConfig::default(),
            sessions: SessionsConfig::default(),
            metrics: MetricsConfig::default(),
            http_guard: HttpGuardConfig::default(),
            log: LogConfig::default(),
            clients: Vec::new(),
            export: ExportConfig::default(),
        }
    }
}

/// `[export]`: where the sinks a scraper config asks for (its own `[export]` table) write. The
/// service, not the scraper config, chooses the directory and the database, so a tenant cannot
/// write files or connect anywhere the operator did not allow.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// Directory of the JSON lines and CSV files: `<dir>/<client_id>/<session_id>.jsonl|csv`.
    pub dir: PathBuf,
    /// Database of the PostgreSQL table sink; `None`: `database_url`.
    pub database_url: Option<String>,
    /// Schema of the exported tables (created when missing).
    pub schema: String,
}

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig {
            dir: PathBuf::from("./exports"),
            database_url: None,
            schema: "harvest_export".into(),
        }
    }
}

/// Whether `name` is a plain lower-case SQL identifier (`[a-z_][a-z0-9_]*`, at most 63 bytes),
/// safe to splice into SQL without quoting surprises.
pub fn is_sql_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// `[server]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Listen address.
    pub bind: SocketAddr,
    /// Request body limit (413 beyond).
    pub max_body_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 1 << 20,
        }
    }
}

/// `[workers]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersConfig {
    /// Sessions at once in this process (0: no workers).
    pub concurrency: usize,
    /// Lease length; renewed every third of it.
    pub lease_secs: u64,
    /// On SIGTERM, how long running sessions may finish before they are handed back.
    pub shutdown_grace_secs: u64,
    /// Safety-net poll when no wakeup arrives (milliseconds).
    pub poll_interval_ms: u64,
    /// First retry backoff (doubles per failed attempt, with jitter).
    pub retry_backoff_ms: u64,
    /// Largest retry backoff.
    pub retry_backoff_max_secs: u64,
    /// Sessions claimed ahead of free slots and held, under lease, in a local buffer, so a
    /// slot that frees starts its next session without a claim round trip (0: claim only for
    /// free slots). Buffered sessions are not available to other workers meanwhile: worth it
    /// for many short sessions, not for long crawls.
    pub prefetch: usize,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        WorkersConfig {
            concurrency: 4,
            lease_secs: 30,
            shutdown_grace_secs: 30,
            poll_interval_ms: 1000,
            retry_backoff_ms: 1000,
            retry_backoff_max_secs: 300,
            prefetch: 0,
        }
    }
}

impl WorkersConfig {
    /// The lease length.
    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.lease_secs)
    }
}

/// `[sessions]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    /// `session_timeout` when a submission gives none.
    pub default_timeout_secs: u64,
    /// `max_attempts` when a submission gives none.
    pub max_attempts: u32,
    /// How often the scheduler looks for expired leases, timeouts and cleanups (seconds).
    pub maintenance_interval_secs: u64,
    /// How long session events stay readable for `Last-Event-ID` resume (PostgreSQL: rows of
    /// the events table, removed by maintenance; sled keeps a bounded ring in memory).
    pub event_retention_secs: u64,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            default_timeout_secs: 86_400,
            max_attempts: 3,
            maintenance_interval_secs: 1,
            event_retention_secs: 3600,
        }
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Add a `client` label to per-session metrics (bounded by the configured clients).
    pub per_client_labels: bool,
    /// A separate listen address for `/metrics` (for `harvest worker`).
    pub bind: Option<SocketAddr>,
}

/// `[http_guard]`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct HttpGuardConfig {
    /// Force the guard on even without clients (it is on whenever clients are configured).
    pub enabled: Option<bool>,
    /// CIDRs sessions may fetch despite the guard.
    pub allow_networks: Vec<String>,
}

/// `[log]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
        }
    }
}

/// `[[clients]]`: one tenant.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Client id (owner of its sessions and agents).
    pub id: String,
    /// Bearer token.
    pub token: String,
    /// At most this many of the client's sessions RUNNING at once (all workers of the store):
    /// a claim skips the client's sessions while it is at the limit and takes other clients'.
    /// Unset: no limit.
    #[serde(default)]
    pub max_running: Option<u64>,
    /// At most this many of the client's sessions PENDING: a submission beyond it is refused
    /// (HTTP 429 `quota_exceeded` with `Retry-After`). Unset: no limit.
    #[serde(default)]
    pub max_pending: Option<u64>,
}

impl Config {
    /// Reads `path` (a missing file is an error), then applies `HARVEST_*` variables.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Config::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        cfg.apply_env(|k| std::env::var(k).ok())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses TOML text (no environment).
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim().to_string())
    }

    /// Applies environment overrides: `HARVEST_DATA_DIR`, `HARVEST_STORE`,
    /// `HARVEST_DATABASE_URL`, `HARVEST_DATABASE_SCHEMA`, `HARVEST_DATABASE_WAIT_SECS`, `HARVEST_EXPORT_DIR`, `HARVEST_BIND`, `HARVEST_WORKERS`, `HARVEST_LEASE_SECS`,
    /// `HARVEST_SHUTDOWN_GRACE_SECS`, `HARVEST_LOG_FORMAT`, `HARVEST_METRICS_BIND`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            v.parse().map_err(|e: T::Err| ConfigError::Invalid {
                key: key.into(),
                message: format!("cannot parse {v:?}: {e}"),
            })
        }
        if let Some(v) = get("HARVEST_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = get("HARVEST_STORE") {
            self.store = match v.as_str() {
                "sled" => StoreKind::Sled,
                "postgres" => StoreKind::Postgres,
                other => {
                    return Err(ConfigError::Invalid {
                        key: "HARVEST_STORE".into(),
                        message: format!("unknown store {other:?}; use \"sled\" or \"postgres\""),
                    });
                }
            };
        }
        if let Some(v) = get("HARVEST_DATABASE_URL") {
            self.database_url = Some(v);
        }
        if let Some(v) = get("HARVEST_DATABASE_SCHEMA") {
            self.database_schema = v;
        }
        if let Some(v) = get("HARVEST_DATABASE_WAIT_SECS") {
            self.database_wait_secs = parse("HARVEST_DATABASE_WAIT_SECS", &v)?;
        }
        if let Some(v) = get("HARVEST_EXPORT_DIR") {
            self.export.dir = PathBuf::from(v);
        }
        if let Some(v) = get("HARVEST_BIND") {
            self.server.bind = parse("HARVEST_BIND", &v)?;
        }
        if let Some(v) = get("HARVEST_WORKERS") {
            self.workers.concurrency = parse("HARVEST_WORKERS", &v)?;
        }
        if let Some(v) = get("HARVEST_LEASE_SECS") {
            self.workers.lease_secs = parse("HARVEST_LEASE_SECS", &v)?;
        }
        if let Some(v) = get("HARVEST_SHUTDOWN_GRACE_SECS") {
            self.workers.shutdown_grace_secs = parse("HARVEST_SHUTDOWN_GRACE_SECS", &v)?;
        }
        if let Some(v) = get("HARVEST_LOG_FORMAT") {
            self.log.format = v;
        }
        if let Some(v) = get("HARVEST_METRICS_BIND") {
            self.metrics.bind = Some(parse("HARVEST_METRICS_BIND", &v)?);
        }
        Ok(())
    }

    /// Checks ranges and combinations.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| {
            Err(ConfigError::Invalid {
                key: key.into(),
                message: message.into(),
            })
        };
        if self.workers.lease_secs < 2 {
            return invalid(
                "workers.lease_secs",
                "must be at least 2 (heartbeats renew it every third)",
            );
        }
        if self.workers.concurrency > 10_000 {
            return invalid("workers.concurrency", "must be at most 10000");
        }
        if self.workers.prefetch > 10_000 {
            return invalid("workers.prefetch", "must be at most 10000");
        }
        if self.sessions.max_attempts == 0 {
            return invalid("sessions.max_attempts", "must be at least 1");
        }
        if self.sessions.max_attempts > crate::session::SessionOptions::MAX_ATTEMPTS {
            return invalid(
                "sessions.max_attempts",
                &format!(
                    "must be at most {}, as a session's own max_attempts, not {}",
                    crate::session::SessionOptions::MAX_ATTEMPTS,
                    self.sessions.max_attempts
                ),
            );
        }
        if self.sessions.default_timeout_secs > crate::session::SessionOptions::MAX_TIMEOUT_SECS {
            return invalid(
                "sessions.default_timeout_secs",
                "must be at most 315360000 (ten years), as a session's own session_timeout_secs",
            );
        }
        if self.sessions.maintenance_interval_secs == 0 {
            return invalid("sessions.maintenance_interval_secs", "must be at least 1");
        }
        if self.server.max_body_bytes < 1024 {
            return invalid("server.max_body_bytes", "must be at least 1024");
        }
        if self.store == StoreKind::Postgres && self.database_url.is_none() {
            return invalid(
                "database_url",
                "store = \"postgres\" needs database_url (or HARVEST_DATABASE_URL)",
            );
        }
        if !is_sql_identifier(&self.database_schema) {
            return invalid(
                "database_schema",
                "must be a lower-case SQL name ([a-z_][a-z0-9_]*, at most 63 bytes)",
            );
        }
        if !is_sql_identifier(&self.export.schema) {
            return invalid(
                "export.schema",
                "must be a lower-case SQL name ([a-z_][a-z0-9_]*, at most 63 bytes)",
            );
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return invalid("log.format", "must be \"text\" or \"json\"");
        }
        for (i, net) in self.http_guard.allow_networks.iter().enumerate() {
            if net.parse::<ipnet::IpNet>().is_err() {
                return invalid(
                    &format!("http_guard.allow_networks[{i}]"),
                    &format!("{net:?} is not a CIDR like \"10.1.0.0/16\""),
                );
            }
        }
        let mut ids = std::collections::HashSet::new();
        for (i, c) in self.clients.iter().enumerate() {
            if c.id.is_empty() || c.token.len() < 8 {
                return invalid(
                    &format!("clients[{i}]"),
                    "needs a non-empty id and a token of at least 8 characters",
                );
            }
            check_token(i, c)?;
            if self.clients[..i].iter().any(|o| o.token == c.token) {
                return invalid(
                    &format!("clients[{i}].token"),
                    "is also another client's token; every client needs its own",
                );
            }
            if c.max_running == Some(0) || c.max_pending == Some(0) {
                return invalid(
                    &format!("clients[{i}]"),
                    "max_running and max_pending must be at least 1 (omit them for no limit)",
                );
            }
            if !ids.insert(&c.id) {
                return invalid(
                    &format!("clients[{i}].id"),
                    &format!("{:?} is listed twice", c.id),
                );
            }
        }
        Ok(())
    }
}

/// Longest client token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 1024;

/// Checks that a client's token can be sent in an `Authorization: Bearer` header as written: a
/// token with spaces around it, control characters or non-ASCII characters could never log in
/// (headers are trimmed, and carry visible ASCII only).
fn check_token(i: usize, c: &ClientConfig) -> Result<(), ConfigError> {
    let invalid = |key: &str, message: &str| {
        Err(ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        })
    };
    let key = format!("clients[{i}].token");
    let who = format!("client {:?}", c.id);
    let t = &c.token;
    if t.trim() != t {
        return invalid(
            &key,
            &format!(
                "{who}: the token has spaces around it, so no request could send it; remove them"
            ),
        );
    }
    if t.chars().any(|ch| ch.is_control()) {
        return invalid(
            &key,
            &format!(
                "{who}: the token holds a control character (a newline, a tab…); use visible characters only"
            ),
        );
    }
    if !t.is_ascii() {
        return invalid(
            &key,
            &format!(
                "{who}: the token holds non-ASCII characters, which an HTTP header cannot carry; use ASCII letters, digits and punctuation"
            ),
        );
    }
    if t.len() > MAX_TOKEN_BYTES {
        return invalid(
            &key,
            &format!(
                "{who}: the token is {} bytes, more than the {MAX_TOKEN_BYTES} allowed",
                t.len()
            ),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_client(token: &str) -> Result<(), String> {
        let cfg = Config {
            clients: vec![ClientConfig {
                id: "acme".into(),
                token: token.into(),
                max_running: None,
                max_pending: None,
            }],
            ..Config::default()
        };
        cfg.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn tokens_that_could_never_log_in_are_refused_at_load() {
        for (token, says) in [
            (" token-1234", "spaces around it"),
            ("token-1234 ", "spaces around it"),
            ("token\n1234", "control character"),
            ("token\u{7f}1234", "control character"),
            ("tökén-1234", "non-ASCII"),
        ] {
            let err = one_client(token).expect_err(token);
            assert!(err.contains("clients[0].token"), "{token:?}: {err}");
            assert!(err.contains("\"acme\""), "the client is not named: {err}");
            assert!(err.contains(says), "{token:?}: {err}");
        }
        let long = "x".repeat(MAX_TOKEN_BYTES + 1);
        let err = one_client(&long).unwrap_err();
        assert!(err.contains("more than the 1024 allowed"), "{err}");
        one_client(&"x".repeat(MAX_TOKEN_BYTES)).expect("a token of the largest length");
        one_client("tok en-1234").expect("an inner space can be sent");
    }

    #[test]
    fn shipped_config_parses_and_validates() {
        let text = include_str!("../config.toml");
        let cfg = Config::from_toml(text).expect("config.toml parses");
        cfg.validate().expect("config.toml validates");
        assert_eq!(cfg.data_dir, PathBuf::from("./data"));
        assert_eq!(cfg.workers.concurrency, 4);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("[workers]\nconcurency = 3\n").unwrap_err();
        assert!(err.contains("concurency"), "{err}");
    }

    #[test]
    fn two_clients_with_one_token_are_refused() {
        let cfg = Config::from_toml(
            "[[clients]]\nid = \"a\"\ntoken = \"same-token-1\"\n[[clients]]\nid = \"b\"\ntoken = \"same-token-1\"\n",
        )
        .unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("clients[1].token"), "{err}");
    }

    #[test]
    fn env_overrides_file() {
        let mut cfg = Config::from_toml("[workers]\nconcurrency = 3\n").unwrap();
        cfg.apply_env(|k| (k == "HARVEST_WORKERS").then(|| "7".to_string()))
            .unwrap();
        assert_eq!(cfg.workers.concurrency, 7);
        let err = cfg.apply_env(|k| (k == "HARVEST_WORKERS").then(|| "x".to_string()));
        assert!(err.is_err());
    }
}
