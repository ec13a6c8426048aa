//! The HTTP client the client commands share: the server's base address, the bearer token,
//! and answers turned into errors that carry the server's own message.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::Value;

/// A small client of the HTTP API.
pub(super) struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    pub(super) fn new(server: &str, token: Option<String>) -> anyhow::Result<Client> {
        let base = server.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("--server {base:?} must start with http:// or https://");
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?;
        Ok(Client { http, base, token })
    }

    pub(super) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        req
    }

    /// Sends a request; a non-2xx answer becomes an error with the server's message.
    pub(super) async fn send(
        &self,
        req: reqwest::RequestBuilder,
    ) -> anyhow::Result<reqwest::Response> {
        let resp = req.send().await.map_err(|e| {
            anyhow!(
                "cannot reach the harvest server at {}: {e} (is `harvest serve` running? set --server or HARVEST_SERVER)",
                self.base
            )
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let parsed: Option<Value> = serde_json::from_str(&text).ok();
        match parsed.as_ref().and_then(|v| v.get("error")) {
            Some(e) => bail!(
                "server: {} ({}, HTTP {})",
                e["message"].as_str().unwrap_or("no message"),
                e["code"].as_str().unwrap_or("error"),
                status.as_u16()
            ),
            None => bail!("server answered HTTP {status}: {}", text.trim()),
        }
    }

    pub(super) async fn json(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let resp = self.send(req).await?;
        let bytes = resp.bytes().await.context("reading the server's answer")?;
        serde_json::from_slice(&bytes).context("the server's answer is not JSON")
    }

    pub(super) async fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send_json(reqwest::Method::POST, path, body).await
    }

    pub(super) async fn send_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &Value,
    ) -> anyhow::Result<Value> {
        let req = self
            .request(method, path)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(serde_json::to_vec(body)?);
        self.json(req).await
    }
}

pub(super) fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
