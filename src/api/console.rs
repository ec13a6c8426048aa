//! The web console: `GET /` and `GET /console/{file}`, plain HTML, CSS and JavaScript modules
//! embedded in the binary (nothing is built or downloaded at build or install time).
//!
//! The console is a client of the public `/v1` API and its Server-Sent Events like any other:
//! it holds no privilege of its own. Its files are static and carry no data, so they are served
//! without a token; everything it shows comes from `/v1` calls made with the token the user typed
//! (kept in the tab's session storage). With no `[[clients]]`, the server only binds loopback, as
//! for the API.
//!
//! Every answer carries a strict Content-Security-Policy (scripts, styles and connections only
//! from this origin, no inline script or style, no framing, no form posts), `nosniff` and
//! `no-referrer`. Files are revalidated on each load (`no-cache`) against an ETag computed at
//! compile time, so an upgraded binary is picked up at once while an unchanged file costs a 304.

use axum::Router;
use axum::extract::Path;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::AppState;
use super::error::ApiError;

/// The policy of every console answer: nothing inline, nothing from elsewhere.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
    etag: u64,
}

/// FNV-1a, evaluated at compile time: a stable fingerprint of a file for its ETag.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
}

macro_rules! asset {
    ($name:literal, $type:expr) => {
        Asset {
            name: $name,
            content_type: $type,
            body: include_bytes!(concat!("../console/assets/", $name)),
            etag: fnv1a(include_bytes!(concat!("../console/assets/", $name))),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file of the console; `index.html` is served at `/`, the others under `/console/`.
static ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("dom.js", JS),
    asset!("login.js", JS),
    asset!("overview.js", JS),
    asset!("sessions.js", JS),
    asset!("session.js", JS),
    asset!("submit.js", JS),
    asset!("agents.js", JS),
];

/// The console's routes (not part of the API, so not in its OpenAPI document).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/console/{file}", get(file))
}

/// The names of the files served under `/console/` (for tests).
pub fn files() -> Vec<&'static str> {
    ASSETS
        .iter()
        .filter(|a| a.name != "index.html")
        .map(|a| a.name)
        .collect()
}

async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

async fn file(Path(name): Path<String>, headers: HeaderMap) -> Response {
    if name == "index.html" {
        // One address per file: the page itself lives at `/`.
        return with_headers(not_found(&name));
    }
    serve(&name, &headers)
}

fn not_found(name: &str) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("the console has no file {name:?}; open / for the console"),
    )
    .into_response()
}

fn serve(name: &str, headers: &HeaderMap) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.name == name) else {
        return with_headers(not_found(name));
    };
    let etag = format!("\"{:016x}\"", asset.etag);
    let fresh = headers
        .get(IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(CONTENT_TYPE, asset.content_type)], asset.body).into_response()
    };
    if let Ok(v) = HeaderValue::from_str(&etag) {
        resp.headers_mut().insert(ETAG, v);
    }
    with_headers(resp)
}

/// Adds the security and cache headers every console answer carries.
fn with_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_module_the_app_imports_is_embedded() {
        let app = ASSETS
            .iter()
            .find(|a| a.name == "app.js")
            .map(|a| std::str::from_utf8(a.body).unwrap_or_default())
            .unwrap_or_default();
        assert!(app.contains("./overview.js"), "app.js is embedded");
        for a in ASSETS {
            if a.name.ends_with(".js") && a.name != "app.js" {
                assert!(
                    app.contains(&format!("./{}", a.name)),
                    "app.js does not import {}",
                    a.name
                );
            }
        }
    }

    #[test]
    fn no_asset_uses_inline_script_or_style_or_inner_html() {
        let handler = regex::Regex::new(r"\son[a-z]+\s*=").expect("regex");
        for a in ASSETS {
            let text = std::str::from_utf8(a.body).unwrap_or_default();
            for bad in [
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
                "eval(",
            ] {
                assert!(!text.contains(bad), "{} uses {bad}", a.name);
            }
            if a.name == "index.html" {
                assert!(!text.contains("<script>"), "inline script in index.html");
                assert!(!text.contains("style="), "inline style in index.html");
                assert!(!text.contains("<style"), "inline style in index.html");
                assert!(
                    !handler.is_match(text),
                    "inline event handler in index.html"
                );
            }
        }
    }
}
