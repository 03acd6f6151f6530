//! Shared pieces of the integration tests: packet builders ([`packets`]), the reference
//! model of the data plane ([`model`]) and a harness around `BPF_PROG_TEST_RUN` ([`harness`]).
pub mod fixture;
pub mod harness;
pub mod legacy;
pub mod model;
pub mod netns;
pub mod packets;
pub mod support;
pub mod testbed;
pub mod traffic;
pub mod transfer;
