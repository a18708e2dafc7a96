//! A cluster's `health_checks`, translated: active HTTP and TCP health
//! checking with Envoy's intervals, thresholds and jitter (the runtime is
//! `crate::health_check`).

use super::{join, ConfigError, Result, Wrapped};
use legate_proto::envoy_types::pb::envoy::config::core::v3 as core;
use std::time::Duration;

const DEFAULT_NO_TRAFFIC: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct HealthCheckConfig {
    pub timeout: Duration,
    pub interval: Duration,
    pub initial_jitter: Duration,
    pub interval_jitter: Duration,
    pub interval_jitter_percent: u32,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    /// Checks go to this port instead of the endpoint's.
    pub alt_port: Option<u16>,
    pub no_traffic_interval: Duration,
    /// None: `no_traffic_interval`.
    pub no_traffic_healthy_interval: Option<Duration>,
    pub unhealthy_interval: Duration,
    pub unhealthy_edge_interval: Duration,
    pub healthy_edge_interval: Duration,
    pub check: Check,
}

#[derive(Debug, Clone)]
pub enum Check {
    Http(HttpCheck),
    Tcp {
        send: Vec<u8>,
        /// Blocks that must all appear in the response, in order.
        receive: Vec<Vec<u8>>,
    },
    /// `grpc.health.v1.Health/Check` over HTTP/2: SERVING passes.
    Grpc {
        service_name: String,
        /// The call's `:authority`; empty: the target's host.
        authority: String,
        metadata: Vec<(http::HeaderName, http::HeaderValue)>,
    },
}

#[derive(Debug, Clone)]
pub struct HttpCheck {
    /// The `Host`; empty: the endpoint's health check hostname, else the
    /// cluster's name.
    pub host: String,
    pub path: String,
    pub method: http::Method,
    pub http2: bool,
    pub headers_to_add: Vec<(http::HeaderName, http::HeaderValue, bool)>,
    pub headers_to_remove: Vec<http::HeaderName>,
    /// [start, end) ranges; default [200, 201).
    pub expected: Vec<(u32, u32)>,
    pub retriable: Vec<(u32, u32)>,
    pub send: Option<Vec<u8>>,
    pub receive: Vec<Vec<u8>>,
    pub response_buffer: usize,
}

impl HttpCheck {
    pub fn expected(&self, status: u16) -> bool {
        in_ranges(&self.expected, status)
    }

    pub fn retriable(&self, status: u16) -> bool {
        in_ranges(&self.retriable, status)
    }
}

fn in_ranges(r: &[(u32, u32)], status: u16) -> bool {
    let s = u32::from(status);
    r.iter().any(|(a, b)| *a <= s && s < *b)
}

fn payload(p: &core::health_check::Payload, path: &str) -> Result<Vec<u8>> {
    use core::health_check::payload::Payload as P;
    match &p.payload {
        Some(P::Text(t)) => hex(t).ok_or_else(|| ConfigError::new(join(path, "text"), "not hex")),
        Some(P::Binary(b)) => Ok(b.clone()),
        None => Ok(Vec::new()),
    }
}

/// Hex text (`text` payloads) as bytes.
fn hex(t: &str) -> Option<Vec<u8>> {
    if !t.len().is_multiple_of(2) {
        return None;
    }
    (0..t.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(t.get(i..i + 2)?, 16).ok())
        .collect()
}

fn ranges(
    r: &[legate_proto::envoy_types::pb::envoy::r#type::v3::Int64Range],
    path: &str,
) -> Result<Vec<(u32, u32)>> {
    r.iter()
        .enumerate()
        .map(|(i, r)| {
            if r.start < 100 || r.end > 600 || r.start >= r.end {
                return Err(ConfigError::new(
                    format!("{path}[{i}]"),
                    "a status range within [100, 600)",
                ));
            }
            Ok((r.start as u32, r.end as u32))
        })
        .collect()
}

impl HealthCheckConfig {
    pub fn from_proto(h: &core::HealthCheck, path: &str) -> Result<Self> {
        let dur = |d: &Option<legate_proto::envoy_types::pb::google::protobuf::Duration>,
                   f: &str| {
            d.as_ref()
                .map(|d| super::duration(d, &join(path, f)))
                .transpose()
        };
        let timeout = dur(&h.timeout, "timeout")?
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                ConfigError::new(join(path, "timeout"), "a timeout above 0 is required")
            })?;
        let interval = dur(&h.interval, "interval")?
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                ConfigError::new(join(path, "interval"), "an interval above 0 is required")
            })?;
        let threshold = |v: Option<u32>, f: &str| {
            v.ok_or_else(|| ConfigError::new(join(path, f), format!("{f} is required")))
        };
        let unhealthy_interval =
            dur(&h.unhealthy_interval, "unhealthy_interval")?.unwrap_or(interval);
        // Legate opens a connection per check, which is what `false` asks.
        // Envoy's default keeps one open, and a host refusing new
        // connections while serving old ones passes there and fails here:
        // asking for it explicitly is refused rather than ignored.
        if h.reuse_connection.val() == Some(true) {
            return Err(ConfigError::new(
                join(path, "reuse_connection"),
                "Legate opens a new connection for every check; only false is supported",
            ));
        }
        if h.tls_options.is_some() {
            return Err(ConfigError::new(
                join(path, "tls_options"),
                "not supported by Legate yet",
            ));
        }
        if h.transport_socket_match_criteria.is_some() {
            return Err(ConfigError::new(
                join(path, "transport_socket_match_criteria"),
                "not supported by Legate yet",
            ));
        }
        Ok(HealthCheckConfig {
            timeout,
            interval,
            initial_jitter: dur(&h.initial_jitter, "initial_jitter")?.unwrap_or_default(),
            interval_jitter: dur(&h.interval_jitter, "interval_jitter")?.unwrap_or_default(),
            interval_jitter_percent: h.interval_jitter_percent,
            unhealthy_threshold: threshold(h.unhealthy_threshold.val(), "unhealthy_threshold")?
                .max(1),
            healthy_threshold: threshold(h.healthy_threshold.val(), "healthy_threshold")?.max(1),
            alt_port: h.alt_port.val().map(|p| p as u16),
            no_traffic_interval: dur(&h.no_traffic_interval, "no_traffic_interval")?
                .unwrap_or(DEFAULT_NO_TRAFFIC),
            no_traffic_healthy_interval: dur(
                &h.no_traffic_healthy_interval,
                "no_traffic_healthy_interval",
            )?,
            unhealthy_interval,
            unhealthy_edge_interval: dur(&h.unhealthy_edge_interval, "unhealthy_edge_interval")?
                .unwrap_or(unhealthy_interval),
            healthy_edge_interval: dur(&h.healthy_edge_interval, "healthy_edge_interval")?
                .unwrap_or(interval),
            check: Check::from_proto(h, path)?,
        })
    }
}

impl Check {
    fn from_proto(h: &core::HealthCheck, path: &str) -> Result<Check> {
        use core::health_check::HealthChecker as K;
        match &h.health_checker {
            Some(K::HttpHealthCheck(c)) => Ok(Check::Http(http_check(
                c,
                &join(path, "http_health_check"),
            )?)),
            Some(K::TcpHealthCheck(t)) => {
                let p = join(path, "tcp_health_check");
                if t.proxy_protocol_config.is_some() {
                    return Err(ConfigError::new(
                        join(&p, "proxy_protocol_config"),
                        "not supported by Legate yet",
                    ));
                }
                Ok(Check::Tcp {
                    send: t
                        .send
                        .as_ref()
                        .map(|s| payload(s, &join(&p, "send")))
                        .transpose()?
                        .unwrap_or_default(),
                    receive: t
                        .receive
                        .iter()
                        .enumerate()
                        .map(|(i, r)| payload(r, &format!("{p}.receive[{i}]")))
                        .collect::<Result<_>>()?,
                })
            }
            Some(K::GrpcHealthCheck(g)) => {
                let p = join(path, "grpc_health_check");
                let metadata = g
                    .initial_metadata
                    .iter()
                    .enumerate()
                    .map(|(i, h)| {
                        let hp = format!("{p}.initial_metadata[{i}]");
                        let hv = h.header.as_ref().ok_or_else(|| {
                            ConfigError::new(join(&hp, "header"), "header is required")
                        })?;
                        let name = crate::headers::header_name(&hv.key, &join(&hp, "header.key"))?;
                        let value = http::HeaderValue::from_str(&hv.value).map_err(|_| {
                            ConfigError::new(join(&hp, "header.value"), "not a valid header value")
                        })?;
                        Ok((name, value))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Check::Grpc {
                    service_name: g.service_name.clone(),
                    authority: g.authority.clone(),
                    metadata,
                })
            }
            Some(K::CustomHealthCheck(_)) => Err(ConfigError::new(
                join(path, "custom_health_check"),
                "not supported by Legate",
            )),
            None => Err(ConfigError::new(path, "a health checker is required")),
        }
    }
}

fn http_check(c: &core::health_check::HttpHealthCheck, p: &str) -> Result<HttpCheck> {
    if c.path.is_empty() {
        return Err(ConfigError::new(join(p, "path"), "path is required"));
    }
    if c.service_name_matcher.is_some() {
        return Err(ConfigError::new(
            join(p, "service_name_matcher"),
            "not supported by Legate yet",
        ));
    }
    use core::RequestMethod as M;
    let method = match M::try_from(c.method).unwrap_or(M::MethodUnspecified) {
        M::MethodUnspecified | M::Get => http::Method::GET,
        M::Head => http::Method::HEAD,
        M::Post => http::Method::POST,
        M::Put => http::Method::PUT,
        M::Delete => http::Method::DELETE,
        M::Options => http::Method::OPTIONS,
        M::Trace => http::Method::TRACE,
        M::Patch => http::Method::PATCH,
        M::Connect => {
            return Err(ConfigError::new(
                join(p, "method"),
                "CONNECT is not allowed",
            ))
        }
    };
    use legate_proto::envoy_types::pb::envoy::r#type::v3::CodecClientType as C;
    let http2 = match C::try_from(c.codec_client_type).unwrap_or(C::Http1) {
        C::Http1 => false,
        C::Http2 => true,
        C::Http3 => {
            return Err(ConfigError::new(
                join(p, "codec_client_type"),
                "HTTP/3 is not supported",
            ))
        }
    };
    let headers_to_add = c
        .request_headers_to_add
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let hp = format!("{p}.request_headers_to_add[{i}]");
            let hv = h
                .header
                .as_ref()
                .ok_or_else(|| ConfigError::new(join(&hp, "header"), "header is required"))?;
            let name = crate::headers::header_name(&hv.key, &join(&hp, "header.key"))?;
            let value = http::HeaderValue::from_str(&hv.value).map_err(|_| {
                ConfigError::new(join(&hp, "header.value"), "not a valid header value")
            })?;
            // The default action appends.
            let append = h.append.val().unwrap_or(true)
                && h.append_action
                    == core::header_value_option::HeaderAppendAction::AppendIfExistsOrAdd as i32;
            Ok((name, value, append))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(HttpCheck {
        host: c.host.clone(),
        path: c.path.clone(),
        method,
        http2,
        headers_to_add,
        headers_to_remove: c
            .request_headers_to_remove
            .iter()
            .enumerate()
            .map(|(i, h)| {
                crate::headers::header_name(h, &format!("{p}.request_headers_to_remove[{i}]"))
            })
            .collect::<Result<_>>()?,
        expected: if c.expected_statuses.is_empty() {
            vec![(200, 201)]
        } else {
            ranges(&c.expected_statuses, &join(p, "expected_statuses"))?
        },
        retriable: ranges(&c.retriable_statuses, &join(p, "retriable_statuses"))?,
        send: c
            .send
            .as_ref()
            .map(|s| payload(s, &join(p, "send")))
            .transpose()?,
        receive: c
            .receive
            .iter()
            .enumerate()
            .map(|(i, r)| payload(r, &format!("{p}.receive[{i}]")))
            .collect::<Result<_>>()?,
        response_buffer: c.response_buffer_size.val().map_or(1024, |v| v as usize),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(yaml: &str) -> Result<HealthCheckConfig> {
        let v = legate_proto::json::parse_yaml(yaml).unwrap();
        let h: core::HealthCheck =
            legate_proto::json::to_message(v, "envoy.config.core.v3.HealthCheck", true).unwrap();
        HealthCheckConfig::from_proto(&h, "hc")
    }

    #[test]
    fn only_a_connection_per_check_is_offered() {
        let base = "{timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: {}";
        assert!(check(&format!("{base}}}")).is_ok());
        assert!(check(&format!("{base}, reuse_connection: false}}")).is_ok());
        let e = check(&format!("{base}, reuse_connection: true}}")).unwrap_err();
        assert_eq!(e.path, "hc.reuse_connection");
    }
}
