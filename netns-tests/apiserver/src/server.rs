//! The server process: TCP listeners that can "go away" and come back, the control socket,
//! the shared state, and the handle returned to library users.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::control::{ClientId, Faults, Stats};
use crate::store::{Store, WriteOptions};

/// Server settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// TCP addresses for the Kubernetes API (port 0 picks a free port).
    pub listen: Vec<SocketAddr>,
    /// Unix socket for the API plus `/_control/*`.
    pub control_socket: Option<PathBuf>,
    /// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK.
    pub bookmark_interval: Duration,
    /// How many watch events are kept; a watch from an older RV gets 410.
    pub history_window: usize,
    /// Watch length when the client sends no `timeoutSeconds` (or 0).
    pub default_watch_timeout: Duration,
    /// Nodes created at start (manager `wgmesh-apiserver`).
    pub nodes: Vec<Value>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            control_socket: None,
            bookmark_interval: Duration::from_secs(5),
            history_window: 10_000,
            default_watch_timeout: Duration::from_secs(1800),
            nodes: Vec::new(),
        }
    }
}

/// Up/down state of the TCP side. `epoch` grows at every "go away"; connections and watches
/// started in an older epoch are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Phase {
    pub up: bool,
    pub epoch: u64,
    pub shutdown: bool,
}

/// State shared by every connection.
pub struct AppState {
    store: Mutex<Store>,
    rv_tx: watch::Sender<u64>,
    /// Bumped at every compaction: open watches end with ERROR 410 and their clients re-list.
    compactions: watch::Sender<u64>,
    faults: Mutex<Faults>,
    stats: Mutex<Stats>,
    pub(crate) phase: watch::Sender<Phase>,
    /// `Some(epoch)` while the TCP listeners of that epoch are bound.
    bound: watch::Sender<Option<u64>>,
    has_tcp: bool,
    open_watches: AtomicUsize,
    pub(crate) bookmark_interval: Duration,
    pub(crate) default_watch_timeout: Duration,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Decrements the open-watch count when a watch ends.
pub(crate) struct WatchGuard(Arc<AppState>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AppState {
    fn new(config: &Config) -> Self {
        let store = Store::new(config.history_window);
        let (rv_tx, _) = watch::channel(store.rv());
        let (phase, _) = watch::channel(Phase {
            up: true,
            epoch: 0,
            shutdown: false,
        });
        let (bound, _) = watch::channel(None);
        let (compactions, _) = watch::channel(0);
        Self {
            store: Mutex::new(store),
            rv_tx,
            compactions,
            faults: Mutex::new(Faults::default()),
            stats: Mutex::new(Stats::default()),
            phase,
            bound,
            has_tcp: !config.listen.is_empty(),
            open_watches: AtomicUsize::new(0),
            bookmark_interval: config.bookmark_interval,
            default_watch_timeout: config.default_watch_timeout,
        }
    }

    /// The store, for reads.
    pub(crate) fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    /// Runs a write on the store and wakes the watches if the RV moved.
    pub(crate) fn write<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let (out, rv) = {
            let mut s = lock(&self.store);
            let out = f(&mut s);
            (out, s.rv())
        };
        self.rv_tx.send_if_modified(|cur| {
            let changed = *cur != rv;
            *cur = rv;
            changed
        });
        out
    }

    /// Subscribes to RV changes.
    pub(crate) fn subscribe_rv(&self) -> watch::Receiver<u64> {
        self.rv_tx.subscribe()
    }

    pub(crate) fn faults(&self) -> MutexGuard<'_, Faults> {
        lock(&self.faults)
    }

    pub(crate) fn stats(&self) -> MutexGuard<'_, Stats> {
        lock(&self.stats)
    }

    pub(crate) fn open_watches(&self) -> usize {
        self.open_watches.load(Ordering::Relaxed)
    }

    pub(crate) fn watch_started(self: &Arc<Self>) -> WatchGuard {
        self.open_watches.fetch_add(1, Ordering::Relaxed);
        WatchGuard(self.clone())
    }

    pub(crate) fn phase_summary(&self) -> (bool, u64) {
        let p = *self.phase.borrow();
        (p.up, p.epoch)
    }

    /// Subscribes to compactions.
    pub(crate) fn subscribe_compactions(&self) -> watch::Receiver<u64> {
        self.compactions.subscribe()
    }

    /// Forgets the event history and expires every open watch (like a watch-cache restart);
    /// returns the current RV.
    pub(crate) fn compact(&self) -> u64 {
        let rv = {
            let mut s = lock(&self.store);
            s.compact();
            s.rv()
        };
        self.compactions.send_modify(|c| *c += 1);
        info!(rv, "history compacted: open watches get ERROR 410");
        rv
    }

    /// Closes the TCP listeners and every TCP connection and watch; returns the new epoch once
    /// the listeners are closed.
    pub(crate) async fn go_down(&self) -> u64 {
        let mut epoch = 0;
        self.phase.send_modify(|p| {
            p.up = false;
            p.epoch += 1;
            epoch = p.epoch;
        });
        info!(
            epoch,
            "going away: TCP listeners closed, connections and watches dropped"
        );
        if self.has_tcp {
            let mut rx = self.bound.subscribe();
            let closed = rx.wait_for(|b| b.is_none_or(|e| e >= epoch));
            if tokio::time::timeout(Duration::from_secs(5), closed)
                .await
                .is_err()
            {
                warn!("the TCP listeners did not close within 5 s");
            }
        }
        epoch
    }

    /// Binds the TCP listeners again; returns the epoch once they accept connections.
    pub(crate) async fn go_up(&self) -> u64 {
        let mut epoch = 0;
        self.phase.send_if_modified(|p| {
            epoch = p.epoch;
            let changed = !p.up;
            p.up = true;
            changed
        });
        if self.has_tcp {
            let mut rx = self.bound.subscribe();
            let open = rx.wait_for(|b| *b == Some(epoch));
            if tokio::time::timeout(Duration::from_secs(10), open)
                .await
                .is_err()
            {
                warn!("the TCP listeners could not be bound again within 10 s");
            }
        }
        info!(epoch, "back up");
        epoch
    }

    /// Comes back after `after`, unless another down/up happened meanwhile.
    pub(crate) fn schedule_up(self: Arc<Self>, after: Duration, epoch: u64) {
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let p = *self.phase.borrow();
            if !p.up && p.epoch == epoch && !p.shutdown {
                self.go_up().await;
            }
        });
    }
}

/// Waits until connections of `epoch` must end (a "go away" or shutdown).
pub(crate) async fn epoch_ended(mut rx: watch::Receiver<Phase>, epoch: u64) {
    let _ = rx.wait_for(|p| p.epoch != epoch || p.shutdown).await;
}

/// Waits for shutdown.
async fn shutdown_started(mut rx: watch::Receiver<Phase>) {
    let _ = rx.wait_for(|p| p.shutdown).await;
}

/// A running server.
pub struct ServerHandle {
    state: Arc<AppState>,
    addrs: Vec<SocketAddr>,
    control_socket: Option<PathBuf>,
    tasks: Vec<JoinHandle<()>>,
}

impl ServerHandle {
    /// The bound TCP addresses (with the real ports when port 0 was asked for).
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// `http://<first listen address>`, if there is one.
    pub fn url(&self) -> Option<String> {
        self.addrs.first().map(|a| format!("http://{a}"))
    }

    /// The control socket path, if any.
    pub fn control_socket(&self) -> Option<&Path> {
        self.control_socket.as_deref()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.state.store().rv()
    }

    /// Stops everything, waits for the server tasks, and removes the control socket.
    pub async fn shutdown(mut self) {
        self.state.phase.send_modify(|p| p.shutdown = true);
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
        self.remove_socket();
        info!("stopped");
    }

    fn remove_socket(&mut self) {
        if let Some(p) = self.control_socket.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Dropping the handle without [`ServerHandle::shutdown`] stops the server too (without waiting).
impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.state.phase.send_modify(|p| p.shutdown = true);
        self.remove_socket();
    }
}

async fn bind_all(addrs: &[SocketAddr]) -> std::io::Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    for a in addrs {
        out.push(TcpListener::bind(a).await?);
    }
    Ok(out)
}

/// Keeps the TCP listeners bound while the phase is up, re-binding the same addresses after
/// every "go away".
async fn tcp_supervisor(state: Arc<AppState>, addrs: Vec<SocketAddr>, first: Vec<TcpListener>) {
    let mut first = Some(first);
    let mut rx = state.phase.subscribe();
    loop {
        let phase = *rx.borrow_and_update();
        if phase.shutdown {
            break;
        }
        if !phase.up {
            state.bound.send_replace(None);
            if rx.changed().await.is_err() {
                break;
            }
            continue;
        }
        let listeners = match first.take() {
            Some(l) => l,
            None => match bind_all(&addrs).await {
                Ok(l) => l,
                Err(e) => {
                    warn!(error = %e, "re-binding the listen addresses failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        r = rx.changed() => if r.is_err() { break },
                    }
                    continue;
                }
            },
        };
        state.bound.send_replace(Some(phase.epoch));
        let accepts: Vec<JoinHandle<()>> = listeners
            .into_iter()
            .map(|l| tokio::spawn(accept_tcp(state.clone(), l, phase.epoch)))
            .collect();
        for a in accepts {
            let _ = a.await;
        }
        state.bound.send_replace(None);
    }
    state.bound.send_replace(None);
}

async fn accept_tcp(state: Arc<AppState>, listener: TcpListener, epoch: u64) {
    let ended = epoch_ended(state.phase.subscribe(), epoch);
    tokio::pin!(ended);
    loop {
        tokio::select! {
            _ = &mut ended => break,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let st = state.clone();
                    tokio::spawn(async move {
                        let stop = epoch_ended(st.phase.subscribe(), epoch);
                        serve_connection(st, stream, ClientId::Tcp(peer.ip()), stop).await;
                    });
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
}

async fn accept_unix(state: Arc<AppState>, listener: UnixListener) {
    let stop = shutdown_started(state.phase.subscribe());
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let st = state.clone();
                    tokio::spawn(async move {
                        let stop = shutdown_started(st.phase.subscribe());
                        serve_connection(st, stream, ClientId::Control, stop).await;
                    });
                }
                Err(e) => {
                    warn!(error = %e, "accept on the control socket failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Serves one HTTP/1.1 connection until it ends or `stop` fires (then it is dropped, which
/// closes the socket and any in-flight request or watch on it).
async fn serve_connection<S>(
    state: Arc<AppState>,
    io: S,
    client: ClientId,
    stop: impl std::future::Future<Output = ()>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc_client = client.clone();
    let svc = service_fn(move |req| crate::http::handle(state.clone(), svc_client.clone(), req));
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), svc);
    tokio::select! {
        r = conn => if let Err(e) = r {
            debug!(client = %client.label(), error = %e, "connection ended with an error");
        },
        _ = stop => debug!(client = %client.label(), "connection dropped"),
    }
}

/// Starts the server: binds every listener (so the addresses are known on return), creates the
/// initial Nodes, and serves in background tasks until [`ServerHandle::shutdown`].
pub async fn start(config: Config) -> anyhow::Result<ServerHandle> {
    if config.listen.is_empty() && config.control_socket.is_none() {
        anyhow::bail!("nothing to serve: give at least one listen address or a control socket");
    }
    let state = Arc::new(AppState::new(&config));
    for (i, node) in config.nodes.iter().enumerate() {
        let opts = WriteOptions {
            field_manager: "wgmesh-apiserver".into(),
            ..Default::default()
        };
        state
            .write(|s| s.create(node, &opts))
            .with_context(|| format!("creating initial node #{i}"))?;
    }
    let listeners = bind_all(&config.listen)
        .await
        .with_context(|| format!("binding {:?}", config.listen))?;
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<Result<_, _>>()?;
    let mut tasks = Vec::new();
    if !addrs.is_empty() {
        state.bound.send_replace(Some(0));
        tasks.push(tokio::spawn(tcp_supervisor(
            state.clone(),
            addrs.clone(),
            listeners,
        )));
    }
    if let Some(path) = &config.control_socket {
        match std::fs::remove_file(path) {
            Ok(()) => info!(path = %path.display(), "removed a stale control socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
        let l = UnixListener::bind(path)
            .with_context(|| format!("binding the control socket {}", path.display()))?;
        tasks.push(tokio::spawn(accept_unix(state.clone(), l)));
    }
    info!(
        listen = ?addrs,
        control_socket = ?config.control_socket,
        nodes = state.store().len(),
        "Kubernetes API stand-in listening"
    );
    Ok(ServerHandle {
        state,
        addrs,
        control_socket: config.control_socket,
        tasks,
    })
}
