//! The userspace WireGuard device process (`wgmesh-agent device`): a TUN and the UAPI socket served
//! by wgmesh-device (boringtun's protocol with batched, offloaded I/O; the default) or by boringtun's
//! stock device (the defguard fork, the copy defguard_wireguard_rs embeds; `--engine boringtun`). It runs apart from the agent
//! (a detached process here, its own container in Kubernetes) so that an agent restart never takes
//! the tunnel down: Cilium removed its in-agent userspace fallback for exactly that reason.

use std::{
    fs::OpenOptions,
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use defguard_boringtun::device::{DeviceConfig, DeviceHandle};

use super::{Error, uapi::UapiDevice};
use crate::config::DeviceEngine;

/// Runs the default engine; see [`run_engine`].
pub fn run(ifname: &str, threads: usize) -> anyhow::Result<()> {
    run_engine(ifname, threads, DeviceEngine::default())
}

/// Runs the device until it is told to stop (SIGTERM/SIGINT, which the device handles itself, or
/// the removal of its UAPI socket). Blocks the calling thread.
pub fn run_engine(ifname: &str, threads: usize, engine: DeviceEngine) -> anyhow::Result<()> {
    if UapiDevice::new(ifname).is_alive() {
        anyhow::bail!(
            "a WireGuard device for {ifname} is already running (it answers on {}); not starting a second one",
            super::uapi::socket_path(ifname).display()
        );
    }
    std::fs::create_dir_all(super::uapi::UAPI_DIR)?;
    if engine == DeviceEngine::Batched {
        let config = wgmesh_device::DeviceConfig {
            uapi_dir: super::uapi::UAPI_DIR.into(),
            ..wgmesh_device::DeviceConfig::with_threads(threads)
        };
        let handle = wgmesh_device::DeviceHandle::start(ifname, config).map_err(|e| {
            anyhow::Error::new(e).context(format!(
                "cannot create the userspace WireGuard device {ifname}"
            ))
        })?;
        tracing::info!(ifname, threads, engine = "batched", socket = %super::uapi::socket_path(ifname).display(), "userspace wireguard device running");
        if let Err(e) = ensure_up(ifname) {
            handle.stop();
            handle.wait();
            return Err(e);
        }
        handle.wait();
        tracing::info!(ifname, "userspace wireguard device stopped");
        return Ok(());
    }
    let config = DeviceConfig {
        n_threads: threads.max(1),
        ..DeviceConfig::default()
    };
    let mut handle = DeviceHandle::new(ifname, config).map_err(|e| {
        anyhow::anyhow!("cannot create the userspace WireGuard device {ifname}: {e:?}")
    })?;
    tracing::info!(ifname, threads, engine = "boringtun", socket = %super::uapi::socket_path(ifname).display(), "userspace wireguard device running");
    ensure_up(ifname)?;
    handle.wait();
    tracing::info!(ifname, "userspace wireguard device stopped");
    Ok(())
}

/// The TUN starts down; bring it up so the device is usable on its own. The agent also keeps it up
/// (and sets the MTU) on every reconcile.
fn ensure_up(ifname: &str) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let nl = crate::netlink::Netlink::connect()?;
        nl.ensure_up(ifname, None).await.map(|_| ())
    })?;
    Ok(())
}

/// Starts `wgmesh-agent device --interface <ifname>` detached (own session), logging to
/// `<state_dir>/device.log`, and waits until it answers on its UAPI socket.
pub fn spawn(ifname: &str, state_dir: &Path) -> Result<(), Error> {
    let spawn_err = |source| Error::Spawn {
        ifname: ifname.to_owned(),
        source,
    };
    let exe = std::env::current_exe().map_err(spawn_err)?;
    std::fs::create_dir_all(state_dir).map_err(spawn_err)?;
    let log_path = state_dir.join("device.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(spawn_err)?;
    let log2 = log.try_clone().map_err(spawn_err)?;
    let mut cmd = Command::new(exe);
    cmd.args(["device", "--interface", ifname])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(spawn_err)?;
    let pid = child.id();
    // Reap it if it exits while we run (and say so while we wait for it); after we exit, init
    // adopts it.
    let (exited_tx, exited) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("device-reaper".into())
        .spawn(move || {
            let status = child.wait();
            let _ = exited_tx.send(status.map_or_else(|e| e.to_string(), |s| s.to_string()));
        })
        .map_err(spawn_err)?;
    tracing::info!(ifname, pid, log = %log_path.display(), "started userspace wireguard device process");
    let dev = UapiDevice::new(ifname);
    let deadline = Instant::now() + Duration::from_secs(10);
    // Short polls: the device is usually up within a few tens of milliseconds, and start-up time
    // is convergence time.
    while Instant::now() < deadline {
        if dev.is_alive() {
            return Ok(());
        }
        if let Ok(status) = exited.try_recv() {
            return Err(Error::DeviceExited {
                ifname: ifname.to_owned(),
                status,
                log: log_path,
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(Error::DeviceTimeout {
        ifname: ifname.to_owned(),
        seconds: 10,
        log: log_path,
    })
}

/// Stops a running userspace device by removing its UAPI socket (the device watches the file and
/// exits), and waits until the process is gone: a device that stopped answering may still hold its
/// UDP port and TUN for a moment, and a device started right after (same port) would fail to bind.
pub fn stop(ifname: &str) -> bool {
    let path = super::uapi::socket_path(ifname);
    // The server's pid, from the socket's peer credentials (0 or none when the device runs in a
    // pid namespace this process cannot see: then only the UAPI socket is waited for).
    let pid = std::os::unix::net::UnixStream::connect(&path)
        .ok()
        .and_then(|s| {
            nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials).ok()
        })
        .map(|c| c.pid())
        .filter(|&p| p > 0);
    let alive = UapiDevice::new(ifname).is_alive();
    let _ = std::fs::remove_file(&path);
    if alive {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline
            && (UapiDevice::new(ifname).is_alive() || pid.is_some_and(process_running))
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(pid) = pid.filter(|&p| process_running(p)) {
            tracing::warn!(
                ifname,
                pid,
                "the userspace device process is still running 5 s after it was asked to stop"
            );
        }
    }
    alive
}

/// Whether `pid` is a live process (not gone, not a zombie waiting to be reaped).
fn process_running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // `pid (comm) S ...`: the state follows the last ')'.
            let rest = &stat[stat.rfind(')')? + 1..];
            rest.split_whitespace()
                .next()
                .map(|s| !matches!(s, "Z" | "X"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a test, `spawn` starts the test binary itself as `… device --interface <name>`, which
    /// libtest rejects at once: the start-up must report that exit, not wait out its 10 s.
    #[test]
    fn a_device_process_that_exits_at_start_is_reported_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let ifname = format!("wgx{}", std::process::id() % 100_000);
        let err = spawn(&ifname, dir.path()).unwrap_err();
        // Not DeviceTimeout: the exit ended the wait.
        assert!(
            matches!(err, Error::DeviceExited { .. }),
            "unexpected error: {err}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&ifname) && msg.contains("device.log"), "{msg}");
    }

    #[test]
    fn running_exited_and_zombie_processes_are_told_apart() {
        assert!(process_running(std::process::id() as i32), "this process");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Exited but not yet reaped: a zombie, which no longer holds its sockets.
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_running(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!process_running(pid), "a zombie is not running");
        child.wait().unwrap();
        assert!(!process_running(pid), "a reaped process is not running");
    }
}
