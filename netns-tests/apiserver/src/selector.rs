//! Label and field selectors for Node lists and watches.

use serde_json::Value;

use crate::status::ApiError;

/// One label requirement.
#[derive(Debug, Clone, PartialEq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// One field requirement (`metadata.name` or `spec.unschedulable`).
#[derive(Debug, Clone, PartialEq)]
struct FieldReq {
    field: String,
    value: String,
    equal: bool,
}

/// A parsed `labelSelector` plus `fieldSelector`. The empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selector {
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => {
                depth += 1;
                cur.push(c);
            }
            ')' => {
                depth -= 1;
                cur.push(c);
            }
            ',' if depth == 0 => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

fn parse_set(key: &str, rest: &str, raw: &str) -> Result<Vec<String>, ApiError> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| bad_label(raw))?;
    if key.is_empty() {
        return Err(bad_label(raw));
    }
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

fn bad_label(raw: &str) -> ApiError {
    ApiError::bad_request(format!(
        "unable to parse requirement: invalid label selector: {raw}"
    ))
}

fn parse_label_req(raw: &str) -> Result<LabelReq, ApiError> {
    if let Some(k) = raw.strip_prefix('!') {
        return Ok(LabelReq::NotExists(k.trim().to_string()));
    }
    if let Some((k, v)) = raw.split_once("!=") {
        return Ok(LabelReq::NotEq(k.trim().into(), v.trim().into()));
    }
    if let Some((k, v)) = raw.split_once("==") {
        return Ok(LabelReq::Eq(k.trim().into(), v.trim().into()));
    }
    if let Some((k, v)) = raw.split_once('=') {
        return Ok(LabelReq::Eq(k.trim().into(), v.trim().into()));
    }
    let words: Vec<&str> = raw.splitn(2, char::is_whitespace).collect();
    if words.len() == 2 {
        let key = words[0];
        let rest = words[1].trim_start();
        if let Some(set) = rest.strip_prefix("notin") {
            return Ok(LabelReq::NotIn(key.into(), parse_set(key, set, raw)?));
        }
        if let Some(set) = rest.strip_prefix("in") {
            return Ok(LabelReq::In(key.into(), parse_set(key, set, raw)?));
        }
        return Err(bad_label(raw));
    }
    if raw.contains(['(', ')', ' ']) {
        return Err(bad_label(raw));
    }
    Ok(LabelReq::Exists(raw.to_string()))
}

fn parse_field_req(raw: &str) -> Result<FieldReq, ApiError> {
    let (field, value, equal) = if let Some((f, v)) = raw.split_once("!=") {
        (f, v, false)
    } else if let Some((f, v)) = raw.split_once("==") {
        (f, v, true)
    } else if let Some((f, v)) = raw.split_once('=') {
        (f, v, true)
    } else {
        return Err(ApiError::bad_request(format!(
            "invalid selector: '{raw}'; can't understand '{raw}'"
        )));
    };
    let field = field.trim();
    match field {
        "metadata.name" | "spec.unschedulable" => Ok(FieldReq {
            field: field.to_string(),
            value: value.trim().to_string(),
            equal,
        }),
        other => Err(ApiError::bad_request(format!(
            "field label not supported: {other}"
        ))),
    }
}

impl Selector {
    /// Parses the `labelSelector` and `fieldSelector` query values.
    pub fn parse(labels: Option<&str>, fields: Option<&str>) -> Result<Self, ApiError> {
        let labels = match labels {
            Some(l) => split_top_level(l)
                .iter()
                .map(|r| parse_label_req(r))
                .collect::<Result<_, _>>()?,
            None => Vec::new(),
        };
        let fields = match fields {
            Some(f) => split_top_level(f)
                .iter()
                .map(|r| parse_field_req(r))
                .collect::<Result<_, _>>()?,
            None => Vec::new(),
        };
        Ok(Self { labels, fields })
    }

    /// True when nothing is filtered.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }

    /// Whether a Node object matches.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|r| match r {
            LabelReq::Eq(k, v) => label(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => label(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
        });
        labels_ok
            && self.fields.iter().all(|r| {
                let actual = match r.field.as_str() {
                    "metadata.name" => obj
                        .pointer("/metadata/name")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    _ => obj
                        .pointer("/spec/unschedulable")
                        .and_then(Value::as_bool)
                        .unwrap_or(false)
                        .to_string(),
                };
                (actual == r.value) == r.equal
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, labels: Value) -> Value {
        json!({"metadata": {"name": name, "labels": labels}})
    }

    #[test]
    fn label_forms() {
        let n = node("a", json!({"role": "edge", "zone": "x"}));
        let m = |s: &str| Selector::parse(Some(s), None).map(|sel| sel.matches(&n));
        assert_eq!(m("role=edge"), Ok(true));
        assert_eq!(m("role==edge,zone=x"), Ok(true));
        assert_eq!(m("role!=edge"), Ok(false));
        assert_eq!(m("role in (edge, core)"), Ok(true));
        assert_eq!(m("role notin (edge)"), Ok(false));
        assert_eq!(m("role"), Ok(true));
        assert_eq!(m("!role"), Ok(false));
        assert_eq!(m("missing notin (a)"), Ok(true));
        assert!(m("role in edge").is_err());
    }

    #[test]
    fn field_forms() {
        let n = node("a", json!({}));
        let m = |s: &str| Selector::parse(None, Some(s)).map(|sel| sel.matches(&n));
        assert_eq!(m("metadata.name=a"), Ok(true));
        assert_eq!(m("metadata.name!=a"), Ok(false));
        assert_eq!(m("spec.unschedulable=false"), Ok(true));
        assert_eq!(m("status.phase=x").map_err(|e| e.code), Err(400));
    }

    #[test]
    fn empty_matches_all() {
        let s = Selector::parse(None, None).unwrap_or_default();
        assert!(s.is_empty());
        assert!(s.matches(&json!({})));
    }
}
