//! The validated configuration model.
//!
//! Protos (from the bootstrap today, from xDS later) are translated here with
//! `TryFrom`-style functions into plain Rust types that the data plane uses.
//! Every error names the field path, so `--mode validate` and NACKs can say
//! exactly what is wrong. Fields the translation does not understand never
//! reach this module: [`crate::registry`] rejects them first.

pub mod circuit_breakers;
pub mod cluster;
pub mod filter_chain;
pub mod health_check;
pub mod ip_detection;
pub mod lb_policy;
pub mod listener;
pub mod local_ratelimit;
pub mod matcher;
pub mod outlier;
pub mod rbac;
pub mod route;
pub mod scoped;
pub mod socket_options;
pub mod source;
pub mod tls;
pub mod unified_matcher;

use envoy_types::pb::envoy::config::core::v3 as core;
use legate_proto::envoy_types;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// A config error, with the path of the offending field.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("{path}: {message}")]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, ConfigError>;

/// Joins a field name onto a path.
pub fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

/// `path[i]`.
pub fn index(path: &str, field: &str, i: usize) -> String {
    format!("{}[{i}]", join(path, field))
}

/// Envoy-types' well-known types (its own, not `prost_types`).
pub use legate_proto::envoy_types::pb::google::protobuf as wkt;

/// Reads a protobuf wrapper (`UInt32Value`, `BoolValue`, ...) field.
pub trait Wrapped<T> {
    fn val(&self) -> Option<T>;
}

macro_rules! wrapped {
    ($($w:ident => $t:ty),*) => {$(
        impl Wrapped<$t> for Option<wkt::$w> {
            fn val(&self) -> Option<$t> {
                self.as_ref().map(|v| v.value)
            }
        }
    )*};
}
wrapped!(UInt32Value => u32, UInt64Value => u64, BoolValue => bool, DoubleValue => f64);

/// The largest duration Envoy takes (`validateDurationAsMilliseconds`):
/// what fits in an int64 of nanoseconds, about 292 years.
const MAX_DURATION_SECONDS: i64 = i64::MAX / 1_000_000_000;

/// A protobuf Duration as a std Duration, with Envoy's range rules:
/// negative values and ones beyond [`MAX_DURATION_SECONDS`] are errors.
pub fn duration(d: &wkt::Duration, path: &str) -> Result<Duration> {
    if d.seconds < 0 || d.nanos < 0 {
        return Err(ConfigError::new(path, "duration must not be negative"));
    }
    if d.seconds > MAX_DURATION_SECONDS || d.nanos > 999_999_999 {
        return Err(ConfigError::new(
            path,
            format!("Duration out-of-range: at most {MAX_DURATION_SECONDS}s"),
        ));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

/// Optional duration where an explicit 0 means "disabled" (Envoy's convention
/// for most timeouts): `None` when unset uses `default`.
pub fn timeout_or(
    d: Option<&wkt::Duration>,
    default: Option<Duration>,
    path: &str,
) -> Result<Option<Duration>> {
    match d {
        None => Ok(default),
        Some(d) => {
            let d = duration(d, path)?;
            Ok(if d.is_zero() { None } else { Some(d) })
        }
    }
}

/// A socket address that must be a literal IP (listeners, STATIC endpoints).
pub fn socket_addr(addr: &core::Address, path: &str) -> Result<SocketAddr> {
    let (host, port) = host_port(addr, path)?;
    let ip: IpAddr = host.parse().map_err(|_| {
        ConfigError::new(
            join(path, "socket_address.address"),
            format!("'{host}' is not an IP address"),
        )
    })?;
    Ok(SocketAddr::new(ip, port))
}

/// Host and port of a `socket_address` (the host may be a DNS name).
pub fn host_port(addr: &core::Address, path: &str) -> Result<(String, u16)> {
    use core::address::Address as A;
    use core::socket_address::PortSpecifier;
    match &addr.address {
        Some(A::SocketAddress(sa)) => {
            let sa_path = join(path, "socket_address");
            // UDP names the protocol of a UDP listener (see the listener's
            // translation) or of an endpoint the UDP proxy reaches; an
            // upstream connection's protocol is its user's, as in Envoy.
            if sa.protocol != core::socket_address::Protocol::Tcp as i32
                && sa.protocol != core::socket_address::Protocol::Udp as i32
            {
                return Err(ConfigError::new(
                    join(&sa_path, "protocol"),
                    "only TCP and UDP are supported",
                ));
            }
            if !sa.resolver_name.is_empty() {
                return Err(ConfigError::new(
                    join(&sa_path, "resolver_name"),
                    "custom resolvers are not supported",
                ));
            }
            let port = match sa.port_specifier {
                Some(PortSpecifier::PortValue(p)) if p <= 65535 => p as u16,
                Some(PortSpecifier::PortValue(p)) => {
                    return Err(ConfigError::new(
                        join(&sa_path, "port_value"),
                        format!("{p} is not a valid port"),
                    ))
                }
                Some(PortSpecifier::NamedPort(_)) => {
                    return Err(ConfigError::new(
                        join(&sa_path, "named_port"),
                        "named ports are not supported",
                    ))
                }
                None => 0,
            };
            if sa.address.is_empty() {
                return Err(ConfigError::new(
                    join(&sa_path, "address"),
                    "address is required",
                ));
            }
            Ok((sa.address.clone(), port))
        }
        Some(A::Pipe(_)) => Err(ConfigError::new(
            join(path, "pipe"),
            "unix socket addresses are not supported yet",
        )),
        Some(A::EnvoyInternalAddress(_)) => Err(ConfigError::new(
            join(path, "envoy_internal_address"),
            "internal addresses are not supported",
        )),
        None => Err(ConfigError::new(path, "an address is required")),
    }
}

/// The whole validated configuration: one immutable snapshot.
#[derive(Debug)]
pub struct Config {
    pub node: Node,
    pub admin: Option<SocketAddr>,
    /// `admin.ignore_global_conn_limit`.
    pub admin_ignores_conn_limit: bool,
    /// What of `overload_manager` Legate runs (the global connection limit).
    pub overload: crate::overload::OverloadConfig,
    pub listeners: Vec<Arc<listener::Listener>>,
    pub clusters: Vec<Arc<cluster::ClusterConfig>>,
    pub runtime: crate::runtime::Runtime,
    /// The bootstrap's runtime layers in order (RTDS layers are filled in
    /// by xDS).
    pub runtime_layers: Vec<RuntimeLayer>,
    pub dynamic: Option<Dynamic>,
}

#[derive(Debug, Clone)]
pub enum RuntimeLayer {
    Static(serde_json::Value),
    Rtds {
        name: String,
        source: source::XdsSource,
    },
}

/// `dynamic_resources`: where listeners and clusters come from.
#[derive(Debug, Clone, Default)]
pub struct Dynamic {
    pub lds: Option<source::XdsSource>,
    pub cds: Option<source::XdsSource>,
    pub ads: Option<source::ApiSource>,
}

impl Dynamic {
    pub fn from_proto(
        d: &legate_proto::envoy_types::pb::envoy::config::bootstrap::v3::bootstrap::DynamicResources,
        path: &str,
    ) -> Result<Self> {
        let opt = |cs: &Option<core::ConfigSource>, f: &str| -> Result<Option<source::XdsSource>> {
            cs.as_ref()
                .map(|c| source::XdsSource::from_proto(c, &join(path, f)))
                .transpose()
        };
        let ads = d
            .ads_config
            .as_ref()
            .map(|a| source::ApiSource::from_proto(a, &join(path, "ads_config")))
            .transpose()?;
        if ads
            .as_ref()
            .is_some_and(|a| a.kind == source::ApiKind::Rest)
        {
            return Err(ConfigError::new(
                join(path, "ads_config.api_type"),
                "ADS is a gRPC stream; REST is not allowed",
            ));
        }
        Ok(Self {
            lds: opt(&d.lds_config, "lds_config")?,
            cds: opt(&d.cds_config, "cds_config")?,
            ads,
        })
    }
}

/// The node identity, from the bootstrap and the command line.
#[derive(Debug, Clone, Default)]
pub struct Node {
    pub id: String,
    pub cluster: String,
    pub zone: String,
    /// `locality.region`.
    pub region: String,
    /// `metadata`, as JSON: Istio's extensions read the workload it
    /// describes (`NAME`, `NAMESPACE`, `LABELS`...).
    pub metadata: Arc<serde_json::Map<String, serde_json::Value>>,
}

static LOCAL_NODE: std::sync::OnceLock<Node> = std::sync::OnceLock::new();

/// Records this proxy's node (the first one given wins: one process, one
/// node). Set while the bootstrap is translated, before its listeners.
pub fn set_local_node(n: &Node) {
    let _ = LOCAL_NODE.set(n.clone());
}

/// This proxy's node, which loggers label what they send with (Envoy's
/// local info); empty before the bootstrap is read.
pub fn local_node() -> Node {
    LOCAL_NODE.get().cloned().unwrap_or_default()
}

/// The cluster a `GrpcService` names through `envoy_grpc` (Legate's gRPC
/// clients to side services go through the cluster manager; `google_grpc`
/// is refused).
/// `envoy_grpc.authority`, else the cluster's name: the `:authority` Envoy
/// sends on the call.
pub fn grpc_service_authority(g: &core::GrpcService) -> String {
    match &g.target_specifier {
        Some(core::grpc_service::TargetSpecifier::EnvoyGrpc(e)) if !e.authority.is_empty() => {
            e.authority.clone()
        }
        Some(core::grpc_service::TargetSpecifier::EnvoyGrpc(e)) => e.cluster_name.clone(),
        _ => String::new(),
    }
}

pub fn grpc_service_cluster(g: &core::GrpcService, path: &str) -> Result<String> {
    use core::grpc_service::TargetSpecifier;
    match &g.target_specifier {
        Some(TargetSpecifier::EnvoyGrpc(e)) if !e.cluster_name.is_empty() => {
            Ok(e.cluster_name.clone())
        }
        Some(TargetSpecifier::EnvoyGrpc(_)) => Err(ConfigError::new(
            join(path, "envoy_grpc.cluster_name"),
            "cluster_name is required",
        )),
        Some(TargetSpecifier::GoogleGrpc(_)) => Err(ConfigError::new(
            join(path, "google_grpc"),
            "only envoy_grpc is supported for this service",
        )),
        None => Err(ConfigError::new(path, "envoy_grpc is required")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_follow_envoys_range() {
        let d = |seconds, nanos| duration(&wkt::Duration { seconds, nanos }, "t");
        // Istio's "never" (cleanup_interval) fits; one more second does not.
        assert_eq!(d(9_223_372_035, 0).unwrap().as_secs(), 9_223_372_035);
        assert!(d(9_223_372_036, 0).is_ok());
        assert!(d(9_223_372_037, 0)
            .unwrap_err()
            .to_string()
            .contains("out-of-range"));
        assert!(d(315_576_000_000, 0).is_err());
        assert!(d(0, 1_000_000_000).is_err());
        assert!(d(-1, 0).is_err());
    }
}
