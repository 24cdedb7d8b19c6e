//! `wgmeshctl`: thin entry point; the commands live in the library (`wgmesh_keyctl`).

use std::{io::IsTerminal as _, process::ExitCode};

use clap::FromArgMatches as _;
use tracing_subscriber::EnvFilter;
use wgmesh_keyctl::{cli, exit::Exit};

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "off",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn main() -> ExitCode {
    let argv0 = std::env::args_os().next();
    let matches = cli::command_for(argv0.as_deref()).get_matches();
    let cli = match cli::Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    init_logging(cli.global.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wgmeshctl: error: cannot start the async runtime: {e}");
            return Exit::Error.into();
        }
    };
    match runtime.block_on(wgmesh_keyctl::run(cli)) {
        Ok(exit) => exit.into(),
        Err(e) => {
            eprintln!(
                "wgmeshctl: error: {}",
                wgmesh_keyctl::render::error_chain(&e)
            );
            Exit::Error.into()
        }
    }
}
