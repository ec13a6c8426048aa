//! A session's crawl state: the frontier chunks (`B`, `J`, `K`), the seen set and the index of
//! URLs (`U`, `I`), read a page at a time, and what a next attempt resumes from.
//!
//! # Crawl state: few keys per URL
//!
//! A checkpoint of a crawl touches thousands of URLs, and every sled key written costs a tree
//! update and a log write (~7 µs on 2 cores: sled 0.34 splits a leaf every few inserts), a
//! removed one a node merge. So the frontier entries of one checkpoint are written together as
//! chunks of at most [`CHUNK_ENTRIES`] (`B`), each with a small bitmap of the entries still to do
//! (`J`); a done URL clears its bit (one `J` write per chunk per checkpoint). The caller says
//! where a done URL sits ([`crate::store::FrontierDone::pos`], checked against the chunk), so
//! finishing a page reads no per-URL key.
//!
//! The seen set and the URL → position map (`U`, one key per URL) are an index of the chunks,
//! and a new URL (one in both `frontier_add` and `seen_add`, as the engine sends them) gets no
//! `U` key when committed: `I` says how far the index goes, and whatever reads `U` (a seen-set
//! lookup, an addition or removal by URL) first indexes the chunks after `I`. The engine reads
//! the seen set only once its own cache of seen URLs is no longer complete (more than
//! ~100,000 URLs, or a resumed attempt), so a crawl smaller than that never writes `U` at all,
//! and a bigger one indexes each URL once, as before. A chunk all done stays until it is indexed
//! (it is the only record of its URLs), then goes. (`harvest bench crawl --store`, 2 cores: a
//! checkpoint of 500 pages took 8.3 ms of store time with a `U` write per URL, 1.9 ms without.)

use serde::{Deserialize, Serialize};
use sled::IVec;

use super::durability::Batch;
use super::keys::{corrupt_key, data_prefix, k_chunk, k_url, show_key, u64_at};
use super::{SledStore, blocking, read, sled_err};
use crate::session::{FrontierEntry, SessionKey};
use crate::store::{
    CheckpointBatch, FRONTIER_PAGE_MAX, FrontierItem, FrontierPage, ResumeState, SeenFilter,
    StoreError, StoreResult, codec,
};

/// Most entries of one frontier chunk: 512 entries of ~100 bytes stay well under sled's blob
/// threshold (a quarter of its 512 KiB segment), above which every write is a file of its own.
const CHUNK_ENTRIES: usize = 512;

/// Frontier chunks indexed per hold of the store mutex when the `U` index catches up.
const INDEX_STEP: usize = 8;

/// Which entries of a frontier chunk are still in the frontier (`J` value).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ChunkLive {
    /// Entries in the chunk.
    len: u32,
    /// Bit `i`: entry `first + i` is still to do.
    live: Vec<u64>,
}

impl ChunkLive {
    fn new(live: &[bool]) -> ChunkLive {
        let mut bits = vec![0u64; live.len().div_ceil(64)];
        for (i, _) in live.iter().enumerate().filter(|(_, l)| **l) {
            bits[i / 64] |= 1 << (i % 64);
        }
        ChunkLive {
            len: live.len() as u32,
            live: bits,
        }
    }

    fn is_live(&self, i: u64) -> bool {
        i < u64::from(self.len)
            && self
                .live
                .get((i / 64) as usize)
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn clear(&mut self, i: u64) {
        if let Some(w) = self.live.get_mut((i / 64) as usize) {
            *w &= !(1 << (i % 64));
        }
    }

    fn count(&self) -> u64 {
        self.live.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// A `U` value: whether the URL is in the seen set, and the frontier position it was last added
/// at (in the frontier while that position's chunk bit is set). Empty: seen, never added (also
/// how stores before chunked frontiers wrote every member); else a flags byte (bit 0: seen) and
/// the position, u64 BE.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct UrlState {
    pub(super) seen: bool,
    pub(super) pos: Option<u64>,
}

impl UrlState {
    pub(super) fn decode(k: &[u8], v: &[u8]) -> StoreResult<UrlState> {
        match v {
            [] => Ok(UrlState {
                seen: true,
                pos: None,
            }),
            [flags, pos @ ..] if pos.len() == 8 => {
                let raw: [u8; 8] = pos
                    .try_into()
                    .map_err(|_| corrupt_key(k, "a malformed URL state"))?;
                Ok(UrlState {
                    seen: flags & 1 != 0,
                    pos: Some(u64::from_be_bytes(raw)),
                })
            }
            _ => Err(corrupt_key(k, "a malformed URL state")),
        }
    }

    /// `None`: nothing to keep (neither seen nor ever added).
    pub(super) fn encode(self) -> Option<IVec> {
        match self.pos {
            None if self.seen => Some(IVec::default()),
            None => None,
            Some(pos) => {
                let mut v = Vec::with_capacity(9);
                v.push(u8::from(self.seen));
                v.extend_from_slice(&pos.to_be_bytes());
                Some(v.into())
            }
        }
    }
}

/// The `U` state of `url` in session `id` (default: neither seen nor added).
fn read_url(db: &sled::Db, id: &SessionKey, url: &str) -> StoreResult<UrlState> {
    let k = k_url(b'U', id, url);
    match db.get(&k).map_err(sled_err("reading a URL's state"))? {
        Some(v) => UrlState::decode(&k, &v),
        None => Ok(UrlState::default()),
    }
}

/// The crawl-state changes of one checkpoint being staged: what it read and what it changes.
struct FrontierStage<'a> {
    id: &'a SessionKey,
    /// URL states read or changed (`true`: changed).
    urls: std::collections::HashMap<&'a str, (UrlState, bool)>,
    /// Chunks of earlier checkpoints read or changed (`true`: changed), by first position.
    chunks: std::collections::BTreeMap<u64, (ChunkLive, bool)>,
    /// Entries of chunks of earlier checkpoints read to check a position hint, by first position.
    entries: std::collections::HashMap<u64, Vec<FrontierEntry>>,
}

impl<'a> FrontierStage<'a> {
    fn url(&mut self, db: &sled::Db, url: &'a str) -> StoreResult<UrlState> {
        if let Some((st, _)) = self.urls.get(url) {
            return Ok(*st);
        }
        let st = read_url(db, self.id, url)?;
        self.urls.insert(url, (st, false));
        Ok(st)
    }

    fn set_url(&mut self, url: &'a str, st: UrlState) {
        self.urls.insert(url, (st, true));
    }

    /// The first position of the stored chunk holding `pos`, if one still does.
    fn chunk_of(&mut self, db: &sled::Db, pos: u64) -> StoreResult<Option<u64>> {
        if let Some((first, (live, _))) = self.chunks.range(..=pos).next_back()
            && pos < first + u64::from(live.len)
        {
            return Ok(Some(*first));
        }
        let lo = k_chunk(b'J', self.id, 0);
        let Some(kv) = db.range(lo..=k_chunk(b'J', self.id, pos)).next_back() else {
            return Ok(None);
        };
        let (k, v) = kv.map_err(sled_err("reading a frontier chunk's bitmap"))?;
        let first = u64_at(&k, data_prefix(b'J', self.id).len())?;
        let live: ChunkLive = codec::decode(&|| show_key(&k), &v)?;
        if pos >= first + u64::from(live.len) {
            return Ok(None);
        }
        self.chunks.insert(first, (live, false));
        Ok(Some(first))
    }

    /// Whether a stored position (one of an earlier checkpoint) is still in the frontier.
    fn is_live(&mut self, db: &sled::Db, pos: u64) -> StoreResult<bool> {
        Ok(match self.chunk_of(db, pos)? {
            Some(first) => self.chunks[&first].0.is_live(pos - first),
            None => false,
        })
    }

    /// Whether the stored entry at `pos` (one of an earlier checkpoint) is `url`'s, read from its
    /// chunk. Returns the chunk's first position when it is.
    fn holds(&mut self, db: &sled::Db, pos: u64, url: &str) -> StoreResult<Option<u64>> {
        let Some(first) = self.chunk_of(db, pos)? else {
            return Ok(None);
        };
        if !self.entries.contains_key(&first) {
            let Some(entries) = read(db, &k_chunk(b'B', self.id, first))? else {
                return Ok(None);
            };
            self.entries.insert(first, entries);
        }
        let at = self.entries[&first].get((pos - first) as usize);
        Ok(at.filter(|e| e.url == url).map(|_| first))
    }
}

impl SledStore {
    /// Stages frontier additions (at the session's next positions), removals (after the
    /// additions: a URL found and done in the same batch ends up done) and seen-set additions.
    /// See "Crawl state" in the module doc.
    pub(super) fn stage_frontier(
        &self,
        b: &mut Batch,
        id: &SessionKey,
        batch: &CheckpointBatch,
    ) -> StoreResult<()> {
        if batch.frontier_add.is_empty()
            && batch.frontier_done.is_empty()
            && batch.seen_add.is_empty()
        {
            return Ok(());
        }
        let k_next = data_prefix(b'K', id);
        let start: u64 = read(&self.db, &k_next)?.unwrap_or(1);
        let mut st = FrontierStage {
            id,
            urls: std::collections::HashMap::new(),
            chunks: std::collections::BTreeMap::new(),
            entries: std::collections::HashMap::new(),
        };
        // Lookups by URL need the `U` index to cover every committed chunk; brought up to date
        // once, on the first lookup (the engine's batches need none).
        let mut caught_up = false;
        let mut lookup = |st: &mut FrontierStage<'_>| -> StoreResult<()> {
            if !caught_up {
                caught_up = true;
                while !self.index_step(st.id, usize::MAX)? {}
            }
            Ok(())
        };
        let new_urls: std::collections::HashSet<&str> =
            batch.seen_add.iter().map(String::as_str).collect();
        // Additions of this batch by URL, to their position.
        let mut here: std::collections::HashMap<&str, u64> =
            std::collections::HashMap::with_capacity(batch.frontier_add.len());
        let mut added: Vec<&FrontierEntry> = Vec::new();
        for e in &batch.frontier_add {
            if here.contains_key(e.url.as_str()) {
                continue; // added earlier in this batch: keeps its place
            }
            if !new_urls.contains(e.url.as_str()) {
                lookup(&mut st)?;
                let u = st.url(&self.db, &e.url)?;
                if let Some(pos) = u.pos
                    && st.is_live(&self.db, pos)?
                {
                    continue; // already in the frontier: keeps its place
                }
                st.set_url(
                    &e.url,
                    UrlState {
                        seen: u.seen,
                        pos: Some(start + added.len() as u64),
                    },
                );
            }
            // New to the session (see `CheckpointBatch::frontier_add`): indexed in `U` later,
            // from its chunk.
            here.insert(&e.url, start + added.len() as u64);
            added.push(e);
        }
        let mut new_live = vec![true; added.len()];
        for done in &batch.frontier_done {
            // The position hint, checked against the entry there.
            if let Some(pos) = done.pos {
                if pos >= start {
                    if let Some(e) = added.get((pos - start) as usize)
                        && e.url == done.url
                    {
                        new_live[(pos - start) as usize] = false;
                        continue;
                    }
                } else if let Some(first) = st.holds(&self.db, pos, &done.url)?
                    && let Some((live, changed)) = st.chunks.get_mut(&first)
                    && live.is_live(pos - first)
                {
                    live.clear(pos - first);
                    *changed = true;
                    continue;
                }
                // Not live there (done already): the URL may still be live elsewhere.
            }
            if let Some(pos) = here.get(done.url.as_str()) {
                new_live[(pos - start) as usize] = false;
                continue;
            }
            lookup(&mut st)?;
            let Some(pos) = st.url(&self.db, &done.url)?.pos else {
                continue;
            };
            if pos >= start {
                continue; // set above: one of this batch's, found in `here`
            }
            if let Some(first) = st.chunk_of(&self.db, pos)?
                && let Some((live, changed)) = st.chunks.get_mut(&first)
                && live.is_live(pos - first)
            {
                live.clear(pos - first);
                *changed = true;
            }
        }
        for url in &batch.seen_add {
            if here.contains_key(url.as_str()) {
                continue; // indexed from its chunk
            }
            lookup(&mut st)?;
            let u = st.url(&self.db, url)?;
            if !u.seen {
                st.set_url(url, UrlState { seen: true, ..u });
            }
        }
        for (url, (u, changed)) in &st.urls {
            if !changed {
                continue;
            }
            let k = k_url(b'U', id, url);
            match u.encode() {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        // Read after any catch-up above.
        let (indexed, _) = self.index_range(id)?;
        for (first, (live, changed)) in &st.chunks {
            if !changed {
                continue;
            }
            // A chunk not yet indexed stays, done or not: it is the seen set's record of its URLs.
            if live.count() == 0 && *first < indexed {
                b.remove(k_chunk(b'B', id, *first));
                b.remove(k_chunk(b'J', id, *first));
            } else {
                b.insert(k_chunk(b'J', id, *first), codec::encode(live)?);
            }
        }
        for (i, (entries, live)) in added
            .chunks(CHUNK_ENTRIES)
            .zip(new_live.chunks(CHUNK_ENTRIES))
            .enumerate()
        {
            let first = start + (i * CHUNK_ENTRIES) as u64;
            b.insert(k_chunk(b'B', id, first), codec::encode(&entries)?);
            b.insert(
                k_chunk(b'J', id, first),
                codec::encode(&ChunkLive::new(live))?,
            );
        }
        if !added.is_empty() {
            b.insert(k_next, codec::encode(&(start + added.len() as u64))?);
        }
        Ok(())
    }

    /// `I` and `K` of `id`: the index covers the frontier positions before the first, the
    /// next addition takes the second.
    fn index_range(&self, id: &SessionKey) -> StoreResult<(u64, u64)> {
        let indexed = read(&self.db, &data_prefix(b'I', id))?.unwrap_or(1);
        let next = read(&self.db, &data_prefix(b'K', id))?.unwrap_or(1);
        Ok((indexed, next))
    }

    /// Indexes in `U` up to `max_chunks` frontier chunks the index does not cover yet (see
    /// "Crawl state" in the module doc). Returns whether the index now covers every chunk.
    /// Callers hold the store mutex.
    ///
    /// Not atomic, and need not be: `U` and `I` are derived from the committed chunks, written
    /// in order (the `U` keys, then `I`, then the removal of chunks all done), so a crash
    /// leaves an index that is behind, never wrong, and this redoes the rest. An entry whose URL
    /// has a `U` position at or after the entry's own was written there since (or by an earlier
    /// run of this): it is left as it is.
    pub(super) fn index_step(&self, id: &SessionKey, max_chunks: usize) -> StoreResult<bool> {
        let k_indexed = data_prefix(b'I', id);
        let (from, next) = self.index_range(id)?;
        if from >= next {
            return Ok(true);
        }
        let prefix = data_prefix(b'B', id);
        let mut upto = from;
        let mut dead = Vec::new();
        let mut chunks = 0;
        for kv in self
            .db
            .range(k_chunk(b'B', id, from)..k_chunk(b'B', id, next))
        {
            if chunks == max_chunks {
                break;
            }
            chunks += 1;
            let (k, v) = kv.map_err(sled_err("reading a frontier chunk"))?;
            let first = u64_at(&k, prefix.len())?;
            let entries: Vec<FrontierEntry> = codec::decode(&|| show_key(&k), &v)?;
            for (i, e) in entries.iter().enumerate() {
                let pos = first + i as u64;
                let old = read_url(&self.db, id, &e.url)?;
                if old.pos.is_some_and(|p| p >= pos) {
                    continue;
                }
                let now = UrlState {
                    seen: true,
                    pos: Some(pos),
                };
                if let Some(v) = now.encode() {
                    self.db
                        .insert(k_url(b'U', id, &e.url), v)
                        .map_err(sled_err("indexing a URL"))?;
                }
            }
            let live: Option<ChunkLive> = read(&self.db, &k_chunk(b'J', id, first))?;
            if live.is_some_and(|l| l.count() == 0) {
                dead.push(first);
            }
            upto = first + entries.len() as u64;
        }
        let done = chunks < max_chunks || upto >= next;
        let upto = if done { next } else { upto };
        self.db
            .insert(&k_indexed, codec::encode(&upto)?)
            .map_err(sled_err("saving how far the URL index goes"))?;
        for first in dead {
            self.db
                .remove(k_chunk(b'B', id, first))
                .map_err(sled_err("removing a frontier chunk all done"))?;
            self.db
                .remove(k_chunk(b'J', id, first))
                .map_err(sled_err("removing a frontier chunk all done"))?;
        }
        Ok(done)
    }

    /// Brings the `U` index up to date before a commit that will look URLs up (one not shaped
    /// like the engine's: additions not all new, or done URLs without a position), a few chunks
    /// per hold of the store mutex, rather than all at once under it in `stage_frontier`.
    pub(super) fn index_before(&self, id: &SessionKey, batch: &CheckpointBatch) -> StoreResult<()> {
        let lookups = batch.frontier_add.len() != batch.seen_add.len()
            || batch.frontier_done.iter().any(|d| d.pos.is_none());
        if lookups && self.index_behind(id)? {
            blocking(|| self.index_catch_up(id))?;
        }
        Ok(())
    }

    /// Whether some committed frontier chunks of `id` are not indexed in `U` yet.
    fn index_behind(&self, id: &SessionKey) -> StoreResult<bool> {
        let (from, next) = self.index_range(id)?;
        Ok(from < next)
    }

    /// Brings the `U` index of `id` up to date, a few chunks at a time so that commits of other
    /// sessions are not held off for long.
    fn index_catch_up(&self, id: &SessionKey) -> StoreResult<()> {
        // Bounded by the session's chunks (each round indexes up to INDEX_STEP of them, and only
        // this session's commits add more).
        for _ in 0..(1u64 << 32) {
            let _st = self.lock();
            if self.index_step(id, INDEX_STEP)? {
                break;
            }
        }
        Ok(())
    }

    pub(super) fn resume_sync(&self, id: &SessionKey) -> StoreResult<ResumeState> {
        let s = self.load(id)?.ok_or_else(|| {
            StoreError::Invalid(format!("no session {id} to resume; it was removed"))
        })?;
        // One small bitmap per chunk of entries: counting reads no entries.
        let mut frontier_len = 0u64;
        for kv in self.db.scan_prefix(data_prefix(b'J', id)) {
            let (k, v) = kv.map_err(sled_err("counting the frontier"))?;
            let live: ChunkLive = codec::decode(&|| show_key(&k), &v)?;
            frontier_len += live.count();
        }
        Ok(ResumeState {
            frontier_len,
            frontier_next: read(&self.db, &data_prefix(b'K', id))?.unwrap_or(1),
            records: s.records,
            metrics: s.metrics,
            usage: s.usage,
        })
    }

    pub(super) fn page_frontier(&self, p: FrontierPage) -> StoreResult<Vec<FrontierItem>> {
        if p.limit == 0 || p.limit > FRONTIER_PAGE_MAX {
            return Err(StoreError::Invalid(format!(
                "frontier page limit {} is out of range 1..={FRONTIER_PAGE_MAX}",
                p.limit
            )));
        }
        let Some(from) = p.after_pos.checked_add(1) else {
            return Ok(Vec::new());
        };
        let prefix = data_prefix(b'J', &p.id);
        // From the chunk holding `from` (the last one starting at or before it), if any.
        let mut lo = k_chunk(b'J', &p.id, from);
        if let Some(kv) = self
            .db
            .range(k_chunk(b'J', &p.id, 0)..=lo.clone())
            .next_back()
        {
            lo = kv.map_err(sled_err("reading the frontier"))?.0.to_vec();
        }
        let mut out = Vec::with_capacity(p.limit.min(1024));
        // Bounded by the session's chunks. Chunks all done but not yet indexed are skipped
        // without reading their entries.
        for kv in self.db.range(lo..) {
            let (k, v) = kv.map_err(sled_err("reading the frontier"))?;
            if !k.starts_with(&prefix) {
                break;
            }
            let first = u64_at(&k, prefix.len())?;
            let live: ChunkLive = codec::decode(&|| show_key(&k), &v)?;
            if first + u64::from(live.len) <= from || live.count() == 0 {
                continue;
            }
            let kb = k_chunk(b'B', &p.id, first);
            let entries: Vec<FrontierEntry> = read(&self.db, &kb)?
                .ok_or_else(|| corrupt_key(&k, "a frontier chunk bitmap without its chunk"))?;
            if entries.len() != live.len as usize {
                return Err(corrupt_key(
                    &kb,
                    "a frontier chunk of another length than its bitmap",
                ));
            }
            for (i, entry) in entries.into_iter().enumerate() {
                let pos = first + i as u64;
                if pos >= from && live.is_live(i as u64) {
                    out.push(FrontierItem { pos, entry });
                    if out.len() == p.limit {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    pub(super) fn filter_seen(&self, p: SeenFilter) -> StoreResult<Vec<bool>> {
        if p.urls.len() > FRONTIER_PAGE_MAX {
            return Err(StoreError::Invalid(format!(
                "seen filter of {} URLs; at most {FRONTIER_PAGE_MAX} per call",
                p.urls.len()
            )));
        }
        if self.index_behind(&p.id)? {
            blocking(|| self.index_catch_up(&p.id))?;
        }
        p.urls
            .iter()
            .map(|u| Ok(read_url(&self.db, &p.id, u)?.seen))
            .collect()
    }
}
