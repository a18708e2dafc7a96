//! `envoy.filters.http.stateful_session`: session stickiness. The session
//! names its upstream host in a cookie or a header; a request that names
//! a healthy (or degraded) host of its cluster goes there whatever the
//! balancer would pick, and a response from another host names the new
//! one. Cookie sessions carry the address and an expiry (Envoy's format:
//! a small protobuf, base64, quoted) and apply under the cookie's path;
//! header sessions carry the address in base64. A route's
//! `StatefulSessionPerRoute` turns it off or brings its own session.

use super::{Factory, Flow, HttpFilter, OverrideHost, PerRoute, RequestInfo, ResponseInfo, State};
use crate::config::{join, ConfigError, Result};
use crate::registry::MessageSupport;
use base64::Engine;
use legate_proto::envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
use legate_proto::envoy_types::pb::envoy::extensions::filters::http::stateful_session::v3 as pb;
use legate_proto::envoy_types::pb::envoy::extensions::http::stateful_session::{
    cookie::v3 as cookie_pb, header::v3 as header_pb,
};
use legate_proto::envoy_types::pb::google::protobuf::Any;
use pingora_http::ResponseHeader;
use std::net::SocketAddr;
use std::sync::Arc;

const TYPE: &str = "envoy.extensions.filters.http.stateful_session.v3.StatefulSession";
const PER_ROUTE: &str = "envoy.extensions.filters.http.stateful_session.v3.StatefulSessionPerRoute";
const COOKIE: &str = "envoy.extensions.http.stateful_session.cookie.v3.CookieBasedSessionState";
const HEADER: &str = "envoy.extensions.http.stateful_session.header.v3.HeaderBasedSessionState";

pub static FACTORY: Factory = Factory {
    type_name: TYPE,
    build,
    per_route: &[(PER_ROUTE, per_route)],
};

pub static REGISTRY: &[MessageSupport] = &[
    MessageSupport {
        message: TYPE,
        supported: &["session_state", "strict"],
        warn: &[],
    },
    MessageSupport {
        message: PER_ROUTE,
        supported: &["disabled", "stateful_session"],
        warn: &[],
    },
    MessageSupport {
        message: COOKIE,
        supported: &["cookie"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.type.http.v3.Cookie",
        supported: &["name", "ttl", "path"],
        warn: &[],
    },
    MessageSupport {
        message: HEADER,
        supported: &["name"],
        warn: &[],
    },
];

/// Where the session keeps its host.
#[derive(Debug)]
enum Session {
    Cookie {
        name: String,
        /// Seconds; 0: a session cookie without Max-Age.
        ttl: u64,
        path: String,
    },
    Header(http::HeaderName),
}

#[derive(Debug)]
pub struct StatefulSession {
    /// None: no session state configured (Envoy loads it and keeps no
    /// sessions).
    session: Option<Arc<Session>>,
}

/// A route's override: off, or its own session.
#[derive(Debug)]
enum RouteSession {
    Disabled,
    Own(Arc<StatefulSession>),
}

/// The cookie's value: the host's address and when the session ends
/// (Envoy's `envoy.Cookie`-style message).
#[derive(Clone, PartialEq, prost::Message)]
struct SessionCookie {
    #[prost(string, tag = "1")]
    address: String,
    #[prost(uint64, tag = "2")]
    expires: u64,
}

fn session(t: Option<&TypedExtensionConfig>, path: &str) -> Result<Option<Session>> {
    let sp = join(path, "session_state");
    let Some(t) = t else { return Ok(None) };
    let a = t
        .typed_config
        .as_ref()
        .ok_or_else(|| ConfigError::new(join(&sp, "typed_config"), "typed_config is required"))?;
    let tp = join(&sp, "typed_config");
    match legate_proto::type_name(&a.type_url) {
        COOKIE => {
            let c: cookie_pb::CookieBasedSessionState = super::decode(a, &tp)?;
            let cp = join(&tp, "cookie");
            let k = c
                .cookie
                .as_ref()
                .ok_or_else(|| ConfigError::new(&cp, "cookie is required"))?;
            if k.name.is_empty() {
                return Err(ConfigError::new(
                    join(&cp, "name"),
                    "Cookie key cannot be empty for cookie based stateful sessions",
                ));
            }
            if !k.attributes.is_empty() {
                return Err(ConfigError::new(
                    join(&cp, "attributes"),
                    "cookie attributes are not supported by Legate",
                ));
            }
            let ttl = k
                .ttl
                .as_ref()
                .map(|d| crate::config::duration(d, &join(&cp, "ttl")))
                .transpose()?
                .map_or(0, |d| d.as_secs());
            Ok(Some(Session::Cookie {
                name: k.name.clone(),
                ttl,
                path: k.path.clone(),
            }))
        }
        HEADER => {
            let h: header_pb::HeaderBasedSessionState = super::decode(a, &tp)?;
            Ok(Some(Session::Header(crate::headers::header_name(
                &h.name,
                &join(&tp, "name"),
            )?)))
        }
        other => Err(ConfigError::new(
            &tp,
            format!("session state {other} is not supported by Legate"),
        )),
    }
}

fn translate(c: &pb::StatefulSession, path: &str) -> Result<StatefulSession> {
    if c.strict {
        return Err(ConfigError::new(
            join(path, "strict"),
            "strict sessions are not supported by Legate",
        ));
    }
    if !c.stat_prefix.is_empty() {
        return Err(ConfigError::new(
            join(path, "stat_prefix"),
            "stateful session stats are not supported by Legate",
        ));
    }
    Ok(StatefulSession {
        session: session(c.session_state.as_ref(), path)?.map(Arc::new),
    })
}

fn build(a: &Any, _hcm_prefix: &str, path: &str) -> Result<Arc<dyn HttpFilter>> {
    Ok(Arc::new(translate(&super::decode(a, path)?, path)?))
}

fn per_route(a: &Any, path: &str) -> Result<PerRoute> {
    let r: pb::StatefulSessionPerRoute = super::decode(a, path)?;
    use pb::stateful_session_per_route::Override;
    Ok(Arc::new(match &r.r#override {
        Some(Override::Disabled(true)) => RouteSession::Disabled,
        Some(Override::Disabled(false)) => {
            return Err(ConfigError::new(
                join(path, "disabled"),
                "disabled must be true when set",
            ))
        }
        Some(Override::StatefulSession(s)) => {
            RouteSession::Own(Arc::new(translate(s, &join(path, "stateful_session"))?))
        }
        None => return Err(ConfigError::new(path, "an override is required")),
    }))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether a cookie path covers the request path, as Envoy's cookie
/// session decides: no path or `/` covers all, a path ending in `/` its
/// prefix, another path itself and what follows it after `/`, `?`, `#`.
fn path_covers(cookie_path: &str, request_path: &str) -> bool {
    if cookie_path.is_empty() || cookie_path == "/" {
        return true;
    }
    if cookie_path.ends_with('/') {
        return request_path.starts_with(cookie_path);
    }
    match request_path.strip_prefix(cookie_path) {
        Some(rest) => rest.is_empty() || rest.starts_with(['/', '?', '#']),
        None => false,
    }
}

/// What the request's session names, and whether the session applies.
struct Live {
    session: Arc<Session>,
    address: Option<String>,
}

impl Session {
    /// The address the request's session names (an expired cookie names
    /// none); None when the session does not apply to this path.
    fn read(&self, rq: &RequestInfo<'_>) -> Option<Option<String>> {
        let b64 = base64::engine::general_purpose::STANDARD;
        match self {
            Session::Cookie { name, path, .. } => {
                let req_path = rq.req.uri.path_and_query().map_or("/", |p| p.as_str());
                if !path_covers(path, req_path) {
                    return None;
                }
                let raw = crate::headers::cookie(&rq.req.headers, name).unwrap_or_default();
                let bytes = b64.decode(raw.as_bytes()).unwrap_or_default();
                match <SessionCookie as prost::Message>::decode(bytes.as_slice()) {
                    Ok(c) if !c.address.is_empty() => {
                        let live = c.expires == 0 || c.expires >= now();
                        Some(live.then_some(c.address))
                    }
                    // An older Envoy's cookie: the address as text.
                    _ => Some(String::from_utf8(bytes).ok().filter(|a| !a.is_empty())),
                }
            }
            Session::Header(h) => {
                let v = rq.req.headers.get(h).map(|v| v.as_bytes().to_vec());
                let addr = v
                    .and_then(|v| b64.decode(v).ok())
                    .and_then(|b| String::from_utf8(b).ok())
                    .filter(|a| !a.is_empty());
                Some(addr)
            }
        }
    }

    /// The response names `upstream` for the session.
    fn update(&self, resp: &mut ResponseHeader, upstream: SocketAddr) {
        let b64 = base64::engine::general_purpose::STANDARD;
        let addr = upstream.to_string();
        match self {
            Session::Cookie { name, ttl, path } => {
                let c = SessionCookie {
                    address: addr,
                    expires: if *ttl == 0 { 0 } else { now() + ttl },
                };
                let value = b64.encode(prost::Message::encode_to_vec(&c));
                let mut s = format!("{name}=\"{value}\"");
                if *ttl > 0 {
                    s.push_str(&format!("; Max-Age={ttl}"));
                }
                if !path.is_empty() {
                    s.push_str(&format!("; Path={path}"));
                }
                s.push_str("; HttpOnly");
                let _ = resp.append_header(http::header::SET_COOKIE, s);
            }
            Session::Header(h) => {
                let _ = resp.insert_header(h.clone(), b64.encode(addr.as_bytes()));
            }
        }
    }
}

#[async_trait::async_trait]
impl HttpFilter for StatefulSession {
    async fn on_request(&self, rq: &mut RequestInfo<'_>, state: &mut Option<State>) -> Flow {
        let session = match rq.all_levels::<RouteSession>().next().as_deref() {
            Some(RouteSession::Disabled) => return Flow::Continue,
            Some(RouteSession::Own(s)) => s.session.clone(),
            None => self.session.clone(),
        };
        let Some(session) = session else {
            return Flow::Continue;
        };
        let Some(address) = session.read(rq) else {
            return Flow::Continue;
        };
        if let Some(a) = address
            .as_deref()
            .and_then(|a| a.parse::<SocketAddr>().ok())
        {
            rq.filter_state.insert(OverrideHost(a));
        }
        *state = Some(Box::new(Live { session, address }));
        Flow::Continue
    }

    fn on_response(
        &self,
        resp: &mut ResponseHeader,
        info: &ResponseInfo<'_>,
        state: Option<&State>,
    ) {
        let Some(live) = state.and_then(|s| s.downcast_ref::<Live>()) else {
            return;
        };
        let Some(up) = info.upstream else { return };
        if live.address.as_deref() != Some(up.to_string().as_str()) {
            live.session.update(resp, up);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_paths_cover_as_envoys_do() {
        assert!(path_covers("", "/x") && path_covers("/", "/x"));
        assert!(path_covers("/v2/", "/v2/a") && !path_covers("/v2/", "/v2"));
        assert!(
            path_covers("/v1", "/v1") && path_covers("/v1", "/v1?a") && path_covers("/v1", "/v1/b")
        );
        assert!(!path_covers("/v1", "/v10"));
    }

    #[test]
    fn the_cookie_is_envoys_message() {
        // What Envoy 1.40 set for 127.0.0.1:18181 with a one-hour ttl.
        let raw = base64::engine::general_purpose::STANDARD
            .decode("Cg8xMjcuMC4wLjE6MTgxODEQ2qPb2AY=")
            .unwrap();
        let c = <SessionCookie as prost::Message>::decode(raw.as_slice()).unwrap();
        assert_eq!(c.address, "127.0.0.1:18181");
        assert_eq!(c.expires, 1_796_657_626);
    }
}
