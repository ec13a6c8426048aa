//! The integration tests: one binary (it links once), one module per component.

mod engine;
mod engine_bench;
mod engine_config;
mod service;
mod store_conformance;
mod store_postgres;
mod store_sled;
