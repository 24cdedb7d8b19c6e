//! The Kubernetes side: a client honouring `--kubeconfig` (a colon-separated list, as `KUBECONFIG`)
//! and `--context`, and the few Node calls wgmeshctl makes. Nodes are read into the agent's
//! [`NodeRecord`] with the agent's own [`wgmesh::discovery::node_record`], so both agree.

use std::{collections::BTreeMap, ffi::OsStr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client, Config,
    api::{ListParams, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use wgmesh_api::NodeRecord;

use crate::cli::GlobalArgs;

/// Field manager of wgmeshctl's writes (visible in `managedFields`).
pub const FIELD_MANAGER: &str = "wgmeshctl";

/// The kubeconfig files named by a `--kubeconfig`/`KUBECONFIG` value (empty entries ignored).
pub fn kubeconfig_paths(value: &OsStr) -> Vec<PathBuf> {
    std::env::split_paths(value)
        .filter(|p| !p.as_os_str().is_empty())
        .collect()
}

/// A client, with `timeout` on connecting and on every request.
pub async fn client(global: &GlobalArgs, timeout: Duration) -> anyhow::Result<Client> {
    let options = KubeConfigOptions {
        context: global.context.clone(),
        ..KubeConfigOptions::default()
    };
    let paths = global
        .kubeconfig
        .as_deref()
        .map(kubeconfig_paths)
        .unwrap_or_default();
    let mut config = if !paths.is_empty() {
        let mut merged: Option<Kubeconfig> = None;
        for path in &paths {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            merged = Some(match merged {
                None => kc,
                Some(m) => m.merge(kc).context("cannot merge kubeconfig files")?,
            });
        }
        let kc = merged.context("no kubeconfig")?;
        Config::from_custom_kubeconfig(kc, &options)
            .await
            .context("cannot use the kubeconfig")?
    } else if global.context.is_some() {
        Config::from_kubeconfig(&options)
            .await
            .context("cannot use ~/.kube/config")?
    } else {
        Config::infer().await.context(
            "cannot find a Kubernetes configuration (no --kubeconfig, no KUBECONFIG, not in a \
             cluster, no ~/.kube/config)",
        )?
    };
    config.connect_timeout = Some(timeout);
    config.read_timeout = Some(timeout);
    config.write_timeout = Some(timeout);
    Client::try_from(config).context("cannot build a Kubernetes client")
}

/// Every Node, read into records, sorted by name.
pub async fn list_nodes(client: &Client) -> anyhow::Result<Vec<NodeRecord>> {
    let api: Api<Node> = Api::all(client.clone());
    let list = api
        .list(&ListParams::default())
        .await
        .context("cannot list Nodes")?;
    let mut records: Vec<NodeRecord> = list
        .items
        .iter()
        .map(wgmesh::discovery::node_record)
        .collect();
    records.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(records)
}

/// One Node: the record and its resourceVersion (for an optimistic-concurrency patch).
pub async fn get_node(client: &Client, name: &str) -> anyhow::Result<(NodeRecord, Option<String>)> {
    let api: Api<Node> = Api::all(client.clone());
    let node = api
        .get(name)
        .await
        .with_context(|| format!("cannot read Node {name}"))?;
    Ok((
        wgmesh::discovery::node_record(&node),
        node.metadata.resource_version.clone(),
    ))
}

/// Sets annotations with a JSON merge patch, which touches only these keys. With
/// `resource_version` the patch applies only to that version of the Node (409 Conflict
/// otherwise), so a decision taken on what was read cannot be overtaken by another writer.
pub async fn patch_annotations(
    client: &Client,
    name: &str,
    resource_version: Option<&str>,
    annotations: &BTreeMap<String, String>,
) -> Result<(), kube::Error> {
    let api: Api<Node> = Api::all(client.clone());
    let mut metadata = serde_json::json!({ "annotations": annotations });
    if let Some(rv) = resource_version {
        metadata["resourceVersion"] = rv.into();
    }
    let patch = serde_json::json!({ "metadata": metadata });
    api.patch(
        name,
        &PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        },
        &Patch::Merge(&patch),
    )
    .await
    .map(|_| ())
}

/// True for a 409 Conflict (the Node changed since it was read).
pub fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_lists_split_like_kubectl() {
        assert_eq!(
            kubeconfig_paths(OsStr::new("/a/config:/b/config")),
            [PathBuf::from("/a/config"), PathBuf::from("/b/config")]
        );
        assert_eq!(
            kubeconfig_paths(OsStr::new("/a/config")),
            [PathBuf::from("/a/config")]
        );
        assert!(kubeconfig_paths(OsStr::new("")).is_empty());
        assert_eq!(kubeconfig_paths(OsStr::new(":/a::")), [PathBuf::from("/a")]);
    }
}
