//! The xDS protocol as a reusable library.
//!
//! The protocol rules live in two sans-IO state machines, [`sotw::Sotw`] and
//! [`delta::Delta`]: they turn responses into [`Update`]s for a [`Handler`]
//! and produce the exact next request (ACK, NACK, subscription change,
//! reconnect), so every rule of the xDS protocol document is a plain unit
//! test. [`client::XdsClient`] runs them over gRPC (ADS or per-type streams)
//! or REST polling, with jittered exponential backoff on reconnect.
//!
//! Resources reach the handler still encoded (`Any`): the library knows
//! type URLs and names, not what the resources mean.

pub mod backoff;
pub mod client;
pub mod delta;
mod grpc;
mod rest;
pub mod sotw;
pub mod types;

pub use legate_proto::envoy_types::pb::envoy::config::core::v3::Node;
pub use legate_proto::envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
pub use legate_proto::envoy_types::pb::google::protobuf::Any;

use std::collections::BTreeSet;

/// One resource of an update, still encoded.
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    pub name: String,
    /// The resource's own version (Delta), else the response's version.
    pub version: String,
    pub body: Any,
}

/// What changed for one type, as one response told it.
#[derive(Debug, Default)]
pub struct Update {
    pub type_url: String,
    /// The response's `version_info` (SotW) or `system_version_info` (Delta).
    pub version_info: String,
    /// Added or changed resources.
    pub updated: Vec<Resource>,
    /// Names that no longer exist: Delta's `removed_resources`, or (SotW)
    /// names of a full-state type (LDS, CDS, SRDS) missing from the response.
    pub removed: Vec<String>,
}

/// Why one resource of an update was rejected.
#[derive(Clone, Debug, PartialEq)]
pub struct ResourceError {
    pub name: String,
    pub message: String,
}

/// What the library calls with updates. `apply` must apply every good
/// resource of the update and return one error per bad one: the update is
/// then NACKed naming them, while the good ones keep effect (as ztunnel and
/// Envoy's LDS/CDS do).
pub trait Handler: Send + Sync + 'static {
    fn apply(&self, update: Update) -> Vec<ResourceError>;
    /// A response was rejected whole before any of it applied (wrong type,
    /// duplicate names, undecodable): for stats and logs.
    fn rejected(&self, _type_url: &str, _error: &str) {}
    /// A stream to the management server went up or down.
    fn connected(&self, _up: bool) {}
}

/// What one type subscribes to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interest {
    /// Every resource of the type (LDS, CDS, SRDS, VHDS).
    pub wildcard: bool,
    pub names: BTreeSet<String>,
}

impl Interest {
    pub fn wildcard() -> Self {
        Self {
            wildcard: true,
            names: BTreeSet::new(),
        }
    }

    pub fn names<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> Self {
        Self {
            wildcard: false,
            names: names.into_iter().map(Into::into).collect(),
        }
    }

    pub fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    pub fn is_empty(&self) -> bool {
        !self.wildcard && self.names.is_empty()
    }
}

/// The node on a stream's first request, and on every one unless
/// `set_node_on_first_message_only`.
#[derive(Debug)]
pub(crate) struct NodeOnce {
    node: Node,
    first_only: bool,
    sent: bool,
}

impl NodeOnce {
    pub(crate) fn new(node: Node, first_only: bool) -> Self {
        Self {
            node,
            first_only,
            sent: false,
        }
    }

    /// The node for the next request.
    pub(crate) fn next(&mut self) -> Option<Node> {
        let send = !(self.sent && self.first_only);
        self.sent = true;
        send.then(|| self.node.clone())
    }

    pub(crate) fn new_stream(&mut self) {
        self.sent = false;
    }
}

/// `google.rpc.Code.INTERNAL`, which Envoy puts in every NACK.
pub const NACK_CODE: i32 = 13;

/// The `error_detail` of a NACK, listing every bad resource.
pub fn nack_status(message: String) -> legate_proto::envoy_types::pb::google::rpc::Status {
    legate_proto::envoy_types::pb::google::rpc::Status {
        code: NACK_CODE,
        message,
        details: Vec::new(),
    }
}

pub(crate) fn join_errors(errors: &[ResourceError]) -> String {
    errors
        .iter()
        .map(|e| {
            if e.name.is_empty() {
                e.message.clone()
            } else {
                format!("{}: {}", e.name, e.message)
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}
