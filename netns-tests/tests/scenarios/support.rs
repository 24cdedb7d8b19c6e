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

/// The `wgmeshctl` binary: `$WGMESHCTL_BIN`, or next to the probe (same cargo target dir).
pub fn wgmeshctl() -> Result<std::path::PathBuf> {
    if let Ok(p) = std::env::var("WGMESHCTL_BIN") {
        return Ok(p.into());
    }
    let p = std::path::Path::new(PROBE)
        .parent()
        .map(|d| d.join("wgmeshctl"))
        .ok_or_else(|| anyhow::anyhow!("no directory for the probe"))?;
    ensure!(
        p.exists(),
        "wgmeshctl not built ({}); run `cargo build --bins` or set WGMESHCTL_BIN",
        p.display()
    );
    Ok(p)
}

/// Runs `wgmeshctl ARGS` inside `node`'s network namespace with the testbed's kubeconfig and the
/// node's interface, bpffs and agent endpoint; returns (exit code, stdout, stderr).
pub fn wgmeshctl_on(bed: &Testbed, node: &Node, args: &[&str]) -> Result<(i32, String, String)> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", node.ns()])
        .arg(wgmeshctl()?)
        .arg("--kubeconfig")
        .arg(bed.dir().join("kubeconfig"))
        .args(args)
        .env("WGMESH_NODE_NAME", node.name())
        .env("WGMESHCTL_INTERFACE", node.wg_interface())
        .env("WGMESHCTL_BPFFS_DIR", node.bpffs_dir())
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// [`wgmeshctl_on`] that must exit 0; returns its standard output (the error carries both
/// streams).
pub fn wgmeshctl_ok(bed: &Testbed, node: &Node, args: &[&str]) -> Result<String> {
    let (code, out, err) = wgmeshctl_on(bed, node, args)?;
    ensure!(
        code == 0,
        "wgmeshctl {} on {} exited {code}:\n{out}{err}",
        args.join(" "),
        node.name()
    );
    Ok(out)
}

/// `2026-11-26T06:03:48Z` → seconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let t: jiff::Timestamp = s.parse().ok()?;
    u64::try_from(t.as_second()).ok()
}

/// Interval of the scenarios' ping floods: 100/s on the host. Under the VM tier's software
/// emulation the guest stalls for tens of milliseconds at a time, which a 10 ms ping deadline would
/// count as loss: 20/s there.
pub fn flood_interval() -> Duration {
    if std::env::var_os("WGMESH_IN_VM").is_some() {
        Duration::from_millis(50)
    } else {
        Duration::from_millis(10)
    }
}

/// A started testbed of nodes `names`, each with one pod `<name>1`, converged and with every
/// handshake done: the starting point of the scenarios about running meshes.
pub fn handshaken_mesh(label: &str, names: &[&str]) -> Result<Testbed> {
    let mut builder = bed(label);
    for name in names {
        let pod = format!("{name}1");
        builder = builder.node(name, move |n| n.pod(&pod));
    }
    let bed = builder.start()?;
    converged(&bed)?;
    bed.eventually("handshakes done", || bed.assert_handshakes())?;
    Ok(bed)
}
