//! loadgen: a UDP load generator for tradeid (and any request/response UDP
//! service), plus the echo baseline it is compared against, and a gRPC and
//! HTTP load mode to compare those protocols with UDP.
//!
//! - `schedule`: open-loop intended send times (fixed or Poisson).
//! - `matcher`: reply judging, FIFO matching, duplicate counting.
//! - `drive`: the generator threads.
//! - `report`: tallies, merging, the summary and its JSON.
//! - `echo`: the echo baseline server.
//! - `rpc`: `loadgen rpc`, closed-loop gRPC or HTTP load.

mod drive;
mod echo;
mod matcher;
mod report;
mod rpc;
mod schedule;
mod sockets;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::drive::{Live, Plan};
use crate::matcher::{count_duplicates, Expect};
use crate::report::{new_histogram, CpuMeter, Latency, Summary, Tally};

/// A UDP load generator for tradeid, with an echo baseline.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version, args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the echo baseline: same batching as tradeid, constant replies.
    Echo(echo::EchoArgs),
    /// Load a tradeid server over gRPC (Next) or HTTP (/ids) instead of UDP.
    Rpc(rpc::RpcArgs),
}

/// Where the summary goes, and whose CPU it counts (both load modes).
#[derive(Debug, Args)]
pub(crate) struct Output {
    /// Write the summary as JSON to this file ("-" for standard output, with
    /// the human summary moved to standard error).
    #[arg(long)]
    pub(crate) json: Option<String>,
    /// Also report the CPU time of this process (the server) per reply.
    #[arg(long)]
    pub(crate) server_pid: Option<u32>,
    /// No progress lines.
    #[arg(long)]
    pub(crate) quiet: bool,
}

/// Load options.
#[derive(Debug, Args)]
struct RunArgs {
    /// The server to load (HOST:PORT).
    #[arg(long, required = true)]
    target: Option<String>,
    /// Sockets in total (distinct source ports), spread over the threads.
    #[arg(long, default_value_t = 4)]
    sockets: usize,
    /// Closed loop: requests kept in flight per socket.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Generator threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// CPUs to pin generator threads to, comma-separated.
    #[arg(long, value_delimiter = ',')]
    cpus: Vec<usize>,
    /// Open loop: total requests per second on a fixed schedule (latency is
    /// measured from the intended send time).
    #[arg(long)]
    rate: Option<f64>,
    /// Open loop: exponential gaps (a Poisson process) instead of fixed ones.
    #[arg(long, requires = "rate")]
    poisson: bool,
    /// IDs per request (tradeid mode).
    #[arg(long, default_value_t = 1)]
    batch: u16,
    /// Pad requests so a server's 3x anti-amplification rule allows the batch.
    #[arg(long)]
    pad: bool,
    /// Raw mode: send these bytes (hex) instead of a tradeid request.
    #[arg(long, requires = "reply_len")]
    request_hex: Option<String>,
    /// Raw mode: a reply counts only if it has exactly this length.
    #[arg(long)]
    reply_len: Option<usize>,
    /// Milliseconds before an unanswered request counts as lost.
    #[arg(long, default_value_t = 1000)]
    timeout: u64,
    /// Seconds to run (1..=3600).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Stop after this many requests in total.
    #[arg(long, default_value_t = 1_000_000_000)]
    max_requests: u64,
    /// Keep every ID and report duplicates and malformed replies at the end
    /// (8 bytes of memory per ID).
    #[arg(long)]
    check_unique: bool,
    #[command(flatten)]
    output: Output,
    /// Seed for Poisson gaps.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Echo(args)) => echo::run(args),
        Some(Command::Rpc(args)) => rpc::run(args),
        None => run(cli.run),
    };
    if let Err(e) = result {
        eprintln!("loadgen: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let target_text = args.target.clone().context("--target is required")?;
    let target: SocketAddr = target_text
        .to_socket_addrs()
        .with_context(|| format!("--target {target_text:?} is not HOST:PORT"))?
        .next()
        .with_context(|| format!("--target {target_text:?} resolves to nothing"))?;
    if !(1.0..=3600.0).contains(&args.duration) {
        bail!("--duration must be 1..=3600 seconds");
    }
    if args.threads == 0 || args.sockets < args.threads || args.window == 0 {
        bail!("need --threads >= 1, --sockets >= --threads and --window >= 1");
    }
    let (request, expect, mode) = match (&args.request_hex, args.reply_len) {
        (Some(hex), Some(len)) => (decode_hex(hex)?, Expect::Length(len), format!("raw, {len}-byte replies")),
        (None, None) => {
            let len = if args.pad { tradeid::protocol::padded_len(args.batch) } else { 8 };
            let mut request = vec![0u8; len];
            tradeid::protocol::encode_request(args.batch, &mut request);
            (request, Expect::Tradeid, format!("tradeid, batch {}", args.batch))
        }
        _ => bail!("--reply-len goes with --request-hex (raw mode)"),
    };
    let mode = match args.rate {
        Some(rate) => format!("{mode}, open loop {rate:.0}/s{}", if args.poisson { " poisson" } else { "" }),
        None => format!("{mode}, closed loop {} sockets x window {}", args.sockets, args.window),
    };
    let sockets_per_thread =
        (0..args.threads).map(|t| args.sockets / args.threads + usize::from(t < args.sockets % args.threads)).collect();
    let plan = Arc::new(Plan {
        target,
        request,
        expect,
        sockets_per_thread,
        window: args.window,
        rate: args.rate,
        poisson: args.poisson,
        seed: args.seed,
        timeout: Duration::from_millis(args.timeout),
        duration: Duration::from_secs_f64(args.duration),
        max_requests_per_thread: args.max_requests.div_ceil(args.threads as u64),
        check_unique: args.check_unique,
        cpus: args.cpus.clone(),
    });

    let cpu = CpuMeter::start(args.output.server_pid);
    let live = Arc::new(Live::default());
    let (progress_tx, progress_rx) = std::sync::mpsc::channel();
    let start = Instant::now();
    let threads: Vec<_> = (0..args.threads)
        .map(|i| {
            let (plan, live, tx) = (Arc::clone(&plan), Arc::clone(&live), progress_tx.clone());
            std::thread::spawn(move || drive::run_thread(plan, i, start, live, tx))
        })
        .collect();
    drop(progress_tx);

    // Progress: one line a second from the merged interval histograms.
    let mut last = (0u64, Instant::now());
    let mut window = new_histogram();
    let mut received = 0;
    for h in progress_rx.iter() {
        window.add(&h).expect("same bounds");
        received += 1;
        if received % args.threads == 0 {
            let replies = live.replies.load(Ordering::Relaxed);
            let secs = last.1.elapsed().as_secs_f64();
            if !args.output.quiet {
                eprintln!(
                    "{:>5.1}s  {:>10.0} replies/s  p50 {:>6} us  p99 {:>6} us  lost {}",
                    start.elapsed().as_secs_f64(),
                    (replies - last.0) as f64 / secs,
                    window.value_at_quantile(0.5),
                    window.value_at_quantile(0.99),
                    live.lost.load(Ordering::Relaxed)
                );
            }
            last = (replies, Instant::now());
            window.reset();
        }
    }
    let mut total = Tally::new();
    for t in threads {
        total.merge(t.join().map_err(|_| anyhow::anyhow!("a generator thread panicked"))??);
    }
    let seconds = plan.duration.as_secs_f64().min(start.elapsed().as_secs_f64());
    let (client_cpu, server_cpu) = cpu.used();
    let duplicates = args.check_unique.then(|| count_duplicates(&mut total.id_values));
    let per_reply = |cpu: f64| cpu * 1e6 / total.replies.max(1) as f64;
    let achieved = total.sent as f64 / seconds;
    let summary = Summary {
        mode,
        target: target.to_string(),
        seconds,
        sent: total.sent,
        replies: total.replies,
        ids: total.ids,
        requests_per_second: total.replies as f64 / seconds,
        ids_per_second: total.ids as f64 / seconds,
        target_rate: args.rate,
        generator_fell_behind: args.rate.is_some_and(|r| fell_behind(r, achieved, total.late_sends, total.sent)),
        late_sends: total.late_sends,
        latency_us: Latency::of(&total.latency_us),
        lost: total.lost,
        unmatched: total.unmatched,
        malformed: total.malformed,
        errors: total.errors.iter().map(|(code, n)| (format!("!ERR{code}"), *n)).collect(),
        duplicates,
        client_cpu_seconds: client_cpu,
        client_cpu_us_per_reply: per_reply(client_cpu),
        server_cpu_seconds: server_cpu,
        server_cpu_us_per_reply: server_cpu.map(per_reply),
    };
    if summary.generator_fell_behind {
        eprintln!("loadgen: warning: the generator fell behind its schedule ({} late sends); the results understate what the server can do", summary.late_sends);
    }
    summary.emit(args.output.json.as_deref())
}

/// Whether an open-loop generator failed to keep its schedule: it sent
/// under 95% of the target rate, or over 5% of its sends went out more than
/// a millisecond late.
fn fell_behind(target_rate: f64, achieved_rate: f64, late_sends: u64, sent: u64) -> bool {
    achieved_rate < 0.95 * target_rate || late_sends * 20 > sent
}

fn decode_hex(hex: &str) -> anyhow::Result<Vec<u8>> {
    let hex: String = hex.chars().filter(|c| !c.is_whitespace()).collect();
    if !hex.len().is_multiple_of(2) {
        bail!("--request-hex has an odd number of digits");
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&hex[i..i + 2], 16)
                .with_context(|| format!("--request-hex: {:?} is not hex", &hex[i..i + 2]))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falling_behind_is_detected() {
        assert!(!fell_behind(1000.0, 990.0, 10, 990));
        assert!(fell_behind(1000.0, 900.0, 0, 900), "achieved too little");
        assert!(fell_behind(1000.0, 1000.0, 60, 1000), "too many late sends");
    }

    #[test]
    fn hex_requests() {
        assert_eq!(decode_hex("4944 0101 0001 0000").unwrap(), vec![0x49, 0x44, 1, 1, 0, 1, 0, 0]);
        assert!(decode_hex("abc").is_err());
        assert!(decode_hex("zz").is_err());
    }
}
