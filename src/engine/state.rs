//! [`MemoryCrawlState`]: a [`CrawlState`] held in this process's memory, for runs without a store
//! (`harvest run` without `--resume`, `harvest bench crawl`, tests).
//!
//! Whoever commits the checkpoints calls [`MemoryCrawlState::apply`] with each committed batch,
//! exactly as a store would apply it; the engine reads it back through [`CrawlState`]. Its memory
//! grows with the crawl (every seen URL is kept): a crawl that must stay bounded runs over a store.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;

use crate::job::{CrawlState, CrawlStateError};
use crate::session::FrontierEntry;
use crate::store::{CheckpointBatch, FRONTIER_PAGE_MAX, FrontierItem};

#[derive(Debug, Default)]
struct Inner {
    next_pos: u64,
    frontier: BTreeMap<u64, FrontierEntry>,
    index: HashMap<String, u64>,
    seen: HashSet<String>,
}

/// The committed frontier and seen set of one run, in memory. See the module doc.
#[derive(Debug, Default)]
pub struct MemoryCrawlState {
    inner: Mutex<Inner>,
}

impl MemoryCrawlState {
    /// An empty state (a fresh crawl).
    pub fn new() -> MemoryCrawlState {
        MemoryCrawlState::default()
    }

    /// Applies a committed batch's frontier and seen-set changes, with the stores' semantics:
    /// additions take the next positions (a URL already in the frontier keeps its place), then
    /// removals.
    pub fn apply(&self, batch: &CheckpointBatch) {
        let mut st = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for e in &batch.frontier_add {
            if st.index.contains_key(&e.url) {
                continue;
            }
            st.next_pos += 1;
            let pos = st.next_pos;
            st.index.insert(e.url.clone(), pos);
            st.frontier.insert(pos, e.clone());
        }
        for done in &batch.frontier_done {
            if let Some(pos) = st.index.remove(&done.url) {
                st.frontier.remove(&pos);
            }
        }
        for url in &batch.seen_add {
            if !st.seen.contains(url) {
                st.seen.insert(url.clone());
            }
        }
    }

    /// Entries in the frontier.
    pub fn frontier_len(&self) -> u64 {
        let st = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        st.frontier.len() as u64
    }
}

#[async_trait]
impl CrawlState for MemoryCrawlState {
    async fn frontier_page(
        &self,
        after_pos: u64,
        limit: usize,
    ) -> Result<Vec<FrontierItem>, CrawlStateError> {
        if limit == 0 || limit > FRONTIER_PAGE_MAX {
            return Err(CrawlStateError::Invalid(format!(
                "frontier page limit {limit} is out of range 1..={FRONTIER_PAGE_MAX}"
            )));
        }
        let st = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Ok(st
            .frontier
            .range(after_pos.saturating_add(1)..)
            .take(limit)
            .map(|(pos, entry)| FrontierItem {
                pos: *pos,
                entry: entry.clone(),
            })
            .collect())
    }

    async fn seen_filter(&self, urls: Vec<String>) -> Result<Vec<bool>, CrawlStateError> {
        let st = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Ok(urls.iter().map(|u| st.seen.contains(u)).collect())
    }
}
