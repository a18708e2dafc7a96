//! HCM tracing: Envoy's sampling decision (packed into `x-request-id`),
//! the provider's trace context propagated to the upstream (W3C for
//! OpenTelemetry, B3 for Zipkin, Datadog's headers and W3C for Datadog),
//! and route decorators. These are what tracing changes in traffic.
//!
//! The OpenTelemetry tracer exports each traced request's span over gRPC
//! (`otel`). Other providers' collectors are not called: their collector
//! settings and the span-only options (custom tags, verbose) are accepted
//! with a warning (see the registry) and change nothing else.

pub mod config;
pub mod decision;
pub mod otel;
pub mod propagation;

pub use config::{Provider, RouteTracing, Sampling, Tracing};
pub use decision::Reason;
pub use propagation::SpanContext;
