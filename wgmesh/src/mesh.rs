//! Desired state as a pure function of the cluster: which peers this node should have, which pod
//! CIDRs are local and which are remote, and which nodes were left out and why. Then the difference
//! between that and what the device has. No I/O here; everything is table-tested.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, SystemTime},
};

use ipnet::IpNet;
use wgmesh_api::{NodeMeshInfo, NodeRecord, PublicKey};

/// WireGuard's Reject-After-Time: a session older than this is dead, so a handshake younger than
/// this means the peer is working.
pub const REJECT_AFTER: Duration = Duration::from_secs(180);

/// One WireGuard peer as wgmesh wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub node: String,
    pub public_key: PublicKey,
    pub endpoint: SocketAddr,
    /// Sorted, normalised.
    pub allowed_ips: Vec<IpNet>,
    /// Persistent keepalive seconds; 0 = off.
    pub keepalive: u16,
}

/// A peer as the device reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedPeer {
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub keepalive: u16,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub node: String,
    pub reason: String,
    /// A node whose agent has not published a key yet: normal for a while, logged quietly.
    pub expected: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub peers: BTreeMap<PublicKey, PeerSpec>,
    pub local_cidrs: BTreeSet<IpNet>,
    pub remote_cidrs: BTreeSet<IpNet>,
    /// Pod CIDRs of every other node, peered or not: plaintext towards them is a leak.
    pub cluster_cidrs: BTreeSet<IpNet>,
    pub skipped: Vec<Skipped>,
    /// Whether this node's own Node object was in the input.
    pub self_seen: bool,
    /// Host encryption: other nodes' host addresses whose traffic goes through the tunnel (pods
    /// here reaching them are steered; each is in its node's allowed IPs).
    pub peer_hosts: BTreeSet<IpAddr>,
    /// Host encryption: routes for this node's own traffic into the tunnel, pod CIDR → source
    /// address (this node's host address of the CIDR's family).
    pub host_routes: BTreeMap<IpNet, IpAddr>,
    /// Peered nodes whose host addresses were left out, and why (the pod traffic is unaffected).
    pub host_warnings: Vec<Skipped>,
}

/// Computes the peer set for node `self_name` whose public key is `own_key`.
///
/// Rules: one peer per other node with a valid identity; a node is left out when its record is
/// invalid, when it uses this node's key, when another node publishes the same key (both are left
/// out: a key must identify one node), or when its pod CIDRs overlap this node's or another
/// candidate's (WireGuard allowed IPs must not overlap: the kernel silently moves them to the last
/// peer configured). Deterministic for any input order.
pub fn desired_state(
    self_name: &str,
    own_key: &PublicKey,
    nodes: &[NodeRecord],
    keepalive: u16,
) -> DesiredState {
    desired_state_with_hosts(self_name, own_key, nodes, keepalive, None)
}

/// [`desired_state`], with this node's host addresses given (`own_hosts`) instead of read from its
/// Node's annotation: the agent passes what it publishes, so the pass that publishes them already
/// programs host encryption (the annotation comes back through the watch only later, and every
/// peer would be updated a second time).
pub fn desired_state_with_hosts(
    self_name: &str,
    own_key: &PublicKey,
    nodes: &[NodeRecord],
    keepalive: u16,
    own_hosts: Option<&[IpAddr]>,
) -> DesiredState {
    let mut out = DesiredState::default();
    let mut nodes: Vec<&NodeRecord> = nodes.iter().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));

    let mut candidates: Vec<NodeMeshInfo> = Vec::new();
    for rec in nodes.iter().copied() {
        if rec.name == self_name {
            out.self_seen = true;
            out.local_cidrs = rec
                .pod_cidrs
                .iter()
                .filter_map(|c| c.trim().parse::<IpNet>().ok())
                .map(|n| n.trunc())
                .collect();
            continue;
        }
        out.cluster_cidrs.extend(
            rec.pod_cidrs
                .iter()
                .filter_map(|c| c.trim().parse::<IpNet>().ok())
                .map(|n| n.trunc()),
        );
        match rec.mesh_info() {
            Ok(info) if info.public_key == *own_key => out.skipped.push(Skipped {
                node: rec.name.clone(),
                reason: "publishes this node's own public key".into(),
                expected: false,
            }),
            Ok(info) => candidates.push(info),
            Err(problem) => out.skipped.push(Skipped {
                node: rec.name.clone(),
                reason: problem.to_string(),
                expected: problem.is_expected_during_startup(),
            }),
        }
    }

    // A node claiming part of this node's own pod range is wrong whatever else holds; it is left
    // out first, so it cannot also knock out the nodes it overlaps.
    let local: Vec<IpNet> = out.local_cidrs.iter().copied().collect();
    let mut rejected: BTreeMap<String, String> = BTreeMap::new();
    for a in &candidates {
        if let Some((x, y)) = first_overlap(&a.pod_cidrs, &local) {
            rejected.insert(
                a.name.clone(),
                format!("pod CIDR {x} overlaps this node's pod CIDR {y}"),
            );
        }
    }
    let remaining: Vec<&NodeMeshInfo> = candidates
        .iter()
        .filter(|c| !rejected.contains_key(&c.name))
        .collect();
    // Duplicate keys and overlapping CIDRs in O(n log n): this runs on every Node event, and
    // clusters have thousands of nodes.
    let mut by_key: BTreeMap<PublicKey, Vec<&str>> = BTreeMap::new();
    for c in &remaining {
        by_key.entry(c.public_key).or_default().push(&c.name);
    }
    for (key, names) in by_key.iter().filter(|(_, n)| n.len() > 1) {
        for (i, name) in names.iter().enumerate() {
            let other = names[if i == 0 { 1 } else { 0 }];
            rejected.entry((*name).to_owned()).or_insert(format!(
                "public key {} is also published by node {other}",
                key.fingerprint()
            ));
        }
    }
    for (a, x, b, y) in overlaps(&remaining) {
        rejected
            .entry(a.to_owned())
            .or_insert(format!("pod CIDR {x} overlaps {y} of node {b}"));
        rejected
            .entry(b.to_owned())
            .or_insert(format!("pod CIDR {y} overlaps {x} of node {a}"));
    }

    for info in candidates {
        if let Some(reason) = rejected.remove(&info.name) {
            out.skipped.push(Skipped {
                node: info.name,
                reason,
                expected: false,
            });
            continue;
        }
        out.remote_cidrs.extend(info.pod_cidrs.iter().copied());
        out.peers.insert(
            info.public_key,
            PeerSpec {
                endpoint: SocketAddr::new(info.endpoint_ip, info.listen_port),
                node: info.name,
                public_key: info.public_key,
                allowed_ips: info.pod_cidrs,
                keepalive,
            },
        );
    }
    out.skipped.sort_by(|a, b| a.node.cmp(&b.node));
    add_host_addresses(self_name, &nodes, own_hosts, &mut out);
    out
}

/// Host encryption between this node and a peer, when both publish host addresses: the peer's
/// addresses join its allowed IPs and the steered set, and this node's own traffic to the peer's
/// pod CIDRs gets a route into the tunnel from its address of the same family. A peer's address
/// that is not one of its InternalIPs, lies in a pod CIDR, is this node's own, or is claimed by
/// two peers is left out (both claims), with a warning; the peer's pod traffic is unaffected.
fn add_host_addresses(
    self_name: &str,
    nodes: &[&NodeRecord],
    own_hosts: Option<&[IpAddr]>,
    out: &mut DesiredState,
) {
    let own = match (own_hosts, nodes.iter().find(|n| n.name == self_name)) {
        (Some(given), _) => given.to_vec(),
        (None, None) => return,
        (None, Some(me)) => match me.host_addresses() {
            Ok(own) => own,
            Err(reason) => {
                out.host_warnings.push(Skipped {
                    node: me.name.clone(),
                    reason,
                    expected: false,
                });
                return;
            }
        },
    };
    if own.is_empty() {
        return;
    }
    // One set probe per prefix length in use instead of a scan of every CIDR: this runs for every
    // peer on every pass.
    let lens: BTreeSet<(bool, u8)> = out
        .cluster_cidrs
        .iter()
        .chain(out.local_cidrs.iter())
        .map(|c| (c.addr().is_ipv4(), c.prefix_len()))
        .collect();
    let in_pod_cidr = |ip: &IpAddr| {
        lens.iter()
            .filter(|(v4, _)| *v4 == ip.is_ipv4())
            .filter_map(|(_, len)| IpNet::new(*ip, *len).ok())
            .map(|n| n.trunc())
            .any(|n| out.cluster_cidrs.contains(&n) || out.local_cidrs.contains(&n))
    };
    let warn = |node: &str, reason: String| Skipped {
        node: node.to_owned(),
        reason,
        expected: false,
    };
    let mut warnings = Vec::new();
    let mut claims: BTreeMap<IpAddr, Vec<&str>> = BTreeMap::new();
    // (peer, its node's name, the addresses that passed the checks so far)
    let mut wanted: Vec<(PublicKey, &str, Vec<IpAddr>)> = Vec::new();
    for peer in out.peers.values() {
        // `nodes` is sorted by name (desired_state), and every peer comes from one of them.
        let Ok(i) = nodes.binary_search_by(|n| n.name.as_str().cmp(&peer.node)) else {
            continue;
        };
        let rec = nodes[i];
        let addrs = match rec.host_addresses() {
            Ok(a) => a,
            Err(reason) => {
                warnings.push(warn(&rec.name, reason));
                continue;
            }
        };
        let mut keep = Vec::new();
        for ip in addrs {
            if own.contains(&ip) {
                warnings.push(warn(
                    &rec.name,
                    format!("host address {ip} is this node's own"),
                ));
            } else if in_pod_cidr(&ip) {
                warnings.push(warn(
                    &rec.name,
                    format!("host address {ip} lies in a pod CIDR"),
                ));
            } else {
                claims.entry(ip).or_default().push(&rec.name);
                keep.push(ip);
            }
        }
        if !keep.is_empty() {
            wanted.push((peer.public_key, &rec.name, keep));
        }
    }
    for (key, name, addrs) in wanted {
        let (kept, shared): (Vec<IpAddr>, Vec<IpAddr>) =
            addrs.into_iter().partition(|ip| claims[ip].len() == 1);
        for ip in shared {
            let others: Vec<&str> = claims[&ip].iter().copied().filter(|o| *o != name).collect();
            warnings.push(warn(
                name,
                format!(
                    "host address {ip} is also published by node {}",
                    others.join(", ")
                ),
            ));
        }
        let Some(peer) = out.peers.get_mut(&key).filter(|_| !kept.is_empty()) else {
            continue;
        };
        // The peer's allowed IPs are its pod CIDRs until the host addresses join them.
        for cidr in &peer.allowed_ips {
            if let Some(src) = own.iter().find(|o| o.is_ipv4() == cidr.addr().is_ipv4()) {
                out.host_routes.insert(*cidr, *src);
            }
        }
        peer.allowed_ips
            .extend(kept.iter().map(|ip| IpNet::from(*ip)));
        peer.allowed_ips.sort();
        peer.allowed_ips.dedup();
        out.peer_hosts.extend(kept);
    }
    out.host_warnings.extend(warnings);
    out.host_warnings
        .sort_by(|a, b| (&a.node, &a.reason).cmp(&(&b.node, &b.reason)));
}

/// Pairs of (node, cidr) from different nodes whose CIDRs overlap: a sweep over the ranges sorted
/// by start; every overlapping range meets the widest earlier range of its family.
fn overlaps<'a>(nodes: &[&'a NodeMeshInfo]) -> Vec<(&'a str, IpNet, &'a str, IpNet)> {
    fn range(n: &IpNet) -> (bool, u128, u128) {
        match n {
            IpNet::V4(v) => (
                false,
                u32::from(v.network()).into(),
                u32::from(v.broadcast()).into(),
            ),
            IpNet::V6(v) => (true, u128::from(v.network()), u128::from(v.broadcast())),
        }
    }
    let mut ranges: Vec<((bool, u128, u128), &str, IpNet)> = nodes
        .iter()
        .flat_map(|n| {
            n.pod_cidrs
                .iter()
                .map(move |c| (range(c), n.name.as_str(), *c))
        })
        .collect();
    ranges.sort_by(|a, b| {
        (a.0.0, a.0.1, std::cmp::Reverse(a.0.2)).cmp(&(b.0.0, b.0.1, std::cmp::Reverse(b.0.2)))
    });
    let mut out = Vec::new();
    let mut widest: Option<((bool, u128, u128), &str, IpNet)> = None;
    for r in ranges {
        if let Some(w) = widest
            && w.0.0 == r.0.0
            && r.0.1 <= w.0.2
            && w.1 != r.1
        {
            out.push((r.1, r.2, w.1, w.2));
        }
        if widest.is_none_or(|w| w.0.0 != r.0.0 || r.0.2 > w.0.2) {
            widest = Some(r);
        }
    }
    out
}

fn first_overlap(a: &[IpNet], b: &[IpNet]) -> Option<(IpNet, IpNet)> {
    a.iter()
        .flat_map(|x| b.iter().map(move |y| (*x, *y)))
        .find(|(x, y)| x.contains(&y.network()) || y.contains(&x.network()))
}

/// What to change on the device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerDiff {
    pub add: Vec<PeerSpec>,
    pub update: Vec<PeerSpec>,
    pub remove: Vec<PublicKey>,
}

impl PeerDiff {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.update.is_empty() && self.remove.is_empty()
    }
}

/// The changes that turn `observed` into `desired`.
///
/// * Peers the device has but the cluster does not are removed only when `prune` is set, i.e. after
///   the initial list of Nodes arrived: before that, "not seen yet" is not "gone" (cilium #31979).
/// * An endpoint that differs while the peer has a live session (handshake younger than
///   Reject-After-Time) is left alone: WireGuard roamed it to where the peer really is, and
///   rewriting it would cut a working path (kilo #34).
pub fn diff(
    desired: &BTreeMap<PublicKey, PeerSpec>,
    observed: &BTreeMap<PublicKey, ObservedPeer>,
    prune: bool,
    now: SystemTime,
) -> PeerDiff {
    let mut out = PeerDiff::default();
    for (key, want) in desired {
        match observed.get(key) {
            None => out.add.push(want.clone()),
            Some(have) => {
                let mut have_ips = have.allowed_ips.clone();
                have_ips.sort();
                have_ips.dedup();
                let live = have
                    .last_handshake
                    .and_then(|t| now.duration_since(t).ok())
                    .is_some_and(|age| age < REJECT_AFTER);
                let endpoint_ok =
                    have.endpoint == Some(want.endpoint) || (live && have.endpoint.is_some());
                if have_ips != want.allowed_ips || have.keepalive != want.keepalive || !endpoint_ok
                {
                    out.update.push(want.clone());
                }
            }
        }
    }
    if prune {
        out.remove = observed
            .keys()
            .filter(|k| !desired.contains_key(k))
            .copied()
            .collect();
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use wgmesh_api::annotations::{
        ANNOTATION_HOST_ADDRESSES, ANNOTATION_LISTEN_PORT, ANNOTATION_PUBLIC_KEY,
    };

    use super::*;

    fn key(n: u8) -> PublicKey {
        let mut b = [n; 32];
        b[0] = 1;
        PublicKey::from_bytes(b)
    }

    fn node(name: &str, k: Option<PublicKey>, ip: &str, cidrs: &[&str]) -> NodeRecord {
        let mut annotations = BTreeMap::new();
        if let Some(k) = k {
            annotations.insert(ANNOTATION_PUBLIC_KEY.to_string(), k.to_string());
            annotations.insert(ANNOTATION_LISTEN_PORT.to_string(), "51820".to_string());
        }
        NodeRecord {
            name: name.into(),
            annotations,
            internal_ips: vec![ip.parse().unwrap()],
            pod_cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn peer_names(s: &DesiredState) -> Vec<String> {
        s.peers.values().map(|p| p.node.clone()).collect()
    }

    fn skipped_names(s: &DesiredState) -> Vec<String> {
        s.skipped.iter().map(|p| p.node.clone()).collect()
    }

    #[test]
    fn table_of_clusters() {
        let me = key(1);
        let a = node("a", Some(me), "192.0.2.11", &["198.18.1.0/24"]);
        let b = node("b", Some(key(2)), "192.0.2.12", &["198.18.2.0/24"]);
        let c = node("c", Some(key(3)), "192.0.2.13", &["198.18.3.0/24"]);
        let c_no_key = node("c", None, "192.0.2.13", &["198.18.3.0/24"]);
        let d_dup_key = node("d", Some(key(2)), "192.0.2.14", &["198.18.4.0/24"]);
        let e_my_key = node("e", Some(me), "192.0.2.15", &["198.18.5.0/24"]);
        let f_overlaps_b = node("f", Some(key(6)), "192.0.2.16", &["198.18.2.128/25"]);
        let g_overlaps_me = node("g", Some(key(7)), "192.0.2.17", &["198.18.0.0/16"]);
        let mut h_bad_key = node("h", Some(key(8)), "192.0.2.18", &["198.18.8.0/24"]);
        h_bad_key
            .annotations
            .insert(ANNOTATION_PUBLIC_KEY.into(), "not-a-key".into());

        type Case = (
            &'static str,
            Vec<NodeRecord>,
            Vec<&'static str>,
            Vec<&'static str>,
        );
        let cases: Vec<Case> = vec![
            ("alone", vec![a.clone()], vec![], vec![]),
            (
                "three nodes",
                vec![a.clone(), b.clone(), c.clone()],
                vec!["b", "c"],
                vec![],
            ),
            (
                "input order does not matter",
                vec![c.clone(), a.clone(), b.clone()],
                vec!["b", "c"],
                vec![],
            ),
            (
                "node without key yet",
                vec![a.clone(), b.clone(), c_no_key],
                vec!["b"],
                vec!["c"],
            ),
            (
                "duplicate key: both out",
                vec![a.clone(), b.clone(), c.clone(), d_dup_key],
                vec!["c"],
                vec!["b", "d"],
            ),
            (
                "someone uses my key",
                vec![a.clone(), b.clone(), e_my_key],
                vec!["b"],
                vec!["e"],
            ),
            (
                "overlapping remote cidrs",
                vec![a.clone(), b.clone(), f_overlaps_b],
                vec![],
                vec!["b", "f"],
            ),
            (
                "overlaps my cidr",
                vec![a.clone(), b.clone(), g_overlaps_me],
                vec!["b"],
                vec!["g"],
            ),
            (
                "malformed key skipped, others fine",
                vec![a.clone(), b.clone(), h_bad_key],
                vec!["b"],
                vec!["h"],
            ),
            (
                "own node not listed yet",
                vec![b.clone()],
                vec!["b"],
                vec![],
            ),
        ];
        for (name, nodes, peers, skipped) in cases {
            let s = desired_state("a", &me, &nodes, 25);
            assert_eq!(peer_names(&s), peers, "peers: {name}");
            assert_eq!(skipped_names(&s), skipped, "skipped: {name}");
        }
    }

    /// `node(...)` with InternalIPs `ips` and, if given, a host-addresses annotation.
    fn hosted(mut rec: NodeRecord, ips: &[&str], published: Option<&str>) -> NodeRecord {
        rec.internal_ips = ips.iter().map(|s| s.parse().unwrap()).collect();
        if let Some(p) = published {
            rec.annotations
                .insert(ANNOTATION_HOST_ADDRESSES.into(), p.into());
        }
        rec
    }

    #[test]
    fn table_of_host_encryption() {
        let me = key(1);
        let a = |published: Option<&str>| {
            hosted(
                node(
                    "a",
                    Some(me),
                    "192.0.2.11",
                    &["198.18.1.0/24", "2001:db8:1::/64"],
                ),
                &["192.0.2.11", "2001:db8::11"],
                published,
            )
        };
        let b = |published: Option<&str>| {
            hosted(
                node(
                    "b",
                    Some(key(2)),
                    "192.0.2.12",
                    &["198.18.2.0/24", "2001:db8:2::/64"],
                ),
                &["192.0.2.12", "2001:db8::12"],
                published,
            )
        };
        let c = |ip: &str, published: Option<&str>| {
            hosted(
                node("c", Some(key(3)), ip, &["198.18.3.0/24"]),
                &[ip],
                published,
            )
        };
        let both = Some("192.0.2.11,2001:db8::11");
        // (case, nodes, b's allowed IPs, peer hosts, host routes "cidr>src", warnings "node: reason")
        type Case = (
            &'static str,
            Vec<NodeRecord>,
            Vec<&'static str>,
            Vec<&'static str>,
            Vec<&'static str>,
            Vec<&'static str>,
        );
        let b_pods = vec!["198.18.2.0/24", "2001:db8:2::/64"];
        let cases: Vec<Case> = vec![
            (
                "neither publishes",
                vec![a(None), b(None)],
                b_pods.clone(),
                vec![],
                vec![],
                vec![],
            ),
            (
                "only this node publishes",
                vec![a(both), b(None)],
                b_pods.clone(),
                vec![],
                vec![],
                vec![],
            ),
            (
                "only the peer publishes",
                vec![a(None), b(Some("192.0.2.12"))],
                b_pods.clone(),
                vec![],
                vec![],
                vec![],
            ),
            (
                "both, dual stack",
                vec![a(both), b(Some("192.0.2.12,2001:db8::12"))],
                vec![
                    "192.0.2.12/32",
                    "198.18.2.0/24",
                    "2001:db8::12/128",
                    "2001:db8:2::/64",
                ],
                vec!["192.0.2.12", "2001:db8::12"],
                vec!["198.18.2.0/24>192.0.2.11", "2001:db8:2::/64>2001:db8::11"],
                vec![],
            ),
            (
                "this node has no IPv6 host address: no IPv6 route",
                vec![a(Some("192.0.2.11")), b(Some("192.0.2.12"))],
                vec!["192.0.2.12/32", "198.18.2.0/24", "2001:db8:2::/64"],
                vec!["192.0.2.12"],
                vec!["198.18.2.0/24>192.0.2.11"],
                vec![],
            ),
            (
                "peer claims an address that is not its InternalIP",
                vec![a(both), b(Some("192.0.2.13"))],
                b_pods.clone(),
                vec![],
                vec![],
                vec![
                    "b: v1.wgmesh.io/host-addresses entry 192.0.2.13 is not one of the node's InternalIPs",
                ],
            ),
            (
                "two peers share an address: neither gets it",
                vec![
                    a(both),
                    hosted(b(None), &["192.0.2.50"], Some("192.0.2.50")),
                    c("192.0.2.50", Some("192.0.2.50")),
                ],
                b_pods.clone(),
                vec![],
                vec![],
                vec![
                    "b: host address 192.0.2.50 is also published by node c",
                    "c: host address 192.0.2.50 is also published by node b",
                ],
            ),
            (
                "peer's address inside a pod CIDR",
                vec![
                    a(both),
                    hosted(b(None), &["198.18.3.7"], Some("198.18.3.7")),
                    c("192.0.2.13", None),
                ],
                b_pods.clone(),
                vec![],
                vec![],
                vec!["b: host address 198.18.3.7 lies in a pod CIDR"],
            ),
            (
                "peer claims this node's address",
                vec![
                    a(both),
                    hosted(b(None), &["192.0.2.11"], Some("192.0.2.11")),
                ],
                b_pods.clone(),
                vec![],
                vec![],
                vec!["b: host address 192.0.2.11 is this node's own"],
            ),
            (
                "this node's own annotation is malformed",
                vec![a(Some("x")), b(Some("192.0.2.12"))],
                b_pods.clone(),
                vec![],
                vec![],
                vec!["a: malformed v1.wgmesh.io/host-addresses entry \"x\""],
            ),
        ];
        // The agent passes what it is about to publish: the same result as once it is published.
        let given: Vec<IpAddr> = vec!["192.0.2.11".parse().unwrap()];
        let s = desired_state_with_hosts(
            "a",
            &me,
            &[a(None), b(Some("192.0.2.12"))],
            25,
            Some(&given),
        );
        assert_eq!(
            s.host_routes.len(),
            1,
            "given addresses count before the annotation"
        );
        let s =
            desired_state_with_hosts("a", &me, &[a(both), b(Some("192.0.2.12"))], 25, Some(&[]));
        assert!(
            s.host_routes.is_empty() && s.peer_hosts.is_empty(),
            "given none: off"
        );
        for (name, nodes, allowed, hosts, routes, warnings) in cases {
            let s = desired_state("a", &me, &nodes, 25);
            let got: Vec<String> = s.peers[&key(2)]
                .allowed_ips
                .iter()
                .map(|n| n.to_string())
                .collect();
            assert_eq!(got, allowed, "allowed IPs: {name}");
            let got: Vec<String> = s.peer_hosts.iter().map(|h| h.to_string()).collect();
            assert_eq!(got, hosts, "peer hosts: {name}");
            let got: Vec<String> = s
                .host_routes
                .iter()
                .map(|(c, src)| format!("{c}>{src}"))
                .collect();
            assert_eq!(got, routes, "host routes: {name}");
            let got: Vec<String> = s
                .host_warnings
                .iter()
                .map(|w| format!("{}: {}", w.node, w.reason))
                .collect();
            assert_eq!(got, warnings, "warnings: {name}");
            assert!(s.skipped.is_empty(), "pod peering unaffected: {name}");
        }
    }

    #[test]
    fn five_thousand_nodes_and_overlaps_among_them() {
        let me = key(1);
        let mut nodes: Vec<NodeRecord> = (0..5000u32)
            .map(|i| {
                let mut b = [0u8; 32];
                b[..4].copy_from_slice(&(i + 7).to_be_bytes());
                b[31] = 9;
                let cidr = format!("10.{}.{}.0/24", i / 256, i % 256);
                node(
                    &format!("n{i:04}"),
                    Some(PublicKey::from_bytes(b)),
                    "192.0.2.50",
                    &[cidr.as_str()],
                )
            })
            .collect();
        nodes[0].name = "a".into();
        nodes[0]
            .annotations
            .insert(ANNOTATION_PUBLIC_KEY.into(), me.to_string());
        let s = desired_state("a", &me, &nodes, 25);
        assert_eq!(s.peers.len(), 4999);
        assert!(s.peer_hosts.is_empty() && s.host_routes.is_empty());
        // Everyone publishes a host address of its own: host encryption with every peer.
        for (i, n) in nodes.iter_mut().enumerate() {
            let ip = format!("192.0.{}.{}", 100 + i / 250, 1 + i % 250);
            n.internal_ips = vec![ip.parse().unwrap()];
            n.annotations.insert(ANNOTATION_HOST_ADDRESSES.into(), ip);
        }
        let s = desired_state("a", &me, &nodes, 25);
        assert_eq!(
            (s.peers.len(), s.peer_hosts.len(), s.host_routes.len()),
            (4999, 4999, 4999)
        );
        assert!(s.host_warnings.is_empty(), "{:?}", &s.host_warnings[..3]);
        assert!(
            s.host_routes
                .values()
                .all(|src| src.to_string() == "192.0.100.1")
        );
        // A wide CIDR on one node knocks out only itself and the nodes it overlaps.
        nodes[4999].pod_cidrs = vec!["10.3.0.0/16".into()];
        let s = desired_state("a", &me, &nodes, 25);
        let skipped: BTreeSet<&str> = s.skipped.iter().map(|x| x.node.as_str()).collect();
        assert!(skipped.contains("n4999"));
        assert!(
            skipped.contains("n0768") && skipped.contains("n1023"),
            "10.3.x.0/24 nodes overlap"
        );
        assert_eq!(skipped.len(), 257, "{skipped:?}");
    }

    #[test]
    fn peers_carry_endpoint_cidrs_and_cidr_sets_are_split_local_remote() {
        let me = key(1);
        let nodes = vec![
            node("a", Some(me), "192.0.2.11", &["198.18.1.0/24"]),
            node(
                "b",
                Some(key(2)),
                "192.0.2.12",
                &["198.18.2.0/24", "2001:db8:2::/64"],
            ),
        ];
        let s = desired_state("a", &me, &nodes, 25);
        let p = &s.peers[&key(2)];
        assert_eq!(p.endpoint, "192.0.2.12:51820".parse().unwrap());
        assert_eq!(p.keepalive, 25);
        let ips: Vec<String> = p.allowed_ips.iter().map(|n| n.to_string()).collect();
        assert_eq!(ips, ["198.18.2.0/24", "2001:db8:2::/64"]);
        assert!(s.self_seen);
        assert_eq!(s.local_cidrs, ["198.18.1.0/24".parse().unwrap()].into());
        assert_eq!(s.remote_cidrs.len(), 2);
        let c = node("c", None, "192.0.2.13", &["198.18.3.0/24"]);
        let with_c = desired_state(
            "a",
            &me,
            &[nodes[0].clone(), nodes[1].clone(), c.clone()],
            25,
        );
        assert_eq!(
            with_c.cluster_cidrs.len(),
            3,
            "unpeered nodes still count as cluster CIDRs"
        );
        assert_eq!(with_c.remote_cidrs.len(), 2);
        let c = node("c", None, "192.0.2.13", &["198.18.3.0/24"]);
        let s = desired_state("a", &me, &[c], 25);
        assert!(
            s.skipped[0].expected,
            "a missing key is expected during start-up"
        );
    }

    fn spec(n: u8, ep: &str, cidrs: &[&str]) -> PeerSpec {
        PeerSpec {
            node: format!("n{n}"),
            public_key: key(n),
            endpoint: ep.parse().unwrap(),
            allowed_ips: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            keepalive: 25,
        }
    }

    fn seen(s: &PeerSpec, handshake_ago: Option<u64>, now: SystemTime) -> ObservedPeer {
        ObservedPeer {
            endpoint: Some(s.endpoint),
            allowed_ips: s.allowed_ips.iter().rev().copied().collect(),
            keepalive: s.keepalive,
            last_handshake: handshake_ago.map(|a| now - Duration::from_secs(a)),
            ..Default::default()
        }
    }

    #[test]
    fn table_of_diffs() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let p2 = spec(2, "192.0.2.12:51820", &["198.18.2.0/24", "2001:db8:2::/64"]);
        let p3 = spec(3, "192.0.2.13:51820", &["198.18.3.0/24"]);
        let desired: BTreeMap<_, _> =
            [(p2.public_key, p2.clone()), (p3.public_key, p3.clone())].into();

        let in_sync: BTreeMap<_, _> = [
            (key(2), seen(&p2, Some(5), now)),
            (key(3), seen(&p3, None, now)),
        ]
        .into();
        assert!(
            diff(&desired, &in_sync, true, now).is_empty(),
            "in sync: nothing to do"
        );

        let mut stale = in_sync.clone();
        stale.insert(key(9), ObservedPeer::default());
        let d = diff(&desired, &stale, false, now);
        assert!(d.is_empty(), "no pruning before the initial sync");
        let d = diff(&desired, &stale, true, now);
        assert_eq!(d.remove, vec![key(9)]);

        let only_p2: BTreeMap<_, _> = [(key(2), seen(&p2, Some(5), now))].into();
        let d = diff(&desired, &only_p2, true, now);
        assert_eq!(d.add, vec![p3.clone()]);

        let mut cidr_changed = in_sync.clone();
        cidr_changed.get_mut(&key(3)).unwrap().allowed_ips =
            vec!["198.18.33.0/24".parse().unwrap()];
        assert_eq!(
            diff(&desired, &cidr_changed, true, now).update,
            vec![p3.clone()]
        );

        let mut keepalive_changed = in_sync.clone();
        keepalive_changed.get_mut(&key(3)).unwrap().keepalive = 0;
        assert_eq!(
            diff(&desired, &keepalive_changed, true, now).update,
            vec![p3.clone()]
        );

        let mut roamed_live = in_sync.clone();
        roamed_live.get_mut(&key(2)).unwrap().endpoint = Some("203.0.113.7:4000".parse().unwrap());
        assert!(
            diff(&desired, &roamed_live, true, now).is_empty(),
            "live roamed endpoint is kept"
        );

        let mut roamed_dead = in_sync.clone();
        let e = roamed_dead.get_mut(&key(2)).unwrap();
        e.endpoint = Some("203.0.113.7:4000".parse().unwrap());
        e.last_handshake = Some(now - Duration::from_secs(600));
        assert_eq!(
            diff(&desired, &roamed_dead, true, now).update,
            vec![p2.clone()]
        );

        let mut no_endpoint = in_sync.clone();
        no_endpoint.get_mut(&key(3)).unwrap().endpoint = None;
        assert_eq!(diff(&desired, &no_endpoint, true, now).update, vec![p3]);
    }
}
