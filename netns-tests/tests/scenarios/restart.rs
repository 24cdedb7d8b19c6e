//! Restarting the agent (SIGTERM for an upgrade, SIGKILL for a crash) keeps its key and drops no
//! traffic: the device, routes and eBPF programs live outside the agent process.

use wgmesh_netns_tests::prelude::*;

use crate::support::{bed, converged, flood_interval, published_key};

fn restart_keeps_key_and_traffic(label: &str, signal: Signal) -> TestResult {
    let bed = bed(label)
        .node("a", |n| n.pod("a1"))
        .node("b", |n| n.pod("b1"))
        .start()?;
    converged(&bed)?;
    bed.eventually("handshakes done", || bed.assert_handshakes())?;
    let a = bed.node("a");
    let key_before = a.wg_show_dump()?.interface.public_key;
    ensure!(
        published_key(&bed, "a")? == key_before,
        "published key differs from the device's"
    );
    let (a1, b1) = (bed.pod("a1"), bed.pod("b1"));
    let flow = a1.tcp_stream_to(&b1, 7200)?;
    flow.assert_flowing(20_000, Duration::from_secs(10))?;

    let capture = bed.capture()?;
    // Zero loss allowed at either rate: any gap longer than one interval fails.
    let pings = a1.ping_flood(&b1, flood_interval(), Duration::from_secs(6));
    std::thread::sleep(Duration::from_millis(500));
    a.restart_agent(signal)?;
    bed.eventually("restarted agent is ready", || {
        let body = a.agent_http_get("/readyz")?;
        ensure!(body.contains("ready"), "readyz: {body}");
        Ok(())
    })?;
    flow.assert_flowing(20_000, Duration::from_secs(10))
        .context("stream after the restart")?;
    let pings = pings.wait()?;
    let summary = capture.stop()?;
    let report = flow.stop()?;

    ensure!(
        pings.lost() == 0,
        "ping lost {} of {} packets across the restart",
        pings.lost(),
        pings.transmitted
    );
    report
        .assert_intact()
        .context("the TCP stream did not survive the restart")?;
    ensure!(
        a.wg_show_dump()?.interface.public_key == key_before,
        "the restart changed the key"
    );
    ensure!(
        published_key(&bed, "a")? == key_before,
        "the restart changed the published key"
    );
    ensure!(
        summary.wireguard.initiation == 0,
        "the restart caused {} handshake initiations (sessions were reset): {summary}",
        summary.wireguard.initiation
    );
    summary.assert_no_plaintext()?;
    let adopted = match a.agent_spec().backend.as_str() {
        "kernel" => "adopting the existing kernel wireguard interface",
        _ => "adopting the running userspace wireguard device",
    };
    ensure!(
        a.agent_log().contains(adopted),
        "the new agent did not adopt the device"
    );
    Ok(())
}

/// Given a two-node mesh with a TCP stream and a 100 packet/s ping from a1 to b1,
/// when node a's agent is stopped with SIGTERM and started again,
/// then no ping is lost, the stream is intact, the key is the same, and no new handshake happens.
#[test]
#[ignore = "needs root + netns: run `make test-netns`"]
fn agent_restart_by_sigterm_keeps_key_and_drops_nothing() -> TestResult {
    restart_keeps_key_and_traffic("restart-term", Signal::SIGTERM)
}

/// Same as the SIGTERM case, with SIGKILL: the agent gets no chance to clean up or hand over.
#[test]
#[ignore = "needs root + netns: run `make test-netns`"]
fn agent_restart_by_sigkill_keeps_key_and_drops_nothing() -> TestResult {
    restart_keeps_key_and_traffic("restart-kill", Signal::SIGKILL)
}
