//! Durable storage of sessions, their records, crawl frontier, log and agents.
//!
//! The [`Store`] trait is shaped like a driver (River's `riverdriver`): one method per
//! operation, named noun-verb, each taking a params struct, with the current time passed in and
//! never read inside. Every state transition is a compare-and-set that names its precondition
//! (`..._if_running`, `..._if_pending`) and returns the session as it now is, or `None` when the
//! precondition did not hold: a worker whose lease was taken over learns it from a `None`, never
//! by overwriting a newer attempt.
//!
//! The stores decide nothing about a session's next state: every transition applies the
//! function of `session`'s state machine that names it ([`Session::claimed`],
//! [`Session::finished`], [`Session::requeued`], [`Session::reclaimed`], [`Session::cancel`],
//! ...), so both backends agree field for field (the conformance suite checks it).
//!
//! Two backends implement it and pass one conformance suite: `sled` (embedded, one process per
//! data directory) and `postgres` (many processes on many hosts). Nothing outside this module
//! knows how either lays out its data. An acknowledged write is durable when the call returns.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::session::{
    FrontierEntry, LogLine, Record, Session, SessionError, SessionId, SessionKey, SessionMetrics,
    SessionStatus, Timestamp, TokenUsage,
};

pub mod codec;
mod error;
pub mod outage;
pub mod postgres;
pub mod sled;

pub use error::StoreError;

/// Version of the stored format this build writes. A store written with a higher version is
/// refused with [`StoreError::NewerVersion`] instead of being misread.
///
/// 1: the first layout. 2: sessions keep their own record count, removed records, attempts and
/// running time ([`crate::session::SessionV1`] reads version-1 sessions).
pub const SCHEMA_VERSION: u32 = 2;

/// What [`Store::health`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreHealth {
    /// Writes are taken and made durable.
    Healthy,
    /// Writes fail or cannot be made durable: why, and what to do, for the operator.
    Unhealthy(String),
}

/// Result of every store call.
pub type StoreResult<T> = Result<T, StoreError>;

/// Insert a new PENDING session. `session.seq` is assigned by the store; `session.status` must be
/// PENDING.
#[derive(Debug, Clone)]
pub struct SessionInsert {
    /// The session to insert.
    pub session: Session,
    /// If the session runs for an agent with `sessions = "single"`: refuse with
    /// [`InsertOutcome::AgentBusy`] when another session of that agent is active. Checked in the
    /// same atomic step as the insert.
    pub single_agent: Option<String>,
}

/// What `session_insert` did.
#[derive(Debug, Clone, PartialEq)]
pub enum InsertOutcome {
    /// Inserted; the stored session (with its `seq`).
    Inserted(Box<Session>),
    /// An active session of the single-session agent exists: this one.
    AgentBusy(SessionId),
    /// The client already has its `max_pending` PENDING sessions ([`Quotas`]).
    PendingQuota {
        /// The client.
        client: String,
        /// Its limit.
        limit: u64,
    },
}

/// Per-client limits a store enforces in its inserts and claims (`[[clients]] max_running` and
/// `max_pending`), by client id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Quotas {
    /// Most RUNNING sessions per client: a claim skips a client at its limit and takes the next
    /// eligible session (of another client), so a busy client never stalls the others.
    pub max_running: BTreeMap<String, u64>,
    /// Most PENDING sessions per client: an insert beyond it is
    /// [`InsertOutcome::PendingQuota`].
    pub max_pending: BTreeMap<String, u64>,
}

impl Quotas {
    /// No limits.
    pub fn is_empty(&self) -> bool {
        self.max_running.is_empty() && self.max_pending.is_empty()
    }
}

/// List sessions, newest first.
#[derive(Debug, Clone, Default)]
pub struct SessionList {
    /// Only this client's.
    pub client_id: Option<String>,
    /// Only in this status.
    pub status: Option<SessionStatus>,
    /// Only this agent's.
    pub agent: Option<String>,
    /// At most this many (1..=1000).
    pub limit: usize,
    /// Continue after this cursor (from a previous page's `next_cursor`).
    pub cursor: Option<String>,
}

/// One page of sessions.
#[derive(Debug, Clone, Default)]
pub struct SessionPage {
    /// The sessions, newest first.
    pub sessions: Vec<Session>,
    /// Pass as `cursor` to get the next page; `None` at the end.
    pub next_cursor: Option<String>,
}

impl SessionPage {
    /// The page of the first `limit` of `sessions` (newest first, up to `limit + 1` read so that
    /// one more tells there is a next page), its cursor the last one's seq.
    pub(crate) fn of(mut sessions: Vec<Session>, limit: usize) -> SessionPage {
        let next_cursor = if sessions.len() > limit {
            sessions.truncate(limit);
            sessions.last().map(|s| s.seq.to_string())
        } else {
            None
        };
        SessionPage {
            sessions,
            next_cursor,
        }
    }
}

/// Claim up to `limit` due PENDING sessions, in order of (priority desc, run_at, seq), making
/// them RUNNING under a lease held by `owner`, with `attempt + 1`.
#[derive(Debug, Clone)]
pub struct SessionClaim {
    /// Who will hold the leases. Use a new owner for every claim call (the worker appends a
    /// counter to its process id): a session id can be reused after a close, and the new
    /// session's attempt 1 must not match a lease (attempt 1, owner) its predecessor's dying
    /// attempt still holds.
    pub owner: String,
    /// How many at most (a worker never claims more than its free slots).
    pub limit: usize,
    /// Lease length.
    pub lease: Duration,
    /// Now.
    pub now: Timestamp,
}

/// Identifies one attempt of one session under one lease: the precondition of every
/// compare-and-set a worker makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRef {
    /// The session (tenant and id).
    pub id: SessionKey,
    /// The attempt the worker claimed.
    pub attempt: u32,
    /// The lease owner.
    pub owner: String,
}

/// Renew a lease while RUNNING with this attempt and owner.
#[derive(Debug, Clone)]
pub struct SessionHeartbeat {
    /// Which attempt.
    pub attempt: AttemptRef,
    /// New lease length from `now`.
    pub lease: Duration,
    /// Now.
    pub now: Timestamp,
}

/// What a heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatOutcome {
    /// Renewed. `cancel_requested`: a client asked to cancel.
    Renewed {
        /// A client asked to cancel; stop and finish CANCELLED.
        cancel_requested: bool,
    },
    /// The lease is no longer ours (reclaimed, finished, removed): stop without writing.
    Lost,
}

/// Everything an engine did since its last checkpoint, committed atomically.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CheckpointBatch {
    /// New records, in order; numbered by the store after the session's last record.
    pub records: Vec<serde_json::Value>,
    /// URLs to add to the frontier, in order; one already in it is left as it is. An entry whose
    /// URL is also in this batch's `seen_add` is taken as new to the session: the caller must
    /// have found it neither in the seen set nor in the frontier (as the engine does, adding a
    /// URL only with its first sighting), so a store need not look it up again. It takes the
    /// next frontier position (see [`ResumeState::frontier_next`]); a URL sent as new while in
    /// the frontier may be in it twice (fetched twice).
    pub frontier_add: Vec<FrontierEntry>,
    /// URLs (canonical) done: removed from the frontier.
    pub frontier_done: Vec<FrontierDone>,
    /// URLs (canonical) to add to the seen set.
    pub seen_add: Vec<String>,
    /// Pages processed in this batch (added to the session's count).
    pub pages: u64,
    /// Elements processed in this batch, when the job counts something other than records (a
    /// Web-Harvest config counts processors); `None`: the records.
    pub elements: Option<u64>,
    /// The session's context, replacing what was stored (a job sends it with its last batch,
    /// so that it is stored with the final status).
    pub context: Option<crate::session::Context>,
    /// Usage in this batch (added to the session's counters).
    pub usage: TokenUsage,
    /// Log lines (the store keeps the last [`LOG_LINES_MAX`] per session).
    pub log: Vec<LogLine>,
}

impl CheckpointBatch {
    /// What committing it adds to its session's counters.
    pub fn progress(&self) -> crate::session::Progress {
        crate::session::Progress {
            records: self.records.len() as u64,
            elements: self.elements.unwrap_or(self.records.len() as u64),
            pages: self.pages,
            usage: self.usage,
            nonempty: !self.is_empty(),
        }
    }

    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
            && self.elements.is_none_or(|e| e == 0)
            && self.frontier_add.is_empty()
            && self.frontier_done.is_empty()
            && self.seen_add.is_empty()
            && self.pages == 0
            && self.usage == TokenUsage::default()
            && self.log.is_empty()
            && self.context.is_none()
    }
}

/// A URL done with (fetched, failed or blocked): it leaves the frontier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontierDone {
    /// The canonical URL.
    pub url: String,
    /// Where the caller believes the URL sits in the frontier (from [`FrontierItem::pos`], or
    /// counted from [`ResumeState::frontier_next`]). A hint: a store may use it to skip a lookup
    /// by URL, and checks it against the entry there; a wrong one costs only that lookup.
    pub pos: Option<u64>,
}

impl From<&str> for FrontierDone {
    fn from(url: &str) -> FrontierDone {
        FrontierDone {
            url: url.to_owned(),
            pos: None,
        }
    }
}

impl From<String> for FrontierDone {
    fn from(url: String) -> FrontierDone {
        FrontierDone { url, pos: None }
    }
}

/// Log lines kept per session; older lines are dropped.
pub const LOG_LINES_MAX: u64 = 1000;

/// Commit a checkpoint while RUNNING with this attempt and owner; also renews the lease.
#[derive(Debug, Clone)]
pub struct CheckpointCommit {
    /// Which attempt.
    pub attempt: AttemptRef,
    /// What to write.
    pub batch: CheckpointBatch,
    /// New lease length from `now`.
    pub lease: Duration,
    /// Now.
    pub now: Timestamp,
}

/// End a RUNNING attempt: commit its last checkpoint and its terminal status together.
#[derive(Debug, Clone)]
pub struct SessionFinish {
    /// Which attempt.
    pub attempt: AttemptRef,
    /// COMPLETED, FAILED or CANCELLED.
    pub status: SessionStatus,
    /// Why, when FAILED.
    pub error: Option<SessionError>,
    /// The last checkpoint.
    pub batch: CheckpointBatch,
    /// The session is removed this long after `now`, unless it has its own
    /// `session_timeout_secs`.
    pub cleanup_after: Duration,
    /// Now.
    pub now: Timestamp,
}

/// Give a RUNNING attempt back: to PENDING, or FAILED when it was its last.
#[derive(Debug, Clone)]
pub struct SessionRequeue {
    /// Which attempt.
    pub attempt: AttemptRef,
    /// Counts against `max_attempts` (a retryable failure does; a graceful shutdown does not).
    pub spend_attempt: bool,
    /// Not claimed again before this (backoff).
    pub run_at: Timestamp,
    /// The error that caused it, if any.
    pub error: Option<SessionError>,
    /// If the requeue ends it (FAILED, CANCELLED), it is removed this long after `now`, unless
    /// it has its own `session_timeout_secs`.
    pub cleanup_after: Duration,
    /// Now.
    pub now: Timestamp,
}

pub use crate::session::RequeueOutcome;

/// Reclaim RUNNING sessions whose lease expired at or before `expired_before`. An attempt that
/// committed no progress counts against `max_attempts`; one that did is free. A session whose
/// cancel flag is set ends CANCELLED (the client's request outlives the worker that lost it).
#[derive(Debug, Clone)]
pub struct LeaseReclaim {
    /// Leases that expire at or before this instant are reclaimed. The sled backend passes
    /// `Timestamp(i64::MAX)` at open: every RUNNING session belongs to a dead process.
    pub expired_before: Timestamp,
    /// At most this many.
    pub limit: usize,
    /// Backoff of the reclaimed sessions (run_at = now + backoff).
    pub backoff: Duration,
    /// Sessions that end FAILED or CANCELLED are removed this long after `now`, unless they have
    /// their own `session_timeout_secs`.
    pub cleanup_after: Duration,
    /// Now.
    pub now: Timestamp,
}

/// One reclaimed session.
#[derive(Debug, Clone, PartialEq)]
pub struct Reclaimed {
    /// Which.
    pub id: SessionKey,
    /// The attempt that was reclaimed.
    pub attempt: u32,
    /// Requeued, Failed or Cancelled.
    pub outcome: RequeueOutcome,
    /// The session after the reclaim.
    pub session: Box<Session>,
}

/// Cancel a session.
#[derive(Debug, Clone)]
pub struct SessionCancel {
    /// Which (tenant and id).
    pub id: SessionKey,
    /// A PENDING session that becomes CANCELLED is removed this long after `now`, unless it has
    /// its own `session_timeout_secs`.
    pub cleanup_after: Duration,
    /// Now.
    pub now: Timestamp,
}

/// What a cancel did.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// Was PENDING, now CANCELLED.
    Cancelled(Box<Session>),
    /// Is RUNNING: the flag is set; the worker ends it CANCELLED.
    Requested(Box<Session>),
    /// Already terminal (CANCELLED or not): unchanged.
    AlreadyTerminal(Box<Session>),
    /// No such session.
    NotFound,
}

/// Remove terminal sessions whose cleanup time has passed.
#[derive(Debug, Clone)]
pub struct SessionsExpire {
    /// Now.
    pub now: Timestamp,
    /// At most this many per call.
    pub limit: usize,
}

/// A page of a session's records.
#[derive(Debug, Clone)]
pub struct RecordsPage {
    /// Which session (tenant and id).
    pub id: SessionKey,
    /// First record's seq.
    pub offset: u64,
    /// At most this many (1..=10000).
    pub limit: usize,
}

/// Remove a session's records that are no longer needed.
#[derive(Debug, Clone)]
pub struct RecordsRemove {
    /// Which session (tenant and id).
    pub id: SessionKey,
    /// Those numbered below this (what an external sink has), whatever the session's status;
    /// `None`: every committed record, only once the session is terminal. A store may keep
    /// a few records below the bound (sled removes whole chunks of a checkpoint's records);
    /// `Session::records_removed` says where the held ones start.
    pub below: Option<u64>,
}

/// What [`Store::session_stats`] counts: one client's sessions, or everyone's.
#[derive(Debug, Clone)]
pub struct StatsQuery {
    /// Only this client's sessions (a tenant's view); `None`: every client's.
    pub client_id: Option<String>,
    /// The end of the last hour's window.
    pub now: Timestamp,
}

/// Sessions counted by status, per client, and what finished in the last hour.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Sessions per status (every status present, 0 when none).
    pub by_status: BTreeMap<SessionStatus, u64>,
    /// Per client id, its sessions per status (only statuses it has).
    pub clients: BTreeMap<String, BTreeMap<SessionStatus, u64>>,
    /// Sessions that ended in each minute of the last hour, oldest minute first: index 59 is
    /// the minute up to `now`.
    pub finished_per_minute: Vec<u64>,
    /// Records of the sessions that ended in each of those minutes.
    pub records_per_minute: Vec<u64>,
}

/// Minutes in [`SessionStats::finished_per_minute`].
pub const STATS_MINUTES: usize = 60;

impl SessionStats {
    /// Empty counts: every status at 0, 60 empty minutes.
    pub fn empty() -> SessionStats {
        SessionStats {
            by_status: SessionStatus::ALL.into_iter().map(|s| (s, 0)).collect(),
            clients: BTreeMap::new(),
            finished_per_minute: vec![0; STATS_MINUTES],
            records_per_minute: vec![0; STATS_MINUTES],
        }
    }

    /// Counts `n` sessions of `client` in `status`.
    pub fn count(&mut self, client: &str, status: SessionStatus, n: u64) {
        *self.by_status.entry(status).or_default() += n;
        *self
            .clients
            .entry(client.to_string())
            .or_default()
            .entry(status)
            .or_default() += n;
    }

    /// Counts `sessions` that ended at `end` with `records` records, if within the hour
    /// before `now`.
    pub fn finished(&mut self, now: Timestamp, end: Timestamp, sessions: u64, records: u64) {
        let ago = now.0.saturating_sub(end.0);
        if !(0..(STATS_MINUTES as i64) * 60_000).contains(&ago) {
            return;
        }
        let i = STATS_MINUTES - 1 - (ago / 60_000) as usize;
        self.finished_per_minute[i] += sessions;
        self.records_per_minute[i] += records;
    }
}

/// Counts of sessions, for gauges that stay true across restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionCounts {
    /// Sessions per status.
    pub by_status: BTreeMap<SessionStatus, u64>,
    /// PENDING sessions that are due now.
    pub queue_depth: u64,
}

/// What a session's next attempt resumes from: the counters of its last checkpoint. The
/// frontier and seen set stay in the store, read a page at a time through
/// [`Store::frontier_page`] and [`Store::seen_filter`], so that resuming a crawl of millions of
/// URLs needs no more memory than one of thousands.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResumeState {
    /// URLs in the frontier (still to fetch) as of the last checkpoint.
    pub frontier_len: u64,
    /// The frontier position the next new entry takes. Positions start at 1 (0 here means
    /// the same: nothing was added yet, or the store does not number them in order of addition),
    /// and each entry of `frontier_add` that is new (see [`CheckpointBatch::frontier_add`]) takes
    /// the next one, so the caller can tell where its own additions sit.
    pub frontier_next: u64,
    /// Records committed so far.
    pub records: u64,
    /// Metrics so far.
    pub metrics: SessionMetrics,
    /// Usage so far.
    pub usage: TokenUsage,
}

/// Take or renew a named leadership (e.g. `maintenance`) for `ttl`.
///
/// Maintenance (lease reclaim, timeouts, cleanup, cron) runs on one process at a time: the one
/// whose `leader_acquire` returned `true` last. A holder renews by calling again before `ttl`
/// runs out; another owner wins only once the holder's expiry (`now + ttl` of its last success)
/// is at or before the caller's `now`. Leadership is an efficiency measure, not a safety one:
/// every transition maintenance makes is itself a compare-and-set, so a stale leader (a stalled
/// process whose term ran out) can waste work but never corrupt a session.
#[derive(Debug, Clone)]
pub struct LeaderAcquire {
    /// Which leadership (one per kind of duty).
    pub name: String,
    /// Who asks: unique per process start.
    pub owner: String,
    /// How long the term lasts from `now` if granted.
    pub ttl: Duration,
    /// Now.
    pub now: Timestamp,
}

/// Read a page of a session's frontier, in the order its URLs were added.
#[derive(Debug, Clone)]
pub struct FrontierPage {
    /// Which session (tenant and id).
    pub id: SessionKey,
    /// Only entries whose position is greater than this (0: from the start). Pass the last
    /// position of the previous page to continue.
    pub after_pos: u64,
    /// At most this many (1..=10000).
    pub limit: usize,
}

/// One frontier entry and its position. Positions are assigned by the store when the entry is
/// committed; they are positive, increase in the order entries were added (within a batch, in
/// the batch's order), and are never reused within a session, so that a reader that continues
/// after its last position sees every entry added since, and none twice.
#[derive(Debug, Clone, PartialEq)]
pub struct FrontierItem {
    /// Position (see the type's doc).
    pub pos: u64,
    /// The entry.
    pub entry: FrontierEntry,
}

/// Ask which of some URLs are in a session's seen set.
#[derive(Debug, Clone)]
pub struct SeenFilter {
    /// Which session (tenant and id).
    pub id: SessionKey,
    /// Canonical URLs to look up (at most 10000).
    pub urls: Vec<String>,
}

/// Most entries of one [`Store::frontier_page`] or URLs of one [`Store::seen_filter`] call.
pub const FRONTIER_PAGE_MAX: usize = 10_000;

/// A saved scraper config with defaults and an optional schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Agent {
    /// Unique per client; same rules as a session id.
    pub name: String,
    /// Owner.
    pub client_id: String,
    /// Scraper config as JSON.
    #[serde(with = "crate::session::json_text")]
    pub config: serde_json::Value,
    /// Default params.
    pub params: BTreeMap<String, String>,
    /// Default options.
    pub options: crate::session::SessionOptions,
    /// Cron expression (6 fields, with seconds), if scheduled.
    pub schedule: Option<String>,
    /// `multiple` or `single`.
    pub sessions: AgentSessions,
    /// Last change.
    pub updated_at: Timestamp,
}

/// Whether an agent may run concurrently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AgentSessions {
    /// Concurrent sessions, each with its own data.
    #[default]
    Multiple,
    /// At most one active; a new run removes the previous run's data.
    Single,
}

/// Read a store's event log (see [`Store::events_recorded`]).
#[derive(Debug, Clone)]
pub struct EventsAfter {
    /// Only events with a greater id (0: from the oldest kept).
    pub after: u64,
    /// At most this many (1..=10000).
    pub limit: usize,
    /// Only these (filtered by the store).
    pub scope: crate::event::EventScope,
}

/// Most events of one [`Store::events_after`] call.
pub const EVENTS_PAGE_MAX: usize = 10_000;

/// The storage driver. See the module docs for the rules every method follows.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Backend name (`sled`, `postgres`), for logs and metrics; never for decisions.
    fn backend(&self) -> &'static str;

    /// Whether the store can take writes now, without I/O (it reports what it has seen: a
    /// failed or stuck flush, a failed write). `/readyz` and the `harvest_store_healthy` gauge
    /// show it. A backend that learns of trouble only from a failed call says healthy.
    fn health(&self) -> StoreHealth {
        StoreHealth::Healthy
    }

    /// Whether this process is the store's only user (sled locks its directory): every
    /// RUNNING session found at open then belongs to a dead process and is taken back at once.
    /// Shared backends say `false` and leave that to lease expiry.
    fn exclusive(&self) -> bool {
        false
    }

    /// Insert a new PENDING session (durable on return) under its key ([`Session::key`]: its
    /// `tenant` and id). An id taken in the same tenant is [`StoreError::Duplicate`], never an
    /// overwrite; the same id in another tenant is another session.
    async fn session_insert(&self, p: SessionInsert) -> StoreResult<InsertOutcome>;

    /// Insert many new PENDING sessions in one durable step (one flush on sled, one statement
    /// on PostgreSQL): for each, in order, [`InsertOutcome::Inserted`] with its `seq`,
    /// [`InsertOutcome::PendingQuota`] when its client's `max_pending` is reached (counting the
    /// batch's earlier items), or why it was refused ([`StoreError::Duplicate`], also for a key
    /// given twice in the batch). Durable on return; when the call itself fails (or the process
    /// dies first), none of them was acknowledged, though a prefix may be stored (sled).
    async fn session_insert_many(
        &self,
        sessions: Vec<Session>,
    ) -> StoreResult<Vec<StoreResult<InsertOutcome>>>;

    /// One session.
    async fn session_get(&self, id: &SessionKey) -> StoreResult<Option<Session>>;

    /// Sessions, newest first, filtered, paginated by cursor.
    async fn session_list(&self, p: SessionList) -> StoreResult<SessionPage>;

    /// Claim due PENDING sessions (see [`SessionClaim`]).
    async fn session_claim(&self, p: SessionClaim) -> StoreResult<Vec<Session>>;

    /// Renew a lease if RUNNING with this attempt and owner.
    async fn session_heartbeat_if_running(
        &self,
        p: SessionHeartbeat,
    ) -> StoreResult<HeartbeatOutcome>;

    /// Commit a checkpoint if RUNNING with this attempt and owner ([`Session::checkpointed`]);
    /// the session after it, `None` when not applied.
    async fn checkpoint_commit_if_running(
        &self,
        p: CheckpointCommit,
    ) -> StoreResult<Option<Session>>;

    /// Commit the last checkpoint and a terminal status if RUNNING with this attempt and owner
    /// ([`Session::finished`]); the session after it, `None` when not applied.
    async fn session_finish_if_running(&self, p: SessionFinish) -> StoreResult<Option<Session>>;

    /// [`Store::session_finish_if_running`] for many attempts in one durable step (one flush on
    /// sled, one transaction on PostgreSQL): for each, in order, what a finish of its own would
    /// answer (an item naming an attempt an earlier item ended is `None`). Durable on return.
    /// When the call itself fails, none was acknowledged: the caller may finish each on its own
    /// (a finish is a compare-and-set, so one that applied is refused, and its session shows
    /// its terminal status with the attempt's number).
    async fn session_finish_many(
        &self,
        items: &[SessionFinish],
    ) -> StoreResult<Vec<StoreResult<Option<Session>>>>;

    /// Back to PENDING if RUNNING with this attempt and owner; FAILED instead when attempts are
    /// exhausted, CANCELLED when a client asked to cancel meanwhile ([`Session::requeued`]).
    /// The session after it ([`RequeueOutcome::of`] its status says which), `None` when not
    /// applied.
    async fn session_requeue_if_running(&self, p: SessionRequeue) -> StoreResult<Option<Session>>;

    /// Reclaim sessions whose lease expired (see [`LeaseReclaim`]).
    async fn leases_reclaim(&self, p: LeaseReclaim) -> StoreResult<Vec<Reclaimed>>;

    /// Cancel: PENDING becomes CANCELLED; RUNNING gets the flag.
    async fn session_cancel(&self, p: SessionCancel) -> StoreResult<CancelOutcome>;

    /// Remove a session and everything of it (records, frontier, seen set, log, index entries).
    /// Returns the removed session, `None` when there was none.
    async fn session_remove(&self, id: &SessionKey) -> StoreResult<Option<Session>>;

    /// Remove committed records, keeping the session itself (its status stays readable until its
    /// own cleanup), for `remove_after_export`: see [`RecordsRemove`]. The session after it, its
    /// `records_removed` saying how far the removal went; `None` when there is no such session
    /// (or, to remove all, it is not terminal).
    async fn records_remove(&self, p: RecordsRemove) -> StoreResult<Option<Session>>;

    /// Remove terminal sessions whose cleanup time is due (O(expired)); returns them.
    async fn sessions_expire(&self, p: SessionsExpire) -> StoreResult<Vec<Session>>;

    /// Records of a session (committed ones only), by seq.
    async fn records_page(&self, p: RecordsPage) -> StoreResult<Vec<Record>>;

    /// Where a session's next attempt resumes: the counters of its last checkpoint (cheap: it
    /// never loads the frontier or the seen set).
    async fn resume_load(&self, id: &SessionKey) -> StoreResult<ResumeState>;

    /// Committed frontier entries of a session after a position, in position order (see
    /// [`FrontierItem`]). Empty for an unknown session.
    async fn frontier_page(&self, p: FrontierPage) -> StoreResult<Vec<FrontierItem>>;

    /// For each URL, in order, whether it is in the session's committed seen set (added by a
    /// checkpoint's `seen_add`). All `false` for an unknown session.
    async fn seen_filter(&self, p: SeenFilter) -> StoreResult<Vec<bool>>;

    /// A session's context (see [`CheckpointBatch::context`]); `None` when it has none (or there
    /// is no such session).
    async fn context_get(&self, id: &SessionKey) -> StoreResult<Option<crate::session::Context>>;

    /// The last `limit` log lines of a session, oldest first.
    async fn log_tail(&self, id: &SessionKey, limit: usize) -> StoreResult<Vec<LogLine>>;

    /// Session counts per status and due queue depth.
    async fn session_counts(&self, now: Timestamp) -> StoreResult<SessionCounts>;

    /// Sessions by status and client, and what ended in the last hour (`GET /v1/stats`). May
    /// read every session of the scope (sled) or aggregate them (PostgreSQL): callers cache it.
    async fn session_stats(&self, q: StatsQuery) -> StoreResult<SessionStats>;

    /// Save (create or replace) an agent.
    async fn agent_put(&self, agent: Agent) -> StoreResult<()>;

    /// One agent of a client.
    async fn agent_get(&self, client_id: &str, name: &str) -> StoreResult<Option<Agent>>;

    /// Delete an agent; `false` when there was none.
    async fn agent_delete(&self, client_id: &str, name: &str) -> StoreResult<bool>;

    /// All agents (every client), by client and name.
    async fn agent_list(&self) -> StoreResult<Vec<Agent>>;

    /// Take or renew a leadership (see [`LeaderAcquire`]); `true`: the caller holds it until
    /// `now + ttl`.
    async fn leader_acquire(&self, p: LeaderAcquire) -> StoreResult<bool>;

    /// The ids of RUNNING sessions a client asked to cancel from now on, in this process or (for
    /// shared backends) in another, so that the worker holding one stops it at once instead of
    /// at its next heartbeat. Lossy (a lagging receiver misses some): the heartbeat still relays
    /// the flag.
    fn cancel_requests(&self) -> tokio::sync::broadcast::Receiver<SessionKey>;

    /// Wait until a session may have become claimable (a submission or requeue, here or, for
    /// shared backends, in another process) or `timeout` passes. Spurious wakeups are allowed.
    async fn pending_wait(&self, timeout: Duration);

    /// Whether concurrent single inserts are better written together, as one
    /// [`Store::session_insert_many`]: the backend pays per transaction, not per flush of a
    /// shared log, and a failed `session_insert_many` stored none of its items, so each can be
    /// written again on its own. The service then combines concurrent submissions
    /// (PostgreSQL). `false` (sled): its flusher already makes concurrent inserts durable
    /// together.
    fn combines_inserts(&self) -> bool {
        false
    }

    /// Whether batches of writes (finishes, combined submissions) are better written one at a
    /// time: each statement costs much beside each row in it, so a batch that waits for the one
    /// being written gathers more and costs less per session (PostgreSQL). The batcher then
    /// lets a second batch go beside the first only when the first is slow (a finish blocked
    /// on a row lock another process holds). `false` (sled): staging the
    /// next batch while the flusher makes the previous one durable costs nothing extra.
    fn batches_one_at_a_time(&self) -> bool {
        false
    }

    /// Whether the store records every session event itself, with the transition that causes
    /// it, in one log shared by every process using it (PostgreSQL). Then the runtime feeds each
    /// process's event bus from [`Store::events_after`] instead of publishing what the process
    /// does, so every process sees every session's events. `false` (sled): events stay in the
    /// process's bus.
    fn events_recorded(&self) -> bool {
        false
    }

    /// Recorded events after an id, in id order (ids increase in the order the transitions'
    /// events were written; a gap is an event whose transaction has not committed yet, or never
    /// will). Each event carries the session as the transition left it; `None` when it can no
    /// longer be rebuilt (its session was removed and replaced since). Empty for a store that
    /// records none.
    async fn events_after(&self, _p: EventsAfter) -> StoreResult<Vec<crate::event::Event>> {
        Ok(Vec::new())
    }

    /// The id of the newest recorded event (0: none); a reader starts after it to see events
    /// from now on.
    async fn events_last_id(&self) -> StoreResult<u64> {
        Ok(0)
    }

    /// Wait until an event may have been recorded (here or in another process) or `timeout`
    /// passes. Spurious wakeups are allowed.
    async fn events_wait(&self, timeout: Duration) {
        tokio::time::sleep(timeout).await;
    }

    /// Remove recorded events older than `retention` (by the store's own clock: the events are
    /// stamped by the database when written); returns how many.
    async fn events_expire(&self, _retention: Duration) -> StoreResult<u64> {
        Ok(0)
    }

    /// Make every acknowledged write durable and release resources.
    async fn close(&self) -> StoreResult<()>;

    /// Sets the per-client limits later inserts and claims enforce. A backend that cannot
    /// enforce them refuses with [`StoreError::Invalid`] (only empty limits are accepted).
    fn quotas_set(&self, q: Quotas) -> StoreResult<()> {
        if q.is_empty() {
            Ok(())
        } else {
            Err(StoreError::Invalid(format!(
                "the {} store does not enforce [[clients]] max_running or max_pending",
                self.backend()
            )))
        }
    }
}

/// The id text of a session's store key, for error messages.
pub(crate) fn key_name(kind: &str, id: &SessionKey) -> String {
    format!("{kind}/{id}")
}
