//! Packet surgery for the TUN offloads: the `virtio_net_hdr` that prefixes every TUN read and write
//! (`IFF_VNET_HDR`), splitting a TCP super-packet (TSO) into MTU-sized segments, finishing partial
//! checksums (`NEEDS_CSUM`), and the reverse: coalescing consecutive segments of one TCP flow into
//! one super-packet for the TUN write (what GRO would have done), so the receiving stack handles
//! one 64 KiB packet instead of forty.

use std::ops::Range;

/// Size of `struct virtio_net_hdr` (no `num_buffers`), the TUN default.
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the L4 checksum at `csum_start + csum_offset` holds only the
/// pseudo-header sum; the rest is to be computed.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: the checksum was verified already.
pub const F_DATA_VALID: u8 = 2;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_ECN: u8 = 0x80;

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;

/// Why a packet from the TUN could not be processed (it is dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("packet shorter than its headers")]
    Truncated,
    #[error("GSO type {0:#x} is not supported")]
    UnsupportedGso(u8),
    #[error("not a TCP packet over IPv4/IPv6 without extension headers")]
    NotTcp,
    #[error("not a UDP packet over IPv4/IPv6 without extension headers")]
    NotUdp,
    #[error("checksum start/offset outside the packet")]
    BadChecksumOffsets,
    #[error("GSO segment size is zero")]
    ZeroSegmentSize,
}

/// `struct virtio_net_hdr` in host byte order (legacy virtio on a little-endian host, as TUN uses).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b: &[u8; VNET_HDR_LEN] = b.get(..VNET_HDR_LEN)?.try_into().ok()?;
        Some(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16::from_ne_bytes([b[2], b[3]]),
            gso_size: u16::from_ne_bytes([b[4], b[5]]),
            csum_start: u16::from_ne_bytes([b[6], b[7]]),
            csum_offset: u16::from_ne_bytes([b[8], b[9]]),
        })
    }

    pub fn encode(&self, b: &mut [u8]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
    }
}

// === checksums ===

/// Adds `data` to a one's-complement accumulator. Pieces must have even lengths except the last.
pub fn checksum_add(mut sum: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_be_bytes(c.try_into().expect("chunk of 8"));
        sum += (w >> 32) + (w & 0xffff_ffff);
    }
    let rem = chunks.remainder();
    let mut tail = [0u8; 8];
    tail[..rem.len()].copy_from_slice(rem);
    let w = u64::from_be_bytes(tail);
    sum + (w >> 32) + (w & 0xffff_ffff)
}

/// Folds an accumulator to 16 bits (not complemented).
pub fn checksum_fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The pseudo-header sum for an L4 segment of `l4_len` bytes and protocol `proto` in `ip`.
fn pseudo_header_sum(ip: &[u8], proto: u8, l4_len: usize) -> u64 {
    if ip[0] >> 4 == 4 {
        checksum_add(0, &ip[12..20]) + u64::from(proto) + l4_len as u64
    } else {
        checksum_add(0, &ip[8..40]) + u64::from(proto) + l4_len as u64
    }
}

fn ipv4_header_checksum(ip: &mut [u8], ihl: usize) {
    ip[10] = 0;
    ip[11] = 0;
    let c = !checksum_fold(checksum_add(0, &ip[..ihl]));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Completes a `NEEDS_CSUM` packet in place: the field already holds the pseudo-header sum, so the
/// checksum is the complement of the sum from `csum_start` to the end.
pub fn finish_checksum(hdr: &VnetHdr, pkt: &mut [u8]) -> Result<(), OffloadError> {
    if hdr.flags & F_NEEDS_CSUM == 0 {
        return Ok(());
    }
    let start = usize::from(hdr.csum_start);
    let field = start + usize::from(hdr.csum_offset);
    if field + 2 > pkt.len() || start > pkt.len() {
        return Err(OffloadError::BadChecksumOffsets);
    }
    let c = !checksum_fold(checksum_add(0, &pkt[start..]));
    pkt[field..field + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// IP and TCP header lengths of a TCP packet (IPv4 with options, IPv6 without extension headers).
fn tcp_headers(pkt: &[u8]) -> Result<(usize, usize), OffloadError> {
    let ip_hlen = match pkt.first().map(|b| b >> 4) {
        Some(4) => {
            if pkt.len() < 20 {
                return Err(OffloadError::Truncated);
            }
            if pkt[9] != PROTO_TCP {
                return Err(OffloadError::NotTcp);
            }
            usize::from(pkt[0] & 0x0f) * 4
        }
        Some(6) => {
            if pkt.len() < 40 {
                return Err(OffloadError::Truncated);
            }
            if pkt[6] != PROTO_TCP {
                return Err(OffloadError::NotTcp);
            }
            40
        }
        _ => return Err(OffloadError::NotTcp),
    };
    if ip_hlen < 20 || pkt.len() < ip_hlen + 20 {
        return Err(OffloadError::Truncated);
    }
    let tcp_hlen = usize::from(pkt[ip_hlen + 12] >> 4) * 4;
    if tcp_hlen < 20 || pkt.len() < ip_hlen + tcp_hlen {
        return Err(OffloadError::Truncated);
    }
    Ok((ip_hlen, tcp_hlen))
}

// === impl split (TUN read side) ===

/// Splits a TCP super-packet (`gso_type` TCPV4/TCPV6) into segments of at most `gso_size` payload
/// bytes, appended to `out`; their ranges go to `segs`. Every segment gets its own IP total
/// length / payload length, IPv4 id (incremented) and header checksum, TCP sequence number and a
/// full TCP checksum; FIN and PSH stay only on the last segment, CWR only on the first.
pub fn gso_split(
    hdr: &VnetHdr,
    pkt: &[u8],
    out: &mut Vec<u8>,
    segs: &mut Vec<Range<usize>>,
) -> Result<(), OffloadError> {
    match hdr.gso_type & !GSO_ECN {
        GSO_TCPV4 | GSO_TCPV6 => {}
        GSO_UDP_L4 => return udp_split(hdr, pkt, out, segs),
        other => return Err(OffloadError::UnsupportedGso(other)),
    }
    let (ip_hlen, tcp_hlen) = tcp_headers(pkt)?;
    let mss = usize::from(hdr.gso_size);
    if mss == 0 {
        return Err(OffloadError::ZeroSegmentSize);
    }
    let hlen = ip_hlen + tcp_hlen;
    let payload = &pkt[hlen..];
    let n = payload.len().div_ceil(mss).max(1);
    let is_v4 = pkt[0] >> 4 == 4;
    let id0 = u16::from_be_bytes([pkt[4], pkt[5]]);
    let seq0 = u32::from_be_bytes(pkt[ip_hlen + 4..ip_hlen + 8].try_into().expect("4 bytes"));
    let flags0 = pkt[ip_hlen + 13];
    out.reserve(payload.len() + n * hlen);
    for i in 0..n {
        let chunk = &payload[(i * mss).min(payload.len())..((i + 1) * mss).min(payload.len())];
        let start = out.len();
        out.extend_from_slice(&pkt[..hlen]);
        out.extend_from_slice(chunk);
        let seg = &mut out[start..];
        let tcp_len = tcp_hlen + chunk.len();
        if is_v4 {
            seg[2..4].copy_from_slice(&((hlen + chunk.len()) as u16).to_be_bytes());
            seg[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
            ipv4_header_checksum(seg, ip_hlen);
        } else {
            seg[4..6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
        }
        let tcp = ip_hlen;
        let seq = seq0.wrapping_add((i * mss) as u32);
        seg[tcp + 4..tcp + 8].copy_from_slice(&seq.to_be_bytes());
        let mut flags = flags0;
        if i > 0 {
            flags &= !TCP_CWR;
        }
        if i + 1 < n {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        seg[tcp + 13] = flags;
        seg[tcp + 16] = 0;
        seg[tcp + 17] = 0;
        let sum = pseudo_header_sum(seg, PROTO_TCP, tcp_len) + checksum_add(0, &seg[tcp..]);
        let c = !checksum_fold(sum);
        seg[tcp + 16..tcp + 18].copy_from_slice(&c.to_be_bytes());
        segs.push(start..out.len());
    }
    Ok(())
}

/// Splits a UDP super-packet (USO, `GSO_UDP_L4`) into datagrams of `gso_size` payload bytes (the
/// last may be shorter), each with its own IP and UDP lengths, IPv4 id and checksums.
fn udp_split(
    hdr: &VnetHdr,
    pkt: &[u8],
    out: &mut Vec<u8>,
    segs: &mut Vec<Range<usize>>,
) -> Result<(), OffloadError> {
    let (min, proto_at, ip_hlen) = match pkt.first().map(|b| b >> 4) {
        Some(4) => (20, 9, usize::from(pkt[0] & 0x0f) * 4),
        Some(6) => (40, 6, 40),
        _ => return Err(OffloadError::NotUdp),
    };
    if pkt.len() < min {
        return Err(OffloadError::Truncated);
    }
    if pkt[proto_at] != PROTO_UDP {
        return Err(OffloadError::NotUdp);
    }
    let hlen = ip_hlen + 8;
    if ip_hlen < 20 || pkt.len() < hlen {
        return Err(OffloadError::Truncated);
    }
    let size = usize::from(hdr.gso_size);
    if size == 0 {
        return Err(OffloadError::ZeroSegmentSize);
    }
    let payload = &pkt[hlen..];
    let n = payload.len().div_ceil(size).max(1);
    let is_v4 = pkt[0] >> 4 == 4;
    let id0 = u16::from_be_bytes([pkt[4], pkt[5]]);
    out.reserve(payload.len() + n * hlen);
    for i in 0..n {
        let chunk = &payload[(i * size).min(payload.len())..((i + 1) * size).min(payload.len())];
        let start = out.len();
        out.extend_from_slice(&pkt[..hlen]);
        out.extend_from_slice(chunk);
        let seg = &mut out[start..];
        let udp_len = 8 + chunk.len();
        if is_v4 {
            seg[2..4].copy_from_slice(&((ip_hlen + udp_len) as u16).to_be_bytes());
            seg[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
            ipv4_header_checksum(seg, ip_hlen);
        } else {
            seg[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
        }
        seg[ip_hlen + 4..ip_hlen + 6].copy_from_slice(&(udp_len as u16).to_be_bytes());
        seg[ip_hlen + 6] = 0;
        seg[ip_hlen + 7] = 0;
        let sum = pseudo_header_sum(seg, PROTO_UDP, udp_len) + checksum_add(0, &seg[ip_hlen..]);
        // A computed 0 is sent as all ones (0 means "no checksum" in UDP over IPv4).
        let c = match !checksum_fold(sum) {
            0 => 0xffff,
            c => c,
        };
        seg[ip_hlen + 6..ip_hlen + 8].copy_from_slice(&c.to_be_bytes());
        segs.push(start..out.len());
    }
    Ok(())
}

// === impl coalesce (TUN write side) ===

/// A TCP packet that may be merged with the following ones of its flow.
#[derive(Debug, Clone, Copy)]
struct TcpInfo {
    ip_hlen: usize,
    tcp_hlen: usize,
    payload: usize,
    seq: u32,
    flags: u8,
}

fn coalescable(pkt: &[u8]) -> Option<TcpInfo> {
    let (ip_hlen, tcp_hlen) = tcp_headers(pkt).ok()?;
    if pkt[0] >> 4 == 4 {
        // No IP options, no fragments; total length must match what we got.
        if ip_hlen != 20 || u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff != 0 {
            return None;
        }
        if usize::from(u16::from_be_bytes([pkt[2], pkt[3]])) != pkt.len() {
            return None;
        }
    } else if usize::from(u16::from_be_bytes([pkt[4], pkt[5]])) + 40 != pkt.len() {
        return None;
    }
    let flags = pkt[ip_hlen + 13];
    // Only plain data segments: ACK, optionally PSH (ends a run).
    if flags & !(TCP_ACK | TCP_PSH) != 0 || flags & TCP_ACK == 0 {
        return None;
    }
    let payload = pkt.len() - ip_hlen - tcp_hlen;
    if payload == 0 {
        return None;
    }
    Some(TcpInfo {
        ip_hlen,
        tcp_hlen,
        payload,
        seq: u32::from_be_bytes(pkt[ip_hlen + 4..ip_hlen + 8].try_into().ok()?),
        flags,
    })
}

/// True when `next` continues `first`'s flow right after `prev` and carries identical headers
/// (the same rule as the kernel's tcp_gro_receive: everything but seq, checksums, lengths and the
/// IPv4 id equal; TCP options byte-for-byte equal).
fn same_flow(first: &[u8], fi: &TcpInfo, next: &[u8], ni: &TcpInfo) -> bool {
    if fi.ip_hlen != ni.ip_hlen || fi.tcp_hlen != ni.tcp_hlen {
        return false;
    }
    let ip = fi.ip_hlen;
    if first[0] >> 4 == 4 {
        // version/ihl, tos; flags/frag; ttl, proto; addresses
        if first[0..2] != next[0..2] || first[6..10] != next[6..10] || first[12..20] != next[12..20]
        {
            return false;
        }
    } else if first[0..4] != next[0..4] || first[6..40] != next[6..40] {
        return false;
    }
    // ports; ack; data offset; window; urgent pointer; options
    first[ip..ip + 4] == next[ip..ip + 4]
        && first[ip + 8..ip + 13] == next[ip + 8..ip + 13]
        && first[ip + 14..ip + 16] == next[ip + 14..ip + 16]
        && first[ip + 18..ip + fi.tcp_hlen] == next[ip + 18..ip + ni.tcp_hlen]
}

/// Maximum bytes of one coalesced IP packet.
const MAX_COALESCED: usize = 65535;

/// Groups packets for the TUN write: returns runs of indices into `pkts` (each run is written as
/// one packet; a run of one is written as it is). A run holds consecutive segments of one TCP flow
/// with equal payload sizes except a shorter last one, no flags but ACK (PSH only on the last).
pub fn coalesce_runs(pkts: &[&[u8]], runs: &mut Vec<Range<usize>>) {
    let mut i = 0;
    while i < pkts.len() {
        let start = i;
        i += 1;
        if let Some(fi) = coalescable(pkts[start]) {
            let hlen = fi.ip_hlen + fi.tcp_hlen;
            let mut total = pkts[start].len();
            let mut prev = fi;
            while i < pkts.len() && prev.flags & TCP_PSH == 0 && prev.payload == fi.payload {
                let Some(ni) = coalescable(pkts[i]) else {
                    break;
                };
                if ni.payload > fi.payload
                    || ni.seq != prev.seq.wrapping_add(prev.payload as u32)
                    || total + ni.payload > MAX_COALESCED
                    || !same_flow(pkts[start], &fi, pkts[i], &ni)
                {
                    break;
                }
                total += pkts[i].len() - hlen;
                prev = ni;
                i += 1;
            }
        }
        runs.push(start..i);
    }
}

/// Builds one GSO super-packet (with its vnet header) from a run found by [`coalesce_runs`] into
/// `out`: the first packet's headers with the total length, PSH from the last segment, and the TCP
/// checksum left as the pseudo-header sum for the kernel (`NEEDS_CSUM`).
pub fn build_coalesced(run: &[&[u8]], out: &mut Vec<u8>) {
    let first = run[0];
    let fi = coalescable(first).expect("run built by coalesce_runs");
    let hlen = fi.ip_hlen + fi.tcp_hlen;
    out.clear();
    out.resize(VNET_HDR_LEN, 0);
    out.extend_from_slice(&first[..hlen]);
    for p in run {
        out.extend_from_slice(&p[hlen..]);
    }
    let is_v4 = first[0] >> 4 == 4;
    let total = out.len() - VNET_HDR_LEN;
    let ip = &mut out[VNET_HDR_LEN..];
    if is_v4 {
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ipv4_header_checksum(ip, fi.ip_hlen);
    } else {
        ip[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
    }
    let last_flags = run[run.len() - 1][fi.ip_hlen + 13];
    ip[fi.ip_hlen + 13] = fi.flags | (last_flags & TCP_PSH);
    let tcp_len = total - fi.ip_hlen;
    let pseudo = checksum_fold(pseudo_header_sum(ip, PROTO_TCP, tcp_len));
    ip[fi.ip_hlen + 16..fi.ip_hlen + 18].copy_from_slice(&pseudo.to_be_bytes());
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: if is_v4 { GSO_TCPV4 } else { GSO_TCPV6 },
        hdr_len: hlen as u16,
        gso_size: fi.payload as u16,
        csum_start: fi.ip_hlen as u16,
        csum_offset: 16,
    };
    hdr.encode(&mut out[..VNET_HDR_LEN]);
}

#[cfg(test)]
mod tests;
