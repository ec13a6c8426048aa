//! The PostgreSQL backend (placeholder until it lands on branch `pg`).

use super::{StoreError, StoreResult};

/// Placeholder for the PostgreSQL store.
pub struct PostgresStore;

impl PostgresStore {
    /// Not yet implemented on this branch.
    pub async fn connect(_url: &str) -> StoreResult<std::sync::Arc<dyn super::Store>> {
        Err(StoreError::Backend(
            "the PostgreSQL store is not merged yet".into(),
        ))
    }
}
