//! Runtime clusters: resolved hosts, per-priority load balancers and stats.
//!
//! Each cluster publishes an immutable [`HostSnapshot`] through `ArcSwap`;
//! DNS refreshes (and later EDS) build a new snapshot and swap it in, so a
//! pick never sees a half-updated host set. Per-host request counters live
//! in cells keyed by address and survive rebuilds, so least-request keeps
//! its view across updates.

use crate::config::cluster::{ClusterConfig, Discovery, DnsFamily, EndpointConfig, LocalityConfig};
use crate::lb::{self, LbHost, PickContext};
use crate::stats;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

/// A host set as published: (priority, [(endpoint, its addresses)]).
type Resolved = Vec<(u32, Vec<(EndpointConfig, Vec<SocketAddr>)>)>;

/// One resolved upstream host.
#[derive(Debug)]
pub struct UpstreamHost {
    pub addr: SocketAddr,
    /// What ring hash and Maglev hash: `envoy.lb` `hash_key` metadata, or
    /// the address.
    pub hash_key: String,
    pub hostname: String,
    pub weight: u32,
    pub healthy: bool,
    pub degraded: bool,
    /// Its locality (an index among its priority's localities) and that
    /// locality's weight, for locality-weighted balancing.
    pub locality: u32,
    pub locality_weight: u32,
    pub active_requests: Arc<AtomicU64>,
    /// How connections to it are secured (the cluster's transport socket,
    /// or the `transport_socket_matches` entry its metadata picks).
    pub tls: Option<HostTls>,
    /// Its endpoint's `istio.workload` metadata.
    pub istio_workload: Option<Arc<str>>,
}

impl UpstreamHost {
    /// A healthy host known by its address alone (no name, weight 1, no
    /// locality): an ORIGINAL_DST destination.
    pub fn direct(addr: SocketAddr, tls: Option<HostTls>) -> Self {
        Self {
            addr,
            hash_key: addr.to_string(),
            hostname: String::new(),
            weight: 1,
            healthy: true,
            degraded: false,
            locality: 0,
            locality_weight: 0,
            active_requests: Arc::default(),
            tls,
            istio_workload: None,
        }
    }
}

/// An upstream host's TLS origination.
#[derive(Debug, Clone)]
pub struct HostTls {
    pub tls: Arc<crate::config::tls::ClientTls>,
    /// pingora's `custom_l4` for HTTP, built once unless the SNI follows
    /// each request's host (`auto_host_sni`).
    pub connect: Option<Arc<crate::tls::upstream::TlsConnect>>,
}

/// `auto_config` over TLS: what each host's ALPN picked, and the
/// cluster's TLS contexts narrowed to that one protocol. A host's first
/// connection offers h2 and http/1.1; later ones offer what it picked, so
/// pingora (which must know the protocol before it connects) speaks it.
#[derive(Debug, Default)]
pub struct AutoAlpn {
    /// Host → h2. Keyed by address alone, so requests choosing SNIs
    /// (`auto_sni`) cannot grow it.
    picked: Mutex<HashMap<SocketAddr, bool>>,
    /// (context, h2) → the narrowed context.
    narrowed: Mutex<HashMap<(usize, bool), Arc<crate::config::tls::ClientTls>>>,
    /// (context, `istio.alpn` list) → the context offering that list.
    overridden: Mutex<
        HashMap<(usize, crate::istio::alpn::AlpnOverride), Arc<crate::config::tls::ClientTls>>,
    >,
}

impl AutoAlpn {
    pub fn picked(&self, addr: SocketAddr) -> Option<bool> {
        self.picked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&addr)
            .copied()
    }

    pub fn record(&self, addr: SocketAddr, h2: bool) {
        self.picked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr, h2);
    }

    /// `base` offering `alpn` instead of its own list.
    pub fn overridden(
        &self,
        base: &Arc<crate::config::tls::ClientTls>,
        alpn: &crate::istio::alpn::AlpnOverride,
    ) -> Arc<crate::config::tls::ClientTls> {
        let key = (Arc::as_ptr(base) as usize, alpn.clone());
        self.overridden
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_insert_with(|| {
                let list: Vec<&str> = alpn.0.iter().map(String::as_str).collect();
                Arc::new(base.with_alpn(&list))
            })
            .clone()
    }

    pub fn narrowed(
        &self,
        base: &Arc<crate::config::tls::ClientTls>,
        h2: bool,
    ) -> Arc<crate::config::tls::ClientTls> {
        let key = (Arc::as_ptr(base) as usize, h2);
        self.narrowed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_insert_with(|| Arc::new(base.with_alpn(if h2 { &["h2"] } else { &["http/1.1"] })))
            .clone()
    }
}

/// One set of hosts with its balancer.
struct Pool {
    hosts: Vec<Arc<UpstreamHost>>,
    balancer: Box<dyn lb::LoadBalancer>,
}

impl Pool {
    fn new(policy: &lb::LbPolicy, hosts: Vec<Arc<UpstreamHost>>) -> Self {
        let lb_hosts: Arc<[LbHost]> = hosts
            .iter()
            .map(|h| LbHost {
                hash_key: h.hash_key.clone(),
                weight: h.weight.max(1),
                active_requests: h.active_requests.clone(),
            })
            .collect();
        Pool {
            balancer: lb::build(policy, lb_hosts),
            hosts,
        }
    }
}

struct Priority {
    healthy: Pool,
    degraded: Pool,
    /// Every host: used in panic mode.
    all: Pool,
    panic: bool,
    /// With locality weighting, and some locality weighted above zero.
    localities: Option<Localities>,
}

/// A priority's localities, picked by weight before a host within one, as
/// Envoy's locality-weighted balancing: each locality's effective weight
/// is its weight times `min(1, overprovisioning * healthy / total)`
/// (degraded hosts likewise for degraded picks), and picks follow an EDF
/// schedule over those weights.
struct Localities {
    healthy: Vec<Pool>,
    degraded: Vec<Pool>,
    healthy_weights: Vec<f64>,
    degraded_weights: Vec<f64>,
    healthy_edf: Mutex<lb::edf::EdfScheduler>,
    degraded_edf: Mutex<lb::edf::EdfScheduler>,
}

impl Localities {
    fn build(
        policy: &lb::LbPolicy,
        hosts: &[Arc<UpstreamHost>],
        overprovisioning: u32,
    ) -> Option<Self> {
        let n = hosts
            .iter()
            .map(|h| h.locality as usize + 1)
            .max()
            .unwrap_or(0);
        let mut weight = vec![0u32; n];
        let mut groups: Vec<Vec<Arc<UpstreamHost>>> = vec![Vec::new(); n];
        for h in hosts {
            weight[h.locality as usize] = h.locality_weight;
            groups[h.locality as usize].push(h.clone());
        }
        let effective = |g: &[Arc<UpstreamHost>], w: u32, ok: &dyn Fn(&UpstreamHost) -> bool| {
            if g.is_empty() {
                return 0.0;
            }
            let avail = g.iter().filter(|h| ok(h)).count() as f64 / g.len() as f64;
            f64::from(w) * (f64::from(overprovisioning) / 100.0 * avail).min(1.0)
        };
        let healthy_weights: Vec<f64> = (0..n)
            .map(|i| effective(&groups[i], weight[i], &|h| h.healthy))
            .collect();
        let degraded_weights: Vec<f64> = (0..n)
            .map(|i| effective(&groups[i], weight[i], &|h| h.degraded))
            .collect();
        // Envoy builds no schedule when every weight is zero (EDS sent no
        // locality weights): picks then ignore localities.
        if healthy_weights
            .iter()
            .chain(&degraded_weights)
            .all(|w| *w <= 0.0)
        {
            return None;
        }
        let edf = |w: &[f64]| {
            let mut e = lb::edf::EdfScheduler::new();
            for (i, w) in w.iter().enumerate().filter(|(_, w)| **w > 0.0) {
                e.add(*w, i);
            }
            Mutex::new(e)
        };
        let pools = |ok: &dyn Fn(&UpstreamHost) -> bool| -> Vec<Pool> {
            groups
                .iter()
                .map(|g| Pool::new(policy, g.iter().filter(|h| ok(h)).cloned().collect()))
                .collect()
        };
        Some(Self {
            healthy: pools(&|h| h.healthy),
            degraded: pools(&|h| h.degraded),
            healthy_edf: edf(&healthy_weights),
            degraded_edf: edf(&degraded_weights),
            healthy_weights,
            degraded_weights,
        })
    }

    /// The next locality's pool by the EDF schedule; None when no locality
    /// has hosts of that kind.
    fn pick(&self, degraded: bool) -> Option<&Pool> {
        let (edf, weights, pools) = if degraded {
            (&self.degraded_edf, &self.degraded_weights, &self.degraded)
        } else {
            (&self.healthy_edf, &self.healthy_weights, &self.healthy)
        };
        let i = edf.lock().unwrap().pick_and_add(|i| weights[i])?;
        pools.get(i)
    }

    /// Each locality's pool with its share of the priority's load.
    fn shares(&self, degraded: bool) -> impl Iterator<Item = (&Pool, f64)> {
        let (weights, pools) = if degraded {
            (&self.degraded_weights, &self.degraded)
        } else {
            (&self.healthy_weights, &self.healthy)
        };
        let total: f64 = weights.iter().sum();
        pools
            .iter()
            .zip(weights)
            .map(move |(p, w)| (p, if total > 0.0 { w / total } else { 0.0 }))
    }
}

/// How a snapshot spreads load beyond the balancing policy.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    /// `healthy_panic_threshold` in percent; 0: never panic.
    pub panic_threshold: u32,
    pub locality_weighted: bool,
}

impl Default for Spread {
    fn default() -> Self {
        Self {
            panic_threshold: PANIC_THRESHOLD_PCT as u32,
            locality_weighted: false,
        }
    }
}

/// An immutable view of a cluster's hosts.
pub struct HostSnapshot {
    priorities: Vec<Priority>,
    /// Percent of traffic per priority to healthy, then to degraded hosts.
    healthy_loads: Vec<u32>,
    degraded_loads: Vec<u32>,
    pub all_hosts: Vec<Arc<UpstreamHost>>,
    /// Each priority's (healthy, degraded) availability, percent, for
    /// loads that leave priorities out (retry priorities).
    availability: Vec<(u32, u32)>,
}

/// Priority loads (healthy, degraded) that replace the snapshot's.
pub type LoadOverride = (Vec<u32>, Vec<u32>);

/// Endpoints with the addresses they resolved to, by priority.
pub type ResolvedHosts = Vec<(u32, Vec<(EndpointConfig, Vec<SocketAddr>)>)>;

/// Per priority: (healthy, degraded, total) host counts.
pub type PriorityCounts = (usize, usize, usize);

/// Envoy's default healthy panic threshold (50 %).
const PANIC_THRESHOLD_PCT: usize = 50;

/// Priority loads and panic flags, as Envoy's `LoadBalancerBase`.
#[derive(Debug, PartialEq)]
pub struct Loads {
    pub healthy: Vec<u32>,
    pub degraded: Vec<u32>,
    pub panic: Vec<bool>,
}

/// Envoy's `recalculatePerPriorityState` and `recalculatePerPriorityPanic`:
/// each priority's healthy and degraded availability is `min(100,
/// overprovisioning * n / total)`; healthy load is filled in priority order,
/// then degraded load, scaled by the total availability (at most 100). No
/// priority panics when the total availability is 100; when every priority
/// panics, the load follows host counts (`recalculateLoadInTotalPanic`).
pub fn priority_loads(counts: &[PriorityCounts], overprovisioning: u32) -> Loads {
    priority_loads_with(counts, overprovisioning, PANIC_THRESHOLD_PCT as u32)
}

/// [`priority_loads`] with a panic threshold other than Envoy's default.
pub fn priority_loads_with(
    counts: &[PriorityCounts],
    overprovisioning: u32,
    threshold: u32,
) -> Loads {
    let threshold = threshold as usize;
    let n = counts.len();
    let avail = |k: usize, t: usize| {
        if t == 0 {
            0
        } else {
            (overprovisioning as u64 * k as u64 / t as u64).min(100) as u32
        }
    };
    let health: Vec<u32> = counts.iter().map(|&(h, _, t)| avail(h, t)).collect();
    let degraded: Vec<u32> = counts.iter().map(|&(_, d, t)| avail(d, t)).collect();
    let total = (health.iter().sum::<u32>() + degraded.iter().sum::<u32>()).min(100);
    let panic: Vec<bool> = counts
        .iter()
        .map(|&(h, d, t)| {
            total != 100 && threshold > 0 && (t == 0 || (h + d) * 100 < t * threshold)
        })
        .collect();
    let mut hl = vec![0; n];
    let mut dl = vec![0; n];
    if n > 0 && panic.iter().all(|p| *p) {
        let hosts: usize = counts.iter().map(|&(_, _, t)| t).sum();
        let mut remaining = 100u32;
        for (i, &(_, _, t)) in counts.iter().enumerate() {
            // No host at all: nothing here, the first priority takes it all.
            hl[i] = (100 * t).checked_div(hosts).unwrap_or(0) as u32;
            remaining -= hl[i];
        }
        let first = counts.iter().position(|&(_, _, t)| t > 0).unwrap_or(0);
        hl[first] += remaining;
        return Loads {
            healthy: hl,
            degraded: dl,
            panic,
        };
    }
    if total == 0 {
        // No panic (threshold 0) and nothing available: Envoy sends it all
        // to the first priority, which then has no host to pick.
        if n > 0 {
            hl[0] = 100;
        }
        return Loads {
            healthy: hl,
            degraded: dl,
            panic,
        };
    }
    let mut remaining = 100u32;
    for (i, h) in health.iter().enumerate() {
        hl[i] = (h * 100 / total).min(remaining);
        remaining -= hl[i];
    }
    for (i, d) in degraded.iter().enumerate() {
        dl[i] = (d * 100 / total).min(remaining);
        remaining -= dl[i];
    }
    // Rounding leftovers go to the first priority that has any load.
    if remaining > 0 {
        if let Some(i) = (0..n).find(|&i| hl[i] > 0) {
            hl[i] += remaining;
        } else if let Some(i) = (0..n).find(|&i| dl[i] > 0) {
            dl[i] += remaining;
        }
    }
    Loads {
        healthy: hl,
        degraded: dl,
        panic,
    }
}

impl HostSnapshot {
    pub fn build(
        policy: &lb::LbPolicy,
        by_priority: Vec<Vec<Arc<UpstreamHost>>>,
        overprovisioning: u32,
    ) -> Self {
        Self::build_spread(policy, Spread::default(), by_priority, overprovisioning)
    }

    pub fn build_spread(
        policy: &lb::LbPolicy,
        spread: Spread,
        by_priority: Vec<Vec<Arc<UpstreamHost>>>,
        overprovisioning: u32,
    ) -> Self {
        let counts: Vec<PriorityCounts> = by_priority
            .iter()
            .map(|p| {
                (
                    p.iter().filter(|h| h.healthy).count(),
                    p.iter().filter(|h| h.degraded).count(),
                    p.len(),
                )
            })
            .collect();
        let loads = priority_loads_with(&counts, overprovisioning, spread.panic_threshold);
        let avail = |k: usize, t: usize| {
            if t == 0 {
                0
            } else {
                (overprovisioning as u64 * k as u64 / t as u64).min(100) as u32
            }
        };
        let availability = counts
            .iter()
            .map(|&(h, d, t)| (avail(h, t), avail(d, t)))
            .collect();
        let all_hosts = by_priority.iter().flatten().cloned().collect();
        let priorities = by_priority
            .into_iter()
            .zip(&loads.panic)
            .map(|(hosts, &panic)| Priority {
                panic,
                localities: if spread.locality_weighted {
                    Localities::build(policy, &hosts, overprovisioning)
                } else {
                    None
                },
                healthy: Pool::new(
                    policy,
                    hosts.iter().filter(|h| h.healthy).cloned().collect(),
                ),
                degraded: Pool::new(
                    policy,
                    hosts.iter().filter(|h| h.degraded).cloned().collect(),
                ),
                all: Pool::new(policy, hosts),
            })
            .collect();
        Self {
            priorities,
            healthy_loads: loads.healthy,
            degraded_loads: loads.degraded,
            all_hosts,
            availability,
        }
    }

    /// The healthy or degraded host at `addr`, in any priority (what an
    /// override host may pick).
    pub fn find_host(&self, addr: SocketAddr) -> Option<Arc<UpstreamHost>> {
        self.priorities
            .iter()
            .flat_map(|p| p.healthy.hosts.iter().chain(p.degraded.hosts.iter()))
            .find(|h| h.addr == addr)
            .cloned()
    }

    /// The priority a host is in.
    pub fn priority_of(&self, addr: SocketAddr) -> Option<usize> {
        self.priorities
            .iter()
            .position(|p| p.all.hosts.iter().any(|h| h.addr == addr))
    }

    /// Envoy's previous-priorities loads: the availability of the
    /// priorities not `excluded`, spread in priority order (healthy, then
    /// degraded) over 100, the rounding left to the first priorities. None
    /// when nothing is left available.
    pub fn loads_without(&self, excluded: &[bool]) -> Option<LoadOverride> {
        let kept = |i: usize| !excluded.get(i).copied().unwrap_or(false);
        let (h, d): (Vec<u32>, Vec<u32>) = self
            .availability
            .iter()
            .enumerate()
            .map(|(i, &(h, d))| if kept(i) { (h, d) } else { (0, 0) })
            .unzip();
        let total = (h.iter().sum::<u32>() + d.iter().sum::<u32>()).min(100);
        if total == 0 {
            return None;
        }
        let (mut hl, mut dl) = (vec![0u32; h.len()], vec![0u32; d.len()]);
        let mut left = 100u32;
        while left != 0 {
            let before = left;
            for (l, a) in hl.iter_mut().zip(&h).chain(dl.iter_mut().zip(&d)) {
                let delta = left.min(a * 100 / total);
                *l += delta;
                left -= delta;
            }
            if left == before {
                // Every share rounds to nothing: the first available takes it.
                let first = h.iter().chain(&d).position(|a| *a > 0)?;
                let n = h.len();
                if first < n {
                    hl[first] += left;
                } else {
                    dl[first - n] += left;
                }
                left = 0;
            }
        }
        Some((hl, dl))
    }

    /// Each host's expected share of picks (summing to 1 when any host
    /// exists), as [`Self::pick`] spreads them: priority loads to healthy,
    /// then degraded hosts (every host of a priority in panic), then by
    /// weight within that set. The kernel LB encodes these shares as
    /// weights, so connect()-time balancing follows the same snapshot.
    pub fn effective_shares(&self) -> Vec<(SocketAddr, f64)> {
        let mut shares: Vec<(SocketAddr, f64)> = Vec::new();
        for (p, prio) in self.priorities.iter().enumerate() {
            let sets: [(&Pool, u32); 2] = if prio.panic {
                [
                    (&prio.all, self.healthy_loads[p] + self.degraded_loads[p]),
                    (&prio.all, 0),
                ]
            } else {
                [
                    (&prio.healthy, self.healthy_loads[p]),
                    (&prio.degraded, self.degraded_loads[p]),
                ]
            };
            let by_locality = |degraded: bool| -> Vec<(&Pool, f64)> {
                match &prio.localities {
                    Some(l) if !prio.panic => l.shares(degraded).collect(),
                    _ => Vec::new(),
                }
            };
            let mut weighted: Vec<(&Pool, f64)> = Vec::new();
            for (i, (pool, load)) in sets.into_iter().enumerate() {
                let split = by_locality(i == 1);
                if split.is_empty() {
                    weighted.push((pool, f64::from(load)));
                } else {
                    weighted.extend(split.into_iter().map(|(p, f)| (p, f64::from(load) * f)));
                }
            }
            for (pool, load) in weighted {
                let total: u64 = pool.hosts.iter().map(|h| u64::from(h.weight.max(1))).sum();
                if load <= 0.0 || total == 0 {
                    continue;
                }
                for h in &pool.hosts {
                    let share = load / 100.0 * h.weight.max(1) as f64 / total as f64;
                    match shares.iter_mut().find(|(a, _)| *a == h.addr) {
                        Some((_, s)) => *s += share,
                        None => shares.push((h.addr, share)),
                    }
                }
            }
        }
        shares
    }

    /// Picks a host: a priority (healthy, then degraded) by load, then that
    /// set's balancer (all hosts when the priority is in panic).
    pub fn pick(
        &self,
        hash: Option<u64>,
        random: u64,
        exclude: &dyn Fn(SocketAddr) -> bool,
        attempts: Option<u32>,
    ) -> Option<Arc<UpstreamHost>> {
        self.pick_with(hash, random, exclude, attempts, None)
    }

    /// [`Self::pick`] with priority loads of the caller's (a retry
    /// priority's) instead of the snapshot's.
    pub fn pick_with(
        &self,
        hash: Option<u64>,
        random: u64,
        exclude: &dyn Fn(SocketAddr) -> bool,
        attempts: Option<u32>,
        loads: Option<&LoadOverride>,
    ) -> Option<Arc<UpstreamHost>> {
        // Loads made from an older snapshot (the cluster changed since)
        // are not for this one: its own serve.
        let (healthy, degraded) = match loads {
            Some((h, d)) if h.len() == self.priorities.len() && d.len() == h.len() => {
                (h.as_slice(), d.as_slice())
            }
            _ => (
                self.healthy_loads.as_slice(),
                self.degraded_loads.as_slice(),
            ),
        };
        let mut roll = (random % 100) as u32;
        let mut chosen = None;
        for (i, l) in healthy
            .iter()
            .map(|l| (false, *l))
            .chain(degraded.iter().map(|l| (true, *l)))
            .enumerate()
        {
            let (degraded, load) = l;
            if roll < load {
                chosen = Some((i % healthy.len(), degraded));
                break;
            }
            roll -= load;
        }
        let (p, degraded) = chosen?;
        let prio = self.priorities.get(p)?;
        let pool = if prio.panic {
            &prio.all
        } else if let Some(pool) = prio.localities.as_ref().and_then(|l| l.pick(degraded)) {
            pool
        } else if degraded {
            &prio.degraded
        } else {
            &prio.healthy
        };
        let hosts = &pool.hosts;
        let ex = |i: usize| exclude(hosts[i].addr);
        let idx = pool.balancer.pick(&PickContext {
            hash,
            exclude: &ex,
            random: random >> 8,
            attempts,
        })?;
        hosts.get(idx).cloned()
    }
}

/// Envoy's per-cluster stats that Legate records.
pub struct ClusterStats {
    pub upstream_rq_total: metrics::Counter,
    pub upstream_rq_completed: metrics::Counter,
    pub upstream_rq_retry: metrics::Counter,
    pub upstream_rq_timeout: metrics::Counter,
    pub upstream_rq_active: metrics::Gauge,
    pub upstream_cx_total: metrics::Counter,
    pub upstream_cx_connect_fail: metrics::Counter,
    pub upstream_cx_none_healthy: metrics::Counter,
    pub upstream_cx_overflow: metrics::Counter,
    pub upstream_rq_pending_overflow: metrics::Counter,
    pub upstream_rq_retry_overflow: metrics::Counter,
    pub membership_healthy: metrics::Gauge,
    pub membership_total: metrics::Gauge,
    upstream_rq: stats::StatusCounters,
}

impl ClusterStats {
    fn new(name: &str) -> Self {
        let p = format!("cluster.{name}.");
        let c = |s: &str| stats::counter(format!("{p}{s}"));
        let g = |s: &str| stats::gauge(format!("{p}{s}"));
        Self {
            upstream_rq_total: c("upstream_rq_total"),
            upstream_rq_completed: c("upstream_rq_completed"),
            upstream_rq_retry: c("upstream_rq_retry"),
            upstream_rq_timeout: c("upstream_rq_timeout"),
            upstream_rq_active: g("upstream_rq_active"),
            upstream_cx_total: c("upstream_cx_total"),
            upstream_cx_connect_fail: c("upstream_cx_connect_fail"),
            upstream_cx_none_healthy: c("upstream_cx_none_healthy"),
            upstream_cx_overflow: c("upstream_cx_overflow"),
            upstream_rq_pending_overflow: c("upstream_rq_pending_overflow"),
            upstream_rq_retry_overflow: c("upstream_rq_retry_overflow"),
            membership_healthy: g("membership_healthy"),
            membership_total: g("membership_total"),
            upstream_rq: stats::StatusCounters::new(format!("{p}upstream_rq_"), true),
        }
    }

    /// `upstream_rq_2xx` and `upstream_rq_<code>`.
    pub fn record_status(&self, status: u16) {
        self.upstream_rq.record(status);
    }
}

/// A runtime cluster.
pub struct Cluster {
    pub config: Arc<ClusterConfig>,
    snapshot: ArcSwap<HostSnapshot>,
    cells: Mutex<HashMap<SocketAddr, Arc<AtomicU64>>>,
    /// The last successful resolution of each DNS endpoint.
    last_resolved: Mutex<HashMap<(String, u16), Vec<SocketAddr>>>,
    /// A DNS client, for clusters that read TTLs or ask their own name
    /// servers (live state; the system resolver is used otherwise).
    dns: Option<hickory_resolver::TokioResolver>,
    pub stats: ClusterStats,
    /// Circuit breakers: the connections, requests and retries in use.
    pub breakers: crate::breakers::Breakers,
    /// Outlier detection, when configured.
    pub outlier: Option<crate::outlier::Detector>,
    /// Active health checking, when configured.
    pub health: Option<Arc<crate::health_check::Checker>>,
    /// `auto_config`'s per-host protocol choices.
    pub alpn: AutoAlpn,
    /// The last published host set, to publish again when a host is
    /// ejected or comes back (kept only with outlier detection).
    last_published: Mutex<Option<(Resolved, u32)>>,
    /// Held across a publication, so a republish (a host's health
    /// changed) never writes back a host set older than one just
    /// published by discovery.
    publishing: Mutex<()>,
    /// Distinguishes this cluster's pooled connections from every other's.
    pub pool_key: u64,
    /// With `per_host_thresholds.max_connections`: each host's connection
    /// slots, by address (kept across host set updates, as the hosts'
    /// connections are).
    host_connections: Mutex<HashMap<SocketAddr, Arc<crate::breakers::Resource>>>,
    /// With `max_connection_duration`: the pool's generations.
    pub generations: Option<crate::pool_age::Generations>,
    /// Requests sent on each pooled upstream connection (by socket), kept
    /// only with `max_requests_per_connection`.
    requests_on: Mutex<HashMap<i32, u32>>,
    /// ORIGINAL_DST: the hosts made for destinations seen so far.
    original_dst_hosts: Mutex<HashMap<SocketAddr, Arc<UpstreamHost>>>,
}

/// How many ORIGINAL_DST hosts a cluster keeps before it forgets those no
/// request holds (Envoy forgets a host unused for `cleanup_interval`).
const ORIGINAL_DST_HOSTS: usize = 1024;

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.config.name)
            .finish()
    }
}

impl Cluster {
    pub fn new(config: Arc<ClusterConfig>) -> Self {
        let stats = ClusterStats::new(&config.name);
        let breakers = crate::breakers::Breakers::new(&config.name, &config.circuit_breakers);
        let outlier = config
            .outlier
            .clone()
            .map(|o| crate::outlier::Detector::new(&config.name, o));
        // A new TLS context gets new pooled connections.
        let tls_keys = config
            .tls
            .iter()
            .chain(config.tls_matches.iter().filter_map(|m| m.tls.as_ref()))
            .fold(0u64, |acc, t| acc.rotate_left(7) ^ t.key);
        let pool_key = xxhash_rust::xxh64::xxh64(config.name.as_bytes(), tls_keys);
        let dns = dns_client(&config.dns);
        let c = Self {
            dns,
            snapshot: ArcSwap::from_pointee(HostSnapshot::build_spread(
                &config.lb,
                config.spread(),
                Vec::new(),
                config.overprovisioning_factor,
            )),
            cells: Mutex::new(HashMap::new()),
            last_resolved: Mutex::new(HashMap::new()),
            stats,
            breakers,
            outlier,
            health: config
                .health_check
                .clone()
                .map(|h| Arc::new(crate::health_check::Checker::new(&config.name, h))),
            alpn: AutoAlpn::default(),
            last_published: Mutex::new(None),
            publishing: Mutex::new(()),
            pool_key,
            host_connections: Mutex::new(HashMap::new()),
            generations: config
                .max_connection_duration
                .map(crate::pool_age::Generations::new),
            requests_on: Mutex::new(HashMap::new()),
            original_dst_hosts: Mutex::new(HashMap::new()),
            config,
        };
        if c.config.discovery == Discovery::Static {
            let localities = c.config.localities.clone();
            c.set_localities(&localities, c.config.overprovisioning_factor);
        }
        c
    }

    /// The connection slots of host `addr`, when hosts are limited.
    pub fn host_connections(&self, addr: SocketAddr) -> Option<Arc<crate::breakers::Resource>> {
        let max = self.config.circuit_breakers.per_host_connections?;
        let mut m = self
            .host_connections
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if m.len() >= 4096 {
            // Forget hosts nothing holds a slot of.
            m.retain(|_, r| r.count() > 0);
        }
        Some(
            m.entry(addr)
                .or_insert_with(|| crate::breakers::Resource::unpublished(max))
                .clone(),
        )
    }

    /// Counts a request on upstream connection `fd` (a new connection when
    /// not `reused`); true when it is the connection's last under
    /// `max_requests_per_connection`.
    pub fn last_request_on(&self, fd: i32, reused: bool) -> bool {
        let Some(max) = self.config.max_requests_per_connection else {
            return false;
        };
        let mut counts = self.requests_on.lock().unwrap();
        let n = if reused {
            let n = counts.entry(fd).or_insert(0);
            *n += 1;
            *n
        } else {
            counts.insert(fd, 1);
            1
        };
        if n >= max {
            counts.remove(&fd);
        }
        n >= max
    }

    /// Publishes endpoints given as IP literals (STATIC clusters, EDS).
    pub fn set_localities(&self, localities: &[LocalityConfig], overprovisioning: u32) {
        let resolved = localities
            .iter()
            .map(|l| {
                (
                    l.priority,
                    l.endpoints
                        .iter()
                        .map(|e| {
                            (
                                e.clone(),
                                e.host
                                    .parse::<std::net::IpAddr>()
                                    .map(|ip| vec![SocketAddr::new(ip, e.port)])
                                    .unwrap_or_default(),
                            )
                        })
                        .collect(),
                )
            })
            .collect();
        self.publish(resolved, overprovisioning);
    }

    pub fn snapshot(&self) -> Arc<HostSnapshot> {
        self.snapshot.load_full()
    }

    /// (healthy hosts, all hosts): `membership_healthy` and
    /// `membership_total`.
    pub fn membership(&self) -> (usize, usize) {
        let s = self.snapshot.load();
        (
            s.all_hosts.iter().filter(|h| h.healthy).count(),
            s.all_hosts.len(),
        )
    }

    /// Where active checks probe each host: the port override, and the
    /// endpoint's health check host name, else the check's `host`, else
    /// the cluster's name (Envoy's order); through
    /// the host's TLS.
    fn health_targets(&self, resolved: &Resolved) -> Vec<crate::health_check::Target> {
        let Some(cfg) = &self.config.health_check else {
            return Vec::new();
        };
        let check_host = match &cfg.check {
            crate::config::health_check::Check::Http(h) => h.host.as_str(),
            crate::config::health_check::Check::Tcp { .. }
            | crate::config::health_check::Check::Grpc { .. } => "",
        };
        resolved
            .iter()
            .flat_map(|(_, eps)| eps.iter())
            .flat_map(|(e, addrs)| {
                addrs.iter().map(move |a| {
                    let mut addr = *a;
                    if let Some(p) = cfg.alt_port.or(e.hc_port) {
                        addr.set_port(p);
                    }
                    let host = [e.hc_hostname.as_str(), check_host]
                        .into_iter()
                        .find(|h| !h.is_empty())
                        .unwrap_or(&self.config.name)
                        .to_string();
                    (*a, addr, host, e)
                })
            })
            .map(|(key, probe, host, e)| crate::health_check::Target {
                key,
                addr: probe,
                host,
                // Narrowed to the check's ALPN once per publication, not
                // per check.
                tls: self.config.tls_for(e).map(|tls| HostTls {
                    connect: None,
                    tls: Arc::new(tls.with_alpn(crate::health_check::health_alpn(&cfg.check))),
                }),
                bind: self.config.bind.for_peer(probe),
            })
            .collect()
    }

    /// ORIGINAL_DST: the host for destination `addr`, made on first use
    /// with the cluster's transport socket (an endpoint without metadata
    /// picks among `transport_socket_matches`) and kept for the next
    /// request, so its active-request count and pooled connections carry
    /// over.
    pub fn original_dst_host(&self, addr: SocketAddr) -> Arc<UpstreamHost> {
        let mut hosts = self
            .original_dst_hosts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(h) = hosts.get(&addr) {
            return h.clone();
        }
        if hosts.len() >= ORIGINAL_DST_HOSTS {
            hosts.retain(|_, h| Arc::strong_count(h) > 1);
        }
        let e = EndpointConfig {
            host: addr.ip().to_string(),
            port: addr.port(),
            weight: 1,
            healthy: true,
            ..Default::default()
        };
        let host = Arc::new(UpstreamHost::direct(addr, self.host_tls(&e)));
        hosts.insert(addr, host.clone());
        host
    }

    /// How connections to endpoint `e` are secured, if at all.
    fn host_tls(&self, e: &EndpointConfig) -> Option<HostTls> {
        self.config.tls_for(e).map(|tls| HostTls {
            connect: self.host_sni(&tls, e).map(|sni| {
                Arc::new(crate::tls::upstream::TlsConnect {
                    tls: tls.clone(),
                    sni,
                    timeout: self.config.connect_timeout,
                    keepalive: self.config.tcp_keepalive,
                    bind: self.config.bind,
                })
            }),
            tls,
        })
    }

    /// A host's SNI when it is fixed per host (the context's `sni`, or with
    /// `auto_host_sni` the endpoint's hostname); None when each request
    /// picks it (`auto_sni`). The inner None: no SNI.
    fn host_sni(
        &self,
        tls: &crate::config::tls::ClientTls,
        e: &EndpointConfig,
    ) -> Option<Option<String>> {
        use crate::config::tls::SniFrom;
        let fixed = Some(tls.sni.clone()).filter(|s| !s.is_empty());
        match &tls.sni_from {
            SniFrom::Fixed => Some(fixed),
            SniFrom::EndpointHostname => {
                let named = [e.hostname.as_str(), e.host.as_str()]
                    .into_iter()
                    .find(|h| !h.is_empty() && h.parse::<std::net::IpAddr>().is_err());
                Some(named.map(str::to_string).or(fixed))
            }
            SniFrom::Request { .. } => None,
        }
    }

    /// Publishes a new host set: (priority, [(endpoint, its addresses)]).
    pub fn set_hosts(&self, resolved: ResolvedHosts) {
        self.publish(resolved, self.config.overprovisioning_factor);
    }

    /// Records an upstream attempt's outcome for outlier detection; an
    /// ejection publishes the host set again without the host.
    pub fn report(&self, addr: SocketAddr, outcome: crate::outlier::Outcome) {
        let Some(d) = &self.outlier else { return };
        if d.report(addr, outcome, std::time::Instant::now()) {
            self.republish();
        }
    }

    /// Outlier detection's interval work; publishes again when a host came
    /// back or left.
    pub fn outlier_tick(&self) {
        let Some(d) = &self.outlier else { return };
        if d.tick(std::time::Instant::now()) {
            self.republish();
        }
    }

    /// Publishes the host set again (a host's health changed).
    pub fn republish(&self) {
        let _g = self.publishing.lock().unwrap_or_else(|e| e.into_inner());
        let last = self.last_published.lock().unwrap().clone();
        if let Some((resolved, overprovisioning)) = last {
            self.publish_locked(resolved, overprovisioning);
        }
    }

    fn publish(&self, resolved: Resolved, overprovisioning: u32) {
        let _g = self.publishing.lock().unwrap_or_else(|e| e.into_inner());
        self.publish_locked(resolved, overprovisioning);
    }

    /// Publishes with `publishing` held.
    fn publish_locked(&self, resolved: Resolved, overprovisioning: u32) {
        if let Some(d) = &self.outlier {
            let addrs: Vec<SocketAddr> = resolved
                .iter()
                .flat_map(|(_, eps)| eps.iter().flat_map(|(_, a)| a.iter().copied()))
                .collect();
            d.set_hosts(&addrs);
        }
        if let Some(h) = &self.health {
            h.set_hosts(self.health_targets(&resolved));
        }
        if self.outlier.is_some() || self.health.is_some() {
            *self.last_published.lock().unwrap() = Some((resolved.clone(), overprovisioning));
        }
        let max_p = resolved
            .iter()
            .map(|(p, _)| *p as usize + 1)
            .max()
            .unwrap_or(0);
        let mut by_priority: Vec<Vec<Arc<UpstreamHost>>> = vec![Vec::new(); max_p];
        let mut cells = self.cells.lock().unwrap();
        let mut live = HashMap::new();
        // Each entry is one locality: its index among its priority's.
        let mut localities = vec![0u32; max_p];
        for (p, eps) in resolved {
            let locality = localities[p as usize];
            localities[p as usize] += 1;
            for (e, addrs) in eps {
                for addr in addrs {
                    let cell = cells.get(&addr).cloned().unwrap_or_default();
                    live.insert(addr, cell.clone());
                    by_priority[p as usize].push(Arc::new(UpstreamHost {
                        istio_workload: e.istio_workload.clone(),
                        addr,
                        hash_key: e.hash_key.clone().unwrap_or_else(|| addr.to_string()),
                        // Envoy's host name: the endpoint's `hostname`, else the DNS
                        // name it was resolved from; a STATIC IP has none.
                        hostname: if !e.hostname.is_empty() {
                            e.hostname.clone()
                        } else if matches!(
                            self.config.discovery,
                            Discovery::StrictDns | Discovery::LogicalDns
                        ) {
                            e.host.clone()
                        } else {
                            String::new()
                        },
                        weight: e.weight,
                        // An ejected host, or one failing active checks, is
                        // unhealthy (not excluded), as in Envoy: it still
                        // counts toward panic mode.
                        healthy: e.healthy
                            && !self.outlier.as_ref().is_some_and(|d| d.is_ejected(&addr))
                            && !self.health.as_ref().is_some_and(|h| h.failed(&addr)),
                        degraded: e.degraded
                            || self.health.as_ref().is_some_and(|h| h.degraded(&addr)),
                        locality,
                        locality_weight: e.locality_weight,
                        active_requests: cell,
                        tls: self.host_tls(&e),
                    }));
                }
            }
        }
        *cells = live;
        let snap = HostSnapshot::build_spread(
            &self.config.lb,
            self.config.spread(),
            by_priority,
            overprovisioning,
        );
        self.stats.membership_total.set(snap.all_hosts.len() as f64);
        self.stats
            .membership_healthy
            .set(snap.all_hosts.iter().filter(|h| h.healthy).count() as f64);
        self.snapshot.store(Arc::new(snap));
    }

    /// Resolves DNS endpoints once and publishes them. With
    /// `respect_dns_ttl`, returns when to resolve again: the shortest TTL
    /// of the answers, not below `dns_min_refresh_rate`.
    pub async fn resolve(&self) -> Option<std::time::Duration> {
        let mut resolved = Vec::new();
        let mut ttl: Option<std::time::Duration> = None;
        for l in &self.config.localities {
            let mut eps = Vec::new();
            for e in &l.endpoints {
                let mut addrs = match &self.dns {
                    Some(r) => {
                        let (a, t) = resolve_with(r, &e.host, e.port, self.config.dns_family).await;
                        if let Some(t) = t {
                            ttl = Some(ttl.map_or(t, |x| x.min(t)));
                        }
                        a
                    }
                    None => resolve_host(&e.host, e.port, self.config.dns_family).await,
                };
                let key = (e.host.clone(), e.port);
                if addrs.is_empty() {
                    // As Envoy: a failed resolution keeps the last good hosts.
                    addrs = self
                        .last_resolved
                        .lock()
                        .unwrap()
                        .get(&key)
                        .cloned()
                        .unwrap_or_default();
                    tracing::warn!(cluster = %self.config.name, host = %e.host, kept = addrs.len(), "DNS resolution failed; keeping the previous addresses");
                } else {
                    self.last_resolved
                        .lock()
                        .unwrap()
                        .insert(key, addrs.clone());
                }
                let addrs = if self.config.discovery == Discovery::LogicalDns {
                    addrs.into_iter().take(1).collect()
                } else {
                    addrs
                };
                eps.push((e.clone(), addrs));
            }
            resolved.push((l.priority, eps));
        }
        self.set_hosts(resolved);
        let d = &self.config.dns;
        ttl.filter(|t| d.respect_ttl && !t.is_zero())
            .map(|t| t.max(d.min_refresh))
    }
}

/// A DNS client for `settings`, when the system resolver will not do: the
/// configured name servers, else the system's (`/etc/resolv.conf`), with
/// `/etc/hosts` first.
fn dns_client(
    settings: &crate::config::cluster::DnsSettings,
) -> Option<hickory_resolver::TokioResolver> {
    use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
    use hickory_resolver::name_server::TokioConnectionProvider;
    use hickory_resolver::proto::xfer::Protocol;
    if !settings.needs_dns_client() {
        return None;
    }
    let mut builder = if settings.resolvers.is_empty() {
        hickory_resolver::Resolver::builder_tokio().ok()?
    } else {
        let mut config = ResolverConfig::new();
        for a in &settings.resolvers {
            config.add_name_server(NameServerConfig::new(*a, Protocol::Udp));
            config.add_name_server(NameServerConfig::new(*a, Protocol::Tcp));
        }
        hickory_resolver::Resolver::builder_with_config(config, TokioConnectionProvider::default())
    };
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
    // Every resolution asks again: a cached answer would hide the TTL the
    // server gives now.
    opts.cache_size = 0;
    Some(builder.build())
}

/// Resolves with the DNS client: the addresses (filtered as
/// [`resolve_host`] filters them) and the answer's remaining TTL.
pub async fn resolve_with(
    r: &hickory_resolver::TokioResolver,
    host: &str,
    port: u16,
    family: DnsFamily,
) -> (Vec<SocketAddr>, Option<std::time::Duration>) {
    match r.lookup_ip(host).await {
        Ok(l) => {
            let ttl = l
                .valid_until()
                .saturating_duration_since(std::time::Instant::now());
            let all: Vec<SocketAddr> = l.iter().map(|ip| SocketAddr::new(ip, port)).collect();
            (by_family(all, family), Some(ttl))
        }
        Err(e) => {
            tracing::warn!(%host, error = %e, "DNS lookup failed");
            (Vec::new(), None)
        }
    }
}

/// Resolves with the system resolver (so /etc/hosts and `localhost` work
/// offline), filtered by Envoy's `dns_lookup_family`.
pub async fn resolve_host(host: &str, port: u16, family: DnsFamily) -> Vec<SocketAddr> {
    // An IP literal is its own answer, whatever the family (Envoy's
    // resolver returns it without a lookup): a V6_ONLY cluster may name
    // 127.0.0.1.
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return vec![SocketAddr::new(ip, port)];
    }
    let all: Vec<SocketAddr> = match tokio::net::lookup_host((host, port)).await {
        Ok(it) => it.collect(),
        Err(e) => {
            tracing::warn!(%host, error = %e, "DNS lookup failed");
            return Vec::new();
        }
    };
    by_family(all, family)
}

/// Envoy's `dns_lookup_family` over the addresses found.
fn by_family(all: Vec<SocketAddr>, family: DnsFamily) -> Vec<SocketAddr> {
    let v4: Vec<_> = all.iter().copied().filter(SocketAddr::is_ipv4).collect();
    let v6: Vec<_> = all.iter().copied().filter(SocketAddr::is_ipv6).collect();
    let mut out = match family {
        DnsFamily::V4Only => v4,
        DnsFamily::V6Only => v6,
        DnsFamily::Auto => {
            if v6.is_empty() {
                v4
            } else {
                v6
            }
        }
        DnsFamily::V4Preferred => {
            if v4.is_empty() {
                v6
            } else {
                v4
            }
        }
        DnsFamily::All => all,
    };
    out.dedup();
    out
}

/// Runs a cluster's outlier detection interval for as long as the cluster
/// lives (off the request path, once per cluster).
fn outlier_ticks(c: &Arc<Cluster>) {
    let Some(every) = c.outlier.as_ref().map(|d| d.interval()) else {
        return;
    };
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let weak = Arc::downgrade(c);
    rt.spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(c) = weak.upgrade() else { break };
            c.outlier_tick();
        }
    });
}

/// All clusters, swapped as a whole when the set changes.
#[derive(Default)]
pub struct ClusterManager {
    clusters: ArcSwap<HashMap<String, Arc<Cluster>>>,
}

impl ClusterManager {
    /// Builds the clusters, resolving DNS ones before returning (Envoy's
    /// init waits for their first resolution), then refreshes them.
    pub async fn start(configs: &[Arc<ClusterConfig>]) -> Arc<Self> {
        let mut map = HashMap::new();
        for c in configs {
            let cluster = Self::build(c.clone()).await;
            outlier_ticks(&cluster);
            map.insert(c.name.clone(), cluster);
        }
        stats::gauge("cluster_manager.active_clusters".into()).set(map.len() as f64);
        Arc::new(Self {
            clusters: ArcSwap::from_pointee(map),
        })
    }

    /// A runtime cluster; a DNS one is resolved once before it is returned
    /// and then refreshed every `dns_refresh_rate` while it exists.
    pub async fn build(c: Arc<ClusterConfig>) -> Arc<Cluster> {
        let cluster = Arc::new(Cluster::new(c.clone()));
        if let Some(h) = &cluster.health {
            h.start(Arc::downgrade(&cluster));
        }
        if matches!(c.discovery, Discovery::StrictDns | Discovery::LogicalDns) {
            let weak = Arc::downgrade(&cluster);
            let (every, jitter) = (c.dns_refresh, c.dns_jitter.as_millis() as u64);
            let mut next = cluster.resolve().await.unwrap_or(every);
            tokio::spawn(async move {
                loop {
                    let extra = rand::random::<u64>() % (jitter + 1);
                    tokio::time::sleep(next + std::time::Duration::from_millis(extra)).await;
                    let Some(c) = weak.upgrade() else { break };
                    next = c.resolve().await.unwrap_or(every);
                }
            });
        }
        // Envoy's cluster initialisation waits for the first round of
        // active checks.
        if let Some(h) = &cluster.health {
            h.first_round().await;
        }
        cluster
    }

    /// Adds or replaces a cluster. Requests already holding the old one
    /// finish on it.
    pub fn insert(&self, cluster: Arc<Cluster>) {
        self.update(vec![cluster], &[]);
    }

    pub fn remove(&self, name: &str) -> bool {
        let found = self.clusters.load().contains_key(name);
        self.update(Vec::new(), &[name.to_string()]);
        found
    }

    /// Adds, replaces and removes clusters in one swap (one copy of the
    /// table however many change: CDS pushes thousands at once).
    pub fn update(&self, add: Vec<Arc<Cluster>>, remove: &[String]) {
        if add.is_empty() && remove.is_empty() {
            return;
        }
        for c in add.iter().filter(|c| c.outlier.is_some()) {
            outlier_ticks(c);
        }
        self.clusters.rcu(|m| {
            let mut m = HashMap::clone(m);
            for n in remove {
                m.remove(n);
            }
            for c in &add {
                m.insert(c.config.name.clone(), c.clone());
            }
            m
        });
        stats::gauge("cluster_manager.active_clusters".into())
            .set(self.clusters.load().len() as f64);
    }

    pub fn get(&self, name: &str) -> Option<Arc<Cluster>> {
        self.clusters.load().get(name).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Cluster>> {
        let mut v: Vec<_> = self.clusters.load().values().cloned().collect();
        v.sort_by(|a, b| a.config.name.cmp(&b.config.name));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ip_literals_resolve_to_themselves_whatever_the_family() {
        let v4: SocketAddr = "127.0.0.1:80".parse().unwrap();
        assert_eq!(
            resolve_host("127.0.0.1", 80, DnsFamily::V6Only).await,
            vec![v4]
        );
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        assert_eq!(resolve_host("::1", 80, DnsFamily::V4Only).await, vec![v6]);
    }

    #[test]
    fn priority_load_spills_over() {
        let h = |c: &[PriorityCounts]| priority_loads(c, 140).healthy;
        assert_eq!(h(&[(4, 0, 4), (4, 0, 4)]), vec![100, 0]);
        // 2/4 healthy * 1.4 = 70 % to P0, 30 % spills to P1.
        assert_eq!(h(&[(2, 0, 4), (4, 0, 4)]), vec![70, 30]);
        assert_eq!(h(&[(0, 0, 0), (1, 0, 1)]), vec![0, 100]);
    }

    #[test]
    fn panic_follows_envoy() {
        // Total availability 100: no priority panics, even a weak P0.
        let l = priority_loads(&[(1, 0, 3), (3, 0, 3)], 140);
        assert_eq!((l.healthy, l.panic), (vec![46, 54], vec![false, false]));
        // Every priority in panic: the load follows host counts.
        assert_eq!(
            priority_loads(&[(1, 0, 4), (0, 0, 4)], 140).healthy,
            vec![50, 50]
        );
        assert_eq!(
            priority_loads(&[(0, 0, 4), (0, 0, 2)], 140).healthy,
            vec![67, 33]
        );
        // One priority in panic while the total (28 + 70) is below 100.
        let l = priority_loads(&[(1, 0, 5), (1, 0, 2)], 140);
        assert_eq!(l.panic, vec![true, false]);
    }

    #[test]
    fn ipv6_static_endpoints_are_hosts() {
        use legate_proto::envoy_types::pb::envoy::config::cluster::v3::Cluster as Pb;
        let v = serde_json::json!({"name": "v6", "load_assignment": {"cluster_name": "v6", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "::1", "port_value": 8080}}}}]}]}});
        let pb: Pb =
            legate_proto::json::to_message(v, "envoy.config.cluster.v3.Cluster", true).unwrap();
        let c = Cluster::new(Arc::new(ClusterConfig::from_proto(&pb, "c").unwrap()));
        assert_eq!(
            c.snapshot().all_hosts[0].addr,
            "[::1]:8080".parse().unwrap()
        );
    }

    #[test]
    fn degraded_hosts_take_only_what_healthy_ones_cannot() {
        let hd = |c: &[PriorityCounts]| {
            let l = priority_loads(c, 140);
            (l.healthy, l.degraded)
        };
        // P0 all degraded, P1 healthy: everything goes to P1's healthy hosts.
        assert_eq!(hd(&[(0, 3, 3), (3, 0, 3)]), (vec![0, 100], vec![0, 0]));
        // Only degraded hosts anywhere: they take the load.
        assert_eq!(hd(&[(0, 3, 3)]), (vec![0], vec![100]));
        // 1 of 4 healthy (35 %) and 3 of 4 degraded in one priority.
        assert_eq!(hd(&[(1, 3, 4)]), (vec![35], vec![65]));
    }

    fn host(port: u16, healthy: bool) -> Arc<UpstreamHost> {
        Arc::new(UpstreamHost {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            hash_key: format!("127.0.0.1:{port}"),
            degraded: false,
            hostname: String::new(),
            weight: 1,
            healthy,
            locality: 0,
            locality_weight: 0,
            active_requests: Default::default(),
            tls: None,
            istio_workload: None,
        })
    }

    #[test]
    fn previous_priorities_leave_attempted_priorities_out() {
        let snap = HostSnapshot::build(
            &lb::LbPolicy::RoundRobin,
            vec![
                vec![host(1, true), host(2, true)],
                vec![host(3, true), host(4, false)],
                vec![host(5, true)],
            ],
            140,
        );
        assert_eq!(
            snap.priority_of(SocketAddr::from(([127, 0, 0, 1], 4))),
            Some(1)
        );
        // P0 out: P1 has 70 % availability, P2 100 %: 70 and 30 of 100.
        let (h, _) = snap.loads_without(&[true]).unwrap();
        assert_eq!(h, vec![0, 70, 30]);
        let (h, _) = snap.loads_without(&[true, false, true]).unwrap();
        assert_eq!(h, vec![0, 100, 0]);
        assert!(snap.loads_without(&[true, true, true]).is_none());
        // A pick follows the loads given.
        let p = snap
            .pick_with(
                None,
                5,
                &|_| false,
                None,
                Some(&(vec![0, 0, 100], vec![0, 0, 0])),
            )
            .unwrap();
        assert_eq!(p.addr.port(), 5);
    }

    #[test]
    fn effective_shares_are_what_picks_do() {
        let weighted = |port: u16, healthy: bool, weight: u32| {
            let mut h = Arc::try_unwrap(host(port, healthy)).unwrap();
            h.weight = weight;
            Arc::new(h)
        };
        // P0: 2 of 4 healthy (70 % at overprovisioning 1.4), weights 1:3;
        // P1 takes the 30 % that spills over.
        // Round robin honours weights (Envoy's RANDOM does not).
        let snap = HostSnapshot::build(
            &lb::LbPolicy::RoundRobin,
            vec![
                vec![
                    weighted(1, true, 1),
                    weighted(2, true, 3),
                    host(3, false),
                    host(4, false),
                ],
                vec![weighted(5, true, 2)],
            ],
            140,
        );
        let shares: HashMap<u16, f64> = snap
            .effective_shares()
            .into_iter()
            .map(|(a, s)| (a.port(), s))
            .collect();
        assert_eq!(shares.len(), 3);
        for (port, want) in [(1, 0.175), (2, 0.525), (5, 0.3)] {
            assert!(
                (shares[&port] - want).abs() < 1e-9,
                "{port}: {}",
                shares[&port]
            );
        }
        // And the userspace picker spreads picks the same way.
        let mut seen: HashMap<u16, u32> = HashMap::new();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let n = 200_000;
        for _ in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let h = snap.pick(None, x, &|_| false, None).unwrap();
            *seen.entry(h.addr.port()).or_default() += 1;
        }
        for (port, share) in &shares {
            let got = f64::from(seen[port]) / f64::from(n);
            assert!(
                (got - share).abs() < 0.01,
                "{port}: picked {got:.3}, share {share:.3}"
            );
        }
        // In panic every host of the priority shares its load.
        let panic = HostSnapshot::build(
            &lb::LbPolicy::Random,
            vec![vec![host(1, true), host(2, false), host(3, false)]],
            140,
        );
        let s = panic.effective_shares();
        assert_eq!(s.len(), 3);
        assert!(s.iter().all(|(_, v)| (v - 1.0 / 3.0).abs() < 1e-9));
    }

    #[test]
    fn unhealthy_hosts_are_skipped_unless_panicking() {
        let snap = HostSnapshot::build(
            &lb::LbPolicy::RoundRobin,
            vec![vec![host(1, true), host(2, true), host(3, false)]],
            140,
        );
        for r in 0..30u64 {
            assert_ne!(
                snap.pick(None, r * 7919, &|_| false, None)
                    .unwrap()
                    .addr
                    .port(),
                3
            );
        }
        let panic = HostSnapshot::build(
            &lb::LbPolicy::RoundRobin,
            vec![vec![host(1, true), host(2, false), host(3, false)]],
            140,
        );
        let ports: std::collections::HashSet<_> = (0..60u64)
            .map(|r| {
                panic
                    .pick(None, r * 7919, &|_| false, None)
                    .unwrap()
                    .addr
                    .port()
            })
            .collect();
        assert_eq!(ports.len(), 3, "panic mode balances over all hosts");
    }

    fn in_locality(port: u16, healthy: bool, locality: u32, weight: u32) -> Arc<UpstreamHost> {
        let mut h = Arc::try_unwrap(host(port, healthy)).unwrap();
        h.locality = locality;
        h.locality_weight = weight;
        Arc::new(h)
    }

    fn pick_counts(snap: &HostSnapshot, n: usize) -> HashMap<u16, usize> {
        let mut counts = HashMap::new();
        for i in 0..n {
            if let Some(h) = snap.pick(None, i as u64 * 7919, &|_| false, None) {
                *counts.entry(h.addr.port()).or_insert(0) += 1;
            }
        }
        counts
    }

    #[test]
    fn locality_weights_split_picks_by_their_effective_weight() {
        let weighted = Spread {
            locality_weighted: true,
            ..Default::default()
        };
        // Locality 0 (weight 1) has one host, locality 1 (weight 3) two:
        // 1:3 between localities, whatever their host counts.
        let hosts = vec![
            in_locality(1, true, 0, 1),
            in_locality(2, true, 1, 3),
            in_locality(3, true, 1, 3),
        ];
        let snap = HostSnapshot::build_spread(
            &lb::LbPolicy::RoundRobin,
            weighted,
            vec![hosts.clone()],
            140,
        );
        let c = pick_counts(&snap, 400);
        assert_eq!(c[&1], 100, "EDF gives locality 0 exactly a quarter: {c:?}");
        assert_eq!(c[&2] + c[&3], 300);
        let shares: HashMap<u16, f64> = snap
            .effective_shares()
            .into_iter()
            .map(|(a, s)| (a.port(), s))
            .collect();
        assert!((shares[&1] - 0.25).abs() < 1e-9, "{shares:?}");
        // Without locality weighting the three hosts share evenly.
        let flat = HostSnapshot::build(&lb::LbPolicy::RoundRobin, vec![hosts], 140);
        assert_eq!(pick_counts(&flat, 300)[&1], 100);
        // A locality with half its hosts down keeps 70 % of its weight
        // (overprovisioning 1.4 x 1/2): 1 : 3 x 0.7.
        let hosts = vec![
            in_locality(1, true, 0, 1),
            in_locality(2, true, 1, 3),
            in_locality(3, false, 1, 3),
        ];
        let snap =
            HostSnapshot::build_spread(&lb::LbPolicy::RoundRobin, weighted, vec![hosts], 140);
        let c = pick_counts(&snap, 310);
        assert_eq!((c[&1], c[&2]), (100, 210), "{c:?}");
        // No locality weights at all (EDS sent none): Envoy ignores them.
        let hosts = vec![in_locality(1, true, 0, 0), in_locality(2, true, 1, 0)];
        let snap =
            HostSnapshot::build_spread(&lb::LbPolicy::RoundRobin, weighted, vec![hosts], 140);
        assert_eq!(pick_counts(&snap, 100).len(), 2);
    }

    #[test]
    fn a_panic_threshold_of_zero_never_panics() {
        let hosts = vec![
            host(1, false),
            host(2, false),
            host(3, true),
            host(4, false),
        ];
        let spread = |t| Spread {
            panic_threshold: t,
            ..Default::default()
        };
        // 1 of 4 healthy is under 50 %: panic, all four take traffic.
        let panic = HostSnapshot::build_spread(
            &lb::LbPolicy::RoundRobin,
            spread(50),
            vec![hosts.clone()],
            140,
        );
        assert_eq!(pick_counts(&panic, 100).len(), 4);
        // Threshold 20: 25 % healthy is enough; only the healthy host.
        let calm = HostSnapshot::build_spread(
            &lb::LbPolicy::RoundRobin,
            spread(20),
            vec![hosts.clone()],
            140,
        );
        assert_eq!(pick_counts(&calm, 100).keys().collect::<Vec<_>>(), vec![&3]);
        // Threshold 0 with no healthy host: no panic, so no host at all.
        let none = vec![host(1, false), host(2, false)];
        let off = HostSnapshot::build_spread(&lb::LbPolicy::RoundRobin, spread(0), vec![none], 140);
        assert!(off.pick(None, 1, &|_| false, None).is_none());
    }
}
