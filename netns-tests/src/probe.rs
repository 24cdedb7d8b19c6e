//! `wgmesh-probe`, the traffic helper that runs inside pod and node namespaces
//! (`ip netns exec <ns> wgmesh-probe <subcommand>`), and the harness side of it: finding the
//! binary, running it in the background, and the JSON reports it prints.
//!
//! Finding the binary: `$WGMESH_PROBE_BIN` if set; otherwise next to the running executable or
//! one directory up (so `target/debug/deps/harness-*` finds `target/debug/wgmesh-probe`).
//! Integration tests of this package can pass `env!("CARGO_BIN_EXE_wgmesh-probe")` to
//! `TestbedBuilder::probe_bin`, which always wins.

pub mod commands;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{cmd::Cmd, eventually::eventually, process::ChildGuard};

/// Env var naming the `wgmesh-probe` binary.
pub const ENV_PROBE_BIN: &str = "WGMESH_PROBE_BIN";

/// Finds `name` through `env_var`, else next to the current executable or one level up.
pub fn locate_binary(env_var: &str, name: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("{env_var}={} is not a file", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("failed to find the current executable")?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join(name))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            anyhow!(
                "cannot find {name}: set {env_var} (looked in {})",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// `--listen` servers print this first, once bound.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Listening {
    pub listening: String,
}

/// `udp-ping` result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UdpPingReport {
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub rtt_avg_ms: f64,
    pub rtt_max_ms: f64,
}

/// `tcp-request` result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpRequestReport {
    pub reply: String,
    pub elapsed_ms: u64,
}

/// One datagram received by `udp-recv`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Datagram {
    pub from: String,
    pub data_hex: String,
}

impl Datagram {
    pub fn data(&self) -> Vec<u8> {
        hex_decode(&self.data_hex).unwrap_or_default()
    }
}

/// Periodic `tcp-stream` progress line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamProgress {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub chunks_received: u64,
}

/// Final `tcp-stream` result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpStreamReport {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub chunks_sent: u64,
    pub chunks_received: u64,
    /// Longest time echoed data was outstanding without any arriving.
    pub max_stall_ms: u64,
    /// The connection saw RST (ECONNRESET, EPIPE, ECONNABORTED).
    pub reset: bool,
    /// The peer closed the connection before we stopped.
    pub closed: bool,
    /// Echoed data did not match what was sent.
    pub out_of_order: bool,
    pub error: Option<String>,
    pub duration_ms: u64,
}

impl TcpStreamReport {
    /// Never reset, closed, corrupted or failed, and every chunk came back.
    pub fn is_intact(&self) -> bool {
        !self.reset
            && !self.closed
            && !self.out_of_order
            && self.error.is_none()
            && self.chunks_received == self.chunks_sent
    }

    pub fn assert_intact(&self) -> Result<()> {
        if !self.is_intact() {
            bail!("the TCP stream broke: {self:?}");
        }
        Ok(())
    }
}

/// Lines of the form `{"progress": ...}` / `{"result": ...}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamLine {
    Progress(StreamProgress),
    Result(TcpStreamReport),
}

pub fn hex_encode(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn hex_decode(s: &str) -> Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        bail!("odd-length hex");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).with_context(|| format!("bad hex {s:?}")))
        .collect()
}

/// A probe (or any command) running in the background with its stdout lines collected.
#[derive(Debug)]
pub struct ProbeProcess {
    process: ChildGuard,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
}

impl ProbeProcess {
    pub fn spawn(what: impl Into<String>, cmd: &Cmd) -> Result<Self> {
        let mut process = ChildGuard::new(what, cmd.spawn(Stdio::piped(), Stdio::piped())?);
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let child = process.child_mut().context("child")?;
        let out = child.stdout.take().context("stdout")?;
        let err = child.stderr.take().context("stderr")?;
        let sink = Arc::clone(&lines);
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(mut l) = sink.lock() {
                    l.push(line);
                }
            }
        });
        let sink = Arc::clone(&stderr);
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&line);
                    s.push('\n');
                }
            }
        });
        Ok(Self {
            process,
            lines,
            stderr,
        })
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The stdout lines that parse as `T`.
    pub fn parsed<T: DeserializeOwned>(&self) -> Vec<T> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until a stdout line parses as `T` (failing early if the process exits).
    pub fn wait_for<T: DeserializeOwned>(&mut self, what: &str, timeout: Duration) -> Result<T> {
        eventually(what, timeout, || {
            if let Some(t) = self.parsed::<T>().into_iter().next() {
                return Ok(t);
            }
            if let Some(status) = self.process.try_status()? {
                bail!(
                    "{} exited ({status}): {}",
                    self.process.what(),
                    self.stderr().trim()
                );
            }
            bail!("not yet")
        })
    }

    /// Waits until a server printed its `{"listening": ...}` line.
    pub fn wait_listening(&mut self) -> Result<Listening> {
        let what = format!("{} listens", self.process.what());
        self.wait_for(&what, Duration::from_secs(10))
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Sends `signal`, waits up to `timeout` for the exit (SIGKILL after) and gives the output.
    pub fn stop(&mut self, signal: Signal, timeout: Duration) -> Result<Vec<String>> {
        self.process.stop(signal, timeout)?;
        // The reader threads see EOF right after the exit; give them a moment to push the last line.
        eventually("the probe's output is read", Duration::from_secs(2), || {
            if Arc::strong_count(&self.lines) == 1 {
                Ok(())
            } else {
                bail!("reader still running")
            }
        })
        .ok();
        Ok(self.lines())
    }

    /// Waits for the process to exit by itself (up to `timeout`) and returns its stdout lines;
    /// a non-zero exit is an error carrying stderr.
    pub fn wait(&mut self, timeout: Duration) -> Result<Vec<String>> {
        let what = format!("{} finishes", self.process.what());
        let status = eventually(&what, timeout, || {
            self.process
                .try_status()?
                .ok_or_else(|| anyhow!("still running"))
        })?;
        eventually("the probe's output is read", Duration::from_secs(2), || {
            if Arc::strong_count(&self.lines) == 1 {
                Ok(())
            } else {
                bail!("reader still running")
            }
        })
        .ok();
        if !status.success() {
            bail!(
                "{} failed ({status}): {}",
                self.process.what(),
                self.stderr().trim()
            );
        }
        Ok(self.lines())
    }
}

/// The path to use for the probe: the override or the located binary.
pub fn resolve_probe(explicit: Option<&Path>) -> Result<PathBuf> {
    match explicit {
        Some(p) => Ok(p.to_owned()),
        None => locate_binary(ENV_PROBE_BIN, "wgmesh-probe"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        assert_eq!(hex_encode(b"hi\0"), "686900");
        assert_eq!(hex_decode("686900").expect("hex"), b"hi\0");
        assert!(hex_decode("6").is_err());
    }

    #[test]
    fn stream_lines_are_tagged() {
        let l: StreamLine = serde_json::from_str(
            r#"{"progress":{"bytes_sent":1,"bytes_received":1,"chunks_received":1}}"#,
        )
        .expect("parses");
        assert!(matches!(l, StreamLine::Progress(p) if p.bytes_sent == 1));
        let r =
            serde_json::to_string(&StreamLine::Result(TcpStreamReport::default())).expect("json");
        assert!(r.starts_with(r#"{"result":"#), "{r}");
    }
}
