//! tradeid: unique, human-readable 7-character trade IDs.
//!
//! This is the lean core: everything that decides *which* ID to hand out
//! and *that* it is safe to, with no async runtime, HTTP or command line.
//! The server (`tradeid-server`) and the load generator build on it, and an
//! application that wants no network hop embeds its [`Generator`].
//!
//! Data flows one way: request bytes → [`protocol`] → [`generator`] → [`id`]
//! → reply bytes, with [`state`] making every block durable first.
//!
//! - [`id`]: the ID, its Crockford base32 codec and the keyed permutation. Pure.
//! - [`check`]: the optional check character (Damm over a quasigroup of order 32). Pure.
//! - [`protocol`]: the wire format: decode a request, encode a reply. Pure.
//! - [`policy`]: who may ask and how much: allowlist, 3× rule, rate limiter. Pure.
//! - [`state`]: the state file: format (pure), creation, locks, and the mapped store
//!   (the crate's only `unsafe`).
//! - [`keyfile`]: the key file that every node of a multi-node space shares.
//! - [`respond`]: the per-datagram responder: every decision about one request. Pure.
//! - [`ledger`]: who decides a shard's mark: the state file alone, or a coordinator.
//! - [`generator`]: shards, block reservation, background prefetch.
//! - [`client`]: the UDP client: retries, failover, duplicate filter.
//! - [`hooks`]: fault injection for tests, compiled in only with `test-hooks`.

mod alphabet;
pub mod check;
pub mod client;
pub mod generator;
pub mod hooks;
pub mod id;
pub mod keyfile;
pub mod ledger;
pub mod policy;
pub mod protocol;
pub mod respond;
pub mod state;

pub use generator::{GenError, Generator, GeneratorConfig, Handle};
pub use id::Id;
