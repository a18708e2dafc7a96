//! Listeners, filter chains and the HTTP connection manager.

use super::route::RouteConfig;
use super::{index, join, socket_addr, ConfigError, Result, Wrapped};
use legate_proto::envoy_types::pb::envoy::config::listener::v3 as pb;
use legate_proto::envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use std::net::SocketAddr;
use std::sync::Arc;

pub const HCM_TYPE: &str =
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
pub const ROUTER_TYPE: &str = "envoy.extensions.filters.http.router.v3.Router";

#[derive(Debug)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    /// Stat prefix: `listener.<address>.` unless `stat_prefix` is set.
    pub stat_prefix: String,
    pub chain: Arc<Hcm>,
    /// traffic_direction INBOUND: drained by `/drain_listeners?inboundonly`.
    pub inbound: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Codec {
    Auto,
    Http1,
    Http2,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ServerHeader {
    Overwrite,
    AppendIfAbsent,
    PassThrough,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UnderscoreAction {
    Allow,
    RejectRequest,
    DropHeader,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EscapedSlashes {
    KeepUnchanged,
    RejectRequest,
    UnescapeAndRedirect,
    UnescapeAndForward,
}

/// The HTTP connection manager of a filter chain.
#[derive(Debug)]
pub struct Hcm {
    pub stat_prefix: String,
    pub codec: Codec,
    pub route_config: Arc<RouteConfig>,
    pub use_remote_address: bool,
    pub xff_num_trusted_hops: u32,
    pub skip_xff_append: bool,
    pub server_name: String,
    pub server_header: ServerHeader,
    pub strip_matching_host_port: bool,
    pub strip_any_host_port: bool,
    pub normalize_path: bool,
    pub merge_slashes: bool,
    pub escaped_slashes: EscapedSlashes,
    pub max_request_headers_kb: u32,
    pub max_headers_count: u32,
    pub underscores: UnderscoreAction,
    pub generate_request_id: bool,
    pub preserve_external_request_id: bool,
    pub always_set_request_id_in_response: bool,
    /// Upgrade types allowed through (lower case), from `upgrade_configs`.
    pub upgrades: Vec<String>,
}

impl Listener {
    pub fn from_proto(l: &pb::Listener, path: &str) -> Result<Self> {
        if l.name.is_empty() {
            return Err(ConfigError::new(
                join(path, "name"),
                "listener name is required",
            ));
        }
        let addr = l
            .address
            .as_ref()
            .ok_or_else(|| ConfigError::new(join(path, "address"), "address is required"))?;
        let address = socket_addr(addr, &join(path, "address"))?;
        if l.filter_chains.len() != 1 {
            return Err(ConfigError::new(
                join(path, "filter_chains"),
                "exactly one filter chain is supported until filter_chain_match lands",
            ));
        }
        let fc = &l.filter_chains[0];
        let fc_path = index(path, "filter_chains", 0);
        if fc.filters.len() != 1 {
            return Err(ConfigError::new(
                join(&fc_path, "filters"),
                "exactly one network filter (http_connection_manager) is supported",
            ));
        }
        let f = &fc.filters[0];
        let f_path = index(&fc_path, "filters", 0);
        use pb::filter::ConfigType;
        let any = match &f.config_type {
            Some(ConfigType::TypedConfig(a)) => a,
            _ => {
                return Err(ConfigError::new(
                    join(&f_path, "typed_config"),
                    "typed_config is required",
                ))
            }
        };
        let tn = legate_proto::type_name(&any.type_url);
        if tn != HCM_TYPE {
            return Err(ConfigError::new(
                join(&f_path, "typed_config"),
                format!("network filter {tn} is not supported"),
            ));
        }
        let h: hcm::HttpConnectionManager = prost::Message::decode(any.value.as_slice())
            .map_err(|e| ConfigError::new(join(&f_path, "typed_config"), e.to_string()))?;
        let chain = Arc::new(Hcm::from_proto(&h, &join(&f_path, "typed_config"))?);
        let stat_prefix = if l.stat_prefix.is_empty() {
            format!("listener.{address}")
        } else {
            format!("listener.{}", l.stat_prefix)
        };
        Ok(Self {
            name: l.name.clone(),
            address,
            stat_prefix,
            chain,
            inbound: l.traffic_direction
                == legate_proto::envoy_types::pb::envoy::config::core::v3::TrafficDirection::Inbound
                    as i32,
        })
    }
}

impl Hcm {
    pub fn from_proto(h: &hcm::HttpConnectionManager, path: &str) -> Result<Self> {
        use hcm::http_connection_manager::{
            CodecType, PathWithEscapedSlashesAction as E, RouteSpecifier,
            ServerHeaderTransformation as S,
        };
        if h.stat_prefix.is_empty() {
            return Err(ConfigError::new(
                join(path, "stat_prefix"),
                "stat_prefix is required",
            ));
        }
        let codec = match CodecType::try_from(h.codec_type) {
            Ok(CodecType::Auto) => Codec::Auto,
            Ok(CodecType::Http1) => Codec::Http1,
            Ok(CodecType::Http2) => Codec::Http2,
            _ => {
                return Err(ConfigError::new(
                    join(path, "codec_type"),
                    "only AUTO, HTTP1 and HTTP2 are supported",
                ))
            }
        };
        let route_config = match &h.route_specifier {
            Some(RouteSpecifier::RouteConfig(rc)) => {
                Arc::new(RouteConfig::from_proto(rc, &join(path, "route_config"))?)
            }
            Some(RouteSpecifier::Rds(_)) => {
                return Err(ConfigError::new(
                    join(path, "rds"),
                    "RDS is not supported yet (needs xDS)",
                ))
            }
            Some(_) => {
                return Err(ConfigError::new(
                    join(path, "scoped_routes"),
                    "scoped routes are not supported yet",
                ))
            }
            None => return Err(ConfigError::new(path, "route_config is required")),
        };
        // The filter list must end in the router, and be only the router:
        // any other HTTP filter would change traffic and is not built yet.
        if h.http_filters.is_empty() {
            return Err(ConfigError::new(
                join(path, "http_filters"),
                "the router filter is required",
            ));
        }
        for (i, f) in h.http_filters.iter().enumerate() {
            let p = index(path, "http_filters", i);
            use hcm::http_filter::ConfigType;
            let tn = match &f.config_type {
                Some(ConfigType::TypedConfig(a)) => {
                    legate_proto::type_name(&a.type_url).to_string()
                }
                _ => {
                    return Err(ConfigError::new(
                        join(&p, "typed_config"),
                        "typed_config is required",
                    ))
                }
            };
            if tn != ROUTER_TYPE {
                if f.is_optional && legate_proto::pool().get_message_by_name(&tn).is_none() {
                    tracing::warn!(path = %p, filter = %tn, "optional HTTP filter is not supported; skipped as Envoy skips unknown optional filters");
                    continue;
                }
                return Err(ConfigError::new(
                    join(&p, "typed_config"),
                    format!("HTTP filter {tn} is not supported"),
                ));
            }
            if i + 1 != h.http_filters.len() {
                return Err(ConfigError::new(
                    p,
                    "the router must be the last HTTP filter",
                ));
            }
        }
        let server_header =
            match S::try_from(h.server_header_transformation).unwrap_or(S::Overwrite) {
                S::Overwrite => ServerHeader::Overwrite,
                S::AppendIfAbsent => ServerHeader::AppendIfAbsent,
                S::PassThrough => ServerHeader::PassThrough,
            };
        let escaped_slashes = match E::try_from(h.path_with_escaped_slashes_action)
            .unwrap_or(E::ImplementationSpecificDefault)
        {
            E::ImplementationSpecificDefault | E::KeepUnchanged => EscapedSlashes::KeepUnchanged,
            E::RejectRequest => EscapedSlashes::RejectRequest,
            E::UnescapeAndRedirect => EscapedSlashes::UnescapeAndRedirect,
            E::UnescapeAndForward => EscapedSlashes::UnescapeAndForward,
        };
        let common = h.common_http_protocol_options.clone().unwrap_or_default();
        let cp = join(path, "common_http_protocol_options");
        // Shared with clusters (where they are applied); downstream they are
        // not applied yet, so they are rejected here rather than ignored.
        if common.idle_timeout.is_some() {
            return Err(ConfigError::new(
                join(&cp, "idle_timeout"),
                "downstream idle_timeout is not supported yet",
            ));
        }
        if common.max_requests_per_connection.is_some() {
            return Err(ConfigError::new(
                join(&cp, "max_requests_per_connection"),
                "downstream max_requests_per_connection is not supported yet",
            ));
        }
        use legate_proto::envoy_types::pb::envoy::config::core::v3::http_protocol_options::HeadersWithUnderscoresAction as U;
        let underscores =
            match U::try_from(common.headers_with_underscores_action).unwrap_or(U::Allow) {
                U::Allow => UnderscoreAction::Allow,
                U::RejectRequest => UnderscoreAction::RejectRequest,
                U::DropHeader => UnderscoreAction::DropHeader,
            };
        let max_kb = h.max_request_headers_kb.val().unwrap_or(60);
        if !(1..=64).contains(&max_kb) {
            // pingora's HTTP/2 server caps the header list at 64 KiB.
            return Err(ConfigError::new(
                join(path, "max_request_headers_kb"),
                "values above 64 are not supported (pingora's HTTP/2 limit)",
            ));
        }
        if h.http2_protocol_options
            .as_ref()
            .is_some_and(|o| o.max_concurrent_streams.is_some())
        {
            return Err(ConfigError::new(
                join(path, "http2_protocol_options.max_concurrent_streams"),
                "downstream max_concurrent_streams is not supported yet",
            ));
        }
        Ok(Self {
            stat_prefix: h.stat_prefix.clone(),
            codec,
            route_config,
            use_remote_address: h.use_remote_address.val().unwrap_or(false),
            xff_num_trusted_hops: h.xff_num_trusted_hops,
            skip_xff_append: h.skip_xff_append,
            server_name: if h.server_name.is_empty() {
                "envoy".into()
            } else {
                h.server_name.clone()
            },
            server_header,
            strip_matching_host_port: h.strip_matching_host_port,
            strip_any_host_port: matches!(
                h.strip_port_mode,
                Some(hcm::http_connection_manager::StripPortMode::StripAnyHostPort(true))
            ),
            normalize_path: h.normalize_path.val().unwrap_or(false),
            merge_slashes: h.merge_slashes,
            escaped_slashes,
            max_request_headers_kb: max_kb,
            max_headers_count: {
                let n = common.max_headers_count.val().unwrap_or(100);
                if n > 256 {
                    // pingora's HTTP/1 parser stops at 256 headers.
                    return Err(ConfigError::new(
                        join(&cp, "max_headers_count"),
                        "values above 256 are not supported (pingora's HTTP/1 limit)",
                    ));
                }
                n
            },
            underscores,
            generate_request_id: h.generate_request_id.val().unwrap_or(true),
            preserve_external_request_id: h.preserve_external_request_id,
            always_set_request_id_in_response: h.always_set_request_id_in_response,
            upgrades: h
                .upgrade_configs
                .iter()
                .filter(|u| u.enabled.as_ref().is_none_or(|e| e.value))
                .map(|u| u.upgrade_type.to_ascii_lowercase())
                .collect(),
        })
    }
}
