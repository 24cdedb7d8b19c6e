//! Pod CIDRs as LPM trie keys and as hash-index keys, the prefix-length record of a hash index,
//! peer host addresses as keys of their exact-match hashes, and the diff between what a map holds
//! and what it should hold.
//!
//! Pure: no maps, no syscalls. The map side is in `maps.rs`.

use std::{
    collections::BTreeSet,
    fmt::Display,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
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

/// One address family's view of a peer host address and of its `PEER_HOSTS_*` key (the address
/// bytes, network order).
pub(crate) trait HostAddr: Ord + Copy + Display {
    /// The key type (`Ipv4Key` / `Ipv6Key`).
    type Key: Pod;

    /// The key of an address.
    fn key(&self) -> Self::Key;
    /// The address a key stands for (every key is one).
    fn from_key(key: Self::Key) -> Self;
}

impl HostAddr for Ipv4Addr {
    type Key = Ipv4Key;

    fn key(&self) -> Ipv4Key {
        self.octets()
    }

    fn from_key(key: Ipv4Key) -> Self {
        Self::from(key)
    }
}

impl HostAddr for Ipv6Addr {
    type Key = Ipv6Key;

    fn key(&self) -> Ipv6Key {
        self.octets()
    }

    fn from_key(key: Ipv6Key) -> Self {
        Self::from(key)
    }
}

/// Splits host addresses by family, as given: an IPv4-mapped IPv6 address stays IPv6 (packets
/// carry it as such, and reading the maps back must return what was written).
pub(crate) fn split_hosts(hosts: &BTreeSet<IpAddr>) -> (BTreeSet<Ipv4Addr>, BTreeSet<Ipv6Addr>) {
    let mut v4 = BTreeSet::new();
    let mut v6 = BTreeSet::new();
    for host in hosts {
        match host {
            IpAddr::V4(addr) => v4.insert(*addr),
            IpAddr::V6(addr) => v6.insert(*addr),
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
    fn hosts_split_by_family_as_given() {
        let hosts: BTreeSet<IpAddr> = [
            "198.18.100.2",
            "198.18.100.3",
            "2001:db8:100::2",
            "::ffff:198.18.100.9",
        ]
        .iter()
        .map(|addr| addr.parse().expect("test address"))
        .collect();
        let (v4, v6) = split_hosts(&hosts);
        assert_eq!(
            v4.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["198.18.100.2", "198.18.100.3"]
        );
        assert_eq!(
            v6.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["::ffff:198.18.100.9", "2001:db8:100::2"]
        );
        let (v4, v6) = split_hosts(&BTreeSet::new());
        assert!(v4.is_empty() && v6.is_empty());
    }

    #[test]
    fn host_keys_are_the_address_bytes_in_network_order() {
        // The programs probe with the destination exactly as it sits in the IP header.
        let v4: Ipv4Addr = "198.18.100.2".parse().expect("test address");
        assert_eq!(v4.key(), [198, 18, 100, 2]);
        assert_eq!(Ipv4Addr::from_key(v4.key()), v4);
        let v6: Ipv6Addr = "2001:db8:100::2".parse().expect("test address");
        let key = v6.key();
        assert_eq!(&key[..4], &[0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(key[15], 2);
        assert_eq!(Ipv6Addr::from_key(key), v6);
        assert_eq!(size_of::<<Ipv4Addr as HostAddr>::Key>(), 4);
        assert_eq!(size_of::<<Ipv6Addr as HostAddr>::Key>(), 16);
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

    /// A small deterministic PRNG (xorshift64*), so the random tables are reproducible.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// What the steer/guard programs do for an IPv4 address (see `contains_v4` in
    /// `ebpf/src/main.rs`): probe the hash per listed length, longest first, or fall back to the
    /// trie. Returns the matching CIDR.
    fn program_lookup(
        record: u64,
        hash: &BTreeSet<Ipv4Net>,
        trie: &BTreeSet<Ipv4Net>,
        addr: Ipv4Addr,
    ) -> Option<Ipv4Net> {
        match decode_lens_record(record) {
            Some(lens) => lens.into_iter().find_map(|len| {
                let net = Ipv4Net::new(addr, len).expect("len <= 32").trunc();
                hash.contains(&net).then_some(net)
            }),
            None => reference_lpm(trie, addr),
        }
    }

    /// The reference: the longest CIDR of `set` containing `addr`.
    fn reference_lpm(set: &BTreeSet<Ipv4Net>, addr: Ipv4Addr) -> Option<Ipv4Net> {
        set.iter()
            .filter(|net| net.contains(&addr))
            .max_by_key(|net| net.prefix_len())
            .copied()
    }

    fn random_set(rng: &mut Rng, lens: &[u8], count: usize) -> BTreeSet<Ipv4Net> {
        // All inside 10.0.0.0/12 so that CIDRs of different lengths overlap often.
        (0..count)
            .map(|_| {
                let len = lens[rng.below(lens.len() as u64) as usize];
                let addr = Ipv4Addr::from(0x0a00_0000 | (rng.next() as u32 & 0x000f_ffff));
                Ipv4Net::new(addr, len).expect("valid").trunc()
            })
            .collect()
    }

    fn probe(rng: &mut Rng, set: &BTreeSet<Ipv4Net>) -> Ipv4Addr {
        // Half inside a CIDR of the set (its first, last or a random address), half anywhere in
        // the range.
        let nets: Vec<_> = set.iter().collect();
        if nets.is_empty() || rng.below(2) == 0 {
            return Ipv4Addr::from(0x0a00_0000 | (rng.next() as u32 & 0x001f_ffff));
        }
        let net = nets[rng.below(nets.len() as u64) as usize];
        let span = u32::from(net.broadcast()) - u32::from(net.network());
        let offset = match rng.below(3) {
            0 => 0,
            1 => span,
            _ => rng.next() as u32 % span.saturating_add(1).max(1),
        };
        Ipv4Addr::from(u32::from(net.network()) + offset)
    }

    #[test]
    fn the_record_lists_distinct_lengths_longest_first() {
        for (lens, expected) in [
            (vec![], Some(vec![])),
            (vec![24], Some(vec![24])),
            (vec![24, 24, 24], Some(vec![24])),
            (vec![16, 24, 29, 16], Some(vec![29, 24, 16])),
            (vec![0, 32], Some(vec![32, 0])),
            (vec![128, 64, 0, 127], Some(vec![128, 127, 64, 0])),
            (vec![25, 26, 27, 28], Some(vec![28, 27, 26, 25])),
            // One length past the bound: the trie.
            (vec![25, 26, 27, 28, 29], None),
            ((0..=32).collect(), None),
        ] {
            let record = lens_record(lens.iter().copied());
            assert_eq!(decode_lens_record(record), expected, "{lens:?}");
        }
    }

    #[test]
    fn an_unwritten_record_means_the_trie_and_an_empty_set_probes_nothing() {
        // A PREFIX_LENS created next to pins of an older build reads as zero before the agent
        // has rebuilt the index: the programs must use the trie then.
        assert_eq!(decode_lens_record(0), None);
        assert_eq!(
            lens_record([]),
            prefix_lens::MODE_HASHED << prefix_lens::MODE_SHIFT
        );
        assert_ne!(lens_record([]), prefix_lens::MODE_TRIE);
    }

    #[test]
    fn records_fit_the_slots_the_programs_read() {
        let record = lens_record([1, 2, 3, 4]);
        // Bytes past the listed lengths and before the mode byte stay zero (end of list).
        for slot in 4..prefix_lens::SLOTS {
            assert_eq!((record >> (slot * 8)) & 0xff, 0, "slot {slot}");
        }
        assert_eq!(record >> prefix_lens::MODE_SHIFT, prefix_lens::MODE_HASHED);
    }

    #[test]
    fn hash_lookups_agree_with_a_reference_lpm_on_random_sets() {
        let mut rng = Rng(0x5eed_cafe_f00d_0001);
        let length_mixes: [&[u8]; 6] = [
            &[24],
            &[29],
            &[16, 24],
            &[8, 16, 24, 32],
            &[20, 22, 24, 26, 28],
            &[0, 1, 12, 31, 32],
        ];
        for round in 0..300 {
            let lens = length_mixes[round % length_mixes.len()];
            let count = 1 + rng.below(60) as usize;
            let set = random_set(&mut rng, lens, count);
            let record = lens_record(set.iter().map(V4::prefix_len));
            let distinct: BTreeSet<u8> = set.iter().map(Ipv4Net::prefix_len).collect();
            assert_eq!(
                decode_lens_record(record).is_none(),
                distinct.len() > prefix_lens::MAX_HASHED,
                "{distinct:?}"
            );
            for _ in 0..200 {
                let addr = probe(&mut rng, &set);
                assert_eq!(
                    program_lookup(record, &set, &set, addr),
                    reference_lpm(&set, addr),
                    "{addr} in {set:?}"
                );
            }
        }
    }

    #[test]
    fn hash_keys_round_trip_and_reject_what_the_programs_never_probe() {
        let net: Ipv4Net = "198.19.4.0/22".parse().expect("test CIDR");
        let key = V4::hash_key(&net);
        assert_eq!(key.prefix_len, 22);
        assert_eq!(key.addr, [198, 19, 4, 0]);
        assert_eq!(V4::hash_net(&key), Some(net));
        let net6: Ipv6Net = "2001:db8:40::/42".parse().expect("test CIDR");
        assert_eq!(V6::hash_net(&V6::hash_key(&net6)), Some(net6));
        // Host bits set: the programs mask before probing, so such a key is junk.
        let junk = PrefixKeyV4 {
            prefix_len: 22,
            addr: [198, 19, 5, 0],
        };
        assert_eq!(V4::hash_net(&junk), None);
        assert_eq!(
            V4::hash_net(&PrefixKeyV4 {
                prefix_len: 33,
                addr: [0; 4]
            }),
            None
        );
    }

    /// The sync's publishing order (module docs of `maps.rs`): inserts, record for old ∪ new,
    /// deletes, record for new. At every step, every address matched by both the old and the new
    /// set must still be matched; and after the last step the lookup is the new set's LPM.
    #[test]
    fn no_step_of_a_sync_loses_an_address_both_sets_match() {
        let mut rng = Rng(0x0bad_c0de_1234_5678);
        let mixes: [&[u8]; 4] = [
            &[24],
            &[16, 17],
            &[22, 23, 24, 25],
            &[20, 21, 22, 23, 24, 25],
        ];
        for round in 0..300 {
            let (old_count, new_count) = (rng.below(30) as usize, rng.below(30) as usize);
            let old = random_set(&mut rng, mixes[round % 4], old_count);
            let new = random_set(&mut rng, mixes[(round / 4) % 4], new_count);
            let union: BTreeSet<Ipv4Net> = old.union(&new).copied().collect();
            let old_record = lens_record(old.iter().map(V4::prefix_len));
            let union_record = lens_record(union.iter().map(V4::prefix_len));
            let new_record = lens_record(new.iter().map(V4::prefix_len));
            // (record, hash = trie contents) after each write phase.
            let steps = [
                (old_record, &union), // inserts done, old record still published
                (union_record, &union),
                (union_record, &new), // deletes done
                (new_record, &new),
            ];
            for _ in 0..100 {
                let addr = probe(&mut rng, &union);
                let wanted =
                    reference_lpm(&old, addr).is_some() && reference_lpm(&new, addr).is_some();
                for (step, (record, held)) in steps.iter().enumerate() {
                    let found = program_lookup(*record, held, held, addr);
                    if wanted {
                        assert!(
                            found.is_some(),
                            "step {step}: {addr} lost ({old:?} -> {new:?})"
                        );
                    }
                }
                assert_eq!(
                    program_lookup(new_record, &new, &new, addr),
                    reference_lpm(&new, addr)
                );
            }
        }
    }
}
