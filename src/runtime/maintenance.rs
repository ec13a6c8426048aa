//! Maintenance of the store: reclaim expired leases, end attempts far past their
//! `max_duration` whose worker failed to, remove sessions whose timeout has passed, keep the
//! session gauges true, and keep the cron agents ([`super::cron`]) in step.
//!
//! One task ticks every `sessions.maintenance_interval_secs`. Each job costs O(work due) per
//! tick: the store's lease-expiry and cleanup-deadline indexes hand over only what is due, and
//! the overdue check walks the RUNNING sessions a bounded page per tick, continuing where the
//! last tick stopped. [`Maintainer::pass`] takes its time from the clock, so tests drive it with
//! a manual clock.
//!
//! Several processes may share a store (PostgreSQL): only the elected leader
//! ([`Store::leader_acquire`], renewed every tick, term [`leader_ttl`]) runs the maintenance
//! jobs and the cron scheduler; the others only refresh their gauges. Every process refreshes
//! its gauges at most 1% of the time ([`Maintainer::refresh_counts`]). Leadership saves work, it
//! does not carry correctness: every maintenance write is a compare-and-set.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::cron::{AgentRunner, CronAgents};
use super::effects::Effects;
use crate::clock::Clock;
use crate::session::{ErrorKind, SessionError, SessionStatus, Timestamp};
use crate::store::{
    AttemptRef, CheckpointBatch, LeaderAcquire, LeaseReclaim, SessionFinish, SessionList,
    SessionsExpire, Store, StoreError,
};

/// The leadership maintenance and cron run under.
pub const LEADER_NAME: &str = "maintenance";

/// How long a leader's term lasts without renewal: 5 ticks (at least 5 s), so one slow tick
/// does not lose it, and a dead leader is replaced within seconds.
pub fn leader_ttl(interval: Duration) -> Duration {
    (interval * 5).max(Duration::from_secs(5))
}

/// Most sessions one store call of a job handles; reclaims and cleanup go on for up to half a
/// tick ([`Maintainer::in_pages`]), overdue checks leave the rest to the next tick.
const PER_TICK: usize = 1000;

/// The gauges' refresh takes at most 1/`COUNTS_DUTY` of the time: the next one waits this many
/// times as long as the last took (with a 1 s tick: every tick up to 10 ms per refresh), but
/// never more than [`COUNTS_MAX_WAIT`].
const COUNTS_DUTY: u32 = 100;

/// The longest the gauges go without a refresh: one slow count (a cold cache, a wait for a
/// pooled connection) must not leave them stale for an hour.
const COUNTS_MAX_WAIT: Duration = Duration::from_secs(60);

/// When a job that may take at most 1/[`COUNTS_DUTY`] of the time may run next.
#[derive(Debug, Default)]
struct DutyCycle {
    next: Option<Instant>,
}

impl DutyCycle {
    /// Whether it may run at `now`.
    fn due(&self, now: Instant) -> bool {
        self.next.is_none_or(|next| now >= next)
    }

    /// A run that started at `started` took `took`.
    fn spent(&mut self, started: Instant, took: Duration) {
        self.next = Some(started + took.saturating_mul(COUNTS_DUTY).min(COUNTS_MAX_WAIT));
    }
}

/// How long past its `max_duration` an attempt may still run before maintenance ends it. The
/// worker stops it at `max_duration` and aborts it 10 s later; only an attempt whose worker is
/// alive (heartbeats) but cannot end it, e.g. a job blocking its thread, gets this far.
pub const MAX_DURATION_BACKSTOP: Duration = Duration::from_secs(60);

/// What one pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaintenanceReport {
    /// Sessions reclaimed.
    pub reclaimed: usize,
    /// RUNNING sessions ended FAILED for running far past their `max_duration`.
    pub overdue: usize,
    /// Sessions removed after their timeout.
    pub expired: usize,
}

/// What maintenance needs: the store, the clock, the effects of what it changes, and its
/// settings; not the whole service.
pub(crate) struct Maintainer {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub effects: Effects,
    /// Tick interval.
    pub interval: Duration,
    /// Delay before a reclaimed session may be claimed again.
    pub reclaim_backoff: Duration,
    /// How long a terminal session stays when it has no `session_timeout_secs` of its own.
    pub default_timeout: Duration,
    /// Fires cron agents' runs.
    pub agents: Arc<dyn AgentRunner>,
    /// How long recorded events are kept (stores that record events).
    pub event_retention: Duration,
    /// Where the overdue check goes on at the next tick (a RUNNING-list cursor).
    overdue_cursor: Mutex<Option<String>>,
    /// When the gauges are next refreshed ([`Maintainer::refresh_counts`]).
    counts_due: Mutex<DutyCycle>,
}

impl Maintainer {
    /// Maintenance with these parts.
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        effects: Effects,
        interval: Duration,
        reclaim_backoff: Duration,
        default_timeout: Duration,
        agents: Arc<dyn AgentRunner>,
    ) -> Maintainer {
        Maintainer {
            store,
            clock,
            effects,
            interval,
            reclaim_backoff,
            default_timeout,
            agents,
            event_retention: Duration::from_secs(3600),
            overdue_cursor: Mutex::new(None),
            counts_due: Mutex::new(DutyCycle::default()),
        }
    }

    /// sled is one process per data directory: every RUNNING session found at open belongs to
    /// a dead process, so it is taken back now rather than after its lease runs out. Shared
    /// backends leave this to lease expiry (another live process may hold the lease).
    pub async fn recover_at_open(&self) -> Result<(), StoreError> {
        if !self.store.exclusive() {
            return Ok(());
        }
        let now = self.clock.now();
        loop {
            let n = self
                .reclaim(
                    Timestamp(i64::MAX),
                    Duration::ZERO,
                    now,
                    "recovered a session left RUNNING by a previous process",
                )
                .await?;
            if n < PER_TICK {
                return Ok(());
            }
        }
    }

    /// Reclaims up to [`PER_TICK`] sessions whose lease expired before `expired_before`.
    async fn reclaim(
        &self,
        expired_before: Timestamp,
        backoff: Duration,
        now: Timestamp,
        why: &str,
    ) -> Result<usize, StoreError> {
        let reclaimed = self
            .store
            .leases_reclaim(LeaseReclaim {
                expired_before,
                limit: PER_TICK,
                backoff,
                cleanup_after: self.default_timeout,
                now,
            })
            .await?;
        let count = reclaimed.len();
        crate::metrics::lease_reclaims(count as u64);
        for r in reclaimed {
            tracing::info!(session = %r.id, attempt = r.attempt, outcome = ?r.outcome, "{why}");
            self.effects.transitioned(*r.session);
        }
        Ok(count)
    }

    /// One maintenance pass at the clock's current time, the gauges refreshed at its end.
    pub async fn pass(&self) -> Result<MaintenanceReport, StoreError> {
        let report = self.jobs().await?;
        self.refresh_counts(true).await?;
        Ok(report)
    }

    /// Refreshes the session gauges: always when `force`, otherwise only once the last refresh
    /// is [`COUNTS_DUTY`] times its own duration ago. On PostgreSQL the count reads every
    /// session (10 ms at 40k rows, growing with the table) and every process refreshes its own
    /// gauges; so a large table's gauges refresh less often, instead of each process spending
    /// a growing share of a core (and of the database's) on them every tick.
    pub async fn refresh_counts(&self, force: bool) -> Result<(), StoreError> {
        let started = Instant::now();
        if !force && !lock(&self.counts_due).due(started) {
            return Ok(());
        }
        let counts = self.store.session_counts(self.clock.now()).await?;
        crate::metrics::set_counts(&counts);
        lock(&self.counts_due).spent(started, started.elapsed());
        Ok(())
    }

    /// The jobs of one pass: reclaims, overdue attempts, cleanup.
    async fn jobs(&self) -> Result<MaintenanceReport, StoreError> {
        let now = self.clock.now();
        let reclaimed = self
            .in_pages(|| async move {
                self.reclaim(
                    now,
                    self.reclaim_backoff,
                    now,
                    "lease expired; session reclaimed",
                )
                .await
            })
            .await?;
        let overdue = self.end_overdue(now).await?;
        let expired = self.expire(now).await?;
        Ok(MaintenanceReport {
            reclaimed,
            overdue,
            expired,
        })
    }

    /// Calls `page` (a job handling up to [`PER_TICK`] sessions, returning how many it did)
    /// until a page comes back short or half a tick has gone by; the total. One page per tick
    /// capped cleanup at 1,000 sessions a second (with the default 1 s tick): a queue ending
    /// more than that never caught up (the soak's release build, 1.6-1.8k short sessions a
    /// second, ended with 40-50k expired sessions still stored), and the sessions of a dead
    /// worker with a full local buffer (`workers.prefetch` and more) waited one tick per
    /// thousand for their reclaim. The bound keeps a backlog from starving the tick's other
    /// jobs.
    async fn in_pages<F: Future<Output = Result<usize, StoreError>>>(
        &self,
        mut page: impl FnMut() -> F,
    ) -> Result<usize, StoreError> {
        let started = Instant::now();
        let mut total = 0;
        loop {
            let n = page().await?;
            total += n;
            if n < PER_TICK || started.elapsed() >= self.interval / 2 {
                return Ok(total);
            }
        }
    }

    /// Removes sessions past their timeout, [`PER_TICK`] at a time ([`Maintainer::in_pages`]).
    async fn expire(&self, now: Timestamp) -> Result<usize, StoreError> {
        self.in_pages(|| async move {
            let expired = self
                .store
                .sessions_expire(SessionsExpire {
                    now,
                    limit: PER_TICK,
                })
                .await?;
            self.effects.removed(&expired).await;
            Ok(expired.len())
        })
        .await
    }

    /// Ends RUNNING sessions past `max_duration + MAX_DURATION_BACKSTOP` as FAILED
    /// (`max_duration_exceeded`), with the same compare-and-set a worker uses, so exactly one of
    /// the worker and maintenance ends it. Looks at one page of [`PER_TICK`] RUNNING sessions
    /// per call and goes on from there at the next, so every RUNNING session is checked within
    /// (running / PER_TICK) ticks, however many there are.
    async fn end_overdue(&self, now: Timestamp) -> Result<usize, StoreError> {
        let cursor = lock(&self.overdue_cursor).clone();
        let page = self
            .store
            .session_list(SessionList {
                status: Some(SessionStatus::Running),
                limit: PER_TICK,
                cursor,
                ..Default::default()
            })
            .await?;
        *lock(&self.overdue_cursor) = page.next_cursor;
        let mut ended = 0;
        for s in page.sessions {
            let (Some(limit), Some(start), Some(lease)) = (
                s.options.max_duration(),
                s.metrics.start_time,
                s.lease.as_ref(),
            ) else {
                continue;
            };
            if start.add(limit.saturating_add(MAX_DURATION_BACKSTOP)) > now {
                continue;
            }
            let secs = limit.as_secs();
            let ended_now = self
                .store
                .session_finish_if_running(SessionFinish {
                    attempt: AttemptRef {
                        id: s.key(),
                        attempt: s.attempt,
                        owner: lease.owner.clone(),
                    },
                    status: SessionStatus::Failed,
                    error: Some(SessionError::new(
                        ErrorKind::MaxDurationExceeded,
                        format!(
                            "the attempt ran longer than max_duration_secs = {secs} and its worker did not stop it; ended by maintenance"
                        ),
                    )),
                    batch: CheckpointBatch::default(),
                    cleanup_after: self.default_timeout,
                    now,
                })
                .await?;
            if let Some(done) = ended_now {
                ended += 1;
                tracing::warn!(session = %s.id, attempt = s.attempt, "attempt past max_duration ended by maintenance");
                self.effects.transitioned(done);
            }
        }
        Ok(ended)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The running maintenance task.
pub(crate) struct Maintenance {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Maintenance {
    /// Starts ticking.
    pub fn start(m: Arc<Maintainer>) -> Maintenance {
        let (stop, mut stop_rx) = watch::channel(false);
        let every = m.interval.max(Duration::from_secs(1));
        let task = tokio::spawn(async move {
            let owner = super::worker::process_owner();
            let leading = Arc::new(AtomicBool::new(false));
            let mut cron =
                CronAgents::new(leading.clone(), m.agents.clone(), m.clock.clone()).await;
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop_rx.changed() => break,
                }
                let elected = m
                    .store
                    .leader_acquire(LeaderAcquire {
                        name: LEADER_NAME.into(),
                        owner: owner.clone(),
                        ttl: leader_ttl(every),
                        now: m.clock.now(),
                    })
                    .await;
                let lead = match elected {
                    Ok(l) => {
                        crate::store::outage::answered("leader election");
                        l
                    }
                    Err(e) => {
                        // Cannot tell: act as a follower; the term of a past election runs out.
                        if e.is_unavailable() {
                            crate::store::outage::unavailable("leader election", &e);
                        } else {
                            tracing::warn!(error = %e, "leader election failed; not leading this tick");
                        }
                        false
                    }
                };
                if lead != leading.swap(lead, Ordering::AcqRel) {
                    tracing::info!(owner = %owner, leader = lead, "maintenance leadership changed");
                }
                if !lead {
                    if let Some(c) = cron.as_mut() {
                        c.clear().await;
                    }
                    if let Err(e) = m.refresh_counts(false).await {
                        tracing::debug!(error = %e, "session counts failed");
                    }
                    continue;
                }
                // A pass runs in its own task: a bug that panics in one pass must not end
                // maintenance (reclaims, cleanup, cron) for every tenant for good.
                let pass = m.clone();
                let pass = tokio::spawn(async move {
                    let report = pass.jobs().await?;
                    pass.refresh_counts(false).await?;
                    Ok::<_, StoreError>(report)
                });
                match pass.await {
                    Ok(Ok(_)) => crate::store::outage::answered("maintenance"),
                    Ok(Err(e)) if e.is_unavailable() => {
                        crate::store::outage::unavailable("maintenance", &e)
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "maintenance tick failed; retrying next tick")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "maintenance pass panicked; retrying next tick")
                    }
                }
                if let Some(c) = cron.as_mut() {
                    c.sync(&*m.store).await;
                }
                match m.store.events_expire(m.event_retention).await {
                    Ok(n) => {
                        crate::store::outage::answered("removing old events");
                        if n > 0 {
                            tracing::debug!(events = n, "removed events past their retention");
                        }
                    }
                    Err(e) => crate::store::outage::unavailable("removing old events", &e),
                }
            }
            if let Some(c) = cron {
                c.shutdown().await;
            }
        });
        Maintenance { stop, task }
    }

    /// Stops after the tick in flight.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod duty_tests {
    use super::*;

    /// A 10 ms refresh waits 1 s for the next; a 250 ms one (a large table) waits 25 s; none
    /// waits more than a minute.
    #[test]
    fn a_slow_refresh_waits_in_proportion() {
        let t0 = Instant::now();
        let mut d = DutyCycle::default();
        assert!(d.due(t0), "the first runs at once");
        d.spent(t0, Duration::from_millis(10));
        assert!(!d.due(t0 + Duration::from_millis(999)));
        assert!(d.due(t0 + Duration::from_secs(1)));
        d.spent(t0, Duration::from_millis(250));
        assert!(!d.due(t0 + Duration::from_secs(24)));
        assert!(d.due(t0 + Duration::from_secs(25)));
        d.spent(t0, Duration::from_secs(29));
        assert!(!d.due(t0 + Duration::from_secs(59)));
        assert!(
            d.due(t0 + COUNTS_MAX_WAIT),
            "one very slow count waits a minute at most"
        );
        d.spent(t0, Duration::ZERO);
        assert!(d.due(t0), "a quick one does not hold the next back");
    }
}
