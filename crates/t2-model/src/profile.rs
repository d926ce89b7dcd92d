//! Where a step's time goes, for `t2 bench`'s split: off unless switched on, and when on each span adds
//! its own wall time, less the time of spans nested in it, to its phase. Counting is per thread (the one
//! that runs the step; the GEMM's worker threads run inside its spans), so concurrent work elsewhere
//! never mixes in.

use std::cell::Cell;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Every projection (dense, packed, merged or factored SVF) and the output head.
    Gemm = 0,
    /// RoPE, the KV write and attention itself.
    Attention = 1,
    /// Turning logits into tokens.
    Sampling = 2,
}

const PHASES: usize = 3;
thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
    static NANOS: Cell<[u64; PHASES]> = const { Cell::new([0; PHASES]) };
}

/// Starts (or stops) counting on this thread; starting clears its counters.
pub fn enable(on: bool) {
    if on {
        NANOS.set([0; PHASES]);
    }
    ON.set(on);
}

/// Time counted per phase on this thread since [`enable`], in [`Phase`] order.
pub fn totals() -> [Duration; PHASES] {
    NANOS.get().map(Duration::from_nanos)
}

fn counted() -> u64 {
    NANOS.get().iter().sum()
}

/// Counts its lifetime to `phase` when dropped (nothing while counting is off).
pub struct Span {
    phase: Phase,
    start: Option<(Instant, u64)>,
}

pub fn span(phase: Phase) -> Span {
    Span {
        phase,
        start: ON.get().then(|| (Instant::now(), counted())),
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some((t0, before)) = self.start {
            let nested = counted() - before;
            let own = (t0.elapsed().as_nanos() as u64).saturating_sub(nested);
            let mut all = NANOS.get();
            all[self.phase as usize] += own;
            NANOS.set(all);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_spans_count_only_their_own_time() {
        enable(true);
        {
            let _outer = span(Phase::Attention);
            std::thread::sleep(Duration::from_millis(20));
            {
                let _inner = span(Phase::Gemm);
                std::thread::sleep(Duration::from_millis(30));
            }
        }
        let [gemm, attn, sampling] = totals();
        enable(false);
        assert!(gemm >= Duration::from_millis(30), "{gemm:?}");
        // Without the nested span's 30 ms taken out it would be at least 50.
        assert!(
            attn >= Duration::from_millis(20) && attn < Duration::from_millis(50),
            "{attn:?}"
        );
        assert_eq!(sampling, Duration::ZERO);
        let _off = span(Phase::Sampling);
    }
}
