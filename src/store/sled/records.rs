//! A session's records (`R`, and chunks of them, `E`) and its log (`O`).
//!
//! Records are numbered from the session's committed count and written just before the batch's
//! intent, not inside it: a crash in between leaves records numbered at or after the committed
//! count, which no reader sees (`records_page` stops at the count) and the next checkpoint
//! overwrites. Keeping them out of the intent halves the bytes a checkpoint writes.

use super::durability::Batch;
use super::keys::{corrupt_key, data_prefix, k_chunk, k_log, k_record, show_key, u64_at};
use super::sessions::PURGE_CHUNK;
use super::{SledStore, blocking, sled_err};
use crate::session::{Context, LogLine, Record, Session, SessionKey};
use crate::store::{LOG_LINES_MAX, RecordsPage, StoreError, StoreResult, codec};

/// Most records of one record chunk (`E`), and about the most bytes: one key per checkpoint's
/// worth of small records instead of one per record (a key costs a sled tree update on write and
/// ~50 bytes of sled's memory for as long as the store is open), below sled's blob threshold.
const RECORD_CHUNK_MAX: usize = 256;
const RECORD_CHUNK_BYTES: usize = 64 * 1024;
const RECORDS_LIMIT_MAX: usize = 10_000;

fn record_json(k: &[u8], text: &str) -> StoreResult<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| corrupt_key(k, &format!("record is not JSON: {e}")))
}

impl SledStore {
    /// Stages a checkpoint's records, as chunks numbered from `first` (the committed count),
    /// outside the batch's intent (see the module doc).
    pub(super) fn stage_records(
        &self,
        b: &mut Batch,
        id: &SessionKey,
        first: u64,
        records: &[serde_json::Value],
    ) -> StoreResult<()> {
        if !records.is_empty() {
            // A crashed checkpoint's chunks (at or after the committed count) go first: a chunk
            // left there could otherwise overlap the ones written now.
            for kv in self.db.range(k_chunk(b'E', id, first)..) {
                let (k, _) = kv.map_err(sled_err("finding a crashed checkpoint's records"))?;
                if !k.starts_with(&data_prefix(b'E', id)) {
                    break;
                }
                b.loose.push((k, None));
            }
            let mut chunk: Vec<String> = Vec::new();
            let mut chunk_first = first;
            let mut bytes = 0;
            for (i, record) in records.iter().enumerate() {
                let text = serde_json::to_string(record).map_err(|e| {
                    StoreError::Invalid(format!("record {i} is not valid JSON: {e}"))
                })?;
                bytes += text.len();
                chunk.push(text);
                if chunk.len() >= RECORD_CHUNK_MAX || bytes >= RECORD_CHUNK_BYTES {
                    let k = k_chunk(b'E', id, chunk_first);
                    b.loose
                        .push((k.into(), Some(codec::encode(&chunk)?.into())));
                    chunk_first += chunk.len() as u64;
                    chunk.clear();
                    bytes = 0;
                }
            }
            if !chunk.is_empty() {
                let k = k_chunk(b'E', id, chunk_first);
                b.loose
                    .push((k.into(), Some(codec::encode(&chunk)?.into())));
            }
        }
        Ok(())
    }

    pub(super) fn stage_log(
        &self,
        b: &mut Batch,
        id: &SessionKey,
        lines: &[LogLine],
    ) -> StoreResult<()> {
        let prefix = data_prefix(b'O', id);
        let next = match self.db.scan_prefix(&prefix).next_back() {
            Some(kv) => u64_at(&kv.map_err(sled_err("reading the log"))?.0, prefix.len())? + 1,
            None => 0,
        };
        let end = next + lines.len() as u64;
        let keep_from = end.saturating_sub(LOG_LINES_MAX);
        for (i, line) in lines.iter().enumerate() {
            let n = next + i as u64;
            if n >= keep_from {
                b.insert(k_log(id, n), codec::encode(line)?);
            }
        }
        // Older lines beyond the cap: at most `lines.len()` of them, since the cap always held.
        for kv in self.db.range(prefix.clone()..k_log(id, keep_from)) {
            b.remove(kv.map_err(sled_err("trimming the log"))?.0);
        }
        Ok(())
    }

    /// Deletes the records numbered below `below` (whole chunks: a chunk that reaches past it
    /// stays), a bounded number of keys per hold of the store mutex; returns the first record
    /// still held.
    fn delete_records_below(&self, id: &SessionKey, below: u64) -> StoreResult<u64> {
        // Stores before record chunks kept one `R` key per record.
        for _ in 0..(1u64 << 32) {
            let _st = self.lock();
            let mut b = Batch::default();
            for kv in self
                .db
                .range(k_record(id, 0)..k_record(id, below))
                .take(PURGE_CHUNK)
            {
                b.remove(kv.map_err(sled_err("removing records"))?.0);
            }
            if b.is_empty() {
                break;
            }
            self.apply_atomic(b)?;
        }
        let prefix = data_prefix(b'E', id);
        // Bounded by the session's chunks: every round removes some or ends.
        for _ in 0..(1u64 << 32) {
            let _st = self.lock();
            let mut b = Batch::default();
            let mut kept = None;
            for kv in self.db.scan_prefix(&prefix).take(PURGE_CHUNK) {
                let (k, v) = kv.map_err(sled_err("removing records"))?;
                let first = u64_at(&k, prefix.len())?;
                let texts: Vec<String> = codec::decode(&|| show_key(&k), &v)?;
                if first + texts.len() as u64 > below {
                    kept = Some(first);
                    break;
                }
                b.remove(k);
            }
            let done = b.is_empty() || kept.is_some();
            if !b.is_empty() {
                self.apply_atomic(b)?;
            }
            if done {
                return Ok(kept.map_or(below, |first| first.min(below)));
            }
        }
        Ok(below)
    }

    /// Removes the records below `below` (all committed ones when `None`, and then only of a
    /// terminal session) and records how far the removal went in the session. The session
    /// after it; `None` when there is none (or, for `None`, it is not terminal).
    pub(super) async fn remove_records(
        &self,
        id: &SessionKey,
        below: Option<u64>,
    ) -> StoreResult<Option<Session>> {
        let target = {
            let _st = self.lock();
            match self.load(id)? {
                Some(s) if below.is_some() || s.status.is_terminal() => {
                    below.unwrap_or(s.records).min(s.records)
                }
                _ => return Ok(None),
            }
        };
        // Records below `target` are committed and were exported: no commit rewrites them, and
        // a concurrent removal of the whole session deletes the same keys.
        let held_from = blocking(|| self.delete_records_below(id, target))?;
        let (s, ticket) = {
            let mut st = self.lock();
            let Some(old) = self.load(id)? else {
                return Ok(None);
            };
            let mut s = old.clone();
            s.records_removed = s.records_removed.max(held_from);
            let mut c = st.clone();
            let mut b = Batch::default();
            Self::stage(&mut c, &mut b, Some(&old), &s)?;
            let ticket = self.commit(&mut st, c, b)?;
            (s, ticket)
        };
        self.durability.wait(ticket).await?;
        Ok(Some(s))
    }

    pub(super) fn page_records(&self, p: RecordsPage) -> StoreResult<Vec<Record>> {
        if p.limit == 0 || p.limit > RECORDS_LIMIT_MAX {
            return Err(StoreError::Invalid(format!(
                "records limit {} is out of range; use 1 to {RECORDS_LIMIT_MAX}",
                p.limit
            )));
        }
        // Records at or after the committed count are a crashed checkpoint's (see the module
        // doc): never shown.
        let (committed, removed) = match self.load(&p.id)? {
            Some(s) => (s.records, s.records_removed),
            None => return Ok(Vec::new()),
        };
        // Records before `records_removed` are gone (remove_after_export).
        let p = RecordsPage {
            offset: p.offset.max(removed),
            ..p
        };
        if p.offset >= committed {
            return Ok(Vec::new());
        }
        // Stores before record chunks kept one `R` key per record; a session may have both (`R`
        // below some count, `E` from there on).
        let prefix = data_prefix(b'R', &p.id);
        let mut out = Vec::with_capacity(p.limit.min(1024));
        let end = k_record(&p.id, committed);
        for kv in self.db.range(k_record(&p.id, p.offset)..end).take(p.limit) {
            let (k, v) = kv.map_err(sled_err("reading records"))?;
            if !k.starts_with(&prefix) {
                break;
            }
            let seq = u64_at(&k, prefix.len())?;
            let text: String = codec::decode(&|| show_key(&k), &v)?;
            out.push(Record {
                seq,
                data: record_json(&k, &text)?,
            });
        }
        let mut next = out.last().map_or(p.offset, |r| r.seq + 1);
        if out.len() == p.limit || next >= committed {
            return Ok(out);
        }
        let prefix = data_prefix(b'E', &p.id);
        // From the chunk holding `next` (the last one starting at or before it).
        let mut lo = k_chunk(b'E', &p.id, next);
        if let Some(kv) = self
            .db
            .range(k_chunk(b'E', &p.id, 0)..=lo.clone())
            .next_back()
        {
            lo = kv.map_err(sled_err("reading records"))?.0.to_vec();
        }
        // Bounded: each chunk read either yields records or ends the page.
        for kv in self.db.range(lo..k_chunk(b'E', &p.id, committed)) {
            let (k, v) = kv.map_err(sled_err("reading records"))?;
            if !k.starts_with(&prefix) {
                break;
            }
            let first = u64_at(&k, prefix.len())?;
            if first > next {
                return Err(corrupt_key(&k, "a gap before this record chunk"));
            }
            let texts: Vec<String> = codec::decode(&|| show_key(&k), &v)?;
            let skip = (next - first) as usize;
            for text in texts.iter().skip(skip) {
                if next >= committed {
                    return Ok(out);
                }
                out.push(Record {
                    seq: next,
                    data: record_json(&k, text)?,
                });
                next += 1;
                if out.len() == p.limit {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    /// Stages a session's context (JSON text: bincode cannot hold its untagged values).
    pub(super) fn stage_context(
        b: &mut Batch,
        id: &SessionKey,
        context: &Context,
    ) -> StoreResult<()> {
        let text = serde_json::to_string(context)
            .map_err(|e| StoreError::Invalid(format!("the context is not valid JSON: {e}")))?;
        b.insert(data_prefix(b'H', id), codec::encode(&text)?);
        Ok(())
    }

    pub(super) fn context(&self, id: &SessionKey) -> StoreResult<Option<Context>> {
        let k = data_prefix(b'H', id);
        let Some(v) = self.db.get(&k).map_err(sled_err("reading a context"))? else {
            return Ok(None);
        };
        let text: String = codec::decode(&|| show_key(&k), &v)?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| corrupt_key(&k, &format!("context is not JSON: {e}")))
    }

    pub(super) fn tail_log(&self, id: &SessionKey, limit: usize) -> StoreResult<Vec<LogLine>> {
        let mut lines = Vec::new();
        for kv in self.db.scan_prefix(data_prefix(b'O', id)).rev().take(limit) {
            let (k, v) = kv.map_err(sled_err("reading the log"))?;
            lines.push(codec::decode(&|| show_key(&k), &v)?);
        }
        lines.reverse();
        Ok(lines)
    }
}
