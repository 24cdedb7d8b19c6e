//! Privileged scenarios: the datapath on a simulated node made of network namespaces (see
//! `netns_lab`). They need root, `ip`, `tc`, `ping` and `mount -t bpf`; run them with
//! `cargo test -p wgmesh-datapath -- --ignored`. Each scenario builds its own uniquely named
//! namespaces and bpffs mount, so they can run in parallel, and tears everything down on failure.

mod netns_lab;

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddrV4},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use ipnet::IpNet;
use netns_lab::*;
use wgmesh_datapath::{
    AttachMode, Counters, Datapath, DatapathConfig, Direction, Error, SyncStats,
    bench::{self, SkbRun},
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

fn hosts(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter()
        .map(|addr| addr.parse().expect("test address"))
        .collect()
}

/// The other nodes' host addresses of the lab: the peer's, both families.
fn peer_hosts() -> BTreeSet<IpAddr> {
    hosts(&[PEER_V4, PEER_V6])
}

/// `BPF_PROG_TEST_RUN` verdicts (`TC_ACT_UNSPEC` reads as `u32::MAX`).
const TC_ACT_UNSPEC: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
/// A mark bit outside wgmesh's mask (kube-proxy's masquerade bit): must survive steering.
const FOREIGN_MARK: u32 = 0x4000;
/// WireGuard's port: the node-to-node UDP the guard must let through.
const WG_PORT: u16 = 51820;

/// An Ethernet + IP + UDP frame from `src` to `dst` (both of one family) with 16 payload bytes.
fn udp_frame(src: &str, dst: &str, port: u16) -> Result<Vec<u8>> {
    match (src.parse::<IpAddr>()?, dst.parse::<IpAddr>()?) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => Ok(bench::udp_frame(
            SocketAddrV4::new(src, port),
            SocketAddrV4::new(dst, port),
            16,
        )),
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            const PAYLOAD: usize = 16;
            let udp_len = u16::try_from(8 + PAYLOAD)?;
            let mut frame = Vec::new();
            frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01]);
            frame.extend_from_slice(&0x86ddu16.to_be_bytes());
            frame.extend_from_slice(&[0x60, 0, 0, 0]);
            frame.extend_from_slice(&udp_len.to_be_bytes());
            frame.extend_from_slice(&[17, 64]); // next header UDP, hop limit
            frame.extend_from_slice(&src.octets());
            frame.extend_from_slice(&dst.octets());
            frame.extend_from_slice(&port.to_be_bytes());
            frame.extend_from_slice(&port.to_be_bytes());
            frame.extend_from_slice(&udp_len.to_be_bytes());
            frame.extend_from_slice(&[0, 0]); // checksum: never looked at by the programs
            frame.resize(14 + 40 + usize::from(udp_len), 0);
            Ok(frame)
        }
        (src, dst) => anyhow::bail!("mixed families: {src} -> {dst}"),
    }
}

/// Runs `program` once (`BPF_PROG_TEST_RUN`) on the agent's datapath, on a UDP frame from `src`
/// to `dst` whose skb carries `mark`. Returns the verdict and the mark the program left, and the
/// frame's length.
fn skb_run(
    agent: &Agent,
    program: &'static str,
    (src, dst, port): (&str, &str, u16),
    mark: u32,
) -> Result<(SkbRun, u64)> {
    let frame = udp_frame(src, dst, port)?;
    let len = u64::try_from(frame.len())?;
    let run = agent.run(move |slot| -> Result<SkbRun> {
        let dp = slot.as_mut().context("no datapath loaded")?;
        Ok(dp.test_run_skb(program, &frame, mark)?)
    })??;
    Ok((run, len))
}

/// What `wgmesh_steer` does with one packet: checks that it never ends the chain, that it keeps
/// the foreign mark bit, and that the mark and the counters agree. Returns whether the packet was
/// marked for the tunnel.
fn steered(agent: &Agent, src: &str, dst: &str) -> Result<bool> {
    let before = agent.with(|dp| dp.counters())?;
    let (run, len) = skb_run(agent, "wgmesh_steer", (src, dst, 4000), FOREIGN_MARK)?;
    let after = agent.with(|dp| dp.counters())?;
    ensure!(run.retval == TC_ACT_UNSPEC, "{src} -> {dst}: {run:?}");
    let marked = match run.mark {
        mark if mark == FOREIGN_MARK | FWMARK => true,
        FOREIGN_MARK => false,
        other => anyhow::bail!("{src} -> {dst}: mark {other:#x}"),
    };
    let expected = if marked {
        Counters {
            steered: before.steered + 1,
            steered_bytes: before.steered_bytes + len,
            ..before.clone()
        }
    } else {
        Counters {
            passed: before.passed + 1,
            ..before.clone()
        }
    };
    ensure!(
        after == expected,
        "{src} -> {dst} (marked: {marked}): {before:?} -> {after:?}"
    );
    Ok(marked)
}

/// What `wgmesh_guard` does with one WireGuard-port UDP packet from `src` to `dst` (mark 0):
/// the verdict and the counters after it.
fn guarded(agent: &Agent, src: &str, dst: &str) -> Result<(u32, Counters, Counters)> {
    let before = agent.with(|dp| dp.counters())?;
    let (run, _) = skb_run(agent, "wgmesh_guard", (src, dst, WG_PORT), 0)?;
    let after = agent.with(|dp| dp.counters())?;
    ensure!(run.mark == 0, "the guard marked {src} -> {dst}: {run:?}");
    Ok((run.retval, before, after))
}

/// The guard lets `src -> dst` pass untouched, counted only as passed.
fn guard_passes(agent: &Agent, src: &str, dst: &str) -> Result<()> {
    let (verdict, before, after) = guarded(agent, src, dst)?;
    ensure!(
        verdict == TC_ACT_UNSPEC,
        "{src} -> {dst}: verdict {verdict}"
    );
    ensure!(
        after
            == Counters {
                uplink_passed: before.uplink_passed + 1,
                ..before.clone()
            },
        "{src} -> {dst}: {before:?} -> {after:?}"
    );
    Ok(())
}

/// Given a loaded datapath with remote, cluster and local pod CIDRs and the peer's host addresses
/// in `PEER_HOSTS_*`,
/// when a pod sends to a peer host address (IPv4, IPv6),
/// then `wgmesh_steer` sets the wgmesh mark bits (keeping the others), counts it as steered, and
/// does so for nothing else: not for the address next to it (exact match), not for the internet;
/// remote pod CIDRs are steered as before;
/// when the node (WireGuard's UDP) or a pod sends to a peer host address through the uplink,
/// then `wgmesh_guard` passes it untouched, counted only as uplink-passed, even with rescue live
/// (tunnel ifindex known) and in strict mode, where the same packet to a cluster pod CIDR is
/// counted as leaked (dropped);
/// when the peer hosts are synced away,
/// then packets to them are no longer marked.
#[test]
#[ignore = "needs root + netns"]
fn steer_marks_peer_host_addresses_and_the_guard_ignores_them() -> Result<()> {
    let lab = Lab::new()?;
    let cfg = DatapathConfig {
        // The node's loopback: a live redirect target, so the guard's rescue path is armed.
        tunnel_ifindex: 1,
        ..lab.config(false)
    };
    let agent = Agent::start(&lab.node)?;
    agent.load(&cfg, AttachMode::detect())?;
    agent.with(|dp| dp.sync_local_cidrs(&local()))?;
    agent.with(|dp| dp.sync_remote_cidrs(&remote()))?;
    agent.with(|dp| dp.sync_cluster_cidrs(&cluster()))?;
    ensure!(
        agent.with(|dp| dp.sync_peer_hosts(&peer_hosts()))?
            == SyncStats {
                added: 2,
                removed: 0
            }
    );
    ensure!(agent.with(|dp| dp.peer_hosts())? == peer_hosts());

    for (src, dst, marked) in [
        (POD_V4, PEER_V4, true),
        (POD_V6, PEER_V6, true),
        (POD_V4, "198.18.100.3", false),
        (POD_V6, "2001:db8:100::3", false),
        (POD_V4, NODE_V4, false),
        (POD_V4, INTERNET_V4, false),
        (POD_V6, INTERNET_V6, false),
        (POD_V4, REMOTE_POD_V4, true),
        (POD_V6, REMOTE_POD_V6, true),
    ] {
        ensure!(
            steered(&agent, src, dst)? == marked,
            "steer {src} -> {dst}: expected marked = {marked}"
        );
    }

    // The guard: node-to-node traffic to the peer hosts passes, whoever sends it.
    for (src, dst) in [
        (NODE_V4, PEER_V4),
        (NODE_V6, PEER_V6),
        (POD_V4, PEER_V4),
        (POD_V6, PEER_V6),
    ] {
        guard_passes(&agent, src, dst)?;
    }
    // The same guard does leak-count and rescue, so passing above means something.
    let (verdict, before, after) = guarded(&agent, NODE_V4, CLUSTER_ONLY_POD_V4)?;
    ensure!(verdict == TC_ACT_UNSPEC && after.leaked == before.leaked + 1);
    let (verdict, before, after) = guarded(&agent, POD_V4, REMOTE_POD_V4)?;
    ensure!(verdict == TC_ACT_REDIRECT && after.rescued == before.rescued + 1);

    // Strict mode: still untouched, while a cluster pod CIDR is dropped.
    agent.load(
        &DatapathConfig {
            strict: true,
            ..cfg.clone()
        },
        AttachMode::detect(),
    )?;
    ensure!(
        agent.with(|dp| dp.peer_hosts())? == peer_hosts(),
        "peer hosts not re-used"
    );
    guard_passes(&agent, NODE_V4, PEER_V4)?;
    guard_passes(&agent, NODE_V6, PEER_V6)?;
    let (verdict, before, after) = guarded(&agent, NODE_V4, CLUSTER_ONLY_POD_V4)?;
    ensure!(
        verdict == TC_ACT_SHOT && after.dropped_strict == before.dropped_strict + 1,
        "{verdict}: {after:?}"
    );
    ensure!(steered(&agent, POD_V4, PEER_V4)?);

    ensure!(
        agent.with(|dp| dp.sync_peer_hosts(&BTreeSet::new()))?
            == SyncStats {
                added: 0,
                removed: 2
            }
    );
    ensure!(agent.with(|dp| dp.peer_hosts())?.is_empty());
    ensure!(!steered(&agent, POD_V4, PEER_V4)?, "still steered");
    ensure!(!steered(&agent, POD_V6, PEER_V6)?, "still steered");
    ensure!(steered(&agent, POD_V4, REMOTE_POD_V4)?);
    Ok(())
}

/// Given a loaded datapath,
/// when the peer host addresses change, the maps end up holding exactly the new set: only the
/// difference is written (the counts say so), a repeated sync writes nothing, a value left by
/// another build is rewritten, the read-only view agrees, and steering follows;
/// when more addresses than a map holds are asked for, nothing is written;
/// when a full map is replaced by another full set (no room for both), the result is still exact.
#[test]
#[ignore = "needs root + netns"]
fn peer_host_sync_is_level_triggered() -> Result<()> {
    let lab = Lab::new()?;
    let cfg = lab.config(false);
    let agent = Agent::start(&lab.node)?;
    agent.load(&cfg, AttachMode::detect())?;
    agent.with(|dp| dp.sync_remote_cidrs(&remote()))?;
    let first = hosts(&[
        "198.18.100.2",
        "198.18.100.3",
        "198.18.100.4",
        "2001:db8:100::2",
    ]);
    let synced = first.clone();
    ensure!(
        agent.with(move |dp| dp.sync_peer_hosts(&synced))?
            == SyncStats {
                added: 4,
                removed: 0
            }
    );
    ensure!(agent.with(|dp| dp.peer_hosts())? == first);
    let synced = first.clone();
    ensure!(agent.with(move |dp| dp.sync_peer_hosts(&synced))? == SyncStats::default());

    let second = hosts(&["198.18.100.3", "2001:db8:100::7"]);
    let synced = second.clone();
    ensure!(
        agent.with(move |dp| dp.sync_peer_hosts(&synced))?
            == SyncStats {
                added: 1,
                removed: 3
            }
    );
    ensure!(agent.with(|dp| dp.peer_hosts())? == second);
    ensure!(Datapath::open_pinned(&cfg.bpffs_dir)?.peer_hosts()? == second);
    ensure!(
        agent.with(|dp| dp.remote_cidrs())? == remote(),
        "remote touched"
    );
    for (dst, marked) in [
        ("198.18.100.2", false),
        ("198.18.100.3", true),
        ("198.18.100.4", false),
        ("2001:db8:100::2", false),
        ("2001:db8:100::7", true),
    ] {
        let src = if dst.contains(':') { POD_V6 } else { POD_V4 };
        ensure!(steered(&agent, src, dst)? == marked, "{dst}");
    }

    // A value other than "present" (another build's flag) is rewritten, and counted as written.
    let pin = cfg.bpffs_dir.join("PEER_HOSTS_V4");
    let mut raw: aya::maps::HashMap<_, [u8; 4], u32> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(aya::maps::MapData::from_pin(&pin)?))?;
    raw.insert([198, 18, 100, 3], 7, 0)?;
    let synced = second.clone();
    ensure!(
        agent.with(move |dp| dp.sync_peer_hosts(&synced))?
            == SyncStats {
                added: 1,
                removed: 0
            }
    );
    ensure!(raw.get(&[198, 18, 100, 3], 0)? == 1);

    // Beyond capacity: refused before anything is written.
    let v4 = |first: u32, count: u32| -> BTreeSet<IpAddr> {
        (first..first + count)
            .map(|i| IpAddr::V4((0x0a00_0000 + i).into()))
            .collect()
    };
    let too_many = v4(0, 16_385);
    let refused = agent.run(move |slot| {
        slot.as_mut()
            .map(|dp| dp.sync_peer_hosts(&too_many))
            .context("no datapath")
    })??;
    ensure!(
        matches!(refused, Err(Error::TooManyCidrs { .. })),
        "{refused:?}"
    );
    ensure!(agent.with(|dp| dp.peer_hosts())? == second);

    // Full, then another full set sharing half of it: no room for old and new at once.
    let full = v4(0, 16_384);
    ensure!(
        agent.with(move |dp| dp.sync_peer_hosts(&full))?
            == SyncStats {
                added: 16_384,
                removed: 2
            }
    );
    let shifted = v4(8_192, 16_384);
    let synced = shifted.clone();
    ensure!(
        agent.with(move |dp| dp.sync_peer_hosts(&synced))?
            == SyncStats {
                added: 8_192,
                removed: 8_192
            }
    );
    ensure!(agent.with(|dp| dp.peer_hosts())? == shifted);
    ensure!(steered(&agent, POD_V4, "10.0.32.0")?, "first address");
    ensure!(steered(&agent, POD_V4, "10.0.95.255")?, "last address");
    ensure!(!steered(&agent, POD_V4, "10.0.31.255")?, "removed address");
    ensure!(!steered(&agent, POD_V4, "10.0.96.0")?, "never added");
    ensure!(
        agent.with(|dp| dp.sync_peer_hosts(&BTreeSet::new()))?
            == SyncStats {
                added: 0,
                removed: 16_384
            }
    );
    ensure!(agent.with(|dp| dp.peer_hosts())?.is_empty());
    Ok(())
}

/// Given a datapath pinned by a build that predates the `PEER_HOSTS_*` maps (simulated by
/// removing their pins) with steering attached,
/// when it is inspected read-only, the peer hosts read as empty and everything else as before;
/// when the new build loads over the old pins, it re-uses them (steering never stops), creates
/// the missing maps, and peer hosts can be synced, read back through the pins and are steered;
/// cleanup removes the new pins too.
#[test]
#[ignore = "needs root + netns"]
fn pins_without_peer_host_maps_are_upgraded_in_place() -> Result<()> {
    let lab = Lab::new()?;
    let cfg = lab.config(false);
    let agent = Agent::start(&lab.node)?;
    agent.load(&cfg, AttachMode::detect())?;
    agent.with(|dp| dp.attach_pod_interface(POD_IF))?;
    agent.with(|dp| dp.sync_local_cidrs(&local()))?;
    agent.with(|dp| dp.sync_remote_cidrs(&remote()))?;
    agent.with(|dp| dp.sync_cluster_cidrs(&cluster()))?;
    agent.with(|dp| dp.sync_peer_hosts(&peer_hosts()))?;
    agent.run(|slot| *slot = None)?;
    for map in ["PEER_HOSTS_V4", "PEER_HOSTS_V6"] {
        std::fs::remove_file(cfg.bpffs_dir.join(map))?;
    }
    let view = Datapath::open_pinned(&cfg.bpffs_dir)?;
    ensure!(view.peer_hosts()?.is_empty());
    ensure!(view.remote_cidrs()? == remote());
    ensure!(view.cluster_cidrs()? == cluster());
    ensure!(view.attached_interfaces()? == vec![(POD_IF.to_owned(), Direction::Ingress)]);
    ensure!(lab.pod.ping(REMOTE_POD_V4)?, "steering stopped");

    agent.load(&cfg, AttachMode::detect())?;
    ensure!(
        agent.with(|dp| dp.remote_cidrs())? == remote(),
        "pins not re-used"
    );
    ensure!(agent.with(|dp| dp.cluster_cidrs())? == cluster());
    ensure!(agent.with(|dp| dp.peer_hosts())?.is_empty());
    for map in ["PEER_HOSTS_V4", "PEER_HOSTS_V6"] {
        ensure!(cfg.bpffs_dir.join(map).exists(), "{map} not pinned on load");
    }
    agent.with(|dp| dp.attach_pod_interface(POD_IF))?;
    ensure!(lab.pod.ping(REMOTE_POD_V4)?, "steering lost in the upgrade");
    ensure!(
        agent.with(|dp| dp.sync_peer_hosts(&peer_hosts()))?
            == SyncStats {
                added: 2,
                removed: 0
            },
        "peer host maps not created"
    );
    ensure!(Datapath::open_pinned(&cfg.bpffs_dir)?.peer_hosts()? == peer_hosts());
    ensure!(steered(&agent, POD_V4, PEER_V4)?);
    ensure!(steered(&agent, POD_V6, PEER_V6)?);

    let dir = cfg.bpffs_dir.clone();
    agent.run(move |slot| {
        *slot = None;
        Datapath::cleanup(&dir)
    })??;
    let pins = lab.bpffs.pins()?;
    ensure!(pins.is_empty(), "pins left after cleanup: {pins:?}");
    Ok(())
}

/// Given a node with the steer program on the pod veth and the guard on the uplink, whose pods
/// reach the peer's host address over the plaintext uplink,
/// when the agent puts the peer's addresses into the peer host set,
/// then the pod's packets to them are marked, routed into the tunnel (seen at its far end, which
/// does not own them, so pings go unanswered) and counted as steered, and none reaches the peer
/// in the clear; the node's own packets to them still leave through the uplink, answered, and
/// are never counted as leaked, in strict mode too;
/// when the peer hosts are removed again,
/// then the pod reaches the peer over the uplink as before.
#[test]
#[ignore = "needs root + netns"]
fn pod_traffic_to_peer_hosts_enters_the_tunnel_and_node_traffic_passes_the_guard() -> Result<()> {
    let lab = Lab::new()?;
    let agent = Agent::start(&lab.node)?;
    let load = |strict: bool| -> Result<()> {
        agent.load(&lab.config(strict), AttachMode::detect())?;
        agent.with(|dp| dp.attach_pod_interface(POD_IF))?;
        agent.with(|dp| dp.attach_uplink(UPLINK_IF))?;
        Ok(())
    };
    load(false)?;
    agent.with(|dp| dp.sync_local_cidrs(&local()))?;
    agent.with(|dp| dp.sync_remote_cidrs(&remote()))?;
    agent.with(|dp| dp.sync_cluster_cidrs(&cluster()))?;
    ensure!(
        lab.pod.ping(PEER_V4)?,
        "pod -> peer host (IPv4): the lab is miswired"
    );
    ensure!(
        lab.pod.ping(PEER_V6)?,
        "pod -> peer host (IPv6): the lab is miswired"
    );

    agent.with(|dp| dp.sync_peer_hosts(&peer_hosts()))?;
    let peer_nets = ["198.18.100.2/32", "2001:db8:100::2/128"];
    let pod_to_peer_hosts_is_steered = || -> Result<()> {
        let before = agent.with(|dp| dp.counters())?;
        let tunnel_tx = lab.node.tx_packets(TUNNEL_IF)?;
        let wire = Capture::start(&lab.peer, "eth0")?;
        let far_end = Capture::start(&lab.tun, "eth0")?;
        ensure!(!lab.pod.ping(PEER_V4)?, "IPv4 answered: not steered");
        ensure!(!lab.pod.ping(PEER_V6)?, "IPv6 answered: not steered");
        let after = agent.with(|dp| dp.counters())?;
        ensure!(after.steered >= before.steered + 2, "{after:?}");
        ensure!(lab.node.tx_packets(TUNNEL_IF)? >= tunnel_tx + 2);
        let tunneled = far_end.finish_count(&peer_nets)?;
        ensure!(
            tunneled == 2,
            "{tunneled} packets at the tunnel's far end, not 2"
        );
        let clear = wire.finish_count(&peer_nets)?;
        ensure!(
            clear == 0,
            "{clear} pod packets reached the peer in the clear"
        );
        Ok(())
    };
    pod_to_peer_hosts_is_steered()?;

    let node_to_peer_hosts_passes = || -> Result<()> {
        let before = agent.with(|dp| dp.counters())?;
        ensure!(lab.node.ping(PEER_V4)?, "node -> peer host (IPv4) blocked");
        ensure!(lab.node.ping(PEER_V6)?, "node -> peer host (IPv6) blocked");
        let after = agent.with(|dp| dp.counters())?;
        ensure!(after.uplink_passed >= before.uplink_passed + 2, "{after:?}");
        ensure!(
            (after.leaked, after.dropped_strict, after.rescued)
                == (before.leaked, before.dropped_strict, before.rescued),
            "{before:?} -> {after:?}"
        );
        Ok(())
    };
    node_to_peer_hosts_passes()?;

    load(true)?;
    node_to_peer_hosts_passes()?;
    pod_to_peer_hosts_is_steered()?;

    ensure!(
        agent.with(|dp| dp.sync_peer_hosts(&BTreeSet::new()))?
            == SyncStats {
                added: 0,
                removed: 2
            }
    );
    ensure!(
        lab.pod.ping(PEER_V4)?,
        "pod -> peer host (IPv4) after removal"
    );
    ensure!(
        lab.pod.ping(PEER_V6)?,
        "pod -> peer host (IPv6) after removal"
    );
    Ok(())
}
