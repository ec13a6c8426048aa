//! Inserts: one session (with the single-session-agent and `max_pending` checks) and batches
//! (one statement, under the quota locks of their clients when they have a `max_pending`).

use deadpool_postgres::GenericClient;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::rows::{
    SpecRef, attempts_to_json, error_columns, row_get, to_i32, to_i64, to_u64, usage_columns,
};
use super::{ADVISORY_CLASS_AGENT, ADVISORY_CLASS_QUOTA, PostgresStore, db_err};
use crate::session::{Session, SessionId, SessionStatus};
use crate::store::{InsertOutcome, SessionInsert, StoreError, StoreResult, codec};

/// Declares the columns a new session's row is written with (every column of `sessions` but
/// `status`, always PENDING, and the generated `seq`), in one place: one session's [`Row`], the
/// [`Columns`] of the sessions an insert writes, and the insert's SQL ([`insert_sql`]).
macro_rules! session_columns {
    ($($name:ident: $ty:ty = $sql:literal,)*) => {
        /// One new session's column values.
        struct Row<'a> {
            $($name: $ty,)*
        }

        /// Many new sessions' column values, one array per column (`unnest` zips them).
        #[derive(Default)]
        struct Columns<'a> {
            $($name: Vec<$ty>,)*
        }

        impl<'a> Columns<'a> {
            fn push(&mut self, r: Row<'a>) {
                $(self.$name.push(r.$name);)*
            }

            fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
                vec![$(&self.$name,)*]
            }
        }

        /// Column names and SQL types, in parameter order.
        const COLUMNS: &[(&str, &str)] = &[$((stringify!($name), $sql),)*];
    };
}

session_columns! {
    id: &'a str = "text",
    client_id: &'a str = "text",
    agent: Option<&'a str> = "text",
    priority: i32 = "int4",
    run_at: i64 = "int8",
    max_attempts: i32 = "int4",
    attempt: i32 = "int4",
    failures: i32 = "int4",
    progress_this_attempt: bool = "bool",
    lease_owner: Option<&'a str> = "text",
    lease_expires_at: Option<i64> = "int8",
    cancel_requested: bool = "bool",
    created_at: i64 = "int8",
    updated_at: i64 = "int8",
    cleanup_at: Option<i64> = "int8",
    start_time: Option<i64> = "int8",
    end_time: Option<i64> = "int8",
    pages_processed: i64 = "int8",
    processed_elements: i64 = "int8",
    http_requests: i64 = "int8",
    http_errors: i64 = "int8",
    bytes_received: i64 = "int8",
    retries: i64 = "int8",
    robots_blocked: i64 = "int8",
    error_kind: Option<&'a str> = "text",
    error_message: Option<&'a str> = "text",
    checkpoints: i64 = "int8",
    spec: Vec<u8> = "bytea",
    cleanup_after_ms: Option<i64> = "int8",
    records: i64 = "int8",
    records_removed: i64 = "int8",
    running_ms: i64 = "int8",
    running_since: Option<i64> = "int8",
    attempts: serde_json::Value = "jsonb",
    token_tracking: bool = "bool",
    tenant: &'a str = "text",
}

impl<'a> Row<'a> {
    /// `s`'s row, run for `agent`; fails on a value the column cannot hold.
    fn of(s: &'a Session, agent: Option<&'a str>) -> StoreResult<Row<'a>> {
        let spec = codec::encode(&SpecRef {
            client: &s.client,
            job: &s.job,
            options: &s.options,
        })?;
        let (error_kind, error_message) = error_columns(s.error.as_ref());
        let [
            http_requests,
            http_errors,
            bytes_received,
            retries,
            robots_blocked,
        ] = usage_columns(&s.usage)?;
        Ok(Row {
            id: s.id.as_str(),
            client_id: s.client.client_id(),
            agent,
            priority: s.options.priority,
            run_at: s.run_at.0,
            max_attempts: to_i32(s.max_attempts(), "max_attempts")?,
            attempt: to_i32(s.attempt, "attempt")?,
            failures: to_i32(s.failures, "failures")?,
            progress_this_attempt: s.progress_this_attempt,
            lease_owner: s.lease.as_ref().map(|l| l.owner.as_str()),
            lease_expires_at: s.lease.as_ref().map(|l| l.expires_at.0),
            cancel_requested: s.cancel_requested,
            created_at: s.created_at.0,
            updated_at: s.updated_at.0,
            cleanup_at: s.cleanup_at.map(|t| t.0),
            start_time: s.metrics.start_time.map(|t| t.0),
            end_time: s.metrics.end_time.map(|t| t.0),
            pages_processed: to_i64(s.metrics.pages_processed, "pages_processed")?,
            processed_elements: to_i64(s.metrics.processed_elements, "processed_elements")?,
            http_requests,
            http_errors,
            bytes_received,
            retries,
            robots_blocked,
            error_kind,
            error_message,
            checkpoints: to_i64(s.checkpoints, "checkpoints")?,
            spec,
            cleanup_after_ms: s
                .options
                .session_timeout_secs
                .map(|secs| to_i64(secs.saturating_mul(1000), "session_timeout_secs"))
                .transpose()?,
            records: to_i64(s.records, "records")?,
            records_removed: to_i64(s.records_removed, "records_removed")?,
            running_ms: to_i64(s.metrics.running_ms, "running_ms")?,
            running_since: s.metrics.running_since.map(|t| t.0),
            attempts: attempts_to_json(&s.attempts),
            token_tracking: s.options.token_tracking,
            tenant: s.tenant.as_deref().unwrap_or(""),
        })
    }
}

/// The insert of new sessions, one or many with one statement: one array parameter per column,
/// zipped by `unnest` (one executor start, one constraint setup and one round trip for the whole
/// batch), skipping a taken key and returning each inserted row's key and `seq`.
fn insert_sql() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        let arrays: Vec<String> = COLUMNS
            .iter()
            .enumerate()
            .map(|(i, (_, ty))| format!("${}::{ty}[]", i + 1))
            .collect();
        let names: Vec<&str> = COLUMNS.iter().map(|(n, _)| *n).collect();
        let names = names.join(", ");
        format!(
            "INSERT INTO sessions (status, {names}) \
             SELECT 'PENDING', u.* FROM unnest({}) AS u({names}) \
             ON CONFLICT (tenant, id) DO NOTHING RETURNING tenant, id, seq",
            arrays.join(", ")
        )
    })
}

/// A session insert's error: a unique violation (of a key other than the id's, which `ON
/// CONFLICT` skips) is the id's duplicate all the same.
fn insert_err(id: &SessionId) -> impl FnOnce(tokio_postgres::Error) -> StoreError + '_ {
    move |e| {
        if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
            StoreError::Duplicate(id.clone())
        } else {
            db_err("inserting a session")(e)
        }
    }
}

impl PostgresStore {
    async fn insert_row(
        &self,
        client: &impl GenericClient,
        s: &Session,
        agent: Option<&str>,
    ) -> StoreResult<Option<u64>> {
        let mut columns = Columns::default();
        columns.push(Row::of(s, agent)?);
        let stmt = client
            .prepare_cached(insert_sql())
            .await
            .map_err(db_err("preparing the session insert"))?;
        let row = client
            .query_opt(&stmt, &columns.params())
            .await
            .map_err(insert_err(&s.id))?;
        match row {
            Some(row) => Ok(Some(to_u64(
                row_get::<i64>(&row, 2, "sessions/seq")?,
                "seq",
            )?)),
            None => Ok(None),
        }
    }

    /// Inserts `sessions` (keys distinct) with one statement: for each, its `seq`, `None` where
    /// its key is taken, or why its row cannot be written (a value its column cannot hold: that
    /// item alone is refused, before the statement).
    async fn insert_rows(
        &self,
        client: &impl GenericClient,
        sessions: &[Session],
    ) -> StoreResult<Vec<StoreResult<Option<u64>>>> {
        let mut columns = Columns::default();
        let mut refused = Vec::with_capacity(sessions.len());
        for s in sessions {
            match Row::of(s, s.job.agent.as_deref()) {
                Ok(row) => {
                    columns.push(row);
                    refused.push(None);
                }
                Err(e) => refused.push(Some(e)),
            }
        }
        let mut seqs = std::collections::HashMap::with_capacity(sessions.len());
        if !columns.id.is_empty() {
            let stmt = client
                .prepare_cached(insert_sql())
                .await
                .map_err(db_err("preparing the session inserts"))?;
            let rows = client
                .query(&stmt, &columns.params())
                .await
                .map_err(db_err("inserting sessions"))?;
            for row in rows {
                let tenant: String = row_get(&row, 0, "sessions/tenant")?;
                let id: String = row_get(&row, 1, "sessions/id")?;
                let seq = to_u64(row_get::<i64>(&row, 2, "sessions/seq")?, "seq")?;
                seqs.insert((tenant, id), seq);
            }
        }
        Ok(sessions
            .iter()
            .zip(refused)
            .map(|(s, refused)| match refused {
                Some(e) => Err(e),
                None => {
                    let key = (
                        s.tenant.clone().unwrap_or_default(),
                        s.id.as_str().to_string(),
                    );
                    Ok(seqs.get(&key).copied())
                }
            })
            .collect())
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
                        // A taken id is a duplicate whatever the quota, as on sled and in a
                        // batch: a client's retry of a stored submission is told so.
                        if !taken_keys(&tx, &[&session]).await?.is_empty() {
                            return Err(StoreError::Duplicate(session.id));
                        }
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

    /// [`Store::session_insert_many`]: one statement (`ON CONFLICT DO NOTHING` turns a taken key
    /// into that item's `Duplicate` without failing the others). A client with `max_pending` is
    /// locked and counted once (as `insert_session` does) in a transaction that holds the lock
    /// until the insert commits, and its items beyond the quota get `PendingQuota`.
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
        let mut clients: Vec<&str> = sessions
            .iter()
            .map(|s| s.client.client_id())
            .filter(|c| limits.contains_key(*c))
            .collect();
        clients.sort_unstable();
        clients.dedup();
        let mut client = self.client().await?;
        let out = if clients.is_empty() {
            self.insert_decided(&client, sessions, Room::new(), &Taken::new())
                .await?
        } else {
            let tx = client
                .transaction()
                .await
                .map_err(db_err("starting a transaction"))?;
            // Room left under each limited client's quota, counted under its lock.
            let mut room = Room::new();
            for c in clients {
                let limit = limits.get(c).copied().unwrap_or(u64::MAX);
                let pending = pending_locked(&tx, c).await?;
                room.insert(c.to_string(), (limit.saturating_sub(pending), limit));
            }
            // A limited client's item whose key is taken is its duplicate before it is counted:
            // otherwise it would use up room that the database then leaves unused.
            let limited: Vec<&Session> = sessions
                .iter()
                .filter(|s| room.contains_key(s.client.client_id()))
                .collect();
            let taken = taken_keys(&tx, &limited).await?;
            let out = self.insert_decided(&tx, sessions, room, &taken).await?;
            tx.commit()
                .await
                .map_err(db_err("committing the session inserts"))?;
            out
        };
        if out
            .iter()
            .any(|o| matches!(o, Ok(InsertOutcome::Inserted(_))))
        {
            self.wake_local();
        }
        Ok(out)
    }

    /// Inserts those of `sessions` that can be (PENDING, a key neither `taken` nor given
    /// earlier in the batch, room under their client's quota) and answers each.
    async fn insert_decided(
        &self,
        client: &impl GenericClient,
        sessions: Vec<Session>,
        mut room: Room,
        taken: &Taken,
    ) -> StoreResult<Vec<StoreResult<InsertOutcome>>> {
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
            let key = s.key();
            // `taken` is empty but for limited clients' batches: no key is built for it else.
            let stored = !taken.is_empty()
                && taken.contains(&(key.tenant().to_string(), s.id.as_str().to_string()));
            if stored || !seen.insert(key) {
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
        let seqs = if accepted.is_empty() {
            Vec::new()
        } else {
            self.insert_rows(client, &accepted).await?
        };
        let mut stored = accepted.into_iter().zip(seqs);
        let mut out = Vec::with_capacity(decided.len());
        for d in decided {
            out.push(match d {
                Some(outcome) => outcome,
                None => match stored.next() {
                    Some((mut s, Ok(Some(seq)))) => {
                        s.seq = seq;
                        Ok(InsertOutcome::Inserted(Box::new(s)))
                    }
                    Some((s, Ok(None))) => Err(StoreError::Duplicate(s.id)),
                    Some((_, Err(e))) => Err(e),
                    None => Err(StoreError::Invalid("a batch item was lost".into())),
                },
            });
        }
        Ok(out)
    }
}

/// Per limited client: (room left under its `max_pending`, the limit).
type Room = std::collections::HashMap<String, (u64, u64)>;

/// Keys `(tenant, id)` already stored ([`taken_keys`]).
type Taken = std::collections::HashSet<(String, String)>;

/// Which of `sessions`' keys are stored already. Read in the transaction that holds their
/// clients' quota locks; a key taken after this read is still refused by the insert, so the
/// room it used stays unused: the quota errs on the safe side.
async fn taken_keys(
    tx: &deadpool_postgres::Transaction<'_>,
    sessions: &[&Session],
) -> StoreResult<Taken> {
    if sessions.is_empty() {
        return Ok(Taken::new());
    }
    let tenants: Vec<&str> = sessions
        .iter()
        .map(|s| s.tenant.as_deref().unwrap_or(""))
        .collect();
    let ids: Vec<&str> = sessions.iter().map(|s| s.id.as_str()).collect();
    let stmt = tx
        .prepare_cached(
            "SELECT s.tenant, s.id FROM sessions s \
             JOIN unnest($1::text[], $2::text[]) AS k(tenant, id) \
             ON s.tenant = k.tenant AND s.id = k.id",
        )
        .await
        .map_err(db_err("preparing the check of which sessions exist"))?;
    let rows = tx
        .query(&stmt, &[&tenants, &ids])
        .await
        .map_err(db_err("checking which of the sessions exist"))?;
    rows.iter()
        .map(|row| {
            Ok((
                row_get::<String>(row, 0, "sessions/tenant")?,
                row_get::<String>(row, 1, "sessions/id")?,
            ))
        })
        .collect()
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
