//! Outlier detection state of one endpoint (Envoy's consecutive-5xx and consecutive-gateway-failure
//! detectors, which run inline on every reported outcome) and the ejection clock.
//!
//! Owns the per-host counters and the ejection arithmetic. Does not own the cluster-wide decision
//! whether an ejection is allowed (`maxEjectionPercent`, in `Cluster::report`) or which hosts the
//! balancer may use (`Cluster`'s healthy set).

use std::time::Duration;

use tokio::time::Instant;

use super::policy::OutlierPolicy;
use crate::waypoint::Outcome;

/// Envoy's `max_ejection_time` default; the cap is max(this, base ejection time).
const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

#[derive(Debug, Default)]
pub(super) struct HostOutlier {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    /// Ejections so far, the ejection-time multiplier; it decays while the host stays healthy.
    times_ejected: u32,
    /// Back in service at this instant (the first interval sweep after the ejection time).
    ejected_until: Option<Instant>,
    returned_at: Option<Instant>,
}

impl HostOutlier {
    /// Counts one outcome; true when a detector trips (its counters are then reset, as Envoy does
    /// whether or not the ejection is allowed).
    pub(super) fn record(&mut self, policy: &OutlierPolicy, outcome: &Outcome) -> bool {
        // Local-origin failures are mapped to 503/504 by Envoy (no split_external_local_origin_errors
        // in Istio), so they count for both detectors.
        let (server_error, gateway_error) = match outcome {
            Outcome::Status(s) => (s.is_server_error(), matches!(s.as_u16(), 502..=504)),
            Outcome::ConnectFailure | Outcome::Reset | Outcome::Timeout => (true, true),
        };
        self.consecutive_5xx = if server_error { self.consecutive_5xx.saturating_add(1) } else { 0 };
        self.consecutive_gateway = if gateway_error { self.consecutive_gateway.saturating_add(1) } else { 0 };
        let tripped = (policy.consecutive_5xx > 0 && self.consecutive_5xx >= policy.consecutive_5xx)
            || (policy.consecutive_gateway > 0 && self.consecutive_gateway >= policy.consecutive_gateway);
        if tripped {
            self.consecutive_5xx = 0;
            self.consecutive_gateway = 0;
        }
        tripped
    }

    /// Whether the host is out of service at `now` (an expired ejection counts as returned).
    pub(super) fn is_ejected(&mut self, now: Instant) -> bool {
        match self.ejected_until {
            Some(until) if now >= until => {
                self.ejected_until = None;
                self.returned_at = Some(until);
                false
            }
            Some(_) => true,
            None => false,
        }
    }

    pub(super) fn ejected_until(&self) -> Option<Instant> {
        self.ejected_until
    }

    /// Ejects the host for base × times ejected (capped), rounded up to the next sweep of the
    /// detector's interval timer that started at `sweep_origin`: Envoy only returns hosts on sweeps.
    pub(super) fn eject(&mut self, policy: &OutlierPolicy, now: Instant, sweep_origin: Instant) -> Instant {
        // Envoy lowers the multiplier while a host stays healthy; one step per base ejection time
        // spent in service keeps a host that recovered from being punished as a repeat offender.
        if let Some(back) = self.returned_at {
            let healthy = now.saturating_duration_since(back);
            let steps = healthy.as_nanos() / policy.base_ejection_time.as_nanos().max(1);
            self.times_ejected = self.times_ejected.saturating_sub(steps.min(u32::MAX as u128) as u32);
        }
        self.times_ejected = self.times_ejected.saturating_add(1);
        let cap = MAX_EJECTION_TIME.max(policy.base_ejection_time);
        let length = policy.base_ejection_time.saturating_mul(self.times_ejected).min(cap);
        let due = now + length;
        let interval = policy.interval.max(Duration::from_millis(1));
        let since = due.saturating_duration_since(sweep_origin).as_nanos();
        let sweeps = since.div_ceil(interval.as_nanos());
        let until = sweep_origin + interval.saturating_mul(sweeps.min(u32::MAX as u128) as u32);
        self.ejected_until = Some(until.max(due));
        self.ejected_until.unwrap_or(due)
    }
}
