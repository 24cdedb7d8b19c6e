//! Keys travel through Node annotations; bad ones are refused without harming the rest.

use wgmesh_netns_tests::prelude::*;

use crate::support::{bed, converged, published_key};

/// Given a two-node mesh,
/// when a Node appears whose public-key annotation is malformed,
/// then every agent skips it with a clear log line naming the node and the reason, reports it in
/// its status, and the existing peers keep working.
#[test]
#[ignore = "needs root + netns: run `make test-netns`"]
fn node_with_malformed_key_is_skipped_and_others_keep_working() -> TestResult {
    let bed = bed("bad-key")
        .node("a", |n| n.pod("a1"))
        .node("b", |n| n.pod("b1"))
        .start()?;
    converged(&bed)?;
    let api = bed.api()?;
    api.create_node("rogue", "192.0.2.99".parse()?, &["198.18.99.0/24".parse()?])?;
    api.patch_node_annotations(
        "rogue",
        &[
            ("v1.wgmesh.io/public-key", Some("this-is-not-a-key")),
            ("v1.wgmesh.io/listen-port", Some("51820")),
        ],
    )?;

    for n in bed.nodes() {
        bed.eventually(
            &format!("{} reports the rogue node as skipped", n.name()),
            || {
                let status = n.status()?;
                let skipped = status["skipped_nodes"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let rogue = skipped
                    .iter()
                    .find(|s| s["node"] == "rogue")
                    .ok_or_else(|| anyhow::anyhow!("not skipped yet: {skipped:?}"))?;
                ensure!(
                    rogue["reason"].as_str().unwrap_or("").contains("malformed"),
                    "reason: {rogue}"
                );
                let log = n.agent_log();
                ensure!(
                    log.lines().any(|l| l.contains("node skipped")
                        && l.contains("rogue")
                        && l.contains("malformed")),
                    "no clear log line about the rogue node"
                );
                Ok(())
            },
        )?;
        ensure!(
            n.wg_show_dump()?.peers.len() == 1,
            "{} peers with the rogue node",
            n.name()
        );
    }
    bed.pod("a1").ping(&bed.pod("b1"), 3)?.assert_no_loss()?;
    bed.pod("b1").ping(&bed.pod("a1"), 3)?.assert_no_loss()
}

/// Given a fresh node,
/// when its agent starts,
/// then it publishes exactly the key its device uses, the private key file is 0600, and no
/// private key appears in the agent's or the device's log, in its status or in the annotations.
#[test]
#[ignore = "needs root + netns: run `make test-netns`"]
fn key_is_published_and_private_key_never_leaks() -> TestResult {
    use std::os::unix::fs::PermissionsExt as _;

    let bed = bed("key-publish")
        .node("a", |n| n.pod("a1"))
        .node("b", |n| n.pod("b1"))
        .start()?;
    converged(&bed)?;
    let a = bed.node("a");
    let device_key = a.wg_show_dump()?.interface.public_key;
    ensure!(
        published_key(&bed, "a")? == device_key,
        "annotation and device disagree"
    );

    let key_file = a.state_dir().join("private.key");
    let mode = std::fs::metadata(&key_file)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "private key file has mode {mode:o}");
    let private = std::fs::read_to_string(&key_file)?.trim().to_owned();
    ensure!(private.len() == 44, "unexpected private key format");
    let private_hex: String = base64_decode(&private)?
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();

    let annotations = format!("{:?}", bed.api()?.node_annotations("a")?);
    let places = [
        ("agent log", a.agent_log()),
        ("device log", a.device_log()),
        ("status", a.status()?.to_string()),
        ("metrics", a.agent_http_get("/metrics")?),
        ("annotations", annotations),
    ];
    for (what, text) in places {
        ensure!(
            !text.contains(&private),
            "the private key (base64) appears in the {what}"
        );
        ensure!(
            !text.contains(&private_hex),
            "the private key (hex) appears in the {what}"
        );
    }
    Ok(())
}

fn base64_decode(s: &str) -> Result<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = ALPHABET
            .iter()
            .position(|a| *a == c)
            .ok_or_else(|| anyhow::anyhow!("not base64"))? as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    Ok(out)
}
