//! Attaching the TC programs so that they outlive the agent, and adopting them on the next start.
//!
//! **TCX (kernel ≥ 6.6).** aya attaches through a bpf_link, which the kernel detaches when its
//! last reference goes away. The process's fd is one reference; the pin
//! `links/<ifname>-<direction>` is the other, and the only one kept: after attaching, the link is
//! pinned and the fd closed, so exit or SIGKILL changes nothing. On the next start the pinned link
//! is opened and `bpf_link_update` swaps the new program in atomically (`attach_to_link`); there
//! is never a moment without a program, and never a second link. A pinned link whose device is
//! gone (ifindex 0) or was re-created under the same name (another ifindex) is replaced by a fresh
//! link.
//!
//! **Netlink / cls_bpf (kernel < 6.6).** The filter lives in the device's clsact qdisc, owned by
//! the kernel; aya only deletes it when its `SchedClassifierLink` handle is dropped. wgmesh puts
//! its filter at a fixed priority and handle per direction, so a re-attach *replaces* the filter in
//! place (an RTM_NEWTFILTER without NLM_F_CREATE, atomic in cls_bpf) instead of adding a second
//! one, and the handle is `mem::forget`-ed so nothing ever deletes the filter implicitly. The
//! program is pinned under `links/` as the record of which interfaces carry a filter (bpffs holds
//! no plain files), which is what `attached_interfaces`, `forget` and `cleanup` read.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, Link as _, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
    },
    sys::SyscallError,
};

use crate::{
    AttachMode, Direction, Error,
    bpffs::{link_pin_name, remove_pin},
    pin::{self, PinnedObject},
};

/// cls_bpf filter handle of wgmesh's filters ("wg" in ASCII). Together with the priority it is
/// the filter's identity: replace and delete address exactly this filter, never someone else's.
const NETLINK_HANDLE: TcHandle = TcHandle::new(0, 0x7767);
/// Priority of the steer filter at pod veth ingress: ahead of filters that take the kernel's
/// automatic priorities (49152 and down), so a CNI filter that redirects or ends the chain cannot
/// hide the packet from us; we never end the chain ourselves.
const NETLINK_PRIORITY_STEER: u16 = 0x2000;
/// Priority of the guard filter at uplink egress: behind the automatic ones, so it judges the
/// packet as other filters leave it (e.g. after an eBPF SNAT) right before it goes on the wire.
const NETLINK_PRIORITY_GUARD: u16 = 0xfe00;

/// What an attach did, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// There was no wgmesh attachment; one was created.
    Created,
    /// The existing attachment now runs the newly loaded program.
    Replaced,
    /// A stale pin (defunct link, other mechanism) was replaced by a new attachment.
    Recreated,
}

impl From<Direction> for TcAttachType {
    fn from(direction: Direction) -> Self {
        match direction {
            Direction::Ingress => Self::Ingress,
            Direction::Egress => Self::Egress,
        }
    }
}

fn netlink_priority(direction: Direction) -> u16 {
    match direction {
        Direction::Ingress => NETLINK_PRIORITY_STEER,
        Direction::Egress => NETLINK_PRIORITY_GUARD,
    }
}

fn tcx_order(direction: Direction) -> LinkOrder {
    match direction {
        // Same reasoning as the netlink priorities above.
        Direction::Ingress => LinkOrder::first(),
        Direction::Egress => LinkOrder::last(),
    }
}

/// The errno behind an aya program error, where there is one.
fn errno(err: &ProgramError) -> Option<i32> {
    match err {
        ProgramError::NetlinkError(err) | ProgramError::TcError(TcError::NetlinkError(err)) => {
            err.raw_os_error()
        }
        ProgramError::TcError(TcError::IoError(err)) => err.raw_os_error(),
        ProgramError::SyscallError(SyscallError { io_error, .. }) => io_error.raw_os_error(),
        _ => None,
    }
}

/// One program at one hook of one interface.
pub(crate) struct Target<'a> {
    pub(crate) program: &'static str,
    pub(crate) ifname: &'a str,
    pub(crate) ifindex: u32,
    pub(crate) direction: Direction,
    pub(crate) pin: PathBuf,
}

impl<'a> Target<'a> {
    pub(crate) fn new(
        program: &'static str,
        links_dir: &Path,
        ifname: &'a str,
        ifindex: u32,
        direction: Direction,
    ) -> Self {
        Self {
            program,
            ifname,
            ifindex,
            direction,
            pin: links_dir.join(link_pin_name(ifname, direction)),
        }
    }

    fn attach_error(&self, source: ProgramError) -> Error {
        Error::Attach {
            program: self.program,
            ifname: self.ifname.to_owned(),
            direction: self.direction,
            source: Box::new(source),
        }
    }
}

/// Attaches (or adopts) `prog` at `target` so that it persists after this process.
pub(crate) fn attach(
    prog: &mut SchedClassifier,
    mode: AttachMode,
    target: &Target<'_>,
) -> Result<Outcome, Error> {
    match mode {
        AttachMode::Tcx => attach_tcx(prog, target),
        AttachMode::Netlink => attach_netlink(prog, target),
    }
}

fn attach_tcx(prog: &mut SchedClassifier, target: &Target<'_>) -> Result<Outcome, Error> {
    let existing = pin::inspect(&target.pin)?;
    if existing
        == (PinnedObject::TcxLink {
            ifindex: target.ifindex,
        })
    {
        let pinned = PinnedLink::from_pin(&target.pin).map_err(|source| Error::OpenLink {
            path: target.pin.clone(),
            source,
        })?;
        let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|source| {
            Error::OpenLink {
                path: target.pin.clone(),
                source,
            }
        })?;
        let id = prog
            .attach_to_link(link)
            .map_err(|source| Error::ReplaceLink {
                path: target.pin.clone(),
                source: Box::new(source),
            })?;
        release_tcx_link(prog, id, target)?;
        return Ok(Outcome::Replaced);
    }

    // No usable link (none, defunct, or on another ifindex because the device was re-created or
    // renamed): attach a new one first, then drop the stale pin, then pin the new link, so that a
    // stale record that still runs on this device (a cls_bpf filter from a run in netlink mode)
    // is only removed once the new program runs.
    let id = prog
        .attach_with_options(
            target.ifname,
            target.direction.into(),
            TcAttachOptions::TcxOrder(tcx_order(target.direction)),
        )
        .map_err(|source| target.attach_error(source))?;
    let link = prog
        .take_link(id)
        .map_err(|source| target.attach_error(source))?;
    let link = FdLink::try_from(link).map_err(|source| Error::OpenLink {
        path: target.pin.clone(),
        source,
    })?;
    let outcome = match existing {
        PinnedObject::Missing => Outcome::Created,
        PinnedObject::Program => {
            // Left by netlink mode: its cls_bpf filter would keep running next to the new link.
            detach_netlink(target.ifname, target.direction)?;
            remove_pin(&target.pin)?;
            Outcome::Recreated
        }
        stale => {
            tracing::info!(
                ifname = target.ifname,
                direction = %target.direction,
                pin = %target.pin.display(),
                ?stale,
                "replacing stale pinned link"
            );
            remove_pin(&target.pin)?;
            Outcome::Recreated
        }
    };
    // From here on the pin is what keeps the link attached; dropping the returned PinnedLink
    // only closes this process's fd.
    let _pinned: PinnedLink = link.pin(&target.pin).map_err(|source| Error::Pin {
        path: target.pin.clone(),
        source,
    })?;
    Ok(outcome)
}

/// Takes the (already pinned) link back from aya and closes our fd, so that dropping the program
/// later cannot detach it.
fn release_tcx_link(
    prog: &mut SchedClassifier,
    id: tc::SchedClassifierLinkId,
    target: &Target<'_>,
) -> Result<(), Error> {
    let link = prog
        .take_link(id)
        .map_err(|source| target.attach_error(source))?;
    // An FdLink only closes its fd on drop (unlike SchedClassifierLink, whose drop detaches).
    let _fd: FdLink = FdLink::try_from(link).map_err(|source| Error::OpenLink {
        path: target.pin.clone(),
        source,
    })?;
    Ok(())
}

fn attach_netlink(prog: &mut SchedClassifier, target: &Target<'_>) -> Result<Outcome, Error> {
    match tc::qdisc_add_clsact(target.ifname) {
        Ok(()) => {}
        Err(TcError::NetlinkError(err)) if err.raw_os_error() == Some(libc::EEXIST) => {}
        Err(source) => {
            return Err(Error::AddClsact {
                ifname: target.ifname.to_owned(),
                source,
            });
        }
    }
    let attach_type = TcAttachType::from(target.direction);
    let priority = netlink_priority(target.direction);
    // Replace our filter in place if it is there (no NLM_F_CREATE: ENOENT if it is not).
    let ours =
        SchedClassifierLink::attached(target.ifname, attach_type, priority, NETLINK_HANDLE, None)
            .map_err(|source| Error::NoSuchInterface {
            ifname: target.ifname.to_owned(),
            source,
        })?;
    let (id, mut outcome) = match prog.attach_to_link(ours) {
        Ok(id) => (id, Outcome::Replaced),
        Err(err) if errno(&err) == Some(libc::ENOENT) => {
            let id = prog
                .attach_with_options(
                    target.ifname,
                    attach_type,
                    TcAttachOptions::Netlink(NlOptions {
                        priority,
                        handle: NETLINK_HANDLE,
                        classid: None,
                    }),
                )
                .map_err(|source| target.attach_error(source))?;
            (id, Outcome::Created)
        }
        Err(source) => return Err(target.attach_error(source)),
    };
    let link = prog
        .take_link(id)
        .map_err(|source| target.attach_error(source))?;
    // The filter belongs to the qdisc and must outlive this process. Dropping the handle would
    // delete it (aya detaches netlink links on drop), so the handle is leaked on purpose. It owns
    // no fd or heap memory (ifindex, attach type, priority, handle), so nothing is lost.
    std::mem::forget(link);

    // Record the attachment by pinning the program (re-pinned so the record names the program
    // that now runs, and the previous program is freed).
    match pin::inspect(&target.pin)? {
        PinnedObject::Missing | PinnedObject::Program => {}
        stale => {
            // A TCX link from an earlier run: unpinning it detaches it, now that the filter runs.
            tracing::info!(
                ifname = target.ifname,
                direction = %target.direction,
                pin = %target.pin.display(),
                ?stale,
                "replacing stale pinned link"
            );
            outcome = Outcome::Recreated;
        }
    }
    remove_pin(&target.pin)?;
    prog.pin(&target.pin).map_err(|source| Error::Pin {
        path: target.pin.clone(),
        source,
    })?;
    Ok(outcome)
}

/// Deletes wgmesh's cls_bpf filter at `direction` of `ifname`. Returns whether one was there; a
/// missing interface, qdisc or filter is success.
pub(crate) fn detach_netlink(ifname: &str, direction: Direction) -> Result<bool, Error> {
    let link = match SchedClassifierLink::attached(
        ifname,
        direction.into(),
        netlink_priority(direction),
        NETLINK_HANDLE,
        None,
    ) {
        Ok(link) => link,
        Err(err) if err.raw_os_error() == Some(libc::ENODEV) => return Ok(false),
        Err(source) => {
            return Err(Error::NoSuchInterface {
                ifname: ifname.to_owned(),
                source,
            });
        }
    };
    match link.detach() {
        Ok(()) => Ok(true),
        // ENOENT: no such filter. EINVAL: no clsact qdisc to delete it from.
        Err(err) if matches!(errno(&err), Some(libc::ENOENT | libc::EINVAL)) => Ok(false),
        Err(source) => Err(Error::Detach {
            ifname: ifname.to_owned(),
            direction,
            source: Box::new(source),
        }),
    }
}

/// Removes the attachment recorded at `pin` for `ifname`/`direction`: a pinned TCX link is
/// detached by removing its last reference (the pin); a netlink record also has its filter
/// deleted. Returns whether anything was there.
pub(crate) fn remove(pin_path: &Path, ifname: &str, direction: Direction) -> Result<bool, Error> {
    let existing = pin::inspect(pin_path)?;
    let filter_removed = match existing {
        PinnedObject::Program => detach_netlink(ifname, direction)?,
        _ => false,
    };
    let pin_removed = remove_pin(pin_path)?;
    Ok(filter_removed || pin_removed)
}

/// The ifindex of `ifname` in this thread's network namespace.
pub(crate) fn ifindex(ifname: &str) -> Result<u32, Error> {
    nix::net::if_::if_nametoindex(ifname).map_err(|errno| Error::NoSuchInterface {
        ifname: ifname.to_owned(),
        source: io::Error::from(errno),
    })
}
