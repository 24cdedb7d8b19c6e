//! The agent: start-up in a fixed order, then one level-triggered loop that recomputes the desired
//! state from the whole Node cache and applies the difference to the device, the policy routing and
//! the eBPF maps. Start-up order (cilium's): key, device, publish, datapath, node source, peers; stale
//! peers and CIDRs are pruned only after the node source reported its initial list.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use futures::StreamExt as _;
use ipnet::IpNet;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::mpsc;
use wgmesh_api::{
    NodeRecord, PublicKey,
    status::{
        AgentStatus, DatapathStatus, DesiredPeer, HostEncryptionStatus, ReconcileStatus,
        STATUS_SCHEMA_VERSION, SkippedNode,
    },
};
use wgmesh_datapath::{Datapath, DatapathConfig, Direction};

use crate::{
    config::{BackendChoice, RunArgs, WIREGUARD_OVERHEAD},
    discovery::{self, CacheChange, Identity, NodeCache, SlimNode},
    keys::{self, NodeKey},
    mesh::{self, DesiredState, PeerDiff, Skipped},
    netlink::{self, LinkEvent, Netlink, PolicyRouting},
    rotation,
    server::{self, OpLabel, PeerLabel, ResultLabel, Shared, VerdictLabel},
    wireguard::{self, Backend, WgDevice, kernel::KernelDevice, uapi::UapiDevice},
};

/// Events are coalesced for this long before a reconcile, so a burst of Node updates costs one pass.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Room for events (list items included) waiting for the loop: ten pages of the watcher's 500.
const EVENT_QUEUE: usize = 5_000;

/// Retry delays of the Node watch after an API error: 0.5 s doubling up to 8 s, with jitter.
/// kube-runtime's default climbs to 30 s, so a node could lag the cluster by half a minute after
/// an API outage; the data path keeps running either way, and one list per node every 8 s (spread
/// by the jitter) is a small load on an API server that is coming back.
pub fn watch_backoff() -> impl kube::runtime::utils::Backoff {
    kube::runtime::utils::ResetTimerBackoff::new(WatchBackoff::new(), Duration::from_secs(120))
}

struct WatchBackoff {
    next: Duration,
    seed: u64,
}

impl WatchBackoff {
    const MIN: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(8);

    fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        Self {
            next: Self::MIN,
            seed,
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let d = self.next;
        self.next = (d * 2).min(Self::MAX);
        // xorshift: 75-100 % of the delay, different per node.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let frac = 0.75 + (self.seed % 1000) as f64 / 4000.0;
        Some(d.mul_f64(frac))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::MIN;
    }
}

enum Trigger {
    /// A watcher event for the Node cache (a list page item, the end of a list, a change).
    /// Boxed: an `ObjectMeta` makes it several times larger than the other variants.
    Node(Box<watcher::Event<SlimNode>>),
    /// The Node watch failed (the watcher retries with backoff by itself).
    WatchError(String),
    Link(LinkEvent),
}

impl Trigger {
    /// The end of a (re-)list of Nodes.
    fn completes_list(&self) -> bool {
        matches!(self, Trigger::Node(ev) if matches!(**ev, watcher::Event::InitDone))
    }
}

/// Opens the WireGuard device for the chosen backend, creating or starting it when needed.
pub fn open_device(args: &RunArgs) -> Result<Box<dyn WgDevice>, wireguard::Error> {
    let ifname = &args.local.interface;
    let userspace = || -> Result<Box<dyn WgDevice>, wireguard::Error> {
        let dev = UapiDevice::new(ifname);
        if !dev.is_alive() {
            if !args.spawn_device {
                return Err(wireguard::Error::DeviceTimeout {
                    ifname: ifname.clone(),
                    seconds: 0,
                    log: wireguard::uapi::socket_path(ifname),
                });
            }
            wireguard::device::spawn(ifname, &args.local.state_dir)?;
        } else {
            tracing::info!(ifname, "adopting the running userspace wireguard device");
        }
        Ok(Box::new(dev))
    };
    match args.backend {
        BackendChoice::Userspace => userspace(),
        BackendChoice::Kernel => Ok(Box::new(KernelDevice::ensure(ifname)?)),
        BackendChoice::Auto => {
            if UapiDevice::new(ifname).is_alive() {
                tracing::info!(
                    ifname,
                    "backend auto: a userspace device is running for this interface, using it"
                );
                return userspace();
            }
            match KernelDevice::ensure(ifname) {
                Ok(d) => {
                    tracing::info!(
                        ifname,
                        "backend auto: the kernel supports WireGuard, using the kernel backend"
                    );
                    Ok(Box::new(d))
                }
                Err(wireguard::Error::KernelUnsupported { .. }) => {
                    tracing::info!(
                        ifname,
                        "backend auto: the kernel has no WireGuard, using the userspace backend (boringtun)"
                    );
                    userspace()
                }
                Err(e) => Err(e),
            }
        }
    }
}

/// Durations of a reconcile pass's steps: desired state and diff, device writes, eBPF maps,
/// host routes.
#[derive(Debug, Clone, Copy, Default)]
struct PassTimes {
    compute: Duration,
    device: Duration,
    maps: Duration,
    routes: Duration,
}

/// Host routes: pod CIDR → source address.
type HostRoutes = BTreeMap<IpNet, IpAddr>;

/// (added, removed) routes, or why not.
type RouteSync = Result<(usize, usize), netlink::Error>;

/// Host routes being written while the pass goes on: the outcome and what was written.
struct HostRoutesJob {
    task: tokio::task::JoinHandle<(RouteSync, HostRoutes)>,
    oif: u32,
    started: Instant,
}

/// What the eBPF maps should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MapContents {
    remote: BTreeSet<IpNet>,
    cluster: BTreeSet<IpNet>,
    local: BTreeSet<IpNet>,
    hosts: BTreeSet<IpAddr>,
}

impl MapContents {
    fn of(d: &DesiredState) -> Self {
        Self {
            remote: d.remote_cidrs.clone(),
            cluster: d.cluster_cidrs.clone(),
            local: d.local_cidrs.clone(),
            hosts: d.peer_hosts.clone(),
        }
    }

    fn holds(&self, d: &DesiredState) -> bool {
        self.remote == d.remote_cidrs
            && self.cluster == d.cluster_cidrs
            && self.local == d.local_cidrs
            && self.hosts == d.peer_hosts
    }
}

pub struct Agent {
    args: RunArgs,
    key: NodeKey,
    identity: Identity,
    device: Box<dyn WgDevice>,
    datapath: Datapath,
    nl: Netlink,
    policy: PolicyRouting,
    /// Pod interfaces attached by this process (a restart re-attaches, replacing the program).
    attached: BTreeSet<String>,
    uplink: Option<String>,
    uplink_attached: bool,
    mtu: Option<u32>,
    published: bool,
    /// The host addresses known to be on this node's Node (published by this process or seen
    /// there): peers accept this node's host traffic only from these, so only these are routed.
    published_hosts: Vec<IpAddr>,
    rotation: Option<rotation::Progress>,
    /// Whether this process looked for a rotation an earlier process left unreported.
    rotation_resume_checked: bool,
    /// Since when the device has used the current key: its creation time if the device already had
    /// it when this process started, else when this process set it.
    key_in_use_since: SystemTime,
    synced: bool,
    last_skipped: Vec<Skipped>,
    last_reconcile: Option<ReconcileStatus>,
    desired: DesiredState,
    /// Tunnel (index, MTU) the policy routing, route and uplink guard were last set up for.
    plumbed: Option<(u32, u32)>,
    /// Set by the periodic resync: redo the local plumbing even when the tunnel did not change.
    plumbing_due: bool,
    /// Host routes last written (tunnel index, routes), so a pass without changes skips the
    /// route dump; cleared whenever the plumbing is redone.
    host_routes_applied: Option<(u32, HostRoutes)>,
    /// The eBPF map contents last written after the initial list (remote, cluster, local CIDRs,
    /// peer hosts): a pass that wants the same skips reading 5,000-entry maps back. Cleared with
    /// the plumbing (the periodic resync), so drift is repaired.
    maps_applied: Option<MapContents>,
    /// Where the last pass spent its time (logged with "peers reconciled").
    pass_times: PassTimes,
    last_host_warnings: Vec<Skipped>,
    /// The device as the last reconcile left it (its read plus the changes it made), for the
    /// status that follows, so a pass reads the device once.
    device_after_apply: Option<wireguard::DeviceState>,
    shared: Arc<Shared>,
}

impl Agent {
    /// Start-up steps 1-4: key, device, datapath. Nothing here needs the Kubernetes API, so a restart
    /// while the API is down restores (or keeps) the data path anyway.
    pub async fn start(args: RunArgs, shared: Arc<Shared>) -> anyhow::Result<Self> {
        let key = keys::load_or_generate(&args.local.state_dir).context("loading the node key")?;
        let public_key = key.private.public_key();
        tracing::info!(
            node = %args.node_name,
            public_key = %public_key,
            generation = key.meta.generation,
            generated = key.generated,
            "node key ready"
        );
        let identity = Identity {
            public_key,
            listen_port: args.listen_port,
            generation: key.meta.generation,
            created: key.meta.created,
            // Filled in from the node's InternalIPs once its Node is seen.
            host_addresses: None,
        };
        netlink::ensure_sysctl("net/ipv4/ip_forward", "1").context("enabling IPv4 forwarding")?;
        if let Err(e) = netlink::ensure_sysctl("net/ipv6/conf/all/forwarding", "1") {
            tracing::debug!(error = %e, "IPv6 forwarding not enabled");
        }
        let nl = Netlink::connect()?;
        let device = tokio::task::block_in_place(|| open_device(&args))
            .context("opening the WireGuard device")?;
        tracing::info!(interface = %args.local.interface, backend = %device.backend(), "wireguard device ready");
        if let Ok(mut d) = shared.device.lock() {
            *d = Some(device.reader());
        }

        let tunnel_ifindex = nl
            .link(&args.local.interface)
            .await?
            .map(|l| l.index)
            .unwrap_or(0);
        let datapath = tokio::task::block_in_place(|| {
            Datapath::load(&DatapathConfig {
                tunnel_ifindex,
                bpffs_dir: args.local.bpffs_dir.clone(),
                fwmark: args.local.fwmark,
                fwmask: args.local.fwmark,
                strict: args.strict,
            })
        })
        .context("loading the eBPF datapath")?;
        tracing::info!(mode = %datapath.attach_mode(), bpffs = %args.local.bpffs_dir.display(), "datapath loaded");
        match Datapath::open_pinned(&args.local.bpffs_dir) {
            Ok(p) => {
                if let Ok(mut pins) = shared.pins.lock() {
                    *pins = Some(p);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot open the pinned maps for live status"),
        }

        let policy = PolicyRouting {
            fwmark: args.local.fwmark,
            fwmask: args.local.fwmark,
            table: args.local.route_table,
            priority: args.local.rule_priority,
        };
        shared
            .metrics
            .key_generation
            .set(key.meta.generation as i64);
        // Replaced by "now" if the device turns out not to have the key yet.
        let key_in_use_since = UNIX_EPOCH + Duration::from_secs(key.meta.created);
        let mut agent = Self {
            uplink: args.local.uplink.clone(),
            mtu: args.mtu,
            args,
            key,
            identity,
            device,
            datapath,
            nl,
            policy,
            attached: BTreeSet::new(),
            uplink_attached: false,
            published: false,
            published_hosts: Vec::new(),
            rotation: None,
            rotation_resume_checked: false,
            key_in_use_since,
            synced: false,
            last_skipped: Vec::new(),
            last_reconcile: None,
            desired: DesiredState::default(),
            plumbed: None,
            plumbing_due: true,
            host_routes_applied: None,
            maps_applied: None,
            pass_times: PassTimes::default(),
            last_host_warnings: Vec::new(),
            device_after_apply: None,
            shared,
        };
        agent.ensure_device_identity()?;
        agent.ensure_local_plumbing(&[]).await?;
        agent.attach_pod_interfaces().await?;
        Ok(agent)
    }

    fn ensure_device_identity(&mut self) -> anyhow::Result<()> {
        let state = tokio::task::block_in_place(|| self.device.read())?;
        self.ensure_device_identity_from(&state).map(|_| ())
    }

    /// [`Self::ensure_device_identity`] from a state already read; true when it had to set it.
    fn ensure_device_identity_from(
        &mut self,
        state: &wireguard::DeviceState,
    ) -> anyhow::Result<bool> {
        if state.public_key != Some(self.identity.public_key)
            || state.listen_port != self.args.listen_port
        {
            tracing::info!(
                interface = %self.args.local.interface,
                listen_port = self.args.listen_port,
                "setting the device's private key and listen port"
            );
            let key = self.key.private.clone();
            let port = self.args.listen_port;
            tokio::task::block_in_place(|| self.device.set_identity(&key, port))?;
            if state.public_key != Some(self.identity.public_key) {
                self.key_in_use_since = SystemTime::now();
            }
            return Ok(true);
        }
        Ok(false)
    }

    /// Link up, MTU, rp_filter, policy rule and route, uplink guard. Idempotent. After the first
    /// pass only the link is read (one netlink request); the rest is redone when the tunnel's
    /// index or MTU changed, or on the periodic resync (which repairs drift such as a deleted rule).
    async fn ensure_local_plumbing(&mut self, nodes: &[NodeRecord]) -> anyhow::Result<()> {
        let ifname = self.args.local.interface.clone();
        if self.uplink.is_none()
            && let Some(me) = nodes.iter().find(|n| n.name == self.args.node_name)
        {
            for ip in &me.internal_ips {
                if let Some(name) = self.nl.interface_with_address(*ip).await? {
                    tracing::info!(uplink = %name, address = %ip, "uplink found through the node's InternalIP");
                    self.uplink = Some(name);
                    break;
                }
            }
        }
        if self.mtu.is_none()
            && let Some(up) = &self.uplink
            && let Some(link) = self.nl.link(up).await?
        {
            let mtu = link.mtu.saturating_sub(WIREGUARD_OVERHEAD).max(1280);
            tracing::info!(uplink = %up, uplink_mtu = link.mtu, mtu, "tunnel MTU from the uplink");
            self.mtu = Some(mtu);
        }
        let link = self.nl.ensure_up(&ifname, self.mtu).await?;
        if self.plumbing_due || self.plumbed != Some((link.index, link.mtu)) {
            self.plumb_tunnel(&ifname, &link).await?;
            self.plumbed = Some((link.index, link.mtu));
            self.plumbing_due = false;
        }
        if !self.uplink_attached
            && let Some(up) = self.uplink.clone()
        {
            tokio::task::block_in_place(|| self.datapath.attach_uplink(&up))
                .with_context(|| format!("attaching the leak guard to uplink {up}"))?;
            tracing::info!(uplink = %up, strict = self.args.strict, "plaintext leak guard attached to the uplink");
            self.uplink_attached = true;
        }
        Ok(())
    }

    /// The parts of the local plumbing that follow the tunnel link: its index in the datapath,
    /// rp_filter, the policy rules and the tunnel routes.
    async fn plumb_tunnel(&mut self, ifname: &str, link: &netlink::Link) -> anyhow::Result<()> {
        // The uplink guard redirects stray plaintext pod packets into the tunnel by index; a
        // recreated device has a new one.
        tokio::task::block_in_place(|| self.datapath.set_tunnel_ifindex(link.index))?;
        // Decrypted packets arrive on the tunnel with remote pod sources. The tunnel has no IPv4
        // address, and the kernel's reverse-path check rejects every packet on an address-less
        // device whenever rp_filter is on (strict or loose), so it must be off for the tunnel. The
        // effective value is max(all, device): `all` must be 0 too. Other interfaces keep their own
        // setting (as Cilium does).
        netlink::ensure_sysctl(&format!("net/ipv4/conf/{ifname}/rp_filter"), "0")?;
        if netlink::ensure_sysctl("net/ipv4/conf/all/rp_filter", "0")? {
            tracing::warn!(
                "set net.ipv4.conf.all.rp_filter=0 so decrypted packets are accepted; per-interface rp_filter settings still apply"
            );
        }
        self.nl.ensure_rules(&self.policy).await?;
        self.nl
            .ensure_tunnel_routes(self.policy.table, link.index)
            .await?;
        let (table, priority) = (
            self.args.local.host_route_table,
            self.args.local.host_rule_priority,
        );
        if self.args.host_encryption {
            self.nl.ensure_host_rules(table, priority).await?;
        } else {
            let rules = self.nl.delete_host_rules(table, priority).await?;
            let routes = self.nl.flush_table(table).await?;
            if rules + routes > 0 {
                tracing::info!(
                    rules,
                    routes,
                    "host encryption is off: removed its rule and routes"
                );
            }
        }
        // Rewritten (and checked against the kernel) on the next pass.
        self.host_routes_applied = None;
        self.maps_applied = None;
        Ok(())
    }

    /// Starts writing the host-encryption routes (exactly the desired ones once the initial list
    /// arrived; before that only additions, so a peer not listed yet keeps its routes), unless
    /// nothing changed since the last write (the periodic resync clears that, so drift is
    /// repaired). It runs on the runtime while the pass writes the device and the maps: at 5,000
    /// peers the routes take a tenth of a second the device write hides. A route that is in place
    /// a moment before its peer drops (never leaks) the node's packets to that CIDR meanwhile.
    fn start_host_routes(&self) -> Option<HostRoutesJob> {
        if !self.args.host_encryption {
            return None;
        }
        let (oif, _) = self.plumbed?;
        let want = &self.desired.host_routes;
        if self
            .host_routes_applied
            .as_ref()
            .is_some_and(|(i, r)| *i == oif && r == want)
        {
            return None;
        }
        let (nl, table, prune, want) = (
            self.nl.clone(),
            self.args.local.host_route_table,
            self.synced,
            want.clone(),
        );
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let result = nl.sync_host_routes(table, oif, &want, prune).await;
            (result, want)
        });
        Some(HostRoutesJob { task, oif, started })
    }

    /// Waits for [`Self::start_host_routes`]' work and records it.
    async fn finish_host_routes(&mut self, job: Option<HostRoutesJob>) -> anyhow::Result<()> {
        let Some(job) = job else { return Ok(()) };
        let (result, want) = job.task.await.context("host route task")?;
        let (added, removed) = result?;
        self.pass_times.routes = job.started.elapsed();
        if added + removed > 0 {
            tracing::info!(
                added,
                removed,
                routes = want.len(),
                "host-encryption routes updated"
            );
        }
        if self.synced {
            self.host_routes_applied = Some((job.oif, want));
        }
        Ok(())
    }

    fn is_pod_interface(&self, link: &netlink::Link) -> bool {
        link.is_veth()
            && Some(&link.name) != self.uplink.as_ref()
            && link.name != self.args.local.interface
            && self
                .args
                .pod_interface_prefix
                .iter()
                .any(|p| !p.is_empty() && link.name.starts_with(p.as_str()))
    }

    async fn attach_pod_interfaces(&mut self) -> anyhow::Result<()> {
        let links = self.nl.links().await?;
        let present: BTreeSet<String> = links.iter().map(|l| l.name.clone()).collect();
        for link in links {
            if self.is_pod_interface(&link) && !self.attached.contains(&link.name) {
                self.attach_pod(&link.name);
            }
        }
        // Links that vanished while no event told us (e.g. during a restart).
        let pinned = tokio::task::block_in_place(|| self.datapath.attached_interfaces())?;
        for (name, dir) in pinned {
            if dir == Direction::Ingress && !present.contains(&name) {
                self.forget(&name);
            }
        }
        Ok(())
    }

    fn attach_pod(&mut self, name: &str) {
        match tokio::task::block_in_place(|| self.datapath.attach_pod_interface(name)) {
            Ok(()) => {
                tracing::info!(
                    interface = name,
                    "steering program attached to pod interface"
                );
                self.attached.insert(name.to_owned());
            }
            // The link can vanish between the event and the attach (pod deleted): not an agent error.
            Err(e) => {
                tracing::warn!(interface = name, error = %e, "cannot attach steering program")
            }
        }
    }

    fn forget(&mut self, name: &str) {
        self.attached.remove(name);
        match tokio::task::block_in_place(|| self.datapath.forget_interface(name)) {
            Ok(()) => tracing::info!(interface = name, "pod interface gone"),
            Err(e) => tracing::warn!(interface = name, error = %e, "cannot forget pod interface"),
        }
    }

    async fn on_link_event(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Changed(link) => {
                if self.is_pod_interface(&link) && !self.attached.contains(&link.name) {
                    self.attach_pod(&link.name);
                }
            }
            LinkEvent::Removed {
                name: Some(name), ..
            } if self.attached.contains(&name) => self.forget(&name),
            LinkEvent::Removed { .. } => {}
        }
    }

    /// Publishes this node's identity when the cache shows it missing or different.
    async fn ensure_published(&mut self, client: &Client, nodes: &[NodeRecord]) {
        let me = nodes.iter().find(|n| n.name == self.args.node_name);
        if let Some(m) = me {
            self.identity.host_addresses = (self.args.host_encryption
                && !m.internal_ips.is_empty())
            .then(|| m.internal_ips.clone());
        }
        let on_node = me.is_some_and(|m| self.identity.is_published_on(m));
        if on_node {
            self.published_hosts = self.identity.host_addresses.clone().unwrap_or_default();
        }
        if self.published && (me.is_none() || on_node) {
            return;
        }
        if on_node {
            self.published = true;
            return;
        }
        match discovery::publish(client, &self.args.node_name, &self.identity).await {
            Ok(wrote) => {
                if wrote {
                    self.shared.metrics.api_writes.inc();
                    tracing::info!(node = %self.args.node_name, public_key = %self.identity.public_key, "published the node's public key");
                }
                self.published = true;
                self.published_hosts = self.identity.host_addresses.clone().unwrap_or_default();
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot publish the node's public key yet; retrying")
            }
        }
    }

    /// One level-triggered pass over the whole cache.
    async fn reconcile(&mut self, client: &Client, nodes: &[NodeRecord]) {
        let started = Instant::now();
        self.maybe_rotate(nodes);
        self.ensure_published(client, nodes).await;
        let result = self.apply(nodes).await;
        let (diff, error) = match result {
            Ok(d) => (d, None),
            Err(e) => (PeerDiff::default(), Some(format!("{e:#}"))),
        };
        let m = &self.shared.metrics;
        m.reconciles
            .get_or_create(&ResultLabel {
                result: if error.is_some() { "error" } else { "ok" }.into(),
            })
            .inc();
        if let Some(e) = &error {
            tracing::warn!(error = %e, "reconcile failed; retrying on the next event or resync");
        }
        if !diff.is_empty() {
            let t = &self.pass_times;
            tracing::info!(
                added = diff.add.len(),
                updated = diff.update.len(),
                removed = diff.remove.len(),
                peers = self.desired.peers.len(),
                ms = started.elapsed().as_millis() as u64,
                compute_ms = t.compute.as_millis() as u64,
                device_ms = t.device.as_millis() as u64,
                maps_ms = t.maps.as_millis() as u64,
                routes_ms = t.routes.as_millis() as u64,
                "peers reconciled"
            );
        }
        self.last_reconcile = Some(ReconcileStatus {
            finished_at: keys::now_unix(),
            duration_ms: started.elapsed().as_millis() as u64,
            peers_added: diff.add.len(),
            peers_updated: diff.update.len(),
            peers_removed: diff.remove.len(),
            error,
        });
        self.publish_status();
    }

    async fn apply(&mut self, nodes: &[NodeRecord]) -> anyhow::Result<PeerDiff> {
        self.ensure_local_plumbing(nodes).await?;
        let t0 = Instant::now();
        self.pass_times = PassTimes::default();
        let desired = mesh::desired_state_with_hosts(
            &self.args.node_name,
            &self.identity.public_key,
            nodes,
            self.args.keepalive,
            Some(&self.published_hosts),
        );
        self.log_skipped(&desired.skipped);
        self.log_host_warnings(&desired.host_warnings);
        self.desired = desired;
        self.device_after_apply = None;
        if !self.published {
            // Peer only once this node's key is public (cilium #20925): until then leave the device as is.
            return Ok(PeerDiff::default());
        }
        // One read of the device per pass: identity, the diff, and (updated with the changes
        // below) the status that follows.
        let mut state = tokio::task::block_in_place(|| self.device.read())?;
        if self.ensure_device_identity_from(&state)? {
            state.public_key = Some(self.identity.public_key);
            state.listen_port = self.args.listen_port;
        }
        let diff = mesh::diff(
            &self.desired.peers,
            &state.peers,
            self.synced,
            SystemTime::now(),
        );
        let m = self.shared.metrics.clone();
        let count = |op: &str| {
            m.peer_changes
                .get_or_create(&OpLabel { op: op.into() })
                .inc()
        };

        // Order matters for a gap-free datapath: peers first, then the maps (a CIDR is steered only
        // once its peer exists), and removals last (a CIDR stops being steered before its peer goes).
        let routes = self.start_host_routes();
        let desired = &self.desired;
        let synced = self.synced;
        let device = &mut self.device;
        let datapath = &mut self.datapath;
        let maps_applied = &mut self.maps_applied;
        let times = &mut self.pass_times;
        times.compute = t0.elapsed();
        tokio::task::block_in_place(|| -> anyhow::Result<()> {
            let t = Instant::now();
            device
                .add_peers(&diff.add)
                .with_context(|| format!("adding {} peers", diff.add.len()))?;
            for p in &diff.add {
                if diff.add.len() <= 16 {
                    tracing::info!(peer = %p.node, public_key = %p.public_key, endpoint = %p.endpoint, "peer added");
                } else {
                    tracing::debug!(peer = %p.node, public_key = %p.public_key, endpoint = %p.endpoint, "peer added");
                }
                count("add");
            }
            device
                .update_peers(&diff.update)
                .with_context(|| format!("updating {} peers", diff.update.len()))?;
            for p in &diff.update {
                if diff.update.len() <= 16 {
                    tracing::info!(peer = %p.node, endpoint = %p.endpoint, "peer updated");
                } else {
                    tracing::debug!(peer = %p.node, endpoint = %p.endpoint, "peer updated");
                }
                count("update");
            }
            times.device = t.elapsed();
            let t = Instant::now();
            if synced && maps_applied.as_ref().is_some_and(|m| m.holds(desired)) {
                // Nothing to write; the periodic resync re-reads the maps.
            } else if synced {
                *maps_applied = None;
                datapath.sync_remote_cidrs(&desired.remote_cidrs)?;
                datapath.sync_cluster_cidrs(&desired.cluster_cidrs)?;
                datapath.sync_peer_hosts(&desired.peer_hosts)?;
                if !desired.local_cidrs.is_empty() {
                    datapath.sync_local_cidrs(&desired.local_cidrs)?;
                }
                *maps_applied = Some(MapContents::of(desired));
            } else {
                // Before the initial list, an absent CIDR may just not have been seen yet.
                let mut remote = desired.remote_cidrs.clone();
                remote.extend(datapath.remote_cidrs()?);
                datapath.sync_remote_cidrs(&remote)?;
                let mut cluster = desired.cluster_cidrs.clone();
                cluster.extend(datapath.cluster_cidrs()?);
                datapath.sync_cluster_cidrs(&cluster)?;
                let mut hosts = desired.peer_hosts.clone();
                hosts.extend(datapath.peer_hosts()?);
                datapath.sync_peer_hosts(&hosts)?;
                if !desired.local_cidrs.is_empty() {
                    datapath.sync_local_cidrs(&desired.local_cidrs)?;
                }
            }
            times.maps = t.elapsed();
            let t = Instant::now();
            for k in &diff.remove {
                device
                    .remove_peer(k)
                    .with_context(|| format!("removing peer {}", k.fingerprint()))?;
                tracing::info!(public_key = %k, "stale peer removed");
                count("remove");
            }
            times.device += t.elapsed();
            Ok(())
        })?;
        for p in &diff.add {
            state
                .peers
                .insert(p.public_key, wireguard::observed_from_spec(p));
        }
        for p in &diff.update {
            let mut now = wireguard::observed_from_spec(p);
            if let Some(before) = state.peers.get(&p.public_key) {
                now.last_handshake = before.last_handshake;
                now.rx_bytes = before.rx_bytes;
                now.tx_bytes = before.tx_bytes;
            }
            state.peers.insert(p.public_key, now);
        }
        for k in &diff.remove {
            state.peers.remove(k);
        }
        self.device_after_apply = Some(state);
        self.finish_host_routes(routes).await?;
        Ok(diff)
    }

    /// Starts a key rotation when `wgmeshctl rotate` asked for a generation newer than ours. The new
    /// key is persisted (atomically) before it is used or published, so a crash at any point leaves
    /// a usable key on disk; a restart mid-rotation sees the request still pending and finishes it.
    fn maybe_rotate(&mut self, nodes: &[NodeRecord]) {
        let Some(me) = nodes.iter().find(|n| n.name == self.args.node_name) else {
            return;
        };
        if !self.rotation_resume_checked {
            self.rotation_resume_checked = true;
            if self.rotation.is_none() && rotation::unfinished(me, self.identity.generation) {
                let device = tokio::task::block_in_place(|| self.device.read())
                    .map(|d| d.peers)
                    .unwrap_or_default();
                tracing::info!(
                    generation = self.identity.generation,
                    "key rotation: an earlier agent process did not report its outcome; resuming the report"
                );
                self.rotation = Some(rotation::Progress::resumed(
                    self.identity.generation,
                    self.key_in_use_since,
                    &device,
                    SystemTime::now(),
                ));
            }
        }
        let Some(requested) = rotation::requested_generation(me) else {
            return;
        };
        if requested <= self.identity.generation {
            return;
        }
        let new = match keys::PrivateKey::generate() {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(error = %e, "cannot generate a new key for the requested rotation");
                return;
            }
        };
        let meta = keys::KeyMeta {
            generation: requested,
            created: keys::now_unix(),
        };
        if let Err(e) = keys::store(&self.args.local.state_dir, &new, meta) {
            tracing::error!(error = %e, "cannot persist the new key; keeping the current one");
            return;
        }
        let old = self.identity.public_key;
        let before = tokio::task::block_in_place(|| self.device.read())
            .map(|d| d.peers)
            .unwrap_or_default();
        self.key = NodeKey {
            private: new,
            meta,
            generated: true,
        };
        self.identity = Identity {
            public_key: self.key.private.public_key(),
            listen_port: self.args.listen_port,
            generation: requested,
            created: meta.created,
            host_addresses: self.identity.host_addresses.clone(),
        };
        self.published = false;
        self.shared.metrics.key_generation.set(requested as i64);
        tracing::info!(
            old_public_key = %old,
            public_key = %self.identity.public_key,
            generation = requested,
            "key rotation: new key persisted; applying and publishing it"
        );
        self.rotation = Some(rotation::Progress::new(
            requested,
            SystemTime::now(),
            &before,
        ));
    }

    /// Publishes how far a running rotation got (peers that completed a handshake with the new key).
    async fn report_rotation(&mut self, client: &Client) {
        let Some(progress) = self.rotation.as_mut() else {
            return;
        };
        let Ok(state) = tokio::task::block_in_place(|| self.device.read()) else {
            return;
        };
        let names: BTreeMap<PublicKey, String> = self
            .desired
            .peers
            .values()
            .map(|p| (p.public_key, p.node.clone()))
            .collect();
        let report = progress.observe(&names, &state.peers, SystemTime::now());
        let Some(json) = progress.to_publish(&report) else {
            return;
        };
        match discovery::patch_annotation(
            client,
            &self.args.node_name,
            rotation::ANNOTATION_STATUS,
            &json,
        )
        .await
        {
            Ok(()) => {
                self.shared.metrics.api_writes.inc();
                progress.published(&report);
                tracing::info!(
                    generation = report.generation,
                    state = %report.state,
                    confirmed = report.peers_confirmed,
                    total = report.peers_total,
                    "key rotation progress"
                );
                if report.state != rotation::State::InProgress {
                    self.rotation = None;
                }
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot publish rotation progress yet")
            }
        }
    }

    fn log_skipped(&mut self, skipped: &[Skipped]) {
        if skipped == self.last_skipped.as_slice() {
            return;
        }
        for s in skipped {
            if !self.last_skipped.contains(s) {
                if s.expected {
                    tracing::info!(node = %s.node, reason = %s.reason, "node not peered yet");
                } else {
                    tracing::warn!(node = %s.node, reason = %s.reason, "node skipped");
                }
            }
        }
        self.last_skipped = skipped.to_vec();
    }

    fn log_host_warnings(&mut self, warnings: &[Skipped]) {
        if warnings == self.last_host_warnings.as_slice() {
            return;
        }
        for w in warnings {
            if !self.last_host_warnings.contains(w) {
                tracing::warn!(node = %w.node, reason = %w.reason, "host address left out of the tunnel");
            }
        }
        self.last_host_warnings = warnings.to_vec();
    }

    fn publish_status(&mut self) {
        let m = &self.shared.metrics;
        m.peers.set(self.desired.peers.len() as i64);
        m.skipped_nodes.set(self.desired.skipped.len() as i64);
        let device = match self.device_after_apply.take() {
            Some(d) => Some(d),
            None => tokio::task::block_in_place(|| self.device.read()).ok(),
        };
        let names: BTreeMap<PublicKey, String> = self
            .desired
            .peers
            .values()
            .map(|p| (p.public_key, p.node.clone()))
            .collect();
        if let Some(d) = &device {
            for (k, p) in &d.peers {
                let node = names.get(k).cloned().unwrap_or_else(|| k.fingerprint());
                let label = PeerLabel { node };
                let age = p
                    .last_handshake
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .map_or(-1, |a| a.as_secs() as i64);
                m.peer_handshake_age.get_or_create(&label).set(age);
                m.peer_rx_bytes.get_or_create(&label).set(p.rx_bytes as i64);
                m.peer_tx_bytes.get_or_create(&label).set(p.tx_bytes as i64);
            }
        }
        // With the pinned maps open, /status and /metrics read counters and CIDRs live when they
        // are asked (server.rs), so a pass does not read the 5,000-entry map it just wrote.
        let live = self
            .shared
            .pins
            .lock()
            .map(|p| p.is_some())
            .unwrap_or(false);
        let (counters, remote_cidrs) = if live {
            (BTreeMap::new(), Vec::new())
        } else {
            let counters = self
                .datapath
                .counters()
                .map(|c| counters_map(&c))
                .unwrap_or_default();
            for (k, v) in &counters {
                m.datapath_packets
                    .get_or_create(&VerdictLabel { verdict: k.clone() })
                    .set(*v as i64);
            }
            let remote = self
                .datapath
                .remote_cidrs()
                .unwrap_or_default()
                .iter()
                .map(|c| c.to_string())
                .collect();
            (counters, remote)
        };
        let attached = self
            .datapath
            .attached_interfaces()
            .unwrap_or_default()
            .into_iter()
            .map(|(n, d)| {
                format!(
                    "{n} ({})",
                    if d == Direction::Ingress {
                        "ingress"
                    } else {
                        "egress"
                    }
                )
            })
            .collect();
        let status = AgentStatus {
            schema_version: STATUS_SCHEMA_VERSION,
            node: self.args.node_name.clone(),
            interface: self.args.local.interface.clone(),
            backend: self.device.backend().to_string(),
            public_key: self.identity.public_key,
            key_generation: self.identity.generation,
            listen_port: self.args.listen_port,
            mtu: self.mtu.unwrap_or(0),
            synced: self.synced,
            desired_peers: self
                .desired
                .peers
                .values()
                .map(|p| DesiredPeer {
                    node: p.node.clone(),
                    public_key: p.public_key,
                    endpoint: p.endpoint.to_string(),
                    allowed_ips: p.allowed_ips.iter().map(|n| n.to_string()).collect(),
                })
                .collect(),
            skipped_nodes: self
                .desired
                .skipped
                .iter()
                .map(|s| SkippedNode {
                    node: s.node.clone(),
                    reason: s.reason.clone(),
                })
                .collect(),
            datapath: DatapathStatus {
                attach_mode: self.datapath.attach_mode().to_string(),
                attached,
                remote_cidrs,
                local_cidrs: self
                    .desired
                    .local_cidrs
                    .iter()
                    .map(|c| c.to_string())
                    .collect(),
                counters,
            },
            last_reconcile: self.last_reconcile.clone(),
            device: None,
            host_encryption: HostEncryptionStatus {
                enabled: self.args.host_encryption,
                addresses: self
                    .identity
                    .host_addresses
                    .iter()
                    .flatten()
                    .map(|a| a.to_string())
                    .collect(),
                peers: self
                    .desired
                    .peers
                    .values()
                    .filter(|p| {
                        p.allowed_ips.iter().any(|c| {
                            c.prefix_len() == c.max_prefix_len()
                                && self.desired.peer_hosts.contains(&c.addr())
                        })
                    })
                    .map(|p| p.node.clone())
                    .collect(),
                routes: self.desired.host_routes.len(),
                warnings: self
                    .desired
                    .host_warnings
                    .iter()
                    .map(|w| SkippedNode {
                        node: w.node.clone(),
                        reason: w.reason.clone(),
                    })
                    .collect(),
            },
        };
        if let Ok(mut s) = self.shared.status.lock() {
            *s = Some(status);
        }
        self.shared
            .ready
            .store(self.synced && self.published, Ordering::Relaxed);
    }

    pub fn backend(&self) -> Backend {
        self.device.backend()
    }
}

/// The device as `wg show` would show it, with peers named by node where the key is known.
pub fn device_status(
    state: &wireguard::DeviceState,
    desired: &[DesiredPeer],
) -> wgmesh_api::status::DeviceStatus {
    let names: BTreeMap<PublicKey, &str> = desired
        .iter()
        .map(|p| (p.public_key, p.node.as_str()))
        .collect();
    let unix = |t: SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .ok()
    };
    wgmesh_api::status::DeviceStatus {
        public_key: state.public_key,
        listen_port: state.listen_port,
        fwmark: state.fwmark,
        peers: state
            .peers
            .iter()
            .map(|(k, p)| wgmesh_api::status::DevicePeerStatus {
                node: names.get(k).map(|n| (*n).to_owned()),
                public_key: *k,
                endpoint: p.endpoint.map(|e| e.to_string()),
                allowed_ips: p.allowed_ips.iter().map(|n| n.to_string()).collect(),
                latest_handshake: p.last_handshake.and_then(unix),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                persistent_keepalive: p.keepalive,
            })
            .collect(),
    }
}

pub fn counters_map(c: &wgmesh_datapath::Counters) -> BTreeMap<String, u64> {
    BTreeMap::from([
        ("steered".to_owned(), c.steered),
        ("local".to_owned(), c.local),
        ("passed".to_owned(), c.passed),
        ("leaked".to_owned(), c.leaked),
        ("dropped_strict".to_owned(), c.dropped_strict),
        ("rescued".to_owned(), c.rescued),
    ])
}

/// Runs the agent until SIGTERM/SIGINT. Exiting leaves the device, routes and eBPF programs in
/// place, so traffic keeps flowing while the agent restarts or is upgraded.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    args.validate()?;
    let shared = Shared::new();
    tokio::spawn(server::serve(args.status_addr, shared.clone()));
    let resync = args.resync();

    // The Node list starts right away, alongside the device and datapath start-up below (which
    // need no API): at scale, fetching the Nodes is the longest step before the first reconcile.
    // Events queue in the channel until the loop runs; it holds a few list pages, so the list
    // does not stall behind the start-up (tokio allocates the queue as it fills, not up front).
    let (tx, mut rx) = mpsc::channel::<Trigger>(EVENT_QUEUE);
    let client = discovery::client(args.kubeconfig.as_deref()).await;
    if let Ok(client) = &client {
        let tx = tx.clone();
        // Only the fields wgmesh reads are decoded (`SlimNode`), and the loop keeps them as
        // `NodeRecord`s: no full Node objects are cached.
        let api: Api<SlimNode> = Api::all(client.clone());
        tokio::spawn(async move {
            let mut events = watcher(api, watcher::Config::default())
                .backoff(watch_backoff())
                .boxed();
            while let Some(ev) = events.next().await {
                let t = match ev {
                    Ok(ev) => Trigger::Node(Box::new(ev)),
                    Err(e) => Trigger::WatchError(e.to_string()),
                };
                if tx.send(t).await.is_err() {
                    break;
                }
            }
        });
    }
    let mut agent = Agent::start(args.clone(), shared.clone()).await?;
    let client = client?;
    let mut cache = NodeCache::default();
    {
        let tx = tx.clone();
        let mut links = Box::pin(netlink::link_events()?);
        tokio::spawn(async move {
            while let Some(ev) = links.next().await {
                if tx.send(Trigger::Link(ev)).await.is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status_tick = tokio::time::interval(Duration::from_secs(5));
    let mut rotation_tick = tokio::time::interval(Duration::from_millis(500));
    let mut watch_failing = false;
    loop {
        let mut dirty = false;
        let mut links_dirty = false;
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: exiting, leaving the data path in place"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: exiting, leaving the data path in place"); break; }
            _ = tick.tick() => { dirty = true; links_dirty = true; agent.plumbing_due = true; }
            _ = status_tick.tick() => { agent.publish_status(); }
            _ = rotation_tick.tick(), if agent.rotation.is_some() => { agent.report_rotation(&client).await; }
            t = rx.recv() => {
                let Some(t) = t else { anyhow::bail!("event sources ended") };
                let mut pending = vec![t];
                // Coalesce a burst. A completed (re-)list is a whole snapshot of the cluster:
                // nothing left to wait for, so it ends the window.
                let deadline = tokio::time::sleep(DEBOUNCE);
                tokio::pin!(deadline);
                loop {
                    if pending.last().is_some_and(Trigger::completes_list) {
                        break;
                    }
                    tokio::select! {
                        _ = &mut deadline => break,
                        more = rx.recv() => match more { Some(m) => pending.push(m), None => break },
                    }
                }
                for t in pending {
                    match t {
                        Trigger::Node(ev) => match cache.apply(*ev) {
                            CacheChange::None => {}
                            CacheChange::Nodes => { dirty = true; watch_failing = false; }
                            CacheChange::Synced => {
                                if !agent.synced {
                                    tracing::info!(nodes = cache.nodes().len(), "initial node list received; stale peers will now be pruned");
                                }
                                agent.synced = true;
                                dirty = true;
                                watch_failing = false;
                            }
                        },
                        Trigger::WatchError(e) => {
                            if !watch_failing {
                                tracing::warn!(error = %e, "node watch failed; retrying with backoff, the data path stays as it is");
                            }
                            watch_failing = true;
                        }
                        Trigger::Link(ev) => agent.on_link_event(ev).await,
                    }
                }
            }
        }
        if links_dirty && let Err(e) = agent.attach_pod_interfaces().await {
            tracing::warn!(error = %format!("{e:#}"), "cannot list pod interfaces");
        }
        if dirty {
            let nodes = cache.nodes();
            if nodes.is_empty() && !agent.synced {
                continue;
            }
            agent.reconcile(&client, nodes).await;
        }
    }
    Ok(())
}

/// `wgmesh-agent cleanup`: removes the device, the policy routing and the eBPF programs and maps.
pub async fn cleanup(args: crate::config::CleanupArgs) -> anyhow::Result<()> {
    args.local.validate()?;
    let ifname = &args.local.interface;
    let nl = Netlink::connect()?;
    let policy = PolicyRouting {
        fwmark: args.local.fwmark,
        fwmask: args.local.fwmark,
        table: args.local.route_table,
        priority: args.local.rule_priority,
    };
    let mut rules = nl.delete_rules(&policy).await?;
    let mut routes = nl.flush_table(policy.table).await?;
    let host_table = args.local.host_route_table;
    rules += nl
        .delete_host_rules(host_table, args.local.host_rule_priority)
        .await?;
    routes += nl.flush_table(host_table).await?;
    tracing::info!(rules, routes, "policy routing removed");
    tokio::task::block_in_place(|| Datapath::cleanup(&args.local.bpffs_dir)).with_context(
        || {
            format!(
                "removing eBPF programs and pins under {}",
                args.local.bpffs_dir.display()
            )
        },
    )?;
    tracing::info!(bpffs = %args.local.bpffs_dir.display(), "eBPF programs and maps removed");
    if wireguard::device::stop(ifname) {
        tracing::info!(interface = %ifname, "userspace device stopped");
    }
    if nl.delete_link(ifname).await? {
        tracing::info!(interface = %ifname, "wireguard interface deleted");
    }
    if args.remove_key {
        let path = args.local.state_dir.join(keys::PRIVATE_KEY_FILE);
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!(path = %path.display(), "private key deleted"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("deleting {}", path.display())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use kube::runtime::utils::Backoff as _;

    use super::*;

    #[test]
    fn watch_backoff_doubles_to_its_cap_with_jitter_and_resets() {
        let mut b = WatchBackoff::new();
        let nominal = [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0];
        for want in nominal {
            let got = b.next().unwrap().as_secs_f64();
            assert!(
                (want * 0.75..=want).contains(&got),
                "{got} s is not within 75-100 % of {want} s"
            );
        }
        b.reset();
        let got = b.next().unwrap().as_secs_f64();
        assert!((0.375..=0.5).contains(&got), "after reset: {got} s");
    }
}
