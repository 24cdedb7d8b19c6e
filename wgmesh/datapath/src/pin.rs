//! What a pin in `links/` refers to: a TCX link (and on which interface), a program, or nothing.
//!
//! aya 0.14 can open a pinned link but does not expose which interface a TCX link is attached to,
//! and its typed accessors would misread a pinned *program* as a link. So the pin is opened with a
//! plain `BPF_OBJ_GET` and classified from the kernel's `/proc/self/fdinfo/<fd>` text, which names
//! the object kind (`link_type:` vs `prog_type:`) and, for TCX links, the `ifindex` (0 once the
//! device is gone and the link is defunct).

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use crate::Error;

/// `BPF_OBJ_GET` from `enum bpf_cmd` (include/uapi/linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;

/// The object behind a pin, as far as wgmesh cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PinnedObject {
    /// No pin at that path.
    Missing,
    /// A TCX link; `ifindex` is 0 when its device disappeared (the link is defunct).
    TcxLink { ifindex: u32 },
    /// Another kind of link (never created by wgmesh).
    OtherLink { link_type: String },
    /// A program (what wgmesh pins per interface in netlink mode).
    Program,
    /// A map or anything else.
    Other,
}

/// Opens the pin at `path` and classifies it.
pub(crate) fn inspect(path: &Path) -> Result<PinnedObject, Error> {
    let fd = match obj_get(path) {
        Ok(fd) => fd,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(PinnedObject::Missing),
        Err(source) => {
            return Err(Error::OpenPin {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let fdinfo_path = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    let fdinfo = fs::read_to_string(&fdinfo_path).map_err(|source| Error::OpenPin {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(classify_fdinfo(&fdinfo))
}

/// `BPF_OBJ_GET`: a new fd for the object pinned at `path`.
fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    /// The `BPF_OBJ_*` member of `union bpf_attr`, up to `file_flags`. Passing exactly this size
    /// keeps every field the kernel knows beyond it zero, as it requires; all fields are `u64`/`u32`
    /// so the struct has no padding bytes.
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }

    let pathname = CString::new(path.as_os_str().as_bytes())
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
    let attr = ObjGetAttr {
        pathname: pathname.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: `attr` is a valid, fully initialized `bpf_attr` prefix of the size passed, and
    // `pathname` (which it points into) outlives the call; BPF_OBJ_GET only reads them.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw const attr,
            size_of::<ObjGetAttr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let raw_fd = i32::try_from(ret).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: on success BPF_OBJ_GET returns a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw_fd) })
}

/// Classifies an object from its fdinfo text (pure, for tests).
pub(crate) fn classify_fdinfo(fdinfo: &str) -> PinnedObject {
    let field = |name: &str| {
        fdinfo.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == name).then(|| value.trim().to_owned())
        })
    };
    if let Some(link_type) = field("link_type") {
        if link_type != "tcx" {
            return PinnedObject::OtherLink { link_type };
        }
        // Kernels print the device's ifindex, or 0 once the device is gone.
        let ifindex = field("ifindex")
            .and_then(|value| value.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        return PinnedObject::TcxLink { ifindex };
    }
    if field("prog_type").is_some() {
        return PinnedObject::Program;
    }
    PinnedObject::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tcx_link_reports_its_ifindex() {
        let fdinfo = "pos:\t0\nflags:\t02000000\nmnt_id:\t15\nino:\t2079\nlink_type:\ttcx\n\
                      link_id:\t7\nprog_tag:\t0123456789abcdef\nprog_id:\t42\nifindex:\t3\n\
                      attach_type:\t46\n";
        assert_eq!(
            classify_fdinfo(fdinfo),
            PinnedObject::TcxLink { ifindex: 3 }
        );
    }

    #[test]
    fn a_defunct_tcx_link_reports_ifindex_zero() {
        let fdinfo = "link_type:\ttcx\nlink_id:\t7\nprog_id:\t42\nifindex:\t0\nattach_type:\t46\n";
        assert_eq!(
            classify_fdinfo(fdinfo),
            PinnedObject::TcxLink { ifindex: 0 }
        );
    }

    #[test]
    fn a_program_is_not_a_link() {
        let fdinfo = "pos:\t0\nprog_type:\t3\nprog_jited:\t1\nprog_tag:\tabc\nmemlock:\t4096\n\
                      prog_id:\t42\n";
        assert_eq!(classify_fdinfo(fdinfo), PinnedObject::Program);
    }

    #[test]
    fn other_links_and_maps_are_told_apart() {
        assert_eq!(
            classify_fdinfo("link_type:\txdp\nlink_id:\t1\nifindex:\t2\n"),
            PinnedObject::OtherLink {
                link_type: "xdp".to_owned()
            }
        );
        assert_eq!(
            classify_fdinfo("map_type:\t11\nkey_size:\t8\n"),
            PinnedObject::Other
        );
    }
}
