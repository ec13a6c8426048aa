//! The integration tests: one binary, one module per component.

mod engine;
mod engine_bench;
mod engine_config;
mod metrics;
mod store_conformance;
mod store_sled;
