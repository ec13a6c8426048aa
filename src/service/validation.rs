//! Config checking off the async runtime: parsing TOML, compiling selectors, regexes and XPath,
//! reading Web-Harvest XML and cron expressions is CPU work of up to seconds for a hostile
//! config, so it runs on tokio's blocking pool, a bounded number at a time.
//!
//! [`Validations::run`] waits for one of [`Validations`]'s permits (held until the work ends),
//! then runs the work with `spawn_blocking`. The runtime's own threads only wait, so `/healthz`,
//! reads and SSE stay responsive while configs are checked. A caller that finds every permit
//! taken for [`VALIDATION_QUEUE_WAIT`] gets [`HarvestError::Busy`] (503 with `Retry-After`)
//! instead of queueing without bound.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::HarvestError;

/// How long a check waits for a permit before the request is refused as busy.
pub const VALIDATION_QUEUE_WAIT: Duration = Duration::from_secs(15);

/// Most checks at once: the number of CPUs (at least 1, at most 16). Each check is one thread
/// of CPU work; more at once would only slow every one of them down.
pub fn default_concurrency() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 16)
}

/// The permits of this process's config checks.
#[derive(Debug, Clone)]
pub struct Validations {
    permits: Arc<Semaphore>,
    wait: Duration,
}

impl Validations {
    /// `concurrency` checks at once (at least 1); a caller waits at most `wait` for its turn.
    pub fn new(concurrency: usize, wait: Duration) -> Validations {
        Validations {
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            wait,
        }
    }

    /// Runs `work` on the blocking pool once a permit is free.
    pub async fn run<T, F>(&self, work: F) -> Result<T, HarvestError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let permit =
            match tokio::time::timeout(self.wait, self.permits.clone().acquire_owned()).await {
                Ok(Ok(p)) => p,
                // The semaphore is never closed; a closed one is as good as busy.
                Ok(Err(_)) | Err(_) => {
                    return Err(HarvestError::Busy(format!(
                        "every config check slot was taken for {} s; retry in a moment",
                        self.wait.as_secs()
                    )));
                }
            };
        tokio::task::spawn_blocking(move || {
            let out = work();
            drop(permit);
            out
        })
        .await
        .map_err(|e| {
            HarvestError::InvalidConfig(crate::job::ConfigRejected::new(format!(
                "checking the config stopped unexpectedly ({e}); please report this config"
            )))
        })
    }
}

impl Default for Validations {
    fn default() -> Self {
        Validations::new(default_concurrency(), VALIDATION_QUEUE_WAIT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_check_runs_off_the_runtime_thread() {
        let v = Validations::new(1, Duration::from_secs(1));
        let here = std::thread::current().id();
        let there = v.run(|| std::thread::current().id()).await.unwrap();
        assert_ne!(here, there, "the work ran on the runtime's thread");
    }

    #[tokio::test]
    async fn a_full_queue_answers_busy_after_the_wait() {
        let v = Validations::new(1, Duration::from_millis(50));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let first = {
            let v = v.clone();
            tokio::spawn(async move { v.run(move || rx.recv().is_ok()).await })
        };
        // Wait until the first check holds the only permit.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while v.permits.available_permits() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "first check never started"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let second = v.run(|| ()).await;
        assert!(
            matches!(second, Err(HarvestError::Busy(_))),
            "second check: {second:?}"
        );
        tx.send(()).unwrap();
        assert!(first.await.unwrap().unwrap());
        // The permit is back: a third check runs.
        v.run(|| ()).await.unwrap();
    }
}
