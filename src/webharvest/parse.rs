//! Web-Harvest XML → a validated program tree.
//!
//! Everything a config can get wrong statically is found here, at submission, with the line and
//! column of the element: malformed XML, an unknown processor or attribute, a missing required
//! attribute, a structural element in the wrong place (`body` outside `loop`/`try`), BeanShell-only
//! syntax in scripts and `${…}` expressions, and literal XPath expressions and regular expressions
//! that do not compile. Parsing is bounded: the document size, element count and nesting depth are
//! capped, and DOCTYPE (so DTDs and entity declarations, the XML bombs) is refused.
//!
//! Text content follows Web-Harvest's parser: each non-blank line of text (trimmed) becomes a
//! constant processor, so `<template>` and `<script>` bodies are their lines joined with `\n`.

use quick_xml::events::{BytesStart, Event};

use super::grammar::{Children, Spec, spec, unsupported};
use super::template::Template;

/// Largest config accepted (bytes).
pub const MAX_CONFIG_BYTES: usize = 1 << 20;
/// Deepest element nesting accepted.
pub const MAX_DEPTH: usize = 64;
/// Most elements in a config.
pub const MAX_ELEMENTS: usize = 50_000;

/// The Web-Harvest 1.0 (classic) namespace; a config without a namespace is read as it.
const NS_CORE_10: &str = "http://web-harvest.sourceforge.net/schema/1.0/config";
/// The Web-Harvest 2.1 core namespace.
const NS_CORE_21: &str = "http://web-harvest.sourceforge.net/schema/2.1/core";
/// The Web-Harvest 2.1 namespace of `xpath`'s `v:name="expression"` variable attributes.
const NS_VAR_21: &str = "http://web-harvest.sourceforge.net/schema/2.1/var";

/// Why a config was refused: where, and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct ParseError {
    /// 1-based line.
    pub line: u32,
    /// 1-based column (in characters).
    pub column: u32,
    /// What was wrong (names the processor or attribute).
    pub message: String,
}

/// A parsed, validated config.
#[derive(Debug, Clone)]
pub struct Program {
    pub(crate) root: Node,
    /// `config charset` (default UTF-8): decodes responses without a charset, encodes files.
    pub(crate) charset: String,
    /// harvest's `config obey-robots-txt` (default false, as Web-Harvest never read robots.txt).
    pub(crate) obey_robots: bool,
}

impl Program {
    /// Whether the config asks for robots.txt to be obeyed (`<config obey-robots-txt="true">`).
    pub fn obeys_robots(&self) -> bool {
        self.obey_robots
    }

    /// Number of processors (elements) in the config.
    pub fn element_count(&self) -> usize {
        fn count(n: &Node) -> usize {
            usize::from(!matches!(n.kind, Kind::Const(_)))
                + n.children.iter().map(count).sum::<usize>()
        }
        count(&self.root)
    }
}

/// What an element is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A line of literal text.
    Const(String),
    Config,
    VarDef,
    Var,
    Def,
    Get,
    Set,
    Empty,
    Text,
    Template,
    Http,
    HttpParam,
    HttpHeader,
    HtmlToXml,
    XPath,
    Regexp,
    RegexpPattern,
    RegexpSource,
    RegexpResult,
    Loop,
    List,
    Body,
    While,
    Case,
    If,
    Else,
    Function,
    Return,
    Call,
    CallParam,
    File,
    JsonToXml,
    XmlToJson,
    Try,
    Catch,
    Exit,
    Sleep,
    Script,
}

/// One element (or text line) of the program.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) kind: Kind,
    /// Element name as written (local part).
    pub(crate) name: String,
    /// `config/loop[1]/body/http`: names from the root, `[k]` when siblings share the name.
    pub(crate) path: String,
    pub(crate) line: u32,
    pub(crate) column: u32,
    pub(crate) attrs: Vec<(String, Template)>,
    /// `xpath`'s `v:name="expression"` attributes.
    pub(crate) vars: Vec<(String, Template)>,
    pub(crate) children: Vec<Node>,
}

impl Node {
    /// The template of an attribute, if present.
    pub(crate) fn attr(&self, name: &str) -> Option<&Template> {
        self.attrs.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// The first child of a kind (structural children: `list`, `body`, `catch`…).
    pub(crate) fn child(&self, kind: &Kind) -> Option<&Node> {
        self.children.iter().find(|c| &c.kind == kind)
    }

    /// The literal text of a body made only of text (`None` when it has processors).
    pub(crate) fn literal_body(&self) -> Option<String> {
        let mut lines = Vec::new();
        for c in &self.children {
            match &c.kind {
                Kind::Const(s) => lines.push(s.as_str()),
                _ => return None,
            }
        }
        Some(lines.join("\n"))
    }
}

/// Parses and validates a Web-Harvest config.
pub fn parse(xml: &str) -> Result<Program, ParseError> {
    parse_with(xml, None)
}

/// [`parse`] that refuses the config once checking its expressions (literal XPath and regular
/// expressions) has taken longer than `time_limit`: submission uses it with
/// [`crate::engine::config::VALIDATION_TIME_LIMIT`], so a config of thousands of costly
/// patterns cannot hold a validation thread for minutes.
pub fn parse_within(xml: &str, time_limit: std::time::Duration) -> Result<Program, ParseError> {
    parse_with(xml, std::time::Instant::now().checked_add(time_limit))
}

fn parse_with(xml: &str, deadline: Option<std::time::Instant>) -> Result<Program, ParseError> {
    let lines = LineIndex::new(xml);
    if xml.len() > MAX_CONFIG_BYTES {
        return Err(lines.error(
            0,
            format!(
                "the config is {} bytes, more than the {MAX_CONFIG_BYTES} allowed",
                xml.len()
            ),
        ));
    }
    let mut b = Builder {
        lines: &lines,
        stack: Vec::new(),
        ns: Vec::new(),
        root: None,
        elements: 0,
    };
    let mut reader = quick_xml::Reader::from_str(xml);
    reader.config_mut().check_end_names = true;
    // Bounded: every event consumes input, and the input is at most MAX_CONFIG_BYTES.
    loop {
        let at = reader.buffer_position() as usize;
        let event = match reader.read_event() {
            Ok(e) => e,
            Err(e) => {
                let pos = reader.error_position() as usize;
                return Err(lines.error(pos, format!("malformed XML: {e}")));
            }
        };
        match event {
            Event::Start(e) => b.start(&e, at, false)?,
            Event::Empty(e) => b.start(&e, at, true)?,
            Event::End(_) => b.end(at)?,
            Event::Text(t) => b.text(&t.xml10_content(), at)?,
            Event::CData(t) => b.text(&t.xml_content(quick_xml::XmlVersion::Implicit1_0), at)?,
            Event::GeneralRef(r) => {
                let c = match r.resolve_char_ref() {
                    Ok(Some(c)) => c.to_string(),
                    Ok(None) => match &*r {
                        "amp" => "&".into(),
                        "lt" => "<".into(),
                        "gt" => ">".into(),
                        "quot" => "\"".into(),
                        "apos" => "'".into(),
                        other => {
                            return Err(lines
                                .error(at, format!("malformed XML: undefined entity &{other};")));
                        }
                    },
                    Err(e) => return Err(lines.error(at, format!("malformed XML: {e}"))),
                };
                b.text(&c, at)?
            }
            Event::DocType(_) => {
                return Err(lines.error(
                    at,
                    "DOCTYPE is not allowed in a config (DTDs and entity declarations are refused)",
                ));
            }
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if let Some(open) = b.stack.last() {
        return Err(ParseError {
            line: open.node.line,
            column: open.node.column,
            message: format!("malformed XML: <{}> is never closed", open.node.name),
        });
    }
    let Some(mut root) = b.root else {
        return Err(lines.error(xml.len(), "no <config> element: the document is empty"));
    };
    assign_paths(&mut root, String::new());
    check_static(&root, deadline)?;
    let charset = match root.attr("charset").and_then(Template::literal) {
        Some(c) if !c.trim().is_empty() => {
            let c = c.trim();
            if encoding_rs::Encoding::for_label(c.as_bytes()).is_none() {
                return Err(root.error(format!("config charset: unknown charset {c:?}")));
            }
            c.to_string()
        }
        _ => "UTF-8".into(),
    };
    let obey_robots = match root.attr("obey-robots-txt") {
        None => false,
        Some(t) => match t
            .literal()
            .map(str::trim)
            .and_then(super::value::parse_bool)
        {
            Some(b) => b,
            None => {
                return Err(root.error(
                    "config obey-robots-txt: write true or false (it cannot be an expression)",
                ));
            }
        },
    };
    Ok(Program {
        root,
        charset,
        obey_robots,
    })
}

impl Node {
    pub(crate) fn error(&self, message: impl Into<String>) -> ParseError {
        ParseError {
            line: self.line,
            column: self.column,
            message: format!("{}: {}", self.path, message.into()),
        }
    }
}

struct Open {
    node: Node,
    spec: Spec,
    text: String,
    text_at: usize,
}

struct Builder<'a> {
    lines: &'a LineIndex<'a>,
    stack: Vec<Open>,
    /// Namespace declarations in scope: (prefix, uri); "" is the default namespace.
    ns: Vec<Vec<(String, String)>>,
    root: Option<Node>,
    elements: usize,
}

impl Builder<'_> {
    fn resolve(&self, prefix: &str) -> Option<&str> {
        self.ns
            .iter()
            .rev()
            .flat_map(|d| d.iter().rev())
            .find(|(p, _)| p == prefix)
            .map(|(_, u)| u.as_str())
    }

    fn start(&mut self, e: &BytesStart, at: usize, empty: bool) -> Result<(), ParseError> {
        self.flush_text()?;
        let (line, column) = self.lines.position(at);
        let err = |message: String| ParseError {
            line,
            column,
            message,
        };
        self.elements += 1;
        if self.elements > MAX_ELEMENTS {
            return Err(err(format!(
                "more than {MAX_ELEMENTS} elements; split the config"
            )));
        }
        if self.stack.len() >= MAX_DEPTH {
            return Err(err(format!(
                "elements nested deeper than {MAX_DEPTH} levels"
            )));
        }
        if self.root.is_some() && self.stack.is_empty() {
            return Err(err("malformed XML: a second root element".into()));
        }
        // Namespace declarations first: they apply to this element's own name.
        let mut decls = Vec::new();
        let mut plain = Vec::new();
        for a in e.attributes().with_checks(true) {
            let a = a.map_err(|x| err(format!("malformed XML: {x}")))?;
            let key = a.key.0.to_string();
            let value = a
                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map_err(|x| err(format!("malformed XML: attribute {key}: {x}")))?
                .into_owned();
            if key == "xmlns" {
                decls.push((String::new(), value));
            } else if let Some(p) = key.strip_prefix("xmlns:") {
                decls.push((p.to_string(), value));
            } else {
                plain.push((key, value));
            }
        }
        self.ns.push(decls);
        let qname = e.name().0.to_string();
        let (prefix, local) = match qname.split_once(':') {
            Some((p, l)) => (p, l.to_string()),
            None => ("", qname.clone()),
        };
        let uri = self.resolve(prefix).unwrap_or("");
        if !prefix.is_empty() && self.resolve(prefix).is_none() {
            return Err(err(format!(
                "malformed XML: namespace prefix {prefix:?} of <{qname}> is not declared"
            )));
        }
        if !(uri.is_empty() || uri == NS_CORE_10 || uri == NS_CORE_21) {
            return Err(err(format!(
                "<{qname}> (namespace {uri}) is not a Web-Harvest processor"
            )));
        }
        let parent_name = self.stack.last().map(|o| o.node.name.clone());
        if parent_name.is_none() && local != "config" {
            return Err(err(format!(
                "the root element must be <config>, not <{local}>"
            )));
        }
        let Some(spec) = spec(&local) else {
            if let Some(why) = unsupported(&local) {
                return Err(err(format!("processor `{local}` is not supported: {why}")));
            }
            return Err(err(format!("unknown processor `{local}`")));
        };
        match (&parent_name, spec.kind == Kind::Config) {
            (None, false) => {
                return Err(err(format!(
                    "the root element must be <config>, not <{local}>"
                )));
            }
            (Some(_), true) => {
                return Err(err("<config> must be the root element".into()));
            }
            _ => {}
        }
        if !spec.parents.is_empty()
            && !parent_name
                .as_deref()
                .is_some_and(|p| spec.parents.contains(&p))
        {
            return Err(err(format!(
                "`{local}` belongs directly inside {}",
                spec.parents
                    .iter()
                    .map(|p| format!("`{p}`"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            )));
        }
        if let Some(anc) = spec.ancestor
            && !self.stack.iter().any(|o| o.node.name == anc)
        {
            return Err(err(format!("`{local}` is allowed only inside `{anc}`")));
        }
        if let Some(parent) = self.stack.last() {
            let rule = parent.spec.children;
            let ok = match rule {
                Children::Any => spec.parents.is_empty(),
                Children::None => false,
                Children::Only(_, allowed) => allowed.contains(&local.as_str()),
                Children::Case => matches!(spec.kind, Kind::If | Kind::Else),
            };
            if !ok {
                return Err(err(format!(
                    "`{}` cannot contain `{local}`{}",
                    parent.node.name,
                    match rule {
                        Children::None => " (it takes no body)".to_string(),
                        Children::Only(_, allowed) => format!(
                            " (it takes only {})",
                            allowed
                                .iter()
                                .map(|a| format!("`{a}`"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                        Children::Case => " (it takes `if` and `else`)".to_string(),
                        Children::Any => String::new(),
                    }
                )));
            }
        }
        let mut attrs = Vec::new();
        let mut vars = Vec::new();
        for (key, value) in plain {
            let t = Template::parse(&value);
            if let Some((p, name)) = key.split_once(':') {
                if spec.kind == Kind::XPath && self.resolve(p) == Some(NS_VAR_21) {
                    vars.push((name.to_string(), t));
                    continue;
                }
                return Err(err(format!("unknown attribute `{key}` on `{local}`")));
            }
            if key != "id" && !spec.attrs.contains(&key.as_str()) {
                return Err(err(format!(
                    "unknown attribute `{key}` on `{local}`{}",
                    if spec.attrs.is_empty() {
                        " (it takes none)".to_string()
                    } else {
                        format!(" (it takes {})", spec.attrs.join(", "))
                    }
                )));
            }
            attrs.push((key, t));
        }
        for r in spec.required {
            if !attrs.iter().any(|(k, _)| k == r) {
                return Err(err(format!("`{local}` needs the attribute `{r}`")));
            }
        }
        let node = Node {
            kind: spec.kind.clone(),
            name: local,
            path: String::new(),
            line,
            column,
            attrs,
            vars,
            children: Vec::new(),
        };
        self.stack.push(Open {
            node,
            spec,
            text: String::new(),
            text_at: at,
        });
        if empty {
            self.end(at)?;
        }
        Ok(())
    }

    fn text(&mut self, s: &str, at: usize) -> Result<(), ParseError> {
        match self.stack.last_mut() {
            Some(open) => {
                if open.text.is_empty() {
                    open.text_at = at;
                }
                open.text.push_str(s);
                Ok(())
            }
            None if s.trim().is_empty() => Ok(()),
            None => Err(self
                .lines
                .error(at, "malformed XML: text outside the root element")),
        }
    }

    /// Web-Harvest's `XmlNode.flushText`: each non-blank line, trimmed, is a constant.
    fn flush_text(&mut self) -> Result<(), ParseError> {
        let Some(open) = self.stack.last_mut() else {
            return Ok(());
        };
        if open.text.is_empty() {
            return Ok(());
        }
        let text = std::mem::take(&mut open.text);
        let (line, column) = self.lines.position(open.text_at);
        for l in text.split(['\n', '\r']) {
            let l = l.trim();
            if l.is_empty() {
                continue;
            }
            if matches!(open.spec.children, Children::None | Children::Only(..))
                || open.spec.kind == Kind::Case
            {
                return Err(ParseError {
                    line,
                    column,
                    message: format!(
                        "`{}` cannot contain text (found {:?})",
                        open.node.name,
                        l.chars().take(40).collect::<String>()
                    ),
                });
            }
            open.node.children.push(Node {
                kind: Kind::Const(l.to_string()),
                name: String::new(),
                path: String::new(),
                line,
                column,
                attrs: Vec::new(),
                vars: Vec::new(),
                children: Vec::new(),
            });
        }
        Ok(())
    }

    fn end(&mut self, at: usize) -> Result<(), ParseError> {
        self.flush_text()?;
        self.ns.pop();
        let Some(open) = self.stack.pop() else {
            return Err(self.lines.error(at, "malformed XML: unexpected end tag"));
        };
        let node = open.node;
        let names: Vec<&str> = node
            .children
            .iter()
            .filter(|c| !matches!(c.kind, Kind::Const(_)))
            .map(|c| c.name.as_str())
            .collect();
        match open.spec.children {
            Children::Only(required, _) => {
                for r in required {
                    if !names.contains(r) {
                        return Err(ParseError {
                            line: node.line,
                            column: node.column,
                            message: format!("`{}` needs a `{r}` element", node.name),
                        });
                    }
                }
                for n in &names {
                    if names.iter().filter(|m| *m == n).count() > 1 {
                        return Err(ParseError {
                            line: node.line,
                            column: node.column,
                            message: format!("`{}` has more than one `{n}`", node.name),
                        });
                    }
                }
            }
            Children::Case => {
                if names.first() != Some(&"if") {
                    return Err(ParseError {
                        line: node.line,
                        column: node.column,
                        message: "`case` needs at least one `if` before any `else`".into(),
                    });
                }
                if names
                    .iter()
                    .position(|n| *n == "else")
                    .is_some_and(|i| i + 1 != names.len())
                {
                    return Err(ParseError {
                        line: node.line,
                        column: node.column,
                        message: "`case` takes one `else`, after every `if`".into(),
                    });
                }
            }
            Children::Any | Children::None => {}
        }
        match self.stack.last_mut() {
            Some(parent) => parent.node.children.push(node),
            None => self.root = Some(node),
        }
        Ok(())
    }
}

/// Gives each element its path; bounded by [`MAX_DEPTH`].
fn assign_paths(node: &mut Node, parent: String) {
    node.path = if parent.is_empty() {
        node.name.clone()
    } else {
        parent
    };
    let base = node.path.clone();
    let mut seen: Vec<(String, usize)> = Vec::new();
    let counts: Vec<usize> = node
        .children
        .iter()
        .map(|c| {
            node.children
                .iter()
                .filter(|d| !matches!(d.kind, Kind::Const(_)) && d.name == c.name)
                .count()
        })
        .collect();
    for (c, count) in node.children.iter_mut().zip(counts) {
        if matches!(c.kind, Kind::Const(_)) {
            c.path = base.clone();
            continue;
        }
        let k = match seen.iter_mut().find(|(n, _)| *n == c.name) {
            Some((_, k)) => {
                *k += 1;
                *k
            }
            None => {
                seen.push((c.name.clone(), 1));
                1
            }
        };
        let own = if count > 1 {
            format!("{base}/{}[{k}]", c.name)
        } else {
            format!("{base}/{}", c.name)
        };
        assign_paths(c, own);
    }
}

/// Checks what can be checked before running: scripts and expressions, literal XPath and regular
/// expressions. Bounded by [`MAX_DEPTH`], and in time by `deadline` (checked at every element).
fn check_static(node: &Node, deadline: Option<std::time::Instant>) -> Result<(), ParseError> {
    if deadline.is_some_and(|d| std::time::Instant::now() > d) {
        return Err(node.error(format!(
            "checking the config took longer than {} s, the limit, before this element; use \
             fewer or simpler XPath and regular expressions",
            crate::engine::config::VALIDATION_TIME_LIMIT.as_secs()
        )));
    }
    for (name, t) in node.attrs.iter().chain(node.vars.iter()) {
        for expr in t.expressions() {
            if let Some(hint) = super::script::beanshell_hint(expr) {
                return Err(node.error(format!("attribute `{name}`: {hint}")));
            }
        }
    }
    match node.kind {
        Kind::Script => {
            if let Some(src) = node.literal_body()
                && let Some(hint) = super::script::beanshell_hint(&src)
            {
                return Err(node.error(hint));
            }
        }
        Kind::Template => {
            if let Some(src) = node.literal_body() {
                for expr in Template::parse(&src).expressions() {
                    if let Some(hint) = super::script::beanshell_hint(expr) {
                        return Err(node.error(hint));
                    }
                }
            }
        }
        Kind::XPath => {
            for (name, t) in node
                .attrs
                .iter()
                .filter(|(n, _)| n == "expression")
                .chain(node.vars.iter())
            {
                if let Some(expr) = t.literal()
                    && let Err(e) = crate::engine::xml::xpath::check(expr)
                {
                    return Err(node.error(format!("attribute `{name}`: {e}")));
                }
            }
        }
        Kind::Regexp => {
            if let Some(p) = node.child(&Kind::RegexpPattern)
                && let Some(src) = p.literal_body()
                && let Err(e) = super::regexp::check(&src)
            {
                return Err(p.error(e));
            }
        }
        _ => {}
    }
    node.children
        .iter()
        .try_for_each(|c| check_static(c, deadline))
}

/// Byte offset → (line, column).
struct LineIndex<'a> {
    text: &'a str,
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    fn new(text: &'a str) -> LineIndex<'a> {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { text, starts }
    }

    fn position(&self, offset: usize) -> (u32, u32) {
        let offset = offset.min(self.text.len());
        let line = self.starts.partition_point(|&s| s <= offset).max(1);
        let start = self.starts[line - 1];
        let column = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count())
            + 1;
        (line as u32, column as u32)
    }

    fn error(&self, offset: usize, message: impl Into<String>) -> ParseError {
        let (line, column) = self.position(offset);
        ParseError {
            line,
            column,
            message: message.into(),
        }
    }
}
