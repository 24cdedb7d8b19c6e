//! # wgmesh-apiserver: a Kubernetes API stand-in for the Node subset
//!
//! Serves `/api/v1/nodes` over plain HTTP/1.1 the way a real kube-apiserver does on the wire, so
//! that the real agent (kube-rs 5 watcher/reflector, `Api::<Node>::get`, merge patches and
//! server-side apply) runs against it unchanged. It follows `shared/docs/kube-api.md`:
//!
//! - list with `limit`/`continue` (consistent snapshots), label and field selectors, and the
//!   resourceVersion / resourceVersionMatch rules;
//! - watch as a chunked stream of compact JSON lines, periodic BOOKMARKs, `sendInitialEvents`,
//!   and "too old resourceVersion" as a 200 stream carrying one ERROR 410 event;
//! - one global resourceVersion counter; no-op writes bump nothing and send no event;
//! - create/update (PUT)/delete, PATCH and PATCH `/status` with merge, strategic merge (Node list
//!   keys), JSON patch and server-side apply (per-key ownership of maps such as annotations and
//!   labels, `status.conditions` keyed by type, conflicts, `force`), stored as real
//!   `managedFields`;
//! - errors as Kubernetes `Status` objects with the real codes and reasons.
//!
//! A control socket (Unix) serves the same API plus `/_control/*` for tests: outages (the TCP
//! listeners close and come back), injected failures, history compaction and request counters.
//! [`client::ControlClient`] talks to it.
//!
//! Not implemented: TLS, authentication/authorization (any bearer token is accepted), admission
//! and Node validation (podCIDR rules ...), other resources (no Events, Pods, ...), namespaces,
//! finalizers and graceful deletion, `deletecollection`, YAML bodies (apply bodies must be
//! JSON), protobuf, `PartialObjectMetadata` responses, the `/status` subresource on DELETE, and
//! apply schemas beyond the Node fields named above (other lists are atomic).
//!
//! Start it in-process with [`start`] and a [`Config`]; `main.rs` is the CLI around it.

pub mod client;
pub mod control;
pub mod http;
pub mod kubeconfig;
pub mod managed;
pub mod patch;
pub mod selector;
pub mod server;
pub mod status;
pub mod store;
pub mod util;
pub mod watch;

pub use server::{Config, ServerHandle, start};
