//! `envoy.filters.http.buffer`: the whole request body is read before the
//! request goes on (up to `max_request_bytes`, else Envoy's 413), and a
//! request that did not state its length gets a `content-length` (the
//! default of Envoy's `buffer_filter_populate_content_length`). A route's
//! `BufferPerRoute` turns it off or sets its own limit.

use super::{Factory, Flow, HttpFilter, PerRoute, RequestInfo, State};
use crate::config::{join, ConfigError, Result, Wrapped};
use crate::registry::MessageSupport;
use legate_proto::envoy_types::pb::envoy::extensions::filters::http::buffer::v3 as pb;
use legate_proto::envoy_types::pb::google::protobuf::Any;
use std::sync::Arc;

const TYPE: &str = "envoy.extensions.filters.http.buffer.v3.Buffer";
const PER_ROUTE: &str = "envoy.extensions.filters.http.buffer.v3.BufferPerRoute";

pub static FACTORY: Factory = Factory {
    type_name: TYPE,
    build,
    per_route: &[(PER_ROUTE, per_route)],
};

pub static REGISTRY: &[MessageSupport] = &[
    MessageSupport {
        message: TYPE,
        supported: &["max_request_bytes"],
        warn: &[],
    },
    MessageSupport {
        message: PER_ROUTE,
        supported: &["disabled", "buffer"],
        warn: &[],
    },
];

#[derive(Debug)]
pub struct Buffer {
    max: usize,
}

/// A route's override: off, or its own limit.
#[derive(Debug)]
enum RouteBuffer {
    Disabled,
    Max(usize),
}

fn max_bytes(b: &pb::Buffer, path: &str) -> Result<usize> {
    b.max_request_bytes
        .val()
        .filter(|m| *m > 0)
        .map(|m| m as usize)
        .ok_or_else(|| {
            ConfigError::new(
                join(path, "max_request_bytes"),
                "max_request_bytes is required (at least 1)",
            )
        })
}

fn build(a: &Any, _hcm_prefix: &str, path: &str) -> Result<Arc<dyn HttpFilter>> {
    let b: pb::Buffer = super::decode(a, path)?;
    Ok(Arc::new(Buffer {
        max: max_bytes(&b, path)?,
    }))
}

fn per_route(a: &Any, path: &str) -> Result<PerRoute> {
    let r: pb::BufferPerRoute = super::decode(a, path)?;
    use pb::buffer_per_route::Override;
    Ok(Arc::new(match &r.r#override {
        Some(Override::Disabled(true)) => RouteBuffer::Disabled,
        Some(Override::Disabled(false)) => {
            return Err(ConfigError::new(
                join(path, "disabled"),
                "disabled must be true when set",
            ))
        }
        Some(Override::Buffer(b)) => RouteBuffer::Max(max_bytes(b, &join(path, "buffer"))?),
        None => return Err(ConfigError::new(path, "an override is required")),
    }))
}

impl Buffer {
    /// The limit in force: the most specific route override's, else the
    /// filter's; None when a route turns the filter off.
    fn limit(&self, per_route: &[Option<&PerRoute>; 4]) -> Option<usize> {
        match per_route
            .iter()
            .flatten()
            .find_map(|c| c.downcast_ref::<RouteBuffer>())
        {
            Some(RouteBuffer::Disabled) => None,
            Some(RouteBuffer::Max(m)) => Some(*m),
            None => Some(self.max),
        }
    }
}

#[async_trait::async_trait]
impl HttpFilter for Buffer {
    async fn on_request(&self, rq: &mut RequestInfo<'_>, _state: &mut Option<State>) -> Flow {
        // A request without a body is not buffered, nor given a length.
        if rq.end_of_stream || self.limit(&rq.per_route).is_none() {
            return Flow::Continue;
        }
        if !rq.req.headers.contains_key(http::header::CONTENT_LENGTH) {
            let len = rq.body.map_or(0, |b| b.len());
            rq.req.remove_header(&http::header::TRANSFER_ENCODING);
            let _ = rq
                .req
                .insert_header(http::header::CONTENT_LENGTH, len.to_string());
        }
        Flow::Continue
    }

    fn request_body_limit(&self, per_route: &[Option<&PerRoute>; 4]) -> Option<usize> {
        self.limit(per_route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_specific_route_override_wins() {
        let f = Buffer { max: 10 };
        let off: PerRoute = Arc::new(RouteBuffer::Disabled);
        let five: PerRoute = Arc::new(RouteBuffer::Max(5));
        assert_eq!(f.limit(&[None, None, None, None]), Some(10));
        assert_eq!(f.limit(&[None, Some(&five), Some(&off), None]), Some(5));
        assert_eq!(f.limit(&[Some(&off), Some(&five), None, None]), None);
    }
}
