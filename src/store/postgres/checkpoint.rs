//! An attempt's commit: a checkpoint or a finish, with its batch of records, frontier changes,
//! seen URLs and log lines, in one transaction that first takes the session row by its
//! compare-and-set, so nothing is written unless the attempt still holds its lease.

use std::collections::HashMap;

use tokio_postgres::types::ToSql;

use super::rows::{
    SESSION_COLUMN_COUNT, SESSION_COLUMNS, error_columns, row_get, session_from_row, to_i32,
    to_i64, usage_columns,
};
use super::sessions::if_running;
use super::{
    BEGIN_LOOKUP_PLANS, LOOKUP_PLANS, PostgresStore, db_err, query_planned, transaction_planned,
};
use crate::session::{AttemptOutcome, Session, Timestamp};

/// A century in milliseconds: the cap of a cleanup delay, far inside bigint.
const CENTURY_MS: i64 = 100 * 365 * 86_400_000;
use crate::store::{
    AttemptRef, CheckpointBatch, CheckpointCommit, LOG_LINES_MAX, SessionFinish, StoreError,
    StoreResult,
};

/// The counters every commit of an attempt adds to, with the values at `{p}4`..`{p}13` (`p`:
/// `$` for a statement's parameters, `t.c` for the columns of [`finish_sql`]'s rows): pages,
/// elements, the five usage counters (counted only with token tracking on, as
/// `Session::checkpointed` says), the checkpoint (0 or 1), now, and the batch's records.
fn counters(p: &str) -> String {
    format!(
        "pages_processed = pages_processed + {p}4, \
         processed_elements = processed_elements + {p}5, records = records + {p}13, \
         http_requests = http_requests + CASE WHEN token_tracking THEN {p}6::bigint ELSE 0 END, \
         http_errors = http_errors + CASE WHEN token_tracking THEN {p}7::bigint ELSE 0 END, \
         bytes_received = bytes_received + CASE WHEN token_tracking THEN {p}8::bigint ELSE 0 END, \
         retries = retries + CASE WHEN token_tracking THEN {p}9::bigint ELSE 0 END, \
         robots_blocked = robots_blocked + CASE WHEN token_tracking THEN {p}10::bigint ELSE 0 END, \
         checkpoints = checkpoints + {p}11, \
         progress_this_attempt = progress_this_attempt OR {p}11 > 0, updated_at = {p}12"
    )
}

/// Finishes, one row of `unnest` each, `t.c1`..`t.c19` in the order of a commit's parameters
/// (id, attempt, owner, the [`counters`] at 4..13, status, error kind and message, default
/// cleanup delay, outcome, tenant): one statement for the whole batch, equal to the state
/// machine's [`Session::finished`] for each row (the conformance suite checks it). The session
/// ends: its own timeout (`cleanup_after_ms`, set at insert) else the default starts, the
/// running attempt's time counts, and its entry in `attempts` gets its end and outcome.
///
/// The planner is held to one plan ([`LOOKUP_PLANS`]): for each row, the session by its primary
/// key. `status || ''` keeps `sessions_lease_idx` (`WHERE status = 'RUNNING'`) out of the
/// candidates: with statistics from when few sessions ran, the planner read that index whole,
/// with a filter, for each finish (seen with auto_explain in `bench queue`).
fn finish_sql() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        format!(
            "UPDATE sessions SET {}, status = t.c14, error_kind = t.c15, error_message = t.c16, \
         cleanup_at = t.c12 + COALESCE(cleanup_after_ms, t.c17), \
         end_time = t.c12, lease_owner = NULL, lease_expires_at = NULL, \
         running_ms = running_ms + CASE WHEN running_since IS NULL THEN 0 \
             ELSE GREATEST(0, t.c12 - running_since) END, \
         running_since = NULL, \
         attempts = CASE WHEN jsonb_array_length(attempts) > 0 AND \
             COALESCE(attempts->-1->'ended_at', 'null'::jsonb) = 'null'::jsonb \
             THEN jsonb_set(jsonb_set(attempts, '{{-1,ended_at}}', to_jsonb(t.c12)), \
                 '{{-1,outcome}}', to_jsonb(t.c18)) \
             ELSE attempts END \
         FROM unnest($1::text[], $2::int4[], $3::text[], $4::int8[], $5::int8[], $6::int8[], \
             $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::int8[], $12::int8[], \
             $13::int8[], $14::text[], $15::text[], $16::text[], $17::int8[], $18::text[], \
             $19::text[]) WITH ORDINALITY \
             AS t(c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, c16, c17, \
                 c18, c19, ord) \
         WHERE tenant = t.c19 AND id = t.c1 AND status || '' = 'RUNNING' AND attempt = t.c2 \
             AND lease_owner = t.c3 \
         RETURNING {SESSION_COLUMNS}, t.ord",
            counters("t.c")
        )
    })
}

/// The checkpoint's compare-and-set `UPDATE` (`$1..$13` as for [`counters`], `$14` the new
/// lease expiry, `$15` the tenant).
fn checkpoint_sql() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        format!(
            "UPDATE sessions SET {}, lease_expires_at = $14 WHERE {} RETURNING {SESSION_COLUMNS}",
            counters("$"),
            if_running(15)
        )
    })
}

/// The values of [`counters`] (`$4..$13`) for a commit of `batch` at `now`.
fn counter_values(batch: &CheckpointBatch, now: Timestamp) -> StoreResult<[i64; 10]> {
    let progress = batch.progress();
    let u = usage_columns(&batch.usage)?;
    Ok([
        to_i64(batch.pages, "pages")?,
        to_i64(progress.elements, "elements")?,
        u[0],
        u[1],
        u[2],
        u[3],
        u[4],
        i64::from(!batch.is_empty()),
        now.0,
        to_i64(progress.records, "records")?,
    ])
}

/// The columns of [`finish_sql`]'s rows, one entry per finish sent.
#[derive(Default)]
struct FinishColumns<'a> {
    id: Vec<&'a str>,
    attempt: Vec<i32>,
    owner: Vec<&'a str>,
    /// [`counter_values`] (`c4`..`c13`).
    counts: [Vec<i64>; 10],
    status: Vec<&'static str>,
    error_kind: Vec<Option<&'a str>>,
    error_message: Vec<Option<&'a str>>,
    cleanup_after_ms: Vec<i64>,
    outcome: Vec<&'static str>,
    tenant: Vec<&'a str>,
}

impl<'a> FinishColumns<'a> {
    /// Adds `p`, or says why it cannot finish (nothing added).
    fn push(&mut self, p: &'a SessionFinish) -> StoreResult<()> {
        if !p.status.is_terminal() {
            return Err(StoreError::Invalid(format!(
                "session {} cannot finish as {}; use COMPLETED, FAILED or CANCELLED",
                p.attempt.id, p.status
            )));
        }
        let attempt = to_i32(p.attempt.attempt, "attempt")?;
        let counts = counter_values(&p.batch, p.now)?;
        // Capped so that now + delay stays far inside bigint (a century is ~3.2e12 ms).
        let cleanup_after_ms = i64::try_from(p.cleanup_after.as_millis())
            .unwrap_or(i64::MAX)
            .min(CENTURY_MS);
        let (error_kind, error_message) = error_columns(p.error.as_ref());
        self.id.push(p.attempt.id.id.as_str());
        self.attempt.push(attempt);
        self.owner.push(&p.attempt.owner);
        for (column, v) in self.counts.iter_mut().zip(counts) {
            column.push(v);
        }
        self.status.push(p.status.as_str());
        self.error_kind.push(error_kind);
        self.error_message.push(error_message);
        self.cleanup_after_ms.push(cleanup_after_ms);
        self.outcome.push(AttemptOutcome::ended(p.status).as_str());
        self.tenant.push(p.attempt.id.tenant());
        Ok(())
    }

    /// `$1..$19` of [`finish_sql`].
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&self.id, &self.attempt, &self.owner];
        params.extend(self.counts.iter().map(|c| c as &(dyn ToSql + Sync)));
        params.extend([
            &self.status as &(dyn ToSql + Sync),
            &self.error_kind,
            &self.error_message,
            &self.cleanup_after_ms,
            &self.outcome,
            &self.tenant,
        ]);
        params
    }
}

impl PostgresStore {
    pub(super) async fn commit_checkpoint(
        &self,
        p: CheckpointCommit,
    ) -> StoreResult<Option<Session>> {
        let a = &p.attempt;
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(db_err("starting a transaction"))?;
        let lease_expires_at = p.now.add(p.lease);
        let Some(session) = checkpoint_in(&tx, a, &p.batch, p.now, lease_expires_at).await? else {
            // Not ours any more; the transaction rolls back on drop having written nothing.
            return Ok(None);
        };
        tx.commit().await.map_err(db_err(&format!(
            "committing attempt {} of session {}",
            a.attempt, a.id
        )))?;
        Ok(Some(session))
    }

    pub(super) async fn finish_session(&self, p: SessionFinish) -> StoreResult<Option<Session>> {
        let mut results = self.finish_sessions(std::slice::from_ref(&p)).await?;
        results.pop().unwrap_or(Ok(None))
    }

    /// [`Store::session_finish_many`](crate::store::Store::session_finish_many): one
    /// transaction, one statement for every finish ([`finish_sql`]), then the last batches of
    /// those that carry one (sent without waiting for each other's answers, pipelined on one
    /// connection), one commit. A statement that fails aborts the transaction: the call fails
    /// and nothing was written. A finish that cannot be sent (not a terminal status) gets its
    /// own error and the others go on.
    ///
    /// Items are applied as if one after the other: a session named twice is finished by the
    /// first item whose attempt holds it. One statement joins each session once (which of two
    /// joined rows updates a row is not defined), so a second item for the same session goes
    /// in a second statement after the first ("rounds"; the worker never sends one, it only
    /// keeps the answer exact).
    pub(super) async fn finish_sessions(
        &self,
        items: &[SessionFinish],
    ) -> StoreResult<Vec<StoreResult<Option<Session>>>> {
        let mut out: Vec<Option<StoreResult<Option<Session>>>> =
            items.iter().map(|_| None).collect();
        // Per round, its rows and the item of each.
        let mut rounds: Vec<(FinishColumns<'_>, Vec<usize>)> = Vec::new();
        let mut named: HashMap<(&str, &str), usize> = HashMap::new();
        for (i, p) in items.iter().enumerate() {
            let seen = named
                .entry((p.attempt.id.tenant(), p.attempt.id.id.as_str()))
                .or_insert(0);
            if rounds.len() <= *seen {
                rounds.push(Default::default());
            }
            let (columns, sent) = &mut rounds[*seen];
            match columns.push(p) {
                Ok(()) => {
                    sent.push(i);
                    *seen += 1;
                }
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        let rounds: Vec<_> = rounds
            .into_iter()
            .filter(|(_, sent)| !sent.is_empty())
            .collect();
        if rounds.is_empty() {
            return Ok(out.into_iter().map(|r| r.unwrap_or(Ok(None))).collect());
        }
        const WHAT: &str = "finishing a batch of sessions";
        let mut client = self.client().await?;
        let stmt = client
            .prepare_cached(finish_sql())
            .await
            .map_err(db_err("preparing a finish"))?;
        if let [(columns, sent)] = rounds.as_slice()
            && sent.iter().all(|&i| items[i].batch.is_empty())
        {
            // The common case of a batch of finishes: one statement, nothing else to write, so
            // the transaction is one round trip.
            let rows =
                transaction_planned(&client, BEGIN_LOOKUP_PLANS, &stmt, &columns.params(), WHAT)
                    .await?;
            for row in &rows {
                let (i, session) = finished_row(row, sent)?;
                out[i] = Some(Ok(Some(session)));
            }
        } else {
            let tx = client
                .transaction()
                .await
                .map_err(db_err("starting a transaction"))?;
            let mut batches = Vec::new();
            for (round, (columns, sent)) in rounds.iter().enumerate() {
                let params = columns.params();
                let rows = if round == 0 {
                    query_planned(&tx, LOOKUP_PLANS, &stmt, &params, WHAT).await?
                } else {
                    tx.query(&stmt, &params).await.map_err(db_err(WHAT))?
                };
                for row in &rows {
                    let (i, session) = finished_row(row, sent)?;
                    let p = &items[i];
                    if !p.batch.is_empty() {
                        let records = to_i64(p.batch.progress().records, "records")?;
                        let first = to_i64(session.records, "records")? - records;
                        batches.push(write_batch(&tx, &p.attempt, &p.batch, first));
                    }
                    out[i] = Some(Ok(Some(session)));
                }
            }
            for written in futures::future::join_all(batches).await {
                // The transaction is aborted; dropping it rolls back.
                written?;
            }
            tx.commit()
                .await
                .map_err(db_err("committing a batch of finished sessions"))?;
        }
        // No row: the attempt does not hold its lease (or an earlier item ended the session).
        Ok(out.into_iter().map(|r| r.unwrap_or(Ok(None))).collect())
    }
}

/// A row of [`finish_sql`]: the item it answers (`sent[ord - 1]`) and the session.
fn finished_row(row: &tokio_postgres::Row, sent: &[usize]) -> StoreResult<(usize, Session)> {
    let n: i64 = row_get(row, SESSION_COLUMN_COUNT, "sessions/ord")?;
    let Some(&i) = usize::try_from(n - 1).ok().and_then(|k| sent.get(k)) else {
        return Err(StoreError::Corrupt {
            key: "sessions".into(),
            reason: format!("a finish returned row {n} of {}", sent.len()),
        });
    };
    Ok((i, session_from_row(row)?))
}

/// Writes `batch` and renews the lease inside `tx` if the attempt still holds it; the session
/// after it. One statement, equal to the state machine's [`Session::checkpointed`] (the
/// conformance suite checks it).
async fn checkpoint_in(
    tx: &deadpool_postgres::Transaction<'_>,
    a: &AttemptRef,
    batch: &CheckpointBatch,
    now: Timestamp,
    lease_expires_at: Timestamp,
) -> StoreResult<Option<Session>> {
    let attempt = to_i32(a.attempt, "attempt")?;
    let c = counter_values(batch, now)?;
    let id = a.id.id.as_str();
    let tenant = a.id.tenant();
    // The compare-and-set comes first: it locks the session row, so the batch below is
    // written only while this attempt holds the lease, and the record numbering cannot race.
    let params: [&(dyn ToSql + Sync); 15] = [
        &id,
        &attempt,
        &a.owner,
        &c[0],
        &c[1],
        &c[2],
        &c[3],
        &c[4],
        &c[5],
        &c[6],
        &c[7],
        &c[8],
        &c[9],
        &lease_expires_at.0,
        &tenant,
    ];
    let stmt = tx
        .prepare_cached(checkpoint_sql())
        .await
        .map_err(db_err("preparing a checkpoint"))?;
    let row = tx.query_opt(&stmt, &params).await.map_err(db_err(&format!(
        "committing attempt {} of session {}",
        a.attempt, a.id
    )))?;
    let Some(row) = row else {
        return Ok(None);
    };
    let session = session_from_row(&row)?;
    if !batch.is_empty() {
        // The batch's records are numbered after those committed before it (`c[9]`: its own).
        let total = to_i64(session.records, "records")?;
        write_batch(tx, a, batch, total - c[9]).await?;
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
