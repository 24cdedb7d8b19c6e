//! wgmesh datapath: loads the TC eBPF programs of `wgmesh-ebpf` with aya, attaches them to pod
//! veths (`wgmesh_steer`, ingress) and the uplink (`wgmesh_guard`, egress), and keeps their maps
//! (remote/cluster/local pod CIDRs, peer host addresses, config, counters) in step with what the
//! agent wants.
//!
//! # The two programs
//!
//! `wgmesh_steer` is the normal path: at ingress of each host-side pod veth it marks packets for
//! the pod CIDRs of peered nodes ([`Datapath::sync_remote_cidrs`]) and for the other nodes' own
//! host addresses ([`Datapath::sync_peer_hosts`], exact addresses, looked up only when the
//! destination is in no remote pod CIDR), and the agent's policy rule routes marked packets into
//! the WireGuard device, through the kernel's regular forwarding path. Both count as
//! [`Counters::steered`].
//!
//! `wgmesh_guard`, at egress of the uplink, is the backstop for traffic that never crossed a
//! steered veth and so would leave the node **in the clear**:
//! * a pod created after the agent started sends its first packets before the agent has seen its
//!   veth (netlink link event) and attached `wgmesh_steer` — they follow the CNI's plain route;
//! * traffic the node itself originates to remote pods (NodePort → remote pod, host-network
//!   processes) crosses no pod veth at all.
//!
//! It decides by destination address:
//! 1. a peered node's pod CIDR (`REMOTE_*`) and the WireGuard device's ifindex is known
//!    ([`DatapathConfig::tunnel_ifindex`], [`Datapath::set_tunnel_ifindex`]): the packet is
//!    `bpf_redirect`ed to egress of that device (a TUN or a kernel `wireguard` link; being an L3
//!    device, the kernel strips the Ethernet header) and counted as [`Counters::rescued`]. It never
//!    leaves in the clear; should the index be stale (device gone), the kernel drops it.
//! 2. else another node's pod CIDR ([`Datapath::sync_cluster_cidrs`]: every other node of the
//!    cluster, peered or not, e.g. one whose agent has not published a key yet; a `REMOTE_*` CIDR
//!    counts as one too while the ifindex is unknown): plaintext we cannot encrypt, counted as
//!    [`Counters::leaked`] and, in strict mode, dropped ([`Counters::dropped_strict`]).
//! 3. anything else passes untouched ([`Counters::uplink_passed`]): pods talking to the internet
//!    (with or without SNAT), the node's own traffic, and the encrypted WireGuard UDP, which carries
//!    node addresses. Passing never ends the TC chain, so other programs on the hook still run.
//!    The guard does not read the peer host addresses: traffic to them on the uplink (the node's
//!    own, WireGuard's UDP among it) is never rescued, counted as leaked or dropped.
//!
//! Rescue is a safety net for stragglers, not a replacement for steering: a rescued packet was
//! routed (and sized) for the uplink, not the tunnel. A full-size one (e.g. a node-originated TCP
//! segment, MSS from the uplink's MTU) becomes an encrypted UDP packet larger than the uplink's
//! MTU, which the WireGuard backend's socket fragments (or drops, if it sets DF); and the
//! receiving peer accepts the inner source only if its AllowedIPs for this node cover it (this
//! node's pod CIDRs do; the node's own uplink address only if the agent adds it). Bulk node
//! traffic to remote pods is better routed into the tunnel by the agent.
//!
//! The one rule this crate is built around: **restarting or killing the agent must not interrupt
//! steering, not even for a moment.** So every map is pinned under the agent's bpffs directory and
//! re-used on the next load (contents intact), every attachment outlives the process (pinned TCX
//! links, or cls_bpf filters that are never deleted implicitly; see `attach.rs`), a re-attach
//! swaps the program atomically instead of detaching, map updates are minimal diffs (never
//! clear-and-refill), and dropping a [`Datapath`] detaches nothing. Every operation is idempotent.
//!
//! It must not decide *what* to steer (the agent computes CIDRs and interface lists), touch routes,
//! rules or WireGuard, or switch network namespaces: call it from a thread that already is in the
//! node's namespace (ifnames and ifindexes are resolved in the calling thread's namespace).

mod attach;
pub mod bench;
mod bpffs;
mod cidr;
mod error;
mod maps;
mod pin;

use std::{
    collections::BTreeSet,
    fmt,
    net::IpAddr,
    ops,
    path::{Path, PathBuf},
};

use aya::{EbpfLoader, programs::SchedClassifier, util::KernelVersion};
use ipnet::IpNet;
use wgmesh_ebpf_common::{Config, MAP_NAMES, PROG_GUARD, PROG_STEER};

use crate::{
    attach::Target,
    maps::{LATER_MAPS, MapSet, ShapeMismatch},
};
pub use crate::{error::Error, maps::MapShape};

/// The eBPF object built by `build.rs` (aya-build) for the BPF target, embedded so the agent is a
/// single self-contained binary whose programs always match its map layouts.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wgmesh-ebpf"));

/// What [`Datapath::load`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Directory for wgmesh's pins: a bpffs mount or a directory inside one (created if missing),
    /// e.g. `/sys/fs/bpf/wgmesh`.
    pub bpffs_dir: PathBuf,
    /// Mark bits set on steered packets (must be non-zero and inside `fwmask`).
    pub fwmark: u32,
    /// The `skb->mark` bits wgmesh owns; all others are preserved.
    pub fwmask: u32,
    /// Drop plaintext pod traffic on the uplink instead of only counting it.
    pub strict: bool,
    /// ifindex of the WireGuard device (in the calling thread's namespace) that the guard
    /// redirects traffic for remote pod CIDRs into; 0 = unknown (no redirect: such traffic is
    /// then counted as leaked, and dropped in strict mode). Resolve it before loading when the
    /// device exists, so that a restart does not pause the backstop; keep it current with
    /// [`Datapath::set_tunnel_ifindex`].
    pub tunnel_ifindex: u32,
}

/// A TC hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Packets received by the interface (pod veths: sent by the pod).
    Ingress,
    /// Packets sent by the interface (the uplink: leaving the node).
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        })
    }
}

/// Packet counters, summed over CPUs, since the maps were first created (they survive restarts).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counters {
    /// Pod packets marked for the tunnel (destination in a remote pod CIDR or a peer host
    /// address).
    pub steered: u64,
    /// Bytes of those packets (L2 frame length).
    pub steered_bytes: u64,
    /// Pod packets to this node's pod CIDRs.
    pub local: u64,
    /// Other pod IP packets (left to the normal routing).
    pub passed: u64,
    /// Plaintext packets seen leaving the uplink for another node's pod CIDR that could not be
    /// encrypted (no WireGuard peer, or the tunnel's ifindex unknown).
    pub leaked: u64,
    /// Of those, dropped because of strict mode.
    pub dropped_strict: u64,
    /// Non-IP frames from pods.
    pub non_ip: u64,
    /// Truncated frames (either program), passed.
    pub malformed: u64,
    /// Uplink packets not bound for another node's pod CIDR (internet, node traffic,
    /// WireGuard's own UDP, ARP, ...).
    pub uplink_passed: u64,
    /// Packets about to leave the uplink in the clear for a peered node's pod CIDR, redirected
    /// into the WireGuard device instead (pods racing the steer attach, node-originated traffic).
    pub rescued: u64,
}

/// How the programs look addresses up in one CIDR map (see `PREFIX_LENS` in `wgmesh-ebpf-common`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// One hash probe per prefix length, longest first.
    Hash {
        /// The distinct prefix lengths in the map, longest first.
        prefix_lens: Vec<u8>,
    },
    /// The LPM trie: the map has more distinct prefix lengths than the hash index serves.
    Trie,
}

/// How programs are attached on this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// bpf_link based TCX (kernel ≥ 6.6); links are pinned under `bpffs_dir/links/`.
    Tcx,
    /// Legacy cls_bpf filters in a clsact qdisc, via netlink (kernel < 6.6).
    Netlink,
}

impl AttachMode {
    /// The mechanism aya would pick on this kernel: TCX from 6.6 on. If the kernel version cannot
    /// be read, netlink, which every kernel with clsact supports.
    pub fn detect() -> Self {
        match KernelVersion::current() {
            Ok(version) if version >= KernelVersion::new(6, 6, 0) => Self::Tcx,
            Ok(_) => Self::Netlink,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the kernel version; using netlink attach");
                Self::Netlink
            }
        }
    }
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcx => "tcx",
            Self::Netlink => "netlink",
        })
    }
}

/// Map writes done by a sync.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncStats {
    /// CIDRs (or peer host addresses) inserted (or rewritten).
    pub added: usize,
    /// CIDRs (or peer host addresses) deleted.
    pub removed: usize,
}

impl ops::Add for SyncStats {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            added: self.added + other.added,
            removed: self.removed + other.removed,
        }
    }
}

/// The loaded programs and their maps.
///
/// There is deliberately no `Drop` impl and no detach on drop: the programs stay attached through
/// pinned links / cls_bpf filters and keep using the pinned maps after this value (or the whole
/// process) is gone. Remove everything with [`Datapath::cleanup`].
pub struct Datapath {
    bpffs_dir: PathBuf,
    links_dir: PathBuf,
    mode: AttachMode,
    /// Owns the loaded (not attached) program fds; its attachments have all been handed over to
    /// the kernel (pins, forgotten filter handles), so dropping it detaches nothing.
    ebpf: aya::Ebpf,
    maps: MapSet,
}

impl fmt::Debug for Datapath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Datapath")
            .field("bpffs_dir", &self.bpffs_dir)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Datapath {
    /// Loads the embedded object, pinning or re-using its maps under `cfg.bpffs_dir` (which must
    /// be a bpffs mount or a directory inside one), and writes `CONFIG`. Attaches nothing: programs
    /// already attached by a previous run keep running (with the re-used maps) until the next
    /// `attach_*` swaps in the new programs.
    pub fn load(cfg: &DatapathConfig) -> Result<Self, Error> {
        Self::load_with_mode(cfg, AttachMode::detect())
    }

    /// [`Datapath::load`] with an explicit attach mechanism instead of the detected one. Netlink
    /// works on every kernel (tests use it to cover the < 6.6 path); TCX needs ≥ 6.6.
    pub fn load_with_mode(cfg: &DatapathConfig, mode: AttachMode) -> Result<Self, Error> {
        if cfg.fwmark == 0 || cfg.fwmark & !cfg.fwmask != 0 {
            return Err(Error::InvalidMark {
                fwmark: cfg.fwmark,
                fwmask: cfg.fwmask,
            });
        }
        if EBPF_OBJECT.is_empty() {
            return Err(Error::ObjectNotBuilt);
        }
        let links_dir = bpffs::prepare(&cfg.bpffs_dir)?;
        let reused = maps::check_pinned_shapes(&cfg.bpffs_dir, ShapeMismatch::ReplaceDerived)?;

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&cfg.bpffs_dir)
            .load(EBPF_OBJECT)
            .map_err(|source| Error::LoadObject {
                bpffs_dir: cfg.bpffs_dir.clone(),
                source: Box::new(source),
            })?;
        for program in [PROG_STEER, PROG_GUARD] {
            classifier(&mut ebpf, program)?
                .load()
                .map_err(|source| Error::LoadProgram {
                    program,
                    source: Box::new(source),
                })?;
        }
        let mut maps = MapSet::take_from(&mut ebpf)?;
        maps.write_config(Config {
            fwmark: cfg.fwmark,
            fwmask: cfg.fwmask,
            strict: u32::from(cfg.strict),
            tunnel_ifindex: cfg.tunnel_ifindex,
        })?;
        // Before anything is attached: the new programs must find the index complete.
        let indexed = maps.rebuild_indexes()?;
        tracing::info!(
            attach_mode = %mode,
            bpffs_dir = %cfg.bpffs_dir.display(),
            reused_maps = reused.len(),
            indexed_cidrs = indexed,
            fwmark = format_args!("{:#x}/{:#x}", cfg.fwmark, cfg.fwmask),
            strict = cfg.strict,
            tunnel_ifindex = cfg.tunnel_ifindex,
            "datapath loaded"
        );
        Ok(Self {
            bpffs_dir: cfg.bpffs_dir.clone(),
            links_dir,
            mode,
            ebpf,
            maps,
        })
    }

    /// Opens the pinned maps under `bpffs_dir` without loading or attaching anything, for
    /// inspecting a node while the agent is down (`wgmeshctl`).
    pub fn open_pinned(bpffs_dir: &Path) -> Result<PinnedDatapath, Error> {
        let no_pins = || Error::NoPins {
            path: bpffs_dir.to_path_buf(),
        };
        if !bpffs_dir.exists() {
            return Err(no_pins());
        }
        if !bpffs::is_bpffs(bpffs_dir)? {
            return Err(Error::NotBpffs {
                path: bpffs_dir.to_path_buf(),
            });
        }
        // Pins of an older build lack the later maps; the view reads them as empty.
        if MAP_NAMES
            .iter()
            .filter(|map| !LATER_MAPS.contains(map))
            .any(|map| !maps::pin_path(bpffs_dir, map).exists())
        {
            return Err(no_pins());
        }
        Ok(PinnedDatapath {
            links_dir: bpffs_dir.join(bpffs::LINKS_DIR),
            maps: MapSet::open_pinned(bpffs_dir)?,
        })
    }

    /// The attach mechanism in use.
    pub fn attach_mode(&self) -> AttachMode {
        self.mode
    }

    /// The bpffs directory holding the pins.
    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs_dir
    }

    /// Attaches `wgmesh_steer` at ingress of the host-side pod veth `ifname`. Idempotent: an
    /// existing wgmesh attachment is adopted and its program replaced atomically.
    pub fn attach_pod_interface(&mut self, ifname: &str) -> Result<(), Error> {
        self.attach(PROG_STEER, ifname, Direction::Ingress)
    }

    /// Attaches `wgmesh_guard` at egress of the uplink `ifname`. Idempotent like
    /// [`Datapath::attach_pod_interface`].
    pub fn attach_uplink(&mut self, ifname: &str) -> Result<(), Error> {
        self.attach(PROG_GUARD, ifname, Direction::Egress)
    }

    fn attach(
        &mut self,
        program: &'static str,
        ifname: &str,
        direction: Direction,
    ) -> Result<(), Error> {
        bpffs::validate_ifname(ifname)?;
        let ifindex = attach::ifindex(ifname)?;
        let target = Target::new(program, &self.links_dir, ifname, ifindex, direction);
        let mode = self.mode;
        let prog = classifier(&mut self.ebpf, program)?;
        let outcome = attach::attach(prog, mode, &target)?;
        tracing::info!(
            program,
            ifname,
            ifindex,
            %direction,
            attach_mode = %mode,
            ?outcome,
            "tc program attached"
        );
        Ok(())
    }

    /// Forgets an interface: removes its pins (both directions). For an interface that
    /// disappeared the kernel has already dropped the attachment; if it still exists, the wgmesh
    /// programs are detached from it too. Idempotent.
    pub fn forget_interface(&mut self, ifname: &str) -> Result<(), Error> {
        bpffs::validate_ifname(ifname)?;
        for direction in [Direction::Ingress, Direction::Egress] {
            let pin = self.links_dir.join(bpffs::link_pin_name(ifname, direction));
            let mut removed = attach::remove(&pin, ifname, direction)?;
            if self.mode == AttachMode::Netlink {
                // Also covers a filter whose record was never written (crash in between).
                removed |= attach::detach_netlink(ifname, direction)?;
            }
            if removed {
                tracing::info!(ifname, %direction, "interface forgotten");
            }
        }
        Ok(())
    }

    /// Interfaces with a wgmesh attachment recorded under `bpffs_dir` (survives restarts).
    pub fn attached_interfaces(&self) -> Result<Vec<(String, Direction)>, Error> {
        bpffs::list_link_pins(&self.links_dir)
    }

    /// Makes the `REMOTE_*` tries hold exactly `cidrs` (normalized; both families) with minimal
    /// writes: entries already present are not touched.
    pub fn sync_remote_cidrs(&mut self, cidrs: &BTreeSet<IpNet>) -> Result<SyncStats, Error> {
        self.maps.sync_remote(cidrs)
    }

    /// Makes the `LOCAL_*` tries hold exactly `cidrs` (this node's pod CIDRs).
    pub fn sync_local_cidrs(&mut self, cidrs: &BTreeSet<IpNet>) -> Result<SyncStats, Error> {
        self.maps.sync_local(cidrs)
    }

    /// The remote pod CIDRs currently in the maps.
    pub fn remote_cidrs(&self) -> Result<BTreeSet<IpNet>, Error> {
        self.maps.remote_cidrs()
    }

    /// This node's pod CIDRs currently in the maps.
    pub fn local_cidrs(&self) -> Result<BTreeSet<IpNet>, Error> {
        self.maps.local_cidrs()
    }

    /// Makes the `CLUSTER_*` tries hold exactly `cidrs`: the pod CIDRs of *all* other nodes of
    /// the cluster, peered or not. The guard counts (in strict mode drops) plaintext for them that
    /// it cannot redirect into the tunnel. Same minimal-diff semantics as
    /// [`Datapath::sync_remote_cidrs`].
    pub fn sync_cluster_cidrs(&mut self, cidrs: &BTreeSet<IpNet>) -> Result<SyncStats, Error> {
        self.maps.sync_cluster(cidrs)
    }

    /// The cluster pod CIDRs currently in the maps.
    pub fn cluster_cidrs(&self) -> Result<BTreeSet<IpNet>, Error> {
        self.maps.cluster_cidrs()
    }

    /// Makes the `PEER_HOSTS_*` maps hold exactly `hosts` (IPv4 addresses in `PEER_HOSTS_V4`,
    /// IPv6 in `PEER_HOSTS_V6`, each matched exactly): the other nodes' own host addresses, to
    /// which the steer program sends pod traffic into the tunnel as it does for remote pod CIDRs.
    /// The guard ignores them. Level-triggered with minimal writes, like
    /// [`Datapath::sync_remote_cidrs`]: addresses already present are not touched, new ones are
    /// inserted before unwanted ones are deleted (deleted first only when a map has no room for
    /// both), and more addresses of one family than a map holds are refused
    /// ([`Error::TooManyCidrs`]) before anything is written. An empty set empties both maps.
    pub fn sync_peer_hosts(&mut self, hosts: &BTreeSet<IpAddr>) -> Result<SyncStats, Error> {
        self.maps.sync_peer_hosts(hosts)
    }

    /// The peer host addresses currently in the maps.
    pub fn peer_hosts(&self) -> Result<BTreeSet<IpAddr>, Error> {
        self.maps.peer_hosts()
    }

    /// Points the guard's redirect at the WireGuard device `ifindex` (0 = unknown: stop
    /// redirecting). Takes effect for the next packet, without re-attaching anything; call it
    /// whenever the device is re-created under a new index. `CONFIG` is rewritten only if the
    /// value differs, so calling it on every reconcile is cheap.
    pub fn set_tunnel_ifindex(&mut self, ifindex: u32) -> Result<(), Error> {
        let current = self.maps.config()?;
        let Some(updated) = with_tunnel_ifindex(current, ifindex) else {
            return Ok(());
        };
        self.maps.write_config(updated)?;
        tracing::info!(
            tunnel_ifindex = ifindex,
            previous = current.tunnel_ifindex,
            "tunnel ifindex updated"
        );
        Ok(())
    }

    /// The WireGuard device ifindex the guard redirects to (0 = unknown).
    pub fn tunnel_ifindex(&self) -> Result<u32, Error> {
        Ok(self.maps.config()?.tunnel_ifindex)
    }

    /// The counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, Error> {
        self.maps.counters()
    }

    /// How the programs currently look addresses up in each CIDR map, by trie name
    /// (`REMOTE_V4`, ...).
    pub fn lookups(&self) -> Vec<(&'static str, Lookup)> {
        maps::LOOKUP_RECORDS
            .iter()
            .map(|(map, set)| {
                let record = self.maps.prefix_lens(*set).unwrap_or(0);
                let lookup = match cidr::decode_lens_record(record) {
                    Some(prefix_lens) => Lookup::Hash { prefix_lens },
                    None => Lookup::Trie,
                };
                (*map, lookup)
            })
            .collect()
    }

    /// Removes everything wgmesh put under `bpffs_dir` and in the kernel: pinned TCX links are
    /// unpinned (which detaches them), netlink filters recorded there are deleted from their
    /// interfaces (looked up in the calling thread's network namespace), map pins are removed, and
    /// the directories if they end up empty. Idempotent; a missing directory is success. A running
    /// agent would re-create it all, so stop it first.
    pub fn cleanup(bpffs_dir: &Path) -> Result<(), Error> {
        if !bpffs_dir.exists() {
            return Ok(());
        }
        if !bpffs::is_bpffs(bpffs_dir)? {
            return Err(Error::NotBpffs {
                path: bpffs_dir.to_path_buf(),
            });
        }
        let links_dir = bpffs_dir.join(bpffs::LINKS_DIR);
        for (ifname, direction) in bpffs::list_link_pins(&links_dir)? {
            let pin = links_dir.join(bpffs::link_pin_name(&ifname, direction));
            attach::remove(&pin, &ifname, direction)?;
            tracing::info!(ifname, %direction, "attachment removed");
        }
        bpffs::remove_dir_if_empty(&links_dir)?;
        for map in MAP_NAMES {
            bpffs::remove_pin(&maps::pin_path(bpffs_dir, map))?;
        }
        bpffs::remove_dir_if_empty(bpffs_dir)?;
        tracing::info!(bpffs_dir = %bpffs_dir.display(), "datapath cleaned up");
        Ok(())
    }
}

/// `config` with `tunnel_ifindex` set, or `None` if it already has it (nothing to write).
fn with_tunnel_ifindex(config: Config, tunnel_ifindex: u32) -> Option<Config> {
    (config.tunnel_ifindex != tunnel_ifindex).then_some(Config {
        tunnel_ifindex,
        ..config
    })
}

fn classifier<'a>(
    ebpf: &'a mut aya::Ebpf,
    program: &'static str,
) -> Result<&'a mut SchedClassifier, Error> {
    ebpf.program_mut(program)
        .and_then(|prog| <&mut SchedClassifier>::try_from(prog).ok())
        .ok_or(Error::MissingProgram { program })
}

/// A read-only view of a node's datapath from its pins alone (no programs loaded), e.g. for
/// `wgmeshctl` while the agent is down. See [`Datapath::open_pinned`].
pub struct PinnedDatapath {
    links_dir: PathBuf,
    maps: MapSet,
}

impl fmt::Debug for PinnedDatapath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedDatapath")
            .field("links_dir", &self.links_dir)
            .finish_non_exhaustive()
    }
}

impl PinnedDatapath {
    /// The counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, Error> {
        self.maps.counters()
    }

    /// The remote pod CIDRs in the maps.
    pub fn remote_cidrs(&self) -> Result<BTreeSet<IpNet>, Error> {
        self.maps.remote_cidrs()
    }

    /// This node's pod CIDRs in the maps.
    pub fn local_cidrs(&self) -> Result<BTreeSet<IpNet>, Error> {
        self.maps.local_cidrs()
    }

    /// The cluster pod CIDRs in the maps (empty if the pins predate them).
    pub fn cluster_cidrs(&self) -> Result<BTreeSet<IpNet>, Error> {
        self.maps.cluster_cidrs()
    }

    /// The peer host addresses in the maps (empty if the pins predate them).
    pub fn peer_hosts(&self) -> Result<BTreeSet<IpAddr>, Error> {
        self.maps.peer_hosts()
    }

    /// The WireGuard device ifindex the guard redirects to (0 = unknown).
    pub fn tunnel_ifindex(&self) -> Result<u32, Error> {
        Ok(self.maps.config()?.tunnel_ifindex)
    }

    /// Interfaces with a recorded wgmesh attachment.
    pub fn attached_interfaces(&self) -> Result<Vec<(String, Direction)>, Error> {
        bpffs::list_link_pins(&self.links_dir)
    }

    /// The configuration the programs run with: `(fwmark, fwmask, strict)`.
    pub fn config(&self) -> Result<(u32, u32, bool), Error> {
        let config = self.maps.config()?;
        Ok((config.fwmark, config.fwmask, config.strict != 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_object_is_an_ebpf_elf() {
        assert!(EBPF_OBJECT.starts_with(b"\x7fELF"), "object not built");
        // EM_BPF (247) at e_machine, little endian.
        assert_eq!(&EBPF_OBJECT[18..20], &247u16.to_le_bytes());
    }

    #[test]
    fn marks_outside_the_mask_are_refused_before_touching_anything() {
        for (fwmark, fwmask) in [(0, 0xff00), (0x100, 0xff), (0x1_0000, 0xffff)] {
            let cfg = DatapathConfig {
                bpffs_dir: PathBuf::from("/nonexistent/wgmesh"),
                fwmark,
                fwmask,
                strict: false,
                tunnel_ifindex: 0,
            };
            assert!(
                matches!(Datapath::load(&cfg), Err(Error::InvalidMark { .. })),
                "{fwmark:#x}/{fwmask:#x}"
            );
        }
    }

    #[test]
    fn load_outside_bpffs_fails_with_the_fix_in_the_message() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = DatapathConfig {
            bpffs_dir: dir.path().join("wgmesh"),
            fwmark: 0x10000,
            fwmask: 0x10000,
            strict: false,
            tunnel_ifindex: 7,
        };
        let err = Datapath::load(&cfg).expect_err("not bpffs");
        assert!(matches!(err, Error::NotBpffs { .. }), "{err:?}");
        assert!(err.to_string().contains("mount -t bpf"), "{err}");
    }

    #[test]
    fn cleanup_of_a_missing_directory_is_a_no_op() {
        let dir = tempfile::tempdir().expect("tempdir");
        Datapath::cleanup(&dir.path().join("never-created")).expect("idempotent");
    }

    #[test]
    fn open_pinned_without_pins_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Datapath::open_pinned(&dir.path().join("wgmesh")).expect_err("nothing there");
        assert!(matches!(err, Error::NoPins { .. }), "{err:?}");
    }

    #[test]
    fn open_pinned_outside_bpffs_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Datapath::open_pinned(dir.path()).expect_err("not bpffs");
        assert!(matches!(err, Error::NotBpffs { .. }), "{err:?}");
    }

    #[test]
    fn handles_can_move_to_the_agent_s_datapath_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<Datapath>();
        assert_send::<PinnedDatapath>();
        assert_send::<Error>();
    }

    #[test]
    fn sync_stats_add_up() {
        let sum = SyncStats {
            added: 1,
            removed: 2,
        } + SyncStats {
            added: 3,
            removed: 4,
        };
        assert_eq!(
            sum,
            SyncStats {
                added: 4,
                removed: 6
            }
        );
    }

    #[test]
    fn the_tunnel_ifindex_is_written_only_when_it_changes() {
        let config = Config {
            fwmark: 0x10000,
            fwmask: 0x30000,
            strict: 1,
            tunnel_ifindex: 5,
        };
        assert_eq!(with_tunnel_ifindex(config, 5), None);
        assert_eq!(
            with_tunnel_ifindex(config, 9),
            Some(Config {
                tunnel_ifindex: 9,
                ..config
            })
        );
        // 0 (unknown) is a value like any other: it switches the redirect off.
        assert_eq!(
            with_tunnel_ifindex(config, 0).map(|c| c.tunnel_ifindex),
            Some(0)
        );
    }

    #[test]
    fn config_keeps_the_shape_of_the_first_pinned_layout() {
        // Four u32s: tunnel_ifindex took the place of the reserved word, so a CONFIG pinned by an
        // earlier build (reserved = 0) is re-used and reads as "tunnel unknown".
        assert_eq!(size_of::<Config>(), 16);
        assert_eq!(std::mem::offset_of!(Config, tunnel_ifindex), 12);
    }

    #[test]
    fn directions_print_as_pin_suffixes() {
        assert_eq!(Direction::Ingress.to_string(), "ingress");
        assert_eq!(Direction::Egress.to_string(), "egress");
    }
}
