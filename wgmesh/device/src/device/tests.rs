use super::*;

fn state() -> State {
    State {
        key: None,
        rate_limiter: None,
        fwmark: 0,
        sockets: Arc::new(UdpSockets::bind(0, 0).expect("bind a UDP port")),
        peers: BTreeMap::new(),
        by_idx: HashMap::new(),
        allowed: AllowedIps::new(),
        next_idx: 0,
    }
}

fn arena() -> Arena {
    Arena {
        buf: vec![0; 1 << 20],
        used: 0,
        pkts: Vec::new(),
    }
}

fn keypair() -> (Key, [u8; 32]) {
    let s = StaticSecret::random();
    (Key(s.to_bytes()), *PublicKey::from(&s).as_bytes())
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ipv4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(payload);
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p
}

fn encapsulate(st: &State, peer: &[u8; 32], pkt: &[u8]) -> Vec<u8> {
    let p = st.peers.get(peer).expect("peer");
    let mut ps = p.state.lock();
    let mut buf = vec![0u8; pkt.len() + 200];
    match ps.tunn.as_mut().expect("tunn").encapsulate(pkt, &mut buf) {
        TunnResult::WriteToNetwork(w) => w.to_vec(),
        other => panic!("expected a datagram, got {other:?}"),
    }
}

/// Feeds datagrams to `st` as if they came from `src`; returns the IP packets for the TUN and the
/// datagrams it sends back.
fn receive(st: &State, src: SocketAddr, dgs: &[Vec<u8>]) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut a = arena();
    let mut control = Vec::new();
    for d in dgs {
        handle_datagram(st, src, d, &mut a, &mut control);
    }
    let tun = a
        .pkts
        .iter()
        .map(|r| a.buf[r.start + VNET_HDR_LEN..r.end].to_vec())
        .collect();
    (
        tun,
        control
            .into_iter()
            .map(|(to, p)| {
                assert_eq!(to, src, "answers go back to the sender");
                p
            })
            .collect(),
    )
}

fn peer_update(key: [u8; 32]) -> PeerUpdate {
    PeerUpdate {
        public_key: key,
        ..PeerUpdate::default()
    }
}

/// Two devices' states with a completed handshake; returns (a, b, a's key, b's key).
fn connected() -> (State, State, [u8; 32], [u8; 32], SocketAddr, SocketAddr) {
    let (ka, pa) = keypair();
    let (kb, pb) = keypair();
    let addr_a: SocketAddr = "192.0.2.1:51820".parse().unwrap();
    let addr_b: SocketAddr = "192.0.2.2:51820".parse().unwrap();
    let mut a = state();
    let mut b = state();
    a.set_private_key(Some(ka));
    b.set_private_key(Some(kb));
    a.apply_peer(PeerUpdate {
        endpoint: Some(addr_b),
        allowed_ips: vec![net("198.18.0.2/32")],
        ..peer_update(pb)
    });
    b.apply_peer(PeerUpdate {
        allowed_ips: vec![net("198.18.0.1/32")],
        ..peer_update(pa)
    });
    let first = ipv4(
        [198, 18, 0, 1],
        [198, 18, 0, 2],
        b"queued until the handshake",
    );
    let init = encapsulate(&a, &pb, &first);
    assert_eq!(init.len(), 148, "no session yet: a handshake initiation");
    let (tun, resp) = receive(&b, addr_a, &[init]);
    assert!(tun.is_empty());
    assert_eq!(resp.len(), 1);
    let (tun, to_b) = receive(&a, addr_b, &resp);
    assert!(tun.is_empty());
    // A keepalive, then the packet that waited for the handshake.
    let (tun, _) = receive(&b, addr_a, &to_b);
    assert_eq!(tun, vec![first]);
    (a, b, pa, pb, addr_a, addr_b)
}

#[test]
fn handshake_data_and_roaming() {
    let (a, b, pa, _pb, addr_a, _) = connected();
    // b learnt a's endpoint from the authenticated packets.
    assert_eq!(b.peers[&pa].state.lock().endpoint, Some(addr_a));
    let reply = ipv4([198, 18, 0, 2], [198, 18, 0, 1], b"pong");
    let dg = encapsulate(&b, &pa, &reply);
    let roamed: SocketAddr = "192.0.2.9:4444".parse().unwrap();
    let (tun, _) = receive(&a, roamed, &[dg]);
    assert_eq!(tun, vec![reply]);
    let st = a.status();
    assert_eq!(st.peers[0].endpoint, Some(roamed));
    assert!(st.peers[0].last_handshake.is_some());
    assert!(st.peers[0].tx_bytes > 0 && st.peers[0].rx_bytes > 0);
}

#[test]
fn packets_from_outside_the_allowed_ips_are_dropped() {
    let (a, b, _pa, pb, addr_a, _) = connected();
    let spoofed = ipv4([198, 18, 0, 99], [198, 18, 0, 2], b"spoofed");
    let dg = encapsulate(&a, &pb, &spoofed);
    let (tun, _) = receive(&b, addr_a, &[dg]);
    assert!(tun.is_empty());
}

#[test]
fn a_peer_is_updated_in_place_without_losing_its_session() {
    let (mut a, b, pa, pb, addr_a, _) = connected();
    let before = Arc::clone(&a.peers[&pb]);
    let new_ep: SocketAddr = "192.0.2.3:51821".parse().unwrap();
    a.apply_peer(PeerUpdate {
        endpoint: Some(new_ep),
        keepalive: Some(25),
        replace_allowed_ips: true,
        allowed_ips: vec![net("198.18.0.2/32"), net("198.19.4.0/24")],
        ..peer_update(pb)
    });
    let after = Arc::clone(&a.peers[&pb]);
    assert!(Arc::ptr_eq(&before, &after), "same peer object");
    {
        let ps = after.state.lock();
        assert_eq!((ps.endpoint, ps.keepalive), (Some(new_ep), 25));
    }
    // Still the old session: the next packet is data (payload + 32), not a handshake initiation.
    let pkt = ipv4([198, 18, 0, 1], [198, 18, 0, 2], b"after the update");
    let dg = encapsulate(&a, &pb, &pkt);
    assert_eq!(dg.len(), pkt.len() + 32);
    let (tun, _) = receive(&b, addr_a, &[dg]);
    assert_eq!(tun, vec![pkt]);
    assert!(
        a.allowed
            .find("198.19.4.77".parse().unwrap())
            .is_some_and(|p| Arc::ptr_eq(p, &after))
    );
    let st = a.status();
    assert_eq!(st.peers[0].allowed_ips.len(), 2);
    assert_eq!(st.peers[0].keepalive, 25);
    let _ = pa;
}

#[test]
fn allowed_ips_replace_append_and_move_between_peers() {
    let mut st = state();
    let (k, _) = keypair();
    st.set_private_key(Some(k));
    let (_, p1) = keypair();
    let (_, p2) = keypair();
    st.apply_peer(PeerUpdate {
        allowed_ips: vec![net("198.18.1.0/24")],
        ..peer_update(p1)
    });
    // Without replace_allowed_ips, addresses are added.
    st.apply_peer(PeerUpdate {
        allowed_ips: vec![net("198.18.2.0/24")],
        ..peer_update(p1)
    });
    // Claimed by another peer, an address moves.
    st.apply_peer(PeerUpdate {
        allowed_ips: vec![net("198.18.2.0/24")],
        ..peer_update(p2)
    });
    let ips = |st: &State, k: &[u8; 32]| -> Vec<IpNet> {
        let mut v = st
            .status()
            .peers
            .into_iter()
            .find(|p| p.public_key == *k)
            .unwrap()
            .allowed_ips;
        v.sort();
        v
    };
    assert_eq!(ips(&st, &p1), vec![net("198.18.1.0/24")]);
    assert_eq!(ips(&st, &p2), vec![net("198.18.2.0/24")]);
    st.apply_peer(PeerUpdate {
        replace_allowed_ips: true,
        allowed_ips: vec![net("198.18.3.0/24")],
        ..peer_update(p1)
    });
    assert_eq!(ips(&st, &p1), vec![net("198.18.3.0/24")]);
    // update_only never creates; remove deletes with its addresses.
    let (_, p3) = keypair();
    st.apply_peer(PeerUpdate {
        update_only: true,
        allowed_ips: vec![net("198.18.9.0/24")],
        ..peer_update(p3)
    });
    assert!(!st.peers.contains_key(&p3));
    st.apply_peer(PeerUpdate {
        remove: true,
        ..peer_update(p1)
    });
    assert!(!st.peers.contains_key(&p1));
    assert!(st.allowed.find("198.18.3.1".parse().unwrap()).is_none());
    assert_eq!(st.by_idx.len(), 1);
}

#[test]
fn peers_wait_for_the_private_key_and_our_own_key_is_no_peer() {
    let mut st = state();
    let (_, p1) = keypair();
    st.apply_peer(peer_update(p1));
    assert!(st.peers[&p1].state.lock().tunn.is_none());
    let (k, own) = keypair();
    st.apply_peer(peer_update(own));
    st.set_private_key(Some(k));
    assert!(st.peers[&p1].state.lock().tunn.is_some());
    assert!(
        !st.peers.contains_key(&own),
        "a peer with our own key is dropped"
    );
    st.apply_peer(peer_update(own));
    assert!(!st.peers.contains_key(&own));
    st.set_private_key(None);
    assert!(st.peers[&p1].state.lock().tunn.is_none());
    assert!(st.status().private_key.is_none());
}
