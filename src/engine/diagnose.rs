//! Selector and regex errors in plain words.
//!
//! The CSS parser (`scraper` over `selectors`/`cssparser`) reports an error kind without the
//! token or position, and `scraper` prints some kinds as "Unexpected error occurred. Please report
//! this to the developer". A user needs to know what to change, so each kind gets a sentence here,
//! and strings written in another language (XPath, Scrapy's `::text`) are recognised first.

use scraper::error::SelectorErrorKind;
use selectors::parser::SelectorParseErrorKind as K;

/// Why `s` is not a CSS selector harvest can use, as a sentence that says what to write instead.
pub(crate) fn css_error(s: &str, e: &SelectorErrorKind) -> String {
    if let Some(hint) = foreign(s) {
        return format!("{s:?} is not a CSS selector: {hint}");
    }
    let what = match e {
        SelectorErrorKind::UnexpectedToken => {
            "a character or word is out of place (check brackets, quotes and combinators)"
        }
        SelectorErrorKind::EndOfLine => {
            "it ends too early (an unclosed `[`, `(` or quote, or nothing after a combinator)"
        }
        SelectorErrorKind::InvalidAtRule
        | SelectorErrorKind::InvalidAtRuleBody
        | SelectorErrorKind::QualRuleInvalid => "it is a style sheet rule, not a selector",
        SelectorErrorKind::TooManyNestedBlocks => "it nests brackets too deeply",
        SelectorErrorKind::ExpectedColonOnPseudoElement
        | SelectorErrorKind::ExpectedIdentityOnPseudoElement => {
            "a pseudo-element needs a name after `::`"
        }
        SelectorErrorKind::UnexpectedSelectorParseError(k) => match k {
            K::EmptySelector => {
                "a part of it selects nothing (after a comma, or a `#` or `.` without a name)"
            }
            K::DanglingCombinator => "a combinator (`>`, `+`, `~`) with nothing after it",
            K::NoQualifiedNameInAttributeSelector | K::InvalidQualNameInAttr => {
                "an attribute selector needs a name: `[href]`, `[class=\"x\"]`"
            }
            K::UnexpectedTokenInAttributeSelector | K::BadValueInAttr => {
                "a bad attribute selector: write `[name]`, `[name=value]` or `[name=\"a value\"]`"
            }
            K::ExpectedBarInAttr | K::ExpectedNamespace | K::ExplicitNamespaceUnexpectedToken => {
                "namespaces are not supported in selectors"
            }
            K::NoIdentForPseudo => "a pseudo-class needs a name after `:` (e.g. `:first-child`)",
            K::UnsupportedPseudoClassOrElement => {
                "an unknown or unsupported pseudo-class (supported: `:first-child`, \
                 `:last-child`, `:nth-child()`, `:not()`, `:has()`, `:is()`, `:empty`, …; \
                 states such as `:hover` never match a fetched page)"
            }
            K::ClassNeedsIdent => "a `.` must be followed by a class name",
            K::UnexpectedIdent => "a word is out of place",
            K::PseudoElementExpectedColon | K::PseudoElementExpectedIdent => {
                "a pseudo-element needs a name after `::`"
            }
            K::NonCompoundSelector
            | K::NonPseudoElementAfterSlotted
            | K::InvalidPseudoElementAfterSlotted
            | K::InvalidPseudoElementInsideWhere
            | K::InvalidState => "this form of selector is not supported",
        },
    };
    format!("{s:?} is not a valid CSS selector: {what}")
}

/// A hint when `s` is written in a language other than CSS.
fn foreign(s: &str) -> Option<String> {
    let t = s.trim();
    if t.contains("::text") {
        return Some(
            "`::text` is Scrapy's; a field takes the element's text by default, so drop it".into(),
        );
    }
    if let Some(i) = t.find("::attr(") {
        let name = t[i + 7..].split(')').next().unwrap_or("name");
        return Some(format!(
            "`::attr()` is Scrapy's; drop it and write `attr = {name:?}`"
        ));
    }
    let xpathish = t.starts_with('/')
        || t.starts_with("./")
        || t.starts_with("(/")
        || t.contains("text()")
        || t.contains("/@")
        || t.contains("::node()")
        || t.contains("[@");
    xpathish.then(|| {
        format!(
            "it looks like XPath; write `xpath = {t:?}` instead of `selector` (or a bare string)"
        )
    })
}

/// A regex error in one line: what is wrong and where (the regex crate draws a multi-line
/// diagram).
pub(crate) fn regex_error(r: &str, e: &regex::Error) -> String {
    match e {
        regex::Error::Syntax(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let what = lines
                .iter()
                .find_map(|l| l.strip_prefix("error: "))
                .unwrap_or("not a valid regex");
            // The diagram is the pattern indented by 4, then a caret line under the fault.
            let at = lines
                .iter()
                .find(|l| l.trim_start().starts_with('^') && l.len() > 4)
                .and_then(|l| l.find('^'))
                .map(|col| col.saturating_sub(4) + 1);
            match at {
                Some(c) => format!("invalid regex {r:?}: {what} (at character {c})"),
                None => format!("invalid regex {r:?}: {what}"),
            }
        }
        regex::Error::CompiledTooBig(limit) => format!(
            "regex {r:?} is too large once compiled (over {limit} bytes); simplify it, e.g. \
             fewer repetitions such as `{{1000}}`"
        ),
        other => format!("invalid regex {r:?}: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scraper::Selector;

    fn css(s: &str) -> String {
        let e = Selector::parse(s).expect_err(s);
        css_error(s, &e)
    }

    #[test]
    fn selector_errors_say_what_to_do() {
        for s in ["a[[", "h1 >", "a:hover2", "div,", ".", "a[x=", "::", "p:"] {
            let m = css(s);
            assert!(!m.contains("report this"), "{s}: {m}");
            assert!(
                m.starts_with(&format!("{s:?} is not a valid CSS selector: ")),
                "{m}"
            );
        }
        assert!(css("//h1/text()").contains("write `xpath = \"//h1/text()\"`"));
        assert!(css("//a/@href").contains("looks like XPath"));
        assert!(css("h1::text").contains("`::text` is Scrapy's"));
        assert!(css("a::attr(href)").contains("attr = \"href\""));
    }

    #[test]
    fn regex_errors_are_one_line_with_a_position() {
        let bad = String::from("a([");
        let e = regex::Regex::new(&bad).unwrap_err();
        let m = regex_error(&bad, &e);
        assert!(!m.contains('\n'), "{m}");
        assert!(
            m.contains("unclosed character class (at character 3)"),
            "{m}"
        );
        let big = "a{1000}{1000}";
        let e = regex::RegexBuilder::new(big)
            .size_limit(1 << 16)
            .build()
            .unwrap_err();
        assert!(regex_error(big, &e).contains("too large"));
    }
}
