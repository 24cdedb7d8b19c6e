//! `wg show <if> dump`, parsed. The private and preshared keys in the dump are dropped while
//! parsing and never stored, so nothing here can print them.

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, anyhow, bail};
use ipnet::IpNet;

/// The interface line and the peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgDump {
    pub interface: WgInterface,
    pub peers: Vec<WgPeer>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgInterface {
    pub public_key: String,
    pub listen_port: u16,
    pub fwmark: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeer {
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    /// `None` until the first handshake.
    pub latest_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive: Option<u16>,
}

impl WgPeer {
    /// How long ago the latest handshake was (`None` before the first one).
    pub fn handshake_age(&self) -> Option<Duration> {
        self.latest_handshake
            .map(|t| SystemTime::now().duration_since(t).unwrap_or_default())
    }

    /// Short form of the key for tables and messages.
    pub fn fingerprint(&self) -> &str {
        self.public_key.get(..8).unwrap_or(&self.public_key)
    }
}

impl WgDump {
    /// Parses the tab-separated `wg show <if> dump` output.
    pub fn parse(text: &str) -> Result<Self> {
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let first = lines
            .next()
            .ok_or_else(|| anyhow!("empty `wg show dump` output"))?;
        let f: Vec<&str> = first.split('\t').collect();
        // private-key public-key listen-port fwmark; f[0] (the private key) is never read.
        if f.len() != 4 {
            bail!("interface line has {} fields, expected 4", f.len());
        }
        let interface = WgInterface {
            public_key: f[1].to_owned(),
            listen_port: f[2]
                .parse()
                .with_context(|| format!("bad listen port {:?}", f[2]))?,
            fwmark: parse_fwmark(f[3])?,
        };
        let peers = lines.map(parse_peer).collect::<Result<Vec<_>>>()?;
        Ok(Self { interface, peers })
    }

    pub fn peer(&self, public_key: &str) -> Option<&WgPeer> {
        self.peers.iter().find(|p| p.public_key == public_key)
    }
}

// public-key preshared-key endpoint allowed-ips latest-handshake rx tx keepalive;
// f[1] (the preshared key) is never read.
fn parse_peer(line: &str) -> Result<WgPeer> {
    let f: Vec<&str> = line.split('\t').collect();
    if f.len() != 8 {
        bail!("peer line has {} fields, expected 8", f.len());
    }
    let endpoint = match f[2] {
        "(none)" => None,
        e => Some(e.parse().with_context(|| format!("bad endpoint {e:?}"))?),
    };
    let allowed_ips = match f[3] {
        "(none)" | "" => Vec::new(),
        list => list
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .with_context(|| format!("bad allowed IP {n:?}"))
            })
            .collect::<Result<_>>()?,
    };
    let hs: u64 = f[4]
        .parse()
        .with_context(|| format!("bad handshake time {:?}", f[4]))?;
    Ok(WgPeer {
        public_key: f[0].to_owned(),
        endpoint,
        allowed_ips,
        latest_handshake: (hs != 0).then(|| UNIX_EPOCH + Duration::from_secs(hs)),
        rx_bytes: f[5].parse().with_context(|| format!("bad rx {:?}", f[5]))?,
        tx_bytes: f[6].parse().with_context(|| format!("bad tx {:?}", f[6]))?,
        persistent_keepalive: match f[7] {
            "off" => None,
            k => Some(k.parse().with_context(|| format!("bad keepalive {k:?}"))?),
        },
    })
}

fn parse_fwmark(s: &str) -> Result<Option<u32>> {
    if s == "off" || s == "0" {
        return Ok(None);
    }
    let v = match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    v.map(Some).with_context(|| format!("bad fwmark {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "cHJpdmF0ZS1rZXktbmV2ZXItc2hvd24tMDAwMDAwMDA=\tUFVCLUlGQUNFLUtFWS0wMDAwMDAwMDAwMDAwMDAwMDA=\t51820\t0x100000\n\
UFVCLVBFRVItQS0wMDAwMDAwMDAwMDAwMDAwMDAwMDA=\t(none)\t192.0.2.12:51820\t198.18.2.0/24,192.0.2.12/32\t1767323045\t1234\t5678\t25\n\
UFVCLVBFRVItQi0wMDAwMDAwMDAwMDAwMDAwMDAwMDA=\t(none)\t(none)\t(none)\t0\t0\t0\toff\n";

    #[test]
    fn parses_interface_and_peers_without_keeping_secrets() {
        let d = WgDump::parse(DUMP).expect("parses");
        assert_eq!(d.interface.listen_port, 51820);
        assert_eq!(d.interface.fwmark, Some(0x10_0000));
        assert_eq!(d.peers.len(), 2);
        let a = &d.peers[0];
        assert_eq!(a.endpoint, Some("192.0.2.12:51820".parse().expect("addr")));
        assert_eq!(a.allowed_ips.len(), 2);
        assert_eq!(a.rx_bytes, 1234);
        assert_eq!(a.tx_bytes, 5678);
        assert_eq!(a.persistent_keepalive, Some(25));
        assert!(a.latest_handshake.is_some());
        let b = &d.peers[1];
        assert_eq!(
            (b.endpoint, b.latest_handshake, b.persistent_keepalive),
            (None, None, None)
        );
        assert!(b.allowed_ips.is_empty());
        assert!(
            !format!("{d:?}").contains("cHJpdmF0ZS1rZXk"),
            "private key leaked into Debug"
        );
    }

    #[test]
    fn fwmark_off_is_none() {
        let d = WgDump::parse("x\tpub\t1\toff\n").expect("parses");
        assert_eq!(d.interface.fwmark, None);
        assert!(d.peers.is_empty());
    }
}
