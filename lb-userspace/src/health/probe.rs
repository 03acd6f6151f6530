//! One check, once: a TCP connect, an HTTP GET, or a UDP request and reply, within the
//! check's timeout. A probe that goes through the tunnel carries a socket mark, which
//! the `hc_encap` program on the LB's interface turns into the backend's encapsulation.
use std::{io, net::SocketAddr, time::Duration};

use socket2::{Domain, Protocol as SockProto, Socket, Type};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream, UdpSocket},
};

use crate::config::{Check, CheckKind};

/// Where and how to probe one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub check: Check,
    /// The backend's address (direct) or the VIP's (tunnel), with the check's port.
    pub dst: SocketAddr,
    /// The socket mark that sends the probe through the tunnel to this one backend.
    pub mark: Option<u32>,
}

/// Run the probe: `Ok` if it passed, else why not, in an operator's words ("connection
/// refused", "timeout after 500 ms", "status 503", "reply mismatch").
pub async fn run(p: &Probe) -> Result<(), String> {
    let t = p.check.timeout;
    match tokio::time::timeout(t, attempt(p)).await {
        Ok(r) => r,
        Err(_) => Err(format!("timeout after {} ms", t.as_millis())),
    }
}

async fn attempt(p: &Probe) -> Result<(), String> {
    match p.check.kind {
        CheckKind::None => Ok(()),
        CheckKind::Tcp => connect(p).await.map(drop),
        CheckKind::Http => http(p).await,
        CheckKind::Udp => udp(p).await,
    }
}

fn words(e: io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "connection refused".into(),
        Some(libc::ENETUNREACH) => "network unreachable".into(),
        Some(libc::EHOSTUNREACH) => "host unreachable".into(),
        Some(libc::ECONNRESET) => "connection reset".into(),
        _ => e.to_string(),
    }
}

/// A non-blocking socket (close-on-exec: socket2 sets it) carrying the probe's mark: two
/// system calls, which at 1,000 checks a second is worth counting.
fn socket(p: &Probe, ty: Type, proto: SockProto) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(p.dst), ty.nonblocking(), Some(proto))?;
    if let Some(m) = p.mark {
        s.set_mark(m)?;
    }
    Ok(s)
}

async fn connect(p: &Probe) -> Result<TcpStream, String> {
    let s = socket(p, Type::STREAM, SockProto::TCP).map_err(words)?;
    let s = TcpSocket::from_std_stream(s.into());
    s.connect(p.dst).await.map_err(words)
}

async fn http(p: &Probe) -> Result<(), String> {
    let mut s = connect(p).await?;
    let host = p.check.host.clone().unwrap_or_else(|| match p.dst {
        SocketAddr::V6(a) => format!("[{}]", a.ip()),
        SocketAddr::V4(a) => a.ip().to_string(),
    });
    let req = format!(
        "GET {} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: lb-health-check\r\nConnection: close\r\n\r\n",
        p.check.path
    );
    s.write_all(req.as_bytes()).await.map_err(words)?;
    // The status line is all it takes: "HTTP/1.1 200 OK".
    let mut buf = Vec::with_capacity(64);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 1024 {
        let n = s.read(&mut chunk).await.map_err(words)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| "no HTTP status line".to_string())?;
    if p.check
        .status
        .iter()
        .any(|&(a, b)| (a..=b).contains(&status))
    {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}

async fn udp(p: &Probe) -> Result<(), String> {
    let s = socket(p, Type::DGRAM, SockProto::UDP).map_err(words)?;
    let s = UdpSocket::from_std(s.into()).map_err(words)?;
    s.connect(p.dst).await.map_err(words)?;
    s.send(&p.check.payload).await.map_err(words)?;
    let mut buf = vec![0u8; 2048];
    let n = s.recv(&mut buf).await.map_err(words)?;
    match &p.check.expect {
        Some(want)
            if !buf[..n]
                .windows(want.len().max(1))
                .any(|w| w == want.as_slice()) =>
        {
            Err("reply mismatch".into())
        }
        _ => Ok(()),
    }
}

/// How long until the next check of a backend: `fastinter` while it is changing state.
pub fn next_in(c: &Check, changing: bool) -> Duration {
    if changing {
        c.fastinter
    } else {
        c.interval
    }
}
