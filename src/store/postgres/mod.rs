//! The PostgreSQL backend: many worker processes on many hosts share one database.
//!
//! Layout (see `migrations/`): a `sessions` table whose every mutable field is a column and whose
//! immutable part (client, job, options) is one versioned bincode value, plus `records`,
//! `frontier`, `seen`, `log` and `agents`. Each transition is one SQL compare-and-set on
//! `(status, attempt, lease_owner)` and reports whether it applied; a claim is one
//! `UPDATE ... FROM (SELECT ... FOR UPDATE SKIP LOCKED)` statement, so racing claimers never
//! block on, nor double-claim, a row. After a submission, requeue or reclaim commits, the store
//! sends `NOTIFY harvest_pending` (payload: the schema name; coalesced; `listen::announce` says
//! why not inside the transaction); each store keeps one dedicated `LISTEN` connection that
//! wakes [`Store::pending_wait`].
//!
//! Every store works inside one schema (its `search_path`), created and migrated at connect, so
//! several deployments or tests can share a database. This module never reads the clock.

mod listen;
mod migrate;

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};
use tokio_util::sync::CancellationToken;

use super::codec;
use super::{
    Agent, AttemptRef, CancelOutcome, CheckpointBatch, CheckpointCommit, FRONTIER_PAGE_MAX,
    FrontierItem, FrontierPage, HeartbeatOutcome, InsertOutcome, LOG_LINES_MAX, LeaseReclaim,
    Reclaimed, RecordsPage, RequeueOutcome, ResumeState, SeenFilter, SessionCancel, SessionClaim,
    SessionCounts, SessionFinish, SessionHeartbeat, SessionInsert, SessionList, SessionPage,
    SessionRequeue, SessionsExpire, Store, StoreError, StoreResult, key_name,
};
use crate::session::{
    ClientContext, FrontierEntry, JobSpec, Lease, LogLine, Record, Session, SessionError,
    SessionId, SessionMetrics, SessionOptions, SessionStatus, Timestamp, TokenUsage,
};

/// Advisory lock class (first key of the two-key form) of schema migrations.
const ADVISORY_CLASS_MIGRATE: i32 = 0x6876_0001;
/// Advisory lock class of the single-session-agent check.
const ADVISORY_CLASS_AGENT: i32 = 0x6876_0002;

/// Connections in the pool. 16: enough for a process's workers, API and scheduler without
/// exhausting a default server (`max_connections = 100`) when a few processes share it.
const POOL_SIZE: usize = 16;
/// How long a call waits for a free pooled connection, and for a new connection.
const POOL_WAIT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The schema [`PostgresStore::connect`] uses.
pub const DEFAULT_SCHEMA: &str = "public";

/// Longest session list page and records page (the trait's documented ranges).
const LIST_LIMIT_MAX: usize = 1000;
const RECORDS_LIMIT_MAX: usize = 10_000;

/// Columns of `sessions` read into a [`Session`], in the order [`session_from_row`] expects.
const SESSION_COLUMNS: &str = "id, seq, status, attempt, failures, progress_this_attempt, \
     lease_owner, lease_expires_at, cancel_requested, run_at, created_at, updated_at, cleanup_at, \
     start_time, end_time, pages_processed, processed_elements, http_requests, http_errors, \
     bytes_received, retries, robots_blocked, error_kind, error_message, checkpoints, spec";

/// The compare-and-set precondition of every worker transition; `$1..$3` are the attempt.
const IF_RUNNING: &str = "id = $1 AND status = 'RUNNING' AND attempt = $2 AND lease_owner = $3";

/// A PostgreSQL-backed [`Store`].
pub struct PostgresStore {
    pool: Pool,
    schema: String,
    notify: Arc<Notify>,
    announce: Arc<Notify>,
    listener_ready: watch::Receiver<bool>,
    stop: CancellationToken,
    /// The listener and the announcer; awaited by `close`.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The immutable part of a session, stored as one versioned bincode value.
#[derive(Serialize)]
struct SpecRef<'a> {
    client: &'a ClientContext,
    job: &'a JobSpec,
    options: &'a SessionOptions,
}

#[derive(Deserialize)]
struct Spec {
    client: ClientContext,
    job: JobSpec,
    options: SessionOptions,
}

impl PostgresStore {
    /// Connects to the database at `url` (e.g. `postgres://harvest@db.internal/harvest`), using
    /// the schema [`DEFAULT_SCHEMA`], and migrates it.
    pub async fn connect(url: &str) -> StoreResult<PostgresStore> {
        PostgresStore::connect_with_schema(url, DEFAULT_SCHEMA).await
    }

    /// Connects using `schema` (created when missing; `[a-z_][a-z0-9_]*`, at most 63 bytes) as
    /// every connection's `search_path`, and migrates it. A schema written by a newer harvest is
    /// refused with [`StoreError::NewerVersion`].
    pub async fn connect_with_schema(url: &str, schema: &str) -> StoreResult<PostgresStore> {
        validate_schema(schema)?;
        let mut config = tokio_postgres::Config::from_str(url).map_err(|e| {
            StoreError::Invalid(format!(
                "database URL is not valid ({e}); expected e.g. postgres://user@host:5432/db"
            ))
        })?;
        // A startup option, not a `SET` after connect: it holds for every connection the pool
        // ever opens, including ones replaced after a network failure.
        config.options(format!("-c search_path={schema}"));
        config.connect_timeout(CONNECT_TIMEOUT);
        if config.get_application_name().is_none() {
            config.application_name("harvest");
        }

        let mut first = connect_one(&config).await?;
        migrate::migrate(&mut first, schema).await?;
        drop(first);

        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Backend(format!("building the PostgreSQL pool: {e}")))?;

        let notify = Arc::new(Notify::new());
        let (ready_tx, ready_rx) = watch::channel(false);
        let stop = CancellationToken::new();
        let mut listen_config = config;
        // Named per schema so an operator (or a test) can find this connection in
        // pg_stat_activity; the server truncates it to 63 bytes.
        listen_config.application_name(format!("harvest-listener {schema}"));
        let listener = tokio::spawn(listen::run(
            listen_config,
            schema.to_string(),
            Arc::clone(&notify),
            ready_tx,
            stop.clone(),
        ));
        let announce = Arc::new(Notify::new());
        let announcer = tokio::spawn(listen::announce(
            pool.clone(),
            schema.to_string(),
            Arc::clone(&announce),
            stop.clone(),
        ));
        Ok(PostgresStore {
            pool,
            schema: schema.to_string(),
            notify,
            announce,
            listener_ready: ready_rx,
            stop,
            tasks: Mutex::new(vec![listener, announcer]),
        })
    }

    /// The schema this store works in.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Waits up to `timeout` until the notification listener is connected and listening;
    /// `false` if it is not by then. Until it is, `pending_wait` relies on its timeout alone
    /// for sessions submitted by other processes.
    pub async fn listener_ready(&self, timeout: Duration) -> bool {
        let mut rx = self.listener_ready.clone();
        tokio::time::timeout(timeout, rx.wait_for(|ready| *ready))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    async fn client(&self) -> StoreResult<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|e| {
            StoreError::Backend(format!(
                "getting a PostgreSQL connection (schema {:?}): {e}; check that the server is up \
                 and that the pool ({POOL_SIZE} connections) is not exhausted",
                self.schema
            ))
        })
    }

    /// A session became claimable: wakes this process's waiters at once and has the announcer
    /// NOTIFY other processes.
    fn wake_local(&self) {
        listen::wake(&self.notify);
        self.announce.notify_one();
    }

    async fn insert_row(
        &self,
        client: &impl GenericClient,
        s: &Session,
        agent: Option<&str>,
    ) -> StoreResult<Option<u64>> {
        let spec = codec::encode(&SpecRef {
            client: &s.client,
            job: &s.job,
            options: &s.options,
        })?;
        let (error_kind, error_message) = error_columns(s.error.as_ref());
        let stmt = client
            .prepare_cached(
                "WITH ins AS (
                     INSERT INTO sessions (id, client_id, agent, status, priority, run_at,
                         max_attempts, attempt, failures, progress_this_attempt, lease_owner,
                         lease_expires_at, cancel_requested, created_at, updated_at, cleanup_at,
                         start_time, end_time, pages_processed, processed_elements, http_requests,
                         http_errors, bytes_received, retries, robots_blocked, error_kind,
                         error_message, checkpoints, spec, cleanup_after_ms)
                     VALUES ($1, $2, $3, 'PENDING', $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
                         $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28,
                         $29)
                     ON CONFLICT (id) DO NOTHING
                     RETURNING seq)
                 SELECT seq FROM ins",
            )
            .await
            .map_err(db_err("preparing the session insert"))?;
        let priority = s.options.priority;
        let max_attempts = to_i32(s.max_attempts(), "max_attempts")?;
        let attempt = to_i32(s.attempt, "attempt")?;
        let failures = to_i32(s.failures, "failures")?;
        let lease_owner = s.lease.as_ref().map(|l| l.owner.as_str());
        let lease_expires = s.lease.as_ref().map(|l| l.expires_at.0);
        let u = usage_columns(&s.usage)?;
        let pages = to_i64(s.metrics.pages_processed, "pages_processed")?;
        let elements = to_i64(s.metrics.processed_elements, "processed_elements")?;
        let checkpoints = to_i64(s.checkpoints, "checkpoints")?;
        let cleanup_after_ms = s
            .options
            .session_timeout_secs
            .map(|secs| to_i64(secs.saturating_mul(1000), "session_timeout_secs"))
            .transpose()?;
        let params: [&(dyn ToSql + Sync); 29] = [
            &s.id.as_str(),
            &s.client.client_id(),
            &agent,
            &priority,
            &s.run_at.0,
            &max_attempts,
            &attempt,
            &failures,
            &s.progress_this_attempt,
            &lease_owner,
            &lease_expires,
            &s.cancel_requested,
            &s.created_at.0,
            &s.updated_at.0,
            &s.cleanup_at.map(|t| t.0),
            &s.metrics.start_time.map(|t| t.0),
            &s.metrics.end_time.map(|t| t.0),
            &pages,
            &elements,
            &u[0],
            &u[1],
            &u[2],
            &u[3],
            &u[4],
            &error_kind,
            &error_message,
            &checkpoints,
            &spec,
            &cleanup_after_ms,
        ];
        let row = client.query_opt(&stmt, &params).await.map_err(|e| {
            if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
                StoreError::Duplicate(s.id.clone())
            } else {
                db_err("inserting a session")(e)
            }
        })?;
        match row {
            Some(row) => Ok(Some(to_u64(
                row_get::<i64>(&row, 0, "sessions/seq")?,
                "seq",
            )?)),
            None => Ok(None),
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn session_insert(&self, p: SessionInsert) -> StoreResult<InsertOutcome> {
        let mut session = p.session;
        if session.status != SessionStatus::Pending {
            return Err(StoreError::Invalid(format!(
                "session {} is inserted as {}; new sessions must be PENDING",
                session.id, session.status
            )));
        }
        let agent = session.job.agent.clone().or_else(|| p.single_agent.clone());
        let mut client = self.client().await?;
        let seq = match &p.single_agent {
            None => self.insert_row(&client, &session, agent.as_deref()).await?,
            Some(name) => {
                let tx = client
                    .transaction()
                    .await
                    .map_err(db_err("starting a transaction"))?;
                // Serializes inserts for this agent: the check below then sees every insert
                // committed before ours, so two racing submissions cannot both pass it.
                tx.execute(
                    "SELECT pg_advisory_xact_lock($1, hashtext($2 || '/' || $3))",
                    &[&ADVISORY_CLASS_AGENT, &session.client.client_id(), name],
                )
                .await
                .map_err(db_err("locking the single-session agent"))?;
                let busy = tx
                    .query_opt(
                        "SELECT id FROM sessions WHERE client_id = $1 AND agent = $2 \
                         AND status IN ('PENDING', 'RUNNING') ORDER BY seq LIMIT 1",
                        &[&session.client.client_id(), name],
                    )
                    .await
                    .map_err(db_err("checking for an active session of the agent"))?;
                if let Some(row) = busy {
                    let id: String = row_get(&row, 0, "sessions/id")?;
                    let id = SessionId::parse(&id).map_err(|e| StoreError::Corrupt {
                        key: format!("sessions/{id}"),
                        reason: e.to_string(),
                    })?;
                    return Ok(InsertOutcome::AgentBusy(id));
                }
                let seq = self.insert_row(&tx, &session, agent.as_deref()).await?;
                tx.commit()
                    .await
                    .map_err(db_err("committing the session insert"))?;
                seq
            }
        };
        let Some(seq) = seq else {
            return Err(StoreError::Duplicate(session.id));
        };
        self.wake_local();
        session.seq = seq;
        Ok(InsertOutcome::Inserted(Box::new(session)))
    }

    async fn session_get(&self, id: &SessionId) -> StoreResult<Option<Session>> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1"
            ))
            .await
            .map_err(db_err("preparing a session read"))?;
        let row = client
            .query_opt(&stmt, &[&id.as_str()])
            .await
            .map_err(db_err(&format!("reading session {id}")))?;
        row.as_ref().map(session_from_row).transpose()
    }

    async fn session_list(&self, p: SessionList) -> StoreResult<SessionPage> {
        if p.limit == 0 || p.limit > LIST_LIMIT_MAX {
            return Err(StoreError::Invalid(format!(
                "list limit {} is out of range; use 1 to {LIST_LIMIT_MAX}",
                p.limit
            )));
        }
        let cursor = match &p.cursor {
            None => None,
            Some(c) => Some(c.parse::<i64>().ok().filter(|v| *v > 0).ok_or_else(|| {
                StoreError::Invalid(format!(
                    "cursor {c:?} is not one this store returned; pass a page's next_cursor"
                ))
            })?),
        };
        let status = p.status.map(SessionStatus::as_str);
        let limit = (p.limit + 1) as i64;
        // The query text depends on which filters are present, so each shape gets a plan that
        // uses the right index (a generic `$1 IS NULL OR ...` plan would scan).
        let mut filters = Vec::new();
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        if let Some(c) = &p.client_id {
            params.push(c);
            filters.push(format!("client_id = ${}", params.len()));
        }
        if let Some(s) = &status {
            params.push(s);
            filters.push(format!("status = ${}", params.len()));
        }
        if let Some(a) = &p.agent {
            params.push(a);
            filters.push(format!("agent = ${}", params.len()));
        }
        if let Some(c) = &cursor {
            params.push(c);
            filters.push(format!("seq < ${}", params.len()));
        }
        params.push(&limit);
        let where_clause = if filters.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", filters.join(" AND "))
        };
        let sql = format!(
            "SELECT {SESSION_COLUMNS} FROM sessions {where_clause} ORDER BY seq DESC LIMIT ${}",
            params.len()
        );
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&sql)
            .await
            .map_err(db_err("preparing a session list"))?;
        let rows = client
            .query(&stmt, &params)
            .await
            .map_err(db_err("listing sessions"))?;
        let mut sessions = rows
            .iter()
            .map(session_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        let next_cursor = if sessions.len() > p.limit {
            sessions.truncate(p.limit);
            sessions.last().map(|s| s.seq.to_string())
        } else {
            None
        };
        Ok(SessionPage {
            sessions,
            next_cursor,
        })
    }

    async fn session_claim(&self, p: SessionClaim) -> StoreResult<Vec<Session>> {
        if p.limit == 0 {
            // A worker with no free slot claims nothing (the conformance suite's rule).
            return Ok(Vec::new());
        }
        let limit = i64::try_from(p.limit).unwrap_or(i64::MAX);
        let expires = p.now.add(p.lease).0;
        let client = self.client().await?;
        // One statement: rows locked by a concurrent claim are skipped, not waited for, and the
        // lock is held only until this statement's implicit commit.
        let stmt = client
            .prepare_cached(&format!(
                "WITH due AS (
                     SELECT id AS due_id FROM sessions
                     WHERE status = 'PENDING' AND run_at <= $1
                     ORDER BY priority DESC, run_at, seq
                     LIMIT $2
                     FOR UPDATE SKIP LOCKED)
                 UPDATE sessions SET status = 'RUNNING', attempt = attempt + 1,
                     lease_owner = $3, lease_expires_at = $4, start_time = $1, end_time = NULL,
                     progress_this_attempt = false, updated_at = $1
                 FROM due WHERE id = due_id AND status = 'PENDING'
                 RETURNING {SESSION_COLUMNS}, priority"
            ))
            .await
            .map_err(db_err("preparing the claim"))?;
        let rows = client
            .query(&stmt, &[&p.now.0, &limit, &p.owner, &expires])
            .await
            .map_err(db_err("claiming sessions"))?;
        let mut claimed = rows
            .iter()
            .map(session_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        // RETURNING order is unspecified; callers start sessions in claim order.
        claimed.sort_by(|a, b| {
            b.options
                .priority
                .cmp(&a.options.priority)
                .then(a.run_at.cmp(&b.run_at))
                .then(a.seq.cmp(&b.seq))
        });
        Ok(claimed)
    }

    async fn session_heartbeat_if_running(
        &self,
        p: SessionHeartbeat,
    ) -> StoreResult<HeartbeatOutcome> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "UPDATE sessions SET lease_expires_at = $4 WHERE {IF_RUNNING} \
                 RETURNING cancel_requested"
            ))
            .await
            .map_err(db_err("preparing a heartbeat"))?;
        let a = &p.attempt;
        let attempt = to_i32(a.attempt, "attempt")?;
        let row = client
            .query_opt(
                &stmt,
                &[&a.id.as_str(), &attempt, &a.owner, &p.now.add(p.lease).0],
            )
            .await
            .map_err(db_err(&format!("renewing the lease of session {}", a.id)))?;
        Ok(match row {
            Some(row) => HeartbeatOutcome::Renewed {
                cancel_requested: row_get(&row, 0, &key_name("sessions", &a.id))?,
            },
            None => HeartbeatOutcome::Lost,
        })
    }

    async fn checkpoint_commit_if_running(&self, p: CheckpointCommit) -> StoreResult<bool> {
        let ending = Ending::Checkpoint {
            lease_expires_at: p.now.add(p.lease),
        };
        self.attempt_commit(&p.attempt, &p.batch, p.now, ending)
            .await
    }

    async fn session_finish_if_running(&self, p: SessionFinish) -> StoreResult<bool> {
        if !p.status.is_terminal() {
            return Err(StoreError::Invalid(format!(
                "session {} cannot finish as {}; use COMPLETED, FAILED or CANCELLED",
                p.attempt.id, p.status
            )));
        }
        let ending = Ending::Finish {
            status: p.status,
            error: p.error,
            cleanup_at: p.cleanup_at,
        };
        self.attempt_commit(&p.attempt, &p.batch, p.now, ending)
            .await
    }

    async fn session_requeue_if_running(&self, p: SessionRequeue) -> StoreResult<RequeueOutcome> {
        let client = self.client().await?;
        // `failures` on the right-hand side is the value before this update.
        let stmt = client
            .prepare_cached(&format!(
                "WITH u AS (
                     UPDATE sessions SET
                         failures = failures + $4::int,
                         status = CASE WHEN cancel_requested THEN 'CANCELLED'
                                  WHEN $4 = 1 AND failures + 1 >= max_attempts
                                  THEN 'FAILED' ELSE 'PENDING' END,
                         run_at = $5,
                         error_kind = CASE WHEN cancel_requested THEN error_kind
                                      WHEN $4 = 1 AND failures + 1 >= max_attempts
                                      THEN coalesce($6::text, 'attempts_exhausted') ELSE $6::text END,
                         error_message = CASE WHEN cancel_requested THEN error_message
                                         WHEN $4 = 1 AND failures + 1 >= max_attempts
                                         THEN coalesce($7::text, format('attempt %s failed and no \
                                             attempts are left (max_attempts %s)', attempt,
                                             max_attempts))
                                         ELSE $7::text END,
                         cleanup_at = CASE WHEN cancel_requested
                                           OR ($4 = 1 AND failures + 1 >= max_attempts)
                                      THEN $8::bigint ELSE NULL END,
                         end_time = CASE WHEN cancel_requested
                                         OR ($4 = 1 AND failures + 1 >= max_attempts)
                                    THEN $9::bigint ELSE end_time END,
                         lease_owner = NULL, lease_expires_at = NULL, updated_at = $9
                     WHERE {IF_RUNNING}
                     RETURNING status)
                 SELECT status FROM u"
            ))
            .await
            .map_err(db_err("preparing a requeue"))?;
        let a = &p.attempt;
        let attempt = to_i32(a.attempt, "attempt")?;
        let spend: i32 = p.spend_attempt.into();
        let (error_kind, error_message) = error_columns(p.error.as_ref());
        let row = client
            .query_opt(
                &stmt,
                &[
                    &a.id.as_str(),
                    &attempt,
                    &a.owner,
                    &spend,
                    &p.run_at.0,
                    &error_kind,
                    &error_message,
                    &p.cleanup_at.0,
                    &p.now.0,
                ],
            )
            .await
            .map_err(db_err(&format!("requeueing session {}", a.id)))?;
        let Some(row) = row else {
            return Ok(RequeueOutcome::NotApplied);
        };
        let status: String = row_get(&row, 0, &key_name("sessions", &a.id))?;
        match status.as_str() {
            "PENDING" => {
                self.wake_local();
                Ok(RequeueOutcome::Requeued)
            }
            "CANCELLED" => Ok(RequeueOutcome::Cancelled),
            _ => Ok(RequeueOutcome::Failed),
        }
    }

    async fn leases_reclaim(&self, p: LeaseReclaim) -> StoreResult<Vec<Reclaimed>> {
        const CENTURY_MS: i64 = 100 * 365 * 86_400_000;
        if p.limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(p.limit).unwrap_or(i64::MAX);
        let client = self.client().await?;
        // An attempt that committed progress is free: it is not counted in `failures`.
        let stmt = client
            .prepare_cached(
                "WITH expired AS (
                     SELECT id AS exp_id FROM sessions
                     WHERE status = 'RUNNING' AND lease_expires_at <= $1
                     ORDER BY lease_expires_at
                     LIMIT $2
                     FOR UPDATE SKIP LOCKED),
                 u AS (
                     UPDATE sessions SET
                         failures = failures + CASE WHEN progress_this_attempt THEN 0 ELSE 1 END,
                         status = CASE WHEN cancel_requested THEN 'CANCELLED'
                                  WHEN NOT progress_this_attempt
                                       AND failures + 1 >= max_attempts
                                  THEN 'FAILED' ELSE 'PENDING' END,
                         run_at = $3,
                         error_kind = CASE WHEN cancel_requested THEN error_kind
                                      WHEN NOT progress_this_attempt
                                           AND failures + 1 >= max_attempts
                                      THEN 'attempts_exhausted' ELSE 'lease_expired' END,
                         error_message = CASE WHEN cancel_requested THEN error_message
                                         WHEN NOT progress_this_attempt
                                              AND failures + 1 >= max_attempts
                                         THEN format('attempt %s lost its lease (the worker \
                                             stopped or was cut off) and no attempts are left \
                                             (max_attempts %s)', attempt, max_attempts)
                                         ELSE format('attempt %s lost its lease (the worker \
                                             stopped or was cut off); retrying', attempt) END,
                         cleanup_at = CASE WHEN cancel_requested
                                           OR (NOT progress_this_attempt
                                               AND failures + 1 >= max_attempts)
                                      THEN $5::bigint + COALESCE(cleanup_after_ms, $4::bigint)
                                      ELSE NULL END,
                         end_time = CASE WHEN cancel_requested THEN $5::bigint
                                    WHEN NOT progress_this_attempt
                                         AND failures + 1 >= max_attempts
                                    THEN $5::bigint ELSE end_time END,
                         lease_owner = NULL, lease_expires_at = NULL, updated_at = $5
                     FROM expired WHERE id = exp_id AND status = 'RUNNING'
                     RETURNING id, attempt, status)
                 SELECT id, attempt, status FROM u",
            )
            .await
            .map_err(db_err("preparing the lease reclaim"))?;
        let run_at = p.now.add(p.backoff).0;
        // Capped so that now + delay stays far inside bigint (a century is ~3.2e12 ms).
        let cleanup_after_ms = i64::try_from(p.cleanup_after.as_millis())
            .unwrap_or(i64::MAX)
            .min(CENTURY_MS);
        let rows = client
            .query(
                &stmt,
                &[
                    &p.expired_before.0,
                    &limit,
                    &run_at,
                    &cleanup_after_ms,
                    &p.now.0,
                ],
            )
            .await
            .map_err(db_err("reclaiming expired leases"))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: String = row_get(row, 0, "sessions/id")?;
            let key = format!("sessions/{id}");
            let id = SessionId::parse(&id).map_err(|e| StoreError::Corrupt {
                key: key.clone(),
                reason: e.to_string(),
            })?;
            let attempt = to_u32(row_get::<i32>(row, 1, &key)?, "attempt")?;
            let status: String = row_get(row, 2, &key)?;
            let outcome = match status.as_str() {
                "PENDING" => RequeueOutcome::Requeued,
                "CANCELLED" => RequeueOutcome::Cancelled,
                _ => RequeueOutcome::Failed,
            };
            out.push(Reclaimed {
                id,
                attempt,
                outcome,
            });
        }
        if out.iter().any(|r| r.outcome == RequeueOutcome::Requeued) {
            self.wake_local();
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn session_cancel(&self, p: SessionCancel) -> StoreResult<CancelOutcome> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(db_err("starting a transaction"))?;
        let row = tx
            .query_opt(
                &format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1 FOR UPDATE"),
                &[&p.id.as_str()],
            )
            .await
            .map_err(db_err(&format!("reading session {} to cancel it", p.id)))?;
        let Some(row) = row else {
            return Ok(CancelOutcome::NotFound);
        };
        let current = session_from_row(&row)?;
        let id = p.id.as_str();
        let cleanup_at = p.now.add(current.cleanup_after(p.cleanup_after)).0;
        let (sql, params): (String, Vec<&(dyn ToSql + Sync)>) = match current.status {
            SessionStatus::Pending => (
                format!(
                    "UPDATE sessions SET status = 'CANCELLED', cleanup_at = $2, end_time = $3, \
                     updated_at = $3 WHERE id = $1 RETURNING {SESSION_COLUMNS}"
                ),
                vec![&id, &cleanup_at, &p.now.0],
            ),
            SessionStatus::Running => (
                format!(
                    "UPDATE sessions SET cancel_requested = true, updated_at = $2 WHERE id = $1 \
                     RETURNING {SESSION_COLUMNS}"
                ),
                vec![&id, &p.now.0],
            ),
            _ => return Ok(CancelOutcome::AlreadyTerminal(Box::new(current))),
        };
        let row = tx
            .query_one(&sql, &params)
            .await
            .map_err(db_err(&format!("cancelling session {}", p.id)))?;
        let updated = session_from_row(&row)?;
        tx.commit().await.map_err(db_err("committing a cancel"))?;
        Ok(match current.status {
            SessionStatus::Pending => CancelOutcome::Cancelled(Box::new(updated)),
            _ => CancelOutcome::Requested(Box::new(updated)),
        })
    }

    async fn session_remove(&self, id: &SessionId) -> StoreResult<Option<Session>> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(db_err("starting a transaction"))?;
        // The session row goes first: its row lock waits for a checkpoint in flight, so the
        // deletes below see (and remove) what that checkpoint committed, and a later
        // checkpoint's compare-and-set finds no row.
        let row = tx
            .query_opt(
                &format!("DELETE FROM sessions WHERE id = $1 RETURNING {SESSION_COLUMNS}"),
                &[&id.as_str()],
            )
            .await
            .map_err(db_err(&format!("removing session {id}")))?;
        let Some(row) = row else { return Ok(None) };
        let session = session_from_row(&row)?;
        delete_session_data(&tx, &[id.as_str()]).await?;
        tx.commit()
            .await
            .map_err(db_err(&format!("committing the removal of session {id}")))?;
        Ok(Some(session))
    }

    async fn records_remove_if_terminal(&self, id: &SessionId) -> StoreResult<bool> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(db_err("starting a transaction"))?;
        // The row lock keeps a concurrent removal or finish from interleaving with the delete.
        let row = tx
            .query_opt(
                "SELECT status FROM sessions WHERE id = $1 FOR UPDATE",
                &[&id.as_str()],
            )
            .await
            .map_err(db_err(&format!("reading session {id}")))?;
        let Some(row) = row else { return Ok(false) };
        let key = key_name("sessions", id);
        let status: String = row_get(&row, 0, &key)?;
        if !parse_status(&status, &key)?.is_terminal() {
            return Ok(false);
        }
        tx.execute("DELETE FROM records WHERE session_id = $1", &[&id.as_str()])
            .await
            .map_err(db_err(&format!("removing the records of session {id}")))?;
        tx.commit()
            .await
            .map_err(db_err(&format!("committing the record removal of {id}")))?;
        Ok(true)
    }

    async fn sessions_expire(&self, p: SessionsExpire) -> StoreResult<Vec<Session>> {
        if p.limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(p.limit).unwrap_or(i64::MAX);
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(db_err("starting a transaction"))?;
        let rows = tx
            .query(
                &format!(
                    "DELETE FROM sessions WHERE id IN (
                         SELECT id FROM sessions
                         WHERE cleanup_at <= $1
                           AND status IN ('COMPLETED', 'FAILED', 'CANCELLED')
                         ORDER BY cleanup_at
                         LIMIT $2
                         FOR UPDATE SKIP LOCKED)
                     RETURNING {SESSION_COLUMNS}"
                ),
                &[&p.now.0, &limit],
            )
            .await
            .map_err(db_err("removing expired sessions"))?;
        let mut sessions = rows
            .iter()
            .map(session_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        if !sessions.is_empty() {
            let ids: Vec<&str> = sessions.iter().map(|s| s.id.as_str()).collect();
            delete_session_data(&tx, &ids).await?;
        }
        tx.commit()
            .await
            .map_err(db_err("committing the removal of expired sessions"))?;
        sessions.sort_by(|a, b| a.cleanup_at.cmp(&b.cleanup_at).then(a.seq.cmp(&b.seq)));
        Ok(sessions)
    }

    async fn records_page(&self, p: RecordsPage) -> StoreResult<Vec<Record>> {
        if p.limit == 0 || p.limit > RECORDS_LIMIT_MAX {
            return Err(StoreError::Invalid(format!(
                "records limit {} is out of range; use 1 to {RECORDS_LIMIT_MAX}",
                p.limit
            )));
        }
        let offset = to_i64(p.offset, "offset")?;
        let limit = p.limit as i64;
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT seq, data FROM records WHERE session_id = $1 AND seq >= $2 \
                 ORDER BY seq LIMIT $3",
            )
            .await
            .map_err(db_err("preparing a records read"))?;
        let rows = client
            .query(&stmt, &[&p.id.as_str(), &offset, &limit])
            .await
            .map_err(db_err(&format!("reading records of session {}", p.id)))?;
        let key = key_name("records", &p.id);
        rows.iter()
            .map(|row| {
                Ok(Record {
                    seq: to_u64(row_get::<i64>(row, 0, &key)?, "records.seq")?,
                    data: row_get(row, 1, &key)?,
                })
            })
            .collect()
    }

    async fn resume_load(&self, id: &SessionId) -> StoreResult<ResumeState> {
        let mut client = self.client().await?;
        // One snapshot: the frontier, seen set and counters of the same checkpoint.
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(db_err("starting a read transaction"))?;
        let key = key_name("sessions", id);
        let row = tx
            .query_opt(
                &format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1"),
                &[&id.as_str()],
            )
            .await
            .map_err(db_err(&format!("reading session {id}")))?;
        let Some(row) = row else {
            return Ok(ResumeState::default());
        };
        let session = session_from_row(&row)?;
        let frontier_len = tx
            .query_one(
                "SELECT count(*) FROM frontier WHERE session_id = $1",
                &[&id.as_str()],
            )
            .await
            .map_err(db_err(&format!("counting the frontier of session {id}")))?;
        let frontier_len = to_u64(row_get::<i64>(&frontier_len, 0, &key)?, "frontier count")?;
        tx.commit()
            .await
            .map_err(db_err("ending a read transaction"))?;
        Ok(ResumeState {
            frontier_len,
            // Rows are looked up by URL; positions are not handed out in order.
            frontier_next: 0,
            records: session.metrics.processed_elements,
            metrics: session.metrics,
            usage: session.usage,
        })
    }

    async fn frontier_page(&self, p: FrontierPage) -> StoreResult<Vec<FrontierItem>> {
        if p.limit == 0 || p.limit > FRONTIER_PAGE_MAX {
            return Err(StoreError::Invalid(format!(
                "frontier page limit {} is out of range 1..={FRONTIER_PAGE_MAX}",
                p.limit
            )));
        }
        // Positions are a bigserial: anything beyond i64::MAX was never assigned.
        let Ok(after) = i64::try_from(p.after_pos) else {
            return Ok(Vec::new());
        };
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT pos, url, depth, page FROM frontier WHERE session_id = $1 AND pos > $2 \
                 ORDER BY pos LIMIT $3",
            )
            .await
            .map_err(db_err("preparing a frontier read"))?;
        let rows = client
            .query(&stmt, &[&p.id.as_str(), &after, &(p.limit as i64)])
            .await
            .map_err(db_err(&format!("reading the frontier of session {}", p.id)))?;
        let key = key_name("frontier", &p.id);
        rows.iter()
            .map(|r| {
                Ok(FrontierItem {
                    pos: to_u64(row_get::<i64>(r, 0, &key)?, "frontier.pos")?,
                    entry: FrontierEntry {
                        url: row_get(r, 1, &key)?,
                        depth: to_u32(row_get::<i32>(r, 2, &key)?, "frontier.depth")?,
                        page: row_get(r, 3, &key)?,
                    },
                })
            })
            .collect()
    }

    async fn seen_filter(&self, p: SeenFilter) -> StoreResult<Vec<bool>> {
        if p.urls.len() > FRONTIER_PAGE_MAX {
            return Err(StoreError::Invalid(format!(
                "seen filter of {} URLs; at most {FRONTIER_PAGE_MAX} per call",
                p.urls.len()
            )));
        }
        if p.urls.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("SELECT url FROM seen WHERE session_id = $1 AND url = ANY($2)")
            .await
            .map_err(db_err("preparing a seen-set read"))?;
        let rows = client
            .query(&stmt, &[&p.id.as_str(), &p.urls])
            .await
            .map_err(db_err(&format!("reading the seen set of session {}", p.id)))?;
        let key = key_name("seen", &p.id);
        let found = rows
            .iter()
            .map(|r| row_get::<String>(r, 0, &key))
            .collect::<StoreResult<std::collections::HashSet<String>>>()?;
        Ok(p.urls.iter().map(|u| found.contains(u)).collect())
    }

    async fn log_tail(&self, id: &SessionId, limit: usize) -> StoreResult<Vec<LogLine>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = limit.min(LOG_LINES_MAX as usize) as i64;
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT at, level, message FROM (
                     SELECT id, at, level, message FROM log WHERE session_id = $1
                     ORDER BY id DESC LIMIT $2) t
                 ORDER BY id",
            )
            .await
            .map_err(db_err("preparing a log read"))?;
        let key = key_name("log", id);
        client
            .query(&stmt, &[&id.as_str(), &limit])
            .await
            .map_err(db_err(&format!("reading the log of session {id}")))?
            .iter()
            .map(|r| {
                Ok(LogLine {
                    at: Timestamp(row_get(r, 0, &key)?),
                    level: row_get(r, 1, &key)?,
                    message: row_get(r, 2, &key)?,
                })
            })
            .collect()
    }

    async fn session_counts(&self, now: Timestamp) -> StoreResult<SessionCounts> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT status, count(*), count(*) FILTER (WHERE run_at <= $1) \
                 FROM sessions GROUP BY status",
            )
            .await
            .map_err(db_err("preparing the session counts"))?;
        let rows = client
            .query(&stmt, &[&now.0])
            .await
            .map_err(db_err("counting sessions"))?;
        let mut counts = SessionCounts::default();
        for status in SessionStatus::ALL {
            counts.by_status.insert(status, 0);
        }
        for row in &rows {
            let name: String = row_get(row, 0, "sessions/status")?;
            let status = parse_status(&name, "sessions/status")?;
            let n = to_u64(row_get::<i64>(row, 1, "sessions/status")?, "count")?;
            counts.by_status.insert(status, n);
            if status == SessionStatus::Pending {
                counts.queue_depth = to_u64(row_get::<i64>(row, 2, "sessions/status")?, "count")?;
            }
        }
        Ok(counts)
    }

    async fn agent_put(&self, agent: Agent) -> StoreResult<()> {
        let body = codec::encode(&agent)?;
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO agents (client_id, name, body) VALUES ($1, $2, $3)
                 ON CONFLICT (client_id, name) DO UPDATE SET body = EXCLUDED.body",
                &[&agent.client_id, &agent.name, &body],
            )
            .await
            .map_err(db_err(&format!("saving agent {:?}", agent.name)))?;
        Ok(())
    }

    async fn agent_get(&self, client_id: &str, name: &str) -> StoreResult<Option<Agent>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT body FROM agents WHERE client_id = $1 AND name = $2",
                &[&client_id, &name],
            )
            .await
            .map_err(db_err(&format!("reading agent {name:?}")))?;
        let key = || format!("agents/{client_id}/{name}");
        match row {
            None => Ok(None),
            Some(row) => {
                let body: Vec<u8> = row_get(&row, 0, &key())?;
                codec::decode(&key, &body).map(Some)
            }
        }
    }

    async fn agent_delete(&self, client_id: &str, name: &str) -> StoreResult<bool> {
        let client = self.client().await?;
        let n = client
            .execute(
                "DELETE FROM agents WHERE client_id = $1 AND name = $2",
                &[&client_id, &name],
            )
            .await
            .map_err(db_err(&format!("deleting agent {name:?}")))?;
        Ok(n > 0)
    }

    async fn agent_list(&self) -> StoreResult<Vec<Agent>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT client_id, name, body FROM agents ORDER BY client_id, name",
                &[],
            )
            .await
            .map_err(db_err("listing agents"))?;
        rows.iter()
            .map(|row| {
                let client_id: String = row_get(row, 0, "agents")?;
                let name: String = row_get(row, 1, "agents")?;
                let key = || format!("agents/{client_id}/{name}");
                let body: Vec<u8> = row_get(row, 2, &key())?;
                codec::decode(&key, &body)
            })
            .collect()
    }

    async fn leader_acquire(&self, p: super::LeaderAcquire) -> StoreResult<bool> {
        // A row with an expiry rather than a session advisory lock: the lock would live on one
        // pooled connection, vanish silently when that connection drops, and follow the
        // server's clock; the row follows the injected `now`, so terms are testable, and a
        // holder learns it lost by a `false` at its next renewal.
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "INSERT INTO leaders (name, owner, expires_at) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE
                     SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at
                     WHERE leaders.owner = EXCLUDED.owner OR leaders.expires_at <= $4
                 RETURNING owner",
            )
            .await
            .map_err(db_err("preparing the leader election"))?;
        let expires = p.now.add(p.ttl).0;
        let row = client
            .query_opt(&stmt, &[&p.name, &p.owner, &expires, &p.now.0])
            .await
            .map_err(db_err("electing a leader"))?;
        Ok(row.is_some())
    }

    async fn pending_wait(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.notify.notified()).await;
    }

    async fn close(&self) -> StoreResult<()> {
        // Every acknowledged write is already committed (and, with the server's default
        // synchronous_commit, on disk); closing only releases connections.
        self.stop.cancel();
        let tasks = self
            .tasks
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        for task in tasks {
            // Each ends promptly once `stop` is cancelled (the announcer after a NOTIFY it owes).
            let _ = task.await;
        }
        self.pool.close();
        Ok(())
    }
}

/// How an attempt's commit ends: a checkpoint renews the lease, a finish ends the session.
enum Ending {
    Checkpoint {
        lease_expires_at: Timestamp,
    },
    Finish {
        status: SessionStatus,
        error: Option<SessionError>,
        cleanup_at: Timestamp,
    },
}

impl PostgresStore {
    /// Commits `batch` and `ending` in one transaction if the attempt still holds its lease.
    async fn attempt_commit(
        &self,
        a: &AttemptRef,
        batch: &CheckpointBatch,
        now: Timestamp,
        ending: Ending,
    ) -> StoreResult<bool> {
        let attempt = to_i32(a.attempt, "attempt")?;
        let records = i64::try_from(batch.records.len()).unwrap_or(i64::MAX);
        let pages = to_i64(batch.pages, "pages")?;
        let u = usage_columns(&batch.usage)?;
        let nonempty = !batch.is_empty();
        let checkpoint: i64 = nonempty.into();

        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(db_err("starting a transaction"))?;
        // The compare-and-set comes first: it locks the session row, so the batch below is
        // written only while this attempt holds the lease, and the record numbering cannot race.
        const COUNTERS: &str = "pages_processed = pages_processed + $4, \
             processed_elements = processed_elements + $5, http_requests = http_requests + $6, \
             http_errors = http_errors + $7, bytes_received = bytes_received + $8, \
             retries = retries + $9, robots_blocked = robots_blocked + $10, \
             checkpoints = checkpoints + $11, \
             progress_this_attempt = progress_this_attempt OR $11 > 0, updated_at = $12";
        let row = match &ending {
            Ending::Checkpoint { lease_expires_at } => {
                let stmt = tx
                    .prepare_cached(&format!(
                        "UPDATE sessions SET {COUNTERS}, lease_expires_at = $13 \
                         WHERE {IF_RUNNING} RETURNING processed_elements"
                    ))
                    .await
                    .map_err(db_err("preparing a checkpoint"))?;
                tx.query_opt(
                    &stmt,
                    &[
                        &a.id.as_str(),
                        &attempt,
                        &a.owner,
                        &pages,
                        &records,
                        &u[0],
                        &u[1],
                        &u[2],
                        &u[3],
                        &u[4],
                        &checkpoint,
                        &now.0,
                        &lease_expires_at.0,
                    ],
                )
                .await
            }
            Ending::Finish {
                status,
                error,
                cleanup_at,
            } => {
                let stmt = tx
                    .prepare_cached(&format!(
                        "UPDATE sessions SET {COUNTERS}, status = $13, error_kind = $14, \
                         error_message = $15, cleanup_at = $16, end_time = $12, \
                         lease_owner = NULL, lease_expires_at = NULL \
                         WHERE {IF_RUNNING} RETURNING processed_elements"
                    ))
                    .await
                    .map_err(db_err("preparing a finish"))?;
                let (error_kind, error_message) = error_columns(error.as_ref());
                tx.query_opt(
                    &stmt,
                    &[
                        &a.id.as_str(),
                        &attempt,
                        &a.owner,
                        &pages,
                        &records,
                        &u[0],
                        &u[1],
                        &u[2],
                        &u[3],
                        &u[4],
                        &checkpoint,
                        &now.0,
                        &status.as_str(),
                        &error_kind,
                        &error_message,
                        &cleanup_at.0,
                    ],
                )
                .await
            }
        }
        .map_err(db_err(&format!(
            "committing attempt {} of session {}",
            a.attempt, a.id
        )))?;
        let Some(row) = row else {
            // Not ours any more; the transaction rolls back on drop having written nothing.
            return Ok(false);
        };
        let total: i64 = row_get(&row, 0, &key_name("sessions", &a.id))?;
        if nonempty {
            write_batch(&tx, a, batch, total - records).await?;
        }
        tx.commit().await.map_err(db_err(&format!(
            "committing attempt {} of session {}",
            a.attempt, a.id
        )))?;
        Ok(true)
    }
}

/// Writes a checkpoint's records, frontier, seen set and log inside the caller's transaction.
/// `first_seq`: the number of the batch's first record.
async fn write_batch(
    tx: &deadpool_postgres::Transaction<'_>,
    a: &AttemptRef,
    batch: &CheckpointBatch,
    first_seq: i64,
) -> StoreResult<()> {
    let id = a.id.as_str();
    let ctx = |what: &str| {
        format!(
            "writing the {what} of session {} attempt {}",
            a.id, a.attempt
        )
    };
    if !batch.records.is_empty() {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO records (session_id, seq, data)
                 SELECT $1, $2 + t.ord - 1, t.data
                 FROM unnest($3::jsonb[]) WITH ORDINALITY AS t(data, ord)",
            )
            .await
            .map_err(db_err("preparing a records insert"))?;
        tx.execute(&stmt, &[&id, &first_seq, &batch.records])
            .await
            .map_err(db_err(&ctx("records")))?;
    }
    // Added before removing: a URL found and fetched within one batch ends up not in the
    // frontier.
    if !batch.frontier_add.is_empty() {
        let urls: Vec<&str> = batch.frontier_add.iter().map(|f| f.url.as_str()).collect();
        let depths = batch
            .frontier_add
            .iter()
            .map(|f| to_i32(f.depth, "frontier depth"))
            .collect::<StoreResult<Vec<i32>>>()?;
        let pages: Vec<Option<&str>> = batch
            .frontier_add
            .iter()
            .map(|f| f.page.as_deref())
            .collect();
        let stmt = tx
            .prepare_cached(
                "INSERT INTO frontier (session_id, url, depth, page)
                 SELECT $1, t.url, t.depth, t.page
                 FROM unnest($2::text[], $3::int4[], $4::text[]) WITH ORDINALITY
                     AS t(url, depth, page, ord)
                 ORDER BY t.ord
                 ON CONFLICT (session_id, url) DO NOTHING",
            )
            .await
            .map_err(db_err("preparing a frontier insert"))?;
        tx.execute(&stmt, &[&id, &urls, &depths, &pages])
            .await
            .map_err(db_err(&ctx("frontier")))?;
    }
    if !batch.frontier_done.is_empty() {
        let stmt = tx
            .prepare_cached("DELETE FROM frontier WHERE session_id = $1 AND url = ANY($2)")
            .await
            .map_err(db_err("preparing a frontier delete"))?;
        let done: Vec<&str> = batch.frontier_done.iter().map(|d| d.url.as_str()).collect();
        tx.execute(&stmt, &[&id, &done])
            .await
            .map_err(db_err(&ctx("frontier")))?;
    }
    if !batch.seen_add.is_empty() {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO seen (session_id, url) SELECT $1, unnest($2::text[])
                 ON CONFLICT (session_id, url) DO NOTHING",
            )
            .await
            .map_err(db_err("preparing a seen insert"))?;
        tx.execute(&stmt, &[&id, &batch.seen_add])
            .await
            .map_err(db_err(&ctx("seen set")))?;
    }
    if !batch.log.is_empty() {
        let at: Vec<i64> = batch.log.iter().map(|l| l.at.0).collect();
        let level: Vec<&str> = batch.log.iter().map(|l| l.level.as_str()).collect();
        let message: Vec<&str> = batch.log.iter().map(|l| l.message.as_str()).collect();
        let stmt = tx
            .prepare_cached(
                "INSERT INTO log (session_id, at, level, message)
                 SELECT $1, t.at, t.level, t.message
                 FROM unnest($2::int8[], $3::text[], $4::text[]) WITH ORDINALITY
                     AS t(at, level, message, ord)
                 ORDER BY t.ord",
            )
            .await
            .map_err(db_err("preparing a log insert"))?;
        tx.execute(&stmt, &[&id, &at, &level, &message])
            .await
            .map_err(db_err(&ctx("log")))?;
        let trim = tx
            .prepare_cached(
                "DELETE FROM log WHERE session_id = $1 AND id <= (
                     SELECT id FROM log WHERE session_id = $1 ORDER BY id DESC
                     OFFSET $2 LIMIT 1)",
            )
            .await
            .map_err(db_err("preparing a log trim"))?;
        tx.execute(&trim, &[&id, &(LOG_LINES_MAX as i64)])
            .await
            .map_err(db_err(&ctx("log")))?;
    }
    Ok(())
}

/// Deletes everything stored under the given sessions except their `sessions` rows.
async fn delete_session_data(
    tx: &deadpool_postgres::Transaction<'_>,
    ids: &[&str],
) -> StoreResult<()> {
    for table in ["records", "frontier", "seen", "log"] {
        tx.execute(
            &format!("DELETE FROM {table} WHERE session_id = ANY($1)"),
            &[&ids],
        )
        .await
        .map_err(db_err(&format!(
            "removing the {table} of {} session(s)",
            ids.len()
        )))?;
    }
    Ok(())
}

/// Opens one connection outside the pool (for migrations), driving it in a task.
async fn connect_one(config: &tokio_postgres::Config) -> StoreResult<tokio_postgres::Client> {
    let (client, connection) = config.connect(NoTls).await.map_err(|e| {
        StoreError::Backend(format!(
            "connecting to PostgreSQL: {e}; check the database URL and that the server is up"
        ))
    })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "harvest: PostgreSQL migration connection ended");
        }
    });
    Ok(client)
}

/// Maps a driver error to [`StoreError::Backend`] saying what was being done.
fn db_err(context: &str) -> impl FnOnce(tokio_postgres::Error) -> StoreError + '_ {
    move |e| match e.as_db_error() {
        Some(db) => StoreError::Backend(format!(
            "PostgreSQL, {context}: {} ({}){}",
            db.message(),
            db.code().code(),
            db.detail().map(|d| format!("; {d}")).unwrap_or_default()
        )),
        None => StoreError::Backend(format!("PostgreSQL, {context}: {e}")),
    }
}

/// Refuses a schema name that would need quoting: it is also used in a startup option.
fn validate_schema(schema: &str) -> StoreResult<()> {
    let mut chars = schema.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if first_ok && rest_ok && schema.len() <= 63 {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "schema name {schema:?} is not allowed; use 1 to 63 characters of [a-z0-9_], \
             not starting with a digit"
        )))
    }
}

/// Quotes an identifier for SQL text (names are validated, this is belt and braces).
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn row_get<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    idx: usize,
    key: &str,
) -> StoreResult<T> {
    row.try_get(idx).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        reason: format!("column {idx}: {e}"),
    })
}

fn parse_status(name: &str, key: &str) -> StoreResult<SessionStatus> {
    name.parse().map_err(|e: String| StoreError::Corrupt {
        key: key.to_string(),
        reason: e,
    })
}

/// Decodes a row selected with [`SESSION_COLUMNS`].
fn session_from_row(row: &Row) -> StoreResult<Session> {
    let raw_id: String = row_get(row, 0, "sessions/id")?;
    let key = format!("sessions/{raw_id}");
    let corrupt = |reason: String| StoreError::Corrupt {
        key: key.clone(),
        reason,
    };
    let id = SessionId::parse(&raw_id).map_err(|e| corrupt(e.to_string()))?;
    let g64 = |i: usize| -> StoreResult<u64> {
        let v: i64 = row_get(row, i, &key)?;
        u64::try_from(v).map_err(|_| corrupt(format!("column {i} is negative ({v})")))
    };
    let g32 = |i: usize| -> StoreResult<u32> {
        let v: i32 = row_get(row, i, &key)?;
        u32::try_from(v).map_err(|_| corrupt(format!("column {i} is negative ({v})")))
    };
    let ts = |i: usize| -> StoreResult<Option<Timestamp>> {
        Ok(row_get::<Option<i64>>(row, i, &key)?.map(Timestamp))
    };
    let status = parse_status(&row_get::<String>(row, 2, &key)?, &key)?;
    let lease_owner: Option<String> = row_get(row, 6, &key)?;
    let lease = match (lease_owner, ts(7)?) {
        (Some(owner), Some(expires_at)) => Some(Lease { owner, expires_at }),
        _ => None,
    };
    let error_kind: Option<String> = row_get(row, 22, &key)?;
    let error_message: Option<String> = row_get(row, 23, &key)?;
    let error = error_kind.map(|kind| SessionError {
        kind: kind.into(),
        message: error_message.unwrap_or_default(),
    });
    let spec_bytes: Vec<u8> = row_get(row, 25, &key)?;
    let spec: Spec = codec::decode(&|| key.clone(), &spec_bytes)?;
    Ok(Session {
        id,
        seq: g64(1)?,
        client: spec.client,
        status,
        job: spec.job,
        options: spec.options,
        attempt: g32(3)?,
        failures: g32(4)?,
        progress_this_attempt: row_get(row, 5, &key)?,
        lease,
        cancel_requested: row_get(row, 8, &key)?,
        run_at: Timestamp(row_get(row, 9, &key)?),
        created_at: Timestamp(row_get(row, 10, &key)?),
        updated_at: Timestamp(row_get(row, 11, &key)?),
        cleanup_at: ts(12)?,
        metrics: SessionMetrics {
            start_time: ts(13)?,
            end_time: ts(14)?,
            pages_processed: g64(15)?,
            processed_elements: g64(16)?,
        },
        usage: TokenUsage {
            http_requests: g64(17)?,
            http_errors: g64(18)?,
            bytes_received: g64(19)?,
            retries: g64(20)?,
            robots_blocked: g64(21)?,
        },
        error,
        checkpoints: g64(24)?,
    })
}

fn error_columns(e: Option<&SessionError>) -> (Option<&str>, Option<&str>) {
    match e {
        Some(e) => (Some(e.kind.as_str()), Some(e.message.as_str())),
        None => (None, None),
    }
}

fn usage_columns(u: &TokenUsage) -> StoreResult<[i64; 5]> {
    Ok([
        to_i64(u.http_requests, "usage.http_requests")?,
        to_i64(u.http_errors, "usage.http_errors")?,
        to_i64(u.bytes_received, "usage.bytes_received")?,
        to_i64(u.retries, "usage.retries")?,
        to_i64(u.robots_blocked, "usage.robots_blocked")?,
    ])
}

fn to_i64(v: u64, what: &str) -> StoreResult<i64> {
    i64::try_from(v)
        .map_err(|_| StoreError::Invalid(format!("{what} = {v} does not fit a PostgreSQL bigint")))
}

fn to_i32(v: u32, what: &str) -> StoreResult<i32> {
    i32::try_from(v)
        .map_err(|_| StoreError::Invalid(format!("{what} = {v} does not fit a PostgreSQL integer")))
}

fn to_u64(v: i64, what: &str) -> StoreResult<u64> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt {
        key: what.to_string(),
        reason: format!("negative value {v}"),
    })
}

fn to_u32(v: i32, what: &str) -> StoreResult<u32> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt {
        key: what.to_string(),
        reason: format!("negative value {v}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        assert!(validate_schema("harvest_test_1").is_ok());
        assert!(validate_schema("_x").is_ok());
        assert!(validate_schema("").is_err());
        assert!(validate_schema("1abc").is_err());
        assert!(validate_schema("Abc").is_err());
        assert!(validate_schema("a b").is_err());
        assert!(validate_schema("a\"b").is_err());
        assert!(validate_schema(&"a".repeat(64)).is_err());
    }
}
