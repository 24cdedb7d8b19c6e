//! Shared helpers: an in-process server on 127.0.0.1:0 with a control socket, a kube-rs client,
//! and a recorder of `kube::runtime::watcher` events with a reflector store.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as make_watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use wgmesh_apiserver::client::ControlClient;
use wgmesh_apiserver::{Config, ServerHandle};

/// Generous limit for anything the tests wait for.
pub const TIMEOUT: Duration = Duration::from_secs(20);

pub struct TestServer {
    pub handle: ServerHandle,
    pub ctl: ControlClient,
    pub url: String,
    pub dir: TempDir,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|c| c).await
    }

    pub async fn start_with(f: impl FnOnce(Config) -> Config) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("control.sock");
        let config = f(Config {
            listen: vec!["127.0.0.1:0".parse().expect("addr")],
            control_socket: Some(sock.clone()),
            bookmark_interval: Duration::from_secs(1),
            ..Config::default()
        });
        let handle = wgmesh_apiserver::start(config)
            .await
            .expect("server starts");
        let url = handle.url().expect("a listen address");
        let ctl = ControlClient::new(&sock);
        ctl.wait_ready(TIMEOUT).await.expect("control socket ready");
        Self {
            handle,
            ctl,
            url,
            dir,
        }
    }

    pub fn client(&self) -> Client {
        let config = kube::Config::new(self.url.parse().expect("url"));
        Client::try_from(config).expect("kube client")
    }

    pub fn api(&self) -> Api<Node> {
        Api::all(self.client())
    }

    /// Waits until exactly `n` watch streams are open on the server.
    pub async fn wait_open_watches(&self, n: u64) {
        eventually(&format!("{n} open watches"), || async {
            let stats = self.ctl.stats().await.ok()?;
            (stats["open_watches"].as_u64() == Some(n)).then_some(())
        })
        .await;
    }

    pub async fn create(&self, name: &str, labels: Value) {
        self.ctl
            .create_node(&node(name, labels))
            .await
            .expect("create via control socket");
    }
}

/// A Node with a Ready condition, like a kubelet registers.
pub fn node(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": name, "labels": labels},
           "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
           "status": {"conditions": [{"type": "Ready", "status": "True"}],
                      "addresses": [{"type": "InternalIP", "address": "192.0.2.10"}]}})
}

pub fn typed(v: Value) -> Node {
    serde_json::from_value(v).expect("a Node")
}

/// Polls `f` until it returns `Some`, failing after [`TIMEOUT`].
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {TIMEOUT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A watcher event reduced to what the tests compare.
#[derive(Debug, Clone, PartialEq)]
pub enum Ev {
    Init,
    InitApply(String),
    InitDone,
    Apply(String),
    Delete(String),
    Error(String),
}

/// Runs `watcher(..).default_backoff().reflect(..)` and records every item.
pub struct Recorder {
    rx: mpsc::UnboundedReceiver<Ev>,
    pub seen: Vec<Ev>,
    pub store: Store<Node>,
    task: JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    pub fn start(api: Api<Node>, config: watcher::Config) -> Self {
        let (store, writer) = reflector::store();
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let stream = make_watcher(api, config).default_backoff().reflect(writer);
            futures::pin_mut!(stream);
            while let Some(item) = stream.next().await {
                let ev = match item {
                    Ok(Event::Init) => Ev::Init,
                    Ok(Event::InitApply(n)) => Ev::InitApply(n.name_any()),
                    Ok(Event::InitDone) => Ev::InitDone,
                    Ok(Event::Apply(n)) => Ev::Apply(n.name_any()),
                    Ok(Event::Delete(n)) => Ev::Delete(n.name_any()),
                    Err(e) => Ev::Error(e.to_string()),
                };
                if tx.send(ev).is_err() {
                    break;
                }
            }
        });
        Self {
            rx,
            seen: Vec::new(),
            store,
            task,
        }
    }

    /// Records events until one satisfies `pred`; returns the events received by this call.
    pub async fn until(&mut self, what: &str, pred: impl Fn(&Ev) -> bool) -> Vec<Ev> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "timed out waiting for {what}; got {got:?}; before {:?}",
                        self.seen
                    )
                })
                .expect("the watcher task ended");
            self.seen.push(ev.clone());
            got.push(ev.clone());
            if pred(&ev) {
                return got;
            }
        }
    }

    /// Waits until the reflector store satisfies `pred`.
    pub async fn store_until(&self, what: &str, pred: impl Fn(&Store<Node>) -> bool) {
        eventually(what, || async { pred(&self.store).then_some(()) }).await;
    }

    pub fn count(&self, pred: impl Fn(&Ev) -> bool) -> usize {
        self.seen.iter().filter(|e| pred(e)).count()
    }
}

pub fn annotation(store: &Store<Node>, name: &str, key: &str) -> Option<String> {
    store
        .state()
        .into_iter()
        .find(|n| n.name_any() == name)
        .and_then(|n| n.annotations().get(key).cloned())
}

pub fn names(store: &Store<Node>) -> Vec<String> {
    let mut v: Vec<String> = store.state().iter().map(|n| n.name_any()).collect();
    v.sort();
    v
}
