//! Crash atomicity and durability of every write. A multi-key change is one [`Batch`], made
//! crash-atomic by an intent key (`\0i` seq: see [`SledStore::apply_atomic`]) that the next open
//! replays ([`replay_intents`]), and made durable by a group commit before the call returns.
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

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use sled::IVec;
use tokio::sync::watch;

use super::keys::corrupt_key;
use super::{COUNTERS_KEY, Counters, SledStore, sled_err};
use crate::store::{StoreError, StoreResult, codec};

/// Prefix of intent keys: `\0i` + seq (u64 BE). See [`SledStore::apply_atomic`].
pub(super) const INTENT_PREFIX: &[u8] = b"\0i";

pub(super) fn k_intent(seq: u64) -> Vec<u8> {
    let mut k = INTENT_PREFIX.to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Size at which a many-session write (batch insert, claim, batched finishes) ends its intent
/// and starts another. The intent is one sled value: past ~128 KiB (a 512 KiB segment over
/// sled's minimum of 4 items) it becomes a blob file, written, synced and removed again, and
/// every rewrite of its leaf copies it. One flush after the last intent makes them all durable
/// (tickets are flushed in order).
const INTENT_BYTES: usize = 32 * 1024;

/// Where a [`Batch`] ended ([`Batch::mark`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct Mark {
    ops: usize,
    loose: usize,
    leases: usize,
    bytes: usize,
}

/// A group of key changes that is applied as a unit (see [`SledStore::apply_atomic`]). Later
/// changes to the same key win, as in sled's own `Batch`.
#[derive(Default, Debug)]
pub(super) struct Batch {
    ops: Vec<(IVec, Option<IVec>)>,
    /// The encoded size of `ops` ([`Batch::encode`]).
    bytes: usize,
    /// Changes applied before the intent, outside it: to keys no reader sees until the batch's
    /// other changes are in (records numbered from the session's committed count).
    pub(super) loose: Vec<(IVec, Option<IVec>)>,
    /// Changes to the lease index, which lives in memory only (see `SledStore::leases`):
    /// applied once the batch is, never written to sled.
    leases: Vec<(Vec<u8>, bool)>,
}

impl Batch {
    /// Whether it changes nothing.
    pub(super) fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.loose.is_empty() && self.leases.is_empty()
    }

    /// Adds lease-index key `k` once the batch is applied.
    pub(super) fn lease(&mut self, k: Vec<u8>) {
        self.leases.push((k, true));
    }

    /// Removes lease-index key `k` once the batch is applied.
    pub(super) fn unlease(&mut self, k: Vec<u8>) {
        self.leases.push((k, false));
    }

    pub(super) fn insert<K: Into<IVec>, V: Into<IVec>>(&mut self, key: K, value: V) {
        let (key, value) = (key.into(), value.into());
        self.bytes += 13 + key.len() + value.len();
        self.ops.push((key, Some(value)));
    }

    pub(super) fn remove<K: Into<IVec>>(&mut self, key: K) {
        let key = key.into();
        self.bytes += 9 + key.len();
        self.ops.push((key, None));
    }

    /// Whether the intent is as large as one should be: a many-session write commits it and
    /// goes on in a new batch ([`INTENT_BYTES`]).
    pub(super) fn full(&self) -> bool {
        self.bytes >= INTENT_BYTES
    }

    /// Where the batch ends now, for [`Batch::truncated`].
    pub(super) fn mark(&self) -> Mark {
        Mark {
            ops: self.ops.len(),
            loose: self.loose.len(),
            leases: self.leases.len(),
            bytes: self.bytes,
        }
    }

    /// Adds `other`'s changes after this batch's own.
    pub(super) fn append(&mut self, other: Batch) {
        self.ops.extend(other.ops);
        self.loose.extend(other.loose);
        self.leases.extend(other.leases);
        self.bytes += other.bytes;
    }

    /// The batch without the changes staged after `mark` (a failed item's).
    pub(super) fn truncated(mut self, mark: Mark) -> Batch {
        self.ops.truncate(mark.ops);
        self.loose.truncate(mark.loose);
        self.leases.truncate(mark.leases);
        self.bytes = mark.bytes;
        self
    }

    /// `count u32`, then per change `1 klen key vlen value` (insert) or `0 klen key` (remove),
    /// lengths u32 BE.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.bytes);
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
            bytes: bytes.len().saturating_sub(4),
            loose: Vec::new(),
            leases: Vec::new(),
        })
    }

    /// Applies the changes to `db`, leaving what applying them one after the other would.
    pub(super) fn apply_to(&self, db: &sled::Db) -> StoreResult<()> {
        db.apply_sorted(&self.last_changes())
            .map_err(sled_err("applying a batch"))
    }

    /// The last change of each key, in key order: what applying `ops` one after the other
    /// leaves, in the form [`sled::Tree::apply_sorted`] takes (harvest's addition to sled: keys
    /// that fall in one leaf are written with one copy of it, not one per key; see
    /// `vendor/sled/HARVEST.md`).
    fn last_changes(&self) -> Vec<(&[u8], Option<&IVec>)> {
        let mut out: Vec<(&[u8], Option<&IVec>)> = self
            .ops
            .iter()
            .map(|(k, v)| (k.as_ref(), v.as_ref()))
            .collect();
        // Stable: of a key's changes, the last one staged sorts last, and is the one kept.
        out.sort_by(|a, b| a.0.cmp(b.0));
        out.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                kept.1 = later.1;
            }
            same
        });
        out
    }
}

/// Completes the batches a crash interrupted: every intent still present, in order.
pub(super) fn replay_intents(db: &sled::Db) -> StoreResult<()> {
    let mut replayed = 0;
    for kv in db.scan_prefix(INTENT_PREFIX) {
        let (k, v) = kv.map_err(sled_err("reading the batches a crash interrupted"))?;
        let batch =
            Batch::decode(&v).ok_or_else(|| corrupt_key(&k, "an unreadable batch intent"))?;
        batch.apply_to(db)?;
        db.remove(&k)
            .map_err(sled_err("completing a batch a crash interrupted"))?;
        replayed += 1;
    }
    if replayed > 0 {
        tracing::info!(
            batches = replayed,
            "completed batches interrupted by a crash"
        );
        db.flush()
            .map_err(sled_err("flushing the completed batches"))?;
    }
    Ok(())
}

// No linger before a flush: since batches no longer use sled's `apply_batch` (see
// `SledStore::apply_atomic`), writers keep applying while a flush runs, and the next flush takes
// everything that arrived meanwhile. Measured with `harvest bench queue` (2 cores, 16
// submitters): a 2 ms linger gave 14-23k durable submits/s, none gives 21-25k/s.

/// The durability handshake between writers and the flusher thread.
#[derive(Debug)]
pub(super) struct Durability {
    /// Tickets handed out: writes applied and waiting to be flushed.
    written: AtomicU64,
    /// Set by writers, cleared by the flusher: there is something to flush.
    dirty: Mutex<bool>,
    wake: Condvar,
    shutdown: AtomicBool,
    flushes: AtomicU64,
    state: watch::Sender<Flushed>,
    /// When the running flush began, in milliseconds after `origin`, plus one; 0 when idle.
    flush_began: AtomicU64,
    origin: std::time::Instant,
}

/// A flush that has not returned for this long makes the store unhealthy (a full disk can make
/// sled's flush block instead of fail).
const FLUSH_STUCK_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// What the flusher has done so far.
#[derive(Clone, Debug, Default)]
struct Flushed {
    /// Every ticket up to this is durable.
    upto: u64,
    /// Every ticket up to this was covered by a failed flush (unless `upto` covers it).
    failed_upto: u64,
    /// The error of the failed flush; none if the flusher thread stopped (panicked).
    error: Option<Arc<StoreError>>,
}

impl Durability {
    /// Starts the flusher thread of `db`, the store in `path`.
    pub(super) fn start(
        db: &sled::Db,
        path: &Path,
    ) -> StoreResult<(Arc<Durability>, JoinHandle<()>)> {
        let (state, _) = watch::channel(Flushed::default());
        let durability = Arc::new(Durability {
            written: AtomicU64::new(0),
            dirty: Mutex::new(false),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            flushes: AtomicU64::new(0),
            state,
            flush_began: AtomicU64::new(0),
            origin: std::time::Instant::now(),
        });
        let mut disk = DiskSync::open(path).map_err(|source| StoreError::Io {
            context: format!("sled: opening the store at {} for syncing", path.display()),
            source,
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
                        // (`error` stays as it is: none means the flusher stopped.)
                        durability.state.send_modify(|f| f.failed_upto = u64::MAX);
                    }
                })
                .map_err(|source| StoreError::Io {
                    context: "sled: starting the flusher thread".into(),
                    source,
                })?
        };
        Ok((durability, flusher))
    }

    /// Flushes done since open.
    pub(super) fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Why the store cannot make writes durable, if it cannot: a failed flush (sticky until
    /// restart: see [`Durability::run`]), a stopped flusher, or a flush that has not returned
    /// for [`FLUSH_STUCK_AFTER`].
    pub(super) fn unhealthy(&self) -> Option<String> {
        {
            let f = self.state.borrow();
            if f.failed_upto > 0 {
                return Some(match &f.error {
                    Some(e) => {
                        format!("flushing to disk failed: {e}; free the disk and restart harvest")
                    }
                    None => "the flusher thread stopped; restart harvest".into(),
                });
            }
        }
        let began = self.flush_began.load(Ordering::Relaxed);
        if began > 0 {
            let running = (self.origin.elapsed().as_millis() as u64).saturating_sub(began - 1);
            if running >= FLUSH_STUCK_AFTER.as_millis() as u64 {
                return Some(format!(
                    "a flush to disk has not returned for {} s (is the disk full or failing?)",
                    running / 1000
                ));
            }
        }
        None
    }

    /// Has the flusher flush what is pending and return (the store's `Drop` joins it).
    pub(super) fn shut_down(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        let _dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        self.wake.notify_one();
    }

    pub(super) fn ticket(&self) -> u64 {
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

    pub(super) async fn wait(&self, ticket: u64) -> StoreResult<()> {
        let mut rx = self.state.subscribe();
        let seen = rx
            .wait_for(|f| f.upto >= ticket || f.failed_upto >= ticket)
            .await
            .map_err(|_| StoreError::NotDurable { source: None })?;
        if seen.upto >= ticket {
            Ok(())
        } else {
            Err(StoreError::NotDurable {
                source: seen.error.clone(),
            })
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
            self.flush_began.store(
                self.origin.elapsed().as_millis() as u64 + 1,
                Ordering::Relaxed,
            );
            // Blob files listed before the flush are whole once it returns (it waits for every
            // write reserved before it began); newer ones are synced by the next round.
            let result = disk
                .unsynced_blobs()
                .map_err(|source| StoreError::Io {
                    context: "sled: listing the blob files".into(),
                    source,
                })
                .and_then(|blobs| {
                    db.flush().map_err(sled_err("flushing to disk"))?;
                    disk.sync(blobs).map_err(|source| StoreError::Io {
                        context: "sled: syncing to disk".into(),
                        source,
                    })
                });
            self.flush_began.store(0, Ordering::Relaxed);
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
                    f.error = Some(Arc::new(e));
                }
            });
            if failed {
                return;
            }
        }
    }
}

/// What the flusher syncs after sled's flush (see the module doc).
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

impl SledStore {
    /// Applies `b` with the new counters; returns the durability ticket.
    pub(super) fn commit(&self, st: &mut Counters, next: Counters, b: Batch) -> StoreResult<u64> {
        self.apply(st, next, b)?;
        Ok(self.durability.ticket())
    }

    /// The end of a many-session write whose full intents went through [`SledStore::apply`]
    /// (`applied`): commits the rest, and returns the one ticket that makes them all durable
    /// (`None` when nothing was written).
    pub(super) fn commit_rest(
        &self,
        st: &mut Counters,
        next: Counters,
        b: Batch,
        applied: bool,
    ) -> StoreResult<Option<u64>> {
        if !b.is_empty() {
            return self.commit(st, next, b).map(Some);
        }
        Ok(applied.then(|| self.durability.ticket()))
    }

    /// Applies `b` with the new counters without asking for a flush (claims and heartbeats:
    /// see the module docs); the next flush makes it durable.
    pub(super) fn apply(&self, st: &mut Counters, next: Counters, mut b: Batch) -> StoreResult<()> {
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
    /// still present are exactly the batches that may be partly applied, in order;
    /// [`open`](SledStore::open) applies them again (the same values: idempotent). Callers hold
    /// the store mutex, so batches never interleave.
    ///
    /// If a write fails after the intent is stored, the batch is half applied and its intent
    /// would be replayed over newer data at the next open: the store refuses every later write
    /// until it is reopened (which completes the batch).
    pub(super) fn apply_atomic(&self, b: Batch) -> StoreResult<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(StoreError::Poisoned);
        }
        // Loose keys (records beyond the committed count) are invisible until the intent's
        // changes are in, so a failure here leaves nothing a reader or a replay would see.
        for (k, v) in &b.loose {
            match v {
                Some(v) => self
                    .db
                    .insert(k, v.clone())
                    .map_err(sled_err("writing a checkpoint's records"))?,
                None => self
                    .db
                    .remove(k)
                    .map_err(sled_err("writing a checkpoint's records"))?,
            };
        }
        let seq = self.intent_seq.fetch_add(1, Ordering::Relaxed);
        let key = k_intent(seq);
        if let Err(e) = self.db.insert(&key, b.encode()) {
            let e = sled_err("writing a batch's intent")(e);
            self.note_write_failure(&e);
            return Err(e);
        }
        let applied = b.apply_to(&self.db).and_then(|()| {
            self.db
                .remove(&key)
                .map(|_| ())
                .map_err(sled_err("removing a batch's intent"))
        });
        match &applied {
            Ok(()) => {
                if !b.leases.is_empty() {
                    let mut leases = self.leases();
                    for (k, add) in b.leases {
                        if add {
                            leases.insert(k);
                        } else {
                            leases.remove(&k);
                        }
                    }
                }
            }
            Err(e) => {
                self.note_write_failure(e);
                self.poisoned.store(true, Ordering::Release);
                tracing::error!(
                    "a sled write failed half-way; refusing further writes until restart"
                );
            }
        }
        applied
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

    /// The flusher's disk sync covers the log and the blob files sled writes large values to
    /// (which sled's own flush never syncs), and forgets blobs sled removed.
    #[test]
    fn disk_sync_covers_the_log_and_new_blob_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = open_raw(dir.path());
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

    /// sled itself (no store) in `dir`, as the store opens it, waiting (bounded) for a dropped
    /// handle's I/O threads to let go of the directory's lock.
    fn open_raw(dir: &Path) -> sled::Db {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match sled::Config::new().path(dir).flush_every_ms(None).open() {
                Ok(db) => break db,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("open: {e}"),
            }
        }
    }

    /// A key of one of three regions, so that batches span leaves and regions.
    fn model_key(n: u16) -> Vec<u8> {
        let mut k = vec![b"ACT"[usize::from(n % 3)]];
        k.extend_from_slice(&n.to_be_bytes());
        k
    }

    fn model_value(n: u16, len: usize) -> Vec<u8> {
        (0..len).map(|i| (usize::from(n) + i) as u8).collect()
    }

    /// What the tree holds, as a map.
    fn contents(db: &sled::Db) -> std::collections::BTreeMap<Vec<u8>, Vec<u8>> {
        db.iter()
            .map(|kv| kv.expect("read"))
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect()
    }

    /// Applies `batches` (key number, value length or `None` to remove) one after the other
    /// through `Batch::apply_to` and to a map, and checks the tree against the map after each,
    /// then after a reopen.
    fn check_against_model(batches: &[Vec<(u16, Option<usize>)>]) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = open_raw(dir.path());
        let mut model = std::collections::BTreeMap::new();
        for ops in batches {
            let mut b = Batch::default();
            for &(n, v) in ops {
                match v {
                    Some(len) => {
                        b.insert(model_key(n), model_value(n, len));
                        model.insert(model_key(n), model_value(n, len));
                    }
                    None => {
                        b.remove(model_key(n));
                        model.remove(&model_key(n));
                    }
                }
            }
            b.apply_to(&db).expect("apply");
            assert_eq!(contents(&db), model);
        }
        db.flush().expect("flush");
        drop(db);
        assert_eq!(contents(&open_raw(dir.path())), model, "after a reopen");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// Batches applied leaf by leaf leave what applying their changes in order leaves,
        /// whatever their order, duplicates and removals (values up to 100 bytes: inline and
        /// shared `IVec`s both).
        #[test]
        fn a_batch_applies_as_its_changes_in_order(
            batches in proptest::collection::vec(
                proptest::collection::vec(
                    (0u16..600, proptest::option::weighted(0.75, 0usize..100)),
                    0..300,
                ),
                1..6,
            )
        ) {
            check_against_model(&batches);
        }
    }

    /// Large batches fill empty regions (leaves grow by groups and split), empty them again
    /// and refill them; values of 5 KiB end groups by their bytes, and a leaf holding a value
    /// over 64 KiB is written key by key.
    #[test]
    fn large_batches_split_and_empty_leaves() {
        let fill: Vec<_> = (0..3000u16).map(|n| (n, Some(40))).collect();
        let empty_half: Vec<_> = (0..3000u16).step_by(2).map(|n| (n, None)).collect();
        let mut big: Vec<_> = (0..3000u16)
            .rev()
            .map(|n| (n, Some(usize::from(n % 7))))
            .collect();
        big.push((1500, Some(100 * 1024)));
        let wide: Vec<_> = (0..900u16).map(|n| (n * 3, Some(5 * 1024))).collect();
        let empty_all: Vec<_> = (0..3000u16).map(|n| (n, None)).collect();
        check_against_model(&[fill.clone(), empty_half, big, wide, fill, empty_all]);
    }

    /// Keys inserted one at a time in ascending order (an index of sequence numbers or
    /// time-ordered ids), or in descending order (one kept newest first), leave full leaves
    /// behind them: the vendored sled splits a leaf where its traversal's key goes (13 of 17
    /// entries on the side nothing is added to), not in the middle, which left every leaf
    /// behind the insertion point half empty and split more often.
    #[test]
    fn ascending_single_inserts_leave_full_leaves() {
        /// The entries of each leaf, left to right, after inserting `keys` one at a time.
        fn leaves_after(keys: impl Iterator<Item = u32>) -> Vec<usize> {
            let dir = tempfile::tempdir().expect("tempdir");
            let db = open_raw(dir.path());
            for n in keys {
                db.insert(n.to_be_bytes(), &b"v"[..]).expect("insert");
            }
            let lengths = db.leaf_lengths().expect("leaves");
            assert_eq!(lengths.iter().sum::<usize>(), 2000);
            lengths
        }

        let lengths = leaves_after(0..2000);
        let (last, full) = lengths.split_last().expect("a leaf");
        assert!(*last <= 17, "the last leaf: {last}");
        // A leaf of 17 splits into 13 and 4 (the right side keeps the merge threshold's 4);
        // in the middle, 9 and 8.
        assert!(
            full.iter().all(|&n| n == 13),
            "every leaf but the last holds 13 entries: {lengths:?}"
        );

        // Newest first (an index by descending sequence number): the mirror image.
        let lengths = leaves_after((0..2000).rev());
        let (first, full) = lengths.split_first().expect("a leaf");
        assert!(*first <= 17, "the first leaf: {first}");
        assert!(
            full.iter().all(|&n| n == 13),
            "every leaf but the first holds 13 entries: {lengths:?}"
        );
    }

    /// Appends to several ascending regions at once, removals from their fronts (a queue),
    /// inserts into the middle and reads, one key at a time: the tree holds what a map does,
    /// before and after a reopen, and leaves split in the middle by reads or inserts inside
    /// them keep working with leaves split at their ends by appends.
    #[test]
    fn appends_removals_and_inserts_inside_leaves_keep_the_tree_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = open_raw(dir.path());
        let mut model = std::collections::BTreeMap::new();
        // A fixed, simple pseudo-random sequence: the test is the same at every run.
        let mut x: u32 = 0x9e37_79b9;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        let key = |region: u8, n: u32| {
            let mut k = vec![region];
            k.extend_from_slice(&n.to_be_bytes());
            k
        };
        let (mut head, mut tail) = ([0u32; 3], [0u32; 3]);
        for step in 0..6000u32 {
            let r = next();
            let region = (r % 3) as u8;
            let i = usize::from(region);
            match (r >> 8) % 8 {
                0..=3 => {
                    let k = key(b'a' + region, tail[i] * 4);
                    tail[i] += 1;
                    db.insert(k.clone(), &step.to_be_bytes()[..])
                        .expect("append");
                    model.insert(k, step.to_be_bytes().to_vec());
                }
                4 if head[i] < tail[i] => {
                    let k = key(b'a' + region, head[i] * 4);
                    head[i] += 1;
                    db.remove(&k).expect("remove");
                    model.remove(&k);
                }
                5 if tail[i] > 0 => {
                    // Between two appended keys, anywhere in the region.
                    let k = key(b'a' + region, (r >> 12) % (tail[i] * 4));
                    db.insert(k.clone(), &b"inside"[..]).expect("insert inside");
                    model.insert(k, b"inside".to_vec());
                }
                _ => {
                    let k = key(b'a' + region, (r >> 12) % (tail[i] * 4 + 1));
                    assert_eq!(
                        db.get(&k).expect("get").map(|v| v.to_vec()),
                        model.get(&k).cloned()
                    );
                }
            }
        }
        assert_eq!(contents(&db), model);
        let lengths = db.leaf_lengths().expect("leaves");
        assert_eq!(lengths.iter().sum::<usize>(), model.len());
        assert!(lengths.iter().all(|&n| n <= 17), "{lengths:?}");
        db.flush().expect("flush");
        drop(db);
        let db = open_raw(dir.path());
        assert_eq!(contents(&db), model, "after a reopen");
        db.verify_integrity().expect("integrity");
    }

    /// A batch of 5 KiB values is written in groups small enough that no page becomes a blob
    /// file (sled writes a page past 128 KiB as one, and the flusher syncs each).
    #[test]
    fn grouped_pages_stay_below_blob_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = open_raw(dir.path());
        let mut b = Batch::default();
        for n in 0..600u16 {
            b.insert(model_key(n * 3), model_value(n, 5 * 1024));
        }
        b.apply_to(&db).expect("apply");
        db.flush().expect("flush");
        let blobs = std::fs::read_dir(dir.path().join("blobs"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(blobs, 0, "no page of the batch was written as a blob");
        assert_eq!(db.len(), 600);
    }
}
