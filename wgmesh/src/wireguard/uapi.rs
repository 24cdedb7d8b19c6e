//! Client of the WireGuard cross-platform UAPI (`/var/run/wireguard/<ifname>.sock`), as spoken by
//! boringtun and wireguard-go. Written here rather than taken from defguard_wireguard_rs because its
//! userspace client treats unreadable answers as success (`parse_errno` returns 0), which would hide a
//! wedged device. Every `set` here is one peer per transaction with every field written out: boringtun
//! carries per-peer fields over to the next peer of the same transaction, and panics when asked to
//! modify an existing peer, so an update is a remove followed by an add (libraries.md, pitfalls 3-4).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use ipnet::IpNet;
use wgmesh_api::PublicKey;
use zeroize::Zeroizing;

use super::{Backend, DeviceState, Error, WgDevice};
use crate::{
    keys::PrivateKey,
    mesh::{ObservedPeer, PeerSpec},
};

/// Where userspace WireGuard implementations put their sockets. Shared by all network namespaces.
pub const UAPI_DIR: &str = "/var/run/wireguard";
/// A device that does not answer within this time is wedged (or gone).
const UAPI_TIMEOUT: Duration = Duration::from_secs(5);
/// Peers per `set` transaction when adding many (about 150 bytes each): Kubernetes' 5,000-node
/// limit fits in one (~750 KB). One transaction, not many: between transactions the device's
/// timers start handshakes with the peers added so far, and that work would then compete with
/// adding the rest.
const UAPI_BATCH: usize = 8192;

pub fn socket_path(ifname: &str) -> PathBuf {
    PathBuf::from(UAPI_DIR).join(format!("{ifname}.sock"))
}

#[derive(Debug, Clone)]
pub struct UapiDevice {
    ifname: String,
    path: PathBuf,
}

impl UapiDevice {
    pub fn new(ifname: &str) -> Self {
        Self {
            ifname: ifname.to_owned(),
            path: socket_path(ifname),
        }
    }

    /// True when a device answers on the socket.
    pub fn is_alive(&self) -> bool {
        self.read().is_ok()
    }

    fn connect(&self) -> Result<UnixStream, Error> {
        let s = UnixStream::connect(&self.path).map_err(|source| Error::Connect {
            ifname: self.ifname.clone(),
            path: self.path.clone(),
            source,
        })?;
        s.set_read_timeout(Some(UAPI_TIMEOUT))
            .map_err(|e| self.io(e))?;
        s.set_write_timeout(Some(UAPI_TIMEOUT))
            .map_err(|e| self.io(e))?;
        Ok(s)
    }

    fn io(&self, source: std::io::Error) -> Error {
        Error::Io {
            ifname: self.ifname.clone(),
            source,
        }
    }

    /// Sends one `set=1` transaction and checks its errno.
    fn set(&self, operation: &'static str, body: &str) -> Result<(), Error> {
        let mut s = self.connect()?;
        let mut msg = Zeroizing::new(String::with_capacity(body.len() + 8));
        msg.push_str("set=1\n");
        msg.push_str(body);
        msg.push('\n');
        s.write_all(msg.as_bytes()).map_err(|e| self.io(e))?;
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader.read_line(&mut line).map_err(|e| self.io(e))?;
            if n == 0 {
                return Err(Error::Protocol {
                    ifname: self.ifname.clone(),
                    detail: format!("connection closed before errno after `{operation}`"),
                });
            }
            if let Some(v) = line.trim_end().strip_prefix("errno=") {
                let errno: i32 = v.parse().map_err(|_| Error::Protocol {
                    ifname: self.ifname.clone(),
                    detail: format!("errno {v:?} is not a number"),
                })?;
                return if errno == 0 {
                    Ok(())
                } else {
                    Err(Error::Refused {
                        ifname: self.ifname.clone(),
                        operation,
                        errno,
                    })
                };
            }
        }
    }
}

/// Formats a full peer section: every field explicit, so nothing leaks in from another peer.
pub fn peer_section(p: &PeerSpec) -> String {
    let mut s = format!(
        "public_key={}\nendpoint={}\npersistent_keepalive_interval={}\nreplace_allowed_ips=true\n",
        p.public_key.to_hex(),
        p.endpoint,
        p.keepalive
    );
    for ip in &p.allowed_ips {
        s.push_str(&format!("allowed_ip={ip}\n"));
    }
    s
}

/// Parses a `get=1` answer. The private key is reduced to its public key immediately.
pub fn parse_get(ifname: &str, text: &str) -> Result<DeviceState, Error> {
    let proto = |detail: String| Error::Protocol {
        ifname: ifname.to_owned(),
        detail,
    };
    let mut state = DeviceState::default();
    let mut current: Option<(PublicKey, ObservedPeer)> = None;
    let mut hs_sec: Option<u64> = None;
    let mut hs_nsec: u64 = 0;
    let mut errno: Option<i32> = None;
    let finish = |cur: &mut Option<(PublicKey, ObservedPeer)>,
                  hs_sec: &mut Option<u64>,
                  hs_nsec: &mut u64,
                  peers: &mut BTreeMap<PublicKey, ObservedPeer>| {
        if let Some((k, mut p)) = cur.take() {
            p.last_handshake = match hs_sec.take() {
                Some(0) | None if *hs_nsec == 0 => None,
                s => Some(SystemTime::UNIX_EPOCH + Duration::new(s.unwrap_or(0), *hs_nsec as u32)),
            };
            *hs_nsec = 0;
            peers.insert(k, p);
        }
    };
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(proto(format!(
                "line without '=': {:?}",
                line.chars().take(40).collect::<String>()
            )));
        };
        match k {
            "private_key" => {
                let hex = Zeroizing::new(v.to_owned());
                let key = PrivateKey::from_hex(&hex)
                    .ok_or_else(|| proto("unreadable private_key".into()))?;
                state.public_key = Some(key.public_key());
            }
            "listen_port" => {
                state.listen_port = v.parse().map_err(|_| proto(format!("listen_port {v:?}")))?
            }
            "fwmark" => state.fwmark = v.parse().map_err(|_| proto(format!("fwmark {v:?}")))?,
            "public_key" => {
                finish(&mut current, &mut hs_sec, &mut hs_nsec, &mut state.peers);
                let key = PublicKey::from_hex(v).map_err(|e| proto(format!("public_key: {e}")))?;
                current = Some((key, ObservedPeer::default()));
            }
            "errno" => errno = Some(v.parse().map_err(|_| proto(format!("errno {v:?}")))?),
            _ => {
                let Some((_, p)) = current.as_mut() else {
                    // Device-level keys we do not use (e.g. a future protocol field).
                    continue;
                };
                match k {
                    "endpoint" => {
                        p.endpoint = Some(
                            v.parse::<SocketAddr>()
                                .map_err(|_| proto(format!("endpoint {v:?}")))?,
                        )
                    }
                    "allowed_ip" => p.allowed_ips.push(
                        v.parse::<IpNet>()
                            .map_err(|_| proto(format!("allowed_ip {v:?}")))?
                            .trunc(),
                    ),
                    "persistent_keepalive_interval" => p.keepalive = v.parse().unwrap_or(0),
                    "last_handshake_time_sec" => hs_sec = v.parse().ok(),
                    "last_handshake_time_nsec" => hs_nsec = v.parse().unwrap_or(0),
                    "rx_bytes" => p.rx_bytes = v.parse().unwrap_or(0),
                    "tx_bytes" => p.tx_bytes = v.parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
    }
    finish(&mut current, &mut hs_sec, &mut hs_nsec, &mut state.peers);
    match errno {
        Some(0) => Ok(state),
        Some(e) => Err(Error::Refused {
            ifname: ifname.to_owned(),
            operation: "get",
            errno: e,
        }),
        None => Err(proto("answer without errno".into())),
    }
}

impl super::DeviceReader for UapiDevice {
    fn read_state(&self) -> Result<DeviceState, Error> {
        self.read()
    }
}

impl WgDevice for UapiDevice {
    fn reader(&self) -> std::sync::Arc<dyn super::DeviceReader> {
        std::sync::Arc::new(self.clone())
    }

    fn backend(&self) -> Backend {
        Backend::Userspace
    }

    fn interface(&self) -> &str {
        &self.ifname
    }

    fn read(&self) -> Result<DeviceState, Error> {
        let mut s = self.connect()?;
        s.write_all(b"get=1\n\n").map_err(|e| self.io(e))?;
        let mut reader = BufReader::new(s);
        let mut text = Zeroizing::new(String::new());
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader.read_line(&mut line).map_err(|e| self.io(e))?;
            if n == 0 {
                break;
            }
            text.push_str(&line);
            if line.starts_with("errno=") {
                break;
            }
        }
        zeroize::Zeroize::zeroize(&mut line);
        parse_get(&self.ifname, &text)
    }

    fn set_identity(&mut self, key: &PrivateKey, listen_port: u16) -> Result<(), Error> {
        // Only what differs: a listen_port line makes boringtun rebind its sockets and close every
        // peer's connected socket, which a key rotation does not need.
        let current = self.read()?;
        let mut body = Zeroizing::new(String::new());
        if current.public_key != Some(key.public_key()) {
            body.push_str("private_key=");
            body.push_str(&key.to_hex());
            body.push('\n');
        }
        if current.listen_port != listen_port {
            body.push_str(&format!("listen_port={listen_port}\n"));
        }
        if body.is_empty() {
            return Ok(());
        }
        self.set("set identity", &body)
    }

    fn add_peer(&mut self, peer: &PeerSpec) -> Result<(), Error> {
        self.set("add peer", &peer_section(peer))
    }

    fn add_peers(&mut self, peers: &[PeerSpec]) -> Result<(), Error> {
        // New peers only, every field spelled out per peer, so batching is safe (the field leak
        // between sections cannot change anything) and turns thousands of round trips into a few.
        for chunk in peers.chunks(UAPI_BATCH) {
            let body: String = chunk.iter().map(peer_section).collect();
            self.set("add peers", &body)?;
        }
        Ok(())
    }

    fn update_peer(&mut self, peer: &PeerSpec) -> Result<(), Error> {
        self.update_peers(std::slice::from_ref(peer))
    }

    fn update_peers(&mut self, peers: &[PeerSpec]) -> Result<(), Error> {
        // boringtun panics on in-place peer updates: remove, then add, as two transactions, each
        // covering every peer to update (one round trip each instead of two per peer: a change
        // that touches every peer, like host encryption coming on, costs two transactions).
        for chunk in peers.chunks(UAPI_BATCH) {
            let body: String = chunk
                .iter()
                .map(|p| format!("public_key={}\nremove=true\n", p.public_key.to_hex()))
                .collect();
            self.set("remove peers to update", &body)?;
            self.add_peers(chunk)?;
        }
        Ok(())
    }

    fn remove_peer(&mut self, key: &PublicKey) -> Result<(), Error> {
        self.set(
            "remove peer",
            &format!("public_key={}\nremove=true\n", key.to_hex()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_answer_is_parsed_and_private_key_reduced_to_public() {
        let private = PrivateKey::generate().unwrap();
        let peer = PublicKey::from_bytes([7; 32]);
        let text = format!(
            "private_key={}\nlisten_port=51820\npublic_key={}\npersistent_keepalive_interval=25\n\
             endpoint=192.0.2.12:51820\nallowed_ip=198.18.2.0/24\nallowed_ip=2001:db8:2::/64\n\
             last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\nrx_bytes=10\ntx_bytes=20\nerrno=0\n",
            private.to_hex().as_str(),
            peer.to_hex()
        );
        let st = parse_get("wg0", &text).unwrap();
        assert_eq!(st.public_key, Some(private.public_key()));
        assert_eq!(st.listen_port, 51820);
        let p = &st.peers[&peer];
        assert_eq!(p.endpoint, Some("192.0.2.12:51820".parse().unwrap()));
        assert_eq!(p.allowed_ips.len(), 2);
        assert_eq!(p.keepalive, 25);
        assert_eq!((p.rx_bytes, p.tx_bytes), (10, 20));
        assert_eq!(
            p.last_handshake,
            Some(SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5))
        );
        assert!(!format!("{st:?}").contains(private.to_hex().as_str()));
    }

    #[test]
    fn peer_without_handshake_and_errors_are_reported() {
        let peer = PublicKey::from_bytes([7; 32]);
        let st = parse_get(
            "wg0",
            &format!("public_key={}\nrx_bytes=0\nerrno=0\n", peer.to_hex()),
        )
        .unwrap();
        assert_eq!(st.peers[&peer].last_handshake, None);
        assert!(matches!(
            parse_get("wg0", "errno=22\n"),
            Err(Error::Refused { errno: 22, .. })
        ));
        assert!(matches!(
            parse_get("wg0", "listen_port=1\n"),
            Err(Error::Protocol { .. })
        ));
        assert!(matches!(
            parse_get("wg0", "public_key=zz\nerrno=0\n"),
            Err(Error::Protocol { .. })
        ));
    }

    #[test]
    fn peer_section_spells_out_every_field() {
        let p = PeerSpec {
            node: "b".into(),
            public_key: PublicKey::from_bytes([7; 32]),
            endpoint: "192.0.2.12:51820".parse().unwrap(),
            allowed_ips: vec!["198.18.2.0/24".parse().unwrap()],
            keepalive: 0,
        };
        let s = peer_section(&p);
        for want in [
            "endpoint=192.0.2.12:51820\n",
            "persistent_keepalive_interval=0\n",
            "replace_allowed_ips=true\n",
            "allowed_ip=198.18.2.0/24\n",
        ] {
            assert!(s.contains(want), "{want} missing in {s}");
        }
    }

    /// Given a device socket that records every transaction,
    /// when three peers are updated at once,
    /// then the device sees two transactions: every removal, then every peer spelled out again
    /// (not two per peer: a change touching every peer stays two round trips).
    #[test]
    fn peer_updates_are_two_transactions_whatever_their_number() {
        use std::{io::BufRead as _, os::unix::net::UnixListener};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wg0.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for stream in listener.incoming().take(2) {
                let stream = stream.unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut body = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap() == 0 || line == "\n" {
                        break;
                    }
                    body.push_str(&line);
                }
                (&stream).write_all(b"errno=0\n\n").unwrap();
                seen.push(body);
            }
            seen
        });
        let mut dev = UapiDevice {
            ifname: "wg0".into(),
            path,
        };
        let peers: Vec<PeerSpec> = (1..=3u8)
            .map(|n| PeerSpec {
                node: format!("n{n}"),
                public_key: PublicKey::from_bytes([n; 32]),
                endpoint: format!("192.0.2.{n}:51820").parse().unwrap(),
                allowed_ips: vec![format!("198.18.{n}.0/24").parse().unwrap()],
                keepalive: 25,
            })
            .collect();
        dev.update_peers(&peers).unwrap();
        let seen = server.join().unwrap();
        assert_eq!(seen.len(), 2, "{seen:?}");
        let removes: String = peers
            .iter()
            .map(|p| format!("public_key={}\nremove=true\n", p.public_key.to_hex()))
            .collect();
        assert_eq!(seen[0], format!("set=1\n{removes}"));
        let adds: String = peers.iter().map(peer_section).collect();
        assert_eq!(seen[1], format!("set=1\n{adds}"));
    }
}
