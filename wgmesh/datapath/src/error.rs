//! `datapath::Error`: one variant per failing operation, naming the object it failed on.

use std::{io, path::PathBuf};

use aya::{
    maps::MapError,
    pin::PinError,
    programs::{ProgramError, links::LinkError, tc::TcError},
};

use crate::{Direction, maps::MapShape};

/// Errors of the datapath. Messages never repeat their source; print the chain (`{:#}` with
/// anyhow) to see the kernel's answer. aya's large error types are boxed to keep `Result`s small.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `fwmark`/`fwmask` cannot work as a policy-routing mark.
    #[error(
        "invalid fwmark {fwmark:#x}/{fwmask:#x}: the mark must be non-zero and all its bits must be inside the mask"
    )]
    InvalidMark {
        /// The configured mark.
        fwmark: u32,
        /// The configured mask.
        fwmask: u32,
    },
    /// The bpffs directory path cannot be used at all (empty, or contains a NUL byte).
    #[error("invalid bpffs directory {path:?}")]
    InvalidBpffsDir {
        /// The path given.
        path: PathBuf,
    },
    /// The bpffs directory is not on a bpf filesystem.
    #[error(
        "{path} is not on a bpf filesystem: mount one first (`mount -t bpf bpf /sys/fs/bpf`; in Kubernetes hostPath-mount the node's /sys/fs/bpf) and use a directory inside it"
    )]
    NotBpffs {
        /// The directory given.
        path: PathBuf,
    },
    /// Nothing is pinned there: the agent has not loaded the datapath with this directory on
    /// this node, or it was cleaned up.
    #[error("no wgmesh datapath is pinned under {path}")]
    NoPins {
        /// The directory given.
        path: PathBuf,
    },
    /// `statfs` on the bpffs directory failed.
    #[error("failed to inspect the file system of {path}")]
    InspectBpffs {
        /// The directory inspected.
        path: PathBuf,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// Creating a directory under bpffs failed.
    #[error("failed to create directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Removing a directory under bpffs failed.
    #[error("failed to remove directory {path}")]
    RemoveDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Listing a directory under bpffs failed.
    #[error("failed to list {path}")]
    ListDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The crate was compiled with `AYA_BUILD_SKIP=1`, so it embeds no eBPF object.
    #[error(
        "this build embeds no eBPF object (it was compiled with AYA_BUILD_SKIP); rebuild without it"
    )]
    ObjectNotBuilt,
    /// A map pin left by another build has a different shape.
    #[error(
        "pinned map {map} at {path} has shape [{found}] but this build needs [{expected}]; remove the old pins with `wgmesh-agent cleanup` (this interrupts steering until the agent starts again)"
    )]
    IncompatiblePinnedMap {
        /// The map name.
        map: &'static str,
        /// Its pin.
        path: PathBuf,
        /// What this build declares.
        expected: MapShape,
        /// What the pinned map is.
        found: MapShape,
    },
    /// Reading the properties of a pinned map failed.
    #[error("failed to inspect pinned map {path}")]
    InspectPinnedMap {
        /// The pin.
        path: PathBuf,
        /// The aya error.
        #[source]
        source: Box<MapError>,
    },
    /// Opening a pinned map failed (read-only view).
    #[error("failed to open pinned map {path}")]
    OpenPinnedMap {
        /// The pin.
        path: PathBuf,
        /// The aya error.
        #[source]
        source: Box<MapError>,
    },
    /// Loading the object (creating or re-using its maps) failed.
    #[error("failed to load the eBPF object with maps pinned under {bpffs_dir}")]
    LoadObject {
        /// Where the maps are pinned.
        bpffs_dir: PathBuf,
        /// The aya error.
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// The object lacks a map this crate expects (object and crate out of step).
    #[error("the eBPF object has no map {map}")]
    MissingMap {
        /// The map name.
        map: &'static str,
    },
    /// The object lacks a program this crate expects.
    #[error("the eBPF object has no TC program {program}")]
    MissingProgram {
        /// The program name.
        program: &'static str,
    },
    /// A map has another type or key/value size than this crate expects.
    #[error("map {map} does not have the expected type or key/value size")]
    MapType {
        /// The map name.
        map: &'static str,
        /// The aya error.
        #[source]
        source: Box<MapError>,
    },
    /// The verifier (or the kernel) refused a program.
    #[error("failed to load program {program} into the kernel")]
    LoadProgram {
        /// The program name.
        program: &'static str,
        /// The aya error (the verifier log, if any, is in it).
        #[source]
        source: Box<ProgramError>,
    },
    /// Reading a map failed.
    #[error("failed to read map {map}")]
    MapRead {
        /// The map name.
        map: &'static str,
        /// The aya error.
        #[source]
        source: Box<MapError>,
    },
    /// Writing a map value failed.
    #[error("failed to write map {map}")]
    MapWrite {
        /// The map name.
        map: &'static str,
        /// The aya error.
        #[source]
        source: Box<MapError>,
    },
    /// Mapping a map into the agent's memory failed.
    #[error("failed to mmap map {map}")]
    MapMmap {
        /// The map name.
        map: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Inserting a CIDR failed.
    #[error("failed to insert {cidr} into map {map}")]
    MapInsert {
        /// The map name.
        map: &'static str,
        /// The CIDR.
        cidr: String,
        /// The aya error.
        #[source]
        source: Box<MapError>,
    },
    /// Deleting a CIDR failed.
    #[error("failed to delete {cidr} from map {map}")]
    MapDelete {
        /// The map name.
        map: &'static str,
        /// The CIDR.
        cidr: String,
        /// The aya error.
        #[source]
        source: Box<MapError>,
    },
    /// More CIDRs than the map can hold; nothing was written.
    #[error("map {map} cannot hold {wanted} CIDRs (capacity {capacity})")]
    TooManyCidrs {
        /// The map name.
        map: &'static str,
        /// How many were asked for.
        wanted: usize,
        /// The map's capacity.
        capacity: u32,
    },
    /// The interface name is not one the kernel would accept.
    #[error("invalid interface name {ifname:?}")]
    InvalidInterfaceName {
        /// The name given.
        ifname: String,
    },
    /// No interface of that name in the current network namespace.
    #[error("no interface {ifname} in this network namespace")]
    NoSuchInterface {
        /// The name.
        ifname: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Adding the clsact qdisc (netlink mode) failed.
    #[error("failed to add the clsact qdisc to {ifname}")]
    AddClsact {
        /// The interface.
        ifname: String,
        /// The aya error.
        #[source]
        source: TcError,
    },
    /// Attaching a program failed.
    #[error("failed to attach {program} at {direction} of {ifname}")]
    Attach {
        /// The program name.
        program: &'static str,
        /// The interface.
        ifname: String,
        /// The hook.
        direction: Direction,
        /// The aya error.
        #[source]
        source: Box<ProgramError>,
    },
    /// Replacing the program inside a pinned TCX link failed.
    #[error("failed to replace the program in pinned link {path}")]
    ReplaceLink {
        /// The link pin.
        path: PathBuf,
        /// The aya error.
        #[source]
        source: Box<ProgramError>,
    },
    /// Detaching a netlink (cls_bpf) filter failed.
    #[error("failed to detach the wgmesh filter at {direction} of {ifname}")]
    Detach {
        /// The interface.
        ifname: String,
        /// The hook.
        direction: Direction,
        /// The aya error.
        #[source]
        source: Box<ProgramError>,
    },
    /// Opening a pin failed.
    #[error("failed to open pin {path}")]
    OpenPin {
        /// The pin.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Opening a pinned link as a TCX link failed.
    #[error("failed to open pinned link {path}")]
    OpenLink {
        /// The pin.
        path: PathBuf,
        /// The aya error.
        #[source]
        source: LinkError,
    },
    /// Pinning a link or program failed.
    #[error("failed to pin at {path}")]
    Pin {
        /// The pin path.
        path: PathBuf,
        /// The aya error.
        #[source]
        source: PinError,
    },
    /// Removing a pin failed.
    #[error("failed to remove pin {path}")]
    Unpin {
        /// The pin.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}
