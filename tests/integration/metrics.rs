//! Prometheus metrics: each metric moves by the right amount when a real session runs (real sled
//! store, real engine, generated shop on loopback), the output passes `promtool check metrics`,
//! gauges come from the store after a restart, and the Grafana dashboard only queries metrics
//! the service exports.
//!
//! The process-wide recorder is shared with every other test of this binary, which run in
//! parallel, so each test here records into its own recorder, set for its thread only
//! (`harvest::metrics::scoped`), and drives a `current_thread` runtime from that thread: every
//! task that records runs on it, and nothing recorded elsewhere can reach it.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::sitegen::{Site, SiteOptions};
use harvest::config::Config;
use harvest::engine::parse_config_text;
use harvest::job::NoopJob;
use harvest::service::{Harvest, SubmitRequest};
use harvest::session::{ClientContext, SessionOptions, SessionStatus, Timestamp};
use harvest::store::{CancelOutcome, SessionClaim};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Value, json};

const CATALOG: &str = include_str!("../../examples/catalog.toml");
const DASHBOARD: &str = include_str!("../../grafana/dashboards/harvest.json");
const WAIT: Duration = Duration::from_secs(60);

/// Runs `test` on a fresh `current_thread` runtime with a private recorder on this thread;
/// returns what it returned and the recorder's handle.
fn with_recorder<T, F: Future<Output = T>>(
    per_client_labels: bool,
    test: impl FnOnce(PrometheusHandle) -> F,
) -> (T, PrometheusHandle) {
    let recorder = harvest::metrics::recorder();
    let handle = recorder.handle();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let fut = test(handle.clone());
    let out = harvest::metrics::scoped(&recorder, per_client_labels, || rt.block_on(fut));
    drop(rt);
    (out, handle)
}

/// One series of the exposition: name and labels.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Series {
    name: String,
    labels: BTreeMap<String, String>,
}

/// Parses the text exposition into series → value. Panics (failing the test) on a line it does
/// not understand, which promtool would also refuse.
fn parse(text: &str) -> BTreeMap<Series, f64> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|e| panic!("bad value in {line:?}: {e}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                let mut labels = BTreeMap::new();
                // The exporter quotes values and escapes `"` and `\`; none of ours contain a comma
                // inside quotes except by escaping, which this test's values never use.
                for pair in body.split(',').filter(|p| !p.is_empty()) {
                    let (k, v) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("bad label {pair:?} in {line:?}"));
                    labels.insert(k.to_string(), v.trim_matches('"').to_string());
                }
                (name.to_string(), labels)
            }
        };
        out.insert(Series { name, labels }, value);
    }
    out
}

/// The value of the series `name{labels}` (exactly these labels), or `None` if not exported.
fn get(m: &BTreeMap<Series, f64>, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let key = Series {
        name: name.to_string(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    m.get(&key).copied()
}

/// Like [`get`], but the series must exist.
#[track_caller]
fn val(m: &BTreeMap<Series, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    get(m, name, labels).unwrap_or_else(|| {
        let have: Vec<_> = m.keys().filter(|s| s.name == name).collect();
        panic!("{name}{labels:?} is not exported; series of that name: {have:?}")
    })
}

fn config_at(dir: &std::path::Path) -> Config {
    let mut cfg = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    cfg.workers.concurrency = 2;
    cfg.workers.poll_interval_ms = 50;
    cfg
}

fn catalog(site: &Site) -> Value {
    let mut cfg = parse_config_text(CATALOG).expect("the example config parses");
    cfg["start_urls"] = json!([site.url("/index.html")]);
    cfg
}

/// Polls `/metrics` output until `cond` holds, at most `WAIT`.
async fn wait_for(
    handle: &PrometheusHandle,
    what: &str,
    cond: impl Fn(&BTreeMap<Series, f64>) -> bool,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let m = parse(&handle.render());
        if cond(&m) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {WAIT:?} for {what}; metrics now:\n{}",
            handle.render()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What one end-to-end run saw.
struct SessionRun {
    /// The rendered output after the session completed and the gauges were refreshed.
    after_run: String,
    /// The rendered output at the end (after a close and a cancel).
    at_end: String,
    session: harvest::session::Session,
    records: usize,
    site_hits: u64,
    session_id: String,
    site_url: String,
}

/// Runs one catalog crawl on a generated shop, then closes it and cancels a second session.
async fn run_one_session(handle: PrometheusHandle) -> SessionRun {
    let site = crate::sitegen::serve(SiteOptions {
        products: 30,
        per_list: 10,
        specials: false,
        tree: 0,
    })
    .await
    .expect("generated shop");
    let dir = tempfile::tempdir().expect("tempdir");
    let harvest = Harvest::open(config_at(dir.path()))
        .await
        .expect("open harvest");
    harvest.start();
    // The maintenance loop's first tick is immediate: the gauges exist before any session.
    wait_for(&handle, "the startup gauges", |m| {
        get(m, "harvest_queue_depth", &[]) == Some(0.0)
            && get(m, "harvest_sessions", &[("status", "PENDING")]) == Some(0.0)
    })
    .await;
    // Counters and histograms are exported at 0 before their first event, so that a scrape
    // before it gives rate() its starting point.
    let m = parse(&handle.render());
    for name in [
        "harvest_sessions_submitted_total",
        "harvest_records_extracted_total",
        "harvest_claim_latency_seconds_count",
        "harvest_session_duration_seconds_count",
    ] {
        assert_eq!(val(&m, name, &[]), 0.0, "{name} before any session");
    }
    assert_eq!(
        val(
            &m,
            "harvest_claim_latency_seconds_bucket",
            &[("le", "+Inf")]
        ),
        0.0
    );

    let mut events = harvest.subscribe();
    let h = harvest
        .submit(SubmitRequest::new(catalog(&site)).client(ClientContext::of("acme")))
        .await
        .expect("submit");
    let session = h
        .await_completion(WAIT)
        .await
        .expect("await")
        .expect("finished in time");
    // The store shows COMPLETED a moment before the worker records the finish metrics and
    // publishes `completed`; wait for the event so the numbers below are final.
    tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await {
                Ok(e) if e.kind == harvest::event::EventKind::Completed => break,
                Ok(_) => continue,
                Err(e) => panic!("event stream: {e}"),
            }
        }
    })
    .await
    .expect("completed event in time");
    assert_eq!(
        session.status,
        SessionStatus::Completed,
        "session: {session:?}"
    );
    let records = harvest
        .records(h.id(), 0, 10_000)
        .await
        .expect("records")
        .len();
    // Refresh the gauges now rather than waiting for the next tick.
    harvest.maintain_once().await.expect("maintenance");
    let after_run = handle.render();

    harvest.close(h.id()).await.expect("close");
    let later = harvest
        .submit(SubmitRequest::new(catalog(&site)).options(SessionOptions {
            run_at: Some(Timestamp(Timestamp::now().0 + 3_600_000)),
            ..SessionOptions::default()
        }))
        .await
        .expect("submit a session due in an hour");
    let out = harvest.cancel(later.id()).await.expect("cancel");
    assert!(
        matches!(out, CancelOutcome::Cancelled(_)),
        "a PENDING session is cancelled at once: {out:?}"
    );
    harvest.maintain_once().await.expect("maintenance");
    let at_end = handle.render();
    harvest
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
    let site_hits = site.total_hits();
    let site_url = site.base_url().to_string();
    site.shutdown().await;
    SessionRun {
        after_run,
        at_end,
        session,
        records,
        site_hits,
        session_id: h.id().to_string(),
        site_url,
    }
}

#[test]
fn a_session_moves_each_metric_by_the_right_amount() {
    let (run, _) = with_recorder(false, run_one_session);
    let m = parse(&run.after_run);
    let s = &run.session;
    let u = s.usage;

    assert_eq!(
        val(
            &m,
            "harvest_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert_eq!(val(&m, "harvest_sessions_submitted_total", &[]), 1.0);
    assert_eq!(
        val(
            &m,
            "harvest_sessions_finished_total",
            &[("status", "COMPLETED")]
        ),
        1.0
    );
    for st in ["FAILED", "CANCELLED"] {
        assert_eq!(
            val(&m, "harvest_sessions_finished_total", &[("status", st)]),
            0.0,
            "{st}"
        );
    }

    // Records: every product once, as the store has them and as the session counted them.
    assert_eq!(run.records, 30);
    assert_eq!(s.metrics.processed_elements, 30);
    assert_eq!(val(&m, "harvest_records_extracted_total", &[]), 30.0);
    assert_eq!(
        val(&m, "harvest_pages_processed_total", &[]),
        s.metrics.pages_processed as f64
    );
    assert!(s.metrics.pages_processed >= 30, "{:?}", s.metrics);

    // Requests: what the shop served (robots.txt included) is what was counted, all ok.
    let ok = val(&m, "harvest_http_requests_total", &[("outcome", "ok")]);
    let err = val(&m, "harvest_http_requests_total", &[("outcome", "error")]);
    assert_eq!(ok + err, run.site_hits as f64, "usage: {u:?}");
    assert_eq!(ok, (u.http_requests - u.http_errors) as f64);
    assert_eq!(err, u.http_errors as f64);
    assert_eq!(
        err, 0.0,
        "the generated shop without specials has no errors"
    );
    assert_eq!(
        val(
            &m,
            "harvest_http_requests_total",
            &[("outcome", "robots_blocked")]
        ),
        u.robots_blocked as f64
    );
    assert_eq!(val(&m, "harvest_http_retries_total", &[]), u.retries as f64);
    let bytes = val(&m, "harvest_http_bytes_total", &[]);
    assert_eq!(bytes, u.bytes_received as f64);
    assert!(
        bytes > 30.0 * 100.0,
        "30 product pages are more than {bytes} bytes"
    );

    // Histograms: one claim that returned a session, one finished session of the right length.
    assert_eq!(val(&m, "harvest_claim_latency_seconds_count", &[]), 1.0);
    let claim = val(&m, "harvest_claim_latency_seconds_sum", &[]);
    assert!(claim > 0.0 && claim < 5.0, "claim took {claim} s");
    assert_eq!(
        val(
            &m,
            "harvest_claim_latency_seconds_bucket",
            &[("le", "+Inf")]
        ),
        1.0
    );
    assert_eq!(val(&m, "harvest_session_duration_seconds_count", &[]), 1.0);
    let (start, end) = (
        s.metrics.start_time.expect("start time"),
        s.metrics.end_time.expect("end time"),
    );
    let took = end.since(start).as_secs_f64();
    let sum = val(&m, "harvest_session_duration_seconds_sum", &[]);
    assert!(
        (sum - took).abs() < 1e-6,
        "duration {sum} s, session says {took} s"
    );
    assert_eq!(
        val(
            &m,
            "harvest_session_duration_seconds_bucket",
            &[("le", "43200")]
        ),
        1.0
    );

    // Nothing reclaimed or removed yet; the gauges say what the store holds.
    assert_eq!(val(&m, "harvest_lease_reclaims_total", &[]), 0.0);
    assert_eq!(val(&m, "harvest_sessions_cleaned_total", &[]), 0.0);
    assert_eq!(val(&m, "harvest_sessions", &[("status", "COMPLETED")]), 1.0);
    for st in ["PENDING", "RUNNING", "FAILED", "CANCELLED"] {
        assert_eq!(val(&m, "harvest_sessions", &[("status", st)]), 0.0, "{st}");
    }
    assert_eq!(val(&m, "harvest_queue_depth", &[]), 0.0);

    // Close and cancel.
    let e = parse(&run.at_end);
    assert_eq!(val(&e, "harvest_sessions_cleaned_total", &[]), 1.0);
    assert_eq!(val(&e, "harvest_sessions_submitted_total", &[]), 2.0);
    assert_eq!(
        val(
            &e,
            "harvest_sessions_finished_total",
            &[("status", "CANCELLED")]
        ),
        1.0
    );
    assert_eq!(
        val(&e, "harvest_session_duration_seconds_count", &[]),
        1.0,
        "a session cancelled before it started has no duration"
    );
    assert_eq!(val(&e, "harvest_sessions", &[("status", "COMPLETED")]), 0.0);
    assert_eq!(val(&e, "harvest_sessions", &[("status", "CANCELLED")]), 1.0);

    // Bounded labels: no client label unless asked, never a session id or a URL.
    for series in e.keys() {
        assert!(
            !series.labels.contains_key("client"),
            "client label with per_client_labels off: {series:?}"
        );
        for v in series.labels.values() {
            assert!(
                !v.contains(&run.session_id) && !v.contains(&run.site_url) && !v.contains("://"),
                "a session id or URL as a label value: {series:?}"
            );
        }
    }
    // Every exported name is in NAMES (the list the dashboard test checks against).
    for series in e.keys() {
        assert!(
            harvest::metrics::NAMES.contains(&base_name(&series.name)),
            "{} is exported but not in metrics::NAMES",
            series.name
        );
    }
}

#[test]
fn promtool_accepts_the_metrics_output() {
    let (run, _) = with_recorder(false, run_one_session);
    let Some(out) = promtool_check(&run.at_end) else {
        println!(
            "SKIPPED promtool_accepts_the_metrics_output: promtool is not installed (Debian package `prometheus`; .ci/prometheus-e2e installs it)"
        );
        return;
    };
    assert!(
        out.status.success(),
        "promtool check metrics refused the output:\n{}{}\n--- output ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        run.at_end
    );
}

/// Runs `promtool check metrics` on `text`; `None` when promtool is not installed.
fn promtool_check(text: &str) -> Option<std::process::Output> {
    use std::io::Write;
    let mut child = match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(text.as_bytes()).expect("write to promtool");
    drop(stdin);
    Some(child.wait_with_output().expect("promtool output"))
}

#[test]
fn promtool_check_refuses_broken_output() {
    // Guards the test above against a promtool that accepts anything (or is not what we think).
    let Some(out) = promtool_check("# TYPE harvest_x_total counter\nharvest_x_total{a=\"1\" 1\n")
    else {
        println!("SKIPPED promtool_check_refuses_broken_output: promtool is not installed");
        return;
    };
    assert!(!out.status.success(), "promtool accepted broken exposition");
}

/// A metric name without the histogram suffixes.
fn base_name(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

/// Every PromQL expression of the dashboard (panels' targets and template variable queries).
fn dashboard_exprs() -> Vec<String> {
    let dash: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        let targets = p["targets"].as_array().unwrap_or_else(|| {
            panic!("panel {:?} has no targets", p["title"]);
        });
        for t in targets {
            let e = t["expr"].as_str().expect("a target has an expr");
            exprs.push(e.to_string());
        }
    }
    for v in dash["templating"]["list"].as_array().expect("templating") {
        if let Some(q) = v["query"]["query"].as_str() {
            exprs.push(q.to_string());
        }
    }
    exprs
}

fn dashboard_metric_names() -> BTreeSet<String> {
    let re = regex::Regex::new(r"harvest_[a-z_]+").expect("regex");
    dashboard_exprs()
        .iter()
        .flat_map(|e| {
            re.find_iter(e)
                .map(|m| base_name(m.as_str()).to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn the_dashboard_has_the_panels_operators_need() {
    let dash: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let titles: Vec<&str> = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter_map(|p| p["title"].as_str())
        .collect();
    for want in [
        "Throughput",
        "Queue depth",
        "Sessions by status",
        "Claim latency",
        "Session duration",
        "HTTP requests by outcome",
        "Bytes received",
        "Records and pages",
        "Lease reclaims",
        "Cleanups",
    ] {
        assert!(titles.contains(&want), "no panel {want:?} in {titles:?}");
    }
    // Stock Grafana: every panel takes its datasource from the `datasource` variable.
    for p in dash["panels"].as_array().expect("panels") {
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {}",
            p["title"]
        );
    }
    let exprs = dashboard_exprs().join("\n");
    assert!(exprs.contains("histogram_quantile("), "quantile panels");
    assert!(dashboard_metric_names().len() >= 10);
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let names = dashboard_metric_names();
    for n in &names {
        assert!(
            harvest::metrics::NAMES.contains(&n.as_str()),
            "the dashboard queries {n}, which is not in metrics::NAMES"
        );
    }
    // And the service really exports it after a session ran (not just lists it).
    let (run, _) = with_recorder(false, run_one_session);
    let exported: BTreeSet<String> = parse(&run.at_end)
        .keys()
        .map(|s| base_name(&s.name).to_string())
        .collect();
    let missing: Vec<_> = names.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, which /metrics does not export after a session"
    );
}

#[test]
fn gauges_come_from_the_store_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = {
        let mut c = config_at(dir.path());
        // No workers: the sessions stay where this test puts them.
        c.workers.concurrency = 0;
        c
    };
    // First process: three sessions, one of them claimed by a worker that dies.
    let cfg1 = cfg.clone();
    with_recorder(false, |_| async move {
        let h = Harvest::builder(cfg1)
            .job(Arc::new(NoopJob))
            .open()
            .await
            .expect("open");
        for _ in 0..3 {
            h.submit(SubmitRequest::new(json!({"name": "x"})))
                .await
                .expect("submit");
        }
        let claimed = h
            .store()
            .session_claim(SessionClaim {
                owner: "dead".into(),
                limit: 1,
                lease: Duration::from_secs(3600),
                now: Timestamp::now(),
            })
            .await
            .expect("claim");
        assert_eq!(claimed.len(), 1);
        h.store().close().await.expect("close store");
    });
    // Second process, counters from zero: the gauges still say what the store holds.
    let (_, handle) = with_recorder(false, |handle| async move {
        let h = Harvest::builder(cfg)
            .job(Arc::new(NoopJob))
            .open()
            .await
            .expect("reopen");
        h.start();
        wait_for(&handle, "gauges from the store", |m| {
            get(m, "harvest_sessions", &[("status", "PENDING")]) == Some(3.0)
        })
        .await;
        h.shutdown(Duration::from_secs(1)).await.expect("shutdown");
    });
    let m = parse(&handle.render());
    assert_eq!(
        val(&m, "harvest_sessions_submitted_total", &[]),
        0.0,
        "nothing submitted in this process"
    );
    assert_eq!(val(&m, "harvest_sessions", &[("status", "RUNNING")]), 0.0);
    assert_eq!(val(&m, "harvest_queue_depth", &[]), 3.0);
    assert_eq!(
        val(&m, "harvest_lease_reclaims_total", &[]),
        1.0,
        "the dead process's session was reclaimed at open"
    );
}

#[test]
fn client_labels_only_when_per_client_labels_is_on() {
    let (_, handle) = with_recorder(true, |_| async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = config_at(dir.path());
        cfg.workers.concurrency = 0;
        let h = Harvest::builder(cfg)
            .job(Arc::new(NoopJob))
            .open()
            .await
            .expect("open");
        let acme = h
            .submit(SubmitRequest::new(json!({"name": "x"})).client(ClientContext::of("acme")))
            .await
            .expect("submit");
        h.submit(SubmitRequest::new(json!({"name": "x"})))
            .await
            .expect("submit");
        h.cancel(acme.id()).await.expect("cancel");
        h.shutdown(Duration::from_secs(1)).await.expect("shutdown");
    });
    let m = parse(&handle.render());
    assert_eq!(
        val(
            &m,
            "harvest_sessions_submitted_total",
            &[("client", "acme")]
        ),
        1.0
    );
    assert_eq!(
        val(
            &m,
            "harvest_sessions_submitted_total",
            &[("client", "none")]
        ),
        1.0,
        "the empty client id is named"
    );
    assert_eq!(
        val(
            &m,
            "harvest_sessions_finished_total",
            &[("status", "CANCELLED"), ("client", "acme")]
        ),
        1.0
    );
    assert_eq!(get(&m, "harvest_sessions_submitted_total", &[]), None);
}

#[test]
fn client_label_values_are_bounded() {
    let cap = harvest::metrics::MAX_CLIENT_LABELS;
    let (_, handle) = with_recorder(true, |_| async move {
        for i in 0..cap + 50 {
            harvest::metrics::session_submitted(&format!("bounded-test-client-{i}"));
        }
    });
    let m = parse(&handle.render());
    let clients: BTreeSet<&str> = m
        .keys()
        .filter(|s| s.name == "harvest_sessions_submitted_total")
        .filter_map(|s| s.labels.get("client").map(String::as_str))
        .collect();
    assert!(
        clients.contains("other"),
        "clients past the cap are `other`"
    );
    assert!(
        clients.len() <= cap + 1,
        "{} client label values, cap {cap}",
        clients.len()
    );
    let total: f64 = m
        .iter()
        .filter(|(s, _)| s.name == "harvest_sessions_submitted_total")
        .map(|(_, v)| v)
        .sum();
    assert_eq!(total, (cap + 50) as f64, "no submission lost to the cap");
}
