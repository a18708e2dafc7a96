//! The xDS unified matcher (`xds.type.matcher.v3.Matcher`) over a
//! request: a list of predicates on inputs (request headers, dynamic
//! metadata, addresses, the server name), the first that matches giving
//! its action, else `on_no_match`. Generic over the action, which each
//! user translates (RBAC's `Action`).
//!
//! Supported: `matcher_list` with `single_predicate` (a string
//! `value_match`, or the `Ip` and `Metadata` input matchers), `or_matcher`,
//! `and_matcher`, `not_matcher`; actions in `on_match` and `on_no_match`.
//! Nested matchers, `keep_matching` and `matcher_tree` are refused.

use super::filter_chain::Cidr;
use super::matcher::StringMatcher;
use super::{join, ConfigError, Result};
use legate_proto::envoy_types::pb::envoy::extensions::matching::common_inputs::network::v3 as inputs;
use legate_proto::envoy_types::pb::envoy::extensions::matching::input_matchers::{
    ip::v3 as ip, metadata::v3 as md,
};
use legate_proto::envoy_types::pb::envoy::r#type::matcher::v3 as em;
use legate_proto::envoy_types::pb::xds::core::v3::TypedExtensionConfig;
use legate_proto::envoy_types::pb::xds::r#type::matcher::v3 as xm;
use serde_json::Value;
use std::net::{IpAddr, SocketAddr};

/// What inputs read: one request and its connection.
pub struct Data<'a> {
    pub headers: &'a http::HeaderMap,
    /// `:method`, `:path`, `:authority`, `:scheme`.
    pub pseudo: super::matcher::Pseudo<'a>,
    pub metadata: &'a serde_json::Map<String, Value>,
    /// The trusted client address (XFF-derived when configured).
    pub remote: Option<SocketAddr>,
    pub direct_remote: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub sni: &'a str,
    /// The response, for matchers that run on it (custom_response's).
    pub response: Option<ResponseData<'a>>,
}

/// What response inputs read.
#[derive(Clone, Copy)]
pub struct ResponseData<'a> {
    pub status: u16,
    pub headers: &'a http::HeaderMap,
    /// The response is Envoy's own (a local reply).
    pub local_reply: bool,
}

#[derive(Debug)]
enum Input {
    Header(http::HeaderName),
    /// A pseudo-header: `:method`, `:path`, `:authority` or `:scheme`.
    Pseudo(&'static str),
    Metadata {
        filter: String,
        path: Vec<String>,
    },
    SourceIp,
    SourcePort,
    DirectSourceIp,
    DestinationIp,
    DestinationPort,
    ServerName,
    ResponseStatus,
    ResponseStatusClass,
    ResponseHeader(http::HeaderName),
    ResponseLocalReply,
}

/// An input's value: a string, metadata (None: no value at the path), or
/// nothing.
enum Datum<'a> {
    None,
    Str(String),
    Metadata(Option<&'a Value>),
}

#[derive(Debug)]
enum InputMatcher {
    String(StringMatcher),
    Ip(Vec<Cidr>),
    Metadata { value: ValueMatcher, invert: bool },
}

#[derive(Debug)]
enum Predicate {
    Single(Input, InputMatcher),
    /// A `CelMatcher` over `HttpAttributesCelMatchInput`: the request's
    /// attributes, matched when the expression is `true`.
    Cel(crate::cel::Expression),
    Or(Vec<Predicate>),
    And(Vec<Predicate>),
    Not(Box<Predicate>),
}

/// A matcher: the first field matcher whose predicate holds gives its
/// action; else `on_no_match` (None: no action).
#[derive(Debug)]
pub struct Matcher<A> {
    list: Vec<(Predicate, A)>,
    on_no_match: Option<A>,
}

/// Translates an action's `TypedExtensionConfig`.
pub type ActionFn<A> = dyn Fn(&TypedExtensionConfig, &str) -> Result<A>;

/// Where a matcher runs, which decides the inputs it may read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Domain {
    /// An HTTP request and its connection.
    Http,
    /// A UDP session: only its addresses (Envoy's UDP proxy registers the
    /// source and destination IP and port inputs, nothing else).
    Udp,
    /// A connection (network filters): its addresses and server name, no
    /// request.
    Network,
    /// An HTTP response, its request and its connection.
    HttpResponse,
}

impl<A> Matcher<A> {
    pub fn from_proto(m: &xm::Matcher, path: &str, action: &ActionFn<A>) -> Result<Self> {
        Self::from_proto_in(m, path, action, Domain::Http)
    }

    pub fn from_proto_in(
        m: &xm::Matcher,
        path: &str,
        action: &ActionFn<A>,
        domain: Domain,
    ) -> Result<Self> {
        use xm::matcher::MatcherType as T;
        let list = match &m.matcher_type {
            Some(T::MatcherList(l)) => l
                .matchers
                .iter()
                .enumerate()
                .map(|(i, fm)| {
                    let p = format!("{path}.matcher_list.matchers[{i}]");
                    let pred = fm.predicate.as_ref().ok_or_else(|| {
                        ConfigError::new(join(&p, "predicate"), "predicate is required")
                    })?;
                    Ok((
                        Predicate::from_proto(pred, &join(&p, "predicate"), domain)?,
                        on_match(fm.on_match.as_ref(), &join(&p, "on_match"), action)?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?,
            Some(T::MatcherTree(_)) => {
                return Err(ConfigError::new(
                    join(path, "matcher_tree"),
                    "not supported by Legate yet; use matcher_list",
                ))
            }
            None => Vec::new(),
        };
        let on_no_match = m
            .on_no_match
            .as_ref()
            .map(|o| on_match(Some(o), &join(path, "on_no_match"), action))
            .transpose()?;
        Ok(Matcher { list, on_no_match })
    }

    /// A matcher that always gives `action` (a deprecated single-target
    /// field expressed as `on_no_match`, as Envoy translates it).
    pub fn always(action: A) -> Self {
        Matcher {
            list: Vec::new(),
            on_no_match: Some(action),
        }
    }

    /// Every action it can give.
    pub fn actions(&self) -> impl Iterator<Item = &A> {
        self.list.iter().map(|(_, a)| a).chain(&self.on_no_match)
    }

    /// The action for `d`, if any.
    pub fn evaluate(&self, d: &Data<'_>) -> Option<&A> {
        self.list
            .iter()
            .find(|(p, _)| p.matches(d))
            .map(|(_, a)| a)
            .or(self.on_no_match.as_ref())
    }
}

fn on_match<A>(o: Option<&xm::matcher::OnMatch>, path: &str, action: &ActionFn<A>) -> Result<A> {
    use xm::matcher::on_match::OnMatch as O;
    let o = o.ok_or_else(|| ConfigError::new(path, "on_match is required"))?;
    if o.keep_matching {
        return Err(ConfigError::new(
            join(path, "keep_matching"),
            "not supported by Legate yet",
        ));
    }
    match &o.on_match {
        Some(O::Action(a)) => action(a, &join(path, "action")),
        Some(O::Matcher(_)) => Err(ConfigError::new(
            join(path, "matcher"),
            "nested matchers are not supported by Legate yet",
        )),
        None => Err(ConfigError::new(path, "an action is required")),
    }
}

/// The `Any` inside a typed extension config, decoded as `M` when its type
/// is `name`.
fn typed<M: prost::Message + Default>(
    t: &TypedExtensionConfig,
    name: &str,
    path: &str,
) -> Option<Result<M>> {
    let a = t.typed_config.as_ref()?;
    (legate_proto::type_name(&a.type_url) == name).then(|| {
        M::decode(a.value.as_slice())
            .map_err(|e| ConfigError::new(join(path, "typed_config"), e.to_string()))
    })
}

fn type_of(t: &TypedExtensionConfig) -> &str {
    t.typed_config
        .as_ref()
        .map_or("", |a| legate_proto::type_name(&a.type_url))
}

impl Input {
    fn from_proto(t: &TypedExtensionConfig, path: &str, domain: Domain) -> Result<Input> {
        let input = Self::any_domain(t, path)?;
        if domain == Domain::Network && !(input.addressing() || input.connection()) {
            return Err(ConfigError::new(
                join(path, "typed_config"),
                format!(
                    "input {} cannot be read by a network filter (no request)",
                    type_of(t)
                ),
            ));
        }
        if domain != Domain::HttpResponse && input.response() {
            return Err(ConfigError::new(
                join(path, "typed_config"),
                format!(
                    "input {} reads a response, which this matcher does not see",
                    type_of(t)
                ),
            ));
        }
        if domain == Domain::Udp && !input.addressing() {
            return Err(ConfigError::new(
                join(path, "typed_config"),
                format!(
                    "input {} cannot be read in a UDP session (only the source and destination IP and port)",
                    type_of(t)
                ),
            ));
        }
        Ok(input)
    }

    fn response(&self) -> bool {
        matches!(
            self,
            Input::ResponseStatus
                | Input::ResponseStatusClass
                | Input::ResponseHeader(_)
                | Input::ResponseLocalReply
        )
    }

    /// What a connection has besides its addresses.
    fn connection(&self) -> bool {
        matches!(self, Input::DirectSourceIp | Input::ServerName)
    }

    /// The session's own addresses, which a UDP datagram has too.
    fn addressing(&self) -> bool {
        matches!(
            self,
            Input::SourceIp | Input::SourcePort | Input::DestinationIp | Input::DestinationPort
        )
    }

    fn any_domain(t: &TypedExtensionConfig, path: &str) -> Result<Input> {
        let tn = type_of(t);
        if let Some(h) = typed::<em::HttpRequestHeaderMatchInput>(
            t,
            "envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
            path,
        ) {
            let h = h?;
            let lower = h.header_name.to_ascii_lowercase();
            if let Some(p) = [":method", ":path", ":authority", ":scheme"]
                .into_iter()
                .find(|p| *p == lower)
            {
                return Ok(Input::Pseudo(p));
            }
            return Ok(Input::Header(crate::headers::header_name(
                &h.header_name,
                &join(path, "typed_config.header_name"),
            )?));
        }
        if let Some(m) = typed::<inputs::DynamicMetadataInput>(
            t,
            "envoy.extensions.matching.common_inputs.network.v3.DynamicMetadataInput",
            path,
        ) {
            let m = m?;
            use inputs::dynamic_metadata_input::path_segment::Segment;
            return Ok(Input::Metadata {
                filter: m.filter.clone(),
                path: m
                    .path
                    .iter()
                    .filter_map(|s| s.segment.as_ref().map(|Segment::Key(k)| k.clone()))
                    .collect(),
            });
        }
        if let Some(h) = typed::<em::HttpResponseHeaderMatchInput>(
            t,
            "envoy.type.matcher.v3.HttpResponseHeaderMatchInput",
            path,
        ) {
            return Ok(Input::ResponseHeader(crate::headers::header_name(
                &h?.header_name,
                &join(path, "typed_config.header_name"),
            )?));
        }
        match tn {
            "envoy.type.matcher.v3.HttpResponseStatusCodeMatchInput" => {
                return Ok(Input::ResponseStatus)
            }
            "envoy.type.matcher.v3.HttpResponseStatusCodeClassMatchInput" => {
                return Ok(Input::ResponseStatusClass)
            }
            "envoy.type.matcher.v3.HttpResponseLocalReplyMatchInput" => {
                return Ok(Input::ResponseLocalReply)
            }
            _ => {}
        }
        const NET: &str = "envoy.extensions.matching.common_inputs.network.v3.";
        Ok(match tn.strip_prefix(NET) {
            Some("SourceIPInput") => Input::SourceIp,
            Some("SourcePortInput") => Input::SourcePort,
            Some("DirectSourceIPInput") => Input::DirectSourceIp,
            Some("DestinationIPInput") => Input::DestinationIp,
            Some("DestinationPortInput") => Input::DestinationPort,
            Some("ServerNameInput") => Input::ServerName,
            _ => {
                return Err(ConfigError::new(
                    join(path, "typed_config"),
                    format!("input {tn} is not supported by Legate"),
                ))
            }
        })
    }

    fn read<'a>(&self, d: &Data<'a>) -> Datum<'a> {
        let ip = |a: Option<SocketAddr>| a.map_or(Datum::None, |a| Datum::Str(a.ip().to_string()));
        let port =
            |a: Option<SocketAddr>| a.map_or(Datum::None, |a| Datum::Str(a.port().to_string()));
        match self {
            Input::Header(h) => {
                let values: Vec<&str> = d
                    .headers
                    .get_all(h)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                if values.is_empty() {
                    Datum::None
                } else {
                    Datum::Str(values.join(","))
                }
            }
            Input::Pseudo(p) => {
                let v = match *p {
                    ":method" => d.pseudo.method,
                    ":path" => d.pseudo.path,
                    ":authority" => d.pseudo.authority,
                    _ => d.pseudo.scheme,
                };
                if v.is_empty() {
                    Datum::None
                } else {
                    Datum::Str(v.to_string())
                }
            }
            Input::Metadata { filter, path } => {
                let mut v = d.metadata.get(filter);
                for k in path {
                    v = v.and_then(|x| x.as_object()).and_then(|o| o.get(k));
                }
                Datum::Metadata(v)
            }
            Input::SourceIp => ip(d.remote),
            Input::SourcePort => port(d.remote),
            Input::DirectSourceIp => ip(d.direct_remote),
            Input::DestinationIp => ip(d.local),
            Input::DestinationPort => port(d.local),
            Input::ServerName if d.sni.is_empty() => Datum::None,
            Input::ServerName => Datum::Str(d.sni.to_string()),
            Input::ResponseStatus => d
                .response
                .map_or(Datum::None, |r| Datum::Str(r.status.to_string())),
            Input::ResponseStatusClass => d
                .response
                .map_or(Datum::None, |r| Datum::Str(format!("{}xx", r.status / 100))),
            Input::ResponseLocalReply => d
                .response
                .map_or(Datum::None, |r| Datum::Str(r.local_reply.to_string())),
            Input::ResponseHeader(h) => {
                let values: Vec<&str> = d
                    .response
                    .map(|r| {
                        r.headers
                            .get_all(h)
                            .iter()
                            .filter_map(|v| v.to_str().ok())
                            .collect()
                    })
                    .unwrap_or_default();
                if values.is_empty() {
                    Datum::None
                } else {
                    Datum::Str(values.join(","))
                }
            }
        }
    }
}

impl InputMatcher {
    fn custom(t: &TypedExtensionConfig, path: &str) -> Result<InputMatcher> {
        if let Some(m) =
            typed::<ip::Ip>(t, "envoy.extensions.matching.input_matchers.ip.v3.Ip", path)
        {
            let m = m?;
            let cidrs = m
                .cidr_ranges
                .iter()
                .enumerate()
                .map(|(i, c)| Cidr::from_proto(c, &format!("{path}.typed_config.cidr_ranges[{i}]")))
                .collect::<Result<Vec<_>>>()?;
            return Ok(InputMatcher::Ip(cidrs));
        }
        if let Some(m) = typed::<md::Metadata>(
            t,
            "envoy.extensions.matching.input_matchers.metadata.v3.Metadata",
            path,
        ) {
            let m = m?;
            let vp = join(path, "typed_config.value");
            let value = m
                .value
                .as_ref()
                .ok_or_else(|| ConfigError::new(&vp, "value is required"))?;
            return Ok(InputMatcher::Metadata {
                value: ValueMatcher::from_proto(value, &vp)?,
                invert: m.invert,
            });
        }
        Err(ConfigError::new(
            join(path, "typed_config"),
            format!("input matcher {} is not supported by Legate", type_of(t)),
        ))
    }

    fn matches(&self, d: Datum<'_>) -> bool {
        match (self, d) {
            (InputMatcher::String(m), Datum::Str(s)) => m.matches(&s),
            (InputMatcher::Ip(cidrs), Datum::Str(s)) => s
                .parse::<IpAddr>()
                .is_ok_and(|ip| cidrs.iter().any(|c| c.contains(ip))),
            (InputMatcher::Metadata { value, invert }, Datum::Metadata(v)) => {
                value.matches(v) != *invert
            }
            _ => false,
        }
    }
}

const CEL_INPUT: &str = "xds.type.matcher.v3.HttpAttributesCelMatchInput";
const CEL_MATCHER: &str = "xds.type.matcher.v3.CelMatcher";

/// `xds.type.matcher.v3.CelMatcher`, which no crate generates: its field
/// numbers are the wire format's.
#[derive(Clone, PartialEq, prost::Message)]
struct CelMatcher {
    #[prost(message, optional, tag = "1")]
    expr_match: Option<legate_proto::envoy_types::pb::xds::r#type::v3::CelExpression>,
}

/// The CEL predicate of a single predicate, when its input is the HTTP
/// attributes (which only a CEL matcher can read, as in Envoy).
fn cel_predicate(
    input: &TypedExtensionConfig,
    matcher: Option<&xm::matcher::matcher_list::predicate::single_predicate::Matcher>,
    path: &str,
    domain: Domain,
) -> Result<Option<Predicate>> {
    use xm::matcher::matcher_list::predicate::single_predicate::Matcher as SM;
    let custom = match matcher {
        Some(SM::CustomMatch(c)) if type_of(c) == CEL_MATCHER => Some(c),
        _ => None,
    };
    match (type_of(input) == CEL_INPUT, custom) {
        (false, None) => Ok(None),
        (true, Some(c)) if domain == Domain::Http => {
            let p = join(path, "custom_match.typed_config");
            let m: CelMatcher = typed(c, CEL_MATCHER, &join(path, "custom_match"))
                .expect("the type was checked")?;
            let e = m.expr_match.as_ref().ok_or_else(|| {
                ConfigError::new(join(&p, "expr_match"), "expr_match is required")
            })?;
            Ok(Some(Predicate::Cel(crate::cel::Expression::from_proto(
                e,
                &join(&p, "expr_match"),
            )?)))
        }
        (true, Some(_)) => Err(ConfigError::new(
            join(path, "input"),
            "the HTTP attributes input has no value on a network matcher",
        )),
        (true, None) => Err(ConfigError::new(
            join(path, "input"),
            "the HTTP attributes input can only be matched by a CelMatcher",
        )),
        (false, Some(_)) => Err(ConfigError::new(
            join(path, "custom_match"),
            "a CelMatcher needs the HttpAttributesCelMatchInput input",
        )),
    }
}

/// The CEL attributes of the request in flight that `d` describes. What a
/// matcher cannot know yet (upstream, route and cluster names) is absent,
/// so an expression reading it does not match.
pub(crate) fn cel_attributes(
    d: &Data<'_>,
    r: crate::cel::Root,
    spellings: Option<&[String]>,
) -> cel::objects::Value {
    use crate::cel::{address, headers, map, Root};
    match r {
        Root::Request => {
            // The request started just now, as far as a matcher can tell.
            // Its size is content-length, else the body bytes received so
            // far: none, while its headers are matched (as in Envoy).
            let now = chrono::Utc::now().fixed_offset();
            let mut v = vec![("time", cel::objects::Value::Timestamp(now))];
            crate::cel::request_line_and_headers(&d.pseudo, d.headers, spellings, &mut v);
            let length = d.headers.get(http::header::CONTENT_LENGTH);
            let n = length.and_then(|l| l.to_str().ok()?.parse::<i64>().ok());
            v.push(("size", cel::objects::Value::Int(n.unwrap_or(0))));
            map(v)
        }
        Root::Response => {
            let mut v = Vec::new();
            if let Some(resp) = &d.response {
                v.push(("code", cel::objects::Value::Int(resp.status.into())));
                if let Some(sp) = spellings {
                    v.push(("headers", headers(resp.headers, sp)));
                }
            }
            map(v)
        }
        Root::Source => address(d.remote),
        Root::Destination => address(d.local),
        Root::Connection => map(vec![("requested_server_name", crate::cel::s(d.sni))]),
        Root::Upstream | Root::Xds => map(Vec::new()),
    }
}

impl Predicate {
    fn from_proto(
        p: &xm::matcher::matcher_list::Predicate,
        path: &str,
        domain: Domain,
    ) -> Result<Predicate> {
        use xm::matcher::matcher_list::predicate::single_predicate::Matcher as SM;
        use xm::matcher::matcher_list::predicate::MatchType as T;
        let list = |l: &xm::matcher::matcher_list::predicate::PredicateList, f: &str| {
            l.predicate
                .iter()
                .enumerate()
                .map(|(i, q)| {
                    Predicate::from_proto(q, &format!("{path}.{f}.predicate[{i}]"), domain)
                })
                .collect::<Result<Vec<_>>>()
        };
        Ok(match &p.match_type {
            Some(T::SinglePredicate(s)) => {
                let sp = join(path, "single_predicate");
                let input = s
                    .input
                    .as_ref()
                    .ok_or_else(|| ConfigError::new(join(&sp, "input"), "input is required"))?;
                if let Some(cel) = cel_predicate(input, s.matcher.as_ref(), &sp, domain)? {
                    return Ok(cel);
                }
                let input = Input::from_proto(input, &join(&sp, "input"), domain)?;
                let m = match &s.matcher {
                    Some(SM::ValueMatch(v)) => {
                        // xDS's StringMatcher has Envoy's field numbers.
                        let e = <em::StringMatcher as prost::Message>::decode(
                            prost::Message::encode_to_vec(v).as_slice(),
                        )
                        .map_err(|e| ConfigError::new(join(&sp, "value_match"), e.to_string()))?;
                        InputMatcher::String(StringMatcher::from_proto(
                            &e,
                            &join(&sp, "value_match"),
                        )?)
                    }
                    Some(SM::CustomMatch(c)) => {
                        InputMatcher::custom(c, &join(&sp, "custom_match"))?
                    }
                    None => return Err(ConfigError::new(&sp, "a matcher is required")),
                };
                Predicate::Single(input, m)
            }
            Some(T::OrMatcher(l)) => Predicate::Or(list(l, "or_matcher")?),
            Some(T::AndMatcher(l)) => Predicate::And(list(l, "and_matcher")?),
            Some(T::NotMatcher(q)) => Predicate::Not(Box::new(Predicate::from_proto(
                q,
                &join(path, "not_matcher"),
                domain,
            )?)),
            None => return Err(ConfigError::new(path, "a match type is required")),
        })
    }

    fn matches(&self, d: &Data<'_>) -> bool {
        match self {
            Predicate::Single(input, m) => m.matches(input.read(d)),
            Predicate::Cel(e) => matches!(
                e.evaluate_at_request(d),
                Some(cel::objects::Value::Bool(true))
            ),
            Predicate::Or(l) => l.iter().any(|p| p.matches(d)),
            Predicate::And(l) => l.iter().all(|p| p.matches(d)),
            Predicate::Not(p) => !p.matches(d),
        }
    }
}

/// Envoy's `ValueMatcher` over a metadata value (None: nothing there).
#[derive(Debug)]
enum ValueMatcher {
    Null,
    Double(DoubleMatch),
    String(StringMatcher),
    Bool(bool),
    Present(bool),
    ListOneOf(Box<ValueMatcher>),
    Or(Vec<ValueMatcher>),
}

#[derive(Debug)]
enum DoubleMatch {
    /// [start, end)
    Range(f64, f64),
    Exact(f64),
}

impl ValueMatcher {
    fn from_proto(v: &em::ValueMatcher, path: &str) -> Result<ValueMatcher> {
        use em::value_matcher::MatchPattern as P;
        Ok(match &v.match_pattern {
            Some(P::NullMatch(_)) => ValueMatcher::Null,
            Some(P::DoubleMatch(d)) => {
                use em::double_matcher::MatchPattern as D;
                ValueMatcher::Double(match &d.match_pattern {
                    Some(D::Range(r)) => DoubleMatch::Range(r.start, r.end),
                    Some(D::Exact(x)) => DoubleMatch::Exact(*x),
                    None => {
                        return Err(ConfigError::new(
                            join(path, "double_match"),
                            "a pattern is required",
                        ))
                    }
                })
            }
            Some(P::StringMatch(s)) => {
                ValueMatcher::String(StringMatcher::from_proto(s, &join(path, "string_match"))?)
            }
            Some(P::BoolMatch(b)) => ValueMatcher::Bool(*b),
            Some(P::PresentMatch(b)) => ValueMatcher::Present(*b),
            Some(P::ListMatch(l)) => {
                let lp = join(path, "list_match");
                match &l.match_pattern {
                    Some(em::list_matcher::MatchPattern::OneOf(o)) => ValueMatcher::ListOneOf(
                        Box::new(ValueMatcher::from_proto(o, &join(&lp, "one_of"))?),
                    ),
                    None => return Err(ConfigError::new(&lp, "one_of is required")),
                }
            }
            Some(P::OrMatch(o)) => ValueMatcher::Or(
                o.value_matchers
                    .iter()
                    .enumerate()
                    .map(|(i, m)| {
                        ValueMatcher::from_proto(m, &format!("{path}.or_match.value_matchers[{i}]"))
                    })
                    .collect::<Result<_>>()?,
            ),
            None => return Err(ConfigError::new(path, "a match pattern is required")),
        })
    }

    fn matches(&self, v: Option<&Value>) -> bool {
        match (self, v) {
            (ValueMatcher::Null, Some(Value::Null)) => true,
            (ValueMatcher::Double(DoubleMatch::Range(s, e)), Some(Value::Number(n))) => {
                n.as_f64().is_some_and(|x| *s <= x && x < *e)
            }
            (ValueMatcher::Double(DoubleMatch::Exact(x)), Some(Value::Number(n))) => {
                n.as_f64() == Some(*x)
            }
            (ValueMatcher::String(m), Some(Value::String(s))) => m.matches(s),
            (ValueMatcher::Bool(b), Some(Value::Bool(x))) => b == x,
            (ValueMatcher::Present(p), v) => *p && v.is_some(),
            (ValueMatcher::ListOneOf(m), Some(Value::Array(items))) => {
                items.iter().any(|i| m.matches(Some(i)))
            }
            (ValueMatcher::Or(ms), v) => ms.iter().any(|m| m.matches(v)),
            _ => false,
        }
    }
}

use crate::registry::MessageSupport;

const XM: &str = "xds.type.matcher.v3.Matcher";

/// The matcher's messages, for [`crate::registry`].
pub static REGISTRY: &[MessageSupport] = &[
    MessageSupport {
        message: "xds.core.v3.TypedExtensionConfig",
        supported: &["name", "typed_config"],
        warn: &[],
    },
    MessageSupport {
        message: XM,
        supported: &["matcher_list", "on_no_match"],
        warn: &[],
    },
    MessageSupport {
        message: "xds.type.matcher.v3.Matcher.OnMatch",
        supported: &["action"],
        warn: &[],
    },
    MessageSupport {
        message: "xds.type.matcher.v3.Matcher.MatcherList",
        supported: &["matchers"],
        warn: &[],
    },
    MessageSupport {
        message: "xds.type.matcher.v3.Matcher.MatcherList.FieldMatcher",
        supported: &["predicate", "on_match"],
        warn: &[],
    },
    MessageSupport {
        message: "xds.type.matcher.v3.Matcher.MatcherList.Predicate",
        supported: &[
            "single_predicate",
            "or_matcher",
            "and_matcher",
            "not_matcher",
        ],
        warn: &[],
    },
    MessageSupport {
        message: "xds.type.matcher.v3.Matcher.MatcherList.Predicate.SinglePredicate",
        supported: &["input", "value_match", "custom_match"],
        warn: &[],
    },
    MessageSupport {
        message: "xds.type.matcher.v3.Matcher.MatcherList.Predicate.PredicateList",
        supported: &["predicate"],
        warn: &[],
    },
    MessageSupport {
        message: "xds.type.matcher.v3.StringMatcher",
        supported: &[
            "exact",
            "prefix",
            "suffix",
            "safe_regex",
            "contains",
            "ignore_case",
        ],
        warn: &[],
    },
    MessageSupport {
        message: "xds.type.matcher.v3.RegexMatcher",
        supported: &["regex", "google_re2"],
        warn: &[],
    },
    MessageSupport {
        message: "xds.type.matcher.v3.RegexMatcher.GoogleRE2",
        supported: &[],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.matching.common_inputs.network.v3.DynamicMetadataInput",
        supported: &["filter", "path"],
        warn: &[],
    },
    MessageSupport {
        message:
            "envoy.extensions.matching.common_inputs.network.v3.DynamicMetadataInput.PathSegment",
        supported: &["key"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.matching.common_inputs.network.v3.SourceIPInput",
        supported: &[],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.matching.common_inputs.network.v3.SourcePortInput",
        supported: &[],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.matching.common_inputs.network.v3.DirectSourceIPInput",
        supported: &[],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.matching.common_inputs.network.v3.DestinationIPInput",
        supported: &[],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.matching.common_inputs.network.v3.DestinationPortInput",
        supported: &[],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.matching.common_inputs.network.v3.ServerNameInput",
        supported: &[],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
        supported: &["header_name"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.type.matcher.v3.HttpResponseHeaderMatchInput",
        supported: &["header_name"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.type.matcher.v3.HttpResponseStatusCodeMatchInput",
        supported: &[],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.type.matcher.v3.HttpResponseStatusCodeClassMatchInput",
        supported: &[],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.type.matcher.v3.HttpResponseLocalReplyMatchInput",
        supported: &[],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.matching.input_matchers.metadata.v3.Metadata",
        supported: &["value", "invert"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.extensions.matching.input_matchers.ip.v3.Ip",
        supported: &["cidr_ranges"],
        warn: &[(
            "stat_prefix",
            "only names the matcher's own stats, which Legate does not keep",
        )],
    },
    MessageSupport {
        message: "envoy.type.matcher.v3.ValueMatcher",
        supported: &[
            "null_match",
            "double_match",
            "string_match",
            "bool_match",
            "present_match",
            "list_match",
            "or_match",
        ],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.type.matcher.v3.ValueMatcher.NullMatch",
        supported: &[],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.type.matcher.v3.DoubleMatcher",
        supported: &["range", "exact"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.type.v3.DoubleRange",
        supported: &["start", "end"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.type.matcher.v3.ListMatcher",
        supported: &["one_of"],
        warn: &[],
    },
    MessageSupport {
        message: "envoy.type.matcher.v3.OrMatcher",
        supported: &["value_matchers"],
        warn: &[],
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(yaml: &str) -> Matcher<String> {
        let v = legate_proto::json::parse_yaml(yaml).unwrap();
        let m: xm::Matcher =
            legate_proto::json::to_message(v, "xds.type.matcher.v3.Matcher", true).unwrap();
        Matcher::from_proto(&m, "m", &|a, _| Ok(a.name.clone())).unwrap()
    }

    const ACTION: &str = r#"{name: A, typed_config: {"@type": type.googleapis.com/envoy.config.rbac.v3.Action, name: A}}"#;

    #[test]
    fn metadata_headers_and_ips() {
        let m = matcher(&format!(
            r#"
matcher_list:
  matchers:
  - predicate:
      and_matcher:
        predicate:
        - single_predicate:
            input: {{name: claim, typed_config: {{"@type": type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.DynamicMetadataInput, filter: f, path: [{{key: p}}, {{key: scope}}]}}}}
            custom_match: {{name: m, typed_config: {{"@type": type.googleapis.com/envoy.extensions.matching.input_matchers.metadata.v3.Metadata, value: {{list_match: {{one_of: {{string_match: {{exact: read}}}}}}}}}}}}
        - not_matcher:
            single_predicate:
              input: {{name: h, typed_config: {{"@type": type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput, header_name: x-block}}}}
              value_match: {{exact: "yes"}}
        - single_predicate:
            input: {{name: ip, typed_config: {{"@type": type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.SourceIPInput}}}}
            custom_match: {{name: ip, typed_config: {{"@type": type.googleapis.com/envoy.extensions.matching.input_matchers.ip.v3.Ip, stat_prefix: s, cidr_ranges: [{{address_prefix: 10.0.0.0, prefix_len: 8}}]}}}}
    on_match: {{action: {ACTION}}}
"#
        ));
        let md: serde_json::Map<String, Value> =
            serde_json::from_str(r#"{"f": {"p": {"scope": ["write", "read"]}}}"#).unwrap();
        let mut headers = http::HeaderMap::new();
        fn d<'a>(
            h: &'a http::HeaderMap,
            md: &'a serde_json::Map<String, Value>,
            ip: &str,
        ) -> Data<'a> {
            Data {
                headers: h,
                pseudo: crate::config::matcher::Pseudo {
                    method: "GET",
                    path: "/",
                    authority: "h",
                    scheme: "http",
                    status: None,
                },
                metadata: md,
                remote: Some(SocketAddr::new(ip.parse().unwrap(), 1)),
                direct_remote: None,
                local: None,
                sni: "",
                response: None,
            }
        }
        let empty = serde_json::Map::new();
        assert_eq!(
            m.evaluate(&d(&headers, &md, "10.1.2.3"))
                .map(String::as_str),
            Some("A")
        );
        assert_eq!(m.evaluate(&d(&headers, &md, "11.1.2.3")), None);
        assert_eq!(m.evaluate(&d(&headers, &empty, "10.1.2.3")), None);
        headers.insert("x-block", "yes".parse().unwrap());
        assert_eq!(m.evaluate(&d(&headers, &md, "10.1.2.3")), None);
    }

    #[test]
    fn value_matchers() {
        let s = |x: &str| {
            ValueMatcher::String(
                StringMatcher::from_proto(
                    &em::StringMatcher {
                        match_pattern: Some(em::string_matcher::MatchPattern::Exact(x.into())),
                        ..Default::default()
                    },
                    "s",
                )
                .unwrap(),
            )
        };
        let v: Value = serde_json::json!({"a": "x", "n": 2.5, "l": ["x"], "z": null});
        assert!(s("x").matches(v.get("a")));
        assert!(!s("x").matches(v.get("l")));
        assert!(ValueMatcher::ListOneOf(Box::new(s("x"))).matches(v.get("l")));
        assert!(ValueMatcher::Double(DoubleMatch::Range(2.0, 3.0)).matches(v.get("n")));
        assert!(ValueMatcher::Present(true).matches(v.get("z")));
        assert!(!ValueMatcher::Present(true).matches(v.get("missing")));
        assert!(!ValueMatcher::Present(false).matches(None));
        assert!(ValueMatcher::Null.matches(v.get("z")));
    }
}
