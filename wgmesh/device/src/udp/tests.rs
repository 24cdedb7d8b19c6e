use super::*;

fn runs(lens: &[usize], gso: bool) -> Vec<(Range<usize>, usize)> {
    let mut out = Vec::new();
    gso_runs(lens, gso, &mut out);
    out.into_iter().map(|r| (r.packets, r.seg_size)).collect()
}

#[test]
fn batches_are_cut_into_gso_runs() {
    let big = vec![1452; 70];
    let many = vec![100; 70];
    type Case<'a> = (&'a [usize], bool, Vec<(Range<usize>, usize)>);
    let cases: Vec<Case> = vec![
        (&[], true, vec![]),
        (&[1452, 1452, 1452], true, vec![(0..3, 1452)]),
        // a shorter last one stays in the run, and ends it
        (
            &[1452, 1452, 700, 1452],
            true,
            vec![(0..3, 1452), (3..4, 1452)],
        ),
        // a longer one starts a new run
        (&[148, 1452, 1452], true, vec![(0..1, 148), (1..3, 1452)]),
        (&[1452, 1452], false, vec![(0..1, 1452), (1..2, 1452)]),
        // 65,000 bytes per message: 44 × 1452 = 63,888 fits, 45 does not
        (&big, true, vec![(0..44, 1452), (44..70, 1452)]),
        // at most 64 segments per message
        (&many, true, vec![(0..64, 100), (64..70, 100)]),
    ];
    for (lens, gso, want) in cases {
        assert_eq!(runs(lens, gso), want, "{lens:?} gso={gso}");
    }
}

#[test]
fn addresses_round_trip_through_sockaddr() {
    for a in ["192.0.2.1:51820", "[2001:db8::1]:4000", "[fe80::1%3]:1"] {
        let a: SocketAddr = a.parse().unwrap();
        let (ss, _) = to_raw(&a);
        assert_eq!(from_raw(&ss), Some(a));
    }
}

#[test]
fn a_gso_batch_arrives_as_its_datagrams() {
    let rx = UdpSockets::bind(0, 0).expect("bind");
    let tx = UdpSockets::bind(0, 0).expect("bind");
    let dst: SocketAddr = (Ipv4Addr::LOCALHOST, rx.port).into();
    // Three full datagrams and a short one, then two of another size.
    let lens = [1200, 1200, 1200, 300, 800, 800];
    let mut buf = Vec::new();
    for (i, l) in lens.iter().enumerate() {
        buf.extend(std::iter::repeat_n(i as u8, *l));
    }
    let gso = AtomicBool::new(true);
    Sender::default()
        .send(&tx.v4, &dst, &buf, &lens, &gso)
        .expect("send");
    let mut r = Receiver::default();
    let mut got: Vec<Vec<u8>> = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while got.len() < lens.len() && std::time::Instant::now() < deadline {
        match r.recv(&rx.v4) {
            Ok(_) => {
                for g in &r.got {
                    assert_eq!(g.src.port(), tx.port);
                    for d in r.bufs[g.buf][..g.len].chunks(g.seg) {
                        got.push(d.to_vec());
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            Err(e) => panic!("recv: {e}"),
        }
    }
    let want: Vec<Vec<u8>> = lens
        .iter()
        .enumerate()
        .map(|(i, l)| vec![i as u8; *l])
        .collect();
    assert_eq!(got, want);
}
