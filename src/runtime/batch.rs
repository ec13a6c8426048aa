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
use std::time::Duration;

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

/// How many batches are written at once, and when a second one goes beside the first.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Lanes {
    /// At most this many batches being written at once.
    pub(crate) max: usize,
    /// How long a batch waits for one being written to end before it goes beside it; zero: it
    /// goes at once. Waiting makes batches larger (the items that arrive meanwhile join the
    /// waiting one), which pays where each statement costs much (PostgreSQL), while the bound
    /// keeps a batch that stalls (on a row lock another process holds) from stalling every
    /// call behind it.
    pub(crate) overlap_after: Duration,
}

impl Lanes {
    /// Up to `max` batches at once, each going as soon as a lane is free.
    pub(crate) const fn at_once(max: usize) -> Lanes {
        Lanes {
            max,
            overlap_after: Duration::ZERO,
        }
    }
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// Starts the batching task: batches of at most `max` items, written by `write` in
    /// `lanes`.
    pub(crate) fn start<W, F>(
        max: usize,
        lanes: Lanes,
        write: W,
    ) -> (Batcher<T, R>, tokio::task::JoinHandle<()>)
    where
        W: Fn(Batch<T, R>) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let lanes = Lanes {
            max: lanes.max.max(1),
            ..lanes
        };
        let task = tokio::spawn(run(rx, max.max(1), lanes, write));
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
    lanes: Lanes,
    write: W,
) where
    T: Send + 'static,
    R: Send + 'static,
    W: Fn(Batch<T, R>) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(lanes.max));
    let mut writing = JoinSet::new();
    while let Some(first) = rx.recv().await {
        // Wait for a free slot first: items arriving meanwhile join this batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        while writing.try_join_next().is_some() {}
        if !lanes.overlap_after.is_zero() && !writing.is_empty() {
            // A batch is being written: give it `overlap_after` to end (cancel-safe: a write
            // that ends later is joined later).
            let _ = tokio::time::timeout(lanes.overlap_after, writing.join_next()).await;
        }
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
        let g = Gated::start(Lanes::at_once(1));
        let (first, rest) = g.one_held_then_four().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = g.gate.send(true);
        assert_eq!(first.await.ok().flatten(), Some(10));
        for (i, r) in (2..=5).zip(rest) {
            assert_eq!(r.await.ok().flatten(), Some(i * 10));
        }
        assert_eq!(g.sizes(), [1, 4]);
        drop(g.batcher);
        assert!(
            tokio::time::timeout(Duration::from_secs(5), g.task)
                .await
                .is_ok()
        );
    }

    /// A batcher whose writer records each batch's size and holds the batch holding item 1
    /// until `gate` opens; every other batch is answered at once.
    struct Gated {
        batcher: Batcher<u32, u32>,
        sizes: Arc<Mutex<Vec<usize>>>,
        gate: tokio::sync::watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Gated {
        fn start(lanes: Lanes) -> Gated {
            let sizes: Arc<Mutex<Vec<usize>>> = Arc::default();
            let (gate, gate_rx) = tokio::sync::watch::channel(false);
            let seen = sizes.clone();
            let (batcher, task) = Batcher::<u32, u32>::start(64, lanes, move |batch| {
                let seen = seen.clone();
                let mut gate = gate_rx.clone();
                async move {
                    if let Ok(mut s) = seen.lock() {
                        s.push(batch.len());
                    }
                    if batch.iter().any(|(item, _)| *item == 1) {
                        let _ = gate.wait_for(|open| *open).await;
                    }
                    for (item, answer) in batch {
                        let _ = answer.send(item * 10);
                    }
                }
            });
            Gated {
                batcher,
                sizes,
                gate,
                task,
            }
        }

        /// Two lanes, the second opening after `overlap_after`.
        fn two_lanes(overlap_after: Duration) -> Gated {
            Gated::start(Lanes {
                max: 2,
                overlap_after,
            })
        }

        fn sizes(&self) -> Vec<usize> {
            self.sizes.lock().map(|s| s.clone()).unwrap_or_default()
        }

        /// Sends item 1 (held), waits until its batch is being written, then sends 2 to 5;
        /// their answers.
        async fn one_held_then_four(
            &self,
        ) -> (
            tokio::task::JoinHandle<Option<u32>>,
            Vec<tokio::task::JoinHandle<Option<u32>>>,
        ) {
            let first = tokio::spawn({
                let b = self.batcher.clone();
                async move { b.call(1).await }
            });
            for _ in 0..200 {
                if self.sizes().len() == 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let rest = (2..=5)
                .map(|i| {
                    let b = self.batcher.clone();
                    tokio::spawn(async move { b.call(i).await })
                })
                .collect();
            (first, rest)
        }
    }

    /// With two lanes and an `overlap_after`, the next batch waits for the one being written
    /// (gathering what arrives meanwhile) rather than going beside it at once.
    #[tokio::test]
    async fn a_batch_waits_for_the_one_being_written_up_to_overlap_after() {
        let g = Gated::two_lanes(Duration::from_secs(30));
        let (first, rest) = g.one_held_then_four().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            g.sizes(),
            [1],
            "the second lane opened while the first batch was written, well before overlap_after"
        );
        let _ = g.gate.send(true);
        assert_eq!(first.await.ok().flatten(), Some(10));
        for (i, r) in (2..=5).zip(rest) {
            assert_eq!(r.await.ok().flatten(), Some(i * 10));
        }
        assert_eq!(g.sizes(), [1, 4]);
    }

    /// A batch that stalls longer than `overlap_after` (a finish blocked on a row lock) does
    /// not hold up the calls behind it: they go in the second lane and are answered while it
    /// still waits.
    #[tokio::test]
    async fn a_stalled_batch_lets_the_next_go_beside_it_after_overlap_after() {
        let g = Gated::two_lanes(Duration::from_millis(50));
        let (first, rest) = g.one_held_then_four().await;
        for (i, r) in (2..=5).zip(rest) {
            let got = tokio::time::timeout(Duration::from_secs(10), r).await;
            assert_eq!(got.ok().and_then(|r| r.ok()).flatten(), Some(i * 10));
        }
        assert!(!first.is_finished(), "the first batch is still held");
        assert_eq!(g.sizes(), [1, 4]);
        let _ = g.gate.send(true);
        assert_eq!(first.await.ok().flatten(), Some(10));
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
