//! A simulated node for the privileged datapath scenarios, built from network namespaces.
//!
//! ```text
//!  pod ns                node ns (the Datapath runs here)                 peer ns (plaintext path)
//!  eth0 198.18.1.2 ── vpod 198.18.1.1   up0 198.18.100.1 ──────────────── eth0 198.18.100.2
//!  2001:db8:1::2       2001:db8:1::1     2001:db8:100::1                   2001:db8:100::2
//!                                        wg0 198.18.200.1 ─────────────── tun ns eth0 198.18.200.2
//!                                        2001:db8:200::1   (stands in for  lo 198.19.2.1, 2001:db8:2::1
//!                                                           the WireGuard    (the remote pod)
//!                                                           tunnel)
//!                                        [wgt0: a TUN, on demand]          peer ns lo:
//!                                                                          198.19.3.1, 2001:db8:3::1
//!                                                                           (pod of an unpeered node)
//!                                                                          203.0.113.1, 2001:db8:ff::1
//!                                                                           ("the internet")
//! ```
//! The node routes the remote pod CIDR (198.19.2.0/24, 2001:db8:2::/64) via the uplink like a CNI
//! would, and has the agent's policy rule `fwmark 0x10000/0x10000 -> table 51 -> wg0`. The peer
//! does not own the remote pod address and does not forward, so a ping to it only succeeds if the
//! packet was marked and went through wg0 — or was redirected into the TUN [`TunDevice`], an L3
//! device like the real WireGuard device, whose reader thread answers pings. The peer does own the
//! pod address of a cluster node we have no WireGuard peer for (198.19.3.0/24, 2001:db8:3::/64)
//! and an "internet" address, both routed via the uplink. [`Capture`] records what reaches the
//! peer in the clear. Only documentation ranges are used; nothing touches the root namespace's
//! links or routes, and all traffic stays inside these namespaces.
//!
//! Every resource is an RAII guard: namespaces are deleted and the bpffs unmounted even when a
//! scenario fails half-way.

use std::{
    fs::File,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::{
        fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::OpenOptionsExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use aya::programs::{SchedClassifier, TcAttachType};
use ipnet::IpNet;
use nix::sched::{CloneFlags, setns};
use wgmesh_datapath::{AttachMode, Datapath, DatapathConfig, Direction};

pub const FWMARK: u32 = 0x1_0000;
pub const FWMASK: u32 = 0x1_0000;
pub const NODE_POD_GW_V4: &str = "198.18.1.1";
pub const LOCAL_CIDR_V4: &str = "198.18.1.0/24";
pub const LOCAL_CIDR_V6: &str = "2001:db8:1::/64";
pub const REMOTE_CIDR_V4: &str = "198.19.2.0/24";
pub const REMOTE_CIDR_V6: &str = "2001:db8:2::/64";
pub const REMOTE_POD_V4: &str = "198.19.2.1";
pub const REMOTE_POD_V6: &str = "2001:db8:2::1";
/// The peer's own (host) address on the plaintext path, the stand-in for another node's address.
pub const PEER_V4: &str = "198.18.100.2";
pub const PEER_V6: &str = "2001:db8:100::2";
/// The node's own address on the uplink.
pub const NODE_V4: &str = "198.18.100.1";
pub const NODE_V6: &str = "2001:db8:100::1";
/// The pod's address.
pub const POD_V4: &str = "198.18.1.2";
pub const POD_V6: &str = "2001:db8:1::2";
/// Pod CIDR of a cluster node we have no WireGuard peer for; the peer owns its first address.
pub const CLUSTER_ONLY_CIDR_V4: &str = "198.19.3.0/24";
pub const CLUSTER_ONLY_CIDR_V6: &str = "2001:db8:3::/64";
pub const CLUSTER_ONLY_POD_V4: &str = "198.19.3.1";
pub const CLUSTER_ONLY_POD_V6: &str = "2001:db8:3::1";
/// Outside every pod CIDR ("the internet"); the peer owns it.
pub const INTERNET_V4: &str = "203.0.113.1";
pub const INTERNET_V6: &str = "2001:db8:ff::1";
/// The on-demand TUN standing in for the WireGuard device as the guard sees it (L3).
pub const TUN_IF: &str = "wgt0";
pub const POD_IF: &str = "vpod";
pub const UPLINK_IF: &str = "up0";
pub const TUNNEL_IF: &str = "wg0";

/// `ip netns add` sets up the shared /run/netns mount on first use; keep concurrent scenarios
/// from racing on it.
static NETNS_SETUP: Mutex<()> = Mutex::new(());
static LAB_SEQ: AtomicU32 = AtomicU32::new(0);

/// Runs a command; fails with its stderr unless it exits 0.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = output(program, args)?;
    ensure!(
        output.status.success(),
        "`{program} {}` failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn output(program: &str, args: &[&str]) -> Result<Output> {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("failed to run {program}"))
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    fn add(name: String) -> Result<Self> {
        let _serial = NETNS_SETUP
            .lock()
            .map_err(|_| anyhow!("netns lock poisoned"))?;
        run("ip", &["netns", "add", &name])?;
        let netns = Self { name };
        // Quiet IPv6: no DAD delays, addresses usable at once.
        netns.sysctl(&[
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ])?;
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// `ip -n <ns> ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip netns exec <ns> PROGRAM ARGS`.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        output("ip", &all)
    }

    pub fn sysctl(&self, settings: &[&str]) -> Result<()> {
        let mut args = vec!["-qw"];
        args.extend_from_slice(settings);
        let out = self.exec("sysctl", &args)?;
        ensure!(
            out.status.success(),
            "sysctl {settings:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// One ping, one second to answer.
    pub fn ping(&self, dst: &str) -> Result<bool> {
        Ok(self
            .exec("ping", &["-n", "-q", "-c", "1", "-W", "1", dst])?
            .status
            .success())
    }

    /// Starts `count` pings `interval` seconds apart in the background.
    pub fn ping_burst(&self, dst: &str, count: u32, interval: &str) -> Result<PingBurst> {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, "ping", "-n", "-q", "-W", "1"])
            .args(["-c", &count.to_string(), "-i", interval, dst])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("failed to start ping")?;
        Ok(PingBurst { child: Some(child) })
    }

    /// `tx_packets` of an interface in this namespace.
    pub fn tx_packets(&self, ifname: &str) -> Result<u64> {
        let path = format!("/sys/class/net/{ifname}/statistics/tx_packets");
        let out = self.exec("cat", &[&path])?;
        ensure!(out.status.success(), "cannot read {path} in {}", self.name);
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(err) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("teardown: {err:#}");
        }
    }
}

/// A background ping; killed on drop if not waited for.
pub struct PingBurst {
    child: Option<Child>,
}

impl PingBurst {
    /// Waits for the end; returns (transmitted, received).
    pub fn finish(mut self) -> Result<(u32, u32)> {
        let child = self.child.take().context("ping already finished")?;
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        // "200 packets transmitted, 200 received, 0% packet loss, time 2040ms"
        let line = stdout
            .lines()
            .find(|line| line.contains("packets transmitted"))
            .with_context(|| format!("no ping summary in {stdout:?}"))?;
        let number = |word: &str| -> Result<u32> {
            let words: Vec<&str> = line.split([' ', ',']).filter(|w| !w.is_empty()).collect();
            let at = words
                .iter()
                .position(|w| *w == word)
                .with_context(|| format!("no {word:?} in {line:?}"))?;
            Ok(words[at - 1].parse()?)
        };
        Ok((number("packets")?, number("received")?))
    }
}

impl Drop for PingBurst {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take()
            && let Err(err) = child.kill().and_then(|()| child.wait().map(drop))
        {
            eprintln!("teardown: ping: {err}");
        }
    }
}

/// A bpffs mounted on a private temporary directory, unmounted on drop.
pub struct Bpffs {
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Bpffs {
    fn mount() -> Result<Self> {
        let tmp = tempfile::Builder::new().prefix("wgdp-bpffs-").tempdir()?;
        let dir = tmp.path().to_path_buf();
        let dir_str = dir.to_str().context("non-UTF-8 temp dir")?;
        run("mount", &["-t", "bpf", "bpf", dir_str])?;
        Ok(Self { dir, _tmp: tmp })
    }

    /// Every file (pin) below the mount, relative, sorted; the kernel's own `*.debug` iterator
    /// files at the root of every bpffs mount are left out.
    pub fn pins(&self) -> Result<Vec<String>> {
        fn walk(root: &Path, dir: &Path, found: &mut Vec<String>) -> Result<()> {
            for entry in std::fs::read_dir(dir)? {
                let path = entry?.path();
                if path.is_dir() {
                    walk(root, &path, found)?;
                } else {
                    found.push(path.strip_prefix(root)?.display().to_string());
                }
            }
            Ok(())
        }
        let mut found = Vec::new();
        walk(&self.dir, &self.dir, &mut found)?;
        found.retain(|pin| pin.contains('/') || !pin.ends_with(".debug"));
        found.sort();
        Ok(found)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        // Lazy: never leave a test mount behind even if something still holds it.
        let dir = self.dir.display().to_string();
        if let Err(err) = run("umount", &["-l", &dir]) {
            eprintln!("teardown: {err:#}");
        }
    }
}

type Job = Box<dyn FnOnce(&mut Option<Datapath>) + Send>;

/// A dedicated OS thread inside the node namespace, standing in for the agent process: the
/// Datapath is created, used and dropped on it. Dropping the agent drops its Datapath (as an
/// exiting agent would) and ends the thread.
pub struct Agent {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Agent {
    pub fn start(netns: &Netns) -> Result<Self> {
        let path = format!("/var/run/netns/{}", netns.name);
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let thread = thread::Builder::new()
            .name(format!("agent-{}", netns.name))
            .spawn(move || {
                // The network namespace is per thread: everything below (ifindex lookups,
                // netlink, TCX attach) happens in the node namespace.
                let entered = File::open(&path)
                    .map_err(|err| format!("open {path}: {err}"))
                    .and_then(|ns| {
                        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
                            .map_err(|err| format!("setns {path}: {err}"))
                    });
                let ok = entered.is_ok();
                if ready_tx.send(entered).is_err() || !ok {
                    return;
                }
                let mut datapath = None;
                for job in job_rx {
                    job(&mut datapath);
                }
            })?;
        ready_rx
            .recv()
            .context("agent thread died")?
            .map_err(anyhow::Error::msg)?;
        Ok(Self {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Runs `job` on the agent thread with its Datapath slot.
    pub fn run<R: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Option<Datapath>) -> R + Send + 'static,
    ) -> Result<R> {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .as_ref()
            .context("agent stopped")?
            .send(Box::new(move |datapath| {
                if tx.send(job(datapath)).is_err() {
                    eprintln!("agent: nobody waits for the result");
                }
            }))
            .map_err(|_| anyhow!("agent thread is gone"))?;
        rx.recv().context("agent job panicked")
    }

    /// Loads a Datapath into the agent's slot (replacing, i.e. dropping, any previous one).
    pub fn load(&self, cfg: &DatapathConfig, mode: AttachMode) -> Result<()> {
        let cfg = cfg.clone();
        self.run(move |slot| {
            *slot = None;
            *slot = Some(Datapath::load_with_mode(&cfg, mode)?);
            Ok::<_, wgmesh_datapath::Error>(())
        })??;
        Ok(())
    }

    /// Runs `op` on the loaded Datapath.
    pub fn with<R: Send + 'static>(
        &self,
        op: impl FnOnce(&mut Datapath) -> Result<R, wgmesh_datapath::Error> + Send + 'static,
    ) -> Result<R> {
        self.run(move |slot| match slot {
            Some(datapath) => op(datapath).map_err(anyhow::Error::from),
            None => Err(anyhow!("no datapath loaded")),
        })?
    }

    /// The programs attached at `direction` of `ifname` in the node namespace, by either
    /// mechanism: TCX links (as `bpftool link`/`net` would list them) plus cls_bpf filters.
    pub fn attached_programs(
        &self,
        node: &Netns,
        ifname: &str,
        direction: Direction,
    ) -> Result<Vec<u32>> {
        let owned = ifname.to_owned();
        let attach_type = match direction {
            Direction::Ingress => TcAttachType::Ingress,
            Direction::Egress => TcAttachType::Egress,
        };
        let mut ids = self.run(move |_| {
            // Kernels without TCX answer with an error: no TCX programs then.
            SchedClassifier::query_tcx(&owned, attach_type)
                .map(|(_, programs)| programs.iter().map(|p| p.id()).collect::<Vec<_>>())
                .unwrap_or_default()
        })?;
        ids.extend(tc_filter_program_ids(node, ifname, direction)?);
        Ok(ids)
    }

    /// Drops the Datapath and ends the thread, as an agent exit would.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            thread
                .join()
                .map_err(|_| anyhow!("agent thread panicked"))?;
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Err(err) = self.shutdown() {
            eprintln!("teardown: {err:#}");
        }
    }
}

/// Program ids of the cls_bpf filters at `direction` of `ifname` (`tc filter show`).
pub fn tc_filter_program_ids(node: &Netns, ifname: &str, direction: Direction) -> Result<Vec<u32>> {
    let hook = direction.to_string();
    let out = node.exec("tc", &["filter", "show", "dev", ifname, &hook])?;
    if !out.status.success() {
        // No clsact qdisc on the device: no filters.
        return Ok(Vec::new());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter(|line| line.contains(" bpf ") && line.contains(" handle "))
        .map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let at = words
                .iter()
                .position(|w| *w == "id")
                .with_context(|| format!("no program id in {line:?}"))?;
            Ok(words
                .get(at + 1)
                .context("truncated tc output")?
                .parse::<u32>()?)
        })
        .collect()
}

/// The whole simulated node. Field order is drop order: namespaces first, then the bpffs.
pub struct Lab {
    pub pod: Netns,
    pub node: Netns,
    pub peer: Netns,
    pub tun: Netns,
    pub bpffs: Bpffs,
}

impl Lab {
    pub fn new() -> Result<Self> {
        let prefix = format!(
            "wgdp-{}-{}",
            std::process::id(),
            LAB_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        // Mount first so that it is unmounted last.
        let bpffs = Bpffs::mount()?;
        let lab = Self {
            pod: Netns::add(format!("{prefix}-pod"))?,
            node: Netns::add(format!("{prefix}-node"))?,
            peer: Netns::add(format!("{prefix}-peer"))?,
            tun: Netns::add(format!("{prefix}-tun"))?,
            bpffs,
        };
        lab.wire()?;
        lab.wait_for_the_pod_gateway()?;
        Ok(lab)
    }

    /// A fresh pod's first IPv6 neighbor solicitation for its gateway sometimes goes unanswered
    /// (the node's side of the veth is not quite ready); the retransmission a second later is
    /// answered, just too late for a one-second ping. Settle that once, so every scenario's first
    /// ping means what it says.
    fn wait_for_the_pod_gateway(&self) -> Result<()> {
        eventually("the pod reaches its IPv6 gateway", || {
            self.pod.ping("2001:db8:1::1")
        })?;
        eventually("the pod reaches its IPv4 gateway", || {
            self.pod.ping(NODE_POD_GW_V4)
        })
    }

    fn wire(&self) -> Result<()> {
        let (pod, node, peer, tun) = (&self.pod, &self.node, &self.peer, &self.tun);
        // Before any device exists, so every device inherits it: forward, no reverse-path
        // filtering (replies from the tunnel come back on wg0, not the CNI route's uplink).
        node.sysctl(&[
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ])?;
        for (node_if, other) in [(POD_IF, pod), (UPLINK_IF, peer), (TUNNEL_IF, tun)] {
            node.ip(&[
                "link",
                "add",
                node_if,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &other.name,
            ])?;
        }
        self.address_pod_side()?;
        for (dev, v4, v6) in [
            (POD_IF, "198.18.1.1/24", "2001:db8:1::1/64"),
            (UPLINK_IF, "198.18.100.1/24", "2001:db8:100::1/64"),
            (TUNNEL_IF, "198.18.200.1/24", "2001:db8:200::1/64"),
        ] {
            node.ip(&["addr", "add", v4, "dev", dev])?;
            node.ip(&["-6", "addr", "add", v6, "dev", dev, "nodad"])?;
            node.ip(&["link", "set", dev, "up"])?;
        }
        // The CNI's plaintext route to the remote node's pods.
        node.ip(&["route", "add", REMOTE_CIDR_V4, "via", PEER_V4])?;
        node.ip(&[
            "-6",
            "route",
            "add",
            REMOTE_CIDR_V6,
            "via",
            "2001:db8:100::2",
        ])?;
        // The agent's policy routing: marked packets go into the tunnel.
        let mark = format!("{FWMARK:#x}/{FWMASK:#x}");
        for family in ["-4", "-6"] {
            node.ip(&[
                family, "rule", "add", "fwmark", &mark, "lookup", "51", "priority", "100",
            ])?;
        }
        node.ip(&[
            "route",
            "add",
            "default",
            "via",
            "198.18.200.2",
            "dev",
            TUNNEL_IF,
            "table",
            "51",
        ])?;
        node.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            "2001:db8:200::2",
            "dev",
            TUNNEL_IF,
            "table",
            "51",
        ])?;
        // The CNI's plaintext routes to the unpeered node's pods and to "the internet".
        for (dst, via) in [
            (CLUSTER_ONLY_CIDR_V4, PEER_V4),
            (CLUSTER_ONLY_CIDR_V6, "2001:db8:100::2"),
            ("203.0.113.0/24", PEER_V4),
            ("2001:db8:ff::/64", "2001:db8:100::2"),
        ] {
            node.ip(&["route", "add", dst, "via", via])?;
        }
        // Peer: the next node on the plaintext path; answers for itself only, never forwards.
        // It also owns the unpeered node's pod and the "internet" address.
        peer.ip(&["addr", "add", "198.18.100.2/24", "dev", "eth0"])?;
        for addr in [
            "198.19.3.1/32",
            "2001:db8:3::1/128",
            "203.0.113.1/32",
            "2001:db8:ff::1/128",
        ] {
            peer.ip(&["addr", "add", addr, "dev", "lo"])?;
        }
        peer.ip(&[
            "-6",
            "addr",
            "add",
            "2001:db8:100::2/64",
            "dev",
            "eth0",
            "nodad",
        ])?;
        peer.ip(&["link", "set", "eth0", "up"])?;
        peer.ip(&["route", "add", LOCAL_CIDR_V4, "via", "198.18.100.1"])?;
        peer.ip(&[
            "-6",
            "route",
            "add",
            LOCAL_CIDR_V6,
            "via",
            "2001:db8:100::1",
        ])?;
        // Tunnel end: owns the remote pod's addresses.
        tun.ip(&["addr", "add", "198.18.200.2/24", "dev", "eth0"])?;
        tun.ip(&[
            "-6",
            "addr",
            "add",
            "2001:db8:200::2/64",
            "dev",
            "eth0",
            "nodad",
        ])?;
        tun.ip(&["addr", "add", "198.19.2.1/32", "dev", "lo"])?;
        tun.ip(&["-6", "addr", "add", "2001:db8:2::1/128", "dev", "lo"])?;
        tun.ip(&["link", "set", "eth0", "up"])?;
        tun.ip(&["route", "add", LOCAL_CIDR_V4, "via", "198.18.200.1"])?;
        tun.ip(&[
            "-6",
            "route",
            "add",
            LOCAL_CIDR_V6,
            "via",
            "2001:db8:200::1",
        ])?;
        Ok(())
    }

    fn address_pod_side(&self) -> Result<()> {
        let pod = &self.pod;
        pod.ip(&["addr", "add", "198.18.1.2/24", "dev", "eth0"])?;
        pod.ip(&[
            "-6",
            "addr",
            "add",
            "2001:db8:1::2/64",
            "dev",
            "eth0",
            "nodad",
        ])?;
        pod.ip(&["link", "set", "eth0", "up"])?;
        pod.ip(&["route", "add", "default", "via", NODE_POD_GW_V4])?;
        pod.ip(&["-6", "route", "add", "default", "via", "2001:db8:1::1"])?;
        Ok(())
    }

    /// Deletes the pod's veth pair, as deleting the pod does.
    pub fn delete_pod_veth(&self) -> Result<()> {
        self.node.ip(&["link", "del", POD_IF])?;
        Ok(())
    }

    /// Creates the pod's veth pair again under the same names and addresses (a pod re-created
    /// with the same name gets the same host-side veth name from most CNIs).
    pub fn create_pod_veth(&self) -> Result<()> {
        self.node.ip(&[
            "link",
            "add",
            POD_IF,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &self.pod.name,
        ])?;
        self.node
            .ip(&["addr", "add", "198.18.1.1/24", "dev", POD_IF])?;
        self.node.ip(&[
            "-6",
            "addr",
            "add",
            "2001:db8:1::1/64",
            "dev",
            POD_IF,
            "nodad",
        ])?;
        self.node.ip(&["link", "set", POD_IF, "up"])?;
        self.address_pod_side()?;
        self.wait_for_the_pod_gateway()
    }

    pub fn config(&self, strict: bool) -> DatapathConfig {
        DatapathConfig {
            bpffs_dir: self.bpffs.dir.join("wgmesh"),
            fwmark: FWMARK,
            fwmask: FWMASK,
            strict,
            tunnel_ifindex: 0,
        }
    }

    /// Creates the TUN [`TUN_IF`] in the node namespace and brings it up.
    pub fn tun_device(&self) -> Result<TunDevice> {
        let tun = TunDevice::create(&self.node, TUN_IF)?;
        self.node.ip(&["link", "set", TUN_IF, "up"])?;
        Ok(tun)
    }

    /// Whether `ifname` exists in the node namespace.
    pub fn node_has_link(&self, ifname: &str) -> Result<bool> {
        Ok(self
            .node
            .exec("ip", &["link", "show", "dev", ifname])?
            .status
            .success())
    }
}

/// Enters the network namespace at `/var/run/netns/<name>` (this thread only).
fn enter_netns(name: &str) -> Result<()> {
    let path = format!("/var/run/netns/{name}");
    let ns = File::open(&path).with_context(|| format!("open {path}"))?;
    setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).with_context(|| format!("setns {path}"))?;
    Ok(())
}

/// Runs `body` on a new thread inside `netns`; `setup` runs there first and its result (or error)
/// is returned once it is done, so the caller knows the thread is ready. `body` runs until `stop`.
fn spawn_in_netns<S: Send + 'static, R: Send + 'static>(
    netns: &Netns,
    what: &str,
    setup: impl FnOnce() -> Result<(S, R)> + Send + 'static,
    body: impl FnOnce(S, Arc<AtomicBool>) -> Result<()> + Send + 'static,
) -> Result<(R, Arc<AtomicBool>, JoinHandle<Result<()>>)> {
    let name = netns.name.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_thread = Arc::clone(&stop);
    let (ready_tx, ready_rx) = mpsc::channel::<Result<R>>();
    let thread = thread::Builder::new()
        .name(format!("{what}-{name}"))
        .spawn(move || -> Result<()> {
            let state = match enter_netns(&name).and_then(|()| setup()) {
                Ok((state, ready)) => {
                    ready_tx
                        .send(Ok(ready))
                        .map_err(|_| anyhow!("nobody waits"))?;
                    state
                }
                Err(err) => {
                    let msg = format!("{err:#}");
                    // The caller reports the error; if it is gone there is nobody to tell.
                    let _ = ready_tx.send(Err(err));
                    bail!(msg);
                }
            };
            body(state, stop_thread)
        })?;
    let ready = ready_rx
        .recv()
        .with_context(|| format!("{what} thread died"))??;
    Ok((ready, stop, thread))
}

fn finish_thread(
    what: &str,
    stop: &AtomicBool,
    thread: &mut Option<JoinHandle<Result<()>>>,
) -> Result<()> {
    stop.store(true, Ordering::Relaxed);
    match thread.take() {
        Some(thread) => thread
            .join()
            .map_err(|_| anyhow!("{what} thread panicked"))?,
        None => Ok(()),
    }
}

/// The destination of a raw IPv4/IPv6 packet (no link-layer header), if it is one.
pub fn ip_dst(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => {
            let dst: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(dst)))
        }
        6 => {
            let dst: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(dst)))
        }
        _ => None,
    }
}

/// RFC 1624 incremental update of an Internet checksum when a 16-bit word changes.
pub fn checksum_replace(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop folded the sum into 16 bits.
    !(sum as u16)
}

/// The echo reply to an ICMP/ICMPv6 echo request in a raw IP packet (addresses swapped, type
/// changed, checksum updated), or `None` for anything else. IPv6 extension headers are not
/// followed (ping sends none).
pub fn echo_reply(packet: &[u8]) -> Option<Vec<u8>> {
    let mut reply = packet.to_vec();
    let (icmp, new_type) = match packet.first()? >> 4 {
        4 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            if packet.get(9) != Some(&1) || packet.get(ihl) != Some(&8) {
                return None;
            }
            // Swapping source and destination leaves the header checksum as it is.
            for i in 0..4 {
                reply.swap(12 + i, 16 + i);
            }
            (ihl, 0)
        }
        6 => {
            if packet.get(6) != Some(&58) || packet.get(40) != Some(&128) {
                return None;
            }
            // The pseudo-header sum is the same with the addresses swapped.
            for i in 0..16 {
                reply.swap(8 + i, 24 + i);
            }
            (40, 129)
        }
        _ => return None,
    };
    let check_at = icmp + 2;
    let check = u16::from_be_bytes(reply.get(check_at..check_at + 2)?.try_into().ok()?);
    let old = u16::from_be_bytes([reply[icmp], reply[icmp + 1]]);
    reply[icmp] = new_type;
    let new = u16::from_be_bytes([reply[icmp], reply[icmp + 1]]);
    reply[check_at..check_at + 2].copy_from_slice(&checksum_replace(check, old, new).to_be_bytes());
    Some(reply)
}

/// A TUN device (IFF_TUN, no packet info: raw IP packets, an L3 device like a WireGuard link) in
/// a namespace, read by a thread that records every packet and answers ICMP echo requests, like
/// a tunnel whose far end owns every address. Dropping it closes the fd, which deletes the device.
pub struct TunDevice {
    pub ifindex: u32,
    packets: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl TunDevice {
    pub fn create(netns: &Netns, ifname: &str) -> Result<Self> {
        let name = ifname.to_owned();
        let packets = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&packets);
        let (ifindex, stop, thread) = spawn_in_netns(
            netns,
            "tun",
            move || {
                let tun = open_tun(&name)?;
                let ifindex = nix::net::if_::if_nametoindex(name.as_str())
                    .with_context(|| format!("ifindex of {name}"))?;
                Ok((tun, ifindex))
            },
            move |tun, stop| serve_tun(&tun, &recorded, &stop),
        )?;
        Ok(Self {
            ifindex,
            packets,
            stop,
            thread: Some(thread),
        })
    }

    /// Every packet read from the device so far.
    pub fn packets(&self) -> Vec<Vec<u8>> {
        self.packets
            .lock()
            .map(|packets| packets.clone())
            .unwrap_or_default()
    }

    /// How many packets read so far were addressed to `dst`.
    pub fn packets_to(&self, dst: &str) -> Result<usize> {
        let dst: IpAddr = dst.parse()?;
        Ok(self
            .packets()
            .iter()
            .filter(|packet| ip_dst(packet) == Some(dst))
            .count())
    }

    /// Stops the reader and closes the device (which deletes it).
    pub fn close(mut self) -> Result<()> {
        finish_thread("tun", &self.stop, &mut self.thread)
    }
}

impl Drop for TunDevice {
    fn drop(&mut self) {
        if let Err(err) = finish_thread("tun", &self.stop, &mut self.thread) {
            eprintln!("teardown: {err:#}");
        }
    }
}

/// Opens `/dev/net/tun` and creates the (non-persistent) TUN `name` in this thread's namespace.
fn open_tun(name: &str) -> Result<File> {
    let tun = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .context("open /dev/net/tun")?;
    // SAFETY: `ifreq` is plain old data (a name array and a union of integers/structs of
    // integers); all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    ensure!(name.len() < request.ifr_name.len(), "name too long: {name}");
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `ifreq`, which `request` is and which outlives the
    // call; the fd is an open /dev/net/tun.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &raw mut request) };
    if rc < 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("TUNSETIFF {name}"));
    }
    Ok(tun)
}

/// Waits up to `timeout_ms` for `fd` to become readable.
fn wait_readable(fd: &impl std::os::fd::AsRawFd, timeout_ms: i32) -> Result<bool> {
    let mut poll = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call.
    let ready = unsafe { libc::poll(&raw mut poll, 1, timeout_ms) };
    if ready < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(err).context("poll");
    }
    Ok(ready > 0)
}

fn serve_tun(tun: &File, recorded: &Mutex<Vec<Vec<u8>>>, stop: &AtomicBool) -> Result<()> {
    let mut buf = vec![0u8; 65_536];
    let mut reader = tun;
    while !stop.load(Ordering::Relaxed) {
        if !wait_readable(tun, 50)? {
            continue;
        }
        loop {
            let len = match reader.read(&mut buf) {
                Ok(len) => len,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) => return Err(err).context("read from the TUN"),
            };
            let packet = buf[..len].to_vec();
            let reply = echo_reply(&packet);
            // Recorded before it is answered: a test that saw its ping answered then finds the
            // request among the packets.
            recorded
                .lock()
                .map_err(|_| anyhow!("tun packets lock poisoned"))?
                .push(packet);
            if let Some(reply) = reply {
                let mut writer = tun;
                if let Err(err) = writer.write_all(&reply) {
                    eprintln!("tun: cannot answer: {err}");
                }
            }
        }
    }
    Ok(())
}

/// Records the frames an interface receives (an `AF_PACKET` socket in its namespace): what went
/// over the wire in the clear.
pub struct Capture {
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Capture {
    pub fn start(netns: &Netns, ifname: &str) -> Result<Self> {
        let name = ifname.to_owned();
        let frames = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&frames);
        let ((), stop, thread) = spawn_in_netns(
            netns,
            "capture",
            move || {
                let ifindex = nix::net::if_::if_nametoindex(name.as_str())
                    .with_context(|| format!("ifindex of {name}"))?;
                Ok(((packet_socket(ifindex)?, ifindex), ()))
            },
            move |(socket, ifindex), stop| capture(&socket, ifindex, &recorded, &stop),
        )?;
        Ok(Self {
            frames,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops capturing (after reading what is queued) and returns how many received frames
    /// carried an IP packet for one of `nets`.
    pub fn finish_count(mut self, nets: &[&str]) -> Result<usize> {
        // Frames are queued on the socket before the sender's ping even times out; give the
        // reader one more round anyway.
        thread::sleep(Duration::from_millis(100));
        finish_thread("capture", &self.stop, &mut self.thread)?;
        let nets = nets
            .iter()
            .map(|net| net.parse::<IpNet>())
            .collect::<Result<Vec<_>, _>>()?;
        let frames = self
            .frames
            .lock()
            .map_err(|_| anyhow!("capture lock poisoned"))?;
        Ok(frames
            .iter()
            .filter_map(|frame| {
                let ethertype = u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?);
                matches!(ethertype, 0x0800 | 0x86dd)
                    .then(|| ip_dst(frame.get(14..)?))
                    .flatten()
            })
            .filter(|dst| nets.iter().any(|net| net.contains(dst)))
            .count())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Err(err) = finish_thread("capture", &self.stop, &mut self.thread) {
            eprintln!("teardown: {err:#}");
        }
    }
}

/// A raw packet socket bound to `ifindex`, with a 50 ms receive timeout.
fn packet_socket(ifindex: u32) -> Result<OwnedFd> {
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain syscall; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(protocol),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("socket(AF_PACKET)");
    }
    // SAFETY: `fd` is a new socket that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `sockaddr_ll` is plain old data; all-zero is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol;
    addr.sll_ifindex = i32::try_from(ifindex)?;
    // SAFETY: `addr` is a valid sockaddr_ll of the size passed, alive for the call.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error()).context("bind(AF_PACKET)");
    }
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 50_000,
    };
    // SAFETY: SO_RCVTIMEO takes a timeval of the size passed, alive for the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error()).context("SO_RCVTIMEO");
    }
    Ok(socket)
}

fn capture(
    socket: &OwnedFd,
    ifindex: u32,
    recorded: &Mutex<Vec<Vec<u8>>>,
    stop: &AtomicBool,
) -> Result<()> {
    let mut buf = vec![0u8; 65_536];
    loop {
        // SAFETY: `sockaddr_ll` is plain old data; all-zero is valid.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` and `from` are valid for writes of the sizes passed and outlive the call.
        let len = unsafe {
            libc::recvfrom(
                socket.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&raw mut from).cast(),
                &raw mut from_len,
            )
        };
        if len < 0 {
            let err = io::Error::last_os_error();
            match err.kind() {
                // Timed out with nothing queued: done once asked to stop.
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    continue;
                }
                io::ErrorKind::Interrupted => continue,
                _ => return Err(err).context("recvfrom(AF_PACKET)"),
            }
        }
        // Frames queued before bind() may come from other interfaces; and only what arrived
        // counts, not what this namespace sent.
        if u32::try_from(from.sll_ifindex).ok() != Some(ifindex)
            || from.sll_pkttype == libc::PACKET_OUTGOING
        {
            continue;
        }
        let len = usize::try_from(len)?;
        recorded
            .lock()
            .map_err(|_| anyhow!("capture lock poisoned"))?
            .push(buf[..len].to_vec());
    }
}

/// Polls `check` every 50 ms for up to 5 s. Some kernel releases are asynchronous: a TCX link
/// whose last pin is removed is freed after an RCU grace period (bpffs frees inodes from an RCU
/// callback), so it stays attached for a few milliseconds after `unlink` returns.
pub fn eventually(what: &str, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if check()? {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The kernel id of the TCX link pinned at `pin` (the same link keeps its id).
pub fn pinned_link_id(pin: &Path) -> Result<u32> {
    let link = aya::programs::links::PinnedLink::from_pin(pin)
        .with_context(|| format!("open {}", pin.display()))?;
    let info = aya::programs::links::FdLink::from(link).info()?;
    Ok(info.id())
}

/// The mechanism this kernel uses; scenarios written for TCX are skipped without it.
pub fn kernel_has_tcx() -> bool {
    AttachMode::detect() == AttachMode::Tcx
}

pub fn skip(reason: &str) -> Result<()> {
    eprintln!("skipped: {reason}");
    Ok(())
}
