//! The integration tests: one binary, one module per component.

// Compiled before any backend instantiates it, so its checks would otherwise be dead code.
#[allow(dead_code, unused_macros, unused_imports)]
mod store_conformance;
mod store_postgres;
