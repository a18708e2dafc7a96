//! HCM tracing: Envoy's sampling decision (packed into `x-request-id`),
//! the provider's trace context propagated to the upstream (W3C for
//! OpenTelemetry, B3 for Zipkin, Datadog's headers and W3C for Datadog),
//! and route decorators. These are what tracing changes in traffic.
//!
//! The OpenTelemetry tracer exports each traced request's spans over gRPC
//! (`otel`), the Zipkin tracer as v2 JSON over HTTP (`zipkin`), both from
//! the same facts and tags (`span`). Datadog's agent is not called: its
//! settings and the span-only options (verbose) are accepted with a
//! warning (see the registry) and change nothing else.

pub mod config;
pub mod decision;
pub mod otel;
pub mod propagation;
pub mod span;
pub mod zipkin;

pub use config::{Provider, RouteTracing, Sampling, Tracing};
pub use decision::Reason;
pub use propagation::SpanContext;
