//! The event log (`migrations/0007_events.sql`, columns since `0008_events_columns.sql`): rows
//! written by a trigger on `sessions` in the transaction of each transition, read here in id
//! order and rebuilt into [`Event`]s.
//!
//! A row is `event_id`, `event_kind`, `event_at`, then the session's columns as the transition
//! left them, without its immutable `spec` (except for `removed`); the spec comes from the live
//! row of the same session instance (same `seq`). When that row is gone, the event carries no
//! session.

use std::time::Duration;

use tokio_postgres::types::ToSql;

use super::rows::{
    SESSION_COLUMN_COUNT, SESSION_COLUMNS, SPEC_COLUMN, row_get, session_from_row, to_i64, to_u64,
};
use super::{PostgresStore, db_err, index_planned};
use crate::event::{Event, EventKind, EventScope};
use crate::session::SessionId;
use crate::store::{EVENTS_PAGE_MAX, EventsAfter, StoreError, StoreResult};

/// `SESSION_COLUMNS` read from the event's row `e`, the spec from it or from the live row of
/// the same `seq` (a subquery per row: one lookup in `sessions_seq_key` each, never a join that
/// a plan could turn into a scan of every session).
fn event_columns() -> &'static str {
    static COLUMNS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    COLUMNS.get_or_init(|| {
        SESSION_COLUMNS
            .split(',')
            .map(str::trim)
            .map(|c| {
                if c == "spec" {
                    "coalesce(e.spec, (SELECT s.spec FROM sessions s WHERE s.seq = e.seq))"
                        .to_string()
                } else {
                    format!("e.{c}")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    })
}

impl PostgresStore {
    pub(super) async fn read_events(&self, p: EventsAfter) -> StoreResult<Vec<Event>> {
        if p.limit == 0 || p.limit > EVENTS_PAGE_MAX {
            return Err(StoreError::Invalid(format!(
                "events limit {} is out of range; use 1 to {EVENTS_PAGE_MAX}",
                p.limit
            )));
        }
        let after = to_i64(p.after, "after")?;
        let limit = p.limit as i64;
        let (filter, client_id, tenant, id);
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&after, &limit];
        match &p.scope {
            EventScope::All => filter = "",
            EventScope::Client(c) => {
                filter = "AND e.client_id = $3";
                client_id = c.as_str();
                params.push(&client_id);
            }
            EventScope::Session(k) => {
                filter = "AND e.tenant = $3 AND e.id = $4";
                (tenant, id) = (k.tenant(), k.id.as_str());
                params.extend([&tenant as &(dyn ToSql + Sync), &id]);
            }
        }
        let mut client = self.client().await?;
        let columns = event_columns();
        let n = SESSION_COLUMN_COUNT;
        // A read takes the next events in the primary key's order, whatever the planner
        // believes ([`BEGIN_INDEX_PLANS`]). The log grows faster than autovacuum analyzes it, and
        // without statistics for the ids just written the planner assumes a third of the log
        // lies after any id: it sorted a scan of every event instead (seen with auto_explain in
        // `bench queue`: hundreds of such reads in one run; as a cached statement, whose
        // generic plan assumes the same, it also merged every session per read: 740 scans of
        // `events` reading 15.6M rows). The statement is prepared per scope and cached.
        let rows = index_planned(
            &mut client,
            &format!(
                "SELECT {columns}, e.event_id, e.event_kind, e.id, e.client_id, e.tenant \
                 FROM events e WHERE e.event_id > $1 {filter} \
                 ORDER BY e.event_id LIMIT $2"
            ),
            &params,
            "reading events",
        )
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let id = to_u64(row_get::<i64>(row, n, "events/id")?, "events.id")?;
            let key = format!("events/{id}");
            let kind: EventKind =
                row_get::<String>(row, n + 1, &key)?
                    .parse()
                    .map_err(|reason| StoreError::Corrupt {
                        key: key.clone(),
                        reason,
                    })?;
            let raw_id: String = row_get(row, n + 2, &key)?;
            let session_id = SessionId::parse(&raw_id).map_err(|e| StoreError::Corrupt {
                key: key.clone(),
                reason: e.to_string(),
            })?;
            let client_id: String = row_get(row, n + 3, &key)?;
            let tenant: String = row_get(row, n + 4, &key)?;
            // No spec: the session was removed (and maybe replaced) before this read.
            let spec_missing = row
                .try_get::<_, Option<&[u8]>>(SPEC_COLUMN)
                .ok()
                .flatten()
                .is_none();
            let session = if spec_missing {
                None
            } else {
                match session_from_row(row) {
                    Ok(s) => Some(Box::new(s)),
                    Err(e) => {
                        tracing::debug!(event = id, error = %e, "event's session cannot be rebuilt");
                        None
                    }
                }
            };
            out.push(Event {
                id,
                kind,
                session_id,
                tenant: Some(tenant).filter(|t| !t.is_empty()),
                client_id,
                session,
            });
        }
        Ok(out)
    }

    pub(super) async fn last_event_id(&self) -> StoreResult<u64> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("SELECT coalesce(max(event_id), 0) FROM events")
            .await
            .map_err(db_err("preparing the last event id"))?;
        let row = client
            .query_one(&stmt, &[])
            .await
            .map_err(db_err("reading the last event id"))?;
        to_u64(row_get::<i64>(&row, 0, "events")?, "events.id")
    }

    pub(super) async fn expire_events(&self, retention: Duration) -> StoreResult<u64> {
        let ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let mut client = self.client().await?;
        // The cutoff is computed once (an init plan), and the plan reads `events_at_idx`
        // ([`BEGIN_INDEX_PLANS`]): compared with the volatile clock_timestamp() directly, or planned
        // with the log's stale statistics, every event was read at every maintenance tick.
        let n = index_planned(
            &mut client,
            "WITH gone AS (DELETE FROM events WHERE event_at < \
             (SELECT clock_timestamp() - $1::bigint * interval '1 millisecond') RETURNING 1) \
             SELECT count(*) FROM gone",
            &[&ms],
            "removing old events",
        )
        .await?;
        let n = match n.first() {
            Some(row) => to_u64(row_get::<i64>(row, 0, "events")?, "removed events")?,
            None => 0,
        };
        Ok(n)
    }
}
