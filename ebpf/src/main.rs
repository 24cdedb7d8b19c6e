//! wgmesh's TC programs: steer pod traffic bound for other nodes into WireGuard, and guard the
//! uplink against plaintext pod traffic.
//!
//! * `wgmesh_steer` (ingress of every host-side pod veth): if the destination is in a remote
//!   node's pod CIDR (`REMOTE_*`) or, failing that, is one of the other nodes' own host addresses
//!   (`PEER_HOSTS_*`, an exact match: one hash probe, only when `REMOTE_*` missed), set the
//!   wgmesh bits of `skb->mark`; the agent's policy rule `fwmark/fwmask -> table T` then routes
//!   the packet into the WireGuard device. Both count as steered. Marking instead of
//!   `bpf_redirect` keeps the kernel's forwarding path (PMTU, ICMP errors, netfilter) intact.
//! * `wgmesh_guard` (egress of the uplink), the backstop for everything that never crossed a
//!   steered veth — a pod's first packets sent before the agent attached `wgmesh_steer` to its new
//!   veth, and traffic the node itself originates (NodePort → remote pod, host-network
//!   processes). By destination:
//!   1. in `REMOTE_*` (a peered node's pod CIDR) and `CONFIG.tunnel_ifindex` known:
//!      `bpf_redirect` to egress of the WireGuard device (an L3 device: the kernel strips the
//!      Ethernet header), counted as rescued. It never leaves in the clear; if the device is gone
//!      the kernel drops the packet.
//!   2. else in `CLUSTER_*` or `REMOTE_*` (another node's pod CIDR we cannot encrypt to): counted
//!      as leaked, dropped in strict mode.
//!   3. anything else passes: pods talking to the internet, node traffic, and the encrypted
//!      WireGuard UDP, which carries node addresses. The guard never reads `PEER_HOSTS_*`:
//!      traffic to another node's host address is node-to-node traffic (WireGuard's own UDP among
//!      it), which must leave through the uplink untouched and is never counted as leaked.
//!
//! Neither program ends the TC chain on a pass: they return `TC_ACT_UNSPEC` (TCX: `TCX_NEXT`) so
//! programs of the CNI on the same hook still run. `TC_ACT_OK` would skip them — on TCX kernels it
//! even skips every legacy `tc filter` on the device. The only verdicts that end the chain are the
//! guard's redirect and its strict-mode drop.
//!
//! Cost per packet (see `bench/RESULTS.md`): headers are read straight from the packet when they
//! are in the linear area (else through `bpf_skb_load_bytes`), a CIDR set is probed in its hash
//! index once per prefix length in use (usually one), so the cost does not grow with the number
//! of CIDRs (the LPM trie is the fallback for sets with many lengths), the peer host addresses
//! cost one more hash probe for steer packets that miss `REMOTE_*` (none for those that hit),
//! and all counters of a packet are one per-CPU lookup.
//!
//! Only untagged Ethernet frames are parsed (pod veths and uplinks carry no VLAN tags here); every
//! other frame is counted and left alone. These programs must never drop outside strict mode (the
//! kernel dropping a packet redirected to a tunnel device that has since vanished is the one
//! exception, on purpose: it must not leave in the clear instead).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_redirect,
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::TcContext,
};
use wgmesh_ebpf_common::{
    CLUSTER_MAX_ENTRIES, CONFIG_ENTRIES, CONFIG_INDEX, COUNTER_SLOTS, CidrValue, Config, Ipv4Key,
    Ipv6Key, LOCAL_MAX_ENTRIES, PEER_HOSTS_MAX_ENTRIES, PrefixKeyV4, PrefixKeyV6,
    REMOTE_MAX_ENTRIES, STATS_INDEX, Stats, counter, prefix_lens,
};

/// Pass the packet on and let the next TC program/filter on the hook run.
const TC_NEXT: i32 = TC_ACT_UNSPEC;
/// Drop the packet (guard, strict mode only).
#[allow(
    clippy::unnecessary_cast,
    reason = "u32 in the x86_64 bindings aya-build selects, i32 in the generic ones"
)]
const TC_DROP: i32 = TC_ACT_SHOT as i32;
/// Verdict for frames too short for the header their EtherType announces. Fail open: such a frame
/// cannot be parsed, so it cannot be shown to be pod traffic, and the steer program must never
/// drop; the kernel's own IP input drops truncated packets anyway.
const ON_MALFORMED: i32 = TC_NEXT;

const ETH_HLEN: usize = 14;
const ETH_TYPE_OFFSET: usize = 12;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPV4_SRC_OFFSET: usize = ETH_HLEN + 12;
const IPV4_DST_OFFSET: usize = ETH_HLEN + 16;
const IPV6_SRC_OFFSET: usize = ETH_HLEN + 8;
const IPV6_DST_OFFSET: usize = ETH_HLEN + 24;
/// `bpf_redirect` flags: 0 = egress of the target device.
const REDIRECT_EGRESS: u64 = 0;
/// Hash maps allocate entries on insert, like the tries: unused capacity costs no memory.
const BPF_F_NO_PREALLOC: u32 = 1;

/// Pod CIDRs of other nodes we have a WireGuard peer for (IPv4). Written by the agent, pinned so
/// it survives restarts. The source of truth the hash index is derived from, and the lookup used
/// when the set has more prefix lengths than the index serves (see `prefix_lens`).
#[map]
static REMOTE_V4: LpmTrie<Ipv4Key, CidrValue> = LpmTrie::pinned(REMOTE_MAX_ENTRIES, 0);
/// Pod CIDRs of other nodes we have a WireGuard peer for (IPv6).
#[map]
static REMOTE_V6: LpmTrie<Ipv6Key, CidrValue> = LpmTrie::pinned(REMOTE_MAX_ENTRIES, 0);
/// Pod CIDRs of all other nodes of the cluster, peered or not (IPv4); only the guard reads it.
#[map]
static CLUSTER_V4: LpmTrie<Ipv4Key, CidrValue> = LpmTrie::pinned(CLUSTER_MAX_ENTRIES, 0);
/// Pod CIDRs of all other nodes of the cluster (IPv6).
#[map]
static CLUSTER_V6: LpmTrie<Ipv6Key, CidrValue> = LpmTrie::pinned(CLUSTER_MAX_ENTRIES, 0);
/// This node's pod CIDRs (IPv4).
#[map]
static LOCAL_V4: LpmTrie<Ipv4Key, CidrValue> = LpmTrie::pinned(LOCAL_MAX_ENTRIES, 0);
/// This node's pod CIDRs (IPv6).
#[map]
static LOCAL_V6: LpmTrie<Ipv6Key, CidrValue> = LpmTrie::pinned(LOCAL_MAX_ENTRIES, 0);
/// The same CIDRs keyed by (prefix length, network): one probe per prefix length in use.
#[map]
static REMOTE_V4_HASH: HashMap<PrefixKeyV4, CidrValue> =
    HashMap::pinned(REMOTE_MAX_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
static REMOTE_V6_HASH: HashMap<PrefixKeyV6, CidrValue> =
    HashMap::pinned(REMOTE_MAX_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
static CLUSTER_V4_HASH: HashMap<PrefixKeyV4, CidrValue> =
    HashMap::pinned(CLUSTER_MAX_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
static CLUSTER_V6_HASH: HashMap<PrefixKeyV6, CidrValue> =
    HashMap::pinned(CLUSTER_MAX_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
static LOCAL_V4_HASH: HashMap<PrefixKeyV4, CidrValue> =
    HashMap::pinned(LOCAL_MAX_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
static LOCAL_V6_HASH: HashMap<PrefixKeyV6, CidrValue> =
    HashMap::pinned(LOCAL_MAX_ENTRIES, BPF_F_NO_PREALLOC);
/// Other nodes' own host addresses (IPv4), exact match: pod traffic to them is steered like
/// traffic to `REMOTE_*`. Written by the agent, pinned; only the steer program reads it.
#[map]
static PEER_HOSTS_V4: HashMap<Ipv4Key, CidrValue> =
    HashMap::pinned(PEER_HOSTS_MAX_ENTRIES, BPF_F_NO_PREALLOC);
/// Other nodes' own host addresses (IPv6), exact match.
#[map]
static PEER_HOSTS_V6: HashMap<Ipv6Key, CidrValue> =
    HashMap::pinned(PEER_HOSTS_MAX_ENTRIES, BPF_F_NO_PREALLOC);
/// Per CIDR set, the prefix lengths its hash holds or "use the trie" (`prefix_lens`).
#[map]
static PREFIX_LENS: Array<u64> = Array::pinned(prefix_lens::SETS, prefix_lens::MAP_FLAGS);
/// `CONFIG[CONFIG_INDEX]`: fwmark/fwmask/strict/tunnel_ifindex, written by the agent before it
/// attaches (and `tunnel_ifindex` again whenever the WireGuard device is re-created).
#[map]
static CONFIG: Array<Config> = Array::pinned(CONFIG_ENTRIES, 0);
/// Per-CPU counters of earlier builds, one map entry per counter. Not written any more (a packet
/// would cost a lookup per counter); kept so that the totals they hold still count.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);
/// Per-CPU counters, all in one record: one lookup per packet.
#[map]
static STATS: PerCpuArray<Stats> = PerCpuArray::pinned(1, 0);

/// One CIDR set as the programs see it: the hash index, its prefix-length record, and the trie.
struct CidrSet<K: 'static, A: 'static> {
    hash: &'static HashMap<K, CidrValue>,
    trie: &'static LpmTrie<A, CidrValue>,
    lens: u32,
}

const REMOTE4: CidrSet<PrefixKeyV4, Ipv4Key> = CidrSet {
    hash: &REMOTE_V4_HASH,
    trie: &REMOTE_V4,
    lens: prefix_lens::REMOTE_V4,
};
const REMOTE6: CidrSet<PrefixKeyV6, Ipv6Key> = CidrSet {
    hash: &REMOTE_V6_HASH,
    trie: &REMOTE_V6,
    lens: prefix_lens::REMOTE_V6,
};
const CLUSTER4: CidrSet<PrefixKeyV4, Ipv4Key> = CidrSet {
    hash: &CLUSTER_V4_HASH,
    trie: &CLUSTER_V4,
    lens: prefix_lens::CLUSTER_V4,
};
const CLUSTER6: CidrSet<PrefixKeyV6, Ipv6Key> = CidrSet {
    hash: &CLUSTER_V6_HASH,
    trie: &CLUSTER_V6,
    lens: prefix_lens::CLUSTER_V6,
};
const LOCAL4: CidrSet<PrefixKeyV4, Ipv4Key> = CidrSet {
    hash: &LOCAL_V4_HASH,
    trie: &LOCAL_V4,
    lens: prefix_lens::LOCAL_V4,
};
const LOCAL6: CidrSet<PrefixKeyV6, Ipv6Key> = CidrSet {
    hash: &LOCAL_V6_HASH,
    trie: &LOCAL_V6,
    lens: prefix_lens::LOCAL_V6,
};

/// The prefix-length record of a set, read with one 8-byte load (the agent stores it atomically),
/// or `None` when the set must be looked up in its trie.
#[inline(always)]
fn hashed_lens(index: u32) -> Option<u64> {
    let record = PREFIX_LENS.get_ptr(index)?;
    // SAFETY: the pointer comes from a successful array lookup and points at an aligned u64 that
    // lives as long as the map; a volatile read makes it exactly one load, so it sees either the
    // old or the new record, never a mix.
    let record = unsafe { core::ptr::read_volatile(record) };
    (record >> prefix_lens::MODE_SHIFT == prefix_lens::MODE_HASHED).then_some(record)
}

/// `addr` with the bits past `len` cleared; `None` for a length past 32 (a corrupt record).
#[inline(always)]
fn mask_v4(addr: u32, len: u32) -> Option<u32> {
    match len {
        0 => Some(0),
        1..=32 => Some(addr & (u32::MAX << (32 - len))),
        _ => None,
    }
}

/// A 64-bit half of an IPv6 address with the bits past `len` (0..=64) of that half cleared.
#[inline(always)]
fn mask_half(half: u64, len: u32) -> u64 {
    match len {
        0 => 0,
        1..=63 => half & (u64::MAX << (64 - len)),
        _ => half,
    }
}

/// Whether an IPv4 address is in a set: longest prefix first through the hash, or the trie.
#[inline(always)]
fn contains_v4(set: &CidrSet<PrefixKeyV4, Ipv4Key>, addr: Ipv4Key) -> bool {
    let Some(record) = hashed_lens(set.lens) else {
        return set.trie.get(Key::new(32, addr)).is_some();
    };
    let host = u32::from_be_bytes(addr);
    for slot in 0..prefix_lens::SLOTS {
        let entry = ((record >> (slot * 8)) & 0xff) as u32;
        if entry == 0 {
            return false;
        }
        let len = entry - 1;
        let Some(network) = mask_v4(host, len) else {
            return set.trie.get(Key::new(32, addr)).is_some();
        };
        let key = PrefixKeyV4 {
            prefix_len: len,
            addr: network.to_be_bytes(),
        };
        if set.hash.get_ptr(&key).is_some() {
            return true;
        }
    }
    false
}

/// Whether an IPv6 address is in a set, like [`contains_v4`].
#[inline(always)]
fn contains_v6(set: &CidrSet<PrefixKeyV6, Ipv6Key>, addr: Ipv6Key) -> bool {
    let Some(record) = hashed_lens(set.lens) else {
        return set.trie.get(Key::new(128, addr)).is_some();
    };
    let mut high = [0u8; 8];
    let mut low = [0u8; 8];
    high.copy_from_slice(&addr[..8]);
    low.copy_from_slice(&addr[8..]);
    let (high, low) = (u64::from_be_bytes(high), u64::from_be_bytes(low));
    for slot in 0..prefix_lens::SLOTS {
        let entry = ((record >> (slot * 8)) & 0xff) as u32;
        if entry == 0 {
            return false;
        }
        let len = entry - 1;
        if len > 128 {
            return set.trie.get(Key::new(128, addr)).is_some();
        }
        let (h, l) = if len <= 64 {
            (mask_half(high, len), 0)
        } else {
            (high, mask_half(low, len - 64))
        };
        let mut network = [0u8; 16];
        network[..8].copy_from_slice(&h.to_be_bytes());
        network[8..].copy_from_slice(&l.to_be_bytes());
        let key = PrefixKeyV6 {
            prefix_len: len,
            addr: network,
        };
        if set.hash.get_ptr(&key).is_some() {
            return true;
        }
    }
    false
}

/// Whether an IPv4 address is one of the other nodes' host addresses (one hash probe).
#[inline(always)]
fn is_peer_host_v4(addr: Ipv4Key) -> bool {
    PEER_HOSTS_V4.get_ptr(&addr).is_some()
}

/// Whether an IPv6 address is one of the other nodes' host addresses (one hash probe).
#[inline(always)]
fn is_peer_host_v6(addr: Ipv6Key) -> bool {
    PEER_HOSTS_V6.get_ptr(&addr).is_some()
}

/// The addresses of a parsed frame.
enum Packet {
    V4 { src: Ipv4Key, dst: Ipv4Key },
    V6 { src: Ipv6Key, dst: Ipv6Key },
    NonIp,
}

/// A frame shorter than the header its EtherType announces.
struct Malformed;

/// Reads the addresses straight from the packet when its headers are in the linear area (pod
/// veths and uplinks deliver them there); otherwise, or for a frame that is simply too short,
/// through `bpf_skb_load_bytes` ([`parse_slow`]), which reads non-linear data too and reports
/// truncation. So every frame gets the same verdict either way.
#[inline(always)]
fn parse(ctx: &TcContext) -> Result<Packet, Malformed> {
    let data = ctx.data();
    let end = ctx.data_end();
    if data + ETH_HLEN > end {
        return parse_slow(ctx);
    }
    // SAFETY (all reads below): each range was checked to lie inside [data, data_end), the
    // packet bytes the kernel lets the program read directly; byte arrays have no alignment.
    let ethertype = u16::from_be_bytes(unsafe { *((data + ETH_TYPE_OFFSET) as *const [u8; 2]) });
    match ethertype {
        ETH_P_IP => {
            if data + IPV4_DST_OFFSET + 4 > end {
                return parse_slow(ctx);
            }
            Ok(Packet::V4 {
                src: unsafe { *((data + IPV4_SRC_OFFSET) as *const Ipv4Key) },
                dst: unsafe { *((data + IPV4_DST_OFFSET) as *const Ipv4Key) },
            })
        }
        ETH_P_IPV6 => {
            if data + IPV6_DST_OFFSET + 16 > end {
                return parse_slow(ctx);
            }
            Ok(Packet::V6 {
                src: unsafe { *((data + IPV6_SRC_OFFSET) as *const Ipv6Key) },
                dst: unsafe { *((data + IPV6_DST_OFFSET) as *const Ipv6Key) },
            })
        }
        _ => Ok(Packet::NonIp),
    }
}

/// [`parse`] through `bpf_skb_load_bytes`: for headers outside the linear area, and to tell a
/// truncated frame (malformed) from one that is merely not linear.
#[inline(never)]
fn parse_slow(ctx: &TcContext) -> Result<Packet, Malformed> {
    let ethertype = u16::from_be(ctx.load::<u16>(ETH_TYPE_OFFSET).map_err(|_| Malformed)?);
    match ethertype {
        ETH_P_IP => Ok(Packet::V4 {
            src: ctx.load(IPV4_SRC_OFFSET).map_err(|_| Malformed)?,
            dst: ctx.load(IPV4_DST_OFFSET).map_err(|_| Malformed)?,
        }),
        ETH_P_IPV6 => Ok(Packet::V6 {
            src: ctx.load(IPV6_SRC_OFFSET).map_err(|_| Malformed)?,
            dst: ctx.load(IPV6_DST_OFFSET).map_err(|_| Malformed)?,
        }),
        _ => Ok(Packet::NonIp),
    }
}

/// Adds 1 to counter `slot` and `bytes` to counter `bytes_slot` (if any): the packet's only
/// counter update, one per-CPU lookup.
#[inline(always)]
fn count(slot: u32, bytes: Option<(u32, u64)>) {
    let Some(stats) = STATS.get_ptr_mut(STATS_INDEX) else {
        return;
    };
    // SAFETY: the pointer comes from a successful per-CPU array lookup, so it points at this
    // CPU's record; BPF programs do not migrate between CPUs while running, so no other writer
    // touches this CPU's copy concurrently.
    let slots = unsafe { &mut (*stats).slots };
    if let Some(counter) = slots.get_mut(slot as usize) {
        *counter += 1;
    }
    if let Some((bytes_slot, by)) = bytes
        && let Some(counter) = slots.get_mut(bytes_slot as usize)
    {
        *counter += by;
    }
}

/// Sets the wgmesh bits of `skb->mark`, keeping every bit outside `fwmask` (kube-proxy's 0x4000,
/// the CNI's bits, ...). Returns false if the agent has not configured a mask yet.
#[inline(always)]
fn set_steer_mark(ctx: &TcContext) -> bool {
    let Some(config) = CONFIG.get(CONFIG_INDEX) else {
        return false;
    };
    if config.fwmask == 0 {
        return false;
    }
    // SAFETY: `ctx.skb.skb` is the `__sk_buff` context pointer the kernel passed to this program,
    // valid for the whole run; TC programs may read `mark` directly from it.
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark((mark & !config.fwmask) | (config.fwmark & config.fwmask));
    true
}

/// TC ingress of a host-side pod veth: mark traffic bound for remote pod CIDRs and other nodes'
/// host addresses. Never drops.
#[classifier]
pub fn wgmesh_steer(ctx: TcContext) -> i32 {
    match try_steer(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[inline(always)]
fn try_steer(ctx: &TcContext) -> Result<i32, i32> {
    let packet = parse(ctx).map_err(|Malformed| {
        count(counter::MALFORMED, None);
        ON_MALFORMED
    })?;
    let (remote, local) = match packet {
        // A peer host address is probed only when REMOTE missed: a remote pod's packet costs
        // what it did before.
        Packet::V4 { dst, .. } => {
            let remote = contains_v4(&REMOTE4, dst) || is_peer_host_v4(dst);
            (remote, !remote && contains_v4(&LOCAL4, dst))
        }
        Packet::V6 { dst, .. } => {
            let remote = contains_v6(&REMOTE6, dst) || is_peer_host_v6(dst);
            (remote, !remote && contains_v6(&LOCAL6, dst))
        }
        Packet::NonIp => {
            count(counter::NON_IP, None);
            return Ok(TC_NEXT);
        }
    };
    if remote && set_steer_mark(ctx) {
        count(
            counter::STEERED_PACKETS,
            Some((counter::STEERED_BYTES, u64::from(ctx.len()))),
        );
    } else if local {
        count(counter::LOCAL, None);
    } else {
        count(counter::PASSED, None);
    }
    Ok(TC_NEXT)
}

/// TC egress of the uplink: the backstop for traffic that bypassed steering. Redirects what is
/// bound for a peered node's pods into the WireGuard device, counts (in strict mode drops)
/// plaintext for other nodes' pods, passes the rest. See the crate docs for why.
#[classifier]
pub fn wgmesh_guard(ctx: TcContext) -> i32 {
    match try_guard(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[inline(always)]
fn try_guard(ctx: &TcContext) -> Result<i32, i32> {
    let packet = parse(ctx).map_err(|Malformed| {
        count(counter::MALFORMED, None);
        ON_MALFORMED
    })?;
    // A peered node's pod CIDR is by definition a cluster pod CIDR: it counts as one even if the
    // agent has not put it into CLUSTER_* (yet), so it can never pass silently.
    // Only pod-originated packets are rescued: the peer accepts a decrypted packet only from a
    // source inside this node's allowed IPs (its pod CIDRs), and the replies to the node's own
    // address would not come back through the tunnel. Node-originated plaintext is counted.
    let (remote, cluster, from_pod) = match packet {
        Packet::V4 { src, dst } => {
            let remote = contains_v4(&REMOTE4, dst);
            let cluster = remote || contains_v4(&CLUSTER4, dst);
            (remote, cluster, cluster && contains_v4(&LOCAL4, src))
        }
        Packet::V6 { src, dst } => {
            let remote = contains_v6(&REMOTE6, dst);
            let cluster = remote || contains_v6(&CLUSTER6, dst);
            (remote, cluster, cluster && contains_v6(&LOCAL6, src))
        }
        Packet::NonIp => (false, false, false),
    };
    if !cluster {
        count(counter::UPLINK_PASSED, None);
        return Ok(TC_NEXT);
    }
    let config = CONFIG.get(CONFIG_INDEX);
    if remote
        && from_pod
        && let Some(ifindex) = config.map(|config| config.tunnel_ifindex)
        && ifindex != 0
    {
        count(counter::RESCUED, None);
        // SAFETY: a plain helper call; it only records the target in per-CPU redirect state
        // and returns TC_ACT_REDIRECT (TC_ACT_SHOT for invalid flags, which 0 is not). An
        // ifindex with no device behind it makes the kernel drop the packet: fail closed.
        let verdict = unsafe { bpf_redirect(ifindex, REDIRECT_EGRESS) };
        // TC_ACT_REDIRECT (7) or TC_ACT_SHOT (2): always fits.
        return Ok(verdict as i32);
    }
    if config.is_some_and(|config| config.strict != 0) {
        count(counter::LEAKED, Some((counter::DROPPED_STRICT, 1)));
        return Ok(TC_DROP);
    }
    count(counter::LEAKED, None);
    Ok(TC_NEXT)
}

/// Does nothing and lets the next program run: the baseline `wgmesh-bench` measures the other
/// programs against (`BPF_PROG_TEST_RUN` in the same run, so the test-run loop's own cost cancels).
/// Never attached by the agent.
#[classifier]
pub fn wgmesh_noop(_ctx: TcContext) -> i32 {
    TC_NEXT
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach this; it only satisfies the compiler.
    loop {}
}

/// GPL-compatible, so the kernel lets the programs call GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
