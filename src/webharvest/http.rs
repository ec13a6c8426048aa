//! The `http` processor's requests and responses, as Web-Harvest builds and reads them: GET
//! parameters in the query, POST parameters form-encoded (or `multipart/form-data`, or the body
//! as the text itself for `text/*` and `application/xml` content types), and a response decoded by
//! the `charset` attribute, else the `Content-Type` charset, else an HTML `<meta>` charset, else
//! the config's charset.

use std::sync::LazyLock;

use encoding_rs::Encoding;

/// An `http-param`.
#[derive(Debug, Clone)]
pub(crate) struct Param {
    pub(crate) name: String,
    pub(crate) value: String,
    pub(crate) is_file: bool,
    pub(crate) filename: Option<String>,
    pub(crate) content_type: Option<String>,
}

/// Web-Harvest's `CommonUtil.fullUrl`: `link` resolved against `base`.
pub(crate) fn full_url(base: &str, link: &str) -> String {
    let link = link.trim();
    if is_full_url(link) {
        return link.to_string();
    }
    if let Some(q) = link.strip_prefix('?') {
        return match base.find('?') {
            None => format!("{base}{link}"),
            Some(i) if i + 1 == base.len() => format!("{base}{q}"),
            Some(_) => format!("{base}&{q}"),
        };
    }
    let base = if is_full_url(base) {
        base.to_string()
    } else {
        format!("http://{base}")
    };
    match url::Url::parse(&base).and_then(|b| b.join(link)) {
        Ok(u) => u.to_string(),
        Err(_) => link.to_string(),
    }
}

fn is_full_url(s: &str) -> bool {
    let l = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    l.starts_with("http://") || l.starts_with("https://")
}

/// The URL to request: `http://` is assumed without a scheme (as Web-Harvest does); spaces and
/// non-ASCII characters are percent-encoded.
pub(crate) fn request_url(url: &str) -> Result<url::Url, String> {
    let url = url.trim();
    let full = if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    };
    let u = url::Url::parse(&full).map_err(|e| format!("bad URL {url:?}: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(format!(
            "URL {url:?} is not http or https; only web pages can be fetched"
        ));
    }
    Ok(u)
}

fn encoding(charset: &str) -> &'static Encoding {
    Encoding::for_label(charset.trim().as_bytes()).unwrap_or(encoding_rs::UTF_8)
}

/// `application/x-www-form-urlencoded` in `charset`.
pub(crate) fn form_encode(params: &[Param], charset: &str) -> String {
    let enc = encoding(charset);
    params
        .iter()
        .map(|p| {
            format!(
                "{}={}",
                form_component(&p.name, enc),
                form_component(&p.value, enc)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn form_component(s: &str, enc: &'static Encoding) -> String {
    let (bytes, _, _) = enc.encode(s);
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes.iter() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            b => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A `multipart/form-data` body and its boundary.
pub(crate) fn multipart(params: &[Param], charset: &str) -> (String, Vec<u8>) {
    let boundary = format!("----harvest{:016x}", rand::random::<u64>());
    let enc = encoding(charset);
    let mut body = Vec::new();
    for (i, p) in params.iter().enumerate() {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        let name = p.name.replace('"', "%22");
        if p.is_file {
            let file = p
                .filename
                .clone()
                .filter(|f| !f.is_empty())
                .unwrap_or_else(|| format!("uploadedfile_{}", i + 1))
                .replace('"', "%22");
            let ct = p
                .content_type
                .clone()
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| "application/octet-stream".into());
            body.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\nContent-Type: {ct}\r\n\r\n"
                )
                .as_bytes(),
            );
        } else {
            body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            );
        }
        body.extend_from_slice(&enc.encode(&p.value).0);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (boundary, body)
}

/// Text in `charset`.
pub(crate) fn encode_text(s: &str, charset: &str) -> Vec<u8> {
    encoding(charset).encode(s).0.into_owned()
}

/// Bytes in `charset` as text.
pub(crate) fn decode_text(b: &[u8], charset: &str) -> String {
    encoding(charset).decode(b).0.into_owned()
}

/// A response body as text, and the charset used.
pub(crate) fn decode_body(
    body: &[u8],
    content_type: Option<&str>,
    specified: Option<&str>,
    config_charset: &str,
) -> (String, String) {
    let mime = content_type
        .and_then(|c| c.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let header_charset = content_type.and_then(|c| {
        c.split(';').skip(1).find_map(|p| {
            let (k, v) = p.split_once('=')?;
            (k.trim().eq_ignore_ascii_case("charset"))
                .then(|| v.trim().trim_matches('"').to_string())
        })
    });
    let supported = |c: &str| Encoding::for_label(c.trim().as_bytes()).is_some();
    let charset = if let Some(c) = specified.filter(|c| supported(c)) {
        c.to_string()
    } else if let Some(c) = (mime == "text/html")
        .then(|| meta_charset(body))
        .flatten()
        .filter(|c| supported(c))
    {
        c
    } else if let Some(c) = header_charset.filter(|c| supported(c)) {
        c
    } else if !mime.is_empty() && !is_text_mime(&mime) {
        // Web-Harvest kept such bodies as bytes, read back in the platform's (UTF-8) charset.
        "UTF-8".to_string()
    } else {
        config_charset.to_string()
    };
    (decode_text(body, &charset), charset)
}

/// Web-Harvest's idea of a text response.
fn is_text_mime(mime: &str) -> bool {
    mime.starts_with("text/") || mime.ends_with("/xml") || mime.contains("javascript")
}

/// The charset an HTML page declares in its first KiB (`<meta charset>` or the
/// `http-equiv="content-type"` form).
fn meta_charset(body: &[u8]) -> Option<String> {
    static META: LazyLock<regex::bytes::Regex> = LazyLock::new(|| {
        regex::bytes::Regex::new(r#"(?i)<meta\s[^>]*?charset\s*=\s*["']?\s*([A-Za-z0-9_:.\-]+)"#)
            .expect("static regex")
    });
    let head = &body[..body.len().min(1024)];
    META.captures(head)
        .and_then(|c| c.get(1))
        .map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_url_resolves_like_web_harvest() {
        assert_eq!(
            full_url("http://a.b/x/y.html", "z.html"),
            "http://a.b/x/z.html"
        );
        assert_eq!(full_url("http://a.b/x/y.html", "/z"), "http://a.b/z");
        assert_eq!(full_url("http://a.b/x", "https://c.d/"), "https://c.d/");
        assert_eq!(full_url("http://a.b/x", "?p=2"), "http://a.b/x?p=2");
        assert_eq!(full_url("http://a.b/x?q=1", "?p=2"), "http://a.b/x?q=1&p=2");
        assert_eq!(full_url("a.b/x/", "y"), "http://a.b/x/y");
    }

    #[test]
    fn forms_and_urls() {
        let p = |n: &str, v: &str| Param {
            name: n.into(),
            value: v.into(),
            is_file: false,
            filename: None,
            content_type: None,
        };
        assert_eq!(
            form_encode(&[p("q", "a b&c"), p("é", "ü")], "UTF-8"),
            "q=a+b%26c&%C3%A9=%C3%BC"
        );
        assert_eq!(form_encode(&[p("é", "ü")], "ISO-8859-1"), "%E9=%FC");
        assert_eq!(
            request_url("example.com/a b").unwrap().as_str(),
            "http://example.com/a%20b"
        );
        assert!(request_url("file:///etc/passwd").is_err());
        let (b, body) = multipart(&[p("a", "1")], "UTF-8");
        let body = String::from_utf8(body).unwrap();
        assert!(body.contains(&format!(
            "--{b}\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--{b}--"
        )));
    }

    #[test]
    fn bodies_decode_by_attribute_meta_header_then_config() {
        let latin = b"<html><head><meta charset=\"iso-8859-1\"></head>caf\xe9</html>";
        let (t, c) = decode_body(latin, Some("text/html"), None, "UTF-8");
        assert!(t.ends_with("café</html>"), "{t}");
        assert_eq!(c, "iso-8859-1");
        let (t, _) = decode_body(
            b"caf\xc3\xa9",
            Some("text/plain; charset=utf-8"),
            None,
            "ISO-8859-1",
        );
        assert_eq!(t, "café");
        let (t, _) = decode_body(b"caf\xe9", Some("text/plain"), None, "ISO-8859-1");
        assert_eq!(t, "café");
        let (t, _) = decode_body(
            b"caf\xe9",
            Some("text/plain; charset=utf-8"),
            Some("windows-1252"),
            "UTF-8",
        );
        assert_eq!(t, "café");
        let (t, _) = decode_body(
            "{\"a\":\"é\"}".as_bytes(),
            Some("application/json"),
            None,
            "ISO-8859-1",
        );
        assert_eq!(t, "{\"a\":\"é\"}");
    }
}
