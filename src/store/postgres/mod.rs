//! The PostgreSQL backend: many worker processes on many hosts share one database.
//!
//! Layout (see `migrations/`): a `sessions` table whose every mutable field is a column and whose
//! immutable part (client, job, options) is one versioned bincode value, plus `records`,
//! `frontier`, `seen`, `log` and `agents`. Every transition is a compare-and-set on
//! `(status, attempt, lease_owner)` whose result is the state machine's (`session::lifecycle`):
//! claim, heartbeat, checkpoint and finish are one statement each (their SQL computes what the
//! lifecycle functions do; the conformance suite compares them), requeue, reclaim and cancel
//! read the row under its lock, apply the lifecycle function and write every mutable column
//! back in the same transaction. A claim is one
//! `UPDATE ... WHERE seq = ANY(ARRAY(SELECT ... FOR UPDATE SKIP LOCKED))` statement, so racing
//! claimers never block on, nor double-claim, a row. Statements whose right plan is an index
//! read in order run with the planner told so ([`BEGIN_INDEX_PLANS`]): a queue table outruns its
//! statistics. After a submission, requeue or reclaim commits, the store
//! sends `NOTIFY harvest_pending` (payload: the schema name; coalesced; `listen::announce` says
//! why not inside the transaction); each store keeps one dedicated `LISTEN` connection that
//! wakes [`Store::pending_wait`].
//!
//! Every store works inside one schema (its `search_path`), created and migrated at connect, so
//! several deployments or tests can share a database. This module never reads the clock.
//!
//! One concern per file, each an `impl PostgresStore` block: `sessions` (insert, claim, the
//! transitions, cancel, removal, expiry, listings and counts), `checkpoint` (an attempt's commit
//! and the writes of its batch), `crawl` (frontier pages, the seen set, resume), `records`
//! (records and the log), `agents` (agents and leaderships), `rows` (row decoding and column
//! conversions), `listen` (LISTEN/NOTIFY) and `migrate` (schema migrations). The methods of
//! [`Store`] below only call into them.

/// The settings of [`BEGIN_INDEX_PLANS`], a macro so that the other plan texts can extend it
/// with `concat!`.
macro_rules! index_plans {
    () => {
        "SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off; \
         SET LOCAL enable_sort = off"
    };
}

/// The settings of [`LOOKUP_PLANS`].
macro_rules! lookup_plans {
    () => {
        concat!(
            index_plans!(),
            "; SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off"
        )
    };
}

mod agents;
mod checkpoint;
mod crawl;
mod events;
mod insert;
mod listen;
mod migrate;
mod records;
mod rows;
mod sessions;
mod stats;

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{
    BuildError, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime,
};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use super::{
    Agent, CancelOutcome, CheckpointCommit, FrontierItem, FrontierPage, HeartbeatOutcome,
    InsertOutcome, LeaderAcquire, LeaseReclaim, Reclaimed, RecordsPage, RecordsRemove, ResumeState,
    SeenFilter, SessionCancel, SessionClaim, SessionCounts, SessionFinish, SessionHeartbeat,
    SessionInsert, SessionList, SessionPage, SessionRequeue, SessionsExpire, Store, StoreError,
    StoreResult,
};
use crate::session::{LogLine, Record, Session, SessionKey, Timestamp};

/// Advisory lock class (first key of the two-key form) of schema migrations.
const ADVISORY_CLASS_MIGRATE: i32 = 0x6876_0001;
/// Advisory lock class of the single-session-agent check.
const ADVISORY_CLASS_AGENT: i32 = 0x6876_0002;
/// Advisory lock class of the quota checks: key 0 serializes claims while `max_running` limits
/// are set; `hashtext(client)` serializes a client's inserts while it has a `max_pending`.
const ADVISORY_CLASS_QUOTA: i32 = 0x6876_0003;

/// Connections in the pool. 16: enough for a process's workers, API and scheduler without
/// exhausting a default server (`max_connections = 100`) when a few processes share it.
const POOL_SIZE: usize = 16;
/// How long a call waits for a free pooled connection, and for a new connection.
const POOL_WAIT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the server lets a connection of this store sit idle inside a transaction before
/// it ends the session (and its locks): see `connect_with_schema`.
const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(10);

/// The schema [`PostgresStore::connect`] uses.
pub const DEFAULT_SCHEMA: &str = "public";

/// A PostgreSQL-backed [`Store`].
pub struct PostgresStore {
    pool: Pool,
    schema: String,
    notify: Arc<Notify>,
    /// The NOTIFYs the announcer owes other processes (`harvest_pending`, `harvest_events`).
    announce: Arc<listen::Announcements>,
    /// Woken when an event may have been recorded (here, or NOTIFY harvest_events).
    events_notify: Arc<Notify>,
    listener_ready: watch::Receiver<bool>,
    stop: CancellationToken,
    /// The listener and the announcer; awaited by `close`.
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Cancels of RUNNING sessions, from this process and (through the listener) from others.
    cancels: tokio::sync::broadcast::Sender<SessionKey>,
    /// Per-client limits ([`Store::quotas_set`]).
    quotas: std::sync::RwLock<Arc<crate::store::Quotas>>,
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
        // `idle_in_transaction_session_timeout`: a process cut off from the database in the
        // middle of a transaction (a network partition) would otherwise keep its row locks until
        // the server's TCP keepalive gives up (hours), and maintenance, which skips locked rows,
        // could not take its sessions back; every transaction here sends its statements back to
        // back, so none is idle for long on its own.
        config.options(format!(
            "-c search_path={schema} -c idle_in_transaction_session_timeout={}",
            IDLE_IN_TRANSACTION_TIMEOUT.as_millis()
        ));
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
            .map_err(|e| StoreError::Pool {
                context: "building the connection pool".into(),
                // The pool's only build error, as the error a `get` would give.
                source: match e {
                    BuildError::NoRuntimeSpecified => PoolError::NoRuntimeSpecified,
                },
            })?;

        let notify = Arc::new(Notify::new());
        let (ready_tx, ready_rx) = watch::channel(false);
        let stop = CancellationToken::new();
        let mut listen_config = config;
        // Named per schema so an operator (or a test) can find this connection in
        // pg_stat_activity; the server truncates it to 63 bytes.
        listen_config.application_name(format!("harvest-listener {schema}"));
        let cancels = tokio::sync::broadcast::channel(1024).0;
        let events_notify = Arc::new(Notify::new());
        let listener = tokio::spawn(listen::run(
            listen_config,
            schema.to_string(),
            Arc::clone(&notify),
            Arc::clone(&events_notify),
            cancels.clone(),
            ready_tx,
            stop.clone(),
        ));
        let announce = Arc::new(listen::Announcements::default());
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
            events_notify,
            listener_ready: ready_rx,
            stop,
            tasks: Mutex::new(vec![listener, announcer]),
            cancels,
            quotas: std::sync::RwLock::new(Arc::default()),
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
        self.pool.get().await.map_err(|source| StoreError::Pool {
            context: format!(
                "getting a connection from the pool of {POOL_SIZE} (schema {:?})",
                self.schema
            ),
            source,
        })
    }

    /// A session became claimable: wakes this process's waiters at once and has the announcer
    /// NOTIFY other processes.
    fn wake_local(&self) {
        listen::wake(&self.notify);
        self.announce.pending();
    }

    /// A transition may have recorded events (the trigger wrote them in its transaction):
    /// wakes this process's reader and has the announcer NOTIFY the others. Called after every
    /// write that can change a session; skipped when `wrote` says its answer changed nothing
    /// (an empty claim of an idle worker would otherwise wake every process's reader). A failed
    /// call may still have committed: it always signals (a spurious wakeup costs one read).
    fn event_written<T>(
        &self,
        r: StoreResult<T>,
        wrote: impl FnOnce(&T) -> bool,
    ) -> StoreResult<T> {
        if r.as_ref().map_or(true, wrote) {
            listen::wake(&self.events_notify);
            self.announce.events();
        }
        r
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn session_insert(&self, p: SessionInsert) -> StoreResult<InsertOutcome> {
        let r = self.insert_session(p).await;
        self.event_written(r, |_| true)
    }

    async fn session_insert_many(
        &self,
        sessions: Vec<Session>,
    ) -> StoreResult<Vec<StoreResult<InsertOutcome>>> {
        let r = self.insert_sessions(sessions).await;
        self.event_written(r, |_| true)
    }

    async fn session_get(&self, id: &SessionKey) -> StoreResult<Option<Session>> {
        self.get_session(id).await
    }

    async fn session_list(&self, p: SessionList) -> StoreResult<SessionPage> {
        self.list_sessions(p).await
    }

    async fn session_claim(&self, p: SessionClaim) -> StoreResult<Vec<Session>> {
        let r = self.claim_sessions(p).await;
        self.event_written(r, |c| !c.is_empty())
    }

    async fn session_heartbeat_if_running(
        &self,
        p: SessionHeartbeat,
    ) -> StoreResult<HeartbeatOutcome> {
        self.heartbeat(p).await
    }

    async fn checkpoint_commit_if_running(
        &self,
        p: CheckpointCommit,
    ) -> StoreResult<Option<Session>> {
        let r = self.commit_checkpoint(p).await;
        self.event_written(r, Option::is_some)
    }

    async fn session_finish_if_running(&self, p: SessionFinish) -> StoreResult<Option<Session>> {
        let r = self.finish_session(p).await;
        self.event_written(r, Option::is_some)
    }

    async fn session_finish_many(
        &self,
        items: &[SessionFinish],
    ) -> StoreResult<Vec<StoreResult<Option<Session>>>> {
        let r = self.finish_sessions(items).await;
        self.event_written(r, |out| out.iter().any(|r| matches!(r, Ok(Some(_)))))
    }

    async fn session_requeue_if_running(&self, p: SessionRequeue) -> StoreResult<Option<Session>> {
        let r = self.requeue_session(p).await;
        self.event_written(r, Option::is_some)
    }

    async fn leases_reclaim(&self, p: LeaseReclaim) -> StoreResult<Vec<Reclaimed>> {
        let r = self.reclaim_leases(p).await;
        self.event_written(r, |r| !r.is_empty())
    }

    async fn session_cancel(&self, p: SessionCancel) -> StoreResult<CancelOutcome> {
        let r = self.cancel_session(p).await;
        self.event_written(r, |_| true)
    }

    async fn session_remove(&self, id: &SessionKey) -> StoreResult<Option<Session>> {
        let r = self.remove_session(id).await;
        self.event_written(r, Option::is_some)
    }

    async fn records_remove(&self, p: RecordsRemove) -> StoreResult<Option<Session>> {
        self.remove_records(&p.id, p.below).await
    }

    async fn sessions_expire(&self, p: SessionsExpire) -> StoreResult<Vec<Session>> {
        let r = self.expire_sessions(p).await;
        self.event_written(r, |r| !r.is_empty())
    }

    async fn records_page(&self, p: RecordsPage) -> StoreResult<Vec<Record>> {
        self.page_records(p).await
    }

    async fn resume_load(&self, id: &SessionKey) -> StoreResult<ResumeState> {
        self.load_resume(id).await
    }

    async fn frontier_page(&self, p: FrontierPage) -> StoreResult<Vec<FrontierItem>> {
        self.page_frontier(p).await
    }

    async fn seen_filter(&self, p: SeenFilter) -> StoreResult<Vec<bool>> {
        self.filter_seen(p).await
    }

    async fn context_get(&self, id: &SessionKey) -> StoreResult<Option<crate::session::Context>> {
        self.context(id).await
    }

    async fn log_tail(&self, id: &SessionKey, limit: usize) -> StoreResult<Vec<LogLine>> {
        self.tail_log(id, limit).await
    }

    async fn session_counts(&self, now: Timestamp) -> StoreResult<SessionCounts> {
        self.count_sessions(now).await
    }

    async fn session_stats(
        &self,
        q: crate::store::StatsQuery,
    ) -> StoreResult<crate::store::SessionStats> {
        self.stats(q).await
    }

    async fn agent_put(&self, agent: Agent) -> StoreResult<()> {
        self.put_agent(agent).await
    }

    async fn agent_get(&self, client_id: &str, name: &str) -> StoreResult<Option<Agent>> {
        self.get_agent(client_id, name).await
    }

    async fn agent_delete(&self, client_id: &str, name: &str) -> StoreResult<bool> {
        self.delete_agent(client_id, name).await
    }

    async fn agent_list(&self) -> StoreResult<Vec<Agent>> {
        self.list_agents().await
    }

    async fn leader_acquire(&self, p: LeaderAcquire) -> StoreResult<bool> {
        self.acquire_leader(p).await
    }

    fn cancel_requests(&self) -> tokio::sync::broadcast::Receiver<SessionKey> {
        self.cancels.subscribe()
    }

    async fn pending_wait(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.notify.notified()).await;
    }

    fn quotas_set(&self, q: crate::store::Quotas) -> StoreResult<()> {
        *self.quotas.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(q);
        Ok(())
    }

    fn events_recorded(&self) -> bool {
        true
    }

    fn combines_inserts(&self) -> bool {
        true
    }

    fn batches_one_at_a_time(&self) -> bool {
        true
    }

    async fn events_after(
        &self,
        p: crate::store::EventsAfter,
    ) -> StoreResult<Vec<crate::event::Event>> {
        self.read_events(p).await
    }

    async fn events_last_id(&self) -> StoreResult<u64> {
        self.last_event_id().await
    }

    async fn events_wait(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.events_notify.notified()).await;
    }

    async fn events_expire(&self, retention: Duration) -> StoreResult<u64> {
        self.expire_events(retention).await
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

/// Opens one connection outside the pool (for migrations), driving it in a task.
async fn connect_one(config: &tokio_postgres::Config) -> StoreResult<tokio_postgres::Client> {
    let (client, connection) =
        config
            .connect(NoTls)
            .await
            .map_err(|source| StoreError::Postgres {
                context: "connecting (check the database URL and that the server is up)".into(),
                source,
            })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "harvest: PostgreSQL migration connection ended");
        }
    });
    Ok(client)
}

/// Planner settings, for one transaction, of the statements whose right plan is known: reading
/// an index in its order, never a scan or a sort of the table. The sessions and events tables
/// change faster than autovacuum analyzes them, and with statistics from when they were small
/// the planner chose otherwise: a claim of a few sessions sorted the whole PENDING backlog
/// (auto_explain in `bench queue`: 44 claims of 50 ms in one burn-down, a fifth of the
/// server's CPU), an event read sorted a bitmap scan of the log, and event expiry read every
/// event. Disabled plan kinds are still used where nothing else can answer, so a statement
/// never fails for them.
/// `BEGIN` comes first: the text opens the transaction of [`transaction_planned`].
const BEGIN_INDEX_PLANS: &str = concat!("BEGIN; ", index_plans!());

/// The settings of [`BEGIN_INDEX_PLANS`], and each row of a join found by an index lookup: no
/// hash or merge join over a scan of every row of the other side (a batch of finishes joins its
/// rows to `sessions`). Set inside a transaction ([`query_planned`]).
const LOOKUP_PLANS: &str = lookup_plans!();

/// `BEGIN` and [`LOOKUP_PLANS`], for [`transaction_planned`].
const BEGIN_LOOKUP_PLANS: &str = concat!("BEGIN; ", lookup_plans!());

/// Runs `stmt` with [`BEGIN_INDEX_PLANS`] in a transaction of its own and commits; its rows.
/// `what` names it in errors.
async fn index_planned(
    client: &mut deadpool_postgres::Object,
    stmt: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    what: &str,
) -> StoreResult<Vec<tokio_postgres::Row>> {
    let stmt = client
        .prepare_cached(stmt)
        .await
        .map_err(|e| db_err(&format!("preparing {what}"))(e))?;
    transaction_planned(client, BEGIN_INDEX_PLANS, &stmt, params, what).await
}

/// Runs `stmt` in a transaction of its own, opened by `begin` (`BEGIN` and `SET LOCAL` commands:
/// [`BEGIN_INDEX_PLANS`] or [`BEGIN_LOOKUP_PLANS`]), and commits; its rows. The error contexts
/// are only formatted for an error: this runs for every claim, finish and event read.
/// `BEGIN` with the settings, the statement and `COMMIT` are sent together: one round
/// trip where a [`Transaction`](tokio_postgres::Transaction) takes three (each round trip is
/// a wake-up of both processes; claims, finishes and event reads are most of what a busy
/// process sends). All three are queued on the connection in the first poll, before anything
/// is awaited, so once this future has been polled the server runs the whole transaction even
/// if the future is dropped: the connection goes back to the pool outside a transaction, as a
/// `Transaction`'s drop leaves it. If the statement fails the server ends the transaction at
/// `COMMIT` (it answers `ROLLBACK`), and the statement's error is returned.
async fn transaction_planned(
    client: &tokio_postgres::Client,
    begin: &str,
    stmt: &tokio_postgres::Statement,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    what: &str,
) -> StoreResult<Vec<tokio_postgres::Row>> {
    let (begun, rows, committed) = futures::future::join3(
        client.batch_execute(begin),
        client.query(stmt, params),
        client.batch_execute("COMMIT"),
    )
    .await;
    begun.map_err(|e| db_err(&format!("starting a transaction for {what}"))(e))?;
    let rows = rows.map_err(db_err(what))?;
    committed.map_err(|e| db_err(&format!("committing {what}"))(e))?;
    Ok(rows)
}

/// Sets `plans` (`SET LOCAL` commands) in `tx` and runs `stmt`, both sent together: one round
/// trip. The settings hold for the rest of the transaction.
async fn query_planned(
    tx: &deadpool_postgres::Transaction<'_>,
    plans: &str,
    stmt: &tokio_postgres::Statement,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    what: &str,
) -> StoreResult<Vec<tokio_postgres::Row>> {
    // Polled in this order, the settings are sent before the statement.
    let (set, rows) = futures::future::join(tx.batch_execute(plans), tx.query(stmt, params)).await;
    set.map_err(db_err(&format!("setting the plan of {what}")))?;
    rows.map_err(db_err(what))
}

/// Maps a driver error to [`StoreError::Postgres`] saying what was being done.
fn db_err(context: &str) -> impl FnOnce(tokio_postgres::Error) -> StoreError + '_ {
    move |source| StoreError::Postgres {
        context: context.to_string(),
        source,
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
