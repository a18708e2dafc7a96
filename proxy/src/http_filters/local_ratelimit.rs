//! `envoy.filters.http.local_ratelimit`: a token bucket per filter config
//! (the filter's, or a route's `LocalRateLimit`, the most specific one
//! replacing it). A request takes a token; with none left it is rate
//! limited: counted always, answered 429 (or `status`) only when enforced.
//! The bucket refills continuously, `tokens_per_fill` per `fill_interval`,
//! up to `max_tokens`, and starts full, as Envoy 1.40's atomic bucket.
//!
//! Descriptors (with the route's or the filter's `rate_limits`) are not
//! built yet and are refused.

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
        ],
        warn: &[
            (
                "max_dynamic_descriptors",
                "bounds descriptor buckets, which Legate refuses, so it changes nothing",
            ),
            (
                "stage",
                "selects rate limit actions, which Legate refuses, so it changes nothing",
            ),
            (
                "vh_rate_limits",
                "selects rate limit actions, which Legate refuses, so it changes nothing",
            ),
        ],
    },
];

/// One config: the filter's or a route's, with its bucket.
#[derive(Debug)]
pub struct Limit {
    stat_prefix: String,
    status: u16,
    bucket: Option<Bucket>,
    enabled: Option<Fraction>,
    enforced: Option<Fraction>,
    not_enforced_headers: HeaderOps,
    response_headers: HeaderOps,
    grpc_resource_exhausted: bool,
    x_ratelimit_headers: bool,
    stats: OnceLock<Stats>,
}

#[derive(Debug)]
struct Stats {
    enabled: Counter,
    enforced: Counter,
    rate_limited: Counter,
    ok: Counter,
}

/// A continuously refilled bucket (live state beside the immutable
/// settings it was built from).
#[derive(Debug)]
struct Bucket {
    max: f64,
    /// Tokens per second.
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    /// Takes a token; the tokens left after, or None when empty.
    fn take(&self, now: Instant) -> Option<f64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_duration_since(s.1).as_secs_f64();
        s.0 = (s.0 + elapsed * self.rate).min(self.max);
        s.1 = now;
        if s.0 < 1.0 {
            return None;
        }
        s.0 -= 1.0;
        Some(s.0)
    }

    /// Whole seconds until the bucket is full again.
    fn reset_seconds(&self, left: f64) -> u64 {
        if self.rate <= 0.0 {
            return 0;
        }
        ((self.max - left) / self.rate).ceil() as u64
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
        refuse_descriptors(l, path)?;
        let bucket = match &l.token_bucket {
            Some(tb) => Some(bucket(tb, &join(path, "token_bucket"))?),
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
            }
        })
    }
}

fn refuse_descriptors(l: &pb::LocalRateLimit, path: &str) -> Result<()> {
    let refuse = |field: &str, why: &str| Err(ConfigError::new(join(path, field), why));
    if !l.descriptors.is_empty() {
        return refuse(
            "descriptors",
            "rate limit descriptors are not supported yet",
        );
    }
    if !l.rate_limits.is_empty() {
        return refuse("rate_limits", "rate limit actions are not supported yet");
    }
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

fn bucket(
    tb: &legate_proto::envoy_types::pb::envoy::r#type::v3::TokenBucket,
    path: &str,
) -> Result<Bucket> {
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
    let max = f64::from(tb.max_tokens);
    Ok(Bucket {
        max,
        rate,
        state: Mutex::new((max, Instant::now())),
    })
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
        let Some(bucket) = &limit.bucket else {
            limit.stats().ok.increment(1);
            return Flow::Continue;
        };
        let taken = bucket.take(Instant::now());
        if limit.x_ratelimit_headers {
            let left = taken.unwrap_or(0.0);
            *state = Some(Box::new(XHeaders {
                limit: bucket.max as u64,
                remaining: left.floor() as u64,
                reset: bucket.reset_seconds(left),
            }));
        }
        if taken.is_some() {
            limit.stats().ok.increment(1);
            return Flow::Continue;
        }
        limit.stats().rate_limited.increment(1);
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
        let b = bucket(&tb, "tb").unwrap();
        let t0 = b.state.lock().unwrap().1;
        assert_eq!(b.take(t0), Some(1.0));
        assert_eq!(b.take(t0), Some(0.0));
        assert_eq!(b.take(t0), None);
        // Half an interval: half a token, not enough.
        assert_eq!(b.take(t0 + Duration::from_millis(500)), None);
        assert!(b.take(t0 + Duration::from_millis(1000)).is_some());
        assert_eq!(b.reset_seconds(0.0), 2);
    }

    #[test]
    fn descriptors_are_refused_naming_the_field() {
        let l = pb::LocalRateLimit {
            stat_prefix: "p".into(),
            descriptors: vec![Default::default()],
            ..Default::default()
        };
        assert_eq!(
            Limit::from_proto(&l, false, "f").unwrap_err().path,
            "f.descriptors"
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
