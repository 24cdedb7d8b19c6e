//! Test control: request statistics, injected failures, and the `/_control/*` routes (served
//! only on the control socket).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};

use crate::server::AppState;

/// The API verb of a request, as counted in the statistics and matched by `fail` rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// GET of one object.
    Get,
    /// GET of the collection.
    List,
    /// GET of the collection with `watch=true`.
    Watch,
    /// POST.
    Create,
    /// PUT.
    Update,
    /// PATCH.
    Patch,
    /// DELETE.
    Delete,
    /// Discovery, health and unknown paths.
    Other,
}

impl Verb {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
            Verb::Other => "other",
        }
    }

    /// Parses a lower-case name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Verb::Get,
            Verb::List,
            Verb::Watch,
            Verb::Create,
            Verb::Update,
            Verb::Patch,
            Verb::Delete,
            Verb::Other,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }

    /// True for create, update, patch and delete.
    pub fn is_write(self) -> bool {
        matches!(
            self,
            Verb::Create | Verb::Update | Verb::Patch | Verb::Delete
        )
    }
}

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientId {
    /// A TCP client on a `--listen` address.
    Tcp(IpAddr),
    /// The control socket.
    Control,
}

impl ClientId {
    /// The statistics key: the IP address, or `control`.
    pub fn label(&self) -> String {
        match self {
            ClientId::Tcp(ip) => ip.to_string(),
            ClientId::Control => "control".to_string(),
        }
    }
}

/// Request counters by verb.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct VerbCounts {
    /// get
    pub get: u64,
    /// list
    pub list: u64,
    /// watch
    pub watch: u64,
    /// create
    pub create: u64,
    /// update
    pub update: u64,
    /// patch
    pub patch: u64,
    /// delete
    pub delete: u64,
    /// discovery/health/unknown
    pub other: u64,
}

impl VerbCounts {
    fn bump(&mut self, v: Verb) {
        let c = match v {
            Verb::Get => &mut self.get,
            Verb::List => &mut self.list,
            Verb::Watch => &mut self.watch,
            Verb::Create => &mut self.create,
            Verb::Update => &mut self.update,
            Verb::Patch => &mut self.patch,
            Verb::Delete => &mut self.delete,
            Verb::Other => &mut self.other,
        };
        *c += 1;
    }
}

/// Counters for one client (or for all).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Counts {
    /// All API requests.
    pub total: u64,
    /// create + update + patch + delete.
    pub writes: u64,
    /// Requests answered with an injected failure.
    pub failed_injected: u64,
    /// Per verb.
    pub by_verb: VerbCounts,
}

impl Counts {
    fn bump(&mut self, v: Verb) {
        self.total += 1;
        if v.is_write() {
            self.writes += 1;
        }
        self.by_verb.bump(v);
    }
}

/// The statistics served by `GET /_control/stats`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Stats {
    /// Every client together.
    #[serde(flatten)]
    pub all: Counts,
    /// Per client: IP address for TCP clients, `control` for the control socket.
    pub by_client: BTreeMap<String, Counts>,
}

impl Stats {
    /// Counts one API request.
    pub fn record(&mut self, client: &ClientId, verb: Verb) {
        self.all.bump(verb);
        self.by_client.entry(client.label()).or_default().bump(verb);
    }

    /// Counts one injected failure (the request itself is counted by `record`).
    pub fn record_injected(&mut self, client: &ClientId) {
        self.all.failed_injected += 1;
        self.by_client
            .entry(client.label())
            .or_default()
            .failed_injected += 1;
    }
}

/// Which clients a fail rule hits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFilter {
    /// Any TCP client (the default: the control socket is left alone).
    Tcp,
    /// TCP clients and the control socket.
    Any,
    /// Only the control socket.
    Control,
    /// One TCP client address.
    Ip(IpAddr),
}

impl ClientFilter {
    fn parse(s: Option<&str>) -> Result<Self, String> {
        match s {
            None | Some("") | Some("tcp") => Ok(Self::Tcp),
            Some("any") => Ok(Self::Any),
            Some("control") => Ok(Self::Control),
            Some(ip) => ip.parse().map(Self::Ip).map_err(|_| {
                format!("client must be tcp, any, control or an IP address, not {ip:?}")
            }),
        }
    }

    fn matches(&self, c: &ClientId) -> bool {
        match (self, c) {
            (Self::Any, _) => true,
            (Self::Tcp, ClientId::Tcp(_)) => true,
            (Self::Control, ClientId::Control) => true,
            (Self::Ip(want), ClientId::Tcp(ip)) => want == ip,
            _ => false,
        }
    }

    fn as_string(&self) -> String {
        match self {
            Self::Tcp => "tcp".into(),
            Self::Any => "any".into(),
            Self::Control => "control".into(),
            Self::Ip(ip) => ip.to_string(),
        }
    }
}

/// One `fail` rule: the next `remaining` matching requests get `status`.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultRule {
    /// HTTP status to answer.
    pub status: u16,
    /// How many more requests it hits.
    pub remaining: u64,
    /// Only this verb (any API verb when `None`).
    pub verb: Option<Verb>,
    /// Only this object name (from the URL).
    pub name: Option<String>,
    /// Only these clients.
    pub client: ClientFilter,
}

impl FaultRule {
    fn to_json(&self) -> Value {
        json!({"status": self.status, "remaining": self.remaining,
               "verb": self.verb.map(Verb::as_str), "name": self.name,
               "client": self.client.as_string()})
    }
}

/// The pending fail rules, consumed in order.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    rules: Vec<FaultRule>,
}

impl Faults {
    /// Adds a rule.
    pub fn add(&mut self, rule: FaultRule) {
        self.rules.push(rule);
    }

    /// Removes every rule, returning how many there were.
    pub fn clear(&mut self) -> usize {
        std::mem::take(&mut self.rules).len()
    }

    /// The pending rules as JSON.
    pub fn to_json(&self) -> Value {
        Value::Array(self.rules.iter().map(FaultRule::to_json).collect())
    }

    /// If a rule matches this request, consumes one use and returns its status.
    pub fn take(&mut self, verb: Verb, name: Option<&str>, client: &ClientId) -> Option<u16> {
        if verb == Verb::Other {
            return None;
        }
        let idx = self.rules.iter().position(|r| {
            r.remaining > 0
                && r.verb.is_none_or(|v| v == verb)
                && r.name.as_deref().is_none_or(|n| Some(n) == name)
                && r.client.matches(client)
        })?;
        let rule = &mut self.rules[idx];
        rule.remaining -= 1;
        let status = rule.status;
        if rule.remaining == 0 {
            self.rules.remove(idx);
        }
        Some(status)
    }
}

fn param<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Parses the query of `POST /_control/fail`.
pub fn parse_fail_rule(q: &[(String, String)]) -> Result<FaultRule, String> {
    let status: u16 = param(q, "status")
        .ok_or("status is required")?
        .parse()
        .map_err(|_| "status must be a number")?;
    if !(100..=599).contains(&status) {
        return Err("status must be between 100 and 599".into());
    }
    let remaining: u64 = match param(q, "count") {
        Some(c) => c.parse().map_err(|_| "count must be a number")?,
        None => 1,
    };
    let verb = match param(q, "verb").filter(|v| !v.is_empty()) {
        Some(v) => Some(Verb::parse(v).filter(|v| *v != Verb::Other).ok_or_else(|| {
            format!("verb must be one of get, list, watch, create, update, patch, delete, not {v:?}")
        })?),
        None => None,
    };
    let name = param(q, "name").filter(|n| !n.is_empty()).map(String::from);
    let client = ClientFilter::parse(param(q, "client"))?;
    Ok(FaultRule {
        status,
        remaining,
        verb,
        name,
        client,
    })
}

/// A control-route answer: HTTP status and JSON body.
pub type ControlAnswer = (u16, Value);

fn bad(msg: impl Into<String>) -> ControlAnswer {
    (400, json!({"ok": false, "error": msg.into()}))
}

/// Serves `/_control/*`.
pub async fn handle(
    state: &Arc<AppState>,
    method: &http::Method,
    path: &str,
    q: &[(String, String)],
) -> ControlAnswer {
    use http::Method;
    match (method, path) {
        (&Method::GET, "/_control/health") => {
            let (up, epoch) = state.phase_summary();
            (
                200,
                json!({"ok": true, "up": up, "epoch": epoch,
                       "resourceVersion": state.store().rv().to_string()}),
            )
        }
        (&Method::GET, "/_control/stats") => {
            let mut v = serde_json::to_value(state.stats().clone()).unwrap_or(Value::Null);
            if let Some(m) = v.as_object_mut() {
                m.insert("open_watches".into(), json!(state.open_watches()));
            }
            (200, v)
        }
        (&Method::POST, "/_control/stats/reset") => {
            *state.stats() = Stats::default();
            (200, json!({"ok": true}))
        }
        (&Method::POST, "/_control/compact") => {
            let rv = state.compact();
            (200, json!({"ok": true, "resourceVersion": rv.to_string()}))
        }
        (&Method::POST, "/_control/fail") => match parse_fail_rule(q) {
            Ok(rule) => {
                let mut faults = state.faults();
                let rule_json = rule.to_json();
                faults.add(rule);
                (
                    200,
                    json!({"ok": true, "rule": rule_json, "pending": faults.to_json()}),
                )
            }
            Err(e) => bad(e),
        },
        (&Method::GET, "/_control/fail") => (
            200,
            json!({"ok": true, "pending": state.faults().to_json()}),
        ),
        (&Method::DELETE, "/_control/fail") | (&Method::POST, "/_control/fail/clear") => {
            let n = state.faults().clear();
            (200, json!({"ok": true, "cleared": n}))
        }
        (&Method::POST, "/_control/outage") => {
            let secs: f64 = match param(q, "seconds").map(str::parse) {
                Some(Ok(s)) if (0.0..86_400.0).contains(&s) => s,
                _ => return bad("seconds is required: a number of seconds (fractions allowed)"),
            };
            let epoch = state.go_down().await;
            state
                .clone()
                .schedule_up(Duration::from_secs_f64(secs), epoch);
            (
                200,
                json!({"ok": true, "up": false, "epoch": epoch, "seconds": secs}),
            )
        }
        (&Method::POST, "/_control/down") => {
            let epoch = state.go_down().await;
            (200, json!({"ok": true, "up": false, "epoch": epoch}))
        }
        (&Method::POST, "/_control/up") => {
            let epoch = state.go_up().await;
            (200, json!({"ok": true, "up": true, "epoch": epoch}))
        }
        _ => (
            404,
            json!({"ok": false, "error": format!("no control route {method} {path}")}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Vec<(String, String)> {
        crate::util::parse_query(Some(s))
    }

    #[test]
    fn fail_rules_are_consumed_in_order_and_filtered() {
        let mut f = Faults::default();
        let tcp = ClientId::Tcp("10.0.0.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])));
        f.add(
            parse_fail_rule(&q("status=500&count=2&verb=list")).unwrap_or_else(|e| panic!("{e}")),
        );
        f.add(
            parse_fail_rule(&q("status=409&verb=patch&name=a")).unwrap_or_else(|e| panic!("{e}")),
        );
        assert_eq!(f.take(Verb::Get, None, &tcp), None);
        assert_eq!(f.take(Verb::List, None, &ClientId::Control), None);
        assert_eq!(f.take(Verb::List, None, &tcp), Some(500));
        assert_eq!(f.take(Verb::List, None, &tcp), Some(500));
        assert_eq!(f.take(Verb::List, None, &tcp), None);
        assert_eq!(f.take(Verb::Patch, Some("b"), &tcp), None);
        assert_eq!(f.take(Verb::Patch, Some("a"), &tcp), Some(409));
        assert_eq!(f.to_json(), json!([]));
    }

    #[test]
    fn fail_rule_client_filters() {
        let mut f = Faults::default();
        let a = ClientId::Tcp(IpAddr::from([192, 0, 2, 2]));
        let b = ClientId::Tcp(IpAddr::from([192, 0, 2, 3]));
        f.add(
            parse_fail_rule(&q("status=503&count=5&client=192.0.2.3"))
                .unwrap_or_else(|e| panic!("{e}")),
        );
        assert_eq!(f.take(Verb::Get, None, &a), None);
        assert_eq!(f.take(Verb::Get, None, &b), Some(503));
        assert_eq!(f.take(Verb::Other, None, &b), None);
        f.clear();
        f.add(parse_fail_rule(&q("status=500&client=any")).unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(f.take(Verb::Get, None, &ClientId::Control), Some(500));
    }

    #[test]
    fn fail_rule_validation() {
        assert!(parse_fail_rule(&q("count=1")).is_err());
        assert!(parse_fail_rule(&q("status=abc")).is_err());
        assert!(parse_fail_rule(&q("status=500&verb=explode")).is_err());
        assert!(parse_fail_rule(&q("status=500&client=nowhere")).is_err());
        let r = parse_fail_rule(&q("status=410&verb=watch")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.status, r.remaining, r.verb), (410, 1, Some(Verb::Watch)));
    }

    #[test]
    fn stats_shape() {
        let mut s = Stats::default();
        s.record(&ClientId::Control, Verb::Patch);
        s.record(&ClientId::Tcp(IpAddr::from([127, 0, 0, 1])), Verb::Watch);
        s.record_injected(&ClientId::Control);
        let v = serde_json::to_value(&s).unwrap_or(Value::Null);
        assert_eq!(v["total"], 2);
        assert_eq!(v["writes"], 1);
        assert_eq!(v["by_verb"]["watch"], 1);
        assert_eq!(v["by_client"]["control"]["writes"], 1);
        assert_eq!(v["by_client"]["control"]["failed_injected"], 1);
        assert_eq!(v["by_client"]["127.0.0.1"]["by_verb"]["watch"], 1);
    }
}
