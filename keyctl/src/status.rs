//! `wgmeshctl status`: this node's WireGuard peers, each with a verdict.
//!
//! Gathering ([`run`]) reads the device, the agent's status, the pins and the Nodes, each
//! allowed to fail but the device. Everything after that is pure: [`build_report`] turns the
//! gathered [`Sources`] into a [`StatusReport`], and [`peer_rows`] judges each peer. Which peers
//! the node *should* have is the agent's own answer ([`wgmesh::mesh::desired_state`]), so
//! `missing` means exactly "the agent would add this peer".

use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use wgmesh::{
    mesh::{ObservedPeer, REJECT_AFTER},
    wireguard::DeviceState,
};
use wgmesh_api::{
    NodeRecord, PublicKey,
    annotations::ANNOTATION_PUBLIC_KEY,
    status::{AgentStatus, DesiredPeer, HostEncryptionStatus, SkippedNode},
};

use crate::{
    cli::{GlobalArgs, Output, StatusArgs},
    cluster,
    exit::Exit,
    local::{self, AgentAnswer, DatapathView},
    render,
};

/// Version of the `status` JSON output. Adding a field keeps it; renaming, removing or changing
/// the meaning of one bumps it.
pub const SCHEMA_VERSION: u32 = 1;

/// The judgement on one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Handshake younger than Reject-After-Time (180 s): the session works.
    Ok,
    /// Configured, but never completed a handshake.
    NoHandshake,
    /// The latest handshake is older than Reject-After-Time.
    Stale,
    /// The peer is node X by its allowed IPs or endpoint, but X publishes another key.
    KeyMismatch,
    /// No node publishes the peer's key, and none owns its allowed IPs or endpoint.
    UnknownPeer,
    /// A node this node should peer with has no peer on the device.
    Missing,
}

impl Verdict {
    /// The words shown in tables.
    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::NoHandshake => "no handshake yet",
            Self::Stale => "stale",
            Self::KeyMismatch => "key mismatch",
            Self::UnknownPeer => "unknown peer",
            Self::Missing => "missing",
        }
    }

    /// The identifier used in JSON.
    pub fn id(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::NoHandshake => "no_handshake",
            Self::Stale => "stale",
            Self::KeyMismatch => "key_mismatch",
            Self::UnknownPeer => "unknown_peer",
            Self::Missing => "missing",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// One peer: on the device, or (verdict `missing`) wanted but absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRow {
    /// The node this peer is, when known.
    pub node: Option<String>,
    /// The peer's key on the device; for `missing`, the key the node publishes.
    pub public_key: PublicKey,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    /// RFC 3339; null when there never was one.
    pub latest_handshake: Option<String>,
    pub handshake_age_seconds: Option<u64>,
    /// Null for `missing` rows (no peer on the device).
    pub rx_bytes: Option<u64>,
    pub tx_bytes: Option<u64>,
    pub keepalive_seconds: Option<u16>,
    pub verdict: Verdict,
    /// Why, in words (e.g. which key the node publishes instead).
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSection {
    /// The status endpoint asked.
    pub address: String,
    /// It accepted a connection and answered HTTP.
    pub reachable: bool,
    /// It served a status document.
    pub ready: bool,
    pub node: Option<String>,
    pub synced: Option<bool>,
    pub key_generation: Option<u64>,
    pub last_reconcile_error: Option<String>,
    pub error: Option<String>,
    /// The agent's host encryption (its own traffic to other nodes' pods), when it reports it.
    #[serde(default)]
    pub host_encryption: Option<HostEncryptionStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSection {
    pub reachable: bool,
    /// Nodes listed.
    pub nodes: Option<usize>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatapathSection {
    /// Where the numbers come from: `pins` (the pinned eBPF maps), `agent` (its status), `none`.
    pub source: String,
    /// The pinned maps were found.
    pub pinned: bool,
    /// Strict mode (plaintext pod packets dropped on the uplink); only known from the pins.
    pub strict: Option<bool>,
    pub fwmark: Option<u32>,
    pub fwmask: Option<u32>,
    /// Packet counters since the maps were created, by name.
    pub counters: BTreeMap<String, u64>,
    pub error: Option<String>,
}

/// The `status` output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub schema_version: u32,
    pub generated_at: String,
    /// This node's name, when known (flag, agent, or the Node publishing the device's key).
    pub node: Option<String>,
    pub interface: String,
    /// `kernel` or `userspace`.
    pub backend: String,
    /// Where the device state comes from: `direct` (read here), or `agent` (the agent's reading
    /// in its `/status`, when this process cannot read the device itself).
    pub device_source: String,
    pub listen_port: u16,
    /// The device's public key (derived from its private key, which is never shown).
    pub public_key: Option<PublicKey>,
    pub mtu: Option<u32>,
    /// Peers on the device.
    pub peer_count: usize,
    pub agent: AgentSection,
    pub cluster: ClusterSection,
    /// What named the peers: `nodes` (the API), `agent` (its desired peers), `none`.
    pub peer_names_from: String,
    pub datapath: DatapathSection,
    pub peers: Vec<PeerRow>,
    /// Nodes the agent would not peer with, and why.
    pub skipped_nodes: Vec<SkippedNode>,
    /// Rows per verdict (JSON ids), only verdicts that occur.
    pub verdicts: BTreeMap<String, usize>,
    /// Every verdict is `ok` (what `--check` tests).
    pub healthy: bool,
    /// The warnings also printed on stderr.
    pub warnings: Vec<String>,
}

/// Who the peers are.
#[derive(Debug, Clone, Copy)]
pub enum Directory<'a> {
    /// The Nodes, from the API.
    Nodes(&'a [NodeRecord]),
    /// The API is unreachable: the agent's desired peers and skipped nodes.
    Agent(&'a [DesiredPeer], &'a [SkippedNode]),
    /// Neither.
    Unknown,
}

/// What a node publishes as its key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Published {
    Key(PublicKey),
    Malformed,
    Missing,
}

/// A node as far as peer matching goes.
#[derive(Debug, Clone)]
struct Known {
    name: String,
    published: Published,
    pod_cidrs: Vec<IpNet>,
    ips: Vec<IpAddr>,
}

/// A peer the node should have.
#[derive(Debug, Clone)]
struct Wanted {
    node: String,
    endpoint: String,
    allowed_ips: Vec<String>,
}

/// Everything the verdicts are computed from.
#[derive(Debug, Clone)]
pub struct PeerInputs<'a> {
    pub device: &'a BTreeMap<PublicKey, ObservedPeer>,
    pub own_key: Option<PublicKey>,
    pub self_name: Option<&'a str>,
    pub directory: Directory<'a>,
    pub now: SystemTime,
}

fn cidrs(list: &[String]) -> Vec<IpNet> {
    list.iter()
        .filter_map(|c| c.trim().parse::<IpNet>().ok())
        .map(|n| n.trunc())
        .collect()
}

/// The directory in one shape: the known nodes (without this one), the wanted peers, skipped.
fn directory_view(
    input: &PeerInputs<'_>,
) -> (Vec<Known>, BTreeMap<PublicKey, Wanted>, Vec<SkippedNode>) {
    match input.directory {
        Directory::Nodes(nodes) => {
            let known = nodes
                .iter()
                .filter(|n| Some(n.name.as_str()) != input.self_name)
                .map(|n| Known {
                    name: n.name.clone(),
                    published: match n.annotations.get(ANNOTATION_PUBLIC_KEY) {
                        None => Published::Missing,
                        Some(k) => k
                            .parse()
                            .map(Published::Key)
                            .unwrap_or(Published::Malformed),
                    },
                    pod_cidrs: cidrs(&n.pod_cidrs),
                    ips: n.internal_ips.clone(),
                })
                .collect();
            // All zeros is never a valid published key, so without a device key nothing is
            // mistaken for this node's own.
            let own = input
                .own_key
                .unwrap_or(PublicKey::from_bytes([0; wgmesh_api::key::KEY_LEN]));
            let desired =
                wgmesh::mesh::desired_state(input.self_name.unwrap_or_default(), &own, nodes, 0);
            let wanted = desired
                .peers
                .into_iter()
                .map(|(k, p)| {
                    (
                        k,
                        Wanted {
                            node: p.node,
                            endpoint: p.endpoint.to_string(),
                            allowed_ips: p.allowed_ips.iter().map(|n| n.to_string()).collect(),
                        },
                    )
                })
                .collect();
            let skipped = desired
                .skipped
                .into_iter()
                .map(|s| SkippedNode {
                    node: s.node,
                    reason: s.reason,
                })
                .collect();
            (known, wanted, skipped)
        }
        Directory::Agent(peers, skipped) => {
            let known = peers
                .iter()
                .map(|p| Known {
                    name: p.node.clone(),
                    published: Published::Key(p.public_key),
                    pod_cidrs: cidrs(&p.allowed_ips),
                    ips: p
                        .endpoint
                        .parse::<std::net::SocketAddr>()
                        .map(|e| vec![e.ip()])
                        .unwrap_or_default(),
                })
                .collect();
            let wanted = peers
                .iter()
                .map(|p| {
                    (
                        p.public_key,
                        Wanted {
                            node: p.node.clone(),
                            endpoint: p.endpoint.clone(),
                            allowed_ips: p.allowed_ips.clone(),
                        },
                    )
                })
                .collect();
            (known, wanted, skipped.to_vec())
        }
        Directory::Unknown => (Vec::new(), BTreeMap::new(), Vec::new()),
    }
}

/// `ok`, `no handshake yet` or `stale`, and the handshake's age.
pub fn handshake_verdict(last: Option<SystemTime>, now: SystemTime) -> (Verdict, Option<u64>) {
    match last {
        None => (Verdict::NoHandshake, None),
        Some(t) => {
            let age = now.duration_since(t).unwrap_or(Duration::ZERO);
            let verdict = if age < REJECT_AFTER {
                Verdict::Ok
            } else {
                Verdict::Stale
            };
            (verdict, Some(age.as_secs()))
        }
    }
}

fn overlaps(a: &[IpNet], b: &[IpNet]) -> bool {
    a.iter().any(|x| {
        b.iter()
            .any(|y| x.contains(&y.network()) || y.contains(&x.network()))
    })
}

/// Judges every peer on the device and lists the wanted peers that are absent. Returns the rows
/// (sorted by node, unnamed last) and the nodes left out of the mesh.
pub fn peer_rows(input: &PeerInputs<'_>) -> (Vec<PeerRow>, Vec<SkippedNode>) {
    let (known, wanted, skipped) = directory_view(input);
    let mut rows = Vec::new();
    for (key, peer) in input.device {
        let (handshake, age) = handshake_verdict(peer.last_handshake, input.now);
        let mut row = PeerRow {
            node: None,
            public_key: *key,
            endpoint: peer.endpoint.map(|e| e.to_string()),
            allowed_ips: peer.allowed_ips.iter().map(|n| n.to_string()).collect(),
            latest_handshake: peer.last_handshake.map(render::rfc3339),
            handshake_age_seconds: age,
            rx_bytes: Some(peer.rx_bytes),
            tx_bytes: Some(peer.tx_bytes),
            keepalive_seconds: Some(peer.keepalive),
            verdict: handshake,
            detail: None,
        };
        let owners: Vec<&Known> = known
            .iter()
            .filter(|k| k.published == Published::Key(*key))
            .collect();
        if let Some(owner) = owners.first() {
            row.node = Some(owner.name.clone());
            let mut details = Vec::new();
            if owners.len() > 1 {
                let others: Vec<&str> = owners[1..].iter().map(|o| o.name.as_str()).collect();
                details.push(format!("key also published by {}", others.join(", ")));
            }
            match wanted.get(key) {
                Some(w) => {
                    let mut have = row.allowed_ips.clone();
                    have.sort();
                    let mut want = w.allowed_ips.clone();
                    want.sort();
                    if have != want {
                        details.push(format!(
                            "allowed IPs differ from the node's pod CIDRs ({})",
                            w.allowed_ips.join(",")
                        ));
                    }
                }
                None => {
                    let why = skipped
                        .iter()
                        .find(|s| s.node == owner.name)
                        .map(|s| s.reason.clone())
                        .unwrap_or_else(|| "not a wanted peer".into());
                    details.push(format!("the agent would remove it: {why}"));
                }
            }
            row.detail = (!details.is_empty()).then(|| details.join("; "));
        } else if !matches!(input.directory, Directory::Unknown) {
            let by_cidr = known
                .iter()
                .find(|k| overlaps(&peer.allowed_ips, &k.pod_cidrs));
            let by_ip = || {
                peer.endpoint
                    .and_then(|e| known.iter().find(|k| k.ips.contains(&e.ip())))
            };
            match by_cidr.or_else(by_ip) {
                Some(owner) => {
                    row.node = Some(owner.name.clone());
                    row.verdict = Verdict::KeyMismatch;
                    row.detail = Some(match &owner.published {
                        Published::Key(k) => format!(
                            "node {} publishes key {}, the device has {} for it",
                            owner.name,
                            k.fingerprint(),
                            key.fingerprint()
                        ),
                        Published::Malformed => {
                            format!("node {} publishes a malformed key", owner.name)
                        }
                        Published::Missing => format!("node {} publishes no key", owner.name),
                    });
                }
                None => {
                    row.verdict = Verdict::UnknownPeer;
                    row.detail = Some("no node publishes this key or owns its allowed IPs".into());
                }
            }
        } else {
            row.detail = Some("not identified: neither the API nor the agent answered".into());
        }
        rows.push(row);
    }
    for (key, w) in &wanted {
        if input.device.contains_key(key) {
            continue;
        }
        rows.push(PeerRow {
            node: Some(w.node.clone()),
            public_key: *key,
            endpoint: Some(w.endpoint.clone()),
            allowed_ips: w.allowed_ips.clone(),
            latest_handshake: None,
            handshake_age_seconds: None,
            rx_bytes: None,
            tx_bytes: None,
            keepalive_seconds: None,
            verdict: Verdict::Missing,
            detail: Some("no peer with the key this node publishes".into()),
        });
    }
    rows.sort_by(|a, b| {
        (a.node.is_none(), &a.node, a.verdict, a.public_key).cmp(&(
            b.node.is_none(),
            &b.node,
            b.verdict,
            b.public_key,
        ))
    });
    (rows, skipped)
}

/// This node's name: the flag, else the agent's, else the one Node publishing the device's key.
pub fn resolve_self(
    flag: Option<&str>,
    agent: Option<&AgentStatus>,
    nodes: Option<&[NodeRecord]>,
    own_key: Option<PublicKey>,
) -> Option<String> {
    if let Some(n) = flag.filter(|n| !n.trim().is_empty()) {
        return Some(n.trim().to_owned());
    }
    if let Some(a) = agent.filter(|a| !a.node.is_empty()) {
        return Some(a.node.clone());
    }
    let own = own_key?;
    let mut publishing = nodes?.iter().filter(|n| {
        n.annotations
            .get(ANNOTATION_PUBLIC_KEY)
            .and_then(|k| k.parse::<PublicKey>().ok())
            == Some(own)
    });
    match (publishing.next(), publishing.next()) {
        (Some(n), None) => Some(n.name.clone()),
        _ => None,
    }
}

/// Everything `status` gathered; errors as text (each source may be unavailable).
#[derive(Debug, Clone)]
pub struct Sources {
    pub interface: String,
    /// `kernel` or `userspace`.
    pub backend: String,
    /// `direct` or `agent`.
    pub device_source: String,
    pub device: DeviceState,
    pub mtu: Result<u32, String>,
    pub agent_addr: String,
    pub agent: Result<AgentAnswer, String>,
    pub bpffs_dir: PathBuf,
    pub datapath: Result<Option<DatapathView>, String>,
    pub nodes: Result<Vec<NodeRecord>, String>,
    pub node_flag: Option<String>,
}

/// The report, with the warnings to print.
pub fn build_report(src: &Sources, now: SystemTime) -> StatusReport {
    let mut warnings = Vec::new();
    let agent_status = match &src.agent {
        Ok(AgentAnswer::Status(s)) => Some(s.as_ref()),
        _ => None,
    };
    let agent = AgentSection {
        address: src.agent_addr.clone(),
        reachable: src.agent.is_ok(),
        ready: agent_status.is_some(),
        node: agent_status.map(|s| s.node.clone()),
        synced: agent_status.map(|s| s.synced),
        key_generation: agent_status.map(|s| s.key_generation),
        last_reconcile_error: agent_status
            .and_then(|s| s.last_reconcile.as_ref())
            .and_then(|r| r.error.clone()),
        error: match &src.agent {
            Err(e) | Ok(AgentAnswer::NotReady(e)) => Some(e.clone()),
            Ok(AgentAnswer::Status(_)) => None,
        },
        host_encryption: agent_status.map(|s| s.host_encryption.clone()),
    };
    match &src.agent {
        Err(e) => warnings.push(format!(
            "the agent is unreachable ({e}); showing the device's own state"
        )),
        Ok(AgentAnswer::NotReady(e)) => warnings.push(format!("the agent has no status yet: {e}")),
        Ok(AgentAnswer::Status(s)) => {
            if Some(s.public_key) != src.device.public_key {
                warnings.push(format!(
                    "the agent reports key {} but the device has {} (a rotation in progress?)",
                    s.public_key.fingerprint(),
                    render::or_dash(src.device.public_key.map(|k| k.fingerprint()))
                ));
            }
            if let Some(e) = &agent.last_reconcile_error {
                warnings.push(format!("the agent's last reconcile failed: {e}"));
            }
        }
    }
    let nodes = src.nodes.as_ref().ok().map(|n| n.as_slice());
    let cluster = ClusterSection {
        reachable: nodes.is_some(),
        nodes: nodes.map(<[NodeRecord]>::len),
        error: src.nodes.as_ref().err().cloned(),
    };
    let (directory, names_from) = match (nodes, agent_status) {
        (Some(n), _) => (Directory::Nodes(n), "nodes"),
        (None, Some(a)) => (
            Directory::Agent(&a.desired_peers, &a.skipped_nodes),
            "agent",
        ),
        (None, None) => (Directory::Unknown, "none"),
    };
    if let Err(e) = &src.nodes {
        warnings.push(match directory {
            Directory::Agent(..) => format!(
                "the Kubernetes API is unreachable ({e}); peers named from the agent's status"
            ),
            _ => format!("the Kubernetes API is unreachable ({e}); peers cannot be named"),
        });
    }
    if src.device.public_key.is_none() {
        warnings.push(format!(
            "{} has no private key yet (the agent has not configured it)",
            src.interface
        ));
    }
    let node = resolve_self(
        src.node_flag.as_deref(),
        agent_status,
        nodes,
        src.device.public_key,
    );
    if let (Some(name), Some(nodes), Some(own)) = (&node, nodes, src.device.public_key)
        && let Some(me) = nodes.iter().find(|n| &n.name == name)
    {
        let published = me.annotations.get(ANNOTATION_PUBLIC_KEY);
        if published.and_then(|k| k.parse::<PublicKey>().ok()) != Some(own) {
            warnings.push(format!(
                "Node {name} publishes key {} but the device has {} (the agent has not published \
                 it yet?)",
                published
                    .map(|k| k.chars().take(8).collect::<String>())
                    .unwrap_or_else(|| "(none)".into()),
                own.fingerprint()
            ));
        }
    }
    let (peers, skipped_nodes) = peer_rows(&PeerInputs {
        device: &src.device.peers,
        own_key: src.device.public_key,
        self_name: node.as_deref(),
        directory,
        now,
    });
    let mtu = match &src.mtu {
        Ok(m) => Some(*m),
        Err(e) => {
            let fallback = agent_status.map(|s| s.mtu);
            if fallback.is_none() {
                warnings.push(format!("cannot read the MTU: {e}"));
            }
            fallback
        }
    };
    let datapath = match &src.datapath {
        Ok(Some(view)) => DatapathSection {
            source: "pins".into(),
            pinned: true,
            strict: Some(view.strict),
            fwmark: Some(view.fwmark),
            fwmask: Some(view.fwmask),
            counters: view.counters.clone(),
            error: None,
        },
        other => {
            let error = match other {
                Ok(_) => format!(
                    "no wgmesh datapath is pinned under {}",
                    src.bpffs_dir.display()
                ),
                Err(e) => e.clone(),
            };
            warnings.push(error.clone());
            let from_agent = agent_status.map(|s| s.datapath.counters.clone());
            DatapathSection {
                source: if from_agent.is_some() {
                    "agent"
                } else {
                    "none"
                }
                .into(),
                pinned: false,
                strict: None,
                fwmark: None,
                fwmask: None,
                counters: from_agent.unwrap_or_default(),
                error: Some(error),
            }
        }
    };
    let mut verdicts = BTreeMap::new();
    for p in &peers {
        *verdicts.entry(p.verdict.id().to_owned()).or_insert(0) += 1;
    }
    StatusReport {
        schema_version: SCHEMA_VERSION,
        generated_at: render::rfc3339(now),
        node,
        interface: src.interface.clone(),
        backend: src.backend.clone(),
        device_source: src.device_source.clone(),
        listen_port: src.device.listen_port,
        public_key: src.device.public_key,
        mtu,
        peer_count: src.device.peers.len(),
        agent,
        cluster,
        peer_names_from: names_from.into(),
        datapath,
        healthy: peers.iter().all(|p| p.verdict == Verdict::Ok),
        peers,
        skipped_nodes,
        verdicts,
        warnings,
    }
}

impl StatusReport {
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut line = |label: &str, value: String| {
            out.push_str(&format!("{label:<12} {value}\n"));
        };
        line(
            "Interface:",
            format!("{} ({})", self.interface, self.backend),
        );
        line("Node:", render::or_dash(self.node.as_ref()));
        line("Listen port:", self.listen_port.to_string());
        line("Public key:", render::or_dash(self.public_key));
        line("MTU:", render::or_dash(self.mtu));
        line("Peers:", format!("{} on the device", self.peer_count));
        let agent = if self.agent.ready {
            let mut s = format!("yes ({})", self.agent.address);
            if let Some(synced) = self.agent.synced {
                s.push_str(if synced {
                    ", synced"
                } else {
                    ", not synced yet"
                });
            }
            if let Some(g) = self.agent.key_generation {
                s.push_str(&format!(", key generation {g}"));
            }
            s
        } else if self.agent.reachable {
            format!("starting ({})", self.agent.address)
        } else {
            format!("no ({})", self.agent.address)
        };
        line("Agent:", agent);
        if let Some(h) = &self.agent.host_encryption {
            line(
                "Host traffic:",
                if !h.enabled {
                    "in the clear (--host-encryption=false)".to_owned()
                } else if h.peers.is_empty() {
                    format!(
                        "encrypted with no peer yet (publishes {})",
                        render::or_dash(Some(h.addresses.join(",")).filter(|a| !a.is_empty()))
                    )
                } else {
                    format!(
                        "encrypted with {} of the peers (from {}, {} routes)",
                        h.peers.len(),
                        h.addresses.join(","),
                        h.routes
                    )
                },
            );
        }
        line(
            "Kubernetes:",
            match self.cluster.nodes {
                Some(n) => format!("yes ({n} nodes)"),
                None => "no".into(),
            },
        );
        let mut dp = match (
            self.datapath.strict,
            self.datapath.fwmark,
            self.datapath.fwmask,
        ) {
            (Some(strict), Some(mark), Some(mask)) => format!(
                "strict {}, fwmark {mark:#x}/{mask:#x}",
                if strict { "on" } else { "off" }
            ),
            _ if self.datapath.source == "agent" => "counters from the agent".into(),
            _ => "not found".into(),
        };
        if !self.datapath.counters.is_empty() {
            let counters: Vec<String> = self
                .datapath
                .counters
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            dp.push_str(&format!("; {}", counters.join(" ")));
        }
        line("Datapath:", dp);
        let verdicts: Vec<String> = self
            .verdicts
            .iter()
            .map(|(k, n)| format!("{n} {}", k.replace('_', " ")))
            .collect();
        line(
            "Verdicts:",
            if verdicts.is_empty() {
                "no peers".into()
            } else {
                verdicts.join(", ")
            },
        );
        if !self.peers.is_empty() {
            out.push('\n');
            let mut t = render::table([
                "NODE",
                "ENDPOINT",
                "ALLOWED IPS",
                "HANDSHAKE",
                "RX",
                "TX",
                "KEEPALIVE",
                "VERDICT",
                "DETAIL",
            ]);
            for p in &self.peers {
                t.add_row([
                    p.node
                        .clone()
                        .unwrap_or_else(|| format!("({})", p.public_key.fingerprint())),
                    render::or_dash(p.endpoint.as_ref()),
                    if p.allowed_ips.is_empty() {
                        "-".into()
                    } else {
                        p.allowed_ips.join(",")
                    },
                    match (p.verdict, p.handshake_age_seconds) {
                        (Verdict::Missing, _) => "-".into(),
                        (_, None) => "never".into(),
                        (_, Some(s)) => format!("{} ago", render::short_duration(s)),
                    },
                    render::or_dash(p.rx_bytes.map(render::bytes)),
                    render::or_dash(p.tx_bytes.map(render::bytes)),
                    match p.keepalive_seconds {
                        None => "-".into(),
                        Some(0) => "off".into(),
                        Some(s) => format!("{s}s"),
                    },
                    p.verdict.label().to_owned(),
                    p.detail.clone().unwrap_or_default(),
                ]);
            }
            out.push_str(&render::table_text(&t));
        }
        if !self.skipped_nodes.is_empty() {
            out.push_str("\nNot peered:\n");
            for s in &self.skipped_nodes {
                out.push_str(&format!("  {}: {}\n", s.node, s.reason));
            }
        }
        out
    }
}

async fn fetch_nodes(global: GlobalArgs, timeout: Duration) -> Result<Vec<NodeRecord>, String> {
    let fetch = async {
        let client = cluster::client(&global, timeout).await?;
        cluster::list_nodes(&client).await
    };
    match tokio::time::timeout(timeout, fetch).await {
        Ok(Ok(nodes)) => Ok(nodes),
        Ok(Err(e)) => Err(render::error_chain(&e)),
        Err(_) => Err(format!("no answer within {}", render::seconds(timeout))),
    }
}

pub async fn run(global: &GlobalArgs, args: &StatusArgs) -> anyhow::Result<Exit> {
    wgmesh::config::validate_interface(&args.interface)?;
    // The API may be slow: ask it while the local sources are read.
    let nodes = tokio::spawn(fetch_nodes(global.clone(), args.api_timeout));
    let (agent_addr, bpffs_dir, ifname) = (
        args.status_addr.clone(),
        args.bpffs_dir.clone(),
        args.interface.clone(),
    );
    let (device, agent, datapath, mtu) = tokio::task::spawn_blocking(move || {
        (
            local::read_device(&ifname),
            local::fetch_agent_status(&agent_addr, local::AGENT_TIMEOUT)
                .map_err(|e| render::error_chain(&e)),
            local::read_datapath(&bpffs_dir).map_err(|e| render::error_chain(&e)),
            local::read_mtu(&ifname).map_err(|e| render::error_chain(&e)),
        )
    })
    .await
    .context("local readers")?;
    let (backend, device_source, device) = match (device, &agent) {
        (Ok((backend, state)), _) => (backend.to_string(), "direct", state),
        (Err(e), Ok(AgentAnswer::Status(status))) if status.device.is_some() => {
            render::warn(format!(
                "{}; showing the agent's reading of the device instead",
                render::error_chain(&e)
            ));
            let state = status
                .device
                .as_ref()
                .map(local::device_from_agent)
                .unwrap_or_default();
            (status.backend.clone(), "agent", state)
        }
        (Err(e), _) => return Err(e),
    };
    let nodes = nodes.await.context("API reader")?;
    let sources = Sources {
        interface: args.interface.clone(),
        backend,
        device_source: device_source.into(),
        device,
        mtu,
        agent_addr: args.status_addr.clone(),
        agent,
        bpffs_dir: args.bpffs_dir.clone(),
        datapath,
        nodes,
        node_flag: args.node.clone(),
    };
    let report = build_report(&sources, SystemTime::now());
    for w in &report.warnings {
        render::warn(w);
    }
    render::print(&match global.output {
        Output::Table => report.table(),
        Output::Json => render::json_text(&report)?,
    })?;
    if args.check && !report.healthy {
        let bad: Vec<String> = report
            .peers
            .iter()
            .filter(|p| p.verdict != Verdict::Ok)
            .map(|p| {
                format!(
                    "{} ({})",
                    p.node.clone().unwrap_or_else(|| p.public_key.fingerprint()),
                    p.verdict
                )
            })
            .collect();
        render::warn(format!("check failed: {}", bad.join(", ")));
        return Ok(Exit::CheckFailed);
    }
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use wgmesh_api::{
        annotations::{ANNOTATION_KEY_GENERATION, ANNOTATION_LISTEN_PORT},
        status::STATUS_SCHEMA_VERSION,
    };

    use super::*;
    use crate::test_support::keys;

    fn key(n: u8) -> PublicKey {
        PublicKey::from_bytes([n; 32])
    }

    fn node(name: &str, k: Option<&str>, ip: &str, cidr: &str) -> NodeRecord {
        let mut annotations = BTreeMap::from([
            (ANNOTATION_LISTEN_PORT.to_string(), "51820".to_string()),
            (ANNOTATION_KEY_GENERATION.to_string(), "1".to_string()),
        ]);
        if let Some(k) = k {
            annotations.insert(ANNOTATION_PUBLIC_KEY.to_string(), k.to_string());
        }
        NodeRecord {
            name: name.into(),
            annotations,
            internal_ips: vec![ip.parse().unwrap()],
            pod_cidrs: vec![cidr.into()],
        }
    }

    fn peer(ip: &str, cidr: &str, handshake: Option<SystemTime>) -> ObservedPeer {
        ObservedPeer {
            endpoint: Some(format!("{ip}:51820").parse().unwrap()),
            allowed_ips: vec![cidr.parse().unwrap()],
            keepalive: 25,
            last_handshake: handshake,
            rx_bytes: 100,
            tx_bytes: 200,
        }
    }

    /// The cluster of the table test: a (this node), b, c, d with keys 1-4; e without a key.
    fn cluster() -> Vec<NodeRecord> {
        vec![
            node("a", Some(&key(1).to_string()), "192.0.2.1", "198.18.1.0/24"),
            node("b", Some(&key(2).to_string()), "192.0.2.2", "198.18.2.0/24"),
            node("c", Some(&key(3).to_string()), "192.0.2.3", "198.18.3.0/24"),
            node("d", Some(&key(4).to_string()), "192.0.2.4", "198.18.4.0/24"),
            node("e", None, "192.0.2.5", "198.18.5.0/24"),
        ]
    }

    #[test]
    fn table_of_verdicts() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ago = |s: u64| Some(now - Duration::from_secs(s));
        let nodes = cluster();
        type Case = (
            &'static str,
            Vec<(PublicKey, ObservedPeer)>,
            Vec<(Option<&'static str>, Verdict)>,
        );
        let all_good = || {
            vec![
                (key(2), peer("192.0.2.2", "198.18.2.0/24", ago(5))),
                (key(3), peer("192.0.2.3", "198.18.3.0/24", ago(179))),
                (key(4), peer("192.0.2.4", "198.18.4.0/24", ago(0))),
            ]
        };
        let cases: Vec<Case> = vec![
            (
                "every peer fresh",
                all_good(),
                vec![
                    (Some("b"), Verdict::Ok),
                    (Some("c"), Verdict::Ok),
                    (Some("d"), Verdict::Ok),
                ],
            ),
            (
                "stale and never",
                vec![
                    (key(2), peer("192.0.2.2", "198.18.2.0/24", ago(180))),
                    (key(3), peer("192.0.2.3", "198.18.3.0/24", None)),
                    (key(4), peer("192.0.2.4", "198.18.4.0/24", ago(3600))),
                ],
                vec![
                    (Some("b"), Verdict::Stale),
                    (Some("c"), Verdict::NoHandshake),
                    (Some("d"), Verdict::Stale),
                ],
            ),
            (
                "a peer missing",
                all_good().into_iter().take(2).collect(),
                vec![
                    (Some("b"), Verdict::Ok),
                    (Some("c"), Verdict::Ok),
                    (Some("d"), Verdict::Missing),
                ],
            ),
            (
                "old key of b (matched by allowed IPs), new key missing",
                vec![
                    (key(9), peer("192.0.2.99", "198.18.2.0/24", ago(5))),
                    (key(3), peer("192.0.2.3", "198.18.3.0/24", ago(5))),
                    (key(4), peer("192.0.2.4", "198.18.4.0/24", ago(5))),
                ],
                vec![
                    (Some("b"), Verdict::KeyMismatch),
                    (Some("b"), Verdict::Missing),
                    (Some("c"), Verdict::Ok),
                    (Some("d"), Verdict::Ok),
                ],
            ),
            (
                "old key of c matched by endpoint",
                vec![
                    (key(2), peer("192.0.2.2", "198.18.2.0/24", ago(5))),
                    (key(8), peer("192.0.2.3", "203.0.113.0/24", None)),
                    (key(4), peer("192.0.2.4", "198.18.4.0/24", ago(5))),
                ],
                vec![
                    (Some("b"), Verdict::Ok),
                    (Some("c"), Verdict::KeyMismatch),
                    (Some("c"), Verdict::Missing),
                    (Some("d"), Verdict::Ok),
                ],
            ),
            (
                "a node without a key keeps its old peer: key mismatch, not missing",
                {
                    let mut v = all_good();
                    v.push((key(7), peer("192.0.2.5", "198.18.5.0/24", ago(5))));
                    v
                },
                vec![
                    (Some("b"), Verdict::Ok),
                    (Some("c"), Verdict::Ok),
                    (Some("d"), Verdict::Ok),
                    (Some("e"), Verdict::KeyMismatch),
                ],
            ),
            (
                "a stranger",
                {
                    let mut v = all_good();
                    v.push((key(6), peer("203.0.113.9", "203.0.113.0/24", ago(5))));
                    v
                },
                vec![
                    (Some("b"), Verdict::Ok),
                    (Some("c"), Verdict::Ok),
                    (Some("d"), Verdict::Ok),
                    (None, Verdict::UnknownPeer),
                ],
            ),
        ];
        for (name, device, want) in cases {
            let device: BTreeMap<_, _> = device.into_iter().collect();
            let (rows, skipped) = peer_rows(&PeerInputs {
                device: &device,
                own_key: Some(key(1)),
                self_name: Some("a"),
                directory: Directory::Nodes(&nodes),
                now,
            });
            let got: Vec<(Option<&str>, Verdict)> = rows
                .iter()
                .map(|r| (r.node.as_deref(), r.verdict))
                .collect();
            assert_eq!(got, want, "{name}");
            assert_eq!(skipped.len(), 1, "{name}: e has no key");
            assert_eq!(skipped[0].node, "e");
        }
    }

    #[test]
    fn details_explain_mismatches_and_drift() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut nodes = cluster();
        nodes[2]
            .annotations
            .insert(ANNOTATION_PUBLIC_KEY.into(), "garbage".into());
        let device: BTreeMap<_, _> = [
            (key(2), peer("192.0.2.2", "198.18.99.0/24", Some(now))),
            (key(3), peer("192.0.2.3", "198.18.3.0/24", Some(now))),
        ]
        .into();
        let (rows, _) = peer_rows(&PeerInputs {
            device: &device,
            own_key: Some(key(1)),
            self_name: Some("a"),
            directory: Directory::Nodes(&nodes),
            now,
        });
        let b = rows
            .iter()
            .find(|r| r.node.as_deref() == Some("b"))
            .unwrap();
        assert_eq!(b.verdict, Verdict::Ok);
        assert!(
            b.detail.as_deref().unwrap().contains("allowed IPs differ"),
            "{b:?}"
        );
        let c = rows
            .iter()
            .find(|r| r.node.as_deref() == Some("c"))
            .unwrap();
        assert_eq!(c.verdict, Verdict::KeyMismatch);
        assert_eq!(
            c.detail.as_deref(),
            Some("node c publishes a malformed key")
        );
    }

    #[test]
    fn without_the_api_the_agent_names_the_peers() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let desired = vec![
            DesiredPeer {
                node: "b".into(),
                public_key: key(2),
                endpoint: "192.0.2.2:51820".into(),
                allowed_ips: vec!["198.18.2.0/24".into()],
            },
            DesiredPeer {
                node: "c".into(),
                public_key: key(3),
                endpoint: "192.0.2.3:51820".into(),
                allowed_ips: vec!["198.18.3.0/24".into()],
            },
        ];
        let device: BTreeMap<_, _> = [
            (key(2), peer("192.0.2.2", "198.18.2.0/24", Some(now))),
            (key(9), peer("192.0.2.3", "198.18.3.0/24", Some(now))),
        ]
        .into();
        let inputs = PeerInputs {
            device: &device,
            own_key: Some(key(1)),
            self_name: Some("a"),
            directory: Directory::Agent(&desired, &[]),
            now,
        };
        let (rows, _) = peer_rows(&inputs);
        let got: Vec<_> = rows
            .iter()
            .map(|r| (r.node.as_deref(), r.verdict))
            .collect();
        assert_eq!(
            got,
            [
                (Some("b"), Verdict::Ok),
                (Some("c"), Verdict::KeyMismatch),
                (Some("c"), Verdict::Missing)
            ]
        );
        // Without any directory: handshakes only, nobody named, nothing missing.
        let (rows, _) = peer_rows(&PeerInputs {
            directory: Directory::Unknown,
            ..inputs
        });
        assert!(
            rows.iter()
                .all(|r| r.node.is_none() && r.verdict == Verdict::Ok)
        );
        assert_eq!(rows.len(), 2);
    }

    #[test]
    fn handshake_ages_around_reject_after() {
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        let cases = [
            (None, Verdict::NoHandshake, None),
            (Some(now), Verdict::Ok, Some(0)),
            (Some(now + Duration::from_secs(5)), Verdict::Ok, Some(0)),
            (
                Some(now - REJECT_AFTER + Duration::from_secs(1)),
                Verdict::Ok,
                Some(179),
            ),
            (Some(now - REJECT_AFTER), Verdict::Stale, Some(180)),
        ];
        for (t, verdict, age) in cases {
            assert_eq!(handshake_verdict(t, now), (verdict, age), "{t:?}");
        }
    }

    #[test]
    fn this_node_is_found_by_flag_agent_or_key() {
        let nodes = cluster();
        let agent = agent_status("from-agent");
        assert_eq!(
            resolve_self(Some("x"), Some(&agent), Some(&nodes), Some(key(1))).as_deref(),
            Some("x")
        );
        assert_eq!(
            resolve_self(None, Some(&agent), Some(&nodes), Some(key(1))).as_deref(),
            Some("from-agent")
        );
        assert_eq!(
            resolve_self(Some(" "), None, Some(&nodes), Some(key(1))).as_deref(),
            Some("a")
        );
        assert_eq!(resolve_self(None, None, Some(&nodes), Some(key(42))), None);
        assert_eq!(resolve_self(None, None, None, Some(key(1))), None);
    }

    /// An agent status document as the agent serves it (built from JSON, so fields the agent
    /// adds with a default do not break this test).
    fn agent_status(node: &str) -> AgentStatus {
        serde_json::from_value(serde_json::json!({
            "schema_version": STATUS_SCHEMA_VERSION,
            "node": node,
            "interface": "wgmesh0",
            "backend": "userspace",
            "public_key": key(1),
            "key_generation": 1,
            "listen_port": 51820,
            "mtu": 1420,
            "synced": true,
            "desired_peers": [{
                "node": "b",
                "public_key": key(2),
                "endpoint": "192.0.2.2:51820",
                "allowed_ips": ["198.18.2.0/24"],
            }],
            "skipped_nodes": [],
            "datapath": {
                "attach_mode": "tcx",
                "attached": [],
                "remote_cidrs": [],
                "local_cidrs": [],
                "counters": { "steered": 5 },
            },
            "last_reconcile": null,
        }))
        .expect("the agent's status document")
    }

    fn sources(now: SystemTime) -> Sources {
        Sources {
            interface: "wgmesh0".into(),
            backend: "userspace".into(),
            device_source: "direct".into(),
            device: DeviceState {
                public_key: Some(key(1)),
                listen_port: 51820,
                fwmark: 0,
                peers: [(key(2), peer("192.0.2.2", "198.18.2.0/24", Some(now)))].into(),
            },
            mtu: Ok(1420),
            agent_addr: "127.0.0.1:9464".into(),
            agent: Ok(AgentAnswer::Status(Box::new(agent_status("a")))),
            bpffs_dir: "/sys/fs/bpf/wgmesh".into(),
            datapath: Ok(Some(DatapathView {
                counters: BTreeMap::from([("steered".into(), 7), ("leaked".into(), 0)]),
                fwmark: 0x10_0000,
                fwmask: 0x10_0000,
                strict: true,
            })),
            nodes: Ok(cluster()),
            node_flag: None,
        }
    }

    #[test]
    fn the_report_degrades_source_by_source() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let full = build_report(&sources(now), now);
        assert_eq!(full.node.as_deref(), Some("a"));
        assert_eq!(full.peer_names_from, "nodes");
        assert_eq!(full.datapath.source, "pins");
        assert_eq!(full.datapath.strict, Some(true));
        assert!(!full.healthy, "c and d are missing");
        assert_eq!(
            full.verdicts,
            BTreeMap::from([("missing".into(), 2), ("ok".into(), 1)])
        );
        assert!(full.warnings.is_empty(), "{:?}", full.warnings);

        let mut src = sources(now);
        src.nodes = Err("connection refused".into());
        src.datapath = Ok(None);
        src.mtu = Err("no sysfs".into());
        let r = build_report(&src, now);
        assert_eq!(r.peer_names_from, "agent");
        assert!(!r.cluster.reachable);
        assert_eq!(r.datapath.source, "agent");
        assert_eq!(r.datapath.counters["steered"], 5);
        assert_eq!(r.mtu, Some(1420), "the agent's MTU as fallback");
        assert_eq!(r.warnings.len(), 2, "{:?}", r.warnings);
        assert!(r.healthy, "the agent wants only b, which is there");

        src.agent = Err("connection refused".into());
        let r = build_report(&src, now);
        assert_eq!(r.peer_names_from, "none");
        assert!(!r.agent.reachable && !r.agent.ready);
        assert_eq!(r.node, None);
        assert_eq!(r.mtu, None);
        assert_eq!(r.peers[0].node, None);
        assert_eq!(r.warnings.len(), 4, "{:?}", r.warnings);
    }

    #[test]
    fn json_schema_is_stable_and_the_table_readable() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let report = build_report(&sources(now), now);
        let v: serde_json::Value =
            serde_json::from_str(&render::json_text(&report).unwrap()).unwrap();
        assert_eq!(
            keys(&v),
            [
                "agent",
                "backend",
                "cluster",
                "datapath",
                "device_source",
                "generated_at",
                "healthy",
                "interface",
                "listen_port",
                "mtu",
                "node",
                "peer_count",
                "peer_names_from",
                "peers",
                "public_key",
                "schema_version",
                "skipped_nodes",
                "verdicts",
                "warnings"
            ]
        );
        assert_eq!(
            keys(&v["peers"][0]),
            [
                "allowed_ips",
                "detail",
                "endpoint",
                "handshake_age_seconds",
                "keepalive_seconds",
                "latest_handshake",
                "node",
                "public_key",
                "rx_bytes",
                "tx_bytes",
                "verdict"
            ]
        );
        assert_eq!(
            keys(&v["agent"]),
            [
                "address",
                "error",
                "host_encryption",
                "key_generation",
                "last_reconcile_error",
                "node",
                "reachable",
                "ready",
                "synced"
            ]
        );
        assert_eq!(
            keys(&v["agent"]["host_encryption"]),
            ["addresses", "enabled", "peers", "routes", "warnings"]
        );
        assert_eq!(keys(&v["cluster"]), ["error", "nodes", "reachable"]);
        assert_eq!(
            keys(&v["datapath"]),
            [
                "counters", "error", "fwmark", "fwmask", "pinned", "source", "strict"
            ]
        );
        assert_eq!(keys(&v["skipped_nodes"][0]), ["node", "reason"]);
        assert_eq!(v["schema_version"], 1);
        assert_eq!(v["peers"][0]["verdict"], "ok");
        assert_eq!(v["peers"][1]["verdict"], "missing");
        assert_eq!(v["public_key"], key(1).to_string());
        let back: StatusReport = serde_json::from_value(v).unwrap();
        assert_eq!(back, report);

        let table = report.table();
        assert!(
            table.contains("Interface:   wgmesh0 (userspace)"),
            "{table}"
        );
        assert!(
            table.contains("strict on, fwmark 0x100000/0x100000"),
            "{table}"
        );
        assert!(table.contains("Verdicts:    2 missing, 1 ok"), "{table}");
        // The agent document above predates host encryption: it reads as off.
        assert!(
            table.contains("Host traffic: in the clear (--host-encryption=false)"),
            "{table}"
        );
        let header = table.lines().find(|l| l.starts_with("NODE")).expect(&table);
        assert!(header.contains("VERDICT"), "{table}");
        assert!(
            table.contains("Not peered:\n  e: no v1.wgmesh.io/public-key"),
            "{table}"
        );
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("b ") && l.contains("0s ago") && l.ends_with("ok")),
            "{table}"
        );
    }
}
