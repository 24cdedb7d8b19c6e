//! `wgmeshctl nodes`: every Node's wgmesh identity as the cluster publishes it, and what is wrong
//! with it. Validity is the agent's own ([`NodeRecord::mesh_info`]); on top of it this finds what
//! only a cluster-wide view shows: keys published twice and overlapping pod CIDRs.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::SystemTime,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use wgmesh_api::{
    NodeRecord, PublicKey,
    annotations::{ANNOTATION_KEY_CREATED, ANNOTATION_LISTEN_PORT, ANNOTATION_PUBLIC_KEY},
};

use crate::{
    cli::{GlobalArgs, NodesArgs, Output},
    cluster,
    exit::Exit,
    render,
    rotate::{self, RotationView},
};

/// Version of the `nodes` JSON output.
pub const SCHEMA_VERSION: u32 = 1;

/// One Node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRow {
    pub name: String,
    /// The published public key, when it parses.
    pub public_key: Option<PublicKey>,
    /// Its first 8 base64 characters.
    pub fingerprint: Option<String>,
    /// InternalIP (IPv4 preferred, as the agent picks it) and listen port.
    pub endpoint: Option<String>,
    /// `spec.podCIDRs` as written on the Node.
    pub pod_cidrs: Vec<String>,
    pub key_generation: Option<u64>,
    /// `v1.wgmesh.io/key-created` as published (RFC 3339).
    pub key_created: Option<String>,
    pub key_age_seconds: Option<u64>,
    pub rotation: RotationView,
    /// Empty when the node is fine.
    pub problems: Vec<String>,
}

/// The `nodes` output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodesReport {
    pub schema_version: u32,
    pub generated_at: String,
    pub nodes: Vec<NodeRow>,
    /// Number of nodes with at least one problem.
    pub nodes_with_problems: usize,
}

fn parsed_key(rec: &NodeRecord) -> Option<PublicKey> {
    rec.annotations
        .get(ANNOTATION_PUBLIC_KEY)
        .and_then(|k| k.parse().ok())
}

fn parsed_cidrs(rec: &NodeRecord) -> Vec<IpNet> {
    rec.pod_cidrs
        .iter()
        .filter_map(|c| c.trim().parse::<IpNet>().ok())
        .map(|n| n.trunc())
        .collect()
}

/// The endpoint as the agent would use it, also for a node with an otherwise invalid record.
fn endpoint(rec: &NodeRecord) -> Option<SocketAddr> {
    if let Ok(info) = rec.mesh_info() {
        return Some(SocketAddr::new(info.endpoint_ip, info.listen_port));
    }
    let ip: IpAddr = rec
        .internal_ips
        .iter()
        .find(|ip| ip.is_ipv4())
        .or_else(|| rec.internal_ips.first())
        .copied()?;
    let port = rec
        .annotations
        .get(ANNOTATION_LISTEN_PORT)?
        .trim()
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)?;
    Some(SocketAddr::new(ip, port))
}

/// The rows for `records` at time `now`, with every problem found.
pub fn node_rows(records: &[NodeRecord], now: SystemTime) -> Vec<NodeRow> {
    let mut records: Vec<&NodeRecord> = records.iter().collect();
    records.sort_by(|a, b| a.name.cmp(&b.name));

    let mut by_key: BTreeMap<PublicKey, Vec<&str>> = BTreeMap::new();
    for rec in &records {
        if let Some(k) = parsed_key(rec) {
            by_key.entry(k).or_default().push(&rec.name);
        }
    }
    let cidrs: Vec<(&str, Vec<IpNet>)> = records
        .iter()
        .map(|r| (r.name.as_str(), parsed_cidrs(r)))
        .collect();

    let mut rows = Vec::with_capacity(records.len());
    for (i, rec) in records.iter().enumerate() {
        let mut problems = Vec::new();
        let info = rec.mesh_info();
        if let Err(p) = &info {
            problems.push(p.to_string());
        }
        let public_key = parsed_key(rec);
        if let Some(k) = &public_key {
            let others: Vec<&str> = by_key[k]
                .iter()
                .copied()
                .filter(|n| *n != rec.name)
                .collect();
            if !others.is_empty() {
                problems.push(format!(
                    "duplicate key: public key {} is also published by {}",
                    k.fingerprint(),
                    others.join(", ")
                ));
            }
        }
        for (j, (other, theirs)) in cidrs.iter().enumerate() {
            if i == j {
                continue;
            }
            for mine in &cidrs[i].1 {
                if let Some(t) = theirs
                    .iter()
                    .find(|t| t.contains(&mine.network()) || mine.contains(&t.network()))
                {
                    problems.push(format!(
                        "overlapping pod CIDRs: {mine} overlaps {t} of node {other}"
                    ));
                }
            }
        }
        let key_created = rec.annotations.get(ANNOTATION_KEY_CREATED).cloned();
        let key_age_seconds = match key_created.as_deref() {
            None => None,
            Some(text) => match render::parse_rfc3339(text) {
                Some(t) => Some(render::age_secs(t, now)),
                None => {
                    problems.push(format!(
                        "malformed {ANNOTATION_KEY_CREATED} annotation {text:?}: want an RFC 3339 time"
                    ));
                    None
                }
            },
        };
        let (rotation, rotation_problems) = rotate::rotation_view(rec);
        problems.extend(rotation_problems);
        let key_generation = match &info {
            Ok(i) => i.key_generation,
            Err(_) => rec
                .annotations
                .get(wgmesh_api::annotations::ANNOTATION_KEY_GENERATION)
                .and_then(|g| g.trim().parse().ok()),
        };
        rows.push(NodeRow {
            name: rec.name.clone(),
            fingerprint: public_key.map(|k| k.fingerprint()),
            public_key,
            endpoint: endpoint(rec).map(|e| e.to_string()),
            pod_cidrs: rec.pod_cidrs.clone(),
            key_generation,
            key_created,
            key_age_seconds,
            rotation,
            problems,
        });
    }
    rows
}

impl NodesReport {
    pub fn new(records: &[NodeRecord], now: SystemTime) -> Self {
        let nodes = node_rows(records, now);
        Self {
            schema_version: SCHEMA_VERSION,
            generated_at: render::rfc3339(now),
            nodes_with_problems: nodes.iter().filter(|n| !n.problems.is_empty()).count(),
            nodes,
        }
    }

    pub fn table(&self) -> String {
        let mut t = render::table([
            "NAME",
            "KEY",
            "ENDPOINT",
            "POD CIDRS",
            "GEN",
            "KEY AGE",
            "ROTATION",
            "PROBLEMS",
        ]);
        for n in &self.nodes {
            t.add_row([
                n.name.clone(),
                render::or_dash(n.fingerprint.as_ref()),
                render::or_dash(n.endpoint.as_ref()),
                if n.pod_cidrs.is_empty() {
                    "-".into()
                } else {
                    n.pod_cidrs.join(",")
                },
                render::or_dash(n.key_generation),
                render::or_dash(n.key_age_seconds.map(render::short_duration)),
                n.rotation.summary(),
                if n.problems.is_empty() {
                    "-".into()
                } else {
                    n.problems.join("; ")
                },
            ]);
        }
        render::table_text(&t)
    }
}

pub async fn run(global: &GlobalArgs, args: &NodesArgs) -> anyhow::Result<Exit> {
    let client = cluster::client(global, rotate::API_TIMEOUT).await?;
    let records = cluster::list_nodes(&client).await?;
    let report = NodesReport::new(&records, SystemTime::now());
    render::print(&match global.output {
        Output::Table => report.table(),
        Output::Json => render::json_text(&report)?,
    })?;
    if report.nodes_with_problems > 0 {
        let names: Vec<&str> = report
            .nodes
            .iter()
            .filter(|n| !n.problems.is_empty())
            .map(|n| n.name.as_str())
            .collect();
        render::warn(format!(
            "{} node(s) with problems: {}",
            names.len(),
            names.join(", ")
        ));
        if args.check {
            return Ok(Exit::CheckFailed);
        }
    }
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use wgmesh_api::annotations::ANNOTATION_KEY_GENERATION;

    use super::*;
    use crate::test_support::keys;

    fn key(n: u8) -> String {
        PublicKey::from_bytes([n; 32]).to_string()
    }

    fn node(name: &str, key: Option<&str>, ip: &str, cidrs: &[&str]) -> NodeRecord {
        let mut annotations = BTreeMap::from([
            (ANNOTATION_LISTEN_PORT.to_string(), "51820".to_string()),
            (ANNOTATION_KEY_GENERATION.to_string(), "1".to_string()),
            (
                ANNOTATION_KEY_CREATED.to_string(),
                "1970-01-01T00:00:00Z".to_string(),
            ),
        ]);
        if let Some(k) = key {
            annotations.insert(ANNOTATION_PUBLIC_KEY.to_string(), k.to_string());
        }
        NodeRecord {
            name: name.into(),
            annotations,
            internal_ips: vec![ip.parse().unwrap()],
            pod_cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn problems_of(rows: &[NodeRow], name: &str) -> Vec<String> {
        rows.iter()
            .find(|r| r.name == name)
            .unwrap()
            .problems
            .clone()
    }

    #[test]
    fn table_of_node_problems() {
        let now = UNIX_EPOCH + Duration::from_secs(3600);
        let (k1, k2, k3) = (key(1), key(2), key(3));
        type Case = (
            &'static str,
            Vec<NodeRecord>,
            Vec<(&'static str, Vec<&'static str>)>,
        );
        let cases: Vec<Case> = vec![
            (
                "healthy pair",
                vec![
                    node("a", Some(&k1), "192.0.2.1", &["198.18.1.0/24"]),
                    node("b", Some(&k2), "192.0.2.2", &["198.18.2.0/24"]),
                ],
                vec![("a", vec![]), ("b", vec![])],
            ),
            (
                "missing and malformed keys",
                vec![
                    node("a", None, "192.0.2.1", &["198.18.1.0/24"]),
                    node("b", Some("not-a-key"), "192.0.2.2", &["198.18.2.0/24"]),
                ],
                vec![
                    ("a", vec!["no v1.wgmesh.io/public-key annotation"]),
                    ("b", vec!["malformed v1.wgmesh.io/public-key annotation"]),
                ],
            ),
            (
                "duplicate key",
                vec![
                    node("a", Some(&k1), "192.0.2.1", &["198.18.1.0/24"]),
                    node("b", Some(&k1), "192.0.2.2", &["198.18.2.0/24"]),
                    node("c", Some(&k3), "192.0.2.3", &["198.18.3.0/24"]),
                ],
                vec![
                    (
                        "a",
                        vec!["duplicate key: public key AQEBAQEB is also published by b"],
                    ),
                    (
                        "b",
                        vec!["duplicate key: public key AQEBAQEB is also published by a"],
                    ),
                    ("c", vec![]),
                ],
            ),
            (
                "overlapping pod CIDRs",
                vec![
                    node("a", Some(&k1), "192.0.2.1", &["198.18.0.0/16"]),
                    node("b", Some(&k2), "192.0.2.2", &["198.18.2.0/24"]),
                    node("c", Some(&k3), "192.0.2.3", &["198.19.0.0/24"]),
                ],
                vec![
                    (
                        "a",
                        vec![
                            "overlapping pod CIDRs: 198.18.0.0/16 overlaps 198.18.2.0/24 of node b",
                        ],
                    ),
                    (
                        "b",
                        vec![
                            "overlapping pod CIDRs: 198.18.2.0/24 overlaps 198.18.0.0/16 of node a",
                        ],
                    ),
                    ("c", vec![]),
                ],
            ),
            (
                "no address, no pod CIDR",
                vec![node("a", Some(&k1), "192.0.2.1", &[])],
                vec![("a", vec!["no pod CIDRs in spec.podCIDRs"])],
            ),
        ];
        for (name, records, want) in cases {
            let rows = node_rows(&records, now);
            for (node, expected) in want {
                let got = problems_of(&rows, node);
                assert_eq!(got.len(), expected.len(), "{name}/{node}: {got:?}");
                for (g, e) in got.iter().zip(&expected) {
                    assert!(
                        g.starts_with(e),
                        "{name}/{node}: {g:?} does not start with {e:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn malformed_metadata_annotations_are_problems_too() {
        let mut a = node("a", Some(&key(1)), "192.0.2.1", &["198.18.1.0/24"]);
        a.annotations
            .insert(ANNOTATION_KEY_CREATED.into(), "last tuesday".into());
        a.annotations.insert(
            wgmesh_api::annotations::ANNOTATION_ROTATE_REQUEST.into(),
            "next".into(),
        );
        let rows = node_rows(&[a], UNIX_EPOCH);
        assert_eq!(rows[0].problems.len(), 2, "{:?}", rows[0].problems);
        assert_eq!(rows[0].key_age_seconds, None);
    }

    #[test]
    fn rows_show_identity_age_and_rotation() {
        let now = UNIX_EPOCH + Duration::from_secs(7500);
        let mut a = node("a", Some(&key(1)), "192.0.2.1", &["198.18.1.0/24"]);
        a.internal_ips.insert(0, "2001:db8::1".parse().unwrap());
        a.annotations.insert(
            wgmesh_api::annotations::ANNOTATION_ROTATE_REQUEST.into(),
            "2".into(),
        );
        let b = node("b", Some("%%"), "192.0.2.2", &["198.18.2.0/24"]);
        let report = NodesReport::new(&[b, a], now);
        let a = &report.nodes[0];
        assert_eq!(a.name, "a", "sorted by name");
        assert_eq!(a.fingerprint.as_deref(), Some("AQEBAQEB"));
        assert_eq!(a.endpoint.as_deref(), Some("192.0.2.1:51820"));
        assert_eq!(a.key_generation, Some(1));
        assert_eq!(a.key_age_seconds, Some(7500));
        assert_eq!(a.rotation.summary(), "requested gen 2");
        let b = &report.nodes[1];
        assert_eq!(
            b.endpoint.as_deref(),
            Some("192.0.2.2:51820"),
            "shown although the key is bad"
        );
        assert_eq!(b.fingerprint, None);
        assert_eq!(report.nodes_with_problems, 1);

        let table = report.table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[0].starts_with("NAME") && lines[0].contains("PROBLEMS"),
            "{table}"
        );
        assert!(
            lines[1].starts_with("a ") && lines[1].contains("2h5m"),
            "{table}"
        );
        assert!(lines[2].contains("malformed"), "{table}");

        let v: serde_json::Value =
            serde_json::from_str(&render::json_text(&report).unwrap()).unwrap();
        assert_eq!(
            keys(&v),
            [
                "generated_at",
                "nodes",
                "nodes_with_problems",
                "schema_version"
            ]
        );
        assert_eq!(
            keys(&v["nodes"][0]),
            [
                "endpoint",
                "fingerprint",
                "key_age_seconds",
                "key_created",
                "key_generation",
                "name",
                "pod_cidrs",
                "problems",
                "public_key",
                "rotation"
            ]
        );
        assert_eq!(
            keys(&v["nodes"][0]["rotation"]),
            ["requested_generation", "state", "status"]
        );
        assert_eq!(v["nodes"][0]["rotation"]["state"], "requested");
        let back: NodesReport = serde_json::from_value(v).unwrap();
        assert_eq!(back, report, "the JSON reads back");
    }
}
