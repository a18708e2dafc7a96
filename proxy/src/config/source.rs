//! `ConfigSource`: where a dynamic resource comes from.

use super::{join, timeout_or, ConfigError, Result};
use legate_proto::envoy_types::pb::envoy::config::core::v3 as core;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub enum ApiKind {
    Grpc,
    DeltaGrpc,
    Rest,
}

/// An `api_config_source`: a management server reached through a static
/// cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiSource {
    pub kind: ApiKind,
    pub target: ApiTarget,
    pub refresh_delay: Duration,
    pub node_first_only: bool,
}

/// How the management server is reached.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiTarget {
    /// `envoy_grpc` (or REST `cluster_names`): a static cluster.
    Cluster(String),
    /// `google_grpc` `target_uri`: `host:port`, `dns:///host:port`,
    /// `ipv4:addr:port` or `unix:path`.
    Uri(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    Ads,
    Api(ApiSource),
}

#[derive(Debug, Clone, PartialEq)]
pub struct XdsSource {
    pub spec: Spec,
    /// How long a subscription waits for its first response before the
    /// resources count as absent (None: forever).
    pub initial_fetch_timeout: Option<Duration>,
}

impl ApiSource {
    pub fn from_proto(a: &core::ApiConfigSource, path: &str) -> Result<Self> {
        use core::api_config_source::ApiType;
        let kind = match ApiType::try_from(a.api_type) {
            Ok(ApiType::Grpc) => ApiKind::Grpc,
            Ok(ApiType::DeltaGrpc) => ApiKind::DeltaGrpc,
            Ok(ApiType::Rest) => ApiKind::Rest,
            _ => {
                return Err(ConfigError::new(
                    join(path, "api_type"),
                    "only GRPC, DELTA_GRPC and REST are supported",
                ))
            }
        };
        if a.transport_api_version != core::ApiVersion::V3 as i32 {
            return Err(ConfigError::new(
                join(path, "transport_api_version"),
                "only the V3 transport is supported",
            ));
        }
        let target = if kind == ApiKind::Rest {
            if !a.grpc_services.is_empty() {
                return Err(ConfigError::new(
                    join(path, "grpc_services"),
                    "REST sources name clusters in cluster_names",
                ));
            }
            match a.cluster_names.as_slice() {
                [one] => ApiTarget::Cluster(one.clone()),
                _ => {
                    return Err(ConfigError::new(
                        join(path, "cluster_names"),
                        "REST sources need exactly one cluster",
                    ))
                }
            }
        } else {
            if !a.cluster_names.is_empty() {
                return Err(ConfigError::new(
                    join(path, "cluster_names"),
                    "gRPC sources name their cluster in grpc_services",
                ));
            }
            let Some(g) = a.grpc_services.first() else {
                return Err(ConfigError::new(
                    join(path, "grpc_services"),
                    "a gRPC service is required",
                ));
            };
            if g.retry_policy.is_some() {
                return Err(ConfigError::new(
                    join(path, "grpc_services[0].retry_policy"),
                    "not supported for xDS streams",
                ));
            }
            use core::grpc_service::TargetSpecifier;
            match &g.target_specifier {
                Some(TargetSpecifier::EnvoyGrpc(e)) if !e.authority.is_empty() => {
                    return Err(ConfigError::new(
                        join(path, "grpc_services[0].envoy_grpc.authority"),
                        "not supported for management servers yet",
                    ))
                }
                Some(TargetSpecifier::EnvoyGrpc(e)) => ApiTarget::Cluster(e.cluster_name.clone()),
                Some(TargetSpecifier::GoogleGrpc(gg)) => {
                    let p = join(path, "grpc_services[0].google_grpc");
                    if gg.channel_credentials.is_some()
                        || !gg.call_credentials.is_empty()
                        || !gg.channel_credentials_plugin.is_empty()
                        || !gg.call_credentials_plugin.is_empty()
                    {
                        return Err(ConfigError::new(
                            join(&p, "channel_credentials"),
                            "only insecure google_grpc channels are supported",
                        ));
                    }
                    ApiTarget::Uri(gg.target_uri.clone())
                }
                None => {
                    return Err(ConfigError::new(
                        join(path, "grpc_services[0]"),
                        "envoy_grpc or google_grpc is required",
                    ))
                }
            }
        };
        let refresh_delay = match &a.refresh_delay {
            Some(d) => super::duration(d, &join(path, "refresh_delay"))?,
            None => Duration::from_secs(1),
        };
        Ok(Self {
            kind,
            target,
            refresh_delay,
            node_first_only: a.set_node_on_first_message_only,
        })
    }
}

impl XdsSource {
    pub fn from_proto(cs: &core::ConfigSource, path: &str) -> Result<Self> {
        use core::config_source::ConfigSourceSpecifier as S;
        if cs.resource_api_version != core::ApiVersion::V3 as i32 {
            return Err(ConfigError::new(
                join(path, "resource_api_version"),
                "only V3 resources are supported",
            ));
        }
        let spec = match &cs.config_source_specifier {
            Some(S::Ads(_)) => Spec::Ads,
            Some(S::ApiConfigSource(a)) => {
                Spec::Api(ApiSource::from_proto(a, &join(path, "api_config_source"))?)
            }
            Some(S::Self_(_)) => {
                return Err(ConfigError::new(
                    join(path, "self"),
                    "self config sources are not supported yet",
                ))
            }
            Some(S::Path(_)) | Some(S::PathConfigSource(_)) => {
                return Err(ConfigError::new(
                    join(path, "path_config_source"),
                    "filesystem config sources are not supported yet",
                ))
            }
            None => {
                return Err(ConfigError::new(
                    path,
                    "a config source specifier is required",
                ))
            }
        };
        let initial_fetch_timeout = timeout_or(
            cs.initial_fetch_timeout.as_ref(),
            Some(Duration::from_secs(15)),
            &join(path, "initial_fetch_timeout"),
        )?;
        Ok(Self {
            spec,
            initial_fetch_timeout,
        })
    }
}
