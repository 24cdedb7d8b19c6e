//! wgmesh's userspace WireGuard device. The protocol (Noise handshakes, sessions, timers,
//! cookies) is boringtun's `noise` module; the I/O is ours and batched: the TUN runs with
//! `IFF_VNET_HDR` and TSO so one read is a TCP super-packet of up to 64 KiB, which is split here
//! into MTU-sized segments, encrypted and sent to the peer as one `UDP_SEGMENT` (GSO) message;
//! the receiver gets it in one `UDP_GRO` read, decrypts every segment and writes them to its TUN
//! coalesced back into one super-packet. Configuration is the WireGuard UAPI on
//! `/var/run/wireguard/<ifname>.sock`, so `wg` and wgmesh's UAPI client work unchanged.

mod device;
pub mod offload;
mod tun;
pub mod uapi;
pub mod udp;

use std::{io, path::PathBuf};

pub use device::{DeviceConfig, DeviceHandle};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the TUN device {ifname}")]
    Tun {
        ifname: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind UDP port {port}")]
    Udp {
        port: u16,
        #[source]
        source: io::Error,
    },
    #[error("cannot serve UAPI on {path}")]
    Uapi {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start a device thread")]
    Thread {
        #[source]
        source: io::Error,
    },
}
