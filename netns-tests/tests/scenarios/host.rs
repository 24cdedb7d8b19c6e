//! Host encryption: a node's own traffic to pods on other nodes, and pods' traffic to other nodes'
//! addresses, go through the tunnel between nodes that both publish `v1.wgmesh.io/host-addresses`;
//! a node that opts out keeps working in the clear; node-to-node traffic never enters the tunnel.

use std::net::SocketAddr;

use ipnet::IpNet;

use wgmesh_netns_tests::prelude::*;

use crate::support::{bed, converged, counter, wgmeshctl_ok};

const HOST_ADDRESSES: &str = "v1.wgmesh.io/host-addresses";

/// Given nodes a and b with host encryption (the default) and node c started with
/// `--host-encryption=false`,
/// when node a itself pings b1 and sends a TCP request to b1, and b1 pings node a,
/// then all of it is answered, the wire shows WireGuard and no pod address in the clear, and a's
/// uplink guard counted no leak;
/// when node a pings c1 and c1 pings node a,
/// then that works too, in the clear (c opted out: the capture sees it, so it would have seen a
/// leak above), and the node-to-node path (a pinging node b) stays outside the tunnel;
/// and `wgmesh-agent cleanup` removes the host rule and its routes.
#[test]
#[ignore = "needs root + netns: run `make test-netns`"]
fn node_traffic_to_remote_pods_is_encrypted_between_nodes_that_both_opt_in() -> TestResult {
    let bed = bed("host-enc")
        .node("a", |n| n.pod("a1"))
        .node("b", |n| n.pod("b1"))
        .node("c", |n| {
            n.pod("c1").agent_args(["--host-encryption", "false"])
        })
        .start()?;
    converged(&bed)?;
    let api = bed.api()?;
    let (a, b, c) = (bed.node("a"), bed.node("b"), bed.node("c"));
    for n in [&a, &b] {
        bed.eventually(&format!("{} publishes its host address", n.name()), || {
            let ann = api.node_annotations(n.name())?;
            ensure!(
                ann.get(HOST_ADDRESSES) == Some(&n.underlay_ip().to_string()),
                "{HOST_ADDRESSES}: {:?}",
                ann.get(HOST_ADDRESSES)
            );
            Ok(())
        })?;
    }
    ensure!(
        !api.node_annotations("c")?.contains_key(HOST_ADDRESSES),
        "c opted out but publishes host addresses"
    );
    ensure!(
        c.status()?["host_encryption"]["enabled"] == false,
        "c's status does not show host encryption off"
    );
    bed.eventually(
        "a routes its own traffic to b's pods into the tunnel",
        || {
            let st = a.status()?;
            ensure!(
                st["host_encryption"]["peers"] == serde_json::json!(["b"]),
                "host encryption: {}",
                st["host_encryption"]
            );
            let a_host = IpNet::from(std::net::IpAddr::from(a.underlay_ip()));
            ensure!(
                b.wg_show_dump()?
                    .peers
                    .iter()
                    .any(|p| p.allowed_ips.contains(&a_host)),
                "b does not accept a's address from a's tunnel"
            );
            Ok(())
        },
    )?;
    let out = wgmeshctl_ok(&bed, &a, &["status"])?;
    ensure!(
        out.contains("Host traffic: encrypted with 1 of the peers (from 192.0.2.11, 1 routes)"),
        "wgmeshctl status:\n{out}"
    );
    let (b1, c1) = (bed.pod("b1"), bed.pod("c1"));
    let leaked = counter(&a, "leaked")?;

    let capture = bed.capture()?;
    a.ping(&b1, 5)?.assert_no_loss().context("node a -> b1")?;
    let _echo = b1.serve_tcp_echo(7600)?;
    let reply = a.tcp_request_addr(SocketAddr::new(b1.ip().into(), 7600), "from the host")?;
    ensure!(reply.reply.contains("from the host"), "tcp echo: {reply:?}");
    b1.ping(&a, 5)?.assert_no_loss().context("b1 -> node a")?;
    let summary = capture.stop()?;
    summary.assert_no_plaintext()?;
    ensure!(
        summary.wireguard.transport >= 20,
        "host traffic did not go through the tunnel: {summary}"
    );
    ensure!(
        counter(&a, "leaked")? == leaked,
        "a's uplink guard saw a's own traffic to b1 in the clear"
    );

    // Opted-out peer: plaintext, but working; and node to node stays outside the tunnel.
    let capture = bed.capture()?;
    a.ping(&c1, 3)?.assert_no_loss().context("node a -> c1")?;
    c1.ping(&a, 3)?.assert_no_loss().context("c1 -> node a")?;
    let summary = capture.stop()?;
    summary
        .assert_plaintext_seen()
        .context("traffic with the opted-out node c is in the clear, and the capture sees it")?;
    let capture = bed.capture()?;
    a.ping(&b, 5)?
        .assert_no_loss()
        .context("node a -> node b")?;
    let summary = capture.stop()?;
    ensure!(
        summary.wireguard.transport == 0,
        "node-to-node traffic went through the tunnel: {summary}"
    );

    // `wgmesh-agent cleanup` takes the host rule and its table away with the rest.
    ensure!(
        a.ip(["rule", "show"])?.contains("lookup 51821"),
        "no host rule on a"
    );
    a.stop_agent(Signal::SIGTERM)?;
    a.cleanup()?;
    let rules = a.ip(["rule", "show"])? + &a.ip(["-6", "rule", "show"])?;
    ensure!(
        !rules.contains("51821") && !rules.contains("51820"),
        "rules left after cleanup:\n{rules}"
    );
    let routes = a.ip(["route", "show", "table", "all"])?;
    ensure!(
        !routes.contains("table 51821") && !routes.contains("table 51820"),
        "routes left after cleanup:\n{routes}"
    );
    Ok(())
}
