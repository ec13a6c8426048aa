//! The integration tests: one binary, one module per component.

mod api;
mod api_support;
mod store_conformance;
mod store_sled;
mod api_events;
mod api_tenants;
mod api_load;
mod api_cli;
