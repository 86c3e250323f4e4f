//! A real etcd for the cluster tests: one member or a 3-member cluster on
//! loopback ports, in a temporary directory, killed on drop. A missing etcd
//! binary fails the test (CI installs Debian's etcd-server).

#![allow(dead_code)] // each test uses a different subset

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::stable_port;

/// One etcd member.
struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

/// A running etcd (one or more members).
pub struct Etcd {
    members: Vec<Member>,
    dir: tempfile::TempDir,
    tls: Option<Tls>,
    /// More flags for every member (e.g. `--auth-token-ttl`).
    extra: Vec<String>,
    /// Whether authentication is on (then health is asked of etcdctl).
    auth: bool,
}

/// TLS material for a member's client port.
#[derive(Clone)]
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Etcd {
    /// One member.
    pub fn single() -> Etcd {
        Etcd::start(1, None)
    }

    /// Three members, one of them the leader.
    pub fn three() -> Etcd {
        Etcd::start(3, None)
    }

    /// One member that serves clients over TLS and requires a client
    /// certificate signed by `tls.ca`.
    pub fn single_tls(tls: Tls) -> Etcd {
        Etcd::start(1, Some(tls))
    }

    /// One member started with `extra` flags.
    pub fn single_with(extra: &[&str]) -> Etcd {
        Etcd::start_with(1, None, extra)
    }

    fn start(count: usize, tls: Option<Tls>) -> Etcd {
        Etcd::start_with(count, tls, &[])
    }

    /// Starts `count` members on fresh ports. A member that exits before
    /// the cluster is healthy most likely lost its port to another test
    /// between [`stable_port`] and its bind: that start is thrown away and
    /// tried again on other ports (three times at most).
    fn start_with(count: usize, tls: Option<Tls>, extra: &[&str]) -> Etcd {
        let mut failures = Vec::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let members = (0..count)
                .map(|i| Member { name: format!("m{i}"), client: stable_port(), peer: stable_port(), child: None })
                .collect();
            let extra = extra.iter().map(|a| a.to_string()).collect();
            let mut etcd = Etcd { members, dir, tls: tls.clone(), extra, auth: false };
            for i in 0..count {
                etcd.start_member(i);
            }
            match etcd.try_wait_healthy(Duration::from_secs(60)) {
                Ok(()) => return etcd,
                Err(e) => failures.push(e),
            }
        }
        panic!("etcd did not start: {}", failures.join("; "))
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    fn start_member(&mut self, i: usize) {
        let initial_cluster: Vec<String> =
            self.members.iter().map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer)).collect();
        let m = &self.members[i];
        let client_url = format!("{}://127.0.0.1:{}", self.scheme(), m.client);
        let peer_url = format!("http://127.0.0.1:{}", m.peer);
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(self.dir.path().join(&m.name))
            .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &initial_cluster.join(","), "--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "tradeid-test"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "error"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.log_path(i)).map(Stdio::from).unwrap_or_else(|_| Stdio::null()));
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file").arg(&tls.cert).arg("--key-file").arg(&tls.key);
            cmd.arg("--trusted-ca-file").arg(&tls.ca).arg("--client-cert-auth");
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot run etcd ({e}); the cluster tests need etcd-server installed (CI installs it)")
        });
        self.members[i].child = Some(child);
    }

    /// Where member `i` logs (errors only).
    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("{}.log", self.members[i].name))
    }

    /// The client endpoints, comma-separated, for `--etcd`.
    pub fn endpoints(&self) -> String {
        self.members.iter().map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client)).collect::<Vec<_>>().join(",")
    }

    /// Member `i`'s client port.
    pub fn client_port(&self, i: usize) -> u16 {
        self.members[i].client
    }

    /// The endpoints of the members still running.
    pub fn live_endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client))
            .collect()
    }

    /// kill -9 member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills every member: etcd fully down.
    pub fn kill_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }

    /// Restarts every stopped member (same data) and waits until healthy.
    pub fn restart_all(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.start_member(i);
            }
        }
        self.wait_healthy(Duration::from_secs(30));
    }

    /// The index of the current leader.
    pub fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for (i, m) in self.members.iter().enumerate() {
                if m.child.is_none() {
                    continue;
                }
                if let Some(status) = post_json(m.client, "/v3/maintenance/status", "{}") {
                    let me = status["header"]["member_id"].as_str().unwrap_or("");
                    let leader = status["leader"].as_str().unwrap_or("-");
                    if me == leader {
                        return i;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no etcd leader");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until a live member answers a write (so a leader exists).
    pub fn wait_healthy(&mut self, limit: Duration) {
        if let Err(e) = self.try_wait_healthy(limit) {
            panic!("etcd did not become healthy: {e}");
        }
    }

    /// [`Etcd::wait_healthy`], or why not: a member exited, or time ran out.
    fn try_wait_healthy(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            for i in 0..self.members.len() {
                let exited = self.members[i].child.as_mut().and_then(|c| c.try_wait().ok().flatten());
                if let Some(status) = exited {
                    let log = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(3).collect();
                    let m = &self.members[i];
                    return Err(format!(
                        "member {} (client port {}) exited: {status}; its log ends: {tail:?}",
                        m.name, m.client
                    ));
                }
            }
            let ok = self.members.iter().filter(|m| m.child.is_some()).any(|m| {
                if self.tls.is_some() || self.auth {
                    self.etcdctl(&["endpoint", "health"]).status.success()
                } else {
                    post_json(m.client, "/v3/kv/put", r#"{"key":"aGVhbHRo","value":"b2s="}"#).is_some()
                }
            });
            if ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("no member answered within {limit:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Saves a snapshot of the data to `path` (`etcdctl snapshot save`).
    pub fn snapshot(&self, path: &Path) {
        let out = self.etcdctl(&["snapshot", "save", path.to_str().unwrap()]);
        assert!(out.status.success(), "etcdctl snapshot save: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Restores a one-member etcd from `snapshot`, as an operator restores
    /// a backup: stop it, replace its data with the snapshot's (`etcdctl
    /// snapshot restore`), start it again on the same addresses.
    pub fn restore(&mut self, snapshot: &Path) {
        assert_eq!(self.members.len(), 1, "restore is for a one-member etcd");
        self.kill(0);
        let m = &self.members[0];
        let data = self.dir.path().join(&m.name);
        std::fs::remove_dir_all(&data).unwrap();
        let peer_url = format!("http://127.0.0.1:{}", m.peer);
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["snapshot", "restore", snapshot.to_str().unwrap(), "--data-dir", data.to_str().unwrap()])
            .args(["--name", &m.name, "--initial-cluster", &format!("{}={peer_url}", m.name)])
            .args(["--initial-advertise-peer-urls", &peer_url, "--initial-cluster-token", "tradeid-test"])
            .output()
            .unwrap();
        assert!(out.status.success(), "etcdctl snapshot restore: {}", String::from_utf8_lossy(&out.stderr));
        self.start_member(0);
        self.wait_healthy(Duration::from_secs(30));
    }

    /// The shard marks of cluster `name` as etcd holds them: shard → mark.
    pub fn marks(&self, name: &str) -> BTreeMap<u32, u64> {
        let out = self.etcdctl(&["get", "--prefix", &format!("/tradeid/{name}/marks/")]);
        assert!(out.status.success(), "etcdctl get: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        lines.chunks(2).map(|kv| (kv[0].rsplit('/').next().unwrap().parse().unwrap(), kv[1].parse().unwrap())).collect()
    }

    /// Turns on etcd authentication with a `root` user and a user `tradeid`
    /// (password `s3cret`) allowed to read and write `/tradeid/`.
    pub fn enable_auth(&mut self) {
        for args in [
            vec!["user", "add", "root:rootpw"],
            vec!["user", "add", "tradeid:s3cret"],
            vec!["role", "add", "tradeid"],
            vec!["role", "grant-permission", "tradeid", "--prefix=true", "readwrite", "/tradeid/"],
            vec!["user", "grant-role", "tradeid", "tradeid"],
            vec!["auth", "enable"],
        ] {
            let out = self.etcdctl(&args);
            assert!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        self.auth = true;
    }

    /// Runs etcdctl against the live members.
    pub fn etcdctl(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3").arg(format!("--endpoints={}", self.live_endpoints().join(",")));
        if let Some(tls) = &self.tls {
            cmd.arg("--cacert").arg(&tls.ca).arg("--cert").arg(&tls.cert).arg("--key").arg(&tls.key);
        }
        if self.auth {
            cmd.arg("--user=root:rootpw");
        }
        cmd.args(args).output().expect("cannot run etcdctl; the cluster tests need it (Debian's etcd-client)")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// A TCP proxy in front of one etcd endpoint that can swallow etcd's
/// replies while still passing the requests on: a request then reaches
/// etcd and commits, and its sender never hears back (a lost reply).
pub struct Proxy {
    /// `http://127.0.0.1:PORT`, to give as `--etcd`.
    pub url: String,
    swallow: Arc<AtomicBool>,
    /// Bumped to cut every open connection.
    generation: Arc<AtomicU64>,
    /// Bytes etcd sent that were swallowed.
    pub swallowed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// A proxy to `127.0.0.1:upstream`, running until dropped.
    pub fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (swallow, generation, swallowed, stop) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let proxy = Proxy {
            url,
            swallow: Arc::clone(&swallow),
            generation: Arc::clone(&generation),
            swallowed: Arc::clone(&swallowed),
            stop: Arc::clone(&stop),
        };
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                let born = generation.load(Ordering::SeqCst);
                for (from, to, replies) in
                    [(client.try_clone().unwrap(), server.try_clone().unwrap(), false), (server, client, true)]
                {
                    let (swallow, generation, swallowed, stop) =
                        (Arc::clone(&swallow), Arc::clone(&generation), Arc::clone(&swallowed), Arc::clone(&stop));
                    std::thread::spawn(move || {
                        pump(from, to, replies.then_some((swallow, swallowed)), born, &generation, &stop)
                    });
                }
            }
        });
        proxy
    }

    /// From now on, swallow etcd's replies (requests still pass).
    pub fn swallow_replies(&self) {
        self.swallow.store(true, Ordering::SeqCst);
    }

    /// Cuts every connection open now and passes replies again.
    pub fn heal(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.swallow.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until either end closes or the connection's
/// generation is cut; etcd's replies are dropped while `swallow` is set.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    swallow: Option<(Arc<AtomicBool>, Arc<AtomicU64>)>,
    born: u64,
    generation: &AtomicU64,
    stop: &AtomicBool,
) {
    from.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let mut buf = [0u8; 16384];
    while generation.load(Ordering::SeqCst) == born && !stop.load(Ordering::Relaxed) {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(_) => break,
        };
        if let Some((swallow, swallowed)) = &swallow {
            if swallow.load(Ordering::SeqCst) {
                swallowed.fetch_add(n as u64, Ordering::Relaxed);
                continue;
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// POSTs JSON to etcd's gRPC gateway; `None` if it does not answer 200.
fn post_json(port: u16, path: &str, body: &str) -> Option<serde_json::Value> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: etcd\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    if !response.starts_with("HTTP/1.1 200") {
        return None;
    }
    let body = response.split_once("\r\n\r\n")?.1;
    // Chunked or not, the JSON object is the part between the outer braces.
    let start = body.find('{')?;
    let end = body.rfind('}')?;
    serde_json::from_str(&body[start..=end]).ok()
}
