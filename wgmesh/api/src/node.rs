//! How a Kubernetes Node reads in mesh terms. The agent and `wgmeshctl` both convert a Node into a
//! [`NodeRecord`] (the few fields wgmesh looks at) and parse it here, so they agree on what is valid.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use ipnet::IpNet;

use crate::{
    annotations::{
        ANNOTATION_HOST_ADDRESSES, ANNOTATION_KEY_GENERATION, ANNOTATION_LISTEN_PORT,
        ANNOTATION_PUBLIC_KEY,
    },
    key::{KeyError, PublicKey},
};

/// The parts of a Node that wgmesh reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeRecord {
    pub name: String,
    pub annotations: BTreeMap<String, String>,
    /// `status.addresses` of type `InternalIP`, in order.
    pub internal_ips: Vec<IpAddr>,
    /// `spec.podCIDRs` (or `spec.podCIDR` when the list is empty), unparsed.
    pub pod_cidrs: Vec<String>,
}

/// A node that can be peered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeMeshInfo {
    pub name: String,
    pub public_key: PublicKey,
    pub listen_port: u16,
    pub endpoint_ip: IpAddr,
    /// Normalised (host bits cleared), sorted, without duplicates.
    pub pod_cidrs: Vec<IpNet>,
    pub key_generation: Option<u64>,
}

/// Why a node cannot be peered with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeProblem {
    #[error("no {ANNOTATION_PUBLIC_KEY} annotation (agent not running there yet?)")]
    MissingKey,
    #[error("malformed {ANNOTATION_PUBLIC_KEY} annotation: {0}")]
    MalformedKey(KeyError),
    #[error("missing {ANNOTATION_LISTEN_PORT} annotation")]
    MissingPort,
    #[error("malformed {ANNOTATION_LISTEN_PORT} annotation {0:?}: want a port 1-65535")]
    MalformedPort(String),
    #[error("malformed {ANNOTATION_KEY_GENERATION} annotation {0:?}")]
    MalformedGeneration(String),
    #[error("no InternalIP in status.addresses")]
    NoInternalIp,
    #[error("no pod CIDRs in spec.podCIDRs")]
    NoPodCidrs,
    #[error("malformed pod CIDR {0:?}")]
    MalformedPodCidr(String),
}

impl NodeProblem {
    /// A node without a key is normal while its agent starts; everything else is a misconfiguration.
    pub fn is_expected_during_startup(&self) -> bool {
        matches!(self, Self::MissingKey)
    }
}

impl NodeRecord {
    /// The host addresses the node publishes ([`ANNOTATION_HOST_ADDRESSES`]): empty when it does
    /// not encrypt host traffic. Every address must be one of the node's InternalIPs (which the
    /// kubelet, not the agent, writes), so an agent cannot claim another node's address.
    pub fn host_addresses(&self) -> Result<Vec<IpAddr>, String> {
        let Some(text) = self.annotations.get(ANNOTATION_HOST_ADDRESSES) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let ip: IpAddr = part
                .parse()
                .map_err(|_| format!("malformed {ANNOTATION_HOST_ADDRESSES} entry {part:?}"))?;
            if !self.internal_ips.contains(&ip) {
                return Err(format!(
                    "{ANNOTATION_HOST_ADDRESSES} entry {ip} is not one of the node's InternalIPs"
                ));
            }
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
        Ok(out)
    }

    /// Reads the node's mesh identity. Pure: the same record always gives the same answer.
    pub fn mesh_info(&self) -> Result<NodeMeshInfo, NodeProblem> {
        let key = self
            .annotations
            .get(ANNOTATION_PUBLIC_KEY)
            .ok_or(NodeProblem::MissingKey)?;
        let public_key: PublicKey = key.parse().map_err(NodeProblem::MalformedKey)?;
        let port = self
            .annotations
            .get(ANNOTATION_LISTEN_PORT)
            .ok_or(NodeProblem::MissingPort)?;
        let listen_port = match port.trim().parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => return Err(NodeProblem::MalformedPort(port.clone())),
        };
        let key_generation = match self.annotations.get(ANNOTATION_KEY_GENERATION) {
            None => None,
            Some(g) => Some(
                g.trim()
                    .parse::<u64>()
                    .map_err(|_| NodeProblem::MalformedGeneration(g.clone()))?,
            ),
        };
        // Prefer IPv4 for the endpoint when a node is dual-stack: it is what most underlays route.
        let endpoint_ip = self
            .internal_ips
            .iter()
            .find(|ip| ip.is_ipv4())
            .or_else(|| self.internal_ips.first())
            .copied()
            .ok_or(NodeProblem::NoInternalIp)?;
        let mut pod_cidrs = Vec::with_capacity(self.pod_cidrs.len());
        for c in &self.pod_cidrs {
            let net: IpNet = c
                .trim()
                .parse()
                .map_err(|_| NodeProblem::MalformedPodCidr(c.clone()))?;
            pod_cidrs.push(net.trunc());
        }
        pod_cidrs.sort();
        pod_cidrs.dedup();
        if pod_cidrs.is_empty() {
            return Err(NodeProblem::NoPodCidrs);
        }
        Ok(NodeMeshInfo {
            name: self.name.clone(),
            public_key,
            listen_port,
            endpoint_ip,
            pod_cidrs,
            key_generation,
        })
    }
}

impl fmt::Display for NodeMeshInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} key={} endpoint={}",
            self.name,
            self.public_key.fingerprint(),
            std::net::SocketAddr::new(self.endpoint_ip, self.listen_port)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

    fn record(annotations: &[(&str, &str)], ips: &[&str], cidrs: &[&str]) -> NodeRecord {
        NodeRecord {
            name: "n1".into(),
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            internal_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            pod_cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn table_of_host_addresses() {
        let ips = ["192.0.2.11", "2001:db8::11"];
        let ok = |v: &[&str]| {
            Ok(v.iter()
                .map(|s| s.parse().unwrap())
                .collect::<Vec<IpAddr>>())
        };
        type Case = (
            &'static str,
            Option<&'static str>,
            Result<Vec<IpAddr>, String>,
        );
        let cases: Vec<Case> = vec![
            ("absent: no host encryption", None, ok(&[])),
            ("one address", Some("192.0.2.11"), ok(&["192.0.2.11"])),
            (
                "dual stack, spaces, a repeat",
                Some(" 192.0.2.11, 2001:db8::11 ,192.0.2.11"),
                ok(&["192.0.2.11", "2001:db8::11"]),
            ),
            ("empty value", Some(""), ok(&[])),
            (
                "garbage",
                Some("192.0.2.11,nope"),
                Err(format!(
                    "malformed {ANNOTATION_HOST_ADDRESSES} entry \"nope\""
                )),
            ),
            (
                "another node's address",
                Some("192.0.2.12"),
                Err(format!(
                    "{ANNOTATION_HOST_ADDRESSES} entry 192.0.2.12 is not one of the node's InternalIPs"
                )),
            ),
        ];
        for (name, value, want) in cases {
            let annotations: Vec<(&str, &str)> = value
                .map(|v| (ANNOTATION_HOST_ADDRESSES, v))
                .into_iter()
                .collect();
            let rec = record(&annotations, &ips, &["198.18.1.0/24"]);
            assert_eq!(rec.host_addresses(), want, "{name}");
        }
    }

    #[test]
    fn table_of_node_records() {
        let good = [
            (ANNOTATION_PUBLIC_KEY, KEY),
            (ANNOTATION_LISTEN_PORT, "51820"),
        ];
        let cases: Vec<(&str, NodeRecord, Result<(), NodeProblem>)> = vec![
            (
                "valid",
                record(&good, &["192.0.2.11"], &["198.18.1.0/24"]),
                Ok(()),
            ),
            (
                "no key yet",
                record(
                    &[(ANNOTATION_LISTEN_PORT, "51820")],
                    &["192.0.2.11"],
                    &["198.18.1.0/24"],
                ),
                Err(NodeProblem::MissingKey),
            ),
            (
                "key not base64",
                record(
                    &[
                        (ANNOTATION_PUBLIC_KEY, "%%%"),
                        (ANNOTATION_LISTEN_PORT, "51820"),
                    ],
                    &["192.0.2.11"],
                    &["198.18.1.0/24"],
                ),
                Err(NodeProblem::MalformedKey(KeyError::Base64)),
            ),
            (
                "key too short",
                record(
                    &[
                        (ANNOTATION_PUBLIC_KEY, "AAAA"),
                        (ANNOTATION_LISTEN_PORT, "51820"),
                    ],
                    &["192.0.2.11"],
                    &["198.18.1.0/24"],
                ),
                Err(NodeProblem::MalformedKey(KeyError::Length(3))),
            ),
            (
                "port zero",
                record(
                    &[(ANNOTATION_PUBLIC_KEY, KEY), (ANNOTATION_LISTEN_PORT, "0")],
                    &["192.0.2.11"],
                    &["198.18.1.0/24"],
                ),
                Err(NodeProblem::MalformedPort("0".into())),
            ),
            (
                "port missing",
                record(
                    &[(ANNOTATION_PUBLIC_KEY, KEY)],
                    &["192.0.2.11"],
                    &["198.18.1.0/24"],
                ),
                Err(NodeProblem::MissingPort),
            ),
            (
                "no address",
                record(&good, &[], &["198.18.1.0/24"]),
                Err(NodeProblem::NoInternalIp),
            ),
            (
                "no pod cidr",
                record(&good, &["192.0.2.11"], &[]),
                Err(NodeProblem::NoPodCidrs),
            ),
            (
                "bad pod cidr",
                record(&good, &["192.0.2.11"], &["198.18.1.0/33"]),
                Err(NodeProblem::MalformedPodCidr("198.18.1.0/33".into())),
            ),
        ];
        for (name, rec, want) in cases {
            assert_eq!(rec.mesh_info().map(|_| ()), want, "case {name}");
        }
    }

    #[test]
    fn pod_cidrs_are_normalised_and_ipv4_endpoint_preferred() {
        let rec = record(
            &[
                (ANNOTATION_PUBLIC_KEY, KEY),
                (ANNOTATION_LISTEN_PORT, "51999"),
            ],
            &["2001:db8::11", "192.0.2.11"],
            &["198.18.1.7/24", "2001:db8:1::5/64", "198.18.1.0/24"],
        );
        let info = rec.mesh_info().unwrap();
        assert_eq!(info.endpoint_ip, "192.0.2.11".parse::<IpAddr>().unwrap());
        assert_eq!(info.listen_port, 51999);
        let cidrs: Vec<String> = info.pod_cidrs.iter().map(|c| c.to_string()).collect();
        assert_eq!(cidrs, ["198.18.1.0/24", "2001:db8:1::/64"]);
    }
}
