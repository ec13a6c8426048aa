//! URL canonicalization: one spelling per resource, so "fetched at most once" holds.
//!
//! The `url` crate already lowercases scheme and host, drops default ports and resolves `.`/`..`;
//! on top of that the fragment is dropped, an empty query is dropped, and percent-escapes are
//! normalized (unreserved characters decoded, hex digits upper-cased).

use url::Url;

/// The canonical text of `url`.
pub fn canonicalize(mut url: Url) -> String {
    url.set_fragment(None);
    if url.query() == Some("") {
        url.set_query(None);
    }
    let s = url.as_str();
    if !s.contains('%') {
        return url.into();
    }
    normalize_escapes(s)
}

/// Longest URL followed, in bytes. Browsers and servers commonly stop near 2 kB, and every
/// followed URL is a key in the store's frontier and seen set (PostgreSQL's btree keys top out
/// near 2.7 kB: one longer link used to fail every checkpoint of its session).
pub const MAX_URL_BYTES: usize = 2048;

/// Parses `href` relative to `base` and canonicalizes it; `None` unless it is http(s) with a host
/// and at most [`MAX_URL_BYTES`] long.
pub fn resolve(base: &Url, href: &str) -> Option<String> {
    let href = href.trim();
    if href.is_empty() || href.len() > MAX_URL_BYTES * 4 {
        return None;
    }
    let url = base.join(href).ok()?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return None;
    }
    Some(canonicalize(url)).filter(|u| u.len() <= MAX_URL_BYTES)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn normalize_escapes(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            let c = h * 16 + l;
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                out.push(c as char);
            } else {
                out.push('%');
                out.push(b[i + 1].to_ascii_uppercase() as char);
                out.push(b[i + 2].to_ascii_uppercase() as char);
            }
            i += 3;
            continue;
        }
        // The input is an ASCII URL serialization, so byte-to-char is exact.
        out.push(b[i] as char);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn overlong_links_are_not_followed() {
        let base = url::Url::parse("http://a.example/").expect("base");
        let long = format!("/p?q={}", "x".repeat(super::MAX_URL_BYTES));
        assert_eq!(super::resolve(&base, &long), None);
        assert!(super::resolve(&base, "/p?q=x").is_some());
    }

    use super::*;

    #[test]
    fn equivalent_spellings_canonicalize_alike() {
        let base = Url::parse("HTTP://Example.COM:80/a/b.html").unwrap();
        assert_eq!(
            resolve(&base, "../c.html#top").unwrap(),
            "http://example.com/c.html"
        );
        assert_eq!(
            resolve(&base, "/%7euser/%2f%41?").unwrap(),
            "http://example.com/~user/%2FA"
        );
        assert_eq!(
            resolve(&base, "https://example.com:443/").unwrap(),
            "https://example.com/"
        );
        assert!(resolve(&base, "mailto:x@example.com").is_none());
        assert!(resolve(&base, "javascript:void(0)").is_none());
        assert!(resolve(&base, "").is_none());
    }
}
