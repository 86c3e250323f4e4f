//! The pinned per-core loop: receive a batch, let the [`Responder`] decide
//! each datagram (writing the reply straight from the worker's [`Handle`]
//! into the send buffer), record the outcome, send the batch. No
//! allocation, lock, syscall or log line per datagram.

use std::io;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use tradeid::respond::Responder;
use tradeid::Handle;
use tradeid_udp::{self as udp, RecvBatch, SendBatch, Wait};

use super::counters::{bump, Counters};

/// One worker: its socket, its generator handle, its responder.
pub(crate) struct Worker {
    /// The worker's number, for logs and the stall test hook.
    pub(crate) index: usize,
    /// The CPU to pin to, if any.
    pub(crate) cpu: Option<usize>,
    pub(crate) socket: UdpSocket,
    pub(crate) handle: Handle,
    pub(crate) responder: Responder,
    pub(crate) counters: Arc<CachePadded<Counters>>,
    /// Set by the control plane to stop.
    pub(crate) stop: Arc<AtomicBool>,
}

/// How long draining at shutdown may take at most.
const DRAIN_LIMIT: Duration = Duration::from_millis(250);

/// Runs the worker until `stop` is set, then answers what is already queued
/// and returns. Returns an error only for a fatal socket error.
pub(crate) fn run(mut w: Worker) -> io::Result<()> {
    if let Some(cpu) = w.cpu {
        if !super::pin_current_thread(cpu) {
            tracing::warn!(worker = w.index, cpu, "could not pin worker to its CPU; running unpinned");
        }
    }
    let mut rx = RecvBatch::new();
    let mut tx = SendBatch::new(w.responder.max_reply_len());
    loop {
        if tradeid::hooks::stalled(w.index) {
            // Test hook: a wedged worker. Its heartbeat stops and it does
            // not even notice `stop`, like a thread stuck in a syscall.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        if w.stop.load(Ordering::Acquire) {
            break;
        }
        bump(&w.counters.heartbeat, 1);
        serve_batch(&mut w, &mut rx, &mut tx, Wait::ForOne)?;
    }
    // Shutdown: answer what the kernel already queued for us, briefly.
    let deadline = Instant::now() + DRAIN_LIMIT;
    while Instant::now() < deadline && serve_batch(&mut w, &mut rx, &mut tx, Wait::No)? > 0 {}
    Ok(())
}

/// One receive → respond → send round; returns how many datagrams came in.
/// Non-fatal receive and send errors are counted, never returned.
fn serve_batch(w: &mut Worker, rx: &mut RecvBatch, tx: &mut SendBatch, wait: Wait) -> io::Result<usize> {
    let n = match rx.recv(&w.socket, wait) {
        Ok(n) => n,
        Err(e) if udp::is_fatal(&e) => return Err(e),
        Err(_) => {
            bump(&w.counters.recv_failures, 1);
            return Ok(0);
        }
    };
    if n == 0 {
        return Ok(0);
    }
    bump(&w.counters.datagrams, n as u64);
    let now = w.responder.now();
    for i in 0..n {
        let outcome =
            w.responder.respond(rx.source(i), rx.payload(i), rx.wire_len(i), now, tx.next_buffer(), &mut w.handle);
        w.counters.record(&outcome);
        let len = outcome.reply_len();
        if len > 0 {
            tx.queue_reply(len, rx, i);
        }
    }
    let sent = tx.send(&w.socket)?;
    if sent.failed > 0 {
        bump(&w.counters.send_failures, sent.failed as u64);
        if let Some(errno) = sent.last_errno {
            w.counters.last_send_errno.store(errno as u64, Ordering::Relaxed);
        }
    }
    Ok(n)
}
