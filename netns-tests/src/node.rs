//! A simulated Kubernetes node: a network namespace on the underlay bridge, its pods, its
//! bpffs, and the `wgmesh-agent` child process.
//!
//! Addressing (node index i, 1-based): eth0 = 192.0.2.(10+i)/24, pod CIDR 198.18.i.0/24,
//! pod gateway 198.18.i.1 on every host-side pod veth. `Testbed` adds the host-gw CNI routes
//! between nodes.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use ipnet::Ipv4Net;
use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sys::signal::Signal,
};
use serde_json::Value;

use crate::{
    cmd::Cmd,
    netns::NetNs,
    pod::{Destination, PingReport, Pod},
    probe::TcpRequestReport,
    process::ChildGuard,
    testbed::{Context as BedContext, tail_file},
    wg::WgDump,
};

/// Env var naming the agent binary.
pub const ENV_AGENT_BIN: &str = "WGMESH_AGENT_BIN";
/// The node's uplink inside its namespace.
pub const UPLINK: &str = "eth0";
/// Default WireGuard port of the agents.
pub const DEFAULT_LISTEN_PORT: u16 = 51820;
/// Default address of the agent's status endpoint (inside the node namespace).
pub const DEFAULT_STATUS_ADDR: &str = "127.0.0.1:9464";
/// How long SIGTERM gets before SIGKILL.
pub const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Underlay address of node `index`.
pub fn node_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 10 + index)
}

/// Pod CIDR of node `index`.
pub fn pod_cidr(index: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(198, 18, index, 0), 24).expect("prefix length 24 is valid")
}

/// The pod gateway of node `index` (on every host-side pod veth).
pub fn pod_gateway(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, index, 1)
}

/// How a node's agent is started. Built through `NodeBuilder`, changeable with
/// `Node::configure_agent` between restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSpec {
    pub backend: String,
    pub listen_port: u16,
    pub status_addr: SocketAddr,
    pub pod_interface_prefix: String,
    pub log_filter: String,
    /// Appended after the standard arguments.
    pub extra_args: Vec<String>,
    /// Replaces all arguments after the binary when set.
    pub args_override: Option<Vec<String>>,
    pub env: Vec<(String, String)>,
}

impl Default for AgentSpec {
    fn default() -> Self {
        Self {
            // The VM tier runs the same scenarios against kernel WireGuard.
            backend: std::env::var("WGMESH_TEST_BACKEND")
                .unwrap_or_else(|_| "userspace".to_owned()),
            listen_port: DEFAULT_LISTEN_PORT,
            status_addr: DEFAULT_STATUS_ADDR.parse().expect("literal address"),
            pod_interface_prefix: "veth".to_owned(),
            log_filter: "info,wgmesh=debug".to_owned(),
            extra_args: Vec::new(),
            args_override: None,
            env: Vec::new(),
        }
    }
}

/// Describes a node to create: `.node("a", |n| n.pod("a1").backend("kernel"))`.
#[derive(Debug, Clone)]
pub struct NodeBuilder {
    pub(crate) name: String,
    pub(crate) pods: Vec<String>,
    pub(crate) agent: AgentSpec,
    /// `None`: follow the testbed's default.
    pub(crate) start_agent: Option<bool>,
}

impl NodeBuilder {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            pods: Vec::new(),
            agent: AgentSpec::default(),
            start_agent: None,
        }
    }

    /// A pod on this node (names are unique across the testbed).
    pub fn pod(mut self, name: &str) -> Self {
        self.pods.push(name.to_owned());
        self
    }

    pub fn pods<'a>(mut self, names: impl IntoIterator<Item = &'a str>) -> Self {
        self.pods.extend(names.into_iter().map(str::to_owned));
        self
    }

    /// `--backend` (default `userspace`; `kernel` for the VM tier).
    pub fn backend(mut self, backend: &str) -> Self {
        self.agent.backend = backend.to_owned();
        self
    }

    pub fn listen_port(mut self, port: u16) -> Self {
        self.agent.listen_port = port;
        self
    }

    /// One more agent argument after the standard ones.
    pub fn agent_arg(mut self, arg: &str) -> Self {
        self.agent.extra_args.push(arg.to_owned());
        self
    }

    pub fn agent_args<'a>(mut self, args: impl IntoIterator<Item = &'a str>) -> Self {
        self.agent
            .extra_args
            .extend(args.into_iter().map(str::to_owned));
        self
    }

    /// Replace the whole argument list (everything after the binary).
    pub fn agent_args_override<'a>(mut self, args: impl IntoIterator<Item = &'a str>) -> Self {
        self.agent.args_override = Some(args.into_iter().map(str::to_owned).collect());
        self
    }

    pub fn agent_env(mut self, key: &str, value: &str) -> Self {
        self.agent.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// `RUST_LOG`/`WGMESH_LOG` filter (default `info,wgmesh=debug`).
    pub fn agent_log_filter(mut self, filter: &str) -> Self {
        self.agent.log_filter = filter.to_owned();
        self
    }

    /// Do not start the agent with the testbed; call `Node::start_agent` later.
    pub fn without_agent(mut self) -> Self {
        self.start_agent = Some(false);
        self
    }

    /// Start the agent with the testbed even if the testbed defaults to no agents.
    pub fn with_agent(mut self) -> Self {
        self.start_agent = Some(true);
        self
    }
}

/// A node (cheap to clone: a shared handle).
#[derive(Debug, Clone)]
pub struct Node(pub(crate) Arc<NodeInner>);

#[derive(Debug)]
pub(crate) struct NodeInner {
    pub(crate) name: String,
    pub(crate) index: u8,
    pub(crate) ns: NetNs,
    pub(crate) ctx: Arc<BedContext>,
    pub(crate) dir: PathBuf,
    pub(crate) wg_interface: String,
    pub(crate) agent_spec: Mutex<AgentSpec>,
    pub(crate) agent: Mutex<Option<ChildGuard>>,
    pub(crate) agent_ever_started: AtomicBool,
    pub(crate) pods: Mutex<Vec<Pod>>,
    pub(crate) next_pod: AtomicU32,
    pub(crate) bpffs_mounted: AtomicBool,
    pub(crate) torn_down: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a harness lock leaves consistent data (plain values): keep going so
    // teardown still runs.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Node {
    /// Creates the namespace, bpffs and pods (not the underlay link: the testbed does that).
    pub(crate) fn create(ctx: &Arc<BedContext>, spec: &NodeBuilder, index: u8) -> Result<Self> {
        let ns = NetNs::create(&format!("{}-n-{}", ctx.prefix, spec.name), ctx.keep)?;
        let dir = ctx.dir.join(&spec.name);
        std::fs::create_dir_all(dir.join("state"))
            .with_context(|| format!("failed to create {}", dir.display()))?;
        std::fs::create_dir_all(dir.join("bpffs")).context("failed to create the bpffs dir")?;
        let wg_interface = format!("wm{}-{index}", ctx.prefix);
        crate::names::validate_ifname(&wg_interface)?;
        let node = Self(Arc::new(NodeInner {
            name: spec.name.clone(),
            index,
            ns,
            ctx: Arc::clone(ctx),
            dir,
            wg_interface,
            agent_spec: Mutex::new(spec.agent.clone()),
            agent: Mutex::new(None),
            agent_ever_started: AtomicBool::new(false),
            pods: Mutex::new(Vec::new()),
            next_pod: AtomicU32::new(1),
            bpffs_mounted: AtomicBool::new(false),
            torn_down: AtomicBool::new(false),
        }));
        node.mount_bpffs()?;
        Ok(node)
    }

    /// Addresses, sysctls (after the testbed moved eth0 in).
    pub(crate) fn configure_uplink(&self) -> Result<()> {
        let ns = &self.0.ns;
        ns.ip([
            "addr",
            "add",
            &format!("{}/24", self.underlay_ip()),
            "dev",
            UPLINK,
        ])?;
        ns.ip(["link", "set", UPLINK, "mtu", "1500", "up"])?;
        ns.set_sysctls(&[
            ("net/ipv4/ip_forward", "1"),
            ("net/ipv4/conf/all/rp_filter", "0"),
            ("net/ipv4/conf/default/rp_filter", "0"),
            ("net/ipv4/conf/eth0/rp_filter", "0"),
        ])
    }

    fn mount_bpffs(&self) -> Result<()> {
        let target = self.bpffs_mount();
        mount(
            Some("bpf"),
            &target,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("failed to mount bpffs at {}", target.display()))?;
        self.0.bpffs_mounted.store(true, Ordering::SeqCst);
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// 1-based index in the testbed (fixes the addresses).
    pub fn index(&self) -> u8 {
        self.0.index
    }

    /// The network namespace name.
    pub fn ns(&self) -> &str {
        self.0.ns.name()
    }

    pub fn netns(&self) -> &NetNs {
        &self.0.ns
    }

    pub fn underlay_ip(&self) -> Ipv4Addr {
        node_ip(self.0.index)
    }

    pub fn pod_cidr(&self) -> Ipv4Net {
        pod_cidr(self.0.index)
    }

    /// The WireGuard interface the agent manages (unique across the host).
    pub fn wg_interface(&self) -> &str {
        &self.0.wg_interface
    }

    /// `<tmp>/<node>`.
    pub fn dir(&self) -> &Path {
        &self.0.dir
    }

    pub fn state_dir(&self) -> PathBuf {
        self.0.dir.join("state")
    }

    /// Where the bpffs is mounted (host mount namespace).
    pub fn bpffs_mount(&self) -> PathBuf {
        self.0.dir.join("bpffs")
    }

    /// `--bpffs-dir` of the agent.
    pub fn bpffs_dir(&self) -> PathBuf {
        self.bpffs_mount().join("wgmesh")
    }

    pub fn agent_log_path(&self) -> PathBuf {
        self.0.dir.join("agent.log")
    }

    pub fn device_log_path(&self) -> PathBuf {
        self.state_dir().join("device.log")
    }

    /// `ip -n <node> <args>`.
    pub fn ip<'a>(&self, args: impl IntoIterator<Item = &'a str>) -> Result<String> {
        self.0.ns.ip(args)
    }

    /// A command inside the node namespace.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Cmd {
        self.0.ns.cmd(program)
    }

    // === the node's own traffic (host network) ===

    /// `ping -c count` from the node itself (0.2 s apart); loss is reported, not an error.
    pub fn ping(&self, dst: &impl Destination, count: u32) -> Result<PingReport> {
        crate::pod::ping(
            &self.cmd("ping"),
            dst.address(),
            count,
            Duration::from_millis(200),
        )
    }

    /// One TCP request/response from the node itself to a server that answers and closes.
    pub fn tcp_request_addr(&self, to: SocketAddr, payload: &str) -> Result<TcpRequestReport> {
        let out = self
            .cmd(self.0.ctx.probe()?)
            .args(["tcp-request", "--to", &to.to_string(), "--payload", payload])
            .run()?;
        serde_json::from_str(out.trim()).with_context(|| format!("tcp-request printed {out:?}"))
    }

    // === pods ===

    pub fn pods(&self) -> Vec<Pod> {
        lock(&self.0.pods).clone()
    }

    pub fn try_pod(&self, name: &str) -> Option<Pod> {
        lock(&self.0.pods)
            .iter()
            .find(|p| p.name() == name)
            .cloned()
    }

    /// Adds a pod to this node (also while the agent runs).
    pub fn add_pod(&self, name: &str) -> Result<Pod> {
        crate::names::validate_object_name("pod", name)?;
        let j = self.0.next_pod.fetch_add(1, Ordering::SeqCst);
        let j = u8::try_from(j)
            .ok()
            .filter(|j| *j <= 244)
            .ok_or_else(|| anyhow!("too many pods on {}", self.name()))?;
        let pod = Pod::create(self, name, j)?;
        lock(&self.0.pods).push(pod.clone());
        Ok(pod)
    }

    /// Deletes a pod: its host-side veth (and so the host route), then its namespace.
    pub fn remove_pod(&self, name: &str) -> Result<()> {
        let pod = {
            let mut pods = lock(&self.0.pods);
            let i = pods
                .iter()
                .position(|p| p.name() == name)
                .ok_or_else(|| anyhow!("no pod {name} on {}", self.name()))?;
            pods.remove(i)
        };
        // Deleting the namespace alone would remove the veth too, but asynchronously (netns
        // cleanup runs in a kernel workqueue): delete the link first so the route is gone on return.
        self.ip(["link", "del", pod.host_interface()])?;
        pod.delete()
    }

    // === agent ===

    fn agent_bin(&self) -> Result<PathBuf> {
        match &self.0.ctx.agent_bin {
            Some(p) => Ok(p.clone()),
            None => crate::probe::locate_binary(ENV_AGENT_BIN, "wgmesh-agent").context(
                "the agent binary is needed: build it (cargo build -p wgmesh) and set WGMESH_AGENT_BIN",
            ),
        }
    }

    /// Changes how the agent starts next time (`restart_agent` picks it up).
    pub fn configure_agent(&self, f: impl FnOnce(&mut AgentSpec)) {
        f(&mut lock(&self.0.agent_spec));
    }

    pub fn agent_spec(&self) -> AgentSpec {
        lock(&self.0.agent_spec).clone()
    }

    /// The agent's arguments (after the binary).
    pub fn agent_args(&self) -> Result<Vec<String>> {
        let spec = self.agent_spec();
        if let Some(args) = spec.args_override {
            return Ok(args);
        }
        let kubeconfig = self.0.ctx.kubeconfig.as_ref().ok_or_else(|| {
            anyhow!("agents need the API stand-in, but this testbed was built without it")
        })?;
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let mut args: Vec<String> = [
            "run",
            "--node-name",
            self.name(),
            "--kubeconfig",
            &path(kubeconfig),
            "--state-dir",
            &path(&self.state_dir()),
            "--interface",
            self.wg_interface(),
            "--listen-port",
            &spec.listen_port.to_string(),
            "--backend",
            &spec.backend,
            "--bpffs-dir",
            &path(&self.bpffs_dir()),
            "--uplink",
            UPLINK,
            "--pod-interface-prefix",
            &spec.pod_interface_prefix,
            "--status-addr",
            &spec.status_addr.to_string(),
            "--log-format",
            "text",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.extend(spec.extra_args);
        Ok(args)
    }

    fn agent_cmd(&self, args: &[String]) -> Result<Cmd> {
        let spec = self.agent_spec();
        let mut cmd = self.cmd(self.agent_bin()?).args(args);
        // The agent reads WGMESH_* and KUBECONFIG from its environment: the developer's shell
        // must not change what a test runs.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("WGMESH_") || k == "KUBECONFIG" || k == "RUST_LOG" {
                cmd = cmd.env_remove(&*k);
            }
        }
        cmd = cmd
            .env("RUST_LOG", &spec.log_filter)
            .env("WGMESH_LOG", &spec.log_filter);
        for (k, v) in &spec.env {
            cmd = cmd.env(k, v);
        }
        Ok(cmd)
    }

    /// Starts the agent (output appended to `agent.log`). Fails if it already runs.
    pub fn start_agent(&self) -> Result<()> {
        let mut agent = lock(&self.0.agent);
        if let Some(a) = agent.as_mut()
            && a.is_running()
        {
            bail!("the agent on {} already runs", self.name());
        }
        let args = self.agent_args()?;
        let cmd = self.agent_cmd(&args)?;
        let log = self.agent_log_path();
        append(&log, &format!("\n===== harness: starting `{cmd}` =====\n"));
        let child = cmd.spawn_logged(&log)?;
        *agent = Some(ChildGuard::new(
            format!("wgmesh-agent on {}", self.name()),
            child,
        ));
        self.0.agent_ever_started.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Whether the agent process is alive.
    pub fn agent_running(&self) -> bool {
        lock(&self.0.agent)
            .as_mut()
            .is_some_and(ChildGuard::is_running)
    }

    /// Ok while the agent runs; otherwise an error with its exit status and log tail.
    pub fn assert_agent_running(&self) -> Result<()> {
        let mut agent = lock(&self.0.agent);
        let Some(a) = agent.as_mut() else {
            bail!("the agent on {} was never started", self.name())
        };
        if let Some(status) = a.try_status()? {
            bail!(
                "the agent on {} exited ({status}); log tail:\n{}",
                self.name(),
                self.agent_log_tail(40)
            );
        }
        Ok(())
    }

    /// Stops the agent: SIGTERM/SIGINT wait for the exit (SIGKILL after 15 s, reported as an
    /// error); SIGKILL kills at once. The device process it spawned keeps running, as in a
    /// DaemonSet rollout.
    pub fn stop_agent(&self, signal: Signal) -> Result<()> {
        let mut agent = lock(&self.0.agent);
        let Some(mut a) = agent.take() else {
            bail!("the agent on {} is not running", self.name())
        };
        append(
            &self.agent_log_path(),
            &format!("\n===== harness: stopping the agent with {signal} =====\n"),
        );
        if signal == Signal::SIGKILL {
            a.kill();
            return Ok(());
        }
        a.stop(signal, AGENT_STOP_TIMEOUT).map(drop)
    }

    /// `stop_agent(signal)` then `start_agent()`.
    pub fn restart_agent(&self, signal: Signal) -> Result<()> {
        self.stop_agent(signal)?;
        self.start_agent()
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.agent_log_path()).unwrap_or_default()
    }

    pub fn agent_log_tail(&self, lines: usize) -> String {
        tail_file(&self.agent_log_path(), lines)
    }

    pub fn device_log(&self) -> String {
        std::fs::read_to_string(self.device_log_path()).unwrap_or_default()
    }

    /// `wgmesh-agent cleanup` in the node namespace (output appended to `agent.log`).
    pub fn cleanup(&self) -> Result<()> {
        let spec_args = [
            "cleanup".to_owned(),
            "--interface".to_owned(),
            self.wg_interface().to_owned(),
            "--state-dir".to_owned(),
            self.state_dir().to_string_lossy().into_owned(),
            "--bpffs-dir".to_owned(),
            self.bpffs_dir().to_string_lossy().into_owned(),
            "--uplink".to_owned(),
            UPLINK.to_owned(),
        ];
        let cmd = self.agent_cmd(&spec_args)?;
        let out = cmd.output()?;
        append(
            &self.agent_log_path(),
            &format!(
                "\n===== harness: `{cmd}` ({}) =====\n{}{}",
                out.status, out.stdout, out.stderr
            ),
        );
        if !out.success() {
            bail!(
                "cleanup on {} failed ({}): {}",
                self.name(),
                out.status,
                out.stderr.trim()
            );
        }
        Ok(())
    }

    /// GET `path` on the agent's status endpoint from inside the node namespace.
    pub fn agent_http_get(&self, path: &str) -> Result<String> {
        let url = format!("http://{}{path}", self.agent_spec().status_addr);
        self.cmd(self.0.ctx.probe()?).args(["http-get", &url]).run()
    }

    /// The agent's `/status` as JSON.
    pub fn status(&self) -> Result<Value> {
        let body = self.agent_http_get("/status")?;
        serde_json::from_str(&body)
            .with_context(|| format!("/status on {} is not JSON: {body}", self.name()))
    }

    /// `wg show <if> dump`, parsed (private keys dropped).
    pub fn wg_show_dump(&self) -> Result<WgDump> {
        let out = self
            .cmd("wg")
            .args(["show", self.wg_interface(), "dump"])
            .timeout(Duration::from_secs(10))
            .run()?;
        WgDump::parse(&out).with_context(|| format!("wg show dump on {}", self.name()))
    }

    // === teardown ===

    /// Keeps the agent running after the harness is gone (`WGMESH_NETNS_KEEP=1`).
    pub(crate) fn detach_agent(&self) {
        if let Some(a) = lock(&self.0.agent).as_mut() {
            a.detach();
        }
    }

    /// Stops the agent, runs `cleanup`, kills everything left in the node's and pods'
    /// namespaces, removes the UAPI socket and unmounts the bpffs. Namespaces are deleted by
    /// `delete_namespaces`. Errors are collected, not fatal: teardown goes on.
    pub(crate) fn teardown_processes(&self, errors: &mut Vec<String>) {
        if self.0.torn_down.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut report = |what: &str, r: Result<()>| {
            if let Err(e) = r {
                errors.push(format!("{}: {what}: {e:#}", self.name()));
            }
        };
        if let Some(mut a) = lock(&self.0.agent).take() {
            report(
                "stop agent",
                a.stop(Signal::SIGTERM, Duration::from_secs(10)).map(drop),
            );
        }
        if self.0.agent_ever_started.load(Ordering::SeqCst) {
            report("agent cleanup", self.cleanup());
        }
        for pod in self.pods() {
            report("kill pod processes", pod.netns().kill_all());
        }
        report("kill node processes", self.0.ns.kill_all());
        let sock =
            PathBuf::from("/var/run/wireguard").join(format!("{}.sock", self.wg_interface()));
        match std::fs::remove_file(&sock) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                report(
                    "remove UAPI socket",
                    Err(anyhow!(e).context(sock.display().to_string())),
                );
            }
            _ => {}
        }
        if self.0.bpffs_mounted.swap(false, Ordering::SeqCst) {
            let target = self.bpffs_mount();
            let r = umount2(&target, MntFlags::empty())
                .or_else(|_| umount2(&target, MntFlags::MNT_DETACH))
                .with_context(|| format!("failed to unmount {}", target.display()));
            report("unmount bpffs", r);
        }
    }

    pub(crate) fn delete_namespaces(&self, errors: &mut Vec<String>) {
        for pod in self.pods() {
            if let Err(e) = pod.delete() {
                errors.push(format!("pod {}: {e:#}", pod.name()));
            }
        }
        if let Err(e) = self.0.ns.delete() {
            errors.push(format!("node {}: {e:#}", self.name()));
        }
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let r = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()));
    if let Err(e) = r {
        eprintln!("warning: failed to write {}: {e}", path.display());
    }
}

impl Drop for NodeInner {
    fn drop(&mut self) {
        // Safety net for a node that never made it into a testbed's teardown (e.g. creation
        // failed half-way); `Testbed` normally tears nodes down explicitly and in order.
        if self.ctx.keep || self.torn_down.load(Ordering::SeqCst) {
            return;
        }
        if let Some(mut a) = lock(&self.agent).take() {
            a.kill();
        }
        if let Err(e) = self.ns.kill_all() {
            eprintln!("warning: {}: {e:#}", self.name);
        }
        if self.bpffs_mounted.swap(false, Ordering::SeqCst) {
            let target = self.dir.join("bpffs");
            if let Err(e) = umount2(&target, MntFlags::MNT_DETACH) {
                eprintln!("warning: failed to unmount {}: {e}", target.display());
            }
        }
    }
}
