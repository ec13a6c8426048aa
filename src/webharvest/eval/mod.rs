//! The interpreter: runs a [`Program`]'s processors in order, synchronously, on its own thread
//! (see `run.rs`), reaching the outside only through a [`Bridge`] to the async [`super::Host`].
//!
//! Every processor yields a [`Value`]; a body of several yields their non-empty values as one
//! list (Web-Harvest's `BodyProcessor`). The stop signal is checked before every processor. Each
//! failure carries the path of the processor it happened in (`config/loop[1]/body/http`).
//! Control flow (`loop`, `while`, `case`, functions, `try`) is in `flow.rs`, the processors
//! that talk to the host (`http`, `file`, `sleep`) in `io.rs`, and those that transform text in
//! `text.rs`.

mod flow;
mod io;
mod text;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::Limits;
use super::parse::{Kind, Node, Program};
use super::run::Bridge;
use super::scope::{MemoryCap, Vars};
use super::script::{HttpInfo, Script, ScriptError};
use super::template::{Part, Template};
use super::value::{Concat, Value};
use crate::job::StopSignal;

/// Deepest nesting of processors being evaluated at once (config nesting times call depth);
/// the interpreter thread's stack is sized for it.
pub(crate) const MAX_EVAL_DEPTH: usize = 2000;

/// Why evaluation did not produce a value.
#[derive(Debug)]
pub(crate) enum Flow {
    /// A processor failed.
    Fail(Failure),
    /// `exit` ran: the config ends successfully.
    Exit(String),
    /// The session was stopped (cancel, max duration, shutdown, lost lease).
    Stopped,
}

/// A processor's failure.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) path: String,
    pub(crate) line: u32,
    pub(crate) column: u32,
    pub(crate) message: String,
    pub(crate) kind: FailKind,
}

impl Failure {
    /// `config/loop[1]/body/http: message (line 7, column 9)`.
    pub(crate) fn describe(&self) -> String {
        format!(
            "{}: {} (line {}, column {})",
            self.path, self.message, self.line, self.column
        )
    }
}

/// What kind of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailKind {
    /// The config's own error (catchable by `try`).
    Runtime,
    /// An HTTP request failed (catchable); `retryable` when a new attempt may succeed.
    Http { retryable: bool },
    /// A limit was hit (not catchable): its name.
    Limit(&'static str),
    /// The lease was lost.
    LeaseLost,
}

pub(crate) type R<T> = Result<T, Flow>;

/// A function call in progress.
struct Frame {
    result: Value,
}

/// An `http` processor collecting its `http-param`s and `http-header`s.
#[derive(Default)]
struct HttpCollect {
    params: Vec<super::http::Param>,
    headers: Vec<(String, String)>,
}

/// The state of one run.
pub(crate) struct Interp<'p> {
    program: &'p Program,
    pub(crate) vars: Rc<RefCell<Vars>>,
    script: Option<Script>,
    prints: Rc<RefCell<Vec<String>>>,
    bridge: Bridge,
    limits: Limits,
    stop: StopSignal,
    functions: HashMap<String, &'p Node>,
    frames: Vec<Frame>,
    call_params: Vec<Vec<(String, Value)>>,
    http: Vec<HttpCollect>,
    http_info: HttpInfo,
    http_requests: u64,
    processors: Arc<AtomicU64>,
    depth: usize,
}

impl<'p> Interp<'p> {
    pub(crate) fn new(
        program: &'p Program,
        bridge: Bridge,
        limits: Limits,
        stop: StopSignal,
        processors: Arc<AtomicU64>,
    ) -> Interp<'p> {
        Interp {
            program,
            vars: Rc::new(RefCell::new(Vars::new(limits.max_variable_bytes))),
            script: None,
            prints: Rc::new(RefCell::new(Vec::new())),
            bridge,
            limits,
            stop,
            functions: HashMap::new(),
            frames: Vec::new(),
            call_params: Vec::new(),
            http: Vec::new(),
            http_info: HttpInfo::default(),
            http_requests: 0,
            processors,
            depth: 0,
        }
    }

    /// Runs the whole config.
    pub(crate) fn run(&mut self) -> R<()> {
        let program: &'p Program = self.program;
        self.eval(&program.root).map(|_| ())
    }

    /// Evaluates one processor.
    pub(crate) fn eval(&mut self, node: &'p Node) -> R<Value> {
        if let Kind::Const(s) = &node.kind {
            return Ok(Value::text(s.as_str()));
        }
        if self.stop.is_stopped() {
            return Err(Flow::Stopped);
        }
        self.depth += 1;
        if self.depth > MAX_EVAL_DEPTH {
            self.depth -= 1;
            return Err(self.limit(
                node,
                "eval_depth",
                format!("processors nest deeper than {MAX_EVAL_DEPTH} levels (runaway recursion?)"),
            ));
        }
        self.processors.fetch_add(1, Ordering::Relaxed);
        let r = self.dispatch(node);
        self.depth -= 1;
        r
    }

    fn dispatch(&mut self, node: &'p Node) -> R<Value> {
        match node.kind {
            Kind::Const(ref s) => Ok(Value::text(s.as_str())),
            Kind::Config => {
                for c in &node.children {
                    self.eval(c)?;
                }
                Ok(Value::Empty)
            }
            Kind::VarDef | Kind::Var | Kind::Def | Kind::Set | Kind::Get => self.variable(node),
            Kind::Empty => {
                self.body(node)?;
                Ok(Value::Empty)
            }
            Kind::Text => self.text_processor(node),
            Kind::Template => self.template_processor(node),
            Kind::Http => self.http_processor(node),
            Kind::HttpParam | Kind::HttpHeader => self.http_part(node),
            Kind::HtmlToXml => self.html_to_xml(node),
            Kind::XPath => self.xpath(node),
            Kind::Regexp => self.regexp(node),
            Kind::Loop => self.loop_processor(node),
            Kind::While => self.while_processor(node),
            Kind::Case => self.case(node),
            Kind::Function => {
                let name = node.attr("name").and_then(Template::literal).map_or_else(
                    || self.attr_text(node, "name").map(Option::unwrap_or_default),
                    |s| Ok(s.to_string()),
                )?;
                self.functions.insert(name, node);
                Ok(Value::Empty)
            }
            Kind::Call => self.call(node),
            Kind::CallParam => self.call_param(node),
            Kind::Return => {
                let v = self.body(node)?;
                if let Some(f) = self.frames.last_mut() {
                    f.result = v;
                }
                Ok(Value::Empty)
            }
            Kind::File => self.file(node),
            Kind::JsonToXml => self.json_to_xml(node),
            Kind::XmlToJson => self.xml_to_json(node),
            Kind::Try => self.try_catch(node),
            Kind::Exit => self.exit(node),
            Kind::Sleep => self.sleep(node),
            Kind::Script => self.script_processor(node),
            // Structural elements are run by their parents; alone, they are their body.
            Kind::RegexpPattern
            | Kind::RegexpSource
            | Kind::RegexpResult
            | Kind::List
            | Kind::Body
            | Kind::If
            | Kind::Else
            | Kind::Catch => self.body(node),
        }
    }

    /// A body: one processor's value, or the non-empty values of several as a list.
    pub(crate) fn body(&mut self, node: &'p Node) -> R<Value> {
        match node.children.as_slice() {
            [] => Ok(Value::Empty),
            // Web-Harvest's `createVariable`: an empty value (an empty list too) is empty.
            [one] => {
                let v = self.eval(one)?;
                Ok(if v.is_empty() { Value::Empty } else { v })
            }
            many => {
                let mut c = Concat::default();
                for child in many {
                    c.push(self.eval(child)?);
                    self.check_size(node, c.bytes())?;
                }
                Ok(c.finish())
            }
        }
    }

    /// Fails when an intermediate value passes the variable memory cap.
    pub(crate) fn check_size(&self, node: &Node, bytes: usize) -> R<()> {
        if bytes > self.limits.max_variable_bytes {
            return Err(self.limit(
                node,
                "variable_memory",
                format!(
                    "a value of {bytes} bytes is larger than the variable memory cap ({} bytes)",
                    self.limits.max_variable_bytes
                ),
            ));
        }
        Ok(())
    }

    /// An attribute's value (its `${…}` evaluated); `None` when absent.
    pub(crate) fn attr_value(&mut self, node: &'p Node, name: &str) -> R<Option<Value>> {
        match node.attr(name) {
            None => Ok(None),
            Some(t) => self.template(node, t).map(Some),
        }
    }

    /// An attribute's text; `None` when absent or empty (Web-Harvest's `evaluateToString`).
    pub(crate) fn attr_text(&mut self, node: &'p Node, name: &str) -> R<Option<String>> {
        Ok(self
            .attr_value(node, name)?
            .map(|v| v.to_text())
            .filter(|s| !s.is_empty()))
    }

    /// A required attribute's text (empty is an error naming it).
    pub(crate) fn required(&mut self, node: &'p Node, name: &str) -> R<String> {
        self.attr_text(node, name)?
            .ok_or_else(|| self.fail(node, format!("attribute `{name}` is empty")))
    }

    /// A yes/no attribute (`true`/`yes`/`1`, `false`/`no`/`0`), else `default`.
    pub(crate) fn attr_bool(&mut self, node: &'p Node, name: &str, default: bool) -> R<bool> {
        Ok(self
            .attr_text(node, name)?
            .and_then(|s| super::value::parse_bool(s.trim()))
            .unwrap_or(default))
    }

    /// Evaluates a template: one `${…}` alone keeps its value (a list stays a list); anything
    /// else is text.
    pub(crate) fn template(&mut self, node: &'p Node, t: &Template) -> R<Value> {
        match t.parts.as_slice() {
            [] => Ok(Value::Empty),
            [Part::Lit(s)] => Ok(Value::text(s.as_str())),
            [Part::Expr(e)] => self.expression(node, e),
            parts => {
                let mut out = String::new();
                for p in parts {
                    match p {
                        Part::Lit(s) => out.push_str(s),
                        Part::Expr(e) => out.push_str(&self.expression(node, e)?.to_text()),
                    }
                    self.check_size(node, out.len())?;
                }
                Ok(Value::text(out))
            }
        }
    }

    /// Evaluates one `${…}` expression: a variable's name directly, anything else as script.
    pub(crate) fn expression(&mut self, node: &'p Node, expr: &str) -> R<Value> {
        let e = expr.trim();
        if is_identifier(e)
            && let Some(v) = self.vars.borrow().get(e)
        {
            return Ok(v.clone());
        }
        self.run_script(node, expr)
    }

    /// Runs JavaScript (starting the engine on first use).
    pub(crate) fn run_script(&mut self, node: &'p Node, code: &str) -> R<Value> {
        if self.script.is_none() {
            let s = Script::new(
                self.vars.clone(),
                self.prints.clone(),
                self.limits.script_memory_bytes,
                self.limits.script_time,
                self.stop.clone(),
            )
            .map_err(|e| self.fail(node, e))?;
            let mut s = s;
            if self.http_info.total_responses > 0 {
                s.set_http(&self.http_info)
                    .map_err(|e| self.fail(node, e))?;
            }
            self.script = Some(s);
        }
        let Some(script) = self.script.as_mut() else {
            return Err(self.fail(node, "the script engine is not available"));
        };
        let r = script.eval(code);
        let prints = std::mem::take(&mut *self.prints.borrow_mut());
        for line in prints {
            self.bridge
                .log(super::host::LogLevel::Info, &format!("print: {line}"));
        }
        match r {
            Ok(v) => Ok(v),
            Err(ScriptError::Failed(m)) => Err(self.fail(node, format!("script: {m}"))),
            Err(ScriptError::Limit(m)) => {
                let kind = if m.contains("memory") {
                    "script_memory"
                } else {
                    "script_time"
                };
                Err(self.limit(node, kind, m))
            }
            Err(ScriptError::Stopped) => Err(Flow::Stopped),
        }
    }

    /// Binds a variable the way `how` says, mapping the memory cap to a failure.
    pub(crate) fn bind(
        &mut self,
        node: &Node,
        how: fn(&mut Vars, &str, Value) -> Result<(), MemoryCap>,
        name: &str,
        value: Value,
    ) -> R<()> {
        let r = how(&mut self.vars.borrow_mut(), name, value);
        r.map_err(|e| self.limit(node, "variable_memory", format!("{name}: {e}")))
    }

    pub(crate) fn fail(&self, node: &Node, message: impl Into<String>) -> Flow {
        self.failure(node, FailKind::Runtime, message)
    }

    pub(crate) fn limit(
        &self,
        node: &Node,
        name: &'static str,
        message: impl Into<String>,
    ) -> Flow {
        self.failure(node, FailKind::Limit(name), message)
    }

    pub(crate) fn failure(&self, node: &Node, kind: FailKind, message: impl Into<String>) -> Flow {
        Flow::Fail(Failure {
            path: node.path.clone(),
            line: node.line,
            column: node.column,
            message: message.into(),
            kind,
        })
    }

    /// Variables of the session scope, and how many bytes all variables hold.
    pub(crate) fn session_vars(&self) -> std::collections::BTreeMap<String, Value> {
        self.vars.borrow().session_vars()
    }
}

/// A plain name (`item`, `page_url`).
fn is_identifier(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_alphabetic() || f == '_' || f == '$')
        && c.all(|x| x.is_alphanumeric() || x == '_' || x == '$')
}
