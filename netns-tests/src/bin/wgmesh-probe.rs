//! `wgmesh-probe`: traffic helper run inside test namespaces (`ip netns exec <ns> wgmesh-probe ...`).
//! See `wgmesh_netns_tests::probe`.

use std::process::ExitCode;

use clap::Parser;
use wgmesh_netns_tests::probe::commands::{Cli, run};

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wgmesh-probe: {e:#}");
            ExitCode::FAILURE
        }
    }
}
