//! Classifying one captured underlay frame: WireGuard, plaintext pod traffic, or other.
//!
//! "Plaintext pod traffic" is any IPv4/IPv6 header, at any depth the classifier can see, whose
//! source or destination lies in a pod range (198.18.0.0/15, 2001:db8::/32). Depth matters: an
//! IPIP, GRE, VXLAN or Geneve encapsulation, or an ICMP error quoting a packet, shows the inner
//! header in clear, and a leak through any of those must count. Inside WireGuard nothing is
//! visible, which is the point.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::pcap::LinkType;

/// WireGuard message types by their first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgMessage {
    Initiation,
    Response,
    Cookie,
    Transport,
}

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    WireGuard(WgMessage),
    PlaintextPod,
    Arp,
    /// TCP to or from the API stand-in's port.
    Api,
    /// The capture's own end marker.
    Marker,
    Other,
}

/// The API stand-in's port.
pub const API_PORT: u16 = 6443;
/// UDP port of the capture's end marker.
pub const MARKER_PORT: u16 = 9;
/// How deep encapsulations are followed.
const MAX_DEPTH: usize = 4;

/// The verdict plus a one-line description of the frame, e.g.
/// `IPv4 198.18.1.11 > 198.18.2.11 ICMP`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub class: Class,
    pub summary: String,
}

#[derive(Default)]
struct Findings {
    pod_address: bool,
    outer_wireguard: Option<WgMessage>,
    api: bool,
    marker: bool,
    arp: bool,
    layers: Vec<String>,
}

/// Classifies one frame of `link_type`.
pub fn classify(link_type: LinkType, frame: &[u8], marker: &[u8]) -> Verdict {
    let mut f = Findings::default();
    match link_type {
        LinkType::Ethernet => ethernet(frame, 0, marker, &mut f),
        LinkType::LinuxSll if frame.len() >= 16 => {
            let proto = u16::from_be_bytes([frame[14], frame[15]]);
            ethertype(proto, &frame[16..], 0, marker, &mut f);
        }
        LinkType::Raw => match frame.first().map(|b| b >> 4) {
            Some(4) => ipv4(frame, 0, marker, &mut f),
            Some(6) => ipv6(frame, 0, marker, &mut f),
            _ => f.layers.push("raw ?".to_owned()),
        },
        other => f.layers.push(format!("link type {other:?}")),
    }
    let class = if f.pod_address {
        Class::PlaintextPod
    } else if f.marker {
        Class::Marker
    } else if let Some(m) = f.outer_wireguard {
        Class::WireGuard(m)
    } else if f.arp {
        Class::Arp
    } else if f.api {
        Class::Api
    } else {
        Class::Other
    };
    Verdict {
        class,
        summary: f.layers.join(" | "),
    }
}

fn ethernet(frame: &[u8], depth: usize, marker: &[u8], f: &mut Findings) {
    if frame.len() < 14 {
        f.layers.push("short ethernet".to_owned());
        return;
    }
    let mut proto = u16::from_be_bytes([frame[12], frame[13]]);
    let mut rest = &frame[14..];
    // 802.1Q / 802.1ad tags
    while matches!(proto, 0x8100 | 0x88a8) && rest.len() >= 4 {
        proto = u16::from_be_bytes([rest[2], rest[3]]);
        rest = &rest[4..];
    }
    ethertype(proto, rest, depth, marker, f);
}

fn ethertype(proto: u16, rest: &[u8], depth: usize, marker: &[u8], f: &mut Findings) {
    match proto {
        0x0800 => ipv4(rest, depth, marker, f),
        0x86dd => ipv6(rest, depth, marker, f),
        0x0806 => {
            f.arp = true;
            // An ARP for a pod address on the underlay also reveals pod traffic.
            if rest.len() >= 28 {
                let spa = Ipv4Addr::new(rest[14], rest[15], rest[16], rest[17]);
                let tpa = Ipv4Addr::new(rest[24], rest[25], rest[26], rest[27]);
                f.pod_address |= is_pod(spa.into()) || is_pod(tpa.into());
                f.layers.push(format!("ARP {spa} > {tpa}"));
            } else {
                f.layers.push("ARP".to_owned());
            }
        }
        p => f.layers.push(format!("ethertype {p:#06x}")),
    }
}

/// Pod ranges: 198.18.0.0/15 and 2001:db8::/32.
pub fn is_pod(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            o[0] == 198 && (o[1] & 0xfe) == 18
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            s[0] == 0x2001 && s[1] == 0x0db8
        }
    }
}

fn ipv4(pkt: &[u8], depth: usize, marker: &[u8], f: &mut Findings) {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 {
        f.layers.push("short IPv4".to_owned());
        return;
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
    let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
    let proto = pkt[9];
    let frag_offset = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x1fff;
    f.pod_address |= is_pod(src.into()) || is_pod(dst.into());
    f.layers.push(format!("IPv4 {src} > {dst}"));
    if frag_offset != 0 {
        f.layers.push("fragment".to_owned());
        return;
    }
    let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]])).clamp(ihl, pkt.len().max(ihl));
    let payload = pkt.get(ihl..total).unwrap_or_default();
    transport(proto, payload, depth, marker, f);
}

fn ipv6(pkt: &[u8], depth: usize, marker: &[u8], f: &mut Findings) {
    if pkt.len() < 40 || pkt[0] >> 4 != 6 {
        f.layers.push("short IPv6".to_owned());
        return;
    }
    let addr = |o: usize| {
        let mut b = [0u8; 16];
        b.copy_from_slice(&pkt[o..o + 16]);
        Ipv6Addr::from(b)
    };
    let (src, dst) = (addr(8), addr(24));
    f.pod_address |= is_pod(src.into()) || is_pod(dst.into());
    f.layers.push(format!("IPv6 {src} > {dst}"));
    let mut next = pkt[6];
    let mut rest = &pkt[40..];
    // Hop-by-hop, routing, destination options: skip; fragments: stop at non-first ones.
    loop {
        match next {
            0 | 43 | 60 if rest.len() >= 8 => {
                let len = (usize::from(rest[1]) + 1) * 8;
                next = rest[0];
                rest = rest.get(len..).unwrap_or_default();
            }
            44 if rest.len() >= 8 => {
                let offset = u16::from_be_bytes([rest[2], rest[3]]) >> 3;
                if offset != 0 {
                    f.layers.push("fragment".to_owned());
                    return;
                }
                next = rest[0];
                rest = &rest[8..];
            }
            _ => break,
        }
    }
    transport(next, rest, depth, marker, f);
}

fn transport(proto: u8, payload: &[u8], depth: usize, marker: &[u8], f: &mut Findings) {
    let deeper = depth + 1 < MAX_DEPTH;
    match proto {
        1 | 58 => {
            let name = if proto == 1 { "ICMP" } else { "ICMPv6" };
            let ty = payload.first().copied().unwrap_or(255);
            f.layers.push(format!("{name} type {ty}"));
            // Errors quote the offending packet's header after 8 bytes.
            let is_error = if proto == 1 {
                matches!(ty, 3 | 4 | 5 | 11 | 12)
            } else {
                ty < 128
            };
            if is_error && deeper && payload.len() > 8 {
                inner_ip(&payload[8..], depth + 1, marker, f);
            }
        }
        4 | 41 if deeper => {
            f.layers
                .push(if proto == 4 { "IPIP" } else { "IPv6-in-IP" }.to_owned());
            inner_ip(payload, depth + 1, marker, f);
        }
        47 if payload.len() >= 4 => {
            let flags = payload[0];
            let ptype = u16::from_be_bytes([payload[2], payload[3]]);
            let mut hdr = 4;
            if flags & 0x80 != 0 {
                hdr += 4; // checksum + reserved
            }
            if flags & 0x20 != 0 {
                hdr += 4; // key
            }
            if flags & 0x10 != 0 {
                hdr += 4; // sequence
            }
            f.layers.push(format!("GRE {ptype:#06x}"));
            let inner = payload.get(hdr..).unwrap_or_default();
            if deeper {
                match ptype {
                    0x6558 => ethernet(inner, depth + 1, marker, f),
                    p => ethertype(p, inner, depth + 1, marker, f),
                }
            }
        }
        6 if payload.len() >= 20 => {
            let sport = u16::from_be_bytes([payload[0], payload[1]]);
            let dport = u16::from_be_bytes([payload[2], payload[3]]);
            f.api |= depth == 0 && (sport == API_PORT || dport == API_PORT);
            f.layers.push(format!("TCP {sport} > {dport}"));
        }
        17 if payload.len() >= 8 => {
            let sport = u16::from_be_bytes([payload[0], payload[1]]);
            let dport = u16::from_be_bytes([payload[2], payload[3]]);
            let data = &payload[8..];
            if depth == 0 && dport == MARKER_PORT && !marker.is_empty() && data.starts_with(marker)
            {
                f.marker = true;
            }
            if let Some(m) = wireguard_message(data) {
                if depth == 0 {
                    f.outer_wireguard = Some(m);
                }
                f.layers.push(format!(
                    "UDP {sport} > {dport} WireGuard {m:?} len {}",
                    data.len()
                ));
                return;
            }
            f.layers
                .push(format!("UDP {sport} > {dport} len {}", data.len()));
            if !deeper {
                return;
            }
            match dport {
                // VXLAN (IANA and Linux default): 8-byte header, then Ethernet.
                4789 | 8472 if data.len() > 8 => ethernet(&data[8..], depth + 1, marker, f),
                // Geneve: 8 bytes + options, then a protocol type.
                6081 if data.len() >= 8 => {
                    let opt = usize::from(data[0] & 0x3f) * 4;
                    let ptype = u16::from_be_bytes([data[2], data[3]]);
                    let inner = data.get(8 + opt..).unwrap_or_default();
                    match ptype {
                        0x6558 => ethernet(inner, depth + 1, marker, f),
                        p => ethertype(p, inner, depth + 1, marker, f),
                    }
                }
                _ => {}
            }
        }
        p => f.layers.push(format!("proto {p}")),
    }
}

fn inner_ip(pkt: &[u8], depth: usize, marker: &[u8], f: &mut Findings) {
    match pkt.first().map(|b| b >> 4) {
        Some(4) => ipv4(pkt, depth, marker, f),
        Some(6) => ipv6(pkt, depth, marker, f),
        _ => {}
    }
}

/// A UDP payload that is a WireGuard message: type byte 1-4, three zero reserved bytes, and the
/// length of that type (148 initiation, 92 response, 64 cookie reply, transport: a 16-byte
/// header, the encrypted payload and a 16-byte tag, so at least 32 (a keepalive). The protocol
/// pads payloads to 16 bytes, but boringtun does not pad, so any length from 32 up counts.
pub fn wireguard_message(data: &[u8]) -> Option<WgMessage> {
    if data.len() < 32 || data[1..4] != [0, 0, 0] {
        return None;
    }
    match (data[0], data.len()) {
        (1, 148) => Some(WgMessage::Initiation),
        (2, 92) => Some(WgMessage::Response),
        (3, 64) => Some(WgMessage::Cookie),
        (4, _) => Some(WgMessage::Transport),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests;
