//! `wgmeshctl`: rotates wgmesh keys and inspects a node's WireGuard state.
fn main() {
    eprintln!("wgmeshctl: not built yet");
    std::process::exit(2);
}
