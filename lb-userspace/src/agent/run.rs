//! The agent's event loop: the control socket, signals (SIGTERM/SIGINT exit leaving the
//! data plane attached, SIGHUP reloads) and requests, one at a time.
use std::path::Path;

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot},
};
use tracing::{info, warn};

use super::Agent;
use crate::api::{self, Request, Response};

type Job = (Request, oneshot::Sender<Response>);

/// Run the agent in the foreground until SIGTERM/SIGINT or a `Shutdown` request.
pub fn run(config: &Path, instance: &str) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // Signal handlers before the start (a migration, neighbour waits): a reload or a
        // stop that comes meanwhile waits for it instead of killing the agent halfway.
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut agent = Agent::start(config, instance)?;
        let sock = api::socket_path(instance);
        std::fs::create_dir_all(sock.parent().unwrap())?;
        let _ = std::fs::remove_file(&sock);
        // Only root may talk to the agent: the socket is created 0600.
        let old = unsafe { libc::umask(0o177) };
        let listener = UnixListener::bind(&sock);
        unsafe { libc::umask(old) };
        let listener = listener.with_context(|| format!("binding {}", sock.display()))?;
        let (tx, mut rx) = mpsc::channel::<Job>(16);
        let live = agent.events.sender();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tx = tx.clone();
                let live = live.clone();
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut lines = BufReader::new(r).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let mut follow = None;
                        let resp = match serde_json::from_str::<Request>(&line) {
                            Ok(req) => {
                                // Subscribe before asking for the recent ones: none is lost
                                // between the two.
                                if matches!(req, Request::Events { follow: true }) {
                                    follow = Some(live.subscribe());
                                }
                                let (otx, orx) = oneshot::channel();
                                if tx.send((req, otx)).await.is_err() {
                                    break;
                                }
                                orx.await
                                    .unwrap_or_else(|_| Response::err("agent is shutting down"))
                            }
                            Err(e) => Response::err(format!("bad request: {e}")),
                        };
                        let mut out = serde_json::to_string(&resp).unwrap();
                        out.push('\n');
                        if w.write_all(out.as_bytes()).await.is_err() {
                            break;
                        }
                        if let Some(mut events) = follow {
                            // Then every new event, a JSON line each, until the client goes.
                            use tokio::sync::broadcast::error::RecvError;
                            loop {
                                match events.recv().await {
                                    Ok(e) => {
                                        let mut out = serde_json::to_string(&e).unwrap();
                                        out.push('\n');
                                        if w.write_all(out.as_bytes()).await.is_err() {
                                            return;
                                        }
                                    }
                                    Err(RecvError::Lagged(_)) => continue,
                                    Err(RecvError::Closed) => return,
                                }
                            }
                        }
                    }
                });
            }
        });
        // Route, neighbour and address changes, heard on a thread of its own (the netlink
        // read blocks); several in a row make one re-resolution.
        let (kernel_tx, mut kernel_rx) = mpsc::channel::<()>(1);
        let monitor = crate::nexthop::Monitor::new()?;
        std::thread::spawn(move || loop {
            if let Err(e) = monitor.wait() {
                // ENOBUFS: the kernel dropped events (a burst of route changes); resync all.
                // Anything else: say so, and keep listening.
                let lost = e
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.raw_os_error() == Some(libc::ENOBUFS));
                if !lost {
                    warn!(error = %format!("{e:#}"), "netlink monitor");
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
            if kernel_tx.try_send(()).is_err() && kernel_tx.is_closed() {
                break;
            }
        });
        // The Prometheus endpoint: each scrape is answered by the event loop (which owns
        // the maps), between other work.
        let (scrape_tx, mut scrapes) = mpsc::channel::<oneshot::Sender<String>>(4);
        if let crate::config::Listen::At(addr) = agent.cfg.agent.metrics {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("agent.metrics: listening on {addr}"))?;
            info!(%addr, "metrics on http://{addr}/metrics");
            tokio::spawn(serve_metrics(listener, scrape_tx));
        }
        let mut tick = tokio::time::interval(crate::nexthop::TICK);
        let reports = agent.reports.clone();
        info!(socket = %sock.display(), "listening");
        loop {
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM: exiting, data plane stays attached"); break; }
                _ = int.recv() => { info!("SIGINT: exiting, data plane stays attached"); break; }
                _ = hup.recv() => agent.reload(),
                Some(()) = kernel_rx.recv() => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    while kernel_rx.try_recv().is_ok() {}
                    agent.kernel_changed();
                }
                _ = tick.tick() => agent.tick(),
                _ = reports.changed() => agent.drain_reports(),
                Some(reply) = scrapes.recv() => {
                    agent.drain_reports();
                    let _ = reply.send(agent.metrics_text());
                }
                Some((req, reply)) = rx.recv() => {
                    agent.drain_reports();
                    let shutdown = matches!(req, Request::Shutdown);
                    let _ = reply.send(agent.handle(req));
                    if shutdown {
                        info!("shutdown requested: exiting, data plane stays attached");
                        break;
                    }
                }
            }
        }
        // Let the last answer reach its client before the runtime goes.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let _ = std::fs::remove_file(&sock);
        agent.release();
        Ok(())
    })
}

/// `GET /metrics` (anything else: 404), one request per connection.
async fn serve_metrics(
    listener: tokio::net::TcpListener,
    scrapes: mpsc::Sender<oneshot::Sender<String>>,
) {
    while let Ok((stream, _)) = listener.accept().await {
        let scrapes = scrapes.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            let Ok(Some(request)) = lines.next_line().await else {
                return;
            };
            // The rest of the head.
            while let Ok(Some(l)) = lines.next_line().await {
                if l.is_empty() {
                    break;
                }
            }
            let mut parts = request.split_whitespace();
            let (method, path) = (parts.next(), parts.next().unwrap_or(""));
            let (status, ctype, body) =
                if method == Some("GET") && (path == "/metrics" || path.starts_with("/metrics?")) {
                    let (tx, rx) = oneshot::channel();
                    if scrapes.send(tx).await.is_err() {
                        return;
                    }
                    let body = rx.await.unwrap_or_default();
                    (
                        "200 OK",
                        prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                        body,
                    )
                } else {
                    ("404 Not Found", "text/plain", "try /metrics\n".to_string())
                };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = w.write_all(head.as_bytes()).await;
            let _ = w.write_all(body.as_bytes()).await;
        });
    }
}
