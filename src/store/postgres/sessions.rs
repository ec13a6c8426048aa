//! Sessions: insert (with the single-session-agent check), claim, heartbeat, requeue, lease
//! reclaim, cancel, removal, expiry, listings and counts. Each transition is one statement (or
//! one transaction under the session's row lock) whose `WHERE` is its precondition.

use deadpool_postgres::GenericClient;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::rows::{
    SESSION_COLUMNS, SpecRef, error_columns, parse_status, row_get, session_from_row, to_i32,
    to_i64, to_u32, to_u64, usage_columns,
};
use super::{ADVISORY_CLASS_AGENT, PostgresStore, db_err};
use crate::session::{Session, SessionId, SessionStatus, Timestamp};
use crate::store::{
    CancelOutcome, HeartbeatOutcome, InsertOutcome, LeaseReclaim, Reclaimed, RequeueOutcome,
    SessionCancel, SessionClaim, SessionCounts, SessionHeartbeat, SessionInsert, SessionList,
    SessionPage, SessionRequeue, SessionsExpire, StoreError, StoreResult, codec, key_name,
};

/// Longest session list page (the trait's documented range).
const LIST_LIMIT_MAX: usize = 1000;

/// The compare-and-set precondition of every worker transition; `$1..$3` are the attempt.
pub(super) const IF_RUNNING: &str =
    "id = $1 AND status = 'RUNNING' AND attempt = $2 AND lease_owner = $3";

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

    pub(super) async fn insert_session(&self, p: SessionInsert) -> StoreResult<InsertOutcome> {
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

    pub(super) async fn get_session(&self, id: &SessionId) -> StoreResult<Option<Session>> {
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

    pub(super) async fn list_sessions(&self, p: SessionList) -> StoreResult<SessionPage> {
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

    pub(super) async fn claim_sessions(&self, p: SessionClaim) -> StoreResult<Vec<Session>> {
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

    pub(super) async fn heartbeat(&self, p: SessionHeartbeat) -> StoreResult<HeartbeatOutcome> {
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

    pub(super) async fn requeue_session(&self, p: SessionRequeue) -> StoreResult<RequeueOutcome> {
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

    pub(super) async fn reclaim_leases(&self, p: LeaseReclaim) -> StoreResult<Vec<Reclaimed>> {
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

    pub(super) async fn cancel_session(&self, p: SessionCancel) -> StoreResult<CancelOutcome> {
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

    pub(super) async fn remove_session(&self, id: &SessionId) -> StoreResult<Option<Session>> {
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

    pub(super) async fn expire_sessions(&self, p: SessionsExpire) -> StoreResult<Vec<Session>> {
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

    pub(super) async fn count_sessions(&self, now: Timestamp) -> StoreResult<SessionCounts> {
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
