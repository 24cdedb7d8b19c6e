use super::*;

const K1: &str = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";
const K2: &str = "b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33";
const PRIV: &str = "a8dac1d8a70a751f0f699fb14ba1cff7b79cf4fbd8f09f44c6e4e24a1e8c6a5e";

fn key(s: &str) -> [u8; 32] {
    decode_hex_key(s).unwrap().0
}

#[test]
fn a_full_transaction_parses() {
    let text = format!(
        "private_key={PRIV}\nlisten_port=51820\nfwmark=4660\nreplace_peers=true\n\
         public_key={K1}\npreshared_key={K2}\nendpoint=192.0.2.1:51820\npersistent_keepalive_interval=25\n\
         replace_allowed_ips=true\nallowed_ip=198.18.1.7/24\nallowed_ip=fd00::1/64\nprotocol_version=1\n\
         public_key={K2}\nupdate_only=true\nendpoint=[2001:db8::1]:4000\nallowed_ip=198.19.0.1\n\
         public_key={K1}\nremove=true\n\n"
    );
    let req = parse_set(text.lines()).unwrap();
    assert_eq!(req.private_key, Some(Some(decode_hex_key(PRIV).unwrap())));
    assert_eq!(
        (req.listen_port, req.fwmark, req.replace_peers),
        (Some(51820), Some(4660), true)
    );
    assert_eq!(req.peers.len(), 3);
    let p = &req.peers[0];
    assert_eq!(p.public_key, key(K1));
    assert_eq!(p.preshared_key, Some(Some(decode_hex_key(K2).unwrap())));
    assert_eq!(p.endpoint, Some("192.0.2.1:51820".parse().unwrap()));
    assert_eq!(p.keepalive, Some(25));
    assert!(p.replace_allowed_ips && !p.remove && !p.update_only);
    // Truncated to the network, as the kernel reports them.
    assert_eq!(
        p.allowed_ips,
        vec![
            "198.18.1.0/24".parse::<IpNet>().unwrap(),
            "fd00::/64".parse().unwrap()
        ]
    );
    // Nothing leaks from the previous section.
    let q = &req.peers[1];
    assert_eq!(q.preshared_key, None);
    assert_eq!(q.keepalive, None);
    assert!(q.update_only && !q.replace_allowed_ips);
    assert_eq!(q.endpoint, Some("[2001:db8::1]:4000".parse().unwrap()));
    assert_eq!(
        q.allowed_ips,
        vec!["198.19.0.1/32".parse::<IpNet>().unwrap()]
    );
    assert!(req.peers[2].remove);
}

#[test]
fn zero_keys_clear() {
    let zero = "0".repeat(64);
    let req =
        parse_set(format!("private_key={zero}\npublic_key={K1}\npreshared_key={zero}").lines())
            .unwrap();
    assert_eq!(req.private_key, Some(None));
    assert_eq!(req.peers[0].preshared_key, Some(None));
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    let cases: Vec<(String, UapiError, i32)> = vec![
        (
            "listen_port".into(),
            UapiError::NoEquals { line: 2 },
            EINVAL,
        ),
        (
            "colour=blue".into(),
            UapiError::UnknownKey {
                key: "colour".into(),
                line: 2,
            },
            EINVAL,
        ),
        (
            format!("private_key={}", &PRIV[..60]),
            UapiError::BadKey {
                key: "private_key",
                line: 2,
            },
            EINVAL,
        ),
        (
            "listen_port=70000".into(),
            UapiError::BadValue {
                key: "listen_port",
                value: "70000".into(),
                line: 2,
            },
            EINVAL,
        ),
        (
            "endpoint=192.0.2.1:1".into(),
            UapiError::PeerKeyOutsidePeer {
                key: "endpoint",
                line: 2,
            },
            EINVAL,
        ),
        (
            format!("public_key={K1}\nendpoint=nowhere"),
            UapiError::BadValue {
                key: "endpoint",
                value: "nowhere".into(),
                line: 3,
            },
            EINVAL,
        ),
        (
            format!("public_key={K1}\nallowed_ip=198.18.0.0/33"),
            UapiError::BadValue {
                key: "allowed_ip",
                value: "198.18.0.0/33".into(),
                line: 3,
            },
            EINVAL,
        ),
        (
            format!("public_key={K1}\nremove=yes"),
            UapiError::BadValue {
                key: "remove",
                value: "yes".into(),
                line: 3,
            },
            EINVAL,
        ),
        (
            format!("public_key={K1}\nprotocol_version=2"),
            UapiError::ProtocolVersion("2".into()),
            EPROTO,
        ),
        // A device key after a peer section began is a peer key, and unknown there.
        (
            format!("public_key={K1}\nprivate_key={PRIV}"),
            UapiError::UnknownKey {
                key: "private_key".into(),
                line: 3,
            },
            EINVAL,
        ),
    ];
    for (text, want, errno) in cases {
        let err = parse_set(text.lines()).unwrap_err();
        assert_eq!(err, want, "{text}");
        assert_eq!(err.errno(), errno);
        // No key material in any message.
        let msg = err.to_string();
        assert!(
            !msg.contains(&PRIV[..16]) && !msg.contains(&K1[..16]),
            "{msg}"
        );
    }
}

#[test]
fn get_is_formatted_like_wireguard_go() {
    let d = DeviceStatus {
        private_key: Some(decode_hex_key(PRIV).unwrap()),
        listen_port: 51820,
        fwmark: 0,
        peers: vec![PeerStatus {
            public_key: key(K1),
            preshared_key: None,
            endpoint: Some("192.0.2.2:51820".parse().unwrap()),
            last_handshake: Some(Duration::new(1_795_000_000, 123)),
            tx_bytes: 10,
            rx_bytes: 20,
            keepalive: 25,
            allowed_ips: vec!["198.18.0.2/32".parse().unwrap()],
        }],
    };
    let want = format!(
        "private_key={PRIV}\nlisten_port=51820\npublic_key={K1}\npreshared_key={}\nprotocol_version=1\n\
         endpoint=192.0.2.2:51820\nlast_handshake_time_sec=1795000000\nlast_handshake_time_nsec=123\n\
         tx_bytes=10\nrx_bytes=20\npersistent_keepalive_interval=25\nallowed_ip=198.18.0.2/32\nerrno=0\n\n",
        "0".repeat(64)
    );
    assert_eq!(*format_get(&d), want);
    let with_mark = DeviceStatus {
        fwmark: 7,
        private_key: None,
        peers: vec![],
        ..d
    };
    assert_eq!(
        *format_get(&with_mark),
        "listen_port=51820\nfwmark=7\nerrno=0\n\n"
    );
}

#[test]
fn keys_do_not_debug_print() {
    let k = decode_hex_key(PRIV).unwrap();
    assert_eq!(format!("{k:?}"), "Key(..)");
    assert!(decode_hex_key("zz").is_none());
    assert!(decode_hex_key(&"g".repeat(64)).is_none());
}
