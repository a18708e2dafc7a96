//! `envoy.filters.http.compressor`: compresses responses with gzip,
//! brotli or zstd when the client accepts it, as Envoy's does.
//!
//! A response is compressed when the filter is enabled (its runtime flag,
//! or a route's `CompressorPerRoute`), it has a body, its length is at
//! least `min_content_length` (30; an unstated length passes), it is no
//! upgrade, its type is in `content_type` (Envoy's list by default;
//! parameters ignored; no type passes), `cache-control` has no
//! `no-transform`, no strong `etag` when `disable_on_etag_header`, no
//! `content-encoding`, its status is not an `uncompressible_response_codes`
//! one, its `transfer-encoding` names no coding, and the request's
//! `accept-encoding` chose this filter's encoding among the chain's
//! compressors ([`negotiate`]). Then `content-encoding` is set, the length
//! removed (chunked on HTTP/1), a strong `etag` removed (or weakened), and
//! the body compressed chunk by chunk. `Vary: Accept-Encoding` goes on
//! every compressible response, compressed or not.
//!
//! Request compression (`request_direction_config`), the status header
//! and `content_type_matcher` are refused by name.

mod library;
mod negotiate;

use super::{Factory, Flow, HttpFilter, PerRoute, RequestInfo, ResponseInfo, State};
use crate::config::{join, ConfigError, Result};
use crate::registry::MessageSupport;
use bytes::Bytes;
use legate_proto::envoy_types::pb::envoy::config::core::v3 as core;
use legate_proto::envoy_types::pb::envoy::extensions::filters::http::compressor::v3 as pb;
use legate_proto::envoy_types::pb::google::protobuf::Any;
use library::{Encoder, Library};
use negotiate::{Candidate, Decision};
use pingora_http::ResponseHeader;
use std::sync::{Arc, Mutex};

const TYPE: &str = "envoy.extensions.filters.http.compressor.v3.Compressor";
const PER_ROUTE_TYPE: &str = "envoy.extensions.filters.http.compressor.v3.CompressorPerRoute";

pub static FACTORY: Factory = Factory {
    type_name: TYPE,
    build,
    per_route: &[(PER_ROUTE_TYPE, per_route)],
};

/// The settings that change the compressed bytes, not what they decode to.
const BYTES_ONLY: &str = "changes the compressed bytes (and memory used), not what they decode to; Legate's encoder keeps its own";

pub static REGISTRY: &[MessageSupport] = &[
    MessageSupport {
        message: TYPE,
        supported: &[
            "content_length",
            "content_type",
            "disable_on_etag_header",
            "remove_accept_encoding_header",
            "runtime_enabled",
            "compressor_library",
            "response_direction_config",
            "choose_first",
        ],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.compressor.v3.Compressor.CommonDirectionConfig",
        supported: &["enabled", "min_content_length", "content_type"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.compressor.v3.Compressor.ResponseDirectionConfig",
        supported: &[
            "common_config",
            "disable_on_etag_header",
            "weaken_etag_on_compress",
            "remove_accept_encoding_header",
            "uncompressible_response_codes",
        ],
        warn: &[],
    },
    MessageSupport {
        message: PER_ROUTE_TYPE,
        supported: &["disabled", "overrides"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.compressor.v3.CompressorOverrides",
        supported: &["response_direction_config"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.compressor.v3.ResponseDirectionOverrides",
        supported: &["remove_accept_encoding_header"],
        warn: &[],
    },
    MessageSupport {
        message: library::GZIP,
        supported: &["compression_level"],
        warn: &[
            ("memory_level", BYTES_ONLY),
            ("compression_strategy", BYTES_ONLY),
            ("window_bits", BYTES_ONLY),
            ("chunk_size", BYTES_ONLY),
        ],
    },
    MessageSupport {
        message: library::BROTLI,
        supported: &[
            "quality",
            "encoder_mode",
            "window_bits",
            "input_block_bits",
            "disable_literal_context_modeling",
        ],
        warn: &[("chunk_size", BYTES_ONLY)],
    },
    MessageSupport {
        message: library::ZSTD,
        supported: &["compression_level", "enable_checksum"],
        warn: &[("strategy", BYTES_ONLY), ("chunk_size", BYTES_ONLY)],
    },
    MessageSupport {
        message: "envoy.config.core.v3.RuntimeFeatureFlag",
        supported: &["default_value", "runtime_key"],
        warn: &[],
    },
];

/// Envoy's default compressible types.
const DEFAULT_TYPES: &[&str] = &[
    "text/html",
    "text/plain",
    "text/css",
    "application/javascript",
    "application/x-javascript",
    "text/javascript",
    "text/x-javascript",
    "text/ecmascript",
    "text/js",
    "text/jscript",
    "text/x-js",
    "application/ecmascript",
    "application/x-json",
    "application/xml",
    "application/json",
    "image/svg+xml",
    "text/xml",
    "application/xhtml+xml",
    "application/grpc-web",
    "application/grpc-web+proto",
];

/// `enabled` / `runtime_enabled`: a default a runtime key may override.
#[derive(Debug, Clone)]
struct Flag {
    default: bool,
    key: String,
}

impl Flag {
    fn from_proto(f: Option<&core::RuntimeFeatureFlag>) -> Flag {
        Flag {
            default: f
                .and_then(|f| f.default_value.as_ref())
                .is_none_or(|b| b.value),
            key: f.map(|f| f.runtime_key.clone()).unwrap_or_default(),
        }
    }

    fn on(&self, runtime: &crate::runtime::Runtime) -> bool {
        if self.key.is_empty() {
            return self.default;
        }
        match runtime.get(&self.key) {
            Some(serde_json::Value::Bool(b)) => *b,
            Some(serde_json::Value::Number(n)) => n.as_f64().is_some_and(|n| n != 0.0),
            _ => self.default,
        }
    }
}

/// Envoy's counters, all made when the filter is built.
#[derive(Debug)]
struct Stats {
    compressed: metrics::Counter,
    not_compressed: metrics::Counter,
    total_uncompressed_bytes: metrics::Counter,
    total_compressed_bytes: metrics::Counter,
    content_length_too_small: metrics::Counter,
    no_accept_header: metrics::Counter,
    header_identity: metrics::Counter,
    header_compressor_used: metrics::Counter,
    header_compressor_overshadowed: metrics::Counter,
    header_wildcard: metrics::Counter,
    header_not_valid: metrics::Counter,
    not_compressed_etag: metrics::Counter,
    /// `request.not_compressed`: every request (request bodies are never
    /// compressed here), as Envoy counts them.
    request_not_compressed: metrics::Counter,
}

impl Stats {
    /// `prefix`: `http.<hcm>.compressor.<library name>.<library>.`;
    /// `response`: the direction segment of the response's counters.
    fn new(prefix: &str, response: &str) -> Stats {
        let c = |n: &str| crate::stats::counter(format!("{prefix}{n}"));
        let r = |n: &str| c(&format!("{response}{n}"));
        for n in [
            "compressed",
            "total_uncompressed_bytes",
            "total_compressed_bytes",
            "content_length_too_small",
        ] {
            let _ = c(&format!("request.{n}"));
        }
        Stats {
            compressed: r("compressed"),
            not_compressed: r("not_compressed"),
            total_uncompressed_bytes: r("total_uncompressed_bytes"),
            total_compressed_bytes: r("total_compressed_bytes"),
            content_length_too_small: r("content_length_too_small"),
            no_accept_header: c("no_accept_header"),
            header_identity: c("header_identity"),
            header_compressor_used: c("header_compressor_used"),
            header_compressor_overshadowed: c("header_compressor_overshadowed"),
            header_wildcard: c("header_wildcard"),
            header_not_valid: c("header_not_valid"),
            not_compressed_etag: c("not_compressed_etag"),
            request_not_compressed: c("request.not_compressed"),
        }
    }
}

#[derive(Debug)]
pub struct Compressor {
    library: Library,
    enabled: Flag,
    min_length: u64,
    types: Vec<String>,
    disable_on_etag: bool,
    weaken_etag: bool,
    remove_accept_encoding: bool,
    uncompressible: Vec<u16>,
    choose_first: bool,
    stats: Stats,
}

/// A route's `CompressorPerRoute`: off, or on (forced) with its own
/// `remove_accept_encoding_header`.
#[derive(Debug)]
pub struct RouteConfig {
    disabled: bool,
    remove_accept_encoding: Option<bool>,
}

/// The chain's compressors, registered as each sees the request (shared
/// through the request's filter state).
#[derive(Debug, Clone, Default)]
struct Registry(Vec<(Candidate, Arc<Vec<String>>)>);

fn build(a: &Any, hcm_prefix: &str, path: &str) -> Result<Arc<dyn HttpFilter>> {
    let c: pb::Compressor = super::decode(a, path)?;
    let lp = join(path, "compressor_library");
    let lib = c
        .compressor_library
        .as_ref()
        .ok_or_else(|| ConfigError::new(&lp, "compressor_library is required"))?;
    let library = Library::from_proto(lib, &lp)?;
    if c.request_direction_config.is_some() {
        return Err(ConfigError::new(
            join(path, "request_direction_config"),
            "compressing request bodies is not supported",
        ));
    }
    let prefix = format!(
        "http.{hcm_prefix}.compressor.{}.{}",
        lib.name,
        library.stat_prefix()
    );
    #[allow(deprecated)]
    let built = match &c.response_direction_config {
        Some(r) => {
            let rp = join(path, "response_direction_config");
            if r.status_header_enabled {
                return Err(ConfigError::new(
                    join(&rp, "status_header_enabled"),
                    "the compression status header is not supported",
                ));
            }
            let common = r.common_config.clone().unwrap_or_default();
            let cp = join(&rp, "common_config");
            if !common.content_type_matcher.is_empty() {
                return Err(ConfigError::new(
                    join(&cp, "content_type_matcher"),
                    "content type matchers are not supported",
                ));
            }
            Compressor {
                enabled: Flag::from_proto(common.enabled.as_ref()),
                min_length: common
                    .min_content_length
                    .as_ref()
                    .map_or(0, |v| v.value.into()),
                types: common.content_type.clone(),
                disable_on_etag: r.disable_on_etag_header,
                weaken_etag: r.weaken_etag_on_compress,
                remove_accept_encoding: r.remove_accept_encoding_header,
                uncompressible: r
                    .uncompressible_response_codes
                    .iter()
                    .filter_map(|c| u16::try_from(*c).ok())
                    .collect(),
                choose_first: c.choose_first,
                stats: Stats::new(&prefix, "response."),
                library,
            }
        }
        None => Compressor {
            enabled: Flag::from_proto(c.runtime_enabled.as_ref()),
            min_length: c.content_length.as_ref().map_or(0, |v| v.value.into()),
            types: c.content_type.clone(),
            disable_on_etag: c.disable_on_etag_header,
            weaken_etag: false,
            remove_accept_encoding: c.remove_accept_encoding_header,
            uncompressible: Vec::new(),
            choose_first: c.choose_first,
            stats: Stats::new(&prefix, ""),
            library,
        },
    };
    Ok(Arc::new(Compressor {
        // A configured 0 is Envoy's default too.
        min_length: if built.min_length == 0 {
            30
        } else {
            built.min_length
        },
        types: if built.types.is_empty() {
            DEFAULT_TYPES.iter().map(|s| s.to_string()).collect()
        } else {
            built.types.iter().map(|t| t.to_ascii_lowercase()).collect()
        },
        ..built
    }))
}

fn per_route(a: &Any, path: &str) -> Result<PerRoute> {
    let c: pb::CompressorPerRoute = super::decode(a, path)?;
    use pb::compressor_per_route::Override as O;
    Ok(Arc::new(match &c.r#override {
        Some(O::Disabled(d)) => RouteConfig {
            disabled: *d,
            remove_accept_encoding: None,
        },
        Some(O::Overrides(o)) => {
            if o.compressor_library.is_some() {
                return Err(ConfigError::new(
                    join(path, "overrides.compressor_library"),
                    "a route's own compressor library is not supported",
                ));
            }
            RouteConfig {
                disabled: false,
                remove_accept_encoding: o
                    .response_direction_config
                    .as_ref()
                    .and_then(|r| r.remove_accept_encoding_header.as_ref())
                    .map(|b| b.value),
            }
        }
        None => {
            return Err(ConfigError::new(
                path,
                "one of disabled or overrides is required",
            ))
        }
    }))
}

/// What the request told the filter, kept for the response.
struct Seen {
    accept: Option<String>,
    enabled: bool,
    /// Set when the response is compressed (the response hook sees the
    /// state shared).
    encoder: Mutex<Option<Encoder>>,
}

/// The value of `name` cut at `;`, trimmed, lower case.
fn media_type(v: &str) -> String {
    v.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn has_token(resp: &ResponseHeader, name: http::HeaderName, tokens: &[&str]) -> bool {
    resp.headers.get_all(name).iter().any(|v| {
        v.to_str().unwrap_or("").split(',').any(|t| {
            let t = t.trim();
            tokens.iter().any(|k| t.eq_ignore_ascii_case(k))
        })
    })
}

impl Compressor {
    /// Several `content-type` headers are one comma-joined value, as
    /// Envoy's header map holds them.
    fn type_ok(types: &[String], resp: &ResponseHeader) -> bool {
        let values: Vec<&str> = resp
            .headers
            .get_all(http::header::CONTENT_TYPE)
            .iter()
            .map(|v| v.to_str().unwrap_or(""))
            .collect();
        values.is_empty() || types.contains(&media_type(&values.join(",")))
    }

    /// The length check: an unstated length passes; one that does not
    /// parse, or is short, fails (counted).
    fn length_ok(&self, resp: &ResponseHeader) -> bool {
        let Some(v) = resp.headers.get(http::header::CONTENT_LENGTH) else {
            return true;
        };
        let ok = v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .is_some_and(|n| n >= self.min_length);
        if !ok {
            self.stats.content_length_too_small.increment(1);
        }
        ok
    }

    /// Everything but the client's accept-encoding.
    fn compressible(&self, resp: &ResponseHeader, enabled: bool, length_ok: bool) -> bool {
        let upgrade = resp.headers.contains_key(http::header::UPGRADE)
            && has_token(resp, http::header::CONNECTION, &["upgrade"]);
        // weaken_etag_on_compress lets an ETag through whatever
        // disable_on_etag_header says.
        let etag_ok = !self.disable_on_etag
            || self.weaken_etag
            || !resp.headers.contains_key(http::header::ETAG);
        if enabled && length_ok && !etag_ok {
            self.stats.not_compressed_etag.increment(1);
        }
        enabled
            && length_ok
            && !upgrade
            && Self::type_ok(&self.types, resp)
            && !has_token(resp, http::header::CACHE_CONTROL, &["no-transform"])
            && etag_ok
            && !resp.headers.contains_key(http::header::CONTENT_ENCODING)
            && !self.uncompressible.contains(&resp.status.as_u16())
    }

    /// Whether the accept-encoding decision, shared by the chain's
    /// compressors, is this filter's; counted.
    fn chosen(&self, accept: Option<&str>, resp: &ResponseHeader, info: &ResponseInfo<'_>) -> bool {
        let Some(accept) = accept else {
            self.stats.no_accept_header.increment(1);
            return false;
        };
        let registry = info
            .filter_state
            .get::<Registry>()
            .cloned()
            .unwrap_or_default();
        let candidates: Vec<Candidate> = registry
            .0
            .iter()
            .filter(|(_, types)| Self::type_ok(types, resp))
            .map(|(c, _)| c.clone())
            .collect();
        let d = negotiate::decide(accept, &candidates);
        let mine = self.library.encoding();
        match &d {
            Decision::Compressor(e) if *e == mine => self.stats.header_compressor_used.increment(1),
            Decision::Compressor(_) => self.stats.header_compressor_overshadowed.increment(1),
            Decision::Wildcard(_) => self.stats.header_wildcard.increment(1),
            Decision::Identity => self.stats.header_identity.increment(1),
            Decision::NotValid => self.stats.header_not_valid.increment(1),
        }
        d.encoding() == Some(mine)
    }

    /// Rewrites the headers for a compressed body.
    fn mark(&self, resp: &mut ResponseHeader, h1: bool) {
        if let Some(e) = resp.headers.get(http::header::ETAG).cloned() {
            let weak = e.as_bytes().len() >= 2 && e.as_bytes()[..2].eq_ignore_ascii_case(b"w/");
            if self.weaken_etag && !weak {
                let mut v = b"W/".to_vec();
                v.extend_from_slice(e.as_bytes());
                if let Ok(v) = http::HeaderValue::from_bytes(&v) {
                    let _ = resp.insert_header(http::header::ETAG, v);
                }
            } else if !weak {
                resp.remove_header(&http::header::ETAG);
            }
        }
        resp.remove_header(&http::header::CONTENT_LENGTH);
        let _ = resp.insert_header(http::header::CONTENT_ENCODING, self.library.encoding());
        if h1 && !resp.headers.contains_key(http::header::TRANSFER_ENCODING) {
            let _ = resp.insert_header(http::header::TRANSFER_ENCODING, "chunked");
        }
    }
}

/// Adds `Accept-Encoding` to `vary` unless it is already there as written.
fn vary(resp: &mut ResponseHeader) {
    match resp.headers.get(http::header::VARY).cloned() {
        None => {
            let _ = resp.insert_header(http::header::VARY, "Accept-Encoding");
        }
        Some(v) => {
            let s = v.to_str().unwrap_or("");
            if !s.split(',').any(|t| t.trim() == "Accept-Encoding") {
                let _ = resp.insert_header(http::header::VARY, format!("{s}, Accept-Encoding"));
            }
        }
    }
}

#[async_trait::async_trait]
impl HttpFilter for Compressor {
    async fn on_request(&self, rq: &mut RequestInfo<'_>, state: &mut Option<State>) -> Flow {
        let route = rq
            .per_route
            .iter()
            .flatten()
            .find_map(|c| c.downcast_ref::<RouteConfig>());
        let enabled = match route {
            Some(r) => !r.disabled,
            None => self.enabled.on(rq.runtime),
        };
        let accept = rq
            .req
            .headers
            .get(http::header::ACCEPT_ENCODING)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let remove = route
            .and_then(|r| r.remove_accept_encoding)
            .unwrap_or(self.remove_accept_encoding);
        if enabled && remove {
            rq.req.remove_header(&http::header::ACCEPT_ENCODING);
        }
        self.stats.request_not_compressed.increment(1);
        let mut registry = rq
            .filter_state
            .get::<Registry>()
            .cloned()
            .unwrap_or_default();
        let encoding = self.library.encoding();
        if !registry.0.iter().any(|(c, _)| c.encoding == encoding) {
            registry.0.push((
                Candidate {
                    encoding,
                    choose_first: self.choose_first,
                },
                Arc::new(self.types.clone()),
            ));
        }
        rq.filter_state.insert(registry);
        *state = Some(Box::new(Seen {
            accept,
            enabled,
            encoder: Mutex::new(None),
        }));
        Flow::Continue
    }

    fn on_response(
        &self,
        resp: &mut ResponseHeader,
        info: &ResponseInfo<'_>,
        state: Option<&State>,
    ) {
        let Some(seen) = state.and_then(|s| s.downcast_ref::<Seen>()) else {
            return;
        };
        let status = resp.status.as_u16();
        let no_body = info.req.method == http::Method::HEAD
            || status == 204
            || status == 304
            || info.local_body.is_some_and(|b| b.is_empty());
        let length_ok = seen.enabled && self.length_ok(resp);
        let compressible = self.compressible(resp, seen.enabled, length_ok);
        let chosen = seen.enabled
            && length_ok
            && !no_body
            && self.chosen(seen.accept.as_deref(), resp, info);
        let te_ok = !has_token(
            resp,
            http::header::TRANSFER_ENCODING,
            &["gzip", "br", "deflate", "compress", "zstd"],
        );
        if compressible {
            vary(resp);
        }
        if !no_body && chosen && compressible && te_ok {
            self.mark(resp, info.req.version != http::Version::HTTP_2);
            self.stats.compressed.increment(1);
            *seen.encoder.lock().unwrap_or_else(|e| e.into_inner()) = Some(self.library.encoder());
        } else {
            self.stats.not_compressed.increment(1);
        }
    }

    fn reads_bodies(&self) -> bool {
        true
    }

    fn on_response_body(&self, body: &mut Option<Bytes>, end: bool, state: &mut Option<State>) {
        let Some(seen) = state.as_mut().and_then(|s| s.downcast_mut::<Seen>()) else {
            return;
        };
        let Some(e) = seen
            .encoder
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        else {
            return;
        };
        let input = body.take().unwrap_or_default();
        match e.push(&input, end) {
            Ok(out) => {
                self.stats
                    .total_uncompressed_bytes
                    .increment(input.len() as u64);
                self.stats
                    .total_compressed_bytes
                    .increment(out.len() as u64);
                *body = (!out.is_empty() || end).then(|| Bytes::from(out));
            }
            // An encoder writing to memory does not fail; if one did, the
            // body could not be sent as declared.
            Err(e) => tracing::error!(error = %e, "compressor failed"),
        }
    }
}
