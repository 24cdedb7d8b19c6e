//! Scenarios: real `wgmesh-agent` processes on simulated nodes (network namespaces), the Kubernetes
//! API stand-in, userspace WireGuard, and proof on the wire or in the kernel. One test binary;
//! every scenario is `#[ignore]`d for plain `cargo test` and run as root by `make test-netns`.

mod backend;
mod datapath;
mod host;
mod key_exchange;
mod membership;
mod resilience;
mod restart;
mod rotation;
mod status;
mod support;
