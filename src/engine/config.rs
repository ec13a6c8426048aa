//! The scraper config language: one serde schema read from TOML or JSON, `{{var}}`
//! substitution, and validation that compiles every selector and regex once per session.
//!
//! Configs travel as JSON (a TOML text submitted by a user is converted first, see
//! [`parse_config_text`]). [`compile`] turns a JSON config plus session params into a
//! [`CompiledConfig`], or a [`ConfigError`] naming the field path and what is wrong, e.g.
//! `pages.product.fields.price.regex: invalid regex "([": unclosed group (at character 1)`. Unknown keys are refused so a typo
//! never silently does nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use regex::Regex;
use scraper::Selector;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use url::Url;

use super::canon::canonicalize;

/// A config that cannot be used, with the field it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The text is neither valid TOML nor valid JSON.
    #[error("{0}")]
    Syntax(String),
    /// A field has a bad value, is missing, or is unknown.
    #[error("{path}: {message}")]
    Field {
        /// Dotted path of the field, e.g. `pages.product.fields.price.regex`.
        path: String,
        /// What is wrong and what to do.
        message: String,
    },
}

impl ConfigError {
    fn field(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Field {
            path: path.into(),
            message: message.into(),
        }
    }

    /// The field path, when the error is about one field.
    pub fn path(&self) -> Option<&str> {
        match self {
            ConfigError::Field { path, .. } => Some(path),
            ConfigError::Syntax(_) => None,
        }
    }
}

/// Reads a config text, TOML or JSON (a text whose first non-blank character is `{` is JSON),
/// into the JSON value every other part of harvest stores and validates.
pub fn parse_config_text(text: &str) -> Result<serde_json::Value, ConfigError> {
    let value = if text.trim_start().starts_with('{') {
        serde_json::from_str::<serde_json::Value>(text)
            .map_err(|e| ConfigError::Syntax(format!("invalid JSON: {e}")))?
    } else {
        let t: toml::Table = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        serde_json::to_value(t)
            .map_err(|e| ConfigError::Syntax(format!("TOML value has no JSON form: {e}")))?
    };
    if !value.is_object() {
        return Err(ConfigError::Syntax(
            "the config must be a table (a JSON object)".into(),
        ));
    }
    Ok(value)
}

/// A TOML error in one line, with the line and column of the fault (the toml crate draws a
/// multi-line excerpt).
fn toml_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let what = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
    match e.span() {
        Some(span) => {
            // Floored to a character boundary (at most 3 steps back): the span is in bytes.
            let mut end = span.start.min(text.len());
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let before = &text[..end];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            ConfigError::Syntax(format!(
                "invalid TOML at line {line}, column {column}: {what}"
            ))
        }
        None => ConfigError::Syntax(format!("invalid TOML: {what}")),
    }
}

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

/// A config ready to run: URLs parsed, selectors and regexes compiled once per session.
#[derive(Debug)]
pub struct CompiledConfig {
    /// The config's name (or `scrape`).
    pub name: String,
    /// Canonical start URLs.
    pub start_urls: Vec<String>,
    /// Page type of the start URLs.
    pub start_page: Option<String>,
    /// Limits.
    pub limits: Limits,
    /// HTTP settings.
    pub http: HttpSettings,
    /// Link rules.
    pub follow: Vec<CompiledFollow>,
    /// Extraction per page type.
    pub pages: HashMap<String, CompiledPage>,
    /// The variables in effect: `[vars]`, overridden by the session's params (the session's
    /// context when it ends).
    pub vars: BTreeMap<String, String>,
    /// The XPath expressions of the follow rules and fields, each checked at compile time and
    /// evaluated once per page against the page converted to XML (only when there are any).
    pub xpaths: Vec<String>,
}

/// Where a follow rule finds its URLs.
#[derive(Debug)]
pub enum LinkSource {
    /// The `attr` attribute of the elements the selector matches.
    Css {
        /// Link elements.
        selector: Selector,
        /// URL attribute.
        attr: String,
    },
    /// The texts of an XPath expression's results, by index into [`CompiledConfig::xpaths`].
    XPath(usize),
}

/// A compiled `[[follow]]` rule.
#[derive(Debug)]
pub struct CompiledFollow {
    /// Where the URLs are.
    pub source: LinkSource,
    /// Page type of the targets.
    pub page: Option<Arc<str>>,
}

/// A compiled page type.
#[derive(Debug)]
pub struct CompiledPage {
    /// One record per match, when set.
    pub item: Option<Selector>,
    /// Fields in name order.
    pub fields: Vec<CompiledField>,
}

/// A compiled field.
#[derive(Debug)]
pub struct CompiledField {
    /// Key in the record.
    pub name: String,
    /// Where to look (None: the item or page root, unless `xpath` is set).
    pub selector: Option<Selector>,
    /// Or an XPath expression over the page, by index into [`CompiledConfig::xpaths`].
    pub xpath: Option<usize>,
    /// Attribute to read instead of text.
    pub attr: Option<String>,
    /// Regex whose first group (or whole match) is kept.
    pub regex: Option<Regex>,
    /// Target type.
    pub ty: FieldType,
    /// Resolve as URL.
    pub absolute_url: bool,
    /// All matches.
    pub all: bool,
}

/// Substitutes variables, checks every field and compiles the config. `params` override `[vars]`.
pub fn compile(
    config: &serde_json::Value,
    params: &BTreeMap<String, String>,
) -> Result<CompiledConfig, ConfigError> {
    let Some(obj) = config.as_object() else {
        return Err(ConfigError::Syntax(
            "the config must be a table (a JSON object)".into(),
        ));
    };
    // Checked on the raw config: the worker reads `[export]` without substituting variables.
    crate::sink::ExportSpec::of(config).map_err(|e| match e.split_once(": ") {
        Some((field, msg)) => ConfigError::field(field, msg),
        None => ConfigError::field("export", e.as_str()),
    })?;
    let mut vars: HashMap<String, String> = HashMap::new();
    if let Some(v) = obj.get("vars") {
        let Some(v) = v.as_object() else {
            return Err(ConfigError::field(
                "vars",
                "must be a table of name = value",
            ));
        };
        for (k, val) in v {
            let s = match val {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                _ => {
                    return Err(ConfigError::field(
                        format!("vars.{k}"),
                        "must be a string, number or boolean",
                    ));
                }
            };
            vars.insert(k.clone(), s);
        }
    }
    for (k, v) in params {
        vars.insert(k.clone(), v.clone());
    }
    let mut value = config.clone();
    if let Some(map) = value.as_object_mut() {
        for (k, v) in map.iter_mut() {
            if k != "vars" {
                let mut path = k.clone();
                substitute(v, &vars, &mut path)?;
            }
        }
    }
    let cfg: ScraperConfig = serde_path_to_error::deserialize(&value).map_err(|e| {
        let mut path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // serde names a missing field in the message, at its parent's path: name it in the path.
        if let Some(name) = inner
            .strip_prefix("missing field `")
            .and_then(|r| r.strip_suffix('`'))
        {
            path = if path == "." {
                name.to_string()
            } else {
                format!("{path}.{name}")
            };
            return ConfigError::field(path, "missing; this field is required");
        }
        if path == "." {
            ConfigError::Syntax(inner)
        } else {
            ConfigError::field(path, inner)
        }
    })?;
    let mut compiled = check(cfg)?;
    compiled.vars = vars.into_iter().collect();
    Ok(compiled)
}

/// Replaces `{{name}}` in every string below `v`.
fn substitute(
    v: &mut serde_json::Value,
    vars: &HashMap<String, String>,
    path: &mut String,
) -> Result<(), ConfigError> {
    match v {
        serde_json::Value::String(s) if s.contains("{{") => {
            let mut out = String::with_capacity(s.len());
            let mut rest = s.as_str();
            // Bounded: each iteration consumes at least the `{{` it found.
            while let Some(start) = rest.find("{{") {
                out.push_str(&rest[..start]);
                let after = &rest[start + 2..];
                let Some(end) = after.find("}}") else {
                    return Err(ConfigError::field(
                        path.clone(),
                        format!("unclosed `{{{{` in {s:?}; write {{{{name}}}}"),
                    ));
                };
                let name = after[..end].trim();
                match vars.get(name) {
                    Some(val) => out.push_str(val),
                    None => {
                        return Err(ConfigError::field(
                            path.clone(),
                            format!(
                                "unknown variable {name:?}; define it in [vars] or pass it as a param"
                            ),
                        ));
                    }
                }
                rest = &after[end + 2..];
            }
            out.push_str(rest);
            *s = out;
        }
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                substitute(item, vars, path)?;
                path.truncate(len);
            }
        }
        serde_json::Value::Object(map) => {
            for (k, item) in map.iter_mut() {
                let len = path.len();
                path.push('.');
                path.push_str(k);
                substitute(item, vars, path)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

fn range<T: PartialOrd + std::fmt::Display + Copy>(
    path: &str,
    v: T,
    lo: T,
    hi: T,
) -> Result<(), ConfigError> {
    if v < lo || v > hi {
        return Err(ConfigError::field(
            path,
            format!("must be between {lo} and {hi}, got {v}"),
        ));
    }
    Ok(())
}

fn selector(path: &str, s: &str) -> Result<Selector, ConfigError> {
    if s.trim().is_empty() {
        return Err(ConfigError::field(path, "empty CSS selector"));
    }
    Selector::parse(s).map_err(|e| ConfigError::field(path, super::diagnose::css_error(s, &e)))
}

fn check(cfg: ScraperConfig) -> Result<CompiledConfig, ConfigError> {
    if cfg.start_urls.is_empty() {
        return Err(ConfigError::field("start_urls", "needs at least one URL"));
    }
    let mut start_urls = Vec::with_capacity(cfg.start_urls.len());
    for (i, u) in cfg.start_urls.iter().enumerate() {
        let path = format!("start_urls[{i}]");
        let url = Url::parse(u).map_err(|e| ConfigError::field(&path, format!("{u:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(ConfigError::field(
                &path,
                format!("{u:?}: only http and https URLs with a host"),
            ));
        }
        let url = canonicalize(url);
        if url.len() > super::canon::MAX_URL_BYTES {
            return Err(ConfigError::field(
                &path,
                format!(
                    "is {} bytes long; the limit is {}",
                    url.len(),
                    super::canon::MAX_URL_BYTES
                ),
            ));
        }
        start_urls.push(url);
    }
    if let Some(p) = &cfg.start_page
        && !cfg.pages.contains_key(p)
    {
        return Err(ConfigError::field(
            "start_page",
            format!("unknown page type {p:?}; define [pages.{p}]"),
        ));
    }
    let l = cfg.limits;
    range("limits.max_pages", l.max_pages, 1, 10_000_000)?;
    range("limits.max_depth", l.max_depth, 0, 100_000)?;
    range("limits.max_records", l.max_records, 1, 100_000_000)?;
    if let Some(r) = l.max_error_ratio
        && !(0.0..=1.0).contains(&r)
    {
        return Err(ConfigError::field(
            "limits.max_error_ratio",
            format!("{r} is not a share of pages; use a number from 0 to 1, e.g. 0.2"),
        ));
    }
    let h = &cfg.http;
    range("http.concurrency", h.concurrency, 1, 512)?;
    range("http.per_host_concurrency", h.per_host_concurrency, 1, 512)?;
    range("http.delay_ms", h.delay_ms, 0, 60_000)?;
    range("http.timeout_ms", h.timeout_ms, 100, 300_000)?;
    range("http.retries", h.retries, 0, 10)?;
    range("http.max_body_bytes", h.max_body_bytes, 1024, 104_857_600)?;
    range("http.max_redirects", h.max_redirects, 0, 20)?;
    if h.user_agent.trim().is_empty() || h.user_agent.len() > 512 {
        return Err(ConfigError::field(
            "http.user_agent",
            "must be 1 to 512 characters",
        ));
    }
    if reqwest::header::HeaderValue::from_str(&h.user_agent).is_err() {
        return Err(ConfigError::field(
            "http.user_agent",
            "contains characters not allowed in a header",
        ));
    }
    let mut xpaths: Vec<String> = Vec::new();
    let mut follow = Vec::with_capacity(cfg.follow.len());
    for (i, r) in cfg.follow.iter().enumerate() {
        let source = match (&r.selector, &r.xpath) {
            (Some(s), None) => {
                let selector = selector(&format!("follow[{i}].selector"), s)?;
                let attr = r.attr.clone().unwrap_or_else(|| "href".into());
                if attr.trim().is_empty() {
                    return Err(ConfigError::field(
                        format!("follow[{i}].attr"),
                        "empty attribute name",
                    ));
                }
                LinkSource::Css { selector, attr }
            }
            (None, Some(x)) => {
                if r.attr.is_some() {
                    return Err(ConfigError::field(
                        format!("follow[{i}].attr"),
                        "an xpath rule gives the URLs itself; select the attribute in the \
                         expression (`//a/@href`) and drop `attr`",
                    ));
                }
                LinkSource::XPath(xpath(&format!("follow[{i}].xpath"), x, &mut xpaths)?)
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError::field(
                    format!("follow[{i}]"),
                    "give either `selector` or `xpath`, not both",
                ));
            }
            (None, None) => {
                return Err(ConfigError::field(
                    format!("follow[{i}].selector"),
                    "missing; give a CSS selector of the links, or an `xpath` of their URLs",
                ));
            }
        };
        if let Some(p) = &r.page
            && !cfg.pages.contains_key(p)
        {
            return Err(ConfigError::field(
                format!("follow[{i}].page"),
                format!("unknown page type {p:?}; define [pages.{p}]"),
            ));
        }
        follow.push(CompiledFollow {
            source,
            page: r.page.as_deref().map(Arc::from),
        });
    }
    let mut pages = HashMap::with_capacity(cfg.pages.len());
    for (name, spec) in &cfg.pages {
        let base = format!("pages.{name}");
        let item = match &spec.item {
            Some(s) => Some(selector(&format!("{base}.item"), s)?),
            None => None,
        };
        if spec.fields.is_empty() {
            return Err(ConfigError::field(
                format!("{base}.fields"),
                "a page type needs at least one field",
            ));
        }
        let mut fields = Vec::with_capacity(spec.fields.len());
        for (fname, f) in &spec.fields {
            let fpath = format!("{base}.fields.{fname}");
            let mut xp = None;
            let sel = match (&f.selector, &f.xpath) {
                (Some(_), Some(_)) => {
                    return Err(ConfigError::field(
                        fpath,
                        "give either `selector` or `xpath`, not both",
                    ));
                }
                (None, Some(x)) => {
                    if item.is_some() {
                        return Err(ConfigError::field(
                            format!("{fpath}.xpath"),
                            "an xpath field reads the whole page, so it cannot be relative to \
                             this page type's `item`; use a CSS `selector`, or drop `item`",
                        ));
                    }
                    if f.attr.is_some() {
                        return Err(ConfigError::field(
                            format!("{fpath}.attr"),
                            "select the attribute in the xpath expression (`//img/@src`) and \
                             drop `attr`",
                        ));
                    }
                    xp = Some(xpath(&format!("{fpath}.xpath"), x, &mut xpaths)?);
                    None
                }
                (Some(s), None) => Some(selector(&format!("{fpath}.selector"), s)?),
                (None, None) if f.attr.is_none() && item.is_none() => {
                    return Err(ConfigError::field(
                        format!("{fpath}.selector"),
                        "missing; give a CSS selector or an `xpath` (only an item field may read \
                         its element itself)",
                    ));
                }
                (None, None) => None,
            };
            let regex = match &f.regex {
                Some(r) => Some(Regex::new(r).map_err(|e| {
                    ConfigError::field(
                        format!("{fpath}.regex"),
                        super::diagnose::regex_error(r, &e),
                    )
                })?),
                None => None,
            };
            if let Some(a) = &f.attr
                && a.trim().is_empty()
            {
                return Err(ConfigError::field(
                    format!("{fpath}.attr"),
                    "empty attribute name",
                ));
            }
            if f.absolute_url && f.r#type != FieldType::String {
                return Err(ConfigError::field(
                    format!("{fpath}.absolute_url"),
                    "only a string field can be a URL; drop `type` or `absolute_url`",
                ));
            }
            fields.push(CompiledField {
                name: fname.clone(),
                selector: sel,
                xpath: xp,
                attr: f.attr.clone(),
                regex,
                ty: f.r#type,
                absolute_url: f.absolute_url,
                all: f.all,
            });
        }
        pages.insert(name.clone(), CompiledPage { item, fields });
    }
    Ok(CompiledConfig {
        name: cfg.name.clone().unwrap_or_else(|| "scrape".into()),
        start_urls,
        start_page: cfg.start_page.clone(),
        limits: cfg.limits,
        http: cfg.http.clone(),
        follow,
        pages,
        vars: BTreeMap::new(),
        xpaths,
    })
}

/// Checks an XPath expression and returns its index in `all` (shared by equal expressions).
fn xpath(path: &str, expr: &str, all: &mut Vec<String>) -> Result<usize, ConfigError> {
    if expr.trim().is_empty() {
        return Err(ConfigError::field(path, "empty XPath expression"));
    }
    if let Some(i) = all.iter().position(|e| e == expr) {
        return Ok(i);
    }
    super::xml::xpath::check(expr).map_err(|e| ConfigError::field(path, e))?;
    all.push(expr.to_string());
    Ok(all.len() - 1)
}
