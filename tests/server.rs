//! The UDP server: uniqueness under load, the wire protocol's edges,
//! restarts and kill -9 chaos, shutdown, exhaustion.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::harness::*;

const SHORT: Duration = Duration::from_millis(300);

#[test]
fn a_million_ids_through_several_workers_are_all_valid_and_unique() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let daemon = Daemon::start(&state, &["--workers", "2"]);
    const THREADS: usize = 8;
    const PER_THREAD: usize = 130_000;
    let results: Vec<Vec<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let addr = daemon.addr;
                s.spawn(move || {
                    // Each thread has its own socket (its own source port),
                    // so SO_REUSEPORT spreads them over the workers.
                    let socket = client_socket(addr, Duration::from_secs(2));
                    let mut ids = Vec::with_capacity(PER_THREAD);
                    let mut buf = vec![0u8; 2048];
                    let mut i = 0u64;
                    while ids.len() < PER_THREAD {
                        // Mostly bulk, some single requests.
                        let count = if (i + t as u64).is_multiple_of(8) { 1 } else { 175 };
                        socket.send(&request(count)).unwrap();
                        let n = socket.recv(&mut buf).expect("reply within 2 s");
                        if &buf[..4] == b"!ERR" {
                            assert_eq!(&buf[..n], b"!ERR503", "only 'not ready' is acceptable");
                            std::thread::sleep(Duration::from_millis(1));
                            continue;
                        }
                        ids.extend(ids_of(&buf[..n]));
                        i += 1;
                    }
                    ids
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut seen = HashSet::with_capacity(THREADS * PER_THREAD);
    for ids in results {
        insert_unique(&mut seen, ids);
    }
    assert!(seen.len() >= 1_000_000, "{}", seen.len());
}

#[test]
fn bulk_replies_have_exact_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let daemon = Daemon::start(&state, &["--workers", "1"]);
    let mut seen = HashSet::new();
    for (count, len) in [(0u16, 7usize), (1, 7), (2, 14), (175, 1225)] {
        let reply = exchange(daemon.addr, &request(count), SHORT).expect("reply");
        assert_eq!(reply.len(), len, "count {count}");
        insert_unique(&mut seen, ids_of(&reply));
    }
    assert_eq!(exchange(daemon.addr, &request(176), SHORT).unwrap(), b"!ERR413");

    // A raised --max-batch: max and max+1.
    drop(daemon);
    let daemon = Daemon::start(&state, &["--workers", "1", "--max-batch", "9358"]);
    let reply = exchange(daemon.addr, &request(9358), SHORT).unwrap();
    assert_eq!(reply.len(), 9358 * 7);
    insert_unique(&mut seen, ids_of(&reply));
    assert_eq!(exchange(daemon.addr, &request(9359), SHORT).unwrap(), b"!ERR413");
}

#[test]
fn malformed_datagrams_get_no_reply_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let daemon = Daemon::start(&state, &["--workers", "2", "--admin", "127.0.0.1:0"]);
    let mut garbage: Vec<Vec<u8>> = vec![Vec::new()];
    for len in 1..8 {
        garbage.push(request(1)[..len].to_vec());
    }
    garbage.push(b"XD\x01\x01\x00\x01\x00\x00".to_vec());
    garbage.push((0..65507u32).map(|i| (i * 7 + 3) as u8).collect()); // 64 KiB of garbage
    for datagram in &garbage {
        let socket = client_socket(daemon.addr, Duration::from_millis(150));
        socket.send(datagram).unwrap();
        let mut buf = [0u8; 64];
        assert!(socket.recv(&mut buf).is_err(), "{}-byte datagram got a reply", datagram.len());
        // The same socket still gets IDs afterwards.
        socket.set_read_timeout(Some(SHORT)).unwrap();
        socket.send(&request(1)).unwrap();
        let n = socket.recv(&mut buf).expect("server still serving");
        ids_of(&buf[..n]);
    }
    let (_, metrics) = daemon.http_get("/metrics");
    assert_eq!(metric_sum(&metrics, "tradeid_drops_total{reason=\"short\"}"), 8.0);
    assert_eq!(metric_sum(&metrics, "tradeid_drops_total{reason=\"bad_magic\"}"), 2.0);
}

#[test]
fn unknown_version_and_opcode_get_their_errors() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let daemon = Daemon::start(&state, &["--workers", "1"]);
    assert_eq!(exchange(daemon.addr, b"ID\x02\x01\x00\x01\x00\x00", SHORT).unwrap(), b"!ERR505");
    assert_eq!(exchange(daemon.addr, b"ID\x00\x01\x00\x01\x00\x00", SHORT).unwrap(), b"!ERR505");
    assert_eq!(exchange(daemon.addr, b"ID\x01\x02\x00\x01\x00\x00", SHORT).unwrap(), b"!ERR400");
    assert_eq!(exchange(daemon.addr, b"ID\x01\x00\x00\x01\x00\x00", SHORT).unwrap(), b"!ERR400");
    // Reserved bytes and padding are ignored.
    assert_eq!(exchange(daemon.addr, b"ID\x01\x01\x00\x01\xff\xffpad", SHORT).unwrap().len(), 7);
}

/// Hammers `addr` from `clients` threads until `stop`, mixing single and
/// bulk requests; returns every ID received (bounded: see
/// [`hammer_targets`]).
fn hammer(addr: std::net::SocketAddr, clients: usize, stop: &std::sync::atomic::AtomicBool) -> Vec<String> {
    hammer_targets(&std::sync::Mutex::new(vec![addr]), clients, stop).ids
}

#[test]
fn kill_9_chaos_never_repeats_an_id() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let iterations = iterations("TRADEID_CHAOS_ITERATIONS", 50);
    let seed = seed();
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let mut seen = HashSet::new();
    let mut total = 0usize;
    for round in 0..iterations {
        let workers = 1 + rng.below(2);
        // Small blocks make flushes frequent, so kills land mid-reservation.
        let block_max = ["1024", "4096", "1048576"][rng.below(3) as usize];
        let mut daemon = Daemon::start(&state, &["--workers", &workers.to_string(), "--block-max", block_max]);
        let stop = AtomicBool::new(false);
        let kill_after = Duration::from_millis(20 + rng.below(150));
        let addr = daemon.addr;
        let ids = std::thread::scope(|s| {
            let killer = s.spawn(|| {
                std::thread::sleep(kill_after);
                daemon.kill9();
                std::thread::sleep(Duration::from_millis(30));
                stop.store(true, Ordering::Relaxed);
            });
            let ids = hammer(addr, 3, &stop);
            killer.join().unwrap();
            ids
        });
        total += ids.len();
        for id in ids {
            assert!(seen.insert(id.clone()), "seed {seed}, round {round}: duplicate {id} after kill -9");
        }
    }
    assert!(total > iterations * 10, "too few IDs received ({total}) for the test to mean anything");
}

#[test]
fn restarting_with_a_different_worker_count_gives_no_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let mut seen = HashSet::new();
    let mut received = 0;
    for workers in ["1", "2", "3", "1"] {
        let mut daemon = Daemon::start(&state, &["--workers", workers]);
        for _ in 0..200 {
            // Each request from a new source port, so all workers take part.
            let ids = fetch(daemon.addr, 175);
            received += ids.len();
            insert_unique(&mut seen, ids);
        }
        let status = daemon.signal_and_wait("TERM", Duration::from_secs(5)).expect("exits");
        assert!(status.success());
    }
    assert_eq!(seen.len(), received);
    assert!(received > 4 * 150 * 175, "{received}");
}

#[test]
fn sigterm_exits_zero_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let mut daemon = Daemon::start(&state, &["--workers", "2"]);
    assert!(exchange(daemon.addr, &request(1), SHORT).is_some());
    let started = Instant::now();
    let status = daemon.signal_and_wait("TERM", Duration::from_secs(5)).expect("exited");
    assert!(status.success(), "{status:?}\n{}", daemon.stderr());
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());

    let mut daemon = Daemon::start(&state, &["--workers", "1"]);
    let status = daemon.signal_and_wait("INT", Duration::from_secs(5)).expect("exited");
    assert!(status.success());
}

#[test]
fn a_full_space_answers_507_and_never_wraps() {
    let dir = tempfile::tempdir().unwrap();
    // 2^10 IDs in 64 shards of 16.
    let state = init_state(dir.path(), "s", &["--width", "10", "--shard-bits", "4"]);
    let daemon = Daemon::start(&state, &["--workers", "2"]);
    let mut seen = HashSet::new();
    // Near the end one worker may answer 507 while the other still drains
    // its last block, so wait for a long run of consecutive 507s.
    let mut consecutive_507 = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while consecutive_507 < 40 {
        assert!(Instant::now() < deadline, "never exhausted; got {} IDs", seen.len());
        let socket = client_socket(daemon.addr, SHORT);
        socket.send(&request(100)).unwrap();
        let mut buf = [0u8; 2048];
        let n = socket.recv(&mut buf).expect("reply");
        match &buf[..n] {
            b"!ERR507" => consecutive_507 += 1,
            b"!ERR503" => std::thread::sleep(Duration::from_millis(2)),
            reply => {
                consecutive_507 = 0;
                for id in ids_of(reply) {
                    // Inside the 2^10 space, and never seen before: no wrap.
                    assert!(tradeid::Id::parse(&id).unwrap().value() < 1024, "{id} outside the space");
                    assert!(seen.insert(id.clone()), "{id} handed out twice");
                }
            }
        }
    }
    assert!(seen.len() <= 1024);
    // Both workers' leftovers are at most two blocks each.
    assert!(seen.len() >= 1024 - 4 * 16, "only {} of 1024 handed out", seen.len());
    // Restarting does not revive the space.
    drop(daemon);
    let daemon = Daemon::start(&state, &["--workers", "1"]);
    assert_eq!(exchange(daemon.addr, &request(1), SHORT).unwrap(), b"!ERR507");
}

#[test]
fn serves_over_ipv6_with_the_same_rules() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let mut seen = HashSet::new();
    // ::1 is trusted by default; with only IPv4 loopback trusted, the 3x
    // rule applies to it (a bare request gets 3 IDs).
    for (trust, expected_for_175) in [(None, 175usize), (Some("127.0.0.0/8"), 3)] {
        let mut cmd = tradeid();
        cmd.args(["serve", "--state", state.to_str().unwrap(), "--listen", "[::1]:0", "--workers", "2"]);
        if let Some(trust) = trust {
            cmd.args(["--trust", trust]);
        }
        let daemon = Daemon::spawn(cmd).unwrap();
        let addr = daemon.addr;
        assert!(addr.is_ipv6(), "{addr}");
        for (count, expected) in [(1u16, 1usize), (175, expected_for_175)] {
            let socket = std::net::UdpSocket::bind("[::1]:0").unwrap();
            socket.set_read_timeout(Some(SHORT)).unwrap();
            socket.send_to(&request(count), addr).unwrap();
            let mut buf = [0u8; 2048];
            let (n, from) = socket.recv_from(&mut buf).unwrap();
            assert_eq!(from, addr);
            assert_eq!(n, 7 * expected, "trust {trust:?}, count {count}");
            insert_unique(&mut seen, ids_of(&buf[..n]));
        }
    }
}

#[test]
fn tradeid_get_fetches_with_failover() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let daemon = Daemon::start(&state, &["--workers", "1"]);
    // The first server is dead: the client fails over to the second.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let out = run(&[
        "get",
        "-n",
        "400",
        "--timeout-ms",
        "50",
        "--server",
        &dead.to_string(),
        "--server",
        &daemon.addr.to_string(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ids: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(String::from).collect();
    assert_eq!(ids.len(), 400);
    let mut seen = HashSet::new();
    for id in &ids {
        ids_of(id.as_bytes());
    }
    insert_unique(&mut seen, ids);

    // Nobody answering: a clear error and exit code 69, quickly.
    let started = Instant::now();
    let out = run(&["get", "--timeout-ms", "50", "--attempts", "2", "--server", &dead.to_string()]);
    assert_eq!(out.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no reply from"));
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// A server with a lower --max-batch answers `!ERR413`; `tradeid get`
/// halves its batch until accepted and gets every ID it asked for.
#[test]
fn tradeid_get_shrinks_its_batch_to_the_servers_max_batch() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let daemon = Daemon::start(&state, &["--workers", "1", "--max-batch", "50"]);
    let out = run(&["get", "-n", "100", "--server", &daemon.addr.to_string()]);
    assert!(out.status.success(), "{:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    let ids: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(String::from).collect();
    assert_eq!(ids.len(), 100);
    for id in &ids {
        ids_of(id.as_bytes());
    }
    insert_unique(&mut HashSet::new(), ids);
}

/// Counts and attempts of zero are mistakes, refused with 78 and the
/// flag's name before any request is sent.
#[test]
fn tradeid_get_refuses_zero_counts_and_attempts() {
    let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap().to_string();
    for (args, needle) in [
        (&["-n", "0"][..], "-n/--count 0"),
        (&["--count", "0"][..], "-n/--count 0"),
        (&["--attempts", "0"][..], "--attempts 0"),
        (&["--max-batch", "0"][..], "--max-batch 0"),
        (&["--timeout-ms", "0"][..], "--timeout-ms 0"),
    ] {
        let mut argv = vec!["get", "--server", &addr];
        argv.extend_from_slice(args);
        let out = run(&argv);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    server.set_nonblocking(true).unwrap();
    assert!(server.recv(&mut [0u8; 64]).is_err(), "no request was sent");
}
