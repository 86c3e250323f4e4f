//! tradeid-server: the `tradeid` daemon and command line, on top of the
//! `tradeid` core library.
//!
//! Layers, each using only the ones below it:
//!
//! - the application: `flags` (every flag) → `config` (validated) →
//!   `commands` (what each subcommand does), `exit` (exit codes, and a
//!   fatal error printed once) and `logging`;
//! - `control`: the tokio control plane: signals, systemd notify and
//!   watchdog, metrics, the admin HTTP listener, gRPC;
//! - [`dataplane`]: the pinned worker threads and their sockets;
//! - `cluster`: cluster mode: the etcd connection, the space's metadata in
//!   etcd, the etcd ledger;
//! - `errors`: the small error types several layers return (a leaf);
//! - below: `tradeid` (the core: ID codec, protocol, responder, state file,
//!   ledger, generator) and `tradeid-udp` (batched sockets, the only
//!   syscall `unsafe`).
//!
//! Library code never exits the process; `main` does, with the code
//! [`exit_code`] gives.
//!
//! The public surface is what the binary needs ([`Cli`], [`run`],
//! [`report_error`], [`exit_code`], [`init_logging`]) and the
//! [`dataplane`], for programs and tests that run a server in-process.

#[doc(hidden)]
pub mod bench;
mod cluster;
mod commands;
mod config;
mod control;
pub mod dataplane;
mod errors;
mod exit;
mod flags;
mod logging;

pub use commands::run;
pub use exit::code as exit_code;
pub use exit::report as report_error;
pub use flags::Cli;
pub use logging::init as init_logging;
