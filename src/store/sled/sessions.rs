//! Sessions (`S`) and their index keys (`W`, `P`, `G`, `C`, `A`, `T`, `Y`, `L`, `X`): claim, every transition of a running attempt, cancel, removal (`Z` until its data is purged)
//! and expiry, listings and counts (inserts are in `insert.rs`). Every transition is a read-check-write under the store mutex
//! that stages the session's new value and index changes into one [`Batch`]. Claims and
//! finishes prepare that work before they take the mutex ([`Prepared`]), and under it take a
//! prepared transition only if the session is still stored as it was read.
//!
//! # Claims
//!
//! A new session due at once goes straight to `P`, whose order is the claim order; scheduled and
//! requeued sessions go to `W` (keyed by run_at). A claim first moves the due ones of `W` (run_at
//! at or before its `now`) to `P`, then takes the first `limit` entries of `P`:
//! O(log n + claimed + promoted), and a not-yet-due high-priority session is never scanned by a
//! claim. A session in `P` stays due even if a later claim passes an earlier `now` (clocks only
//! move forward in practice).

use std::collections::HashMap;
use std::ops::Bound;

use sled::IVec;

use super::durability::Batch;
use super::keys::{
    T_CODES, data_prefix, id_after, k_active, k_agent, k_cleanup, k_client, k_lease, k_pending,
    k_pending_of, k_session, k_status, k_tombstone, k_wait, lp_prefix, newest, show_key,
    status_prefix, upto,
};
use super::{COUNTERS_KEY, Counters, SledStore, blocking, sled_err};
use crate::session::{CancelDecision, Session, SessionKey, SessionStatus, Timestamp};
use crate::store::{
    AttemptRef, CancelOutcome, CheckpointBatch, CheckpointCommit, HeartbeatOutcome, LeaseReclaim,
    Reclaimed, RequeueOutcome, SessionCancel, SessionClaim, SessionCounts, SessionFinish,
    SessionHeartbeat, SessionList, SessionPage, SessionRequeue, SessionsExpire, StoreError,
    StoreResult, codec,
};

// Sessions moved from `W` to `P` per claim at most: bounds the claim's batch; any remainder moves
// at the next claim.
const PROMOTE_MAX: usize = 10_000;

// Keys removed per batch when purging a removed session's data: bounds one batch's memory for a
// session with millions of records.
pub(super) const PURGE_CHUNK: usize = 10_000;

const LIST_LIMIT_MAX: usize = 1000;

/// Every index key the session has in its current state, except `W`/`P` (whose presence depends
/// on promotion, not on the session).
fn index_keys(s: &Session) -> Vec<Vec<u8>> {
    let mut keys = vec![k_client(s), k_status(s)];
    if let Some(agent) = &s.job.agent {
        keys.push(k_agent(agent, s));
        if s.status.is_active() {
            keys.push(k_active(s.client.client_id(), agent, s));
        }
    }
    if let (true, Some(at)) = (s.status.is_terminal(), s.cleanup_at) {
        keys.push(k_cleanup(at, s));
    }
    keys
}

/// Whether attempt `a` holds `s`: it is RUNNING in that attempt, under that owner's lease.
fn holds(s: &Session, a: &AttemptRef) -> bool {
    s.status == SessionStatus::Running
        && s.attempt == a.attempt
        && s.lease.as_ref().is_some_and(|l| l.owner == a.owner)
}

/// `s` after the finish `p` asks for.
fn finished_by(s: &Session, p: &SessionFinish) -> Session {
    s.finished(
        p.status,
        p.error.clone(),
        &p.batch.progress(),
        p.cleanup_after,
        p.now,
    )
}

/// A transition staged outside the store lock, from the session as it was read then
/// ([`SledStore::prepare_claims`], [`SledStore::prepare_finish`]); staged under the lock only
/// if the session's stored value is still the same bytes ([`SledStore::still_stored`]).
pub(super) struct Prepared {
    /// The session's stored value it was prepared from.
    raw: IVec,
    /// The session decoded from `raw`, kept for a finish (its checkpoint is staged from it
    /// under the lock); none for a claim, so that the claim does not drop it under the lock.
    old: Option<Session>,
    /// The session after the transition.
    new: Session,
    /// The new value, index and lease changes (not the counters, nor a checkpoint's changes:
    /// those are staged under the lock).
    batch: Batch,
}

/// The session's key in the lease index ([`SledStore::leases`]), when it is RUNNING.
fn lease_key(s: &Session) -> Option<Vec<u8>> {
    match (s.status, &s.lease) {
        (SessionStatus::Running, Some(lease)) => Some(k_lease(lease.expires_at, s)),
        _ => None,
    }
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
    /// The session when it is RUNNING with this attempt and owner.
    fn load_running(&self, a: &AttemptRef) -> StoreResult<Option<Session>> {
        Ok(self.load(&a.id)?.filter(|s| holds(s, a)))
    }

    /// Stages `new` (replacing `old`): the value, index changes and status counters.
    pub(super) fn stage(
        c: &mut Counters,
        b: &mut Batch,
        old: Option<&Session>,
        new: &Session,
    ) -> StoreResult<()> {
        Self::count(c, old.map(|o| o.status), new.status);
        Self::stage_keys(b, old, new)
    }

    /// Moves one session from status `old` (none: a new session) to `new` in the counters.
    fn count(c: &mut Counters, old: Option<SessionStatus>, new: SessionStatus) {
        if let Some(old) = old {
            let slot = &mut c.by_status[old.code() as usize];
            *slot = slot.saturating_sub(1);
        }
        c.by_status[new.code() as usize] += 1;
    }

    /// Stages `new` (replacing `old`): the value, index and lease changes, not the counters.
    fn stage_keys(b: &mut Batch, old: Option<&Session>, new: &Session) -> StoreResult<()> {
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
        let (old_lease, new_lease) = (old.and_then(lease_key), lease_key(new));
        if old_lease != new_lease {
            if let Some(k) = old_lease {
                b.unlease(k);
            }
            if let Some(k) = new_lease {
                b.lease(k);
            }
        }
        b.insert(k_session(new), codec::encode(new)?);
        Ok(())
    }

    /// Stages a new session's place in the claim queue: `P` when it is due at once (run_at not
    /// after its submission: nearly every session), else `W` until a claim promotes it. Going
    /// straight to `P` saves a due session the promotion's two writes under the store lock.
    pub(super) fn enqueue(c: &mut Counters, b: &mut Batch, s: &Session) {
        if s.run_at <= s.created_at {
            b.insert(k_pending_of(s), IVec::default());
            c.due += 1;
        } else {
            b.insert(k_wait(s), IVec::default());
        }
    }

    /// Stages taking a PENDING session out of the claim queue (`W` or `P`).
    fn unqueue(&self, c: &mut Counters, b: &mut Batch, s: &Session) -> StoreResult<()> {
        let p = k_pending_of(s);
        if self
            .db
            .contains_key(&p)
            .map_err(sled_err("reading the claim queue"))?
        {
            c.due = c.due.saturating_sub(1);
            b.remove(p);
        }
        b.remove(k_wait(s));
        Ok(())
    }

    /// Stages a checkpoint's data (records numbered after `s`'s committed ones, frontier, seen
    /// set, log) into `b`; the session's own counters are the policy's
    /// ([`Session::checkpointed`], [`Session::finished`]).
    fn stage_batch(&self, b: &mut Batch, s: &Session, batch: &CheckpointBatch) -> StoreResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let key = s.key();
        self.stage_records(b, &key, s.records, &batch.records)?;
        self.stage_frontier(b, &key, batch)?;
        if !batch.log.is_empty() {
            self.stage_log(b, &key, &batch.log)?;
        }
        if let Some(context) = &batch.context {
            Self::stage_context(b, &key, context)?;
        }
        Ok(())
    }

    /// Stages a transition the state machine decided, `old` → `new`: the value, index keys,
    /// status counters, and the claim queue when the session leaves PENDING (cancel) or
    /// re-enters it (requeue, reclaim). Not for claims, which take their queue entries as they
    /// scan them.
    fn stage_transition(
        &self,
        c: &mut Counters,
        b: &mut Batch,
        old: &Session,
        new: &Session,
    ) -> StoreResult<()> {
        if old.status == SessionStatus::Pending && new.status != SessionStatus::Pending {
            self.unqueue(c, b, old)?;
        }
        Self::stage(c, b, Some(old), new)?;
        if new.status == SessionStatus::Pending && old.status != SessionStatus::Pending {
            b.insert(k_wait(new), IVec::default());
        }
        Ok(())
    }

    /// Moves due sessions from `W` to `P` (at most [`PROMOTE_MAX`]).
    fn promote(&self, st: &mut Counters, now: Timestamp) -> StoreResult<()> {
        let mut c = st.clone();
        let mut b = Batch::default();
        let mut moved = 0;
        for kv in self.db.range(vec![b'W']..upto(b"W", now)).take(PROMOTE_MAX) {
            let (k, _) = kv.map_err(sled_err("reading the scheduled sessions"))?;
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

    /// Builds the lease index ([`SledStore::leases`]) from the RUNNING sessions, at open. They
    /// share `T`'s active code with the PENDING ones ([`t_code`](super::keys::t_code)), so the
    /// scan runs oldest first (claims take the oldest due sessions, so RUNNING ones sit at that
    /// end) and stops once it has found as many as the status counter says there are: none
    /// after a clean shutdown, and about the RUNNING ones, not the PENDING backlog, after a
    /// crash. The counter moves in the same atomic batch as every status change.
    pub(super) fn load_leases(&self) -> StoreResult<()> {
        let expected = self.lock().by_status[SessionStatus::Running.code() as usize];
        let prefix = status_prefix(SessionStatus::Running);
        let mut leases = std::collections::BTreeSet::new();
        let mut found = 0u64;
        for kv in self.db.scan_prefix(&prefix).rev() {
            if found >= expected {
                break;
            }
            let (k, _) = kv.map_err(sled_err("reading the active sessions"))?;
            match id_after(&k, prefix.len() + 8).and_then(|id| self.load(&id)) {
                Ok(Some(s)) if s.status == SessionStatus::Running => {
                    found += 1;
                    leases.extend(lease_key(&s));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "skipping an unreadable active session")
                }
            }
        }
        *self.leases() = leases;
        Ok(())
    }

    /// The RUNNING sessions, from the lease index (O(running); `T` holds them among the PENDING
    /// backlog). A session is read once its key is copied out, without the index's lock.
    fn running(&self) -> StoreResult<Vec<Session>> {
        let keys: Vec<SessionKey> = self
            .leases()
            .iter()
            .filter_map(|k| match id_after(k, 1 + 8) {
                Ok(id) => Some(id),
                Err(e) => {
                    tracing::warn!(error = %e, "skipping a malformed lease entry");
                    None
                }
            })
            .collect();
        let mut out = Vec::with_capacity(keys.len());
        for id in keys {
            match self.load(&id) {
                Ok(Some(s)) if s.status == SessionStatus::Running => out.push(s),
                Ok(_) => {} // ended since the index was read
                Err(e) => tracing::warn!(error = %e, "skipping an unreadable RUNNING session"),
            }
        }
        Ok(out)
    }

    /// A page of RUNNING sessions, newest first, through [`SledStore::running`].
    fn list_running(&self, p: &SessionList, cursor: Option<u64>) -> StoreResult<SessionPage> {
        let mut sessions: Vec<Session> = self
            .running()?
            .into_iter()
            .filter(|s| cursor.is_none_or(|c| s.seq < c) && listed(p, s))
            .collect();
        sessions.sort_unstable_by_key(|s| std::cmp::Reverse(s.seq));
        Ok(SessionPage::of(sessions, p.limit))
    }

    /// Removes a session and, in bounded chunks, all its data. Returns it and the ticket.
    fn remove_sync(&self, id: &SessionKey) -> StoreResult<(Option<Session>, Option<u64>)> {
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
            if let Some(k) = lease_key(&s) {
                b.unlease(k);
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

    /// [`Store::sessions_expire`](crate::store::Store::sessions_expire) without the wait: the
    /// removed sessions and the last ticket.
    fn expire_sync(&self, p: &SessionsExpire) -> StoreResult<(Vec<Session>, Option<u64>)> {
        let mut due = Vec::new();
        for kv in self.db.range(vec![b'X']..upto(b"X", p.now)).take(p.limit) {
            let (k, _) = kv.map_err(sled_err("reading the cleanup index"))?;
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
                    self.db
                        .remove(k)
                        .map_err(sled_err("removing a stale cleanup entry"))?;
                }
                Err(e) => tracing::warn!(session = %id, error = %e, "could not expire a session"),
            }
        }
        Ok((removed, last))
    }

    /// Deletes a removed session's data keyspaces in chunks, then its tombstone.
    fn purge(&self, id: &SessionKey) -> StoreResult<u64> {
        for tag in [
            b'R', b'E', b'B', b'J', b'Q', b'V', b'K', b'I', b'F', b'U', b'O', b'H',
        ] {
            let prefix = data_prefix(tag, id);
            // Each round deletes up to PURGE_CHUNK keys; 1 << 32 rounds bound the loop far beyond
            // any real session.
            for _ in 0..(1u64 << 32) {
                let _st = self.lock();
                let mut b = Batch::default();
                let mut n = 0;
                for kv in self.db.scan_prefix(&prefix).take(PURGE_CHUNK) {
                    b.remove(kv.map_err(sled_err("removing a session's data"))?.0);
                    n += 1;
                }
                if n == 0 {
                    break;
                }
                self.apply_atomic(b)?;
            }
        }
        let _st = self.lock();
        self.db
            .remove(k_tombstone(id))
            .map_err(sled_err("removing a removal marker"))?;
        Ok(self.durability.ticket())
    }

    pub(super) fn purge_interrupted(&self) -> StoreResult<()> {
        let mut ids = Vec::new();
        for kv in self.db.scan_prefix(b"Z") {
            let (k, _) = kv.map_err(sled_err("reading the removal markers"))?;
            match id_after(&k, 1) {
                Ok(id) => ids.push(id),
                Err(e) => tracing::warn!(error = %e, "skipping a malformed removal marker"),
            }
        }
        for id in ids {
            tracing::info!(session = %id, "finishing the removal of a session's data");
            self.purge(&id)?;
        }
        self.db
            .flush()
            .map_err(sled_err("flushing finished removals"))?;
        Ok(())
    }

    pub(super) fn list_sync(&self, p: &SessionList) -> StoreResult<SessionPage> {
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
        if p.status == Some(SessionStatus::Running) {
            return self.list_running(p, cursor);
        }
        // The most selective index available; the other filters are checked on each session.
        let prefix = if let Some(client) = &p.client_id {
            lp_prefix(b'C', client)
        } else if let Some(agent) = &p.agent {
            lp_prefix(b'A', agent)
        } else if let Some(status) = p.status {
            status_prefix(status)
        } else {
            // No filter: every `T` code's sessions, merged newest first.
            let merged = Newest(
                T_CODES
                    .iter()
                    .map(|&code| self.newest_after(vec![b'T', code], cursor).peekable())
                    .collect(),
            );
            return self.list_page(p, merged, 2);
        };
        let keys = self.newest_after(prefix.clone(), cursor);
        self.list_page(p, keys, prefix.len())
    }

    /// The keys under `prefix` (`prefix !seq id`), newest first, after the session `cursor`.
    fn newest_after(&self, prefix: Vec<u8>, cursor: Option<u64>) -> sled::Iter {
        let start = match cursor {
            Some(seq) => {
                let mut k = prefix.clone();
                k.extend_from_slice(&newest(seq));
                k.push(0xFF);
                Bound::Excluded(k)
            }
            None => Bound::Included(prefix.clone()),
        };
        let end = match prefix_end(&prefix) {
            Some(end) => Bound::Excluded(end),
            None => Bound::Unbounded,
        };
        self.db.range::<Vec<u8>, _>((start, end))
    }

    /// A page of the sessions that `keys` (index keys `prefix !seq id`, `prefix` being
    /// `prefix_len` bytes) name and `p` keeps.
    fn list_page(
        &self,
        p: &SessionList,
        keys: impl Iterator<Item = sled::Result<(IVec, IVec)>>,
        prefix_len: usize,
    ) -> StoreResult<SessionPage> {
        let mut sessions = Vec::new();
        for kv in keys {
            let (k, _) = kv.map_err(sled_err("listing sessions"))?;
            let id = match id_after(&k, prefix_len + 8) {
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
            if !listed(p, &s) {
                continue;
            }
            sessions.push(s);
            if sessions.len() > p.limit {
                break;
            }
        }
        Ok(SessionPage::of(sessions, p.limit))
    }

    pub(super) fn claim_sessions(&self, p: SessionClaim) -> StoreResult<Vec<Session>> {
        if p.limit == 0 {
            return Ok(Vec::new());
        }
        let prepared = self.prepare_claims(&p);
        self.claim_prepared(p, prepared)
    }

    /// The claim itself, under the lock: `prepared` ([`SledStore::prepare_claims`]) saves the
    /// work for each session it has, still stored as it read it.
    pub(super) fn claim_prepared(
        &self,
        p: SessionClaim,
        mut prepared: HashMap<IVec, Prepared>,
    ) -> StoreResult<Vec<Session>> {
        let claimed = {
            let mut st = self.lock();
            self.promote(&mut st, p.now)?;
            let mut c = st.clone();
            let mut b = Batch::default();
            let mut claimed = Vec::new();
            let mut changed = false;
            let quotas = self.quotas();
            let max_running = &quotas.max_running;
            // RUNNING sessions per limited client, counted up as this claim takes more.
            let mut running = if max_running.is_empty() {
                std::collections::BTreeMap::new()
            } else {
                self.running_per_client()?
            };
            for kv in self.db.scan_prefix(b"P") {
                if claimed.len() >= p.limit {
                    break;
                }
                let (k, _) = kv.map_err(sled_err("reading the claim queue"))?;
                let id = id_after(&k, 1 + 4 + 8 + 8);
                let ready = match (prepared.remove(&k), &id) {
                    (Some(f), Ok(id)) => self.still_stored(id, f)?,
                    _ => None,
                };
                let (s, changes) = match ready {
                    Some(f) => (f.new, f.batch),
                    None => match id.and_then(|id| self.load(&id)) {
                        Ok(Some(old)) if old.status == SessionStatus::Pending => {
                            Self::claim_changes(&old, &p)?
                        }
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
                    },
                };
                let client = s.client.client_id();
                if let Some(limit) = max_running.get(client) {
                    let n = running.entry(client.to_string()).or_insert(0);
                    if *n >= *limit {
                        // At its limit: left in the queue; the next eligible session is taken.
                        continue;
                    }
                    *n += 1;
                }
                b.remove(k);
                c.due = c.due.saturating_sub(1);
                Self::count(&mut c, Some(SessionStatus::Pending), s.status);
                b.append(changes);
                changed = true;
                claimed.push(s);
                // Small intents (a large one becomes a blob file); claims need no flush.
                if b.full() {
                    self.apply(&mut st, c.clone(), std::mem::take(&mut b))?;
                    changed = false;
                }
            }
            if changed {
                self.apply(&mut st, c, b)?;
            }
            claimed
        };
        Ok(claimed)
    }

    pub(super) fn heartbeat(&self, p: SessionHeartbeat) -> StoreResult<HeartbeatOutcome> {
        let mut st = self.lock();
        let Some(old) = self.load_running(&p.attempt)? else {
            return Ok(HeartbeatOutcome::Lost);
        };
        let s = old.heartbeat(p.lease, p.now);
        let mut c = st.clone();
        let mut b = Batch::default();
        Self::stage(&mut c, &mut b, Some(&old), &s)?;
        self.apply(&mut st, c, b)?;
        Ok(HeartbeatOutcome::Renewed {
            cancel_requested: s.cancel_requested,
        })
    }

    pub(super) async fn commit_checkpoint(
        &self,
        p: CheckpointCommit,
    ) -> StoreResult<Option<Session>> {
        self.index_before(&p.attempt.id, &p.batch)?;
        let (s, ticket) = {
            let mut st = self.lock();
            let Some(old) = self.load_running(&p.attempt)? else {
                return Ok(None);
            };
            let mut b = Batch::default();
            self.stage_batch(&mut b, &old, &p.batch)?;
            let s = old.checkpointed(&p.batch.progress(), p.lease, p.now);
            let mut c = st.clone();
            Self::stage(&mut c, &mut b, Some(&old), &s)?;
            let ticket = self.commit(&mut st, c, b)?;
            (s, ticket)
        };
        self.durability.wait(ticket).await?;
        Ok(Some(s))
    }

    pub(super) async fn finish_session(&self, p: SessionFinish) -> StoreResult<Option<Session>> {
        validate_terminal(p.status)?;
        self.index_before(&p.attempt.id, &p.batch)?;
        let (s, ticket) = {
            let mut st = self.lock();
            let mut c = st.clone();
            let mut b = Batch::default();
            let Some(s) = self.stage_finish(&mut c, &mut b, &p)? else {
                return Ok(None);
            };
            let ticket = self.commit(&mut st, c, b)?;
            (s, ticket)
        };
        self.durability.wait(ticket).await?;
        Ok(Some(s))
    }

    /// [`Store::session_finish_many`](crate::store::Store::session_finish_many): every finish
    /// staged under one hold of the lock, intents of bounded size, one flush.
    /// An item that cannot be staged gets its own error and leaves the others alone.
    pub(super) async fn finish_sessions(
        &self,
        items: &[SessionFinish],
    ) -> StoreResult<Vec<StoreResult<Option<Session>>>> {
        let ready = self.prepare_finishes(items);
        self.finish_prepared(items, ready).await
    }

    /// What [`SledStore::finish_sessions`] does outside the lock, as a finish of its own does it:
    /// and each finish is prepared from the session as it is now, so that the lock is held only
    /// to check that it is unchanged ([`SledStore::prepare_finish`]).
    pub(super) fn prepare_finishes(
        &self,
        items: &[SessionFinish],
    ) -> Vec<StoreResult<Option<Prepared>>> {
        items
            .iter()
            .map(|p| {
                validate_terminal(p.status)?;
                self.index_before(&p.attempt.id, &p.batch)?;
                Ok(self.prepare_finish(p))
            })
            .collect()
    }

    /// The finishes themselves, under the lock, with what [`SledStore::prepare_finishes`] gave
    /// for each.
    pub(super) async fn finish_prepared(
        &self,
        items: &[SessionFinish],
        ready: Vec<StoreResult<Option<Prepared>>>,
    ) -> StoreResult<Vec<StoreResult<Option<Session>>>> {
        let mut out = Vec::with_capacity(items.len());
        let ticket = {
            let mut st = self.lock();
            let mut c = st.clone();
            let mut b = Batch::default();
            let mut ended = std::collections::HashSet::with_capacity(items.len());
            let mut applied = false;
            for (p, ready) in items.iter().zip(ready) {
                let prepared = match ready {
                    Ok(prepared) => prepared,
                    Err(e) => {
                        out.push(Err(e));
                        continue;
                    }
                };
                if ended.contains(&p.attempt.id) {
                    // An earlier item ended this session (staged, so not yet in the tree that
                    // `stage_finish` reads). A refused one did not: a later item may apply.
                    out.push(Ok(None));
                    continue;
                }
                let (before, mark) = (c.clone(), b.mark());
                let staged = match prepared {
                    Some(f) => self.stage_prepared_finish(&mut c, &mut b, p, f),
                    None => self.stage_finish(&mut c, &mut b, p),
                };
                match staged {
                    Ok(Some(s)) => {
                        ended.insert(&p.attempt.id);
                        out.push(Ok(Some(s)));
                    }
                    Ok(None) => out.push(Ok(None)),
                    Err(e) => {
                        (c, b) = (before, b.truncated(mark));
                        out.push(Err(e));
                    }
                }
                // Small intents, as batch inserts keep them; one flush covers them all.
                if b.full() {
                    self.apply(&mut st, c.clone(), std::mem::take(&mut b))?;
                    applied = true;
                }
            }
            self.commit_rest(&mut st, c, b, applied)?
        };
        if let Some(ticket) = ticket {
            self.durability.wait(ticket).await?;
        }
        Ok(out)
    }

    /// Reads the session `p` ends and stages its new value and index changes, without the store
    /// lock: decoding, the transition and encoding are most of a finish's work, and the lock
    /// then only checks that the stored value is still the one read
    /// ([`SledStore::stage_prepared_finish`]). `None` when the attempt does not hold the session
    /// (or it cannot be read): the finish is then staged under the lock as it always was, which
    /// reports why.
    fn prepare_finish(&self, p: &SessionFinish) -> Option<Prepared> {
        let (raw, old) = self.load_raw(&p.attempt.id).ok()??;
        if !holds(&old, &p.attempt) {
            return None;
        }
        let new = finished_by(&old, p);
        let mut batch = Batch::default();
        Self::stage_keys(&mut batch, Some(&old), &new).ok()?;
        Some(Prepared {
            raw,
            old: Some(old),
            new,
            batch,
        })
    }

    /// `f`, if session `id`'s stored value is still the bytes `f` was prepared from: then the
    /// session is the one it read, and preparing it again would give the same changes. Called
    /// under the lock; `None` when something (a cancel, a heartbeat, a reclaim) came between.
    fn still_stored(&self, id: &SessionKey, f: Prepared) -> StoreResult<Option<Prepared>> {
        let now = self
            .db
            .get(k_session(id))
            .map_err(sled_err("reading a session"))?;
        Ok((now.as_ref() == Some(&f.raw)).then_some(f))
    }

    /// Sessions a claim like `p` would take, each with its claimed state staged, read without
    /// the lock: decoding, the transition and encoding are most of a claim's work. Keyed by
    /// their key in `P`; the claim still takes its sessions in `P`'s order under the lock, and
    /// takes one of these only if it is still stored as read ([`SledStore::still_stored`]).
    pub(super) fn prepare_claims(&self, p: &SessionClaim) -> HashMap<IVec, Prepared> {
        let mut out = HashMap::with_capacity(p.limit.min(1024));
        for kv in self.db.scan_prefix(b"P").take(p.limit) {
            let Ok((k, _)) = kv else { break };
            let Ok(Some((raw, old))) =
                id_after(&k, 1 + 4 + 8 + 8).and_then(|id| self.load_raw(&id))
            else {
                continue;
            };
            if old.status != SessionStatus::Pending {
                continue;
            }
            if let Ok((new, batch)) = Self::claim_changes(&old, p) {
                drop(old);
                out.insert(
                    k,
                    Prepared {
                        raw,
                        old: None,
                        new,
                        batch,
                    },
                );
            }
        }
        out
    }

    /// PENDING session `old` claimed by `p`, with its new value, index and lease changes (not
    /// its queue entry nor the counters, which the claim stages as it scans `P`).
    fn claim_changes(old: &Session, p: &SessionClaim) -> StoreResult<(Session, Batch)> {
        let new = old.claimed(&p.owner, p.lease, p.now);
        let mut batch = Batch::default();
        Self::stage_keys(&mut batch, Some(old), &new)?;
        Ok((new, batch))
    }

    /// Stages a finish [`SledStore::prepare_finish`] prepared if the session is still stored as
    /// it read it, else from the session as it is now ([`SledStore::stage_finish`]).
    fn stage_prepared_finish(
        &self,
        c: &mut Counters,
        b: &mut Batch,
        p: &SessionFinish,
        f: Prepared,
    ) -> StoreResult<Option<Session>> {
        let Some(Prepared {
            old: Some(old),
            new,
            batch,
            ..
        }) = self.still_stored(&p.attempt.id, f)?
        else {
            return self.stage_finish(c, b, p);
        };
        self.stage_batch(b, &old, &p.batch)?;
        b.append(batch);
        Self::count(c, Some(old.status), new.status);
        Ok(Some(new))
    }

    /// Stages ending the attempt `p` names (its last checkpoint and terminal status) into `b`
    /// and `c`; the session after it, `None` when the attempt no longer holds the session.
    fn stage_finish(
        &self,
        c: &mut Counters,
        b: &mut Batch,
        p: &SessionFinish,
    ) -> StoreResult<Option<Session>> {
        let Some(old) = self.load_running(&p.attempt)? else {
            return Ok(None);
        };
        self.stage_batch(b, &old, &p.batch)?;
        let s = finished_by(&old, p);
        self.stage_transition(c, b, &old, &s)?;
        Ok(Some(s))
    }

    pub(super) async fn requeue_session(&self, p: SessionRequeue) -> StoreResult<Option<Session>> {
        let (s, ticket) = {
            let mut st = self.lock();
            let Some(old) = self.load_running(&p.attempt)? else {
                return Ok(None);
            };
            let (s, _) = old.requeued(p.spend_attempt, p.run_at, p.error, p.cleanup_after, p.now);
            let mut c = st.clone();
            let mut b = Batch::default();
            self.stage_transition(&mut c, &mut b, &old, &s)?;
            let ticket = self.commit(&mut st, c, b)?;
            (s, ticket)
        };
        self.durability.wait(ticket).await?;
        if s.status == SessionStatus::Pending {
            self.pending.notify_one();
        }
        Ok(Some(s))
    }

    pub(super) async fn reclaim_leases(&self, p: LeaseReclaim) -> StoreResult<Vec<Reclaimed>> {
        let (reclaimed, ticket) = {
            let mut st = self.lock();
            let mut c = st.clone();
            let mut b = Batch::default();
            let mut reclaimed = Vec::new();
            let mut changed = false;
            // The expired entries, read in place: the index changes only in `apply_atomic`
            // and at open, both under the store mutex, which is held here; nothing below locks
            // it. After a crash of many workers it holds far more expired leases than one call
            // reclaims, so they are not copied out first.
            let leases = self.leases();
            for k in leases.range(vec![b'L']..upto(b"L", p.expired_before)) {
                if reclaimed.len() >= p.limit {
                    break;
                }
                let old = match id_after(k, 1 + 8).and_then(|id| self.load(&id)) {
                    Ok(Some(s))
                        if s.status == SessionStatus::Running
                            && s.lease.as_ref().is_some_and(|l| {
                                l.expires_at <= p.expired_before && k_lease(l.expires_at, &s) == *k
                            }) =>
                    {
                        s
                    }
                    other => {
                        if let Err(e) = other {
                            tracing::warn!(error = %e, "dropping an unreadable session's lease entry");
                        }
                        b.unlease(k.clone());
                        changed = true;
                        continue;
                    }
                };
                changed = true;
                let (s, outcome) = old.reclaimed(p.backoff, p.cleanup_after, p.now);
                self.stage_transition(&mut c, &mut b, &old, &s)?;
                reclaimed.push(Reclaimed {
                    id: s.key(),
                    attempt: old.attempt,
                    outcome,
                    session: Box::new(s),
                });
            }
            drop(leases);
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

    pub(super) async fn cancel_session(&self, p: SessionCancel) -> StoreResult<CancelOutcome> {
        let (outcome, ticket) = {
            let mut st = self.lock();
            let Some(old) = self.load(&p.id)? else {
                return Ok(CancelOutcome::NotFound);
            };
            let (s, outcome) = match old.cancel(p.cleanup_after, p.now) {
                CancelDecision::Cancel(s) => (s.clone(), CancelOutcome::Cancelled(Box::new(s))),
                CancelDecision::Request(s) => (s.clone(), CancelOutcome::Requested(Box::new(s))),
                CancelDecision::AlreadyRequested => {
                    return Ok(CancelOutcome::Requested(Box::new(old)));
                }
                CancelDecision::AlreadyTerminal => {
                    return Ok(CancelOutcome::AlreadyTerminal(Box::new(old)));
                }
            };
            let mut c = st.clone();
            let mut b = Batch::default();
            self.stage_transition(&mut c, &mut b, &old, &s)?;
            (outcome, self.commit(&mut st, c, b)?)
        };
        self.durability.wait(ticket).await?;
        if let CancelOutcome::Requested(s) = &outcome {
            // No receiver is fine: no worker runs here.
            let _ = self.cancels.send(s.key());
        }
        // A claimer may be waiting for a slot this frees up (spurious wakeups are allowed).
        self.pending.notify_one();
        Ok(outcome)
    }

    pub(super) async fn remove_session(&self, id: &SessionKey) -> StoreResult<Option<Session>> {
        let (removed, ticket) = blocking(|| self.remove_sync(id))?;
        if let Some(t) = ticket {
            self.durability.wait(t).await?;
        }
        Ok(removed)
    }

    pub(super) async fn expire_sessions(&self, p: SessionsExpire) -> StoreResult<Vec<Session>> {
        let (removed, last) = blocking(|| self.expire_sync(&p))?;
        if let Some(t) = last {
            self.durability.wait(t).await?;
        }
        Ok(removed)
    }

    /// Status counts are persistent counters (O(1)); the queue depth is the due index's counter
    /// plus a scan of the sessions that became due since the last claim (O(those)).
    pub(super) fn count_sessions(&self, now: Timestamp) -> StoreResult<SessionCounts> {
        let c = self.lock().clone();
        let mut waiting_due = 0u64;
        for kv in self.db.range(vec![b'W']..upto(b"W", now)) {
            kv.map_err(sled_err("counting due sessions"))?;
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

    /// The current limits, shared (no copy of the maps on the submit and claim paths).
    pub(super) fn quotas(&self) -> std::sync::Arc<crate::store::Quotas> {
        self.quotas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A client's sessions in `status`, through its `C` index (O(its sessions)).
    pub(super) fn count_client(&self, client: &str, status: SessionStatus) -> StoreResult<u64> {
        let prefix = lp_prefix(b'C', client);
        let mut n = 0;
        for kv in self.db.scan_prefix(&prefix) {
            let (k, _) = kv.map_err(sled_err("counting a client's sessions"))?;
            let Ok(key) = id_after(&k, prefix.len() + 8) else {
                continue;
            };
            if self
                .load(&key)
                .ok()
                .flatten()
                .is_some_and(|s| s.status == status)
            {
                n += 1;
            }
        }
        Ok(n)
    }

    /// RUNNING sessions per client, through the lease index (O(running)).
    fn running_per_client(&self) -> StoreResult<std::collections::BTreeMap<String, u64>> {
        let mut out = std::collections::BTreeMap::new();
        for s in self.running()? {
            *out.entry(s.client.client_id().to_string()).or_insert(0) += 1;
        }
        Ok(out)
    }
}

/// Whether `s` passes the filters of the listing `p`.
fn listed(p: &SessionList, s: &Session) -> bool {
    p.client_id
        .as_deref()
        .is_none_or(|c| c == s.client.client_id())
        && p.status.is_none_or(|st| st == s.status)
        && p.agent
            .as_ref()
            .is_none_or(|a| s.job.agent.as_ref() == Some(a))
}

/// The first key after every key that starts with `prefix`, `None` when there is none (a prefix
/// of 0xFF bytes only).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Index iterators of keys `code !seq id` (two bytes, then `!seq`), merged into one sequence
/// newest first. An error is passed on as soon as one stream shows it.
struct Newest(Vec<std::iter::Peekable<sled::Iter>>);

impl Iterator for Newest {
    type Item = sled::Result<(IVec, IVec)>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut best: Option<(usize, IVec)> = None;
        for (i, stream) in self.0.iter_mut().enumerate() {
            if matches!(stream.peek(), Some(Err(_))) {
                return stream.next();
            }
            if let Some(Ok((k, _))) = stream.peek()
                && best.as_ref().is_none_or(|(_, b)| k.get(2..) < b.get(2..))
            {
                best = Some((i, k.clone()));
            }
        }
        let (i, _) = best?;
        let item = self.0.get_mut(i)?.next();
        // Each stream reads the tree when the merge first gets to it, so a session that moved to
        // another code while a listing ran (RUNNING → COMPLETED: `T` 0 → 2) can be in two
        // streams, under the same `!seq id`: it is listed once.
        if let Some(Ok((k, _))) = &item {
            for (j, stream) in self.0.iter_mut().enumerate() {
                if j != i && matches!(stream.peek(), Some(Ok((o, _))) if o.get(2..) == k.get(2..)) {
                    stream.next();
                }
            }
        }
        item
    }
}
