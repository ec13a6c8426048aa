//! A bounded load test of the HTTP API (ignored by default; run it in release mode):
//!
//! ```text
//! HARVEST_LOAD_SECS=10 HARVEST_LOAD_CLIENTS=200 \
//!   cargo test --release --test integration api_load -- --ignored --nocapture
//! ```
//!
//! N concurrent clients submit sessions and poll them for a bounded time against a local server;
//! afterwards every acknowledged submission must exist, and no answer may be a 5xx. Prints the
//! p50/p99 submit latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use harvest::session::SessionId;
use reqwest::StatusCode;
use serde_json::json;

use crate::api_support::start;

fn env_u64(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "load test: run explicitly, in release mode"]
async fn load_many_clients_submit_and_poll_without_5xx_or_lost_sessions() {
    let secs = env_u64("HARVEST_LOAD_SECS", 10);
    let clients = env_u64("HARVEST_LOAD_CLIENTS", 200) as usize;
    let s = Arc::new(start("[workers]\nconcurrency = 8\n").await);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let errors_5xx = Arc::new(AtomicU64::new(0));
    let other_errors = Arc::new(AtomicU64::new(0));
    let polls = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (s, http) = (s.clone(), http.clone());
        let (e5, eo, polls) = (errors_5xx.clone(), other_errors.clone(), polls.clone());
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut latencies = Vec::new();
            let body = serde_json::to_vec(&json!({"config": {"name": "load", "records": 2}, "client": {"client_id": format!("c{}", c % 10)}})).unwrap();
            // Bounded by the deadline.
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = http
                    .post(format!("{}/v1/sessions", s.base))
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                let r = match r {
                    Ok(r) => r,
                    Err(_) => {
                        eo.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                latencies.push(t.elapsed());
                if r.status().is_server_error() {
                    e5.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if r.status() != StatusCode::CREATED {
                    eo.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
                let id = v["id"].as_str().unwrap().to_string();
                let g = http.get(format!("{}/v1/sessions/{id}", s.base)).send().await;
                match g {
                    Ok(g) if g.status().is_server_error() => {
                        e5.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(g) if g.status() == StatusCode::OK => {
                        polls.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        eo.fetch_add(1, Ordering::Relaxed);
                    }
                }
                acked.push(id);
            }
            (acked, latencies)
        }));
    }
    let mut acked = Vec::new();
    let mut lat = Vec::new();
    for t in tasks {
        let (a, l) = t.await.unwrap();
        acked.extend(a);
        lat.extend(l);
    }
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let mut missing = 0;
    for id in &acked {
        let id = SessionId::parse(id).unwrap();
        if s.harvest.get(&id).await.unwrap().is_none() {
            missing += 1;
        }
    }
    println!(
        "load: {clients} clients, {secs} s: {} submissions acknowledged ({:.0}/s), {} polls, p50 submit {:.2} ms, p99 submit {:.2} ms, max {:.2} ms, 5xx {}, other errors {}, missing {missing}",
        acked.len(),
        acked.len() as f64 / secs as f64,
        polls.load(Ordering::Relaxed),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        errors_5xx.load(Ordering::Relaxed),
        other_errors.load(Ordering::Relaxed),
    );
    assert!(!acked.is_empty(), "no submission was acknowledged");
    assert_eq!(errors_5xx.load(Ordering::Relaxed), 0, "5xx answers");
    assert_eq!(missing, 0, "acknowledged sessions missing afterwards");
}
