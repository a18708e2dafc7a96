//! `envoy.filters.http.rbac`: allows or denies requests by policies over
//! the request (headers, path, method as `:method`) and its connection
//! (addresses, ports, SNI, the client certificate's identity), with the
//! engine the network filter uses (`config::rbac`). Shadow rules are
//! evaluated and counted only. A route's `RBACPerRoute` replaces the
//! filter's config; one without `rbac` turns it off for that route.
//!
//! The `matcher` form (the unified matcher, `config::unified_matcher`)
//! takes the place of `rules` when both are set, as in Envoy: the first
//! matching predicate's `Action` decides, and a request nothing matches
//! is denied.

use super::{Factory, FilterReply, Flow, HttpFilter, PerRoute, RequestInfo, State};
use crate::config::rbac::{matched_action, Action, Facts, HttpFacts, MatchedAction, Rules};
use crate::config::unified_matcher::{Data, Matcher};
use crate::config::{join, Result};
use crate::registry::MessageSupport;
use legate_proto::envoy_types::pb::envoy::config::rbac::v3 as rbac_pb;
use legate_proto::envoy_types::pb::envoy::extensions::filters::http::rbac::v3 as pb;
use legate_proto::envoy_types::pb::google::protobuf::Any;
use legate_proto::envoy_types::pb::xds::r#type::matcher::v3 as xds_matcher;
use metrics::Counter;
use std::sync::{Arc, OnceLock};

const TYPE: &str = "envoy.extensions.filters.http.rbac.v3.RBAC";
const PER_ROUTE_TYPE: &str = "envoy.extensions.filters.http.rbac.v3.RBACPerRoute";

pub static FACTORY: Factory = Factory {
    type_name: TYPE,
    build,
    per_route: &[(PER_ROUTE_TYPE, per_route)],
};

pub static REGISTRY: &[MessageSupport] = &[
    MessageSupport {
        message: TYPE,
        supported: &[
            "rules",
            "rules_stat_prefix",
            "shadow_rules",
            "shadow_rules_stat_prefix",
            "matcher",
            "shadow_matcher",
        ],
        warn: &[(
            "track_per_rule_stats",
            "only adds per-policy stats, which Legate does not keep yet",
        )],
    },
    MessageSupport {
        message: PER_ROUTE_TYPE,
        supported: &["rbac"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.rbac.v3.Action",
        supported: &["name", "action"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.type.matcher.v3.PathMatcher",
        supported: &["path"],
        warn: &[],
    },
];

/// One RBAC config: the filter's or a route's.
#[derive(Debug)]
pub struct Config {
    rules: Option<Engine>,
    shadow: Option<Engine>,
    rules_prefix: String,
    shadow_prefix: String,
}

/// The policies of `rules`, or a `matcher`.
#[derive(Debug)]
enum Engine {
    Rules(Rules),
    Matcher(Matcher<MatchedAction>),
}

impl Engine {
    fn from_proto(
        rules: Option<&rbac_pb::Rbac>,
        matcher: Option<&xds_matcher::Matcher>,
        path: &str,
        (rules_field, matcher_field): (&str, &str),
    ) -> Result<Option<Engine>> {
        if let Some(m) = matcher {
            return Ok(Some(Engine::Matcher(Matcher::from_proto(
                m,
                &join(path, matcher_field),
                &matched_action,
            )?)));
        }
        rules
            .map(|x| Rules::from_proto(x, &join(path, rules_field), true).map(Engine::Rules))
            .transpose()
    }

    /// Whether the request may go on, and the policy (or action name)
    /// that decided.
    fn allows<'a>(&'a self, facts: &Facts, data: &Data<'_>) -> (bool, Option<&'a str>) {
        match self {
            Engine::Rules(r) => r.allows(facts),
            Engine::Matcher(m) => match m.evaluate(data) {
                Some(a) => (a.action != Action::Deny, Some(&a.name)),
                None => (false, None),
            },
        }
    }
}

impl Config {
    pub fn from_proto(r: &pb::Rbac, path: &str) -> Result<Self> {
        Ok(Self {
            rules: Engine::from_proto(
                r.rules.as_ref(),
                r.matcher.as_ref(),
                path,
                ("rules", "matcher"),
            )?,
            shadow: Engine::from_proto(
                r.shadow_rules.as_ref(),
                r.shadow_matcher.as_ref(),
                path,
                ("shadow_rules", "shadow_matcher"),
            )?,
            rules_prefix: r.rules_stat_prefix.clone(),
            shadow_prefix: r.shadow_rules_stat_prefix.clone(),
        })
    }
}

#[derive(Debug)]
pub struct Rbac {
    config: Config,
    /// `http.<hcm prefix>.rbac.`
    prefix: String,
    stats: OnceLock<Stats>,
}

#[derive(Debug)]
struct Stats {
    allowed: Counter,
    denied: Counter,
    shadow_allowed: Counter,
    shadow_denied: Counter,
}

impl Rbac {
    /// Counts under the filter's own stat prefixes, whichever config
    /// decided: a route's `RBACPerRoute` has no stats of its own in Envoy.
    fn count(&self, shadow: bool, allowed: bool) {
        let s = self.stats.get_or_init(|| {
            let cfg = &self.config;
            let c = |p: &str, n: &str| crate::stats::counter(format!("{}{p}{n}", self.prefix));
            Stats {
                allowed: c(&cfg.rules_prefix, "allowed"),
                denied: c(&cfg.rules_prefix, "denied"),
                shadow_allowed: c(&cfg.shadow_prefix, "shadow_allowed"),
                shadow_denied: c(&cfg.shadow_prefix, "shadow_denied"),
            }
        });
        match (shadow, allowed) {
            (false, true) => s.allowed.increment(1),
            (false, false) => s.denied.increment(1),
            (true, true) => s.shadow_allowed.increment(1),
            (true, false) => s.shadow_denied.increment(1),
        }
    }
}

#[async_trait::async_trait]
impl HttpFilter for Rbac {
    async fn on_request(&self, rq: &mut RequestInfo<'_>, _state: &mut Option<State>) -> Flow {
        let route: Option<Arc<Config>> = rq.all_levels::<Config>().next();
        let cfg = route.as_deref().unwrap_or(&self.config);
        if cfg.rules.is_none() && cfg.shadow.is_none() {
            return Flow::Continue;
        }
        let data = rq.match_data();
        let pseudo = data.pseudo;
        let path = pseudo.path.split(['?', '#']).next().unwrap_or(pseudo.path);
        let unspecified: std::net::SocketAddr = ([0, 0, 0, 0], 0).into();
        let facts = Facts {
            local: rq.local.unwrap_or(unspecified),
            peer: rq.direct_remote.unwrap_or(unspecified),
            remote: rq.remote.or(rq.direct_remote).unwrap_or(unspecified),
            sni: rq.sni,
            peer_cert: rq.peer_tls.and_then(|p| p.leaf()),
            http: Some(HttpFacts {
                headers: &rq.req.headers,
                pseudo,
                path,
            }),
        };
        if let Some(shadow) = &cfg.shadow {
            let (ok, _) = shadow.allows(&facts, &data);
            self.count(true, ok);
        }
        let Some(rules) = &cfg.rules else {
            return Flow::Continue;
        };
        let (ok, policy) = rules.allows(&facts, &data);
        if ok {
            self.count(false, true);
            return Flow::Continue;
        }
        self.count(false, false);
        let details = format!(
            "rbac_access_denied_matched_policy[{}]",
            policy.unwrap_or("none")
        );
        let mut r = FilterReply::new(403, "RBAC: access denied", "");
        r.details = details.into();
        Flow::Reply(r)
    }
}

fn build(a: &Any, hcm_prefix: &str, path: &str) -> Result<Arc<dyn HttpFilter>> {
    let r: pb::Rbac = super::decode(a, path)?;
    Ok(Arc::new(Rbac {
        config: Config::from_proto(&r, path)?,
        prefix: format!("http.{hcm_prefix}.rbac."),
        stats: OnceLock::new(),
    }))
}

fn per_route(a: &Any, path: &str) -> Result<PerRoute> {
    let r: pb::RbacPerRoute = super::decode(a, path)?;
    let cfg = match &r.rbac {
        Some(rbac) => Config::from_proto(rbac, &join(path, "rbac"))?,
        None => Config {
            rules: None,
            shadow: None,
            rules_prefix: String::new(),
            shadow_prefix: String::new(),
        },
    };
    Ok(Arc::new(cfg))
}
