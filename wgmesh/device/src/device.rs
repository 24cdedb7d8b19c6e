//! The device: peers and their boringtun `Tunn`s, the encrypt (TUN→UDP) and decrypt (UDP→TUN)
//! threads, and the control thread (UAPI socket, timers, exit conditions).
//!
//! Locking: `Shared::state` (RwLock) before a peer's `Mutex`, never the other way round. The hot
//! paths take the state read lock once per batch; only UAPI `set` takes it for writing.

use std::{
    collections::{BTreeMap, HashMap, hash_map::RandomState},
    hash::{BuildHasher as _, Hasher as _},
    io::{self, BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr},
    os::{
        fd::AsRawFd as _,
        unix::{
            fs::MetadataExt as _,
            net::{UnixListener, UnixStream},
        },
    },
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use defguard_boringtun::{
    device::allowed_ips::AllowedIps,
    noise::{
        Packet, Tunn, TunnResult, errors::WireGuardError, handshake::parse_handshake_anon,
        rate_limiter::RateLimiter,
    },
    x25519::{PublicKey, StaticSecret},
};
use ipnet::IpNet;
use parking_lot::{Mutex, RwLock};
use zeroize::Zeroizing;

use crate::{
    Error,
    offload::{self, GSO_NONE, VNET_HDR_LEN, VnetHdr},
    tun::{TunQueue, poll_in},
    uapi::{self, DeviceStatus, Key, PeerStatus, PeerUpdate, SetRequest},
    udp::{Receiver, Sender, UdpSockets},
};

/// Handshake initiations per second before cookies are demanded (boringtun's device uses 100).
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// How often every peer's timers run (WireGuard's timer granularity).
const TIMER_TICK: Duration = Duration::from_millis(250);
/// How often the UAPI socket file is checked (its removal stops the device).
const SOCKET_CHECK: Duration = Duration::from_secs(1);
/// Poll timeout of the I/O threads: bounds how long they take to notice a stop or new sockets.
const POLL_MS: i32 = 100;
/// A UAPI client that stalls longer than this is dropped.
const UAPI_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest TUN read: 64 KiB super-packet plus the vnet header.
const TUN_BUF: usize = 65_536 + VNET_HDR_LEN;
/// Encrypted output of one TUN read: 64 KiB of payload cut into ≥ 536-byte segments, each with its
/// own headers and 32 bytes of WireGuard overhead, stays well below this.
const SEND_BUF: usize = 256 * 1024;

/// Set by SIGTERM/SIGINT when the device handles signals.
static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

/// How to run the device.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Threads reading the TUN and encrypting (one TUN queue each).
    pub tx_threads: usize,
    /// Threads receiving UDP and decrypting.
    pub rx_threads: usize,
    /// Where the UAPI socket goes (`<dir>/<ifname>.sock`).
    pub uapi_dir: PathBuf,
    /// Stop on SIGTERM/SIGINT (installs process-wide handlers).
    pub handle_signals: bool,
    /// Merge consecutive TCP segments of a flow into one TUN write (GRO).
    pub coalesce: bool,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            tx_threads: 1,
            rx_threads: 1,
            uapi_dir: PathBuf::from("/var/run/wireguard"),
            handle_signals: true,
            coalesce: true,
        }
    }
}

impl DeviceConfig {
    /// Splits a total thread count between the two directions (at least one each).
    pub fn with_threads(threads: usize) -> Self {
        let tx = (threads / 2).max(1);
        Self {
            tx_threads: tx,
            rx_threads: threads.saturating_sub(tx).max(1),
            ..Self::default()
        }
    }
}

// === peers ===

struct Peer {
    public: [u8; 32],
    /// The 24-bit index boringtun puts in the top of our session indices.
    index: u32,
    state: Mutex<PeerState>,
}

struct PeerState {
    tunn: Option<Tunn>,
    endpoint: Option<SocketAddr>,
    keepalive: u16,
    psk: Option<Key>,
    /// Last time anything was sent to the peer (persistent keepalive is ours, not boringtun's, so
    /// that it can change without a new `Tunn`).
    last_sent: Option<Instant>,
}

struct State {
    key: Option<(StaticSecret, PublicKey)>,
    rate_limiter: Option<Arc<RateLimiter>>,
    fwmark: u32,
    sockets: Arc<UdpSockets>,
    peers: BTreeMap<[u8; 32], Arc<Peer>>,
    by_idx: HashMap<u32, Arc<Peer>>,
    allowed: AllowedIps<Arc<Peer>>,
    next_idx: u32,
}

fn new_tunn(
    key: &(StaticSecret, PublicKey),
    peer: &[u8; 32],
    psk: &Option<Key>,
    index: u32,
) -> Tunn {
    Tunn::new(
        key.0.clone(),
        PublicKey::from(*peer),
        psk.as_ref().map(|k| k.0),
        None,
        index,
        None,
    )
}

impl State {
    fn alloc_index(&mut self) -> u32 {
        loop {
            self.next_idx = (self.next_idx + 1) & 0x00ff_ffff;
            if !self.by_idx.contains_key(&self.next_idx) {
                return self.next_idx;
            }
        }
    }

    fn remove_peer(&mut self, key: &[u8; 32]) {
        if let Some(p) = self.peers.remove(key) {
            self.by_idx.remove(&p.index);
            self.allowed.remove(&|q: &Arc<Peer>| Arc::ptr_eq(q, &p));
            // Its session ends here, also for a thread still holding the peer (a timer tick in
            // flight): with no Tunn there is nothing left to send.
            p.state.lock().tunn = None;
        }
    }

    fn set_private_key(&mut self, key: Option<Key>) {
        let Some(key) = key else {
            self.key = None;
            self.rate_limiter = None;
            for p in self.peers.values() {
                p.state.lock().tunn = None;
            }
            return;
        };
        let secret = StaticSecret::from(key.0);
        let public = PublicKey::from(&secret);
        if self.key.as_ref().is_some_and(|(_, p)| *p == public) {
            return;
        }
        // A peer with our own key makes no sense (wireguard-go drops it too).
        self.remove_peer(public.as_bytes());
        self.rate_limiter = Some(Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)));
        let pair = (secret, public);
        for p in self.peers.values() {
            let mut ps = p.state.lock();
            match ps.tunn.as_mut() {
                Some(t) => t.set_static_private(pair.0.clone(), pair.1, None),
                None => ps.tunn = Some(new_tunn(&pair, &p.public, &ps.psk, p.index)),
            }
        }
        self.key = Some(pair);
    }

    fn apply_peer(&mut self, u: PeerUpdate) {
        if self
            .key
            .as_ref()
            .is_some_and(|(_, p)| *p.as_bytes() == u.public_key)
        {
            return;
        }
        if u.remove {
            self.remove_peer(&u.public_key);
            return;
        }
        let (peer, created) = match self.peers.get(&u.public_key) {
            Some(p) => (Arc::clone(p), false),
            None if u.update_only => return,
            None => {
                let index = self.alloc_index();
                let psk = u.preshared_key.clone().flatten();
                let tunn = self
                    .key
                    .as_ref()
                    .map(|k| new_tunn(k, &u.public_key, &psk, index));
                let p = Arc::new(Peer {
                    public: u.public_key,
                    index,
                    state: Mutex::new(PeerState {
                        tunn,
                        endpoint: None,
                        keepalive: 0,
                        psk,
                        last_sent: None,
                    }),
                });
                self.peers.insert(u.public_key, Arc::clone(&p));
                self.by_idx.insert(index, Arc::clone(&p));
                (p, true)
            }
        };
        {
            let mut ps = peer.state.lock();
            if let Some(psk) = u.preshared_key
                && !created
                && ps.psk != psk
            {
                // boringtun cannot change the PSK of a Tunn: a new one (new handshake).
                ps.psk = psk;
                ps.tunn = self
                    .key
                    .as_ref()
                    .map(|k| new_tunn(k, &peer.public, &ps.psk, peer.index));
            }
            if let Some(ep) = u.endpoint {
                ps.endpoint = Some(ep);
            }
            if let Some(ka) = u.keepalive
                && ka != ps.keepalive
            {
                ps.keepalive = ka;
                // Like wireguard-go: a keepalive goes out right away (next tick).
                ps.last_sent = None;
            }
        }
        if u.replace_allowed_ips && !created {
            self.allowed.remove(&|q: &Arc<Peer>| Arc::ptr_eq(q, &peer));
        }
        for net in u.allowed_ips {
            self.allowed
                .insert(net.addr(), u32::from(net.prefix_len()), Arc::clone(&peer));
        }
    }

    fn status(&self) -> DeviceStatus {
        let mut ips: HashMap<u32, Vec<IpNet>> = HashMap::new();
        for (p, addr, cidr) in self.allowed.iter() {
            if let Ok(net) = IpNet::new(addr, cidr) {
                ips.entry(p.index).or_default().push(net);
            }
        }
        DeviceStatus {
            private_key: self.key.as_ref().map(|(s, _)| Key(s.to_bytes())),
            listen_port: self.sockets.port,
            fwmark: self.fwmark,
            peers: self
                .peers
                .values()
                .map(|p| {
                    let ps = p.state.lock();
                    let (hs, tx, rx) = match &ps.tunn {
                        Some(t) => {
                            let (_, tx, rx, _, _) = t.stats();
                            (t.last_handshake_time(), tx as u64, rx as u64)
                        }
                        None => (None, 0, 0),
                    };
                    PeerStatus {
                        public_key: p.public,
                        preshared_key: ps.psk.clone(),
                        endpoint: ps.endpoint,
                        last_handshake: hs,
                        tx_bytes: tx,
                        rx_bytes: rx,
                        keepalive: ps.keepalive,
                        allowed_ips: ips.remove(&p.index).unwrap_or_default(),
                    }
                })
                .collect(),
        }
    }
}

// === impl Device ===

struct Shared {
    name: String,
    running: AtomicBool,
    tun: Vec<TunQueue>,
    state: RwLock<State>,
    gso: AtomicBool,
    socket_path: PathBuf,
    coalesce: bool,
}

/// A running device. Dropping it does not stop it; [`DeviceHandle::stop`] or removing the UAPI
/// socket does.
pub struct DeviceHandle {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl DeviceHandle {
    /// Creates the TUN `name`, binds a UDP port, serves UAPI and starts the threads.
    pub fn start(name: &str, cfg: DeviceConfig) -> Result<Self, Error> {
        let tx = cfg.tx_threads.max(1);
        let rx = cfg.rx_threads.max(1);
        let tun = (0..tx.max(rx))
            .map(|_| TunQueue::open(name))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|source| Error::Tun {
                ifname: name.to_owned(),
                source,
            })?;
        let sockets = UdpSockets::bind(0, 0).map_err(|source| Error::Udp { port: 0, source })?;
        std::fs::create_dir_all(&cfg.uapi_dir).map_err(|source| Error::Uapi {
            path: cfg.uapi_dir.clone(),
            source,
        })?;
        let socket_path = cfg.uapi_dir.join(format!("{name}.sock"));
        let uapi_err = |source| Error::Uapi {
            path: socket_path.clone(),
            source,
        };
        match std::fs::remove_file(&socket_path) {
            Ok(()) => tracing::debug!(path = %socket_path.display(), "removed a stale UAPI socket"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(uapi_err(e)),
        }
        let listener = UnixListener::bind(&socket_path).map_err(uapi_err)?;
        listener.set_nonblocking(true).map_err(uapi_err)?;
        let ino = std::fs::metadata(&socket_path).map_err(uapi_err)?.ino();
        let seed = RandomState::new().build_hasher().finish() as u32;
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            running: AtomicBool::new(true),
            tun,
            state: RwLock::new(State {
                key: None,
                rate_limiter: None,
                fwmark: 0,
                sockets: Arc::new(sockets),
                peers: BTreeMap::new(),
                by_idx: HashMap::new(),
                allowed: AllowedIps::new(),
                next_idx: seed & 0x00ff_ffff,
            }),
            gso: AtomicBool::new(true),
            socket_path,
            coalesce: cfg.coalesce,
        });
        if cfg.handle_signals {
            install_signal_handlers();
        }
        let mut threads = Vec::new();
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map_err(|source| Error::Thread { source })
        };
        for q in 0..tx {
            let sh = Arc::clone(&shared);
            threads.push(spawn(
                format!("wg-tx{q}"),
                Box::new(move || tx_loop(&sh, q)),
            )?);
        }
        for q in 0..rx {
            let sh = Arc::clone(&shared);
            threads.push(spawn(
                format!("wg-rx{q}"),
                Box::new(move || rx_loop(&sh, q)),
            )?);
        }
        let sh = Arc::clone(&shared);
        threads.push(spawn(
            "wg-ctl".into(),
            Box::new(move || control_loop(sh, listener, ino, cfg.handle_signals)),
        )?);
        tracing::info!(
            ifname = name,
            tx_threads = tx,
            rx_threads = rx,
            "batched wireguard device running"
        );
        Ok(Self { shared, threads })
    }

    /// Asks every thread to stop (they notice within ~100 ms).
    pub fn stop(&self) {
        self.shared.running.store(false, Ordering::SeqCst);
    }

    /// Blocks until the device stopped (UAPI socket removed, SIGTERM/SIGINT, or [`Self::stop`]).
    pub fn wait(self) {
        for t in self.threads {
            if t.join().is_err() {
                tracing::error!(ifname = %self.shared.name, "a device thread panicked");
                self.shared.running.store(false, Ordering::SeqCst);
            }
        }
    }
}

fn install_signal_handlers() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

// === encrypt path: TUN → UDP ===

fn tx_loop(sh: &Shared, q: usize) {
    let tun = &sh.tun[q];
    let mut rbuf = vec![0u8; TUN_BUF];
    let mut plain = Vec::with_capacity(2 * TUN_BUF);
    let mut segs = Vec::with_capacity(64);
    let mut sbuf = vec![0u8; SEND_BUF];
    let mut lens = Vec::with_capacity(64);
    let mut sender = Sender::default();
    while sh.running.load(Ordering::Relaxed) {
        let n = match tun.read(&mut rbuf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Err(e) = poll_in(&[tun.raw()], POLL_MS) {
                    tracing::warn!(error = %e, "poll on the TUN failed");
                    std::thread::sleep(Duration::from_millis(POLL_MS as u64));
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "TUN read failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let Some(hdr) = VnetHdr::decode(&rbuf[..n]) else {
            continue;
        };
        let pkt = &mut rbuf[VNET_HDR_LEN..n];
        plain.clear();
        segs.clear();
        let split = if hdr.gso_type == GSO_NONE {
            offload::finish_checksum(&hdr, pkt).map(|()| {
                plain.extend_from_slice(pkt);
                segs.push(0..pkt.len());
            })
        } else {
            offload::gso_split(&hdr, pkt, &mut plain, &mut segs)
        };
        if let Err(e) = split {
            tracing::debug!(error = %e, "dropping a packet from the TUN");
            continue;
        }
        let Some(dst) = segs
            .first()
            .and_then(|r| Tunn::dst_address(&plain[r.clone()]))
        else {
            continue;
        };
        let st = sh.state.read();
        let Some(peer) = st.allowed.find(dst).cloned() else {
            continue;
        };
        lens.clear();
        let mut off = 0;
        let endpoint = {
            let mut ps = peer.state.lock();
            let Some(tunn) = ps.tunn.as_mut() else {
                continue;
            };
            for r in &segs {
                let src = &plain[r.clone()];
                let need = (src.len() + 32).max(148);
                if off + need > sbuf.len() {
                    break;
                }
                if let TunnResult::WriteToNetwork(p) =
                    tunn.encapsulate(src, &mut sbuf[off..off + need])
                {
                    lens.push(p.len());
                    off += p.len();
                }
            }
            if !lens.is_empty() {
                ps.last_sent = Some(Instant::now());
            }
            ps.endpoint
        };
        let Some(ep) = endpoint else {
            continue;
        };
        let Some(sock) = st.sockets.for_addr(&ep) else {
            continue;
        };
        if let Err(e) = sender.send(sock, &ep, &sbuf[..off], &lens, &sh.gso) {
            tracing::debug!(error = %e, endpoint = %ep, "UDP send failed");
        }
    }
}

// === decrypt path: UDP → TUN ===

/// Decrypted packets of one receive batch, each behind room for its vnet header.
struct Arena {
    buf: Vec<u8>,
    used: usize,
    pkts: Vec<std::ops::Range<usize>>,
}

fn rx_loop(sh: &Shared, q: usize) {
    let tun = &sh.tun[q % sh.tun.len()];
    let mut rcv = Receiver::default();
    let mut arena = Arena {
        buf: vec![0u8; crate::udp::RECV_BATCH * crate::udp::RECV_BUF * 2],
        used: 0,
        pkts: Vec::with_capacity(512),
    };
    let mut control: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
    let mut runs = Vec::with_capacity(64);
    let mut gro = Vec::with_capacity(TUN_BUF);
    while sh.running.load(Ordering::Relaxed) {
        let socks = Arc::clone(&sh.state.read().sockets);
        let fds = socks.fds();
        let ready = match poll_in(&fds, POLL_MS) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "poll on the UDP sockets failed");
                std::thread::sleep(Duration::from_millis(POLL_MS as u64));
                continue;
            }
        };
        for (i, r) in ready.into_iter().enumerate() {
            if !r {
                continue;
            }
            let sock = if i == 0 {
                &socks.v4
            } else {
                socks.v6.as_ref().expect("fd 1 is v6")
            };
            // Drain a little, then look at the other socket and the stop flag again.
            for _ in 0..64 {
                match rcv.recv(sock) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::debug!(error = %e, "UDP receive failed");
                        break;
                    }
                }
                arena.used = 0;
                arena.pkts.clear();
                control.clear();
                {
                    let st = sh.state.read();
                    for g in &rcv.got {
                        for dg in rcv.bufs[g.buf][..g.len].chunks(g.seg.max(1)) {
                            handle_datagram(&st, g.src, dg, &mut arena, &mut control);
                        }
                    }
                    for (to, pkt) in &control {
                        if let Some(s) = st.sockets.for_addr(to)
                            && let Err(e) = s.send_to(pkt, &(*to).into())
                        {
                            tracing::debug!(error = %e, endpoint = %to, "UDP send failed");
                        }
                    }
                }
                write_tun(sh, tun, &mut arena, &mut runs, &mut gro);
            }
        }
    }
}

fn handle_datagram(
    st: &State,
    src: SocketAddr,
    dg: &[u8],
    arena: &mut Arena,
    control: &mut Vec<(SocketAddr, Vec<u8>)>,
) {
    let peer = match Tunn::parse_incoming_packet(dg) {
        Err(_) => return,
        Ok(Packet::HandshakeInit(_)) => {
            let (Some((secret, public)), Some(rl)) = (&st.key, &st.rate_limiter) else {
                return;
            };
            let mut cookie = [0u8; 64];
            match rl.verify_packet(Some(src.ip()), dg, &mut cookie) {
                Ok(Packet::HandshakeInit(p)) => match parse_handshake_anon(secret, public, &p) {
                    Ok(hh) => st.peers.get(&hh.peer_static_public),
                    Err(_) => return,
                },
                Err(TunnResult::WriteToNetwork(c)) => {
                    control.push((src, c.to_vec()));
                    return;
                }
                _ => return,
            }
        }
        Ok(Packet::HandshakeResponse(p)) => st.by_idx.get(&(p.receiver_idx >> 8)),
        Ok(Packet::PacketCookieReply(p)) => st.by_idx.get(&(p.receiver_idx >> 8)),
        Ok(Packet::PacketData(p)) => st.by_idx.get(&(p.receiver_idx >> 8)),
    };
    let Some(peer) = peer else {
        return;
    };
    let start = arena.used;
    let room = dg.len().max(256);
    if start + VNET_HDR_LEN + room > arena.buf.len() {
        return;
    }
    let mut ps = peer.state.lock();
    let Some(tunn) = ps.tunn.as_mut() else {
        return;
    };
    let slot = &mut arena.buf[start + VNET_HDR_LEN..start + VNET_HDR_LEN + room];
    match tunn.decapsulate(Some(src.ip()), dg, slot) {
        TunnResult::Err(_) => return,
        TunnResult::Done => {}
        TunnResult::WriteToNetwork(p) => {
            control.push((src, p.to_vec()));
            // A completed handshake: send what waited for it.
            let mut buf = vec![0u8; 65_536 + 64];
            while let TunnResult::WriteToNetwork(p) = tunn.decapsulate(None, &[], &mut buf) {
                control.push((src, p.to_vec()));
            }
            ps.last_sent = Some(Instant::now());
        }
        TunnResult::WriteToTunnelV4(p, a) => {
            let len = p.len();
            if !allowed_from(st, peer, IpAddr::V4(a)) {
                return;
            }
            accept(arena, start, len);
        }
        TunnResult::WriteToTunnelV6(p, a) => {
            let len = p.len();
            if !allowed_from(st, peer, IpAddr::V6(a)) {
                return;
            }
            accept(arena, start, len);
        }
    }
    // Authenticated: the peer is where this came from (roaming).
    if ps.endpoint != Some(src) {
        ps.endpoint = Some(src);
    }
}

fn allowed_from(st: &State, peer: &Arc<Peer>, src: IpAddr) -> bool {
    st.allowed.find(src).is_some_and(|p| Arc::ptr_eq(p, peer))
}

fn accept(arena: &mut Arena, start: usize, len: usize) {
    arena.buf[start..start + VNET_HDR_LEN].fill(0);
    let end = start + VNET_HDR_LEN + len;
    arena.pkts.push(start..end);
    // Keep the next slot 8-byte aligned.
    arena.used = end.next_multiple_of(8);
}

fn write_tun(
    sh: &Shared,
    tun: &TunQueue,
    arena: &mut Arena,
    runs: &mut Vec<std::ops::Range<usize>>,
    gro: &mut Vec<u8>,
) {
    if arena.pkts.is_empty() {
        return;
    }
    let write = |b: &[u8]| {
        if let Err(e) = tun.write(b) {
            tracing::debug!(error = %e, "TUN write failed");
        }
    };
    if !sh.coalesce {
        for r in &arena.pkts {
            write(&arena.buf[r.clone()]);
        }
        return;
    }
    let ips: Vec<&[u8]> = arena
        .pkts
        .iter()
        .map(|r| &arena.buf[r.start + VNET_HDR_LEN..r.end])
        .collect();
    runs.clear();
    offload::coalesce_runs(&ips, runs);
    for run in runs.iter() {
        if run.len() == 1 {
            write(&arena.buf[arena.pkts[run.start].clone()]);
        } else {
            offload::build_coalesced(&ips[run.clone()], gro);
            write(gro);
        }
    }
}

// === control: UAPI, timers, exit ===

fn control_loop(sh: Arc<Shared>, listener: UnixListener, ino: u64, handle_signals: bool) {
    let mut last_tick = Instant::now();
    let mut last_check = Instant::now();
    let mut buf = vec![0u8; 65_536 + 64];
    loop {
        if !sh.running.load(Ordering::SeqCst) {
            break;
        }
        if handle_signals && SIGNALLED.load(Ordering::SeqCst) {
            tracing::info!(ifname = %sh.name, "signal received, stopping");
            break;
        }
        if let Ok(ready) = poll_in(&[listener.as_raw_fd()], POLL_MS)
            && ready[0]
        {
            while let Ok((stream, _)) = listener.accept() {
                // A thread per connection: a stalled client must not hold up the timers.
                let sh2 = Arc::clone(&sh);
                let spawned = std::thread::Builder::new()
                    .name("wg-uapi".into())
                    .spawn(move || {
                        if let Err(e) = serve_uapi(&sh2, stream) {
                            tracing::debug!(error = %e, "UAPI connection failed");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start a UAPI connection thread");
                }
            }
        }
        if last_tick.elapsed() >= TIMER_TICK {
            last_tick = Instant::now();
            run_timers(&sh, &mut buf);
        }
        if last_check.elapsed() >= SOCKET_CHECK {
            last_check = Instant::now();
            match std::fs::metadata(&sh.socket_path) {
                Ok(m) if m.ino() == ino => {}
                _ => {
                    tracing::info!(ifname = %sh.name, path = %sh.socket_path.display(), "UAPI socket removed, stopping");
                    break;
                }
            }
        }
    }
    sh.running.store(false, Ordering::SeqCst);
    if std::fs::metadata(&sh.socket_path).is_ok_and(|m| m.ino() == ino)
        && let Err(e) = std::fs::remove_file(&sh.socket_path)
    {
        tracing::warn!(error = %e, "cannot remove the UAPI socket");
    }
    tracing::info!(ifname = %sh.name, "batched wireguard device stopped");
}

fn run_timers(sh: &Shared, buf: &mut [u8]) {
    let mut out: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
    // Take the peer list and let go of the device lock before any crypto: a tick may start a
    // handshake with every peer (thousands right after a large `set`), and a UAPI `set` waiting
    // for the write lock must not wait for all of them.
    let (peers, sockets) = {
        let st = sh.state.read();
        if let Some(rl) = &st.rate_limiter {
            rl.reset_count();
        }
        let peers: Vec<Arc<Peer>> = st.peers.values().cloned().collect();
        (peers, Arc::clone(&st.sockets))
    };
    for p in &peers {
        let mut ps = p.state.lock();
        let ep = ps.endpoint;
        let keepalive = ps.keepalive;
        let last_sent = ps.last_sent;
        let Some(tunn) = ps.tunn.as_mut() else {
            continue;
        };
        let mut sent = false;
        match tunn.update_timers(buf) {
            TunnResult::WriteToNetwork(pkt) => {
                if let Some(ep) = ep {
                    out.push((ep, pkt.to_vec()));
                    sent = true;
                }
            }
            TunnResult::Err(WireGuardError::ConnectionExpired) => {}
            _ => {}
        }
        if !sent
            && keepalive > 0
            && ep.is_some()
            && last_sent.is_none_or(|t| t.elapsed() >= Duration::from_secs(keepalive.into()))
            && let TunnResult::WriteToNetwork(pkt) = tunn.encapsulate(&[], buf)
        {
            out.push((ep.expect("checked"), pkt.to_vec()));
            sent = true;
        }
        if sent {
            ps.last_sent = Some(Instant::now());
        }
    }
    for (to, pkt) in &out {
        if let Some(s) = sockets.for_addr(to)
            && let Err(e) = s.send_to(pkt, &(*to).into())
        {
            tracing::debug!(error = %e, endpoint = %to, "UDP send failed");
        }
    }
}

fn serve_uapi(sh: &Shared, stream: UnixStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(UAPI_TIMEOUT))?;
    stream.set_write_timeout(Some(UAPI_TIMEOUT))?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    let mut line = Zeroizing::new(String::new());
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        match line.trim_end_matches('\n') {
            "get=1" => {
                // The request ends with an empty line.
                loop {
                    line.clear();
                    if r.read_line(&mut line)? == 0 || line.as_str() == "\n" {
                        break;
                    }
                }
                let text = uapi::format_get(&sh.state.read().status());
                w.write_all(text.as_bytes())?;
            }
            "set=1" => {
                let mut body = Zeroizing::new(String::new());
                loop {
                    line.clear();
                    if r.read_line(&mut line)? == 0 || line.as_str() == "\n" {
                        break;
                    }
                    body.push_str(&line);
                }
                let errno = match uapi::parse_set(body.lines()) {
                    Ok(req) => match apply_set(sh, req) {
                        Ok(()) => 0,
                        Err(errno) => errno,
                    },
                    Err(e) => {
                        tracing::warn!(ifname = %sh.name, error = %e, "UAPI set refused");
                        e.errno()
                    }
                };
                w.write_all(format!("errno={errno}\n\n").as_bytes())?;
            }
            "" => continue,
            _ => {
                w.write_all(format!("errno={}\n\n", uapi::EINVAL).as_bytes())?;
                return Ok(());
            }
        }
    }
}

/// Applies a parsed `set`. The only step that can fail (binding a new port) runs first, so a
/// refused transaction changes nothing.
fn apply_set(sh: &Shared, req: SetRequest) -> Result<(), i32> {
    let mut st = sh.state.write();
    if let Some(port) = req.listen_port
        && port != st.sockets.port
    {
        let fwmark = req.fwmark.unwrap_or(st.fwmark);
        match UdpSockets::bind(port, fwmark) {
            Ok(s) => st.sockets = Arc::new(s),
            Err(e) => {
                tracing::warn!(ifname = %sh.name, port, error = %e, "cannot bind the listen port");
                return Err(if e.kind() == io::ErrorKind::AddrInUse {
                    uapi::EADDRINUSE
                } else {
                    uapi::EIO
                });
            }
        }
    }
    if let Some(mark) = req.fwmark
        && mark != st.fwmark
    {
        st.fwmark = mark;
        if let Err(e) = st.sockets.set_fwmark(mark) {
            tracing::warn!(ifname = %sh.name, error = %e, "cannot set the fwmark");
        }
    }
    if let Some(key) = req.private_key {
        st.set_private_key(key);
    }
    if req.replace_peers {
        let keys: Vec<[u8; 32]> = st.peers.keys().copied().collect();
        for k in keys {
            st.remove_peer(&k);
        }
    }
    for p in req.peers {
        st.apply_peer(p);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
