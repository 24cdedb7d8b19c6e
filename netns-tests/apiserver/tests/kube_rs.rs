//! The stand-in driven by kube-rs 5 itself: watcher + reflector, get, create, replace, delete,
//! merge patches, server-side apply, pagination, and recovery from outages, compaction and
//! injected failures.

mod common;

use common::{Ev, Recorder, TestServer, annotation, eventually, names, node, typed};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::{ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde_json::json;
use wgmesh_apiserver::client::FailSpec;

fn api_status(err: kube::Error) -> Box<kube::core::Status> {
    match err {
        kube::Error::Api(s) => s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn watcher_lists_then_streams_creates_patches_and_deletes() {
    let srv = TestServer::start().await;
    srv.create("a", json!({})).await;
    srv.create("b", json!({})).await;
    let api = srv.api();
    let mut rec = Recorder::start(api.clone(), watcher::Config::default());
    let init = rec.until("InitDone", |e| *e == Ev::InitDone).await;
    assert_eq!(
        init,
        vec![
            Ev::Init,
            Ev::InitApply("a".into()),
            Ev::InitApply("b".into()),
            Ev::InitDone
        ]
    );

    api.create(&PostParams::default(), &typed(node("c", json!({}))))
        .await
        .expect("create c");
    rec.until("Apply(c)", |e| *e == Ev::Apply("c".into())).await;

    let patch = json!({"metadata": {"annotations": {"wgmesh.io/k": "v"}}});
    api.patch("a", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("merge patch a");
    rec.until("Apply(a)", |e| *e == Ev::Apply("a".into())).await;

    api.delete("b", &Default::default())
        .await
        .expect("delete b");
    rec.until("Delete(b)", |e| *e == Ev::Delete("b".into()))
        .await;

    rec.store_until("the reflector to hold a, c", |s| {
        names(s) == ["a", "c"] && annotation(s, "a", "wgmesh.io/k").as_deref() == Some("v")
    })
    .await;
    assert_eq!(
        rec.count(|e| matches!(e, Ev::Error(_))),
        0,
        "{:?}",
        rec.seen
    );
    assert_eq!(rec.count(|e| *e == Ev::Init), 1);
}

#[tokio::test]
async fn merge_patch_bumps_rv_once_and_noop_patch_sends_nothing() {
    let srv = TestServer::start().await;
    srv.create("a", json!({})).await;
    srv.create("sentinel", json!({})).await;
    let api = srv.api();
    let list = api.list(&ListParams::default()).await.expect("list");
    let rv0 = list.metadata.resource_version.expect("list RV");
    let mut stream = api
        .watch(&WatchParams::default(), &rv0)
        .await
        .expect("watch")
        .boxed();

    let patch = json!({"metadata": {"annotations": {"wgmesh.io/public-key": "k1"}}});
    let p1 = api
        .patch("a", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch 1");
    let p2 = api
        .patch("a", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch 2 (no-op)");
    let rv1 = p1.resource_version().expect("rv1");
    assert_ne!(rv1, rv0, "a real change bumps the resourceVersion");
    assert_eq!(
        p2.resource_version(),
        Some(rv1.clone()),
        "a no-op bumps nothing"
    );
    api.patch(
        "sentinel",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"done": "yes"}}})),
    )
    .await
    .expect("sentinel patch");

    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + common::TIMEOUT;
    loop {
        let ev = tokio::time::timeout_at(deadline, stream.try_next())
            .await
            .expect("events before the timeout")
            .expect("a watch event")
            .expect("the stream is open");
        match ev {
            WatchEvent::Bookmark(_) => continue,
            WatchEvent::Modified(n) => {
                let done = n.name_any() == "sentinel";
                seen.push((n.name_any(), n.resource_version().unwrap_or_default()));
                if done {
                    break;
                }
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0], ("a".to_string(), rv1));
    assert_eq!(seen[1].0, "sentinel");
}

#[tokio::test]
async fn server_side_apply_owns_annotations_per_manager() {
    let srv = TestServer::start().await;
    srv.create("a", json!({})).await;
    let api = srv.api();
    let body = |ann: serde_json::Value| json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "a", "annotations": ann}});
    let mgr = PatchParams::apply("mgr").force();
    let n = api
        .patch(
            "a",
            &mgr,
            &Patch::Apply(body(json!({"wgmesh.io/k1": "1", "wgmesh.io/k2": "2"}))),
        )
        .await
        .expect("apply 1");
    assert_eq!(
        n.annotations().get("wgmesh.io/k1").map(String::as_str),
        Some("1")
    );
    assert_eq!(
        n.annotations().get("wgmesh.io/k2").map(String::as_str),
        Some("2")
    );

    api.patch(
        "a",
        &PatchParams::apply("other"),
        &Patch::Apply(body(json!({"other.io/x": "o"}))),
    )
    .await
    .expect("apply by another manager");

    let n = api
        .patch(
            "a",
            &mgr,
            &Patch::Apply(body(json!({"wgmesh.io/k1": "1b"}))),
        )
        .await
        .expect("apply 2");
    let ann = n.annotations();
    assert_eq!(ann.get("wgmesh.io/k1").map(String::as_str), Some("1b"));
    assert!(
        !ann.contains_key("wgmesh.io/k2"),
        "dropped key removed: {ann:?}"
    );
    assert_eq!(
        ann.get("other.io/x").map(String::as_str),
        Some("o"),
        "other manager kept"
    );

    // Same apply again: a no-op, same resourceVersion.
    let again = api
        .patch(
            "a",
            &mgr,
            &Patch::Apply(body(json!({"wgmesh.io/k1": "1b"}))),
        )
        .await
        .expect("apply 3");
    assert_eq!(again.resource_version(), n.resource_version());

    // A different value under another manager without force is a conflict.
    let err = api
        .patch(
            "a",
            &PatchParams::apply("intruder"),
            &Patch::Apply(body(json!({"wgmesh.io/k1": "zzz"}))),
        )
        .await
        .expect_err("conflict");
    let status = api_status(err);
    assert!(status.is_conflict(), "{status:?}");
    assert!(status.message.contains("\"mgr\""), "{}", status.message);
    let forced = api
        .patch(
            "a",
            &PatchParams::apply("intruder").force(),
            &Patch::Apply(body(json!({"wgmesh.io/k1": "zzz"}))),
        )
        .await
        .expect("forced apply");
    assert_eq!(
        forced.annotations().get("wgmesh.io/k1").map(String::as_str),
        Some("zzz")
    );
    let managers: Vec<String> = forced
        .managed_fields()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        !managers.contains(&"mgr".to_string()),
        "mgr lost its only field: {managers:?}"
    );

    // Apply creates a missing Node; apply on /status merges conditions by type.
    let fresh = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "fresh", "labels": {"x": "y"}}});
    api.patch("fresh", &mgr, &Patch::Apply(fresh))
        .await
        .expect("apply creates");
    assert_eq!(
        api.get("fresh")
            .await
            .expect("get fresh")
            .labels()
            .get("x")
            .map(String::as_str),
        Some("y")
    );
    let cond = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "a"},
        "status": {"conditions": [{"type": "WireGuardReady", "status": "True", "reason": "PeersConfigured"}]}});
    let n = api
        .patch_status(
            "a",
            &PatchParams::apply("wgmesh-agent").force(),
            &Patch::Apply(cond),
        )
        .await
        .expect("apply status");
    let types: Vec<String> = n
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.type_)
        .collect();
    assert_eq!(types, ["Ready", "WireGuardReady"]);
}

#[tokio::test]
async fn stale_resource_version_is_a_conflict() {
    let srv = TestServer::start().await;
    srv.create("a", json!({})).await;
    let api = srv.api();
    let stale = api.get("a").await.expect("get");
    let stale_rv = stale.resource_version().expect("rv");
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"v": "2"}}})),
    )
    .await
    .expect("bump");
    let err = api
        .replace("a", &PostParams::default(), &stale)
        .await
        .expect_err("stale replace");
    let s = api_status(err);
    assert!(s.is_conflict() && s.code == 409, "{s:?}");
    let err = api
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"resourceVersion": stale_rv, "labels": {"v": "3"}}})),
        )
        .await
        .expect_err("stale patch");
    assert!(api_status(err).is_conflict());
    let current = api
        .get("a")
        .await
        .expect("get")
        .resource_version()
        .expect("rv");
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"resourceVersion": current, "labels": {"v": "3"}}})),
    )
    .await
    .expect("patch with the current RV");
    assert!(api.get_opt("missing").await.expect("get_opt").is_none());
    let err = api
        .create(&PostParams::default(), &typed(node("a", json!({}))))
        .await
        .expect_err("duplicate");
    let s = api_status(err);
    assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists"));
}

#[tokio::test]
async fn compaction_makes_a_running_watcher_relist() {
    let srv = TestServer::start().await;
    srv.create("a", json!({})).await;
    let mut rec = Recorder::start(srv.api(), watcher::Config::default());
    rec.until("InitDone", |e| *e == Ev::InitDone).await;
    // the watch request follows InitDone: compact only once it is open
    srv.wait_open_watches(1).await;
    srv.ctl.compact().await.expect("compact");
    let after = rec
        .until("the second InitDone", |e| *e == Ev::InitDone)
        .await;
    assert!(
        matches!(after.first(), Some(Ev::Error(e)) if e.contains("410") || e.contains("too old")),
        "{after:?}"
    );
    assert!(after.contains(&Ev::Init), "{after:?}");
    srv.create("b", json!({})).await;
    rec.until("Apply(b)", |e| *e == Ev::Apply("b".into())).await;
    rec.store_until("a and b", |s| names(s) == ["a", "b"]).await;
    assert_eq!(rec.count(|e| *e == Ev::Init), 2);
}

#[tokio::test]
async fn outage_is_survived_and_changes_made_meanwhile_are_seen() {
    let srv = TestServer::start().await;
    srv.create("a", json!({})).await;
    let addr = srv.handle.listen_addrs()[0];
    let mut rec = Recorder::start(srv.api(), watcher::Config::default());
    rec.until("InitDone", |e| *e == Ev::InitDone).await;

    srv.ctl.outage(3.0).await.expect("outage");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed during the outage"
    );
    srv.ctl
        .merge_patch_node(
            "a",
            &json!({"metadata": {"annotations": {"during": "outage"}}}),
        )
        .await
        .expect("write through the control socket during the outage");
    rec.until("a watcher error", |e| matches!(e, Ev::Error(_)))
        .await;
    rec.until("Apply(a) after the outage", |e| *e == Ev::Apply("a".into()))
        .await;
    rec.store_until("the change made during the outage", |s| {
        annotation(s, "a", "during").as_deref() == Some("outage")
    })
    .await;
    assert_eq!(
        rec.count(|e| *e == Ev::Init),
        1,
        "resumed without a re-list: {:?}",
        rec.seen
    );
    eventually("TCP back", || async {
        tokio::net::TcpStream::connect(addr).await.ok().map(|_| ())
    })
    .await;

    // down/up without a timer
    srv.ctl.down().await.expect("down");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    assert!(srv.api().get("a").await.is_err());
    srv.ctl.up().await.expect("up");
    assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
    srv.api().get("a").await.expect("get after up");
}

#[tokio::test]
async fn injected_500s_surface_and_the_watcher_recovers() {
    let srv = TestServer::start().await;
    srv.create("a", json!({})).await;
    srv.ctl
        .fail(&FailSpec {
            status: 500,
            count: 2,
            ..Default::default()
        })
        .await
        .expect("fail rule");
    let mut rec = Recorder::start(srv.api(), watcher::Config::default());
    let got = rec.until("InitDone", |e| *e == Ev::InitDone).await;
    let errors: Vec<&Ev> = got.iter().filter(|e| matches!(e, Ev::Error(_))).collect();
    assert_eq!(errors.len(), 2, "{got:?}");
    assert!(
        matches!(errors[0], Ev::Error(m) if m.contains("500") || m.contains("injected")),
        "{got:?}"
    );
    assert_eq!(
        got[got.len() - 2..],
        [Ev::InitApply("a".into()), Ev::InitDone]
    );
    let stats = srv.ctl.stats().await.expect("stats");
    assert_eq!(stats["by_client"]["127.0.0.1"]["failed_injected"], 2);

    // An injected 410 on a watch start arrives as ERROR inside a 200 stream: the watcher re-lists.
    // The first watcher's watch must be open already, or it could take the rule.
    srv.wait_open_watches(1).await;
    srv.ctl
        .fail(&FailSpec {
            status: 410,
            count: 1,
            verb: Some("watch"),
            ..Default::default()
        })
        .await
        .expect("fail rule");
    let mut rec2 = Recorder::start(srv.api(), watcher::Config::default());
    rec2.until("InitDone", |e| *e == Ev::InitDone).await;
    let after = rec2
        .until("InitDone after the 410", |e| *e == Ev::InitDone)
        .await;
    assert!(matches!(after.first(), Some(Ev::Error(_))), "{after:?}");
    srv.create("b", json!({})).await;
    rec2.until("Apply(b)", |e| *e == Ev::Apply("b".into()))
        .await;
}

#[tokio::test]
async fn pagination_with_limit_and_a_paged_watcher() {
    let srv = TestServer::start().await;
    for i in 0..7 {
        srv.create(&format!("n{i}"), json!({})).await;
    }
    let api = srv.api();
    let mut all = Vec::new();
    let mut lp = ListParams::default().limit(3);
    let mut rvs = Vec::new();
    loop {
        let page = api.list(&lp).await.expect("page");
        assert!(page.items.len() <= 3);
        rvs.push(page.metadata.resource_version.clone());
        all.extend(page.items.iter().map(|n| n.name_any()));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => {
                if all.len() == 3 {
                    assert_eq!(page.metadata.remaining_item_count, Some(4));
                    // a change between pages does not show in the next pages
                    srv.create("n00", json!({})).await;
                }
                lp = ListParams::default().limit(3).continue_token(&c);
            }
            None => break,
        }
    }
    assert_eq!(all, ["n0", "n1", "n2", "n3", "n4", "n5", "n6"]);
    assert!(
        rvs.windows(2).all(|w| w[0] == w[1]),
        "one snapshot: {rvs:?}"
    );

    let mut rec = Recorder::start(api, watcher::Config::default().page_size(2));
    let init = rec.until("InitDone", |e| *e == Ev::InitDone).await;
    assert_eq!(
        init.iter()
            .filter(|e| matches!(e, Ev::InitApply(_)))
            .count(),
        8
    );
    assert_eq!(
        srv.ctl.stats().await.expect("stats")["by_verb"]["list"],
        3 + 4
    );
}

#[tokio::test]
async fn label_selector_watch_sees_nodes_enter_and_leave() {
    let srv = TestServer::start().await;
    srv.create("a", json!({"role": "edge"})).await;
    srv.create("b", json!({"role": "core"})).await;
    let mut rec = Recorder::start(srv.api(), watcher::Config::default().labels("role=edge"));
    let init = rec.until("InitDone", |e| *e == Ev::InitDone).await;
    assert_eq!(init, [Ev::Init, Ev::InitApply("a".into()), Ev::InitDone]);
    srv.ctl
        .merge_patch_node("b", &json!({"metadata": {"labels": {"role": "edge"}}}))
        .await
        .expect("relabel b");
    rec.until("Apply(b)", |e| *e == Ev::Apply("b".into())).await;
    srv.ctl
        .merge_patch_node("a", &json!({"metadata": {"labels": {"role": "core"}}}))
        .await
        .expect("relabel a");
    rec.until("Delete(a)", |e| *e == Ev::Delete("a".into()))
        .await;
    rec.store_until("only b", |s| names(s) == ["b"]).await;
}

#[tokio::test]
async fn streaming_list_watcher_uses_send_initial_events() {
    let srv = TestServer::start().await;
    srv.create("a", json!({})).await;
    let mut rec = Recorder::start(srv.api(), watcher::Config::default().streaming_lists());
    let init = rec.until("InitDone", |e| *e == Ev::InitDone).await;
    assert_eq!(init, [Ev::Init, Ev::InitApply("a".into()), Ev::InitDone]);
    srv.create("b", json!({})).await;
    rec.until("Apply(b)", |e| *e == Ev::Apply("b".into())).await;
    let stats = srv.ctl.stats().await.expect("stats");
    assert_eq!(
        stats["by_verb"]["list"], 0,
        "no list in streaming mode: {stats}"
    );
}

#[tokio::test]
async fn strategic_merge_patch_on_status_keeps_the_kubelet_conditions() {
    let srv = TestServer::start().await;
    srv.create("a", json!({})).await;
    let api: Api<Node> = srv.api();
    let patch = json!({"status": {"conditions": [{"type": "WireGuardReady", "status": "True"}]},
                       "spec": {"unschedulable": true}});
    let n = api
        .patch_status("a", &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .expect("strategic status patch");
    let conds = n.status.and_then(|s| s.conditions).unwrap_or_default();
    assert_eq!(conds.len(), 2);
    assert_eq!(
        n.spec.and_then(|s| s.unschedulable),
        None,
        "spec is reset on /status"
    );
}
