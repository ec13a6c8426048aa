//! Batched completions: the attempts of one process end their sessions through one
//! [`Finisher`], which hands every finish waiting at that moment to the store as one
//! [`Store::session_finish_many`] (one flush on sled, one transaction on PostgreSQL).
//!
//! Nothing waits to fill a batch. A finish that arrives while the store is idle goes alone at
//! once; finishes that arrive while [`IN_FLIGHT`] batches are being written queue up and go
//! together as the next batch. So an idle queue pays no latency, and a busy one pays one durable
//! commit per batch instead of one per session. Each attempt still gets its own answer and
//! keeps its own retries: a finish is a compare-and-set on (status, attempt, owner), so
//! batching changes when it is written, never what.

use std::sync::Arc;

use super::batch::{BatchWrite, Batcher, unanswered, write_batch};
use crate::session::Session;
use crate::store::{SessionFinish, Store, StoreResult};

/// Most finishes in one batch.
pub(crate) const FINISH_BATCH_MAX: usize = 256;

/// Batches being written at once. More than one lets the next batch be staged (sled) or sent
/// (PostgreSQL) while the previous one waits for its flush or commit, and keeps finishes going
/// while one batch waits on a row lock another process holds (PostgreSQL): with one batch in
/// flight, one such finish stalled every finish of the process
/// (`prefetch::a_finishing_attempt_frees_its_slot_for_the_next_session`). One in flight on
/// PostgreSQL made batches larger (10.4 finishes per UPDATE instead of 6.8 in `bench queue`'s
/// end-to-end phase) for no end-to-end gain that alternating runs could tell from noise.
const IN_FLIGHT: usize = 2;

/// Attempts that may wait for their finish without holding a worker slot
/// ([`Slot`](super::worker::Slot)): as many as the batches in flight can carry, so more would
/// not be written any sooner.
pub(crate) const FINISHING_MAX: usize = FINISH_BATCH_MAX * IN_FLIGHT;

/// Hands finishes to the store in batches. Cloned into every attempt; the batching task ends
/// when the last clone is dropped.
#[derive(Clone)]
pub(crate) struct Finisher(Batcher<SessionFinish, StoreResult<Option<Session>>>);

impl Finisher {
    /// Starts the batching task; the handle ends once every [`Finisher`] clone is dropped and
    /// the batches in flight are written (it then no longer holds the store).
    pub(crate) fn start(store: Arc<dyn Store>) -> (Finisher, tokio::task::JoinHandle<()>) {
        let (batcher, task) = Batcher::start(FINISH_BATCH_MAX, IN_FLIGHT, move |batch| {
            let store = store.clone();
            async move { write_batch(&Finishes(&*store), batch).await }
        });
        (Finisher(batcher), task)
    }

    /// [`Store::session_finish_if_running`], written together with whatever other finishes
    /// are waiting.
    pub(crate) async fn finish(&self, p: SessionFinish) -> StoreResult<Option<Session>> {
        // No answer only if the batching task is gone, which it is not while a clone lives (it
        // ends when the last one is dropped); said as an outage, so the attempt retries.
        self.0.call(p).await.unwrap_or_else(|| {
            Err(unanswered(
                "finishes",
                "the finish was dropped before it was written",
            ))
        })
    }
}

/// A batch of finishes: an attempt whose finish got an outage retries it on its own, as after
/// a single finish ([`write_batch`]).
struct Finishes<'a>(&'a dyn Store);

#[async_trait::async_trait]
impl BatchWrite<SessionFinish, Option<Session>> for Finishes<'_> {
    const WHAT: &'static str = "finishes";

    async fn one(&self, p: SessionFinish) -> StoreResult<Option<Session>> {
        self.0.session_finish_if_running(p).await
    }

    async fn many(
        &self,
        items: &[SessionFinish],
    ) -> StoreResult<Vec<StoreResult<Option<Session>>>> {
        self.0.session_finish_many(items).await
    }
}
