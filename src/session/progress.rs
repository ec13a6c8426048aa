//! What a session did: counters over its attempts, each attempt's outcome, token usage.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{SessionStatus, Timestamp};

/// Progress of a session, over all its attempts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionMetrics {
    /// When its first attempt started.
    pub start_time: Option<Timestamp>,
    /// When the session ended.
    pub end_time: Option<Timestamp>,
    /// Pages fetched and processed (all attempts).
    pub pages_processed: u64,
    /// Elements processed (all attempts): the records extracted, for the scraper; the
    /// processors executed, for a Web-Harvest config.
    pub processed_elements: u64,
    /// Time spent running, in ended attempts.
    pub running_ms: u64,
    /// When the attempt running now started (`None` unless RUNNING).
    pub running_since: Option<Timestamp>,
}

impl SessionMetrics {
    /// From the first start to the end (or to `now` while not ended).
    pub fn duration(&self, now: Timestamp) -> Duration {
        match self.start_time {
            Some(start) => self.end_time.unwrap_or(now).since(start),
            None => Duration::ZERO,
        }
    }

    /// Time spent running, every attempt's, up to `now` for the one running.
    pub fn running_time(&self, now: Timestamp) -> Duration {
        let current = self.running_since.map_or(Duration::ZERO, |t| now.since(t));
        Duration::from_millis(self.running_ms) + current
    }

    /// Elements per second of running time (time between attempts, waiting in the queue,
    /// does not count).
    pub fn processing_rate(&self, now: Timestamp) -> f64 {
        let secs = self.running_time(now).as_secs_f64();
        if secs > 0.0 {
            self.processed_elements as f64 / secs
        } else {
            0.0
        }
    }
}

/// How one attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// The session COMPLETED.
    Completed,
    /// The session ended FAILED.
    Failed,
    /// The session ended CANCELLED.
    Cancelled,
    /// It failed and was queued for another attempt.
    Retried,
    /// Its worker handed it back unfinished (shutdown), without spending an attempt.
    HandedBack,
    /// Its worker stopped renewing the lease (died, or was cut off); taken back.
    LeaseExpired,
}

impl AttemptOutcome {
    /// The outcome of an attempt that ended the session in `status`.
    pub fn ended(status: SessionStatus) -> AttemptOutcome {
        match status {
            SessionStatus::Completed => AttemptOutcome::Completed,
            SessionStatus::Cancelled => AttemptOutcome::Cancelled,
            _ => AttemptOutcome::Failed,
        }
    }

    /// Snake-case name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Completed => "completed",
            AttemptOutcome::Failed => "failed",
            AttemptOutcome::Cancelled => "cancelled",
            AttemptOutcome::Retried => "retried",
            AttemptOutcome::HandedBack => "handed_back",
            AttemptOutcome::LeaseExpired => "lease_expired",
        }
    }

    /// The outcome named `s`.
    pub fn parse(s: &str) -> Option<AttemptOutcome> {
        [
            AttemptOutcome::Completed,
            AttemptOutcome::Failed,
            AttemptOutcome::Cancelled,
            AttemptOutcome::Retried,
            AttemptOutcome::HandedBack,
            AttemptOutcome::LeaseExpired,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
    }
}

/// One attempt of a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// Its number (the session's `attempt` while it ran).
    pub attempt: u32,
    /// When it was claimed.
    pub started_at: Timestamp,
    /// When it ended (`None` while running).
    pub ended_at: Option<Timestamp>,
    /// How it ended (`None` while running).
    pub outcome: Option<AttemptOutcome>,
}

/// Attempts a session remembers: the newest, when more ran (a session handed back at every
/// shutdown could otherwise grow without bound).
pub const ATTEMPTS_KEPT: usize = 20;

/// Usage counters of a session (the seed's TokenTracker). Summable per client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    /// HTTP requests sent (retries included).
    pub http_requests: u64,
    /// Requests that ended in an error (transport error or status >= 400).
    pub http_errors: u64,
    /// Response body bytes received.
    pub bytes_received: u64,
    /// Retries sent.
    pub retries: u64,
    /// URLs not fetched because robots.txt disallows them.
    pub robots_blocked: u64,
}

impl std::ops::AddAssign for TokenUsage {
    fn add_assign(&mut self, o: TokenUsage) {
        self.http_requests += o.http_requests;
        self.http_errors += o.http_errors;
        self.bytes_received += o.bytes_received;
        self.retries += o.retries;
        self.robots_blocked += o.robots_blocked;
    }
}
