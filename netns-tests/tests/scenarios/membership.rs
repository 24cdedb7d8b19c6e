//! Nodes join and leave: peers, eBPF maps and reachability follow the Node objects.

use wgmesh_netns_tests::prelude::*;

use crate::support::{bed, converged, flood_interval, remote_cidrs};

/// Given a running two-node mesh,
/// when a third node joins (a new Node object and a new agent),
/// then within seconds every pod reaches the new node's pod, encrypted.
#[test]
#[ignore = "needs root + netns: run `make test-netns`"]
fn node_joining_later_is_reachable_from_all_pods() -> TestResult {
    let bed = bed("join")
        .node("a", |n| n.pod("a1"))
        .node("b", |n| n.pod("b1"))
        .start()?;
    converged(&bed)?;

    bed.add_node("c", |n| n.pod("c1"))?;
    let c1 = bed.pod("c1");
    // Reachable alone proves little (the CNI route works in the clear): the new node must be
    // peered by everyone, then reachable, encrypted.
    bed.eventually_within(
        "every node peers with the new node",
        Duration::from_secs(20),
        || bed.assert_full_mesh(),
    )?;
    bed.eventually_within(
        "every pod reaches the new node's pod",
        Duration::from_secs(10),
        || {
            for p in [bed.pod("a1"), bed.pod("b1")] {
                p.ping(&c1, 1)?
                    .assert_no_loss()
                    .with_context(|| format!("{} -> c1", p.name()))?;
                c1.ping(&p, 1)?
                    .assert_no_loss()
                    .with_context(|| format!("c1 -> {}", p.name()))?;
            }
            Ok(())
        },
    )?;
    let capture = bed.capture()?;
    for p in [bed.pod("a1"), bed.pod("b1")] {
        p.ping(&c1, 3)?.assert_no_loss()?;
    }
    capture.stop()?.assert_no_plaintext()?;
    bed.assert_full_mesh()
}

/// Given a three-node mesh,
/// when node c's Node object is deleted (the node is gone),
/// then c disappears from every other node's WireGuard peers and eBPF map, and a and b still talk.
#[test]
#[ignore = "needs root + netns: run `make test-netns`"]
fn deleted_node_disappears_from_every_peer_set_and_map() -> TestResult {
    let bed = bed("leave")
        .node("a", |n| n.pod("a1"))
        .node("b", |n| n.pod("b1"))
        .node("c", |n| n.pod("c1"))
        .start()?;
    converged(&bed)?;
    let c_cidr = bed.node("c").pod_cidr().to_string();
    let c_key = bed.node("c").wg_show_dump()?.interface.public_key;

    bed.remove_node("c")?;
    for name in ["a", "b"] {
        let n = bed.node(name);
        bed.eventually(&format!("{name} forgets node c"), || {
            let dump = n.wg_show_dump()?;
            ensure!(dump.peer(&c_key).is_none(), "{name} still has a peer for c");
            ensure!(
                dump.peers.len() == 1,
                "{name} has {} peers",
                dump.peers.len()
            );
            let cidrs = remote_cidrs(&n)?;
            ensure!(
                !cidrs.contains(&c_cidr),
                "{name}'s eBPF map still steers {c_cidr}: {cidrs:?}"
            );
            Ok(())
        })?;
    }
    bed.pod("a1").ping(&bed.pod("b1"), 3)?.assert_no_loss()
}

/// Given a two-node mesh with a 100 packet/s ping from a1 to b1,
/// when node b's Node gains a second pod CIDR and later loses it again,
/// then a's peer for b follows (allowed IPs grow, then shrink), and the traffic to b's first CIDR
/// never loses its peer: no ping lost with kernel WireGuard (updates in place, stale CIDRs moved
/// to a throwaway peer); with boringtun, which cannot update a peer in place (remove + add, one
/// new handshake), at most a handful.
#[test]
#[ignore = "needs root + netns: run `make test-netns`"]
fn pod_cidr_change_keeps_traffic_to_the_unchanged_cidr() -> TestResult {
    let bed = bed("cidr-change")
        .node("a", |n| n.pod("a1"))
        .node("b", |n| n.pod("b1"))
        .start()?;
    converged(&bed)?;
    let api = bed.api()?;
    let a = bed.node("a");
    let b_key = bed.node("b").wg_show_dump()?.interface.public_key;
    let first = bed.node("b").pod_cidr().to_string();
    let second = "198.18.102.0/24";
    // b's own address rides along (host encryption, on by default on both nodes).
    let host = format!("{}/32", bed.node("b").underlay_ip());
    let allowed = |want: &[&str]| -> Result<()> {
        let dump = a.wg_show_dump()?;
        let peer = dump
            .peer(&b_key)
            .ok_or_else(|| anyhow::anyhow!("a has no peer for b"))?;
        let mut got: Vec<String> = peer.allowed_ips.iter().map(|n| n.to_string()).collect();
        got.sort();
        let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        want.sort();
        ensure!(
            got == want,
            "a's peer b has allowed IPs {got:?}, want {want:?}"
        );
        Ok(())
    };
    let (a1, b1) = (bed.pod("a1"), bed.pod("b1"));
    let pings = a1.ping_flood(&b1, flood_interval(), Duration::from_secs(8));
    std::thread::sleep(Duration::from_millis(500));

    api.patch_node(
        "b",
        &serde_json::json!({ "spec": { "podCIDRs": [first, second] } }),
    )?;
    bed.eventually("a's peer b gains the second CIDR", || {
        allowed(&[&first, second, &host])
    })?;
    api.patch_node("b", &serde_json::json!({ "spec": { "podCIDRs": [first] } }))?;
    bed.eventually("a's peer b loses the second CIDR", || {
        allowed(&[&first, &host])
    })?;
    let pings = pings.wait()?;

    let kernel = a.agent_spec().backend == "kernel";
    let allowed_loss = if kernel { 0 } else { 10 };
    ensure!(
        pings.lost() <= allowed_loss,
        "{} of {} pings lost across two allowed-IP updates ({} backend allows {allowed_loss})",
        pings.lost(),
        pings.transmitted,
        a.agent_spec().backend
    );
    eprintln!(
        "cidr change: {} of {} pings lost",
        pings.lost(),
        pings.transmitted
    );
    Ok(())
}
