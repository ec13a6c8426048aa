//! What each process listens on (issue 15, part 3): `metrics.bind` serves `/metrics`, `/healthz`
//! and `/readyz` and nothing else, under the same loopback rule as `server.bind`; `harvest worker`
//! listens only there and has no `--bind`; two processes given one metrics port are told how to
//! give each its own. Real binary, real sled directories.

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::Duration;

use crate::proc::Server;

/// A loopback address whose port was free a moment ago.
fn free_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], crate::seeds::closed_port()))
}

/// Runs the binary to its end (it is expected to refuse to start), at most 30 s.
fn run_to_end(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_harvest"));
    cmd.args(args)
        .env("HARVEST_CONFIG", "config.toml")
        .env("HARVEST_LOG_FORMAT", "text");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn harvest");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().expect("output");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("output");
    panic!(
        "harvest {args:?} should have refused to start; it ran 30 s:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn status(http: &reqwest::Client, url: &str) -> u16 {
    http.get(url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_port_serves_metrics_and_health_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = free_port();
    let mbind = metrics.to_string();
    let server = Server::start(
        &dir.path().join("serve"),
        1,
        &[
            ("HARVEST_METRICS_BIND", &mbind),
            ("HARVEST_CONFIG", "config.toml"),
        ],
    );
    let http = reqwest::Client::new();
    let m = |p: &str| format!("http://{metrics}{p}");
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(
            status(&http, &m(path)).await,
            200,
            "{path} on the metrics port"
        );
    }
    for path in [
        "/v1/sessions",
        "/v1/openapi.json",
        "/v1/stats",
        "/",
        "/v1/agents",
    ] {
        assert_eq!(
            status(&http, &m(path)).await,
            404,
            "{path} on the metrics port"
        );
    }
    let submit = http
        .post(m("/v1/sessions"))
        .json(&serde_json::json!({"config": {"name": "x", "start_urls": ["http://127.0.0.1:9/"]}}))
        .send()
        .await
        .expect("POST");
    assert!(
        matches!(submit.status().as_u16(), 404 | 405),
        "no submit on the metrics port: {}",
        submit.status()
    );
    // The API port still serves the API (and /metrics, as before).
    assert_eq!(status(&http, &server.url("/v1/sessions")).await, 200);
    assert_eq!(status(&http, &server.url("/metrics")).await, 200);

    // A worker with its own metrics port: the same routes, nothing else.
    let wmetrics = free_port();
    let wbind = wmetrics.to_string();
    let worker = Server::start_worker(
        &dir.path().join("worker"),
        1,
        &[
            ("HARVEST_METRICS_BIND", &wbind),
            ("HARVEST_CONFIG", "config.toml"),
        ],
    );
    let w = |p: &str| format!("http://{wmetrics}{p}");
    assert_eq!(status(&http, &w("/metrics")).await, 200);
    assert_eq!(status(&http, &w("/readyz")).await, 200);
    assert_eq!(status(&http, &w("/v1/sessions")).await, 404);

    // A second worker given the first one's metrics port is told how to give it its own.
    let other = dir.path().join("other");
    let out = run_to_end(
        &[
            "worker",
            "--metrics-bind",
            &wbind,
            "--data-dir",
            other.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("binding metrics.bind {wbind}")) && err.contains("--metrics-bind"),
        "stderr: {err}"
    );
    drop(worker);
    drop(server);
}

#[test]
fn a_worker_has_no_bind_flag_and_keeps_metrics_on_loopback_without_clients() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8");
    let out = run_to_end(
        &["worker", "--bind", "127.0.0.1:0", "--data-dir", data],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "clap refuses --bind on worker");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--bind"), "stderr: {err}");

    for cmd in ["worker", "serve"] {
        let out = run_to_end(
            &[cmd, "--metrics-bind", "0.0.0.0:0", "--data-dir", data],
            &[("HARVEST_BIND", "127.0.0.1:0")],
        );
        assert!(!out.status.success(), "{cmd} must refuse");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("refusing to bind metrics.bind 0.0.0.0:0: no [[clients]] are configured"),
            "{cmd} stderr: {err}"
        );
    }
}
