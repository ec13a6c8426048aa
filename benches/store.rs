//! `cargo bench --bench store`: the sled store's hot paths, on a real store in a temporary
//! directory, through the public [`Store`] API only.
//!
//! - `store/checkpoint_commit`: one `checkpoint_commit_if_running` of an engine-shaped batch
//!   (50 records of ~300 bytes of JSON, 500 new frontier entries that are also in `seen_add`,
//!   50 `frontier_done` with position hints, 5 log lines) on a claimed session. The time is
//!   the whole call, **including the durable flush and its `fdatasync`**: the store
//!   acknowledges a commit only once it is on disk, and the public API has no non-durable
//!   commit to time the in-memory part alone. A session is replaced (untimed) after 200 commits
//!   (10,000 pages, `examples/catalog.toml`'s `max_pages`), so the state a commit works on stays
//!   the size of one crawl's.
//! - `store/session_claim/{1,16}`: one `session_claim` of 1 or 16 sessions from a queue of
//!   1,000 due PENDING sessions. The queue is refilled and the claimed sessions removed outside
//!   the timed part. A claim is not durable (see the sled store's module docs), so this is
//!   memory and sled-tree work only.
//! - `store/session_claim/1_after_256_submits`: the same claim of 1 when 256 sessions were
//!   submitted since the last claim: a claim first moves every session that has become due from
//!   the scheduled index into the due queue, and every submitted session goes through that once.
//!   The difference to `session_claim/1`, divided by 256, is that move's cost per session; the
//!   two benches above exclude it (an untimed claim after each refill does it).
//! - `store/session_insert/{1,16}`: a durable submit, one at a time (a flush and `fdatasync`
//!   per insert), and 16 at once (they share flushes: group commit; throughput is per session).
//!
//! How to read them: the durable figures (commit, insert) include the disk's flush latency,
//! which moves with whatever else writes to that disk: on a shared 2-core machine the same
//! commit took 1.4 ms in one minute and 5 to 8 ms in the next, with about 1.3 ms of CPU on the
//! calling thread each time (the rest is waiting for the flusher). Compare runs on one machine
//! only, and several of them. The store lives in the system's temporary directory (`TMPDIR`):
//! on a tmpfs the flush costs nothing, so point `TMPDIR` at the disk harvest would use.
//!
//! Sample sizes and times are set per group (below) so that `cargo bench` finishes in a few
//! minutes on 2 cores: the durable benches take milliseconds per iteration, so 20 samples over a
//! few seconds already give hundreds of commits.

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::future::join_all;
use serde_json::json;
use tokio::runtime::Runtime;

use harvest::session::{
    ClientContext, FrontierEntry, JobSpec, LogLine, Session, SessionId, SessionOptions, Timestamp,
    TokenUsage,
};
use harvest::store::sled::SledStore;
use harvest::store::{
    AttemptRef, CheckpointBatch, CheckpointCommit, FrontierDone, FrontierPage, InsertOutcome,
    SessionClaim, SessionInsert, Store,
};

/// URLs done per checkpoint: 50 pages fetched, one product record each (the engine commits
/// every 100 ms or 500 pages: 50 is 100 ms of a crawl at 500 pages/s).
const DONE_URLS: usize = 50;
/// New URLs per checkpoint (ten links per page).
const NEW_URLS: usize = 500;
/// Log lines per checkpoint.
const LOG_LINES: usize = 5;
/// Commits per session before the bench starts a fresh one: 10,000 pages.
const COMMITS_PER_SESSION: u32 = 200;
/// Due PENDING sessions in the queue the claim bench takes from.
const QUEUE_DEPTH: usize = 1_000;
/// Sessions inserted per untimed refill of the claim bench.
const REFILL: usize = 256;
const LEASE: Duration = Duration::from_secs(600);

/// A runtime and a fresh sled store in a temporary directory, removed on drop.
struct Fixture {
    rt: Runtime,
    store: SledStore,
    // Dropped after the store (fields drop in order).
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("a temporary directory for the bench store");
        let store = SledStore::open(dir.path()).expect("open the sled store");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        Fixture {
            rt,
            store,
            _dir: dir,
        }
    }
}

/// A new lease owner: every claim call uses its own (see `SessionClaim::owner`).
fn owner() -> String {
    static OWNERS: AtomicU64 = AtomicU64::new(0);
    format!("bench-{}", OWNERS.fetch_add(1, Ordering::Relaxed))
}

/// The config of every bench session: the catalog example, as a submission stores it.
static CONFIG: LazyLock<serde_json::Value> = LazyLock::new(|| {
    harvest::engine::parse_config_text(include_str!("../examples/catalog.toml"))
        .expect("examples/catalog.toml parses")
});

/// A PENDING session shaped like a submitted one.
fn pending(now: Timestamp) -> Session {
    Session::pending(
        SessionId::generate(),
        ClientContext::of("bench"),
        JobSpec {
            config: CONFIG.clone().into(),
            params: Default::default(),
            agent: None,
        },
        SessionOptions::default(),
        now,
    )
}

/// Inserts `n` sessions at once (one group commit for all of them).
async fn insert_many(store: &SledStore, sessions: Vec<Session>) {
    let inserts = sessions.into_iter().map(|session| {
        store.session_insert(SessionInsert {
            session,
            single_agent: None,
        })
    });
    for outcome in join_all(inserts).await {
        match outcome {
            Ok(InsertOutcome::Inserted(_)) => {}
            other => panic!("inserting a bench session: expected Inserted, got {other:?}"),
        }
    }
}

async fn remove_many(store: &SledStore, ids: &[SessionId]) {
    let keys: Vec<harvest::SessionKey> = ids.iter().map(harvest::SessionKey::from).collect();
    for removed in join_all(keys.iter().map(|k| store.session_remove(k))).await {
        assert!(
            removed.expect("remove a claimed bench session").is_some(),
            "a claimed session was gone before the bench removed it"
        );
    }
}

/// One crawl in progress: a claimed session and the frontier positions it has been given, so
/// that every `frontier_done` carries the right position hint, as the engine's do.
struct Crawl {
    attempt: AttemptRef,
    /// Position the next new URL takes.
    next_pos: u64,
    /// URLs added and not done yet, with their positions, oldest first.
    todo: VecDeque<(String, u64)>,
    /// Commits so far.
    commits: u32,
    /// Names new URLs, unique in the store.
    urls: u64,
}

impl Crawl {
    /// Inserts and claims a session and commits its start: 500 URLs, no page done yet.
    async fn start(fx: &Fixture) -> Crawl {
        let owner = owner();
        let now = Timestamp::now();
        let session = pending(now);
        let id = session.id.clone();
        insert_many(&fx.store, vec![session]).await;
        let claimed = fx
            .store
            .session_claim(SessionClaim {
                owner: owner.clone(),
                limit: 1,
                lease: LEASE,
                now,
            })
            .await
            .expect("claim the bench session");
        assert_eq!(claimed.len(), 1, "claimed the one pending session");
        let resume = fx
            .store
            .resume_load(&harvest::SessionKey::from(&id))
            .await
            .expect("resume state of a new session");
        let mut crawl = Crawl {
            attempt: AttemptRef {
                id: id.into(),
                attempt: claimed[0].attempt,
                owner,
            },
            // 0 means "nothing added yet": positions start at 1.
            next_pos: resume.frontier_next.max(1),
            todo: VecDeque::new(),
            commits: 0,
            urls: 0,
        };
        let mut seed = CheckpointBatch::default();
        crawl.add_urls(&mut seed);
        crawl.commit(&fx.store, seed).await;
        crawl
    }

    fn add_urls(&mut self, b: &mut CheckpointBatch) {
        for _ in 0..NEW_URLS {
            self.urls += 1;
            let n = self.urls;
            let url = format!(
                "https://shop.example/catalog/c{}/product-{n:06}.html",
                n % 40
            );
            b.seen_add.push(url.clone());
            b.frontier_add.push(FrontierEntry {
                url: url.clone(),
                depth: 1,
                page: Some("product".into()),
            });
            self.todo.push_back((url, self.next_pos));
            self.next_pos += 1;
        }
    }

    /// The next checkpoint: 50 pages done (the oldest URLs), their records, the 500 URLs they
    /// linked to, 5 log lines.
    fn next_batch(&mut self) -> CheckpointBatch {
        let mut b = CheckpointBatch::default();
        for _ in 0..DONE_URLS {
            let (url, pos) = self
                .todo
                .pop_front()
                .expect("the frontier holds more URLs than one batch finishes");
            b.records.push(record(&url));
            b.frontier_done.push(FrontierDone {
                url,
                pos: Some(pos),
            });
        }
        self.add_urls(&mut b);
        let now = Timestamp::now();
        for i in 0..LOG_LINES {
            b.log.push(LogLine {
                at: now,
                level: "warn".into(),
                message: format!(
                    "https://shop.example/catalog/c{i}/missing.html: HTTP 404 Not Found"
                ),
            });
        }
        b.pages = DONE_URLS as u64;
        b.usage = TokenUsage {
            http_requests: DONE_URLS as u64,
            bytes_received: DONE_URLS as u64 * 40_000,
            ..TokenUsage::default()
        };
        b
    }

    async fn commit(&mut self, store: &SledStore, batch: CheckpointBatch) {
        let applied = store
            .checkpoint_commit_if_running(CheckpointCommit {
                attempt: self.attempt.clone(),
                batch,
                lease: LEASE,
                now: Timestamp::now(),
            })
            .await
            .expect("checkpoint commit");
        assert!(
            applied.is_some(),
            "the bench's checkpoint was refused: lease lost?"
        );
        self.commits += 1;
    }
}

/// A product record as the catalog example extracts it, ~300 bytes of JSON.
fn record(url: &str) -> serde_json::Value {
    json!({
        "url": url,
        "title": "Stainless steel kettle, 1.7 l",
        "price": 42.5,
        "sku": "SKU-004217",
        "image": "https://shop.example/img/004217.jpg",
        "tags": ["kitchen", "kettles", "all"],
        "description": "A fine product, well made and fairly priced, shipped within two days.",
    })
}

/// Checks, before anything is timed, that the batches are what the doc says: a record is
/// ~300 bytes, and the position hints match the store's numbering (a wrong hint would still
/// commit correctly, but through the slower lookup by URL, and the bench would measure that).
fn check_shape(fx: &Fixture) {
    let len = serde_json::to_string(&record(
        "https://shop.example/catalog/c1/product-000001.html",
    ))
    .expect("a record serializes")
    .len();
    assert!((250..=350).contains(&len), "a record is {len} bytes");
    fx.rt.block_on(async {
        let mut crawl = Crawl::start(fx).await;
        let batch = crawl.next_batch();
        crawl.commit(&fx.store, batch).await;
        let items = fx
            .store
            .frontier_page(FrontierPage {
                id: crawl.attempt.id.clone(),
                after_pos: 0,
                limit: 10_000,
            })
            .await
            .expect("read the frontier");
        assert_eq!(
            items.len(),
            2 * NEW_URLS - DONE_URLS,
            "frontier after one page batch"
        );
        let first = items.first().expect("a frontier entry");
        let (url, pos) = crawl.todo.front().expect("a URL to do");
        assert_eq!(
            (&first.entry.url, first.pos),
            (url, *pos),
            "the bench's position hints follow the store's numbering"
        );
    });
}

fn checkpoint_commit(c: &mut Criterion) {
    let fx = Fixture::new();
    check_shape(&fx);
    let mut g = c.benchmark_group("store");
    // Milliseconds per commit (a disk flush each): 20 samples over 5 s are a few hundred commits.
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(1));
    let mut crawl = fx.rt.block_on(Crawl::start(&fx));
    g.bench_function("checkpoint_commit", |b| {
        b.iter_custom(|iters| {
            fx.rt.block_on(async {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    if crawl.commits >= COMMITS_PER_SESSION {
                        crawl = Crawl::start(&fx).await;
                    }
                    let batch = crawl.next_batch();
                    let t = Instant::now();
                    crawl.commit(&fx.store, black_box(batch)).await;
                    timed += t.elapsed();
                }
                timed
            })
        })
    });
    g.finish();
}

/// A fresh store with a queue of [`QUEUE_DEPTH`] due PENDING sessions.
fn queue() -> Fixture {
    let fx = Fixture::new();
    let sessions = (0..QUEUE_DEPTH)
        .map(|_| pending(Timestamp::now()))
        .collect();
    fx.rt.block_on(async {
        insert_many(&fx.store, sessions).await;
        // Moves them into the due queue (see `refill`).
        let (_, first) = claim(&fx.store, 1).await;
        remove_many(&fx.store, &first).await;
    });
    fx
}

/// Inserts `n` sessions, then claims one (untimed): a claim first moves every session that has
/// become due into the due queue, so the claims timed after this one only take from it.
/// Returns the claimed session, for removal.
async fn refill(store: &SledStore, n: usize) -> Vec<SessionId> {
    insert_many(store, (0..n).map(|_| pending(Timestamp::now())).collect()).await;
    claim(store, 1).await.1
}

/// Claims `limit` sessions, which must be there; returns how long the call took and their ids.
async fn claim(store: &SledStore, limit: usize) -> (Duration, Vec<SessionId>) {
    let p = SessionClaim {
        owner: owner(),
        limit,
        lease: LEASE,
        now: Timestamp::now(),
    };
    let t = Instant::now();
    let got = store.session_claim(p).await;
    let took = t.elapsed();
    let got = got.expect("claim");
    assert_eq!(got.len(), limit, "the queue held enough sessions");
    (took, got.into_iter().map(|s| s.id).collect())
}

fn session_claim(c: &mut Criterion) {
    let mut g = c.benchmark_group("store/session_claim");
    // Tens of microseconds to a few milliseconds per claim; the untimed refills and removals
    // cost more than the claims, so the measurement time is kept short.
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for limit in [1usize, 16] {
        let fx = queue();
        g.throughput(Throughput::Elements(limit as u64));
        g.bench_with_input(BenchmarkId::from_parameter(limit), &limit, |b, &limit| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                let mut done = 0;
                // Rounds of up to REFILL sessions, so the queue stays near QUEUE_DEPTH.
                while done < iters {
                    let round = (iters - done).min((REFILL / limit) as u64);
                    fx.rt.block_on(async {
                        let mut claimed = refill(&fx.store, round as usize * limit).await;
                        for _ in 0..round {
                            let (took, ids) = claim(&fx.store, limit).await;
                            timed += took;
                            claimed.extend(ids);
                        }
                        remove_many(&fx.store, &claimed).await;
                    });
                    done += round;
                }
                timed
            })
        });
    }
    let fx = queue();
    g.throughput(Throughput::Elements(1));
    g.bench_function(format!("1_after_{REFILL}_submits"), |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                fx.rt.block_on(async {
                    let now_due = (0..REFILL).map(|_| pending(Timestamp::now())).collect();
                    insert_many(&fx.store, now_due).await;
                    let (took, mut claimed) = claim(&fx.store, 1).await;
                    timed += took;
                    // Back to QUEUE_DEPTH.
                    claimed.extend(claim(&fx.store, REFILL - 1).await.1);
                    remove_many(&fx.store, &claimed).await;
                });
            }
            timed
        })
    });
    g.finish();
}

fn session_insert(c: &mut Criterion) {
    let mut g = c.benchmark_group("store/session_insert");
    // Milliseconds per iteration (a disk flush each).
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for n in [1usize, 16] {
        let fx = Fixture::new();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let sessions: Vec<Session> =
                        (0..n).map(|_| pending(Timestamp::now())).collect();
                    let t = Instant::now();
                    fx.rt.block_on(insert_many(&fx.store, black_box(sessions)));
                    timed += t.elapsed();
                }
                timed
            })
        });
    }
    g.finish();
}

criterion_group!(benches, checkpoint_commit, session_claim, session_insert);
criterion_main!(benches);
