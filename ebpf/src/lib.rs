//! Library target of `wgmesh-ebpf`; the programs themselves are in `main.rs` (the `wgmesh-ebpf`
//! binary, built for `bpfel-unknown-none` by `wgmesh-datapath`'s build script through aya-build).
//!
//! This target exists only so that `wgmesh-datapath` can list the crate as a build-dependency:
//! cargo then re-runs its build script (and so rebuilds the eBPF object) whenever these sources
//! change. It must stay empty and `no_std`.
#![no_std]
