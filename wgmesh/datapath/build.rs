//! Builds the `wgmesh-ebpf` programs for `bpf{el,eb}-unknown-none` and leaves the object at
//! `$OUT_DIR/wgmesh-ebpf`, where `src/lib.rs` embeds it with `include_bytes_aligned!`.
//!
//! aya-build runs `rustup run nightly cargo build -Z build-std=core` for the eBPF crate, so a plain
//! `cargo build` on stable works as long as `rustup`, a nightly toolchain with `rust-src` and
//! `bpf-linker` are on PATH (`.ci/bootstrap` installs them).
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

const EBPF_PACKAGE: &str = "wgmesh-ebpf";

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("failed to run cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|package| package.name.as_str() == EBPF_PACKAGE)
        .ok_or_else(|| anyhow!("package {EBPF_PACKAGE} is not in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("manifest path {} has no parent", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [Package {
            name: EBPF_PACKAGE,
            root_dir: root_dir.as_str(),
            ..Package::default()
        }],
        Toolchain::default(),
    )
    .context("failed to build the eBPF programs")?;

    // With AYA_BUILD_SKIP=1 (clippy/doc runs without nightly) aya-build produces nothing; leave an
    // empty placeholder so `include_bytes_aligned!` compiles. `Datapath::load` rejects it with
    // `Error::ObjectNotBuilt`.
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    let object = out_dir.join(EBPF_PACKAGE);
    if !object.exists() {
        fs::write(&object, b"")
            .with_context(|| format!("failed to write placeholder {}", object.display()))?;
    }
    Ok(())
}
