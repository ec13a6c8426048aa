//! A session's records (numbered by the commit that wrote them) and its log (the last
//! [`LOG_LINES_MAX`] lines, trimmed by each commit that adds some).

use super::rows::{parse_status, row_get, to_i64, to_u64};
use super::{PostgresStore, db_err};
use crate::session::{LogLine, Record, SessionId, Timestamp};
use crate::store::{LOG_LINES_MAX, RecordsPage, StoreError, StoreResult, key_name};

/// Longest records page (the trait's documented range).
const RECORDS_LIMIT_MAX: usize = 10_000;

impl PostgresStore {
    pub(super) async fn page_records(&self, p: RecordsPage) -> StoreResult<Vec<Record>> {
        if p.limit == 0 || p.limit > RECORDS_LIMIT_MAX {
            return Err(StoreError::Invalid(format!(
                "records limit {} is out of range; use 1 to {RECORDS_LIMIT_MAX}",
                p.limit
            )));
        }
        let offset = to_i64(p.offset, "offset")?;
        let limit = p.limit as i64;
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT seq, data FROM records WHERE session_id = $1 AND seq >= $2 \
                 ORDER BY seq LIMIT $3",
            )
            .await
            .map_err(db_err("preparing a records read"))?;
        let rows = client
            .query(&stmt, &[&p.id.as_str(), &offset, &limit])
            .await
            .map_err(db_err(&format!("reading records of session {}", p.id)))?;
        let key = key_name("records", &p.id);
        rows.iter()
            .map(|row| {
                Ok(Record {
                    seq: to_u64(row_get::<i64>(row, 0, &key)?, "records.seq")?,
                    data: row_get(row, 1, &key)?,
                })
            })
            .collect()
    }

    pub(super) async fn remove_records_if_terminal(&self, id: &SessionId) -> StoreResult<bool> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(db_err("starting a transaction"))?;
        // The row lock keeps a concurrent removal or finish from interleaving with the delete.
        let row = tx
            .query_opt(
                "SELECT status FROM sessions WHERE id = $1 FOR UPDATE",
                &[&id.as_str()],
            )
            .await
            .map_err(db_err(&format!("reading session {id}")))?;
        let Some(row) = row else { return Ok(false) };
        let key = key_name("sessions", id);
        let status: String = row_get(&row, 0, &key)?;
        if !parse_status(&status, &key)?.is_terminal() {
            return Ok(false);
        }
        tx.execute("DELETE FROM records WHERE session_id = $1", &[&id.as_str()])
            .await
            .map_err(db_err(&format!("removing the records of session {id}")))?;
        tx.commit()
            .await
            .map_err(db_err(&format!("committing the record removal of {id}")))?;
        Ok(true)
    }

    pub(super) async fn tail_log(&self, id: &SessionId, limit: usize) -> StoreResult<Vec<LogLine>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = limit.min(LOG_LINES_MAX as usize) as i64;
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT at, level, message FROM (
                     SELECT id, at, level, message FROM log WHERE session_id = $1
                     ORDER BY id DESC LIMIT $2) t
                 ORDER BY id",
            )
            .await
            .map_err(db_err("preparing a log read"))?;
        let key = key_name("log", id);
        client
            .query(&stmt, &[&id.as_str(), &limit])
            .await
            .map_err(db_err(&format!("reading the log of session {id}")))?
            .iter()
            .map(|r| {
                Ok(LogLine {
                    at: Timestamp(row_get(r, 0, &key)?),
                    level: row_get(r, 1, &key)?,
                    message: row_get(r, 2, &key)?,
                })
            })
            .collect()
    }
}
