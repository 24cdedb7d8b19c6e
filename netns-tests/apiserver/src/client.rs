//! A small HTTP/1.1 client for the control socket, for test harnesses: the `/_control/*` routes
//! plus a few Node API calls (the control socket serves the Kubernetes API too).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

/// A client of one control socket. Every call opens a new connection.
#[derive(Debug, Clone)]
pub struct ControlClient {
    path: PathBuf,
}

/// An answer: HTTP status and the body (JSON, or a JSON string for other text).
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// HTTP status code.
    pub status: u16,
    /// Parsed body.
    pub body: Value,
}

impl Answer {
    fn ok(self) -> anyhow::Result<Value> {
        if (200..300).contains(&self.status) {
            Ok(self.body)
        } else {
            bail!("HTTP {}: {}", self.status, self.body)
        }
    }
}

/// A `fail` rule to install (see `POST /_control/fail`).
#[derive(Debug, Clone, Default)]
pub struct FailSpec<'a> {
    /// HTTP status to answer.
    pub status: u16,
    /// How many requests (default 1 when 0).
    pub count: u64,
    /// Only this verb: get, list, watch, create, update, patch, delete.
    pub verb: Option<&'a str>,
    /// Only this Node name.
    pub name: Option<&'a str>,
    /// tcp (default), any, control, or a client IP address.
    pub client: Option<&'a str>,
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl ControlClient {
    /// A client for the socket at `path`.
    pub fn new(path: impl AsRef<Path>) -> Self {
        Self {
            path: path.as_ref().to_path_buf(),
        }
    }

    /// Sends one request and returns the status and parsed body.
    pub async fn request(
        &self,
        method: &str,
        path_and_query: &str,
        content_type: Option<&str>,
        body: Option<&Value>,
    ) -> anyhow::Result<Answer> {
        let stream = UnixStream::connect(&self.path)
            .await
            .with_context(|| format!("connecting to {}", self.path.display()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake on the control socket")?;
        let conn_task = tokio::spawn(conn);
        let bytes = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b)?),
            None => Bytes::new(),
        };
        let mut req = http::Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(http::header::HOST, "control");
        if let Some(ct) = content_type {
            req = req.header(http::header::CONTENT_TYPE, ct);
        }
        let req = req.body(Full::new(bytes))?;
        let resp = sender.send_request(req).await.context("control request")?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        conn_task.abort();
        let body = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
        Ok(Answer { status, body })
    }

    async fn post(&self, path_and_query: &str) -> anyhow::Result<Value> {
        self.request("POST", path_and_query, None, None).await?.ok()
    }

    /// `GET /_control/health`.
    pub async fn health(&self) -> anyhow::Result<Value> {
        self.request("GET", "/_control/health", None, None)
            .await?
            .ok()
    }

    /// Polls `health` until it answers or `timeout` runs out.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.health().await {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(e.context("the stand-in did not become ready"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// `POST /_control/outage?seconds=N`.
    pub async fn outage(&self, seconds: f64) -> anyhow::Result<Value> {
        self.post(&format!("/_control/outage?seconds={seconds}"))
            .await
    }

    /// `POST /_control/down`.
    pub async fn down(&self) -> anyhow::Result<Value> {
        self.post("/_control/down").await
    }

    /// `POST /_control/up`.
    pub async fn up(&self) -> anyhow::Result<Value> {
        self.post("/_control/up").await
    }

    /// `POST /_control/compact`.
    pub async fn compact(&self) -> anyhow::Result<Value> {
        self.post("/_control/compact").await
    }

    /// `POST /_control/fail?...`.
    pub async fn fail(&self, spec: &FailSpec<'_>) -> anyhow::Result<Value> {
        let mut q = format!("status={}&count={}", spec.status, spec.count.max(1));
        for (k, v) in [
            ("verb", spec.verb),
            ("name", spec.name),
            ("client", spec.client),
        ] {
            if let Some(v) = v {
                q.push_str(&format!("&{k}={}", encode(v)));
            }
        }
        self.post(&format!("/_control/fail?{q}")).await
    }

    /// `DELETE /_control/fail`: drops every pending rule.
    pub async fn clear_failures(&self) -> anyhow::Result<Value> {
        self.request("DELETE", "/_control/fail", None, None)
            .await?
            .ok()
    }

    /// `GET /_control/stats`.
    pub async fn stats(&self) -> anyhow::Result<Value> {
        self.request("GET", "/_control/stats", None, None)
            .await?
            .ok()
    }

    /// `POST /_control/stats/reset`.
    pub async fn reset_stats(&self) -> anyhow::Result<Value> {
        self.post("/_control/stats/reset").await
    }

    /// `GET /api/v1/nodes/{name}`: `None` on 404.
    pub async fn get_node(&self, name: &str) -> anyhow::Result<Option<Value>> {
        let a = self
            .request(
                "GET",
                &format!("/api/v1/nodes/{}", encode(name)),
                None,
                None,
            )
            .await?;
        if a.status == 404 {
            return Ok(None);
        }
        a.ok().map(Some)
    }

    /// `GET /api/v1/nodes` (all items).
    pub async fn list_nodes(&self) -> anyhow::Result<Vec<Value>> {
        let list = self
            .request("GET", "/api/v1/nodes", None, None)
            .await?
            .ok()?;
        Ok(list
            .get("items")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default())
    }

    /// `POST /api/v1/nodes`.
    pub async fn create_node(&self, node: &Value) -> anyhow::Result<Value> {
        self.request(
            "POST",
            "/api/v1/nodes?fieldManager=control",
            Some("application/json"),
            Some(node),
        )
        .await?
        .ok()
    }

    /// `PATCH /api/v1/nodes/{name}` with a JSON merge patch.
    pub async fn merge_patch_node(&self, name: &str, patch: &Value) -> anyhow::Result<Value> {
        self.request(
            "PATCH",
            &format!("/api/v1/nodes/{}?fieldManager=control", encode(name)),
            Some("application/merge-patch+json"),
            Some(patch),
        )
        .await?
        .ok()
    }

    /// `DELETE /api/v1/nodes/{name}`.
    pub async fn delete_node(&self, name: &str) -> anyhow::Result<Value> {
        self.request(
            "DELETE",
            &format!("/api/v1/nodes/{}", encode(name)),
            None,
            None,
        )
        .await?
        .ok()
    }
}
