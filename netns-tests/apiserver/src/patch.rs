//! Patch algorithms as pure functions over JSON: RFC 7386 merge patch, a Node-aware subset of
//! strategic merge patch, and RFC 6902 JSON patch.

use serde_json::{Map, Value};

/// A patch that cannot be applied (answered as 422 for JSON patch, 400 otherwise).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct PatchError(pub String);

/// RFC 7386 JSON merge patch: objects merge recursively, `null` deletes a key, everything else
/// (arrays included) replaces the target.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// Lists that strategic merge patch merges by a key (from the `patchMergeKey` tags of
/// k8s.io/api core/v1 for Node and ObjectMeta).
fn strategic_merge_key(path: &[&str]) -> Option<&'static str> {
    match path {
        ["status", "conditions"] | ["status", "addresses"] => Some("type"),
        ["status", "volumesAttached"] => Some("name"),
        ["spec", "taints"] => Some("key"),
        ["metadata", "ownerReferences"] => Some("uid"),
        _ => None,
    }
}

/// Lists of scalars that strategic merge patch unions (`patchStrategy=merge` on a primitive list).
fn strategic_primitive_merge(path: &[&str]) -> bool {
    matches!(
        path,
        ["metadata", "finalizers"] | ["spec", "podCIDRs"] | ["status", "volumesInUse"]
    )
}

/// Strategic merge patch for the Node fields that have a patch strategy (conditions, addresses,
/// taints, ...). Supports the `$patch` directive (`replace`, `delete`, `merge`) in maps and list
/// elements, and `$deleteFromPrimitiveList/<field>`. `$setElementOrder` and `$retainKeys` are
/// accepted and ignored. Everything else behaves like a merge patch.
pub fn strategic_merge_patch(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    strategic_at(target, patch, &mut Vec::new())
}

fn strategic_at(
    target: &mut Value,
    patch: &Value,
    path: &mut Vec<String>,
) -> Result<(), PatchError> {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut m = p.clone();
            m.remove("$patch");
            *target = Value::Object(strip_directives(m));
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Object(Map::new());
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => return Err(PatchError(format!("unknown patch type: {other}"))),
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else {
        return Ok(());
    };
    for (k, v) in p {
        if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            let remove: Vec<Value> = v.as_array().cloned().unwrap_or_default();
            if let Some(Value::Array(items)) = t.get_mut(field) {
                items.retain(|i| !remove.contains(i));
            }
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        if v.get("$patch").and_then(Value::as_str) == Some("delete") {
            t.remove(k);
            continue;
        }
        path.push(k.clone());
        let spath: Vec<&str> = path.iter().map(String::as_str).collect();
        match (
            v,
            strategic_merge_key(&spath),
            strategic_primitive_merge(&spath),
        ) {
            (Value::Array(items), Some(key), _) => {
                let cur = t.entry(k.clone()).or_insert(Value::Array(Vec::new()));
                merge_keyed_list(cur, items, key, path)?;
            }
            (Value::Array(items), None, true) => {
                let cur = t.entry(k.clone()).or_insert(Value::Array(Vec::new()));
                if !cur.is_array() {
                    *cur = Value::Array(Vec::new());
                }
                if let Value::Array(existing) = cur {
                    for i in items {
                        if !existing.contains(i) {
                            existing.push(i.clone());
                        }
                    }
                }
            }
            _ => strategic_at(t.entry(k.clone()).or_insert(Value::Null), v, path)?,
        }
        path.pop();
    }
    Ok(())
}

fn strip_directives(mut m: Map<String, Value>) -> Map<String, Value> {
    m.retain(|k, _| !k.starts_with('$'));
    m
}

fn merge_keyed_list(
    cur: &mut Value,
    items: &[Value],
    key: &str,
    path: &mut Vec<String>,
) -> Result<(), PatchError> {
    let replace = items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"));
    if replace {
        let kept = items
            .iter()
            .filter(|i| i.get("$patch").is_none())
            .cloned()
            .collect();
        *cur = Value::Array(kept);
        return Ok(());
    }
    if !cur.is_array() {
        *cur = Value::Array(Vec::new());
    }
    let Value::Array(list) = cur else {
        return Ok(());
    };
    for item in items {
        let Some(kv) = item.get(key) else {
            return Err(PatchError(format!(
                "map: {item} does not contain declared merge key: {key}"
            )));
        };
        let pos = list.iter().position(|e| e.get(key) == Some(kv));
        match (item.get("$patch").and_then(Value::as_str), pos) {
            (Some("delete"), Some(i)) => {
                list.remove(i);
            }
            (Some("delete"), None) => {}
            (_, Some(i)) => strategic_at(&mut list[i], item, path)?,
            (_, None) => {
                let mut fresh = Value::Object(Map::new());
                strategic_at(&mut fresh, item, path)?;
                list.push(fresh);
            }
        }
    }
    Ok(())
}

/// Splits an RFC 6901 JSON pointer into unescaped tokens.
fn pointer_tokens(ptr: &str) -> Result<Vec<String>, PatchError> {
    if ptr.is_empty() {
        return Ok(Vec::new());
    }
    let rest = ptr
        .strip_prefix('/')
        .ok_or_else(|| PatchError(format!("invalid JSON pointer: {ptr}")))?;
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn array_index(token: &str, len: usize, allow_end: bool) -> Result<usize, PatchError> {
    if allow_end && token == "-" {
        return Ok(len);
    }
    let i: usize = token
        .parse()
        .map_err(|_| PatchError(format!("invalid array index: {token}")))?;
    let max = if allow_end {
        len
    } else {
        len.saturating_sub(1)
    };
    if i > max || (!allow_end && len == 0) {
        return Err(PatchError(format!("array index out of bounds: {i}")));
    }
    Ok(i)
}

fn parent_mut<'a>(doc: &'a mut Value, tokens: &[String]) -> Result<&'a mut Value, PatchError> {
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(m) => m
                .get_mut(t)
                .ok_or_else(|| PatchError(format!("path not found: {t}")))?,
            Value::Array(a) => {
                let i = array_index(t, a.len(), false)?;
                &mut a[i]
            }
            _ => return Err(PatchError(format!("path not found: {t}"))),
        };
    }
    Ok(cur)
}

fn get_ptr<'a>(doc: &'a Value, tokens: &[String]) -> Result<&'a Value, PatchError> {
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(m) => m
                .get(t)
                .ok_or_else(|| PatchError(format!("path not found: {t}")))?,
            Value::Array(a) => &a[array_index(t, a.len(), false)?],
            _ => return Err(PatchError(format!("path not found: {t}"))),
        };
    }
    Ok(cur)
}

fn add_at(doc: &mut Value, tokens: &[String], value: Value) -> Result<(), PatchError> {
    let Some((last, parent)) = tokens.split_last() else {
        *doc = value;
        return Ok(());
    };
    match parent_mut(doc, parent)? {
        Value::Object(m) => {
            m.insert(last.clone(), value);
        }
        Value::Array(a) => {
            let i = array_index(last, a.len(), true)?;
            a.insert(i, value);
        }
        _ => return Err(PatchError(format!("cannot add at {last}"))),
    }
    Ok(())
}

fn remove_at(doc: &mut Value, tokens: &[String]) -> Result<Value, PatchError> {
    let Some((last, parent)) = tokens.split_last() else {
        return Err(PatchError("cannot remove the whole document".into()));
    };
    match parent_mut(doc, parent)? {
        Value::Object(m) => m
            .remove(last)
            .ok_or_else(|| PatchError(format!("path not found: {last}"))),
        Value::Array(a) => {
            let i = array_index(last, a.len(), false)?;
            Ok(a.remove(i))
        }
        _ => Err(PatchError(format!("path not found: {last}"))),
    }
}

/// RFC 6902 JSON patch (`add`, `remove`, `replace`, `move`, `copy`, `test`). All or nothing.
pub fn json_patch(target: &mut Value, ops: &Value) -> Result<(), PatchError> {
    let ops = ops
        .as_array()
        .ok_or_else(|| PatchError("a JSON patch must be an array of operations".into()))?;
    let mut doc = target.clone();
    for op in ops {
        let name = op.get("op").and_then(Value::as_str).unwrap_or("");
        let path = pointer_tokens(op.get("path").and_then(Value::as_str).unwrap_or(""))?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| PatchError(format!("operation {name} needs a value")))
        };
        let from = || pointer_tokens(op.get("from").and_then(Value::as_str).unwrap_or(""));
        match name {
            "add" => add_at(&mut doc, &path, value()?)?,
            "remove" => {
                remove_at(&mut doc, &path)?;
            }
            "replace" => {
                let v = value()?;
                *parent_mut(&mut doc, &path)? = v;
            }
            "move" => {
                let v = remove_at(&mut doc, &from()?)?;
                add_at(&mut doc, &path, v)?;
            }
            "copy" => {
                let v = get_ptr(&doc, &from()?)?.clone();
                add_at(&mut doc, &path, v)?;
            }
            "test" => {
                if get_ptr(&doc, &path)? != &value()? {
                    return Err(PatchError(format!(
                        "testing value {} failed",
                        op.get("path").and_then(Value::as_str).unwrap_or("")
                    )));
                }
            }
            other => return Err(PatchError(format!("unknown operation: {other:?}"))),
        }
    }
    *target = doc;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_rfc7386_examples() {
        // Appendix A of RFC 7386.
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (mut target, patch, want) in cases {
            merge_patch(&mut target, &patch);
            assert_eq!(target, want, "patch {patch}");
        }
    }

    #[test]
    fn strategic_merges_conditions_by_type() {
        let mut node = json!({"status":{"conditions":[
            {"type":"Ready","status":"True"},{"type":"DiskPressure","status":"False"}]}});
        let patch = json!({"status":{"conditions":[
            {"type":"WireGuardReady","status":"True"},{"type":"Ready","status":"False"}]}});
        strategic_merge_patch(&mut node, &patch)
            .map_err(|e| e.0)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            node,
            json!({"status":{"conditions":[
                {"type":"Ready","status":"False"},{"type":"DiskPressure","status":"False"},
                {"type":"WireGuardReady","status":"True"}]}})
        );
    }

    #[test]
    fn strategic_directives() {
        let mut node = json!({"status":{"addresses":[
            {"type":"InternalIP","address":"10.0.0.1"},{"type":"InternalIP","address":"fd00::1"}]},
            "metadata":{"finalizers":["a","b"],"labels":{"x":"1","y":"2"}}});
        let patch = json!({
            "status":{"addresses":[{"$patch":"replace"},{"type":"InternalIP","address":"10.0.0.2"}]},
            "metadata":{"$deleteFromPrimitiveList/finalizers":["a"],"labels":{"$patch":"replace","z":"3"}},
            "$setElementOrder/x":[]});
        strategic_merge_patch(&mut node, &patch)
            .map_err(|e| e.0)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            node,
            json!({"status":{"addresses":[{"type":"InternalIP","address":"10.0.0.2"}]},
                   "metadata":{"finalizers":["b"],"labels":{"z":"3"}}})
        );
        let mut node = json!({"status":{"conditions":[{"type":"A"},{"type":"B"}]}});
        let patch = json!({"status":{"conditions":[{"type":"A","$patch":"delete"}]}});
        strategic_merge_patch(&mut node, &patch)
            .map_err(|e| e.0)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(node, json!({"status":{"conditions":[{"type":"B"}]}}));
    }

    #[test]
    fn strategic_acts_like_merge_elsewhere() {
        let mut a =
            json!({"metadata":{"annotations":{"k":"v","old":"x"}},"spec":{"podCIDRs":["a"]}});
        let mut b = a.clone();
        let patch = json!({"metadata":{"annotations":{"k":"w","old":null}}});
        merge_patch(&mut a, &patch);
        strategic_merge_patch(&mut b, &patch)
            .map_err(|e| e.0)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a, b);
        let missing_key = json!({"status":{"conditions":[{"status":"True"}]}});
        assert!(strategic_merge_patch(&mut b, &missing_key).is_err());
    }

    #[test]
    fn json_patch_ops() {
        let mut doc = json!({"metadata":{"annotations":{"a":"1"}},"list":[1,2]});
        let ops = json!([
            {"op":"add","path":"/metadata/annotations/wgmesh.io~1key","value":"k"},
            {"op":"replace","path":"/metadata/annotations/a","value":"2"},
            {"op":"test","path":"/metadata/annotations/a","value":"2"},
            {"op":"add","path":"/list/-","value":3},
            {"op":"remove","path":"/list/0"},
            {"op":"copy","from":"/list","path":"/copy"},
            {"op":"move","from":"/copy","path":"/moved"}
        ]);
        json_patch(&mut doc, &ops)
            .map_err(|e| e.0)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            doc,
            json!({"metadata":{"annotations":{"a":"2","wgmesh.io/key":"k"}},"list":[2,3],"moved":[2,3]})
        );
    }

    #[test]
    fn json_patch_is_atomic() {
        let mut doc = json!({"a":1});
        let ops = json!([{"op":"add","path":"/b","value":2},{"op":"test","path":"/a","value":5}]);
        assert!(json_patch(&mut doc, &ops).is_err());
        assert_eq!(doc, json!({"a":1}));
        assert!(json_patch(&mut doc, &json!([{"op":"remove","path":"/zz"}])).is_err());
        assert!(json_patch(&mut doc, &json!({"op":"add"})).is_err());
    }
}
