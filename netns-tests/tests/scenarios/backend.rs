//! Backend selection on a kernel without WireGuard (this machine; the VM tier covers the kernel
//! backend itself).

use wgmesh_netns_tests::prelude::*;

use crate::support::{bed, converged};

/// Given a kernel without WireGuard support (checked first: a scratch `wireguard` link cannot be
/// created),
/// when an agent starts with `--backend kernel`,
/// then it exits non-zero with one clear error naming the missing kernel support and the fix;
/// and when agents start with `--backend auto`,
/// then they say in the log that they fall back to userspace, and the mesh works.
#[test]
#[ignore = "needs root + netns: run `make test-netns`"]
fn kernel_backend_without_kernel_support_fails_clearly_and_auto_falls_back() -> TestResult {
    let bed = bed("backend")
        .agents(false)
        .node("a", |n| n.pod("a1").backend("auto"))
        .node("b", |n| n.pod("b1").backend("auto"))
        .start()?;
    let a = bed.node("a");
    let probe = a.ip(["link", "add", "wgprobe0", "type", "wireguard"]);
    ensure!(
        probe.is_err(),
        "this kernel supports WireGuard: the scenario needs one that does not (it runs on the host tier)"
    );

    a.configure_agent(|spec| spec.backend = "kernel".into());
    a.start_agent()?;
    bed.eventually("the kernel-backend agent gives up", || {
        ensure!(!a.agent_running(), "still running");
        Ok(())
    })?;
    let log = a.agent_log();
    let err = log
        .lines()
        .find(|l| l.starts_with("wgmesh-agent: "))
        .ok_or_else(|| anyhow::anyhow!("no error line in the log:\n{log}"))?;
    ensure!(
        err.contains("no WireGuard support")
            && err.contains("--backend userspace")
            && err.contains("wireguard"),
        "unclear error: {err}"
    );

    a.configure_agent(|spec| spec.backend = "auto".into());
    for n in bed.nodes() {
        n.start_agent()?;
    }
    converged(&bed)?;
    for n in bed.nodes() {
        let status = n.status()?;
        ensure!(
            status["backend"] == "userspace",
            "{}: {}",
            n.name(),
            status["backend"]
        );
        ensure!(
            n.agent_log()
                .contains("the kernel has no WireGuard, using the userspace backend"),
            "{} did not say why it chose userspace",
            n.name()
        );
    }
    Ok(())
}
