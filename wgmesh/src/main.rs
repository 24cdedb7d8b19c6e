//! `wgmesh-agent`: thin entry point; see the library for the agent itself.

use std::{io::IsTerminal as _, process::ExitCode};

use clap::Parser as _;
use tracing_subscriber::{EnvFilter, fmt};
use wgmesh::config::{Cli, Command, LogFormat};

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        // The device blocks its thread and handles SIGTERM itself.
        Command::Device(d) => wgmesh::config::validate_interface(&d.interface)
            .map_err(anyhow::Error::from)
            .and_then(|()| {
                wgmesh::wireguard::device::run_engine(&d.interface, d.threads, d.engine)
            }),
        Command::Run(args) => runtime()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(wgmesh::agent::run(*args))),
        Command::Cleanup(args) => runtime()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(wgmesh::agent::cleanup(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "wgmesh-agent failed");
            eprintln!("wgmesh-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
