//! Key rotation bookkeeping, pure: when a rotation is requested, and how far a running one got.
//!
//! `wgmeshctl rotate` sets `v1.wgmesh.io/rotate-request` to the next generation on a Node. That
//! node's agent persists a new key, applies it, publishes it, and reports progress in
//! `v1.wgmesh.io/rotation-status`: a peer counts as confirmed once it completed a handshake after
//! the switch, which it can only do with the new key (the old sessions are gone with the old key).

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use wgmesh_api::{
    NodeRecord, PublicKey,
    annotations::{ANNOTATION_ROTATE_REQUEST, ANNOTATION_ROTATION_STATUS},
};

use crate::mesh::ObservedPeer;

pub const ANNOTATION_STATUS: &str = ANNOTATION_ROTATION_STATUS;
/// Peers that have not confirmed the new key by then make the rotation `failed` (they keep
/// retrying; the state is for the operator).
pub const ROTATION_TIMEOUT: Duration = Duration::from_secs(120);
/// At most this many pending peer names are published.
const PENDING_NAMES: usize = 20;

/// The generation `wgmeshctl rotate` asked this node for, if any (unparsable requests are ignored).
pub fn requested_generation(rec: &NodeRecord) -> Option<u64> {
    rec.annotations
        .get(ANNOTATION_ROTATE_REQUEST)
        .and_then(|v| v.trim().parse().ok())
}

/// Whether this node's rotation to `generation` (the key it runs now) was started but never reported
/// finished: the request asks for exactly this generation and the published status does not say
/// `complete` or `failed` for it. That is an agent that crashed or was restarted between persisting
/// the new key and publishing the outcome; the new agent resumes the report, or `wgmeshctl rotate
/// --wait` would wait forever.
pub fn unfinished(rec: &NodeRecord, generation: u64) -> bool {
    if requested_generation(rec) != Some(generation) {
        return false;
    }
    let finished = rec
        .annotations
        .get(ANNOTATION_ROTATION_STATUS)
        .and_then(|text| Report::parse(text).ok())
        .is_some_and(|r| r.generation == generation && r.state != State::InProgress);
    !finished
}

/// The JSON published in `v1.wgmesh.io/rotation-status` (the type `wgmeshctl` reads it with).
pub use wgmesh_api::rotation::{RotationState as State, RotationStatus as Report};

#[derive(Debug, Clone)]
pub struct Progress {
    pub generation: u64,
    pub started: SystemTime,
    /// Peers still unconfirmed at this time make the rotation `failed`.
    deadline: SystemTime,
    /// Each peer's latest handshake when the old key was dropped. Devices report handshake times
    /// coarsely (boringtun ticks once a second), so "changed since the switch" is the reliable test
    /// alongside "later than the switch".
    baseline: BTreeMap<PublicKey, Option<SystemTime>>,
    last_published: Option<(State, usize)>,
}

impl Progress {
    pub fn new(
        generation: u64,
        started: SystemTime,
        device: &BTreeMap<PublicKey, ObservedPeer>,
    ) -> Self {
        Self {
            generation,
            started,
            deadline: started + ROTATION_TIMEOUT,
            baseline: device.iter().map(|(k, p)| (*k, p.last_handshake)).collect(),
            last_published: None,
        }
    }

    /// A rotation a previous agent process started: the device has run the new key since
    /// `key_in_use_since`, so any handshake after that is under the new key; handshakes from before
    /// the restart count, and the peers get a full timeout from `now`.
    pub fn resumed(
        generation: u64,
        key_in_use_since: SystemTime,
        device: &BTreeMap<PublicKey, ObservedPeer>,
        now: SystemTime,
    ) -> Self {
        Self {
            deadline: now.max(key_in_use_since) + ROTATION_TIMEOUT,
            ..Self::new(generation, key_in_use_since, device)
        }
    }

    fn confirmed(&self, key: &PublicKey, peer: Option<&ObservedPeer>) -> bool {
        let Some(t) = peer.and_then(|p| p.last_handshake) else {
            return false;
        };
        t > self.started
            || self
                .baseline
                .get(key)
                .is_none_or(|before| *before != Some(t))
    }

    /// Where the rotation stands, given the peers the agent wants (`names`: key → node) and what the
    /// device reports.
    pub fn observe(
        &self,
        names: &BTreeMap<PublicKey, String>,
        device: &BTreeMap<PublicKey, ObservedPeer>,
        now: SystemTime,
    ) -> Report {
        let mut pending: Vec<String> = names
            .iter()
            .filter(|(k, _)| !self.confirmed(k, device.get(k)))
            .map(|(_, n)| n.clone())
            .collect();
        pending.sort();
        let total = names.len();
        let confirmed = total - pending.len();
        let (state, message) = if pending.is_empty() {
            (State::Complete, None)
        } else if now > self.deadline {
            (
                State::Failed,
                Some(format!(
                    "{} of {total} peers completed no handshake with the new key within {} s",
                    pending.len(),
                    ROTATION_TIMEOUT.as_secs()
                )),
            )
        } else {
            (State::InProgress, None)
        };
        pending.truncate(PENDING_NAMES);
        Report {
            generation: self.generation,
            state,
            started: Some(crate::discovery::rfc3339(
                self.started
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            )),
            peers_total: total,
            peers_confirmed: confirmed,
            pending,
            message,
        }
    }

    /// The annotation value to write, when the report says something new.
    pub fn to_publish(&self, report: &Report) -> Option<String> {
        if self.last_published == Some((report.state, report.peers_confirmed)) {
            return None;
        }
        serde_json::to_string(report).ok()
    }

    pub fn published(&mut self, report: &Report) {
        self.last_published = Some((report.state, report.peers_confirmed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> PublicKey {
        PublicKey::from_bytes([n; 32])
    }

    #[test]
    fn requested_generation_reads_the_annotation() {
        let mut rec = NodeRecord::default();
        assert_eq!(requested_generation(&rec), None);
        rec.annotations
            .insert(ANNOTATION_ROTATE_REQUEST.into(), "3".into());
        assert_eq!(requested_generation(&rec), Some(3));
        rec.annotations
            .insert(ANNOTATION_ROTATE_REQUEST.into(), "soon".into());
        assert_eq!(requested_generation(&rec), None);
    }

    #[test]
    fn table_of_rotation_progress() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let hs = |secs_after: i64| ObservedPeer {
            last_handshake: Some(if secs_after >= 0 {
                t0 + Duration::from_secs(secs_after as u64)
            } else {
                t0 - Duration::from_secs((-secs_after) as u64)
            }),
            ..Default::default()
        };
        let baseline: BTreeMap<_, _> = [(key(2), hs(-5)), (key(3), hs(-1))].into();
        let p = Progress::new(2, t0, &baseline);
        let names: BTreeMap<_, _> = [(key(2), "b".to_string()), (key(3), "c".to_string())].into();
        type Case = (
            &'static str,
            Vec<(PublicKey, ObservedPeer)>,
            u64,
            State,
            usize,
            Vec<&'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                "nothing yet",
                vec![],
                1,
                State::InProgress,
                0,
                vec!["b", "c"],
            ),
            (
                "old handshakes do not count",
                vec![(key(2), hs(-5)), (key(3), hs(-1))],
                1,
                State::InProgress,
                0,
                vec!["b", "c"],
            ),
            (
                "one confirmed",
                vec![(key(2), hs(1)), (key(3), hs(-1))],
                2,
                State::InProgress,
                1,
                vec!["c"],
            ),
            (
                "all confirmed",
                vec![(key(2), hs(1)), (key(3), hs(2))],
                3,
                State::Complete,
                2,
                vec![],
            ),
            // Reported a second early (coarse clock), but not the handshake seen before the switch.
            (
                "coarse time, new handshake",
                vec![(key(2), hs(-1)), (key(3), hs(0))],
                3,
                State::Complete,
                2,
                vec![],
            ),
            (
                "timed out",
                vec![(key(2), hs(1))],
                121,
                State::Failed,
                1,
                vec!["c"],
            ),
        ];
        for (name, device, after, state, confirmed, pending) in cases {
            let device: BTreeMap<_, _> = device.into_iter().collect();
            let r = p.observe(&names, &device, t0 + Duration::from_secs(after));
            assert_eq!(r.state, state, "{name}");
            assert_eq!(r.peers_confirmed, confirmed, "{name}");
            assert_eq!(r.pending, pending, "{name}");
            assert_eq!(r.peers_total, 2, "{name}");
        }
        let alone = p.observe(&BTreeMap::new(), &BTreeMap::new(), t0);
        assert_eq!(alone.state, State::Complete, "no peers: complete at once");
    }

    #[test]
    fn table_of_unfinished_rotations() {
        let status = |generation: u64, state: &str| {
            format!(r#"{{"generation":{generation},"state":"{state}","peers_total":1}}"#)
        };
        // (case, rotate-request, rotation-status, generation the agent runs, unfinished?)
        type Case = (
            &'static str,
            Option<&'static str>,
            Option<String>,
            u64,
            bool,
        );
        let cases: Vec<Case> = vec![
            ("never rotated", None, None, 1, false),
            (
                "request newer than the key: a rotation to start, not to resume",
                Some("3"),
                None,
                2,
                false,
            ),
            (
                "crashed before publishing any status",
                Some("2"),
                None,
                2,
                true,
            ),
            (
                "crashed while in progress",
                Some("2"),
                Some(status(2, "in-progress")),
                2,
                true,
            ),
            (
                "status of the previous rotation",
                Some("3"),
                Some(status(2, "complete")),
                3,
                true,
            ),
            ("finished", Some("2"), Some(status(2, "complete")), 2, false),
            (
                "failed is final too",
                Some("2"),
                Some(status(2, "failed")),
                2,
                false,
            ),
            (
                "unreadable status: resume and overwrite it",
                Some("2"),
                Some("{".into()),
                2,
                true,
            ),
        ];
        for (name, request, status, generation, want) in cases {
            let mut rec = NodeRecord::default();
            if let Some(r) = request {
                rec.annotations
                    .insert(ANNOTATION_ROTATE_REQUEST.into(), r.into());
            }
            if let Some(s) = status {
                rec.annotations.insert(ANNOTATION_ROTATION_STATUS.into(), s);
            }
            assert_eq!(unfinished(&rec, generation), want, "{name}");
        }
    }

    #[test]
    fn resumed_progress_counts_handshakes_since_the_key_was_in_use_and_restarts_the_timeout() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = |secs: u64| ObservedPeer {
            last_handshake: Some(t0 + Duration::from_secs(secs)),
            ..Default::default()
        };
        let names: BTreeMap<_, _> = [(key(2), "b".to_string()), (key(3), "c".to_string())].into();
        // The key went into use at t0; the agent restarted at t0+300 and finds b's handshake from
        // t0+5 (under the new key) and none from c yet.
        let device: BTreeMap<_, _> = [(key(2), at(5))].into();
        let now = t0 + Duration::from_secs(300);
        let p = Progress::resumed(2, t0, &device, now);
        let r = p.observe(&names, &device, now);
        assert_eq!((r.state, r.peers_confirmed), (State::InProgress, 1));
        assert_eq!(r.pending, vec!["c"]);
        // Long after the original start but within the resumed deadline: still in progress.
        let r = p.observe(&names, &device, now + Duration::from_secs(60));
        assert_eq!(r.state, State::InProgress);
        let done: BTreeMap<_, _> = [(key(2), at(5)), (key(3), at(320))].into();
        assert_eq!(
            p.observe(&names, &done, now + Duration::from_secs(30))
                .state,
            State::Complete
        );
        assert_eq!(
            p.observe(&names, &device, now + Duration::from_secs(121))
                .state,
            State::Failed
        );
    }

    #[test]
    fn progress_is_published_only_when_it_changes() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut p = Progress::new(2, t0, &BTreeMap::new());
        let names: BTreeMap<_, _> = [(key(2), "b".to_string())].into();
        let r = p.observe(&names, &BTreeMap::new(), t0);
        let json = p.to_publish(&r).expect("first report is published");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["state"], "in-progress");
        assert_eq!(v["generation"], 2);
        assert_eq!(v["pending"], serde_json::json!(["b"]));
        p.published(&r);
        assert_eq!(
            p.to_publish(&r),
            None,
            "unchanged report is not written again"
        );
    }
}
