//! `envoy.filters.http.basic_auth`: HTTP Basic authentication against an
//! htpasswd list of SHA-1 users (`user:{SHA}base64(sha1(password))`, the
//! only format Envoy accepts), the filter's or a route's
//! `BasicAuthPerRoute`. A request without valid credentials gets 401.

use super::{Factory, FilterReply, Flow, HttpFilter, PerRoute, RequestInfo, State};
use crate::config::{join, ConfigError, Result};
use crate::registry::MessageSupport;
use base64::Engine;
use http::HeaderName;
use legate_proto::envoy_types::pb::envoy::extensions::filters::http::basic_auth::v3 as pb;
use legate_proto::envoy_types::pb::google::protobuf::Any;
use std::collections::HashMap;
use std::sync::Arc;

const TYPE: &str = "envoy.extensions.filters.http.basic_auth.v3.BasicAuth";
const PER_ROUTE_TYPE: &str = "envoy.extensions.filters.http.basic_auth.v3.BasicAuthPerRoute";

pub static FACTORY: Factory = Factory {
    type_name: TYPE,
    build,
    per_route: &[(PER_ROUTE_TYPE, per_route)],
};

pub static REGISTRY: &[MessageSupport] = &[
    MessageSupport {
        message: TYPE,
        supported: &["users", "forward_username_header", "authentication_header"],
        warn: &[],
    },
    MessageSupport {
        message: PER_ROUTE_TYPE,
        supported: &["users"],
        warn: &[],
    },
];

/// Users and the SHA-1 digests of their passwords.
#[derive(Debug)]
pub struct Users(HashMap<String, [u8; 20]>);

impl Users {
    fn from_proto(
        ds: Option<&legate_proto::envoy_types::pb::envoy::config::core::v3::DataSource>,
        path: &str,
    ) -> Result<Self> {
        let p = join(path, "users");
        let ds = ds.ok_or_else(|| ConfigError::new(&p, "users is required"))?;
        let text = crate::datasource::read(ds, &p)?;
        let text = String::from_utf8_lossy(&text);
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let bad = |why: &str| ConfigError::new(&p, format!("line {}: {why}", n + 1));
            let (user, hash) = line.split_once(':').ok_or_else(|| bad("not user:hash"))?;
            let b64 = hash
                .strip_prefix("{SHA}")
                .ok_or_else(|| bad("unsupported htpasswd format, please use {SHA}"))?;
            let digest: [u8; 20] = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .ok()
                .and_then(|d| d.try_into().ok())
                .ok_or_else(|| bad("invalid SHA hash"))?;
            if users.insert(user.to_string(), digest).is_some() {
                return Err(bad(&format!("duplicate user '{user}'")));
            }
        }
        Ok(Self(users))
    }

    fn valid(&self, user: &str, password: &str) -> bool {
        let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, password.as_bytes());
        self.0.get(user).is_some_and(|want| {
            ring::constant_time::verify_slices_are_equal(want, d.as_ref()).is_ok()
        })
    }
}

#[derive(Debug)]
pub struct BasicAuth {
    users: Users,
    forward_username: Option<HeaderName>,
    /// Where the credentials are (Authorization unless set).
    header: HeaderName,
    /// `http.<hcm prefix>.basic_auth.*`
    stats: crate::stats::NamedCounters,
}

fn build(a: &Any, hcm_prefix: &str, path: &str) -> Result<Arc<dyn HttpFilter>> {
    let c: pb::BasicAuth = super::decode(a, path)?;
    if c.allow_missing {
        return Err(ConfigError::new(
            join(path, "allow_missing"),
            "not supported yet",
        ));
    }
    let name = |s: &str, f: &str| crate::headers::header_name(s, &join(path, f));
    Ok(Arc::new(BasicAuth {
        users: Users::from_proto(c.users.as_ref(), path)?,
        forward_username: (!c.forward_username_header.is_empty())
            .then(|| name(&c.forward_username_header, "forward_username_header"))
            .transpose()?,
        header: if c.authentication_header.is_empty() {
            http::header::AUTHORIZATION
        } else {
            name(&c.authentication_header, "authentication_header")?
        },
        stats: crate::stats::NamedCounters::new(format!("http.{hcm_prefix}.basic_auth.")),
    }))
}

fn per_route(a: &Any, path: &str) -> Result<PerRoute> {
    let c: pb::BasicAuthPerRoute = super::decode(a, path)?;
    Ok(Arc::new(Users::from_proto(c.users.as_ref(), path)?))
}

/// The credentials of `value`: `Basic base64(user:password)`.
fn credentials(value: &str) -> std::result::Result<(String, String), (&'static str, &'static str)> {
    let Some(b64) = value
        .get(..6)
        .filter(|s| s.eq_ignore_ascii_case("basic "))
        .map(|_| value[6..].trim())
    else {
        return Err((
            "User authentication failed. Expected 'Basic' authentication scheme.",
            "invalid_scheme_for_basic_auth",
        ));
    };
    let invalid = (
        "User authentication failed. Invalid basic credential format.",
        "invalid_format_for_basic_auth",
    );
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| invalid)?;
    let text = String::from_utf8(decoded).map_err(|_| invalid)?;
    let (u, p) = text.split_once(':').ok_or(invalid)?;
    Ok((u.to_string(), p.to_string()))
}

#[async_trait::async_trait]
impl HttpFilter for BasicAuth {
    async fn on_request(&self, rq: &mut RequestInfo<'_>, _state: &mut Option<State>) -> Flow {
        let route: Option<Arc<Users>> = rq.all_levels::<Users>().next();
        let users = route.as_deref().unwrap_or(&self.users);
        // Envoy's challenge names the request's URL as the realm.
        let realm = format!(
            "Basic realm=\"{}://{}{}\"",
            rq.scheme,
            rq.authority(),
            rq.req.uri.path_and_query().map_or("/", |p| p.as_str())
        );
        let denied = |body: &'static str, details: &'static str| {
            self.stats.increment("denied");
            let mut r = FilterReply::new(401, body, details);
            if let Ok(v) = http::HeaderValue::from_str(&realm) {
                r.headers.push((http::header::WWW_AUTHENTICATE, v));
            }
            Flow::Reply(r)
        };
        let Some(value) = rq
            .req
            .headers
            .get(&self.header)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
        else {
            return denied(
                "User authentication failed. Missing username and password.",
                "no_credential_for_basic_auth",
            );
        };
        let (user, password) = match credentials(value) {
            Ok(c) => c,
            Err((body, details)) => return denied(body, details),
        };
        if !users.valid(&user, &password) {
            return denied(
                "User authentication failed. Invalid username/password combination.",
                "invalid_credential_for_basic_auth",
            );
        }
        if let Some(h) = &self.forward_username {
            let _ = rq.req.insert_header(h.clone(), user);
        }
        self.stats.increment("allowed");
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha_users_and_credentials() {
        // "test:test" as htpasswd -s makes it.
        let ds = legate_proto::envoy_types::pb::envoy::config::core::v3::DataSource {
            specifier: Some(
                legate_proto::envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineString(
                    "test:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=\n".into(),
                ),
            ),
            ..Default::default()
        };
        let u = Users::from_proto(Some(&ds), "f").unwrap();
        assert!(u.valid("test", "test"));
        assert!(!u.valid("test", "nope"));
        assert!(!u.valid("other", "test"));
        assert_eq!(
            credentials("Basic dGVzdDp0ZXN0").unwrap(),
            ("test".to_string(), "test".to_string())
        );
        assert_eq!(
            credentials("Bearer x").unwrap_err().1,
            "invalid_scheme_for_basic_auth"
        );
        assert_eq!(
            credentials("basic %%%").unwrap_err().1,
            "invalid_format_for_basic_auth"
        );
    }
}
