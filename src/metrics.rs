//! Prometheus metrics (prefix `harvest_`), recorded through the `metrics` facade.
//!
//! Every metric is described here with help text and base units; the rest of the crate calls the
//! small functions below instead of naming metrics itself, so names live in one place and the
//! Grafana dashboard can be checked against [`NAMES`]. Labels are bounded: a status, an outcome,
//! and a client id only when `metrics.per_client_labels = true`. Never a session id or a URL.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::session::{Session, SessionStatus, TokenUsage};
use crate::store::SessionCounts;

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
    "harvest_http_bytes_total",
    "harvest_records_extracted_total",
    "harvest_pages_processed_total",
    "harvest_sessions_cleaned_total",
    "harvest_agent_runs_total",
];

static PER_CLIENT: AtomicBool = AtomicBool::new(false);
static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder once per process and returns its handle (for `/metrics`).
/// `None` when another recorder was installed first (e.g. by an embedding application).
pub fn install(per_client_labels: bool) -> Option<PrometheusHandle> {
    PER_CLIENT.store(per_client_labels, Ordering::Relaxed);
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                // Claims take microseconds (sled) to tens of milliseconds (PostgreSQL).
                .set_buckets_for_metric(
                    Matcher::Full("harvest_claim_latency_seconds".into()),
                    &[
                        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                        0.25, 0.5, 1.0,
                    ],
                )
                .and_then(|b| {
                    // Sessions take from milliseconds (no-op) to hours (large crawls).
                    b.set_buckets_for_metric(
                        Matcher::Full("harvest_session_duration_seconds".into()),
                        &[
                            0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 10800.0,
                            43200.0,
                        ],
                    )
                });
            let handle = builder.ok().and_then(|b| b.install_recorder().ok());
            if handle.is_some() {
                describe();
            }
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "harvest_build_info",
        "Build information; the value is always 1."
    );
    gauge!("harvest_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    describe_counter!(
        "harvest_sessions_submitted_total",
        "Sessions submitted (durably stored)."
    );
    describe_counter!(
        "harvest_sessions_finished_total",
        "Sessions that reached a terminal status, by status."
    );
    describe_gauge!(
        "harvest_sessions",
        "Sessions in the store, by status (from the store's indexes)."
    );
    describe_gauge!("harvest_queue_depth", "PENDING sessions that are due now.");
    describe_histogram!(
        "harvest_session_duration_seconds",
        Unit::Seconds,
        "Wall time of finished sessions, from first start to end."
    );
    describe_histogram!(
        "harvest_claim_latency_seconds",
        Unit::Seconds,
        "Time one claim call took."
    );
    describe_counter!(
        "harvest_lease_reclaims_total",
        "RUNNING sessions reclaimed after their lease expired or their process died."
    );
    describe_counter!(
        "harvest_http_requests_total",
        "HTTP requests sent by sessions, by outcome (ok, error, retry, robots_blocked)."
    );
    describe_counter!(
        "harvest_http_bytes_total",
        Unit::Bytes,
        "Response body bytes received by sessions."
    );
    describe_counter!(
        "harvest_records_extracted_total",
        "Records extracted and committed."
    );
    describe_counter!(
        "harvest_pages_processed_total",
        "Pages fetched and processed."
    );
    describe_counter!(
        "harvest_sessions_cleaned_total",
        "Sessions removed by close, timeout or a single agent's new run."
    );
}

fn client_label(client: &str) -> Option<String> {
    PER_CLIENT
        .load(Ordering::Relaxed)
        .then(|| client.to_string())
}

/// A session was submitted.
pub fn session_submitted(client: &str) {
    match client_label(client) {
        Some(c) => counter!("harvest_sessions_submitted_total", "client" => c).increment(1),
        None => counter!("harvest_sessions_submitted_total").increment(1),
    }
}

/// A session reached a terminal status.
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
    let ok = usage.http_requests.saturating_sub(usage.http_errors);
    counter!("harvest_http_requests_total", "outcome" => "ok").increment(ok);
    counter!("harvest_http_requests_total", "outcome" => "error").increment(usage.http_errors);
    counter!("harvest_http_requests_total", "outcome" => "retry").increment(usage.retries);
    counter!("harvest_http_requests_total", "outcome" => "robots_blocked")
        .increment(usage.robots_blocked);
    counter!("harvest_http_bytes_total").increment(usage.bytes_received);
}

/// A session was removed.
pub fn session_cleaned() {
    counter!("harvest_sessions_cleaned_total").increment(1);
}

/// Sets the gauges from the store's counts.
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
