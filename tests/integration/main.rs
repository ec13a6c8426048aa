//! The integration tests: one binary, one module per component.

mod api;
mod api_cli;
mod api_events;
mod api_load;
mod api_support;
mod api_tenants;
mod store_conformance;
mod store_sled;
