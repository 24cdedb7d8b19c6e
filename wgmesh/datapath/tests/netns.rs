//! Privileged scenarios: the datapath on a simulated node made of network namespaces (see
//! `netns_lab`). They need root, `ip`, `tc`, `ping` and `mount -t bpf`; run them with
//! `cargo test -p wgmesh-datapath -- --ignored`. Each scenario builds its own uniquely named
//! namespaces and bpffs mount, so they can run in parallel, and tears everything down on failure.

mod netns_lab;

use std::{collections::BTreeSet, thread, time::Duration};

use anyhow::{Context as _, Result, ensure};
use ipnet::IpNet;
use netns_lab::*;
use wgmesh_datapath::{
    AttachMode, Counters, Datapath, DatapathConfig, Direction, Error, SyncStats,
};

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

/// Every other node's pod CIDRs: the peered one's and those of a node without a peer.
fn cluster() -> BTreeSet<IpNet> {
    cidrs(&[
        REMOTE_CIDR_V4,
        REMOTE_CIDR_V6,
        CLUSTER_ONLY_CIDR_V4,
        CLUSTER_ONLY_CIDR_V6,
    ])
}

/// Whether only `uplink_passed` differs between two counter readings.
fn only_passed_changed(before: &Counters, after: &Counters) -> bool {
    Counters {
        uplink_passed: before.uplink_passed,
        ..after.clone()
    } == *before
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

/// Given a node with the guard on its uplink, its pod CIDRs and the cluster's known, and no
/// steering program on the pod veth,
/// when pods and the node send to addresses outside every pod CIDR ("the internet", the peer),
/// then the packets pass and only the uplink's pass counter moves;
/// when a pod (or the node) sends to a cluster node we have no WireGuard peer for,
/// then the plaintext passes and is counted as leaked;
/// when traffic for a peered node's pods meets the guard while the tunnel's ifindex is unknown,
/// then it is not rescued but counted as leaked as well;
/// when the agent restarts in strict mode,
/// then such traffic is dropped and counted, pod traffic to the internet and the node's own
/// traffic still pass, and steered pod traffic (which leaves through the tunnel) is unaffected.
fn guard_story(mode: AttachMode) -> Result<()> {
    let lab = Lab::new()?;
    let agent = Agent::start(&lab.node)?;
    agent.load(&lab.config(false), mode)?;
    agent.with(|dp| dp.attach_uplink(UPLINK_IF))?;
    agent.with(|dp| dp.sync_local_cidrs(&local()))?;
    agent.with(|dp| dp.sync_remote_cidrs(&remote()))?;
    ensure!(
        agent.with(|dp| dp.sync_cluster_cidrs(&cluster()))?
            == SyncStats {
                added: 4,
                removed: 0
            }
    );
    ensure!(agent.with(|dp| dp.cluster_cidrs())? == cluster());
    ensure!(agent.with(|dp| dp.tunnel_ifindex())? == 0);

    // Outside every pod CIDR: passes, counted as passed and nothing else.
    let before = agent.with(|dp| dp.counters())?;
    ensure!(lab.pod.ping(INTERNET_V4)?, "pod -> internet (IPv4) blocked");
    ensure!(lab.pod.ping(INTERNET_V6)?, "pod -> internet (IPv6) blocked");
    ensure!(lab.node.ping(PEER_V4)?, "node -> peer blocked");
    let passed = agent.with(|dp| dp.counters())?;
    ensure!(
        passed.uplink_passed >= before.uplink_passed + 3,
        "{passed:?}"
    );
    ensure!(
        only_passed_changed(&before, &passed),
        "{before:?} -> {passed:?}"
    );

    // A cluster node without a WireGuard peer: plaintext, counted, not dropped.
    ensure!(
        lab.pod.ping(CLUSTER_ONLY_POD_V4)?,
        "non-strict guard must not drop (IPv4)"
    );
    ensure!(
        lab.pod.ping(CLUSTER_ONLY_POD_V6)?,
        "non-strict guard must not drop (IPv6)"
    );
    ensure!(
        lab.node.ping(CLUSTER_ONLY_POD_V4)?,
        "non-strict guard must not drop node traffic"
    );
    let leaked = agent.with(|dp| dp.counters())?;
    ensure!(leaked.leaked == passed.leaked + 3, "{leaked:?}");
    ensure!(
        leaked.dropped_strict == 0 && leaked.rescued == 0,
        "{leaked:?}"
    );

    // A peered node's pods while the tunnel's ifindex is unknown: no redirect, counted as leaked
    // (the peer does not own the address, so nothing answers).
    ensure!(
        !lab.pod.ping(REMOTE_POD_V4)?,
        "the peer answered for a remote pod"
    );
    let unknown_tunnel = agent.with(|dp| dp.counters())?;
    ensure!(
        unknown_tunnel.leaked == leaked.leaked + 1 && unknown_tunnel.rescued == 0,
        "{unknown_tunnel:?}"
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
        agent.with(|dp| dp.cluster_cidrs())? == cluster(),
        "cluster map not re-used"
    );
    ensure!(
        !lab.pod.ping(CLUSTER_ONLY_POD_V4)?,
        "strict guard let plaintext through"
    );
    let dropped = agent.with(|dp| dp.counters())?;
    ensure!(
        dropped.dropped_strict == unknown_tunnel.dropped_strict + 1,
        "{dropped:?}"
    );
    ensure!(dropped.leaked == unknown_tunnel.leaked + 1, "{dropped:?}");
    ensure!(
        lab.pod.ping(INTERNET_V4)?,
        "strict guard dropped pod traffic to the internet"
    );
    ensure!(lab.node.ping(PEER_V4)?, "strict guard dropped node traffic");
    let still = agent.with(|dp| dp.counters())?;
    ensure!(only_passed_changed(&dropped, &still), "{still:?}");

    agent.with(|dp| dp.attach_pod_interface(POD_IF))?;
    let before_steer = agent.with(|dp| dp.counters())?;
    ensure!(
        lab.pod.ping(REMOTE_POD_V4)?,
        "steered traffic hurt by strict mode"
    );
    let after_steer = agent.with(|dp| dp.counters())?;
    ensure!(after_steer.leaked == before_steer.leaked, "{after_steer:?}");
    ensure!(
        after_steer.steered > before_steer.steered,
        "{after_steer:?}"
    );
    let view = Datapath::open_pinned(&lab.config(true).bpffs_dir)?;
    ensure!(view.config()? == (FWMARK, FWMASK, true));
    ensure!(view.cluster_cidrs()? == cluster());
    ensure!(view.tunnel_ifindex()? == 0);

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
    ensure!(
        lab.pod.ping(CLUSTER_ONLY_POD_V4)?,
        "guard still active after cleanup"
    );
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
/// when the remote (or cluster) CIDRs change, only the difference is written, host bits are
/// cleared, and a request beyond a map's capacity is refused without touching the map.
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

    // The cluster tries: the same minimal diff, independent of the remote ones.
    let all = cidrs(&[
        "198.19.3.9/24",
        "198.19.4.0/23",
        "198.19.8.0/24",
        "2001:db8:9::/64",
    ]);
    ensure!(
        agent.with(move |dp| dp.sync_cluster_cidrs(&all))?
            == SyncStats {
                added: 4,
                removed: 0
            }
    );
    let fewer = cidrs(&["198.19.3.0/24", "198.19.4.0/23", "2001:db8:9::/64"]);
    ensure!(
        agent.with(move |dp| dp.sync_cluster_cidrs(&fewer))?
            == SyncStats {
                added: 0,
                removed: 1
            }
    );
    ensure!(
        agent.with(|dp| dp.cluster_cidrs())?
            == cidrs(&["198.19.3.0/24", "198.19.4.0/23", "2001:db8:9::/64"])
    );
    ensure!(
        agent.with(|dp| dp.remote_cidrs())?
            == cidrs(&["198.19.3.0/24", "198.19.4.0/23", "2001:db8:2::/64"])
    );
    let too_many: BTreeSet<IpNet> = (0..=16_384u32)
        .map(|i| IpNet::V4(ipnet::Ipv4Net::new((0x0a00_0000 + (i << 8)).into(), 24).expect("/24")))
        .collect();
    let refused = agent.run(move |slot| {
        slot.as_mut()
            .map(|dp| dp.sync_cluster_cidrs(&too_many))
            .context("no datapath")
    })??;
    ensure!(
        matches!(refused, Err(Error::TooManyCidrs { .. })),
        "{refused:?}"
    );
    ensure!(agent.with(|dp| dp.cluster_cidrs())?.len() == 3);
    Ok(())
}

/// The remote pod CIDRs, for packet captures.
const REMOTE_NETS: [&str; 2] = [REMOTE_CIDR_V4, REMOTE_CIDR_V6];

/// Given a node with the guard on its uplink and the cluster's pod CIDRs known, and a pod whose
/// veth the agent has not attached `wgmesh_steer` to yet (the pod raced the attach),
/// when the agent learns the WireGuard device's ifindex (a TUN, i.e. an L3 device like the real
/// one, here answering pings for every address),
/// then the guard starts redirecting into it without any re-attach: the pod's packets to remote
/// pods (IPv4, IPv6) arrive at the tunnel as bare IP packets, are answered, counted as rescued,
/// and not one reaches the far side of the uplink; the node's own packets are not rescued (the
/// peer would reject their source) but counted as leaked;
/// when the WireGuard device is deleted and re-created with another ifindex,
/// then the stale index fails closed (nothing in the clear), and once the agent sets the new index
/// rescue resumes, still without re-attaching;
/// when the agent exits and a new one loads in strict mode with the tunnel's ifindex,
/// then rescue never stops, and strict mode does not drop what can be rescued;
/// when the ifindex is set back to unknown,
/// then such traffic is treated as plaintext for the cluster (dropped in strict mode).
fn rescue_story(mode: AttachMode) -> Result<()> {
    let lab = Lab::new()?;
    let cfg = lab.config(false);
    let agent = Agent::start(&lab.node)?;
    agent.load(&cfg, mode)?;
    agent.with(|dp| dp.attach_uplink(UPLINK_IF))?;
    agent.with(|dp| dp.sync_local_cidrs(&local()))?;
    agent.with(|dp| dp.sync_remote_cidrs(&remote()))?;
    agent.with(|dp| dp.sync_cluster_cidrs(&cluster()))?;
    let guard = agent.attached_programs(&lab.node, UPLINK_IF, Direction::Egress)?;
    ensure!(guard.len() == 1, "{guard:?}");
    let guard_link_pin = cfg
        .bpffs_dir
        .join("links")
        .join(format!("{UPLINK_IF}-egress"));
    let guard_link = match mode {
        AttachMode::Tcx => Some(pinned_link_id(&guard_link_pin)?),
        AttachMode::Netlink => None,
    };
    let not_reattached = || -> Result<()> {
        let now = agent.attached_programs(&lab.node, UPLINK_IF, Direction::Egress)?;
        ensure!(now == guard, "guard re-attached: {guard:?} -> {now:?}");
        if let Some(link) = guard_link {
            ensure!(pinned_link_id(&guard_link_pin)? == link, "new guard link");
        }
        Ok(())
    };

    let tun = lab.tun_device()?;
    ensure!(tun.ifindex != 0);
    // Before the agent knows the tunnel, the packet goes out in the clear (counted as leaked), and
    // the capture on the far side of the uplink sees it: the observation works.
    let wire = Capture::start(&lab.peer, "eth0")?;
    ensure!(
        !lab.pod.ping(REMOTE_POD_V4)?,
        "the remote pod answered before the tunnel was known: the lab is miswired"
    );
    ensure!(tun.packets_to(REMOTE_POD_V4)? == 0);
    let clear = wire.finish_count(&REMOTE_NETS)?;
    ensure!(clear == 1, "capture saw {clear} plaintext packets, not 1");

    let before = agent.with(|dp| dp.counters())?;
    let ifindex = tun.ifindex;
    agent.with(move |dp| dp.set_tunnel_ifindex(ifindex))?;
    ensure!(agent.with(|dp| dp.tunnel_ifindex())? == tun.ifindex);
    not_reattached()?;
    let wire = Capture::start(&lab.peer, "eth0")?;
    ensure!(lab.pod.ping(REMOTE_POD_V4)?, "IPv4 not rescued");
    ensure!(lab.pod.ping(REMOTE_POD_V6)?, "IPv6 not rescued");
    let rescued = agent.with(|dp| dp.counters())?;
    ensure!(rescued.rescued == before.rescued + 2, "{rescued:?}");
    ensure!(
        rescued.leaked == before.leaked && rescued.dropped_strict == 0,
        "{rescued:?}"
    );
    ensure!(rescued.steered == 0, "the pod veth has no steer program");
    ensure!(tun.packets_to(REMOTE_POD_V4)? == 1, "{:?}", tun.packets());
    ensure!(tun.packets_to(REMOTE_POD_V6)? == 1, "{:?}", tun.packets());
    ensure!(
        tun.packets().iter().all(|packet| ip_dst(packet).is_some()),
        "the tunnel got a link-layer header: {:?}",
        tun.packets()
    );
    let clear = wire.finish_count(&REMOTE_NETS)?;
    ensure!(clear == 0, "{clear} rescued packets also left in the clear");
    // The node's own packet to a remote pod is not redirected, only counted.
    let wire = Capture::start(&lab.peer, "eth0")?;
    let node_before = agent.with(|dp| dp.counters())?;
    ensure!(
        !lab.node.ping(REMOTE_POD_V4)?,
        "node traffic was answered: it went into the tunnel"
    );
    let node_after = agent.with(|dp| dp.counters())?;
    ensure!(node_after.rescued == node_before.rescued, "{node_after:?}");
    ensure!(
        node_after.leaked == node_before.leaked + 1,
        "{node_after:?}"
    );
    ensure!(tun.packets_to(REMOTE_POD_V4)? == 1, "{:?}", tun.packets());
    let clear = wire.finish_count(&REMOTE_NETS)?;
    ensure!(
        clear == 1,
        "node traffic: {clear} packets seen in the clear, not 1"
    );

    // The WireGuard device is re-created (new ifindex) while the programs run.
    let old_ifindex = tun.ifindex;
    tun.close()?;
    ensure!(!lab.node_has_link(TUN_IF)?, "the TUN outlived its fd");
    let wire = Capture::start(&lab.peer, "eth0")?;
    ensure!(
        !lab.pod.ping(REMOTE_POD_V4)?,
        "answered through a deleted tunnel"
    );
    let clear = wire.finish_count(&REMOTE_NETS)?;
    ensure!(clear == 0, "stale tunnel ifindex leaked {clear} packets");
    let tun = lab.tun_device()?;
    ensure!(tun.ifindex != old_ifindex, "the kernel re-used the ifindex");
    let ifindex = tun.ifindex;
    agent.with(move |dp| dp.set_tunnel_ifindex(ifindex))?;
    agent.with(move |dp| dp.set_tunnel_ifindex(ifindex))?;
    not_reattached()?;
    ensure!(
        lab.pod.ping(REMOTE_POD_V4)?,
        "not rescued into the re-created tunnel"
    );
    ensure!(tun.packets_to(REMOTE_POD_V4)? == 1, "{:?}", tun.packets());

    // Agent exit: the pinned CONFIG keeps the index, the attached guard keeps rescuing.
    agent.stop()?;
    let view = Datapath::open_pinned(&cfg.bpffs_dir)?;
    ensure!(view.tunnel_ifindex()? == tun.ifindex);
    ensure!(view.cluster_cidrs()? == cluster());
    let at_exit = view.counters()?;
    ensure!(
        lab.pod.ping(REMOTE_POD_V6)?,
        "rescue stopped with the agent"
    );
    ensure!(view.counters()?.rescued == at_exit.rescued + 1);

    // A new agent in strict mode that knows the tunnel: rescue goes first, nothing is dropped.
    let strict = DatapathConfig {
        tunnel_ifindex: tun.ifindex,
        ..lab.config(true)
    };
    let agent = Agent::start(&lab.node)?;
    agent.load(&strict, mode)?;
    agent.with(|dp| dp.attach_uplink(UPLINK_IF))?;
    ensure!(agent.with(|dp| dp.tunnel_ifindex())? == tun.ifindex);
    let wire = Capture::start(&lab.peer, "eth0")?;
    let before = agent.with(|dp| dp.counters())?;
    ensure!(
        lab.pod.ping(REMOTE_POD_V4)?,
        "strict mode dropped rescuable traffic"
    );
    let after = agent.with(|dp| dp.counters())?;
    ensure!(after.rescued == before.rescued + 1, "{after:?}");
    ensure!(after.dropped_strict == before.dropped_strict, "{after:?}");

    // Unknown again: a peered node's pods are plaintext for the cluster, dropped in strict mode.
    agent.with(|dp| dp.set_tunnel_ifindex(0))?;
    ensure!(
        !lab.pod.ping(REMOTE_POD_V4)?,
        "answered without a tunnel ifindex"
    );
    let unknown = agent.with(|dp| dp.counters())?;
    ensure!(unknown.rescued == after.rescued, "{unknown:?}");
    ensure!(
        unknown.dropped_strict == after.dropped_strict + 1 && unknown.leaked == after.leaked + 1,
        "{unknown:?}"
    );
    let clear = wire.finish_count(&REMOTE_NETS)?;
    ensure!(
        clear == 0,
        "{clear} packets left in the clear in strict mode"
    );
    ensure!(
        agent
            .attached_programs(&lab.node, UPLINK_IF, Direction::Egress)?
            .len()
            == 1
    );
    Ok(())
}

#[test]
#[ignore = "needs root + netns"]
fn tcx_guard_rescues_unsteered_traffic_into_the_tunnel() -> Result<()> {
    if !kernel_has_tcx() {
        return skip("kernel < 6.6 has no TCX");
    }
    rescue_story(AttachMode::Tcx)
}

#[test]
#[ignore = "needs root + netns"]
fn netlink_guard_rescues_unsteered_traffic_into_the_tunnel() -> Result<()> {
    rescue_story(AttachMode::Netlink)
}

/// Given a datapath pinned by a build that predates the `CLUSTER_*` tries (simulated by
/// removing their pins),
/// when it is inspected read-only, the cluster CIDRs read as empty instead of failing;
/// when the new build loads, it re-uses the old pins (CONFIG's former reserved word reads as
/// "tunnel unknown"), creates the missing tries, and cluster CIDRs can be synced.
#[test]
#[ignore = "needs root + netns"]
fn pins_without_cluster_maps_are_upgraded_in_place() -> Result<()> {
    let lab = Lab::new()?;
    let cfg = lab.config(false);
    let agent = Agent::start(&lab.node)?;
    agent.load(&cfg, AttachMode::detect())?;
    agent.with(|dp| dp.sync_remote_cidrs(&remote()))?;
    agent.with(|dp| dp.sync_cluster_cidrs(&cluster()))?;
    agent.run(|slot| *slot = None)?;
    for map in ["CLUSTER_V4", "CLUSTER_V6"] {
        std::fs::remove_file(cfg.bpffs_dir.join(map))?;
    }
    let view = Datapath::open_pinned(&cfg.bpffs_dir)?;
    ensure!(view.cluster_cidrs()?.is_empty());
    ensure!(view.remote_cidrs()? == remote());
    ensure!(view.tunnel_ifindex()? == 0);

    agent.load(&cfg, AttachMode::detect())?;
    ensure!(
        agent.with(|dp| dp.remote_cidrs())? == remote(),
        "pins not re-used"
    );
    ensure!(agent.with(|dp| dp.cluster_cidrs())?.is_empty());
    ensure!(
        agent.with(|dp| dp.sync_cluster_cidrs(&cluster()))?.added == 4,
        "cluster tries not created"
    );
    ensure!(Datapath::open_pinned(&cfg.bpffs_dir)?.cluster_cidrs()? == cluster());
    Ok(())
}
