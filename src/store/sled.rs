//! The embedded sled backend: one process per data directory, durable on return.
//!
//! # Layout
//!
//! Everything lives in sled's default tree, one keyspace per leading byte. Every multi-key change
//! is one batch made crash-atomic by an intent key (see `SledStore::apply_atomic`). A store-level
//! `std::sync::Mutex` serializes every read-check-write (the compare-and-sets), so no two
//! writers ever interleave. `id` below is the session id's bytes; `lp(s)` is a 4-byte big-endian
//! length followed by the bytes, so that a prefix scan of session `ab` never sees `abc`'s keys.
//! Integers are big-endian; timestamps have their sign bit flipped so they sort as numbers;
//! `!seq` is the bitwise complement (newest first).
//!
//! | key | value | what |
//! |---|---|---|
//! | `\0meta` | `u32` | layout version ([`LAYOUT_VERSION`]), written at open |
//! | `\0counters` | `Counters` | next seq, sessions per status, size of the due index |
//! | `\0i` seq | encoded batch | a batch being applied; present after a crash only if interrupted |
//! | `S` id | `Session` | the sessions |
//! | `W` run_at seq prio id | empty | PENDING sessions not yet moved to the due index |
//! | `P` !prio run_at seq id | empty | due PENDING sessions, in claim order |
//! | `G` !seq id | empty | every session, newest first |
//! | `C` lp(client) !seq id | empty | per client, newest first |
//! | `A` lp(agent) !seq id | empty | per agent, newest first |
//! | `T` status !seq id | empty | per status, newest first |
//! | `Y` lp(client) lp(agent) id | empty | active (PENDING or RUNNING) sessions per client's agent |
//! | `L` expires_at id | empty | RUNNING sessions by lease expiry |
//! | `X` cleanup_at id | empty | terminal sessions by cleanup time |
//! | `R` lp(id) n | JSON text | records |
//! | `B` lp(id) first | `Vec<FrontierEntry>` | frontier chunk: entries at positions `first..`, in the order added |
//! | `J` lp(id) first | `ChunkLive` | which entries of chunk `first` are still in the frontier |
//! | `K` lp(id) | `u64` | the session's next frontier position (never reused) |
//! | `U` lp(id) url | `UrlState` | seen-URL set, and where a URL sits in the frontier (an index of the chunks, brought up to date when read) |
//! | `I` lp(id) | `u64` | the first frontier position whose chunk `U` does not index yet |
//! | `O` lp(id) n | `LogLine` | log (the last [`LOG_LINES_MAX`]) |
//! | `N` lp(client) name | `Agent` | agents |
//! | `Z` id | empty | a removal whose data purge has not finished (resumed at open) |
//!
//! (Stores written before the frontier was ordered kept it under `F` lp(id) url, and before it was
//! chunked under `Q` lp(id) pos with an index `V` lp(id) url; such entries are no longer read,
//! only purged with their session.)
//!
//! # Crawl state: few keys per URL
//!
//! A checkpoint of a crawl touches thousands of URLs, and every sled key written costs a tree
//! update and a log write (~7 µs on 2 cores: sled 0.34 splits a leaf every few inserts), a
//! removed one a node merge. So the frontier entries of one checkpoint are written together as
//! chunks of at most [`CHUNK_ENTRIES`] (`B`), each with a small bitmap of the entries still to do
//! (`J`); a done URL clears its bit (one `J` write per chunk per checkpoint). The caller says
//! where a done URL sits ([`super::FrontierDone::pos`], checked against the chunk), so finishing
//! a page reads no per-URL key.
//!
//! The seen set and the URL → position map (`U`, one key per URL) are an index of the chunks,
//! and a new URL (one in both `frontier_add` and `seen_add`, as the engine sends them) gets no
//! `U` key when committed: `I` says how far the index goes, and whatever reads `U` (a seen-set
//! lookup, an addition or removal by URL) first indexes the chunks after `I`. The engine reads
//! the seen set only once its own cache of seen URLs is no longer complete (more than
//! ~100,000 URLs, or a resumed attempt), so a crawl smaller than that never writes `U` at all,
//! and a bigger one indexes each URL once, as before. A chunk all done stays until it is indexed
//! (it is the only record of its URLs), then goes. (`harvest bench crawl --store`, 2 cores: a
//! checkpoint of 500 pages took 8.3 ms of store time with a `U` write per URL, 1.9 ms without.)
//!
//! Records are numbered from the session's committed count and written just before the batch's
//! intent, not inside it: a crash in between leaves records numbered at or after the committed
//! count, which no reader sees (`records_page` stops at the count) and the next checkpoint
//! overwrites. Keeping them out of the intent halves the bytes a checkpoint writes.
//!
//! Values go through [`codec`] (version byte + bincode); index entries and set members are empty
//! and all they say is in their key, which is parsed defensively. A corrupt session value is
//! [`StoreError::Corrupt`] from `session_get` (and `session_remove`) of that id; listings and
//! claims skip it with a `tracing::warn` so the rest of the store keeps working.
//!
//! # Claims
//!
//! New and requeued sessions go to `W` (keyed by run_at). A claim first moves the due ones (run_at
//! at or before its `now`) to `P`, whose order is the claim order, then takes the first `limit`
//! entries of `P`: O(log n + claimed + promoted), and a not-yet-due high-priority session is never
//! scanned by a claim. A session promoted to `P` stays due even if a later claim passes an
//! earlier `now` (clocks only move forward in practice).
//!
//! # Durability: group commit
//!
//! Every write applies its batch, takes a ticket (`written + 1`) and waits until a dedicated
//! flusher thread has completed a `db.flush()` that started after the ticket was taken. The
//! flusher loops "target = written; flush; flushed = target", so one flush acknowledges every
//! write that was applied before it began, however many callers wait. Sled's own periodic flush is
//! disabled: this is the only one. Writers keep applying batches while a flush runs, so each
//! flush acknowledges every write that arrived during the previous one.
//!
//! sled 0.34's flush makes the log's pages durable with `sync_file_range`, which neither writes
//! the file's size (the log grows by appending) nor flushes the disk's cache, and never syncs the
//! files it writes large values to (`blobs/`). So after each flush the flusher also
//! `fdatasync`s the log file and every blob file it has not synced yet, then the `blobs`
//! directory when it gained files ([`DiskSync`]): an acknowledged write survives a power loss or
//! an OS crash, as far as the disk honours its flush. (`harvest bench queue` on this machine:
//! no measurable change in commits per second; the group commit pays one sync per flush.)
//!
//! Two writes do not wait for their flush: a claim and a heartbeat. Nobody outside this process
//! is told of them, and losing them in a crash changes nothing: sled is one process per data
//! directory, so at open every RUNNING session is recovered anyway (and a lost claim leaves the
//! session PENDING, as if it had never been claimed). The next durable write's flush covers them.
//! This takes one disk flush off the claim → complete path of every session.
//!
//! Store calls run their sled operations on the calling task's thread: in the common case these
//! are memory operations under the store mutex (never held across an `.await`); the only call
//! that waits for the disk is the flush, on its own thread.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sled::IVec;
use tokio::sync::{Notify, watch};

use super::{
    Agent, CancelOutcome, CheckpointBatch, CheckpointCommit, FRONTIER_PAGE_MAX, FrontierItem,
    FrontierPage, HeartbeatOutcome, InsertOutcome, LOG_LINES_MAX, LeaseReclaim, Reclaimed,
    RecordsPage, RequeueOutcome, ResumeState, SeenFilter, SessionCancel, SessionClaim,
    SessionCounts, SessionFinish, SessionHeartbeat, SessionInsert, SessionList, SessionPage,
    SessionRequeue, SessionsExpire, Store, StoreError, StoreResult, codec, key_name,
};
use crate::session::{
    FrontierEntry, Lease, LogLine, Record, Session, SessionError, SessionId, SessionStatus,
    Timestamp,
};

const META_KEY: &[u8] = b"\0meta";

/// Version of this store's layout, kept in `\0meta` (values keep their own [`super::SCHEMA_VERSION`]
/// byte). 1: `U` written with every checkpoint. 2: `U` built from the frontier chunks when first
/// read, up to `I` ("Crawl state" above). A version-1 store opens as it is (its `U` is complete;
/// a missing `I` reads as 1, and the first catch-up re-indexes what is there, changing nothing)
/// and is marked 2, so that a harvest that knows only version 1, which would take the URLs
/// not yet indexed as never seen, refuses it instead of misreading it.
pub const LAYOUT_VERSION: u32 = 2;

// sled's page cache. Its default (1 GiB) lets a crawl of millions of URLs grow the process far
// beyond what the crawl needs; sled's count is of serialized bytes, the nodes take ~3x that in
// memory. Measured with `harvest bench frontier --urls 1000000` (release, 2 cores): 16 MiB gave
// 189 MB peak RSS, 4 MiB 129 MB, at the same pages/s (and the same for `bench crawl --store`).
const CACHE_BYTES: u64 = 4 * 1024 * 1024;
const COUNTERS_KEY: &[u8] = b"\0counters";
/// Prefix of intent keys: `\0i` + seq (u64 BE). See [`SledStore::apply_atomic`].
const INTENT_PREFIX: &[u8] = b"\0i";

fn k_intent(seq: u64) -> Vec<u8> {
    let mut k = INTENT_PREFIX.to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// A group of key changes that is applied as a unit (see [`SledStore::apply_atomic`]). Later
/// changes to the same key win, as in sled's own `Batch`.
#[derive(Default, Debug)]
struct Batch {
    ops: Vec<(IVec, Option<IVec>)>,
    /// Changes applied before the intent, outside it: to keys no reader sees until the batch's
    /// other changes are in (records numbered from the session's committed count).
    loose: Vec<(IVec, Option<IVec>)>,
}

impl Batch {
    fn insert<K: Into<IVec>, V: Into<IVec>>(&mut self, key: K, value: V) {
        self.ops.push((key.into(), Some(value.into())));
    }

    fn remove<K: Into<IVec>>(&mut self, key: K) {
        self.ops.push((key.into(), None));
    }

    /// `count u32`, then per change `1 klen key vlen value` (insert) or `0 klen key` (remove),
    /// lengths u32 BE.
    fn encode(&self) -> Vec<u8> {
        let size: usize = self
            .ops
            .iter()
            .map(|(k, v)| 9 + k.len() + v.as_ref().map_or(0, |v| 4 + v.len()))
            .sum();
        let mut out = Vec::with_capacity(4 + size);
        out.extend_from_slice(&(self.ops.len() as u32).to_be_bytes());
        for (k, v) in &self.ops {
            out.push(u8::from(v.is_some()));
            out.extend_from_slice(&(k.len() as u32).to_be_bytes());
            out.extend_from_slice(k);
            if let Some(v) = v {
                out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                out.extend_from_slice(v);
            }
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<Batch> {
        fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            if b.len() < n {
                return None;
            }
            let (head, rest) = b.split_at(n);
            *b = rest;
            Some(head)
        }
        fn len(b: &mut &[u8]) -> Option<usize> {
            let raw: [u8; 4] = take(b, 4)?.try_into().ok()?;
            Some(u32::from_be_bytes(raw) as usize)
        }
        let mut b = bytes;
        let n = len(&mut b)?;
        let mut ops = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let tag = *take(&mut b, 1)?.first()?;
            let klen = len(&mut b)?;
            let key = IVec::from(take(&mut b, klen)?);
            let value = match tag {
                1 => {
                    let vlen = len(&mut b)?;
                    Some(IVec::from(take(&mut b, vlen)?))
                }
                0 => None,
                _ => return None,
            };
            ops.push((key, value));
        }
        b.is_empty().then_some(Batch {
            ops,
            loose: Vec::new(),
        })
    }

    fn apply_to(&self, db: &sled::Db) -> StoreResult<()> {
        for (k, v) in &self.ops {
            match v {
                Some(v) => db.insert(k, v.clone()).map_err(backend)?,
                None => db.remove(k).map_err(backend)?,
            };
        }
        Ok(())
    }
}

/// Completes the batches a crash interrupted: every intent still present, in order.
fn replay_intents(db: &sled::Db) -> StoreResult<()> {
    let mut replayed = 0;
    for kv in db.scan_prefix(INTENT_PREFIX) {
        let (k, v) = kv.map_err(backend)?;
        let batch =
            Batch::decode(&v).ok_or_else(|| corrupt_key(&k, "an unreadable batch intent"))?;
        batch.apply_to(db)?;
        db.remove(&k).map_err(backend)?;
        replayed += 1;
    }
    if replayed > 0 {
        tracing::info!(
            batches = replayed,
            "completed batches interrupted by a crash"
        );
        db.flush().map_err(backend)?;
    }
    Ok(())
}

// Sessions moved from `W` to `P` per claim at most: bounds the claim's batch; any remainder moves
// at the next claim.
const PROMOTE_MAX: usize = 10_000;

// Keys removed per batch when purging a removed session's data: bounds one batch's memory for a
// session with millions of records.
const PURGE_CHUNK: usize = 10_000;

// No linger before a flush: since batches no longer use sled's `apply_batch` (see
// `SledStore::apply_atomic`), writers keep applying while a flush runs, and the next flush takes
// everything that arrived meanwhile. Measured with `harvest bench queue` (2 cores, 16
// submitters): a 2 ms linger gave 14-23k durable submits/s, none gives 21-25k/s.

const LIST_LIMIT_MAX: usize = 1000;
const RECORDS_LIMIT_MAX: usize = 10_000;

/// Persistent counters, rewritten in the same batch as every change that moves them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Counters {
    /// The next session's seq.
    next_seq: u64,
    /// Sessions per status, indexed by [`SessionStatus::code`].
    by_status: [u64; 5],
    /// Entries in the due index `P`.
    due: u64,
}

/// The durability handshake between writers and the flusher thread.
#[derive(Debug)]
struct Durability {
    /// Tickets handed out: writes applied and waiting to be flushed.
    written: AtomicU64,
    /// Set by writers, cleared by the flusher: there is something to flush.
    dirty: Mutex<bool>,
    wake: Condvar,
    shutdown: AtomicBool,
    flushes: AtomicU64,
    state: watch::Sender<Flushed>,
}

/// What the flusher has done so far.
#[derive(Clone, Debug, Default)]
struct Flushed {
    /// Every ticket up to this is durable.
    upto: u64,
    /// Every ticket up to this was covered by a failed flush (unless `upto` covers it).
    failed_upto: u64,
    /// The last flush error.
    error: Option<String>,
}

impl Durability {
    fn ticket(&self) -> u64 {
        let t = self.written.fetch_add(1, Ordering::SeqCst) + 1;
        let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        // Only the first writer after the flusher took its target wakes it: a notify is a
        // syscall, and the flusher rechecks `dirty` before it sleeps.
        if !*dirty {
            *dirty = true;
            self.wake.notify_one();
        }
        t
    }

    async fn wait(&self, ticket: u64) -> StoreResult<()> {
        let mut rx = self.state.subscribe();
        let seen = rx
            .wait_for(|f| f.upto >= ticket || f.failed_upto >= ticket)
            .await
            .map_err(|_| StoreError::Backend("the sled flusher thread stopped".into()))?;
        if seen.upto >= ticket {
            Ok(())
        } else {
            Err(StoreError::Backend(format!(
                "flushing the sled store to disk failed ({}); the write may be lost: check the disk",
                seen.error.as_deref().unwrap_or("unknown error")
            )))
        }
    }

    fn run(&self, db: &sled::Db, disk: &mut DiskSync) {
        loop {
            {
                let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
                while !*dirty && !self.shutdown.load(Ordering::SeqCst) {
                    dirty = self.wake.wait(dirty).unwrap_or_else(|p| p.into_inner());
                }
                if !*dirty {
                    return; // shut down with nothing left to flush
                }
                *dirty = false;
            }
            let target = self.written.load(Ordering::SeqCst);
            // Blob files listed before the flush are whole once it returns (it waits for every
            // write reserved before it began); newer ones are synced by the next round.
            let result = disk
                .unsynced_blobs()
                .map_err(|e| format!("listing sled's blob files: {e}"))
                .and_then(|blobs| {
                    db.flush().map_err(|e| e.to_string())?;
                    disk.sync(blobs)
                        .map_err(|e| format!("syncing to disk: {e}"))
                });
            self.flushes.fetch_add(1, Ordering::Relaxed);
            let failed = result.is_err();
            self.state.send_modify(|f| match result {
                Ok(()) => f.upto = f.upto.max(target),
                Err(e) => {
                    tracing::error!(error = %e, "flushing the sled store failed; no write is acknowledged until harvest restarts");
                    // Sticky: after a failed sync the kernel may have dropped dirty pages, and a
                    // later sync would succeed (it reports an error once), so nothing written
                    // after this can be called durable either.
                    f.failed_upto = u64::MAX;
                    f.error = Some(format!(
                        "{e}; no write is acknowledged until harvest restarts"
                    ));
                }
            });
            if failed {
                return;
            }
        }
    }
}

/// What the flusher syncs after sled's flush (see "Durability" in the module doc).
struct DiskSync {
    /// sled's log file (`db`).
    log: std::fs::File,
    blobs: PathBuf,
    /// Blob files synced already, by name (blobs are written once, then removed).
    synced: std::collections::HashSet<std::ffi::OsString>,
}

impl DiskSync {
    /// Opens sled's log in `dir` (sled has created it) and syncs the directory itself once, so
    /// that the files sled created at its first open are there after a power loss.
    fn open(dir: &Path) -> std::io::Result<DiskSync> {
        let log = std::fs::File::open(dir.join("db"))?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(DiskSync {
            log,
            blobs: dir.join("blobs"),
            synced: std::collections::HashSet::new(),
        })
    }

    /// Blob files not synced yet (and forgets synced ones sled has removed).
    fn unsynced_blobs(&mut self) -> std::io::Result<Vec<std::ffi::OsString>> {
        let entries = match std::fs::read_dir(&self.blobs) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut present = std::collections::HashSet::new();
        let mut new = Vec::new();
        for entry in entries {
            let name = entry?.file_name();
            if !self.synced.contains(&name) {
                new.push(name.clone());
            }
            present.insert(name);
        }
        self.synced.retain(|n| present.contains(n));
        Ok(new)
    }

    /// Syncs the log, then `blobs` (listed before the flush that just ended) and their directory.
    fn sync(&mut self, blobs: Vec<std::ffi::OsString>) -> std::io::Result<()> {
        self.log.sync_data()?;
        let mut added = false;
        for name in blobs {
            match std::fs::File::open(self.blobs.join(&name)) {
                Ok(f) => f.sync_data()?,
                // Removed since listed: sled no longer needs it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
            self.synced.insert(name);
            added = true;
        }
        if added {
            std::fs::File::open(&self.blobs)?.sync_all()?;
        }
        Ok(())
    }
}

/// The sled store. Open one per data directory per process (sled locks the directory).
pub struct SledStore {
    db: sled::Db,
    path: PathBuf,
    /// Serializes every read-check-write; holds the counters as last committed.
    write: Mutex<Counters>,
    durability: Arc<Durability>,
    flusher: Option<JoinHandle<()>>,
    pending: Notify,
    /// Sequence of the next intent key (see [`SledStore::apply_atomic`]).
    intent_seq: AtomicU64,
    /// A batch failed half-way: no more writes until reopened.
    poisoned: AtomicBool,
    /// Leaderships: name → (owner, expiry). In memory: sled allows one process per data
    /// directory (its file lock), so holders can only be tasks of this process, and a restart
    /// rightly starts with no leader.
    leaders: std::sync::Mutex<std::collections::HashMap<String, (String, Timestamp)>>,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(format!("sled: {e}"))
}

// ----- key encoding ---------------------------------------------------------------------------

fn ts(t: Timestamp) -> [u8; 8] {
    ((t.0 as u64) ^ (1 << 63)).to_be_bytes()
}

fn prio_desc(p: i32) -> [u8; 4] {
    (!((p as u32) ^ (1 << 31))).to_be_bytes()
}

fn lp(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

fn key(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + parts.iter().map(|p| p.len()).sum::<usize>());
    k.push(tag);
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

/// `tag lp(s)`: the prefix of a per-string keyspace.
fn lp_prefix(tag: u8, s: &str) -> Vec<u8> {
    let mut k = vec![tag];
    lp(&mut k, s.as_bytes());
    k
}

fn k_session(id: &SessionId) -> Vec<u8> {
    key(b'S', &[id.as_str().as_bytes()])
}
fn k_wait(s: &Session) -> Vec<u8> {
    key(
        b'W',
        &[
            &ts(s.run_at),
            &s.seq.to_be_bytes(),
            &prio_desc(s.options.priority),
            s.id.as_str().as_bytes(),
        ],
    )
}
fn k_pending(prio: [u8; 4], run_at: [u8; 8], seq: [u8; 8], id: &[u8]) -> Vec<u8> {
    key(b'P', &[&prio, &run_at, &seq, id])
}
fn k_pending_of(s: &Session) -> Vec<u8> {
    k_pending(
        prio_desc(s.options.priority),
        ts(s.run_at),
        s.seq.to_be_bytes(),
        s.id.as_str().as_bytes(),
    )
}
fn newest(seq: u64) -> [u8; 8] {
    (!seq).to_be_bytes()
}
fn k_global(s: &Session) -> Vec<u8> {
    key(b'G', &[&newest(s.seq), s.id.as_str().as_bytes()])
}
fn k_client(s: &Session) -> Vec<u8> {
    let mut k = lp_prefix(b'C', s.client.client_id());
    k.extend_from_slice(&newest(s.seq));
    k.extend_from_slice(s.id.as_str().as_bytes());
    k
}
fn k_agent(agent: &str, s: &Session) -> Vec<u8> {
    let mut k = lp_prefix(b'A', agent);
    k.extend_from_slice(&newest(s.seq));
    k.extend_from_slice(s.id.as_str().as_bytes());
    k
}
fn status_prefix(status: SessionStatus) -> Vec<u8> {
    vec![b'T', status.code()]
}
fn k_status(s: &Session) -> Vec<u8> {
    key(
        b'T',
        &[&[s.status.code()], &newest(s.seq), s.id.as_str().as_bytes()],
    )
}
/// Active sessions of one client's agent: agents are named per client, so two tenants' agents
/// of the same name never block each other.
fn active_prefix(client: &str, agent: &str) -> Vec<u8> {
    let mut k = lp_prefix(b'Y', client);
    lp(&mut k, agent.as_bytes());
    k
}
fn k_active(client: &str, agent: &str, id: &SessionId) -> Vec<u8> {
    let mut k = active_prefix(client, agent);
    k.extend_from_slice(id.as_str().as_bytes());
    k
}
fn k_lease(expires: Timestamp, id: &SessionId) -> Vec<u8> {
    key(b'L', &[&ts(expires), id.as_str().as_bytes()])
}
fn k_cleanup(at: Timestamp, id: &SessionId) -> Vec<u8> {
    key(b'X', &[&ts(at), id.as_str().as_bytes()])
}
fn k_tombstone(id: &SessionId) -> Vec<u8> {
    key(b'Z', &[id.as_str().as_bytes()])
}
/// Prefix of a session's data keyspace (`R`, `Q`, `V`, `K`, `U`, `O`).
fn data_prefix(tag: u8, id: &SessionId) -> Vec<u8> {
    lp_prefix(tag, id.as_str())
}
fn k_record(id: &SessionId, n: u64) -> Vec<u8> {
    let mut k = data_prefix(b'R', id);
    k.extend_from_slice(&n.to_be_bytes());
    k
}
fn k_log(id: &SessionId, n: u64) -> Vec<u8> {
    let mut k = data_prefix(b'O', id);
    k.extend_from_slice(&n.to_be_bytes());
    k
}
fn k_url(tag: u8, id: &SessionId, url: &str) -> Vec<u8> {
    let mut k = data_prefix(tag, id);
    k.extend_from_slice(url.as_bytes());
    k
}
/// `B` (entries) or `J` (live bitmap) of the frontier chunk starting at `first`.
fn k_chunk(tag: u8, id: &SessionId, first: u64) -> Vec<u8> {
    let mut k = data_prefix(tag, id);
    k.extend_from_slice(&first.to_be_bytes());
    k
}

/// Most records of one record chunk (`E`), and about the most bytes: one key per checkpoint's
/// worth of small records instead of one per record (a key costs a sled tree update on write and
/// ~50 bytes of sled's memory for as long as the store is open), below sled's blob threshold.
const RECORD_CHUNK_MAX: usize = 256;
const RECORD_CHUNK_BYTES: usize = 64 * 1024;

/// Most entries of one frontier chunk: 512 entries of ~100 bytes stay well under sled's blob
/// threshold (a quarter of its 512 KiB segment), above which every write is a file of its own.
const CHUNK_ENTRIES: usize = 512;

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

/// Frontier chunks indexed per hold of the store mutex when the `U` index catches up.
const INDEX_STEP: usize = 8;

/// Which entries of a frontier chunk are still in the frontier (`J` value).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ChunkLive {
    /// Entries in the chunk.
    len: u32,
    /// Bit `i`: entry `first + i` is still to do.
    live: Vec<u64>,
}

impl ChunkLive {
    fn new(live: &[bool]) -> ChunkLive {
        let mut bits = vec![0u64; live.len().div_ceil(64)];
        for (i, _) in live.iter().enumerate().filter(|(_, l)| **l) {
            bits[i / 64] |= 1 << (i % 64);
        }
        ChunkLive {
            len: live.len() as u32,
            live: bits,
        }
    }

    fn is_live(&self, i: u64) -> bool {
        i < u64::from(self.len)
            && self
                .live
                .get((i / 64) as usize)
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn clear(&mut self, i: u64) {
        if let Some(w) = self.live.get_mut((i / 64) as usize) {
            *w &= !(1 << (i % 64));
        }
    }

    fn count(&self) -> u64 {
        self.live.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// A `U` value: whether the URL is in the seen set, and the frontier position it was last added
/// at (in the frontier while that position's chunk bit is set). Empty: seen, never added (also
/// how stores before chunked frontiers wrote every member); else a flags byte (bit 0: seen) and
/// the position, u64 BE.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct UrlState {
    seen: bool,
    pos: Option<u64>,
}

impl UrlState {
    fn decode(k: &[u8], v: &[u8]) -> StoreResult<UrlState> {
        match v {
            [] => Ok(UrlState {
                seen: true,
                pos: None,
            }),
            [flags, pos @ ..] if pos.len() == 8 => {
                let raw: [u8; 8] = pos
                    .try_into()
                    .map_err(|_| corrupt_key(k, "a malformed URL state"))?;
                Ok(UrlState {
                    seen: flags & 1 != 0,
                    pos: Some(u64::from_be_bytes(raw)),
                })
            }
            _ => Err(corrupt_key(k, "a malformed URL state")),
        }
    }

    /// `None`: nothing to keep (neither seen nor ever added).
    fn encode(self) -> Option<IVec> {
        match self.pos {
            None if self.seen => Some(IVec::default()),
            None => None,
            Some(pos) => {
                let mut v = Vec::with_capacity(9);
                v.push(u8::from(self.seen));
                v.extend_from_slice(&pos.to_be_bytes());
                Some(v.into())
            }
        }
    }
}

/// The decoded value of `k`, if the key is there.
fn read<T: serde::de::DeserializeOwned>(db: &sled::Db, k: &[u8]) -> StoreResult<Option<T>> {
    match db.get(k).map_err(backend)? {
        Some(v) => Ok(Some(codec::decode(&|| show_key(k), &v)?)),
        None => Ok(None),
    }
}

/// The `U` state of `url` in session `id` (default: neither seen nor added).
fn read_url(db: &sled::Db, id: &SessionId, url: &str) -> StoreResult<UrlState> {
    let k = k_url(b'U', id, url);
    match db.get(&k).map_err(backend)? {
        Some(v) => UrlState::decode(&k, &v),
        None => Ok(UrlState::default()),
    }
}

/// The crawl-state changes of one checkpoint being staged: what it read and what it changes.
struct FrontierStage<'a> {
    id: &'a SessionId,
    /// URL states read or changed (`true`: changed).
    urls: std::collections::HashMap<&'a str, (UrlState, bool)>,
    /// Chunks of earlier checkpoints read or changed (`true`: changed), by first position.
    chunks: std::collections::BTreeMap<u64, (ChunkLive, bool)>,
    /// Entries of chunks of earlier checkpoints read to check a position hint, by first position.
    entries: std::collections::HashMap<u64, Vec<FrontierEntry>>,
}

impl<'a> FrontierStage<'a> {
    fn url(&mut self, db: &sled::Db, url: &'a str) -> StoreResult<UrlState> {
        if let Some((st, _)) = self.urls.get(url) {
            return Ok(*st);
        }
        let st = read_url(db, self.id, url)?;
        self.urls.insert(url, (st, false));
        Ok(st)
    }

    fn set_url(&mut self, url: &'a str, st: UrlState) {
        self.urls.insert(url, (st, true));
    }

    /// The first position of the stored chunk holding `pos`, if one still does.
    fn chunk_of(&mut self, db: &sled::Db, pos: u64) -> StoreResult<Option<u64>> {
        if let Some((first, (live, _))) = self.chunks.range(..=pos).next_back()
            && pos < first + u64::from(live.len)
        {
            return Ok(Some(*first));
        }
        let lo = k_chunk(b'J', self.id, 0);
        let Some(kv) = db.range(lo..=k_chunk(b'J', self.id, pos)).next_back() else {
            return Ok(None);
        };
        let (k, v) = kv.map_err(backend)?;
        let first = u64_at(&k, data_prefix(b'J', self.id).len())?;
        let live: ChunkLive = codec::decode(&|| show_key(&k), &v)?;
        if pos >= first + u64::from(live.len) {
            return Ok(None);
        }
        self.chunks.insert(first, (live, false));
        Ok(Some(first))
    }

    /// Whether a stored position (one of an earlier checkpoint) is still in the frontier.
    fn is_live(&mut self, db: &sled::Db, pos: u64) -> StoreResult<bool> {
        Ok(match self.chunk_of(db, pos)? {
            Some(first) => self.chunks[&first].0.is_live(pos - first),
            None => false,
        })
    }

    /// Whether the stored entry at `pos` (one of an earlier checkpoint) is `url`'s, read from its
    /// chunk. Returns the chunk's first position when it is.
    fn holds(&mut self, db: &sled::Db, pos: u64, url: &str) -> StoreResult<Option<u64>> {
        let Some(first) = self.chunk_of(db, pos)? else {
            return Ok(None);
        };
        if !self.entries.contains_key(&first) {
            let Some(entries) = read(db, &k_chunk(b'B', self.id, first))? else {
                return Ok(None);
            };
            self.entries.insert(first, entries);
        }
        let at = self.entries[&first].get((pos - first) as usize);
        Ok(at.filter(|e| e.url == url).map(|_| first))
    }
}
fn k_agent_def(client: &str, name: &str) -> Vec<u8> {
    let mut k = lp_prefix(b'N', client);
    k.extend_from_slice(name.as_bytes());
    k
}

/// Every index key the session has in its current state, except `W`/`P` (whose presence depends
/// on promotion, not on the session).
fn index_keys(s: &Session) -> Vec<Vec<u8>> {
    let mut keys = vec![k_global(s), k_client(s), k_status(s)];
    if let Some(agent) = &s.job.agent {
        keys.push(k_agent(agent, s));
        if s.status.is_active() {
            keys.push(k_active(s.client.client_id(), agent, &s.id));
        }
    }
    if let (SessionStatus::Running, Some(lease)) = (s.status, &s.lease) {
        keys.push(k_lease(lease.expires_at, &s.id));
    }
    if let (true, Some(at)) = (s.status.is_terminal(), s.cleanup_at) {
        keys.push(k_cleanup(at, &s.id));
    }
    keys
}

fn show_key(k: &[u8]) -> String {
    k.escape_ascii().to_string()
}

fn corrupt_key(k: &[u8], reason: &str) -> StoreError {
    StoreError::Corrupt {
        key: show_key(k),
        reason: reason.into(),
    }
}

/// The session id at the end of an index key, after `fixed` bytes.
fn id_after(k: &[u8], fixed: usize) -> StoreResult<SessionId> {
    let tail = k
        .get(fixed..)
        .ok_or_else(|| corrupt_key(k, "index key too short"))?;
    let text = std::str::from_utf8(tail).map_err(|_| corrupt_key(k, "session id is not UTF-8"))?;
    SessionId::parse(text).map_err(|e| corrupt_key(k, &format!("bad session id: {e}")))
}

fn u64_at(k: &[u8], at: usize) -> StoreResult<u64> {
    k.get(at..at + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| corrupt_key(k, "index key too short"))
}

/// The upper bound (exclusive) of keys `prefix ts(t) ...`: every id byte is below 0xFF.
fn upto(prefix: &[u8], t: Timestamp) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(&ts(t));
    k.push(0xFF);
    k
}

fn record_json(k: &[u8], text: &str) -> StoreResult<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| corrupt_key(k, &format!("record is not JSON: {e}")))
}

fn validate_terminal(status: SessionStatus) -> StoreResult<()> {
    if status.is_terminal() {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "a session can only finish COMPLETED, FAILED or CANCELLED, not {status}"
        )))
    }
}

impl SledStore {
    /// Opens (or creates) the store in `path`. A store written by a newer harvest is refused with
    /// [`StoreError::NewerVersion`]; removals interrupted by a crash are finished here.
    pub fn open(path: &Path) -> StoreResult<SledStore> {
        let db = sled::Config::new()
            .path(path)
            .flush_every_ms(None)
            .cache_capacity(CACHE_BYTES)
            .open()
            .map_err(|e| {
                StoreError::Backend(format!("opening the sled store at {}: {e}", path.display()))
            })?;
        let what = || format!("the sled store at {}", path.display());
        match db.get(META_KEY).map_err(backend)? {
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
                    db.insert(META_KEY, codec::encode(&LAYOUT_VERSION)?)
                        .map_err(backend)?;
                    db.flush().map_err(backend)?;
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
                db.flush().map_err(backend)?;
            }
        }
        replay_intents(&db)?;
        let counters: Counters = match db.get(COUNTERS_KEY).map_err(backend)? {
            Some(bytes) => codec::decode(&|| "\\0counters".into(), &bytes)?,
            None => {
                return Err(corrupt_key(
                    COUNTERS_KEY,
                    "missing although the meta key exists",
                ));
            }
        };
        let (state, _) = watch::channel(Flushed::default());
        let durability = Arc::new(Durability {
            written: AtomicU64::new(0),
            dirty: Mutex::new(false),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            flushes: AtomicU64::new(0),
            state,
        });
        let mut disk = DiskSync::open(path).map_err(|e| {
            StoreError::Backend(format!(
                "opening the sled store at {} for syncing: {e}",
                path.display()
            ))
        })?;
        let flusher = {
            let durability = durability.clone();
            let db = db.clone();
            std::thread::Builder::new()
                .name("harvest-sled-flush".into())
                .spawn(move || {
                    let run = std::panic::AssertUnwindSafe(|| durability.run(&db, &mut disk));
                    if std::panic::catch_unwind(run).is_err() {
                        // Fail every waiting and future write rather than leave them hanging.
                        durability.state.send_modify(|f| {
                            f.failed_upto = u64::MAX;
                            f.error = Some("the flusher thread panicked".into());
                        });
                    }
                })
                .map_err(|e| {
                    StoreError::Backend(format!("starting the sled flusher thread: {e}"))
                })?
        };
        let store = SledStore {
            db,
            path: path.to_path_buf(),
            write: Mutex::new(counters),
            durability,
            flusher: Some(flusher),
            pending: Notify::new(),
            intent_seq: AtomicU64::new(1),
            poisoned: AtomicBool::new(false),
            leaders: std::sync::Mutex::new(std::collections::HashMap::new()),
        };
        store.purge_interrupted()?;
        Ok(store)
    }

    /// Flushes done by the group-commit thread since open (each acknowledges every write applied
    /// before it started): writes / flushes is the group-commit batching factor.
    pub fn flush_count(&self) -> u64 {
        self.durability.flushes.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Counters> {
        // A panic while holding the lock cannot leave a half-applied batch (batches are atomic),
        // and the counters are only replaced after a successful apply, so the state is sound.
        self.write.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `b` with the new counters; returns the durability ticket.
    fn commit(&self, st: &mut Counters, next: Counters, b: Batch) -> StoreResult<u64> {
        self.apply(st, next, b)?;
        Ok(self.durability.ticket())
    }

    /// Applies `b` with the new counters without asking for a flush (claims and heartbeats:
    /// see the module docs); the next flush makes it durable.
    fn apply(&self, st: &mut Counters, next: Counters, mut b: Batch) -> StoreResult<()> {
        b.insert(COUNTERS_KEY, codec::encode(&next)?);
        self.apply_atomic(b)?;
        *st = next;
        Ok(())
    }

    /// Applies a batch atomically with respect to crashes, without sled's `apply_batch`: that one
    /// takes sled's concurrency-control write lock, which a running `flush` holds off for its
    /// whole fsync, so no write could proceed while a flush ran. Instead the batch is first
    /// written as one intent key (a single insert is atomic), then applied key by key, then the
    /// intent is removed. sled recovers a prefix of its operations, so after a crash the intents
    /// still present are exactly the batches that may be partly applied, in order; [`open`]
    /// applies them again (the same values: idempotent). Callers hold the store mutex, so
    /// batches never interleave.
    ///
    /// If a write fails after the intent is stored, the batch is half applied and its intent
    /// would be replayed over newer data at the next open: the store refuses every later write
    /// until it is reopened (which completes the batch).
    fn apply_atomic(&self, b: Batch) -> StoreResult<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(StoreError::Backend(
                "an earlier write failed half-way; restart harvest to complete it before writing more"
                    .into(),
            ));
        }
        // Loose keys (records beyond the committed count) are invisible until the intent's
        // changes are in, so a failure here leaves nothing a reader or a replay would see.
        for (k, v) in &b.loose {
            match v {
                Some(v) => self.db.insert(k, v.clone()).map_err(backend)?,
                None => self.db.remove(k).map_err(backend)?,
            };
        }
        let seq = self.intent_seq.fetch_add(1, Ordering::Relaxed);
        let key = k_intent(seq);
        self.db.insert(&key, b.encode()).map_err(backend)?;
        let applied = b
            .apply_to(&self.db)
            .and_then(|()| self.db.remove(&key).map(|_| ()).map_err(backend));
        if applied.is_err() {
            self.poisoned.store(true, Ordering::Release);
            tracing::error!("a sled write failed half-way; refusing further writes until restart");
        }
        applied
    }

    fn load(&self, id: &SessionId) -> StoreResult<Option<Session>> {
        match self.db.get(k_session(id)).map_err(backend)? {
            Some(bytes) => Ok(Some(codec::decode(&|| key_name("sessions", id), &bytes)?)),
            None => Ok(None),
        }
    }

    /// The session when it is RUNNING with this attempt and owner.
    fn load_running(&self, a: &super::AttemptRef) -> StoreResult<Option<Session>> {
        Ok(self.load(&a.id)?.filter(|s| {
            s.status == SessionStatus::Running
                && s.attempt == a.attempt
                && s.lease.as_ref().is_some_and(|l| l.owner == a.owner)
        }))
    }

    /// Stages `new` (replacing `old`): the value, index changes and status counters.
    fn stage(
        c: &mut Counters,
        b: &mut Batch,
        old: Option<&Session>,
        new: &Session,
    ) -> StoreResult<()> {
        let new_keys = index_keys(new);
        let old_keys = old.map(index_keys).unwrap_or_default();
        for k in &old_keys {
            if !new_keys.contains(k) {
                b.remove(k.as_slice());
            }
        }
        for k in new_keys {
            if !old_keys.contains(&k) {
                b.insert(k, IVec::default());
            }
        }
        if let Some(old) = old {
            let slot = &mut c.by_status[old.status.code() as usize];
            *slot = slot.saturating_sub(1);
        }
        c.by_status[new.status.code() as usize] += 1;
        b.insert(k_session(&new.id), codec::encode(new)?);
        Ok(())
    }

    /// Stages taking a PENDING session out of the claim queue (`W` or `P`).
    fn unqueue(&self, c: &mut Counters, b: &mut Batch, s: &Session) -> StoreResult<()> {
        let p = k_pending_of(s);
        if self.db.contains_key(&p).map_err(backend)? {
            c.due = c.due.saturating_sub(1);
            b.remove(p);
        }
        b.remove(k_wait(s));
        Ok(())
    }

    /// Stages a checkpoint's writes into `b` and `s`.
    fn stage_batch(
        &self,
        b: &mut Batch,
        s: &mut Session,
        batch: &CheckpointBatch,
    ) -> StoreResult<()> {
        let id = s.id.clone();
        let first = s.metrics.processed_elements;
        if !batch.records.is_empty() {
            // A crashed checkpoint's chunks (at or after the committed count) go first: a chunk
            // left there could otherwise overlap the ones written now.
            for kv in self.db.range(k_chunk(b'E', &id, first)..) {
                let (k, _) = kv.map_err(backend)?;
                if !k.starts_with(&data_prefix(b'E', &id)) {
                    break;
                }
                b.loose.push((k, None));
            }
            let mut chunk: Vec<String> = Vec::new();
            let mut chunk_first = first;
            let mut bytes = 0;
            for (i, record) in batch.records.iter().enumerate() {
                let text = serde_json::to_string(record).map_err(|e| {
                    StoreError::Invalid(format!("record {i} is not valid JSON: {e}"))
                })?;
                bytes += text.len();
                chunk.push(text);
                if chunk.len() >= RECORD_CHUNK_MAX || bytes >= RECORD_CHUNK_BYTES {
                    let k = k_chunk(b'E', &id, chunk_first);
                    b.loose
                        .push((k.into(), Some(codec::encode(&chunk)?.into())));
                    chunk_first += chunk.len() as u64;
                    chunk.clear();
                    bytes = 0;
                }
            }
            if !chunk.is_empty() {
                let k = k_chunk(b'E', &id, chunk_first);
                b.loose
                    .push((k.into(), Some(codec::encode(&chunk)?.into())));
            }
        }
        self.stage_frontier(b, &id, batch)?;
        if !batch.log.is_empty() {
            self.stage_log(b, &id, &batch.log)?;
        }
        s.metrics.processed_elements = first + batch.records.len() as u64;
        s.metrics.pages_processed += batch.pages;
        s.usage += batch.usage;
        Ok(())
    }

    /// Stages frontier additions (at the session's next positions), removals (after the
    /// additions: a URL found and done in the same batch ends up done) and seen-set additions.
    /// See "Crawl state" in the module doc.
    fn stage_frontier(
        &self,
        b: &mut Batch,
        id: &SessionId,
        batch: &CheckpointBatch,
    ) -> StoreResult<()> {
        if batch.frontier_add.is_empty()
            && batch.frontier_done.is_empty()
            && batch.seen_add.is_empty()
        {
            return Ok(());
        }
        let k_next = data_prefix(b'K', id);
        let start: u64 = read(&self.db, &k_next)?.unwrap_or(1);
        let mut st = FrontierStage {
            id,
            urls: std::collections::HashMap::new(),
            chunks: std::collections::BTreeMap::new(),
            entries: std::collections::HashMap::new(),
        };
        // Lookups by URL need the `U` index to cover every committed chunk; brought up to date
        // once, on the first lookup (the engine's batches need none).
        let mut caught_up = false;
        let mut lookup = |st: &mut FrontierStage<'_>| -> StoreResult<()> {
            if !caught_up {
                caught_up = true;
                while !self.index_step(st.id, usize::MAX)? {}
            }
            Ok(())
        };
        let new_urls: std::collections::HashSet<&str> =
            batch.seen_add.iter().map(String::as_str).collect();
        // Additions of this batch by URL, to their position.
        let mut here: std::collections::HashMap<&str, u64> =
            std::collections::HashMap::with_capacity(batch.frontier_add.len());
        let mut added: Vec<&FrontierEntry> = Vec::new();
        for e in &batch.frontier_add {
            if here.contains_key(e.url.as_str()) {
                continue; // added earlier in this batch: keeps its place
            }
            if !new_urls.contains(e.url.as_str()) {
                lookup(&mut st)?;
                let u = st.url(&self.db, &e.url)?;
                if let Some(pos) = u.pos
                    && st.is_live(&self.db, pos)?
                {
                    continue; // already in the frontier: keeps its place
                }
                st.set_url(
                    &e.url,
                    UrlState {
                        seen: u.seen,
                        pos: Some(start + added.len() as u64),
                    },
                );
            }
            // New to the session (see `CheckpointBatch::frontier_add`): indexed in `U` later,
            // from its chunk.
            here.insert(&e.url, start + added.len() as u64);
            added.push(e);
        }
        let mut new_live = vec![true; added.len()];
        for done in &batch.frontier_done {
            // The position hint, checked against the entry there.
            if let Some(pos) = done.pos {
                if pos >= start {
                    if let Some(e) = added.get((pos - start) as usize)
                        && e.url == done.url
                    {
                        new_live[(pos - start) as usize] = false;
                        continue;
                    }
                } else if let Some(first) = st.holds(&self.db, pos, &done.url)?
                    && let Some((live, changed)) = st.chunks.get_mut(&first)
                    && live.is_live(pos - first)
                {
                    live.clear(pos - first);
                    *changed = true;
                    continue;
                }
                // Not live there (done already): the URL may still be live elsewhere.
            }
            if let Some(pos) = here.get(done.url.as_str()) {
                new_live[(pos - start) as usize] = false;
                continue;
            }
            lookup(&mut st)?;
            let Some(pos) = st.url(&self.db, &done.url)?.pos else {
                continue;
            };
            if pos >= start {
                continue; // set above: one of this batch's, found in `here`
            }
            if let Some(first) = st.chunk_of(&self.db, pos)?
                && let Some((live, changed)) = st.chunks.get_mut(&first)
                && live.is_live(pos - first)
            {
                live.clear(pos - first);
                *changed = true;
            }
        }
        for url in &batch.seen_add {
            if here.contains_key(url.as_str()) {
                continue; // indexed from its chunk
            }
            lookup(&mut st)?;
            let u = st.url(&self.db, url)?;
            if !u.seen {
                st.set_url(url, UrlState { seen: true, ..u });
            }
        }
        for (url, (u, changed)) in &st.urls {
            if !changed {
                continue;
            }
            let k = k_url(b'U', id, url);
            match u.encode() {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        // Read after any catch-up above.
        let (indexed, _) = self.index_range(id)?;
        for (first, (live, changed)) in &st.chunks {
            if !changed {
                continue;
            }
            // A chunk not yet indexed stays, done or not: it is the seen set's record of its URLs.
            if live.count() == 0 && *first < indexed {
                b.remove(k_chunk(b'B', id, *first));
                b.remove(k_chunk(b'J', id, *first));
            } else {
                b.insert(k_chunk(b'J', id, *first), codec::encode(live)?);
            }
        }
        for (i, (entries, live)) in added
            .chunks(CHUNK_ENTRIES)
            .zip(new_live.chunks(CHUNK_ENTRIES))
            .enumerate()
        {
            let first = start + (i * CHUNK_ENTRIES) as u64;
            b.insert(k_chunk(b'B', id, first), codec::encode(&entries)?);
            b.insert(
                k_chunk(b'J', id, first),
                codec::encode(&ChunkLive::new(live))?,
            );
        }
        if !added.is_empty() {
            b.insert(k_next, codec::encode(&(start + added.len() as u64))?);
        }
        Ok(())
    }

    /// `I` and `K` of `id`: the index covers the frontier positions before the first, the
    /// next addition takes the second.
    fn index_range(&self, id: &SessionId) -> StoreResult<(u64, u64)> {
        let indexed = read(&self.db, &data_prefix(b'I', id))?.unwrap_or(1);
        let next = read(&self.db, &data_prefix(b'K', id))?.unwrap_or(1);
        Ok((indexed, next))
    }

    /// Indexes in `U` up to `max_chunks` frontier chunks the index does not cover yet (see
    /// "Crawl state" in the module doc). Returns whether the index now covers every chunk.
    /// Callers hold the store mutex.
    ///
    /// Not atomic, and need not be: `U` and `I` are derived from the committed chunks, written
    /// in order (the `U` keys, then `I`, then the removal of chunks all done), so a crash
    /// leaves an index that is behind, never wrong, and this redoes the rest. An entry whose URL
    /// has a `U` position at or after the entry's own was written there since (or by an earlier
    /// run of this): it is left as it is.
    fn index_step(&self, id: &SessionId, max_chunks: usize) -> StoreResult<bool> {
        let k_indexed = data_prefix(b'I', id);
        let (from, next) = self.index_range(id)?;
        if from >= next {
            return Ok(true);
        }
        let prefix = data_prefix(b'B', id);
        let mut upto = from;
        let mut dead = Vec::new();
        let mut chunks = 0;
        for kv in self
            .db
            .range(k_chunk(b'B', id, from)..k_chunk(b'B', id, next))
        {
            if chunks == max_chunks {
                break;
            }
            chunks += 1;
            let (k, v) = kv.map_err(backend)?;
            let first = u64_at(&k, prefix.len())?;
            let entries: Vec<FrontierEntry> = codec::decode(&|| show_key(&k), &v)?;
            for (i, e) in entries.iter().enumerate() {
                let pos = first + i as u64;
                let old = read_url(&self.db, id, &e.url)?;
                if old.pos.is_some_and(|p| p >= pos) {
                    continue;
                }
                let now = UrlState {
                    seen: true,
                    pos: Some(pos),
                };
                if let Some(v) = now.encode() {
                    self.db
                        .insert(k_url(b'U', id, &e.url), v)
                        .map_err(backend)?;
                }
            }
            let live: Option<ChunkLive> = read(&self.db, &k_chunk(b'J', id, first))?;
            if live.is_some_and(|l| l.count() == 0) {
                dead.push(first);
            }
            upto = first + entries.len() as u64;
        }
        let done = chunks < max_chunks || upto >= next;
        let upto = if done { next } else { upto };
        self.db
            .insert(&k_indexed, codec::encode(&upto)?)
            .map_err(backend)?;
        for first in dead {
            self.db.remove(k_chunk(b'B', id, first)).map_err(backend)?;
            self.db.remove(k_chunk(b'J', id, first)).map_err(backend)?;
        }
        Ok(done)
    }

    /// Brings the `U` index up to date before a commit that will look URLs up (one not shaped
    /// like the engine's: additions not all new, or done URLs without a position), a few chunks
    /// per hold of the store mutex, rather than all at once under it in `stage_frontier`.
    fn index_before(&self, id: &SessionId, batch: &CheckpointBatch) -> StoreResult<()> {
        let lookups = batch.frontier_add.len() != batch.seen_add.len()
            || batch.frontier_done.iter().any(|d| d.pos.is_none());
        if lookups && self.index_behind(id)? {
            blocking(|| self.index_catch_up(id))?;
        }
        Ok(())
    }

    /// Whether some committed frontier chunks of `id` are not indexed in `U` yet.
    fn index_behind(&self, id: &SessionId) -> StoreResult<bool> {
        let (from, next) = self.index_range(id)?;
        Ok(from < next)
    }

    /// Brings the `U` index of `id` up to date, a few chunks at a time so that commits of other
    /// sessions are not held off for long.
    fn index_catch_up(&self, id: &SessionId) -> StoreResult<()> {
        // Bounded by the session's chunks (each round indexes up to INDEX_STEP of them, and only
        // this session's commits add more).
        for _ in 0..(1u64 << 32) {
            let _st = self.lock();
            if self.index_step(id, INDEX_STEP)? {
                break;
            }
        }
        Ok(())
    }

    fn stage_log(&self, b: &mut Batch, id: &SessionId, lines: &[LogLine]) -> StoreResult<()> {
        let prefix = data_prefix(b'O', id);
        let next = match self.db.scan_prefix(&prefix).next_back() {
            Some(kv) => u64_at(&kv.map_err(backend)?.0, prefix.len())? + 1,
            None => 0,
        };
        let end = next + lines.len() as u64;
        let keep_from = end.saturating_sub(LOG_LINES_MAX);
        for (i, line) in lines.iter().enumerate() {
            let n = next + i as u64;
            if n >= keep_from {
                b.insert(k_log(id, n), codec::encode(line)?);
            }
        }
        // Older lines beyond the cap: at most `lines.len()` of them, since the cap always held.
        for kv in self.db.range(prefix.clone()..k_log(id, keep_from)) {
            b.remove(kv.map_err(backend)?.0);
        }
        Ok(())
    }

    /// Moves due sessions from `W` to `P` (at most [`PROMOTE_MAX`]).
    fn promote(&self, st: &mut Counters, now: Timestamp) -> StoreResult<()> {
        let mut c = st.clone();
        let mut b = Batch::default();
        let mut moved = 0;
        for kv in self.db.range(vec![b'W']..upto(b"W", now)).take(PROMOTE_MAX) {
            let (k, _) = kv.map_err(backend)?;
            // W run_at(8) seq(8) prio(4) id
            let (Some(run_at), Some(seq), Some(prio)) = (k.get(1..9), k.get(9..17), k.get(17..21))
            else {
                tracing::warn!(key = %show_key(&k), "dropping a malformed scheduled-index key");
                b.remove(k);
                continue;
            };
            let id = k.get(21..).unwrap_or_default();
            let (Ok(run_at), Ok(seq), Ok(prio)) =
                (run_at.try_into(), seq.try_into(), prio.try_into())
            else {
                continue;
            };
            b.insert(k_pending(prio, run_at, seq, id), IVec::default());
            b.remove(k);
            c.due += 1;
            moved += 1;
        }
        if moved > 0 {
            // Promotion alone need not be durable: if lost, the next claim redoes it.
            b.insert(COUNTERS_KEY, codec::encode(&c)?);
            self.apply_atomic(b)?;
            *st = c;
        }
        Ok(())
    }

    /// Removes a session and, in bounded chunks, all its data. Returns it and the ticket.
    fn remove_sync(&self, id: &SessionId) -> StoreResult<(Option<Session>, Option<u64>)> {
        let removed = {
            let mut st = self.lock();
            let Some(s) = self.load(id)? else {
                return Ok((None, None));
            };
            let mut c = st.clone();
            let mut b = Batch::default();
            for k in index_keys(&s) {
                b.remove(k);
            }
            if s.status == SessionStatus::Pending {
                self.unqueue(&mut c, &mut b, &s)?;
            }
            let slot = &mut c.by_status[s.status.code() as usize];
            *slot = slot.saturating_sub(1);
            b.remove(k_session(id));
            b.insert(k_tombstone(id), IVec::default());
            self.commit(&mut st, c, b)?;
            s
        };
        let ticket = self.purge(id)?;
        Ok((Some(removed), Some(ticket)))
    }

    /// Deletes a terminal session's records, in chunks.
    fn remove_records(&self, id: &SessionId) -> StoreResult<()> {
        for tag in [b'R', b'E'] {
            let prefix = data_prefix(tag, id);
            // Bounded like `purge`.
            for _ in 0..(1u64 << 32) {
                let _st = self.lock();
                let mut b = Batch::default();
                let mut n = 0;
                for kv in self.db.scan_prefix(&prefix).take(PURGE_CHUNK) {
                    b.remove(kv.map_err(backend)?.0);
                    n += 1;
                }
                if n == 0 {
                    break;
                }
                self.apply_atomic(b)?;
            }
        }
        Ok(())
    }

    /// [`Store::sessions_expire`] without the wait: the removed sessions and the last ticket.
    fn expire_sync(&self, p: &SessionsExpire) -> StoreResult<(Vec<Session>, Option<u64>)> {
        let mut due = Vec::new();
        for kv in self.db.range(vec![b'X']..upto(b"X", p.now)).take(p.limit) {
            let (k, _) = kv.map_err(backend)?;
            match id_after(&k, 1 + 8) {
                Ok(id) => due.push((k, id)),
                Err(e) => tracing::warn!(error = %e, "skipping a malformed cleanup-index key"),
            }
        }
        let mut removed = Vec::new();
        let mut last = None;
        for (k, id) in due {
            match self.remove_sync(&id) {
                Ok((Some(s), t)) => {
                    removed.push(s);
                    last = t.or(last);
                }
                Ok((None, _)) => {
                    // A stale entry whose session is gone: drop it.
                    let _st = self.lock();
                    self.db.remove(k).map_err(backend)?;
                }
                Err(e) => tracing::warn!(session = %id, error = %e, "could not expire a session"),
            }
        }
        Ok((removed, last))
    }

    /// Deletes a removed session's data keyspaces in chunks, then its tombstone.
    fn purge(&self, id: &SessionId) -> StoreResult<u64> {
        for tag in [
            b'R', b'E', b'B', b'J', b'Q', b'V', b'K', b'I', b'F', b'U', b'O',
        ] {
            let prefix = data_prefix(tag, id);
            // Each round deletes up to PURGE_CHUNK keys; 1 << 32 rounds bound the loop far beyond
            // any real session.
            for _ in 0..(1u64 << 32) {
                let _st = self.lock();
                let mut b = Batch::default();
                let mut n = 0;
                for kv in self.db.scan_prefix(&prefix).take(PURGE_CHUNK) {
                    b.remove(kv.map_err(backend)?.0);
                    n += 1;
                }
                if n == 0 {
                    break;
                }
                self.apply_atomic(b)?;
            }
        }
        let _st = self.lock();
        self.db.remove(k_tombstone(id)).map_err(backend)?;
        Ok(self.durability.ticket())
    }

    fn purge_interrupted(&self) -> StoreResult<()> {
        let mut ids = Vec::new();
        for kv in self.db.scan_prefix(b"Z") {
            let (k, _) = kv.map_err(backend)?;
            match id_after(&k, 1) {
                Ok(id) => ids.push(id),
                Err(e) => tracing::warn!(error = %e, "skipping a malformed removal marker"),
            }
        }
        for id in ids {
            tracing::info!(session = %id, "finishing the removal of a session's data");
            self.purge(&id)?;
        }
        self.db.flush().map_err(backend)?;
        Ok(())
    }

    /// Ends a RUNNING session as FAILED after its last attempt (stages into `b`).
    fn fail(s: &mut Session, error: Option<SessionError>, cleanup_at: Timestamp, now: Timestamp) {
        s.status = SessionStatus::Failed;
        s.error = error;
        s.lease = None;
        s.cleanup_at = Some(cleanup_at);
        s.metrics.end_time = Some(now);
    }

    /// Back to PENDING, due at `run_at` (caller stages `W`).
    fn back_to_pending(s: &mut Session, run_at: Timestamp) {
        s.status = SessionStatus::Pending;
        s.lease = None;
        s.run_at = run_at;
    }

    fn list_sync(&self, p: &SessionList) -> StoreResult<SessionPage> {
        if p.limit == 0 || p.limit > LIST_LIMIT_MAX {
            return Err(StoreError::Invalid(format!(
                "list limit {} is out of range; use 1 to {LIST_LIMIT_MAX}",
                p.limit
            )));
        }
        let cursor = match &p.cursor {
            Some(c) => Some(c.parse::<u64>().map_err(|_| {
                StoreError::Invalid(format!(
                    "cursor {c:?} is not one this store returned; pass a next_cursor as is"
                ))
            })?),
            None => None,
        };
        // The most selective index available; the other filters are checked on each session.
        let prefix = if let Some(client) = &p.client_id {
            lp_prefix(b'C', client)
        } else if let Some(agent) = &p.agent {
            lp_prefix(b'A', agent)
        } else if let Some(status) = p.status {
            status_prefix(status)
        } else {
            vec![b'G']
        };
        let start = match cursor {
            Some(seq) => {
                let mut k = prefix.clone();
                k.extend_from_slice(&newest(seq));
                k.push(0xFF);
                Bound::Excluded(k)
            }
            None => Bound::Included(prefix.clone()),
        };
        let mut sessions = Vec::new();
        let mut more = false;
        for kv in self.db.range::<Vec<u8>, _>((start, Bound::Unbounded)) {
            let (k, _) = kv.map_err(backend)?;
            if !k.starts_with(&prefix) {
                break;
            }
            let id = match id_after(&k, prefix.len() + 8) {
                Ok(id) => id,
                Err(e) => {
                    tracing::warn!(error = %e, "skipping a malformed list-index key");
                    continue;
                }
            };
            let s = match self.load(&id) {
                Ok(Some(s)) => s,
                Ok(None) => continue, // removed since the index was read
                Err(e) => {
                    tracing::warn!(error = %e, "skipping an unreadable session in a listing");
                    continue;
                }
            };
            let keep = p
                .client_id
                .as_deref()
                .is_none_or(|c| c == s.client.client_id())
                && p.status.is_none_or(|st| st == s.status)
                && p.agent
                    .as_ref()
                    .is_none_or(|a| s.job.agent.as_ref() == Some(a));
            if !keep {
                continue;
            }
            if sessions.len() == p.limit {
                more = true;
                break;
            }
            sessions.push(s);
        }
        let next_cursor = if more {
            sessions.last().map(|s: &Session| s.seq.to_string())
        } else {
            None
        };
        Ok(SessionPage {
            sessions,
            next_cursor,
        })
    }

    fn resume_sync(&self, id: &SessionId) -> StoreResult<ResumeState> {
        let s = self.load(id)?.ok_or_else(|| {
            StoreError::Invalid(format!("no session {id} to resume; it was removed"))
        })?;
        // One small bitmap per chunk of entries: counting reads no entries.
        let mut frontier_len = 0u64;
        for kv in self.db.scan_prefix(data_prefix(b'J', id)) {
            let (k, v) = kv.map_err(backend)?;
            let live: ChunkLive = codec::decode(&|| show_key(&k), &v)?;
            frontier_len += live.count();
        }
        Ok(ResumeState {
            frontier_len,
            frontier_next: read(&self.db, &data_prefix(b'K', id))?.unwrap_or(1),
            records: s.metrics.processed_elements,
            metrics: s.metrics,
            usage: s.usage,
        })
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        self.durability.shutdown.store(true, Ordering::SeqCst);
        {
            let _dirty = self
                .durability
                .dirty
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            self.durability.wake.notify_one();
        }
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

    async fn session_insert(&self, p: SessionInsert) -> StoreResult<InsertOutcome> {
        let mut s = p.session;
        if s.status != SessionStatus::Pending {
            return Err(StoreError::Invalid(format!(
                "a new session must be PENDING, not {}",
                s.status
            )));
        }
        let ticket = {
            let mut st = self.lock();
            if self.db.contains_key(k_session(&s.id)).map_err(backend)?
                || self.db.contains_key(k_tombstone(&s.id)).map_err(backend)?
            {
                return Err(StoreError::Duplicate(s.id));
            }
            if let Some(agent) = &p.single_agent {
                let prefix = active_prefix(s.client.client_id(), agent);
                if let Some(kv) = self.db.scan_prefix(&prefix).next() {
                    let (k, _) = kv.map_err(backend)?;
                    return Ok(InsertOutcome::AgentBusy(id_after(&k, prefix.len())?));
                }
            }
            let mut c = st.clone();
            s.seq = c.next_seq;
            c.next_seq += 1;
            let mut b = Batch::default();
            Self::stage(&mut c, &mut b, None, &s)?;
            b.insert(k_wait(&s), IVec::default());
            self.commit(&mut st, c, b)?
        };
        self.durability.wait(ticket).await?;
        self.pending.notify_one();
        Ok(InsertOutcome::Inserted(Box::new(s)))
    }

    async fn session_get(&self, id: &SessionId) -> StoreResult<Option<Session>> {
        self.load(id)
    }

    async fn session_list(&self, p: SessionList) -> StoreResult<SessionPage> {
        self.list_sync(&p)
    }

    async fn session_claim(&self, p: SessionClaim) -> StoreResult<Vec<Session>> {
        if p.limit == 0 {
            return Ok(Vec::new());
        }
        let claimed = {
            let mut st = self.lock();
            self.promote(&mut st, p.now)?;
            let mut c = st.clone();
            let mut b = Batch::default();
            let mut claimed = Vec::new();
            let mut changed = false;
            for kv in self.db.scan_prefix(b"P") {
                if claimed.len() >= p.limit {
                    break;
                }
                let (k, _) = kv.map_err(backend)?;
                let old = match id_after(&k, 1 + 4 + 8 + 8).and_then(|id| self.load(&id)) {
                    Ok(Some(s)) if s.status == SessionStatus::Pending => s,
                    other => {
                        // Unclaimable: drop it from the queue so no claim scans it again.
                        if let Err(e) = other {
                            tracing::warn!(error = %e, "dropping an unreadable session from the queue");
                        }
                        b.remove(k);
                        c.due = c.due.saturating_sub(1);
                        changed = true;
                        continue;
                    }
                };
                b.remove(k);
                c.due = c.due.saturating_sub(1);
                let mut s = old.clone();
                s.status = SessionStatus::Running;
                s.attempt += 1;
                s.lease = Some(Lease {
                    owner: p.owner.clone(),
                    expires_at: p.now.add(p.lease),
                });
                s.progress_this_attempt = false;
                s.metrics.start_time = Some(p.now);
                s.updated_at = p.now;
                Self::stage(&mut c, &mut b, Some(&old), &s)?;
                changed = true;
                claimed.push(s);
            }
            if changed {
                self.apply(&mut st, c, b)?;
            }
            claimed
        };
        Ok(claimed)
    }

    async fn session_heartbeat_if_running(
        &self,
        p: SessionHeartbeat,
    ) -> StoreResult<HeartbeatOutcome> {
        let mut st = self.lock();
        let Some(old) = self.load_running(&p.attempt)? else {
            return Ok(HeartbeatOutcome::Lost);
        };
        let mut s = old.clone();
        if let Some(lease) = &mut s.lease {
            lease.expires_at = p.now.add(p.lease);
        }
        s.updated_at = p.now;
        let mut c = st.clone();
        let mut b = Batch::default();
        Self::stage(&mut c, &mut b, Some(&old), &s)?;
        self.apply(&mut st, c, b)?;
        Ok(HeartbeatOutcome::Renewed {
            cancel_requested: s.cancel_requested,
        })
    }

    async fn checkpoint_commit_if_running(&self, p: CheckpointCommit) -> StoreResult<bool> {
        self.index_before(&p.attempt.id, &p.batch)?;
        let ticket = {
            let mut st = self.lock();
            let Some(old) = self.load_running(&p.attempt)? else {
                return Ok(false);
            };
            let mut s = old.clone();
            let mut b = Batch::default();
            self.stage_batch(&mut b, &mut s, &p.batch)?;
            s.progress_this_attempt = true;
            s.checkpoints += 1;
            if let Some(lease) = &mut s.lease {
                lease.expires_at = p.now.add(p.lease);
            }
            s.updated_at = p.now;
            let mut c = st.clone();
            Self::stage(&mut c, &mut b, Some(&old), &s)?;
            self.commit(&mut st, c, b)?
        };
        self.durability.wait(ticket).await?;
        Ok(true)
    }

    async fn session_finish_if_running(&self, p: SessionFinish) -> StoreResult<bool> {
        validate_terminal(p.status)?;
        self.index_before(&p.attempt.id, &p.batch)?;
        let ticket = {
            let mut st = self.lock();
            let Some(old) = self.load_running(&p.attempt)? else {
                return Ok(false);
            };
            let mut s = old.clone();
            let mut b = Batch::default();
            if !p.batch.is_empty() {
                self.stage_batch(&mut b, &mut s, &p.batch)?;
                s.progress_this_attempt = true;
                s.checkpoints += 1;
            }
            s.status = p.status;
            s.error = p.error;
            s.lease = None;
            s.cleanup_at = Some(p.cleanup_at);
            s.metrics.end_time = Some(p.now);
            s.updated_at = p.now;
            let mut c = st.clone();
            Self::stage(&mut c, &mut b, Some(&old), &s)?;
            self.commit(&mut st, c, b)?
        };
        self.durability.wait(ticket).await?;
        Ok(true)
    }

    async fn session_requeue_if_running(&self, p: SessionRequeue) -> StoreResult<RequeueOutcome> {
        let (outcome, ticket) = {
            let mut st = self.lock();
            let Some(old) = self.load_running(&p.attempt)? else {
                return Ok(RequeueOutcome::NotApplied);
            };
            let mut s = old.clone();
            let mut b = Batch::default();
            if p.spend_attempt {
                s.failures += 1;
            }
            s.updated_at = p.now;
            // A client asked to cancel while this attempt ran: honour it rather than run the
            // session again.
            let outcome = if s.cancel_requested {
                s.status = SessionStatus::Cancelled;
                s.lease = None;
                s.cleanup_at = Some(p.cleanup_at);
                s.metrics.end_time = Some(p.now);
                RequeueOutcome::Cancelled
            } else if s.failures >= s.max_attempts() {
                Self::fail(&mut s, p.error, p.cleanup_at, p.now);
                RequeueOutcome::Failed
            } else {
                s.error = p.error.or(s.error);
                Self::back_to_pending(&mut s, p.run_at);
                b.insert(k_wait(&s), IVec::default());
                RequeueOutcome::Requeued
            };
            let mut c = st.clone();
            Self::stage(&mut c, &mut b, Some(&old), &s)?;
            (outcome, self.commit(&mut st, c, b)?)
        };
        self.durability.wait(ticket).await?;
        if outcome == RequeueOutcome::Requeued {
            self.pending.notify_one();
        }
        Ok(outcome)
    }

    async fn leases_reclaim(&self, p: LeaseReclaim) -> StoreResult<Vec<Reclaimed>> {
        let (reclaimed, ticket) = {
            let mut st = self.lock();
            let mut c = st.clone();
            let mut b = Batch::default();
            let mut reclaimed = Vec::new();
            let mut changed = false;
            for kv in self.db.range(vec![b'L']..upto(b"L", p.expired_before)) {
                if reclaimed.len() >= p.limit {
                    break;
                }
                let (k, _) = kv.map_err(backend)?;
                let old = match id_after(&k, 1 + 8).and_then(|id| self.load(&id)) {
                    Ok(Some(s))
                        if s.status == SessionStatus::Running
                            && s.lease.as_ref().is_some_and(|l| {
                                l.expires_at <= p.expired_before
                                    && k_lease(l.expires_at, &s.id) == *k
                            }) =>
                    {
                        s
                    }
                    other => {
                        if let Err(e) = other {
                            tracing::warn!(error = %e, "dropping an unreadable session's lease entry");
                        }
                        b.remove(k);
                        changed = true;
                        continue;
                    }
                };
                changed = true;
                let mut s = old.clone();
                if !s.progress_this_attempt {
                    s.failures += 1;
                }
                s.updated_at = p.now;
                let outcome = if s.cancel_requested {
                    s.status = SessionStatus::Cancelled;
                    s.lease = None;
                    s.cleanup_at = Some(p.now.add(s.cleanup_after(p.cleanup_after)));
                    s.metrics.end_time = Some(p.now);
                    RequeueOutcome::Cancelled
                } else if s.failures >= s.max_attempts() {
                    let error = SessionError::new(
                        "attempts_exhausted",
                        format!(
                            "the lease of attempt {} expired after {} attempts without progress",
                            s.attempt, s.failures
                        ),
                    );
                    let cleanup_at = p.now.add(s.cleanup_after(p.cleanup_after));
                    Self::fail(&mut s, Some(error), cleanup_at, p.now);
                    RequeueOutcome::Failed
                } else {
                    Self::back_to_pending(&mut s, p.now.add(p.backoff));
                    b.insert(k_wait(&s), IVec::default());
                    RequeueOutcome::Requeued
                };
                Self::stage(&mut c, &mut b, Some(&old), &s)?;
                reclaimed.push(Reclaimed {
                    id: s.id.clone(),
                    attempt: old.attempt,
                    outcome,
                });
            }
            if !changed {
                return Ok(reclaimed);
            }
            (reclaimed, self.commit(&mut st, c, b)?)
        };
        self.durability.wait(ticket).await?;
        for r in &reclaimed {
            if r.outcome == RequeueOutcome::Requeued {
                self.pending.notify_one();
            }
        }
        Ok(reclaimed)
    }

    async fn session_cancel(&self, p: SessionCancel) -> StoreResult<CancelOutcome> {
        let (outcome, ticket) = {
            let mut st = self.lock();
            let Some(old) = self.load(&p.id)? else {
                return Ok(CancelOutcome::NotFound);
            };
            let mut s = old.clone();
            let mut c = st.clone();
            let mut b = Batch::default();
            let outcome = match old.status {
                SessionStatus::Pending => {
                    self.unqueue(&mut c, &mut b, &old)?;
                    s.status = SessionStatus::Cancelled;
                    s.cleanup_at = Some(p.now.add(s.cleanup_after(p.cleanup_after)));
                    s.metrics.end_time = Some(p.now);
                    s.updated_at = p.now;
                    CancelOutcome::Cancelled(Box::new(s.clone()))
                }
                SessionStatus::Running => {
                    if old.cancel_requested {
                        return Ok(CancelOutcome::Requested(Box::new(old)));
                    }
                    s.cancel_requested = true;
                    s.updated_at = p.now;
                    CancelOutcome::Requested(Box::new(s.clone()))
                }
                _ => return Ok(CancelOutcome::AlreadyTerminal(Box::new(old))),
            };
            Self::stage(&mut c, &mut b, Some(&old), &s)?;
            (outcome, self.commit(&mut st, c, b)?)
        };
        self.durability.wait(ticket).await?;
        // A claimer may be waiting for a slot this frees up (spurious wakeups are allowed).
        self.pending.notify_one();
        Ok(outcome)
    }

    async fn session_remove(&self, id: &SessionId) -> StoreResult<Option<Session>> {
        let (removed, ticket) = blocking(|| self.remove_sync(id))?;
        if let Some(t) = ticket {
            self.durability.wait(t).await?;
        }
        Ok(removed)
    }

    async fn records_remove_if_terminal(&self, id: &SessionId) -> StoreResult<bool> {
        {
            let _st = self.lock();
            match self.load(id)? {
                Some(s) if s.status.is_terminal() => {}
                _ => return Ok(false),
            }
        }
        // Terminal: no attempt writes records any more, so the chunks below race only with a
        // removal of the whole session, which deletes the same keys.
        blocking(|| self.remove_records(id))?;
        let ticket = self.durability.ticket();
        self.durability.wait(ticket).await?;
        Ok(true)
    }

    async fn sessions_expire(&self, p: SessionsExpire) -> StoreResult<Vec<Session>> {
        let (removed, last) = blocking(|| self.expire_sync(&p))?;
        if let Some(t) = last {
            self.durability.wait(t).await?;
        }
        Ok(removed)
    }

    async fn records_page(&self, p: RecordsPage) -> StoreResult<Vec<Record>> {
        if p.limit == 0 || p.limit > RECORDS_LIMIT_MAX {
            return Err(StoreError::Invalid(format!(
                "records limit {} is out of range; use 1 to {RECORDS_LIMIT_MAX}",
                p.limit
            )));
        }
        // Records at or after the committed count are a crashed checkpoint's (see the module
        // doc): never shown.
        let committed = match self.load(&p.id)? {
            Some(s) => s.metrics.processed_elements,
            None => return Ok(Vec::new()),
        };
        if p.offset >= committed {
            return Ok(Vec::new());
        }
        // Stores before record chunks kept one `R` key per record; a session may have both (`R`
        // below some count, `E` from there on).
        let prefix = data_prefix(b'R', &p.id);
        let mut out = Vec::with_capacity(p.limit.min(1024));
        let end = k_record(&p.id, committed);
        for kv in self.db.range(k_record(&p.id, p.offset)..end).take(p.limit) {
            let (k, v) = kv.map_err(backend)?;
            if !k.starts_with(&prefix) {
                break;
            }
            let seq = u64_at(&k, prefix.len())?;
            let text: String = codec::decode(&|| show_key(&k), &v)?;
            out.push(Record {
                seq,
                data: record_json(&k, &text)?,
            });
        }
        let mut next = out.last().map_or(p.offset, |r| r.seq + 1);
        if out.len() == p.limit || next >= committed {
            return Ok(out);
        }
        let prefix = data_prefix(b'E', &p.id);
        // From the chunk holding `next` (the last one starting at or before it).
        let mut lo = k_chunk(b'E', &p.id, next);
        if let Some(kv) = self
            .db
            .range(k_chunk(b'E', &p.id, 0)..=lo.clone())
            .next_back()
        {
            lo = kv.map_err(backend)?.0.to_vec();
        }
        // Bounded: each chunk read either yields records or ends the page.
        for kv in self.db.range(lo..k_chunk(b'E', &p.id, committed)) {
            let (k, v) = kv.map_err(backend)?;
            if !k.starts_with(&prefix) {
                break;
            }
            let first = u64_at(&k, prefix.len())?;
            if first > next {
                return Err(corrupt_key(&k, "a gap before this record chunk"));
            }
            let texts: Vec<String> = codec::decode(&|| show_key(&k), &v)?;
            let skip = (next - first) as usize;
            for text in texts.iter().skip(skip) {
                if next >= committed {
                    return Ok(out);
                }
                out.push(Record {
                    seq: next,
                    data: record_json(&k, text)?,
                });
                next += 1;
                if out.len() == p.limit {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    async fn resume_load(&self, id: &SessionId) -> StoreResult<ResumeState> {
        self.resume_sync(id)
    }

    async fn frontier_page(&self, p: FrontierPage) -> StoreResult<Vec<FrontierItem>> {
        if p.limit == 0 || p.limit > FRONTIER_PAGE_MAX {
            return Err(StoreError::Invalid(format!(
                "frontier page limit {} is out of range 1..={FRONTIER_PAGE_MAX}",
                p.limit
            )));
        }
        let Some(from) = p.after_pos.checked_add(1) else {
            return Ok(Vec::new());
        };
        let prefix = data_prefix(b'J', &p.id);
        // From the chunk holding `from` (the last one starting at or before it), if any.
        let mut lo = k_chunk(b'J', &p.id, from);
        if let Some(kv) = self
            .db
            .range(k_chunk(b'J', &p.id, 0)..=lo.clone())
            .next_back()
        {
            lo = kv.map_err(backend)?.0.to_vec();
        }
        let mut out = Vec::with_capacity(p.limit.min(1024));
        // Bounded by the session's chunks. Chunks all done but not yet indexed are skipped
        // without reading their entries.
        for kv in self.db.range(lo..) {
            let (k, v) = kv.map_err(backend)?;
            if !k.starts_with(&prefix) {
                break;
            }
            let first = u64_at(&k, prefix.len())?;
            let live: ChunkLive = codec::decode(&|| show_key(&k), &v)?;
            if first + u64::from(live.len) <= from || live.count() == 0 {
                continue;
            }
            let kb = k_chunk(b'B', &p.id, first);
            let entries: Vec<FrontierEntry> = read(&self.db, &kb)?
                .ok_or_else(|| corrupt_key(&k, "a frontier chunk bitmap without its chunk"))?;
            if entries.len() != live.len as usize {
                return Err(corrupt_key(
                    &kb,
                    "a frontier chunk of another length than its bitmap",
                ));
            }
            for (i, entry) in entries.into_iter().enumerate() {
                let pos = first + i as u64;
                if pos >= from && live.is_live(i as u64) {
                    out.push(FrontierItem { pos, entry });
                    if out.len() == p.limit {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    async fn seen_filter(&self, p: SeenFilter) -> StoreResult<Vec<bool>> {
        if p.urls.len() > FRONTIER_PAGE_MAX {
            return Err(StoreError::Invalid(format!(
                "seen filter of {} URLs; at most {FRONTIER_PAGE_MAX} per call",
                p.urls.len()
            )));
        }
        if self.index_behind(&p.id)? {
            blocking(|| self.index_catch_up(&p.id))?;
        }
        p.urls
            .iter()
            .map(|u| Ok(read_url(&self.db, &p.id, u)?.seen))
            .collect()
    }

    async fn log_tail(&self, id: &SessionId, limit: usize) -> StoreResult<Vec<LogLine>> {
        let mut lines = Vec::new();
        for kv in self.db.scan_prefix(data_prefix(b'O', id)).rev().take(limit) {
            let (k, v) = kv.map_err(backend)?;
            lines.push(codec::decode(&|| show_key(&k), &v)?);
        }
        lines.reverse();
        Ok(lines)
    }

    /// Status counts are persistent counters (O(1)); the queue depth is the due index's counter
    /// plus a scan of the sessions that became due since the last claim (O(those)).
    async fn session_counts(&self, now: Timestamp) -> StoreResult<SessionCounts> {
        let c = self.lock().clone();
        let mut waiting_due = 0u64;
        for kv in self.db.range(vec![b'W']..upto(b"W", now)) {
            kv.map_err(backend)?;
            waiting_due += 1;
        }
        let by_status = SessionStatus::ALL
            .into_iter()
            .map(|s| (s, c.by_status[s.code() as usize]))
            .collect();
        Ok(SessionCounts {
            by_status,
            queue_depth: c.due + waiting_due,
        })
    }

    async fn agent_put(&self, agent: Agent) -> StoreResult<()> {
        let ticket = {
            let _st = self.lock();
            self.db
                .insert(
                    k_agent_def(&agent.client_id, &agent.name),
                    codec::encode(&agent)?,
                )
                .map_err(backend)?;
            self.durability.ticket()
        };
        self.durability.wait(ticket).await
    }

    async fn agent_get(&self, client_id: &str, name: &str) -> StoreResult<Option<Agent>> {
        let k = k_agent_def(client_id, name);
        match self.db.get(&k).map_err(backend)? {
            Some(v) => Ok(Some(codec::decode(&|| show_key(&k), &v)?)),
            None => Ok(None),
        }
    }

    async fn agent_delete(&self, client_id: &str, name: &str) -> StoreResult<bool> {
        let ticket = {
            let _st = self.lock();
            if self
                .db
                .remove(k_agent_def(client_id, name))
                .map_err(backend)?
                .is_none()
            {
                return Ok(false);
            }
            self.durability.ticket()
        };
        self.durability.wait(ticket).await?;
        Ok(true)
    }

    async fn agent_list(&self) -> StoreResult<Vec<Agent>> {
        let mut agents: Vec<Agent> = Vec::new();
        for kv in self.db.scan_prefix(b"N") {
            let (k, v) = kv.map_err(backend)?;
            match codec::decode(&|| show_key(&k), &v) {
                Ok(a) => agents.push(a),
                Err(e) => tracing::warn!(error = %e, "skipping an unreadable agent"),
            }
        }
        // Keys sort by client length first; the contract is by client then name.
        agents.sort_by(|a, b| (&a.client_id, &a.name).cmp(&(&b.client_id, &b.name)));
        Ok(agents)
    }

    async fn leader_acquire(&self, p: super::LeaderAcquire) -> StoreResult<bool> {
        let expires = p.now.add(p.ttl);
        // Plain data behind the lock; a panic elsewhere leaves it consistent.
        let mut leaders = self.leaders.lock().unwrap_or_else(|e| e.into_inner());
        let granted = match leaders.get(&p.name) {
            Some((owner, until)) => *owner == p.owner || *until <= p.now,
            None => true,
        };
        if granted {
            leaders.insert(p.name, (p.owner, expires));
        }
        Ok(granted)
    }

    async fn pending_wait(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.pending.notified()).await;
    }

    async fn close(&self) -> StoreResult<()> {
        let ticket = self.durability.ticket();
        self.durability.wait(ticket).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_encoding_round_trips_and_refuses_garbage() {
        let mut b = Batch::default();
        b.insert(b"k1".to_vec(), b"v1".to_vec());
        b.remove(b"k2".to_vec());
        b.insert(b"k3".to_vec(), Vec::new());
        let bytes = b.encode();
        let back = Batch::decode(&bytes).expect("decodes");
        assert_eq!(back.ops, b.ops);
        assert!(
            Batch::decode(&bytes[..bytes.len() - 1]).is_none(),
            "truncated"
        );
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(Batch::decode(&extra).is_none(), "trailing bytes");
        assert!(Batch::decode(&[0, 0, 0, 1, 7]).is_none(), "bad tag");
    }

    /// A crash in the middle of a batch leaves its intent behind; the next open finishes the
    /// batch, so no half-applied change survives.
    #[test]
    fn open_completes_a_batch_interrupted_by_a_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = SledStore::open(dir.path()).expect("open");
            let mut b = Batch::default();
            b.insert(b"Qfirst".to_vec(), b"1".to_vec());
            b.insert(b"Qsecond".to_vec(), b"2".to_vec());
            b.remove(b"Qgone".to_vec());
            store.db.insert(b"Qgone", b"x".to_vec()).expect("insert");
            // The intent and the first change reached sled; then the process died.
            store.db.insert(k_intent(7), b.encode()).expect("intent");
            store.db.insert(b"Qfirst", b"1".to_vec()).expect("first");
            store.db.flush().expect("flush");
        }
        let store = SledStore::open(dir.path()).expect("reopen");
        assert_eq!(
            store.db.get(b"Qfirst").expect("get").as_deref(),
            Some(&b"1"[..])
        );
        assert_eq!(
            store.db.get(b"Qsecond").expect("get").as_deref(),
            Some(&b"2"[..])
        );
        assert_eq!(store.db.get(b"Qgone").expect("get"), None);
        assert_eq!(
            store.db.scan_prefix(INTENT_PREFIX).count(),
            0,
            "intent removed"
        );
    }

    async fn running(store: &SledStore) -> super::super::AttemptRef {
        let now = Timestamp::now();
        let id = SessionId::generate();
        let session = Session::pending(
            id.clone(),
            crate::session::ClientContext::of("t"),
            crate::session::JobSpec {
                config: serde_json::json!({}),
                params: Default::default(),
                agent: None,
            },
            Default::default(),
            now,
        );
        store
            .session_insert(SessionInsert {
                session,
                single_agent: None,
            })
            .await
            .expect("insert");
        let claimed = store
            .session_claim(SessionClaim {
                owner: "t".into(),
                limit: 1,
                lease: Duration::from_secs(600),
                now,
            })
            .await
            .expect("claim");
        assert_eq!(claimed.len(), 1);
        super::super::AttemptRef {
            id,
            attempt: claimed[0].attempt,
            owner: "t".into(),
        }
    }

    async fn checkpoint(store: &SledStore, a: &super::super::AttemptRef, batch: CheckpointBatch) {
        let ok = store
            .checkpoint_commit_if_running(CheckpointCommit {
                attempt: a.clone(),
                batch,
                lease: Duration::from_secs(600),
                now: Timestamp::now(),
            })
            .await
            .expect("checkpoint");
        assert!(ok, "checkpoint applied");
    }

    /// Records span several chunks; a chunk a crashed checkpoint left after the committed count
    /// is never shown and never overlaps the next checkpoint's records.
    #[tokio::test]
    async fn record_chunks_page_across_boundaries_and_ignore_a_crashed_checkpoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let a = running(&store).await;
        let recs = |r: std::ops::Range<u64>| -> Vec<serde_json::Value> {
            r.map(|i| serde_json::json!({ "i": i })).collect()
        };
        let batch = CheckpointBatch {
            records: recs(0..600),
            ..Default::default()
        };
        checkpoint(&store, &a, batch).await;
        // A crashed checkpoint's chunks after the committed count (600).
        for first in [600u64, 700] {
            let junk: Vec<String> = (0..150).map(|_| "\"junk\"".to_string()).collect();
            store
                .db
                .insert(
                    k_chunk(b'E', &a.id, first),
                    codec::encode(&junk).expect("enc"),
                )
                .expect("insert");
        }
        let page = |offset, limit| RecordsPage {
            id: a.id.clone(),
            offset,
            limit,
        };
        let seen = store.records_page(page(590, 100)).await.expect("page");
        assert_eq!(seen.len(), 10, "nothing after the committed count");
        let batch = CheckpointBatch {
            records: recs(600..610),
            ..Default::default()
        };
        checkpoint(&store, &a, batch).await;
        for (offset, limit) in [
            (0, 1000),
            (0, 7),
            (250, 20),
            (255, 2),
            (256, 300),
            (599, 50),
        ] {
            let got = store.records_page(page(offset, limit)).await.expect("page");
            let want: Vec<u64> = (offset..610).take(limit).collect();
            let seqs: Vec<u64> = got.iter().map(|r| r.seq).collect();
            assert_eq!(seqs, want, "offset {offset} limit {limit}");
            for r in &got {
                assert_eq!(
                    r.data,
                    serde_json::json!({ "i": r.seq }),
                    "record {}",
                    r.seq
                );
            }
        }
        assert!(
            store
                .records_page(page(610, 10))
                .await
                .expect("page")
                .is_empty()
        );
    }

    /// Frontier entries span several chunks; done entries leave their chunk (a chunk with none
    /// left goes), pages continue after the last position, and the count is of live entries.
    #[tokio::test]
    async fn frontier_chunks_page_in_order_and_drop_done_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let a = running(&store).await;
        let url = |i: usize| format!("http://x/{i:05}");
        let entry = |i: usize| FrontierEntry {
            url: url(i),
            depth: 1,
            page: None,
        };
        let batch = CheckpointBatch {
            frontier_add: (0..1100).map(entry).collect(),
            seen_add: (0..1100).map(url).collect(),
            ..Default::default()
        };
        checkpoint(&store, &a, batch).await;
        // All of the first chunk, every other one of the second, one of the third; and one
        // added and done in the same batch.
        let mut done: Vec<String> = (0..512).map(url).collect();
        done.extend((512..1024).step_by(2).map(url));
        done.push(url(1099));
        done.push(url(5000));
        let batch = CheckpointBatch {
            frontier_add: vec![entry(5000), entry(5001), entry(3)],
            frontier_done: done.into_iter().map(Into::into).collect(),
            ..Default::default()
        };
        checkpoint(&store, &a, batch).await;
        let mut want: Vec<String> = (513..1024).step_by(2).map(url).collect();
        want.extend((1024..1099).map(url));
        // url(3) was still in the frontier when added again (additions come first): it kept its
        // place, then was done.
        want.push(url(5001));
        let resume = store.resume_sync(&a.id).expect("resume");
        assert_eq!(resume.frontier_len, want.len() as u64);
        assert!(
            store
                .db
                .get(k_chunk(b'B', &a.id, 1))
                .expect("get")
                .is_none(),
            "a chunk with nothing left is removed"
        );
        let mut got = Vec::new();
        let mut after = 0;
        for _ in 0..100 {
            let items = store
                .frontier_page(FrontierPage {
                    id: a.id.clone(),
                    after_pos: after,
                    limit: 37,
                })
                .await
                .expect("page");
            let Some(last) = items.last() else { break };
            assert!(last.pos > after);
            after = last.pos;
            got.extend(items.into_iter().map(|i| i.entry.url));
        }
        assert_eq!(got, want);
        let seen = store
            .seen_filter(SeenFilter {
                id: a.id.clone(),
                urls: vec![url(0), url(5000), url(9999)],
            })
            .await
            .expect("seen");
        assert_eq!(
            seen,
            vec![true, false, false],
            "frontier_add alone is not seen_add"
        );
    }

    use super::super::FrontierDone;

    fn url(i: usize) -> String {
        format!("http://x/{i:05}")
    }

    /// A batch adding `url(i)` for each `i` as new (frontier and seen set), as the engine does.
    fn new_urls(range: std::ops::Range<usize>) -> CheckpointBatch {
        CheckpointBatch {
            frontier_add: range.clone().map(|i| entry(&url(i))).collect(),
            seen_add: range.map(url).collect(),
            ..Default::default()
        }
    }

    fn keys_under(store: &SledStore, tag: u8, id: &SessionId) -> usize {
        store.db.scan_prefix(data_prefix(tag, id)).count()
    }

    async fn seen(store: &SledStore, id: &SessionId, urls: Vec<String>) -> Vec<bool> {
        store
            .seen_filter(SeenFilter {
                id: id.clone(),
                urls,
            })
            .await
            .expect("seen")
    }

    async fn frontier_urls(store: &SledStore, id: &SessionId) -> Vec<String> {
        let items = store
            .frontier_page(FrontierPage {
                id: id.clone(),
                after_pos: 0,
                limit: FRONTIER_PAGE_MAX,
            })
            .await
            .expect("page");
        items.into_iter().map(|i| i.entry.url).collect()
    }

    /// New URLs (in both `frontier_add` and `seen_add`, as the engine sends them) write no `U`
    /// key at commit; the first seen-set lookup indexes them from their chunks, chunks all done
    /// are kept until then and removed after, and the index survives a reopen.
    #[tokio::test]
    async fn the_seen_index_is_built_from_the_chunks_when_first_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = {
            let store = SledStore::open(dir.path()).expect("open");
            let a = running(&store).await;
            let resume = store.resume_sync(&a.id).expect("resume");
            assert_eq!(resume.frontier_next, 1, "positions start at 1");
            checkpoint(&store, &a, new_urls(0..1100)).await;
            assert_eq!(keys_under(&store, b'U', &a.id), 0, "no U key at commit");
            assert_eq!(
                store.resume_sync(&a.id).expect("resume").frontier_next,
                1101
            );
            // The whole first chunk done, by position.
            checkpoint(
                &store,
                &a,
                CheckpointBatch {
                    frontier_done: (0..512)
                        .map(|i| FrontierDone {
                            url: url(i),
                            pos: Some(i as u64 + 1),
                        })
                        .collect(),
                    ..Default::default()
                },
            )
            .await;
            assert!(
                store
                    .db
                    .get(k_chunk(b'B', &a.id, 1))
                    .expect("get")
                    .is_some(),
                "a chunk all done but not indexed stays: it holds seen URLs"
            );
            assert_eq!(store.resume_sync(&a.id).expect("resume").frontier_len, 588);
            assert_eq!(frontier_urls(&store, &a.id).await.first(), Some(&url(512)));
            let got = seen(&store, &a.id, vec![url(0), url(511), url(1099), url(1100)]).await;
            assert_eq!(got, vec![true, true, true, false]);
            assert_eq!(
                keys_under(&store, b'U', &a.id),
                1100,
                "indexed on first read"
            );
            assert!(
                store
                    .db
                    .get(k_chunk(b'B', &a.id, 1))
                    .expect("get")
                    .is_none(),
                "an indexed chunk all done goes"
            );
            a.id
        };
        let store = SledStore::open(dir.path()).expect("reopen");
        let got = seen(&store, &id, vec![url(3), url(700), url(2000)]).await;
        assert_eq!(got, vec![true, true, false]);
        assert_eq!(store.resume_sync(&id).expect("resume").frontier_len, 588);
    }

    fn entry(url: &str) -> FrontierEntry {
        FrontierEntry {
            url: url.into(),
            depth: 1,
            page: None,
        }
    }

    /// A done URL whose position hint is wrong, missing or out of range is found by its URL.
    #[tokio::test]
    async fn wrong_position_hints_fall_back_to_the_url() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let a = running(&store).await;
        checkpoint(&store, &a, new_urls(0..10)).await;
        let hint = |i: usize, pos: Option<u64>| FrontierDone { url: url(i), pos };
        checkpoint(
            &store,
            &a,
            CheckpointBatch {
                // url(10) and url(11) are new here (positions 11, 12).
                frontier_add: vec![entry(&url(10)), entry(&url(11))],
                seen_add: vec![url(10), url(11)],
                frontier_done: vec![
                    hint(0, Some(2)),         // points at url(1)
                    hint(2, None),            // no hint
                    hint(4, Some(99)),        // beyond every chunk
                    hint(6, Some(7)),         // right
                    hint(10, Some(12)),       // this batch's, points at url(11)
                    hint(11, Some(u64::MAX)), // nonsense
                ],
                ..Default::default()
            },
        )
        .await;
        let want: Vec<String> = [1, 3, 5, 7, 8, 9].into_iter().map(url).collect();
        assert_eq!(frontier_urls(&store, &a.id).await, want);
    }

    /// An addition not in `seen_add` is looked up, including among URLs not yet indexed: one
    /// still in the frontier keeps its place.
    #[tokio::test]
    async fn an_addition_already_in_the_unindexed_frontier_keeps_its_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let a = running(&store).await;
        checkpoint(
            &store,
            &a,
            CheckpointBatch {
                frontier_add: vec![entry("http://x/a"), entry("http://x/b")],
                seen_add: vec!["http://x/a".into(), "http://x/b".into()],
                ..Default::default()
            },
        )
        .await;
        checkpoint(
            &store,
            &a,
            CheckpointBatch {
                frontier_add: vec![entry("http://x/a"), entry("http://x/c")],
                ..Default::default()
            },
        )
        .await;
        assert_eq!(
            frontier_urls(&store, &a.id).await,
            vec!["http://x/a", "http://x/b", "http://x/c"]
        );
        let got = seen(
            &store,
            &a.id,
            vec!["http://x/a".into(), "http://x/c".into()],
        )
        .await;
        assert_eq!(got, vec![true, false], "c was added, never seen");
    }

    /// A catch-up cut short (a crash between its steps, or within one after some `U` keys) is
    /// finished by the next one, with the same result.
    #[tokio::test]
    async fn an_interrupted_catch_up_is_finished_by_the_next() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let a = running(&store).await;
        checkpoint(&store, &a, new_urls(0..2000)).await;
        {
            let _st = store.lock();
            assert!(
                !store.index_step(&a.id, 1).expect("step"),
                "one chunk of four"
            );
        }
        assert_eq!(keys_under(&store, b'U', &a.id), 512);
        // As if a step had written some `U` keys and died before moving `I`.
        store
            .db
            .insert(
                k_url(b'U', &a.id, &url(600)),
                UrlState {
                    seen: true,
                    pos: Some(601),
                }
                .encode()
                .expect("value"),
            )
            .expect("insert");
        let all: Vec<String> = (0..2000).map(url).collect();
        for part in all.chunks(FRONTIER_PAGE_MAX) {
            assert!(seen(&store, &a.id, part.to_vec()).await.iter().all(|s| *s));
        }
        assert_eq!(keys_under(&store, b'U', &a.id), 2000);
        let v = store
            .db
            .get(k_url(b'U', &a.id, &url(1999)))
            .expect("get")
            .expect("indexed");
        assert_eq!(
            UrlState::decode(b"U", &v).expect("decode").pos,
            Some(2000),
            "the position of its entry"
        );
    }

    /// The flusher's disk sync covers the log and the blob files sled writes large values to
    /// (which sled's own flush never syncs), and forgets blobs sled removed.
    #[test]
    fn disk_sync_covers_the_log_and_new_blob_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new()
            .path(dir.path())
            .flush_every_ms(None)
            .open()
            .expect("open");
        let mut disk = DiskSync::open(dir.path()).expect("disk sync");
        let none = disk.unsynced_blobs().expect("list");
        assert!(none.is_empty());
        disk.sync(none).expect("sync with no blob");
        // Over a quarter of sled's 512 KiB segment: written as a blob file.
        db.insert(b"big", vec![7u8; 300 * 1024]).expect("insert");
        let listed = disk.unsynced_blobs().expect("list");
        db.flush().expect("flush");
        disk.sync(listed).expect("sync");
        assert!(
            disk.unsynced_blobs().expect("list").is_empty(),
            "nothing left"
        );
        let blobs: Vec<_> = std::fs::read_dir(dir.path().join("blobs"))
            .expect("blobs dir")
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        assert!(!blobs.is_empty(), "a large value makes a blob file");
        assert!(
            blobs.iter().all(|b| disk.synced.contains(b)),
            "each blob synced"
        );
        std::fs::remove_file(dir.path().join("blobs").join(&blobs[0])).expect("remove");
        disk.unsynced_blobs().expect("list after a removal");
        assert!(
            !disk.synced.contains(&blobs[0]),
            "removed blobs are forgotten"
        );
    }

    /// A position hint naming an entry of the URL that is done already does not stop the
    /// removal: the URL's live entry elsewhere (re-added after it was done) is found by its URL.
    #[tokio::test]
    async fn a_hint_at_a_done_entry_falls_back_to_the_live_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let a = running(&store).await;
        let u = "http://x/u";
        let add = |urls: &[&str]| CheckpointBatch {
            frontier_add: urls.iter().map(|u| entry(u)).collect(),
            ..Default::default()
        };
        checkpoint(&store, &a, add(&[u, "http://x/v"])).await; // u at 1
        let done_at = |pos| CheckpointBatch {
            frontier_done: vec![FrontierDone {
                url: u.into(),
                pos: Some(pos),
            }],
            ..Default::default()
        };
        checkpoint(&store, &a, done_at(1)).await;
        checkpoint(&store, &a, add(&[u])).await; // again, at 3
        assert_eq!(frontier_urls(&store, &a.id).await, vec!["http://x/v", u]);
        checkpoint(&store, &a, done_at(1)).await; // a stale hint
        assert_eq!(frontier_urls(&store, &a.id).await, vec!["http://x/v"]);
    }
}
