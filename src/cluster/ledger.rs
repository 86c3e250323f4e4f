//! The etcd ledger: grants blocks by compare-and-swap on a shard's mark in
//! etcd, spreads nodes over shards with leased claims, and keeps this
//! node's registration alive.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use tradeid::ledger::{Advance, Ledger, LedgerError};
use tradeid::state::Store;

use super::{Etcd, EtcdError, Meta};

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
    /// IDs used in the whole cluster: the sum of the highest mark this node
    /// knows for each shard (never above the capacity).
    pub(crate) cluster_used: AtomicU64,
    /// IDs the whole cluster can ever issue.
    pub(crate) capacity: u64,
    /// This node's last reservation: (shard, start, end, unix time).
    pub(crate) last_reservation: Mutex<Option<(u32, u64, u64, u64)>>,
    /// The UDP address, once bound (for the node list).
    pub(crate) listen: Mutex<Option<std::net::SocketAddr>>,
    /// Times etcd showed a shard mark below one this node knew it held
    /// (etcd rolled back or its keys deleted).
    pub(crate) rollbacks: AtomicU64,
    /// Shard marks this node raised back in etcd to what it knew.
    pub(crate) marks_raised: AtomicU64,
    /// Why this node stopped reserving for good, if it did.
    pub(crate) stopped: Mutex<Option<String>>,
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
    /// Per shard: the mark this node last read or wrote in etcd (what its
    /// next compare-and-swap compares against).
    expected: Vec<Option<u64>>,
    /// Per shard: the highest mark this node knows etcd held: the highest
    /// it read or wrote, and its own state file's (every local mark was
    /// written after etcd's was raised past it). Marks only rise, so etcd
    /// showing less means etcd lost data: this node then never reserves
    /// below `seen` and raises etcd's mark back to it.
    seen: Vec<u64>,
    /// When every mark was last read.
    refreshed: Option<Instant>,
    /// When a rollback was last logged (at most one line per 10 s).
    rollback_logged: Option<Instant>,
    /// Shards this node holds a claim on.
    mine: BTreeSet<u32>,
    /// Why this node stopped reserving for good (the cluster's metadata
    /// vanished from etcd or changed): it serves what it holds, then
    /// `!ERR503`, until restarted.
    stopped: Option<String>,
    /// Periodic re-assertions skipped in a row because etcd was down.
    skipped: u32,
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
            rollbacks: AtomicU64::new(0),
            marks_raised: AtomicU64::new(0),
            stopped: Mutex::new(None),
        });
        let ttl = lease_ttl_seconds(&etcd);
        let lease_id = etcd.run("taking a lease", |mut c| async move { c.lease_grant(ttl, None).await })?.id();
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
        let count = meta.shard_count();
        let seen: Vec<u64> = (0..count).map(|s| store.mark(s).min(meta.shard_size())).collect();
        stats.cluster_used.store(seen.iter().sum(), Ordering::Relaxed);
        let mut ledger = EtcdLedger {
            expected: vec![None; count as usize],
            seen,
            etcd,
            meta,
            stats: Arc::clone(&stats),
            lease,
            refreshed: None,
            rollback_logged: None,
            mine: BTreeSet::new(),
            stopped: None,
            skipped: 0,
            membership,
        };
        ledger.reassert()?;
        if let Some(reason) = &ledger.stopped {
            anyhow::bail!("{reason}");
        }
        tracing::info!(cluster = %stats.cluster, node = %node_id, etcd = ledger.etcd.endpoints(), "joined the cluster");
        Ok((ledger, stats))
    }

    /// Records that etcd holds `mark` for `shard`; whether that is below
    /// what this node knew was there (etcd lost data).
    fn observe(&mut self, shard: u32, mark: u64) -> bool {
        let s = shard as usize;
        self.expected[s] = Some(mark);
        let rolled_back = mark < self.seen[s];
        // (A mark past the shard's end, from a hand-edited key, is "full".)
        let known = mark.min(self.meta.shard_size());
        if known > self.seen[s] {
            self.stats.cluster_used.fetch_add(known - self.seen[s], Ordering::Relaxed);
            self.seen[s] = known;
        }
        if rolled_back {
            self.stats.rollbacks.fetch_add(1, Ordering::Relaxed);
        }
        rolled_back
    }

    /// Reads every mark.
    fn refresh(&mut self) -> Result<(), EtcdError> {
        let marks = self.etcd.marks(self.meta.shard_count()).inspect_err(|_| self.stats.failure())?;
        self.stats.success();
        self.take_marks(marks);
        Ok(())
    }

    fn take_marks(&mut self, marks: Vec<u64>) {
        let rolled_back = (0..).zip(marks).filter(|&(shard, mark)| self.observe(shard, mark)).count();
        self.refreshed = Some(Instant::now());
        self.log_rollback(rolled_back);
    }

    fn log_rollback(&mut self, shards: usize) {
        if shards == 0 || self.rollback_logged.is_some_and(|at| at.elapsed() < Duration::from_secs(10)) {
            return;
        }
        self.rollback_logged = Some(Instant::now());
        tracing::error!(
            shards,
            etcd = self.etcd.endpoints(),
            "ROLLBACK: etcd's marks went back: {shards} shard mark(s) in {} are below values this node knows etcd held. \
             Was etcd restored from a backup, or were its keys deleted? This node never reserves below what it knew and \
             raises those marks again, but IDs that only other nodes reserved since may be issued twice: stop every node \
             and follow \"After an etcd restore\" in docs/cluster.md",
            self.etcd.key("marks/")
        );
    }

    /// The periodic re-assertion (and the first step at start): in one
    /// read, checks that the cluster's metadata is still this node's and
    /// takes every mark; then raises every mark that is below what this
    /// node knows (its state file's, or a higher one it read before), so
    /// an etcd restored from an old backup is healed by every live node.
    fn reassert(&mut self) -> anyhow::Result<()> {
        let (meta, marks) = self.etcd.meta_and_marks(self.meta.shard_count()).inspect_err(|_| self.stats.failure())?;
        self.stats.success();
        match meta {
            None => self.stop(format!(
                "the cluster's metadata {} vanished from etcd at {} (etcd wiped, or restored from a backup older than the cluster)",
                self.etcd.key("meta"),
                self.etcd.endpoints()
            )),
            Some(meta) if !meta.same_space(&self.meta) => self.stop(format!(
                "the cluster's metadata {} in etcd at {} changed (cluster id {:016x}, was {:016x}): the cluster was deleted and made again, or etcd restored from another cluster's backup",
                self.etcd.key("meta"),
                self.etcd.endpoints(),
                meta.cluster_id,
                self.meta.cluster_id
            )),
            Some(_) => {}
        }
        if self.stopped.is_some() {
            return Ok(());
        }
        self.take_marks(marks);
        let mut raised = 0u64;
        for shard in 0..self.meta.shard_count() {
            let (current, target) = (self.expected[shard as usize].unwrap_or(0), self.seen[shard as usize]);
            if current >= target {
                continue;
            }
            let (now, did) = self.etcd.raise_mark(shard, current, target).inspect_err(|_| self.stats.failure())?;
            self.observe(shard, now);
            raised += u64::from(did);
        }
        if raised > 0 {
            self.stats.marks_raised.fetch_add(raised, Ordering::Relaxed);
            tracing::error!(
                shards = raised,
                "raised {raised} shard mark(s) in etcd back to what this node knew (its state file, or marks it had read); \
                 no node reserves below them from now on"
            );
        }
        Ok(())
    }

    /// Stops reserving for good (until restarted), loudly.
    fn stop(&mut self, reason: String) {
        if self.stopped.is_some() {
            return;
        }
        let reason = format!(
            "reservations stopped: {reason}. This node serves the blocks it holds, then answers !ERR503. Stop every node \
             and follow \"After an etcd restore\" in docs/cluster.md"
        );
        tracing::error!("{reason}");
        *self.stats.stopped.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
        self.stopped = Some(reason);
        // Write nothing more into what is no longer this node's cluster:
        // no registration, and the claims go with the lease.
        self.membership.abort();
        let lease = self.lease.swap(0, Ordering::AcqRel);
        if lease != 0 {
            let _ = self.etcd.run("leaving the cluster", |mut c| async move { c.lease_revoke(lease).await });
        }
    }

    fn check_running(&self) -> Result<(), LedgerError> {
        match &self.stopped {
            Some(reason) => Err(LedgerError::Unavailable(reason.clone())),
            None => Ok(()),
        }
    }

    /// Raises `marks/SHARD` from `expected` to `new`, counting the result.
    /// `Ok(None)`: done; `Ok(Some(current))`: someone else moved it first
    /// (to `current`). An error leaves the outcome unknown: see
    /// [`Etcd::cas_mark`] for why that can only waste the block.
    fn cas(&self, shard: u32, expected: u64, new: u64) -> Result<Option<u64>, EtcdError> {
        let started = Instant::now();
        let result = self.etcd.cas_mark(shard, expected, new);
        // One line per reservation txn (TRADEID_LOG=tradeid_server::cluster=debug;
        // perf/bench.py reads the latencies from it), never per ID.
        tracing::debug!(
            shard,
            us = started.elapsed().as_micros() as u64,
            result = match &result {
                Ok(None) => "committed",
                Ok(Some(_)) => "conflict",
                Err(_) => "error",
            },
            "etcd reservation txn"
        );
        match &result {
            Err(_) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                self.stats.up.store(false, Ordering::Relaxed);
            }
            Ok(None) => {
                self.stats.success();
                self.stats.committed.fetch_add(1, Ordering::Relaxed);
                let micros = started.elapsed().as_micros() as u64;
                self.stats.latency_micros.lock().unwrap_or_else(|p| p.into_inner()).saturating_record(micros.max(1));
            }
            Ok(Some(_)) => {
                self.stats.success();
                self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    /// Tries to claim `shard` under this node's lease (taking a new lease
    /// first if the old one expired).
    fn try_claim(&self, shard: u32) -> Result<bool, EtcdError> {
        let mut lease = self.lease.load(Ordering::Acquire);
        if lease == 0 {
            let ttl = lease_ttl_seconds(&self.etcd);
            lease = self.etcd.run("taking a lease", |mut c| async move { c.lease_grant(ttl, None).await })?.id();
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

    /// The highest mark this node knows for `shard` (etcd's as last read,
    /// anything higher it knew before, its own file's).
    fn known(&self, store: &Store, shard: u32) -> u64 {
        self.expected[shard as usize].unwrap_or(0).max(self.seen[shard as usize]).max(store.mark(shard))
    }
}

fn unavailable(e: EtcdError) -> LedgerError {
    LedgerError::Unavailable(e.to_string())
}

impl Ledger for EtcdLedger {
    fn claim(&mut self, store: &Store, busy: &[bool]) -> Result<Option<u32>, LedgerError> {
        self.check_running()?;
        if self.refreshed.is_none_or(|at| at.elapsed() > REFRESH_EVERY) {
            self.refresh().map_err(unavailable)?;
        }
        let claims = self.etcd.claims().inspect_err(|_| self.stats.failure()).map_err(unavailable)?;
        let count = self.meta.shard_count();
        let size = self.meta.shard_size();
        // Resume partly used shards first (no holes), then untouched ones
        // from a point that differs per node, so nodes rarely collide.
        let offset = u32::from_str_radix(&self.stats.node_id[..8], 16).unwrap_or(0) % count;
        let open = |s: &u32| !busy[*s as usize] && self.known(store, *s) < size && !claims.contains_key(s);
        let partly = (0..count).filter(|s| self.known(store, *s) > 0);
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
        Ok((0..count).find(|s| !busy[*s as usize] && self.known(store, *s) < size))
    }

    /// The one decision everything rests on. The block starts at the
    /// highest of: etcd's mark (as this node last read or wrote it), what
    /// this node knows etcd held before (`seen`: never below it, even if
    /// etcd went back), and the local file's mark (`floor`). The CAS
    /// compares against etcd's mark as last read, so it commits only if
    /// nobody moved it since: two committed CASes on one shard move the
    /// mark from two different values, and their blocks cannot overlap.
    /// If etcd's mark went back, the same CAS also puts it back up.
    fn advance(&mut self, shard: u32, floor: u64, size: u64) -> Result<Advance, LedgerError> {
        self.check_running()?;
        let shard_size = self.meta.shard_size();
        for _ in 0..CAS_TRIES {
            let expected = match self.expected[shard as usize] {
                Some(mark) => mark,
                None => {
                    self.refresh().map_err(unavailable)?;
                    self.expected[shard as usize].unwrap_or(0)
                }
            };
            let start = expected.max(floor).max(self.seen[shard as usize]);
            if start >= shard_size {
                return Ok(Advance::Full);
            }
            let end = (start + size).min(shard_size);
            // An error here (a timeout, a lost reply) leaves `expected` as
            // it was: the retry compares against it again, so if the lost
            // txn did commit, the retry loses, rereads, and skips that block.
            match self.cas(shard, expected, end).map_err(unavailable)? {
                None => {
                    self.observe(shard, end);
                    *self.stats.last_reservation.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((shard, start, end, unix_now()));
                    return Ok(Advance::Block { start, end });
                }
                // Someone else moved the mark: retry from where it is now
                // (and never below what this node knew, if it went back).
                Some(current) => {
                    if self.observe(shard, current) {
                        self.log_rollback(1);
                    }
                }
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

    fn maintenance_every(&self) -> Option<Duration> {
        Some(REASSERT_EVERY)
    }

    /// The periodic re-assertion ([`EtcdLedger::reassert`]), skipped while
    /// etcd does not answer (the membership task notices its return within
    /// seconds), so that an unreachable etcd does not also hold up the
    /// reserver for a request timeout. A failure is already on the metrics
    /// and in the membership task's warnings; the next interval tries again.
    fn maintain(&mut self, _store: &Store) {
        // (Still tried every tenth time, in case only the membership fails.)
        if !self.stats.up.load(Ordering::Relaxed) && self.skipped < 9 {
            self.skipped += 1;
            return;
        }
        self.skipped = 0;
        if self.stopped.is_none() {
            if let Err(e) = self.reassert() {
                tracing::debug!("re-asserting the marks failed: {e:#}");
            }
        }
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

fn lease_ttl_seconds(etcd: &Etcd) -> i64 {
    etcd.lease_ttl.as_secs().max(1) as i64
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
    // The keep-alive stream, and the lease it keeps alive.
    let mut stream: Option<(i64, etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)> = None;
    let mut last_warning: Option<Instant> = None;
    let ttl = lease_ttl_seconds(&etcd);
    // Several keep-alives per TTL, so one lost to a hiccup is harmless.
    let every = (etcd.lease_ttl / 5).clamp(Duration::from_millis(200), Duration::from_secs(2));
    let mut expired = false;
    loop {
        tokio::time::sleep(every).await;
        let step = async {
            let mut id = lease.load(Ordering::Acquire);
            if id == 0 {
                id = client.lease_grant(ttl, None).await?.id();
                lease.store(id, Ordering::Release);
            }
            // A new lease (taken here, or by a claim) needs its own stream.
            if stream.as_ref().is_none_or(|(of, _, _)| *of != id) {
                let (keeper, responses) = client.lease_keep_alive(id).await?;
                stream = Some((id, keeper, responses));
            }
            let (_, keeper, responses) = stream.as_mut().expect("opened above");
            keeper.keep_alive().await?;
            let alive = responses.message().await?.is_some_and(|r| r.ttl() > 0);
            if alive {
                let info = stats.node_info(started, &state);
                client.put(node_key.clone(), info, Some(PutOptions::new().with_lease(id))).await?;
            }
            Ok::<(i64, bool), etcd_client::Error>((id, alive))
        };
        let was_expired = expired;
        let problem = match tokio::time::timeout(super::REQUEST_TIMEOUT, step).await {
            Ok(Ok((_, true))) => {
                stats.success();
                if std::mem::take(&mut expired) {
                    tracing::info!("took a new etcd lease and registered again (etcd at {})", etcd.endpoints());
                }
                continue;
            }
            // Expired: answered with a TTL of 0, or "lease not found".
            Ok(Ok((id, false))) => {
                let _ = lease.compare_exchange(id, 0, Ordering::AcqRel, Ordering::Relaxed);
                expired = true;
                LEASE_EXPIRED.to_string()
            }
            Ok(Err(e)) if e.to_string().contains("lease not found") => {
                let id = stream.as_ref().map_or(lease.load(Ordering::Acquire), |(of, _, _)| *of);
                let _ = lease.compare_exchange(id, 0, Ordering::AcqRel, Ordering::Relaxed);
                expired = true;
                LEASE_EXPIRED.to_string()
            }
            Ok(Err(e)) => format!("keeping this node's etcd lease alive failed: {e}"),
            Err(_) => format!("keeping this node's etcd lease alive took over {:?}", super::REQUEST_TIMEOUT),
        };
        // The keep-alive stream may be broken; open a new one next time.
        stream = None;
        stats.failure();
        // The moment the lease is found expired is always logged.
        let just_expired = expired && !was_expired;
        if just_expired || last_warning.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
            tracing::warn!("{problem} (etcd at {})", etcd.endpoints());
            last_warning = Some(Instant::now());
        }
    }
}

/// Logged when the lease is found expired.
const LEASE_EXPIRED: &str =
    "this node's etcd lease had expired (etcd out of reach, or this process paused, for longer \
     than its TTL): its shard claims are gone and other nodes may draw from its shards, which costs contention, never \
     a duplicate; taking a new one";

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// How stale the cached marks may get before a claim rereads them all.
const REFRESH_EVERY: Duration = Duration::from_secs(5);
/// How often every node rereads the marks and raises any that went below
/// what it knows (etcd restored from a backup while nodes run).
const REASSERT_EVERY: Duration = Duration::from_secs(3);
/// Shards tried per claim before sharing a claimed one.
const CLAIM_TRIES: usize = 8;
/// Compare-and-swap attempts on one shard before giving it up.
const CAS_TRIES: usize = 3;
