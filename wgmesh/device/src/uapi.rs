//! The WireGuard cross-platform UAPI text protocol (<https://www.wireguard.com/xplatform/>):
//! parsing a `set=1` transaction into a [`SetRequest`] (all of it, before anything is applied, so
//! bad input changes nothing) and formatting the `get=1` answer. No I/O here.

use std::{fmt::Write as _, net::SocketAddr, str::FromStr, time::Duration};

use ipnet::IpNet;
use zeroize::Zeroizing;

/// errno values the protocol answers with.
pub const EINVAL: i32 = 22;
pub const EPROTO: i32 = 71;
pub const EADDRINUSE: i32 = 98;
pub const EIO: i32 = 5;

/// A 32-byte key. Secret ones are wiped on drop; `Debug` never prints the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(pub [u8; 32]);

impl Drop for Key {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    fn is_zero(&self) -> bool {
        self.0.iter().all(|b| *b == 0)
    }
}

/// Why a `set` transaction was refused. Messages name the key, never a key's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UapiError {
    #[error("line {line} has no '='")]
    NoEquals { line: usize },
    #[error("unknown key {key:?} on line {line}")]
    UnknownKey { key: String, line: usize },
    #[error("{key} on line {line} is not 64 hex digits")]
    BadKey { key: &'static str, line: usize },
    #[error("{key}={value:?} on line {line} is invalid")]
    BadValue {
        key: &'static str,
        value: String,
        line: usize,
    },
    #[error("{key} on line {line} comes before any public_key")]
    PeerKeyOutsidePeer { key: &'static str, line: usize },
    #[error("protocol_version {0:?} is not supported (only 1)")]
    ProtocolVersion(String),
}

impl UapiError {
    pub fn errno(&self) -> i32 {
        match self {
            UapiError::ProtocolVersion(_) => EPROTO,
            _ => EINVAL,
        }
    }
}

/// One peer section of a `set`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerUpdate {
    pub public_key: [u8; 32],
    pub remove: bool,
    pub update_only: bool,
    /// `Some(None)`: clear the preshared key (all zeros).
    pub preshared_key: Option<Option<Key>>,
    pub endpoint: Option<SocketAddr>,
    pub keepalive: Option<u16>,
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<IpNet>,
}

/// A whole `set=1` transaction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SetRequest {
    /// `Some(None)`: remove the private key (all zeros).
    pub private_key: Option<Option<Key>>,
    pub listen_port: Option<u16>,
    /// 0 clears it.
    pub fwmark: Option<u32>,
    pub replace_peers: bool,
    pub peers: Vec<PeerUpdate>,
}

pub fn decode_hex_key(s: &str) -> Option<Key> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut k = Key([0; 32]);
    for (i, pair) in b.chunks_exact(2).enumerate() {
        k.0[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(k)
}

fn push_hex(out: &mut String, k: &[u8; 32]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in k {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 15)] as char);
    }
}

fn parse_bool(key: &'static str, v: &str, line: usize) -> Result<bool, UapiError> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(UapiError::BadValue {
            key,
            value: v.chars().take(40).collect(),
            line,
        }),
    }
}

fn parse_num<T: FromStr>(key: &'static str, v: &str, line: usize) -> Result<T, UapiError> {
    v.parse().map_err(|_| UapiError::BadValue {
        key,
        value: v.chars().take(40).collect(),
        line,
    })
}

/// Parses the body of a `set=1` transaction (the lines after `set=1`, up to the empty line).
pub fn parse_set<'a>(lines: impl IntoIterator<Item = &'a str>) -> Result<SetRequest, UapiError> {
    let mut req = SetRequest::default();
    let mut peer: Option<PeerUpdate> = None;
    for (i, line) in lines.into_iter().enumerate() {
        let n = i + 2; // `set=1` is line 1
        if line.is_empty() {
            break;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or(UapiError::NoEquals { line: n })?;
        let in_peer = |key: &'static str, peer: &mut Option<PeerUpdate>| {
            peer.take()
                .ok_or(UapiError::PeerKeyOutsidePeer { key, line: n })
        };
        match k {
            "private_key" if peer.is_none() => {
                let key = decode_hex_key(v).ok_or(UapiError::BadKey {
                    key: "private_key",
                    line: n,
                })?;
                req.private_key = Some((!key.is_zero()).then_some(key));
            }
            "listen_port" if peer.is_none() => {
                req.listen_port = Some(parse_num("listen_port", v, n)?)
            }
            "fwmark" if peer.is_none() => req.fwmark = Some(parse_num("fwmark", v, n)?),
            "replace_peers" if peer.is_none() => {
                req.replace_peers = parse_bool("replace_peers", v, n)?
            }
            "public_key" => {
                let key = decode_hex_key(v).ok_or(UapiError::BadKey {
                    key: "public_key",
                    line: n,
                })?;
                if let Some(p) = peer.take() {
                    req.peers.push(p);
                }
                peer = Some(PeerUpdate {
                    public_key: key.0,
                    ..PeerUpdate::default()
                });
            }
            "remove" => {
                let mut p = in_peer("remove", &mut peer)?;
                p.remove = parse_bool("remove", v, n)?;
                peer = Some(p);
            }
            "update_only" => {
                let mut p = in_peer("update_only", &mut peer)?;
                p.update_only = parse_bool("update_only", v, n)?;
                peer = Some(p);
            }
            "preshared_key" => {
                let mut p = in_peer("preshared_key", &mut peer)?;
                let key = decode_hex_key(v).ok_or(UapiError::BadKey {
                    key: "preshared_key",
                    line: n,
                })?;
                p.preshared_key = Some((!key.is_zero()).then_some(key));
                peer = Some(p);
            }
            "endpoint" => {
                let mut p = in_peer("endpoint", &mut peer)?;
                p.endpoint = Some(parse_num("endpoint", v, n)?);
                peer = Some(p);
            }
            "persistent_keepalive_interval" => {
                let mut p = in_peer("persistent_keepalive_interval", &mut peer)?;
                p.keepalive = Some(parse_num("persistent_keepalive_interval", v, n)?);
                peer = Some(p);
            }
            "replace_allowed_ips" => {
                let mut p = in_peer("replace_allowed_ips", &mut peer)?;
                p.replace_allowed_ips = parse_bool("replace_allowed_ips", v, n)?;
                peer = Some(p);
            }
            "allowed_ip" => {
                let mut p = in_peer("allowed_ip", &mut peer)?;
                let net = match v.parse::<IpNet>() {
                    Ok(net) => net,
                    Err(_) => IpNet::from(parse_num::<std::net::IpAddr>("allowed_ip", v, n)?),
                };
                p.allowed_ips.push(net.trunc());
                peer = Some(p);
            }
            "protocol_version" => {
                let p = in_peer("protocol_version", &mut peer)?;
                if v != "1" {
                    return Err(UapiError::ProtocolVersion(v.chars().take(20).collect()));
                }
                peer = Some(p);
            }
            _ => {
                return Err(UapiError::UnknownKey {
                    key: k.chars().take(40).collect(),
                    line: n,
                });
            }
        }
    }
    if let Some(p) = peer {
        req.peers.push(p);
    }
    Ok(req)
}

/// What `get` reports about one peer.
#[derive(Debug, Clone, Default)]
pub struct PeerStatus {
    pub public_key: [u8; 32],
    pub preshared_key: Option<Key>,
    pub endpoint: Option<SocketAddr>,
    /// Since the Unix epoch.
    pub last_handshake: Option<Duration>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub keepalive: u16,
    pub allowed_ips: Vec<IpNet>,
}

/// What `get` reports about the device.
#[derive(Debug, Clone, Default)]
pub struct DeviceStatus {
    pub private_key: Option<Key>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<PeerStatus>,
}

/// Formats a `get=1` answer, `errno=0` and the closing empty line included.
pub fn format_get(d: &DeviceStatus) -> Zeroizing<String> {
    let mut s = Zeroizing::new(String::with_capacity(128 + d.peers.len() * 256));
    if let Some(k) = &d.private_key {
        s.push_str("private_key=");
        push_hex(&mut s, &k.0);
        s.push('\n');
    }
    let _ = writeln!(s, "listen_port={}", d.listen_port);
    if d.fwmark != 0 {
        let _ = writeln!(s, "fwmark={}", d.fwmark);
    }
    for p in &d.peers {
        s.push_str("public_key=");
        push_hex(&mut s, &p.public_key);
        s.push_str("\npreshared_key=");
        push_hex(&mut s, &p.preshared_key.as_ref().map_or([0; 32], |k| k.0));
        s.push('\n');
        s.push_str("protocol_version=1\n");
        if let Some(e) = p.endpoint {
            let _ = writeln!(s, "endpoint={e}");
        }
        let hs = p.last_handshake.unwrap_or_default();
        let _ = writeln!(
            s,
            "last_handshake_time_sec={}\nlast_handshake_time_nsec={}\ntx_bytes={}\nrx_bytes={}\npersistent_keepalive_interval={}",
            hs.as_secs(),
            hs.subsec_nanos(),
            p.tx_bytes,
            p.rx_bytes,
            p.keepalive
        );
        for ip in &p.allowed_ips {
            let _ = writeln!(s, "allowed_ip={ip}");
        }
    }
    s.push_str("errno=0\n\n");
    s
}

#[cfg(test)]
mod tests;
