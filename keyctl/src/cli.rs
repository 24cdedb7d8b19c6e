//! The command line: every clap type. The doc comments are the help texts; each command's help
//! ends with examples and the exit codes. Every flag is also an environment variable
//! (`WGMESHCTL_*`, or the standard `KUBECONFIG`, or the agent's `WGMESH_NODE_NAME`).

use std::{ffi::OsString, path::PathBuf, time::Duration};

use clap::{ArgAction, ArgGroup, Args, CommandFactory as _, Parser, Subcommand, ValueEnum};

/// The agent's default status endpoint (`wgmesh-agent run --status-addr`).
pub const DEFAULT_STATUS_ADDR: &str = "127.0.0.1:9464";
/// The agent's default pin directory (`wgmesh-agent run --bpffs-dir`).
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/wgmesh";
/// How long `status` waits for the Kubernetes API before going on without it: long enough for a
/// healthy API across a WAN, short enough for a probe or an operator in a hurry.
pub const DEFAULT_API_TIMEOUT: &str = "5s";
/// How long `rotate --wait` waits per node: a little longer than the agent gives its peers to
/// confirm a new key (120 s) before it reports the rotation `failed`, so the agent's verdict arrives
/// first.
pub const DEFAULT_ROTATE_TIMEOUT: &str = "150s";
/// Name under which kubectl finds the binary as a plugin (`kubectl wgmesh ...`).
pub const KUBECTL_PLUGIN_NAME: &str = "kubectl-wgmesh";

/// The exit codes, shown at the end of every `--help`.
pub const EXIT_CODES: &str = "\
Exit codes:
  0  ok
  1  a check failed (--check found a problem) or a rotation failed
  2  usage error, or a runtime error (Kubernetes API or WireGuard device unreachable, ...)
  3  refused: a key rotation is already pending on the node (see rotate --force)
  4  timed out waiting for a key rotation";

const TOP_EXAMPLES: &str = "\
Examples:
  wgmeshctl status                        # on a node: peers, handshakes, verdicts
  wgmeshctl status --check -o json        # for a probe or a script
  wgmeshctl nodes --check                 # every Node's wgmesh identity and its problems
  wgmeshctl rotate --node node-a --wait   # new key for node-a, follow until every peer has it
  wgmeshctl rotate --all                  # rotate every node, one at a time
  wgmeshctl completions bash > /etc/bash_completion.d/wgmeshctl
  kubectl wgmesh nodes                    # the same binary installed as kubectl-wgmesh";

/// wgmeshctl: inspect a node's wgmesh WireGuard state and rotate wgmesh keys.
///
/// `status` runs on a node (it reads the local WireGuard device, the agent's status endpoint and
/// the pinned eBPF maps); `nodes` and `rotate` only need the Kubernetes API. Data goes to stdout
/// (`-o table` or `-o json`), diagnostics to stderr. Installed or symlinked as `kubectl-wgmesh`,
/// the binary is a kubectl plugin: `kubectl wgmesh status`.
#[derive(Debug, Parser)]
#[command(
    name = "wgmeshctl",
    version,
    after_help = format!("{TOP_EXAMPLES}\n\n{EXIT_CODES}"),
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// Kubeconfig file, or a colon-separated list of files merged as kubectl does. Without it:
    /// the in-cluster service account, else ~/.kube/config.
    #[arg(long, global = true, env = "KUBECONFIG", value_name = "PATH")]
    pub kubeconfig: Option<OsString>,
    /// Kubeconfig context to use instead of the current context.
    #[arg(long, global = true, env = "WGMESHCTL_CONTEXT", value_name = "NAME")]
    pub context: Option<String>,
    /// Output format: `table` for people, `json` for scripts (a stable, versioned schema; see
    /// keyctl/README.md).
    #[arg(
        short = 'o',
        long,
        global = true,
        env = "WGMESHCTL_OUTPUT",
        value_enum,
        default_value_t = Output::Table
    )]
    pub output: Output,
    /// More diagnostics on stderr: -v info, -vv debug, -vvv trace (RUST_LOG overrides).
    #[arg(short, long, global = true, action = ArgAction::Count, env = "WGMESHCTL_VERBOSE")]
    pub verbose: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Status(StatusArgs),
    Nodes(NodesArgs),
    Rotate(RotateArgs),
    Completions(CompletionsArgs),
}

/// Show this node's WireGuard peers, their handshakes and a verdict per peer.
///
/// Run it on a node (root, or CAP_NET_ADMIN and read access to /sys/fs/bpf). It reads the local
/// WireGuard interface directly (the userspace device's UAPI socket if it answers, else kernel
/// WireGuard over netlink), the agent's status endpoint, the pinned eBPF maps and the Nodes.
/// Any source but the device may be unavailable: a warning goes to stderr and the rest is shown.
///
/// Verdicts: ok (handshake within the last 180 s), no handshake yet, stale (older),
/// key mismatch (the peer belongs to node X by its allowed IPs or endpoint, but X publishes
/// another key), unknown peer (no node publishes its key), missing (a node this node should
/// peer with has no peer on the device).
#[derive(Debug, Clone, Args)]
#[command(after_help = format!("\
Examples:
  wgmeshctl status
  wgmeshctl status --interface wgmesh0 --status-addr 127.0.0.1:9464
  wgmeshctl status --check -o json | jq '.peers[] | select(.verdict != \"ok\")'
  kubectl exec -n kube-system wgmesh-x7k2p -c agent -- wgmeshctl status  # the pod on that node

{EXIT_CODES}"))]
pub struct StatusArgs {
    /// WireGuard interface to inspect.
    #[arg(long, env = "WGMESHCTL_INTERFACE", default_value = wgmesh::config::DEFAULT_INTERFACE)]
    pub interface: String,
    /// The agent's local status endpoint (HOST:PORT).
    #[arg(long, env = "WGMESHCTL_STATUS_ADDR", default_value = DEFAULT_STATUS_ADDR)]
    pub status_addr: String,
    /// The agent's eBPF pin directory (counters, strict mode).
    #[arg(long, env = "WGMESHCTL_BPFFS_DIR", default_value = DEFAULT_BPFFS_DIR)]
    pub bpffs_dir: PathBuf,
    /// This node's name. Default: the agent's status, else the Node publishing the device's key.
    #[arg(long, env = "WGMESH_NODE_NAME")]
    pub node: Option<String>,
    /// How long to wait for the Kubernetes API before going on without it.
    #[arg(long, env = "WGMESHCTL_API_TIMEOUT", default_value = DEFAULT_API_TIMEOUT, value_parser = parse_duration)]
    pub api_timeout: Duration,
    /// Exit 1 unless every peer's verdict is ok.
    #[arg(long, env = "WGMESHCTL_CHECK", value_parser = clap::builder::BoolishValueParser::new(), action = ArgAction::SetTrue)]
    pub check: bool,
}

/// List every Node's wgmesh identity: key, endpoint, pod CIDRs, key generation and age, rotation
/// state, problems.
///
/// Problems: a missing or malformed annotation, a public key published by more than one node,
/// pod CIDRs that overlap another node's. Only needs the Kubernetes API.
#[derive(Debug, Clone, Args)]
#[command(after_help = format!("\
Examples:
  wgmeshctl nodes
  wgmeshctl nodes --check                 # exit 1 if any node has a problem
  wgmeshctl nodes -o json --context prod

{EXIT_CODES}"))]
pub struct NodesArgs {
    /// Exit 1 if any node has a problem.
    #[arg(long, env = "WGMESHCTL_CHECK", value_parser = clap::builder::BoolishValueParser::new(), action = ArgAction::SetTrue)]
    pub check: bool,
}

/// Ask a node's agent for a new WireGuard key, and optionally follow the rotation.
///
/// Sets annotation v1.wgmesh.io/rotate-request on the Node to the next key generation. The
/// node's agent generates and applies the new key, publishes it and reports progress in
/// v1.wgmesh.io/rotation-status until every peer completed a handshake with the new key.
/// A rotation already pending on the node is never overridden (exit 3) unless --force, which
/// re-requests without ever lowering the pending generation (use it with --wait to follow a
/// rotation someone else started). Requesting again after a rotation completed starts the next
/// generation. --all rotates every node that has published a key, at most --max-concurrent at a
/// time, waiting for each, and stops starting new ones after the first failure or timeout.
#[derive(Debug, Clone, Args)]
#[command(
    group(ArgGroup::new("target").required(true).args(["node", "all"])),
    after_help = format!("\
Examples:
  wgmeshctl rotate --node node-a                      # request and return
  wgmeshctl rotate --node node-a --wait --timeout 3m  # exit 0 once every peer has the new key
  wgmeshctl rotate --all --max-concurrent 2
  wgmeshctl rotate --node node-a --force --wait       # follow a rotation already pending

{EXIT_CODES}")
)]
pub struct RotateArgs {
    /// The Node to rotate.
    #[arg(long, env = "WGMESHCTL_NODE", value_name = "NAME")]
    pub node: Option<String>,
    /// Rotate every node that has published a key, one after the other (implies --wait).
    #[arg(long, env = "WGMESHCTL_ROTATE_ALL", value_parser = clap::builder::BoolishValueParser::new(), action = ArgAction::SetTrue)]
    pub all: bool,
    /// Follow the rotation until it completes, fails or times out (progress on stderr).
    #[arg(long, env = "WGMESHCTL_WAIT", value_parser = clap::builder::BoolishValueParser::new(), action = ArgAction::SetTrue)]
    pub wait: bool,
    /// How long to wait for each node (e.g. 90s, 3m).
    #[arg(long, env = "WGMESHCTL_TIMEOUT", default_value = DEFAULT_ROTATE_TIMEOUT, value_parser = parse_duration)]
    pub timeout: Duration,
    /// With --all: how many nodes may rotate at the same time.
    #[arg(long, env = "WGMESHCTL_MAX_CONCURRENT", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_concurrent: u16,
    /// Request even though a rotation is pending (the requested generation is never lowered).
    #[arg(long, env = "WGMESHCTL_FORCE", value_parser = clap::builder::BoolishValueParser::new(), action = ArgAction::SetTrue)]
    pub force: bool,
}

/// Print a shell completion script to stdout.
#[derive(Debug, Clone, Args)]
#[command(hide = true, after_help = format!("\
Examples:
  wgmeshctl completions bash > /etc/bash_completion.d/wgmeshctl
  wgmeshctl completions zsh > \"${{fpath[1]}}/_wgmeshctl\"

{EXIT_CODES}"))]
pub struct CompletionsArgs {
    /// The shell to generate completions for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// A duration such as `120s`, `2m`, `1m30s` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let d: jiff::SignedDuration = s
        .parse()
        .map_err(|e| format!("{s:?} is not a duration like 90s, 2m or 1m30s ({e})"))?;
    Duration::try_from(d).map_err(|_| format!("{s:?} is negative"))
}

/// The clap command, named after how the binary was called: `kubectl wgmesh` when kubectl runs
/// it as a plugin, so usage lines match what the user typed.
pub fn command_for(argv0: Option<&std::ffi::OsStr>) -> clap::Command {
    let cmd = Cli::command();
    let called = argv0
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(|f| f.to_str());
    if called == Some(KUBECTL_PLUGIN_NAME) {
        cmd.bin_name("kubectl wgmesh")
    } else {
        cmd
    }
}

/// Writes the completion script for `shell`.
pub fn write_completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "wgmeshctl", out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_parse_in_friendly_and_plain_forms() {
        for (s, secs) in [("120s", 120), ("2m", 120), ("1m30s", 90), ("45", 45)] {
            assert_eq!(parse_duration(s), Ok(Duration::from_secs(secs)), "{s}");
        }
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-5s").is_err());
    }

    #[test]
    fn rotate_needs_exactly_one_target() {
        assert!(Cli::try_parse_from(["wgmeshctl", "rotate"]).is_err());
        assert!(Cli::try_parse_from(["wgmeshctl", "rotate", "--node", "a", "--all"]).is_err());
        assert!(
            Cli::try_parse_from(["wgmeshctl", "rotate", "--all", "--max-concurrent", "0"]).is_err()
        );
        let cli = Cli::try_parse_from(["wgmeshctl", "rotate", "--node", "a", "--wait"]).unwrap();
        let Command::Rotate(r) = cli.command else {
            panic!("not rotate")
        };
        assert_eq!(r.node.as_deref(), Some("a"));
        assert!(r.wait && !r.all && !r.force);
        assert_eq!(r.max_concurrent, 1);
    }

    #[test]
    fn global_flags_work_before_and_after_the_command() {
        let a =
            Cli::try_parse_from(["wgmeshctl", "-o", "json", "nodes", "--context", "c"]).unwrap();
        let b =
            Cli::try_parse_from(["wgmeshctl", "nodes", "-o", "json", "--context", "c"]).unwrap();
        for cli in [a, b] {
            assert_eq!(cli.global.output, Output::Json);
            assert_eq!(cli.global.context.as_deref(), Some("c"));
        }
    }

    #[test]
    fn the_kubectl_plugin_name_changes_the_usage_line() {
        let mut cmd = command_for(Some(std::ffi::OsStr::new("/usr/local/bin/kubectl-wgmesh")));
        assert!(cmd.render_usage().to_string().contains("kubectl wgmesh"));
        let mut cmd = command_for(Some(std::ffi::OsStr::new("wgmeshctl")));
        assert!(cmd.render_usage().to_string().contains("wgmeshctl"));
    }
}
