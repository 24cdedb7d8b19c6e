//! The agent's status document, served as JSON on its local status endpoint (`GET /status`) and read
//! by `wgmeshctl status`. Adding fields is compatible; renaming or removing one is not.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::key::PublicKey;

/// Version of this document's schema.
pub const STATUS_SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentStatus {
    pub schema_version: u32,
    pub node: String,
    pub interface: String,
    /// `kernel` or `userspace`.
    pub backend: String,
    pub public_key: PublicKey,
    pub key_generation: u64,
    pub listen_port: u16,
    pub mtu: u32,
    /// The initial list of Nodes has been received (stale peers are pruned only after it).
    pub synced: bool,
    /// Peers the agent wants, by node name.
    pub desired_peers: Vec<DesiredPeer>,
    /// Nodes that were not peered, and why.
    pub skipped_nodes: Vec<SkippedNode>,
    pub datapath: DatapathStatus,
    pub last_reconcile: Option<ReconcileStatus>,
    /// The WireGuard device as the kernel (netlink) or the userspace device (UAPI) reports it,
    /// read when `/status` is requested. `None` when the device cannot be read.
    #[serde(default)]
    pub device: Option<DeviceStatus>,
    /// Host encryption (absent from agents that predate it).
    #[serde(default)]
    pub host_encryption: HostEncryptionStatus,
}

/// The node's own traffic to other nodes' pods, and pods' traffic to other nodes' addresses.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct HostEncryptionStatus {
    /// `--host-encryption` is on.
    pub enabled: bool,
    /// The addresses this node publishes in `v1.wgmesh.io/host-addresses`.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Peers whose host addresses are in the tunnel (both sides publish).
    #[serde(default)]
    pub peers: Vec<String>,
    /// Routes of the node's own traffic into the tunnel (pod CIDR → source address).
    #[serde(default)]
    pub routes: usize,
    /// Host addresses left out, and why.
    #[serde(default)]
    pub warnings: Vec<SkippedNode>,
}

/// What `wg show <iface> dump` shows, in the same units.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct DeviceStatus {
    pub public_key: Option<PublicKey>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<DevicePeerStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DevicePeerStatus {
    /// The node publishing this key, if any.
    pub node: Option<String>,
    pub public_key: PublicKey,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    /// Seconds since the Unix epoch; `None` before the first handshake.
    pub latest_handshake: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Seconds; 0 = off.
    pub persistent_keepalive: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DesiredPeer {
    pub node: String,
    pub public_key: PublicKey,
    pub endpoint: String,
    pub allowed_ips: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SkippedNode {
    pub node: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct DatapathStatus {
    /// `tcx` or `netlink`.
    pub attach_mode: String,
    /// Interfaces with a wgmesh TC program, e.g. `veth1a2b (ingress)`.
    pub attached: Vec<String>,
    pub remote_cidrs: Vec<String>,
    pub local_cidrs: Vec<String>,
    pub counters: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReconcileStatus {
    /// Seconds since the Unix epoch.
    pub finished_at: u64,
    pub duration_ms: u64,
    pub peers_added: usize,
    pub peers_updated: usize,
    pub peers_removed: usize,
    pub error: Option<String>,
}
