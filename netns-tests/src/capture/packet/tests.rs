//! Frame builders and classification tables.

use super::*;

pub(crate) fn eth(proto: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    f.extend_from_slice(&proto.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub(crate) fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + payload.len()).expect("small");
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(payload);
    p
}

pub(crate) fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(
        &u16::try_from(8 + payload.len())
            .expect("small")
            .to_be_bytes(),
    );
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

fn icmp_echo() -> Vec<u8> {
    vec![8, 0, 0, 0, 0, 1, 0, 1, 1, 2, 3, 4]
}

pub(crate) fn wg(ty: u8, len: usize) -> Vec<u8> {
    let mut d = vec![0u8; len];
    d[0] = ty;
    d
}

const NODE1: [u8; 4] = [192, 0, 2, 11];
const NODE2: [u8; 4] = [192, 0, 2, 12];
const POD1: [u8; 4] = [198, 18, 1, 11];
const POD2: [u8; 4] = [198, 19, 2, 11];

fn class(frame: &[u8]) -> Class {
    classify(LinkType::Ethernet, frame, b"MARK").class
}

#[test]
fn wireguard_messages_are_recognised_by_type_and_length() {
    for (ty, len, want) in [
        (1, 148, Some(WgMessage::Initiation)),
        (2, 92, Some(WgMessage::Response)),
        (3, 64, Some(WgMessage::Cookie)),
        (4, 32, Some(WgMessage::Transport)),
        (4, 1440, Some(WgMessage::Transport)),
        (4, 116, Some(WgMessage::Transport)),
        (4, 31, None),
        (1, 149, None),
        (5, 64, None),
    ] {
        assert_eq!(wireguard_message(&wg(ty, len)), want, "type {ty} len {len}");
        let frame = eth(
            0x0800,
            &ipv4(NODE1, NODE2, 17, &udp(51820, 51820, &wg(ty, len))),
        );
        let expect = want.map_or(Class::Other, Class::WireGuard);
        assert_eq!(class(&frame), expect, "type {ty} len {len}");
    }
    let mut bad = wg(4, 64);
    bad[2] = 1;
    assert_eq!(wireguard_message(&bad), None, "reserved bytes must be zero");
}

#[test]
fn pod_addresses_in_clear_are_plaintext_at_any_depth() {
    let direct = eth(0x0800, &ipv4(POD1, POD2, 1, &icmp_echo()));
    assert_eq!(class(&direct), Class::PlaintextPod);

    let ipip = eth(
        0x0800,
        &ipv4(NODE1, NODE2, 4, &ipv4(POD1, POD2, 1, &icmp_echo())),
    );
    assert_eq!(class(&ipip), Class::PlaintextPod);

    let inner_eth = eth(0x0800, &ipv4(POD1, POD2, 17, &udp(1, 2, b"x")));
    let mut vx = vec![8, 0, 0, 0, 0, 0, 1, 0];
    vx.extend_from_slice(&inner_eth);
    let vxlan = eth(0x0800, &ipv4(NODE1, NODE2, 17, &udp(40000, 4789, &vx)));
    assert_eq!(class(&vxlan), Class::PlaintextPod);

    let mut err = vec![3, 1, 0, 0, 0, 0, 0, 0];
    err.extend_from_slice(&ipv4(POD1, POD2, 17, &udp(1, 2, b"")));
    let icmp_err = eth(0x0800, &ipv4(NODE2, NODE1, 1, &err));
    assert_eq!(class(&icmp_err), Class::PlaintextPod);

    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1];
    arp.extend_from_slice(&NODE1);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&POD2);
    assert_eq!(class(&eth(0x0806, &arp)), Class::PlaintextPod);
}

#[test]
fn underlay_only_traffic_is_other() {
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1];
    arp.extend_from_slice(&NODE1);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&NODE2);
    assert_eq!(class(&eth(0x0806, &arp)), Class::Arp);

    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&API_PORT.to_be_bytes());
    assert_eq!(
        class(&eth(0x0800, &ipv4(NODE1, [192, 0, 2, 1], 6, &tcp))),
        Class::Api
    );

    assert_eq!(
        class(&eth(0x0800, &ipv4(NODE1, NODE2, 1, &icmp_echo()))),
        Class::Other
    );
    let marker = eth(
        0x0800,
        &ipv4(
            [192, 0, 2, 1],
            [192, 0, 2, 255],
            17,
            &udp(5, MARKER_PORT, b"MARK-1"),
        ),
    );
    assert_eq!(class(&marker), Class::Marker);
}

#[test]
fn summary_names_the_layers() {
    let v = classify(
        LinkType::Ethernet,
        &eth(0x0800, &ipv4(POD1, POD2, 1, &icmp_echo())),
        b"",
    );
    assert_eq!(v.summary, "IPv4 198.18.1.11 > 198.19.2.11 | ICMP type 8");
}
