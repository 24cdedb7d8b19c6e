//! Mesh-level checks over every node's `wg show`: the full mesh is configured, handshakes
//! happened, and a table view of it for the demo and diagnostics.

use std::{collections::BTreeMap, time::SystemTime};

use anyhow::{Result, bail};

use crate::{
    node::Node,
    table::Table,
    testbed::Testbed,
    wg::{WgDump, WgPeer},
};

/// One row of a node's mesh table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshRow {
    /// The node that owns the peer's key, or `?` plus a key fingerprint.
    pub peer_node: String,
    pub endpoint: String,
    pub allowed_ips: String,
    pub latest_handshake: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl Testbed {
    /// Nodes whose agent was started (and is meant to be in the mesh).
    fn mesh_nodes(&self) -> Vec<Node> {
        self.nodes()
            .into_iter()
            .filter(Node::agent_running)
            .collect()
    }

    /// Every node with a running agent has exactly one peer per other such node, with that
    /// node's key (as its own `wg show` reports it), endpoint `<underlay ip>:<port>` and its
    /// pod CIDR in the allowed IPs.
    pub fn assert_full_mesh(&self) -> Result<()> {
        let nodes = self.mesh_nodes();
        let dumps: Vec<(Node, WgDump)> = nodes
            .iter()
            .map(|n| Ok((n.clone(), n.wg_show_dump()?)))
            .collect::<Result<_>>()?;
        for (node, dump) in &dumps {
            for (other, other_dump) in dumps.iter().filter(|(o, _)| o.name() != node.name()) {
                let Some(peer) = dump.peer(&other_dump.interface.public_key) else {
                    bail!(
                        "{} has no peer for {} ({} peers)",
                        node.name(),
                        other.name(),
                        dump.peers.len()
                    );
                };
                let endpoint_ok = peer.endpoint.is_some_and(|e| {
                    e.ip() == std::net::IpAddr::from(other.underlay_ip())
                        && e.port() == other_dump.interface.listen_port
                });
                if !endpoint_ok {
                    bail!(
                        "{}'s peer {} has endpoint {:?}",
                        node.name(),
                        other.name(),
                        peer.endpoint
                    );
                }
                let cidr: ipnet::IpNet = other.pod_cidr().into();
                if !peer.allowed_ips.iter().any(|a| a.contains(&cidr)) {
                    bail!(
                        "{}'s peer {} allows {:?}, not {cidr}",
                        node.name(),
                        other.name(),
                        peer.allowed_ips
                    );
                }
            }
            if dump.peers.len() != dumps.len() - 1 {
                bail!(
                    "{} has {} peers, expected {}",
                    node.name(),
                    dump.peers.len(),
                    dumps.len() - 1
                );
            }
        }
        Ok(())
    }

    /// Every peer of every running agent has completed a handshake.
    pub fn assert_handshakes(&self) -> Result<()> {
        for node in self.mesh_nodes() {
            let dump = node.wg_show_dump()?;
            if let Some(p) = dump.peers.iter().find(|p| p.latest_handshake.is_none()) {
                bail!(
                    "{} has no handshake with peer {}",
                    node.name(),
                    p.fingerprint()
                );
            }
        }
        Ok(())
    }

    /// The mesh as `node`'s WireGuard device sees it, with peers named by node.
    pub fn mesh_rows(&self, node: &Node) -> Result<Vec<MeshRow>> {
        let keys: BTreeMap<String, String> = self
            .mesh_nodes()
            .iter()
            .filter_map(|n| {
                n.wg_show_dump()
                    .ok()
                    .map(|d| (d.interface.public_key, n.name().to_owned()))
            })
            .collect();
        Ok(node
            .wg_show_dump()?
            .peers
            .iter()
            .map(|p| row(p, &keys))
            .collect())
    }

    /// `mesh_rows` rendered as a table.
    pub fn mesh_table(&self, node: &Node) -> Result<String> {
        let mut t = Table::new([
            "peer node",
            "endpoint",
            "allowed IPs",
            "latest handshake",
            "rx bytes",
            "tx bytes",
        ]);
        for r in self.mesh_rows(node)? {
            t.row([
                r.peer_node,
                r.endpoint,
                r.allowed_ips,
                r.latest_handshake,
                r.rx_bytes.to_string(),
                r.tx_bytes.to_string(),
            ]);
        }
        Ok(t.to_string())
    }
}

fn row(p: &WgPeer, keys: &BTreeMap<String, String>) -> MeshRow {
    MeshRow {
        peer_node: keys
            .get(&p.public_key)
            .cloned()
            .unwrap_or_else(|| format!("? ({})", p.fingerprint())),
        endpoint: p
            .endpoint
            .map_or_else(|| "(none)".to_owned(), |e| e.to_string()),
        allowed_ips: p
            .allowed_ips
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        latest_handshake: p.latest_handshake.map_or_else(
            || "never".to_owned(),
            |t| {
                format!(
                    "{}s ago",
                    SystemTime::now()
                        .duration_since(t)
                        .unwrap_or_default()
                        .as_secs()
                )
            },
        ),
        rx_bytes: p.rx_bytes,
        tx_bytes: p.tx_bytes,
    }
}
