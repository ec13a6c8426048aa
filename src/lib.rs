//! harvest: a durable queue of web-scraping sessions.
//!
//! A client submits a scraper config (inline, or a saved agent) through [`Harvest`] or over HTTP;
//! the session is persisted, a worker claims it under a lease, runs the scrape, and commits the
//! extracted records together with the final status. See `DESIGN.md` for the contract.
//!
//! Components, one module each: [`session`] (the domain model), [`store`] (the durable driver
//! and its sled and PostgreSQL backends), [`job`] (the seam to the work a session does),
//! [`engine`] (the scraper), [`worker`] (claims and runs sessions), [`service`] (the library API,
//! [`Harvest`]), [`sink`] (export sinks), [`event`] (the event bus), [`config`] (config.toml).
#![deny(missing_docs)]

pub mod agent;
pub mod api;
pub mod bench;
pub mod cli;
pub mod clock;
pub mod config;
pub mod engine;
pub mod event;
pub mod job;
pub mod metrics;
pub mod scheduler;
pub mod service;
pub mod session;
pub mod sink;
pub mod sitegen;
pub mod store;
pub mod webharvest;
pub mod worker;

pub use service::{Harvest, SessionHandle, SubmitRequest};
pub use session::{
    ClientContext, Record, Session, SessionId, SessionMetrics, SessionOptions, SessionStatus,
    TokenUsage,
};
