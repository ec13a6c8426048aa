//! Decoding and extraction: bytes to text (charset from the header, then `<meta charset>`, then
//! UTF-8), then links and records with the session's precompiled selectors.
//!
//! `scraper::Html` is not `Send`, so a page is parsed and fully used inside the synchronous
//! [`extract_page`]; nothing of it lives across an `.await`.

use std::borrow::Cow;
use std::sync::Arc;

use encoding_rs::{Encoding, UTF_8};
use scraper::{ElementRef, Html};
use serde_json::{Map, Value};
use url::Url;

use super::canon::resolve;
use super::config::{CompiledConfig, CompiledField, CompiledPage, FieldType, LinkSource};
use super::xml::{html, xpath};

/// Largest XML a page may become for XPath, and largest text one expression may give.
const XPATH_MAX_BYTES: usize = 16 << 20;

/// What one page gave.
#[derive(Debug, Default)]
pub struct Extracted {
    /// Records, in document order.
    pub records: Vec<Value>,
    /// Canonical link targets with the page type their rule names.
    pub links: Vec<(String, Option<Arc<str>>)>,
    /// What could not be evaluated (an XPath expression failing on this page): its fields are
    /// null, its links missing.
    pub errors: Vec<String>,
}

/// Decodes a body: charset from `content_type`, else from a `<meta>` in the first 1024 bytes,
/// else UTF-8 (a BOM wins over all). The flag says whether bytes were invalid and replaced.
pub fn decode<'a>(body: &'a [u8], content_type: Option<&str>) -> (Cow<'a, str>, bool) {
    let enc = content_type
        .and_then(charset_param)
        .and_then(|l| Encoding::for_label(l.as_bytes()))
        .or_else(|| sniff_meta(&body[..body.len().min(1024)]))
        .unwrap_or(UTF_8);
    let (text, _, had_errors) = enc.decode(body);
    (text, had_errors)
}

fn charset_param(ct: &str) -> Option<&str> {
    ct.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("charset")
            .then(|| v.trim().trim_matches('"'))
    })
}

fn sniff_meta(head: &[u8]) -> Option<&'static Encoding> {
    const NEEDLE: &[u8] = b"charset";
    let mut i = 0;
    // Bounded by the 1024-byte head.
    while i + NEEDLE.len() < head.len() {
        if head[i..i + NEEDLE.len()].eq_ignore_ascii_case(NEEDLE) {
            let mut j = i + NEEDLE.len();
            while j < head.len() && matches!(head[j], b' ' | b'\t' | b'\n' | b'\r') {
                j += 1;
            }
            if j < head.len() && head[j] == b'=' {
                j += 1;
                while j < head.len() && matches!(head[j], b' ' | b'"' | b'\'') {
                    j += 1;
                }
                let start = j;
                while j < head.len()
                    && (head[j].is_ascii_alphanumeric()
                        || matches!(head[j], b'-' | b'_' | b':' | b'.'))
                {
                    j += 1;
                }
                if let Some(e) = Encoding::for_label(&head[start..j]) {
                    // A page declaring UTF-16 in ASCII-compatible bytes is really UTF-8 (HTML spec).
                    return Some(
                        if e == encoding_rs::UTF_16LE || e == encoding_rs::UTF_16BE {
                            UTF_8
                        } else {
                            e
                        },
                    );
                }
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    None
}

/// Parses `html` and returns its links (by the follow rules) and records (by `page`'s fields).
pub fn extract_page(
    cfg: &CompiledConfig,
    page: Option<&CompiledPage>,
    url: &Url,
    html: &str,
) -> Extracted {
    let doc = Html::parse_document(html);
    let mut out = Extracted::default();
    let mut xp = XPaths::new(cfg, &doc, html);
    for rule in &cfg.follow {
        match &rule.source {
            LinkSource::Css { selector, attr } => {
                for el in doc.select(selector) {
                    if let Some(target) = el.value().attr(attr).and_then(|h| resolve(url, h)) {
                        out.links.push((target, rule.page.clone()));
                    }
                }
            }
            LinkSource::XPath(i) => {
                for h in xp.results(*i) {
                    if let Some(target) = resolve(url, h.trim()) {
                        out.links.push((target, rule.page.clone()));
                    }
                }
            }
        }
    }
    if let Some(page) = page {
        match &page.item {
            Some(item) => {
                for el in doc.select(item) {
                    out.records.push(record(page, el, url, &mut xp));
                }
            }
            None => out
                .records
                .push(record(page, doc.root_element(), url, &mut xp)),
        }
    }
    out.errors = xp.errors;
    out
}

/// The page's XPath results, evaluated on first use: the page becomes XML once, each expression
/// runs at most once.
struct XPaths<'a> {
    cfg: &'a CompiledConfig,
    doc: &'a Html,
    html: &'a str,
    /// The parsed XML, or why there is none; built on first use.
    xml: Option<Result<xpath::Document, ()>>,
    results: Vec<Option<Vec<String>>>,
    errors: Vec<String>,
}

impl<'a> XPaths<'a> {
    fn new(cfg: &'a CompiledConfig, doc: &'a Html, html: &'a str) -> XPaths<'a> {
        XPaths {
            cfg,
            doc,
            html,
            xml: None,
            results: Vec::new(),
            errors: Vec::new(),
        }
    }

    fn results(&mut self, i: usize) -> &[String] {
        if self.results.len() <= i {
            self.results.resize(self.cfg.xpaths.len().max(i + 1), None);
        }
        if self.results[i].is_none() {
            let r = self.evaluate(i);
            self.results[i] = Some(r);
        }
        self.results[i].as_deref().unwrap_or_default()
    }

    fn evaluate(&mut self, i: usize) -> Vec<String> {
        let xml = self.xml.get_or_insert_with(|| {
            let opts = html::Options {
                omit_xml_decl: true,
                max_bytes: XPATH_MAX_BYTES,
                ..html::Options::default()
            };
            html::document_to_xml(self.doc, self.html, &opts)
                .and_then(|x| xpath::Document::parse(&x))
                .map_err(|e| self.errors.push(format!("no XPath on this page: {e}")))
        });
        let Ok(xml) = xml else { return Vec::new() };
        let expr = &self.cfg.xpaths[i];
        xml.evaluate(expr, XPATH_MAX_BYTES).unwrap_or_else(|e| {
            self.errors.push(e);
            Vec::new()
        })
    }
}

fn record(page: &CompiledPage, scope: ElementRef<'_>, url: &Url, xp: &mut XPaths<'_>) -> Value {
    let mut obj = Map::new();
    for f in &page.fields {
        obj.insert(f.name.clone(), field(f, scope, url, xp));
    }
    Value::Object(obj)
}

fn field(f: &CompiledField, scope: ElementRef<'_>, url: &Url, xp: &mut XPaths<'_>) -> Value {
    if let Some(i) = f.xpath {
        let texts = xp.results(i);
        return if f.all {
            Value::Array(
                texts
                    .iter()
                    .filter_map(|t| convert(f, Cow::Borrowed(t), url))
                    .collect(),
            )
        } else {
            texts
                .first()
                .and_then(|t| convert(f, Cow::Borrowed(t), url))
                .unwrap_or(Value::Null)
        };
    }
    match &f.selector {
        None => value_of(f, scope, url).unwrap_or(Value::Null),
        Some(sel) if f.all => Value::Array(
            scope
                .select(sel)
                .filter_map(|el| value_of(f, el, url))
                .collect(),
        ),
        Some(sel) => scope
            .select(sel)
            .next()
            .and_then(|el| value_of(f, el, url))
            .unwrap_or(Value::Null),
    }
}

fn value_of(f: &CompiledField, el: ElementRef<'_>, url: &Url) -> Option<Value> {
    let raw: Cow<'_, str> = match &f.attr {
        Some(a) => Cow::Borrowed(el.value().attr(a)?.trim()),
        None => Cow::Owned(text_of(el)),
    };
    convert(f, raw, url)
}

/// Applies the field's regex, URL resolution and type to a raw text.
fn convert(f: &CompiledField, raw: Cow<'_, str>, url: &Url) -> Option<Value> {
    let s: &str = match &f.regex {
        Some(re) => {
            let caps = re.captures(&raw)?;
            caps.get(1).or_else(|| caps.get(0))?.as_str()
        }
        None => &raw,
    };
    Some(match f.ty {
        FieldType::String if f.absolute_url => Value::String(url.join(s.trim()).ok()?.into()),
        FieldType::String => Value::String(s.to_string()),
        FieldType::Number => {
            let n: f64 = s.trim().parse().ok()?;
            Value::Number(serde_json::Number::from_f64(n)?)
        }
        FieldType::Integer => Value::from(s.trim().parse::<i64>().ok()?),
        FieldType::Bool => Value::Bool(match s.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" | "on" => true,
            "false" | "no" | "0" | "off" => false,
            _ => return None,
        }),
    })
}

/// The element's text with runs of whitespace collapsed to one space and the ends trimmed.
fn text_of(el: ElementRef<'_>) -> String {
    let mut out = String::new();
    let mut pending_space = false;
    for chunk in el.text() {
        if chunk.starts_with(char::is_whitespace) {
            pending_space = true;
        }
        for (i, word) in chunk.split_whitespace().enumerate() {
            if (i > 0 || pending_space) && !out.is_empty() {
                out.push(' ');
            }
            pending_space = false;
            out.push_str(word);
        }
        if chunk.ends_with(char::is_whitespace) {
            pending_space = true;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charset_from_header_then_meta_then_utf8() {
        let latin = b"<html><head><meta charset=\"iso-8859-1\"></head><body>caf\xe9</body></html>";
        assert!(decode(latin, Some("text/html")).0.contains("café"));
        assert!(
            decode(b"caf\xe9", Some("text/html; charset=ISO-8859-1"))
                .0
                .contains("café")
        );
        assert!(decode("café".as_bytes(), None).0.contains("café"));
        let (_, bad) = decode(b"caf\xe9", None);
        assert!(bad);
    }
}
