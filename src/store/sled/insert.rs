//! Inserts: one session (duplicate, `max_pending` and single-session-agent checks) and batches
//! (every session staged under one lock, in intents of bounded size, waiting for one flush).

use super::durability::Batch;
use super::keys::{active_prefix, id_after, k_session, k_tombstone};
use super::{SledStore, sled_err};
use crate::session::{Session, SessionStatus};
use crate::store::{InsertOutcome, SessionInsert, StoreError, StoreResult};

impl SledStore {
    pub(super) async fn insert_session(&self, p: SessionInsert) -> StoreResult<InsertOutcome> {
        let mut s = p.session;
        if s.status != SessionStatus::Pending {
            return Err(StoreError::Invalid(format!(
                "a new session must be PENDING, not {}",
                s.status
            )));
        }
        let ticket = {
            let mut st = self.lock();
            if self
                .db
                .contains_key(k_session(&s))
                .map_err(sled_err("checking for the session"))?
                || self
                    .db
                    .contains_key(k_tombstone(&s))
                    .map_err(sled_err("checking for the session"))?
            {
                return Err(StoreError::Duplicate(s.id));
            }
            let max_pending = self.quotas().max_pending.get(s.client.client_id()).copied();
            if let Some(limit) = max_pending
                && self.count_client(s.client.client_id(), SessionStatus::Pending)? >= limit
            {
                return Ok(InsertOutcome::PendingQuota {
                    client: s.client.client_id().to_string(),
                    limit,
                });
            }
            if let Some(agent) = &p.single_agent {
                let prefix = active_prefix(s.client.client_id(), agent);
                if let Some(kv) = self.db.scan_prefix(&prefix).next() {
                    let (k, _) = kv.map_err(sled_err("checking the agent's active sessions"))?;
                    return Ok(InsertOutcome::AgentBusy(id_after(&k, prefix.len())?.id));
                }
            }
            let mut c = st.clone();
            s.seq = c.next_seq;
            c.next_seq += 1;
            let mut b = Batch::default();
            Self::stage(&mut c, &mut b, None, &s)?;
            Self::enqueue(&mut c, &mut b, &s);
            self.commit(&mut st, c, b)?
        };
        self.durability.wait(ticket).await?;
        self.pending.notify_one();
        Ok(InsertOutcome::Inserted(Box::new(s)))
    }

    /// [`Store::session_insert_many`]: every session checked and staged under one lock, in
    /// intents of at most ~32 KiB, one flush. A client's `max_pending` is counted once and the
    /// batch's own items count against it.
    pub(super) async fn insert_sessions(
        &self,
        sessions: Vec<Session>,
    ) -> StoreResult<Vec<StoreResult<InsertOutcome>>> {
        let mut out = Vec::with_capacity(sessions.len());
        let ticket = {
            let mut st = self.lock();
            let mut c = st.clone();
            let mut b = Batch::default();
            let mut keys = std::collections::HashSet::with_capacity(sessions.len());
            let quotas = self.quotas();
            let limits = &quotas.max_pending;
            let mut room: std::collections::HashMap<String, u64> = Default::default();
            let mut applied = false;
            for mut s in sessions {
                if s.status != SessionStatus::Pending {
                    out.push(Err(StoreError::Invalid(format!(
                        "a new session must be PENDING, not {}",
                        s.status
                    ))));
                    continue;
                }
                let key = s.key();
                let taken = !keys.insert(key.clone())
                    || self
                        .db
                        .contains_key(k_session(&key))
                        .map_err(sled_err("checking for the session"))?
                    || self
                        .db
                        .contains_key(k_tombstone(&key))
                        .map_err(sled_err("checking for the session"))?;
                if taken {
                    out.push(Err(StoreError::Duplicate(s.id)));
                    continue;
                }
                let client = s.client.client_id();
                if let Some(&limit) = limits.get(client) {
                    let left = match room.get_mut(client) {
                        Some(left) => left,
                        None => {
                            let pending = self.count_client(client, SessionStatus::Pending)?;
                            room.entry(client.to_string())
                                .or_insert(limit.saturating_sub(pending))
                        }
                    };
                    if *left == 0 {
                        out.push(Ok(InsertOutcome::PendingQuota {
                            client: client.to_string(),
                            limit,
                        }));
                        continue;
                    }
                    *left -= 1;
                }
                s.seq = c.next_seq;
                c.next_seq += 1;
                Self::stage(&mut c, &mut b, None, &s)?;
                Self::enqueue(&mut c, &mut b, &s);
                out.push(Ok(InsertOutcome::Inserted(Box::new(s))));
                // One intent per chunk keeps each intent small (a large value becomes a sled
                // blob file: written, synced and removed again); one flush after the last
                // chunk makes every chunk durable.
                if b.full() {
                    self.apply(&mut st, c.clone(), std::mem::take(&mut b))?;
                    applied = true;
                }
            }
            match self.commit_rest(&mut st, c, b, applied)? {
                Some(t) => t,
                None => return Ok(out),
            }
        };
        self.durability.wait(ticket).await?;
        self.pending.notify_waiters();
        self.pending.notify_one();
        Ok(out)
    }
}
