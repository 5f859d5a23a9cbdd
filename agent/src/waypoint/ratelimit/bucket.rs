//! Envoy's local rate limit token bucket: starts full, gains `tokens_per_fill` every
//! `fill_interval` (whole intervals, up to `max_tokens`), one token per request. Filled lazily on
//! use from tokio's clock, so paused-time tests drive it.

use std::sync::Mutex;

use tokio::time::Instant;

use super::config::BucketSpec;

#[derive(Debug)]
pub(super) struct Bucket {
    spec: BucketSpec,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    tokens: u32,
    /// When the last (possibly skipped) fill was due: fills happen at `last_fill + k * interval`.
    last_fill: Instant,
}

/// The outcome of one take, with what `x-ratelimit-*` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Take {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Whole seconds (rounded up) until the next fill.
    pub reset_secs: u64,
}

impl Bucket {
    pub fn new(spec: BucketSpec, now: Instant) -> Self {
        Bucket { spec, state: Mutex::new(State { tokens: spec.max_tokens, last_fill: now }) }
    }

    pub fn take(&self, now: Instant) -> Take {
        // Poisoning only follows a panic inside this short critical section; the counts are
        // still consistent, so keep going.
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let interval = self.spec.fill_interval;
        let elapsed = now.saturating_duration_since(s.last_fill);
        let fills = (elapsed.as_nanos() / interval.as_nanos().max(1)) as u64;
        if fills > 0 {
            let added = fills.saturating_mul(u64::from(self.spec.tokens_per_fill));
            s.tokens = u64::from(s.tokens).saturating_add(added).min(u64::from(self.spec.max_tokens)) as u32;
            s.last_fill += interval * u32::try_from(fills).unwrap_or(u32::MAX);
        }
        let allowed = s.tokens > 0;
        if allowed {
            s.tokens -= 1;
        }
        let next = s.last_fill + interval;
        let until = next.saturating_duration_since(now);
        let reset_secs = until.as_secs() + u64::from(until.subsec_nanos() > 0);
        Take { allowed, limit: self.spec.max_tokens, remaining: s.tokens, reset_secs }
    }
}
