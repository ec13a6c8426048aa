//! A session's scraper config: JSON kept as the text it is stored as, parsed on first use.
//!
//! The store decodes a session for every claim, heartbeat, checkpoint and finish, and encodes it
//! again after each. With the config held as a [`serde_json::Value`], every decode parsed the
//! config's JSON text and every encode printed it again, though none of those steps reads it:
//! for the crawl bench's config (about 1 KiB) a decode took 35k instructions under callgrind
//! against 5k for a no-op config. Only the job (when an attempt starts), the API and the export
//! look inside; they parse the text once per loaded session. Clones share both forms.

use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// A scraper config, normalized to JSON. Reads as a [`Value`] (`Deref`); stored (bincode) as
/// its JSON text, shown (JSON) as the value.
#[derive(Clone)]
pub struct JobConfig(Arc<Forms>);

/// At least one of the two is set from the start; the other is derived from it once.
struct Forms {
    text: OnceLock<Box<str>>,
    value: OnceLock<Value>,
}

impl JobConfig {
    /// A config read from the store as JSON text, not parsed until it is read.
    fn from_text(text: String) -> JobConfig {
        JobConfig(Arc::new(Forms {
            text: OnceLock::from(text.into_boxed_str()),
            value: OnceLock::new(),
        }))
    }

    /// The config as JSON text (compact), printed once if it was made from a value.
    pub fn text(&self) -> &str {
        self.0.text.get_or_init(|| {
            // A `Value` always prints: its map keys are strings.
            serde_json::to_string(self.value())
                .unwrap_or_default()
                .into_boxed_str()
        })
    }

    /// The config as a JSON value, parsed once if it was read as text.
    pub fn value(&self) -> &Value {
        self.0.value.get_or_init(|| {
            let text = self.0.text.get().map(|t| &**t).unwrap_or("null");
            // The text was printed from a value by `text` and kept under the store's checksums
            // (sled) or in a bytea column (PostgreSQL), so it parses; were it damaged anyway,
            // the job would refuse a null config and fail the session saying so.
            serde_json::from_str(text).unwrap_or_else(|e| {
                tracing::error!(error = %e, "a stored session config is not JSON; reading it as null");
                Value::Null
            })
        })
    }
}

impl From<Value> for JobConfig {
    fn from(v: Value) -> JobConfig {
        JobConfig(Arc::new(Forms {
            text: OnceLock::new(),
            value: OnceLock::from(v),
        }))
    }
}

impl std::ops::Deref for JobConfig {
    type Target = Value;

    fn deref(&self) -> &Value {
        self.value()
    }
}

impl PartialEq for JobConfig {
    fn eq(&self, other: &JobConfig) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
            || match (self.0.text.get(), other.0.text.get()) {
                // Printed by the same code from values, equal texts are equal values; unequal
                // ones may still be (an older release's printing), so they are compared as
                // values.
                (Some(a), Some(b)) if a == b => true,
                _ => self.value() == other.value(),
            }
    }
}

impl PartialEq<Value> for JobConfig {
    fn eq(&self, other: &Value) -> bool {
        self.value() == other
    }
}

impl std::fmt::Debug for JobConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.value(), f)
    }
}

impl Serialize for JobConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            self.value().serialize(s)
        } else {
            // The same bytes as `json_text` wrote for a `Value`: stored sessions read alike.
            s.serialize_str(self.text())
        }
    }
}

impl<'de> Deserialize<'de> for JobConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<JobConfig, D::Error> {
        if d.is_human_readable() {
            Value::deserialize(d).map(JobConfig::from)
        } else {
            String::deserialize(d).map(JobConfig::from_text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config() -> Value {
        json!({"name": "shop", "start_urls": ["http://127.0.0.1:9/"],
               "pages": {"start": {"fields": {"title": "h1", "price": {"css": ".p", "type": "number"}}}},
               "vars": {"q": "é\"\\n"}})
    }

    /// Stored with bincode, a config is the JSON text `json_text` wrote for a `Value` (so every
    /// stored session reads alike), and reads back as the same value without being parsed
    /// until it is read.
    #[test]
    fn bincode_keeps_the_json_text_and_reads_back_the_same_value() {
        #[derive(Serialize, Deserialize)]
        struct Old {
            #[serde(with = "crate::session::json_text")]
            config: Value,
        }
        #[derive(Serialize, Deserialize)]
        struct New {
            config: JobConfig,
        }
        // bincode as the store uses it (this module may not depend on the store's).
        let bc = bincode::config::standard();
        let old = bincode::serde::encode_to_vec(Old { config: config() }, bc).expect("encode old");
        let new = bincode::serde::encode_to_vec(
            New {
                config: config().into(),
            },
            bc,
        )
        .expect("encode new");
        assert_eq!(old, new, "the stored bytes changed");
        let (back, _): (New, usize) = bincode::serde::decode_from_slice(&new, bc).expect("decode");
        assert!(back.config.0.value.get().is_none(), "parsed while decoding");
        assert_eq!(*back.config, config());
        let (back_old, _): (Old, usize) =
            bincode::serde::decode_from_slice(&new, bc).expect("decode");
        assert_eq!(back_old.config, config());
    }

    /// In JSON (the API) a config is the value itself, not a string.
    #[test]
    fn json_shows_the_value() {
        let c = JobConfig::from(config());
        let shown = serde_json::to_value(&c).expect("to json");
        assert_eq!(shown, config());
        let read: JobConfig = serde_json::from_value(config()).expect("from json");
        assert_eq!(read, c);
    }

    /// Equality is the values' whatever form each holds; a clone shares the parse.
    #[test]
    fn equality_is_by_value_and_clones_share() {
        let a = JobConfig::from(config());
        let b = JobConfig::from_text(config().to_string());
        let spaced = JobConfig::from_text(serde_json::to_string_pretty(&config()).expect("pretty"));
        assert_eq!(a, b);
        assert_eq!(b, spaced);
        assert_eq!(a, config());
        assert_ne!(a, JobConfig::from(json!({"name": "other"})));
        assert_eq!(a.text(), b.text());
        let d = JobConfig::from_text(config().to_string());
        let e = d.clone();
        assert_eq!(e["name"], "shop");
        assert!(d.0.value.get().is_some(), "the clone's parse is shared");
    }

    /// Damaged text reads as null (the job then refuses it), and says so; it does not panic.
    #[test]
    fn text_that_is_not_json_reads_as_null() {
        let c = JobConfig::from_text("{\"name\": ".into());
        assert_eq!(*c, Value::Null);
    }
}
