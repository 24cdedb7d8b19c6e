//! `Testbed`: an underlay bridge, simulated nodes with pods, the API stand-in and one agent per
//! node, all in network namespaces of its own; torn down on drop (also on panic) unless
//! `WGMESH_NETNS_KEEP=1`.
//!
//! ```text
//!  underlay ns: br0 192.0.2.1/24 (API stand-in :6443, tcpdump)
//!     | n1                      | n2
//!  node a: eth0 192.0.2.11     node b: eth0 192.0.2.12        (+ wgmesh-agent, its device)
//!     | veth1 198.18.1.1/32       | veth1 198.18.2.1/32
//!  pod a1: eth0 198.18.1.11     pod b1: eth0 198.18.2.11
//!  host-gw routes: on a, 198.18.2.0/24 via 192.0.2.12; on b, 198.18.1.0/24 via 192.0.2.11
//! ```

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{
    apiserver::{ApiClient, ApiServer},
    capture::Capture,
    eventually::{DEFAULT_EVENTUALLY_TIMEOUT, eventually},
    names,
    netns::NetNs,
    node::{Node, NodeBuilder, node_ip, pod_cidr},
    pod::Pod,
    probe::{self, locate_binary},
};

/// Set to 1 to leave namespaces, processes, mounts and files in place for debugging.
pub const ENV_KEEP: &str = "WGMESH_NETNS_KEEP";
/// Set to 1 to print the diagnostics dump at teardown even when the test passed.
pub const ENV_DUMP: &str = "WGMESH_NETNS_DUMP";
/// Env var naming the API stand-in binary.
pub const ENV_APISERVER_BIN: &str = "WGMESH_APISERVER_BIN";
/// The underlay bridge (inside the underlay namespace).
pub const BRIDGE: &str = "br0";

/// What nodes and pods share.
#[derive(Debug)]
pub(crate) struct Context {
    pub(crate) prefix: String,
    pub(crate) dir: PathBuf,
    pub(crate) keep: bool,
    pub(crate) probe: Option<PathBuf>,
    pub(crate) probe_error: Option<String>,
    pub(crate) agent_bin: Option<PathBuf>,
    pub(crate) kubeconfig: Option<PathBuf>,
}

impl Context {
    pub(crate) fn probe(&self) -> Result<&Path> {
        self.probe
            .as_deref()
            .ok_or_else(|| anyhow!("{}", self.probe_error.as_deref().unwrap_or("no probe")))
    }
}

/// Builds a testbed: `Testbed::builder("xnode").node("a", |n| n.pod("a1")).start()?`.
#[derive(Debug)]
#[must_use]
pub struct TestbedBuilder {
    label: String,
    nodes: Vec<NodeBuilder>,
    agents: bool,
    apiserver: bool,
    probe_bin: Option<PathBuf>,
    agent_bin: Option<PathBuf>,
    apiserver_bin: Option<PathBuf>,
}

impl TestbedBuilder {
    /// A node named `name`; `f` adds pods and agent options.
    pub fn node(mut self, name: &str, f: impl FnOnce(NodeBuilder) -> NodeBuilder) -> Self {
        self.nodes.push(f(NodeBuilder::new(name)));
        self
    }

    /// Whether agents start with the testbed (default true). Without agents the testbed is a
    /// plain host-gw cluster: the baseline in which pod traffic crosses the underlay in clear.
    pub fn agents(mut self, on: bool) -> Self {
        self.agents = on;
        self
    }

    /// No API stand-in (and so no agents): for harness self-tests that need neither.
    pub fn without_apiserver(mut self) -> Self {
        self.apiserver = false;
        self.agents = false;
        self
    }

    /// The `wgmesh-probe` binary (else `$WGMESH_PROBE_BIN` or next to the test binary).
    /// Tests in this package: `.probe_bin(env!("CARGO_BIN_EXE_wgmesh-probe"))`.
    pub fn probe_bin(mut self, path: impl Into<PathBuf>) -> Self {
        self.probe_bin = Some(path.into());
        self
    }

    /// The agent binary (else `$WGMESH_AGENT_BIN` or next to the test binary).
    pub fn agent_bin(mut self, path: impl Into<PathBuf>) -> Self {
        self.agent_bin = Some(path.into());
        self
    }

    /// The stand-in binary (else `$WGMESH_APISERVER_BIN` or next to the test binary).
    pub fn apiserver_bin(mut self, path: impl Into<PathBuf>) -> Self {
        self.apiserver_bin = Some(path.into());
        self
    }

    /// Creates everything. On error, what was created so far is torn down.
    pub fn start(self) -> Result<Testbed> {
        let keep = std::env::var(ENV_KEEP).is_ok_and(|v| v == "1");
        let prefix = names::unique_prefix();
        let label: String = self
            .label
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(24)
            .collect();
        let tmp = tempfile::Builder::new()
            .prefix(&format!("wgmesh-netns-{label}-{prefix}-"))
            .tempdir()
            .context("failed to create the temp dir")?;
        let dir = tmp.path().to_owned();
        let (probe, probe_error) = match probe::resolve_probe(self.probe_bin.as_deref()) {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        let underlay = NetNs::create(&format!("{prefix}-u"), keep)?;
        let mut shared = Shared {
            label: self.label.clone(),
            underlay,
            api: None,
            nodes: Mutex::new(Vec::new()),
            ctx: Arc::new(Context {
                prefix,
                dir,
                keep,
                probe,
                probe_error,
                agent_bin: self.agent_bin,
                kubeconfig: None,
            }),
            tmp: Mutex::new(Some(tmp)),
            failed: AtomicBool::new(false),
            torn_down: Mutex::new(false),
            agents_default: self.agents,
        };
        // From here on, an early return drops `shared`, which tears down what exists.
        shared
            .underlay
            .ip(["link", "add", BRIDGE, "type", "bridge"])?;
        shared
            .underlay
            .ip(["addr", "add", "192.0.2.1/24", "dev", BRIDGE])?;
        shared.underlay.ip(["link", "set", BRIDGE, "up"])?;
        if self.apiserver {
            let bin = match self.apiserver_bin {
                Some(b) => b,
                None => locate_binary(ENV_APISERVER_BIN, "wgmesh-apiserver").context(
                    "the API stand-in is needed: build it (cargo build -p wgmesh-apiserver)",
                )?,
            };
            let api = ApiServer::start(&bin, shared.underlay.name(), &shared.ctx.dir)?;
            Arc::get_mut(&mut shared.ctx)
                .expect("no node holds the context yet")
                .kubeconfig = Some(api.kubeconfig().to_owned());
            shared.api = Some(Mutex::new(api));
        }
        let bed = Testbed {
            shared: Arc::new(shared),
        };
        let populate = || -> Result<()> {
            for spec in &self.nodes {
                bed.create_node(spec)?;
            }
            for (spec, node) in self.nodes.iter().zip(bed.nodes()) {
                if spec.start_agent.unwrap_or(self.agents) {
                    node.start_agent()?;
                }
            }
            Ok(())
        };
        if let Err(e) = populate() {
            bed.mark_failed();
            return Err(e.context(format!("failed to start testbed {}", self.label)));
        }
        Ok(bed)
    }
}

/// The simulated cluster. See the module docs for the layout.
#[derive(Debug)]
pub struct Testbed {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    label: String,
    underlay: NetNs,
    api: Option<Mutex<ApiServer>>,
    nodes: Mutex<Vec<Node>>,
    ctx: Arc<Context>,
    tmp: Mutex<Option<tempfile::TempDir>>,
    failed: AtomicBool,
    /// Held for the whole teardown, so a second caller (drop after a signal handler's
    /// teardown) waits until the first one finished.
    torn_down: Mutex<bool>,
    agents_default: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Testbed {
    /// Starts describing a testbed; `label` shows up in the temp dir name and diagnostics.
    pub fn builder(label: &str) -> TestbedBuilder {
        TestbedBuilder {
            label: label.to_owned(),
            nodes: Vec::new(),
            agents: true,
            apiserver: true,
            probe_bin: None,
            agent_bin: None,
            apiserver_bin: None,
        }
    }

    /// The unique prefix of every namespace and interface this testbed made.
    pub fn prefix(&self) -> &str {
        &self.shared.ctx.prefix
    }

    /// The temp dir (`api.sock`, `kubeconfig`, `<node>/agent.log`, captures).
    pub fn dir(&self) -> &Path {
        &self.shared.ctx.dir
    }

    /// The underlay: bridge `br0` with 192.0.2.1 in a namespace of its own.
    pub fn underlay(&self) -> Underlay<'_> {
        Underlay { bed: self }
    }

    /// The client of the API stand-in.
    pub fn api(&self) -> Result<ApiClient> {
        let api = self
            .shared
            .api
            .as_ref()
            .ok_or_else(|| anyhow!("this testbed has no API stand-in"))?;
        Ok(lock(api).client().clone())
    }

    /// The stand-in's log (for diagnostics).
    pub fn apiserver_log_tail(&self, lines: usize) -> Option<String> {
        self.shared.api.as_ref().map(|a| lock(a).log_tail(lines))
    }

    pub fn nodes(&self) -> Vec<Node> {
        lock(&self.shared.nodes).clone()
    }

    pub fn try_node(&self, name: &str) -> Option<Node> {
        lock(&self.shared.nodes)
            .iter()
            .find(|n| n.name() == name)
            .cloned()
    }

    /// The node named `name`; panics (test code) if there is none.
    pub fn node(&self, name: &str) -> Node {
        self.try_node(name)
            .unwrap_or_else(|| panic!("testbed {} has no node {name:?}", self.shared.label))
    }

    pub fn pods(&self) -> Vec<Pod> {
        self.nodes().iter().flat_map(Node::pods).collect()
    }

    pub fn try_pod(&self, name: &str) -> Option<Pod> {
        self.nodes().iter().find_map(|n| n.try_pod(name))
    }

    /// The pod named `name`; panics (test code) if there is none.
    pub fn pod(&self, name: &str) -> Pod {
        self.try_pod(name)
            .unwrap_or_else(|| panic!("testbed {} has no pod {name:?}", self.shared.label))
    }

    /// Adds a node to the running testbed: namespace, underlay link, Node object, host-gw
    /// routes to and from every other node, pods, and its agent (per the builder/defaults).
    pub fn add_node(&self, name: &str, f: impl FnOnce(NodeBuilder) -> NodeBuilder) -> Result<Node> {
        let spec = f(NodeBuilder::new(name));
        let node = self.create_node(&spec)?;
        if spec.start_agent.unwrap_or(self.shared.agents_default) {
            node.start_agent()?;
        }
        Ok(node)
    }

    fn create_node(&self, spec: &NodeBuilder) -> Result<Node> {
        names::validate_object_name("node", &spec.name)?;
        if self.try_node(&spec.name).is_some() {
            bail!("node {} exists already", spec.name);
        }
        for p in &spec.pods {
            if self.try_pod(p).is_some() || spec.pods.iter().filter(|q| *q == p).count() > 1 {
                bail!("pod {p} exists already");
            }
        }
        let index = {
            let nodes = lock(&self.shared.nodes);
            (1..=244u8)
                .find(|i| nodes.iter().all(|n| n.index() != *i))
                .ok_or_else(|| anyhow!("too many nodes"))?
        };
        let node = Node::create(&self.shared.ctx, spec, index)?;
        let u = &self.shared.underlay;
        let port = format!("n{index}");
        // Created in the underlay namespace with the peer straight in the node's.
        u.ip([
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            crate::node::UPLINK,
            "netns",
            node.ns(),
        ])?;
        u.ip(["link", "set", &port, "master", BRIDGE, "up"])?;
        node.configure_uplink()?;
        lock(&self.shared.nodes).push(node.clone());
        for other in self.nodes().iter().filter(|o| o.index() != index) {
            route(other, index, "replace")?;
            route(&node, other.index(), "replace")?;
        }
        for pod in &spec.pods {
            node.add_pod(pod)?;
        }
        if let Some(api) = &self.shared.api {
            let client = lock(api).client().clone();
            client.create_node(
                &spec.name,
                node.underlay_ip().into(),
                &[node.pod_cidr().into()],
            )?;
        }
        Ok(node)
    }

    /// Removes a node: stops its agent (with cleanup), deletes its Node object, its routes on
    /// the other nodes and its namespaces.
    pub fn remove_node(&self, name: &str) -> Result<()> {
        let node = {
            let mut nodes = lock(&self.shared.nodes);
            let i = nodes
                .iter()
                .position(|n| n.name() == name)
                .ok_or_else(|| anyhow!("no node {name}"))?;
            nodes.remove(i)
        };
        if let Some(api) = &self.shared.api {
            lock(api).client().delete_node(name)?;
        }
        for other in self.nodes() {
            route(&other, node.index(), "del")?;
        }
        let mut errors = Vec::new();
        node.teardown_processes(&mut errors);
        // Synchronously, unlike the namespace deletion that would also remove it.
        if let Err(e) = self
            .shared
            .underlay
            .ip(["link", "del", &format!("n{}", node.index())])
        {
            errors.push(format!("underlay port: {e:#}"));
        }
        node.delete_namespaces(&mut errors);
        if !errors.is_empty() {
            bail!("removing {name}: {}", errors.join("; "));
        }
        Ok(())
    }

    /// Starts tcpdump on the underlay bridge.
    pub fn capture(&self) -> Result<Capture> {
        let n = names::unique_prefix();
        let file = self.dir().join(format!("underlay-{n}.pcap"));
        let marker = format!("wgmesh-capture-marker-{}-{n}", self.prefix());
        Capture::start(
            self.shared.underlay.name(),
            BRIDGE,
            &file,
            self.shared.ctx.probe()?,
            marker,
        )
    }

    /// `eventually` with the default timeout (30 s × `WGMESH_TEST_PATIENCE`); a timeout marks
    /// the testbed failed so that teardown prints the diagnostics dump.
    pub fn eventually<T>(&self, reason: &str, check: impl FnMut() -> Result<T>) -> Result<T> {
        self.eventually_within(reason, DEFAULT_EVENTUALLY_TIMEOUT, check)
    }

    pub fn eventually_within<T>(
        &self,
        reason: &str,
        timeout: Duration,
        check: impl FnMut() -> Result<T>,
    ) -> Result<T> {
        let r = eventually(reason, timeout, check);
        if r.is_err() {
            self.mark_failed();
        }
        r
    }

    /// Makes teardown print the diagnostics dump (as a panic does).
    pub fn mark_failed(&self) {
        self.shared.failed.store(true, Ordering::SeqCst);
    }

    /// Prints the diagnostics dump to stderr now.
    pub fn dump(&self) {
        eprintln!("{}", self.dump_string());
    }

    /// Per node: addresses, routes, rules, `wg show`, agent and device log tails; the
    /// stand-in's stats and log tail.
    pub fn dump_string(&self) -> String {
        crate::diagnostics::dump(self)
    }

    /// A handle that can tear the testbed down from another thread (signal handlers).
    pub fn teardown_handle(&self) -> TeardownHandle {
        TeardownHandle(Arc::clone(&self.shared))
    }

    /// Tears down now (idempotent); drop does the same.
    pub fn teardown(&self) -> Result<()> {
        self.shared.teardown()
    }
}

/// The underlay network (see `Testbed::underlay`).
#[derive(Debug, Clone, Copy)]
pub struct Underlay<'a> {
    bed: &'a Testbed,
}

impl Underlay<'_> {
    pub fn netns(&self) -> &NetNs {
        &self.bed.shared.underlay
    }

    /// `ip -n <underlay> <args>`.
    pub fn ip<'b>(&self, args: impl IntoIterator<Item = &'b str>) -> Result<String> {
        self.netns().ip(args)
    }

    /// Starts tcpdump on the bridge (same as `Testbed::capture`).
    pub fn capture(&self) -> Result<Capture> {
        self.bed.capture()
    }
}

fn route(on: &Node, to_index: u8, verb: &str) -> Result<()> {
    let cidr = pod_cidr(to_index).to_string();
    let via = node_ip(to_index).to_string();
    on.ip([
        "route",
        verb,
        &cidr,
        "via",
        &via,
        "dev",
        crate::node::UPLINK,
    ])
    .map(drop)
}

/// Tears a testbed down from elsewhere (see `Testbed::teardown_handle`).
#[derive(Debug, Clone)]
pub struct TeardownHandle(Arc<Shared>);

impl TeardownHandle {
    pub fn teardown(&self) -> Result<()> {
        self.0.teardown()
    }
}

impl Shared {
    fn teardown(&self) -> Result<()> {
        let mut torn_down = lock(&self.torn_down);
        if *torn_down {
            return Ok(());
        }
        *torn_down = true;
        if self.ctx.keep {
            eprintln!(
                "{ENV_KEEP}=1: keeping testbed {} (namespaces {}-*, files in {})",
                self.label,
                self.ctx.prefix,
                self.ctx.dir.display()
            );
            for n in lock(&self.nodes).iter() {
                n.detach_agent();
            }
            if let Some(api) = &self.api {
                lock(api).detach();
            }
            if let Some(t) = lock(&self.tmp).take() {
                let kept = t.keep();
                eprintln!("{ENV_KEEP}=1: kept {}", kept.display());
            }
            return Ok(());
        }
        let mut errors = Vec::new();
        let nodes = lock(&self.nodes).clone();
        for n in &nodes {
            n.teardown_processes(&mut errors);
        }
        if let Some(api) = &self.api
            && let Err(e) = lock(api).stop()
        {
            errors.push(format!("stop API stand-in: {e:#}"));
        }
        for n in &nodes {
            n.delete_namespaces(&mut errors);
        }
        if let Err(e) = self.underlay.delete() {
            errors.push(format!("underlay: {e:#}"));
        }
        if let Some(t) = lock(&self.tmp).take()
            && let Err(e) = t.close()
        {
            errors.push(format!("temp dir: {e}"));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(anyhow!("teardown of {}: {}", self.label, errors.join("; ")))
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let failed = std::thread::panicking() || self.shared.failed.load(Ordering::SeqCst);
        if (failed || std::env::var(ENV_DUMP).is_ok_and(|v| v == "1"))
            && self.shared.torn_down.try_lock().is_ok_and(|t| !*t)
        {
            self.dump();
        }
        if let Err(e) = self.shared.teardown() {
            eprintln!("warning: {e:#}");
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Reached without `Testbed::drop` only when `start` failed half-way.
        if let Err(e) = self.teardown() {
            eprintln!("warning: {e:#}");
        }
    }
}

/// The last `lines` lines of a file ("" if missing).
pub fn tail_file(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
