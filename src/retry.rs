//! Capped exponential backoff with jitter.
//!
//! Transient failures (5xx, network, 429) are retried after `base · 2^(n-1)`, capped at
//! `max_delay`, with "equal jitter": half the delay is fixed and half is random, so retries spread
//! out without ever collapsing to zero. The random number is an argument, keeping this pure.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::fields::{self, FieldError};

/// How a job retries a step that failed transiently: a source's `retry` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub struct RetryPolicy {
    /// Retries allowed for one step before the job fails (0 = fail on the first error).
    #[serde(deserialize_with = "fields::count::<_, 0, 100>")]
    pub max_attempts: u32,
    /// Delay before the first retry (before jitter).
    #[serde(
        rename = "base_ms",
        serialize_with = "fields::ser_millis",
        deserialize_with = "fields::millis::<_, 1, 3_600_000>"
    )]
    pub base: Duration,
    /// Upper bound on any computed delay.
    #[serde(
        rename = "max_delay_ms",
        serialize_with = "fields::ser_millis",
        deserialize_with = "fields::millis::<_, 1, 86_400_000>"
    )]
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_attempts: 6, base: Duration::from_secs(1), max_delay: Duration::from_secs(60) }
    }
}

/// The longest a `Retry-After` is honoured for; beyond it the job would rather fail visibly.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);

impl RetryPolicy {
    /// What serde cannot check: the cap is not below the first delay.
    pub fn check(&self) -> Result<(), FieldError> {
        if self.max_delay < self.base {
            return Err(FieldError::new("max_delay_ms", "must not be smaller than retry.base_ms"));
        }
        Ok(())
    }

    /// Delay before retry number `retry` (1-based), given `jitter` in `[0, 1)`.
    pub fn delay(&self, retry: u32, jitter: f64) -> Duration {
        let exp = retry.saturating_sub(1).min(30);
        let full = self.base.saturating_mul(1u32 << exp).min(self.max_delay);
        let jitter = if jitter.is_finite() { jitter.clamp(0.0, 1.0) } else { 0.0 };
        let half = full / 2;
        half + half.mul_f64(jitter)
    }

    /// Delay before retry `retry`, honouring a server's `Retry-After` when it gave one.
    pub fn delay_with_hint(&self, retry: u32, jitter: f64, retry_after: Option<Duration>) -> Duration {
        match retry_after {
            Some(hint) => hint.min(MAX_RETRY_AFTER),
            None => self.delay(retry, jitter),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_exponentially_within_jitter_bounds() {
        let p = RetryPolicy { max_attempts: 10, base: Duration::from_secs(1), max_delay: Duration::from_secs(60) };
        for retry in 1..=10u32 {
            let full = Duration::from_secs(1 << (retry - 1)).min(Duration::from_secs(60));
            let lo = p.delay(retry, 0.0);
            let hi = p.delay(retry, 0.999_999);
            assert_eq!(lo, full / 2, "retry {retry}");
            assert!(hi <= full && hi >= full / 2, "retry {retry}: {hi:?}");
        }
    }

    #[test]
    fn delay_never_exceeds_the_cap_even_for_huge_retry_counts() {
        let p = RetryPolicy::default();
        for r in [7, 31, 32, 1000, u32::MAX] {
            assert!(p.delay(r, 1.0) <= p.max_delay, "{r}");
        }
    }

    #[test]
    fn jitter_out_of_range_is_clamped() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay(1, -3.0), Duration::from_millis(500));
        assert_eq!(p.delay(1, f64::NAN), Duration::from_millis(500));
        assert_eq!(p.delay(1, 7.0), Duration::from_secs(1));
    }

    #[test]
    fn retry_after_wins_but_is_bounded() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay_with_hint(1, 0.5, Some(Duration::from_secs(7))), Duration::from_secs(7));
        assert_eq!(p.delay_with_hint(1, 0.5, Some(Duration::from_secs(86_400))), MAX_RETRY_AFTER);
        assert_eq!(p.delay_with_hint(2, 0.0, None), Duration::from_secs(1));
    }
}
