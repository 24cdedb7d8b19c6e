//! The Kubernetes `Status` error shape (`kind: Status`, `apiVersion: v1`).
//!
//! kube-rs recognises errors by their `reason` string (`NotFound`, `Conflict`, ...), so every error
//! this server answers carries the exact code, reason and details a real apiserver uses.

use serde_json::{Map, Value, json};

/// An API error, answered as a `Status` object with `code` as the HTTP status.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    /// HTTP status code, also the Status `code`.
    pub code: u16,
    /// Machine-readable reason (`NotFound`, `Conflict`, `Expired`, ...).
    pub reason: String,
    /// Human-readable message.
    pub message: String,
    /// Status `details`, omitted when `None`.
    pub details: Option<Value>,
}

/// The resource name used in `details.kind`, as the real server does.
pub const NODES: &str = "nodes";

impl ApiError {
    /// A new error with no details.
    pub fn new(code: u16, reason: &str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.to_string(),
            message: message.into(),
            details: None,
        }
    }

    /// Adds `details`.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// 404 `nodes "x" not found`.
    pub fn not_found(resource: &str, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{resource} \"{name}\" not found"))
            .with_details(json!({"name": name, "kind": resource}))
    }

    /// 409 AlreadyExists on create.
    pub fn already_exists(resource: &str, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{resource} \"{name}\" already exists"),
        )
        .with_details(json!({"name": name, "kind": resource}))
    }

    /// 409 Conflict for a stale resourceVersion (optimistic lock).
    pub fn conflict(resource: &str, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {resource} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again"
            ),
        )
        .with_details(json!({"name": name, "kind": resource}))
    }

    /// 410 Expired for a too old resourceVersion.
    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    /// 400 BadRequest.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// 422 Invalid for a kind/group/name with field causes.
    pub fn invalid(qualified_kind: &str, name: &str, field: &str, detail: &str) -> Self {
        let mut details = Map::new();
        if !name.is_empty() {
            details.insert("name".into(), json!(name));
        }
        if let Some((kind, group)) = qualified_kind.split_once('.') {
            details.insert("group".into(), json!(group));
            details.insert("kind".into(), json!(kind));
        } else {
            details.insert("kind".into(), json!(qualified_kind));
        }
        details.insert(
            "causes".into(),
            json!([{"reason": "FieldValueInvalid", "message": format!("{field}: {detail}"), "field": field}]),
        );
        Self::new(
            422,
            "Invalid",
            format!("{qualified_kind} \"{name}\" is invalid: {field}: {detail}"),
        )
        .with_details(Value::Object(details))
    }

    /// 405 MethodNotAllowed.
    pub fn method_not_allowed() -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    }

    /// 404 for a path this server does not serve.
    pub fn unknown_path() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
        .with_details(json!({}))
    }

    /// 415 for a patch Content-Type that is not accepted.
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({content_type}) - accepted media types include: \
                 application/json-patch+json, application/merge-patch+json, \
                 application/strategic-merge-patch+json, application/apply-patch+yaml"
            ),
        )
    }

    /// An error injected through `/_control/fail`, with the reason a real server uses for the code.
    pub fn injected(code: u16) -> Self {
        let reason = match code {
            400 => "BadRequest",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "NotFound",
            405 => "MethodNotAllowed",
            409 => "Conflict",
            410 => "Expired",
            413 => "RequestEntityTooLarge",
            415 => "UnsupportedMediaType",
            422 => "Invalid",
            429 => "TooManyRequests",
            500 => "InternalError",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "",
        };
        Self::new(code, reason, format!("injected failure (status {code})"))
    }

    /// The `Status` object for this error.
    pub fn to_status(&self) -> Value {
        let mut m = Map::new();
        m.insert("kind".into(), json!("Status"));
        m.insert("apiVersion".into(), json!("v1"));
        m.insert("metadata".into(), json!({}));
        m.insert("status".into(), json!("Failure"));
        m.insert("message".into(), json!(self.message));
        if !self.reason.is_empty() {
            m.insert("reason".into(), json!(self.reason));
        }
        if let Some(d) = &self.details {
            m.insert("details".into(), d.clone());
        }
        m.insert("code".into(), json!(self.code));
        Value::Object(m)
    }
}

/// A `Status` reporting success (used by DELETE with no object and by control routes).
pub fn success_status(details: Value) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_shape() {
        let s = ApiError::not_found(NODES, "node-x").to_status();
        assert_eq!(
            s,
            json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
                   "message":"nodes \"node-x\" not found","reason":"NotFound",
                   "details":{"name":"node-x","kind":"nodes"},"code":404})
        );
    }

    #[test]
    fn injected_reason_by_code() {
        assert_eq!(ApiError::injected(500).reason, "InternalError");
        assert_eq!(ApiError::injected(409).reason, "Conflict");
        let s = ApiError::injected(599).to_status();
        assert!(s.get("reason").is_none());
        assert_eq!(s["code"], 599);
    }

    #[test]
    fn invalid_has_causes() {
        let e = ApiError::invalid(
            "PatchOptions.meta.k8s.io",
            "",
            "fieldManager",
            "Required value",
        );
        let s = e.to_status();
        assert_eq!(s["code"], 422);
        assert_eq!(s["details"]["group"], "meta.k8s.io");
        assert_eq!(s["details"]["kind"], "PatchOptions");
        assert_eq!(s["details"]["causes"][0]["field"], "fieldManager");
    }
}
