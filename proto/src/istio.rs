//! The config types of Istio's own proxy extensions, which istiod sends in
//! its default profile (see [`crate::extra`] for why they are declared
//! here): the HTTP peer metadata filter and the TCP metadata exchange
//! (both wrapped in a `TypedStruct` by istiod), `istio.stats` and
//! `istio.alpn` (plain `Any`s).

use crate::extra::{enumeration, file, message, scalar, E, M};
use prost_types::field_descriptor_proto::Type;
use prost_types::FileDescriptorProto;

pub const PEER_METADATA: &str = "io.istio.http.peer_metadata.Config";
pub const METADATA_EXCHANGE: &str = "envoy.tcp.metadataexchange.config.MetadataExchange";
pub const STATS: &str = "stats.PluginConfig";
pub const ALPN: &str = "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig";

pub fn files() -> Vec<FileDescriptorProto> {
    vec![peer_metadata(), metadata_exchange(), stats(), alpn()]
}

fn peer_metadata() -> FileDescriptorProto {
    let method = |name, members: Vec<(&'static str, i32, &'static str)>| {
        let mut m = M::new(
            name,
            members
                .into_iter()
                .map(|(n, num, t)| message(n, num, t).in_oneof(0))
                .collect(),
        );
        m.oneofs = &["method_specifier"];
        m
    };
    let mut config = M::new(
        "Config",
        vec![
            message(
                "downstream_discovery",
                1,
                ".io.istio.http.peer_metadata.Config.DiscoveryMethod",
            )
            .repeated(),
            message(
                "upstream_discovery",
                2,
                ".io.istio.http.peer_metadata.Config.DiscoveryMethod",
            )
            .repeated(),
            message(
                "downstream_propagation",
                3,
                ".io.istio.http.peer_metadata.Config.PropagationMethod",
            )
            .repeated(),
            message(
                "upstream_propagation",
                4,
                ".io.istio.http.peer_metadata.Config.PropagationMethod",
            )
            .repeated(),
            scalar("shared_with_upstream", 5, Type::Bool),
            scalar("additional_labels", 6, Type::String).repeated(),
        ],
    );
    config.nested = vec![
        M::new("Baggage", vec![]),
        M::new("WorkloadDiscovery", vec![]),
        M::new(
            "IstioHeaders",
            vec![scalar("skip_external_clusters", 1, Type::Bool)],
        ),
        M::new(
            "UpstreamFilterState",
            vec![scalar("peer_metadata_key", 1, Type::String)],
        ),
        method(
            "DiscoveryMethod",
            vec![
                ("baggage", 1, ".io.istio.http.peer_metadata.Config.Baggage"),
                (
                    "workload_discovery",
                    2,
                    ".io.istio.http.peer_metadata.Config.WorkloadDiscovery",
                ),
                (
                    "istio_headers",
                    3,
                    ".io.istio.http.peer_metadata.Config.IstioHeaders",
                ),
                (
                    "upstream_filter_state",
                    4,
                    ".io.istio.http.peer_metadata.Config.UpstreamFilterState",
                ),
            ],
        ),
        method(
            "PropagationMethod",
            vec![
                (
                    "istio_headers",
                    1,
                    ".io.istio.http.peer_metadata.Config.IstioHeaders",
                ),
                ("baggage", 2, ".io.istio.http.peer_metadata.Config.Baggage"),
            ],
        ),
    ];
    file(
        "legate/extra/io/istio/http/peer_metadata/config.proto",
        "io.istio.http.peer_metadata",
        &[],
        vec![config],
        vec![],
    )
}

fn metadata_exchange() -> FileDescriptorProto {
    file(
        "legate/extra/envoy/tcp/metadataexchange/config/metadata_exchange.proto",
        "envoy.tcp.metadataexchange.config",
        &[],
        vec![M::new(
            "MetadataExchange",
            vec![
                scalar("protocol", 1, Type::String),
                scalar("enable_discovery", 2, Type::Bool),
                scalar("additional_labels", 3, Type::String).repeated(),
            ],
        )],
        vec![],
    )
}

fn stats() -> FileDescriptorProto {
    let mut metric = M::new(
        "MetricConfig",
        vec![
            message("dimensions", 1, ".stats.MetricConfig.DimensionsEntry").repeated(),
            scalar("name", 2, Type::String),
            scalar("tags_to_remove", 3, Type::String).repeated(),
            scalar("match", 4, Type::String),
            scalar("drop", 5, Type::Bool),
        ],
    );
    metric.nested = vec![M::map_entry(
        "DimensionsEntry",
        scalar("value", 2, Type::String),
    )];
    file(
        "legate/extra/stats/config.proto",
        "stats",
        &["google/protobuf/duration.proto"],
        vec![
            metric,
            M::new(
                "MetricDefinition",
                vec![
                    scalar("name", 1, Type::String),
                    scalar("value", 2, Type::String),
                    enumeration("type", 3, ".stats.MetricType"),
                ],
            ),
            M::new(
                "PluginConfig",
                vec![
                    // 1-5 are declared by istio.io/api (what istiod builds
                    // with) and reserved in the proxy; istiod never sets them.
                    scalar("debug", 1, Type::Bool),
                    scalar("max_peer_cache_size", 2, Type::Int32),
                    scalar("stat_prefix", 3, Type::String),
                    scalar("field_separator", 4, Type::String),
                    scalar("value_separator", 5, Type::String),
                    scalar("disable_host_header_fallback", 6, Type::Bool),
                    message("tcp_reporting_duration", 7, ".google.protobuf.Duration"),
                    message("metrics", 8, ".stats.MetricConfig").repeated(),
                    message("definitions", 9, ".stats.MetricDefinition").repeated(),
                    enumeration("reporter", 10, ".stats.Reporter"),
                    message("rotation_interval", 11, ".google.protobuf.Duration"),
                    message(
                        "graceful_deletion_interval",
                        12,
                        ".google.protobuf.Duration",
                    ),
                ],
            ),
        ],
        vec![
            E {
                name: "MetricType",
                values: &[("COUNTER", 0), ("GAUGE", 1), ("HISTOGRAM", 2)],
            },
            E {
                name: "Reporter",
                values: &[("UNSPECIFIED", 0), ("SERVER_GATEWAY", 1)],
            },
        ],
    )
}

fn alpn() -> FileDescriptorProto {
    let mut config = M::new(
        "FilterConfig",
        vec![message(
            "alpn_override",
            1,
            ".istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig.AlpnOverride",
        )
        .repeated()],
    );
    config.nested = vec![M::new(
        "AlpnOverride",
        vec![
            enumeration(
                "upstream_protocol",
                1,
                ".istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig.Protocol",
            ),
            scalar("alpn_override", 2, Type::String).repeated(),
        ],
    )];
    config.enums = vec![E {
        name: "Protocol",
        values: &[("HTTP10", 0), ("HTTP11", 1), ("HTTP2", 2)],
    }];
    file(
        "legate/extra/istio/envoy/config/filter/http/alpn/v2alpha1/config.proto",
        "istio.envoy.config.filter.http.alpn.v2alpha1",
        &[],
        vec![config],
        vec![],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each type reads the proto3 JSON istiod writes for it.
    #[test]
    fn istiods_configs_decode() {
        for (name, json) in [
            (
                PEER_METADATA,
                serde_json::json!({"downstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}],
                    "downstream_propagation": [{"istio_headers": {}}]}),
            ),
            (
                METADATA_EXCHANGE,
                serde_json::json!({"protocol": "istio-peer-exchange", "enable_discovery": true}),
            ),
            (
                STATS,
                serde_json::json!({"disable_host_header_fallback": true, "tcp_reporting_duration": "5s",
                    "metrics": [{"name": "requests_total", "dimensions": {"a": "request.host"}, "tags_to_remove": ["b"]}],
                    "reporter": "SERVER_GATEWAY"}),
            ),
            (
                ALPN,
                serde_json::json!({"alpn_override": [{"alpn_override": ["istio-http/1.0", "istio", "http/1.0"]},
                    {"upstream_protocol": "HTTP2", "alpn_override": ["istio-h2", "istio", "h2"]}]}),
            ),
        ] {
            let m = crate::json::to_dynamic(json.clone(), name, true)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let back = serde_json::to_value(&m).unwrap();
            assert!(!back.as_object().unwrap().is_empty(), "{name}: {back}");
        }
    }
}
