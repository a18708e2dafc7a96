//! `envoy.filters.http.health_check`: requests matching `headers` are
//! health checks. Outside pass-through mode Legate answers them itself:
//! 200, or 503 (flag `LH`) while `/healthcheck/fail` is in force or while
//! a cluster of `cluster_min_healthy_percentages` has too few healthy
//! hosts. In pass-through mode they go upstream, unless the server is
//! failing (503) or a response cached within `cache_time` answers them.
//! Health check responses carry `x-envoy-upstream-healthchecked-cluster`
//! (`node.cluster`); other responses, while failing,
//! `x-envoy-immediate-health-check-fail: true`.

use super::{Factory, FilterReply, Flow, HttpFilter, RequestInfo, ResponseInfo, State};
use crate::config::matcher::HeaderMatcher;
use crate::config::{join, ConfigError, Result};
use crate::registry::MessageSupport;
use legate_proto::envoy_types::pb::envoy::extensions::filters::http::health_check::v3 as pb;
use legate_proto::envoy_types::pb::google::protobuf::Any;
use pingora_http::ResponseHeader;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TYPE: &str = "envoy.extensions.filters.http.health_check.v3.HealthCheck";

pub static FACTORY: Factory = Factory {
    type_name: TYPE,
    build,
    per_route: &[],
};

pub static REGISTRY: &[MessageSupport] = &[MessageSupport {
    message: TYPE,
    supported: &[
        "pass_through_mode",
        "headers",
        "cache_time",
        "cluster_min_healthy_percentages",
    ],
    warn: &[],
}];

#[derive(Debug)]
pub struct HealthCheck {
    pass_through: bool,
    headers: Vec<HeaderMatcher>,
    /// (cluster, minimum healthy percent), sorted by cluster.
    min_healthy: Vec<(String, f64)>,
    cache: Option<Cache>,
}

/// Pass-through mode's cache: the last health check response, used until
/// the end of the `cache_time` period in which it was stored (periods
/// count from the filter's creation, as Envoy's clearing timer does).
#[derive(Debug)]
struct Cache {
    period: Duration,
    start: Instant,
    /// (period number, status, degraded)
    last: Mutex<Option<(u128, u16, bool)>>,
}

impl Cache {
    fn epoch(&self) -> u128 {
        self.start.elapsed().as_nanos() / self.period.as_nanos().max(1)
    }

    fn get(&self) -> Option<(u16, bool)> {
        let last = *self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.filter(|(e, _, _)| *e == self.epoch())
            .map(|(_, s, d)| (s, d))
    }

    fn set(&self, status: u16, degraded: bool) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((self.epoch(), status, degraded));
    }
}

fn build(a: &Any, _hcm_prefix: &str, path: &str) -> Result<Arc<dyn HttpFilter>> {
    let c: pb::HealthCheck = super::decode(a, path)?;
    let pass_through = c
        .pass_through_mode
        .as_ref()
        .map(|b| b.value)
        .ok_or_else(|| {
            ConfigError::new(
                join(path, "pass_through_mode"),
                "pass_through_mode is required",
            )
        })?;
    let headers = c
        .headers
        .iter()
        .enumerate()
        .map(|(i, h)| HeaderMatcher::from_proto(h, &format!("{path}.headers[{i}]")))
        .collect::<Result<Vec<_>>>()?;
    let mut min_healthy: Vec<(String, f64)> = c
        .cluster_min_healthy_percentages
        .iter()
        .map(|(k, v)| (k.clone(), v.value))
        .collect();
    min_healthy.sort_by(|a, b| a.0.cmp(&b.0));
    let cache = match &c.cache_time {
        Some(d) if pass_through => {
            let period = crate::config::duration(d, &join(path, "cache_time"))?;
            (!period.is_zero()).then(|| Cache {
                period,
                start: Instant::now(),
                last: Mutex::new(None),
            })
        }
        _ => None,
    };
    Ok(Arc::new(HealthCheck {
        pass_through,
        headers,
        min_healthy,
        cache,
    }))
}

/// Marks a health check request, for its response and access logs.
pub struct IsHealthCheck;

impl HealthCheck {
    /// The answer by `cluster_min_healthy_percentages`: every cluster
    /// must have its share of healthy hosts (a missing cluster fails; an
    /// empty one passes only at 0 %). (status, details)
    fn by_clusters(&self, rq: &RequestInfo<'_>) -> (u16, &'static str) {
        if self.min_healthy.is_empty() {
            return (200, "health_check_ok");
        }
        for (name, min) in &self.min_healthy {
            let Some(c) = rq.clusters.get(name) else {
                return (503, "health_check_failed_no_cluster_found");
            };
            let (healthy, total) = c.membership();
            if total == 0 {
                if *min == 0.0 {
                    continue;
                }
                return (503, "health_check_failed_cluster_empty");
            }
            if (healthy as f64) < total as f64 * min / 100.0 {
                return (503, "health_check_failed_cluster_unhealthy");
            }
        }
        (200, "health_check_ok_cluster_healthy")
    }
}

#[async_trait::async_trait]
impl HttpFilter for HealthCheck {
    async fn on_request(&self, rq: &mut RequestInfo<'_>, state: &mut Option<State>) -> Flow {
        let pseudo = crate::config::matcher::Pseudo {
            method: rq.req.method.as_str(),
            path: rq.req.uri.path_and_query().map_or("/", |p| p.as_str()),
            authority: rq.authority(),
            scheme: rq.scheme,
            status: None,
        };
        if !self
            .headers
            .iter()
            .all(|h| h.matches_with(&rq.req.headers, &pseudo))
        {
            return Flow::Continue;
        }
        *state = Some(Box::new(IsHealthCheck));
        let cached = self.cache.as_ref().and_then(Cache::get);
        if self.pass_through && !rq.health_failed && cached.is_none() {
            return Flow::Continue;
        }
        let (status, degraded, details) = if rq.health_failed {
            (503, false, "health_check_failed")
        } else if let Some((s, d)) = cached {
            (s, d, "health_check_cached")
        } else {
            let (s, details) = self.by_clusters(rq);
            (s, false, details)
        };
        let mut r = FilterReply::new(status, "", details);
        if !(200..300).contains(&status) {
            r.flag = Some("LH");
        }
        if degraded {
            r.headers.push((
                http::HeaderName::from_static("x-envoy-degraded"),
                http::HeaderValue::from_static(""),
            ));
        }
        Flow::Reply(r)
    }

    fn on_response(
        &self,
        resp: &mut ResponseHeader,
        info: &ResponseInfo<'_>,
        state: Option<&State>,
    ) {
        let is_hc = state.is_some_and(|s| s.is::<IsHealthCheck>());
        if is_hc {
            if let Some(c) = &self.cache {
                c.set(
                    resp.status.as_u16(),
                    resp.headers.contains_key("x-envoy-degraded"),
                );
            }
            let _ = resp.insert_header(
                "x-envoy-upstream-healthchecked-cluster",
                info.service_cluster,
            );
        } else if info.health_failed {
            let _ = resp.insert_header("x-envoy-immediate-health-check-fail", "true");
        }
    }
}
