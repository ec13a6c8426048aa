//! Config checking off the async runtime: parsing TOML, compiling selectors, regexes and XPath,
//! reading Web-Harvest XML and cron expressions is CPU work of up to seconds for a hostile
//! config, so it runs on tokio's blocking pool, a bounded number at a time.
//!
//! [`Validations::run`] waits for one of [`Validations`]'s permits (held until the work ends),
//! then runs the work with `spawn_blocking`. The runtime's own threads only wait, so `/healthz`,
//! reads and SSE stay responsive while configs are checked. A caller that finds every permit
//! taken for [`VALIDATION_QUEUE_WAIT`] gets [`HarvestError::Busy`] (503 with `Retry-After`)
//! instead of queueing without bound.
//!
//! A check is a pure function of the config and its params (a rule of [`Job::validate`]), so a
//! pass stays a pass: [`Passed`] remembers the fingerprints of a client's recent passes, and a
//! config the client submits again with the same params (an agent's or a schedule's runs, a
//! retried submission) skips its check and the hand-off to the blocking pool. A batch
//! ([`Harvest::submit_many`](super::Harvest::submit_many)) goes to the pool once, and there
//! checks each of its items that has no remembered pass, remembering the ones that pass.
//!
//! [`Job::validate`]: crate::job::Job::validate

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};
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

/// Most passes [`Passed`] remembers; the oldest is forgotten first. 4096 fingerprints take
/// ~260 KiB (a set and a queue of 16-byte entries, with their spare room).
pub const PASSES_REMEMBERED: usize = 4096;

/// Largest config (as JSON text, with its params) whose pass is remembered. Its fingerprint is
/// computed on the runtime's thread, so that a hit costs no hand-off: hashing stops after this
/// many bytes (serde_json may first scan one long string whole: a pass over a body the request
/// already parsed); a larger config is checked every time.
pub const PASS_MAX_BYTES: usize = 32 * 1024;

/// The fingerprints of the (client, config, params) triples whose check passed most recently.
///
/// A fingerprint is two SipHash-1-3 hashes of the client id, the config's JSON text and the
/// params, with keys chosen at random when the process starts. No client ever sees one, so
/// none can aim a config at another's fingerprint. Failures are not remembered: their message
/// is the answer, and they are the rare case.
#[derive(Debug)]
pub struct Passed {
    keys: [RandomState; 2],
    seen: Mutex<Remembered>,
}

#[derive(Debug, Default)]
struct Remembered {
    set: HashSet<u128>,
    /// `set` in the order it was filled, to forget the oldest.
    order: VecDeque<u128>,
}

/// Feeds JSON text to both hashers; refuses more than its budget.
struct Fingerprinter<H> {
    hashers: [H; 2],
    left: usize,
}

impl<H: Hasher> Fingerprinter<H> {
    fn feed(&mut self, bytes: &[u8]) -> bool {
        if bytes.len() > self.left {
            return false;
        }
        self.left -= bytes.len();
        for h in &mut self.hashers {
            h.write(bytes);
        }
        true
    }
}

impl<H: Hasher> std::io::Write for Fingerprinter<H> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.feed(buf) {
            Ok(buf.len())
        } else {
            Err(std::io::Error::other("the config is too large to remember"))
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Passed {
    /// Remembers nothing yet.
    pub fn new() -> Passed {
        Passed {
            keys: [RandomState::new(), RandomState::new()],
            seen: Mutex::new(Remembered::default()),
        }
    }

    /// The fingerprint of `client`'s `config` with `params`; `None` when they are larger than
    /// [`PASS_MAX_BYTES`] (never remembered).
    fn fingerprint(
        &self,
        client: &str,
        config: &serde_json::Value,
        params: &BTreeMap<String, String>,
    ) -> Option<u128> {
        let mut f = Fingerprinter {
            hashers: [self.keys[0].build_hasher(), self.keys[1].build_hasher()],
            left: PASS_MAX_BYTES,
        };
        if !f.feed(&(client.len() as u64).to_le_bytes()) || !f.feed(client.as_bytes()) {
            return None;
        }
        serde_json::to_writer(&mut f, config).ok()?;
        // 0xff never occurs in JSON text: the config's end is unambiguous. Each param is
        // length-prefixed.
        if !f.feed(&[0xff]) {
            return None;
        }
        for (k, v) in params {
            for part in [k, v] {
                if !f.feed(&(part.len() as u64).to_le_bytes()) || !f.feed(part.as_bytes()) {
                    return None;
                }
            }
        }
        let [a, b] = f.hashers;
        Some(u128::from(a.finish()) << 64 | u128::from(b.finish()))
    }

    /// Where `client`'s `config` with `params` stands: [`Recall::passed`] when its check passed
    /// recently (skip it), else the place to [`remember`](Passed::remember) a pass.
    pub fn recall(
        &self,
        client: &str,
        config: &serde_json::Value,
        params: &BTreeMap<String, String>,
    ) -> Recall {
        let fingerprint = self.fingerprint(client, config, params);
        Recall {
            passed: fingerprint.is_some_and(|f| self.contains(f)),
            fingerprint,
        }
    }

    /// Remembers that the check [`recall`](Passed::recall) led to passed (nothing for a config
    /// too large to remember).
    pub fn remember(&self, recall: Recall) {
        if let Some(f) = recall.fingerprint {
            self.insert(f);
        }
    }

    fn remembered(&self) -> std::sync::MutexGuard<'_, Remembered> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the check of `fingerprint` passed recently.
    fn contains(&self, fingerprint: u128) -> bool {
        self.remembered().set.contains(&fingerprint)
    }

    /// Remembers that the check of `fingerprint` passed (forgetting the oldest pass beyond
    /// [`PASSES_REMEMBERED`]).
    fn insert(&self, fingerprint: u128) {
        let mut r = self.remembered();
        if r.set.insert(fingerprint) {
            r.order.push_back(fingerprint);
            while r.order.len() > PASSES_REMEMBERED {
                if let Some(old) = r.order.pop_front() {
                    r.set.remove(&old);
                }
            }
        }
    }
}

/// A submission's place in [`Passed`] ([`Passed::recall`]).
#[derive(Debug, Clone, Copy)]
pub struct Recall {
    passed: bool,
    fingerprint: Option<u128>,
}

impl Recall {
    /// The same client's same config and params passed their check recently.
    pub fn passed(&self) -> bool {
        self.passed
    }
}

impl Default for Passed {
    fn default() -> Self {
        Passed::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_tell_configs_and_params_apart_and_refuse_large_ones() {
        let p = Passed::new();
        let none = BTreeMap::new();
        let one = BTreeMap::from([("a".to_string(), "b".to_string())]);
        let moved = BTreeMap::from([("ab".to_string(), String::new())]);
        let c = serde_json::json!({"name": "x"});
        let f = p.fingerprint("a", &c, &none).expect("small");
        assert_eq!(p.fingerprint("a", &c, &none), Some(f), "stable");
        assert_ne!(p.fingerprint("b", &c, &none), Some(f), "per client");
        assert_ne!(
            p.fingerprint("a", &serde_json::json!({"name": "y"}), &none),
            Some(f)
        );
        assert_ne!(p.fingerprint("a", &c, &one), Some(f));
        assert_ne!(
            p.fingerprint("a", &c, &one),
            p.fingerprint("a", &c, &moved),
            "params delimited"
        );
        assert_ne!(
            Passed::new().fingerprint("a", &c, &none),
            Some(f),
            "keyed per process"
        );
        let big = serde_json::json!({"name": "x".repeat(PASS_MAX_BYTES)});
        assert_eq!(p.fingerprint("a", &big, &none), None);
        let long = BTreeMap::from([("k".to_string(), "v".repeat(PASS_MAX_BYTES))]);
        assert_eq!(p.fingerprint("a", &c, &long), None);
    }

    #[test]
    fn the_oldest_pass_is_forgotten_first() {
        let p = Passed::new();
        for f in 0..PASSES_REMEMBERED as u128 {
            p.insert(f);
        }
        p.insert(0); // already there: stays the oldest
        assert!(p.contains(0));
        p.insert(PASSES_REMEMBERED as u128);
        assert!(!p.contains(0), "oldest forgotten");
        assert!(p.contains(1) && p.contains(PASSES_REMEMBERED as u128));
        assert_eq!(p.remembered().set.len(), PASSES_REMEMBERED);
    }

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
