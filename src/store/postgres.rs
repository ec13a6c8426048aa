//! The PostgreSQL backend (placeholder until the PostgreSQL store lands).
