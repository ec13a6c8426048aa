//! Runs the real `harvest` binary for crash and shutdown tests: start it on a data directory,
//! learn its address from its log, kill it (SIGKILL or SIGTERM), start it again.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A running `harvest serve`.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    /// Log lines after the address was found (kept so the draining thread keeps the pipe empty).
    pub _log: mpsc::Receiver<String>,
}

impl Server {
    /// Starts `harvest serve` on `data_dir` with a port chosen by the OS and waits (at most 60 s)
    /// until it listens.
    pub fn start(data_dir: &Path, workers: usize, extra_env: &[(&str, &str)]) -> Server {
        Server::spawn("serve", data_dir, workers, extra_env)
    }

    /// Starts `harvest worker` (no HTTP API) and waits (at most 60 s) until it has started;
    /// `addr` is unspecified (0.0.0.0:0).
    pub fn start_worker(data_dir: &Path, workers: usize, extra_env: &[(&str, &str)]) -> Server {
        Server::spawn("worker", data_dir, workers, extra_env)
    }

    /// Starts `harvest serve` and returns once it listens, before its store is open (with
    /// PostgreSQL it listens first and answers 503 until the database answers).
    pub fn start_unready(data_dir: &Path, workers: usize, extra_env: &[(&str, &str)]) -> Server {
        Server::spawn_until("serve", data_dir, workers, extra_env, false)
    }

    /// Starts `harvest worker` and returns at once (it may be waiting for its database).
    pub fn start_worker_unready(
        data_dir: &Path,
        workers: usize,
        extra_env: &[(&str, &str)],
    ) -> Server {
        Server::spawn_until("worker", data_dir, workers, extra_env, false)
    }

    /// Waits (at most `limit`) for a log line containing `needle`; the lines read meanwhile
    /// are dropped. `false` when none came.
    pub fn wait_log(&self, needle: &str, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self._log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    }

    fn spawn(command: &str, data_dir: &Path, workers: usize, extra_env: &[(&str, &str)]) -> Server {
        Server::spawn_until(command, data_dir, workers, extra_env, true)
    }

    /// Starts `harvest worker` inside the network namespace `netns` (`ip netns exec`, which
    /// execs the binary: the child is the worker) and waits until it has started.
    pub fn start_worker_in_netns(
        netns: &str,
        data_dir: &Path,
        workers: usize,
        extra_env: &[(&str, &str)],
    ) -> Server {
        Server::spawn_in("worker", Some(netns), data_dir, workers, extra_env, true)
    }

    /// Spawns; with `ready`, waits until it has started (serve: also until it listens).
    fn spawn_until(
        command: &str,
        data_dir: &Path,
        workers: usize,
        extra_env: &[(&str, &str)],
        ready: bool,
    ) -> Server {
        Server::spawn_in(command, None, data_dir, workers, extra_env, ready)
    }

    fn spawn_in(
        command: &str,
        netns: Option<&str>,
        data_dir: &Path,
        workers: usize,
        extra_env: &[(&str, &str)],
        ready: bool,
    ) -> Server {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_harvest")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_harvest")),
        };
        cmd.arg(command);
        if command == "serve" {
            cmd.args(["--bind", "127.0.0.1:0"]);
        }
        cmd.args(["--workers", &workers.to_string()])
            .arg("--data-dir")
            .arg(data_dir)
            .env("HARVEST_LOG_FORMAT", "text")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn harvest");
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        if !ready && command == "worker" {
            return Server {
                child,
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                _log: rx,
            };
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        let mut addr: Option<SocketAddr> = None;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if command == "worker" && line.contains("harvest started") {
                        return Server {
                            child,
                            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                            _log: rx,
                        };
                    }
                    if addr.is_none()
                        && let Some(rest) = line.split("listening addr=").nth(1)
                    {
                        let a = rest.split_whitespace().next().unwrap_or_default();
                        addr = Some(a.parse().expect("address in the listening line"));
                    }
                    // serve listens first, then opens its store (PostgreSQL) and says it
                    // started; sled opens first. Ready once both are seen.
                    if let Some(a) = addr
                        && (!ready || line.contains("harvest started") || seen_started(&seen))
                    {
                        // The lines from "listening" on stay readable (tests look for them).
                        let from = seen
                            .iter()
                            .position(|l| l.contains("listening addr="))
                            .unwrap_or(seen.len());
                        let mut kept: Vec<String> = seen.split_off(from);
                        kept.push(line);
                        return Server {
                            child,
                            addr: a,
                            _log: replay_then(kept, rx),
                        };
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "harvest {command} did not start within 60 s; its log:\n{}",
                        seen.join("\n")
                    );
                }
            }
        }
    }

    /// The API's base URL.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait (at most `limit`) for the exit code.
    pub fn terminate(mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let pid = self.child.id() as i32;
        // The `kill` command keeps `unsafe` (libc::kill) out of the tests.
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A receiver that yields `first`, then whatever `rest` receives.
fn replay_then(first: Vec<String>, rest: mpsc::Receiver<String>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    for line in first {
        let _ = tx.send(line);
    }
    std::thread::spawn(move || {
        for line in rest {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn seen_started(lines: &[String]) -> bool {
    lines.iter().any(|l| l.contains("harvest started"))
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the tests run as root (network namespaces, mounts); tests that need it skip
/// otherwise.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
