//! Headless Chromium for the console tests, driven over the WebDriver HTTP protocol.
//!
//! The client is a few plain reqwest JSON calls rather than a WebDriver crate (fantoccini,
//! thirtyfour): the tests need a dozen commands, reqwest is already built, and a failing command
//! then reports the driver's own JSON error as is.
//!
//! `chromedriver --port=0` (Debian's `chromium-driver`) picks a free port and prints it; it runs
//! in a process group of its own, so dropping a [`Browser`] kills it and the Chromium it started,
//! even when a test panics. Every wait polls a JavaScript condition until a deadline; a timeout
//! panics with what the page showed and saves a screenshot under `target/console-failures/`.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, SemaphorePermit};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The WebDriver key code of Enter.
pub const ENTER: &str = "\u{E007}";

/// At most two browsers at once: each is a few hundred MB and the machine is small.
static SLOTS: Semaphore = Semaphore::const_new(2);

/// Whether the browser tests can run. Without Chromium or its driver they are skipped with a
/// message, except in CI (`HARVEST_CI=1`), where that is a failure.
pub fn available(test: &str) -> bool {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "{} missing (install Debian's chromium and chromium-driver)",
        missing.join(" and ")
    );
    if std::env::var("HARVEST_CI").as_deref() == Ok("1") {
        panic!("{test}: {why}; HARVEST_CI=1, so the browser tests must run");
    }
    eprintln!("skipped: {test}: {why}");
    false
}

/// One headless Chromium session.
pub struct Browser {
    http: reqwest::Client,
    /// `http://127.0.0.1:PORT/session/ID`
    session: String,
    driver: Child,
    name: String,
    _profile: tempfile::TempDir,
    downloads: tempfile::TempDir,
    _slot: SemaphorePermit<'static>,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a fresh profile and this window size.
    /// `name` names the failure screenshots.
    pub async fn start(name: &str, width: u32, height: u32) -> Browser {
        let slot = SLOTS
            .acquire()
            .await
            .expect("browser slots are never closed");
        let mut driver = Command::new(CHROMEDRIVER)
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start chromedriver");
        let port = driver_port(&mut driver);
        let profile = tempfile::tempdir().expect("profile dir");
        let downloads = tempfile::tempdir().expect("downloads dir");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("http client");
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--disable-crash-reporter",
            "--disable-breakpad",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            format!("--user-data-dir={}", profile.path().display()),
            format!("--window-size={width},{height}"),
        ])
        .collect::<Vec<_>>();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": args,
                "prefs": {
                    "download.default_directory": downloads.path(),
                    "download.prompt_for_download": false,
                },
            },
        }}});
        let base = format!("http://127.0.0.1:{port}");
        let resp = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .expect("chromedriver answers");
        let v: Value = resp.json().await.expect("new session JSON");
        let id = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("chromedriver did not start Chromium: {v}"))
            .to_string();
        let b = Browser {
            http,
            session: format!("{base}/session/{id}"),
            driver,
            name: name.to_string(),
            _profile: profile,
            downloads,
            _slot: slot,
        };
        b.set_size(width, height).await;
        b
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        self.try_cmd(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A WebDriver command; its error (with WebDriver's error code, e.g. `stale element
    /// reference`) when the driver refuses it.
    async fn try_cmd(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        if std::env::var_os("HARVEST_WEBDRIVER_TRACE").is_some() {
            eprintln!("webdriver {method} {path} {body:?}");
        }
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.session));
        if let Some(b) = body {
            req = req.json(&b);
        } else if method == reqwest::Method::POST {
            req = req.json(&json!({}));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("webdriver {method} {path}: {e}"))?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(format!(
                "webdriver {method} {path}: {status}: {}: {}",
                v["value"]["error"], v["value"]["message"]
            ));
        }
        Ok(v["value"].clone())
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.cmd(reqwest::Method::POST, path, Some(body)).await
    }

    /// Sets the outer window size, then corrects it so the page's viewport is `width` wide.
    pub async fn set_size(&self, width: u32, height: u32) {
        self.post("/window/rect", json!({"width": width, "height": height}))
            .await;
        let inner = self
            .js("return [window.innerWidth, window.innerHeight]", json!([]))
            .await;
        let (iw, ih) = (
            inner[0].as_u64().unwrap_or(0) as i64,
            inner[1].as_u64().unwrap_or(0) as i64,
        );
        if iw > 0 && (iw != width as i64 || ih != height as i64) {
            let w = width as i64 + (width as i64 - iw);
            let h = height as i64 + (height as i64 - ih);
            self.post("/window/rect", json!({"width": w, "height": h}))
                .await;
        }
    }

    /// Opens a URL and waits for the document to load.
    pub async fn goto(&self, url: &str) {
        self.post("/url", json!({"url": url})).await;
    }

    /// Runs a script (`return ...`) with `arguments`, returning its JSON value.
    pub async fn js(&self, script: &str, args: Value) -> Value {
        self.post("/execute/sync", json!({"script": script, "args": args}))
            .await
    }

    /// The element matching a CSS selector, waiting (at most 10 s) for it to appear.
    pub async fn find(&self, css: &str) -> String {
        let script = "return document.querySelector(arguments[0]) ? true : null";
        self.wait_js(&format!("an element {css}"), script, json!([css]), 10)
            .await;
        let v = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await;
        element_id(&v)
    }

    /// Clicks the element matching `css` (a real pointer click, as WebDriver does it). The
    /// console rebuilds a part of a page when what it shows changes (a session's actions when
    /// its status or its first full read arrives), so the element found may be replaced before
    /// the click lands: then it is found again, for up to 10 s.
    pub async fn click(&self, css: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let id = self.find(css).await;
            let clicked = self
                .try_cmd(
                    reqwest::Method::POST,
                    &format!("/element/{id}/click"),
                    Some(json!({})),
                )
                .await;
            match clicked {
                Ok(_) => return,
                Err(e) if e.contains("stale element reference") && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => self.fail(&format!("clicking {css}: {e}")).await,
            }
        }
    }

    /// Types `text` into the element matching `css` (keystrokes, as a user would).
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.post(&format!("/element/{id}/value"), json!({"text": text}))
            .await;
    }

    /// Clears an input or textarea.
    pub async fn clear(&self, css: &str) {
        let id = self.find(css).await;
        self.post(&format!("/element/{id}/clear"), json!({})).await;
    }

    /// Sends keys to whatever has focus (Tab, Enter, ...).
    pub async fn keys(&self, text: &str) {
        let actions: Vec<Value> = text
            .chars()
            .flat_map(|c| {
                [
                    json!({"type": "keyDown", "value": c.to_string()}),
                    json!({"type": "keyUp", "value": c.to_string()}),
                ]
            })
            .collect();
        self.post(
            "/actions",
            json!({"actions": [{"type": "key", "id": "keyboard", "actions": actions}]}),
        )
        .await;
        self.cmd(reqwest::Method::DELETE, "/actions", None).await;
    }

    /// The text content of the element matching `css` ("" when there is none).
    pub async fn text(&self, css: &str) -> String {
        self.js(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : ''",
            json!([css]),
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// Polls `script` (with `args`) until it returns something other than null, false or
    /// undefined, and returns that; after `secs` seconds, fails with what the page shows.
    pub async fn wait_js(&self, what: &str, script: &str, args: Value, secs: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.js(script, args.clone()).await;
            if !v.is_null() && v != Value::Bool(false) {
                return v;
            }
            if Instant::now() > deadline {
                self.fail(&format!("waited {secs} s for {what}")).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the page's text contains `needle`.
    pub async fn wait_text(&self, needle: &str, secs: u64) {
        self.wait_js(
            &format!("the text {needle:?}"),
            "return document.body.innerText.includes(arguments[0]) || null",
            json!([needle]),
            secs,
        )
        .await;
    }

    /// Panics with `why`, the page's address and text, and the path of a screenshot.
    pub async fn fail(&self, why: &str) -> ! {
        let url = self.js("return location.href", json!([])).await;
        let text = self
            .js(
                "return document.body ? document.body.innerText : ''",
                json!([]),
            )
            .await;
        let text: String = text
            .as_str()
            .unwrap_or_default()
            .chars()
            .take(4000)
            .collect();
        let shot = self.save_failure_screenshot().await;
        let logs = self.console_log().await.join("\n");
        let report = format!(
            "{}: {why}\nat {url}\nscreenshot: {shot}\nbrowser console:\n{logs}\npage text:\n{text}",
            self.name
        );
        // Printed without a backtrace: under RUST_BACKTRACE=1 (as in CI) the panic hook's
        // backtrace would follow the report and push it out of a log that keeps only its tail.
        eprintln!("{report}");
        std::panic::resume_unwind(Box::new(report));
    }

    async fn save_failure_screenshot(&self) -> String {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console-failures");
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(format!("{}.png", self.name));
        match std::fs::write(&path, self.screenshot().await) {
            Ok(()) => path.display().to_string(),
            Err(e) => format!("(not saved: {e})"),
        }
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> Vec<u8> {
        let v = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .unwrap_or_default()
    }

    /// Messages the page logged (errors, CSP violations), drained.
    pub async fn console_log(&self) -> Vec<String> {
        let v = self.post("/se/log", json!({"type": "browser"})).await;
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|e| format!("{} {}", e["level"], e["message"]))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Fails if the page logged an error or a Content-Security-Policy violation.
    pub async fn assert_clean_console(&self) {
        let bad: Vec<String> = self
            .console_log()
            .await
            .into_iter()
            .filter(|l| l.starts_with("\"SEVERE\"") || l.contains("Content Security Policy"))
            // API answers of 4xx are shown by the console (a bad config, a wrong token, an
            // optional endpoint missing); Chromium logs each as a failed resource anyway.
            .filter(|l| !l.contains("the server responded with a status of 4"))
            .collect();
        if !bad.is_empty() {
            self.fail(&format!(
                "the browser console has errors:\n{}",
                bad.join("\n")
            ))
            .await;
        }
    }

    /// Waits (at most `secs`) for a completed download named `name`; returns its content.
    pub async fn downloaded(&self, name: &str, secs: u64) -> String {
        let path = self.downloads.path().join(name);
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            // Chromium writes `name.crdownload` and renames it when done.
            if let Ok(text) = std::fs::read_to_string(&path) {
                return text;
            }
            if Instant::now() > deadline {
                let seen: Vec<String> = std::fs::read_dir(self.downloads.path())
                    .map(|d| {
                        d.filter_map(Result::ok)
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                self.fail(&format!(
                    "no download {name} within {secs} s (found {seen:?})"
                ))
                .await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Ends the browser session (Chromium exits) and the driver.
    pub async fn quit(self) {
        let _ = self
            .http
            .delete(&self.session)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: chromedriver and every Chromium process it started.
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.driver.id())])
            .status();
        let _ = self.driver.wait();
    }
}

fn element_id(v: &Value) -> String {
    v.as_object()
        .and_then(|o| o.values().next())
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("not an element reference: {v}"))
        .to_string()
}

/// Reads chromedriver's "started successfully on port N" line (at most 20 s).
fn driver_port(driver: &mut Child) -> u16 {
    let out = driver.stdout.take().expect("stdout piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(rest) = line.split("on port ").nth(1) {
                    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    if let Ok(p) = digits.parse::<u16>()
                        && p != 0
                    {
                        return p;
                    }
                }
                seen.push(line);
            }
            Err(_) => {
                let _ = driver.kill();
                panic!(
                    "chromedriver did not say its port within 20 s; it printed:\n{}",
                    seen.join("\n")
                );
            }
        }
    }
}
