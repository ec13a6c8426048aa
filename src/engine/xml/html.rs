//! `html-to-xml`: HTML parsed as browsers do (html5ever, through `scraper`), serialized as
//! well-formed XML for `xpath` (Web-Harvest used HtmlCleaner).
//!
//! HTML5 parsing inserts a `<tbody>` into tables that have none; HtmlCleaner did not, and configs
//! say `//table/tr`, so when the page has no `<tbody>` tag at all the inserted ones are left out of
//! the XML (their rows stay). Names keep only their local part (`xlink:href` → `href`, as HtmlCleaner does when not
//! namespace-aware) and `xmlns` attributes are dropped, so `//div` matches XHTML pages too.
//! Characters XML forbids are dropped; comments keep their text with `--` broken up. The output is
//! capped: a page that would serialize larger than the cap is an error, not a huge variable.

use std::fmt::Write as _;

use ego_tree::iter::Edge;
use scraper::{Html, Node};

/// How to serialize (the `html-to-xml` attributes harvest acts on).
#[derive(Debug, Clone, Default)]
pub(crate) struct Options {
    /// `omitcomments`.
    pub(crate) omit_comments: bool,
    /// `omitxmldecl`.
    pub(crate) omit_xml_decl: bool,
    /// `nbsp-to-sp`: non-breaking spaces become plain spaces.
    pub(crate) nbsp_to_sp: bool,
    /// `prunetags`: elements dropped with their content (lower case).
    pub(crate) prune: Vec<String>,
    /// `omithtmlenvelope`: only the content of `<body>`.
    pub(crate) omit_html_envelope: bool,
    /// Largest output.
    pub(crate) max_bytes: usize,
}

/// Converts an HTML text to XML.
pub(crate) fn html_to_xml(html: &str, opts: &Options) -> Result<String, String> {
    document_to_xml(&Html::parse_document(html), html, opts)
}

/// Converts `doc`, parsed from the text `html`, to XML (for a caller that has parsed it already).
pub(crate) fn document_to_xml(doc: &Html, html: &str, opts: &Options) -> Result<String, String> {
    let implied_tbody = !html
        .as_bytes()
        .windows(6)
        .any(|w| w.eq_ignore_ascii_case(b"<tbody"));
    let skip_tag = |name: &str| implied_tbody && name == "tbody";
    let mut out = String::with_capacity(html.len() + html.len() / 8);
    if !opts.omit_xml_decl {
        out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    }
    let start = if opts.omit_html_envelope {
        doc.tree
            .root()
            .descendants()
            .find(|n| matches!(n.value(), Node::Element(e) if e.name() == "body"))
            .unwrap_or(doc.tree.root())
    } else {
        doc.tree.root()
    };
    // Pruned subtrees are skipped until the Close of the element that started them.
    let mut skipping: Option<ego_tree::NodeId> = None;
    let start_id = start.id();
    // Bounded: one step per node edge of the parsed document.
    for edge in start.traverse() {
        match edge {
            Edge::Open(n) => {
                if skipping.is_some() {
                    continue;
                }
                match n.value() {
                    Node::Element(e) => {
                        if opts.prune.iter().any(|p| p == e.name()) {
                            skipping = Some(n.id());
                            continue;
                        }
                        if (n.id() == start_id && opts.omit_html_envelope) || skip_tag(e.name()) {
                            continue;
                        }
                        out.push('<');
                        out.push_str(&xml_name(e.name()));
                        let mut seen: Vec<String> = Vec::new();
                        for (name, value) in e.attrs() {
                            let local = name.rsplit(':').next().unwrap_or(name);
                            if local == "xmlns" || name.starts_with("xmlns") {
                                continue;
                            }
                            let name = xml_name(local);
                            if seen.contains(&name) {
                                continue;
                            }
                            let _ = write!(out, " {name}=\"");
                            escape_into(&mut out, value, true, opts.nbsp_to_sp);
                            out.push('"');
                            seen.push(name);
                        }
                        out.push('>');
                    }
                    Node::Text(t) => escape_into(&mut out, t, false, opts.nbsp_to_sp),
                    Node::Comment(c) if !opts.omit_comments => {
                        out.push_str("<!--");
                        let mut text = clean(c).replace("--", "- -");
                        if text.ends_with('-') {
                            text.push(' ');
                        }
                        out.push_str(&text);
                        out.push_str("-->");
                    }
                    _ => {}
                }
            }
            Edge::Close(n) => {
                if let Some(id) = skipping {
                    if id == n.id() {
                        skipping = None;
                    }
                    continue;
                }
                if let Node::Element(e) = n.value()
                    && !(n.id() == start_id && opts.omit_html_envelope)
                    && !skip_tag(e.name())
                {
                    out.push_str("</");
                    out.push_str(&xml_name(e.name()));
                    out.push('>');
                }
            }
        }
        if out.len() > opts.max_bytes {
            return Err(format!(
                "the XML of this page is larger than the html-to-xml cap ({} bytes)",
                opts.max_bytes
            ));
        }
    }
    Ok(out)
}

/// A valid XML name from an HTML name: invalid characters become `-`, a bad first character
/// gets a `_` before it.
fn xml_name(name: &str) -> String {
    xml_name_with(name, '-')
}

/// A valid XML name from any text: characters an XML name cannot hold become `replacement`,
/// and a name that does not start with a letter or `_` gets a `_` before it.
pub(crate) fn xml_name_with(name: &str, replacement: char) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                replacement
            }
        })
        .collect();
    if !s
        .chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
    {
        s.insert(0, '_');
    }
    s
}

/// Whether XML 1.0 allows the character.
fn xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || (c >= ' ' && c != '\u{FFFE}' && c != '\u{FFFF}')
}

fn clean(s: &str) -> String {
    s.chars().filter(|c| xml_char(*c)).collect()
}

/// Appends `s` escaped for XML text (or an attribute value).
pub(crate) fn escape_into(out: &mut String, s: &str, attr: bool, nbsp_to_sp: bool) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' if attr => out.push_str("&quot;"),
            '\u{A0}' if nbsp_to_sp => out.push(' '),
            c if xml_char(c) => out.push(c),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Options {
        Options {
            max_bytes: 1 << 20,
            ..Options::default()
        }
    }

    #[test]
    fn broken_html_becomes_well_formed_xml() {
        let xml = html_to_xml(
            "<html xmlns='http://www.w3.org/1999/xhtml'><p class=a>one<br>two &amp; <b>x</p><!-- a -- b -->",
            &opts(),
        )
        .unwrap();
        assert!(xml.starts_with("<?xml"), "{xml}");
        assert!(
            xml.contains("<p class=\"a\">one<br></br>two &amp; <b>x</b></p>"),
            "{xml}"
        );
        assert!(xml.contains("<!-- a - - b -->"), "{xml}");
        assert!(!xml.contains("xmlns"), "{xml}");
        let items = crate::engine::xml::xpath::evaluate(&xml, "//p/b/text()").unwrap();
        assert_eq!(items, ["x"]);
    }

    #[test]
    fn tables_keep_the_rows_where_the_page_put_them() {
        let xml = html_to_xml("<table><tr><td>a</td></tr></table>", &opts()).unwrap();
        assert!(xml.contains("<table><tr><td>a</td></tr></table>"), "{xml}");
        let xml =
            html_to_xml("<table><TBODY><tr><td>a</td></tr></TBODY></table>", &opts()).unwrap();
        assert!(
            xml.contains("<table><tbody><tr><td>a</td></tr></tbody></table>"),
            "{xml}"
        );
    }

    #[test]
    fn options_prune_and_envelope() {
        let o = Options {
            prune: vec!["script".into()],
            omit_html_envelope: true,
            omit_xml_decl: true,
            omit_comments: true,
            nbsp_to_sp: true,
            ..opts()
        };
        let xml = html_to_xml(
            "<body><div>a&nbsp;b<script>x<y</script><!--c--></div></body>",
            &o,
        )
        .unwrap();
        assert_eq!(xml, "<div>a b</div>");
    }

    #[test]
    fn output_is_capped() {
        let o = Options {
            max_bytes: 100,
            ..opts()
        };
        let e = html_to_xml(&"<p>x</p>".repeat(100), &o).unwrap_err();
        assert!(e.contains("cap"), "{e}");
    }
}
