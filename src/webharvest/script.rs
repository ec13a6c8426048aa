//! `<script>` and `${…}`: JavaScript in an embedded QuickJS (`rquickjs`), whatever `scriptlang`
//! or `language` says.
//!
//! One runtime per run, created on first use. It has the ECMAScript built-ins only: no modules,
//! no file or network access. Its memory is capped, and each evaluation has a time budget enforced
//! by QuickJS's interrupt handler (which also ends a script at once when the session is stopped).
//! Globals persist across evaluations, so a `<script>` can set up what later `${…}` use, as with
//! Web-Harvest's script engines.
//!
//! Web-Harvest's objects: `sys` (`lf`, `cr`, `tab`, `space`, `quot`, `apos`, `fullUrl`,
//! `escapeXml`, `datetime`, `date`, `time`, `getFilename`, `defineVariable`,
//! `isVariableDefined`, `getVar`, `error`), `http` (the last response: `statusCode`, `statusText`,
//! `charset`, `mimeType`, `contentLength`, `headers`, `getHeader`, `getHeaders`, `totalLength`,
//! `totalResponses`), `SetContextVar(name, value)`, `print(…)`, and the config's variables as
//! objects with `toString()`, `toList()`, `size()`, `isEmpty()`, `toInt()`, `toDouble()`,
//! `toBoolean()`. Only the variables a piece of code names are copied into the runtime.
//!
//! BeanShell-only syntax is refused before anything runs ([`beanshell_hint`]), with what to write
//! instead.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use rquickjs::context::EvalOptions;
use rquickjs::{CatchResultExt, CaughtError, Context, Ctx, Exception, Function, Runtime};

use super::scope::Vars;
use super::value::Value;
use crate::job::StopSignal;

/// Stack QuickJS may use (its own recursion check; the interpreter thread has far more).
const JS_STACK_BYTES: usize = 1 << 20;

const PRELUDE: &str = include_str!("prelude.js");
/// What a script that threw `null` reports; QuickJS also throws `null` when an allocation fails
/// past the memory limit, so near the limit it is taken as running out of memory.
const THREW_NULL: &str = "the script threw null";
/// The file name scripts run under (it appears in their stack traces).
const SCRIPT_FILE: &str = "script";

/// Why a script did not give a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ScriptError {
    /// It threw, or does not compile: the message, for the processor's error.
    Failed(String),
    /// It hit the time or memory limit (not catchable by `try`).
    Limit(String),
    /// The session was stopped while it ran.
    Stopped,
}

/// What the last `http` processor got, for the script `http` object.
#[derive(Debug, Clone, Default)]
pub(crate) struct HttpInfo {
    pub(crate) status: u16,
    pub(crate) status_text: String,
    pub(crate) charset: String,
    pub(crate) mime_type: String,
    pub(crate) content_length: u64,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) total_length: u64,
    pub(crate) total_responses: u64,
}

/// The JavaScript engine of one run.
pub(crate) struct Script {
    // Field order matters: the context must be dropped before its runtime.
    ctx: Context,
    rt: Runtime,
    deadline: Rc<Cell<Option<Instant>>>,
    time_budget: Duration,
    memory_limit: usize,
    vars: Rc<RefCell<Vars>>,
    /// Variables copied into the runtime, with the version copied.
    synced: HashMap<String, u64>,
    stop: StopSignal,
}

impl Script {
    /// A runtime with these limits; `prints` collects `print(…)` lines.
    pub(crate) fn new(
        vars: Rc<RefCell<Vars>>,
        prints: Rc<RefCell<Vec<String>>>,
        memory_limit: usize,
        time_budget: Duration,
        stop: StopSignal,
    ) -> Result<Script, String> {
        let rt = Runtime::new().map_err(|e| format!("cannot start the script engine: {e}"))?;
        rt.set_memory_limit(memory_limit);
        rt.set_max_stack_size(JS_STACK_BYTES);
        let deadline: Rc<Cell<Option<Instant>>> = Rc::new(Cell::new(None));
        let (d, s) = (deadline.clone(), stop.clone());
        rt.set_interrupt_handler(Some(Box::new(move || {
            s.is_stopped() || d.get().is_some_and(|d| Instant::now() > d)
        })));
        let ctx = Context::full(&rt).map_err(|e| format!("cannot start the script engine: {e}"))?;
        let v = vars.clone();
        ctx.with(|ctx| -> Result<(), String> {
            install(&ctx, v, prints).map_err(|e| format!("script engine setup: {e}"))?;
            let mut opts = EvalOptions::default();
            opts.filename = Some("prelude.js".into());
            let r: rquickjs::Result<()> = ctx.eval_with_options(PRELUDE, opts);
            r.catch(&ctx)
                .map_err(|e| format!("script engine setup: {e}"))
        })?;
        Ok(Script {
            ctx,
            rt,
            deadline,
            time_budget,
            memory_limit,
            vars,
            synced: HashMap::new(),
            stop,
        })
    }

    /// Evaluates `code` (an expression or statements; the value of the last one is the result).
    pub(crate) fn eval(&mut self, code: &str) -> Result<Value, ScriptError> {
        if let Some(hint) = beanshell_hint(code) {
            return Err(ScriptError::Failed(hint));
        }
        self.deadline.set(Some(Instant::now() + self.time_budget));
        let synced = &mut self.synced;
        let vars = &self.vars;
        let out = self.ctx.with(|ctx| -> Result<Value, ScriptError> {
            sync(&ctx, vars, synced, code).map_err(|e| ScriptError::Failed(e.to_string()))?;
            let mut opts = EvalOptions::default();
            opts.strict = false;
            opts.filename = Some(SCRIPT_FILE.into());
            let res: rquickjs::Result<rquickjs::Value> = ctx.eval_with_options(code, opts);
            let v = res.catch(&ctx).map_err(|e| match e {
                CaughtError::Value(v) if v.is_null() => ScriptError::Failed(THREW_NULL.into()),
                e => caught(&e),
            })?;
            let convert: Function = ctx
                .globals()
                .get("__wh_result")
                .map_err(|e| ScriptError::Failed(e.to_string()))?;
            let r: rquickjs::Value = convert.call((v,)).catch(&ctx).map_err(|e| caught(&e))?;
            from_js(&r).map_err(ScriptError::Failed)
        });
        self.deadline.set(None);
        match out {
            Err(ScriptError::Failed(m)) if self.stop.is_stopped() && m.contains("interrupted") => {
                Err(ScriptError::Stopped)
            }
            Err(ScriptError::Failed(m)) if m.contains("interrupted") => {
                Err(ScriptError::Limit(format!(
                    "the script ran longer than its time limit ({} ms)",
                    self.time_budget.as_millis()
                )))
            }
            Err(ScriptError::Failed(m))
                if m.contains("out of memory")
                    || (m == THREW_NULL
                        && self.rt.memory_usage().malloc_size as f64
                            >= self.memory_limit as f64 * 0.75) =>
            {
                self.rt.run_gc();
                Err(ScriptError::Limit(format!(
                    "the script ran out of memory (limit {} bytes)",
                    self.memory_limit
                )))
            }
            other => other,
        }
    }

    /// Updates the `http` object after a response.
    pub(crate) fn set_http(&mut self, info: &HttpInfo) -> Result<(), String> {
        self.ctx.with(|ctx| {
            let f: Function = ctx
                .globals()
                .get("__wh_setHttp")
                .map_err(|e| e.to_string())?;
            let headers: Vec<String> = info
                .headers
                .iter()
                .flat_map(|(k, v)| [k.clone(), v.clone()])
                .collect();
            let texts = vec![
                info.status_text.clone(),
                info.charset.clone(),
                info.mime_type.clone(),
            ];
            let numbers = vec![
                f64::from(info.status),
                info.content_length as f64,
                info.total_length as f64,
                info.total_responses as f64,
            ];
            let r: rquickjs::Result<()> = f.call((numbers, texts, headers));
            r.catch(&ctx).map_err(|e| e.to_string())
        })
    }
}

fn caught(e: &CaughtError) -> ScriptError {
    let msg = match e {
        CaughtError::Exception(ex) => {
            let name: String = ex.get("name").unwrap_or_else(|_| "Error".into());
            let mut m = format!("{name}: {}", ex.message().unwrap_or_default());
            let here = format!("({SCRIPT_FILE}:");
            if let Some(at) = ex.stack().and_then(|s| {
                let l = s.lines().find(|l| l.contains(&here))?;
                let rest = &l[l.find(&here)? + here.len()..];
                Some(rest.split(':').next()?.to_string())
            }) {
                m.push_str(&format!(" (script line {at})"));
            }
            m
        }
        other => other.to_string().trim().to_string(),
    };
    ScriptError::Failed(msg)
}

/// A JavaScript value returned by `__wh_result` (null, a string or an array of strings).
fn from_js(v: &rquickjs::Value) -> Result<Value, String> {
    if v.is_null() || v.is_undefined() {
        return Ok(Value::Empty);
    }
    if let Some(s) = v.as_string() {
        return Ok(Value::text(s.to_string().map_err(|e| e.to_string())?));
    }
    if let Some(a) = v.as_array() {
        let mut items = Vec::with_capacity(a.len());
        for item in a.iter::<String>() {
            items.push(Arc::from(item.map_err(|e| e.to_string())?));
        }
        return Ok(Value::list(items));
    }
    Err(format!("unexpected script value of type {}", v.type_name()))
}

/// Copies into the runtime the variables `code` names (fresh versions only), and removes copies
/// of variables that changed since, so the runtime holds no stale or unused large values.
fn sync(
    ctx: &Ctx,
    vars: &Rc<RefCell<Vars>>,
    synced: &mut HashMap<String, u64>,
    code: &str,
) -> rquickjs::Result<()> {
    let globals = ctx.globals();
    let vars = vars.borrow();
    let mut stale = Vec::new();
    for (name, version) in synced.iter() {
        if vars.get_versioned(name).map(|(_, v)| v) != Some(*version) {
            stale.push(name.clone());
        }
    }
    for name in stale {
        synced.remove(&name);
        globals.remove(name.as_str())?;
    }
    let wrap: Function = globals.get("__wh_wrap")?;
    for name in identifiers(code) {
        if RESERVED.contains(&name) || synced.contains_key(name) {
            continue;
        }
        let Some((value, version)) = vars.get_versioned(name) else {
            continue;
        };
        let obj: rquickjs::Value = match value {
            Value::List(items) => {
                let items: Vec<String> = items.iter().map(|s| s.to_string()).collect();
                wrap.call((items, true))?
            }
            other => wrap.call((vec![other.to_text()], false))?,
        };
        globals.set(name, obj)?;
        synced.insert(name.to_string(), version);
    }
    Ok(())
}

/// Names a variable never shadows in scripts (the runtime's own globals).
const RESERVED: &[&str] = &[
    "sys",
    "http",
    "print",
    "SetContextVar",
    "setContextVar",
    "Object",
    "Array",
    "String",
    "Number",
    "Boolean",
    "Math",
    "JSON",
    "Date",
    "RegExp",
    "Error",
    "TypeError",
    "Map",
    "Set",
    "Symbol",
    "Promise",
    "parseInt",
    "parseFloat",
    "isNaN",
    "isFinite",
    "undefined",
    "NaN",
    "Infinity",
    "globalThis",
    "eval",
    "Function",
    "Reflect",
    "Proxy",
    "encodeURIComponent",
    "decodeURIComponent",
    "encodeURI",
    "decodeURI",
    "escape",
    "unescape",
];

/// Identifiers in `code` that could be variable references (not after a `.`).
fn identifiers(code: &str) -> impl Iterator<Item = &str> {
    static IDENT: LazyLock<regex::Regex> =
        LazyLock::new(|| regex::Regex::new(r"[A-Za-z_$][A-Za-z0-9_$]*").expect("static regex"));
    IDENT.find_iter(code).filter_map(move |m| {
        let before = code[..m.start()].trim_end();
        (!before.ends_with('.')).then_some(m.as_str())
    })
}

/// Registers the native functions the prelude builds `sys` and friends on.
fn install(
    ctx: &Ctx,
    vars: Rc<RefCell<Vars>>,
    prints: Rc<RefCell<Vec<String>>>,
) -> rquickjs::Result<()> {
    let g = ctx.globals();
    g.set(
        "__wh_fullUrl",
        Function::new(ctx.clone(), |base: String, link: String| {
            super::http::full_url(&base, &link)
        })?,
    )?;
    g.set(
        "__wh_escapeXml",
        Function::new(ctx.clone(), |s: String| escape_xml(&s))?,
    )?;
    g.set(
        "__wh_datetime",
        Function::new(ctx.clone(), |ctx: Ctx, f: String| {
            java_datetime(&f).map_err(|e| Exception::throw_message(&ctx, &e))
        })?,
    )?;
    let v = vars.clone();
    g.set(
        "__wh_isDefined",
        Function::new(ctx.clone(), move |name: String| {
            v.borrow().get(&name).is_some()
        })?,
    )?;
    let v = vars.clone();
    g.set(
        "__wh_getVarItems",
        Function::new(ctx.clone(), move |name: String| -> Option<Vec<String>> {
            v.borrow().get(&name).map(|val| match val {
                Value::List(items) => items.iter().map(|s| s.to_string()).collect(),
                other => vec![other.to_text()],
            })
        })?,
    )?;
    let v = vars.clone();
    g.set(
        "__wh_isList",
        Function::new(ctx.clone(), move |name: String| {
            matches!(v.borrow().get(&name), Some(Value::List(_)))
        })?,
    )?;
    for (fname, var_def) in [("__wh_define", false), ("__wh_setContext", true)] {
        let v = vars.clone();
        g.set(
            fname,
            Function::new(
                ctx.clone(),
                move |ctx: Ctx<'_>, name: String, value: rquickjs::Value<'_>, overwrite: bool| {
                    let value = from_js(&value).map_err(|e| Exception::throw_type(&ctx, &e))?;
                    let mut vars = v.borrow_mut();
                    if !overwrite && vars.get(&name).is_some() {
                        return Ok(());
                    }
                    let r = if var_def {
                        vars.assign(&name, value)
                    } else {
                        vars.define(&name, value)
                    };
                    r.map_err(|e| Exception::throw_internal(&ctx, &e.to_string()))
                },
            )?,
        )?;
    }
    g.set(
        "__wh_print",
        Function::new(ctx.clone(), move |s: String| {
            let mut p = prints.borrow_mut();
            // A script printing in a tight loop must not grow the log without bound.
            if p.len() < 1000 {
                p.push(s);
            }
        })?,
    )?;
    Ok(())
}

/// Web-Harvest's `CommonUtil.escapeXml`: `&` (unless it starts an entity), `<`, `>`, `"`, `'`.
pub(crate) fn escape_xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, c) in s.char_indices() {
        match c {
            '&' => {
                let rest = &s[i..];
                if ["&amp;", "&apos;", "&gt;", "&lt;", "&quot;"]
                    .iter()
                    .any(|e| rest.starts_with(e))
                {
                    out.push('&');
                } else {
                    out.push_str("&amp;");
                }
            }
            '\'' => out.push_str("&apos;"),
            '>' => out.push_str("&gt;"),
            '<' => out.push_str("&lt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// The local time in a Java `SimpleDateFormat` pattern (`yyyy-MM-dd HH:mm:ss`…).
pub(crate) fn java_datetime(pattern: &str) -> Result<String, String> {
    let mut fmt = String::new();
    let chars: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    // Bounded: each round consumes at least one character.
    while i < chars.len() {
        let c = chars[i];
        if c == '\'' {
            let mut j = i + 1;
            if chars.get(j) == Some(&'\'') {
                fmt.push('\'');
                i += 2;
                continue;
            }
            while j < chars.len() && chars[j] != '\'' {
                push_literal(&mut fmt, chars[j]);
                j += 1;
            }
            i = j + 1;
            continue;
        }
        if !c.is_ascii_alphabetic() {
            push_literal(&mut fmt, c);
            i += 1;
            continue;
        }
        let mut n = 1;
        while chars.get(i + n) == Some(&c) {
            n += 1;
        }
        let spec = match (c, n) {
            ('y', 2) => "%y",
            ('y', _) => "%Y",
            ('M', 1) => "%-m",
            ('M', 2) => "%m",
            ('M', 3) => "%b",
            ('M', _) => "%B",
            ('d', 1) => "%-d",
            ('d', _) => "%d",
            ('H', 1) => "%-H",
            ('H', _) => "%H",
            ('h', 1) => "%-I",
            ('h', _) => "%I",
            ('m', 1) => "%-M",
            ('m', _) => "%M",
            ('s', 1) => "%-S",
            ('s', _) => "%S",
            ('S', _) => "%3f",
            ('E', 1..=3) => "%a",
            ('E', _) => "%A",
            ('a', _) => "%p",
            ('D', _) => "%j",
            ('z', _) => "%Z",
            ('Z', _) => "%z",
            _ => {
                return Err(format!(
                    "sys.datetime: pattern letter {c:?} is not supported"
                ));
            }
        };
        fmt.push_str(spec);
        i += n;
    }
    Ok(chrono::Local::now().format(&fmt).to_string())
}

fn push_literal(fmt: &mut String, c: char) {
    if c == '%' {
        fmt.push_str("%%");
    } else {
        fmt.push(c);
    }
}

/// Why `code` is BeanShell rather than JavaScript, and what to write instead; `None` when it has
/// none of the BeanShell-only forms harvest recognises.
pub(crate) fn beanshell_hint(code: &str) -> Option<String> {
    static RULES: LazyLock<Vec<(regex::Regex, &'static str)>> = LazyLock::new(|| {
        let type_name = r"(?:final[ \t]+)?([A-Za-z_][A-Za-z0-9_.]*(?:<[^<>;=()]*>)?(?:\[\])*)";
        [
            (
                r"\bimport[ \t]+(?:java|javax|org|com)\.".to_string(),
                "Java imports do not exist in JavaScript; remove the import and use JavaScript built-ins",
            ),
            (
                r"\bnew[ \t]+(?:java\.util\.)?(?:HashSet|TreeSet|LinkedHashSet)\b".to_string(),
                "`new HashSet()` is Java; write `new Set()` (add, has, size)",
            ),
            (
                r"\bnew[ \t]+(?:java\.util\.)?(?:ArrayList|LinkedList|Vector)\b".to_string(),
                "`new ArrayList()` is Java; write `[]` (push, length)",
            ),
            (
                r"\bnew[ \t]+(?:java\.util\.)?(?:HashMap|TreeMap|Hashtable|LinkedHashMap)\b".to_string(),
                "`new HashMap()` is Java; write `new Map()` (set, get, has) or `{}`",
            ),
            (
                r"\bnew[ \t]+(?:java\.lang\.)?(?:StringBuffer|StringBuilder)\b".to_string(),
                "`new StringBuffer()` is Java; build a string with `+=`, or an array and `join('')`",
            ),
            (
                r"\bnew[ \t]+(?:java|javax|org)\.[A-Za-z_.]+".to_string(),
                "Java classes do not exist in JavaScript; use JavaScript built-ins",
            ),
            (
                r"\.length[ \t]*\([ \t]*\)".to_string(),
                "`.length()` is Java; in JavaScript `length` is a property: write `.length`",
            ),
            (
                format!(r"\bfor[ \t]*\([ \t]*{type_name}[ \t]+[A-Za-z_$][A-Za-z0-9_$]*[ \t]*:"),
                "`for (Type x : list)` is Java; write `for (const x of list.toList())`",
            ),
            (
                r"\(\s*(?:String|int|long|double|float|boolean|char|Integer|Long|Double)\s*\)[ \t]*[A-Za-z_$]".to_string(),
                "Java casts do not exist in JavaScript; write `String(x)` or `Number(x)`",
            ),
            (
                format!(r"(?m)(?:^|[;{{}}(,])[ \t]*{type_name}[ \t]+([A-Za-z_$][A-Za-z0-9_$]*)[ \t]*\([^()]*\)[ \t]*\{{"),
                "a Java method declaration; write `function name(arg) { … }`",
            ),
            (
                format!(r"(?m)(?:^|[;{{}}(,])[ \t]*{type_name}[ \t]+([A-Za-z_$][A-Za-z0-9_$]*)[ \t]*(?:=[^=]|;|,[ \t]*[A-Za-z_$]|\))"),
                "a typed declaration is Java (BeanShell); write `var x = …` (scripts run as JavaScript)",
            ),
        ]
        .into_iter()
        .filter_map(|(re, hint)| regex::Regex::new(&re).ok().map(|r| (r, hint)))
        .collect()
    });
    let code = blank_strings_and_comments(code);
    for (re, hint) in RULES.iter() {
        for caps in re.captures_iter(&code) {
            // A JavaScript keyword before a name (`var x =`, `return x;`) is not a type.
            if let Some(t) = caps.get(1)
                && JS_WORDS.contains(&t.as_str())
            {
                continue;
            }
            let found = caps.get(0).map_or("", |m| m.as_str()).trim();
            let found = found.trim_start_matches([';', '{', '}', '(', ',']).trim();
            return Some(format!(
                "BeanShell syntax is not supported (found `{found}`): {hint}"
            ));
        }
    }
    None
}

/// Words that may stand before a name in JavaScript.
const JS_WORDS: &[&str] = &[
    "var",
    "let",
    "const",
    "return",
    "typeof",
    "new",
    "delete",
    "void",
    "throw",
    "case",
    "else",
    "do",
    "in",
    "of",
    "instanceof",
    "yield",
    "await",
    "async",
    "export",
    "import",
    "function",
    "class",
    "extends",
    "static",
    "get",
    "set",
    "break",
    "continue",
    "default",
    "with",
    "this",
    "super",
];

/// `code` with string literals and comments replaced by spaces (lines kept), so patterns only
/// see code.
fn blank_strings_and_comments(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut chars = code.chars().peekable();
    // Bounded: each round consumes at least one character.
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                out.push(c);
                while let Some(d) = chars.next() {
                    if d == '\\' {
                        chars.next();
                        out.push(' ');
                        out.push(' ');
                        continue;
                    }
                    if d == c {
                        out.push(d);
                        break;
                    }
                    out.push(if d == '\n' { '\n' } else { ' ' });
                }
            }
            '/' if chars.peek() == Some(&'/') => {
                for d in chars.by_ref() {
                    if d == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut prev = ' ';
                for d in chars.by_ref() {
                    if prev == '*' && d == '/' {
                        break;
                    }
                    if d == '\n' {
                        out.push('\n');
                    }
                    prev = d;
                }
                out.push(' ');
            }
            c => out.push(c),
        }
    }
    out
}
