//! A session's crawl state: frontier pages, seen-set lookups, and what a next attempt resumes
//! from. Frontier rows are keyed by URL; their `pos` is a bigserial, so pages follow the order
//! of addition.

use super::rows::SESSION_COLUMNS;
use super::rows::{row_get, session_from_row, to_u32, to_u64};
use super::{PostgresStore, db_err};
use crate::session::{FrontierEntry, SessionKey};
use crate::store::{
    FRONTIER_PAGE_MAX, FrontierItem, FrontierPage, ResumeState, SeenFilter, StoreError,
    StoreResult, key_name,
};

impl PostgresStore {
    pub(super) async fn load_resume(&self, id: &SessionKey) -> StoreResult<ResumeState> {
        let mut client = self.client().await?;
        // One snapshot: the frontier, seen set and counters of the same checkpoint.
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(db_err("starting a read transaction"))?;
        let key = key_name("sessions", id);
        let row = tx
            .query_opt(
                &format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE tenant = $2 AND id = $1"),
                &[&id.id.as_str(), &id.tenant()],
            )
            .await
            .map_err(db_err(&format!("reading session {id}")))?;
        let Some(row) = row else {
            return Err(StoreError::Invalid(format!(
                "no session {id} to resume; it was removed"
            )));
        };
        let session = session_from_row(&row)?;
        let frontier_len = tx
            .query_one(
                "SELECT count(*) FROM frontier WHERE tenant = $2 AND session_id = $1",
                &[&id.id.as_str(), &id.tenant()],
            )
            .await
            .map_err(db_err(&format!("counting the frontier of session {id}")))?;
        let frontier_len = to_u64(row_get::<i64>(&frontier_len, 0, &key)?, "frontier count")?;
        tx.commit()
            .await
            .map_err(db_err("ending a read transaction"))?;
        Ok(ResumeState {
            frontier_len,
            // Rows are looked up by URL; positions are not handed out in order.
            frontier_next: 0,
            records: session.records,
            metrics: session.metrics,
            usage: session.usage,
        })
    }

    pub(super) async fn page_frontier(&self, p: FrontierPage) -> StoreResult<Vec<FrontierItem>> {
        if p.limit == 0 || p.limit > FRONTIER_PAGE_MAX {
            return Err(StoreError::Invalid(format!(
                "frontier page limit {} is out of range 1..={FRONTIER_PAGE_MAX}",
                p.limit
            )));
        }
        // Positions are a bigserial: anything beyond i64::MAX was never assigned.
        let Ok(after) = i64::try_from(p.after_pos) else {
            return Ok(Vec::new());
        };
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT pos, url, depth, page FROM frontier \
                 WHERE tenant = $4 AND session_id = $1 AND pos > $2 ORDER BY pos LIMIT $3",
            )
            .await
            .map_err(db_err("preparing a frontier read"))?;
        let rows = client
            .query(
                &stmt,
                &[&p.id.id.as_str(), &after, &(p.limit as i64), &p.id.tenant()],
            )
            .await
            .map_err(db_err(&format!("reading the frontier of session {}", p.id)))?;
        let key = key_name("frontier", &p.id);
        rows.iter()
            .map(|r| {
                Ok(FrontierItem {
                    pos: to_u64(row_get::<i64>(r, 0, &key)?, "frontier.pos")?,
                    entry: FrontierEntry {
                        url: row_get(r, 1, &key)?,
                        depth: to_u32(row_get::<i32>(r, 2, &key)?, "frontier.depth")?,
                        page: row_get(r, 3, &key)?,
                    },
                })
            })
            .collect()
    }

    pub(super) async fn filter_seen(&self, p: SeenFilter) -> StoreResult<Vec<bool>> {
        if p.urls.len() > FRONTIER_PAGE_MAX {
            return Err(StoreError::Invalid(format!(
                "seen filter of {} URLs; at most {FRONTIER_PAGE_MAX} per call",
                p.urls.len()
            )));
        }
        if p.urls.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT url FROM seen WHERE tenant = $3 AND session_id = $1 AND url = ANY($2)",
            )
            .await
            .map_err(db_err("preparing a seen-set read"))?;
        let rows = client
            .query(&stmt, &[&p.id.id.as_str(), &p.urls, &p.id.tenant()])
            .await
            .map_err(db_err(&format!("reading the seen set of session {}", p.id)))?;
        let key = key_name("seen", &p.id);
        let found = rows
            .iter()
            .map(|r| row_get::<String>(r, 0, &key))
            .collect::<StoreResult<std::collections::HashSet<String>>>()?;
        Ok(p.urls.iter().map(|u| found.contains(u)).collect())
    }
}
