//! Underlay capture: tcpdump on the underlay bridge, then a summary of what crossed the wire.
//!
//! tcpdump on a bridge in promiscuous mode (its default) sees every frame the bridge forwards
//! between nodes, not only the bridge's own traffic. To know that the file holds everything sent
//! before `stop`, the capture ends with a marker: a broadcast UDP datagram from the underlay
//! namespace that `stop` waits to find in the file before it stops tcpdump.

pub mod packet;
pub mod pcap;

use std::{
    fmt,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use self::packet::{Class, WgMessage, classify};
use crate::{cmd::Cmd, eventually::eventually, process::ChildGuard};

/// How many offending packets a summary keeps for error messages.
pub const MAX_OFFENDERS: usize = 10;

/// A running tcpdump. `stop` returns the summary; drop kills it.
#[derive(Debug)]
pub struct Capture {
    process: ChildGuard,
    file: PathBuf,
    ns: String,
    probe: PathBuf,
    marker: String,
    stderr: Arc<Mutex<String>>,
}

impl Capture {
    /// Starts `tcpdump -i <iface> -w <file> -U -n` in namespace `ns` and waits until it listens.
    /// `probe` (the `wgmesh-probe` binary) sends the end marker; `marker` must be unique.
    pub fn start(ns: &str, iface: &str, file: &Path, probe: &Path, marker: String) -> Result<Self> {
        // -Z root: Debian's tcpdump drops to user `tcpdump`, who may not write into the test's
        // private (0700) temp dir.
        let child = Cmd::in_netns(ns, "tcpdump")
            .args(["-i", iface, "-w"])
            .arg(file)
            .args(["-U", "-n", "-Z", "root"])
            .spawn(std::process::Stdio::null(), std::process::Stdio::piped())?;
        let mut process = ChildGuard::new("tcpdump", child);
        let stderr = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let pipe = process
            .child_mut()
            .and_then(|c| c.stderr.take())
            .context("tcpdump stderr")?;
        let sink = Arc::clone(&stderr);
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    // Only the first send matters; later ones find no receiver.
                    ready_tx.send(()).ok();
                }
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&line);
                    s.push('\n');
                }
            }
        });
        if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
            let err = stderr.lock().map(|s| s.clone()).unwrap_or_default();
            bail!(
                "tcpdump on {iface} in {ns} did not start listening: {}",
                err.trim()
            );
        }
        Ok(Self {
            process,
            file: file.to_owned(),
            ns: ns.to_owned(),
            probe: probe.to_owned(),
            marker,
            stderr,
        })
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    /// What the file holds so far (tcpdump keeps running).
    pub fn summary_so_far(&self) -> Result<CaptureSummary> {
        summarize_file(&self.file, self.marker.as_bytes())
    }

    /// Sends the end marker, waits until tcpdump wrote it, stops tcpdump and summarizes.
    pub fn stop(mut self) -> Result<CaptureSummary> {
        let mut sent = 0u32;
        eventually(
            "the capture records its end marker",
            Duration::from_secs(10),
            || {
                // Resent on every attempt: a broadcast is not retransmitted if lost.
                sent += 1;
                Cmd::in_netns(&self.ns, &self.probe)
                    .args(["udp-send", "--broadcast", "--to"])
                    .arg(format!("192.0.2.255:{}", packet::MARKER_PORT))
                    .args(["--payload", &self.marker])
                    .run()?;
                if self.summary_so_far()?.markers == 0 {
                    bail!("marker not in {} yet ({sent} sent)", self.file.display());
                }
                Ok(())
            },
        )?;
        self.process
            .stop(Signal::SIGINT, Duration::from_secs(5))
            .context("failed to stop tcpdump")?;
        let mut summary = self.summary_so_far()?;
        let stderr = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        summary.kernel_dropped = parse_dropped(&stderr);
        Ok(summary)
    }
}

/// Counts per class of one capture.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureSummary {
    pub total: usize,
    pub wireguard: WireGuardCounts,
    pub plaintext_pod: usize,
    pub arp: usize,
    pub api: usize,
    pub other: usize,
    pub markers: usize,
    /// tcpdump's "dropped by kernel" (when known): a capture that dropped proves nothing.
    pub kernel_dropped: Option<u64>,
    /// The first few plaintext pod packets, described.
    pub offenders: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WireGuardCounts {
    pub initiation: usize,
    pub response: usize,
    pub cookie: usize,
    pub transport: usize,
}

impl WireGuardCounts {
    pub fn total(&self) -> usize {
        self.initiation + self.response + self.cookie + self.transport
    }
}

impl CaptureSummary {
    pub fn wireguard_packets(&self) -> usize {
        self.wireguard.total()
    }

    pub fn plaintext_pod_packets(&self) -> usize {
        self.plaintext_pod
    }

    /// No pod address in clear on the wire, and the capture dropped nothing.
    pub fn assert_no_plaintext(&self) -> Result<()> {
        if self.plaintext_pod > 0 {
            bail!(
                "{} plaintext pod packets on the underlay, first ones:\n  {}\n({self})",
                self.plaintext_pod,
                self.offenders.join("\n  ")
            );
        }
        if let Some(d) = self.kernel_dropped.filter(|d| *d > 0) {
            bail!("the capture dropped {d} packets, so it cannot prove the absence of plaintext");
        }
        Ok(())
    }

    /// Pod traffic crossed the underlay only inside WireGuard: no plaintext, some WireGuard.
    pub fn assert_only_wireguard(&self) -> Result<()> {
        self.assert_no_plaintext()?;
        if self.wireguard_packets() == 0 {
            bail!("no WireGuard packets on the underlay ({self})");
        }
        Ok(())
    }

    /// The opposite, for baselines: pod traffic was seen in clear.
    pub fn assert_plaintext_seen(&self) -> Result<()> {
        if self.plaintext_pod == 0 {
            bail!("expected plaintext pod packets on the underlay, saw none ({self})");
        }
        Ok(())
    }

    fn add(&mut self, class: Class, describe: impl FnOnce() -> String) {
        self.total += 1;
        match class {
            Class::WireGuard(WgMessage::Initiation) => self.wireguard.initiation += 1,
            Class::WireGuard(WgMessage::Response) => self.wireguard.response += 1,
            Class::WireGuard(WgMessage::Cookie) => self.wireguard.cookie += 1,
            Class::WireGuard(WgMessage::Transport) => self.wireguard.transport += 1,
            Class::PlaintextPod => {
                self.plaintext_pod += 1;
                if self.offenders.len() < MAX_OFFENDERS {
                    self.offenders.push(describe());
                }
            }
            Class::Arp => self.arp += 1,
            Class::Api => self.api += 1,
            Class::Marker => self.markers += 1,
            Class::Other => self.other += 1,
        }
    }
}

impl fmt::Display for CaptureSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = &self.wireguard;
        write!(
            f,
            "{} packets: wireguard {} (initiation {}, response {}, cookie {}, transport {}), \
             plaintext pod {}, arp {}, api {}, other {}",
            self.total - self.markers,
            w.total(),
            w.initiation,
            w.response,
            w.cookie,
            w.transport,
            self.plaintext_pod,
            self.arp,
            self.api,
            self.other
        )?;
        if let Some(d) = self.kernel_dropped {
            write!(f, ", dropped by kernel {d}")?;
        }
        Ok(())
    }
}

/// Summarizes a pcap file; `marker` identifies the end-marker datagrams (not counted as other).
pub fn summarize_file(file: &Path, marker: &[u8]) -> Result<CaptureSummary> {
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("failed to read {}", file.display())),
    };
    summarize(&bytes, marker).with_context(|| format!("failed to parse {}", file.display()))
}

/// Summarizes pcap bytes.
pub fn summarize(bytes: &[u8], marker: &[u8]) -> Result<CaptureSummary> {
    let pcap = pcap::parse(bytes)?;
    let mut s = CaptureSummary::default();
    let t0 = pcap.records.first().map(|r| r.ts).unwrap_or_default();
    for (i, r) in pcap.records.iter().enumerate() {
        let v = classify(pcap.link_type, r.data, marker);
        s.add(v.class, || {
            format!(
                "#{} +{:.3}s {}",
                i + 1,
                r.ts.saturating_sub(t0).as_secs_f64(),
                v.summary
            )
        });
    }
    Ok(s)
}

/// `N packets dropped by kernel` from tcpdump's exit report.
fn parse_dropped(stderr: &str) -> Option<u64> {
    stderr
        .lines()
        .find(|l| l.contains("dropped by kernel"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::{packet::tests::*, *};

    #[test]
    fn summary_counts_and_lists_offenders() {
        let leak = eth(
            0x0800,
            &ipv4([198, 18, 1, 11], [198, 18, 2, 11], 17, &udp(1, 2, b"hi")),
        );
        let tunnel = eth(
            0x0800,
            &ipv4(
                [192, 0, 2, 11],
                [192, 0, 2, 12],
                17,
                &udp(51820, 51820, &wg(4, 96)),
            ),
        );
        let init = eth(
            0x0800,
            &ipv4(
                [192, 0, 2, 11],
                [192, 0, 2, 12],
                17,
                &udp(51820, 51820, &wg(1, 148)),
            ),
        );
        let file = pcap::write(&[&init, &tunnel, &tunnel, &leak]);
        let s = summarize(&file, b"m").expect("summarizes");
        assert_eq!(s.wireguard_packets(), 3);
        assert_eq!(s.wireguard.initiation, 1);
        assert_eq!(s.plaintext_pod_packets(), 1);
        let err = s.assert_no_plaintext().unwrap_err().to_string();
        assert!(err.contains("198.18.1.11 > 198.18.2.11"), "{err}");
        assert!(s.assert_plaintext_seen().is_ok());
    }

    #[test]
    fn a_clean_capture_passes() {
        let tunnel = eth(
            0x0800,
            &ipv4(
                [192, 0, 2, 11],
                [192, 0, 2, 12],
                17,
                &udp(51820, 51820, &wg(4, 32)),
            ),
        );
        let s = summarize(&pcap::write(&[&tunnel]), b"m").expect("summarizes");
        s.assert_only_wireguard().expect("clean");
        assert!(CaptureSummary::default().assert_only_wireguard().is_err());
    }

    #[test]
    fn reads_tcpdump_drop_report() {
        let err = "listening on br0\n12 packets captured\n12 packets received by filter\n3 packets dropped by kernel\n";
        assert_eq!(parse_dropped(err), Some(3));
    }
}
