//! Harness for simulated wgmesh clusters in network namespaces.
//!
//! How the testbed maps to a cluster: one namespace per node, joined by a bridge in an underlay
//! namespace (the "physical" network, 192.0.2.0/24, where captures prove what is on the wire);
//! one namespace per pod behind a `veth` on its node (pod CIDRs 198.18.i.0/24, host-gw routes
//! between nodes, so without wgmesh pod traffic crosses the underlay in clear); a Kubernetes API
//! stand-in in the underlay namespace; and the real `wgmesh-agent` as a process per node.
//!
//! What it must not do: touch the root network namespace (no links, addresses or routes there;
//! everything is created inside namespaces it owns), send anything outside those namespaces, or
//! use addresses outside the documentation/benchmark ranges. Everything is torn down on drop,
//! also when a test panics, unless `WGMESH_NETNS_KEEP=1`.
//!
//! Env vars:
//! - `WGMESH_AGENT_BIN`: the agent (needed once a node starts its agent);
//! - `WGMESH_APISERVER_BIN`: the API stand-in (needed unless `without_apiserver`);
//! - `WGMESH_PROBE_BIN`: `wgmesh-probe` (defaults to the one next to the running binary);
//! - `WGMESH_NETNS_KEEP=1`: keep everything for debugging; `WGMESH_NETNS_DUMP=1`: always dump;
//! - `WGMESH_TEST_PATIENCE`: scales every `eventually` timeout.
//!
//! The three binaries are found next to the running executable (or one directory up, for test
//! binaries in `target/*/deps`) when their env var is unset.

pub mod apiserver;
pub mod capture;
pub mod cmd;
pub mod diagnostics;
pub mod eventually;
pub mod http;
pub mod mesh;
pub mod names;
pub mod netns;
pub mod node;
pub mod pod;
pub mod probe;
pub mod process;
pub mod table;
pub mod testbed;
pub mod wg;

/// Result type of scenarios.
pub type TestResult = anyhow::Result<()>;

/// What a scenario needs: `use wgmesh_netns_tests::prelude::*;`.
pub mod prelude {
    pub use std::time::Duration;

    pub use anyhow::{Context as _, Result, bail, ensure};
    pub use nix::sys::signal::Signal;

    pub use crate::{
        TestResult,
        apiserver::ApiClient,
        capture::{Capture, CaptureSummary},
        eventually::eventually,
        node::{AgentSpec, Node, NodeBuilder},
        pod::{Destination, PingReport, Pod},
        probe::{TcpStreamReport, UdpPingReport},
        testbed::{Testbed, TestbedBuilder},
        wg::{WgDump, WgPeer},
    };
}
