//! Re-run the eBPF build when bpf-linker changes.
//!
//! Building the `wgmesh-ebpf` binary has an undeclared dependency on the `bpf-linker` executable.
//! That would be better expressed by artifact dependencies, but
//! TODO(https://github.com/rust-lang/cargo/issues/12385) makes them impractical, so instead cargo
//! is told to rebuild whenever the mtime of `which bpf-linker` changes (a different bpf-linker put
//! earlier on PATH is still not noticed).
use which::which;

fn main() {
    match which("bpf-linker") {
        Ok(bpf_linker) => println!("cargo:rerun-if-changed={}", bpf_linker.display()),
        // The eBPF build itself fails with a clear linker error; the library target (built for the
        // host as a build-dependency of wgmesh-datapath) does not need the linker at all.
        Err(err) => println!("cargo:warning=bpf-linker not found on PATH: {err}"),
    }
}
