//! The Kubernetes API stand-in (`wgmesh-apiserver`, its own crate) as a process in the underlay
//! namespace, and `ApiClient`, the test's way to talk to it.
//!
//! Agents reach the stand-in over TCP at 192.0.2.1:6443 through the kubeconfig it writes. The
//! test process stays in the root namespace and uses the stand-in's Unix control socket instead,
//! which serves the same Kubernetes routes plus `/_control/...` routes (outages, injected
//! failures, compaction, request statistics).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use ipnet::IpNet;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::{
    cmd::Cmd,
    eventually::eventually,
    http::{self, Request, Response},
    process::ChildGuard,
};

/// Where the stand-in listens for agents (on the underlay bridge).
pub const API_LISTEN: &str = "192.0.2.1:6443";
/// Content type of a JSON merge patch.
pub const MERGE_PATCH: &str = "application/merge-patch+json";

/// The running stand-in. Stopped (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
pub struct ApiServer {
    process: ChildGuard,
    client: ApiClient,
    kubeconfig: PathBuf,
    log: PathBuf,
}

impl ApiServer {
    /// Starts `bin` in namespace `ns` with its socket, kubeconfig and log in `dir`, and waits
    /// until it answers `/_control/health`.
    pub fn start(bin: &Path, ns: &str, dir: &Path) -> Result<Self> {
        let socket = dir.join("api.sock");
        let kubeconfig = dir.join("kubeconfig");
        let log = dir.join("apiserver.log");
        let mut cmd = Cmd::in_netns(ns, bin);
        // Its flags also read WGMESH_APISERVER_* env vars: the developer's shell must not leak in.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("WGMESH_APISERVER_") {
                cmd = cmd.env_remove(k);
            }
        }
        let child = cmd
            .args(["--listen", API_LISTEN, "--control-socket"])
            .arg(&socket)
            .arg("--kubeconfig-out")
            .arg(&kubeconfig)
            .spawn_logged(&log)?;
        let mut server = Self {
            process: ChildGuard::new("wgmesh-apiserver", child),
            client: ApiClient::new(socket),
            kubeconfig,
            log,
        };
        eventually(
            "the API stand-in answers on its control socket",
            Duration::from_secs(15),
            || {
                if let Some(status) = server.process.try_status()? {
                    bail!(
                        "wgmesh-apiserver exited ({status}); log:\n{}",
                        server.log_tail(30)
                    );
                }
                server.client.health()?;
                if !server.kubeconfig.exists() {
                    bail!("{} not written yet", server.kubeconfig.display());
                }
                Ok(())
            },
        )?;
        Ok(server)
    }

    pub fn client(&self) -> &ApiClient {
        &self.client
    }

    /// The kubeconfig the stand-in wrote (server `https?://192.0.2.1:6443`), for the agents.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_tail(&self, lines: usize) -> String {
        crate::testbed::tail_file(&self.log, lines)
    }

    /// Keeps the stand-in running after the harness is gone (`WGMESH_NETNS_KEEP=1`).
    pub fn detach(&mut self) {
        self.process.detach();
    }

    /// SIGTERM, wait up to 5 s, SIGKILL.
    pub fn stop(&mut self) -> Result<()> {
        self.process
            .stop(Signal::SIGTERM, Duration::from_secs(5))
            .map(drop)
    }
}

/// HTTP/1.1 over the stand-in's Unix control socket; one connection per request.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
}

impl ApiClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request; any status is returned as is.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Response> {
        let mut stream = UnixStream::connect(&self.socket)
            .with_context(|| format!("failed to connect to {}", self.socket.display()))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .context("set timeout")?;
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .context("set timeout")?;
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .context("failed to encode body")?;
        let req = Request {
            method,
            host: "localhost",
            path,
            content_type: content_type.or(body.as_ref().map(|_| "application/json")),
            body: body.as_deref(),
        };
        http::send(&mut stream, &req).with_context(|| format!("{method} {path}"))
    }

    /// Sends one request and requires a 2xx; returns the body as JSON (`Null` when empty).
    pub fn json(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Value> {
        let resp = self.request(method, path, content_type, body)?;
        if !resp.is_success() {
            bail!(
                "{method} {path} returned {}: {}",
                resp.status,
                resp.body_text().trim()
            );
        }
        if resp.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&resp.body)
            .with_context(|| format!("{method} {path} returned non-JSON: {}", resp.body_text()))
    }

    // === Kubernetes Node routes ===

    /// Creates a Node as a kubelet registering itself would: hostname label, pod CIDRs,
    /// InternalIP + Hostname addresses and a Ready condition.
    pub fn create_node(
        &self,
        name: &str,
        internal_ip: IpAddr,
        pod_cidrs: &[IpNet],
    ) -> Result<Value> {
        let node = node_object(name, internal_ip, pod_cidrs);
        let created = self.json("POST", "/api/v1/nodes", None, Some(&node))?;
        // A real apiserver keeps the status a kubelet registers with; if a stand-in drops it on
        // create, set it through the status subresource like a kubelet's first status update.
        if created
            .pointer("/status/addresses")
            .is_none_or(|a| a.as_array().is_none_or(Vec::is_empty))
        {
            let status = json!({ "status": node["status"] });
            return self.json(
                "PATCH",
                &format!("/api/v1/nodes/{name}/status"),
                Some(MERGE_PATCH),
                Some(&status),
            );
        }
        Ok(created)
    }

    pub fn get_node(&self, name: &str) -> Result<Value> {
        self.json("GET", &format!("/api/v1/nodes/{name}"), None, None)
    }

    /// The NodeList.
    pub fn list_nodes(&self) -> Result<Value> {
        self.json("GET", "/api/v1/nodes", None, None)
    }

    pub fn delete_node(&self, name: &str) -> Result<()> {
        self.json("DELETE", &format!("/api/v1/nodes/{name}"), None, None)
            .map(drop)
    }

    /// A JSON merge patch of the Node object.
    pub fn patch_node(&self, name: &str, patch: &Value) -> Result<Value> {
        self.json(
            "PATCH",
            &format!("/api/v1/nodes/{name}"),
            Some(MERGE_PATCH),
            Some(patch),
        )
    }

    /// A JSON merge patch of the status subresource.
    pub fn patch_node_status(&self, name: &str, patch: &Value) -> Result<Value> {
        self.json(
            "PATCH",
            &format!("/api/v1/nodes/{name}/status"),
            Some(MERGE_PATCH),
            Some(patch),
        )
    }

    /// Sets (`Some`) or deletes (`None`) annotations with a merge patch.
    pub fn patch_node_annotations(
        &self,
        name: &str,
        changes: &[(&str, Option<&str>)],
    ) -> Result<Value> {
        let map: serde_json::Map<String, Value> = changes
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    v.map_or(Value::Null, |v| Value::String(v.to_owned())),
                )
            })
            .collect();
        self.patch_node(name, &json!({ "metadata": { "annotations": map } }))
    }

    /// The Node's annotations (empty when it has none).
    pub fn node_annotations(&self, name: &str) -> Result<BTreeMap<String, String>> {
        let node = self.get_node(name)?;
        Ok(node
            .pointer("/metadata/annotations")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                    .collect()
            })
            .unwrap_or_default())
    }

    // === control routes ===

    pub fn health(&self) -> Result<()> {
        let resp = self.request("GET", "/_control/health", None, None)?;
        if !resp.is_success() {
            bail!("health returned {}", resp.status);
        }
        Ok(())
    }

    /// The API is unreachable for agents for `seconds`, then comes back by itself.
    pub fn outage(&self, seconds: u64) -> Result<()> {
        self.control(&format!("/_control/outage?seconds={seconds}"))
    }

    /// The API is unreachable for agents until `up`.
    pub fn down(&self) -> Result<()> {
        self.control("/_control/down")
    }

    pub fn up(&self) -> Result<()> {
        self.control("/_control/up")
    }

    /// The next `count` requests (of `verb`, e.g. `patch` or `watch`, or any verb) fail with
    /// `status` (409, 410, 429, 500, ...).
    pub fn fail(&self, status: u16, count: u32, verb: Option<&str>) -> Result<()> {
        let mut path = format!("/_control/fail?status={status}&count={count}");
        if let Some(verb) = verb {
            path.push_str(&format!("&verb={verb}"));
        }
        self.control(&path)
    }

    /// A fault rule with any of the stand-in's parameters (`status`, `count`, `verb`, `name`,
    /// `client`), e.g. `[("status", "500"), ("count", "3"), ("name", "a")]`.
    pub fn fail_with(&self, params: &[(&str, &str)]) -> Result<()> {
        let q: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        self.control(&format!("/_control/fail?{}", q.join("&")))
    }

    /// Drops all pending fault rules.
    pub fn clear_faults(&self) -> Result<()> {
        self.json("DELETE", "/_control/fail", None, None).map(drop)
    }

    /// Forgets old resourceVersions: watches resuming from them get 410 Gone.
    pub fn compact(&self) -> Result<()> {
        self.control("/_control/compact")
    }

    /// Request statistics as the stand-in reports them.
    pub fn stats(&self) -> Result<Value> {
        self.json("GET", "/_control/stats", None, None)
    }

    pub fn reset_stats(&self) -> Result<()> {
        self.control("/_control/stats/reset")
    }

    fn control(&self, path: &str) -> Result<()> {
        self.json("POST", path, None, None).map(drop)
    }
}

/// A Node object as a kubelet registers it (with node-ipam's pod CIDRs already set).
pub fn node_object(name: &str, internal_ip: IpAddr, pod_cidrs: &[IpNet]) -> Value {
    let now = rfc3339(SystemTime::now());
    let cidrs: Vec<String> = pod_cidrs.iter().map(ToString::to_string).collect();
    let mut spec = json!({ "podCIDRs": cidrs });
    if let Some(first) = cidrs.first() {
        spec["podCIDR"] = json!(first);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": std::env::consts::ARCH,
            },
        },
        "spec": spec,
        "status": {
            "addresses": [
                { "type": "InternalIP", "address": internal_ip.to_string() },
                { "type": "Hostname", "address": name },
            ],
            "conditions": [{
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "kubelet is posting ready status",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }],
        },
    })
}

/// `2026-01-02T03:04:05Z` (UTC, second precision, as Kubernetes writes times).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    i64::try_from(secs)
        .ok()
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .unwrap_or(jiff::Timestamp::MAX)
        .to_string()
}

#[cfg(test)]
mod tests;
