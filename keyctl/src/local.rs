//! The node-local sources of `wgmeshctl status`: the WireGuard device (userspace over UAPI with the
//! agent's [`UapiDevice`], or kernel WireGuard over netlink), its MTU, the agent's `GET /status`
//! and the pinned eBPF maps. Every reader is blocking and bounded by a timeout; each failure is
//! reported to the caller, which decides whether it can go on without that source.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{TcpStream, ToSocketAddrs as _},
    path::Path,
    time::{Duration, UNIX_EPOCH},
};

use anyhow::{Context as _, anyhow};
use ipnet::IpNet;
use wgmesh::{
    mesh::ObservedPeer,
    wireguard::{Backend, DeviceReader as _, DeviceState, kernel::KernelReader, uapi::UapiDevice},
};
use wgmesh_api::status::{AgentStatus, DeviceStatus};

/// How long the agent's status endpoint may take to connect and to answer.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest status document accepted (a few hundred peers fit in well under this).
const MAX_STATUS_BYTES: usize = 16 * 1024 * 1024;

/// Reads the device: the userspace device if its UAPI socket answers, else kernel WireGuard
/// (an existing interface; nothing is created). The private key is reduced to its public key by
/// the agent's readers as it is read.
pub fn read_device(ifname: &str) -> anyhow::Result<(Backend, DeviceState)> {
    let userspace = match UapiDevice::new(ifname).read_state() {
        Ok(state) => return Ok((Backend::Userspace, state)),
        Err(e) => e,
    };
    let kernel = KernelReader {
        ifname: ifname.to_owned(),
    };
    match kernel.read_state() {
        Ok(state) => Ok((Backend::Kernel, state)),
        Err(kernel) => Err(anyhow!(
            "cannot read WireGuard interface {ifname}: userspace: {userspace}; kernel: {kernel} \
             (is the agent running on this node, with this --interface? reading kernel WireGuard \
             needs root or CAP_NET_ADMIN)"
        )),
    }
}

/// The device as the agent's `/status` reports it (`device`), in the terms of a direct read.
/// Unreadable endpoints and CIDRs are left out.
pub fn device_from_agent(d: &DeviceStatus) -> DeviceState {
    DeviceState {
        public_key: d.public_key,
        listen_port: d.listen_port,
        fwmark: d.fwmark,
        peers: d
            .peers
            .iter()
            .map(|p| {
                let observed = ObservedPeer {
                    endpoint: p.endpoint.as_deref().and_then(|e| e.parse().ok()),
                    allowed_ips: p
                        .allowed_ips
                        .iter()
                        .filter_map(|c| c.parse::<IpNet>().ok())
                        .map(|n| n.trunc())
                        .collect(),
                    keepalive: p.persistent_keepalive,
                    last_handshake: p
                        .latest_handshake
                        .filter(|s| *s > 0)
                        .map(|s| UNIX_EPOCH + Duration::from_secs(s)),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                };
                (p.public_key, observed)
            })
            .collect(),
    }
}

/// The interface's MTU from sysfs (works for both backends; the netns's own sysfs in tests).
pub fn read_mtu(ifname: &str) -> anyhow::Result<u32> {
    let path = Path::new("/sys/class/net").join(ifname).join("mtu");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{} holds {:?}, not an MTU", path.display(), text.trim()))
}

/// What the agent's status endpoint said.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentAnswer {
    Status(Box<AgentStatus>),
    /// It answered, but has no status yet (503 while it starts) or an unreadable one.
    NotReady(String),
}

/// `GET /status` from the agent. `Err` means it could not be reached at all.
pub fn fetch_agent_status(addr: &str, timeout: Duration) -> anyhow::Result<AgentAnswer> {
    let sockaddr = addr
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to nothing"))?;
    let mut stream = TcpStream::connect_timeout(&sockaddr, timeout)
        .with_context(|| format!("cannot connect to the agent at {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let request = format!(
        "GET /status HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .with_context(|| format!("cannot send to the agent at {addr}"))?;
    let mut raw = Vec::new();
    stream
        .take(MAX_STATUS_BYTES as u64)
        .read_to_end(&mut raw)
        .with_context(|| format!("no answer from the agent at {addr}"))?;
    let (code, body) = parse_http_response(&raw).map_err(|e| anyhow!("agent at {addr}: {e}"))?;
    Ok(agent_answer(code, &body))
}

/// Interprets the status endpoint's answer.
pub fn agent_answer(code: u16, body: &[u8]) -> AgentAnswer {
    if code != 200 {
        let text = String::from_utf8_lossy(body);
        return AgentAnswer::NotReady(format!("HTTP {code}: {}", text.trim()));
    }
    match serde_json::from_slice::<AgentStatus>(body) {
        Ok(s) => AgentAnswer::Status(Box::new(s)),
        Err(e) => AgentAnswer::NotReady(format!("unreadable status document: {e}")),
    }
}

/// Splits an HTTP/1.1 response into status code and body (Content-Length, chunked, or until
/// the connection closed).
pub fn parse_http_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("incomplete HTTP response (no end of headers)")?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "HTTP headers are not UTF-8")?;
    let rest = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .filter(|_| status_line.starts_with("HTTP/1."))
        .ok_or_else(|| format!("not an HTTP response: {status_line:?}"))?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse().map_err(|_| "bad Content-Length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or("body shorter than Content-Length")?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok((code, body))
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_text = std::str::from_utf8(&rest[..eol]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(rest.get(..size).ok_or("truncated chunk")?);
        rest = rest.get(size + 2..).ok_or("truncated chunk")?;
    }
}

/// What the pinned eBPF maps say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathView {
    pub counters: BTreeMap<String, u64>,
    pub fwmark: u32,
    pub fwmask: u32,
    pub strict: bool,
}

/// Reads the pins under `dir`. `Ok(None)`: nothing pinned there (no datapath on this node).
pub fn read_datapath(dir: &Path) -> anyhow::Result<Option<DatapathView>> {
    let pins = match wgmesh_datapath::Datapath::open_pinned(dir) {
        Ok(p) => p,
        Err(wgmesh_datapath::Error::NoPins { .. }) => return Ok(None),
        Err(e) => {
            return Err(anyhow::Error::from(e))
                .context("cannot open the pinned eBPF maps (reading them needs root)");
        }
    };
    let c = pins
        .counters()
        .context("cannot read the datapath counters")?;
    let (fwmark, fwmask, strict) = pins.config().context("cannot read the datapath config")?;
    Ok(Some(DatapathView {
        counters: counters_map(&c),
        fwmark,
        fwmask,
        strict,
    }))
}

/// The agent's counter names (as in its `/status`), plus the counters it leaves out there.
pub fn counters_map(c: &wgmesh_datapath::Counters) -> BTreeMap<String, u64> {
    let mut map = wgmesh::agent::counters_map(c);
    for (name, value) in [
        ("steered_bytes", c.steered_bytes),
        ("non_ip", c.non_ip),
        ("malformed", c.malformed),
        ("uplink_passed", c.uplink_passed),
    ] {
        map.entry(name.to_owned()).or_insert(value);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_s_device_reading_converts() {
        use wgmesh_api::{PublicKey, status::DevicePeerStatus};
        let d = DeviceStatus {
            public_key: Some(PublicKey::from_bytes([1; 32])),
            listen_port: 51820,
            fwmark: 0,
            peers: vec![
                DevicePeerStatus {
                    node: Some("b".into()),
                    public_key: PublicKey::from_bytes([2; 32]),
                    endpoint: Some("192.0.2.2:51820".into()),
                    allowed_ips: vec!["198.18.2.7/24".into(), "junk".into()],
                    latest_handshake: Some(1_700_000_000),
                    rx_bytes: 1,
                    tx_bytes: 2,
                    persistent_keepalive: 25,
                },
                DevicePeerStatus {
                    node: None,
                    public_key: PublicKey::from_bytes([3; 32]),
                    endpoint: None,
                    allowed_ips: vec![],
                    latest_handshake: Some(0),
                    rx_bytes: 0,
                    tx_bytes: 0,
                    persistent_keepalive: 0,
                },
            ],
        };
        let st = device_from_agent(&d);
        assert_eq!(st.public_key, d.public_key);
        assert_eq!(st.listen_port, 51820);
        let b = &st.peers[&PublicKey::from_bytes([2; 32])];
        assert_eq!(b.endpoint, Some("192.0.2.2:51820".parse().unwrap()));
        assert_eq!(b.allowed_ips, ["198.18.2.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!(
            b.last_handshake,
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        assert_eq!((b.rx_bytes, b.tx_bytes, b.keepalive), (1, 2, 25));
        let c = &st.peers[&PublicKey::from_bytes([3; 32])];
        assert_eq!(c.last_handshake, None, "0 means never");
        assert_eq!(c.endpoint, None);
    }

    #[test]
    fn http_responses_are_parsed() {
        /// Name, raw answer, expected (code, body) or an error.
        type Case = (&'static str, &'static [u8], Option<(u16, &'static [u8])>);
        let cases: Vec<Case> = vec![
            (
                "content-length",
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}trailing",
                Some((200, b"{}")),
            ),
            (
                "chunked",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
                Some((200, b"abcde")),
            ),
            (
                "until close",
                b"HTTP/1.0 503 Service Unavailable\r\n\r\nstarting\n",
                Some((503, b"starting\n")),
            ),
            ("no end of headers", b"HTTP/1.1 200 OK\r\n", None),
            ("not http", b"SSH-2.0-OpenSSH\r\n\r\n", None),
            (
                "short body",
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
                None,
            ),
            (
                "truncated chunk",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nabc",
                None,
            ),
        ];
        for (name, raw, want) in cases {
            let got = parse_http_response(raw);
            match want {
                Some((code, body)) => {
                    assert_eq!(got, Ok((code, body.to_vec())), "{name}");
                }
                None => assert!(got.is_err(), "{name}: {got:?}"),
            }
        }
    }

    #[test]
    fn agent_answers_are_classified() {
        assert!(matches!(
            agent_answer(503, b"starting\n"),
            AgentAnswer::NotReady(m) if m == "HTTP 503: starting"
        ));
        assert!(matches!(agent_answer(200, b"{}"), AgentAnswer::NotReady(_)));
    }

    #[test]
    fn an_unreachable_agent_is_an_error() {
        // A port nobody listens on: bind, learn the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = fetch_agent_status(&format!("127.0.0.1:{port}"), Duration::from_secs(1));
        assert!(err.is_err());
    }

    #[test]
    fn a_missing_pin_directory_means_no_datapath() {
        let dir = tempfile::tempdir().unwrap();
        // Outside bpffs: an error that says so, not "no datapath".
        assert!(read_datapath(dir.path()).is_err());
    }
}
