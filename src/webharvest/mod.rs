//! Web-Harvest XML configs, run as sessions beside the TOML/JSON scraper.
//!
//! A config whose first non-blank character is `<` is Web-Harvest XML. [`parse`] validates it
//! completely at submission (malformed XML, unknown processors and attributes, BeanShell-only
//! script syntax and literal XPath and regular expressions that do not compile are all refused
//! with a line and column); [`run_program`] interprets it; [`WebHarvestJob`] is the [`Job`] the
//! queue runs. The interpreter never touches the store or the network itself: it reaches out only
//! through a [`Host`] ([`FetchHost`] is harvest's fetcher and a confined directory), and hands
//! progress to the job's checkpoint sink through it. Its result is the session scope's variables
//! ([`RunOutput::variables`]), the session's context.
//!
//! Modules by concern: `parse` (XML → program tree), `grammar` (the processors and their
//! attributes), `eval` (the interpreter), `value` (texts and lists), `scope` (variables),
//! `template` (`${…}`), `script` (JavaScript), `xpath`, `html` (`html-to-xml`), `regexp`, `json`,
//! `http` (requests and decoding), `file` (confined files), `host` (the way out), `run` (the
//! interpreter's thread and its host calls), `job`.
//!
//! [`Job`]: crate::job::Job

use std::time::Duration;

mod eval;
mod file;
mod grammar;
mod host;
mod http;
mod job;
mod json;
mod parse;
mod regexp;
mod run;
mod scope;
mod script;
mod template;
mod value;

#[cfg(test)]
mod tests;

pub use file::DirFiles;
pub use host::{
    FetchHost, FileOp, FileOutput, Host, HostError, HostSettings, HttpRequest, HttpResponse,
    LogLevel, Progress,
};
pub use job::{WebHarvestJob, WebHarvestSettings};
pub use parse::{
    MAX_CONFIG_BYTES, MAX_DEPTH, MAX_ELEMENTS, ParseError, Program, parse, parse_within,
};
pub use run::{RunError, RunErrorKind, RunOutput, run_program};
pub use value::VarValue;

/// Whether a config text is Web-Harvest XML (its first non-blank character is `<`).
pub fn is_webharvest_config(text: &str) -> bool {
    text.trim_start().starts_with('<')
}

/// What one run may use. No config can exhaust memory or run forever: loops, recursion,
/// variables, `html-to-xml` output, scripts and requests are all capped (and the session's
/// `max_duration` bounds the wall clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Iterations of a `loop` or `while` without `maxloops` (default 100 000); more is a failure
    /// (an explicit `maxloops` stops the loop quietly, as in Web-Harvest).
    pub max_loops: u64,
    /// Nested function calls (default 100).
    pub max_call_depth: usize,
    /// Bytes all variables may hold together, and any one intermediate value (default 64 MiB).
    pub max_variable_bytes: usize,
    /// Largest `html-to-xml` output, and largest XML an `xpath` reads (default 16 MiB).
    pub max_html_xml_bytes: usize,
    /// Memory of the script engine (default 64 MiB).
    pub script_memory_bytes: usize,
    /// Time of one script evaluation, a `<script>` or a `${…}` (default 5 s).
    pub script_time: Duration,
    /// Bytes `file` may write in a run (default 256 MiB).
    pub max_file_bytes: u64,
    /// HTTP requests (`http` processors) in a run (default 100 000). A response body is capped
    /// by the HTTP settings' `max_body_bytes`.
    pub max_http_requests: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_loops: 100_000,
            max_call_depth: 100,
            max_variable_bytes: 64 << 20,
            max_html_xml_bytes: 16 << 20,
            script_memory_bytes: 64 << 20,
            script_time: Duration::from_secs(5),
            max_file_bytes: 256 << 20,
            max_http_requests: 100_000,
        }
    }
}
