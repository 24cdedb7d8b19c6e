//! Two batched devices in two network namespaces joined by a veth, configured with `wg`, carrying
//! ping and TCP (iperf3) both ways. Needs root: `cargo test -p wgmesh-device -- --ignored`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

const UAPI_DIR: &str = "/var/run/wireguard";

/// `ip -n NS addr add CIDR dev DEV` (CIDR may carry flags after a space, like `nodad`).
fn add_addr(ns: &str, cidr: &str, dev: &str) {
    let mut args = vec!["ip", "-n", ns, "addr", "add"];
    let mut parts = cidr.split(' ');
    args.extend(parts.next());
    args.extend(["dev", dev]);
    args.extend(parts);
    run(&args);
}

fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn in_ns(ns: &str, args: &[&str]) -> Output {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    run(&v)
}

/// Everything the test creates; dropped (also on panic) it stops the devices and deletes the
/// namespaces, which takes the veth and the TUNs with them.
struct Testbed {
    ns: [String; 2],
    ifname: [String; 2],
    devices: Vec<Child>,
    _keys: tempfile::TempDir,
    keys: PathBuf,
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for c in &mut self.devices {
            let _ = c.kill();
            let _ = c.wait();
        }
        for i in 0..2 {
            let _ =
                std::fs::remove_file(Path::new(UAPI_DIR).join(format!("{}.sock", self.ifname[i])));
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns[i]])
                .status();
        }
    }
}

fn genkey() -> (String, String) {
    let k = String::from_utf8(run(&["wg", "genkey"]).stdout)
        .unwrap()
        .trim()
        .to_owned();
    let mut c = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(c.stdin.as_mut().unwrap(), k.as_bytes()).unwrap();
    let p = String::from_utf8(c.wait_with_output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_owned();
    (k, p)
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The peer line of `wg show <if> dump`: (endpoint, latest handshake, rx, tx).
fn dump(ns: &str, ifname: &str) -> (String, u64, u64, u64) {
    let out = String::from_utf8(in_ns(ns, &["wg", "show", ifname, "dump"]).stdout).unwrap();
    let peer: Vec<&str> = out
        .lines()
        .nth(1)
        .expect("a peer line")
        .split('\t')
        .collect();
    (
        peer[2].to_owned(),
        peer[4].parse().unwrap(),
        peer[5].parse().unwrap(),
        peer[6].parse().unwrap(),
    )
}

#[test]
#[ignore = "needs root: network namespaces, veth, TUN"]
fn two_devices_carry_ping_and_tcp_over_a_veth() {
    let tag = format!("{:05x}", std::process::id() & 0xfffff);
    let keys = tempfile::tempdir().unwrap();
    let mut tb = Testbed {
        ns: [format!("wgdev-{tag}-a"), format!("wgdev-{tag}-b")],
        ifname: [format!("wgd{tag}a"), format!("wgd{tag}b")],
        devices: Vec::new(),
        keys: keys.path().to_owned(),
        _keys: keys,
    };
    let veth = [format!("wdv{tag}a"), format!("wdv{tag}b")];
    let under = ["192.0.2.1", "192.0.2.2"];
    let tunnel = ["198.18.0.1", "198.18.0.2"];
    // IPv6 inside the tunnel (documentation prefix): the TCPv6 segmentation and coalescing paths.
    let tunnel6 = ["2001:db8:77::1", "2001:db8:77::2"];
    for i in 0..2 {
        run(&["ip", "netns", "add", &tb.ns[i]]);
        run(&["ip", "-n", &tb.ns[i], "link", "set", "lo", "up"]);
    }
    run(&[
        "ip", "link", "add", &veth[0], "netns", &tb.ns[0], "type", "veth", "peer", "name",
        &veth[1], "netns", &tb.ns[1],
    ]);
    let bin = env!("CARGO_BIN_EXE_wgmesh-device");
    let (k, p): (Vec<_>, Vec<_>) = (0..2).map(|_| genkey()).unzip();
    for i in 0..2 {
        add_addr(&tb.ns[i], &format!("{}/24", under[i]), &veth[i]);
        run(&["ip", "-n", &tb.ns[i], "link", "set", &veth[i], "up"]);
        let child = Command::new("ip")
            .args(["netns", "exec", &tb.ns[i], bin, &tb.ifname[i], "2"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        tb.devices.push(child);
        let sock = Path::new(UAPI_DIR).join(format!("{}.sock", tb.ifname[i]));
        wait_for("the UAPI socket", Duration::from_secs(5), || sock.exists());
        let key_file = tb.keys.join(format!("k{i}"));
        std::fs::write(&key_file, &k[i]).unwrap();
        let o = 1 - i;
        in_ns(
            &tb.ns[i],
            &[
                "wg",
                "set",
                &tb.ifname[i],
                "private-key",
                key_file.to_str().unwrap(),
                "listen-port",
                "51820",
                "peer",
                &p[o],
                "endpoint",
                &format!("{}:51820", under[o]),
                "allowed-ips",
                &format!("{}/32,{}/128", tunnel[o], tunnel6[o]),
            ],
        );
        add_addr(&tb.ns[i], &format!("{}/24", tunnel[i]), &tb.ifname[i]);
        // No duplicate address detection: the address is usable at once.
        add_addr(
            &tb.ns[i],
            &format!("{}/64 nodad", tunnel6[i]),
            &tb.ifname[i],
        );
        run(&[
            "ip",
            "-n",
            &tb.ns[i],
            "link",
            "set",
            &tb.ifname[i],
            "mtu",
            "1420",
            "up",
        ]);
    }
    in_ns(
        &tb.ns[0],
        &["ping", "-c", "3", "-i", "0.2", "-W", "2", tunnel[1]],
    );
    in_ns(
        &tb.ns[1],
        &["ping", "-c", "3", "-i", "0.2", "-W", "2", tunnel[0]],
    );
    in_ns(
        &tb.ns[0],
        &["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", tunnel6[1]],
    );

    // TCP both ways (-R: the server sends) and over IPv6, 50 MB each: exercises TSO split, UDP GSO/GRO and the
    // coalesced TUN writes; iperf3 fails on any stall or reset.
    for (server_addr, reverse) in [(tunnel[1], false), (tunnel[1], true), (tunnel6[1], false)] {
        let mut server = Command::new("ip")
            .args([
                "netns",
                "exec",
                &tb.ns[1],
                "iperf3",
                "-s",
                "-1",
                "-B",
                server_addr,
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut args = vec![
            "iperf3",
            "-c",
            server_addr,
            "-n",
            "50M",
            "--connect-timeout",
            "3000",
        ];
        if reverse {
            args.push("-R");
        }
        let mut ok = false;
        for _ in 0..20 {
            let mut v = vec!["ip", "netns", "exec", tb.ns[0].as_str()];
            v.extend_from_slice(&args);
            if Command::new(v[0])
                .args(&v[1..])
                .stdout(Stdio::null())
                .status()
                .unwrap()
                .success()
            {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100)); // server not listening yet
        }
        let _ = server.kill();
        let _ = server.wait();
        assert!(ok, "iperf3 to {server_addr} (reverse={reverse}) failed");
    }
    // UDP with GSO (UDP_SEGMENT) from the sender: the TUN hands the device one USO super-packet,
    // which it splits; the receiver must get the four datagrams as sent.
    let receiver = Command::new("ip")
        .args(["netns", "exec", &tb.ns[1], "timeout", "5", "python3", "-c"])
        .arg(format!(
            "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('{}',9999))\n\
             s.settimeout(3)\nd=[s.recv(65535) for _ in range(4)]\n\
             print(','.join(str(len(x)) for x in d), b''.join(d)==bytes(range(250))*14)",
            tunnel[1]
        ))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    in_ns(
        &tb.ns[0],
        &[
            "python3",
            "-c",
            &format!(
                "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
                 s.setsockopt(17,103,1000)\ns.sendto(bytes(range(250))*14,('{}',9999))",
                tunnel[1]
            ),
        ],
    );
    let got = receiver.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        "1000,1000,1000,500 True"
    );

    let (ep, hs, rx, tx) = dump(&tb.ns[0], &tb.ifname[0]);
    assert_eq!(ep, format!("{}:51820", under[1]));
    assert!(hs > 0, "a handshake is reported");
    assert!(
        rx > 50_000_000 && tx > 100_000_000,
        "byte counters count both transfers: rx {rx} tx {tx}"
    );

    // In-place update through `wg set` on a live peer: keepalive, one more allowed IP. The
    // session survives (same handshake time) and traffic still flows.
    in_ns(
        &tb.ns[0],
        &[
            "wg",
            "set",
            &tb.ifname[0],
            "peer",
            &p[1],
            "persistent-keepalive",
            "5",
            "allowed-ips",
            "198.18.0.2/32,198.19.7.0/24",
        ],
    );
    let shown =
        String::from_utf8(in_ns(&tb.ns[0], &["wg", "show", &tb.ifname[0], "allowed-ips"]).stdout)
            .unwrap();
    assert!(
        shown.contains("198.19.7.0/24") && shown.contains("198.18.0.2/32"),
        "{shown}"
    );
    in_ns(
        &tb.ns[0],
        &["ping", "-c", "2", "-i", "0.2", "-W", "2", tunnel[1]],
    );
    let (_, hs2, _, _) = dump(&tb.ns[0], &tb.ifname[0]);
    assert_eq!(hs2, hs, "no new handshake: the session was kept");
    // Bad input is refused with an errno and changes nothing.
    {
        use std::io::{Read as _, Write as _};
        let sock = Path::new(UAPI_DIR).join(format!("{}.sock", tb.ifname[0]));
        let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        c.write_all(b"set=1\nlisten_port=4000\nreplace_peers=true\nlisten_port=x\n\n")
            .unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "errno=22\n\n");
        let port = String::from_utf8(
            in_ns(&tb.ns[0], &["wg", "show", &tb.ifname[0], "listen-port"]).stdout,
        )
        .unwrap();
        assert_eq!(port.trim(), "51820");
        assert_eq!(
            dump(&tb.ns[0], &tb.ifname[0]).1,
            hs,
            "the peer is still there"
        );
    }

    // Removing the socket stops one device; SIGTERM stops the other; both exit cleanly.
    std::fs::remove_file(Path::new(UAPI_DIR).join(format!("{}.sock", tb.ifname[0]))).unwrap();
    let mut a = tb.devices.remove(0);
    let mut b = tb.devices.remove(0);
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = a.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "device did not exit after its socket was removed"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    // `ip netns exec` execs the device, so the child's pid is the device's.
    run(&["kill", "-TERM", &b.id().to_string()]);
    let status = b.wait().unwrap();
    assert!(status.success(), "SIGTERM exit: {status:?}");
    assert!(
        !Path::new(UAPI_DIR)
            .join(format!("{}.sock", tb.ifname[1]))
            .exists(),
        "socket removed on exit"
    );
}
