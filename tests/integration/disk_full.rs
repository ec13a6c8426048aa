//! A full disk (issue 15, part 5) on the real binary with a sled store on a small tmpfs: the
//! store says it is unhealthy (`/readyz` 503 naming the cause, `harvest_store_healthy 0`),
//! SIGTERM ends the process within the grace plus its margin (exit code non-zero), and every
//! session whose submission was acknowledged is there after a restart. Mounting needs root (CI
//! runs as root); elsewhere the test says it was skipped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::proc::Server;

/// A tmpfs mounted for the test, unmounted (lazily) when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system holding `path` (bounded: at most 256 MiB written).
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("create the filler");
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..256 {
        if f.write_all(&chunk).is_err() {
            break;
        }
    }
    let _ = f.sync_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_makes_the_store_unhealthy_and_shutdown_ends_in_time() {
    if !crate::proc::is_root() {
        eprintln!("skipped: mounting a tmpfs for the disk-full test needs root");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(mnt) = Tmpfs::mount(&dir.path().join("mnt"), "32m") else {
        eprintln!("skipped: mount -t tmpfs failed (no permission in this container?)");
        return;
    };
    let data = mnt.0.join("data");
    let site = crate::resume_crash::product_site(40).await;
    let env = [
        ("HARVEST_CONFIG", "config.toml"),
        ("HARVEST_SHUTDOWN_GRACE_SECS", "2"),
    ];
    let server = Server::start(&data, 2, &env);
    let http = reqwest::Client::new();
    // Slow crawls (a delay between pages), so that sessions are running and checkpointing when
    // the disk fills.
    let body = json!({"config": {"name": "slow", "start_urls": [site.url("/index.html")],
        "start_page": "p", "http": {"obey_robots_txt": false, "delay_ms": 100, "concurrency": 1},
        "follow": [{"selector": "a"}],
        "pages": {"p": {"fields": {"title": "h1"}}}}});
    let mut acknowledged = Vec::new();
    let submit = |http: reqwest::Client, body: Value, url: String| async move {
        let r = http
            .post(url)
            .json(&body)
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .expect("POST /v1/sessions");
        let status = r.status().as_u16();
        (status, r.json::<Value>().await.unwrap_or(Value::Null))
    };
    for _ in 0..3 {
        let (status, v) = submit(http.clone(), body.clone(), server.url("/v1/sessions")).await;
        assert_eq!(status, 201, "{v}");
        acknowledged.push(v["id"].as_str().expect("id").to_string());
    }
    assert_eq!(
        http.get(server.url("/readyz"))
            .send()
            .await
            .expect("readyz")
            .status(),
        200
    );

    fill(&mnt.0.join("filler"));
    // Submissions now fail (5xx) or, while sled still has room in its buffers, succeed; each
    // 201 must survive.
    let mut refused = 0;
    for _ in 0..100 {
        let (status, v) = submit(http.clone(), body.clone(), server.url("/v1/sessions")).await;
        match status {
            201 => acknowledged.push(v["id"].as_str().expect("id").to_string()),
            s if s >= 500 => {
                refused += 1;
                if refused >= 3 {
                    break;
                }
            }
            s => panic!("unexpected {s}: {v}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused >= 3, "a full disk must refuse submissions");

    let deadline = Instant::now() + Duration::from_secs(20);
    let ready = loop {
        let r = http
            .get(server.url("/readyz"))
            .send()
            .await
            .expect("readyz");
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        if status == 503 || Instant::now() > deadline {
            break (status, v);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(ready.0, 503, "/readyz with a full disk: {}", ready.1);
    let why = ready.1["error"]["message"].as_str().unwrap_or_default();
    assert!(why.contains("the store is unhealthy"), "{why}");
    assert!(why.contains("No space left on device"), "{why}");
    let metrics = http
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.lines().any(|l| l == "harvest_store_healthy 0"),
        "gauge: {:?}",
        metrics
            .lines()
            .filter(|l| l.contains("store_healthy"))
            .collect::<Vec<_>>()
    );

    // SIGTERM: done within the grace (2 s) plus the margin (5 s), with an error exit code.
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || server.terminate(Duration::from_secs(15)))
        .await
        .expect("join");
    let took = started.elapsed();
    let status = status.unwrap_or_else(|| panic!("SIGTERM did not end harvest in 15 s"));
    assert!(!status.success(), "a store that failed must exit non-zero");
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
    eprintln!(
        "disk full: {} acknowledged, readyz said {why:?}, SIGTERM ended in {took:?} with {status}",
        acknowledged.len()
    );

    // Room again: every acknowledged session is there.
    std::fs::remove_file(mnt.0.join("filler")).expect("remove the filler");
    let server = Server::start(&data, 2, &env);
    for id in &acknowledged {
        let r = http
            .get(server.url(&format!("/v1/sessions/{id}")))
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), 200, "acknowledged session {id} lost");
    }
    assert_eq!(
        http.get(server.url("/readyz"))
            .send()
            .await
            .expect("readyz")
            .status(),
        200
    );
    drop(server);
    drop(mnt);
}
