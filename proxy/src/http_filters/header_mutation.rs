//! `envoy.filters.http.header_mutation`: header additions and removals on
//! the request and the response, from the filter's config and from every
//! level's `HeaderMutationPerRoute`. The filter's own mutations apply
//! first; then the per-route ones, most specific first (so less specific
//! levels win), or least specific first with
//! `most_specific_header_mutations_wins`.

use super::{Factory, Flow, HttpFilter, PerRoute, RequestInfo, ResponseInfo, State};
use crate::config::matcher::StringMatcher;
use crate::config::{index, join, ConfigError, Result};
use crate::headers::{self, FormatContext, HeaderAdd, HeaderSink};
use crate::registry::MessageSupport;
use http::HeaderName;
use legate_proto::envoy_types::pb::envoy::config::common::mutation_rules::v3 as rules;
use legate_proto::envoy_types::pb::envoy::extensions::filters::http::header_mutation::v3 as pb;
use legate_proto::envoy_types::pb::google::protobuf::Any;
use pingora_http::ResponseHeader;
use std::sync::Arc;

const TYPE: &str = "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation";
const PER_ROUTE_TYPE: &str =
    "envoy.extensions.filters.http.header_mutation.v3.HeaderMutationPerRoute";

pub static FACTORY: Factory = Factory {
    type_name: TYPE,
    build,
    per_route: &[(PER_ROUTE_TYPE, per_route)],
};

pub static REGISTRY: &[MessageSupport] = &[
    MessageSupport {
        message: TYPE,
        supported: &["mutations", "most_specific_header_mutations_wins"],
        warn: &[],
    },
    MessageSupport {
        message: PER_ROUTE_TYPE,
        supported: &["mutations"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.filters.http.header_mutation.v3.Mutations",
        supported: &["request_mutations", "response_mutations"],
        warn: &[],
    },
    MessageSupport {
        message: EARLY_TYPE,
        supported: &["mutations"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.common.mutation_rules.v3.HeaderMutation",
        supported: &["remove", "append", "remove_on_match"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.common.mutation_rules.v3.HeaderMutation.RemoveOnMatch",
        supported: &["key_matcher"],
        warn: &[],
    },
];

/// One mutation, applied in order.
#[derive(Debug)]
enum Mutation {
    Remove(HeaderName),
    Append(HeaderAdd),
    RemoveOnMatch(StringMatcher),
}

#[derive(Debug, Default)]
pub struct Mutations {
    request: Vec<Mutation>,
    response: Vec<Mutation>,
}

#[derive(Debug)]
pub struct HeaderMutation {
    mutations: Mutations,
    most_specific_wins: bool,
}

fn list(ms: &[rules::HeaderMutation], path: &str, field: &str) -> Result<Vec<Mutation>> {
    use rules::header_mutation::Action as A;
    ms.iter()
        .enumerate()
        .map(|(i, m)| {
            let p = index(path, field, i);
            Ok(match &m.action {
                Some(A::Remove(name)) => {
                    Mutation::Remove(headers::header_name(name, &join(&p, "remove"))?)
                }
                Some(A::Append(o)) => {
                    Mutation::Append(headers::header_add(o, &join(&p, "append"))?)
                }
                Some(A::RemoveOnMatch(r)) => {
                    let mp = join(&p, "remove_on_match.key_matcher");
                    let m = r
                        .key_matcher
                        .as_ref()
                        .ok_or_else(|| ConfigError::new(&mp, "key_matcher is required"))?;
                    Mutation::RemoveOnMatch(StringMatcher::from_proto(m, &mp)?)
                }
                None => return Err(ConfigError::new(p, "an action is required")),
            })
        })
        .collect()
}

impl Mutations {
    fn from_proto(m: Option<&pb::Mutations>, path: &str) -> Result<Self> {
        let Some(m) = m else {
            return Ok(Self::default());
        };
        let p = join(path, "mutations");
        Ok(Self {
            request: list(&m.request_mutations, &p, "request_mutations")?,
            response: list(&m.response_mutations, &p, "response_mutations")?,
        })
    }
}

/// What a mutation's value may refer to, besides the headers.
struct Facts {
    remote: Option<std::net::SocketAddr>,
    direct_remote: Option<std::net::SocketAddr>,
    local: Option<std::net::SocketAddr>,
    method: String,
    path: String,
    /// The response's status, on the response side.
    status: Option<u16>,
}

impl Facts {
    fn new(
        req: &pingora_http::RequestHeader,
        remote: Option<std::net::SocketAddr>,
        direct_remote: Option<std::net::SocketAddr>,
        local: Option<std::net::SocketAddr>,
    ) -> Self {
        Self {
            remote,
            direct_remote,
            local,
            method: req.method.as_str().to_string(),
            path: req
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string(),
            status: None,
        }
    }
}

/// Applies mutations one by one, each seeing the headers as the previous
/// ones left them (Envoy's `HeaderMutations::evaluateHeaders`). `req`:
/// the request's headers when mutating the response (None: the sink is
/// the request).
fn mutate(
    ms: &[Mutation],
    sink: &mut dyn HeaderSink,
    facts: &Facts,
    req: Option<&http::HeaderMap>,
) {
    for m in ms {
        match m {
            Mutation::Remove(name) => sink.remove(name),
            Mutation::RemoveOnMatch(matcher) => {
                let doomed: Vec<HeaderName> = sink
                    .map()
                    .keys()
                    .filter(|k| matcher.matches(k.as_str()))
                    .cloned()
                    .collect();
                for k in &doomed {
                    sink.remove(k);
                }
            }
            Mutation::Append(add) => {
                // A literal needs no view of the headers; a formatted value
                // reads them as they are now.
                let snapshot = match add.value.literal() {
                    Some(_) => None,
                    None => Some(sink.map().clone()),
                };
                let (request_headers, response_headers) = match req {
                    None => (snapshot.as_ref(), None),
                    Some(r) => (Some(r), snapshot.as_ref()),
                };
                let fctx = FormatContext {
                    downstream_remote: facts.remote,
                    downstream_direct_remote: facts.direct_remote,
                    downstream_local: facts.local,
                    request_headers,
                    response_headers,
                    pseudo: crate::config::matcher::Pseudo {
                        method: &facts.method,
                        path: &facts.path,
                        authority: "",
                        scheme: "",
                        status: None,
                    },
                    response_code: facts.status,
                    ..Default::default()
                };
                headers::apply(std::slice::from_ref(add), &[], sink, &fctx);
            }
        }
    }
}

const EARLY_TYPE: &str =
    "envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation";

/// The connection manager's `early_header_mutation_extensions` entry of
/// this kind: request mutations applied before anything else (routing,
/// forwarding headers), as Envoy applies them.
#[derive(Debug)]
pub struct Early(Vec<Mutation>);

impl Early {
    pub fn from_any(a: &Any, path: &str) -> Result<Self> {
        let tc = join(path, "typed_config");
        if legate_proto::type_name(&a.type_url) != EARLY_TYPE {
            return Err(ConfigError::new(
                tc,
                format!(
                    "early header mutation {} is not supported",
                    legate_proto::type_name(&a.type_url)
                ),
            ));
        }
        let c: legate_proto::envoy_types::pb::envoy::extensions::http::early_header_mutation::header_mutation::v3::HeaderMutation =
            prost::Message::decode(a.value.as_slice())
                .map_err(|e| ConfigError::new(&tc, e.to_string()))?;
        Ok(Self(list(&c.mutations, &tc, "mutations")?))
    }

    pub fn apply(
        &self,
        req: &mut pingora_http::RequestHeader,
        remote: Option<std::net::SocketAddr>,
        local: Option<std::net::SocketAddr>,
    ) {
        let facts = Facts::new(req, remote, remote, local);
        mutate(&self.0, req, &facts, None);
    }
}

/// The per-route mutations in the order they apply.
struct Picked(Vec<Arc<Mutations>>);

#[async_trait::async_trait]
impl HttpFilter for HeaderMutation {
    async fn on_request(&self, rq: &mut RequestInfo<'_>, state: &mut Option<State>) -> Flow {
        let mut levels: Vec<Arc<Mutations>> = rq.all_levels::<Mutations>().collect();
        if self.most_specific_wins {
            levels.reverse();
        }
        let facts = Facts::new(rq.req, rq.remote, rq.direct_remote, rq.local);
        mutate(&self.mutations.request, rq.req, &facts, None);
        for l in &levels {
            mutate(&l.request, rq.req, &facts, None);
        }
        *state = Some(Box::new(Picked(levels)));
        Flow::Continue
    }

    fn on_response(
        &self,
        resp: &mut ResponseHeader,
        info: &ResponseInfo<'_>,
        state: Option<&State>,
    ) {
        let mut facts = Facts::new(info.req, info.remote, info.direct_remote, info.local_addr);
        facts.status = Some(resp.status.as_u16());
        let req = Some(&info.req.headers);
        mutate(&self.mutations.response, resp, &facts, req);
        if let Some(Picked(levels)) = state.and_then(|s| s.downcast_ref::<Picked>()) {
            for l in levels {
                mutate(&l.response, resp, &facts, req);
            }
        }
    }
}

fn build(a: &Any, _hcm_prefix: &str, path: &str) -> Result<Arc<dyn HttpFilter>> {
    let c: pb::HeaderMutation = super::decode(a, path)?;
    Ok(Arc::new(HeaderMutation {
        mutations: Mutations::from_proto(c.mutations.as_ref(), path)?,
        most_specific_wins: c.most_specific_header_mutations_wins,
    }))
}

fn per_route(a: &Any, path: &str) -> Result<PerRoute> {
    let c: pb::HeaderMutationPerRoute = super::decode(a, path)?;
    Ok(Arc::new(Mutations::from_proto(c.mutations.as_ref(), path)?))
}
