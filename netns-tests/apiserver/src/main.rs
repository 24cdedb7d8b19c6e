//! `wgmesh-apiserver`: the command-line front of the Kubernetes API stand-in.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use serde_json::Value;
use tracing::info;
use wgmesh_apiserver::{Config, kubeconfig};

/// A Kubernetes API stand-in serving the Node subset over plain HTTP/1.1.
#[derive(Debug, Parser)]
#[command(name = "wgmesh-apiserver", version, about)]
struct Args {
    /// Address for the Kubernetes API (plain HTTP), repeatable; the env var takes a comma list.
    #[arg(
        long = "listen",
        env = "WGMESH_APISERVER_LISTEN",
        value_delimiter = ','
    )]
    listen: Vec<SocketAddr>,
    /// Unix socket serving the API plus the /_control/* routes (a stale file is removed).
    #[arg(long, env = "WGMESH_APISERVER_CONTROL_SOCKET")]
    control_socket: Option<PathBuf>,
    /// Write a kubeconfig for this server here.
    #[arg(long, env = "WGMESH_APISERVER_KUBECONFIG_OUT")]
    kubeconfig_out: Option<PathBuf>,
    /// Server URL written into the kubeconfig (default http://<first listen address>).
    #[arg(long, env = "WGMESH_APISERVER_SERVER_URL")]
    server_url: Option<String>,
    /// Bearer token written into the kubeconfig (the server accepts any token).
    #[arg(long, env = "WGMESH_APISERVER_TOKEN", default_value = kubeconfig::DEFAULT_TOKEN)]
    token: String,
    /// JSON file with Nodes to create at start: a list, a NodeList or a single Node.
    #[arg(long, env = "WGMESH_APISERVER_NODES_FILE")]
    nodes_file: Option<PathBuf>,
    /// Seconds between BOOKMARK events on watches that allow them (fractions allowed).
    #[arg(
        long,
        env = "WGMESH_APISERVER_BOOKMARK_INTERVAL",
        default_value_t = 5.0
    )]
    bookmark_interval: f64,
    /// Number of watch events kept; a watch from an older resourceVersion gets ERROR 410.
    #[arg(
        long,
        env = "WGMESH_APISERVER_HISTORY_WINDOW",
        default_value_t = 10_000
    )]
    history_window: usize,
    /// Watch length in seconds when the client sends no timeoutSeconds.
    #[arg(long, env = "WGMESH_APISERVER_WATCH_TIMEOUT", default_value_t = 1800)]
    watch_timeout: u64,
    /// Log filter (error, warn, info, debug, trace, or a tracing EnvFilter directive).
    #[arg(long, env = "WGMESH_APISERVER_LOG_LEVEL", default_value = "info")]
    log_level: String,
}

fn read_nodes(path: &PathBuf) -> anyhow::Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(match v {
        Value::Array(items) => items,
        Value::Object(ref m) if m.contains_key("items") => m
            .get("items")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
        Value::Object(_) => vec![v],
        _ => anyhow::bail!("{}: expected a JSON list of Nodes", path.display()),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .with_context(|| format!("invalid --log-level {:?}", args.log_level))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if !(args.bookmark_interval > 0.0 && args.bookmark_interval.is_finite()) {
        anyhow::bail!("--bookmark-interval must be a positive number of seconds");
    }
    let nodes = match &args.nodes_file {
        Some(p) => read_nodes(p)?,
        None => Vec::new(),
    };
    let config = Config {
        listen: args.listen.clone(),
        control_socket: args.control_socket.clone(),
        bookmark_interval: Duration::from_secs_f64(args.bookmark_interval),
        history_window: args.history_window,
        default_watch_timeout: Duration::from_secs(args.watch_timeout.max(1)),
        nodes,
    };
    let handle = wgmesh_apiserver::start(config).await?;
    if let Some(out) = &args.kubeconfig_out {
        let url = match (&args.server_url, handle.url()) {
            (Some(u), _) => u.clone(),
            (None, Some(u)) => u,
            (None, None) => {
                anyhow::bail!("--kubeconfig-out needs --server-url or a --listen address")
            }
        };
        kubeconfig::write(out, &url, &args.token)?;
        info!(path = %out.display(), server = %url, "kubeconfig written");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
        _ = term.recv() => info!("SIGTERM: shutting down"),
    }
    handle.shutdown().await;
    Ok(())
}
