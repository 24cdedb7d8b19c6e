//! The failure dump: what a developer needs to see when a scenario fails, printed by
//! `Testbed::drop` during a panic (or after a failed `bed.eventually`) and by `bed.dump()`.
//! Only `wg show`, never `wg showconf`: the dump must not contain private keys.

use std::fmt::Write as _;

use crate::{cmd::Cmd, testbed::Testbed};

/// Lines of each log kept in the dump.
pub const LOG_TAIL_LINES: usize = 40;

pub fn dump(bed: &Testbed) -> String {
    let mut out = String::new();
    let mut section = |title: &str, body: String| {
        // Writing into a String cannot fail.
        writeln!(out, "----- {title} -----\n{}", body.trim_end()).ok();
    };
    section(
        &format!("testbed {} (dir {})", bed.prefix(), bed.dir().display()),
        format!("namespaces: {}-*", bed.prefix()),
    );
    section("underlay: ip link", run(bed.underlay().ip(["-br", "link"])));
    for node in bed.nodes() {
        let n = node.name();
        section(&format!("{n}: ip addr"), run(node.ip(["-br", "addr"])));
        section(
            &format!("{n}: ip route (all tables)"),
            run(node.ip(["route", "show", "table", "all"])),
        );
        section(&format!("{n}: ip rule"), run(node.ip(["rule"])));
        section(
            &format!("{n}: wg show {}", node.wg_interface()),
            run(node
                .cmd("wg")
                .env("WG_HIDE_KEYS", "always")
                .args(["show", node.wg_interface()])
                .run()),
        );
        section(
            &format!("{n}: agent running"),
            node.agent_running().to_string(),
        );
        section(
            &format!("{n}: agent.log (tail)"),
            node.agent_log_tail(LOG_TAIL_LINES),
        );
        section(
            &format!("{n}: device.log (tail)"),
            crate::testbed::tail_file(&node.device_log_path(), LOG_TAIL_LINES),
        );
        for pod in node.pods() {
            section(
                &format!("{n}/{}: ip addr", pod.name()),
                run(Cmd::new("ip").args(["-n", pod.ns(), "-br", "addr"]).run()),
            );
        }
    }
    if let Ok(api) = bed.api() {
        section(
            "API stand-in stats",
            run(api.stats().map(|v| format!("{v:#}"))),
        );
    }
    if let Some(log) = bed.apiserver_log_tail(LOG_TAIL_LINES) {
        section("API stand-in log (tail)", log);
    }
    out
}

fn run(r: anyhow::Result<String>) -> String {
    r.unwrap_or_else(|e| format!("<{e:#}>"))
}
