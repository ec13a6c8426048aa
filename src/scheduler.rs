//! Maintenance of the store: reclaim expired leases, remove sessions whose timeout has passed,
//! and keep the session gauges true. One task, one tick every `sessions.maintenance_interval_secs`.
//!
//! Each job costs O(work due) per tick: the store's lease-expiry and cleanup-deadline indexes
//! hand over only what is due.

use std::time::Duration;

use tokio::sync::watch;

use crate::event::EventKind;
use crate::service::Harvest;
use crate::store::{LeaseReclaim, SessionsExpire};

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
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop_rx.changed() => return,
                }
                if let Err(e) = run_once(&harvest).await {
                    tracing::warn!(error = %e, "maintenance tick failed; retrying next tick");
                }
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
    let counts = store.session_counts(now).await?;
    crate::metrics::set_counts(&counts);
    Ok(MaintenanceReport {
        reclaimed: reclaimed.len(),
        expired: expired.len(),
    })
}

/// What one pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaintenanceReport {
    /// Sessions reclaimed.
    pub reclaimed: usize,
    /// Sessions removed after their timeout.
    pub expired: usize,
}
