//! `wgmesh-demo` (`make demo`): a three-node cluster in network namespaces, first without
//! wgmesh (pod traffic visible in clear on the underlay), then with an agent per node, ending
//! with one line `PROOF wireguard_packets=<n> plaintext_pod_packets=<m>`. Exits non-zero unless
//! n > 0, m = 0 and all traffic got through. Needs root; Ctrl-C tears everything down.
//!
//! Env: `WGMESH_AGENT_BIN`, `WGMESH_APISERVER_BIN`, `WGMESH_PROBE_BIN` (each defaults to the
//! binary next to this one), `WGMESH_NETNS_KEEP=1` to keep the testbed for inspection.

use std::{
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use signal_hook::{
    consts::{SIGINT, SIGTERM},
    iterator::Signals,
};
use wgmesh_netns_tests::{cmd, prelude::*, table::Table, testbed::TeardownHandle};

#[derive(Debug, Parser)]
#[command(
    name = "wgmesh-demo",
    about = "Show wgmesh encrypting pod traffic between simulated nodes (requires root)"
)]
struct Args {
    /// Number of nodes (2-9).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(2..=9))]
    nodes: u8,
    /// Pods per node (1-9).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=9))]
    pods: u8,
    /// Skip the plaintext baseline before the agents start.
    #[arg(long)]
    no_baseline: bool,
    /// Echo every command the harness runs.
    #[arg(long, short)]
    verbose: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn main() -> ExitCode {
    // Signal handlers rather than a blocked signal mask: children inherit the mask (std keeps
    // it across exec), and the agents, tcpdump and the stand-in must still see SIGTERM.
    let mut signals = match Signals::new([SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wgmesh-demo: failed to install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let args = Args::parse();
    cmd::set_echo(args.verbose);
    let handle: Arc<Mutex<Option<TeardownHandle>>> = Arc::new(Mutex::new(None));
    let h = Arc::clone(&handle);
    thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            INTERRUPTED.store(true, Ordering::SeqCst);
            eprintln!("\nwgmesh-demo: signal {sig}, tearing down");
            let bed = h.lock().ok().and_then(|g| g.clone());
            if let Some(bed) = bed {
                if let Err(e) = bed.teardown() {
                    eprintln!("wgmesh-demo: {e:#}");
                }
                std::process::exit(130);
            }
        }
    });
    let proof = Mutex::new((0, 0));
    let result = run(&args, &handle, &proof);
    if INTERRUPTED.load(Ordering::SeqCst) {
        // The testbed's drop (inside `run`) waited for the handler's teardown to finish.
        return ExitCode::from(130);
    }
    let code = match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("wgmesh-demo: {e:#}");
            ExitCode::FAILURE
        }
    };
    // The last line, whatever happened (zeros when no capture ran).
    let (n, m) = proof.lock().map(|p| *p).unwrap_or_default();
    println!("PROOF wireguard_packets={n} plaintext_pod_packets={m}");
    code
}

fn node_name(i: u8) -> String {
    format!("node-{}", char::from(b'a' + i))
}

fn pod_name(i: u8, j: u8) -> String {
    format!("{}{}", char::from(b'a' + i), j + 1)
}

fn step(t0: Instant, what: &str) {
    println!("[{:5.1}s] {what}", t0.elapsed().as_secs_f64());
}

fn run(
    args: &Args,
    handle: &Arc<Mutex<Option<TeardownHandle>>>,
    proof: &Mutex<(usize, usize)>,
) -> Result<bool> {
    let t0 = Instant::now();
    step(
        t0,
        &format!(
            "starting the API stand-in and {} nodes with {} pods each",
            args.nodes, args.pods
        ),
    );
    let mut builder = Testbed::builder("demo").agents(false);
    for i in 0..args.nodes {
        builder = builder.node(&node_name(i), |mut n| {
            for j in 0..args.pods {
                n = n.pod(&pod_name(i, j));
            }
            n
        });
    }
    let bed = builder.start()?;
    if let Ok(mut h) = handle.lock() {
        *h = Some(bed.teardown_handle());
    }
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    let pod = |i: u8, j: u8| bed.pod(&pod_name(i, j));
    let mut results: Vec<(String, String, Result<String>)> = Vec::new();

    if !args.no_baseline {
        step(
            t0,
            "baseline: no wgmesh yet, pod a1 pings pod b1 over the host-gw routes",
        );
        let capture = bed.capture()?;
        let ping = pod(0, 0).ping(&pod(1, 0), 3)?;
        let base = capture.stop()?;
        println!(
            "         {}/{} replies; the underlay capture saw {} plaintext pod packets ({})",
            ping.received,
            ping.transmitted,
            base.plaintext_pod_packets(),
            base
        );
        let seen = base
            .assert_plaintext_seen()
            .context("the capture must see the plaintext baseline, or it proves nothing")
            .map(|()| {
                format!(
                    "{} plaintext pod packets seen",
                    base.plaintext_pod_packets()
                )
            });
        results.push((
            "a1 -> b1 (no wgmesh)".to_owned(),
            "baseline".to_owned(),
            seen,
        ));
    }

    step(t0, "starting wgmesh-agent on every node");
    for node in bed.nodes() {
        node.start_agent()?;
    }
    bed.eventually_within(
        "every node has a WireGuard peer for every other node",
        Duration::from_secs(60),
        || {
            for node in bed.nodes() {
                node.assert_agent_running()?;
            }
            bed.assert_full_mesh()
        },
    )?;
    step(
        t0,
        "mesh configured; capturing the underlay while pods talk",
    );

    let capture = bed.capture()?;
    // From here on failures are reported in the traffic table, and the capture is always
    // summarized: a failing run still shows whether anything leaked.
    // Warm-up: the first packet towards a peer triggers its handshake.
    let warm_up = eventually(
        "pod a1 reaches a pod on every other node",
        Duration::from_secs(20),
        || {
            for i in 1..args.nodes {
                pod(0, 0).ping(&pod(i, 0), 1)?.assert_no_loss()?;
            }
            Ok("reached every node".to_owned())
        },
    );
    let warmed_up = warm_up.is_ok();
    results.push((
        "a1 -> other nodes".to_owned(),
        "warm-up".to_owned(),
        warm_up,
    ));
    if warmed_up {
        traffic(args, &bed, &mut results);
        let hs = eventually(
            "every peer of every node has completed a handshake",
            Duration::from_secs(20),
            || bed.assert_handshakes(),
        );
        results.push((
            "all node pairs".to_owned(),
            "handshake".to_owned(),
            hs.map(|()| "every peer".to_owned()),
        ));
    }
    let summary = capture
        .stop()
        .context("failed to stop the underlay capture")?;
    step(t0, "done");
    report(&bed, &results, &summary, proof)
}

/// ICMP between pods, TCP and UDP around the ring of nodes, TCP on the same node.
fn traffic(args: &Args, bed: &Testbed, results: &mut Vec<(String, String, Result<String>)>) {
    let pod = |i: u8, j: u8| bed.pod(&pod_name(i, j));
    let pods = bed.pods();
    // ICMP: every pod to the first pod of every other node, and to a neighbour on its node.
    let pings: Vec<(Pod, Pod)> = pods
        .iter()
        .flat_map(|a| {
            let targets: Vec<Pod> = bed
                .nodes()
                .iter()
                .filter_map(|n| {
                    if n.name() == a.node_name() {
                        n.pods().into_iter().find(|p| p.name() != a.name())
                    } else {
                        n.pods().into_iter().next()
                    }
                })
                .collect();
            targets.into_iter().map(move |b| (a.clone(), b))
        })
        .collect();
    let ping_results: Vec<(String, String, Result<String>)> = thread::scope(|s| {
        let handles: Vec<_> = pings
            .iter()
            .map(|(a, b)| {
                s.spawn(move || {
                    let r = a.ping(b, 3).and_then(|p| {
                        p.assert_no_loss()?;
                        Ok(format!("{}/{} replies", p.received, p.transmitted))
                    });
                    (
                        format!("{} -> {}", a.name(), b.name()),
                        "ping".to_owned(),
                        r,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    ("?".into(), "ping".into(), Err(anyhow::anyhow!("panicked")))
                })
            })
            .collect()
    });
    results.extend(ping_results);
    // TCP and UDP around the ring of nodes (and the same node when it has two pods).
    for i in 0..args.nodes {
        let (a, b) = (pod(i, 0), pod((i + 1) % args.nodes, 0));
        let msg = format!("hello from {} to {}", a.name(), b.name());
        let r = a
            .tcp_request(&b, 7000 + u16::from(i), &msg)
            .and_then(|reply| {
                if reply != msg {
                    bail!("echo mismatch: {reply:?}");
                }
                Ok(format!("{} bytes echoed", reply.len()))
            });
        results.push((format!("{} -> {}", a.name(), b.name()), "tcp".to_owned(), r));
        let r = a.udp_ping(&b, 8000 + u16::from(i), 20).and_then(|u| {
            if u.lost > 0 {
                bail!("lost {} of {}", u.lost, u.sent);
            }
            Ok(format!(
                "{}/{} echoed, rtt avg {:.2} ms",
                u.received, u.sent, u.rtt_avg_ms
            ))
        });
        results.push((format!("{} -> {}", a.name(), b.name()), "udp".to_owned(), r));
    }
    if args.pods > 1 {
        let (a, b) = (pod(0, 0), pod(0, 1));
        let r = a
            .tcp_request(&b, 7100, "same node")
            .map(|r| format!("{} bytes echoed", r.len()));
        results.push((
            format!("{} -> {} (same node)", a.name(), b.name()),
            "tcp".to_owned(),
            r,
        ));
    }
}

fn report(
    bed: &Testbed,
    results: &[(String, String, Result<String>)],
    summary: &CaptureSummary,
    proof: &Mutex<(usize, usize)>,
) -> Result<bool> {
    let mut ok = true;
    println!("\nTraffic:");
    let mut t = Table::new(["flow", "kind", "result"]);
    for (flow, kind, r) in results {
        let text = match r {
            Ok(s) => s.clone(),
            Err(e) => {
                ok = false;
                format!("FAILED: {e:#}")
            }
        };
        t.row([flow.as_str(), kind.as_str(), text.as_str()]);
    }
    println!("{t}");

    for node in bed.nodes() {
        println!(
            "\nMesh state of {} ({}, pods {}, interface {}):",
            node.name(),
            node.underlay_ip(),
            node.pod_cidr(),
            node.wg_interface()
        );
        println!("{}", bed.mesh_table(&node)?);
    }
    println!("\nUnderlay capture: {summary}");
    if let Err(e) = summary.assert_no_plaintext() {
        println!("{e:#}");
        ok = false;
    }
    let (n, m) = (summary.wireguard_packets(), summary.plaintext_pod_packets());
    if let Ok(mut p) = proof.lock() {
        *p = (n, m);
    }
    ok &= n > 0 && m == 0;
    if !ok {
        // Teardown prints the diagnostics dump (to stderr) before main prints the PROOF line.
        bed.mark_failed();
    }
    Ok(ok)
}
