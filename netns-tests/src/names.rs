//! Unique, short names for everything a testbed creates.
//!
//! Namespace names are global (files under `/run/netns`), and so are WireGuard interface names for
//! userspace devices (their UAPI socket is `/var/run/wireguard/<if>.sock` whatever the netns,
//! libraries.md pitfall 9). Tests run in parallel threads and in parallel processes, so every name
//! starts with a prefix built from the process id (fixed width, so that it never runs into the
//! counter) and a per-process counter. Interface names must fit IFNAMSIZ (15 characters).

use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Result, bail};

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh prefix such as `00qx3a1`: 5 base-36 digits of the pid, then a base-36 counter.
pub fn unique_prefix() -> String {
    let pid = std::process::id();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:0>5}{}", base36(pid), base36(n))
}

/// `n` in base 36, lowercase.
pub fn base36(mut n: u32) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("base-36 digits are ASCII")
}

/// Checks a name chosen by a test (node or pod): lowercase letters, digits and `-`, as in a
/// Kubernetes node name, and short enough to be part of a namespace name.
pub fn validate_object_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !ok {
        bail!(
            "{kind} name {name:?} must be 1-40 characters of a-z, 0-9 and '-' (like a Kubernetes name)"
        );
    }
    Ok(())
}

/// Checks an interface name against IFNAMSIZ.
pub fn validate_ifname(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_IFNAME || name.contains('/') || name.contains(' ') {
        bail!("interface name {name:?} must be 1-{MAX_IFNAME} characters without '/' or spaces");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_unique_and_short() {
        let a = unique_prefix();
        let b = unique_prefix();
        assert_ne!(a, b);
        assert!(a.len() <= 8, "{a}");
        // The interface name the testbed derives from it still fits IFNAMSIZ.
        validate_ifname(&format!("wm{a}-99")).expect("fits");
    }

    #[test]
    fn base36_counts() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
        assert_eq!(format!("{:0>5}", base36(4_194_304)), "2hwcg");
    }

    #[test]
    fn object_names_are_kubernetes_like() {
        assert!(validate_object_name("node", "node-a1").is_ok());
        assert!(validate_object_name("node", "A").is_err());
        assert!(validate_object_name("node", "a_b").is_err());
        assert!(validate_object_name("node", "").is_err());
    }
}
