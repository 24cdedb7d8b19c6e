//! Watch streams: `GET /api/v1/nodes?watch=true`, one compact JSON event per line.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use crate::selector::Selector;
use crate::server::{AppState, epoch_ended};
use crate::status::ApiError;
use crate::store::{EventKind, HistoryEvent};

/// The annotation that marks the end of the initial events of a streaming list.
pub const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

/// Parsed watch parameters.
#[derive(Debug, Clone)]
pub struct WatchParams {
    /// labelSelector + fieldSelector.
    pub selector: Selector,
    /// `resourceVersion` (None or `0`: start with the current state).
    pub resource_version: Option<u64>,
    /// `allowWatchBookmarks=true`.
    pub allow_bookmarks: bool,
    /// `sendInitialEvents`.
    pub send_initial_events: Option<bool>,
    /// `timeoutSeconds` (None or 0: the server default).
    pub timeout: Option<Duration>,
}

fn param<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn truthy(v: Option<&str>) -> Option<bool> {
    v.map(|s| matches!(s, "true" | "1" | "True" | "TRUE"))
}

impl WatchParams {
    /// Validates the query of a watch request (422/400 before the stream starts).
    pub fn parse(q: &[(String, String)], selector: Selector) -> Result<Self, ApiError> {
        let invalid = |field: &str, detail: &str| {
            ApiError::invalid("ListOptions.meta.k8s.io", "", field, detail)
        };
        let resource_version =
            match param(q, "resourceVersion").filter(|s| !s.is_empty()) {
                Some(s) => Some(s.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(format!("invalid resource version \"{s}\""))
                })?),
                None => None,
            };
        let rvm = param(q, "resourceVersionMatch").filter(|s| !s.is_empty());
        let send_initial_events = truthy(param(q, "sendInitialEvents"));
        let allow_bookmarks = truthy(param(q, "allowWatchBookmarks")).unwrap_or(false);
        if send_initial_events.is_some() && rvm != Some("NotOlderThan") {
            return Err(invalid(
                "resourceVersionMatch",
                "Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            ));
        }
        if send_initial_events.is_none() && rvm.is_some() {
            return Err(invalid(
                "resourceVersionMatch",
                "Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            ));
        }
        if send_initial_events == Some(true) && !allow_bookmarks {
            return Err(invalid(
                "allowWatchBookmarks",
                "Required value: allowWatchBookmarks must be set to true when sendInitialEvents is true",
            ));
        }
        let timeout = match param(q, "timeoutSeconds").filter(|s| !s.is_empty()) {
            Some(s) => {
                let secs: u64 = s.parse().map_err(|_| {
                    ApiError::bad_request(format!("invalid timeoutSeconds \"{s}\""))
                })?;
                (secs > 0).then(|| Duration::from_secs(secs))
            }
            None => None,
        };
        Ok(Self {
            selector,
            resource_version: resource_version.filter(|rv| *rv != 0),
            allow_bookmarks,
            send_initial_events,
            timeout,
        })
    }
}

/// A response body fed by a channel of byte chunks.
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// One watch line: `{"type":...,"object":...}\n`.
pub fn line(kind: &str, object: &Value) -> Bytes {
    let mut out = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    out.push(b'\n');
    Bytes::from(out)
}

/// The ERROR line a real server sends for an expired resourceVersion (or another error).
pub fn error_line(err: &ApiError) -> Bytes {
    line("ERROR", &err.to_status())
}

fn bookmark(rv: u64, initial_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({INITIAL_EVENTS_END: "true"});
    }
    line(
        "BOOKMARK",
        &json!({"kind": "Node", "apiVersion": "v1", "metadata": meta}),
    )
}

fn with_rv(obj: &Value, rv: u64) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert("resourceVersion".into(), json!(rv.to_string()));
    }
    o
}

/// What a watcher with `sel` sees of a stored event: objects entering the selection are ADDED,
/// leaving it DELETED (the old object at the new RV), staying in it MODIFIED.
pub fn visible(ev: &HistoryEvent, sel: &Selector) -> Option<(&'static str, Value)> {
    let now = sel.matches(&ev.object);
    let before = ev.old.as_deref().is_some_and(|o| sel.matches(o));
    match ev.kind {
        EventKind::Added => now.then(|| ("ADDED", (*ev.object).clone())),
        EventKind::Deleted => before.then(|| ("DELETED", (*ev.object).clone())),
        EventKind::Modified => match (before, now) {
            (true, true) => Some(("MODIFIED", (*ev.object).clone())),
            (false, true) => Some(("ADDED", (*ev.object).clone())),
            (true, false) => ev
                .old
                .as_deref()
                .map(|old| ("DELETED", with_rv(old, ev.rv))),
            (false, false) => None,
        },
    }
}

/// Starts a watch: returns the streaming body; the events are produced by a background task
/// that ends at the timeout, at a "go away", at shutdown or when the client leaves.
pub fn start(state: Arc<AppState>, params: WatchParams) -> ChannelBody {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(run(state, params, tx, None));
    ChannelBody { rx }
}

/// A watch that answers 200 and then one ERROR event (used for injected 410s).
pub fn start_with_error(state: Arc<AppState>, err: ApiError) -> ChannelBody {
    let (tx, rx) = mpsc::channel(4);
    let params = WatchParams {
        selector: Selector::default(),
        resource_version: None,
        allow_bookmarks: false,
        send_initial_events: None,
        timeout: None,
    };
    tokio::spawn(run(state, params, tx, Some(err)));
    ChannelBody { rx }
}

async fn run(
    state: Arc<AppState>,
    params: WatchParams,
    tx: mpsc::Sender<Bytes>,
    injected: Option<ApiError>,
) {
    let _guard = state.watch_started();
    if let Some(err) = injected {
        let _ = tx.send(error_line(&err)).await;
        return;
    }
    let epoch = state.phase.borrow().epoch;
    let ended = epoch_ended(state.phase.subscribe(), epoch);
    tokio::pin!(ended);
    let mut rv_rx = state.subscribe_rv();
    let mut compact_rx = state.subscribe_compactions();
    let sel = &params.selector;

    // Where the stream starts, and the synthetic ADDED events of "Get State and Start".
    let start = {
        let store = state.store();
        let initial = match (params.resource_version, params.send_initial_events) {
            (_, Some(true)) | (None, None) => Some(store.matching(sel)),
            _ => None,
        };
        match (initial, params.resource_version) {
            (Some(objs), _) => Ok((objs, store.rv())),
            (None, None) => Ok((Vec::new(), store.rv())),
            (None, Some(rv)) => store.events_since(rv).map(|_| (Vec::new(), rv)),
        }
    };
    let (initial, mut last) = match start {
        Ok(s) => s,
        Err(e) => {
            let _ = tx.send(error_line(&e)).await;
            return;
        }
    };
    for obj in &initial {
        if tx.send(line("ADDED", obj)).await.is_err() {
            return;
        }
    }
    if params.send_initial_events == Some(true) && tx.send(bookmark(last, true)).await.is_err() {
        return;
    }

    let timeout = params.timeout.unwrap_or(state.default_watch_timeout);
    let deadline = tokio::time::sleep_until(Instant::now() + timeout);
    tokio::pin!(deadline);
    let period = state.bookmark_interval.max(Duration::from_millis(10));
    let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut send_bookmark = false;
    loop {
        let batch = state.store().events_since(last);
        match batch {
            Ok((events, current)) => {
                for ev in &events {
                    if let Some((kind, obj)) = visible(ev, sel)
                        && tx.send(line(kind, &obj)).await.is_err()
                    {
                        return;
                    }
                }
                last = current.max(last);
                if send_bookmark && params.allow_bookmarks {
                    if tx.send(bookmark(last, false)).await.is_err() {
                        return;
                    }
                    send_bookmark = false;
                }
            }
            Err(e) => {
                let _ = tx.send(error_line(&e)).await;
                return;
            }
        }
        tokio::select! {
            r = rv_rx.changed() => if r.is_err() { return },
            _ = ticker.tick() => send_bookmark = true,
            r = compact_rx.changed() => {
                if r.is_ok() {
                    let current = state.store().rv();
                    let err = ApiError::expired(format!("too old resource version: {last} ({current})"));
                    let _ = tx.send(error_line(&err)).await;
                }
                return;
            }
            _ = &mut deadline => return,
            _ = &mut ended => return,
            _ = tx.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Vec<(String, String)> {
        crate::util::parse_query(Some(s))
    }

    #[test]
    fn params_from_kube_rs_queries() {
        let p = WatchParams::parse(
            &q("&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion=105"),
            Selector::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.resource_version, Some(105));
        assert!(p.allow_bookmarks);
        assert_eq!(p.timeout, Some(Duration::from_secs(290)));
        let s = WatchParams::parse(
            &q("&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion=0"),
            Selector::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.resource_version, None);
        assert_eq!(s.send_initial_events, Some(true));
        let bad = WatchParams::parse(&q("watch=true&sendInitialEvents=true"), Selector::default());
        assert_eq!(bad.map_err(|e| e.code).err(), Some(422));
        let bad = WatchParams::parse(&q("watch=true&resourceVersion=x"), Selector::default());
        assert_eq!(bad.map_err(|e| e.code).err(), Some(400));
    }

    #[test]
    fn lines_are_compact_and_bookmarks_typed() {
        let b = bookmark(12, true);
        let text = String::from_utf8_lossy(&b);
        assert!(text.ends_with('\n'));
        assert_eq!(text.matches('\n').count(), 1);
        let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
        assert_eq!(v["type"], "BOOKMARK");
        assert_eq!(v["object"]["kind"], "Node");
        assert_eq!(v["object"]["apiVersion"], "v1");
        assert_eq!(v["object"]["metadata"]["resourceVersion"], "12");
        assert_eq!(
            v["object"]["metadata"]["annotations"][INITIAL_EVENTS_END],
            "true"
        );
        let e: Value = serde_json::from_slice(&error_line(&ApiError::expired("too old")))
            .unwrap_or(Value::Null);
        assert_eq!(e["type"], "ERROR");
        assert_eq!(e["object"]["code"], 410);
        assert_eq!(e["object"]["reason"], "Expired");
    }

    #[test]
    fn selector_transitions() {
        let sel = Selector::parse(Some("role=edge"), None).unwrap_or_default();
        let obj = |role: &str, rv: &str| {
            Arc::new(json!({"metadata":{"name":"a","resourceVersion":rv,"labels":{"role":role}}}))
        };
        let ev = |kind, new: Arc<Value>, old: Option<Arc<Value>>| HistoryEvent {
            rv: 9,
            kind,
            object: new,
            old,
        };
        let enter = ev(
            EventKind::Modified,
            obj("edge", "9"),
            Some(obj("core", "8")),
        );
        assert_eq!(visible(&enter, &sel).map(|v| v.0), Some("ADDED"));
        let leave = ev(
            EventKind::Modified,
            obj("core", "9"),
            Some(obj("edge", "8")),
        );
        let (kind, o) = visible(&leave, &sel).unwrap_or(("", Value::Null));
        assert_eq!(kind, "DELETED");
        assert_eq!(o["metadata"]["resourceVersion"], "9");
        assert_eq!(o["metadata"]["labels"]["role"], "edge");
        let stay = ev(
            EventKind::Modified,
            obj("edge", "9"),
            Some(obj("edge", "8")),
        );
        assert_eq!(visible(&stay, &sel).map(|v| v.0), Some("MODIFIED"));
        let other = ev(EventKind::Added, obj("core", "9"), None);
        assert!(visible(&other, &sel).is_none());
    }
}
