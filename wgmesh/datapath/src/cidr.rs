//! Pod CIDRs as LPM trie keys and as hash-index keys, the prefix-length record of a hash index,
//! and the diff between what a map holds and what it should hold.
//!
//! Pure: no maps, no syscalls. The map side is in `maps.rs`.

use std::{
    collections::BTreeSet,
    fmt::Display,
    net::{Ipv4Addr, Ipv6Addr},
};

use aya::{Pod, maps::lpm_trie::Key};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use wgmesh_ebpf_common::{Ipv4Key, Ipv6Key, PrefixKeyV4, PrefixKeyV6, prefix_lens};

/// One address family's view of a CIDR and of its LPM key.
pub(crate) trait Family {
    /// The CIDR type (`Ipv4Net` / `Ipv6Net`), normalized (host bits zero).
    type Net: Ord + Copy + Display;
    /// The address part of the trie key.
    type Addr: Pod;
    /// The key of the hash index.
    type HashKey: Pod;

    /// The trie key of a normalized CIDR.
    fn key(net: &Self::Net) -> Key<Self::Addr>;
    /// The CIDR a trie key stands for; `None` if the prefix length is out of range (the kernel
    /// never stores such keys).
    fn net(key: &Key<Self::Addr>) -> Option<Self::Net>;
    /// The hash-index key of a normalized CIDR.
    fn hash_key(net: &Self::Net) -> Self::HashKey;
    /// The CIDR a hash-index key stands for; `None` if the prefix length is out of range or host
    /// bits are set (the programs would never find such a key).
    fn hash_net(key: &Self::HashKey) -> Option<Self::Net>;
    /// The prefix length of a CIDR.
    fn prefix_len(net: &Self::Net) -> u8;
}

pub(crate) struct V4;
pub(crate) struct V6;

impl Family for V4 {
    type Net = Ipv4Net;
    type Addr = Ipv4Key;
    type HashKey = PrefixKeyV4;

    fn key(net: &Ipv4Net) -> Key<Ipv4Key> {
        Key::new(u32::from(net.prefix_len()), net.network().octets())
    }

    fn net(key: &Key<Ipv4Key>) -> Option<Ipv4Net> {
        let prefix_len = u8::try_from(key.prefix_len()).ok()?;
        Ipv4Net::new(Ipv4Addr::from(key.data()), prefix_len)
            .ok()
            .map(|net| net.trunc())
    }

    fn hash_key(net: &Ipv4Net) -> PrefixKeyV4 {
        PrefixKeyV4 {
            prefix_len: u32::from(net.prefix_len()),
            addr: net.network().octets(),
        }
    }

    fn hash_net(key: &PrefixKeyV4) -> Option<Ipv4Net> {
        let prefix_len = u8::try_from(key.prefix_len).ok()?;
        let net = Ipv4Net::new(Ipv4Addr::from(key.addr), prefix_len).ok()?;
        (net.trunc() == net).then_some(net)
    }

    fn prefix_len(net: &Ipv4Net) -> u8 {
        net.prefix_len()
    }
}

impl Family for V6 {
    type Net = Ipv6Net;
    type Addr = Ipv6Key;
    type HashKey = PrefixKeyV6;

    fn key(net: &Ipv6Net) -> Key<Ipv6Key> {
        Key::new(u32::from(net.prefix_len()), net.network().octets())
    }

    fn net(key: &Key<Ipv6Key>) -> Option<Ipv6Net> {
        let prefix_len = u8::try_from(key.prefix_len()).ok()?;
        Ipv6Net::new(Ipv6Addr::from(key.data()), prefix_len)
            .ok()
            .map(|net| net.trunc())
    }

    fn hash_key(net: &Ipv6Net) -> PrefixKeyV6 {
        PrefixKeyV6 {
            prefix_len: u32::from(net.prefix_len()),
            addr: net.network().octets(),
        }
    }

    fn hash_net(key: &PrefixKeyV6) -> Option<Ipv6Net> {
        let prefix_len = u8::try_from(key.prefix_len).ok()?;
        let net = Ipv6Net::new(Ipv6Addr::from(key.addr), prefix_len).ok()?;
        (net.trunc() == net).then_some(net)
    }

    fn prefix_len(net: &Ipv6Net) -> u8 {
        net.prefix_len()
    }
}

/// Normalizes (host bits zeroed, e.g. `10.1.2.3/24` → `10.1.2.0/24`) and splits by family.
/// Duplicates that normalize to the same network collapse into one.
pub(crate) fn split_normalized(cidrs: &BTreeSet<IpNet>) -> (BTreeSet<Ipv4Net>, BTreeSet<Ipv6Net>) {
    let mut v4 = BTreeSet::new();
    let mut v6 = BTreeSet::new();
    for cidr in cidrs {
        match cidr.trunc() {
            IpNet::V4(net) => v4.insert(net),
            IpNet::V6(net) => v6.insert(net),
        };
    }
    (v4, v6)
}

/// The `PREFIX_LENS` record for a hash index holding CIDRs of these prefix lengths: hashed mode
/// with the distinct lengths longest first, or trie mode when there are more than
/// [`prefix_lens::MAX_HASHED`] of them (see `wgmesh_ebpf_common::prefix_lens`).
pub(crate) fn lens_record(prefix_lens: impl IntoIterator<Item = u8>) -> u64 {
    let distinct: BTreeSet<u8> = prefix_lens.into_iter().collect();
    if distinct.len() > prefix_lens::MAX_HASHED {
        return prefix_lens::MODE_TRIE;
    }
    distinct.iter().rev().enumerate().fold(
        prefix_lens::MODE_HASHED << prefix_lens::MODE_SHIFT,
        |record, (slot, len)| record | (u64::from(*len) + 1) << (slot * 8),
    )
}

/// How the programs read a `PREFIX_LENS` record: `None` for trie mode, else the prefix lengths to
/// probe, in order (the inverse of [`lens_record`]; the eBPF side does the same byte by byte).
pub(crate) fn decode_lens_record(record: u64) -> Option<Vec<u8>> {
    if record >> prefix_lens::MODE_SHIFT != prefix_lens::MODE_HASHED {
        return None;
    }
    Some(
        (0..prefix_lens::SLOTS)
            .map(|slot| ((record >> (slot * 8)) & 0xff) as u8)
            .take_while(|entry| *entry != 0)
            .map(|entry| entry - 1)
            .collect(),
    )
}

/// The writes that turn `current` into `desired`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Plan<T> {
    /// In `desired`, not in `current`: insert.
    pub(crate) add: Vec<T>,
    /// In `current`, not in `desired`: delete.
    pub(crate) remove: Vec<T>,
}

impl<T> Plan<T> {
    pub(crate) fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }
}

/// Minimal diff: entries present in both are not touched (traffic matching them never sees a gap).
pub(crate) fn plan<T: Ord + Copy>(current: &BTreeSet<T>, desired: &BTreeSet<T>) -> Plan<T> {
    Plan {
        add: desired.difference(current).copied().collect(),
        remove: current.difference(desired).copied().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(cidrs: &[&str]) -> BTreeSet<IpNet> {
        cidrs
            .iter()
            .map(|cidr| cidr.parse().expect("test CIDR"))
            .collect()
    }

    #[test]
    fn split_normalizes_host_bits_and_dedups() {
        let (v4, v6) = split_normalized(&nets(&[
            "198.18.1.7/24",
            "198.18.1.0/24",
            "198.19.0.0/16",
            "2001:db8:1::5/64",
        ]));
        assert_eq!(
            v4.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["198.18.1.0/24", "198.19.0.0/16"]
        );
        assert_eq!(
            v6.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["2001:db8:1::/64"]
        );
    }

    #[test]
    fn v4_key_round_trips() {
        let net: Ipv4Net = "198.18.4.0/22".parse().expect("test CIDR");
        let key = V4::key(&net);
        assert_eq!(key.prefix_len(), 22);
        assert_eq!(key.data(), [198, 18, 4, 0]);
        assert_eq!(V4::net(&key), Some(net));
    }

    #[test]
    fn v6_key_round_trips() {
        let net: Ipv6Net = "2001:db8:ab00::/40".parse().expect("test CIDR");
        let key = V6::key(&net);
        assert_eq!(key.prefix_len(), 40);
        assert_eq!(&key.data()[..5], &[0x20, 0x01, 0x0d, 0xb8, 0xab]);
        assert_eq!(V6::net(&key), Some(net));
    }

    #[test]
    fn key_layout_matches_the_ebpf_side() {
        assert_eq!(
            size_of::<Key<Ipv4Key>>() as u32,
            wgmesh_ebpf_common::LPM_KEY_V4_SIZE
        );
        assert_eq!(
            size_of::<Key<Ipv6Key>>() as u32,
            wgmesh_ebpf_common::LPM_KEY_V6_SIZE
        );
    }

    #[test]
    fn keys_with_impossible_prefixes_are_rejected() {
        assert_eq!(V4::net(&Key::new(33, [198, 18, 0, 0])), None);
        assert_eq!(V6::net(&Key::new(129, [0; 16])), None);
        assert_eq!(V4::net(&Key::new(u32::MAX, [0; 4])), None);
    }

    #[test]
    fn keys_with_host_bits_read_back_normalized() {
        // The kernel ignores bits past the prefix; reading such a key back must not invent a CIDR.
        assert_eq!(
            V4::net(&Key::new(16, [198, 18, 9, 9])),
            Some("198.18.0.0/16".parse().expect("test CIDR"))
        );
    }

    #[test]
    fn plan_touches_only_the_difference() {
        let current: BTreeSet<u8> = [1, 2, 3].into();
        let desired: BTreeSet<u8> = [2, 3, 4, 5].into();
        assert_eq!(
            plan(&current, &desired),
            Plan {
                add: vec![4, 5],
                remove: vec![1]
            }
        );
    }

    #[test]
    fn plan_of_equal_sets_is_empty() {
        let set: BTreeSet<u8> = [1, 2].into();
        assert!(plan(&set, &set).is_empty());
        assert!(plan(&BTreeSet::<u8>::new(), &BTreeSet::new()).is_empty());
    }

    #[test]
    fn plan_from_empty_adds_everything_and_to_empty_removes_everything() {
        let set: BTreeSet<u8> = [7, 9].into();
        let empty = BTreeSet::new();
        assert_eq!(plan(&empty, &set).add, vec![7, 9]);
        assert_eq!(plan(&set, &empty).remove, vec![7, 9]);
    }
}
