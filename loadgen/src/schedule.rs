//! The open-loop send schedule: intended send times at a fixed rate, or
//! with exponential (Poisson-process) gaps. Latency is measured from these
//! intended times, so a stalled server cannot hide its stall by slowing the
//! sender down (wrk2's fix for coordinated omission).

/// Produces intended send times, in nanoseconds from the start.
pub(crate) struct Schedule {
    gap_nanos: f64,
    poisson: bool,
    next: f64,
    rng: u64,
}

impl Schedule {
    /// `rate` sends per second; `poisson` draws exponential gaps with that
    /// mean instead of fixed ones. `seed` makes Poisson runs repeatable.
    pub(crate) fn new(rate: f64, poisson: bool, seed: u64, offset_nanos: f64) -> Schedule {
        assert!(rate > 0.0);
        Schedule { gap_nanos: 1e9 / rate, poisson, next: offset_nanos, rng: seed | 1 }
    }

    /// The intended time of the next send (without consuming it).
    pub(crate) fn peek(&self) -> u64 {
        self.next as u64
    }

    /// Consumes and returns the next intended send time.
    pub(crate) fn take(&mut self) -> u64 {
        let at = self.next;
        let gap = if self.poisson {
            // Inverse-CDF sampling of an exponential with mean gap_nanos.
            let u = (self.random() >> 11) as f64 / (1u64 << 53) as f64;
            -(1.0 - u).ln() * self.gap_nanos
        } else {
            self.gap_nanos
        };
        self.next += gap;
        at as u64
    }

    fn random(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_rate_is_evenly_spaced() {
        let mut s = Schedule::new(1000.0, false, 1, 0.0);
        let times: Vec<u64> = (0..5).map(|_| s.take()).collect();
        assert_eq!(times, vec![0, 1_000_000, 2_000_000, 3_000_000, 4_000_000]);
        assert_eq!(s.peek(), 5_000_000);
    }

    #[test]
    fn offsets_interleave_threads() {
        let mut s = Schedule::new(1000.0, false, 1, 500_000.0);
        assert_eq!(s.take(), 500_000);
        assert_eq!(s.take(), 1_500_000);
    }

    #[test]
    fn poisson_gaps_have_the_right_mean_and_vary() {
        let mut s = Schedule::new(10_000.0, true, 42, 0.0);
        let n = 200_000;
        let mut last = s.take();
        let mut gaps = Vec::with_capacity(n);
        for _ in 0..n {
            let t = s.take();
            gaps.push((t - last) as f64);
            last = t;
        }
        let mean = gaps.iter().sum::<f64>() / n as f64;
        assert!((mean - 100_000.0).abs() < 2_000.0, "mean gap {mean} ns, want 100000");
        // For an exponential, the standard deviation equals the mean.
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n as f64;
        let sd = var.sqrt();
        assert!((sd / mean - 1.0).abs() < 0.05, "sd/mean {}", sd / mean);
    }
}
