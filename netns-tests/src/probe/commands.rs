//! The subcommands of `wgmesh-probe`. Each prints structured JSON on stdout (one object per
//! line) so the harness never scrapes human output; diagnostics go to stderr.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use serde::Serialize;

use super::{
    Datagram, Listening, StreamLine, StreamProgress, TcpRequestReport, TcpStreamReport,
    UdpPingReport, hex_decode, hex_encode,
};
use crate::http;

#[derive(Debug, Parser)]
#[command(
    name = "wgmesh-probe",
    about = "Traffic helper for wgmesh netns tests (run inside a namespace)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Accept TCP connections and echo what arrives until the client closes.
    TcpEcho {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Echo UDP datagrams back to their sender.
    UdpEcho {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Print every received UDP datagram as a JSON line.
    UdpRecv {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Send UDP datagrams.
    UdpSend {
        #[arg(long)]
        to: SocketAddr,
        /// Payload as text.
        #[arg(long, conflicts_with = "payload_hex")]
        payload: Option<String>,
        #[arg(long)]
        payload_hex: Option<String>,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long)]
        broadcast: bool,
    },
    /// Send COUNT sequence-numbered datagrams to a udp-echo and count the echoes.
    UdpPing {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 10)]
        count: u64,
        /// Milliseconds between datagrams.
        #[arg(long, default_value_t = 100)]
        interval: u64,
        /// How long to wait for the last echoes, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        timeout: u64,
    },
    /// Connect, send the payload, half-close, read the reply to EOF.
    TcpRequest {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value = "ping")]
        payload: String,
        #[arg(long, default_value_t = 5000)]
        timeout: u64,
    },
    /// Keep a TCP connection to a tcp-echo busy with sequence-numbered chunks, checking each
    /// echo, until DURATION seconds pass or SIGTERM/SIGINT arrives; print progress lines and a
    /// final result line.
    TcpStream {
        #[arg(long)]
        to: SocketAddr,
        /// Seconds; without it, run until SIGTERM.
        #[arg(long)]
        duration: Option<f64>,
        /// Milliseconds between chunks.
        #[arg(long, default_value_t = 10)]
        interval: u64,
        /// Bytes per chunk (at least 8: the sequence number).
        #[arg(long, default_value_t = 256)]
        chunk: usize,
        #[arg(long, default_value_t = 5000)]
        connect_timeout: u64,
    },
    /// Classify a pcap file as the harness does and print the summary and offenders.
    PcapSummary { file: std::path::PathBuf },
    /// GET an http:// URL and print the body (exit 1 on a non-2xx status).
    HttpGet {
        url: String,
        #[arg(long, default_value_t = 5000)]
        timeout: u64,
    },
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::TcpEcho { listen } => tcp_echo(listen),
        Command::UdpEcho { listen } => udp_echo(listen),
        Command::UdpRecv { listen } => udp_recv(listen),
        Command::UdpSend {
            to,
            payload,
            payload_hex,
            count,
            broadcast,
        } => {
            let data = match (payload, payload_hex) {
                (_, Some(h)) => hex_decode(&h)?,
                (Some(p), None) => p.into_bytes(),
                (None, None) => b"wgmesh-probe".to_vec(),
            };
            udp_send(to, &data, count, broadcast)
        }
        Command::UdpPing {
            to,
            count,
            interval,
            timeout,
        } => print_json(&udp_ping(
            to,
            count,
            Duration::from_millis(interval),
            Duration::from_millis(timeout),
        )?),
        Command::TcpRequest {
            to,
            payload,
            timeout,
        } => print_json(&tcp_request(
            to,
            payload.as_bytes(),
            Duration::from_millis(timeout),
        )?),
        Command::TcpStream {
            to,
            duration,
            interval,
            chunk,
            connect_timeout,
        } => tcp_stream(
            to,
            duration.map(Duration::from_secs_f64),
            Duration::from_millis(interval),
            chunk.max(8),
            Duration::from_millis(connect_timeout),
        ),
        Command::PcapSummary { file } => {
            let s = crate::capture::summarize_file(&file, b"wgmesh-capture-marker")?;
            println!("{s}");
            for o in &s.offenders {
                println!("  {o}");
            }
            Ok(())
        }
        Command::HttpGet { url, timeout } => http_get(&url, Duration::from_millis(timeout)),
    }
}

fn print_json(v: &impl Serialize) -> Result<()> {
    let line = serde_json::to_string(v).context("failed to encode output")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").context("failed to write stdout")?;
    out.flush().context("failed to flush stdout")
}

fn unspecified_for(to: SocketAddr) -> SocketAddr {
    if to.is_ipv4() {
        "0.0.0.0:0".parse()
    } else {
        "[::]:0".parse()
    }
    .expect("literal address")
}

fn tcp_echo(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("failed to bind {listen}"))?;
    print_json(&Listening {
        listening: listener.local_addr()?.to_string(),
    })?;
    for conn in listener.incoming() {
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                eprintln!("accept failed: {e}");
                continue;
            }
        };
        thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if let Err(e) = conn.write_all(&buf[..n]) {
                            eprintln!("echo write failed: {e}");
                            return;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        eprintln!("echo read failed: {e}");
                        return;
                    }
                }
            }
            if let Err(e) = conn.shutdown(std::net::Shutdown::Write) {
                eprintln!("shutdown failed: {e}");
            }
        });
    }
    Ok(())
}

fn udp_echo(listen: SocketAddr) -> Result<()> {
    let sock = UdpSocket::bind(listen).with_context(|| format!("failed to bind {listen}"))?;
    print_json(&Listening {
        listening: sock.local_addr()?.to_string(),
    })?;
    let mut buf = [0u8; 65536];
    loop {
        let (n, from) = sock.recv_from(&mut buf).context("recv failed")?;
        if let Err(e) = sock.send_to(&buf[..n], from) {
            eprintln!("echo to {from} failed: {e}");
        }
    }
}

fn udp_recv(listen: SocketAddr) -> Result<()> {
    let sock = UdpSocket::bind(listen).with_context(|| format!("failed to bind {listen}"))?;
    print_json(&Listening {
        listening: sock.local_addr()?.to_string(),
    })?;
    let mut buf = [0u8; 65536];
    loop {
        let (n, from) = sock.recv_from(&mut buf).context("recv failed")?;
        print_json(&Datagram {
            from: from.to_string(),
            data_hex: hex_encode(&buf[..n]),
        })?;
    }
}

fn udp_send(to: SocketAddr, data: &[u8], count: u32, broadcast: bool) -> Result<()> {
    let sock = UdpSocket::bind(unspecified_for(to)).context("failed to bind")?;
    sock.set_broadcast(broadcast)
        .context("failed to set SO_BROADCAST")?;
    for _ in 0..count {
        sock.send_to(data, to)
            .with_context(|| format!("failed to send to {to}"))?;
    }
    Ok(())
}

/// Payload: 8-byte run id, 8-byte sequence number.
fn udp_ping(
    to: SocketAddr,
    count: u64,
    interval: Duration,
    timeout: Duration,
) -> Result<UdpPingReport> {
    let sock = UdpSocket::bind(unspecified_for(to)).context("failed to bind")?;
    sock.connect(to)
        .with_context(|| format!("failed to connect to {to}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .context("set timeout")?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let run_id: u64 = (u64::from(std::process::id()) << 32) | u64::from(nanos);
    let sent_at: Vec<Mutex<Option<Instant>>> = (0..count).map(|_| Mutex::new(None)).collect();
    let mut rtts: Vec<Option<Duration>> = vec![None; usize::try_from(count).context("count")?];
    let start = Instant::now();
    let mut next_send = 0u64;
    let mut last_send = start;
    let mut buf = [0u8; 64];
    loop {
        let now = Instant::now();
        if next_send < count && (next_send == 0 || now >= last_send + interval) {
            let mut msg = [0u8; 16];
            msg[..8].copy_from_slice(&run_id.to_be_bytes());
            msg[8..].copy_from_slice(&next_send.to_be_bytes());
            if let Ok(mut t) = sent_at[usize::try_from(next_send).context("seq")?].lock() {
                *t = Some(now);
            }
            // ECONNREFUSED from an earlier ICMP error is reported on a later send: the
            // datagram counts as sent (and lost).
            if let Err(e) = sock.send(&msg) {
                eprintln!("send {next_send} failed: {e}");
            }
            next_send += 1;
            last_send = now;
        }
        let received = rtts.iter().filter(|r| r.is_some()).count() as u64;
        if next_send == count && (received == count || now >= last_send + timeout) {
            break;
        }
        match sock.recv(&mut buf) {
            Ok(16) if buf[..8] == run_id.to_be_bytes() => {
                let seq = u64::from_be_bytes(buf[8..16].try_into().expect("8 bytes"));
                let i = usize::try_from(seq).unwrap_or(usize::MAX);
                if let (Some(slot @ None), Some(sent)) = (rtts.get_mut(i), sent_at.get(i)) {
                    *slot = sent.lock().ok().and_then(|t| *t).map(|t| t.elapsed());
                }
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock
                        | ErrorKind::TimedOut
                        | ErrorKind::ConnectionRefused
                        | ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e).context("recv failed"),
        }
    }
    let got: Vec<Duration> = rtts.iter().flatten().copied().collect();
    let received = got.len() as u64;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Ok(UdpPingReport {
        sent: count,
        received,
        lost: count - received,
        rtt_avg_ms: if got.is_empty() {
            0.0
        } else {
            got.iter().map(|d| ms(*d)).sum::<f64>() / got.len() as f64
        },
        rtt_max_ms: got.iter().map(|d| ms(*d)).fold(0.0, f64::max),
    })
}

fn tcp_request(to: SocketAddr, payload: &[u8], timeout: Duration) -> Result<TcpRequestReport> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&to, timeout)
        .with_context(|| format!("failed to connect to {to}"))?;
    s.set_read_timeout(Some(timeout)).context("set timeout")?;
    s.set_write_timeout(Some(timeout)).context("set timeout")?;
    s.write_all(payload).context("failed to send")?;
    s.shutdown(std::net::Shutdown::Write)
        .context("failed to half-close")?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)
        .context("failed to read the reply")?;
    Ok(TcpRequestReport {
        reply: String::from_utf8_lossy(&reply).into_owned(),
        elapsed_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

fn http_get(url: &str, timeout: Duration) -> Result<()> {
    let (host, path) = http::split_url(url)?;
    let addr: SocketAddr = host
        .parse()
        .with_context(|| format!("{host:?} is not an IP:port"))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("failed to connect to {addr}"))?;
    s.set_read_timeout(Some(timeout)).context("set timeout")?;
    let resp = http::send(
        &mut s,
        &http::Request {
            method: "GET",
            host,
            path,
            content_type: None,
            body: None,
        },
    )?;
    if !resp.is_success() {
        bail!(
            "GET {url} returned {}: {}",
            resp.status,
            resp.body_text().trim()
        );
    }
    std::io::stdout()
        .write_all(&resp.body)
        .context("failed to write stdout")?;
    Ok(())
}

/// Blocks SIGTERM and SIGINT in this thread (and so in every thread spawned later) and returns
/// a flag that a dedicated thread sets when one arrives.
pub fn stop_flag_on_signal() -> Result<Arc<AtomicBool>> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block().context("failed to block signals")?;
    let flag = Arc::new(AtomicBool::new(false));
    let f = Arc::clone(&flag);
    thread::spawn(move || {
        if set.wait().is_ok() {
            f.store(true, Ordering::SeqCst);
        }
    });
    Ok(flag)
}

#[derive(Default)]
struct Shared {
    chunks_sent: AtomicU64,
    write_error: Mutex<Option<std::io::Error>>,
}

fn is_reset(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
    )
}

fn tcp_stream(
    to: SocketAddr,
    duration: Option<Duration>,
    interval: Duration,
    chunk: usize,
    connect_timeout: Duration,
) -> Result<()> {
    let stop = stop_flag_on_signal()?;
    let start = Instant::now();
    let conn = TcpStream::connect_timeout(&to, connect_timeout)
        .with_context(|| format!("failed to connect to {to}"))?;
    conn.set_nodelay(true).context("nodelay")?;
    conn.set_read_timeout(Some(Duration::from_millis(50)))
        .context("set timeout")?;
    conn.set_write_timeout(Some(Duration::from_millis(200)))
        .context("set timeout")?;
    let shared = Arc::new(Shared::default());
    let stop_writing = Arc::new(AtomicBool::new(false));
    let writer = {
        let mut conn = conn.try_clone().context("failed to clone the socket")?;
        let (shared, stop_writing) = (Arc::clone(&shared), Arc::clone(&stop_writing));
        thread::spawn(move || {
            let mut seq = 0u64;
            let mut buf = vec![0u8; chunk];
            while !stop_writing.load(Ordering::SeqCst) {
                buf[..8].copy_from_slice(&seq.to_be_bytes());
                buf[8..].fill(u8::try_from(seq % 251).expect("below 256"));
                let mut off = 0;
                while off < buf.len() {
                    match conn.write(&buf[off..]) {
                        Ok(0) => off = buf.len(),
                        Ok(n) => off += n,
                        // A full send buffer is a stall, not a failure: keep trying.
                        Err(e)
                            if matches!(
                                e.kind(),
                                ErrorKind::WouldBlock
                                    | ErrorKind::TimedOut
                                    | ErrorKind::Interrupted
                            ) =>
                        {
                            if stop_writing.load(Ordering::SeqCst) && off == 0 {
                                return;
                            }
                        }
                        Err(e) => {
                            if let Ok(mut w) = shared.write_error.lock() {
                                *w = Some(e);
                            }
                            return;
                        }
                    }
                }
                seq += 1;
                shared.chunks_sent.store(seq, Ordering::SeqCst);
                thread::sleep(interval);
            }
        })
    };

    let mut report = TcpStreamReport::default();
    let mut reader = conn;
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut expected = 0u64;
    let mut last_progress = Instant::now();
    let mut last_line = Instant::now();
    let mut draining_since: Option<Instant> = None;
    loop {
        let sent = shared.chunks_sent.load(Ordering::SeqCst);
        let want_stop =
            stop.load(Ordering::SeqCst) || duration.is_some_and(|d| start.elapsed() >= d);
        if want_stop && draining_since.is_none() {
            stop_writing.store(true, Ordering::SeqCst);
            draining_since = Some(Instant::now());
        }
        if let Some(since) = draining_since {
            // After the writer stopped, wait (up to 3 s) for the outstanding echoes.
            if writer.is_finished() && expected >= shared.chunks_sent.load(Ordering::SeqCst) {
                break;
            }
            if since.elapsed() > Duration::from_secs(3) {
                break;
            }
        }
        if let Some(e) = shared.write_error.lock().ok().and_then(|mut w| w.take()) {
            report.reset |= is_reset(e.kind());
            report.error = Some(format!("write: {e}"));
            break;
        }
        if expected >= sent {
            // Nothing outstanding: not a stall.
            last_progress = Instant::now();
        }
        match reader.read(&mut buf) {
            Ok(0) => {
                report.closed = true;
                break;
            }
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                report.bytes_received += n as u64;
                while pending.len() >= chunk {
                    let seq = u64::from_be_bytes(pending[..8].try_into().expect("8 bytes"));
                    let fill = u8::try_from(seq % 251).expect("below 256");
                    if seq != expected || pending[8..chunk].iter().any(|b| *b != fill) {
                        report.out_of_order = true;
                    }
                    expected = seq + 1;
                    pending.drain(..chunk);
                }
                let stall = last_progress.elapsed();
                report.max_stall_ms = report
                    .max_stall_ms
                    .max(u64::try_from(stall.as_millis()).unwrap_or(u64::MAX));
                last_progress = Instant::now();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                let stall = last_progress.elapsed();
                report.max_stall_ms = report
                    .max_stall_ms
                    .max(u64::try_from(stall.as_millis()).unwrap_or(u64::MAX));
            }
            Err(e) => {
                report.reset |= is_reset(e.kind());
                report.error = Some(format!("read: {e}"));
                break;
            }
        }
        if last_line.elapsed() >= Duration::from_millis(200) {
            last_line = Instant::now();
            print_json(&StreamLine::Progress(StreamProgress {
                bytes_sent: shared.chunks_sent.load(Ordering::SeqCst) * chunk as u64,
                bytes_received: report.bytes_received,
                chunks_received: expected,
            }))?;
        }
    }
    stop_writing.store(true, Ordering::SeqCst);
    if writer.join().is_err() {
        report
            .error
            .get_or_insert_with(|| "writer thread panicked".to_owned());
    }
    report.chunks_sent = shared.chunks_sent.load(Ordering::SeqCst);
    report.bytes_sent = report.chunks_sent * chunk as u64;
    report.chunks_received = expected;
    report.duration_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    print_json(&StreamLine::Result(report))
}
