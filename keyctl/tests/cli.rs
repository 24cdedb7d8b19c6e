//! The built `wgmeshctl` against the in-process Kubernetes API stand-in (`wgmesh-apiserver`),
//! with the test playing the node agents where the protocol needs one. No root needed.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::Output,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::{Value, json};
use wgmesh_api::{
    PublicKey,
    annotations::{
        ANNOTATION_KEY_CREATED, ANNOTATION_KEY_GENERATION, ANNOTATION_LISTEN_PORT,
        ANNOTATION_PUBLIC_KEY, ANNOTATION_ROTATE_REQUEST, ANNOTATION_ROTATION_STATUS,
    },
};

const ROTATION_STATUS: &str = ANNOTATION_ROTATION_STATUS;

fn key(n: u8) -> String {
    PublicKey::from_bytes([n; 32]).to_string()
}

/// A Node as the agent leaves it: key `key_annotation` (None: no agent yet), generation 1.
fn node(name: &str, n: u8, key_annotation: Option<&str>) -> Value {
    let mut annotations = serde_json::Map::new();
    if let Some(k) = key_annotation {
        annotations.insert(ANNOTATION_PUBLIC_KEY.into(), k.into());
        annotations.insert(ANNOTATION_LISTEN_PORT.into(), "51820".into());
        annotations.insert(ANNOTATION_KEY_GENERATION.into(), "1".into());
        annotations.insert(ANNOTATION_KEY_CREATED.into(), "2026-01-01T00:00:00Z".into());
    }
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name, "annotations": annotations },
        "spec": { "podCIDR": format!("198.18.{n}.0/24"), "podCIDRs": [format!("198.18.{n}.0/24")] },
        "status": { "addresses": [
            { "type": "InternalIP", "address": format!("192.0.2.{n}") },
            { "type": "Hostname", "address": name }
        ] }
    })
}

struct Cluster {
    _server: wgmesh_apiserver::ServerHandle,
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    client: Client,
}

impl Cluster {
    async fn start(nodes: Vec<Value>) -> Self {
        let server = wgmesh_apiserver::start(wgmesh_apiserver::Config {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            nodes,
            ..Default::default()
        })
        .await
        .expect("API stand-in starts");
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        wgmesh_apiserver::kubeconfig::write(
            &kubeconfig,
            &server.url().unwrap(),
            wgmesh_apiserver::kubeconfig::DEFAULT_TOKEN,
        )
        .unwrap();
        let config = kube::Config::from_custom_kubeconfig(
            Kubeconfig::read_from(&kubeconfig).unwrap(),
            &KubeConfigOptions::default(),
        )
        .await
        .unwrap();
        let client = Client::try_from(config).unwrap();
        Self {
            _server: server,
            _dir: dir,
            kubeconfig,
            client,
        }
    }

    /// Runs wgmeshctl with `--kubeconfig` and `args`.
    async fn ctl(&self, args: &[&str]) -> Output {
        let mut all = vec!["--kubeconfig", self.kubeconfig.to_str().unwrap()];
        all.extend_from_slice(args);
        wgmeshctl(&all).await
    }

    async fn annotations(&self, name: &str) -> BTreeMap<String, String> {
        let api: Api<Node> = Api::all(self.client.clone());
        api.get(name)
            .await
            .unwrap()
            .metadata
            .annotations
            .unwrap_or_default()
    }

    /// Plays the agent: publishes annotations on a Node.
    async fn publish(&self, name: &str, annotations: &[(&str, String)]) {
        let api: Api<Node> = Api::all(self.client.clone());
        let map: BTreeMap<&str, &str> = annotations.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let patch = json!({ "metadata": { "annotations": map } });
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    /// Waits until the Node carries a rotate-request, returns it.
    async fn wait_for_request(&self, name: &str) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = self.annotations(name).await.get(ANNOTATION_ROTATE_REQUEST) {
                return r.parse().unwrap();
            }
            assert!(Instant::now() < deadline, "no rotate-request on {name}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn wgmeshctl(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_wgmeshctl"))
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("RUST_LOG")
        .env("HOME", "/nonexistent")
        .kill_on_drop(true)
        .output()
        .await
        .expect("wgmeshctl runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[track_caller]
fn assert_exit(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn status_json(n: u64, state: &str, confirmed: usize, pending: &[&str]) -> String {
    json!({
        "generation": n,
        "state": state,
        "started": "2026-01-01T00:00:00Z",
        "peers_total": 2,
        "peers_confirmed": confirmed,
        "pending": pending,
        "message": if state == "failed" { "1 of 2 peers completed no handshake" } else { "" },
    })
    .to_string()
}

#[tokio::test]
async fn help_lists_examples_and_exit_codes() {
    for args in [
        vec!["--help"],
        vec!["status", "--help"],
        vec!["nodes", "--help"],
        vec!["rotate", "--help"],
        vec!["completions", "--help"],
    ] {
        let out = wgmeshctl(&args).await;
        assert_exit(&out, 0);
        let help = text(&out.stdout);
        assert!(help.contains("Examples:\n  wgmeshctl"), "{args:?}:\n{help}");
        for line in [
            "Exit codes:",
            "  0  ok",
            "  1  a check failed",
            "  2  usage error",
            "  3  refused",
            "  4  timed out",
        ] {
            assert!(help.contains(line), "{args:?} lacks {line:?}:\n{help}");
        }
    }
    let out = wgmeshctl(&["rotate"]).await;
    assert_exit(&out, 2);
    assert!(
        text(&out.stderr).contains("--node"),
        "{}",
        text(&out.stderr)
    );

    let out = wgmeshctl(&["completions", "bash"]).await;
    assert_exit(&out, 0);
    assert!(text(&out.stdout).contains("wgmeshctl"));
}

#[tokio::test]
async fn works_as_a_kubectl_plugin() {
    // kubectl runs `kubectl-wgmesh` from PATH with the arguments after `kubectl wgmesh`.
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("kubectl-wgmesh");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_wgmeshctl"), &plugin).unwrap();
    let c = Cluster::start(vec![node("node-a", 1, Some(&key(1)))]).await;
    let out = tokio::process::Command::new(&plugin)
        .args(["nodes", "-o", "json"])
        .env("KUBECONFIG", &c.kubeconfig)
        .output()
        .await
        .unwrap();
    assert_exit(&out, 0);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["nodes"][0]["name"], "node-a");
    let out = tokio::process::Command::new(&plugin)
        .arg("--help")
        .output()
        .await
        .unwrap();
    assert!(
        text(&out.stdout).contains("Usage: kubectl wgmesh [OPTIONS] <COMMAND>"),
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test]
async fn nodes_reports_malformed_and_duplicate_keys() {
    let c = Cluster::start(vec![
        node("node-a", 1, Some(&key(1))),
        node("node-b", 2, Some(&key(1))),
        node("node-c", 3, Some("not-a-key")),
        node("node-d", 4, Some(&key(4))),
        node("node-e", 5, None),
    ])
    .await;

    let out = c.ctl(&["nodes"]).await;
    assert_exit(&out, 0);
    let table = text(&out.stdout);
    let line = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing:\n{table}"))
            .to_owned()
    };
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        line("node-a").contains("also published by node-b"),
        "{table}"
    );
    assert!(
        line("node-b").contains("also published by node-a"),
        "{table}"
    );
    assert!(
        line("node-c").contains("malformed v1.wgmesh.io/public-key"),
        "{table}"
    );
    assert!(
        line("node-d").ends_with('-'),
        "no problem on node-d:\n{table}"
    );
    assert!(line("node-d").contains("192.0.2.4:51820"), "{table}");
    assert!(
        line("node-e").contains("no v1.wgmesh.io/public-key"),
        "{table}"
    );
    assert!(
        text(&out.stderr).contains("4 node(s) with problems"),
        "{}",
        text(&out.stderr)
    );

    let out = c.ctl(&["nodes", "--check"]).await;
    assert_exit(&out, 1);

    let out = c.ctl(&["nodes", "-o", "json"]).await;
    assert_exit(&out, 0);
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["nodes_with_problems"], 4);
    assert_eq!(v["nodes"][3]["name"], "node-d");
    assert_eq!(v["nodes"][3]["problems"], json!([]));
    assert_eq!(v["nodes"][3]["fingerprint"], key(4)[..8]);
    assert_eq!(v["nodes"][3]["rotation"]["state"], "idle");

    // The environment variable works as the flag does.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_wgmeshctl"))
        .args(["nodes", "--check"])
        .env("KUBECONFIG", &c.kubeconfig)
        .env("WGMESHCTL_OUTPUT", "json")
        .output()
        .await
        .unwrap();
    assert_exit(&out, 1);
    serde_json::from_slice::<Value>(&out.stdout).expect("JSON through WGMESHCTL_OUTPUT");
}

#[tokio::test]
async fn rotate_requests_once_and_refuses_a_pending_rotation() {
    let c = Cluster::start(vec![
        node("node-a", 1, Some(&key(1))),
        node("node-b", 2, Some(&key(2))),
    ])
    .await;

    let out = c.ctl(&["rotate", "--node", "node-a"]).await;
    assert_exit(&out, 0);
    assert_eq!(
        c.annotations("node-a").await[ANNOTATION_ROTATE_REQUEST],
        "2"
    );
    assert!(
        text(&out.stdout).contains("1 -> 2"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stdout).contains("requested"),
        "{}",
        text(&out.stdout)
    );

    let out = c.ctl(&["rotate", "--node", "node-a", "-o", "json"]).await;
    assert_exit(&out, 3);
    assert!(
        text(&out.stderr).contains("already pending"),
        "{}",
        text(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["results"][0]["result"], "refused");
    assert_eq!(
        c.annotations("node-a").await[ANNOTATION_ROTATE_REQUEST],
        "2"
    );

    // --force re-requests, never lowers.
    let out = c.ctl(&["rotate", "--node", "node-a", "--force"]).await;
    assert_exit(&out, 0);
    assert_eq!(
        c.annotations("node-a").await[ANNOTATION_ROTATE_REQUEST],
        "2"
    );

    // Once the agent completed generation 2, the next request asks for 3.
    c.publish(
        "node-a",
        &[
            (ANNOTATION_KEY_GENERATION, "2".into()),
            (ANNOTATION_PUBLIC_KEY, key(11)),
            (ROTATION_STATUS, status_json(2, "complete", 2, &[])),
        ],
    )
    .await;
    let out = c.ctl(&["rotate", "--node", "node-a"]).await;
    assert_exit(&out, 0);
    assert_eq!(
        c.annotations("node-a").await[ANNOTATION_ROTATE_REQUEST],
        "3"
    );

    // A node without an agent has nothing to rotate; an unknown node is an error.
    let c2 = Cluster::start(vec![node("node-x", 9, None)]).await;
    assert_exit(&c2.ctl(&["rotate", "--node", "node-x"]).await, 2);
    assert_exit(&c2.ctl(&["rotate", "--node", "nope"]).await, 2);
}

#[tokio::test]
async fn rotate_wait_times_out_when_nobody_rotates() {
    let c = Cluster::start(vec![node("node-a", 1, Some(&key(1)))]).await;
    let start = Instant::now();
    let out = c
        .ctl(&["rotate", "--node", "node-a", "--wait", "--timeout", "3s"])
        .await;
    assert_exit(&out, 4);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(8),
        "{took:?}"
    );
    assert!(
        text(&out.stderr).contains("timed out"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("timed out"),
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test]
async fn rotate_wait_follows_the_agent_to_completion() {
    let c = Cluster::start(vec![node("node-a", 1, Some(&key(1)))]).await;
    let kubeconfig = c.kubeconfig.clone();
    let ctl = tokio::spawn(async move {
        wgmeshctl(&[
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "rotate",
            "--node",
            "node-a",
            "--wait",
            "--timeout",
            "20s",
            "-o",
            "json",
        ])
        .await
    });
    // The agent: picks up the request, switches keys, reports peers confirming one by one.
    let requested = c.wait_for_request("node-a").await;
    assert_eq!(requested, 2);
    c.publish(
        "node-a",
        &[
            (ANNOTATION_PUBLIC_KEY, key(21)),
            (ANNOTATION_KEY_GENERATION, "2".into()),
            (
                ROTATION_STATUS,
                status_json(2, "in-progress", 0, &["node-b", "node-c"]),
            ),
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    c.publish(
        "node-a",
        &[(
            ROTATION_STATUS,
            status_json(2, "in-progress", 1, &["node-c"]),
        )],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    c.publish(
        "node-a",
        &[(ROTATION_STATUS, status_json(2, "complete", 2, &[]))],
    )
    .await;
    let out = ctl.await.unwrap();
    assert_exit(&out, 0);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("requested key generation 2 (current 1)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("peer node-b confirmed the new key (1/2)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("peer node-c confirmed the new key (2/2)"),
        "{stderr}"
    );
    assert!(stderr.contains("complete"), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["schema_version"], 1);
    let r = &v["results"][0];
    assert_eq!(r["result"], "complete");
    assert_eq!(r["previous_generation"], 1);
    assert_eq!(r["requested_generation"], 2);
    assert_eq!(r["peers_confirmed"], 2);
}

#[tokio::test]
async fn rotate_wait_reports_a_failed_rotation() {
    let c = Cluster::start(vec![node("node-a", 1, Some(&key(1)))]).await;
    let kubeconfig = c.kubeconfig.clone();
    let ctl = tokio::spawn(async move {
        wgmeshctl(&[
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "rotate",
            "--node",
            "node-a",
            "--wait",
            "--timeout",
            "20s",
        ])
        .await
    });
    c.wait_for_request("node-a").await;
    c.publish(
        "node-a",
        &[
            (ANNOTATION_KEY_GENERATION, "2".into()),
            (ROTATION_STATUS, status_json(2, "failed", 1, &["node-c"])),
        ],
    )
    .await;
    let out = ctl.await.unwrap();
    assert_exit(&out, 1);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("failed") && stdout.contains("1/2"),
        "{stdout}"
    );
    assert!(
        text(&out.stderr).contains("peers completed no handshake"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn rotate_all_goes_one_node_at_a_time() {
    let c = Cluster::start(vec![
        node("node-a", 1, Some(&key(1))),
        node("node-b", 2, Some(&key(2))),
        node("node-c", 3, Some(&key(3))),
        node("node-x", 9, None),
    ])
    .await;
    let kubeconfig = c.kubeconfig.clone();
    let ctl = tokio::spawn(async move {
        wgmeshctl(&[
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "rotate",
            "--all",
            "--timeout",
            "20s",
            "-o",
            "json",
        ])
        .await
    });
    // Agents that complete any request, checking that never two are pending at once.
    let mut done = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while done.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "rotations not all requested: {done:?}"
        );
        let mut pending = Vec::new();
        for name in ["node-a", "node-b", "node-c"] {
            let a = c.annotations(name).await;
            if a.get(ANNOTATION_ROTATE_REQUEST).map(String::as_str) == Some("2")
                && a[ANNOTATION_KEY_GENERATION] == "1"
            {
                pending.push(name);
            }
        }
        assert!(
            pending.len() <= 1,
            "more than one rotation at a time: {pending:?}"
        );
        if let Some(name) = pending.first() {
            c.publish(
                name,
                &[
                    (ANNOTATION_KEY_GENERATION, "2".into()),
                    (ROTATION_STATUS, status_json(2, "complete", 2, &[])),
                ],
            )
            .await;
            done.insert(name.to_string(), Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = ctl.await.unwrap();
    assert_exit(&out, 0);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let results: Vec<(String, String)> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["node"].as_str().unwrap().to_owned(),
                r["result"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("node-a", "complete"),
        ("node-b", "complete"),
        ("node-c", "complete"),
        ("node-x", "skipped"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(results, want);

    // Now every node has generation 2 and no pending request: a node with one pending refuses
    // the whole run before anything is written.
    c.publish("node-b", &[(ANNOTATION_ROTATE_REQUEST, "3".into())])
        .await;
    let out = c.ctl(&["rotate", "--all"]).await;
    assert_exit(&out, 3);
    assert_eq!(
        c.annotations("node-a").await[ANNOTATION_ROTATE_REQUEST],
        "2"
    );
    assert!(
        text(&out.stdout).contains("not started"),
        "{}",
        text(&out.stdout)
    );
}

/// Serves one fixed `/status` document (a stand-in for the agent's endpoint) until the test
/// process ends.
fn fake_agent(doc: String) -> String {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{doc}",
                doc.len()
            );
        }
    });
    addr
}

#[tokio::test]
async fn status_uses_the_agent_s_device_reading_when_it_cannot_read_the_device() {
    let own = PublicKey::from_bytes([1; 32]);
    let c = Cluster::start(vec![
        node("node-a", 1, Some(&own.to_string())),
        node("node-b", 2, Some(&key(2))),
        node("node-c", 3, Some(&key(3))),
    ])
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let agent = fake_agent(
        json!({
            "schema_version": 1, "node": "node-a", "interface": "wgmesh0", "backend": "kernel",
            "public_key": own.to_string(), "key_generation": 1, "listen_port": 51820, "mtu": 1420,
            "synced": true, "desired_peers": [], "skipped_nodes": [],
            "datapath": { "attach_mode": "tcx", "attached": [], "remote_cidrs": [],
                          "local_cidrs": [], "counters": { "steered": 3 } },
            "last_reconcile": null,
            "device": {
                "public_key": own.to_string(), "listen_port": 51820, "fwmark": 0,
                "peers": [
                    { "node": "node-b", "public_key": key(2), "endpoint": "192.0.2.2:51820",
                      "allowed_ips": ["198.18.2.0/24"], "latest_handshake": now - 5,
                      "rx_bytes": 10, "tx_bytes": 20, "persistent_keepalive": 25 },
                    { "node": null, "public_key": key(33), "endpoint": "192.0.2.3:51820",
                      "allowed_ips": ["198.18.3.0/24"], "latest_handshake": null,
                      "rx_bytes": 0, "tx_bytes": 0, "persistent_keepalive": 25 }
                ]
            }
        })
        .to_string(),
    );
    let dir = tempfile::tempdir().unwrap();
    let pins = dir.path().join("pins");
    let args = [
        "status",
        "--interface",
        "wgkc-absent0",
        "--status-addr",
        &agent,
        "--bpffs-dir",
        pins.to_str().unwrap(),
    ];
    let out = c.ctl(&args).await;
    assert_exit(&out, 0);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("showing the agent's reading of the device"),
        "{stderr}"
    );
    let table = text(&out.stdout);
    assert!(
        table.contains("Interface:   wgkc-absent0 (kernel)"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("node-b") && l.ends_with("ok")),
        "{table}"
    );

    let mut json_args = args.to_vec();
    json_args.extend(["--check", "-o", "json"]);
    let out = c.ctl(&json_args).await;
    assert_exit(&out, 1);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["device_source"], "agent");
    assert_eq!(v["backend"], "kernel");
    assert_eq!(v["node"], "node-a");
    assert_eq!(v["peer_names_from"], "nodes");
    assert_eq!(v["datapath"]["source"], "agent");
    let verdicts: Vec<(String, String)> = v["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["node"].as_str().unwrap().to_owned(),
                p["verdict"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        verdicts,
        [
            ("node-b".to_owned(), "ok".to_owned()),
            ("node-c".to_owned(), "key_mismatch".to_owned()),
            ("node-c".to_owned(), "missing".to_owned()),
        ]
    );
    assert_eq!(v["healthy"], false);
}

#[tokio::test]
async fn runtime_errors_exit_2() {
    // An API nobody serves.
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let kubeconfig = dir.path().join("kubeconfig");
    wgmesh_apiserver::kubeconfig::write(&kubeconfig, &format!("http://127.0.0.1:{port}"), "t")
        .unwrap();
    let out = wgmeshctl(&["--kubeconfig", kubeconfig.to_str().unwrap(), "nodes"]).await;
    assert_exit(&out, 2);
    assert!(
        text(&out.stderr).contains("cannot list Nodes"),
        "{}",
        text(&out.stderr)
    );

    // A context the kubeconfig does not have.
    let c = Cluster::start(vec![]).await;
    assert_exit(&c.ctl(&["nodes", "--context", "wgmesh-apiserver"]).await, 0);
    assert_exit(&c.ctl(&["nodes", "--context", "nope"]).await, 2);

    // No WireGuard device of that name: status cannot say anything.
    let out = c
        .ctl(&[
            "status",
            "--interface",
            "wgmt-none0",
            "--status-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .await;
    assert_exit(&out, 2);
    assert!(
        text(&out.stderr).contains("cannot read WireGuard interface wgmt-none0"),
        "{}",
        text(&out.stderr)
    );
}
