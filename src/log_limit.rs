//! Logging a recurring problem without flooding the log: the first occurrence is
//! logged, the ones after it within an interval only counted, and the count goes with
//! the next line that is logged.

use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct LogLimiter {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    pub(crate) const fn new(interval: Duration) -> Self {
        LogLimiter {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(occurrences held back since the last log)` when this one is to be logged.
    pub(crate) fn admit(&mut self) -> Option<u64> {
        if self.last.is_some_and(|at| at.elapsed() < self.interval) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_then_counts_until_the_interval_passed() {
        let mut limiter = LogLimiter::new(Duration::from_secs(3600));
        assert_eq!(limiter.admit(), Some(0));
        assert_eq!(limiter.admit(), None);
        assert_eq!(limiter.admit(), None);
        limiter.last = Some(Instant::now() - Duration::from_secs(3601));
        assert_eq!(limiter.admit(), Some(2));
    }
}
