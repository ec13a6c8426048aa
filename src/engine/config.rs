//! The scraper config language: one serde schema read from TOML or JSON, `{{var}}`
//! substitution, and validation that compiles every selector and regex once per session.
//!
//! Configs travel as JSON (a TOML text submitted by a user is converted first, see
//! [`parse_config_text`]). [`compile`] turns a JSON config plus session params into a
//! [`CompiledConfig`], or a [`ConfigError`] naming the field path and what is wrong, e.g.
//! `pages.product.fields.price.regex: invalid regex "([": unclosed group (at character 1)`. Unknown keys are refused so a typo
//! never silently does nothing.
//!
//! Any tenant may submit a config, so compiling one is bounded: the config's size, what `{{var}}`
//! substitution may add ([`MAX_VAR_BYTES`], [`MAX_EXPANDED_BYTES`]), how many rules, selectors,
//! regexes and XPath expressions it holds, how large each regex may grow once compiled
//! ([`REGEX_SIZE_LIMIT`]) and how long validation may take ([`VALIDATION_TIME_LIMIT`]). Each limit
//! is checked before the work it bounds, so a config over one costs little to refuse.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use regex::Regex;
use scraper::Selector;
use url::Url;

use super::canon::canonicalize;

mod regex_cache;
mod schema;
pub use schema::{FieldSpec, FieldType, FollowRule, HttpSettings, Limits, PageSpec, ScraperConfig};

/// Largest config accepted, in bytes of its JSON form before substitution (a TOML text is
/// measured once converted). The API's body limit is configurable; this one is not.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

/// Largest value one `{{name}}` may substitute (a `[vars]` entry or a param), in bytes.
pub const MAX_VAR_BYTES: usize = 64 * 1024;

/// Largest total, in bytes, of the strings that substitution rewrites, after substitution. A
/// 10 KB variable referenced 20,000 times would otherwise expand a 60 KB body to 200 MB.
pub const MAX_EXPANDED_BYTES: usize = 1 << 20;

/// Most `[[follow]]` rules.
pub const MAX_FOLLOW_RULES: usize = 256;

/// Most page types (`[pages.NAME]`).
pub const MAX_PAGE_TYPES: usize = 256;

/// Most fields, over all page types.
pub const MAX_FIELDS: usize = 1024;

/// Most CSS selectors (follow rules, items and fields together).
pub const MAX_SELECTORS: usize = 1024;

/// Most regexes (fields' `regex`).
pub const MAX_REGEXES: usize = 128;

/// Most XPath expressions (follow rules and fields together).
pub const MAX_XPATHS: usize = 256;

/// Most start URLs.
pub const MAX_START_URLS: usize = 10_000;

/// Longest selector, regex or XPath expression, in bytes.
pub const MAX_EXPRESSION_BYTES: usize = 4096;

/// `RegexBuilder::size_limit` and `dfa_size_limit` of every field's regex: 1 MiB each. A
/// Unicode `\w{150}` needs about 10 MiB and took 190 ms to compile; under this limit it is
/// refused in a fraction of that, while ordinary extraction regexes use a few KiB.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Longest a validation may take (checked between compiled expressions); beyond it the config is
/// refused as too costly. Only submission and `POST /v1/configs/validate` are timed: an
/// attempt compiles a config that was already accepted.
pub const VALIDATION_TIME_LIMIT: Duration = Duration::from_secs(10);

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
    if text.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::Syntax(format!(
            "the config is {} bytes, more than the {MAX_CONFIG_BYTES} allowed; split it into \
             several configs",
            text.len()
        )));
    }
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
    compile_with(config, params, &Budget { deadline: None })
}

/// [`compile`] that gives up, refusing the config, once compiling has taken longer than
/// `time_limit` (checked between expressions): validation at submission uses it with
/// [`VALIDATION_TIME_LIMIT`].
pub fn compile_within(
    config: &serde_json::Value,
    params: &BTreeMap<String, String>,
    time_limit: Duration,
) -> Result<CompiledConfig, ConfigError> {
    let budget = Budget {
        deadline: Instant::now().checked_add(time_limit),
    };
    compile_with(config, params, &budget)
}

/// When compiling must stop.
struct Budget {
    deadline: Option<Instant>,
}

impl Budget {
    /// Err when the deadline passed; `path` is the expression about to be compiled.
    fn check(&self, path: &str) -> Result<(), ConfigError> {
        match self.deadline {
            Some(d) if Instant::now() > d => Err(ConfigError::field(
                path,
                format!(
                    "validating the config took longer than {} s, the limit, before this \
                     expression; use fewer or simpler selectors, regexes and XPath expressions",
                    VALIDATION_TIME_LIMIT.as_secs()
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// Whether `v` as JSON is at most `max` bytes (stops serializing past it).
fn json_fits(v: &serde_json::Value, max: usize) -> bool {
    struct Counter {
        n: usize,
        max: usize,
    }
    impl std::io::Write for Counter {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.n = self.n.saturating_add(b.len());
            if self.n > self.max {
                return Err(std::io::Error::other("over the limit"));
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    serde_json::to_writer(&mut Counter { n: 0, max }, v).is_ok()
}

/// The start of `s` for an error message (at most 60 characters).
fn excerpt(s: &str) -> String {
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{:?}…", &s[..i]),
        None => format!("{s:?}"),
    }
}

fn compile_with(
    config: &serde_json::Value,
    params: &BTreeMap<String, String>,
    budget: &Budget,
) -> Result<CompiledConfig, ConfigError> {
    let Some(obj) = config.as_object() else {
        return Err(ConfigError::Syntax(
            "the config must be a table (a JSON object)".into(),
        ));
    };
    if !json_fits(config, MAX_CONFIG_BYTES) {
        return Err(ConfigError::Syntax(format!(
            "the config is larger than {MAX_CONFIG_BYTES} bytes (as JSON), the limit; split it \
             into several configs"
        )));
    }
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
        let mut expanded = 0usize;
        for (k, v) in map.iter_mut() {
            if k != "vars" {
                let mut path = k.clone();
                substitute(v, &vars, &mut path, &mut expanded)?;
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
    let mut compiled = check(cfg, budget)?;
    compiled.vars = vars.into_iter().collect();
    Ok(compiled)
}

/// Replaces `{{name}}` in every string below `v`. `expanded` counts the bytes of the strings
/// rewritten so far: the total may not pass [`MAX_EXPANDED_BYTES`], and it is checked before
/// each value is copied, so a refused config never holds more than the limit in memory.
fn substitute(
    v: &mut serde_json::Value,
    vars: &HashMap<String, String>,
    path: &mut String,
    expanded: &mut usize,
) -> Result<(), ConfigError> {
    match v {
        serde_json::Value::String(s) if s.contains("{{") => {
            let mut out = String::with_capacity(s.len().min(MAX_EXPANDED_BYTES));
            let mut rest = s.as_str();
            // Bounded: each iteration consumes at least the `{{` it found.
            while let Some(start) = rest.find("{{") {
                out.push_str(&rest[..start]);
                let after = &rest[start + 2..];
                let Some(end) = after.find("}}") else {
                    return Err(ConfigError::field(
                        path.clone(),
                        format!(
                            "unclosed `{{{{` in {}; write {{{{name}}}}",
                            excerpt(&rest[start..])
                        ),
                    ));
                };
                let name = after[..end].trim();
                let Some(val) = vars.get(name) else {
                    return Err(ConfigError::field(
                        path.clone(),
                        format!(
                            "unknown variable {}; define it in [vars] or pass it as a param",
                            excerpt(name)
                        ),
                    ));
                };
                if val.len() > MAX_VAR_BYTES {
                    return Err(ConfigError::field(
                        path.clone(),
                        format!(
                            "variable {name:?} is {} bytes, more than the {MAX_VAR_BYTES} a \
                             substituted value may have; pass less text",
                            val.len()
                        ),
                    ));
                }
                if expanded.saturating_add(out.len()).saturating_add(val.len()) > MAX_EXPANDED_BYTES
                {
                    return Err(ConfigError::field(
                        path.clone(),
                        format!(
                            "substituting {{{{{name}}}}} makes the config's substituted strings \
                             larger than {MAX_EXPANDED_BYTES} bytes, the limit; reference large \
                             variables fewer times"
                        ),
                    ));
                }
                out.push_str(val);
                rest = &after[end + 2..];
            }
            out.push_str(rest);
            if expanded.saturating_add(out.len()) > MAX_EXPANDED_BYTES {
                return Err(ConfigError::field(
                    path.clone(),
                    format!(
                        "the config's substituted strings are larger than {MAX_EXPANDED_BYTES} \
                         bytes, the limit; reference large variables fewer times"
                    ),
                ));
            }
            *expanded += out.len();
            *s = out;
        }
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                substitute(item, vars, path, expanded)?;
                path.truncate(len);
            }
        }
        serde_json::Value::Object(map) => {
            for (k, item) in map.iter_mut() {
                let len = path.len();
                path.push('.');
                path.push_str(k);
                substitute(item, vars, path, expanded)?;
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

/// Err when an expression is longer than [`MAX_EXPRESSION_BYTES`].
fn expression_length(path: &str, what: &str, s: &str) -> Result<(), ConfigError> {
    if s.len() > MAX_EXPRESSION_BYTES {
        return Err(ConfigError::field(
            path,
            format!(
                "this {what} is {} bytes, more than the {MAX_EXPRESSION_BYTES} allowed; \
                 shorten it",
                s.len()
            ),
        ));
    }
    Ok(())
}

fn selector(path: &str, s: &str, budget: &Budget) -> Result<Selector, ConfigError> {
    if s.trim().is_empty() {
        return Err(ConfigError::field(path, "empty CSS selector"));
    }
    expression_length(path, "selector", s)?;
    budget.check(path)?;
    Selector::parse(s).map_err(|e| ConfigError::field(path, super::diagnose::css_error(s, &e)))
}

fn regex(path: &str, r: &str, budget: &Budget) -> Result<Regex, ConfigError> {
    expression_length(path, "regex", r)?;
    budget.check(path)?;
    regex_cache::compile(r)
        .map_err(|e| ConfigError::field(path, super::diagnose::regex_error(r, &e)))
}

/// Err when `n` things of a kind are more than `max`.
fn at_most(path: &str, what: &str, n: usize, max: usize) -> Result<(), ConfigError> {
    if n > max {
        return Err(ConfigError::field(
            path,
            format!("has {n} {what}, more than the {max} allowed; split the config"),
        ));
    }
    Ok(())
}

/// Counts rules and expressions before any is compiled, so an oversized config is refused at
/// the cost of counting.
fn check_counts(cfg: &ScraperConfig) -> Result<(), ConfigError> {
    at_most("start_urls", "URLs", cfg.start_urls.len(), MAX_START_URLS)?;
    at_most("follow", "rules", cfg.follow.len(), MAX_FOLLOW_RULES)?;
    at_most("pages", "page types", cfg.pages.len(), MAX_PAGE_TYPES)?;
    let fields = cfg.pages.values().map(|p| p.fields.len()).sum();
    at_most("pages", "fields", fields, MAX_FIELDS)?;
    let selectors = cfg.follow.iter().filter(|r| r.selector.is_some()).count()
        + cfg
            .pages
            .values()
            .map(|p| {
                usize::from(p.item.is_some())
                    + p.fields.values().filter(|f| f.selector.is_some()).count()
            })
            .sum::<usize>();
    at_most("pages", "CSS selectors", selectors, MAX_SELECTORS)?;
    let regexes = cfg
        .pages
        .values()
        .map(|p| p.fields.values().filter(|f| f.regex.is_some()).count())
        .sum();
    at_most("pages", "regexes", regexes, MAX_REGEXES)?;
    let xpaths = cfg.follow.iter().filter(|r| r.xpath.is_some()).count()
        + cfg
            .pages
            .values()
            .map(|p| p.fields.values().filter(|f| f.xpath.is_some()).count())
            .sum::<usize>();
    at_most("pages", "XPath expressions", xpaths, MAX_XPATHS)?;
    Ok(())
}

fn check(cfg: ScraperConfig, budget: &Budget) -> Result<CompiledConfig, ConfigError> {
    if cfg.start_urls.is_empty() {
        return Err(ConfigError::field("start_urls", "needs at least one URL"));
    }
    check_counts(&cfg)?;
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
                let selector = selector(&format!("follow[{i}].selector"), s, budget)?;
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
                LinkSource::XPath(xpath(
                    &format!("follow[{i}].xpath"),
                    x,
                    &mut xpaths,
                    budget,
                )?)
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
            Some(s) => Some(selector(&format!("{base}.item"), s, budget)?),
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
                    xp = Some(xpath(&format!("{fpath}.xpath"), x, &mut xpaths, budget)?);
                    None
                }
                (Some(s), None) => Some(selector(&format!("{fpath}.selector"), s, budget)?),
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
                Some(r) => Some(regex(&format!("{fpath}.regex"), r, budget)?),
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
fn xpath(
    path: &str,
    expr: &str,
    all: &mut Vec<String>,
    budget: &Budget,
) -> Result<usize, ConfigError> {
    if expr.trim().is_empty() {
        return Err(ConfigError::field(path, "empty XPath expression"));
    }
    expression_length(path, "XPath expression", expr)?;
    if let Some(i) = all.iter().position(|e| e == expr) {
        return Ok(i);
    }
    budget.check(path)?;
    super::xml::xpath::check(expr).map_err(|e| ConfigError::field(path, e))?;
    all.push(expr.to_string());
    Ok(all.len() - 1)
}
