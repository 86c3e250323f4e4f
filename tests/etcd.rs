//! A real etcd for the cluster tests: one member or a 3-member cluster on
//! loopback ports, in a temporary directory, killed on drop. A missing etcd
//! binary fails the test (CI installs Debian's etcd-server).

#![allow(dead_code)] // each test uses a different subset

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

    fn start(count: usize, tls: Option<Tls>) -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let members = (0..count)
            .map(|i| Member { name: format!("m{i}"), client: free_port(), peer: free_port(), child: None })
            .collect();
        let mut etcd = Etcd { members, dir, tls };
        for i in 0..count {
            etcd.start_member(i);
        }
        etcd.wait_healthy(Duration::from_secs(30));
        etcd
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
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file").arg(&tls.cert).arg("--key-file").arg(&tls.key);
            cmd.arg("--trusted-ca-file").arg(&tls.ca).arg("--client-cert-auth");
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot run etcd ({e}); the cluster tests need etcd-server installed (CI installs it)")
        });
        self.members[i].child = Some(child);
    }

    /// The client endpoints, comma-separated, for `--etcd`.
    pub fn endpoints(&self) -> String {
        self.members.iter().map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client)).collect::<Vec<_>>().join(",")
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
    pub fn wait_healthy(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let ok = self.members.iter().filter(|m| m.child.is_some()).any(|m| {
                if self.tls.is_some() {
                    self.etcdctl(&["endpoint", "health"]).status.success()
                } else {
                    post_json(m.client, "/v3/kv/put", r#"{"key":"aGVhbHRo","value":"b2s="}"#).is_some()
                }
            });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "etcd did not become healthy");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs etcdctl against the live members.
    pub fn etcdctl(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3").arg(format!("--endpoints={}", self.live_endpoints().join(",")));
        if let Some(tls) = &self.tls {
            cmd.arg("--cacert").arg(&tls.ca).arg("--cert").arg(&tls.cert).arg("--key").arg(&tls.key);
        }
        cmd.args(args).output().expect("cannot run etcdctl; the cluster tests need it (Debian's etcd-client)")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// A free loopback port (bound, then released for etcd to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
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
