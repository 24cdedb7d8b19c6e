//! Typed access to the pinned maps: CIDR tries and their hash indexes, `PREFIX_LENS`, the peer
//! host addresses (`PEER_HOSTS_*`), `CONFIG`, `COUNTERS` and `STATS`.
//!
//! The same [`MapSet`] backs a loaded [`crate::Datapath`] (maps taken from the aya object) and the
//! read-only [`crate::PinnedDatapath`] (maps opened from their pins), so both read identically.
//! The read-only view also accepts the pins of a build that predates the `CLUSTER_*` tries,
//! `STATS` or `PEER_HOSTS_*` (an agent not yet upgraded): they then read as empty. It never opens
//! the hash indexes.
//!
//! # Tries and hash indexes
//!
//! Each CIDR set (remote, cluster, local; per family) lives in an LPM trie, the source of truth,
//! and in a hash index keyed by (prefix length, network) with a `PREFIX_LENS` record listing the
//! lengths in use (`wgmesh_ebpf_common::prefix_lens`). The programs probe the hash once per listed
//! length, longest first, so a lookup costs the same at 10 and at 10,000 CIDRs; with more distinct
//! lengths than the record serves, the record says "trie" and the programs walk the trie. Every
//! sync writes both, in an order that never leaves a wanted CIDR unmatched:
//! 1. inserts (trie and hash);
//! 2. the record for *old ∪ new* lengths (so a /16 replaced by two /17s matches throughout);
//! 3. deletes (trie and hash);
//! 4. the record for the new lengths.
//!
//! (When a map has no room for old and new entries at once, the deletes go first, as before.) A
//! record is one `u64` stored atomically through an mmap of the array, so a packet reads either the
//! old or the new one. The trie is complete in every mode, so switching modes is just a store.
//!
//! The index is derived: [`MapSet::rebuild_indexes`] re-derives it from the tries at every load,
//! before anything is attached, which repairs an index that is new (pins of an older build),
//! replaced (pinned with another shape, see [`check_pinned_shapes`]) or stale (a downgraded build
//! changed only the tries).
//!
//! # Peer host addresses
//!
//! `PEER_HOSTS_V4` / `PEER_HOSTS_V6` hold other nodes' own addresses, keyed by the bare address
//! bytes: an exact match, one probe, no index or record. They are primary state like the tries
//! (written only by the agent, never derived). A sync inserts before it deletes, so an address
//! wanted before and after never misses; only when the map has no room for both it deletes first.

use std::{
    collections::BTreeSet,
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, MapInfo, MapType, PerCpuArray},
    sys::SyscallError,
};
use ipnet::IpNet;
use wgmesh_ebpf_common::{
    CIDR_PRESENT, CLUSTER_MAX_ENTRIES, CONFIG_ENTRIES, CONFIG_INDEX, CONFIG_SIZE, COUNTER_SLOTS,
    CidrValue, Config, DERIVED_MAP_NAMES, Ipv4Key, Ipv6Key, LOCAL_MAX_ENTRIES, LPM_KEY_V4_SIZE,
    LPM_KEY_V6_SIZE, MAP_CLUSTER_V4, MAP_CLUSTER_V4_HASH, MAP_CLUSTER_V6, MAP_CLUSTER_V6_HASH,
    MAP_CONFIG, MAP_COUNTERS, MAP_LOCAL_V4, MAP_LOCAL_V4_HASH, MAP_LOCAL_V6, MAP_LOCAL_V6_HASH,
    MAP_NAMES, MAP_PEER_HOSTS_V4, MAP_PEER_HOSTS_V6, MAP_PREFIX_LENS, MAP_REMOTE_V4,
    MAP_REMOTE_V4_HASH, MAP_REMOTE_V6, MAP_REMOTE_V6_HASH, MAP_STATS, PEER_HOSTS_MAX_ENTRIES,
    PREFIX_KEY_V4_SIZE, PREFIX_KEY_V6_SIZE, REMOTE_MAX_ENTRIES, STATS_INDEX, STATS_SIZE, Stats,
    counter, prefix_lens,
};

use crate::{
    Counters, Error, SyncStats,
    cidr::{Family, HostAddr, V4, V6, lens_record, plan, split_hosts, split_normalized},
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
    let hash = |key_size, max_entries| MapShape {
        map_type: MapType::Hash,
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
        MAP_REMOTE_V4_HASH => hash(PREFIX_KEY_V4_SIZE, REMOTE_MAX_ENTRIES),
        MAP_REMOTE_V6_HASH => hash(PREFIX_KEY_V6_SIZE, REMOTE_MAX_ENTRIES),
        MAP_CLUSTER_V4_HASH => hash(PREFIX_KEY_V4_SIZE, CLUSTER_MAX_ENTRIES),
        MAP_CLUSTER_V6_HASH => hash(PREFIX_KEY_V6_SIZE, CLUSTER_MAX_ENTRIES),
        MAP_LOCAL_V4_HASH => hash(PREFIX_KEY_V4_SIZE, LOCAL_MAX_ENTRIES),
        MAP_LOCAL_V6_HASH => hash(PREFIX_KEY_V6_SIZE, LOCAL_MAX_ENTRIES),
        MAP_PREFIX_LENS => MapShape {
            map_type: MapType::Array,
            key_size: 4,
            value_size: 8,
            max_entries: prefix_lens::SETS,
        },
        MAP_STATS => MapShape {
            map_type: MapType::PerCpuArray,
            key_size: 4,
            value_size: STATS_SIZE,
            max_entries: 1,
        },
        MAP_PEER_HOSTS_V4 => hash(size_of::<Ipv4Key>() as u32, PEER_HOSTS_MAX_ENTRIES),
        MAP_PEER_HOSTS_V6 => hash(size_of::<Ipv6Key>() as u32, PEER_HOSTS_MAX_ENTRIES),
        _ => return None,
    })
}

fn is_not_found(err: &MapError) -> bool {
    matches!(err, MapError::SyscallError(SyscallError { io_error, .. }) if io_error.kind() == io::ErrorKind::NotFound)
}

/// What [`check_pinned_shapes`] does with a derived map (hash index, `PREFIX_LENS`) pinned with
/// another shape than this build's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShapeMismatch {
    /// Unpin it, so that loading creates it anew (the loaded datapath, which then rebuilds it).
    ReplaceDerived,
    /// Leave it alone (the read-only view, which never opens derived maps).
    IgnoreDerived,
}

/// Checks the pins left by an earlier run against the shapes this build declares.
///
/// A derived map (hash index, `PREFIX_LENS`) of another shape or flags is replaced or ignored,
/// per `derived`: replacing unpins it, loading creates it anew and [`MapSet::rebuild_indexes`]
/// fills it from the tries before anything is attached; programs still attached keep the old map
/// (they hold it by fd) until they are swapped. Any other map of another shape is refused: re-using
/// it would either fail the verifier or, worse, make the programs read the wrong bytes, and its
/// contents cannot be re-derived. Missing pins are fine (created on load). Returns the names of the
/// maps that are pinned and re-used.
pub(crate) fn check_pinned_shapes(
    bpffs_dir: &Path,
    derived: ShapeMismatch,
) -> Result<Vec<&'static str>, Error> {
    let mut pinned = Vec::new();
    for map in MAP_NAMES {
        let path = pin_path(bpffs_dir, map);
        let Some((found, flags)) = pinned_shape(&path)? else {
            continue;
        };
        let expected = expected_shape(map).ok_or(Error::MissingMap { map })?;
        let flags_ok = map != MAP_PREFIX_LENS || flags & prefix_lens::MAP_FLAGS != 0;
        if found == expected && flags_ok {
            pinned.push(map);
            continue;
        }
        if DERIVED_MAP_NAMES.contains(&map) {
            if derived == ShapeMismatch::ReplaceDerived {
                crate::bpffs::remove_pin(&path)?;
                tracing::info!(
                    map,
                    found = %found,
                    expected = %expected,
                    map_flags = flags,
                    "replacing a derived map pinned with another layout"
                );
            }
            continue;
        }
        return Err(Error::IncompatiblePinnedMap {
            map,
            path,
            expected,
            found,
        });
    }
    Ok(pinned)
}

/// The shape and flags of the map pinned at `path`, `None` if nothing is pinned there.
fn pinned_shape(path: &Path) -> Result<Option<(MapShape, u32)>, Error> {
    let inspect = |source| Error::InspectPinnedMap {
        path: path.to_path_buf(),
        source: Box::new(source),
    };
    let info = match MapInfo::from_pin(path) {
        Ok(info) => info,
        Err(err) if is_not_found(&err) => return Ok(None),
        Err(source) => return Err(inspect(source)),
    };
    let shape = MapShape {
        map_type: info.map_type().map_err(inspect)?,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
    };
    Ok(Some((shape, info.map_flags())))
}

/// Maps added after the first pinned layout: a pin set left by an older build lacks them.
/// [`Datapath::load`](crate::Datapath::load) creates them next to the re-used pins; the read-only
/// view treats them as empty until then. `MAP_NAMES` lists the first layout's six maps first.
pub(crate) const LATER_MAPS: &[&str] = MAP_NAMES.split_at(6).1;

/// Every trie and the index of its `PREFIX_LENS` record.
pub(crate) const LOOKUP_RECORDS: [(&str, u32); 6] = [
    (MAP_REMOTE_V4, prefix_lens::REMOTE_V4),
    (MAP_REMOTE_V6, prefix_lens::REMOTE_V6),
    (MAP_CLUSTER_V4, prefix_lens::CLUSTER_V4),
    (MAP_CLUSTER_V6, prefix_lens::CLUSTER_V6),
    (MAP_LOCAL_V4, prefix_lens::LOCAL_V4),
    (MAP_LOCAL_V6, prefix_lens::LOCAL_V6),
];

/// The names of one CIDR set's maps and its `PREFIX_LENS` records, per family (v4, v6).
struct SetNames {
    tries: [&'static str; 2],
    hashes: [&'static str; 2],
    lens: [u32; 2],
}

const REMOTE: SetNames = SetNames {
    tries: [MAP_REMOTE_V4, MAP_REMOTE_V6],
    hashes: [MAP_REMOTE_V4_HASH, MAP_REMOTE_V6_HASH],
    lens: [prefix_lens::REMOTE_V4, prefix_lens::REMOTE_V6],
};
const CLUSTER: SetNames = SetNames {
    tries: [MAP_CLUSTER_V4, MAP_CLUSTER_V6],
    hashes: [MAP_CLUSTER_V4_HASH, MAP_CLUSTER_V6_HASH],
    lens: [prefix_lens::CLUSTER_V4, prefix_lens::CLUSTER_V6],
};
const LOCAL: SetNames = SetNames {
    tries: [MAP_LOCAL_V4, MAP_LOCAL_V6],
    hashes: [MAP_LOCAL_V4_HASH, MAP_LOCAL_V6_HASH],
    lens: [prefix_lens::LOCAL_V4, prefix_lens::LOCAL_V6],
};

/// `PREFIX_LENS`, mapped into this process: records are published with one atomic store each.
pub(crate) struct PrefixLens {
    /// Keeps the map alive as long as the mapping.
    _map: MapData,
    records: NonNull<AtomicU64>,
    mapped_len: usize,
}

// SAFETY: the mapping is owned by this value alone (unmapped in `Drop`) and only accessed through
// atomics, so moving it to another thread is sound.
unsafe impl Send for PrefixLens {}

impl PrefixLens {
    fn new(map: Map) -> Result<Self, Error> {
        let mmap_error = |source| Error::MapMmap {
            map: MAP_PREFIX_LENS,
            source,
        };
        let Map::Array(data) = map else {
            return Err(Error::MissingMap {
                map: MAP_PREFIX_LENS,
            });
        };
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .unwrap_or(4096)
            .max(1);
        let bytes = prefix_lens::SETS as usize * size_of::<u64>();
        let mapped_len = bytes.div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of the map's value area (the kernel allows it for arrays
        // created with BPF_F_MMAPABLE and checks the length); no existing memory is affected.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(mmap_error(io::Error::last_os_error()));
        }
        let records = NonNull::new(addr.cast::<AtomicU64>())
            .ok_or_else(|| mmap_error(io::Error::other("mmap returned null")))?;
        Ok(Self {
            _map: data,
            records,
            mapped_len,
        })
    }

    fn record(&self, set: u32) -> &AtomicU64 {
        assert!(set < prefix_lens::SETS, "PREFIX_LENS index {set}");
        // SAFETY: `set` is inside the mapped array (8-byte values at 8-byte strides from a
        // page-aligned start), the mapping lives as long as `self`, and the memory is only ever
        // accessed atomically (here, and by the programs' single 8-byte loads).
        unsafe { self.records.add(set as usize).as_ref() }
    }

    /// Publishes `record` for `set` (nothing is written if it is already there).
    fn publish(&self, set: u32, record: u64) {
        let slot = self.record(set);
        if slot.load(Ordering::Acquire) != record {
            slot.store(record, Ordering::Release);
        }
    }

    /// The record of `set`.
    pub(crate) fn get(&self, set: u32) -> u64 {
        self.record(set).load(Ordering::Acquire)
    }
}

impl Drop for PrefixLens {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; no reference into it outlives
        // `self` (`record` borrows `self`).
        if unsafe { libc::munmap(self.records.as_ptr().cast(), self.mapped_len) } != 0 {
            tracing::warn!(map = MAP_PREFIX_LENS, error = %io::Error::last_os_error(), "munmap failed");
        }
    }
}

/// One family of one CIDR set: the trie and (loaded datapath only) its hash index.
struct FamilyMaps<F: Family> {
    trie: LpmTrie<MapData, F::Addr, CidrValue>,
    trie_name: &'static str,
    index: Option<HashIndex<F>>,
}

/// A hash index and the index of its `PREFIX_LENS` record.
struct HashIndex<F: Family> {
    hash: HashMap<MapData, F::HashKey, CidrValue>,
    name: &'static str,
    lens: u32,
}

/// What a hash index holds.
struct HashContents<F: Family> {
    nets: BTreeSet<F::Net>,
    /// Entries whose value is not [`CIDR_PRESENT`] (rewritten by a sync).
    stale: BTreeSet<F::Net>,
    /// Keys no CIDR stands for (a bad prefix length or host bits set): deleted by a sync.
    junk: Vec<F::HashKey>,
}

impl<F: Family> HashIndex<F> {
    fn read(&self) -> Result<HashContents<F>, Error> {
        let mut contents = HashContents {
            nets: BTreeSet::new(),
            stale: BTreeSet::new(),
            junk: Vec::new(),
        };
        for entry in self.hash.iter() {
            let (key, value) = entry.map_err(|source| Error::MapRead {
                map: self.name,
                source: Box::new(source),
            })?;
            match F::hash_net(&key) {
                Some(net) => {
                    contents.nets.insert(net);
                    if value != CIDR_PRESENT {
                        contents.stale.insert(net);
                    }
                }
                None => contents.junk.push(key),
            }
        }
        Ok(contents)
    }

    fn insert(&mut self, nets: &[F::Net]) -> Result<(), Error> {
        for net in nets {
            self.hash
                .insert(F::hash_key(net), CIDR_PRESENT, 0)
                .map_err(|source| insert_error(self.name, net, source))?;
        }
        Ok(())
    }

    fn remove(&mut self, nets: &[F::Net], junk: &[F::HashKey]) -> Result<(), Error> {
        let keys = nets
            .iter()
            .map(|net| (F::hash_key(net), net.to_string()))
            .chain(junk.iter().map(|key| (*key, "an invalid key".to_owned())));
        for (key, cidr) in keys {
            match self.hash.remove(&key) {
                Ok(()) => {}
                Err(err) if is_not_found(&err) => {}
                Err(source) => {
                    return Err(Error::MapDelete {
                        map: self.name,
                        cidr,
                        source: Box::new(source),
                    });
                }
            }
        }
        Ok(())
    }
}

/// The index's part of one sync.
struct IndexPlan<F: Family> {
    /// Inserts (new CIDRs and stale values).
    add: Vec<F::Net>,
    remove: Vec<F::Net>,
    junk: Vec<F::HashKey>,
    /// The record while old and new entries coexist (after the inserts, before the deletes).
    union_record: u64,
    /// How full the index gets if inserts go first.
    peak: usize,
}

impl<F: Family> FamilyMaps<F> {
    /// Makes the trie and the index hold exactly `desired`, with the fewest writes and in the
    /// order described in the module docs.
    fn sync(
        &mut self,
        desired: &BTreeSet<F::Net>,
        capacity: u32,
        lens: Option<&PrefixLens>,
    ) -> Result<SyncStats, Error> {
        let map = self.trie_name;
        let TrieContents {
            nets: current,
            stale,
        } = read_trie::<F>(&self.trie, map)?;
        let trie_plan = plan(&current, desired);
        let trie_add: Vec<F::Net> = trie_plan
            .add
            .iter()
            .chain(stale.intersection(desired))
            .copied()
            .collect();
        let mut index = match (self.index.as_mut(), lens) {
            (Some(index), Some(lens)) => Some((index, lens)),
            _ => None,
        };
        let index_plan = match &index {
            Some((index, _)) => {
                let held = index.read()?;
                let diff = plan(&held.nets, desired);
                Some(IndexPlan::<F> {
                    add: diff
                        .add
                        .iter()
                        .chain(held.stale.intersection(desired))
                        .copied()
                        .collect(),
                    peak: held.nets.len() + diff.add.len(),
                    remove: diff.remove,
                    junk: held.junk,
                    union_record: lens_record(held.nets.iter().chain(desired).map(F::prefix_len)),
                })
            }
            None => None,
        };
        let final_record = lens_record(desired.iter().map(F::prefix_len));
        // No room for the transient union: drop the unwanted entries first (they are not wanted,
        // so removing them early changes nothing for wanted traffic).
        let tight = current.len() + trie_plan.add.len() > capacity as usize
            || index_plan
                .as_ref()
                .is_some_and(|p| p.peak > capacity as usize);
        if tight {
            trie_remove::<F>(&mut self.trie, map, &trie_plan.remove)?;
            if let (Some((index, _)), Some(p)) = (index.as_mut(), index_plan.as_ref()) {
                index.remove(&p.remove, &p.junk)?;
            }
        }
        trie_insert::<F>(&mut self.trie, map, &trie_add)?;
        if let (Some((index, lens)), Some(p)) = (index.as_mut(), index_plan.as_ref()) {
            index.insert(&p.add)?;
            if !tight {
                lens.publish(index.lens, p.union_record);
            }
        }
        if !tight {
            trie_remove::<F>(&mut self.trie, map, &trie_plan.remove)?;
            if let (Some((index, _)), Some(p)) = (index.as_mut(), index_plan.as_ref()) {
                index.remove(&p.remove, &p.junk)?;
            }
        }
        if let Some((index, lens)) = index {
            lens.publish(index.lens, final_record);
        }
        if !trie_plan.is_empty() {
            tracing::debug!(
                map,
                added = trie_plan.add.len(),
                removed = trie_plan.remove.len(),
                "synced cidr map"
            );
        }
        Ok(SyncStats {
            added: trie_add.len(),
            removed: trie_plan.remove.len(),
        })
    }

    fn cidrs(&self) -> Result<BTreeSet<F::Net>, Error> {
        Ok(read_trie::<F>(&self.trie, self.trie_name)?.nets)
    }
}

fn trie_insert<F: Family>(
    trie: &mut LpmTrie<MapData, F::Addr, CidrValue>,
    map: &'static str,
    nets: &[F::Net],
) -> Result<(), Error> {
    for net in nets {
        trie.insert(&F::key(net), CIDR_PRESENT, 0)
            .map_err(|source| insert_error(map, net, source))?;
    }
    Ok(())
}

fn trie_remove<F: Family>(
    trie: &mut LpmTrie<MapData, F::Addr, CidrValue>,
    map: &'static str,
    nets: &[F::Net],
) -> Result<(), Error> {
    for net in nets {
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
}

fn insert_error(map: &'static str, net: &impl fmt::Display, source: MapError) -> Error {
    Error::MapInsert {
        map,
        cidr: net.to_string(),
        source: Box::new(source),
    }
}

/// One CIDR set, both families.
struct CidrSet {
    v4: FamilyMaps<V4>,
    v6: FamilyMaps<V6>,
    capacity: u32,
}

impl CidrSet {
    /// `with_index`: also take the hash indexes (loaded datapath); the read-only view only reads
    /// the tries.
    fn new(
        names: &SetNames,
        capacity: u32,
        with_index: bool,
        mut get: impl FnMut(&'static str) -> Result<Map, Error>,
    ) -> Result<Self, Error> {
        Ok(Self {
            v4: family(names, 0, with_index, &mut get)?,
            v6: family(names, 1, with_index, &mut get)?,
            capacity,
        })
    }

    /// Makes the set hold exactly `cidrs` (normalized, split by family) with minimal writes.
    fn sync(
        &mut self,
        cidrs: &BTreeSet<IpNet>,
        lens: Option<&PrefixLens>,
    ) -> Result<SyncStats, Error> {
        let (v4, v6) = split_normalized(cidrs);
        check_capacity(self.v4.trie_name, v4.len(), self.capacity)?;
        check_capacity(self.v6.trie_name, v6.len(), self.capacity)?;
        let stats_v4 = self.v4.sync(&v4, self.capacity, lens)?;
        let stats_v6 = self.v6.sync(&v6, self.capacity, lens)?;
        Ok(stats_v4 + stats_v6)
    }

    /// Re-derives the hash indexes and their records from the tries. Returns how many CIDRs the
    /// set holds.
    fn rebuild_index(&mut self, lens: &PrefixLens) -> Result<usize, Error> {
        let v4 = self.v4.cidrs()?;
        let v6 = self.v6.cidrs()?;
        self.v4.sync(&v4, self.capacity, Some(lens))?;
        self.v6.sync(&v6, self.capacity, Some(lens))?;
        Ok(v4.len() + v6.len())
    }

    fn cidrs(&self) -> Result<BTreeSet<IpNet>, Error> {
        Ok(both(self.v4.cidrs()?, self.v6.cidrs()?))
    }
}

/// The maps of family `family` (0 = v4, 1 = v6) of a set.
fn family<F: Family>(
    names: &SetNames,
    family: usize,
    with_index: bool,
    get: &mut impl FnMut(&'static str) -> Result<Map, Error>,
) -> Result<FamilyMaps<F>, Error> {
    let trie_name = names.tries[family];
    let index = if with_index {
        let name = names.hashes[family];
        Some(HashIndex {
            hash: typed(name, get(name)?)?,
            name,
            lens: names.lens[family],
        })
    } else {
        None
    };
    Ok(FamilyMaps {
        trie: typed(trie_name, get(trie_name)?)?,
        trie_name,
        index,
    })
}

/// One family of the peer host addresses: an exact-match hash keyed by the address bytes.
struct HostMap<A: HostAddr> {
    hash: HashMap<MapData, A::Key, CidrValue>,
    name: &'static str,
}

/// What a peer host map holds.
struct HostContents<A> {
    addrs: BTreeSet<A>,
    /// Entries whose value is not [`CIDR_PRESENT`] (rewritten by a sync if still wanted).
    stale: BTreeSet<A>,
}

impl<A: HostAddr> HostMap<A> {
    fn new(name: &'static str, raw: Map) -> Result<Self, Error> {
        Ok(Self {
            hash: typed(name, raw)?,
            name,
        })
    }

    fn read(&self) -> Result<HostContents<A>, Error> {
        let mut contents = HostContents {
            addrs: BTreeSet::new(),
            stale: BTreeSet::new(),
        };
        for entry in self.hash.iter() {
            let (key, value) = entry.map_err(|source| Error::MapRead {
                map: self.name,
                source: Box::new(source),
            })?;
            let addr = A::from_key(key);
            contents.addrs.insert(addr);
            if value != CIDR_PRESENT {
                contents.stale.insert(addr);
            }
        }
        Ok(contents)
    }

    fn insert(&mut self, addrs: &[A]) -> Result<(), Error> {
        for addr in addrs {
            self.hash
                .insert(addr.key(), CIDR_PRESENT, 0)
                .map_err(|source| insert_error(self.name, addr, source))?;
        }
        Ok(())
    }

    fn remove(&mut self, addrs: &[A]) -> Result<(), Error> {
        for addr in addrs {
            match self.hash.remove(&addr.key()) {
                Ok(()) => {}
                Err(err) if is_not_found(&err) => {}
                Err(source) => {
                    return Err(Error::MapDelete {
                        map: self.name,
                        cidr: addr.to_string(),
                        source: Box::new(source),
                    });
                }
            }
        }
        Ok(())
    }

    /// Makes the map hold exactly `desired`: inserts (new addresses, stale values) before
    /// deletes, unless the map has no room for both at once.
    fn sync(&mut self, desired: &BTreeSet<A>, capacity: u32) -> Result<SyncStats, Error> {
        let HostContents { addrs, stale } = self.read()?;
        let diff = plan(&addrs, desired);
        let add: Vec<A> = diff
            .add
            .iter()
            .chain(stale.intersection(desired))
            .copied()
            .collect();
        let tight = addrs.len() + diff.add.len() > capacity as usize;
        if tight {
            self.remove(&diff.remove)?;
        }
        self.insert(&add)?;
        if !tight {
            self.remove(&diff.remove)?;
        }
        if !add.is_empty() || !diff.remove.is_empty() {
            tracing::debug!(
                map = self.name,
                added = add.len(),
                removed = diff.remove.len(),
                "synced peer host map"
            );
        }
        Ok(SyncStats {
            added: add.len(),
            removed: diff.remove.len(),
        })
    }

    fn addrs(&self) -> Result<BTreeSet<A>, Error> {
        Ok(self.read()?.addrs)
    }
}

/// `PEER_HOSTS_V4` and `PEER_HOSTS_V6`.
struct PeerHosts {
    v4: HostMap<Ipv4Addr>,
    v6: HostMap<Ipv6Addr>,
}

impl PeerHosts {
    fn new(mut get: impl FnMut(&'static str) -> Result<Map, Error>) -> Result<Self, Error> {
        Ok(Self {
            v4: HostMap::new(MAP_PEER_HOSTS_V4, get(MAP_PEER_HOSTS_V4)?)?,
            v6: HostMap::new(MAP_PEER_HOSTS_V6, get(MAP_PEER_HOSTS_V6)?)?,
        })
    }

    fn sync(&mut self, hosts: &BTreeSet<IpAddr>) -> Result<SyncStats, Error> {
        let (v4, v6) = split_hosts(hosts);
        check_capacity(self.v4.name, v4.len(), PEER_HOSTS_MAX_ENTRIES)?;
        check_capacity(self.v6.name, v6.len(), PEER_HOSTS_MAX_ENTRIES)?;
        Ok(self.v4.sync(&v4, PEER_HOSTS_MAX_ENTRIES)?
            + self.v6.sync(&v6, PEER_HOSTS_MAX_ENTRIES)?)
    }

    fn hosts(&self) -> Result<BTreeSet<IpAddr>, Error> {
        Ok(self
            .v4
            .addrs()?
            .into_iter()
            .map(IpAddr::V4)
            .chain(self.v6.addrs()?.into_iter().map(IpAddr::V6))
            .collect())
    }
}

/// The maps, typed.
pub(crate) struct MapSet {
    remote: CidrSet,
    local: CidrSet,
    /// `None` only in a read-only view of pins from a build without the `CLUSTER_*` tries.
    cluster: Option<CidrSet>,
    /// `None` in the read-only view.
    lens: Option<PrefixLens>,
    config: Array<MapData, Config>,
    /// What earlier builds counted (one entry per counter); no longer written.
    legacy_counters: PerCpuArray<MapData, u64>,
    /// `None` only in a read-only view of pins from a build without it.
    stats: Option<PerCpuArray<MapData, Stats>>,
    /// `None` only in a read-only view of pins from a build without the `PEER_HOSTS_*` maps.
    peer_hosts: Option<PeerHosts>,
}

impl MapSet {
    /// Takes the maps out of a loaded object. Call after the programs are loaded: the programs
    /// reference the maps by fd, and the fds stay open as long as this set lives.
    pub(crate) fn take_from(ebpf: &mut Ebpf) -> Result<Self, Error> {
        let mut take = |map: &'static str| ebpf.take_map(map).ok_or(Error::MissingMap { map });
        Ok(Self {
            remote: CidrSet::new(&REMOTE, REMOTE_MAX_ENTRIES, true, &mut take)?,
            local: CidrSet::new(&LOCAL, LOCAL_MAX_ENTRIES, true, &mut take)?,
            cluster: Some(CidrSet::new(
                &CLUSTER,
                CLUSTER_MAX_ENTRIES,
                true,
                &mut take,
            )?),
            lens: Some(PrefixLens::new(take(MAP_PREFIX_LENS)?)?),
            config: typed(MAP_CONFIG, take(MAP_CONFIG)?)?,
            legacy_counters: typed(MAP_COUNTERS, take(MAP_COUNTERS)?)?,
            stats: Some(typed(MAP_STATS, take(MAP_STATS)?)?),
            peer_hosts: Some(PeerHosts::new(&mut take)?),
        })
    }

    /// Opens the maps from their pins under `bpffs_dir`, without loading any program.
    pub(crate) fn open_pinned(bpffs_dir: &Path) -> Result<Self, Error> {
        check_pinned_shapes(bpffs_dir, ShapeMismatch::IgnoreDerived)?;
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
        let pinned = |map: &str| pin_path(bpffs_dir, map).exists();
        let cluster_pinned = CLUSTER.tries.iter().all(|map| pinned(map));
        let peer_hosts_pinned = [MAP_PEER_HOSTS_V4, MAP_PEER_HOSTS_V6]
            .iter()
            .all(|map| pinned(map));
        Ok(Self {
            remote: CidrSet::new(&REMOTE, REMOTE_MAX_ENTRIES, false, open)?,
            local: CidrSet::new(&LOCAL, LOCAL_MAX_ENTRIES, false, open)?,
            cluster: if cluster_pinned {
                Some(CidrSet::new(&CLUSTER, CLUSTER_MAX_ENTRIES, false, open)?)
            } else {
                None
            },
            lens: None,
            config: typed(MAP_CONFIG, open(MAP_CONFIG)?)?,
            legacy_counters: typed(MAP_COUNTERS, open(MAP_COUNTERS)?)?,
            stats: if pinned(MAP_STATS) {
                Some(typed(MAP_STATS, open(MAP_STATS)?)?)
            } else {
                None
            },
            peer_hosts: if peer_hosts_pinned {
                Some(PeerHosts::new(open)?)
            } else {
                None
            },
        })
    }

    /// Re-derives every hash index and `PREFIX_LENS` record from the tries (see the module docs).
    /// Returns how many CIDRs were indexed.
    pub(crate) fn rebuild_indexes(&mut self) -> Result<usize, Error> {
        let lens = self.lens.as_ref().ok_or(Error::MissingMap {
            map: MAP_PREFIX_LENS,
        })?;
        let mut indexed = self.remote.rebuild_index(lens)? + self.local.rebuild_index(lens)?;
        if let Some(cluster) = self.cluster.as_mut() {
            indexed += cluster.rebuild_index(lens)?;
        }
        Ok(indexed)
    }

    /// The `PREFIX_LENS` record of a set (loaded datapath only).
    pub(crate) fn prefix_lens(&self, set: u32) -> Option<u64> {
        self.lens.as_ref().map(|lens| lens.get(set))
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

    /// The counters: what this layout's programs counted (`STATS`) plus what earlier builds
    /// counted (`COUNTERS`), summed over CPUs.
    pub(crate) fn counters(&self) -> Result<Counters, Error> {
        let stats = match &self.stats {
            Some(stats) => Some(
                stats
                    .get(&STATS_INDEX, 0)
                    .map_err(|source| Error::MapRead {
                        map: MAP_STATS,
                        source: Box::new(source),
                    })?,
            ),
            None => None,
        };
        let read = |slot: u32| -> Result<u64, Error> {
            let legacy = self
                .legacy_counters
                .get(&slot, 0)
                .map_err(|source| Error::MapRead {
                    map: MAP_COUNTERS,
                    source: Box::new(source),
                })?;
            let current = stats
                .iter()
                .flat_map(|per_cpu| per_cpu.iter())
                .map(|record| record.slots.get(slot as usize).copied().unwrap_or(0));
            Ok(legacy
                .iter()
                .copied()
                .chain(current)
                .fold(0u64, u64::wrapping_add))
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
        self.remote.sync(cidrs, self.lens.as_ref())
    }

    pub(crate) fn sync_local(&mut self, cidrs: &BTreeSet<IpNet>) -> Result<SyncStats, Error> {
        self.local.sync(cidrs, self.lens.as_ref())
    }

    pub(crate) fn sync_cluster(&mut self, cidrs: &BTreeSet<IpNet>) -> Result<SyncStats, Error> {
        self.cluster
            .as_mut()
            .ok_or(Error::MissingMap {
                map: MAP_CLUSTER_V4,
            })?
            .sync(cidrs, self.lens.as_ref())
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
            .map_or_else(|| Ok(BTreeSet::new()), CidrSet::cidrs)
    }

    pub(crate) fn sync_peer_hosts(&mut self, hosts: &BTreeSet<IpAddr>) -> Result<SyncStats, Error> {
        self.peer_hosts
            .as_mut()
            .ok_or(Error::MissingMap {
                map: MAP_PEER_HOSTS_V4,
            })?
            .sync(hosts)
    }

    /// Empty for pins of a build that had no `PEER_HOSTS_*` maps.
    pub(crate) fn peer_hosts(&self) -> Result<BTreeSet<IpAddr>, Error> {
        self.peer_hosts
            .as_ref()
            .map_or_else(|| Ok(BTreeSet::new()), PeerHosts::hosts)
    }
}

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
    fn only_maps_added_later_may_be_missing_from_an_older_pin_set() {
        // The first layout had the remote and local tries, CONFIG and COUNTERS.
        for map in [
            MAP_REMOTE_V4,
            MAP_REMOTE_V6,
            MAP_LOCAL_V4,
            MAP_LOCAL_V6,
            MAP_CONFIG,
            MAP_COUNTERS,
        ] {
            assert!(!LATER_MAPS.contains(&map), "{map}");
        }
        for map in LATER_MAPS {
            assert!(MAP_NAMES.contains(map), "{map}");
        }
        for map in CLUSTER.tries.iter().chain(&CLUSTER.hashes) {
            assert!(LATER_MAPS.contains(map), "{map}");
        }
        // The peer host maps came last: appended, so that every earlier map keeps its place.
        assert_eq!(
            MAP_NAMES[MAP_NAMES.len() - 2..],
            [MAP_PEER_HOSTS_V4, MAP_PEER_HOSTS_V6]
        );
        for map in [MAP_PEER_HOSTS_V4, MAP_PEER_HOSTS_V6] {
            assert!(LATER_MAPS.contains(&map), "{map}");
        }
    }

    #[test]
    fn peer_host_maps_are_exact_match_hashes_as_large_as_the_remote_tries() {
        for (map, key_size, remote) in [
            (MAP_PEER_HOSTS_V4, 4, MAP_REMOTE_V4),
            (MAP_PEER_HOSTS_V6, 16, MAP_REMOTE_V6),
        ] {
            let shape = expected_shape(map).expect("known map");
            assert_eq!(
                shape,
                MapShape {
                    map_type: MapType::Hash,
                    key_size,
                    value_size: 4,
                    max_entries: 16_384,
                },
                "{map}"
            );
            let remote = expected_shape(remote).expect("known map");
            assert_eq!(shape.max_entries, remote.max_entries, "{map}");
            // Written by the agent: a pin of another shape is refused, never silently replaced.
            assert!(!DERIVED_MAP_NAMES.contains(&map), "{map}");
        }
        assert_eq!(PEER_HOSTS_MAX_ENTRIES, REMOTE_MAX_ENTRIES);
    }

    #[test]
    fn map_names_are_unique_and_pinnable() {
        let names: BTreeSet<&str> = MAP_NAMES.iter().copied().collect();
        assert_eq!(names.len(), MAP_NAMES.len());
        for map in MAP_NAMES {
            assert!(!map.is_empty() && !map.contains('/'), "{map}");
        }
    }

    #[test]
    fn every_hash_index_is_derived_and_as_large_as_its_trie() {
        for set in [&REMOTE, &CLUSTER, &LOCAL] {
            for family in 0..2 {
                let (trie, hash) = (set.tries[family], set.hashes[family]);
                assert!(DERIVED_MAP_NAMES.contains(&hash), "{hash}");
                assert!(!DERIVED_MAP_NAMES.contains(&trie), "{trie}");
                let (trie, hash) = (
                    expected_shape(trie).expect("trie"),
                    expected_shape(hash).expect("hash"),
                );
                assert_eq!(trie.max_entries, hash.max_entries);
                // Same key bytes: prefix length, then the address.
                assert_eq!(trie.key_size, hash.key_size);
            }
        }
        assert!(DERIVED_MAP_NAMES.contains(&MAP_PREFIX_LENS));
        // Counts survive in COUNTERS and STATS: never thrown away as "derived".
        assert!(!DERIVED_MAP_NAMES.contains(&MAP_STATS));
        assert!(!DERIVED_MAP_NAMES.contains(&MAP_COUNTERS));
    }

    #[test]
    fn every_set_has_its_own_prefix_lens_record() {
        let records: BTreeSet<u32> = LOOKUP_RECORDS.iter().map(|(_, set)| *set).collect();
        assert_eq!(records.len(), prefix_lens::SETS as usize);
        for set in [&REMOTE, &CLUSTER, &LOCAL] {
            for family in 0..2 {
                assert!(
                    LOOKUP_RECORDS.contains(&(set.tries[family], set.lens[family])),
                    "{}",
                    set.tries[family]
                );
            }
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
