//! The integration tests: one binary, driving the real `tradeid` executable
//! over real sockets on loopback. See `harness.rs` for the helpers.

// A test binary has no public API; `pub` in its modules means "shared
// between test modules".
#![allow(unreachable_pub)]

mod etcd;
mod harness;

mod check_char;
mod cli;
mod cluster;
mod daemon;
mod hostile;
mod operator;
mod server;
