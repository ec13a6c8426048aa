//! The `Store` conformance suite: every backend must pass every check here.
//!
//! Each check is a backend-agnostic `pub async fn name(store: Arc<dyn Store>)`. A backend
//! instantiates the whole suite with one macro call in its own test module:
//!
//! ```ignore
//! // A fixture owns the store and whatever keeps its data alive (a TempDir, a PostgreSQL
//! // schema that is dropped on Drop, ...).
//! async fn fixture() -> Option<crate::store_conformance::Fixture> {
//!     let dir = tempfile::TempDir::new().unwrap();
//!     let store = harvest::store::sled::SledStore::open(dir.path()).unwrap();
//!     Some(crate::store_conformance::Fixture { store: Arc::new(store), guard: Box::new(dir) })
//! }
//! crate::store_conformance::store_conformance!(fixture);
//! ```
//!
//! The factory is any path to an `async fn() -> Option<Fixture>` (`None`: the backend is not
//! available here, e.g. no database; the check says it was skipped); the macro expands to one
//! `#[tokio::test]` per check (multi-threaded runtime, 2 workers), each with a fresh fixture that
//! is dropped after the check (the store first, then the guard). Time is always passed in as
//! explicit [`Timestamp`]s; no check sleeps.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use harvest::session::{
    CancelDecision, ClientContext, FrontierEntry, JobSpec, LogLine, Session, SessionError,
    SessionId, SessionMetrics, SessionOptions, SessionStatus, Timestamp, TokenUsage, Transition,
};
use harvest::store::{
    Agent, AgentSessions, AttemptRef, CancelOutcome, CheckpointBatch, CheckpointCommit,
    FrontierPage, HeartbeatOutcome, InsertOutcome, LOG_LINES_MAX, LeaderAcquire, LeaseReclaim,
    RecordsPage, RequeueOutcome, SeenFilter, SessionCancel, SessionClaim, SessionFinish,
    SessionHeartbeat, SessionInsert, SessionList, SessionRequeue, SessionStats, SessionsExpire,
    StatsQuery, Store, StoreError,
};

/// What a backend's factory returns: the store under test and the guard that keeps its data
/// alive. Fields drop in declaration order: the store first, then the guard.
pub struct Fixture {
    /// The store under test.
    pub store: Arc<dyn Store>,
    /// Keeps the backing data alive (TempDir, database schema...) until the check ends.
    #[allow(dead_code)] // held only for its Drop
    pub guard: Box<dyn Any + Send>,
}

/// Expands to one `#[tokio::test]` per conformance check, each using a fresh fixture from
/// `$factory` (a path to an `async fn() -> Fixture`).
macro_rules! store_conformance {
    ($factory:path) => {
        $crate::store_conformance::store_conformance!(@each $factory;
            insert_get_duplicate,
            insert_many_per_item_results,
            same_id_in_two_tenants,
            quotas_limit_claims_and_inserts,
            claim_makes_running,
            claim_order_priority_run_at_seq_and_limit,
            claim_limit_zero_claims_nothing,
            transitions_refused_when_precondition_fails,
            finish_each_terminal_status,
            finish_with_non_terminal_status_is_invalid,
            finish_many_per_item_results,
            finish_many_applies_items_in_order,
            finish_many_across_intents,
            stale_worker_fenced_after_reclaim,
            heartbeat_renews_lease,
            list_newest_first_with_cursor_and_filters,
            list_limit_and_cursor_validation,
            cancel_pending_running_terminal,
            remove_leaves_no_data_and_spares_prefix_ids,
            requeue_with_and_without_spending_attempts,
            reclaim_with_and_without_progress,
            reclaim_and_cancel_keep_a_session_for_its_own_timeout,
            reclaim_respects_limit_and_expiry,
            reclaim_of_a_cancel_requested_session_ends_cancelled,
            requeue_of_a_cancel_requested_session_ends_cancelled,
            records_remove_if_terminal_keeps_the_session,
            checkpoint_numbering_across_attempts_and_resume,
            frontier_pages_in_insertion_order_after_removals,
            frontier_page_and_seen_filter_validation,
            records_page_validation,
            log_keeps_last_lines,
            sessions_expire_only_due,
            counts_by_status_and_queue_depth,
            stats_by_client_status_and_last_hour,
            agents_crud,
            single_agent_refuses_second_active_session,
            claims_racing_never_share_a_session,
            pending_wait_wakes_on_insert,
            pending_wait_times_out,
            leader_one_owner_until_expiry,
            leader_race_has_one_winner,
            transition_insert_equals_policy,
            transition_claim_and_heartbeat_equal_policy,
            transition_checkpoint_equals_policy,
            transition_finish_equals_policy,
            transition_requeue_equals_policy,
            transition_reclaim_equals_policy,
            transition_cancel_equals_policy,
            transition_removals_follow_policy,
            resume_of_a_removed_session_is_refused,
        );
    };
    (@each $factory:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let fixture: Option<$crate::store_conformance::Fixture> = $factory().await;
                let Some(fixture) = fixture else {
                    eprintln!("skipped: {}: the backend is not available", stringify!($name));
                    return;
                };
                $crate::store_conformance::$name(fixture.store.clone()).await;
                fixture.store.close().await.expect("close the store");
                drop(fixture);
            }
        )*
    };
}
pub(crate) use store_conformance;

// ---------------------------------------------------------------------------------------------
// Fixtures

/// The suite's epoch: every check's "now" is derived from it.
pub const T0: Timestamp = Timestamp(1_700_000_000_000);

/// Later than any lease in the suite (an SQL timestamp column cannot hold `i64::MAX` ms).
pub const FAR_FUTURE: Timestamp = Timestamp(T0.0 + 10_000_000_000);

/// `T0 + secs` seconds.
pub fn at(secs: i64) -> Timestamp {
    Timestamp(T0.0 + secs * 1000)
}

/// A PENDING session with defaults: client `c1`, no agent, priority 0, due at `T0`, created at
/// `T0`, max 3 attempts. Change fields on the result to state what a check is about.
pub fn session(id: &str) -> Session {
    Session {
        id: SessionId::parse(id).expect("test ids are valid"),
        tenant: None,
        seq: 0,
        client: ClientContext::of("c1"),
        status: SessionStatus::Pending,
        job: JobSpec {
            config: serde_json::json!({"name": "t", "start_urls": ["http://127.0.0.1:1/"]}).into(),
            params: BTreeMap::new(),
            agent: None,
        },
        options: SessionOptions {
            max_attempts: Some(3),
            ..SessionOptions::default()
        },
        attempt: 0,
        failures: 0,
        progress_this_attempt: false,
        lease: None,
        cancel_requested: false,
        run_at: T0,
        created_at: T0,
        updated_at: T0,
        cleanup_at: None,
        metrics: SessionMetrics::default(),
        usage: TokenUsage::default(),
        error: None,
        checkpoints: 0,
        records: 0,
        records_removed: 0,
        attempts: Vec::new(),
    }
}

fn sid(id: &str) -> SessionId {
    SessionId::parse(id).expect("test ids are valid")
}

/// Inserts `s` and returns the stored session (panics on anything but `Inserted`).
pub async fn insert(store: &Arc<dyn Store>, s: Session) -> Session {
    let id = s.id.clone();
    match store
        .session_insert(SessionInsert {
            session: s,
            single_agent: None,
        })
        .await
    {
        Ok(InsertOutcome::Inserted(s)) => *s,
        other => panic!("inserting {id}: expected Inserted, got {other:?}"),
    }
}

/// Removes every committed record of a terminal session (`records_remove` without a bound);
/// whether it applied.
async fn remove_all_records(store: &Arc<dyn Store>, id: &str) -> bool {
    store
        .records_remove(harvest::store::RecordsRemove {
            id: harvest::SessionKey::from(sid(id)),
            below: None,
        })
        .await
        .expect("records_remove")
        .is_some()
}

/// The numbers of the first 100 records of the single-namespace session `id`.
async fn record_seqs(store: &Arc<dyn Store>, id: &str) -> Vec<u64> {
    store
        .records_page(RecordsPage {
            id: harvest::SessionKey::from(sid(id)),
            offset: 0,
            limit: 100,
        })
        .await
        .expect("records")
        .iter()
        .map(|r| r.seq)
        .collect()
}

/// Claims up to `limit` sessions for `owner` at `now` with a 30 s lease.
pub async fn claim(
    store: &Arc<dyn Store>,
    owner: &str,
    limit: usize,
    now: Timestamp,
) -> Vec<Session> {
    store
        .session_claim(SessionClaim {
            owner: owner.into(),
            limit,
            lease: Duration::from_secs(30),
            now,
        })
        .await
        .expect("claim")
}

fn ids(sessions: &[Session]) -> Vec<String> {
    sessions.iter().map(|s| s.id.to_string()).collect()
}

fn aref(s: &Session) -> AttemptRef {
    let owner = s
        .lease
        .as_ref()
        .map(|l| l.owner.clone())
        .unwrap_or_default();
    AttemptRef {
        id: s.key(),
        attempt: s.attempt,
        owner,
    }
}

async fn get(store: &Arc<dyn Store>, id: &str) -> Session {
    store
        .session_get(&harvest::SessionKey::from(&sid(id)))
        .await
        .expect("get")
        .unwrap_or_else(|| panic!("{id} is missing"))
}

fn records(n: usize, from: usize) -> Vec<serde_json::Value> {
    (from..from + n)
        .map(|i| serde_json::json!({"i": i}))
        .collect()
}

fn entry(url: &str) -> FrontierEntry {
    FrontierEntry {
        url: url.into(),
        depth: 1,
        page: Some("product".into()),
    }
}

fn line(i: u64) -> LogLine {
    LogLine {
        at: Timestamp(T0.0 + i as i64),
        level: "info".into(),
        message: format!("line {i}"),
    }
}

async fn checkpoint(
    store: &Arc<dyn Store>,
    a: &AttemptRef,
    batch: CheckpointBatch,
    now: Timestamp,
) -> bool {
    store
        .checkpoint_commit_if_running(CheckpointCommit {
            attempt: a.clone(),
            batch,
            lease: Duration::from_secs(30),
            now,
        })
        .await
        .expect("checkpoint")
        .is_some()
}

async fn finish(
    store: &Arc<dyn Store>,
    a: &AttemptRef,
    status: SessionStatus,
    now: Timestamp,
) -> bool {
    store
        .session_finish_if_running(SessionFinish {
            attempt: a.clone(),
            status,
            error: None,
            batch: CheckpointBatch::default(),
            cleanup_after: Duration::from_secs(3600),
            now,
        })
        .await
        .expect("finish")
        .is_some()
}

async fn heartbeat(store: &Arc<dyn Store>, a: &AttemptRef, now: Timestamp) -> HeartbeatOutcome {
    store
        .session_heartbeat_if_running(SessionHeartbeat {
            attempt: a.clone(),
            lease: Duration::from_secs(30),
            now,
        })
        .await
        .expect("heartbeat")
}

async fn requeue(
    store: &Arc<dyn Store>,
    a: &AttemptRef,
    spend_attempt: bool,
    run_at: Timestamp,
    now: Timestamp,
) -> RequeueOutcome {
    store
        .session_requeue_if_running(SessionRequeue {
            attempt: a.clone(),
            spend_attempt,
            run_at,
            error: Some(SessionError::new("job_failed", "boom")),
            cleanup_after: Duration::from_secs(3600),
            now,
        })
        .await
        .expect("requeue")
        .map_or(RequeueOutcome::NotApplied, |s| RequeueOutcome::of(s.status))
}

async fn reclaim(
    store: &Arc<dyn Store>,
    expired_before: Timestamp,
    now: Timestamp,
) -> Vec<(String, u32, RequeueOutcome)> {
    let mut out: Vec<_> = store
        .leases_reclaim(LeaseReclaim {
            expired_before,
            limit: 1000,
            backoff: Duration::from_secs(10),
            cleanup_after: Duration::from_secs(3600),
            now,
        })
        .await
        .expect("reclaim")
        .into_iter()
        .map(|r| (r.id.to_string(), r.attempt, r.outcome))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

async fn list(store: &Arc<dyn Store>, p: SessionList) -> (Vec<String>, Option<String>) {
    let page = store.session_list(p).await.expect("list");
    (ids(&page.sessions), page.next_cursor)
}

/// Every page of a listing, following cursors (bounded).
async fn list_all(store: &Arc<dyn Store>, mut p: SessionList) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..1000 {
        let page = store.session_list(p.clone()).await.expect("list");
        assert!(page.sessions.len() <= p.limit, "page longer than the limit");
        out.extend(ids(&page.sessions));
        match page.next_cursor {
            Some(c) => p.cursor = Some(c),
            None => return out,
        }
    }
    panic!("listing did not end after 1000 pages");
}

// ---------------------------------------------------------------------------------------------
// Checks

/// Insert assigns increasing seqs and stores the session as given; a duplicate is refused.
pub async fn insert_get_duplicate(store: Arc<dyn Store>) {
    let a = insert(&store, session("a")).await;
    let b = insert(&store, session("b")).await;
    assert!(b.seq > a.seq, "seq must increase: {} then {}", a.seq, b.seq);
    assert_eq!(a.status, SessionStatus::Pending);
    let mut expected = session("a");
    expected.seq = a.seq;
    assert_eq!(
        a, expected,
        "insert must store the session as given, with its seq"
    );
    assert_eq!(
        store
            .session_get(&harvest::SessionKey::from(&sid("a")))
            .await
            .unwrap(),
        Some(a.clone())
    );
    assert_eq!(
        store
            .session_get(&harvest::SessionKey::from(&sid("nope")))
            .await
            .unwrap(),
        None
    );

    let mut dup = session("a");
    dup.client = ClientContext::of("someone-else");
    let err = store
        .session_insert(SessionInsert {
            session: dup,
            single_agent: None,
        })
        .await;
    assert!(
        matches!(err, Err(StoreError::Duplicate(ref id)) if id.as_str() == "a"),
        "{err:?}"
    );
    assert_eq!(
        get(&store, "a").await,
        a,
        "a duplicate insert must not overwrite"
    );
}

/// A batch insert stores each new session as given (with increasing seqs) and refuses, item by
/// item, a taken id and an id given twice in the batch, without refusing the others; the stored
/// sessions are claimable in order.
pub async fn insert_many_per_item_results(store: Arc<dyn Store>) {
    let taken = insert(&store, session("taken")).await;
    let mut high = session("b2");
    high.options.priority = 5;
    let batch = vec![
        session("b1"),
        session("taken"),
        high,
        session("b1"),
        session("b3"),
    ];
    let out = store
        .session_insert_many(batch.clone())
        .await
        .expect("batch insert");
    assert_eq!(out.len(), 5);
    let stored: Vec<Session> = [0, 2, 4]
        .iter()
        .map(|&i| match &out[i] {
            Ok(InsertOutcome::Inserted(s)) => (**s).clone(),
            other => panic!("item {i}: {other:?}"),
        })
        .collect();
    for (s, &i) in stored.iter().zip(&[0usize, 2, 4]) {
        let expected = Session {
            seq: s.seq,
            ..batch[i].clone()
        };
        assert_eq!(s, &expected, "item {i} stored as given");
        assert_eq!(get(&store, s.id.as_str()).await, *s, "item {i} reads back");
        assert!(s.seq > taken.seq, "seq after earlier inserts");
    }
    assert!(stored[0].seq < stored[1].seq && stored[1].seq < stored[2].seq);
    for i in [1, 3] {
        assert!(
            matches!(&out[i], Err(StoreError::Duplicate(_))),
            "item {i}: {:?}",
            out[i]
        );
    }
    assert_eq!(get(&store, "taken").await, taken, "not overwritten");
    let all = store.session_insert_many(Vec::new()).await.expect("empty");
    assert!(all.is_empty());
    let claimed = claim(&store, "w", 10, at(1)).await;
    assert_eq!(ids(&claimed), ["b2", "taken", "b1", "b3"]);

    // A client's max_pending counts the batch's own items: the third of three is over.
    let mut q = harvest::store::Quotas::default();
    q.max_pending.insert("q".into(), 2);
    store.quotas_set(q).expect("quotas");
    let of_q = |id: &str| {
        let mut s = session(id);
        s.client = ClientContext::of("q");
        s
    };
    let out = store
        .session_insert_many(vec![of_q("q1"), of_q("q2"), of_q("q3"), session("free")])
        .await
        .expect("batch insert");
    assert!(
        matches!(out[0], Ok(InsertOutcome::Inserted(_))),
        "{:?}",
        out[0]
    );
    assert!(
        matches!(out[1], Ok(InsertOutcome::Inserted(_))),
        "{:?}",
        out[1]
    );
    assert_eq!(
        out[2].as_ref().ok(),
        Some(&InsertOutcome::PendingQuota {
            client: "q".into(),
            limit: 2
        })
    );
    assert!(
        matches!(out[3], Ok(InsertOutcome::Inserted(_))),
        "{:?}",
        out[3]
    );
    // A taken id is that item's duplicate and uses up no room: with q1 and q2 PENDING and a
    // limit of 3, q4 still fits after a second q1.
    let mut q = harvest::store::Quotas::default();
    q.max_pending.insert("q".into(), 3);
    store.quotas_set(q).expect("quotas");
    let out = store
        .session_insert_many(vec![of_q("q1"), of_q("q4"), of_q("q5")])
        .await
        .expect("batch insert");
    assert!(
        matches!(&out[0], Err(StoreError::Duplicate(_))),
        "{:?}",
        out[0]
    );
    assert!(
        matches!(out[1], Ok(InsertOutcome::Inserted(_))),
        "a duplicate used up the room: {:?}",
        out[1]
    );
    assert_eq!(
        out[2].as_ref().ok(),
        Some(&InsertOutcome::PendingQuota {
            client: "q".into(),
            limit: 3
        })
    );
    store
        .quotas_set(harvest::store::Quotas::default())
        .expect("no quotas");
}

/// Ids are unique per tenant: the same id in two tenants (and in the single namespace) is three
/// sessions, each with its own records, log and removal; a duplicate only within a tenant.
pub async fn same_id_in_two_tenants(store: Arc<dyn Store>) {
    let key = |t: Option<&str>| harvest::SessionKey::new(t, sid("same"));
    for (t, n) in [(Some("t1"), 1u64), (Some("t2"), 2), (None, 3)] {
        let mut s = session("same");
        s.tenant = t.map(String::from);
        s.client = ClientContext::of(t.unwrap_or("c1"));
        s.options.priority = n as i32;
        let got = insert(&store, s).await;
        assert_eq!(got.key(), key(t));
    }
    let mut dup = session("same");
    dup.tenant = Some("t1".into());
    let err = store
        .session_insert(SessionInsert {
            session: dup,
            single_agent: None,
        })
        .await;
    assert!(matches!(err, Err(StoreError::Duplicate(_))), "{err:?}");
    // Claimed in priority order: None (3), t2 (2), t1 (1); each commits its own records.
    let claimed = claim(&store, "w", 3, at(1)).await;
    assert_eq!(claimed.len(), 3);
    for s in &claimed {
        let n = s.options.priority as usize;
        let batch = CheckpointBatch {
            records: (0..n).map(|i| serde_json::json!({ "i": i })).collect(),
            log: vec![LogLine {
                at: at(2),
                level: "info".into(),
                message: format!("tenant {:?}", s.tenant),
            }],
            ..Default::default()
        };
        let done = store
            .checkpoint_commit_if_running(CheckpointCommit {
                attempt: aref(s),
                batch,
                lease: Duration::from_secs(30),
                now: at(2),
            })
            .await
            .expect("checkpoint");
        assert!(done.is_some(), "checkpoint of {:?}", s.tenant);
    }
    for (t, n) in [(Some("t1"), 1usize), (Some("t2"), 2), (None, 3)] {
        let s = store.session_get(&key(t)).await.unwrap().expect("found");
        assert_eq!(s.tenant.as_deref(), t);
        assert_eq!(s.records, n as u64);
        let records = store
            .records_page(RecordsPage {
                id: key(t),
                offset: 0,
                limit: 10,
            })
            .await
            .unwrap();
        assert_eq!(records.len(), n, "{t:?}");
        let log = store.log_tail(&key(t), 10).await.unwrap();
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].message, format!("tenant {t:?}"));
    }
    assert!(
        store
            .session_remove(&key(Some("t1")))
            .await
            .unwrap()
            .is_some()
    );
    assert!(store.session_get(&key(Some("t1"))).await.unwrap().is_none());
    for t in [Some("t2"), None] {
        assert!(
            store.session_get(&key(t)).await.unwrap().is_some(),
            "{t:?} kept"
        );
        let left = store
            .records_page(RecordsPage {
                id: key(t),
                offset: 0,
                limit: 10,
            })
            .await
            .unwrap();
        assert!(!left.is_empty(), "{t:?} keeps its records");
    }
}

/// `max_running`: a claim skips a client at its limit and takes the next eligible session (of
/// another client) instead of stalling; `max_pending`: an insert beyond it is refused, and one
/// of a taken id is a duplicate all the same.
pub async fn quotas_limit_claims_and_inserts(store: Arc<dyn Store>) {
    let mut q = harvest::store::Quotas::default();
    q.max_running.insert("busy".into(), 2);
    q.max_pending.insert("busy".into(), 4);
    store.quotas_set(q).expect("quotas");
    let of = |id: &str, client: &str, prio: i32| {
        let mut s = session(id);
        s.client = ClientContext::of(client);
        s.options.priority = prio;
        s
    };
    // busy's sessions come first in claim order (higher priority).
    for i in 0..4 {
        insert(&store, of(&format!("b{i}"), "busy", 10)).await;
    }
    let over = store
        .session_insert(SessionInsert {
            session: of("b4", "busy", 10),
            single_agent: None,
        })
        .await
        .expect("insert");
    assert_eq!(
        over,
        InsertOutcome::PendingQuota {
            client: "busy".into(),
            limit: 4
        }
    );
    // A taken id is a duplicate even at the limit (a client's retry of a stored submission).
    let again = store
        .session_insert(SessionInsert {
            session: of("b0", "busy", 10),
            single_agent: None,
        })
        .await;
    assert!(matches!(again, Err(StoreError::Duplicate(_))), "{again:?}");
    for i in 0..2 {
        insert(&store, of(&format!("o{i}"), "other", 0)).await;
    }
    let first = claim(&store, "w1", 3, at(1)).await;
    assert_eq!(ids(&first), vec!["b0", "b1", "o0"], "busy's third waits");
    // busy has two RUNNING: a later claim passes its sessions over.
    let second = claim(&store, "w2", 3, at(1)).await;
    assert_eq!(ids(&second), vec!["o1"]);
    assert!(claim(&store, "w3", 3, at(1)).await.is_empty());
    // Two of busy's left PENDING, so two more may be submitted.
    insert(&store, of("b4", "busy", 10)).await;
    // One of busy's ends: one slot frees up.
    assert!(finish(&store, &aref(&first[0]), SessionStatus::Completed, at(2)).await);
    let third = claim(&store, "w4", 3, at(3)).await;
    assert_eq!(ids(&third), vec!["b2"]);
    store
        .quotas_set(harvest::store::Quotas::default())
        .expect("no quotas");
    let rest = claim(&store, "w5", 5, at(3)).await;
    assert_eq!(
        ids(&rest),
        vec!["b3", "b4"],
        "without limits, everything due"
    );
}

/// A claim makes the session RUNNING under a lease with attempt + 1.
pub async fn claim_makes_running(store: Arc<dyn Store>) {
    insert(&store, session("a")).await;
    let now = at(5);
    let got = claim(&store, "w1", 10, now).await;
    assert_eq!(ids(&got), ["a"]);
    let s = &got[0];
    assert_eq!(s.status, SessionStatus::Running);
    assert_eq!(s.attempt, 1);
    assert!(!s.progress_this_attempt);
    let lease = s.lease.as_ref().expect("a claimed session has a lease");
    assert_eq!(lease.owner, "w1");
    assert_eq!(lease.expires_at, now.add(Duration::from_secs(30)));
    assert_eq!(s.metrics.start_time, Some(now));
    assert_eq!(
        &get(&store, "a").await,
        s,
        "the claim result is what is stored"
    );
    assert!(
        claim(&store, "w2", 10, now).await.is_empty(),
        "a RUNNING session is claimed once"
    );
}

/// Claims go by priority (desc), then run_at, then seq; never before run_at; at most `limit`.
pub async fn claim_order_priority_run_at_seq_and_limit(store: Arc<dyn Store>) {
    let mk = |id: &str, priority: i32, run_at: Timestamp| {
        let mut s = session(id);
        s.options.priority = priority;
        s.run_at = run_at;
        s
    };
    insert(&store, mk("low1", 0, at(0))).await;
    insert(&store, mk("high-late", 5, at(2))).await;
    insert(&store, mk("high-early", 5, at(1))).await;
    insert(&store, mk("future-top", 10, at(100))).await;
    insert(&store, mk("low2", 0, at(0))).await;
    insert(&store, mk("negative", -3, at(0))).await;

    assert_eq!(
        ids(&claim(&store, "w", 2, at(10)).await),
        ["high-early", "high-late"]
    );
    assert_eq!(
        ids(&claim(&store, "w", 10, at(10)).await),
        ["low1", "low2", "negative"]
    );
    assert!(
        claim(&store, "w", 10, at(99)).await.is_empty(),
        "future-top is not due before 100"
    );
    assert_eq!(ids(&claim(&store, "w", 10, at(100)).await), ["future-top"]);
}

/// A claim with limit 0 claims nothing.
pub async fn claim_limit_zero_claims_nothing(store: Arc<dyn Store>) {
    insert(&store, session("a")).await;
    assert!(claim(&store, "w", 0, at(1)).await.is_empty());
    assert_eq!(get(&store, "a").await.status, SessionStatus::Pending);
}

/// Every CAS is refused when the session is not RUNNING with that attempt and owner.
pub async fn transitions_refused_when_precondition_fails(store: Arc<dyn Store>) {
    insert(&store, session("a")).await;
    let pending_ref = AttemptRef {
        id: harvest::SessionKey::from(sid("a")),
        attempt: 0,
        owner: "w".into(),
    };
    assert_eq!(
        heartbeat(&store, &pending_ref, at(1)).await,
        HeartbeatOutcome::Lost
    );
    assert!(!checkpoint(&store, &pending_ref, CheckpointBatch::default(), at(1)).await);
    assert!(!finish(&store, &pending_ref, SessionStatus::Completed, at(1)).await);
    assert_eq!(
        requeue(&store, &pending_ref, true, at(1), at(1)).await,
        RequeueOutcome::NotApplied
    );
    assert_eq!(
        get(&store, "a").await.status,
        SessionStatus::Pending,
        "refused CAS changed nothing"
    );

    let s = claim(&store, "w", 1, at(1)).await.remove(0);
    let good = aref(&s);
    let wrong_owner = AttemptRef {
        owner: "other".into(),
        ..good.clone()
    };
    let wrong_attempt = AttemptRef {
        attempt: good.attempt + 1,
        ..good.clone()
    };
    let missing = AttemptRef {
        id: harvest::SessionKey::from(sid("missing")),
        ..good.clone()
    };
    for bad in [&wrong_owner, &wrong_attempt, &missing] {
        assert_eq!(
            heartbeat(&store, bad, at(2)).await,
            HeartbeatOutcome::Lost,
            "{bad:?}"
        );
        let batch = CheckpointBatch {
            records: records(1, 0),
            ..Default::default()
        };
        assert!(!checkpoint(&store, bad, batch, at(2)).await, "{bad:?}");
        assert!(
            !finish(&store, bad, SessionStatus::Completed, at(2)).await,
            "{bad:?}"
        );
        assert_eq!(
            requeue(&store, bad, true, at(2), at(2)).await,
            RequeueOutcome::NotApplied
        );
    }
    let unchanged = get(&store, "a").await;
    assert_eq!(
        unchanged, s,
        "refused CAS must not change the running session"
    );

    assert!(finish(&store, &good, SessionStatus::Completed, at(3)).await);
    let done = get(&store, "a").await;
    assert_eq!(
        heartbeat(&store, &good, at(4)).await,
        HeartbeatOutcome::Lost
    );
    assert!(!checkpoint(&store, &good, CheckpointBatch::default(), at(4)).await);
    assert!(!finish(&store, &good, SessionStatus::Failed, at(4)).await);
    assert_eq!(
        requeue(&store, &good, false, at(4), at(4)).await,
        RequeueOutcome::NotApplied
    );
    assert!(reclaim(&store, FAR_FUTURE, at(4)).await.is_empty());
    assert!(
        claim(&store, "w", 10, at(4)).await.is_empty(),
        "a terminal session is never claimed"
    );
    assert_eq!(get(&store, "a").await, done, "terminal states never change");
}

/// Finish ends a session in each terminal status with end_time, cleanup_at, error, no lease.
pub async fn finish_each_terminal_status(store: Arc<dyn Store>) {
    for (id, status) in [
        ("done", SessionStatus::Completed),
        ("failed", SessionStatus::Failed),
        ("cancelled", SessionStatus::Cancelled),
    ] {
        insert(&store, session(id)).await;
        let s = claim(&store, "w", 1, at(1)).await.remove(0);
        assert_eq!(s.id.as_str(), id);
        let error = (status == SessionStatus::Failed).then(|| SessionError::new("job_failed", "x"));
        let ok = store
            .session_finish_if_running(SessionFinish {
                attempt: aref(&s),
                status,
                error: error.clone(),
                batch: CheckpointBatch {
                    records: records(2, 0),
                    pages: 1,
                    ..Default::default()
                },
                cleanup_after: Duration::from_secs(493),
                now: at(7),
            })
            .await
            .expect("finish")
            .is_some();
        assert!(ok);
        let f = get(&store, id).await;
        assert_eq!(f.status, status);
        assert_eq!(f.error, error);
        assert_eq!(f.lease, None);
        assert_eq!(f.cleanup_at, Some(at(500)));
        assert_eq!(f.metrics.end_time, Some(at(7)));
        assert_eq!(
            f.metrics.processed_elements, 2,
            "the final batch commits with the status"
        );
        assert_eq!(f.metrics.pages_processed, 1);
        assert_eq!(record_seqs(&store, id).await, [0, 1]);
    }
}

fn finish_of(s: &Session, status: SessionStatus, batch: CheckpointBatch) -> SessionFinish {
    SessionFinish {
        attempt: aref(s),
        status,
        error: (status == SessionStatus::Failed)
            .then(|| SessionError::new("job_failed", "the job said no")),
        batch,
        cleanup_after: DEFAULT_TIMEOUT,
        now: at(9),
    }
}

/// Many finishes in one call: each answered as a finish of its own would be (the state
/// machine's session, refused when the attempt does not hold it or an earlier item ended it,
/// Invalid for a non-terminal status), and only the applied ones written.
pub async fn finish_many_per_item_results(store: Arc<dyn Store>) {
    for id in ["a", "b", "c", "d", "e"] {
        insert(&store, session(id)).await;
    }
    let claimed = claim(&store, "w", 5, at(1)).await;
    assert_eq!(ids(&claimed), ["a", "b", "c", "d", "e"]);
    let [a, b, c, d, e] = [0, 1, 2, 3, 4].map(|i| claimed[i].clone());
    let mut stranger = finish_of(&d, SessionStatus::Completed, CheckpointBatch::default());
    stranger.attempt.owner = "someone-else".into();
    let items = vec![
        finish_of(&a, SessionStatus::Completed, full_batch(0)),
        finish_of(&b, SessionStatus::Failed, full_batch(3)),
        finish_of(&c, SessionStatus::Running, CheckpointBatch::default()),
        stranger,
        finish_of(&a, SessionStatus::Failed, CheckpointBatch::default()),
        finish_of(&e, SessionStatus::Cancelled, CheckpointBatch::default()),
    ];
    let out = store
        .session_finish_many(&items)
        .await
        .expect("finish_many");
    assert_eq!(out.len(), items.len(), "one answer per item");
    for (i, before) in [(0, &a), (1, &b), (5, &e)] {
        let p = &items[i];
        let expected = before.finished(
            p.status,
            p.error.clone(),
            &p.batch.progress(),
            DEFAULT_TIMEOUT,
            at(9),
        );
        let got = match &out[i] {
            Ok(Some(s)) => s.clone(),
            other => panic!("item {i}: {other:?}"),
        };
        assert_applied(&store, &got, &expected, &format!("finish_many item {i}")).await;
    }
    assert!(
        matches!(&out[2], Err(StoreError::Invalid(_))),
        "a non-terminal status is refused: {:?}",
        out[2]
    );
    assert!(matches!(&out[3], Ok(None)), "another owner: {:?}", out[3]);
    assert!(
        matches!(&out[4], Ok(None)),
        "a second finish of one attempt is refused: {:?}",
        out[4]
    );
    for id in ["c", "d"] {
        assert_eq!(get(&store, id).await.status, SessionStatus::Running, "{id}");
    }
    assert_eq!(get(&store, "a").await.status, SessionStatus::Completed);
    for (id, first) in [("a", 0), ("b", 0)] {
        assert_eq!(
            record_seqs(&store, id).await,
            [first, first + 1, first + 2],
            "{id}: its last batch's records, numbered from 0"
        );
    }
    // Refused items still finish on their own afterwards.
    assert!(finish(&store, &aref(&c), SessionStatus::Completed, at(10)).await);
    assert!(finish(&store, &aref(&d), SessionStatus::Completed, at(10)).await);
}

/// Items of one session in one call apply as if one after the other: a refused item does not
/// stop a later one of the same session (here, the real owner's after a stranger's), and once
/// one applies the later ones are refused, whatever their batch carries.
pub async fn finish_many_applies_items_in_order(store: Arc<dyn Store>) {
    for id in ["a", "b"] {
        insert(&store, session(id)).await;
    }
    let claimed = claim(&store, "w", 2, at(1)).await;
    let [a, b] = [0, 1].map(|i| claimed[i].clone());
    let mut stranger = finish_of(&a, SessionStatus::Failed, full_batch(0));
    stranger.attempt.owner = "someone-else".into();
    let items = vec![
        stranger,
        finish_of(&b, SessionStatus::Completed, CheckpointBatch::default()),
        finish_of(&a, SessionStatus::Completed, full_batch(0)),
        finish_of(&a, SessionStatus::Cancelled, full_batch(0)),
        finish_of(&b, SessionStatus::Failed, full_batch(0)),
    ];
    let out = store
        .session_finish_many(&items)
        .await
        .expect("finish_many");
    let applied: Vec<bool> = out
        .iter()
        .map(|r| match r {
            Ok(s) => s.is_some(),
            Err(e) => panic!("no item is invalid: {e}"),
        })
        .collect();
    assert_eq!(applied, [false, true, true, false, false]);
    assert_eq!(get(&store, "a").await.status, SessionStatus::Completed);
    assert_eq!(get(&store, "b").await.status, SessionStatus::Completed);
    for (id, n) in [("a", 3), ("b", 0)] {
        assert_eq!(
            record_seqs(&store, id).await.len(),
            n,
            "{id}: only the applied item's records"
        );
    }
}

/// A batch larger than one write unit (sled applies 64 sessions per intent): every session
/// finished, the status counts and queue depth exact.
pub async fn finish_many_across_intents(store: Arc<dyn Store>) {
    let n = 150;
    let batch: Vec<Session> = (0..n).map(|i| session(&format!("s{i:03}"))).collect();
    let inserted = store.session_insert_many(batch).await.expect("insert_many");
    assert!(
        inserted
            .iter()
            .all(|r| matches!(r, Ok(InsertOutcome::Inserted(_))))
    );
    let claimed = claim(&store, "w", n, at(1)).await;
    assert_eq!(claimed.len(), n);
    let items: Vec<SessionFinish> = claimed
        .iter()
        .map(|s| finish_of(s, SessionStatus::Completed, CheckpointBatch::default()))
        .collect();
    let out = store
        .session_finish_many(&items)
        .await
        .expect("finish_many");
    assert!(
        out.iter()
            .all(|r| matches!(r, Ok(Some(s)) if s.status == SessionStatus::Completed)),
        "every item applied"
    );
    let counts = store.session_counts(at(10)).await.expect("counts");
    assert_eq!(
        counts.by_status.get(&SessionStatus::Completed).copied(),
        Some(n as u64),
        "{counts:?}"
    );
    assert_eq!(
        counts
            .by_status
            .get(&SessionStatus::Running)
            .copied()
            .unwrap_or(0),
        0
    );
    assert_eq!(counts.queue_depth, 0);
    for s in &claimed {
        assert_eq!(
            get(&store, s.id.as_str()).await.status,
            SessionStatus::Completed
        );
    }
}

/// A finish whose status is not terminal is a caller bug: refused as Invalid, nothing changed.
pub async fn finish_with_non_terminal_status_is_invalid(store: Arc<dyn Store>) {
    insert(&store, session("a")).await;
    let s = claim(&store, "w", 1, at(1)).await.remove(0);
    for status in [SessionStatus::Pending, SessionStatus::Running] {
        let r = store
            .session_finish_if_running(SessionFinish {
                attempt: aref(&s),
                status,
                error: None,
                batch: CheckpointBatch::default(),
                cleanup_after: Duration::from_secs(98),
                now: at(2),
            })
            .await;
        assert!(matches!(r, Err(StoreError::Invalid(_))), "{status}: {r:?}");
    }
    assert_eq!(get(&store, "a").await, s);
}

/// After a reclaim and a new claim, the old attempt is fenced out even with the same owner name.
pub async fn stale_worker_fenced_after_reclaim(store: Arc<dyn Store>) {
    insert(&store, session("a")).await;
    let first = claim(&store, "w", 1, at(0)).await.remove(0);
    let old = aref(&first);
    let expiry = first.lease.as_ref().unwrap().expires_at;
    assert_eq!(
        reclaim(&store, expiry, at(31)).await,
        [("a".into(), 1, RequeueOutcome::Requeued)]
    );
    // The reclaimed session is due after the backoff (10 s).
    let second = claim(&store, "w", 1, at(41)).await.remove(0);
    assert_eq!(second.attempt, 2);
    let new = aref(&second);

    assert_eq!(
        heartbeat(&store, &old, at(42)).await,
        HeartbeatOutcome::Lost
    );
    let batch = CheckpointBatch {
        records: records(3, 0),
        ..Default::default()
    };
    assert!(!checkpoint(&store, &old, batch, at(42)).await);
    assert!(!finish(&store, &old, SessionStatus::Completed, at(42)).await);
    assert_eq!(
        requeue(&store, &old, true, at(42), at(42)).await,
        RequeueOutcome::NotApplied
    );
    let s = get(&store, "a").await;
    assert_eq!(s, second, "the stale attempt changed nothing");
    assert_eq!(s.metrics.processed_elements, 0);

    assert_eq!(
        heartbeat(&store, &new, at(43)).await,
        HeartbeatOutcome::Renewed {
            cancel_requested: false
        }
    );
    assert!(finish(&store, &new, SessionStatus::Completed, at(44)).await);
}

/// A heartbeat moves the lease expiry; a reclaim at the old expiry leaves the session alone.
pub async fn heartbeat_renews_lease(store: Arc<dyn Store>) {
    insert(&store, session("a")).await;
    let s = claim(&store, "w", 1, at(0)).await.remove(0);
    let a = aref(&s);
    assert_eq!(
        heartbeat(&store, &a, at(20)).await,
        HeartbeatOutcome::Renewed {
            cancel_requested: false
        }
    );
    let renewed = get(&store, "a").await;
    assert_eq!(renewed.lease.as_ref().unwrap().expires_at, at(50));
    assert!(
        reclaim(&store, at(30), at(30)).await.is_empty(),
        "the old expiry no longer applies"
    );
    assert_eq!(
        reclaim(&store, at(50), at(50)).await,
        [("a".into(), 1, RequeueOutcome::Requeued)]
    );
}

/// Listing is newest first, paginated by cursor, filtered by client, status and agent.
pub async fn list_newest_first_with_cursor_and_filters(store: Arc<dyn Store>) {
    for i in 0..7 {
        let mut s = session(&format!("s{i}"));
        s.client = ClientContext::of(if i % 2 == 0 { "even" } else { "odd" });
        s.job.agent = (i % 3 == 0).then(|| "ag".to_string());
        s.run_at = at(i);
        insert(&store, s).await;
    }
    let all = |limit| SessionList {
        limit,
        ..Default::default()
    };
    let newest_first: Vec<String> = (0..7).rev().map(|i| format!("s{i}")).collect();

    let (first, cursor) = list(&store, all(3)).await;
    assert_eq!(first, newest_first[..3]);
    let cursor = cursor.expect("more pages after the first");
    let (second, _) = list(
        &store,
        SessionList {
            cursor: Some(cursor),
            ..all(3)
        },
    )
    .await;
    assert_eq!(second, newest_first[3..6]);
    assert_eq!(list_all(&store, all(3)).await, newest_first);
    assert_eq!(list_all(&store, all(1)).await, newest_first);
    let (whole, end) = list(&store, all(1000)).await;
    assert_eq!(whole, newest_first);
    assert_eq!(end, None, "no cursor after the last page");

    let by_client = SessionList {
        client_id: Some("even".into()),
        ..all(2)
    };
    assert_eq!(list_all(&store, by_client).await, ["s6", "s4", "s2", "s0"]);
    let by_agent = SessionList {
        agent: Some("ag".into()),
        ..all(1)
    };
    assert_eq!(list_all(&store, by_agent).await, ["s6", "s3", "s0"]);

    // s0..s3 are due at 3: claim them, then filter by status.
    assert_eq!(claim(&store, "w", 10, at(3)).await.len(), 4);
    // Every status at once: the unfiltered listing still pages newest first (the sled store
    // merges its per-status indexes for it).
    let mut mixed = Vec::new();
    for (id, status) in [
        ("s7", SessionStatus::Completed),
        ("s8", SessionStatus::Failed),
        ("s9", SessionStatus::Running),
    ] {
        let mut s = session(id);
        s.run_at = at(3);
        insert(&store, s).await;
        let c = claim(&store, "w", 1, at(3)).await;
        assert_eq!(ids(&c), [id]);
        if status != SessionStatus::Running {
            assert!(finish(&store, &aref(&c[0]), status, at(4)).await);
        }
        mixed.push(id.to_string());
    }
    let everything: Vec<String> = mixed.iter().rev().chain(&newest_first).cloned().collect();
    for limit in [1, 2, 3, 1000] {
        assert_eq!(
            list_all(&store, all(limit)).await,
            everything,
            "pages of {limit}"
        );
    }
    let ended = SessionList {
        status: Some(SessionStatus::Completed),
        ..all(10)
    };
    assert_eq!(list_all(&store, ended).await, ["s7"]);
    let running = SessionList {
        status: Some(SessionStatus::Running),
        ..all(10)
    };
    assert_eq!(
        list_all(&store, running).await,
        ["s9", "s3", "s2", "s1", "s0"]
    );
    let c9 = get(&store, "s9").await;
    assert!(finish(&store, &aref(&c9), SessionStatus::Cancelled, at(5)).await);
    let running = SessionList {
        status: Some(SessionStatus::Running),
        ..all(3)
    };
    assert_eq!(list_all(&store, running).await, ["s3", "s2", "s1", "s0"]);
    let pending = SessionList {
        status: Some(SessionStatus::Pending),
        ..all(2)
    };
    assert_eq!(list_all(&store, pending).await, ["s6", "s5", "s4"]);
    let combined = SessionList {
        status: Some(SessionStatus::Running),
        client_id: Some("odd".into()),
        ..all(10)
    };
    assert_eq!(list_all(&store, combined).await, ["s3", "s1"]);
    let three = SessionList {
        status: Some(SessionStatus::Pending),
        client_id: Some("even".into()),
        agent: Some("ag".into()),
        ..all(10)
    };
    assert_eq!(list_all(&store, three).await, ["s6"]);
    let nobody = SessionList {
        client_id: Some("nobody".into()),
        ..all(10)
    };
    assert_eq!(list(&store, nobody).await, (vec![], None));
}

/// A limit outside 1..=1000 and a cursor that no page produced are Invalid.
pub async fn list_limit_and_cursor_validation(store: Arc<dyn Store>) {
    insert(&store, session("a")).await;
    for limit in [0, 1001] {
        let r = store
            .session_list(SessionList {
                limit,
                ..Default::default()
            })
            .await;
        assert!(
            matches!(r, Err(StoreError::Invalid(_))),
            "limit {limit}: {r:?}"
        );
    }
    let r = store
        .session_list(SessionList {
            limit: 10,
            cursor: Some("not a cursor".into()),
            ..Default::default()
        })
        .await;
    assert!(
        matches!(r, Err(StoreError::Invalid(_))),
        "bad cursor: {r:?}"
    );
}

/// Cancel: PENDING ends CANCELLED; RUNNING gets the flag (seen by heartbeat); terminal unchanged.
pub async fn cancel_pending_running_terminal(store: Arc<dyn Store>) {
    insert(&store, session("run")).await;
    let running = claim(&store, "w", 1, at(1)).await.remove(0);
    insert(&store, session("pend")).await;
    let cancel = |id: &str| SessionCancel {
        id: harvest::SessionKey::from(sid(id)),
        cleanup_after: Duration::from_secs(895),
        now: at(5),
    };

    match store.session_cancel(cancel("pend")).await.expect("cancel") {
        CancelOutcome::Cancelled(s) => {
            assert_eq!(s.status, SessionStatus::Cancelled);
            assert_eq!(s.cleanup_at, Some(at(900)));
            assert_eq!(*s, get(&store, "pend").await);
        }
        other => panic!("cancel of PENDING: {other:?}"),
    }
    assert!(
        claim(&store, "w", 10, at(6)).await.is_empty(),
        "a cancelled session is not claimed"
    );

    match store.session_cancel(cancel("run")).await.expect("cancel") {
        CancelOutcome::Requested(s) => {
            assert_eq!(s.status, SessionStatus::Running);
            assert!(s.cancel_requested);
        }
        other => panic!("cancel of RUNNING: {other:?}"),
    }
    let a = aref(&running);
    assert_eq!(
        heartbeat(&store, &a, at(6)).await,
        HeartbeatOutcome::Renewed {
            cancel_requested: true
        }
    );
    assert!(finish(&store, &a, SessionStatus::Cancelled, at(7)).await);

    for id in ["pend", "run"] {
        match store.session_cancel(cancel(id)).await.expect("cancel") {
            CancelOutcome::AlreadyTerminal(s) => assert_eq!(s.status, SessionStatus::Cancelled),
            other => panic!("cancel of terminal {id}: {other:?}"),
        }
    }
    assert_eq!(
        store
            .session_cancel(cancel("missing"))
            .await
            .expect("cancel"),
        CancelOutcome::NotFound
    );
}

/// `session_remove` removes the session and all its data; a session whose id is a prefix of the
/// removed one's (or the other way round) keeps everything.
pub async fn remove_leaves_no_data_and_spares_prefix_ids(store: Arc<dyn Store>) {
    for id in ["ab", "abc", "a"] {
        let mut s = session(id);
        s.job.agent = Some("ag".into());
        insert(&store, s).await;
    }
    for s in claim(&store, "w", 10, at(1)).await {
        let batch = CheckpointBatch {
            records: records(3, 0),
            frontier_add: vec![entry("http://x/1"), entry("http://x/2")],
            seen_add: vec!["http://x/0".into()],
            log: vec![line(1), line(2)],
            pages: 1,
            ..Default::default()
        };
        assert!(checkpoint(&store, &aref(&s), batch, at(2)).await);
    }
    let removed = store
        .session_remove(&harvest::SessionKey::from(&sid("ab")))
        .await
        .expect("remove")
        .expect("it existed");
    assert_eq!(removed.id.as_str(), "ab");
    assert_eq!(
        store
            .session_get(&harvest::SessionKey::from(&sid("ab")))
            .await
            .unwrap(),
        None
    );
    assert!(
        store
            .records_page(RecordsPage {
                id: harvest::SessionKey::from(sid("ab")),
                offset: 0,
                limit: 100
            })
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .log_tail(&harvest::SessionKey::from(&sid("ab")), 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        list_all(
            &store,
            SessionList {
                limit: 10,
                ..Default::default()
            }
        )
        .await,
        ["a", "abc"]
    );
    let by_agent = SessionList {
        agent: Some("ag".into()),
        limit: 10,
        ..Default::default()
    };
    assert_eq!(list_all(&store, by_agent).await, ["a", "abc"]);
    assert!(
        reclaim(&store, FAR_FUTURE, at(3))
            .await
            .iter()
            .all(|r| r.0 != "ab")
    );
    assert_eq!(
        store
            .session_remove(&harvest::SessionKey::from(&sid("ab")))
            .await
            .expect("remove again"),
        None
    );

    for id in ["abc", "a"] {
        let recs = store
            .records_page(RecordsPage {
                id: harvest::SessionKey::from(sid(id)),
                offset: 0,
                limit: 100,
            })
            .await
            .unwrap();
        assert_eq!(recs.len(), 3, "{id} keeps its records");
        assert_eq!(
            store
                .log_tail(&harvest::SessionKey::from(&sid(id)), 100)
                .await
                .unwrap()
                .len(),
            2,
            "{id} keeps its log"
        );
        let resume = store
            .resume_load(&harvest::SessionKey::from(&sid(id)))
            .await
            .expect("resume");
        assert_eq!(resume.frontier_len, 2, "{id} keeps its frontier");
        assert_eq!(
            frontier_urls(&store, id).await.len(),
            2,
            "{id} keeps its frontier"
        );
        assert_eq!(
            seen(&store, id, &["http://x/0"]).await,
            [true],
            "{id} keeps its seen set"
        );
    }
    let counts = store.session_counts(at(3)).await.unwrap();
    let total: u64 = counts.by_status.values().sum();
    assert_eq!(total, 2, "counts forget the removed session: {counts:?}");
}

/// Requeue without spending keeps failures; spending counts them; exhaustion ends FAILED.
pub async fn requeue_with_and_without_spending_attempts(store: Arc<dyn Store>) {
    let mut s = session("a");
    s.options.max_attempts = Some(2);
    insert(&store, s).await;

    let c1 = claim(&store, "w", 1, at(0)).await.remove(0);
    assert_eq!(
        requeue(&store, &aref(&c1), false, at(20), at(1)).await,
        RequeueOutcome::Requeued
    );
    let p = get(&store, "a").await;
    assert_eq!(
        (p.status, p.failures, p.run_at),
        (SessionStatus::Pending, 0, at(20))
    );
    assert_eq!(p.lease, None);
    assert_eq!(
        p.error.as_ref().map(|e| e.kind.as_str()),
        Some("job_failed")
    );
    assert!(
        claim(&store, "w", 1, at(19)).await.is_empty(),
        "not claimed before its run_at"
    );

    let c2 = claim(&store, "w", 1, at(20)).await.remove(0);
    assert_eq!(c2.attempt, 2);
    assert_eq!(
        requeue(&store, &aref(&c2), true, at(30), at(21)).await,
        RequeueOutcome::Requeued
    );
    assert_eq!(get(&store, "a").await.failures, 1);

    let c3 = claim(&store, "w", 1, at(30)).await.remove(0);
    assert_eq!(c3.attempt, 3);
    assert_eq!(
        requeue(&store, &aref(&c3), true, at(40), at(31)).await,
        RequeueOutcome::Failed
    );
    let f = get(&store, "a").await;
    assert_eq!((f.status, f.failures), (SessionStatus::Failed, 2));
    assert_eq!(
        f.error.as_ref().map(|e| e.kind.as_str()),
        Some("job_failed"),
        "the error is kept"
    );
    assert_eq!(f.cleanup_at, Some(at(31).add(Duration::from_secs(3600))));
    assert_eq!(f.lease, None);
    assert!(claim(&store, "w", 1, at(100)).await.is_empty());
}

/// A reclaimed attempt without progress spends an attempt; one with progress does not.
pub async fn reclaim_with_and_without_progress(store: Arc<dyn Store>) {
    for id in ["idle", "busy"] {
        let mut s = session(id);
        s.options.max_attempts = Some(2);
        insert(&store, s).await;
    }
    for round in 0..2u32 {
        let now = at(100 * i64::from(round));
        let claimed = claim(&store, "w", 10, now).await;
        assert_eq!(claimed.len(), 2, "round {round}");
        let busy = claimed.iter().find(|s| s.id.as_str() == "busy").unwrap();
        let batch = CheckpointBatch {
            records: records(1, round as usize),
            ..Default::default()
        };
        assert!(checkpoint(&store, &aref(busy), batch, now).await);
        // The checkpoint renewed busy's lease to now + 30; idle's expires at now + 30 too.
        let outcome = reclaim(
            &store,
            now.add(Duration::from_secs(30)),
            now.add(Duration::from_secs(31)),
        )
        .await;
        let idle_outcome = if round == 0 {
            RequeueOutcome::Requeued
        } else {
            RequeueOutcome::Failed
        };
        assert_eq!(
            outcome,
            [
                ("busy".into(), round + 1, RequeueOutcome::Requeued),
                ("idle".into(), round + 1, idle_outcome)
            ]
        );
    }
    let busy = get(&store, "busy").await;
    assert_eq!((busy.status, busy.failures), (SessionStatus::Pending, 0));
    assert_eq!(busy.run_at, at(131 + 10), "run_at = now + backoff");
    assert_eq!(busy.metrics.processed_elements, 2);
    let idle = get(&store, "idle").await;
    assert_eq!((idle.status, idle.failures), (SessionStatus::Failed, 2));
    assert_eq!(
        idle.error.as_ref().map(|e| e.kind.as_str()),
        Some("attempts_exhausted")
    );
    assert_eq!(
        idle.cleanup_at,
        Some(at(131).add(Duration::from_secs(3600)))
    );
    assert_eq!(idle.lease, None);
}

/// A session with its own `session_timeout_secs` that a reclaim ends (FAILED or CANCELLED), or
/// that is cancelled while PENDING, is kept for that long, not for the caller's default.
pub async fn reclaim_and_cancel_keep_a_session_for_its_own_timeout(store: Arc<dyn Store>) {
    let week = Duration::from_secs(7 * 86400);
    for (id, own) in [("own", true), ("plain", false), ("own-cancel", true)] {
        let mut s = session(id);
        s.options.max_attempts = Some(1);
        if own {
            s.options.session_timeout_secs = Some(week.as_secs());
        }
        insert(&store, s).await;
    }
    let claimed = claim(&store, "w", 10, at(1)).await;
    assert_eq!(claimed.len(), 3);
    let flagged = claimed
        .iter()
        .find(|s| s.id.as_str() == "own-cancel")
        .unwrap();
    let out = store
        .session_cancel(SessionCancel {
            id: harvest::SessionKey::from(flagged.id.clone()),
            cleanup_after: Duration::from_secs(60),
            now: at(2),
        })
        .await
        .expect("cancel");
    assert!(matches!(out, CancelOutcome::Requested(_)), "{out:?}");
    let outcome = reclaim(&store, at(100), at(100)).await;
    assert_eq!(
        outcome,
        [
            ("own".into(), 1, RequeueOutcome::Failed),
            ("own-cancel".into(), 1, RequeueOutcome::Cancelled),
            ("plain".into(), 1, RequeueOutcome::Failed),
        ]
    );
    assert_eq!(get(&store, "own").await.cleanup_at, Some(at(100).add(week)));
    assert_eq!(
        get(&store, "own-cancel").await.cleanup_at,
        Some(at(100).add(week))
    );
    assert_eq!(
        get(&store, "plain").await.cleanup_at,
        Some(at(100).add(Duration::from_secs(3600))),
        "the caller's default"
    );

    let mut s = session("own-pending");
    s.options.session_timeout_secs = Some(90);
    insert(&store, s).await;
    let out = store
        .session_cancel(SessionCancel {
            id: harvest::SessionKey::from(sid("own-pending")),
            cleanup_after: Duration::from_secs(3600),
            now: at(200),
        })
        .await
        .expect("cancel");
    assert!(matches!(out, CancelOutcome::Cancelled(_)), "{out:?}");
    assert_eq!(
        get(&store, "own-pending").await.cleanup_at,
        Some(at(200).add(Duration::from_secs(90)))
    );
}

/// Reclaim only touches leases expired at or before `expired_before`, at most `limit`.
pub async fn reclaim_respects_limit_and_expiry(store: Arc<dyn Store>) {
    for i in 0..5 {
        insert(&store, session(&format!("s{i}"))).await;
        claim(&store, "w", 1, at(i)).await; // lease expires at i + 30
    }
    assert!(reclaim(&store, at(29), at(29)).await.is_empty());
    let two = store
        .leases_reclaim(LeaseReclaim {
            expired_before: at(40),
            limit: 2,
            backoff: Duration::ZERO,
            cleanup_after: Duration::from_secs(1),
            now: at(40),
        })
        .await
        .unwrap();
    assert_eq!(two.len(), 2, "limit respected");
    let mut ids: Vec<String> = two.iter().map(|r| r.id.to_string()).collect();
    ids.sort();
    assert_eq!(ids, ["s0", "s1"], "earliest expiries first");
    assert_eq!(
        reclaim(&store, at(32), at(40)).await.len(),
        1,
        "s2 expires at 32, s3 at 33"
    );
    assert_eq!(get(&store, "s3").await.status, SessionStatus::Running);
    assert_eq!(reclaim(&store, FAR_FUTURE, at(40)).await.len(), 2);
}

/// Checkpoint records are numbered after the committed count, across attempts; resume_load
/// returns the frontier, seen set and counters as of the last checkpoint.
pub async fn checkpoint_numbering_across_attempts_and_resume(store: Arc<dyn Store>) {
    insert(&store, session("a")).await;
    let c1 = claim(&store, "w", 1, at(0)).await.remove(0);
    let a1 = aref(&c1);
    let usage = TokenUsage {
        http_requests: 3,
        bytes_received: 100,
        ..Default::default()
    };
    let b1 = CheckpointBatch {
        records: records(3, 0),
        frontier_add: vec![
            entry("http://x/a"),
            entry("http://x/b"),
            entry("http://x/c"),
        ],
        frontier_done: vec![],
        seen_add: vec![
            "http://x/a".into(),
            "http://x/b".into(),
            "http://x/c".into(),
        ],
        pages: 2,
        elements: None,
        context: None,
        usage,
        log: vec![line(1)],
    };
    assert!(checkpoint(&store, &a1, b1, at(5)).await);
    let s = get(&store, "a").await;
    assert_eq!(s.metrics.processed_elements, 3);
    assert_eq!(s.metrics.pages_processed, 2);
    assert_eq!(s.checkpoints, 1);
    assert!(s.progress_this_attempt);
    assert_eq!(s.usage, usage);
    assert_eq!(
        s.lease.as_ref().unwrap().expires_at,
        at(35),
        "a checkpoint renews the lease"
    );

    let b2 = CheckpointBatch {
        records: records(2, 3),
        frontier_add: vec![entry("http://x/d")],
        frontier_done: vec!["http://x/a".into()],
        seen_add: vec!["http://x/d".into()],
        pages: 1,
        elements: None,
        context: None,
        usage,
        log: vec![line(2)],
    };
    assert!(checkpoint(&store, &a1, b2, at(6)).await);
    assert_eq!(
        reclaim(&store, at(36), at(40)).await,
        [("a".into(), 1, RequeueOutcome::Requeued)]
    );

    let resume = store
        .resume_load(&harvest::SessionKey::from(&sid("a")))
        .await
        .expect("resume");
    assert_eq!(resume.frontier_len, 3);
    let frontier = store
        .frontier_page(FrontierPage {
            id: harvest::SessionKey::from(sid("a")),
            after_pos: 0,
            limit: 100,
        })
        .await
        .expect("frontier page");
    assert_eq!(
        frontier
            .iter()
            .map(|i| i.entry.url.as_str())
            .collect::<Vec<_>>(),
        ["http://x/b", "http://x/c", "http://x/d"],
        "in the order they were added"
    );
    assert_eq!(frontier[0].entry, entry("http://x/b"));
    assert_eq!(
        seen(
            &store,
            "a",
            &[
                "http://x/a",
                "http://x/b",
                "http://x/c",
                "http://x/d",
                "http://x/e"
            ]
        )
        .await,
        [true, true, true, true, false]
    );
    assert_eq!(resume.records, 5);
    assert_eq!(resume.metrics.pages_processed, 3);
    assert_eq!(resume.usage.http_requests, 6);

    let c2 = claim(&store, "w", 1, at(50)).await.remove(0);
    assert_eq!(c2.attempt, 2);
    assert!(
        !c2.progress_this_attempt,
        "a new attempt starts without progress"
    );
    let a2 = aref(&c2);
    let b3 = CheckpointBatch {
        records: records(1, 5),
        ..Default::default()
    };
    assert!(checkpoint(&store, &a2, b3, at(51)).await);
    let ok = store
        .session_finish_if_running(SessionFinish {
            attempt: a2,
            status: SessionStatus::Completed,
            error: None,
            batch: CheckpointBatch {
                records: records(1, 6),
                ..Default::default()
            },
            cleanup_after: Duration::from_secs(948),
            now: at(52),
        })
        .await
        .unwrap()
        .is_some();
    assert!(ok);
    let all = store
        .records_page(RecordsPage {
            id: harvest::SessionKey::from(sid("a")),
            offset: 0,
            limit: 100,
        })
        .await
        .unwrap();
    assert_eq!(
        all.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4, 5, 6]
    );
    for r in &all {
        assert_eq!(
            r.data,
            serde_json::json!({"i": r.seq}),
            "record {} holds its data",
            r.seq
        );
    }
    let tail = store
        .records_page(RecordsPage {
            id: harvest::SessionKey::from(sid("a")),
            offset: 5,
            limit: 1,
        })
        .await
        .unwrap();
    assert_eq!(tail.iter().map(|r| r.seq).collect::<Vec<_>>(), [5]);
    assert!(
        store
            .records_page(RecordsPage {
                id: harvest::SessionKey::from(sid("a")),
                offset: 7,
                limit: 10
            })
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(get(&store, "a").await.metrics.processed_elements, 7);
}

/// records_page refuses a limit outside 1..=10000.
pub async fn records_page_validation(store: Arc<dyn Store>) {
    insert(&store, session("a")).await;
    for limit in [0, 10_001] {
        let r = store
            .records_page(RecordsPage {
                id: harvest::SessionKey::from(sid("a")),
                offset: 0,
                limit,
            })
            .await;
        assert!(
            matches!(r, Err(StoreError::Invalid(_))),
            "limit {limit}: {r:?}"
        );
    }
}

/// The log keeps the last LOG_LINES_MAX lines; log_tail returns the newest, oldest first.
pub async fn log_keeps_last_lines(store: Arc<dyn Store>) {
    insert(&store, session("a")).await;
    let a = aref(&claim(&store, "w", 1, at(0)).await.remove(0));
    let total = LOG_LINES_MAX + 200;
    let half = total / 2;
    for range in [0..half, half..total] {
        let batch = CheckpointBatch {
            log: range.map(line).collect(),
            ..Default::default()
        };
        assert!(checkpoint(&store, &a, batch, at(1)).await);
    }
    let tail = store
        .log_tail(&harvest::SessionKey::from(&sid("a")), 3)
        .await
        .unwrap();
    assert_eq!(tail, [line(total - 3), line(total - 2), line(total - 1)]);
    let all = store
        .log_tail(&harvest::SessionKey::from(&sid("a")), usize::MAX)
        .await
        .unwrap();
    assert_eq!(all.len() as u64, LOG_LINES_MAX);
    assert_eq!(all.first(), Some(&line(total - LOG_LINES_MAX)));
    assert!(
        store
            .log_tail(&harvest::SessionKey::from(&sid("a")), 0)
            .await
            .unwrap()
            .is_empty()
    );

    // One batch longer than the cap keeps only its own last lines.
    let big = CheckpointBatch {
        log: (total..total * 2).map(line).collect(),
        ..Default::default()
    };
    assert!(checkpoint(&store, &a, big, at(2)).await);
    let all = store
        .log_tail(&harvest::SessionKey::from(&sid("a")), usize::MAX)
        .await
        .unwrap();
    assert_eq!(all.len() as u64, LOG_LINES_MAX);
    assert_eq!(all.first(), Some(&line(total * 2 - LOG_LINES_MAX)));
    assert_eq!(all.last(), Some(&line(total * 2 - 1)));
    assert!(
        store
            .log_tail(&harvest::SessionKey::from(&sid("missing")), 10)
            .await
            .unwrap()
            .is_empty()
    );
}

/// sessions_expire removes only terminal sessions whose cleanup time has come, at most `limit`.
pub async fn sessions_expire_only_due(store: Arc<dyn Store>) {
    for (i, id) in ["e1", "e2", "e3"].into_iter().enumerate() {
        insert(&store, session(id)).await;
        let s = claim(&store, "w", 1, at(0)).await.remove(0);
        let ok = store
            .session_finish_if_running(SessionFinish {
                attempt: aref(&s),
                status: SessionStatus::Completed,
                error: None,
                batch: CheckpointBatch {
                    records: records(2, 0),
                    ..Default::default()
                },
                cleanup_after: Duration::from_secs(100 * (i as u64 + 1) - 1),
                now: at(1),
            })
            .await
            .unwrap()
            .is_some();
        assert!(ok);
    }
    insert(&store, session("pending")).await;
    let expire = |now, limit| SessionsExpire { now, limit };
    assert!(
        store
            .sessions_expire(expire(at(99), 10))
            .await
            .unwrap()
            .is_empty()
    );
    let one = store.sessions_expire(expire(at(200), 1)).await.unwrap();
    assert_eq!(ids(&one), ["e1"], "limit respected, earliest first");
    let next = store.sessions_expire(expire(at(200), 10)).await.unwrap();
    assert_eq!(ids(&next), ["e2"], "only due ones");
    for id in ["e1", "e2"] {
        assert_eq!(
            store
                .session_get(&harvest::SessionKey::from(&sid(id)))
                .await
                .unwrap(),
            None
        );
        assert!(
            store
                .records_page(RecordsPage {
                    id: harvest::SessionKey::from(sid(id)),
                    offset: 0,
                    limit: 10
                })
                .await
                .unwrap()
                .is_empty()
        );
    }
    assert_eq!(get(&store, "e3").await.status, SessionStatus::Completed);
    assert_eq!(get(&store, "pending").await.status, SessionStatus::Pending);
    assert!(
        store
            .sessions_expire(expire(at(200), 10))
            .await
            .unwrap()
            .is_empty()
    );
}

/// Counts per status and the due queue depth.
pub async fn counts_by_status_and_queue_depth(store: Arc<dyn Store>) {
    let empty = store.session_counts(at(0)).await.unwrap();
    assert_eq!(empty.by_status.values().sum::<u64>(), 0);
    assert_eq!(empty.queue_depth, 0);

    for id in ["a", "b", "c", "d", "e"] {
        insert(&store, session(id)).await;
    }
    let mut later = session("later");
    later.run_at = at(1000);
    insert(&store, later).await;
    let claimed = claim(&store, "w", 2, at(1)).await; // a, b
    assert!(finish(&store, &aref(&claimed[0]), SessionStatus::Completed, at(2)).await);
    let cancel = SessionCancel {
        id: harvest::SessionKey::from(sid("c")),
        cleanup_after: Duration::from_secs(98),
        now: at(2),
    };
    assert!(matches!(
        store.session_cancel(cancel).await.unwrap(),
        CancelOutcome::Cancelled(_)
    ));

    let counts = store.session_counts(at(3)).await.unwrap();
    let get_count = |st| counts.by_status.get(&st).copied().unwrap_or(0);
    assert_eq!(get_count(SessionStatus::Pending), 3, "{counts:?}");
    assert_eq!(get_count(SessionStatus::Running), 1, "{counts:?}");
    assert_eq!(get_count(SessionStatus::Completed), 1, "{counts:?}");
    assert_eq!(get_count(SessionStatus::Cancelled), 1, "{counts:?}");
    assert_eq!(get_count(SessionStatus::Failed), 0, "{counts:?}");
    assert_eq!(
        counts.queue_depth, 2,
        "d and e are due; later is not: {counts:?}"
    );
    assert_eq!(store.session_counts(at(1000)).await.unwrap().queue_depth, 3);
}

/// Stats: by status and client, scoped to one client on request, and the sessions (and their
/// records) that ended in each minute of the last hour.
pub async fn stats_by_client_status_and_last_hour(store: Arc<dyn Store>) {
    let q = |client: Option<&str>, now: Timestamp| StatsQuery {
        client_id: client.map(String::from),
        now,
    };
    let empty = store.session_stats(q(None, at(0))).await.unwrap();
    assert_eq!(empty, SessionStats::empty());
    assert_eq!(empty.by_status.len(), 5);
    assert_eq!(empty.finished_per_minute.len(), 60);

    for (id, client) in [
        ("a", "c1"),
        ("b", "c1"),
        ("c", "c2"),
        ("d", "c2"),
        ("e", ""),
    ] {
        let mut s = session(id);
        s.client = ClientContext::of(client);
        insert(&store, s).await;
    }
    // a and b run; a ends at 10 min with 3 records, b at 50 min with 2; c is cancelled at 55.
    let claimed = claim(&store, "w", 2, at(1)).await;
    let by_id = |id: &str| aref(claimed.iter().find(|s| s.id.as_str() == id).unwrap());
    let with_records = |n| CheckpointBatch {
        records: records(n, 0),
        ..Default::default()
    };
    assert!(checkpoint(&store, &by_id("a"), with_records(3), at(2)).await);
    assert!(finish(&store, &by_id("a"), SessionStatus::Completed, at(600)).await);
    assert!(checkpoint(&store, &by_id("b"), with_records(2), at(3)).await);
    assert!(finish(&store, &by_id("b"), SessionStatus::Failed, at(3000)).await);
    let cancel = SessionCancel {
        id: harvest::SessionKey::from(sid("c")),
        cleanup_after: Duration::from_secs(9000),
        now: at(3300),
    };
    assert!(matches!(
        store.session_cancel(cancel).await.unwrap(),
        CancelOutcome::Cancelled(_)
    ));

    let now = at(3600);
    let all = store.session_stats(q(None, now)).await.unwrap();
    let n = |m: &BTreeMap<SessionStatus, u64>, st| m.get(&st).copied().unwrap_or(0);
    assert_eq!(n(&all.by_status, SessionStatus::Pending), 2, "{all:?}");
    assert_eq!(n(&all.by_status, SessionStatus::Completed), 1, "{all:?}");
    assert_eq!(n(&all.by_status, SessionStatus::Failed), 1, "{all:?}");
    assert_eq!(n(&all.by_status, SessionStatus::Cancelled), 1, "{all:?}");
    assert_eq!(
        all.clients.keys().map(String::as_str).collect::<Vec<_>>(),
        ["", "c1", "c2"]
    );
    assert_eq!(n(&all.clients["c1"], SessionStatus::Completed), 1);
    assert_eq!(n(&all.clients["c2"], SessionStatus::Pending), 1);
    assert_eq!(n(&all.clients[""], SessionStatus::Pending), 1);
    // Minute 59 is the one up to `now`: a ended 50 minutes before it, b 10, c 5.
    let mut finished = vec![0u64; 60];
    let mut recs = vec![0u64; 60];
    (finished[9], recs[9]) = (1, 3);
    (finished[49], recs[49]) = (1, 2);
    finished[54] = 1;
    assert_eq!(all.finished_per_minute, finished, "{all:?}");
    assert_eq!(all.records_per_minute, recs, "{all:?}");

    let c1 = store.session_stats(q(Some("c1"), now)).await.unwrap();
    assert_eq!(c1.by_status.values().sum::<u64>(), 2, "{c1:?}");
    assert_eq!(c1.clients.keys().collect::<Vec<_>>(), ["c1"]);
    assert_eq!(c1.records_per_minute.iter().sum::<u64>(), 5);
    assert_eq!(c1.finished_per_minute.iter().sum::<u64>(), 2);
    let nobody = store.session_stats(q(Some("c9"), now)).await.unwrap();
    assert_eq!(nobody, SessionStats::empty());
    // An hour later, a has left the window; b and c have not.
    let later = store.session_stats(q(None, at(3600 + 1200))).await.unwrap();
    assert_eq!(
        later.finished_per_minute.iter().sum::<u64>(),
        2,
        "{later:?}"
    );
}

/// Agents: put (create and replace), get, list by client and name, delete.
pub async fn agents_crud(store: Arc<dyn Store>) {
    let agent = |client: &str, name: &str, schedule: Option<&str>| Agent {
        name: name.into(),
        client_id: client.into(),
        config: serde_json::json!({"name": name}),
        params: BTreeMap::from([("k".to_string(), "v".to_string())]),
        options: SessionOptions::default(),
        schedule: schedule.map(String::from),
        sessions: AgentSessions::Single,
        updated_at: T0,
    };
    assert_eq!(store.agent_get("c1", "x").await.unwrap(), None);
    for (c, n) in [("c2", "b"), ("c1", "zz"), ("c1", "a"), ("", "anon")] {
        store.agent_put(agent(c, n, None)).await.unwrap();
    }
    assert_eq!(
        store.agent_get("c1", "a").await.unwrap(),
        Some(agent("c1", "a", None))
    );
    assert_eq!(
        store.agent_get("c2", "a").await.unwrap(),
        None,
        "agents are per client"
    );
    let replaced = agent("c1", "a", Some("0 0 * * * *"));
    store.agent_put(replaced.clone()).await.unwrap();
    assert_eq!(store.agent_get("c1", "a").await.unwrap(), Some(replaced));
    let listed: Vec<(String, String)> = store
        .agent_list()
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.client_id, a.name))
        .collect();
    let expected = [("", "anon"), ("c1", "a"), ("c1", "zz"), ("c2", "b")];
    assert_eq!(
        listed,
        expected.map(|(c, n)| (c.to_string(), n.to_string()))
    );
    assert!(store.agent_delete("c1", "a").await.unwrap());
    assert!(!store.agent_delete("c1", "a").await.unwrap());
    assert_eq!(store.agent_get("c1", "a").await.unwrap(), None);
    assert_eq!(store.agent_list().await.unwrap().len(), 3);
}

/// A single-session agent refuses a second active session until the first one ends.
pub async fn single_agent_refuses_second_active_session(store: Arc<dyn Store>) {
    let mk = |id: &str, agent: &str| {
        let mut s = session(id);
        s.job.agent = Some(agent.into());
        SessionInsert {
            session: s,
            single_agent: Some(agent.into()),
        }
    };
    assert!(matches!(
        store.session_insert(mk("one", "ag")).await.unwrap(),
        InsertOutcome::Inserted(_)
    ));
    assert_eq!(
        store.session_insert(mk("two", "ag")).await.unwrap(),
        InsertOutcome::AgentBusy(sid("one"))
    );
    assert_eq!(
        store
            .session_get(&harvest::SessionKey::from(&sid("two")))
            .await
            .unwrap(),
        None,
        "a refused insert stores nothing"
    );
    assert!(
        matches!(
            store.session_insert(mk("other", "ag2")).await.unwrap(),
            InsertOutcome::Inserted(_)
        ),
        "another agent is not affected"
    );
    let mut multi = session("multi");
    multi.job.agent = Some("ag".into());
    insert(&store, multi).await; // without single_agent, no check

    let running = claim(&store, "w", 1, at(0)).await.remove(0);
    assert_eq!(running.id.as_str(), "one");
    assert!(matches!(
        store.session_insert(mk("three", "ag")).await.unwrap(),
        InsertOutcome::AgentBusy(ref id) if id.as_str() == "one" || id.as_str() == "multi"
    ));
    assert!(finish(&store, &aref(&running), SessionStatus::Completed, at(1)).await);
    let cancel = SessionCancel {
        id: harvest::SessionKey::from(sid("multi")),
        cleanup_after: Duration::from_secs(99),
        now: at(1),
    };
    assert!(matches!(
        store.session_cancel(cancel).await.unwrap(),
        CancelOutcome::Cancelled(_)
    ));
    assert!(
        matches!(
            store.session_insert(mk("four", "ag")).await.unwrap(),
            InsertOutcome::Inserted(_)
        ),
        "once no session of the agent is active, a new one is accepted"
    );
}

/// Claims racing from 8 tasks never hand one session to two claimers, and lose none.
pub async fn claims_racing_never_share_a_session(store: Arc<dyn Store>) {
    const N: usize = 60;
    for i in 0..N {
        insert(&store, session(&format!("s{i:03}"))).await;
    }
    let mut tasks = Vec::new();
    for t in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for _ in 0..N {
                let got = claim(&store, &format!("w{t}"), 3, at(1)).await;
                if got.is_empty() {
                    break;
                }
                mine.extend(got.into_iter().map(|s| (s.id.to_string(), t)));
            }
            mine
        }));
    }
    let mut owners: BTreeMap<String, usize> = BTreeMap::new();
    for task in tasks {
        for (id, t) in task.await.expect("claim task") {
            if let Some(prev) = owners.insert(id.clone(), t) {
                panic!("{id} was claimed by w{prev} and w{t}");
            }
        }
    }
    assert_eq!(owners.len(), N, "every session claimed exactly once");
    for (id, t) in owners {
        let s = get(&store, &id).await;
        assert_eq!(s.attempt, 1, "{id}");
        assert_eq!(s.lease.map(|l| l.owner), Some(format!("w{t}")), "{id}");
    }
}

/// A waiter wakes on an insert (well before its timeout).
pub async fn pending_wait_wakes_on_insert(store: Arc<dyn Store>) {
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move {
            let start = std::time::Instant::now();
            store.pending_wait(Duration::from_secs(60)).await;
            start.elapsed()
        })
    };
    insert(&store, session("a")).await;
    let waited = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("the waiter did not wake within 30 s of an insert")
        .expect("waiter task");
    assert!(waited < Duration::from_secs(30), "woke after {waited:?}");
}

/// With nothing happening, a wait returns at its timeout.
pub async fn pending_wait_times_out(store: Arc<dyn Store>) {
    let start = std::time::Instant::now();
    // A spurious early return is allowed, so only the upper bound is checked.
    tokio::time::timeout(
        Duration::from_secs(30),
        store.pending_wait(Duration::from_millis(50)),
    )
    .await
    .expect("pending_wait ignored its timeout");
    assert!(start.elapsed() < Duration::from_secs(30));
}

/// A RUNNING session whose client asked to cancel it, and whose worker then vanished, ends
/// CANCELLED at reclaim; it is not run again.
pub async fn reclaim_of_a_cancel_requested_session_ends_cancelled(store: Arc<dyn Store>) {
    for id in ["flagged", "plain"] {
        insert(&store, session(id)).await;
    }
    let claimed = claim(&store, "w", 10, at(0)).await;
    assert_eq!(claimed.len(), 2);
    let out = store
        .session_cancel(SessionCancel {
            id: harvest::SessionKey::from(sid("flagged")),
            cleanup_after: Duration::from_secs(4999),
            now: at(1),
        })
        .await
        .expect("cancel");
    assert!(matches!(out, CancelOutcome::Requested(_)), "{out:?}");
    let outcome = reclaim(&store, at(30), at(31)).await;
    assert_eq!(
        outcome,
        [
            ("flagged".into(), 1, RequeueOutcome::Cancelled),
            ("plain".into(), 1, RequeueOutcome::Requeued)
        ]
    );
    let f = get(&store, "flagged").await;
    assert_eq!(f.status, SessionStatus::Cancelled);
    assert_eq!(f.lease, None);
    assert_eq!(f.cleanup_at, Some(at(31).add(Duration::from_secs(3600))));
    assert_eq!(f.metrics.end_time, Some(at(31)));
    let again = claim(&store, "w", 10, at(1000)).await;
    assert_eq!(
        ids(&again),
        ["plain"],
        "the cancelled session is never claimed again"
    );
    let counts = store.session_counts(at(1000)).await.unwrap();
    assert_eq!(
        counts.by_status.get(&SessionStatus::Cancelled).copied(),
        Some(1),
        "{counts:?}"
    );
    let expired = store
        .sessions_expire(SessionsExpire {
            now: at(31).add(Duration::from_secs(3600)),
            limit: 10,
        })
        .await
        .expect("expire");
    assert_eq!(
        ids(&expired),
        ["flagged"],
        "it is cleaned up at its timeout"
    );
}

/// Removing the records of a terminal session keeps the session (and other sessions' records);
/// an active or missing session is refused.
pub async fn records_remove_if_terminal_keeps_the_session(store: Arc<dyn Store>) {
    for id in ["ab", "abc"] {
        insert(&store, session(id)).await;
    }
    let claimed = claim(&store, "w", 10, at(0)).await;
    for s in &claimed {
        let batch = CheckpointBatch {
            records: records(5, 0),
            ..Default::default()
        };
        assert!(checkpoint(&store, &aref(s), batch, at(1)).await);
    }
    let page = |id: &'static str| {
        let store = store.clone();
        async move {
            store
                .records_page(RecordsPage {
                    id: harvest::SessionKey::from(sid(id)),
                    offset: 0,
                    limit: 100,
                })
                .await
                .expect("records")
                .len()
        }
    };
    assert!(
        !remove_all_records(&store, "ab").await,
        "a RUNNING session keeps its records"
    );
    assert!(
        !remove_all_records(&store, "nope").await,
        "a missing session is no error"
    );
    assert_eq!(page("ab").await, 5);
    let ab = claimed.iter().find(|s| s.id.as_str() == "ab").unwrap();
    assert!(finish(&store, &aref(ab), SessionStatus::Completed, at(2)).await);
    assert!(remove_all_records(&store, "ab").await);
    assert_eq!(page("ab").await, 0, "the records are gone");
    assert_eq!(
        page("abc").await,
        5,
        "a session whose id extends it keeps its records"
    );
    let kept = get(&store, "ab").await;
    assert_eq!(kept.status, SessionStatus::Completed, "the session stays");
    assert_eq!(kept.cleanup_at, Some(at(2).add(Duration::from_secs(3600))));
    assert!(remove_all_records(&store, "ab").await, "idempotent");
    let expired = store
        .sessions_expire(SessionsExpire {
            now: at(2).add(Duration::from_secs(3600)),
            limit: 10,
        })
        .await
        .expect("expire");
    assert_eq!(
        ids(&expired),
        ["ab"],
        "and is removed at its timeout as usual"
    );
}

async fn lead(
    store: &Arc<dyn Store>,
    name: &str,
    owner: &str,
    ttl_secs: u64,
    now: Timestamp,
) -> bool {
    store
        .leader_acquire(LeaderAcquire {
            name: name.into(),
            owner: owner.into(),
            ttl: Duration::from_secs(ttl_secs),
            now,
        })
        .await
        .expect("leader_acquire")
}

/// One owner holds a leadership until its term expires; the holder renews it; another owner
/// takes over exactly at expiry; leaderships of different names are independent.
pub async fn leader_one_owner_until_expiry(store: Arc<dyn Store>) {
    assert!(
        lead(&store, "maintenance", "a", 10, at(100)).await,
        "first caller wins"
    );
    assert!(
        !lead(&store, "maintenance", "b", 10, at(105)).await,
        "b refused while a holds it"
    );
    assert!(
        lead(&store, "maintenance", "a", 10, at(108)).await,
        "holder renews (to 118)"
    );
    assert!(
        !lead(&store, "maintenance", "b", 10, at(117)).await,
        "renewal extended the term"
    );
    assert!(
        lead(&store, "other", "b", 10, at(117)).await,
        "another name is independent"
    );
    assert!(
        lead(&store, "maintenance", "b", 10, at(118)).await,
        "b wins at expiry"
    );
    assert!(
        !lead(&store, "maintenance", "a", 10, at(119)).await,
        "a lost it for good"
    );
    assert!(
        lead(&store, "maintenance", "b", 10, at(119)).await,
        "b renews"
    );
}

/// Owners racing for a free leadership: exactly one wins.
pub async fn leader_race_has_one_winner(store: Arc<dyn Store>) {
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            lead(&store, "race", &format!("owner-{i}"), 30, at(1)).await
        }));
    }
    let mut winners = 0;
    for t in tasks {
        if t.await.expect("racer") {
            winners += 1;
        }
    }
    assert_eq!(winners, 1, "exactly one of 8 racing owners leads");
}

/// The frontier URLs of a session, in position order.
async fn frontier_urls(store: &Arc<dyn Store>, id: &str) -> Vec<String> {
    store
        .frontier_page(FrontierPage {
            id: harvest::SessionKey::from(sid(id)),
            after_pos: 0,
            limit: 10_000,
        })
        .await
        .expect("frontier page")
        .into_iter()
        .map(|i| i.entry.url)
        .collect()
}

/// `seen_filter` of these URLs.
async fn seen(store: &Arc<dyn Store>, id: &str, urls: &[&str]) -> Vec<bool> {
    store
        .seen_filter(SeenFilter {
            id: harvest::SessionKey::from(sid(id)),
            urls: urls.iter().map(|u| u.to_string()).collect(),
        })
        .await
        .expect("seen filter")
}

/// Frontier positions increase in the order entries were added (across batches, and within one),
/// are never reused after removals (a reader continuing after its last position misses nothing
/// added since), pages continue after a position, a re-added URL keeps its place, and a URL added
/// and done in one batch never appears.
pub async fn frontier_pages_in_insertion_order_after_removals(store: Arc<dyn Store>) {
    insert(&store, session("a")).await;
    insert(&store, session("b")).await;
    let claimed = claim(&store, "w", 2, at(0)).await;
    let a = aref(
        claimed
            .iter()
            .find(|s| s.id.as_str() == "a")
            .expect("a claimed"),
    );
    let b = aref(
        claimed
            .iter()
            .find(|s| s.id.as_str() == "b")
            .expect("b claimed"),
    );
    let urls = |r: std::ops::Range<u32>| -> Vec<FrontierEntry> {
        r.map(|i| entry(&format!("http://x/{i:03}"))).collect()
    };
    // Reverse alphabetical within a batch: the order is the batch's, not the URLs'.
    let mut first = urls(0..5);
    first.reverse();
    let batch = CheckpointBatch {
        frontier_add: first,
        ..Default::default()
    };
    assert!(checkpoint(&store, &a, batch, at(1)).await);
    let other = CheckpointBatch {
        frontier_add: urls(100..103),
        seen_add: vec!["http://x/100".into()],
        ..Default::default()
    };
    assert!(checkpoint(&store, &b, other, at(1)).await);
    let page1 = store
        .frontier_page(FrontierPage {
            id: harvest::SessionKey::from(sid("a")),
            after_pos: 0,
            limit: 2,
        })
        .await
        .expect("page 1");
    assert_eq!(
        page1
            .iter()
            .map(|i| i.entry.url.as_str())
            .collect::<Vec<_>>(),
        ["http://x/004", "http://x/003"]
    );
    assert!(page1[0].pos > 0 && page1[0].pos < page1[1].pos);
    let cursor = page1[1].pos;
    // Remove the newest entry (the highest position), add more, re-add an existing URL, and
    // add-and-finish one in the same batch.
    let batch = CheckpointBatch {
        frontier_add: vec![
            entry("http://x/010"),
            entry("http://x/002"),
            entry("http://x/011"),
            entry("http://x/012"),
        ],
        frontier_done: vec!["http://x/000".into(), "http://x/011".into()],
        ..Default::default()
    };
    assert!(checkpoint(&store, &a, batch, at(2)).await);
    let rest = store
        .frontier_page(FrontierPage {
            id: harvest::SessionKey::from(sid("a")),
            after_pos: cursor,
            limit: 100,
        })
        .await
        .expect("rest");
    assert_eq!(
        rest.iter()
            .map(|i| i.entry.url.as_str())
            .collect::<Vec<_>>(),
        [
            "http://x/002",
            "http://x/001",
            "http://x/010",
            "http://x/012"
        ],
        "positions continue after the removed newest entry; a re-added URL keeps its place"
    );
    assert!(rest.windows(2).all(|w| w[0].pos < w[1].pos));
    assert!(rest[0].pos > cursor);
    assert_eq!(
        frontier_urls(&store, "a").await,
        [
            "http://x/004",
            "http://x/003",
            "http://x/002",
            "http://x/001",
            "http://x/010",
            "http://x/012"
        ]
    );
    assert_eq!(
        store
            .resume_load(&harvest::SessionKey::from(&sid("a")))
            .await
            .unwrap()
            .frontier_len,
        6
    );
    assert_eq!(
        frontier_urls(&store, "b").await,
        ["http://x/100", "http://x/101", "http://x/102"],
        "sessions do not share a frontier"
    );
    assert_eq!(seen(&store, "a", &["http://x/100"]).await, [false]);
    assert_eq!(seen(&store, "b", &["http://x/100"]).await, [true]);
    // A page after the last position is empty, and so is an unknown session's.
    let last = rest.last().map(|i| i.pos).unwrap_or(0);
    assert!(
        store
            .frontier_page(FrontierPage {
                id: harvest::SessionKey::from(sid("a")),
                after_pos: last,
                limit: 10,
            })
            .await
            .unwrap()
            .is_empty()
    );
    assert!(frontier_urls(&store, "nobody").await.is_empty());
    assert_eq!(seen(&store, "nobody", &["http://x/100"]).await, [false]);
    // Removal takes the frontier and the seen set with it.
    store
        .session_remove(&harvest::SessionKey::from(&sid("b")))
        .await
        .expect("remove");
    assert!(frontier_urls(&store, "b").await.is_empty());
    assert_eq!(seen(&store, "b", &["http://x/100"]).await, [false]);
}

/// Limits out of range are refused with `Invalid`; an empty filter gives an empty answer.
pub async fn frontier_page_and_seen_filter_validation(store: Arc<dyn Store>) {
    insert(&store, session("a")).await;
    for limit in [0, 10_001] {
        let r = store
            .frontier_page(FrontierPage {
                id: harvest::SessionKey::from(sid("a")),
                after_pos: 0,
                limit,
            })
            .await;
        assert!(
            matches!(r, Err(StoreError::Invalid(_))),
            "limit {limit}: {r:?}"
        );
    }
    let r = store
        .seen_filter(SeenFilter {
            id: harvest::SessionKey::from(sid("a")),
            urls: vec!["http://x/".into(); 10_001],
        })
        .await;
    assert!(matches!(r, Err(StoreError::Invalid(_))), "{r:?}");
    assert!(seen(&store, "a", &[]).await.is_empty());
}

/// A requeue (retryable failure, shutdown hand-back) of a session whose client asked to cancel
/// it ends it CANCELLED instead of queueing it to run again.
pub async fn requeue_of_a_cancel_requested_session_ends_cancelled(store: Arc<dyn Store>) {
    insert(&store, session("c")).await;
    let s = claim(&store, "w", 1, at(0)).await.remove(0);
    let out = store
        .session_cancel(SessionCancel {
            id: harvest::SessionKey::from(sid("c")),
            cleanup_after: Duration::from_secs(4999),
            now: at(1),
        })
        .await
        .expect("cancel");
    assert!(matches!(out, CancelOutcome::Requested(_)), "{out:?}");
    assert_eq!(
        requeue(&store, &aref(&s), false, at(2), at(2)).await,
        RequeueOutcome::Cancelled
    );
    let got = get(&store, "c").await;
    assert_eq!(got.status, SessionStatus::Cancelled);
    assert_eq!(got.lease, None);
    assert_eq!(got.cleanup_at, Some(at(2).add(Duration::from_secs(3600))));
    assert!(
        claim(&store, "w", 10, at(100)).await.is_empty(),
        "never claimed again"
    );
}

// ---------------------------------------------------------------------------------------------
// The state machine, field for field: every transition a store applies must leave exactly the
// session `harvest::session`'s transition functions compute (both backends then agree with each
// other). Each check names the transition it covers; `transition_case` maps every transition to
// its check with a match that has no wildcard, so a new transition without a case does not
// compile.

/// Compares two sessions field by field, naming the fields that differ.
fn assert_same(actual: &Session, expected: &Session, what: &str) {
    if actual == expected {
        return;
    }
    let a = format!("{actual:#?}");
    let e = format!("{expected:#?}");
    let diff: Vec<String> = a
        .lines()
        .zip(e.lines())
        .filter(|(x, y)| x != y)
        .map(|(x, y)| format!("  store:  {}\n  policy: {}", x.trim(), y.trim()))
        .collect();
    panic!(
        "{what}: the store's session differs from the state machine's:\n{}",
        diff.join("\n")
    );
}

/// Checks `got` (what the call returned) and the stored session against `expected`.
async fn assert_applied(store: &Arc<dyn Store>, got: &Session, expected: &Session, what: &str) {
    assert_same(got, expected, &format!("{what} (returned)"));
    let stored = get(store, expected.id.as_str()).await;
    assert_same(&stored, expected, &format!("{what} (stored)"));
}

const LEASE: Duration = Duration::from_secs(30);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

async fn claim_one(store: &Arc<dyn Store>, owner: &str, now: Timestamp) -> Session {
    let mut got = store
        .session_claim(SessionClaim {
            owner: owner.into(),
            limit: 1,
            lease: LEASE,
            now,
        })
        .await
        .expect("claim");
    assert_eq!(got.len(), 1, "one session claimed at {now}");
    got.remove(0)
}

/// A checkpoint of every kind of data: records, frontier, seen URLs, log, pages and usage.
fn full_batch(from: usize) -> CheckpointBatch {
    CheckpointBatch {
        records: records(3, from),
        frontier_add: vec![entry(&format!("http://x/{from}"))],
        seen_add: vec![format!("http://x/{from}")],
        pages: 2,
        usage: TokenUsage {
            http_requests: 3,
            http_errors: 1,
            bytes_received: 1000,
            retries: 1,
            robots_blocked: 0,
        },
        log: vec![line(from as u64)],
        ..Default::default()
    }
}

/// Insert: the stored session is the one submitted, with its seq.
pub async fn transition_insert_equals_policy(store: Arc<dyn Store>) {
    let mut s = session("a");
    s.client = ClientContext::builder()
        .client_id("c1")
        .metadata("tier", "gold")
        .build();
    s.options.priority = 3;
    s.options.session_timeout_secs = Some(60);
    let stored = insert(&store, s.clone()).await;
    let expected = Session {
        seq: stored.seq,
        ..s
    };
    assert_applied(&store, &stored, &expected, "insert").await;
}

/// Claim and heartbeat (the PostgreSQL claim is one SQL statement: it must agree).
pub async fn transition_claim_and_heartbeat_equal_policy(store: Arc<dyn Store>) {
    let before = insert(&store, session("a")).await;
    let claimed = claim_one(&store, "w1", at(1)).await;
    assert_applied(
        &store,
        &claimed,
        &before.claimed("w1", LEASE, at(1)),
        "claim",
    )
    .await;
    assert!(matches!(
        heartbeat(&store, &aref(&claimed), at(5)).await,
        HeartbeatOutcome::Renewed { .. }
    ));
    let expected = claimed.heartbeat(LEASE, at(5));
    assert_same(&get(&store, "a").await, &expected, "heartbeat (stored)");
}

/// Checkpoints, with data and empty (one SQL statement on PostgreSQL).
pub async fn transition_checkpoint_equals_policy(store: Arc<dyn Store>) {
    insert(&store, session("a")).await;
    let mut s = claim_one(&store, "w", at(1)).await;
    for (i, batch) in [full_batch(0), CheckpointBatch::default(), full_batch(3)]
        .into_iter()
        .enumerate()
    {
        let now = at(2 + i as i64);
        let expected = s.checkpointed(&batch.progress(), LEASE, now);
        let got = store
            .checkpoint_commit_if_running(CheckpointCommit {
                attempt: aref(&s),
                batch,
                lease: LEASE,
                now,
            })
            .await
            .expect("checkpoint")
            .expect("applied");
        assert_applied(&store, &got, &expected, &format!("checkpoint {i}")).await;
        s = got;
    }
}

/// Finish in each terminal status, with a last batch, by the default timeout and by the
/// session's own.
pub async fn transition_finish_equals_policy(store: Arc<dyn Store>) {
    for (i, status) in [
        SessionStatus::Completed,
        SessionStatus::Failed,
        SessionStatus::Cancelled,
    ]
    .into_iter()
    .enumerate()
    {
        let mut s = session(&format!("f{i}"));
        if i == 1 {
            s.options.session_timeout_secs = Some(77);
        }
        insert(&store, s).await;
        let claimed = claim_one(&store, "w", at(1)).await;
        let error = (status == SessionStatus::Failed)
            .then(|| SessionError::new("job_failed", "the job said no"));
        let batch = full_batch(i);
        let expected = claimed.finished(
            status,
            error.clone(),
            &batch.progress(),
            DEFAULT_TIMEOUT,
            at(9),
        );
        let got = store
            .session_finish_if_running(SessionFinish {
                attempt: aref(&claimed),
                status,
                error,
                batch,
                cleanup_after: DEFAULT_TIMEOUT,
                now: at(9),
            })
            .await
            .expect("finish")
            .expect("applied");
        assert_applied(&store, &got, &expected, &format!("finish {status}")).await;
    }
}

async fn requeue_with(
    store: &Arc<dyn Store>,
    s: &Session,
    spend: bool,
    error: Option<SessionError>,
    now: Timestamp,
) -> Session {
    let run_at = now.add(Duration::from_secs(5));
    let (expected, _) = s.requeued(spend, run_at, error.clone(), DEFAULT_TIMEOUT, now);
    let got = store
        .session_requeue_if_running(SessionRequeue {
            attempt: aref(s),
            spend_attempt: spend,
            run_at,
            error,
            cleanup_after: DEFAULT_TIMEOUT,
            now,
        })
        .await
        .expect("requeue")
        .expect("applied");
    assert_applied(store, &got, &expected, &format!("requeue at {now}")).await;
    got
}

/// Requeue: a failure, a hand-back without an error (which clears the last one: the drift where
/// sled kept it), attempts exhausted without an error (`attempts_exhausted`: the drift where sled
/// left none), and a requeue of a session a client asked to cancel.
pub async fn transition_requeue_equals_policy(store: Arc<dyn Store>) {
    let mut s = session("a");
    s.options.max_attempts = Some(2);
    insert(&store, s).await;
    let c1 = claim_one(&store, "w", at(1)).await;
    let boom = SessionError::new("job_failed", "boom");
    let p1 = requeue_with(&store, &c1, true, Some(boom), at(2)).await;
    assert_eq!(
        p1.error.as_ref().map(|e| e.kind.as_str()),
        Some("job_failed")
    );
    let c2 = claim_one(&store, "w", at(10)).await;
    let p2 = requeue_with(&store, &c2, false, None, at(11)).await;
    assert_eq!(
        p2.error, None,
        "a hand-back without an error clears the last one"
    );
    let c3 = claim_one(&store, "w", at(20)).await;
    let f = requeue_with(&store, &c3, true, None, at(21)).await;
    assert_eq!(f.status, SessionStatus::Failed);
    assert_eq!(
        f.error.as_ref().map(|e| e.kind.as_str()),
        Some("attempts_exhausted"),
        "exhausted without an error of its own"
    );

    insert(&store, session("b")).await;
    let c = claim_one(&store, "w", at(30)).await;
    store
        .session_cancel(SessionCancel {
            id: harvest::SessionKey::from(c.id.clone()),
            cleanup_after: DEFAULT_TIMEOUT,
            now: at(31),
        })
        .await
        .expect("cancel");
    let flagged = get(&store, "b").await;
    let x = requeue_with(&store, &flagged, true, None, at(32)).await;
    assert_eq!(x.status, SessionStatus::Cancelled);
}

/// Reclaim: without progress (an attempt spent; back to PENDING with `lease_expired`: the drift
/// where sled kept the previous error), with progress (free), exhausted (`attempts_exhausted`),
/// and cancel asked meanwhile (CANCELLED).
pub async fn transition_reclaim_equals_policy(store: Arc<dyn Store>) {
    let backoff = Duration::from_secs(10);
    let reclaim_at = |store: Arc<dyn Store>, now: Timestamp| async move {
        store
            .leases_reclaim(LeaseReclaim {
                expired_before: now,
                limit: 100,
                backoff,
                cleanup_after: DEFAULT_TIMEOUT,
                now,
            })
            .await
            .expect("reclaim")
    };
    for (id, max) in [("idle", 3), ("busy", 3), ("last", 1), ("cancelled", 3)] {
        let mut s = session(id);
        s.options.max_attempts = Some(max);
        // An error from an earlier attempt, which a reclaim must replace.
        s.error = Some(SessionError::new("job_failed", "earlier"));
        insert(&store, s).await;
    }
    let mut before = Vec::new();
    for _ in 0..4 {
        before.push(claim_one(&store, "w", at(1)).await);
    }
    let busy = before.iter().find(|s| s.id.as_str() == "busy").unwrap();
    let busy_after = store
        .checkpoint_commit_if_running(CheckpointCommit {
            attempt: aref(busy),
            batch: full_batch(0),
            lease: Duration::from_secs(1),
            now: at(2),
        })
        .await
        .expect("checkpoint")
        .expect("applied");
    store
        .session_cancel(SessionCancel {
            id: harvest::SessionKey::from(sid("cancelled")),
            cleanup_after: DEFAULT_TIMEOUT,
            now: at(3),
        })
        .await
        .expect("cancel");
    let now = at(100);
    let mut olds = Vec::new();
    for id in ["idle", "busy", "last", "cancelled"] {
        olds.push(if id == "busy" {
            busy_after.clone()
        } else {
            get(&store, id).await
        });
    }
    let reclaimed = reclaim_at(store.clone(), now).await;
    assert_eq!(reclaimed.len(), 4, "{reclaimed:?}");
    for old in olds {
        let (expected, outcome) = old.reclaimed(backoff, DEFAULT_TIMEOUT, now);
        let r = reclaimed
            .iter()
            .find(|r| r.id.id == old.id)
            .unwrap_or_else(|| panic!("{} reclaimed", old.id));
        assert_eq!((r.attempt, r.outcome), (old.attempt, outcome), "{}", old.id);
        assert_applied(
            &store,
            &r.session,
            &expected,
            &format!("reclaim of {}", old.id),
        )
        .await;
    }
    let idle = get(&store, "idle").await;
    assert_eq!(
        idle.error.as_ref().map(|e| e.kind.as_str()),
        Some("lease_expired"),
        "a reclaimed session says why it is PENDING again"
    );
    assert_eq!(
        get(&store, "last").await.error.map(|e| e.kind.to_string()),
        Some("attempts_exhausted".to_string())
    );
}

/// Cancel: PENDING (CANCELLED now), RUNNING (the flag), RUNNING again (nothing), terminal.
pub async fn transition_cancel_equals_policy(store: Arc<dyn Store>) {
    insert(&store, session("r")).await;
    let r = claim_one(&store, "w", at(1)).await;
    let mut p = session("p");
    p.options.session_timeout_secs = Some(50);
    let p = insert(&store, p).await;
    let cancel = |id: &str, now| SessionCancel {
        id: harvest::SessionKey::from(sid(id)),
        cleanup_after: DEFAULT_TIMEOUT,
        now,
    };
    let CancelDecision::Cancel(expected) = p.cancel(DEFAULT_TIMEOUT, at(2)) else {
        panic!("a pending session is cancelled at once");
    };
    match store
        .session_cancel(cancel("p", at(2)))
        .await
        .expect("cancel")
    {
        CancelOutcome::Cancelled(got) => {
            assert_applied(&store, &got, &expected, "cancel of a PENDING session").await
        }
        other => panic!("cancel of a PENDING session: {other:?}"),
    }
    let CancelDecision::Request(expected) = r.cancel(DEFAULT_TIMEOUT, at(3)) else {
        panic!("a running session gets the flag");
    };
    match store
        .session_cancel(cancel("r", at(3)))
        .await
        .expect("cancel")
    {
        CancelOutcome::Requested(got) => {
            assert_applied(&store, &got, &expected, "cancel of a RUNNING session").await
        }
        other => panic!("cancel of a RUNNING session: {other:?}"),
    }
    match store
        .session_cancel(cancel("r", at(4)))
        .await
        .expect("cancel")
    {
        CancelOutcome::Requested(got) => {
            assert_applied(&store, &got, &expected, "a second cancel changes nothing").await
        }
        other => panic!("a second cancel: {other:?}"),
    }
    let done = get(&store, "p").await;
    assert!(matches!(
        store.session_cancel(cancel("p", at(5))).await.expect("cancel"),
        CancelOutcome::AlreadyTerminal(s) if *s == done
    ));
}

/// Records removal keeps the session as it was; removal takes it; expiry takes exactly the
/// sessions `Session::cleanup_due` names.
pub async fn transition_removals_follow_policy(store: Arc<dyn Store>) {
    for id in ["done", "kept", "gone"] {
        let mut s = session(id);
        s.options.session_timeout_secs = Some(if id == "kept" { 1000 } else { 10 });
        insert(&store, s).await;
        let c = claim_one(&store, "w", at(1)).await;
        store
            .session_finish_if_running(SessionFinish {
                attempt: aref(&c),
                status: SessionStatus::Completed,
                error: None,
                batch: full_batch(0),
                cleanup_after: DEFAULT_TIMEOUT,
                now: at(2),
            })
            .await
            .expect("finish")
            .expect("applied");
    }
    let before = get(&store, "done").await;
    assert!(remove_all_records(&store, "done").await);
    let expected = Session {
        records_removed: before.records,
        ..before
    };
    assert_same(
        &get(&store, "done").await,
        &expected,
        "records removal keeps the session, saying how many records went",
    );
    let gone = get(&store, "gone").await;
    assert_eq!(
        store
            .session_remove(&harvest::SessionKey::from(&sid("gone")))
            .await
            .expect("remove"),
        Some(gone)
    );
    assert!(
        store
            .session_get(&harvest::SessionKey::from(&sid("gone")))
            .await
            .expect("get")
            .is_none()
    );
    let now = at(20);
    let mut expected = Vec::new();
    for id in ["done", "kept"] {
        if get(&store, id).await.cleanup_due(now) {
            expected.push(id.to_string());
        }
    }
    let expired: Vec<String> = store
        .sessions_expire(SessionsExpire { now, limit: 100 })
        .await
        .expect("expire")
        .iter()
        .map(|s| s.id.to_string())
        .collect();
    assert_eq!(expired, expected);
    assert_eq!(expired, ["done"]);
}

/// The check that covers each transition. No wildcard: a new transition must name its check
/// here before the suite compiles.
pub fn transition_case(t: Transition) -> &'static str {
    match t {
        Transition::Insert => "transition_insert_equals_policy",
        Transition::Claim | Transition::Heartbeat => "transition_claim_and_heartbeat_equal_policy",
        Transition::Checkpoint => "transition_checkpoint_equals_policy",
        Transition::Finish => "transition_finish_equals_policy",
        Transition::Requeue => "transition_requeue_equals_policy",
        Transition::Reclaim => "transition_reclaim_equals_policy",
        Transition::Cancel => "transition_cancel_equals_policy",
        Transition::RecordsRemove | Transition::Remove | Transition::Expire => {
            "transition_removals_follow_policy"
        }
    }
}

/// `resume_load` of a session that is gone is refused, on every backend alike (PostgreSQL
/// answered an empty state).
pub async fn resume_of_a_removed_session_is_refused(store: Arc<dyn Store>) {
    let r = store
        .resume_load(&harvest::SessionKey::from(&sid("never")))
        .await;
    assert!(matches!(r, Err(StoreError::Invalid(_))), "{r:?}");
}

/// Every transition names a check of this suite, and that check is in the suite's list: a
/// transition without a conformance case fails here (and does not compile without a name).
#[test]
fn every_transition_has_a_conformance_case() {
    let source = include_str!("store_conformance.rs");
    let list = &source[source.find("store_conformance!(@each").expect("the list")..];
    let list = &list[..list.find(");").expect("its end")];
    for t in Transition::ALL {
        let case = transition_case(t);
        assert!(
            list.contains(&format!("{case},")),
            "{t:?}'s case {case} is not in the suite's list"
        );
        assert!(
            source.contains(&format!("pub async fn {case}(")),
            "{t:?}'s case {case} is not defined"
        );
    }
}
