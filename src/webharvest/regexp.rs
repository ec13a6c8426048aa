//! `regexp`'s patterns: Java regular expressions are run by `fancy-regex` (backreferences,
//! lookaround and atomic groups included, with a backtracking limit so no pattern runs forever),
//! and `replace="true"` results are Java replacement strings (`$1`, `\$`).

use fancy_regex::{Captures, Regex, RegexBuilder};

/// Backtracking steps one match may take (fancy parts only; plain patterns run in linear time).
const BACKTRACK_LIMIT: usize = 1_000_000;

/// `regexp`'s `flag-*` attributes (Web-Harvest's defaults: dotall on).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Flags {
    pub(crate) case_insensitive: bool,
    pub(crate) multiline: bool,
    pub(crate) dotall: bool,
}

impl Default for Flags {
    fn default() -> Self {
        Flags {
            case_insensitive: false,
            multiline: false,
            dotall: true,
        }
    }
}

/// Compiles a pattern.
pub(crate) fn compile(pattern: &str, flags: Flags) -> Result<Regex, String> {
    RegexBuilder::new(pattern)
        .case_insensitive(flags.case_insensitive)
        .multi_line(flags.multiline)
        .dot_matches_new_line(flags.dotall)
        .backtrack_limit(BACKTRACK_LIMIT)
        // The scraper's limit on a compiled regex (1 MiB): `\w{150}` needs ten times that and
        // took a second to compile.
        .delegate_size_limit(crate::engine::config::REGEX_SIZE_LIMIT)
        .delegate_dfa_size_limit(crate::engine::config::REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("regular expression {pattern:?} does not compile: {e}"))
}

/// Checks a literal pattern at submission.
pub(crate) fn check(pattern: &str) -> Result<(), String> {
    compile(pattern, Flags::default()).map(|_| ())
}

/// Expands a Java replacement string (`Matcher.appendReplacement`): `$n` and `${name}` are
/// groups, `\c` is `c`.
pub(crate) fn expand(replacement: &str, caps: &Captures<'_, str>) -> Result<String, String> {
    let mut out = String::with_capacity(replacement.len());
    let mut chars = replacement.char_indices().peekable();
    // Bounded: each round consumes at least one character.
    while let Some((_, c)) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some((_, n)) => out.push(n),
                None => return Err("replacement ends with a lone backslash".into()),
            },
            '$' => {
                if chars.peek().is_some_and(|(_, c)| *c == '{') {
                    chars.next();
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some((_, '}')) => break,
                            Some((_, c)) => name.push(c),
                            None => return Err("replacement has an unclosed ${".into()),
                        }
                    }
                    let m = caps
                        .name(&name)
                        .ok_or_else(|| format!("replacement names no group {name:?}"))?;
                    out.push_str(m.as_str());
                    continue;
                }
                let mut digits = String::new();
                while let Some((_, d)) = chars.peek().filter(|(_, d)| d.is_ascii_digit()) {
                    // Java takes more digits only while they still name a group.
                    let mut longer = digits.clone();
                    longer.push(*d);
                    let n: usize = longer.parse().unwrap_or(usize::MAX);
                    if !digits.is_empty() && n >= caps.len() {
                        break;
                    }
                    digits = longer;
                    chars.next();
                }
                let n: usize = digits
                    .parse()
                    .map_err(|_| "replacement has a `$` without a group number (write \\$)")?;
                if n >= caps.len() {
                    return Err(format!(
                        "replacement refers to group {n}, which does not exist"
                    ));
                }
                if let Some(m) = caps.get(n) {
                    out.push_str(m.as_str());
                }
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn java_style_patterns_compile() {
        assert!(check(r"(\d+)\.(\d{2})").is_ok());
        assert!(check(r"(?<=£)\d+").is_ok());
        assert!(check(r"(a)\1").is_ok());
        assert!(check(r"([").is_err());
    }

    #[test]
    fn replacement_strings_follow_java() {
        let re = compile(r"(\w+)@(\w+)", Flags::default()).unwrap();
        let caps = re.captures("joe@home").unwrap().unwrap();
        assert_eq!(expand("$2:$1 \\$", &caps).unwrap(), "home:joe $");
        assert_eq!(expand("$12", &caps).unwrap(), "joe2");
        assert!(expand("$", &caps).is_err());
    }
}
