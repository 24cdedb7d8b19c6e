//! A simulated pod: a network namespace with `eth0` = 198.18.i.(10+j)/32 and a default route
//! via the node's pod gateway 198.18.i.1, reached through a `veth<j>` on the node (the way
//! Calico-style CNIs wire pods). Traffic helpers run `wgmesh-probe` or `ping` inside it.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::Signal;

use crate::{
    cmd::Cmd,
    eventually::eventually,
    netns::NetNs,
    node::{Node, pod_gateway},
    probe::{
        Datagram, ProbeProcess, StreamLine, StreamProgress, TcpRequestReport, TcpStreamReport,
        UdpPingReport, hex_encode,
    },
    testbed::Context as BedContext,
};

/// Something traffic can be sent to: a pod, a node (its underlay address) or an address.
pub trait Destination {
    fn address(&self) -> IpAddr;
}

impl Destination for Pod {
    fn address(&self) -> IpAddr {
        self.ip().into()
    }
}

impl Destination for Node {
    fn address(&self) -> IpAddr {
        self.underlay_ip().into()
    }
}

impl Destination for IpAddr {
    fn address(&self) -> IpAddr {
        *self
    }
}

impl Destination for Ipv4Addr {
    fn address(&self) -> IpAddr {
        (*self).into()
    }
}

impl<T: Destination + ?Sized> Destination for &T {
    fn address(&self) -> IpAddr {
        (**self).address()
    }
}

/// A pod (cheap to clone: a shared handle).
#[derive(Debug, Clone)]
pub struct Pod(Arc<PodInner>);

#[derive(Debug)]
struct PodInner {
    name: String,
    node_name: String,
    index: u8,
    ip: Ipv4Addr,
    host_interface: String,
    ns: NetNs,
    ctx: Arc<BedContext>,
    /// `udp-recv` processes started by `udp_send` towards this pod, by port.
    receivers: Mutex<HashMap<u16, ProbeProcess>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Pod {
    pub(crate) fn create(node: &Node, name: &str, j: u8) -> Result<Self> {
        let ctx = Arc::clone(&node.0.ctx);
        let ns = NetNs::create(&format!("{}-p-{name}", ctx.prefix), ctx.keep)?;
        let i = node.index();
        let ip = Ipv4Addr::new(198, 18, i, 10 + j);
        let gw = pod_gateway(i);
        let host_interface = format!("veth{j}");
        // Created in the node namespace, peer straight into the pod's: never in the root ns.
        node.ip([
            "link",
            "add",
            &host_interface,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        node.ip(["link", "set", &host_interface, "up"])?;
        node.ip(["addr", "add", &format!("{gw}/32"), "dev", &host_interface])?;
        node.ip(["route", "add", &format!("{ip}/32"), "dev", &host_interface])?;
        ns.ip(["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        ns.ip(["link", "set", "eth0", "up"])?;
        ns.ip(["route", "add", &gw.to_string(), "dev", "eth0"])?;
        ns.ip([
            "route",
            "add",
            "default",
            "via",
            &gw.to_string(),
            "dev",
            "eth0",
        ])?;
        Ok(Self(Arc::new(PodInner {
            name: name.to_owned(),
            node_name: node.name().to_owned(),
            index: j,
            ip,
            host_interface,
            ns,
            ctx,
            receivers: Mutex::new(HashMap::new()),
        })))
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    pub fn node_name(&self) -> &str {
        &self.0.node_name
    }

    /// 1-based index on its node.
    pub fn index(&self) -> u8 {
        self.0.index
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.0.ip
    }

    /// `veth<j>` in the node namespace.
    pub fn host_interface(&self) -> &str {
        &self.0.host_interface
    }

    pub fn ns(&self) -> &str {
        self.0.ns.name()
    }

    pub fn netns(&self) -> &NetNs {
        &self.0.ns
    }

    /// A command inside the pod namespace.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Cmd {
        self.0.ns.cmd(program)
    }

    fn probe(&self) -> Result<Cmd> {
        Ok(self.cmd(self.0.ctx.probe()?))
    }

    pub(crate) fn delete(&self) -> Result<()> {
        lock(&self.0.receivers).clear();
        self.0.ns.delete()
    }

    // === ICMP ===

    /// `ping -c count` (0.2 s apart); loss is reported, not an error.
    pub fn ping(&self, dst: &impl Destination, count: u32) -> Result<PingReport> {
        ping(
            &self.cmd("ping"),
            dst.address(),
            count,
            Duration::from_millis(200),
        )
    }

    /// Pings every `interval` for `duration` in the background (for loss during an event).
    pub fn ping_flood(
        &self,
        dst: &impl Destination,
        interval: Duration,
        duration: Duration,
    ) -> Background<PingReport> {
        let cmd = self.cmd("ping");
        let dst = dst.address();
        let count = u32::try_from((duration.as_millis() / interval.as_millis().max(1)).max(1))
            .unwrap_or(u32::MAX);
        Background(thread::spawn(move || ping(&cmd, dst, count, interval)))
    }

    // === UDP ===

    /// A `udp-echo` server on `port` in this pod (stopped on drop).
    pub fn serve_udp_echo(&self, port: u16) -> Result<Server> {
        self.serve("udp-echo", port)
    }

    /// A `tcp-echo` server on `port` in this pod (stopped on drop).
    pub fn serve_tcp_echo(&self, port: u16) -> Result<Server> {
        self.serve("tcp-echo", port)
    }

    fn serve(&self, kind: &str, port: u16) -> Result<Server> {
        let listen = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
        let cmd = self.probe()?.args([kind, "--listen", &listen.to_string()]);
        let mut process = ProbeProcess::spawn(format!("{kind} in {}", self.name()), &cmd)?;
        process.wait_listening()?;
        Ok(Server {
            process,
            addr: SocketAddr::new(self.ip().into(), port),
        })
    }

    /// Starts (once per port) a `udp-recv` in this pod that records what arrives on `port`.
    pub fn udp_listen(&self, port: u16) -> Result<()> {
        let mut receivers = lock(&self.0.receivers);
        if receivers.contains_key(&port) {
            return Ok(());
        }
        let cmd = self
            .probe()?
            .args(["udp-recv", "--listen", &format!("0.0.0.0:{port}")]);
        let mut process = ProbeProcess::spawn(format!("udp-recv in {}", self.name()), &cmd)?;
        process.wait_listening()?;
        receivers.insert(port, process);
        Ok(())
    }

    /// Datagrams received on `port` so far (needs `udp_listen`, which `udp_send` to a pod does).
    pub fn udp_received(&self, port: u16) -> Result<Vec<Datagram>> {
        let receivers = lock(&self.0.receivers);
        let r = receivers
            .get(&port)
            .ok_or_else(|| anyhow!("{} does not listen on UDP {port}", self.name()))?;
        Ok(r.parsed())
    }

    /// Waits (up to 5 s) until a datagram with exactly `payload` arrived on `port`.
    pub fn expect_udp(&self, port: u16, payload: &[u8]) -> Result<Datagram> {
        let want = hex_encode(payload);
        eventually(
            &format!(
                "{} receives {:?} on UDP {port}",
                self.name(),
                String::from_utf8_lossy(payload)
            ),
            Duration::from_secs(5),
            || {
                let got = self.udp_received(port)?;
                got.iter()
                    .find(|d| d.data_hex == want)
                    .cloned()
                    .ok_or_else(|| anyhow!("received {} other datagrams", got.len()))
            },
        )
    }

    /// Sends one datagram to `dst:port`, first starting a receiver there (see `expect_udp`).
    pub fn udp_send(&self, dst: &Pod, port: u16, payload: &[u8]) -> Result<()> {
        dst.udp_listen(port)?;
        self.udp_send_to(SocketAddr::new(dst.ip().into(), port), payload)
    }

    /// Sends one datagram to any address (nothing listens unless the test arranged it).
    pub fn udp_send_to(&self, to: SocketAddr, payload: &[u8]) -> Result<()> {
        self.probe()?
            .args([
                "udp-send",
                "--to",
                &to.to_string(),
                "--payload-hex",
                &hex_encode(payload),
            ])
            .run()
            .map(drop)
    }

    /// `count` datagrams 20 ms apart to a `udp-echo` started on `dst` for the occasion.
    pub fn udp_ping(&self, dst: &Pod, port: u16, count: u32) -> Result<UdpPingReport> {
        let _server = dst.serve_udp_echo(port)?;
        self.udp_ping_addr(
            SocketAddr::new(dst.ip().into(), port),
            count,
            Duration::from_millis(20),
        )
    }

    /// `count` datagrams `interval` apart to an echo server at `to`.
    pub fn udp_ping_addr(
        &self,
        to: SocketAddr,
        count: u32,
        interval: Duration,
    ) -> Result<UdpPingReport> {
        let out = self
            .probe()?
            .args([
                "udp-ping",
                "--to",
                &to.to_string(),
                "--count",
                &count.to_string(),
            ])
            .args(["--interval", &interval.as_millis().to_string()])
            .timeout(interval * count + Duration::from_secs(30))
            .run()?;
        serde_json::from_str(out.trim()).with_context(|| format!("udp-ping printed {out:?}"))
    }

    // === TCP ===

    /// Sends `payload` to a `tcp-echo` started on `dst` and returns the reply.
    pub fn tcp_request(&self, dst: &Pod, port: u16, payload: &str) -> Result<String> {
        let _server = dst.serve_tcp_echo(port)?;
        Ok(self
            .tcp_request_addr(SocketAddr::new(dst.ip().into(), port), payload)?
            .reply)
    }

    /// One request/response to any TCP server that answers and closes.
    pub fn tcp_request_addr(&self, to: SocketAddr, payload: &str) -> Result<TcpRequestReport> {
        let out = self
            .probe()?
            .args(["tcp-request", "--to", &to.to_string(), "--payload", payload])
            .run()?;
        serde_json::from_str(out.trim()).with_context(|| format!("tcp-request printed {out:?}"))
    }

    /// A long-lived TCP connection to a `tcp-echo` on `dst:port`, kept busy with
    /// sequence-numbered chunks until `stop`.
    pub fn tcp_stream_to(&self, dst: &Pod, port: u16) -> Result<TcpFlow> {
        let server = dst.serve_tcp_echo(port)?;
        let cmd = self
            .probe()?
            .args(["tcp-stream", "--to", &server.addr.to_string()]);
        let client = ProbeProcess::spawn(
            format!("tcp-stream {} -> {}", self.name(), dst.name()),
            &cmd,
        )?;
        let flow = TcpFlow {
            client,
            _server: server,
            label: format!("{} -> {}", self.name(), dst.name()),
        };
        eventually(
            &format!("TCP stream {} carries data", flow.label),
            Duration::from_secs(10),
            || {
                if flow.progress().chunks_received > 0 {
                    Ok(())
                } else {
                    bail!("no echo yet: {}", flow.client.stderr().trim())
                }
            },
        )?;
        Ok(flow)
    }
}

pub(crate) fn ping(cmd: &Cmd, dst: IpAddr, count: u32, interval: Duration) -> Result<PingReport> {
    let secs = format!("{:.3}", interval.as_secs_f64());
    // No `-w` deadline: on a slow machine ping falls behind its interval, and a deadline would cut
    // off the last echo while its reply is in flight and count it as lost. `-c` ends the run once
    // every echo got its reply or its 1 s `-W` wait.
    let deadline = (interval * count).as_secs() * 3 + 15;
    let out = cmd
        .clone()
        .args(["-n", "-q", "-c", &count.to_string(), "-i", &secs, "-W", "1"])
        .arg(dst.to_string())
        .timeout(Duration::from_secs(deadline))
        .output()?;
    PingReport::parse(&out.stdout).with_context(|| format!("ping {dst}: {}", out.stderr.trim()))
}

/// `ping` summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingReport {
    pub transmitted: u32,
    pub received: u32,
}

impl PingReport {
    /// Parses `N packets transmitted, M received`.
    pub fn parse(out: &str) -> Result<Self> {
        let line = out
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .ok_or_else(|| anyhow!("no ping summary in {out:?}"))?;
        let num = |key: &str| -> Option<u32> {
            line.split(',')
                .find(|p| p.contains(key))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        };
        Ok(Self {
            transmitted: num("transmitted").ok_or_else(|| anyhow!("bad summary {line:?}"))?,
            received: num("received").ok_or_else(|| anyhow!("bad summary {line:?}"))?,
        })
    }

    pub fn lost(&self) -> u32 {
        self.transmitted.saturating_sub(self.received)
    }

    pub fn loss_percent(&self) -> f64 {
        if self.transmitted == 0 {
            100.0
        } else {
            100.0 * f64::from(self.lost()) / f64::from(self.transmitted)
        }
    }

    pub fn assert_no_loss(&self) -> Result<()> {
        if self.transmitted == 0 || self.lost() > 0 {
            bail!("ping lost {} of {}", self.lost(), self.transmitted);
        }
        Ok(())
    }
}

/// Work running on a harness thread; `wait` joins it.
#[derive(Debug)]
pub struct Background<T>(JoinHandle<Result<T>>);

impl<T> Background<T> {
    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }

    pub fn wait(self) -> Result<T> {
        self.0
            .join()
            .map_err(|_| anyhow!("background task panicked"))?
    }
}

/// A probe server in a pod; killed on drop.
#[derive(Debug)]
pub struct Server {
    process: ProbeProcess,
    addr: SocketAddr,
}

impl Server {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }
}

/// A running long-lived TCP stream (see `Pod::tcp_stream_to`).
#[derive(Debug)]
pub struct TcpFlow {
    client: ProbeProcess,
    _server: Server,
    label: String,
}

impl TcpFlow {
    /// The latest progress report.
    pub fn progress(&self) -> StreamProgress {
        self.client
            .parsed::<StreamLine>()
            .into_iter()
            .rev()
            .filter_map(|l| match l {
                StreamLine::Progress(p) => Some(p),
                StreamLine::Result(_) => None,
            })
            .next()
            .unwrap_or_default()
    }

    /// Whether the client still runs (it exits by itself only when the connection broke).
    pub fn is_running(&mut self) -> bool {
        self.client.is_running()
    }

    /// Waits until at least `more` echoed bytes beyond the current count arrived.
    pub fn assert_flowing(&self, more: u64, timeout: Duration) -> Result<()> {
        let base = self.progress().bytes_received;
        eventually(
            &format!("TCP stream {} carries {more} more bytes", self.label),
            timeout,
            || {
                let now = self.progress().bytes_received;
                if now >= base + more {
                    Ok(())
                } else {
                    bail!("{} of {more} bytes", now - base)
                }
            },
        )
    }

    /// Stops the client (SIGTERM) and returns its report.
    pub fn stop(mut self) -> Result<TcpStreamReport> {
        let lines = self.client.stop(Signal::SIGTERM, Duration::from_secs(10))?;
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<StreamLine>(l).ok())
            .find_map(|l| match l {
                StreamLine::Result(r) => Some(r),
                StreamLine::Progress(_) => None,
            })
            .ok_or_else(|| {
                anyhow!(
                    "tcp-stream {} printed no result; stderr: {}",
                    self.label,
                    self.client.stderr().trim()
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ping_summaries() {
        let out = "PING 198.18.2.11 (198.18.2.11) 56(84) bytes of data.\n\n--- 198.18.2.11 ping statistics ---\n5 packets transmitted, 4 received, 20% packet loss, time 803ms\n";
        let r = PingReport::parse(out).expect("parses");
        assert_eq!((r.transmitted, r.received, r.lost()), (5, 4, 1));
        assert!(r.assert_no_loss().is_err());
        let out = "3 packets transmitted, 0 received, +3 errors, 100% packet loss, time 2003ms";
        assert_eq!(PingReport::parse(out).expect("parses").received, 0);
    }
}
