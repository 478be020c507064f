//! A token bucket for a tenant's host-call sends.
//!
//! A flooding guest gets `unavailable("rate limited")` immediately rather
//! than being slowed down: waiting would hold its instance (and the
//! tenant's permits) longer, and the guest is better placed to decide
//! whether to give up or retry later.

use std::sync::Mutex;
use std::time::Instant;

use super::config::Rate;

/// Tokens refill continuously at `per_second`, up to `burst`.
pub(crate) struct RateLimiter {
    rate: Rate,
    state: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl RateLimiter {
    pub(crate) fn new(rate: Rate) -> Self {
        RateLimiter { rate, state: Mutex::new(Bucket { tokens: f64::from(rate.burst), refilled: Instant::now() }) }
    }

    /// Takes one token if there is one.
    pub(crate) fn try_take(&self) -> bool {
        self.try_take_at(Instant::now())
    }

    fn try_take_at(&self, now: Instant) -> bool {
        // The lock is held for a few arithmetic operations only, and nothing
        // inside can panic, so poisoning is not a concern.
        let mut b = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let elapsed = now.saturating_duration_since(b.refilled).as_secs_f64();
        b.tokens = (b.tokens + elapsed * f64::from(self.rate.per_second)).min(f64::from(self.rate.burst));
        b.refilled = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_is_allowed_then_the_rate_holds() {
        let limiter = RateLimiter::new(Rate { per_second: 10, burst: 3 });
        let t0 = Instant::now();
        assert!((0..3).all(|_| limiter.try_take_at(t0)));
        assert!(!limiter.try_take_at(t0));
        // 100 ms at 10/s is one more token, and only one.
        let t1 = t0 + Duration::from_millis(100);
        assert!(limiter.try_take_at(t1));
        assert!(!limiter.try_take_at(t1));
        // A long quiet spell refills only up to the burst.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| limiter.try_take_at(t2)).count(), 3);
    }
}
