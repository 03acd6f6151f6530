//! Shared pieces of the benchmark programs in `src/bin`.
pub mod haproxy;
pub mod live;
pub mod out;
pub mod traffic;
pub mod turns;
