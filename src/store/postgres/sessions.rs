//! Sessions: claim, heartbeat, requeue, lease reclaim, cancel, removal, expiry, listings and
//! counts (inserts are in `insert.rs`). Each transition is one statement (or
//! one transaction under the session's row lock) whose `WHERE` is its precondition.

use deadpool_postgres::GenericClient;
use tokio_postgres::types::ToSql;

use super::rows::{
    SESSION_COLUMNS, attempts_to_json, error_columns, parse_status, row_get, session_from_row,
    to_i32, to_i64, to_u64, usage_columns,
};
use super::{ADVISORY_CLASS_QUOTA, PostgresStore, db_err, index_planned, listen};
use crate::session::{
    ATTEMPTS_KEPT, CancelDecision, Session, SessionKey, SessionStatus, Timestamp,
};
use crate::store::{
    AttemptRef, CancelOutcome, HeartbeatOutcome, LeaseReclaim, Reclaimed, RequeueOutcome,
    SessionCancel, SessionClaim, SessionCounts, SessionHeartbeat, SessionList, SessionPage,
    SessionRequeue, SessionsExpire, StoreError, StoreResult, key_name,
};

/// Longest session list page (the trait's documented range).
const LIST_LIMIT_MAX: usize = 1000;

/// The compare-and-set precondition of every worker transition; `$1..$3` are the attempt's id,
/// number and owner, `$tenant` its tenant.
pub(super) fn if_running(tenant: usize) -> String {
    format!(
        "tenant = ${tenant} AND id = $1 AND status = 'RUNNING' AND attempt = $2 AND lease_owner = $3"
    )
}

/// The claim's `UPDATE` of the sessions whose `seq`s the query `due` chose: `$1` now, `$3` the
/// owner, `$4` the lease's expiry. `locked`: `due` locks its rows (`FOR UPDATE`, which rechecks
/// them PENDING in their newest version), else the update checks the status itself.
///
/// The rows are found by `seq = ANY(...)` (an index scan of `sessions_seq_key`), not by joining
/// `due` back on the key: that join's generic plan, which a prepared statement switches to
/// after a few runs, is a hash join over a sequential scan of every session (measured: 35 ms
/// per claim of 256 with 60,000 PENDING, growing with the table; this statement takes about
/// 1.5 ms in both plans, plus the trigger). A row that another transaction changed after this
/// statement began is followed to its newest version, as with the join.
///
/// With its rows locked the update has no status condition: with one, the planner may scan
/// every PENDING session through `sessions_claim_idx` and filter them by `seq` (it did, with
/// statistics older than the queue's growth: a claim of a few sessions read the whole backlog,
/// and the end-to-end bench lost 15%). The quota path reads every PENDING session anyway.
fn claim_update(due: &str, locked: bool) -> String {
    let recheck = if locked {
        ""
    } else {
        " AND status = 'PENDING'"
    };
    format!(
        "UPDATE sessions SET status = 'RUNNING', attempt = attempt + 1,
             lease_owner = $3, lease_expires_at = $4,
             start_time = COALESCE(start_time, $1), end_time = NULL,
             running_since = $1, progress_this_attempt = false, updated_at = $1,
             attempts = (CASE WHEN jsonb_array_length(attempts) >= {ATTEMPTS_KEPT}
                         THEN attempts - 0 ELSE attempts END)
                 || jsonb_build_array(jsonb_build_object('attempt', attempt + 1,
                     'started_at', $1::bigint, 'ended_at', NULL, 'outcome', NULL))
         WHERE seq = ANY(ARRAY({due})){recheck}
         RETURNING {SESSION_COLUMNS}, priority"
    )
}

impl PostgresStore {
    pub(super) async fn get_session(&self, id: &SessionKey) -> StoreResult<Option<Session>> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE tenant = $2 AND id = $1"
            ))
            .await
            .map_err(db_err("preparing a session read"))?;
        let row = client
            .query_opt(&stmt, &[&id.id.as_str(), &id.tenant()])
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
        let sessions = rows
            .iter()
            .map(session_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(SessionPage::of(sessions, p.limit))
    }

    pub(super) async fn claim_sessions(&self, p: SessionClaim) -> StoreResult<Vec<Session>> {
        if p.limit == 0 {
            // A worker with no free slot claims nothing (the conformance suite's rule).
            return Ok(Vec::new());
        }
        let limit = i64::try_from(p.limit).unwrap_or(i64::MAX);
        let expires = p.now.add(p.lease).0;
        let quotas = self
            .quotas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let max_running = &quotas.max_running;
        let rows = if max_running.is_empty() {
            let mut client = self.client().await?;
            // One statement: rows locked by a concurrent claim are skipped, not waited for, and
            // the locks are held only until its transaction commits right after it. Planned to
            // read `sessions_claim_idx` in order up to the limit ([`BEGIN_INDEX_PLANS`]); with stale
            // statistics the planner read and sorted every PENDING session for each claim.
            static CLAIM: std::sync::OnceLock<String> = std::sync::OnceLock::new();
            let claim = CLAIM.get_or_init(|| {
                claim_update(
                    "SELECT seq FROM sessions
                     WHERE status = 'PENDING' AND run_at <= $1
                     ORDER BY priority DESC, run_at, seq
                     LIMIT $2
                     FOR UPDATE SKIP LOCKED",
                    true,
                )
            });
            index_planned(
                &mut client,
                claim,
                &[&p.now.0, &limit, &p.owner, &expires],
                "claiming sessions",
            )
            .await?
        } else {
            let mut client = self.client().await?;
            let tx = client
                .transaction()
                .await
                .map_err(db_err("starting a transaction"))?;
            // Claims serialize while limits are set, so that two cannot both take a client's
            // last slot; the RUNNING counts below see every claim committed before this one.
            tx.execute(
                "SELECT pg_advisory_xact_lock($1, 0)",
                &[&ADVISORY_CLASS_QUOTA],
            )
            .await
            .map_err(db_err("locking the claim quotas"))?;
            let clients: Vec<&str> = max_running.keys().map(String::as_str).collect();
            let running = tx
                .query(
                    "SELECT client_id, count(*) FROM sessions \
                     WHERE status = 'RUNNING' AND client_id = ANY($1) GROUP BY client_id",
                    &[&clients],
                )
                .await
                .map_err(db_err("counting RUNNING sessions of limited clients"))?;
            let mut allowed: Vec<i64> = Vec::with_capacity(clients.len());
            for c in &clients {
                let limit = to_i64(max_running.get(*c).copied().unwrap_or(0), "max_running")?;
                let mut n = 0i64;
                for row in &running {
                    if row_get::<String>(row, 0, "sessions/client_id")? == *c {
                        n = row_get(row, 1, "sessions/count")?;
                    }
                }
                allowed.push((limit - n).max(0));
            }
            // A limited client's due sessions beyond its free slots are passed over (they stay
            // PENDING), so the next eligible sessions (other clients') are taken instead.
            let rows = tx
                .query(
                    &claim_update(
                        "SELECT c.seq FROM (
                             SELECT client_id, priority, run_at, seq,
                                 row_number() OVER (PARTITION BY client_id
                                     ORDER BY priority DESC, run_at, seq) AS rn
                             FROM sessions WHERE status = 'PENDING' AND run_at <= $1) c
                         LEFT JOIN unnest($5::text[], $6::int8[]) AS allow(client, n)
                             ON allow.client = c.client_id
                         WHERE allow.client IS NULL OR c.rn <= allow.n
                         ORDER BY c.priority DESC, c.run_at, c.seq
                         LIMIT $2",
                        false,
                    ),
                    &[&p.now.0, &limit, &p.owner, &expires, &clients, &allowed],
                )
                .await
                .map_err(db_err("claiming sessions within the clients' max_running"))?;
            tx.commit().await.map_err(db_err("committing the claim"))?;
            rows
        };
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
                "UPDATE sessions SET lease_expires_at = $4 WHERE {} \
                 RETURNING cancel_requested",
                if_running(5)
            ))
            .await
            .map_err(db_err("preparing a heartbeat"))?;
        let a = &p.attempt;
        let attempt = to_i32(a.attempt, "attempt")?;
        let row = client
            .query_opt(
                &stmt,
                &[
                    &a.id.id.as_str(),
                    &attempt,
                    &a.owner,
                    &p.now.add(p.lease).0,
                    &a.id.tenant(),
                ],
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

    /// The row of an attempt that still holds its lease, locked until the transaction ends.
    async fn lock_running(
        tx: &deadpool_postgres::Transaction<'_>,
        a: &AttemptRef,
    ) -> StoreResult<Option<Session>> {
        let stmt = tx
            .prepare_cached(&format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE {} FOR UPDATE",
                if_running(4)
            ))
            .await
            .map_err(db_err("preparing a locked read"))?;
        let attempt = to_i32(a.attempt, "attempt")?;
        let row = tx
            .query_opt(
                &stmt,
                &[&a.id.id.as_str(), &attempt, &a.owner, &a.id.tenant()],
            )
            .await
            .map_err(db_err(&format!("reading session {} to change it", a.id)))?;
        row.as_ref().map(session_from_row).transpose()
    }

    pub(super) async fn requeue_session(&self, p: SessionRequeue) -> StoreResult<Option<Session>> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(db_err("starting a transaction"))?;
        let Some(old) = Self::lock_running(&tx, &p.attempt).await? else {
            return Ok(None);
        };
        let (s, _) = old.requeued(p.spend_attempt, p.run_at, p.error, p.cleanup_after, p.now);
        write_sessions(&tx, std::slice::from_ref(&s)).await?;
        tx.commit()
            .await
            .map_err(db_err(&format!("committing the requeue of {}", s.id)))?;
        if s.status == SessionStatus::Pending {
            self.wake_local();
        }
        Ok(Some(s))
    }

    pub(super) async fn reclaim_leases(&self, p: LeaseReclaim) -> StoreResult<Vec<Reclaimed>> {
        if p.limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(p.limit).unwrap_or(i64::MAX);
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(db_err("starting a transaction"))?;
        // Rows another reclaimer holds are skipped, not waited for; lease-expiry order, as sled.
        let rows = tx
            .query(
                &format!(
                    "SELECT {SESSION_COLUMNS} FROM sessions \
                     WHERE status = 'RUNNING' AND lease_expires_at <= $1 \
                     ORDER BY lease_expires_at, id LIMIT $2 FOR UPDATE SKIP LOCKED"
                ),
                &[&p.expired_before.0, &limit],
            )
            .await
            .map_err(db_err("reading expired leases"))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let old = session_from_row(row)?;
            let (s, outcome) = old.reclaimed(p.backoff, p.cleanup_after, p.now);
            out.push(Reclaimed {
                id: s.key(),
                attempt: old.attempt,
                outcome,
                session: Box::new(s),
            });
        }
        let sessions: Vec<Session> = out.iter().map(|r| (*r.session).clone()).collect();
        write_sessions(&tx, &sessions).await?;
        tx.commit()
            .await
            .map_err(db_err("committing the lease reclaim"))?;
        if out.iter().any(|r| r.outcome == RequeueOutcome::Requeued) {
            self.wake_local();
        }
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
                &format!(
                    "SELECT {SESSION_COLUMNS} FROM sessions WHERE tenant = $2 AND id = $1 \
                     FOR UPDATE"
                ),
                &[&p.id.id.as_str(), &p.id.tenant()],
            )
            .await
            .map_err(db_err(&format!("reading session {} to cancel it", p.id)))?;
        let Some(row) = row else {
            return Ok(CancelOutcome::NotFound);
        };
        let old = session_from_row(&row)?;
        let (s, outcome) = match old.cancel(p.cleanup_after, p.now) {
            CancelDecision::Cancel(s) => (s.clone(), CancelOutcome::Cancelled(Box::new(s))),
            CancelDecision::Request(s) => (s.clone(), CancelOutcome::Requested(Box::new(s))),
            CancelDecision::AlreadyRequested => return Ok(CancelOutcome::Requested(Box::new(old))),
            CancelDecision::AlreadyTerminal => {
                return Ok(CancelOutcome::AlreadyTerminal(Box::new(old)));
            }
        };
        write_sessions(&tx, std::slice::from_ref(&s)).await?;
        tx.commit().await.map_err(db_err("committing a cancel"))?;
        if matches!(outcome, CancelOutcome::Requested(_)) {
            // This process's workers at once; other processes' through their listeners. After
            // the commit, so the flag is visible to whoever acts on the notification.
            let _ = self.cancels.send(s.key());
            let payload = listen::cancel_payload(&self.schema, &s.key());
            if let Err(e) = client
                .execute(
                    "SELECT pg_notify($1, $2)",
                    &[&listen::CANCEL_CHANNEL, &payload],
                )
                .await
            {
                tracing::warn!(session = %s.id, error = %e, "could not NOTIFY the cancel; the worker holding the session sees it at its next heartbeat");
            }
        }
        Ok(outcome)
    }

    pub(super) async fn remove_session(&self, id: &SessionKey) -> StoreResult<Option<Session>> {
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
                &format!(
                    "DELETE FROM sessions WHERE tenant = $2 AND id = $1 \
                     RETURNING {SESSION_COLUMNS}"
                ),
                &[&id.id.as_str(), &id.tenant()],
            )
            .await
            .map_err(db_err(&format!("removing session {id}")))?;
        let Some(row) = row else { return Ok(None) };
        let session = session_from_row(&row)?;
        delete_session_data(&tx, &[id.tenant()], &[id.id.as_str()]).await?;
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
                    "DELETE FROM sessions WHERE (tenant, id) IN (
                         SELECT tenant, id FROM sessions
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
            let tenants: Vec<&str> = sessions
                .iter()
                .map(|s| s.tenant.as_deref().unwrap_or(""))
                .collect();
            let ids: Vec<&str> = sessions.iter().map(|s| s.id.as_str()).collect();
            delete_session_data(&tx, &tenants, &ids).await?;
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
    tenants: &[&str],
    ids: &[&str],
) -> StoreResult<()> {
    for table in ["records", "frontier", "seen", "log", "context"] {
        tx.execute(
            &format!(
                "DELETE FROM {table} t USING unnest($1::text[], $2::text[]) AS k(tenant, id) \
                 WHERE t.tenant = k.tenant AND t.session_id = k.id"
            ),
            &[&tenants, &ids],
        )
        .await
        .map_err(db_err(&format!(
            "removing the {table} of {} session(s)",
            ids.len()
        )))?;
    }
    Ok(())
}

/// Writes every mutable column of `sessions` (state-machine results) to their rows, in one
/// statement, inside the caller's transaction (which holds the rows' locks).
pub(super) async fn write_sessions(
    tx: &deadpool_postgres::Transaction<'_>,
    sessions: &[Session],
) -> StoreResult<()> {
    if sessions.is_empty() {
        return Ok(());
    }
    let n = sessions.len();
    let mut ids = Vec::with_capacity(n);
    let mut tenants = Vec::with_capacity(n);
    let mut status = Vec::with_capacity(n);
    let mut attempt = Vec::with_capacity(n);
    let mut failures = Vec::with_capacity(n);
    let mut progress = Vec::with_capacity(n);
    let mut lease_owner = Vec::with_capacity(n);
    let mut lease_expires = Vec::with_capacity(n);
    let mut cancel = Vec::with_capacity(n);
    let mut run_at = Vec::with_capacity(n);
    let mut updated = Vec::with_capacity(n);
    let mut cleanup = Vec::with_capacity(n);
    let mut start = Vec::with_capacity(n);
    let mut end = Vec::with_capacity(n);
    let mut pages = Vec::with_capacity(n);
    let mut elements = Vec::with_capacity(n);
    let mut usage: [Vec<i64>; 5] = Default::default();
    let mut error_kind = Vec::with_capacity(n);
    let mut error_message = Vec::with_capacity(n);
    let mut checkpoints = Vec::with_capacity(n);
    let mut records = Vec::with_capacity(n);
    let mut records_removed = Vec::with_capacity(n);
    let mut running_ms = Vec::with_capacity(n);
    let mut running_since = Vec::with_capacity(n);
    let mut attempts = Vec::with_capacity(n);
    for s in sessions {
        ids.push(s.id.as_str());
        tenants.push(s.tenant.as_deref().unwrap_or(""));
        status.push(s.status.as_str());
        attempt.push(to_i32(s.attempt, "attempt")?);
        failures.push(to_i32(s.failures, "failures")?);
        progress.push(s.progress_this_attempt);
        lease_owner.push(s.lease.as_ref().map(|l| l.owner.as_str()));
        lease_expires.push(s.lease.as_ref().map(|l| l.expires_at.0));
        cancel.push(s.cancel_requested);
        run_at.push(s.run_at.0);
        updated.push(s.updated_at.0);
        cleanup.push(s.cleanup_at.map(|t| t.0));
        start.push(s.metrics.start_time.map(|t| t.0));
        end.push(s.metrics.end_time.map(|t| t.0));
        pages.push(to_i64(s.metrics.pages_processed, "pages_processed")?);
        elements.push(to_i64(s.metrics.processed_elements, "processed_elements")?);
        for (col, v) in usage.iter_mut().zip(usage_columns(&s.usage)?) {
            col.push(v);
        }
        let (k, m) = error_columns(s.error.as_ref());
        error_kind.push(k);
        error_message.push(m);
        checkpoints.push(to_i64(s.checkpoints, "checkpoints")?);
        records.push(to_i64(s.records, "records")?);
        records_removed.push(to_i64(s.records_removed, "records_removed")?);
        running_ms.push(to_i64(s.metrics.running_ms, "running_ms")?);
        running_since.push(s.metrics.running_since.map(|t| t.0));
        attempts.push(attempts_to_json(&s.attempts));
    }
    let stmt = tx
        .prepare_cached(
            "UPDATE sessions SET status = u.status, attempt = u.attempt, failures = u.failures,
                 progress_this_attempt = u.progress, lease_owner = u.lease_owner,
                 lease_expires_at = u.lease_expires, cancel_requested = u.cancel,
                 run_at = u.run_at, updated_at = u.updated, cleanup_at = u.cleanup,
                 start_time = u.start_time, end_time = u.end_time,
                 pages_processed = u.pages, processed_elements = u.elements,
                 http_requests = u.requests, http_errors = u.errors,
                 bytes_received = u.bytes, retries = u.retries,
                 robots_blocked = u.robots, error_kind = u.error_kind,
                 error_message = u.error_message, checkpoints = u.checkpoints,
                 records = u.records, records_removed = u.records_removed,
                 running_ms = u.running_ms, running_since = u.running_since,
                 attempts = u.attempts
             FROM unnest($1::text[], $2::text[], $3::int4[], $4::int4[], $5::bool[],
                 $6::text[], $7::int8[], $8::bool[], $9::int8[], $10::int8[], $11::int8[],
                 $12::int8[], $13::int8[], $14::int8[], $15::int8[], $16::int8[], $17::int8[],
                 $18::int8[], $19::int8[], $20::int8[], $21::text[], $22::text[], $23::int8[],
                 $24::int8[], $25::int8[], $26::int8[], $27::int8[], $28::jsonb[], $29::text[])
                 AS u(id, status, attempt, failures, progress, lease_owner, lease_expires,
                      cancel, run_at, updated, cleanup, start_time, end_time, pages, elements,
                      requests, errors, bytes, retries, robots, error_kind, error_message,
                      checkpoints, records, records_removed, running_ms, running_since,
                      attempts, tenant)
             WHERE sessions.tenant = u.tenant AND sessions.id = u.id",
        )
        .await
        .map_err(db_err("preparing a session write"))?;
    let params: [&(dyn ToSql + Sync); 29] = [
        &ids,
        &status,
        &attempt,
        &failures,
        &progress,
        &lease_owner,
        &lease_expires,
        &cancel,
        &run_at,
        &updated,
        &cleanup,
        &start,
        &end,
        &pages,
        &elements,
        &usage[0],
        &usage[1],
        &usage[2],
        &usage[3],
        &usage[4],
        &error_kind,
        &error_message,
        &checkpoints,
        &records,
        &records_removed,
        &running_ms,
        &running_since,
        &attempts,
        &tenants,
    ];
    let written = tx
        .execute(&stmt, &params)
        .await
        .map_err(db_err("writing sessions"))?;
    if written != n as u64 {
        return Err(StoreError::Invalid(format!(
            "wrote {written} of {n} sessions: a locked row is missing"
        )));
    }
    Ok(())
}
