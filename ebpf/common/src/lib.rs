//! The contract between wgmesh's TC eBPF programs (`wgmesh-ebpf`) and the agent (`wgmesh-datapath`).
//!
//! Everything both sides must agree on lives here and only here: program and map names, map sizes,
//! the LPM key layout, the `CONFIG` record and the counter slots. The crate is `#![no_std]` so the
//! eBPF programs can use it; the `user` feature adds the `aya::Pod` impls the agent needs.
//!
//! Every map is pinned by name and re-used across agent restarts and upgrades, so the *shape* of a
//! map (type, key size, value size, max entries) is an ABI. Two kinds of maps:
//! * **state** (the CIDR tries, the `PEER_HOSTS_*` address sets, `CONFIG`, `COUNTERS`, `STATS`):
//!   changing its shape here requires the agent to refuse the old pin (it does, naming
//!   `wgmesh-agent cleanup` as the fix), since its contents cannot be re-derived. To let the
//!   programs grow without such a break, the counter records have spare slots (and `Config`'s
//!   former reserved word now holds `tunnel_ifindex`).
//! * **derived** ([`DERIVED_MAP_NAMES`]: the hash indexes and `PREFIX_LENS`): the agent rebuilds
//!   them from the tries at every load, before anything is attached, and replaces a pin of
//!   another shape instead of refusing it.
//!
//! Adding a *new* map is not a break: a missing pin is created on load, next to the re-used ones
//! (that is how pins of the layout before the hash indexes, or before `PEER_HOSTS_*`, are
//! upgraded). New maps go at the end of [`MAP_NAMES`].
//!
//! It must not contain logic: no parsing, no I/O, nothing that needs `std`.
#![no_std]

/// TC classifier attached at ingress of every host-side pod veth; marks pod traffic bound for
/// remote pod CIDRs or other nodes' host addresses so policy routing sends it into the WireGuard
/// device.
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
/// Per-CPU array of `u64` packet/byte counters, indexed by the constants in [`counter`]: what
/// builds before [`MAP_STATS`] counted. No longer written; readers add it to `STATS`.
pub const MAP_COUNTERS: &str = "COUNTERS";

/// Hash `PrefixKeyV4 -> u32`: the `REMOTE_V4` CIDRs keyed by (prefix length, network), the index
/// the programs look addresses up in (see [`prefix_lens`]). Derived from the trie by the agent.
pub const MAP_REMOTE_V4_HASH: &str = "REMOTE_V4_HASH";
/// Hash `PrefixKeyV6 -> u32`: the `REMOTE_V6` CIDRs by (prefix length, network).
pub const MAP_REMOTE_V6_HASH: &str = "REMOTE_V6_HASH";
/// Hash `PrefixKeyV4 -> u32`: the `CLUSTER_V4` CIDRs by (prefix length, network).
pub const MAP_CLUSTER_V4_HASH: &str = "CLUSTER_V4_HASH";
/// Hash `PrefixKeyV6 -> u32`: the `CLUSTER_V6` CIDRs by (prefix length, network).
pub const MAP_CLUSTER_V6_HASH: &str = "CLUSTER_V6_HASH";
/// Hash `PrefixKeyV4 -> u32`: the `LOCAL_V4` CIDRs by (prefix length, network).
pub const MAP_LOCAL_V4_HASH: &str = "LOCAL_V4_HASH";
/// Hash `PrefixKeyV6 -> u32`: the `LOCAL_V6` CIDRs by (prefix length, network).
pub const MAP_LOCAL_V6_HASH: &str = "LOCAL_V6_HASH";
/// Array (mmapable) of [`prefix_lens::SETS`] `u64`s: per CIDR set, the prefix lengths its hash
/// holds, or "use the trie" (see [`prefix_lens`]).
pub const MAP_PREFIX_LENS: &str = "PREFIX_LENS";
/// Per-CPU array with one [`Stats`]: the counters the programs of this layout write (one lookup
/// per packet). `COUNTERS` holds what earlier builds counted; readers add both.
pub const MAP_STATS: &str = "STATS";

/// Hash `[u8; 4] -> u32`: the host addresses of other nodes (IPv4), matched exactly. The steer
/// program marks pod traffic to them like traffic to `REMOTE_*`; the guard does not read it (node
/// traffic to them, WireGuard's own UDP included, passes the uplink untouched). Written by the
/// agent (not derived from any other map).
pub const MAP_PEER_HOSTS_V4: &str = "PEER_HOSTS_V4";
/// Hash `[u8; 16] -> u32`: the host addresses of other nodes (IPv6), like [`MAP_PEER_HOSTS_V4`].
pub const MAP_PEER_HOSTS_V6: &str = "PEER_HOSTS_V6";

/// Every map of the object, in a fixed order (pins are created, checked and removed by these names).
/// Maps added after the first layout are appended, never inserted: the agent treats everything
/// after the first six as possibly missing from an older build's pins.
pub const MAP_NAMES: [&str; 18] = [
    MAP_REMOTE_V4,
    MAP_REMOTE_V6,
    MAP_LOCAL_V4,
    MAP_LOCAL_V6,
    MAP_CONFIG,
    MAP_COUNTERS,
    MAP_CLUSTER_V4,
    MAP_CLUSTER_V6,
    MAP_REMOTE_V4_HASH,
    MAP_REMOTE_V6_HASH,
    MAP_CLUSTER_V4_HASH,
    MAP_CLUSTER_V6_HASH,
    MAP_LOCAL_V4_HASH,
    MAP_LOCAL_V6_HASH,
    MAP_PREFIX_LENS,
    MAP_STATS,
    MAP_PEER_HOSTS_V4,
    MAP_PEER_HOSTS_V6,
];

/// The maps the agent derives from the others (the hash indexes and their prefix lengths): it
/// rebuilds them from the tries at every load, so a pin of another shape is replaced, never refused.
pub const DERIVED_MAP_NAMES: [&str; 7] = [
    MAP_REMOTE_V4_HASH,
    MAP_REMOTE_V6_HASH,
    MAP_CLUSTER_V4_HASH,
    MAP_CLUSTER_V6_HASH,
    MAP_LOCAL_V4_HASH,
    MAP_LOCAL_V6_HASH,
    MAP_PREFIX_LENS,
];

/// Capacity of each `REMOTE_*` trie: one entry per remote pod CIDR. 16k covers clusters far beyond
/// the 5k-node Kubernetes limit with a few CIDRs per node; LPM tries are not preallocated, so unused
/// capacity costs no memory.
pub const REMOTE_MAX_ENTRIES: u32 = 16_384;
/// Capacity of each `CLUSTER_*` trie: like `REMOTE_*`, one entry per pod CIDR of another node.
pub const CLUSTER_MAX_ENTRIES: u32 = 16_384;
/// Capacity of each `PEER_HOSTS_*` hash: one entry per host address of another node, as many as
/// there can be remote pod CIDRs. Created with `BPF_F_NO_PREALLOC`, so unused capacity costs no
/// memory.
pub const PEER_HOSTS_MAX_ENTRIES: u32 = REMOTE_MAX_ENTRIES;
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
/// Value stored for every CIDR in the tries and every address in the `PEER_HOSTS_*` hashes (whose
/// keys are a bare [`Ipv4Key`] / [`Ipv6Key`]). The programs only test for presence.
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
    /// Packets from pods whose destination is a remote pod CIDR or another node's host address
    /// (`PEER_HOSTS_*`), marked for the tunnel.
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

/// Key of the `*_HASH` maps (IPv4): the CIDR's prefix length and its network address (host bits
/// zero). Same bytes as the trie key: `u32` host order, then the address in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixKeyV4 {
    /// Prefix length, 0..=32.
    pub prefix_len: u32,
    /// Network address, network byte order.
    pub addr: Ipv4Key,
}

/// Key of the `*_HASH` maps (IPv6), like [`PrefixKeyV4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixKeyV6 {
    /// Prefix length, 0..=128.
    pub prefix_len: u32,
    /// Network address, network byte order.
    pub addr: Ipv6Key,
}

// SAFETY: `#[repr(C)]`, a `u32` followed by bytes: no padding (sizes 8 and 20, alignment 4), no
// pointers, every bit pattern valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PrefixKeyV4 {}
// SAFETY: as for `PrefixKeyV4`.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PrefixKeyV6 {}

/// Size in bytes of [`PrefixKeyV4`].
pub const PREFIX_KEY_V4_SIZE: u32 = core::mem::size_of::<PrefixKeyV4>() as u32;
/// Size in bytes of [`PrefixKeyV6`].
pub const PREFIX_KEY_V6_SIZE: u32 = core::mem::size_of::<PrefixKeyV6>() as u32;

/// The `PREFIX_LENS` record of one CIDR set: which prefix lengths its `*_HASH` map holds, so that
/// a lookup costs one hash probe per length in use (Kubernetes pod CIDRs usually share one length)
/// instead of a trie walk that grows with the map.
///
/// One `u64` per set, written by the agent with a single atomic store through an mmap of the array
/// (a program never sees half an update) and read by the programs with a single load:
/// * byte 7 ([`MODE_SHIFT`]): [`MODE_TRIE`] (0, also a record never written) or [`MODE_HASHED`];
/// * bytes 0..7, hashed mode only: prefix length + 1 of each length in use, longest first, 0 ends
///   the list. Probing longest first, the first hit is the longest match.
///
/// With more distinct lengths than [`MAX_HASHED`] the agent writes [`MODE_TRIE`] and the programs
/// use the LPM trie, which the agent keeps complete in every mode; so correctness never depends on
/// the bound, only the cost does.
pub mod prefix_lens {
    /// Index of the `REMOTE_V4` record.
    pub const REMOTE_V4: u32 = 0;
    /// Index of the `REMOTE_V6` record.
    pub const REMOTE_V6: u32 = 1;
    /// Index of the `CLUSTER_V4` record.
    pub const CLUSTER_V4: u32 = 2;
    /// Index of the `CLUSTER_V6` record.
    pub const CLUSTER_V6: u32 = 3;
    /// Index of the `LOCAL_V4` record.
    pub const LOCAL_V4: u32 = 4;
    /// Index of the `LOCAL_V6` record.
    pub const LOCAL_V6: u32 = 5;
    /// Number of records (the map's capacity).
    pub const SETS: u32 = 6;
    /// Bit position of the mode byte.
    pub const MODE_SHIFT: u32 = 56;
    /// Mode: look up in the LPM trie (also what an unwritten, all-zero record means).
    pub const MODE_TRIE: u64 = 0;
    /// Mode: probe the hash once per listed prefix length.
    pub const MODE_HASHED: u64 = 1;
    /// Length slots in a record (bytes 0..7).
    pub const SLOTS: u32 = 7;
    /// Most distinct prefix lengths the agent serves from the hash; beyond, the trie is cheaper
    /// than that many probes for an address that matches nothing.
    pub const MAX_HASHED: usize = 4;
    /// `BPF_F_MMAPABLE`: the agent maps the array to publish records atomically.
    pub const MAP_FLAGS: u32 = 1 << 10;
}

/// The value of `STATS`: every counter slot (see [`counter`]) in one per-CPU record, so a packet
/// costs one map lookup however many counters it moves.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Indexed by the constants in [`counter`].
    pub slots: [u64; COUNTER_SLOTS as usize],
}

// SAFETY: `#[repr(C)]` array of `u64`s: no padding, no pointers, every bit pattern valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Stats {}

/// Size in bytes of [`Stats`] (the `STATS` map's value size).
pub const STATS_SIZE: u32 = core::mem::size_of::<Stats>() as u32;
/// `STATS` holds one record, at index 0.
pub const STATS_INDEX: u32 = 0;

const _: () = assert!(PREFIX_KEY_V4_SIZE == 8);
const _: () = assert!(PREFIX_KEY_V6_SIZE == 20);
const _: () = assert!(prefix_lens::MAX_HASHED <= prefix_lens::SLOTS as usize);

/// Slot indices must fit the map.
const _: () = assert!(counter::USED <= COUNTER_SLOTS);
/// `Config` must stay 16 bytes: it is the pinned `CONFIG` map's value size.
const _: () = assert!(CONFIG_SIZE == 16);
