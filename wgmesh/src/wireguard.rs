//! The WireGuard device behind one small trait, with two backends: the kernel module (netlink through
//! defguard_wireguard_rs) and a userspace boringtun device running in its own process, configured
//! over the cross-platform UAPI socket. Callers compute a [`crate::mesh::PeerDiff`] and apply it here.

pub mod device;
pub mod genl;
pub mod kernel;
pub mod uapi;

use std::{collections::BTreeMap, fmt, io, path::PathBuf};

use wgmesh_api::PublicKey;

use crate::{
    keys::PrivateKey,
    mesh::{ObservedPeer, PeerSpec},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Kernel,
    Userspace,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kernel => "kernel",
            Self::Userspace => "userspace",
        })
    }
}

/// What the device reports. The private key is reduced to its public half on read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceState {
    pub public_key: Option<PublicKey>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: BTreeMap<PublicKey, ObservedPeer>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the userspace WireGuard device of {ifname} at {path}")]
    Connect {
        ifname: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("UAPI exchange with the device of {ifname} failed")]
    Io {
        ifname: String,
        #[source]
        source: io::Error,
    },
    #[error("device of {ifname} refused `{operation}` with errno {errno}")]
    Refused {
        ifname: String,
        operation: &'static str,
        errno: i32,
    },
    #[error("device of {ifname} sent a malformed UAPI answer: {detail}")]
    Protocol { ifname: String, detail: String },
    #[error("kernel WireGuard operation `{operation}` on {ifname} failed: {detail}")]
    Kernel {
        ifname: String,
        operation: &'static str,
        detail: String,
    },
    #[error(
        "this kernel has no WireGuard support (creating {ifname} failed); load the `wireguard` module \
         (kernel >= 5.6) or run with --backend userspace"
    )]
    KernelUnsupported { ifname: String },
    #[error("cannot start the userspace device process for {ifname}")]
    Spawn {
        ifname: String,
        #[source]
        source: io::Error,
    },
    #[error("the userspace device for {ifname} did not come up within {seconds} s (see {log})")]
    DeviceTimeout {
        ifname: String,
        seconds: u64,
        log: PathBuf,
    },
    #[error(
        "the userspace device process for {ifname} exited while starting ({status}; see {log})"
    )]
    DeviceExited {
        ifname: String,
        status: String,
        log: PathBuf,
    },
}

/// Reads a device's state from any thread (a new UAPI connection or netlink socket per read).
pub trait DeviceReader: Send + Sync {
    fn read_state(&self) -> Result<DeviceState, Error>;
}

/// A WireGuard interface that can be read and changed one peer at a time.
pub trait WgDevice: Send {
    /// A reader for the status endpoint, independent of this handle.
    fn reader(&self) -> std::sync::Arc<dyn DeviceReader>;
    fn backend(&self) -> Backend;
    fn interface(&self) -> &str;
    /// Reads the device's identity and peers.
    fn read(&self) -> Result<DeviceState, Error>;
    /// Sets the private key and listen port without touching peers.
    fn set_identity(&mut self, key: &PrivateKey, listen_port: u16) -> Result<(), Error>;
    fn add_peer(&mut self, peer: &PeerSpec) -> Result<(), Error>;
    /// Adds new peers; backends may batch them into fewer round trips.
    fn add_peers(&mut self, peers: &[PeerSpec]) -> Result<(), Error> {
        peers.iter().try_for_each(|p| self.add_peer(p))
    }
    /// Changes endpoint, allowed IPs or keepalive of an existing peer.
    fn update_peer(&mut self, peer: &PeerSpec) -> Result<(), Error>;
    /// Updates existing peers; backends may batch them into fewer round trips.
    fn update_peers(&mut self, peers: &[PeerSpec]) -> Result<(), Error> {
        peers.iter().try_for_each(|p| self.update_peer(p))
    }
    fn remove_peer(&mut self, key: &PublicKey) -> Result<(), Error>;
}

// === in-memory fake for tests ===

/// An in-memory device: records every call, so the reconciler can be tested without a kernel.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct FakeDevice {
    pub state: DeviceState,
    pub calls: Vec<String>,
}

#[cfg(test)]
impl DeviceReader for DeviceState {
    fn read_state(&self) -> Result<DeviceState, Error> {
        Ok(self.clone())
    }
}

#[cfg(test)]
impl WgDevice for FakeDevice {
    fn reader(&self) -> std::sync::Arc<dyn DeviceReader> {
        std::sync::Arc::new(self.state.clone())
    }
    fn backend(&self) -> Backend {
        Backend::Userspace
    }
    fn interface(&self) -> &str {
        "fake0"
    }
    fn read(&self) -> Result<DeviceState, Error> {
        Ok(self.state.clone())
    }
    fn set_identity(&mut self, key: &PrivateKey, listen_port: u16) -> Result<(), Error> {
        self.state.public_key = Some(key.public_key());
        self.state.listen_port = listen_port;
        self.calls.push("set_identity".into());
        Ok(())
    }
    fn add_peer(&mut self, p: &PeerSpec) -> Result<(), Error> {
        self.calls.push(format!("add {}", p.node));
        self.state.peers.insert(p.public_key, observed_from_spec(p));
        Ok(())
    }
    fn update_peer(&mut self, p: &PeerSpec) -> Result<(), Error> {
        self.calls.push(format!("update {}", p.node));
        self.state.peers.insert(p.public_key, observed_from_spec(p));
        Ok(())
    }
    fn remove_peer(&mut self, key: &PublicKey) -> Result<(), Error> {
        self.calls.push(format!("remove {}", key.fingerprint()));
        self.state.peers.remove(key);
        Ok(())
    }
}

/// How the device shows a peer just added from `p` (no handshake, no traffic yet).
pub fn observed_from_spec(p: &PeerSpec) -> ObservedPeer {
    ObservedPeer {
        endpoint: Some(p.endpoint),
        allowed_ips: p.allowed_ips.clone(),
        keepalive: p.keepalive,
        ..Default::default()
    }
}
