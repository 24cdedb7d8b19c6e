//! The cluster side: a kube-rs client (kubeconfig or in-cluster), reading Nodes into
//! [`NodeRecord`]s, and publishing this node's identity as annotations on its own Node.

use std::{collections::BTreeMap, path::Path};

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client, Config,
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use wgmesh_api::{
    NodeRecord, PublicKey,
    annotations::{
        ANNOTATION_KEY_CREATED, ANNOTATION_KEY_GENERATION, ANNOTATION_LISTEN_PORT,
        ANNOTATION_PUBLIC_KEY,
    },
};

/// Field manager / user agent name of the agent's writes.
pub const FIELD_MANAGER: &str = "wgmesh-agent";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read kubeconfig {path}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot build a Kubernetes client")]
    Client(#[source] kube::Error),
    #[error("cannot infer Kubernetes configuration (no kubeconfig, not in a cluster)")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("cannot publish annotations on Node {node}")]
    Publish {
        node: String,
        #[source]
        source: kube::Error,
    },
}

/// A client from an explicit kubeconfig file, or inferred (in-cluster service account, $KUBECONFIG, ~/.kube/config).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, Error> {
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
                path: path.display().to_string(),
                source,
            })?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| Error::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                })?
        }
        None => Config::infer().await.map_err(Error::Infer)?,
    };
    // A short connect timeout, so an unreachable API surfaces as an error (and a retry) quickly.
    config.connect_timeout = Some(std::time::Duration::from_secs(5));
    config.read_timeout = Some(std::time::Duration::from_secs(330));
    Client::try_from(config).map_err(Error::Client)
}

/// The fields wgmesh reads from a Node.
pub fn node_record(node: &Node) -> NodeRecord {
    let annotations = node
        .metadata
        .annotations
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect::<BTreeMap<_, _>>();
    let internal_ips = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(|addrs| {
            addrs
                .iter()
                .filter(|a| a.type_ == "InternalIP")
                .filter_map(|a| a.address.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let pod_cidrs = node
        .spec
        .as_ref()
        .map(|s| match (&s.pod_cidrs, &s.pod_cidr) {
            (Some(list), _) if !list.is_empty() => list.clone(),
            (_, Some(one)) => vec![one.clone()],
            _ => Vec::new(),
        })
        .unwrap_or_default();
    NodeRecord {
        name: node.metadata.name.clone().unwrap_or_default(),
        annotations,
        internal_ips,
        pod_cidrs,
    }
}

/// The identity this node publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub public_key: PublicKey,
    pub listen_port: u16,
    pub generation: u64,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

impl Identity {
    pub fn annotations(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (
                ANNOTATION_PUBLIC_KEY.to_owned(),
                self.public_key.to_string(),
            ),
            (
                ANNOTATION_LISTEN_PORT.to_owned(),
                self.listen_port.to_string(),
            ),
            (
                ANNOTATION_KEY_GENERATION.to_owned(),
                self.generation.to_string(),
            ),
            (ANNOTATION_KEY_CREATED.to_owned(), rfc3339(self.created)),
        ])
    }

    /// True when `record` already carries exactly this identity (no write needed).
    pub fn is_published_on(&self, record: &NodeRecord) -> bool {
        self.annotations()
            .iter()
            .all(|(k, v)| record.annotations.get(k) == Some(v))
    }
}

/// Writes the identity annotations with a JSON merge patch: it touches only these keys and needs
/// only `patch` on nodes. Returns without writing when they are already there.
pub async fn publish(client: &Client, node: &str, id: &Identity) -> Result<bool, Error> {
    let api: Api<Node> = Api::all(client.clone());
    let err = |source| Error::Publish {
        node: node.to_owned(),
        source,
    };
    let current = api.get(node).await.map_err(err)?;
    if id.is_published_on(&node_record(&current)) {
        return Ok(false);
    }
    let patch = serde_json::json!({ "metadata": { "annotations": id.annotations() } });
    api.patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(err)?;
    Ok(true)
}

/// Sets one annotation on a Node (merge patch).
pub async fn patch_annotation(
    client: &Client,
    node: &str,
    key: &str,
    value: &str,
) -> Result<(), Error> {
    let api: Api<Node> = Api::all(client.clone());
    let patch = serde_json::json!({ "metadata": { "annotations": { key: value } } });
    api.patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| Error::Publish {
            node: node.to_owned(),
            source,
        })?;
    Ok(())
}

/// Seconds since the epoch as RFC 3339 UTC (`2026-11-26T05:02:56Z`), without a date crate.
pub fn rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};
    use kube::api::ObjectMeta;

    use super::*;

    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_669_376), "2026-11-26T05:02:56Z");
    }

    #[test]
    fn node_is_read_into_a_record() {
        let node = Node {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                annotations: Some(
                    [(ANNOTATION_LISTEN_PORT.to_string(), "51820".to_string())].into(),
                ),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: Some("198.18.1.0/24".into()),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(vec![
                    NodeAddress {
                        type_: "Hostname".into(),
                        address: "n1".into(),
                    },
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: "192.0.2.11".into(),
                    },
                    NodeAddress {
                        type_: "ExternalIP".into(),
                        address: "203.0.113.1".into(),
                    },
                ]),
                ..Default::default()
            }),
        };
        let r = node_record(&node);
        assert_eq!(r.name, "n1");
        assert_eq!(
            r.internal_ips,
            vec!["192.0.2.11".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(r.pod_cidrs, vec!["198.18.1.0/24"]);
        assert_eq!(r.annotations.len(), 1);
    }

    #[test]
    fn identity_is_published_only_when_different() {
        let id = Identity {
            public_key: PublicKey::from_bytes([3; 32]),
            listen_port: 51820,
            generation: 1,
            created: 0,
        };
        let mut rec = NodeRecord::default();
        assert!(!id.is_published_on(&rec));
        rec.annotations = id.annotations();
        rec.annotations.insert("other".into(), "x".into());
        assert!(id.is_published_on(&rec));
    }
}
