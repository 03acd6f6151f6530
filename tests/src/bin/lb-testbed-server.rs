//! The real server of a testbed backend (see `lb_tests::testbed`): run inside the backend's
//! namespace, where the VIPs are local addresses on `lo`, it listens on the wildcard
//! addresses, so it answers on every VIP at once, and replies from the VIP the request was
//! sent to (direct server return: the reply goes straight to the client).
//!
//! ```text
//! lb-testbed-server --name be1 [--testbed PREFIX] [--tcp PORT]... [--udp PORT]...
//! ```
//!
//! - TCP: HTTP/1.1 (keep-alive unless `Connection: close`).
//!   `GET /` → 200, body `"<name>\nvip <vip:port>\nclient <addr:port>\n"`, header
//!   `X-Backend: <name>`. `GET /bytes?n=N` → N bytes of [`lb_tests::testbed::fill_pattern`].
//!   `GET /healthz` → `ok`. Anything else: 404 (405 for other methods).
//! - UDP echo: a datagram `P` is answered with `"<name> " + P`, from the address it was sent
//!   to (`IP_PKTINFO` / `IPV6_PKTINFO`; `IP_FREEBIND`, since VIPs may be routed to `lo`
//!   without being assigned).
//!
//! `--testbed` only marks the process (its command line) as belonging to that testbed.
use std::{
    io::{BufRead, BufReader, Write},
    mem::{size_of, zeroed},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    thread,
};

use anyhow::{bail, Context, Result};
use lb_tests::testbed::fill_pattern;

fn usage() -> ! {
    eprintln!(
        "usage: lb-testbed-server --name NAME [--testbed PREFIX] [--tcp PORT]... [--udp PORT]..."
    );
    std::process::exit(2)
}

fn main() -> Result<()> {
    let mut name = None;
    let (mut tcp, mut udp) = (Vec::new(), Vec::new());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--name" => name = Some(val()),
            "--testbed" => drop(val()),
            "--tcp" => tcp.push(val().parse::<u16>().context("--tcp")?),
            "--udp" => udp.push(val().parse::<u16>().context("--udp")?),
            _ => usage(),
        }
    }
    let name = name.unwrap_or_else(|| usage());
    let mut threads = Vec::new();
    for port in tcp {
        // [::] is dual-stack (net.ipv6.bindv6only = 0): IPv4 clients too.
        let l = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
            .with_context(|| format!("binding tcp [::]:{port}"))?;
        let name = name.clone();
        threads.push(thread::spawn(move || {
            for s in l.incoming().flatten() {
                let name = name.clone();
                thread::spawn(move || {
                    let _ = serve_http(s, &name);
                });
            }
        }));
    }
    for port in udp {
        for six in [false, true] {
            let fd = udp_socket(six, port)?;
            let name = name.clone();
            threads.push(thread::spawn(move || {
                if let Err(e) = serve_udp(fd, six, &name) {
                    eprintln!("udp {port}: {e:#}");
                    std::process::exit(1);
                }
            }));
        }
    }
    eprintln!("{name}: serving");
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// HTTP

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn serve_http(stream: TcpStream, name: &str) -> Result<()> {
    let local = canonical(stream.local_addr()?);
    let peer = canonical(stream.peer_addr()?);
    let mut out = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, target, version) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        let mut close = version != "HTTP/1.1";
        loop {
            let mut h = String::new();
            if r.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("connection") {
                    close = v.trim().eq_ignore_ascii_case("close");
                }
            }
        }
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let head = |status: &str, len: u64| {
            format!(
                "HTTP/1.1 {status}\r\nContent-Length: {len}\r\nContent-Type: text/plain\r\n\
                 X-Backend: {name}\r\nConnection: {}\r\n\r\n",
                if close { "close" } else { "keep-alive" }
            )
        };
        if method != "GET" {
            out.write_all(head("405 Method Not Allowed", 0).as_bytes())?;
        } else if path == "/" {
            let body = format!("{name}\nvip {local}\nclient {peer}\n");
            out.write_all((head("200 OK", body.len() as u64) + &body).as_bytes())?;
        } else if path == "/healthz" {
            out.write_all((head("200 OK", 3) + "ok\n").as_bytes())?;
        } else if let Some(n) = (path == "/bytes")
            .then(|| query.strip_prefix("n="))
            .flatten()
            .and_then(|n| n.parse::<u64>().ok())
        {
            out.write_all(head("200 OK", n).as_bytes())?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut off = 0;
            while off < n {
                let k = (n - off).min(buf.len() as u64) as usize;
                fill_pattern(off, &mut buf[..k]);
                out.write_all(&buf[..k])?;
                off += k as u64;
            }
        } else {
            out.write_all(head("404 Not Found", 0).as_bytes())?;
        }
        out.flush()?;
        if close {
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------------------------------
// UDP echo, replying from the address the datagram was sent to

fn check(r: libc::c_int, what: &str) -> Result<libc::c_int> {
    if r < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(r)
}

fn setsockopt(fd: &OwnedFd, level: libc::c_int, opt: libc::c_int, what: &str) -> Result<()> {
    let one: libc::c_int = 1;
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            &one as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as u32,
        )
    };
    check(r, what).map(drop)
}

fn udp_socket(six: bool, port: u16) -> Result<OwnedFd> {
    let family = if six { libc::AF_INET6 } else { libc::AF_INET };
    let fd = check(
        unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) },
        "socket",
    )?;
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let r = if six {
        setsockopt(
            &fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_FREEBIND,
            "IPV6_FREEBIND",
        )?;
        setsockopt(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, "IPV6_V6ONLY")?;
        setsockopt(
            &fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_RECVPKTINFO,
            "IPV6_RECVPKTINFO",
        )?;
        let mut sa: libc::sockaddr_in6 = unsafe { zeroed() };
        sa.sin6_family = libc::AF_INET6 as u16;
        sa.sin6_port = port.to_be();
        unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const _ as *const libc::sockaddr,
                size_of::<libc::sockaddr_in6>() as u32,
            )
        }
    } else {
        setsockopt(&fd, libc::IPPROTO_IP, libc::IP_FREEBIND, "IP_FREEBIND")?;
        setsockopt(&fd, libc::IPPROTO_IP, libc::IP_PKTINFO, "IP_PKTINFO")?;
        let mut sa: libc::sockaddr_in = unsafe { zeroed() };
        sa.sin_family = libc::AF_INET as u16;
        sa.sin_port = port.to_be();
        unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const _ as *const libc::sockaddr,
                size_of::<libc::sockaddr_in>() as u32,
            )
        }
    };
    check(
        r,
        &format!(
            "binding udp {}:{port}",
            if six { "[::]" } else { "0.0.0.0" }
        ),
    )?;
    Ok(fd)
}

/// Control buffer, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct Cmsg([u8; 256]);

fn serve_udp(fd: OwnedFd, six: bool, name: &str) -> Result<()> {
    let mut buf = vec![0u8; 65536];
    loop {
        let mut src: libc::sockaddr_storage = unsafe { zeroed() };
        let mut ctl = Cmsg([0; 256]);
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let mut msg: libc::msghdr = unsafe { zeroed() };
        msg.msg_name = &mut src as *mut _ as *mut libc::c_void;
        msg.msg_namelen = size_of::<libc::sockaddr_storage>() as u32;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = ctl.0.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = ctl.0.len();
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            bail!("recvmsg: {e}");
        }
        let mut dst: Option<IpAddr> = None;
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                let data = libc::CMSG_DATA(c);
                if (*c).cmsg_level == libc::IPPROTO_IP && (*c).cmsg_type == libc::IP_PKTINFO {
                    let pi = std::ptr::read_unaligned(data as *const libc::in_pktinfo);
                    dst = Some(Ipv4Addr::from(u32::from_be(pi.ipi_addr.s_addr)).into());
                } else if (*c).cmsg_level == libc::IPPROTO_IPV6
                    && (*c).cmsg_type == libc::IPV6_PKTINFO
                {
                    let pi = std::ptr::read_unaligned(data as *const libc::in6_pktinfo);
                    dst = Some(Ipv6Addr::from(pi.ipi6_addr.s6_addr).into());
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        let mut reply = format!("{name} ").into_bytes();
        reply.extend_from_slice(&buf[..n as usize]);
        // Reply from `dst`: a pktinfo control message naming the source address.
        let mut ctl = Cmsg([0; 256]);
        let mut iov = libc::iovec {
            iov_base: reply.as_mut_ptr() as *mut libc::c_void,
            iov_len: reply.len(),
        };
        let mut out: libc::msghdr = unsafe { zeroed() };
        out.msg_name = &mut src as *mut _ as *mut libc::c_void;
        out.msg_namelen = msg.msg_namelen;
        out.msg_iov = &mut iov;
        out.msg_iovlen = 1;
        if let Some(dst) = dst {
            out.msg_control = ctl.0.as_mut_ptr() as *mut libc::c_void;
            unsafe {
                let (level, kind, len) = if six {
                    (
                        libc::IPPROTO_IPV6,
                        libc::IPV6_PKTINFO,
                        size_of::<libc::in6_pktinfo>(),
                    )
                } else {
                    (
                        libc::IPPROTO_IP,
                        libc::IP_PKTINFO,
                        size_of::<libc::in_pktinfo>(),
                    )
                };
                out.msg_controllen = libc::CMSG_SPACE(len as u32) as usize;
                let c = libc::CMSG_FIRSTHDR(&out);
                (*c).cmsg_level = level;
                (*c).cmsg_type = kind;
                (*c).cmsg_len = libc::CMSG_LEN(len as u32) as usize;
                let data = libc::CMSG_DATA(c);
                match dst {
                    IpAddr::V4(a) => {
                        let pi = libc::in_pktinfo {
                            ipi_ifindex: 0,
                            ipi_spec_dst: libc::in_addr {
                                s_addr: u32::from(a).to_be(),
                            },
                            ipi_addr: libc::in_addr { s_addr: 0 },
                        };
                        std::ptr::write_unaligned(data as *mut libc::in_pktinfo, pi);
                    }
                    IpAddr::V6(a) => {
                        let pi = libc::in6_pktinfo {
                            ipi6_addr: libc::in6_addr {
                                s6_addr: a.octets(),
                            },
                            ipi6_ifindex: 0,
                        };
                        std::ptr::write_unaligned(data as *mut libc::in6_pktinfo, pi);
                    }
                }
            }
        }
        if unsafe { libc::sendmsg(fd.as_raw_fd(), &out, 0) } < 0 {
            eprintln!("sendmsg: {}", std::io::Error::last_os_error());
        }
    }
}
