//! Pod traffic between nodes is encrypted; traffic within a node stays off the tunnel; pods that
//! existed before the agent are covered without being restarted.

use wgmesh_netns_tests::prelude::*;

use crate::support::{bed, converged, counter};

/// Given two nodes running wgmesh, each with one pod,
/// when a1 talks to b1 over ICMP, TCP and UDP (and back),
/// then everything is delivered, and the underlay carries WireGuard and not one packet with a pod
/// address in the clear.
#[test]
#[ignore = "needs root + netns: run `make test-netns`"]
fn cross_node_pod_traffic_is_encrypted_on_the_wire() -> TestResult {
    let bed = bed("xnode-enc")
        .node("a", |n| n.pod("a1"))
        .node("b", |n| n.pod("b1"))
        .start()?;
    converged(&bed)?;
    let (a1, b1) = (bed.pod("a1"), bed.pod("b1"));
    let steered_before = counter(&bed.node("a"), "steered")?;

    let capture = bed.capture()?;
    a1.ping(&b1, 5)?.assert_no_loss().context("icmp a1 -> b1")?;
    b1.ping(&a1, 5)?.assert_no_loss().context("icmp b1 -> a1")?;
    let echoed = a1.tcp_request(&b1, 7000, "wgmesh over tcp")?;
    ensure!(
        echoed.contains("wgmesh over tcp"),
        "tcp echo returned {echoed:?}"
    );
    let udp = a1.udp_ping(&b1, 7001, 10)?;
    ensure!(udp.received == 10, "udp: {udp:?}");
    let summary = capture.stop()?;

    summary.assert_no_plaintext()?;
    ensure!(
        summary.wireguard_packets() >= 20,
        "too little WireGuard on the wire: {summary}"
    );
    let steered = counter(&bed.node("a"), "steered")? - steered_before;
    ensure!(
        steered >= 10,
        "node a's steering program marked only {steered} packets"
    );
    ensure!(
        counter(&bed.node("a"), "leaked")? == 0,
        "the uplink guard saw plaintext pod packets"
    );
    Ok(())
}

/// Given a node with two pods a1 and a2 (and another node b),
/// when a1 talks to a2,
/// then the traffic is delivered, counted as local by the steering program, never marked for the
/// tunnel, and nothing of it appears on the underlay.
#[test]
#[ignore = "needs root + netns: run `make test-netns`"]
fn same_node_pod_traffic_stays_off_the_tunnel() -> TestResult {
    let bed = bed("same-node")
        .node("a", |n| n.pod("a1").pod("a2"))
        .node("b", |n| n.pod("b1"))
        .start()?;
    converged(&bed)?;
    let a = bed.node("a");
    let (steered, local) = (counter(&a, "steered")?, counter(&a, "local")?);

    let capture = bed.capture()?;
    bed.pod("a1").ping(&bed.pod("a2"), 10)?.assert_no_loss()?;
    bed.pod("a1").tcp_request(&bed.pod("a2"), 7000, "local")?;
    let summary = capture.stop()?;

    summary.assert_no_plaintext()?;
    ensure!(
        summary.wireguard.transport == 0,
        "same-node traffic went through the tunnel: {summary}"
    );
    ensure!(
        counter(&a, "steered")? == steered,
        "same-node packets were marked for the tunnel"
    );
    let local_now = counter(&a, "local")?;
    ensure!(
        local_now >= local + 10,
        "local counter moved only from {local} to {local_now}"
    );
    Ok(())
}

/// Given two nodes whose pods are up and already talking in the clear (a TCP stream a1 -> b1)
/// before any agent runs,
/// when the agents start,
/// then the existing stream keeps flowing without a reset and without restarting the pods, the
/// underlay shows no more plaintext, and a pod created after the agent started is covered too.
#[test]
#[ignore = "needs root + netns: run `make test-netns`"]
fn pods_that_existed_before_the_agent_are_covered() -> TestResult {
    let bed = bed("pre-existing")
        .agents(false)
        .node("a", |n| n.pod("a1"))
        .node("b", |n| n.pod("b1"))
        .start()?;
    let (a1, b1) = (bed.pod("a1"), bed.pod("b1"));
    let flow = a1.tcp_stream_to(&b1, 7100)?;
    flow.assert_flowing(10_000, Duration::from_secs(10))
        .context("stream before wgmesh")?;
    let before = bed.capture()?;
    flow.assert_flowing(10_000, Duration::from_secs(10))?;
    before
        .stop()?
        .assert_plaintext_seen()
        .context("baseline: traffic must be in the clear before wgmesh")?;

    for n in bed.nodes() {
        n.start_agent()?;
    }
    bed.eventually("mesh converges", || bed.assert_full_mesh())?;
    // Let the last plaintext packets already in flight leave the wire, then watch.
    flow.assert_flowing(50_000, Duration::from_secs(20))
        .context("stream while wgmesh takes over")?;
    let capture = bed.capture()?;
    flow.assert_flowing(50_000, Duration::from_secs(20))
        .context("stream after wgmesh took over")?;
    let a3 = bed.node("a").add_pod("a3")?;
    bed.eventually("a pod created after the agent started reaches b1", || {
        a3.ping(&b1, 1)?.assert_no_loss()
    })?;
    a3.ping(&b1, 5)?.assert_no_loss()?;
    let summary = capture.stop()?;
    let report = flow.stop()?;

    report
        .assert_intact()
        .context("the pre-existing stream broke")?;
    summary.assert_no_plaintext()?;
    ensure!(
        summary.wireguard_packets() > 0,
        "no WireGuard on the wire: {summary}"
    );
    Ok(())
}
