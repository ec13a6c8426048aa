//! The library API: [`Harvest`] (the seed's WebHarvestService and SessionRegistry in one).
//!
//! It validates submissions, writes them durably through the [`Store`], applies the effects of
//! what it changes (events, metrics, sink cleanup), and owns this process's runtime: the worker
//! pool and the maintenance loop. The HTTP API and the CLI are thin layers over it, so tests and
//! benches use exactly what users run. Agents (saved configs) are in [`agents`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast;

use async_trait::async_trait;

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, StoreKind};
use crate::event::{Event, EventBus, EventScope};
use crate::job::{ConfigRejected, Job};
use crate::runtime::{
    AgentRunner, CommitObserver, Effects, Maintainer, Maintenance, MaintenanceReport, Running,
    WorkerPool, WorkerSettings,
};
use crate::session::{
    ClientContext, JobSpec, Record, Session, SessionId, SessionIdError, SessionKey, SessionOptions,
    Timestamp,
};
use crate::store::{
    CancelOutcome, InsertOutcome, RecordsPage, SessionInsert, SessionList, SessionPage, Store,
    StoreError,
};

pub mod agents;
mod submit;
pub mod validation;

pub use agents::{AgentRun, AgentSpec};
pub use validation::Validations;

/// Errors of the library API.
#[derive(Debug, thiserror::Error)]
pub enum HarvestError {
    /// The storage layer failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The scraper config (or params) does not validate; the message names the field.
    #[error("invalid config: {0}")]
    InvalidConfig(crate::job::ConfigRejected),
    /// A caller-supplied session id is not acceptable.
    #[error("invalid session id: {0}")]
    InvalidId(#[from] SessionIdError),
    /// A request field is out of range.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A session with this id exists in the caller's tenant (an id is reused only after its
    /// session was removed; another tenant's sessions never conflict).
    #[error("session {0} already exists")]
    Duplicate(SessionId),
    /// The client has `max_pending` sessions waiting (`[[clients]] max_pending`): retry later.
    #[error(
        "client {client:?} has {limit} pending sessions, its max_pending; retry once some have started"
    )]
    QuotaExceeded {
        /// The client.
        client: String,
        /// Its `max_pending`.
        limit: u64,
    },
    /// No such session (or not this client's).
    #[error("session {0} not found")]
    NotFound(SessionId),
    /// No such agent (or not this client's).
    #[error("agent {0} not found")]
    AgentNotFound(String),
    /// The operation conflicts with the session's state.
    #[error("{0}")]
    Conflict(String),
    /// The service could not start.
    #[error("startup: {0}")]
    Startup(String),
    /// Too much work at once (every config check slot taken); retry shortly.
    #[error("busy: {0}")]
    Busy(String),
}

/// The most sessions [`Harvest::submit_many`] takes at once.
pub const MAX_BATCH: usize = 1000;

/// A submission.
#[derive(Debug, Clone, Default)]
pub struct SubmitRequest {
    /// The config: a scraper config as a JSON object, or Web-Harvest XML as a string (see
    /// [`crate::kinds::parse_config_text`] for a file's text).
    pub config: serde_json::Value,
    /// Parameters overriding the config's `[vars]`.
    pub params: BTreeMap<String, String>,
    /// Who submits it.
    pub client: ClientContext,
    /// Options; unset ones take the service defaults.
    pub options: SessionOptions,
    /// A caller-chosen id (validated, unique); `None`: a new UUID v7.
    pub session_id: Option<SessionId>,
    /// The agent this run belongs to.
    pub agent: Option<String>,
    /// For a `sessions = "single"` agent: refuse when another run is active.
    pub single_agent: bool,
}

impl SubmitRequest {
    /// A request for `config` with defaults for everything else.
    pub fn new(config: serde_json::Value) -> SubmitRequest {
        SubmitRequest {
            config,
            ..SubmitRequest::default()
        }
    }

    /// Sets the client.
    pub fn client(mut self, client: ClientContext) -> Self {
        self.client = client;
        self
    }

    /// Sets the options.
    pub fn options(mut self, options: SessionOptions) -> Self {
        self.options = options;
        self
    }

    /// Sets a caller-chosen session id.
    pub fn session_id(mut self, id: SessionId) -> Self {
        self.session_id = Some(id);
        self
    }

    /// Adds a parameter.
    pub fn param(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.params.insert(k.into(), v.into());
        self
    }
}

struct Inner {
    store: Arc<dyn Store>,
    /// Combines concurrent single submissions, for a store that [`Store::combines_inserts`].
    inserts: Option<submit::Inserter>,
    job: Arc<dyn Job>,
    effects: Effects,
    clock: Arc<dyn Clock>,
    config: Config,
    workers: Mutex<Option<WorkerPool>>,
    maintainer: Arc<Maintainer>,
    maintenance: Mutex<Option<Maintenance>>,
    /// The last [`Harvest::stats`] per scope, with when it was read.
    stats: Mutex<StatsCache>,
    /// Permits of config checks (off the runtime, bounded).
    validations: Validations,
    /// Submitted configs whose check passed recently ([`Harvest::check_submitted`]).
    passed: validation::Passed,
    /// Stops the event feed (stores that record events) when the service shuts down or drops.
    _events_feed: tokio_util::sync::DropGuard,
    events_stop: tokio_util::sync::CancellationToken,
}

/// Stats per scope (a client id, or `None` for everyone's), reused for [`STATS_FRESH`].
type StatsCache =
    std::collections::HashMap<Option<String>, (std::time::Instant, crate::store::SessionStats)>;

/// How long a stats answer is reused: consoles poll it, and on sled it reads every session.
const STATS_FRESH: Duration = Duration::from_secs(1);

/// Most scopes the stats cache holds before it is emptied (tenants are configured, so few).
const STATS_SCOPES_MAX: usize = 1024;

/// The harvest service of this process: submit, look up, cancel and close sessions; run workers.
#[derive(Clone)]
pub struct Harvest {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Harvest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harvest")
            .field("store", &self.inner.store.backend())
            .finish()
    }
}

/// Builds a [`Harvest`] with parts replaced (store, job, clock): for tests and embedding.
pub struct HarvestBuilder {
    config: Config,
    store: Option<Arc<dyn Store>>,
    job: Option<Arc<dyn Job>>,
    clock: Arc<dyn Clock>,
    observer: Option<Arc<dyn CommitObserver>>,
}

impl HarvestBuilder {
    /// Uses this store instead of opening the one the config names.
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// Runs this job instead of the scraper engine.
    pub fn job(mut self, job: Arc<dyn Job>) -> Self {
        self.job = Some(job);
        self
    }

    /// Uses this clock.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Tells `observer` of every checkpoint this process's workers commit, in commit order,
    /// before the job goes on (`harvest run` prints records from here).
    pub fn observe_commits(mut self, observer: Arc<dyn CommitObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Opens the store (unless given), recovers sessions left RUNNING by a dead process (sled),
    /// and returns the service. Workers are not started: see [`Harvest::start`].
    pub async fn open(self) -> Result<Harvest, HarvestError> {
        let store = match self.store {
            Some(s) => s,
            None => open_store(&self.config).await?,
        };
        let mut quotas = crate::store::Quotas::default();
        for c in &self.config.clients {
            if let Some(n) = c.max_running {
                quotas.max_running.insert(c.id.clone(), n);
            }
            if let Some(n) = c.max_pending {
                quotas.max_pending.insert(c.id.clone(), n);
            }
        }
        store.quotas_set(quotas)?;
        let job = match self.job {
            Some(j) => j,
            None => default_job(&self.config)?,
        };
        let bus = EventBus::default();
        let events_stop = tokio_util::sync::CancellationToken::new();
        if store.events_recorded() {
            // Every process's bus is fed from the store's log (see `runtime::events`).
            bus.set_external();
            tokio::spawn(crate::runtime::events::feed(
                store.clone(),
                bus.clone(),
                events_stop.clone(),
            ));
        }
        let effects = Effects::new(
            bus,
            Arc::new(crate::sink::Sinks::new(&self.config)),
            self.observer,
        );
        let default_timeout = Duration::from_secs(self.config.sessions.default_timeout_secs);
        let harvest = Harvest {
            inner: Arc::new_cyclic(|weak: &std::sync::Weak<Inner>| {
                let agents: Arc<dyn AgentRunner> = Arc::new(CronRunner(weak.clone()));
                let mut maintainer = Maintainer::new(
                    store.clone(),
                    self.clock.clone(),
                    effects.clone(),
                    Duration::from_secs(self.config.sessions.maintenance_interval_secs),
                    Duration::from_millis(self.config.workers.retry_backoff_ms),
                    default_timeout,
                    agents,
                );
                maintainer.event_retention =
                    Duration::from_secs(self.config.sessions.event_retention_secs);
                Inner {
                    maintainer: Arc::new(maintainer),
                    _events_feed: events_stop.clone().drop_guard(),
                    events_stop,
                    inserts: store.combines_inserts().then(|| submit::inserter(&store)),
                    store,
                    job,
                    effects,
                    clock: self.clock,
                    workers: Mutex::new(None),
                    maintenance: Mutex::new(None),
                    stats: Mutex::new(StatsCache::new()),
                    validations: Validations::default(),
                    passed: validation::Passed::new(),
                    config: self.config,
                }
            }),
        };
        harvest.inner.maintainer.recover_at_open().await?;
        Ok(harvest)
    }
}

/// Fires cron agents' runs for the maintenance loop: a weak handle, so the loop does not keep
/// the service alive.
struct CronRunner(std::sync::Weak<Inner>);

#[async_trait]
impl AgentRunner for CronRunner {
    async fn fire(&self, client: &str, name: &str, tick: Timestamp) {
        if let Some(inner) = self.0.upgrade() {
            agents::fire_tick(&Harvest { inner }, client, name, Some(tick)).await;
        }
    }
}

/// Opens the store the config names.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, HarvestError> {
    match config.store {
        StoreKind::Sled => {
            let store = crate::store::sled::SledStore::open(&config.data_dir)?;
            Ok(Arc::new(store))
        }
        StoreKind::Postgres => {
            let url = config.database_url.as_deref().ok_or_else(|| {
                HarvestError::Startup(
                    "store = \"postgres\" needs database_url (or HARVEST_DATABASE_URL)".into(),
                )
            })?;
            let store = crate::store::postgres::PostgresStore::connect_with_schema(
                url,
                &config.database_schema,
            )
            .await?;
            Ok(Arc::new(store))
        }
    }
}

/// The job sessions run when none is given: the scraper engine.
fn default_job(config: &Config) -> Result<Arc<dyn Job>, HarvestError> {
    let engine = engine_settings(config)?;
    let webharvest = crate::webharvest::WebHarvestSettings {
        guard: engine.guard.clone(),
        // A Web-Harvest `file` writes under `<export.dir>/<client>/<session>/`, nowhere else.
        export_dir: Some(config.export.dir.clone()),
        ..Default::default()
    };
    Ok(Arc::new(crate::kinds::Kinds::new(engine, webharvest)))
}

/// The engine settings the config asks for: the request-forgery guard is on whenever clients
/// (tenants) are configured, or when `http_guard.enabled = true`.
pub fn engine_settings(config: &Config) -> Result<crate::engine::EngineSettings, HarvestError> {
    let guarded = config
        .http_guard
        .enabled
        .unwrap_or(!config.clients.is_empty());
    let guard = if guarded {
        let g = crate::engine::NetGuard::from_cidrs(&config.http_guard.allow_networks)
            .map_err(|e| HarvestError::Startup(format!("http_guard.allow_networks: {e}")))?;
        Some(g)
    } else {
        None
    };
    Ok(crate::engine::EngineSettings {
        guard,
        ..Default::default()
    })
}

impl Harvest {
    /// Opens the service with the store and engine the config names.
    pub async fn open(config: Config) -> Result<Harvest, HarvestError> {
        Harvest::builder(config).open().await
    }

    /// A builder to replace parts.
    pub fn builder(config: Config) -> HarvestBuilder {
        HarvestBuilder {
            config,
            store: None,
            job: None,
            clock: Arc::new(SystemClock),
            observer: None,
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    /// The job sessions run.
    pub fn job(&self) -> &Arc<dyn Job> {
        &self.inner.job
    }

    /// Runs CPU-heavy checking of input (parsing and validating configs) on the blocking pool,
    /// a bounded number at a time: see [`validation`].
    pub async fn off_runtime<T, F>(&self, work: F) -> Result<T, HarvestError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.inner.validations.run(work).await
    }

    /// Validates a config and its params as submission does, off the runtime (see
    /// [`validation`]); hands them back when valid.
    pub async fn check_config(
        &self,
        config: serde_json::Value,
        params: BTreeMap<String, String>,
    ) -> Result<(serde_json::Value, BTreeMap<String, String>), HarvestError> {
        if crate::kinds::kind_of(&config).is_none() {
            return Err(not_a_config());
        }
        let job = self.inner.job.clone();
        self.off_runtime(move || check_one(&*job, &config, &params).map(|()| (config, params)))
            .await?
    }

    /// [`Harvest::check_config`] for a submission of `client`, which skips the check when the
    /// same client's same config and params passed recently ([`validation::Passed`]; per client,
    /// so that no tenant learns from the answer's speed what another submitted).
    pub(crate) async fn check_submitted(
        &self,
        client: &str,
        config: serde_json::Value,
        params: BTreeMap<String, String>,
    ) -> Result<(serde_json::Value, BTreeMap<String, String>), HarvestError> {
        let passed = &self.inner.passed;
        let recall = passed.recall(client, &config, &params);
        if recall.passed() {
            return Ok((config, params));
        }
        let checked = self.check_config(config, params).await;
        if checked.is_ok() {
            passed.remember(recall);
        }
        checked
    }

    /// The export sinks.
    pub fn sinks(&self) -> &Arc<crate::sink::Sinks> {
        self.inner.effects.sinks()
    }

    /// The event bus.
    pub fn events(&self) -> &EventBus {
        self.inner.effects.events()
    }

    /// What follows transitions.
    pub(crate) fn effects(&self) -> &Effects {
        &self.inner.effects
    }

    /// Starts this process's workers and maintenance loop (idempotent).
    pub fn start(&self) {
        let mut workers = lock(&self.inner.workers);
        if workers.is_none() && self.inner.config.workers.concurrency > 0 {
            *workers = Some(WorkerPool::start(WorkerSettings {
                store: self.inner.store.clone(),
                job: self.inner.job.clone(),
                effects: self.inner.effects.clone(),
                clock: self.inner.clock.clone(),
                workers: self.inner.config.workers.clone(),
                default_timeout: self.default_timeout(),
                running: Arc::new(Running::default()),
            }));
        }
        drop(workers);
        let mut maintenance = lock(&self.inner.maintenance);
        if maintenance.is_none() {
            *maintenance = Some(Maintenance::start(self.inner.maintainer.clone()));
        }
    }

    /// One maintenance pass now, at the clock's current time: reclaim expired leases, end
    /// attempts far past their `max_duration`, remove sessions past their timeout, refresh the
    /// gauges. The maintenance loop does this every tick on the elected leader; tests and
    /// embedders with their own scheduling call it directly.
    pub async fn maintain_once(&self) -> Result<MaintenanceReport, HarvestError> {
        Ok(self.inner.maintainer.pass().await?)
    }

    fn default_timeout(&self) -> Duration {
        Duration::from_secs(self.inner.config.sessions.default_timeout_secs)
    }

    /// Whether workers are running.
    pub fn workers_running(&self) -> bool {
        lock(&self.inner.workers)
            .as_ref()
            .is_some_and(|w| !w.is_stopped())
    }

    /// Two-phase shutdown: stop claiming, let running sessions finish for `grace`, then hand the
    /// rest back to PENDING without spending an attempt; stop maintenance; flush the store.
    pub async fn shutdown(&self, grace: Duration) -> Result<(), HarvestError> {
        let workers = lock(&self.inner.workers).take();
        if let Some(w) = workers {
            w.shutdown(grace).await;
        }
        let maintenance = lock(&self.inner.maintenance).take();
        if let Some(m) = maintenance {
            m.shutdown().await;
        }
        self.inner.events_stop.cancel();
        self.inner.store.close().await?;
        Ok(())
    }

    /// The tenant namespace of a session submitted by `client_id`: the client's own when
    /// `[[clients]]` are configured, else the single namespace.
    pub fn tenant_of(&self, client_id: &str) -> Option<String> {
        if self.inner.config.clients.is_empty() || client_id.is_empty() {
            None
        } else {
            Some(client_id.to_string())
        }
    }

    /// The key of session `id` as `client_id` names it (see [`Harvest::tenant_of`]): ids are
    /// resolved within the caller's tenant.
    pub fn key(&self, client_id: Option<&str>, id: SessionId) -> SessionKey {
        SessionKey {
            client: self.tenant_of(client_id.unwrap_or("")),
            id,
        }
    }

    /// One session. A bare [`SessionId`] names it in the single namespace; with `[[clients]]`
    /// pass a key ([`Harvest::key`]).
    pub async fn get(&self, id: impl Into<SessionKey>) -> Result<Option<Session>, HarvestError> {
        Ok(self.inner.store.session_get(&id.into()).await?)
    }

    /// Session `id` as client `client_id` names it: its session in its own tenant, else a
    /// session of that client stored before ids were scoped to tenants (in the single
    /// namespace, see [`SessionKey`]). Another client's session is never returned. Use the
    /// returned session's [`Session::key`] to act on it.
    pub async fn resolve(
        &self,
        client_id: Option<&str>,
        id: &SessionId,
    ) -> Result<Option<Session>, HarvestError> {
        let key = self.key(client_id, id.clone());
        if let Some(s) = self.get(&key).await? {
            return Ok(Some(s));
        }
        let (Some(client), Some(_)) = (client_id, &key.client) else {
            return Ok(None);
        };
        Ok(self
            .get(SessionKey::single(id.clone()))
            .await?
            .filter(|s| s.client.client_id() == client))
    }

    /// A handle to wait on a session.
    pub fn handle(&self, id: impl Into<SessionKey>) -> SessionHandle {
        SessionHandle {
            id: id.into(),
            harvest: self.clone(),
        }
    }

    /// Sessions by status and client, and what ended in each minute of the last hour:
    /// `client_id` scopes it to one client's sessions (a tenant's view), `None` counts every
    /// client's. An answer may be up to a second old.
    pub async fn stats(
        &self,
        client_id: Option<&str>,
    ) -> Result<crate::store::SessionStats, HarvestError> {
        let scope = client_id.map(String::from);
        {
            let cache = self.inner.stats.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, stats)) = cache.get(&scope)
                && at.elapsed() < STATS_FRESH
            {
                return Ok(stats.clone());
            }
        }
        let stats = self
            .inner
            .store
            .session_stats(crate::store::StatsQuery {
                client_id: scope.clone(),
                now: self.inner.clock.now(),
            })
            .await?;
        let mut cache = self.inner.stats.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= STATS_SCOPES_MAX {
            cache.clear();
        }
        cache.insert(scope, (std::time::Instant::now(), stats.clone()));
        Ok(stats)
    }

    /// Sessions, newest first (`limit` 1..=1000, default 50 when 0).
    pub async fn list(&self, mut query: SessionList) -> Result<SessionPage, HarvestError> {
        if query.limit == 0 {
            query.limit = 50;
        }
        if query.limit > 1000 {
            return Err(HarvestError::Invalid(format!(
                "limit {} is over the maximum of 1000",
                query.limit
            )));
        }
        Ok(self.inner.store.session_list(query).await?)
    }

    /// Cancels a session: PENDING ends CANCELLED now; RUNNING is flagged and the worker ends it
    /// CANCELLED after the step in flight. Idempotent.
    pub async fn cancel(&self, id: impl Into<SessionKey>) -> Result<CancelOutcome, HarvestError> {
        let id = id.into();
        let now = self.inner.clock.now();
        let out = self
            .inner
            .store
            .session_cancel(crate::store::SessionCancel {
                id: id.clone(),
                cleanup_after: self.default_timeout(),
                now,
            })
            .await?;
        // A RUNNING session's worker hears of it through the store's cancel requests.
        if let CancelOutcome::Cancelled(s) = &out {
            self.inner.effects.transitioned(Session::clone(s));
        }
        Ok(out)
    }

    /// Closes a session: removes it and all its data now (the seed's CloseSession). A RUNNING
    /// session's worker finds the session gone at its next write or heartbeat and stops.
    pub async fn close(&self, id: impl Into<SessionKey>) -> Result<Option<Session>, HarvestError> {
        let removed = self.inner.store.session_remove(&id.into()).await?;
        if let Some(s) = &removed {
            self.inner.effects.removed(std::slice::from_ref(s)).await;
        }
        Ok(removed)
    }

    /// A session's context: its variables when it ended (a Web-Harvest config's top-level
    /// variables, a scraper config's `[vars]` in effect); `None` while it has none.
    pub async fn context(
        &self,
        id: impl Into<SessionKey>,
    ) -> Result<Option<crate::session::Context>, HarvestError> {
        Ok(self.inner.store.context_get(&id.into()).await?)
    }

    /// Committed records of a session, by seq.
    pub async fn records(
        &self,
        id: impl Into<SessionKey>,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<Record>, HarvestError> {
        let id = id.into();
        if limit == 0 || limit > 10_000 {
            return Err(HarvestError::Invalid(format!(
                "limit {limit} must be 1..=10000"
            )));
        }
        Ok(self
            .inner
            .store
            .records_page(RecordsPage {
                id: id.clone(),
                offset,
                limit,
            })
            .await?)
    }

    /// A client read every record of a session that was terminal when the read began. With
    /// `remove_after_export`, its records are removed now; the session itself stays readable
    /// until its timeout. Returns whether records were removed.
    pub async fn records_exported(&self, id: impl Into<SessionKey>) -> Result<bool, HarvestError> {
        let id = id.into();
        let Some(s) = self.inner.store.session_get(&id).await? else {
            return Ok(false);
        };
        // A session with an external sink loses its records once the sinks have them.
        let external = crate::sink::ExportSpec::of(&s.job.config).is_ok_and(|e| !e.is_empty());
        if !s.options.remove_after_export || !s.status.is_terminal() || external {
            return Ok(false);
        }
        let removed = self
            .inner
            .store
            .records_remove(crate::store::RecordsRemove {
                id: id.clone(),
                below: None,
            })
            .await?
            .is_some();
        if removed {
            tracing::info!(session = %id, "records read to the end; removed (remove_after_export)");
        }
        Ok(removed)
    }

    /// Recorded events in `scope` after the id `after` (SSE `Last-Event-ID`), oldest first,
    /// at most `limit`, and whether none between was dropped (past the retention window or the
    /// ring). See [`crate::event`] for where they come from: this process's ring (sled), or the
    /// store's log (PostgreSQL).
    pub async fn events_since(
        &self,
        after: u64,
        limit: usize,
        scope: &EventScope,
    ) -> Result<(Vec<Event>, bool), HarvestError> {
        if !self.inner.store.events_recorded() {
            return Ok(self.events().since(after, limit, scope));
        }
        let read = |limit: usize, scope: EventScope| {
            self.inner.store.events_after(crate::store::EventsAfter {
                after,
                limit: limit.clamp(1, crate::store::EVENTS_PAGE_MAX),
                scope,
            })
        };
        let events = read(limit, scope.clone()).await?;
        // The log keeps events for the retention window: when the first one kept is well past
        // the id asked for, events between were removed (or rolled back: ids can have gaps).
        // Whatever the scope, the first event kept after `after` tells.
        let first = match scope {
            EventScope::All => events.first().map(|e| e.id),
            _ if after == 0 => None,
            _ => read(1, EventScope::All).await?.first().map(|e| e.id),
        };
        let complete = after == 0 || first.is_none_or(|id| id <= after + 1);
        Ok((events, complete))
    }

    /// Events from now on (created, started, progress, completed, failed, cancelled, requeued,
    /// removed).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events().subscribe()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A submitted session, to wait on.
#[derive(Clone, Debug)]
pub struct SessionHandle {
    id: SessionKey,
    harvest: Harvest,
}

impl SessionHandle {
    /// The session's id.
    pub fn id(&self) -> &SessionId {
        &self.id.id
    }

    /// The session's key (tenant and id).
    pub fn key(&self) -> &SessionKey {
        &self.id
    }

    /// The session now.
    pub async fn session(&self) -> Result<Session, HarvestError> {
        self.harvest
            .get(&self.id)
            .await?
            .ok_or_else(|| HarvestError::NotFound(self.id.id.clone()))
    }

    /// Its context (the seed's `getContext()`): its variables when it ended; `None` while it
    /// has none.
    pub async fn context(&self) -> Result<Option<crate::session::Context>, HarvestError> {
        self.harvest.context(&self.id).await
    }

    /// Waits until the session is terminal, at most `timeout`. `Ok(Some)`: the terminal session;
    /// `Ok(None)`: still active when the time ran out. Wakes on this process's events and checks
    /// the store at least every second (another process may finish it).
    pub async fn await_completion(
        &self,
        timeout: Duration,
    ) -> Result<Option<Session>, HarvestError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut events = self.harvest.subscribe();
        loop {
            let s = self.session().await?;
            if s.status.is_terminal() {
                return Ok(Some(s));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let wait = (deadline - now).min(Duration::from_secs(1));
            let _ = tokio::time::timeout(wait, async {
                loop {
                    match events.recv().await {
                        Ok(e) if e.session_id == self.id.id && e.tenant == self.id.client => {
                            return;
                        }
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(_)) => return,
                        Err(broadcast::error::RecvError::Closed) => {
                            std::future::pending::<()>().await
                        }
                    }
                }
            })
            .await;
        }
    }
}

/// Why a config of no known kind is refused.
fn not_a_config() -> HarvestError {
    HarvestError::InvalidConfig(ConfigRejected::new(
        "config must be an object (JSON), a TOML document or Web-Harvest XML",
    ))
}

/// Submission's check of one config and its params (call it off the runtime: validation can
/// be costly).
fn check_one(
    job: &dyn Job,
    config: &serde_json::Value,
    params: &BTreeMap<String, String>,
) -> Result<(), HarvestError> {
    if crate::kinds::kind_of(config).is_none() {
        return Err(not_a_config());
    }
    job.validate(config, params)
        .map_err(HarvestError::InvalidConfig)
}
