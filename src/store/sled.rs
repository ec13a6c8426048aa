//! The embedded sled backend (placeholder until the sled store lands).
