//! XPath over XML text, with the `xee-xpath` engine (XPath 3.1, a superset of the XPath 1.0 that
//! configs are written in; Web-Harvest itself ran Saxon's XPath 2.0).
//!
//! The input is parsed as XML on each evaluation, as Web-Harvest does (a DTD is refused by the
//! parser, so no entity expansion). Results become texts: attributes, text nodes, comments and
//! atomic values (numbers, strings, booleans) their string values; elements and documents their
//! serialized XML.

use xee_xpath::{Documents, Item, Queries, Query};

/// Compiles an expression, to refuse a bad literal one at submission.
pub(crate) fn check(expr: &str) -> Result<(), String> {
    Queries::default().sequence(expr).map(|_| ()).map_err(|e| {
        format!(
            "XPath expression {expr:?} does not compile: {}",
            describe(&e, expr)
        )
    })
}

/// An engine error as a sentence: its code, what the code means, and where in the expression.
fn describe(e: &xee_xpath::error::Error, expr: &str) -> String {
    let msg = e
        .error
        .message()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let at = e.span.map(|s| {
        let r = s.range();
        match expr.get(r.start..r.end) {
            Some(t) if !t.is_empty() => format!(" (at `{t}`)"),
            _ => format!(" (at character {})", r.start + 1),
        }
    });
    let mut out = e.error.code();
    if !msg.is_empty() {
        out.push_str(": ");
        out.push_str(&msg);
    }
    out.push_str(&at.unwrap_or_default());
    out
}

/// Evaluates `expr` against the XML document `xml`; one text per result item.
#[cfg(test)]
pub(crate) fn evaluate(xml: &str, expr: &str) -> Result<Vec<String>, String> {
    let mut docs = Documents::new();
    let doc = docs
        .add_string_without_uri(xml)
        .map_err(|e| not_xml(xml, e))?;
    evaluate_on(&mut docs, doc, expr, usize::MAX)
}

/// Evaluates several expressions against one parse of `xml` (`xpath`'s expression and its
/// `v:name` variables); the texts of all results together stay under `max_bytes`.
pub(crate) fn evaluate_many(
    xml: &str,
    exprs: &[String],
    max_bytes: usize,
) -> Result<Vec<Vec<String>>, String> {
    let mut docs = Documents::new();
    let doc = docs
        .add_string_without_uri(xml)
        .map_err(|e| not_xml(xml, e))?;
    let mut budget = max_bytes;
    exprs
        .iter()
        .map(|e| {
            let r = evaluate_on(&mut docs, doc, e, budget)?;
            budget -= r.iter().map(String::len).sum::<usize>();
            Ok(r)
        })
        .collect()
}

/// One parsed XML document that expressions are evaluated against, each on its own.
pub(crate) struct Document {
    docs: Documents,
    doc: xee_xpath::DocumentHandle,
}

impl Document {
    /// Parses `xml`.
    pub(crate) fn parse(xml: &str) -> Result<Document, String> {
        let mut docs = Documents::new();
        let doc = docs
            .add_string_without_uri(xml)
            .map_err(|e| not_xml(xml, e))?;
        Ok(Document { docs, doc })
    }

    /// The texts of `expr`'s results, together under `max_bytes`.
    pub(crate) fn evaluate(&mut self, expr: &str, max_bytes: usize) -> Result<Vec<String>, String> {
        evaluate_on(&mut self.docs, self.doc, expr, max_bytes)
    }
}

fn not_xml(xml: &str, e: impl std::fmt::Display) -> String {
    let hint = if xml.trim().is_empty() {
        " (the input is empty)"
    } else if !xml.trim_start().starts_with('<') {
        " (the input is not XML; pass HTML through html-to-xml first)"
    } else {
        ""
    };
    format!("the input is not well-formed XML: {e}{hint}")
}

fn evaluate_on(
    docs: &mut Documents,
    doc: xee_xpath::DocumentHandle,
    expr: &str,
    max_bytes: usize,
) -> Result<Vec<String>, String> {
    let queries = Queries::default();
    let q = queries.sequence(expr).map_err(|e| {
        format!(
            "XPath expression {expr:?} does not compile: {}",
            describe(&e, expr)
        )
    })?;
    let seq = q
        .execute(docs, doc)
        .map_err(|e| format!("XPath expression {expr:?} failed: {}", describe(&e, expr)))?;
    let mut out = Vec::with_capacity(seq.len());
    let mut bytes = 0usize;
    for item in seq.iter() {
        let t = item_text(docs, &item)?;
        bytes += t.len();
        if bytes > max_bytes {
            return Err(format!(
                "the results of {expr:?} pass the cap on result size ({max_bytes} bytes left)"
            ));
        }
        out.push(t);
    }
    Ok(out)
}

fn item_text(docs: &Documents, item: &Item) -> Result<String, String> {
    match item {
        Item::Node(node) => {
            let xot = docs.xot();
            match xot.value_type(*node) {
                xot::ValueType::Element | xot::ValueType::Document => xot
                    .to_string(*node)
                    .map_err(|e| format!("cannot serialize the XPath result: {e}")),
                _ => Ok(xot.string_value(*node)),
            }
        }
        Item::Atomic(_) => item
            .string_value(docs.xot())
            .map_err(|e| format!("cannot convert the XPath result to text: {e}")),
        Item::Function(_) => {
            Err("the XPath result holds a function, map or array; select nodes or values".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"<html><body><ul><li class="a">one</li><li class="b"> two  words </li><li>three</li></ul><a href="/x">X</a></body></html>"#;

    fn eval(expr: &str) -> Vec<String> {
        evaluate(DOC, expr).unwrap_or_else(|e| panic!("{expr}: {e}"))
    }

    #[test]
    fn node_sets_attributes_and_text() {
        assert_eq!(eval("//li/text()"), ["one", " two  words ", "three"]);
        assert_eq!(eval("//a/@href"), ["/x"]);
        assert_eq!(eval("//li[@class='a']"), ["<li class=\"a\">one</li>"]);
        assert_eq!(eval("//li[2]/@class"), ["b"]);
        assert_eq!(eval("//li[position() > 1]/text()").len(), 2);
    }

    #[test]
    fn functions_of_xpath_1() {
        assert_eq!(eval("count(//li)"), ["3"]);
        assert_eq!(eval("normalize-space(//li[2])"), ["two words"]);
        assert_eq!(eval("string(//a)"), ["X"]);
        assert_eq!(eval("//li[contains(., 'hre')]/text()"), ["three"]);
        assert_eq!(eval("count(//li) > 2"), ["true"]);
    }

    #[test]
    fn bad_expressions_and_inputs_are_errors() {
        let e = check("//li[").unwrap_err();
        assert!(
            e.starts_with("XPath expression \"//li[\" does not compile: XPST0003"),
            "{e}"
        );
        let e = evaluate(DOC, "//li[@class = 'a' + 1]").unwrap_err();
        assert!(
            e.contains("XPTY0004") && e.contains("(at `'a' + 1`)"),
            "{e}"
        );
        assert!(check("//li[1]").is_ok());
        let e = evaluate("not xml", "//a").unwrap_err();
        assert!(e.contains("html-to-xml"), "{e}");
        let e = evaluate("<!DOCTYPE x [<!ENTITY a 'b'>]><x>&a;</x>", "/x").unwrap_err();
        assert!(e.contains("well-formed"), "{e}");
    }
}
