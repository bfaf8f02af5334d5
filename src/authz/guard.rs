//! Brute-force guard: too many invalid keys from one client address within a window
//! and that address gets 429 instead of 401 until the window ends. Valid keys from the
//! same address are never affected. Off unless `[check.invalid_key_limit]` is set.
//!
//! Only the invalid-key path touches it; a Check with a valid key never takes its locks.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::InvalidKeyLimit;

/// Independent locks, so concurrent invalid attempts from different clients rarely
/// contend.
const SHARDS: usize = 16;

#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    attempts: u32,
}

pub struct InvalidKeyGuard {
    max_attempts: u32,
    window: Duration,
    per_shard: usize,
    shards: Vec<Mutex<HashMap<IpAddr, Window>>>,
}

impl InvalidKeyGuard {
    pub fn new(limit: &InvalidKeyLimit) -> InvalidKeyGuard {
        InvalidKeyGuard {
            max_attempts: limit.max_attempts,
            window: Duration::from_secs(limit.window_secs),
            per_shard: (limit.max_clients / SHARDS).max(1),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, client: &IpAddr) -> &Mutex<HashMap<IpAddr, Window>> {
        let h = match client {
            IpAddr::V4(a) => u32::from(*a) as usize,
            IpAddr::V6(a) => (u128::from(*a) % (usize::MAX as u128)) as usize,
        };
        &self.shards[h.wrapping_mul(0x9E37_79B9) % SHARDS]
    }

    /// Records an invalid key from `client`. Returns how long it must wait when it is
    /// over the limit (this attempt included), `None` while it is within it.
    pub fn on_invalid(&self, client: IpAddr, now: Instant) -> Option<Duration> {
        let mut map = self
            .shard(&client)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if map.len() >= self.per_shard && !map.contains_key(&client) {
            // Bound memory: forget finished windows first; if every tracked client is
            // still inside its window, this one is not tracked (fail open, not OOM).
            let window = self.window;
            map.retain(|_, w| now.duration_since(w.start) < window);
            if map.len() >= self.per_shard {
                return None;
            }
        }
        let w = map.entry(client).or_insert(Window {
            start: now,
            attempts: 0,
        });
        if now.duration_since(w.start) >= self.window {
            *w = Window {
                start: now,
                attempts: 0,
            };
        }
        w.attempts = w.attempts.saturating_add(1);
        (w.attempts > self.max_attempts).then(|| self.window - now.duration_since(w.start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(max_attempts: u32, max_clients: usize) -> InvalidKeyGuard {
        InvalidKeyGuard::new(&InvalidKeyLimit {
            max_attempts,
            window_secs: 60,
            max_clients,
            ..Default::default()
        })
    }

    #[test]
    fn limits_per_address_within_a_window() {
        let g = guard(3, 1000);
        let t0 = Instant::now();
        let a: IpAddr = "203.0.113.7".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(g.on_invalid(a, t0), None);
        }
        let wait = g.on_invalid(a, t0 + Duration::from_secs(10)).unwrap();
        assert_eq!(wait, Duration::from_secs(50));
        assert_eq!(g.on_invalid(b, t0), None, "other addresses are independent");
        // A new window starts after the old one ends.
        assert_eq!(g.on_invalid(a, t0 + Duration::from_secs(60)), None);
    }

    #[test]
    fn memory_is_bounded() {
        let g = guard(1, SHARDS * 2);
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            let ip = IpAddr::from(i.to_be_bytes());
            g.on_invalid(ip, t0);
        }
        let tracked: usize = g.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(tracked <= SHARDS * 2, "{tracked}");
        // Finished windows make room again.
        let later = t0 + Duration::from_secs(61);
        let fresh: IpAddr = "198.51.100.1".parse().unwrap();
        g.on_invalid(fresh, later);
        assert!(g.on_invalid(fresh, later).is_some());
    }
}
