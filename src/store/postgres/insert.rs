//! Inserts: one session (with the single-session-agent and `max_pending` checks) and batches
//! (one transaction, pipelined).

use deadpool_postgres::GenericClient;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::rows::{
    SpecRef, attempts_to_json, error_columns, row_get, to_i32, to_i64, to_u64, usage_columns,
};
use super::{ADVISORY_CLASS_AGENT, ADVISORY_CLASS_QUOTA, PostgresStore, db_err};
use crate::session::{Session, SessionId, SessionStatus};
use crate::store::{InsertOutcome, SessionInsert, StoreError, StoreResult, codec};

impl PostgresStore {
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
                         error_message, checkpoints, spec, cleanup_after_ms, records,
                         records_removed, running_ms, running_since, attempts, token_tracking,
                         tenant)
                     VALUES ($1, $2, $3, 'PENDING', $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
                         $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28,
                         $29, $30, $31, $32, $33, $34, $35, $36)
                     ON CONFLICT (tenant, id) DO NOTHING
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
        let records = to_i64(s.records, "records")?;
        let records_removed = to_i64(s.records_removed, "records_removed")?;
        let running_ms = to_i64(s.metrics.running_ms, "running_ms")?;
        let running_since = s.metrics.running_since.map(|t| t.0);
        let attempts = attempts_to_json(&s.attempts);
        let tenant = s.tenant.as_deref().unwrap_or("");
        let params: [&(dyn ToSql + Sync); 36] = [
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
            &records,
            &records_removed,
            &running_ms,
            &running_since,
            &attempts,
            &s.options.token_tracking,
            &tenant,
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

    pub(super) async fn insert_session(&self, p: SessionInsert) -> StoreResult<InsertOutcome> {
        let session = p.session;
        if session.status != SessionStatus::Pending {
            return Err(StoreError::Invalid(format!(
                "session {} is inserted as {}; new sessions must be PENDING",
                session.id, session.status
            )));
        }
        let agent = session.job.agent.clone().or_else(|| p.single_agent.clone());
        let max_pending = self
            .quotas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .max_pending
            .get(session.client.client_id())
            .copied();
        let mut client = self.client().await?;
        let seq = match (&p.single_agent, max_pending) {
            (None, None) => self.insert_row(&client, &session, agent.as_deref()).await?,
            (single, max_pending) => {
                let tx = client
                    .transaction()
                    .await
                    .map_err(db_err("starting a transaction"))?;
                if let Some(limit) = max_pending {
                    let pending = pending_locked(&tx, session.client.client_id()).await?;
                    if pending >= limit {
                        return Ok(InsertOutcome::PendingQuota {
                            client: session.client.client_id().to_string(),
                            limit,
                        });
                    }
                }
                let Some(name) = single else {
                    let seq = self.insert_row(&tx, &session, agent.as_deref()).await?;
                    tx.commit()
                        .await
                        .map_err(db_err("committing the session insert"))?;
                    return self.inserted(session, seq);
                };
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
        self.inserted(session, seq)
    }

    /// The outcome of an insert that returned `seq` (`None`: the id is taken in its tenant).
    fn inserted(&self, mut session: Session, seq: Option<u64>) -> StoreResult<InsertOutcome> {
        let Some(seq) = seq else {
            return Err(StoreError::Duplicate(session.id));
        };
        self.wake_local();
        session.seq = seq;
        Ok(InsertOutcome::Inserted(Box::new(session)))
    }

    /// [`Store::session_insert_many`]: one transaction, the inserts pipelined on its
    /// connection; `ON CONFLICT DO NOTHING` turns a taken key into that item's `Duplicate`
    /// without aborting the others. A client with `max_pending` is locked and counted once (as
    /// `insert_session` does), and its items beyond the quota get `PendingQuota`.
    pub(super) async fn insert_sessions(
        &self,
        sessions: Vec<Session>,
    ) -> StoreResult<Vec<StoreResult<InsertOutcome>>> {
        let quotas = self
            .quotas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let limits = &quotas.max_pending;
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(db_err("starting a transaction"))?;
        // Room left under each limited client's quota, counted under its lock.
        let mut room: std::collections::HashMap<String, (u64, u64)> = Default::default();
        let mut clients: Vec<&str> = sessions
            .iter()
            .map(|s| s.client.client_id())
            .filter(|c| limits.contains_key(*c))
            .collect();
        clients.sort_unstable();
        clients.dedup();
        for c in clients {
            let limit = limits.get(c).copied().unwrap_or(u64::MAX);
            let pending = pending_locked(&tx, c).await?;
            room.insert(c.to_string(), (limit.saturating_sub(pending), limit));
        }
        let mut seen = std::collections::HashSet::with_capacity(sessions.len());
        // Decided before the database: `Some(outcome)`; to insert: `None`, in `accepted`.
        let mut decided: Vec<Option<StoreResult<InsertOutcome>>> =
            Vec::with_capacity(sessions.len());
        let mut accepted = Vec::new();
        for s in sessions {
            if s.status != SessionStatus::Pending {
                decided.push(Some(Err(StoreError::Invalid(format!(
                    "session {} is inserted as {}; new sessions must be PENDING",
                    s.id, s.status
                )))));
                continue;
            }
            if !seen.insert(s.key()) {
                decided.push(Some(Err(StoreError::Duplicate(s.id))));
                continue;
            }
            if let Some((left, limit)) = room.get_mut(s.client.client_id()) {
                if *left == 0 {
                    decided.push(Some(Ok(InsertOutcome::PendingQuota {
                        client: s.client.client_id().to_string(),
                        limit: *limit,
                    })));
                    continue;
                }
                *left -= 1;
            }
            decided.push(None);
            accepted.push(s);
        }
        let inserts = accepted
            .iter()
            .map(|s| self.insert_row(&tx, s, s.job.agent.as_deref()));
        let seqs = futures::future::try_join_all(inserts).await?;
        tx.commit()
            .await
            .map_err(db_err("committing the session inserts"))?;
        let mut stored = accepted.into_iter().zip(seqs);
        let mut out = Vec::with_capacity(decided.len());
        for d in decided {
            out.push(match d {
                Some(outcome) => outcome,
                None => match stored.next() {
                    Some((mut s, Some(seq))) => {
                        s.seq = seq;
                        Ok(InsertOutcome::Inserted(Box::new(s)))
                    }
                    Some((s, None)) => Err(StoreError::Duplicate(s.id)),
                    None => Err(StoreError::Invalid("a batch item was lost".into())),
                },
            });
        }
        if out
            .iter()
            .any(|o| matches!(o, Ok(InsertOutcome::Inserted(_))))
        {
            self.wake_local();
        }
        Ok(out)
    }
}

/// `client`'s PENDING sessions, counted after taking its quota lock: that lock serializes the
/// client's inserts (held to the end of `tx`), so the count sees every insert committed before.
async fn pending_locked(tx: &deadpool_postgres::Transaction<'_>, client: &str) -> StoreResult<u64> {
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&ADVISORY_CLASS_QUOTA, &client],
    )
    .await
    .map_err(db_err("locking the client's pending quota"))?;
    let row = tx
        .query_one(
            "SELECT count(*) FROM sessions WHERE client_id = $1 AND status = 'PENDING'",
            &[&client],
        )
        .await
        .map_err(db_err("counting the client's pending sessions"))?;
    to_u64(row_get::<i64>(&row, 0, "sessions/count")?, "count")
}
