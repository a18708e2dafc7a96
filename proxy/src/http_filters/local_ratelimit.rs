//! `envoy.filters.http.local_ratelimit`: a token bucket per filter config
//! (the filter's, or a route's `LocalRateLimit`, the most specific one
//! replacing it). A request takes a token; with none left it is rate
//! limited: counted always, answered 429 (or `status`) only when enforced.
//! The bucket refills continuously, `tokens_per_fill` per `fill_interval`,
//! up to `max_tokens`, and starts full, as Envoy 1.40's atomic bucket.
//!
//! With `descriptors`, the request's descriptors (from the filter's own
//! `rate_limits`, else the route's and virtual host's) pick buckets too:
//! each matching descriptor takes a token, the slowest-filling first, and
//! the default bucket is taken only when none matched (unless
//! `always_consume_default_token_bucket`). A descriptor entry without a
//! value matches any value, with a bucket per value (at most
//! `max_dynamic_descriptors`, the least recently used dropped).

use super::rate_limit_actions::{self as actions, Produced, RateLimit, VhRateLimits, XRateLimit};
use super::{
    Factory, FilterReply, Flow, Fraction, HttpFilter, PerRoute, RequestInfo, ResponseInfo, State,
};
use crate::config::{join, ConfigError, Result, Wrapped};
use crate::headers::{self, HeaderOps};
use crate::registry::MessageSupport;
use legate_proto::envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3 as pb;
use legate_proto::envoy_types::pb::google::protobuf::Any;
use metrics::Counter;
use pingora_http::ResponseHeader;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const TYPE: &str = "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";

pub static FACTORY: Factory = Factory {
    type_name: TYPE,
    build,
    per_route: &[(TYPE, per_route)],
};

pub static REGISTRY: &[MessageSupport] = &[
    MessageSupport {
        message: "envoy.type.v3.HttpStatus",
        supported: &["code"],
        warn: &[],
    },
    MessageSupport {
        message: TYPE,
        supported: &[
            "stat_prefix",
            "status",
            "token_bucket",
            "filter_enabled",
            "filter_enforced",
            "request_headers_to_add_when_not_enforced",
            "response_headers_to_add",
            "always_consume_default_token_bucket",
            "rate_limited_as_resource_exhausted",
            "enable_x_ratelimit_headers",
            "local_rate_limit_per_downstream_connection",
            "descriptors",
            "rate_limits",
            "max_dynamic_descriptors",
            "stage",
            "vh_rate_limits",
        ],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.common.ratelimit.v3.LocalRateLimitDescriptor",
        supported: &["entries", "token_bucket", "shadow_mode"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.common.ratelimit.v3.RateLimitDescriptor.Entry",
        supported: &["key", "value"],
        warn: &[],
    },
];

/// One config: the filter's or a route's, with its bucket.
#[derive(Debug)]
pub struct Limit {
    stat_prefix: String,
    status: u16,
    bucket: Option<Arc<Bucket>>,
    enabled: Option<Fraction>,
    enforced: Option<Fraction>,
    not_enforced_headers: HeaderOps,
    response_headers: HeaderOps,
    grpc_resource_exhausted: bool,
    x_ratelimit_headers: bool,
    descriptors: Vec<LocalDescriptor>,
    rate_limits: Vec<RateLimit>,
    stage: u32,
    vh: VhRateLimits,
    always_consume_default: bool,
    max_dynamic: usize,
    stats: OnceLock<Stats>,
}

/// A configured descriptor and its bucket(s).
#[derive(Debug)]
struct LocalDescriptor {
    /// (key, value); an empty value matches any value.
    entries: Vec<(String, String)>,
    spec: (f64, f64),
    /// `shadow_mode`: its buckets count but never refuse.
    shadow: bool,
    /// Its one bucket, when every entry has a value.
    fixed: Option<Arc<Bucket>>,
    /// Otherwise a bucket per distinct request values, with when each
    /// was last used.
    dynamic: Mutex<DynamicBuckets>,
}

/// A dynamic descriptor's buckets by request values, with when each was
/// last used, and the use clock.
type DynamicBuckets = (HashMap<Vec<String>, (Arc<Bucket>, u64)>, u64);

impl LocalDescriptor {
    /// The bucket for a request descriptor, if this one matches it.
    fn bucket(&self, d: &[(String, String)], max_dynamic: usize) -> Option<Arc<Bucket>> {
        if d.len() != self.entries.len()
            || !d
                .iter()
                .zip(&self.entries)
                .all(|((k, v), (ck, cv))| k == ck && (cv.is_empty() || v == cv))
        {
            return None;
        }
        if let Some(b) = &self.fixed {
            return Some(b.clone());
        }
        let values: Vec<String> = d.iter().map(|(_, v)| v.clone()).collect();
        let mut guard = self.dynamic.lock().unwrap_or_else(|e| e.into_inner());
        let (map, clock) = &mut *guard;
        *clock += 1;
        let now = *clock;
        if let Some((b, used)) = map.get_mut(&values) {
            *used = now;
            return Some(b.clone());
        }
        if map.len() >= max_dynamic.max(1) {
            // The least recently used value loses its bucket.
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, (_, u))| *u)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        let b = Arc::new(Bucket::new(self.spec).shadowed(self.shadow));
        map.insert(values, (b.clone(), now));
        Some(b)
    }
}

#[derive(Debug)]
struct Stats {
    enabled: Counter,
    enforced: Counter,
    rate_limited: Counter,
    ok: Counter,
    shadow_mode: Counter,
}

/// A continuously refilled bucket (live state beside the immutable
/// settings it was built from).
#[derive(Debug)]
struct Bucket {
    max: f64,
    /// Tokens per second.
    rate: f64,
    /// A shadow descriptor's: its refusals are counted, not enforced.
    shadow: bool,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    /// A full bucket of (max tokens, tokens per second).
    fn new((max, rate): (f64, f64)) -> Self {
        Self {
            max,
            rate,
            shadow: false,
            state: Mutex::new((max, Instant::now())),
        }
    }

    fn shadowed(mut self, shadow: bool) -> Self {
        self.shadow = shadow;
        self
    }

    /// The tokens there are now.
    fn peek(&self, now: Instant) -> f64 {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_duration_since(s.1).as_secs_f64();
        (s.0 + elapsed * self.rate).min(self.max)
    }

    /// Takes a token; the tokens left after, or None when empty.
    fn take(&self, now: Instant) -> Option<f64> {
        self.take_n(now, 1)
    }

    /// Takes `n` tokens, all or none; the tokens left after, or None when
    /// there are fewer. Taking 0 fails, as in Envoy (its bucket reports
    /// a consumption of nothing as a refusal).
    fn take_n(&self, now: Instant, n: u64) -> Option<f64> {
        let mut s = self.refilled(now);
        let n = n as f64;
        if n == 0.0 || s.0 < n {
            return None;
        }
        s.0 -= n;
        Some(s.0)
    }

    /// Gives `n` tokens back (a negative hits addend), up to the maximum.
    fn refill(&self, now: Instant, n: u64) {
        let mut s = self.refilled(now);
        s.0 = (s.0 + n as f64).min(self.max);
    }

    fn refilled(&self, now: Instant) -> std::sync::MutexGuard<'_, (f64, Instant)> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_duration_since(s.1).as_secs_f64();
        s.0 = (s.0 + elapsed * self.rate).min(self.max);
        s.1 = now;
        s
    }

    /// Whole seconds until the next token: 0 while one is left.
    fn reset_seconds(&self, left: f64) -> u64 {
        if self.rate <= 0.0 || left >= 1.0 {
            return 0;
        }
        ((1.0 - left) / self.rate).ceil() as u64
    }
}

impl Limit {
    pub fn from_proto(l: &pb::LocalRateLimit, per_route: bool, path: &str) -> Result<Self> {
        if l.stat_prefix.is_empty() {
            return Err(ConfigError::new(
                join(path, "stat_prefix"),
                "stat_prefix is required",
            ));
        }
        refuse_unsupported(l, path)?;
        let bucket = match &l.token_bucket {
            Some(tb) => Some(Arc::new(Bucket::new(bucket(
                tb,
                &join(path, "token_bucket"),
            )?))),
            None if per_route => {
                return Err(ConfigError::new(
                    join(path, "token_bucket"),
                    "a per-route local rate limit needs a token bucket",
                ))
            }
            None => None,
        };
        let tp = join(path, "request_headers_to_add_when_not_enforced");
        let rp = join(path, "response_headers_to_add");
        use legate_proto::envoy_types::pb::envoy::extensions::common::ratelimit::v3::XRateLimitHeadersRfcVersion as X;
        Ok(Self {
            stat_prefix: l.stat_prefix.clone(),
            status: l
                .status
                .as_ref()
                .and_then(|s| u16::try_from(s.code).ok())
                .filter(|c| (200..600).contains(c))
                .unwrap_or(429),
            bucket,
            enabled: l
                .filter_enabled
                .as_ref()
                .map(|f| Fraction::from_proto(Some(f), Fraction::ALWAYS)),
            enforced: l
                .filter_enforced
                .as_ref()
                .map(|f| Fraction::from_proto(Some(f), Fraction::ALWAYS)),
            not_enforced_headers: HeaderOps::from_proto(
                &l.request_headers_to_add_when_not_enforced,
                &[],
                &[],
                &[],
                &tp,
            )
            .map_err(|e| ConfigError::new(tp.clone(), e.message))?,
            response_headers: HeaderOps::from_proto(&[], &[], &l.response_headers_to_add, &[], &rp)
                .map_err(|e| ConfigError::new(rp.clone(), e.message))?,
            grpc_resource_exhausted: l.rate_limited_as_resource_exhausted,
            x_ratelimit_headers: l.enable_x_ratelimit_headers == X::DraftVersion03 as i32,
            descriptors: local_descriptors(l, path)?,
            rate_limits: actions::local_list(&l.rate_limits, path, "rate_limits")?,
            stage: l.stage,
            vh: {
                use legate_proto::envoy_types::pb::envoy::extensions::common::ratelimit::v3::VhRateLimitsOptions as V;
                match V::try_from(l.vh_rate_limits).unwrap_or(V::Override) {
                    V::Override => VhRateLimits::Override,
                    V::Include => VhRateLimits::Include,
                    V::Ignore => VhRateLimits::Ignore,
                }
            },
            always_consume_default: l.always_consume_default_token_bucket.val().unwrap_or(true),
            max_dynamic: l.max_dynamic_descriptors.val().unwrap_or(20) as usize,
            stats: OnceLock::new(),
        })
    }

    fn stats(&self) -> &Stats {
        self.stats.get_or_init(|| {
            let c = |n: &str| {
                crate::stats::counter(format!("{}.http_local_rate_limit.{n}", self.stat_prefix))
            };
            Stats {
                enabled: c("enabled"),
                enforced: c("enforced"),
                rate_limited: c("rate_limited"),
                ok: c("ok"),
                shadow_mode: c("shadow_mode"),
            }
        })
    }
}

fn refuse_unsupported(l: &pb::LocalRateLimit, path: &str) -> Result<()> {
    let refuse = |field: &str, why: &str| Err(ConfigError::new(join(path, field), why));
    if l.local_rate_limit_per_downstream_connection {
        return refuse(
            "local_rate_limit_per_downstream_connection",
            "per-connection buckets are not supported yet",
        );
    }
    if l.local_cluster_rate_limit.is_some() {
        return refuse(
            "local_cluster_rate_limit",
            "sharing limits across a cluster is not supported",
        );
    }
    Ok(())
}

/// A token bucket's (max tokens, tokens per second).
fn bucket(
    tb: &legate_proto::envoy_types::pb::envoy::r#type::v3::TokenBucket,
    path: &str,
) -> Result<(f64, f64)> {
    if tb.max_tokens == 0 {
        return Err(ConfigError::new(
            join(path, "max_tokens"),
            "must be at least 1",
        ));
    }
    let interval = tb
        .fill_interval
        .as_ref()
        .map(|d| crate::config::duration(d, &join(path, "fill_interval")))
        .transpose()?
        .unwrap_or(Duration::ZERO);
    let per_fill = f64::from(tb.tokens_per_fill.val().unwrap_or(1));
    let rate = if interval.is_zero() {
        0.0
    } else {
        per_fill / interval.as_secs_f64()
    };
    Ok((f64::from(tb.max_tokens), rate))
}

fn local_descriptors(l: &pb::LocalRateLimit, path: &str) -> Result<Vec<LocalDescriptor>> {
    l.descriptors
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let p = crate::config::index(path, "descriptors", i);
            let tb = d.token_bucket.as_ref().ok_or_else(|| {
                ConfigError::new(join(&p, "token_bucket"), "token_bucket is required")
            })?;
            let spec = bucket(tb, &join(&p, "token_bucket"))?;
            if d.entries.is_empty() {
                return Err(ConfigError::new(
                    join(&p, "entries"),
                    "at least one entry is required",
                ));
            }
            let entries: Vec<(String, String)> = d
                .entries
                .iter()
                .map(|e| (e.key.clone(), e.value.clone()))
                .collect();
            let fixed = entries
                .iter()
                .all(|(_, v)| !v.is_empty())
                .then(|| Arc::new(Bucket::new(spec).shadowed(d.shadow_mode)));
            Ok(LocalDescriptor {
                entries,
                spec,
                shadow: d.shadow_mode,
                fixed,
                dynamic: Mutex::new((HashMap::new(), 0)),
            })
        })
        .collect()
}

/// What the bucket check decided.
struct Decision {
    allowed: bool,
    /// The bucket whose numbers the x-ratelimit headers show.
    context: Option<Arc<Bucket>>,
    /// The descriptor's own choice about those headers.
    x_ratelimit: XRateLimit,
    /// Refused by a shadow descriptor only: counted, never enforced.
    shadow: bool,
}

impl Limit {
    /// The request's descriptors, when descriptors are configured: from
    /// the filter's own `rate_limits` (their hits addends and header
    /// choices resolved), else the route's.
    fn request_descriptors(&self, rq: &RequestInfo<'_>) -> Vec<Produced> {
        if self.descriptors.is_empty() {
            return Vec::new();
        }
        // Envoy's local filter skips entries that have a disable key.
        let skip = |r: &RateLimit| !r.disable_key.is_empty();
        if self.rate_limits.is_empty() {
            return actions::route_descriptors(rq, self.stage, self.vh, &skip)
                .into_iter()
                .map(actions::Produced::plain)
                .collect();
        }
        // Built only for a format hits addend, which reads it.
        let cx = actions::ExtrasContext {
            metadata: rq.metadata,
            render: &|f| f.render(&rq.log_entry("")),
        };
        let facts = rq.rate_limit_facts();
        // Entries for the stream's end are the global filter's; the local
        // filter never applies them, as in Envoy.
        self.rate_limits
            .iter()
            .filter(|r| !r.extras.on_stream_done)
            .filter_map(|r| r.produce(&facts, &cx))
            .collect()
    }

    /// Takes tokens for the request: every matched descriptor's bucket,
    /// slowest to refill first, then the default bucket.
    fn allowed(&self, descriptors: &[Produced], now: Instant) -> Decision {
        let mut matched: Vec<(Arc<Bucket>, &Produced)> = descriptors
            .iter()
            .filter_map(|d| {
                self.descriptors
                    .iter()
                    .find_map(|ld| ld.bucket(&d.entries, self.max_dynamic))
                    .map(|b| (b, d))
            })
            .collect();
        matched.sort_by(|a, b| a.0.rate.total_cmp(&b.0.rate));
        // A shadow descriptor's refusal does not stop the others from
        // being charged; it decides only if none of them refuses.
        let mut shadowed: Option<Decision> = None;
        for (b, d) in &matched {
            match d.hits {
                Some(n) if d.negative_hits => b.refill(now, n),
                n => {
                    if b.take_n(now, n.unwrap_or(1)).is_none() {
                        let refusal = Decision {
                            allowed: false,
                            context: Some(b.clone()),
                            x_ratelimit: d.x_ratelimit,
                            shadow: b.shadow,
                        };
                        if !b.shadow {
                            return refusal;
                        }
                        shadowed.get_or_insert(refusal);
                    }
                }
            }
        }
        let first = matched.first();
        let decision = |context| Decision {
            allowed: true,
            context,
            x_ratelimit: first.map_or(XRateLimit::Inherit, |(_, d)| d.x_ratelimit),
            shadow: false,
        };
        if matched.is_empty() || self.always_consume_default {
            if let Some(d) = &self.bucket {
                if d.take(now).is_none() {
                    return Decision {
                        allowed: false,
                        context: Some(d.clone()),
                        x_ratelimit: XRateLimit::Inherit,
                        shadow: false,
                    };
                }
                return shadowed.unwrap_or_else(|| {
                    decision(first.map(|(b, _)| b.clone()).or_else(|| Some(d.clone())))
                });
            }
        }
        shadowed.unwrap_or_else(|| decision(first.map(|(b, _)| b.clone())))
    }

    /// Whether the x-ratelimit headers go out: the descriptor's choice,
    /// else the filter's.
    fn x_headers(&self, x: XRateLimit) -> bool {
        match x {
            XRateLimit::Inherit => self.x_ratelimit_headers,
            XRateLimit::Off => false,
            XRateLimit::DraftVersion03 => true,
        }
    }
}

#[derive(Debug)]
pub struct LocalRateLimit {
    limit: Limit,
}

/// What the response side adds: the bucket's numbers.
struct XHeaders {
    limit: u64,
    remaining: u64,
    reset: u64,
}

#[async_trait::async_trait]
impl HttpFilter for LocalRateLimit {
    async fn on_request(&self, rq: &mut RequestInfo<'_>, state: &mut Option<State>) -> Flow {
        let route: Option<Arc<Limit>> = rq.all_levels::<Limit>().next();
        let limit = route.as_deref().unwrap_or(&self.limit);
        if !limit.enabled.as_ref().is_some_and(|f| f.roll(rq.runtime)) {
            return Flow::Continue;
        }
        limit.stats().enabled.increment(1);
        let descriptors = limit.request_descriptors(rq);
        let now = Instant::now();
        let Decision {
            allowed: ok,
            context,
            x_ratelimit,
            shadow,
        } = limit.allowed(&descriptors, now);
        if let (true, Some(b)) = (limit.x_headers(x_ratelimit), &context) {
            let left = b.peek(now);
            *state = Some(Box::new(XHeaders {
                limit: b.max as u64,
                remaining: left.floor() as u64,
                reset: b.reset_seconds(left),
            }));
        }
        if ok {
            limit.stats().ok.increment(1);
            return Flow::Continue;
        }
        limit.stats().rate_limited.increment(1);
        // A shadow descriptor's refusal is counted like any other, and
        // under its own name, and never enforced.
        if shadow {
            limit.stats().shadow_mode.increment(1);
            return Flow::Continue;
        }
        if !limit.enforced.as_ref().is_some_and(|f| f.roll(rq.runtime)) {
            if limit.not_enforced_headers.touches_request() {
                let snapshot = rq.req.clone();
                let fctx = rq.format_context(&snapshot);
                headers::apply(&limit.not_enforced_headers.request_add, &[], rq.req, &fctx);
            }
            return Flow::Continue;
        }
        limit.stats().enforced.increment(1);
        let mut r = FilterReply::new(limit.status, "local_rate_limited", "local_rate_limited");
        r.flag = Some("RL");
        if limit.grpc_resource_exhausted {
            r.grpc_status = Some(8);
        }
        if limit.response_headers.touches_response() {
            let mut hm = http::HeaderMap::new();
            let snapshot = rq.req.clone();
            let fctx = rq.format_context(&snapshot);
            headers::apply(&limit.response_headers.response_add, &[], &mut hm, &fctx);
            r.headers
                .extend(hm.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        Flow::Reply(r)
    }

    fn on_response(
        &self,
        resp: &mut ResponseHeader,
        _info: &ResponseInfo<'_>,
        state: Option<&State>,
    ) {
        let Some(x) = state.and_then(|s| s.downcast_ref::<XHeaders>()) else {
            return;
        };
        let _ = resp.append_header("x-ratelimit-limit", x.limit.to_string());
        let _ = resp.append_header("x-ratelimit-remaining", x.remaining.to_string());
        let _ = resp.append_header("x-ratelimit-reset", x.reset.to_string());
    }
}

fn build(a: &Any, _hcm_prefix: &str, path: &str) -> Result<Arc<dyn HttpFilter>> {
    let l: pb::LocalRateLimit = super::decode(a, path)?;
    Ok(Arc::new(LocalRateLimit {
        limit: Limit::from_proto(&l, false, path)?,
    }))
}

fn per_route(a: &Any, path: &str) -> Result<PerRoute> {
    let l: pb::LocalRateLimit = super::decode(a, path)?;
    Ok(Arc::new(Limit::from_proto(&l, true, path)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_starts_full_and_refills_continuously() {
        let tb = legate_proto::envoy_types::pb::envoy::r#type::v3::TokenBucket {
            max_tokens: 2,
            tokens_per_fill: Some(crate::config::wkt::UInt32Value { value: 1 }),
            fill_interval: Some(crate::config::wkt::Duration {
                seconds: 1,
                nanos: 0,
            }),
        };
        let b = Bucket::new(bucket(&tb, "tb").unwrap());
        let t0 = b.state.lock().unwrap().1;
        assert_eq!(b.take(t0), Some(1.0));
        assert_eq!(b.take(t0), Some(0.0));
        assert_eq!(b.take(t0), None);
        // Half an interval: half a token, not enough.
        assert_eq!(b.take(t0 + Duration::from_millis(500)), None);
        assert!(b.take(t0 + Duration::from_millis(1000)).is_some());
        assert_eq!(b.reset_seconds(0.0), 1);
        assert_eq!(b.reset_seconds(1.5), 0);
    }

    #[test]
    fn bad_descriptors_and_bucketless_routes_are_refused_naming_the_field() {
        let l = pb::LocalRateLimit {
            stat_prefix: "p".into(),
            descriptors: vec![Default::default()],
            ..Default::default()
        };
        assert_eq!(
            Limit::from_proto(&l, false, "f").unwrap_err().path,
            "f.descriptors[0].token_bucket"
        );
        let l = pb::LocalRateLimit {
            stat_prefix: "p".into(),
            ..Default::default()
        };
        assert_eq!(
            Limit::from_proto(&l, true, "f").unwrap_err().path,
            "f.token_bucket"
        );
    }
}
