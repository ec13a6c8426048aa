//! The processors that transform text: `text`, `template`, `script`, `html-to-xml`, `xpath`,
//! `regexp`, `json-to-xml` and `xml-to-json`.

use std::sync::Arc;

use super::super::json;
use super::super::parse::{Kind, Node};
use super::super::regexp::{self as wh_regexp, Flags};
use super::super::scope::{ScopeKind, Vars};
use super::super::template::Template;
use super::super::value::Value;
use super::{Interp, R};
use crate::engine::xml::{html, xpath};

impl<'p> Interp<'p> {
    pub(super) fn text_processor(&mut self, node: &'p Node) -> R<Value> {
        let delimiter = self
            .attr_text(node, "delimiter")?
            .unwrap_or_else(|| "\n".into());
        let v = self.body(node)?;
        Ok(Value::text(v.to_text_with(&delimiter)))
    }

    pub(super) fn template_processor(&mut self, node: &'p Node) -> R<Value> {
        let src = self.body(node)?.to_text();
        let v = self.template(node, &Template::parse(&src))?;
        Ok(Value::text(v.to_text()))
    }

    pub(super) fn script_processor(&mut self, node: &'p Node) -> R<Value> {
        let mut code = self.body(node)?.to_text();
        if let Some(ret) = self.attr_text(node, "return")? {
            code.push_str("; ");
            code.push_str(&ret);
        }
        self.run_script(node, &code)
    }

    pub(super) fn html_to_xml(&mut self, node: &'p Node) -> R<Value> {
        let opts = html::Options {
            omit_comments: self.attr_bool(node, "omitcomments", false)?,
            omit_xml_decl: self.attr_bool(node, "omitxmldecl", false)?,
            nbsp_to_sp: self.attr_bool(node, "nbsp-to-sp", false)?,
            prune: self
                .attr_text(node, "prunetags")?
                .map(|p| {
                    p.split(',')
                        .map(|t| t.trim().to_ascii_lowercase())
                        .filter(|t| !t.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            omit_html_envelope: self.attr_bool(node, "omithtmlenvelope", false)?,
            max_bytes: self.limits.max_html_xml_bytes,
        };
        let input = self.body(node)?.to_text();
        match html::html_to_xml(&input, &opts) {
            Ok(xml) => Ok(Value::text(xml)),
            Err(e) => Err(self.limit(node, "html_to_xml_size", e)),
        }
    }

    pub(super) fn xpath(&mut self, node: &'p Node) -> R<Value> {
        let xml = self.body(node)?.to_text();
        if xml.len() > self.limits.max_html_xml_bytes {
            return Err(self.limit(
                node,
                "xpath_input_size",
                format!(
                    "the XML is {} bytes, more than XPath reads ({} bytes, the html-to-xml cap)",
                    xml.len(),
                    self.limits.max_html_xml_bytes
                ),
            ));
        }
        let expression = self.attr_text(node, "expression")?;
        let mut exprs = Vec::new();
        let mut names = Vec::new();
        for (name, t) in &node.vars {
            let e = self.template(node, t)?.to_text();
            names.push(name.clone());
            exprs.push(e);
        }
        if let Some(e) = &expression {
            exprs.push(e.clone());
        }
        if exprs.is_empty() {
            return Ok(Value::Empty);
        }
        let mut results = xpath::evaluate_many(&xml, &exprs, self.limits.max_variable_bytes)
            .map_err(|e| self.fail(node, e))?;
        let result = expression.as_ref().and_then(|_| results.pop());
        for (name, items) in names.iter().zip(results) {
            let v = Value::list(items.into_iter().map(Arc::from).collect());
            self.bind(node, Vars::define, name, v)?;
        }
        Ok(match result {
            Some(items) => Value::list(items.into_iter().map(Arc::from).collect()),
            None => Value::Empty,
        })
    }

    pub(super) fn regexp(&mut self, node: &'p Node) -> R<Value> {
        let (Some(pattern_node), Some(source_node)) = (
            node.child(&Kind::RegexpPattern),
            node.child(&Kind::RegexpSource),
        ) else {
            return Err(self.fail(node, "`regexp` needs `regexp-pattern` and `regexp-source`"));
        };
        let result_node = node.child(&Kind::RegexpResult);
        let pattern = self.body(pattern_node)?.to_text();
        let source = self.body(source_node)?;
        let replace = self
            .attr_text(node, "replace")?
            .is_some_and(|r| super::super::value::is_true(r.trim()));
        let flags = Flags {
            case_insensitive: self.attr_bool(node, "flag-caseinsensitive", false)?,
            multiline: self.attr_bool(node, "flag-multiline", false)?,
            dotall: self.attr_bool(node, "flag-dotall", true)?,
        };
        let max = match self.attr_text(node, "max")? {
            None => u64::MAX,
            Some(m) => m
                .trim()
                .parse::<f64>()
                .map(|n| n.max(0.0) as u64)
                .map_err(|_| self.fail(node, format!("max {m:?} is not a number")))?,
        };
        let re = wh_regexp::compile(&pattern, flags).map_err(|e| self.fail(pattern_node, e))?;
        let mut out: Vec<Arc<str>> = Vec::new();
        let mut bytes = 0usize;
        for text in source.items() {
            let mut replaced = String::new();
            let mut last = 0usize;
            let mut n = 0u64;
            for caps in re.captures_iter(&*text) {
                let caps = caps.map_err(|e| {
                    self.fail(node, format!("regular expression {pattern:?} failed: {e}"))
                })?;
                n += 1;
                if n > max {
                    break;
                }
                let whole = caps.get(0).map_or("", |m| m.as_str()).to_string();
                let result = match result_node {
                    None => whole,
                    Some(r) => self.scoped_groups(node, &caps, |s| s.body(r))?.to_text(),
                };
                if replace {
                    let m = caps.get(0);
                    let (start, end) = m.map_or((last, last), |m| (m.start(), m.end()));
                    replaced.push_str(&text[last..start]);
                    let r = wh_regexp::expand(&result, &caps).map_err(|e| self.fail(node, e))?;
                    replaced.push_str(&r);
                    last = end;
                } else if !result.is_empty() {
                    bytes += result.len();
                    out.push(Arc::from(result));
                }
                self.check_size(node, bytes + replaced.len())?;
            }
            if replace {
                replaced.push_str(&text[last..]);
                if !replaced.is_empty() {
                    bytes += replaced.len();
                    out.push(Arc::from(replaced));
                }
            }
        }
        Ok(Value::list(out))
    }

    /// Runs `f` with the match's groups as `_0`, `_1`… (and Web-Harvest 2.1's `group0`…).
    fn scoped_groups(
        &mut self,
        node: &'p Node,
        caps: &fancy_regex::Captures<'_, str>,
        f: impl FnOnce(&mut Self) -> R<Value>,
    ) -> R<Value> {
        self.vars.borrow_mut().push(ScopeKind::Block);
        let mut r = Ok(());
        for i in 0..caps.len() {
            let v = caps
                .get(i)
                .map_or(Value::Empty, |m| Value::text(m.as_str()));
            r = r
                .and_then(|_| self.bind(node, Vars::define, &format!("_{i}"), v.clone()))
                .and_then(|_| self.bind(node, Vars::define, &format!("group{i}"), v));
        }
        let out = r.and_then(|_| f(self));
        self.vars.borrow_mut().pop();
        out
    }

    pub(super) fn json_to_xml(&mut self, node: &'p Node) -> R<Value> {
        let tag = self.attr_text(node, "tag")?;
        let input = self.body(node)?.to_text();
        json::json_to_xml(&input, tag.as_deref(), self.limits.max_variable_bytes)
            .map(Value::text)
            .map_err(|e| self.fail(node, e))
    }

    pub(super) fn xml_to_json(&mut self, node: &'p Node) -> R<Value> {
        let input = self.body(node)?.to_text();
        json::xml_to_json(&input)
            .map(Value::text)
            .map_err(|e| self.fail(node, e))
    }
}
