//! What every processor yields: empty, a text, or a flat list of texts (Web-Harvest's
//! `EmptyVariable`, `NodeVariable` and `ListVariable`).
//!
//! Values are cheap to clone (shared strings), so reading a large page from a variable many times
//! does not copy it.

use std::sync::Arc;

/// A processor's value.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Value {
    /// Nothing (Web-Harvest's `EmptyVariable`).
    #[default]
    Empty,
    /// One text.
    Text(Arc<str>),
    /// A list of texts (lists never nest: a list added to a list is flattened).
    List(Arc<[Arc<str>]>),
}

impl Value {
    /// A text value (empty text is [`Value::Empty`]).
    pub fn text(s: impl Into<String>) -> Value {
        let s: String = s.into();
        if s.is_empty() {
            Value::Empty
        } else {
            Value::Text(Arc::from(s))
        }
    }

    /// A list value.
    pub fn list(items: Vec<Arc<str>>) -> Value {
        Value::List(Arc::from(items))
    }

    /// Whether it holds no text at all (an empty text, or a list of empty texts).
    pub fn is_empty(&self) -> bool {
        match self {
            Value::Empty => true,
            Value::Text(s) => s.is_empty(),
            Value::List(items) => items.iter().all(|s| s.is_empty()),
        }
    }

    /// Its items: a text is a list of one, empty is a list of none.
    pub fn items(&self) -> Vec<Arc<str>> {
        match self {
            Value::Empty => Vec::new(),
            Value::Text(s) if s.is_empty() => Vec::new(),
            Value::Text(s) => vec![s.clone()],
            Value::List(items) => items.to_vec(),
        }
    }

    /// Its text: a list joins its non-empty items with `\n`, as Web-Harvest's lists do.
    pub fn to_text(&self) -> String {
        self.to_text_with("\n")
    }

    /// Its text, list items joined by `delimiter` (empty items skipped).
    pub fn to_text_with(&self, delimiter: &str) -> String {
        match self {
            Value::Empty => String::new(),
            Value::Text(s) => s.to_string(),
            Value::List(items) => {
                let mut out = String::new();
                for s in items.iter().filter(|s| !s.is_empty()) {
                    if !out.is_empty() {
                        out.push_str(delimiter);
                    }
                    out.push_str(s);
                }
                out
            }
        }
    }

    /// Bytes held (what the variable memory cap counts).
    pub fn bytes(&self) -> usize {
        match self {
            Value::Empty => 0,
            Value::Text(s) => s.len(),
            Value::List(items) => items.iter().map(|s| s.len() + 16).sum(),
        }
    }

    /// The exported form: a list stays a list, anything else is its text.
    pub fn export(&self) -> VarValue {
        match self {
            Value::List(items) => VarValue::List(items.iter().map(|s| s.to_string()).collect()),
            other => VarValue::Text(other.to_text()),
        }
    }
}

/// Web-Harvest's `CommonUtil.isBooleanTrue`.
pub fn is_true(s: &str) -> bool {
    s == "1" || s.eq_ignore_ascii_case("true") || s.eq_ignore_ascii_case("yes")
}

/// Web-Harvest's `CommonUtil.getBooleanValue`: `Some` only for a recognised spelling.
pub fn parse_bool(s: &str) -> Option<bool> {
    if is_true(s) {
        Some(true)
    } else if s == "0" || s.eq_ignore_ascii_case("false") || s.eq_ignore_ascii_case("no") {
        Some(false)
    } else {
        None
    }
}

/// A session variable as stored with the session: a text, or a list of texts.
pub type VarValue = crate::session::ContextValue;

/// Collects the values of a body of several processors: their non-empty values, lists
/// flattened (Web-Harvest's `BodyProcessor`).
#[derive(Debug, Default)]
pub struct Concat {
    items: Vec<Arc<str>>,
    bytes: usize,
}

impl Concat {
    /// Adds a value (ignored when empty).
    pub fn push(&mut self, v: Value) {
        if v.is_empty() {
            return;
        }
        self.bytes += v.bytes();
        match v {
            Value::Empty => {}
            Value::Text(s) => self.items.push(s),
            Value::List(items) => self.items.extend(items.iter().cloned()),
        }
    }

    /// Bytes collected so far.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The body's value: empty, the one item as a text, or a list.
    pub fn finish(mut self) -> Value {
        match self.items.len() {
            0 => Value::Empty,
            1 => Value::Text(self.items.swap_remove(0)),
            _ => Value::list(self.items),
        }
    }

    /// The collected items as a list (Web-Harvest's loop result), empty items dropped.
    pub fn finish_list(self) -> Value {
        let items: Vec<Arc<str>> = self.items.into_iter().filter(|s| !s.is_empty()).collect();
        Value::list(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_text_joins_non_empty_items_with_newlines() {
        let v = Value::list(vec!["a".into(), "".into(), "b".into()]);
        assert_eq!(v.to_text(), "a\nb");
        assert_eq!(v.items().len(), 3);
        assert!(!v.is_empty());
        assert!(Value::list(vec!["".into()]).is_empty());
    }

    #[test]
    fn concat_flattens_and_unwraps_a_single_item() {
        let mut c = Concat::default();
        c.push(Value::text("x"));
        c.push(Value::Empty);
        assert_eq!(c.finish(), Value::text("x"));
        let mut c = Concat::default();
        c.push(Value::text("x"));
        c.push(Value::list(vec!["y".into(), "z".into()]));
        assert_eq!(c.finish().items().len(), 3);
    }

    #[test]
    fn export_keeps_lists_as_arrays() {
        assert_eq!(
            serde_json::to_value(Value::list(vec!["a".into()]).export()).unwrap(),
            serde_json::json!(["a"])
        );
        assert_eq!(
            serde_json::to_value(Value::text("t").export()).unwrap(),
            serde_json::json!("t")
        );
    }

    #[test]
    fn truth_follows_web_harvest() {
        assert!(is_true("Yes"));
        assert!(!is_true("2"));
        assert_eq!(parse_bool("no"), Some(false));
        assert_eq!(parse_bool("maybe"), None);
    }
}
