//! The CLI client (the real binary) against a server on loopback.

use serde_json::Value;

use crate::api_support::{CONFIG, start};

async fn harvest(server: &str, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_harvest"))
        .args(args)
        .env("HARVEST_SERVER", server)
        .env_remove("HARVEST_TOKEN")
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), out)
        .await
        .expect("harvest finished within 60 s")
        .expect("harvest ran");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_submit_wait_status_records_sessions_cancel_close() {
    let s = start(CONFIG).await;
    let dir = tempfile::TempDir::new().unwrap();
    let ok = dir.path().join("ok.toml");
    std::fs::write(&ok, "name = \"t\"\nrecords = 4\n").unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"name\": \"t\", \"fail\": true}").unwrap();
    let base = s.base.as_str();

    let (success, out, err) = harvest(
        base,
        &[
            "submit",
            ok.to_str().unwrap(),
            "--wait",
            "--session-id",
            "c1",
            "-p",
            "k=v",
        ],
    )
    .await;
    assert!(success, "stdout {out}\nstderr {err}");
    let v: Value = serde_json::from_str(&out).expect("JSON of the final session");
    assert_eq!(v["status"], "COMPLETED");
    assert_eq!(v["records"], 4);

    let (success, out, err) = harvest(base, &["submit", bad.to_str().unwrap(), "--wait"]).await;
    assert!(!success, "a FAILED session exits non-zero: {out}");
    assert!(
        err.contains("FAILED") && err.contains("asked to fail"),
        "{err}"
    );

    let (success, out, _) = harvest(base, &["records", "c1", "--format", "jsonl"]).await;
    assert!(success);
    assert_eq!(out.lines().count(), 4, "{out}");
    let (success, out, _) = harvest(base, &["records", "c1", "--format", "csv"]).await;
    assert!(success);
    assert_eq!(out.lines().count(), 5, "{out}");
    let (success, out, _) = harvest(base, &["status", "c1"]).await;
    assert!(success && out.contains("\"COMPLETED\""), "{out}");
    let (success, out, _) = harvest(base, &["sessions", "--status", "COMPLETED"]).await;
    assert!(success && out.contains("c1\tCOMPLETED"), "{out}");
    let (success, _, _) = harvest(base, &["log", "c1"]).await;
    assert!(success);

    let (success, _, err) = harvest(base, &["cancel", "c1"]).await;
    assert!(
        !success && err.contains("already ended COMPLETED") && err.contains("409"),
        "{err}"
    );
    let (success, _, err) = harvest(base, &["status", "nope"]).await;
    assert!(!success && err.contains("not found"), "{err}");
    let (success, _, err) = harvest(base, &["sessions", "--status", "DONE"]).await;
    assert!(!success && err.contains("unknown status"), "{err}");
    let (success, out, _) = harvest(base, &["close", "c1"]).await;
    assert!(success && out.contains("\"c1\""), "{out}");
    let (success, _, _) = harvest(base, &["status", "c1"]).await;
    assert!(!success);

    let (success, _, err) = harvest("http://127.0.0.1:1", &["status", "x"]).await;
    assert!(!success && err.contains("cannot reach"), "{err}");
}
