//! `wgmesh-bench` (`make bench`): wgmesh's benchmarks on this machine, every comparison inside one
//! run so that noise hits both sides alike. Writes `<out>/sections/<section>.json`, the combined
//! `<out>/results.json` and `<out>/RESULTS.md` (medians of the runs, ratios, the machine, the
//! commands). Needs root; everything runs in network namespaces it creates (documentation and
//! benchmark address ranges only) and is torn down at the end, on failure and on Ctrl-C.
//!
//! Sections:
//! * `ebpf`: ns/packet of the TC programs through `BPF_PROG_TEST_RUN` next to an empty program
//!   (runs `wgmesh-bench-ebpf`, a binary of this crate);
//! * `datapath`: iperf3 TCP throughput (1 and 4 streams), ping RTT and CPU per GB between pods on two
//!   simulated nodes: plain host-gw routing, wgmesh's userspace device, wireguard-go;
//! * `control`: agent start to all peers and map entries programmed with N Nodes, one key change,
//!   peak RSS, CPU, API requests (and writes in steady state), next to `wg setconf` of the same peers;
//! * `disruption`: 100/s ping loss and TCP stream survival across agent restarts, key rotations and a
//!   node joining.
//!
//! `--quick` (what the smoke test runs) uses tiny sizes and one run; every section must still
//! produce numbers, else the exit status is non-zero.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use clap::{Parser, ValueEnum};
use ipnet::{IpNet, Ipv4Net};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use signal_hook::{
    consts::{SIGINT, SIGTERM},
    iterator::Signals,
};
use wgmesh_netns_tests::{
    apiserver::{node_object, rfc3339},
    cmd::{self, Cmd},
    eventually::eventually,
    netns::NetNs,
    node::{ENV_AGENT_BIN, Node},
    pod::Pod,
    probe::{ProbeProcess, locate_binary},
    process::ChildGuard,
    testbed::{TeardownHandle, Testbed, TestbedBuilder},
};

// ================================================================================================
// Command line
// ================================================================================================

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Section {
    /// Per-packet cost of the TC programs (BPF_PROG_TEST_RUN).
    Ebpf,
    /// Throughput, RTT and CPU/GB: plain routing vs wgmesh vs wireguard-go.
    Datapath,
    /// Convergence, key change, RSS, CPU and API requests with N Nodes.
    Control,
    /// Ping loss and TCP survival across restarts, rotations, a join.
    Disruption,
    /// Every section above, in this order.
    All,
    /// Only re-render RESULTS.md from results.json.
    Report,
}

impl Section {
    fn name(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::Datapath => "datapath",
            Self::Control => "control",
            Self::Disruption => "disruption",
            Self::All => "all",
            Self::Report => "report",
        }
    }
}

const SECTIONS: [Section; 4] = [
    Section::Ebpf,
    Section::Datapath,
    Section::Control,
    Section::Disruption,
];

#[derive(Debug, Parser)]
#[command(
    name = "wgmesh-bench",
    about = "wgmesh benchmarks in network namespaces (root): eBPF cost, userspace datapath, control plane at scale, disruption",
    after_help = "Examples:\n  wgmesh-bench all --out bench          # what `make bench` runs\n  wgmesh-bench control --quick --out /tmp/b\n  wgmesh-bench report --out bench       # re-render RESULTS.md\n\nEnv: WGMESH_AGENT_BIN, WGMESH_APISERVER_BIN, WGMESH_PROBE_BIN, WGMESH_BENCH_EBPF_BIN\n(each defaults to the binary next to this one)."
)]
struct Args {
    /// What to run.
    #[arg(value_enum)]
    section: Section,
    /// Tiny sizes, one run, seconds-long traffic (the smoke test; finishes in about 2 minutes).
    #[arg(long)]
    quick: bool,
    /// Runs per measurement (medians are taken over them). Default: 5 (eBPF 9), 1 with --quick.
    #[arg(long)]
    runs: Option<usize>,
    /// Directory for results.json, RESULTS.md and sections/*.json.
    #[arg(long, default_value = "bench")]
    out: PathBuf,
    /// Node counts for the control-plane section (default 100,1000,5000; 10,50 with --quick).
    #[arg(long, value_delimiter = ',')]
    nodes: Option<Vec<usize>>,
    /// Echo every command the harness runs.
    #[arg(long, short)]
    verbose: bool,
}

/// Sizes and durations of one invocation.
#[derive(Debug, Clone)]
struct Plan {
    quick: bool,
    runs: usize,
    ebpf_runs: usize,
    ebpf_repeat: u32,
    ebpf_cidrs: Vec<usize>,
    iperf_seconds: u32,
    ping_count: u32,
    nodes: Vec<usize>,
    steady_window: Duration,
    disruption_window: Duration,
}

impl Plan {
    fn new(args: &Args) -> Self {
        let quick = args.quick;
        let runs = args.runs.unwrap_or(if quick { 1 } else { 5 }).max(1);
        Self {
            quick,
            runs,
            ebpf_runs: args.runs.unwrap_or(if quick { 1 } else { 9 }).max(1),
            ebpf_repeat: if quick { 100_000 } else { 5_000_000 },
            ebpf_cidrs: vec![10, 1_000, 5_000],
            iperf_seconds: if quick { 2 } else { 10 },
            ping_count: if quick { 20 } else { 200 },
            nodes: args.nodes.clone().unwrap_or(if quick {
                vec![10, 50]
            } else {
                vec![100, 1_000, 5_000]
            }),
            // Longer than the agent's 30 s resync, so a full level-triggered pass is inside.
            steady_window: Duration::from_secs(if quick { 3 } else { 35 }),
            disruption_window: Duration::from_secs(if quick { 5 } else { 12 }),
        }
    }
}

// ================================================================================================
// Teardown on signals
// ================================================================================================

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Testbeds alive right now (a signal tears them down).
static BEDS: Mutex<Vec<TeardownHandle>> = Mutex::new(Vec::new());
/// UAPI sockets of devices this binary started itself (not the harness's), removed at the end.
static SOCKETS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn register(bed: &Testbed) {
    if let Ok(mut beds) = BEDS.lock() {
        beds.push(bed.teardown_handle());
    }
}

fn forget_beds() {
    if let Ok(mut beds) = BEDS.lock() {
        beds.clear();
    }
}

fn uapi_socket(ifname: &str) -> PathBuf {
    PathBuf::from("/var/run/wireguard").join(format!("{ifname}.sock"))
}

fn remove_sockets() {
    let sockets = SOCKETS.lock().map(|s| s.clone()).unwrap_or_default();
    for s in sockets {
        match fs::remove_file(&s) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                eprintln!("warning: cannot remove {}: {e}", s.display());
            }
            _ => {}
        }
    }
}

fn interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

// ================================================================================================
// Small helpers: statistics, /proc, keys, commands
// ================================================================================================

fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    })
}

fn max_of(values: &[f64]) -> Option<f64> {
    values
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .max_by(f64::total_cmp)
}

fn min_of(values: &[f64]) -> Option<f64> {
    values
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .min_by(f64::total_cmp)
}

/// JSON number or null.
fn num(x: Option<f64>) -> Value {
    x.filter(|x| x.is_finite())
        .map_or(Value::Null, |x| json!(x))
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

/// Clock ticks per second of /proc times (USER_HZ).
fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions and only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of a process (all its threads), in seconds.
fn process_cpu_seconds(pid: i32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clk_tck())
}

/// A `kB` field of /proc/<pid>/status (VmHWM, VmRSS), in MiB.
fn process_status_mib(pid: i32, field: &str) -> Option<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// (busy, total) CPU seconds of the whole machine so far (/proc/stat).
fn system_cpu_seconds() -> Option<(f64, f64)> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 8 {
        return None;
    }
    let total: u64 = v.iter().sum();
    let idle = v[3] + v[4];
    let tck = clk_tck();
    Some(((total - idle) as f64 / tck, total as f64 / tck))
}

fn cmdline(pid: i32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Processes in `ns` whose command line satisfies `pred`.
fn pids_where(ns: &NetNs, pred: impl Fn(&[String]) -> bool) -> Vec<i32> {
    ns.pids()
        .unwrap_or_default()
        .into_iter()
        .filter(|p| pred(&cmdline(*p)))
        .collect()
}

fn has_args(args: &[String], wanted: &[&str]) -> bool {
    wanted.iter().all(|w| args.iter().any(|a| a == w))
}

/// The agent (`wgmesh-agent run`) on `node`.
fn agent_pid(node: &Node) -> Option<i32> {
    pids_where(node.netns(), |a| has_args(a, &["run", "--node-name"]))
        .into_iter()
        .next()
}

/// The userspace device process (`wgmesh-agent device --interface <if>`) of `node`.
fn device_pid(node: &Node) -> Option<i32> {
    pids_where(node.netns(), |a| {
        has_args(a, &["device", "--interface", node.wg_interface()])
    })
    .into_iter()
    .next()
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(T[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A WireGuard private key (32 random bytes, clamped as `wg genkey` does), base64.
fn private_key() -> Result<String> {
    let mut b = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom")?;
    b[0] &= 248;
    b[31] = (b[31] & 127) | 64;
    Ok(base64(&b))
}

/// `(private, public)` key pairs; the public halves come from `wg pubkey` (one bash for all).
fn key_pairs(count: usize) -> Result<Vec<(String, String)>> {
    let privs: Vec<String> = (0..count).map(|_| private_key()).collect::<Result<_>>()?;
    let mut child = Command::new("bash")
        .args([
            "-c",
            "while read -r k; do wg pubkey <<<\"$k\" || exit 1; done",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting bash for wg pubkey")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let input = privs.join("\n") + "\n";
    let writer = thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().context("wg pubkey")?;
    writer
        .join()
        .map_err(|_| anyhow!("writer panicked"))?
        .context("feeding wg pubkey")?;
    ensure!(
        out.status.success(),
        "wg pubkey failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pubs: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    ensure!(
        pubs.len() == count,
        "wg pubkey gave {} keys for {count}",
        pubs.len()
    );
    Ok(privs.into_iter().zip(pubs).collect())
}

/// The commit the binaries were built from, `-dirty` when sources differ from it. The bench's own
/// output (`bench/`, which a run rewrites as it goes) does not count.
fn source_revision() -> String {
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let commit = first_line("git", &["-C", repo, "describe", "--always"]);
    let changed = Command::new("git")
        .args([
            "-C",
            repo,
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            ".",
            ":(exclude)bench",
        ])
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    if changed {
        format!("{commit}-dirty")
    } else {
        commit
    }
}

fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn read_trim(path: &str) -> String {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// What the results were measured on.
fn machine() -> Value {
    let cpuinfo = read_trim("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown".to_owned(), |s| s.trim().to_owned());
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let hypervisor = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .is_some_and(|l| l.split_whitespace().any(|f| f == "hypervisor"));
    let mem_mib = read_trim("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024);
    let os = read_trim("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map_or("unknown".to_owned(), |s| s.trim_matches('"').to_owned());
    json!({
        "kernel": read_trim("/proc/sys/kernel/osrelease"),
        "os": os,
        "cpu_model": model,
        "cpus": cores,
        "virtualized": hypervisor,
        "memory_mib": mem_mib,
        "loadavg_at_start": read_trim("/proc/loadavg"),
        "git": source_revision(),
        "wireguard_go": first_line("wireguard-go", &["--version"]),
        "wg": first_line("wg", &["--version"]),
        "iperf3": first_line("iperf3", &["--version"]),
        "agent_bin": locate_binary(ENV_AGENT_BIN, "wgmesh-agent").map_or("not found".to_owned(), |p| p.display().to_string()),
    })
}

/// Round-trip times of a ping run: min, avg, max in ms.
type Rtt = (f64, f64, f64);

/// `ping -q` summary: (transmitted, received, rtt min/avg/max ms).
fn parse_ping(out: &str) -> Result<(u32, u32, Option<Rtt>)> {
    let line = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .ok_or_else(|| anyhow!("no ping summary in {out:?}"))?;
    let field = |key: &str| -> Option<u32> {
        line.split(',')
            .find(|p| p.contains(key))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let tx = field("transmitted").ok_or_else(|| anyhow!("bad summary {line:?}"))?;
    let rx = field("received").ok_or_else(|| anyhow!("bad summary {line:?}"))?;
    let rtt = out
        .lines()
        .find(|l| l.starts_with("rtt ") || l.starts_with("round-trip"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| {
            let parts: Vec<f64> = v
                .trim()
                .trim_end_matches("ms")
                .trim()
                .split('/')
                .filter_map(|x| x.parse().ok())
                .collect();
            (parts.len() >= 3).then(|| (parts[0], parts[1], parts[2]))
        });
    Ok((tx, rx, rtt))
}

fn ping_cmd_args(count: u32, interval: &str, dst: Ipv4Addr) -> Vec<String> {
    [
        "-n",
        "-q",
        "-c",
        &count.to_string(),
        "-i",
        interval,
        "-W",
        "1",
        &dst.to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// A testbed builder with the bench's defaults: agents log at info (as deployed; debug logging of
/// thousands of peers would be measured too).
fn builder(label: &str) -> TestbedBuilder {
    Testbed::builder(label)
}

fn start_bed(b: TestbedBuilder) -> Result<Testbed> {
    let bed = b.start()?;
    register(&bed);
    Ok(bed)
}

fn wait_converged(bed: &Testbed) -> Result<()> {
    bed.eventually("every node peers with every other node", || {
        bed.assert_full_mesh()
    })?;
    let pods = bed.pods();
    bed.eventually("every pod reaches every pod on another node", || {
        for a in &pods {
            for b in pods.iter().filter(|b| b.node_name() != a.node_name()) {
                a.ping(b, 1)?
                    .assert_no_loss()
                    .with_context(|| format!("{} -> {}", a.name(), b.name()))?;
            }
        }
        Ok(())
    })?;
    bed.eventually("handshakes done", || bed.assert_handshakes())
}

// ================================================================================================
// Section 1: eBPF cost
// ================================================================================================

mod ebpf_section {
    use super::*;

    pub const CASES: [&str; 11] = [
        "noop",
        "steer_remote",
        "steer_other",
        "guard_wireguard",
        "guard_rescue",
        // Remote CIDRs of 2 prefix lengths (hash index), and of more than it serves (LPM trie).
        "steer_remote_2len",
        "steer_other_2len",
        "guard_rescue_2len",
        "steer_remote_fallback",
        "steer_other_fallback",
        "guard_rescue_fallback",
    ];

    pub fn run(plan: &Plan) -> Result<Value> {
        let bin = locate_binary("WGMESH_BENCH_EBPF_BIN", "wgmesh-bench-ebpf").context(
            "build it: cargo build --release -p wgmesh-netns-tests --bins (bench/run does)",
        )?;
        let cidrs: Vec<String> = plan.ebpf_cidrs.iter().map(ToString::to_string).collect();
        let args = [
            "--cidrs".to_owned(),
            cidrs.join(","),
            "--repeat".to_owned(),
            plan.ebpf_repeat.to_string(),
            "--runs".to_owned(),
            plan.ebpf_runs.to_string(),
        ];
        let command = format!("{} {}", bin.display(), args.join(" "));
        let out = Cmd::new(&bin)
            .args(&args)
            .timeout(Duration::from_secs(1_800))
            .output()?;
        ensure!(
            out.success(),
            "{command} failed ({}): {}",
            out.status,
            out.stderr.trim()
        );
        let raw: Value = serde_json::from_str(out.stdout.trim())
            .with_context(|| format!("{command} printed {:?}", out.stdout))?;
        let samples = raw["samples"].as_array().cloned().unwrap_or_default();
        // (cidrs, case) -> per-run ns, kernel ns, ratio to the empty program of the same run.
        let mut rows = Vec::new();
        for &n in &plan.ebpf_cidrs {
            for case in CASES {
                let mut ns = Vec::new();
                let mut kernel = Vec::new();
                let mut ratio = Vec::new();
                let mut what = String::new();
                let mut program = String::new();
                for run in 0..plan.ebpf_runs {
                    let find = |c: &str| {
                        samples.iter().find(|s| {
                            s["run"] == run && s["cidrs"] == n && s["case"].as_str() == Some(c)
                        })
                    };
                    let (Some(s), Some(base)) = (find(case), find("noop")) else {
                        continue;
                    };
                    what = s["what"].as_str().unwrap_or_default().to_owned();
                    program = s["program"].as_str().unwrap_or_default().to_owned();
                    let v = s["ns_per_packet"].as_f64().unwrap_or(f64::NAN);
                    let b = base["ns_per_packet"].as_f64().unwrap_or(f64::NAN);
                    ns.push(v);
                    kernel.push(s["kernel_ns_per_packet"].as_f64().unwrap_or(f64::NAN));
                    ratio.push(v / b);
                }
                rows.push(json!({
                    "cidrs": n,
                    "case": case,
                    "program": program,
                    "what": what,
                    "ns_per_packet": num(median(&ns).map(|x| round(x, 2))),
                    "ns_per_packet_min": num(min_of(&ns).map(|x| round(x, 2))),
                    "ns_per_packet_max": num(max_of(&ns).map(|x| round(x, 2))),
                    "kernel_ns_per_packet": num(median(&kernel)),
                    "ratio_to_empty": num(median(&ratio).map(|x| round(x, 2))),
                }));
            }
        }
        let steer_5000 = rows
            .iter()
            .find(|r| r["case"] == "steer_remote" && r["cidrs"] == 5_000)
            .and_then(|r| r["ratio_to_empty"].as_f64());
        Ok(json!({
            "repeat": plan.ebpf_repeat,
            "runs": plan.ebpf_runs,
            "frame_bytes": samples.first().map_or(Value::Null, |s| s["frame_bytes"].clone()),
            "remote_cidrs_from": raw["remote_cidrs_from"],
            "rows": rows,
            "targets": {
                "steer_ratio_at_5000": num(steer_5000),
            },
            "commands": [command],
            "raw": raw,
        }))
    }

    pub fn check(v: &Value) -> Result<()> {
        let rows = v["rows"].as_array().context("no rows")?;
        ensure!(!rows.is_empty(), "no rows");
        for r in rows {
            ensure!(
                r["ns_per_packet"].as_f64().is_some_and(|x| x > 0.0),
                "no ns/packet for {r}"
            );
            ensure!(
                r["ratio_to_empty"].as_f64().is_some_and(|x| x > 0.0),
                "no ratio for {r}"
            );
        }
        Ok(())
    }
}

// ================================================================================================
// Section 2: userspace datapath
// ================================================================================================

mod datapath_section {
    use super::*;

    pub const CONFIGS: [&str; 4] = ["plain", "wireguard-go", "wgmesh", "wgmesh-boringtun"];
    const IPERF_PORT: &str = "5201";
    /// wireguard-go's listen port (the agents use 51820; separate testbeds anyway).
    const WGGO_PORT: u16 = 51821;
    const TUNNEL_MTU: &str = "1420";

    /// One simulated two-node cluster with a pod on each node, and what it takes to measure it.
    struct Setup {
        name: &'static str,
        bed: Testbed,
        /// The WireGuard device processes (none for plain routing).
        devices: Vec<i32>,
        /// wireguard-go processes we started (killed on drop).
        _wggo: Vec<ChildGuard>,
        _iperf_server: ProbeProcess,
        /// CPU accounting beside the devices: the agents (wgmesh only) and the iperf3 server.
        agents: Vec<i32>,
        iperf_server_pid: Option<i32>,
    }

    impl Setup {
        fn client(&self) -> Pod {
            self.bed.pod("a1")
        }

        fn server(&self) -> Pod {
            self.bed.pod("b1")
        }
    }

    fn two_nodes(label: &str) -> TestbedBuilder {
        two_nodes_with_engine(label, "batched")
    }

    /// `engine`: the agent's device engine (WGMESH_DEVICE_ENGINE, inherited by the device process).
    fn two_nodes_with_engine(label: &str, engine: &str) -> TestbedBuilder {
        builder(label)
            .node("a", |n| {
                n.pod("a1")
                    .backend("userspace")
                    .agent_log_filter("info")
                    .agent_env("WGMESH_DEVICE_ENGINE", engine)
            })
            .node("b", |n| {
                n.pod("b1")
                    .backend("userspace")
                    .agent_log_filter("info")
                    .agent_env("WGMESH_DEVICE_ENGINE", engine)
            })
    }

    fn iperf_server(pod: &Pod) -> Result<ProbeProcess> {
        let p = ProbeProcess::spawn(
            format!("iperf3 server in {}", pod.name()),
            &pod.cmd("iperf3").args(["-s", "-p", IPERF_PORT]),
        )?;
        eventually("iperf3 listens", Duration::from_secs(10), || {
            let out = pod
                .cmd("ss")
                .args(["-Hltn", &format!("sport = :{IPERF_PORT}")])
                .run()?;
            ensure!(!out.trim().is_empty(), "not yet");
            Ok(())
        })?;
        Ok(p)
    }

    /// wireguard-go on both nodes, configured with `wg`, the pod CIDR routes pointed at it.
    fn wireguard_go(bed: &Testbed) -> Result<(Vec<ChildGuard>, Vec<i32>)> {
        let nodes = bed.nodes();
        let keys = key_pairs(nodes.len())?;
        let mut guards = Vec::new();
        let mut pids = Vec::new();
        let ifname = |n: &Node| format!("wg{}-{}", bed.prefix(), n.index());
        for (node, (private, _)) in nodes.iter().zip(&keys) {
            let ifname = ifname(node);
            wgmesh_netns_tests::names::validate_ifname(&ifname)?;
            if let Ok(mut s) = SOCKETS.lock() {
                s.push(uapi_socket(&ifname));
            }
            let log = bed.dir().join(format!("wireguard-go-{}.log", node.name()));
            let child = node
                .cmd("wireguard-go")
                .args(["-f", &ifname])
                .env("WG_PROCESS_FOREGROUND", "1")
                .spawn_logged(&log)?;
            pids.push(i32::try_from(child.id()).context("pid")?);
            guards.push(ChildGuard::new(
                format!("wireguard-go on {}", node.name()),
                child,
            ));
            eventually(
                "wireguard-go answers on its UAPI socket",
                Duration::from_secs(10),
                || node.cmd("wg").args(["show", &ifname]).run().map(drop),
            )?;
            let key_file = bed.dir().join(format!("wggo-{}.key", node.name()));
            fs::write(&key_file, format!("{private}\n"))?;
            node.cmd("wg")
                .args(["set", &ifname, "private-key"])
                .arg(&key_file)
                .args(["listen-port", &WGGO_PORT.to_string()])
                .run()?;
            node.ip(["link", "set", &ifname, "mtu", TUNNEL_MTU, "up"])?;
        }
        for (node, _) in nodes.iter().zip(&keys) {
            for (other, (_, public)) in nodes.iter().zip(&keys) {
                if other.index() == node.index() {
                    continue;
                }
                let cidr = other.pod_cidr().to_string();
                node.cmd("wg")
                    .args(["set", &ifname(node), "peer", public, "endpoint"])
                    .arg(format!("{}:{WGGO_PORT}", other.underlay_ip()))
                    .args(["allowed-ips", &cidr, "persistent-keepalive", "25"])
                    .run()?;
                node.ip(["route", "replace", &cidr, "dev", &ifname(node)])?;
            }
        }
        Ok((guards, pids))
    }

    fn setups() -> Result<Vec<Setup>> {
        let mut out = Vec::new();
        for name in CONFIGS {
            interrupted()?;
            let setup = match name {
                "plain" => {
                    let bed = start_bed(two_nodes("bench-plain").without_apiserver())?;
                    let server = iperf_server(&bed.pod("b1"))?;
                    Setup {
                        name,
                        bed,
                        devices: Vec::new(),
                        _wggo: Vec::new(),
                        _iperf_server: server,
                        agents: Vec::new(),
                        iperf_server_pid: None,
                    }
                }
                "wireguard-go" => {
                    let bed = start_bed(two_nodes("bench-wggo").without_apiserver())?;
                    let (guards, pids) = wireguard_go(&bed)?;
                    let server = iperf_server(&bed.pod("b1"))?;
                    Setup {
                        name,
                        bed,
                        devices: pids,
                        _wggo: guards,
                        _iperf_server: server,
                        agents: Vec::new(),
                        iperf_server_pid: None,
                    }
                }
                _ => {
                    let bed = start_bed(if name == "wgmesh-boringtun" {
                        two_nodes_with_engine("bench-wgmesh-bt", "boringtun")
                    } else {
                        two_nodes("bench-wgmesh")
                    })?;
                    wait_converged(&bed)?;
                    let devices = bed
                        .nodes()
                        .iter()
                        .map(|n| {
                            device_pid(n).with_context(|| format!("no device on {}", n.name()))
                        })
                        .collect::<Result<_>>()?;
                    let server = iperf_server(&bed.pod("b1"))?;
                    let agents = bed.nodes().iter().filter_map(agent_pid).collect();
                    Setup {
                        name,
                        bed,
                        devices,
                        _wggo: Vec::new(),
                        _iperf_server: server,
                        agents,
                        iperf_server_pid: None,
                    }
                }
            };
            let mut setup = setup;
            setup.iperf_server_pid = pids_where(setup.server().netns(), |a| {
                has_args(a, &["-s", "-p", IPERF_PORT])
            })
            .into_iter()
            .next();
            // Every path works (and WireGuard has its session) before anything is measured.
            let (client, server) = (setup.client(), setup.server());
            setup
                .bed
                .eventually(&format!("{name}: a1 reaches b1"), || {
                    client.ping(&server, 2)?.assert_no_loss()
                })?;
            out.push(setup);
        }
        Ok(out)
    }

    /// CPU seconds so far: the devices, the agents, the iperf3 server, the kernel's softirq
    /// threads, and the whole machine (busy, total).
    #[derive(Debug, Clone, Copy, Default)]
    struct CpuSnapshot {
        devices: f64,
        agents: f64,
        iperf_server: f64,
        ksoftirqd: f64,
        busy: f64,
        total: f64,
    }

    fn sum_cpu(pids: &[i32]) -> f64 {
        pids.iter().filter_map(|p| process_cpu_seconds(*p)).sum()
    }

    /// The kernel's per-CPU softirq threads (where network receive work goes when it is not done
    /// in the context of the process that caused it).
    fn ksoftirqd_pids() -> Vec<i32> {
        fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| read_trim(&format!("/proc/{pid}/comm")).starts_with("ksoftirqd/"))
            .collect()
    }

    fn cpu_snapshot(setup: &Setup, softirq: &[i32]) -> CpuSnapshot {
        let (busy, total) = system_cpu_seconds().unwrap_or((0.0, 0.0));
        CpuSnapshot {
            devices: sum_cpu(&setup.devices),
            agents: sum_cpu(&setup.agents),
            iperf_server: setup
                .iperf_server_pid
                .and_then(process_cpu_seconds)
                .unwrap_or(0.0),
            ksoftirqd: sum_cpu(softirq),
            busy,
            total,
        }
    }

    /// One iperf3 test; a failed attempt (the server still busy with the previous test, a
    /// refused connection) is retried once after a second.
    fn iperf(setup: &Setup, streams: u32, seconds: u32) -> Result<Value> {
        iperf_once(setup, streams, seconds).or_else(|e| {
            eprintln!(
                "warning: iperf3 ({}, {streams} streams): {e:#}; retrying",
                setup.name
            );
            thread::sleep(Duration::from_secs(1));
            iperf_once(setup, streams, seconds)
        })
    }

    fn iperf_once(setup: &Setup, streams: u32, seconds: u32) -> Result<Value> {
        let (client, server) = (setup.client(), setup.server());
        let cmd = client.cmd("iperf3").args([
            "-c",
            &server.ip().to_string(),
            "-p",
            IPERF_PORT,
            "-t",
            &seconds.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ]);
        let softirq = ksoftirqd_pids();
        let before = cpu_snapshot(setup, &softirq);
        let out = cmd
            .clone()
            .timeout(Duration::from_secs(u64::from(seconds) + 40))
            .output()?;
        let after = cpu_snapshot(setup, &softirq);
        let v: Value = serde_json::from_str(&out.stdout)
            .with_context(|| format!("iperf3 printed {:?} {}", out.stdout, out.stderr))?;
        if let Some(e) = v["error"].as_str() {
            bail!("iperf3 ({} streams, {}): {e}", streams, setup.name);
        }
        let recv = &v["end"]["sum_received"];
        let bytes = recv["bytes"].as_f64().context("no sum_received.bytes")?;
        let bps = recv["bits_per_second"]
            .as_f64()
            .context("no bits_per_second")?;
        let gb = bytes / 1e9;
        let cpus = f64::from(
            u32::try_from(thread::available_parallelism().map_or(1, |n| n.get())).unwrap_or(1),
        );
        let busy = after.busy - before.busy;
        let total = after.total - before.total;
        let devices = after.devices - before.devices;
        Ok(json!({
            "streams": streams,
            "mbit_per_s": round(bps / 1e6, 1),
            "bytes": bytes,
            "retransmits": v["end"]["sum_sent"]["retransmits"],
            "device_cpu_s": round(devices, 3),
            "agent_cpu_s": round(after.agents - before.agents, 3),
            "iperf_server_cpu_s": round(after.iperf_server - before.iperf_server, 3),
            "ksoftirqd_cpu_s": round(after.ksoftirqd - before.ksoftirqd, 3),
            "machine_busy_cpu_s": round(busy, 3),
            "device_cpu_s_per_gb": if setup.devices.is_empty() { Value::Null } else { json!(round(devices / gb, 3)) },
            "system_cpu_s_per_gb": round(busy / gb, 3),
            "system_busy_cores": if total > 0.0 { json!(round(busy / total * cpus, 2)) } else { Value::Null },
        }))
    }

    fn ping(setup: &Setup, count: u32) -> Result<Value> {
        let (client, server) = (setup.client(), setup.server());
        let out = client
            .cmd("ping")
            .args(ping_cmd_args(count, "0.01", server.ip()))
            .timeout(Duration::from_secs(u64::from(count) / 50 + 30))
            .output()?;
        let (tx, rx, rtt) = parse_ping(&out.stdout)?;
        let (min, avg, max) = rtt.context("ping printed no rtt line")?;
        Ok(json!({
            "transmitted": tx,
            "received": rx,
            "rtt_min_ms": min,
            "rtt_avg_ms": avg,
            "rtt_max_ms": max,
        }))
    }

    pub fn run(plan: &Plan) -> Result<Value> {
        let setups = setups()?;
        let mut runs = Vec::new();
        for run in 0..plan.runs {
            let mut per = serde_json::Map::new();
            // Rotate the order so that no configuration always goes first.
            for k in 0..setups.len() {
                interrupted()?;
                let s = &setups[(k + run) % setups.len()];
                eprintln!("datapath run {}/{}: {}", run + 1, plan.runs, s.name);
                let tcp1 = iperf(s, 1, plan.iperf_seconds)?;
                let tcp4 = iperf(s, 4, plan.iperf_seconds)?;
                let ping = ping(s, plan.ping_count)?;
                per.insert(
                    s.name.to_owned(),
                    json!({"tcp1": tcp1, "tcp4": tcp4, "ping": ping}),
                );
            }
            runs.push(Value::Object(per));
        }
        drop(setups);
        forget_beds();
        remove_sockets();

        let series = |cfg: &str, path: &[&str]| -> Vec<f64> {
            runs.iter()
                .filter_map(|r| {
                    let mut v = &r[cfg];
                    for p in path {
                        v = &v[*p];
                    }
                    v.as_f64()
                })
                .collect()
        };
        let ratio = |a: &str, b: &str, path: &[&str]| -> Option<f64> {
            let (x, y) = (series(a, path), series(b, path));
            let r: Vec<f64> = x.iter().zip(&y).map(|(x, y)| x / y).collect();
            median(&r).map(|v| round(v, 3))
        };
        let mut summary = serde_json::Map::new();
        for cfg in CONFIGS {
            summary.insert(
                cfg.to_owned(),
                json!({
                    "tcp1_mbit_per_s": num(median(&series(cfg, &["tcp1", "mbit_per_s"]))),
                    "tcp4_mbit_per_s": num(median(&series(cfg, &["tcp4", "mbit_per_s"]))),
                    "rtt_avg_ms": num(median(&series(cfg, &["ping", "rtt_avg_ms"]))),
                    "tcp1_device_cpu_s_per_gb": num(median(&series(cfg, &["tcp1", "device_cpu_s_per_gb"]))),
                    "tcp4_device_cpu_s_per_gb": num(median(&series(cfg, &["tcp4", "device_cpu_s_per_gb"]))),
                    "tcp1_system_cpu_s_per_gb": num(median(&series(cfg, &["tcp1", "system_cpu_s_per_gb"]))),
                    "tcp4_system_cpu_s_per_gb": num(median(&series(cfg, &["tcp4", "system_cpu_s_per_gb"]))),
                    "tcp4_system_busy_cores": num(median(&series(cfg, &["tcp4", "system_busy_cores"]))),
                    "tcp4_cpu_s": {
                        "machine_busy": num(median(&series(cfg, &["tcp4", "machine_busy_cpu_s"]))),
                        "devices": num(median(&series(cfg, &["tcp4", "device_cpu_s"]))),
                        "agents": num(median(&series(cfg, &["tcp4", "agent_cpu_s"]))),
                        "iperf_server": num(median(&series(cfg, &["tcp4", "iperf_server_cpu_s"]))),
                        "ksoftirqd": num(median(&series(cfg, &["tcp4", "ksoftirqd_cpu_s"]))),
                    },
                    "tcp4_retransmits": num(median(&series(cfg, &["tcp4", "retransmits"]))),
                }),
            );
        }
        let ratios = json!({
            "wgmesh_vs_plain": {
                "tcp1": num(ratio("wgmesh", "plain", &["tcp1", "mbit_per_s"])),
                "tcp4": num(ratio("wgmesh", "plain", &["tcp4", "mbit_per_s"])),
                "rtt": num(ratio("wgmesh", "plain", &["ping", "rtt_avg_ms"])),
            },
            "wgmesh_vs_wireguard_go": {
                "tcp1": num(ratio("wgmesh", "wireguard-go", &["tcp1", "mbit_per_s"])),
                "tcp4": num(ratio("wgmesh", "wireguard-go", &["tcp4", "mbit_per_s"])),
                "rtt": num(ratio("wgmesh", "wireguard-go", &["ping", "rtt_avg_ms"])),
                "tcp1_device_cpu_per_gb": num(ratio("wgmesh", "wireguard-go", &["tcp1", "device_cpu_s_per_gb"])),
                "tcp4_device_cpu_per_gb": num(ratio("wgmesh", "wireguard-go", &["tcp4", "device_cpu_s_per_gb"])),
            },
            "wgmesh_boringtun_vs_wireguard_go": {
                "tcp1": num(ratio("wgmesh-boringtun", "wireguard-go", &["tcp1", "mbit_per_s"])),
                "tcp4": num(ratio("wgmesh-boringtun", "wireguard-go", &["tcp4", "mbit_per_s"])),
                "rtt": num(ratio("wgmesh-boringtun", "wireguard-go", &["ping", "rtt_avg_ms"])),
                "tcp1_device_cpu_per_gb": num(ratio("wgmesh-boringtun", "wireguard-go", &["tcp1", "device_cpu_s_per_gb"])),
                "tcp4_device_cpu_per_gb": num(ratio("wgmesh-boringtun", "wireguard-go", &["tcp4", "device_cpu_s_per_gb"])),
            },
        });
        Ok(json!({
            "runs": plan.runs,
            "iperf_seconds": plan.iperf_seconds,
            "ping_count": plan.ping_count,
            "summary": summary,
            "ratios": ratios,
            "commands": [
                format!("ip netns exec <pod b1> iperf3 -s -p {IPERF_PORT}"),
                format!("ip netns exec <pod a1> iperf3 -c 198.18.2.11 -p {IPERF_PORT} -t {} -P 1|4 -J", plan.iperf_seconds),
                format!("ip netns exec <pod a1> ping -n -q -c {} -i 0.01 -W 1 198.18.2.11", plan.ping_count),
                "wireguard-go: ip netns exec <node> wireguard-go -f wg<prefix>-<i>; wg set wg<prefix>-<i> private-key <file> listen-port 51821 peer <pub> endpoint 192.0.2.1<j>:51821 allowed-ips 198.18.<j>.0/24 persistent-keepalive 25; ip link set wg<prefix>-<i> mtu 1420 up; ip route replace 198.18.<j>.0/24 dev wg<prefix>-<i>".to_owned(),
                "wgmesh: wgmesh-agent run --backend userspace ... per node (its device: wgmesh-agent device, 2 threads, batched engine; wgmesh-boringtun: the same with WGMESH_DEVICE_ENGINE=boringtun); plain: host-gw routes 198.18.<j>.0/24 via 192.0.2.1<j>".to_owned(),
            ],
            "runs_raw": runs,
        }))
    }

    pub fn check(v: &Value) -> Result<()> {
        for cfg in CONFIGS {
            for k in ["tcp1_mbit_per_s", "tcp4_mbit_per_s", "rtt_avg_ms"] {
                ensure!(
                    v["summary"][cfg][k].as_f64().is_some_and(|x| x > 0.0),
                    "no {k} for {cfg}"
                );
            }
        }
        for k in ["tcp1", "tcp4"] {
            ensure!(
                v["ratios"]["wgmesh_vs_wireguard_go"][k]
                    .as_f64()
                    .is_some_and(|x| x > 0.0),
                "no wgmesh/wireguard-go ratio for {k}"
            );
        }
        Ok(())
    }
}

// ================================================================================================
// Section 3: control plane at scale
// ================================================================================================

mod control_section {
    use super::*;

    /// Fake nodes' pod CIDRs: /29s of 198.19.0.0/16 (8192 fit; the harness's real nodes use
    /// 198.18.<i>.0/24, so nothing overlaps).
    const FAKE_RANGE: &str = "198.19.0.0/16";
    const FAKE_PREFIX: u8 = 29;
    const FLOOR_PORT: u16 = 51999;
    const POLL: Duration = Duration::from_millis(50);
    const ANN_KEY: &str = "v1.wgmesh.io/public-key";
    const ANN_PORT: &str = "v1.wgmesh.io/listen-port";
    const ANN_HOSTS: &str = "v1.wgmesh.io/host-addresses";
    /// Fake nodes' own (host) addresses, one each, published for host encryption as every node
    /// running wgmesh does: 198.18.128.0/17, outside every pod CIDR.
    const FAKE_HOSTS: &str = "198.18.128.0/17";

    struct Fake {
        name: String,
        public: String,
        endpoint: (Ipv4Addr, u16),
        cidr: Ipv4Net,
        /// A second InternalIP (the endpoint's is shared by 50 fakes), its host address.
        host: Ipv4Addr,
    }

    fn fakes(n: usize, keys: &[(String, String)]) -> Result<Vec<Fake>> {
        let range: Ipv4Net = FAKE_RANGE.parse()?;
        let cidrs: Vec<Ipv4Net> = range.subnets(FAKE_PREFIX)?.take(n).collect();
        let hosts: Vec<Ipv4Addr> = FAKE_HOSTS.parse::<Ipv4Net>()?.hosts().take(n).collect();
        ensure!(
            hosts.len() == n,
            "{n} host addresses do not fit in {FAKE_HOSTS}"
        );
        ensure!(
            cidrs.len() == n,
            "{n} /{FAKE_PREFIX}s do not fit in {FAKE_RANGE}"
        );
        Ok((0..n)
            .map(|i| Fake {
                name: format!("fake-{i:05}"),
                public: keys[i].1.clone(),
                // Nothing listens there: 192.0.2.100-199 on the testbed's underlay, which has no
                // such hosts (the devices' keepalives die at ARP inside the namespaces).
                endpoint: (
                    Ipv4Addr::new(192, 0, 2, 100 + u8::try_from(i % 100).unwrap_or(0)),
                    51820 + u16::try_from(i / 100).unwrap_or(0),
                ),
                cidr: cidrs[i],
                host: hosts[i],
            })
            .collect())
    }

    /// Creates the fake Nodes; returns the average size of one Node's JSON as stored.
    fn create_fakes(bed: &Testbed, fakes: &[Fake]) -> Result<f64> {
        let api = bed.api()?;
        let mut bytes = 0usize;
        for f in fakes {
            let mut node = node_object(&f.name, IpAddr::V4(f.endpoint.0), &[IpNet::V4(f.cidr)]);
            if let Some(addresses) = node["status"]["addresses"].as_array_mut() {
                addresses.push(json!({ "type": "InternalIP", "address": f.host.to_string() }));
            }
            node["metadata"]["annotations"] = json!({
                ANN_KEY: f.public,
                ANN_PORT: f.endpoint.1.to_string(),
                "v1.wgmesh.io/key-generation": "1",
                ANN_HOSTS: f.host.to_string(),
            });
            let created = api
                .json("POST", "/api/v1/nodes", None, Some(&node))
                .with_context(|| format!("creating {}", f.name))?;
            bytes += serde_json::to_vec(&created).map_or(0, |v| v.len());
        }
        Ok(bytes as f64 / fakes.len().max(1) as f64)
    }

    fn peer_keys(node: &Node, ifname: &str) -> Option<Vec<String>> {
        let out = node
            .cmd("wg")
            .args(["show", ifname, "peers"])
            .timeout(Duration::from_secs(20))
            .output()
            .ok()?;
        out.success()
            .then(|| out.stdout.lines().map(str::to_owned).collect())
    }

    /// `wgmesh-agent device` + `wg setconf` with the same peers: the floor.
    fn floor(node: &Node, fakes: &[Fake], dir: &Path, tag: &str) -> Result<Value> {
        let bin = locate_binary(ENV_AGENT_BIN, "wgmesh-agent")?;
        let ifname = format!("fl{}", &node.wg_interface()[2..]);
        wgmesh_netns_tests::names::validate_ifname(&ifname)?;
        let socket = uapi_socket(&ifname);
        if let Ok(mut s) = SOCKETS.lock() {
            s.push(socket.clone());
        }
        let conf = dir.join(format!("floor-{tag}.conf"));
        let mut text = format!(
            "[Interface]\nPrivateKey = {}\nListenPort = {FLOOR_PORT}\n",
            private_key()?
        );
        for f in fakes {
            text.push_str(&format!(
                "\n[Peer]\nPublicKey = {}\nEndpoint = {}:{}\nAllowedIPs = {}, {}/32\nPersistentKeepalive = 25\n",
                f.public, f.endpoint.0, f.endpoint.1, f.cidr, f.host
            ));
        }
        fs::write(&conf, text)?;
        let started = Instant::now();
        let child = node
            .cmd(&bin)
            .args(["device", "--interface", &ifname])
            .spawn_logged(&dir.join(format!("floor-{tag}.log")))?;
        let mut device = ChildGuard::new("floor device", child);
        eventually("the floor device answers", Duration::from_secs(10), || {
            node.cmd("wg").args(["show", &ifname]).run().map(drop)
        })?;
        let device_start = started.elapsed();
        let t = Instant::now();
        node.cmd("wg")
            .args(["setconf", &ifname])
            .arg(&conf)
            .timeout(Duration::from_secs(300))
            .run()?;
        let setconf = t.elapsed();
        let count = peer_keys(node, &ifname).map_or(0, |k| k.len());
        ensure!(
            count == fakes.len(),
            "the floor device has {count} peers, not {}",
            fakes.len()
        );
        let rss = device
            .pid()
            .and_then(|p| process_status_mib(i32::try_from(p).ok()?, "VmHWM"));
        device.stop(Signal::SIGTERM, Duration::from_secs(10)).ok();
        fs::remove_file(&socket).ok();
        Ok(json!({
            "device_start_s": device_start.as_secs_f64(),
            "setconf_s": setconf.as_secs_f64(),
            "device_start_plus_setconf_s": (device_start + setconf).as_secs_f64(),
            "device_peak_rss_mib": num(rss),
        }))
    }

    /// Polls the agent's log every 20 ms until a line satisfies `done`; returns its timestamp.
    fn wait_for_log(
        node: &Node,
        since: Instant,
        timeout: Duration,
        done: impl Fn(f64, &str) -> bool,
    ) -> Result<f64> {
        loop {
            interrupted()?;
            if let Some((t, _)) = agent_log_lines(node).into_iter().find(|(t, m)| done(*t, m)) {
                return Ok(t);
            }
            if since.elapsed() > timeout {
                node.assert_agent_running()?;
                bail!(
                    "{} did not get there within {timeout:?}; log tail:\n{}",
                    node.name(),
                    node.agent_log_tail(20)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls the agent's `/status` every [`POLL`] until `done` holds.
    fn poll_status(
        node: &Node,
        since: Instant,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        loop {
            interrupted()?;
            if since.elapsed() > timeout {
                node.assert_agent_running()?;
                bail!("{} did not get there within {timeout:?}", node.name());
            }
            if let Ok(status) = node.status()
                && done(&status)
            {
                return Ok(status);
            }
            thread::sleep(POLL);
        }
    }

    /// Seconds since the epoch.
    pub fn unix_seconds(t: SystemTime) -> f64 {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    }

    /// `2026-11-26T06:16:21.306113Z` as seconds since the epoch.
    pub fn parse_rfc3339(s: &str) -> Option<f64> {
        let t: jiff::Timestamp = s.parse().ok()?;
        Some(t.as_nanosecond() as f64 / 1e9)
    }

    /// (time, text) of the agent log lines since the harness last started it.
    fn agent_log_lines(node: &Node) -> Vec<(f64, String)> {
        let log = node.agent_log();
        let since = log.rfind("===== harness: starting").unwrap_or(0);
        log[since..]
            .lines()
            .filter_map(|l| {
                let (ts, rest) = l.split_once(' ')?;
                Some((parse_rfc3339(ts)?, rest.to_owned()))
            })
            .collect()
    }

    fn agent_stats(bed: &Testbed, node: &Node) -> Result<Value> {
        let stats = bed.api()?.stats()?;
        Ok(stats["by_client"][node.underlay_ip().to_string()].clone())
    }

    fn delta(after: &Value, before: &Value, key: &str) -> u64 {
        after[key]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(before[key].as_u64().unwrap_or(0))
    }

    fn verbs_delta(after: &Value, before: &Value) -> Value {
        let mut m = serde_json::Map::new();
        if let Some(v) = after["by_verb"].as_object() {
            for k in v.keys() {
                let d = delta(&after["by_verb"], &before["by_verb"], k);
                if d > 0 {
                    m.insert(k.clone(), json!(d));
                }
            }
        }
        Value::Object(m)
    }

    /// One run at size N: floor, agent start to converged, key change, (steady state).
    fn one_run(
        bed: &Testbed,
        fakes: &[Fake],
        new_key: &str,
        run: usize,
        steady: Option<Duration>,
    ) -> Result<Value> {
        let node = bed.node("a");
        let n = fakes.len();
        let ifname = node.wg_interface().to_owned();
        let floor = floor(&node, fakes, bed.dir(), &format!("{n}-{run}"))?;
        interrupted()?;

        // A fresh node each run: no device, no pins, no key (the agent generates and publishes one).
        for f in ["private.key", "key.json"] {
            fs::remove_file(node.state_dir().join(f)).ok();
        }
        bed.api()?.reset_stats()?;
        let apiserver = pids_where(bed.underlay().netns(), |a| {
            has_args(a, &["--control-socket"])
        })
        .into_iter()
        .next();
        let api_cpu0 = apiserver.and_then(process_cpu_seconds);
        let t0_wall = SystemTime::now();
        let t0_unix = unix_seconds(t0_wall);
        let t0 = Instant::now();
        node.start_agent()?;
        let timeout = Duration::from_secs(120 + n as u64 / 10);
        // Converged = the agent logs the reconcile that programmed all N peers: it writes that
        // line after adding the peers to the device, the CIDRs to the eBPF maps and the routes. Its
        // timestamp is the measurement; watching the log file costs the agent and the device
        // nothing (polling /status or `wg show` would: both read the device over its UAPI socket
        // while the agent is writing to it). Checked afterwards on /status and the device.
        let all_peers = format!("peers={n}");
        let converged_at = wait_for_log(&node, t0, timeout, |t, m| {
            t >= t0_unix && m.contains("peers reconciled") && m.contains(&all_peers)
        })?;
        let observed = t0.elapsed();
        let t_conv = converged_at - t0_unix;
        let pid = agent_pid(&node).context("agent pid")?;
        let cpu_converge = process_cpu_seconds(pid);
        let api_cpu = apiserver
            .and_then(process_cpu_seconds)
            .zip(api_cpu0)
            .map(|(b, a)| b - a);
        let device_cpu = device_pid(&node).and_then(process_cpu_seconds);
        let startup = agent_stats(bed, &node)?;
        let status = poll_status(&node, t0, timeout, |st| {
            st["datapath"]["remote_cidrs"]
                .as_array()
                .map_or(0, Vec::len)
                == n
                && st["desired_peers"].as_array().map_or(0, Vec::len) == n
        })
        .context(
            "the agent logged convergence, but /status does not show N peers and N map entries",
        )?;
        let in_device = peer_keys(&node, &ifname).map_or(0, |k| k.len());
        ensure!(
            in_device == n,
            "the agent logged convergence, but the device has {in_device} peers, not {n}"
        );
        let log = agent_log_lines(&node);
        let at = |needle: &str, after: f64| -> Value {
            num(log
                .iter()
                .find(|(t, m)| *t >= after && m.contains(needle))
                .map(|(t, _)| round(t - t0_unix, 4)))
        };
        let phases = json!({
            "process_up_s": at("status endpoint listening", t0_unix),
            "device_ready_s": at("wireguard device ready", t0_unix),
            "datapath_loaded_s": at("datapath loaded", t0_unix),
            "uplink_guard_attached_s": at("plaintext leak guard attached", t0_unix),
            "nodes_listed_s": at("initial node list received", t0_unix),
            "key_published_s": at("published the node's public key", t0_unix),
            // The first reconcile that programmed all N peers (it may run before the "initial
            // node list received" line: any trigger reconciles once the cache is filled).
            "peers_reconciled_s": round(t_conv, 4),
        });

        // One Node's key changes: from the PATCH to the agent's log line of the reconcile that
        // added the new key and removed the old one; checked on the device.
        let victim = &fakes[(run * 7919) % n];
        let before_change = agent_stats(bed, &node)?;
        let t1_wall = SystemTime::now();
        let t1_unix = unix_seconds(t1_wall);
        let t1 = Instant::now();
        bed.api()?
            .patch_node_annotations(&victim.name, &[(ANN_KEY, Some(new_key))])?;
        let changed_at = wait_for_log(&node, t1, Duration::from_secs(60), |t, m| {
            t >= t1_unix && m.contains("peers reconciled") && m.contains("removed=1")
        })?;
        let key_change_observed = t1.elapsed();
        let key_change = changed_at - t1_unix;
        let keys = peer_keys(&node, &ifname).context("wg show")?;
        ensure!(
            keys.iter().any(|k| k == new_key) && !keys.contains(&victim.public),
            "the agent logged the key change, the device does not show it"
        );
        thread::sleep(Duration::from_millis(300));
        let after_change = agent_stats(bed, &node)?;
        // Put the key back for the next run (the fake list is shared).
        bed.api()?
            .patch_node_annotations(&victim.name, &[(ANN_KEY, Some(victim.public.as_str()))])?;
        eventually("the old key is back", Duration::from_secs(60), || {
            let keys = peer_keys(&node, &ifname).context("wg show")?;
            ensure!(keys.contains(&victim.public), "not yet");
            Ok(())
        })?;

        let steady_v = match steady {
            Some(window) => {
                thread::sleep(Duration::from_secs(1));
                let s0 = agent_stats(bed, &node)?;
                let w0 = Instant::now();
                while w0.elapsed() < window {
                    interrupted()?;
                    thread::sleep(Duration::from_millis(250));
                }
                let s1 = agent_stats(bed, &node)?;
                json!({
                    "window_s": window.as_secs_f64(),
                    "requests": delta(&s1, &s0, "total"),
                    "writes": delta(&s1, &s0, "writes"),
                    "by_verb": verbs_delta(&s1, &s0),
                })
            }
            None => Value::Null,
        };
        let cpu_total = process_cpu_seconds(pid);
        let hwm = process_status_mib(pid, "VmHWM");
        let rss_end = process_status_mib(pid, "VmRSS");
        let device_hwm = device_pid(&node).and_then(|p| process_status_mib(p, "VmHWM"));
        let reconcile_ms = status["last_reconcile"]["duration_ms"].as_f64();
        node.stop_agent(Signal::SIGTERM)?;
        node.cleanup()?;
        Ok(json!({
            "floor": floor,
            "agent": {
                "converged_s": t_conv,
                "converged_observed_s": observed.as_secs_f64(),
                "phases": phases,
                "last_reconcile_ms": num(reconcile_ms),
                "key_change_s": key_change,
                "key_change_observed_s": key_change_observed.as_secs_f64(),
                "cpu_s_to_converge": num(cpu_converge),
                "cpu_s_total": num(cpu_total),
                "peak_rss_mib": num(hwm),
                "rss_end_mib": num(rss_end),
                "apiserver_cpu_s_to_converge": num(api_cpu),
                "device_cpu_s_to_converge": num(device_cpu),
                "device_peak_rss_mib": num(device_hwm),
                "startup_requests": startup["total"],
                "startup_writes": startup["writes"],
                "startup_by_verb": startup["by_verb"],
                "key_change_requests": delta(&after_change, &before_change, "total"),
                "key_change_writes": delta(&after_change, &before_change, "writes"),
            },
            "ratio_converged_to_setconf": t_conv / floor["setconf_s"].as_f64().unwrap_or(f64::NAN),
            "ratio_converged_to_device_start_plus_setconf": t_conv / floor["device_start_plus_setconf_s"].as_f64().unwrap_or(f64::NAN),
            "steady": steady_v,
        }))
    }

    pub fn run(plan: &Plan) -> Result<Value> {
        let max = plan.nodes.iter().copied().max().unwrap_or(0);
        eprintln!(
            "control: generating {} key pairs with wg pubkey",
            max + plan.runs
        );
        let keys = key_pairs(max + plan.runs)?;
        let mut sizes = Vec::new();
        for &n in &plan.nodes {
            interrupted()?;
            eprintln!("control: {n} nodes");
            let bed = start_bed(
                builder(&format!("bench-cp-{n}"))
                    .agents(false)
                    .node("a", |b| b.backend("userspace").agent_log_filter("info")),
            )?;
            let fakes = fakes(n, &keys)?;
            let t = Instant::now();
            let node_bytes = create_fakes(&bed, &fakes)?;
            let create_s = t.elapsed().as_secs_f64();
            let mut runs = Vec::new();
            for run in 0..plan.runs {
                eprintln!("control: {n} nodes, run {}/{}", run + 1, plan.runs);
                let steady = (run == 0).then_some(plan.steady_window);
                runs.push(one_run(&bed, &fakes, &keys[max + run].1, run, steady)?);
            }
            drop(bed);
            forget_beds();
            remove_sockets();
            let s = |path: &[&str]| -> Vec<f64> {
                runs.iter()
                    .filter_map(|r| {
                        let mut v = r;
                        for p in path {
                            v = &v[*p];
                        }
                        v.as_f64()
                    })
                    .collect()
            };
            // The part of convergence the agent itself does once it has the Nodes: computing the
            // peers and writing them and the maps (Nodes in hand -> peers reconciled). The Nodes
            // are in hand at the first of: the list's completion is logged, the key is published
            // (which needs the agent's own Node from the list).
            let mut in_hand = Vec::new();
            let mut programming = Vec::new();
            let mut programming_ratio = Vec::new();
            for r in &runs {
                let p = &r["agent"]["phases"];
                let hand = match (p["nodes_listed_s"].as_f64(), p["key_published_s"].as_f64()) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let Some(hand) = hand else { continue };
                in_hand.push(hand);
                if let (Some(done), Some(floor)) = (
                    p["peers_reconciled_s"].as_f64(),
                    r["floor"]["setconf_s"].as_f64(),
                ) {
                    programming.push(done - hand);
                    programming_ratio.push((done - hand) / floor);
                }
            }
            let steady = runs
                .iter()
                .find(|r| !r["steady"].is_null())
                .map_or(Value::Null, |r| r["steady"].clone());
            sizes.push(json!({
                "nodes": n,
                "create_nodes_s": round(create_s, 2),
                "node_json_bytes": round(node_bytes, 0),
                "converged_s": num(median(&s(&["agent", "converged_s"]))),
                "phases": {
                    "process_up_s": num(median(&s(&["agent", "phases", "process_up_s"]))),
                    "device_ready_s": num(median(&s(&["agent", "phases", "device_ready_s"]))),
                    "datapath_loaded_s": num(median(&s(&["agent", "phases", "datapath_loaded_s"]))),
                    "uplink_guard_attached_s": num(median(&s(&["agent", "phases", "uplink_guard_attached_s"]))),
                    "nodes_listed_s": num(median(&s(&["agent", "phases", "nodes_listed_s"]))),
                    "nodes_in_hand_s": num(median(&in_hand)),
                    "key_published_s": num(median(&s(&["agent", "phases", "key_published_s"]))),
                    "peers_reconciled_s": num(median(&s(&["agent", "phases", "peers_reconciled_s"]))),
                },
                "converged_observed_s": num(median(&s(&["agent", "converged_observed_s"]))),
                "key_change_observed_s": num(median(&s(&["agent", "key_change_observed_s"]))),
                "floor_setconf_s": num(median(&s(&["floor", "setconf_s"]))),
                "floor_device_start_plus_setconf_s": num(median(&s(&["floor", "device_start_plus_setconf_s"]))),
                "ratio_to_floor": num(median(&s(&["ratio_converged_to_setconf"])).map(|x| round(x, 2))),
                "ratio_to_floor_with_device_start": num(median(&s(&["ratio_converged_to_device_start_plus_setconf"])).map(|x| round(x, 2))),
                "key_change_s": num(median(&s(&["agent", "key_change_s"]))),
                "agent_peak_rss_mib": num(max_of(&s(&["agent", "peak_rss_mib"]))),
                "device_peak_rss_mib": num(max_of(&s(&["agent", "device_peak_rss_mib"]))),
                "floor_device_peak_rss_mib": num(max_of(&s(&["floor", "device_peak_rss_mib"]))),
                "agent_cpu_s_to_converge": num(median(&s(&["agent", "cpu_s_to_converge"]))),
                "apiserver_cpu_s_to_converge": num(median(&s(&["agent", "apiserver_cpu_s_to_converge"]))),
                "device_cpu_s_to_converge": num(median(&s(&["agent", "device_cpu_s_to_converge"]))),
                "agent_rss_end_mib": num(median(&s(&["agent", "rss_end_mib"]))),
                "programming_s": num(median(&programming)),
                "programming_ratio_to_floor": num(median(&programming_ratio).map(|x| round(x, 2))),
                "agent_last_reconcile_ms": num(median(&s(&["agent", "last_reconcile_ms"]))),
                "startup_requests": num(median(&s(&["agent", "startup_requests"]))),
                "startup_writes": num(median(&s(&["agent", "startup_writes"]))),
                "startup_by_verb": runs.first().map_or(Value::Null, |r| r["agent"]["startup_by_verb"].clone()),
                "key_change_requests": num(median(&s(&["agent", "key_change_requests"]))),
                "key_change_writes": num(median(&s(&["agent", "key_change_writes"]))),
                "steady": steady,
                "runs_raw": runs,
            }));
        }
        let at_max = sizes.last().cloned().unwrap_or(Value::Null);
        Ok(json!({
            "runs": plan.runs,
            "sizes": sizes,
            "fake_nodes": format!("pod CIDRs {FAKE_RANGE} in /{FAKE_PREFIX}s, endpoints 192.0.2.100-199 (no such hosts), keys from wg pubkey, each publishing a host address of its own from {FAKE_HOSTS} (host encryption with every node: one more allowed IP per peer, in the floor's config too, and one route per pod CIDR)"),
            "targets": {
                "nodes": at_max["nodes"],
                "ratio_to_floor": at_max["ratio_to_floor"],
                "agent_peak_rss_mib": at_max["agent_peak_rss_mib"],
                "steady_writes": at_max["steady"]["writes"],
            },
            "commands": [
                "ip netns exec <node a> wgmesh-agent run --node-name a --backend userspace ... (harness defaults, RUST_LOG=info); watch its log for 'peers reconciled ... peers=N'; then GET http://127.0.0.1:9464/status (wgmesh-probe http-get in the node) and wg show <if> peers".to_owned(),
                format!("floor: ip netns exec <node a> wgmesh-agent device --interface fl<prefix>; ip netns exec <node a> wg setconf fl<prefix> <conf with the same N peers, PersistentKeepalive = 25, ListenPort = {FLOOR_PORT}>"),
                "key change: PATCH /api/v1/nodes/fake-NNNNN (merge patch of v1.wgmesh.io/public-key); watch the log for 'peers reconciled added=1 ... removed=1'; then wg show <if> peers".to_owned(),
                "requests: GET /_control/stats (by_client[192.0.2.11]) of the API stand-in".to_owned(),
            ],
        }))
    }

    pub fn check(v: &Value) -> Result<()> {
        let sizes = v["sizes"].as_array().context("no sizes")?;
        ensure!(!sizes.is_empty(), "no sizes");
        for s in sizes {
            for k in [
                "converged_s",
                "floor_setconf_s",
                "ratio_to_floor",
                "key_change_s",
                "agent_peak_rss_mib",
                "startup_requests",
            ] {
                ensure!(
                    s[k].as_f64().is_some_and(|x| x > 0.0),
                    "no {k} for {} nodes",
                    s["nodes"]
                );
            }
            ensure!(
                s["steady"]["writes"].as_u64().is_some(),
                "no steady-state writes for {} nodes",
                s["nodes"]
            );
        }
        Ok(())
    }
}

// ================================================================================================
// Section 4: disruption
// ================================================================================================

mod disruption_section {
    use super::*;

    pub const EVENTS: [&str; 6] = [
        "restart_sigterm",
        "restart_sigkill",
        "rotate_sender_node",
        "rotate_receiver_node",
        "node_join",
        "baseline",
    ];
    const GEN: &str = "v1.wgmesh.io/key-generation";
    const STATUS: &str = "v1.wgmesh.io/rotation-status";
    const REQUEST: &str = "v1.wgmesh.io/rotate-request";

    fn rotate(bed: &Testbed, node: &str) -> Result<()> {
        let api = bed.api()?;
        let current: u64 = api
            .node_annotations(node)?
            .get(GEN)
            .and_then(|g| g.parse().ok())
            .unwrap_or(1);
        let next = (current + 1).to_string();
        api.patch_node_annotations(node, &[(REQUEST, Some(&next))])?;
        bed.eventually_within(
            &format!("{node} completes rotation to generation {next}"),
            Duration::from_secs(60),
            || {
                let ann = api.node_annotations(node)?;
                ensure!(ann.get(GEN) == Some(&next), "generation {:?}", ann.get(GEN));
                let status: Value =
                    serde_json::from_str(ann.get(STATUS).map_or("{}", String::as_str))
                        .unwrap_or_default();
                ensure!(
                    status["state"] == "complete"
                        && status["generation"].as_u64() == Some(current + 1),
                    "rotation status {status}"
                );
                Ok(())
            },
        )
    }

    fn event(bed: &Testbed, name: &str, run: usize) -> Result<()> {
        let a = bed.node("a");
        match name {
            "restart_sigterm" | "restart_sigkill" => {
                let signal = if name == "restart_sigterm" {
                    Signal::SIGTERM
                } else {
                    Signal::SIGKILL
                };
                a.restart_agent(signal)?;
                bed.eventually("the restarted agent is ready", || {
                    let body = a.agent_http_get("/readyz")?;
                    ensure!(body.contains("ready"), "readyz: {body}");
                    Ok(())
                })
            }
            "rotate_sender_node" => rotate(bed, "a"),
            "rotate_receiver_node" => rotate(bed, "b"),
            "node_join" => {
                let name = format!("j{run}");
                let pod = format!("j{run}p");
                let node = bed.add_node(&name, |n| {
                    n.pod(&pod).backend("userspace").agent_log_filter("info")
                })?;
                bed.eventually(&format!("{name} joins the mesh"), || bed.assert_full_mesh())?;
                let (a1, jp) = (bed.pod("a1"), node.pods()[0].clone());
                bed.eventually(&format!("a1 reaches {pod}"), || {
                    a1.ping(&jp, 1)?.assert_no_loss()
                })
            }
            _ => Ok(()),
        }
    }

    fn measure(
        bed: &Testbed,
        name: &str,
        run: usize,
        window: Duration,
        port: u16,
    ) -> Result<Value> {
        let (a1, b1) = (bed.pod("a1"), bed.pod("b1"));
        let flow = a1.tcp_stream_to(&b1, port)?;
        flow.assert_flowing(20_000, Duration::from_secs(10))?;
        let pings = a1.ping_flood(&b1, Duration::from_millis(10), window);
        thread::sleep(Duration::from_secs(1));
        let t = Instant::now();
        let event_result = event(bed, name, run);
        let event_s = t.elapsed().as_secs_f64();
        let flowing_after = flow.assert_flowing(20_000, Duration::from_secs(10)).is_ok();
        let pings = pings.wait()?;
        let report = flow.stop()?;
        event_result.with_context(|| format!("event {name}"))?;
        Ok(json!({
            "event": name,
            "event_s": round(event_s, 3),
            "event_inside_window": event_s + 1.0 < window.as_secs_f64(),
            "pings_sent": pings.transmitted,
            "pings_lost": pings.lost(),
            "tcp_intact": report.is_intact() && flowing_after,
            "tcp_max_stall_ms": report.max_stall_ms,
            "tcp_reset": report.reset,
        }))
    }

    pub fn run(plan: &Plan) -> Result<Value> {
        let bed = start_bed(
            builder("bench-disrupt")
                .node("a", |n| {
                    n.pod("a1").backend("userspace").agent_log_filter("info")
                })
                .node("b", |n| {
                    n.pod("b1").backend("userspace").agent_log_filter("info")
                }),
        )?;
        wait_converged(&bed)?;
        let mut results: Vec<Value> = Vec::new();
        // A failed measurement or clean-up is recorded and the next one runs (as long as the
        // mesh converges again): one flaky step must not discard the other runs.
        let mut problems: Vec<String> = Vec::new();
        let mut port = 7400;
        for run in 0..plan.runs {
            for name in EVENTS {
                interrupted()?;
                eprintln!("disruption run {}/{}: {name}", run + 1, plan.runs);
                port += 1;
                match measure(&bed, name, run, plan.disruption_window, port) {
                    Ok(r) => results.push(r),
                    Err(e) => {
                        eprintln!("warning: disruption run {}: {name}: {e:#}", run + 1);
                        problems.push(format!("run {}, {name}: {e:#}", run + 1));
                        results.push(json!({"event": name, "error": format!("{e:#}")}));
                    }
                }
                if name == "node_join"
                    && bed.try_node(&format!("j{run}")).is_some()
                    && let Err(e) = bed.remove_node(&format!("j{run}"))
                {
                    eprintln!("warning: removing the joined node: {e:#}");
                    problems.push(format!(
                        "run {}, removing the joined node j{run}: {e:#}",
                        run + 1
                    ));
                }
                wait_converged(&bed)?;
            }
        }
        drop(bed);
        forget_beds();
        let mut summary = serde_json::Map::new();
        for name in EVENTS {
            let failed = results
                .iter()
                .filter(|r| r["event"] == name && !r["error"].is_null())
                .count();
            let rs: Vec<&Value> = results
                .iter()
                .filter(|r| r["event"] == name && r["error"].is_null())
                .collect();
            let lost: Vec<f64> = rs.iter().filter_map(|r| r["pings_lost"].as_f64()).collect();
            let stall: Vec<f64> = rs
                .iter()
                .filter_map(|r| r["tcp_max_stall_ms"].as_f64())
                .collect();
            let event_s: Vec<f64> = rs.iter().filter_map(|r| r["event_s"].as_f64()).collect();
            summary.insert(
                name.to_owned(),
                json!({
                    "runs": rs.len(),
                    "failed_runs": failed,
                    "pings_lost_median": num(median(&lost)),
                    "pings_lost_max": num(max_of(&lost)),
                    "pings_sent_per_run": rs.first().map_or(Value::Null, |r| r["pings_sent"].clone()),
                    "tcp_survived": rs.iter().filter(|r| r["tcp_intact"] == true).count(),
                    "tcp_max_stall_ms_median": num(median(&stall)),
                    "event_s_median": num(median(&event_s)),
                }),
            );
        }
        Ok(json!({
            "runs": plan.runs,
            "window_s": plan.disruption_window.as_secs_f64(),
            "summary": summary,
            "problems": problems,
            "commands": [
                format!("ip netns exec <pod a1> ping -n -q -c {} -i 0.010 -W 1 198.18.2.11 (100/s, started 1 s before the event)", plan.disruption_window.as_millis() / 10),
                "TCP: wgmesh-probe tcp-stream a1 -> tcp-echo b1 (sequence-numbered chunks; intact = no reset/close/corruption, every chunk echoed, still flowing after the event)".to_owned(),
                "restart: SIGTERM/SIGKILL the agent on node a, start it again, wait for /readyz".to_owned(),
                format!("rotation: merge-patch {REQUEST}=<generation+1> on Node a (sender) or b (receiver); wait for {GEN} and {STATUS} state complete"),
                "join: add node j<run> with a pod and an agent, wait for the full mesh and a1 -> new pod; removed after the run".to_owned(),
                "baseline: the same measurement with no event".to_owned(),
            ],
            "runs_raw": results,
        }))
    }

    pub fn check(v: &Value) -> Result<()> {
        for name in EVENTS {
            let s = &v["summary"][name];
            ensure!(
                s["pings_sent_per_run"].as_u64().is_some_and(|x| x > 0),
                "no pings for {name}"
            );
            ensure!(
                s["pings_lost_max"].as_f64().is_some() && s["runs"].as_u64().is_some_and(|r| r > 0),
                "no successful measurement of {name}"
            );
        }
        Ok(())
    }
}

// ================================================================================================
// Results: JSON and RESULTS.md
// ================================================================================================

mod report {
    use std::fmt::Write as _;

    use super::*;

    fn f(v: &Value, digits: usize) -> String {
        v.as_f64()
            .map_or("n/a".to_owned(), |x| format!("{x:.digits$}"))
    }

    fn met(ok: Option<bool>) -> &'static str {
        match ok {
            Some(true) => "**met**",
            Some(false) => "**missed**",
            None => "not measured",
        }
    }

    /// The targets of the issue, each with what was measured and by how much it is met or missed.
    fn targets(s: &Value, md: &mut String) {
        let _ = writeln!(md, "## Targets\n");
        let _ = writeln!(md, "| target | measured | result |");
        let _ = writeln!(md, "| --- | --- | --- |");
        let d = &s["datapath"]["result"];
        for (k, label) in [("tcp1", "1 stream"), ("tcp4", "4 streams")] {
            let r = d["ratios"]["wgmesh_vs_wireguard_go"][k].as_f64();
            let _ = writeln!(
                md,
                "| userspace TCP throughput ≥ 1.5× wireguard-go ({label}) | {} | {}{} |",
                r.map_or("n/a".to_owned(), |r| format!("{r:.2}×")),
                met(r.map(|r| r >= 1.5)),
                r.filter(|r| *r < 1.5)
                    .map(|r| format!(
                        ": {:.0}% short of 1.5× ({:.2}× of the target)",
                        (1.0 - r / 1.5) * 100.0,
                        r / 1.5
                    ))
                    .unwrap_or_default()
            );
        }
        let e = s["ebpf"]["result"]["targets"]["steer_ratio_at_5000"].as_f64();
        let _ = writeln!(
            md,
            "| steering program ≤ 3× the empty program at 5,000 CIDRs | {} | {}{} |",
            e.map_or("n/a".to_owned(), |r| format!("{r:.2}×")),
            met(e.map(|r| r <= 3.0)),
            e.filter(|r| *r > 3.0)
                .map(|r| format!(": {:.0}% over", (r / 3.0 - 1.0) * 100.0))
                .unwrap_or_default()
        );
        let c = &s["control"]["result"]["targets"];
        let nodes = c["nodes"].as_u64();
        let r = c["ratio_to_floor"].as_f64();
        let _ = writeln!(
            md,
            "| convergence at 5,000 Nodes ≤ 1.5× the floor (`wg setconf`) | {} | {}{}{} |",
            r.map_or("n/a".to_owned(), |r| format!(
                "{r:.2}× at {} Nodes",
                nodes.unwrap_or(0)
            )),
            met(r.map(|r| r <= 1.5)),
            r.filter(|r| *r > 1.5)
                .map(|r| format!(": {:.0}% over", (r / 1.5 - 1.0) * 100.0))
                .unwrap_or_default(),
            if nodes.is_some_and(|n| n < 5_000) {
                " (quick run: fewer Nodes)"
            } else {
                ""
            }
        );
        let rss = c["agent_peak_rss_mib"].as_f64();
        let _ = writeln!(
            md,
            "| agent peak RSS ≤ 64 MB at 5,000 Nodes | {} | {}{} |",
            rss.map_or("n/a".to_owned(), |x| format!(
                "{x:.1} MiB (VmHWM) at {} Nodes",
                nodes.unwrap_or(0)
            )),
            met(rss.map(|x| x <= 64.0)),
            rss.filter(|x| *x > 64.0)
                .map(|x| format!(": {:.0}% over", (x / 64.0 - 1.0) * 100.0))
                .unwrap_or_default()
        );
        let writes: Vec<u64> = s["control"]["result"]["sizes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x["steady"]["writes"].as_u64())
                    .collect()
            })
            .unwrap_or_default();
        let _ = writeln!(
            md,
            "| zero API writes per node in steady state | {} | {} |",
            if writes.is_empty() {
                "n/a".to_owned()
            } else {
                format!(
                    "{} writes (one window per size, {} s each)",
                    writes.iter().sum::<u64>(),
                    f(&s["control"]["result"]["sizes"][0]["steady"]["window_s"], 0)
                )
            },
            met((!writes.is_empty()).then(|| writes.iter().all(|w| *w == 0)))
        );
        let ds = &s["disruption"]["result"]["summary"];
        for (k, label) in [
            ("restart_sigterm", "SIGTERM"),
            ("restart_sigkill", "SIGKILL"),
        ] {
            let lost = ds[k]["pings_lost_max"].as_f64();
            let _ = writeln!(
                md,
                "| zero packets lost on agent restart ({label}) | {} | {} |",
                lost.map_or("n/a".to_owned(), |l| format!(
                    "max {l:.0} lost of {} per run; TCP survived {}/{}",
                    ds[k]["pings_sent_per_run"], ds[k]["tcp_survived"], ds[k]["runs"]
                )),
                met(lost.map(|l| l == 0.0))
            );
        }
        for (k, label) in [
            ("rotate_sender_node", "sender's node"),
            ("rotate_receiver_node", "receiver's node"),
        ] {
            let lost = ds[k]["pings_lost_max"].as_f64();
            let _ = writeln!(
                md,
                "| at most 10 packets lost per rotation ({label}) | {} | {} |",
                lost.map_or("n/a".to_owned(), |l| format!(
                    "max {l:.0} lost; TCP survived {}/{}",
                    ds[k]["tcp_survived"], ds[k]["runs"]
                )),
                met(lost.map(|l| l <= 10.0))
            );
        }
        let _ = writeln!(md);
    }

    fn machine_md(m: &Value, md: &mut String) {
        let _ = writeln!(md, "## Machine\n");
        let _ = writeln!(md, "| | |\n| --- | --- |");
        let rows = [
            (
                "CPU",
                format!(
                    "{} × {}{}",
                    m["cpus"],
                    m["cpu_model"].as_str().unwrap_or("?"),
                    if m["virtualized"] == true {
                        " (virtual machine: `hypervisor` flag)"
                    } else {
                        ""
                    }
                ),
            ),
            ("memory", format!("{} MiB", m["memory_mib"])),
            ("kernel", m["kernel"].as_str().unwrap_or("?").to_owned()),
            ("OS", m["os"].as_str().unwrap_or("?").to_owned()),
            (
                "load average at start",
                m["loadavg_at_start"].as_str().unwrap_or("?").to_owned(),
            ),
            (
                "wgmesh",
                format!(
                    "`{}` (release build: `{}`)",
                    m["git"].as_str().unwrap_or("?"),
                    m["agent_bin"].as_str().unwrap_or("?")
                ),
            ),
            (
                "wireguard-go",
                m["wireguard_go"].as_str().unwrap_or("?").to_owned(),
            ),
            ("wg", m["wg"].as_str().unwrap_or("?").to_owned()),
            ("iperf3", m["iperf3"].as_str().unwrap_or("?").to_owned()),
        ];
        for (k, v) in rows {
            let _ = writeln!(md, "| {k} | {v} |");
        }
        let _ = writeln!(md);
    }

    fn ebpf_md(r: &Value, md: &mut String) {
        let _ = writeln!(md, "## 1. eBPF cost per packet\n");
        let _ = writeln!(
            md,
            "`BPF_PROG_TEST_RUN` with repeat {} ({} runs, interleaved: every run measures the empty program and every case at every map size back to back). ns/packet = wall time of the test-run syscall ÷ repeat (median of the runs; min–max in brackets); the kernel's own integer average next to it. × empty = median over runs of (case ÷ empty program of the same run). Frames: {} bytes; remote CIDRs: {}; `REMOTE_V4` and `CLUSTER_V4` both hold them, `LOCAL_V4` holds 198.18.1.0/24.\n",
            r["repeat"],
            r["runs"],
            r["frame_bytes"],
            r["remote_cidrs_from"].as_str().unwrap_or("?")
        );
        let _ = writeln!(
            md,
            "| program, case | remote CIDRs | ns/packet | kernel ns | × empty |"
        );
        let _ = writeln!(md, "| --- | ---: | ---: | ---: | ---: |");
        for row in r["rows"].as_array().into_iter().flatten() {
            let _ = writeln!(
                md,
                "| `{}`: {} | {} | {} ({}–{}) | {} | {} |",
                row["program"].as_str().unwrap_or("?"),
                row["what"].as_str().unwrap_or("?"),
                row["cidrs"],
                f(&row["ns_per_packet"], 2),
                f(&row["ns_per_packet_min"], 2),
                f(&row["ns_per_packet_max"], 2),
                f(&row["kernel_ns_per_packet"], 0),
                f(&row["ratio_to_empty"], 2),
            );
        }
        let _ = writeln!(md);
    }

    const CONFIG_NAMES: [&str; 4] = ["plain", "wireguard-go", "wgmesh", "wgmesh-boringtun"];

    fn datapath_md(r: &Value, md: &mut String) {
        let _ = writeln!(
            md,
            "## 2. Userspace datapath: pod to pod across two simulated nodes\n"
        );
        let _ = writeln!(
            md,
            "Four two-node clusters side by side (same topology: pods behind veths, nodes on an underlay bridge, MTU 1500, tunnel MTU 1420), measured in turn inside every run ({} runs, order rotated per run): iperf3 TCP {} s with 1 and with 4 streams, then ping ×{} at 100/s. Medians over runs; ratios are medians of per-run ratios. Device CPU = utime+stime of the WireGuard device processes of both nodes (`/proc/<pid>/stat`) per GB received; system CPU = busy time of the whole machine (`/proc/stat`) per GB: iperf3 on both ends, the kernel's forwarding and the devices together. Busy cores = average of the {}-core machine kept busy during the 4-stream test.\n",
            r["runs"],
            r["iperf_seconds"],
            r["ping_count"],
            thread::available_parallelism().map_or(1, |n| n.get())
        );
        let _ = writeln!(
            md,
            "| configuration | TCP 1 stream Mbit/s | TCP 4 streams Mbit/s | ping RTT avg ms | device CPU s/GB (1 / 4 streams) | system CPU s/GB (1 / 4 streams) | busy cores (4 streams) |"
        );
        let _ = writeln!(md, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        for (cfg, label) in [
            ("plain", "plain veth routing (host-gw, no encryption)"),
            ("wireguard-go", "wireguard-go (Debian) + `wg`, routes to it"),
            (
                "wgmesh",
                "wgmesh (agent + its userspace device, batched engine, eBPF steering)",
            ),
            (
                "wgmesh-boringtun",
                "wgmesh with the stock boringtun device engine",
            ),
        ] {
            let s = &r["summary"][cfg];
            let _ = writeln!(
                md,
                "| {label} | {} | {} | {} | {} / {} | {} / {} | {} |",
                f(&s["tcp1_mbit_per_s"], 0),
                f(&s["tcp4_mbit_per_s"], 0),
                f(&s["rtt_avg_ms"], 3),
                f(&s["tcp1_device_cpu_s_per_gb"], 2),
                f(&s["tcp4_device_cpu_s_per_gb"], 2),
                f(&s["tcp1_system_cpu_s_per_gb"], 2),
                f(&s["tcp4_system_cpu_s_per_gb"], 2),
                f(&s["tcp4_system_busy_cores"], 2),
            );
        }
        let _ = writeln!(
            md,
            "\nWhere the CPU goes during one {} s 4-stream test (median CPU seconds; the machine has {} core-seconds in that time). \"Rest\" = the iperf3 client and kernel work done in other contexts (interrupts, kworkers); TCP retransmissions are the sender's count.\n",
            r["iperf_seconds"],
            f(
                &json!(
                    r["iperf_seconds"].as_f64().unwrap_or(0.0)
                        * thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
                ),
                0
            )
        );
        let _ = writeln!(
            md,
            "| configuration | machine busy | WireGuard devices | agents | iperf3 server | ksoftirqd | rest | TCP retransmissions |"
        );
        let _ = writeln!(
            md,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for cfg in CONFIG_NAMES {
            let c = &r["summary"][cfg]["tcp4_cpu_s"];
            let part = |k: &str| c[k].as_f64().unwrap_or(0.0);
            let rest = part("machine_busy")
                - part("devices")
                - part("agents")
                - part("iperf_server")
                - part("ksoftirqd");
            let _ = writeln!(
                md,
                "| {cfg} | {} | {} | {} | {} | {} | {} | {} |",
                f(&c["machine_busy"], 2),
                f(&c["devices"], 2),
                f(&c["agents"], 2),
                f(&c["iperf_server"], 2),
                f(&c["ksoftirqd"], 2),
                if c["machine_busy"].is_null() {
                    "n/a".to_owned()
                } else {
                    format!("{rest:.2}")
                },
                f(&r["summary"][cfg]["tcp4_retransmits"], 0),
            );
        }
        let q = &r["ratios"];
        let _ = writeln!(
            md,
            "\n| ratio | TCP 1 stream | TCP 4 streams | ping RTT | device CPU/GB (1 / 4 streams) |"
        );
        let _ = writeln!(md, "| --- | ---: | ---: | ---: | ---: |");
        let _ = writeln!(
            md,
            "| wgmesh / plain | {} | {} | {} | |",
            f(&q["wgmesh_vs_plain"]["tcp1"], 3),
            f(&q["wgmesh_vs_plain"]["tcp4"], 3),
            f(&q["wgmesh_vs_plain"]["rtt"], 2),
        );
        let w = &q["wgmesh_vs_wireguard_go"];
        let _ = writeln!(
            md,
            "| wgmesh / wireguard-go | {} | {} | {} | {} / {} |\n",
            f(&w["tcp1"], 3),
            f(&w["tcp4"], 3),
            f(&w["rtt"], 2),
            f(&w["tcp1_device_cpu_per_gb"], 2),
            f(&w["tcp4_device_cpu_per_gb"], 2),
        );
        let b = &q["wgmesh_boringtun_vs_wireguard_go"];
        let _ = writeln!(
            md,
            "| wgmesh (stock boringtun engine) / wireguard-go | {} | {} | {} | {} / {} |\n",
            f(&b["tcp1"], 3),
            f(&b["tcp4"], 3),
            f(&b["rtt"], 2),
            f(&b["tcp1_device_cpu_per_gb"], 2),
            f(&b["tcp4_device_cpu_per_gb"], 2),
        );
    }

    fn control_md(r: &Value, md: &mut String) {
        let _ = writeln!(md, "## 3. Control plane at scale\n");
        let _ = writeln!(
            md,
            "One real node (`a`, agent with `--backend userspace`, RUST_LOG=info) and N fake Nodes in the API stand-in ({}). Per run: first the floor — a fresh `wgmesh-agent device` (the same boringtun device the agent uses) and `wg setconf` of the same N peers, timed. Then the agent starts on a fresh node (no key, no device, no pins) and is timed until it logs the reconcile that programmed all N peers: it writes that line after adding the peers to the device, the CIDRs and host addresses to the eBPF maps, and the host-encryption routes (written meanwhile). The bench watches the log file every 20 ms and uses the line's own timestamp, so the measurement never competes with the agent for the device's UAPI socket (polling `/status` or `wg show` would: both read the device). Then it checks that `/status` lists N peers and N remote CIDRs read back from the map and that `wg show` has N peers. Then one fake Node's public key is changed by a merge patch and timed the same way, up to the reconcile that swapped the peer, checked on the device. \"Seen by the bench\" is when the bench noticed (log polling and process start-up included). Medians of {} runs; ratio = median of per-run (agent ÷ floor). Peak RSS = VmHWM (max over runs). Requests = the stand-in's counters for the agent's address. Steady state: requests and writes during a window after convergence (first run only), which includes the agent's 30 s full resync when longer than 30 s.\n",
            r["fake_nodes"].as_str().unwrap_or("?"),
            r["runs"]
        );
        let _ = writeln!(
            md,
            "| Nodes | agent start → converged s | (seen by the bench) s | floor `wg setconf` s | floor incl. device start s | agent ÷ floor | ÷ floor incl. start | key change applied s | agent peak RSS MiB | device peak RSS MiB | API requests at start (writes) | key change requests (writes) | steady state: requests / writes in window |"
        );
        let _ = writeln!(
            md,
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"
        );
        for s in r["sizes"].as_array().into_iter().flatten() {
            let verbs: Vec<String> = s["startup_by_verb"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter(|(_, v)| v.as_u64().is_some_and(|v| v > 0))
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect()
                })
                .unwrap_or_default();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({}): {} | {} ({}) | {} / {} in {} s |",
                s["nodes"],
                f(&s["converged_s"], 3),
                f(&s["converged_observed_s"], 3),
                f(&s["floor_setconf_s"], 3),
                f(&s["floor_device_start_plus_setconf_s"], 3),
                f(&s["ratio_to_floor"], 2),
                f(&s["ratio_to_floor_with_device_start"], 2),
                f(&s["key_change_s"], 3),
                f(&s["agent_peak_rss_mib"], 1),
                f(&s["device_peak_rss_mib"], 1),
                f(&s["startup_requests"], 0),
                f(&s["startup_writes"], 0),
                verbs.join(", "),
                f(&s["key_change_requests"], 0),
                f(&s["key_change_writes"], 0),
                s["steady"]["requests"],
                s["steady"]["writes"],
                f(&s["steady"]["window_s"], 0),
            );
        }
        let _ = writeln!(
            md,
            "\nWhere the agent's time goes (median seconds after the agent process was started, from the timestamps of its own log lines). \"Nodes in hand\" = the first of \"initial node list received\" and \"published the node's public key\" (which needs the agent's own Node from the list); \"peers + maps reconciled\" is the convergence time above; the agent's own work is the time between the two.\n"
        );
        let _ = writeln!(
            md,
            "| Nodes | process up | device ready | eBPF loaded | uplink guard attached | Nodes in hand | key published | peers + maps reconciled | agent's own work s | own work ÷ floor | CPU s until converged: agent / API stand-in / device | agent RSS after the run MiB |"
        );
        let _ = writeln!(
            md,
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for s in r["sizes"].as_array().into_iter().flatten() {
            let p = &s["phases"];
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} / {} | {} |",
                s["nodes"],
                f(&p["process_up_s"], 3),
                f(&p["device_ready_s"], 3),
                f(&p["datapath_loaded_s"], 3),
                f(&p["uplink_guard_attached_s"], 3),
                f(&p["nodes_in_hand_s"], 3),
                f(&p["key_published_s"], 3),
                f(&p["peers_reconciled_s"], 3),
                f(&s["programming_s"], 3),
                f(&s["programming_ratio_to_floor"], 2),
                f(&s["agent_cpu_s_to_converge"], 2),
                f(&s["apiserver_cpu_s_to_converge"], 2),
                f(&s["device_cpu_s_to_converge"], 2),
                f(&s["agent_rss_end_mib"], 1),
            );
        }
        let _ = writeln!(md);
    }

    fn disruption_md(r: &Value, md: &mut String) {
        let _ = writeln!(md, "## 4. Disruption\n");
        let _ = writeln!(
            md,
            "Two nodes with agents; pod a1 pings pod b1 at 100 packets/s for {} s (the event starts 1 s in) while a TCP stream a1 → b1 runs; {} runs per event, all events in turn inside each run. Lost = transmitted − received by that ping. TCP survived = no reset, no close, no corruption, every chunk echoed, and data still flowing after the event.\n",
            f(&r["window_s"], 0),
            r["runs"]
        );
        let _ = writeln!(
            md,
            "| event | pings per run | lost (median / max) | TCP stream survived | TCP longest stall ms (median) | event took s (median) | failed runs |"
        );
        let _ = writeln!(md, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        for (k, label) in [
            ("baseline", "none (baseline)"),
            ("restart_sigterm", "agent restart, SIGTERM (node a)"),
            ("restart_sigkill", "agent restart, SIGKILL (node a)"),
            (
                "rotate_sender_node",
                "key rotation of the sender's node (a)",
            ),
            (
                "rotate_receiver_node",
                "key rotation of the receiver's node (b)",
            ),
            ("node_join", "a third node joins"),
        ] {
            let s = &r["summary"][k];
            let _ = writeln!(
                md,
                "| {label} | {} | {} / {} | {}/{} | {} | {} | {} |",
                s["pings_sent_per_run"],
                f(&s["pings_lost_median"], 0),
                f(&s["pings_lost_max"], 0),
                s["tcp_survived"],
                s["runs"],
                f(&s["tcp_max_stall_ms_median"], 0),
                f(&s["event_s_median"], 2),
                s["failed_runs"].as_u64().unwrap_or(0),
            );
        }
        let problems = r["problems"].as_array().cloned().unwrap_or_default();
        if !problems.is_empty() {
            let _ = writeln!(
                md,
                "\nProblems during the runs (the step was recorded as failed and the next one ran):\n"
            );
            for p in problems {
                let text = p.as_str().unwrap_or("?");
                let first = text.lines().next().unwrap_or(text);
                let _ = writeln!(md, "- {}", first.replace('`', "'"));
            }
        }
        let _ = writeln!(md);
    }

    /// What limits the missed targets, from the measurements themselves.
    fn notes(s: &Value, md: &mut String) {
        let mut notes: Vec<String> = Vec::new();
        let machine = SECTIONS
            .iter()
            .find_map(|sec| s[sec.name()]["machine"].as_object())
            .map(|m| Value::Object(m.clone()))
            .unwrap_or(Value::Null);
        let cpus = machine["cpus"].as_u64().unwrap_or(0);

        let ebpf_rows = s["ebpf"]["result"]["rows"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let ebpf_ns = |case: &str| {
            ebpf_rows
                .iter()
                .find(|x| x["case"] == case && x["cidrs"] == 5_000)
                .and_then(|x| x["ns_per_packet"].as_f64())
        };
        // A tunneled packet crosses the steer program on the pod veth and the guard on the uplink.
        let ebpf_per_packet_us = ebpf_ns("steer_remote")
            .zip(ebpf_ns("guard_wireguard"))
            .map(|(a, b)| (a + b) / 1e3);
        let d = &s["datapath"]["result"];
        let w = &d["ratios"]["wgmesh_vs_wireguard_go"];
        if [w["tcp1"].as_f64(), w["tcp4"].as_f64()]
            .iter()
            .any(|r| r.is_some_and(|r| r < 1.5))
        {
            let m = &d["summary"]["wgmesh"];
            let g = &d["summary"]["wireguard-go"];
            let dev_ratio = w["tcp4_device_cpu_per_gb"].as_f64().unwrap_or(f64::NAN);
            let saturated = [m, g].iter().all(|x| {
                x["tcp4_system_busy_cores"]
                    .as_f64()
                    .is_some_and(|b| b >= 0.95 * cpus as f64)
            });
            let busy = format!(
                "during the 4-stream tests {} (wgmesh) and {} (wireguard-go) of the {cpus} cores were busy on average;",
                f(&m["tcp4_system_busy_cores"], 2),
                f(&g["tcp4_system_busy_cores"], 2)
            );
            notes.push(format!(
                "**Throughput vs wireguard-go** ({} × with 1 stream, {} × with 4): both are userspace devices, {} {} iperf3 at both ends, both nodes' device processes and the kernel's veth/bridge/TUN/UDP work share the cores (plain routing moves {} Mbit/s on them). A device's throughput is the CPU time it gets divided by its CPU per byte: during a 4-stream test wgmesh's two device processes ran {} core-seconds and wireguard-go's {} (of {} the machine had), and per GB received they used {} s and {} s (ratio {dev_ratio:.2} with 4 streams, {} with 1: {}). Whole-machine CPU per GB was {} s (wgmesh) vs {} s (wireguard-go); it also counts iperf3, the kernel and anything else that ran on this shared VM (see the table above), so the per-process device figures are the cleaner comparison. 1.5× the throughput at the same CPU share would need a device costing at most 1/1.5 of wireguard-go's CPU per byte. wgmesh's device is the batched engine (wgmesh-device, 2 threads: TSO split, UDP GSO/GRO, coalesced TUN writes; the stock boringtun engine, one packet per syscall, is the wgmesh-boringtun row); the Debian wireguard-go ({}) predates wireguard-go's 2022–2023 batching and GSO/GRO work. The gap is in the device, not in the agent (its CPU during the transfer is in the table above) or the eBPF programs: steer + guard cost {} µs per packet in section 1, against {} µs of device CPU per 1,420-byte packet here.",
                f(&w["tcp1"], 2),
                f(&w["tcp4"], 2),
                if saturated {
                    "and the CPU is the limit:"
                } else {
                    "and the cores are not fully busy, so besides CPU the devices' queueing and latency limit them:"
                },
                busy,
                f(&d["summary"]["plain"]["tcp4_mbit_per_s"], 0),
                f(&m["tcp4_cpu_s"]["devices"], 1),
                f(&g["tcp4_cpu_s"]["devices"], 1),
                f(&json!(d["iperf_seconds"].as_f64().unwrap_or(0.0) * cpus as f64), 0),
                f(&m["tcp4_device_cpu_s_per_gb"], 1),
                f(&g["tcp4_device_cpu_s_per_gb"], 1),
                f(&w["tcp1_device_cpu_per_gb"], 2),
                if dev_ratio < 0.9 {
                    "wgmesh's device is the cheaper one per byte"
                } else if dev_ratio > 1.1 {
                    "wgmesh's device is the more expensive one per byte"
                } else {
                    "about the same cost per byte, so the difference is in how much CPU time each device gets and uses; with the cores not saturated, the rest is time the devices spend waiting: queueing between TUN and UDP in their workers, and TCP backing off after drops (retransmissions in the table above)"
                },
                f(&m["tcp4_system_cpu_s_per_gb"], 1),
                f(&g["tcp4_system_cpu_s_per_gb"], 1),
                machine["wireguard_go"].as_str().unwrap_or("?"),
                ebpf_per_packet_us.map_or("?".to_owned(), |x| format!("{x:.2}")),
                f(&json!(m["tcp4_device_cpu_s_per_gb"].as_f64().unwrap_or(f64::NAN) * 1420.0 / 1e3), 0),
            ));
        }

        if let Some(r) = s["ebpf"]["result"]["targets"]["steer_ratio_at_5000"].as_f64()
            && r > 3.0
        {
            let rows = s["ebpf"]["result"]["rows"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let ns = |case: &str, n: u64| {
                rows.iter()
                    .find(|x| x["case"] == case && x["cidrs"] == n)
                    .and_then(|x| x["ns_per_packet"].as_f64())
                    .unwrap_or(f64::NAN)
            };
            let noop = ns("noop", 5_000);
            let steer = ns("steer_remote", 5_000);
            let steer10 = ns("steer_remote", 10);
            notes.push(format!(
                "**Steering cost** at 5,000 CIDRs is {r:.2}× the empty program: {steer:.1} ns vs {noop:.1} ns per packet (the empty program's time is the test-run loop itself). The same packet costs {steer10:.1} ns with 10 CIDRs and {:.1} ns with 1,000: the `REMOTE_V4` lookup that *hits* walks the LPM trie down to the matching prefix, and the trie gets deeper as entries are added (about log2 of the count), while lookups that miss stop near the root — the packet that matches nothing does two of them and costs {:.1} ns at 10 and {:.1} ns at 5,000 CIDRs. The fixed part, {:.1} ns over the empty program at 10 CIDRs, is three `bpf_skb_load_bytes` helper calls (EtherType, source, destination), the trie lookup, a `CONFIG` lookup, the mark write and two per-CPU counter updates. Meeting 3× at 5,000 CIDRs on this machine means cutting about {:.0} ns per packet; the candidates (not measured by this bench) are direct packet access instead of the helper calls and a lookup whose cost does not grow with the map (e.g. a hash of fixed-length pod prefixes). In absolute terms the program costs {:.2} µs per packet, against the tens of microseconds a userspace WireGuard device spends per packet (section 2).",
                ns("steer_remote", 1_000),
                ns("steer_other", 10),
                ns("steer_other", 5_000),
                steer10 - ns("noop", 10),
                steer - 3.0 * noop,
                steer / 1000.0,
            ));
        }

        let c = &s["control"]["result"];
        let last = c["sizes"]
            .as_array()
            .and_then(|a| a.last())
            .cloned()
            .unwrap_or(Value::Null);
        if let Some(r) = c["targets"]["ratio_to_floor"].as_f64()
            && r > 1.5
        {
            let p = &last["phases"];
            let list_s = p["nodes_in_hand_s"].as_f64().unwrap_or(f64::NAN)
                - p["uplink_guard_attached_s"].as_f64().unwrap_or(f64::NAN);
            notes.push(format!(
                "**Convergence at {} Nodes** takes {r:.2}× `wg setconf` ({} s from agent start vs {} s). The floor is handed the peers; the agent first starts (device process, eBPF load and attach: {} s, during which the Node list already runs), has the Nodes in hand at {} s ({list_s:.2} s after the attach; {} Nodes of ~{} bytes in {} pages from the API stand-in), then computes the peers, adds them to the device and writes the eBPF maps in {} s, {}× the floor (CPU until converged: agent {} s, stand-in {} s, device {} s). {}",
                last["nodes"],
                f(&last["converged_s"], 2),
                f(&last["floor_setconf_s"], 2),
                f(&p["uplink_guard_attached_s"], 2),
                f(&p["nodes_in_hand_s"], 2),
                last["nodes"],
                f(&last["node_json_bytes"], 0),
                f(&last["startup_by_verb"]["list"], 0),
                f(&last["programming_s"], 2),
                f(&last["programming_ratio_to_floor"], 2),
                f(&last["agent_cpu_s_to_converge"], 2),
                f(&last["apiserver_cpu_s_to_converge"], 2),
                f(&last["device_cpu_s_to_converge"], 2),
                if last["programming_ratio_to_floor"].as_f64().is_some_and(|x| x <= 1.5) {
                    "The agent's own part is within 1.5× of the floor; what is left over is the fixed start-up and the wait for the Nodes, on cores shared with the stand-in and the device."
                } else {
                    "Even without start-up and the listing, the agent's own part is more than 1.5× the floor."
                },
            ));
        }
        if let Some(x) = c["targets"]["agent_peak_rss_mib"].as_f64()
            && x > 64.0
        {
            let first = c["sizes"]
                .as_array()
                .and_then(|a| a.first())
                .cloned()
                .unwrap_or(Value::Null);
            let (n0, n1) = (
                first["nodes"].as_f64().unwrap_or(f64::NAN),
                last["nodes"].as_f64().unwrap_or(f64::NAN),
            );
            let (r0, r1) = (first["agent_peak_rss_mib"].as_f64().unwrap_or(f64::NAN), x);
            notes.push(format!(
                "**Agent peak RSS** is {x:.1} MiB at {n1} Nodes ({:.0}% over 64 MB); it is {r0:.1} MiB at {n0} Nodes, so each Node costs about {:.1} KiB of agent memory against ~{} bytes of JSON in the API; VmRSS after the run is {} MiB. The agent keeps one slim record per Node (only the fields it reads); what else grows with N is the desired peer set, the device's parsed peer dump and the `/status` document listing every peer.",
                (x / 64.0 - 1.0) * 100.0,
                (r1 - r0) * 1024.0 / (n1 - n0),
                f(&last["node_json_bytes"], 0),
                f(&last["agent_rss_end_mib"], 1),
            ));
        }

        let ds = &s["disruption"]["result"]["summary"];
        for k in ["restart_sigterm", "restart_sigkill"] {
            if ds[k]["pings_lost_max"].as_f64().is_some_and(|l| l > 0.0) {
                notes.push(format!(
                    "**`{k}` lost packets** (max {}): the device and the eBPF programs live outside the agent, so any loss here is a regression to look into (the agent log of that run is in the testbed directory when run with WGMESH_NETNS_KEEP=1).",
                    ds[k]["pings_lost_max"]
                ));
            }
        }
        for k in ["rotate_sender_node", "rotate_receiver_node"] {
            if ds[k]["pings_lost_max"].as_f64().is_some_and(|l| l > 10.0) {
                notes.push(format!(
                    "**`{k}` lost more than 10 packets** (max {}): a new key is a new peer on every other node (remove + add), and packets that arrive before the handshake with the new key completes are dropped.",
                    ds[k]["pings_lost_max"]
                ));
            }
        }
        let _ = writeln!(md, "## What limits the missed targets\n");
        if notes.is_empty() {
            let _ = writeln!(md, "Every measured target was met.\n");
        }
        let load = machine["loadavg_at_start"].as_str().unwrap_or("?");
        let _ = writeln!(
            md,
            "The machine: {cpus} virtual cores shared by everything in a run (and by whatever else ran on the host: load average {load} at the start). Throughput and timings are absolute for this machine only; the ratios are what carries over.\n"
        );
        for n in notes {
            let _ = writeln!(md, "- {n}\n");
        }
    }

    pub fn render(results: &Value) -> String {
        let s = &results["sections"];
        let mut md = String::new();
        let _ = writeln!(md, "# wgmesh benchmarks\n");
        let _ = writeln!(
            md,
            "Generated by `wgmesh-bench` on {} — do not edit, re-run `make bench` (as root). Every comparison was measured inside one run of one invocation, next to its baseline, so that machine noise hits both sides; the numbers are medians of several runs and ratios are medians of per-run ratios. Absolute times depend on this machine; compare the ratios.{}\n",
            results["generated"].as_str().unwrap_or("?"),
            if results["quick"] == true {
                " **Quick mode: tiny sizes, one run — not for quoting.**"
            } else {
                ""
            }
        );
        if let Some(m) = SECTIONS
            .iter()
            .find_map(|sec| s[sec.name()]["machine"].as_object())
        {
            machine_md(&Value::Object(m.clone()), &mut md);
        }
        targets(s, &mut md);
        for sec in SECTIONS {
            let v = &s[sec.name()];
            if let Some(e) = v["error"].as_str() {
                let _ = writeln!(md, "## {}: FAILED\n\n```\n{e}\n```\n", sec.name());
                continue;
            }
            let r = &v["result"];
            if r.is_null() {
                continue;
            }
            match sec {
                Section::Ebpf => ebpf_md(r, &mut md),
                Section::Datapath => datapath_md(r, &mut md),
                Section::Control => control_md(r, &mut md),
                Section::Disruption => disruption_md(r, &mut md),
                _ => {}
            }
        }
        notes(s, &mut md);
        let _ = writeln!(md, "## Commands\n");
        let _ = writeln!(
            md,
            "```sh\nmake bench            # = cargo build --release --bins; bash bench/run\nbash bench/run        # builds the release binaries, then:\ntarget/release/wgmesh-bench all --out bench\nsudo -E cargo test -p wgmesh-netns-tests --test bench_smoke -- --ignored   # the --quick smoke test\n```\n"
        );
        for sec in SECTIONS {
            let v = &s[sec.name()];
            if v.is_null() {
                continue;
            }
            let _ = writeln!(
                md,
                "`{}` (started {}, wgmesh `{}`, took {} s; run as `{}`{}):\n",
                sec.name(),
                v["started"].as_str().unwrap_or("?"),
                v["machine"]["git"].as_str().unwrap_or("?"),
                f(&v["duration_s"], 0),
                v["launched_as"]
                    .as_str()
                    .or(v["invocation"].as_str())
                    .unwrap_or("?"),
                v["launched_as"]
                    .as_str()
                    .filter(|l| Some(*l) != v["invocation"].as_str())
                    .map(|_| format!(", i.e. `{}`", v["invocation"].as_str().unwrap_or("?")))
                    .unwrap_or_default()
            );
            for c in v["result"]["commands"].as_array().into_iter().flatten() {
                let _ = writeln!(md, "- `{}`", c.as_str().unwrap_or("?").replace('`', "'"));
            }
            let _ = writeln!(md);
        }
        md
    }
}

// ================================================================================================
// Driver
// ================================================================================================

fn run_section(sec: Section, plan: &Plan) -> Result<Value> {
    match sec {
        Section::Ebpf => ebpf_section::run(plan),
        Section::Datapath => datapath_section::run(plan),
        Section::Control => control_section::run(plan),
        Section::Disruption => disruption_section::run(plan),
        Section::All | Section::Report => unreachable!("not a measuring section"),
    }
}

fn check_section(sec: Section, v: &Value) -> Result<()> {
    match sec {
        Section::Ebpf => ebpf_section::check(v),
        Section::Datapath => datapath_section::check(v),
        Section::Control => control_section::check(v),
        Section::Disruption => disruption_section::check(v),
        Section::All | Section::Report => Ok(()),
    }
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v)? + "\n";
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Runs the requested sections, storing each in `<out>/sections/` and merging into results.json.
fn run(args: &Args, plan: &Plan) -> Result<bool> {
    let sections_dir = args.out.join("sections");
    fs::create_dir_all(&sections_dir)
        .with_context(|| format!("creating {}", sections_dir.display()))?;
    let results_path = args.out.join("results.json");
    let mut results: Value = fs::read_to_string(&results_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}));
    let wanted: Vec<Section> = match args.section {
        Section::All => SECTIONS.to_vec(),
        Section::Report => Vec::new(),
        s => vec![s],
    };
    let invocation = std::env::args().collect::<Vec<_>>().join(" ");
    // How the run was started, for RESULTS.md: `make bench` sets MAKELEVEL, bench/run says so.
    let launched_as = {
        let outer = if std::env::var_os("MAKELEVEL").is_some() {
            "make bench".to_owned()
        } else {
            std::env::var("WGMESH_BENCH_VIA").unwrap_or_else(|_| invocation.clone())
        };
        match std::env::var("CARGO_TARGET_DIR") {
            Ok(dir) if !dir.is_empty() => format!("CARGO_TARGET_DIR={dir} {outer}"),
            _ => outer,
        }
    };
    let mut ok = true;
    for sec in wanted {
        if INTERRUPTED.load(Ordering::SeqCst) {
            break;
        }
        eprintln!("=== wgmesh-bench: {} ===", sec.name());
        let started = SystemTime::now();
        let t = Instant::now();
        let machine = machine();
        let outcome = run_section(sec, plan).and_then(|v| {
            check_section(sec, &v).context("the section produced no numbers")?;
            Ok(v)
        });
        // Whatever happened, nothing of this section stays behind.
        let handles: Vec<TeardownHandle> = BEDS.lock().map(|b| b.clone()).unwrap_or_default();
        for h in handles {
            if let Err(e) = h.teardown() {
                eprintln!("warning: {e:#}");
            }
        }
        forget_beds();
        remove_sockets();
        let mut entry = json!({
            "section": sec.name(),
            "quick": plan.quick,
            "started": rfc3339(started),
            "duration_s": round(t.elapsed().as_secs_f64(), 1),
            "invocation": invocation,
            "launched_as": launched_as,
            "machine": machine,
        });
        match outcome {
            Ok(v) => entry["result"] = v,
            Err(e) => {
                ok = false;
                eprintln!("wgmesh-bench: section {} failed: {e:#}", sec.name());
                entry["error"] = json!(format!("{e:#}"));
            }
        }
        write_json(&sections_dir.join(format!("{}.json", sec.name())), &entry)?;
        results["sections"][sec.name()] = entry;
        results["generated"] = json!(rfc3339(SystemTime::now()));
        results["quick"] = json!(plan.quick);
        write_json(&results_path, &results)?;
        fs::write(args.out.join("RESULTS.md"), report::render(&results))?;
    }
    if args.section == Section::Report {
        ensure!(
            results["sections"].is_object(),
            "{} has no sections to render",
            results_path.display()
        );
        fs::write(args.out.join("RESULTS.md"), report::render(&results))?;
    }
    eprintln!(
        "wgmesh-bench: wrote {} and {}",
        results_path.display(),
        args.out.join("RESULTS.md").display()
    );
    Ok(ok)
}

fn main() -> ExitCode {
    // Handlers, not a blocked mask: children inherit a blocked mask, and the agents, the stand-in
    // and iperf3 must still see SIGTERM.
    let mut signals = match Signals::new([SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wgmesh-bench: failed to install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let args = Args::parse();
    cmd::set_echo(args.verbose);
    if args.section != Section::Report && !nix::unistd::Uid::effective().is_root() {
        eprintln!("wgmesh-bench: needs root (network namespaces, bpffs, TUN devices)");
        return ExitCode::FAILURE;
    }
    thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            INTERRUPTED.store(true, Ordering::SeqCst);
            eprintln!("\nwgmesh-bench: signal {sig}, tearing down");
            let handles: Vec<TeardownHandle> = BEDS.lock().map(|b| b.clone()).unwrap_or_default();
            for h in handles {
                if let Err(e) = h.teardown() {
                    eprintln!("wgmesh-bench: {e:#}");
                }
            }
            remove_sockets();
            std::process::exit(130);
        }
    });
    let plan = Plan::new(&args);
    match run(&args, &plan) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("wgmesh-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
