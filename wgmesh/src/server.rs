//! The agent's local endpoint: `/healthz`, `/readyz`, `/metrics` (Prometheus text) and `/status`
//! (the [`wgmesh_api::status::AgentStatus`] JSON that `wgmeshctl status` reads).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use wgmesh_api::status::AgentStatus;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabel {
    pub verdict: String,
}

/// Everything the agent exports.
#[derive(Default)]
pub struct Metrics {
    pub peers: Gauge,
    pub skipped_nodes: Gauge,
    pub reconciles: Family<ResultLabel, Counter>,
    pub peer_changes: Family<OpLabel, Counter>,
    pub api_writes: Counter,
    pub peer_handshake_age: Family<PeerLabel, Gauge>,
    pub peer_rx_bytes: Family<PeerLabel, Gauge>,
    pub peer_tx_bytes: Family<PeerLabel, Gauge>,
    /// Kernel-side per-CPU counters of the TC programs, summed (mirrors a counter, so exported as gauge).
    pub datapath_packets: Family<VerdictLabel, Gauge>,
    pub key_generation: Gauge,
}

impl Metrics {
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut r = Registry::with_prefix("wgmesh");
        r.register(
            "peers",
            "WireGuard peers the agent wants",
            self.peers.clone(),
        );
        r.register(
            "skipped_nodes",
            "Nodes left out of the mesh (see /status for why)",
            self.skipped_nodes.clone(),
        );
        r.register(
            "reconciles",
            "Reconcile runs by result",
            self.reconciles.clone(),
        );
        r.register(
            "peer_changes",
            "Peers added, updated and removed on the device",
            self.peer_changes.clone(),
        );
        r.register(
            "api_writes",
            "Writes the agent made to the Kubernetes API",
            self.api_writes.clone(),
        );
        r.register(
            "peer_last_handshake_age_seconds",
            "Seconds since the latest handshake per peer (-1: none yet)",
            self.peer_handshake_age.clone(),
        );
        r.register(
            "peer_rx_bytes",
            "Bytes received from a peer",
            self.peer_rx_bytes.clone(),
        );
        r.register(
            "peer_tx_bytes",
            "Bytes sent to a peer",
            self.peer_tx_bytes.clone(),
        );
        r.register(
            "datapath_packets",
            "Packets seen by the TC programs, by verdict",
            self.datapath_packets.clone(),
        );
        r.register(
            "key_generation",
            "Generation of this node's WireGuard key",
            self.key_generation.clone(),
        );
        r
    }
}

/// State shared between the agent loop and the endpoint.
pub struct Shared {
    pub status: Mutex<Option<AgentStatus>>,
    /// Read-only view of the pinned maps, so `/status` and `/metrics` show live kernel counters.
    pub pins: Mutex<Option<wgmesh_datapath::PinnedDatapath>>,
    /// Reads the WireGuard device live for `/status`.
    pub device: Mutex<Option<Arc<dyn crate::wireguard::DeviceReader>>>,
    pub ready: std::sync::atomic::AtomicBool,
    pub metrics: Arc<Metrics>,
    pub registry: Registry,
}

impl Shared {
    pub fn new() -> Arc<Self> {
        let metrics = Arc::new(Metrics::default());
        let registry = metrics.registry();
        Arc::new(Self {
            status: Mutex::new(None),
            pins: Mutex::new(None),
            device: Mutex::new(None),
            ready: false.into(),
            metrics,
            registry,
        })
    }
}

fn reply(code: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = code;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

fn route(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            if shared.ready.load(std::sync::atomic::Ordering::Relaxed) {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not synced yet\n",
                )
            }
        }
        "/metrics" => {
            refresh_datapath_metrics(shared);
            let mut out = String::new();
            match encode(&mut out, &shared.registry) {
                Ok(()) => reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    out,
                ),
                Err(_) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "encoding failed\n",
                ),
            }
        }
        "/status" => {
            let mut status = shared.status.lock().map(|s| s.clone()).unwrap_or(None);
            if let Some(st) = status.as_mut() {
                let reader = shared.device.lock().ok().and_then(|d| d.clone());
                match reader.map(|r| r.read_state()) {
                    Some(Ok(state)) => {
                        st.device = Some(crate::agent::device_status(&state, &st.desired_peers))
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "cannot read the device for /status")
                    }
                    None => tracing::warn!("no device reader for /status"),
                }
            }
            if let (Some(st), Ok(pins)) = (status.as_mut(), shared.pins.lock())
                && let Some(pins) = pins.as_ref()
            {
                if let Ok(c) = pins.counters() {
                    st.datapath.counters = crate::agent::counters_map(&c);
                }
                if let Ok(r) = pins.remote_cidrs() {
                    st.datapath.remote_cidrs = r.iter().map(|c| c.to_string()).collect();
                }
            }
            match status.and_then(|s| serde_json::to_vec_pretty(&s).ok()) {
                Some(body) => reply(StatusCode::OK, "application/json", body),
                None => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "starting\n"),
            }
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Copies the kernel counters into the metrics right before they are scraped.
fn refresh_datapath_metrics(shared: &Shared) {
    let Ok(pins) = shared.pins.lock() else { return };
    let Some(counters) = pins.as_ref().and_then(|p| p.counters().ok()) else {
        return;
    };
    for (k, v) in crate::agent::counters_map(&counters) {
        shared
            .metrics
            .datapath_packets
            .get_or_create(&VerdictLabel { verdict: k })
            .set(v as i64);
    }
}

/// Serves until the process exits. A failure to bind is reported, not fatal: the mesh matters more.
pub async fn serve(addr: SocketAddr, shared: Arc<Shared>) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot bind the status endpoint; continuing without it");
            return;
        }
    };
    tracing::info!(%addr, "status endpoint listening");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let r = route(&shared, &req);
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
