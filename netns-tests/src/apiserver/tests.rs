//! The client against a tiny fake stand-in on a Unix socket (no root needed).

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixListener,
    sync::{Arc, Mutex},
    thread,
};

use super::*;

/// Records each request as (request line, content type, body) and answers with `reply`.
type Seen = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

fn fake(
    reply: impl Fn(&str, &[u8]) -> (u16, String) + Send + 'static,
) -> (tempfile::TempDir, ApiClient, Seen) {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("api.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = Arc::clone(&seen);
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let mut reader = BufReader::new(conn);
            let mut line = String::new();
            reader.read_line(&mut line).expect("request line");
            let (mut len, mut ct) = (0usize, String::new());
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).expect("header");
                if h == "\r\n" {
                    break;
                }
                let (k, v) = h.split_once(':').expect("header colon");
                match k.to_ascii_lowercase().as_str() {
                    "content-length" => len = v.trim().parse().expect("length"),
                    "content-type" => ct = v.trim().to_owned(),
                    _ => {}
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).expect("body");
            let (status, text) = reply(line.trim(), &body);
            seen2
                .lock()
                .expect("lock")
                .push((line.trim().to_owned(), ct, body));
            let mut conn = reader.into_inner();
            write!(
                conn,
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{text}",
                text.len()
            )
            .expect("reply");
        }
    });
    let client = ApiClient::new(socket);
    (dir, client, seen)
}

#[test]
fn create_node_posts_a_kubelet_like_node() {
    let (_dir, api, seen) = fake(|_, body| (201, String::from_utf8_lossy(body).into_owned()));
    let cidr: IpNet = "198.18.1.0/24".parse().expect("cidr");
    let node = api
        .create_node("a", "192.0.2.11".parse().expect("ip"), &[cidr])
        .expect("create");
    assert_eq!(node["metadata"]["labels"]["kubernetes.io/hostname"], "a");
    assert_eq!(node["spec"]["podCIDR"], "198.18.1.0/24");
    assert_eq!(node["spec"]["podCIDRs"][0], "198.18.1.0/24");
    assert_eq!(node["status"]["addresses"][0]["type"], "InternalIP");
    assert_eq!(node["status"]["addresses"][0]["address"], "192.0.2.11");
    assert_eq!(node["status"]["conditions"][0]["type"], "Ready");
    let seen = seen.lock().expect("lock");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, "POST /api/v1/nodes HTTP/1.1");
}

#[test]
fn create_node_restores_a_dropped_status() {
    let (_dir, api, seen) = fake(|line, body| {
        if line.starts_with("POST") {
            (201, r#"{"metadata":{"name":"a"},"status":{}}"#.to_owned())
        } else {
            (200, String::from_utf8_lossy(body).into_owned())
        }
    });
    api.create_node("a", "192.0.2.11".parse().expect("ip"), &[])
        .expect("create");
    let seen = seen.lock().expect("lock");
    assert_eq!(seen[1].0, "PATCH /api/v1/nodes/a/status HTTP/1.1");
    assert_eq!(seen[1].1, MERGE_PATCH);
}

#[test]
fn annotation_patch_deletes_with_null() {
    let (_dir, api, seen) = fake(|_, _| (200, "{}".to_owned()));
    api.patch_node_annotations("a", &[("wgmesh.io/x", Some("1")), ("wgmesh.io/y", None)])
        .expect("patch");
    let seen = seen.lock().expect("lock");
    assert_eq!(seen[0].0, "PATCH /api/v1/nodes/a HTTP/1.1");
    assert_eq!(seen[0].1, MERGE_PATCH);
    let body: Value = serde_json::from_slice(&seen[0].2).expect("json");
    assert_eq!(
        body,
        json!({"metadata":{"annotations":{"wgmesh.io/x":"1","wgmesh.io/y":null}}})
    );
}

#[test]
fn control_routes_and_errors() {
    let (_dir, api, seen) = fake(|line, _| {
        if line.contains("/fail") {
            (500, "boom".to_owned())
        } else {
            (200, String::new())
        }
    });
    api.outage(30).expect("outage");
    api.down().expect("down");
    let err = api.fail(409, 2, Some("patch")).unwrap_err();
    assert!(format!("{err:#}").contains("500: boom"), "{err:#}");
    let seen = seen.lock().expect("lock");
    assert_eq!(seen[0].0, "POST /_control/outage?seconds=30 HTTP/1.1");
    assert_eq!(
        seen[2].0,
        "POST /_control/fail?status=409&count=2&verb=patch HTTP/1.1"
    );
}

#[test]
fn rfc3339_formats_utc() {
    let t = UNIX_EPOCH + Duration::from_secs(1_767_323_045);
    assert_eq!(rfc3339(t), "2026-01-02T03:04:05Z");
    assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
}
