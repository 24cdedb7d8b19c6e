//! Typed access to the eight pinned maps: CIDR tries, `CONFIG` and `COUNTERS`.
//!
//! The same [`MapSet`] backs a loaded [`crate::Datapath`] (maps taken from the aya object) and the
//! read-only [`crate::PinnedDatapath`] (maps opened from their pins), so both read identically.
//! The read-only view also accepts the pins of a build that predates the `CLUSTER_*` tries (an
//! agent not yet upgraded): they then read as empty.

use std::{
    collections::BTreeSet,
    fmt, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{Array, LpmTrie, Map, MapData, MapError, MapInfo, MapType, PerCpuArray},
    sys::SyscallError,
};
use ipnet::IpNet;
use wgmesh_ebpf_common::{
    CIDR_PRESENT, CLUSTER_MAX_ENTRIES, CONFIG_ENTRIES, CONFIG_INDEX, CONFIG_SIZE, COUNTER_SLOTS,
    CidrValue, Config, Ipv4Key, Ipv6Key, LOCAL_MAX_ENTRIES, LPM_KEY_V4_SIZE, LPM_KEY_V6_SIZE,
    MAP_CLUSTER_V4, MAP_CLUSTER_V6, MAP_CONFIG, MAP_COUNTERS, MAP_LOCAL_V4, MAP_LOCAL_V6,
    MAP_NAMES, MAP_REMOTE_V4, MAP_REMOTE_V6, REMOTE_MAX_ENTRIES, counter,
};

use crate::{
    Counters, Error, SyncStats,
    cidr::{Family, V4, V6, plan, split_normalized},
};

/// The properties of a map that must not change under a pin that outlives the agent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MapShape {
    /// Kernel map type.
    pub map_type: MapType,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes (per CPU for per-CPU maps).
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
}

impl fmt::Display for MapShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} key {} B, value {} B, {} entries",
            self.map_type, self.key_size, self.value_size, self.max_entries
        )
    }
}

/// The shape this build's eBPF object declares for `map` (see `wgmesh-ebpf-common`).
fn expected_shape(map: &str) -> Option<MapShape> {
    let lpm = |key_size, max_entries| MapShape {
        map_type: MapType::LpmTrie,
        key_size,
        value_size: size_of::<CidrValue>() as u32,
        max_entries,
    };
    Some(match map {
        MAP_REMOTE_V4 => lpm(LPM_KEY_V4_SIZE, REMOTE_MAX_ENTRIES),
        MAP_REMOTE_V6 => lpm(LPM_KEY_V6_SIZE, REMOTE_MAX_ENTRIES),
        MAP_LOCAL_V4 => lpm(LPM_KEY_V4_SIZE, LOCAL_MAX_ENTRIES),
        MAP_LOCAL_V6 => lpm(LPM_KEY_V6_SIZE, LOCAL_MAX_ENTRIES),
        MAP_CLUSTER_V4 => lpm(LPM_KEY_V4_SIZE, CLUSTER_MAX_ENTRIES),
        MAP_CLUSTER_V6 => lpm(LPM_KEY_V6_SIZE, CLUSTER_MAX_ENTRIES),
        MAP_CONFIG => MapShape {
            map_type: MapType::Array,
            key_size: 4,
            value_size: CONFIG_SIZE,
            max_entries: CONFIG_ENTRIES,
        },
        MAP_COUNTERS => MapShape {
            map_type: MapType::PerCpuArray,
            key_size: 4,
            value_size: 8,
            max_entries: COUNTER_SLOTS,
        },
        _ => return None,
    })
}

fn is_not_found(err: &MapError) -> bool {
    matches!(err, MapError::SyscallError(SyscallError { io_error, .. }) if io_error.kind() == io::ErrorKind::NotFound)
}

/// Refuses pins left by a build whose maps have another shape: re-using them would either fail the
/// verifier or, worse, make the programs read the wrong bytes. Missing pins are fine (created on
/// load). Returns the names of the maps that are already pinned.
pub(crate) fn check_pinned_shapes(bpffs_dir: &Path) -> Result<Vec<&'static str>, Error> {
    let mut pinned = Vec::new();
    for map in MAP_NAMES {
        let path = bpffs_dir.join(map);
        let info = match MapInfo::from_pin(&path) {
            Ok(info) => info,
            Err(err) if is_not_found(&err) => continue,
            Err(source) => {
                return Err(Error::InspectPinnedMap {
                    path,
                    source: Box::new(source),
                });
            }
        };
        let found = MapShape {
            map_type: info.map_type().map_err(|source| Error::InspectPinnedMap {
                path: path.clone(),
                source: Box::new(source),
            })?,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
        };
        let expected = expected_shape(map).ok_or(Error::MissingMap { map })?;
        if found != expected {
            return Err(Error::IncompatiblePinnedMap {
                map,
                path,
                expected,
                found,
            });
        }
        pinned.push(map);
    }
    Ok(pinned)
}

/// Maps added after the first pinned layout: a pin set left by an older build lacks them.
/// [`Datapath::load`](crate::Datapath::load) creates them next to the re-used pins; the read-only
/// view treats them as empty until then.
pub(crate) const LATER_MAPS: [&str; 2] = [MAP_CLUSTER_V4, MAP_CLUSTER_V6];

/// The two tries (IPv4, IPv6) of one CIDR set.
struct TriePair {
    v4: LpmTrie<MapData, Ipv4Key, CidrValue>,
    v6: LpmTrie<MapData, Ipv6Key, CidrValue>,
    names: [&'static str; 2],
    capacity: u32,
}

impl TriePair {
    fn new(
        names: [&'static str; 2],
        capacity: u32,
        mut get: impl FnMut(&'static str) -> Result<Map, Error>,
    ) -> Result<Self, Error> {
        Ok(Self {
            v4: typed(names[0], get(names[0])?)?,
            v6: typed(names[1], get(names[1])?)?,
            names,
            capacity,
        })
    }

    /// Makes the tries hold exactly `cidrs` (normalized, split by family) with minimal writes.
    fn sync(&mut self, cidrs: &BTreeSet<IpNet>) -> Result<SyncStats, Error> {
        let (v4, v6) = split_normalized(cidrs);
        check_capacity(self.names[0], v4.len(), self.capacity)?;
        check_capacity(self.names[1], v6.len(), self.capacity)?;
        let stats_v4 = sync_trie::<V4>(&mut self.v4, self.names[0], self.capacity, &v4)?;
        let stats_v6 = sync_trie::<V6>(&mut self.v6, self.names[1], self.capacity, &v6)?;
        Ok(stats_v4 + stats_v6)
    }

    fn cidrs(&self) -> Result<BTreeSet<IpNet>, Error> {
        let v4 = read_trie::<V4>(&self.v4, self.names[0])?.nets;
        let v6 = read_trie::<V6>(&self.v6, self.names[1])?.nets;
        Ok(both(v4, v6))
    }
}

/// The maps, typed.
pub(crate) struct MapSet {
    remote: TriePair,
    local: TriePair,
    /// `None` only in a read-only view of pins from a build without the `CLUSTER_*` tries.
    cluster: Option<TriePair>,
    config: Array<MapData, Config>,
    counters: PerCpuArray<MapData, u64>,
}

impl MapSet {
    /// Takes the maps out of a loaded object. Call after the programs are loaded: the programs
    /// reference the maps by fd, and the fds stay open as long as this set lives.
    pub(crate) fn take_from(ebpf: &mut Ebpf) -> Result<Self, Error> {
        let mut take = |map: &'static str| ebpf.take_map(map).ok_or(Error::MissingMap { map });
        Ok(Self {
            remote: TriePair::new(REMOTE, REMOTE_MAX_ENTRIES, &mut take)?,
            local: TriePair::new(LOCAL, LOCAL_MAX_ENTRIES, &mut take)?,
            cluster: Some(TriePair::new(CLUSTER, CLUSTER_MAX_ENTRIES, &mut take)?),
            config: typed(MAP_CONFIG, take(MAP_CONFIG)?)?,
            counters: typed(MAP_COUNTERS, take(MAP_COUNTERS)?)?,
        })
    }

    /// Opens the maps from their pins under `bpffs_dir`, without loading any program.
    pub(crate) fn open_pinned(bpffs_dir: &Path) -> Result<Self, Error> {
        check_pinned_shapes(bpffs_dir)?;
        let open = |map: &'static str| -> Result<Map, Error> {
            let path = bpffs_dir.join(map);
            let data = MapData::from_pin(&path).map_err(|source| Error::OpenPinnedMap {
                path: path.clone(),
                source: Box::new(source),
            })?;
            Map::from_map_data(data).map_err(|source| Error::OpenPinnedMap {
                path,
                source: Box::new(source),
            })
        };
        let cluster_pinned = CLUSTER.iter().all(|map| pin_path(bpffs_dir, map).exists());
        Ok(Self {
            remote: TriePair::new(REMOTE, REMOTE_MAX_ENTRIES, open)?,
            local: TriePair::new(LOCAL, LOCAL_MAX_ENTRIES, open)?,
            cluster: if cluster_pinned {
                Some(TriePair::new(CLUSTER, CLUSTER_MAX_ENTRIES, open)?)
            } else {
                None
            },
            config: typed(MAP_CONFIG, open(MAP_CONFIG)?)?,
            counters: typed(MAP_COUNTERS, open(MAP_COUNTERS)?)?,
        })
    }

    pub(crate) fn write_config(&mut self, config: Config) -> Result<(), Error> {
        self.config
            .set(CONFIG_INDEX, config, 0)
            .map_err(|source| Error::MapWrite {
                map: MAP_CONFIG,
                source: Box::new(source),
            })
    }

    pub(crate) fn config(&self) -> Result<Config, Error> {
        self.config
            .get(&CONFIG_INDEX, 0)
            .map_err(|source| Error::MapRead {
                map: MAP_CONFIG,
                source: Box::new(source),
            })
    }

    pub(crate) fn counters(&self) -> Result<Counters, Error> {
        let read = |slot: u32| -> Result<u64, Error> {
            let per_cpu = self
                .counters
                .get(&slot, 0)
                .map_err(|source| Error::MapRead {
                    map: MAP_COUNTERS,
                    source: Box::new(source),
                })?;
            Ok(per_cpu
                .iter()
                .fold(0u64, |sum, value| sum.wrapping_add(*value)))
        };
        Ok(Counters {
            steered: read(counter::STEERED_PACKETS)?,
            steered_bytes: read(counter::STEERED_BYTES)?,
            local: read(counter::LOCAL)?,
            passed: read(counter::PASSED)?,
            leaked: read(counter::LEAKED)?,
            dropped_strict: read(counter::DROPPED_STRICT)?,
            non_ip: read(counter::NON_IP)?,
            malformed: read(counter::MALFORMED)?,
            uplink_passed: read(counter::UPLINK_PASSED)?,
            rescued: read(counter::RESCUED)?,
        })
    }

    pub(crate) fn sync_remote(&mut self, cidrs: &BTreeSet<IpNet>) -> Result<SyncStats, Error> {
        self.remote.sync(cidrs)
    }

    pub(crate) fn sync_local(&mut self, cidrs: &BTreeSet<IpNet>) -> Result<SyncStats, Error> {
        self.local.sync(cidrs)
    }

    pub(crate) fn sync_cluster(&mut self, cidrs: &BTreeSet<IpNet>) -> Result<SyncStats, Error> {
        self.cluster
            .as_mut()
            .ok_or(Error::MissingMap {
                map: MAP_CLUSTER_V4,
            })?
            .sync(cidrs)
    }

    pub(crate) fn remote_cidrs(&self) -> Result<BTreeSet<IpNet>, Error> {
        self.remote.cidrs()
    }

    pub(crate) fn local_cidrs(&self) -> Result<BTreeSet<IpNet>, Error> {
        self.local.cidrs()
    }

    /// Empty for pins of a build that had no `CLUSTER_*` tries.
    pub(crate) fn cluster_cidrs(&self) -> Result<BTreeSet<IpNet>, Error> {
        self.cluster
            .as_ref()
            .map_or_else(|| Ok(BTreeSet::new()), TriePair::cidrs)
    }
}

const REMOTE: [&str; 2] = [MAP_REMOTE_V4, MAP_REMOTE_V6];
const LOCAL: [&str; 2] = [MAP_LOCAL_V4, MAP_LOCAL_V6];
const CLUSTER: [&str; 2] = [MAP_CLUSTER_V4, MAP_CLUSTER_V6];

fn typed<T>(map: &'static str, raw: Map) -> Result<T, Error>
where
    T: TryFrom<Map, Error = MapError>,
{
    T::try_from(raw).map_err(|source| Error::MapType {
        map,
        source: Box::new(source),
    })
}

fn both(v4: BTreeSet<ipnet::Ipv4Net>, v6: BTreeSet<ipnet::Ipv6Net>) -> BTreeSet<IpNet> {
    v4.into_iter()
        .map(IpNet::V4)
        .chain(v6.into_iter().map(IpNet::V6))
        .collect()
}

fn check_capacity(map: &'static str, wanted: usize, capacity: u32) -> Result<(), Error> {
    if wanted > capacity as usize {
        return Err(Error::TooManyCidrs {
            map,
            wanted,
            capacity,
        });
    }
    Ok(())
}

/// What a trie holds.
struct TrieContents<N> {
    /// Every CIDR in it.
    nets: BTreeSet<N>,
    /// Those whose value is not [`CIDR_PRESENT`] (left by another build; rewritten by a sync).
    stale: BTreeSet<N>,
}

fn read_trie<F: Family>(
    trie: &LpmTrie<MapData, F::Addr, CidrValue>,
    map: &'static str,
) -> Result<TrieContents<F::Net>, Error> {
    let mut nets = BTreeSet::new();
    let mut stale = BTreeSet::new();
    for entry in trie.iter() {
        let (key, value) = entry.map_err(|source| Error::MapRead {
            map,
            source: Box::new(source),
        })?;
        match F::net(&key) {
            Some(net) => {
                nets.insert(net);
                if value != CIDR_PRESENT {
                    stale.insert(net);
                }
            }
            // The kernel rejects prefix lengths beyond the address size, so this cannot happen.
            None => tracing::warn!(map, prefix_len = key.prefix_len(), "ignoring invalid key"),
        }
    }
    Ok(TrieContents { nets, stale })
}

/// Makes `trie` hold exactly `desired` with the fewest writes. Inserts go first so that replacing
/// a CIDR by overlapping ones (a /16 by two /17s) never leaves a moment without a match; only when
/// the trie has no room for the transient union are the stale entries removed first (they are not
/// wanted, so removing them early changes nothing for wanted traffic).
fn sync_trie<F: Family>(
    trie: &mut LpmTrie<MapData, F::Addr, CidrValue>,
    map: &'static str,
    capacity: u32,
    desired: &BTreeSet<F::Net>,
) -> Result<SyncStats, Error> {
    let TrieContents {
        nets: current,
        stale,
    } = read_trie::<F>(trie, map)?;
    let plan = plan(&current, desired);
    let rewrite: Vec<F::Net> = stale.intersection(desired).copied().collect();
    let remove = |trie: &mut LpmTrie<MapData, F::Addr, CidrValue>| -> Result<(), Error> {
        for net in &plan.remove {
            match trie.remove(&F::key(net)) {
                Ok(()) => {}
                Err(err) if is_not_found(&err) => {}
                Err(source) => {
                    return Err(Error::MapDelete {
                        map,
                        cidr: net.to_string(),
                        source: Box::new(source),
                    });
                }
            }
        }
        Ok(())
    };
    let insert = |trie: &mut LpmTrie<MapData, F::Addr, CidrValue>| -> Result<(), Error> {
        for net in plan.add.iter().chain(&rewrite) {
            trie.insert(&F::key(net), CIDR_PRESENT, 0)
                .map_err(|source| Error::MapInsert {
                    map,
                    cidr: net.to_string(),
                    source: Box::new(source),
                })?;
        }
        Ok(())
    };
    if current.len() + plan.add.len() > capacity as usize {
        remove(trie)?;
        insert(trie)?;
    } else {
        insert(trie)?;
        remove(trie)?;
    }
    if !plan.is_empty() {
        tracing::debug!(
            map,
            added = plan.add.len(),
            removed = plan.remove.len(),
            "synced cidr map"
        );
    }
    Ok(SyncStats {
        added: plan.add.len() + rewrite.len(),
        removed: plan.remove.len(),
    })
}

/// Where `map` is (or would be) pinned.
pub(crate) fn pin_path(bpffs_dir: &Path, map: &str) -> PathBuf {
    bpffs_dir.join(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_map_has_an_expected_shape() {
        for map in MAP_NAMES {
            assert!(expected_shape(map).is_some(), "{map}");
        }
        assert!(expected_shape("NOPE").is_none());
    }

    #[test]
    fn cluster_tries_are_as_large_as_the_remote_ones() {
        for (cluster, remote) in [
            (MAP_CLUSTER_V4, MAP_REMOTE_V4),
            (MAP_CLUSTER_V6, MAP_REMOTE_V6),
        ] {
            assert_eq!(expected_shape(cluster), expected_shape(remote), "{cluster}");
        }
    }

    #[test]
    fn only_the_cluster_tries_may_be_missing_from_an_older_pin_set() {
        assert_eq!(LATER_MAPS, CLUSTER);
        for map in LATER_MAPS {
            assert!(MAP_NAMES.contains(&map), "{map}");
        }
    }

    #[test]
    fn shapes_print_for_humans() {
        let shape = expected_shape(MAP_REMOTE_V4).expect("known map");
        assert_eq!(
            shape.to_string(),
            "LpmTrie key 8 B, value 4 B, 16384 entries"
        );
    }

    #[test]
    fn capacity_is_checked_before_any_write() {
        assert!(check_capacity(MAP_LOCAL_V4, 256, LOCAL_MAX_ENTRIES).is_ok());
        assert!(matches!(
            check_capacity(MAP_LOCAL_V4, 257, LOCAL_MAX_ENTRIES),
            Err(Error::TooManyCidrs { wanted: 257, .. })
        ));
    }
}
