//! `envoy.filters.http.grpc_stats`: per upstream cluster, counts of gRPC
//! calls by status (`cluster.<c>.grpc.<service>.<method>.<status>`,
//! `.success` / `.failure`, `.total`) and of the messages each way
//! (`.request_message_count`, `.response_message_count`). Methods outside
//! the allowlist (and every method, unless `stats_for_all_methods`) count
//! without their names (`cluster.<c>.grpc.<status>` ...). Istio puts this
//! filter on every connection manager.

use super::{Factory, Flow, HttpFilter, RequestInfo, ResponseInfo, State};
use crate::config::{index, join, ConfigError, Result};
use crate::registry::MessageSupport;
use legate_proto::envoy_types::pb::envoy::extensions::filters::http::grpc_stats::v3 as pb;
use legate_proto::envoy_types::pb::google::protobuf::Any;
use pingora_http::ResponseHeader;
use std::collections::HashMap;
use std::sync::Arc;

const TYPE: &str = "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig";

pub static FACTORY: Factory = Factory {
    type_name: TYPE,
    build,
    per_route: &[],
};

pub static REGISTRY: &[MessageSupport] = &[
    MessageSupport {
        message: TYPE,
        supported: &[
            "individual_method_stats_allowlist",
            "stats_for_all_methods",
            "replace_dots_in_grpc_service_name",
        ],
        warn: &[
            (
                "emit_filter_state",
                "the filter state is read only by access log formatters Legate does not have",
            ),
            (
                "enable_upstream_stats",
                "only adds upstream timing histograms, which Legate does not keep",
            ),
        ],
    },
    MessageSupport {
        message: "envoy.config.core.v3.GrpcMethodList",
        supported: &["services"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.core.v3.GrpcMethodList.Service",
        supported: &["name", "method_names"],
        warn: &[],
    },
];

/// Which methods count under their own names.
#[derive(Debug)]
enum Named {
    All,
    /// service → methods.
    Allowlist(HashMap<String, Vec<String>>),
}

#[derive(Debug)]
pub struct GrpcStats {
    named: Named,
    replace_dots: bool,
}

/// One call's names and progress.
#[derive(Default)]
struct Call {
    /// `cluster.<c>.grpc.` plus `<service>.<method>.` when named.
    prefix: String,
    /// The status was counted (set from the response hook too, which
    /// sees the state shared).
    charged: std::sync::atomic::AtomicBool,
    request: Frames,
    response: Frames,
}

/// Counts gRPC messages in a byte stream: a 5-byte prefix (flag, length)
/// then the message, across chunk boundaries.
#[derive(Default)]
struct Frames {
    /// Bytes of the current frame's prefix seen so far.
    header: [u8; 5],
    header_len: usize,
    /// Message bytes still to skip.
    remaining: u64,
}

impl Frames {
    /// Feeds a chunk; returns how many frames completed in it.
    fn feed(&mut self, mut chunk: &[u8]) -> u64 {
        let mut done = 0;
        while !chunk.is_empty() {
            if self.remaining > 0 {
                let n = (self.remaining as usize).min(chunk.len());
                self.remaining -= n as u64;
                chunk = &chunk[n..];
                continue;
            }
            let n = (5 - self.header_len).min(chunk.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&chunk[..n]);
            self.header_len += n;
            chunk = &chunk[n..];
            if self.header_len == 5 {
                // A frame is counted once its prefix is complete, as
                // Envoy's decoder counts frames as they start.
                done += 1;
                self.remaining = u64::from(u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]));
                self.header_len = 0;
            }
        }
        done
    }
}

fn count(name: String, n: u64) {
    if n > 0 {
        crate::stats::counter(name).increment(n);
    }
}

impl GrpcStats {
    /// `/package.Service/Method` → the stat name part, if counted by name.
    fn names(&self, path: &str) -> Option<String> {
        let rest = path.strip_prefix('/')?;
        let (service, method) = rest.split_once('/')?;
        if service.is_empty() || method.is_empty() || method.contains('/') {
            return None;
        }
        let allowed = match &self.named {
            Named::All => true,
            Named::Allowlist(m) => m
                .get(service)
                .is_some_and(|ms| ms.iter().any(|x| x == method)),
        };
        if !allowed {
            return None;
        }
        let service = if self.replace_dots {
            service.replace('.', "_")
        } else {
            service.to_string()
        };
        Some(format!("{service}.{method}."))
    }
}

impl Call {
    fn charge(&self, status: &str) {
        if self
            .charged
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let p = &self.prefix;
        count(format!("{p}{status}"), 1);
        let outcome = if status == "0" { "success" } else { "failure" };
        count(format!("{p}{outcome}"), 1);
        count(format!("{p}total"), 1);
    }
}

fn call(state: &mut Option<State>) -> Option<&mut Call> {
    state.as_mut()?.downcast_mut::<Call>()
}

#[async_trait::async_trait]
impl HttpFilter for GrpcStats {
    async fn on_request(&self, rq: &mut RequestInfo<'_>, state: &mut Option<State>) -> Flow {
        let Some(cluster) = rq.cluster.filter(|_| rq.grpc) else {
            return Flow::Continue;
        };
        let path = rq.req.uri.path();
        let names = self.names(path).unwrap_or_default();
        *state = Some(Box::new(Call {
            prefix: format!("cluster.{cluster}.grpc.{names}"),
            ..Default::default()
        }));
        Flow::Continue
    }

    fn on_response(
        &self,
        resp: &mut ResponseHeader,
        _info: &ResponseInfo<'_>,
        state: Option<&State>,
    ) {
        // A trailers-only response (or Legate's own gRPC reply) carries
        // its status in the headers.
        let c = state.and_then(|s| s.downcast_ref::<Call>());
        if let (Some(c), Some(s)) = (c, resp.headers.get("grpc-status")) {
            c.charge(s.to_str().unwrap_or(""));
        }
    }

    fn reads_bodies(&self) -> bool {
        true
    }

    fn on_request_body(
        &self,
        body: &mut Option<bytes::Bytes>,
        _end: bool,
        state: &mut Option<State>,
    ) -> std::result::Result<(), super::FilterReply> {
        if let Some(c) = call(state) {
            let n = c.request.feed(body.as_deref().unwrap_or(&[]));
            count(format!("{}request_message_count", c.prefix), n);
        }
        Ok(())
    }

    fn on_response_body(
        &self,
        body: &mut Option<bytes::Bytes>,
        _end: bool,
        state: &mut Option<State>,
    ) {
        if let Some(c) = call(state) {
            let n = c.response.feed(body.as_deref().unwrap_or(&[]));
            count(format!("{}response_message_count", c.prefix), n);
        }
    }

    fn on_response_trailers(
        &self,
        trailers: &http::HeaderMap,
        state: &mut Option<State>,
    ) -> Option<bytes::Bytes> {
        if let (Some(c), Some(s)) = (call(state), trailers.get("grpc-status")) {
            c.charge(s.to_str().unwrap_or(""));
        }
        None
    }
}

fn build(a: &Any, _hcm_prefix: &str, path: &str) -> Result<Arc<dyn HttpFilter>> {
    let c: pb::FilterConfig = super::decode(a, path)?;
    use pb::filter_config::PerMethodStatSpecifier as S;
    let named = match &c.per_method_stat_specifier {
        Some(S::StatsForAllMethods(b)) if b.value => Named::All,
        Some(S::StatsForAllMethods(_)) | None => Named::Allowlist(HashMap::new()),
        Some(S::IndividualMethodStatsAllowlist(l)) => {
            let p = join(path, "individual_method_stats_allowlist");
            let mut m: HashMap<String, Vec<String>> = HashMap::new();
            for (i, s) in l.services.iter().enumerate() {
                if s.name.is_empty() {
                    return Err(ConfigError::new(
                        join(&index(&p, "services", i), "name"),
                        "a service name is required",
                    ));
                }
                m.entry(s.name.clone())
                    .or_default()
                    .extend(s.method_names.iter().cloned());
            }
            Named::Allowlist(m)
        }
    };
    Ok(Arc::new(GrpcStats {
        named,
        replace_dots: c.replace_dots_in_grpc_service_name,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_counted_across_chunks() {
        let mut f = Frames::default();
        // Two messages of 3 and 0 bytes, split mid-prefix and mid-message.
        let bytes = [0u8, 0, 0, 0, 3, b'a', b'b', b'c', 0, 0, 0, 0, 0];
        assert_eq!(f.feed(&bytes[..2]), 0);
        assert_eq!(f.feed(&bytes[2..6]), 1);
        assert_eq!(f.feed(&bytes[6..]), 1);
        assert_eq!(f.feed(&[]), 0);
    }

    #[test]
    fn names_follow_the_allowlist() {
        let all = GrpcStats {
            named: Named::All,
            replace_dots: true,
        };
        assert_eq!(all.names("/a.B/M").as_deref(), Some("a_B.M."));
        assert_eq!(all.names("/a.B/M/x"), None);
        let some = GrpcStats {
            named: Named::Allowlist(HashMap::from([("a.B".to_string(), vec!["M".to_string()])])),
            replace_dots: false,
        };
        assert_eq!(some.names("/a.B/M").as_deref(), Some("a.B.M."));
        assert_eq!(some.names("/a.B/N"), None);
    }
}
