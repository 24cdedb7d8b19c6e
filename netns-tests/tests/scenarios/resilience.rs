//! The Kubernetes API going away does not touch the data path; changes made meanwhile converge.

use wgmesh_netns_tests::prelude::*;

use crate::support::{bed, converged, remote_cidrs};

/// Given a three-node mesh,
/// when the API is unreachable for 30 s and, meanwhile, node c's Node object is deleted,
/// then pod traffic between a and b keeps flowing the whole time (no ping lost), the agents keep
/// running, and once the API is back, a and b drop c from their peers and maps.
#[test]
#[ignore = "needs root + netns: run `make test-netns`"]
fn api_outage_keeps_traffic_flowing_and_changes_converge_after() -> TestResult {
    let bed = bed("api-outage")
        .node("a", |n| n.pod("a1"))
        .node("b", |n| n.pod("b1"))
        .node("c", |n| n.pod("c1"))
        .start()?;
    converged(&bed)?;
    let api = bed.api()?;
    let c_key = bed.node("c").wg_show_dump()?.interface.public_key;
    let c_cidr = bed.node("c").pod_cidr().to_string();
    let (a1, b1) = (bed.pod("a1"), bed.pod("b1"));

    api.down()?;
    let pings = a1.ping_flood(&b1, Duration::from_millis(100), Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    api.delete_node("c")?;
    let pings = pings.wait()?;
    for n in bed.nodes() {
        n.assert_agent_running()
            .with_context(|| format!("agent on {} died during the outage", n.name()))?;
    }
    ensure!(
        bed.node("a").wg_show_dump()?.peer(&c_key).is_some(),
        "a dropped c while the API was away: nothing should change without the API"
    );
    api.up()?;

    ensure!(
        pings.lost() == 0,
        "{} of {} pings lost during the API outage",
        pings.lost(),
        pings.transmitted
    );
    for name in ["a", "b"] {
        let n = bed.node(name);
        bed.eventually(&format!("{name} converges after the outage"), || {
            ensure!(
                n.wg_show_dump()?.peer(&c_key).is_none(),
                "{name} still peers with deleted node c"
            );
            ensure!(
                !remote_cidrs(&n)?.contains(&c_cidr),
                "{name} still steers {c_cidr}"
            );
            Ok(())
        })?;
    }
    a1.ping(&b1, 3)?.assert_no_loss()
}
