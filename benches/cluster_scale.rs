//! Cluster mode against one real etcd, for the scale model in
//! docs/cluster.md. Starts its own etcd (Debian's etcd-server) on loopback
//! in a temporary directory. Run with `cargo bench --bench cluster_scale`.
//!
//! 1. Raw capacity: N nodes reserving back to back: the compare-and-swaps
//!    per second one etcd commits, and their latency, as N grows.
//! 2. Real traffic: N nodes with the production adaptive block sizes, at a
//!    fixed total rate of IDs per second: the etcd load that rate needs, as
//!    the same load is spread over more nodes.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tradeid_server::bench::{paced_generators, raw_reservations, Report};

struct EtcdProcess(Child);

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds: f64 = flag(&args, "--seconds").unwrap_or(5.0);
    let dir = tempfile::tempdir().unwrap();
    // etcd's data on disk, as in production; the state files in the same
    // temporary directory.
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let _etcd = EtcdProcess(
        Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.path().join("etcd"))
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd is installed (apt-get install etcd-server)"),
    );
    std::thread::sleep(Duration::from_secs(2));
    println!("etcd {} on loopback; {seconds} s per row\n", etcd_version());
    println!("1. Raw capacity: nodes reserving blocks back to back\n");
    println!("| nodes | committed CAS/s | conflicts | errors | p50 us | p99 us |");
    println!("|---|---|---|---|---|---|");
    for nodes in [1, 4, 16, 48] {
        let r = raw_reservations(&url, &format!("raw{nodes}"), nodes, 4096, seconds, dir.path()).unwrap();
        println!(
            "| {} | {:.0} | {} | {} | {} | {} |",
            r.nodes, r.committed_per_second, r.conflicts, r.errors, r.p50_us, r.p99_us
        );
    }
    let total: f64 = flag(&args, "--rate").unwrap_or(20e6);
    println!("\n2. Real traffic: {total:.0} IDs/s in all, spread over more and more nodes (adaptive blocks)\n");
    println!("| nodes | IDs/s served | IDs/s per node | committed CAS/s | CAS/s per node | p50 us | p99 us |");
    println!("|---|---|---|---|---|---|---|");
    for nodes in [1, 4, 16, 48] {
        let r: Report = paced_generators(&url, &format!("paced{nodes}"), nodes, total, seconds, dir.path()).unwrap();
        println!(
            "| {} | {:.0} | {:.0} | {:.1} | {:.2} | {} | {} |",
            r.nodes,
            r.ids_per_second,
            r.ids_per_second / nodes as f64,
            r.committed_per_second,
            r.committed_per_second / nodes as f64,
            r.p50_us,
            r.p99_us
        );
    }
}

fn flag(args: &[String], name: &str) -> Option<f64> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)?.parse().ok())
}

fn etcd_version() -> String {
    let out = Command::new("etcd").arg("--version").output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    out.unwrap_or_default().lines().next().unwrap_or("").trim_start_matches("etcd Version: ").to_string()
}
