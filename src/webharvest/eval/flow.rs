//! Variables and control flow: `var-def`, `var`, `def`, `get`, `set`, `loop`, `while`, `case`,
//! `call` and `call-param` (functions are registered in `mod.rs`), `try`, `exit`.

use super::super::parse::{Kind, Node};
use super::super::scope::{ScopeKind, Vars};
use super::super::value::{Concat, Value, is_true};
use super::{FailKind, Flow, Frame, Interp, R};

impl<'p> Interp<'p> {
    /// Runs `f` in a new scope, closing it whatever happens.
    fn scoped<T>(&mut self, kind: ScopeKind, f: impl FnOnce(&mut Self) -> R<T>) -> R<T> {
        self.vars.borrow_mut().push(kind);
        let r = f(self);
        self.vars.borrow_mut().pop();
        r
    }

    pub(super) fn variable(&mut self, node: &'p Node) -> R<Value> {
        match node.kind {
            Kind::VarDef => {
                let value = self.body(node)?;
                let name = self.required(node, "name")?;
                let overwrite = self
                    .attr_text(node, "overwrite")?
                    .is_none_or(|o| is_true(o.trim()));
                let defined = self.vars.borrow().get(&name).is_some();
                if !defined || overwrite {
                    self.bind(node, Vars::assign, &name, value)?;
                }
                Ok(self.vars.borrow().get(&name).cloned().unwrap_or_default())
            }
            Kind::Var | Kind::Get => {
                let attr = if node.kind == Kind::Var {
                    "name"
                } else {
                    "var"
                };
                let name = self.required(node, attr)?;
                let v = self.vars.borrow().get(&name).cloned();
                v.ok_or_else(|| self.fail(node, format!("variable `{name}` is not defined")))
            }
            _ => self.def_or_set(node),
        }
    }

    /// `def` and `set` (Web-Harvest's `AbstractVariableModifierPlugin`): the value is the `value`
    /// attribute, else the body, else the variable's own value when only `default` is given, else
    /// `default`.
    fn def_or_set(&mut self, node: &'p Node) -> R<Value> {
        let name = self.required(node, "var")?;
        let value_src = node.attr("value").filter(|t| !t.parts.is_empty());
        let has_default = node.attr("default").is_some_and(|t| !t.parts.is_empty());
        let mut value = match value_src.map(|t| (t, t.parts.as_slice())) {
            None => Value::Empty,
            // `value="${name}"` reads the variable itself (a list stays a list).
            Some((_, [super::Part::Expr(e)])) if super::is_identifier(e.trim()) => {
                let id = e.trim();
                let v = self.vars.borrow().get(id).cloned();
                match v {
                    Some(v) => v,
                    None if has_default => Value::Empty,
                    None => {
                        return Err(self.fail(node, format!("variable `{id}` is not defined")));
                    }
                }
            }
            Some((t, _)) => self.template(node, t)?,
        };
        if value.is_empty() {
            value = self.body(node)?;
        }
        if value.is_empty() && value_src.is_none() && node.children.is_empty() && has_default {
            value = self.vars.borrow().get(&name).cloned().unwrap_or_default();
        }
        if value.is_empty()
            && let Some(v) = self.attr_value(node, "default")?
        {
            value = v;
        }
        let how: fn(&mut Vars, &str, Value) -> _ = if node.kind == Kind::Def {
            Vars::define
        } else {
            Vars::set
        };
        self.bind(node, how, &name, value)?;
        Ok(Value::Empty)
    }

    /// `maxloops`: the attribute (a number), or the default cap.
    fn max_loops(&mut self, node: &'p Node) -> R<(u64, bool)> {
        match self.attr_text(node, "maxloops")? {
            None => Ok((self.limits.max_loops, false)),
            Some(s) => match s.trim().parse::<f64>() {
                Ok(n) if n >= 0.0 => Ok((n.min(u64::MAX as f64) as u64, true)),
                _ => Err(self.fail(node, format!("maxloops {s:?} is not a number"))),
            },
        }
    }

    fn too_many(&self, node: &Node, what: &str, max: u64) -> Flow {
        self.limit(
            node,
            "max_loops",
            format!(
                "{what} stopped after {max} iterations, the default maxloops; set maxloops on it \
                 to allow more"
            ),
        )
    }

    pub(super) fn loop_processor(&mut self, node: &'p Node) -> R<Value> {
        let item = self.attr_text(node, "item")?;
        let index = self.attr_text(node, "index")?;
        let filter = self.attr_text(node, "filter")?;
        let empty = self.attr_bool(node, "empty", false)?;
        let (max, explicit) = self.max_loops(node)?;
        let filter = match filter {
            None => Filter::default(),
            Some(f) => Filter::parse(&f).map_err(|e| self.fail(node, e))?,
        };
        let (Some(list), Some(body)) = (node.child(&Kind::List), node.child(&Kind::Body)) else {
            return Err(self.fail(node, "`loop` needs `list` and `body`"));
        };
        let items = self.body(list)?.items();
        let mut seen = std::collections::HashSet::new();
        let mut out = Concat::default();
        let mut n = 0u64;
        for (i, it) in items.into_iter().enumerate() {
            if !filter.accepts(i + 1) || (filter.unique && !seen.insert(it.clone())) {
                continue;
            }
            if n >= max {
                if explicit {
                    break;
                }
                return Err(self.too_many(node, "loop", max));
            }
            n += 1;
            let r = self.scoped(ScopeKind::Block, |s| {
                if let Some(name) = &item {
                    s.bind(node, Vars::define, name, Value::Text(it))?;
                }
                if let Some(name) = &index {
                    s.bind(node, Vars::define, name, Value::text(n.to_string()))?;
                }
                s.body(body)
            })?;
            if !empty {
                out.push(r);
                self.check_size(node, out.bytes())?;
            }
        }
        Ok(if empty {
            Value::Empty
        } else {
            out.finish_list()
        })
    }

    pub(super) fn while_processor(&mut self, node: &'p Node) -> R<Value> {
        let index = self.attr_text(node, "index")?;
        let empty = self.attr_bool(node, "empty", false)?;
        let (max, explicit) = self.max_loops(node)?;
        self.scoped(ScopeKind::Block, |s| {
            let mut i = 1u64;
            if let Some(name) = &index {
                s.bind(node, Vars::define, name, Value::text("1"))?;
            }
            let mut out = Concat::default();
            // Bounded: by maxloops (or the default cap, which fails).
            while s
                .attr_text(node, "condition")?
                .is_some_and(|c| is_true(c.trim()))
            {
                if i > max {
                    if explicit {
                        break;
                    }
                    return Err(s.too_many(node, "while", max));
                }
                let r = s.scoped(ScopeKind::Block, |s| s.body(node))?;
                if !empty {
                    out.push(r);
                    s.check_size(node, out.bytes())?;
                }
                i += 1;
                if let Some(name) = &index {
                    s.bind(node, Vars::define, name, Value::text(i.to_string()))?;
                }
            }
            Ok(if empty {
                Value::Empty
            } else {
                out.finish_list()
            })
        })
    }

    pub(super) fn case(&mut self, node: &'p Node) -> R<Value> {
        for c in &node.children {
            match c.kind {
                Kind::If => {
                    let cond = self.attr_text(c, "condition")?;
                    if cond.is_some_and(|s| is_true(s.trim())) {
                        return self.body(c);
                    }
                }
                Kind::Else => return self.body(c),
                _ => {}
            }
        }
        Ok(Value::Empty)
    }

    pub(super) fn call(&mut self, node: &'p Node) -> R<Value> {
        let name = self.required(node, "name")?;
        let Some(f) = self.functions.get(&name).copied() else {
            return Err(self.fail(
                node,
                format!(
                    "function `{name}` is not defined (a function is defined when its <function> \
                     runs, so it must come before the call)"
                ),
            ));
        };
        self.call_params.push(Vec::new());
        let r = self.body(node);
        let params = self.call_params.pop().unwrap_or_default();
        r?;
        if self.frames.len() >= self.limits.max_call_depth {
            return Err(self.limit(
                node,
                "call_depth",
                format!(
                    "calls nest deeper than {} (runaway recursion in `{name}`?)",
                    self.limits.max_call_depth
                ),
            ));
        }
        self.frames.push(Frame {
            result: Value::Empty,
        });
        let r = self.scoped(ScopeKind::Call, |s| {
            for (k, v) in params {
                s.bind(node, Vars::define, &k, v)?;
            }
            s.body(f)
        });
        let frame = self.frames.pop();
        r?;
        Ok(frame.map(|f| f.result).unwrap_or_default())
    }

    pub(super) fn call_param(&mut self, node: &'p Node) -> R<Value> {
        let name = self.required(node, "name")?;
        let value = self.body(node)?;
        let Some(params) = self.call_params.last_mut() else {
            return Err(self.fail(node, "`call-param` runs only inside `call`"));
        };
        match params.iter_mut().find(|(k, _)| *k == name) {
            Some((_, v)) => *v = value.clone(),
            None => params.push((name, value.clone())),
        }
        Ok(value)
    }

    pub(super) fn try_catch(&mut self, node: &'p Node) -> R<Value> {
        let (Some(body), Some(catch)) = (node.child(&Kind::Body), node.child(&Kind::Catch)) else {
            return Err(self.fail(node, "`try` needs `body` and `catch`"));
        };
        // What a failure inside may leave open (a call's parameters, an http's parts) is
        // closed by the processor that opened it before the failure reaches here.
        match self.body(body) {
            Err(Flow::Fail(f)) if matches!(f.kind, FailKind::Runtime | FailKind::Http { .. }) => {
                self.bridge.log(
                    super::super::host::LogLevel::Warn,
                    &format!("try caught: {}", f.describe()),
                );
                self.scoped(ScopeKind::Block, |s| {
                    let e = Value::text(f.message.clone());
                    s.bind(node, Vars::define, "error", e.clone())?;
                    s.bind(node, Vars::define, "_error", e)?;
                    s.body(catch)
                })
            }
            other => other,
        }
    }

    pub(super) fn exit(&mut self, node: &'p Node) -> R<Value> {
        let cond = self.attr_text(node, "condition")?;
        if cond.is_none_or(|c| is_true(c.trim())) {
            let message = self.attr_text(node, "message")?.unwrap_or_default();
            return Err(Flow::Exit(message));
        }
        Ok(Value::Empty)
    }
}

/// `loop`'s `filter`: positions (`3`, `2-5`, `-4`, `6-`), steps (`1:3`, `odd`, `even`) and
/// `unique`, comma-separated.
#[derive(Debug, Default)]
pub(crate) struct Filter {
    unique: bool,
    ranges: Vec<(usize, usize)>,
    steps: Vec<(usize, usize)>,
}

impl Filter {
    pub(crate) fn parse(s: &str) -> Result<Filter, String> {
        let mut f = Filter::default();
        let num = |t: &str, d: usize| -> Result<usize, String> {
            if t.is_empty() {
                return Ok(d);
            }
            t.parse()
                .map_err(|_| format!("loop filter: {t:?} is not a number"))
        };
        for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            match t {
                "unique" => f.unique = true,
                "odd" => f.steps.push((1, 2)),
                "even" => f.steps.push((2, 2)),
                t if t.contains(':') => {
                    let (a, b) = t.split_once(':').unwrap_or((t, ""));
                    let step = num(b, usize::MAX)?.max(1);
                    f.steps.push((num(a, 1)?, step));
                }
                t => {
                    let (a, b) = match t.split_once('-') {
                        Some((a, b)) => (num(a, 1)?, num(b, usize::MAX)?),
                        None => {
                            let n = num(t, 0).map_err(|_| {
                                format!(
                                    "loop filter: {t:?} is not one of unique, odd, even, N, M-N, M:N"
                                )
                            })?;
                            (n, n)
                        }
                    };
                    f.ranges.push((a, b));
                }
            }
        }
        Ok(f)
    }

    /// Whether the item at 1-based position `i` passes the positional part.
    fn accepts(&self, i: usize) -> bool {
        if self.ranges.is_empty() && self.steps.is_empty() {
            return true;
        }
        self.ranges.iter().any(|&(a, b)| i >= a && i <= b)
            || self
                .steps
                .iter()
                .any(|&(start, step)| i >= start && (i - start).is_multiple_of(step))
    }
}

#[cfg(test)]
mod tests {
    use super::Filter;

    #[test]
    fn filters_select_like_web_harvest() {
        let pick = |f: &str| -> Vec<usize> {
            let f = Filter::parse(f).unwrap();
            (1..=8).filter(|&i| f.accepts(i)).collect()
        };
        assert_eq!(pick("odd"), [1, 3, 5, 7]);
        assert_eq!(pick("2-4,7"), [2, 3, 4, 7]);
        assert_eq!(pick("-2"), [1, 2]);
        assert_eq!(pick("6-"), [6, 7, 8]);
        assert_eq!(pick("2:3"), [2, 5, 8]);
        assert_eq!(pick("unique"), [1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(Filter::parse("sideways").is_err());
    }
}
