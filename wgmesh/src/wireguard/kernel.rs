//! Kernel WireGuard through generic netlink (defguard_wireguard_rs `WGApi<Kernel>`): no `wg` or `ip`
//! binaries. The kernel updates peers in place, so an update is a single `configure_peer` with
//! replace-allowed-IPs, applied under the device lock.

use std::{collections::BTreeMap, path::Path};

use defguard_wireguard_rs::{
    InterfaceConfiguration, Kernel, WGApi, WireguardInterfaceApi as _, host::Host, key::Key,
    net::IpAddrMask, peer::Peer,
};
use ipnet::IpNet;
use wgmesh_api::PublicKey;

use super::{Backend, DeviceState, Error, WgDevice};
use crate::{
    keys::PrivateKey,
    mesh::{ObservedPeer, PeerSpec},
};

pub struct KernelDevice {
    ifname: String,
    api: WGApi<Kernel>,
}

impl std::fmt::Debug for KernelDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelDevice")
            .field("ifname", &self.ifname)
            .finish()
    }
}

/// Whether the running kernel offers WireGuard (module loaded or built in).
pub fn kernel_supports_wireguard() -> bool {
    Path::new("/sys/module/wireguard").exists()
}

impl KernelDevice {
    /// Creates the interface if it does not exist (EEXIST is fine) and returns a handle to it.
    pub fn ensure(ifname: &str) -> Result<Self, Error> {
        // /sys/class/net shows the links of the caller's network namespace.
        if Path::new("/sys/class/net").join(ifname).exists() {
            tracing::info!(ifname, "adopting the existing kernel wireguard interface");
        }
        let mut api = WGApi::<Kernel>::new(ifname.to_owned()).map_err(|e| Error::Kernel {
            ifname: ifname.to_owned(),
            operation: "open",
            detail: e.to_string(),
        })?;
        if let Err(e) = api.create_interface() {
            // defguard logs the errno and returns a generic error; EOPNOTSUPP is by far the common case.
            tracing::debug!(ifname, error = %e, "kernel wireguard link creation failed");
            return Err(Error::KernelUnsupported {
                ifname: ifname.to_owned(),
            });
        }
        Ok(Self {
            ifname: ifname.to_owned(),
            api,
        })
    }

    fn err(&self, operation: &'static str, e: impl std::fmt::Display) -> Error {
        Error::Kernel {
            ifname: self.ifname.clone(),
            operation,
            detail: e.to_string(),
        }
    }
}

fn to_peer(p: &PeerSpec) -> Peer {
    let mut peer = Peer::new(Key::new(*p.public_key.as_bytes()));
    peer.endpoint = Some(p.endpoint);
    peer.persistent_keepalive_interval = Some(p.keepalive);
    peer.allowed_ips = p
        .allowed_ips
        .iter()
        .map(|n| IpAddrMask::new(n.addr(), n.prefix_len()))
        .collect();
    peer
}

fn observed(p: &Peer) -> ObservedPeer {
    ObservedPeer {
        endpoint: p.endpoint,
        allowed_ips: p
            .allowed_ips
            .iter()
            .filter_map(|m| IpNet::new(m.address, m.cidr).ok())
            .map(|n| n.trunc())
            .collect(),
        keepalive: p.persistent_keepalive_interval.unwrap_or(0),
        last_handshake: p
            .last_handshake
            .filter(|t| *t > std::time::SystemTime::UNIX_EPOCH),
        rx_bytes: p.rx_bytes,
        tx_bytes: p.tx_bytes,
    }
}

fn state_from_host(host: &Host) -> DeviceState {
    let public_key = host.private_key.as_ref().map(|k| {
        let private = PrivateKey::from_hex(&k.to_lower_hex());
        private.map(|p| p.public_key())
    });
    DeviceState {
        public_key: public_key.flatten(),
        listen_port: host.listen_port,
        fwmark: host.fwmark.unwrap_or(0),
        peers: host
            .peers
            .iter()
            .map(|(k, p)| (PublicKey::from_bytes(k.as_array()), observed(p)))
            .collect::<BTreeMap<_, _>>(),
    }
}

/// Reads an existing kernel WireGuard interface (never creates one).
#[derive(Debug, Clone)]
pub struct KernelReader {
    pub ifname: String,
}

impl super::DeviceReader for KernelReader {
    fn read_state(&self) -> Result<DeviceState, Error> {
        let err = |operation, e: &dyn std::fmt::Display| Error::Kernel {
            ifname: self.ifname.clone(),
            operation,
            detail: e.to_string(),
        };
        let api = WGApi::<Kernel>::new(self.ifname.clone()).map_err(|e| err("open", &e))?;
        let host = api.read_interface_data().map_err(|e| err("read", &e))?;
        Ok(state_from_host(&host))
    }
}

impl WgDevice for KernelDevice {
    fn reader(&self) -> std::sync::Arc<dyn super::DeviceReader> {
        std::sync::Arc::new(KernelReader {
            ifname: self.ifname.clone(),
        })
    }

    fn backend(&self) -> Backend {
        Backend::Kernel
    }

    fn interface(&self) -> &str {
        &self.ifname
    }

    fn read(&self) -> Result<DeviceState, Error> {
        let host = self
            .api
            .read_interface_data()
            .map_err(|e| self.err("read", e))?;
        Ok(state_from_host(&host))
    }

    fn set_identity(&mut self, key: &PrivateKey, listen_port: u16) -> Result<(), Error> {
        // SET_DEVICE in defguard always replaces peers, so the peers the device has are handed back
        // in the same call. Only used when the key or port differ (first start, rotation), where
        // every session is renegotiated anyway.
        let host = self
            .api
            .read_interface_data()
            .map_err(|e| self.err("read", e))?;
        let cfg = InterfaceConfiguration {
            name: self.ifname.clone(),
            prvkey: key.to_base64().to_string(),
            addresses: Vec::new(),
            port: listen_port,
            peers: host.peers.values().cloned().collect(),
            mtu: None,
            fwmark: None,
        };
        self.api
            .configure_interface(&cfg)
            .map_err(|e| self.err("set identity", e))
    }

    fn add_peer(&mut self, peer: &PeerSpec) -> Result<(), Error> {
        self.api
            .configure_peer(&to_peer(peer))
            .map_err(|e| self.err("add peer", e))
    }

    fn update_peer(&mut self, peer: &PeerSpec) -> Result<(), Error> {
        // In place, without WGPEER_F_REPLACE_ALLOWEDIPS: see `genl` for why and how.
        let before = self.read()?;
        let key = *peer.public_key.as_bytes();
        super::genl::set_peers(
            &self.ifname,
            vec![super::genl::peer_without_replace(
                key,
                peer.endpoint,
                peer.keepalive,
                &peer.allowed_ips,
            )],
        )
        .map_err(|e| self.err("update peer", e))?;
        let stale: Vec<IpNet> = before
            .peers
            .get(&peer.public_key)
            .map(|p| {
                p.allowed_ips
                    .iter()
                    .filter(|n| !peer.allowed_ips.contains(n))
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        if stale.is_empty() {
            return Ok(());
        }
        let holder = *PrivateKey::generate()
            .map_err(|e| self.err("update peer", e))?
            .public_key()
            .as_bytes();
        super::genl::set_peers(
            &self.ifname,
            vec![super::genl::holding_peer(holder, &stale)],
        )
        .map_err(|e| self.err("move stale allowed IPs", e))?;
        super::genl::set_peers(&self.ifname, vec![super::genl::removed_peer(holder)])
            .map_err(|e| self.err("remove holding peer", e))
    }

    fn remove_peer(&mut self, key: &PublicKey) -> Result<(), Error> {
        self.api
            .remove_peer(&Key::new(*key.as_bytes()))
            .map_err(|e| self.err("remove peer", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_conversion_round_trips() {
        let spec = PeerSpec {
            node: "b".into(),
            public_key: PublicKey::from_bytes([9; 32]),
            endpoint: "192.0.2.12:51820".parse().unwrap(),
            allowed_ips: vec![
                "198.18.2.0/24".parse().unwrap(),
                "2001:db8:2::/64".parse().unwrap(),
            ],
            keepalive: 25,
        };
        let back = observed(&to_peer(&spec));
        assert_eq!(back.endpoint, Some(spec.endpoint));
        assert_eq!(back.allowed_ips, spec.allowed_ips);
        assert_eq!(back.keepalive, 25);
        assert_eq!(back.last_handshake, None);
    }

    #[test]
    fn host_state_exposes_only_the_public_key() {
        let private = PrivateKey::generate().unwrap();
        let mut host = Host::new(51820, Key::decode(private.to_hex().as_str()).unwrap());
        host.peers
            .insert(Key::new([9; 32]), Peer::new(Key::new([9; 32])));
        let st = state_from_host(&host);
        assert_eq!(st.public_key, Some(private.public_key()));
        assert_eq!(st.peers.len(), 1);
    }
}
