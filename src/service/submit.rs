//! Submission: one session ([`Harvest::submit`]) or a batch in one durable step
//! ([`Harvest::submit_many`]), each validated off the runtime, given its defaults and its tenant,
//! and followed by its `created` effect.

use super::*;
use crate::runtime::batch::{BatchWrite, Batcher, Lanes, unanswered, write_batch};
use crate::store::StoreResult;

/// The checks of a submission that need neither its config nor the store: its options' bounds
/// and its agent's name.
fn check_request(req: &SubmitRequest) -> Result<(), HarvestError> {
    req.options.check().map_err(HarvestError::Invalid)?;
    if let Some(agent) = &req.agent {
        super::agents::validate_name(agent)?;
    }
    Ok(())
}

impl Harvest {
    /// Makes the PENDING session of a submission that [`check_request`] and
    /// [`Harvest::check_submitted`] accepted (not stored yet); with the agent name when it runs for
    /// a single-session agent.
    async fn new_session(
        &self,
        req: SubmitRequest,
    ) -> Result<(Session, Option<String>), HarvestError> {
        let mut options = req.options;
        options
            .max_attempts
            .get_or_insert(self.inner.config.sessions.max_attempts);
        options
            .session_timeout_secs
            .get_or_insert(self.inner.config.sessions.default_timeout_secs);
        let now = self.inner.clock.now();
        let chosen = req.session_id.is_some();
        let id = req.session_id.unwrap_or_else(SessionId::generate);
        let tenant = self.tenant_of(req.client.client_id());
        // The client's sessions stored before ids were scoped keep their ids taken (see
        // `resolve`), so that one id never names two of its sessions.
        if chosen
            && tenant.is_some()
            && self
                .get(SessionKey::single(id.clone()))
                .await?
                .is_some_and(|s| s.client.client_id() == req.client.client_id())
        {
            return Err(HarvestError::Duplicate(id));
        }
        let mut session = Session::pending(
            id.clone(),
            req.client,
            JobSpec {
                config: req.config.into(),
                params: req.params,
                agent: req.agent.clone(),
            },
            options,
            now,
        );
        session.tenant = tenant;
        let single_agent = if req.single_agent { req.agent } else { None };
        Ok((session, single_agent))
    }

    /// Validates and durably stores a new session; returns as soon as it is durable.
    pub async fn submit(&self, mut req: SubmitRequest) -> Result<SessionHandle, HarvestError> {
        // Before the config check, which may wait for a permit: a bad option is a 400 that says
        // what to fix, never a 503 "busy".
        check_request(&req)?;
        let (config, params) = self
            .check_submitted(
                req.client.client_id(),
                std::mem::take(&mut req.config),
                std::mem::take(&mut req.params),
            )
            .await?;
        req.config = config;
        req.params = params;
        let (session, single_agent) = self.new_session(req).await?;
        let key = session.key();
        let creating = self.events().creating(&key);
        // A client with a `max_pending` goes alone: its insert counts the client's PENDING
        // sessions under the client's lock, which a batch would hold for everyone in it.
        let limited = self
            .inner
            .config
            .clients
            .iter()
            .any(|c| c.max_pending.is_some() && c.id == session.client.client_id());
        let queued = match (&self.inner.inserts, &single_agent, limited) {
            (Some(inserts), None, false) => inserts.queue.clone().try_acquire_owned().ok(),
            _ => None,
        };
        let stored = match (&self.inner.inserts, queued) {
            (Some(inserts), Some(_queued)) => {
                inserts.batcher.call(session).await.unwrap_or_else(|| {
                    Err(unanswered(
                        "submissions",
                        "the submission was dropped before it was written",
                    ))
                })
            }
            _ => {
                self.inner
                    .store
                    .session_insert(SessionInsert {
                        session,
                        single_agent,
                    })
                    .await
            }
        };
        match stored {
            Ok(InsertOutcome::Inserted(session)) => {
                self.inner.effects.created(&session, creating);
                Ok(SessionHandle {
                    id: key,
                    harvest: self.clone(),
                })
            }
            other => Err(refused(other)),
        }
    }

    /// Validates and durably stores many sessions in one step (one flush on sled, one
    /// statement on PostgreSQL): for each request, in order, the stored session or its own
    /// error (an
    /// invalid config, a taken id, ...). At most [`MAX_BATCH`] requests; a single-session
    /// agent's run is refused (submit it alone). When the whole call fails (the store), none of
    /// them was acknowledged.
    pub async fn submit_many(
        &self,
        reqs: Vec<SubmitRequest>,
    ) -> Result<Vec<Result<Session, HarvestError>>, HarvestError> {
        if reqs.len() > MAX_BATCH {
            return Err(HarvestError::Invalid(format!(
                "a batch holds at most {MAX_BATCH} sessions, not {}; split it",
                reqs.len()
            )));
        }
        // Every config checked in one turn of the validation pool (see `check_config`),
        // fingerprinted there too (up to 32 KiB of JSON each: no work for the runtime's
        // threads). A client's config and params that passed recently, or earlier in this
        // batch, are not checked again ([`validation::Passed`], as for a single submission):
        // a batch of one config's runs costs one check, and primes the passes its single
        // submissions find.
        let h = self.clone();
        let checked: Vec<(SubmitRequest, Result<(), HarvestError>)> = self
            .off_runtime(move || {
                let (job, passed) = (&*h.inner.job, &h.inner.passed);
                reqs.into_iter()
                    .map(|req| {
                        let recall =
                            passed.recall(req.client.client_id(), &req.config, &req.params);
                        if recall.passed() {
                            return (req, Ok(()));
                        }
                        let verdict = super::check_one(job, &req.config, &req.params);
                        if verdict.is_ok() {
                            passed.remember(recall);
                        }
                        (req, verdict)
                    })
                    .collect()
            })
            .await?;
        let mut results: Vec<Option<Result<Session, HarvestError>>> =
            Vec::with_capacity(checked.len());
        let mut sessions = Vec::new();
        for (req, verdict) in checked {
            if let Err(e) = verdict {
                results.push(Some(Err(e)));
                continue;
            }
            if req.single_agent {
                results.push(Some(Err(HarvestError::Invalid(
                    "a single-session agent's run cannot be part of a batch; submit it alone"
                        .into(),
                ))));
                continue;
            }
            if let Err(e) = check_request(&req) {
                results.push(Some(Err(e)));
                continue;
            }
            match self.new_session(req).await {
                Ok((session, _)) => {
                    results.push(None);
                    sessions.push(session);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        let creating: Vec<_> = sessions
            .iter()
            .map(|s| self.events().creating(&s.key()))
            .collect();
        let stored = if sessions.is_empty() {
            Vec::new()
        } else {
            self.inner.store.session_insert_many(sessions).await?
        };
        let mut stored = stored.into_iter().zip(creating);
        let mut out = Vec::with_capacity(results.len());
        for r in results {
            out.push(match r {
                Some(r) => r,
                None => match stored.next() {
                    Some((Ok(InsertOutcome::Inserted(session)), creating)) => {
                        self.inner.effects.created(&session, creating);
                        Ok(*session)
                    }
                    Some((other, _)) => Err(refused(other)),
                    None => Err(HarvestError::Invalid("a batch item was lost".into())),
                },
            });
        }
        Ok(out)
    }
}

/// Most single submissions written as one batch ([`Store::combines_inserts`]).
const COMBINE_MAX: usize = 256;

/// Batches of single submissions being written at once: while they are, the next batch
/// gathers. Two rather than four: with 16 submitters four in flight made batches of 2-3
/// submissions, and each batch is an INSERT, its statement trigger and a commit. (`bench queue`
/// on PostgreSQL, 2 cores, alternating with four: 1.08-1.21× the single submissions per
/// second, p99 latency 28 ms instead of 32-34.) One in flight made batches of 8 instead of 5
/// (1048 -> 617 INSERTs per 5000 sessions end to end) but no faster in alternating runs
/// (x0.74-1.07), and left a batch that waits, or one rewritten item by item, alone in its lane.
/// Letting the second lane open only after 10 ms, as finishes do on PostgreSQL
/// ([`Lanes::overlap_after`]), alternating with it at once in 6 pairs: 0.98-1.09x the
/// submissions per second (median 1.06x) but 0.90-1.02x end to end (median 0.93x); not taken.
const COMBINE_IN_FLIGHT: usize = 2;

/// Most submissions waiting in or for the batches in flight. Beyond it a submission goes alone
/// (waiting for a pooled connection, and refused as unavailable when none comes in time), so an
/// overload is shed as it was before combining, not queued without bound.
const COMBINE_QUEUED: usize = COMBINE_MAX * 8;

/// Combines concurrent single submissions into [`Store::session_insert_many`] calls, for a
/// store that [`Store::combines_inserts`]. A single-session agent's run, a submission of a
/// client with a `max_pending`, and one beyond [`COMBINE_QUEUED`] go alone.
pub(super) struct Inserter {
    batcher: Batcher<Session, StoreResult<InsertOutcome>>,
    queue: Arc<tokio::sync::Semaphore>,
}

/// Starts the [`Inserter`] of `store`. It holds the store weakly, so that it does not keep a
/// dropped service's store open; its task ends with the service.
pub(super) fn inserter(store: &Arc<dyn Store>) -> Inserter {
    let store = Arc::downgrade(store);
    let lanes = Lanes::at_once(COMBINE_IN_FLIGHT);
    let (batcher, _task) = Batcher::start(COMBINE_MAX, lanes, move |mut batch| {
        let store = store.upgrade();
        // A submission whose caller is gone (a client that hung up) is not written: nobody
        // would learn of it, and its retry would get a new id.
        batch.retain(|(_, answer)| !answer.is_closed());
        async move {
            // Gone with its service: the callers see their answers dropped.
            if let Some(store) = store
                && !batch.is_empty()
            {
                write_batch(&Inserts(store), batch).await;
            }
        }
    });
    Inserter {
        batcher,
        queue: Arc::new(tokio::sync::Semaphore::new(COMBINE_QUEUED)),
    }
}

/// A batch of submissions ([`write_batch`]; a store that [`Store::combines_inserts`] stored
/// nothing of a failed batch, so an item written again cannot find itself taken).
struct Inserts(Arc<dyn Store>);

#[async_trait]
impl BatchWrite<Session, InsertOutcome> for Inserts {
    const WHAT: &'static str = "submissions";

    async fn one(&self, session: Session) -> StoreResult<InsertOutcome> {
        self.0
            .session_insert(SessionInsert {
                session,
                single_agent: None,
            })
            .await
    }

    async fn many(&self, sessions: &[Session]) -> StoreResult<Vec<StoreResult<InsertOutcome>>> {
        self.0.session_insert_many(sessions.to_vec()).await
    }
}

/// Why the store did not insert a session (any answer but `Inserted`).
fn refused(r: crate::store::StoreResult<InsertOutcome>) -> HarvestError {
    match r {
        Ok(InsertOutcome::AgentBusy(active)) => HarvestError::Conflict(format!(
            "agent allows a single session and session {active} is still active"
        )),
        Ok(InsertOutcome::PendingQuota { client, limit }) => {
            HarvestError::QuotaExceeded { client, limit }
        }
        Ok(InsertOutcome::Inserted(s)) => {
            HarvestError::Invalid(format!("session {} was inserted", s.id))
        }
        Err(StoreError::Duplicate(id)) => HarvestError::Duplicate(id),
        Err(e) => e.into(),
    }
}
