//! Load balancing of one cluster: round robin, least request (power of two choices), random, and
//! consistent hashing (ring hash or Maglev) over a request hash taken from a header, a cookie, the
//! source IP or a query parameter.
//!
//! Owns the algorithms and their tables. Does not own which hosts are usable (`Cluster` hands in
//! the healthy set) or the hosts' active-request counters (`Host`).

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::HeaderValue;

use super::policy::{HashSource, HashTable, LbPolicy};
use super::{HashKey, Host};

/// 64-bit hash that is the same for the same bytes in every waypoint running this build, so
/// replicas agree on where a key goes.
pub(super) fn hash64(parts: &[&[u8]]) -> u64 {
    #[allow(deprecated)] // SipHasher: fixed keys and algorithm, unlike RandomState.
    let mut h = std::hash::SipHasher::new_with_keys(0x7765_6674, 0x6c62);
    for p in parts {
        p.hash(&mut h);
    }
    h.finish()
}

#[derive(Debug)]
pub(super) enum Balancer {
    RoundRobin(AtomicUsize),
    LeastRequest,
    Random,
    Hash { source: HashSource, table: Table },
}

#[derive(Debug)]
pub(super) enum Table {
    /// Sorted (point, host index).
    Ring(Vec<(u64, u32)>),
    /// Host index per slot.
    Maglev(Vec<u32>),
}

/// What `pick` may choose from: indices of usable hosts, and the same as a mask for hash lookups.
#[derive(Debug)]
pub(super) struct Usable<'a> {
    pub(super) idx: &'a [u32],
    pub(super) mask: &'a [bool],
}

impl Balancer {
    pub(super) fn new(policy: &LbPolicy, hosts: &[Arc<Host>]) -> Self {
        match policy {
            // A random start, as Envoy does, so waypoint replicas do not all begin on host 0.
            LbPolicy::RoundRobin => Balancer::RoundRobin(AtomicUsize::new(rand::random_range(0..1024))),
            LbPolicy::LeastRequest => Balancer::LeastRequest,
            LbPolicy::Random => Balancer::Random,
            LbPolicy::ConsistentHash { source, table } => {
                let addrs: Vec<SocketAddr> = hosts.iter().map(|h| h.addr).collect();
                let table = match *table {
                    HashTable::Ring { minimum_size } => Table::Ring(ring(&addrs, minimum_size)),
                    HashTable::Maglev { table_size } => Table::Maglev(maglev(&addrs, table_size)),
                };
                Balancer::Hash { source: source.clone(), table }
            }
        }
    }

    /// Index into `hosts` of the chosen host, plus a cookie to set when the hash policy made one.
    pub(super) fn pick(
        &self,
        hosts: &[Arc<Host>],
        usable: &Usable<'_>,
        key: &HashKey<'_>,
    ) -> Option<(usize, Option<HeaderValue>)> {
        if usable.idx.is_empty() {
            return None;
        }
        let n = usable.idx.len();
        let random = || usable.idx[rand::random_range(0..n)] as usize;
        let chosen = match self {
            Balancer::RoundRobin(cursor) => usable.idx[cursor.fetch_add(1, Ordering::Relaxed) % n] as usize,
            Balancer::Random => random(),
            Balancer::LeastRequest => {
                if n == 1 {
                    usable.idx[0] as usize
                } else {
                    let a = rand::random_range(0..n);
                    let b = (a + rand::random_range(1..n)) % n;
                    let (a, b) = (usable.idx[a] as usize, usable.idx[b] as usize);
                    if hosts[b].active() < hosts[a].active() { b } else { a }
                }
            }
            Balancer::Hash { source, table } => {
                let (hash, cookie) = request_hash(source, key);
                let Some(hash) = hash else { return Some((random(), cookie)) };
                return Some((table.lookup(hash, usable.mask).unwrap_or_else(random), cookie));
            }
        };
        Some((chosen, None))
    }
}

impl Table {
    /// The host owning `hash`, skipping unusable hosts the way a table rebuilt without them would
    /// mostly agree: the next point on the ring, or a re-hash on Maglev.
    fn lookup(&self, hash: u64, usable: &[bool]) -> Option<usize> {
        match self {
            Table::Ring(points) => {
                if points.is_empty() {
                    return None;
                }
                let start = points.partition_point(|(p, _)| *p < hash);
                (0..points.len())
                    .map(|i| points[(start + i) % points.len()].1 as usize)
                    .find(|&h| usable.get(h).copied().unwrap_or(false))
            }
            Table::Maglev(slots) => {
                if slots.is_empty() {
                    return None;
                }
                let mut h = hash;
                for attempt in 0u64..64 {
                    let host = slots[(h % slots.len() as u64) as usize] as usize;
                    if usable.get(host).copied().unwrap_or(false) {
                        return Some(host);
                    }
                    h = hash64(&[&hash.to_le_bytes(), &attempt.to_le_bytes()]);
                }
                None
            }
        }
    }
}

/// Points per host from which on the count no longer depends on the number of hosts.
const STABLE_POINTS_PER_HOST: usize = 256;

/// Ring hash with equal weights, each point the hash of "address_i". Envoy gives each host
/// ceil(minimum / hosts) points, so every endpoint change reshuffles keys between hosts that
/// stayed; here a host gets at least `STABLE_POINTS_PER_HOST` points, so from
/// minimum/256 hosts on (4 with Istio's 1024) a host joining or leaving moves only its own keys.
fn ring(addrs: &[SocketAddr], minimum_size: usize) -> Vec<(u64, u32)> {
    if addrs.is_empty() {
        return Vec::new();
    }
    let per_host = minimum_size.div_ceil(addrs.len()).max(STABLE_POINTS_PER_HOST);
    let mut points = Vec::with_capacity(per_host * addrs.len());
    for (i, addr) in addrs.iter().enumerate() {
        let name = addr.to_string();
        for k in 0..per_host {
            points.push((hash64(&[name.as_bytes(), b"_", &(k as u64).to_le_bytes()]), i as u32));
        }
    }
    points.sort_unstable();
    points
}

/// Maglev lookup table (Eisenbud et al. 2016): each host fills slots in its own permutation order,
/// round-robin with the others, until the (prime-sized) table is full.
fn maglev(addrs: &[SocketAddr], table_size: usize) -> Vec<u32> {
    let m = table_size.max(1);
    if addrs.is_empty() {
        return Vec::new();
    }
    let perms: Vec<(usize, usize)> = addrs
        .iter()
        .map(|a| {
            let name = a.to_string();
            let offset = (hash64(&[name.as_bytes(), b"offset"]) % m as u64) as usize;
            let skip = if m > 1 { (hash64(&[name.as_bytes(), b"skip"]) % (m as u64 - 1)) as usize + 1 } else { 1 };
            (offset, skip)
        })
        .collect();
    let mut next = vec![0usize; addrs.len()];
    let mut table = vec![u32::MAX; m];
    let mut filled = 0;
    'fill: loop {
        for (i, &(offset, skip)) in perms.iter().enumerate() {
            // Bounded: with a prime table size every permutation visits every slot once.
            for _ in 0..m {
                let slot = (offset + next[i] * skip) % m;
                next[i] += 1;
                if table[slot] == u32::MAX {
                    table[slot] = i as u32;
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                break 'fill;
            }
        }
    }
    table
}

/// The request's hash under `source` (`None`: nothing to hash, the pick is random) and, for a
/// cookie policy with a ttl when the request has no cookie, the `Set-Cookie` value to answer with.
pub(super) fn request_hash(source: &HashSource, key: &HashKey<'_>) -> (Option<u64>, Option<HeaderValue>) {
    match source {
        HashSource::Header(name) => (key.headers.get(name).map(|v| hash64(&[v.as_bytes()])), None),
        HashSource::SourceIp => (Some(hash64(&[key.source_ip.to_string().as_bytes()])), None),
        HashSource::QueryParameter(name) => {
            let value = key.query.and_then(|q| {
                q.split('&').find_map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (k == name).then_some(v)
                })
            });
            (value.map(|v| hash64(&[v.as_bytes()])), None)
        }
        HashSource::Cookie { name, path, ttl } => {
            if let Some(v) = cookie(key.headers, name) {
                return (Some(hash64(&[v.as_bytes()])), None);
            }
            let Some(ttl) = ttl else { return (None, None) };
            let value = format!("{:016x}", rand::random::<u64>());
            (Some(hash64(&[value.as_bytes()])), set_cookie(name, &value, path.as_deref(), *ttl))
        }
    }
}

/// First value of cookie `name` in the request's `Cookie` headers, without surrounding quotes.
fn cookie<'h>(headers: &'h http::HeaderMap, name: &str) -> Option<&'h str> {
    headers.get_all(http::header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|line| {
        line.split(';').find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then(|| v.trim_matches('"'))
        })
    })
}

/// Envoy's generated cookie: quoted value, `Max-Age` unless the ttl is zero (a session cookie),
/// the configured path, HttpOnly.
fn set_cookie(name: &str, value: &str, path: Option<&str>, ttl: Duration) -> Option<HeaderValue> {
    let mut s = format!("{name}=\"{value}\"");
    if !ttl.is_zero() {
        s.push_str(&format!("; Max-Age={}", ttl.as_secs().max(1)));
    }
    if let Some(p) = path.filter(|p| !p.is_empty()) {
        s.push_str(&format!("; Path={p}"));
    }
    s.push_str("; HttpOnly");
    HeaderValue::from_str(&s).ok()
}
