//! Logging of a store that does not answer, rate-limited per activity.
//!
//! During an outage every loop of every process fails about once a second (claims, leader
//! election, checkpoints, requests). [`unavailable`] logs the first failure of an activity at
//! once ("store unavailable, retrying"), then at most one line per [`REPEAT_EVERY`] saying how
//! often it failed in the last minute ("store unavailable, retrying (57 times in the last
//! minute)"); [`answered`] logs once that the activity succeeds again after failures. The
//! underlying error is in every line, for the operator.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// At most one line per activity this often while it keeps failing.
pub const REPEAT_EVERY: Duration = Duration::from_secs(10);

const WINDOW: Duration = Duration::from_secs(60);
const KEEP: usize = 100_000;

#[derive(Default)]
struct Activity {
    /// Failures in the last minute.
    failures: VecDeque<Instant>,
    /// Failures since the activity last succeeded.
    streak: u64,
    last_logged: Option<Instant>,
}

/// How many activities have failed since they last succeeded: while none has, [`answered`]
/// (called on every successful claim, checkpoint and event read) does not take the lock.
/// Changed only under the lock.
static OPEN_STREAKS: AtomicUsize = AtomicUsize::new(0);

fn activities() -> &'static Mutex<HashMap<&'static str, Activity>> {
    static A: OnceLock<Mutex<HashMap<&'static str, Activity>>> = OnceLock::new();
    A.get_or_init(Mutex::default)
}

/// What [`unavailable`] decided to log, if anything (for tests of the wording).
pub fn note_failure(what: &'static str, at: Instant) -> Option<String> {
    let mut all = activities().lock().unwrap_or_else(|p| p.into_inner());
    let a = all.entry(what).or_default();
    while a
        .failures
        .front()
        .is_some_and(|t| at.saturating_duration_since(*t) > WINDOW)
    {
        a.failures.pop_front();
    }
    if a.failures.len() >= KEEP {
        a.failures.pop_front();
    }
    a.failures.push_back(at);
    a.streak += 1;
    if a.streak == 1 {
        OPEN_STREAKS.fetch_add(1, Ordering::Release);
    }
    let due = a
        .last_logged
        .is_none_or(|t| at.saturating_duration_since(t) >= REPEAT_EVERY);
    if !due {
        return None;
    }
    a.last_logged = Some(at);
    let n = a.failures.len();
    Some(if a.streak == 1 {
        format!("store unavailable ({what}), retrying")
    } else {
        format!("store unavailable ({what}), retrying ({n} times in the last minute)")
    })
}

/// Logs (rate-limited) that `what` failed because the store did not answer.
pub fn unavailable(what: &'static str, error: &dyn std::fmt::Display) {
    if let Some(line) = note_failure(what, Instant::now()) {
        tracing::warn!(error = %error, "{line}");
    }
}

/// Logs, once, that `what` succeeded after failing; one atomic load when no activity is
/// failing.
pub fn answered(what: &'static str) {
    if OPEN_STREAKS.load(Ordering::Acquire) == 0 {
        return;
    }
    let mut all = activities().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(a) = all.get_mut(what)
        && a.streak > 0
    {
        tracing::info!(
            failures = a.streak,
            "store answers again ({what}) after {} failed tries",
            a.streak
        );
        a.streak = 0;
        a.last_logged = None;
        OPEN_STREAKS.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_failures_are_logged_once_per_interval_with_their_count() {
        let t0 = Instant::now();
        let what = "test activity";
        assert_eq!(
            note_failure(what, t0).as_deref(),
            Some("store unavailable (test activity), retrying")
        );
        for i in 1..57 {
            assert_eq!(
                note_failure(what, t0 + Duration::from_millis(i * 100)),
                None
            );
        }
        assert_eq!(
            note_failure(what, t0 + REPEAT_EVERY).as_deref(),
            Some("store unavailable (test activity), retrying (58 times in the last minute)")
        );
        answered(what);
        assert_eq!(
            note_failure(what, t0 + REPEAT_EVERY + Duration::from_millis(1)).as_deref(),
            Some("store unavailable (test activity), retrying")
        );
    }
}
