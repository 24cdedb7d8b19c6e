//! The bpffs directory that holds wgmesh's pins, and the naming of the link pins inside it.
//!
//! Layout under `bpffs_dir`:
//! * `REMOTE_V4`, `REMOTE_V6`, `LOCAL_V4`, `LOCAL_V6`, `CONFIG`, `COUNTERS`, `CLUSTER_V4`,
//!   `CLUSTER_V6`, their hash indexes `*_HASH`, `PREFIX_LENS`, `STATS`, `PEER_HOSTS_V4` and
//!   `PEER_HOSTS_V6`: the pinned maps;
//! * `links/<ifname>-<ingress|egress>`: one pin per attached interface and direction. With TCX it
//!   is the bpf_link itself (the pin is what keeps the program attached); with netlink (cls_bpf) it
//!   is the attached program, a record of which interfaces carry a wgmesh filter.

use std::{
    fs, io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use nix::sys::statfs::{BPF_FS_MAGIC, statfs};

use crate::{Direction, Error};

/// Sub-directory of `bpffs_dir` holding the per-interface pins.
pub(crate) const LINKS_DIR: &str = "links";

/// Longest interface name the kernel accepts (`IFNAMSIZ` - 1).
const MAX_IFNAME_LEN: usize = 15;

/// Checks that `dir` is on a bpffs (or can be created inside one) and creates it and its `links/`
/// sub-directory. Returns the links directory.
pub(crate) fn prepare(dir: &Path) -> Result<PathBuf, Error> {
    if dir.as_os_str().as_bytes().contains(&0) || dir.as_os_str().is_empty() {
        return Err(Error::InvalidBpffsDir {
            path: dir.to_path_buf(),
        });
    }
    // The directory may not exist yet; then its nearest existing ancestor must be a bpffs, and it
    // is created inside it (mkdir works on bpffs).
    let existing = dir
        .ancestors()
        .find(|candidate| candidate.exists())
        .unwrap_or(Path::new("/"));
    if !is_bpffs(existing)? {
        return Err(Error::NotBpffs {
            path: dir.to_path_buf(),
        });
    }
    let links = dir.join(LINKS_DIR);
    fs::create_dir_all(&links).map_err(|source| Error::CreateDir {
        path: links.clone(),
        source,
    })?;
    Ok(links)
}

/// Whether `path` (which must exist) lives on a bpf filesystem.
pub(crate) fn is_bpffs(path: &Path) -> Result<bool, Error> {
    let stat = statfs(path).map_err(|errno| Error::InspectBpffs {
        path: path.to_path_buf(),
        source: io::Error::from(errno),
    })?;
    Ok(stat.filesystem_type() == BPF_FS_MAGIC)
}

/// Rejects names the kernel would reject (and anything that could escape the links directory).
/// Mirrors the kernel's `dev_valid_name`.
pub(crate) fn validate_ifname(ifname: &str) -> Result<(), Error> {
    let valid = !ifname.is_empty()
        && ifname.len() <= MAX_IFNAME_LEN
        && ifname != "."
        && ifname != ".."
        && !ifname
            .chars()
            .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace());
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidInterfaceName {
            ifname: ifname.to_owned(),
        })
    }
}

/// File name of the pin for `ifname` in `direction`: `<ifname>-<ingress|egress>`.
pub(crate) fn link_pin_name(ifname: &str, direction: Direction) -> String {
    format!("{ifname}-{direction}")
}

/// Inverse of [`link_pin_name`]; `None` for names wgmesh does not create.
pub(crate) fn parse_link_pin_name(name: &str) -> Option<(String, Direction)> {
    [Direction::Ingress, Direction::Egress]
        .into_iter()
        .find_map(|direction| {
            let ifname = name.strip_suffix(&format!("-{direction}"))?;
            validate_ifname(ifname).ok()?;
            Some((ifname.to_owned(), direction))
        })
}

/// The `(ifname, direction)` pins in `links_dir`, sorted; a missing directory means none.
pub(crate) fn list_link_pins(links_dir: &Path) -> Result<Vec<(String, Direction)>, Error> {
    let entries = match fs::read_dir(links_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(Error::ListDir {
                path: links_dir.to_path_buf(),
                source,
            });
        }
    };
    let mut pins = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| Error::ListDir {
            path: links_dir.to_path_buf(),
            source,
        })?;
        let name = entry.file_name();
        match name.to_str().and_then(parse_link_pin_name) {
            Some(pin) => pins.push(pin),
            None => tracing::debug!(path = %entry.path().display(), "ignoring unknown pin"),
        }
    }
    pins.sort();
    Ok(pins)
}

/// Removes a pin; a pin that is already gone is success.
pub(crate) fn remove_pin(path: &Path) -> Result<bool, Error> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(Error::Unpin {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Removes an empty directory; a missing one is success, a non-empty or busy one (a mount point)
/// is left in place.
pub(crate) fn remove_dir_if_empty(path: &Path) -> Result<(), Error> {
    match fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(err)
            if matches!(
                err.kind(),
                io::ErrorKind::NotFound
                    | io::ErrorKind::DirectoryNotEmpty
                    | io::ErrorKind::ResourceBusy
            ) =>
        {
            Ok(())
        }
        Err(source) => Err(Error::RemoveDir {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip_even_with_dashes_in_the_interface_name() {
        for (ifname, direction) in [
            ("eth0", Direction::Egress),
            ("veth-ab12-cd", Direction::Ingress),
            ("lxc-egress", Direction::Ingress),
            ("a", Direction::Egress),
        ] {
            let name = link_pin_name(ifname, direction);
            assert_eq!(
                parse_link_pin_name(&name),
                Some((ifname.to_owned(), direction)),
                "{name}"
            );
        }
    }

    #[test]
    fn foreign_pin_names_are_not_parsed() {
        for name in [
            "eth0",
            "-ingress",
            "eth0-sideways",
            "eth0-ingress.tmp",
            "0123456789abcdef-ingress",
        ] {
            assert_eq!(parse_link_pin_name(name), None, "{name}");
        }
    }

    #[test]
    fn interface_names_follow_the_kernel_rules() {
        for ok in ["eth0", "cali1234567890a", "veth-x", "wg.mesh"] {
            assert!(validate_ifname(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "0123456789abcdef",
            "nul\0",
        ] {
            assert!(
                matches!(
                    validate_ifname(bad),
                    Err(Error::InvalidInterfaceName { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_plain_directory_is_not_bpffs_and_the_error_names_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("wgmesh");
        let err = prepare(&target).expect_err("tmpfs/ext4 is not bpffs");
        assert!(matches!(err, Error::NotBpffs { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("mount -t bpf"), "{message}");
        assert!(!target.exists(), "nothing is created outside bpffs");
    }

    #[test]
    fn listing_a_missing_links_directory_yields_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pins = list_link_pins(&dir.path().join("missing")).expect("missing dir is empty");
        assert!(pins.is_empty());
    }

    #[test]
    fn listing_skips_foreign_files_and_sorts() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["vethb-ingress", "eth0-egress", "README", "veth-a-ingress"] {
            fs::write(dir.path().join(name), b"").expect("write");
        }
        assert_eq!(
            list_link_pins(dir.path()).expect("list"),
            vec![
                ("eth0".to_owned(), Direction::Egress),
                ("veth-a".to_owned(), Direction::Ingress),
                ("vethb".to_owned(), Direction::Ingress),
            ]
        );
    }
}
