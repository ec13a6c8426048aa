//! The embedded sled backend (placeholder until the sled store lands on branch `sled`).

use std::path::Path;

use super::{StoreError, StoreResult};

/// Placeholder for the sled store.
pub struct SledStore;

impl SledStore {
    /// Not yet implemented on this branch.
    pub fn open(_path: &Path) -> StoreResult<std::sync::Arc<dyn super::Store>> {
        Err(StoreError::Backend(
            "the sled store is not merged yet".into(),
        ))
    }
}
