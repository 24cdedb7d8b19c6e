//! The contract between wgmesh's TC eBPF programs (`wgmesh-ebpf`) and the agent (`wgmesh-datapath`).
//!
//! Everything both sides must agree on lives here and only here: program and map names, map sizes,
//! the LPM key layout, the `CONFIG` record and the counter slots. The crate is `#![no_std]` so the
//! eBPF programs can use it; the `user` feature adds the `aya::Pod` impls the agent needs.
//!
//! Every map is pinned by name and re-used across agent restarts and upgrades, so the *shape* of a
//! map (type, key size, value size, max entries) is an ABI: changing any of it here requires the
//! agent to refuse the old pin (it does, naming `wgmesh-agent cleanup` as the fix). To let the
//! programs grow without such a break, `COUNTERS` has spare slots (and `Config`'s former reserved
//! word now holds `tunnel_ifindex`). Adding a *new* map is not a break: a missing pin is created on
//! load, next to the re-used ones.
//!
//! It must not contain logic: no parsing, no I/O, nothing that needs `std`.
#![no_std]

/// TC classifier attached at ingress of every host-side pod veth; marks pod traffic bound for
/// remote pod CIDRs so policy routing sends it into the WireGuard device.
pub const PROG_STEER: &str = "wgmesh_steer";
/// TC classifier attached at egress of the uplink, the backstop: redirects traffic for the pod
/// CIDRs of peered nodes into the WireGuard device, and counts (in strict mode drops) plaintext
/// traffic for the pod CIDRs of other cluster nodes that cannot be encrypted.
pub const PROG_GUARD: &str = "wgmesh_guard";

/// LPM trie `[u8; 4] -> u32`: pod CIDRs of other nodes we have a WireGuard peer for (IPv4).
pub const MAP_REMOTE_V4: &str = "REMOTE_V4";
/// LPM trie `[u8; 16] -> u32`: pod CIDRs of other nodes we have a WireGuard peer for (IPv6).
pub const MAP_REMOTE_V6: &str = "REMOTE_V6";
/// LPM trie `[u8; 4] -> u32`: pod CIDRs of *all* other nodes of the cluster, peered or not (IPv4).
pub const MAP_CLUSTER_V4: &str = "CLUSTER_V4";
/// LPM trie `[u8; 16] -> u32`: pod CIDRs of all other nodes of the cluster (IPv6).
pub const MAP_CLUSTER_V6: &str = "CLUSTER_V6";
/// LPM trie `[u8; 4] -> u32`: this node's pod CIDRs (IPv4).
pub const MAP_LOCAL_V4: &str = "LOCAL_V4";
/// LPM trie `[u8; 16] -> u32`: this node's pod CIDRs (IPv6).
pub const MAP_LOCAL_V6: &str = "LOCAL_V6";
/// Array with one [`Config`] at index [`CONFIG_INDEX`].
pub const MAP_CONFIG: &str = "CONFIG";
/// Per-CPU array of `u64` packet/byte counters, indexed by the constants in [`counter`].
pub const MAP_COUNTERS: &str = "COUNTERS";

/// Every map of the object, in a fixed order (pins are created, checked and removed by these names).
pub const MAP_NAMES: [&str; 8] = [
    MAP_REMOTE_V4,
    MAP_REMOTE_V6,
    MAP_LOCAL_V4,
    MAP_LOCAL_V6,
    MAP_CONFIG,
    MAP_COUNTERS,
    MAP_CLUSTER_V4,
    MAP_CLUSTER_V6,
];

/// Capacity of each `REMOTE_*` trie: one entry per remote pod CIDR. 16k covers clusters far beyond
/// the 5k-node Kubernetes limit with a few CIDRs per node; LPM tries are not preallocated, so unused
/// capacity costs no memory.
pub const REMOTE_MAX_ENTRIES: u32 = 16_384;
/// Capacity of each `CLUSTER_*` trie: like `REMOTE_*`, one entry per pod CIDR of another node.
pub const CLUSTER_MAX_ENTRIES: u32 = 16_384;
/// Capacity of each `LOCAL_*` trie: a node has a handful of pod CIDRs (one per family, more with
/// multi-pool IPAM).
pub const LOCAL_MAX_ENTRIES: u32 = 256;
/// Number of slots in `COUNTERS`; larger than [`counter::USED`] so new counters do not change the
/// pinned map's shape.
pub const COUNTER_SLOTS: u32 = 32;
/// `CONFIG` holds exactly one record.
pub const CONFIG_ENTRIES: u32 = 1;
/// Index of the only record in `CONFIG`.
pub const CONFIG_INDEX: u32 = 0;

/// Address part of an IPv4 LPM key, network byte order (the trie key is
/// `{ prefix_len: u32 (host order), data: Ipv4Key }`, packed, 8 bytes).
pub type Ipv4Key = [u8; 4];
/// Address part of an IPv6 LPM key, network byte order (the trie key is 20 bytes, packed).
pub type Ipv6Key = [u8; 16];
/// Value stored for every CIDR in the tries. The programs only test for presence.
pub type CidrValue = u32;
/// The value the agent writes for every CIDR ("present"); other values are reserved for flags.
pub const CIDR_PRESENT: CidrValue = 1;

/// Size in bytes of an IPv4 LPM key (`u32` prefix length + 4 address bytes).
pub const LPM_KEY_V4_SIZE: u32 = 4 + 4;
/// Size in bytes of an IPv6 LPM key (`u32` prefix length + 16 address bytes).
pub const LPM_KEY_V6_SIZE: u32 = 4 + 16;

/// Runtime settings of the programs, written by the agent at every load (`CONFIG[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Bits the steer program sets in `skb->mark` (always a subset of `fwmask`).
    pub fwmark: u32,
    /// The bits of `skb->mark` that belong to wgmesh; all other bits (e.g. kube-proxy's 0x4000)
    /// are preserved.
    pub fwmask: u32,
    /// Non-zero: the guard drops plaintext pod traffic on the uplink instead of only counting it.
    pub strict: u32,
    /// ifindex of the WireGuard device (a TUN or a kernel `wireguard` link) the guard redirects
    /// traffic for `REMOTE_*` into; 0 = unknown (no redirect). This was the reserved word, always
    /// written as zero by earlier builds, so their pinned `CONFIG` keeps its shape and reads as
    /// "unknown".
    pub tunnel_ifindex: u32,
}

/// Size in bytes of [`Config`] (the `CONFIG` map's value size).
pub const CONFIG_SIZE: u32 = core::mem::size_of::<Config>() as u32;

// SAFETY: `Config` is `#[repr(C)]`, made only of `u32`s (no padding, no pointers), and every bit
// pattern is a valid value, which is what `aya::Pod` requires.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Config {}

/// Slots of the `COUNTERS` map. Each is a per-CPU `u64`; readers sum over CPUs.
pub mod counter {
    /// Packets from pods whose destination is a remote pod CIDR (marked for the tunnel).
    pub const STEERED_PACKETS: u32 = 0;
    /// Bytes (`skb->len`, L2 included) of those packets.
    pub const STEERED_BYTES: u32 = 1;
    /// Packets from pods to this node's pod CIDRs (left alone).
    pub const LOCAL: u32 = 2;
    /// Other IP packets from pods (service VIPs before DNAT, the internet, ...), left alone.
    pub const PASSED: u32 = 3;
    /// Plaintext packets leaving the uplink for another node's pod CIDR (`CLUSTER_*`, or
    /// `REMOTE_*` while the tunnel's ifindex is unknown): they cannot be encrypted.
    pub const LEAKED: u32 = 4;
    /// Of those, the ones dropped because `Config::strict` is set.
    pub const DROPPED_STRICT: u32 = 5;
    /// Non-IP frames from pods (ARP, VLAN-tagged, ...), left alone.
    pub const NON_IP: u32 = 6;
    /// Frames too short for the header they announce (left alone by both programs).
    pub const MALFORMED: u32 = 7;
    /// Packets on the uplink not bound for another node's pod CIDR (the internet, node
    /// addresses, the encrypted WireGuard UDP, ARP, ...), left alone.
    pub const UPLINK_PASSED: u32 = 8;
    /// Packets about to leave the uplink in the clear for a peered node's pod CIDR (`REMOTE_*`),
    /// redirected into the WireGuard device instead (pods racing the steer attach, traffic the
    /// node originates).
    pub const RESCUED: u32 = 9;
    /// Number of slots in use; the rest of [`super::COUNTER_SLOTS`] is spare.
    pub const USED: u32 = 10;
}

/// Slot indices must fit the map.
const _: () = assert!(counter::USED <= COUNTER_SLOTS);
/// `Config` must stay 16 bytes: it is the pinned `CONFIG` map's value size.
const _: () = assert!(CONFIG_SIZE == 16);
