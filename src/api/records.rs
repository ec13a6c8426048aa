//! `GET /v1/sessions/{id}/records`: a session's committed records as JSON, JSON lines or CSV.
//!
//! The body is streamed page by page from the store ([`PAGE`] records at a time), so a session of
//! millions of records is never held in memory whole. Formats:
//! - `json`: one JSON array of the record objects;
//! - `jsonl`: one record object per line;
//! - `csv`: a header row, then one row per record. The columns are the union of the keys of the
//!   records of the first page, in order of first appearance (a record that is not an object is
//!   one column, `value`). A key first seen after the first page has no column and is left out;
//!   use json or jsonl for records whose keys vary that much. Strings are written as they are,
//!   numbers and booleans as their JSON text, null and missing keys as an empty cell, arrays and
//!   objects as JSON text.
//!
//! `remove_after_export`: when a session that was terminal before the read began is read to its
//! end (the last page came back shorter than asked, or a full streamed read was sent), its records
//! are removed; the session itself stays readable until its timeout. A page that exactly fills
//! its `limit` is not the end: the next, shorter (possibly empty) page is.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use futures::Stream;

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ApiPath, ApiQuery, ErrorBody};
use super::sessions::{owned_session, path_id};
use super::view::RecordsQuery;
use crate::service::Harvest;
use crate::session::{Record, SessionKey};

/// Records fetched from the store per page.
const PAGE: usize = 1000;

/// The output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Jsonl,
    Csv,
}

impl Format {
    fn parse(s: Option<&str>) -> Result<Format, ApiError> {
        match s {
            None | Some("json") => Ok(Format::Json),
            Some("jsonl") | Some("ndjson") => Ok(Format::Jsonl),
            Some("csv") => Ok(Format::Csv),
            Some(other) => Err(ApiError::invalid(format!(
                "format: unknown format {other:?}; use json, jsonl or csv"
            ))),
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Jsonl => "application/x-ndjson",
            Format::Csv => "text/csv; charset=utf-8",
        }
    }
}

/// A session's records.
#[utoipa::path(
    get,
    path = "/v1/sessions/{id}/records",
    tag = "sessions",
    params(("id" = String, Path, description = "Session id"), RecordsQuery),
    responses(
        (status = 200, description = "Records: a JSON array (json), one object per line (jsonl), or CSV with a header row. With remove_after_export, reading a terminal session's records to the end removes them",
            content(
                (Vec<Object> = "application/json"),
                (String = "application/x-ndjson"),
                (String = "text/csv"),
            )),
        (status = 400, description = "Bad format, offset or limit", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such session (or another client's)", body = ErrorBody),
    )
)]
pub async fn records(
    State(st): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<RecordsQuery>,
) -> Result<Response, ApiError> {
    let id = path_id(&id)?;
    let format = Format::parse(q.format.as_deref())?;
    let limit = match q.limit {
        None => None,
        Some(n @ 1..=10_000) => Some(n),
        Some(n) => {
            return Err(ApiError::invalid(format!(
                "limit: {n} is out of range; use 1..=10000, or omit it for all records"
            )));
        }
    };
    let offset = q.offset.unwrap_or(0);
    let session = owned_session(&st, &caller, &id).await?;
    // Only a session that was terminal before the read began has a fixed set of records, so
    // only then does reading to the end mean everything was exported.
    // A read that starts past the last record reads nothing: it must not count as an export.
    let remove_at_end = session.options.remove_after_export
        && session.status.is_terminal()
        && offset <= session.records;
    // The first page is read before answering, so a store failure is a proper 500 rather than
    // a cut-off 200.
    let first_len = limit.map_or(PAGE, |l| (l as usize).min(PAGE));
    let first = st.harvest.records(session.key(), offset, first_len).await?;
    let stream = RecordStream {
        harvest: st.harvest.clone(),
        id: session.key(),
        format,
        next_offset: offset,
        remaining: limit,
        columns: None,
        started: false,
        remove_at_end,
        read_to_end: false,
    }
    .into_stream(first);
    Ok((
        [(CONTENT_TYPE, format.content_type())],
        Body::from_stream(stream),
    )
        .into_response())
}

/// State of one streamed answer.
struct RecordStream {
    harvest: Harvest,
    id: SessionKey,
    format: Format,
    next_offset: u64,
    /// Records still to send when a limit was given.
    remaining: Option<u64>,
    /// CSV columns, fixed by the first page.
    columns: Option<Vec<String>>,
    /// Whether a record was written (JSON needs commas between them).
    started: bool,
    /// `remove_after_export` applies: remove the records once the last page was sent.
    remove_at_end: bool,
    /// The last page (shorter than asked) was produced.
    read_to_end: bool,
}

impl RecordStream {
    fn into_stream(
        self,
        first: Vec<Record>,
    ) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
        futures::stream::unfold(
            (self, Some(first), false),
            |(mut s, mut pending, done): (RecordStream, Option<Vec<Record>>, bool)| async move {
                if done {
                    // Polled again after the last chunk: the body writer has taken it, so the
                    // client has been sent every record.
                    if s.remove_at_end && s.read_to_end {
                        s.remove_at_end = false;
                        if let Err(e) = s.harvest.records_exported(&s.id).await {
                            tracing::warn!(session = %s.id, error = %e,
                                "removing exported records failed; they stay until the session's timeout");
                        }
                    }
                    return None;
                }
                let page = match pending.take() {
                    Some(p) => p,
                    None => {
                        let want = s.remaining.map_or(PAGE, |r| (r as usize).min(PAGE));
                        if want == 0 {
                            Vec::new()
                        } else {
                            match s.harvest.records(&s.id, s.next_offset, want).await {
                                Ok(p) => p,
                                Err(e) => {
                                    // Headers are sent: all that is left is to cut the body, which
                                    // the client sees as a truncated (invalid) document.
                                    tracing::error!(session = %s.id, error = %e, "records stream failed");
                                    return Some((
                                        Err(std::io::Error::other(e.to_string())),
                                        (s, None, true),
                                    ));
                                }
                            }
                        }
                    }
                };
                let asked = s.remaining.map_or(PAGE, |r| (r as usize).min(PAGE));
                let last = page.len() < asked || page.is_empty();
                let n = page.len() as u64;
                if let Some(r) = s.remaining.as_mut() {
                    *r = r.saturating_sub(n);
                }
                let mut out = s.render(&page);
                if let Some(r) = page.last() {
                    s.next_offset = r.seq + 1;
                }
                s.read_to_end |= last;
                let finished = last || s.remaining == Some(0);
                if finished {
                    out.extend_from_slice(s.trailer().as_bytes());
                }
                Some((Ok(Bytes::from(out)), (s, None, finished)))
            },
        )
    }

    fn render(&mut self, page: &[Record]) -> Vec<u8> {
        let mut out = Vec::with_capacity(page.len() * 128 + 16);
        match self.format {
            Format::Json => {
                for r in page {
                    out.push(if self.started { b',' } else { b'[' });
                    self.started = true;
                    // Serializing a serde_json::Value into a Vec cannot fail.
                    let _ = serde_json::to_writer(&mut out, &r.data);
                }
            }
            Format::Jsonl => {
                for r in page {
                    let _ = serde_json::to_writer(&mut out, &r.data);
                    out.push(b'\n');
                }
            }
            Format::Csv => {
                let columns = self.columns.get_or_insert_with(|| csv_columns(page));
                let mut w = csv::Writer::from_writer(Vec::new());
                if !self.started {
                    // No columns (no records): an empty body, not a row holding "".
                    if !columns.is_empty() {
                        let _ = w.write_record(columns.iter());
                    }
                    self.started = true;
                }
                for r in page {
                    let _ = w.write_record(columns.iter().map(|c| csv_cell(&r.data, c)));
                }
                if let Ok(bytes) = w.into_inner() {
                    out = bytes;
                }
            }
        }
        out
    }

    fn trailer(&self) -> &'static str {
        match self.format {
            Format::Json if self.started => "]",
            Format::Json => "[]",
            _ => "",
        }
    }
}

/// The CSV columns: keys of the first page's records in order of first appearance.
fn csv_columns(page: &[Record]) -> Vec<String> {
    let mut cols: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for r in page {
        match &r.data {
            serde_json::Value::Object(m) => {
                for k in m.keys() {
                    if seen.insert(k.clone()) {
                        cols.push(k.clone());
                    }
                }
            }
            _ => {
                if seen.insert("value".to_string()) {
                    cols.push("value".to_string());
                }
            }
        }
    }
    cols
}

fn csv_cell(data: &serde_json::Value, column: &str) -> String {
    let v = match data {
        serde_json::Value::Object(m) => m.get(column),
        other if column == "value" => Some(other),
        _ => None,
    };
    match v {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}
