//! `${…}` templates, as Web-Harvest's `BaseTemplater` reads them: an expression runs from `${` to
//! the first `}` after it; a `${` never closed is literal text.

/// A text with `${expression}` parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    pub(crate) parts: Vec<Part>,
}

/// One part of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Part {
    /// Literal text.
    Lit(String),
    /// A script expression (the text between `${` and `}`).
    Expr(String),
}

impl Template {
    /// Splits a text into literal and expression parts.
    pub(crate) fn parse(s: &str) -> Template {
        let mut parts = Vec::new();
        let mut rest = s;
        // Bounded: each round consumes at least the `${` it found.
        while let Some(start) = rest.find("${") {
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else { break };
            if start > 0 {
                parts.push(Part::Lit(rest[..start].to_string()));
            }
            parts.push(Part::Expr(after[..end].to_string()));
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        Template { parts }
    }

    /// The text when it has no expressions.
    pub(crate) fn literal(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [] => Some(""),
            [Part::Lit(s)] => Some(s),
            _ => None,
        }
    }

    /// Its expressions.
    pub(crate) fn expressions(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Expr(e) => Some(e.as_str()),
            Part::Lit(_) => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_like_web_harvest() {
        let t = Template::parse("a${x}b${ y.z() }");
        assert_eq!(
            t.parts,
            vec![
                Part::Lit("a".into()),
                Part::Expr("x".into()),
                Part::Lit("b".into()),
                Part::Expr(" y.z() ".into())
            ]
        );
        assert_eq!(Template::parse("no ${ end").literal(), Some("no ${ end"));
        assert_eq!(Template::parse("plain").literal(), Some("plain"));
        assert_eq!(Template::parse("${x}").literal(), None);
    }
}
