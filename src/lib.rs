//! harvest: a durable queue of web-scraping sessions.
//!
//! A client submits a scraper config (inline, or a saved agent) through [`Harvest`] or over HTTP;
//! the session is persisted, a worker claims it under a lease, runs the scrape, and commits the
//! extracted records together with the final status. `docs/ARCHITECTURE.md` in the repository
//! describes the layers and a session's path through them.
//!
//! The modules form layers that only point down:
//! - domain: [`session`] (the model and its state machine), [`clock`], [`event`];
//! - [`store`]: the durable driver and its sled and PostgreSQL backends;
//! - [`job`]: the seam to the work a session does; [`engine`]: the scraper, and
//!   [`webharvest`]: Web-Harvest XML configs, two such jobs, told apart by [`kinds`];
//!   [`sink`]: export sinks; [`metrics`];
//! - [`runtime`]: workers, maintenance and cron (mostly internal);
//! - [`service`]: the library façade, [`Harvest`]; [`local`]: one run without a service;
//! - [`api`]: the HTTP API over the service. [`config`] is the service's own configuration.
#![deny(missing_docs)]

pub mod api;
pub mod clock;
pub mod config;
pub mod engine;
pub mod event;
pub mod job;
pub mod kinds;
pub mod local;
pub mod metrics;
pub mod runtime;
pub mod service;
pub mod session;
pub mod sink;
pub mod store;
pub mod webharvest;

// The README's Rust examples are compiled (and, unless marked no_run, run) as doc-tests, so
// they cannot rot unseen.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub use service::{AgentRun, AgentSpec, Harvest, HarvestError, SessionHandle, SubmitRequest};
pub use session::{
    ClientContext, Record, Session, SessionId, SessionKey, SessionMetrics, SessionOptions,
    SessionStatus, TokenUsage,
};
