//! Spaces whose IDs end in a check character (`init --check-char`): every
//! ID they make passes the check, wherever it is made, and every place that
//! reads IDs refuses a typo.

use std::collections::HashSet;
use std::io::Write;
use std::process::Stdio;

use crate::harness::*;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts every ID is canonical and passes its check.
fn assert_all_check(ids: &[String]) {
    for id in ids {
        let parsed = tradeid::Id::parse_checked(id).unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(&parsed.to_string(), id, "not canonical");
    }
}

fn gen_ids(state: &std::path::Path, count: u64) -> Vec<String> {
    let out = run(&["gen", "--state", state.to_str().unwrap(), "-n", &count.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).lines().map(String::from).collect()
}

/// A check-character space served over UDP (single and bulk), HTTP and
/// `gen`: unique IDs, every one passing its check, and `decode` finds each
/// one's counter.
#[test]
fn a_check_character_space_makes_only_ids_that_check_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &["--check-char"]);
    let inspect = stdout(&run(&["inspect", "--state", state.to_str().unwrap()]));
    assert!(inspect.contains("6 characters and a check character"), "{inspect}");
    assert!(inspect.contains("2^30 IDs"), "{inspect}");

    let mut seen = HashSet::new();
    let daemon = Daemon::start(&state, &["--workers", "2", "--admin", "127.0.0.1:0"]);
    for _ in 0..200 {
        let ids = fetch(daemon.addr, 1);
        assert_all_check(&ids);
        insert_unique(&mut seen, ids);
        let ids = fetch(daemon.addr, 175);
        assert_eq!(ids.len(), 175);
        assert_all_check(&ids);
        insert_unique(&mut seen, ids);
    }
    let (status, body) = daemon.http_get("/ids?count=175");
    assert_eq!(status, 200, "{body}");
    let ids: Vec<String> = body.split_whitespace().map(String::from).collect();
    assert_eq!(ids.len(), 175);
    assert_all_check(&ids);
    insert_unique(&mut seen, ids);
    drop(daemon);

    let ids = gen_ids(&state, 20_000);
    assert_all_check(&ids);
    let sample = ids[123].clone();
    insert_unique(&mut seen, ids);

    let out = run(&["decode", "--state", state.to_str().unwrap(), &sample.to_lowercase()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("check    ok"), "{text}");
    assert!(text.contains("below the shard's mark"), "{text}");
}

/// Swaps two neighbouring characters of `id` at the first place they
/// differ.
fn swapped(id: &str) -> String {
    let mut b = id.as_bytes().to_vec();
    let i = (0..6).find(|&i| b[i] != b[i + 1]).expect("an ID with two different neighbours");
    b.swap(i, i + 1);
    String::from_utf8(b).unwrap()
}

/// `tradeid check`: one line per ID (canonical form, or the input and why
/// not), exit 0 only if all pass, 65 otherwise; `-` reads standard input.
#[test]
fn the_check_command_prints_one_line_per_id_and_fails_on_any_typo() {
    let dir = tempfile::tempdir().unwrap();
    let state = init_state(dir.path(), "s", &["--check-char"]);
    let ids = gen_ids(&state, 3);
    // Forgiving input: case, hyphens, spaces, O/I/L.
    let typed = format!("{}-{}", ids[0][..3].to_lowercase(), &ids[0][3..]);
    let out = run(&["check", &typed, &ids[1], &ids[2]]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("{}\n{}\n{}\n", ids[0], ids[1], ids[2]));

    let typo = swapped(&ids[1]);
    let out = run(&["check", &ids[0], &typo, "B76", &ids[2]]);
    assert_eq!(out.status.code(), Some(65));
    let lines: Vec<String> = stdout(&out).lines().map(String::from).collect();
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(lines[0], ids[0]);
    assert_eq!(lines[1], format!("{typo:?}: check character mismatch: probably a typo; compare with the source"));
    assert!(lines[2].starts_with("\"B76\": an ID has exactly 7 characters"), "{}", lines[2]);
    assert_eq!(lines[3], ids[2]);
    assert_eq!(stderr(&out).matches("2 of 4 IDs are not valid").count(), 1, "{}", stderr(&out));

    // Standard input, blank lines skipped, in order with the arguments.
    let mut child = tradeid()
        .args(["check", &ids[0], "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let input = format!("{}\n\n {} \n{typo}\n", ids[1], ids[2]);
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(65));
    let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(&lines[..3], &[ids[0].as_str(), ids[1].as_str(), ids[2].as_str()]);
    assert!(lines[3].contains("check character mismatch"), "{}", lines[3]);

    // A typo given to decode is refused, never decoded as another trade.
    let out = run(&["decode", "--state", state.to_str().unwrap(), &typo]);
    assert_eq!(out.status.code(), Some(65));
    assert!(stderr(&out).contains("check character mismatch: probably a typo"), "{}", stderr(&out));
    assert!(!stdout(&out).contains("counter"), "{}", stdout(&out));
}

/// Nodes made from one `keygen --check-char` key take the format from the
/// key: generated to exhaustion, their union is the whole (small) space
/// once, every ID passing its check.
#[test]
fn check_character_nodes_from_one_key_cover_a_small_space_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("space.key");
    let key = key.to_str().unwrap();
    let out = run(&["keygen", "--out", key, "--check-char", "--width", "12", "--shard-bits", "4"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut union = HashSet::new();
    for node in 0..3u64 {
        let name = format!("n{node}");
        let extra = ["--node", &node.to_string(), "--nodes", "3", "--key-file", key];
        let state = init_state(dir.path(), &name, &extra);
        let capacity = if node == 0 { 86 * 16 } else { 85 * 16 };
        let ids = gen_ids(&state, capacity);
        assert_all_check(&ids);
        insert_unique(&mut union, ids);
        assert_eq!(run(&["gen", "--state", state.to_str().unwrap(), "-n", "1"]).status.code(), Some(65));
    }
    assert_eq!(union.len(), 4096);
}

/// A space has one format: a key or flag that disagrees is refused, and a
/// plain space's IDs are never taken for check-character ones.
#[test]
fn mixing_formats_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let plain_key = dir.path().join("plain.key");
    assert!(run(&["keygen", "--out", plain_key.to_str().unwrap()]).status.success());
    let state = dir.path().join("s");
    let out = run(&[
        "init",
        "--state",
        state.to_str().unwrap(),
        "--key-file",
        plain_key.to_str().unwrap(),
        "--node",
        "0",
        "--nodes",
        "2",
        "--check-char",
    ]);
    assert_eq!(out.status.code(), Some(78));
    let err = stderr(&out);
    assert!(err.contains("defines a space without check characters") && err.contains("keygen --check-char"), "{err}");
    assert!(!state.exists());

    let out = run(&["init", "--state", state.to_str().unwrap(), "--check-char", "--width", "35"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).contains("at most 30 bits"), "{}", stderr(&out));

    // IDs of a plain space almost never pass a check; `decode` against a
    // plain file says there is no check character to verify.
    let plain = init_state(dir.path(), "plain", &[]);
    let ids = gen_ids(&plain, 320);
    let passing = ids.iter().filter(|id| tradeid::Id::parse_checked(id).is_ok()).count();
    assert!(passing < 40, "{passing} of 320 plain IDs pass a check (expected about 10)");
    let out = run(&["decode", "--state", plain.to_str().unwrap(), &ids[0]]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("check    none"), "{}", stdout(&out));
}

/// `init --etcd --cluster --check-char`: the cluster records the format,
/// a node joining without the flag takes it from etcd, both serve only
/// IDs that check, and a mismatch between a state file and its cluster's
/// metadata is refused, either way round, naming both.
#[test]
fn a_check_character_cluster_and_mismatched_formats_against_a_real_etcd() {
    use crate::etcd::Etcd;
    let etcd = Etcd::single();
    let e = etcd.endpoints();
    let dir = tempfile::tempdir().unwrap();
    let init = |name: &str, cluster: &str, extra: &[&str]| {
        let mut args = vec!["--etcd", e.as_str(), "--cluster", cluster];
        args.extend_from_slice(extra);
        init_state(dir.path(), name, &args)
    };
    let first = init("a", "checked", &["--check-char"]);
    let joined = init("b", "checked", &[]);
    let inspect = stdout(&run(&["inspect", "--etcd", &e, "--cluster", "checked"]));
    assert!(inspect.contains("6 characters and a check character"), "{inspect}");
    let mut seen = HashSet::new();
    for state in [&first, &joined] {
        let node = Daemon::start(state, &["--etcd", &e, "--cluster", "checked", "--workers", "1"]);
        for _ in 0..20 {
            let ids = fetch(node.addr, 175);
            assert_all_check(&ids);
            insert_unique(&mut seen, ids);
        }
    }
    // Joining a plain cluster with --check-char is refused.
    // (30 bits, so that the same space with a check character is valid.)
    let _plain = init("p", "plain", &["--width", "30"]);
    let out = run(&[
        "init",
        "--state",
        dir.path().join("q").to_str().unwrap(),
        "--etcd",
        &e,
        "--cluster",
        "plain",
        "--check-char",
    ]);
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).contains("already exists without check characters"), "{}", stderr(&out));

    // Rewrite a cluster's metadata with the other format (all else equal):
    // its node's file no longer matches, and serving it is refused.
    let meta_key = |cluster: &str| format!("/tradeid/{cluster}/meta");
    let get = |cluster: &str| {
        let out = etcd.etcdctl(&["get", "--print-value-only", &meta_key(cluster)]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out).trim_end().to_string() + "\n"
    };
    let put = |cluster: &str, value: &str| {
        let out = etcd.etcdctl(&["put", &meta_key(cluster), value]);
        assert!(out.status.success(), "{}", stderr(&out));
    };
    let checked_meta = get("checked");
    assert!(
        checked_meta.starts_with("tradeid-cluster 2\n") && checked_meta.contains("check-char yes"),
        "{checked_meta}"
    );
    put("checked", &checked_meta.replacen("tradeid-cluster 2", "tradeid-cluster 1", 1).replace("check-char yes\n", ""));
    // Refused at start (a server that started anyway fails the test, it
    // does not hang it): the failure text, with its exit code.
    let serve = |state: &std::path::Path, cluster: &str| -> String {
        if Daemon::start_with(state, &["--etcd", &e, "--cluster", cluster], &[]).is_ok() {
            panic!("{} was served by cluster {cluster:?} of the other format", state.display());
        }
        let path = state.to_str().unwrap();
        let out = run(&["serve", "--state", path, "--listen", "127.0.0.1:0", "--etcd", &e, "--cluster", cluster]);
        assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
        stderr(&out)
    };
    let err = serve(&first, "checked");
    assert!(
        err.contains("makes IDs with a check character but cluster \"checked\" in etcd makes IDs without"),
        "{err}"
    );

    let plain_state = dir.path().join("p");
    let plain_meta = get("plain");
    put(
        "plain",
        &plain_meta.replacen("tradeid-cluster 1", "tradeid-cluster 2", 1).replace("\nkey ", "\ncheck-char yes\nkey "),
    );
    let err = serve(&plain_state, "plain");
    assert!(err.contains("makes IDs without a check character but cluster \"plain\" in etcd makes IDs with"), "{err}");
    assert_eq!(err.matches("tradeid: error").count(), 1, "printed once: {err}");
}
