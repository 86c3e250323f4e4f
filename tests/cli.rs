//! The offline commands and the operator-facing refusals, with their exit
//! codes and messages.

use std::collections::HashSet;

use crate::harness::*;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn init_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let before = std::fs::read(&state).unwrap();
    let out = run(&["init", "--state", state.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(73));
    assert!(stderr(&out).contains("already exists; refusing to overwrite"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&state).unwrap(), before);
}

#[test]
fn serve_refuses_a_missing_state_file_and_never_creates_it() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("missing");
    let out = run(&["serve", "--state", state.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(66));
    let err = stderr(&out);
    assert!(err.contains("does not exist") && err.contains("tradeid init --state"), "{err}");
    assert!(!state.exists());
}

#[test]
fn a_second_server_on_the_same_state_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let _daemon = Daemon::start(&state, &["--workers", "1"]);
    let out = run(&["serve", "--state", state.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(69));
    assert!(stderr(&out).contains("locked by another process"), "{}", stderr(&out));
}

/// `tradeid keygen --out DIR/space.key EXTRA...`, asserting success.
fn keygen(dir: &std::path::Path, extra: &[&str]) -> String {
    let key = dir.join("space.key");
    let mut args = vec!["keygen", "--out", key.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = run(&args);
    assert!(out.status.success(), "keygen failed: {}", stderr(&out));
    key.to_str().unwrap().to_string()
}

fn gen_ids(state: &std::path::Path, count: u64) -> Vec<String> {
    let out = run(&["gen", "--state", state.to_str().unwrap(), "-n", &count.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8(out.stdout).unwrap().lines().map(String::from).collect()
}

#[test]
fn keygen_writes_a_private_key_once() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), &[]);
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let before = std::fs::read(&key).unwrap();
    let out = run(&["keygen", "--out", &key]);
    assert_eq!(out.status.code(), Some(73));
    assert!(stderr(&out).contains("already exists; refusing to overwrite"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&key).unwrap(), before);
}

#[test]
fn a_multi_node_init_without_a_shared_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s");
    let out = run(&["init", "--state", state.to_str().unwrap(), "--node", "1", "--nodes", "2"]);
    assert_eq!(out.status.code(), Some(78));
    let err = stderr(&out);
    assert!(err.contains("needs a shared key"), "{err}");
    assert!(err.contains("tradeid keygen --out space.key"), "{err}");
    assert!(err.contains("tradeid init --state FILE --node 1 --nodes 2 --key-file space.key"), "{err}");
    assert!(!state.exists());
    // Sequential IDs use no key: their partitions never overlap.
    init_state(dir.path(), "seq", &["--sequential", "--node", "1", "--nodes", "2"]);
    // A key's geometry cannot be overridden.
    let key = keygen(dir.path(), &["--width", "20", "--shard-bits", "8"]);
    let out = run(&["init", "--state", state.to_str().unwrap(), "--key-file", &key, "--width", "21"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).contains("--width 21 differs from the key file's width 20"), "{}", stderr(&out));
    let out = run(&["init", "--state", state.to_str().unwrap(), "--key-file", "/nonexistent/k", "--nodes", "2"]);
    assert_eq!(out.status.code(), Some(66));
    assert!(stderr(&out).contains("key file /nonexistent/k does not exist"), "{}", stderr(&out));
}

/// Three nodes from one key, each generated to exhaustion: the union of
/// their IDs is the whole (small) space, each ID exactly once.
#[test]
fn nodes_from_one_key_file_cover_a_small_space_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), &["--width", "12", "--shard-bits", "4"]);
    let mut union = HashSet::new();
    let mut spaces = HashSet::new();
    for node in 0..3u64 {
        let name = format!("n{node}");
        let state = init_state(dir.path(), &name, &["--node", &node.to_string(), "--nodes", "3", "--key-file", &key]);
        // 256 shards of 16 dealt to 3 nodes: 86, 85, 85 shards.
        let capacity = if node == 0 { 86 * 16 } else { 85 * 16 };
        insert_unique(&mut union, gen_ids(&state, capacity));
        let out = run(&["gen", "--state", state.to_str().unwrap(), "-n", "1"]);
        assert_eq!(out.status.code(), Some(65), "node {node} is exhausted");
        let out = run(&["inspect", "--state", state.to_str().unwrap()]);
        let text = String::from_utf8(out.stdout).unwrap();
        spaces.insert(text.lines().find(|l| l.starts_with("space")).unwrap().to_string());
    }
    assert_eq!(union.len(), 4096);
    assert_eq!(spaces.len(), 1, "all three files name one space: {spaces:?}");
}

#[test]
fn three_full_width_nodes_from_one_key_file_share_no_id() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), &[]);
    let mut seen = HashSet::new();
    for node in 0..3 {
        let name = format!("n{node}");
        let state = init_state(dir.path(), &name, &["--node", &node.to_string(), "--nodes", "3", "--key-file", &key]);
        let ids = gen_ids(&state, 2_000_000);
        assert_eq!(ids.len(), 2_000_000);
        insert_unique(&mut seen, ids);
    }
}

#[test]
fn serving_another_partition_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), &[]);
    let state = init_state(dir.path(), "s", &["--node", "1", "--nodes", "4", "--key-file", &key]);
    let path = state.to_str().unwrap();
    let out = run(&["serve", "--state", path, "--listen", "127.0.0.1:0", "--node", "2", "--nodes", "4"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).contains("belongs to node 1 of 4, but node 2 of 4 was requested"), "{}", stderr(&out));
    let out = run(&["serve", "--check-config", "--state", path, "--node", "1", "--nodes", "4"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_corrupt_state_file_is_refused_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let mut bytes = std::fs::read(&state).unwrap();
    bytes[50] ^= 0xff; // inside the key: the header checksum fails
    std::fs::write(&state, &bytes).unwrap();
    let out = run(&["serve", "--state", state.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(65));
    let err = stderr(&out);
    assert!(err.contains(state.to_str().unwrap()) && err.contains("header checksum is wrong"), "{err}");
}

#[test]
fn gen_prints_unique_ids_and_decode_maps_them_back() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let path = state.to_str().unwrap();
    let mut seen = HashSet::new();
    for _ in 0..3 {
        let out = run(&["gen", "--state", path, "-n", "5000"]);
        assert!(out.status.success());
        let ids: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(String::from).collect();
        assert_eq!(ids.len(), 5000);
        insert_unique(&mut seen, ids);
    }
    // Decode forgives case and hyphens and reports the counter.
    let id = seen.iter().next().unwrap().clone();
    let typed = format!("{}-{}", &id[..3], &id[3..]).to_lowercase();
    let out = run(&["decode", "--state", path, &typed]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(&format!("id       {id}")), "{text}");
    assert!(text.contains("may have been issued"), "{text}");

    let out = run(&["inspect", "--state", path]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("partition      node 0 of 1"), "{text}");
    assert!(text.contains("waste/restart  at most"), "{text}");
    assert!(text.contains("in use         0 ("), "{text}");
    // Three runs of `gen` handed out 15,000 IDs and reserved more.
    assert!(text.contains("served         at least 15000 ("), "{text}");
    let reserved = text.lines().find_map(|l| l.strip_prefix("reserved       ")).unwrap();
    assert!(reserved.split(' ').next().unwrap().parse::<u64>().unwrap() > 15_000, "{text}");
}

#[test]
fn sequential_state_counts_up() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &["--sequential"]);
    let out = run(&["gen", "--state", state.to_str().unwrap(), "-n", "3"]);
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "0000000\n0000001\n0000002\n");
}

#[test]
fn bad_flags_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let path = state.to_str().unwrap();
    for (flag, value, needle) in [
        ("--max-batch", "0", "--max-batch 0 is out of range"),
        ("--cpus", "banana", "--cpus \"banana\" is not a CPU list"),
        ("--rate-limit", "lots", "--rate-limit \"lots\" is not a rate"),
        ("--workers", "0", "--workers 0 is out of range"),
        ("--workers", "1000", "could skip 2097152000 IDs (6.10% of the space) at every restart"),
        ("--block-max", "1", "--block-max 1 is below 4 x --max-batch (700)"),
        ("--block-max", "699", "would keep running dry and answer !ERR503"),
    ] {
        let out = run(&["serve", "--check-config", "--state", path, flag, value]);
        assert_eq!(out.status.code(), Some(78), "{flag}");
        assert!(stderr(&out).contains(needle), "{flag}: {}", stderr(&out));
    }
    // More workers than CPUs is allowed (up to the cap), with a warning.
    let cpus = std::thread::available_parallelism().unwrap().get();
    let out = run(&["serve", "--check-config", "--state", path, "--workers", &(cpus + 1).to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("more workers than CPUs"), "{}", stderr(&out));
    // A malformed ID is bad data, not a bad flag: 65, as `tradeid check` says.
    let out = run(&["decode", "--state", path, "B762FU0"]);
    assert_eq!(out.status.code(), Some(65));
    assert!(stderr(&out).contains("'U' is never used"));
}

/// A failure is printed once (no log line besides it), with the OS error's
/// text once; a missing directory is named, with what to do.
#[test]
fn a_fatal_error_is_printed_once_and_says_to_create_a_missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no").join("such");
    let state = missing.join("s");
    let out = run(&["init", "--state", state.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(74));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "printed once: {err}");
    assert!(err.starts_with("tradeid: error: "), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert!(err.contains(state.to_str().unwrap()), "names the path given: {err}");
    let needle =
        format!("The directory {} does not exist; create it (`mkdir -p {}`)", missing.display(), missing.display());
    assert!(err.contains(&needle), "{err}");
    assert!(!err.contains(".tmp-"), "never an internal file: {err}");
    assert!(!dir.path().join("no").exists());

    // Under systemd: one line, at error priority.
    let out =
        tradeid().args(["init", "--state", state.to_str().unwrap()]).env("JOURNAL_STREAM", "8:1234").output().unwrap();
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "printed once: {err}");
    assert!(err.starts_with("<3>tradeid: error: "), "{err}");
}

/// The effective uid of this process, and its name in /etc/passwd.
fn user_of(uid: u32) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == uid.to_string())
        .map_or_else(|| format!("uid {uid}"), |f| format!("user {} (uid {uid})", f[0]))
}

/// A permission error names the file and the user tradeid runs as.
#[test]
fn a_permission_error_names_the_file_and_the_user() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o000)).unwrap();
    let me = std::fs::metadata("/proc/self").unwrap().uid();
    let mut cmd = tradeid();
    cmd.args(["gen", "--state", state.to_str().unwrap()]);
    // Root reads any file: run as nobody instead.
    let uid = if me == 0 {
        cmd.uid(65534).gid(65534);
        65534
    } else {
        me
    };
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(74), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "printed once: {err}");
    assert_eq!(err.matches("Permission denied").count(), 1, "{err}");
    assert!(err.contains(state.to_str().unwrap()), "{err}");
    assert!(err.contains(&format!("tradeid runs as {}", user_of(uid))), "{err}");
}

/// Standard output closed early (`| head`) ends a command quietly, with
/// status 0: no message, no abort.
#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let path = state.to_str().unwrap();
    // `tradeid gen -n 100000 | head -1`.
    let mut child = tradeid()
        .args(["gen", "--state", path, "-n", "100000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert_eq!(first.trim().len(), 7, "{first:?}");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
    // Every command that prints, into a pipe nobody reads.
    for args in [
        &["gen", "--state", path, "-n", "3"][..],
        &["inspect", "--state", path][..],
        &["decode", "--state", path, "B762F00"][..],
        &["serve", "--check-config", "--state", path][..],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = tradeid().args(args).stdout(writer).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("error"), "{args:?}: {}", stderr(&out));
    }
}

/// Usage errors exit 78, as the README says; help and version exit 0.
#[test]
fn usage_errors_exit_78_and_help_exits_0() {
    let out = run(&["serve", "--bogus"]);
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(stderr(&out).matches("unexpected argument '--bogus'").count(), 1, "{}", stderr(&out));
    assert_eq!(run(&[]).status.code(), Some(78), "no command");
    assert_eq!(run(&["get", "-n", "lots", "--server", "127.0.0.1:7070"]).status.code(), Some(78));
    for args in [&["--help"][..], &["serve", "--help"][..], &["--version"][..]] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("tradeid"), "{args:?}");
    }
}

/// A listen address in use exits 69 (EX_UNAVAILABLE), one that is not this
/// host's 78 (EX_CONFIG), each naming the address.
#[test]
fn bind_failures_have_their_own_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let path = state.to_str().unwrap();
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(&["serve", "--state", path, "--workers", "1", "--listen", &addr]);
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(stderr(&out).contains(&addr), "{}", stderr(&out));

    let out = run(&["serve", "--state", path, "--workers", "1", "--listen", "192.0.2.1:7070"]);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(stderr(&out).contains("192.0.2.1:7070"), "{}", stderr(&out));

    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin_addr = admin.local_addr().unwrap().to_string();
    let args = ["serve", "--state", path, "--workers", "1", "--listen", "127.0.0.1:0", "--admin", &admin_addr];
    let out = run(&args);
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(stderr(&out).contains(&admin_addr) && stderr(&out).contains("--admin"), "{}", stderr(&out));
}

/// `TRADEID_LOG=debug` shows each block reserved and each admin
/// connection; the serving line lists CPUs plainly.
#[test]
fn debug_logs_show_blocks_and_admin_connections() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &[]);
    let daemon = Daemon::start_with(
        &state,
        &["--workers", "1", "--cpus", "0", "--admin", "127.0.0.1:0"],
        &[("TRADEID_LOG", "debug")],
    )
    .unwrap();
    assert_eq!(daemon.http_get("/healthz").0, 200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !daemon.stderr().contains("admin connection closed") {
        assert!(std::time::Instant::now() < deadline, "{}", daemon.stderr());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let log = daemon.stderr();
    let block = log.lines().find(|l| l.contains("block reserved")).unwrap_or_else(|| panic!("{log}"));
    assert!(block.contains("shard=") && block.contains("range=") && block.contains("flush_us="), "{block}");
    assert!(log.contains("admin connection accepted"), "{log}");
    let serving = log.lines().find(|l| l.contains("serving")).unwrap_or_else(|| panic!("{log}"));
    assert!(serving.contains("cpus=0 ") && !serving.contains("Some("), "{serving}");
}
