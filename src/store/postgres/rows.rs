//! Rows to values and values to columns: the `sessions` columns a [`Session`] is read from, the
//! immutable part stored as one versioned bincode value, and the integer conversions between
//! Rust's unsigned counters and PostgreSQL's signed columns (a value out of range is
//! [`StoreError::Invalid`] on the way in and [`StoreError::Corrupt`] on the way out).

use serde::{Deserialize, Serialize};
use tokio_postgres::Row;
use tokio_postgres::types::Json;

use crate::session::{
    AttemptOutcome, AttemptRecord, ClientContext, JobSpec, Lease, Session, SessionError, SessionId,
    SessionMetrics, SessionOptions, SessionStatus, Timestamp, TokenUsage,
};
use crate::store::{StoreError, StoreResult, codec};

/// Columns of `sessions` read into a [`Session`], in the order [`session_from_row`] expects.
pub(super) const SESSION_COLUMNS: &str = "id, seq, status, attempt, failures, progress_this_attempt, \
     lease_owner, lease_expires_at, cancel_requested, run_at, created_at, updated_at, cleanup_at, \
     start_time, end_time, pages_processed, processed_elements, http_requests, http_errors, \
     bytes_received, retries, robots_blocked, error_kind, error_message, checkpoints, spec, \
     records, records_removed, running_ms, running_since, attempts, tenant";

/// The position of `spec` in [`SESSION_COLUMNS`] (checked by a test).
pub(super) const SPEC_COLUMN: usize = 25;

/// How many columns [`SESSION_COLUMNS`] names (checked by a test): a statement that returns
/// more after them has its first extra one here.
pub(super) const SESSION_COLUMN_COUNT: usize = 32;

/// The immutable part of a session, stored as one versioned bincode value.
#[derive(Serialize)]
pub(super) struct SpecRef<'a> {
    pub(super) client: &'a ClientContext,
    pub(super) job: &'a JobSpec,
    pub(super) options: &'a SessionOptions,
}

#[derive(Deserialize)]
struct Spec {
    client: ClientContext,
    job: JobSpec,
    options: SessionOptions,
}

pub(super) fn row_get<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    idx: usize,
    key: &str,
) -> StoreResult<T> {
    row.try_get(idx).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        reason: format!("column {idx}: {e}"),
    })
}

pub(super) fn parse_status(name: &str, key: &str) -> StoreResult<SessionStatus> {
    name.parse().map_err(|e: String| StoreError::Corrupt {
        key: key.to_string(),
        reason: e,
    })
}

/// Decodes a row selected with [`SESSION_COLUMNS`].
pub(super) fn session_from_row(row: &Row) -> StoreResult<Session> {
    let raw_id: String = row_get(row, 0, "sessions/id")?;
    let key = format!("sessions/{raw_id}");
    let corrupt = |reason: String| StoreError::Corrupt {
        key: key.clone(),
        reason,
    };
    let id = SessionId::parse(&raw_id).map_err(|e| corrupt(e.to_string()))?;
    let g64 = |i: usize| -> StoreResult<u64> {
        let v: i64 = row_get(row, i, &key)?;
        u64::try_from(v).map_err(|_| corrupt(format!("column {i} is negative ({v})")))
    };
    let g32 = |i: usize| -> StoreResult<u32> {
        let v: i32 = row_get(row, i, &key)?;
        u32::try_from(v).map_err(|_| corrupt(format!("column {i} is negative ({v})")))
    };
    let ts = |i: usize| -> StoreResult<Option<Timestamp>> {
        Ok(row_get::<Option<i64>>(row, i, &key)?.map(Timestamp))
    };
    let status = parse_status(&row_get::<String>(row, 2, &key)?, &key)?;
    let lease_owner: Option<String> = row_get(row, 6, &key)?;
    let lease = match (lease_owner, ts(7)?) {
        (Some(owner), Some(expires_at)) => Some(Lease { owner, expires_at }),
        _ => None,
    };
    let error_kind: Option<String> = row_get(row, 22, &key)?;
    let error_message: Option<String> = row_get(row, 23, &key)?;
    let error = error_kind.map(|kind| SessionError {
        kind: kind.into(),
        message: error_message.unwrap_or_default(),
    });
    let spec_bytes: Vec<u8> = row_get(row, SPEC_COLUMN, &key)?;
    let spec: Spec = codec::decode(&|| key.clone(), &spec_bytes)?;
    let tenant: String = row_get(row, 31, &key)?;
    Ok(Session {
        id,
        tenant: Some(tenant).filter(|t| !t.is_empty()),
        seq: g64(1)?,
        client: spec.client,
        status,
        job: spec.job,
        options: spec.options,
        attempt: g32(3)?,
        failures: g32(4)?,
        progress_this_attempt: row_get(row, 5, &key)?,
        lease,
        cancel_requested: row_get(row, 8, &key)?,
        run_at: Timestamp(row_get(row, 9, &key)?),
        created_at: Timestamp(row_get(row, 10, &key)?),
        updated_at: Timestamp(row_get(row, 11, &key)?),
        cleanup_at: ts(12)?,
        metrics: SessionMetrics {
            start_time: ts(13)?,
            end_time: ts(14)?,
            pages_processed: g64(15)?,
            processed_elements: g64(16)?,
            running_ms: g64(28)?,
            running_since: ts(29)?,
        },
        usage: TokenUsage {
            http_requests: g64(17)?,
            http_errors: g64(18)?,
            bytes_received: g64(19)?,
            retries: g64(20)?,
            robots_blocked: g64(21)?,
        },
        error,
        checkpoints: g64(24)?,
        records: g64(26)?,
        records_removed: g64(27)?,
        attempts: attempts_from_rows(row_get::<Json<Vec<AttemptJson>>>(row, 30, &key)?.0)
            .map_err(corrupt)?,
    })
}

/// One attempt as the `attempts` column keeps it (times in milliseconds, like every column).
#[derive(Serialize, Deserialize)]
struct AttemptJson {
    attempt: u32,
    started_at: i64,
    ended_at: Option<i64>,
    outcome: Option<String>,
}

/// The `attempts` column of `attempts`.
pub(super) fn attempts_to_json(attempts: &[AttemptRecord]) -> serde_json::Value {
    let rows: Vec<AttemptJson> = attempts
        .iter()
        .map(|a| AttemptJson {
            attempt: a.attempt,
            started_at: a.started_at.0,
            ended_at: a.ended_at.map(|t| t.0),
            outcome: a.outcome.map(|o| o.as_str().to_string()),
        })
        .collect();
    serde_json::to_value(rows).unwrap_or_else(|_| serde_json::Value::Array(Vec::new()))
}

/// The `attempts` column's rows, decoded straight from the column's bytes (not through a
/// `serde_json::Value`: that copy was a twentieth of a PostgreSQL burn-down's CPU in harvest).
fn attempts_from_rows(rows: Vec<AttemptJson>) -> Result<Vec<AttemptRecord>, String> {
    rows.into_iter()
        .map(|a| {
            let outcome = match a.outcome {
                Some(o) => Some(
                    AttemptOutcome::parse(&o).ok_or_else(|| format!("attempts: outcome {o:?}"))?,
                ),
                None => None,
            };
            Ok(AttemptRecord {
                attempt: a.attempt,
                started_at: Timestamp(a.started_at),
                ended_at: a.ended_at.map(Timestamp),
                outcome,
            })
        })
        .collect()
}

pub(super) fn error_columns(e: Option<&SessionError>) -> (Option<&str>, Option<&str>) {
    match e {
        Some(e) => (Some(e.kind.as_str()), Some(e.message.as_str())),
        None => (None, None),
    }
}

pub(super) fn usage_columns(u: &TokenUsage) -> StoreResult<[i64; 5]> {
    Ok([
        to_i64(u.http_requests, "usage.http_requests")?,
        to_i64(u.http_errors, "usage.http_errors")?,
        to_i64(u.bytes_received, "usage.bytes_received")?,
        to_i64(u.retries, "usage.retries")?,
        to_i64(u.robots_blocked, "usage.robots_blocked")?,
    ])
}

pub(super) fn to_i64(v: u64, what: &str) -> StoreResult<i64> {
    i64::try_from(v)
        .map_err(|_| StoreError::Invalid(format!("{what} = {v} does not fit a PostgreSQL bigint")))
}

pub(super) fn to_i32(v: u32, what: &str) -> StoreResult<i32> {
    i32::try_from(v)
        .map_err(|_| StoreError::Invalid(format!("{what} = {v} does not fit a PostgreSQL integer")))
}

pub(super) fn to_u64(v: i64, what: &str) -> StoreResult<u64> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt {
        key: what.to_string(),
        reason: format!("negative value {v}"),
    })
}

pub(super) fn to_u32(v: i32, what: &str) -> StoreResult<u32> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt {
        key: what.to_string(),
        reason: format!("negative value {v}"),
    })
}

#[cfg(test)]
mod spec_column_tests {
    use super::*;

    #[test]
    fn spec_column_is_the_position_of_spec() {
        let at = SESSION_COLUMNS
            .split(',')
            .map(str::trim)
            .position(|c| c == "spec");
        assert_eq!(at, Some(SPEC_COLUMN));
        assert_eq!(SESSION_COLUMNS.split(',').count(), SESSION_COLUMN_COUNT);
    }
}
