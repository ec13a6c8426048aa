//! `session_stats`: one pass over the sessions in scope (a client's through its `C` index,
//! everyone's through `S`), decoding each. sled keeps no per-client counts, so this reads every
//! session of the scope: it runs on the blocking pool, and the API caches its answer.

use super::keys::{id_after, lp_prefix};
use super::*;
use crate::store::{SessionStats, StatsQuery};

impl SledStore {
    pub(super) async fn stats(&self, q: StatsQuery) -> StoreResult<SessionStats> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || stats_sync(&db, &q))
            .await
            .map_err(|e| StoreError::Io {
                context: "counting sessions".into(),
                source: std::io::Error::other(e.to_string()),
            })?
    }
}

fn stats_sync(db: &sled::Db, q: &StatsQuery) -> StoreResult<SessionStats> {
    let mut out = SessionStats::empty();
    let mut add = |bytes: &[u8], what: &dyn Fn() -> String| -> StoreResult<()> {
        match codec::decode_session(what, bytes) {
            Ok(s) => {
                out.count(s.client.client_id(), s.status, 1);
                if let Some(end) = s.metrics.end_time {
                    out.finished(q.now, end, 1, s.records);
                }
            }
            // As in listings: one corrupt session does not hide the others.
            Err(e) => tracing::warn!(error = %e, "a session skipped in the counts"),
        }
        Ok(())
    };
    match &q.client_id {
        None => {
            for kv in db.scan_prefix([b'S']) {
                let (k, v) = kv.map_err(sled_err("counting sessions"))?;
                add(&v, &|| {
                    format!("sessions/{}", String::from_utf8_lossy(&k[1..]))
                })?;
            }
        }
        Some(client) => {
            let prefix = lp_prefix(b'C', client);
            for kv in db.scan_prefix(&prefix) {
                let (k, _) = kv.map_err(sled_err("counting a client's sessions"))?;
                let id = id_after(&k, prefix.len() + 8)?;
                if let Some(v) = db
                    .get(k_session(&id))
                    .map_err(sled_err("reading a session"))?
                {
                    add(&v, &|| key_name("sessions", &id))?;
                }
            }
        }
    }
    Ok(out)
}
