//! The agent's control API: one JSON request per line over a Unix socket that only root
//! can open (`/run/lb/<instance>.sock`, mode 0600), one JSON response per line back.
use std::{
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::PathBuf,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::{BackendConfig, VipConfig};

pub fn socket_path(instance: &str) -> PathBuf {
    PathBuf::from(format!("/run/lb/{instance}.sock"))
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    VipAdd {
        vip: VipConfig,
    },
    VipRemove {
        name: String,
    },
    VipList,
    BackendAdd {
        vip: String,
        backend: BackendConfig,
    },
    BackendRemove {
        vip: String,
        address: IpAddr,
    },
    BackendList {
        vip: Option<String>,
    },
    BackendWeight {
        vip: String,
        address: IpAddr,
        weight: u32,
    },
    BackendDrain {
        vip: String,
        address: IpAddr,
        drain: bool,
    },
    Status,
    Stats,
    /// Exit the agent, leaving the data plane attached (as SIGTERM does).
    Shutdown,
}

impl Request {
    /// Does this request change the configuration?
    pub fn mutates(&self) -> bool {
        !matches!(
            self,
            Request::VipList
                | Request::BackendList { .. }
                | Request::Status
                | Request::Stats
                | Request::Shutdown
        )
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Self {
        Response {
            ok: true,
            error: None,
            data,
        }
    }
    pub fn err(e: impl std::fmt::Display) -> Self {
        Response {
            ok: false,
            error: Some(e.to_string()),
            data: serde_json::Value::Null,
        }
    }
}

/// Send one request to a running agent.
pub fn call(instance: &str, req: &Request) -> Result<Response> {
    let path = socket_path(instance);
    let stream = UnixStream::connect(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => {
            anyhow::anyhow!("permission denied: {} is for root only", path.display())
        }
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            anyhow::anyhow!(
                "no agent is running for instance {instance:?} ({} not found)",
                path.display()
            )
        }
        _ => anyhow::Error::new(e).context(format!("connecting to {}", path.display())),
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut w = stream.try_clone()?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    w.write_all(line.as_bytes())?;
    let mut resp = String::new();
    BufReader::new(stream)
        .read_line(&mut resp)
        .context("reading the agent's answer")?;
    if resp.is_empty() {
        bail!("the agent closed the connection without answering");
    }
    Ok(serde_json::from_str(&resp)?)
}
