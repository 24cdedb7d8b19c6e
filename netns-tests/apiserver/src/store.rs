//! The object store: Nodes as Kubernetes JSON, one global resourceVersion counter, a bounded
//! window of watch events, and every write (create, update, patch, apply, delete) as a pure
//! synchronous operation. The HTTP layer only parses requests and formats answers.

use std::cmp::Ordering;
use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use serde::ser::{Serialize, SerializeMap as _, Serializer};
use serde_json::{Map, Value, json};

use crate::managed::{self, ApplyOptions};
use crate::patch;
use crate::selector::Selector;
use crate::status::{ApiError, NODES};
use crate::util;

/// The kind of a stored watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The object was created.
    Added,
    /// The object was changed.
    Modified,
    /// The object was deleted.
    Deleted,
}

impl EventKind {
    /// The watch event `type` string.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Added => "ADDED",
            EventKind::Modified => "MODIFIED",
            EventKind::Deleted => "DELETED",
        }
    }
}

/// A committed change to a Node.
#[derive(Debug, Clone)]
pub struct HistoryEvent {
    /// The resourceVersion of the write.
    pub rv: u64,
    /// What happened.
    pub kind: EventKind,
    /// The object after the write; for a delete, the last state stamped with the delete's RV.
    pub object: Arc<Value>,
    /// The object before the write (none for a create).
    pub old: Option<Arc<Value>>,
}

/// Which part of a Node a write goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subresource {
    /// `/api/v1/nodes/{name}`: status changes are dropped.
    Main,
    /// `/api/v1/nodes/{name}/status`: spec changes are dropped.
    Status,
}

impl Subresource {
    fn managed_name(self) -> &'static str {
        match self {
            Subresource::Main => "",
            Subresource::Status => "status",
        }
    }
}

/// The patch Content-Types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    /// `application/merge-patch+json` (RFC 7386).
    Merge,
    /// `application/strategic-merge-patch+json`.
    Strategic,
    /// `application/json-patch+json` (RFC 6902).
    Json,
    /// `application/apply-patch+yaml` (server-side apply; JSON bodies only).
    Apply,
}

impl PatchKind {
    /// Maps a Content-Type (parameters after `;` ignored) to a patch kind.
    pub fn from_content_type(ct: &str) -> Option<Self> {
        match ct.split(';').next().unwrap_or("").trim() {
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/json-patch+json" => Some(Self::Json),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Some(Self::Apply),
            _ => None,
        }
    }
}

/// Options shared by writes.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// `fieldManager`, or the User-Agent prefix, or empty.
    pub field_manager: String,
    /// `force=true` (apply only).
    pub force: bool,
    /// `dryRun=All`: compute and answer, commit nothing.
    pub dry_run: bool,
}

/// The answer to a write.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteResult {
    /// The object as stored (or as it would be, for a dry run).
    pub object: Value,
    /// True when the write created the object (answer 201).
    pub created: bool,
    /// True when something was committed (false for no-op writes and dry runs).
    pub committed: bool,
}

/// `GET /api/v1/nodes` parameters.
#[derive(Debug, Clone, Default)]
pub struct ListParams {
    /// labelSelector + fieldSelector.
    pub selector: Selector,
    /// `limit` (0 = no limit).
    pub limit: Option<usize>,
    /// `continue`.
    pub continue_token: Option<String>,
    /// `resourceVersion`.
    pub resource_version: Option<String>,
    /// `resourceVersionMatch`.
    pub resource_version_match: Option<String>,
}

/// A stored Node: the object (shared with the watch history) and its list-item JSON, encoded once
/// per write so that serving a list page is a concatenation, not a clone and a re-encode.
#[derive(Debug)]
struct Stored {
    value: Arc<Value>,
    item_json: Bytes,
}

impl Stored {
    fn new(value: Value) -> Self {
        let item_json = Bytes::from(serde_json::to_vec(&ListItem(&value)).unwrap_or_default());
        Self {
            value: Arc::new(value),
            item_json,
        }
    }
}

/// A Node as a list item: real list responses carry no `kind`/`apiVersion` on their items.
struct ListItem<'a>(&'a Value);

impl Serialize for ListItem<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Object(m) => {
                let mut map = ser.serialize_map(None)?;
                for (k, v) in m.iter().filter(|(k, _)| *k != "kind" && *k != "apiVersion") {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
            other => other.serialize(ser),
        }
    }
}

/// One item of a list page: the current object (JSON cached) or an older one from the history
/// (a continued list whose snapshot has changed since).
#[derive(Clone, Copy)]
enum PageItem<'a> {
    Current(&'a Stored),
    Old(&'a Value),
}

impl PageItem<'_> {
    fn value(&self) -> &Value {
        match self {
            PageItem::Current(s) => &s.value,
            PageItem::Old(v) => v,
        }
    }

    fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            PageItem::Current(s) => out.extend_from_slice(&s.item_json),
            PageItem::Old(v) => {
                let _ = serde_json::to_writer(&mut *out, &ListItem(v));
            }
        }
    }
}

/// A list page before it is encoded.
struct Page<'a> {
    meta: Map<String, Value>,
    items: Vec<PageItem<'a>>,
}

/// Walks the current Nodes (from `start`) merged with the `overrides` (the state at an older RV
/// of the Nodes changed since: `None` = did not exist then), in name order.
fn merged<'a, 'k>(
    current: impl Iterator<Item = (&'k String, &'a Stored)>,
    overrides: impl Iterator<Item = (&'k str, Option<&'a Value>)>,
) -> impl Iterator<Item = PageItem<'a>> {
    let mut cur = current.peekable();
    let mut ov = overrides.peekable();
    std::iter::from_fn(move || {
        loop {
            let order = match (cur.peek(), ov.peek()) {
                (None, None) => return None,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((a, _)), Some((b, _))) => a.as_str().cmp(b),
            };
            if order == Ordering::Less {
                return cur.next().map(|(_, s)| PageItem::Current(s));
            }
            if order == Ordering::Equal {
                cur.next();
            }
            if let Some((_, Some(old))) = ov.next() {
                return Some(PageItem::Old(old));
            }
        }
    })
}

/// The store. All methods are synchronous; the server wraps it in a mutex.
#[derive(Debug)]
pub struct Store {
    nodes: BTreeMap<String, Stored>,
    rv: u64,
    history: VecDeque<HistoryEvent>,
    /// A watch from an RV >= `floor` can be served from `history`.
    floor: u64,
    window: usize,
}

/// Upper bound for request bodies taken from the real apiserver (3 MiB).
pub const MAX_BODY: usize = 3 * 1024 * 1024;

fn meta_str<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(key)?.as_str()
}

fn set_meta(obj: &mut Value, key: &str, value: Value) {
    if !obj.get("metadata").is_some_and(Value::is_object)
        && let Some(m) = obj.as_object_mut()
    {
        m.insert("metadata".into(), json!({}));
    }
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert(key.to_string(), value);
    }
}

fn remove_meta(obj: &mut Value, key: &str) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove(key);
    }
}

fn parse_rv(s: &str) -> Result<u64, ApiError> {
    s.parse::<u64>()
        .map_err(|_| ApiError::bad_request(format!("invalid resource version \"{s}\"")))
}

/// Checks `apiVersion`/`kind` of a request body (both optional, but if set they must be v1 Node).
fn check_type(obj: &Value) -> Result<(), ApiError> {
    let api = obj
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("v1");
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("Node");
    if api != "v1" || kind != "Node" {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api}) does not match the expected API version (v1) \
             or the kind ({kind}) is not Node"
        )));
    }
    Ok(())
}

fn name_mismatch(body_name: &str, url_name: &str) -> ApiError {
    ApiError::bad_request(format!(
        "the name of the object ({body_name}) does not match the name on the URL ({url_name})"
    ))
}

/// Reset rules of the Node strategies: the main resource keeps the old status, `/status` keeps
/// the old spec.
fn reset_fields(new: &mut Value, old: Option<&Value>, sub: Subresource) {
    let field = match sub {
        Subresource::Main => "status",
        Subresource::Status => "spec",
    };
    let Some(m) = new.as_object_mut() else { return };
    match old.and_then(|o| o.get(field)) {
        Some(v) => {
            m.insert(field.into(), v.clone());
        }
        None => {
            m.remove(field);
        }
    }
}

/// Restores server-owned fields (type, name, uid, creationTimestamp) from the stored object.
fn restore_server_fields(new: &mut Value, old: &Value) {
    if let Some(m) = new.as_object_mut() {
        m.insert("apiVersion".into(), json!("v1"));
        m.insert("kind".into(), json!("Node"));
    }
    for key in ["name", "uid", "creationTimestamp"] {
        match old.get("metadata").and_then(|m| m.get(key)) {
            Some(v) => set_meta(new, key, v.clone()),
            None => remove_meta(new, key),
        }
    }
}

/// Equality that ignores the resourceVersion and managedFields timestamps (no-op detection).
fn same_content(a: &Value, b: &Value) -> bool {
    let norm = |v: &Value| {
        let mut v = managed::without_managed_times(v);
        remove_meta(&mut v, "resourceVersion");
        v
    };
    norm(a) == norm(b)
}

fn encode_continue(rv: u64, start: &str) -> String {
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": start});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
}

fn decode_continue(token: &str) -> Result<(u64, String), ApiError> {
    let bad = || {
        ApiError::bad_request(
            "continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)",
        )
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    let rv = v.get("rv").and_then(Value::as_u64).ok_or_else(bad)?;
    let start = v.get("start").and_then(Value::as_str).ok_or_else(bad)?;
    Ok((rv, start.to_string()))
}

impl Store {
    /// An empty store whose counter starts at 1, keeping `window` watch events.
    pub fn new(window: usize) -> Self {
        Self {
            nodes: BTreeMap::new(),
            rv: 1,
            history: VecDeque::new(),
            floor: 0,
            window: window.max(1),
        }
    }

    /// The current global resourceVersion.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// The oldest RV a watch can still start from.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Number of stored Nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when no Node is stored.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Forgets the whole event history: every watch from an older RV gets 410.
    pub fn compact(&mut self) {
        self.history.clear();
        self.floor = self.rv;
    }

    fn commit(&mut self, name: &str, new: Option<Value>, kind: EventKind) -> Value {
        self.rv += 1;
        let rv = self.rv;
        let old = self.nodes.get(name).map(|s| s.value.clone());
        let object = match new {
            Some(mut obj) => {
                set_meta(&mut obj, "resourceVersion", json!(rv.to_string()));
                let stored = Stored::new(obj);
                let object = stored.value.clone();
                self.nodes.insert(name.to_string(), stored);
                object
            }
            None => {
                let mut last = self
                    .nodes
                    .remove(name)
                    .map_or_else(|| json!({}), |s| (*s.value).clone());
                set_meta(&mut last, "resourceVersion", json!(rv.to_string()));
                Arc::new(last)
            }
        };
        self.history.push_back(HistoryEvent {
            rv,
            kind,
            object: object.clone(),
            old,
        });
        while self.history.len() > self.window {
            if let Some(e) = self.history.pop_front() {
                self.floor = e.rv;
            }
        }
        Arc::unwrap_or_clone(object)
    }

    /// Events with RV > `rv`, plus the current RV; 410 Expired when they are no longer kept.
    pub fn events_since(&self, rv: u64) -> Result<(Vec<HistoryEvent>, u64), ApiError> {
        if rv < self.floor {
            return Err(ApiError::expired(format!(
                "too old resource version: {rv} ({})",
                self.floor
            )));
        }
        let start = self.history.partition_point(|e| e.rv <= rv);
        Ok((self.history.range(start..).cloned().collect(), self.rv))
    }

    /// All Nodes matching a selector (current state), in name order.
    pub fn matching(&self, sel: &Selector) -> Vec<Value> {
        self.nodes
            .values()
            .filter(|n| sel.matches(&n.value))
            .map(|n| (*n.value).clone())
            .collect()
    }

    /// How the Nodes changed since `rv` differ from their state at `rv` (for consistent
    /// pagination): for each Node written after `rv`, its state then (`None`: it did not exist).
    fn overrides_since(&self, rv: u64) -> Result<BTreeMap<&str, Option<&Value>>, ApiError> {
        if rv < self.floor {
            return Err(ApiError::expired(format!(
                "too old resource version: {rv} ({})",
                self.floor
            )));
        }
        let mut out = BTreeMap::new();
        // Newest first: the earliest write after `rv` wins, its `old` is the state at `rv`.
        for e in self.history.iter().rev().take_while(|e| e.rv > rv) {
            let name = meta_str(&e.object, "name").unwrap_or("");
            match (&e.kind, &e.old) {
                (EventKind::Added, _) => {
                    out.insert(name, None);
                }
                (_, Some(old)) => {
                    out.insert(name, Some(&**old));
                }
                (_, None) => {}
            }
        }
        Ok(out)
    }

    /// `GET /api/v1/nodes/{name}`.
    pub fn get(&self, name: &str) -> Result<Value, ApiError> {
        self.nodes
            .get(name)
            .map(|s| (*s.value).clone())
            .ok_or_else(|| ApiError::not_found(NODES, name))
    }

    /// `GET /api/v1/nodes`: a NodeList with the semantics of the real server for
    /// resourceVersion / resourceVersionMatch / limit / continue.
    pub fn list(&self, p: &ListParams) -> Result<Value, ApiError> {
        let page = self.list_page(p)?;
        let items: Vec<Value> = page
            .items
            .iter()
            .map(|i| serde_json::to_value(ListItem(i.value())).unwrap_or_default())
            .collect();
        Ok(json!({"kind": "NodeList", "apiVersion": "v1", "metadata": page.meta, "items": items}))
    }

    /// [`Store::list`] encoded as the response body (the same bytes `serde_json` writes for it),
    /// assembled from each Node's cached JSON.
    pub fn list_body(&self, p: &ListParams) -> Result<Vec<u8>, ApiError> {
        let page = self.list_page(p)?;
        let meta = serde_json::to_vec(&page.meta).unwrap_or_default();
        let size: usize = page
            .items
            .iter()
            .map(|i| match i {
                PageItem::Current(s) => s.item_json.len() + 1,
                PageItem::Old(_) => 2048,
            })
            .sum();
        let mut out = Vec::with_capacity(size + meta.len() + 64);
        out.extend_from_slice(br#"{"apiVersion":"v1","items":["#);
        for (i, item) in page.items.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            item.write_json(&mut out);
        }
        out.extend_from_slice(br#"],"kind":"NodeList","metadata":"#);
        out.extend_from_slice(&meta);
        out.push(b'}');
        Ok(out)
    }

    fn list_page(&self, p: &ListParams) -> Result<Page<'_>, ApiError> {
        let rv_param = p.resource_version.as_deref().filter(|s| !s.is_empty());
        let rvm = p
            .resource_version_match
            .as_deref()
            .filter(|s| !s.is_empty());
        let limit = p.limit.filter(|l| *l > 0);
        let invalid = |detail: &str| {
            ApiError::invalid(
                "ListOptions.meta.k8s.io",
                "",
                "resourceVersionMatch",
                detail,
            )
        };
        if rvm.is_some() && rv_param.is_none() {
            return Err(invalid(
                "Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
            ));
        }
        if let Some(m) = rvm
            && m != "Exact"
            && m != "NotOlderThan"
        {
            return Err(invalid(&format!(
                "Unsupported value: \"{m}\": supported values: \"Exact\", \"NotOlderThan\""
            )));
        }
        let (snap_rv, snapshot, start) = match p.continue_token.as_deref().filter(|s| !s.is_empty())
        {
            Some(token) => {
                if rvm.is_some() {
                    return Err(invalid(
                        "Forbidden: resourceVersionMatch is forbidden when continue is provided",
                    ));
                }
                let (rv, start) = decode_continue(token)?;
                let snap = self.overrides_since(rv).map_err(|_| {
                    ApiError::expired(
                        "The provided continue parameter is too old to display a consistent list result. \
                         You can start a new list without the continue parameter.",
                    )
                })?;
                (rv, snap, Some(start))
            }
            None => {
                let requested = rv_param.map(parse_rv).transpose()?;
                let exact = match (requested, rvm) {
                    (Some(0), Some("Exact")) => {
                        return Err(invalid(
                            "Forbidden: resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
                        ));
                    }
                    (Some(n), Some("Exact")) => Some(n),
                    (Some(n), None) if n != 0 && limit.is_some() => Some(n),
                    _ => None,
                };
                if let Some(n) = requested.filter(|n| *n > self.rv) {
                    return Err(ApiError::new(
                        504,
                        "Timeout",
                        format!("Too large resource version: {n}, current: {}", self.rv),
                    )
                    .with_details(json!({"causes": [{"reason": "ResourceVersionTooLarge",
                        "message": "Too large resource version"}], "retryAfterSeconds": 1})));
                }
                match exact {
                    Some(n) => (n, self.overrides_since(n)?, None),
                    None => (self.rv, BTreeMap::new(), None),
                }
            }
        };
        let from = start.as_deref().unwrap_or("");
        let current = self
            .nodes
            .range::<str, _>((Bound::Included(from), Bound::Unbounded));
        let overrides = snapshot.range::<str, _>((Bound::Included(from), Bound::Unbounded));
        let mut matching = merged(current, overrides.map(|(k, v)| (*k, *v)))
            .filter(|i| p.selector.matches(i.value()));
        let mut items: Vec<PageItem<'_>> = match limit {
            Some(l) => matching.by_ref().take(l).collect(),
            None => matching.by_ref().collect(),
        };
        let mut meta = Map::new();
        meta.insert("resourceVersion".into(), json!(snap_rv.to_string()));
        if limit.is_some() && matching.next().is_some() {
            let last = items
                .last()
                .and_then(|v| meta_str(v.value(), "name"))
                .unwrap_or("");
            meta.insert(
                "continue".into(),
                json!(encode_continue(snap_rv, &format!("{last}\u{0}"))),
            );
            if p.selector.is_empty() {
                meta.insert("remainingItemCount".into(), json!(1 + matching.count()));
            }
        }
        items.shrink_to_fit();
        Ok(Page { meta, items })
    }

    fn finish(
        &mut self,
        name: &str,
        old: Option<&Value>,
        new: Value,
        dry_run: bool,
    ) -> WriteResult {
        if let Some(old) = old
            && same_content(old, &new)
        {
            return WriteResult {
                object: old.clone(),
                created: false,
                committed: false,
            };
        }
        let created = old.is_none();
        if dry_run {
            let mut object = new;
            match old.and_then(|o| o.pointer("/metadata/resourceVersion")) {
                Some(rv) => set_meta(&mut object, "resourceVersion", rv.clone()),
                None => remove_meta(&mut object, "resourceVersion"),
            }
            return WriteResult {
                object,
                created,
                committed: false,
            };
        }
        let kind = if created {
            EventKind::Added
        } else {
            EventKind::Modified
        };
        let object = self.commit(name, Some(new), kind);
        WriteResult {
            object,
            created,
            committed: true,
        }
    }

    /// A fresh Node skeleton for `name` with server-set metadata.
    fn stamp_new(obj: &mut Value, name: &str) {
        if let Some(m) = obj.as_object_mut() {
            m.insert("apiVersion".into(), json!("v1"));
            m.insert("kind".into(), json!("Node"));
        }
        set_meta(obj, "name", json!(name));
        set_meta(obj, "uid", json!(util::new_uid()));
        set_meta(obj, "creationTimestamp", json!(util::now_rfc3339()));
        remove_meta(obj, "resourceVersion");
    }

    /// `POST /api/v1/nodes`.
    pub fn create(&mut self, body: &Value, opts: &WriteOptions) -> Result<WriteResult, ApiError> {
        if !body.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        check_type(body)?;
        let name = match (meta_str(body, "name"), meta_str(body, "generateName")) {
            (Some(n), _) if !n.is_empty() => n.to_string(),
            (_, Some(g)) if !g.is_empty() => format!("{g}{}", util::name_suffix()),
            _ => {
                return Err(ApiError::invalid(
                    "Node",
                    "",
                    "metadata.name",
                    "Required value: name or generateName is required",
                ));
            }
        };
        if name.contains('/') || name.len() > 253 {
            return Err(ApiError::invalid(
                "Node",
                &name,
                "metadata.name",
                "Invalid value: a DNS-1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'",
            ));
        }
        if self.nodes.contains_key(&name) {
            return Err(ApiError::already_exists(NODES, &name));
        }
        let mut obj = body.clone();
        Self::stamp_new(&mut obj, &name);
        remove_meta(&mut obj, "managedFields");
        let now = util::now_rfc3339();
        managed::track_update(None, &mut obj, &opts.field_manager, "", &now);
        Ok(self.finish(&name, None, obj, opts.dry_run))
    }

    /// `PUT /api/v1/nodes/{name}[/status]`: replace, with the resourceVersion precondition.
    pub fn update(
        &mut self,
        name: &str,
        sub: Subresource,
        body: &Value,
        opts: &WriteOptions,
    ) -> Result<WriteResult, ApiError> {
        if !body.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        check_type(body)?;
        if let Some(n) = meta_str(body, "name")
            && n != name
        {
            return Err(name_mismatch(n, name));
        }
        let old = self.get(name)?;
        if let Some(rv) = meta_str(body, "resourceVersion")
            && !rv.is_empty()
            && Some(rv) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::conflict(NODES, name));
        }
        let mut new = body.clone();
        if new.pointer("/metadata/managedFields").is_none()
            && let Some(mf) = old.pointer("/metadata/managedFields")
        {
            set_meta(&mut new, "managedFields", mf.clone());
        }
        self.write_existing(name, sub, &old, new, opts)
    }

    fn write_existing(
        &mut self,
        name: &str,
        sub: Subresource,
        old: &Value,
        mut new: Value,
        opts: &WriteOptions,
    ) -> Result<WriteResult, ApiError> {
        restore_server_fields(&mut new, old);
        reset_fields(&mut new, Some(old), sub);
        let now = util::now_rfc3339();
        managed::track_update(
            Some(old),
            &mut new,
            &opts.field_manager,
            sub.managed_name(),
            &now,
        );
        set_meta(
            &mut new,
            "resourceVersion",
            old.pointer("/metadata/resourceVersion")
                .cloned()
                .unwrap_or(Value::Null),
        );
        Ok(self.finish(name, Some(old), new, opts.dry_run))
    }

    /// `PATCH /api/v1/nodes/{name}[/status]` with any of the four patch types.
    pub fn patch(
        &mut self,
        name: &str,
        sub: Subresource,
        kind: PatchKind,
        body: &Value,
        opts: &WriteOptions,
    ) -> Result<WriteResult, ApiError> {
        let patch_options_invalid = |field: &str, detail: &str| {
            ApiError::invalid("PatchOptions.meta.k8s.io", "", field, detail)
        };
        if kind == PatchKind::Apply {
            if opts.field_manager.is_empty() {
                return Err(patch_options_invalid(
                    "fieldManager",
                    "Required value: is required for apply patch",
                ));
            }
            return self.apply(name, sub, body, opts);
        }
        if opts.force {
            return Err(patch_options_invalid(
                "force",
                "Forbidden: may not be specified for non-apply patch",
            ));
        }
        let old = self.get(name)?;
        let mut new = old.clone();
        match kind {
            PatchKind::Merge => patch::merge_patch(&mut new, body),
            PatchKind::Strategic => patch::strategic_merge_patch(&mut new, body)
                .map_err(|e| ApiError::bad_request(e.0))?,
            PatchKind::Json => patch::json_patch(&mut new, body).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!(
                        "the server rejected our request due to an error in our request: {}",
                        e.0
                    ),
                )
            })?,
            PatchKind::Apply => {}
        }
        if !new.is_object() {
            return Err(ApiError::bad_request(
                "the patched object is not a JSON object",
            ));
        }
        if let Some(n) = meta_str(&new, "name")
            && n != name
        {
            return Err(name_mismatch(n, name));
        }
        if let Some(rv) = meta_str(&new, "resourceVersion")
            && !rv.is_empty()
            && Some(rv) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::conflict(NODES, name));
        }
        self.write_existing(name, sub, &old, new, opts)
    }

    fn apply(
        &mut self,
        name: &str,
        sub: Subresource,
        body: &Value,
        opts: &WriteOptions,
    ) -> Result<WriteResult, ApiError> {
        if !body.is_object() {
            return Err(ApiError::bad_request(
                "error decoding YAML: the apply body must be a JSON (or JSON-compatible YAML) object",
            ));
        }
        let api = body.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind = body.get("kind").and_then(Value::as_str).unwrap_or("");
        if kind != "Node" || (api != "v1") {
            let (group, version) = api.rsplit_once('/').unwrap_or(("", api));
            return Err(ApiError::bad_request(format!(
                "invalid object type: {group}/{version}, Kind={kind}"
            )));
        }
        if let Some(n) = meta_str(body, "name")
            && n != name
        {
            return Err(name_mismatch(n, name));
        }
        if body.pointer("/metadata/managedFields").is_some() {
            return Err(ApiError::bad_request("metadata.managedFields must be nil"));
        }
        let old = self.nodes.get(name).map(|s| (*s.value).clone());
        let body_rv = meta_str(body, "resourceVersion").filter(|s| !s.is_empty());
        if let Some(rv) = body_rv
            && old
                .as_ref()
                .is_none_or(|o| meta_str(o, "resourceVersion") != Some(rv))
        {
            return Err(ApiError::conflict(NODES, name));
        }
        let live = match &old {
            Some(o) => o.clone(),
            None if sub == Subresource::Status => return Err(ApiError::not_found(NODES, name)),
            None => {
                let mut fresh = json!({"apiVersion": "v1", "kind": "Node", "metadata": {}});
                Self::stamp_new(&mut fresh, name);
                fresh
            }
        };
        let mut applied = body.clone();
        remove_meta(&mut applied, "resourceVersion");
        if let Some(m) = applied.as_object_mut() {
            m.remove(match sub {
                Subresource::Main => "status",
                Subresource::Status => "spec",
            });
        }
        let now = util::now_rfc3339();
        let aopts = ApplyOptions {
            manager: &opts.field_manager,
            subresource: sub.managed_name(),
            force: opts.force,
            now: &now,
        };
        let mut new = managed::apply(&live, &applied, &aopts).map_err(|conflicts| {
            let causes: Vec<Value> = conflicts
                .iter()
                .map(|c| {
                    json!({"reason": "FieldManagerConflict",
                    "message": format!("conflict with {}", c.manager), "field": c.field})
                })
                .collect();
            ApiError::new(409, "Conflict", managed::conflict_message(&conflicts))
                .with_details(json!({"causes": causes}))
        })?;
        restore_server_fields(&mut new, &live);
        reset_fields(&mut new, old.as_ref(), sub);
        if let Some(rv) = live.pointer("/metadata/resourceVersion") {
            set_meta(&mut new, "resourceVersion", rv.clone());
        }
        Ok(self.finish(name, old.as_ref(), new, opts.dry_run))
    }

    /// `DELETE /api/v1/nodes/{name}` with optional `preconditions` (`uid`, `resourceVersion`).
    /// Returns the last state, stamped with the delete's RV (finalizers are not modelled).
    pub fn delete(
        &mut self,
        name: &str,
        preconditions: Option<&Value>,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let old = self.get(name)?;
        if let Some(pre) = preconditions {
            for key in ["uid", "resourceVersion"] {
                if let Some(want) = pre.get(key).and_then(Value::as_str)
                    && Some(want) != meta_str(&old, key)
                {
                    return Err(ApiError::new(
                        409,
                        "Conflict",
                        format!(
                            "Precondition failed: {key} in precondition: {want}, {key} in object meta: {}",
                            meta_str(&old, key).unwrap_or("")
                        ),
                    )
                    .with_details(json!({"name": name, "kind": NODES})));
                }
            }
        }
        if dry_run {
            return Ok(old);
        }
        Ok(self.commit(name, None, EventKind::Deleted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> Value {
        json!({"apiVersion":"v1","kind":"Node","metadata":{"name":name,"labels":{"role":"x"}},
               "spec":{"podCIDR":"10.0.0.0/24"},"status":{"conditions":[{"type":"Ready","status":"True"}]}})
    }

    fn ok<T>(r: Result<T, ApiError>) -> T {
        r.unwrap_or_else(|e| panic!("unexpected error {e}"))
    }

    fn opts(mgr: &str) -> WriteOptions {
        WriteOptions {
            field_manager: mgr.into(),
            ..Default::default()
        }
    }

    fn rv_of(v: &Value) -> u64 {
        meta_str(v, "resourceVersion")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn create_get_delete_bump_one_counter() {
        let mut s = Store::new(100);
        let a = ok(s.create(&node("a"), &opts("t"))).object;
        let b = ok(s.create(&node("b"), &opts("t"))).object;
        assert_eq!(rv_of(&a), 2);
        assert_eq!(rv_of(&b), 3);
        assert_eq!(meta_str(&a, "uid").map(str::len), Some(36));
        assert!(meta_str(&a, "creationTimestamp").is_some());
        assert_eq!(
            s.create(&node("a"), &opts("t")).map_err(|e| e.reason),
            Err("AlreadyExists".to_string())
        );
        let deleted = ok(s.delete("a", None, false));
        assert_eq!(rv_of(&deleted), 4);
        assert_eq!(s.get("a").map_err(|e| e.code), Err(404));
        let (events, rv) = ok(s.events_since(0));
        assert_eq!(rv, 4);
        let kinds: Vec<_> = events.iter().map(|e| (e.rv, e.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (2, EventKind::Added),
                (3, EventKind::Added),
                (4, EventKind::Deleted)
            ]
        );
    }

    #[test]
    fn merge_patch_bumps_once_and_noop_does_not() {
        let mut s = Store::new(100);
        ok(s.create(&node("a"), &opts("t")));
        let p = json!({"metadata":{"annotations":{"wgmesh.io/k":"v"}}});
        let r1 = ok(s.patch("a", Subresource::Main, PatchKind::Merge, &p, &opts("agent")));
        assert!(r1.committed);
        assert_eq!(rv_of(&r1.object), 3);
        let r2 = ok(s.patch("a", Subresource::Main, PatchKind::Merge, &p, &opts("agent")));
        assert!(!r2.committed);
        assert_eq!(s.rv(), 3);
        assert_eq!(ok(s.events_since(2)).0.len(), 1);
    }

    #[test]
    fn stale_resource_version_conflicts() {
        let mut s = Store::new(100);
        ok(s.create(&node("a"), &opts("t")));
        let stale = json!({"metadata":{"resourceVersion":"1","annotations":{"k":"v"}}});
        let err = s.patch("a", Subresource::Main, PatchKind::Merge, &stale, &opts(""));
        assert_eq!(
            err.map_err(|e| (e.code, e.reason)),
            Err((409, "Conflict".to_string()))
        );
        let fresh = json!({"metadata":{"resourceVersion":"2","annotations":{"k":"v"}}});
        ok(s.patch("a", Subresource::Main, PatchKind::Merge, &fresh, &opts("")));
        let mut put = ok(s.get("a"));
        set_meta(&mut put, "resourceVersion", json!("2"));
        assert_eq!(
            s.update("a", Subresource::Main, &put, &opts(""))
                .map_err(|e| e.code),
            Err(409)
        );
    }

    #[test]
    fn status_and_spec_are_reset_by_subresource() {
        let mut s = Store::new(100);
        ok(s.create(&node("a"), &opts("t")));
        let p = json!({"spec":{"unschedulable":true},"status":{"conditions":[]}});
        let main = ok(s.patch("a", Subresource::Main, PatchKind::Merge, &p, &opts("")));
        assert_eq!(main.object["spec"]["unschedulable"], true);
        assert_eq!(main.object["status"]["conditions"][0]["type"], "Ready");
        let p2 = json!({"spec":{"unschedulable":false},"status":{"conditions":[{"type":"WireGuardReady","status":"True"}]}});
        let st = ok(s.patch(
            "a",
            Subresource::Status,
            PatchKind::Strategic,
            &p2,
            &opts(""),
        ));
        assert_eq!(st.object["spec"]["unschedulable"], true);
        assert_eq!(
            st.object["status"]["conditions"].as_array().map(Vec::len),
            Some(2)
        );
    }

    #[test]
    fn apply_creates_owns_and_conflicts() {
        let mut s = Store::new(100);
        let body = |ann: Value| json!({"apiVersion":"v1","kind":"Node","metadata":{"name":"a","annotations":ann}});
        let mut force = opts("mgr");
        force.force = true;
        let created = ok(s.patch(
            "a",
            Subresource::Main,
            PatchKind::Apply,
            &body(json!({"k1":"a","k2":"b"})),
            &force,
        ));
        assert!(created.created);
        ok(s.patch(
            "a",
            Subresource::Main,
            PatchKind::Merge,
            &json!({"metadata":{"annotations":{"other":"o"}}}),
            &opts("kubectl"),
        ));
        let r = ok(s.patch(
            "a",
            Subresource::Main,
            PatchKind::Apply,
            &body(json!({"k1":"a"})),
            &force,
        ));
        assert_eq!(
            r.object["metadata"]["annotations"],
            json!({"k1":"a","other":"o"})
        );
        let again = ok(s.patch(
            "a",
            Subresource::Main,
            PatchKind::Apply,
            &body(json!({"k1":"a"})),
            &force,
        ));
        assert!(!again.committed);
        let err = s.patch(
            "a",
            Subresource::Main,
            PatchKind::Apply,
            &body(json!({"other":"x"})),
            &opts("mgr"),
        );
        let err = err.err().unwrap_or_else(|| ApiError::new(0, "", ""));
        assert_eq!(err.code, 409);
        assert_eq!(
            err.details
                .as_ref()
                .map(|d| d["causes"][0]["field"].clone()),
            Some(json!(".metadata.annotations.other"))
        );
        assert_eq!(
            s.patch(
                "a",
                Subresource::Main,
                PatchKind::Apply,
                &body(json!({})),
                &opts("")
            )
            .map_err(|e| e.code),
            Err(422)
        );
        let wrong = json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":"a"}});
        assert_eq!(
            s.patch("a", Subresource::Main, PatchKind::Apply, &wrong, &opts("m"))
                .map_err(|e| e.code),
            Err(400)
        );
    }

    #[test]
    fn window_and_compaction_expire_old_rvs() {
        let mut s = Store::new(2);
        for n in ["a", "b", "c"] {
            ok(s.create(&node(n), &opts("")));
        }
        assert_eq!(s.events_since(1).map_err(|e| e.code).err(), Some(410));
        assert_eq!(ok(s.events_since(2)).0.len(), 2);
        s.compact();
        assert_eq!(
            s.events_since(3).map_err(|e| e.reason).err(),
            Some("Expired".into())
        );
        assert_eq!(ok(s.events_since(4)).0.len(), 0);
    }

    #[test]
    fn list_pagination_is_a_consistent_snapshot() {
        let mut s = Store::new(100);
        for n in ["a", "b", "c", "d", "e"] {
            ok(s.create(&node(n), &opts("")));
        }
        let p1 = ok(s.list(&ListParams {
            limit: Some(2),
            ..Default::default()
        }));
        assert_eq!(p1["metadata"]["resourceVersion"], "6");
        assert_eq!(p1["metadata"]["remainingItemCount"], 3);
        assert!(p1["items"][0].get("kind").is_none());
        let token = p1["metadata"]["continue"].as_str().map(String::from);
        // changes after the first page are not visible in the next pages
        ok(s.delete("c", None, false));
        ok(s.create(&node("bb"), &opts("")));
        let p2 = ok(s.list(&ListParams {
            limit: Some(2),
            continue_token: token,
            ..Default::default()
        }));
        let names: Vec<_> = p2["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| meta_str(i, "name"))
            .collect();
        assert_eq!(names, vec!["c", "d"]);
        assert_eq!(p2["metadata"]["resourceVersion"], "6");
        let token = p2["metadata"]["continue"].as_str().map(String::from);
        let p3 = ok(s.list(&ListParams {
            limit: Some(2),
            continue_token: token,
            ..Default::default()
        }));
        assert_eq!(p3["items"].as_array().map(Vec::len), Some(1));
        assert!(p3["metadata"].get("continue").is_none());
        // current state
        let all = ok(s.list(&ListParams::default()));
        assert_eq!(all["items"].as_array().map(Vec::len), Some(5));
        assert_eq!(all["metadata"]["resourceVersion"], "8");
    }

    #[test]
    fn list_body_is_the_encoded_list_for_current_and_older_snapshots() {
        let mut s = Store::new(100);
        for n in ["a", "b", "c", "d", "e"] {
            ok(s.create(&node(n), &opts("")));
        }
        let first = ListParams {
            limit: Some(2),
            ..Default::default()
        };
        let same = |s: &Store, p: &ListParams| {
            let body = ok(s.list_body(p));
            assert_eq!(body, serde_json::to_vec(&ok(s.list(p))).unwrap_or_default());
            ok(serde_json::from_slice::<Value>(&body)
                .map_err(|e| ApiError::bad_request(e.to_string())))
        };
        let p1 = same(&s, &first);
        let token = p1["metadata"]["continue"].as_str().map(String::from);
        ok(s.delete("c", None, false));
        ok(s.patch(
            "d",
            Subresource::Main,
            PatchKind::Merge,
            &json!({"metadata": {"labels": {"x": "y"}}}),
            &opts(""),
        ));
        let p2 = same(
            &s,
            &ListParams {
                limit: Some(2),
                continue_token: token,
                ..Default::default()
            },
        );
        // the page shows c and d as they were at the first page's RV
        assert_eq!(p2["items"][0]["metadata"]["name"], "c");
        assert!(p2["items"][1]["metadata"]["labels"].get("x").is_none());
        assert!(p2["items"][1].get("kind").is_none());
        assert_eq!(p2["metadata"]["remainingItemCount"], 1);
        let all = same(&s, &ListParams::default());
        assert_eq!(all["items"].as_array().map(Vec::len), Some(4));
        assert_eq!(all["items"][2]["metadata"]["labels"]["x"], "y");
        let sel = same(
            &s,
            &ListParams {
                selector: ok(Selector::parse(Some("x=y"), None)),
                limit: Some(1),
                ..Default::default()
            },
        );
        assert_eq!(sel["items"].as_array().map(Vec::len), Some(1));
        assert!(sel["metadata"].get("continue").is_none());
    }

    #[test]
    fn list_resource_version_rules() {
        let mut s = Store::new(100);
        ok(s.create(&node("a"), &opts("")));
        let lp = |rv: &str, m: Option<&str>, limit: Option<usize>| ListParams {
            resource_version: Some(rv.into()),
            resource_version_match: m.map(String::from),
            limit,
            ..Default::default()
        };
        assert_eq!(
            s.list(&lp("", Some("Exact"), None))
                .map_err(|e| e.code)
                .err(),
            Some(422)
        );
        assert_eq!(
            s.list(&lp("0", Some("Exact"), None))
                .map_err(|e| e.code)
                .err(),
            Some(422)
        );
        assert_eq!(
            s.list(&lp("99", None, None)).map_err(|e| e.code).err(),
            Some(504)
        );
        let exact = ok(s.list(&lp("1", None, Some(10))));
        assert_eq!(exact["items"].as_array().map(Vec::len), Some(0));
        let not_older = ok(s.list(&lp("1", Some("NotOlderThan"), None)));
        assert_eq!(not_older["items"].as_array().map(Vec::len), Some(1));
        let sel = ListParams {
            selector: ok(Selector::parse(Some("role=y"), None)),
            ..Default::default()
        };
        assert_eq!(ok(s.list(&sel))["items"], json!([]));
    }

    #[test]
    fn delete_preconditions() {
        let mut s = Store::new(100);
        ok(s.create(&node("a"), &opts("")));
        let pre = json!({"resourceVersion":"1"});
        assert_eq!(
            s.delete("a", Some(&pre), false).map_err(|e| e.code).err(),
            Some(409)
        );
        let dry = ok(s.delete("a", None, true));
        assert_eq!(meta_str(&dry, "name"), Some("a"));
        assert!(s.get("a").is_ok());
    }
}
