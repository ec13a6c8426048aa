//! Workers: claim sessions under leases and run each claimed attempt ([`super::attempt`]).
//!
//! One claimer task per process owns the claim loop. It never claims more sessions than it has
//! free slots (a [`Semaphore`] of `workers.concurrency` permits, each held by one attempt until
//! only its last write is left: [`Slot`]) plus `workers.prefetch`, and sleeps on
//! [`Store::pending_wait`] (a submission wakes it; a slow poll is only a safety net). Shutdown is
//! two-phase: stop claiming, let attempts finish for the grace period, then ask the rest to hand
//! their sessions back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use std::collections::VecDeque;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::attempt::Attempt;
use super::effects::Effects;
use super::finisher::{FINISHING_MAX, Finisher};
use crate::clock::Clock;
use crate::config::WorkersConfig;
use crate::job::{Job, StopReason, StopSignal};
use crate::session::{Session, SessionKey};
use crate::store::{
    AttemptRef, HeartbeatOutcome, SessionClaim, SessionHeartbeat, SessionRequeue, Store,
};

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
    /// Keyed by registration: each attempt's end removes its own entry in O(1) (a scan of every
    /// attempt in flight was 2% of a burn-down's CPU).
    signals: std::sync::Mutex<std::collections::HashMap<u64, (SessionKey, StopSignal)>>,
    next: AtomicU64,
    stopped: AtomicBool,
    /// Told when a cancel stopped a signal: the claimer ends the buffered sessions it names.
    cancelled: tokio::sync::Notify,
}

impl Running {
    /// Adds an attempt's signal until the returned guard drops (even if the attempt panics).
    pub fn register(self: &Arc<Self>, session: SessionKey, s: StopSignal) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.signals).insert(id, (session, s));
        Registered {
            running: self.clone(),
            id,
        }
    }

    fn stop_all(&self, reason: StopReason) {
        for (_, s) in lock(&self.signals).values() {
            s.stop(reason);
        }
    }

    /// Stops the attempts of one session (a client cancelled it); whether one runs here.
    fn stop_session(&self, id: &SessionKey, reason: StopReason) -> bool {
        let mut found = false;
        for (_, s) in lock(&self.signals).values().filter(|(sid, _)| sid == id) {
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
                        s.running.cancelled.notify_one();
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
        // Dropped after the lock is released.
        let _entry = lock(&self.running.signals).remove(&self.id);
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
    /// The batching task of finishes; ends after the claimer (which holds its handle).
    finishing: tokio::task::JoinHandle<()>,
    running: Arc<Running>,
}

impl WorkerPool {
    /// Starts the claimer; sessions run as they are claimed.
    pub fn start(settings: WorkerSettings) -> WorkerPool {
        let (stop_tx, stop_rx) = watch::channel(false);
        let running = settings.running.clone();
        let (finisher, finishing) = Finisher::start(settings.store.clone());
        let settings = Arc::new(settings);
        let relay = tokio::spawn(relay_cancels(settings.clone(), stop_rx.clone()));
        let claimer = tokio::spawn(claim_loop(settings, finisher, stop_rx));
        WorkerPool {
            stop_claiming: stop_tx,
            claimer,
            relay,
            finishing,
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
        let _ = self.finishing.await;
    }
}

/// A claimed session waiting for a slot (`workers.prefetch`): its lease is held and renewed
/// while it waits, a cancel reaches it through its registered stop signal, and shutdown hands
/// it back.
struct Buffered {
    session: Session,
    owner: String,
    stop: StopSignal,
    registered: Registered,
    /// When its lease was last taken or renewed.
    renewed: tokio::time::Instant,
}

/// An attempt's hold on the worker's capacity. While its job runs it holds a slot (one of
/// `workers.concurrency`). Once only its last write is left (the finish or the hand-back, which
/// waits for a durable commit), it trades the slot for one of [`FINISHING_MAX`] finishing
/// permits, so the next session starts without waiting for the disk or the database: measured
/// with `bench queue`, 64 slots each held through its flush capped the burn-down at 64
/// sessions per flush time. With no finishing permit free it keeps its slot, so attempts alive
/// stay bounded by `concurrency + FINISHING_MAX` (each finishing one still holds its last
/// checkpoint batch until it is written).
pub(crate) struct Slot {
    running: Option<OwnedSemaphorePermit>,
    finishing: Option<OwnedSemaphorePermit>,
    finishers: Arc<Semaphore>,
    /// More than the last write follows (a removal of exported records): keep the slot.
    pinned: bool,
}

impl Slot {
    /// A slot on `permit` (none: an attempt outside the slots).
    fn new(running: Option<OwnedSemaphorePermit>, finishers: Arc<Semaphore>) -> Slot {
        Slot {
            running,
            finishing: None,
            finishers,
            pinned: false,
        }
    }

    /// The attempt keeps its slot to its end, whatever it writes last.
    pub(crate) fn pin(&mut self) {
        self.pinned = true;
    }

    /// The job has ended; the attempt only writes its outcome from now on.
    pub(crate) fn job_done(&mut self) {
        if self.pinned || self.running.is_none() || self.finishing.is_some() {
            return;
        }
        if let Ok(p) = self.finishers.clone().try_acquire_owned() {
            self.finishing = Some(p);
            self.running = None;
        }
    }

    /// The attempt has ended.
    pub(crate) fn release(&mut self) {
        self.running = None;
        self.finishing = None;
    }
}

/// The claimer's state: free slots, the local buffer, the attempts running.
struct Claimer {
    s: Arc<WorkerSettings>,
    finisher: Finisher,
    slots: Arc<Semaphore>,
    /// Finishing permits ([`Slot`]).
    finishers: Arc<Semaphore>,
    buffer: VecDeque<Buffered>,
    tasks: JoinSet<()>,
    /// How often a buffered session's lease is renewed.
    renew_every: Duration,
}

impl Claimer {
    /// Starts buffered sessions on the free slots.
    fn start_buffered(&mut self) {
        while !self.buffer.is_empty() {
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                break;
            };
            self.start_next(permit);
        }
        while self.tasks.try_join_next().is_some() {}
    }

    /// Starts the first buffered session on `permit` (dropped when the buffer is empty).
    fn start_next(&mut self, permit: OwnedSemaphorePermit) {
        if let Some(b) = self.buffer.pop_front() {
            self.spawn(b, Some(permit));
        }
    }

    /// Runs `b`'s attempt, holding `permit` (a slot) until its last write ([`Slot`]).
    fn spawn(&mut self, b: Buffered, permit: Option<OwnedSemaphorePermit>) {
        // Every log line of the attempt, the engine's included, carries the session id.
        let span =
            tracing::info_span!("session", session = %b.session.id, attempt = b.session.attempt);
        let (s, finisher) = (self.s.clone(), self.finisher.clone());
        let slot = Slot::new(permit, self.finishers.clone());
        self.tasks.spawn(
            Attempt::run(s, finisher, b.session, b.owner, b.stop, b.registered, slot)
                .instrument(span),
        );
    }

    /// Ends the buffered sessions a client cancelled: each runs at once, outside the slots, as
    /// an attempt that finds its stop signal set and ends CANCELLED without running its job.
    fn end_cancelled(&mut self) {
        let (cancelled, kept): (VecDeque<Buffered>, VecDeque<Buffered>) =
            std::mem::take(&mut self.buffer)
                .into_iter()
                .partition(|b| b.stop.reason() == Some(StopReason::Cancelled));
        self.buffer = kept;
        for b in cancelled {
            self.spawn(b, None);
        }
    }

    /// When the next buffered lease is due for renewal.
    fn next_renewal(&self) -> tokio::time::Instant {
        self.buffer
            .iter()
            .map(|b| b.renewed + self.renew_every)
            .min()
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86_400))
    }

    /// Renews the leases of buffered sessions that are due; drops the ones no longer held
    /// (taken back, closed) and stops the ones a client cancelled (they end CANCELLED when they
    /// start).
    async fn renew_buffered(&mut self) {
        let now = tokio::time::Instant::now();
        let lease = self.s.workers.lease();
        let mut kept = VecDeque::with_capacity(self.buffer.len());
        while let Some(mut b) = self.buffer.pop_front() {
            if b.renewed + self.renew_every > now {
                kept.push_back(b);
                continue;
            }
            let hb = self
                .s
                .store
                .session_heartbeat_if_running(SessionHeartbeat {
                    attempt: AttemptRef {
                        id: b.session.key(),
                        attempt: b.session.attempt,
                        owner: b.owner.clone(),
                    },
                    lease,
                    now: self.s.clock.now(),
                })
                .await;
            if hb.is_ok() {
                crate::store::outage::answered("renewing a buffered lease");
            }
            match hb {
                Ok(HeartbeatOutcome::Renewed { cancel_requested }) => {
                    if cancel_requested {
                        // Missed the broadcast (another process's cancel, a lagging channel).
                        b.stop.stop(StopReason::Cancelled);
                        self.s.running.cancelled.notify_one();
                    }
                    b.renewed = now;
                    kept.push_back(b);
                }
                Ok(HeartbeatOutcome::Lost) => {
                    tracing::info!(session = %b.session.id, "a buffered session was taken back before it started; dropping it");
                }
                Err(e) => {
                    if e.is_unavailable() {
                        crate::store::outage::unavailable("renewing a buffered lease", &e);
                    } else {
                        tracing::warn!(session = %b.session.id, error = %e, "renewing a buffered lease failed; will retry");
                    }
                    // Tried again at the next renewal; the attempt's own heartbeats take over
                    // once it starts.
                    b.renewed = now;
                    kept.push_back(b);
                }
            }
        }
        self.buffer = kept;
    }

    /// Hands every buffered session back (PENDING at once, no attempt spent): shutdown.
    async fn hand_back_buffered(&mut self) {
        let n = self.buffer.len();
        for b in std::mem::take(&mut self.buffer) {
            let now = self.s.clock.now();
            let res = self
                .s
                .store
                .session_requeue_if_running(SessionRequeue {
                    attempt: AttemptRef {
                        id: b.session.key(),
                        attempt: b.session.attempt,
                        owner: b.owner.clone(),
                    },
                    spend_attempt: false,
                    run_at: now,
                    error: None,
                    cleanup_after: self.s.default_timeout,
                    now,
                })
                .await;
            match res {
                Ok(Some(after)) => self.s.effects.transitioned(after),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(session = %b.session.id, error = %e, "handing a buffered session back failed; it returns when its lease expires")
                }
            }
        }
        if n > 0 {
            tracing::info!(sessions = n, "handed the buffered sessions back");
        }
    }
}

async fn claim_loop(s: Arc<WorkerSettings>, finisher: Finisher, mut stop: watch::Receiver<bool>) {
    let process = process_owner();
    let mut claims = 0u64;
    let poll = Duration::from_millis(s.workers.poll_interval_ms.max(10));
    let prefetch = s.workers.prefetch;
    let mut c = Claimer {
        slots: Arc::new(Semaphore::new(s.workers.concurrency.max(1))),
        finishers: Arc::new(Semaphore::new(FINISHING_MAX)),
        buffer: VecDeque::new(),
        tasks: JoinSet::new(),
        renew_every: (s.workers.lease() / 3).max(Duration::from_millis(200)),
        finisher,
        s,
    };
    loop {
        if *stop.borrow() {
            break;
        }
        c.start_buffered();
        let free = c.slots.available_permits();
        // Room for as many as slots are free plus the buffer's room; claimed when a slot is
        // free or the buffer is down to half, so a busy buffer is refilled in batches.
        let room = (free + prefetch).saturating_sub(c.buffer.len());
        if room == 0 || (free == 0 && c.buffer.len() > prefetch / 2) {
            tokio::select! {
                p = c.slots.clone().acquire_owned() => match p {
                    Ok(p) => c.start_next(p),
                    Err(_) => break,
                },
                _ = tokio::time::sleep_until(c.next_renewal()) => c.renew_buffered().await,
                _ = c.s.running.cancelled.notified() => c.end_cancelled(),
                _ = stop.changed() => break,
            }
            continue;
        }
        let started = tokio::time::Instant::now();
        // A lease owner unique to this claim call, not just to the process: a session closed
        // while RUNNING and submitted again under the same id starts over at attempt 1, and
        // its old attempt (still running here until it notices) must not match the new
        // lease's (attempt, owner).
        claims += 1;
        let owner = format!("{process}/{claims}");
        let store = c.s.store.clone();
        let claim = store.session_claim(SessionClaim {
            owner: owner.clone(),
            limit: room,
            lease: c.s.workers.lease(),
            now: c.s.clock.now(),
        });
        tokio::pin!(claim);
        // Buffered sessions keep starting while the claim is in flight. A claim of hundreds
        // of sessions takes milliseconds (on PostgreSQL a statement over every row, its
        // trigger and a commit), and while the loop only awaited it every slot that freed
        // stayed empty until it returned: one claim at a time set the pace of the whole
        // pipeline, with a core idle.
        let claimed = loop {
            tokio::select! {
                claimed = &mut claim => break claimed,
                p = c.slots.clone().acquire_owned(), if !c.buffer.is_empty() => match p {
                    Ok(p) => c.start_next(p),
                    // The slots are never closed; were they, the claim still ends first.
                    Err(_) => break claim.await,
                },
            }
        };
        let claimed = match claimed {
            Ok(claimed) => {
                crate::store::outage::answered("claiming sessions");
                claimed
            }
            Err(e) => {
                if e.is_unavailable() {
                    crate::store::outage::unavailable("claiming sessions", &e);
                } else {
                    tracing::error!(error = %e, "claiming sessions failed; retrying");
                }
                tokio::select! {
                    _ = tokio::time::sleep(poll) => {}
                    _ = stop.changed() => break,
                }
                continue;
            }
        };
        if claimed.is_empty() {
            // Nothing due: sleep until a submission wakes us, or (with sessions buffered) a
            // slot frees or a buffered lease needs renewing.
            let waiting = !c.buffer.is_empty();
            tokio::select! {
                _ = c.s.store.pending_wait(poll) => {}
                p = c.slots.clone().acquire_owned(), if waiting => match p {
                    Ok(p) => c.start_next(p),
                    Err(_) => break,
                },
                _ = tokio::time::sleep_until(c.next_renewal()), if waiting => c.renew_buffered().await,
                _ = c.s.running.cancelled.notified(), if waiting => c.end_cancelled(),
                _ = stop.changed() => break,
            }
            // Reap finished attempts so the set does not grow.
            while c.tasks.try_join_next().is_some() {}
            continue;
        }
        crate::metrics::claim_latency(started.elapsed(), claimed.len());
        let renewed = tokio::time::Instant::now();
        for session in claimed {
            let stop = StopSignal::new();
            let registered = c.s.running.register(session.key(), stop.clone());
            c.buffer.push_back(Buffered {
                session,
                owner: owner.clone(),
                stop,
                registered,
                renewed,
            });
        }
    }
    // Stop claiming; hand back what never started, and wait for attempts in flight (shutdown
    // bounds this with its grace period).
    c.hand_back_buffered().await;
    while c.tasks.join_next().await.is_some() {}
}
