//! `wgmeshctl rotate`: the client half of the key rotation protocol.
//!
//! 1. wgmeshctl sets `v1.wgmesh.io/rotate-request` = current `v1.wgmesh.io/key-generation` + 1
//!    (merge patch, guarded by the Node's resourceVersion). A request already above the
//!    generation is a pending rotation: refused (exit 3), or with `--force` re-requested without
//!    ever lowering it.
//! 2. The node's agent generates, persists and applies a new key, publishes `public-key` and
//!    `key-generation` = the requested generation, and reports progress in
//!    `v1.wgmesh.io/rotation-status` (JSON, [`RotationStatus`]).
//! 3. `--wait` polls the Node every 500 ms until that status says `complete` (exit 0) or
//!    `failed` (exit 1) for the requested generation, or the timeout passes (exit 4).
//!
//! Deciding is pure ([`plan_request`], [`progress`], [`rotation_view`]) and table-tested; only
//! [`run`] and its helpers talk to the API.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use kube::Client;
use serde::{Deserialize, Serialize};
pub use wgmesh_api::rotation::{RotationState, RotationStatus};
use wgmesh_api::{
    NodeRecord,
    annotations::{
        ANNOTATION_KEY_GENERATION, ANNOTATION_ROTATE_REQUEST, ANNOTATION_ROTATION_STATUS,
    },
};

use crate::{
    cli::{GlobalArgs, Output, RotateArgs},
    cluster,
    exit::Exit,
    render,
};

/// Version of the `rotate` JSON output.
pub const SCHEMA_VERSION: u32 = 1;
/// How often `--wait` reads the Node.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Timeout of each API request of `nodes` and `rotate`.
pub const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts at the request patch when the Node keeps changing under it (409 Conflict).
const PATCH_ATTEMPTS: usize = 5;

/// What a Node's rotation annotations say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationView {
    /// `idle` or `requested` (a `rotate-request` above the key generation).
    pub state: String,
    /// The pending request's generation, when `requested`.
    pub requested_generation: Option<u64>,
    /// The agent's last published `rotation-status`, if any.
    pub status: Option<RotationStatus>,
}

impl RotationView {
    /// `idle`, `requested gen 3`, plus the agent's status: `requested gen 3; gen 3 in-progress ...`.
    pub fn summary(&self) -> String {
        let mut s = match self.requested_generation {
            Some(g) => format!("requested gen {g}"),
            None => "idle".to_owned(),
        };
        if let Some(st) = &self.status {
            s.push_str("; ");
            s.push_str(&st.summary());
        }
        s
    }
}

fn annotation<'a>(rec: &'a NodeRecord, key: &str) -> Option<&'a str> {
    rec.annotations.get(key).map(|s| s.as_str())
}

fn parse_u64(rec: &NodeRecord, key: &str) -> Option<Result<u64, String>> {
    annotation(rec, key).map(|v| v.trim().parse::<u64>().map_err(|_| v.to_owned()))
}

/// The rotation state of a Node, and any malformed rotation annotation as a problem text.
pub fn rotation_view(rec: &NodeRecord) -> (RotationView, Vec<String>) {
    let mut problems = Vec::new();
    let generation = match parse_u64(rec, ANNOTATION_KEY_GENERATION) {
        Some(Ok(g)) => g,
        // mesh_info() reports a malformed generation; here it only counts as "none".
        _ => 0,
    };
    let requested = match parse_u64(rec, ANNOTATION_ROTATE_REQUEST) {
        None => None,
        Some(Ok(r)) => Some(r),
        Some(Err(v)) => {
            problems.push(format!(
                "malformed {ANNOTATION_ROTATE_REQUEST} annotation {v:?}: want a generation number"
            ));
            None
        }
    };
    let status = match annotation(rec, ANNOTATION_ROTATION_STATUS) {
        None => None,
        Some(text) => match RotationStatus::parse(text) {
            Ok(s) => Some(s),
            Err(e) => {
                problems.push(format!(
                    "malformed {ANNOTATION_ROTATION_STATUS} annotation: {e}"
                ));
                None
            }
        },
    };
    let pending = requested.filter(|r| *r > generation);
    let view = RotationView {
        state: if pending.is_some() {
            "requested"
        } else {
            "idle"
        }
        .to_owned(),
        requested_generation: pending,
        status,
    };
    (view, problems)
}

/// What to write for a rotation request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The key generation the node has now.
    pub current_generation: u64,
    /// The generation to request.
    pub requested: u64,
    /// The annotation already holds `requested` (a pending rotation re-requested with --force):
    /// nothing to write, only to wait.
    pub already_requested: bool,
}

/// Why a rotation cannot be requested.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "a rotation to key generation {requested} is already pending on node {node} (it has \
         generation {generation}); follow it with `wgmeshctl rotate --node {node} --force --wait`"
    )]
    Pending {
        node: String,
        generation: u64,
        requested: u64,
    },
    #[error(
        "node {node} has no {ANNOTATION_KEY_GENERATION} annotation: its agent has not published a \
         key yet, so there is nothing to rotate"
    )]
    NoKey { node: String },
    #[error(
        "node {node} has a malformed {ANNOTATION_KEY_GENERATION} annotation {value:?}; its agent \
         rewrites it on start"
    )]
    MalformedGeneration { node: String, value: String },
}

impl Refusal {
    /// Pending rotations are "refused" (3); a node without a usable key is an error (2).
    pub fn exit(&self) -> Exit {
        match self {
            Self::Pending { .. } => Exit::Refused,
            Self::NoKey { .. } | Self::MalformedGeneration { .. } => Exit::Error,
        }
    }
}

/// Decides the request for a Node: generation + 1, refused while a rotation is pending unless
/// `force`, which never lowers a pending request. A malformed request annotation is ignored by
/// the agent, so it is simply overwritten.
pub fn plan_request(rec: &NodeRecord, force: bool) -> Result<Plan, Refusal> {
    let node = rec.name.clone();
    let generation = match parse_u64(rec, ANNOTATION_KEY_GENERATION) {
        Some(Ok(g)) => g,
        Some(Err(value)) => return Err(Refusal::MalformedGeneration { node, value }),
        // An agent that publishes a key always publishes its generation too; without one the
        // request could not be compared with anything, so do not guess.
        None => return Err(Refusal::NoKey { node }),
    };
    let pending = match parse_u64(rec, ANNOTATION_ROTATE_REQUEST) {
        Some(Ok(r)) if r > generation => Some(r),
        _ => None,
    };
    match pending {
        Some(requested) if !force => Err(Refusal::Pending {
            node,
            generation,
            requested,
        }),
        Some(requested) => Ok(Plan {
            current_generation: generation,
            requested,
            already_requested: true,
        }),
        None => Ok(Plan {
            current_generation: generation,
            requested: generation.saturating_add(1),
            already_requested: false,
        }),
    }
}

/// Where a requested rotation stands, from the Node alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// No status for this generation yet; `applied`: the Node already publishes it as its key
    /// generation (the agent switched keys and has not reported yet).
    Waiting {
        applied: bool,
    },
    InProgress(RotationStatus),
    Complete(RotationStatus),
    Failed(RotationStatus),
}

/// Reads the progress of the rotation to `requested`. A status for a later generation means
/// ours was applied and then superseded: complete.
pub fn progress(rec: &NodeRecord, requested: u64) -> Progress {
    let status =
        annotation(rec, ANNOTATION_ROTATION_STATUS).and_then(|t| RotationStatus::parse(t).ok());
    match status {
        Some(s) if s.generation == requested => match s.state {
            RotationState::Complete => Progress::Complete(s),
            RotationState::Failed => Progress::Failed(s),
            RotationState::InProgress | RotationState::Unknown => Progress::InProgress(s),
        },
        Some(s) if s.generation > requested => Progress::Complete(s),
        _ => Progress::Waiting {
            applied: parse_u64(rec, ANNOTATION_KEY_GENERATION)
                .and_then(Result::ok)
                .is_some_and(|g| g >= requested),
        },
    }
}

/// Turns successive [`Progress`] readings into progress lines, saying only what changed.
#[derive(Debug, Default)]
pub struct ProgressLog {
    last: Option<String>,
    pending: Option<BTreeSet<String>>,
}

impl ProgressLog {
    /// The lines to print for a new reading (without the node prefix).
    pub fn lines(&mut self, p: &Progress) -> Vec<String> {
        let mut out = Vec::new();
        if let Progress::InProgress(s) | Progress::Complete(s) | Progress::Failed(s) = p {
            let now: BTreeSet<String> = s.pending.iter().cloned().collect();
            if let Some(before) = &self.pending {
                for peer in before.difference(&now) {
                    out.push(format!(
                        "peer {peer} confirmed the new key ({}/{})",
                        s.peers_confirmed, s.peers_total
                    ));
                }
            }
            self.pending = Some(now);
        }
        let line = match p {
            Progress::Waiting { applied: true } => {
                "new key published, waiting for the agent's rotation status".to_owned()
            }
            Progress::Waiting { applied: false } => {
                "waiting for the agent to pick up the request".to_owned()
            }
            Progress::InProgress(s) | Progress::Complete(s) | Progress::Failed(s) => s.summary(),
        };
        if self.last.as_ref() != Some(&line) {
            out.push(line.clone());
            self.last = Some(line);
        }
        out
    }
}

/// The outcome for one node, as listed in the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Requested; not waited for.
    Requested,
    Complete,
    Failed,
    TimedOut,
    /// A rotation was already pending.
    Refused,
    /// The node has no key to rotate (no agent yet).
    Skipped,
    /// `--all` stopped before this node.
    NotStarted,
    /// The API failed.
    Error,
}

impl Outcome {
    pub fn exit(self) -> Exit {
        match self {
            Self::Requested | Self::Complete | Self::Skipped | Self::NotStarted => Exit::Ok,
            Self::Failed => Exit::CheckFailed,
            Self::TimedOut => Exit::TimedOut,
            Self::Refused => Exit::Refused,
            Self::Error => Exit::Error,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Complete => "complete",
            Self::Failed => "failed",
            Self::TimedOut => "timed out",
            Self::Refused => "refused",
            Self::Skipped => "skipped",
            Self::NotStarted => "not started",
            Self::Error => "error",
        }
    }
}

/// One row of the summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeResult {
    pub node: String,
    pub previous_generation: Option<u64>,
    pub requested_generation: Option<u64>,
    pub result: Outcome,
    pub peers_confirmed: Option<usize>,
    pub peers_total: Option<usize>,
    /// Still pending peers when it failed or timed out.
    pub pending: Vec<String>,
    pub elapsed_seconds: Option<f64>,
    pub message: Option<String>,
}

impl NodeResult {
    fn new(node: &str, result: Outcome) -> Self {
        Self {
            node: node.to_owned(),
            previous_generation: None,
            requested_generation: None,
            result,
            peers_confirmed: None,
            peers_total: None,
            pending: Vec::new(),
            elapsed_seconds: None,
            message: None,
        }
    }
}

/// The `rotate` output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RotateReport {
    pub schema_version: u32,
    pub results: Vec<NodeResult>,
}

impl RotateReport {
    pub fn exit(&self) -> Exit {
        self.results
            .iter()
            .fold(Exit::Ok, |acc, r| acc.worst(r.result.exit()))
    }

    pub fn table(&self) -> String {
        let mut t = render::table([
            "NODE",
            "GENERATION",
            "RESULT",
            "PEERS",
            "ELAPSED",
            "MESSAGE",
        ]);
        for r in &self.results {
            let generation = match (r.previous_generation, r.requested_generation) {
                (Some(a), Some(b)) => format!("{a} -> {b}"),
                (None, Some(b)) => format!("-> {b}"),
                (Some(a), None) => a.to_string(),
                (None, None) => "-".into(),
            };
            let peers = match (r.peers_confirmed, r.peers_total) {
                (Some(c), Some(t)) => format!("{c}/{t}"),
                _ => "-".into(),
            };
            t.add_row([
                r.node.clone(),
                generation,
                r.result.label().to_owned(),
                peers,
                render::or_dash(r.elapsed_seconds.map(|s| format!("{s:.1}s"))),
                r.message.clone().unwrap_or_default(),
            ]);
        }
        render::table_text(&t)
    }
}

/// Writes the request (re-reading and re-deciding on a conflict). `Ok(Err(refusal))` when the
/// Node says no.
async fn request(
    client: &Client,
    node: &str,
    force: bool,
) -> anyhow::Result<Result<Plan, Refusal>> {
    for attempt in 1..=PATCH_ATTEMPTS {
        let (rec, rv) = cluster::get_node(client, node).await?;
        let plan = match plan_request(&rec, force) {
            Ok(p) => p,
            Err(r) => return Ok(Err(r)),
        };
        if plan.already_requested {
            return Ok(Ok(plan));
        }
        let annotations = BTreeMap::from([(
            ANNOTATION_ROTATE_REQUEST.to_owned(),
            plan.requested.to_string(),
        )]);
        match cluster::patch_annotations(client, node, rv.as_deref(), &annotations).await {
            Ok(()) => return Ok(Ok(plan)),
            Err(e) if cluster::is_conflict(&e) && attempt < PATCH_ATTEMPTS => {
                tracing::debug!(node, attempt, "Node changed while requesting; re-reading");
            }
            Err(e) => {
                return Err(anyhow::Error::from(e).context(format!(
                    "cannot set {ANNOTATION_ROTATE_REQUEST} on Node {node}"
                )));
            }
        }
    }
    anyhow::bail!("Node {node} kept changing; could not request a rotation")
}

/// Polls the Node until the rotation to `plan.requested` ends or `timeout` passes.
async fn wait(client: &Client, node: &str, plan: &Plan, timeout: Duration) -> NodeResult {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut log = ProgressLog::default();
    let mut last_error: Option<String> = None;
    let mut last: Option<Progress> = None;
    loop {
        // The last reading, at the deadline, still gets a moment to arrive.
        let budget = deadline
            .saturating_duration_since(Instant::now())
            .max(POLL_INTERVAL);
        let reading = tokio::time::timeout(budget, cluster::get_node(client, node)).await;
        match reading {
            Ok(Ok((rec, _))) => {
                last_error = None;
                let p = progress(&rec, plan.requested);
                for line in log.lines(&p) {
                    render::progress(format!("{node}: {line}"));
                }
                let done = matches!(p, Progress::Complete(_) | Progress::Failed(_));
                last = Some(p);
                if done {
                    break;
                }
            }
            Ok(Err(e)) => {
                let msg = render::error_chain(&e);
                if last_error.as_ref() != Some(&msg) {
                    render::warn(format!("{node}: {msg}; retrying"));
                    last_error = Some(msg);
                }
            }
            Err(_) => {}
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
    }
    let elapsed = start.elapsed();
    let mut r = NodeResult::new(node, Outcome::TimedOut);
    r.previous_generation = Some(plan.current_generation);
    r.requested_generation = Some(plan.requested);
    r.elapsed_seconds = Some((elapsed.as_secs_f64() * 10.0).round() / 10.0);
    let status = match &last {
        Some(Progress::Complete(s)) => {
            r.result = Outcome::Complete;
            Some(s)
        }
        Some(Progress::Failed(s)) => {
            r.result = Outcome::Failed;
            Some(s)
        }
        Some(Progress::InProgress(s)) => Some(s),
        _ => None,
    };
    if let Some(s) = status {
        r.peers_confirmed = Some(s.peers_confirmed);
        r.peers_total = Some(s.peers_total);
        if r.result != Outcome::Complete {
            r.pending = s.pending.clone();
        }
        r.message = s.message.clone().filter(|m| !m.is_empty());
    }
    match r.result {
        Outcome::Complete => render::progress(format!(
            "{node}: key generation {} complete in {}",
            plan.requested,
            render::seconds(elapsed)
        )),
        Outcome::Failed => render::progress(format!(
            "{node}: key generation {} failed{}",
            plan.requested,
            r.message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        )),
        _ => {
            let last_seen = last
                .as_ref()
                .map(log_summary)
                .unwrap_or_else(|| last_error.clone().unwrap_or("no answer".into()));
            r.message = Some(format!(
                "not complete after {}: {last_seen}",
                render::seconds(timeout)
            ));
            render::progress(format!(
                "{node}: timed out after {} waiting for key generation {} (last: {last_seen})",
                render::seconds(timeout),
                plan.requested
            ));
        }
    }
    r
}

fn log_summary(p: &Progress) -> String {
    match p {
        Progress::Waiting { applied: true } => "new key published, no rotation status".into(),
        Progress::Waiting { applied: false } => "the agent has not picked up the request".into(),
        Progress::InProgress(s) | Progress::Complete(s) | Progress::Failed(s) => s.summary(),
    }
}

/// Requests (and with `wait`, follows) one node's rotation.
async fn rotate_one(
    client: &Client,
    node: &str,
    force: bool,
    wait_for: Option<Duration>,
) -> NodeResult {
    let plan = match request(client, node, force).await {
        Ok(Ok(plan)) => plan,
        Ok(Err(refusal)) => {
            render::warn(&refusal);
            let mut r = refused(node, &refusal);
            if r.result == Outcome::Skipped {
                // Asked for this node by name: not having a key is an error, not a skip.
                r.result = Outcome::Error;
            }
            return r;
        }
        Err(e) => {
            render::warn(render::error_chain(&e));
            let mut r = NodeResult::new(node, Outcome::Error);
            r.message = Some(render::error_chain(&e));
            return r;
        }
    };
    if plan.already_requested {
        render::progress(format!(
            "{node}: key generation {} already requested (current {}); following it",
            plan.requested, plan.current_generation
        ));
    } else {
        render::progress(format!(
            "{node}: requested key generation {} (current {})",
            plan.requested, plan.current_generation
        ));
    }
    match wait_for {
        Some(timeout) => wait(client, node, &plan, timeout).await,
        None => {
            let mut r = NodeResult::new(node, Outcome::Requested);
            r.previous_generation = Some(plan.current_generation);
            r.requested_generation = Some(plan.requested);
            r
        }
    }
}

/// The summary row for a node that cannot be rotated: `refused` while a rotation is pending,
/// `skipped` when it has no key.
fn refused(node: &str, refusal: &Refusal) -> NodeResult {
    let mut r = NodeResult::new(node, Outcome::Skipped);
    if let Refusal::Pending {
        generation,
        requested,
        ..
    } = refusal
    {
        r.result = Outcome::Refused;
        r.previous_generation = Some(*generation);
        r.requested_generation = Some(*requested);
    }
    r.message = Some(refusal.to_string());
    r
}

/// Decides which nodes `--all` rotates. Pending rotations refuse the whole run (unless
/// `force`), before anything is written; nodes without a key are skipped.
pub fn plan_all(records: &[NodeRecord], force: bool) -> (Vec<String>, Vec<NodeResult>) {
    let mut todo = Vec::new();
    let mut other = Vec::new();
    for rec in records {
        match plan_request(rec, force) {
            Ok(_) => todo.push(rec.name.clone()),
            Err(refusal) => other.push(refused(&rec.name, &refusal)),
        }
    }
    (todo, other)
}

async fn rotate_all(client: &Client, args: &RotateArgs) -> anyhow::Result<Vec<NodeResult>> {
    let records = cluster::list_nodes(client).await?;
    let (todo, mut results) = plan_all(&records, args.force);
    for r in &results {
        if let Some(m) = &r.message {
            render::warn(m);
        }
    }
    if results.iter().any(|r| r.result == Outcome::Refused) {
        render::warn("nothing was requested: finish or follow the pending rotations first");
        results.extend(todo.iter().map(|n| NodeResult::new(n, Outcome::NotStarted)));
        results.sort_by(|a, b| a.node.cmp(&b.node));
        return Ok(results);
    }
    let mut queue = todo.into_iter();
    let mut running = tokio::task::JoinSet::new();
    let mut stop = false;
    loop {
        while !stop && running.len() < usize::from(args.max_concurrent) {
            let Some(node) = queue.next() else { break };
            let client = client.clone();
            let (force, timeout) = (args.force, args.timeout);
            running.spawn(async move { rotate_one(&client, &node, force, Some(timeout)).await });
        }
        let Some(done) = running.join_next().await else {
            break;
        };
        let r = done?;
        if r.result != Outcome::Complete && !stop {
            stop = true;
            render::warn(format!(
                "{}: {}; not starting further rotations",
                r.node,
                r.result.label()
            ));
        }
        results.push(r);
    }
    results.extend(queue.map(|n| NodeResult::new(&n, Outcome::NotStarted)));
    results.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(results)
}

pub async fn run(global: &GlobalArgs, args: &RotateArgs) -> anyhow::Result<Exit> {
    let client = cluster::client(global, API_TIMEOUT).await?;
    let results = match (&args.node, args.all) {
        (Some(node), false) => {
            vec![rotate_one(&client, node, args.force, args.wait.then_some(args.timeout)).await]
        }
        _ => rotate_all(&client, args).await?,
    };
    let report = RotateReport {
        schema_version: SCHEMA_VERSION,
        results,
    };
    render::print(&match global.output {
        Output::Table => report.table(),
        Output::Json => render::json_text(&report)?,
    })?;
    Ok(report.exit())
}

#[cfg(test)]
mod tests {
    use wgmesh_api::annotations::ANNOTATION_PUBLIC_KEY;

    use super::*;
    use crate::test_support::keys;

    fn rec(name: &str, annotations: &[(&str, &str)]) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    const GEN: &str = ANNOTATION_KEY_GENERATION;
    const REQ: &str = ANNOTATION_ROTATE_REQUEST;
    const STATUS: &str = ANNOTATION_ROTATION_STATUS;

    #[test]
    fn table_of_rotation_requests() {
        type Case = (
            &'static str,
            Vec<(&'static str, &'static str)>,
            bool,
            Result<(u64, u64, bool), &'static str>,
        );
        let cases: Vec<Case> = vec![
            ("first rotation", vec![(GEN, "1")], false, Ok((1, 2, false))),
            (
                "after a completed one",
                vec![(GEN, "2"), (REQ, "2")],
                false,
                Ok((2, 3, false)),
            ),
            (
                "stale lower request",
                vec![(GEN, "5"), (REQ, "3")],
                false,
                Ok((5, 6, false)),
            ),
            (
                "pending is refused",
                vec![(GEN, "2"), (REQ, "3")],
                false,
                Err("pending"),
            ),
            (
                "force follows the pending one",
                vec![(GEN, "2"), (REQ, "3")],
                true,
                Ok((2, 3, true)),
            ),
            (
                "force never lowers",
                vec![(GEN, "2"), (REQ, "7")],
                true,
                Ok((2, 7, true)),
            ),
            (
                "malformed request is overwritten",
                vec![(GEN, "2"), (REQ, "soon")],
                false,
                Ok((2, 3, false)),
            ),
            ("no agent yet", vec![], false, Err("nokey")),
            ("no agent yet, forced", vec![], true, Err("nokey")),
            (
                "key but no generation",
                vec![(ANNOTATION_PUBLIC_KEY, "x")],
                false,
                Err("nokey"),
            ),
            (
                "malformed generation",
                vec![(GEN, "two")],
                false,
                Err("malformed"),
            ),
        ];
        for (name, ann, force, want) in cases {
            let got = plan_request(&rec("n", &ann), force);
            match (got, want) {
                (Ok(p), Ok((cur, req, already))) => {
                    assert_eq!(
                        (p.current_generation, p.requested, p.already_requested),
                        (cur, req, already),
                        "{name}"
                    );
                }
                (Err(r), Err(kind)) => {
                    let got_kind = match r {
                        Refusal::Pending { .. } => "pending",
                        Refusal::NoKey { .. } => "nokey",
                        Refusal::MalformedGeneration { .. } => "malformed",
                    };
                    assert_eq!(got_kind, kind, "{name}");
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
        let refusal = plan_request(&rec("n", &[(GEN, "2"), (REQ, "3")]), false).unwrap_err();
        assert_eq!(refusal.exit(), Exit::Refused);
        assert!(refusal.to_string().contains("already pending"), "{refusal}");
        assert_eq!(
            plan_request(&rec("n", &[]), false).unwrap_err().exit(),
            Exit::Error
        );
    }

    #[test]
    fn table_of_progress_readings() {
        let st = |g: u64, state: &str| {
            format!(
                r#"{{"generation":{g},"state":"{state}","peers_total":2,"peers_confirmed":1,"pending":["b"]}}"#
            )
        };
        let in_progress_3 = st(3, "in-progress");
        let complete_3 = st(3, "complete");
        let failed_3 = st(3, "failed");
        let complete_2 = st(2, "complete");
        let complete_4 = st(4, "complete");
        type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);
        let cases: Vec<Case> = vec![
            ("nothing yet", vec![(GEN, "2"), (REQ, "3")], "waiting"),
            (
                "old status",
                vec![(GEN, "2"), (REQ, "3"), (STATUS, &complete_2)],
                "waiting",
            ),
            (
                "key published, no status",
                vec![(GEN, "3"), (REQ, "3")],
                "applied",
            ),
            (
                "in progress",
                vec![(GEN, "3"), (STATUS, &in_progress_3)],
                "in-progress",
            ),
            (
                "complete",
                vec![(GEN, "3"), (STATUS, &complete_3)],
                "complete",
            ),
            ("failed", vec![(GEN, "3"), (STATUS, &failed_3)], "failed"),
            (
                "superseded",
                vec![(GEN, "4"), (STATUS, &complete_4)],
                "complete",
            ),
            (
                "unreadable status",
                vec![(GEN, "2"), (REQ, "3"), (STATUS, "{")],
                "waiting",
            ),
        ];
        for (name, ann, want) in cases {
            let got = match progress(&rec("n", &ann), 3) {
                Progress::Waiting { applied: false } => "waiting",
                Progress::Waiting { applied: true } => "applied",
                Progress::InProgress(_) => "in-progress",
                Progress::Complete(_) => "complete",
                Progress::Failed(_) => "failed",
            };
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn progress_lines_say_only_what_changed() {
        let mut log = ProgressLog::default();
        let status = |confirmed: usize, pending: &[&str], state: RotationState| RotationStatus {
            generation: 3,
            state,
            started: None,
            peers_total: 3,
            peers_confirmed: confirmed,
            pending: pending.iter().map(|s| s.to_string()).collect(),
            message: None,
        };
        let waiting = Progress::Waiting { applied: false };
        assert_eq!(log.lines(&waiting).len(), 1);
        assert!(log.lines(&waiting).is_empty(), "unchanged: silent");
        let p = Progress::InProgress(status(0, &["b", "c", "d"], RotationState::InProgress));
        assert_eq!(
            log.lines(&p),
            ["gen 3 in-progress 0/3 confirmed, pending: b, c, d"]
        );
        let p = Progress::InProgress(status(2, &["d"], RotationState::InProgress));
        assert_eq!(
            log.lines(&p),
            [
                "peer b confirmed the new key (2/3)",
                "peer c confirmed the new key (2/3)",
                "gen 3 in-progress 2/3 confirmed, pending: d"
            ]
        );
        let p = Progress::Complete(status(3, &[], RotationState::Complete));
        assert_eq!(
            log.lines(&p),
            [
                "peer d confirmed the new key (3/3)",
                "gen 3 complete 3/3 confirmed"
            ]
        );
    }

    #[test]
    fn rotation_views_read_the_annotations() {
        let in_progress = r#"{"generation":3,"state":"in-progress","peers_total":2,"peers_confirmed":1,"pending":["b"]}"#;
        type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str, usize);
        let cases: Vec<Case> = vec![
            ("never rotated", vec![(GEN, "1")], "idle", 0),
            (
                "requested",
                vec![(GEN, "1"), (REQ, "2")],
                "requested gen 2",
                0,
            ),
            ("done", vec![(GEN, "2"), (REQ, "2")], "idle", 0),
            (
                "applied, peers pending",
                vec![(GEN, "3"), (REQ, "3"), (STATUS, in_progress)],
                "idle; gen 3 in-progress 1/2 confirmed, pending: b",
                0,
            ),
            ("malformed request", vec![(GEN, "1"), (REQ, "x")], "idle", 1),
            (
                "malformed status",
                vec![(GEN, "1"), (STATUS, "[]")],
                "idle",
                1,
            ),
        ];
        for (name, ann, want, problems) in cases {
            let (view, p) = rotation_view(&rec("n", &ann));
            assert_eq!(view.summary(), want, "{name}");
            assert_eq!(p.len(), problems, "{name}: {p:?}");
        }
    }

    #[test]
    fn all_refuses_pending_rotations_and_skips_keyless_nodes() {
        let nodes = [
            rec("a", &[(GEN, "1")]),
            rec("b", &[(GEN, "1"), (REQ, "2")]),
            rec("c", &[]),
        ];
        let (todo, other) = plan_all(&nodes, false);
        assert_eq!(todo, ["a"]);
        let outcomes: Vec<_> = other.iter().map(|r| (r.node.as_str(), r.result)).collect();
        assert_eq!(outcomes, [("b", Outcome::Refused), ("c", Outcome::Skipped)]);
        let (todo, _) = plan_all(&nodes, true);
        assert_eq!(todo, ["a", "b"]);
    }

    #[test]
    fn the_report_exit_is_the_worst_result_and_json_keys_are_stable() {
        let mut ok = NodeResult::new("a", Outcome::Complete);
        ok.previous_generation = Some(1);
        ok.requested_generation = Some(2);
        ok.peers_confirmed = Some(2);
        ok.peers_total = Some(2);
        ok.elapsed_seconds = Some(1.5);
        let mut report = RotateReport {
            schema_version: SCHEMA_VERSION,
            results: vec![ok, NodeResult::new("c", Outcome::Skipped)],
        };
        assert_eq!(report.exit(), Exit::Ok);
        let table = report.table();
        assert!(table.starts_with("NODE"), "{table}");
        assert!(
            table.contains("1 -> 2") && table.contains("2/2") && table.contains("1.5s"),
            "{table}"
        );
        let v: serde_json::Value =
            serde_json::from_str(&render::json_text(&report).unwrap()).unwrap();
        assert_eq!(keys(&v), ["results", "schema_version"]);
        assert_eq!(
            keys(&v["results"][0]),
            [
                "elapsed_seconds",
                "message",
                "node",
                "peers_confirmed",
                "peers_total",
                "pending",
                "previous_generation",
                "requested_generation",
                "result"
            ]
        );
        assert_eq!(v["results"][0]["result"], "complete");
        report.results.push(NodeResult::new("d", Outcome::TimedOut));
        assert_eq!(report.exit(), Exit::TimedOut);
        report.results.push(NodeResult::new("e", Outcome::Failed));
        assert_eq!(report.exit(), Exit::CheckFailed);
    }
}
