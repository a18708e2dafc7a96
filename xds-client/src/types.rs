//! The resource types Legate speaks, with their services and REST paths.

pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SCOPED_ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration";
pub const VIRTUAL_HOST: &str = "type.googleapis.com/envoy.config.route.v3.VirtualHost";
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
pub const RUNTIME: &str = "type.googleapis.com/envoy.service.runtime.v3.Runtime";
pub const EXTENSION_CONFIG: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
/// The wrapper Delta (and SotW with TTLs) puts around each resource.
pub const RESOURCE_WRAPPER: &str = "type.googleapis.com/envoy.service.discovery.v3.Resource";

/// How one type is served.
pub struct TypeInfo {
    pub type_url: &'static str,
    /// gRPC service, e.g. `envoy.service.listener.v3.ListenerDiscoveryService`.
    pub service: &'static str,
    /// SotW stream method (None: Delta only).
    pub sotw: Option<&'static str>,
    pub delta: &'static str,
    /// REST path suffix: `/v3/discovery:<rest>`.
    pub rest: Option<&'static str>,
    /// SotW responses carry the whole set, so absence means deletion.
    pub full_state: bool,
    /// The field that names a resource of this type.
    pub name_field: &'static str,
}

const fn t(
    type_url: &'static str,
    service: &'static str,
    sotw: Option<&'static str>,
    delta: &'static str,
    rest: Option<&'static str>,
    full_state: bool,
    name_field: &'static str,
) -> TypeInfo {
    TypeInfo {
        type_url,
        service,
        sotw,
        delta,
        rest,
        full_state,
        name_field,
    }
}

pub static TYPES: &[TypeInfo] = &[
    t(
        LISTENER,
        "envoy.service.listener.v3.ListenerDiscoveryService",
        Some("StreamListeners"),
        "DeltaListeners",
        Some("listeners"),
        true,
        "name",
    ),
    t(
        ROUTE,
        "envoy.service.route.v3.RouteDiscoveryService",
        Some("StreamRoutes"),
        "DeltaRoutes",
        Some("routes"),
        false,
        "name",
    ),
    t(
        SCOPED_ROUTE,
        "envoy.service.route.v3.ScopedRoutesDiscoveryService",
        Some("StreamScopedRoutes"),
        "DeltaScopedRoutes",
        Some("scoped-routes"),
        true,
        "name",
    ),
    t(
        VIRTUAL_HOST,
        "envoy.service.route.v3.VirtualHostDiscoveryService",
        None,
        "DeltaVirtualHosts",
        None,
        false,
        "name",
    ),
    t(
        CLUSTER,
        "envoy.service.cluster.v3.ClusterDiscoveryService",
        Some("StreamClusters"),
        "DeltaClusters",
        Some("clusters"),
        true,
        "name",
    ),
    t(
        ENDPOINT,
        "envoy.service.endpoint.v3.EndpointDiscoveryService",
        Some("StreamEndpoints"),
        "DeltaEndpoints",
        Some("endpoints"),
        false,
        "cluster_name",
    ),
    t(
        SECRET,
        "envoy.service.secret.v3.SecretDiscoveryService",
        Some("StreamSecrets"),
        "DeltaSecrets",
        Some("secrets"),
        false,
        "name",
    ),
    t(
        RUNTIME,
        "envoy.service.runtime.v3.RuntimeDiscoveryService",
        Some("StreamRuntime"),
        "DeltaRuntime",
        Some("runtime"),
        false,
        "name",
    ),
    t(
        EXTENSION_CONFIG,
        "envoy.service.extension.v3.ExtensionConfigDiscoveryService",
        Some("StreamExtensionConfigs"),
        "DeltaExtensionConfigs",
        Some("extension_configs"),
        false,
        "name",
    ),
];

pub const ADS_SERVICE: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";

pub fn info(type_url: &str) -> Option<&'static TypeInfo> {
    TYPES.iter().find(|t| t.type_url == type_url)
}

/// Whether a SotW response of this type carries the whole set.
pub fn is_full_state(type_url: &str) -> bool {
    info(type_url).is_some_and(|t| t.full_state)
}

/// The gRPC path of a stream: ADS, or the type's own service.
pub fn grpc_path(type_url: Option<&str>, delta: bool) -> Option<String> {
    match type_url {
        None => Some(format!(
            "/{ADS_SERVICE}/{}",
            if delta {
                "DeltaAggregatedResources"
            } else {
                "StreamAggregatedResources"
            }
        )),
        Some(u) => {
            let i = info(u)?;
            let method = if delta { Some(i.delta) } else { i.sotw };
            method.map(|m| format!("/{}/{m}", i.service))
        }
    }
}

/// The name of an encoded resource, read with the descriptor pool.
pub fn resource_name(type_url: &str, bytes: &[u8]) -> Result<String, String> {
    let field = info(type_url).map_or("name", |i| i.name_field);
    let msg = legate_proto::walk::decode_any(type_url, bytes, "").map_err(|e| e.to_string())?;
    Ok(msg
        .get_field_by_name(field)
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_is_in_the_descriptor_pool() {
        for t in TYPES {
            let name = legate_proto::type_name(t.type_url);
            assert!(
                legate_proto::pool().get_message_by_name(name).is_some(),
                "{name}"
            );
        }
    }

    #[test]
    fn paths() {
        assert_eq!(
            grpc_path(None, true).unwrap(),
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
        );
        assert_eq!(
            grpc_path(Some(CLUSTER), false).unwrap(),
            "/envoy.service.cluster.v3.ClusterDiscoveryService/StreamClusters"
        );
        assert!(grpc_path(Some(VIRTUAL_HOST), false).is_none());
    }

    #[test]
    fn names_come_from_the_right_field() {
        use legate_proto::envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
        let cla = ClusterLoadAssignment {
            cluster_name: "c1".into(),
            ..Default::default()
        };
        let bytes = prost::Message::encode_to_vec(&cla);
        assert_eq!(resource_name(ENDPOINT, &bytes).unwrap(), "c1");
    }
}
