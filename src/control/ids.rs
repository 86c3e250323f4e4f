//! IDs for the protocols served off the data plane (HTTP, gRPC), without
//! ever blocking the control plane's runtime.
//!
//! Each protocol draws from its own generator handle, created on first use
//! (so an unused listener wastes no IDs on restart). Creating a handle
//! waits for its first block's flush, so it runs on tokio's blocking pool;
//! drawing from a handle never waits (`try_fill`), and a missing block is
//! waited for with an async sleep. A stuck disk therefore stalls these
//! requests, never signals, the watchdog or `/metrics`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;
use tradeid::id::ID_LEN;
use tradeid::{GenError, Generator, Handle};

/// One protocol's source of IDs.
pub(crate) struct OffPlaneIds {
    generator: Arc<Generator>,
    handle: OnceCell<Mutex<Handle>>,
}

impl OffPlaneIds {
    pub(crate) fn new(generator: Arc<Generator>) -> OffPlaneIds {
        OffPlaneIds { generator, handle: OnceCell::new() }
    }

    /// Fills `out` (a multiple of 7 bytes) with IDs, waiting up to `patience`
    /// for blocks. Returns how many were written: all of them, or fewer if
    /// blocks ran out (an error only if none could be written at all).
    pub(crate) async fn fill(&self, out: &mut [u8], patience: Duration) -> Result<usize, GenError> {
        let handle = self
            .handle
            .get_or_try_init(|| async {
                let generator = Arc::clone(&self.generator);
                match tokio::task::spawn_blocking(move || generator.handle()).await {
                    Ok(Ok(handle)) => Ok(Mutex::new(handle)),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(GenError::Closed),
                }
            })
            .await?;
        let want = out.len() / ID_LEN;
        let deadline = Instant::now() + patience;
        let mut filled = 0;
        loop {
            // try_fill never waits, so the lock is held for microseconds per
            // chunk; chunks keep one huge request from holding it long.
            let asked = (want - filled).min(CHUNK);
            let chunk = &mut out[filled * ID_LEN..(filled + asked) * ID_LEN];
            let result = handle.lock().unwrap_or_else(|p| p.into_inner()).try_fill(chunk);
            match result {
                Ok(n) => {
                    filled += n;
                    if filled == want {
                        return Ok(filled);
                    }
                    if n < asked {
                        // The block ran out mid-chunk: give the reserver a moment.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    } else {
                        tokio::task::yield_now().await;
                    }
                }
                Err(GenError::Unavailable) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(e) if filled > 0 && !matches!(e, GenError::Storage(_)) => return Ok(filled),
                Err(e) => return Err(e),
            }
            if Instant::now() >= deadline && filled > 0 {
                return Ok(filled);
            }
        }
    }
}

/// IDs drawn per lock.
const CHUNK: usize = 4096;
