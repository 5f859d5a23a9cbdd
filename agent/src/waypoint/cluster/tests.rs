//! Cluster behaviour: load-balancer distributions, consistent-hash stickiness and spread,
//! connection-pool admission under concurrency, outlier ejection and return (paused time),
//! maxEjectionPercent, panic threshold, and state kept across updates.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::time::Instant;

use super::policy::{HashSource, HashTable, LbPolicy, OutlierPolicy, Policy, PolicyParts, PoolLimits};
use super::*;
use crate::identity::Identity;
use crate::state::{ServicePort, USE_WAYPOINT_LABEL};

fn workload(name: &str, ips: &[&str], labels: &[(&str, &str)]) -> Arc<Workload> {
    Arc::new(Workload {
        name: name.into(),
        namespace: "demo".into(),
        service_account: "default".into(),
        labels: Arc::new(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
        node: None,
        uid: None,
        netns: None,
        captured: true,
        identity: Identity::new("cluster.local", "demo", "default"),
        workload_name: name.into(),
    })
}

fn hosts(n: usize) -> Vec<Arc<Host>> {
    (0..n)
        .map(|i| {
            let w = workload(&format!("pod-{i}"), &[&format!("10.0.0.{}", i + 1)], &[]);
            Arc::new(Host {
                addr: SocketAddr::new(w.ips[0], 8080),
                workload: w,
                active: AtomicU64::new(0),
                outlier: Mutex::default(),
            })
        })
        .collect()
}

fn cluster(n: usize, policy: Policy) -> Cluster {
    Cluster::new("test".into(), None, policy, hosts(n), Instant::now())
}

fn lb(lb: LbPolicy) -> Policy {
    Policy { lb, ..Policy::default() }
}

fn key(headers: &HeaderMap) -> HashKey<'_> {
    HashKey { headers, source_ip: "10.1.0.1".parse().unwrap(), query: None }
}

/// Picks `n` times, dropping each endpoint at once; counts per endpoint address.
fn counts(c: &Cluster, n: usize) -> HashMap<SocketAddr, usize> {
    let headers = HeaderMap::new();
    let mut out = HashMap::new();
    for _ in 0..n {
        *out.entry(c.pick(&key(&headers)).expect("a healthy endpoint").addr).or_default() += 1;
    }
    out
}

fn addr(i: usize) -> SocketAddr {
    format!("10.0.0.{}:8080", i + 1).parse().unwrap()
}

#[test]
fn round_robin_is_exactly_even() {
    let c = cluster(3, lb(LbPolicy::RoundRobin));
    let got = counts(&c, 3000);
    assert_eq!(got.len(), 3);
    assert!(got.values().all(|&v| v == 1000), "{got:?}");
}

#[test]
fn random_is_uniform_within_two_points() {
    let c = cluster(4, lb(LbPolicy::Random));
    let got = counts(&c, 20_000);
    for i in 0..4 {
        let share = got[&addr(i)] as f64 / 20_000.0;
        assert!((share - 0.25).abs() < 0.02, "host {i}: {share}");
    }
}

#[test]
fn least_request_avoids_busy_hosts_and_spreads_idle_ones() {
    // The default policy (Istio >= 1.14) is LEAST_REQUEST.
    assert_eq!(Policy::default().lb, LbPolicy::LeastRequest);
    let c = cluster(4, Policy::default());
    let got = counts(&c, 8000);
    for i in 0..4 {
        let share = got[&addr(i)] as f64 / 8000.0;
        assert!((share - 0.25).abs() < 0.03, "idle hosts share evenly; host {i}: {share}");
    }
    // A picked endpoint counts as active until its last clone is dropped.
    let e = c.pick(&key(&HeaderMap::new())).unwrap();
    let i = (0..4).find(|&i| addr(i) == e.addr).unwrap();
    assert_eq!(c.hosts[i].active(), 1);
    let clone = e.clone();
    drop(e);
    assert_eq!(c.hosts[i].active(), 1);
    drop(clone);
    assert_eq!(c.hosts[i].active(), 0);
    // With two distinct choices a busy host never wins against idle ones.
    c.hosts[0].active.fetch_add(3, Ordering::AcqRel);
    let got = counts(&c, 3000);
    assert_eq!(got.get(&addr(0)), None, "{got:?}");
}

fn header_hash(table: HashTable) -> Policy {
    lb(LbPolicy::ConsistentHash { source: HashSource::Header("x-user".parse().unwrap()), table })
}

fn pick_with_header(c: &Cluster, value: &str) -> SocketAddr {
    let mut h = HeaderMap::new();
    h.insert("x-user", HeaderValue::from_str(value).unwrap());
    c.pick(&key(&h)).unwrap().addr
}

/// Stickiness, spread over 4 hosts, and churn: removing one of 5 hosts must move only the keys
/// it owned (`max_moved_other`: share of other keys allowed to move).
fn check_consistent_hash(table: HashTable, max_moved_other: f64) {
    let c = cluster(4, header_hash(table));
    for user in ["jason", "alice", "bob"] {
        let first = pick_with_header(&c, user);
        assert!((0..100).all(|_| pick_with_header(&c, user) == first), "{user} sticks");
    }
    let mut spread: HashMap<SocketAddr, usize> = HashMap::new();
    for i in 0..4000 {
        *spread.entry(pick_with_header(&c, &format!("user-{i}"))).or_default() += 1;
    }
    for i in 0..4 {
        let share = spread[&addr(i)] as f64 / 4000.0;
        assert!((0.15..0.35).contains(&share), "host {i} gets {share} of 4000 keys");
    }
    let five = Cluster::new("t".into(), None, header_hash(table), hosts(5), Instant::now());
    let mut four_hosts = hosts(5);
    four_hosts.remove(2);
    let four = Cluster::new("t".into(), None, header_hash(table), four_hosts, Instant::now());
    let (mut others, mut moved) = (0, 0);
    for i in 0..4000 {
        let k = format!("user-{i}");
        let before = pick_with_header(&five, &k);
        if before != addr(2) {
            others += 1;
            if pick_with_header(&four, &k) != before {
                moved += 1;
            }
        }
    }
    let share = moved as f64 / others as f64;
    assert!(share <= max_moved_other, "{moved}/{others} keys moved although their host stayed");
}

#[test]
fn ring_hash_sticks_spreads_and_survives_churn() {
    check_consistent_hash(HashTable::Ring { minimum_size: 1024 }, 0.0);
}

#[test]
fn maglev_sticks_spreads_and_survives_churn() {
    // Maglev tables move a few keys beyond the removed host's own (the paper reports a few %).
    check_consistent_hash(HashTable::Maglev { table_size: 65537 }, 0.1);
}

#[test]
fn ejected_host_only_moves_its_own_keys_on_the_ring() {
    let mut policy = header_hash(HashTable::Ring { minimum_size: 1024 });
    policy.outlier = Some(OutlierPolicy { consecutive_5xx: 1, max_ejection_percent: 100, ..OutlierPolicy::default() });
    let c = cluster(4, policy);
    let keys: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
    let before: Vec<SocketAddr> = keys.iter().map(|k| pick_with_header(&c, k)).collect();
    let victim = c.pick(&key(&HeaderMap::new())).unwrap(); // no header: a random host
    c.report(&victim, &Outcome::Status(StatusCode::BAD_GATEWAY));
    assert_eq!(c.ejected(), vec![victim.addr]);
    for (k, b) in keys.iter().zip(&before) {
        let now = pick_with_header(&c, k);
        if *b == victim.addr {
            assert_ne!(now, victim.addr);
        } else {
            assert_eq!(now, *b, "key {k} moved although its host is healthy");
        }
    }
}

#[test]
fn cookie_hash_generates_a_cookie_that_sticks() {
    let policy = lb(LbPolicy::ConsistentHash {
        source: HashSource::Cookie {
            name: "session".into(),
            path: Some("/".into()),
            ttl: Some(Duration::from_secs(60)),
        },
        table: HashTable::Ring { minimum_size: 1024 },
    });
    let c = cluster(5, policy);
    let first = c.pick(&key(&HeaderMap::new())).unwrap();
    let set = first.set_cookie.clone().expect("a generated cookie");
    let set = set.to_str().unwrap();
    assert!(
        set.starts_with("session=\"")
            && set.contains("; Max-Age=60")
            && set.contains("; Path=/")
            && set.ends_with("HttpOnly"),
        "{set}"
    );
    let value = set.split('"').nth(1).unwrap();
    let mut h = HeaderMap::new();
    h.insert(http::header::COOKIE, HeaderValue::from_str(&format!("other=1; session={value}")).unwrap());
    for _ in 0..50 {
        let e = c.pick(&key(&h)).unwrap();
        assert_eq!(e.addr, first.addr, "the generated cookie leads back to the first pick");
        assert!(e.set_cookie.is_none(), "no new cookie when the request has one");
    }
    // Without a ttl nothing is generated and the pick is random.
    let no_ttl = cluster(
        5,
        lb(LbPolicy::ConsistentHash {
            source: HashSource::Cookie { name: "session".into(), path: None, ttl: None },
            table: HashTable::Ring { minimum_size: 64 },
        }),
    );
    assert!(no_ttl.pick(&key(&HeaderMap::new())).unwrap().set_cookie.is_none());
    assert!(counts(&no_ttl, 500).len() > 1, "no hash: random spread");
}

#[test]
fn source_ip_and_query_parameter_hashes_stick() {
    let by_ip = cluster(
        5,
        lb(LbPolicy::ConsistentHash { source: HashSource::SourceIp, table: HashTable::Ring { minimum_size: 1024 } }),
    );
    let headers = HeaderMap::new();
    let mut seen = std::collections::HashSet::new();
    for i in 0..50u8 {
        let k = HashKey { headers: &headers, source_ip: IpAddr::from([10, 2, 0, i]), query: None };
        let first = by_ip.pick(&k).unwrap().addr;
        assert!((0..20).all(|_| by_ip.pick(&k).unwrap().addr == first));
        seen.insert(first);
    }
    assert!(seen.len() >= 3, "50 clients over 5 hosts use several hosts: {seen:?}");
    let by_query = cluster(
        5,
        lb(LbPolicy::ConsistentHash {
            source: HashSource::QueryParameter("user".into()),
            table: HashTable::Ring { minimum_size: 1024 },
        }),
    );
    let pick = |q: &str| {
        by_query
            .pick(&HashKey { headers: &headers, source_ip: IpAddr::from([10, 2, 0, 1]), query: Some(q) })
            .unwrap()
            .addr
    };
    let first = pick("a=1&user=jason&b=2");
    assert!((0..50).all(|i| pick(&format!("user=jason&i={i}")) == first), "only the named parameter counts");
}

fn pool(max_requests: u32, max_connections: u32, max_pending: u32) -> Cluster {
    cluster(2, Policy { pool: PoolLimits { max_requests, max_connections, max_pending }, ..Policy::default() })
}

#[tokio::test(start_paused = true)]
async fn pending_queue_is_bounded_and_drains() {
    // Istio's circuit-breaking example: maxConnections 1, http1MaxPendingRequests 1.
    let c = Arc::new(pool(u32::MAX, 1, 1));
    let first = c.admit().await.expect("first request runs");
    let waiter = {
        let c = c.clone();
        tokio::spawn(async move { c.admit().await.map(|_| ()) })
    };
    tokio::task::yield_now().await;
    assert_eq!(c.load(), (2, 1), "second request pending");
    assert_eq!(c.admit().await.err(), Some(Overflow::MaxPending(1)), "third overflows (503 UO)");
    drop(first);
    tokio::time::timeout(Duration::from_secs(1), waiter).await.expect("pending request proceeds").unwrap().unwrap();
    assert_eq!(c.load(), (0, 0));
    // A pending request that gives up (route timeout) leaves the queue.
    let held = c.admit().await.unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(50), c.admit()).await.is_err());
    assert_eq!(c.load(), (1, 0));
    drop(held);
}

#[test]
fn max_retries_bounds_outstanding_retries() {
    let mut policy = Policy::default();
    policy.upstream.max_retries = Some(2);
    let c = cluster(2, policy);
    let a = c.retry_permit().expect("first retry");
    let _b = c.retry_permit().expect("second retry");
    assert!(c.retry_permit().is_none(), "third concurrent retry overflows");
    drop(a);
    assert!(c.retry_permit().is_some());
    let unlimited = cluster(2, Policy::default());
    let held: Vec<_> = (0..1000).map(|_| unlimited.retry_permit().expect("no limit")).collect();
    assert_eq!(held.len(), 1000);
}

#[tokio::test(start_paused = true)]
async fn http2_requests_share_connections_and_only_count_as_requests() {
    let c = pool(3, 1, 1);
    let _h1 = c.admit().await.unwrap();
    let _a = c.admit_multiplexed().await.expect("a stream does not need its own connection");
    let _b = c.admit_multiplexed().await.unwrap();
    assert_eq!(c.admit_multiplexed().await.err(), Some(Overflow::MaxRequests(3)));
}

#[tokio::test(start_paused = true)]
async fn max_requests_overflows_immediately() {
    let c = pool(2, u32::MAX, u32::MAX);
    let a = c.admit().await.unwrap();
    let _b = c.admit().await.unwrap();
    assert_eq!(c.admit().await.err(), Some(Overflow::MaxRequests(2)));
    drop(a);
    assert!(c.admit().await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn concurrent_tasks_respect_the_connection_limit() {
    let c = Arc::new(pool(u32::MAX, 5, 100));
    let running = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let tasks: Vec<_> = (0..60)
        .map(|_| {
            let (c, running, peak) = (c.clone(), running.clone(), peak.clone());
            tokio::spawn(async move {
                let Ok(_a) = c.admit().await else { return false };
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                true
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += tokio::time::timeout(Duration::from_secs(5), t).await.unwrap().unwrap() as u32;
    }
    assert_eq!(admitted, 60, "55 waiters fit the pending queue of 100");
    assert_eq!(peak.load(Ordering::SeqCst), 5);
    // With a queue of 10, 60 simultaneous requests: 5 run, 10 wait, 45 overflow.
    let c = Arc::new(pool(u32::MAX, 5, 10));
    let tasks: Vec<_> = (0..60)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move {
                let r = c.admit().await;
                tokio::time::sleep(Duration::from_millis(10)).await;
                r.is_ok()
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        ok += tokio::time::timeout(Duration::from_secs(5), t).await.unwrap().unwrap() as u32;
    }
    assert_eq!(ok, 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_limit_holds_across_threads() {
    let c = Arc::new(pool(10, u32::MAX, u32::MAX));
    let running = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let tasks: Vec<_> = (0..400)
        .map(|_| {
            let (c, running, peak) = (c.clone(), running.clone(), peak.clone());
            tokio::spawn(async move {
                let Ok(_a) = c.admit().await else { return false };
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                true
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        ok += tokio::time::timeout(Duration::from_secs(10), t).await.unwrap().unwrap() as u32;
    }
    assert!(peak.load(Ordering::SeqCst) <= 10, "peak {}", peak.load(Ordering::SeqCst));
    assert!(ok >= 10, "at least the first 10 run: {ok}");
    assert_eq!(c.load(), (0, 0), "every slot released");
}

fn outlier(consecutive_5xx: u32, max_ejection_percent: u32) -> Policy {
    Policy {
        lb: LbPolicy::RoundRobin,
        outlier: Some(OutlierPolicy { consecutive_5xx, max_ejection_percent, ..OutlierPolicy::default() }),
        ..Policy::default()
    }
}

fn endpoint_of(c: &Cluster, a: SocketAddr) -> Endpoint {
    let h = HeaderMap::new();
    (0..100).find_map(|_| c.pick(&key(&h)).filter(|e| e.addr == a)).expect("host is picked")
}

fn fail(c: &Cluster, e: &Endpoint, n: usize, status: u16) {
    for _ in 0..n {
        c.report(e, &Outcome::Status(StatusCode::from_u16(status).unwrap()));
    }
}

#[tokio::test(start_paused = true)]
async fn ejection_after_consecutive_5xx_and_return_after_ejection_time() {
    let c = cluster(3, outlier(3, 100));
    let bad = endpoint_of(&c, addr(1));
    fail(&c, &bad, 2, 500);
    c.report(&bad, &Outcome::Status(StatusCode::OK)); // a success resets the count
    fail(&c, &bad, 2, 503);
    assert!(c.ejected().is_empty(), "only 2 consecutive 5xx so far");
    c.report(&bad, &Outcome::ConnectFailure); // local-origin failures count as 5xx
    assert_eq!(c.ejected(), vec![addr(1)]);
    let got = counts(&c, 300);
    assert_eq!(got.get(&addr(1)), None, "ejected host is skipped: {got:?}");
    assert_eq!((got[&addr(0)], got[&addr(2)]), (150, 150));
    // base 30s × 1, returned on the interval sweep (every 10s): back at 30s.
    tokio::time::advance(Duration::from_secs(29)).await;
    assert_eq!(c.ejected(), vec![addr(1)]);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(c.ejected().is_empty());
    assert_eq!(counts(&c, 300).get(&addr(1)), Some(&100));
    // Ejected again right away: base × 2 = 60s.
    fail(&c, &bad, 3, 502);
    assert_eq!(c.ejected(), vec![addr(1)]);
    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(c.ejected(), vec![addr(1)]);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(c.ejected().is_empty());
}

#[tokio::test(start_paused = true)]
async fn hosts_return_on_interval_sweeps() {
    let mut policy = outlier(1, 100);
    policy.outlier = policy.outlier.map(|o| OutlierPolicy {
        interval: Duration::from_secs(10),
        base_ejection_time: Duration::from_secs(15),
        ..o
    });
    let c = cluster(2, policy);
    tokio::time::advance(Duration::from_secs(3)).await;
    fail(&c, &endpoint_of(&c, addr(0)), 1, 500);
    // Ejected at 3s for 15s: due at 18s, returned by the sweep at 20s.
    tokio::time::advance(Duration::from_secs(16)).await;
    assert_eq!(c.ejected(), vec![addr(0)], "at 19s");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(c.ejected().is_empty(), "at 20s");
}

#[tokio::test(start_paused = true)]
async fn max_ejection_percent_limits_ejections() {
    let c = cluster(4, outlier(1, 50));
    for i in 0..4 {
        fail(&c, &endpoint_of(&c, addr(i)), 1, 500);
    }
    assert_eq!(c.ejected(), vec![addr(0), addr(1)], "50% of 4 hosts");
    // Istio's default 10% of 4 hosts allows none (Envoy ejects one regardless only with
    // always_eject_one_host, which Istio does not set).
    let c = cluster(4, outlier(1, 10));
    fail(&c, &endpoint_of(&c, addr(0)), 3, 500);
    assert!(c.ejected().is_empty());
    let c = cluster(10, outlier(1, 10));
    fail(&c, &endpoint_of(&c, addr(0)), 1, 500);
    fail(&c, &endpoint_of(&c, addr(1)), 1, 500);
    assert_eq!(c.ejected(), vec![addr(0)], "10% of 10 hosts is one");
}

#[tokio::test(start_paused = true)]
async fn gateway_errors_detector_ignores_plain_500s() {
    let policy = Policy {
        lb: LbPolicy::RoundRobin,
        outlier: Some(OutlierPolicy {
            consecutive_5xx: 0,
            consecutive_gateway: 2,
            max_ejection_percent: 100,
            ..OutlierPolicy::default()
        }),
        ..Policy::default()
    };
    let c = cluster(2, policy);
    let e = endpoint_of(&c, addr(0));
    fail(&c, &e, 10, 500);
    c.report(&e, &Outcome::Timeout);
    fail(&c, &e, 1, 500); // a non-gateway 5xx resets the gateway count
    c.report(&e, &Outcome::Reset);
    assert!(c.ejected().is_empty());
    fail(&c, &e, 1, 504);
    assert_eq!(c.ejected(), vec![addr(0)]);
}

#[tokio::test(start_paused = true)]
async fn panic_threshold_uses_every_host() {
    let c = cluster(2, outlier(1, 100));
    fail(&c, &endpoint_of(&c, addr(0)), 1, 500);
    fail(&c, &endpoint_of(&c, addr(1)), 1, 500);
    assert_eq!(c.ejected().len(), 2);
    assert!(c.pick(&key(&HeaderMap::new())).is_none(), "all ejected, no panic threshold: 503 UH");
    let mut policy = outlier(1, 100);
    policy.outlier = policy.outlier.map(|o| OutlierPolicy { min_health_percent: 50, ..o });
    let c = cluster(2, policy);
    fail(&c, &endpoint_of(&c, addr(0)), 1, 500);
    assert_eq!(counts(&c, 10).len(), 1, "50% healthy is not below 50%");
    fail(&c, &endpoint_of(&c, addr(1)), 1, 500);
    assert_eq!(counts(&c, 10).len(), 2, "panic: all hosts used");
}

#[test]
fn port_level_settings_replace_and_subsets_override_by_group() {
    let top = PolicyParts {
        lb: Some(LbPolicy::Random),
        outlier: Some(OutlierPolicy::default()),
        ports: vec![(9080, PolicyParts { lb: Some(LbPolicy::RoundRobin), ..PolicyParts::default() })],
        ..PolicyParts::default()
    };
    let subset = PolicyParts {
        pool: Some((PoolLimits { max_requests: 7, ..PoolLimits::default() }, Default::default())),
        ..PolicyParts::default()
    };
    let p = PolicyParts::effective(Some(&top), Some(&subset), 80);
    assert_eq!((p.lb, p.pool.max_requests, p.outlier.is_some()), (LbPolicy::Random, 7, true));
    let p = PolicyParts::effective(Some(&top), Some(&subset), 9080);
    assert_eq!(p.lb, LbPolicy::RoundRobin);
    assert!(p.outlier.is_none(), "port-level settings do not inherit the top-level outlier block");
    assert_eq!(p.pool.max_requests, 7, "the subset's groups apply over the port-level ones");
    assert_eq!(PolicyParts::effective(None, None, 80), Policy::default());
}

fn service(endpoints: Vec<Arc<Workload>>) -> Arc<Service> {
    Arc::new(Service {
        name: "reviews".into(),
        namespace: "demo".into(),
        vips: vec!["10.96.0.1".parse().unwrap()],
        ports: vec![ServicePort { name: Some("http".into()), port: 9080, target_port: 8080, app_protocol: None }],
        labels: [(USE_WAYPOINT_LABEL.to_string(), "waypoint".to_string())].into(),
        endpoints,
    })
}

fn state(reviews: Arc<Service>) -> State {
    let wp = Arc::new(Service {
        name: "waypoint".into(),
        namespace: "demo".into(),
        vips: vec!["10.96.0.100".parse().unwrap()],
        ports: vec![ServicePort { name: None, port: 15008, target_port: 15008, app_protocol: None }],
        labels: BTreeMap::new(),
        endpoints: vec![workload("waypoint", &["10.0.0.100"], &[])],
    });
    State { services_by_vip: [(wp.vips[0], wp), (reviews.vips[0], reviews)].into(), ..State::default() }
}

fn rules(outlier: Option<OutlierPolicy>) -> RulesMap {
    let subset =
        |v: &str| Subset { name: v.into(), labels: [("version".to_string(), v.to_string())].into(), policy: None };
    let r = ServiceRules {
        origin: "demo/reviews".into(),
        top: Some(PolicyParts { lb: Some(LbPolicy::RoundRobin), outlier, ..PolicyParts::default() }),
        subsets: vec![subset("v1"), subset("v2")],
    };
    [("demo".to_string(), [("reviews".to_string(), Arc::new(r))].into())].into()
}

fn me() -> WaypointId {
    WaypointId { namespace: "demo".into(), name: "waypoint".into() }
}

#[tokio::test(start_paused = true)]
async fn subsets_select_by_labels_and_state_survives_updates() {
    let v1 = workload("reviews-v1", &["fd00::1", "10.0.0.1"], &[("version", "v1"), ("app", "reviews")]);
    let v2 = workload("reviews-v2", &["10.0.0.2"], &[("version", "v2"), ("app", "reviews")]);
    let v2b = workload("reviews-v2b", &["10.0.0.3"], &[("version", "v2"), ("app", "reviews")]);
    let svc = service(vec![v1.clone(), v2.clone(), v2b.clone()]);
    let s = state(svc.clone());
    let clusters = Clusters::new();
    let od = OutlierPolicy { consecutive_5xx: 1, max_ejection_percent: 100, ..OutlierPolicy::default() };
    clusters.install(&s, &me(), rules(Some(od)));
    let c1 = clusters.get_for(&svc, Some("v1"), 9080);
    assert_eq!(
        c1.endpoints().iter().map(|e| e.0).collect::<Vec<_>>(),
        vec!["10.0.0.1:8080".parse().unwrap()],
        "IPv4 first, target port"
    );
    assert_eq!(c1.origin.as_deref(), Some("demo/reviews"));
    let c2 = clusters.get_for(&svc, Some("v2"), 9080);
    assert_eq!(c2.endpoints().len(), 2);
    assert_eq!(clusters.get_for(&svc, None, 9080).endpoints().len(), 3);
    assert!(
        clusters.get_for(&svc, Some("v3"), 9080).pick(&key(&HeaderMap::new())).is_none(),
        "unknown subset: no endpoints"
    );
    // Eject v2's first endpoint, then update with the same inputs: same cluster, same ejection.
    c2.report(&endpoint_of(&c2, "10.0.0.2:8080".parse().unwrap()), &Outcome::Status(StatusCode::SERVICE_UNAVAILABLE));
    clusters.install(&s, &me(), rules(Some(od)));
    assert!(Arc::ptr_eq(&c2, &clusters.get_for(&svc, Some("v2"), 9080)));
    // Endpoint churn: a new v2 pod; the ejection of the one that stayed is kept.
    let v2c = workload("reviews-v2c", &["10.0.0.4"], &[("version", "v2")]);
    let svc2 = service(vec![v1.clone(), v2.clone(), v2b.clone(), v2c]);
    clusters.install(&state(svc2.clone()), &me(), rules(Some(od)));
    let c2b = clusters.get_for(&svc2, Some("v2"), 9080);
    assert!(!Arc::ptr_eq(&c2, &c2b));
    assert_eq!(c2b.endpoints().len(), 3);
    assert_eq!(c2b.ejected(), vec!["10.0.0.2:8080".parse().unwrap()]);
    assert!(Arc::ptr_eq(&c1, &clusters.get_for(&svc2, Some("v1"), 9080)), "v1 did not change");
    // A policy change rebuilds the cluster.
    clusters.install(&state(svc2.clone()), &me(), rules(None));
    assert!(!Arc::ptr_eq(&c1, &clusters.get_for(&svc2, Some("v1"), 9080)));
}

#[test]
fn shared_types_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Clusters>();
    check::<Cluster>();
    check::<Endpoint>();
    check::<Admission>();
    check::<RetryPermit>();
}
