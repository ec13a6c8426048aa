//! The integration tests: one binary, one module per component.

mod store_conformance;
mod store_postgres;
mod store_sled;
