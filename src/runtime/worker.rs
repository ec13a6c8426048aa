//! Workers: claim sessions under leases and run each claimed attempt ([`super::attempt`]).
//!
//! One claimer task per process owns the claim loop. It never claims more sessions than it has
//! free slots (a [`Semaphore`] of `workers.concurrency` permits, each held for the life of one
//! attempt), and sleeps on [`Store::pending_wait`] (a submission wakes it; a slow poll is only a
//! safety net). Shutdown is two-phase: stop claiming, let attempts finish for the grace period,
//! then ask the rest to hand their sessions back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::attempt::Attempt;
use super::effects::Effects;
use crate::clock::Clock;
use crate::config::WorkersConfig;
use crate::job::{Job, StopReason, StopSignal};
use crate::session::SessionKey;
use crate::store::{SessionClaim, Store};

/// What a worker pool needs.
pub(crate) struct WorkerSettings {
    /// Where sessions live.
    pub store: Arc<dyn Store>,
    /// What sessions run.
    pub job: Arc<dyn Job>,
    /// What follows each transition.
    pub effects: Effects,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// `[workers]`.
    pub workers: WorkersConfig,
    /// How long a terminal session stays when it has no `session_timeout_secs` of its own.
    pub default_timeout: Duration,
    /// Attempts in flight, so shutdown can stop them.
    pub running: Arc<Running>,
}

impl WorkerSettings {
    /// The delay before a failed session's next attempt: exponential in its failures, capped,
    /// with jitter.
    pub fn backoff(&self, failures: u32) -> Duration {
        let base = self.workers.retry_backoff_ms.max(1) as f64;
        let max = (self.workers.retry_backoff_max_secs.max(1) * 1000) as f64;
        let exp = base * 2f64.powi(failures.min(30) as i32);
        // Full jitter in [50%, 100%] keeps retries of many sessions from arriving together.
        let jitter = 0.5 + rand::random::<f64>() * 0.5;
        Duration::from_millis((exp.min(max) * jitter) as u64)
    }
}

/// The stop signals of the attempts in flight, by session.
#[derive(Default)]
pub(crate) struct Running {
    signals: std::sync::Mutex<Vec<(u64, SessionKey, StopSignal)>>,
    next: AtomicU64,
    stopped: AtomicBool,
}

impl Running {
    /// Adds an attempt's signal until the returned guard drops (even if the attempt panics).
    pub fn register(self: &Arc<Self>, session: SessionKey, s: StopSignal) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.signals).push((id, session, s));
        Registered {
            running: self.clone(),
            id,
        }
    }

    fn stop_all(&self, reason: StopReason) {
        for (_, _, s) in lock(&self.signals).iter() {
            s.stop(reason);
        }
    }

    /// Stops the attempts of one session (a client cancelled it); whether one runs here.
    fn stop_session(&self, id: &SessionKey, reason: StopReason) -> bool {
        let mut found = false;
        for (_, _, s) in lock(&self.signals).iter().filter(|(_, sid, _)| sid == id) {
            s.stop(reason);
            found = true;
        }
        found
    }
}

/// Relays cancels (from the store, this process's or another's) to the attempts running here,
/// until `stop` says shutdown began: a cancel stops its attempt at once, not at its next
/// heartbeat.
async fn relay_cancels(s: Arc<WorkerSettings>, mut stop: watch::Receiver<bool>) {
    let mut cancels = s.store.cancel_requests();
    loop {
        tokio::select! {
            got = cancels.recv() => match got {
                Ok(id) => {
                    if s.running.stop_session(&id, StopReason::Cancelled) {
                        tracing::info!(session = %id, "cancel requested; stopping the attempt after the requests in flight");
                    }
                }
                // Missed some: their attempts learn of them at their next heartbeat.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = stop.changed() => return,
        }
    }
}

/// An attempt's entry in [`Running`], removed when dropped.
pub(crate) struct Registered {
    running: Arc<Running>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.running.signals).retain(|(i, _, _)| *i != self.id);
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data behind the lock; a panic elsewhere leaves it consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A lease (and leadership) owner id unique to this process start: host, pid and a random
/// suffix.
pub(crate) fn process_owner() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into());
    let uuid = uuid::Uuid::now_v7().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &uuid[uuid.len() - 8..])
}

/// The running workers of this process.
pub(crate) struct WorkerPool {
    stop_claiming: watch::Sender<bool>,
    claimer: tokio::task::JoinHandle<()>,
    relay: tokio::task::JoinHandle<()>,
    running: Arc<Running>,
}

impl WorkerPool {
    /// Starts the claimer; sessions run as they are claimed.
    pub fn start(settings: WorkerSettings) -> WorkerPool {
        let (stop_tx, stop_rx) = watch::channel(false);
        let running = settings.running.clone();
        let settings = Arc::new(settings);
        let relay = tokio::spawn(relay_cancels(settings.clone(), stop_rx.clone()));
        let claimer = tokio::spawn(claim_loop(settings, stop_rx));
        WorkerPool {
            stop_claiming: stop_tx,
            claimer,
            relay,
            running,
        }
    }

    /// Whether shutdown has begun.
    pub fn is_stopped(&self) -> bool {
        self.running.stopped.load(Ordering::Acquire)
    }

    /// Stops claiming, waits up to `grace` for attempts to finish, then asks the rest to hand
    /// their sessions back (PENDING, no attempt spent) and waits for that.
    pub async fn shutdown(self, grace: Duration) {
        self.running.stopped.store(true, Ordering::Release);
        let _ = self.stop_claiming.send(true);
        let mut claimer = self.claimer;
        if tokio::time::timeout(grace, &mut claimer).await.is_err() {
            tracing::info!("shutdown grace period over; handing running sessions back");
            self.running.stop_all(StopReason::Shutdown);
            // A job that ignores its stop signal is aborted by its attempt's own watchdog, so
            // this wait is bounded.
            let _ = claimer.await;
        }
        // It holds the store: when shutdown returns, nothing of the pool does (a sled
        // directory is then free to reopen).
        let _ = self.relay.await;
    }
}

async fn claim_loop(s: Arc<WorkerSettings>, mut stop: watch::Receiver<bool>) {
    let process = process_owner();
    let mut claims = 0u64;
    let slots = Arc::new(Semaphore::new(s.workers.concurrency.max(1)));
    let mut tasks = JoinSet::new();
    let poll = Duration::from_millis(s.workers.poll_interval_ms.max(10));
    loop {
        if *stop.borrow() {
            break;
        }
        // Wait for at least one free slot, then claim as many as are free, never more.
        let first = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stop.changed() => break,
        };
        let free = 1 + slots.available_permits();
        let started = tokio::time::Instant::now();
        // A lease owner unique to this claim call, not just to the process: a session closed
        // while RUNNING and submitted again under the same id starts over at attempt 1, and
        // its old attempt (still running here until it notices) must not match the new
        // lease's (attempt, owner).
        claims += 1;
        let owner = format!("{process}/{claims}");
        let claimed = s
            .store
            .session_claim(SessionClaim {
                owner: owner.clone(),
                limit: free,
                lease: s.workers.lease(),
                now: s.clock.now(),
            })
            .await;
        let claimed = match claimed {
            Ok(c) => {
                crate::store::outage::answered("claiming sessions");
                c
            }
            Err(e) => {
                if e.is_unavailable() {
                    crate::store::outage::unavailable("claiming sessions", &e);
                } else {
                    tracing::error!(error = %e, "claiming sessions failed; retrying");
                }
                drop(first);
                tokio::select! {
                    _ = tokio::time::sleep(poll) => {}
                    _ = stop.changed() => break,
                }
                continue;
            }
        };
        if claimed.is_empty() {
            drop(first);
            tokio::select! {
                _ = s.store.pending_wait(poll) => {}
                _ = stop.changed() => break,
            }
            // Reap finished attempts so the set does not grow.
            while tasks.try_join_next().is_some() {}
            continue;
        }
        crate::metrics::claim_latency(started.elapsed(), claimed.len());
        let mut first = Some(first);
        for session in claimed {
            let permit = match first.take() {
                Some(p) => p,
                // `free` permits were available a moment ago and only this loop takes them.
                None => match slots.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => match slots.clone().acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                },
            };
            // Every log line of the attempt, the engine's included, carries the session id.
            let span =
                tracing::info_span!("session", session = %session.id, attempt = session.attempt);
            let (s, owner) = (s.clone(), owner.clone());
            tasks.spawn(
                async move {
                    Attempt::run(s, session, owner).await;
                    drop(permit);
                }
                .instrument(span),
            );
        }
        while tasks.try_join_next().is_some() {}
    }
    // Stop claiming; wait for attempts in flight (shutdown bounds this with its grace period).
    while tasks.join_next().await.is_some() {}
}
