//! Incremental (Delta) xDS, sans IO.
//!
//! The rules: subscriptions are sent as differences; each resource has its
//! own version; `removed_resources` deletes; a new stream sends the full
//! subscription with `initial_resource_versions` of everything known (so the
//! server sends only what changed); every response is ACKed with its nonce,
//! or NACKed with the nonce and `error_detail`. A legacy wildcard is a
//! first request with no names; an explicit one is `*`.

use crate::types::RESOURCE_WRAPPER;
use crate::{join_errors, nack_status, DeltaDiscoveryRequest, DeltaDiscoveryResponse, Handler};
use crate::{Interest, Node, ResourceError, Update};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Default)]
struct TypeState {
    interest: Interest,
    /// What the server has been told on this stream (None: nothing yet).
    sent: Option<Interest>,
    /// Versions of the resources applied.
    known: BTreeMap<String, String>,
}

#[derive(Debug)]
pub struct Delta {
    node: crate::NodeOnce,
    types: BTreeMap<String, TypeState>,
}

fn names_with_star(i: &Interest) -> Vec<String> {
    let mut v: Vec<String> = i.names.iter().cloned().collect();
    if i.wildcard && !v.is_empty() {
        v.insert(0, "*".into());
    }
    v
}

impl Delta {
    pub fn new(node: Node, node_first_only: bool) -> Self {
        Self {
            node: crate::NodeOnce::new(node, node_first_only),
            types: BTreeMap::new(),
        }
    }

    fn base(&mut self, type_url: &str) -> DeltaDiscoveryRequest {
        let node = self.node.next();
        DeltaDiscoveryRequest {
            node,
            type_url: type_url.to_string(),
            ..Default::default()
        }
    }

    /// Changes a type's subscription; returns the request that tells the
    /// server the difference (None when there is none).
    pub fn set_interest(
        &mut self,
        type_url: &str,
        interest: Interest,
    ) -> Option<DeltaDiscoveryRequest> {
        let t = self.types.entry(type_url.to_string()).or_default();
        for gone in t.interest.names.difference(&interest.names) {
            t.known.remove(gone);
        }
        t.interest = interest.clone();
        let (subscribe, unsubscribe) = match &t.sent {
            None if interest.is_empty() => return None,
            None => (names_with_star(&interest), Vec::new()),
            Some(sent) => {
                let mut sub: Vec<String> =
                    interest.names.difference(&sent.names).cloned().collect();
                let mut unsub: Vec<String> =
                    sent.names.difference(&interest.names).cloned().collect();
                if interest.wildcard && !sent.wildcard {
                    sub.insert(0, "*".into());
                }
                if sent.wildcard && !interest.wildcard {
                    unsub.insert(0, "*".into());
                }
                if sub.is_empty() && unsub.is_empty() {
                    return None;
                }
                (sub, unsub)
            }
        };
        t.sent = Some(interest);
        let mut req = self.base(type_url);
        req.resource_names_subscribe = subscribe;
        req.resource_names_unsubscribe = unsubscribe;
        Some(req)
    }

    /// A new stream: the full subscription of every type, with the versions
    /// already held.
    pub fn on_connect(&mut self) -> Vec<DeltaDiscoveryRequest> {
        self.node.new_stream();
        let urls: Vec<String> = self
            .types
            .iter_mut()
            .map(|(u, t)| {
                t.sent = None;
                u.clone()
            })
            .collect();
        let mut out = Vec::new();
        for u in urls {
            let t = &self.types[&u];
            if t.interest.is_empty() {
                continue;
            }
            let interest = t.interest.clone();
            let versions = t.known.clone().into_iter().collect();
            let mut req = self.base(&u);
            req.resource_names_subscribe = names_with_star(&interest);
            req.initial_resource_versions = versions;
            self.types.get_mut(&u).expect("present").sent = Some(interest);
            out.push(req);
        }
        out
    }

    /// Applies a response; returns its ACK or NACK (None for an unwatched type).
    pub fn on_response(
        &mut self,
        resp: DeltaDiscoveryResponse,
        handler: &dyn Handler,
    ) -> Option<DeltaDiscoveryRequest> {
        let type_url = resp.type_url.clone();
        if !self.types.contains_key(&type_url) {
            return None;
        }
        let errors = match self.unpack(&type_url, &resp) {
            Err(e) => {
                handler.rejected(&type_url, &e);
                vec![ResourceError {
                    name: String::new(),
                    message: e,
                }]
            }
            Ok(update) => {
                let updated: Vec<(String, String)> = update
                    .updated
                    .iter()
                    .map(|r| (r.name.clone(), r.version.clone()))
                    .collect();
                let removed = update.removed.clone();
                let errors = handler.apply(update);
                let bad: BTreeSet<&str> = errors.iter().map(|e| e.name.as_str()).collect();
                let t = self.types.get_mut(&type_url).expect("present");
                for (name, version) in updated {
                    if !bad.contains(name.as_str()) {
                        t.known.insert(name, version);
                    }
                }
                for name in removed {
                    t.known.remove(&name);
                }
                errors
            }
        };
        let mut req = self.base(&type_url);
        req.response_nonce = resp.nonce;
        if !errors.is_empty() {
            tracing::warn!(type_url = %type_url, errors = %join_errors(&errors), "NACK");
            req.error_detail = Some(nack_status(join_errors(&errors)));
        }
        Some(req)
    }

    fn unpack(&self, type_url: &str, resp: &DeltaDiscoveryResponse) -> Result<Update, String> {
        let t = &self.types[type_url];
        let mut seen = BTreeSet::new();
        let mut updated = Vec::new();
        for r in &resp.resources {
            // A resource without a body refreshes a TTL only.
            let Some(body) = &r.resource else { continue };
            if body.type_url != type_url && body.type_url != RESOURCE_WRAPPER {
                return Err(format!(
                    "type URL {} embedded in an individual Any does not match the message-wide type URL {type_url}",
                    body.type_url
                ));
            }
            let name = if r.name.is_empty() {
                crate::types::resource_name(type_url, &body.value)?
            } else {
                r.name.clone()
            };
            if !seen.insert(name.clone()) {
                return Err(format!("duplicate resource name '{name}'"));
            }
            // A wildcard subscription takes whatever comes; otherwise only
            // what was asked for. VHDS names are `<route>/<host>` aliases
            // the server resolves, so they are never filtered by name (a
            // run of go-control-plane's delta driver lost virtual hosts
            // without this; the cause is not yet understood, see notes).
            if !t.interest.wants(&name) && !type_url.ends_with(".VirtualHost") {
                continue;
            }
            updated.push(crate::Resource {
                name,
                version: r.version.clone(),
                body: body.clone(),
            });
        }
        Ok(Update {
            type_url: type_url.to_string(),
            version_info: resp.system_version_info.clone(),
            updated,
            removed: resp.removed_resources.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sotw::tests::{listener, Recorder};
    use crate::types::{CLUSTER, ENDPOINT, LISTENER};
    use legate_proto::envoy_types::pb::envoy::service::discovery::v3::Resource as Pb;

    fn node() -> Node {
        Node {
            id: "n".into(),
            ..Default::default()
        }
    }

    fn res(name: &str, version: &str) -> Pb {
        Pb {
            name: name.into(),
            version: version.into(),
            resource: Some(listener(name)),
            ..Default::default()
        }
    }

    fn resp(nonce: &str, res: Vec<Pb>, removed: &[&str]) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: LISTENER.into(),
            resources: res,
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            nonce: nonce.into(),
            ..Default::default()
        }
    }

    #[test]
    fn legacy_wildcard_ack_nack_and_removal() {
        let mut d = Delta::new(node(), true);
        let first = d.set_interest(LISTENER, Interest::wildcard()).unwrap();
        assert!(first.resource_names_subscribe.is_empty());
        assert!(first.node.is_some());
        let h = Recorder::default();
        let ack = d
            .on_response(resp("a", vec![res("l1", "1"), res("l2", "1")], &[]), &h)
            .unwrap();
        assert_eq!(ack.response_nonce, "a");
        assert!(ack.error_detail.is_none() && ack.node.is_none());
        let nack = d
            .on_response(resp("b", vec![res("bad", "1")], &["l1"]), &h)
            .unwrap();
        assert_eq!(nack.error_detail.unwrap().code, 13);
        assert_eq!(h.0.lock().unwrap()[1].removed, vec!["l1".to_string()]);
        // Reconnect: only l2 is known (bad was rejected, l1 removed).
        let again = d.on_connect();
        assert_eq!(again.len(), 1);
        assert_eq!(
            again[0].initial_resource_versions,
            [("l2".to_string(), "1".to_string())].into_iter().collect()
        );
        assert!(again[0].node.is_some());
        assert!(again[0].response_nonce.is_empty());
    }

    #[test]
    fn subscriptions_are_sent_as_differences() {
        let mut d = Delta::new(node(), true);
        let r = d
            .set_interest(ENDPOINT, Interest::names(["a", "b"]))
            .unwrap();
        assert_eq!(r.resource_names_subscribe, vec!["a", "b"]);
        let r = d
            .set_interest(ENDPOINT, Interest::names(["b", "c"]))
            .unwrap();
        assert_eq!(
            (r.resource_names_subscribe, r.resource_names_unsubscribe),
            (vec!["c".to_string()], vec!["a".to_string()])
        );
        assert!(d
            .set_interest(ENDPOINT, Interest::names(["b", "c"]))
            .is_none());
        assert!(d.set_interest(CLUSTER, Interest::default()).is_none());
    }

    #[test]
    fn wrong_type_is_rejected_whole() {
        let mut d = Delta::new(node(), true);
        d.set_interest(CLUSTER, Interest::wildcard());
        let h = Recorder::default();
        let mut r = resp("a", vec![res("l1", "1")], &[]);
        r.type_url = CLUSTER.into();
        let nack = d.on_response(r, &h).unwrap();
        assert!(nack
            .error_detail
            .unwrap()
            .message
            .contains("does not match"));
        assert!(h.0.lock().unwrap().is_empty());
    }
}
