//! The etcd ledger: grants blocks by compare-and-swap on a shard's mark in
//! etcd, spreads nodes over shards with leased claims, and keeps this
//! node's registration alive.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use tradeid::ledger::{Advance, Ledger, LedgerError};
use tradeid::state::Store;

use super::{parse_number, Etcd, EtcdError, Meta};

/// What the control plane shows about coordination. Written by the ledger
/// and its membership task, read at scrape time.
pub(crate) struct ClusterStats {
    /// The cluster's name.
    pub(crate) cluster: String,
    /// This process's node id (random per start).
    pub(crate) node_id: String,
    /// Whether the last etcd request succeeded.
    pub(crate) up: AtomicBool,
    /// Reservation txns by result.
    pub(crate) committed: AtomicU64,
    pub(crate) conflicts: AtomicU64,
    pub(crate) errors: AtomicU64,
    /// Other etcd requests (claims, reads, lease keep-alives) that failed.
    pub(crate) request_errors: AtomicU64,
    /// Unix time of the last successful etcd request.
    pub(crate) last_success_unix: AtomicU64,
    /// Reservation txn latency, in microseconds.
    pub(crate) latency_micros: Mutex<hdrhistogram::Histogram<u64>>,
    /// IDs used in the whole cluster, as this node last saw the marks.
    pub(crate) cluster_used: AtomicU64,
    /// IDs the whole cluster can ever issue.
    pub(crate) capacity: u64,
    /// This node's last reservation: (shard, start, end, unix time).
    pub(crate) last_reservation: Mutex<Option<(u32, u64, u64, u64)>>,
    /// The UDP address, once bound (for the node list).
    pub(crate) listen: Mutex<Option<std::net::SocketAddr>>,
}

impl ClusterStats {
    fn success(&self) {
        self.up.store(true, Ordering::Relaxed);
        self.last_success_unix.store(unix_now(), Ordering::Relaxed);
    }

    fn failure(&self) {
        self.up.store(false, Ordering::Relaxed);
        self.request_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The node's registration value: who it is and what it last reserved.
    fn node_info(&self, started: u64, state: &str) -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let listen = self.listen.lock().unwrap_or_else(|p| p.into_inner()).map_or("-".to_string(), |a| a.to_string());
        let last = match *self.last_reservation.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((shard, start, end, at)) => format!("{shard}:{start}-{end}@{at}"),
            None => "-".into(),
        };
        format!(
            "host={} listen={listen} pid={} started={started} state={state} version={} last={last}",
            host.trim(),
            std::process::id(),
            env!("CARGO_PKG_VERSION")
        )
    }
}

/// A node's ledger in an etcd cluster.
pub(crate) struct EtcdLedger {
    etcd: Etcd,
    meta: Meta,
    stats: Arc<ClusterStats>,
    lease: Arc<AtomicI64>,
    /// Per shard: the mark this node last read or wrote in etcd.
    expected: Vec<Option<u64>>,
    /// When every mark was last read.
    refreshed: Option<Instant>,
    /// Shards this node holds a claim on.
    mine: BTreeSet<u32>,
    membership: tokio::task::JoinHandle<()>,
}

impl EtcdLedger {
    /// Joins the cluster: takes a lease, registers this node, and raises
    /// any etcd mark that is below this node's own state file (etcd
    /// restored from an old backup) so no other node reissues those IDs.
    pub(crate) fn start(etcd: Etcd, meta: Meta, store: &Store) -> anyhow::Result<(EtcdLedger, Arc<ClusterStats>)> {
        let node_id = format!("{:016x}", tradeid::id::Key::random()?.0[0]);
        let stats = Arc::new(ClusterStats {
            cluster: etcd.key("").trim_end_matches('/').rsplit('/').next().unwrap_or_default().to_string(),
            node_id: node_id.clone(),
            up: AtomicBool::new(false),
            committed: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            request_errors: AtomicU64::new(0),
            last_success_unix: AtomicU64::new(0),
            latency_micros: Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid histogram bounds"),
            ),
            cluster_used: AtomicU64::new(0),
            capacity: u64::from(meta.shard_count()) * meta.shard_size(),
            last_reservation: Mutex::new(None),
            listen: Mutex::new(None),
        });
        let lease_id =
            etcd.run("taking a lease", |mut c| async move { c.lease_grant(LEASE_TTL_SECONDS, None).await })?.id();
        let lease = Arc::new(AtomicI64::new(lease_id));
        let started = unix_now();
        let state = store.path().display().to_string();
        let node_key = etcd.key(&format!("nodes/{node_id}"));
        let info = stats.node_info(started, &state);
        let put_key = node_key.clone();
        etcd.run("registering this node", |mut c| async move {
            c.put(put_key, info, Some(PutOptions::new().with_lease(lease_id))).await
        })?;
        stats.success();
        let membership = etcd.runtime.spawn(membership(
            etcd.clone(),
            node_key,
            Arc::clone(&lease),
            Arc::clone(&stats),
            started,
            state,
        ));
        let mut ledger = EtcdLedger {
            expected: vec![None; meta.shard_count() as usize],
            etcd,
            meta,
            stats: Arc::clone(&stats),
            lease,
            refreshed: None,
            mine: BTreeSet::new(),
            membership,
        };
        ledger.refresh().map_err(anyhow::Error::from)?;
        ledger.raise_to_local(store)?;
        tracing::info!(cluster = %stats.cluster, node = %node_id, etcd = ledger.etcd.endpoints(), "joined the cluster");
        Ok((ledger, stats))
    }

    /// Reads every mark.
    fn refresh(&mut self) -> Result<(), EtcdError> {
        let marks = self.etcd.marks(self.meta.shard_count()).inspect_err(|_| self.stats.failure())?;
        self.stats.success();
        self.stats.cluster_used.store(marks.iter().sum(), Ordering::Relaxed);
        for (slot, mark) in self.expected.iter_mut().zip(marks) {
            *slot = Some(mark);
        }
        self.refreshed = Some(Instant::now());
        Ok(())
    }

    fn raise_to_local(&mut self, store: &Store) -> anyhow::Result<()> {
        let mut raised = 0;
        for shard in 0..self.meta.shard_count() {
            let local = store.mark(shard);
            loop {
                let expected = self.expected[shard as usize].unwrap_or(0);
                if local <= expected {
                    break;
                }
                match self.cas(shard, expected, local)? {
                    None => {
                        self.expected[shard as usize] = Some(local);
                        raised += 1;
                        break;
                    }
                    Some(current) => self.expected[shard as usize] = Some(current),
                }
            }
        }
        if raised > 0 {
            tracing::warn!(
                shards = raised,
                "etcd's marks were below this node's state file (was etcd restored from an old backup?); raised them so no node reissues these IDs"
            );
        }
        Ok(())
    }

    /// Raises `marks/SHARD` from `expected` to `new`. `Ok(None)`: done;
    /// `Ok(Some(current))`: someone else moved it first (to `current`).
    fn cas(&self, shard: u32, expected: u64, new: u64) -> Result<Option<u64>, EtcdError> {
        let key = self.etcd.key(&format!("marks/{shard:07}"));
        let started = Instant::now();
        let result = self.etcd.run("reserving a block (compare-and-swap)", |mut c| async move {
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
        });
        let response = match result {
            Ok(r) => r,
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                self.stats.up.store(false, Ordering::Relaxed);
                return Err(e);
            }
        };
        self.stats.success();
        if response.succeeded() {
            self.stats.committed.fetch_add(1, Ordering::Relaxed);
            let micros = started.elapsed().as_micros() as u64;
            self.stats.latency_micros.lock().unwrap_or_else(|p| p.into_inner()).saturating_record(micros.max(1));
            return Ok(None);
        }
        self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
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

    /// Tries to claim `shard` under this node's lease (taking a new lease
    /// first if the old one expired).
    fn try_claim(&self, shard: u32) -> Result<bool, EtcdError> {
        let mut lease = self.lease.load(Ordering::Acquire);
        if lease == 0 {
            lease = self
                .etcd
                .run("taking a lease", |mut c| async move { c.lease_grant(LEASE_TTL_SECONDS, None).await })?
                .id();
            self.lease.store(lease, Ordering::Release);
        }
        let key = self.etcd.key(&format!("claims/{shard:07}"));
        let node = self.stats.node_id.clone();
        let response = self.etcd.run("claiming a shard", |mut c| async move {
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key, node, Some(PutOptions::new().with_lease(lease)))]);
            c.txn(txn).await
        });
        match response {
            Ok(response) => Ok(response.succeeded()),
            Err(e) => {
                if e.to_string().contains("lease not found") {
                    // Expired while etcd was out of reach: take a new one.
                    let _ = self.lease.compare_exchange(lease, 0, Ordering::AcqRel, Ordering::Relaxed);
                }
                Err(e)
            }
        }
    }

    fn full(&self, store: &Store, shard: u32) -> bool {
        self.expected[shard as usize].unwrap_or(0).max(store.mark(shard)) >= self.meta.shard_size()
    }
}

fn unavailable(e: EtcdError) -> LedgerError {
    LedgerError::Unavailable(e.to_string())
}

impl Ledger for EtcdLedger {
    fn claim(&mut self, store: &Store, busy: &[bool]) -> Result<Option<u32>, LedgerError> {
        if self.refreshed.is_none_or(|at| at.elapsed() > REFRESH_EVERY) {
            self.refresh().map_err(unavailable)?;
        }
        let claims = self.etcd.claims().inspect_err(|_| self.stats.failure()).map_err(unavailable)?;
        let count = self.meta.shard_count();
        // Resume partly used shards first (no holes), then untouched ones
        // from a point that differs per node, so nodes rarely collide.
        let offset = u32::from_str_radix(&self.stats.node_id[..8], 16).unwrap_or(0) % count;
        let open = |s: &u32| !busy[*s as usize] && !self.full(store, *s) && !claims.contains_key(s);
        let partly = (0..count).filter(|s| self.expected[*s as usize].unwrap_or(0).max(store.mark(*s)) > 0);
        let untouched = (0..count).map(|i| (i + offset) % count);
        let candidates: Vec<u32> = partly.chain(untouched).filter(open).take(CLAIM_TRIES).collect();
        for shard in candidates {
            if self.try_claim(shard).inspect_err(|_| self.stats.failure()).map_err(unavailable)? {
                self.mine.insert(shard);
                return Ok(Some(shard));
            }
        }
        // Every open shard is claimed by someone: share one (the CAS keeps
        // blocks apart), after making sure the marks are current.
        self.refresh().map_err(unavailable)?;
        Ok((0..count).find(|s| !busy[*s as usize] && !self.full(store, *s)))
    }

    fn advance(&mut self, shard: u32, floor: u64, size: u64) -> Result<Advance, LedgerError> {
        let shard_size = self.meta.shard_size();
        for _ in 0..CAS_TRIES {
            let expected = match self.expected[shard as usize] {
                Some(mark) => mark,
                None => {
                    self.refresh().map_err(unavailable)?;
                    self.expected[shard as usize].unwrap_or(0)
                }
            };
            let start = expected.max(floor);
            if start >= shard_size {
                return Ok(Advance::Full);
            }
            let end = (start + size).min(shard_size);
            match self.cas(shard, expected, end).map_err(unavailable)? {
                None => {
                    self.expected[shard as usize] = Some(end);
                    self.stats.cluster_used.fetch_add(end - expected, Ordering::Relaxed);
                    *self.stats.last_reservation.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((shard, start, end, unix_now()));
                    return Ok(Advance::Block { start, end });
                }
                // Someone else moved the mark: retry from where it is now.
                Some(current) => self.expected[shard as usize] = Some(current),
            }
        }
        Ok(Advance::Lost)
    }

    fn release(&mut self, shard: u32) {
        if !self.mine.remove(&shard) {
            return;
        }
        // Best effort and off the reserver's path: an unreleased claim
        // expires with the lease anyway.
        let key = self.etcd.key(&format!("claims/{shard:07}"));
        let node = self.stats.node_id.clone();
        let client = self.etcd.client.clone();
        self.etcd.runtime.spawn(async move {
            let mut client = client;
            let txn = Txn::new()
                .when([Compare::value(key.clone(), CompareOp::Equal, node)])
                .and_then([TxnOp::delete(key, None)]);
            let _ = tokio::time::timeout(super::REQUEST_TIMEOUT, client.txn(txn)).await;
        });
    }
}

impl Drop for EtcdLedger {
    /// Leaves the cluster: revokes the lease, which drops this node's claims
    /// and registration at once instead of after the TTL.
    fn drop(&mut self) {
        self.membership.abort();
        let lease = self.lease.load(Ordering::Acquire);
        if lease != 0 {
            let _ = self.etcd.run("leaving the cluster", |mut c| async move { c.lease_revoke(lease).await });
        }
    }
}

/// Keeps the lease alive and the registration current, in the background.
/// If the lease is lost (etcd was unreachable for longer than its TTL), a
/// new one is taken when etcd answers again; the claims under the old one
/// are gone, which costs at most some contention, never a duplicate.
async fn membership(
    etcd: Etcd,
    node_key: String,
    lease: Arc<AtomicI64>,
    stats: Arc<ClusterStats>,
    started: u64,
    state: String,
) {
    let mut client = etcd.client.clone();
    let mut stream: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)> = None;
    let mut last_warning: Option<Instant> = None;
    loop {
        tokio::time::sleep(KEEPALIVE_EVERY).await;
        let step = async {
            let mut id = lease.load(Ordering::Acquire);
            if id == 0 {
                id = client.lease_grant(LEASE_TTL_SECONDS, None).await?.id();
                lease.store(id, Ordering::Release);
                stream = None;
            }
            if stream.is_none() {
                stream = Some(client.lease_keep_alive(id).await?);
            }
            let (keeper, responses) = stream.as_mut().expect("opened above");
            keeper.keep_alive().await?;
            let alive = responses.message().await?.is_some_and(|r| r.ttl() > 0);
            if alive {
                let info = stats.node_info(started, &state);
                client.put(node_key.clone(), info, Some(PutOptions::new().with_lease(id))).await?;
            } else {
                let _ = lease.compare_exchange(id, 0, Ordering::AcqRel, Ordering::Relaxed);
                stream = None;
            }
            Ok::<bool, etcd_client::Error>(alive)
        };
        let problem = match tokio::time::timeout(super::REQUEST_TIMEOUT, step).await {
            Ok(Ok(true)) => {
                stats.success();
                continue;
            }
            Ok(Ok(false)) => "this node's etcd lease had expired; took a new one".to_string(),
            Ok(Err(e)) => format!("keeping this node's etcd lease alive failed: {e}"),
            Err(_) => format!("keeping this node's etcd lease alive took over {:?}", super::REQUEST_TIMEOUT),
        };
        // The keep-alive stream may be broken; open a new one next time.
        stream = None;
        stats.failure();
        if last_warning.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
            tracing::warn!("{problem} (etcd at {})", etcd.endpoints());
            last_warning = Some(Instant::now());
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The lease's time to live: how long a dead node's claims linger.
const LEASE_TTL_SECONDS: i64 = 10;
/// How often the lease is kept alive and the registration rewritten.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(2);
/// How stale the cached marks may get before a claim rereads them all.
const REFRESH_EVERY: Duration = Duration::from_secs(5);
/// Shards tried per claim before sharing a claimed one.
const CLAIM_TRIES: usize = 8;
/// Compare-and-swap attempts on one shard before giving it up.
const CAS_TRIES: usize = 3;
