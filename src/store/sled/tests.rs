//! Unit tests of the sled store's chunked records and frontier and its lazily built seen index.

use std::time::Duration;

use super::SledStore;
use super::frontier::UrlState;
use super::keys::{data_prefix, k_chunk, k_url};
use crate::session::SessionStatus;
use crate::session::{FrontierEntry, Session, SessionId, SessionKey, Timestamp};
use crate::store::{
    AttemptRef, CancelOutcome, CheckpointBatch, CheckpointCommit, FRONTIER_PAGE_MAX, FrontierDone,
    FrontierPage, RecordsPage, SeenFilter, SessionCancel, SessionClaim, SessionFinish,
    SessionInsert, SessionRequeue, Store, StoreError, codec,
};

/// Inserts a PENDING session, due now.
async fn pending(store: &SledStore) -> SessionId {
    let now = Timestamp::now();
    let id = SessionId::generate();
    let session = Session::pending(
        id.clone(),
        crate::session::ClientContext::of("t"),
        crate::session::JobSpec {
            config: serde_json::json!({}).into(),
            params: Default::default(),
            agent: None,
        },
        Default::default(),
        now,
    );
    store
        .session_insert(SessionInsert {
            session,
            single_agent: None,
        })
        .await
        .expect("insert");
    id
}

/// Inserts a session and claims it: the oldest due session must be this one.
async fn running(store: &SledStore) -> AttemptRef {
    let now = Timestamp::now();
    let id = pending(store).await;
    let claimed = store
        .session_claim(SessionClaim {
            owner: "t".into(),
            limit: 1,
            lease: Duration::from_secs(600),
            now,
        })
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    AttemptRef {
        id: id.into(),
        attempt: claimed[0].attempt,
        owner: "t".into(),
    }
}

async fn checkpoint(store: &SledStore, a: &AttemptRef, batch: CheckpointBatch) {
    let ok = store
        .checkpoint_commit_if_running(CheckpointCommit {
            attempt: a.clone(),
            batch,
            lease: Duration::from_secs(600),
            now: Timestamp::now(),
        })
        .await
        .expect("checkpoint");
    assert!(ok.is_some(), "checkpoint applied");
}

/// Every session, newest first (a test store holds fewer than 10).
async fn list_all(store: &SledStore) -> Vec<Session> {
    store
        .session_list(crate::store::SessionList {
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("list")
        .sessions
}

fn claim_one(now: Timestamp) -> SessionClaim {
    SessionClaim {
        owner: "t".into(),
        limit: 1,
        lease: Duration::from_secs(600),
        now,
    }
}

/// A claim prepares its sessions before it takes the lock, and takes a prepared one only if it
/// is still stored as it was read. Here another claimer takes the session and hands it back, due
/// at the same time, in between: its queue key is the one prepared, its value is not, and the
/// claim must start the session's next attempt, not a copy of the first.
#[tokio::test]
async fn a_claim_stages_again_a_session_that_changed_after_it_was_prepared() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path()).expect("open");
    let key: SessionKey = pending(&store).await.into();
    let run_at = store
        .session_get(&key)
        .await
        .expect("get")
        .expect("stored")
        .run_at;
    let now = Timestamp::now();
    let prepared = store.prepare_claims(&claim_one(now));
    assert_eq!(prepared.len(), 1, "the session was prepared");

    let first = store.session_claim(claim_one(now)).await.expect("claim");
    assert_eq!(first.len(), 1);
    let handed_back = store
        .session_requeue_if_running(SessionRequeue {
            attempt: AttemptRef {
                id: key.clone(),
                attempt: first[0].attempt,
                owner: "t".into(),
            },
            spend_attempt: false,
            run_at,
            error: None,
            cleanup_after: Duration::from_secs(60),
            now,
        })
        .await
        .expect("requeue")
        .expect("requeued");
    assert_eq!(handed_back.status, SessionStatus::Pending);

    let second = store
        .claim_prepared(claim_one(now), prepared)
        .expect("claim");
    assert_eq!(second.len(), 1, "the session is due again");
    assert!(second[0].attempt > first[0].attempt, "a new attempt");
    let stored = store.session_get(&key).await.expect("get").expect("stored");
    assert_eq!(stored.status, SessionStatus::Running);
    assert_eq!(stored.attempt, second[0].attempt);
    assert_eq!(stored.attempts.len(), 2, "both attempts are in its history");
}

/// A finish is prepared before it takes the lock; a cancel asked in between must survive it.
#[tokio::test]
async fn a_finish_keeps_a_cancel_request_made_after_it_was_prepared() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path()).expect("open");
    let a = running(&store).await;
    let finish = SessionFinish {
        attempt: a.clone(),
        status: SessionStatus::Completed,
        error: None,
        batch: CheckpointBatch::default(),
        cleanup_after: Duration::from_secs(60),
        now: Timestamp::now(),
    };
    let ready = store.prepare_finishes(std::slice::from_ref(&finish));
    assert!(
        matches!(ready[..], [Ok(Some(_))]),
        "the finish was prepared"
    );

    let asked = store
        .session_cancel(SessionCancel {
            id: a.id.clone(),
            cleanup_after: Duration::from_secs(60),
            now: Timestamp::now(),
        })
        .await
        .expect("cancel");
    assert!(matches!(asked, CancelOutcome::Requested(_)), "{asked:?}");

    let out = store
        .finish_prepared(std::slice::from_ref(&finish), ready)
        .await
        .expect("finish");
    let ended = match &out[..] {
        [Ok(Some(s))] => s,
        other => panic!("the finish applies: {other:?}"),
    };
    assert!(ended.cancel_requested);
    let stored = store
        .session_get(&a.id)
        .await
        .expect("get")
        .expect("stored");
    assert_eq!(stored.status, SessionStatus::Completed);
    assert!(stored.cancel_requested, "the request is kept");
}

/// A listing of every session merges the streams of `T`'s codes, and each stream reads the tree
/// when the merge first gets to it: a session that ends while a listing runs can be read under
/// its RUNNING code by one stream and under its terminal code by another (CI saw a session
/// listed twice). Both keys present is that state: the session is listed once.
#[tokio::test]
async fn a_session_read_under_two_status_codes_is_listed_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path()).expect("open");
    let key: SessionKey = pending(&store).await.into();
    let other: SessionKey = pending(&store).await.into();
    let s = store.session_get(&key).await.expect("get").expect("stored");
    let mut ended = s.clone();
    ended.status = SessionStatus::Completed;
    store
        .db
        .insert(super::keys::k_status(&ended), sled::IVec::default())
        .expect("insert");
    let listed = list_all(&store).await;
    let ids: Vec<&SessionId> = listed.iter().map(|s| &s.id).collect();
    assert_eq!(ids, [&other.id, &key.id], "newest first, each once");
}

/// Records span several chunks; a chunk a crashed checkpoint left after the committed count
/// is never shown and never overlaps the next checkpoint's records.
#[tokio::test]
async fn record_chunks_page_across_boundaries_and_ignore_a_crashed_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path()).expect("open");
    let a = running(&store).await;
    let recs = |r: std::ops::Range<u64>| -> Vec<serde_json::Value> {
        r.map(|i| serde_json::json!({ "i": i })).collect()
    };
    let batch = CheckpointBatch {
        records: recs(0..600),
        ..Default::default()
    };
    checkpoint(&store, &a, batch).await;
    // A crashed checkpoint's chunks after the committed count (600).
    for first in [600u64, 700] {
        let junk: Vec<String> = (0..150).map(|_| "\"junk\"".to_string()).collect();
        store
            .db
            .insert(
                k_chunk(b'E', &a.id, first),
                codec::encode(&junk).expect("enc"),
            )
            .expect("insert");
    }
    let page = |offset, limit| RecordsPage {
        id: a.id.clone(),
        offset,
        limit,
    };
    let seen = store.records_page(page(590, 100)).await.expect("page");
    assert_eq!(seen.len(), 10, "nothing after the committed count");
    let batch = CheckpointBatch {
        records: recs(600..610),
        ..Default::default()
    };
    checkpoint(&store, &a, batch).await;
    for (offset, limit) in [
        (0, 1000),
        (0, 7),
        (250, 20),
        (255, 2),
        (256, 300),
        (599, 50),
    ] {
        let got = store.records_page(page(offset, limit)).await.expect("page");
        let want: Vec<u64> = (offset..610).take(limit).collect();
        let seqs: Vec<u64> = got.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, want, "offset {offset} limit {limit}");
        for r in &got {
            assert_eq!(
                r.data,
                serde_json::json!({ "i": r.seq }),
                "record {}",
                r.seq
            );
        }
    }
    assert!(
        store
            .records_page(page(610, 10))
            .await
            .expect("page")
            .is_empty()
    );
}

/// Frontier entries span several chunks; done entries leave their chunk (a chunk with none
/// left goes), pages continue after the last position, and the count is of live entries.
#[tokio::test]
async fn frontier_chunks_page_in_order_and_drop_done_entries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path()).expect("open");
    let a = running(&store).await;
    let url = |i: usize| format!("http://x/{i:05}");
    let entry = |i: usize| FrontierEntry {
        url: url(i),
        depth: 1,
        page: None,
    };
    let batch = CheckpointBatch {
        frontier_add: (0..1100).map(entry).collect(),
        seen_add: (0..1100).map(url).collect(),
        ..Default::default()
    };
    checkpoint(&store, &a, batch).await;
    // All of the first chunk, every other one of the second, one of the third; and one
    // added and done in the same batch.
    let mut done: Vec<String> = (0..512).map(url).collect();
    done.extend((512..1024).step_by(2).map(url));
    done.push(url(1099));
    done.push(url(5000));
    let batch = CheckpointBatch {
        frontier_add: vec![entry(5000), entry(5001), entry(3)],
        frontier_done: done.into_iter().map(Into::into).collect(),
        ..Default::default()
    };
    checkpoint(&store, &a, batch).await;
    let mut want: Vec<String> = (513..1024).step_by(2).map(url).collect();
    want.extend((1024..1099).map(url));
    // url(3) was still in the frontier when added again (additions come first): it kept its
    // place, then was done.
    want.push(url(5001));
    let resume = store.resume_sync(&a.id).expect("resume");
    assert_eq!(resume.frontier_len, want.len() as u64);
    assert!(
        store
            .db
            .get(k_chunk(b'B', &a.id, 1))
            .expect("get")
            .is_none(),
        "a chunk with nothing left is removed"
    );
    let mut got = Vec::new();
    let mut after = 0;
    for _ in 0..100 {
        let items = store
            .frontier_page(FrontierPage {
                id: a.id.clone(),
                after_pos: after,
                limit: 37,
            })
            .await
            .expect("page");
        let Some(last) = items.last() else { break };
        assert!(last.pos > after);
        after = last.pos;
        got.extend(items.into_iter().map(|i| i.entry.url));
    }
    assert_eq!(got, want);
    let seen = store
        .seen_filter(SeenFilter {
            id: a.id.clone(),
            urls: vec![url(0), url(5000), url(9999)],
        })
        .await
        .expect("seen");
    assert_eq!(
        seen,
        vec![true, false, false],
        "frontier_add alone is not seen_add"
    );
}

fn url(i: usize) -> String {
    format!("http://x/{i:05}")
}

/// A batch adding `url(i)` for each `i` as new (frontier and seen set), as the engine does.
fn new_urls(range: std::ops::Range<usize>) -> CheckpointBatch {
    CheckpointBatch {
        frontier_add: range.clone().map(|i| entry(&url(i))).collect(),
        seen_add: range.map(url).collect(),
        ..Default::default()
    }
}

fn keys_under(store: &SledStore, tag: u8, id: &SessionKey) -> usize {
    store.db.scan_prefix(data_prefix(tag, id)).count()
}

async fn seen(store: &SledStore, id: &SessionKey, urls: Vec<String>) -> Vec<bool> {
    store
        .seen_filter(SeenFilter {
            id: id.clone(),
            urls,
        })
        .await
        .expect("seen")
}

async fn frontier_urls(store: &SledStore, id: &SessionKey) -> Vec<String> {
    let items = store
        .frontier_page(FrontierPage {
            id: id.clone(),
            after_pos: 0,
            limit: FRONTIER_PAGE_MAX,
        })
        .await
        .expect("page");
    items.into_iter().map(|i| i.entry.url).collect()
}

/// New URLs (in both `frontier_add` and `seen_add`, as the engine sends them) write no `U`
/// key at commit; the first seen-set lookup indexes them from their chunks, chunks all done
/// are kept until then and removed after, and the index survives a reopen.
#[tokio::test]
async fn the_seen_index_is_built_from_the_chunks_when_first_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let id = {
        let store = SledStore::open(dir.path()).expect("open");
        let a = running(&store).await;
        let resume = store.resume_sync(&a.id).expect("resume");
        assert_eq!(resume.frontier_next, 1, "positions start at 1");
        checkpoint(&store, &a, new_urls(0..1100)).await;
        assert_eq!(keys_under(&store, b'U', &a.id), 0, "no U key at commit");
        assert_eq!(
            store.resume_sync(&a.id).expect("resume").frontier_next,
            1101
        );
        // The whole first chunk done, by position.
        checkpoint(
            &store,
            &a,
            CheckpointBatch {
                frontier_done: (0..512)
                    .map(|i| FrontierDone {
                        url: url(i),
                        pos: Some(i as u64 + 1),
                    })
                    .collect(),
                ..Default::default()
            },
        )
        .await;
        assert!(
            store
                .db
                .get(k_chunk(b'B', &a.id, 1))
                .expect("get")
                .is_some(),
            "a chunk all done but not indexed stays: it holds seen URLs"
        );
        assert_eq!(store.resume_sync(&a.id).expect("resume").frontier_len, 588);
        assert_eq!(frontier_urls(&store, &a.id).await.first(), Some(&url(512)));
        let got = seen(&store, &a.id, vec![url(0), url(511), url(1099), url(1100)]).await;
        assert_eq!(got, vec![true, true, true, false]);
        assert_eq!(
            keys_under(&store, b'U', &a.id),
            1100,
            "indexed on first read"
        );
        assert!(
            store
                .db
                .get(k_chunk(b'B', &a.id, 1))
                .expect("get")
                .is_none(),
            "an indexed chunk all done goes"
        );
        a.id
    };
    let store = SledStore::open(dir.path()).expect("reopen");
    let got = seen(&store, &id, vec![url(3), url(700), url(2000)]).await;
    assert_eq!(got, vec![true, true, false]);
    assert_eq!(store.resume_sync(&id).expect("resume").frontier_len, 588);
}

fn entry(url: &str) -> FrontierEntry {
    FrontierEntry {
        url: url.into(),
        depth: 1,
        page: None,
    }
}

/// A done URL whose position hint is wrong, missing or out of range is found by its URL.
#[tokio::test]
async fn wrong_position_hints_fall_back_to_the_url() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path()).expect("open");
    let a = running(&store).await;
    checkpoint(&store, &a, new_urls(0..10)).await;
    let hint = |i: usize, pos: Option<u64>| FrontierDone { url: url(i), pos };
    checkpoint(
        &store,
        &a,
        CheckpointBatch {
            // url(10) and url(11) are new here (positions 11, 12).
            frontier_add: vec![entry(&url(10)), entry(&url(11))],
            seen_add: vec![url(10), url(11)],
            frontier_done: vec![
                hint(0, Some(2)),         // points at url(1)
                hint(2, None),            // no hint
                hint(4, Some(99)),        // beyond every chunk
                hint(6, Some(7)),         // right
                hint(10, Some(12)),       // this batch's, points at url(11)
                hint(11, Some(u64::MAX)), // nonsense
            ],
            ..Default::default()
        },
    )
    .await;
    let want: Vec<String> = [1, 3, 5, 7, 8, 9].into_iter().map(url).collect();
    assert_eq!(frontier_urls(&store, &a.id).await, want);
}

/// An addition not in `seen_add` is looked up, including among URLs not yet indexed: one
/// still in the frontier keeps its place.
#[tokio::test]
async fn an_addition_already_in_the_unindexed_frontier_keeps_its_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path()).expect("open");
    let a = running(&store).await;
    checkpoint(
        &store,
        &a,
        CheckpointBatch {
            frontier_add: vec![entry("http://x/a"), entry("http://x/b")],
            seen_add: vec!["http://x/a".into(), "http://x/b".into()],
            ..Default::default()
        },
    )
    .await;
    checkpoint(
        &store,
        &a,
        CheckpointBatch {
            frontier_add: vec![entry("http://x/a"), entry("http://x/c")],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        frontier_urls(&store, &a.id).await,
        vec!["http://x/a", "http://x/b", "http://x/c"]
    );
    let got = seen(
        &store,
        &a.id,
        vec!["http://x/a".into(), "http://x/c".into()],
    )
    .await;
    assert_eq!(got, vec![true, false], "c was added, never seen");
}

/// A catch-up cut short (a crash between its steps, or within one after some `U` keys) is
/// finished by the next one, with the same result.
#[tokio::test]
async fn an_interrupted_catch_up_is_finished_by_the_next() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path()).expect("open");
    let a = running(&store).await;
    checkpoint(&store, &a, new_urls(0..2000)).await;
    {
        let _st = store.lock();
        assert!(
            !store.index_step(&a.id, 1).expect("step"),
            "one chunk of four"
        );
    }
    assert_eq!(keys_under(&store, b'U', &a.id), 512);
    // As if a step had written some `U` keys and died before moving `I`.
    store
        .db
        .insert(
            k_url(b'U', &a.id, &url(600)),
            UrlState {
                seen: true,
                pos: Some(601),
            }
            .encode()
            .expect("value"),
        )
        .expect("insert");
    let all: Vec<String> = (0..2000).map(url).collect();
    for part in all.chunks(FRONTIER_PAGE_MAX) {
        assert!(seen(&store, &a.id, part.to_vec()).await.iter().all(|s| *s));
    }
    assert_eq!(keys_under(&store, b'U', &a.id), 2000);
    let v = store
        .db
        .get(k_url(b'U', &a.id, &url(1999)))
        .expect("get")
        .expect("indexed");
    assert_eq!(
        UrlState::decode(b"U", &v).expect("decode").pos,
        Some(2000),
        "the position of its entry"
    );
}

/// A position hint naming an entry of the URL that is done already does not stop the
/// removal: the URL's live entry elsewhere (re-added after it was done) is found by its URL.
#[tokio::test]
async fn a_hint_at_a_done_entry_falls_back_to_the_live_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path()).expect("open");
    let a = running(&store).await;
    let u = "http://x/u";
    let add = |urls: &[&str]| CheckpointBatch {
        frontier_add: urls.iter().map(|u| entry(u)).collect(),
        ..Default::default()
    };
    checkpoint(&store, &a, add(&[u, "http://x/v"])).await; // u at 1
    let done_at = |pos| CheckpointBatch {
        frontier_done: vec![FrontierDone {
            url: u.into(),
            pos: Some(pos),
        }],
        ..Default::default()
    };
    checkpoint(&store, &a, done_at(1)).await;
    checkpoint(&store, &a, add(&[u])).await; // again, at 3
    assert_eq!(frontier_urls(&store, &a.id).await, vec!["http://x/v", u]);
    checkpoint(&store, &a, done_at(1)).await; // a stale hint
    assert_eq!(frontier_urls(&store, &a.id).await, vec!["http://x/v"]);
}

/// The key `k` of session `id` (tenant "") as layout 2 wrote it: `lp("") id` was `id`, and
/// `tag lp("") lp(id)` was `tag lp(id)`. Written from the byte pattern, not from the migration's
/// parser, so that a mistake in one is not repeated in the other.
fn layout2_key(k: &[u8], id: &str) -> Vec<u8> {
    let mut lp_id = (id.len() as u32).to_be_bytes().to_vec();
    lp_id.extend_from_slice(id.as_bytes());
    let mut data = vec![0u8; 4];
    data.extend_from_slice(&lp_id);
    if k.get(1..1 + data.len()) == Some(&data[..]) {
        let mut out = vec![k[0]];
        out.extend_from_slice(&k[5..]);
        return out;
    }
    let mut tail = vec![0u8; 4];
    tail.extend_from_slice(id.as_bytes());
    if k.ends_with(&tail) {
        return [&k[..k.len() - tail.len()], id.as_bytes()].concat();
    }
    k.to_vec()
}

/// A store written in layout 2 (ids not scoped to a tenant) opens with every session, record and
/// log line found in the single namespace, also when an earlier open's migration was killed
/// part-way.
#[tokio::test]
async fn a_layout_2_store_is_migrated_at_open_even_after_an_interrupted_migration() {
    for interrupted in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ids = Vec::new();
        {
            let store = SledStore::open(dir.path()).expect("open");
            for n in 0..3u64 {
                let a = running(&store).await;
                let batch = CheckpointBatch {
                    records: (0..300 + n)
                        .map(|i| serde_json::json!({ "i": i }))
                        .collect(),
                    log: vec![crate::session::LogLine {
                        at: Timestamp::now(),
                        level: "info".into(),
                        message: format!("line of {n}"),
                    }],
                    ..Default::default()
                };
                checkpoint(&store, &a, batch).await;
                ids.push(a.id.id.clone());
            }
            store.close().await.expect("close");
        }
        // Rewrite every key to layout 2.
        {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let db = loop {
                match sled::open(dir.path()) {
                    Ok(db) => break db,
                    Err(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => panic!("raw open: {e}"),
                }
            };
            let keys: Vec<(sled::IVec, sled::IVec)> = db.iter().map(|kv| kv.expect("kv")).collect();
            let mut moved = 0;
            for (k, v) in keys {
                let mut old = k.to_vec();
                for id in &ids {
                    old = layout2_key(&old, id.as_str());
                }
                if old != k.to_vec() {
                    db.remove(&k).expect("remove");
                    db.insert(old, v).expect("insert");
                    moved += 1;
                }
            }
            assert!(moved > 12, "session keys rewritten: {moved}");
            db.insert(super::META_KEY, codec::encode(&2u32).expect("enc"))
                .expect("meta");
            if interrupted {
                // A first migration moved some keys, then died before marking the layout.
                let some: Vec<sled::IVec> = db
                    .iter()
                    .map(|kv| kv.expect("kv").0)
                    .filter(|k| super::migrate::upgraded(k).is_some())
                    .step_by(2)
                    .collect();
                assert!(!some.is_empty());
                for k in some {
                    let v = db.get(&k).expect("get").expect("value");
                    db.insert(super::migrate::upgraded(&k).expect("old"), v)
                        .expect("insert");
                    db.remove(&k).expect("remove");
                }
            }
            db.flush().expect("flush");
        }
        // A dropped sled db lets go of its lock only when its background flusher has stopped,
        // a moment later on a loaded machine: retry as a restarted process would (bounded).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let store = loop {
            match SledStore::open(dir.path()) {
                Ok(s) => break s,
                Err(StoreError::InUse { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("reopen: {e:?}"),
            }
        };
        assert_eq!(layout(&store), super::LAYOUT_VERSION);
        for (n, id) in ids.iter().enumerate() {
            let key = SessionKey::single(id.clone());
            let s = store.session_get(&key).await.expect("get").expect("found");
            assert_eq!(s.records, 300 + n as u64);
            let records = store
                .records_page(RecordsPage {
                    id: key.clone(),
                    offset: 0,
                    limit: 1000,
                })
                .await
                .expect("records");
            assert_eq!(records.len(), 300 + n);
            let log = store.log_tail(&key, 10).await.expect("log");
            assert_eq!(log.len(), 1);
            assert_eq!(log[0].message, format!("line of {n}"));
        }
        assert_eq!(list_all(&store).await.len(), 3);
        // No key of the old layout is left.
        let left = store
            .db
            .iter()
            .filter(|kv| super::migrate::upgraded(&kv.as_ref().expect("kv").0).is_some())
            .count();
        assert_eq!(left, 0);
    }
}

/// The layout version the store has marked.
fn layout(store: &SledStore) -> u32 {
    codec::decode(
        &|| "meta".into(),
        &store.db.get(super::META_KEY).expect("get").expect("meta"),
    )
    .expect("meta")
}

/// Opens the store in `dir`, waiting (bounded) for a dropped store's sled to let go of its lock.
fn reopen(dir: &std::path::Path) -> SledStore {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match SledStore::open(dir) {
            Ok(s) => break s,
            Err(StoreError::InUse { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("reopen: {e:?}"),
        }
    }
}

/// The sessions `leases_reclaim` finds with every lease taken as expired.
async fn reclaim_all(store: &SledStore) -> Vec<SessionKey> {
    let mut ids: Vec<SessionKey> = store
        .leases_reclaim(crate::store::LeaseReclaim {
            expired_before: Timestamp(i64::MAX),
            limit: 100,
            backoff: Duration::ZERO,
            cleanup_after: Duration::from_secs(60),
            now: Timestamp::now(),
        })
        .await
        .expect("reclaim")
        .into_iter()
        .map(|r| r.id)
        .collect();
    ids.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
    ids
}

/// `leases_reclaim` reads the expired part of the lease index in place: entries left by
/// sessions that no longer hold their lease are dropped on the way without counting against the
/// limit, and every expired session is reclaimed once over calls of `limit` each.
#[tokio::test]
async fn reclaiming_drops_stale_lease_entries_and_stops_at_its_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path()).expect("open");
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(running(&store).await.id);
    }
    // Seven stale entries that sort first (expired at 1..=7 ns): sessions that do not exist.
    for t in 1..=7 {
        let gone = SessionKey::new(None, SessionId::generate());
        store
            .leases()
            .insert(super::keys::k_lease(Timestamp(t), &gone));
    }
    let reclaim = || {
        store.leases_reclaim(crate::store::LeaseReclaim {
            expired_before: Timestamp(i64::MAX),
            limit: 2,
            backoff: Duration::ZERO,
            cleanup_after: Duration::from_secs(60),
            now: Timestamp::now(),
        })
    };
    let mut found = Vec::new();
    for want in [2, 2, 1, 0] {
        let got = reclaim().await.expect("reclaim");
        assert_eq!(got.len(), want, "a call reclaims up to its limit");
        found.extend(got.into_iter().map(|r| r.id));
    }
    assert_eq!(
        store.leases().len(),
        0,
        "stale entries dropped, reclaimed leases gone"
    );
    found.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
    ids.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
    assert_eq!(found, ids, "each expired session reclaimed once");
}

/// Layout 4 keeps the lease index in memory: no `L` key is written, and a store reopened with
/// RUNNING sessions (a process that died) rebuilds the index from them, so the recovery at open
/// finds every one. A layout-3 store's `L` keys are removed at open.
#[tokio::test]
async fn the_lease_index_is_rebuilt_at_open_and_old_lease_keys_are_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ids = Vec::new();
    {
        let store = SledStore::open(dir.path()).expect("open");
        for _ in 0..3 {
            ids.push(running(&store).await.id);
        }
        assert_eq!(store.db.scan_prefix(b"L").count(), 0, "no L key in sled");
        store.close().await.expect("close");
    }
    ids.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
    // Layout 3 kept `L` expires_at id in sled: write one as it would have, and mark the store 3.
    {
        let store = reopen(dir.path());
        let stale = super::keys::k_lease(Timestamp(5), &ids[0]);
        store.db.insert(stale, Vec::new()).expect("insert");
        store
            .db
            .insert(super::META_KEY, codec::encode(&3u32).expect("enc"))
            .expect("meta");
        store.db.flush().expect("flush");
        store.close().await.expect("close");
    }
    let store = reopen(dir.path());
    assert_eq!(
        store.db.scan_prefix(b"L").count(),
        0,
        "the old L keys are gone"
    );
    assert_eq!(layout(&store), super::LAYOUT_VERSION);
    assert_eq!(
        reclaim_all(&store).await,
        ids,
        "every RUNNING session found"
    );
    assert!(
        reclaim_all(&store).await.is_empty(),
        "and taken off the index"
    );
}

/// Layout 5: a RUNNING session keeps PENDING's `T` key and there is no `G` index. A layout-4
/// store (RUNNING `T` keys under their own code, a `G` key per session) has them moved and
/// removed at open, its count of RUNNING sessions (which the open now depends on) recounted, then
/// lists every session newest first, lists its RUNNING ones, and finds them at open among a
/// PENDING backlog, so their recovery reclaims each.
#[tokio::test]
async fn a_layout_4_store_is_upgraded_and_its_running_sessions_are_found_at_open() {
    use super::keys::{id_after, kb, newest, t_code};
    use crate::session::SessionStatus;
    use crate::store::SessionList;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut running_ids = Vec::new();
    {
        let store = SledStore::open(dir.path()).expect("open");
        for _ in 0..3 {
            running_ids.push(running(&store).await.id);
        }
        for _ in 0..5 {
            pending(&store).await;
        }
        assert_eq!(store.db.scan_prefix(b"G").count(), 0, "no G key");
        let running_code = [b'T', SessionStatus::Running.code()];
        assert_eq!(store.db.scan_prefix(running_code).count(), 0);
        assert_eq!(store.db.scan_prefix(b"T").count(), 8, "one T key a session");
        store.close().await.expect("close");
    }
    running_ids.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
    // Rewrite the keys as layout 4 had them, and mark the store 4.
    {
        let store = reopen(dir.path());
        assert_eq!(store.leases().len(), 3, "found behind the PENDING ones");
        let active = [b'T', t_code(SessionStatus::Pending)];
        let keys: Vec<sled::IVec> = store
            .db
            .scan_prefix(active)
            .map(|kv| kv.expect("scan").0)
            .collect();
        for k in keys {
            let s = store
                .load(&id_after(&k, 10).expect("id"))
                .expect("load")
                .expect("session");
            let mut g = vec![b'G'];
            g.extend_from_slice(&newest(s.seq));
            g.extend_from_slice(&kb(&s.key()));
            store.db.insert(g, Vec::new()).expect("G");
            if s.status == SessionStatus::Running {
                let mut old = k.to_vec();
                old[1] = SessionStatus::Running.code();
                store.db.remove(&k).expect("remove");
                store.db.insert(old, Vec::new()).expect("T");
            }
        }
        // A RUNNING count that no layout-4 open depended on, and that is wrong: the upgrade
        // recounts.
        let mut c: super::Counters = codec::decode(
            &|| "counters".into(),
            &store
                .db
                .get(super::COUNTERS_KEY)
                .expect("get")
                .expect("counters"),
        )
        .expect("counters");
        assert_eq!(c.by_status[SessionStatus::Running.code() as usize], 3);
        c.by_status[SessionStatus::Running.code() as usize] = 1;
        store
            .db
            .insert(super::COUNTERS_KEY, codec::encode(&c).expect("enc"))
            .expect("counters");
        store
            .db
            .insert(super::META_KEY, codec::encode(&4u32).expect("enc"))
            .expect("meta");
        store.db.flush().expect("flush");
        store.close().await.expect("close");
    }
    let store = reopen(dir.path());
    assert_eq!(layout(&store), super::LAYOUT_VERSION);
    assert_eq!(
        store.lock().by_status[SessionStatus::Running.code() as usize],
        3,
        "recounted"
    );
    assert_eq!(store.leases().len(), 3, "every RUNNING one found");
    assert_eq!(store.db.scan_prefix(b"G").count(), 0, "G removed");
    let running_code = [b'T', SessionStatus::Running.code()];
    assert_eq!(store.db.scan_prefix(running_code).count(), 0, "T moved");
    let list = |status, limit, cursor| SessionList {
        client_id: None,
        status,
        agent: None,
        limit,
        cursor,
    };
    let mut seqs = Vec::new();
    let mut cursor = None;
    for _ in 0..10 {
        let page = store.list_sync(&list(None, 3, cursor)).expect("list");
        seqs.extend(page.sessions.iter().map(|s| s.seq));
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(seqs, (1..=8).rev().collect::<Vec<u64>>(), "every session");
    let page = store
        .list_sync(&list(Some(SessionStatus::Running), 2, None))
        .expect("list");
    assert_eq!(
        page.sessions.iter().map(|s| s.seq).collect::<Vec<_>>(),
        [3, 2]
    );
    let rest = store
        .list_sync(&list(Some(SessionStatus::Running), 2, page.next_cursor))
        .expect("list");
    assert_eq!(rest.sessions.iter().map(|s| s.seq).collect::<Vec<_>>(), [1]);
    assert_eq!(rest.next_cursor, None);
    let pending_page = store
        .list_sync(&list(Some(SessionStatus::Pending), 100, None))
        .expect("list");
    assert_eq!(pending_page.sessions.len(), 5, "RUNNING ones left out");
    assert_eq!(reclaim_all(&store).await, running_ids, "every RUNNING one");
    assert_eq!(store.leases().len(), 0);
}

/// `T_CODES` is every code `t_code` gives, once.
#[test]
fn t_codes_cover_every_status_once() {
    use crate::session::SessionStatus;
    let mut codes: Vec<u8> = SessionStatus::ALL
        .into_iter()
        .map(super::keys::t_code)
        .collect();
    codes.sort_unstable();
    codes.dedup();
    assert_eq!(codes, super::keys::T_CODES);
}
