//! `session_stats`: two aggregates, by (client, status) and by minute of the last hour's ends,
//! scoped to one client when asked.

use super::rows::{parse_status, row_get, to_u64};
use super::{PostgresStore, db_err};
use crate::session::Timestamp;
use crate::store::{STATS_MINUTES, SessionStats, StatsQuery, StoreResult};

impl PostgresStore {
    pub(super) async fn stats(&self, q: StatsQuery) -> StoreResult<SessionStats> {
        let client = self.client().await?;
        let mut out = SessionStats::empty();
        let by_status = client
            .prepare_cached(
                "SELECT client_id, status, count(*) FROM sessions \
                 WHERE $1::text IS NULL OR client_id = $1 GROUP BY client_id, status",
            )
            .await
            .map_err(db_err("preparing the session stats"))?;
        let rows = client
            .query(&by_status, &[&q.client_id])
            .await
            .map_err(db_err("counting sessions by client and status"))?;
        for row in &rows {
            let client_id: String = row_get(row, 0, "sessions/client_id")?;
            let name: String = row_get(row, 1, "sessions/status")?;
            let status = parse_status(&name, "sessions/status")?;
            let n = to_u64(row_get::<i64>(row, 2, "sessions/status")?, "count")?;
            out.count(&client_id, status, n);
        }
        // Bucketed in SQL: one row per minute, whatever the number of sessions.
        let since = q.now.0 - (STATS_MINUTES as i64) * 60_000;
        let hour = client
            .prepare_cached(
                "SELECT ($2::bigint - end_time) / 60000 AS ago, count(*), \
                 coalesce(sum(records), 0)::bigint FROM sessions \
                 WHERE end_time > $1 AND end_time <= $2 \
                 AND ($3::text IS NULL OR client_id = $3) GROUP BY ago",
            )
            .await
            .map_err(db_err("preparing the last hour's counts"))?;
        let rows = client
            .query(&hour, &[&since, &q.now.0, &q.client_id])
            .await
            .map_err(db_err("counting the last hour's sessions"))?;
        for row in &rows {
            let ago: i64 = row_get(row, 0, "sessions/end_time")?;
            let n = to_u64(row_get::<i64>(row, 1, "sessions/end_time")?, "count")?;
            let records = to_u64(row_get::<i64>(row, 2, "sessions/records")?, "records")?;
            out.finished(q.now, Timestamp(q.now.0 - ago * 60_000), n, records);
        }
        Ok(out)
    }
}
