//! Many hosts (issue 19): two `harvest worker`s, each in its own network namespace with a veth
//! pair to the host, reach PostgreSQL (through a TCP proxy of the test on a host address) and
//! the test site; `serve` runs on the host. One worker's link is cut mid-run (its host end of
//! the veth set down: its packets go nowhere, its connections hang) and restored once the
//! sessions it held were reclaimed by the other. Then:
//!
//! - every session ends COMPLETED once, with each record once;
//! - the cut worker's late writes are fenced: it logs that its attempts stopped, and nothing it
//!   held is written twice;
//! - `serve`'s event stream shows each session's `completed` exactly once.
//!
//! Needs root (namespaces, links), `ip` (iproute2) and `HARVEST_TEST_DATABASE_URL`; skips with a
//! message otherwise. The namespaces, links and the host address (on `lo`) are named after the
//! test's pid and removed when it ends, even when it fails.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use harvest::session::{SessionId, SessionStatus};

use crate::outage::{
    Proxy, Stream, assert_exact_chain, chain_config, env_refs, pg_target, session_of, setup_with,
    slow_site_on, submit,
};
use crate::proc::Server;
use crate::store_postgres::database_url;

/// Pages per session here: long enough that sessions run across the cut.
const CHAIN: usize = 30;
const SESSIONS: usize = 24;

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Two namespaces with a veth pair each, and a host address on `lo` that both reach through
/// their default route (the site and the database proxy listen there). Removed on drop, also
/// when `setup` fails half-way (it returns through `?` with the `Net` already built). The
/// addresses are in 198.18.0.0/15, set aside for benchmarking (RFC 2544): not a network a
/// host normally routes to, unlike the private ranges its own networks may use (a proxy in
/// fake-IP mode may claim it, as it may claim any range).
struct Net {
    tag: String,
    /// Third octet of each namespace's /30.
    nets: [u8; 2],
    shared: Ipv4Addr,
}

impl Net {
    fn ns(&self, i: usize) -> String {
        format!("hv{}n{i}", self.tag)
    }

    fn host_link(&self, i: usize) -> String {
        format!("hv{}h{i}", self.tag)
    }

    fn setup() -> Result<Net, String> {
        let pid = std::process::id();
        let tag = format!("{}", pid % 100_000);
        let base = (pid % 120) as u8 * 2;
        let net = Net {
            tag,
            nets: [base + 1, base + 2],
            shared: Ipv4Addr::new(198, 18, 250, (pid % 250) as u8 + 1),
        };
        let shared = format!("{}/32", net.shared);
        run(&["addr", "add", &shared, "dev", "lo"])?;
        for i in 0..2 {
            let (ns, host, peer) = (net.ns(i), net.host_link(i), format!("hv{}p{i}", net.tag));
            let gw = format!("198.18.{}.1", net.nets[i]);
            run(&["netns", "add", &ns])?;
            run(&["link", "add", &host, "type", "veth", "peer", "name", &peer])?;
            run(&["link", "set", &peer, "netns", &ns])?;
            run(&["addr", "add", &format!("{gw}/30"), "dev", &host])?;
            run(&["link", "set", &host, "up"])?;
            let inside = |args: &[&str]| {
                let mut all = vec!["netns", "exec", ns.as_str(), "ip"];
                all.extend_from_slice(args);
                run(&all)
            };
            inside(&[
                "addr",
                "add",
                &format!("198.18.{}.2/30", net.nets[i]),
                "dev",
                &peer,
            ])?;
            inside(&["link", "set", &peer, "up"])?;
            inside(&["link", "set", "lo", "up"])?;
            inside(&["route", "add", "default", "via", &gw])?;
        }
        Ok(net)
    }

    fn cut(&self, i: usize) {
        run(&["link", "set", &self.host_link(i), "down"]).expect("cut the link");
    }

    fn restore(&self, i: usize) {
        run(&["link", "set", &self.host_link(i), "up"]).expect("restore the link");
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for i in 0..2 {
            let _ = run(&["link", "del", &self.host_link(i)]);
            let _ = run(&["netns", "del", &self.ns(i)]);
        }
        let _ = run(&["addr", "del", &format!("{}/32", self.shared), "dev", "lo"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_in_its_namespace_is_fenced_and_every_session_ends_once() {
    let Some(url) = database_url() else { return };
    if !crate::proc::is_root() {
        eprintln!("skipped: the namespace test needs root (ip netns, veth links)");
        return;
    }
    let net = match Net::setup() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("skipped: cannot set up network namespaces here: {e}");
            return;
        }
    };
    let shared = IpAddr::V4(net.shared);
    let proxy = Proxy::start_on(shared, pg_target(&url), false).await;
    let site = slow_site_on(shared, CHAIN).await;
    let ns_url = crate::outage::with_host_port(&url, &net.shared.to_string(), proxy.addr.port());
    // A 4 s lease: the cut worker's sessions come back within seconds.
    let s = setup_with(&url, &ns_url, 4);
    // Declared after the schema's guard, so dropped before it, also on a panic: connections it
    // keeps open (the cut worker's, mid-transaction) would hold locks the schema's DROP waits for.
    let _proxy = proxy;
    let env = s.env();
    let h = s.handle().await;
    // serve on the host talks to the database directly, and runs maintenance (reclaims).
    let serve_env: Vec<(String, String)> = env
        .iter()
        .cloned()
        .chain([("HARVEST_DATABASE_URL".to_string(), url.clone())])
        .collect();
    let serve = Server::start(&s.data, 0, &env_refs(&serve_env));
    let mut workers: Vec<Server> = (0..2)
        .map(|i| Server::start_worker_in_netns(&net.ns(i), &s.data, 6, &env_refs(&env)))
        .collect();
    let mut stream = Stream::open(&serve.url("/v1/events"), None).await;
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for _ in 0..SESSIONS {
        ids.push(submit(&http, &serve, &chain_config(site)).await);
    }

    // Cut worker 0 once it runs sessions that committed something.
    let pid0 = workers[0].child.id();
    let held = |sessions: &[harvest::Session]| -> Vec<SessionId> {
        sessions
            .iter()
            .filter(|s| {
                s.status == SessionStatus::Running
                    && s.records > 0
                    && s.lease
                        .as_ref()
                        .is_some_and(|l| l.owner.contains(&format!(":{pid0}:")))
            })
            .map(|s| s.id.clone())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let cut_held = loop {
        let all = all_sessions(&h, &ids).await;
        let held = held(&all);
        if held.len() >= 2 {
            break held;
        }
        assert!(Instant::now() < deadline, "worker 0 never ran sessions");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let attempts_at_cut: BTreeMap<SessionId, u32> = all_sessions(&h, &ids)
        .await
        .into_iter()
        .map(|s| (s.id.clone(), s.attempt))
        .collect();
    eprintln!("netns: cutting worker 0, which holds {cut_held:?}");
    net.cut(0);
    let cut_at = Instant::now();

    // The others take its sessions back and run them (a later attempt) while it is cut.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let all = all_sessions(&h, &ids).await;
        let moved = cut_held.iter().all(|id| {
            all.iter()
                .find(|s| s.id == *id)
                .is_some_and(|s| s.attempt > attempts_at_cut[id])
        });
        if moved {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cut worker's sessions were not reclaimed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cut_for = cut_at.elapsed();
    eprintln!(
        "netns: its sessions were reclaimed after {:.1} s; restoring its link",
        cut_for.as_secs_f64()
    );
    net.restore(0);
    // Its hung writes arrive now, and are refused. They arrive at the next retransmission of
    // each hung connection: TCP doubles its retransmission timeout at every unanswered try, so
    // after a cut of T seconds the next one can be up to about T away. A cut that a loaded
    // machine made long (the other worker had to claim and run the sessions first) once took
    // longer than a fixed 60 s wait here, so the wait grows with the cut.
    let fenced_within = Duration::from_secs(60).max(cut_for * 2 + Duration::from_secs(30));
    assert!(
        workers[0].wait_log("attempt stopped", fenced_within),
        "the cut worker did not report its attempts fenced within {} s of its link's restore \
         (cut for {:.1} s)",
        fenced_within.as_secs(),
        cut_for.as_secs_f64()
    );

    eprintln!("netns: worker 0 was fenced");
    let mut completed: BTreeMap<String, usize> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while completed.len() < ids.len() {
        assert!(
            Instant::now() < deadline,
            "{} of {} completed",
            completed.len(),
            ids.len()
        );
        if let Some(e) = stream.next(Duration::from_secs(1)).await {
            assert_ne!(e.event, "failed", "{:?}", e.data);
            if e.event == "completed" {
                *completed.entry(session_of(&e)).or_default() += 1;
            }
        }
    }
    while let Some(e) = stream.next(Duration::from_secs(2)).await {
        if e.event == "completed" {
            *completed.entry(session_of(&e)).or_default() += 1;
        }
    }
    assert!(completed.values().all(|n| *n == 1), "{completed:?}");
    for s in all_sessions(&h, &ids).await {
        assert_eq!(s.status, SessionStatus::Completed, "{}", s.id);
    }
    for s in all_sessions(&h, &ids).await {
        if s.records != CHAIN as u64 {
            let log = http
                .get(serve.url(&format!("/v1/sessions/{}/log", s.id)))
                .send()
                .await
                .expect("log")
                .text()
                .await
                .unwrap_or_default();
            eprintln!(
                "netns: {} has {} records; attempts {:?}; held at the cut: {}; log: {log}",
                s.id,
                s.records,
                s.attempts,
                cut_held.contains(&s.id)
            );
        }
    }
    assert_exact_chain(&h, &ids, CHAIN).await;
    for w in workers.drain(..) {
        w.kill9();
    }
}

async fn all_sessions(h: &harvest::Harvest, ids: &[String]) -> Vec<harvest::Session> {
    let mut out = Vec::new();
    for id in ids {
        let id = SessionId::parse(id).expect("id");
        if let Some(s) = h.get(&id).await.expect("get") {
            out.push(s);
        }
    }
    out
}
