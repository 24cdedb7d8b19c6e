//! Harness for simulated wgmesh clusters in network namespaces.
