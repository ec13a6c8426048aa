//! The library API (placeholder).
/// Placeholder.
pub struct Harvest;
/// Placeholder.
pub struct SessionHandle;
/// Placeholder.
pub struct SubmitRequest;
