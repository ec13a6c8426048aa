//! Group commit for store calls that can be written together: every call that arrives while
//! earlier batches are being written goes to the store with the others waiting at that moment,
//! as one batch ([`Batcher`]).
//!
//! Nothing waits to fill a batch. A call that arrives while the store is idle goes alone at
//! once; calls that arrive while `in_flight` batches are being written queue up and go together
//! as the next batch. So an idle store pays no latency, and a busy one pays one durable commit
//! per batch instead of one per call. Each caller still gets its own answer.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;

use crate::store::{StoreError, StoreResult};

/// One batch: each item with where its answer goes. The writer answers every item (a dropped
/// sender reads as "not answered" to its caller).
pub(crate) type Batch<T, R> = Vec<(T, oneshot::Sender<R>)>;

/// Hands items to a writer in batches. Cloned into every caller; the batching task ends when
/// the last clone is dropped and the batches in flight are written.
pub(crate) struct Batcher<T, R> {
    tx: mpsc::UnboundedSender<(T, oneshot::Sender<R>)>,
}

impl<T, R> Clone for Batcher<T, R> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
        }
    }
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// Starts the batching task: batches of at most `max` items, at most `in_flight` of them
    /// being written at once, each by `write`.
    pub(crate) fn start<W, F>(
        max: usize,
        in_flight: usize,
        write: W,
    ) -> (Batcher<T, R>, tokio::task::JoinHandle<()>)
    where
        W: Fn(Batch<T, R>) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(rx, max.max(1), in_flight.max(1), write));
        (Batcher { tx }, task)
    }

    /// `item`'s answer, written together with whatever else is waiting; `None` when it got
    /// none (the batching task has ended, or the writer dropped the item).
    pub(crate) async fn call(&self, item: T) -> Option<R> {
        let (answer, answered) = oneshot::channel();
        self.tx.send((item, answer)).ok()?;
        answered.await.ok()
    }
}

async fn run<T, R, W, F>(
    mut rx: mpsc::UnboundedReceiver<(T, oneshot::Sender<R>)>,
    max: usize,
    in_flight: usize,
    write: W,
) where
    T: Send + 'static,
    R: Send + 'static,
    W: Fn(Batch<T, R>) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(in_flight));
    let mut writing = JoinSet::new();
    while let Some(first) = rx.recv().await {
        // Wait for a free slot first: items arriving meanwhile join this batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let mut batch = vec![first];
        while batch.len() < max {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let written = write(batch);
        writing.spawn(async move {
            written.await;
            drop(slot);
        });
        while writing.try_join_next().is_some() {}
    }
    while writing.join_next().await.is_some() {}
}

/// The store calls a batch is written with ([`write_batch`]).
#[async_trait::async_trait]
pub(crate) trait BatchWrite<T: Send + Sync, R>: Sync {
    /// The items' name in messages ("finishes").
    const WHAT: &'static str;
    /// One item on its own.
    async fn one(&self, item: T) -> StoreResult<R>;
    /// Many items in one durable step, each one's answer in order.
    async fn many(&self, items: &[T]) -> StoreResult<Vec<StoreResult<R>>>;
}

/// Writes a batch of store calls and answers each: a lone item with [`BatchWrite::one`], more
/// with [`BatchWrite::many`]. When `many` fails as a whole with an outage
/// ([`StoreError::is_unavailable`]), every item gets that error, as after a call of its own.
/// When it fails otherwise, one item's statement failed and took the batch with it (PostgreSQL
/// aborts the transaction, so nothing of it was written): each item is written again on its
/// own, so that only that item gets its error.
pub(crate) async fn write_batch<T: Send + Sync, R, W: BatchWrite<T, R>>(
    w: &W,
    batch: Batch<T, StoreResult<R>>,
) {
    let (items, answers): (Vec<T>, Vec<_>) = batch.into_iter().unzip();
    if items.len() == 1 {
        for (item, answer) in items.into_iter().zip(answers) {
            let _ = answer.send(w.one(item).await);
        }
        return;
    }
    match w.many(&items).await {
        Ok(results) => {
            for (answer, r) in answers.into_iter().zip(results) {
                let _ = answer.send(r);
            }
        }
        Err(e) if e.is_unavailable() => {
            let why = e.to_string();
            let mut e = Some(e);
            for answer in answers {
                let _ = answer.send(Err(e.take().unwrap_or_else(|| unanswered(W::WHAT, &why))));
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "a batch of {} failed; writing each on its own", W::WHAT);
            for (item, answer) in items.into_iter().zip(answers) {
                let _ = answer.send(w.one(item).await);
            }
        }
    }
}

/// An outage error ([`StoreError::is_unavailable`]) for one of a batch of `what` that got no
/// answer of its own: the caller retries it, or reports the outage, as after its own call.
pub(crate) fn unanswered(what: &str, why: &str) -> StoreError {
    StoreError::Io {
        context: format!("writing a batch of {what}"),
        source: std::io::Error::other(why.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    /// While one batch is being written, the calls that arrive wait and then go as one batch;
    /// each gets its own answer.
    #[tokio::test]
    async fn calls_arriving_during_a_write_go_together_and_each_gets_its_answer() {
        let sizes: Arc<Mutex<Vec<usize>>> = Arc::default();
        let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
        let seen = sizes.clone();
        let (batcher, task) = Batcher::<u32, u32>::start(64, 1, move |batch| {
            let seen = seen.clone();
            let mut gate = gate_rx.clone();
            async move {
                if let Ok(mut s) = seen.lock() {
                    s.push(batch.len());
                }
                // The first batch is held until the others are queued.
                let _ = gate.wait_for(|open| *open).await;
                for (item, answer) in batch {
                    let _ = answer.send(item * 10);
                }
            }
        });
        let first = tokio::spawn({
            let b = batcher.clone();
            async move { b.call(1).await }
        });
        // Bounded wait for the first batch to start.
        for _ in 0..200 {
            if sizes.lock().map(|s| s.len()).unwrap_or(0) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let rest: Vec<_> = (2..=5)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { b.call(i).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = gate_tx.send(true);
        assert_eq!(first.await.ok().flatten(), Some(10));
        for (i, r) in (2..=5).zip(rest) {
            assert_eq!(r.await.ok().flatten(), Some(i * 10));
        }
        assert_eq!(sizes.lock().map(|s| s.clone()).unwrap_or_default(), [1, 4]);
        drop(batcher);
        assert!(
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_ok()
        );
    }

    /// A writer whose batch fails with `fail`; counts the items written on their own.
    struct Failing {
        fail: fn() -> StoreError,
        alone: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl BatchWrite<u32, u32> for Failing {
        const WHAT: &'static str = "tests";

        async fn one(&self, item: u32) -> StoreResult<u32> {
            self.alone
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(item * 10)
        }

        async fn many(&self, _: &[u32]) -> StoreResult<Vec<StoreResult<u32>>> {
            Err((self.fail)())
        }
    }

    async fn answers(w: &Failing) -> Vec<StoreResult<u32>> {
        let mut batch = Vec::new();
        let mut rx = Vec::new();
        for i in 1..=3 {
            let (tx, answer) = oneshot::channel();
            batch.push((i, tx));
            rx.push(answer);
        }
        write_batch(w, batch).await;
        let mut out = Vec::new();
        for answer in rx {
            out.push(
                answer
                    .await
                    .unwrap_or_else(|_| Err(unanswered("tests", "dropped"))),
            );
        }
        out
    }

    /// A batch that failed on one item's statement is written again item by item: each gets
    /// its own answer.
    #[tokio::test]
    async fn a_batch_failed_by_an_item_is_written_item_by_item() {
        let w = Failing {
            fail: || StoreError::Invalid("one item's value".into()),
            alone: Default::default(),
        };
        let got: Vec<Option<u32>> = answers(&w).await.into_iter().map(|r| r.ok()).collect();
        assert_eq!(got, [Some(10), Some(20), Some(30)]);
        assert_eq!(w.alone.load(std::sync::atomic::Ordering::Relaxed), 3);
    }

    /// A batch that failed with an outage is not written again: every item gets the outage, as
    /// after a call of its own.
    #[tokio::test]
    async fn a_batch_failed_by_an_outage_answers_every_item_with_it() {
        let w = Failing {
            fail: || StoreError::Io {
                context: "test".into(),
                source: std::io::Error::other("down"),
            },
            alone: Default::default(),
        };
        let got = answers(&w).await;
        assert!(
            got.iter()
                .all(|r| r.as_ref().is_err_and(|e| e.is_unavailable())),
            "{got:?}"
        );
        assert_eq!(w.alone.load(std::sync::atomic::Ordering::Relaxed), 0);
    }
}
