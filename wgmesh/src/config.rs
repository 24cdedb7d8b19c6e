//! Command line and environment, validated into typed configuration before any side effect.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Default WireGuard interface name (compare cilium_wg0, kilo0).
pub const DEFAULT_INTERFACE: &str = "wgmesh0";
/// Default WireGuard UDP port: the IANA-less but universal WireGuard default.
pub const DEFAULT_LISTEN_PORT: u16 = 51820;
/// Mark bit that sends a packet into the tunnel. One bit of its own, outside the bits kube-proxy
/// (0x4000, 0x8000), Calico (0xffff0000 by default is configurable) and Cilium (0x0f00) use.
pub const DEFAULT_FWMARK: u32 = 0x0010_0000;
/// Routing table holding the route into the tunnel (51820, like wg-quick's first free table).
pub const DEFAULT_ROUTE_TABLE: u32 = 51820;
/// Priority of the `fwmark -> table` rule: before `main` (32766), after `local` (0).
pub const DEFAULT_RULE_PRIORITY: u32 = 100;
/// Routing table of host encryption: the node's own traffic to peered pod CIDRs.
pub const DEFAULT_HOST_ROUTE_TABLE: u32 = 51821;
/// Priority of the `iif lo -> host table` rule, right after the fwmark rule.
pub const DEFAULT_HOST_RULE_PRIORITY: u32 = 101;
/// WireGuard overhead for an IPv6 underlay (40 IPv6 + 8 UDP + 32 WireGuard), also safe for IPv4.
pub const WIREGUARD_OVERHEAD: u32 = 80;
/// Full resync even without events, so drift in the kernel is repaired (level-triggered).
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(30);
/// Persistent keepalive towards every peer: keeps NAT/conntrack state and makes a restarted peer
/// re-initiate quickly (libraries.md pitfall 10).
pub const DEFAULT_KEEPALIVE_SECS: u16 = 25;

#[derive(Debug, Parser)]
#[command(
    name = "wgmesh-agent",
    version,
    about = "wgmesh node agent: encrypts pod traffic between Kubernetes nodes with WireGuard",
    long_about = "wgmesh node agent: keeps a WireGuard key per node, publishes its public key on the \
                  node's Node object, peers with every other node and steers pod traffic bound for \
                  other nodes into the tunnel with TC eBPF.\n\nExamples:\n  \
                  wgmesh-agent run --node-name $(hostname)\n  \
                  wgmesh-agent device --interface wgmesh0\n  \
                  wgmesh-agent cleanup"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[arg(long, global = true, env = "WGMESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (the DaemonSet's main container).
    Run(Box<RunArgs>),
    /// Run the userspace WireGuard device (boringtun) for INTERFACE until stopped. It lives in its own
    /// process (or container) so that restarting the agent never drops traffic.
    Device(DeviceArgs),
    /// Remove everything the agent installed on this node: device, routes, rule, eBPF programs and maps.
    Cleanup(CleanupArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// Kernel WireGuard when the kernel supports it, else userspace.
    Auto,
    Kernel,
    Userspace,
}

#[derive(Debug, Clone, Args)]
pub struct NodeLocalArgs {
    /// WireGuard interface name.
    #[arg(long, env = "WGMESH_INTERFACE", default_value = DEFAULT_INTERFACE)]
    pub interface: String,
    /// Directory for the private key and local state (a hostPath in Kubernetes).
    #[arg(long, env = "WGMESH_STATE_DIR", default_value = "/var/lib/wgmesh")]
    pub state_dir: PathBuf,
    /// Directory on a bpffs where wgmesh pins its eBPF maps and links.
    #[arg(long, env = "WGMESH_BPFFS_DIR", default_value = "/sys/fs/bpf/wgmesh")]
    pub bpffs_dir: PathBuf,
    /// Mark bit set on packets bound for the tunnel.
    #[arg(long, env = "WGMESH_FWMARK", value_parser = parse_u32, default_value = "0x00100000")]
    pub fwmark: u32,
    /// Routing table for marked packets.
    #[arg(long, env = "WGMESH_ROUTE_TABLE", default_value_t = DEFAULT_ROUTE_TABLE)]
    pub route_table: u32,
    /// Priority of the fwmark rule.
    #[arg(long, env = "WGMESH_RULE_PRIORITY", default_value_t = DEFAULT_RULE_PRIORITY)]
    pub rule_priority: u32,
    /// Routing table for the node's own traffic to peered pod CIDRs (host encryption).
    #[arg(long, env = "WGMESH_HOST_ROUTE_TABLE", default_value_t = DEFAULT_HOST_ROUTE_TABLE)]
    pub host_route_table: u32,
    /// Priority of the host-encryption rule (`iif lo lookup <host table>`).
    #[arg(long, env = "WGMESH_HOST_RULE_PRIORITY", default_value_t = DEFAULT_HOST_RULE_PRIORITY)]
    pub host_rule_priority: u32,
    /// Uplink interface (the one carrying the node address). Default: the interface holding the
    /// node's InternalIP.
    #[arg(long, env = "WGMESH_UPLINK")]
    pub uplink: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// This node's name (in Kubernetes: the downward API `spec.nodeName`).
    #[arg(long, env = "WGMESH_NODE_NAME")]
    pub node_name: String,
    /// Kubeconfig file; without it the in-cluster service account (or ~/.kube/config) is used.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    #[command(flatten)]
    pub local: NodeLocalArgs,
    /// WireGuard listen port, published in the Node annotation.
    #[arg(long, env = "WGMESH_LISTEN_PORT", default_value_t = DEFAULT_LISTEN_PORT)]
    pub listen_port: u16,
    #[arg(long, env = "WGMESH_BACKEND", value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// Start the userspace device process if none is running (off when it runs as its own container).
    #[arg(long, env = "WGMESH_SPAWN_DEVICE", default_value_t = true, action = clap::ArgAction::Set)]
    pub spawn_device: bool,
    /// Tunnel MTU. Default: uplink MTU minus the WireGuard overhead (80).
    #[arg(long, env = "WGMESH_MTU")]
    pub mtu: Option<u32>,
    /// Name prefixes of host-side pod interfaces to steer (veth for most CNIs, cali for Calico,
    /// lxc for Cilium). Repeatable or comma separated.
    #[arg(
        long,
        env = "WGMESH_POD_INTERFACE_PREFIX",
        value_delimiter = ',',
        default_value = "veth,cali,lxc"
    )]
    pub pod_interface_prefix: Vec<String>,
    /// Encrypt this node's own traffic (host network processes, the kubelet, node ports answering
    /// from the node address) to pods on other nodes, and pods' traffic to other nodes' addresses,
    /// with every node that does the same (each publishes its InternalIPs in
    /// `v1.wgmesh.io/host-addresses`). Node-to-node traffic stays outside the tunnel.
    #[arg(long, env = "WGMESH_HOST_ENCRYPTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub host_encryption: bool,
    /// Drop plaintext pod traffic leaving the uplink instead of only counting it (fail closed).
    #[arg(long, env = "WGMESH_STRICT", default_value_t = false, action = clap::ArgAction::Set)]
    pub strict: bool,
    /// Persistent keepalive in seconds towards every peer (0 disables).
    #[arg(long, env = "WGMESH_KEEPALIVE", default_value_t = DEFAULT_KEEPALIVE_SECS)]
    pub keepalive: u16,
    /// Address of the local status endpoint (/healthz, /readyz, /metrics, /status).
    #[arg(long, env = "WGMESH_STATUS_ADDR", default_value = "127.0.0.1:9464")]
    pub status_addr: SocketAddr,
    /// Full resync interval in seconds.
    #[arg(long, env = "WGMESH_RESYNC_SECONDS", default_value_t = DEFAULT_RESYNC.as_secs())]
    pub resync_seconds: u64,
}

#[derive(Debug, Clone, Args)]
pub struct DeviceArgs {
    #[arg(long, env = "WGMESH_INTERFACE", default_value = DEFAULT_INTERFACE)]
    pub interface: String,
    /// Worker threads of the device.
    #[arg(long, env = "WGMESH_DEVICE_THREADS", default_value_t = 2)]
    pub threads: usize,
    /// Which userspace WireGuard implementation runs the device. The agent starts the device as a
    /// child process, which inherits WGMESH_DEVICE_ENGINE.
    #[arg(long, env = "WGMESH_DEVICE_ENGINE", value_enum, default_value_t = DeviceEngine::Batched)]
    pub engine: DeviceEngine,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum DeviceEngine {
    /// wgmesh-device: boringtun's protocol with batched I/O (TSO/GSO/GRO offloads).
    #[default]
    Batched,
    /// boringtun's stock device (one syscall per packet).
    Boringtun,
}

#[derive(Debug, Clone, Args)]
pub struct CleanupArgs {
    #[command(flatten)]
    pub local: NodeLocalArgs,
    /// Also delete the private key (the node gets a new identity on its next start).
    #[arg(long, default_value_t = false)]
    pub remove_key: bool,
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s:?} is not a 32-bit number: {e}"))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("interface name {0:?} must be 1-15 characters without '/' or whitespace")]
    InterfaceName(String),
    #[error("node name must not be empty")]
    NodeName,
    #[error("listen port must not be 0")]
    ListenPort,
    #[error("fwmark must not be 0")]
    Fwmark,
    #[error("route table {0} is reserved (0, 253-255)")]
    RouteTable(u32),
    #[error("the host route table must differ from the route table ({0})")]
    HostRouteTable(u32),
    #[error("MTU {0} is outside 1280-65535")]
    Mtu(u32),
    #[error("at least one non-empty pod interface prefix is needed")]
    PodPrefix,
    #[error("resync interval must be at least 1 second")]
    Resync,
}

/// Checks the values clap cannot check by type.
pub fn validate_interface(name: &str) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.len() > 15
        || name.contains('/')
        || name.chars().any(char::is_whitespace)
    {
        return Err(ConfigError::InterfaceName(name.to_owned()));
    }
    Ok(())
}

impl NodeLocalArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_interface(&self.interface)?;
        if self.fwmark == 0 {
            return Err(ConfigError::Fwmark);
        }
        for t in [self.route_table, self.host_route_table] {
            if matches!(t, 0 | 253..=255) {
                return Err(ConfigError::RouteTable(t));
            }
        }
        if self.host_route_table == self.route_table {
            return Err(ConfigError::HostRouteTable(self.route_table));
        }
        Ok(())
    }
}

impl RunArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.local.validate()?;
        if self.node_name.trim().is_empty() {
            return Err(ConfigError::NodeName);
        }
        if self.listen_port == 0 {
            return Err(ConfigError::ListenPort);
        }
        if let Some(m) = self.mtu
            && !(1280..=65535).contains(&m)
        {
            return Err(ConfigError::Mtu(m));
        }
        if self
            .pod_interface_prefix
            .iter()
            .all(|p| p.trim().is_empty())
        {
            return Err(ConfigError::PodPrefix);
        }
        if self.resync_seconds == 0 {
            return Err(ConfigError::Resync);
        }
        Ok(())
    }

    pub fn resync(&self) -> Duration {
        Duration::from_secs(self.resync_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("wgmesh-agent").chain(args.iter().copied()))
    }

    fn run_args(extra: &[&str]) -> RunArgs {
        let mut a = vec!["run", "--node-name", "n1"];
        a.extend_from_slice(extra);
        match parse(&a).unwrap().command {
            Command::Run(r) => *r,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        let r = run_args(&[]);
        assert_eq!(r.local.interface, DEFAULT_INTERFACE);
        assert_eq!(r.local.fwmark, DEFAULT_FWMARK);
        assert_eq!(r.pod_interface_prefix, ["veth", "cali", "lxc"]);
        assert!(r.host_encryption, "host encryption is on by default");
        assert!(!run_args(&["--host-encryption", "false"]).host_encryption);
        r.validate().unwrap();
    }

    #[test]
    fn table_of_invalid_settings() {
        let cases: &[(&[&str], ConfigError)] = &[
            (
                &["--interface", "a-very-long-interface"],
                ConfigError::InterfaceName("a-very-long-interface".into()),
            ),
            (
                &["--interface", "a/b"],
                ConfigError::InterfaceName("a/b".into()),
            ),
            (&["--listen-port", "0"], ConfigError::ListenPort),
            (&["--fwmark", "0"], ConfigError::Fwmark),
            (&["--route-table", "254"], ConfigError::RouteTable(254)),
            (&["--host-route-table", "255"], ConfigError::RouteTable(255)),
            (
                &["--host-route-table", "51820"],
                ConfigError::HostRouteTable(51820),
            ),
            (&["--mtu", "500"], ConfigError::Mtu(500)),
            (&["--pod-interface-prefix", ""], ConfigError::PodPrefix),
            (&["--resync-seconds", "0"], ConfigError::Resync),
        ];
        for (args, want) in cases {
            assert_eq!(run_args(args).validate().as_ref(), Err(want), "{args:?}");
        }
    }

    /// Every `WGMESH_*` variable the DaemonSet sets is one the agent reads (a typo there would be
    /// silently ignored in production).
    #[test]
    fn deploy_manifest_sets_only_known_variables() {
        use clap::CommandFactory as _;
        fn envs(cmd: &clap::Command, out: &mut Vec<String>) {
            out.extend(
                cmd.get_arguments()
                    .filter_map(|a| a.get_env())
                    .map(|e| e.to_string_lossy().into_owned()),
            );
            for sub in cmd.get_subcommands() {
                envs(sub, out);
            }
        }
        let mut known = Vec::new();
        envs(&Cli::command(), &mut known);
        let manifest = include_str!("../../deploy/daemonset.yaml");
        let set: Vec<&str> = manifest
            .lines()
            .filter_map(|l| l.trim().strip_prefix("- name: "))
            .filter(|n| n.starts_with("WGMESH_"))
            .collect();
        assert!(set.len() >= 5, "found only {set:?}");
        for name in set {
            assert!(
                known.iter().any(|k| k == name),
                "{name} is not an agent setting"
            );
        }
    }

    #[test]
    fn numbers_parse_in_hex_and_decimal_and_garbage_is_refused() {
        assert_eq!(run_args(&["--fwmark", "0x20"]).local.fwmark, 0x20);
        assert_eq!(run_args(&["--fwmark", "32"]).local.fwmark, 32);
        assert!(parse(&["run", "--node-name", "n", "--fwmark", "zz"]).is_err());
        assert!(parse(&["run"]).is_err(), "node name is required");
    }
}
