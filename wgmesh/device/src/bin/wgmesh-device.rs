//! `wgmesh-device IFNAME [THREADS]`: runs the batched device until SIGTERM/SIGINT or the removal of
//! its UAPI socket. A test and benchmark tool; in a cluster the agent runs the same engine as
//! `wgmesh-agent device`. The TUN starts down: `ip link set IFNAME up` after it answers.

use std::process::ExitCode;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let (Some(ifname), threads) = (args.next(), args.next()) else {
        eprintln!("usage: wgmesh-device IFNAME [THREADS]");
        return ExitCode::from(64);
    };
    let threads = match threads.map(|t| t.parse::<usize>()) {
        None => 2,
        Some(Ok(t)) if t > 0 => t,
        Some(_) => {
            eprintln!("THREADS must be a positive number");
            return ExitCode::from(64);
        }
    };
    match wgmesh_device::DeviceHandle::start(
        &ifname,
        wgmesh_device::DeviceConfig::with_threads(threads),
    ) {
        Ok(h) => {
            h.wait();
            ExitCode::SUCCESS
        }
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("wgmesh-device: {msg}");
            ExitCode::from(1)
        }
    }
}
