//! `envoy.filters.http.credential_injector` with the generic credential
//! (`envoy.http.injected_credentials.generic`): the bytes of a generic
//! secret (trailing CR/LF dropped, after `header_value_prefix`) go into a
//! request header, `Authorization` unless named. A request that has the
//! header already keeps it unless `overwrite`; a secret that is missing or
//! empty fails the request with 401 unless
//! `allow_request_without_credential`.

use super::{Factory, FilterReply, Flow, HttpFilter, RequestInfo, State};
use crate::config::source::XdsSource;
use crate::config::tls::GenericSecret;
use crate::config::{join, ConfigError, Result};
use crate::registry::MessageSupport;
use http::HeaderName;
use legate_proto::envoy_types::pb::envoy::extensions::filters::http::credential_injector::v3 as pb;
use legate_proto::envoy_types::pb::envoy::extensions::http::injected_credentials::generic::v3 as generic;
use legate_proto::envoy_types::pb::google::protobuf::Any;
use std::sync::Arc;

const TYPE: &str = "envoy.extensions.filters.http.credential_injector.v3.CredentialInjector";
const GENERIC: &str = "envoy.extensions.http.injected_credentials.generic.v3.Generic";

pub static FACTORY: Factory = Factory {
    type_name: TYPE,
    build,
    per_route: &[],
};

pub static REGISTRY: &[MessageSupport] = &[
    MessageSupport {
        message: TYPE,
        supported: &[
            "overwrite",
            "allow_request_without_credential",
            "credential",
        ],
        warn: &[],
    },
    MessageSupport {
        message: GENERIC,
        supported: &["credential", "header", "header_value_prefix"],
        warn: &[],
    },
];

#[derive(Debug)]
pub struct CredentialInjector {
    secret: GenericSecret,
    header: HeaderName,
    prefix: String,
    overwrite: bool,
    allow_without: bool,
    /// The SDS secret it reads, for the listener to subscribe to.
    sds: Vec<(String, XdsSource)>,
    /// `http.<hcm prefix>.credential_injector.*`
    stats: crate::stats::NamedCounters,
}

fn build(a: &Any, hcm_prefix: &str, path: &str) -> Result<Arc<dyn HttpFilter>> {
    let c: pb::CredentialInjector = super::decode(a, path)?;
    let cp = join(path, "credential");
    let ext = c
        .credential
        .as_ref()
        .ok_or_else(|| ConfigError::new(&cp, "credential is required"))?;
    let tc = ext
        .typed_config
        .as_ref()
        .ok_or_else(|| ConfigError::new(join(&cp, "typed_config"), "typed_config is required"))?;
    let type_name = tc.type_url.rsplit('/').next().unwrap_or("");
    if type_name != GENERIC {
        return Err(ConfigError::new(
            join(&cp, "typed_config"),
            format!("credential {type_name} is not supported by Legate (the generic one is)"),
        ));
    }
    let g: generic::Generic = super::decode(tc, &join(&cp, "typed_config"))?;
    let gp = join(&cp, "typed_config");
    let s = g
        .credential
        .as_ref()
        .ok_or_else(|| ConfigError::new(join(&gp, "credential"), "credential is required"))?;
    let mut sds = Vec::new();
    let secret = GenericSecret::from_proto(s, &join(&gp, "credential"), &mut sds)?;
    let header = if g.header.is_empty() {
        http::header::AUTHORIZATION
    } else {
        crate::headers::header_name(&g.header, &join(&gp, "header"))?
    };
    Ok(Arc::new(CredentialInjector {
        secret,
        header,
        prefix: g.header_value_prefix.clone(),
        overwrite: c.overwrite,
        allow_without: c.allow_request_without_credential,
        sds,
        stats: crate::stats::NamedCounters::new(format!("http.{hcm_prefix}.credential_injector.")),
    }))
}

impl CredentialInjector {
    /// The header value, if the secret has a credential.
    fn value(&self) -> Option<http::HeaderValue> {
        let bytes = self.secret.current()?;
        let mut b: &[u8] = &bytes;
        while let [rest @ .., b'\r' | b'\n'] = b {
            b = rest;
        }
        if b.is_empty() {
            return None;
        }
        let mut v = self.prefix.as_bytes().to_vec();
        v.extend_from_slice(b);
        http::HeaderValue::from_bytes(&v).ok()
    }
}

#[async_trait::async_trait]
impl HttpFilter for CredentialInjector {
    async fn on_request(&self, rq: &mut RequestInfo<'_>, _state: &mut Option<State>) -> Flow {
        if !self.overwrite && rq.req.headers.contains_key(&self.header) {
            self.stats.increment("already_exists");
            return Flow::Continue;
        }
        match self.value() {
            Some(v) => {
                let _ = rq.req.insert_header(self.header.clone(), v);
                self.stats.increment("injected");
                Flow::Continue
            }
            None => {
                self.stats.increment("failed");
                if self.allow_without {
                    return Flow::Continue;
                }
                Flow::Reply(FilterReply::new(
                    401,
                    "Failed to inject credential.",
                    "failed_to_inject_credential",
                ))
            }
        }
    }

    fn sds_refs(&self) -> &[(String, XdsSource)] {
        &self.sds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_line_ends_are_dropped_and_the_prefix_kept() {
        let f = CredentialInjector {
            secret: GenericSecret::Fixed(bytes::Bytes::from_static(b"s3cr3t\r\n")),
            header: http::header::AUTHORIZATION,
            prefix: "Bearer ".into(),
            overwrite: false,
            allow_without: false,
            sds: Vec::new(),
            stats: crate::stats::NamedCounters::new("t.".into()),
        };
        assert_eq!(f.value().unwrap(), "Bearer s3cr3t");
        let empty = CredentialInjector {
            secret: GenericSecret::Fixed(bytes::Bytes::from_static(b"\n")),
            ..f
        };
        assert!(empty.value().is_none());
    }
}
