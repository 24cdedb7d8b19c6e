//! wgmesh's TC programs: steer pod traffic bound for other nodes into WireGuard, and guard the
//! uplink against plaintext pod traffic.
//!
//! * `wgmesh_steer` (ingress of every host-side pod veth): if the destination is in a remote
//!   node's pod CIDR, set the wgmesh bits of `skb->mark`; the agent's policy rule
//!   `fwmark/fwmask -> table T` then routes the packet into the WireGuard device. Marking instead of
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
//!      WireGuard UDP, which carries node addresses.
//!
//! Neither program ends the TC chain on a pass: they return `TC_ACT_UNSPEC` (TCX: `TCX_NEXT`) so
//! programs of the CNI on the same hook still run. `TC_ACT_OK` would skip them — on TCX kernels it
//! even skips every legacy `tc filter` on the device. The only verdicts that end the chain are the
//! guard's redirect and its strict-mode drop.
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
    maps::{Array, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::TcContext,
};
use wgmesh_ebpf_common::{
    CLUSTER_MAX_ENTRIES, CONFIG_ENTRIES, CONFIG_INDEX, COUNTER_SLOTS, CidrValue, Config, Ipv4Key,
    Ipv6Key, LOCAL_MAX_ENTRIES, REMOTE_MAX_ENTRIES, counter,
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

/// Pod CIDRs of other nodes we have a WireGuard peer for (IPv4). Written by the agent, pinned so
/// it survives restarts.
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
/// `CONFIG[CONFIG_INDEX]`: fwmark/fwmask/strict/tunnel_ifindex, written by the agent before it
/// attaches (and `tunnel_ifindex` again whenever the WireGuard device is re-created).
#[map]
static CONFIG: Array<Config> = Array::pinned(CONFIG_ENTRIES, 0);
/// Per-CPU counters (no atomic read-modify-write exists on the BPF target).
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

/// The destination of a parsed frame (both programs decide on the destination alone).
enum Packet {
    V4 { src: Ipv4Key, dst: Ipv4Key },
    V6 { src: Ipv6Key, dst: Ipv6Key },
    NonIp,
}

/// A frame shorter than the header its EtherType announces.
struct Malformed;

#[inline(always)]
fn parse(ctx: &TcContext) -> Result<Packet, Malformed> {
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

#[inline(always)]
fn bump(slot: u32, by: u64) {
    if let Some(value) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup, so it points at this
        // CPU's u64 for `slot`; BPF programs do not migrate between CPUs while running, so no other
        // writer touches this CPU's copy concurrently.
        unsafe { *value += by }
    }
}

#[inline(always)]
fn host_key_v4(addr: Ipv4Key) -> Key<Ipv4Key> {
    Key::new(32, addr)
}

#[inline(always)]
fn host_key_v6(addr: Ipv6Key) -> Key<Ipv6Key> {
    Key::new(128, addr)
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

/// TC ingress of a host-side pod veth: mark traffic bound for remote pod CIDRs. Never drops.
#[classifier]
pub fn wgmesh_steer(ctx: TcContext) -> i32 {
    match try_steer(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[inline(always)]
fn try_steer(ctx: &TcContext) -> Result<i32, i32> {
    let packet = parse(ctx).map_err(|Malformed| {
        bump(counter::MALFORMED, 1);
        ON_MALFORMED
    })?;
    let (remote, local) = match packet {
        Packet::V4 { dst, .. } => {
            let remote = REMOTE_V4.get(host_key_v4(dst)).is_some();
            (remote, !remote && LOCAL_V4.get(host_key_v4(dst)).is_some())
        }
        Packet::V6 { dst, .. } => {
            let remote = REMOTE_V6.get(host_key_v6(dst)).is_some();
            (remote, !remote && LOCAL_V6.get(host_key_v6(dst)).is_some())
        }
        Packet::NonIp => {
            bump(counter::NON_IP, 1);
            return Ok(TC_NEXT);
        }
    };
    if remote && set_steer_mark(ctx) {
        bump(counter::STEERED_PACKETS, 1);
        bump(counter::STEERED_BYTES, u64::from(ctx.len()));
    } else if local {
        bump(counter::LOCAL, 1);
    } else {
        bump(counter::PASSED, 1);
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
        bump(counter::MALFORMED, 1);
        ON_MALFORMED
    })?;
    // A peered node's pod CIDR is by definition a cluster pod CIDR: it counts as one even if the
    // agent has not put it into CLUSTER_* (yet), so it can never pass silently.
    // Only pod-originated packets are rescued: the peer accepts a decrypted packet only from a
    // source inside this node's allowed IPs (its pod CIDRs), and the replies to the node's own
    // address would not come back through the tunnel. Node-originated plaintext is counted.
    let (remote, cluster, from_pod) = match packet {
        Packet::V4 { src, dst } => {
            let remote = REMOTE_V4.get(host_key_v4(dst)).is_some();
            let cluster = remote || CLUSTER_V4.get(host_key_v4(dst)).is_some();
            (
                remote,
                cluster,
                cluster && LOCAL_V4.get(host_key_v4(src)).is_some(),
            )
        }
        Packet::V6 { src, dst } => {
            let remote = REMOTE_V6.get(host_key_v6(dst)).is_some();
            let cluster = remote || CLUSTER_V6.get(host_key_v6(dst)).is_some();
            (
                remote,
                cluster,
                cluster && LOCAL_V6.get(host_key_v6(src)).is_some(),
            )
        }
        Packet::NonIp => (false, false, false),
    };
    if !cluster {
        bump(counter::UPLINK_PASSED, 1);
        return Ok(TC_NEXT);
    }
    let config = CONFIG.get(CONFIG_INDEX);
    if remote
        && from_pod
        && let Some(ifindex) = config.map(|config| config.tunnel_ifindex)
        && ifindex != 0
    {
        bump(counter::RESCUED, 1);
        // SAFETY: a plain helper call; it only records the target in per-CPU redirect state
        // and returns TC_ACT_REDIRECT (TC_ACT_SHOT for invalid flags, which 0 is not). An
        // ifindex with no device behind it makes the kernel drop the packet: fail closed.
        let verdict = unsafe { bpf_redirect(ifindex, REDIRECT_EGRESS) };
        // TC_ACT_REDIRECT (7) or TC_ACT_SHOT (2): always fits.
        return Ok(verdict as i32);
    }
    bump(counter::LEAKED, 1);
    if config.is_some_and(|config| config.strict != 0) {
        bump(counter::DROPPED_STRICT, 1);
        return Ok(TC_DROP);
    }
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
