//! Cluster mode against a real etcd: several nodes under load, kill -9
//! chaos with stale and cloned state files, an etcd leader killed, etcd
//! fully down, nodes racing for one shard, a small space drained exactly
//! once, and TLS and authentication. Uniqueness is always checked on IDs.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::etcd::{Etcd, Proxy, Tls};
use crate::harness::*;

/// `tradeid init --state DIR/NAME --etcd E --cluster C EXTRA...`.
fn init_node(dir: &Path, name: &str, etcd: &str, cluster: &str, extra: &[&str]) -> PathBuf {
    let mut args = vec!["--etcd", etcd, "--cluster", cluster];
    args.extend_from_slice(extra);
    init_state(dir, name, &args)
}

/// A node serving `state` in cluster `cluster`.
fn serve_node(state: &Path, etcd: &str, cluster: &str, extra: &[&str]) -> Daemon {
    let mut args = vec!["--etcd", etcd, "--cluster", cluster, "--admin", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Daemon::start(state, &args)
}

fn assert_unique(ids: &[String], context: &str) -> HashSet<String> {
    let mut seen = HashSet::with_capacity(ids.len());
    for id in ids {
        assert!(seen.insert(id.clone()), "{context}: duplicate ID {id}");
    }
    seen
}

/// Loads `targets` from `clients` threads while `during` runs.
fn under_load<T>(targets: &Mutex<Vec<SocketAddr>>, clients: usize, during: impl FnOnce() -> T) -> (Collected, T) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let load = s.spawn(|| hammer_targets(targets, clients, &stop));
        let result = during();
        stop.store(true, Ordering::Relaxed);
        (load.join().unwrap(), result)
    })
}

#[test]
fn three_nodes_under_mixed_load_issue_no_id_twice() {
    let etcd = Etcd::single();
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<Daemon> = (0..3)
        .map(|i| {
            let state = init_node(dir.path(), &format!("n{i}"), &etcd.endpoints(), "mixed", &[]);
            serve_node(&state, &etcd.endpoints(), "mixed", &["--workers", "2", "--block-max", "65536"])
        })
        .collect();
    let targets = Mutex::new(nodes.iter().map(|n| n.addr).collect());
    let (got, ()) = under_load(&targets, 6, || std::thread::sleep(Duration::from_secs(3)));
    assert!(got.ids.len() > 100_000, "only {} IDs", got.ids.len());
    assert_unique(&got.ids, "3 nodes");
    // Every node served, and reserved through etcd.
    for node in &nodes {
        assert!(node.metric("tradeid_ids_served_total") > 0.0);
        assert!(node.metric("tradeid_etcd_txn_total{result=\"committed\"}") >= 2.0);
    }
    // The cluster-wide view lists the three live nodes.
    let out = run(&["inspect", "--etcd", &etcd.endpoints(), "--cluster", "mixed"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("live nodes     3"), "{text}");
    assert!(text.contains("shards claimed:") && text.contains("last="), "{text}");
}

/// kill -9 chaos across nodes, including a restart from a stale copy of a
/// node's state file, a copy of a running node's file served beside it,
/// and nodes joining mid-run. Small blocks make reservations frequent.
#[test]
fn kill_9_chaos_across_nodes_with_stale_and_cloned_state_files() {
    let etcd = Etcd::single();
    let e = etcd.endpoints();
    let dir = tempfile::tempdir().unwrap();
    let seed = seed();
    let mut rng = Rng(seed);
    let rounds = iterations("TRADEID_CLUSTER_CHAOS_ROUNDS", 12);
    // Four shards and a 2 s lease: restarted, stale and cloned nodes land
    // on shards others are drawing from, and nodes soon outnumber shards.
    let flags = ["--workers", "1", "--block-max", "2048", "--etcd-lease-ttl", "2"];
    let mut states: Vec<PathBuf> =
        vec![init_node(dir.path(), "n0", &e, "chaos", &["--width", "26", "--shard-bits", "24"])];
    states.push(init_node(dir.path(), "n1", &e, "chaos", &[]));
    let mut nodes: Vec<Option<Daemon>> = states.iter().map(|s| Some(serve_node(s, &e, "chaos", &flags))).collect();
    let stale = dir.path().join("stale-copy-of-n0");
    std::fs::copy(&states[0], &stale).unwrap();
    let targets = Mutex::new(Vec::new());
    let set_targets =
        |nodes: &[Option<Daemon>]| *targets.lock().unwrap() = nodes.iter().flatten().map(|n| n.addr).collect();
    set_targets(&nodes);
    let (got, actions) = under_load(&targets, 4, || {
        let mut actions = Vec::new();
        for round in 0..rounds {
            std::thread::sleep(Duration::from_millis(150 + rng.below(200)));
            let action = rng.below(4);
            let i = rng.below(nodes.len() as u64) as usize;
            match action {
                // kill -9 a node and bring it back.
                0 => {
                    if let Some(mut node) = nodes[i].take() {
                        node.kill9();
                    }
                    set_targets(&nodes);
                    nodes[i] = Some(serve_node(&states[i], &e, "chaos", &flags));
                    actions.push(format!("round {round}: kill -9 and restart node {i}"));
                }
                // kill -9 node 0 and restart it from its stale copy.
                1 => {
                    if let Some(mut node) = nodes[0].take() {
                        node.kill9();
                    }
                    set_targets(&nodes);
                    std::fs::copy(&stale, &states[0]).unwrap();
                    nodes[0] = Some(serve_node(&states[0], &e, "chaos", &flags));
                    actions.push(format!("round {round}: node 0 restarted from a stale copy"));
                }
                // A copy of a running node's file, served beside it.
                2 => {
                    let clone = dir.path().join(format!("clone-{round}"));
                    std::fs::copy(&states[i], &clone).unwrap();
                    nodes.push(Some(serve_node(&clone, &e, "chaos", &flags)));
                    states.push(clone);
                    actions.push(format!("round {round}: a copy of node {i}'s file served beside it"));
                }
                // A new node joins.
                _ => {
                    let name = format!("joined-{round}");
                    let state = init_node(dir.path(), &name, &e, "chaos", &[]);
                    nodes.push(Some(serve_node(&state, &e, "chaos", &flags)));
                    states.push(state);
                    actions.push(format!("round {round}: a new node joined"));
                }
            }
            set_targets(&nodes);
        }
        std::thread::sleep(Duration::from_millis(300));
        actions
    });
    assert!(got.ids.len() > 10_000, "seed {seed}: only {} IDs", got.ids.len());
    let mut seen = HashSet::new();
    for id in &got.ids {
        assert!(seen.insert(id.clone()), "seed {seed}: duplicate {id} after: {actions:#?}");
    }
    // They did contend: the survivors alone lost compare-and-swaps.
    let conflicts: f64 = nodes.iter().flatten().map(|n| n.metric("tradeid_etcd_txn_total{result=\"conflict\"}")).sum();
    eprintln!(
        "seed {seed}: {} IDs, {} nodes at the end, {conflicts} conflicts among them",
        got.ids.len(),
        nodes.iter().flatten().count()
    );
    assert!(conflicts > 0.0, "seed {seed}: the nodes never raced for a shard; the test proves little");
}

/// With a 3-member etcd, the leader is killed under load: no duplicate,
/// serving continues (replies keep coming, with IDs again once a leader is
/// elected; `!ERR503` only between the kill and the first reservation
/// after the election, i.e. only while a worker's held blocks run out
/// before etcd answers), and reservations resume after the election.
#[test]
fn killing_the_etcd_leader_under_load_loses_nothing() {
    let mut etcd = Etcd::three();
    let e = etcd.endpoints();
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<Daemon> = (0..2)
        .map(|i| {
            let state = init_node(dir.path(), &format!("n{i}"), &e, "leader", &[]);
            serve_node(&state, &e, "leader", &["--workers", "1"])
        })
        .collect();
    let targets = Mutex::new(nodes.iter().map(|n| n.addr).collect());
    let committed = |node: &Daemon| node.metric("tradeid_etcd_txn_total{result=\"committed\"}");
    let (got, (killed, killed_at, elected_at, resumed, end)) = under_load(&targets, 4, || {
        // Long enough for blocks to grow to their size under this load.
        std::thread::sleep(Duration::from_secs(2));
        let killed = etcd.leader();
        let killed_at = Instant::now();
        etcd.kill(killed);
        let before: Vec<f64> = nodes.iter().map(committed).collect();
        let leader = etcd.leader(); // waits for the election
        assert_ne!(leader, killed);
        let elected_at = Instant::now();
        // When each node's reservations resumed.
        let mut resumed: Vec<Option<Instant>> = vec![None; nodes.len()];
        while killed_at.elapsed() < Duration::from_secs(8) {
            for (i, node) in nodes.iter().enumerate() {
                if resumed[i].is_none() && committed(node) > before[i] {
                    resumed[i] = Some(Instant::now());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (killed, killed_at, elected_at, resumed, Instant::now())
    });
    assert_unique(&got.ids, "leader killed");
    let resumed: Vec<Instant> = resumed
        .iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap_or_else(|| panic!("node {i} committed no reservation after leader m{killed} was killed"))
        })
        .collect();
    eprintln!(
        "leader m{killed} killed; elected after {:?}, reservations resumed after {:?}; {} replies, errors {:?}",
        elected_at - killed_at,
        resumed.iter().map(|r| *r - killed_at).collect::<Vec<_>>(),
        got.timeline.len(),
        got.errors
    );
    let warm = killed_at - Duration::from_secs(1);
    for (i, node) in nodes.iter().enumerate() {
        let replies: Vec<&(Instant, SocketAddr, Result<(), String>)> =
            got.timeline.iter().filter(|(at, from, _)| *from == node.addr && *at >= warm).collect();
        // Serving continued: replies kept coming (a loaded test machine
        // may pause a process for a moment; 2 s is far beyond that).
        for pair in replies.windows(2) {
            let gap = pair[1].0 - pair[0].0;
            assert!(gap < Duration::from_secs(2), "node {i}: no reply for {gap:?}");
        }
        // !ERR503 only from the kill until shortly after this node's first
        // reservation after the election (its first block may go before
        // the next is reserved): while its held blocks are gone and etcd
        // does not answer yet.
        let settled = resumed[i] + Duration::from_secs(1);
        for (at, _, reply) in &replies {
            if let Err(text) = reply {
                assert_eq!(text, "!ERR503", "node {i}: unexpected error reply");
                assert!(
                    *at >= killed_at && *at <= settled,
                    "node {i}: !ERR503 {:?} after the kill, outside the election (it resumed {:?} after the kill)",
                    at.saturating_duration_since(killed_at),
                    resumed[i] - killed_at
                );
            }
        }
        // IDs again, and kept coming, once it resumed.
        let mut last = settled;
        let id_times = replies.iter().filter(|(at, _, r)| r.is_ok() && *at >= settled).map(|(at, _, _)| *at);
        for at in id_times.chain([end]) {
            assert!(at - last < Duration::from_secs(2), "node {i}: no IDs for {:?} after resuming", at - last);
            last = at;
        }
    }
    for node in &nodes {
        let (status, body) = node.http_get("/readyz");
        assert_eq!(status, 200, "{body}");
    }
}

/// etcd fully down for several seconds under load: the node serves the
/// blocks it holds, answers !ERR503 only once they are gone, and recovers
/// by itself when etcd is back.
#[test]
fn a_full_etcd_outage_is_ridden_through_on_held_blocks() {
    let mut etcd = Etcd::single();
    let e = etcd.endpoints();
    let dir = tempfile::tempdir().unwrap();
    let state = init_node(dir.path(), "n", &e, "outage", &[]);
    let node = serve_node(&state, &e, "outage", &["--workers", "1", "--block-max", "2048"]);
    // A reply (IDs or an error), never silence.
    let mut asker = Asker::new(node.addr);
    let mut ask = |count: u16| -> Vec<u8> { asker.ask(count) };
    let mut seen = HashSet::new();
    for _ in 0..20 {
        insert_unique(&mut seen, ids_of(&ask(100)));
    }
    assert_eq!(node.metric("tradeid_etcd_reservation_failures_total"), 0.0);
    etcd.kill_all();
    // A reservation in flight at the kill has its answer (or its timeout)
    // by now: what the node holds no longer grows.
    std::thread::sleep(Duration::from_millis(2500));
    let held_at_outage = node.metric("tradeid_ids_held");
    // Drain: IDs while blocks are held, then 503 once, and then held is 0.
    let mut served_during_outage = 0usize;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reply = ask(100);
        if reply == b"!ERR503" {
            break;
        }
        let ids = ids_of(&reply);
        served_during_outage += ids.len();
        insert_unique(&mut seen, ids);
        assert!(Instant::now() < deadline, "still serving after 20 s of outage: more than it could hold");
    }
    assert!(served_during_outage > 0, "no ID served from held blocks during the outage");
    assert_eq!(node.metric("tradeid_ids_held"), 0.0, "!ERR503 while IDs were still held");
    assert!(served_during_outage as f64 <= held_at_outage, "{served_during_outage} served, {held_at_outage} held");
    // Not ready, and why; the metrics agree (the first failed request may
    // take up to its timeout to report, after a periodic read's).
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let (status, body) = node.http_get("/readyz");
        if status == 503 && body.contains("etcd unreachable") {
            break;
        }
        assert!(Instant::now() < deadline, "{status} {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(node.metric("tradeid_etcd_up"), 0.0);
    assert!(node.metric("tradeid_etcd_reservation_failures_total") >= 1.0);
    assert!(node.stderr().contains("cannot reserve a block") && node.stderr().contains(e.split(',').next().unwrap()));
    // Several seconds down, then back: recovery without a restart.
    std::thread::sleep(Duration::from_secs(2));
    etcd.restart_all();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reply = ask(100);
        if reply != b"!ERR503" {
            insert_unique(&mut seen, ids_of(&reply));
            break;
        }
        assert!(Instant::now() < deadline, "no recovery within 15 s of etcd's return");
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..50 {
        let reply = ask(100);
        if reply != b"!ERR503" {
            insert_unique(&mut seen, ids_of(&reply));
        }
    }
    assert_eq!(node.http_get("/readyz").0, 200);
    assert!(node.stderr().contains("reservations resumed"), "{}", node.stderr());
}

/// A client of one node that tolerates a loaded test machine: a reply
/// that is late is waited for again (and counted when it comes), never
/// taken for silence at the first timeout.
struct Asker {
    socket: std::net::UdpSocket,
    addr: SocketAddr,
    /// Requests sent whose reply has not come yet.
    unanswered: usize,
    buf: [u8; 2048],
}

impl Asker {
    fn new(addr: SocketAddr) -> Asker {
        Asker { socket: client_socket(addr, Duration::from_millis(500)), addr, unanswered: 0, buf: [0; 2048] }
    }

    /// Asks for `count` IDs; returns the next reply (possibly a late one to
    /// an earlier request: every reply is a grant of its own). A node that
    /// stays silent for 20 s fails the test.
    fn ask(&mut self, count: u16) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.unanswered == 0 || Instant::now() >= deadline - Duration::from_secs(18) {
                self.socket.send(&request(count)).unwrap();
                self.unanswered += 1;
            }
            match self.socket.recv(&mut self.buf) {
                Ok(n) => {
                    self.unanswered -= 1;
                    return self.buf[..n].to_vec();
                }
                Err(_) => assert!(Instant::now() < deadline, "node {} silent for 20 s", self.addr),
            }
        }
    }

    /// The replies still on their way (bounded), so that none is lost.
    fn finish(&mut self) -> Vec<Vec<u8>> {
        let mut late = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.unanswered > 0 && Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut self.buf) {
                self.unanswered -= 1;
                late.push(self.buf[..n].to_vec());
            }
        }
        late
    }
}

/// The IDs of the replies that carry some (errors are skipped).
fn ids_in(replies: Vec<Vec<u8>>) -> Vec<String> {
    replies.iter().filter(|r| !r.starts_with(b"!ERR")).flat_map(|r| ids_of(r)).collect()
}

/// Asks `addr` for 4 IDs at a time until it answers !ERR507 20 times in a
/// row (within 60 s); returns every ID it handed out.
fn drain(addr: SocketAddr) -> Vec<String> {
    let mut asker = Asker::new(addr);
    let mut ids = Vec::new();
    let mut exhausted_in_a_row = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while exhausted_in_a_row < 20 {
        assert!(Instant::now() < deadline, "node {addr} never exhausted");
        match asker.ask(4).as_slice() {
            b"!ERR507" => exhausted_in_a_row += 1,
            b"!ERR503" => std::thread::sleep(Duration::from_millis(2)),
            reply => {
                exhausted_in_a_row = 0;
                ids.extend(ids_of(reply));
            }
        }
    }
    ids.extend(ids_in(asker.finish()));
    ids
}

/// Drains every node at once; every ID they handed out.
fn drain_all(addrs: &[SocketAddr]) -> Vec<String> {
    std::thread::scope(|s| {
        let threads: Vec<_> = addrs.iter().map(|&a| s.spawn(move || drain(a))).collect();
        threads.into_iter().flat_map(|t| t.join().unwrap()).collect()
    })
}

/// Asks `addr` for 4 IDs at a time until at least `n` IDs arrived
/// (waiting out !ERR503, within 60 s).
fn take(addr: SocketAddr, n: usize) -> Vec<String> {
    let mut asker = Asker::new(addr);
    let mut ids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ids.len() < n {
        assert!(Instant::now() < deadline, "node {addr}: only {} of {n} IDs in 60 s", ids.len());
        match asker.ask(4).as_slice() {
            b"!ERR503" => std::thread::sleep(Duration::from_millis(2)),
            reply => ids.extend(ids_of(reply)),
        }
    }
    ids.extend(ids_in(asker.finish()));
    ids
}

/// Asks `addr` for IDs until it answers !ERR503: what it holds. Panics
/// once it served more than `limit`.
fn until_unavailable(addr: SocketAddr, limit: usize) -> Vec<String> {
    let mut asker = Asker::new(addr);
    let mut ids = Vec::new();
    loop {
        let reply = asker.ask(4);
        if reply == b"!ERR503" {
            break;
        }
        ids.extend(ids_of(&reply));
        assert!(ids.len() <= limit, "node {addr} served {} IDs, more than the {limit} it can hold", ids.len());
    }
    ids.extend(ids_in(asker.finish()));
    ids
}

/// The node id a cluster node registered under (from its metrics).
fn node_id(node: &Daemon) -> String {
    let metrics = node.http_get("/metrics").1;
    let line = metrics.lines().find(|l| l.starts_with("tradeid_cluster_info{")).expect("cluster info");
    line.split("node=\"").nth(1).unwrap().split('"').next().unwrap().to_string()
}

/// Runs `nodes` one-worker nodes of a small cluster until every node
/// answers !ERR507 many times in a row; returns every ID they handed out
/// and the nodes (for their metrics).
fn drain_small_cluster(
    cluster: &str,
    width: &str,
    shard_bits: &str,
    nodes: usize,
    block_max: &str,
) -> (Vec<String>, Vec<Daemon>, Etcd) {
    let etcd = Etcd::single();
    let e = etcd.endpoints();
    let dir = tempfile::tempdir().unwrap();
    let first = init_node(dir.path(), "n0", &e, cluster, &["--width", width, "--shard-bits", shard_bits]);
    let mut states = vec![first];
    for i in 1..nodes {
        states.push(init_node(dir.path(), &format!("n{i}"), &e, cluster, &[]));
    }
    let daemons: Vec<Daemon> = states
        .iter()
        .map(|s| serve_node(s, &e, cluster, &["--workers", "1", "--block-max", block_max, "--max-batch", "4"]))
        .collect();
    let ids = drain_all(&daemons.iter().map(|d| d.addr).collect::<Vec<_>>());
    drop(dir);
    (ids, daemons, etcd)
}

/// A small space drained across 3 nodes: the union of their IDs is the
/// whole space, each ID exactly once, and every node ends in !ERR507.
#[test]
fn a_small_space_is_drained_exactly_once_across_three_nodes() {
    let (ids, _nodes, _etcd) = drain_small_cluster("small", "11", "7", 3, "64");
    let seen = assert_unique(&ids, "small space");
    assert_eq!(seen.len(), 1 << 11, "the union must be the whole space");
    for id in &seen {
        assert!(tradeid::Id::parse(id).unwrap().value() < 1 << 11, "{id} outside the space");
    }
}

/// Four nodes and two shards, with tiny blocks: at least two nodes share
/// each shard, compare-and-swap conflicts happen and are retried, and no
/// two blocks overlap: the space is handed out exactly once.
#[test]
fn nodes_racing_for_the_same_shard_never_overlap() {
    let (ids, nodes, _etcd) = drain_small_cluster("race", "10", "9", 4, "16");
    // (max batch 4, so a block of 16 holds four of the largest requests)
    let seen = assert_unique(&ids, "racing nodes");
    assert_eq!(seen.len(), 1 << 10);
    let conflicts: f64 = nodes.iter().map(|n| n.metric("tradeid_etcd_txn_total{result=\"conflict\"}")).sum();
    assert!(conflicts > 0.0, "the nodes never raced; the test proves nothing");
}

/// Two concurrent first inits of one cluster end with one cluster.
#[test]
fn concurrent_first_inits_make_one_cluster() {
    let etcd = Etcd::single();
    let e = etcd.endpoints();
    let dir = tempfile::tempdir().unwrap();
    let outputs: Vec<String> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let path = dir.path().join(format!("s{i}"));
                let e = e.clone();
                s.spawn(move || {
                    let out = run(&["init", "--state", path.to_str().unwrap(), "--etcd", &e, "--cluster", "race"]);
                    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                    String::from_utf8(out.stdout).unwrap()
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let created = outputs.iter().filter(|o| o.contains("created cluster")).count();
    assert_eq!(created, 1, "{outputs:#?}");
    let ids: HashSet<&str> =
        outputs.iter().map(|o| o.split("(id ").nth(1).unwrap().split(',').next().unwrap()).collect();
    assert_eq!(ids.len(), 1, "every node joined the same cluster: {outputs:#?}");
}

/// Files and clusters that do not belong together are refused.
#[test]
fn mismatched_files_and_clusters_are_refused() {
    let etcd = Etcd::single();
    let e = etcd.endpoints();
    let dir = tempfile::tempdir().unwrap();
    let node = init_node(dir.path(), "n", &e, "alpha", &[]);
    let plain = init_state(dir.path(), "plain", &[]);
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let cases: [(Vec<String>, i32, &str); 5] = [
        // A cluster node's file served standalone, or with gen.
        (
            vec!["serve".into(), "--state".into(), path(&node), "--listen".into(), "127.0.0.1:0".into()],
            78,
            "belongs to etcd cluster \"alpha\"",
        ),
        (vec!["gen".into(), "--state".into(), path(&node), "-n".into(), "1".into()], 78, "belongs to etcd cluster"),
        // A standalone file served in a cluster.
        (
            vec![
                "serve".into(),
                "--state".into(),
                path(&plain),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--etcd".into(),
                e.clone(),
                "--cluster".into(),
                "alpha".into(),
            ],
            78,
            "is not a cluster node's",
        ),
        // The node's file under another cluster name.
        (
            vec![
                "serve".into(),
                "--state".into(),
                path(&node),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--etcd".into(),
                e.clone(),
                "--cluster".into(),
                "beta".into(),
            ],
            78,
            "belongs to cluster \"alpha\", not \"beta\"",
        ),
        // Joining with a different geometry.
        (
            vec![
                "init".into(),
                "--state".into(),
                path(&dir.path().join("x")),
                "--etcd".into(),
                e.clone(),
                "--cluster".into(),
                "alpha".into(),
                "--width".into(),
                "20".into(),
            ],
            78,
            "already exists with 2^35 IDs",
        ),
    ];
    for (args, code, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // A corrupt metadata key (a width no state file can hold) is refused
    // at once, naming the key and the endpoint, never waited out.
    let corrupt = init_node(dir.path(), "corrupt", &e, "gamma", &[]);
    let meta = etcd.etcdctl(&["get", "--print-value-only", "/tradeid/gamma/meta"]).stdout;
    let bad = String::from_utf8(meta).unwrap().trim_end().replace("width 35", "width 99");
    assert!(etcd.etcdctl(&["put", "/tradeid/gamma/meta", &bad]).status.success());
    let started = Instant::now();
    let out =
        run(&["serve", "--state", &path(&corrupt), "--listen", "127.0.0.1:0", "--etcd", &e, "--cluster", "gamma"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{err}");
    assert!(
        err.contains("/tradeid/gamma/meta") && err.contains(&format!("etcd at {e}")) && err.contains("width 99"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(20), "waited {:?} for a corrupt key", started.elapsed());
    // The cluster deleted and made again under the same name is another
    // space: the old node file is refused.
    assert!(etcd.etcdctl(&["del", "--prefix", "/tradeid/alpha/"]).status.success());
    init_node(dir.path(), "new", &e, "alpha", &[]);
    let out = run(&["serve", "--state", &path(&node), "--listen", "127.0.0.1:0", "--etcd", &e, "--cluster", "alpha"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("was made for an earlier cluster"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // etcd down: a clear error naming the endpoint, exit 69.
    let dead = format!("http://127.0.0.1:{}", stable_port());
    let out = run(&["inspect", "--etcd", &dead, "--cluster", "alpha"]);
    assert_eq!(out.status.code(), Some(69), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("etcd at {dead}")),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// etcd with users: wrong credentials are refused with a clear error and
/// exit 77; the right ones, read from a file, serve.
#[test]
fn etcd_authentication_refuses_wrong_credentials_and_serves_right_ones() {
    let mut etcd = Etcd::single();
    let e = etcd.endpoints();
    etcd.enable_auth();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    std::fs::write(&good, "s3cret\n").unwrap();
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "guess\n").unwrap();
    let state = dir.path().join("s");
    let state_arg = state.to_str().unwrap();
    // No credentials at all.
    let out = run(&["init", "--state", state_arg, "--etcd", &e, "--cluster", "secure"]);
    assert_eq!(out.status.code(), Some(77), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--etcd-user"), "{}", String::from_utf8_lossy(&out.stderr));
    // Wrong password.
    let out = run(&[
        "init",
        "--state",
        state_arg,
        "--etcd",
        &e,
        "--cluster",
        "secure",
        "--etcd-user",
        "tradeid",
        "--etcd-password-file",
        bad.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{err}");
    assert!(err.contains(&format!("etcd at {e}")) && err.contains("authentication failed"), "{err}");
    assert!(!state.exists(), "nothing is created on a refusal");
    // A user without a password is refused before connecting.
    let out = run(&["init", "--state", state_arg, "--etcd", &e, "--cluster", "secure", "--etcd-user", "tradeid"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs a password"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Right password from a file for init; from the environment for serve.
    let out = run(&[
        "init",
        "--state",
        state_arg,
        "--etcd",
        &e,
        "--cluster",
        "secure",
        "--etcd-user",
        "tradeid",
        "--etcd-password-file",
        good.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // serve, too, refuses a wrong password at once, once, with EX_NOPERM.
    let out = run(&[
        "serve",
        "--state",
        state_arg,
        "--listen",
        "127.0.0.1:0",
        "--etcd",
        &e,
        "--cluster",
        "secure",
        "--etcd-user",
        "tradeid",
        "--etcd-password-file",
        bad.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{err}");
    assert!(err.contains(&format!("etcd at {e}")) && err.contains("check --etcd-user and the password"), "{err}");
    assert_eq!(err.matches("authentication failed").count(), 1, "printed once: {err}");
    assert!(!err.contains("waiting for etcd"), "a refusal is not waited out: {err}");
    let node = Daemon::start_with(
        &state,
        &["--etcd", &e, "--cluster", "secure", "--etcd-user", "tradeid"],
        &[("TRADEID_ETCD_PASSWORD", "s3cret")],
    )
    .unwrap();
    ids_of(&exchange(node.addr, &request(5), Duration::from_secs(2)).unwrap());
    assert!(!node.stderr().contains("s3cret"), "the password appears in the log");
}

/// Makes a CA, an etcd server certificate for 127.0.0.1, and a client
/// certificate, with the openssl command-line tool.
fn make_certs(dir: &Path, ca_name: &str) -> (Tls, Tls) {
    let sh = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is installed (CI installs it)");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ca = format!("{ca_name}-ca");
    sh(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN={ca}"),
        "-keyout",
        &format!("{ca}.key"),
        "-out",
        &format!("{ca}.crt"),
    ]);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    for who in ["server", "client"] {
        let name = format!("{ca_name}-{who}");
        sh(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &format!("/CN={who}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ]);
        sh(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            &format!("{name}.crt"),
        ]);
    }
    let tls = |who: &str| Tls {
        ca: dir.join(format!("{ca}.crt")),
        cert: dir.join(format!("{ca_name}-{who}.crt")),
        key: dir.join(format!("{ca_name}-{who}.key")),
    };
    (tls("server"), tls("client"))
}

/// etcd over TLS with client certificates: a node without the CA, or with
/// another CA's certificate, is refused with a clear error; one with the
/// right files serves.
#[test]
fn etcd_over_tls_with_client_certificates() {
    let certs = tempfile::tempdir().unwrap();
    let (server, client) = make_certs(certs.path(), "good");
    let (_, stranger) = make_certs(certs.path(), "other");
    let etcd = Etcd::single_tls(server);
    let e = etcd.endpoints();
    assert!(e.starts_with("https://"));
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s");
    let s = state.to_str().unwrap();
    let file = |p: &PathBuf| p.to_str().unwrap().to_string();
    // A certificate from another CA.
    let out = run(&[
        "init",
        "--state",
        s,
        "--etcd",
        &e,
        "--cluster",
        "tls",
        "--etcd-ca",
        &file(&client.ca),
        "--etcd-cert",
        &file(&stranger.cert),
        "--etcd-key",
        &file(&stranger.key),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a stranger's certificate was accepted");
    assert!(err.contains(&format!("etcd at {e}")), "{err}");
    // No CA: the server's certificate cannot be checked.
    let out = run(&["init", "--state", s, "--etcd", &e, "--cluster", "tls"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("etcd at {e}")),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!state.exists());
    // The right files.
    let tls_args =
        ["--etcd-ca", &file(&client.ca), "--etcd-cert", &file(&client.cert), "--etcd-key", &file(&client.key)];
    let mut init = vec!["init", "--state", s, "--etcd", &e, "--cluster", "tls"];
    init.extend_from_slice(&tls_args);
    let out = run(&init);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut serve = vec!["--etcd", &e, "--cluster", "tls"];
    serve.extend_from_slice(&tls_args);
    let node = Daemon::start(&state, &serve);
    ids_of(&exchange(node.addr, &request(5), Duration::from_secs(2)).unwrap());
}

/// Flags for small, fast-moving nodes: one worker, blocks of at most 64,
/// requests of at most 4.
const SMALL: [&str; 6] = ["--workers", "1", "--block-max", "64", "--max-batch", "4"];

/// etcd restored from an old backup while two nodes run, racing for the
/// one shard of a small space: each node has read the shard's latest mark,
/// but etcd now says the shard is untouched. Neither may reserve below what
/// it knew: the one whose own file is behind the other's blocks would
/// otherwise hand out the other's IDs again.
#[test]
fn a_node_never_reserves_below_a_mark_it_knew_when_etcd_goes_back() {
    let mut etcd = Etcd::single();
    let e = etcd.endpoints();
    let dir = tempfile::tempdir().unwrap();
    let a = init_node(dir.path(), "a", &e, "back", &["--width", "10", "--shard-bits", "10"]);
    let b = init_node(dir.path(), "b", &e, "back", &[]);
    let backup = dir.path().join("backup.db");
    etcd.snapshot(&backup); // the cluster, no mark yet
    let nodes = [serve_node(&a, &e, "back", &SMALL), serve_node(&b, &e, "back", &SMALL)];
    let mut seen = HashSet::new();
    for _ in 0..15 {
        for node in &nodes {
            insert_unique(&mut seen, take(node.addr, 20));
        }
    }
    // Long enough for each node's periodic re-read of every mark.
    std::thread::sleep(Duration::from_millis(4500));
    let before = etcd.marks("back");
    assert!(before[&0] > 600, "{before:?}");
    // The node whose own file is behind (the other reserved last) goes
    // first: its file alone would let it start inside the other's blocks.
    let local = |state: &Path| tradeid::state::Snapshot::read(state).unwrap().marks[0];
    let (behind, ahead) = if local(&a) < local(&b) { (0, 1) } else { (1, 0) };
    etcd.restore(&backup);
    assert!(etcd.marks("back").is_empty(), "the backup has no mark");
    // At once, before any periodic re-assertion: more than it holds.
    insert_unique(&mut seen, take(nodes[behind].addr, 200));
    for id in drain_all(&[nodes[ahead].addr, nodes[behind].addr]) {
        assert!(seen.insert(id.clone()), "{id} issued again after etcd went back (marks before: {before:?})");
    }
    assert!(seen.len() <= 1024);
    let rollbacks: f64 = nodes.iter().map(|n| n.metric("tradeid_etcd_rollbacks_total")).sum();
    assert!(rollbacks >= 1.0, "the rollback went unnoticed");
    assert!(nodes.iter().any(|n| n.stderr().contains("ROLLBACK: etcd's marks went back")));
}

/// etcd restored from an old backup while nodes run and sit idle: every
/// live node re-reads the marks every few seconds and raises those below
/// what it knows, so etcd is healed within seconds, with no request; a node
/// that joins afterwards then cannot reissue anything.
#[test]
fn a_restored_etcd_is_healed_by_the_live_nodes_within_seconds() {
    let mut etcd = Etcd::single();
    let e = etcd.endpoints();
    let dir = tempfile::tempdir().unwrap();
    let a = init_node(dir.path(), "a", &e, "heal", &["--width", "13", "--shard-bits", "10"]);
    let b = init_node(dir.path(), "b", &e, "heal", &[]);
    let backup = dir.path().join("backup.db");
    etcd.snapshot(&backup);
    let mut nodes = vec![serve_node(&a, &e, "heal", &SMALL), serve_node(&b, &e, "heal", &SMALL)];
    let mut seen = HashSet::new();
    for node in &nodes {
        insert_unique(&mut seen, take(node.addr, 2000));
    }
    let before = etcd.marks("heal");
    assert!(before.len() >= 4, "{before:?}");
    etcd.restore(&backup);
    let healed_at = Instant::now();
    eventually(Duration::from_secs(20), "etcd's marks raised back", || {
        let now = etcd.marks("heal");
        before.iter().all(|(shard, mark)| now.get(shard).is_some_and(|m| m >= mark))
    });
    eprintln!("healed {:?} after etcd came back", healed_at.elapsed());
    let raised: f64 = nodes.iter().map(|n| n.metric("tradeid_etcd_marks_raised_total")).sum();
    assert!(raised >= before.len() as f64, "{raised} marks raised for {} shards", before.len());
    // A node that joins now, and the two that ran, drain the rest.
    let c = init_node(dir.path(), "c", &e, "heal", &[]);
    nodes.push(serve_node(&c, &e, "heal", &SMALL));
    for id in drain_all(&nodes.iter().map(|n| n.addr).collect::<Vec<_>>()) {
        assert!(seen.insert(id.clone()), "{id} issued twice");
    }
    assert_eq!(seen.len(), 1 << 13, "the whole space, each ID once");
}

/// A node whose state file is ahead of etcd (etcd restored from a backup
/// while the node was down) raises etcd's marks when it starts, so a node
/// that joins after it reissues nothing the first one handed out.
#[test]
fn a_node_ahead_of_etcd_raises_its_marks_at_start() {
    let mut etcd = Etcd::single();
    let e = etcd.endpoints();
    let dir = tempfile::tempdir().unwrap();
    let a = init_node(dir.path(), "a", &e, "ahead", &["--width", "13", "--shard-bits", "10"]);
    let backup = dir.path().join("backup.db");
    etcd.snapshot(&backup);
    let mut first = serve_node(&a, &e, "ahead", &SMALL);
    let mut seen = HashSet::new();
    insert_unique(&mut seen, take(first.addr, 3000));
    first.kill9();
    etcd.restore(&backup);
    let first = serve_node(&a, &e, "ahead", &SMALL);
    assert!(first.stderr().contains("raised"), "{}", first.stderr());
    assert!(first.metric("tradeid_etcd_rollbacks_total") >= 1.0);
    let b = init_node(dir.path(), "b", &e, "ahead", &[]);
    let second = serve_node(&b, &e, "ahead", &SMALL);
    for id in drain_all(&[first.addr, second.addr]) {
        assert!(seen.insert(id.clone()), "{id} issued twice");
    }
}

/// The procedure after an etcd restore (docs/cluster.md): with every node
/// stopped, `raise-marks` raises the marks to each node's file (and writes
/// the cluster's metadata again when the backup predates the cluster);
/// only then does any node serve. A node that joins then reissues nothing.
#[test]
fn raise_marks_restores_the_cluster_from_the_nodes_state_files() {
    let mut etcd = Etcd::single();
    let e = etcd.endpoints();
    let dir = tempfile::tempdir().unwrap();
    let backup = dir.path().join("backup.db");
    etcd.snapshot(&backup); // before the cluster existed
    let a = init_node(dir.path(), "a", &e, "proc", &["--width", "13", "--shard-bits", "10"]);
    let b = init_node(dir.path(), "b", &e, "proc", &[]);
    let mut seen = HashSet::new();
    for state in [&a, &b] {
        let mut node = serve_node(state, &e, "proc", &SMALL);
        insert_unique(&mut seen, take(node.addr, 2500));
        node.kill9();
    }
    etcd.restore(&backup);
    let path = |p: &Path| p.to_str().unwrap().to_string();
    // Serving first is refused, and says what to do.
    let out = run(&["serve", "--state", &path(&a), "--listen", "127.0.0.1:0", "--etcd", &e, "--cluster", "proc"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("tradeid raise-marks") && err.contains("docs/cluster.md"), "{err}");
    let raise = |state: &Path| run(&["raise-marks", "--state", &path(state), "--etcd", &e, "--cluster", "proc"]);
    let out = raise(&a);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("was missing from etcd; wrote it again from"), "{text}");
    assert!(text.contains("raised ") && !text.contains("raised 0 "), "{text}");
    let out = raise(&b);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("raised 0 "), "{}", String::from_utf8_lossy(&out.stdout));
    // Marks only rise: running it again changes nothing.
    assert!(String::from_utf8_lossy(&raise(&b).stdout).contains("raised 0 "));
    // A new node joins the restored cluster and drains it.
    let c = init_node(dir.path(), "c", &e, "proc", &[]);
    let node = serve_node(&c, &e, "proc", &SMALL);
    for id in drain(node.addr) {
        assert!(seen.insert(id.clone()), "{id} issued twice");
    }
    // The old nodes serve again too, and a running node's file is refused.
    let running = serve_node(&a, &e, "proc", &SMALL);
    let out = raise(&a);
    assert_eq!(out.status.code(), Some(69), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(exchange(running.addr, &request(1), Duration::from_secs(2)).unwrap(), b"!ERR507", "exhausted");
}

/// The cluster's metadata deleted from under running nodes (etcd wiped):
/// the node stops reserving, loudly, serves what it holds, and writes
/// nothing more into etcd.
#[test]
fn a_vanished_cluster_stops_reservations() {
    let etcd = Etcd::single();
    let e = etcd.endpoints();
    let dir = tempfile::tempdir().unwrap();
    let state = init_node(dir.path(), "n", &e, "gone", &["--width", "13", "--shard-bits", "10"]);
    let node = serve_node(&state, &e, "gone", &SMALL);
    let mut seen = HashSet::new();
    insert_unique(&mut seen, take(node.addr, 100));
    assert!(etcd.etcdctl(&["del", "--prefix", "/tradeid/gone/"]).status.success());
    eventually(Duration::from_secs(15), "readyz reports the stop", || {
        let (status, body) = node.http_get("/readyz");
        status == 503 && body.contains("reservations stopped") && body.contains("vanished")
    });
    assert_eq!(node.metric("tradeid_etcd_reservations_stopped"), 1.0);
    assert!(node.stderr().contains("reservations stopped"), "{}", node.stderr());
    // What it holds (at most two blocks of 64), then !ERR503: never a new block.
    insert_unique(&mut seen, until_unavailable(node.addr, 128));
    // Nothing written back: no mark, no metadata, no registration or claim.
    std::thread::sleep(Duration::from_secs(1));
    let keys = etcd.etcdctl(&["get", "--prefix", "--keys-only", "/tradeid/gone/"]);
    assert!(String::from_utf8_lossy(&keys.stdout).trim().is_empty(), "{}", String::from_utf8_lossy(&keys.stdout));
}

/// etcd's auth tokens expire (here after 1 s unused; `--auth-token-ttl`,
/// 300 s by default): a node logs in again when its token is refused, and
/// keeps reserving fresh blocks well past the token's life.
#[test]
fn an_expired_etcd_auth_token_is_renewed() {
    let mut etcd = Etcd::single_with(&["--auth-token-ttl", "1"]);
    let e = etcd.endpoints();
    etcd.enable_auth();
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, "s3cret\n").unwrap();
    let auth = ["--etcd-user", "tradeid", "--etcd-password-file", password.to_str().unwrap()];
    let mut init = vec!["--width", "20", "--shard-bits", "12"];
    init.extend_from_slice(&auth);
    let state = init_node(dir.path(), "n", &e, "tokens", &init);
    let mut flags = SMALL.to_vec();
    flags.extend_from_slice(&auth);
    let node = serve_node(&state, &e, "tokens", &flags);
    let mut seen = HashSet::new();
    let mut committed = node.metric("tradeid_etcd_txn_total{result=\"committed\"}");
    for round in 0..4 {
        // Several times the token's life with nothing sent to etcd.
        std::thread::sleep(Duration::from_secs(3));
        // More than the node holds: it must reserve again.
        insert_unique(&mut seen, take(node.addr, 300));
        let now = node.metric("tradeid_etcd_txn_total{result=\"committed\"}");
        assert!(now >= committed + 3.0, "round {round}: only {} new reservations", now - committed);
        committed = now;
    }
}

/// `serve` with authentication waits for a down etcd as it does without:
/// logging in is part of the bounded wait at start, not a reason to exit.
#[test]
fn serve_with_authentication_waits_for_etcd_to_come_up() {
    let mut etcd = Etcd::single();
    let e = etcd.endpoints();
    etcd.enable_auth();
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, "s3cret\n").unwrap();
    let auth = ["--etcd-user", "tradeid", "--etcd-password-file", password.to_str().unwrap()];
    let state = init_node(dir.path(), "n", &e, "late", &auth);
    etcd.kill_all();
    let started = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_secs(3));
            etcd.restart_all();
        });
        let mut flags = vec!["--etcd", e.as_str(), "--cluster", "late"];
        flags.extend_from_slice(&auth);
        Daemon::start_with(&state, &flags, &[])
    });
    let node = started.expect("serve waited for etcd to come up");
    assert!(node.stderr().contains("waiting for etcd"), "{}", node.stderr());
    ids_of(&exchange(node.addr, &request(5), Duration::from_secs(2)).unwrap());
}

/// A node frozen (SIGSTOP) past its lease: its claim and registration
/// expire, and another node takes its shard and drains the whole space.
/// Resumed, the frozen node serves only the blocks it held, takes a new
/// lease, and the space is handed out exactly once.
#[test]
fn a_node_that_lost_its_lease_never_duplicates() {
    let etcd = Etcd::single();
    let e = etcd.endpoints();
    let dir = tempfile::tempdir().unwrap();
    let a = init_node(dir.path(), "a", &e, "lease", &["--width", "12", "--shard-bits", "11"]);
    let b = init_node(dir.path(), "b", &e, "lease", &[]);
    let mut flags = SMALL.to_vec();
    flags.extend_from_slice(&["--etcd-lease-ttl", "2"]);
    let frozen = serve_node(&a, &e, "lease", &flags);
    let other = serve_node(&b, &e, "lease", &flags);
    let mut seen = HashSet::new();
    insert_unique(&mut seen, take(frozen.addr, 100));
    insert_unique(&mut seen, take(other.addr, 100));
    let id = node_id(&frozen);
    let registered = || !etcd.etcdctl(&["get", &format!("/tradeid/lease/nodes/{id}")]).stdout.is_empty();
    assert!(registered());
    let marks_before = etcd.marks("lease");
    frozen.signal("STOP");
    eventually(Duration::from_secs(10), "the frozen node's lease expired", || !registered());
    for id in drain(other.addr) {
        assert!(seen.insert(id.clone()), "{id} issued twice");
    }
    // The other node went into the frozen node's shard too.
    let marks = etcd.marks("lease");
    assert!(marks.values().all(|&m| m == 2048), "{marks:?} (before: {marks_before:?})");
    frozen.signal("CONT");
    for id in drain(frozen.addr) {
        assert!(seen.insert(id.clone()), "{id} issued twice");
    }
    assert_eq!(seen.len(), 1 << 12, "the whole space, each ID once");
    eventually(Duration::from_secs(10), "the resumed node took a new lease", || {
        let log = frozen.stderr();
        log.contains("lease had expired") && log.contains("took a new etcd lease and registered again")
    });
    assert!(registered(), "registered again under its new lease");
}

/// A reservation that etcd committed but whose reply never reached the
/// node (swallowed by a proxy, so the node times out): the node's retry
/// compares against the old mark, loses, rereads and moves on. The block
/// of the lost reply is handed out by nobody, and nothing twice, although
/// another node draws from the same shard.
#[test]
fn a_committed_reservation_whose_reply_was_lost_is_skipped() {
    let etcd = Etcd::single();
    let e = etcd.endpoints();
    let proxy = Proxy::start(etcd.client_port(0));
    let dir = tempfile::tempdir().unwrap();
    let a = init_node(dir.path(), "a", &e, "lost", &["--width", "12", "--shard-bits", "12"]);
    let b = init_node(dir.path(), "b", &e, "lost", &[]);
    let cut_off = serve_node(&a, &proxy.url, "lost", &SMALL);
    let direct = serve_node(&b, &e, "lost", &SMALL);
    let mut seen = HashSet::new();
    insert_unique(&mut seen, take(direct.addr, 40));
    insert_unique(&mut seen, take(cut_off.addr, 40));
    // Let the node behind the proxy read the current mark (periodically).
    std::thread::sleep(Duration::from_millis(3500));
    let errors = cut_off.metric("tradeid_etcd_txn_total{result=\"error\"}");
    let before = etcd.marks("lost")[&0];
    proxy.swallow_replies();
    // Use up what it holds: its next reservation commits, unanswered.
    insert_unique(&mut seen, until_unavailable(cut_off.addr, 128));
    eventually(Duration::from_secs(5), "the reservation committed in etcd", || etcd.marks("lost")[&0] > before);
    let after = etcd.marks("lost")[&0];
    eventually(Duration::from_secs(10), "the node's txn timed out", || {
        cut_off.metric("tradeid_etcd_txn_total{result=\"error\"}") > errors
    });
    assert!(proxy.swallowed.load(std::sync::atomic::Ordering::Relaxed) > 0);
    proxy.heal();
    for id in drain_all(&[cut_off.addr, direct.addr]) {
        assert!(seen.insert(id.clone()), "{id} issued twice");
    }
    let header = tradeid::state::Snapshot::read(&a).unwrap().header;
    let permutation = header.permutation();
    for id in &seen {
        let counter = permutation.invert(tradeid::Id::parse(id).unwrap().value());
        assert!(!(before..after).contains(&counter), "{id} (counter {counter}) is from the block whose reply was lost");
    }
    assert_eq!(seen.len() as u64, (1 << 12) - (after - before), "every other ID, once");
}
