//! Prometheus metrics (prefix `harvest_`), recorded through the `metrics` facade.
//!
//! Every metric is described here with help text and its base unit in its name (seconds, bytes);
//! the rest of the crate calls the small functions below instead of naming metrics itself, so
//! names live in one place and the Grafana dashboard can be checked against [`NAMES`]. Labels are
//! bounded: a status, an outcome, and a client id only when `metrics.per_client_labels = true`
//! (at most [`MAX_CLIENT_LABELS`] distinct ids; the rest are `other`). Never a session id or a
//! URL: those would make one time series per session.
//!
//! [`install`] sets the process-wide recorder that `/metrics` renders. Tests and embedders that
//! must not share it use [`recorder`] + [`scoped`], which apply to the current thread only (a
//! `current_thread` tokio runtime driven from that thread keeps every task on it).

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::session::{Session, SessionStatus, TokenUsage};
use crate::store::{CheckpointBatch, SessionCounts};

/// Every metric name the service exports (without the `_bucket`/`_sum`/`_count` suffixes).
pub const NAMES: &[&str] = &[
    "harvest_build_info",
    "harvest_sessions_submitted_total",
    "harvest_sessions_finished_total",
    "harvest_sessions",
    "harvest_queue_depth",
    "harvest_session_duration_seconds",
    "harvest_claim_latency_seconds",
    "harvest_lease_reclaims_total",
    "harvest_http_requests_total",
    "harvest_http_retries_total",
    "harvest_http_bytes_total",
    "harvest_records_extracted_total",
    "harvest_pages_processed_total",
    "harvest_sessions_cleaned_total",
    "harvest_agent_runs_total",
];

/// Most distinct `client` label values; later clients share the value `other`. With
/// `[[clients]]` configured the ids are bounded by the config anyway; without, a caller chooses
/// its client id freely, and this keeps one caller from growing the series without bound.
pub const MAX_CLIENT_LABELS: usize = 100;

/// Claims take microseconds (sled) to tens of milliseconds (PostgreSQL under load); beyond a
/// second something is wrong, and +Inf says so.
const CLAIM_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Sessions take from milliseconds (a page or two) to hours (large crawls).
const DURATION_BUCKETS: &[f64] = &[
    0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 10800.0, 43200.0, 86400.0,
];

/// Histogram samples are buffered until drained; a process that nobody scrapes must still not
/// grow without bound, so an upkeep thread drains them this often.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static PER_CLIENT: AtomicBool = AtomicBool::new(false);
static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
static CLIENT_LABELS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

thread_local! {
    /// Set by [`scoped`]: overrides [`PER_CLIENT`] on this thread.
    static PER_CLIENT_HERE: Cell<Option<bool>> = const { Cell::new(None) };
    /// Set by [`scoped`]: the client label values of the scoped recorder (the cap is per
    /// registry, so a scoped recorder starts with none).
    static CLIENT_LABELS_HERE: RefCell<Option<BTreeSet<String>>> = const { RefCell::new(None) };
}

fn builder() -> PrometheusBuilder {
    // Matcher::Full with a non-empty bucket list cannot fail; were it to, those two histograms
    // would render as summaries, which is still valid exposition.
    let claims = Matcher::Full("harvest_claim_latency_seconds".into());
    let durations = Matcher::Full("harvest_session_duration_seconds".into());
    match PrometheusBuilder::new().set_buckets_for_metric(claims, CLAIM_BUCKETS) {
        Ok(b) => match b.set_buckets_for_metric(durations, DURATION_BUCKETS) {
            Ok(b) => b,
            Err(_) => PrometheusBuilder::new(),
        },
        Err(_) => PrometheusBuilder::new(),
    }
}

/// A recorder configured like the installed one (same buckets), not installed anywhere: use it
/// with [`scoped`] to record into a private registry, e.g. in a test.
pub fn recorder() -> PrometheusRecorder {
    builder().build_recorder()
}

/// Runs `f` with `recorder` as this thread's recorder and per-client labels on or off for this
/// thread only. The metrics are described and `harvest_build_info` set first, as [`install`] does.
pub fn scoped<R>(
    recorder: &PrometheusRecorder,
    per_client_labels: bool,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore(Option<bool>, Option<BTreeSet<String>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            PER_CLIENT_HERE.with(|c| c.set(self.0));
            CLIENT_LABELS_HERE.with(|c| *c.borrow_mut() = self.1.take());
        }
    }
    metrics::with_local_recorder(recorder, || {
        let _restore = Restore(
            PER_CLIENT_HERE.with(|c| c.replace(Some(per_client_labels))),
            CLIENT_LABELS_HERE.with(|c| c.borrow_mut().replace(BTreeSet::new())),
        );
        describe();
        f()
    })
}

/// Installs the Prometheus recorder once per process and returns its handle (for `/metrics`).
/// `None` when another recorder was installed first (e.g. by an embedding application).
pub fn install(per_client_labels: bool) -> Option<PrometheusHandle> {
    PER_CLIENT.store(per_client_labels, Ordering::Relaxed);
    HANDLE
        .get_or_init(|| {
            let handle = match builder().install_recorder() {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed; /metrics will answer 404");
                    return None;
                }
            };
            describe();
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("harvest-metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(UPKEEP_EVERY);
                        upkeep.run_upkeep();
                    }
                });
            if let Err(e) = spawned {
                // Scrapes drain the buffers too; only an unscraped process would grow.
                tracing::warn!(error = %e, "metrics upkeep thread did not start");
            }
            Some(handle)
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "harvest_build_info",
        "Build information in the labels (version); the value is always 1."
    );
    gauge!("harvest_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    describe_gauge!(
        "harvest_store_healthy",
        "1 while the store takes writes and makes them durable, 0 once a write or a flush failed or a flush is stuck (the log and /readyz say why); read at each scrape."
    );
    describe_counter!(
        "harvest_sessions_submitted_total",
        Unit::Count,
        "Sessions submitted and durably stored."
    );
    describe_counter!(
        "harvest_sessions_finished_total",
        Unit::Count,
        "Sessions that reached a terminal status, by status (COMPLETED, FAILED, CANCELLED)."
    );
    describe_gauge!(
        "harvest_sessions",
        Unit::Count,
        "Sessions in the store by status, read from the store's indexes at startup and every maintenance tick (the same value in every process sharing a store: aggregate with max)."
    );
    describe_gauge!(
        "harvest_queue_depth",
        Unit::Count,
        "PENDING sessions that are due now, read from the store at startup and every maintenance tick."
    );
    describe_histogram!(
        "harvest_session_duration_seconds",
        Unit::Seconds,
        "Wall time of sessions that reached a terminal status, from first start to end, in seconds."
    );
    describe_histogram!(
        "harvest_claim_latency_seconds",
        Unit::Seconds,
        "Time one claim call that returned sessions took, in seconds."
    );
    describe_counter!(
        "harvest_lease_reclaims_total",
        Unit::Count,
        "RUNNING sessions reclaimed after their lease expired or their process died."
    );
    describe_counter!(
        "harvest_http_requests_total",
        Unit::Count,
        "Page requests of sessions by outcome: ok and error (sent, including each retry and redirect hop), robots_blocked (not sent: robots.txt disallows the URL)."
    );
    describe_counter!(
        "harvest_http_retries_total",
        Unit::Count,
        "Requests sent again after a retryable error (also counted as outcome=error)."
    );
    describe_counter!(
        "harvest_http_bytes_total",
        Unit::Bytes,
        "Response body bytes received by sessions."
    );
    describe_counter!(
        "harvest_records_extracted_total",
        Unit::Count,
        "Records extracted and committed."
    );
    describe_counter!(
        "harvest_pages_processed_total",
        Unit::Count,
        "Pages fetched and processed, committed."
    );
    describe_counter!(
        "harvest_sessions_cleaned_total",
        Unit::Count,
        "Sessions removed with their data: by close, after their session timeout, or by a single agent's new run."
    );
    describe_counter!(
        "harvest_agent_runs_total",
        Unit::Count,
        "Cron ticks of scheduled agents by outcome (started, skipped: previous run still active)."
    );
    initialize_counters();
}

/// Registers every counter and histogram series that has a fixed label set at 0, so that
/// `rate()` and `increase()` answer 0 (not "no data") before the first event, and the first
/// events are not lost to a series that had no sample before them (Prometheus takes a series'
/// first sample as its start). Per-client series appear with their first event.
fn initialize_counters() {
    // Registering a histogram exports its buckets with zero counts until the first sample.
    let _ = histogram!("harvest_claim_latency_seconds");
    let _ = histogram!("harvest_session_duration_seconds");
    for name in [
        "harvest_lease_reclaims_total",
        "harvest_http_retries_total",
        "harvest_http_bytes_total",
        "harvest_records_extracted_total",
        "harvest_pages_processed_total",
        "harvest_sessions_cleaned_total",
    ] {
        counter!(name).absolute(0);
    }
    for outcome in ["ok", "error", "robots_blocked"] {
        counter!("harvest_http_requests_total", "outcome" => outcome).absolute(0);
    }
    for outcome in ["started", "skipped"] {
        counter!("harvest_agent_runs_total", "outcome" => outcome).absolute(0);
    }
    if !per_client() {
        counter!("harvest_sessions_submitted_total").absolute(0);
        for st in SessionStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            counter!("harvest_sessions_finished_total", "status" => st.as_str()).absolute(0);
        }
    }
}

fn per_client() -> bool {
    PER_CLIENT_HERE
        .with(Cell::get)
        .unwrap_or_else(|| PER_CLIENT.load(Ordering::Relaxed))
}

fn client_label(client: &str) -> Option<String> {
    if !per_client() {
        return None;
    }
    // An empty label value is the same as no label in Prometheus; name it.
    let client = if client.is_empty() { "none" } else { client };
    let scoped =
        CLIENT_LABELS_HERE.with(|c| c.borrow_mut().as_mut().map(|seen| admit(seen, client)));
    let admitted = scoped.unwrap_or_else(|| {
        let mut seen = CLIENT_LABELS.lock().unwrap_or_else(|p| p.into_inner());
        admit(&mut seen, client)
    });
    Some(if admitted { client } else { "other" }.to_string())
}

/// Whether `client` may be a label value: already one, or there is room for one more.
fn admit(seen: &mut BTreeSet<String>, client: &str) -> bool {
    if seen.contains(client) {
        return true;
    }
    if seen.len() < MAX_CLIENT_LABELS {
        seen.insert(client.to_string());
        return true;
    }
    false
}

/// A session was submitted.
pub fn session_submitted(client: &str) {
    match client_label(client) {
        Some(c) => counter!("harvest_sessions_submitted_total", "client" => c).increment(1),
        None => counter!("harvest_sessions_submitted_total").increment(1),
    }
}

/// A session reached a terminal status. Call once per session, where the transition applied.
pub fn session_finished(s: &Session) {
    let status = s.status.as_str();
    match client_label(s.client.client_id()) {
        Some(c) => counter!("harvest_sessions_finished_total", "status" => status, "client" => c)
            .increment(1),
        None => counter!("harvest_sessions_finished_total", "status" => status).increment(1),
    }
    if let (Some(start), Some(end)) = (s.metrics.start_time, s.metrics.end_time) {
        histogram!("harvest_session_duration_seconds").record(end.since(start).as_secs_f64());
    }
}

/// One claim call took `d` and returned `n` sessions.
pub fn claim_latency(d: Duration, _n: usize) {
    histogram!("harvest_claim_latency_seconds").record(d.as_secs_f64());
}

/// Sessions reclaimed.
pub fn lease_reclaims(n: u64) {
    if n > 0 {
        counter!("harvest_lease_reclaims_total").increment(n);
    }
}

/// A checkpoint committed these deltas.
pub fn progress(records: u64, pages: u64, usage: &TokenUsage) {
    counter!("harvest_records_extracted_total").increment(records);
    counter!("harvest_pages_processed_total").increment(pages);
    // A request refused by the network guard counts as an error without having been sent, so
    // errors can exceed requests in a batch; never let "ok" wrap.
    let ok = usage.http_requests.saturating_sub(usage.http_errors);
    counter!("harvest_http_requests_total", "outcome" => "ok").increment(ok);
    counter!("harvest_http_requests_total", "outcome" => "error").increment(usage.http_errors);
    counter!("harvest_http_requests_total", "outcome" => "robots_blocked")
        .increment(usage.robots_blocked);
    counter!("harvest_http_retries_total").increment(usage.retries);
    counter!("harvest_http_bytes_total").increment(usage.bytes_received);
}

/// The deltas of one checkpoint batch, taken before the batch is handed to the store (which
/// consumes it) and recorded with [`BatchCounts::record`] only if the write applied.
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchCounts {
    records: u64,
    pages: u64,
    usage: TokenUsage,
}

impl BatchCounts {
    /// The deltas `batch` carries.
    pub fn of(batch: &CheckpointBatch) -> BatchCounts {
        BatchCounts {
            records: batch.records.len() as u64,
            pages: batch.pages,
            usage: batch.usage,
        }
    }

    /// Records them (see [`progress`]).
    pub fn record(&self) {
        progress(self.records, self.pages, &self.usage);
    }
}

/// A session was removed.
pub fn session_cleaned() {
    counter!("harvest_sessions_cleaned_total").increment(1);
}

/// Sets the gauges from the store's counts (every status, zeros included, so a status that
/// empties does not keep its last value).
pub fn set_counts(c: &SessionCounts) {
    for st in SessionStatus::ALL {
        let n = c.by_status.get(&st).copied().unwrap_or(0);
        gauge!("harvest_sessions", "status" => st.as_str()).set(n as f64);
    }
    gauge!("harvest_queue_depth").set(c.queue_depth as f64);
}

/// A cron tick started an agent run.
pub fn agent_run_fired() {
    counter!("harvest_agent_runs_total", "outcome" => "started").increment(1);
}

/// A cron tick was skipped because the agent's previous run is active.
pub fn agent_run_skipped() {
    counter!("harvest_agent_runs_total", "outcome" => "skipped").increment(1);
}

/// Sets `harvest_store_healthy` from the store's own report.
pub fn store_health(health: &crate::store::StoreHealth) {
    let up = matches!(health, crate::store::StoreHealth::Healthy);
    gauge!("harvest_store_healthy").set(if up { 1.0 } else { 0.0 });
}
