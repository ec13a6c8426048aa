//! Server-Sent Events over HTTP: a session's events in order until its terminal event, a late
//! client's first event is the current state, and progress is throttled.

use std::time::Duration;

use serde_json::json;

use crate::api_support::{CONFIG, SseReader, start};

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_stream_sends_its_events_in_order_and_ends_after_completed() {
    let s = start(CONFIG).await;
    let mut all = SseReader::open(&s, "/v1/events", None).await;
    // The job waits for the gate, so the stream is open before anything but creation happens.
    s.submit(json!({"config": {"name": "x", "wait_gate": true, "records": 300, "per_checkpoint": 10}, "session_id": "ev"}))
        .await;
    let mut one = SseReader::open(&s, "/v1/sessions/ev/events", None).await;
    let first = one.next(T).await.expect("current state first");
    assert!(
        first.event == "created" || first.event == "started",
        "{first:?}"
    );
    assert_eq!(first.data["session_id"], "ev");
    assert!(first.data["session"]["status"].is_string());
    s.gate.add_permits(1);
    let rest = one.collect(1000, T).await;
    let kinds: Vec<&str> = std::iter::once(first.event.as_str())
        .chain(rest.iter().map(|e| e.event.as_str()))
        .collect();
    assert_eq!(kinds.last(), Some(&"completed"), "{kinds:?}");
    assert_eq!(rest.last().unwrap().data["session"]["records"], 300);
    let started = kinds
        .iter()
        .position(|k| *k == "started")
        .expect("a started event");
    assert!(
        kinds[..started].iter().all(|k| *k == "created"),
        "{kinds:?}"
    );
    assert!(
        kinds[started + 1..kinds.len() - 1]
            .iter()
            .all(|k| *k == "progress"),
        "{kinds:?}"
    );
    // Progress counts only grow.
    let counts: Vec<u64> = rest
        .iter()
        .filter(|e| e.event == "progress")
        .map(|e| e.data["session"]["records"].as_u64().unwrap())
        .collect();
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");

    // The all-sessions stream saw created, started, ..., completed for it, in order.
    let mut seen = Vec::new();
    for _ in 0..1000 {
        let e = all
            .next(T)
            .await
            .expect("the all-sessions stream does not end");
        if e.data["session_id"] == "ev" {
            seen.push(e.event.clone());
            if e.event == "completed" {
                break;
            }
        }
    }
    assert_eq!(
        seen.first().map(String::as_str),
        Some("created"),
        "{seen:?}"
    );
    assert_eq!(seen.get(1).map(String::as_str), Some("started"), "{seen:?}");
    assert_eq!(
        seen.last().map(String::as_str),
        Some("completed"),
        "{seen:?}"
    );

    // A late client gets the final state at once and the stream ends.
    let mut late = SseReader::open(&s, "/v1/sessions/ev/events", None).await;
    let e = late.next(T).await.expect("the current state");
    assert_eq!(e.event, "completed");
    assert_eq!(e.data["session"]["status"], "COMPLETED");
    assert!(
        late.next(T).await.is_none(),
        "stream ends after the terminal state"
    );

    // Closing the session is the `removed` event on the all-sessions stream.
    let r = s
        .call(reqwest::Method::DELETE, "/v1/sessions/ev", None, None)
        .await;
    assert_eq!(r.status, reqwest::StatusCode::OK);
    for _ in 0..100 {
        let e = all.next(T).await.expect("an event");
        if e.data["session_id"] == "ev" && e.event == "removed" {
            return;
        }
    }
    panic!("no removed event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_sent_at_most_twice_a_second() {
    let s = start(CONFIG).await;
    s.submit(json!({"config": {"name": "x", "wait_gate": true, "records": 2000, "per_checkpoint": 5}, "session_id": "fast"}))
        .await;
    let mut one = SseReader::open(&s, "/v1/sessions/fast/events", None).await;
    let opened = tokio::time::Instant::now();
    one.next(T).await.expect("current state");
    s.gate.add_permits(1);
    let rest = one.collect(5000, T).await;
    let elapsed = opened.elapsed().as_secs_f64();
    let progress = rest.iter().filter(|e| e.event == "progress").count();
    // 400 checkpoints were committed; at most one progress per 500 ms (plus the first) goes out.
    let bound = (elapsed / 0.5).floor() as usize + 1;
    assert!(
        progress <= bound,
        "{progress} progress events in {elapsed:.2} s"
    );
    assert_eq!(rest.last().map(|e| e.event.as_str()), Some("completed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_session_stream_ends_with_cancelled_and_unknown_is_404() {
    let s = start(CONFIG).await;
    s.submit(json!({"config": {"name": "x"}, "session_id": "c", "options": {"run_at": "2999-01-01T00:00:00Z"}}))
        .await;
    let mut one = SseReader::open(&s, "/v1/sessions/c/events", None).await;
    assert_eq!(one.next(T).await.expect("state").event, "created");
    let r = s.post("/v1/sessions/c/cancel", &json!({})).await;
    assert_eq!(r.status, reqwest::StatusCode::ACCEPTED);
    let e = one.next(T).await.expect("cancelled");
    assert_eq!(e.event, "cancelled");
    assert!(one.next(T).await.is_none());
    s.get("/v1/sessions/none/events")
        .await
        .assert_error(404, "not_found");
    s.get("/v1/events?colour=red")
        .await
        .assert_error(400, "invalid_request");
}

/// sled keeps the process's recent events in memory: a client that reconnects with
/// `Last-Event-ID` gets the events after that id, in order, none twice, then the live ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_replays_the_missed_events_then_the_live_ones() {
    let s = start(CONFIG).await;
    let mut all = SseReader::open(&s, "/v1/events", None).await;
    s.submit(
        json!({"config": {"name": "x", "records": 20, "per_checkpoint": 5}, "session_id": "a"}),
    )
    .await;
    let mut before = Vec::new();
    loop {
        let e = all.next(T).await.expect("event");
        assert!(e.id.is_some(), "every event has an id: {e:?}");
        let started = e.event == "started";
        before.push(e);
        if started {
            break;
        }
    }
    let last = before.last().and_then(|e| e.id).expect("id");
    drop(all);
    // Missed while disconnected: the rest of a, all of b.
    s.submit(json!({"config": {"name": "x", "records": 3}, "session_id": "b"}))
        .await;
    s.wait_terminal("a").await;
    s.wait_terminal("b").await;
    let mut resumed = SseReader::open_after(&s, "/v1/events", None, Some(last)).await;
    let mut replayed = Vec::new();
    while !(replayed
        .iter()
        .any(|e: &crate::api_support::Sse| e.event == "completed" && e.data["session_id"] == "a")
        && replayed
            .iter()
            .any(|e| e.event == "completed" && e.data["session_id"] == "b"))
    {
        replayed.push(resumed.next(T).await.expect("replayed event"));
    }
    let ids: Vec<u64> = replayed.iter().map(|e| e.id.expect("id")).collect();
    assert!(
        ids[0] > last && ids.windows(2).all(|w| w[0] < w[1]),
        "{ids:?}"
    );
    let of = |who: &str| -> Vec<String> {
        replayed
            .iter()
            .filter(|e| e.data["session_id"] == who && e.event != "progress")
            .map(|e| e.event.clone())
            .collect()
    };
    assert_eq!(of("a"), ["completed"]);
    assert_eq!(of("b"), ["created", "started", "completed"]);
    // Then the live ones.
    s.submit(json!({"config": {"name": "x", "records": 1}, "session_id": "c"}))
        .await;
    let live = resumed.next(T).await.expect("live event");
    assert_eq!(
        (live.event.as_str(), &live.data["session_id"]),
        ("created", &json!("c"))
    );
    assert!(live.id > ids.last().copied());

    // An id that is not one is refused.
    let bad = s
        .http
        .get(format!("{}/v1/events", s.base))
        .header("Last-Event-ID", "yesterday")
        .send()
        .await
        .expect("sent");
    assert_eq!(bad.status(), 400);
}
