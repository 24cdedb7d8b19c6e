//! `wgmesh-bench-ebpf`: the per-packet cost of wgmesh's TC programs, measured with
//! `BPF_PROG_TEST_RUN` (through `wgmesh_datapath::bench`) next to the empty program `wgmesh_noop`,
//! interleaved in every run so that drift and noise hit all cases alike. Prints raw samples as one
//! JSON document on stdout; `wgmesh-bench ebpf` turns them into medians and ratios.
//!
//! ```text
//! wgmesh-bench-ebpf [--cidrs 10,1000,5000] [--repeat 5000000] [--runs 9]
//! ```
//!
//! It runs in a mount and network namespace of its own: the scratch bpffs is private to the
//! process (gone when it exits, however it exits), and the programs' test runs see only an
//! unused loopback device. Needs root (CAP_SYS_ADMIN, CAP_BPF).

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    process::ExitCode,
};

use ipnet::{IpNet, Ipv4Net};
use serde_json::{Value, json};
use wgmesh_datapath::{
    Counters, Datapath,
    bench::{self, PROG_NOOP, ScratchBpffs},
};
use wgmesh_ebpf_common::{PROG_GUARD, PROG_STEER};

/// Remote pod CIDRs come out of this range (the control-plane section uses the same ones).
const REMOTE_RANGE: &str = "198.19.0.0/16";
/// Their prefix length: 8192 of them fit.
const REMOTE_PREFIX: u8 = 29;
/// This node's pod CIDR (the harness's node 1).
const LOCAL_CIDR: &str = "198.18.1.0/24";
/// UDP payload of every frame: a small packet, where per-packet costs dominate.
const PAYLOAD: usize = 64;
/// Mixed-length layouts: the same number of remote CIDRs split evenly over these prefix lengths,
/// each length carved out of its own /12 of 10.0.0.0/8. The destination is in a CIDR of the
/// *shortest* length, which the hash index probes last (its worst hit).
/// `2len`: two lengths, served by the hash (two probes for that destination). `fallback`: one
/// length more than the hash index serves, so the programs walk the trie.
const MIXED: [(&str, &[u8]); 2] = [("2len", &[29, 28]), ("fallback", &[29, 28, 27, 26, 25])];

struct Args {
    cidrs: Vec<usize>,
    repeat: u32,
    runs: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        cidrs: vec![10, 1_000, 5_000],
        repeat: 5_000_000,
        runs: 9,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--cidrs" => {
                args.cidrs = value()?
                    .split(',')
                    .map(|s| s.trim().parse().map_err(|e| format!("--cidrs {s:?}: {e}")))
                    .collect::<Result<_, _>>()?;
            }
            "--repeat" => args.repeat = value()?.parse().map_err(|e| format!("--repeat: {e}"))?,
            "--runs" => args.runs = value()?.parse().map_err(|e| format!("--runs: {e}"))?,
            "-h" | "--help" => {
                return Err(
                    "usage: wgmesh-bench-ebpf [--cidrs 10,1000,5000] [--repeat N] [--runs N]"
                        .to_owned(),
                );
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if args.repeat == 0 || args.runs == 0 || args.cidrs.is_empty() {
        return Err("--repeat, --runs and --cidrs must be non-zero".to_owned());
    }
    Ok(args)
}

/// A counter by name and how to read it from [`Counters`].
type CounterRef = (&'static str, fn(&Counters) -> u64);

/// One measured case: which program, on which frame, and the counter it must move.
struct Case {
    name: &'static str,
    program: &'static str,
    what: &'static str,
    frame: Vec<u8>,
    /// The counter that must grow by `repeat` (None for the empty program).
    counter: Option<CounterRef>,
}

/// The cases of a mixed-length layout, named `<case>_<layout>`.
fn mixed_cases(layout: &'static str, remote_dst: Ipv4Addr, local: Ipv4Net) -> Vec<Case> {
    let what = |case: &str| -> &'static str {
        Box::leak(
            format!(
                "{case}; remote CIDRs of {} lengths ({layout}: {})",
                MIXED
                    .iter()
                    .find(|(name, _)| *name == layout)
                    .map_or(0, |(_, lens)| lens.len()),
                if layout == "fallback" {
                    "past the hash bound, LPM trie"
                } else {
                    "hash, destination in the shortest"
                }
            )
            .into_boxed_str(),
        )
    };
    let name =
        |case: &str| -> &'static str { Box::leak(format!("{case}_{layout}").into_boxed_str()) };
    cases(remote_dst, local)
        .into_iter()
        .filter(|case| matches!(case.name, "steer_remote" | "steer_other" | "guard_rescue"))
        .map(|case| Case {
            name: name(case.name),
            what: what(case.what),
            ..case
        })
        .collect()
}

/// `count` CIDRs spread evenly over `lens`, each length out of its own /12 of 10.0.0.0/8.
fn mixed_set(lens: &[u8], count: usize) -> Option<Vec<Ipv4Net>> {
    let mut out = Vec::with_capacity(count);
    for (i, len) in lens.iter().enumerate() {
        let share = count / lens.len() + usize::from(i < count % lens.len());
        let within = Ipv4Net::new(Ipv4Addr::new(10, (i as u8) * 16, 0, 0), 12).ok()?;
        out.extend(bench::carve_v4(within, *len, share)?);
    }
    Some(out)
}

fn cases(remote_dst: Ipv4Addr, local: Ipv4Net) -> Vec<Case> {
    let pod = SocketAddrV4::new(bench::host_in(local, 11), 40_000);
    let to_remote = bench::udp_frame(pod, SocketAddrV4::new(remote_dst, 5201), PAYLOAD);
    let elsewhere = bench::udp_frame(
        pod,
        SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 443),
        PAYLOAD,
    );
    let wire = bench::udp_frame(
        SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 11), 51820),
        SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 12), 51820),
        PAYLOAD,
    );
    vec![
        Case {
            name: "noop",
            program: PROG_NOOP,
            what: "empty TC program (baseline)",
            frame: to_remote.clone(),
            counter: None,
        },
        Case {
            name: "steer_remote",
            program: PROG_STEER,
            what: "steer, pod -> remote pod CIDR (marked)",
            frame: to_remote.clone(),
            counter: Some(("steered", |c| c.steered)),
        },
        Case {
            name: "steer_other",
            program: PROG_STEER,
            what: "steer, pod -> address in no map (passed)",
            frame: elsewhere,
            counter: Some(("passed", |c| c.passed)),
        },
        Case {
            name: "guard_wireguard",
            program: PROG_GUARD,
            what: "guard, node -> node WireGuard UDP (passed)",
            frame: wire,
            counter: Some(("uplink_passed", |c| c.uplink_passed)),
        },
        Case {
            name: "guard_rescue",
            program: PROG_GUARD,
            what: "guard, plaintext pod -> remote pod CIDR (redirected)",
            frame: to_remote,
            counter: Some(("rescued", |c| c.rescued)),
        },
    ]
}

/// Private mount and network namespaces for this process (see the module docs).
fn isolate() -> Result<(), String> {
    // SAFETY: plain syscalls on this process's own namespaces; the process is single-threaded
    // here (unshare of the mount namespace requires it) and passes no pointers but a static path.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWNET) != 0 {
            return Err(format!(
                "unshare(CLONE_NEWNS|CLONE_NEWNET): {} (needs root)",
                std::io::Error::last_os_error()
            ));
        }
        let root = c"/";
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(format!(
                "mount --make-rprivate /: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

fn run(args: &Args) -> Result<Value, String> {
    isolate()?;
    let range: Ipv4Net = REMOTE_RANGE.parse().map_err(|e| format!("{e}"))?;
    let local: Ipv4Net = LOCAL_CIDR.parse().map_err(|e| format!("{e}"))?;
    let max = args.cidrs.iter().copied().max().unwrap_or(0);
    let all = bench::carve_v4(range, REMOTE_PREFIX, max).ok_or(format!(
        "{max} /{REMOTE_PREFIX}s do not fit in {REMOTE_RANGE}"
    ))?;

    let dir = std::env::temp_dir().join(format!("wgmesh-bench-ebpf-{}", std::process::id()));
    let scratch = ScratchBpffs::mount(&dir).map_err(|e| format!("{e}"))?;
    let mut dp = Datapath::load(&scratch.datapath_config()).map_err(|e| chain(&e))?;
    dp.sync_local_cidrs(&BTreeSet::from([IpNet::V4(local)]))
        .map_err(|e| chain(&e))?;

    let mut samples: Vec<Value> = Vec::new();
    for run in 0..args.runs {
        for &n in &args.cidrs {
            let set: BTreeSet<IpNet> = all[..n].iter().copied().map(IpNet::V4).collect();
            dp.sync_remote_cidrs(&set).map_err(|e| chain(&e))?;
            dp.sync_cluster_cidrs(&set).map_err(|e| chain(&e))?;
            // A destination in the middle of the set: neither the first nor the last insert.
            let dst = bench::host_in(all[n / 2], 2);
            measure(&mut dp, args, run, n, cases(dst, local), &mut samples)?;
            for (layout, lens) in MIXED {
                let mixed = mixed_set(lens, n).ok_or(format!("{n} CIDRs of {lens:?}"))?;
                let set: BTreeSet<IpNet> = mixed.iter().copied().map(IpNet::V4).collect();
                dp.sync_remote_cidrs(&set).map_err(|e| chain(&e))?;
                dp.sync_cluster_cidrs(&set).map_err(|e| chain(&e))?;
                let shortest = lens.iter().min().copied().unwrap_or(32);
                let of_shortest: Vec<_> = mixed
                    .iter()
                    .filter(|net| net.prefix_len() == shortest)
                    .collect();
                let dst = bench::host_in(*of_shortest[of_shortest.len() / 2], 2);
                measure(
                    &mut dp,
                    args,
                    run,
                    n,
                    mixed_cases(layout, dst, local),
                    &mut samples,
                )?;
            }
        }
    }
    drop(dp);
    drop(scratch);
    Ok(json!({
        "repeat": args.repeat,
        "runs": args.runs,
        "cidrs": args.cidrs,
        "remote_cidrs_from": format!("{REMOTE_RANGE} in /{REMOTE_PREFIX}s"),
        "local_cidr": LOCAL_CIDR,
        "samples": samples,
    }))
}

/// Test-runs every case and appends a sample per case; checks each moved its counter.
fn measure(
    dp: &mut Datapath,
    args: &Args,
    run: usize,
    n: usize,
    cases: Vec<Case>,
    samples: &mut Vec<Value>,
) -> Result<(), String> {
    for case in cases {
        let before = dp.counters().map_err(|e| chain(&e))?;
        let r = dp
            .test_run(case.program, &case.frame, args.repeat)
            .map_err(|e| chain(&e))?;
        let after = dp.counters().map_err(|e| chain(&e))?;
        if let Some((counter, read)) = case.counter {
            let moved = read(&after) - read(&before);
            if moved != u64::from(args.repeat) {
                return Err(format!(
                    "{} with {n} CIDRs moved {counter} by {moved}, not {}: the frame did not take the path it measures",
                    case.name, args.repeat
                ));
            }
        }
        samples.push(json!({
            "run": run,
            "cidrs": n,
            "case": case.name,
            "program": case.program,
            "what": case.what,
            "frame_bytes": case.frame.len(),
            "retval": r.retval as i32,
            "ns_per_packet": r.ns_per_run(),
            "kernel_ns_per_packet": r.kernel_ns_per_run,
        }));
    }
    Ok(())
}

/// An error with its sources, one per `: `.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("wgmesh-bench-ebpf: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wgmesh-bench-ebpf: {e}");
            ExitCode::FAILURE
        }
    }
}
