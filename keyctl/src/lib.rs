//! `wgmeshctl`: inspects a node's WireGuard state and rotates wgmesh keys.
//!
//! The binary (`main.rs`) is thin; everything lives here so the pure parts (verdicts, node
//! problems, the rotation protocol, rendering) are table-tested without a cluster or a kernel.
//! It reuses the agent library for everything the agent already knows how to do: reading the
//! WireGuard device (`wgmesh::wireguard`), reading Nodes (`wgmesh::discovery::node_record`,
//! `wgmesh_api::NodeRecord::mesh_info`) and deciding which peers a node should have
//! (`wgmesh::mesh::desired_state`).

pub mod cli;
pub mod cluster;
pub mod exit;
pub mod local;
pub mod nodes;
pub mod render;
pub mod rotate;
pub mod status;

use cli::{Cli, Command};
use exit::Exit;

/// Runs one command. `Ok` carries the exit status of a command that ran to the end (a failed
/// check, a refused or timed-out rotation); `Err` is a runtime error (exit 2).
pub async fn run(cli: Cli) -> anyhow::Result<Exit> {
    match cli.command {
        Command::Status(args) => status::run(&cli.global, &args).await,
        Command::Nodes(args) => nodes::run(&cli.global, &args).await,
        Command::Rotate(args) => rotate::run(&cli.global, &args).await,
        Command::Completions(args) => {
            cli::write_completions(args.shell, &mut std::io::stdout());
            Ok(Exit::Ok)
        }
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    /// An object's keys, sorted (whatever order serde_json's map keeps): the JSON schema tests
    /// compare these, so adding or renaming a field fails a test.
    pub fn keys(v: &serde_json::Value) -> Vec<String> {
        let mut k: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
        k.sort();
        k
    }
}
