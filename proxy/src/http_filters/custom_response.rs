//! `envoy.filters.http.custom_response`: a response (the upstream's or a
//! local reply) that the matcher picks is replaced by a local reply of the
//! matched policy: its status (else the response's), its body (`body`,
//! through `body_format`), and its headers. Only the local response
//! policy is supported; the redirect policy is refused naming the field.
//! Routes' `CustomResponse`s are asked first (most specific level first),
//! then the filter's.

use super::{Factory, FilterReply, Flow, HttpFilter, PerRoute, RequestInfo, ResponseInfo, State};
use crate::config::route::BodyFormat;
use crate::config::unified_matcher::{Data, Domain, Matcher, ResponseData};
use crate::config::{index, join, ConfigError, Result, Wrapped};
use crate::headers::{AppendAction, HeaderAdd};
use crate::registry::MessageSupport;
use legate_proto::envoy_types::pb::envoy::extensions::filters::http::custom_response::v3 as pb;
use legate_proto::envoy_types::pb::envoy::extensions::http::custom_response::local_response_policy::v3 as lrp;
use legate_proto::envoy_types::pb::google::protobuf::Any;
use legate_proto::envoy_types::pb::xds::core::v3::TypedExtensionConfig;
use pingora_http::ResponseHeader;
use std::sync::Arc;

const TYPE: &str = "envoy.extensions.filters.http.custom_response.v3.CustomResponse";
const LOCAL: &str =
    "envoy.extensions.http.custom_response.local_response_policy.v3.LocalResponsePolicy";

pub static FACTORY: Factory = Factory {
    type_name: TYPE,
    build,
    per_route: &[(TYPE, per_route)],
};

pub static REGISTRY: &[MessageSupport] = &[
    MessageSupport {
        message: TYPE,
        supported: &["custom_response_matcher"],
        warn: &[],
    },
    MessageSupport {
        message: LOCAL,
        supported: &[
            "body",
            "body_format",
            "status_code",
            "response_headers_to_add",
        ],
        warn: &[],
    },
];

/// A local response policy.
#[derive(Debug)]
struct LocalResponse {
    body: bytes::Bytes,
    format: Option<BodyFormat>,
    status: Option<u16>,
    headers: Vec<HeaderAdd>,
}

#[derive(Debug)]
pub struct CustomResponse {
    matcher: Matcher<Arc<LocalResponse>>,
}

fn policy(t: &TypedExtensionConfig, path: &str) -> Result<Arc<LocalResponse>> {
    let a = t
        .typed_config
        .as_ref()
        .ok_or_else(|| ConfigError::new(join(path, "typed_config"), "typed_config is required"))?;
    let tn = legate_proto::type_name(&a.type_url);
    if tn != LOCAL {
        return Err(ConfigError::new(
            join(path, "typed_config"),
            format!("custom response policy {tn} is not supported by Legate (the local response policy is)"),
        ));
    }
    let p = join(path, "typed_config");
    let c: lrp::LocalResponsePolicy = super::decode(a, &p)?;
    if c.response_code_details_action.is_some() {
        return Err(ConfigError::new(
            join(&p, "response_code_details_action"),
            "not supported by Legate",
        ));
    }
    let status = c
        .status_code
        .val()
        .map(|s| {
            u16::try_from(s)
                .ok()
                .filter(|s| (200..600).contains(s))
                .ok_or_else(|| ConfigError::new(join(&p, "status_code"), "must be in 200..599"))
        })
        .transpose()?;
    Ok(Arc::new(LocalResponse {
        body: c
            .body
            .as_ref()
            .map(|ds| crate::datasource::read(ds, &join(&p, "body")))
            .transpose()?
            .unwrap_or_default(),
        format: c
            .body_format
            .as_ref()
            .map(|f| BodyFormat::from_proto(f, &join(&p, "body_format")))
            .transpose()?,
        status,
        headers: c
            .response_headers_to_add
            .iter()
            .enumerate()
            .map(|(i, o)| crate::headers::header_add(o, &index(&p, "response_headers_to_add", i)))
            .collect::<Result<_>>()?,
    }))
}

fn translate(c: &pb::CustomResponse, path: &str) -> Result<CustomResponse> {
    let m = c.custom_response_matcher.as_ref().ok_or_else(|| {
        ConfigError::new(
            join(path, "custom_response_matcher"),
            "custom_response_matcher is required",
        )
    })?;
    Ok(CustomResponse {
        matcher: Matcher::from_proto_in(
            m,
            &join(path, "custom_response_matcher"),
            &policy,
            Domain::HttpResponse,
        )?,
    })
}

fn build(a: &Any, _hcm_prefix: &str, path: &str) -> Result<Arc<dyn HttpFilter>> {
    Ok(Arc::new(translate(&super::decode(a, path)?, path)?))
}

fn per_route(a: &Any, path: &str) -> Result<PerRoute> {
    Ok(Arc::new(translate(&super::decode(a, path)?, path)?))
}

/// The routes' own configs (most specific first), kept from the request
/// for the response.
struct RouteConfigs(Vec<Arc<CustomResponse>>);

impl LocalResponse {
    /// The reply: the policy's status (else the response's), its body and
    /// headers. A header added with a value the reply already has (its
    /// text/plain type) is appended, overwritten or skipped as asked.
    fn reply(&self, status: u16) -> FilterReply {
        let body = match &self.format {
            Some(f) => f.render(&self.body),
            None => self.body.clone(),
        };
        let mut r = FilterReply::new(self.status.unwrap_or(status), "", "");
        r.body = body;
        let ctx = crate::headers::FormatContext::default();
        for h in &self.headers {
            let value = h.value.render(&ctx);
            if value.is_empty() && !h.keep_empty {
                continue;
            }
            let Ok(v) = http::HeaderValue::from_str(&value) else {
                continue;
            };
            let has = |r: &FilterReply| r.headers.iter().any(|(k, _)| *k == h.name);
            let content_type = h.name == http::header::CONTENT_TYPE && !r.body.is_empty();
            match h.action {
                AppendAction::OverwriteIfExistsOrAdd => {
                    r.headers.retain(|(k, _)| *k != h.name);
                    r.headers.push((h.name.clone(), v));
                }
                AppendAction::AddIfAbsent if has(&r) || content_type => {}
                AppendAction::OverwriteIfExists if !has(&r) && !content_type => {}
                AppendAction::OverwriteIfExists => {
                    r.headers.retain(|(k, _)| *k != h.name);
                    r.headers.push((h.name.clone(), v));
                }
                AppendAction::AppendIfExistsOrAdd if content_type && !has(&r) => {
                    // The reply's own type comes first, as in Envoy.
                    r.headers
                        .push((h.name.clone(), http::HeaderValue::from_static("text/plain")));
                    r.headers.push((h.name.clone(), v));
                }
                AppendAction::AddIfAbsent | AppendAction::AppendIfExistsOrAdd => {
                    r.headers.push((h.name.clone(), v))
                }
            }
        }
        r
    }
}

#[async_trait::async_trait]
impl HttpFilter for CustomResponse {
    async fn on_request(&self, rq: &mut RequestInfo<'_>, state: &mut Option<State>) -> Flow {
        let levels: Vec<Arc<CustomResponse>> = rq.all_levels::<CustomResponse>().collect();
        if !levels.is_empty() {
            *state = Some(Box::new(RouteConfigs(levels)));
        }
        Flow::Continue
    }

    fn waits_on_response(&self) -> bool {
        true
    }

    async fn on_response_wait(
        &self,
        resp: &mut ResponseHeader,
        info: &ResponseInfo<'_>,
        state: &mut Option<State>,
    ) -> Option<FilterReply> {
        let levels: Vec<Arc<CustomResponse>> = state
            .as_ref()
            .and_then(|s| s.downcast_ref::<RouteConfigs>())
            .map(|r| r.0.clone())
            .unwrap_or_default();
        let status = resp.status.as_u16();
        let metadata = serde_json::Map::new();
        let data = Data {
            headers: &info.req.headers,
            pseudo: crate::config::matcher::Pseudo {
                method: info.req.method.as_str(),
                path: info.req.uri.path_and_query().map_or("/", |p| p.as_str()),
                authority: crate::routing::authority(info.req),
                scheme: "",
                status: None,
            },
            metadata: &metadata,
            remote: info.remote,
            direct_remote: info.direct_remote,
            local: info.local_addr,
            sni: "",
            response: Some(ResponseData {
                status,
                headers: &resp.headers,
                local_reply: info.local,
            }),
        };
        // The most specific level whose matcher picks a policy, else the
        // filter's own (as Envoy falls back).
        levels
            .iter()
            .find_map(|l| l.matcher.evaluate(&data))
            .or_else(|| self.matcher.evaluate(&data))
            .map(|p| p.reply(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(name: &str, value: &str, action: AppendAction) -> HeaderAdd {
        HeaderAdd {
            name: http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value: crate::headers::HeaderValueFormat::parse(value, "v").unwrap(),
            action,
            keep_empty: false,
        }
    }

    #[test]
    fn the_reply_takes_the_policys_status_body_and_headers() {
        let p = LocalResponse {
            body: bytes::Bytes::from_static(b"x"),
            format: None,
            status: None,
            headers: vec![
                add(
                    "content-type",
                    "application/json",
                    AppendAction::AppendIfExistsOrAdd,
                ),
                add("x-a", "1", AppendAction::AddIfAbsent),
                add("x-a", "2", AppendAction::AddIfAbsent),
            ],
        };
        let r = p.reply(404);
        assert_eq!(r.status, 404);
        assert_eq!(&r.body[..], b"x");
        let values: Vec<(&str, &str)> = r
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            values,
            [
                ("content-type", "text/plain"),
                ("content-type", "application/json"),
                ("x-a", "1")
            ]
        );
    }
}
