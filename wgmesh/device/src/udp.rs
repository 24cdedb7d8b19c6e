//! The UDP side: one IPv4 and (when the host has IPv6) one IPv6 socket on the listen port. Sends go
//! out in batches: runs of equal-sized datagrams to one peer become one `UDP_SEGMENT` (GSO)
//! message, all runs of a batch one `sendmmsg`. Receives use `UDP_GRO` (a GSO'd batch from the
//! peer arrives as one buffer plus its segment size) and `recvmmsg`.

use std::{
    io, mem,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    ops::Range,
    os::fd::{AsRawFd as _, RawFd},
    sync::atomic::{AtomicBool, Ordering},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// The kernel's UDP_MAX_SEGMENTS is 64 on older kernels (128 on newer ones).
pub const MAX_GSO_SEGMENTS: usize = 64;
/// Bytes of UDP payload per GSO message: the IP packet length field limits it.
pub const MAX_GSO_BYTES: usize = 65_000;
/// Socket buffer size asked for (forced past rmem_max/wmem_max when we have CAP_NET_ADMIN).
const SOCKET_BUFFER: libc::c_int = 7 << 20;
/// Datagrams (or GRO super-datagrams) per recvmmsg.
pub const RECV_BATCH: usize = 8;
pub const RECV_BUF: usize = 65_536;

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The device's sockets on one port.
#[derive(Debug)]
pub struct UdpSockets {
    pub v4: Socket,
    pub v6: Option<Socket>,
    pub port: u16,
}

impl UdpSockets {
    /// Binds `port` (0 = any free one, the same for both families) with `fwmark` (0 = none).
    pub fn bind(port: u16, fwmark: u32) -> io::Result<Self> {
        let v4 = Self::socket(
            Domain::IPV4,
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
            fwmark,
        )?;
        let port = v4
            .local_addr()?
            .as_socket()
            .map(|a| a.port())
            .ok_or_else(|| io::Error::from(io::ErrorKind::AddrNotAvailable))?;
        let v6 = match Self::socket(
            Domain::IPV6,
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
            fwmark,
        ) {
            Ok(s) => Some(s),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "no IPv6 socket");
                None
            }
        };
        Ok(Self { v4, v6, port })
    }

    fn socket(domain: Domain, addr: SocketAddr, fwmark: u32) -> io::Result<Socket> {
        let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
        if domain == Domain::IPV6 {
            s.set_only_v6(true)?;
        }
        if fwmark != 0 {
            s.set_mark(fwmark)?;
        }
        let fd = s.as_raw_fd();
        for (force, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            if setsockopt_int(fd, libc::SOL_SOCKET, force, SOCKET_BUFFER).is_err() {
                setsockopt_int(fd, libc::SOL_SOCKET, plain, SOCKET_BUFFER)?;
            }
        }
        if let Err(e) = setsockopt_int(fd, SOL_UDP, UDP_GRO, 1) {
            tracing::debug!(error = %e, "UDP_GRO not available");
        }
        s.bind(&SockAddr::from(addr))?;
        Ok(s)
    }

    pub fn set_fwmark(&self, fwmark: u32) -> io::Result<()> {
        self.v4.set_mark(fwmark)?;
        if let Some(v6) = &self.v6 {
            v6.set_mark(fwmark)?;
        }
        Ok(())
    }

    pub fn for_addr(&self, addr: &SocketAddr) -> Option<&Socket> {
        match addr {
            SocketAddr::V4(_) => Some(&self.v4),
            SocketAddr::V6(_) => self.v6.as_ref(),
        }
    }

    pub fn fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.v4.as_raw_fd()];
        if let Some(s) = &self.v6 {
            v.push(s.as_raw_fd());
        }
        v
    }
}

// === GSO layout ===

/// One sendmmsg message: datagrams `packets` of the batch, all `seg_size` long but the last
/// (which may be shorter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GsoRun {
    pub packets: Range<usize>,
    pub seg_size: usize,
}

/// Cuts a batch of datagrams (their lengths, in order, laid out back to back) into GSO runs.
/// With `gso` off every datagram is a run of its own.
pub fn gso_runs(lens: &[usize], gso: bool, out: &mut Vec<GsoRun>) {
    out.clear();
    let mut i = 0;
    while i < lens.len() {
        let start = i;
        let seg = lens[i];
        let mut bytes = seg;
        i += 1;
        if gso {
            while i < lens.len()
                && i - start < MAX_GSO_SEGMENTS
                && lens[i] <= seg
                && bytes + lens[i] <= MAX_GSO_BYTES
            {
                bytes += lens[i];
                i += 1;
                if lens[i - 1] < seg {
                    break; // a shorter one ends the run
                }
            }
        }
        out.push(GsoRun {
            packets: start..i,
            seg_size: seg,
        });
    }
}

pub fn to_raw(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

pub fn from_raw(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says it is a sockaddr_in, which fits in the storage.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((ss as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says it is a sockaddr_in6, which fits in the storage.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((ss as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Space for one `cmsghdr` carrying a u16 or int, 8-byte aligned.
type CmsgBuf = [u64; 4];

/// Reusable buffers for sending batches.
#[derive(Default)]
pub struct Sender {
    runs: Vec<GsoRun>,
    iovs: Vec<libc::iovec>,
    cmsgs: Vec<CmsgBuf>,
    msgs: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers inside are only scratch, rebuilt on every send and never shared.
unsafe impl Send for Sender {}

impl Sender {
    /// Sends datagrams laid out back to back in `buf` (lengths `lens`) to `dst`. `gso` is the
    /// device-wide switch, turned off for good if the kernel refuses UDP_SEGMENT.
    pub fn send(
        &mut self,
        sock: &Socket,
        dst: &SocketAddr,
        buf: &[u8],
        lens: &[usize],
        gso: &AtomicBool,
    ) -> io::Result<()> {
        if lens.is_empty() {
            return Ok(());
        }
        let use_gso = gso.load(Ordering::Relaxed);
        match self.send_inner(sock, dst, buf, lens, use_gso) {
            Err(e) if use_gso && e.raw_os_error() == Some(libc::EIO) => {
                tracing::warn!("UDP GSO refused by the kernel; sending datagrams one by one");
                gso.store(false, Ordering::Relaxed);
                self.send_inner(sock, dst, buf, lens, false)
            }
            r => r,
        }
    }

    fn send_inner(
        &mut self,
        sock: &Socket,
        dst: &SocketAddr,
        buf: &[u8],
        lens: &[usize],
        gso: bool,
    ) -> io::Result<()> {
        let (mut ss, sslen) = to_raw(dst);
        gso_runs(lens, gso, &mut self.runs);
        let n = self.runs.len();
        self.iovs.clear();
        self.cmsgs.clear();
        self.cmsgs.resize(n, [0; 4]);
        self.msgs.clear();
        let mut off = 0;
        for r in &self.runs {
            let bytes: usize = lens[r.packets.clone()].iter().sum();
            self.iovs.push(libc::iovec {
                iov_base: buf[off..].as_ptr() as *mut libc::c_void,
                iov_len: bytes,
            });
            off += bytes;
        }
        for (i, r) in self.runs.iter().enumerate() {
            // SAFETY: all-zero is a valid msghdr.
            let mut hdr: libc::msghdr = unsafe { mem::zeroed() };
            hdr.msg_name = (&raw mut ss).cast();
            hdr.msg_namelen = sslen;
            hdr.msg_iov = &raw mut self.iovs[i];
            hdr.msg_iovlen = 1;
            if r.packets.len() > 1 {
                let c = &mut self.cmsgs[i];
                hdr.msg_control = c.as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE is a pure size computation.
                hdr.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as usize;
                // SAFETY: the control buffer is 32 bytes, enough for one cmsghdr with a u16.
                unsafe {
                    let cm = libc::CMSG_FIRSTHDR(&hdr);
                    (*cm).cmsg_level = SOL_UDP;
                    (*cm).cmsg_type = UDP_SEGMENT;
                    (*cm).cmsg_len = libc::CMSG_LEN(2) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cm).cast::<u16>(), r.seg_size as u16);
                }
            }
            self.msgs.push(libc::mmsghdr {
                msg_hdr: hdr,
                msg_len: 0,
            });
        }
        let fd = sock.as_raw_fd();
        let mut done = 0;
        while done < n {
            // SAFETY: msgs[done..] are valid mmsghdrs pointing at live iovecs, cmsgs, buf and ss.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    self.msgs[done..].as_mut_ptr(),
                    (n - done) as libc::c_uint,
                    0,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    // Unreachable peers and friends: drop this message, carry on with the rest.
                    _ if done + 1 < n && e.raw_os_error() != Some(libc::EIO) => {
                        done += 1;
                        continue;
                    }
                    _ => return Err(e),
                }
            }
            done += r as usize;
        }
        Ok(())
    }
}

/// One received datagram, possibly a GRO batch of `seg`-sized datagrams.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    /// Index into [`Receiver::bufs`].
    pub buf: usize,
    pub len: usize,
    pub seg: usize,
    pub src: SocketAddr,
}

/// Reusable buffers for receiving batches.
pub struct Receiver {
    pub bufs: Vec<Vec<u8>>,
    addrs: Vec<libc::sockaddr_storage>,
    cmsgs: Vec<CmsgBuf>,
    iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    pub got: Vec<Received>,
}

// SAFETY: the raw pointers inside only point into the struct's own heap buffers.
unsafe impl Send for Receiver {}

impl Default for Receiver {
    fn default() -> Self {
        Self {
            bufs: (0..RECV_BATCH).map(|_| vec![0; RECV_BUF]).collect(),
            // SAFETY: all-zero is a valid sockaddr_storage.
            addrs: vec![unsafe { mem::zeroed() }; RECV_BATCH],
            cmsgs: vec![[0; 4]; RECV_BATCH],
            iovs: Vec::with_capacity(RECV_BATCH),
            msgs: Vec::with_capacity(RECV_BATCH),
            got: Vec::with_capacity(RECV_BATCH),
        }
    }
}

impl Receiver {
    /// Receives what is queued on `sock` without blocking; the results are in `self.got`
    /// (datagram `i` in `self.bufs[i]`).
    pub fn recv(&mut self, sock: &Socket) -> io::Result<usize> {
        self.iovs.clear();
        self.msgs.clear();
        self.got.clear();
        for b in &mut self.bufs {
            self.iovs.push(libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            });
        }
        for i in 0..RECV_BATCH {
            // SAFETY: all-zero is a valid msghdr.
            let mut hdr: libc::msghdr = unsafe { mem::zeroed() };
            hdr.msg_name = (&raw mut self.addrs[i]).cast();
            hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_iov = &raw mut self.iovs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = self.cmsgs[i].as_mut_ptr().cast();
            hdr.msg_controllen = mem::size_of::<CmsgBuf>();
            self.msgs.push(libc::mmsghdr {
                msg_hdr: hdr,
                msg_len: 0,
            });
        }
        // SAFETY: msgs are valid mmsghdrs pointing at our own buffers.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                self.msgs.as_mut_ptr(),
                RECV_BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        for i in 0..n as usize {
            let m = &self.msgs[i];
            let len = m.msg_len as usize;
            let mut seg = len;
            // SAFETY: walking the control messages the kernel wrote into our buffer.
            unsafe {
                let mut cm = libc::CMSG_FIRSTHDR(&m.msg_hdr);
                while !cm.is_null() {
                    if (*cm).cmsg_level == SOL_UDP && (*cm).cmsg_type == UDP_GRO {
                        let s = std::ptr::read_unaligned(libc::CMSG_DATA(cm).cast::<libc::c_int>());
                        if s > 0 {
                            seg = s as usize;
                        }
                    }
                    cm = libc::CMSG_NXTHDR(&m.msg_hdr, cm);
                }
            }
            let Some(src) = from_raw(&self.addrs[i]) else {
                continue;
            };
            self.got.push(Received {
                buf: i,
                len,
                seg,
                src,
            });
        }
        Ok(self.got.len())
    }
}

#[cfg(test)]
mod tests;
