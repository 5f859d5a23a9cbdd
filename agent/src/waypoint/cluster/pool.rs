//! `connectionPool` admission of one cluster: Envoy's circuit breakers `max_requests`,
//! `max_connections` and `max_pending_requests`, as Istio programs them.
//!
//! Owns the counters and the pending queue. Each admitted request is counted as holding one
//! upstream connection while it runs (HTTP/1.1 pooling, which is what Istio's circuit-breaking
//! examples exercise); requests beyond `maxConnections` wait for a slot in a queue bounded by
//! `http1MaxPendingRequests`, and anything beyond that overflows. Does not own the connections
//! themselves (`upstream`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::policy::PoolLimits;

/// A request the connection pool refused: the handler answers 503 with response flag `UO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Overflow {
    #[error(
        "upstream overflow: {0} concurrent requests (connectionPool.http.http2MaxRequests); raise the limit or add endpoints"
    )]
    MaxRequests(u32),
    #[error(
        "upstream overflow: {0} requests already wait for a connection (connectionPool.http.http1MaxPendingRequests); raise the limit or connectionPool.tcp.maxConnections"
    )]
    MaxPending(u32),
}

#[derive(Debug)]
pub(super) struct Pool {
    limits: PoolLimits,
    active: Arc<AtomicU32>,
    pending: Arc<AtomicU32>,
    /// `None` when connections are unlimited: no semaphore on the hot path.
    connections: Option<Arc<Semaphore>>,
}

/// An admitted request; dropping it frees its request and connection slots.
#[derive(Debug)]
pub struct Admission {
    _request: CountGuard,
    _connection: Option<OwnedSemaphorePermit>,
}

#[derive(Debug)]
struct CountGuard(Arc<AtomicU32>);

impl Drop for CountGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Takes one unit of `counter` unless it is already at `limit`.
fn take(counter: &Arc<AtomicU32>, limit: u32) -> Option<CountGuard> {
    counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1)).ok()?;
    Some(CountGuard(counter.clone()))
}

impl Pool {
    pub(super) fn new(limits: PoolLimits) -> Self {
        let connections = (limits.max_connections != u32::MAX)
            .then(|| Arc::new(Semaphore::new((limits.max_connections as usize).min(Semaphore::MAX_PERMITS))));
        Pool { limits, active: Arc::default(), pending: Arc::default(), connections }
    }

    /// Cancel-safe: a caller that stops waiting (route timeout) leaves the pending queue.
    /// `multiplexed`: the request goes over HTTP/2, where Envoy's pool runs many streams on one
    /// connection, so only the request limit applies.
    pub(super) async fn admit(&self, multiplexed: bool) -> Result<Admission, Overflow> {
        let request =
            take(&self.active, self.limits.max_requests).ok_or(Overflow::MaxRequests(self.limits.max_requests))?;
        let Some(connections) = self.connections.as_ref().filter(|_| !multiplexed) else {
            return Ok(Admission { _request: request, _connection: None });
        };
        if let Ok(permit) = connections.clone().try_acquire_owned() {
            return Ok(Admission { _request: request, _connection: Some(permit) });
        }
        let waiting =
            take(&self.pending, self.limits.max_pending).ok_or(Overflow::MaxPending(self.limits.max_pending))?;
        // The semaphore is never closed, so acquiring only ends with a permit.
        let permit = connections.clone().acquire_owned().await.ok();
        drop(waiting);
        Ok(Admission { _request: request, _connection: permit })
    }

    pub(super) fn active(&self) -> u32 {
        self.active.load(Ordering::Acquire)
    }

    pub(super) fn pending(&self) -> u32 {
        self.pending.load(Ordering::Acquire)
    }
}

/// Envoy's `max_retries` circuit breaker: retries outstanding to the cluster at once.
#[derive(Debug)]
pub(super) struct Retries {
    limit: Option<u32>,
    active: Arc<AtomicU32>,
}

/// One retry in flight; dropping it frees the slot.
#[derive(Debug)]
pub struct RetryPermit {
    _slot: Option<CountGuard>,
}

impl Retries {
    pub(super) fn new(limit: Option<u32>) -> Self {
        Retries { limit, active: Arc::default() }
    }

    pub(super) fn take(&self) -> Option<RetryPermit> {
        match self.limit {
            None => Some(RetryPermit { _slot: None }),
            Some(limit) => take(&self.active, limit).map(|g| RetryPermit { _slot: Some(g) }),
        }
    }
}
