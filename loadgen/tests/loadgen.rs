//! loadgen against a real tradeid server (started in-process through the
//! library) and against its own echo baseline, judged by the JSON summary.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use tradeid::state::{create, Geometry, Header};
use tradeid_server::dataplane::{Config, Server};

fn loadgen(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen")).args(args).args(["--json", "-", "--quiet"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("standard output is the JSON summary")
}

fn start_tradeid(dir: &std::path::Path) -> Server {
    let path = dir.join("state");
    create(std::slice::from_ref(&path), &Header::new(Geometry::DEFAULT, false).unwrap()).unwrap();
    Server::start(&Config::new(vec![path], "127.0.0.1:0".parse().unwrap(), 2)).unwrap()
}

#[test]
fn closed_loop_against_tradeid_is_unique_and_well_formed() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_tradeid(dir.path());
    let target = server.local_addr.to_string();
    let summary =
        loadgen(&["--target", &target, "--duration", "1", "--sockets", "4", "--window", "8", "--check-unique"]);
    assert!(summary["requests_per_second"].as_f64().unwrap() > 0.0, "{summary}");
    assert_eq!(summary["duplicates"], 0);
    assert_eq!(summary["malformed"], 0);
    // Replies still in flight at the end are waited for, not called lost.
    assert_eq!(summary["lost"], 0, "{summary}");
    assert_eq!(summary["replies"], summary["ids"], "one ID per reply");

    let bulk = loadgen(&["--target", &target, "--duration", "1", "--batch", "16", "--check-unique"]);
    assert_eq!(bulk["duplicates"], 0);
    assert_eq!(bulk["ids"].as_u64().unwrap(), 16 * bulk["replies"].as_u64().unwrap());

    // Open loop at a modest rate: the target and the achieved rate are
    // reported (whether a shared CI machine kept the schedule is not
    // asserted; the rule itself is unit-tested).
    let open = loadgen(&["--target", &target, "--duration", "1", "--rate", "2000", "--poisson"]);
    assert_eq!(open["target_rate"], 2000.0);
    assert!(open["generator_fell_behind"].is_boolean());
    assert!(open["replies"].as_u64().unwrap() > 1000, "{open}");
    assert_eq!(open["lost"], 0);
    server.workers.stop().unwrap();
}

#[test]
fn raw_mode_against_the_echo_baseline() {
    let mut echo = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["echo", "--listen", "127.0.0.1:0", "--workers", "2", "--reply-len", "14", "--duration", "30"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(echo.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr: SocketAddr = line.trim().strip_prefix("listening on ").unwrap().parse().unwrap();
    let target = addr.to_string();
    let summary =
        loadgen(&["--target", &target, "--duration", "1", "--request-hex", "4944010100020000", "--reply-len", "14"]);
    assert!(summary["replies"].as_u64().unwrap() > 0);
    assert_eq!(summary["malformed"], 0);
    // The wrong expected length: every reply is malformed, none counted.
    let wrong = loadgen(&["--target", &target, "--duration", "1", "--request-hex", "00", "--reply-len", "7"]);
    assert_eq!(wrong["replies"], 0);
    assert!(wrong["malformed"].as_u64().unwrap() > 0);
    let _ = echo.kill();
    let _ = echo.wait();
}
