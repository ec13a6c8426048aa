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

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;

use crate::session::Session;
use crate::store::{SessionFinish, Store, StoreError, StoreResult};

/// Most finishes in one batch.
pub(crate) const FINISH_BATCH_MAX: usize = 256;

/// Batches being written at once. More than one lets the next batch be staged (sled) or sent
/// (PostgreSQL) while the previous one waits for its flush or commit.
const IN_FLIGHT: usize = 2;

/// Attempts that may wait for their finish without holding a worker slot
/// ([`Slot`](super::worker::Slot)): as many as the batches in flight can carry, so more would
/// not be written any sooner.
pub(crate) const FINISHING_MAX: usize = FINISH_BATCH_MAX * IN_FLIGHT;

type Answer = oneshot::Sender<StoreResult<Option<Session>>>;

/// Hands finishes to the store in batches. Cloned into every attempt; the batching task ends
/// when the last clone is dropped (see [`Finisher::closed`]).
#[derive(Clone)]
pub(crate) struct Finisher {
    tx: mpsc::UnboundedSender<(SessionFinish, Answer)>,
}

impl Finisher {
    /// Starts the batching task; the handle ends once every [`Finisher`] clone is dropped and
    /// the batches in flight are written (it then no longer holds the store).
    pub(crate) fn start(store: Arc<dyn Store>) -> (Finisher, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(store, rx));
        (Finisher { tx }, task)
    }

    /// [`Store::session_finish_if_running`], written together with whatever other finishes
    /// are waiting.
    pub(crate) async fn finish(&self, p: SessionFinish) -> StoreResult<Option<Session>> {
        let (answer, answered) = oneshot::channel();
        // Both fail only if the batching task is gone, which it is not while a clone lives
        // (it ends when the last one is dropped); said as an outage, so the attempt retries.
        if self.tx.send((p, answer)).is_err() {
            return Err(unanswered("the batching task has ended"));
        }
        answered
            .await
            .unwrap_or_else(|_| Err(unanswered("the finish was dropped before it was written")))
    }
}

async fn run(store: Arc<dyn Store>, mut rx: mpsc::UnboundedReceiver<(SessionFinish, Answer)>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut writing = JoinSet::new();
    while let Some(first) = rx.recv().await {
        // Wait for a free slot first: finishes arriving meanwhile join this batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let mut batch = vec![first];
        while batch.len() < FINISH_BATCH_MAX {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let store = store.clone();
        writing.spawn(async move {
            write(&*store, batch).await;
            drop(slot);
        });
        while writing.try_join_next().is_some() {}
    }
    while writing.join_next().await.is_some() {}
}

/// Writes one batch and answers each of its finishes.
async fn write(store: &dyn Store, batch: Vec<(SessionFinish, Answer)>) {
    let (items, answers): (Vec<SessionFinish>, Vec<Answer>) = batch.into_iter().unzip();
    if items.len() == 1 {
        let mut items = items;
        if let (Some(p), Some(answer)) = (items.pop(), answers.into_iter().next()) {
            let _ = answer.send(store.session_finish_if_running(p).await);
        }
        return;
    }
    match store.session_finish_many(&items).await {
        Ok(results) => {
            for (answer, r) in answers.into_iter().zip(results) {
                let _ = answer.send(r);
            }
        }
        // Nothing was written; each attempt retries on its own, as after a single finish.
        Err(e) if e.is_unavailable() => {
            let why = e.to_string();
            let mut e = Some(e);
            for answer in answers {
                let _ = answer.send(Err(e.take().unwrap_or_else(|| unanswered(&why))));
            }
        }
        // One item's statement failed and took the batch with it (PostgreSQL aborts the
        // transaction): write each on its own, so that only that item gets the error.
        Err(e) => {
            tracing::debug!(error = %e, "a batch of finishes failed; finishing each on its own");
            for (p, answer) in items.into_iter().zip(answers) {
                let _ = answer.send(store.session_finish_if_running(p).await);
            }
        }
    }
}

/// An outage error for a finish that got no answer of its own ([`StoreError::is_unavailable`]).
fn unanswered(why: &str) -> StoreError {
    StoreError::Io {
        context: "finishing a batch of sessions".into(),
        source: std::io::Error::other(why.to_string()),
    }
}
