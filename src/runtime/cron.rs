//! Cron agents: keeps a tokio-cron-scheduler in step with the saved agents' schedules and fires
//! their runs through an [`AgentRunner`] (the service, which knows how to submit).
//!
//! A run's session id is derived from (client, agent, scheduled instant), so two processes that
//! both believe they lead (a stalled leader whose term ran out) still create one run per tick:
//! the second insert is refused as a duplicate. A tick whose previous run is still active is
//! skipped by the runner, so runs never pile up.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use tokio_cron_scheduler::{Job as CronJob, JobScheduler};

use crate::clock::Clock;
use crate::session::{SessionId, Timestamp};
use crate::store::Store;

/// Starts an agent's run for one cron tick (implemented by the service).
#[async_trait]
pub trait AgentRunner: Send + Sync + 'static {
    /// One tick of `client`'s agent `name` at its scheduled instant `tick`.
    async fn fire(&self, client: &str, name: &str, tick: Timestamp);
}

/// The cron scheduler and which agents it has, keyed by (client, name), with the schedule they
/// were registered with.
pub(crate) struct CronAgents {
    sched: JobScheduler,
    jobs: HashMap<(String, String), (String, uuid::Uuid)>,
    /// Whether this process leads; a job firing just after leadership was lost does nothing.
    leading: Arc<AtomicBool>,
    runner: Arc<dyn AgentRunner>,
    clock: Arc<dyn Clock>,
}

impl CronAgents {
    pub async fn new(
        leading: Arc<AtomicBool>,
        runner: Arc<dyn AgentRunner>,
        clock: Arc<dyn Clock>,
    ) -> Option<CronAgents> {
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
            runner,
            clock,
        })
    }

    /// Removes every job (this process no longer leads).
    pub async fn clear(&mut self) {
        for (_, (_, id)) in self.jobs.drain() {
            let _ = self.sched.remove(&id).await;
        }
    }

    /// Adds, replaces and removes cron jobs so they match the saved agents.
    pub async fn sync(&mut self, store: &dyn Store) {
        let agents = match store.agent_list().await {
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
            let (runner, clock, leading) = (
                self.runner.clone(),
                self.clock.clone(),
                self.leading.clone(),
            );
            let (client, name) = key.clone();
            let expr = schedule.clone();
            let job = CronJob::new_async(schedule.as_str(), move |_, _| {
                let (runner, clock) = (runner.clone(), clock.clone());
                let (client, name, expr) = (client.clone(), name.clone(), expr.clone());
                let leading = leading.load(Ordering::Acquire);
                Box::pin(async move {
                    if !leading {
                        return;
                    }
                    let Some(tick) = scheduled_tick(&expr, clock.now()) else {
                        tracing::warn!(agent = %name, schedule = %expr, "cron: cannot find the scheduled instant; skipping");
                        return;
                    };
                    runner.fire(&client, &name, tick).await
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

    pub async fn shutdown(mut self) {
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
