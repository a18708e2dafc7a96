//! `istio.alpn` (`istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig`):
//! a request's upstream TLS connection offers, instead of its cluster's
//! ALPN list, the list configured for the HTTP version the request goes
//! upstream in (istiod: `istio-h2, istio, h2` and the like), so that the
//! peer sidecar's filter chains can tell Istio traffic by ALPN. A cluster
//! with `filter_metadata.istio.alpn_override: "false"` keeps its own list.
//! Plaintext connections are not affected. On an `auto_config` cluster
//! (ALPN picks the version) the override is not applied: Legate picks the
//! version from the cluster's own list.
//!
//! The list goes to the stream's filter state as [`AlpnOverride`], which the
//! router reads when it picks a connection (connections offering another
//! list are pooled apart).

use crate::config::cluster::UpstreamProtocol;
use crate::config::{ConfigError, Result};
use crate::http_filters::{Factory, Flow, HttpFilter, RequestInfo, State};
use crate::registry::MessageSupport;
use legate_proto::envoy_types::pb::google::protobuf::Any;
use legate_proto::istio::ALPN as TYPE;
use legate_proto::prost_reflect::Value;
use std::sync::Arc;

pub static FACTORY: Factory = Factory {
    type_name: TYPE,
    build,
    per_route: &[],
};

pub static REGISTRY: &[MessageSupport] = &[
    MessageSupport {
        message: TYPE,
        supported: &["alpn_override"],
        warn: &[],
    },
    MessageSupport {
        message: "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig.AlpnOverride",
        supported: &["upstream_protocol", "alpn_override"],
        warn: &[],
    },
];

/// The ALPN list a request's upstream TLS connection offers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AlpnOverride(pub Arc<[String]>);

impl AlpnOverride {
    /// Mixed into a connection's pool key, so connections that offered
    /// another list are not reused for this one.
    pub fn pool_key(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.0.hash(&mut h);
        h.finish() | 1
    }
}

/// Lists by upstream HTTP version: HTTP/1.0, HTTP/1.1, HTTP/2.
#[derive(Debug, Default)]
pub struct Alpn {
    lists: [Option<AlpnOverride>; 3],
}

fn build(a: &Any, _hcm_prefix: &str, path: &str) -> Result<Arc<dyn HttpFilter>> {
    let m = legate_proto::walk::decode_any(&a.type_url, &a.value, path)
        .map_err(|e| ConfigError::new(path, e.to_string()))?;
    let mut f = Alpn::default();
    if let Some(Value::List(entries)) = m.get_field_by_name("alpn_override").as_deref() {
        for e in entries.iter().filter_map(Value::as_message) {
            let proto = e
                .get_field_by_name("upstream_protocol")
                .and_then(|v| v.as_enum_number())
                .unwrap_or(0);
            let list: Vec<String> = match e.get_field_by_name("alpn_override").as_deref() {
                Some(Value::List(l)) => l
                    .iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect(),
                _ => Vec::new(),
            };
            // Istio's proxy keeps the last entry of a protocol; an empty
            // list overrides nothing.
            if let Some(slot) = usize::try_from(proto).ok().and_then(|i| f.lists.get_mut(i)) {
                *slot = (!list.is_empty()).then(|| AlpnOverride(list.into()));
            }
        }
    }
    Ok(Arc::new(f))
}

/// The HTTP version a request goes upstream in, as Envoy's cluster decides
/// it: 0 HTTP/1.0, 1 HTTP/1.1, 2 HTTP/2.
fn upstream_version(protocol: UpstreamProtocol, downstream: http::Version) -> usize {
    match protocol {
        UpstreamProtocol::Http2 | UpstreamProtocol::Auto => 2,
        UpstreamProtocol::Http1 => 1,
        // Envoy sends HTTP/1.0 requests upstream as HTTP/1.1.
        UpstreamProtocol::Downstream => match downstream {
            http::Version::HTTP_09 | http::Version::HTTP_10 | http::Version::HTTP_11 => 1,
            _ => 2,
        },
    }
}

#[async_trait::async_trait]
impl HttpFilter for Alpn {
    async fn on_request(&self, rq: &mut RequestInfo<'_>, _state: &mut Option<State>) -> Flow {
        let Some(cluster) = rq.cluster.and_then(|c| rq.clusters.get(c)) else {
            return Flow::Continue;
        };
        if cluster.config.istio.no_alpn_override {
            return Flow::Continue;
        }
        let v = upstream_version(cluster.config.protocol, rq.req.version);
        if let Some(list) = &self.lists[v] {
            rq.filter_state.insert(list.clone());
        }
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istiods_table_translates_by_version() {
        let m = legate_proto::json::to_dynamic(
            serde_json::json!({"alpn_override": [
                {"alpn_override": ["istio-http/1.0", "istio", "http/1.0"]},
                {"upstream_protocol": "HTTP11", "alpn_override": ["istio-http/1.1", "istio", "http/1.1"]},
                {"upstream_protocol": "HTTP2", "alpn_override": ["istio-h2", "istio", "h2"]}]}),
            TYPE,
            true,
        )
        .unwrap();
        let a = Any {
            type_url: format!("type.googleapis.com/{TYPE}"),
            value: prost::Message::encode_to_vec(&m),
        };
        let f = build(&a, "", "p").unwrap();
        let f = format!("{f:?}");
        for want in ["istio-http/1.0", "istio-http/1.1", "istio-h2"] {
            assert!(f.contains(want), "{f}");
        }
        assert_eq!(
            upstream_version(UpstreamProtocol::Downstream, http::Version::HTTP_10),
            1
        );
        assert_eq!(
            upstream_version(UpstreamProtocol::Downstream, http::Version::HTTP_2),
            2
        );
        assert_eq!(
            upstream_version(UpstreamProtocol::Http1, http::Version::HTTP_2),
            1
        );
    }
}
