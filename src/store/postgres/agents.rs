//! Agents (one row each, the value a versioned bincode `body`) and leaderships (a row per name
//! with its owner and expiry).

use super::rows::row_get;
use super::{PostgresStore, db_err};
use crate::store::{Agent, LeaderAcquire, StoreResult, codec};

impl PostgresStore {
    pub(super) async fn put_agent(&self, agent: Agent) -> StoreResult<()> {
        let body = codec::encode(&agent)?;
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO agents (client_id, name, body) VALUES ($1, $2, $3)
                 ON CONFLICT (client_id, name) DO UPDATE SET body = EXCLUDED.body",
                &[&agent.client_id, &agent.name, &body],
            )
            .await
            .map_err(db_err(&format!("saving agent {:?}", agent.name)))?;
        Ok(())
    }

    pub(super) async fn get_agent(
        &self,
        client_id: &str,
        name: &str,
    ) -> StoreResult<Option<Agent>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT body FROM agents WHERE client_id = $1 AND name = $2",
                &[&client_id, &name],
            )
            .await
            .map_err(db_err(&format!("reading agent {name:?}")))?;
        let key = || format!("agents/{client_id}/{name}");
        match row {
            None => Ok(None),
            Some(row) => {
                let body: Vec<u8> = row_get(&row, 0, &key())?;
                codec::decode(&key, &body).map(Some)
            }
        }
    }

    pub(super) async fn delete_agent(&self, client_id: &str, name: &str) -> StoreResult<bool> {
        let client = self.client().await?;
        let n = client
            .execute(
                "DELETE FROM agents WHERE client_id = $1 AND name = $2",
                &[&client_id, &name],
            )
            .await
            .map_err(db_err(&format!("deleting agent {name:?}")))?;
        Ok(n > 0)
    }

    pub(super) async fn list_agents(&self) -> StoreResult<Vec<Agent>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT client_id, name, body FROM agents ORDER BY client_id, name",
                &[],
            )
            .await
            .map_err(db_err("listing agents"))?;
        rows.iter()
            .map(|row| {
                let client_id: String = row_get(row, 0, "agents")?;
                let name: String = row_get(row, 1, "agents")?;
                let key = || format!("agents/{client_id}/{name}");
                let body: Vec<u8> = row_get(row, 2, &key())?;
                codec::decode(&key, &body)
            })
            .collect()
    }

    pub(super) async fn acquire_leader(&self, p: LeaderAcquire) -> StoreResult<bool> {
        // A row with an expiry rather than a session advisory lock: the lock would live on one
        // pooled connection, vanish silently when that connection drops, and follow the
        // server's clock; the row follows the injected `now`, so terms are testable, and a
        // holder learns it lost by a `false` at its next renewal.
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "INSERT INTO leaders (name, owner, expires_at) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE
                     SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at
                     WHERE leaders.owner = EXCLUDED.owner OR leaders.expires_at <= $4
                 RETURNING owner",
            )
            .await
            .map_err(db_err("preparing the leader election"))?;
        let expires = p.now.add(p.ttl).0;
        let row = client
            .query_opt(&stmt, &[&p.name, &p.owner, &expires, &p.now.0])
            .await
            .map_err(db_err("electing a leader"))?;
        Ok(row.is_some())
    }
}
