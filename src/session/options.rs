//! Per-session options and their patches (agent defaults merged with a run's own).

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use super::Timestamp;

/// Per-session options. In JSON and TOML durations are whole seconds named `*_secs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionOptions {
    /// Wall clock of one attempt; exceeding it ends the session FAILED
    /// (`max_duration_exceeded`). `None`: no limit.
    pub max_duration_secs: Option<u64>,
    /// How long a terminal session and its data stay before cleanup. `None`: the service default.
    pub session_timeout_secs: Option<u64>,
    /// Keep usage counters (TokenUsage).
    pub token_tracking: bool,
    /// Attempts before a failing session ends FAILED. `None`: the service default.
    pub max_attempts: Option<u32>,
    /// Higher runs first.
    pub priority: i32,
    /// Not before this time.
    pub run_at: Option<Timestamp>,
    /// Remove the session's records once its client has read them all.
    pub remove_after_export: bool,
    /// Remove externally exported rows at cleanup.
    pub cleanup_external: bool,
}

impl SessionOptions {
    /// Largest `max_duration_secs` a submission may ask for: one year. Bounds keep every
    /// deadline computed from it well inside the range of the clocks.
    pub const MAX_DURATION_SECS: u64 = 365 * 86_400;

    /// Largest `session_timeout_secs` a submission may ask for: ten years.
    pub const MAX_TIMEOUT_SECS: u64 = 10 * 365 * 86_400;

    /// Largest `max_attempts` a submission (or `sessions.max_attempts`) may ask for. Every
    /// store keeps it exactly (PostgreSQL's column is a 32-bit integer).
    pub const MAX_ATTEMPTS: u32 = 10_000;

    /// Checks the options a caller gave: `Err` names the option and what to change. The upper
    /// bounds keep every deadline computed from them well inside the range of the clocks (an
    /// unchecked u64::MAX once overflowed the worker's and the scheduler's arithmetic) and every
    /// value within what each store keeps.
    pub fn check(&self) -> Result<(), String> {
        match self.max_attempts {
            Some(0) => return Err("options.max_attempts must be at least 1".into()),
            Some(n) if n > Self::MAX_ATTEMPTS => {
                return Err(format!(
                    "options.max_attempts must be at most {}, not {n}",
                    Self::MAX_ATTEMPTS
                ));
            }
            _ => {}
        }
        match self.max_duration_secs {
            Some(0) => {
                return Err(
                    "options.max_duration_secs must be at least 1 (omit it for no limit)".into(),
                );
            }
            Some(d) if d > Self::MAX_DURATION_SECS => {
                return Err(format!(
                    "options.max_duration_secs must be at most {} (one year)",
                    Self::MAX_DURATION_SECS
                ));
            }
            _ => {}
        }
        if self
            .session_timeout_secs
            .is_some_and(|d| d > Self::MAX_TIMEOUT_SECS)
        {
            return Err(format!(
                "options.session_timeout_secs must be at most {} (ten years)",
                Self::MAX_TIMEOUT_SECS
            ));
        }
        Ok(())
    }

    /// `max_duration_secs` as a duration, clamped to [`SessionOptions::MAX_DURATION_SECS`] (a
    /// value stored by an older build cannot overflow deadline arithmetic).
    pub fn max_duration(&self) -> Option<Duration> {
        self.max_duration_secs
            .map(|d| Duration::from_secs(d.min(Self::MAX_DURATION_SECS)))
    }
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            max_duration_secs: None,
            session_timeout_secs: None,
            token_tracking: true,
            max_attempts: None,
            priority: 0,
            run_at: None,
            remove_after_export: false,
            cleanup_external: true,
        }
    }
}

/// Session options as a caller gives them: only the keys present. Applied over a base (the
/// defaults for a submission; the agent's options for an agent's run, so that a run's options
/// replace the agent's defaults key by key). `null` clears a key that may be unset
/// (`max_duration_secs`, `session_timeout_secs`, `max_attempts`, `run_at`); an unknown key or a
/// bad value is refused with its name, as for [`SessionOptions`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptionsPatch {
    /// See [`SessionOptions::max_duration_secs`].
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_duration_secs: Option<Option<u64>>,
    /// See [`SessionOptions::session_timeout_secs`].
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub session_timeout_secs: Option<Option<u64>>,
    /// See [`SessionOptions::token_tracking`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_tracking: Option<bool>,
    /// See [`SessionOptions::max_attempts`].
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_attempts: Option<Option<u32>>,
    /// See [`SessionOptions::priority`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// See [`SessionOptions::run_at`].
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub run_at: Option<Option<Timestamp>>,
    /// See [`SessionOptions::remove_after_export`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove_after_export: Option<bool>,
    /// See [`SessionOptions::cleanup_external`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleanup_external: Option<bool>,
}

/// A key that is present, even as `null` (`Some(None)`), as opposed to absent (`None`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

impl OptionsPatch {
    /// `base` with every key this patch gives replaced.
    pub fn apply_to(&self, base: &SessionOptions) -> SessionOptions {
        let mut o = base.clone();
        if let Some(v) = self.max_duration_secs {
            o.max_duration_secs = v;
        }
        if let Some(v) = self.session_timeout_secs {
            o.session_timeout_secs = v;
        }
        if let Some(v) = self.token_tracking {
            o.token_tracking = v;
        }
        if let Some(v) = self.max_attempts {
            o.max_attempts = v;
        }
        if let Some(v) = self.priority {
            o.priority = v;
        }
        if let Some(v) = self.run_at {
            o.run_at = v;
        }
        if let Some(v) = self.remove_after_export {
            o.remove_after_export = v;
        }
        if let Some(v) = self.cleanup_external {
            o.cleanup_external = v;
        }
        o
    }
}

impl From<SessionOptions> for OptionsPatch {
    /// Every key set to the options' value.
    fn from(o: SessionOptions) -> OptionsPatch {
        OptionsPatch {
            max_duration_secs: Some(o.max_duration_secs),
            session_timeout_secs: Some(o.session_timeout_secs),
            token_tracking: Some(o.token_tracking),
            max_attempts: Some(o.max_attempts),
            priority: Some(o.priority),
            run_at: Some(o.run_at),
            remove_after_export: Some(o.remove_after_export),
            cleanup_external: Some(o.cleanup_external),
        }
    }
}
