//! The agent's state changes: each is logged once (with its reason), kept in a ring of
//! the last [`KEEP`] for `lb events`, and sent to every `lb events --follow`.
use std::{collections::VecDeque, net::IpAddr};

use tokio::sync::broadcast;
use tracing::info;

use crate::api::Event;

/// How many events `lb events` shows.
pub const KEEP: usize = 1000;

pub struct Events {
    recent: VecDeque<Event>,
    live: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            recent: VecDeque::new(),
            live: broadcast::channel(1024).0,
        }
    }
}

impl Events {
    /// Record (and log) one state change.
    pub fn push(&mut self, vip: &str, backend: Option<IpAddr>, what: &str, reason: &str) {
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        match backend {
            Some(b) => info!(vip, backend = %b, state = what, reason, "backend {what}"),
            None => info!(vip, state = what, reason, "vip {what}"),
        }
        let e = Event {
            time_ms,
            vip: vip.into(),
            backend,
            what: what.into(),
            reason: reason.into(),
        };
        if self.recent.len() == KEEP {
            self.recent.pop_front();
        }
        self.recent.push_back(e.clone());
        let _ = self.live.send(e);
    }

    pub fn recent(&self) -> Vec<Event> {
        self.recent.iter().cloned().collect()
    }

    /// Where every new event goes (subscribe for `lb events --follow`).
    pub fn sender(&self) -> broadcast::Sender<Event> {
        self.live.clone()
    }
}
