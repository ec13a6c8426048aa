//! An attempt's commit: a checkpoint or a finish, with its batch of records, frontier changes,
//! seen URLs and log lines, in one transaction that first takes the session row by its
//! compare-and-set, so nothing is written unless the attempt still holds its lease.

use tokio_postgres::types::ToSql;

use super::rows::{
    SESSION_COLUMNS, error_columns, session_from_row, to_i32, to_i64, usage_columns,
};
use super::sessions::if_running;
use super::{PostgresStore, db_err};
use crate::session::{AttemptOutcome, Session, SessionError, SessionStatus, Timestamp};

/// A century in milliseconds: the cap of a cleanup delay, far inside bigint.
const CENTURY_MS: i64 = 100 * 365 * 86_400_000;
use crate::store::{
    AttemptRef, CheckpointBatch, CheckpointCommit, LOG_LINES_MAX, SessionFinish, StoreError,
    StoreResult,
};

/// How an attempt's commit ends: a checkpoint renews the lease, a finish ends the session.
enum Ending {
    Checkpoint {
        lease_expires_at: Timestamp,
    },
    Finish {
        status: SessionStatus,
        error: Option<SessionError>,
        cleanup_after_ms: i64,
    },
}

impl PostgresStore {
    pub(super) async fn commit_checkpoint(
        &self,
        p: CheckpointCommit,
    ) -> StoreResult<Option<Session>> {
        let ending = Ending::Checkpoint {
            lease_expires_at: p.now.add(p.lease),
        };
        self.attempt_commit(&p.attempt, &p.batch, p.now, ending)
            .await
    }

    pub(super) async fn finish_session(&self, p: SessionFinish) -> StoreResult<Option<Session>> {
        let ending = finish_ending(&p)?;
        self.attempt_commit(&p.attempt, &p.batch, p.now, ending)
            .await
    }

    /// [`Store::session_finish_many`](crate::store::Store::session_finish_many): one
    /// transaction, the finishes sent without waiting for each other's answers (pipelined on
    /// one connection), one commit. A statement that fails aborts the transaction: the call
    /// fails and nothing was written.
    pub(super) async fn finish_sessions(
        &self,
        items: &[SessionFinish],
    ) -> StoreResult<Vec<StoreResult<Option<Session>>>> {
        let endings: Vec<StoreResult<Ending>> = items.iter().map(finish_ending).collect();
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(db_err("starting a transaction"))?;
        // Per item: `Err` when refused before anything was sent, else the answer to its
        // statements.
        let answers: Vec<Result<StoreResult<Option<Session>>, StoreError>> = {
            let tx = &tx;
            futures::future::join_all(items.iter().zip(endings).map(|(p, ending)| async move {
                let ending = ending?;
                Ok(attempt_in(tx, &p.attempt, &p.batch, p.now, ending).await)
            }))
            .await
        };
        let mut out = Vec::with_capacity(answers.len());
        for a in answers {
            match a {
                Err(refused) => out.push(Err(refused)),
                Ok(Ok(s)) => out.push(Ok(s)),
                // The transaction is aborted; dropping it rolls back.
                Ok(Err(e)) => return Err(e),
            }
        }
        tx.commit()
            .await
            .map_err(db_err("committing a batch of finished sessions"))?;
        Ok(out)
    }

    /// Commits `batch` and `ending` in one transaction if the attempt still holds its lease;
    /// the session after it ([`attempt_in`]).
    async fn attempt_commit(
        &self,
        a: &AttemptRef,
        batch: &CheckpointBatch,
        now: Timestamp,
        ending: Ending,
    ) -> StoreResult<Option<Session>> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(db_err("starting a transaction"))?;
        let Some(session) = attempt_in(&tx, a, batch, now, ending).await? else {
            // Not ours any more; the transaction rolls back on drop having written nothing.
            return Ok(None);
        };
        tx.commit().await.map_err(db_err(&format!(
            "committing attempt {} of session {}",
            a.attempt, a.id
        )))?;
        Ok(Some(session))
    }
}

/// How a finish ends the session, or why it cannot.
fn finish_ending(p: &SessionFinish) -> StoreResult<Ending> {
    if !p.status.is_terminal() {
        return Err(StoreError::Invalid(format!(
            "session {} cannot finish as {}; use COMPLETED, FAILED or CANCELLED",
            p.attempt.id, p.status
        )));
    }
    // Capped so that now + delay stays far inside bigint (a century is ~3.2e12 ms).
    let cleanup_after_ms = i64::try_from(p.cleanup_after.as_millis())
        .unwrap_or(i64::MAX)
        .min(CENTURY_MS);
    Ok(Ending::Finish {
        status: p.status,
        error: p.error.clone(),
        cleanup_after_ms,
    })
}

/// Writes `batch` and `ending` inside `tx` if the attempt still holds its lease; the session
/// after it. One statement each, equal to the state machine's [`Session::checkpointed`] and
/// [`Session::finished`] (the conformance suite checks it).
async fn attempt_in(
    tx: &deadpool_postgres::Transaction<'_>,
    a: &AttemptRef,
    batch: &CheckpointBatch,
    now: Timestamp,
    ending: Ending,
) -> StoreResult<Option<Session>> {
    let attempt = to_i32(a.attempt, "attempt")?;
    let progress = batch.progress();
    let records = to_i64(progress.records, "records")?;
    let elements = to_i64(progress.elements, "elements")?;
    let pages = to_i64(batch.pages, "pages")?;
    let u = usage_columns(&batch.usage)?;
    let nonempty = !batch.is_empty();
    let checkpoint: i64 = nonempty.into();

    // The compare-and-set comes first: it locks the session row, so the batch below is
    // written only while this attempt holds the lease, and the record numbering cannot race.
    // Usage only with token tracking on (as `Session::checkpointed` says).
    const COUNTERS: &str = "pages_processed = pages_processed + $4, \
             processed_elements = processed_elements + $5, records = records + $13, \
             http_requests = http_requests + CASE WHEN token_tracking THEN $6::bigint ELSE 0 END, \
             http_errors = http_errors + CASE WHEN token_tracking THEN $7::bigint ELSE 0 END, \
             bytes_received = bytes_received + CASE WHEN token_tracking THEN $8::bigint ELSE 0 END, \
             retries = retries + CASE WHEN token_tracking THEN $9::bigint ELSE 0 END, \
             robots_blocked = robots_blocked + CASE WHEN token_tracking THEN $10::bigint ELSE 0 END, \
             checkpoints = checkpoints + $11, \
             progress_this_attempt = progress_this_attempt OR $11 > 0, updated_at = $12";
    let id = a.id.id.as_str();
    let tenant = a.id.tenant();
    // $1..$13, shared by both statements.
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![
        &id,
        &attempt,
        &a.owner,
        &pages,
        &elements,
        &u[0],
        &u[1],
        &u[2],
        &u[3],
        &u[4],
        &checkpoint,
        &now.0,
        &records,
    ];
    let (error_kind, error_message);
    let (status_text, outcome);
    let stmt = match &ending {
        Ending::Checkpoint { lease_expires_at } => {
            params.extend([&lease_expires_at.0 as &(dyn ToSql + Sync), &tenant]);
            tx.prepare_cached(&format!(
                "UPDATE sessions SET {COUNTERS}, lease_expires_at = $14 \
                 WHERE {} RETURNING {SESSION_COLUMNS}",
                if_running(15)
            ))
            .await
            .map_err(db_err("preparing a checkpoint"))?
        }
        Ending::Finish {
            status,
            error,
            cleanup_after_ms,
        } => {
            (error_kind, error_message) = error_columns(error.as_ref());
            (status_text, outcome) = (status.as_str(), AttemptOutcome::ended(*status).as_str());
            params.extend([
                &status_text as &(dyn ToSql + Sync),
                &error_kind,
                &error_message,
                cleanup_after_ms,
                &outcome,
                &tenant,
            ]);
            // The session's own timeout (cleanup_after_ms, set at insert) else the default;
            // the attempt running ends (`Session::finished`): its time counts, and its entry
            // in `attempts` gets its end and outcome.
            tx.prepare_cached(&format!(
                "UPDATE sessions SET {COUNTERS}, status = $14, error_kind = $15, \
                 error_message = $16, \
                 cleanup_at = $12::bigint + COALESCE(cleanup_after_ms, $17::bigint), \
                 end_time = $12, lease_owner = NULL, lease_expires_at = NULL, \
                 running_ms = running_ms + CASE WHEN running_since IS NULL THEN 0 \
                     ELSE GREATEST(0, $12::bigint - running_since) END, \
                 running_since = NULL, \
                 attempts = CASE WHEN jsonb_array_length(attempts) > 0 AND \
                     COALESCE(attempts->-1->'ended_at', 'null'::jsonb) = 'null'::jsonb \
                     THEN jsonb_set(jsonb_set(attempts, '{{-1,ended_at}}', \
                         to_jsonb($12::bigint)), '{{-1,outcome}}', to_jsonb($18::text)) \
                     ELSE attempts END \
                 WHERE {} RETURNING {SESSION_COLUMNS}",
                if_running(19)
            ))
            .await
            .map_err(db_err("preparing a finish"))?
        }
    };
    let row = tx.query_opt(&stmt, &params).await.map_err(db_err(&format!(
        "committing attempt {} of session {}",
        a.attempt, a.id
    )))?;
    let Some(row) = row else {
        return Ok(None);
    };
    let session = session_from_row(&row)?;
    if nonempty {
        let total = to_i64(session.records, "records")?;
        write_batch(tx, a, batch, total - records).await?;
    }
    Ok(Some(session))
}

/// Writes a checkpoint's records, frontier, seen set and log inside the caller's transaction.
/// `first_seq`: the number of the batch's first record.
async fn write_batch(
    tx: &deadpool_postgres::Transaction<'_>,
    a: &AttemptRef,
    batch: &CheckpointBatch,
    first_seq: i64,
) -> StoreResult<()> {
    let id = a.id.id.as_str();
    let tenant = a.id.tenant();
    let ctx = |what: &str| {
        format!(
            "writing the {what} of session {} attempt {}",
            a.id, a.attempt
        )
    };
    if !batch.records.is_empty() {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO records (tenant, session_id, seq, data)
                 SELECT $4, $1, $2 + t.ord - 1, t.data
                 FROM unnest($3::jsonb[]) WITH ORDINALITY AS t(data, ord)",
            )
            .await
            .map_err(db_err("preparing a records insert"))?;
        tx.execute(&stmt, &[&id, &first_seq, &batch.records, &tenant])
            .await
            .map_err(db_err(&ctx("records")))?;
    }
    // Added before removing: a URL found and fetched within one batch ends up not in the
    // frontier.
    if !batch.frontier_add.is_empty() {
        let urls: Vec<&str> = batch.frontier_add.iter().map(|f| f.url.as_str()).collect();
        let depths = batch
            .frontier_add
            .iter()
            .map(|f| to_i32(f.depth, "frontier depth"))
            .collect::<StoreResult<Vec<i32>>>()?;
        let pages: Vec<Option<&str>> = batch
            .frontier_add
            .iter()
            .map(|f| f.page.as_deref())
            .collect();
        let stmt = tx
            .prepare_cached(
                "INSERT INTO frontier (tenant, session_id, url, depth, page)
                 SELECT $5, $1, t.url, t.depth, t.page
                 FROM unnest($2::text[], $3::int4[], $4::text[]) WITH ORDINALITY
                     AS t(url, depth, page, ord)
                 ORDER BY t.ord
                 ON CONFLICT (tenant, session_id, url) DO NOTHING",
            )
            .await
            .map_err(db_err("preparing a frontier insert"))?;
        tx.execute(&stmt, &[&id, &urls, &depths, &pages, &tenant])
            .await
            .map_err(db_err(&ctx("frontier")))?;
    }
    if !batch.frontier_done.is_empty() {
        let stmt = tx
            .prepare_cached(
                "DELETE FROM frontier WHERE tenant = $3 AND session_id = $1 AND url = ANY($2)",
            )
            .await
            .map_err(db_err("preparing a frontier delete"))?;
        let done: Vec<&str> = batch.frontier_done.iter().map(|d| d.url.as_str()).collect();
        tx.execute(&stmt, &[&id, &done, &tenant])
            .await
            .map_err(db_err(&ctx("frontier")))?;
    }
    if !batch.seen_add.is_empty() {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO seen (tenant, session_id, url) SELECT $3, $1, unnest($2::text[])
                 ON CONFLICT (tenant, session_id, url) DO NOTHING",
            )
            .await
            .map_err(db_err("preparing a seen insert"))?;
        tx.execute(&stmt, &[&id, &batch.seen_add, &tenant])
            .await
            .map_err(db_err(&ctx("seen set")))?;
    }
    if let Some(context) = &batch.context {
        let variables = serde_json::to_value(context)
            .map_err(|e| StoreError::Invalid(format!("the context is not valid JSON: {e}")))?;
        let stmt = tx
            .prepare_cached(
                "INSERT INTO context (tenant, session_id, variables) VALUES ($3, $1, $2)
                 ON CONFLICT (tenant, session_id) DO UPDATE SET variables = EXCLUDED.variables",
            )
            .await
            .map_err(db_err("preparing a context write"))?;
        tx.execute(&stmt, &[&id, &variables, &tenant])
            .await
            .map_err(db_err(&ctx("context")))?;
    }
    if !batch.log.is_empty() {
        let at: Vec<i64> = batch.log.iter().map(|l| l.at.0).collect();
        let level: Vec<&str> = batch.log.iter().map(|l| l.level.as_str()).collect();
        let message: Vec<&str> = batch.log.iter().map(|l| l.message.as_str()).collect();
        let stmt = tx
            .prepare_cached(
                "INSERT INTO log (tenant, session_id, at, level, message)
                 SELECT $5, $1, t.at, t.level, t.message
                 FROM unnest($2::int8[], $3::text[], $4::text[]) WITH ORDINALITY
                     AS t(at, level, message, ord)
                 ORDER BY t.ord",
            )
            .await
            .map_err(db_err("preparing a log insert"))?;
        tx.execute(&stmt, &[&id, &at, &level, &message, &tenant])
            .await
            .map_err(db_err(&ctx("log")))?;
        let trim = tx
            .prepare_cached(
                "DELETE FROM log WHERE tenant = $3 AND session_id = $1 AND id <= (
                     SELECT id FROM log WHERE tenant = $3 AND session_id = $1 ORDER BY id DESC
                     OFFSET $2 LIMIT 1)",
            )
            .await
            .map_err(db_err("preparing a log trim"))?;
        tx.execute(&trim, &[&id, &(LOG_LINES_MAX as i64), &tenant])
            .await
            .map_err(db_err(&ctx("log")))?;
    }
    Ok(())
}
