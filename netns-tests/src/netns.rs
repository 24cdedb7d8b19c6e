//! Network namespaces: create, run commands in, kill what runs in, delete.
//!
//! The harness itself never leaves the root network namespace except here: `set_sysctls` moves a
//! dedicated, short-lived OS thread into the namespace (`setns` only changes the calling thread)
//! so that it can write `/proc/sys/net/...`, which the kernel resolves against the opener's
//! namespace. Everything else goes through `ip -n <ns>` or `ip netns exec <ns>` child processes.

use std::{
    fs::File,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};
use nix::{
    sched::{CloneFlags, setns},
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::cmd::Cmd;

/// A named network namespace (`/run/netns/<name>`). `delete` (also run on drop unless kept)
/// kills every process still inside, then removes it; deleting a namespace removes its links.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    keep: bool,
    deleted: AtomicBool,
}

impl NetNs {
    /// `ip netns add <name>` and bring `lo` up. `keep` makes drop leave it in place.
    pub fn create(name: &str, keep: bool) -> Result<Self> {
        Cmd::new("ip").args(["netns", "add", name]).run()?;
        let ns = Self {
            name: name.to_owned(),
            keep,
            deleted: AtomicBool::new(false),
        };
        ns.ip(["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> <args>`, returning stdout.
    pub fn ip<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Cmd::new("ip").args(["-n", &self.name]).args(args).run()
    }

    /// A command that runs `program` inside the namespace.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Cmd {
        Cmd::in_netns(&self.name, program)
    }

    /// Writes sysctls under `/proc/sys/` (keys like `net/ipv4/ip_forward`) from a thread that
    /// has joined this namespace. The thread exits afterwards, so no other code ever runs there.
    pub fn set_sysctls(&self, values: &[(&str, &str)]) -> Result<()> {
        let file = File::open(self.path())
            .with_context(|| format!("failed to open namespace {}", self.name))?;
        let values: Vec<(String, String)> = values
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let name = self.name.clone();
        thread::spawn(move || -> Result<()> {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("failed to enter namespace {name}"))?;
            for (k, v) in &values {
                let path = PathBuf::from("/proc/sys").join(k);
                std::fs::write(&path, v)
                    .with_context(|| format!("failed to set {k}={v} in namespace {name}"))?;
            }
            Ok(())
        })
        .join()
        .map_err(|_| anyhow!("sysctl thread for {} panicked", self.name))?
    }

    /// Reads one sysctl as seen inside the namespace (through `ip netns exec`, independently of
    /// `set_sysctls`, so tests can check it).
    pub fn sysctl(&self, key: &str) -> Result<String> {
        Ok(self
            .cmd("sysctl")
            .args(["-n", &key.replace('/', ".")])
            .run()?
            .trim()
            .to_owned())
    }

    /// Processes whose network namespace is this one (`ip netns pids`).
    pub fn pids(&self) -> Result<Vec<i32>> {
        let out = Cmd::new("ip").args(["netns", "pids", &self.name]).run()?;
        Ok(out
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }

    /// SIGKILLs every process in the namespace and waits (up to 5 s) until they are gone.
    pub fn kill_all(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.pids()?;
            if pids.is_empty() {
                return Ok(());
            }
            for pid in &pids {
                match kill(Pid::from_raw(*pid), Signal::SIGKILL) {
                    Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                    Err(e) => return Err(e).context(format!("failed to kill pid {pid}")),
                }
            }
            if Instant::now() > deadline {
                return Err(anyhow!(
                    "processes {pids:?} in {} survive SIGKILL",
                    self.name
                ));
            }
            // Killed processes linger until their parent reaps them (our own children are
            // reaped by their guards; others by init): poll, do not assume.
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills what runs inside and deletes the namespace; idempotent.
    pub fn delete(&self) -> Result<()> {
        if self.deleted.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        if !self.path().exists() {
            return Ok(());
        }
        let killed = self.kill_all();
        Cmd::new("ip").args(["netns", "del", &self.name]).run()?;
        killed
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Err(e) = self.delete() {
            eprintln!("warning: failed to delete namespace {}: {e:#}", self.name);
        }
    }
}
