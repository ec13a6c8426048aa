//! The config language as written: the serde schema of a scraper config (after `{{var}}`
//! substitution, before compilation), with its defaults.

use std::collections::BTreeMap;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

/// The config as written (after `{{var}}` substitution), before compilation.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScraperConfig {
    /// A name for people (logs, summaries).
    #[serde(default)]
    pub name: Option<String>,
    /// Where the crawl starts (depth 0).
    pub start_urls: Vec<String>,
    /// Page type (key of `pages`) of the start URLs, if they should be extracted.
    #[serde(default)]
    pub start_page: Option<String>,
    /// Variable defaults, used as `{{name}}`; session params override them.
    #[serde(default)]
    pub vars: BTreeMap<String, serde_json::Value>,
    /// Crawl limits.
    #[serde(default)]
    pub limits: Limits,
    /// Fetching behaviour.
    #[serde(default)]
    pub http: HttpSettings,
    /// Link rules: which links to enqueue.
    #[serde(default)]
    pub follow: Vec<FollowRule>,
    /// Extraction per page type.
    #[serde(default)]
    pub pages: BTreeMap<String, PageSpec>,
    /// Export sinks of its sessions (the worker runs them; the engine ignores them).
    #[serde(default)]
    pub export: crate::sink::ExportSpec,
}

/// `[limits]`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Pages fetched at most (1..=10,000,000).
    pub max_pages: u64,
    /// Links followed from a start URL at most (0..=100000).
    pub max_depth: u32,
    /// Records extracted at most (1..=100,000,000).
    pub max_records: u64,
    /// Fail the crawl (`error_ratio_exceeded`) when more than this share (0..=1) of the pages
    /// it tried failed (after retries). `None`: failed pages are only logged.
    pub max_error_ratio: Option<f64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pages: 10_000,
            max_depth: 20,
            max_records: 1_000_000,
            max_error_ratio: None,
        }
    }
}

/// `[http]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Requests in flight for the session (1..=512).
    pub concurrency: usize,
    /// Requests in flight per host (1..=512).
    pub per_host_concurrency: usize,
    /// Politeness delay between requests to one host (0..=60000).
    pub delay_ms: u64,
    /// Timeout of one request, body included (100..=300000).
    pub timeout_ms: u64,
    /// Retries on connect errors, timeouts, 429 and 5xx (0..=10).
    pub retries: u32,
    /// Largest body read; a longer page is cut off and logged (1024..=104857600).
    pub max_body_bytes: usize,
    /// Fetch robots.txt once per host and obey it.
    pub obey_robots_txt: bool,
    /// The User-Agent header (its first word is the robots.txt agent token).
    pub user_agent: String,
    /// Redirects followed at most per page (0..=20).
    pub max_redirects: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            concurrency: 16,
            per_host_concurrency: 8,
            delay_ms: 0,
            timeout_ms: 10_000,
            retries: 2,
            max_body_bytes: 5_000_000,
            obey_robots_txt: true,
            user_agent: "harvest/0.1 (+https://example.invalid/bot)".into(),
            max_redirects: 10,
        }
    }
}

/// One `[[follow]]` rule.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FollowRule {
    /// CSS selector of the link elements.
    #[serde(default)]
    pub selector: Option<String>,
    /// XPath expression giving the URLs themselves (`//a[@rel='next']/@href`), instead of
    /// `selector`.
    #[serde(default)]
    pub xpath: Option<String>,
    /// Attribute holding the URL (default `href`; with `selector` only).
    #[serde(default)]
    pub attr: Option<String>,
    /// Page type of the pages these links lead to.
    #[serde(default)]
    pub page: Option<String>,
}

/// `[pages.NAME]`: extraction for one page type.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PageSpec {
    /// One record per element matching this selector (fields relative to it); otherwise one record
    /// per page.
    #[serde(default)]
    pub item: Option<String>,
    /// The record's fields.
    #[serde(default)]
    pub fields: BTreeMap<String, FieldSpec>,
}

/// Type of an extracted value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    /// The text as is.
    #[default]
    String,
    /// A JSON number (f64).
    Number,
    /// A JSON integer (i64).
    Integer,
    /// `true`/`false`/`yes`/`no`/`1`/`0`.
    Bool,
}

/// One field: a bare selector string, or a table.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FieldSpec {
    /// CSS selector; absent means the item element (or the whole page).
    pub selector: Option<String>,
    /// XPath expression over the whole page, instead of `selector`: attributes and text nodes
    /// give their text, elements their serialized XML, functions their value.
    pub xpath: Option<String>,
    /// Take this attribute instead of the text.
    pub attr: Option<String>,
    /// Keep the first capture group (or the whole match) of this regex; no match gives null.
    pub regex: Option<String>,
    /// Convert to this type; a value that does not convert gives null.
    pub r#type: FieldType,
    /// Resolve the value as a URL against the page's URL.
    pub absolute_url: bool,
    /// An array of all matches instead of the first.
    pub all: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FieldTable {
    #[serde(default)]
    selector: Option<String>,
    #[serde(default)]
    xpath: Option<String>,
    #[serde(default)]
    attr: Option<String>,
    #[serde(default)]
    regex: Option<String>,
    #[serde(default, rename = "type")]
    ty: FieldType,
    #[serde(default)]
    absolute_url: bool,
    #[serde(default)]
    all: bool,
}

impl<'de> Deserialize<'de> for FieldSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Hand-written instead of `#[serde(untagged)]`: untagged enums swallow the inner error,
        // and the field path of a bad `type` or unknown key would be lost.
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FieldSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a CSS selector string or a table of selector, xpath, attr, regex, type, absolute_url, all")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<FieldSpec, E> {
                Ok(FieldSpec {
                    selector: Some(s.to_string()),
                    ..FieldSpec::default()
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<FieldSpec, A::Error> {
                let t = FieldTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(FieldSpec {
                    selector: t.selector,
                    xpath: t.xpath,
                    attr: t.attr,
                    regex: t.regex,
                    r#type: t.ty,
                    absolute_url: t.absolute_url,
                    all: t.all,
                })
            }
        }
        d.deserialize_any(V)
    }
}
