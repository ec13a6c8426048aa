//! Agents (`N` lp(client) name) and leaderships. Leaderships are held in memory: sled allows
//! one process per data directory, so every contender is a task of this process.

use super::keys::{k_agent_def, show_key};
use super::{SledStore, sled_err};
use crate::store::{Agent, LeaderAcquire, StoreResult, codec};

impl SledStore {
    pub(super) async fn put_agent(&self, agent: Agent) -> StoreResult<()> {
        let ticket = {
            let _st = self.lock();
            self.db
                .insert(
                    k_agent_def(&agent.client_id, &agent.name),
                    codec::encode(&agent)?,
                )
                .map_err(sled_err("saving an agent"))?;
            self.durability.ticket()
        };
        self.durability.wait(ticket).await
    }

    pub(super) fn get_agent(&self, client_id: &str, name: &str) -> StoreResult<Option<Agent>> {
        let k = k_agent_def(client_id, name);
        match self.db.get(&k).map_err(sled_err("reading an agent"))? {
            Some(v) => Ok(Some(codec::decode(&|| show_key(&k), &v)?)),
            None => Ok(None),
        }
    }

    pub(super) async fn delete_agent(&self, client_id: &str, name: &str) -> StoreResult<bool> {
        let ticket = {
            let _st = self.lock();
            if self
                .db
                .remove(k_agent_def(client_id, name))
                .map_err(sled_err("deleting an agent"))?
                .is_none()
            {
                return Ok(false);
            }
            self.durability.ticket()
        };
        self.durability.wait(ticket).await?;
        Ok(true)
    }

    pub(super) fn list_agents(&self) -> StoreResult<Vec<Agent>> {
        let mut agents: Vec<Agent> = Vec::new();
        for kv in self.db.scan_prefix(b"N") {
            let (k, v) = kv.map_err(sled_err("listing agents"))?;
            match codec::decode(&|| show_key(&k), &v) {
                Ok(a) => agents.push(a),
                Err(e) => tracing::warn!(error = %e, "skipping an unreadable agent"),
            }
        }
        // Keys sort by client length first; the contract is by client then name.
        agents.sort_by(|a, b| (&a.client_id, &a.name).cmp(&(&b.client_id, &b.name)));
        Ok(agents)
    }

    pub(super) fn acquire_leader(&self, p: LeaderAcquire) -> StoreResult<bool> {
        let expires = p.now.add(p.ttl);
        // Plain data behind the lock; a panic elsewhere leaves it consistent.
        let mut leaders = self.leaders.lock().unwrap_or_else(|e| e.into_inner());
        let granted = match leaders.get(&p.name) {
            Some((owner, until)) => *owner == p.owner || *until <= p.now,
            None => true,
        };
        if granted {
            leaders.insert(p.name, (p.owner, expires));
        }
        Ok(granted)
    }
}
