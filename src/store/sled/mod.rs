//! The embedded sled backend: one process per data directory, durable on return.
//!
//! # Layout
//!
//! Everything lives in sled's default tree, one keyspace per leading byte. Every multi-key change
//! is one batch made crash-atomic by an intent key (see `SledStore::apply_atomic`). A store-level
//! `std::sync::Mutex` serializes every read-check-write (the compare-and-sets), so no two
//! writers ever interleave. `id` below is a session's key, `lp(tenant)` then the id's bytes
//! (tenant `""`: the single namespace), and `lp(id)` in data keys is `lp(tenant) lp(id)`;
//! `lp(s)` is a 4-byte big-endian length followed by the bytes, so that a prefix scan of session
//! `ab` never sees `abc`'s keys.
//! Integers are big-endian; timestamps have their sign bit flipped so they sort as numbers;
//! `!seq` is the bitwise complement (newest first).
//!
//! | key | value | what |
//! |---|---|---|
//! | `\0meta` | `u32` | layout version ([`LAYOUT_VERSION`]), written at open |
//! | `\0counters` | `Counters` | next seq, sessions per status, size of the due index |
//! | `\0i` seq | encoded batch | a batch being applied; present after a crash only if interrupted |
//! | `S` id | `Session` | the sessions |
//! | `W` run_at seq prio id | empty | scheduled or requeued PENDING sessions not yet moved to the due index |
//! | `P` !prio run_at seq id | empty | due PENDING sessions, in claim order |
//! | `C` lp(client) !seq id | empty | per client, newest first |
//! | `A` lp(agent) !seq id | empty | per agent, newest first |
//! | `T` code !seq id | empty | per status, newest first; PENDING and RUNNING share PENDING's code (layout 5), and the lease index names the RUNNING ones |
//! | `Y` lp(client) lp(agent) id | empty | active (PENDING or RUNNING) sessions per client's agent |
//! | (`L` expires_at id) | | RUNNING sessions by lease expiry: in memory since layout 4, rebuilt at open (`SledStore::leases`) |
//! | `X` cleanup_at id | empty | terminal sessions by cleanup time |
//! | `E` lp(id) first | `Vec<String>` | records `first..` of a checkpoint, JSON text, up to 256 a chunk |
//! | `R` lp(id) n | JSON text | records of stores written before `E` (read, never written) |
//! | `B` lp(id) first | `Vec<FrontierEntry>` | frontier chunk: entries at positions `first..`, in the order added |
//! | `J` lp(id) first | `ChunkLive` | which entries of chunk `first` are still in the frontier |
//! | `K` lp(id) | `u64` | the session's next frontier position (never reused) |
//! | `U` lp(id) url | `UrlState` | seen-URL set, and where a URL sits in the frontier (an index of the chunks, brought up to date when read) |
//! | `I` lp(id) | `u64` | the first frontier position whose chunk `U` does not index yet |
//! | `O` lp(id) n | `LogLine` | log (the last [`LOG_LINES_MAX`](super::LOG_LINES_MAX)) |
//! | `H` lp(id) | JSON text | the session's context (its variables when it ended) |
//! | `N` lp(client) name | `Agent` | agents |
//! | `Z` id | empty | a removal whose data purge has not finished (resumed at open) |
//!
//! (Stores written before the frontier was ordered kept it under `F` lp(id) url, and before it was
//! chunked under `Q` lp(id) pos with an index `V` lp(id) url; such entries are no longer read,
//! only purged with their session.)
//!
//! Values go through [`codec`] (version byte + bincode); index entries and set members are empty
//! and all they say is in their key, which is parsed defensively. A corrupt session value is
//! [`StoreError::Corrupt`] from `session_get` (and `session_remove`) of that id; listings and
//! claims skip it with a `tracing::warn` so the rest of the store keeps working.
//!
//! # Files
//!
//! One concern per file, each an `impl SledStore` block with its helpers and a module doc on its
//! design; the methods of [`Store`] below only call into them:
//!
//! - `keys`: the key encoding of the table above, and the parsing of keys read back.
//! - `durability`: the intent batches that make a multi-key change crash-atomic, and the group
//!   commit that makes it durable before a call returns ("Durability: group commit").
//! - `sessions`: a session's value and index keys, the claim queue (`W`, `P`: "Claims"), every
//!   state transition, removal and expiry, listings and counts.
//! - `frontier`: the crawl state (frontier chunks, the seen set and its index: "Crawl state: few
//!   keys per URL") and resume.
//! - `records`: record chunks (numbered outside the intent) and the log.
//! - `agents`: agents and leaderships.
//!
//! Store calls run their sled operations on the calling task's thread: in the common case these
//! are memory operations under the store mutex (never held across an `.await`); the only call
//! that waits for the disk is the flush, on its own thread.

mod agents;
mod durability;
mod frontier;
mod insert;
mod keys;
mod migrate;
mod pidfile;
mod records;
mod sessions;
mod stats;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sled::IVec;
use tokio::sync::Notify;

use super::{
    Agent, CancelOutcome, CheckpointCommit, FrontierItem, FrontierPage, HeartbeatOutcome,
    InsertOutcome, LeaderAcquire, LeaseReclaim, Reclaimed, RecordsPage, RecordsRemove, ResumeState,
    SeenFilter, SessionCancel, SessionClaim, SessionCounts, SessionFinish, SessionHeartbeat,
    SessionInsert, SessionList, SessionPage, SessionRequeue, SessionsExpire, Store, StoreError,
    StoreHealth, StoreResult, codec, key_name,
};
use crate::session::{LogLine, Record, Session, SessionKey, Timestamp};
use durability::{Batch, Durability, replay_intents};
use keys::{corrupt_key, k_session, show_key};

const META_KEY: &[u8] = b"\0meta";

/// Version of this store's layout, kept in `\0meta` (values keep their own [`super::SCHEMA_VERSION`]
/// byte). 1: `U` written with every checkpoint. 2: `U` built from the frontier chunks when first
/// read, up to `I` ("Crawl state" in `frontier`). A version-1 store opens as it is (its `U` is
/// complete; a missing `I` reads as 1, and the first catch-up re-indexes what is there, changing
/// nothing) and is marked 2, so that a harvest that knows only version 1, which would take the URLs
/// not yet indexed as never seen, refuses it instead of misreading it. 3: session keys carry
/// their tenant (`lp(tenant) id`); an older store's keys are moved at open, in resumable chunks,
/// to the single namespace (`migrate`). 4: the lease index `L` is kept in memory, rebuilt at
/// open (`SledStore::leases`); an older store's `L` keys are removed at open. A harvest that
/// knows only layout 3 would find no `L` key for the sessions this one started, and its recovery
/// at open would leave them RUNNING: it refuses the store. 5: RUNNING sessions keep PENDING's
/// `T` key ([`keys::t_code`]), so a claim writes two keys fewer, and the `G` index is gone (a
/// listing of every session merges the `T` codes), one key fewer per session; an older store's
/// RUNNING `T` keys are moved and its `G` keys removed at open (`migrate::to_layout_5`). A
/// harvest that knows only layout 4 would list a RUNNING session as PENDING, find none at open
/// and list no session without a filter: it refuses the store.
pub const LAYOUT_VERSION: u32 = 5;

// sled's page cache. Its default (1 GiB) lets a crawl of millions of URLs grow the process far
// beyond what the crawl needs; sled's count is of serialized bytes, the nodes take ~3x that in
// memory. Measured with `harvest bench frontier --urls 1000000` (release, 2 cores): 16 MiB gave
// 189 MB peak RSS, 4 MiB 129 MB, at the same pages/s (and the same for `bench crawl --store`).
const CACHE_BYTES: u64 = 4 * 1024 * 1024;
const COUNTERS_KEY: &[u8] = b"\0counters";

/// Persistent counters, rewritten in the same batch as every change that moves them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Counters {
    /// The next session's seq.
    next_seq: u64,
    /// Sessions per status, indexed by
    /// [`SessionStatus::code`](crate::session::SessionStatus::code).
    by_status: [u64; 5],
    /// Entries in the due index `P`.
    due: u64,
}

/// Cancel requests a slow receiver may fall behind by before losing the oldest.
const CANCEL_CHANNEL: usize = 1024;

/// The sled store. Open one per data directory per process (sled locks the directory).
pub struct SledStore {
    db: sled::Db,
    path: PathBuf,
    /// Serializes every read-check-write; holds the counters as last committed.
    write: Mutex<Counters>,
    durability: Arc<Durability>,
    flusher: Option<JoinHandle<()>>,
    /// This store's entry in [`OPEN_HERE`]; it goes after `drop` has joined the flusher.
    _open_here: OpenHere,
    pending: Notify,
    /// Sequence of the next intent key (see [`SledStore::apply_atomic`]).
    intent_seq: AtomicU64,
    /// A batch failed half-way: no more writes until reopened.
    poisoned: AtomicBool,
    /// The first write that failed (sled's I/O errors are sticky: it refuses every later write),
    /// for [`Store::health`].
    write_failure: std::sync::Mutex<Option<String>>,
    /// Leaderships: name → (owner, expiry). In memory: sled allows one process per data
    /// directory (its file lock), so holders can only be tasks of this process, and a restart
    /// rightly starts with no leader.
    leaders: std::sync::Mutex<std::collections::HashMap<String, (String, Timestamp)>>,
    /// Cancels of RUNNING sessions, for [`Store::cancel_requests`].
    cancels: tokio::sync::broadcast::Sender<SessionKey>,
    /// Per-client limits ([`Store::quotas_set`]), checked under the store mutex.
    quotas: std::sync::RwLock<Arc<super::Quotas>>,
    /// The lease index: `L expires_at id` ([`keys::k_lease`]) of every RUNNING session. In
    /// memory since layout 4: only this process runs sessions of this store, and at open every
    /// RUNNING session is recovered anyway, so the index is rebuilt from the active `T` keys
    /// ([`SledStore::load_leases`]). It is also the store's list of RUNNING sessions. Kept in sled it was two of the ten writes
    /// of a session's claim and finish, and two more per heartbeat or checkpoint. Changed only
    /// under the store mutex, after the batch that stages the change is applied.
    leases: std::sync::Mutex<std::collections::BTreeSet<Vec<u8>>>,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Maps a sled error to [`StoreError::Sled`], saying what the store was doing. The context is
/// static: this runs on every key operation, and a `format!` would cost even when nothing fails.
fn sled_err(context: &'static str) -> impl FnOnce(sled::Error) -> StoreError {
    move |source| StoreError::Sled {
        context: context.into(),
        source,
    }
}

/// Runs sled work that can take long (thousands of keys: a removal, an expiry, an index catch-up)
/// without stalling the other tasks of this runtime worker: on a multi-thread runtime the worker
/// first hands them to another thread (`block_in_place`); elsewhere it just runs.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// The decoded value of `k`, if the key is there.
fn read<T: serde::de::DeserializeOwned>(db: &sled::Db, k: &[u8]) -> StoreResult<Option<T>> {
    match db.get(k).map_err(sled_err("reading a value"))? {
        Some(v) => Ok(Some(codec::decode(&|| show_key(k), &v)?)),
        None => Ok(None),
    }
}

impl SledStore {
    /// Opens (or creates) the store in `path`. A store written by a newer harvest is refused with
    /// [`StoreError::NewerVersion`]; removals interrupted by a crash are finished here.
    pub fn open(path: &Path) -> StoreResult<SledStore> {
        let db = open_db(path)?;
        let here = OpenHere::register(path);
        // Best effort: it only makes the error of a second process more helpful.
        pidfile::write(path);
        Self::open_db_at(path, db, here)
    }
}

/// The data directories this process has a [`SledStore`] open in (canonical paths). A lock
/// held by this process on a directory not listed here is a dropped store's, which sled lets go
/// of a moment later; one listed here is a live store's (see [`open_db`]).
static OPEN_HERE: Mutex<std::collections::BTreeSet<PathBuf>> =
    Mutex::new(std::collections::BTreeSet::new());

fn open_here() -> MutexGuard<'static, std::collections::BTreeSet<PathBuf>> {
    OPEN_HERE.lock().unwrap_or_else(|p| p.into_inner())
}

/// A directory's entry in [`OPEN_HERE`], removed when dropped.
struct OpenHere(Option<PathBuf>);

impl OpenHere {
    fn register(path: &Path) -> OpenHere {
        let dir = std::fs::canonicalize(path).ok();
        if let Some(d) = &dir {
            open_here().insert(d.clone());
        }
        OpenHere(dir)
    }
}

impl Drop for OpenHere {
    fn drop(&mut self) {
        if let Some(d) = &self.0 {
            open_here().remove(d);
        }
    }
}

/// How long [`open_db`] waits for this process's own earlier handle of a store to let its lock
/// go.
const OWN_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens sled in `path`. When the lock is held by this very process and no store of this
/// process is open there ([`OPEN_HERE`]), the holder is a handle just dropped: sled releases
/// its file (and lock) when its last I/O task lets go of it, which can be a moment after the
/// flush that `SledStore`'s drop waits for has returned. So the open is retried for up to
/// [`OWN_LOCK_WAIT`]; a live store's lock, or another process's, is reported at once.
fn open_db(path: &Path) -> StoreResult<sled::Db> {
    let deadline = std::time::Instant::now() + OWN_LOCK_WAIT;
    let dropped_here = || std::fs::canonicalize(path).map_or(true, |d| !open_here().contains(&d));
    loop {
        match try_open_db(path) {
            Err(StoreError::InUse { pid, .. })
                if pid == Some(std::process::id())
                    && std::time::Instant::now() < deadline
                    && dropped_here() =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

fn try_open_db(path: &Path) -> StoreResult<sled::Db> {
    sled::Config::new()
        .path(path)
        .flush_every_ms(None)
        .cache_capacity(CACHE_BYTES)
        .open()
        .map_err(|source| match source {
            // sled wraps the lock's EWOULDBLOCK in an error of its own words.
            sled::Error::Io(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.to_string().contains("could not acquire lock") =>
            {
                StoreError::InUse {
                    path: path.to_path_buf(),
                    pid: pidfile::holder(path),
                }
            }
            source => StoreError::Sled {
                context: format!("opening the store at {}", path.display()),
                source,
            },
        })
}

impl SledStore {
    /// The rest of [`SledStore::open`], with sled open.
    fn open_db_at(path: &Path, db: sled::Db, here: OpenHere) -> StoreResult<SledStore> {
        let what = || format!("the sled store at {}", path.display());
        match db
            .get(META_KEY)
            .map_err(sled_err("reading the layout version"))?
        {
            Some(bytes) => {
                let found: u32 = codec::decode(&|| format!("{} (key \\0meta)", what()), &bytes)
                    .map_err(|e| match e {
                        StoreError::NewerVersion {
                            found, supported, ..
                        } => StoreError::NewerVersion {
                            what: what(),
                            found,
                            supported,
                        },
                        other => other,
                    })?;
                if found > LAYOUT_VERSION {
                    return Err(StoreError::NewerVersion {
                        what: what(),
                        found,
                        supported: LAYOUT_VERSION,
                    });
                }
                if found < LAYOUT_VERSION {
                    // Interrupted batches are of the old layout: applied before it moves.
                    replay_intents(&db)?;
                    if found < 3 {
                        let moved = migrate::to_tenant_keys(&db)?;
                        tracing::info!(
                            keys = moved,
                            "store layout upgraded to tenant-scoped session keys"
                        );
                    }
                    if found < 4 {
                        migrate::drop_lease_keys(&db)?;
                    }
                    if found < 5 {
                        migrate::to_layout_5(&db)?;
                    }
                    db.insert(META_KEY, codec::encode(&LAYOUT_VERSION)?)
                        .map_err(sled_err("marking the layout version"))?;
                    db.flush()
                        .map_err(sled_err("flushing the layout version"))?;
                }
            }
            None => {
                let mut b = Batch::default();
                b.insert(META_KEY, codec::encode(&LAYOUT_VERSION)?);
                b.insert(
                    COUNTERS_KEY,
                    codec::encode(&Counters {
                        next_seq: 1,
                        ..Default::default()
                    })?,
                );
                b.apply_to(&db)?;
                db.flush().map_err(sled_err("flushing a new store"))?;
            }
        }
        replay_intents(&db)?;
        let counters: Counters = match db
            .get(COUNTERS_KEY)
            .map_err(sled_err("reading the counters"))?
        {
            Some(bytes) => codec::decode(&|| "\\0counters".into(), &bytes)?,
            None => {
                return Err(corrupt_key(
                    COUNTERS_KEY,
                    "missing although the meta key exists",
                ));
            }
        };
        let (durability, flusher) = Durability::start(&db, path)?;
        let store = SledStore {
            db,
            path: path.to_path_buf(),
            write: Mutex::new(counters),
            durability,
            flusher: Some(flusher),
            _open_here: here,
            pending: Notify::new(),
            intent_seq: AtomicU64::new(1),
            poisoned: AtomicBool::new(false),
            write_failure: std::sync::Mutex::new(None),
            leaders: std::sync::Mutex::new(std::collections::HashMap::new()),
            cancels: tokio::sync::broadcast::channel(CANCEL_CHANNEL).0,
            quotas: std::sync::RwLock::new(Arc::default()),
            leases: Default::default(),
        };
        store.load_leases()?;
        store.purge_interrupted()?;
        Ok(store)
    }

    /// Flushes done by the group-commit thread since open (each acknowledges every write applied
    /// before it started): writes / flushes is the group-commit batching factor.
    pub fn flush_count(&self) -> u64 {
        self.durability.flushes()
    }

    /// The lease index ([`SledStore::leases`]).
    fn leases(&self) -> MutexGuard<'_, std::collections::BTreeSet<Vec<u8>>> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock(&self) -> MutexGuard<'_, Counters> {
        // A panic while holding the lock cannot leave a half-applied batch (batches are atomic),
        // and the counters are only replaced after a successful apply, so the state is sound.
        self.write.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn load(&self, id: &SessionKey) -> StoreResult<Option<Session>> {
        Ok(self.load_raw(id)?.map(|(_, s)| s))
    }

    /// [`SledStore::load`], with the stored bytes the session was decoded from.
    fn load_raw(&self, id: &SessionKey) -> StoreResult<Option<(IVec, Session)>> {
        match self
            .db
            .get(k_session(id))
            .map_err(sled_err("reading a session"))?
        {
            Some(bytes) => {
                let mut s = codec::decode_session(&|| key_name("sessions", id), &bytes)?;
                s.tenant = id.client.clone();
                Ok(Some((bytes, s)))
            }
            None => Ok(None),
        }
    }
}

impl SledStore {
    /// Remembers the first failed write for [`Store::health`] and says it once in the log.
    pub(super) fn note_write_failure(&self, e: &StoreError) {
        let mut first = self.write_failure.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            tracing::error!(error = %e, "a write to the sled store failed; the store is unhealthy until harvest restarts");
            *first = Some(format!(
                "writing failed: {e}; free the disk and restart harvest"
            ));
        }
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        self.durability.shut_down();
        if let Some(handle) = self.flusher.take() {
            // The flusher flushes what is pending, then returns; it holds a clone of the db, so
            // joining it is what lets the directory be reopened after a drop.
            if handle.join().is_err() {
                tracing::error!("the sled flusher thread panicked");
            }
        }
    }
}

#[async_trait]
impl Store for SledStore {
    fn backend(&self) -> &'static str {
        "sled"
    }

    fn exclusive(&self) -> bool {
        true
    }

    fn cancel_requests(&self) -> tokio::sync::broadcast::Receiver<SessionKey> {
        self.cancels.subscribe()
    }

    async fn session_insert(&self, p: SessionInsert) -> StoreResult<InsertOutcome> {
        self.insert_session(p).await
    }

    async fn session_insert_many(
        &self,
        sessions: Vec<Session>,
    ) -> StoreResult<Vec<StoreResult<InsertOutcome>>> {
        self.insert_sessions(sessions).await
    }

    async fn session_get(&self, id: &SessionKey) -> StoreResult<Option<Session>> {
        self.load(id)
    }

    async fn session_list(&self, p: SessionList) -> StoreResult<SessionPage> {
        self.list_sync(&p)
    }

    async fn session_claim(&self, p: SessionClaim) -> StoreResult<Vec<Session>> {
        self.claim_sessions(p)
    }

    async fn session_heartbeat_if_running(
        &self,
        p: SessionHeartbeat,
    ) -> StoreResult<HeartbeatOutcome> {
        self.heartbeat(p)
    }

    async fn checkpoint_commit_if_running(
        &self,
        p: CheckpointCommit,
    ) -> StoreResult<Option<Session>> {
        self.commit_checkpoint(p).await
    }

    async fn session_finish_if_running(&self, p: SessionFinish) -> StoreResult<Option<Session>> {
        self.finish_session(p).await
    }

    async fn session_finish_many(
        &self,
        items: &[SessionFinish],
    ) -> StoreResult<Vec<StoreResult<Option<Session>>>> {
        self.finish_sessions(items).await
    }

    async fn session_requeue_if_running(&self, p: SessionRequeue) -> StoreResult<Option<Session>> {
        self.requeue_session(p).await
    }

    async fn leases_reclaim(&self, p: LeaseReclaim) -> StoreResult<Vec<Reclaimed>> {
        self.reclaim_leases(p).await
    }

    async fn session_cancel(&self, p: SessionCancel) -> StoreResult<CancelOutcome> {
        self.cancel_session(p).await
    }

    async fn session_remove(&self, id: &SessionKey) -> StoreResult<Option<Session>> {
        self.remove_session(id).await
    }

    async fn records_remove(&self, p: RecordsRemove) -> StoreResult<Option<Session>> {
        self.remove_records(&p.id, p.below).await
    }

    async fn sessions_expire(&self, p: SessionsExpire) -> StoreResult<Vec<Session>> {
        self.expire_sessions(p).await
    }

    async fn records_page(&self, p: RecordsPage) -> StoreResult<Vec<Record>> {
        self.page_records(p)
    }

    async fn resume_load(&self, id: &SessionKey) -> StoreResult<ResumeState> {
        self.resume_sync(id)
    }

    async fn frontier_page(&self, p: FrontierPage) -> StoreResult<Vec<FrontierItem>> {
        self.page_frontier(p)
    }

    async fn seen_filter(&self, p: SeenFilter) -> StoreResult<Vec<bool>> {
        self.filter_seen(p)
    }

    async fn context_get(&self, id: &SessionKey) -> StoreResult<Option<crate::session::Context>> {
        self.context(id)
    }

    async fn log_tail(&self, id: &SessionKey, limit: usize) -> StoreResult<Vec<LogLine>> {
        self.tail_log(id, limit)
    }

    async fn session_counts(&self, now: Timestamp) -> StoreResult<SessionCounts> {
        self.count_sessions(now)
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
        self.get_agent(client_id, name)
    }

    async fn agent_delete(&self, client_id: &str, name: &str) -> StoreResult<bool> {
        self.delete_agent(client_id, name).await
    }

    async fn agent_list(&self) -> StoreResult<Vec<Agent>> {
        self.list_agents()
    }

    async fn leader_acquire(&self, p: LeaderAcquire) -> StoreResult<bool> {
        self.acquire_leader(p)
    }

    async fn pending_wait(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.pending.notified()).await;
    }

    fn health(&self) -> StoreHealth {
        let failure = self
            .write_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match failure.or_else(|| self.durability.unhealthy()) {
            Some(why) => StoreHealth::Unhealthy(why),
            None => StoreHealth::Healthy,
        }
    }

    async fn close(&self) -> StoreResult<()> {
        let ticket = self.durability.ticket();
        self.durability.wait(ticket).await
    }

    fn quotas_set(&self, q: super::Quotas) -> StoreResult<()> {
        *self.quotas.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(q);
        Ok(())
    }
}
