//! Benchmark hooks for `benches/cluster_scale.rs`: many in-process cluster
//! nodes against one real etcd. Not a supported API.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tradeid::id::ID_LEN;
use tradeid::ledger::{Advance, Ledger};
use tradeid::state::{self, ClusterBinding, Header, Store};
use tradeid::{GenError, Generator, GeneratorConfig};

use crate::cluster::ledger::{ClusterStats, EtcdLedger};
use crate::cluster::{Etcd, Options};

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// Nodes (ledgers or generators) that ran at once.
    pub nodes: usize,
    /// Seconds measured.
    pub seconds: f64,
    /// Reservation compare-and-swaps that committed, per second, all nodes.
    pub committed_per_second: f64,
    /// Compare-and-swaps that lost a race.
    pub conflicts: u64,
    /// Failed etcd requests.
    pub errors: u64,
    /// Median and 99th percentile reservation latency, in microseconds.
    pub p50_us: u64,
    /// See `p50_us`.
    pub p99_us: u64,
    /// IDs handed out per second, all nodes (0 for the raw txn test).
    pub ids_per_second: f64,
}

/// Joins `nodes` nodes of cluster `name` (each with its own connection,
/// lease and state file under `dir`).
fn join(
    endpoints: &str,
    name: &str,
    nodes: usize,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<(EtcdLedger, Arc<ClusterStats>, Store)>> {
    let options = Options {
        endpoints: vec![endpoints.to_string()],
        name: name.to_string(),
        ca: None,
        identity: None,
        user: None,
        lease_ttl: crate::cluster::DEFAULT_LEASE_TTL,
    };
    let mut joined = Vec::new();
    for i in 0..nodes {
        let etcd = Etcd::connect(&options)?;
        let (meta, _) = etcd.create_or_join(35, 22, false)?;
        let path = dir.join(format!("{name}-{i}"));
        let header = Header::for_cluster(
            meta.width,
            meta.shard_bits,
            meta.key,
            meta.check_char,
            ClusterBinding::new(meta.cluster_id, name).map_err(anyhow::Error::msg)?,
        )?;
        state::create(std::slice::from_ref(&path), &header)?;
        let (store, _) = Store::open(&[path])?;
        let (ledger, stats) = EtcdLedger::start(etcd, meta, &store)?;
        joined.push((ledger, stats, store));
    }
    Ok(joined)
}

fn report(nodes: usize, seconds: f64, stats: &[Arc<ClusterStats>], ids: u64) -> Report {
    let mut merged = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 2).expect("valid bounds");
    for s in stats {
        merged.add(&*s.latency_micros.lock().unwrap_or_else(|p| p.into_inner())).expect("same bounds");
    }
    let sum = |f: fn(&ClusterStats) -> u64| stats.iter().map(|s| f(s)).sum::<u64>();
    Report {
        nodes,
        seconds,
        committed_per_second: sum(|s| s.committed.load(Ordering::Relaxed)) as f64 / seconds,
        conflicts: sum(|s| s.conflicts.load(Ordering::Relaxed)),
        errors: sum(|s| s.errors.load(Ordering::Relaxed) + s.request_errors.load(Ordering::Relaxed)),
        p50_us: merged.value_at_quantile(0.5),
        p99_us: merged.value_at_quantile(0.99),
        ids_per_second: ids as f64 / seconds,
    }
}

/// The most reservation compare-and-swaps etcd commits: `nodes` ledgers,
/// one thread each, reserving `block`-sized blocks back to back for
/// `seconds`.
pub fn raw_reservations(
    endpoints: &str,
    name: &str,
    nodes: usize,
    block: u64,
    seconds: f64,
    dir: &std::path::Path,
) -> anyhow::Result<Report> {
    let joined = join(endpoints, name, nodes, dir)?;
    let stats: Vec<Arc<ClusterStats>> = joined.iter().map(|(_, s, _)| Arc::clone(s)).collect();
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(seconds);
    std::thread::scope(|s| {
        for (mut ledger, _, store) in joined {
            s.spawn(move || {
                let busy = vec![false; store.header().geometry.shard_count() as usize];
                let mut shard = None;
                while Instant::now() < until {
                    let current = match shard {
                        Some(s) => s,
                        None => match ledger.claim(&store, &busy) {
                            Ok(Some(s)) => {
                                shard = Some(s);
                                s
                            }
                            _ => continue,
                        },
                    };
                    match ledger.advance(current, store.mark(current), block) {
                        Ok(Advance::Block { end, .. }) => {
                            let _ = store.persist(current, end, block as u32, 0);
                        }
                        Ok(Advance::Full | Advance::Lost) => {
                            ledger.release(current);
                            shard = None;
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            });
        }
    });
    Ok(report(nodes, started.elapsed().as_secs_f64(), &stats, 0))
}

/// The etcd load of real traffic: `nodes` generators with the production
/// adaptive block sizes, together handing out `total_rate` IDs per second
/// for `seconds`, one handle each.
pub fn paced_generators(
    endpoints: &str,
    name: &str,
    nodes: usize,
    total_rate: f64,
    seconds: f64,
    dir: &std::path::Path,
) -> anyhow::Result<Report> {
    let joined = join(endpoints, name, nodes, dir)?;
    let stats: Vec<Arc<ClusterStats>> = joined.iter().map(|(_, s, _)| Arc::clone(s)).collect();
    let generators: Vec<Generator> = joined
        .into_iter()
        .map(|(ledger, _, store)| Generator::with_ledger(store, GeneratorConfig::default(), Box::new(ledger)))
        .collect();
    let per_node = total_rate / nodes as f64;
    let started = Instant::now();
    let served: u64 = std::thread::scope(|s| {
        let threads: Vec<_> = generators
            .iter()
            .map(|generator| {
                s.spawn(move || {
                    let mut handle = generator.handle().expect("a first block");
                    let mut out = vec![0u8; 1000 * ID_LEN];
                    let mut served = 0u64;
                    loop {
                        let elapsed = started.elapsed().as_secs_f64();
                        if elapsed >= seconds {
                            return served;
                        }
                        let due = (elapsed * per_node) as u64;
                        if served + 1000 > due {
                            std::thread::sleep(Duration::from_micros(500));
                            continue;
                        }
                        match handle.try_fill(&mut out) {
                            Ok(n) => served += n as u64,
                            Err(GenError::Unavailable) => std::thread::sleep(Duration::from_micros(200)),
                            Err(e) => panic!("{e}"),
                        }
                    }
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("a pacing thread")).sum()
    });
    let seconds = started.elapsed().as_secs_f64();
    drop(generators);
    Ok(report(nodes, seconds, &stats, served))
}
