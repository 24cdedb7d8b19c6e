//! The `v1.wgmesh.io/rotation-status` annotation: how far a node's key rotation got. The agent
//! writes it; `wgmeshctl rotate --wait` and `wgmeshctl nodes` read it. One type for both, so the
//! two sides cannot drift apart.

use std::fmt;

use serde::{Deserialize, Serialize};

/// `state` of a [`RotationStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RotationState {
    InProgress,
    Complete,
    Failed,
    /// A state this version does not know (written by a newer agent); readers treat it as not
    /// finished. The agent never writes it.
    #[serde(other)]
    Unknown,
}

impl fmt::Display for RotationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::InProgress => "in-progress",
            Self::Complete => "complete",
            Self::Failed => "failed",
            Self::Unknown => "unknown",
        })
    }
}

/// The JSON in `v1.wgmesh.io/rotation-status`. Unknown fields are ignored and only `generation`
/// and `state` are required, so a terser or newer agent still reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationStatus {
    pub generation: u64,
    pub state: RotationState,
    /// RFC 3339 time the agent started this rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<String>,
    #[serde(default)]
    pub peers_total: usize,
    #[serde(default)]
    pub peers_confirmed: usize,
    /// Peers without a handshake under the new key yet (possibly truncated).
    #[serde(default)]
    pub pending: Vec<String>,
    /// Why the rotation failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl RotationStatus {
    /// Reads the annotation's value; an empty `message` counts as none.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut status: Self = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if status.message.as_deref().is_some_and(str::is_empty) {
            status.message = None;
        }
        Ok(status)
    }

    /// `gen 3 in-progress 1/2 confirmed, pending: b` and the like.
    pub fn summary(&self) -> String {
        let mut s = format!("gen {} {}", self.generation, self.state);
        if self.state != RotationState::Complete || self.peers_total > 0 {
            s.push_str(&format!(
                " {}/{} confirmed",
                self.peers_confirmed, self.peers_total
            ));
        }
        if !self.pending.is_empty() && self.state != RotationState::Complete {
            s.push_str(&format!(", pending: {}", self.pending.join(", ")));
        }
        if let Some(m) = self.message.as_deref().filter(|m| !m.is_empty()) {
            s.push_str(&format!(": {m}"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_status_reads_back_identically() {
        let s = RotationStatus {
            generation: 4,
            state: RotationState::Failed,
            started: Some("2026-11-26T08:00:00Z".into()),
            peers_total: 3,
            peers_confirmed: 1,
            pending: vec!["b".into(), "c".into()],
            message: Some("2 of 3 peers completed no handshake".into()),
        };
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(RotationStatus::parse(&text).unwrap(), s);
        let in_progress = RotationStatus {
            state: RotationState::InProgress,
            message: None,
            ..s
        };
        let text = serde_json::to_string(&in_progress).unwrap();
        assert!(
            !text.contains("message"),
            "no message key when none: {text}"
        );
        assert_eq!(RotationStatus::parse(&text).unwrap(), in_progress);
    }

    #[test]
    fn rotation_status_json_is_read_tolerantly() {
        let full = r#"{"generation":2,"state":"in-progress","started":"2026-11-26T05:02:56Z",
            "peers_total":3,"peers_confirmed":1,"pending":["node-b","node-c"],"message":"","extra":1}"#;
        let s = RotationStatus::parse(full).unwrap();
        assert_eq!(s.generation, 2);
        assert_eq!(s.state, RotationState::InProgress);
        assert_eq!(s.started.as_deref(), Some("2026-11-26T05:02:56Z"));
        assert_eq!((s.peers_confirmed, s.peers_total), (1, 3));
        assert_eq!(s.pending, ["node-b", "node-c"]);
        assert_eq!(s.message, None, "an empty message is no message");
        assert_eq!(
            s.summary(),
            "gen 2 in-progress 1/3 confirmed, pending: node-b, node-c"
        );

        let cases: Vec<(&str, &str, Option<RotationState>)> = vec![
            (
                "minimal",
                r#"{"generation":2,"state":"complete"}"#,
                Some(RotationState::Complete),
            ),
            (
                "failed",
                r#"{"generation":2,"state":"failed","message":"x"}"#,
                Some(RotationState::Failed),
            ),
            (
                "newer state",
                r#"{"generation":2,"state":"rolling-back"}"#,
                Some(RotationState::Unknown),
            ),
            ("no state", r#"{"generation":2}"#, None),
            (
                "generation as string",
                r#"{"generation":"2","state":"complete"}"#,
                None,
            ),
            ("not json", "complete", None),
        ];
        for (name, text, want) in cases {
            assert_eq!(
                RotationStatus::parse(text).ok().map(|s| s.state),
                want,
                "{name}"
            );
        }
        let failed = RotationStatus::parse(
            r#"{"generation":4,"state":"failed","peers_total":2,"peers_confirmed":1,"pending":["b"],"message":"1 of 2 peers..."}"#,
        )
        .unwrap();
        assert_eq!(
            failed.summary(),
            "gen 4 failed 1/2 confirmed, pending: b: 1 of 2 peers..."
        );
    }
}
