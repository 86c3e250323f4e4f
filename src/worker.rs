//! The pinned per-core data-plane loop: receive a batch, decide each
//! datagram, fill replies straight from the worker's [`Handle`], send the
//! batch. No allocation, locking or logging per datagram; counters are
//! per-worker, cache-padded, and written only by their owner.

use std::io;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::utils::CachePadded;

use crate::alloc::{GenError, Handle};
use crate::id::ID_LEN;
use crate::net::{self, RecvBatch, SendBatch, Wait};
use crate::policy::{self, RateLimiter, SourcePolicy};
use crate::protocol::{self, Decision, DropReason, ErrorCode};

/// Upper bounds of the request-size histogram buckets (IDs asked for).
pub const BATCH_BUCKETS: [u16; 7] = [1, 2, 4, 16, 64, 175, u16::MAX];

/// One worker's counters. Only the worker writes them (plain load + store,
/// no read-modify-write), and the admin plane sums them at scrape time.
#[derive(Debug, Default)]
pub struct Counters {
    /// Datagrams received.
    pub datagrams: AtomicU64,
    /// Requests answered with at least one ID.
    pub requests: AtomicU64,
    /// IDs sent.
    pub ids: AtomicU64,
    /// Replies cut short by the anti-amplification rule.
    pub amplification_limited: AtomicU64,
    /// Error replies, indexed by [`ErrorCode::index`].
    pub errors: [AtomicU64; ErrorCode::ALL.len()],
    /// Dropped datagrams, indexed by [`DropReason::index`].
    pub drops: [AtomicU64; DropReason::ALL.len()],
    /// Replies the kernel refused.
    pub send_failures: AtomicU64,
    /// Receive calls that failed (non-fatally).
    pub recv_failures: AtomicU64,
    /// Requests by IDs asked for, bucketed by [`BATCH_BUCKETS`].
    pub batch_sizes: [AtomicU64; BATCH_BUCKETS.len()],
    /// Advances every loop iteration (at least every read timeout).
    pub heartbeat: AtomicU64,
}

#[inline]
fn bump(counter: &AtomicU64, by: u64) {
    // Single writer: a plain load and store is enough and avoids a locked
    // instruction per datagram.
    counter.store(counter.load(Ordering::Relaxed).wrapping_add(by), Ordering::Relaxed);
}

/// Everything a worker needs besides its socket and handle.
pub struct WorkerContext {
    /// The worker's number, for logs.
    pub index: usize,
    /// The CPU to pin to, if any.
    pub cpu: Option<usize>,
    /// This worker's counters.
    pub counters: Arc<CachePadded<Counters>>,
    /// Set by the control plane to stop.
    pub stop: Arc<AtomicBool>,
    /// Largest batch a request may ask for.
    pub max_batch: u16,
    /// Allowlist and trusted networks.
    pub policy: Arc<SourcePolicy>,
    /// Per-prefix limiter, if `--rate-limit` is set.
    pub rate_limiter: Option<RateLimiter>,
    /// Test hook: while set, the worker is wedged: it sleeps instead of
    /// serving and ignores `stop`, so its heartbeat stops (used to prove the
    /// watchdog and the second signal notice).
    pub stall: Arc<AtomicBool>,
}

/// How long draining at shutdown may take at most.
const DRAIN_LIMIT: Duration = Duration::from_millis(250);

/// Runs the worker until `stop` is set, then answers what is already queued
/// and returns. Returns an error only for a fatal socket error.
pub fn run(socket: UdpSocket, mut handle: Handle, mut ctx: WorkerContext) -> io::Result<()> {
    if let Some(cpu) = ctx.cpu {
        if !net::pin_current_thread(cpu) {
            tracing::warn!(worker = ctx.index, cpu, "could not pin worker to its CPU; running unpinned");
        }
    }
    let mut rx = RecvBatch::new();
    let mut tx = SendBatch::new(usize::from(ctx.max_batch).max(1) * ID_LEN);
    loop {
        if ctx.stall.load(Ordering::Relaxed) {
            // Test hook: a stuck worker. Its heartbeat does not advance and
            // it does not even notice `stop`, like a thread wedged in a
            // syscall.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        if ctx.stop.load(Ordering::Acquire) {
            break;
        }
        bump(&ctx.counters.heartbeat, 1);
        serve_batch(&mut ctx, &mut handle, &socket, &mut rx, &mut tx, Wait::ForOne)?;
    }
    // Shutdown: answer what the kernel already queued for us, briefly.
    let deadline = Instant::now() + DRAIN_LIMIT;
    while Instant::now() < deadline && serve_batch(&mut ctx, &mut handle, &socket, &mut rx, &mut tx, Wait::No)? > 0 {}
    Ok(())
}

/// One receive → answer → send round; returns how many datagrams came in.
/// Non-fatal receive errors are counted and reported as 0 datagrams.
fn serve_batch(
    ctx: &mut WorkerContext,
    handle: &mut Handle,
    socket: &UdpSocket,
    rx: &mut RecvBatch,
    tx: &mut SendBatch,
    wait: Wait,
) -> io::Result<usize> {
    let n = match rx.recv(socket, wait) {
        Ok(n) => n,
        Err(e) if net::is_fatal(&e) => return Err(e),
        Err(_) => {
            bump(&ctx.counters.recv_failures, 1);
            return Ok(0);
        }
    };
    if n > 0 {
        answer(ctx, handle, rx, tx, n);
        send(ctx, socket, rx, tx)?;
    }
    Ok(n)
}

fn send(ctx: &WorkerContext, socket: &UdpSocket, rx: &RecvBatch, tx: &mut SendBatch) -> io::Result<()> {
    let outcome = tx.send(socket, rx)?;
    if outcome.failed > 0 {
        bump(&ctx.counters.send_failures, outcome.failed as u64);
    }
    Ok(())
}

/// Decides every received datagram and queues the replies.
#[inline]
fn answer(ctx: &mut WorkerContext, handle: &mut Handle, rx: &RecvBatch, tx: &mut SendBatch, n: usize) {
    let counters = &ctx.counters;
    bump(&counters.datagrams, n as u64);
    for i in 0..n {
        let Some(src) = rx.source(i).filter(|s| policy::valid_source(*s)) else {
            bump(&counters.drops[DropReason::BadSource.index()], 1);
            continue;
        };
        let ip = src.ip();
        if !ctx.policy.allowed(ip) {
            bump(&counters.drops[DropReason::NotAllowed.index()], 1);
            continue;
        }
        if let Some(limiter) = ctx.rate_limiter.as_mut() {
            if !limiter.allow(ip) {
                bump(&counters.drops[DropReason::RateLimited.index()], 1);
                continue;
            }
        }
        let count = match protocol::decode(rx.payload(i), ctx.max_batch) {
            Decision::Next { count } => count,
            Decision::Error(code) => {
                reply_error(counters, tx, code, i);
                continue;
            }
            Decision::Drop(reason) => {
                bump(&counters.drops[reason.index()], 1);
                continue;
            }
        };
        // The last bucket is u16::MAX, so a bucket is always found.
        let bucket = BATCH_BUCKETS.iter().position(|&b| count <= b).unwrap_or(BATCH_BUCKETS.len() - 1);
        bump(&counters.batch_sizes[bucket], 1);
        let mut allowed = usize::from(count);
        if !ctx.policy.trusted(ip) {
            let limit = protocol::amplification_limit(rx.wire_len(i));
            if limit < allowed {
                allowed = limit;
                bump(&counters.amplification_limited, 1);
            }
        }
        let buf = tx.next_buffer();
        match handle.try_fill(&mut buf[..allowed * ID_LEN]) {
            Ok(filled) => {
                tx.queue(filled * ID_LEN, i);
                bump(&counters.requests, 1);
                bump(&counters.ids, filled as u64);
            }
            Err(GenError::Exhausted) => reply_error(counters, tx, ErrorCode::Exhausted, i),
            Err(GenError::Unavailable | GenError::Closed) => reply_error(counters, tx, ErrorCode::Unavailable, i),
            Err(GenError::Storage(e)) => {
                // The reserver aborts on storage errors before this can be
                // seen; if it ever is, no ID of the failed block exists.
                tracing::error!("{e}; aborting");
                std::process::abort();
            }
        }
    }
}

fn reply_error(counters: &Counters, tx: &mut SendBatch, code: ErrorCode, source: usize) {
    tx.next_buffer()[..protocol::ERROR_LEN].copy_from_slice(&code.reply());
    tx.queue(protocol::ERROR_LEN, source);
    bump(&counters.errors[code.index()], 1);
}
