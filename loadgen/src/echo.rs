//! The echo baseline: the same SO_REUSEPORT sockets, pinned threads and
//! recvmmsg/sendmmsg batching as the real server, answering every datagram
//! with constant bytes. It measures what the kernel's UDP path allows on
//! this machine, so tradeid can be reported as a ratio against it.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tradeid_udp::{self as udp, RecvBatch, SendBatch, SocketOptions, Wait};

/// `loadgen echo`.
#[derive(Debug, Args)]
pub(crate) struct EchoArgs {
    /// Address to serve on (port 0 picks one; see "listening on").
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Worker threads, one socket each.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Bytes in every reply.
    #[arg(long, default_value_t = 7)]
    reply_len: usize,
    /// CPUs to pin workers to, comma-separated [default: 0, 1, ...].
    #[arg(long, value_delimiter = ',')]
    cpus: Vec<usize>,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 3600)]
    duration: u64,
}

pub(crate) fn run(args: EchoArgs) -> anyhow::Result<()> {
    anyhow::ensure!((1..=65507).contains(&args.reply_len), "--reply-len must be 1..=65507");
    let options =
        SocketOptions { recv_buffer: 4 << 20, send_buffer: 4 << 20, read_timeout: Duration::from_millis(100) };
    let (sockets, local, _) =
        udp::bind_group(args.listen, args.workers, &options).with_context(|| format!("cannot bind {}", args.listen))?;
    println!("listening on {local}");
    let cpus: Vec<usize> = core_affinity::get_core_ids().unwrap_or_default().into_iter().map(|c| c.id).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(args.duration);
    let threads: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, socket)| {
            let cpu = if args.cpus.is_empty() {
                cpus.get(i % cpus.len().max(1)).copied()
            } else {
                Some(args.cpus[i % args.cpus.len()])
            };
            let reply_len = args.reply_len;
            std::thread::spawn(move || -> std::io::Result<()> {
                if let Some(cpu) = cpu {
                    core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
                }
                let mut rx = RecvBatch::new();
                let mut tx = SendBatch::new(reply_len);
                let reply = vec![b'E'; reply_len];
                while std::time::Instant::now() < deadline {
                    let n = rx.recv(&socket, Wait::ForOne)?;
                    for i in 0..n {
                        // The same per-datagram work shape as tradeid: look
                        // at the source, then copy a reply into the slot.
                        if rx.source(i).is_some() {
                            tx.next_buffer()[..reply_len].copy_from_slice(&reply);
                            tx.queue_reply(reply_len, &rx, i);
                        }
                    }
                    tx.send(&socket)?;
                }
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| anyhow::anyhow!("echo worker panicked"))??;
    }
    Ok(())
}
