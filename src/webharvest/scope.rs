//! Variables: a stack of scopes, searched innermost first (dynamic scoping, as Web-Harvest 2.x).
//!
//! The bottom scope is the session's (its variables are the session context). Each loop and
//! while iteration, each function call and each `catch` pushes a scope that is dropped after it,
//! with what was defined in it. How each way of writing picks its scope:
//! - `def`, `sys.defineVariable`, loop `item`/`index`: the innermost scope (2.x `def`);
//! - `set`: the innermost scope already holding the name, anywhere, else the innermost (2.x `set`);
//! - `var-def`, `SetContextVar`: the innermost scope holding the name up to the nearest function
//!   call, else the innermost. So a classic config that updates a variable from inside a loop body
//!   (as 1.0 configs do, where loops had no scopes) still updates it, while a function never
//!   overwrites its caller's variables through `var-def`.
//!
//! Every binding is counted against one memory cap (bytes of all values held); a write past it is
//! refused.

use std::collections::BTreeMap;

use super::value::Value;

/// What opened a scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScopeKind {
    /// The session's own (bottom) scope.
    Session,
    /// A function call: `var-def` does not write past it.
    Call,
    /// A loop or while iteration, or a `catch`.
    Block,
}

#[derive(Debug)]
struct Binding {
    name: String,
    value: Value,
    /// Changes whenever the binding is written (lets scripts see fresh values cheaply).
    version: u64,
}

#[derive(Debug)]
struct Scope {
    kind: ScopeKind,
    vars: Vec<Binding>,
}

/// All variables of a run.
#[derive(Debug)]
pub(crate) struct Vars {
    scopes: Vec<Scope>,
    bytes: usize,
    limit: usize,
    version: u64,
}

/// A write would pass the variable memory cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MemoryCap {
    pub(crate) limit: usize,
    pub(crate) wanted: usize,
}

impl std::fmt::Display for MemoryCap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "variables would hold {} bytes, more than the variable memory cap ({} bytes)",
            self.wanted, self.limit
        )
    }
}

impl Vars {
    /// Variables with the session scope only, capped at `limit` bytes.
    pub(crate) fn new(limit: usize) -> Vars {
        Vars {
            scopes: vec![Scope {
                kind: ScopeKind::Session,
                vars: Vec::new(),
            }],
            bytes: 0,
            limit,
            version: 0,
        }
    }

    /// Opens a scope.
    pub(crate) fn push(&mut self, kind: ScopeKind) {
        self.scopes.push(Scope {
            kind,
            vars: Vec::new(),
        });
    }

    /// Closes the innermost scope (never the session's).
    pub(crate) fn pop(&mut self) {
        if self.scopes.len() > 1
            && let Some(s) = self.scopes.pop()
        {
            self.bytes -= s.vars.iter().map(|b| b.value.bytes()).sum::<usize>();
        }
    }

    /// The visible value of a name.
    pub(crate) fn get(&self, name: &str) -> Option<&Value> {
        self.find(name, self.scopes.len())
            .map(|(s, i)| &self.scopes[s].vars[i].value)
    }

    /// The visible value of a name and its version.
    pub(crate) fn get_versioned(&self, name: &str) -> Option<(&Value, u64)> {
        self.find(name, self.scopes.len()).map(|(s, i)| {
            let b = &self.scopes[s].vars[i];
            (&b.value, b.version)
        })
    }

    /// Where `name` is bound, searching scopes below `above` from the innermost.
    fn find(&self, name: &str, above: usize) -> Option<(usize, usize)> {
        (0..above).rev().find_map(|s| {
            self.scopes[s]
                .vars
                .iter()
                .position(|b| b.name == name)
                .map(|i| (s, i))
        })
    }

    /// Defines `name` in the innermost scope (`def`).
    pub(crate) fn define(&mut self, name: &str, value: Value) -> Result<(), MemoryCap> {
        let s = self.scopes.len() - 1;
        self.write_at(s, name, value)
    }

    /// Writes where `set` writes: the innermost binding anywhere, else the innermost scope.
    pub(crate) fn set(&mut self, name: &str, value: Value) -> Result<(), MemoryCap> {
        let s = self
            .find(name, self.scopes.len())
            .map_or(self.scopes.len() - 1, |(s, _)| s);
        self.write_at(s, name, value)
    }

    /// Writes where `var-def` writes: the innermost binding up to the nearest function call, else
    /// the innermost scope.
    pub(crate) fn assign(&mut self, name: &str, value: Value) -> Result<(), MemoryCap> {
        let frame = self
            .scopes
            .iter()
            .rposition(|s| s.kind != ScopeKind::Block)
            .unwrap_or(0);
        let s = (frame..self.scopes.len())
            .rev()
            .find(|&s| self.scopes[s].vars.iter().any(|b| b.name == name))
            .unwrap_or(self.scopes.len() - 1);
        self.write_at(s, name, value)
    }

    fn write_at(&mut self, s: usize, name: &str, value: Value) -> Result<(), MemoryCap> {
        let old = self.scopes[s]
            .vars
            .iter()
            .find(|b| b.name == name)
            .map_or(0, |b| b.value.bytes());
        let wanted = self.bytes - old + value.bytes();
        if wanted > self.limit {
            return Err(MemoryCap {
                limit: self.limit,
                wanted,
            });
        }
        self.bytes = wanted;
        self.version += 1;
        let version = self.version;
        let vars = &mut self.scopes[s].vars;
        match vars.iter_mut().find(|b| b.name == name) {
            Some(b) => {
                b.value = value;
                b.version = version;
            }
            None => vars.push(Binding {
                name: name.to_string(),
                value,
                version,
            }),
        }
        Ok(())
    }

    /// Bytes held by all bindings.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The session scope's variables.
    pub(crate) fn session_vars(&self) -> BTreeMap<String, Value> {
        self.scopes[0]
            .vars
            .iter()
            .map(|b| (b.name.clone(), b.value.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Value {
        Value::text(s)
    }

    #[test]
    fn blocks_hide_their_definitions_but_var_def_updates_outer_ones() {
        let mut v = Vars::new(1 << 20);
        v.define("page", t("1")).unwrap();
        v.push(ScopeKind::Block);
        v.assign("page", t("2")).unwrap();
        v.assign("local", t("x")).unwrap();
        v.define("page", t("shadow")).unwrap();
        assert_eq!(v.get("page"), Some(&t("shadow")));
        v.pop();
        assert_eq!(v.get("page"), Some(&t("2")));
        assert_eq!(v.get("local"), None);
    }

    #[test]
    fn calls_stop_var_def_but_not_set() {
        let mut v = Vars::new(1 << 20);
        v.define("x", t("caller")).unwrap();
        v.push(ScopeKind::Call);
        assert_eq!(
            v.get("x"),
            Some(&t("caller")),
            "callees read their callers' variables"
        );
        v.assign("x", t("callee")).unwrap();
        v.pop();
        assert_eq!(v.get("x"), Some(&t("caller")));
        v.push(ScopeKind::Call);
        v.set("x", t("set")).unwrap();
        v.pop();
        assert_eq!(v.get("x"), Some(&t("set")));
    }

    #[test]
    fn the_memory_cap_counts_every_binding_and_frees_popped_scopes() {
        let mut v = Vars::new(10);
        v.define("a", t("12345")).unwrap();
        v.push(ScopeKind::Block);
        v.define("b", t("12345")).unwrap();
        let e = v.define("c", t("1")).unwrap_err();
        assert_eq!(e.limit, 10);
        v.pop();
        v.define("c", t("1")).unwrap();
        assert_eq!(v.bytes(), 6);
        v.define("a", t("1")).unwrap();
        assert_eq!(v.bytes(), 2);
    }
}
