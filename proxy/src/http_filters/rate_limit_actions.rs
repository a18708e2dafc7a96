//! Rate limit actions (`config.route.v3.RateLimit`): how a request becomes
//! descriptors, lists of (key, value) entries, for the local and the global
//! rate limit filters. Each `RateLimit` yields one descriptor when all its
//! actions produce an entry (an action may instead skip itself, or void
//! the whole descriptor), as Envoy's `RateLimitPolicyEntryImpl`.

use crate::config::matcher::{HeaderMatcher, Pseudo, QueryMatcher};
use crate::config::{index, join, ConfigError, Result, Wrapped};
use crate::registry::MessageSupport;
use legate_proto::envoy_types::pb::envoy::config::route::v3 as pb;
use std::net::{IpAddr, SocketAddr};

pub static REGISTRY: &[MessageSupport] = &[
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit",
        supported: &[
            "stage",
            "disable_key",
            "actions",
            "hits_addend",
            "apply_on_stream_done",
            "x_ratelimit_option",
            "limit",
        ],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit.HitsAddend",
        supported: &["number", "format", "is_negative_hits"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit.Override",
        supported: &["dynamic_metadata", "rate_limit"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit.Override.DynamicMetadata",
        supported: &["metadata_key"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.type.metadata.v3.MetadataKey",
        supported: &["key", "path"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.type.metadata.v3.MetadataKey.PathSegment",
        supported: &["key"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit.Override.RateLimitOverride",
        supported: &["requests_per_unit", "unit"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit.Action",
        supported: &[
            "source_cluster",
            "destination_cluster",
            "request_headers",
            "query_parameters",
            "remote_address",
            "generic_key",
            "header_value_match",
            "masked_remote_address",
            "query_parameter_value_match",
            "remote_address_match",
        ],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit.Action.RemoteAddressMatch",
        supported: &[
            "descriptor_value",
            "descriptor_key",
            "default_value",
            "address_matcher",
        ],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.type.matcher.v3.AddressMatcher",
        supported: &["ranges", "invert_match"],
        warn: &[],
    },
    MessageSupport {
        message: "xds.core.v3.CidrRange",
        supported: &["address_prefix", "prefix_len"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit.Action.SourceCluster",
        supported: &[],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit.Action.DestinationCluster",
        supported: &[],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit.Action.RequestHeaders",
        supported: &["header_name", "descriptor_key", "skip_if_absent"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit.Action.QueryParameters",
        supported: &["query_parameter_name", "descriptor_key", "skip_if_absent"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit.Action.RemoteAddress",
        supported: &[],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit.Action.MaskedRemoteAddress",
        supported: &["v4_prefix_mask_len", "v6_prefix_mask_len"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit.Action.GenericKey",
        supported: &["descriptor_value", "default_value", "descriptor_key"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit.Action.HeaderValueMatch",
        supported: &[
            "descriptor_value",
            "default_value",
            "descriptor_key",
            "expect_match",
            "headers",
        ],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.config.route.v3.RateLimit.Action.QueryParameterValueMatch",
        supported: &[
            "descriptor_value",
            "default_value",
            "descriptor_key",
            "expect_match",
            "query_parameters",
        ],
        warn: &[],
    },
];

/// One descriptor: its entries in order.
pub type Descriptor = Vec<(String, String)>;

#[derive(Debug)]
enum Action {
    SourceCluster,
    DestinationCluster,
    RequestHeader {
        name: http::HeaderName,
        key: String,
        skip_if_absent: bool,
    },
    QueryParameter {
        name: String,
        key: String,
        skip_if_absent: bool,
    },
    RemoteAddress,
    MaskedRemoteAddress {
        v4: u8,
        v6: u8,
    },
    GenericKey {
        key: String,
        value: String,
    },
    HeaderValueMatch {
        key: String,
        value: String,
        default: String,
        expect: bool,
        headers: Vec<HeaderMatcher>,
    },
    QueryValueMatch {
        key: String,
        value: String,
        default: String,
        expect: bool,
        params: Vec<QueryMatcher>,
    },
    RemoteAddressMatch {
        key: String,
        value: String,
        default: String,
        ranges: Vec<crate::config::filter_chain::Cidr>,
        invert: bool,
    },
}

/// One `RateLimit`: a stage, and actions making one descriptor.
#[derive(Debug)]
pub struct RateLimit {
    pub stage: u32,
    /// Envoy's filters skip entries that have a `disable_key`.
    pub disable_key: String,
    actions: Vec<Action>,
    /// What only the global filter's own lists may add (its filter config
    /// and `RateLimitPerRoute`); default elsewhere.
    pub extras: Extras,
}

/// `hits_addend`, `apply_on_stream_done`, `x_ratelimit_option` and
/// `limit`: read by the global rate limit filter only.
#[derive(Debug, Default)]
pub struct Extras {
    pub hits_addend: Option<HitsAddend>,
    pub negative_hits: bool,
    /// Sent when the stream ends, fire and forget, never enforced.
    pub on_stream_done: bool,
    pub x_ratelimit: XRateLimit,
    pub limit: Option<LimitOverride>,
}

/// How many hits a descriptor counts for.
#[derive(Debug)]
pub enum HitsAddend {
    Number(u64),
    /// `%DYNAMIC_METADATA(namespace:key...)%`, read from the request's
    /// dynamic metadata.
    Metadata(String, Vec<String>),
    /// Any other single command of the access log format.
    Format(crate::access_log::Format),
}

/// Envoy's largest hits addend.
const MAX_HITS: u64 = 1_000_000_000;

/// A descriptor's own choice about the `x-ratelimit-*` headers.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub enum XRateLimit {
    /// The filter's `enable_x_ratelimit_headers` decides.
    #[default]
    Inherit,
    Off,
    DraftVersion03,
}

/// A limit the descriptor asks the service to use instead of its own.
#[derive(Debug)]
pub enum LimitOverride {
    /// (requests per unit, `RateLimitUnit`).
    Static(u32, i32),
    /// A struct `{requests_per_unit: number, unit: "HOUR"}` at this
    /// dynamic metadata key and path.
    Metadata(String, Vec<String>),
}

impl Extras {
    fn from_proto(r: &pb::RateLimit, path: &str) -> Result<Self> {
        use pb::rate_limit::XRateLimitOption as X;
        let x_ratelimit = match X::try_from(r.x_ratelimit_option) {
            Ok(X::Off) => XRateLimit::Off,
            Ok(X::DraftVersion03) => XRateLimit::DraftVersion03,
            _ => XRateLimit::Inherit,
        };
        let (hits_addend, negative_hits) = match &r.hits_addend {
            Some(h) => (
                Some(HitsAddend::from_proto(h, &join(path, "hits_addend"))?),
                h.is_negative_hits,
            ),
            None => (None, false),
        };
        Ok(Self {
            hits_addend,
            negative_hits,
            on_stream_done: r.apply_on_stream_done,
            x_ratelimit,
            limit: r
                .limit
                .as_ref()
                .map(|l| LimitOverride::from_proto(l, &join(path, "limit")))
                .transpose()?,
        })
    }
}

impl HitsAddend {
    fn from_proto(h: &pb::rate_limit::HitsAddend, path: &str) -> Result<Self> {
        match (&h.number, h.format.as_str()) {
            (Some(n), "") if n.value <= MAX_HITS => Ok(Self::Number(n.value)),
            (Some(_), "") => Err(ConfigError::new(
                join(path, "number"),
                format!("must be at most {MAX_HITS}"),
            )),
            (None, f) if !f.is_empty() => Self::format(f, &join(path, "format")),
            _ => Err(ConfigError::new(
                path,
                "exactly one of number and format must be set",
            )),
        }
    }

    fn format(f: &str, path: &str) -> Result<Self> {
        let one = f.len() > 2
            && f.starts_with('%')
            && f.ends_with('%')
            && !f[1..f.len() - 1].contains('%');
        if !one {
            return Err(ConfigError::new(
                path,
                "must be exactly one substitution command, as %COMMAND%",
            ));
        }
        if let Some(arg) = f
            .strip_prefix("%DYNAMIC_METADATA(")
            .and_then(|r| r.strip_suffix(")%"))
        {
            let (ns, keys) = metadata_path(arg, path)?;
            return Ok(Self::Metadata(ns, keys));
        }
        crate::access_log::Format::parse(f, path).map(Self::Format)
    }

    /// The hits, or None when the value is not a number Envoy accepts
    /// (the descriptor is then left out, as Envoy leaves it out).
    pub fn value(
        &self,
        metadata: &crate::http_filters::Metadata,
        entry: &dyn Fn(&crate::access_log::Format) -> String,
    ) -> Option<u64> {
        let number = match self {
            Self::Number(n) => return Some(*n),
            Self::Metadata(ns, keys) => match metadata_value(metadata, ns, keys)? {
                serde_json::Value::Number(n) => n.as_f64()?,
                serde_json::Value::String(s) => s.trim().parse::<f64>().ok()?,
                _ => return None,
            },
            Self::Format(f) => entry(f).trim().parse::<f64>().ok()?,
        };
        // A number, truncated, in Envoy's range.
        (number.is_finite() && (0.0..=MAX_HITS as f64).contains(&number)).then_some(number as u64)
    }
}

impl LimitOverride {
    fn from_proto(o: &pb::rate_limit::Override, path: &str) -> Result<Self> {
        use pb::rate_limit::r#override::OverrideSpecifier as S;
        match &o.override_specifier {
            Some(S::RateLimit(r)) => Ok(Self::Static(r.requests_per_unit, r.unit)),
            Some(S::DynamicMetadata(d)) => {
                let k = d.metadata_key.as_ref().ok_or_else(|| {
                    ConfigError::new(
                        join(path, "dynamic_metadata.metadata_key"),
                        "metadata_key is required",
                    )
                })?;
                use legate_proto::envoy_types::pb::envoy::r#type::metadata::v3::metadata_key::path_segment::Segment;
                let keys = k
                    .path
                    .iter()
                    .enumerate()
                    .map(|(i, s)| match &s.segment {
                        Some(Segment::Key(k)) => Ok(k.clone()),
                        _ => Err(ConfigError::new(
                            index(&join(path, "dynamic_metadata.metadata_key"), "path", i),
                            "only key segments are supported",
                        )),
                    })
                    .collect::<Result<_>>()?;
                Ok(Self::Metadata(k.key.clone(), keys))
            }
            None => Err(ConfigError::new(path, "an override is required")),
        }
    }

    /// (requests per unit, unit), if the override resolves: Envoy reads a
    /// struct whose `requests_per_unit` is a number and whose `unit` names
    /// a `RateLimitUnit`, and provides no override otherwise.
    pub fn value(&self, metadata: &crate::http_filters::Metadata) -> Option<(u32, i32)> {
        match self {
            Self::Static(n, u) => Some((*n, *u)),
            Self::Metadata(ns, keys) => {
                let v = metadata_value(metadata, ns, keys)?.as_object()?;
                let n = v.get("requests_per_unit")?.as_f64()?;
                let unit = v.get("unit")?.as_str()?;
                let unit =
                    legate_proto::envoy_types::pb::envoy::r#type::v3::RateLimitUnit::from_str_name(
                        unit,
                    )?;
                Some((n as u32, unit as i32))
            }
        }
    }
}

/// `namespace:key:key...` of `%DYNAMIC_METADATA(...)%`.
fn metadata_path(arg: &str, path: &str) -> Result<(String, Vec<String>)> {
    let mut parts = arg.split(':');
    let ns = parts.next().unwrap_or_default().to_string();
    if ns.is_empty() || arg.contains(')') {
        return Err(ConfigError::new(
            path,
            format!("'{arg}' is not a metadata namespace and path"),
        ));
    }
    Ok((ns, parts.map(str::to_string).collect()))
}

fn metadata_value<'m>(
    metadata: &'m crate::http_filters::Metadata,
    ns: &str,
    keys: &[String],
) -> Option<&'m serde_json::Value> {
    let mut v = metadata.get(ns)?;
    for k in keys {
        v = v.as_object()?.get(k)?;
    }
    Some(v)
}

/// What the actions read from a request.
pub struct RequestFacts<'a> {
    pub headers: &'a http::HeaderMap,
    pub pseudo: Pseudo<'a>,
    /// The path with its query.
    pub path_and_query: &'a str,
    /// The trusted client address.
    pub remote: Option<SocketAddr>,
    /// The route's upstream cluster.
    pub cluster: &'a str,
    /// This proxy's service cluster (`node.cluster`).
    pub local_cluster: &'a str,
}

/// A route's, a virtual host's or the local filter's list: no [`Extras`].
pub fn list(rls: &[pb::RateLimit], path: &str, field: &str) -> Result<Vec<RateLimit>> {
    rls.iter()
        .enumerate()
        .map(|(i, r)| RateLimit::from_proto(r, &index(path, field, i)))
        .collect()
}

/// The global filter's own list (its config or `RateLimitPerRoute`),
/// where Envoy reads the [`Extras`].
pub fn global_list(rls: &[pb::RateLimit], path: &str, field: &str) -> Result<Vec<RateLimit>> {
    rls.iter()
        .enumerate()
        .map(|(i, r)| {
            let path = index(path, field, i);
            // Envoy refuses these in a filter's own lists (and applies the
            // entries whatever the filter's stage).
            if r.stage.is_some() || !r.disable_key.is_empty() {
                let f = if r.stage.is_some() {
                    "stage"
                } else {
                    "disable_key"
                };
                return Err(ConfigError::new(
                    join(&path, f),
                    "'stage' field and 'disable_key' field are not supported here (as in Envoy)",
                ));
            }
            let mut rl = RateLimit::from_proto(&strip_extras(r), &path)?;
            rl.extras = Extras::from_proto(r, &path)?;
            Ok(rl)
        })
        .collect()
}

/// The local filter's own `rate_limits`: the [`Extras`] but `limit`,
/// which Envoy refuses there.
pub fn local_list(rls: &[pb::RateLimit], path: &str, field: &str) -> Result<Vec<RateLimit>> {
    if let Some(i) = rls.iter().position(|r| r.limit.is_some()) {
        return Err(ConfigError::new(
            join(&index(path, field, i), "limit"),
            "a limit override is not supported by the local rate limit filter",
        ));
    }
    global_list(rls, path, field)
}

/// A descriptor with what its entry's [`Extras`] made of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Produced {
    pub entries: Descriptor,
    pub hits: Option<u64>,
    pub negative_hits: bool,
    pub x_ratelimit: XRateLimit,
    /// (requests per unit, `RateLimitUnit`).
    pub limit: Option<(u32, i32)>,
}

impl Produced {
    /// A descriptor from a list without [`Extras`].
    pub fn plain(entries: Descriptor) -> Self {
        Self {
            entries,
            hits: None,
            negative_hits: false,
            x_ratelimit: XRateLimit::Inherit,
            limit: None,
        }
    }
}

/// What the [`Extras`] read besides the request: its dynamic metadata, and
/// the stream as an access log format sees it.
pub struct ExtrasContext<'a> {
    pub metadata: &'a crate::http_filters::Metadata,
    pub render: &'a dyn Fn(&crate::access_log::Format) -> String,
}

fn strip_extras(r: &pb::RateLimit) -> pb::RateLimit {
    pb::RateLimit {
        limit: None,
        hits_addend: None,
        apply_on_stream_done: false,
        x_ratelimit_option: 0,
        ..r.clone()
    }
}

impl RateLimit {
    pub fn from_proto(r: &pb::RateLimit, path: &str) -> Result<Self> {
        // Envoy reads these only in the global filter's own lists.
        for (set, field) in [
            (r.limit.is_some(), "limit"),
            (r.hits_addend.is_some(), "hits_addend"),
            (r.apply_on_stream_done, "apply_on_stream_done"),
            (r.x_ratelimit_option != 0, "x_ratelimit_option"),
        ] {
            if set {
                return Err(ConfigError::new(
                    join(path, field),
                    "not supported by Legate on route and virtual host rate limits (it is in the global rate limit filter's own rate_limits and RateLimitPerRoute)",
                ));
            }
        }
        let actions = r
            .actions
            .iter()
            .enumerate()
            .map(|(i, a)| action(a, &index(path, "actions", i)))
            .collect::<Result<_>>()?;
        Ok(Self {
            stage: r.stage.val().unwrap_or(0),
            disable_key: r.disable_key.clone(),
            actions,
            extras: Extras::default(),
        })
    }

    /// The descriptor with its extras resolved; None as for
    /// [`Self::descriptor`], or when the hits addend does not resolve to a
    /// number (Envoy then leaves the descriptor out).
    pub fn produce(&self, f: &RequestFacts, cx: &ExtrasContext) -> Option<Produced> {
        let entries = self.descriptor(f)?;
        let x = &self.extras;
        let hits = match &x.hits_addend {
            Some(h) => Some(h.value(cx.metadata, cx.render)?),
            None => None,
        };
        Some(Produced {
            entries,
            hits,
            negative_hits: x.negative_hits,
            x_ratelimit: x.x_ratelimit,
            limit: x.limit.as_ref().and_then(|l| l.value(cx.metadata)),
        })
    }

    /// The descriptor this entry makes for the request, if every action
    /// produced its entry (or skipped itself).
    pub fn descriptor(&self, f: &RequestFacts) -> Option<Descriptor> {
        let mut d = Vec::with_capacity(self.actions.len());
        for a in &self.actions {
            match a.entry(f) {
                Entry::Add(k, v) => d.push((k, v)),
                Entry::Skip => {}
                Entry::Void => return None,
            }
        }
        (!d.is_empty()).then_some(d)
    }
}

enum Entry {
    Add(String, String),
    /// This action adds nothing; the descriptor goes on.
    Skip,
    /// No descriptor for this entry.
    Void,
}

fn or(key: &str, default: &str) -> String {
    if key.is_empty() {
        default.to_string()
    } else {
        key.to_string()
    }
}

fn action(a: &pb::rate_limit::Action, path: &str) -> Result<Action> {
    use pb::rate_limit::action::ActionSpecifier as A;
    Ok(match &a.action_specifier {
        Some(A::SourceCluster(_)) => Action::SourceCluster,
        Some(A::DestinationCluster(_)) => Action::DestinationCluster,
        Some(A::RequestHeaders(h)) => Action::RequestHeader {
            name: crate::headers::header_name(
                &h.header_name,
                &join(path, "request_headers.header_name"),
            )?,
            key: h.descriptor_key.clone(),
            skip_if_absent: h.skip_if_absent,
        },
        Some(A::QueryParameters(q)) => Action::QueryParameter {
            name: q.query_parameter_name.clone(),
            key: q.descriptor_key.clone(),
            skip_if_absent: q.skip_if_absent,
        },
        Some(A::RemoteAddress(_)) => Action::RemoteAddress,
        Some(A::MaskedRemoteAddress(m)) => Action::MaskedRemoteAddress {
            v4: m.v4_prefix_mask_len.val().unwrap_or(32).min(32) as u8,
            v6: m.v6_prefix_mask_len.val().unwrap_or(128).min(128) as u8,
        },
        Some(A::GenericKey(g)) => Action::GenericKey {
            key: or(&g.descriptor_key, "generic_key"),
            value: g.descriptor_value.clone(),
        },
        Some(A::HeaderValueMatch(h)) => Action::HeaderValueMatch {
            key: or(&h.descriptor_key, "header_match"),
            value: h.descriptor_value.clone(),
            default: h.default_value.clone(),
            expect: h.expect_match.val().unwrap_or(true),
            headers: h
                .headers
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    HeaderMatcher::from_proto(
                        m,
                        &index(&join(path, "header_value_match"), "headers", i),
                    )
                })
                .collect::<Result<_>>()?,
        },
        Some(A::QueryParameterValueMatch(q)) => Action::QueryValueMatch {
            key: or(&q.descriptor_key, "query_match"),
            value: q.descriptor_value.clone(),
            default: q.default_value.clone(),
            expect: q.expect_match.val().unwrap_or(true),
            params: q
                .query_parameters
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    QueryMatcher::from_proto(
                        m,
                        &index(
                            &join(path, "query_parameter_value_match"),
                            "query_parameters",
                            i,
                        ),
                    )
                })
                .collect::<Result<_>>()?,
        },
        Some(A::RemoteAddressMatch(r)) => {
            let mp = join(path, "remote_address_match.address_matcher");
            let m = r
                .address_matcher
                .as_ref()
                .ok_or_else(|| ConfigError::new(&mp, "address_matcher is required"))?;
            let ranges = m
                .ranges
                .iter()
                .enumerate()
                .map(|(i, c)| xds_cidr(c, &index(&mp, "ranges", i)))
                .collect::<Result<_>>()?;
            Action::RemoteAddressMatch {
                key: or(&r.descriptor_key, "remote_address_match"),
                value: r.descriptor_value.clone(),
                default: r.default_value.clone(),
                ranges,
                invert: m.invert_match,
            }
        }
        Some(_) => {
            return Err(ConfigError::new(
                path,
                "this rate limit action is not supported yet (metadata and extensions)",
            ))
        }
        None => return Err(ConfigError::new(path, "an action is required")),
    })
}

/// The client's network, `a.b.c.0/24`.
fn masked(ip: IpAddr, v4: u8, v6: u8) -> String {
    match ip {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(v4)).unwrap_or(0);
            format!("{}/{v4}", std::net::Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(v6)).unwrap_or(0);
            format!("{}/{v6}", std::net::Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

impl Action {
    fn entry(&self, f: &RequestFacts) -> Entry {
        match self {
            Action::SourceCluster => Entry::Add("source_cluster".into(), f.local_cluster.into()),
            Action::DestinationCluster => {
                Entry::Add("destination_cluster".into(), f.cluster.into())
            }
            Action::RequestHeader {
                name,
                key,
                skip_if_absent,
            } => match f.headers.get(name).and_then(|v| v.to_str().ok()) {
                Some(v) => Entry::Add(key.clone(), v.to_string()),
                None if *skip_if_absent => Entry::Skip,
                None => Entry::Void,
            },
            Action::QueryParameter {
                name,
                key,
                skip_if_absent,
            } => match crate::routing::query_params(f.path_and_query)
                .into_iter()
                .find(|(k, _)| k == name)
            {
                Some((_, v)) => Entry::Add(key.clone(), v),
                None if *skip_if_absent => Entry::Skip,
                None => Entry::Void,
            },
            Action::RemoteAddress => match f.remote {
                Some(a) => Entry::Add("remote_address".into(), a.ip().to_string()),
                None => Entry::Void,
            },
            Action::MaskedRemoteAddress { v4, v6 } => match f.remote {
                Some(a) => Entry::Add("masked_remote_address".into(), masked(a.ip(), *v4, *v6)),
                None => Entry::Void,
            },
            Action::GenericKey { key, value } => Entry::Add(key.clone(), value.clone()),
            Action::HeaderValueMatch {
                key,
                value,
                default,
                expect,
                headers,
            } => {
                let hit = headers.iter().all(|m| m.matches_with(f.headers, &f.pseudo));
                matched(hit == *expect, key, value, default)
            }
            Action::RemoteAddressMatch {
                key,
                value,
                default,
                ranges,
                invert,
            } => {
                let inside = f
                    .remote
                    .is_some_and(|a| ranges.iter().any(|c| c.contains(a.ip())));
                matched(inside != *invert, key, value, default)
            }
            Action::QueryValueMatch {
                key,
                value,
                default,
                expect,
                params,
            } => {
                let q = crate::routing::query_params(f.path_and_query);
                let hit = params.iter().all(|m| m.matches(&q));
                matched(hit == *expect, key, value, default)
            }
        }
    }
}

/// An `xds.core.v3.CidrRange` as Legate's CIDR.
fn xds_cidr(
    c: &legate_proto::envoy_types::pb::xds::core::v3::CidrRange,
    path: &str,
) -> Result<crate::config::filter_chain::Cidr> {
    let core = legate_proto::envoy_types::pb::envoy::config::core::v3::CidrRange {
        address_prefix: c.address_prefix.clone(),
        prefix_len: c.prefix_len,
    };
    crate::config::filter_chain::Cidr::from_proto(&core, path)
}

fn matched(hit: bool, key: &str, value: &str, default: &str) -> Entry {
    if hit {
        Entry::Add(key.to_string(), value.to_string())
    } else if !default.is_empty() {
        Entry::Add(key.to_string(), default.to_string())
    } else {
        Entry::Void
    }
}

/// Which of the virtual host's `rate_limits` apply with the route's
/// (`vh_rate_limits` of the local filter).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum VhRateLimits {
    /// The virtual host's, only when the route has none.
    Override,
    Include,
    Ignore,
}

/// The descriptors of the entries in `list` at `stage`, skipping those
/// `skip` says to.
pub fn descriptors(
    list: &[RateLimit],
    stage: u32,
    facts: &RequestFacts,
    skip: &dyn Fn(&RateLimit) -> bool,
    out: &mut Vec<Descriptor>,
) {
    for r in list.iter().filter(|r| r.stage == stage && !skip(r)) {
        out.extend(r.descriptor(facts));
    }
}

/// The route's descriptors, then its virtual host's as `vh` says (a route
/// with `include_vh_rate_limits` always includes them).
pub fn route_descriptors(
    rq: &super::RequestInfo<'_>,
    stage: u32,
    vh: VhRateLimits,
    skip: &dyn Fn(&RateLimit) -> bool,
) -> Vec<Descriptor> {
    let facts = rq.rate_limit_facts();
    let mut out = Vec::new();
    descriptors(rq.route_rate_limits, stage, &facts, skip, &mut out);
    let vh = if rq.include_vh_rate_limits {
        VhRateLimits::Include
    } else {
        vh
    };
    let with_vhost = match vh {
        VhRateLimits::Include => true,
        VhRateLimits::Override => rq.route_rate_limits.is_empty(),
        VhRateLimits::Ignore => false,
    };
    if with_vhost {
        descriptors(rq.vhost_rate_limits, stage, &facts, skip, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_keep_the_network() {
        assert_eq!(
            masked("192.168.7.9".parse().unwrap(), 16, 128),
            "192.168.0.0/16"
        );
        assert_eq!(masked("192.168.7.9".parse().unwrap(), 0, 128), "0.0.0.0/0");
        assert_eq!(
            masked("2001:db8::1".parse().unwrap(), 32, 64),
            "2001:db8::/64"
        );
    }

    fn rate_limit(yaml: &str) -> pb::RateLimit {
        let v = legate_proto::json::parse_yaml(yaml).unwrap();
        let m = legate_proto::json::to_dynamic(v, "envoy.config.route.v3.RateLimit", true).unwrap();
        m.transcode_to().unwrap()
    }

    #[test]
    fn extras_are_read_only_in_the_global_filters_lists() {
        let r = rate_limit(
            "{actions: [{generic_key: {descriptor_value: g}}], hits_addend: {number: 3}}",
        );
        let e = RateLimit::from_proto(&r, "rl").unwrap_err();
        assert_eq!(e.path, "rl.hits_addend");
        let list = global_list(&[r], "f", "rate_limits").unwrap();
        assert!(matches!(
            list[0].extras.hits_addend,
            Some(HitsAddend::Number(3))
        ));
        let r = rate_limit("{actions: [{generic_key: {descriptor_value: g}}], limit: {rate_limit: {requests_per_unit: 1, unit: HOUR}}}");
        let e = local_list(&[r], "f", "rate_limits").unwrap_err();
        assert_eq!(e.path, "f.rate_limits[0].limit");
        let r = rate_limit("{actions: [{generic_key: {descriptor_value: g}}], hits_addend: {format: '%REQ(x)% and more'}}");
        assert!(global_list(&[r], "f", "rate_limits").is_err());
        // Envoy refuses a stage or disable key in a filter's own list.
        let r = rate_limit("{actions: [{generic_key: {descriptor_value: g}}], stage: 1}");
        let e = global_list(&[r], "f", "rate_limits").unwrap_err();
        assert_eq!(e.path, "f.rate_limits[0].stage");
    }

    #[test]
    fn hits_and_limits_resolve_from_metadata_or_leave_the_descriptor_out() {
        let list = global_list(
            &[rate_limit(
                "{actions: [{generic_key: {descriptor_value: g}}], hits_addend: {format: '%DYNAMIC_METADATA(ns:cost)%'}, limit: {dynamic_metadata: {metadata_key: {key: ns, path: [{key: rl}]}}}}",
            )],
            "f",
            "rate_limits",
        )
        .unwrap();
        let headers = http::HeaderMap::new();
        let facts = RequestFacts {
            headers: &headers,
            pseudo: Pseudo::default(),
            path_and_query: "/",
            remote: None,
            cluster: "c",
            local_cluster: "",
        };
        let produce = |md: serde_json::Value| {
            let md = md.as_object().unwrap().clone();
            let cx = ExtrasContext {
                metadata: &md,
                render: &|_| String::new(),
            };
            list[0].produce(&facts, &cx)
        };
        // No metadata: no number, so no descriptor.
        assert_eq!(produce(serde_json::json!({})), None);
        let p = produce(serde_json::json!({"ns": {"cost": 7, "rl": {"requests_per_unit": 4, "unit": "MINUTE"}}})).unwrap();
        assert_eq!(p.hits, Some(7));
        assert_eq!(p.limit, Some((4, 2)));
        // A string number counts; a bad unit gives no override.
        let p = produce(serde_json::json!({"ns": {"cost": "5", "rl": {"requests_per_unit": 4, "unit": "FORTNIGHT"}}})).unwrap();
        assert_eq!((p.hits, p.limit), (Some(5), None));
        assert_eq!(produce(serde_json::json!({"ns": {"cost": -1}})), None);
        // Fractions are truncated, as Envoy reads a double.
        let p = produce(serde_json::json!({"ns": {"cost": "2.5"}})).unwrap();
        assert_eq!(p.hits, Some(2));
        assert_eq!(
            produce(serde_json::json!({"ns": {"cost": 2_000_000_000u64}})),
            None
        );
    }

    #[test]
    fn a_missing_header_voids_the_descriptor_unless_skipped() {
        let v = legate_proto::json::parse_yaml(
            "{actions: [{generic_key: {descriptor_value: g}}, {request_headers: {header_name: x-user, descriptor_key: user}}, {request_headers: {header_name: x-opt, descriptor_key: opt, skip_if_absent: true}}]}",
        )
        .unwrap();
        let m = legate_proto::json::to_dynamic(v, "envoy.config.route.v3.RateLimit", true).unwrap();
        let r = RateLimit::from_proto(&m.transcode_to().unwrap(), "rl").unwrap();
        let mut h = http::HeaderMap::new();
        let facts = |h: &http::HeaderMap| -> Option<Descriptor> {
            r.descriptor(&RequestFacts {
                headers: h,
                pseudo: Pseudo::default(),
                path_and_query: "/",
                remote: None,
                cluster: "c",
                local_cluster: "",
            })
        };
        assert_eq!(facts(&h), None);
        h.insert("x-user", "u1".parse().unwrap());
        assert_eq!(
            facts(&h),
            Some(vec![
                ("generic_key".into(), "g".into()),
                ("user".into(), "u1".into())
            ])
        );
    }
}
