//! Field ownership (`metadata.managedFields`) and server-side apply, as pure functions.
//!
//! This is a small model of structured-merge-diff: maps are granular (each key, e.g. each
//! annotation or label, is owned on its own), `status.conditions` and `metadata.ownerReferences`
//! are associative lists keyed by `type` / `uid`, and every other list is atomic. Ownership is
//! stored in the object as real `FieldsV1` entries, so clients see ordinary managedFields.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PathElem {
    /// A map key (`f:<name>` in FieldsV1).
    Field(String),
    /// An element of an associative list, by its key fields as JSON (`k:{"type":"Ready"}`).
    Key(String),
}

/// A path from the object root.
pub type FieldPath = Vec<PathElem>;
/// A set of owned paths: leaves, plus the associative-list elements themselves.
pub type FieldSet = BTreeSet<FieldPath>;

/// One `managedFields` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagedEntry {
    /// The field manager name.
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    /// `""` for the main resource, or `status`.
    pub subresource: String,
    /// When the entry last changed (RFC 3339).
    pub time: String,
    /// The owned fields.
    pub fields: FieldSet,
}

impl ManagedEntry {
    fn same_identity(&self, manager: &str, operation: &str, subresource: &str) -> bool {
        self.manager == manager && self.operation == operation && self.subresource == subresource
    }

    fn describe(&self) -> String {
        let mut s = format!("\"{}\" using v1", self.manager);
        if self.operation == "Update" && !self.time.is_empty() {
            s.push_str(&format!(" at {}", self.time));
        }
        if !self.subresource.is_empty() {
            s.push_str(&format!(" with subresource \"{}\"", self.subresource));
        }
        s
    }
}

/// An apply conflict: a field set to another value than the one its other owner set.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    /// Description of the other manager, e.g. `"kubelet" using v1`.
    pub manager: String,
    /// The field, e.g. `.metadata.annotations.wgmesh.io/key`.
    pub field: String,
}

/// Associative lists for apply (`listType=map`), with their key fields.
fn ssa_list_keys(path: &[PathElem]) -> Option<&'static [&'static str]> {
    let names: Vec<&str> = path
        .iter()
        .map(|e| match e {
            PathElem::Field(f) => f.as_str(),
            PathElem::Key(_) => "",
        })
        .collect();
    match names.as_slice() {
        ["status", "conditions"] => Some(&["type"]),
        ["metadata", "ownerReferences"] => Some(&["uid"]),
        _ => None,
    }
}

fn element_key(item: &Value, keys: &[&str]) -> Option<String> {
    let mut m = Map::new();
    for k in keys {
        m.insert((*k).to_string(), item.get(*k)?.clone());
    }
    serde_json::to_string(&Value::Object(m)).ok()
}

/// Fields the apply machinery never tracks.
const STRIPPED_META: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
];

/// The set of fields an object sets (apiVersion, kind and server-set metadata excluded).
pub fn field_set(obj: &Value) -> FieldSet {
    let mut out = FieldSet::new();
    let Value::Object(top) = obj else { return out };
    for (k, v) in top {
        if k == "apiVersion" || k == "kind" {
            continue;
        }
        let mut path = vec![PathElem::Field(k.clone())];
        if k == "metadata" {
            if let Value::Object(meta) = v {
                for (mk, mv) in meta {
                    if STRIPPED_META.contains(&mk.as_str()) {
                        continue;
                    }
                    path.push(PathElem::Field(mk.clone()));
                    collect(mv, &mut path, &mut out);
                    path.pop();
                }
            }
            continue;
        }
        collect(v, &mut path, &mut out);
    }
    out
}

fn collect(v: &Value, path: &mut FieldPath, out: &mut FieldSet) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, c) in m {
                path.push(PathElem::Field(k.clone()));
                collect(c, path, out);
                path.pop();
            }
        }
        Value::Array(items) => {
            let keyed = ssa_list_keys(path).and_then(|keys| {
                items
                    .iter()
                    .map(|i| element_key(i, keys).filter(|_| i.is_object()))
                    .collect::<Option<Vec<_>>>()
            });
            match keyed {
                Some(keys) => {
                    for (item, key) in items.iter().zip(keys) {
                        path.push(PathElem::Key(key));
                        out.insert(path.clone());
                        if let Value::Object(m) = item {
                            for (k, c) in m {
                                path.push(PathElem::Field(k.clone()));
                                collect(c, path, out);
                                path.pop();
                            }
                        }
                        path.pop();
                    }
                }
                None => {
                    out.insert(path.clone());
                }
            }
        }
        _ => {
            out.insert(path.clone());
        }
    }
}

fn key_matches(item: &Value, key_json: &str) -> bool {
    match serde_json::from_str::<Map<String, Value>>(key_json) {
        Ok(key) => key.iter().all(|(k, v)| item.get(k) == Some(v)),
        Err(_) => false,
    }
}

/// The value at a path, if present.
pub fn get_at<'a>(obj: &'a Value, path: &[PathElem]) -> Option<&'a Value> {
    let mut cur = obj;
    for e in path {
        cur = match e {
            PathElem::Field(f) => cur.as_object()?.get(f)?,
            PathElem::Key(k) => cur.as_array()?.iter().find(|i| key_matches(i, k))?,
        };
    }
    Some(cur)
}

fn get_at_mut<'a>(obj: &'a mut Value, path: &[PathElem]) -> Option<&'a mut Value> {
    let mut cur = obj;
    for e in path {
        cur = match e {
            PathElem::Field(f) => cur.as_object_mut()?.get_mut(f)?,
            PathElem::Key(k) => cur.as_array_mut()?.iter_mut().find(|i| key_matches(i, k))?,
        };
    }
    Some(cur)
}

/// Removes the value at a path, then removes maps that this left empty (never the root or
/// `metadata`).
pub fn remove_at(obj: &mut Value, path: &[PathElem]) {
    let Some((last, parent)) = path.split_last() else {
        return;
    };
    let Some(p) = get_at_mut(obj, parent) else {
        return;
    };
    let removed = match (last, p) {
        (PathElem::Field(f), Value::Object(m)) => m.remove(f).is_some(),
        (PathElem::Key(k), Value::Array(a)) => {
            let before = a.len();
            a.retain(|i| !key_matches(i, k));
            a.len() != before
        }
        _ => false,
    };
    if removed && parent.len() > 1 {
        let empty = get_at(obj, parent).is_some_and(|v| v.as_object().is_some_and(Map::is_empty));
        if empty {
            remove_at(obj, parent);
        }
    }
}

/// Renders a path the way apply conflicts print it: `.metadata.annotations.k`,
/// `.status.conditions[type="Ready"].status`.
pub fn path_string(path: &[PathElem]) -> String {
    let mut s = String::new();
    for e in path {
        match e {
            PathElem::Field(f) => {
                s.push('.');
                s.push_str(f);
            }
            PathElem::Key(k) => {
                let parts: Vec<String> = serde_json::from_str::<Map<String, Value>>(k)
                    .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect())
                    .unwrap_or_default();
                s.push_str(&format!("[{}]", parts.join(",")));
            }
        }
    }
    s
}

#[derive(Default)]
struct Tree {
    member: bool,
    children: std::collections::BTreeMap<String, Tree>,
}

fn elem_name(e: &PathElem) -> String {
    match e {
        PathElem::Field(f) => format!("f:{f}"),
        PathElem::Key(k) => format!("k:{k}"),
    }
}

/// A field set as a `FieldsV1` object.
pub fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Tree::default();
    for path in set {
        let mut node = &mut root;
        for e in path {
            node = node.children.entry(elem_name(e)).or_default();
        }
        node.member = true;
    }
    fn render(t: &Tree) -> Value {
        let mut m = Map::new();
        if t.member && !t.children.is_empty() {
            m.insert(".".into(), json!({}));
        }
        for (k, c) in &t.children {
            m.insert(k.clone(), render(c));
        }
        Value::Object(m)
    }
    render(&root)
}

/// Parses a `FieldsV1` object (unknown element kinds are skipped).
pub fn from_fields_v1(v: &Value) -> FieldSet {
    fn walk(v: &Value, path: &mut FieldPath, out: &mut FieldSet) {
        let Some(m) = v.as_object() else { return };
        if (m.is_empty() || m.contains_key(".")) && !path.is_empty() {
            out.insert(path.clone());
        }
        for (k, c) in m {
            let elem = if let Some(f) = k.strip_prefix("f:") {
                PathElem::Field(f.to_string())
            } else if let Some(key) = k.strip_prefix("k:") {
                PathElem::Key(key.to_string())
            } else {
                continue;
            };
            path.push(elem);
            walk(c, path, out);
            path.pop();
        }
    }
    let mut out = FieldSet::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

/// Reads `metadata.managedFields`.
pub fn read_managed(obj: &Value) -> Vec<ManagedEntry> {
    let Some(list) = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    let s = |e: &Value, k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    list.iter()
        .map(|e| ManagedEntry {
            manager: s(e, "manager"),
            operation: s(e, "operation"),
            subresource: s(e, "subresource"),
            time: s(e, "time"),
            fields: e.get("fieldsV1").map(from_fields_v1).unwrap_or_default(),
        })
        .collect()
}

/// Writes `metadata.managedFields` (removed when there is no entry).
pub fn write_managed(obj: &mut Value, entries: &[ManagedEntry]) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut m = Map::new();
            m.insert("manager".into(), json!(e.manager));
            m.insert("operation".into(), json!(e.operation));
            m.insert("apiVersion".into(), json!("v1"));
            if !e.time.is_empty() {
                m.insert("time".into(), json!(e.time));
            }
            m.insert("fieldsType".into(), json!("FieldsV1"));
            m.insert("fieldsV1".into(), to_fields_v1(&e.fields));
            if !e.subresource.is_empty() {
                m.insert("subresource".into(), json!(e.subresource));
            }
            Value::Object(m)
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// Removes every `time` from `managedFields`, so that two objects can be compared while
/// ignoring timestamp-only changes (as the real server does for no-op writes).
pub fn without_managed_times(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(list) = o
        .pointer_mut("/metadata/managedFields")
        .and_then(Value::as_array_mut)
    {
        for e in list {
            if let Some(m) = e.as_object_mut() {
                m.remove("time");
            }
        }
    }
    o
}

fn is_prefix(prefix: &[PathElem], path: &[PathElem]) -> bool {
    path.len() >= prefix.len() && path[..prefix.len()] == *prefix
}

/// Merges an applied configuration into the live object: maps recursively, associative lists
/// by key, everything else replaced.
fn apply_merge(live: &mut Value, applied: &Value, path: &mut FieldPath) {
    match (live, applied) {
        (Value::Object(l), Value::Object(a)) => {
            for (k, v) in a {
                path.push(PathElem::Field(k.clone()));
                match l.get_mut(k) {
                    Some(cur) => apply_merge(cur, v, path),
                    None => {
                        l.insert(k.clone(), v.clone());
                    }
                }
                path.pop();
            }
        }
        (Value::Array(l), Value::Array(a)) if ssa_list_keys(path).is_some() => {
            let keys = ssa_list_keys(path).unwrap_or(&[]);
            for item in a {
                let Some(key) = element_key(item, keys) else {
                    continue;
                };
                match l.iter_mut().find(|e| key_matches(e, &key)) {
                    Some(cur) => {
                        path.push(PathElem::Key(key));
                        apply_merge(cur, item, path);
                        path.pop();
                    }
                    None => l.push(item.clone()),
                }
            }
        }
        (live, applied) => *live = applied.clone(),
    }
}

/// Who applies, and how.
#[derive(Debug, Clone)]
pub struct ApplyOptions<'a> {
    /// The field manager (required by the caller).
    pub manager: &'a str,
    /// `""` or `status`.
    pub subresource: &'a str,
    /// Take fields away from other managers instead of failing.
    pub force: bool,
    /// The time to record.
    pub now: &'a str,
}

/// Server-side apply of `applied` onto `live` (the object as stored, with its managedFields).
/// Returns the new object or the conflicts. The caller strips reset fields (status/spec)
/// from `applied` beforehand and stamps server-owned metadata afterwards.
pub fn apply(live: &Value, applied: &Value, opts: &ApplyOptions) -> Result<Value, Vec<Conflict>> {
    let mut entries = read_managed(live);
    let new_set = field_set(applied);
    let mine = |e: &ManagedEntry| e.same_identity(opts.manager, "Apply", opts.subresource);

    let mut conflicts = Vec::new();
    let mut taken: Vec<(usize, FieldPath)> = Vec::new();
    for p in &new_set {
        if matches!(p.last(), Some(PathElem::Key(_))) {
            continue;
        }
        let value = get_at(applied, p);
        // an empty map asserts nothing about its keys, and equal values are shared
        if value.is_some_and(|v| v.as_object().is_some_and(Map::is_empty))
            || get_at(live, p) == value
        {
            continue;
        }
        for (i, e) in entries.iter().enumerate() {
            if !mine(e) && e.fields.contains(p) {
                conflicts.push(Conflict {
                    manager: e.describe(),
                    field: path_string(p),
                });
                taken.push((i, p.clone()));
            }
        }
    }
    if !conflicts.is_empty() && !opts.force {
        return Err(conflicts);
    }
    for (i, p) in taken {
        entries[i].fields.remove(&p);
    }

    let mut merged = live.clone();
    apply_merge(&mut merged, applied, &mut Vec::new());

    let old_set = entries
        .iter()
        .find(|e| mine(e))
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    for p in old_set.difference(&new_set) {
        let owned_elsewhere = entries
            .iter()
            .filter(|e| !mine(e))
            .any(|e| e.fields.iter().any(|q| is_prefix(p, q)));
        let still_applied = new_set.iter().any(|q| is_prefix(p, q));
        if !owned_elsewhere && !still_applied {
            remove_at(&mut merged, p);
        }
    }

    match entries.iter_mut().find(|e| mine(e)) {
        Some(e) => {
            if e.fields != new_set {
                e.time = opts.now.to_string();
            }
            e.fields = new_set;
        }
        None => entries.push(ManagedEntry {
            manager: opts.manager.to_string(),
            operation: "Apply".into(),
            subresource: opts.subresource.to_string(),
            time: opts.now.to_string(),
            fields: new_set,
        }),
    }
    entries.retain(|e| !e.fields.is_empty());
    write_managed(&mut merged, &entries);
    Ok(merged)
}

/// Records a non-apply write (create, update, merge/strategic/JSON patch) by `manager`:
/// the fields it added or changed become its own (operation `Update`) and are taken away from
/// every other manager; removed fields leave every set. `new` is modified in place.
pub fn track_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    subresource: &str,
    now: &str,
) {
    let empty = json!({});
    let old = old.unwrap_or(&empty);
    let explicit = new.pointer("/metadata/managedFields").is_some()
        && new.pointer("/metadata/managedFields") != old.pointer("/metadata/managedFields");
    let mut entries = if explicit {
        read_managed(new)
    } else {
        read_managed(old)
    };
    let old_set = field_set(old);
    let new_set = field_set(new);
    let changed: FieldSet = new_set
        .iter()
        .filter(|p| !old_set.contains(*p) || get_at(old, p) != get_at(new, p))
        .cloned()
        .collect();
    for e in entries.iter_mut() {
        e.fields.retain(|p| new_set.contains(p));
        if !e.same_identity(manager, "Update", subresource) {
            e.fields.retain(|p| !changed.contains(p));
        }
    }
    if !changed.is_empty() {
        match entries
            .iter_mut()
            .find(|e| e.same_identity(manager, "Update", subresource))
        {
            Some(e) => {
                e.fields.extend(changed);
                e.time = now.to_string();
            }
            None => entries.push(ManagedEntry {
                manager: manager.to_string(),
                operation: "Update".into(),
                subresource: subresource.to_string(),
                time: now.to_string(),
                fields: changed,
            }),
        }
    }
    entries.retain(|e| !e.fields.is_empty());
    write_managed(new, &entries);
}

/// The message of a 409 apply conflict, in the real server's format.
pub fn conflict_message(conflicts: &[Conflict]) -> String {
    if let [c] = conflicts {
        return format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            c.manager, c.field
        );
    }
    let mut managers: Vec<&str> = conflicts.iter().map(|c| c.manager.as_str()).collect();
    managers.dedup();
    let groups: Vec<String> = managers
        .iter()
        .map(|m| {
            let fields: Vec<String> = conflicts
                .iter()
                .filter(|c| c.manager == *m)
                .map(|c| format!("- {}", c.field))
                .collect();
            format!("conflicts with {m}:\n{}", fields.join("\n"))
        })
        .collect();
    format!(
        "Apply failed with {} conflicts: {}",
        conflicts.len(),
        groups.join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(parts: &[&str]) -> FieldPath {
        parts
            .iter()
            .map(|p| PathElem::Field(p.to_string()))
            .collect()
    }

    fn opts<'a>(manager: &'a str, force: bool) -> ApplyOptions<'a> {
        ApplyOptions {
            manager,
            subresource: "",
            force,
            now: "2026-11-23T12:00:00Z",
        }
    }

    fn node(ann: Value) -> Value {
        json!({"apiVersion":"v1","kind":"Node","metadata":{"name":"a","uid":"u","annotations":ann}})
    }

    fn applied(ann: Value) -> Value {
        json!({"apiVersion":"v1","kind":"Node","metadata":{"name":"a","annotations":ann}})
    }

    fn applied_nothing() -> Value {
        json!({"apiVersion":"v1","kind":"Node","metadata":{"name":"a"}})
    }

    fn ok(r: Result<Value, Vec<Conflict>>) -> Value {
        r.unwrap_or_else(|c| panic!("unexpected conflicts {c:?}"))
    }

    #[test]
    fn field_set_skips_server_metadata_and_keys_conditions() {
        let obj = json!({"apiVersion":"v1","kind":"Node",
            "metadata":{"name":"a","resourceVersion":"3","labels":{"l":"1"},"annotations":{}},
            "spec":{"podCIDRs":["x"]},
            "status":{"conditions":[{"type":"Ready","status":"True"}]}});
        let set = field_set(&obj);
        let cond = vec![
            PathElem::Field("status".into()),
            PathElem::Field("conditions".into()),
            PathElem::Key(r#"{"type":"Ready"}"#.into()),
        ];
        let mut cond_status = cond.clone();
        cond_status.push(PathElem::Field("status".into()));
        let want: FieldSet = [
            f(&["metadata", "labels", "l"]),
            f(&["metadata", "annotations"]),
            f(&["spec", "podCIDRs"]),
            cond.clone(),
            cond_status,
            {
                let mut p = cond;
                p.push(PathElem::Field("type".into()));
                p
            },
        ]
        .into_iter()
        .collect();
        assert_eq!(set, want);
    }

    #[test]
    fn fields_v1_round_trip() {
        let obj = json!({"metadata":{"annotations":{"a":"1","b":"2"}},
            "status":{"conditions":[{"type":"X","status":"True"}]}});
        let set = field_set(&obj);
        let v1 = to_fields_v1(&set);
        assert_eq!(
            v1,
            json!({"f:metadata":{"f:annotations":{"f:a":{},"f:b":{}}},
                   "f:status":{"f:conditions":{"k:{\"type\":\"X\"}":{".":{},"f:status":{},"f:type":{}}}}})
        );
        assert_eq!(from_fields_v1(&v1), set);
        assert_eq!(
            path_string(
                &set.iter()
                    .find(|p| p.len() == 4)
                    .cloned()
                    .unwrap_or_default()
            ),
            ".status.conditions[type=\"X\"].status"
        );
    }

    #[test]
    fn apply_creates_updates_and_removes_own_fields_only() {
        let live = node(json!({"other": "o"}));
        let mut live = live;
        // another manager owns "other" through an update
        track_update(None, &mut live, "kubectl", "", "t0");
        let v1 = ok(apply(
            &live,
            &applied(json!({"k1":"a","k2":"b"})),
            &opts("mgr", false),
        ));
        assert_eq!(
            v1["metadata"]["annotations"],
            json!({"other":"o","k1":"a","k2":"b"})
        );
        let v2 = ok(apply(&v1, &applied(json!({"k1":"c"})), &opts("mgr", false)));
        assert_eq!(v2["metadata"]["annotations"], json!({"other":"o","k1":"c"}));
        let entries = read_managed(&v2);
        assert_eq!(entries.len(), 2);
        let mine = entries
            .iter()
            .find(|e| e.manager == "mgr")
            .map(|e| e.fields.clone());
        assert_eq!(
            mine,
            Some(
                [f(&["metadata", "annotations", "k1"])]
                    .into_iter()
                    .collect()
            )
        );
        // applying nothing removes everything the manager owned, and the empty map goes away
        let v3 = ok(apply(&v2, &applied_nothing(), &opts("mgr", false)));
        assert_eq!(v3["metadata"]["annotations"], json!({"other":"o"}));
        assert!(read_managed(&v3).iter().all(|e| e.manager != "mgr"));
    }

    #[test]
    fn apply_conflicts_unless_same_value_or_forced() {
        let mut live = node(json!({"k":"v"}));
        track_update(None, &mut live, "kubectl", "", "t0");
        // same value: shared ownership, no conflict
        let shared = ok(apply(
            &live,
            &applied(json!({"k":"v"})),
            &opts("mgr", false),
        ));
        assert_eq!(read_managed(&shared).len(), 2);
        // different value: conflict
        let err = apply(&live, &applied(json!({"k":"w"})), &opts("mgr", false));
        let conflicts = err.err().unwrap_or_default();
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].field, ".metadata.annotations.k");
        assert_eq!(conflicts[0].manager, "\"kubectl\" using v1 at t0");
        assert_eq!(
            conflict_message(&conflicts),
            "Apply failed with 1 conflict: conflict with \"kubectl\" using v1 at t0: .metadata.annotations.k"
        );
        // forced: value taken, ownership moved
        let forced = ok(apply(&live, &applied(json!({"k":"w"})), &opts("mgr", true)));
        assert_eq!(forced["metadata"]["annotations"]["k"], "w");
        let entries = read_managed(&forced);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].manager, "mgr");
    }

    #[test]
    fn shared_field_survives_when_one_owner_stops_applying() {
        let live = node(json!({}));
        let a = ok(apply(&live, &applied(json!({"k":"v"})), &opts("a", false)));
        let b = ok(apply(&a, &applied(json!({"k":"v"})), &opts("b", false)));
        let a2 = ok(apply(&b, &applied_nothing(), &opts("a", false)));
        assert_eq!(a2["metadata"]["annotations"]["k"], "v");
        let b2 = ok(apply(&a2, &applied_nothing(), &opts("b", false)));
        assert!(b2["metadata"].get("annotations").is_none());
        // an empty map owned by one manager does not conflict with another's keys
        let c = ok(apply(&b, &applied(json!({})), &opts("c", false)));
        assert_eq!(c["metadata"]["annotations"]["k"], "v");
    }

    #[test]
    fn apply_merges_conditions_by_type() {
        let live = json!({"apiVersion":"v1","kind":"Node","metadata":{"name":"a"},
            "status":{"conditions":[{"type":"Ready","status":"True"}]}});
        let body = json!({"apiVersion":"v1","kind":"Node","metadata":{"name":"a"},
            "status":{"conditions":[{"type":"WireGuardReady","status":"True"}]}});
        let out = ok(apply(&live, &body, &opts("wg", false)));
        assert_eq!(
            out["status"]["conditions"],
            json!([{"type":"Ready","status":"True"},{"type":"WireGuardReady","status":"True"}])
        );
        let body2 = json!({"apiVersion":"v1","kind":"Node","metadata":{"name":"a"}});
        let out2 = ok(apply(&out, &body2, &opts("wg", false)));
        assert_eq!(
            out2["status"]["conditions"],
            json!([{"type":"Ready","status":"True"}])
        );
    }

    #[test]
    fn update_takes_ownership_of_changed_fields() {
        let live = node(json!({}));
        let a = ok(apply(&live, &applied(json!({"k":"v"})), &opts("a", false)));
        let mut patched = a.clone();
        patched["metadata"]["annotations"]["k"] = json!("x");
        track_update(Some(&a), &mut patched, "patcher", "", "t1");
        let entries = read_managed(&patched);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].manager, "patcher");
        assert_eq!(entries[0].operation, "Update");
        // no-op update: nothing changes, not even the time
        let mut again = patched.clone();
        track_update(Some(&patched), &mut again, "patcher", "", "t2");
        assert_eq!(again, patched);
    }
}
