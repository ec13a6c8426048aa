//! `json-to-xml` and `xml-to-json`, as Web-Harvest's JSON.org `XML` class converts: object keys
//! become elements (an array repeats its key's element, `content` is text), and back: elements
//! become keys (repeated ones an array), attributes keys, text `content`, and texts that read as
//! numbers or booleans become those. Keys keep their document order (JSON.org's did not keep any).

use std::fmt;

use quick_xml::events::Event;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::engine::xml::html::{escape_into, xml_name_with};

/// Deepest XML nesting `xml-to-json` reads.
const MAX_XML_DEPTH: usize = 256;

/// Converts a JSON text to XML; `tag` wraps the result in one element.
pub(crate) fn json_to_xml(
    json: &str,
    tag: Option<&str>,
    max_bytes: usize,
) -> Result<String, String> {
    let mut out = String::with_capacity(json.len() + json.len() / 2);
    let tag = tag.map(element_name);
    let mut de = serde_json::Deserializer::from_str(json);
    Emit {
        out: &mut out,
        tag: tag.as_deref(),
        max: max_bytes,
    }
    .deserialize(&mut de)
    .map_err(|e| format!("the input is not JSON: {e}"))?;
    de.end()
        .map_err(|e| format!("the input is not JSON: {e}"))?;
    Ok(out)
}

/// A JSON key as an element name (invalid characters become `_`).
fn element_name(key: &str) -> String {
    xml_name_with(key, '_')
}

/// Writes one JSON value as XML, under `tag` (JSON.org's `XML.toString(value, tag)`).
struct Emit<'a> {
    out: &'a mut String,
    tag: Option<&'a str>,
    max: usize,
}

impl Emit<'_> {
    fn scalar<E: serde::de::Error>(self, s: &str) -> Result<(), E> {
        match self.tag {
            Some(t) if s.is_empty() => {
                self.out.push('<');
                self.out.push_str(t);
                self.out.push_str("/>");
            }
            Some(t) => {
                self.out.push('<');
                self.out.push_str(t);
                self.out.push('>');
                escape_into(self.out, s, false, false);
                self.out.push_str("</");
                self.out.push_str(t);
                self.out.push('>');
            }
            None => {
                self.out.push('"');
                escape_into(self.out, s, false, false);
                self.out.push('"');
            }
        }
        self.check()
    }

    fn check<E: serde::de::Error>(&self) -> Result<(), E> {
        if self.out.len() > self.max {
            return Err(E::custom(format!(
                "the XML would be larger than the variable memory cap ({} bytes)",
                self.max
            )));
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Emit<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Emit<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        self.scalar(if v { "true" } else { "false" })
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.scalar(&v.to_string())
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.scalar(&v.to_string())
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        self.scalar(&v.to_string())
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.scalar(v)
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.scalar("null")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let tag = self.tag.unwrap_or("array");
        // Bounded by the input; serde_json caps nesting at 128.
        while seq
            .next_element_seed(Emit {
                out: &mut *self.out,
                tag: Some(tag),
                max: self.max,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if let Some(t) = self.tag {
            self.out.push('<');
            self.out.push_str(t);
            self.out.push('>');
        }
        while let Some(key) = map.next_key::<String>()? {
            if key == "content" {
                let v: serde_json::Value = map.next_value()?;
                match v {
                    serde_json::Value::Array(items) => {
                        for (i, item) in items.iter().enumerate() {
                            if i > 0 {
                                self.out.push('\n');
                            }
                            escape_into(self.out, &json_text(item), false, false);
                        }
                    }
                    other => escape_into(self.out, &json_text(&other), false, false),
                }
                continue;
            }
            let name = element_name(&key);
            map.next_value_seed(Emit {
                out: &mut *self.out,
                tag: Some(&name),
                max: self.max,
            })?;
        }
        if let Some(t) = self.tag {
            self.out.push_str("</");
            self.out.push_str(t);
            self.out.push('>');
        }
        self.check()
    }
}

/// A JSON value's text as JSON.org's `toString` gives it (strings bare).
fn json_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A JSON value keeping key order.
#[derive(Debug, Clone)]
enum J {
    Str(String),
    Raw(String),
    Obj(Vec<(String, J)>),
    Arr(Vec<J>),
}

impl J {
    /// JSON.org's `JSONObject.accumulate`.
    fn accumulate(obj: &mut Vec<(String, J)>, key: &str, value: J) {
        match obj.iter_mut().find(|(k, _)| k == key) {
            None => obj.push((key.to_string(), value)),
            Some((_, J::Arr(items))) => items.push(value),
            Some((_, old)) => {
                let first = std::mem::replace(old, J::Arr(Vec::new()));
                *old = J::Arr(vec![first, value]);
            }
        }
    }

    fn write(&self, out: &mut String) {
        match self {
            J::Str(s) => out.push_str(&serde_json::Value::String(s.clone()).to_string()),
            J::Raw(s) => out.push_str(s),
            J::Arr(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    v.write(out);
                }
                out.push(']');
            }
            J::Obj(fields) => {
                out.push('{');
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::Value::String(k.clone()).to_string());
                    out.push(':');
                    v.write(out);
                }
                out.push('}');
            }
        }
    }
}

/// JSON.org's `JSONObject.stringToValue`: booleans, null and numbers are typed, the rest text.
fn string_to_value(s: &str) -> J {
    if s.eq_ignore_ascii_case("true") {
        return J::Raw("true".into());
    }
    if s.eq_ignore_ascii_case("false") {
        return J::Raw("false".into());
    }
    if s.eq_ignore_ascii_case("null") {
        return J::Raw("null".into());
    }
    let first = s.chars().next();
    if first.is_some_and(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+')) {
        if s.contains(['.', 'e', 'E']) {
            if let Ok(f) = s.parse::<f64>()
                && f.is_finite()
            {
                // JSON.org writes a whole double without its fraction (1.50 → 1.5, 2.0 → 2).
                if f.fract() == 0.0 && f.abs() < 1e15 {
                    return J::Raw(format!("{}", f as i64));
                }
                if let Some(n) = serde_json::Number::from_f64(f) {
                    return J::Raw(n.to_string());
                }
            }
        } else if let Ok(n) = s.parse::<i64>() {
            return J::Raw(n.to_string());
        }
    }
    J::Str(s.to_string())
}

/// An open element while reading XML: its name, its object so far, and text not yet added.
struct Open {
    name: String,
    obj: Vec<(String, J)>,
    text: String,
}

impl Open {
    /// JSON.org adds each run of text (trimmed) as `content`.
    fn flush(&mut self) {
        let t = std::mem::take(&mut self.text);
        let t = t.trim();
        if !t.is_empty() {
            J::accumulate(&mut self.obj, "content", string_to_value(t));
        }
    }
}

/// Converts an XML text to JSON.
pub(crate) fn xml_to_json(xml: &str) -> Result<String, String> {
    let mut reader = quick_xml::Reader::from_str(xml);
    reader.config_mut().check_end_names = true;
    // The bottom entry is the result object.
    let mut stack = vec![Open {
        name: String::new(),
        obj: Vec::new(),
        text: String::new(),
    }];
    let err = |r: &quick_xml::Reader<&[u8]>, e: String| {
        format!(
            "the input is not well-formed XML (at byte {}): {e}",
            r.error_position()
        )
    };
    // Bounded: every event consumes input.
    loop {
        let event = reader
            .read_event()
            .map_err(|e| err(&reader, e.to_string()))?;
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                if stack.len() > MAX_XML_DEPTH {
                    return Err(format!("the XML nests deeper than {MAX_XML_DEPTH} levels"));
                }
                if let Some(top) = stack.last_mut() {
                    top.flush();
                }
                let mut obj = Vec::new();
                for a in e.attributes().with_checks(true) {
                    let a = a.map_err(|x| err(&reader, x.to_string()))?;
                    let v = a
                        .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                        .map_err(|x| err(&reader, x.to_string()))?;
                    J::accumulate(&mut obj, a.key.0, string_to_value(&v));
                }
                stack.push(Open {
                    name: e.name().0.to_string(),
                    obj,
                    text: String::new(),
                });
                if matches!(event, Event::Empty(_)) {
                    close(&mut stack);
                }
            }
            Event::End(_) => {
                if stack.len() < 2 {
                    return Err(err(&reader, "unexpected end tag".into()));
                }
                close(&mut stack);
            }
            Event::Text(t) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&t.xml10_content());
                }
            }
            Event::GeneralRef(r) => {
                let c = match r.resolve_char_ref() {
                    Ok(Some(c)) => c.to_string(),
                    _ => match &*r {
                        "amp" => "&".into(),
                        "lt" => "<".into(),
                        "gt" => ">".into(),
                        "quot" => "\"".into(),
                        "apos" => "'".into(),
                        other => return Err(err(&reader, format!("undefined entity &{other};"))),
                    },
                };
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&c);
                }
            }
            Event::CData(t) => {
                if let Some(top) = stack.last_mut() {
                    top.flush();
                    let s = t.into_inner().into_owned();
                    J::accumulate(&mut top.obj, "content", J::Str(s));
                }
            }
            Event::DocType(_) => {
                return Err("the XML has a DOCTYPE; DTDs are refused".into());
            }
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if stack.len() != 1 {
        return Err("the XML ends inside an element".into());
    }
    let mut out = String::new();
    J::Obj(stack.pop().map(|o| o.obj).unwrap_or_default()).write(&mut out);
    Ok(out)
}

/// Ends the innermost element: JSON.org's rule for what its key gets.
fn close(stack: &mut Vec<Open>) {
    let Some(mut open) = stack.pop() else { return };
    open.flush();
    let mut obj = open.obj;
    let value = match obj.len() {
        0 => J::Str(String::new()),
        1 if obj[0].0 == "content" => obj.remove(0).1,
        _ => J::Obj(obj),
    };
    if let Some(parent) = stack.last_mut() {
        J::accumulate(&mut parent.obj, &open.name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_becomes_json_org_xml() {
        let xml = json_to_xml(
            r#"{"name":"A & B","tags":["x","y"],"n":1.5,"empty":"","nested":{"content":"t","k":null}}"#,
            Some("root"),
            1 << 20,
        )
        .unwrap();
        assert_eq!(
            xml,
            "<root><name>A &amp; B</name><tags>x</tags><tags>y</tags><n>1.5</n><empty/><nested>t<k>null</k></nested></root>"
        );
        assert_eq!(
            json_to_xml(r#"[1,2]"#, None, 1 << 20).unwrap(),
            "<array>1</array><array>2</array>"
        );
        assert!(json_to_xml("{", None, 1 << 20).is_err());
        assert!(json_to_xml(r#"{"a":"xxxxxxxxxx"}"#, None, 5).is_err());
    }

    #[test]
    fn xml_becomes_json_org_json() {
        let json = xml_to_json(
            r#"<?xml version="1.0"?><shop id="7"><item>a</item><item>b &amp; c</item><price cur="EUR">1.50</price><none/><flag>TRUE</flag></shop>"#,
        )
        .unwrap();
        assert_eq!(
            json,
            r#"{"shop":{"id":7,"item":["a","b & c"],"price":{"cur":"EUR","content":1.5},"none":"","flag":true}}"#
        );
        assert!(xml_to_json("<a><b></a>").is_err());
        assert!(xml_to_json("<!DOCTYPE a><a/>").is_err());
    }
}
