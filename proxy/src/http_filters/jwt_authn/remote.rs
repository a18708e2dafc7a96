//! `remote_jwks`: a JWKS fetched with a GET through `http_uri.cluster`,
//! kept for `cache_duration` (10 minutes by default). A request that finds
//! no fresh set fetches one and waits for it; a failed fetch fails that
//! request (`Jwks remote fetch is failed`) and is not remembered, so the
//! next request tries again. With `async_fetch`, a fetched set does not
//! expire: it is refreshed in the background `cache_duration` less 5 s
//! after each success, or `failed_refetch_duration` (1 s) after a failure.
//!
//! Envoy's first async fetch runs while the listener initialises; Legate's
//! runs with the first request that needs the keys, and the background
//! refresh starts from there.

use super::jwks::Jwks;
use super::status::Status;
use crate::cluster_manager::ClusterManager;
use crate::config::{join, ConfigError, Result};
use crate::http_filters::retry::{Failure, Retry};
use legate_proto::envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3 as pb;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

const DEFAULT_CACHE: Duration = Duration::from_secs(600);
const DEFAULT_FAILED_REFETCH: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct RemoteJwks {
    pub cluster: String,
    pub uri: http::Uri,
    pub timeout: Duration,
    pub cache_duration: Duration,
    /// `async_fetch`: the retry delay after a failed background fetch.
    pub async_fetch: Option<Duration>,
    pub retry: Option<Retry>,
    live: Arc<Live>,
}

/// The fetched set, shared with the background refresh.
#[derive(Debug, Default)]
struct Live {
    /// The set and when it expires (None: never, under `async_fetch`).
    keys: Mutex<Option<(Arc<Jwks>, Option<Instant>)>>,
    /// The background refresh has been started.
    refreshing: std::sync::atomic::AtomicBool,
}

/// What a fetch did, for the filter's counters.
pub trait FetchStats: Send + Sync {
    fn fetched(&self, ok: bool);
}

impl RemoteJwks {
    pub fn from_proto(provider: &str, r: &pb::RemoteJwks, path: &str) -> Result<Self> {
        let up = join(path, "http_uri");
        let h = r
            .http_uri
            .as_ref()
            .ok_or_else(|| ConfigError::new(&up, "http_uri is required"))?;
        let uri: http::Uri = h
            .uri
            .parse()
            .ok()
            .filter(|u: &http::Uri| u.authority().is_some())
            .ok_or_else(|| {
                ConfigError::new(
                    join(&up, "uri"),
                    format!("Provider '{provider}' has an invalid URI: '{}'", h.uri),
                )
            })?;
        use legate_proto::envoy_types::pb::envoy::config::core::v3::http_uri::HttpUpstreamType as U;
        let cluster = match &h.http_upstream_type {
            Some(U::Cluster(c)) if !c.is_empty() => c.clone(),
            _ => {
                return Err(ConfigError::new(
                    join(&up, "cluster"),
                    "cluster is required",
                ))
            }
        };
        let timeout = h
            .timeout
            .as_ref()
            .map(|d| crate::config::duration(d, &join(&up, "timeout")))
            .transpose()?
            .ok_or_else(|| ConfigError::new(join(&up, "timeout"), "timeout is required"))?;
        let retry = r
            .retry_policy
            .as_ref()
            .map(|p| Retry::from_proto(p, &join(path, "retry_policy"), "JWKS fetches"))
            .transpose()?;
        let cache_duration = r
            .cache_duration
            .as_ref()
            .map(|d| crate::config::duration(d, &join(path, "cache_duration")))
            .transpose()?
            // Envoy keeps whole seconds.
            .map_or(DEFAULT_CACHE, |d| Duration::from_secs(d.as_secs()));
        let async_fetch = r
            .async_fetch
            .as_ref()
            .map(|a| {
                a.failed_refetch_duration
                    .as_ref()
                    .map(|d| {
                        crate::config::duration(
                            d,
                            &join(&join(path, "async_fetch"), "failed_refetch_duration"),
                        )
                    })
                    .transpose()
                    .map(|d| d.unwrap_or(DEFAULT_FAILED_REFETCH))
            })
            .transpose()?;
        Ok(RemoteJwks {
            cluster,
            uri,
            timeout,
            cache_duration,
            async_fetch,
            retry,
            live: Arc::default(),
        })
    }

    /// The keys: the cached set while fresh, else a fetch.
    pub async fn keys(
        &self,
        clusters: &Arc<ClusterManager>,
        stats: Arc<dyn FetchStats>,
    ) -> std::result::Result<Arc<Jwks>, Status> {
        if let Some((k, exp)) = &*self.live.keys.lock().unwrap_or_else(|e| e.into_inner()) {
            if exp.is_none_or(|e| Instant::now() < e) {
                return Ok(k.clone());
            }
        }
        let got = fetch(
            clusters,
            &self.cluster,
            &self.uri,
            self.timeout,
            self.retry.as_ref(),
        )
        .await;
        stats.fetched(got.is_ok());
        let keys = got?;
        let expiry = match self.async_fetch {
            Some(_) => None,
            // A duration past what the clock holds never expires.
            None => Instant::now().checked_add(self.cache_duration),
        };
        *self.live.keys.lock().unwrap_or_else(|e| e.into_inner()) = Some((keys.clone(), expiry));
        if let Some(failed) = self.async_fetch {
            self.start_refresh(clusters.clone(), stats, failed);
        }
        Ok(keys)
    }

    /// Under `async_fetch`, refreshes the set in the background for as
    /// long as this config lives.
    fn start_refresh(
        &self,
        clusters: Arc<ClusterManager>,
        stats: Arc<dyn FetchStats>,
        failed: Duration,
    ) {
        use std::sync::atomic::Ordering;
        if self.live.refreshing.swap(true, Ordering::SeqCst) {
            return;
        }
        let live: Weak<Live> = Arc::downgrade(&self.live);
        let (cluster, uri, timeout) = (self.cluster.clone(), self.uri.clone(), self.timeout);
        let retry = self.retry.clone();
        let ok_delay = if self.cache_duration > Duration::from_secs(5) {
            self.cache_duration - Duration::from_secs(5)
        } else {
            self.cache_duration
        };
        tokio::spawn(async move {
            let mut delay = ok_delay;
            loop {
                tokio::time::sleep(delay).await;
                let Some(live) = live.upgrade() else { return };
                let got = fetch(&clusters, &cluster, &uri, timeout, retry.as_ref()).await;
                stats.fetched(got.is_ok());
                delay = match got {
                    Ok(k) => {
                        *live.keys.lock().unwrap_or_else(|e| e.into_inner()) = Some((k, None));
                        ok_delay
                    }
                    Err(_) => failed,
                };
            }
        });
    }
}

async fn attempt(
    clusters: &ClusterManager,
    cluster: &str,
    uri: &http::Uri,
    timeout: Duration,
) -> std::result::Result<Arc<Jwks>, Failure> {
    use crate::http_filters::side::CallError;
    match crate::http_filters::side::http_get(clusters, cluster, uri, timeout).await {
        Ok((200, body)) if !body.is_empty() => Jwks::parse(&body).map(Arc::new).map_err(|s| {
            tracing::warn!("jwt_authn: JWKS from {uri} is not usable: {s}");
            Failure::Unusable
        }),
        Ok((status, _)) => {
            tracing::warn!("jwt_authn: JWKS fetch from {uri} answered {status}");
            Err(Failure::Status(status))
        }
        Err(e) => {
            tracing::warn!("jwt_authn: JWKS fetch from {uri}: {e}");
            Err(match e {
                CallError::Connect(..) => Failure::Connect,
                CallError::Http(..) => Failure::Reset,
                _ => Failure::Unusable,
            })
        }
    }
}

/// The set: a 200 with a body that parses as a JWKS with at least one
/// usable key, retried by `retry`, all within `timeout`; else
/// `JwksFetchFail`.
async fn fetch(
    clusters: &ClusterManager,
    cluster: &str,
    uri: &http::Uri,
    timeout: Duration,
    retry: Option<&Retry>,
) -> std::result::Result<Arc<Jwks>, Status> {
    let now = tokio::time::Instant::now();
    let deadline = now
        .checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(86_400));
    let mut n = 0;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let failure = match attempt(clusters, cluster, uri, left).await {
            Ok(k) => return Ok(k),
            Err(f) => f,
        };
        let Some(r) = retry.filter(|r| n < r.num_retries && r.retries(&failure)) else {
            return Err(Status::JwksFetchFail);
        };
        let wait = r.backoff(n);
        if wait >= deadline.saturating_duration_since(tokio::time::Instant::now()) {
            return Err(Status::JwksFetchFail);
        }
        tokio::time::sleep(wait).await;
        n += 1;
    }
}
