//! The integration tests: one binary, driving the real `tradeid` executable
//! over real sockets on loopback. See `harness.rs` for the helpers.

mod harness;

mod cli;
mod daemon;
mod server;
