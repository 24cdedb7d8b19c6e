//! The wgmesh node agent. It keeps a WireGuard key per node, publishes the public key on the node's
//! Node object, peers with every other node (allowed IPs = that node's pod CIDRs) and steers pod
//! traffic bound for other nodes into the tunnel with TC eBPF. It never shells out to `ip`, `tc`, `wg`
//! or iptables: netlink, the WireGuard UAPI and aya, in process.

pub mod agent;
pub mod config;
pub mod discovery;
pub mod keys;
pub mod mesh;
pub mod netlink;
pub mod rotation;
pub mod server;
pub mod wireguard;
