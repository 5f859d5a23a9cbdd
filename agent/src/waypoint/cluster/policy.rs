//! The effective DestinationRule traffic policy of one cluster, in the form the runtime uses: every
//! default filled in, every duration parsed. Also the Istio merge of a subset's policy and a port's
//! `portLevelSettings` over the top-level policy.
//!
//! Owns the policy values and their defaults (Istio's, as Istio programs Envoy). Does not own the
//! CRD shape (`crate::crd::networking`) or the runtime state that acts on it (`balance`, `outlier`,
//! `pool`).

use std::time::Duration;

/// Istio's connect timeout when neither the DestinationRule nor the mesh config sets one.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Envoy's upstream idle timeout when `idleTimeout` is unset.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Istio's ring size for `consistentHash` without `ringHash.minimumRingSize`.
pub const DEFAULT_RING_SIZE: usize = 1024;
/// Envoy's Maglev table size (a prime) when `maglev.tableSize` is unset.
pub const DEFAULT_MAGLEV_TABLE_SIZE: usize = 65537;

/// `trafficPolicy` of one cluster after merging: what `Cluster` runs with.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Policy {
    pub lb: LbPolicy,
    pub pool: PoolLimits,
    /// `None` = no `outlierDetection` block: nothing is ever ejected.
    pub outlier: Option<OutlierPolicy>,
    pub upstream: UpstreamSettings,
}

/// `loadBalancer`.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum LbPolicy {
    RoundRobin,
    /// Istio's default for an unset (or `UNSPECIFIED`) policy since Istio 1.14 (release note
    /// "Updated Istio's default load balancing algorithm from ROUND_ROBIN to LEAST_REQUEST"):
    /// power of two choices over active requests, as Envoy does with equal weights.
    #[default]
    LeastRequest,
    Random,
    ConsistentHash {
        source: HashSource,
        table: HashTable,
    },
}

/// Which ring a consistent hash uses (`ringHash` is Istio's default, `maglev` on request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashTable {
    Ring { minimum_size: usize },
    Maglev { table_size: usize },
}

/// What a consistent hash hashes (`consistentHash.*`).
#[derive(Debug, Clone, PartialEq)]
pub enum HashSource {
    Header(http::HeaderName),
    /// `httpCookie`: when the request has no such cookie and `ttl` is set, Envoy generates one and
    /// sets it on the response (`ttl` zero = session cookie); without `ttl` there is no hash.
    Cookie {
        name: String,
        path: Option<String>,
        ttl: Option<Duration>,
    },
    SourceIp,
    QueryParameter(String),
}

/// `connectionPool` limits enforced by `Cluster::admit`. Istio turns an unset or zero limit into
/// "unlimited" (2^32-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLimits {
    /// `http.http2MaxRequests`: concurrent requests.
    pub max_requests: u32,
    /// `tcp.maxConnections`: requests holding an upstream connection at once.
    pub max_connections: u32,
    /// `http.http1MaxPendingRequests`: requests waiting for a connection slot.
    pub max_pending: u32,
}

impl Default for PoolLimits {
    fn default() -> Self {
        PoolLimits { max_requests: u32::MAX, max_connections: u32::MAX, max_pending: u32::MAX }
    }
}

/// `outlierDetection`, with Istio's defaults for a present block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierPolicy {
    /// `consecutive5xxErrors` (default 5; 0 disables). Connect failures, resets and timeouts count
    /// as 5xx (Envoy maps local-origin errors to 5xx unless they are split, and Istio does not split).
    pub consecutive_5xx: u32,
    /// `consecutiveGatewayErrors` (502/503/504 and local-origin errors; default off = 0).
    pub consecutive_gateway: u32,
    /// `interval`: ejected hosts come back at the first sweep after their ejection time (default 10s).
    pub interval: Duration,
    /// `baseEjectionTime` (default 30s); an ejection lasts base × times ejected, capped at
    /// max(300s, base) as Envoy's `max_ejection_time` default does.
    pub base_ejection_time: Duration,
    /// `maxEjectionPercent` (default 10).
    pub max_ejection_percent: u32,
    /// `minHealthPercent` (Envoy's panic threshold, default 0 = never panic): below it, all hosts
    /// are used, ejected or not.
    pub min_health_percent: u32,
}

impl Default for OutlierPolicy {
    fn default() -> Self {
        OutlierPolicy {
            consecutive_5xx: 5,
            consecutive_gateway: 0,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
            min_health_percent: 0,
        }
    }
}

/// Connection settings the upstream code applies to connections of this cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamSettings {
    /// `tcp.connectTimeout`.
    pub connect_timeout: Duration,
    /// `http.maxRequestsPerConnection`; `None` = unlimited.
    pub max_requests_per_connection: Option<u32>,
    /// `http.idleTimeout`.
    pub idle_timeout: Duration,
    /// `http.h2UpgradePolicy: UPGRADE`: speak HTTP/2 to the endpoint even for HTTP/1.1 requests.
    pub h2_upgrade: bool,
    /// `http.maxRetries`: concurrent retries to the cluster; `None` = unlimited.
    pub max_retries: Option<u32>,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        UpstreamSettings {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_requests_per_connection: None,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            h2_upgrade: false,
            max_retries: None,
        }
    }
}

/// One `trafficPolicy` as written, compiled field group by field group: `None` = the group is not
/// set and the merge falls through to the outer policy.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PolicyParts {
    pub lb: Option<LbPolicy>,
    /// `connectionPool`, limits and upstream settings together: Istio replaces the block as a whole.
    pub pool: Option<(PoolLimits, UpstreamSettings)>,
    pub outlier: Option<OutlierPolicy>,
    /// `portLevelSettings`: port → parts (their own `portLevelSettings` are not allowed).
    pub ports: Vec<(u16, PolicyParts)>,
}

impl PolicyParts {
    /// Istio's `MergeTrafficPolicy`: the top-level policy with its port-level settings for `port`,
    /// then the subset's groups over it, then the subset's port-level settings for `port`. A
    /// port-level entry replaces every group (it does not inherit: unset groups go to defaults).
    pub fn effective(top: Option<&PolicyParts>, subset: Option<&PolicyParts>, port: u16) -> Policy {
        let mut merged = top.map(|t| t.for_port(port)).unwrap_or_default();
        if let Some(s) = subset {
            if s.lb.is_some() {
                merged.lb = s.lb.clone();
            }
            if s.pool.is_some() {
                merged.pool = s.pool;
            }
            if s.outlier.is_some() {
                merged.outlier = s.outlier;
            }
            if let Some((_, p)) = s.ports.iter().find(|(n, _)| *n == port) {
                merged = PolicyParts { ports: Vec::new(), ..p.clone() };
            }
        }
        let (pool, upstream) = merged.pool.unwrap_or_default();
        Policy { lb: merged.lb.unwrap_or_default(), pool, outlier: merged.outlier, upstream }
    }

    fn for_port(&self, port: u16) -> PolicyParts {
        match self.ports.iter().find(|(n, _)| *n == port) {
            Some((_, p)) => PolicyParts { ports: Vec::new(), ..p.clone() },
            None => PolicyParts { ports: Vec::new(), ..self.clone() },
        }
    }
}
