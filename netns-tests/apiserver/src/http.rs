//! Request routing: the Kubernetes Node API, discovery, and `/_control/*` on the control socket.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tracing::debug;

use crate::control::{self, ClientId, Verb};
use crate::selector::Selector;
use crate::server::AppState;
use crate::status::ApiError;
use crate::store::{ListParams, MAX_BODY, PatchKind, Subresource, WriteOptions};
use crate::util::parse_query;
use crate::watch::{self, WatchParams};

/// The body type of every response.
pub type RespBody = UnsyncBoxBody<Bytes, Infallible>;

fn full(bytes: impl Into<Bytes>) -> RespBody {
    Full::new(bytes.into()).boxed_unsync()
}

fn json_response(status: u16, v: &Value) -> Response<RespBody> {
    json_bytes_response(status, serde_json::to_vec(v).unwrap_or_default())
}

/// A JSON answer from already encoded bytes.
fn json_bytes_response(status: u16, mut body: Vec<u8>) -> Response<RespBody> {
    body.push(b'\n');
    let mut r = Response::new(full(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error_response(e: &ApiError) -> Response<RespBody> {
    let mut r = json_response(e.code, &e.to_status());
    if e.code == 429 {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

fn text_response(status: u16, text: &'static str) -> Response<RespBody> {
    let mut r = Response::new(full(text));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn watch_response(body: watch::ChannelBody) -> Response<RespBody> {
    let mut r = Response::new(body.boxed_unsync());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    r
}

/// What a request addresses.
#[derive(Debug, Clone, PartialEq)]
enum Route {
    /// `/api/v1/nodes`
    Nodes,
    /// `/api/v1/nodes/{name}` or `/api/v1/nodes/{name}/status`
    Node(String, Subresource),
    /// `/version`, `/api`, `/api/v1`, `/apis`, `/healthz`, ...
    Discovery(&'static str),
    /// Anything else.
    Unknown,
}

fn route(path: &str) -> Route {
    let trimmed = path.trim_end_matches('/');
    match trimmed {
        "/api/v1/nodes" => return Route::Nodes,
        "/version" => return Route::Discovery("version"),
        "/api" => return Route::Discovery("api"),
        "/api/v1" => return Route::Discovery("api/v1"),
        "/apis" => return Route::Discovery("apis"),
        "/healthz" | "/readyz" | "/livez" => return Route::Discovery("health"),
        _ => {}
    }
    if let Some(rest) = trimmed.strip_prefix("/api/v1/nodes/") {
        let parts: Vec<&str> = rest.split('/').collect();
        return match parts.as_slice() {
            [name] if !name.is_empty() => Route::Node(name.to_string(), Subresource::Main),
            [name, "status"] if !name.is_empty() => {
                Route::Node(name.to_string(), Subresource::Status)
            }
            _ => Route::Unknown,
        };
    }
    Route::Unknown
}

fn param<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn is_watch(q: &[(String, String)]) -> bool {
    matches!(param(q, "watch"), Some("true" | "1" | "True"))
}

fn verb_of(method: &Method, route: &Route, q: &[(String, String)]) -> Verb {
    match (route, method) {
        (Route::Nodes, &Method::GET) if is_watch(q) => Verb::Watch,
        (Route::Nodes, &Method::GET) => Verb::List,
        (Route::Nodes, &Method::POST) => Verb::Create,
        (Route::Node(..), &Method::GET) => Verb::Get,
        (Route::Node(..), &Method::PUT) => Verb::Update,
        (Route::Node(..), &Method::PATCH) => Verb::Patch,
        (Route::Node(..), &Method::DELETE) => Verb::Delete,
        _ => Verb::Other,
    }
}

/// Entry point for every request on every listener.
pub async fn handle(
    state: Arc<AppState>,
    client: ClientId,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = parse_query(req.uri().query());
    let resp = if path == "/_control" || path.starts_with("/_control/") {
        if client == ClientId::Control {
            let (status, body) = control::handle(&state, &method, &path, &query).await;
            json_response(status, &body)
        } else {
            error_response(&ApiError::unknown_path())
        }
    } else {
        api(&state, &client, req, &method, &path, &query).await
    };
    debug!(
        method = %method,
        path = %req_path_display(&path, &query),
        status = resp.status().as_u16(),
        client = %client.label(),
        "request"
    );
    Ok(resp)
}

fn req_path_display(path: &str, q: &[(String, String)]) -> String {
    if q.is_empty() {
        return path.to_string();
    }
    let qs: Vec<String> = q.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{path}?{}", qs.join("&"))
}

async fn read_json(req: Request<Incoming>) -> Result<Value, ApiError> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::new(
                    413,
                    "RequestEntityTooLarge",
                    "the request body is too large",
                )
            } else {
                ApiError::bad_request(format!("reading the request body failed: {e}"))
            }
        })?
        .to_bytes();
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "the request body is not valid JSON (YAML apply bodies are not supported): {e}"
        ))
    })
}

fn write_options(
    req: &Request<Incoming>,
    q: &[(String, String)],
) -> Result<WriteOptions, ApiError> {
    let field_manager = match param(q, "fieldManager") {
        Some(m) if !m.is_empty() => m.to_string(),
        _ => req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|ua| {
                ua.split('/')
                    .next()
                    .unwrap_or("")
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(128)
                    .collect()
            })
            .unwrap_or_default(),
    };
    if field_manager.chars().count() > 128 {
        return Err(ApiError::invalid(
            "PatchOptions.meta.k8s.io",
            "",
            "fieldManager",
            "Too long: may not be more than 128 bytes",
        ));
    }
    let dry_run = match param(q, "dryRun") {
        None | Some("") => false,
        Some("All") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "PatchOptions.meta.k8s.io",
                "",
                "dryRun",
                &format!("Unsupported value: \"{other}\": supported values: \"All\""),
            ));
        }
    };
    Ok(WriteOptions {
        field_manager,
        force: param(q, "force") == Some("true"),
        dry_run,
    })
}

fn selector(q: &[(String, String)]) -> Result<Selector, ApiError> {
    Selector::parse(
        param(q, "labelSelector").filter(|s| !s.is_empty()),
        param(q, "fieldSelector").filter(|s| !s.is_empty()),
    )
}

async fn api(
    state: &Arc<AppState>,
    client: &ClientId,
    req: Request<Incoming>,
    method: &Method,
    path: &str,
    q: &[(String, String)],
) -> Response<RespBody> {
    let route = route(path);
    let verb = verb_of(method, &route, q);
    state.stats().record(client, verb);
    let name = match &route {
        Route::Node(n, _) => Some(n.as_str()),
        _ => None,
    };
    let injected = state.faults().take(verb, name, client);
    if let Some(code) = injected {
        state.stats().record_injected(client);
        let err = ApiError::injected(code);
        if verb == Verb::Watch && code == 410 {
            let err = ApiError::expired(format!(
                "too old resource version: {} ({})",
                param(q, "resourceVersion").unwrap_or(""),
                state.store().rv()
            ));
            return watch_response(watch::start_with_error(state.clone(), err));
        }
        return error_response(&err);
    }
    match serve_api(state, req, method, &route, verb, q).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

async fn serve_api(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    method: &Method,
    route: &Route,
    verb: Verb,
    q: &[(String, String)],
) -> Result<Response<RespBody>, ApiError> {
    match (route, verb) {
        (Route::Discovery(what), _) if *method == Method::GET => Ok(discovery(what, &req)),
        (Route::Nodes, Verb::Watch) => {
            let params = WatchParams::parse(q, selector(q)?)?;
            Ok(watch_response(watch::start(state.clone(), params)))
        }
        (Route::Nodes, Verb::List) => {
            let limit = match param(q, "limit").filter(|s| !s.is_empty()) {
                Some(l) => Some(
                    l.parse::<usize>()
                        .map_err(|_| ApiError::bad_request(format!("invalid limit \"{l}\"")))?,
                ),
                None => None,
            };
            if param(q, "sendInitialEvents").is_some() {
                return Err(ApiError::invalid(
                    "ListOptions.meta.k8s.io",
                    "",
                    "sendInitialEvents",
                    "Forbidden: sendInitialEvents is forbidden for list",
                ));
            }
            let lp = ListParams {
                selector: selector(q)?,
                limit,
                continue_token: param(q, "continue").map(String::from),
                resource_version: param(q, "resourceVersion").map(String::from),
                resource_version_match: param(q, "resourceVersionMatch").map(String::from),
            };
            let body = state.store().list_body(&lp)?;
            Ok(json_bytes_response(200, body))
        }
        (Route::Nodes, Verb::Create) => {
            let opts = write_options(&req, q)?;
            let body = read_json(req).await?;
            let r = state.write(|s| s.create(&body, &opts))?;
            Ok(json_response(201, &r.object))
        }
        (Route::Node(name, _), Verb::Get) => Ok(json_response(200, &state.store().get(name)?)),
        (Route::Node(name, sub), Verb::Update) => {
            let opts = write_options(&req, q)?;
            let body = read_json(req).await?;
            let r = state.write(|s| s.update(name, *sub, &body, &opts))?;
            Ok(json_response(200, &r.object))
        }
        (Route::Node(name, sub), Verb::Patch) => {
            let ct = req
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let kind = PatchKind::from_content_type(&ct)
                .ok_or_else(|| ApiError::unsupported_media_type(&ct))?;
            let opts = write_options(&req, q)?;
            let body = read_json(req).await?;
            let r = state.write(|s| s.patch(name, *sub, kind, &body, &opts))?;
            Ok(json_response(if r.created { 201 } else { 200 }, &r.object))
        }
        (Route::Node(name, Subresource::Main), Verb::Delete) => {
            let dry_run = param(q, "dryRun") == Some("All");
            let body = read_json(req).await?;
            let dry_run = dry_run
                || body
                    .get("dryRun")
                    .and_then(Value::as_array)
                    .is_some_and(|a| a.iter().any(|v| v == "All"));
            let pre = body.get("preconditions").cloned();
            let obj = state.write(|s| s.delete(name, pre.as_ref(), dry_run))?;
            Ok(json_response(200, &obj))
        }
        (Route::Unknown, _) => Err(ApiError::unknown_path()),
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn discovery(what: &str, req: &Request<Incoming>) -> Response<RespBody> {
    match what {
        "version" => json_response(
            200,
            &json!({"major": "1", "minor": "37", "emulationMajor": "1", "emulationMinor": "37",
                    "gitVersion": "v1.37.0-wgmesh-apiserver", "gitCommit": "", "gitTreeState": "clean",
                    "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.25", "compiler": "gc",
                    "platform": "linux/amd64"}),
        ),
        "api" => {
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("");
            json_response(
                200,
                &json!({"kind": "APIVersions", "versions": ["v1"],
                        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}]}),
            )
        }
        "api/v1" => json_response(
            200,
            &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1", "resources": [
                {"name": "nodes", "singularName": "node", "namespaced": false, "kind": "Node",
                 "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"], "shortNames": ["no"]},
                {"name": "nodes/status", "singularName": "", "namespaced": false, "kind": "Node",
                 "verbs": ["get", "patch", "update"]}
            ]}),
        ),
        "apis" => json_response(
            200,
            &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
        ),
        _ => text_response(200, "ok"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("/api/v1/nodes"), Route::Nodes);
        assert_eq!(route("/api/v1/nodes/"), Route::Nodes);
        assert_eq!(
            route("/api/v1/nodes/a"),
            Route::Node("a".into(), Subresource::Main)
        );
        assert_eq!(
            route("/api/v1/nodes/a/status"),
            Route::Node("a".into(), Subresource::Status)
        );
        assert_eq!(route("/api/v1/nodes/a/proxy"), Route::Unknown);
        assert_eq!(route("/api/v1/pods"), Route::Unknown);
        assert_eq!(route("/version"), Route::Discovery("version"));
    }

    #[test]
    fn verbs() {
        let q = parse_query(Some("&watch=true&resourceVersion=1"));
        assert_eq!(verb_of(&Method::GET, &Route::Nodes, &q), Verb::Watch);
        assert_eq!(verb_of(&Method::GET, &Route::Nodes, &[]), Verb::List);
        let node = Route::Node("a".into(), Subresource::Status);
        assert_eq!(verb_of(&Method::PATCH, &node, &[]), Verb::Patch);
        assert_eq!(verb_of(&Method::POST, &node, &[]), Verb::Other);
    }
}
