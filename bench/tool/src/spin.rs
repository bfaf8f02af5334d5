//! `bench_tool spin`: started with `chrt --idle 0` on a core, it keeps that core out of
//! the (slow to leave) virtual-CPU idle state while taking only time that nothing else
//! wants (bench/run.sh passes the spinners in `BENCH_SPINNERS`, and `procfs` counts their
//! time as idle).

use std::time::{Duration, Instant};

/// Spins until killed, at most `max`.
pub fn spin(max: Duration) {
    let end = Instant::now() + max;
    while Instant::now() < end {
        for _ in 0..1_000_000 {
            std::hint::spin_loop();
        }
    }
}
