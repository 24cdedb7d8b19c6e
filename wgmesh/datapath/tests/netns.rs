//! Privileged scenarios: the datapath on a simulated node made of network namespaces (see
//! `netns_lab`). They need root, `ip`, `tc`, `ping` and `mount -t bpf`; run them with
//! `cargo test -p wgmesh-datapath -- --ignored`. Each scenario builds its own uniquely named
//! namespaces and bpffs mount, so they can run in parallel, and tears everything down on failure.

mod netns_lab;

use std::{collections::BTreeSet, thread, time::Duration};

use anyhow::{Context as _, Result, ensure};
use ipnet::IpNet;
use netns_lab::*;
use wgmesh_datapath::{AttachMode, Datapath, Direction, Error, SyncStats};

fn cidrs(list: &[&str]) -> BTreeSet<IpNet> {
    list.iter()
        .map(|cidr| cidr.parse().expect("test CIDR"))
        .collect()
}

fn remote() -> BTreeSet<IpNet> {
    cidrs(&[REMOTE_CIDR_V4, REMOTE_CIDR_V6])
}

fn local() -> BTreeSet<IpNet> {
    cidrs(&[LOCAL_CIDR_V4, LOCAL_CIDR_V6])
}

/// Given a node whose pod traffic to a remote pod CIDR takes the plaintext uplink,
/// when the agent loads the datapath, attaches it to the pod veth and syncs the CIDRs,
/// then pod packets to the remote pod are marked, routed into the tunnel and counted (IPv4 and
/// IPv6), while packets to this node's pods are counted as local and left unmarked;
/// when the agent exits in the middle of a ping burst,
/// then steering goes on without it and the pins alone show the counters and CIDRs;
/// when a new agent loads and re-attaches,
/// then the maps survived, the program in the existing attachment is replaced in place (still one
/// program on the hook, a new program id), not a single ping was lost, and re-running changes
/// nothing;
/// when the agent cleans up,
/// then no program, pin or steering is left, and cleaning up again is fine.
fn restart_story(mode: AttachMode) -> Result<()> {
    let lab = Lab::new()?;
    let cfg = lab.config(false);
    ensure!(
        !lab.pod.ping(REMOTE_POD_V4)?,
        "the remote pod answered without steering: the lab is miswired"
    );

    let agent = Agent::start(&lab.node)?;
    agent.load(&cfg, mode)?;
    ensure!(agent.with(|dp| Ok(dp.attach_mode()))? == mode);
    agent.with(|dp| dp.attach_pod_interface(POD_IF))?;
    let added = agent.with(|dp| dp.sync_remote_cidrs(&remote()))?;
    assert_eq!(
        added,
        SyncStats {
            added: 2,
            removed: 0
        }
    );
    agent.with(|dp| dp.sync_local_cidrs(&local()))?;

    let tunnel_tx = lab.node.tx_packets(TUNNEL_IF)?;
    ensure!(lab.pod.ping(REMOTE_POD_V4)?, "IPv4 ping not steered");
    ensure!(lab.pod.ping(REMOTE_POD_V6)?, "IPv6 ping not steered");
    let steered = agent.with(|dp| dp.counters())?;
    ensure!(steered.steered >= 2, "{steered:?}");
    ensure!(steered.steered_bytes >= 2 * 98, "{steered:?}");
    ensure!(lab.node.tx_packets(TUNNEL_IF)? >= tunnel_tx + 2);

    ensure!(lab.pod.ping(NODE_POD_GW_V4)?);
    let local_ping = agent.with(|dp| dp.counters())?;
    ensure!(local_ping.local > steered.local, "{local_ping:?}");
    ensure!(local_ping.steered == steered.steered, "{local_ping:?}");

    let before = agent.attached_programs(&lab.node, POD_IF, Direction::Ingress)?;
    ensure!(before.len() == 1, "one program on the hook: {before:?}");
    let link_pin = cfg
        .bpffs_dir
        .join("links")
        .join(format!("{POD_IF}-ingress"));
    let tcx_link = match mode {
        AttachMode::Tcx => Some(pinned_link_id(&link_pin)?),
        AttachMode::Netlink => None,
    };

    // Restart under load: 150 pings, 20 ms apart.
    let burst = lab.pod.ping_burst(REMOTE_POD_V4, 150, "0.02")?;
    thread::sleep(Duration::from_millis(500));
    agent.stop()?;
    let counted_at_exit = Datapath::open_pinned(&cfg.bpffs_dir)?.counters()?;
    thread::sleep(Duration::from_millis(500));
    let view = Datapath::open_pinned(&cfg.bpffs_dir)?;
    let without_agent = view.counters()?;
    ensure!(
        without_agent.steered > counted_at_exit.steered,
        "steering stopped with the agent: {counted_at_exit:?} -> {without_agent:?}"
    );
    ensure!(view.remote_cidrs()? == remote());
    ensure!(view.local_cidrs()? == local());
    ensure!(view.attached_interfaces()? == vec![(POD_IF.to_owned(), Direction::Ingress)]);
    ensure!(view.config()? == (FWMARK, FWMASK, false));

    let agent = Agent::start(&lab.node)?;
    agent.load(&cfg, mode)?;
    ensure!(
        agent.with(|dp| dp.remote_cidrs())? == remote(),
        "maps not re-used"
    );
    agent.with(|dp| dp.attach_pod_interface(POD_IF))?;
    let after = agent.attached_programs(&lab.node, POD_IF, Direction::Ingress)?;
    ensure!(after.len() == 1, "duplicate attachment: {after:?}");
    ensure!(
        after != before,
        "program not replaced: {before:?} -> {after:?}"
    );
    if let Some(link) = tcx_link {
        let adopted = pinned_link_id(&link_pin)?;
        ensure!(adopted == link, "link {link} not adopted: now {adopted}");
    }
    agent.with(|dp| dp.attach_pod_interface(POD_IF))?;
    ensure!(
        agent
            .attached_programs(&lab.node, POD_IF, Direction::Ingress)?
            .len()
            == 1
    );
    ensure!(agent.with(|dp| dp.sync_remote_cidrs(&remote()))? == SyncStats::default());
    ensure!(
        agent.with(|dp| dp.attached_interfaces())? == vec![(POD_IF.to_owned(), Direction::Ingress)]
    );

    let (sent, received) = burst.finish()?;
    ensure!(
        sent == 150 && received == sent,
        "pings lost across the restart: {received}/{sent}"
    );

    let dir = cfg.bpffs_dir.clone();
    agent.run(move |slot| {
        *slot = None;
        Datapath::cleanup(&dir)?;
        Datapath::cleanup(&dir)
    })??;
    eventually("no program is left on the pod veth", || {
        Ok(agent
            .attached_programs(&lab.node, POD_IF, Direction::Ingress)?
            .is_empty())
    })?;
    let pins = lab.bpffs.pins()?;
    ensure!(pins.is_empty(), "pins left after cleanup: {pins:?}");
    ensure!(!cfg.bpffs_dir.exists());
    ensure!(!lab.pod.ping(REMOTE_POD_V4)?, "still steered after cleanup");
    Ok(())
}

#[test]
#[ignore = "needs root + netns"]
fn tcx_steering_survives_agent_restart() -> Result<()> {
    if !kernel_has_tcx() {
        return skip("kernel < 6.6 has no TCX");
    }
    restart_story(AttachMode::Tcx)
}

#[test]
#[ignore = "needs root + netns"]
fn netlink_steering_survives_agent_restart() -> Result<()> {
    restart_story(AttachMode::Netlink)
}

/// Given a node with the guard on its uplink and its pod CIDR known,
/// when a pod sends plaintext traffic out of the uplink,
/// then it is counted as leaked but passes, while the node's own traffic is not counted;
/// when the agent restarts in strict mode,
/// then such traffic is dropped and counted, the node's own traffic still passes, and steered pod
/// traffic (which leaves through the tunnel) is unaffected.
fn guard_story(mode: AttachMode) -> Result<()> {
    let lab = Lab::new()?;
    let agent = Agent::start(&lab.node)?;
    agent.load(&lab.config(false), mode)?;
    agent.with(|dp| dp.attach_uplink(UPLINK_IF))?;
    agent.with(|dp| dp.sync_local_cidrs(&local()))?;

    ensure!(lab.pod.ping(PEER_V4)?, "non-strict guard must not drop");
    let leaked = agent.with(|dp| dp.counters())?;
    ensure!(
        leaked.leaked >= 1 && leaked.dropped_strict == 0,
        "{leaked:?}"
    );

    ensure!(lab.node.ping(PEER_V4)?);
    let node_traffic = agent.with(|dp| dp.counters())?;
    ensure!(node_traffic.leaked == leaked.leaked, "{node_traffic:?}");
    ensure!(
        node_traffic.uplink_passed > leaked.uplink_passed,
        "{node_traffic:?}"
    );

    agent.load(&lab.config(true), mode)?;
    agent.with(|dp| dp.attach_uplink(UPLINK_IF))?;
    ensure!(
        agent
            .attached_programs(&lab.node, UPLINK_IF, Direction::Egress)?
            .len()
            == 1
    );
    ensure!(
        !lab.pod.ping(PEER_V4)?,
        "strict guard let plaintext through"
    );
    let dropped = agent.with(|dp| dp.counters())?;
    ensure!(dropped.dropped_strict >= 1, "{dropped:?}");
    ensure!(dropped.leaked > node_traffic.leaked, "{dropped:?}");
    ensure!(lab.node.ping(PEER_V4)?, "strict guard dropped node traffic");

    agent.with(|dp| dp.attach_pod_interface(POD_IF))?;
    agent.with(|dp| dp.sync_remote_cidrs(&remote()))?;
    let before_steer = agent.with(|dp| dp.counters())?;
    ensure!(
        lab.pod.ping(REMOTE_POD_V4)?,
        "steered traffic hurt by strict mode"
    );
    let after_steer = agent.with(|dp| dp.counters())?;
    ensure!(after_steer.leaked == before_steer.leaked, "{after_steer:?}");
    ensure!(
        Datapath::open_pinned(&lab.config(true).bpffs_dir)?.config()? == (FWMARK, FWMASK, true)
    );

    let mut interfaces = agent.with(|dp| dp.attached_interfaces())?;
    interfaces.sort();
    ensure!(
        interfaces
            == vec![
                (UPLINK_IF.to_owned(), Direction::Egress),
                (POD_IF.to_owned(), Direction::Ingress),
            ],
        "{interfaces:?}"
    );
    let dir = lab.config(true).bpffs_dir;
    agent.run(move |slot| {
        *slot = None;
        Datapath::cleanup(&dir)
    })??;
    eventually("no program is left on the uplink", || {
        Ok(agent
            .attached_programs(&lab.node, UPLINK_IF, Direction::Egress)?
            .is_empty())
    })?;
    ensure!(lab.pod.ping(PEER_V4)?, "guard still active after cleanup");
    Ok(())
}

#[test]
#[ignore = "needs root + netns"]
fn guard_counts_leaks_and_strict_mode_drops_them() -> Result<()> {
    guard_story(AttachMode::detect())
}

#[test]
#[ignore = "needs root + netns"]
fn netlink_guard_counts_leaks_and_strict_mode_drops_them() -> Result<()> {
    guard_story(AttachMode::Netlink)
}

/// Given a steered pod,
/// when its veth disappears, the recorded attachment stays until the agent forgets it, and
/// attaching to the missing interface fails clearly;
/// when a pod comes back with the same veth name and the agent attaches without forgetting first,
/// then the stale attachment is replaced by a working one (one program on the hook);
/// when the veth goes again and the agent forgets it, nothing is recorded any more;
/// forgetting an interface that still exists detaches from it, and forgetting twice is fine.
fn recreated_veth_story(mode: AttachMode) -> Result<()> {
    let lab = Lab::new()?;
    let agent = Agent::start(&lab.node)?;
    agent.load(&lab.config(false), mode)?;
    agent.with(|dp| dp.attach_pod_interface(POD_IF))?;
    agent.with(|dp| dp.sync_remote_cidrs(&remote()))?;
    ensure!(lab.pod.ping(REMOTE_POD_V4)?);

    lab.delete_pod_veth()?;
    ensure!(
        agent.with(|dp| dp.attached_interfaces())? == vec![(POD_IF.to_owned(), Direction::Ingress)]
    );
    let missing = agent.run(|slot| {
        slot.as_mut()
            .map(|dp| dp.attach_pod_interface(POD_IF))
            .context("no datapath")
    })??;
    ensure!(
        matches!(missing, Err(Error::NoSuchInterface { .. })),
        "{missing:?}"
    );

    let link_pin = lab
        .config(false)
        .bpffs_dir
        .join("links")
        .join(format!("{POD_IF}-ingress"));
    let defunct_link = match mode {
        AttachMode::Tcx => Some(pinned_link_id(&link_pin)?),
        AttachMode::Netlink => None,
    };
    lab.create_pod_veth()?;
    ensure!(
        !lab.pod.ping(REMOTE_POD_V4)?,
        "new veth steered before attach"
    );
    agent.with(|dp| dp.attach_pod_interface(POD_IF))?;
    if let Some(defunct) = defunct_link {
        ensure!(
            pinned_link_id(&link_pin)? != defunct,
            "the defunct link was re-used"
        );
    }
    ensure!(lab.pod.ping(REMOTE_POD_V4)?, "re-created veth not steered");
    ensure!(
        agent
            .attached_programs(&lab.node, POD_IF, Direction::Ingress)?
            .len()
            == 1
    );

    lab.delete_pod_veth()?;
    agent.with(|dp| dp.forget_interface(POD_IF))?;
    agent.with(|dp| dp.forget_interface(POD_IF))?;
    ensure!(agent.with(|dp| dp.attached_interfaces())?.is_empty());
    let pins = lab.bpffs.pins()?;
    ensure!(
        !pins.iter().any(|pin| pin.contains("links/")),
        "link pins left: {pins:?}"
    );

    // Forgetting an interface that still exists detaches wgmesh from it, and is idempotent even
    // on a device without any qdisc.
    lab.create_pod_veth()?;
    agent.with(|dp| dp.forget_interface(POD_IF))?;
    agent.with(|dp| dp.attach_uplink(UPLINK_IF))?;
    ensure!(
        agent
            .attached_programs(&lab.node, UPLINK_IF, Direction::Egress)?
            .len()
            == 1
    );
    agent.with(|dp| dp.forget_interface(UPLINK_IF))?;
    eventually("the uplink is detached", || {
        Ok(agent
            .attached_programs(&lab.node, UPLINK_IF, Direction::Egress)?
            .is_empty())
    })?;
    agent.with(|dp| dp.forget_interface(UPLINK_IF))?;
    ensure!(agent.with(|dp| dp.attached_interfaces())?.is_empty());
    Ok(())
}

#[test]
#[ignore = "needs root + netns"]
fn recreated_pod_veth_gets_a_fresh_attachment() -> Result<()> {
    recreated_veth_story(AttachMode::detect())
}

#[test]
#[ignore = "needs root + netns"]
fn netlink_recreated_pod_veth_gets_a_fresh_attachment() -> Result<()> {
    recreated_veth_story(AttachMode::Netlink)
}

/// Given a loaded datapath,
/// when the remote CIDRs change, only the difference is written, host bits are cleared, and a
/// request beyond a map's capacity is refused without touching the map.
#[test]
#[ignore = "needs root + netns"]
fn cidr_sync_writes_only_the_difference() -> Result<()> {
    let lab = Lab::new()?;
    let agent = Agent::start(&lab.node)?;
    agent.load(&lab.config(false), AttachMode::detect())?;
    let first = cidrs(&["198.19.2.77/24", "198.19.3.0/24", "2001:db8:2::9/64"]);
    ensure!(
        agent.with(move |dp| dp.sync_remote_cidrs(&first))?
            == SyncStats {
                added: 3,
                removed: 0
            }
    );
    ensure!(
        agent.with(|dp| dp.remote_cidrs())?
            == cidrs(&["198.19.2.0/24", "198.19.3.0/24", "2001:db8:2::/64"])
    );
    let second = cidrs(&["198.19.3.0/24", "198.19.4.0/23", "2001:db8:2::/64"]);
    ensure!(
        agent.with(move |dp| dp.sync_remote_cidrs(&second))?
            == SyncStats {
                added: 1,
                removed: 1
            }
    );
    let too_many: BTreeSet<IpNet> = (0..=256u32)
        .map(|i| IpNet::V4(ipnet::Ipv4Net::new((0xc612_0000 + (i << 8)).into(), 24).expect("/24")))
        .collect();
    let refused = agent.run(move |slot| {
        slot.as_mut()
            .map(|dp| dp.sync_local_cidrs(&too_many))
            .context("no datapath")
    })??;
    ensure!(
        matches!(refused, Err(Error::TooManyCidrs { .. })),
        "{refused:?}"
    );
    ensure!(agent.with(|dp| dp.local_cidrs())?.is_empty());
    ensure!(
        agent.with(|dp| dp.remote_cidrs())?
            == cidrs(&["198.19.3.0/24", "198.19.4.0/23", "2001:db8:2::/64"])
    );
    Ok(())
}
