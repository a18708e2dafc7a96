//! State-of-the-world xDS, sans IO: one [`Sotw`] per stream (an ADS stream
//! carries every type; a per-type stream or a REST poller carries one).
//!
//! The rules, from the xDS protocol document and Envoy's behaviour:
//! - `version_info` is the last *accepted* version of the type ('' at
//!   first); `response_nonce` the nonce answered ('' on a new stream).
//! - Every response is ACKed (new version, its nonce) or NACKed (old
//!   version, its nonce, `error_detail` code 13) exactly once.
//! - A response whose resources are of another type, are duplicated or do
//!   not decode is NACKed whole; otherwise the good resources apply and the
//!   NACK names only the bad ones.
//! - Full-state types (LDS, CDS, SRDS) delete what the response omits.
//! - The node goes on the first request of a stream (every request unless
//!   `set_node_on_first_message_only`).

use crate::types::{self, RESOURCE_WRAPPER};
use crate::{join_errors, nack_status, DiscoveryRequest, DiscoveryResponse, Handler, Interest};
use crate::{Node, Resource, ResourceError, Update};
use legate_proto::envoy_types::pb::envoy::service::discovery::v3::Resource as Wrapped;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Default)]
struct TypeState {
    interest: Interest,
    /// Last accepted `version_info`.
    version: String,
    /// Last nonce received on this stream.
    nonce: String,
    /// Names currently applied (or rejected but known), for full-state deletion.
    known: BTreeSet<String>,
}

#[derive(Debug)]
pub struct Sotw {
    node: crate::NodeOnce,
    types: BTreeMap<String, TypeState>,
}

/// A response's resources, unwrapped and checked, and the names of TTL
/// heartbeats (wrappers without a resource: still present, unchanged).
/// Err rejects the response whole.
pub(crate) fn unpack(
    type_url: &str,
    resources: Vec<crate::Any>,
    version: &str,
) -> Result<(Vec<Resource>, Vec<String>), String> {
    let mut out = Vec::with_capacity(resources.len());
    let mut heartbeats = Vec::new();
    let mut seen = BTreeSet::new();
    for any in resources {
        let (name, body) = if any.type_url == RESOURCE_WRAPPER {
            let w: Wrapped = prost::Message::decode(any.value.as_slice())
                .map_err(|e| format!("cannot decode Resource wrapper: {e}"))?;
            // A wrapper without a resource is a TTL heartbeat: nothing changes.
            let Some(inner) = w.resource else {
                heartbeats.push(w.name);
                continue;
            };
            let name = if w.name.is_empty() {
                types::resource_name(&inner.type_url, &inner.value)?
            } else {
                w.name
            };
            (name, inner)
        } else {
            (types::resource_name(&any.type_url, &any.value)?, any)
        };
        if body.type_url != type_url {
            return Err(format!(
                "type URL {} embedded in an individual Any does not match the message-wide type URL {type_url}",
                body.type_url
            ));
        }
        if !seen.insert(name.clone()) {
            return Err(format!("duplicate resource name '{name}'"));
        }
        out.push(Resource {
            name,
            version: version.to_string(),
            body,
        });
    }
    Ok((out, heartbeats))
}

impl Sotw {
    pub fn new(node: Node, node_first_only: bool) -> Self {
        Self {
            node: crate::NodeOnce::new(node, node_first_only),
            types: BTreeMap::new(),
        }
    }

    fn request(&mut self, type_url: &str) -> DiscoveryRequest {
        let node = self.node.next();
        let t = self.types.get(type_url).expect("type is watched");
        let mut names: Vec<String> = t.interest.names.iter().cloned().collect();
        if t.interest.wildcard && !names.is_empty() {
            // Explicit wildcard alongside names.
            names.insert(0, "*".into());
        }
        DiscoveryRequest {
            version_info: t.version.clone(),
            node,
            resource_names: names,
            type_url: type_url.to_string(),
            response_nonce: t.nonce.clone(),
            ..Default::default()
        }
    }

    /// Changes what a type subscribes to. Returns the request to send when
    /// connected (None when nothing changed).
    pub fn set_interest(&mut self, type_url: &str, interest: Interest) -> Option<DiscoveryRequest> {
        let t = self.types.entry(type_url.to_string()).or_default();
        if t.interest == interest {
            return None;
        }
        let dropped: Vec<String> = t
            .interest
            .names
            .difference(&interest.names)
            .cloned()
            .collect();
        for n in &dropped {
            t.known.remove(n);
        }
        t.interest = interest;
        // An empty non-wildcard interest would read as a legacy wildcard:
        // stop asking instead.
        if t.interest.is_empty() {
            return None;
        }
        Some(self.request(type_url))
    }

    /// A new stream: forget every type's nonce (nonces never cross streams;
    /// a type watched again later on this stream must not answer the old
    /// stream's) and re-request every watched type with its last accepted
    /// version and full names.
    pub fn on_connect(&mut self) -> Vec<DiscoveryRequest> {
        self.node.new_stream();
        for t in self.types.values_mut() {
            t.nonce.clear();
        }
        let urls: Vec<String> = self
            .types
            .iter()
            .filter(|(_, t)| !t.interest.is_empty())
            .map(|(u, _)| u.clone())
            .collect();
        urls.iter().map(|u| self.request(u)).collect()
    }

    /// Applies a response and returns its ACK or NACK (None when the type is
    /// not watched: Envoy ignores such a response).
    pub fn on_response(
        &mut self,
        resp: DiscoveryResponse,
        handler: &dyn Handler,
    ) -> Option<DiscoveryRequest> {
        let type_url = resp.type_url.clone();
        let t = self.types.get_mut(&type_url)?;
        if t.interest.is_empty() {
            return None;
        }
        t.nonce = resp.nonce.clone();
        let errors = match unpack(&type_url, resp.resources, &resp.version_info) {
            Err(e) => {
                handler.rejected(&type_url, &e);
                vec![ResourceError {
                    name: String::new(),
                    message: e,
                }]
            }
            Ok((resources, heartbeats)) => {
                // Resources nobody asked for are ignored.
                let resources: Vec<Resource> = resources
                    .into_iter()
                    .filter(|r| t.interest.wants(&r.name))
                    .collect();
                let present: BTreeSet<String> = resources
                    .iter()
                    .map(|r| r.name.clone())
                    .chain(heartbeats)
                    .collect();
                let removed: Vec<String> = if types::is_full_state(&type_url) {
                    t.known.difference(&present).cloned().collect()
                } else {
                    Vec::new()
                };
                let errors = handler.apply(Update {
                    type_url: type_url.clone(),
                    version_info: resp.version_info.clone(),
                    updated: resources,
                    removed: removed.clone(),
                });
                for n in &removed {
                    t.known.remove(n);
                }
                t.known.extend(present);
                errors
            }
        };
        if errors.is_empty() {
            t.version = resp.version_info;
        }
        let mut req = self.request(&type_url);
        if !errors.is_empty() {
            tracing::warn!(type_url = %type_url, errors = %join_errors(&errors), "NACK");
            req.error_detail = Some(nack_status(join_errors(&errors)));
        }
        Some(req)
    }

    /// The last accepted version of a type.
    pub fn version(&self, type_url: &str) -> Option<&str> {
        self.types.get(type_url).map(|t| t.version.as_str())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::types::{CLUSTER, LISTENER, ROUTE};
    use legate_proto::envoy_types::pb::envoy::config::listener::v3::Listener;
    use legate_proto::envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    use std::sync::Mutex;

    /// Records updates; rejects resources whose name starts with "bad".
    #[derive(Default)]
    pub struct Recorder(pub Mutex<Vec<Update>>);

    impl Handler for Recorder {
        fn apply(&self, update: Update) -> Vec<ResourceError> {
            let errors = update
                .updated
                .iter()
                .filter(|r| r.name.starts_with("bad"))
                .map(|r| ResourceError {
                    name: r.name.clone(),
                    message: "rejected".into(),
                })
                .collect();
            self.0.lock().unwrap().push(update);
            errors
        }
    }

    pub fn listener(name: &str) -> crate::Any {
        crate::Any {
            type_url: LISTENER.into(),
            value: prost::Message::encode_to_vec(&Listener {
                name: name.into(),
                ..Default::default()
            }),
        }
    }

    fn route(name: &str) -> crate::Any {
        crate::Any {
            type_url: ROUTE.into(),
            value: prost::Message::encode_to_vec(&RouteConfiguration {
                name: name.into(),
                ..Default::default()
            }),
        }
    }

    fn resp(type_url: &str, version: &str, nonce: &str, res: Vec<crate::Any>) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: version.into(),
            resources: res,
            type_url: type_url.into(),
            nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn node() -> Node {
        Node {
            id: "n".into(),
            ..Default::default()
        }
    }

    #[test]
    fn first_request_then_ack_carries_version_and_nonce() {
        let mut s = Sotw::new(node(), true);
        let r = s.set_interest(LISTENER, Interest::wildcard()).unwrap();
        assert_eq!(
            (r.version_info.as_str(), r.response_nonce.as_str()),
            ("", "")
        );
        assert!(r.resource_names.is_empty(), "legacy wildcard");
        assert_eq!(r.node.unwrap().id, "n");
        let h = Recorder::default();
        let ack = s
            .on_response(resp(LISTENER, "v1", "n1", vec![listener("a")]), &h)
            .unwrap();
        assert_eq!(
            (ack.version_info.as_str(), ack.response_nonce.as_str()),
            ("v1", "n1")
        );
        assert!(ack.error_detail.is_none());
        assert!(ack.node.is_none(), "node only on the first message");
    }

    #[test]
    fn nack_keeps_old_version_and_applies_the_rest() {
        let mut s = Sotw::new(node(), false);
        s.set_interest(LISTENER, Interest::wildcard());
        let h = Recorder::default();
        s.on_response(resp(LISTENER, "v1", "n1", vec![listener("a")]), &h);
        let nack = s
            .on_response(
                resp(LISTENER, "v2", "n2", vec![listener("a"), listener("bad1")]),
                &h,
            )
            .unwrap();
        assert_eq!(
            (nack.version_info.as_str(), nack.response_nonce.as_str()),
            ("v1", "n2")
        );
        let detail = nack.error_detail.unwrap();
        assert_eq!(detail.code, 13);
        assert!(detail.message.contains("bad1"), "{}", detail.message);
        // The good resource of the batch was still handed over.
        let updates = h.0.lock().unwrap();
        assert_eq!(updates[1].updated.len(), 2);
        assert!(
            nack.node.is_some(),
            "node on every message unless first-only"
        );
    }

    #[test]
    fn full_state_types_delete_by_absence_others_do_not() {
        let mut s = Sotw::new(node(), true);
        s.set_interest(LISTENER, Interest::wildcard());
        s.set_interest(ROUTE, Interest::names(["r1", "r2"]));
        let h = Recorder::default();
        s.on_response(
            resp(LISTENER, "1", "a", vec![listener("l1"), listener("l2")]),
            &h,
        );
        s.on_response(resp(LISTENER, "2", "b", vec![listener("l2")]), &h);
        s.on_response(resp(ROUTE, "1", "c", vec![route("r1"), route("r2")]), &h);
        s.on_response(resp(ROUTE, "2", "d", vec![route("r2")]), &h);
        let u = h.0.lock().unwrap();
        assert_eq!(u[1].removed, vec!["l1".to_string()]);
        assert!(u[3].removed.is_empty());
        drop(u);
        s.on_response(resp(LISTENER, "3", "e", vec![]), &h);
        assert_eq!(h.0.lock().unwrap()[4].removed, vec!["l2".to_string()]);
    }

    #[test]
    fn wrong_type_and_duplicates_are_rejected_whole() {
        let mut s = Sotw::new(node(), true);
        s.set_interest(LISTENER, Interest::wildcard());
        let h = Recorder::default();
        let nack = s
            .on_response(resp(LISTENER, "1", "a", vec![route("r")]), &h)
            .unwrap();
        assert!(nack
            .error_detail
            .unwrap()
            .message
            .contains("does not match"));
        let nack = s
            .on_response(
                resp(LISTENER, "1", "b", vec![listener("x"), listener("x")]),
                &h,
            )
            .unwrap();
        assert!(nack.error_detail.unwrap().message.contains("duplicate"));
        assert!(h.0.lock().unwrap().is_empty(), "nothing applied");
    }

    #[test]
    fn unrequested_resources_and_types_are_ignored() {
        let mut s = Sotw::new(node(), true);
        s.set_interest(ROUTE, Interest::names(["r1"]));
        let h = Recorder::default();
        s.on_response(resp(ROUTE, "1", "a", vec![route("r1"), route("r9")]), &h);
        assert_eq!(h.0.lock().unwrap()[0].updated.len(), 1);
        assert!(s.on_response(resp(CLUSTER, "1", "b", vec![]), &h).is_none());
    }

    #[test]
    fn subscription_change_and_reconnect() {
        let mut s = Sotw::new(node(), true);
        s.set_interest(ROUTE, Interest::names(["r1"]));
        let h = Recorder::default();
        s.on_response(resp(ROUTE, "7", "n7", vec![route("r1")]), &h);
        let r = s
            .set_interest(ROUTE, Interest::names(["r1", "r2"]))
            .unwrap();
        assert_eq!(r.resource_names, vec!["r1", "r2"]);
        assert_eq!(
            (r.version_info.as_str(), r.response_nonce.as_str()),
            ("7", "n7")
        );
        assert!(s
            .set_interest(ROUTE, Interest::names(["r1", "r2"]))
            .is_none());
        let again = s.on_connect();
        assert_eq!(again.len(), 1);
        assert_eq!(
            (
                again[0].version_info.as_str(),
                again[0].response_nonce.as_str()
            ),
            ("7", "")
        );
        assert!(again[0].node.is_some(), "a new stream sends the node again");
    }

    /// The outside test's finding: a type not watched when the stream was
    /// replaced, and watched again afterwards, sent the old stream's nonce.
    #[test]
    fn a_type_watched_again_after_a_reconnect_sends_no_old_nonce() {
        let mut s = Sotw::new(node(), true);
        s.set_interest(ROUTE, Interest::names(["r1"]));
        let h = Recorder::default();
        s.on_response(resp(ROUTE, "7", "n7", vec![route("r1")]), &h);
        assert!(s.set_interest(ROUTE, Interest::default()).is_none());
        assert!(s.on_connect().is_empty());
        let r = s.set_interest(ROUTE, Interest::names(["r1"])).unwrap();
        assert_eq!(
            (r.version_info.as_str(), r.response_nonce.as_str()),
            ("7", ""),
            "the version stays; the nonce belonged to the old stream"
        );
    }

    #[test]
    fn wrapped_resources_and_heartbeats() {
        let mut s = Sotw::new(node(), true);
        s.set_interest(LISTENER, Interest::wildcard());
        let wrap = |name: &str, inner: Option<crate::Any>| crate::Any {
            type_url: RESOURCE_WRAPPER.into(),
            value: prost::Message::encode_to_vec(&Wrapped {
                name: name.into(),
                resource: inner,
                ..Default::default()
            }),
        };
        let h = Recorder::default();
        s.on_response(
            resp(
                LISTENER,
                "1",
                "a",
                vec![wrap("l1", Some(listener("l1"))), wrap("l2", None)],
            ),
            &h,
        );
        let u = h.0.lock().unwrap();
        assert_eq!(u[0].updated.len(), 1);
        assert_eq!(u[0].updated[0].name, "l1");
        drop(u);
        s.on_response(resp(LISTENER, "2", "b", vec![wrap("l1", None)]), &h);
        // The heartbeat keeps l1; l2 is gone.
        assert_eq!(h.0.lock().unwrap()[1].removed, vec!["l2".to_string()]);
    }
}
