//! Small helpers shared by the scenarios.

use std::collections::BTreeMap;

use wgmesh_netns_tests::prelude::*;

pub const PROBE: &str = env!("CARGO_BIN_EXE_wgmesh-probe");

/// A testbed builder with the probe from this build.
pub fn bed(label: &str) -> TestbedBuilder {
    Testbed::builder(label).probe_bin(PROBE)
}

/// The datapath counters from the agent's `/status`.
pub fn counters(node: &Node) -> Result<BTreeMap<String, u64>> {
    let status = node.status()?;
    let map = status["datapath"]["counters"].as_object().ok_or_else(|| {
        anyhow::anyhow!("no datapath counters in {}'s status: {status}", node.name())
    })?;
    Ok(map
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
        .collect())
}

pub fn counter(node: &Node, name: &str) -> Result<u64> {
    Ok(counters(node)?.get(name).copied().unwrap_or(0))
}

/// The remote pod CIDRs the node's eBPF map holds (as reported in `/status`).
pub fn remote_cidrs(node: &Node) -> Result<Vec<String>> {
    let status = node.status()?;
    Ok(status["datapath"]["remote_cidrs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

/// Waits until every node has a peer for every other node and every pod answers every other pod.
pub fn converged(bed: &Testbed) -> Result<()> {
    bed.eventually("every node peers with every other node", || {
        bed.assert_full_mesh()
    })?;
    let pods = bed.pods();
    bed.eventually("every pod reaches every pod on another node", || {
        for a in &pods {
            for b in pods.iter().filter(|b| b.node_name() != a.node_name()) {
                a.ping(b, 1)?
                    .assert_no_loss()
                    .with_context(|| format!("{} -> {}", a.name(), b.name()))?;
            }
        }
        Ok(())
    })
}

/// The public key a node publishes on its Node object.
pub fn published_key(bed: &Testbed, node: &str) -> Result<String> {
    bed.api()?
        .node_annotations(node)?
        .get("v1.wgmesh.io/public-key")
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("{node} has no public-key annotation"))
}
