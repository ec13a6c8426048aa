//! The processors that reach outside through the host: `http` (with `http-param` and
//! `http-header`), `file` and `sleep`.

use std::time::Duration;

use super::super::host::{FileOp, FileOutput, HostError, HttpRequest, LogLevel};
use super::super::http::{self as wh_http, Param};
use super::super::parse::{Kind, Node};
use super::super::value::Value;
use super::{FailKind, Flow, HttpCollect, Interp, R};

/// Statuses Web-Harvest treats as failures (after its retries): bad gateway, unavailable,
/// gateway timeout, bandwidth exceeded. Other statuses are answers, their bodies the value.
const FAILING_STATUSES: [u16; 4] = [502, 503, 504, 509];

impl<'p> Interp<'p> {
    fn host_error(&self, node: &Node, what: &str, e: HostError) -> Flow {
        match e {
            HostError::Stopped => Flow::Stopped,
            HostError::LeaseLost => self.failure(node, FailKind::LeaseLost, "the lease was lost"),
            HostError::Http { message, retryable } => self.failure(
                node,
                FailKind::Http { retryable },
                format!("{what}: {message}"),
            ),
            HostError::File(m) => self.fail(node, m),
        }
    }

    pub(super) fn http_processor(&mut self, node: &'p Node) -> R<Value> {
        let url = self.required(node, "url")?;
        let method = match self.attr_text(node, "method")? {
            None => "GET".to_string(),
            Some(m) if m.eq_ignore_ascii_case("get") => "GET".to_string(),
            Some(m) if m.eq_ignore_ascii_case("post") => "POST".to_string(),
            Some(m) => return Err(self.fail(node, format!("method {m:?}: write GET or POST"))),
        };
        let follow = self.attr_bool(node, "follow-redirects", true)?;
        let ignore_body = self.attr_bool(node, "ignore-response-body", false)?;
        let content_type = self.attr_text(node, "content-type")?;
        let charset_attr = self.attr_text(node, "charset")?;
        let charset = charset_attr
            .clone()
            .unwrap_or_else(|| self.program.charset.clone());
        let username = self.attr_text(node, "username")?;
        let password = self.attr_text(node, "password")?;
        let mut url = wh_http::request_url(&url).map_err(|e| self.fail(node, e))?;

        self.http.push(HttpCollect::default());
        let body = self.body(node);
        let parts = self.http.pop().unwrap_or_default();
        let body = body?;

        let mut headers = parts.headers;
        let mut req_body = None;
        if method == "GET" {
            if !parts.params.is_empty() {
                let q = wh_http::form_encode(&parts.params, &charset);
                let joined = match url.query() {
                    Some(old) if !old.is_empty() => format!("{old}&{q}"),
                    _ => q,
                };
                url.set_query(Some(&joined));
            }
        } else {
            let ct = content_type.clone().unwrap_or_default();
            let (ct_header, bytes) = if ct.eq_ignore_ascii_case("multipart/form-data") {
                let (boundary, b) = wh_http::multipart(&parts.params, &charset);
                (format!("multipart/form-data; boundary={boundary}"), b)
            } else if ct.starts_with("text/") || ct.starts_with("application/xml") {
                (
                    format!("{ct}; charset={charset}"),
                    wh_http::encode_text(&body.to_text(), &charset),
                )
            } else {
                (
                    format!("application/x-www-form-urlencoded; charset={charset}"),
                    wh_http::form_encode(&parts.params, &charset).into_bytes(),
                )
            };
            if !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            {
                headers.push(("Content-Type".into(), ct_header));
            }
            req_body = Some(bytes);
        }
        if let (Some(u), Some(p)) = (username, password) {
            use base64::Engine as _;
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            headers.push(("Authorization".into(), format!("Basic {token}")));
        }
        if self.http_requests >= self.limits.max_http_requests {
            return Err(self.limit(
                node,
                "http_requests",
                format!(
                    "the config made {} HTTP requests, the most a session may",
                    self.limits.max_http_requests
                ),
            ));
        }
        self.http_requests += 1;
        let what = format!("{method} {url}");
        let resp = self
            .bridge
            .http(HttpRequest {
                method: method.clone(),
                url: url.to_string(),
                headers,
                body: req_body,
                follow_redirects: follow,
            })
            .map_err(|e| self.host_error(node, &what, e))?;

        let content_type_header = resp
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.clone());
        let (text, used) = wh_http::decode_body(
            &resp.body,
            content_type_header.as_deref(),
            charset_attr.as_deref(),
            &self.program.charset,
        );
        let info = &mut self.http_info;
        info.status = resp.status;
        info.status_text = reqwest::StatusCode::from_u16(resp.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("")
            .to_string();
        info.charset = used;
        info.mime_type = content_type_header
            .as_deref()
            .and_then(|c| c.split(';').next())
            .unwrap_or("")
            .trim()
            .to_string();
        info.content_length = resp.body.len() as u64;
        info.total_length += resp.body.len() as u64;
        info.total_responses += 1;
        info.headers = resp.headers.clone();
        if let Some(script) = self.script.as_mut() {
            script
                .set_http(&self.http_info)
                .map_err(|e| self.fail(node, e))?;
        }
        if resp.status >= 400 {
            self.bridge.log(
                LogLevel::Warn,
                &format!("{}: {what} answered {}", node.path, resp.status),
            );
        }
        if FAILING_STATUSES.contains(&resp.status) {
            return Err(self.failure(
                node,
                FailKind::Http { retryable: true },
                format!("{what}: HTTP status {} (after retries)", resp.status),
            ));
        }
        if ignore_body {
            return Ok(Value::Empty);
        }
        self.check_size(node, text.len())?;
        Ok(Value::text(text))
    }

    pub(super) fn http_part(&mut self, node: &'p Node) -> R<Value> {
        let name = self.required(node, "name")?;
        if node.kind == Kind::HttpParam {
            let is_file = self.attr_bool(node, "isfile", false)?;
            let filename = self.attr_text(node, "filename")?;
            let content_type = self.attr_text(node, "contenttype")?;
            let value = self.body(node)?.to_text();
            let Some(c) = self.http.last_mut() else {
                return Err(self.fail(node, "`http-param` runs only inside `http`"));
            };
            let p = Param {
                name,
                value,
                is_file,
                filename,
                content_type,
            };
            match c.params.iter_mut().find(|q| q.name == p.name) {
                Some(q) => *q = p,
                None => c.params.push(p),
            }
        } else {
            let value = self.body(node)?.to_text();
            if value.contains(['\r', '\n']) {
                self.bridge.log(
                    LogLevel::Warn,
                    &format!(
                        "{}: newlines in the value of header {name} were replaced by spaces",
                        node.path
                    ),
                );
            }
            let value = value.replace(['\r', '\n'], " ");
            let Some(c) = self.http.last_mut() else {
                return Err(self.fail(node, "`http-header` runs only inside `http`"));
            };
            match c
                .headers
                .iter_mut()
                .find(|(k, _)| k.eq_ignore_ascii_case(&name))
            {
                Some(h) => h.1 = value,
                None => c.headers.push((name, value)),
            }
        }
        Ok(Value::Empty)
    }

    pub(super) fn file(&mut self, node: &'p Node) -> R<Value> {
        let path = self.required(node, "path")?;
        let action = self
            .attr_text(node, "action")?
            .unwrap_or_else(|| "read".into())
            .to_ascii_lowercase();
        let charset = self
            .attr_text(node, "charset")?
            .unwrap_or_else(|| self.program.charset.clone());
        let binary = self
            .attr_text(node, "type")?
            .is_some_and(|t| t.eq_ignore_ascii_case("binary"));
        match action.as_str() {
            "write" | "append" => {
                let text = self.body(node)?.to_text();
                let data = if binary {
                    text.clone().into_bytes()
                } else {
                    wh_http::encode_text(&text, &charset)
                };
                self.bridge
                    .file(FileOp::Write {
                        path,
                        data,
                        append: action == "append",
                    })
                    .map_err(|e| self.host_error(node, "file", e))?;
                Ok(Value::text(text))
            }
            "list" => {
                let filter = self.attr_text(node, "listfilter")?;
                let files = self.attr_bool(node, "listfiles", true)?;
                let dirs = self.attr_bool(node, "listdirs", true)?;
                let recursive = self.attr_bool(node, "listrecursive", false)?;
                let out = self
                    .bridge
                    .file(FileOp::List {
                        path,
                        filter,
                        files,
                        dirs,
                        recursive,
                    })
                    .map_err(|e| self.host_error(node, "file", e))?;
                match out {
                    FileOutput::Listing(l) => Ok(Value::list(
                        l.into_iter().map(std::sync::Arc::from).collect(),
                    )),
                    _ => Ok(Value::Empty),
                }
            }
            "read" => {
                let out = self
                    .bridge
                    .file(FileOp::Read { path })
                    .map_err(|e| self.host_error(node, "file", e))?;
                let FileOutput::Data(d) = out else {
                    return Ok(Value::Empty);
                };
                let text = if binary {
                    String::from_utf8_lossy(&d).into_owned()
                } else {
                    wh_http::decode_text(&d, &charset)
                };
                self.check_size(node, text.len())?;
                Ok(Value::text(text))
            }
            other => Err(self.fail(
                node,
                format!("action {other:?}: write read, write, append or list"),
            )),
        }
    }

    pub(super) fn sleep(&mut self, node: &'p Node) -> R<Value> {
        let ms = self
            .attr_text(node, "milliseconds")?
            .and_then(|s| s.trim().parse::<i64>().ok())
            .unwrap_or(0);
        if ms > 0 {
            self.bridge
                .sleep(Duration::from_millis(ms as u64))
                .map_err(|e| self.host_error(node, "sleep", e))?;
        }
        Ok(Value::Empty)
    }
}
