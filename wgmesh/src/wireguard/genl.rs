//! Peer updates for kernel WireGuard that never leave a CIDR without a peer.
//!
//! `WGPEER_F_REPLACE_ALLOWEDIPS` (what defguard_wireguard_rs always sends) removes every allowed IP
//! of the peer and then inserts the new ones; packets looked up in between find no peer and are
//! dropped (the kernel answers local senders with EHOSTUNREACH; cilium PR #34612). Instead:
//! 1. set the peer's endpoint, keepalive and new allowed IPs *without* the replace flag: CIDRs it
//!    keeps are re-inserted in place, new ones are added;
//! 2. move the CIDRs it loses to a throwaway peer (inserting a CIDR owned by another peer moves it
//!    atomically), then delete that peer.
//!    Every lookup finds the right peer, or for a removed CIDR the throwaway peer, which drops it.

use std::{fmt::Debug, net::SocketAddr};

use ipnet::IpNet;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_REQUEST, NetlinkDeserializable, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable,
};
use netlink_packet_generic::{
    GenlFamily, GenlMessage,
    ctrl::{GenlCtrl, GenlCtrlCmd, nlas::GenlCtrlAttrs},
};
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};
use netlink_sys::{Socket, SocketAddr as NlAddr, constants::NETLINK_GENERIC};

fn allowed_ip(n: &IpNet) -> WireguardAllowedIp {
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(if n.addr().is_ipv4() {
            WireguardAddressFamily::Ipv4
        } else {
            WireguardAddressFamily::Ipv6
        }),
        WireguardAllowedIpAttr::IpAddr(n.addr()),
        WireguardAllowedIpAttr::Cidr(n.prefix_len()),
    ])
}

/// Endpoint, keepalive and allowed IPs of an existing or new peer, allowed IPs added in place.
pub fn peer_without_replace(
    key: [u8; 32],
    endpoint: SocketAddr,
    keepalive: u16,
    ips: &[IpNet],
) -> WireguardPeer {
    WireguardPeer(vec![
        WireguardPeerAttribute::PublicKey(key),
        WireguardPeerAttribute::Endpoint(endpoint),
        WireguardPeerAttribute::PersistentKeepalive(keepalive),
        WireguardPeerAttribute::AllowedIps(ips.iter().map(allowed_ip).collect()),
    ])
}

/// A peer without endpoint that takes over `ips` (moving them away from their current owner).
pub fn holding_peer(key: [u8; 32], ips: &[IpNet]) -> WireguardPeer {
    WireguardPeer(vec![
        WireguardPeerAttribute::PublicKey(key),
        WireguardPeerAttribute::AllowedIps(ips.iter().map(allowed_ip).collect()),
    ])
}

pub fn removed_peer(key: [u8; 32]) -> WireguardPeer {
    WireguardPeer(vec![
        WireguardPeerAttribute::PublicKey(key),
        WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
    ])
}

/// One `WG_CMD_SET_DEVICE` for `ifname` with these peer sections.
pub fn set_peers(ifname: &str, peers: Vec<WireguardPeer>) -> Result<(), String> {
    let mut msg = GenlMessage::from_payload(WireguardMessage {
        cmd: WireguardCmd::SetDevice,
        attributes: vec![
            WireguardAttribute::IfName(ifname.to_owned()),
            WireguardAttribute::Peers(peers),
        ],
    });
    let family = resolve_family(WireguardMessage::family_name())?;
    msg.set_resolved_family_id(family);
    request(msg).map(drop)
}

fn resolve_family(name: &str) -> Result<u16, String> {
    let msg = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(name.to_owned())],
    });
    for m in request(msg)? {
        if let NetlinkPayload::InnerMessage(g) = m.payload {
            for nla in g.payload.nlas {
                if let GenlCtrlAttrs::FamilyId(id) = nla {
                    return Ok(id);
                }
            }
        }
    }
    Err(format!(
        "generic netlink family {name} not found (no WireGuard module?)"
    ))
}

fn request<I>(payload: I) -> Result<Vec<NetlinkMessage<I>>, String>
where
    NetlinkPayload<I>: From<I>,
    I: Clone + Debug + Eq + NetlinkSerializable + NetlinkDeserializable,
{
    let mut req = NetlinkMessage::from(payload);
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    req.finalize();
    let mut buf = vec![0u8; req.buffer_len()];
    req.serialize(&mut buf);
    let socket = Socket::new(NETLINK_GENERIC).map_err(|e| format!("netlink socket: {e}"))?;
    socket
        .connect(&NlAddr::new(0, 0))
        .map_err(|e| format!("netlink connect: {e}"))?;
    let sent = socket
        .send(&buf, 0)
        .map_err(|e| format!("netlink send: {e}"))?;
    if sent != buf.len() {
        return Err("netlink: short send".into());
    }
    let mut out = Vec::new();
    let mut rbuf = vec![0u8; 64 * 1024];
    loop {
        let n = socket
            .recv(&mut &mut rbuf[..], 0)
            .map_err(|e| format!("netlink recv: {e}"))?;
        let mut offset = 0;
        while offset < n {
            let msg = NetlinkMessage::<I>::deserialize(&rbuf[offset..n])
                .map_err(|e| format!("netlink decode: {e}"))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Error(e) if e.code.is_none() => return Ok(out),
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => return Err(format!("kernel refused: {}", e.to_io())),
                _ => out.push(msg),
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_never_carries_the_replace_flag_and_removal_does() {
        let p = peer_without_replace(
            [1; 32],
            "192.0.2.12:51820".parse().unwrap(),
            25,
            &["198.18.2.0/24".parse().unwrap()],
        );
        assert!(
            !p.0.iter()
                .any(|a| matches!(a, WireguardPeerAttribute::Flags(_)))
        );
        assert!(
            p.0.iter()
                .any(|a| matches!(a, WireguardPeerAttribute::AllowedIps(ips) if ips.len() == 1))
        );
        let h = holding_peer([2; 32], &["198.18.3.0/24".parse().unwrap()]);
        assert!(
            !h.0.iter()
                .any(|a| matches!(a, WireguardPeerAttribute::Endpoint(_)))
        );
        let r = removed_peer([2; 32]);
        assert!(r.0.contains(&WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe)));
    }
}
