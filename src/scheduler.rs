//! Maintenance of the store and cron agents.
//!
//! One task ticks every `sessions.maintenance_interval_secs`: reclaim expired leases, end
//! attempts far past their `max_duration` whose worker failed to, remove sessions whose timeout
//! has passed, keep the session gauges true, and keep the cron scheduler
//! (tokio-cron-scheduler) in step with the saved agents. Each job costs O(work due) per tick: the
//! store's lease-expiry and cleanup-deadline indexes hand over only what is due. [`run_once`]
//! takes its time from the service's clock, so tests drive it with a manual clock.
//!
//! A cron agent fires a run on its schedule, but skips a tick (logged and counted) while its
//! previous run is still PENDING or RUNNING, so runs never pile up.
//!
//! Several processes may share a store (PostgreSQL): only the elected leader
//! ([`Store::leader_acquire`], renewed every tick, term [`leader_ttl`]) runs the maintenance
//! jobs and the cron scheduler; the others only refresh their gauges. Leadership saves work, it
//! does not carry correctness: every maintenance write is a compare-and-set, and a cron run's
//! session id is derived from (client, agent, scheduled instant), so two processes that both
//! believe they lead (a stalled leader whose term ran out) still create one run per tick: the
//! second insert is refused as a duplicate.
//!
//! [`Store::leader_acquire`]: crate::store::Store::leader_acquire

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use tokio_cron_scheduler::{Job as CronJob, JobScheduler};

use tokio::sync::watch;

use crate::event::EventKind;
use crate::service::Harvest;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::session::{SessionId, Timestamp};
use crate::store::{LeaderAcquire, LeaseReclaim, SessionsExpire};

/// The leadership maintenance and cron run under.
pub const LEADER_NAME: &str = "maintenance";

/// How long a leader's term lasts without renewal: 5 ticks (at least 5 s), so one slow tick
/// does not lose it, and a dead leader is replaced within seconds.
pub fn leader_ttl(interval: Duration) -> Duration {
    (interval * 5).max(Duration::from_secs(5))
}

/// Most sessions one job handles per tick; the rest wait for the next tick.
const PER_TICK: usize = 1000;

/// The running maintenance task.
pub struct Maintenance {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Maintenance {
    /// Starts ticking.
    pub fn start(harvest: Harvest) -> Maintenance {
        let (stop, mut stop_rx) = watch::channel(false);
        let every = Duration::from_secs(harvest.config().sessions.maintenance_interval_secs.max(1));
        let task = tokio::spawn(async move {
            let owner = crate::worker::process_owner();
            let leading = Arc::new(AtomicBool::new(false));
            let mut cron = CronAgents::new(leading.clone()).await;
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop_rx.changed() => break,
                }
                let elected = harvest
                    .store()
                    .leader_acquire(LeaderAcquire {
                        name: LEADER_NAME.into(),
                        owner: owner.clone(),
                        ttl: leader_ttl(every),
                        now: harvest.clock().now(),
                    })
                    .await;
                let lead = match elected {
                    Ok(l) => l,
                    Err(e) => {
                        // Cannot tell: act as a follower; the term of a past election runs out.
                        tracing::warn!(error = %e, "leader election failed; not leading this tick");
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
                    match harvest.store().session_counts(harvest.clock().now()).await {
                        Ok(counts) => crate::metrics::set_counts(&counts),
                        Err(e) => tracing::debug!(error = %e, "session counts failed"),
                    }
                    continue;
                }
                // A pass runs in its own task: a bug that panics in one pass must not end
                // maintenance (reclaims, cleanup, cron) for every tenant for good.
                let pass = harvest.clone();
                match tokio::spawn(async move { run_once(&pass).await }).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "maintenance tick failed; retrying next tick")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "maintenance pass panicked; retrying next tick")
                    }
                }
                if let Some(c) = cron.as_mut() {
                    c.sync(&harvest).await;
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

/// One maintenance pass at the clock's current time. Public so tests can drive it with a manual
/// clock instead of waiting for ticks.
pub async fn run_once(harvest: &Harvest) -> Result<MaintenanceReport, crate::store::StoreError> {
    let store = harvest.store();
    let now = harvest.clock().now();
    let cfg = harvest.config();
    let reclaimed = store
        .leases_reclaim(LeaseReclaim {
            expired_before: now,
            limit: PER_TICK,
            backoff: Duration::from_millis(cfg.workers.retry_backoff_ms),
            cleanup_after: Duration::from_secs(cfg.sessions.default_timeout_secs),
            now,
        })
        .await?;
    crate::metrics::lease_reclaims(reclaimed.len() as u64);
    for r in &reclaimed {
        tracing::info!(session = %r.id, attempt = r.attempt, outcome = ?r.outcome, "lease expired; session reclaimed");
        if let Ok(Some(s)) = store.session_get(&r.id).await {
            let kind = EventKind::for_status(s.status);
            if s.status.is_terminal() {
                crate::metrics::session_finished(&s);
            }
            harvest.events().publish(kind, &s);
        }
    }
    let overdue = end_overdue(harvest, now).await?;
    let expired = store
        .sessions_expire(SessionsExpire {
            now,
            limit: PER_TICK,
        })
        .await?;
    for s in &expired {
        crate::metrics::session_cleaned();
        harvest.events().publish(EventKind::Removed, s);
    }
    crate::sink::cleanup_removed(harvest.sinks(), &expired).await;
    let counts = store.session_counts(now).await?;
    crate::metrics::set_counts(&counts);
    Ok(MaintenanceReport {
        reclaimed: reclaimed.len(),
        overdue,
        expired: expired.len(),
    })
}

/// How long past its `max_duration` an attempt may still run before maintenance ends it. The
/// worker stops it at `max_duration` and aborts it 10 s later; only an attempt whose worker is
/// alive (heartbeats) but cannot end it, e.g. a job blocking its thread, gets this far.
pub const MAX_DURATION_BACKSTOP: Duration = Duration::from_secs(60);

/// Ends RUNNING sessions past `max_duration + MAX_DURATION_BACKSTOP` as FAILED
/// (`max_duration_exceeded`), with the same compare-and-set a worker uses, so exactly one of the
/// worker and maintenance ends it. O(running sessions), at most [`PER_TICK`].
async fn end_overdue(
    harvest: &Harvest,
    now: crate::session::Timestamp,
) -> Result<usize, crate::store::StoreError> {
    let store = harvest.store();
    let page = store
        .session_list(crate::store::SessionList {
            status: Some(crate::session::SessionStatus::Running),
            limit: PER_TICK,
            ..Default::default()
        })
        .await?;
    let mut ended = 0;
    for s in page.sessions {
        let (Some(max), Some(start), Some(lease)) = (
            s.options.max_duration_secs,
            s.metrics.start_time,
            s.lease.as_ref(),
        ) else {
            continue;
        };
        let limit = Duration::from_secs(max.min(crate::service::MAX_DURATION_SECS));
        if start.add(limit.saturating_add(MAX_DURATION_BACKSTOP)) > now {
            continue;
        }
        let cleanup_after = s.cleanup_after(Duration::from_secs(
            harvest.config().sessions.default_timeout_secs,
        ));
        let applied = store
            .session_finish_if_running(crate::store::SessionFinish {
                attempt: crate::store::AttemptRef {
                    id: s.id.clone(),
                    attempt: s.attempt,
                    owner: lease.owner.clone(),
                },
                status: crate::session::SessionStatus::Failed,
                error: Some(crate::session::SessionError::new(
                    "max_duration_exceeded",
                    format!(
                        "the attempt ran longer than max_duration_secs = {max} and its worker did not stop it; ended by maintenance"
                    ),
                )),
                batch: crate::store::CheckpointBatch::default(),
                cleanup_at: now.add(cleanup_after),
                now,
            })
            .await?;
        if applied {
            ended += 1;
            tracing::warn!(session = %s.id, attempt = s.attempt, "attempt past max_duration ended by maintenance");
            if let Ok(Some(done)) = store.session_get(&s.id).await {
                crate::metrics::session_finished(&done);
                harvest.events().publish(EventKind::Failed, &done);
            }
        }
    }
    Ok(ended)
}

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

/// The cron scheduler and which agents it has, keyed by (client, name), with the schedule they
/// were registered with.
struct CronAgents {
    sched: JobScheduler,
    jobs: HashMap<(String, String), (String, uuid::Uuid)>,
    /// Whether this process leads; a job firing just after leadership was lost does nothing.
    leading: Arc<AtomicBool>,
}

impl CronAgents {
    async fn new(leading: Arc<AtomicBool>) -> Option<CronAgents> {
        let sched = match JobScheduler::new().await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cron scheduler could not start; scheduled agents will not run");
                return None;
            }
        };
        if let Err(e) = sched.start().await {
            tracing::error!(error = %e, "cron scheduler could not start; scheduled agents will not run");
            return None;
        }
        Some(CronAgents {
            sched,
            jobs: HashMap::new(),
            leading,
        })
    }

    /// Removes every job (this process no longer leads).
    async fn clear(&mut self) {
        for (_, (_, id)) in self.jobs.drain() {
            let _ = self.sched.remove(&id).await;
        }
    }

    /// Adds, replaces and removes cron jobs so they match the saved agents.
    async fn sync(&mut self, harvest: &Harvest) {
        let agents = match harvest.agent_list(None).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "listing agents for cron failed");
                return;
            }
        };
        let mut wanted = HashMap::new();
        for a in agents {
            if let Some(s) = a.schedule {
                wanted.insert((a.client_id, a.name), s);
            }
        }
        let stale: Vec<_> = self
            .jobs
            .iter()
            .filter(|(k, (sched, _))| wanted.get(*k) != Some(sched))
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            if let Some((_, id)) = self.jobs.remove(&k) {
                let _ = self.sched.remove(&id).await;
            }
        }
        for (key, schedule) in wanted {
            if self.jobs.contains_key(&key) {
                continue;
            }
            let h = harvest.clone();
            let (client, name) = key.clone();
            let leading = self.leading.clone();
            let expr = schedule.clone();
            let job = CronJob::new_async(schedule.as_str(), move |_, _| {
                let h = h.clone();
                let (client, name, expr) = (client.clone(), name.clone(), expr.clone());
                let leading = leading.load(Ordering::Acquire);
                Box::pin(async move {
                    if !leading {
                        return;
                    }
                    let Some(tick) = scheduled_tick(&expr, h.clock().now()) else {
                        tracing::warn!(agent = %name, schedule = %expr, "cron: cannot find the scheduled instant; skipping");
                        return;
                    };
                    fire_tick(&h, &client, &name, Some(tick)).await
                })
            });
            match job {
                Ok(job) => match self.sched.add(job).await {
                    Ok(id) => {
                        self.jobs.insert(key, (schedule, id));
                    }
                    Err(e) => tracing::warn!(agent = %key.1, error = %e, "cannot schedule agent"),
                },
                Err(e) => tracing::warn!(agent = %key.1, error = %e, "cannot schedule agent"),
            }
        }
    }

    async fn shutdown(mut self) {
        let _ = self.sched.shutdown().await;
    }
}

/// The scheduled instant a cron job firing at `now` belongs to: the latest instant of `expr` at
/// or before `now` (the scheduler fires at or shortly after it).
pub fn scheduled_tick(expr: &str, now: Timestamp) -> Option<Timestamp> {
    let cron = croner::Cron::from_str(expr).ok()?;
    let now = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(now.0)?;
    let tick = cron.find_previous_occurrence(&now, true).ok()?;
    Some(Timestamp(tick.timestamp_millis()))
}

/// Start of every cron run's session id; ids starting with `_` are reserved for harvest.
pub const CRON_ID_PREFIX: &str = "_cron.";

/// The session id of an agent's run for one cron tick: the same in every process, so a tick
/// creates at most one session. `_cron.<agent>.<tick secs>.<hash of client and agent>`, with the
/// agent name shortened to keep it within the 128 characters of an id.
pub fn cron_session_id(client_id: &str, name: &str, tick: Timestamp) -> Option<SessionId> {
    // FNV-1a: stable across builds and processes (std's hasher is not guaranteed to be).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in client_id.bytes().chain([0u8]).chain(name.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Ids starting with `_` are reserved: the API refuses them from clients, so no tenant can
    // take a tick's id before the tick fires.
    let suffix = format!(".{}.{h:016x}", tick.0.div_euclid(1000));
    let keep = 128usize.saturating_sub(suffix.len() + CRON_ID_PREFIX.len());
    let name: String = name.chars().take(keep).collect();
    SessionId::parse(&format!("{CRON_ID_PREFIX}{name}{suffix}")).ok()
}

/// One cron tick of an agent: a run, unless its previous run is still active.
pub async fn fire(harvest: &Harvest, client_id: &str, name: &str) {
    fire_tick(harvest, client_id, name, None).await
}

/// One cron tick of an agent at its scheduled instant `tick` (`None`: an id of its own). A tick
/// another process already fired is skipped.
pub async fn fire_tick(harvest: &Harvest, client_id: &str, name: &str, tick: Option<Timestamp>) {
    let agent = match harvest.agent_get(client_id, name).await {
        Ok(Some(a)) => a,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(agent = name, error = %e, "cron: cannot read agent");
            return;
        }
    };
    match harvest.agent_active_session(&agent).await {
        Ok(Some(active)) => {
            tracing::info!(agent = name, session = %active, "cron: previous run still active; skipping this tick");
            crate::metrics::agent_run_skipped();
            return;
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(agent = name, error = %e, "cron: cannot check the agent's runs");
            return;
        }
    }
    let run = crate::agent::AgentRun {
        session_id: tick.and_then(|t| cron_session_id(client_id, name, t)),
        ..Default::default()
    };
    match harvest.agent_run(client_id, name, run).await {
        Ok(h) => {
            crate::metrics::agent_run_fired();
            tracing::info!(agent = name, session = %h.id(), "cron: started a run");
        }
        Err(crate::service::HarvestError::Duplicate(id)) => {
            tracing::info!(agent = name, session = %id, "cron: this tick already ran (another process fired it)");
        }
        Err(e) => tracing::warn!(agent = name, error = %e, "cron: run refused"),
    }
}
