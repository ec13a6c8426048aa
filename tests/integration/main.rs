//! The integration tests: one binary, one module per component.

mod store_conformance;
mod store_sled;
