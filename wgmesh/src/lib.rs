//! The wgmesh node agent.
