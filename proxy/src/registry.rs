//! What Legate supports, field by field.
//!
//! Every field set in a config is checked here before translation (see
//! [`validate`]): a field listed as supported is translated by `config::*`
//! with Envoy's semantics; a field listed with a warning cannot change
//! traffic and is accepted with a log line and a counter; any other field is
//! an error naming its path. The compatibility report is generated from this
//! table, so it cannot drift from what the code does.

use legate_proto::prost_reflect::DynamicMessage;
use legate_proto::walk;

/// One message's supported fields.
pub struct MessageSupport {
    pub message: &'static str,
    pub supported: &'static [&'static str],
    /// Accepted with a warning: (field, why it cannot change traffic).
    pub warn: &'static [(&'static str, &'static str)],
}

pub(crate) const fn m(
    message: &'static str,
    supported: &'static [&'static str],
    warn: &'static [(&'static str, &'static str)],
) -> MessageSupport {
    MessageSupport {
        message,
        supported,
        warn,
    }
}

/// A resource monitor other than the connection limit's only feeds
/// overload actions, which are refused.
const MONITOR_ONLY: &str =
    "this resource monitor only feeds overload actions, and Legate refuses actions";
const NO_LOG: &str = "access logging is not implemented yet; it changes no traffic";
const UNEVALUATED_LOG_FILTER: &str =
    "this access log filter is not evaluated: the entries it would drop are written too";
const NO_ALS: &str =
    "the gRPC access log service is not implemented; access logs change no traffic";
const NO_STATS_TAGS: &str = "stat tag extraction only changes stat names";
const SLOW_START: &str = "Envoy 1.40 was measured giving an added host its full share at once whatever it says; so does Legate";
const NO_SPANS: &str = "only shapes spans, which change no traffic: Legate exports OpenTelemetry and Zipkin spans without it, and Datadog spans not at all (its trace context is propagated and the sampling decision packed into x-request-id, as Envoy does)";
const NO_LOCAL_CLUSTER: &str = "zone-aware routing engages only with a local cluster (the bootstrap's cluster_manager.local_cluster_name), which Legate does not accept; without one Envoy balances as if this were unset, and so does Legate";
const HC_EVENTS: &str = "health check event logs are not written yet; they change no traffic";

/// The registry. Messages whose names start with `google.protobuf.` are
/// plain values and always accepted.
pub static REGISTRY: &[MessageSupport] = &[
    m(
        "envoy.config.bootstrap.v3.Bootstrap",
        &[
            "dynamic_resources",
            "node",
            "static_resources",
            "admin",
            "layered_runtime",
            // Each extension's type is checked on its own: only the
            // internal listener one (below) is known.
            "bootstrap_extensions",
            // Its global connection limit (`crate::overload`).
            "overload_manager",
        ],
        &[
            (
                "application_log_config",
                "the format of Legate's own log lines, not of access logs",
            ),
            (
                "deferred_stat_options",
                "when stats are created, not what they count",
            ),
            ("stats_config", NO_STATS_TAGS),
            (
                "stats_flush_interval",
                "stats are pulled from the admin API, not flushed",
            ),
            (
                "stats_sinks",
                "stats sinks are not implemented; they change no traffic",
            ),
            ("watchdogs", "watchdogs change no traffic"),
            (
                "hds_config",
                "health discovery reporting is not implemented",
            ),
            ("enable_dispatcher_stats", "only adds stats"),
        ],
    ),
    m(
        "envoy.config.core.v3.Node",
        &[
            "id",
            "cluster",
            "metadata",
            "locality",
            "user_agent_name",
            "user_agent_version",
            "user_agent_build_version",
            "extensions",
            "client_features",
            "listening_addresses",
        ],
        &[],
    ),
    m(
        "envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
        &[],
        &[(
            "buffer_size_kb",
            "sizes the buffers of internal listener connections, and listeners with `internal_listener` are refused",
        )],
    ),
    m(
        "envoy.config.core.v3.Locality",
        &["region", "zone", "sub_zone"],
        &[],
    ),
    m(
        "envoy.config.core.v3.Metadata",
        &["filter_metadata", "typed_filter_metadata"],
        &[],
    ),
    m(
        "envoy.config.core.v3.BuildVersion",
        &["version", "metadata"],
        &[],
    ),
    m(
        "envoy.type.v3.SemanticVersion",
        &["major_number", "minor_number", "patch"],
        &[],
    ),
    m(
        "envoy.config.core.v3.Extension",
        &["name", "category", "type_urls", "disabled", "version"],
        &[],
    ),
    m(
        "envoy.config.bootstrap.v3.Admin",
        &["address", "ignore_global_conn_limit"],
        &[
            ("access_log", NO_LOG),
            ("access_log_path", NO_LOG),
            ("profile_path", "CPU profiling is not implemented"),
            ("socket_options", "admin socket options are not applied"),
        ],
    ),
    // Actions and load shed points are refused: they change traffic under
    // pressure, and Legate runs none of them.
    m(
        "envoy.config.overload.v3.OverloadManager",
        &["resource_monitors"],
        &[
            (
                "refresh_interval",
                "how often resource monitors are read; the connection limit is checked at each accept",
            ),
            (
                "buffer_factory_config",
                "tracks stream memory for the reset_high_memory_stream action, and actions are refused",
            ),
        ],
    ),
    m(
        "envoy.config.overload.v3.ResourceMonitor",
        &["name", "typed_config"],
        &[],
    ),
    m(
        "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
        &["max_active_downstream_connections"],
        &[],
    ),
    m(
        "envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
        &[],
        &[("max_heap_size_bytes", MONITOR_ONLY)],
    ),
    m(
        "envoy.extensions.resource_monitors.injected_resource.v3.InjectedResourceConfig",
        &[],
        &[("filename", MONITOR_ONLY)],
    ),
    m(
        "envoy.extensions.resource_monitors.cgroup_memory.v3.CgroupMemoryConfig",
        &[],
        &[("max_memory_bytes", MONITOR_ONLY)],
    ),
    m(
        "envoy.extensions.resource_monitors.cpu_utilization.v3.CpuUtilizationConfig",
        &[],
        &[("mode", MONITOR_ONLY)],
    ),
    m(
        "envoy.config.bootstrap.v3.Bootstrap.StaticResources",
        &["listeners", "clusters", "secrets"],
        &[],
    ),
    m("envoy.config.bootstrap.v3.LayeredRuntime", &["layers"], &[]),
    m(
        "envoy.config.bootstrap.v3.RuntimeLayer",
        &["rtds_layer", "name", "static_layer", "admin_layer"],
        &[],
    ),
    m(
        "envoy.config.bootstrap.v3.RuntimeLayer.AdminLayer",
        &[],
        &[],
    ),
    m(
        "envoy.config.metrics.v3.StatsConfig",
        &[],
        &[
            ("stats_tags", NO_STATS_TAGS),
            ("use_all_default_tags", NO_STATS_TAGS),
            (
                "stats_matcher",
                "stat inclusion only changes which stats exist",
            ),
            (
                "histogram_bucket_settings",
                "histogram buckets change no traffic",
            ),
        ],
    ),
    m("envoy.config.core.v3.Address", &["socket_address", "pipe"], &[]),
    m(
        "envoy.config.core.v3.Pipe",
        &["path"],
        &[("mode", "the socket is the management server's; its mode is not Legate's to set")],
    ),
    m(
        "envoy.config.core.v3.SocketAddress",
        // ipv4_compat is rejected: listeners bind IPv6 sockets v6-only.
        &["protocol", "address", "port_value"],
        &[],
    ),
    // Listeners.
    m(
        "envoy.config.listener.v3.Listener",
        // traffic_direction: /drain_listeners?inboundonly drains INBOUND ones.
        &[
            "default_filter_chain",
            "name",
            "address",
            "filter_chains",
            "per_connection_buffer_limit_bytes",
            "stat_prefix",
            "traffic_direction",
            "bind_to_port",
            "listener_filters",
            "listener_filters_timeout",
            "continue_on_listener_filters_timeout",
            "use_original_dst",
            "ignore_global_conn_limit",
            // Exempts it from the overload manager's connection limit
            // (`crate::overload`); overload actions are refused.
            "bypass_overload_manager",
            "drain_type",
            "access_log",
            "udp_listener_config",
            "socket_options",
            "additional_addresses",
        ],
        &[
            ("metadata", "only informational"),
            (
                "max_connections_to_accept_per_socket_event",
                "how many connections one wake-up of the accept loop takes before others run: fairness, not which connections are served",
            ),
        ],
    ),
    m(
        "envoy.config.listener.v3.FilterChain",
        &[
            "filters",
            "name",
            "filter_chain_match",
            "transport_socket",
            "transport_socket_connect_timeout",
        ],
        &[("metadata", "only informational")],
    ),
    m(
        "envoy.config.listener.v3.FilterChainMatch",
        &[
            "destination_port",
            "prefix_ranges",
            "server_names",
            "transport_protocol",
            "application_protocols",
            "direct_source_prefix_ranges",
            "source_type",
            "source_prefix_ranges",
            "source_ports",
        ],
        &[],
    ),
    m("envoy.config.core.v3.CidrRange", &["address_prefix", "prefix_len"], &[]),
    m(
        "envoy.config.listener.v3.Filter",
        &["name", "typed_config"],
        &[],
    ),
    // HTTP connection manager.
    m(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        &["rds", "scoped_routes", 
            "codec_type",
            "proxy_100_continue",
            "stat_prefix",
            "route_config",
            "http_filters",
            "use_remote_address",
            "xff_num_trusted_hops",
            "skip_xff_append",
            "original_ip_detection_extensions",
            "early_header_mutation_extensions",
            "http1_safe_max_connection_duration",
            // Only match_upstream, which is what Legate's HTTP/2 upstreams
            // do (pingora sets :scheme from the upstream's transport).
            "scheme_header_transformation",
            "server_name",
            "server_header_transformation",
            "strip_matching_host_port",
            "strip_any_host_port",
            "strip_trailing_host_dot",
            "normalize_path",
            "merge_slashes",
            "path_with_escaped_slashes_action",
            "common_http_protocol_options",
            "max_request_headers_kb",
            "generate_request_id",
            "request_id_extension",
            "preserve_external_request_id",
            "always_set_request_id_in_response",
            "http2_protocol_options",
            "http_protocol_options",
            "upgrade_configs",
            "forward_client_cert_details",
            "set_current_client_cert_details",
            "access_log",
            "stream_idle_timeout",
            "request_timeout",
            "tracing",
        ],
        &[
            ("delayed_close_timeout", "close timing only"),
        ],
    ),
    m(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.SetCurrentClientCertDetails",
        &["subject", "issuer", "cert", "chain", "dns", "uri", "format"],
        &[],
    ),
    m(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.UpgradeConfig",
        &["upgrade_type", "enabled"],
        &[],
    ),
    m(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter",
        &["name", "typed_config", "is_optional", "config_discovery", "disabled"],
        &[],
    ),
    m(
        "envoy.extensions.filters.http.router.v3.Router",
        &["suppress_envoy_headers", "start_child_span"],
        &[("dynamic_stats", "only changes stats")],
    ),
    m(
        "envoy.config.core.v3.HttpProtocolOptions",
        &[
            "idle_timeout",
            "max_headers_count",
            "max_response_headers_kb",
            "headers_with_underscores_action",
            "max_requests_per_connection",
            "max_connection_duration",
            // Downstream: the routes' default; upstream: each attempt's.
            "max_stream_duration",
        ],
        &[],
    ),
    m(
        "envoy.config.core.v3.Http1ProtocolOptions",
        // ignore_http_11_upgrade: the connection manager's (Envoy's upstream
        // codec has no use for it).
        &[
            "accept_http_10",
            "default_host_for_http_10",
            "ignore_http_11_upgrade",
            "header_key_format",
        ],
        &[],
    ),
    m(
        "envoy.config.core.v3.Http1ProtocolOptions.HeaderKeyFormat",
        &["proper_case_words", "stateful_formatter"],
        &[],
    ),
    m(
        "envoy.config.core.v3.Http1ProtocolOptions.HeaderKeyFormat.ProperCaseWords",
        &[],
        &[],
    ),
    // forward_reason_phrase: refused on clusters, no effect on a
    // connection manager (as in Envoy).
    m(
        "envoy.extensions.http.header_formatters.preserve_case.v3.PreserveCaseFormatterConfig",
        &["forward_reason_phrase", "formatter_type_on_envoy_headers"],
        &[],
    ),
    m(
        "envoy.config.core.v3.Http2ProtocolOptions",
        &[
            "max_concurrent_streams",
            "initial_stream_window_size",
            "initial_connection_window_size",
            // Downstream only: clusters refuse it.
            "connection_keepalive",
            // Clusters only, and only true: connection managers refuse it.
            "override_stream_error_on_invalid_http_message",
        ],
        &[],
    ),
    m(
        "envoy.config.core.v3.KeepaliveSettings",
        &["interval", "timeout", "interval_jitter"],
        &[(
            "connection_idle_interval",
            "pings before new streams on idle connections are a client's; a server's pings follow interval",
        )],
    ),
    // Routes.
    m(
        "envoy.config.route.v3.RouteConfiguration",
        &["vhds", 
            "name",
            "virtual_hosts",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
            "ignore_port_in_host_matching",
            "most_specific_header_mutations_wins",
            "validate_clusters",
            "typed_per_filter_config",
            "max_direct_response_body_size_bytes",
        ],
        &[],
    ),
    m(
        "envoy.config.route.v3.VirtualHost",
        &[
            "name",
            "domains",
            "routes",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
            "retry_policy",
            "typed_per_filter_config",
            "rate_limits",
            "include_request_attempt_count",
            "include_attempt_count_in_response",
        ],
        // As the route's: no filter or formatter of Legate reads it yet.
        &[
            ("metadata", "only informational"),
            (
                "virtual_clusters",
                "virtual clusters only add per-request-class stats (vhost.<name>.vcluster.*), which Legate does not emit",
            ),
        ],
    ),
    m(
        "envoy.config.route.v3.FilterConfig",
        &["config", "is_optional", "disabled"],
        &[],
    ),
    m(
        "envoy.config.route.v3.Route",
        &[
            "name",
            "match",
            "route",
            "redirect",
            "direct_response",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
            "typed_per_filter_config",
            "decorator",
            "tracing",
            // Sent on by ext_authz's route_metadata_context_namespaces;
            // Legate reads it nowhere else.
            "metadata",
        ],
        &[
            (
                "stat_prefix",
                "only names per-route stats (vhost.<name>.route.<stat_prefix>.*), which Legate does not emit",
            ),
        ],
    ),
    m(
        "envoy.config.route.v3.RouteMatch",
        &[
            "prefix",
            "path",
            "safe_regex",
            "path_separated_prefix",
            "path_match_policy",
            "case_sensitive",
            "headers",
            "query_parameters",
            "cookies",
            "grpc",
            "runtime_fraction",
        ],
        &[],
    ),
    m(
        "envoy.config.route.v3.RouteMatch.GrpcRouteMatchOptions",
        &[],
        &[],
    ),
    m(
        "envoy.config.core.v3.TypedExtensionConfig",
        &["name", "typed_config"],
        &[],
    ),
    m(
        "envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig",
        &["path_template"],
        &[],
    ),
    m(
        "envoy.config.core.v3.RuntimeFractionalPercent",
        &["default_value", "runtime_key"],
        &[],
    ),
    m(
        "envoy.type.v3.FractionalPercent",
        &["numerator", "denominator"],
        &[],
    ),
    m(
        "envoy.config.route.v3.HeaderMatcher",
        &[
            "name",
            "exact_match",
            "safe_regex_match",
            "range_match",
            "present_match",
            "prefix_match",
            "suffix_match",
            "contains_match",
            "string_match",
            "invert_match",
            "treat_missing_header_as_empty",
        ],
        &[],
    ),
    m(
        "envoy.config.route.v3.QueryParameterMatcher",
        &["name", "string_match", "present_match"],
        &[],
    ),
    m(
        "envoy.config.route.v3.CookieMatcher",
        &["name", "string_match", "invert_match"],
        &[],
    ),
    m(
        "envoy.type.matcher.v3.StringMatcher",
        &[
            "exact",
            "prefix",
            "suffix",
            "safe_regex",
            "contains",
            "ignore_case",
        ],
        &[],
    ),
    m(
        "envoy.type.matcher.v3.RegexMatcher",
        &["regex", "google_re2"],
        &[],
    ),
    m(
        "envoy.type.matcher.v3.RegexMatcher.GoogleRE2",
        &[],
        &[(
            "max_program_size",
            "deprecated; program size is not limited",
        )],
    ),
    m(
        "envoy.type.matcher.v3.RegexMatchAndSubstitute",
        &["pattern", "substitution"],
        &[],
    ),
    m("envoy.type.v3.Int64Range", &["start", "end"], &[]),
    m(
        "envoy.config.route.v3.RouteAction.RequestMirrorPolicy",
        &[
            "cluster",
            "cluster_header",
            "runtime_fraction",
            "disable_shadow_host_suffix_append",
            "host_rewrite_literal",
        ],
        &[(
            "trace_sampled",
            "tracing is not implemented yet; sampling changes no traffic",
        )],
    ),
    m(
        "envoy.config.route.v3.RouteAction",
        &[
            "cluster",
            "cluster_header",
            "weighted_clusters",
            "cluster_not_found_response_code",
            "prefix_rewrite",
            "regex_rewrite",
            "host_rewrite_literal",
            "auto_host_rewrite",
            "host_rewrite_header",
            "host_rewrite_path_regex",
            "timeout",
            "idle_timeout",
            "max_stream_duration",
            "max_grpc_timeout",
            "grpc_timeout_offset",
            "retry_policy",
            "hash_policy",
            "upgrade_configs",
            "append_x_forwarded_host",
            "rate_limits",
            "include_vh_rate_limits",
            "request_mirror_policies",
        ],
        &[],
    ),
    m(
        "envoy.config.route.v3.RouteAction.UpgradeConfig",
        // connect_config (CONNECT terminated by the proxy) is rejected.
        &["upgrade_type", "enabled"],
        &[],
    ),
    m(
        "envoy.config.route.v3.WeightedCluster",
        &["clusters", "total_weight", "use_hash_policy"],
        &[],
    ),
    m(
        "envoy.config.route.v3.WeightedCluster.ClusterWeight",
        &[
            "name",
            "weight",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
            "host_rewrite_literal",
            "typed_per_filter_config",
        ],
        &[(
            "metadata_match",
            "subset load balancing is not implemented, and without subsets Envoy ignores it too",
        )],
    ),
    m(
        "envoy.config.route.v3.RouteAction.HashPolicy",
        &[
            "header",
            "connection_properties",
            "query_parameter",
            "cookie",
            "terminal",
        ],
        &[],
    ),
    m(
        "envoy.config.route.v3.RouteAction.HashPolicy.Header",
        &["header_name"],
        &[],
    ),
    m(
        "envoy.config.route.v3.RouteAction.HashPolicy.ConnectionProperties",
        &["source_ip"],
        &[],
    ),
    m(
        "envoy.config.route.v3.RouteAction.HashPolicy.QueryParameter",
        &["name"],
        &[],
    ),
    m(
        "envoy.config.route.v3.RetryPolicy",
        &[
            "retry_on",
            "num_retries",
            "per_try_timeout",
            "retry_back_off",
            "retry_host_predicate",
            "retriable_status_codes",
            "retriable_headers",
            "host_selection_retry_max_attempts",
            "retry_priority",
        ],
        &[],
    ),
    m(
        "envoy.config.route.v3.RetryPolicy.RetryPriority",
        &["name", "typed_config"],
        &[],
    ),
    m(
        "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
        &["update_frequency"],
        &[],
    ),
    m(
        "envoy.config.route.v3.RetryPolicy.RetryBackOff",
        &["base_interval", "max_interval"],
        &[],
    ),
    m(
        "envoy.config.route.v3.RetryPolicy.RetryHostPredicate",
        &["name", "typed_config"],
        &[],
    ),
    m(
        "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate",
        &[],
        &[],
    ),
    m(
        "envoy.config.route.v3.RedirectAction",
        &[
            "https_redirect",
            "scheme_redirect",
            "host_redirect",
            "port_redirect",
            "path_redirect",
            "prefix_rewrite",
            "regex_rewrite",
            "response_code",
            "strip_query",
        ],
        &[],
    ),
    m(
        "envoy.config.route.v3.DirectResponseAction",
        &["status", "body", "body_format"],
        &[],
    ),
    m(
        "envoy.config.core.v3.DataSource",
        &[
            "filename",
            "inline_bytes",
            "inline_string",
            "environment_variable",
        ],
        &[],
    ),
    m(
        "envoy.config.core.v3.HeaderValueOption",
        &["header", "append", "append_action", "keep_empty_value"],
        &[],
    ),
    m(
        "envoy.config.core.v3.HeaderValue",
        &["key", "value", "raw_value"],
        &[],
    ),
    // xDS: config sources and dynamic resources.
    m(
        "envoy.config.bootstrap.v3.Bootstrap.DynamicResources",
        &["lds_config", "cds_config", "ads_config"],
        &[],
    ),
    m(
        "envoy.config.core.v3.ConfigSource",
        &["ads", "api_config_source", "resource_api_version", "initial_fetch_timeout"],
        &[],
    ),
    m("envoy.config.core.v3.AggregatedConfigSource", &[], &[]),
    m(
        "envoy.config.core.v3.ApiConfigSource",
        &[
            "api_type",
            "transport_api_version",
            "cluster_names",
            "grpc_services",
            "refresh_delay",
            "set_node_on_first_message_only",
        ],
        &[("request_timeout", "REST requests use their own timeout")],
    ),
    // `timeout` is a unary call's deadline: ext_authz's check uses it; the
    // long-lived xDS streams have none (Envoy starts them without one too),
    // and the rate limit filter has its own `timeout`.
    m(
        "envoy.config.core.v3.GrpcService",
        // retry_policy: ext_authz honours it; the other users refuse it.
        &["envoy_grpc", "google_grpc", "timeout", "retry_policy", "initial_metadata"],
        &[],
    ),
    m(
        "envoy.config.core.v3.GrpcService.GoogleGrpc",
        &["target_uri", "stat_prefix"],
        &[],
    ),
    m(
        "envoy.config.core.v3.GrpcService.EnvoyGrpc",
        &["cluster_name", "authority"],
        &[],
    ),
    m(
        "envoy.config.bootstrap.v3.RuntimeLayer.RtdsLayer",
        &["name", "rtds_config"],
        &[],
    ),
    m("envoy.service.runtime.v3.Runtime", &["name", "layer"], &[]),
    m(
        "envoy.extensions.filters.network.http_connection_manager.v3.Rds",
        &["config_source", "route_config_name"],
        &[],
    ),
    m(
        "envoy.extensions.filters.network.http_connection_manager.v3.ScopedRoutes",
        &[
            "name",
            "scope_key_builder",
            "rds_config_source",
            "scoped_rds",
            "scoped_route_configurations_list",
        ],
        &[],
    ),
    m("envoy.extensions.filters.network.http_connection_manager.v3.ScopedRoutes.ScopeKeyBuilder", &["fragments"], &[]),
    m(
        "envoy.extensions.filters.network.http_connection_manager.v3.ScopedRoutes.ScopeKeyBuilder.FragmentBuilder",
        &["header_value_extractor"],
        &[],
    ),
    m(
        "envoy.extensions.filters.network.http_connection_manager.v3.ScopedRoutes.ScopeKeyBuilder.FragmentBuilder.HeaderValueExtractor",
        &["name", "element_separator", "index"],
        &[],
    ),
    m("envoy.extensions.filters.network.http_connection_manager.v3.ScopedRds", &["scoped_rds_config_source"], &[]),
    m(
        "envoy.extensions.filters.network.http_connection_manager.v3.ScopedRouteConfigurationsList",
        &["scoped_route_configurations"],
        &[],
    ),
    m(
        "envoy.config.route.v3.ScopedRouteConfiguration",
        &["name", "route_configuration_name", "key", "on_demand"],
        &[],
    ),
    m("envoy.config.route.v3.ScopedRouteConfiguration.Key", &["fragments"], &[]),
    m(
        "envoy.config.route.v3.ScopedRouteConfiguration.Key.Fragment",
        &["string_key"],
        &[],
    ),
    m("envoy.config.route.v3.Vhds", &["config_source"], &[]),
    m(
        "envoy.config.core.v3.ExtensionConfigSource",
        &[
            "config_source",
            "type_urls",
            "default_config",
            "apply_default_config_without_warming",
        ],
        &[],
    ),
    m(
        "envoy.config.cluster.v3.Cluster.EdsClusterConfig",
        &["eds_config", "service_name"],
        &[],
    ),
    // L4.
    m(
        "envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit",
        &["stat_prefix", "max_connections", "delay"],
        &[],
    ),
    m(
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        &[
            "stat_prefix",
            "cluster",
            "weighted_clusters",
            "idle_timeout",
            "max_connect_attempts",
            "max_downstream_connection_duration",
            "hash_policy",
            "access_log",
        ],
        &[],
    ),
    m(
        "envoy.config.core.v3.SchemeHeaderTransformation",
        &["match_upstream"],
        &[],
    ),
    m(
        "envoy.extensions.http.original_ip_detection.xff.v3.XffConfig",
        &["xff_num_trusted_hops", "xff_trusted_cidrs", "skip_xff_append"],
        &[],
    ),
    m(
        "envoy.extensions.http.original_ip_detection.xff.v3.XffTrustedCidrs",
        &["cidrs"],
        &[],
    ),
    m(
        "envoy.extensions.http.original_ip_detection.custom_header.v3.CustomHeaderConfig",
        &["header_name", "allow_extension_to_set_address_as_trusted", "reject_with_status"],
        &[],
    ),
    m(
        "envoy.config.accesslog.v3.AccessLog",
        &["name", "typed_config", "filter"],
        &[],
    ),
    m(
        "envoy.config.accesslog.v3.AccessLogFilter",
        &[
            "status_code_filter",
            "duration_filter",
            "not_health_check_filter",
            "traceable_filter",
            "and_filter",
            "or_filter",
            "header_filter",
            "response_flag_filter",
            "extension_filter",
        ],
        &[
            ("runtime_filter", UNEVALUATED_LOG_FILTER),
            ("grpc_status_filter", UNEVALUATED_LOG_FILTER),
            ("metadata_filter", UNEVALUATED_LOG_FILTER),
            ("log_type_filter", UNEVALUATED_LOG_FILTER),
        ],
    ),
    m("envoy.config.accesslog.v3.StatusCodeFilter", &["comparison"], &[]),
    m("envoy.config.accesslog.v3.DurationFilter", &["comparison"], &[]),
    m("envoy.config.accesslog.v3.ComparisonFilter", &["op", "value"], &[]),
    m(
        "envoy.config.core.v3.RuntimeUInt32",
        &["default_value", "runtime_key"],
        &[],
    ),
    m("envoy.config.accesslog.v3.NotHealthCheckFilter", &[], &[]),
    m("envoy.config.accesslog.v3.TraceableFilter", &[], &[]),
    m("envoy.config.accesslog.v3.AndFilter", &["filters"], &[]),
    m("envoy.config.accesslog.v3.OrFilter", &["filters"], &[]),
    m("envoy.config.accesslog.v3.HeaderFilter", &["header"], &[]),
    m("envoy.config.accesslog.v3.ResponseFlagFilter", &["flags"], &[]),
    m("envoy.config.accesslog.v3.ExtensionFilter", &["name", "typed_config"], &[]),
    m(
        "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
        &["expression"],
        &[],
    ),
    m("envoy.extensions.formatter.req_without_query.v3.ReqWithoutQuery", &[], &[]),
    m("envoy.extensions.formatter.cel.v3.Cel", &[], &[]),
    m("envoy.extensions.formatter.metadata.v3.Metadata", &[], &[]),
    // The gRPC access log service (go-control-plane's test resources,
    // Istio's ALS): not implemented. A logger changes no traffic, so its
    // config is accepted with a warning and nothing is sent.
    m(
        "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
        &[],
        &[
            ("common_config", NO_ALS),
            ("additional_request_headers_to_log", NO_ALS),
            ("additional_response_headers_to_log", NO_ALS),
            ("additional_response_trailers_to_log", NO_ALS),
        ],
    ),
    m(
        "envoy.extensions.access_loggers.grpc.v3.TcpGrpcAccessLogConfig",
        &[],
        &[("common_config", NO_ALS)],
    ),
    m(
        "envoy.extensions.access_loggers.open_telemetry.v3.OpenTelemetryAccessLogConfig",
        &[
            "common_config",
            "grpc_service",
            "log_name",
            "disable_builtin_labels",
            "resource_attributes",
            "body",
            "attributes",
            "buffer_flush_interval",
            "buffer_size_bytes",
            "formatters",
        ],
        &[],
    ),
    // As the OpenTelemetry logger reads it (the gRPC ALS warns above, before
    // descending).
    m(
        "envoy.extensions.access_loggers.grpc.v3.CommonGrpcAccessLogConfig",
        &[
            "log_name",
            "grpc_service",
            "transport_api_version",
            "buffer_flush_interval",
            "buffer_size_bytes",
        ],
        &[],
    ),
    m(
        "opentelemetry.proto.common.v1.AnyValue",
        &[
            "string_value",
            "bool_value",
            "int_value",
            "double_value",
            "array_value",
            "kvlist_value",
            "bytes_value",
        ],
        &[],
    ),
    m("opentelemetry.proto.common.v1.ArrayValue", &["values"], &[]),
    m("opentelemetry.proto.common.v1.KeyValueList", &["values"], &[]),
    m("opentelemetry.proto.common.v1.KeyValue", &["key", "value"], &[]),
    m(
        "envoy.extensions.access_loggers.file.v3.FileAccessLog",
        &["path", "format", "log_format", "json_format"],
        &[],
    ),
    m("envoy.extensions.access_loggers.stream.v3.StdoutAccessLog", &["log_format"], &[]),
    m("envoy.extensions.access_loggers.stream.v3.StderrAccessLog", &["log_format"], &[]),
    m(
        "envoy.config.core.v3.SubstitutionFormatString",
        // content_type: a direct response's `body_format` sends it; a log
        // has no use for it.
        &["text_format", "text_format_source", "json_format", "formatters", "content_type"],
        &[],
    ),
    m(
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.WeightedCluster",
        &["clusters"],
        &[],
    ),
    m(
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.WeightedCluster.ClusterWeight",
        &["name", "weight"],
        &[],
    ),
    m(
        "envoy.config.listener.v3.ListenerFilter",
        &["name", "typed_config", "filter_disabled"],
        &[],
    ),
    m(
        "envoy.config.listener.v3.ListenerFilterChainMatchPredicate",
        &["or_match", "and_match", "not_match", "any_match", "destination_port_range"],
        &[],
    ),
    m(
        "envoy.config.listener.v3.ListenerFilterChainMatchPredicate.MatchSet",
        &["rules"],
        &[],
    ),
    m("envoy.type.v3.Int32Range", &["start", "end"], &[]),
    m(
        "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
        &[],
        &[
            ("enable_ja3_fingerprinting", "fingerprints only feed logs"),
            ("enable_ja4_fingerprinting", "fingerprints only feed logs"),
            ("initial_read_buffer_size", "a read-size hint; Legate peeks up to the ClientHello limit"),
        ],
    ),
    m("envoy.extensions.filters.listener.http_inspector.v3.HttpInspector", &[], &[]),
    m("envoy.extensions.filters.listener.original_dst.v3.OriginalDst", &[], &[]),
    // UDP listeners and their proxy.
    m("envoy.config.listener.v3.UdpListenerConfig", &["downstream_socket_config"], &[]),
    m(
        "envoy.config.core.v3.SocketOption",
        &["level", "name", "int_value", "buf_value", "state", "type", "ip_version"],
        &[("description", "only informational")],
    ),
    m("envoy.config.core.v3.SocketOption.SocketType", &["stream", "datagram"], &[]),
    m("envoy.config.core.v3.SocketOption.SocketType.Stream", &[], &[]),
    m("envoy.config.core.v3.SocketOption.SocketType.Datagram", &[], &[]),
    m("envoy.config.core.v3.UdpSocketConfig", &["max_rx_datagram_size", "prefer_gro"], &[]),
    m(
        "envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig",
        &[
            "stat_prefix",
            "cluster",
            "matcher",
            "idle_timeout",
            "hash_policies",
            "use_per_packet_load_balancing",
            "upstream_socket_config",
            "access_log",
        ],
        &[],
    ),
    m(
        "envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig.HashPolicy",
        &["source_ip", "key"],
        &[],
    ),
    m("envoy.extensions.filters.udp.udp_proxy.v3.Route", &["cluster"], &[]),
    m(
        "envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol",
        &["allow_requests_without_proxy_protocol", "disallowed_versions", "stat_prefix"],
        &[],
    ),
    m(
        "envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit",
        &["stat_prefix", "token_bucket"],
        &[],
    ),
    m("envoy.type.v3.HashPolicy", &["source_ip"], &[]),
    m("envoy.type.v3.HashPolicy.SourceIp", &[], &[]),
    m(
        "envoy.type.v3.TokenBucket",
        &["max_tokens", "tokens_per_fill", "fill_interval"],
        &[],
    ),
    // RBAC (network filter).
    m(
        "envoy.extensions.filters.network.rbac.v3.RBAC",
        &["stat_prefix", "rules", "enforcement_type", "matcher"],
        &[
            ("shadow_rules", "shadow rules only emit stats"),
            ("shadow_matcher", "shadow rules only emit stats"),
            ("shadow_rules_stat_prefix", "shadow rules only emit stats"),
        ],
    ),
    m("envoy.config.rbac.v3.RBAC", &["action", "policies"], &[]),
    m("envoy.config.rbac.v3.Policy", &["permissions", "principals"], &[]),
    m(
        "envoy.config.rbac.v3.Permission",
        &[
            "and_rules",
            "or_rules",
            "any",
            "destination_ip",
            "destination_port",
            "destination_port_range",
            "not_rule",
            "requested_server_name",
            "header",
            "url_path",
        ],
        &[],
    ),
    m("envoy.config.rbac.v3.Permission.Set", &["rules"], &[]),
    m(
        "envoy.config.rbac.v3.Principal",
        &[
            "and_ids",
            "or_ids",
            "any",
            "authenticated",
            "source_ip",
            "direct_remote_ip",
            "remote_ip",
            "not_id",
            "header",
            "url_path",
        ],
        &[],
    ),
    m("envoy.config.rbac.v3.Principal.Set", &["ids"], &[]),
    m("envoy.config.rbac.v3.Principal.Authenticated", &["principal_name"], &[]),
    // TLS.
    m("envoy.config.core.v3.TransportSocket", &["name", "typed_config"], &[]),
    m("envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer", &[], &[]),
    m(
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        &[
            "common_tls_context",
            "require_client_certificate",
            "require_sni",
            "disable_stateless_session_resumption",
            "disable_stateful_session_resumption",
            "prefer_client_ciphers",
        ],
        &[],
    ),
    m(
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        &["common_tls_context", "sni", "auto_host_sni", "auto_sni_san_validation"],
        &[("max_session_keys", "only sizes the session resumption cache")],
    ),
    m(
        "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext",
        &[
            "tls_params",
            "tls_certificates",
            "tls_certificate_sds_secret_configs",
            "validation_context",
            "validation_context_sds_secret_config",
            "combined_validation_context",
            "alpn_protocols",
        ],
        &[],
    ),
    m(
        "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext.CombinedCertificateValidationContext",
        &["default_validation_context", "validation_context_sds_secret_config"],
        &[],
    ),
    m(
        "envoy.extensions.transport_sockets.tls.v3.TlsParameters",
        &[
            "tls_minimum_protocol_version",
            "tls_maximum_protocol_version",
            "cipher_suites",
            "ecdh_curves",
            "signature_algorithms",
        ],
        &[],
    ),
    m(
        "envoy.extensions.transport_sockets.tls.v3.TlsCertificate",
        &["certificate_chain", "private_key"],
        &[],
    ),
    m(
        "envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext",
        &[
            "trusted_ca",
            "match_typed_subject_alt_names",
            "verify_certificate_hash",
            "verify_certificate_spki",
            "allow_expired_certificate",
            "trust_chain_verification",
            "crl",
            "only_verify_leaf_cert_crl",
        ],
        &[],
    ),
    m(
        "envoy.extensions.transport_sockets.tls.v3.SubjectAltNameMatcher",
        &["san_type", "matcher", "oid"],
        &[],
    ),
    m(
        "envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig",
        &["name", "sds_config"],
        &[],
    ),
    m(
        "envoy.extensions.transport_sockets.tls.v3.Secret",
        &["name", "tls_certificate", "validation_context", "generic_secret"],
        &[],
    ),
    m(
        "envoy.extensions.transport_sockets.tls.v3.GenericSecret",
        &["secret"],
        &[],
    ),
    // Clusters.
    m(
        "envoy.config.cluster.v3.Cluster",
        &["eds_cluster_config", 
            "name",
            "type",
            "connect_timeout",
            "lb_policy",
            "load_assignment",
            "dns_lookup_family",
            "dns_refresh_rate",
            "respect_dns_ttl",
            "typed_dns_resolver_config",
            "http2_protocol_options",
            "http_protocol_options",
            "typed_extension_protocol_options",
            "max_requests_per_connection",
            "ring_hash_lb_config",
            "maglev_lb_config",
            "least_request_lb_config",
            "transport_socket",
            "transport_socket_matches",
            "circuit_breakers",
            "common_lb_config",
            // Required with health checks on clusters whose hosts change
            // (config::cluster::health_check): hosts leave at once.
            "ignore_health_on_host_removal",
            "health_checks",
            "load_balancing_policy",
            "cluster_type",
            "upstream_connection_options",
            "outlier_detection",
            "original_dst_lb_config",
            "upstream_bind_config",
            // Istio's metadata exchange only (config::cluster).
            "filters",
            // Read by Istio's extensions (`filter_metadata.istio`); other
            // keys change nothing.
            "metadata",
        ],
        &[
            (
                "cleanup_interval",
                "how long an unused ORIGINAL_DST host is remembered: Legate forgets unused ones once 1 024 accumulate; where connections go does not change",
            ),
            ("alt_stat_name", "only changes stat names"),
            (
                "per_connection_buffer_limit_bytes",
                "an upstream flow-control watermark: it paces, never changes, what is sent; pingora's own backpressure applies",
            ),
            (
                "track_cluster_stats",
                "timeout budget, request/response size and per-endpoint stats are not recorded; stats change no traffic",
            ),
            (
                "preconnect_policy",
                "connections are opened when needed, not ahead: the same requests reach the same hosts",
            ),
        ],
    ),
    m("envoy.type.v3.Percent", &["value"], &[]),
    m(
        "envoy.config.route.v3.RouteAction.HashPolicy.Cookie",
        &["name", "ttl", "path", "attributes"],
        &[],
    ),
    m("envoy.config.route.v3.RouteAction.HashPolicy.CookieAttribute", &["name", "value"], &[]),
    m(
        "envoy.extensions.filters.network.http_connection_manager.v3.RequestIDExtension",
        &["typed_config"],
        &[],
    ),
    // The UUID extension is the default one; its options concern tracing.
    m(
        "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
        &["pack_trace_reason", "use_request_id_for_trace_sampling"],
        &[],
    ),
    // Tracing: the sampling decision and the context propagated upstream.
    // Spans are not exported, so what only shapes them is warned.
    m(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.Tracing",
        &[
            "client_sampling",
            "random_sampling",
            "overall_sampling",
            "provider",
            "spawn_upstream_span",
            "custom_tags",
            "max_path_tag_length",
        ],
        &[
            ("verbose", NO_SPANS),
            ("operation", NO_SPANS),
            ("upstream_operation", NO_SPANS),
        ],
    ),
    m("envoy.config.trace.v3.Tracing.Http", &["name", "typed_config"], &[]),
    m(
        "envoy.type.tracing.v3.CustomTag",
        &["tag", "literal", "environment", "request_header"],
        &[
            ("metadata", "metadata tags are left out of spans (span content only)"),
            ("value", "format tags are left out of spans (span content only)"),
        ],
    ),
    m("envoy.type.tracing.v3.CustomTag.Literal", &["value"], &[]),
    m(
        "envoy.type.tracing.v3.CustomTag.Environment",
        &["name", "default_value"],
        &[],
    ),
    m(
        "envoy.type.tracing.v3.CustomTag.Header",
        &["name", "default_value"],
        &[],
    ),
    m(
        "envoy.extensions.tracers.opentelemetry.resource_detectors.v3.StaticConfigResourceDetectorConfig",
        &["attributes"],
        &[],
    ),
    m(
        "envoy.extensions.tracers.opentelemetry.resource_detectors.v3.EnvironmentResourceDetectorConfig",
        &[],
        &[],
    ),
    m(
        "envoy.config.trace.v3.OpenTelemetryConfig",
        &[
            "sampler",
            "grpc_service",
            "service_name",
            "max_cache_size",
            "resource_detectors",
        ],
        &[],
    ),
    m(
        "envoy.extensions.tracers.opentelemetry.samplers.v3.AlwaysOnSamplerConfig",
        &[],
        &[],
    ),
    m(
        "envoy.extensions.tracers.opentelemetry.samplers.v3.ParentBasedSamplerConfig",
        &["wrapped_sampler"],
        &[],
    ),
    m(
        "envoy.extensions.tracers.opentelemetry.samplers.v3.TraceIdRatioBasedSamplerConfig",
        &["sampling_percentage"],
        &[],
    ),
    m(
        "envoy.config.trace.v3.ZipkinConfig",
        &[
            "trace_id_128bit",
            "shared_span_context",
            "split_spans_for_request",
            "trace_context_option",
            "collector_cluster",
            "collector_endpoint",
            "collector_endpoint_version",
            "collector_hostname",
        ],
        &[],
    ),
    // remote_config is refused: sampling rules from the agent change the
    // priority Envoy propagates, and Legate never talks to the agent.
    m(
        "envoy.config.trace.v3.DatadogConfig",
        &[],
        &[
            ("collector_cluster", NO_SPANS),
            ("service_name", NO_SPANS),
            ("collector_hostname", NO_SPANS),
        ],
    ),
    m(
        "envoy.config.route.v3.Tracing",
        &["client_sampling", "random_sampling", "overall_sampling"],
        &[
            ("custom_tags", NO_SPANS),
            ("operation", NO_SPANS),
            ("upstream_operation", NO_SPANS),
        ],
    ),
    m("envoy.config.route.v3.Decorator", &["operation", "propagate"], &[]),
    m(
        "envoy.config.route.v3.RouteAction.MaxStreamDuration",
        &["max_stream_duration", "grpc_timeout_header_max", "grpc_timeout_header_offset"],
        &[],
    ),
    m(
        "envoy.config.cluster.v3.Cluster.OriginalDstLbConfig",
        &["use_http_header", "http_header_name", "upstream_port_override"],
        &[],
    ),
    m(
        "envoy.config.core.v3.BindConfig",
        &["source_address", "extra_source_addresses"],
        &[],
    ),
    m("envoy.config.core.v3.ExtraSourceAddress", &["address"], &[]),
    m("envoy.config.listener.v3.AdditionalAddress", &["address"], &[]),
    m(
        "envoy.config.cluster.v3.OutlierDetection",
        // successful_active_health_check_uneject_host: no effect without
        // active health checks (rejected), as in Envoy.
        &[
            "consecutive_5xx",
            "interval",
            "base_ejection_time",
            "max_ejection_percent",
            "enforcing_consecutive_5xx",
            "enforcing_success_rate",
            "success_rate_minimum_hosts",
            "success_rate_request_volume",
            "success_rate_stdev_factor",
            "consecutive_gateway_failure",
            "enforcing_consecutive_gateway_failure",
            "split_external_local_origin_errors",
            "consecutive_local_origin_failure",
            "enforcing_consecutive_local_origin_failure",
            "enforcing_local_origin_success_rate",
            "failure_percentage_threshold",
            "enforcing_failure_percentage",
            "enforcing_failure_percentage_local_origin",
            "failure_percentage_minimum_hosts",
            "failure_percentage_request_volume",
            "max_ejection_time",
            "max_ejection_time_jitter",
            "successful_active_health_check_uneject_host",
            "always_eject_one_host",
        ],
        &[],
    ),
    m("envoy.config.cluster.v3.Filter", &["name", "typed_config"], &[]),
    m(
        "envoy.config.cluster.v3.UpstreamConnectionOptions",
        &["tcp_keepalive"],
        &[],
    ),
    m(
        "envoy.config.core.v3.TcpKeepalive",
        &["keepalive_probes", "keepalive_time", "keepalive_interval"],
        &[],
    ),
    m(
        "envoy.config.cluster.v3.CircuitBreakers",
        // per_host_thresholds: refused by the translation unless empty.
        &["thresholds", "per_host_thresholds"],
        &[],
    ),
    m(
        "envoy.config.cluster.v3.CircuitBreakers.Thresholds",
        // max_connections: tcp_proxy connections, and HTTP/1 upstream
        // requests (each holds a connection); HTTP/2 upstream connections
        // are pingora's, one per host while streams fit. max_connection_pools
        // is refused by the translation.
        &[
            "priority",
            "max_connections",
            "max_pending_requests",
            "max_requests",
            "max_retries",
            "retry_budget",
            "track_remaining",
            "max_connection_pools",
        ],
        &[],
    ),
    m(
        "envoy.config.cluster.v3.CircuitBreakers.Thresholds.RetryBudget",
        &["budget_percent", "min_retry_concurrency"],
        &[],
    ),
    m(
        "envoy.config.cluster.v3.Cluster.CommonLbConfig",
        // ignore_new_hosts_until_first_hc: no effect without active health
        // checks (rejected), as in Envoy.
        &[
            "healthy_panic_threshold",
            "locality_weighted_lb_config",
            "ignore_new_hosts_until_first_hc",
            "zone_aware_lb_config",
        ],
        // update_merge_window is rejected: Legate applies health and weight
        // changes at once, where Envoy would hold them back.
        &[],
    ),
    m(
        "envoy.config.cluster.v3.Cluster.CommonLbConfig.ZoneAwareLbConfig",
        &[],
        &[
            ("routing_enabled", NO_LOCAL_CLUSTER),
            ("min_cluster_size", NO_LOCAL_CLUSTER),
        ],
    ),
    m(
        "envoy.config.cluster.v3.Cluster.CommonLbConfig.LocalityWeightedLbConfig",
        &[],
        &[],
    ),
    m("envoy.config.cluster.v3.LoadBalancingPolicy", &["policies"], &[]),
    m(
        "envoy.config.cluster.v3.LoadBalancingPolicy.Policy",
        &["typed_extension_config"],
        &[],
    ),
    // Envoy 1.40 gives a host added to the cluster its full share at once
    // whatever slow_start_config says (the http tier's slow-start part
    // measures it, with and without active health checks): Legate does the
    // same, and says so.
    m(
        "envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin",
        &["locality_lb_config"],
        &[("slow_start_config", SLOW_START)],
    ),
    m(
        "envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest",
        &["choice_count", "active_request_bias", "locality_lb_config"],
        &[("slow_start_config", SLOW_START)],
    ),
    m(
        "envoy.extensions.load_balancing_policies.random.v3.Random",
        &["locality_lb_config"],
        &[],
    ),
    m(
        "envoy.extensions.load_balancing_policies.ring_hash.v3.RingHash",
        &["hash_function", "minimum_ring_size", "maximum_ring_size"],
        &[],
    ),
    m(
        "envoy.extensions.load_balancing_policies.maglev.v3.Maglev",
        &["table_size"],
        &[],
    ),
    m(
        "envoy.extensions.load_balancing_policies.common.v3.LocalityLbConfig",
        &["locality_weighted_lb_config", "zone_aware_lb_config"],
        &[],
    ),
    // fail_traffic_on_panic is refused: it applies with or without a local
    // cluster, and Legate does not implement it.
    m(
        "envoy.extensions.load_balancing_policies.common.v3.LocalityLbConfig.ZoneAwareLbConfig",
        &[],
        &[
            ("routing_enabled", NO_LOCAL_CLUSTER),
            ("min_cluster_size", NO_LOCAL_CLUSTER),
            ("force_local_zone", NO_LOCAL_CLUSTER),
            ("force_locality_direct_routing", NO_LOCAL_CLUSTER),
            ("locality_basis", NO_LOCAL_CLUSTER),
        ],
    ),
    m(
        "envoy.extensions.load_balancing_policies.common.v3.LocalityLbConfig.LocalityWeightedLbConfig",
        &[],
        &[],
    ),
    m(
        "envoy.config.cluster.v3.Cluster.CustomClusterType",
        &["name", "typed_config"],
        &[],
    ),
    m(
        "envoy.extensions.clusters.dns.v3.DnsCluster",
        &[
            "dns_refresh_rate",
            "dns_lookup_family",
            "all_addresses_in_single_endpoint",
            "dns_jitter",
            "respect_dns_ttl",
            "dns_min_refresh_rate",
            "typed_dns_resolver_config",
        ],
        &[],
    ),
    m(
        "envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
        &["resolvers", "use_resolvers_as_fallback"],
        &[],
    ),
    m(
        "envoy.config.cluster.v3.Cluster.LeastRequestLbConfig",
        &["choice_count", "active_request_bias"],
        &[],
    ),
    m(
        "envoy.config.core.v3.RuntimeDouble",
        &["default_value"],
        &[("runtime_key", "runtime overrides of the bias are not read")],
    ),
    m(
        "envoy.config.cluster.v3.Cluster.RingHashLbConfig",
        &["minimum_ring_size", "maximum_ring_size", "hash_function"],
        &[],
    ),
    m(
        "envoy.config.cluster.v3.Cluster.MaglevLbConfig",
        &["table_size"],
        &[],
    ),
    m(
        "envoy.config.endpoint.v3.ClusterLoadAssignment",
        &["cluster_name", "endpoints", "policy"],
        &[],
    ),
    m(
        "envoy.config.endpoint.v3.ClusterLoadAssignment.Policy",
        &["overprovisioning_factor"],
        &[],
    ),
    m(
        "envoy.config.endpoint.v3.LocalityLbEndpoints",
        &[
            "locality",
            "lb_endpoints",
            "load_balancing_weight",
            "priority",
        ],
        &[("metadata", "only informational")],
    ),
    m(
        "envoy.config.cluster.v3.Cluster.TransportSocketMatch",
        &["name", "match", "transport_socket"],
        &[],
    ),
    m(
        "envoy.config.endpoint.v3.LbEndpoint",
        // metadata: `envoy.lb` `hash_key` keys ring hash and Maglev;
        // `envoy.transport_socket_match` picks the transport socket; other
        // keys matter only to features Legate rejects (subsets).
        &[
            "endpoint",
            "health_status",
            "load_balancing_weight",
            "metadata",
        ],
        &[],
    ),
    m(
        "envoy.config.endpoint.v3.Endpoint",
        &["address", "hostname", "health_check_config"],
        &[],
    ),
    m(
        "envoy.config.endpoint.v3.Endpoint.HealthCheckConfig",
        &["port_value", "hostname"],
        &[],
    ),
    m(
        "envoy.config.core.v3.HealthCheck",
        &[
            "timeout",
            "interval",
            "initial_jitter",
            "interval_jitter",
            "interval_jitter_percent",
            "unhealthy_threshold",
            "healthy_threshold",
            "alt_port",
            "no_traffic_interval",
            "no_traffic_healthy_interval",
            "unhealthy_interval",
            "unhealthy_edge_interval",
            "healthy_edge_interval",
            "reuse_connection",
            "http_health_check",
            "tcp_health_check",
            "grpc_health_check",
        ],
        &[
            ("event_log_path", HC_EVENTS),
            ("event_logger", HC_EVENTS),
            ("event_service", HC_EVENTS),
            ("always_log_health_check_failures", HC_EVENTS),
            ("always_log_health_check_success", HC_EVENTS),
        ],
    ),
    m(
        "envoy.config.core.v3.HealthCheck.HttpHealthCheck",
        &[
            "host",
            "path",
            "send",
            "receive",
            "response_buffer_size",
            "request_headers_to_add",
            "request_headers_to_remove",
            "expected_statuses",
            "retriable_statuses",
            "codec_client_type",
            "method",
        ],
        &[],
    ),
    m(
        "envoy.config.core.v3.HealthCheck.GrpcHealthCheck",
        &["service_name", "authority", "initial_metadata"],
        &[],
    ),
    m(
        "envoy.config.core.v3.HealthCheck.TcpHealthCheck",
        &["send", "receive"],
        &[],
    ),
    m(
        "envoy.config.core.v3.HealthCheck.Payload",
        &["text", "binary"],
        &[],
    ),
    m(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        &[
            "explicit_http_config",
            "common_http_protocol_options",
            "auto_config",
            "use_downstream_protocol_config",
            "upstream_http_protocol_options",
            "hash_policy",
        ],
        &[],
    ),
    m(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.UseDownstreamHttpConfig",
        &["http_protocol_options", "http2_protocol_options"],
        &[],
    ),
    m(
        "envoy.config.core.v3.UpstreamHttpProtocolOptions",
        &["auto_sni", "auto_san_validation", "override_auto_sni_header"],
        &[],
    ),
    m(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.AutoHttpConfig",
        &["http_protocol_options", "http2_protocol_options"],
        &[],
    ),
    m(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.ExplicitHttpConfig",
        &["http_protocol_options", "http2_protocol_options"],
        &[],
    ),
];

/// Every entry: the table above and each HTTP filter module's own.
pub fn all() -> impl Iterator<Item = &'static MessageSupport> {
    REGISTRY
        .iter()
        .chain(crate::config::unified_matcher::REGISTRY)
        .chain(crate::cel::REGISTRY)
        .chain(crate::istio::exchange::REGISTRY)
        .chain(
            crate::http_filters::REGISTRIES
                .iter()
                .flat_map(|r| r.iter()),
        )
}

/// Finds a message's entry.
pub fn lookup(message: &str) -> Option<&'static MessageSupport> {
    all().find(|m| m.message == message)
}

/// A field that was accepted with a warning.
#[derive(Debug, Clone, PartialEq)]
pub struct Ignored {
    pub path: String,
    pub reason: &'static str,
}

/// Checks every set field of `msg`. Returns the fields accepted with a
/// warning, or the first unsupported field as an error naming its path.
pub fn validate(msg: &DynamicMessage) -> Result<Vec<Ignored>, crate::config::ConfigError> {
    let mut ignored: Vec<Ignored> = Vec::new();
    walk::walk(msg, "", &mut |v| {
        if v.message.starts_with("google.protobuf.") {
            return Ok(());
        }
        // A field accepted with a warning is ignored whole, with its subtree.
        if ignored.iter().any(|i| {
            v.path
                .strip_prefix(i.path.as_str())
                .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        }) {
            return Ok(());
        }
        let name = v.field.name();
        let entry = lookup(v.message)
            .ok_or_else(|| format!("{}: {} is not supported by Legate", v.path, v.message))?;
        if entry.supported.contains(&name) {
            return Ok(());
        }
        if let Some((_, reason)) = entry.warn.iter().find(|(f, _)| *f == name) {
            ignored.push(Ignored {
                path: v.path.to_string(),
                reason,
            });
            return Ok(());
        }
        Err(format!(
            "{}: field '{}' of {} is not supported by Legate",
            v.path, name, v.message
        ))
    })
    .map_err(|e| {
        let (path, message) = e.split_once(": ").unwrap_or(("", &e));
        crate::config::ConfigError::new(path, message)
    })?;
    Ok(ignored)
}

/// The per-field support table of `docs/compatibility.md`, generated from
/// [`REGISTRY`] and the descriptor pool (so every field of every listed
/// message appears, supported or not).
pub fn compatibility_markdown() -> String {
    let pool = legate_proto::pool();
    let mut out = String::from(
        "# Compatibility\n\nGenerated from `proxy/src/registry.rs` by `UPDATE_DOCS=1 cargo test -p legate compatibility_doc`; \
         do not edit by hand.\n\n\
         - **supported**: translated with Envoy's semantics.\n\
         - **accepted (warning)**: cannot change traffic; accepted with a log line and the `legate.config.fields_ignored` counter.\n\
         - **rejected**: any other field; config setting it fails validation (exit 1 in `--mode validate`) naming the field.\n\
         - A message that is not listed is rejected as a whole.\n",
    );
    let mut entries: Vec<&MessageSupport> = all().collect();
    entries.sort_by_key(|e| e.message);
    for e in entries {
        out.push_str(&format!(
            "\n## `{}`\n\n| field | status |\n|---|---|\n",
            e.message
        ));
        let Some(d) = pool.get_message_by_name(e.message) else {
            continue;
        };
        for f in d.fields() {
            let name = f.name();
            let status = if e.supported.contains(&name) {
                "supported".to_string()
            } else if let Some((_, why)) = e.warn.iter().find(|(n, _)| *n == name) {
                format!("accepted (warning): {why}")
            } else {
                "rejected".to_string()
            };
            out.push_str(&format!("| `{name}` | {status} |\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compatibility_doc_is_current() {
        // The file's field tables come from here; what follows the marker is
        // written by the conformance run.
        const MARK: &str = "<!-- conformance results -->";
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/compatibility.md");
        let want = compatibility_markdown();
        let have = std::fs::read_to_string(path).unwrap_or_default();
        let (head, tail) = match have.find(MARK) {
            Some(i) => (&have[..i], &have[i..]),
            None => (have.as_str(), ""),
        };
        if std::env::var_os("UPDATE_DOCS").is_some() {
            std::fs::write(path, format!("{want}{tail}")).unwrap();
            return;
        }
        assert!(head == want, "docs/compatibility.md is stale: run UPDATE_DOCS=1 cargo test -p legate compatibility_doc");
    }

    #[test]
    fn every_registry_entry_names_a_real_message_and_fields() {
        let pool = legate_proto::pool();
        let mut seen = std::collections::HashSet::new();
        for e in all() {
            assert!(seen.insert(e.message), "{} is listed twice", e.message);
            let d = pool
                .get_message_by_name(e.message)
                .unwrap_or_else(|| panic!("{} is not a known message", e.message));
            for f in e.supported.iter().chain(e.warn.iter().map(|(f, _)| f)) {
                assert!(
                    d.get_field_by_name(f).is_some(),
                    "{}.{} does not exist",
                    e.message,
                    f
                );
            }
        }
    }

    fn dynamic(yaml: &str) -> DynamicMessage {
        let v = legate_proto::json::parse_yaml(yaml).unwrap();
        legate_proto::json::to_dynamic(v, "envoy.config.bootstrap.v3.Bootstrap", true).unwrap()
    }

    #[test]
    fn unsupported_field_is_named() {
        let err = validate(&dynamic(
            "static_resources: {clusters: [{name: a, lrs_server: {self: {}}}]}",
        ))
        .unwrap_err();
        assert_eq!(err.path, "static_resources.clusters[0].lrs_server");
    }

    /// Timing fields that move traffic (when a health change takes
    /// effect) are refused, not warned about.
    #[test]
    fn traffic_timing_fields_are_refused_naming_them() {
        {
            let (field, path) = (
                "common_lb_config: {update_merge_window: 2s}",
                "static_resources.clusters[0].common_lb_config.update_merge_window",
            );
            let err = validate(&dynamic(&format!(
                "static_resources: {{clusters: [{{name: a, {field}}}]}}"
            )))
            .unwrap_err();
            assert_eq!(err.path, path);
        }
    }

    #[test]
    fn fields_inside_any_are_checked() {
        let err = validate(&dynamic(
            r#"static_resources: {listeners: [{name: l, filter_chains: [{filters: [{name: h, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: s, add_user_agent: true}}]}]}]}"#,
        ))
        .unwrap_err();
        assert_eq!(
            err.path,
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.add_user_agent"
        );
    }

    #[test]
    fn warned_fields_are_reported() {
        let ignored = validate(&dynamic("stats_flush_interval: 5s")).unwrap();
        assert_eq!(ignored.len(), 1);
        assert_eq!(ignored[0].path, "stats_flush_interval");
    }
}
