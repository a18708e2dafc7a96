//! `envoy.filters.http.fault`: injected delays and aborts, fixed or chosen
//! by the request's `x-envoy-fault-*` headers, for a share of requests.
//! The most specific per-route `HTTPFault` replaces the filter's config
//! whole, as Envoy's does (Istio sends its faults that way). A delay comes
//! first; an abort may follow it.

use super::{Factory, FilterReply, Flow, HttpFilter, PerRoute, RequestInfo, State};
use crate::config::matcher::HeaderMatcher;
use crate::config::{index, join, ConfigError, Result, Wrapped};
use crate::registry::MessageSupport;
use legate_proto::envoy_types::pb::envoy::extensions::filters::common::fault::v3 as common;
use legate_proto::envoy_types::pb::envoy::extensions::filters::http::fault::v3 as pb;
use legate_proto::envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use legate_proto::envoy_types::pb::google::protobuf::Any;
use metrics::{Counter, Gauge};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

const TYPE: &str = "envoy.extensions.filters.http.fault.v3.HTTPFault";

pub static FACTORY: Factory = Factory {
    type_name: TYPE,
    build,
    per_route: &[(TYPE, per_route)],
};

pub static REGISTRY: &[MessageSupport] = &[
    MessageSupport {
        message: TYPE,
        supported: &[
            "delay",
            "abort",
            "upstream_cluster",
            "headers",
            "downstream_nodes",
            "max_active_faults",
            "delay_percent_runtime",
            "abort_percent_runtime",
            "delay_duration_runtime",
            "abort_http_status_runtime",
            "max_active_faults_runtime",
            "abort_grpc_status_runtime",
            "disable_downstream_cluster_stats",
        ],
        warn: &[(
            "filter_metadata",
            "only read by access loggers, which Legate's formatters do not yet expose",
        )],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.fault.v3.FaultAbort",
        supported: &["http_status", "grpc_status", "header_abort", "percentage"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.fault.v3.FaultAbort.HeaderAbort",
        supported: &[],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.common.fault.v3.FaultDelay",
        supported: &["fixed_delay", "header_delay", "percentage"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.common.fault.v3.FaultDelay.HeaderDelay",
        supported: &[],
        warn: &[],
    },
];

const DELAY_HEADER: &str = "x-envoy-fault-delay-request";
const DELAY_PERCENT_HEADER: &str = "x-envoy-fault-delay-request-percentage";
const ABORT_HEADER: &str = "x-envoy-fault-abort-request";
const ABORT_GRPC_HEADER: &str = "x-envoy-fault-abort-grpc-request";
const ABORT_PERCENT_HEADER: &str = "x-envoy-fault-abort-request-percentage";

#[derive(Debug, Clone)]
enum DelayKind {
    Fixed(Duration),
    /// From `x-envoy-fault-delay-request` (milliseconds).
    Header,
}

#[derive(Debug, Clone)]
enum AbortKind {
    Http(u32),
    Grpc(u32),
    /// From `x-envoy-fault-abort-request` or `-grpc-request`.
    Header,
}

/// One fault config: the filter's or a route's.
#[derive(Debug)]
pub struct Settings {
    delay: Option<(DelayKind, FractionalPercent)>,
    abort: Option<(AbortKind, FractionalPercent)>,
    upstream_cluster: String,
    headers: Vec<HeaderMatcher>,
    downstream_nodes: Vec<String>,
    max_active: Option<u64>,
    keys: RuntimeKeys,
    downstream_cluster_stats: bool,
}

#[derive(Debug)]
struct RuntimeKeys {
    delay_percent: String,
    abort_percent: String,
    delay_duration: String,
    abort_http_status: String,
    abort_grpc_status: String,
    max_active: String,
}

fn key(k: &str, default: &str) -> String {
    if k.is_empty() {
        default.to_string()
    } else {
        k.to_string()
    }
}

impl Settings {
    pub fn from_proto(f: &pb::HttpFault, path: &str) -> Result<Self> {
        if f.response_rate_limit.is_some() {
            return Err(ConfigError::new(
                join(path, "response_rate_limit"),
                "response rate limits are not supported",
            ));
        }
        let delay = f
            .delay
            .as_ref()
            .map(|d| delay(d, &join(path, "delay")))
            .transpose()?;
        let abort = f
            .abort
            .as_ref()
            .map(|a| abort(a, &join(path, "abort")))
            .transpose()?;
        let headers = f
            .headers
            .iter()
            .enumerate()
            .map(|(i, h)| HeaderMatcher::from_proto(h, &index(path, "headers", i)))
            .collect::<Result<_>>()?;
        Ok(Self {
            delay,
            abort,
            upstream_cluster: f.upstream_cluster.clone(),
            headers,
            downstream_nodes: f.downstream_nodes.clone(),
            max_active: f.max_active_faults.val().map(u64::from),
            keys: RuntimeKeys {
                delay_percent: key(
                    &f.delay_percent_runtime,
                    "fault.http.delay.fixed_delay_percent",
                ),
                abort_percent: key(&f.abort_percent_runtime, "fault.http.abort.abort_percent"),
                delay_duration: key(
                    &f.delay_duration_runtime,
                    "fault.http.delay.fixed_duration_ms",
                ),
                abort_http_status: key(
                    &f.abort_http_status_runtime,
                    "fault.http.abort.http_status",
                ),
                abort_grpc_status: key(
                    &f.abort_grpc_status_runtime,
                    "fault.http.abort.grpc_status",
                ),
                max_active: key(&f.max_active_faults_runtime, "fault.http.max_active_faults"),
            },
            downstream_cluster_stats: !f.disable_downstream_cluster_stats,
        })
    }
}

fn delay(d: &common::FaultDelay, path: &str) -> Result<(DelayKind, FractionalPercent)> {
    use common::fault_delay::FaultDelaySecifier as S;
    let kind = match &d.fault_delay_secifier {
        Some(S::FixedDelay(t)) => {
            let t = crate::config::duration(t, &join(path, "fixed_delay"))?;
            if t.is_zero() {
                return Err(ConfigError::new(
                    join(path, "fixed_delay"),
                    "must be greater than 0",
                ));
            }
            DelayKind::Fixed(t)
        }
        Some(S::HeaderDelay(_)) => DelayKind::Header,
        None => {
            return Err(ConfigError::new(
                path,
                "one of fixed_delay or header_delay is required",
            ))
        }
    };
    Ok((kind, d.percentage.unwrap_or_default()))
}

fn abort(a: &pb::FaultAbort, path: &str) -> Result<(AbortKind, FractionalPercent)> {
    use pb::fault_abort::ErrorType as E;
    let kind = match &a.error_type {
        Some(E::HttpStatus(s)) => {
            if !(200..600).contains(s) {
                return Err(ConfigError::new(
                    join(path, "http_status"),
                    format!("{s} is not in [200, 600)"),
                ));
            }
            AbortKind::Http(*s)
        }
        Some(E::GrpcStatus(s)) => AbortKind::Grpc(*s),
        Some(E::HeaderAbort(_)) => AbortKind::Header,
        None => {
            return Err(ConfigError::new(
                path,
                "one of http_status, grpc_status or header_abort is required",
            ))
        }
    };
    if !a.response_body.is_empty() {
        return Err(ConfigError::new(
            join(path, "response_body"),
            "a custom abort body is not supported",
        ));
    }
    Ok((kind, a.percentage.unwrap_or_default()))
}

/// The filter's stats (`http.<prefix>.fault.*`), made on first use.
#[derive(Debug)]
struct Stats {
    delays_injected: Counter,
    aborts_injected: Counter,
    faults_overflow: Counter,
    active_faults: Gauge,
}

#[derive(Debug)]
pub struct Fault {
    settings: Settings,
    prefix: String,
    stats: OnceLock<Stats>,
    /// Requests with a fault in progress (Envoy's `active_faults`).
    active: Arc<AtomicU64>,
}

impl Fault {
    fn stats(&self) -> &Stats {
        self.stats.get_or_init(|| {
            let c = |n: &str| crate::stats::counter(format!("{}{n}", self.prefix));
            Stats {
                delays_injected: c("delays_injected"),
                aborts_injected: c("aborts_injected"),
                faults_overflow: c("faults_overflow"),
                active_faults: crate::stats::gauge(format!("{}active_faults", self.prefix)),
            }
        })
    }

    fn downstream_stat(&self, cluster: &str, name: &str) {
        crate::stats::counter(format!("{}{cluster}.{name}", self.prefix)).increment(1);
    }
}

/// While alive, the request counts as an active fault.
struct ActiveFault {
    active: Arc<AtomicU64>,
    gauge: Gauge,
}

impl Drop for ActiveFault {
    fn drop(&mut self) {
        let now = self.active.fetch_sub(1, Ordering::Relaxed) - 1;
        self.gauge.set(now as f64);
    }
}

fn header<'a>(rq: &'a RequestInfo<'_>, name: &str) -> Option<&'a str> {
    rq.req.headers.get(name).and_then(|v| v.to_str().ok())
}

/// A share from a header (`x-envoy-fault-*-percentage`): its numerator,
/// capped at the configured one, over the configured denominator.
fn header_share(rq: &RequestInfo<'_>, name: &str, p: &FractionalPercent) -> FractionalPercent {
    match header(rq, name).and_then(|v| v.parse::<u32>().ok()) {
        Some(n) => FractionalPercent {
            numerator: n.min(p.numerator),
            denominator: p.denominator,
        },
        None => *p,
    }
}

fn enabled(rq: &RequestInfo<'_>, key: &str, p: &FractionalPercent) -> bool {
    super::roll(
        rq.runtime
            .fraction_per_million(key, crate::runtime::per_million(p)),
    )
}

fn runtime_int(rq: &RequestInfo<'_>, key: &str, default: u64) -> u64 {
    rq.runtime
        .get(key)
        .and_then(|v| v.as_u64())
        .unwrap_or(default)
}

impl Settings {
    /// Whether this request is subject to the fault at all.
    fn applies(&self, rq: &RequestInfo<'_>) -> bool {
        if !self.upstream_cluster.is_empty() && rq.cluster != Some(self.upstream_cluster.as_str()) {
            return false;
        }
        if !self.downstream_nodes.is_empty() {
            let Some(node) = header(rq, "x-envoy-downstream-service-node") else {
                return false;
            };
            if !self.downstream_nodes.iter().any(|n| n == node) {
                return false;
            }
        }
        self.headers.iter().all(|m| m.matches(&rq.req.headers))
    }

    fn delay_for(&self, rq: &RequestInfo<'_>) -> Option<Duration> {
        let (kind, pct) = self.delay.as_ref()?;
        let share = match kind {
            DelayKind::Header => header_share(rq, DELAY_PERCENT_HEADER, pct),
            DelayKind::Fixed(_) => *pct,
        };
        if !enabled(rq, &self.keys.delay_percent, &share) {
            return None;
        }
        let configured = match kind {
            DelayKind::Fixed(d) => *d,
            DelayKind::Header => {
                Duration::from_millis(header(rq, DELAY_HEADER)?.parse::<u64>().ok()?)
            }
        };
        let ms = runtime_int(rq, &self.keys.delay_duration, configured.as_millis() as u64);
        (ms > 0).then(|| Duration::from_millis(ms))
    }

    /// The abort's (HTTP status, gRPC status), if this request is aborted.
    fn abort_for(&self, rq: &RequestInfo<'_>) -> Option<(u16, Option<u32>)> {
        let (kind, pct) = self.abort.as_ref()?;
        let (http, grpc) = match kind {
            AbortKind::Http(s) => (Some(*s as u64), None),
            AbortKind::Grpc(g) => (None, Some(*g as u64)),
            AbortKind::Header => {
                let http = header(rq, ABORT_HEADER)
                    .and_then(|v| v.parse::<u64>().ok())
                    .filter(|s| (200..600).contains(s));
                let grpc = header(rq, ABORT_GRPC_HEADER).and_then(|v| v.parse::<u64>().ok());
                (http, grpc)
            }
        };
        if http.is_none() && grpc.is_none() {
            return None;
        }
        let share = match kind {
            AbortKind::Header => header_share(rq, ABORT_PERCENT_HEADER, pct),
            _ => *pct,
        };
        if !enabled(rq, &self.keys.abort_percent, &share) {
            return None;
        }
        let http = http.map(|s| runtime_int(rq, &self.keys.abort_http_status, s));
        let grpc = grpc.map(|g| runtime_int(rq, &self.keys.abort_grpc_status, g) as u32);
        // A gRPC abort answers with Envoy's gRPC local reply (HTTP 200 and
        // the status in grpc-status); a plain HTTP client gets a 200 too,
        // with the abort's body, as from Envoy.
        let status = http.and_then(|s| u16::try_from(s).ok()).unwrap_or(200);
        Some((status, grpc))
    }
}

#[async_trait::async_trait]
impl HttpFilter for Fault {
    async fn on_request(&self, rq: &mut RequestInfo<'_>, state: &mut Option<State>) -> Flow {
        let route: Option<Arc<Settings>> = rq.all_levels::<Settings>().next();
        let settings = route.as_deref().unwrap_or(&self.settings);
        let max = runtime_int(
            rq,
            &settings.keys.max_active,
            settings.max_active.unwrap_or(u64::MAX),
        );
        if self.active.load(Ordering::Relaxed) >= max {
            self.stats().faults_overflow.increment(1);
            return Flow::Continue;
        }
        if !settings.applies(rq) {
            return Flow::Continue;
        }
        let downstream = header(rq, "x-envoy-downstream-service-cluster")
            .filter(|c| !c.is_empty() && settings.downstream_cluster_stats)
            .map(str::to_string);
        let mut active = None;
        let mut activate = |this: &Fault| {
            if active.is_none() {
                let now = this.active.fetch_add(1, Ordering::Relaxed) + 1;
                this.stats().active_faults.set(now as f64);
                active = Some(ActiveFault {
                    active: this.active.clone(),
                    gauge: this.stats().active_faults.clone(),
                });
            }
        };
        if let Some(d) = settings.delay_for(rq) {
            activate(self);
            self.stats().delays_injected.increment(1);
            if let Some(c) = &downstream {
                self.downstream_stat(c, "delays_injected");
            }
            rq.flags.push("DI");
            tokio::time::sleep(d).await;
        }
        let abort = settings.abort_for(rq);
        let flow = match abort {
            Some((status, grpc)) => {
                activate(self);
                self.stats().aborts_injected.increment(1);
                if let Some(c) = &downstream {
                    self.downstream_stat(c, "aborts_injected");
                }
                let mut r = FilterReply::new(status, "fault filter abort", "fault_filter_abort");
                r.flag = Some("FI");
                r.grpc_status = grpc;
                Flow::Reply(r)
            }
            None => Flow::Continue,
        };
        // The request stays an active fault until it ends.
        if let Some(a) = active {
            *state = Some(Box::new(a));
        }
        flow
    }
}

fn build(a: &Any, hcm_prefix: &str, path: &str) -> Result<Arc<dyn HttpFilter>> {
    let f: pb::HttpFault = super::decode(a, path)?;
    Ok(Arc::new(Fault {
        settings: Settings::from_proto(&f, path)?,
        prefix: format!("http.{hcm_prefix}.fault."),
        stats: OnceLock::new(),
        active: Arc::new(AtomicU64::new(0)),
    }))
}

fn per_route(a: &Any, path: &str) -> Result<PerRoute> {
    let f: pb::HttpFault = super::decode(a, path)?;
    Ok(Arc::new(Settings::from_proto(&f, path)?))
}
