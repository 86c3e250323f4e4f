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
    TxnOpResponse,
};
use tradeid::id::{Key, ROUNDS};
use tradeid::state::{check_cluster_name, ClusterBinding, Geometry, Header};

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
    /// The node's lease: how long a stopped node's shard claims outlive it.
    pub lease_ttl: Duration,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("endpoints", &self.endpoints)
            .field("name", &self.name)
            .field("ca", &self.ca)
            .field("identity", &self.identity)
            .field("user", &self.user.as_ref().map(|(u, _)| u)) // never the password
            .field("lease_ttl", &self.lease_ttl)
            .finish()
    }
}

/// The space a cluster hands out, as stored in its `meta` key: one
/// `name value` field a line, so a field added later (an older reader
/// ignores it) needs one line in [`encode`](Meta::encode) and one in
/// [`decode`](Meta::decode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Meta {
    /// Random, never 0: a cluster deleted and made again is another one.
    pub(crate) cluster_id: u64,
    pub(crate) width: u32,
    pub(crate) shard_bits: u32,
    pub(crate) key: Key,
    pub(crate) created_unix: u64,
    /// IDs end in a check character (`init --etcd ... --check-char`).
    pub(crate) check_char: bool,
}

impl Meta {
    /// The metadata a state file of the cluster implies (to write it again
    /// into an etcd that lost it).
    pub(crate) fn of_file(header: &Header) -> Option<Meta> {
        let binding = header.cluster?;
        Some(Meta {
            cluster_id: binding.id,
            width: header.geometry.width,
            shard_bits: header.geometry.shard_bits,
            key: header.key,
            created_unix: header.created_unix,
            check_char: header.check_char,
        })
    }

    /// Whether `other` describes the same ID space (everything but the
    /// creation time, which only informs).
    pub(crate) fn same_space(&self, other: &Meta) -> bool {
        Meta { created_unix: 0, ..*self } == Meta { created_unix: 0, ..*other }
    }

    /// The stored text. A cluster with check characters is written as
    /// version 2 with a `check-char yes` line, so that an older tradeid,
    /// which reads only version 1, refuses it instead of making plain IDs
    /// in it.
    fn encode(&self) -> String {
        let key: String = self.key.0.iter().map(|w| format!("{w:016x}")).collect();
        let (version, check) =
            if self.check_char { (META_VERSION_CHECK_CHAR, "check-char yes\n") } else { (META_VERSION, "") };
        format!(
            "tradeid-cluster {version}\ncluster-id {:016x}\nwidth {}\nshard-bits {}\n{check}key {key}\ncreated {}\n",
            self.cluster_id, self.width, self.shard_bits, self.created_unix
        )
    }

    /// Parses and validates the stored text: anything that does not make
    /// a valid space (a geometry the state format cannot hold, a key that
    /// is not 64 hex digits, an id of 0) is refused, never half-used.
    fn decode(text: &str) -> Result<Meta, String> {
        let fields: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once(' ')).collect();
        let get = |name: &str| fields.get(name).copied().ok_or_else(|| format!("no {name:?} field"));
        let check_char = match (get("tradeid-cluster")?.parse::<u32>(), fields.get("check-char")) {
            (Ok(META_VERSION), None) => false,
            (Ok(META_VERSION_CHECK_CHAR), Some(&"yes")) => true,
            (Ok(META_VERSION | META_VERSION_CHECK_CHAR), _) => {
                return Err("the check-char field does not match the metadata version".into())
            }
            _ => return Err(format!("metadata version {} is not supported", get("tradeid-cluster")?)),
        };
        let hex = get("key")?;
        if hex.len() != ROUNDS * 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("the key is not {} hex digits", ROUNDS * 16));
        }
        let mut key = [0u64; ROUNDS];
        for (i, word) in key.iter_mut().enumerate() {
            *word = u64::from_str_radix(&hex[i * 16..(i + 1) * 16], 16).map_err(|_| "the key is not hex")?;
        }
        let number = |name: &str| get(name)?.parse::<u64>().map_err(|_| format!("{name} is not a number"));
        let small = |name: &str| get(name)?.parse::<u32>().map_err(|_| format!("{name} is not a small number"));
        let cluster_id = u64::from_str_radix(get("cluster-id")?, 16).map_err(|_| "cluster-id is not hex")?;
        if cluster_id == 0 {
            return Err("cluster-id is 0".into());
        }
        let (width, shard_bits) = (small("width")?, small("shard-bits")?);
        Geometry { width, shard_bits, node: 0, nodes: 1 }
            .validate()
            .map_err(|e| format!("width {width} and shard-bits {shard_bits} are not a valid space: {e}"))?;
        if check_char && width > tradeid::check::DATA_BITS {
            return Err(format!("a cluster with check characters has at most 30 bits, not {width}"));
        }
        Ok(Meta { cluster_id, width, shard_bits, key: Key(key), created_unix: number("created")?, check_char })
    }

    pub(crate) fn shard_count(&self) -> u32 {
        1 << (self.width - self.shard_bits)
    }

    pub(crate) fn shard_size(&self) -> u64 {
        1 << self.shard_bits
    }
}

/// The cluster's `meta` key holds something that is not a valid tradeid
/// cluster's metadata.
#[derive(Debug, thiserror::Error)]
#[error("etcd at {endpoints}: the metadata under {key} is not a valid tradeid cluster's: {reason}. Nothing is reserved from it. Stop every node, delete it (`etcdctl del {key}`), and write it again from any node's state file with `tradeid raise-marks` (docs/cluster.md, \"After an etcd restore\")")]
pub(crate) struct CorruptMeta {
    endpoints: String,
    key: String,
    reason: String,
}

const META_VERSION: u32 = 1;
/// The version of a cluster whose IDs end in a check character.
const META_VERSION_CHECK_CHAR: u32 = 2;

/// A connection to the cluster's etcd, with its own small runtime: the
/// reserver thread calls it synchronously, and the membership task (lease
/// keep-alive) runs on the runtime's worker in the background.
#[derive(Clone)]
pub(crate) struct Etcd {
    pub(super) runtime: Arc<tokio::runtime::Runtime>,
    pub(super) client: Client,
    prefix: String,
    endpoints: String,
    pub(super) lease_ttl: Duration,
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
    /// Connects. Without authentication the connection is lazy (a down
    /// etcd shows on the first request); with it, this logs in, so a down
    /// etcd fails here (`serve` retries, see [`open_for_serving`]).
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
            .with_require_leader(true)
            // etcd's auth tokens expire (`--auth-token-ttl`, 300 s by
            // default, or a JWT's ttl): a request refused for an expired
            // token logs in again and is retried once, so a long-running
            // node keeps reserving. Without credentials this does nothing.
            .with_auto_token_refresh(true);
        let tls_wanted = options.ca.is_some() || options.identity.is_some();
        if tls_wanted {
            let mut tls = TlsOptions::new();
            // A file that cannot be read is a setting to fix (never waited for).
            let read = |flag: &str, path: &PathBuf| {
                std::fs::read(path).map_err(|e| ConfigError(format!("cannot read {flag} {}: {e}", path.display())))
            };
            if let Some(ca) = &options.ca {
                tls = tls.ca_certificate(Certificate::from_pem(read("--etcd-ca", ca)?));
            }
            if let Some((cert, key)) = &options.identity {
                tls = tls.identity(Identity::from_pem(read("--etcd-cert", cert)?, read("--etcd-key", key)?));
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
        Ok(Etcd {
            runtime: Arc::new(runtime),
            client,
            prefix: format!("/tradeid/{}/", options.name),
            endpoints,
            lease_ttl: options.lease_ttl,
        })
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
        Ok(self.decode_meta(response.kvs().first().map(|kv| kv.value()))?)
    }

    /// Decodes the stored `meta` value (`None`: the key is absent).
    fn decode_meta(&self, value: Option<&[u8]>) -> Result<Option<Meta>, CorruptMeta> {
        let Some(value) = value else { return Ok(None) };
        Meta::decode(&String::from_utf8_lossy(value)).map(Some).map_err(|reason| CorruptMeta {
            endpoints: self.endpoints.clone(),
            key: self.key("meta"),
            reason,
        })
    }

    /// The metadata and every shard's mark, in one linearizable read (one
    /// txn of two ranges): what the periodic re-assertion checks.
    pub(crate) fn meta_and_marks(&self, shard_count: u32) -> Result<(Option<Meta>, Vec<u64>), anyhow::Error> {
        let meta_key = self.key("meta");
        let prefix = self.key("marks/");
        let response = self.run("reading the cluster metadata and marks", |mut c| async move {
            let txn = Txn::new()
                .and_then([TxnOp::get(meta_key, None), TxnOp::get(prefix, Some(GetOptions::new().with_prefix()))]);
            c.txn(txn).await
        })?;
        let mut ranges = response.op_responses().into_iter().filter_map(|op| match op {
            TxnOpResponse::Get(get) => Some(get),
            _ => None,
        });
        let (Some(meta), Some(marks)) = (ranges.next(), ranges.next()) else {
            anyhow::bail!("etcd at {}: a read of two ranges answered fewer", self.endpoints);
        };
        let meta = self.decode_meta(meta.kvs().first().map(|kv| kv.value()))?;
        Ok((meta, marks_of(shard_count, marks.kvs())))
    }

    /// Compare-and-swap of `marks/SHARD` from `expected` (0: absent) to
    /// `new`: `Ok(None)` if it committed, `Ok(Some(current))` if the mark
    /// was not `expected` (then `current` is what it is: 0 if absent).
    ///
    /// An error means *unknown*, not *failed*: a txn whose reply was lost
    /// (a timeout, a dropped connection) may have committed. Callers must
    /// then neither use the block nor assume the mark is unchanged beyond
    /// comparing against it again: the next attempt, comparing against the
    /// old `expected`, loses if the lost txn committed (and rereads the
    /// mark), so the block of a lost reply is skipped, never handed out
    /// twice. A lost txn that arrives late commits only if the mark is
    /// still `expected`, i.e. nobody reserved past it meanwhile (marks only
    /// rise, so the value cannot come back).
    pub(crate) fn cas_mark(&self, shard: u32, expected: u64, new: u64) -> Result<Option<u64>, EtcdError> {
        let key = self.key(&format!("marks/{shard:07}"));
        let response = self.run("reserving a block (compare-and-swap)", |mut c| async move {
            let compare = if expected == 0 {
                Compare::version(key.clone(), CompareOp::Equal, 0)
            } else {
                Compare::value(key.clone(), CompareOp::Equal, expected.to_string())
            };
            let txn = Txn::new()
                .when([compare])
                .and_then([TxnOp::put(key.clone(), new.to_string(), None)])
                .or_else([TxnOp::get(key, None)]);
            c.txn(txn).await
        })?;
        if response.succeeded() {
            return Ok(None);
        }
        let current = response
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                TxnOpResponse::Get(get) => Some(get.kvs().first().and_then(|kv| parse_number(kv.value())).unwrap_or(0)),
                _ => None,
            })
            .unwrap_or(0);
        Ok(Some(current))
    }

    /// Raises `marks/SHARD` to at least `target`, starting from `current`
    /// (what was last read); marks only rise, so a mark found at or above
    /// `target` is left alone. Returns the mark it ends at and whether
    /// this call raised it.
    pub(crate) fn raise_mark(&self, shard: u32, mut current: u64, target: u64) -> Result<(u64, bool), EtcdError> {
        while current < target {
            match self.cas_mark(shard, current, target)? {
                None => return Ok((target, true)),
                Some(now) => current = now,
            }
        }
        Ok((current, false))
    }

    /// Writes `meta` unless the key exists; returns what is there after.
    pub(crate) fn write_meta_if_absent(&self, meta: &Meta) -> anyhow::Result<Option<Meta>> {
        let key = self.key("meta");
        let value = meta.encode();
        let response = self.run("writing the cluster metadata", |mut c| async move {
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.clone(), value, None)]);
            c.txn(txn).await
        })?;
        if response.succeeded() {
            return Ok(Some(*meta));
        }
        self.meta()
    }

    /// Creates the cluster with a new key unless it exists; either way
    /// returns its metadata and whether this call created it. Two
    /// concurrent first calls end with one cluster: the txn writes `meta`
    /// only if it has never existed, else returns the winner's.
    pub(crate) fn create_or_join(&self, width: u32, shard_bits: u32, check_char: bool) -> anyhow::Result<(Meta, bool)> {
        let random = || Key::random().context("cannot read the OS random source");
        let created_unix =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mine =
            Meta { cluster_id: random()?.0[0].max(1), width, shard_bits, key: random()?, created_unix, check_char };
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
        Ok(marks_of(shard_count, response.kvs()))
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

/// Every shard's mark from a range read of `marks/` (an absent key is 0).
fn marks_of(shard_count: u32, kvs: &[etcd_client::KeyValue]) -> Vec<u64> {
    let mut marks = vec![0u64; shard_count as usize];
    for kv in kvs {
        if let (Some(shard), Some(mark)) = (shard_of(kv.key()), parse_number(kv.value())) {
            if let Some(slot) = marks.get_mut(shard as usize) {
                *slot = mark;
            }
        }
    }
    marks
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
    // One bounded wait for connecting (which logs in, with credentials)
    // and reading the metadata alike: etcd may come up after this node.
    let started = std::time::Instant::now();
    let (etcd, meta) = loop {
        let attempt = Etcd::connect(options).and_then(|etcd| Ok((etcd.meta()?, etcd)));
        match attempt {
            Ok((Some(meta), etcd)) => break (etcd, meta),
            Ok((None, etcd)) => anyhow::bail!(ConfigError(format!(
                "cluster {:?} does not exist in etcd at {} (its metadata {} is missing), but state file {} was made for it. If etcd lost its data or was restored from a backup, stop every node of the cluster and run `tradeid raise-marks --state FILE --etcd {} --cluster {}` with each node's state file before starting any (docs/cluster.md, \"After an etcd restore\"); never create the cluster again under this name",
                options.name,
                etcd.endpoints(),
                etcd.key("meta"),
                state.display(),
                etcd.endpoints(),
                options.name
            ))),
            Err(e) if is_final(&e) => return Err(e),
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

/// Errors that waiting cannot fix: refused credentials, a bad flag, a
/// corrupt metadata key.
fn is_final(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<EtcdError>().is_some_and(|e| e.denied) || c.is::<ConfigError>() || c.is::<CorruptMeta>()
    })
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

/// The node's lease unless `--etcd-lease-ttl` says otherwise.
pub(crate) const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

/// How long one etcd request may take before it counts as failed.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How long `serve` waits for etcd to answer at start before giving up.
const START_WAIT: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips() {
        let meta = Meta {
            cluster_id: 0xabc,
            width: 35,
            shard_bits: 22,
            key: Key([1, 2, 3, u64::MAX]),
            created_unix: 9,
            check_char: false,
        };
        assert_eq!(Meta::decode(&meta.encode()).unwrap(), meta);
        assert!(Meta::decode("tradeid-cluster 3\n").unwrap_err().contains("version 3"));
        assert!(Meta::decode(&meta.encode().replace("key ", "key 0")).is_err());
    }

    /// A cluster with check characters is version 2 (an older tradeid
    /// refuses it), records the flag, and is another space than the same
    /// key without it.
    #[test]
    fn a_check_character_cluster_is_version_2_and_its_own_space() {
        let plain = Meta {
            cluster_id: 0xabc,
            width: 30,
            shard_bits: 22,
            key: Key([1, 2, 3, 4]),
            created_unix: 9,
            check_char: false,
        };
        let checked = Meta { check_char: true, ..plain };
        let text = checked.encode();
        assert!(text.starts_with("tradeid-cluster 2\n") && text.contains("\ncheck-char yes\n"), "{text}");
        assert_eq!(Meta::decode(&text).unwrap(), checked);
        assert!(!plain.same_space(&checked));
        assert!(Meta::decode(&text.replace("check-char yes\n", "")).unwrap_err().contains("does not match"));
        assert!(Meta::decode(&plain.encode().replace("shard-bits 22\n", "shard-bits 22\ncheck-char yes\n")).is_err());
        let wide = Meta { width: 35, ..checked }.encode();
        assert!(Meta::decode(&wide).unwrap_err().contains("at most 30 bits"));
    }

    /// A corrupt `meta` key is refused with the key and the endpoint named,
    /// never half-used: a geometry the state format cannot hold would
    /// overflow a shift in `shard_count`.
    #[test]
    fn corrupt_metadata_is_refused_by_name() {
        let good = Meta {
            cluster_id: 0xabc,
            width: 35,
            shard_bits: 22,
            key: Key([1, 2, 3, u64::MAX]),
            created_unix: 9,
            check_char: false,
        }
        .encode();
        let runtime = Arc::new(tokio::runtime::Builder::new_current_thread().build().unwrap());
        let client = runtime.block_on(Client::connect(["http://127.0.0.1:1"], None)).unwrap();
        let etcd = Etcd {
            runtime,
            client,
            prefix: "/tradeid/c/".into(),
            endpoints: "http://127.0.0.1:1".into(),
            lease_ttl: DEFAULT_LEASE_TTL,
        };
        for (from, to, why) in [
            ("width 35", "width 99", "width 99"),
            ("width 35", "width 4294967331", "width is not a small number"),
            ("shard-bits 22", "shard-bits 40", "shard-bits 40"),
            ("width 35", "width 40", "width 40"),
            ("shard-bits 22", "shard-bits 2", "2^33 shards"),
            ("cluster-id 0000000000000abc", "cluster-id 0000000000000000", "cluster-id is 0"),
            // 64 bytes, with a two-byte character across the first word's end.
            ("key 0000000000000001000", "key 000000000000000\u{e9}00", "64 hex digits"),
            ("key 0000", "key +000", "64 hex digits"),
        ] {
            assert!(good.contains(from), "{from}");
            let text = good.replacen(from, to, 1);
            let err = etcd.decode_meta(Some(text.as_bytes())).unwrap_err().to_string();
            assert!(err.contains(why), "{to}: {err}");
            assert!(err.contains("etcd at http://127.0.0.1:1") && err.contains("/tradeid/c/meta"), "{err}");
        }
        assert!(etcd.decode_meta(Some(good.as_bytes())).unwrap().is_some());
        assert!(etcd.decode_meta(None).unwrap().is_none());
    }

    #[test]
    fn keys_parse_back_to_shards() {
        assert_eq!(shard_of(b"/tradeid/x/marks/0000042"), Some(42));
        assert_eq!(shard_of(b"/tradeid/x/marks/junk"), None);
        assert_eq!(parse_number(b"4194304"), Some(4_194_304));
    }
}
