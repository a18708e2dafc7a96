//! Istio's own proxy extensions, which istiod sends in its default profile
//! and which only Istio's build of Envoy has: the HTTP peer metadata
//! filter, the TCP metadata exchange, `istio.alpn` and `istio.stats`. Their
//! semantics are Istio's proxy's (there is no upstream Envoy to compare
//! with); the config types are declared in `legate_proto::istio`.

pub mod alpn;
pub mod exchange;
pub mod metrics;
pub mod peer;
pub mod peer_metadata;
pub mod stats;

use crate::config::wkt::value::Kind;
use legate_proto::envoy_types::pb::envoy::config::core::v3::Metadata;

/// What Istio's extensions read from a cluster's `filter_metadata.istio`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterFacts {
    /// `services[0]`: (host, name, namespace), for `istio.stats`.
    pub service: Option<(String, String, String)>,
    /// `alpn_override: "false"`: `istio.alpn` leaves the cluster's ALPN.
    pub no_alpn_override: bool,
    /// `disable_mx: true`: no peer metadata headers to or from it.
    pub disable_mx: bool,
    /// `external: true`: a service outside the mesh.
    pub external: bool,
}

impl ClusterFacts {
    pub fn from_metadata(m: Option<&Metadata>) -> ClusterFacts {
        let Some(istio) = m.and_then(|m| m.filter_metadata.get("istio")) else {
            return ClusterFacts::default();
        };
        let get = |k: &str| istio.fields.get(k).and_then(|v| v.kind.as_ref());
        let service = match get("services") {
            Some(Kind::ListValue(l)) => l.values.first().and_then(|v| match &v.kind {
                Some(Kind::StructValue(s)) => {
                    let f = |k: &str| match s.fields.get(k).and_then(|v| v.kind.as_ref()) {
                        Some(Kind::StringValue(t)) => t.clone(),
                        _ => String::new(),
                    };
                    Some((f("host"), f("name"), f("namespace")))
                }
                _ => None,
            }),
            _ => None,
        };
        ClusterFacts {
            service,
            no_alpn_override: matches!(get("alpn_override"), Some(Kind::StringValue(s)) if s == "false"),
            disable_mx: matches!(get("disable_mx"), Some(Kind::BoolValue(true))),
            external: matches!(get("external"), Some(Kind::BoolValue(true))),
        }
    }
}
