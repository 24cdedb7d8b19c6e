//! Benchmark support for `wgmesh-bench ebpf`: runs the loaded TC programs on a synthetic frame
//! through the kernel's `BPF_PROG_TEST_RUN` (aya 0.14 has no API for it), in a bpffs of its own.
//!
//! ```no_run
//! # fn main() -> Result<(), wgmesh_datapath::bench::BenchError> {
//! use wgmesh_datapath::{Datapath, bench::{self, ScratchBpffs}};
//! let scratch = ScratchBpffs::mount(std::path::Path::new("/tmp/wgmesh-bench-bpffs"))?;
//! let mut datapath = Datapath::load(&scratch.datapath_config())?;
//! let frame = bench::udp_frame(
//!     "198.18.1.11:4000".parse().unwrap(),
//!     "198.19.0.9:5000".parse().unwrap(),
//!     64,
//! );
//! let run = datapath.test_run(bench::PROG_NOOP, &frame, 1_000_000)?;
//! println!("{:.2} ns per packet", run.ns_per_run());
//! # Ok(()) }
//! ```
//!
//! The kernel runs the program `repeat` times on one skb built from the frame (as if received on
//! the loopback device of the calling thread's network namespace) and reports its own average in
//! whole nanoseconds; [`TestRun`] also keeps the wall time of the whole call, which with a large
//! `repeat` gives the same average with sub-nanosecond resolution. Verdicts are returned, never
//! acted on: a redirect is not followed, a mark goes nowhere. The counters do move, which lets a
//! caller check that a frame took the path it was meant to.
//!
//! Nothing here is used by the agent.

use std::{
    fs, io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::programs::{ProgramError, SchedClassifier};
use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::{Datapath, DatapathConfig, Error};

/// The empty TC program (`TC_ACT_UNSPEC`, nothing else): the baseline of every measurement.
pub const PROG_NOOP: &str = "wgmesh_noop";

/// `bpf(2)` command number of `BPF_PROG_TEST_RUN` (include/uapi/linux/bpf.h).
const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// Shortest frame a TC test run accepts: the Ethernet header.
const MIN_FRAME: usize = 14;
/// The kernel's limit for the test-run input of skb programs (a page minus headroom and tail room);
/// larger frames are refused with EINVAL anyway, this only gives a clearer message.
const MAX_FRAME: usize = 3_000;

/// Errors of the benchmark helpers.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Loading or inspecting the datapath failed.
    #[error(transparent)]
    Datapath(#[from] Error),
    /// The object has no TC program of that name.
    #[error("the eBPF object has no TC program {program:?}")]
    NoProgram {
        /// The name asked for.
        program: String,
    },
    /// The kernel refused to load the program.
    #[error("failed to load program {program}")]
    Load {
        /// The program.
        program: String,
        /// aya's error (with the verifier log).
        #[source]
        source: Box<ProgramError>,
    },
    /// The frame cannot be test-run.
    #[error("a test-run frame must be {MIN_FRAME}-{MAX_FRAME} bytes, not {len}")]
    FrameSize {
        /// Its length.
        len: usize,
    },
    /// `repeat` was 0 (the kernel would silently run once).
    #[error("repeat must be at least 1")]
    Repeat,
    /// `bpf(BPF_PROG_TEST_RUN)` failed.
    #[error("BPF_PROG_TEST_RUN of {program} failed")]
    TestRun {
        /// The program.
        program: String,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// Creating, mounting or unmounting the scratch bpffs failed.
    #[error("scratch bpffs at {path}: {what}")]
    Scratch {
        /// The mount point.
        path: PathBuf,
        /// What failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// The outcome of one `BPF_PROG_TEST_RUN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestRun {
    /// The program's verdict (`TC_ACT_UNSPEC` reads as `u32::MAX`).
    pub retval: u32,
    /// How often the program ran.
    pub repeat: u32,
    /// The kernel's average time per run, truncated to whole nanoseconds.
    pub kernel_ns_per_run: u32,
    /// Wall time of the whole syscall (skb set-up included, negligible for a large `repeat`).
    pub wall: Duration,
}

impl TestRun {
    /// Nanoseconds per run from the wall time (sub-nanosecond resolution).
    pub fn ns_per_run(&self) -> f64 {
        self.wall.as_secs_f64() * 1e9 / f64::from(self.repeat.max(1))
    }
}

/// The `test` member of `union bpf_attr` (include/uapi/linux/bpf.h); the kernel zero-fills the
/// rest of the union.
#[repr(C)]
#[derive(Debug, Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    padding: u32,
}

/// The outcome of one [`Datapath::test_run_skb`]: the verdict and the packet's metadata after
/// the program ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkbRun {
    /// The program's verdict (`TC_ACT_UNSPEC` reads as `u32::MAX`).
    pub retval: u32,
    /// `skb->mark` as the program left it.
    pub mark: u32,
}

/// Size of the `struct __sk_buff` buffer passed as the test run's context: larger than the struct
/// on any kernel so far (192 bytes in 6.x); the kernel only reads and writes its own size of it
/// and requires the rest to be zero.
const SKB_CTX_SIZE: usize = 512;
/// Offset of `mark` in `struct __sk_buff` (after `len` and `pkt_type`; part of the stable UAPI).
const SKB_MARK_OFFSET: usize = 8;

impl Datapath {
    /// Runs the TC program `program` (`wgmesh_steer`, `wgmesh_guard` or [`PROG_NOOP`], which is
    /// loaded on first use) `repeat` times on `frame` (an Ethernet frame) with the maps as they are,
    /// through `BPF_PROG_TEST_RUN`. Counters move as for real packets; nothing is sent anywhere.
    pub fn test_run(
        &mut self,
        program: &str,
        frame: &[u8],
        repeat: u32,
    ) -> Result<TestRun, BenchError> {
        let (attr, wall) = self.raw_test_run(program, frame, repeat, None)?;
        Ok(TestRun {
            retval: attr.retval,
            repeat,
            kernel_ns_per_run: attr.duration,
            wall,
        })
    }

    /// Runs `program` once on `frame` like [`Datapath::test_run`], on an skb whose `mark` is
    /// `mark`, and returns the verdict with the `mark` the program left: what the policy routing
    /// would see. For checks, not for measuring (it passes the kernel a context to copy in and
    /// out, which [`Datapath::test_run`] does not).
    pub fn test_run_skb(
        &mut self,
        program: &str,
        frame: &[u8],
        mark: u32,
    ) -> Result<SkbRun, BenchError> {
        let mut ctx = [0u8; SKB_CTX_SIZE];
        ctx[SKB_MARK_OFFSET..SKB_MARK_OFFSET + 4].copy_from_slice(&mark.to_ne_bytes());
        let (attr, _) = self.raw_test_run(program, frame, 1, Some(&mut ctx))?;
        let mut out = [0u8; 4];
        out.copy_from_slice(&ctx[SKB_MARK_OFFSET..SKB_MARK_OFFSET + 4]);
        Ok(SkbRun {
            retval: attr.retval,
            mark: u32::from_ne_bytes(out),
        })
    }

    /// `BPF_PROG_TEST_RUN` of `program` on `frame`; with `ctx`, a `struct __sk_buff` the kernel
    /// starts from and writes back into. Returns the attributes the kernel filled in and the wall
    /// time of the syscall.
    fn raw_test_run(
        &mut self,
        program: &str,
        frame: &[u8],
        repeat: u32,
        ctx: Option<&mut [u8; SKB_CTX_SIZE]>,
    ) -> Result<(TestRunAttr, Duration), BenchError> {
        if !(MIN_FRAME..=MAX_FRAME).contains(&frame.len()) {
            return Err(BenchError::FrameSize { len: frame.len() });
        }
        if repeat == 0 {
            return Err(BenchError::Repeat);
        }
        let no_program = || BenchError::NoProgram {
            program: program.to_owned(),
        };
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(program)
            .ok_or_else(no_program)?
            .try_into()
            .map_err(|_| no_program())?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| BenchError::Load {
                program: program.to_owned(),
                source: Box::new(source),
            })?;
        }
        let fd = prog
            .fd()
            .map_err(|source| BenchError::Load {
                program: program.to_owned(),
                source: Box::new(source),
            })?
            .as_fd();
        let mut attr = TestRunAttr {
            prog_fd: u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX),
            data_size_in: u32::try_from(frame.len()).unwrap_or(u32::MAX),
            data_in: frame.as_ptr() as u64,
            repeat,
            ..TestRunAttr::default()
        };
        if let Some(ctx) = ctx {
            let ptr = ctx.as_mut_ptr() as u64;
            attr.ctx_in = ptr;
            attr.ctx_out = ptr;
            attr.ctx_size_in = SKB_CTX_SIZE as u32;
            attr.ctx_size_out = SKB_CTX_SIZE as u32;
        }
        let started = Instant::now();
        // SAFETY: `attr` is a properly initialised `bpf_attr.test` of the size passed; `data_in`
        // points at `frame`, which outlives the call and which the kernel only reads; `data_out`
        // is null; `ctx_in`/`ctx_out` are either null or both point at the caller's
        // `SKB_CTX_SIZE`-byte buffer, borrowed mutably for the whole call, which the kernel reads
        // and then writes at most `ctx_size_out` bytes of; otherwise the kernel writes only into
        // `attr` itself; `fd` is a program fd owned by `self` for the whole call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &raw mut attr,
                size_of::<TestRunAttr>(),
            )
        };
        let wall = started.elapsed();
        if rc < 0 {
            return Err(BenchError::TestRun {
                program: program.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        Ok((attr, wall))
    }
}

/// A bpf filesystem mounted for one benchmark (so nothing touches `/sys/fs/bpf`); on drop the
/// datapath pinned in it is cleaned up, the mount is detached and the directory removed.
#[derive(Debug)]
pub struct ScratchBpffs {
    mount: PathBuf,
    created: bool,
    mounted: bool,
}

impl ScratchBpffs {
    /// Mounts a fresh bpffs at `dir` (created if missing; an existing one must be empty).
    pub fn mount(dir: &Path) -> Result<Self, BenchError> {
        let fail = |what, source| BenchError::Scratch {
            path: dir.to_path_buf(),
            what,
            source,
        };
        let created = !dir.exists();
        fs::create_dir_all(dir).map_err(|e| fail("create the mount point", e))?;
        let mut scratch = Self {
            mount: dir.to_path_buf(),
            created,
            mounted: false,
        };
        if fs::read_dir(dir)
            .map_err(|e| fail("list the mount point", e))?
            .next()
            .is_some()
        {
            return Err(fail(
                "the mount point is not empty",
                io::Error::from(io::ErrorKind::AlreadyExists),
            ));
        }
        mount(
            Some("bpf"),
            dir,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| fail("mount -t bpf", io::Error::from(e)))?;
        scratch.mounted = true;
        Ok(scratch)
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// Where the datapath pins go: `<mount>/wgmesh`.
    pub fn bpffs_dir(&self) -> PathBuf {
        self.mount.join("wgmesh")
    }

    /// A configuration for [`Datapath::load`] pinned in this bpffs. `tunnel_ifindex` is 1 (the
    /// loopback device, which always exists), so the guard's redirect path is live.
    pub fn datapath_config(&self) -> DatapathConfig {
        DatapathConfig {
            bpffs_dir: self.bpffs_dir(),
            fwmark: 0x0010_0000,
            fwmask: 0x0010_0000,
            strict: false,
            tunnel_ifindex: 1,
        }
    }
}

impl Drop for ScratchBpffs {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = Datapath::cleanup(&self.bpffs_dir()) {
                tracing::warn!(error = %e, "cleanup of the scratch bpffs failed");
            }
            if let Err(e) = umount2(&self.mount, MntFlags::MNT_DETACH) {
                tracing::warn!(path = %self.mount.display(), error = %e, "unmount failed");
            }
        }
        if self.created
            && let Err(e) = fs::remove_dir(&self.mount)
        {
            tracing::warn!(path = %self.mount.display(), error = %e, "cannot remove the mount point");
        }
    }
}

/// An Ethernet + IPv4 + UDP frame from `src` to `dst` with `payload` zero bytes (checksums valid,
/// UDP checksum 0 = none).
pub fn udp_frame(src: SocketAddrV4, dst: SocketAddrV4, payload: usize) -> Vec<u8> {
    const IP_HLEN: usize = 20;
    const UDP_HLEN: usize = 8;
    let ip_len = u16::try_from(IP_HLEN + UDP_HLEN + payload).unwrap_or(u16::MAX);
    let udp_len = ip_len.saturating_sub(IP_HLEN as u16);
    let mut frame = Vec::with_capacity(MIN_FRAME + usize::from(ip_len));
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // destination MAC (locally administered)
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // source MAC
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; IP_HLEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64; // TTL
    ip[9] = 17; // UDP
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let checksum = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&src.port().to_be_bytes());
    frame.extend_from_slice(&dst.port().to_be_bytes());
    frame.extend_from_slice(&udp_len.to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.resize(MIN_FRAME + usize::from(ip_len), 0);
    frame
}

/// The one's-complement header checksum of an IPv4 header whose checksum field is zero.
fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// `count` distinct, non-overlapping IPv4 CIDRs of prefix length `prefix` carved in order out of
/// `within` (e.g. 198.19.0.0/16 in /29s), or `None` if they do not fit.
pub fn carve_v4(within: ipnet::Ipv4Net, prefix: u8, count: usize) -> Option<Vec<ipnet::Ipv4Net>> {
    let subnets = within.subnets(prefix).ok()?;
    let out: Vec<_> = subnets.take(count).collect();
    (out.len() == count).then_some(out)
}

/// The address `offset` inside `net` (e.g. a pod address in a pod CIDR).
pub fn host_in(net: ipnet::Ipv4Net, offset: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()).wrapping_add(offset))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use ipnet::{IpNet, Ipv4Net};
    use wgmesh_ebpf_common::{PROG_GUARD, PROG_STEER};

    use super::*;
    use crate::Lookup;

    const TC_ACT_UNSPEC: u32 = u32::MAX;
    const TC_ACT_REDIRECT: u32 = 7;

    #[test]
    fn frames_carry_the_addresses_where_the_programs_read_them() {
        let frame = udp_frame(
            "198.18.1.11:4000".parse().expect("addr"),
            "198.19.0.9:51820".parse().expect("addr"),
            50,
        );
        assert_eq!(frame.len(), 14 + 20 + 8 + 50);
        assert_eq!(&frame[12..14], &[0x08, 0x00]);
        assert_eq!(&frame[26..30], &[198, 18, 1, 11]);
        assert_eq!(&frame[30..34], &[198, 19, 0, 9]);
        assert_eq!(ipv4_checksum(&frame[14..34]), 0, "header checksum verifies");
        assert_eq!(u16::from_be_bytes([frame[38], frame[39]]), 58);
    }

    #[test]
    fn cidrs_are_carved_in_order_and_never_overlap() {
        let within: Ipv4Net = "198.19.0.0/16".parse().expect("net");
        let cidrs = carve_v4(within, 29, 5_000).expect("8192 /29s fit");
        assert_eq!(cidrs[0].to_string(), "198.19.0.0/29");
        assert_eq!(cidrs[4_999].to_string(), "198.19.156.56/29");
        let set: BTreeSet<_> = cidrs.iter().collect();
        assert_eq!(set.len(), 5_000);
        assert!(carve_v4(within, 29, 9_000).is_none());
        assert_eq!(host_in(cidrs[1], 3), Ipv4Addr::new(198, 19, 0, 11));
    }

    #[test]
    fn the_wall_clock_average_keeps_sub_nanosecond_resolution() {
        let run = TestRun {
            retval: 0,
            repeat: 4,
            kernel_ns_per_run: 2,
            wall: Duration::from_nanos(10),
        };
        assert!((run.ns_per_run() - 2.5).abs() < 1e-9);
    }

    #[test]
    #[ignore = "needs root (bpffs mount, BPF_PROG_TEST_RUN): run `make test-netns`"]
    fn test_runs_take_the_path_the_frame_asks_for() {
        let dir = std::env::temp_dir().join(format!("wgmesh-bench-test-{}", std::process::id()));
        let scratch = ScratchBpffs::mount(&dir).expect("mount a scratch bpffs");
        let mut dp = Datapath::load(&scratch.datapath_config()).expect("load");
        let remote: Ipv4Net = "198.19.0.8/29".parse().expect("net");
        let local: Ipv4Net = "198.18.1.0/24".parse().expect("net");
        dp.sync_remote_cidrs(&BTreeSet::from([IpNet::V4(remote)]))
            .expect("remote");
        dp.sync_cluster_cidrs(&BTreeSet::from([IpNet::V4(remote)]))
            .expect("cluster");
        dp.sync_local_cidrs(&BTreeSet::from([IpNet::V4(local)]))
            .expect("local");
        let pod = SocketAddrV4::new(host_in(local, 11), 4000);
        let to_remote = udp_frame(pod, SocketAddrV4::new(host_in(remote, 2), 5000), 32);

        let noop = dp.test_run(PROG_NOOP, &to_remote, 1_000).expect("noop");
        assert_eq!(noop.retval, TC_ACT_UNSPEC);
        assert_eq!(noop.repeat, 1_000);
        assert!(noop.ns_per_run() > 0.0);

        let before = dp.counters().expect("counters");
        let steer = dp.test_run(PROG_STEER, &to_remote, 1_000).expect("steer");
        assert_eq!(steer.retval, TC_ACT_UNSPEC, "steer never ends the chain");
        let guard = dp.test_run(PROG_GUARD, &to_remote, 500).expect("guard");
        assert_eq!(
            guard.retval, TC_ACT_REDIRECT,
            "pod -> peered pod CIDR: rescued"
        );
        let after = dp.counters().expect("counters");
        assert_eq!(after.steered - before.steered, 1_000);
        assert_eq!(after.rescued - before.rescued, 500);

        assert!(matches!(
            dp.test_run("no_such_program", &to_remote, 1),
            Err(BenchError::NoProgram { .. })
        ));
        assert!(matches!(
            dp.test_run(PROG_NOOP, &to_remote[..10], 1),
            Err(BenchError::FrameSize { .. })
        ));
        assert!(matches!(
            dp.test_run(PROG_NOOP, &to_remote, 0),
            Err(BenchError::Repeat)
        ));
        drop(dp);
        drop(scratch);
        assert!(!dir.exists(), "the scratch mount point is removed");
    }

    /// What `wgmesh_steer` did with one packet to `dst`, read from the counters it moved.
    fn steer_verdict(dp: &mut Datapath, dst: &str) -> &'static str {
        let src = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 11), 4000);
        let frame = udp_frame(src, SocketAddrV4::new(dst.parse().expect("addr"), 5000), 16);
        let before = dp.counters().expect("counters");
        let run = dp.test_run(PROG_STEER, &frame, 1).expect("steer");
        assert_eq!(run.retval, TC_ACT_UNSPEC, "steer never ends the chain");
        let after = dp.counters().expect("counters");
        match (
            after.steered - before.steered,
            after.local - before.local,
            after.passed - before.passed,
        ) {
            (1, 0, 0) => "remote",
            (0, 1, 0) => "local",
            (0, 0, 1) => "passed",
            moved => panic!("{dst}: counters moved {moved:?}"),
        }
    }

    fn nets(list: &[&str]) -> BTreeSet<IpNet> {
        list.iter().map(|c| c.parse().expect("cidr")).collect()
    }

    fn scratch(name: &str) -> (ScratchBpffs, PathBuf) {
        let dir = std::env::temp_dir().join(format!("wgmesh-{name}-{}", std::process::id()));
        let scratch = ScratchBpffs::mount(&dir).expect("mount a scratch bpffs");
        (scratch, dir)
    }

    /// Verdicts for addresses around nested CIDRs of several lengths, `(address, verdict)`.
    const NESTED: [(&str, &str); 7] = [
        ("10.1.2.3", "remote"),     // in the /24 and the /16
        ("10.1.200.1", "remote"),   // only in the /16
        ("10.2.0.1", "passed"),     // outside
        ("10.3.4.5", "remote"),     // the /32
        ("10.3.4.6", "passed"),     // next to it
        ("198.18.1.20", "local"),   // this node's pods
        ("198.19.7.255", "remote"), // last address of the /21
    ];

    #[test]
    #[ignore = "needs root (bpffs mount, BPF_PROG_TEST_RUN): run `make test-netns`"]
    fn mixed_prefix_lengths_match_through_the_hash_and_past_the_bound_through_the_trie() {
        let (scratch, _dir) = scratch("mixed");
        let mut dp = Datapath::load(&scratch.datapath_config()).expect("load");
        dp.sync_local_cidrs(&nets(&["198.18.1.0/24"]))
            .expect("local");
        let lookup = |dp: &Datapath, map| {
            dp.lookups()
                .into_iter()
                .find(|(name, _)| *name == map)
                .map(|(_, lookup)| lookup)
                .expect("known map")
        };
        assert_eq!(
            lookup(&dp, "LOCAL_V4"),
            Lookup::Hash {
                prefix_lens: vec![24]
            }
        );

        // Four lengths: served by the hash, longest first.
        let four = ["10.1.0.0/16", "10.1.2.0/24", "10.3.4.5/32", "198.19.0.0/21"];
        dp.sync_remote_cidrs(&nets(&four)).expect("remote");
        assert_eq!(
            lookup(&dp, "REMOTE_V4"),
            Lookup::Hash {
                prefix_lens: vec![32, 24, 21, 16]
            }
        );
        for (addr, verdict) in NESTED {
            assert_eq!(steer_verdict(&mut dp, addr), verdict, "{addr} (hash)");
        }

        // A fifth length: past the bound, the trie answers, with the same verdicts.
        let mut five = four.to_vec();
        five.push("172.31.0.0/28");
        dp.sync_remote_cidrs(&nets(&five)).expect("remote");
        assert_eq!(lookup(&dp, "REMOTE_V4"), Lookup::Trie);
        for (addr, verdict) in NESTED {
            assert_eq!(steer_verdict(&mut dp, addr), verdict, "{addr} (trie)");
        }
        assert_eq!(steer_verdict(&mut dp, "172.31.0.9"), "remote");

        // Removing the /24 and the /28 goes back to the hash; 10.1.2.3 still matches the /16.
        dp.sync_remote_cidrs(&nets(&["10.1.0.0/16", "10.3.4.5/32", "198.19.0.0/21"]))
            .expect("remote");
        assert_eq!(
            lookup(&dp, "REMOTE_V4"),
            Lookup::Hash {
                prefix_lens: vec![32, 21, 16]
            }
        );
        for (addr, verdict) in NESTED {
            assert_eq!(steer_verdict(&mut dp, addr), verdict, "{addr} (hash again)");
        }
        assert_eq!(steer_verdict(&mut dp, "172.31.0.9"), "passed");

        // The guard probes CLUSTER and LOCAL (source) the same way: mixed lengths, rescue.
        dp.sync_cluster_cidrs(&nets(&["10.0.0.0/8", "10.1.0.0/16"]))
            .expect("cluster");
        let pod = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 11), 4000);
        let to = |dst: &str| udp_frame(pod, SocketAddrV4::new(dst.parse().expect("addr"), 1), 16);
        let guard = |dp: &mut Datapath, dst| dp.test_run(PROG_GUARD, &to(dst), 1).expect("guard");
        assert_eq!(
            guard(&mut dp, "10.1.9.9").retval,
            TC_ACT_REDIRECT,
            "remote: rescued"
        );
        let before = dp.counters().expect("counters");
        assert_eq!(
            guard(&mut dp, "10.9.9.9").retval,
            TC_ACT_UNSPEC,
            "cluster only"
        );
        assert_eq!(dp.counters().expect("counters").leaked - before.leaked, 1);
        assert_eq!(
            guard(&mut dp, "192.0.2.1").retval,
            TC_ACT_UNSPEC,
            "elsewhere"
        );
    }

    #[test]
    #[ignore = "needs root (bpffs mount, BPF_PROG_TEST_RUN): run `make test-netns`"]
    fn pins_of_an_older_layout_get_a_rebuilt_index_before_anything_runs() {
        let (scratch, _dir) = scratch("layout");
        let pins = scratch.bpffs_dir();
        let remote = ["10.1.0.0/16", "10.1.2.0/24", "198.19.0.0/21"];
        {
            let mut dp = Datapath::load(&scratch.datapath_config()).expect("load");
            dp.sync_local_cidrs(&nets(&["198.18.1.0/24"]))
                .expect("local");
            dp.sync_remote_cidrs(&nets(&remote)).expect("remote");
            assert_eq!(steer_verdict(&mut dp, "10.1.2.3"), "remote");
        }
        // An older build's pin set: tries, CONFIG and COUNTERS only (no index, no STATS) ...
        for map in wgmesh_ebpf_common::DERIVED_MAP_NAMES
            .iter()
            .chain(&[wgmesh_ebpf_common::MAP_STATS])
        {
            fs::remove_file(pins.join(map)).expect("unpin");
        }
        // ... and one derived pin of another shape: the LOCAL_V4 trie where REMOTE_V4_HASH goes.
        aya::maps::MapData::from_pin(pins.join("LOCAL_V4"))
            .expect("open")
            .pin(pins.join("REMOTE_V4_HASH"))
            .expect("pin");

        let mut dp = Datapath::load(&scratch.datapath_config()).expect("load over old pins");
        // Nothing synced yet: the index was rebuilt from the tries during load.
        assert_eq!(
            dp.lookups()
                .into_iter()
                .find(|(name, _)| *name == "REMOTE_V4")
                .map(|(_, lookup)| lookup),
            Some(Lookup::Hash {
                prefix_lens: vec![24, 21, 16]
            })
        );
        for (addr, verdict) in [
            ("10.1.2.3", "remote"),
            ("10.1.99.1", "remote"),
            ("198.19.3.1", "remote"),
            ("198.18.1.7", "local"),
            ("10.2.0.1", "passed"),
        ] {
            assert_eq!(steer_verdict(&mut dp, addr), verdict, "{addr}");
        }
        // The misplaced trie was replaced, not re-used (and LOCAL_V4 itself is intact).
        let info = aya::maps::MapInfo::from_pin(pins.join("REMOTE_V4_HASH")).expect("info");
        assert_eq!(info.map_type().expect("type"), aya::maps::MapType::Hash);
        assert_eq!(dp.local_cidrs().expect("local"), nets(&["198.18.1.0/24"]));
    }
}
