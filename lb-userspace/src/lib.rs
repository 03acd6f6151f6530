//! The userspace side of the load balancer: loading the XDP object and driving its maps
//! ([`dataplane`]), Maglev rings ([`maglev`]), the agent's config ([`config`]), turning a
//! config into map contents ([`reconcile`]), the agent ([`agent`]), its API ([`api`]) and
//! its BGP announcements ([`bgp`]).
pub mod agent;
pub mod api;
pub mod bgp;
pub mod config;
pub mod dataplane;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod migrate;
pub mod nexthop;
pub mod reconcile;
