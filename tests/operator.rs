//! Mistakes a hurried operator makes, and why none of them hands out an ID
//! twice: a second server on a port already held, a state file copied,
//! moved or deleted under a running server, an init killed midway.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::harness::*;

/// A second `tradeid serve` with another state file on an address that is
/// already served is refused, naming the address; so is serving beside a
/// foreign SO_REUSEPORT socket.
#[test]
fn a_second_server_on_a_held_port_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = Daemon::start(&init_state(dir.path(), "a", &[]), &["--workers", "2"]);
    let second = init_state(dir.path(), "b", &[]);
    let addr = first.addr.to_string();
    let out = run(&["serve", "--state", second.to_str().unwrap(), "--listen", &addr, "--workers", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("UDP {addr} (--listen) is already in use")), "{err}");
    assert_eq!(err.matches("already in use").count(), 1, "printed once: {err}");
    // The first still serves, alone.
    let mut seen = HashSet::new();
    for _ in 0..50 {
        insert_unique(&mut seen, fetch(first.addr, 20));
    }
    // A socket of another program that joined the port with SO_REUSEPORT.
    let (intruder, taken) = reuse_port_socket("127.0.0.1:0".parse().unwrap());
    let out = run(&["serve", "--state", second.to_str().unwrap(), "--listen", &taken.to_string()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already in use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(intruder);
}

/// A socket that joins the port of a running server (SO_REUSEPORT lets
/// any socket of the same user in, at any time) is seen within a couple
/// of seconds: one error naming the address, the gauge
/// tradeid_listen_foreign_sockets, and a line once it is gone.
#[test]
fn a_socket_joining_a_running_server_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&init_state(dir.path(), "a", &[]), &["--workers", "2", "--admin", "127.0.0.1:0"]);
    let gauge = "tradeid_listen_foreign_sockets";
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(daemon.metric(gauge), 0.0, "alone at start");
    let (intruder, _) = reuse_port_socket(daemon.addr);
    let shared = format!("UDP {} (--listen) is now shared with 1 socket(s)", daemon.addr);
    eventually(Duration::from_secs(10), "the joiner reported", || {
        daemon.metric(gauge) == 1.0 && daemon.stderr().contains(&shared)
    });
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(daemon.stderr().matches("is now shared").count(), 1, "reported once: {}", daemon.stderr());
    drop(intruder);
    let alone = format!("UDP {} (--listen) is this server's alone again", daemon.addr);
    eventually(Duration::from_secs(10), "the address alone again", || {
        daemon.metric(gauge) == 0.0 && daemon.stderr().contains(&alone)
    });
    // It kept serving throughout.
    assert_eq!(fetch(daemon.addr, 10).len(), 10);
}

/// A socket of another program on `addr`, with SO_REUSEPORT as tradeid's
/// own (so it joins a port tradeid holds); and its address.
fn reuse_port_socket(addr: std::net::SocketAddr) -> (Vec<std::net::UdpSocket>, std::net::SocketAddr) {
    let options = tradeid_udp::SocketOptions {
        recv_buffer: 1 << 16,
        send_buffer: 1 << 16,
        read_timeout: Duration::from_millis(100),
    };
    let (socket, bound, _) = tradeid_udp::bind_group(addr, 1, &options).unwrap();
    (socket, bound)
}

/// Two servers started at the same moment on one address: at least one
/// refuses, so the address is never shared.
#[test]
fn two_servers_started_at_once_never_share_an_address() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", stable_port()); // used again each round
    for round in 0..5 {
        let states: Vec<_> = (0..2).map(|i| init_state(dir.path(), &format!("r{round}-{i}"), &[])).collect();
        let mut children: Vec<_> = states
            .iter()
            .map(|s| {
                tradeid()
                    .args(["serve", "--state", s.to_str().unwrap(), "--listen", &listen, "--workers", "2"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        std::thread::sleep(Duration::from_millis(1500));
        let alive = children.iter_mut().filter_map(|c| c.try_wait().unwrap().is_none().then_some(())).count();
        for c in &mut children {
            let _ = c.kill();
            let _ = c.wait();
        }
        assert!(alive <= 1, "round {round}: both servers run on {listen}");
    }
}

/// Fetches `count` IDs in batches of 100, asserting each is new to `seen`.
fn fetch_unique(addr: std::net::SocketAddr, count: usize, seen: &mut HashSet<String>, context: &str) {
    let mut got = 0;
    while got < count {
        for id in fetch(addr, 100) {
            assert!(seen.insert(id.clone()), "{context}: {id} issued again");
            got += 1;
        }
    }
}

/// Serves `state` with small blocks (so marks move often) and a check
/// every second; returns the daemon and the IDs it handed out before the
/// old copy was taken and after.
fn serve_and_copy(dir: &std::path::Path) -> (Daemon, std::path::PathBuf, std::path::PathBuf, HashSet<String>) {
    let state = init_state(dir, "s", &[]);
    let daemon = Daemon::start(&state, &["--workers", "1", "--block-max", "2048"]);
    let mut seen = HashSet::new();
    fetch_unique(daemon.addr, 3_000, &mut seen, "before the copy");
    let old = dir.join("old-copy");
    std::fs::copy(&state, &old).unwrap();
    fetch_unique(daemon.addr, 20_000, &mut seen, "after the copy");
    (daemon, state, old, seen)
}

/// `cp old s.state` under a running, idle server, then kill -9 before any
/// new reservation: the server noticed and wrote its marks back, so the
/// restart issues nothing again.
#[test]
fn an_old_copy_put_in_place_under_a_running_server_is_undone() {
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, state, old, mut seen) = serve_and_copy(dir.path());
    std::fs::copy(&old, &state).unwrap(); // same inode, old bytes
    let copied = Instant::now();
    let deadline = copied + Duration::from_secs(3);
    // Noticed by the check every second, or, if a reservation raced the
    // copy, by the size check around that reservation's flush.
    let noticed =
        |log: &str| log.contains("written over while in use") || log.contains("restoring this process's marks");
    while !noticed(&daemon.stderr()) {
        assert!(Instant::now() < deadline, "not noticed within 3 s: {}", daemon.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    // The timing: kill -9 a second and a half after the copy, with
    // no reservation in between.
    std::thread::sleep(Duration::from_millis(1500).saturating_sub(copied.elapsed()));
    daemon.kill9();
    let daemon = Daemon::start(&state, &["--workers", "1"]);
    fetch_unique(daemon.addr, 50_000, &mut seen, "after restart");
}

/// `mv old s.state`: a second server on the path is refused while the
/// first runs; the first restores the path and stops; the restart issues
/// nothing again.
#[test]
fn a_copy_moved_over_the_state_file_is_undone_and_the_path_stays_locked() {
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, state, old, mut seen) = serve_and_copy(dir.path());
    std::fs::rename(&old, &state).unwrap();
    // The lock follows the path, not the inode now at it.
    let out = run(&["serve", "--state", state.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(69), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("locked by another process"));
    let status = daemon.wait(Duration::from_secs(3)).expect("the server stops within 3 s");
    assert!(!status.success());
    let err = daemon.stderr_after_exit();
    assert!(err.contains("was replaced by another file") && err.contains("marks (raised only) were written"), "{err}");
    let daemon = Daemon::start(&state, &["--workers", "1"]);
    fetch_unique(daemon.addr, 50_000, &mut seen, "after restart");
}

/// `rm s.state`: init cannot put a new file there while the server runs;
/// the server writes its state back and stops; the restart issues nothing
/// again.
#[test]
fn a_deleted_state_file_is_written_back() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let mut daemon = Daemon::start(&state, &["--workers", "1", "--block-max", "2048"]);
    let mut seen = HashSet::new();
    fetch_unique(daemon.addr, 10_000, &mut seen, "before rm");
    std::fs::remove_file(&state).unwrap();
    let out = run(&["init", "--state", state.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(69), "init on a held path: {}", String::from_utf8_lossy(&out.stderr));
    let status = daemon.wait(Duration::from_secs(3)).expect("the server stops within 3 s");
    assert!(!status.success());
    assert!(daemon.stderr_after_exit().contains("was deleted"));
    assert!(state.exists(), "the state file is back");
    let daemon = Daemon::start(&state, &["--workers", "1"]);
    fetch_unique(daemon.addr, 50_000, &mut seen, "after restart");
}

/// `init` with a mirror, killed at random moments: the next `init` leaves no
/// temporary files, and a half-made set is named with the file to delete;
/// following that advice always ends with a complete, valid set.
#[test]
fn an_init_killed_midway_is_cleaned_up_and_explained() {
    let seed = seed();
    let mut rng = Rng(seed);
    for round in 0..iterations("TRADEID_INIT_KILL_ROUNDS", 40) {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let args = ["init", "--state", a.to_str().unwrap(), "--state", b.to_str().unwrap()];
        let mut child = tradeid()
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(rng.below(6000)));
        let _ = child.kill();
        let _ = child.wait();
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        let temps: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(temps.is_empty(), "seed {seed}, round {round}: temporaries left: {temps:?}");
        match out.status.code() {
            Some(0) => {}
            Some(73) => assert!(err.contains("already exists"), "seed {seed}, round {round}: {err}"),
            Some(66) => {
                // Half a set: delete what it names, then init works.
                assert!(err.contains("an init was interrupted") && err.contains("Delete"), "seed {seed}: {err}");
                let doomed = if a.exists() { &a } else { &b };
                std::fs::remove_file(doomed).unwrap();
                let out = run(&args);
                assert!(out.status.success(), "seed {seed}, round {round}: {}", String::from_utf8_lossy(&out.stderr));
            }
            other => panic!("seed {seed}, round {round}: exit {other:?}: {err}"),
        }
        // Whatever happened, the set now opens.
        let out = run(&["inspect", "--state", &format!("{},{}", a.display(), b.display())]);
        assert!(out.status.success(), "seed {seed}, round {round}: {}", String::from_utf8_lossy(&out.stderr));
    }
}
