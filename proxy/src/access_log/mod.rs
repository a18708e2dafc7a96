//! Access logs (`access_log`): Envoy's file, stdout and stderr loggers with
//! its text format and command operators. `tcp_proxy` writes a line per
//! connection and the HTTP connection manager one per request; the
//! formatter is pure (a parsed format rendered over an [`Entry`]), so its
//! output can be checked against Envoy's line for line.

pub mod filter;
mod otel;

use crate::config::{index, join, ConfigError, Result};
use legate_proto::envoy_types::pb::envoy::config::accesslog::v3 as pb;
use legate_proto::envoy_types::pb::envoy::config::core::v3 as core;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

const FILE_TYPE: &str = "envoy.extensions.access_loggers.file.v3.FileAccessLog";
const STDOUT_TYPE: &str = "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog";
const STDERR_TYPE: &str = "envoy.extensions.access_loggers.stream.v3.StderrAccessLog";
const OTEL_TYPE: &str =
    "envoy.extensions.access_loggers.open_telemetry.v3.OpenTelemetryAccessLogConfig";
/// Accepted with a warning (the registry's), never written.
const GRPC_TYPES: &[&str] = &[
    "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
    "envoy.extensions.access_loggers.grpc.v3.TcpGrpcAccessLogConfig",
];

/// Envoy's default format, for HTTP and TCP alike.
pub const DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// What one finished connection tells its access log.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub start: SystemTime,
    pub duration: Duration,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub downstream_remote: SocketAddr,
    pub downstream_direct_remote: SocketAddr,
    pub downstream_local: SocketAddr,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_local: Option<SocketAddr>,
    pub upstream_cluster: &'a str,
    /// Envoy's short response flags (`UF`, `UH`, `NC`, ...), comma-joined.
    pub response_flags: &'a str,
    pub requested_server_name: &'a str,
    /// The request and its response, on HTTP streams; TCP connections
    /// print `-` (and `0` for the response code) where Envoy does.
    pub http: Option<HttpFacts<'a>>,
    /// The request's trace and span ids, when it is traced.
    pub trace: Option<([u8; 16], [u8; 8])>,
}

/// What an HTTP stream adds to its access log entry.
#[derive(Debug, Clone)]
pub struct HttpFacts<'a> {
    /// The request headers as the router left them (rewrites included,
    /// as Envoy mutates its request headers in place).
    pub request: &'a http::HeaderMap,
    pub pseudo: crate::config::matcher::Pseudo<'a>,
    pub response: Option<&'a http::HeaderMap>,
    /// `HTTP/1.1`, `HTTP/2`, ...
    pub protocol: &'a str,
    /// 0 when no response was sent.
    pub response_code: u16,
    /// Envoy's response code details (`via_upstream`, `route_not_found`,
    /// ...); None when unset (`-`), as opposed to set empty (an ext_proc
    /// immediate response without details).
    pub details: Option<&'a str>,
    pub route_name: &'a str,
    /// From the request's start to the upstream's first response byte.
    pub response_duration: Option<Duration>,
    /// Upstream attempts (retries included); 0 when none was made.
    pub attempts: u32,
    /// Answered or marked by the health check filter.
    pub health_check: bool,
    /// The tracing decision was to trace (Envoy's traceable filter).
    pub traced: bool,
}

/// Envoy's response flags (`UH`, `UF`, `URX`, ...), in the order they
/// were raised, which is the order Envoy prints them in.
#[derive(Debug, Clone, Default)]
pub struct Flags(Vec<&'static str>);

impl Flags {
    pub fn add(&mut self, flag: &'static str) {
        if !self.0.contains(&flag) {
            self.0.push(flag);
        }
    }

    /// Comma-joined (`URX,UF`), empty for none.
    pub fn joined(&self) -> String {
        self.0.join(",")
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Lit(String),
    StartTime,
    Duration,
    BytesReceived,
    BytesSent,
    Addr(Which, bool),
    UpstreamCluster,
    ResponseFlags,
    RequestedServerName,
    /// Operators Legate has no value for (trailers, termination details):
    /// Envoy's `-` for a missing value.
    Dash,
    ResponseCode,
    Protocol,
    ResponseCodeDetails,
    RouteName,
    ResponseDuration,
    AttemptCount,
    Hostname,
    Req(crate::headers::HeaderLookup),
    Resp(crate::headers::HeaderLookup),
    /// `%ENVIRONMENT(X):Z%`, read once when the format is built (as Envoy
    /// does); None when X is unset.
    Env(Option<String>),
    /// `%REQ_WITHOUT_QUERY(X?Y):Z%`: a request header without its query.
    ReqWithoutQuery(crate::headers::HeaderLookup),
    /// `%CEL(expr):Z%`.
    Cel(crate::cel::Expression, Option<usize>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Which {
    DownstreamRemote,
    DownstreamDirectRemote,
    DownstreamLocal,
    UpstreamHost,
    UpstreamLocal,
}

/// A parsed text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Format(Vec<Piece>);

impl Format {
    pub fn parse(s: &str, path: &str) -> Result<Self> {
        crate::headers::parse_pieces(s, path, Piece::Lit, |cmd| Self::command(cmd, path)).map(Self)
    }

    fn command(cmd: &str, path: &str) -> Result<Piece> {
        use crate::headers::HeaderLookup;
        if let Some(l) = HeaderLookup::parse(cmd, "REQ", path)? {
            return Ok(Piece::Req(l));
        }
        if let Some(l) = HeaderLookup::parse(cmd, "RESP", path)? {
            return Ok(Piece::Resp(l));
        }
        if let Some(rest) = cmd.strip_prefix("ENVIRONMENT(") {
            return environment(rest, path);
        }
        if let Some(l) = HeaderLookup::parse(cmd, "REQ_WITHOUT_QUERY", path)? {
            return Ok(Piece::ReqWithoutQuery(l));
        }
        if let Some(rest) = cmd.strip_prefix("CEL(") {
            return cel_command(rest, path);
        }
        let addr = |w, port| Piece::Addr(w, port);
        Ok(match cmd {
            "START_TIME" => Piece::StartTime,
            "DURATION" => Piece::Duration,
            "BYTES_RECEIVED" => Piece::BytesReceived,
            "BYTES_SENT" => Piece::BytesSent,
            "DOWNSTREAM_REMOTE_ADDRESS" => addr(Which::DownstreamRemote, true),
            "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => addr(Which::DownstreamRemote, false),
            "DOWNSTREAM_DIRECT_REMOTE_ADDRESS" => addr(Which::DownstreamDirectRemote, true),
            "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT" => {
                addr(Which::DownstreamDirectRemote, false)
            }
            "DOWNSTREAM_LOCAL_ADDRESS" => addr(Which::DownstreamLocal, true),
            "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => addr(Which::DownstreamLocal, false),
            "UPSTREAM_HOST" => addr(Which::UpstreamHost, true),
            "UPSTREAM_LOCAL_ADDRESS" => addr(Which::UpstreamLocal, true),
            // Legate has no cluster alt_stat_name: the raw name is the name.
            "UPSTREAM_CLUSTER" | "UPSTREAM_CLUSTER_RAW" => Piece::UpstreamCluster,
            "RESPONSE_FLAGS" => Piece::ResponseFlags,
            "REQUESTED_SERVER_NAME" => Piece::RequestedServerName,
            "RESPONSE_CODE" => Piece::ResponseCode,
            "RESPONSE_CODE_DETAILS" => Piece::ResponseCodeDetails,
            "PROTOCOL" => Piece::Protocol,
            "ROUTE_NAME" => Piece::RouteName,
            "RESPONSE_DURATION" => Piece::ResponseDuration,
            "UPSTREAM_REQUEST_ATTEMPT_COUNT" => Piece::AttemptCount,
            "HOSTNAME" => Piece::Hostname,
            // Upstream TLS failures and connection termination details are
            // not recorded yet; trailers are not kept for logging.
            "UPSTREAM_TRANSPORT_FAILURE_REASON" | "CONNECTION_TERMINATION_DETAILS" => {
                tracing::warn!(
                    path,
                    command = cmd,
                    "access log command is always '-' in Legate"
                );
                Piece::Dash
            }
            // Legate keeps no dynamic metadata a log could read.
            c if c.starts_with("METADATA(") || c.starts_with("DYNAMIC_METADATA(") => {
                tracing::warn!(
                    path,
                    command = cmd,
                    "access log metadata is always '-' in Legate"
                );
                Piece::Dash
            }
            c if c.starts_with("TRAILER(") => {
                tracing::warn!(
                    path,
                    command = cmd,
                    "access log trailers are always '-' in Legate"
                );
                Piece::Dash
            }
            other => {
                return Err(ConfigError::new(
                    path,
                    format!("unsupported access log command %{other}%"),
                ))
            }
        })
    }

    pub fn render(&self, e: &Entry) -> String {
        let mut out = String::with_capacity(160);
        for p in &self.0 {
            match p {
                Piece::Lit(s) => out.push_str(s),
                p => out.push_str(&value(p, e).text()),
            }
        }
        out
    }

    /// A format that is one operator alone keeps its value's JSON type.
    fn typed(&self, e: &Entry) -> serde_json::Value {
        match &self.0[..] {
            [p] if !matches!(p, Piece::Lit(_)) => value(p, e).json(),
            _ => serde_json::Value::String(self.render(e)),
        }
    }
}

/// `expr):Z` of `%CEL(expr):Z%` (the expression runs to the last `)`).
fn cel_command(rest: &str, path: &str) -> Result<Piece> {
    let bad = |why: &str| ConfigError::new(path, format!("%CEL({rest}%: {why}"));
    let close = rest.rfind(')').ok_or_else(|| bad("missing ')'"))?;
    let (expr, tail) = (&rest[..close], &rest[close + 1..]);
    let max = match tail.strip_prefix(':') {
        Some(n) => Some(n.parse::<usize>().map_err(|_| bad("bad length"))?),
        None if tail.is_empty() => None,
        None => return Err(bad("unexpected text after ')'")),
    };
    Ok(Piece::Cel(crate::cel::Expression::parse(expr, path)?, max))
}

/// `X):Z` of `%ENVIRONMENT(X):Z%`: the variable's value, cut to Z bytes.
fn environment(rest: &str, path: &str) -> Result<Piece> {
    let bad = |why: &str| ConfigError::new(path, format!("%ENVIRONMENT({rest}%: {why}"));
    let (name, tail) = rest.split_once(')').ok_or_else(|| bad("missing ')'"))?;
    let max = match tail.strip_prefix(':') {
        Some(n) => Some(n.parse::<usize>().map_err(|_| bad("bad length"))?),
        None if tail.is_empty() => None,
        None => return Err(bad("unexpected text after ')'")),
    };
    Ok(Piece::Env(std::env::var(name).ok().map(|mut v| {
        if let Some(m) = max.filter(|m| *m < v.len()) {
            let mut cut = m;
            while !v.is_char_boundary(cut) {
                cut -= 1;
            }
            v.truncate(cut);
        }
        v
    })))
}

/// An operator's value: a number and a missing value stay apart so a JSON
/// format can write them as Envoy does (text writes `-` for a missing one).
enum Val {
    Str(String),
    Num(u64),
    Null,
}

impl Val {
    fn text(self) -> String {
        match self {
            Val::Str(s) => s,
            Val::Num(n) => n.to_string(),
            Val::Null => "-".into(),
        }
    }

    fn json(self) -> serde_json::Value {
        match self {
            Val::Str(s) => s.into(),
            Val::Num(n) => n.into(),
            Val::Null => serde_json::Value::Null,
        }
    }
}

fn value(p: &Piece, e: &Entry) -> Val {
    let opt = |s: &str| {
        if s.is_empty() {
            Val::Null
        } else {
            Val::Str(s.to_string())
        }
    };
    let http = e.http.as_ref();
    match p {
        Piece::Lit(s) => Val::Str(s.clone()),
        Piece::StartTime => Val::Str(start_time(e.start)),
        Piece::Duration => Val::Num(e.duration.as_millis() as u64),
        Piece::BytesReceived => Val::Num(e.bytes_received),
        Piece::BytesSent => Val::Num(e.bytes_sent),
        Piece::Addr(w, port) => {
            let a = match w {
                Which::DownstreamRemote => Some(e.downstream_remote),
                Which::DownstreamDirectRemote => Some(e.downstream_direct_remote),
                Which::DownstreamLocal => Some(e.downstream_local),
                Which::UpstreamHost => e.upstream_host,
                Which::UpstreamLocal => e.upstream_local,
            };
            match (a, port) {
                (Some(a), true) => Val::Str(a.to_string()),
                (Some(a), false) => Val::Str(a.ip().to_string()),
                (None, _) => Val::Null,
            }
        }
        Piece::UpstreamCluster => opt(e.upstream_cluster),
        // Envoy's flags formatter writes `-` itself for none.
        Piece::ResponseFlags if e.response_flags.is_empty() => Val::Str("-".into()),
        Piece::ResponseFlags => Val::Str(e.response_flags.to_string()),
        Piece::RequestedServerName => opt(e.requested_server_name),
        Piece::Dash => Val::Null,
        Piece::ResponseCode => Val::Num(http.map_or(0, |h| h.response_code).into()),
        Piece::Protocol => opt(http.map_or("", |h| h.protocol)),
        Piece::ResponseCodeDetails => http
            .and_then(|h| h.details)
            .map_or(Val::Null, |d| Val::Str(d.to_string())),
        Piece::RouteName => opt(http.map_or("", |h| h.route_name)),
        Piece::ResponseDuration => http
            .and_then(|h| h.response_duration)
            .map_or(Val::Null, |d| Val::Num(d.as_millis() as u64)),
        Piece::AttemptCount => http.map_or(Val::Null, |h| Val::Num(h.attempts.into())),
        Piece::Hostname => Val::Str(crate::server::request::hostname().to_string()),
        Piece::Env(v) => v.clone().map_or(Val::Null, Val::Str),
        Piece::ReqWithoutQuery(l) => http
            .and_then(|h| l.value(Some(h.request), &h.pseudo))
            .map_or(Val::Null, |v| {
                Val::Str(v.split('?').next().unwrap_or_default().to_string())
            }),
        Piece::Cel(x, max) => x.evaluate(e).map_or(Val::Null, |v| {
            let mut t = crate::cel::text(&v);
            if let Some(m) = max.filter(|m| *m < t.len()) {
                let mut cut = m;
                while !t.is_char_boundary(cut) {
                    cut -= 1;
                }
                t.truncate(cut);
            }
            Val::Str(t)
        }),
        Piece::Req(l) => http
            .and_then(|h| l.value(Some(h.request), &h.pseudo))
            .map_or(Val::Null, Val::Str),
        Piece::Resp(l) => http
            .and_then(|h| {
                let pseudo = crate::config::matcher::Pseudo {
                    status: (h.response_code > 0).then_some(h.response_code),
                    ..Default::default()
                };
                l.value(h.response, &pseudo)
            })
            .map_or(Val::Null, Val::Str),
    }
}

/// `json_format`: an object whose string values are formats; Envoy writes
/// it on one line with its keys sorted, a value that is one operator with
/// that operator's type (null when it has none), and other values as
/// configured.
#[derive(Debug, Clone, PartialEq)]
pub enum JsonNode {
    Format(Format),
    Object(Vec<(String, JsonNode)>),
    Literal(serde_json::Value),
}

impl JsonNode {
    fn from_struct(
        s: &legate_proto::envoy_types::pb::google::protobuf::Struct,
        path: &str,
    ) -> Result<Self> {
        let mut fields = Vec::with_capacity(s.fields.len());
        for (k, v) in &s.fields {
            fields.push((k.clone(), Self::from_value(v, &join(path, k))?));
        }
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self::Object(fields))
    }

    fn from_value(
        v: &legate_proto::envoy_types::pb::google::protobuf::Value,
        path: &str,
    ) -> Result<Self> {
        use legate_proto::envoy_types::pb::google::protobuf::value::Kind;
        Ok(match &v.kind {
            Some(Kind::StringValue(s)) => Self::Format(Format::parse(s, path)?),
            Some(Kind::StructValue(s)) => Self::from_struct(s, path)?,
            Some(Kind::NumberValue(n)) => Self::Literal(serde_json::Number::from_f64(*n).map_or(
                serde_json::Value::Null,
                |n| {
                    // Whole numbers print as integers, as Envoy prints them.
                    if n.as_f64()
                        .is_some_and(|f| f.fract() == 0.0 && f.abs() < 1e15)
                    {
                        serde_json::Value::from(n.as_f64().unwrap_or_default() as i64)
                    } else {
                        serde_json::Value::Number(n)
                    }
                },
            )),
            Some(Kind::BoolValue(b)) => Self::Literal((*b).into()),
            Some(Kind::NullValue(_)) | None => Self::Literal(serde_json::Value::Null),
            Some(Kind::ListValue(_)) => {
                return Err(ConfigError::new(
                    path,
                    "lists are not supported in json_format (as in Envoy)",
                ))
            }
        })
    }

    fn render(&self, e: &Entry) -> serde_json::Value {
        match self {
            Self::Format(f) => f.typed(e),
            Self::Literal(v) => v.clone(),
            Self::Object(fields) => {
                let mut m = serde_json::Map::new();
                for (k, v) in fields {
                    m.insert(k.clone(), v.render(e));
                }
                serde_json::Value::Object(m)
            }
        }
    }
}

/// A log line's layout: text, or JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum LogFormat {
    Text(Format),
    Json(JsonNode),
}

impl LogFormat {
    pub fn render(&self, e: &Entry) -> String {
        match self {
            Self::Text(f) => f.render(e),
            Self::Json(j) => {
                let mut line = j.render(e).to_string();
                line.push('\n');
                line
            }
        }
    }
}

/// `%START_TIME%`'s default form: RFC 3339 in UTC with milliseconds.
fn start_time(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[derive(Debug)]
pub enum Sink {
    File(Mutex<std::fs::File>),
    Stdout,
    Stderr,
}

/// One configured access log: which entries it keeps, and where they go.
#[derive(Debug)]
pub struct AccessLog {
    pub filter: Option<filter::Filter>,
    out: Output,
}

/// A line written locally, or OTLP records exported to a collector.
#[derive(Debug)]
enum Output {
    Line { format: LogFormat, sink: Sink },
    Otel(otel::Logger),
}

impl AccessLog {
    pub fn from_proto(a: &pb::AccessLog, path: &str) -> Result<Self> {
        let Some(pb::access_log::ConfigType::TypedConfig(any)) = &a.config_type else {
            return Err(ConfigError::new(
                join(path, "typed_config"),
                "typed_config is required",
            ));
        };
        let filter = a
            .filter
            .as_ref()
            .map(|f| filter::Filter::from_proto(f, &join(path, "filter")))
            .transpose()?;
        let tc = join(path, "typed_config");
        let decode = |e: prost::DecodeError| ConfigError::new(&tc, e.to_string());
        let out = match legate_proto::type_name(&any.type_url) {
            FILE_TYPE => file(
                &prost::Message::decode(any.value.as_slice()).map_err(decode)?,
                &tc,
            ),
            t @ (STDOUT_TYPE | STDERR_TYPE) => {
                // Both messages are `{ log_format = 1 }`.
                let s = prost::Message::decode(any.value.as_slice()).map_err(decode)?;
                stream(&s, t == STDOUT_TYPE, &tc)
            }
            OTEL_TYPE => {
                let c = prost::Message::decode(any.value.as_slice()).map_err(decode)?;
                Ok(Output::Otel(otel::Logger::from_proto(&c, &tc)?))
            }
            other => Err(ConfigError::new(
                tc,
                format!("access logger {other} is not supported"),
            )),
        }?;
        Ok(Self { filter, out })
    }

    /// Writes one line (a failed write is counted, never fatal), or queues
    /// one record for export.
    pub fn log(&self, e: &Entry, clusters: &Arc<crate::cluster_manager::ClusterManager>) {
        if self.filter.as_ref().is_some_and(|f| !f.evaluate(e)) {
            return;
        }
        let (format, sink) = match &self.out {
            Output::Otel(o) => return o.log(e, clusters),
            Output::Line { format, sink } => (format, sink),
        };
        let line = format.render(e);
        let r = match sink {
            Sink::File(f) => f.lock().unwrap().write_all(line.as_bytes()),
            Sink::Stdout => std::io::stdout().lock().write_all(line.as_bytes()),
            Sink::Stderr => std::io::stderr().lock().write_all(line.as_bytes()),
        };
        if r.is_err() {
            crate::stats::counter("access_logs.write_failed".into()).increment(1);
        }
    }
}

fn file(
    f: &legate_proto::envoy_types::pb::envoy::extensions::access_loggers::file::v3::FileAccessLog,
    tc: &str,
) -> Result<Output> {
    use legate_proto::envoy_types::pb::envoy::extensions::access_loggers::file::v3::file_access_log::AccessLogFormat;
    if f.path.is_empty() {
        return Err(ConfigError::new(join(tc, "path"), "path is required"));
    }
    let format = match &f.access_log_format {
        None => LogFormat::Text(Format::parse(DEFAULT_FORMAT, tc)?),
        Some(AccessLogFormat::Format(s)) if s.is_empty() => {
            LogFormat::Text(Format::parse(DEFAULT_FORMAT, tc)?)
        }
        Some(AccessLogFormat::Format(s)) => LogFormat::Text(Format::parse(s, &join(tc, "format"))?),
        Some(AccessLogFormat::LogFormat(l)) => substitution(l, &join(tc, "log_format"))?,
        Some(AccessLogFormat::JsonFormat(j)) => {
            LogFormat::Json(JsonNode::from_struct(j, &join(tc, "json_format"))?)
        }
        Some(_) => {
            return Err(ConfigError::new(
                join(tc, "typed_json_format"),
                "not supported",
            ))
        }
    };
    // Envoy opens the file at config time and fails the config if it
    // cannot.
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&f.path)
        .map_err(|e| ConfigError::new(join(tc, "path"), format!("{}: {e}", f.path)))?;
    Ok(Output::Line {
        format,
        sink: Sink::File(Mutex::new(file)),
    })
}

fn stream(
    s: &legate_proto::envoy_types::pb::envoy::extensions::access_loggers::stream::v3::StdoutAccessLog,
    stdout: bool,
    tc: &str,
) -> Result<Output> {
    use legate_proto::envoy_types::pb::envoy::extensions::access_loggers::stream::v3::stdout_access_log::AccessLogFormat;
    let format = match &s.access_log_format {
        Some(AccessLogFormat::LogFormat(l)) => substitution(l, &join(tc, "log_format"))?,
        None => LogFormat::Text(Format::parse(DEFAULT_FORMAT, tc)?),
    };
    let sink = if stdout { Sink::Stdout } else { Sink::Stderr };
    Ok(Output::Line { format, sink })
}

/// `SubstitutionFormatString`: a text or a JSON format.
fn substitution(s: &core::SubstitutionFormatString, path: &str) -> Result<LogFormat> {
    use core::substitution_format_string::Format as F;
    formatters(&s.formatters, &join(path, "formatters"))?;
    Ok(match &s.format {
        Some(F::TextFormat(t)) => LogFormat::Text(Format::parse(t, &join(path, "text_format"))?),
        Some(F::TextFormatSource(ds)) => {
            let p = join(path, "text_format_source");
            let b = crate::datasource::read(ds, &p)?;
            LogFormat::Text(Format::parse(&String::from_utf8_lossy(&b), &p)?)
        }
        Some(F::JsonFormat(j)) => {
            LogFormat::Json(JsonNode::from_struct(j, &join(path, "json_format"))?)
        }
        None => LogFormat::Text(Format::parse(DEFAULT_FORMAT, path)?),
    })
}

/// Formatter extensions a format names: those whose commands Legate
/// knows (it knows them whether named or not).
pub(crate) fn formatters(fs: &[core::TypedExtensionConfig], path: &str) -> Result<()> {
    const KNOWN: &[&str] = &[
        "envoy.extensions.formatter.req_without_query.v3.ReqWithoutQuery",
        "envoy.extensions.formatter.cel.v3.Cel",
        "envoy.extensions.formatter.metadata.v3.Metadata",
    ];
    for (i, f) in fs.iter().enumerate() {
        let t = f
            .typed_config
            .as_ref()
            .map_or("", |a| legate_proto::type_name(&a.type_url));
        if !KNOWN.contains(&t) {
            return Err(ConfigError::new(
                format!("{path}[{i}]"),
                format!("formatter {t} is not supported"),
            ));
        }
    }
    Ok(())
}

/// A filter's `access_log` list: the loggers Legate writes (gRPC ones
/// are skipped; the registry has warned about them).
pub fn list(logs: &[pb::AccessLog], path: &str) -> Result<Vec<Arc<AccessLog>>> {
    logs.iter()
        .enumerate()
        .filter(|(_, a)| {
            !matches!(&a.config_type, Some(pb::access_log::ConfigType::TypedConfig(any))
                if GRPC_TYPES.contains(&legate_proto::type_name(&any.type_url)))
        })
        .map(|(i, a)| AccessLog::from_proto(a, &index(path, "access_log", i)).map(Arc::new))
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An HTTP request (GET /a/b?x=1, two x-forwarded-for values) that
    /// failed upstream with `UF,NR`... as flags go, answered 503.
    pub(crate) fn http_entry() -> Entry<'static> {
        use std::sync::LazyLock;
        static HEADERS: LazyLock<http::HeaderMap> = LazyLock::new(|| {
            let mut h = http::HeaderMap::new();
            h.append("x-forwarded-for", "1.2.3.4".parse().unwrap());
            h.append("x-forwarded-for", "5.6.7.8".parse().unwrap());
            h.insert("user-agent", "t/1".parse().unwrap());
            h
        });
        let mut e = entry();
        e.response_flags = "UF,NR";
        e.http = Some(HttpFacts {
            request: &HEADERS,
            pseudo: crate::config::matcher::Pseudo {
                method: "GET",
                path: "/a/b?x=1",
                authority: "example",
                scheme: "http",
                status: None,
            },
            response: None,
            protocol: "HTTP/1.1",
            response_code: 503,
            details: Some("upstream_reset_before_response_started{connection_failure}"),
            route_name: "r",
            response_duration: None,
            attempts: 1,
            health_check: false,
            traced: false,
        });
        e
    }

    pub(crate) fn entry() -> Entry<'static> {
        Entry {
            start: SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_223_617_042),
            duration: Duration::from_millis(1234),
            bytes_received: 10,
            bytes_sent: 20,
            downstream_remote: "10.1.2.3:5555".parse().unwrap(),
            downstream_direct_remote: "127.0.0.1:40000".parse().unwrap(),
            downstream_local: "127.0.0.1:10000".parse().unwrap(),
            upstream_host: Some("127.0.0.1:8080".parse().unwrap()),
            upstream_local: None,
            upstream_cluster: "echo",
            response_flags: "",
            requested_server_name: "",
            http: None,
            trace: None,
        }
    }

    #[test]
    fn the_default_format_on_a_tcp_connection_is_envoys_line() {
        let f = Format::parse(DEFAULT_FORMAT, "f").unwrap();
        assert_eq!(
            f.render(&entry()),
            "[2026-12-02T15:00:17.042Z] \"- - -\" 0 - 10 20 1234 - \"-\" \"-\" \"-\" \"-\" \"127.0.0.1:8080\"\n"
        );
    }

    #[test]
    fn addresses_clusters_flags_and_literal_percent() {
        let f = Format::parse(
            "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %DOWNSTREAM_DIRECT_REMOTE_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %UPSTREAM_CLUSTER% %RESPONSE_FLAGS% %UPSTREAM_LOCAL_ADDRESS% 100%%",
            "f",
        )
        .unwrap();
        let mut e = entry();
        e.response_flags = "UF";
        assert_eq!(
            f.render(&e),
            "10.1.2.3 127.0.0.1:40000 127.0.0.1:10000 echo UF - 100%"
        );
    }

    #[test]
    fn an_http_stream_logs_its_headers_code_and_flags() {
        let f = Format::parse(
            "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %REQ(X-A):2% %REQ(X-NONE)% %RESP(:STATUS)% %RESP(X-B)% %PROTOCOL% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %ROUTE_NAME% %RESPONSE_DURATION% %TRAILER(GRPC-STATUS)%",
            "f",
        )
        .unwrap();
        let mut req = http::HeaderMap::new();
        req.insert("x-a", "abc".parse().unwrap());
        let mut resp = http::HeaderMap::new();
        resp.insert("x-b", "yes".parse().unwrap());
        let mut flags = Flags::default();
        flags.add("URX");
        flags.add("UF");
        flags.add("URX");
        let joined = flags.joined();
        let mut e = entry();
        e.response_flags = &joined;
        e.http = Some(HttpFacts {
            request: &req,
            pseudo: crate::config::matcher::Pseudo {
                method: "GET",
                path: "/p?q",
                ..Default::default()
            },
            response: Some(&resp),
            protocol: "HTTP/2",
            response_code: 503,
            details: Some("via_upstream"),
            route_name: "r",
            response_duration: Some(Duration::from_millis(7)),
            attempts: 2,
            health_check: false,
            traced: false,
        });
        assert_eq!(
            f.render(&e),
            "GET /p?q ab - 503 yes HTTP/2 503 URX,UF via_upstream r 7 -"
        );
        // The same format on a TCP connection.
        e.http = None;
        e.response_flags = "";
        assert_eq!(f.render(&e), "- - - - - - - 0 - - - - -");
    }

    #[test]
    fn unknown_commands_are_refused_naming_the_field() {
        let e = Format::parse("%NOPE%", "a.b").unwrap_err();
        assert!(e.to_string().contains("a.b"), "{e}");
        assert!(Format::parse("%START_TIME", "a").is_err());
    }

    #[test]
    fn environment_values_are_read_once_and_cut_to_their_length() {
        // PATH is set in every test environment; the other name is not.
        let path = std::env::var("PATH").unwrap();
        let f = Format::parse(
            "%ENVIRONMENT(PATH)%|%ENVIRONMENT(PATH):3%|%ENVIRONMENT(LEGATE_UNSET_VARIABLE_X)%",
            "f",
        )
        .unwrap();
        assert_eq!(f.render(&entry()), format!("{path}|{}|-", &path[..3]));
        assert!(Format::parse("%ENVIRONMENT(PATH):x%", "f").is_err());
        assert!(Format::parse("%ENVIRONMENT(PATH%", "f").is_err());
    }
}
