//! Common Expression Language over Envoy's attribute vocabulary
//! (`request.*`, `response.*`, `source.*`, `destination.*`,
//! `upstream.*`, `connection.*`, `xds.*`), evaluated over a finished
//! request as the access log sees it: the `%CEL(...)%` command operator
//! and the CEL access log filter. Expressions are compiled once, with the
//! config; an attribute Legate has no value for is absent, as in Envoy
//! when the stream never had it.

pub mod unparse;

use crate::registry::{m, MessageSupport};

const CHECK_RESULTS: &str = "the checker's types, which evaluation does not read";

/// CEL expressions as xDS gives them (text, or a parsed or checked tree,
/// see [`unparse`]), and the CEL matcher that carries them.
pub static REGISTRY: &[MessageSupport] = &[
    m(
        "xds.type.v3.CelExpression",
        &["cel_expr_parsed", "cel_expr_checked"],
        &[],
    ),
    m(
        "xds.type.matcher.v3.CelMatcher",
        &["expr_match"],
        &[("description", "only a description")],
    ),
    m("xds.type.matcher.v3.HttpAttributesCelMatchInput", &[], &[]),
    m(
        "cel.expr.ParsedExpr",
        &["expr"],
        &[("source_info", "positions in the source text, for messages")],
    ),
    m(
        "cel.expr.CheckedExpr",
        // reference_map: checked against the tree (`check_references`).
        &["expr", "reference_map"],
        &[
            ("type_map", CHECK_RESULTS),
            ("source_info", "positions in the source text, for messages"),
            ("expr_version", "the checker's version"),
        ],
    ),
    m(
        "cel.expr.Expr",
        &[
            "id",
            "const_expr",
            "ident_expr",
            "select_expr",
            "call_expr",
            "list_expr",
            "struct_expr",
        ],
        &[],
    ),
    m("cel.expr.Reference", &["name", "overload_id", "value"], &[]),
    m("cel.expr.Expr.Ident", &["name"], &[]),
    m(
        "cel.expr.Expr.Select",
        &["operand", "field", "test_only"],
        &[],
    ),
    m("cel.expr.Expr.Call", &["target", "function", "args"], &[]),
    m("cel.expr.Expr.CreateList", &["elements"], &[]),
    m(
        "cel.expr.Expr.CreateStruct",
        &["message_name", "entries"],
        &[],
    ),
    m(
        "cel.expr.Expr.CreateStruct.Entry",
        &["id", "field_key", "map_key", "value"],
        &[],
    ),
    m(
        "cel.expr.Constant",
        &[
            "null_value",
            "bool_value",
            "int64_value",
            "uint64_value",
            "double_value",
            "string_value",
            "bytes_value",
        ],
        &[],
    ),
];

use crate::access_log::Entry;
use crate::config::{join, ConfigError, Result};
use cel::objects::{Key, Map, Value};
use legate_proto::envoy_types::pb::cel::expr::CheckedExpr;
use legate_proto::envoy_types::pb::xds::r#type::v3::CelExpression;
use std::collections::HashMap;
use std::sync::Arc;

/// A compiled expression, the attribute roots it reads, and the header
/// names it spells in capitals (Envoy lower-cases header lookups; CEL maps
/// do not, so those spellings are added to the header maps).
#[derive(Clone)]
pub struct Expression {
    source: String,
    program: Arc<cel::Program>,
    roots: Vec<Root>,
    header_spellings: Arc<Vec<String>>,
    /// Header maps are built only for expressions that read them.
    reads_headers: bool,
}

impl std::fmt::Debug for Expression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Expression").field(&self.source).finish()
    }
}

impl PartialEq for Expression {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Root {
    Request,
    Response,
    Source,
    Destination,
    Upstream,
    Connection,
    Xds,
}

const ROOTS: &[(&str, Root)] = &[
    ("request", Root::Request),
    ("response", Root::Response),
    ("source", Root::Source),
    ("destination", Root::Destination),
    ("upstream", Root::Upstream),
    ("connection", Root::Connection),
    ("xds", Root::Xds),
];

/// The attributes Legate has values for, per root.
const PROVIDED: &[(&str, &[&str])] = &[
    (
        "request",
        &[
            "path",
            "url_path",
            "query",
            "host",
            "scheme",
            "method",
            "headers",
            "referer",
            "useragent",
            "id",
            "time",
            "duration",
            "size",
            "protocol",
        ],
    ),
    (
        "response",
        &["code", "code_details", "flags", "headers", "size"],
    ),
    ("source", &["address", "port"]),
    ("destination", &["address", "port"]),
    (
        "upstream",
        &["address", "port", "local_address", "request_attempt_count"],
    ),
    ("connection", &["requested_server_name"]),
    ("xds", &["cluster_name", "route_name"]),
];

impl Expression {
    pub fn parse(source: &str, path: &str) -> Result<Self> {
        let program = cel::Program::compile(source)
            .map_err(|e| ConfigError::new(path, format!("invalid CEL expression: {e}")))?;
        // Other identifiers (a comprehension's variables, or names Envoy
        // does not know either) are left to fail evaluation, as in Envoy.
        let refs = program.references();
        let roots = refs
            .variables()
            .into_iter()
            .filter_map(|v| ROOTS.iter().find(|(n, _)| *n == v).map(|(_, r)| *r))
            .collect();
        warn_unprovided(source, path);
        Ok(Self {
            source: source.to_string(),
            program: Arc::new(program),
            roots,
            header_spellings: Arc::new(capitalised_literals(source)),
            reads_headers: source.contains("headers"),
        })
    }

    /// An expression a matcher evaluates while the request is in flight:
    /// one reading a name or an attribute Legate has no value for then is
    /// refused naming it (Envoy would evaluate it; Legate's absent value
    /// would silently make the predicate false).
    pub fn parse_at_request(source: &str, path: &str) -> Result<Self> {
        let e = Self::parse(source, path)?;
        for v in e.program.references().variables() {
            if !ROOTS.iter().any(|(root, _)| *root == v) || matches!(v, "upstream" | "xds") {
                return Err(ConfigError::new(
                    path,
                    format!("CEL name '{v}' has no value in Legate while a request is matched"),
                ));
            }
        }
        for c in ATTR.captures_iter(source) {
            if !at_request(&c[1], &c[2]) {
                return Err(ConfigError::new(
                    path,
                    format!(
                        "CEL attribute '{}.{}' has no value in Legate while a request is matched",
                        &c[1], &c[2]
                    ),
                ));
            }
        }
        Ok(e)
    }

    /// An `xds.type.v3.CelExpression` for a matcher: its checked tree,
    /// else its parsed one, written back as text and checked as
    /// [`Self::parse_at_request`] checks it. Envoy 1.40 reads no
    /// `cel_expr_string` here ("CEL expression not set"); the registry
    /// refuses it.
    pub fn from_proto(c: &CelExpression, path: &str) -> Result<Self> {
        let (tree, p) = match (&c.cel_expr_checked, &c.cel_expr_parsed) {
            (Some(x), _) => (x.expr.as_ref(), join(path, "cel_expr_checked")),
            (None, Some(x)) => (x.expr.as_ref(), join(path, "cel_expr_parsed")),
            (None, None) => {
                return Err(ConfigError::new(
                    path,
                    "CEL expression not set (cel_expr_checked or cel_expr_parsed is required)",
                ))
            }
        };
        let tree =
            tree.ok_or_else(|| ConfigError::new(join(&p, "expr"), "the expression is empty"))?;
        let text = unparse::source(tree, &join(&p, "expr"))?;
        let e = Self::parse_at_request(&text, &p)?;
        if let Some(checked) = &c.cel_expr_checked {
            e.check_references(checked, &p)?;
        }
        Ok(e)
    }

    /// A checked tree's `reference_map` changes evaluation when it turns a
    /// name into a constant (an enum value) or into another, qualified
    /// name; the text evaluated here would not. Such a tree is refused;
    /// references naming the tree's own variables, or only overloads, are
    /// what evaluating the text does anyway.
    fn check_references(&self, checked: &CheckedExpr, path: &str) -> Result<()> {
        let names = self.program.references();
        let names = names.variables();
        for (id, r) in &checked.reference_map {
            let p = format!("{}[{id}]", join(path, "reference_map"));
            if r.value.is_some() {
                return Err(ConfigError::new(
                    p,
                    "a reference resolved to a constant is not supported by Legate",
                ));
            }
            if !r.name.is_empty() && !names.contains(&r.name.as_str()) {
                return Err(ConfigError::new(
                    p,
                    format!(
                        "a reference resolving to '{}', a name the expression does not spell, is not supported by Legate",
                        r.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The expression's value over a request in flight (an expression
    /// made by [`Self::parse_at_request`]).
    pub fn evaluate_at_request(
        &self,
        d: &crate::config::unified_matcher::Data<'_>,
    ) -> Option<Value> {
        self.evaluate_on(&|r, spellings| {
            crate::config::unified_matcher::cel_attributes(d, r, spellings)
        })
    }

    /// The expression's value over `e`; None when it fails (an absent
    /// attribute, a type error).
    pub fn evaluate(&self, e: &Entry) -> Option<Value> {
        self.evaluate_on(&|r, spellings| attributes(r, e, spellings))
    }

    /// The expression's value over the attributes `of` gives per root.
    pub fn evaluate_on(&self, of: &dyn Fn(Root, Option<&[String]>) -> Value) -> Option<Value> {
        // The standard library is built once, not per evaluation.
        static ENV: std::sync::LazyLock<Arc<cel::Env>> =
            std::sync::LazyLock::new(|| Arc::new(cel::Env::stdlib()));
        let mut ctx = cel::Context::with_env(ENV.clone());
        let spellings = self.reads_headers.then_some(&self.header_spellings[..]);
        for r in &self.roots {
            let name = ROOTS.iter().find(|(_, x)| x == r).map_or("", |(n, _)| n);
            ctx.add_variable_from_value(name, of(*r, spellings));
        }
        self.program.execute(&ctx).ok()
    }
}

/// Whether a matcher can read `root.attr` while the request is in flight
/// (see `config::unified_matcher`'s `cel_attributes`): what Legate
/// provides, less what only a finished request or an upstream has.
fn at_request(root: &str, attr: &str) -> bool {
    let provided = PROVIDED
        .iter()
        .any(|(r, attrs)| *r == root && attrs.contains(&attr));
    let later = matches!(
        (root, attr),
        ("request", "duration" | "protocol")
            | ("response", "code_details" | "flags" | "size")
            | ("upstream" | "xds", _)
    );
    provided && !later
}

/// Attributes Envoy has and Legate does not evaluate as absent (`-` in a
/// log, false in a filter): said once, when the config is read. Only logs
/// read them, so they change no traffic.
/// An attribute read by name: `root.attribute`.
static ATTR: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
    regex::Regex::new(r"\b(request|response|source|destination|upstream|connection|xds)\.([a-z_]+)")
        .expect("static regex")
});

fn warn_unprovided(source: &str, path: &str) {
    for c in ATTR.captures_iter(source) {
        let known = PROVIDED
            .iter()
            .any(|(root, attrs)| *root == &c[1] && attrs.contains(&&c[2]));
        if !known {
            tracing::warn!(path, attribute = %format!("{}.{}", &c[1], &c[2]), "CEL attribute has no value in Legate: it evaluates as absent");
            crate::stats::counter("cel.unprovided_attribute".into()).increment(1);
        }
    }
}

/// Quoted literals with capitals: the header names an expression may look
/// up in Envoy's case-insensitive way.
fn capitalised_literals(source: &str) -> Vec<String> {
    static LIT: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r#"'([^'\\]*)'|"([^"\\]*)""#).expect("static regex")
    });
    LIT.captures_iter(source)
        .filter_map(|c| c.get(1).or(c.get(2)).map(|m| m.as_str().to_string()))
        .filter(|l| l.chars().any(|c| c.is_ascii_uppercase()))
        .collect()
}

/// How a value reads in a log, as Envoy prints it (absent and failed
/// values are None: `-`).
pub fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.to_string(),
        Value::Int(i) => i.to_string(),
        Value::UInt(u) => u.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        Value::Duration(d) => duration_text(*d),
        Value::Timestamp(t) => timestamp_text(t),
        Value::Null => "NULL".into(),
        Value::Map(_) => "CelMap value".into(),
        Value::List(_) => "CelList value".into(),
        _ => "CelType value".into(),
    }
}

/// absl's `FormatDuration`: `0`, `250ms`, `1.5s`, `1m30s`, `2h0m1s`...
fn duration_text(d: chrono::Duration) -> String {
    let ns = d.num_nanoseconds().unwrap_or(i64::MAX);
    if ns == 0 {
        return "0".into();
    }
    let (sign, ns) = if ns < 0 {
        ("-", -(ns as i128))
    } else {
        ("", ns as i128)
    };
    let frac = |v: i128, unit: i128| {
        let whole = v / unit;
        let rest = v % unit;
        if rest == 0 {
            whole.to_string()
        } else {
            let digits = (unit as f64).log10().round() as usize;
            let f = format!("{rest:0digits$}");
            format!("{whole}.{}", f.trim_end_matches('0'))
        }
    };
    if ns < 1_000_000_000 {
        let (unit, name) = if ns >= 1_000_000 {
            (1_000_000, "ms")
        } else if ns >= 1_000 {
            (1_000, "us")
        } else {
            (1, "ns")
        };
        return format!("{sign}{}{name}", frac(ns, unit));
    }
    let (h, rest) = (ns / 3_600_000_000_000, ns % 3_600_000_000_000);
    let (m, rest) = (rest / 60_000_000_000, rest % 60_000_000_000);
    let mut out = sign.to_string();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if rest > 0 || (h == 0 && m == 0) {
        out.push_str(&format!("{}s", frac(rest, 1_000_000_000)));
    }
    out
}

/// absl's RFC 3339 form in UTC: `2020-12-22T01:50:34.5+00:00`.
fn timestamp_text(t: &chrono::DateTime<chrono::FixedOffset>) -> String {
    let utc = t.with_timezone(&chrono::Utc);
    let nanos = utc.timestamp_subsec_nanos();
    let frac = if nanos == 0 {
        String::new()
    } else {
        format!(".{}", format!("{nanos:09}").trim_end_matches('0'))
    };
    format!("{}{frac}+00:00", utc.format("%Y-%m-%dT%H:%M:%S"))
}

pub(crate) fn map(entries: Vec<(&str, Value)>) -> Value {
    let m: HashMap<Key, Value> = entries
        .into_iter()
        .map(|(k, v)| (Key::String(Arc::new(k.to_string())), v))
        .collect();
    Value::Map(Map::from(m))
}

pub(crate) fn s(v: impl Into<String>) -> Value {
    Value::String(Arc::new(v.into()))
}

fn int(v: u64) -> Value {
    Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
}

/// A header map as Envoy's CEL sees it: values of a name joined with `,`,
/// looked up without regard to case.
pub(crate) fn headers(h: &http::HeaderMap, spellings: &[String]) -> Value {
    let mut m: HashMap<Key, Value> = HashMap::new();
    let joined = |name: &http::HeaderName| {
        h.get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(",")
    };
    for name in h.keys() {
        m.insert(
            Key::String(Arc::new(name.as_str().to_string())),
            s(joined(name)),
        );
    }
    for sp in spellings {
        if let Ok(name) = http::HeaderName::from_bytes(sp.to_ascii_lowercase().as_bytes()) {
            if h.contains_key(&name) {
                m.insert(Key::String(Arc::new(sp.clone())), s(joined(&name)));
            }
        }
    }
    Value::Map(Map::from(m))
}

/// Envoy's legacy response flag bits, in its flag order (`LH` = 1,
/// `UH` = 2, ... `NR` = 256, ...).
fn flag_bits(flags: &str) -> u64 {
    flags
        .split(',')
        .filter_map(|f| {
            crate::access_log::filter::FLAGS
                .iter()
                .position(|x| *x == f)
        })
        .fold(0, |acc, i| acc | (1u64 << i))
}

/// `spellings`: None when the expression reads no header map.
fn attributes(r: Root, e: &Entry, spellings: Option<&[String]>) -> Value {
    match r {
        Root::Request => request(e, spellings),
        Root::Response => response(e, spellings),
        Root::Source => address(Some(e.downstream_remote)),
        Root::Destination => address(Some(e.downstream_local)),
        Root::Upstream => {
            // The attempt count is there (0) before any upstream is tried.
            let mut v = vec![(
                "request_attempt_count",
                Value::UInt(e.http.as_ref().map_or(0, |h| h.attempts.into())),
            )];
            if let Some(a) = e.upstream_host {
                v.push(("address", s(a.to_string())));
                v.push(("port", Value::Int(a.port().into())));
            }
            if let Some(l) = e.upstream_local {
                v.push(("local_address", s(l.to_string())));
            }
            map(v)
        }
        Root::Connection => map(vec![("requested_server_name", s(e.requested_server_name))]),
        Root::Xds => {
            let mut v = Vec::new();
            if !e.upstream_cluster.is_empty() {
                v.push(("cluster_name", s(e.upstream_cluster)));
            }
            if let Some(h) = e.http.as_ref().filter(|h| !h.route_name.is_empty()) {
                v.push(("route_name", s(h.route_name)));
            }
            map(v)
        }
    }
}

fn request(e: &Entry, spellings: Option<&[String]>) -> Value {
    let start = chrono::DateTime::<chrono::Utc>::from(e.start).fixed_offset();
    let mut v = vec![
        ("time", Value::Timestamp(start)),
        (
            "duration",
            Value::Duration(chrono::Duration::nanoseconds(e.duration.as_nanos() as i64)),
        ),
    ];
    let Some(h) = e.http.as_ref() else {
        return map(v);
    };
    request_line_and_headers(&h.pseudo, h.request, spellings, &mut v);
    if !h.protocol.is_empty() {
        v.push(("protocol", s(h.protocol)));
    }
    let header = |n: &str| h.request.get(n).and_then(|v| v.to_str().ok());
    match header("content-length") {
        Some(cl) => {
            if let Ok(n) = cl.parse::<u64>() {
                v.push(("size", int(n)));
            }
        }
        None => v.push(("size", int(e.bytes_received))),
    }
    map(v)
}

/// The request attributes its pseudo-headers and headers give, whether
/// the request is finished (access logs) or in flight (matchers).
pub(crate) fn request_line_and_headers<'a>(
    pseudo: &crate::config::matcher::Pseudo<'a>,
    request: &'a http::HeaderMap,
    spellings: Option<&[String]>,
    v: &mut Vec<(&'static str, Value)>,
) {
    let path = pseudo.path;
    let url_path = path.split('?').next().unwrap_or("");
    let query = path
        .split_once('?')
        .map_or("", |(_, q)| q.split('#').next().unwrap_or(""));
    v.extend([
        ("path", s(path)),
        ("url_path", s(url_path)),
        ("query", s(query)),
        ("host", s(pseudo.authority)),
        ("scheme", s(pseudo.scheme)),
        ("method", s(pseudo.method)),
    ]);
    if let Some(sp) = spellings {
        v.push(("headers", headers(request, sp)));
    }
    for (k, n) in [
        ("referer", "referer"),
        ("useragent", "user-agent"),
        ("id", "x-request-id"),
    ] {
        if let Some(x) = request.get(n).and_then(|v| v.to_str().ok()) {
            v.push((k, s(x)));
        }
    }
}

fn response(e: &Entry, spellings: Option<&[String]>) -> Value {
    let mut v = vec![
        ("size", int(e.bytes_sent)),
        ("flags", int(flag_bits(e.response_flags))),
    ];
    if let Some(h) = e.http.as_ref() {
        if h.response_code > 0 {
            v.push(("code", Value::Int(h.response_code.into())));
        }
        if let Some(d) = h.details.filter(|d| !d.is_empty()) {
            v.push(("code_details", s(d)));
        }
        if let (Some(r), Some(sp)) = (h.response, spellings) {
            v.push(("headers", headers(r, sp)));
        }
    }
    map(v)
}

pub(crate) fn address(a: Option<std::net::SocketAddr>) -> Value {
    match a {
        Some(a) => map(vec![
            ("address", s(a.to_string())),
            ("port", Value::Int(a.port().into())),
        ]),
        None => map(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(src: &str) -> Option<String> {
        let x = Expression::parse(src, "t").unwrap();
        x.evaluate(&crate::access_log::tests::http_entry())
            .map(|v| text(&v))
    }

    #[test]
    fn attributes_read_as_envoy_reads_them() {
        assert_eq!(eval("request.method").as_deref(), Some("GET"));
        assert_eq!(eval("request.url_path").as_deref(), Some("/a/b"));
        assert_eq!(eval("request.query").as_deref(), Some("x=1"));
        assert_eq!(eval("response.code >= 400").as_deref(), Some("true"));
        assert_eq!(
            eval("request.headers['X-FORWARDED-FOR']").as_deref(),
            Some("1.2.3.4,5.6.7.8")
        );
        assert_eq!(
            eval("request.headers['x-forwarded-for']").as_deref(),
            Some("1.2.3.4,5.6.7.8")
        );
        // NR (256) and UF (32).
        assert_eq!(eval("response.flags").as_deref(), Some("288"));
        assert_eq!(eval("request.duration").as_deref(), Some("1.234s"));
        assert_eq!(eval("upstream.port").as_deref(), Some("8080"));
        // Absent attributes fail the expression.
        assert_eq!(eval("request.headers['x-absent']"), None);
        assert_eq!(eval("request.nope"), None);
    }

    /// A matcher's expression over an attribute Legate cannot give while
    /// the request is matched is refused, not evaluated as absent.
    #[test]
    fn request_time_expressions_name_what_they_cannot_read() {
        assert!(Expression::parse_at_request("request.path.startsWith('/a')", "m").is_ok());
        let e = Expression::parse_at_request("!connection.mtls", "m").unwrap_err();
        assert!(e.message.contains("connection.mtls"), "{e}");
        let e = Expression::parse_at_request("xds.route_name == 'r'", "m").unwrap_err();
        assert!(e.message.contains("xds"), "{e}");
    }

    /// A checked tree's references may only repeat what the text says.
    #[test]
    fn checked_references_that_would_change_evaluation_are_refused() {
        let checked = |refs: &str| {
            let yaml = format!(
                "cel_expr_checked: {{expr: {{id: 2, select_expr: {{field: path, operand: {{id: 1, ident_expr: {{name: request}}}}}}}}, reference_map: {refs}}}"
            );
            let v = legate_proto::json::parse_yaml(&yaml).unwrap();
            let c: CelExpression =
                legate_proto::json::to_message(v, "xds.type.v3.CelExpression", true).unwrap();
            Expression::from_proto(&c, "e")
        };
        assert!(checked("{1: {name: request}}").is_ok());
        let e = checked("{1: {name: pkg.request}}").unwrap_err();
        assert_eq!(e.path, "e.cel_expr_checked.reference_map[1]");
        assert!(checked("{2: {value: {int64_value: 3}}}").is_err());
    }

    #[test]
    fn bad_syntax_is_refused_naming_the_field_and_comprehensions_are_not() {
        // Unknown names fail evaluation (absent), as in Envoy.
        assert_eq!(eval("foo.bar == 1"), None);
        assert_eq!(
            eval("request.headers.exists(k, k.startsWith('x-'))").as_deref(),
            Some("true")
        );
        let e = Expression::parse("request.path ==", "a.expression").unwrap_err();
        assert!(e.to_string().contains("a.expression"), "{e}");
    }

    #[test]
    fn durations_and_times_print_as_absl_does() {
        let d = |ms: i64| duration_text(chrono::Duration::milliseconds(ms));
        assert_eq!(d(0), "0");
        assert_eq!(d(15), "15ms");
        assert_eq!(d(1500), "1.5s");
        assert_eq!(d(90_000), "1m30s");
        assert_eq!(d(3_601_000), "1h0m1s");
        assert_eq!(duration_text(chrono::Duration::microseconds(1500)), "1.5ms");
        let t = chrono::DateTime::parse_from_rfc3339("2020-12-22T01:50:34Z").unwrap();
        assert_eq!(timestamp_text(&t), "2020-12-22T01:50:34+00:00");
    }
}
