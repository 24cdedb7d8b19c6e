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
//! ```
//! The node routes the remote pod CIDR (198.19.2.0/24, 2001:db8:2::/64) via the uplink like a CNI
//! would, and has the agent's policy rule `fwmark 0x10000/0x10000 -> table 51 -> wg0`. The peer
//! does not own the remote pod address and does not forward, so a ping to it only succeeds if the
//! packet was marked and went through wg0. Only documentation ranges are used; nothing touches the
//! root namespace's links or routes, and all traffic stays inside these namespaces.
//!
//! Every resource is an RAII guard: namespaces are deleted and the bpffs unmounted even when a
//! scenario fails half-way.

use std::{
    fs::File,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
};

use anyhow::{Context as _, Result, anyhow, ensure};
use aya::programs::{SchedClassifier, TcAttachType};
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
pub const PEER_V4: &str = "198.18.100.2";
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
        Ok(lab)
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
        // Peer: the next node on the plaintext path; answers for itself only, never forwards.
        peer.ip(&["addr", "add", "198.18.100.2/24", "dev", "eth0"])?;
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
        self.address_pod_side()
    }

    pub fn config(&self, strict: bool) -> DatapathConfig {
        DatapathConfig {
            bpffs_dir: self.bpffs.dir.join("wgmesh"),
            fwmark: FWMARK,
            fwmask: FWMASK,
            strict,
        }
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
