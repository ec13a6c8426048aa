//! Compiled regexes shared by every config compile of the process.
//!
//! A batch of one config's runs validates the same config once per item (each item has its own
//! params), and every attempt of a session compiles its config again: the same few patterns are
//! compiled over and over. A profile of 1000-item batches of `examples/catalog.toml` with
//! distinct params put about 40% of the server's samples in regex-automata building the one
//! regex's prefilter. The cache keeps compiled regexes by pattern text.
//!
//! Any tenant's config reaches it, so it is bounded twice: only a regex whose compiled form fits
//! [`CACHED_SIZE_LIMIT`] is kept (a larger one, still within the config's
//! [`REGEX_SIZE_LIMIT`](super::REGEX_SIZE_LIMIT), is compiled for its caller and not kept), and
//! at most [`ENTRIES`] are kept (the map is emptied when full, so a stream of distinct patterns
//! costs recompiles, never memory). A regex handed out is a clone: it shares the compiled
//! program, and its match caches are its own. Errors are never kept.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use regex::{Regex, RegexBuilder};

/// Largest compiled regex the cache keeps (`RegexBuilder::size_limit`), in bytes. Extraction
/// regexes take a few KiB.
pub(super) const CACHED_SIZE_LIMIT: usize = 64 * 1024;

/// Most regexes kept: with [`CACHED_SIZE_LIMIT`], about 8 MiB of compiled programs at most.
pub(super) const ENTRIES: usize = 128;

/// The process's cache.
static SHARED: LazyLock<RegexCache> = LazyLock::new(RegexCache::default);

/// Compiles `pattern` with the config's limits, through the process's cache.
pub(super) fn compile(pattern: &str) -> Result<Regex, regex::Error> {
    SHARED.compile(pattern)
}

fn build(pattern: &str, size_limit: usize) -> Result<Regex, regex::Error> {
    RegexBuilder::new(pattern)
        .size_limit(size_limit)
        .dfa_size_limit(super::REGEX_SIZE_LIMIT)
        .build()
}

/// A bounded map from pattern to compiled regex (see the module docs).
#[derive(Default)]
pub(super) struct RegexCache {
    map: Mutex<HashMap<String, Regex>>,
}

impl RegexCache {
    /// The compiled `pattern`: the kept one, or a new one (kept when it fits
    /// [`CACHED_SIZE_LIMIT`]). Compiling a pattern the same way twice gives the same regex, so a
    /// kept one answers exactly as a new one would.
    pub(super) fn compile(&self, pattern: &str) -> Result<Regex, regex::Error> {
        if let Some(re) = self.lock().get(pattern) {
            return Ok(re.clone());
        }
        match build(pattern, CACHED_SIZE_LIMIT) {
            Ok(re) => {
                let mut map = self.lock();
                if map.len() >= ENTRIES {
                    map.clear();
                }
                map.insert(pattern.to_string(), re.clone());
                Ok(re)
            }
            // Too big to keep: compiled under the config's own limit, for this caller only.
            Err(regex::Error::CompiledTooBig(_)) => build(pattern, super::REGEX_SIZE_LIMIT),
            Err(e) => Err(e),
        }
    }

    /// Regexes kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether `pattern` is kept.
    #[cfg(test)]
    fn contains(&self, pattern: &str) -> bool {
        self.lock().contains_key(pattern)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Regex>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pattern_is_compiled_once_and_answers_as_a_new_one() {
        let cache = RegexCache::default();
        let re = cache.compile(r"([0-9]+\.[0-9]+)").expect("valid");
        assert!(cache.contains(r"([0-9]+\.[0-9]+)"));
        let again = cache.compile(r"([0-9]+\.[0-9]+)").expect("valid");
        assert_eq!(cache.len(), 1);
        for text in ["$12.50", "none", "1.2.3"] {
            assert_eq!(
                re.captures(text).map(|c| c[1].to_string()),
                again.captures(text).map(|c| c[1].to_string())
            );
        }
        assert_eq!(
            again.captures("price 12.50").map(|c| c[1].to_string()),
            Some("12.50".into())
        );
    }

    #[test]
    fn errors_and_big_regexes_are_not_kept() {
        let cache = RegexCache::default();
        let e = cache.compile("([").expect_err("unclosed group");
        assert!(matches!(e, regex::Error::Syntax(_)), "{e:?}");
        // Over the cache's limit, within the config's: compiled, not kept.
        let big = r"\w{12}";
        let re = cache.compile(big).expect("within the config's limit");
        assert!(re.is_match("abcdefghijkl"));
        assert!(!cache.contains(big));
        assert!(matches!(
            build(big, CACHED_SIZE_LIMIT),
            Err(regex::Error::CompiledTooBig(_))
        ));
        // Over the config's limit: refused as before.
        assert!(matches!(
            cache.compile(r"\w{150}"),
            Err(regex::Error::CompiledTooBig(_))
        ));
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn the_cache_never_holds_more_than_its_entries() {
        let cache = RegexCache::default();
        for i in 0..(ENTRIES * 2 + 7) {
            cache.compile(&format!("item-{i}")).expect("valid");
            assert!(cache.len() <= ENTRIES);
        }
        assert!(cache.contains(&format!("item-{}", ENTRIES * 2 + 6)));
    }
}
