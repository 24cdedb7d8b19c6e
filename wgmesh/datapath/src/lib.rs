//! wgmesh datapath: TC eBPF programs loaded with aya.
