//! The sled backend: the conformance suite, plus what only an embedded store has (reopening,
//! the on-disk layout, corrupt values, group commit).

use std::sync::Arc;
use std::time::{Duration, Instant};

use harvest::session::{SessionId, SessionStatus};
use harvest::store::sled::{LAYOUT_VERSION, SledStore};
use harvest::store::{
    CheckpointBatch, CheckpointCommit, InsertOutcome, RecordsPage, SCHEMA_VERSION, SessionInsert,
    SessionList, Store, StoreError, codec,
};
use tempfile::TempDir;

use crate::store_conformance::{Fixture, at, claim, insert, session};

async fn fixture() -> Option<Fixture> {
    let dir = TempDir::new().expect("temp dir");
    let store = SledStore::open(dir.path()).expect("open sled store");
    Some(Fixture {
        store: Arc::new(store),
        guard: Box::new(dir),
    })
}

crate::store_conformance::store_conformance!(fixture);

/// Retries `f` while the directory is still locked by a just-dropped instance: sled's I/O
/// threads release its file lock shortly after the drop returns (polled, 10 s deadline).
pub(crate) fn reopening<T, E: std::fmt::Display>(mut f: impl FnMut() -> Result<T, E>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match f() {
            Ok(v) => return v,
            // sled's own lock error, or the store's `InUse` made of it ("is in use by").
            Err(e)
                if Instant::now() < deadline && {
                    let m = e.to_string();
                    m.contains("lock") || m.contains("is in use by")
                } =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("reopening the store: {e}"),
        }
    }
}

fn open(dir: &TempDir) -> Arc<dyn Store> {
    Arc::new(reopening(|| SledStore::open(dir.path())))
}

fn sid(id: &str) -> SessionId {
    SessionId::parse(id).expect("valid id")
}

/// Opens the raw sled database of a closed store (the store must be dropped first).
fn raw(dir: &TempDir) -> sled::Db {
    reopening(|| sled::open(dir.path()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_after_drop_keeps_everything() {
    let dir = TempDir::new().unwrap();
    let (running, pending) = {
        let store = open(&dir);
        insert(&store, session("a")).await;
        let running = claim(&store, "w", 1, at(1)).await.remove(0);
        let a = harvest::store::AttemptRef {
            id: harvest::SessionKey::from(sid("a")),
            attempt: running.attempt,
            owner: "w".into(),
        };
        let batch = CheckpointBatch {
            records: vec![serde_json::json!({"x": 1}), serde_json::json!({"x": 2})],
            seen_add: vec!["http://x/".into()],
            ..Default::default()
        };
        let ok = store
            .checkpoint_commit_if_running(CheckpointCommit {
                attempt: a,
                batch,
                lease: Duration::from_secs(30),
                now: at(2),
            })
            .await
            .unwrap()
            .is_some();
        assert!(ok);
        let pending = insert(&store, session("b")).await;
        // Dropped without close(): every acknowledged write must already be on disk.
        (
            store
                .session_get(&harvest::SessionKey::from(&sid("a")))
                .await
                .unwrap()
                .unwrap(),
            pending,
        )
    };
    let store = open(&dir);
    assert_eq!(
        store
            .session_get(&harvest::SessionKey::from(&sid("a")))
            .await
            .unwrap(),
        Some(running)
    );
    assert_eq!(
        store
            .session_get(&harvest::SessionKey::from(&sid("b")))
            .await
            .unwrap(),
        Some(pending.clone())
    );
    let recs = store
        .records_page(RecordsPage {
            id: harvest::SessionKey::from(sid("a")),
            offset: 0,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!(
        store
            .seen_filter(harvest::store::SeenFilter {
                id: harvest::SessionKey::from(sid("a")),
                urls: vec!["http://x/".into()],
            })
            .await
            .unwrap(),
        [true]
    );
    let counts = store.session_counts(at(3)).await.unwrap();
    assert_eq!(counts.by_status.get(&SessionStatus::Running), Some(&1));
    assert_eq!(counts.by_status.get(&SessionStatus::Pending), Some(&1));
    let c = insert(&store, session("c")).await;
    assert!(c.seq > pending.seq, "seqs continue after a reopen");
    assert_eq!(
        claim(&store, "w", 10, at(3)).await.len(),
        2,
        "the queue survives a reopen"
    );
}

/// The error of opening a store that must be refused (retrying while a dropped instance still
/// holds the directory lock).
fn refused(dir: &TempDir) -> StoreError {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match SledStore::open(dir.path()) {
            Ok(_) => panic!("a store with a newer schema version was opened"),
            // The dropped store's directory lock: sled's I/O error, unavailable for now.
            Err(e) if Instant::now() < deadline && e.is_unavailable() => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return e,
        }
    }
}

#[tokio::test]
async fn newer_schema_version_is_refused() {
    let dir = TempDir::new().unwrap();
    drop(open(&dir));
    {
        let db = raw(&dir);
        let mut newer = codec::encode(&(SCHEMA_VERSION + 1)).unwrap();
        newer[0] = SCHEMA_VERSION as u8 + 1;
        db.insert(b"\0meta", newer).unwrap();
        db.flush().unwrap();
    }
    let err = refused(&dir);
    assert!(
        matches!(err, StoreError::NewerVersion { found, .. } if found == SCHEMA_VERSION + 1),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&dir.path().display().to_string()) && msg.contains("upgrade"),
        "{msg}"
    );

    // A newer layout version inside a current-format value is refused too.
    {
        let db = raw(&dir);
        db.insert(b"\0meta", codec::encode(&(LAYOUT_VERSION + 1)).unwrap())
            .unwrap();
        db.flush().unwrap();
    }
    let err = refused(&dir);
    assert!(matches!(err, StoreError::NewerVersion { .. }), "{err:?}");
}

/// A store of layout 1 (every URL in `U` at commit) opens and is marked with the current layout,
/// which a harvest that knows only layout 1 refuses (it compares the number with its own).
#[tokio::test]
async fn an_older_layout_opens_and_is_marked_current() {
    let dir = TempDir::new().unwrap();
    drop(open(&dir));
    {
        let db = raw(&dir);
        db.insert(b"\0meta", codec::encode(&1u32).unwrap()).unwrap();
        db.flush().unwrap();
    }
    drop(open(&dir));
    let db = raw(&dir);
    let meta = db.get(b"\0meta").unwrap().expect("meta");
    let version: u32 = codec::decode(&|| "meta".into(), &meta).unwrap();
    assert_eq!(version, LAYOUT_VERSION);
    const { assert!(LAYOUT_VERSION > 1, "layout 1 readers refuse it") };
}

#[tokio::test]
async fn corrupt_session_names_its_key_and_the_rest_works() {
    let dir = TempDir::new().unwrap();
    {
        let store = open(&dir);
        for id in ["good", "bad", "later"] {
            insert(&store, session(id)).await;
        }
    }
    {
        let db = raw(&dir);
        db.insert(
            b"S\0\0\0\0bad",
            vec![SCHEMA_VERSION as u8, 0xFF, 0xFF, 0xFF],
        )
        .unwrap();
        db.flush().unwrap();
    }
    let store = open(&dir);
    let err = store
        .session_get(&harvest::SessionKey::from(&sid("bad")))
        .await
        .expect_err("corrupt value");
    assert!(
        matches!(err, StoreError::Corrupt { ref key, .. } if key.contains("bad")),
        "{err:?}"
    );
    assert!(
        store
            .session_get(&harvest::SessionKey::from(&sid("good")))
            .await
            .unwrap()
            .is_some()
    );
    let page = store
        .session_list(SessionList {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let ids: Vec<&str> = page.sessions.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        ids,
        ["later", "good"],
        "a listing skips the corrupt session"
    );
    let claimed = claim(&store, "w", 10, at(1)).await;
    let ids: Vec<&str> = claimed.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["good", "later"], "a claim skips the corrupt session");
    assert!(
        claim(&store, "w", 10, at(2)).await.is_empty(),
        "and drops it from the queue"
    );
    insert(&store, session("after")).await;
}

#[tokio::test]
async fn remove_leaves_no_key_of_the_session() {
    let dir = TempDir::new().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let store_dyn: Arc<dyn Store> = Arc::new(store);
    for id in ["gone", "kept"] {
        let mut s = session(id);
        s.job.agent = Some("ag".into());
        insert(&store_dyn, s).await;
    }
    for s in claim(&store_dyn, "w", 10, at(1)).await {
        let a = harvest::store::AttemptRef {
            id: harvest::SessionKey::from(s.id.clone()),
            attempt: 1,
            owner: "w".into(),
        };
        let batch = CheckpointBatch {
            records: vec![serde_json::json!(1)],
            frontier_add: vec![harvest::session::FrontierEntry {
                url: "http://x/1".into(),
                depth: 0,
                page: None,
            }],
            seen_add: vec!["http://x/0".into()],
            log: vec![harvest::session::LogLine {
                at: at(1),
                level: "info".into(),
                message: "m".into(),
            }],
            ..Default::default()
        };
        let commit = CheckpointCommit {
            attempt: a,
            batch,
            lease: Duration::from_secs(30),
            now: at(2),
        };
        assert!(
            store_dyn
                .checkpoint_commit_if_running(commit)
                .await
                .unwrap()
                .is_some()
        );
    }
    store_dyn
        .session_remove(&harvest::SessionKey::from(&sid("gone")))
        .await
        .unwrap()
        .expect("removed");
    drop(store_dyn);
    let db = raw(&dir);
    let mut kept = 0;
    for kv in db.iter() {
        let (k, _) = kv.unwrap();
        let has = |needle: &[u8]| k.windows(needle.len()).any(|w| w == needle);
        assert!(
            !has(b"gone"),
            "a key of the removed session is left: {:?}",
            k.escape_ascii().to_string()
        );
        kept += usize::from(has(b"kept"));
    }
    assert!(kept >= 8, "the other session keeps its keys ({kept})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_under_16_concurrent_writers() {
    let dir = TempDir::new().unwrap();
    let store = Arc::new(SledStore::open(dir.path()).unwrap());
    const PER: usize = 50;
    let mut tasks = Vec::new();
    for t in 0..16 {
        let store: Arc<dyn Store> = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..PER {
                insert(&store, session(&format!("t{t}-{i}"))).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let flushes = store.flush_count();
    assert!(flushes >= 1);
    assert!(
        (flushes as usize) < 16 * PER,
        "{flushes} flushes for {} writes: concurrent writes must share flushes",
        16 * PER
    );
    drop(store);
    let store = open(&dir);
    let counts = store.session_counts(at(0)).await.unwrap();
    assert_eq!(
        counts.by_status.get(&SessionStatus::Pending),
        Some(&(16 * PER as u64))
    );
}

/// The keys one session_insert writes (session value, 4 indexes, counters) as one sled batch,
/// for the throughput study below.
fn six_key_batch(db: &sled::Db, value: &[u8], session_tag: &str, t: usize, i: usize) {
    let mut b = sled::Batch::default();
    b.insert(format!("{session_tag}{t}-{i}").as_bytes(), value);
    for tag in ["G", "C", "T", "W"] {
        b.insert(format!("{tag}{t}-{i}").as_bytes(), &[][..]);
    }
    b.insert(&b"counters"[..], &[0u8; 24][..]);
    db.apply_batch(b).unwrap();
}

/// Durable inserts per second with 16 concurrent async submitters (group commit), against a
/// naive 16-thread insert + flush loop. Run with
/// `cargo test --release --test integration store_sled::throughput -- --ignored --nocapture`.
#[test]
#[ignore = "measurement; run in release mode"]
fn throughput_group_commit_vs_naive() {
    const N: usize = 40_000;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = TempDir::new().unwrap();
    let (rate, flushes) = rt.block_on(async {
        let sled_store = Arc::new(SledStore::open(dir.path()).unwrap());
        let store: Arc<dyn Store> = sled_store.clone();
        let start = Instant::now();
        let mut tasks = Vec::new();
        for t in 0..16 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..N / 16 {
                    let s = session(&format!("t{t}-{i}"));
                    let out = store.session_insert(SessionInsert {
                        session: s,
                        single_agent: None,
                    });
                    assert!(matches!(out.await.unwrap(), InsertOutcome::Inserted(_)));
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        (
            N as f64 / start.elapsed().as_secs_f64(),
            sled_store.flush_count(),
        )
    });
    println!(
        "group commit: {rate:.0} durable session_insert/s (16 async submitters, {N} inserts, {flushes} flushes)"
    );

    let dir = TempDir::new().unwrap();
    let db = sled::open(dir.path()).unwrap();
    let value = codec::encode(&session("x")).unwrap();
    let naive_n = 8_000;
    let start = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..16 {
            let db = &db;
            let value = &value;
            scope.spawn(move || {
                for i in 0..naive_n / 16 {
                    db.insert(format!("S{t}-{i}"), value.clone()).unwrap();
                    db.flush().unwrap();
                }
            });
        }
    });
    let naive = naive_n as f64 / start.elapsed().as_secs_f64();
    println!("naive: {naive:.0} one-key insert+flush/s (16 threads, {naive_n} inserts)");

    // The same work as session_insert (session value, 4 indexes, counters) + flush, per thread.
    let start = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..16 {
            let db = &db;
            let value = &value;
            scope.spawn(move || {
                for i in 0..naive_n / 16 {
                    six_key_batch(db, value, "s", t, i);
                    db.flush().unwrap();
                }
            });
        }
    });
    let naive6 = naive_n as f64 / start.elapsed().as_secs_f64();
    println!("naive: {naive6:.0} six-key batch+flush/s (16 threads, {naive_n} batches)");
    println!("session value: {} bytes", value.len());

    // The ceiling without durability: the same number of keys per insert as session_insert
    // (session, 4 indexes, counters), 16 threads, no flush.
    let dir = TempDir::new().unwrap();
    let db = sled::Config::new()
        .path(dir.path())
        .flush_every_ms(None)
        .open()
        .unwrap();
    let start = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..16 {
            let db = &db;
            let value = &value;
            scope.spawn(move || {
                for i in 0..N / 16 {
                    six_key_batch(db, value, "S", t, i);
                }
            });
        }
    });
    let ceiling = N as f64 / start.elapsed().as_secs_f64();
    println!("no flush: {ceiling:.0} six-key batches/s (16 threads, {N} batches)");

    // The same with one thread flushing in a loop: what continuous flushing costs the writers.
    let dir = TempDir::new().unwrap();
    let db = sled::Config::new()
        .path(dir.path())
        .flush_every_ms(None)
        .open()
        .unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    let start = Instant::now();
    let mut flushes = 0u64;
    std::thread::scope(|scope| {
        let writers: Vec<_> = (0..16)
            .map(|t| {
                let db = &db;
                let value = &value;
                scope.spawn(move || {
                    for i in 0..N / 16 {
                        six_key_batch(db, value, "S", t, i);
                    }
                })
            })
            .collect();
        let flusher = scope.spawn(|| {
            let mut n = 0u64;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                db.flush().unwrap();
                n += 1;
            }
            n
        });
        for w in writers {
            w.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        flushes = flusher.join().unwrap();
    });
    let rate = N as f64 / start.elapsed().as_secs_f64();
    println!("flush loop: {rate:.0} six-key batches/s with {flushes} concurrent flushes");
}

#[tokio::test]
async fn removal_interrupted_by_a_crash_is_finished_at_open() {
    let dir = TempDir::new().unwrap();
    drop(open(&dir));
    // Layout 3: `tag lp(tenant) lp(id)`, here in the single namespace (tenant "").
    let lp = |tag: u8, id: &str| {
        let mut k = vec![tag, 0, 0, 0, 0];
        k.extend_from_slice(&(id.len() as u32).to_be_bytes());
        k.extend_from_slice(id.as_bytes());
        k
    };
    {
        // What a crash between the removal batch and the end of the data purge leaves.
        let db = raw(&dir);
        db.insert(b"Z\0\0\0\0half", &[][..]).unwrap();
        for n in 0u64..3 {
            let mut k = lp(b'R', "half");
            k.extend_from_slice(&n.to_be_bytes());
            db.insert(k, codec::encode(&"{}".to_string()).unwrap())
                .unwrap();
        }
        let mut seen = lp(b'U', "half");
        seen.extend_from_slice(b"http://x/");
        db.insert(seen, &[][..]).unwrap();
        db.flush().unwrap();
    }
    let store = open(&dir);
    let left = store
        .records_page(RecordsPage {
            id: harvest::SessionKey::from(sid("half")),
            offset: 0,
            limit: 10,
        })
        .await;
    assert!(left.unwrap().is_empty(), "the purge was finished at open");
    let err = store.session_insert(SessionInsert {
        session: session("half"),
        single_agent: None,
    });
    assert!(
        matches!(err.await.unwrap(), InsertOutcome::Inserted(_)),
        "the marker is gone"
    );
    drop(store);
    let db = raw(&dir);
    let stale = db
        .iter()
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.starts_with(b"Z"))
        .count();
    assert_eq!(stale, 0);
    assert_eq!(
        db.scan_prefix(lp(b'U', "half")).count(),
        0,
        "the seen set was purged"
    );
}

/// At open the service reclaims every lease with `expired_before = i64::MAX` (all RUNNING
/// sessions belonged to a dead process); the key bound must not overflow.
#[tokio::test]
async fn reclaim_everything_at_open_with_max_timestamp() {
    let dir = TempDir::new().unwrap();
    let store = open(&dir);
    insert(&store, session("a")).await;
    claim(&store, "w", 1, at(0)).await;
    let reclaimed = store
        .leases_reclaim(harvest::store::LeaseReclaim {
            expired_before: harvest::session::Timestamp(i64::MAX),
            limit: 10,
            backoff: Duration::ZERO,
            cleanup_after: Duration::from_secs(60),
            now: at(1),
        })
        .await
        .unwrap();
    assert_eq!(reclaimed.len(), 1);
    assert_eq!(
        reclaimed[0].outcome,
        harvest::store::RequeueOutcome::Requeued
    );
}

/// A data directory another store holds is refused with a typed error that names the directory
/// and the process holding it (from its pid file), and is unavailable (retrying once the holder
/// is gone works).
#[tokio::test]
async fn a_locked_directory_is_in_use_and_unavailable() {
    let dir = TempDir::new().unwrap();
    let holder = SledStore::open(dir.path()).expect("first open");
    let err = SledStore::open(dir.path()).expect_err("the directory is locked");
    match &err {
        StoreError::InUse { path, pid } => {
            assert_eq!(path, dir.path());
            assert_eq!(*pid, Some(std::process::id()), "this process holds it");
        }
        other => panic!("expected InUse, got {other:?}"),
    }
    assert!(err.is_unavailable(), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "the data directory {} is in use by another harvest (pid {})",
            dir.path().display(),
            std::process::id()
        )),
        "{msg}"
    );
    drop(holder);
    drop(reopening(|| SledStore::open(dir.path())));
}
