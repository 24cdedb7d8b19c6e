use super::*;

/// Reference one's-complement checksum, written independently of `checksum_add`.
fn reference_checksum(chunks: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
    let mut sum: u32 = 0;
    for pair in bytes.chunks(2) {
        let hi = u32::from(pair[0]) << 8;
        let lo = pair.get(1).map_or(0, |b| u32::from(*b));
        sum += hi | lo;
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo(ip: &[u8], l4_len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    if ip[0] >> 4 == 4 {
        p.extend_from_slice(&ip[12..20]);
        p.extend_from_slice(&[0, 6]);
        p.extend_from_slice(&(l4_len as u16).to_be_bytes());
    } else {
        p.extend_from_slice(&ip[8..40]);
        p.extend_from_slice(&(l4_len as u32).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 6]);
    }
    p
}

/// True when the IPv4 header checksum (if any) and the TCP checksum are right.
fn checksums_ok(pkt: &[u8]) -> bool {
    let ip_hlen = if pkt[0] >> 4 == 4 {
        let ihl = usize::from(pkt[0] & 15) * 4;
        if reference_checksum(&[&pkt[..ihl]]) != 0 {
            return false;
        }
        ihl
    } else {
        40
    };
    let l4 = &pkt[ip_hlen..];
    reference_checksum(&[&pseudo(pkt, l4.len()), l4]) == 0
}

const TCP_OPTS: [u8; 12] = [1, 1, 8, 10, 0, 0, 0, 42, 0, 0, 0, 7]; // NOP NOP timestamps

/// A TCP packet with a 12-byte option block; `payload` bytes follow the pattern i % 251.
fn tcp_packet(v6: bool, payload: usize, flags: u8, seq: u32) -> Vec<u8> {
    let tcp_hlen = 20 + TCP_OPTS.len();
    let mut p = Vec::new();
    if v6 {
        p.extend_from_slice(&[0x60, 0, 0, 0]);
        p.extend_from_slice(&((tcp_hlen + payload) as u16).to_be_bytes());
        p.extend_from_slice(&[6, 64]);
        p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    } else {
        p.extend_from_slice(&[0x45, 0]);
        p.extend_from_slice(&((20 + tcp_hlen + payload) as u16).to_be_bytes());
        p.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 6, 0, 0]);
        p.extend_from_slice(&[198, 18, 0, 1, 198, 18, 0, 2]);
        let c = reference_checksum(&[&p]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
    }
    let ip_hlen = p.len();
    p.extend_from_slice(&[0x9c, 0x40, 0x14, 0x51]); // ports 40000 -> 5201
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&0x0102_0304u32.to_be_bytes()); // ack
    p.push(((tcp_hlen / 4) as u8) << 4);
    p.push(flags);
    p.extend_from_slice(&[0x01, 0xf5, 0, 0, 0, 0]); // window, csum, urgent
    p.extend_from_slice(&TCP_OPTS);
    p.extend((0..payload).map(|i| (i % 251) as u8));
    let c = reference_checksum(&[&pseudo(&p, p.len() - ip_hlen), &p[ip_hlen..]]);
    p[ip_hlen + 16..ip_hlen + 18].copy_from_slice(&c.to_be_bytes());
    p
}

/// What the kernel hands a TSO-capable TUN: the TCP checksum holds only the pseudo-header sum.
fn as_tso(mut p: Vec<u8>, v6: bool, mss: u16) -> (VnetHdr, Vec<u8>) {
    let ip_hlen = if v6 { 40 } else { 20 };
    let sum = !reference_checksum(&[&pseudo(&p, p.len() - ip_hlen)]);
    p[ip_hlen + 16..ip_hlen + 18].copy_from_slice(&sum.to_be_bytes());
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
        hdr_len: (ip_hlen + 32) as u16,
        gso_size: mss,
        csum_start: ip_hlen as u16,
        csum_offset: 16,
    };
    (hdr, p)
}

const ACK: u8 = 0x10;

#[test]
fn checksum_matches_the_reference_on_odd_and_even_lengths() {
    for len in [0, 1, 2, 7, 8, 9, 63, 64, 1499] {
        let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
        assert_eq!(
            !checksum_fold(checksum_add(0, &data)),
            reference_checksum(&[&data]),
            "len {len}"
        );
    }
}

#[test]
fn tso_super_packets_split_into_valid_segments() {
    // (ipv6, payload, mss): last segment shorter, exact multiple, single segment, tiny mss
    for (v6, payload, mss) in [
        (false, 3500, 1000),
        (false, 3000, 1000),
        (false, 500, 1000),
        (true, 3500, 1000),
        (true, 65_000 - 80, 1368),
        (false, 10, 3),
    ] {
        let seq0 = 0xffff_f000; // wraps
        let flags = ACK | TCP_PSH | TCP_FIN | TCP_CWR;
        let (hdr, pkt) = as_tso(tcp_packet(v6, payload, flags, seq0), v6, mss);
        let mut out = Vec::new();
        let mut segs = Vec::new();
        gso_split(&hdr, &pkt, &mut out, &mut segs).expect("splits");
        let n = payload.div_ceil(usize::from(mss));
        assert_eq!(segs.len(), n, "{v6} {payload} {mss}");
        let ip_hlen = if v6 { 40 } else { 20 };
        let hlen = ip_hlen + 32;
        let mut rebuilt = Vec::new();
        for (i, r) in segs.iter().enumerate() {
            let s = &out[r.clone()];
            let want = if i + 1 == n {
                payload - i * usize::from(mss)
            } else {
                usize::from(mss)
            };
            assert_eq!(s.len(), hlen + want, "segment {i} length");
            assert!(
                checksums_ok(s),
                "segment {i} checksums ({v6} {payload} {mss})"
            );
            if v6 {
                assert_eq!(usize::from(u16::from_be_bytes([s[4], s[5]])), 32 + want);
            } else {
                assert_eq!(usize::from(u16::from_be_bytes([s[2], s[3]])), s.len());
                assert_eq!(
                    u16::from_be_bytes([s[4], s[5]]),
                    0x1234u16.wrapping_add(i as u16)
                );
            }
            let seq = u32::from_be_bytes(s[ip_hlen + 4..ip_hlen + 8].try_into().unwrap());
            assert_eq!(seq, seq0.wrapping_add((i * usize::from(mss)) as u32));
            let f = s[ip_hlen + 13];
            let last = i + 1 == n;
            assert_eq!(
                f & (TCP_PSH | TCP_FIN) != 0,
                last,
                "PSH/FIN only on the last ({i})"
            );
            assert_eq!(f & TCP_CWR != 0, i == 0, "CWR only on the first ({i})");
            assert_eq!(f & ACK, ACK);
            assert_eq!(&s[ip_hlen + 20..hlen], &TCP_OPTS, "options copied");
            rebuilt.extend_from_slice(&s[hlen..]);
        }
        assert_eq!(rebuilt, pkt[hlen..], "payload preserved in order");
    }
}

#[test]
fn split_refuses_what_it_cannot_handle() {
    let (mut hdr, pkt) = as_tso(tcp_packet(false, 3000, ACK, 1), false, 1000);
    let (mut out, mut segs) = (Vec::new(), Vec::new());
    hdr.gso_type = GSO_UDP;
    assert_eq!(
        gso_split(&hdr, &pkt, &mut out, &mut segs),
        Err(OffloadError::UnsupportedGso(GSO_UDP))
    );
    hdr.gso_type = GSO_TCPV4;
    hdr.gso_size = 0;
    assert_eq!(
        gso_split(&hdr, &pkt, &mut out, &mut segs),
        Err(OffloadError::ZeroSegmentSize)
    );
    hdr.gso_size = 1000;
    assert_eq!(
        gso_split(&hdr, &pkt[..30], &mut out, &mut segs),
        Err(OffloadError::Truncated)
    );
    let mut udp = pkt.clone();
    udp[9] = 17;
    assert_eq!(
        gso_split(&hdr, &udp, &mut out, &mut segs),
        Err(OffloadError::NotTcp)
    );
    assert!(segs.is_empty());
}

#[test]
fn partial_checksums_are_finished() {
    // A UDP datagram over IPv4 whose checksum field holds the pseudo-header sum.
    let mut p = vec![
        0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2,
    ];
    let payload: Vec<u8> = (0..333u32).map(|i| (i * 7) as u8).collect();
    let udp_len = 8 + payload.len();
    p.extend_from_slice(&[0x30, 0x39, 0x00, 0x35]);
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&payload);
    let mut ps = p[12..20].to_vec();
    ps.extend_from_slice(&[0, 17]);
    ps.extend_from_slice(&(udp_len as u16).to_be_bytes());
    let partial = !reference_checksum(&[&ps]);
    p[26..28].copy_from_slice(&partial.to_be_bytes());
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        csum_start: 20,
        csum_offset: 6,
        ..VnetHdr::default()
    };
    finish_checksum(&hdr, &mut p).unwrap();
    assert_eq!(reference_checksum(&[&ps, &p[20..]]), 0);
    let bad = VnetHdr {
        csum_offset: 5000,
        ..hdr
    };
    assert_eq!(
        finish_checksum(&bad, &mut p),
        Err(OffloadError::BadChecksumOffsets)
    );
}

fn split(v6: bool, payload: usize, mss: u16, flags: u8, seq: u32) -> Vec<Vec<u8>> {
    let (hdr, pkt) = as_tso(tcp_packet(v6, payload, flags, seq), v6, mss);
    let (mut out, mut segs) = (Vec::new(), Vec::new());
    gso_split(&hdr, &pkt, &mut out, &mut segs).unwrap();
    segs.into_iter().map(|r| out[r].to_vec()).collect()
}

#[test]
#[allow(clippy::single_range_in_vec_init)]
fn consecutive_segments_coalesce_back_into_the_super_packet() {
    for v6 in [false, true] {
        let segs = split(v6, 5000, 1200, ACK | TCP_PSH, 777);
        let refs: Vec<&[u8]> = segs.iter().map(Vec::as_slice).collect();
        let mut runs = Vec::new();
        coalesce_runs(&refs, &mut runs);
        assert_eq!(runs, vec![0..5]);
        let mut out = Vec::new();
        build_coalesced(&refs, &mut out);
        let hdr = VnetHdr::decode(&out).unwrap();
        let ip_hlen = if v6 { 40 } else { 20 };
        assert_eq!(hdr.gso_type, if v6 { GSO_TCPV6 } else { GSO_TCPV4 });
        assert_eq!(
            (hdr.flags, hdr.gso_size, hdr.csum_start, hdr.csum_offset),
            (F_NEEDS_CSUM, 1200, ip_hlen as u16, 16)
        );
        let ip = &out[VNET_HDR_LEN..];
        assert_eq!(ip[ip_hlen + 13], ACK | TCP_PSH, "PSH of the last segment");
        // Splitting it again (what the kernel does) gives back the same segments.
        let (mut again, mut r2) = (Vec::new(), Vec::new());
        gso_split(&hdr, ip, &mut again, &mut r2).unwrap();
        let again: Vec<&[u8]> = r2.into_iter().map(|r| &again[r]).collect();
        if v6 {
            assert_eq!(again, refs);
        } else {
            // IPv4 ids were taken from the first segment and incremented, as the originals.
            for (a, b) in again.iter().zip(&refs) {
                assert_eq!(a, b);
            }
        }
    }
}

#[test]
#[allow(clippy::single_range_in_vec_init)]
fn coalescing_stops_at_flow_changes_gaps_and_control_flags() {
    let a = split(false, 3000, 1000, ACK, 1000); // seq 1000, 2000, 3000
    let b = split(false, 2000, 1000, ACK, 4000); // continues a
    let gap = split(false, 1000, 1000, ACK, 9000);
    let syn = tcp_packet(false, 100, ACK | 0x02, 10_000);
    let mut other_flow = split(false, 1000, 1000, ACK, 5000);
    other_flow[0][22] = 0x9d; // source port
    let short_then_long = [
        split(false, 500, 500, ACK, 1),
        split(false, 1000, 1000, ACK, 501),
    ]
    .concat();

    type Case<'a> = (Vec<&'a [u8]>, Vec<Range<usize>>);
    let cases: Vec<Case> = vec![
        (a.iter().chain(&b).map(Vec::as_slice).collect(), vec![0..5]),
        (
            a.iter().chain(&gap).map(Vec::as_slice).collect(),
            vec![0..3, 3..4],
        ),
        (
            a.iter()
                .map(Vec::as_slice)
                .chain([syn.as_slice()])
                .chain(b.iter().map(Vec::as_slice))
                .collect(),
            vec![0..3, 3..4, 4..6],
        ),
        (
            a.iter().chain(&other_flow).map(Vec::as_slice).collect(),
            vec![0..3, 3..4],
        ),
        (
            short_then_long.iter().map(Vec::as_slice).collect(),
            vec![0..1, 1..2],
        ),
    ];
    for (i, (pkts, want)) in cases.into_iter().enumerate() {
        let mut runs = Vec::new();
        coalesce_runs(&pkts, &mut runs);
        assert_eq!(runs, want, "case {i}");
    }
}

#[test]
fn a_psh_segment_ends_its_run() {
    let first = split(false, 2000, 1000, ACK | TCP_PSH, 0); // PSH on the second
    let next = split(false, 1000, 1000, ACK, 2000);
    let pkts: Vec<&[u8]> = first.iter().chain(&next).map(Vec::as_slice).collect();
    let mut runs = Vec::new();
    coalesce_runs(&pkts, &mut runs);
    assert_eq!(runs, vec![0..2, 2..3]);
}

/// A UDP super-packet as a USO-capable TUN hands it over (checksum = pseudo-header sum).
fn udp_super(v6: bool, payload: usize, size: u16) -> (VnetHdr, Vec<u8>) {
    let mut p = Vec::new();
    let udp_len = 8 + payload;
    if v6 {
        p.extend_from_slice(&[0x60, 0, 0, 0]);
        p.extend_from_slice(&(udp_len as u16).to_be_bytes());
        p.extend_from_slice(&[17, 64]);
        p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    } else {
        p.extend_from_slice(&[0x45, 0]);
        p.extend_from_slice(&((20 + udp_len) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 7, 0x40, 0, 64, 17, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2]);
    }
    let ip_hlen = p.len();
    p.extend_from_slice(&[0x30, 0x39, 0x01, 0xbb]);
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend((0..payload).map(|i| (i % 253) as u8));
    // pseudo() writes protocol 6; UDP is 17.
    let mut ps = pseudo(&p, udp_len);
    if v6 {
        ps[39] = 17;
    } else {
        ps[9] = 17;
    }
    let partial = !reference_checksum(&[&ps]);
    p[ip_hlen + 6..ip_hlen + 8].copy_from_slice(&partial.to_be_bytes());
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_UDP_L4,
        hdr_len: (ip_hlen + 8) as u16,
        gso_size: size,
        csum_start: ip_hlen as u16,
        csum_offset: 6,
    };
    (hdr, p)
}

#[test]
fn uso_super_packets_split_into_valid_datagrams() {
    for (v6, payload, size) in [(false, 3500, 1200), (true, 3600, 1200), (false, 100, 1200)] {
        let (hdr, pkt) = udp_super(v6, payload, size);
        let (mut out, mut segs) = (Vec::new(), Vec::new());
        gso_split(&hdr, &pkt, &mut out, &mut segs).expect("splits");
        let size = usize::from(size);
        let n = payload.div_ceil(size);
        assert_eq!(segs.len(), n);
        let ip_hlen = if v6 { 40 } else { 20 };
        let mut rebuilt = Vec::new();
        for (i, r) in segs.iter().enumerate() {
            let s = &out[r.clone()];
            let want = if i + 1 == n { payload - i * size } else { size };
            assert_eq!(s.len(), ip_hlen + 8 + want);
            let udp_len = usize::from(u16::from_be_bytes([s[ip_hlen + 4], s[ip_hlen + 5]]));
            assert_eq!(udp_len, 8 + want);
            let mut ps = pseudo(s, udp_len);
            if v6 {
                ps[39] = 17;
            } else {
                ps[9] = 17;
                assert_eq!(reference_checksum(&[&s[..20]]), 0, "IPv4 header checksum");
                assert_eq!(u16::from_be_bytes([s[4], s[5]]), 7 + i as u16);
                assert_eq!(usize::from(u16::from_be_bytes([s[2], s[3]])), s.len());
            }
            assert_eq!(
                reference_checksum(&[&ps, &s[ip_hlen..]]),
                0,
                "UDP checksum of {i}"
            );
            rebuilt.extend_from_slice(&s[ip_hlen + 8..]);
        }
        assert_eq!(rebuilt, pkt[ip_hlen + 8..]);
    }
    let (hdr, mut pkt) = udp_super(false, 3000, 1000);
    pkt[9] = 6;
    assert_eq!(
        gso_split(&hdr, &pkt, &mut Vec::new(), &mut Vec::new()),
        Err(OffloadError::NotUdp)
    );
}
