//! Translation of the connection manager's `tracing`, a route's `tracing`
//! and the tracing providers.

use crate::config::{join, ConfigError, Result, Wrapped};
use legate_proto::envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
use legate_proto::envoy_types::pb::envoy::config::route::v3 as route;
use legate_proto::envoy_types::pb::envoy::config::trace::v3 as trace;
use legate_proto::envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::Tracing as HcmTracing;
use legate_proto::envoy_types::pb::envoy::r#type::v3::{FractionalPercent, Percent};

const OTEL: &str = "envoy.config.trace.v3.OpenTelemetryConfig";
const ZIPKIN: &str = "envoy.config.trace.v3.ZipkinConfig";
const DATADOG: &str = "envoy.config.trace.v3.DatadogConfig";
const SAMPLERS: &str = "envoy.extensions.tracers.opentelemetry.samplers.v3.";

/// A share of requests: `value % denominator < numerator`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fraction {
    pub numerator: u64,
    pub denominator: u64,
}

impl Fraction {
    pub const ALL: Fraction = Fraction {
        numerator: 100,
        denominator: 100,
    };

    pub fn admits(&self, value: u64) -> bool {
        value % self.denominator < self.numerator
    }

    fn from_fractional(f: &FractionalPercent) -> Self {
        use legate_proto::envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType as D;
        let denominator = match D::try_from(f.denominator).unwrap_or(D::Hundred) {
            D::Hundred => 100,
            D::TenThousand => 10_000,
            D::Million => 1_000_000,
        };
        Fraction {
            numerator: u64::from(f.numerator),
            denominator,
        }
    }
}

/// The three sampling knobs, as Envoy turns the connection manager's
/// percentages into fractions: client in hundredths (whole percent), random
/// and overall in ten-thousandths.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub client: Fraction,
    pub random: Fraction,
    pub overall: Fraction,
}

fn percent(p: Option<&Percent>, path: &str) -> Result<f64> {
    let v = p.map_or(100.0, |p| p.value);
    if !(0.0..=100.0).contains(&v) {
        return Err(ConfigError::new(path, "a percentage must be in [0, 100]"));
    }
    Ok(v)
}

#[derive(Debug)]
pub enum OtelSampler {
    AlwaysOn,
    /// `trace_id_ratio_based`: by the trace id's first eight bytes.
    Ratio(Fraction),
    /// `parent_based`: the parent's flag, else the wrapped sampler.
    ParentBased(Box<OtelSampler>),
}

#[derive(Debug)]
pub enum Provider {
    OpenTelemetry {
        sampler: Option<OtelSampler>,
        /// The span exporter, when `grpc_service` names a collector.
        exporter: Option<std::sync::Arc<super::otel::Exporter>>,
    },
    Zipkin {
        trace_id_128bit: bool,
        shared_span_context: bool,
        /// The span reporter, when `collector_cluster` names one.
        exporter: Option<std::sync::Arc<super::zipkin::Exporter>>,
    },
    Datadog,
}

/// The connection manager's `tracing`.
#[derive(Debug)]
pub struct Tracing {
    pub sampling: Sampling,
    /// None: Envoy's null tracer (sampling still marks `x-request-id`, no
    /// context is propagated).
    pub provider: Option<Provider>,
    /// `spawn_upstream_span`: each upstream attempt is a child span, whose
    /// id is the one propagated.
    pub spawn_upstream_span: bool,
    /// `custom_tags`, on every span.
    pub custom_tags: Vec<CustomTag>,
    /// `max_path_tag_length` of the `http.url` tag.
    pub max_path_tag_length: usize,
}

/// A `custom_tags` entry: its name and where its value comes from.
#[derive(Debug, Clone)]
pub struct CustomTag {
    pub tag: String,
    pub value: TagValue,
}

#[derive(Debug, Clone)]
pub enum TagValue {
    /// A literal, or an environment variable read when the config loads.
    Fixed(String),
    /// A request header (its first value), or the default.
    Header(http::HeaderName, String),
}

impl CustomTag {
    /// None: a kind Legate does not evaluate (metadata, formats), which
    /// shapes spans only and is left out with a warning.
    fn from_proto(
        t: &legate_proto::envoy_types::pb::envoy::r#type::tracing::v3::CustomTag,
        path: &str,
    ) -> Result<Option<Self>> {
        use legate_proto::envoy_types::pb::envoy::r#type::tracing::v3::custom_tag::Type as T;
        let value = match &t.r#type {
            Some(T::Literal(l)) => TagValue::Fixed(l.value.clone()),
            Some(T::Environment(e)) => {
                TagValue::Fixed(std::env::var(&e.name).unwrap_or_else(|_| e.default_value.clone()))
            }
            Some(T::RequestHeader(h)) => TagValue::Header(
                crate::headers::header_name(&h.name, &join(path, "request_header.name"))?,
                h.default_value.clone(),
            ),
            _ => {
                tracing::warn!("{path}: custom tag '{}' of a kind Legate does not evaluate is left out of spans", t.tag);
                return Ok(None);
            }
        };
        Ok(Some(Self {
            tag: t.tag.clone(),
            value,
        }))
    }

    /// The tag's value for a request; an empty value (a missing header
    /// without a default) sets no tag, as in Envoy.
    pub fn value(&self, headers: &http::HeaderMap) -> Option<String> {
        let v = match &self.value {
            TagValue::Fixed(v) => v.clone(),
            TagValue::Header(h, default) => match headers.get(h) {
                Some(v) => String::from_utf8_lossy(v.as_bytes()).into_owned(),
                None => default.clone(),
            },
        };
        (!v.is_empty()).then_some(v)
    }
}

impl Tracing {
    /// `start_child_span`: the router's, the default of
    /// `spawn_upstream_span`.
    pub fn from_proto(t: &HcmTracing, start_child_span: bool, path: &str) -> Result<Self> {
        let client = percent(t.client_sampling.as_ref(), &join(path, "client_sampling"))?;
        let random = percent(t.random_sampling.as_ref(), &join(path, "random_sampling"))?;
        let overall = percent(t.overall_sampling.as_ref(), &join(path, "overall_sampling"))?;
        let tenths = |v: f64| Fraction {
            numerator: (v * 100.0).round() as u64,
            denominator: 10_000,
        };
        Ok(Self {
            sampling: Sampling {
                client: Fraction {
                    numerator: client as u64,
                    denominator: 100,
                },
                random: tenths(random),
                overall: tenths(overall),
            },
            provider: t
                .provider
                .as_ref()
                .map(|p| provider(p, &join(path, "provider")))
                .transpose()?,
            spawn_upstream_span: t.spawn_upstream_span.val().unwrap_or(start_child_span),
            custom_tags: t
                .custom_tags
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    CustomTag::from_proto(c, &crate::config::index(path, "custom_tags", i))
                })
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .flatten()
                .collect(),
            max_path_tag_length: t
                .max_path_tag_length
                .val()
                .map_or(super::span::MAX_PATH_TAG, |n| n as usize),
        })
    }
}

fn any_of(
    tc: Option<&legate_proto::envoy_types::pb::google::protobuf::Any>,
    path: &str,
) -> Result<(String, Vec<u8>)> {
    let a =
        tc.ok_or_else(|| ConfigError::new(join(path, "typed_config"), "typed_config is required"))?;
    Ok((
        legate_proto::type_name(&a.type_url).to_string(),
        a.value.clone(),
    ))
}

fn decode<M: prost::Message + Default>(bytes: &[u8], path: &str) -> Result<M> {
    M::decode(bytes).map_err(|e| ConfigError::new(join(path, "typed_config"), e.to_string()))
}

fn provider(p: &trace::tracing::Http, path: &str) -> Result<Provider> {
    use trace::tracing::http::ConfigType;
    let tc = p.config_type.as_ref().map(|ConfigType::TypedConfig(a)| a);
    let (tn, bytes) = any_of(tc, path)?;
    let tcp = join(path, "typed_config");
    match tn.as_str() {
        OTEL => {
            let o: trace::OpenTelemetryConfig = decode(&bytes, path)?;
            let sampler = o
                .sampler
                .as_ref()
                .map(|s| sampler(s, &join(&tcp, "sampler")))
                .transpose()?;
            if o.http_service.is_some() {
                return Err(ConfigError::new(
                    join(&tcp, "http_service"),
                    "OTLP over HTTP is not supported by Legate (grpc_service is)",
                ));
            }
            let exporter = super::otel::Exporter::from_proto(&o, &tcp)?;
            Ok(Provider::OpenTelemetry { sampler, exporter })
        }
        ZIPKIN => {
            let z: trace::ZipkinConfig = decode(&bytes, path)?;
            if z.split_spans_for_request {
                return Err(ConfigError::new(
                    join(&tcp, "split_spans_for_request"),
                    "not supported by Legate; use spawn_upstream_span",
                ));
            }
            if z.trace_context_option != 0 {
                return Err(ConfigError::new(
                    join(&tcp, "trace_context_option"),
                    "only USE_B3 (B3 headers alone) is supported by Legate",
                ));
            }
            Ok(Provider::Zipkin {
                trace_id_128bit: z.trace_id_128bit,
                shared_span_context: z.shared_span_context.val().unwrap_or(true),
                exporter: super::zipkin::Exporter::from_proto(&z, &tcp)?,
            })
        }
        DATADOG => Ok(Provider::Datadog),
        other => Err(ConfigError::new(
            tcp,
            format!("tracer {other} is not supported by Legate"),
        )),
    }
}

fn sampler(s: &TypedExtensionConfig, path: &str) -> Result<OtelSampler> {
    use legate_proto::envoy_types::pb::envoy::extensions::tracers::opentelemetry::samplers::v3 as sp;
    let (tn, bytes) = any_of(s.typed_config.as_ref(), path)?;
    match tn.strip_prefix(SAMPLERS) {
        Some("AlwaysOnSamplerConfig") => Ok(OtelSampler::AlwaysOn),
        Some("TraceIdRatioBasedSamplerConfig") => {
            let r: sp::TraceIdRatioBasedSamplerConfig = decode(&bytes, path)?;
            let f = r.sampling_percentage.as_ref().map_or(
                Fraction {
                    numerator: 0,
                    denominator: 100,
                },
                Fraction::from_fractional,
            );
            Ok(OtelSampler::Ratio(f))
        }
        Some("ParentBasedSamplerConfig") => {
            let p: sp::ParentBasedSamplerConfig = decode(&bytes, path)?;
            let wp = join(&join(path, "typed_config"), "wrapped_sampler");
            let w = p
                .wrapped_sampler
                .as_ref()
                .ok_or_else(|| ConfigError::new(&wp, "wrapped_sampler is required"))?;
            Ok(OtelSampler::ParentBased(Box::new(sampler(w, &wp)?)))
        }
        _ => Err(ConfigError::new(
            join(path, "typed_config"),
            format!("sampler {tn} is not supported by Legate"),
        )),
    }
}

/// A route's `tracing` (its sampling overrides the manager's whole: an
/// unset field is 100%, as in Envoy) and `decorator`.
#[derive(Debug, Clone, Default)]
pub struct RouteTracing {
    pub sampling: Option<Sampling>,
    /// The decorator's operation and whether it is propagated.
    pub decorator: Option<(String, bool)>,
}

impl RouteTracing {
    pub fn from_proto(
        t: Option<&route::Tracing>,
        d: Option<&route::Decorator>,
        path: &str,
    ) -> Result<Self> {
        let frac =
            |f: Option<&FractionalPercent>| f.map_or(Fraction::ALL, Fraction::from_fractional);
        let decorator = match d {
            Some(d) if d.operation.is_empty() => {
                return Err(ConfigError::new(
                    join(&join(path, "decorator"), "operation"),
                    "operation is required",
                ))
            }
            Some(d) => Some((d.operation.clone(), d.propagate.val().unwrap_or(true))),
            None => None,
        };
        Ok(Self {
            sampling: t.map(|t| Sampling {
                client: frac(t.client_sampling.as_ref()),
                random: frac(t.random_sampling.as_ref()),
                overall: frac(t.overall_sampling.as_ref()),
            }),
            decorator,
        })
    }
}
