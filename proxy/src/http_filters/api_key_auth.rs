//! `envoy.filters.http.api_key_auth`: a request must carry a known API key
//! (from the first configured header, query parameter or cookie that has
//! one; a header's `Bearer ` prefix is dropped). An unknown or missing key
//! gets 401; a key whose client a route's `allowed_clients` leaves out gets
//! 403. `forwarding` names the client to the upstream in a header and can
//! take the key out of the request. A route's `ApiKeyAuthPerRoute` replaces
//! the filter's credentials and key sources where it sets them, and its
//! forwarding always.

use super::{Factory, FilterReply, Flow, HttpFilter, PerRoute, RequestInfo, State};
use crate::config::{index, join, ConfigError, Result};
use crate::registry::MessageSupport;
use http::HeaderName;
use legate_proto::envoy_types::pb::envoy::extensions::filters::http::api_key_auth::v3 as pb;
use legate_proto::envoy_types::pb::google::protobuf::Any;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

const TYPE: &str = "envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth";
const PER_ROUTE_TYPE: &str = "envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuthPerRoute";

pub static FACTORY: Factory = Factory {
    type_name: TYPE,
    build,
    per_route: &[(PER_ROUTE_TYPE, per_route)],
};

pub static REGISTRY: &[MessageSupport] = &[
    MessageSupport {
        message: TYPE,
        supported: &["credentials", "key_sources", "forwarding"],
        warn: &[],
    },
    MessageSupport {
        message: PER_ROUTE_TYPE,
        supported: &[
            "credentials",
            "key_sources",
            "allowed_clients",
            "forwarding",
        ],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.api_key_auth.v3.Credential",
        supported: &["key", "client"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.api_key_auth.v3.KeySource",
        supported: &["header", "query", "cookie"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.api_key_auth.v3.Forwarding",
        supported: &["header", "hide_credentials"],
        warn: &[],
    },
];

/// Where a key may be.
#[derive(Debug, Clone)]
enum Source {
    Header(HeaderName),
    Query(String),
    Cookie(String),
}

impl Source {
    fn from_proto(s: &pb::KeySource, path: &str) -> Result<Self> {
        if !s.header.is_empty() {
            crate::headers::header_name(&s.header, &join(path, "header")).map(Self::Header)
        } else if !s.query.is_empty() {
            Ok(Self::Query(s.query.clone()))
        } else if !s.cookie.is_empty() {
            Ok(Self::Cookie(s.cookie.clone()))
        } else {
            Err(ConfigError::new(
                path,
                "one of 'header'/'query'/'cookie' must be set",
            ))
        }
    }

    fn key(&self, req: &pingora_http::RequestHeader) -> Option<String> {
        match self {
            Self::Header(h) => {
                let v = req.headers.get(h)?.to_str().ok()?;
                Some(v.strip_prefix("Bearer ").unwrap_or(v).to_string())
            }
            Self::Query(name) => {
                let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
                crate::routing::decoded_query_params(path)
                    .into_iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v)
            }
            Self::Cookie(name) => crate::headers::cookie(&req.headers, name),
        }
    }

    fn remove(&self, req: &mut pingora_http::RequestHeader) {
        match self {
            Self::Header(h) => {
                req.remove_header(h);
            }
            Self::Query(name) => crate::routing::remove_query_param(req, name),
            Self::Cookie(name) => crate::headers::remove_cookie(req, name),
        }
    }
}

#[derive(Debug, Clone)]
struct Forwarding {
    header: Option<HeaderName>,
    hide_credentials: bool,
}

/// The filter's config, or the parts a route's replaces.
#[derive(Debug, Default)]
struct Settings {
    /// Key → client, when credentials are set.
    credentials: Option<HashMap<String, String>>,
    /// When key sources are set.
    sources: Option<Vec<Source>>,
    forwarding: Option<Forwarding>,
}

impl Settings {
    fn from_proto(
        credentials: &[pb::Credential],
        sources: &[pb::KeySource],
        forwarding: Option<&pb::Forwarding>,
        path: &str,
    ) -> Result<Self> {
        let mut map = HashMap::new();
        for (i, c) in credentials.iter().enumerate() {
            let p = index(path, "credentials", i);
            if c.key.is_empty() || c.client.is_empty() {
                return Err(ConfigError::new(p, "key and client are required"));
            }
            if map.insert(c.key.clone(), c.client.clone()).is_some() {
                return Err(ConfigError::new(
                    join(&p, "key"),
                    "duplicated credential key (Envoy refuses it)",
                ));
            }
        }
        let sources = sources
            .iter()
            .enumerate()
            .map(|(i, s)| Source::from_proto(s, &index(path, "key_sources", i)))
            .collect::<Result<Vec<_>>>()?;
        let forwarding = forwarding
            .map(|f| {
                Ok::<_, ConfigError>(Forwarding {
                    header: (!f.header.is_empty())
                        .then(|| {
                            crate::headers::header_name(&f.header, &join(path, "forwarding.header"))
                        })
                        .transpose()?,
                    hide_credentials: f.hide_credentials,
                })
            })
            .transpose()?;
        Ok(Self {
            credentials: (!map.is_empty()).then_some(map),
            sources: (!sources.is_empty()).then_some(sources),
            forwarding,
        })
    }
}

/// A route's `ApiKeyAuthPerRoute`.
#[derive(Debug)]
struct RouteConfig {
    settings: Settings,
    /// Empty: every client.
    allowed_clients: HashSet<String>,
}

#[derive(Debug)]
pub struct ApiKeyAuth {
    settings: Settings,
    /// `http.<hcm prefix>.api_key_auth.*`
    stats: crate::stats::NamedCounters,
}

fn build(a: &Any, hcm_prefix: &str, path: &str) -> Result<Arc<dyn HttpFilter>> {
    let c: pb::ApiKeyAuth = super::decode(a, path)?;
    Ok(Arc::new(ApiKeyAuth {
        settings: Settings::from_proto(
            &c.credentials,
            &c.key_sources,
            c.forwarding.as_ref(),
            path,
        )?,
        stats: crate::stats::NamedCounters::new(format!("http.{hcm_prefix}.api_key_auth.")),
    }))
}

fn per_route(a: &Any, path: &str) -> Result<PerRoute> {
    let c: pb::ApiKeyAuthPerRoute = super::decode(a, path)?;
    Ok(Arc::new(RouteConfig {
        settings: Settings::from_proto(
            &c.credentials,
            &c.key_sources,
            c.forwarding.as_ref(),
            path,
        )?,
        allowed_clients: c.allowed_clients.iter().cloned().collect(),
    }))
}

impl ApiKeyAuth {
    fn denied(&self, status: u16, details: &'static str) -> Flow {
        let body = if status == 401 {
            self.stats.increment("unauthorized");
            "Client authentication failed."
        } else {
            self.stats.increment("forbidden");
            "Client is forbidden."
        };
        Flow::Reply(FilterReply::new(status, body, details))
    }
}

#[async_trait::async_trait]
impl HttpFilter for ApiKeyAuth {
    async fn on_request(&self, rq: &mut RequestInfo<'_>, _state: &mut Option<State>) -> Flow {
        let route: Option<Arc<RouteConfig>> = rq.all_levels::<RouteConfig>().next();
        let own = &self.settings;
        let over = route.as_deref().map(|r| &r.settings);
        let pick = |f: fn(&Settings) -> bool| over.filter(|s| f(s)).unwrap_or(own);
        let credentials = pick(|s| s.credentials.is_some()).credentials.as_ref();
        let sources = pick(|s| s.sources.is_some()).sources.as_ref();
        // A route's config forwards only as it says itself (with none, not
        // at all), unlike credentials and sources, which fall back to the
        // filter's: what Envoy 1.40 does.
        let forwarding = match over {
            Some(r) => r.forwarding.as_ref(),
            None => own.forwarding.as_ref(),
        };
        let Some(sources) = sources else {
            return self.denied(401, "missing_key_sources");
        };
        let Some(credentials) = credentials else {
            return self.denied(401, "missing_credentials");
        };
        let Some(key) = sources
            .iter()
            .filter_map(|s| s.key(rq.req))
            .find(|k| !k.is_empty())
        else {
            return self.denied(401, "missing_api_key");
        };
        let Some(client) = credentials.get(&key) else {
            // Envoy's details, spelling included.
            return self.denied(401, "unkonwn_api_key");
        };
        if let Some(r) = &route {
            if !r.allowed_clients.is_empty() && !r.allowed_clients.contains(client) {
                return self.denied(403, "client_not_allowed");
            }
        }
        if let Some(f) = forwarding {
            if let Some(h) = &f.header {
                let _ = rq.req.insert_header(h.clone(), client.as_str());
            }
            if f.hide_credentials {
                for s in sources {
                    s.remove(rq.req);
                }
            }
        }
        self.stats.increment("allowed");
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(path: &str, headers: &[(&str, &str)]) -> pingora_http::RequestHeader {
        let mut r = pingora_http::RequestHeader::build("GET", path.as_bytes(), None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn keys_from_headers_queries_and_cookies() {
        let h = Source::Header(HeaderName::from_static("x-api-key"));
        let r = request("/", &[("x-api-key", "Bearer k1")]);
        assert_eq!(h.key(&r).as_deref(), Some("k1"));
        let q = Source::Query("key".into());
        let mut r = request("/p?a=1&key=k%202&b=2", &[("cookie", "a=1; key=k3; b=2")]);
        assert_eq!(q.key(&r).as_deref(), Some("k 2"));
        let c = Source::Cookie("key".into());
        assert_eq!(c.key(&r).as_deref(), Some("k3"));
        q.remove(&mut r);
        c.remove(&mut r);
        assert_eq!(r.uri.to_string(), "/p?a=1&b=2");
        assert_eq!(r.headers.get("cookie").unwrap(), "a=1; b=2");
        // An HTTP/2 request keeps its scheme and authority.
        let mut r = request("/", &[]);
        r.set_uri("https://h.test/p?key=k&z=1".parse().unwrap());
        q.remove(&mut r);
        assert_eq!(r.uri.to_string(), "https://h.test/p?z=1");
    }

    #[test]
    fn a_source_needs_one_place() {
        let e = Source::from_proto(&pb::KeySource::default(), "f.key_sources[0]").unwrap_err();
        assert_eq!(e.path, "f.key_sources[0]");
    }
}
