//! Istio's HTTP peer metadata filter (`io.istio.http.peer_metadata.Config`,
//! named `istio.metadata_exchange` by istiod): each side of a sidecar pair
//! tells the other who it is in `x-envoy-peer-metadata` (the flat node,
//! base64) and `x-envoy-peer-metadata-id` (its node id), and learns who the
//! other is from the same headers, which it removes.
//!
//! - Downstream discovery reads the request's headers; upstream discovery
//!   reads the response's. The first method that finds a peer wins; then
//!   every `istio_headers` method removes both headers.
//! - Upstream propagation sets both headers on the request; downstream
//!   propagation sets each on the response only if the request carried it.
//!   Neither runs for a cluster with `istio.disable_mx`, nor, with
//!   `skip_external_clusters`, for `PassthroughCluster` or an `istio.external`
//!   cluster.
//! - `workload_discovery` needs Istio's workload metadata service, which a
//!   proxy has only with its bootstrap extension (waypoints, ambient): as in
//!   Istio's proxy without it, it finds nothing. `baggage` and
//!   `upstream_filter_state` (waypoints) and `shared_with_upstream` are
//!   refused.
//!
//! The peers found go to the stream's [`Peers`], which `istio.stats` reads.

use super::peer::{Peers, Workload};
use crate::config::{ConfigError, Result};
use crate::http_filters::{Factory, Flow, HttpFilter, RequestInfo, ResponseInfo, State};
use crate::registry::MessageSupport;
use http::HeaderValue;
use legate_proto::envoy_types::pb::google::protobuf::Any;
use legate_proto::istio::PEER_METADATA as TYPE;
use legate_proto::prost_reflect::{DynamicMessage, Value};
use pingora_http::ResponseHeader;
use std::sync::Arc;

pub const METADATA: &str = "x-envoy-peer-metadata";
pub const METADATA_ID: &str = "x-envoy-peer-metadata-id";

pub static FACTORY: Factory = Factory {
    type_name: TYPE,
    build,
    per_route: &[],
};

pub static REGISTRY: &[MessageSupport] = &[
    MessageSupport {
        message: TYPE,
        supported: &[
            "downstream_discovery",
            "upstream_discovery",
            "downstream_propagation",
            "upstream_propagation",
            "additional_labels",
        ],
        warn: &[],
    },
    MessageSupport {
        message: "io.istio.http.peer_metadata.Config.DiscoveryMethod",
        supported: &["istio_headers", "workload_discovery"],
        warn: &[],
    },
    MessageSupport {
        message: "io.istio.http.peer_metadata.Config.PropagationMethod",
        supported: &["istio_headers"],
        warn: &[],
    },
    MessageSupport {
        message: "io.istio.http.peer_metadata.Config.IstioHeaders",
        supported: &["skip_external_clusters"],
        warn: &[],
    },
    MessageSupport {
        message: "io.istio.http.peer_metadata.Config.WorkloadDiscovery",
        supported: &[],
        warn: &[],
    },
];

/// One direction's discovery: does it read the headers (and so remove
/// them)? Workload discovery has no provider (see the module doc).
#[derive(Debug, Default, Clone, Copy)]
struct Discovery {
    headers: bool,
}

/// One direction's propagation by headers, if configured.
#[derive(Debug, Clone, Copy)]
struct Propagation {
    skip_external: bool,
}

#[derive(Debug)]
pub struct PeerMetadata {
    downstream: Discovery,
    upstream: Discovery,
    to_downstream: Option<Propagation>,
    to_upstream: Option<Propagation>,
    additional: Vec<String>,
    /// This proxy's header values, made once.
    own: HeaderValue,
    own_id: Option<HeaderValue>,
}

/// What the response's propagation may send: each header only if the
/// request carried it, and neither for a cluster that takes none.
struct Carried {
    id: bool,
    metadata: bool,
}

fn methods(m: &DynamicMessage, field: &str) -> Vec<DynamicMessage> {
    match m.get_field_by_name(field).as_deref() {
        Some(Value::List(items)) => items
            .iter()
            .filter_map(|v| v.as_message().cloned())
            .collect(),
        _ => Vec::new(),
    }
}

/// The `istio_headers` member of a method, if that is what it is.
fn istio_headers(method: &DynamicMessage) -> Option<DynamicMessage> {
    method
        .has_field_by_name("istio_headers")
        .then(|| method.get_field_by_name("istio_headers"))
        .flatten()
        .and_then(|v| v.as_message().cloned())
}

fn discovery(m: &DynamicMessage, field: &str) -> Discovery {
    Discovery {
        headers: methods(m, field).iter().any(|d| istio_headers(d).is_some()),
    }
}

fn propagation(m: &DynamicMessage, field: &str) -> Option<Propagation> {
    methods(m, field).iter().find_map(|p| {
        let h = istio_headers(p)?;
        Some(Propagation {
            skip_external: h
                .get_field_by_name("skip_external_clusters")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        })
    })
}

fn build(a: &Any, _hcm_prefix: &str, path: &str) -> Result<Arc<dyn HttpFilter>> {
    let m = legate_proto::walk::decode_any(&a.type_url, &a.value, path)
        .map_err(|e| ConfigError::new(path, e.to_string()))?;
    let additional: Vec<String> = match m.get_field_by_name("additional_labels").as_deref() {
        Some(Value::List(l)) => l
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    };
    let own = super::peer::local(&additional);
    let id = crate::config::local_node().id;
    Ok(Arc::new(PeerMetadata {
        downstream: discovery(&m, "downstream_discovery"),
        upstream: discovery(&m, "upstream_discovery"),
        to_downstream: propagation(&m, "downstream_propagation"),
        to_upstream: propagation(&m, "upstream_propagation"),
        own: HeaderValue::from_str(&own.header_value())
            .map_err(|e| ConfigError::new(path, e.to_string()))?,
        own_id: HeaderValue::from_str(&id).ok().filter(|_| !id.is_empty()),
        additional,
    }))
}

impl PeerMetadata {
    /// Whether propagation may go to or come from `cluster`.
    fn propagates(
        p: Propagation,
        cluster: Option<&crate::cluster_manager::Cluster>,
        name: &str,
    ) -> bool {
        let facts = cluster.map(|c| &c.config.istio);
        if facts.is_some_and(|f| f.disable_mx) {
            return false;
        }
        !(p.skip_external && (name == "PassthroughCluster" || facts.is_some_and(|f| f.external)))
    }

    /// The peer in `headers`, if they carry one.
    fn discover(&self, headers: &http::HeaderMap) -> Option<Arc<Workload>> {
        let v = headers.get(METADATA).filter(|v| !v.is_empty())?;
        Workload::from_header(v.as_bytes(), &self.additional).map(Arc::new)
    }
}

fn peers(state: &mut http::Extensions) -> Arc<Peers> {
    if let Some(p) = state.get::<Arc<Peers>>() {
        return p.clone();
    }
    let p = Arc::new(Peers::default());
    state.insert(p.clone());
    p
}

#[async_trait::async_trait]
impl HttpFilter for PeerMetadata {
    async fn on_request(&self, rq: &mut RequestInfo<'_>, state: &mut Option<State>) -> Flow {
        let peers = peers(rq.filter_state);
        let name = rq.cluster.unwrap_or("");
        let cluster = rq.clusters.get(name);
        let back = self
            .to_downstream
            .is_some_and(|p| Self::propagates(p, cluster.as_deref(), name));
        let carried = Carried {
            id: back && rq.req.headers.contains_key(METADATA_ID),
            metadata: back && rq.req.headers.contains_key(METADATA),
        };
        if self.downstream.headers {
            if let Some(peer) = self.discover(&rq.req.headers) {
                // A peer the connection already learned (the TCP exchange)
                // stays.
                let _ = peers.downstream.set(peer);
            }
            rq.req.remove_header(METADATA);
            rq.req.remove_header(METADATA_ID);
        }
        if let Some(p) = self.to_upstream {
            if Self::propagates(p, cluster.as_deref(), name) {
                let _ = rq.req.insert_header(METADATA, self.own.clone());
                if let Some(id) = &self.own_id {
                    let _ = rq.req.insert_header(METADATA_ID, id.clone());
                }
            }
        }
        *state = Some(Box::new((carried, peers)));
        Flow::Continue
    }

    fn on_response(
        &self,
        resp: &mut ResponseHeader,
        info: &ResponseInfo<'_>,
        state: Option<&State>,
    ) {
        let Some((carried, peers)) = state.and_then(|s| s.downcast_ref::<(Carried, Arc<Peers>)>())
        else {
            return;
        };
        if self.upstream.headers {
            if !info.local {
                if let Some(peer) = self.discover(&resp.headers) {
                    let _ = peers.upstream.set(peer);
                }
            }
            resp.remove_header(METADATA);
            resp.remove_header(METADATA_ID);
        }
        if carried.id {
            if let Some(id) = &self.own_id {
                let _ = resp.insert_header(METADATA_ID, id.clone());
            }
        }
        if carried.metadata {
            let _ = resp.insert_header(METADATA, self.own.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: serde_json::Value) -> Any {
        let m = legate_proto::json::to_dynamic(json, TYPE, true).unwrap();
        Any {
            type_url: format!("type.googleapis.com/{TYPE}"),
            value: prost::Message::encode_to_vec(&m),
        }
    }

    #[test]
    fn istiods_two_configs_translate() {
        let f = build(
            &config(serde_json::json!({
                "downstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}],
                "downstream_propagation": [{"istio_headers": {}}]})),
            "",
            "p",
        )
        .unwrap();
        let f = format!("{f:?}");
        assert!(f.contains("downstream: Discovery { headers: true }"), "{f}");
        assert!(f.contains("to_upstream: None"), "{f}");
        let f = build(
            &config(serde_json::json!({
                "upstream_discovery": [{"workload_discovery": {}}, {"istio_headers": {}}],
                "upstream_propagation": [{"istio_headers": {"skip_external_clusters": true}}]})),
            "",
            "p",
        )
        .unwrap();
        let f = format!("{f:?}");
        assert!(f.contains("upstream: Discovery { headers: true }"), "{f}");
        assert!(
            f.contains("to_upstream: Some(Propagation { skip_external: true })"),
            "{f}"
        );
    }
}
