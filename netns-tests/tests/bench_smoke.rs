//! The benchmark harness itself, at tiny sizes, so that `make bench` cannot rot unnoticed:
//! `wgmesh-bench all --quick` must finish, and every section must come back with numbers.

use std::{process::Command, time::Instant};

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;

/// Given the release-independent quick mode of the benchmarks (10/50 Nodes, one run, 2 s iperf),
/// when `wgmesh-bench all --quick` runs,
/// then it exits 0 and results.json holds numbers for every section, and RESULTS.md is written.
#[test]
#[ignore = "needs root + netns: run `make test-netns`"]
fn quick_bench_produces_numbers_in_every_section() -> Result<()> {
    let out = tempfile::tempdir()?;
    let started = Instant::now();
    let status = Command::new(env!("CARGO_BIN_EXE_wgmesh-bench"))
        .args(["all", "--quick", "--out"])
        .arg(out.path())
        .env(
            "WGMESH_BENCH_EBPF_BIN",
            env!("CARGO_BIN_EXE_wgmesh-bench-ebpf"),
        )
        .env("WGMESH_PROBE_BIN", env!("CARGO_BIN_EXE_wgmesh-probe"))
        .status()
        .context("running wgmesh-bench")?;
    eprintln!(
        "wgmesh-bench all --quick took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let results: Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("results.json")).context("results.json")?,
    )?;
    for section in ["ebpf", "datapath", "control", "disruption"] {
        let s = &results["sections"][section];
        ensure!(
            s["error"].is_null() && s["result"].is_object(),
            "section {section} produced no numbers: {}",
            s["error"]
        );
        ensure!(
            out.path()
                .join(format!("sections/{section}.json"))
                .is_file(),
            "no sections/{section}.json"
        );
    }
    ensure!(status.success(), "wgmesh-bench exited with {status}");
    let md = std::fs::read_to_string(out.path().join("RESULTS.md")).context("RESULTS.md")?;
    for heading in [
        "## Targets",
        "## 1. eBPF",
        "## 2. Userspace datapath",
        "## 3. Control plane",
        "## 4. Disruption",
        "## Commands",
    ] {
        ensure!(md.contains(heading), "RESULTS.md lacks {heading:?}");
    }
    Ok(())
}
