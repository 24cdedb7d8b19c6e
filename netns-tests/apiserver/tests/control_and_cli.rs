//! The control socket over a real Unix socket, and the `wgmesh-apiserver` binary: kubeconfig
//! output loaded by kube-rs, `--nodes-file`, and clean shutdown on SIGTERM.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{TestServer, eventually};
use k8s_openapi::api::core::v1::Node;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use wgmesh_apiserver::client::{ControlClient, FailSpec};

#[tokio::test]
async fn control_socket_counts_requests_per_client_and_injects_failures() {
    let srv = TestServer::start().await;
    srv.create("a", json!({})).await;
    srv.ctl.reset_stats().await.expect("reset");
    let api = srv.api();
    api.get("a").await.expect("get over TCP");
    api.patch(
        "a",
        &Default::default(),
        &kube::api::Patch::Merge(json!({"metadata": {"labels": {"x": "1"}}})),
    )
    .await
    .expect("patch over TCP");
    assert!(
        srv.ctl
            .get_node("a")
            .await
            .expect("get over the socket")
            .is_some()
    );
    assert!(srv.ctl.get_node("zz").await.expect("404 is None").is_none());

    let stats = srv.ctl.stats().await.expect("stats");
    assert_eq!(stats["total"], 4, "{stats}");
    assert_eq!(stats["writes"], 1);
    assert_eq!(stats["by_verb"]["get"], 3);
    assert_eq!(stats["by_client"]["127.0.0.1"]["total"], 2);
    assert_eq!(stats["by_client"]["127.0.0.1"]["writes"], 1);
    assert_eq!(stats["by_client"]["127.0.0.1"]["by_verb"]["patch"], 1);
    assert_eq!(stats["by_client"]["control"]["total"], 2);
    assert_eq!(stats["open_watches"], 0);
    srv.ctl.reset_stats().await.expect("reset");
    assert_eq!(srv.ctl.stats().await.expect("stats")["total"], 0);

    // A rule for one verb and name, answered with a Status the client understands.
    let r = srv
        .ctl
        .fail(&FailSpec {
            status: 409,
            count: 1,
            verb: Some("get"),
            name: Some("a"),
            ..Default::default()
        })
        .await
        .expect("fail");
    assert_eq!(
        r["rule"],
        json!({"status": 409, "remaining": 1, "verb": "get", "name": "a", "client": "tcp"})
    );
    // The control socket is not hit by default.
    assert!(srv.ctl.get_node("a").await.expect("control get").is_some());
    match api.get("a").await {
        Err(kube::Error::Api(s)) => assert!(s.is_conflict() && s.code == 409, "{s:?}"),
        other => panic!("expected the injected 409, got {other:?}"),
    }
    api.get("a").await.expect("the rule is used up");

    let pending = srv
        .ctl
        .fail(&FailSpec {
            status: 500,
            count: 3,
            ..Default::default()
        })
        .await
        .expect("fail");
    assert_eq!(pending["pending"].as_array().map(Vec::len), Some(1));
    assert_eq!(srv.ctl.clear_failures().await.expect("clear")["cleared"], 1);
    api.get("a").await.expect("no rule left");

    // Bad control requests, and control routes are not served over TCP.
    let bad = srv
        .ctl
        .request("POST", "/_control/fail?status=abc", None, None)
        .await
        .expect("answer");
    assert_eq!(bad.status, 400);
    assert_eq!(bad.body["ok"], false);
    let health = srv.ctl.health().await.expect("health");
    assert_eq!(health["ok"], true);
    let over_tcp = Client::try_from(kube::Config::new(srv.url.parse().expect("url")))
        .expect("client")
        .request_text(
            http::Request::get("/_control/health")
                .body(Vec::new())
                .expect("request"),
        )
        .await;
    match over_tcp {
        Err(kube::Error::Api(s)) => assert!(s.is_not_found(), "{s:?}"),
        other => panic!("expected 404, got {other:?}"),
    }

    // Kubernetes Status errors come back over the socket too.
    let patch = srv
        .ctl
        .request(
            "PATCH",
            "/api/v1/nodes/a",
            Some("text/plain"),
            Some(&json!({})),
        )
        .await
        .expect("answer");
    assert_eq!(patch.status, 415);
    assert_eq!(patch.body["kind"], "Status");
    assert_eq!(patch.body["reason"], "UnsupportedMediaType");
}

#[tokio::test]
async fn shutdown_removes_the_control_socket() {
    let srv = TestServer::start().await;
    let sock = srv.handle.control_socket().expect("socket").to_path_buf();
    assert!(sock.exists());
    let TestServer { handle, dir, .. } = srv;
    handle.shutdown().await;
    assert!(!sock.exists());
    drop(dir);
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill -{sig} {pid}");
}

async fn wait_exists(path: &Path) {
    let p = path.to_path_buf();
    eventually(&format!("{}", path.display()), || {
        let p = p.clone();
        async move { p.exists().then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn binary_writes_a_kubeconfig_kube_rs_loads_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = dir.path().join("nodes.json");
    std::fs::write(
        &nodes,
        serde_json::to_vec(&json!([
            common::node("seed-a", json!({"role": "edge"})),
            common::node("seed-b", json!({}))
        ]))
        .expect("json"),
    )
    .expect("write nodes file");
    let kubeconfig = dir.path().join("out").join("kubeconfig");
    let sock = dir.path().join("ctl.sock");
    std::fs::write(&sock, b"stale").expect("stale socket file");
    let child = Command::new(env!("CARGO_BIN_EXE_wgmesh-apiserver"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--bookmark-interval",
            "0.5",
            "--log-level",
            "debug",
        ])
        .arg("--control-socket")
        .arg(&sock)
        .arg("--kubeconfig-out")
        .arg(&kubeconfig)
        .arg("--nodes-file")
        .arg(&nodes)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the binary");
    let mut proc = Proc(child);
    wait_exists(&kubeconfig).await;

    let kc = Kubeconfig::read_from(&kubeconfig).expect("kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kube-rs accepts the kubeconfig");
    assert_eq!(config.cluster_url.scheme_str(), Some("http"));
    let client = Client::try_from(config).expect("client");
    let api: Api<Node> = Api::all(client);
    let n = api.get("seed-a").await.expect("get a seeded Node");
    assert_eq!(n.labels().get("role").map(String::as_str), Some("edge"));
    assert_eq!(
        api.list(&Default::default())
            .await
            .expect("list")
            .items
            .len(),
        2
    );

    let ctl = ControlClient::new(&sock);
    ctl.wait_ready(common::TIMEOUT)
        .await
        .expect("control socket");
    let stats = ctl.stats().await.expect("stats");
    assert_eq!(stats["by_client"]["127.0.0.1"]["total"], 2, "{stats}");

    signal(proc.0.id(), "TERM");
    let status = eventually("the process to exit", || {
        let r = proc.0.try_wait().ok().flatten();
        async move { r }
    })
    .await;
    assert!(status.success(), "{status:?}");
    assert!(!sock.exists(), "the control socket is removed at shutdown");
}
