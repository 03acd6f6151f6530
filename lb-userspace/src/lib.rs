//! The userspace side of the load balancer: loading the XDP object and driving its maps
//! ([`dataplane`]), and building Maglev rings ([`maglev`]).
pub mod config;
pub mod dataplane;
pub mod maglev;
