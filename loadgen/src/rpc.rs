//! `loadgen rpc`: closed-loop load over gRPC (`tradeid.v1.IdService/Next`
//! on the server's `--grpc` listener) or HTTP (`GET /ids?count=N` on its
//! `--admin` listener), to compare those protocols with UDP side by side
//! (`perf/bench.py --only protocols`).
//!
//! One client thread (pinned with `--cpu`) runs a single-threaded tokio
//! runtime with `connections × window` calls in flight: gRPC multiplexes
//! `window` calls on each of `connections` HTTP/2 connections; HTTP/1.1
//! carries one call at a time per connection, so it opens `connections ×
//! window` keep-alive connections. The summary and its JSON are the UDP
//! mode's. Its `server_cpu_us_per_reply` (with `--server-pid`) is what
//! compares the protocols' cost to the *server*, whatever the client's own
//! speed: this is a Rust client on a core of its own, so that it is not
//! the thing measured.

use std::collections::BTreeMap;
use std::io;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tradeid::id::ID_LEN;

use crate::report::{CpuMeter, Latency, Summary, Tally};

/// The generated `tradeid.v1` client.
#[allow(unreachable_pub, missing_docs, clippy::all)]
mod pb {
    tonic::include_proto!("tradeid.v1");
}

use pb::id_service_client::IdServiceClient;

/// Which protocol to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Protocol {
    /// `tradeid.v1.IdService/Next` on the `--grpc` listener.
    Grpc,
    /// `GET /ids?count=N` on the `--admin` listener (HTTP/1.1 keep-alive).
    Http,
}

/// Options of `loadgen rpc`.
#[derive(Debug, Args)]
pub(crate) struct RpcArgs {
    /// The protocol to load.
    #[arg(long, value_enum)]
    protocol: Protocol,
    /// The listener to load (HOST:PORT): the server's --grpc address for
    /// grpc, its --admin address for http.
    #[arg(long)]
    target: String,
    /// IDs per call (for http at most the server's --max-batch).
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// gRPC: HTTP/2 connections. HTTP: groups of `window` connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Calls in flight per gRPC connection (HTTP: connections per group,
    /// one call each), so `connections × window` calls are in flight.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// The CPU to pin the client thread to.
    #[arg(long)]
    cpu: Option<usize>,
    /// Milliseconds before an unanswered call counts as lost.
    #[arg(long, default_value_t = 5000)]
    timeout: u64,
    /// Seconds to run (1..=3600).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// The summary (this mode prints no progress lines).
    #[command(flatten)]
    output: crate::Output,
}

/// Runs the load and prints (and writes) the summary.
pub(crate) fn run(args: RpcArgs) -> anyhow::Result<()> {
    if !(1.0..=3600.0).contains(&args.duration) {
        bail!("--duration must be 1..=3600 seconds");
    }
    if args.connections == 0 || args.window == 0 || args.count == 0 {
        bail!("need --connections, --window and --count of at least 1");
    }
    if let Some(cpu) = args.cpu {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
            bail!("cannot pin the client thread to CPU {cpu} (--cpu)");
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the client runtime")?;
    let cpu = CpuMeter::start(args.output.server_pid);
    let start = Instant::now();
    let total = runtime.block_on(drive(&args, start + Duration::from_secs_f64(args.duration)))?;
    // Calls in flight at the end are waited for, so this is a little
    // longer than --duration.
    let seconds = start.elapsed().as_secs_f64();
    let (client_cpu, server_cpu) = cpu.used();
    let per_reply = |cpu: f64| cpu * 1e6 / total.replies.max(1) as f64;
    let name = match args.protocol {
        Protocol::Grpc => "grpc IdService/Next",
        Protocol::Http => "http GET /ids",
    };
    let errors: BTreeMap<String, u64> = total
        .errors
        .iter()
        .map(|(&code, &n)| {
            let label = match args.protocol {
                Protocol::Grpc => format!("grpc {:?}", tonic::Code::from(i32::from(code))),
                Protocol::Http => format!("HTTP {code}"),
            };
            (label, n)
        })
        .collect();
    let summary = Summary {
        mode: format!(
            "{name}, {} IDs per call, closed loop {} connections x window {}",
            args.count, args.connections, args.window
        ),
        target: args.target.clone(),
        seconds,
        sent: total.sent,
        replies: total.replies,
        ids: total.ids,
        requests_per_second: total.replies as f64 / seconds,
        ids_per_second: total.ids as f64 / seconds,
        target_rate: None,
        generator_fell_behind: false,
        late_sends: 0,
        latency_us: Latency::of(&total.latency_us),
        lost: total.lost,
        unmatched: 0,
        malformed: total.malformed,
        errors,
        duplicates: None,
        client_cpu_seconds: client_cpu,
        client_cpu_us_per_reply: per_reply(client_cpu),
        server_cpu_seconds: server_cpu,
        server_cpu_us_per_reply: server_cpu.map(per_reply),
    };
    summary.emit(args.output.json.as_deref())
}

/// Opens the connections, runs every caller until `end`, and merges their
/// tallies.
async fn drive(args: &RpcArgs, end: Instant) -> anyhow::Result<Tally> {
    let timeout = Duration::from_millis(args.timeout);
    let mut callers = tokio::task::JoinSet::new();
    match args.protocol {
        Protocol::Grpc => {
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", args.target))
                .with_context(|| format!("--target {:?} is not HOST:PORT", args.target))?;
            for _ in 0..args.connections {
                // One Channel is one HTTP/2 connection.
                let channel = endpoint
                    .connect()
                    .await
                    .with_context(|| format!("cannot connect to the gRPC listener {} (--target)", args.target))?;
                for _ in 0..args.window {
                    callers.spawn(grpc_caller(IdServiceClient::new(channel.clone()), args.count, end, timeout));
                }
            }
        }
        Protocol::Http => {
            let request = format!("GET /ids?count={} HTTP/1.1\r\nHost: {}\r\n\r\n", args.count, args.target);
            for _ in 0..args.connections * args.window {
                let stream = connect(&args.target).await?;
                callers.spawn(http_caller(
                    stream,
                    args.target.clone(),
                    request.clone().into_bytes(),
                    args.count,
                    end,
                    timeout,
                ));
            }
        }
    }
    let mut total = Tally::new();
    while let Some(tally) = callers.join_next().await {
        total.merge(tally.context("a caller task failed")??);
    }
    Ok(total)
}

/// Counts one answered call of `ids` IDs (of which `well_formed` are 7
/// characters), asked for `count`, sent at `sent`.
fn answered(tally: &mut Tally, count: u32, ids: usize, well_formed: usize, sent: Instant) {
    if ids != count as usize || well_formed != ids {
        tally.malformed += 1;
        return;
    }
    tally.replies += 1;
    tally.ids += ids as u64;
    tally.latency_us.saturating_record(sent.elapsed().as_micros() as u64);
}

/// One gRPC caller: `Next(count)` after `Next(count)` until `end`.
async fn grpc_caller(
    mut client: IdServiceClient<tonic::transport::Channel>,
    count: u32,
    end: Instant,
    timeout: Duration,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::new();
    while Instant::now() < end {
        let sent = Instant::now();
        tally.sent += 1;
        match tokio::time::timeout(timeout, client.next(pb::NextRequest { count })).await {
            Err(_) => tally.lost += 1,
            Ok(Err(status)) => *tally.errors.entry(status.code() as u16).or_default() += 1,
            Ok(Ok(reply)) => {
                let ids = reply.into_inner().ids;
                let well_formed = ids.iter().filter(|id| id.len() == ID_LEN).count();
                answered(&mut tally, count, ids.len(), well_formed, sent);
            }
        }
    }
    Ok(tally)
}

async fn connect(target: &str) -> anyhow::Result<BufReader<TcpStream>> {
    let stream = TcpStream::connect(target)
        .await
        .with_context(|| format!("cannot connect to the HTTP listener {target} (--target)"))?;
    stream.set_nodelay(true).context("cannot set TCP_NODELAY")?;
    Ok(BufReader::new(stream))
}

/// One HTTP caller on its own keep-alive connection (reopened if the server
/// closes it): `GET /ids?count=N` after another until `end`.
async fn http_caller(
    stream: BufReader<TcpStream>,
    target: String,
    request: Vec<u8>,
    count: u32,
    end: Instant,
    timeout: Duration,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::new();
    let mut connection = Some(stream);
    let mut body = Vec::new();
    while Instant::now() < end {
        let stream = match &mut connection {
            Some(stream) => stream,
            None => connection.insert(connect(&target).await?),
        };
        let sent = Instant::now();
        tally.sent += 1;
        match tokio::time::timeout(timeout, http_exchange(stream, &request, &mut body)).await {
            Err(_) | Ok(Err(_)) => {
                // No answer, or the connection broke (the server closes
                // connections after a while): count it, reconnect.
                tally.lost += 1;
                connection = None;
            }
            Ok(Ok((status, keep_alive))) => {
                if !keep_alive {
                    connection = None;
                }
                if status != 200 {
                    *tally.errors.entry(status).or_default() += 1;
                    continue;
                }
                let lines = body.split(|&b| b == b'\n').filter(|line| !line.is_empty());
                let (ids, well_formed) =
                    lines.fold((0, 0), |(n, ok), line| (n + 1, ok + usize::from(line.len() == ID_LEN)));
                answered(&mut tally, count, ids, well_formed, sent);
            }
        }
    }
    Ok(tally)
}

/// Sends `request` and reads one response into `body`; returns the status
/// and whether the connection stays open. Needs a Content-Length (which the
/// admin listener always sends).
async fn http_exchange(
    stream: &mut BufReader<TcpStream>,
    request: &[u8],
    body: &mut Vec<u8>,
) -> io::Result<(u16, bool)> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    stream.get_mut().write_all(request).await?;
    let mut line = String::new();
    if stream.read_line(&mut line).await? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| bad(format!("not an HTTP status line: {line:?}")))?;
    let (mut length, mut keep_alive) = (None, true);
    loop {
        line.clear();
        if stream.read_line(&mut line).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
                keep_alive = false;
            }
        }
    }
    let length = length.ok_or_else(|| bad("a response without Content-Length".into()))?;
    body.resize(length, 0);
    stream.read_exact(body).await?;
    Ok((status, keep_alive))
}
