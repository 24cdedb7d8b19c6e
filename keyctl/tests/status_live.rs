//! `wgmeshctl status` against two live userspace WireGuard devices (boringtun, as the agent runs
//! it) that complete a real handshake over loopback, the API stand-in and a stand-in for the
//! agent's status endpoint.
//!
//! Needs root (TUN devices) and a private network and mount namespace, so it is `#[ignore]`d:
//!
//! ```sh
//! unshare -n -m sh -c 'mount -t sysfs none /sys && ip link set lo up &&
//!   cargo test -p wgmesh-keyctl --test status_live -- --ignored'
//! ```
//!
//! The UAPI sockets live in /var/run/wireguard, shared with the host: the interface names are
//! unique to this test.

use std::{
    io::{Read as _, Write as _},
    process::Output,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use wgmesh::{
    keys::PrivateKey,
    mesh::PeerSpec,
    wireguard::{WgDevice as _, device, uapi::UapiDevice},
};
use wgmesh_api::{
    PublicKey,
    annotations::{
        ANNOTATION_KEY_CREATED, ANNOTATION_KEY_GENERATION, ANNOTATION_LISTEN_PORT,
        ANNOTATION_PUBLIC_KEY,
    },
};

const IF_A: &str = "wgkc-live-a";
const IF_B: &str = "wgkc-live-b";

/// Node `name`, InternalIP 127.0.0.`n` (every loopback address reaches the devices), pod CIDR
/// 198.18.`n`.0/24.
fn node(name: &str, n: u8, key: &PublicKey, port: u16) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name, "annotations": {
            ANNOTATION_PUBLIC_KEY: key.to_string(),
            ANNOTATION_LISTEN_PORT: port.to_string(),
            ANNOTATION_KEY_GENERATION: "1",
            ANNOTATION_KEY_CREATED: "2026-01-01T00:00:00Z",
        } },
        "spec": { "podCIDRs": [format!("198.18.{n}.0/24")] },
        "status": { "addresses": [{ "type": "InternalIP", "address": format!("127.0.0.{n}") }] }
    })
}

fn peer(node: &str, key: PublicKey, endpoint: &str, cidr: &str) -> PeerSpec {
    PeerSpec {
        node: node.into(),
        public_key: key,
        endpoint: endpoint.parse().unwrap(),
        allowed_ips: vec![cidr.parse().unwrap()],
        keepalive: 1,
    }
}

/// Serves one fixed `/status` document until the process ends.
fn fake_agent(doc: String) -> String {
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

async fn wgmeshctl(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_wgmeshctl"))
        .args(args)
        .env_remove("KUBECONFIG")
        .env("HOME", "/nonexistent")
        .output()
        .await
        .unwrap()
}

fn verdicts(v: &Value) -> Vec<(String, String)> {
    v["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["node"].as_str().unwrap_or("?").to_owned(),
                p["verdict"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "root in a private netns: see the file's doc comment"]
async fn status_judges_live_userspace_peers() {
    for ifname in [IF_A, IF_B] {
        let ifname = ifname.to_owned();
        std::thread::spawn(move || device::run(&ifname, 1).expect("userspace device runs"));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(UapiDevice::new(IF_A).is_alive() && UapiDevice::new(IF_B).is_alive()) {
        assert!(Instant::now() < deadline, "devices did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (key_a, key_b) = (
        PrivateKey::generate().unwrap(),
        PrivateKey::generate().unwrap(),
    );
    let (pub_a, pub_b) = (key_a.public_key(), key_b.public_key());
    let (old_c, new_c, key_d, stranger) = (
        PublicKey::from_bytes([7; 32]),
        PublicKey::from_bytes([9; 32]),
        PublicKey::from_bytes([10; 32]),
        PublicKey::from_bytes([8; 32]),
    );
    let mut a = UapiDevice::new(IF_A);
    let mut b = UapiDevice::new(IF_B);
    a.set_identity(&key_a, 51901).unwrap();
    b.set_identity(&key_b, 51902).unwrap();
    a.add_peer(&peer("b", pub_b, "127.0.0.2:51902", "198.18.2.0/24"))
        .unwrap();
    b.add_peer(&peer("a", pub_a, "127.0.0.1:51901", "198.18.1.0/24"))
        .unwrap();
    // On a: node c's key from before its rotation, and a peer nobody knows.
    a.add_peer(&peer("c", old_c, "127.0.0.3:51903", "198.18.3.0/24"))
        .unwrap();
    a.add_peer(&peer("?", stranger, "127.0.0.99:51999", "203.0.113.0/24"))
        .unwrap();

    let server = wgmesh_apiserver::start(wgmesh_apiserver::Config {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        nodes: vec![
            node("a", 1, &pub_a, 51901),
            node("b", 2, &pub_b, 51902),
            node("c", 3, &new_c, 51903),
            node("d", 4, &key_d, 51904),
        ],
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    wgmesh_apiserver::kubeconfig::write(&kubeconfig, &server.url().unwrap(), "t").unwrap();
    let kubeconfig = kubeconfig.to_str().unwrap().to_owned();
    let agent = fake_agent(
        json!({
            "schema_version": 1, "node": "a", "interface": IF_A, "backend": "userspace",
            "public_key": pub_a.to_string(), "key_generation": 1, "listen_port": 51901,
            "mtu": 1420, "synced": true,
            "desired_peers": [{ "node": "b", "public_key": pub_b.to_string(),
                                "endpoint": "127.0.0.2:51902", "allowed_ips": ["198.18.2.0/24"] }],
            "skipped_nodes": [],
            "datapath": { "attach_mode": "tcx", "attached": [], "remote_cidrs": [],
                          "local_cidrs": [], "counters": { "steered": 3 } },
            "last_reconcile": null
        })
        .to_string(),
    );
    let nobody = "127.0.0.1:1";
    let common = |status_addr: &str| {
        vec![
            "--interface".to_owned(),
            IF_A.to_owned(),
            "--status-addr".to_owned(),
            status_addr.to_owned(),
            "--bpffs-dir".to_owned(),
            dir.path().join("no-pins").display().to_string(),
            "--api-timeout".to_owned(),
            "2s".to_owned(),
        ]
    };
    let run = |mut args: Vec<String>, status_addr: &str| {
        args.extend(common(status_addr));
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            wgmeshctl(&refs).await
        }
    };

    // Wait for the real handshake between a and b (keepalive 1 s starts it).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = run(
            vec![
                "--kubeconfig".into(),
                kubeconfig.clone(),
                "status".into(),
                "-o".into(),
                "json".into(),
            ],
            &agent,
        )
        .await;
        let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
        if v["peers"][0]["verdict"] == "ok" {
            break;
        }
        assert!(Instant::now() < deadline, "no handshake: {v:#}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Everything up: names from the Nodes; --check fails on the bad peers.
    let out = run(
        vec![
            "--kubeconfig".into(),
            kubeconfig.clone(),
            "status".into(),
            "--check".into(),
            "-o".into(),
            "json".into(),
        ],
        &agent,
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["node"], "a");
    assert_eq!(v["backend"], "userspace");
    assert_eq!(v["listen_port"], 51901);
    assert_eq!(v["public_key"], pub_a.to_string());
    assert_eq!(v["peer_count"], 3);
    assert_eq!(v["agent"]["ready"], true);
    assert_eq!(v["peer_names_from"], "nodes");
    assert_eq!(v["datapath"]["source"], "agent");
    assert!(v["mtu"].as_u64().is_some(), "{v:#}");
    assert_eq!(
        verdicts(&v),
        pairs(&[
            ("b", "ok"),
            ("c", "key_mismatch"),
            ("c", "missing"),
            ("d", "missing"),
            ("?", "unknown_peer"),
        ])
    );
    assert!(v["peers"][0]["rx_bytes"].as_u64().unwrap() > 0);
    assert!(
        !v.to_string().contains(&*key_a.to_base64()),
        "no private key"
    );

    // The table.
    let out = run(
        vec!["--kubeconfig".into(), kubeconfig.clone(), "status".into()],
        &agent,
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        table.contains(&format!("Interface:   {IF_A} (userspace)")),
        "{table}"
    );
    assert!(table.contains("Agent:       yes"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("b ") && l.ends_with("ok")),
        "{table}"
    );

    // The agent down: a warning, the same verdicts.
    let out = run(
        vec![
            "--kubeconfig".into(),
            kubeconfig.clone(),
            "status".into(),
            "-o".into(),
            "json".into(),
        ],
        nobody,
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the agent is unreachable"));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["agent"]["reachable"], false);
    assert_eq!(v["node"], "a", "found by its published key");
    assert_eq!(verdicts(&v).len(), 5);

    // The API down: the agent names the peers it wants.
    drop(server);
    let out = run(
        vec![
            "--kubeconfig".into(),
            kubeconfig.clone(),
            "status".into(),
            "-o".into(),
            "json".into(),
        ],
        &agent,
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Kubernetes API is unreachable"));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["peer_names_from"], "agent");
    // Only b is in the agent's view: c's old key is a stranger now.
    assert_eq!(
        verdicts(&v),
        pairs(&[("b", "ok"), ("?", "unknown_peer"), ("?", "unknown_peer")])
    );

    // Both down: the device alone.
    let out = run(
        vec![
            "--kubeconfig".into(),
            kubeconfig.clone(),
            "status".into(),
            "-o".into(),
            "json".into(),
        ],
        nobody,
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["peer_names_from"], "none");
    assert_eq!(v["peer_count"], 3);

    device::stop(IF_A);
    device::stop(IF_B);
}
