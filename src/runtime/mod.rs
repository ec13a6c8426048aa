//! The runtime: what runs sessions in a process. Workers claim sessions and run their attempts
//! ([`worker`], [`attempt`]), maintenance reclaims leases, ends overdue attempts and cleans up
//! ([`maintenance`]), cron fires scheduled agents ([`cron`]), and [`effects`] applies what
//! follows every transition (metrics, events, sink cleanup).
//!
//! It sits between the store and jobs below and the service above: it knows the store, the
//! job seam and the effects, never the service (cron fires agents through the
//! [`AgentRunner`] the service gives it). Only a few names are public: the maintenance report
//! and constants, and the cron id rules.

mod attempt;
pub(crate) mod batch;
mod cron;
mod effects;
pub mod events;
mod finisher;
mod maintenance;
mod worker;

pub use cron::{AgentRunner, CRON_ID_PREFIX, cron_session_id, scheduled_tick};
pub use effects::CommitObserver;
pub use maintenance::{LEADER_NAME, MAX_DURATION_BACKSTOP, MaintenanceReport, leader_ttl};

pub(crate) use effects::Effects;
pub(crate) use maintenance::{Maintainer, Maintenance};
pub(crate) use worker::{Running, WorkerPool, WorkerSettings};
