//! A generated shop served in-process on `127.0.0.1:0`, for tests and `harvest bench crawl`.
//!
//! It is shaped like the README's example config (examples/catalog.toml): list pages (`/index.html`, `/list/N.html`) with
//! `article.product a.title` links and an `a.next` link (the last one leads back to the first
//! page: a cycle), and product pages with `h1`, `.price`, `td.sku`, `img.main` and `.tag`s. With
//! `specials`, the first list page also links to pages that exercise the engine's edge cases:
//! a folder robots.txt disallows, a latin-1 page, a page answering 503 once with `Retry-After`,
//! a redirect loop, an oversized page and a JSON document. With `tree`, it also serves a tree of
//! many small pages (`/n/I`, each linking `a.c` to its [`TREE_FANOUT`] children), for crawls of
//! millions of distinct URLs; those are counted only in [`Site::total_hits`], so the site's own
//! memory stays small. It never binds anything but loopback.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Size of the oversized page: larger than the example's `max_body_bytes` (5 MB).
pub const HUGE_PAGE_BYTES: usize = 8 * 1024 * 1024;

/// What to generate.
#[derive(Debug, Clone, Copy)]
pub struct SiteOptions {
    /// Product pages.
    pub products: usize,
    /// Products per list page (at least 1).
    pub per_list: usize,
    /// Add the edge-case pages (see the module doc).
    pub specials: bool,
    /// Pages of the tree of small pages (`/n/0` is its root); 0 for none.
    pub tree: usize,
}

/// Children per page of the tree of small pages.
pub const TREE_FANOUT: usize = 10;

impl Default for SiteOptions {
    fn default() -> Self {
        SiteOptions {
            products: 100,
            per_list: 20,
            specials: true,
            tree: 0,
        }
    }
}

/// The special pages' paths (linked from the first list page when `specials` is on).
pub mod paths {
    /// Disallowed by robots.txt.
    pub const PRIVATE: &str = "/private/secret.html";
    /// A product page encoded in latin-1, declared only by `<meta charset>`.
    pub const LATIN1: &str = "/special/latin1.html";
    /// Answers 503 with `Retry-After: 1` the first time, then a product page.
    pub const FLAKY: &str = "/special/flaky.html";
    /// Redirects to [`LOOP_B`], which redirects back.
    pub const LOOP_A: &str = "/special/loop-a";
    /// Redirects to [`LOOP_A`].
    pub const LOOP_B: &str = "/special/loop-b";
    /// [`super::HUGE_PAGE_BYTES`] of HTML, streamed without a Content-Length.
    pub const HUGE: &str = "/special/huge.html";
    /// Not HTML.
    pub const JSON: &str = "/special/data.json";
}

struct SiteState {
    opts: SiteOptions,
    lists: usize,
    flaky_failed: AtomicBool,
    hits: Mutex<HashMap<String, u64>>,
    total_hits: AtomicU64,
}

/// A running site; stops when [`Site::shutdown`] is called or it is dropped.
pub struct Site {
    base: String,
    state: Arc<SiteState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Site {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The absolute URL of a path.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// How many requests a path (with its query) received.
    pub fn hits(&self, path: &str) -> u64 {
        let hits = self.state.hits.lock().unwrap_or_else(|p| p.into_inner());
        hits.get(path).copied().unwrap_or(0)
    }

    /// Total requests received.
    pub fn total_hits(&self) -> u64 {
        self.state.total_hits.load(Ordering::Relaxed)
    }

    /// Requests received by paths starting with `prefix` (e.g. `/product/`), however often each.
    pub fn hits_under(&self, prefix: &str) -> u64 {
        let hits = self.state.hits.lock().unwrap_or_else(|p| p.into_inner());
        hits.iter()
            .filter(|(p, _)| p.starts_with(prefix))
            .map(|(_, n)| n)
            .sum()
    }

    /// Number of list pages.
    pub fn list_pages(&self) -> usize {
        self.state.lists
    }

    /// Stops serving and waits for the server task.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Starts a site on `127.0.0.1:0`.
pub async fn serve(opts: SiteOptions) -> std::io::Result<Site> {
    serve_at(SocketAddr::from(([127, 0, 0, 1], 0)), opts).await
}

/// Starts a site on `addr` (`harvest testsite`, for the README's tour).
pub async fn serve_at(addr: SocketAddr, opts: SiteOptions) -> std::io::Result<Site> {
    let per_list = opts.per_list.max(1);
    let opts = SiteOptions { per_list, ..opts };
    let lists = opts.products.div_ceil(per_list).max(1);
    let state = Arc::new(SiteState {
        opts,
        lists,
        flaky_failed: AtomicBool::new(false),
        hits: Mutex::new(HashMap::new()),
        total_hits: AtomicU64::new(0),
    });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let app = Router::new().fallback(handle).with_state(state.clone());
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await;
    });
    Ok(Site {
        base: format!("http://{addr}"),
        state,
        stop: Some(tx),
        task: Some(task),
    })
}

fn html(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
}

async fn handle(State(st): State<Arc<SiteState>>, uri: Uri) -> Response {
    st.total_hits.fetch_add(1, Ordering::Relaxed);
    if let Some(n) = uri.path().strip_prefix("/n/") {
        return match n.parse::<usize>() {
            Ok(i) if i < st.opts.tree => html(tree_page(st.opts.tree, i)),
            _ => StatusCode::NOT_FOUND.into_response(),
        };
    }
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    {
        let mut hits = st.hits.lock().unwrap_or_else(|p| p.into_inner());
        *hits.entry(path.to_string()).or_insert(0) += 1;
    }
    let path = uri.path();
    if path == "/robots.txt" {
        return (
            [(header::CONTENT_TYPE, "text/plain")],
            "User-agent: *\nDisallow: /private/\n",
        )
            .into_response();
    }
    if path == "/index.html" {
        return html(list_page(&st, 0));
    }
    if let Some(n) = path
        .strip_prefix("/list/")
        .and_then(|r| r.strip_suffix(".html"))
    {
        return match n.parse::<usize>() {
            Ok(n) if n > 0 && n < st.lists => html(list_page(&st, n)),
            _ => StatusCode::NOT_FOUND.into_response(),
        };
    }
    if let Some(n) = path
        .strip_prefix("/product/")
        .and_then(|r| r.strip_suffix(".html"))
    {
        return match n.parse::<usize>() {
            Ok(i) if i < st.opts.products => html(product_page(i)),
            _ => StatusCode::NOT_FOUND.into_response(),
        };
    }
    if !st.opts.specials {
        return StatusCode::NOT_FOUND.into_response();
    }
    match path {
        paths::PRIVATE => html(product_like("Secret", "9.99", "PRIVATE")),
        paths::LATIN1 => {
            let text = product_like("Café crème", "3.50", "LATIN1")
                .replace("<meta charset=\"utf-8\">", "<meta charset=\"iso-8859-1\">");
            let (bytes, _, _) = encoding_rs::WINDOWS_1252.encode(&text);
            ([(header::CONTENT_TYPE, "text/html")], bytes.into_owned()).into_response()
        }
        paths::FLAKY => {
            if !st.flaky_failed.swap(true, Ordering::AcqRel) {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::RETRY_AFTER, "1")],
                    "busy",
                )
                    .into_response();
            }
            html(product_like("Flaky", "1.25", "FLAKY"))
        }
        paths::LOOP_A => (StatusCode::FOUND, [(header::LOCATION, paths::LOOP_B)]).into_response(),
        paths::LOOP_B => (StatusCode::FOUND, [(header::LOCATION, paths::LOOP_A)]).into_response(),
        paths::HUGE => {
            const CHUNK: &[u8] = &[b'x'; 64 * 1024];
            let n = HUGE_PAGE_BYTES / CHUNK.len();
            let head = futures::stream::once(async {
                Ok::<Bytes, std::io::Error>(Bytes::from_static(b"<html><body><p>"))
            });
            let chunks = futures::stream::iter(
                (0..n).map(|_| Ok::<Bytes, std::io::Error>(Bytes::from_static(CHUNK))),
            );
            let body = Body::from_stream(futures::StreamExt::chain(head, chunks));
            ([(header::CONTENT_TYPE, "text/html")], body).into_response()
        }
        paths::JSON => (
            [(header::CONTENT_TYPE, "application/json")],
            "{\"not\":\"html\"}",
        )
            .into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

fn list_page(st: &SiteState, n: usize) -> String {
    let per = st.opts.per_list;
    let mut s = String::with_capacity(4096);
    let _ = write!(
        s,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Shop, page {}</title></head><body>\
         <nav><a class=\"home\" href=\"/index.html\">Home</a></nav><h1>Products</h1><section>",
        n + 1
    );
    for i in (n * per)..((n + 1) * per).min(st.opts.products) {
        let _ = write!(
            s,
            "<article class=\"product\"><a class=\"title\" href=\"/product/{i}.html\">Product {i}</a>\
             <span class=\"teaser\">£{i}.{:02}</span></article>",
            i % 100
        );
    }
    if n == 0 && st.opts.specials {
        for p in [
            paths::PRIVATE,
            paths::LATIN1,
            paths::FLAKY,
            paths::LOOP_A,
            paths::HUGE,
            paths::JSON,
        ] {
            let _ = write!(
                s,
                "<article class=\"product\"><a class=\"title\" href=\"{p}\">special</a></article>"
            );
        }
        // Another spelling of this very page: canonicalization makes it the same URL.
        s.push_str("<a class=\"next\" href=\"/index.html#again\" hidden></a>");
    }
    let next = if n + 1 < st.lists {
        format!("/list/{}.html", n + 1)
    } else {
        "/index.html#top".into()
    };
    let _ = write!(
        s,
        "</section><a class=\"next\" href=\"{next}\">Next</a></body></html>"
    );
    s
}

fn tree_page(pages: usize, i: usize) -> String {
    let mut s = String::with_capacity(512);
    let _ = write!(
        s,
        "<!doctype html><html><head><meta charset=\"utf-8\"></head><body><h1>Node {i}</h1>"
    );
    let first = i.saturating_mul(TREE_FANOUT).saturating_add(1);
    for c in first..first.saturating_add(TREE_FANOUT).min(pages) {
        let _ = write!(s, "<a class=\"c\" href=\"/n/{c}\">{c}</a>");
    }
    s.push_str("</body></html>");
    s
}

fn product_page(i: usize) -> String {
    let mut s = product_like(
        &format!("Product {i}"),
        &format!("{i}.{:02}", i % 100),
        &format!("SKU-{i:06}"),
    );
    s = s.replacen("/img/main.jpg", &format!("/img/{i}.jpg"), 1);
    s.replacen("tag-x", &format!("tag-{}", i % 5), 1)
}

fn product_like(title: &str, price: &str, sku: &str) -> String {
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title></head><body>\
         <nav><a class=\"home\" href=\"/index.html\">Home</a></nav>\
         <main><h1>{title}</h1><p class=\"price\">Price: £{price}</p>\
         <table><tr><th>SKU</th><td class=\"sku\">{sku}</td></tr><tr><th>Stock</th><td>In stock</td></tr></table>\
         <img class=\"main\" src=\"/img/main.jpg\" alt=\"{title}\">\
         <ul class=\"tags\"><li class=\"tag\">tag-x</li><li class=\"tag\">all</li></ul>\
         <p class=\"description\">A fine product, well made and fairly priced, shipped within two days. \
         Returns are free within thirty days of delivery; see the shop's terms for details.</p></main>\
         </body></html>"
    )
}
