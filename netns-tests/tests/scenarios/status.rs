//! What the agent reports is what the kernel (or the userspace device) has: its `/status` shows the
//! same interface and peer data as `wg show <iface> dump`.

use std::time::UNIX_EPOCH;

use serde_json::Value;
use wgmesh_netns_tests::prelude::*;

use crate::support::{handshaken_mesh, parse_rfc3339, wgmeshctl_ok, wgmeshctl_on};

/// `wg show dump` reduced to comparable text rows, and the same rows from the agent's status.
fn rows_from_dump(d: &WgDump) -> Vec<String> {
    let mut rows: Vec<String> = d
        .peers
        .iter()
        .map(|p| {
            let mut ips: Vec<String> = p.allowed_ips.iter().map(|n| n.to_string()).collect();
            ips.sort();
            format!(
                "{} {} {} hs={} rx={} tx={} ka={}",
                p.public_key,
                p.endpoint.map(|e| e.to_string()).unwrap_or_default(),
                ips.join(","),
                p.latest_handshake
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs()),
                p.rx_bytes,
                p.tx_bytes,
                p.persistent_keepalive.unwrap_or(0)
            )
        })
        .collect();
    rows.sort();
    rows.insert(
        0,
        format!(
            "iface {} {}",
            d.interface.public_key, d.interface.listen_port
        ),
    );
    rows
}

/// Rows from a JSON document (the agent's `/status` device section or `wgmeshctl status -o json`);
/// `handshake` reads a peer's handshake time and `keepalive` names the keepalive field.
fn rows_from_json(doc: &Value, handshake: impl Fn(&Value) -> u64, keepalive: &str) -> Vec<String> {
    let mut rows: Vec<String> = doc["peers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|p| p["verdict"] != "missing")
        .map(|p| {
            let mut ips: Vec<String> = p["allowed_ips"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            ips.sort();
            format!(
                "{} {} {} hs={} rx={} tx={} ka={}",
                p["public_key"].as_str().unwrap_or(""),
                p["endpoint"].as_str().unwrap_or(""),
                ips.join(","),
                handshake(p),
                p["rx_bytes"],
                p["tx_bytes"],
                p[keepalive]
            )
        })
        .collect();
    rows.sort();
    rows.insert(
        0,
        format!(
            "iface {} {}",
            doc["public_key"].as_str().unwrap_or(""),
            doc["listen_port"]
        ),
    );
    rows
}

fn rows_from_status(device: &Value) -> Vec<String> {
    rows_from_json(
        device,
        |p| p["latest_handshake"].as_u64().unwrap_or(0),
        "persistent_keepalive",
    )
}

fn rows_from_wgmeshctl(doc: &Value) -> Vec<String> {
    rows_from_json(
        doc,
        |p| {
            p["latest_handshake"]
                .as_str()
                .and_then(parse_rfc3339)
                .unwrap_or(0)
        },
        "keepalive_seconds",
    )
}

/// Given a three-node mesh that has carried traffic,
/// when the agent's `/status` and `wgmeshctl status` are read between two identical
/// `wg show <iface> dump`s,
/// then both show the same public key, listen port, peers, endpoints, allowed IPs, latest
/// handshakes, transfer counters and keepalives as `wg show` (kernel or userspace backend alike),
/// and `wgmeshctl status --check` calls every peer ok.
#[test]
#[ignore = "needs root + netns: run `make test-netns`"]
fn agent_status_matches_wg_show() -> TestResult {
    let bed = handshaken_mesh("status", &["a", "b", "c"])?;
    for n in bed.nodes() {
        bed.eventually(&format!("{}'s status matches wg show", n.name()), || {
            let before = n.wg_show_dump()?;
            let status = n.status()?;
            let (code, out, err) = wgmeshctl_on(&bed, &n, &["status", "-o", "json"])?;
            let after = n.wg_show_dump()?;
            ensure!(before == after, "the device changed while reading; again");
            ensure!(code == 0, "wgmeshctl status exited {code}: {err}");
            let ctl: Value = serde_json::from_str(&out).map_err(|e| {
                anyhow::anyhow!("wgmeshctl status -o json is not JSON ({e}): {out}")
            })?;
            let want = rows_from_dump(&before);
            let got = rows_from_status(&status["device"]);
            ensure!(
                want == got,
                "wg show:\n  {}\nstatus:\n  {}",
                want.join("\n  "),
                got.join("\n  ")
            );
            let got = rows_from_wgmeshctl(&ctl);
            ensure!(
                want == got,
                "wg show:\n  {}\nwgmeshctl status:\n  {}",
                want.join("\n  "),
                got.join("\n  ")
            );
            ensure!(
                ctl["device_source"] == "direct" && ctl["agent"]["ready"] == true,
                "wgmeshctl read the device itself and reached the agent: {}",
                serde_json::to_string(&ctl["agent"]).unwrap_or_default()
            );
            Ok(())
        })?;
        wgmeshctl_ok(&bed, &n, &["status", "--check"])?;
    }
    Ok(())
}
