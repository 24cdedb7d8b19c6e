//! Wire types shared by the wgmesh agent and `wgmeshctl`: the Node annotations that carry a node's
//! WireGuard identity, the public key type, how a Node is read into mesh terms, and the agent's status
//! document. Pure data and parsing: no I/O, no Kubernetes client, no kernel access.

pub mod annotations;
pub mod key;
pub mod node;
pub mod rotation;
pub mod status;

pub use key::{KeyError, PublicKey};
pub use node::{NodeMeshInfo, NodeProblem, NodeRecord};
