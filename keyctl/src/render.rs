//! Shared rendering: kubectl-like tables (no borders, no wrapping, so `grep`/`awk` work), JSON,
//! times and sizes for people.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use comfy_table::{ContentArrangement, Table, presets};
use serde::Serialize;

/// A borderless table with upper-case headers and two spaces between columns.
pub fn table<I, S>(headers: I) -> Table
where
    I: IntoIterator<Item = S>,
    S: Into<comfy_table::Cell>,
{
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(headers);
    for column in t.column_iter_mut() {
        column.set_padding((0, 2));
    }
    t
}

/// The table as text with trailing spaces trimmed, ending in a newline.
pub fn table_text(t: &Table) -> String {
    let mut out = String::new();
    for line in t.to_string().lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Pretty JSON with a final newline.
pub fn json_text<T: Serialize>(value: &T) -> anyhow::Result<String> {
    let mut s = serde_json::to_string_pretty(value)?;
    s.push('\n');
    Ok(s)
}

/// Writes data to stdout. A closed pipe (`wgmeshctl ... | head`) is not an error.
pub fn print(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// A diagnostic on stderr.
pub fn warn(message: impl std::fmt::Display) {
    eprintln!("wgmeshctl: warning: {message}");
}

/// A progress line on stderr.
pub fn progress(message: impl std::fmt::Display) {
    eprintln!("wgmeshctl: {message}");
}

/// An error with its causes, `: `-separated like `{:#}`, minus the causes whose text the
/// previous message already repeats (kube's and hyper's errors print their source themselves).
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// RFC 3339 UTC with whole seconds, e.g. `2026-11-26T05:02:56Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    wgmesh::discovery::rfc3339(secs)
}

/// Parses an RFC 3339 timestamp (any offset, optional fraction).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let ts: jiff::Timestamp = s.trim().parse().ok()?;
    Some(SystemTime::from(ts))
}

/// Whole seconds from `then` to `now`; 0 when `then` is in the future (clock skew).
pub fn age_secs(then: SystemTime, now: SystemTime) -> u64 {
    now.duration_since(then).unwrap_or_default().as_secs()
}

/// A short age: `45s`, `3m12s`, `2h5m`, `4d3h`.
pub fn short_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

/// Seconds with one decimal, for elapsed times.
pub fn seconds(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `3.2 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `-` for an absent value in a table cell.
pub fn or_dash(v: Option<impl std::fmt::Display>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chains_skip_repeated_causes() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(io)
            .context("failed to read /x: no such file")
            .context("cannot read kubeconfig /x");
        assert_eq!(
            error_chain(&e),
            "cannot read kubeconfig /x: failed to read /x: no such file"
        );
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_chain(&e), "outer: inner");
    }

    #[test]
    fn durations_and_sizes_read_well() {
        for (secs, want) in [
            (0, "0s"),
            (45, "45s"),
            (192, "3m12s"),
            (7500, "2h5m"),
            (4 * 86_400 + 3 * 3600 + 5, "4d3h"),
        ] {
            assert_eq!(short_duration(secs), want);
        }
        for (n, want) in [
            (0, "0 B"),
            (1023, "1023 B"),
            (1536, "1.5 KiB"),
            (5 * 1024 * 1024, "5.0 MiB"),
        ] {
            assert_eq!(bytes(n), want);
        }
        assert_eq!(seconds(Duration::from_millis(4250)), "4.2s");
    }

    #[test]
    fn rfc3339_round_trips_and_accepts_offsets() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_669_376);
        assert_eq!(rfc3339(t), "2026-11-26T05:02:56Z");
        assert_eq!(parse_rfc3339("2026-11-26T05:02:56Z"), Some(t));
        assert_eq!(parse_rfc3339("2026-11-26T06:02:56+01:00"), Some(t));
        assert_eq!(parse_rfc3339("yesterday"), None);
        assert_eq!(age_secs(t, t + Duration::from_secs(5)), 5);
        assert_eq!(age_secs(t + Duration::from_secs(5), t), 0, "future: 0");
    }

    #[test]
    fn tables_have_no_borders_and_no_trailing_spaces() {
        let mut t = table(["NAME", "VALUE"]);
        t.add_row(["a", "1"]);
        t.add_row(["longer-name", "22"]);
        let text = table_text(&t);
        assert_eq!(
            text,
            "NAME         VALUE\na            1\nlonger-name  22\n"
        );
    }
}
