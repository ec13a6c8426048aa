//! The integration tests: one binary (it links once), one module per component.

mod api;
mod api_cli;
mod api_events;
mod api_load;
mod api_support;
mod api_tenants;
mod batch;
mod browser;
mod console;
mod crash;
mod disk_full;
mod engine;
mod engine_bench;
mod engine_config;
mod fuzz;
mod hostile;
mod layers;
mod lifecycle;
mod listeners;
mod messages;
mod metrics;
mod multiprocess;
mod netns;
mod outage;
mod prefetch;
mod proc;
mod regressions;
mod resume_crash;
mod run_resume;
mod seeds;
mod service;
// The generated test shop is the binary's (`harvest testsite`), not the library's: the suite
// compiles the same file.
mod sink;
#[path = "../../src/sitegen.rs"]
mod sitegen;
mod soak;
mod store_conformance;
mod store_postgres;
mod store_sled;
mod tenants_proc;
mod webharvest;
mod webharvest_api;
