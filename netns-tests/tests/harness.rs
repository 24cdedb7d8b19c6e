//! Self-test of the harness, no agent needed: a plain host-gw cluster in namespaces, the
//! baseline that wgmesh must fix. If these fail, no scenario result means anything.

use std::{collections::BTreeSet, path::PathBuf};

use wgmesh_netns_tests::prelude::*;

const PROBE: &str = env!("CARGO_BIN_EXE_wgmesh-probe");

/// Two nodes, no agents, no API stand-in: a1 and a2 on node a, b1 on node b.
fn two_nodes(label: &str) -> Result<Testbed> {
    Testbed::builder(label)
        .without_apiserver()
        .probe_bin(PROBE)
        .node("a", |n| n.pod("a1").pod("a2"))
        .node("b", |n| n.pod("b1"))
        .start()
}

/// Given two nodes with host-gw CNI routes and no wgmesh,
/// when pods ping a pod on the same node and on the other node,
/// then every ping is answered.
#[test]
#[ignore = "needs root + netns: run `make netns-test`"]
fn pods_reach_each_other_over_cni_routes() -> TestResult {
    let bed = two_nodes("cni-routes")?;
    bed.pod("a1")
        .ping(&bed.pod("a2"), 3)?
        .assert_no_loss()
        .context("same node")?;
    bed.pod("a1")
        .ping(&bed.pod("b1"), 3)?
        .assert_no_loss()
        .context("cross node")?;
    bed.pod("b1")
        .ping(&bed.node("a"), 1)?
        .assert_no_loss()
        .context("pod to remote node")?;

    let a = bed.node("a");
    ensure!(
        a.netns().sysctl("net/ipv4/ip_forward")? == "1",
        "ip_forward not set on a"
    );
    ensure!(
        a.netns().sysctl("net/ipv4/conf/eth0/rp_filter")? == "0",
        "rp_filter not off on a"
    );
    let routes = a.ip(["route"])?;
    ensure!(
        routes.contains("198.18.2.0/24 via 192.0.2.12 dev eth0"),
        "no host-gw route on a:\n{routes}"
    );
    Ok(())
}

/// Given two nodes without wgmesh,
/// when a1 pings b1 while the underlay is captured,
/// then the capture counts the pod packets as plaintext (so the encryption scenarios can fail)
/// and same-node traffic does not appear on the underlay at all.
#[test]
#[ignore = "needs root + netns: run `make netns-test`"]
fn capture_sees_cross_node_pod_traffic_as_plaintext() -> TestResult {
    let bed = two_nodes("capture-plain")?;

    let capture = bed.capture()?;
    bed.pod("a1").ping(&bed.pod("a2"), 3)?.assert_no_loss()?;
    let same_node = capture.stop()?;
    same_node
        .assert_no_plaintext()
        .context("same-node traffic leaked onto the underlay")?;

    let capture = bed.capture()?;
    bed.pod("a1").ping(&bed.pod("b1"), 3)?.assert_no_loss()?;
    let summary = capture.stop()?;
    ensure!(
        summary.plaintext_pod_packets() >= 6,
        "expected 3 requests + 3 replies in clear: {summary}"
    );
    ensure!(
        summary.wireguard_packets() == 0,
        "no WireGuard without agents: {summary}"
    );
    let err = summary
        .assert_no_plaintext()
        .expect_err("plaintext must be detected");
    ensure!(
        format!("{err:#}").contains("198.18.1.11 > 198.18.2.11"),
        "offender not listed: {err:#}"
    );
    Ok(())
}

/// Given two nodes without wgmesh,
/// when a long-lived TCP stream runs from a1 to b1,
/// then it carries data, and stopping it reports every chunk echoed and no reset.
#[test]
#[ignore = "needs root + netns: run `make netns-test`"]
fn tcp_stream_reports_an_intact_connection() -> TestResult {
    let bed = two_nodes("tcp-stream")?;
    let stream = bed.pod("a1").tcp_stream_to(&bed.pod("b1"), 5001)?;
    stream.assert_flowing(20_000, Duration::from_secs(10))?;
    let report = stream.stop()?;
    report.assert_intact()?;
    ensure!(
        report.bytes_received > 20_000 && report.bytes_received == report.bytes_sent,
        "{report:?}"
    );
    ensure!(
        report.max_stall_ms < 2_000,
        "stalled without any disruption: {report:?}"
    );
    Ok(())
}

/// Given a TCP stream from a1 to b1,
/// when b1's pod namespace disappears,
/// then the stream reports that it broke (so a broken connection cannot pass as intact).
#[test]
#[ignore = "needs root + netns: run `make netns-test`"]
fn tcp_stream_notices_a_broken_connection() -> TestResult {
    let bed = two_nodes("tcp-broken")?;
    let stream = bed.pod("a1").tcp_stream_to(&bed.pod("b1"), 5002)?;
    stream.assert_flowing(5_000, Duration::from_secs(10))?;
    // Killing the echo server closes (FIN/RST) the connection.
    bed.pod("b1").netns().kill_all()?;
    let report = stream.stop()?;
    ensure!(
        !report.is_intact(),
        "a killed peer must break the stream: {report:?}"
    );
    Ok(())
}

/// Given two nodes without wgmesh,
/// when pods exchange UDP datagrams and TCP requests,
/// then the helpers deliver and report them.
#[test]
#[ignore = "needs root + netns: run `make netns-test`"]
fn udp_and_tcp_helpers_deliver() -> TestResult {
    let bed = two_nodes("udp-tcp")?;
    bed.pod("a1").udp_send(&bed.pod("b1"), 9000, b"hello")?;
    bed.pod("b1").expect_udp(9000, b"hello")?;

    let ping = bed.pod("b1").udp_ping(&bed.pod("a2"), 9001, 20)?;
    ensure!(
        ping.sent == 20 && ping.received == 20 && ping.lost == 0,
        "{ping:?}"
    );

    let reply = bed
        .pod("a2")
        .tcp_request(&bed.pod("b1"), 9002, "hi there")?;
    ensure!(reply == "hi there", "echo was {reply:?}");

    let flood = bed.pod("a1").ping_flood(
        &bed.pod("b1"),
        Duration::from_millis(20),
        Duration::from_secs(1),
    );
    let flood = flood.wait()?;
    ensure!(flood.transmitted >= 40 && flood.lost() == 0, "{flood:?}");
    Ok(())
}

/// Given a running two-node testbed,
/// when a node is added (with a pod) and pods are added to running nodes,
/// then they are reachable over the CNI routes; and when the node is removed its routes go.
#[test]
#[ignore = "needs root + netns: run `make netns-test`"]
fn nodes_and_pods_can_join_and_leave() -> TestResult {
    let bed = two_nodes("join-leave")?;
    let c = bed.add_node("c", |n| n.pod("c1"))?;
    assert_eq!(c.underlay_ip().to_string(), "192.0.2.13");
    bed.pod("a1").ping(&bed.pod("c1"), 2)?.assert_no_loss()?;
    let b2 = bed.node("b").add_pod("b2")?;
    assert_eq!(b2.ip().to_string(), "198.18.2.12");
    bed.pod("c1").ping(&b2, 2)?.assert_no_loss()?;

    bed.remove_node("c")?;
    let routes = bed.node("a").ip(["route"])?;
    ensure!(
        !routes.contains("198.18.3.0/24"),
        "route to the removed node remains:\n{routes}"
    );
    ensure!(bed.try_pod("c1").is_none(), "pod c1 still listed");
    bed.node("b").remove_pod("b2")?;
    ensure!(
        !bed.node("b").ip(["route"])?.contains("198.18.2.12"),
        "route to the removed pod remains"
    );
    Ok(())
}

fn netns_names() -> Result<BTreeSet<String>> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

/// Given a testbed with running helper processes and mounted bpffs,
/// when it is dropped,
/// then no namespace, mount, process or temp file of it remains.
#[test]
#[ignore = "needs root + netns: run `make netns-test`"]
fn teardown_leaves_nothing_behind() -> TestResult {
    let bed = two_nodes("teardown")?;
    let prefix = bed.prefix().to_owned();
    let dir: PathBuf = bed.dir().to_owned();
    let server = bed.pod("b1").serve_tcp_echo(7777)?;
    let ours: BTreeSet<String> = netns_names()?
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    ensure!(
        ours.len() == 6,
        "expected underlay + 2 nodes + 3 pods, got {ours:?}"
    );
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    ensure!(
        mounts.contains(&dir.join("a/bpffs").display().to_string()),
        "bpffs of a not mounted"
    );
    let pids = bed.pod("b1").netns().pids()?;
    ensure!(!pids.is_empty(), "the echo server should run in b1");
    // The server handle outlives the testbed on purpose: teardown must not depend on it.
    drop(bed);

    let left: Vec<String> = netns_names()?
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    let dir_s = dir.display().to_string();
    ensure!(!mounts.contains(&dir_s), "mounts left behind under {dir_s}");
    ensure!(
        !mounts.contains(&prefix),
        "netns mounts left behind for {prefix}"
    );
    for pid in pids {
        // Killed but not yet reaped (its handle `server` still lives) shows as a zombie.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next());
        ensure!(
            matches!(state, None | Some("Z" | "X")),
            "process {pid} survived teardown: {stat}"
        );
    }
    ensure!(!dir.exists(), "temp dir {dir_s} left behind");
    drop(server);
    Ok(())
}

/// Given a testbed with the API stand-in and two nodes (no agents),
/// when the test reads and patches Node objects through the control socket,
/// then the testbed registered each node like a kubelet, annotations can be set and removed,
/// the nodes reach the API at 192.0.2.1:6443 the way agents will, and a removed node's
/// object is deleted.
#[test]
#[ignore = "needs root + netns: run `make netns-test`"]
fn testbed_registers_nodes_with_the_api_stand_in() -> TestResult {
    let bed = Testbed::builder("api")
        .agents(false)
        .probe_bin(PROBE)
        .node("a", |n| n.pod("a1"))
        .node("b", |n| n.pod("b1"))
        .start()?;
    let api = bed.api()?;
    let node = api.get_node("a")?;
    ensure!(
        node["status"]["addresses"][0]["address"] == "192.0.2.11",
        "{node:#}"
    );
    ensure!(node["spec"]["podCIDR"] == "198.18.1.0/24", "{node:#}");
    ensure!(
        node["metadata"]["labels"]["kubernetes.io/hostname"] == "a",
        "{node:#}"
    );

    api.patch_node_annotations("a", &[("wgmesh.io/test", Some("1"))])?;
    ensure!(
        api.node_annotations("a")?
            .get("wgmesh.io/test")
            .map(String::as_str)
            == Some("1")
    );
    api.patch_node_annotations("a", &[("wgmesh.io/test", None)])?;
    ensure!(!api.node_annotations("a")?.contains_key("wgmesh.io/test"));

    // The agents' path: TCP from a node namespace to the underlay address.
    let get_from_b = || -> Result<serde_json::Value> {
        let out = bed
            .node("b")
            .cmd(PROBE)
            .args([
                "http-get",
                "--timeout",
                "2000",
                "http://192.0.2.1:6443/api/v1/nodes",
            ])
            .run()?;
        Ok(serde_json::from_str(&out)?)
    };
    let list = get_from_b()?;
    ensure!(
        list["items"].as_array().map(Vec::len) == Some(2),
        "{list:#}"
    );

    // Faults hit the agents' TCP clients, not the test's control socket.
    api.fail(500, 1, Some("list"))?;
    ensure!(get_from_b().is_err(), "the injected failure did not fire");
    get_from_b().context("only one failure was injected")?;
    api.get_node("a")
        .context("the control socket is not affected")?;

    api.down()?;
    ensure!(get_from_b().is_err(), "the API answered while down");
    api.up()?;
    bed.eventually("the API answers again after up", get_from_b)?;
    api.compact()?;
    ensure!(api.stats()?.is_object(), "stats are JSON");

    bed.remove_node("b")?;
    ensure!(api.get_node("b").is_err(), "Node b still exists");
    Ok(())
}

/// Given two nodes running the real agent (`WGMESH_AGENT_BIN`),
/// when the harness queries, restarts and kills the agents,
/// then status and `wg show` are readable, the mesh converges, and teardown removes the
/// detached device processes, their UAPI sockets and the bpffs mounts.
#[test]
#[ignore = "needs root + netns + WGMESH_AGENT_BIN: run `make netns-test`"]
fn agent_plumbing_and_teardown() -> TestResult {
    let bed = Testbed::builder("agent-plumbing")
        .probe_bin(PROBE)
        .node("a", |n| n.pod("a1"))
        .node("b", |n| n.pod("b1"))
        .start()?;
    bed.eventually("the mesh converges", || bed.assert_full_mesh())?;
    let a = bed.node("a");
    let status = bed.eventually("the agent on a serves /status", || a.status())?;
    ensure!(status.is_object(), "{status}");
    let dump = a.wg_show_dump()?;
    ensure!(
        dump.interface.listen_port == 51820 && dump.peers.len() == 1,
        "{dump:?}"
    );

    a.restart_agent(Signal::SIGTERM)?;
    a.assert_agent_running()?;
    a.stop_agent(Signal::SIGKILL)?;
    ensure!(!a.agent_running(), "SIGKILL did not stop the agent");
    ensure!(
        a.agent_log().contains("stopping the agent with SIGKILL"),
        "agent.log lacks the harness markers"
    );
    a.start_agent()?;
    bed.eventually("the mesh converges after the restarts", || {
        bed.assert_full_mesh()
    })?;

    let socks: Vec<PathBuf> = bed
        .nodes()
        .iter()
        .map(|n| PathBuf::from(format!("/var/run/wireguard/{}.sock", n.wg_interface())))
        .collect();
    let prefix = bed.prefix().to_owned();
    let dir = bed.dir().to_owned();
    drop(bed);
    for s in &socks {
        ensure!(!s.exists(), "{} left behind", s.display());
    }
    let left: Vec<String> = netns_names()?
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    ensure!(
        !std::fs::read_to_string("/proc/mounts")?.contains(&dir.display().to_string()),
        "bpffs left mounted"
    );
    Ok(())
}

/// Given a testbed,
/// when the test panics while it is alive,
/// then the unwinding drop dumps diagnostics and still removes every namespace.
#[test]
#[ignore = "needs root + netns: run `make netns-test`"]
fn teardown_runs_when_a_test_panics() -> TestResult {
    let prefix = std::sync::Mutex::new(String::new());
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let bed = two_nodes("panic").expect("testbed starts");
        *prefix.lock().expect("lock") = bed.prefix().to_owned();
        let dump = bed.dump_string();
        assert!(
            dump.contains("a: ip route") && dump.contains("198.18.2.0/24 via 192.0.2.12"),
            "{dump}"
        );
        panic!("deliberate failure inside a scenario");
    }));
    ensure!(r.is_err(), "the closure was meant to panic");
    let prefix = prefix.into_inner()?;
    ensure!(!prefix.is_empty(), "testbed never started");
    let left: Vec<String> = netns_names()?
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    ensure!(
        left.is_empty(),
        "namespaces left behind after a panic: {left:?}"
    );
    Ok(())
}
