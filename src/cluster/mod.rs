//! Cluster mode: the nodes of one ID space coordinated by etcd.
//!
//! etcd holds, under `/tradeid/NAME/`:
//!
//! | key | value | lifetime |
//! |---|---|---|
//! | `meta` | the space: cluster id, key, geometry ([`Meta`]) | forever; written once, in a txn that fails if it exists |
//! | `marks/SHARD` | the shard's authoritative high-water mark | forever; only ever raised, by compare-and-swap |
//! | `claims/SHARD` | the node drawing from the shard | the node's lease: spreads nodes over shards |
//! | `nodes/NODE` | who the node is, its last reservation | the node's lease: the live-node list |
//!
//! **Correctness rests only on the compare-and-swap of `marks/SHARD`**
//! ([`ledger::EtcdLedger::advance`]): a block is handed out only after etcd
//! raised the shard's mark past it, compared against the value this node
//! last read or wrote, and after the local state file's flush. Leases and
//! claims only spread the nodes out and show who is alive; a node that lost
//! its lease, was cloned, or restarted from an old copy of its state file
//! can lose races, never win one twice.

pub(crate) mod ledger;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, TlsOptions, Txn, TxnOp,
};
use tradeid::id::{Key, ROUNDS};
use tradeid::state::{check_cluster_name, ClusterBinding};

use crate::errors::ConfigError;

/// How to reach a cluster: from `--etcd`, `--cluster` and the TLS and
/// authentication flags.
#[derive(Clone)]
pub struct Options {
    /// etcd endpoints, e.g. `http://10.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// The cluster's name (its key prefix).
    pub name: String,
    /// CA certificate that signed etcd's server certificate (turns TLS on).
    pub ca: Option<PathBuf>,
    /// Client certificate and its private key, for etcd's client-cert auth.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// User name and password for etcd's own authentication.
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("endpoints", &self.endpoints)
            .field("name", &self.name)
            .field("ca", &self.ca)
            .field("identity", &self.identity)
            .field("user", &self.user.as_ref().map(|(u, _)| u)) // never the password
            .finish()
    }
}

/// The space a cluster hands out, as stored in its `meta` key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Meta {
    /// Random, never 0: a cluster deleted and made again is another one.
    pub(crate) cluster_id: u64,
    pub(crate) width: u32,
    pub(crate) shard_bits: u32,
    pub(crate) key: Key,
    pub(crate) created_unix: u64,
}

impl Meta {
    fn encode(&self) -> String {
        let key: String = self.key.0.iter().map(|w| format!("{w:016x}")).collect();
        format!(
            "tradeid-cluster {META_VERSION}\ncluster-id {:016x}\nwidth {}\nshard-bits {}\nkey {key}\ncreated {}\n",
            self.cluster_id, self.width, self.shard_bits, self.created_unix
        )
    }

    fn decode(text: &str) -> Result<Meta, String> {
        let fields: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once(' ')).collect();
        let get = |name: &str| fields.get(name).copied().ok_or_else(|| format!("no {name:?} field"));
        if get("tradeid-cluster")? != META_VERSION.to_string() {
            return Err(format!("metadata version {} is not supported", get("tradeid-cluster")?));
        }
        let hex = get("key")?;
        if hex.len() != ROUNDS * 16 {
            return Err("the key is not 64 hex digits".into());
        }
        let mut key = [0u64; ROUNDS];
        for (i, word) in key.iter_mut().enumerate() {
            *word = u64::from_str_radix(&hex[i * 16..(i + 1) * 16], 16).map_err(|_| "the key is not hex")?;
        }
        let number = |name: &str| get(name)?.parse::<u64>().map_err(|_| format!("{name} is not a number"));
        let cluster_id = u64::from_str_radix(get("cluster-id")?, 16).map_err(|_| "cluster-id is not hex")?;
        Ok(Meta {
            cluster_id,
            width: number("width")? as u32,
            shard_bits: number("shard-bits")? as u32,
            key: Key(key),
            created_unix: number("created")?,
        })
    }

    pub(crate) fn shard_count(&self) -> u32 {
        1 << (self.width - self.shard_bits)
    }

    pub(crate) fn shard_size(&self) -> u64 {
        1 << self.shard_bits
    }
}

const META_VERSION: u32 = 1;

/// A connection to the cluster's etcd, with its own small runtime: the
/// reserver thread calls it synchronously, and the membership task (lease
/// keep-alive) runs on the runtime's worker in the background.
#[derive(Clone)]
pub(crate) struct Etcd {
    pub(super) runtime: Arc<tokio::runtime::Runtime>,
    pub(super) client: Client,
    prefix: String,
    endpoints: String,
}

/// Why an etcd request failed, named for the operator.
#[derive(Debug, thiserror::Error)]
#[error("etcd at {endpoints}: {what} failed: {detail}{hint}")]
pub(crate) struct EtcdError {
    endpoints: String,
    what: &'static str,
    detail: String,
    hint: &'static str,
    /// Whether it was refused for credentials (never retried at start).
    pub(crate) denied: bool,
}

impl Etcd {
    /// Connects (lazily: a down etcd shows on the first request).
    pub(crate) fn connect(options: &Options) -> anyhow::Result<Etcd> {
        check_cluster_name(&options.name).map_err(|e| ConfigError(format!("--cluster: {e}")))?;
        if options.endpoints.is_empty() {
            anyhow::bail!(ConfigError("--etcd needs at least one endpoint, like http://127.0.0.1:2379".into()));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tradeid-etcd")
            .enable_all()
            .build()
            .context("cannot start the etcd client's runtime")?;
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_require_leader(true);
        let tls_wanted = options.ca.is_some() || options.identity.is_some();
        if tls_wanted {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &options.ca {
                let pem = std::fs::read(ca).with_context(|| format!("cannot read --etcd-ca {}", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let Some((cert, key)) = &options.identity {
                let cert_pem =
                    std::fs::read(cert).with_context(|| format!("cannot read --etcd-cert {}", cert.display()))?;
                let key_pem =
                    std::fs::read(key).with_context(|| format!("cannot read --etcd-key {}", key.display()))?;
                tls = tls.identity(Identity::from_pem(cert_pem, key_pem));
            }
            connect = connect.with_tls(tls);
        }
        if let Some((user, password)) = &options.user {
            connect = connect.with_user(user, password);
        }
        let endpoints = options.endpoints.join(",");
        let connecting = Client::connect(&options.endpoints, Some(connect));
        let client = match runtime.block_on(async { tokio::time::timeout(REQUEST_TIMEOUT * 2, connecting).await }) {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(describe(&endpoints, "connecting", &e).into()),
            Err(_) => {
                return Err(EtcdError {
                    endpoints,
                    what: "connecting",
                    detail: format!("no answer within {:?}", REQUEST_TIMEOUT * 2),
                    hint: "; is etcd running at that address and reachable from here?",
                    denied: false,
                }
                .into())
            }
        };
        Ok(Etcd { runtime: Arc::new(runtime), client, prefix: format!("/tradeid/{}/", options.name), endpoints })
    }

    /// Runs one request on the runtime, bounded by [`REQUEST_TIMEOUT`].
    pub(crate) fn run<T, F>(&self, what: &'static str, request: impl FnOnce(Client) -> F) -> Result<T, EtcdError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        let future = request(self.client.clone());
        match self.runtime.block_on(async { tokio::time::timeout(REQUEST_TIMEOUT, future).await }) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(describe(&self.endpoints, what, &e)),
            Err(_) => Err(EtcdError {
                endpoints: self.endpoints.clone(),
                what,
                detail: format!("no answer within {REQUEST_TIMEOUT:?}"),
                hint: "; is etcd running there and does it have a leader?",
                denied: false,
            }),
        }
    }

    pub(crate) fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    /// The cluster's metadata, if the cluster exists.
    pub(crate) fn meta(&self) -> Result<Option<Meta>, anyhow::Error> {
        let key = self.key("meta");
        let response = self.run("reading the cluster metadata", |mut c| async move { c.get(key, None).await })?;
        match response.kvs().first() {
            None => Ok(None),
            Some(kv) => Meta::decode(&String::from_utf8_lossy(kv.value())).map(Some).map_err(|e| {
                anyhow::anyhow!(
                    "etcd at {}: the metadata under {} is not a tradeid cluster's: {e}",
                    self.endpoints,
                    self.key("meta")
                )
            }),
        }
    }

    /// Creates the cluster with a new key unless it exists; either way
    /// returns its metadata and whether this call created it. Two
    /// concurrent first calls end with one cluster: the txn writes `meta`
    /// only if it has never existed, else returns the winner's.
    pub(crate) fn create_or_join(&self, width: u32, shard_bits: u32) -> anyhow::Result<(Meta, bool)> {
        let random = || Key::random().context("cannot read the OS random source");
        let created_unix =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mine = Meta { cluster_id: random()?.0[0].max(1), width, shard_bits, key: random()?, created_unix };
        let key = self.key("meta");
        let value = mine.encode();
        let response = self.run("creating the cluster metadata", |mut c| async move {
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.clone(), value, None)])
                .or_else([TxnOp::get(key, None)]);
            c.txn(txn).await
        })?;
        if response.succeeded() {
            return Ok((mine, true));
        }
        let theirs = self.meta()?.context("the cluster metadata vanished right after it was found")?;
        Ok((theirs, false))
    }

    /// Every shard's mark (absent keys are 0).
    pub(crate) fn marks(&self, shard_count: u32) -> Result<Vec<u64>, EtcdError> {
        let prefix = self.key("marks/");
        let response = self.run("reading the shard marks", |mut c| async move {
            c.get(prefix, Some(GetOptions::new().with_prefix())).await
        })?;
        let mut marks = vec![0u64; shard_count as usize];
        for kv in response.kvs() {
            if let (Some(shard), Some(mark)) = (shard_of(kv.key()), parse_number(kv.value())) {
                if let Some(slot) = marks.get_mut(shard as usize) {
                    *slot = mark;
                }
            }
        }
        Ok(marks)
    }

    /// Which node holds a claim on which shard.
    pub(crate) fn claims(&self) -> Result<BTreeMap<u32, String>, EtcdError> {
        let prefix = self.key("claims/");
        let response = self.run("reading the shard claims", |mut c| async move {
            c.get(prefix, Some(GetOptions::new().with_prefix())).await
        })?;
        Ok(response
            .kvs()
            .iter()
            .filter_map(|kv| Some((shard_of(kv.key())?, String::from_utf8_lossy(kv.value()).into_owned())))
            .collect())
    }

    /// The live nodes: id → what each registered about itself.
    pub(crate) fn nodes(&self) -> Result<BTreeMap<String, String>, EtcdError> {
        let prefix = self.key("nodes/");
        let response = self.run("reading the live nodes", |mut c| async move {
            c.get(prefix, Some(GetOptions::new().with_prefix())).await
        })?;
        let strip = self.key("nodes/");
        Ok(response
            .kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                (key.trim_start_matches(&strip).to_string(), String::from_utf8_lossy(kv.value()).into_owned())
            })
            .collect())
    }

    pub(crate) fn endpoints(&self) -> &str {
        &self.endpoints
    }
}

/// Opens a cluster for `serve`: connects, reads the metadata (waiting up to
/// [`START_WAIT`] for etcd to answer), and checks that the state file was
/// made for this very cluster.
pub(crate) fn open_for_serving(
    options: &Options,
    binding: Option<&ClusterBinding>,
    state: &std::path::Path,
) -> anyhow::Result<(Etcd, Meta)> {
    let Some(binding) = binding else {
        anyhow::bail!(ConfigError(format!(
            "state file {} is not a cluster node's (it was not made with `tradeid init --etcd`); serving it with --etcd would mix a standalone space into cluster {:?}. Create a node's state with `tradeid init --state NEW --etcd {} --cluster {}`",
            state.display(),
            options.name,
            options.endpoints.join(","),
            options.name
        )));
    };
    if binding.name() != options.name {
        anyhow::bail!(ConfigError(format!(
            "state file {} belongs to cluster {:?}, not {:?} (--cluster); use the state file made for this cluster",
            state.display(),
            binding.name(),
            options.name
        )));
    }
    let etcd = Etcd::connect(options)?;
    let started = std::time::Instant::now();
    let meta = loop {
        match etcd.meta() {
            Ok(Some(meta)) => break meta,
            Ok(None) => anyhow::bail!(ConfigError(format!(
                "cluster {:?} does not exist in etcd at {} (its metadata {} is missing), but state file {} was made for it. If etcd lost its data, restore etcd from a backup; never create the cluster again under this name",
                options.name,
                etcd.endpoints(),
                etcd.key("meta"),
                state.display()
            ))),
            Err(e) if is_denied(&e) => return Err(e),
            Err(e) if started.elapsed() < START_WAIT => {
                tracing::warn!("waiting for etcd: {e:#}");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => return Err(e.context(format!("gave up waiting after {START_WAIT:?}"))),
        }
    };
    if meta.cluster_id != binding.id {
        anyhow::bail!(ConfigError(format!(
            "state file {} was made for an earlier cluster {:?} (id {:016x}); the cluster in etcd now has id {:016x}. A cluster made again under an old name is a new ID space; make this node's state again with `tradeid init`",
            state.display(),
            options.name,
            binding.id,
            meta.cluster_id
        )));
    }
    Ok((etcd, meta))
}

fn is_denied(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<EtcdError>().is_some_and(|e| e.denied) || c.is::<ConfigError>())
}

/// An etcd error, with a hint for the usual causes.
fn describe(endpoints: &str, what: &'static str, e: &etcd_client::Error) -> EtcdError {
    let detail = e.to_string();
    let lower = detail.to_lowercase();
    let denied = lower.contains("authentication failed")
        || lower.contains("permission denied")
        || lower.contains("user name is empty")
        || lower.contains("invalid auth token")
        || lower.contains("certificate");
    let hint = if lower.contains("authentication failed") || lower.contains("invalid auth token") {
        "; check --etcd-user and the password (TRADEID_ETCD_PASSWORD or --etcd-password-file)"
    } else if lower.contains("permission denied") || lower.contains("user name is empty") {
        "; etcd has authentication on: give --etcd-user and a password with read-write access to /tradeid/"
    } else if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
        "; check --etcd-ca, --etcd-cert and --etcd-key against etcd's TLS settings"
    } else {
        "; is etcd running at that address and reachable from here?"
    };
    EtcdError { endpoints: endpoints.to_string(), what, detail, hint, denied }
}

fn shard_of(key: &[u8]) -> Option<u32> {
    let key = std::str::from_utf8(key).ok()?;
    key.rsplit('/').next()?.parse().ok()
}

fn parse_number(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// How long one etcd request may take before it counts as failed.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How long `serve` waits for etcd to answer at start before giving up.
const START_WAIT: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips() {
        let meta =
            Meta { cluster_id: 0xabc, width: 35, shard_bits: 22, key: Key([1, 2, 3, u64::MAX]), created_unix: 9 };
        assert_eq!(Meta::decode(&meta.encode()).unwrap(), meta);
        assert!(Meta::decode("tradeid-cluster 2\n").unwrap_err().contains("version 2"));
        assert!(Meta::decode(&meta.encode().replace("key ", "key 0")).is_err());
    }

    #[test]
    fn keys_parse_back_to_shards() {
        assert_eq!(shard_of(b"/tradeid/x/marks/0000042"), Some(42));
        assert_eq!(shard_of(b"/tradeid/x/marks/junk"), None);
        assert_eq!(parse_number(b"4194304"), Some(4_194_304));
    }
}
