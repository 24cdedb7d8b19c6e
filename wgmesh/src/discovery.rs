//! The cluster side: a kube-rs client (kubeconfig or in-cluster), reading Nodes into
//! [`NodeRecord`]s, and publishing this node's identity as annotations on its own Node.

use std::{borrow::Cow, collections::BTreeMap, path::Path};

use k8s_openapi::{ClusterResourceScope, api::core::v1::Node};
use kube::{
    Api, Client, Config, Resource,
    api::{ObjectMeta, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::watcher,
};
use serde::Deserialize;
use wgmesh_api::{
    NodeRecord, PublicKey,
    annotations::{
        ANNOTATION_HOST_ADDRESSES, ANNOTATION_KEY_CREATED, ANNOTATION_KEY_GENERATION,
        ANNOTATION_LISTEN_PORT, ANNOTATION_PUBLIC_KEY,
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

/// The fields wgmesh reads from a Node (the same reading as the agent's watch, through
/// [`SlimNode`]).
pub fn node_record(node: &Node) -> NodeRecord {
    SlimNode::from(node).into_record()
}

impl From<&Node> for SlimNode {
    fn from(node: &Node) -> Self {
        Self {
            metadata: ObjectMeta {
                name: node.metadata.name.clone(),
                annotations: node.metadata.annotations.clone(),
                ..ObjectMeta::default()
            },
            spec: node.spec.as_ref().map(|s| SlimNodeSpec {
                pod_cidr: s.pod_cidr.clone(),
                pod_cidrs: s.pod_cidrs.clone(),
            }),
            status: node.status.as_ref().map(|s| SlimNodeStatus {
                addresses: s.addresses.as_ref().map(|addrs| {
                    addrs
                        .iter()
                        .map(|a| SlimNodeAddress {
                            type_: a.type_.clone(),
                            address: a.address.clone(),
                        })
                        .collect()
                }),
            }),
        }
    }
}

/// A Node as the agent watches it: only the fields [`node_record`] reads are decoded, everything
/// else (managedFields, conditions, images, labels ...) is skipped while parsing, so a list page
/// or a watch event never materialises it. Read through the same API path and kind as [`Node`].
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SlimNode {
    #[serde(default, deserialize_with = "slim_metadata")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<SlimNodeSpec>,
    #[serde(default)]
    pub status: Option<SlimNodeStatus>,
}

/// `spec` of a [`SlimNode`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimNodeSpec {
    #[serde(default, rename = "podCIDR")]
    pub pod_cidr: Option<String>,
    #[serde(default, rename = "podCIDRs")]
    pub pod_cidrs: Option<Vec<String>>,
}

/// `status` of a [`SlimNode`].
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SlimNodeStatus {
    #[serde(default)]
    pub addresses: Option<Vec<SlimNodeAddress>>,
}

/// One of `status.addresses`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SlimNodeAddress {
    #[serde(rename = "type", default)]
    pub type_: String,
    #[serde(default)]
    pub address: String,
}

/// The metadata fields kept: what [`node_record`] reads plus what the watcher needs (name and
/// resourceVersion; uid for identity).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SlimMetadata {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    resource_version: Option<String>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

fn slim_metadata<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = Option::<SlimMetadata>::deserialize(d)?;
    Ok(m.map(|m| ObjectMeta {
        name: m.name,
        uid: m.uid,
        resource_version: m.resource_version,
        annotations: m.annotations,
        ..Default::default()
    })
    .unwrap_or_default())
}

impl Resource for SlimNode {
    type DynamicType = ();
    type Scope = ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("Node")
    }
    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("")
    }
    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("v1")
    }
    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("nodes")
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl SlimNode {
    /// The mesh's view of this Node.
    pub fn into_record(self) -> NodeRecord {
        let internal_ips = self
            .status
            .and_then(|s| s.addresses)
            .map(|addrs| {
                addrs
                    .iter()
                    .filter(|a| a.type_ == "InternalIP")
                    .filter_map(|a| a.address.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let pod_cidrs = self
            .spec
            .map(|s| match (s.pod_cidrs, s.pod_cidr) {
                (Some(list), _) if !list.is_empty() => list,
                (_, Some(one)) => vec![one],
                _ => Vec::new(),
            })
            .unwrap_or_default();
        NodeRecord {
            name: self.metadata.name.unwrap_or_default(),
            annotations: self.metadata.annotations.unwrap_or_default(),
            internal_ips,
            pod_cidrs,
        }
    }
}

/// The agent's cache of Nodes, as [`NodeRecord`]s sorted by name, fed by the watcher's events
/// with the reflector's semantics: a (re-)list is buffered and replaces the cache only when it is
/// complete, so a relist never shows a partial cluster.
#[derive(Debug, Default)]
pub struct NodeCache {
    nodes: Vec<NodeRecord>,
    relist: Option<Vec<NodeRecord>>,
}

/// What a watcher event changed in a [`NodeCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheChange {
    /// Nothing visible yet (a list in progress).
    None,
    /// A Node was added, changed or deleted.
    Nodes,
    /// A (re-)list completed and replaced the cache.
    Synced,
}

impl NodeCache {
    /// The cached Nodes, sorted by name.
    pub fn nodes(&self) -> &[NodeRecord] {
        &self.nodes
    }

    /// Applies one watcher event.
    pub fn apply(&mut self, event: watcher::Event<SlimNode>) -> CacheChange {
        match event {
            watcher::Event::Init => {
                self.relist = Some(Vec::new());
                CacheChange::None
            }
            watcher::Event::InitApply(n) => {
                self.relist
                    .get_or_insert_with(Vec::new)
                    .push(n.into_record());
                CacheChange::None
            }
            watcher::Event::InitDone => {
                let mut nodes = self.relist.take().unwrap_or_default();
                nodes.sort_by(|a, b| a.name.cmp(&b.name));
                nodes.dedup_by(|b, a| {
                    // The last one listed wins.
                    if a.name == b.name {
                        std::mem::swap(a, b);
                        true
                    } else {
                        false
                    }
                });
                nodes.shrink_to_fit();
                self.nodes = nodes;
                CacheChange::Synced
            }
            watcher::Event::Apply(n) => {
                let rec = n.into_record();
                match self.nodes.binary_search_by(|r| r.name.cmp(&rec.name)) {
                    Ok(i) => self.nodes[i] = rec,
                    Err(i) => self.nodes.insert(i, rec),
                }
                CacheChange::Nodes
            }
            watcher::Event::Delete(n) => {
                let name = n.metadata.name.unwrap_or_default();
                if let Ok(i) = self.nodes.binary_search_by(|r| r.name.cmp(&name)) {
                    self.nodes.remove(i);
                }
                CacheChange::Nodes
            }
        }
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
    /// Host encryption: this node's addresses (its InternalIPs), published as
    /// `host-addresses`; `None` means the annotation must be absent.
    pub host_addresses: Option<Vec<std::net::IpAddr>>,
}

impl Identity {
    /// The annotations this identity sets (`host-addresses` only when it has host addresses).
    pub fn annotations(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::from([
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
        ]);
        if let Some(addrs) = self.host_addresses.as_ref().filter(|a| !a.is_empty()) {
            let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
            out.insert(ANNOTATION_HOST_ADDRESSES.to_owned(), list.join(","));
        }
        out
    }

    /// The merge patch's `annotations`: what [`Self::annotations`] sets, and `null` (delete) for
    /// `host-addresses` when it has none.
    pub fn annotation_patch(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut out: serde_json::Map<String, serde_json::Value> = self
            .annotations()
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect();
        out.entry(ANNOTATION_HOST_ADDRESSES)
            .or_insert(serde_json::Value::Null);
        out
    }

    /// True when `record` already carries exactly this identity (no write needed).
    pub fn is_published_on(&self, record: &NodeRecord) -> bool {
        let set = self.annotations();
        set.iter()
            .all(|(k, v)| record.annotations.get(k) == Some(v))
            && (set.contains_key(ANNOTATION_HOST_ADDRESSES)
                || !record.annotations.contains_key(ANNOTATION_HOST_ADDRESSES))
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
    let patch = serde_json::json!({ "metadata": { "annotations": id.annotation_patch() } });
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

/// Seconds since the epoch as RFC 3339 UTC with whole seconds (`2026-11-26T05:02:56Z`), the
/// format of Kubernetes `Time`.
pub fn rfc3339(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .unwrap_or(jiff::Timestamp::MAX)
        .to_string()
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

    /// What a real kube-apiserver sends for a Node (kubelet-registered, node-ipam CIDRs,
    /// managedFields, conditions, images ...), trimmed to stay readable.
    const FULL_NODE_JSON: &str = r#"{
      "kind": "Node", "apiVersion": "v1",
      "metadata": {
        "name": "worker-1", "uid": "5d0c6f3a-1111-2222-3333-444455556666",
        "resourceVersion": "918273", "creationTimestamp": "2026-11-20T10:00:00Z",
        "labels": {"kubernetes.io/hostname": "worker-1", "kubernetes.io/os": "linux"},
        "annotations": {
          "node.alpha.kubernetes.io/ttl": "0",
          "wgmesh.io/public-key": "AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=",
          "wgmesh.io/listen-port": "51820"
        },
        "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1",
          "time": "2026-11-20T10:00:00Z", "fieldsType": "FieldsV1",
          "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:kubernetes.io/os": {}}}}}]
      },
      "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"],
               "providerID": "kind://docker/kind/worker-1",
               "taints": [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]},
      "status": {
        "capacity": {"cpu": "2", "memory": "8Gi"},
        "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "2026-11-26T08:00:00Z",
          "lastTransitionTime": "2026-11-20T10:00:10Z", "reason": "KubeletReady", "message": "ok"}],
        "addresses": [{"type": "InternalIP", "address": "172.18.0.3"},
                      {"type": "InternalIP", "address": "fc00:f853:ccd:e793::3"},
                      {"type": "Hostname", "address": "worker-1"}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {"machineID": "m", "systemUUID": "s", "bootID": "b", "kernelVersion": "6.18",
          "osImage": "Debian", "containerRuntimeVersion": "containerd://2.1", "kubeletVersion": "v1.36.0",
          "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
        "images": [{"names": ["registry.k8s.io/pause:3.10"], "sizeBytes": 320368}]
      }
    }"#;

    fn slim_and_full_agree(json: &str) -> NodeRecord {
        let full: Node = serde_json::from_str(json).expect("a Node");
        let slim: SlimNode = serde_json::from_str(json).expect("a SlimNode");
        assert_eq!(slim.metadata.name, full.metadata.name);
        assert_eq!(
            slim.metadata.resource_version,
            full.metadata.resource_version
        );
        assert_eq!(slim.metadata.uid, full.metadata.uid);
        assert!(slim.metadata.managed_fields.is_none() && slim.metadata.labels.is_none());
        let record = slim.into_record();
        assert_eq!(record, node_record(&full));
        record
    }

    #[test]
    fn slim_node_reads_a_full_api_node_like_the_full_type() {
        let r = slim_and_full_agree(FULL_NODE_JSON);
        assert_eq!(r.name, "worker-1");
        assert_eq!(r.pod_cidrs, vec!["10.244.1.0/24", "fd00:10:244:1::/64"]);
        assert_eq!(r.internal_ips.len(), 2);
        assert_eq!(r.annotations.len(), 3);
    }

    #[test]
    fn slim_node_reads_the_stand_ins_nodes_like_the_full_type() {
        // As the API stand-in lists them: no kind/apiVersion on list items.
        let json = r#"{"metadata":{"name":"bench-0007","uid":"u","resourceVersion":"12",
            "labels":{"kubernetes.io/hostname":"bench-0007"},
            "annotations":{"wgmesh.io/public-key":"AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM="},
            "managedFields":[{"manager":"wgmesh-apiserver","operation":"Update"}]},
            "spec":{"podCIDR":"198.19.0.8/29","podCIDRs":["198.19.0.8/29"]},
            "status":{"addresses":[{"type":"InternalIP","address":"192.0.2.107"},
              {"type":"Hostname","address":"bench-0007"}],
              "conditions":[{"type":"Ready","status":"True"}]}}"#;
        let r = slim_and_full_agree(json);
        assert_eq!(r.pod_cidrs, vec!["198.19.0.8/29"]);
    }

    #[test]
    fn slim_node_and_node_record_agree_on_edge_cases() {
        let cases = [
            // Nothing but a name.
            r#"{"metadata":{"name":"bare"}}"#,
            // No metadata at all.
            r#"{}"#,
            // podCIDR only; podCIDRs empty falls back to podCIDR.
            r#"{"metadata":{"name":"a"},"spec":{"podCIDR":"10.0.0.0/24"}}"#,
            r#"{"metadata":{"name":"a"},"spec":{"podCIDR":"10.0.0.0/24","podCIDRs":[]}}"#,
            // Explicit nulls.
            r#"{"metadata":{"name":"a","annotations":null},"spec":null,"status":null}"#,
            r#"{"metadata":{"name":"a"},"spec":{"podCIDR":null,"podCIDRs":null},"status":{"addresses":null}}"#,
            // An unparsable InternalIP is skipped; other address types are ignored.
            r#"{"metadata":{"name":"a"},"status":{"addresses":[{"type":"InternalIP","address":"nope"},
               {"type":"ExternalIP","address":"203.0.113.1"},{"type":"InternalIP","address":"192.0.2.1"}]}}"#,
            // Deleting (deletionTimestamp set) reads the same.
            r#"{"metadata":{"name":"a","deletionTimestamp":"2026-11-26T08:00:00Z","finalizers":["x"]}}"#,
        ];
        for json in cases {
            slim_and_full_agree(json);
        }
    }

    fn event(name: &str, port: &str) -> SlimNode {
        let json = serde_json::json!({"metadata": {"name": name, "resourceVersion": "1",
            "annotations": {ANNOTATION_LISTEN_PORT: port}}});
        serde_json::from_value(json).expect("a SlimNode")
    }

    fn names(c: &NodeCache) -> Vec<(&str, &str)> {
        c.nodes()
            .iter()
            .map(|r| {
                (
                    r.name.as_str(),
                    r.annotations[ANNOTATION_LISTEN_PORT].as_str(),
                )
            })
            .collect()
    }

    #[test]
    fn node_cache_follows_the_watcher_like_the_reflector() {
        use watcher::Event;
        let mut c = NodeCache::default();
        assert_eq!(c.apply(Event::Init), CacheChange::None);
        assert_eq!(
            c.apply(Event::InitApply(event("b", "1"))),
            CacheChange::None
        );
        assert_eq!(
            c.apply(Event::InitApply(event("a", "1"))),
            CacheChange::None
        );
        assert!(c.nodes().is_empty(), "a list in progress is not visible");
        assert_eq!(c.apply(Event::InitDone), CacheChange::Synced);
        assert_eq!(names(&c), [("a", "1"), ("b", "1")]);
        assert_eq!(c.apply(Event::Apply(event("c", "1"))), CacheChange::Nodes);
        assert_eq!(c.apply(Event::Apply(event("a", "2"))), CacheChange::Nodes);
        assert_eq!(c.apply(Event::Delete(event("b", "1"))), CacheChange::Nodes);
        assert_eq!(c.apply(Event::Delete(event("zz", "1"))), CacheChange::Nodes);
        assert_eq!(names(&c), [("a", "2"), ("c", "1")]);
        // A relist (after a 410) keeps the old state visible until it is complete, then replaces it.
        c.apply(Event::Init);
        c.apply(Event::InitApply(event("d", "1")));
        assert_eq!(names(&c), [("a", "2"), ("c", "1")]);
        assert_eq!(c.apply(Event::InitDone), CacheChange::Synced);
        assert_eq!(names(&c), [("d", "1")]);
    }

    #[test]
    fn identity_is_published_only_when_different() {
        let id = Identity {
            public_key: PublicKey::from_bytes([3; 32]),
            listen_port: 51820,
            generation: 1,
            created: 0,
            host_addresses: None,
        };
        let mut rec = NodeRecord::default();
        assert!(!id.is_published_on(&rec));
        rec.annotations = id.annotations();
        rec.annotations.insert("other".into(), "x".into());
        assert!(id.is_published_on(&rec));
        assert_eq!(
            id.annotation_patch()[ANNOTATION_HOST_ADDRESSES],
            serde_json::Value::Null,
            "without host addresses the patch deletes the annotation"
        );

        // Host encryption turned on: the address list is missing, then published.
        let on = Identity {
            host_addresses: Some(vec![
                "192.0.2.11".parse().unwrap(),
                "2001:db8::11".parse().unwrap(),
            ]),
            ..id.clone()
        };
        assert!(!on.is_published_on(&rec));
        assert_eq!(
            on.annotation_patch()[ANNOTATION_HOST_ADDRESSES],
            "192.0.2.11,2001:db8::11"
        );
        rec.annotations = on.annotations();
        assert!(on.is_published_on(&rec));
        // ... and off again: the leftover annotation needs a write that deletes it.
        assert!(!id.is_published_on(&rec));
    }
}
