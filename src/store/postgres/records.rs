//! A session's records (numbered by the commit that wrote them) and its log (the last
//! [`LOG_LINES_MAX`] lines, trimmed by each commit that adds some).

use super::rows::{SESSION_COLUMNS, row_get, session_from_row, to_i64, to_u64};
use super::{PostgresStore, db_err};
use crate::session::{Context, LogLine, Record, Session, SessionKey, Timestamp};
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
                "SELECT seq, data FROM records \
                 WHERE tenant = $4 AND session_id = $1 AND seq >= $2 ORDER BY seq LIMIT $3",
            )
            .await
            .map_err(db_err("preparing a records read"))?;
        let rows = client
            .query(&stmt, &[&p.id.id.as_str(), &offset, &limit, &p.id.tenant()])
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

    pub(super) async fn remove_records(
        &self,
        id: &SessionKey,
        below: Option<u64>,
    ) -> StoreResult<Option<Session>> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(db_err("starting a transaction"))?;
        // The row lock keeps a concurrent removal, checkpoint or finish from interleaving with
        // the delete.
        let row = tx
            .query_opt(
                &format!(
                    "SELECT {SESSION_COLUMNS} FROM sessions WHERE tenant = $2 AND id = $1 \
                     FOR UPDATE"
                ),
                &[&id.id.as_str(), &id.tenant()],
            )
            .await
            .map_err(db_err(&format!("reading session {id}")))?;
        let Some(row) = row else { return Ok(None) };
        let mut s = session_from_row(&row)?;
        if below.is_none() && !s.status.is_terminal() {
            return Ok(None);
        }
        let target = below.unwrap_or(s.records).min(s.records);
        tx.execute(
            "DELETE FROM records WHERE tenant = $3 AND session_id = $1 AND seq < $2",
            &[&id.id.as_str(), &to_i64(target, "records")?, &id.tenant()],
        )
        .await
        .map_err(db_err(&format!("removing the records of session {id}")))?;
        s.records_removed = s.records_removed.max(target);
        tx.execute(
            "UPDATE sessions SET records_removed = $2 WHERE tenant = $3 AND id = $1",
            &[
                &id.id.as_str(),
                &to_i64(s.records_removed, "records_removed")?,
                &id.tenant(),
            ],
        )
        .await
        .map_err(db_err(&format!("recording the record removal of {id}")))?;
        tx.commit()
            .await
            .map_err(db_err(&format!("committing the record removal of {id}")))?;
        Ok(Some(s))
    }

    pub(super) async fn context(&self, id: &SessionKey) -> StoreResult<Option<Context>> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached("SELECT variables FROM context WHERE tenant = $2 AND session_id = $1")
            .await
            .map_err(db_err("preparing a context read"))?;
        let row = client
            .query_opt(&stmt, &[&id.id.as_str(), &id.tenant()])
            .await
            .map_err(db_err(&format!("reading the context of session {id}")))?;
        let Some(row) = row else { return Ok(None) };
        let key = key_name("context", id);
        let v: serde_json::Value = row_get(&row, 0, &key)?;
        serde_json::from_value(v)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                key,
                reason: format!("context: {e}"),
            })
    }

    pub(super) async fn tail_log(
        &self,
        id: &SessionKey,
        limit: usize,
    ) -> StoreResult<Vec<LogLine>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = limit.min(LOG_LINES_MAX as usize) as i64;
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT at, level, message FROM (
                     SELECT id, at, level, message FROM log WHERE tenant = $3 AND session_id = $1
                     ORDER BY id DESC LIMIT $2) t
                 ORDER BY id",
            )
            .await
            .map_err(db_err("preparing a log read"))?;
        let key = key_name("log", id);
        client
            .query(&stmt, &[&id.id.as_str(), &limit, &id.tenant()])
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
