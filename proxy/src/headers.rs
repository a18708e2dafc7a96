//! Header mutations (`request_headers_to_add` and friends) and Envoy's
//! `%COMMAND%` header value formatters.

use crate::config::{index, join, ConfigError, Result};
use http::{HeaderMap, HeaderName, HeaderValue};
use legate_proto::envoy_types::pb::envoy::config::core::v3 as core;
use std::net::SocketAddr;

/// Facts a header value may refer to.
#[derive(Default)]
pub struct FormatContext<'a> {
    pub downstream_remote: Option<SocketAddr>,
    pub downstream_direct_remote: Option<SocketAddr>,
    pub downstream_local: Option<SocketAddr>,
    pub upstream_remote: Option<SocketAddr>,
    pub upstream_cluster: &'a str,
    pub protocol: &'a str,
    pub request_headers: Option<&'a HeaderMap>,
    pub response_headers: Option<&'a HeaderMap>,
    pub hostname: &'a str,
    pub pseudo: crate::config::matcher::Pseudo<'a>,
    pub response_code: Option<u16>,
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Lit(String),
    RemoteAddr { port: bool },
    DirectRemoteAddr { port: bool },
    LocalAddr { port: bool },
    LocalPort,
    UpstreamRemoteAddr,
    UpstreamCluster,
    Protocol,
    Hostname,
    StartTime,
    ResponseCode,
    Req(HeaderLookup),
    Resp(HeaderLookup),
}

/// A name in `%REQ(...)%` or `%RESP(...)%`: a header or a pseudo-header.
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderRef {
    Pseudo(&'static str),
    Header(HeaderName),
}

/// `%REQ(a?b):N%` and `%RESP(a?b):N%`: `a`, else `b`, cut to N characters.
/// Header values and access logs share it.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderLookup {
    first: HeaderRef,
    second: Option<HeaderRef>,
    max: Option<usize>,
}

impl HeaderLookup {
    /// Parses `cmd` when it is `OP(...)` (`op` is `REQ` or `RESP`); None
    /// when it is another command.
    pub fn parse(cmd: &str, op: &str, path: &str) -> Result<Option<Self>> {
        let Some(inner) = cmd.strip_prefix(op).and_then(|c| c.strip_prefix('(')) else {
            return Ok(None);
        };
        let bad = |what: &str| ConfigError::new(path, format!("{what} in %{cmd}%"));
        let (names, rest) = inner.split_once(')').ok_or_else(|| bad("missing ')'"))?;
        let name = |n: &str| -> Result<HeaderRef> {
            let lower = n.to_ascii_lowercase();
            if lower.starts_with(':') {
                return match lower.as_str() {
                    ":path" => Ok(HeaderRef::Pseudo(":path")),
                    ":method" => Ok(HeaderRef::Pseudo(":method")),
                    ":authority" => Ok(HeaderRef::Pseudo(":authority")),
                    ":scheme" => Ok(HeaderRef::Pseudo(":scheme")),
                    ":status" => Ok(HeaderRef::Pseudo(":status")),
                    other => Err(bad(&format!("unsupported pseudo-header {other}"))),
                };
            }
            HeaderName::from_bytes(lower.as_bytes())
                .map(HeaderRef::Header)
                .map_err(|_| bad("invalid header name"))
        };
        let (a, b) = names
            .split_once('?')
            .map_or((names, None), |(a, b)| (a, Some(b)));
        let max = match rest.strip_prefix(':') {
            Some(n) => Some(n.parse::<usize>().map_err(|_| bad("bad length"))?),
            None if rest.is_empty() => None,
            None => return Err(bad("unexpected text")),
        };
        Ok(Some(Self {
            first: name(a)?,
            second: b.map(name).transpose()?,
            max,
        }))
    }

    /// The value, or None when neither name is present (or both empty).
    pub fn value(
        &self,
        headers: Option<&HeaderMap>,
        pseudo: &crate::config::matcher::Pseudo,
    ) -> Option<String> {
        let one = |r: &HeaderRef| -> Option<String> {
            let v = match r {
                HeaderRef::Header(n) => {
                    String::from_utf8_lossy(headers?.get(n)?.as_bytes()).into_owned()
                }
                HeaderRef::Pseudo(":status") => pseudo.status?.to_string(),
                HeaderRef::Pseudo(p) => match *p {
                    ":path" => pseudo.path,
                    ":method" => pseudo.method,
                    ":authority" => pseudo.authority,
                    _ => pseudo.scheme,
                }
                .to_string(),
            };
            (!v.is_empty()).then_some(v)
        };
        let v = one(&self.first).or_else(|| self.second.as_ref().and_then(one))?;
        Some(match self.max {
            Some(m) => v.chars().take(m).collect(),
            None => v,
        })
    }
}

/// A parsed header value: literal text and `%COMMAND%` pieces.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderValueFormat(Vec<Piece>);

/// A piece of an Envoy format string: literal text (`%%` is a literal
/// `%`) or a `%COMMAND%`. Header values and access logs share the syntax
/// and differ in the commands they know.
enum Token<'a> {
    Lit(String),
    Cmd(&'a str),
}

/// Splits a format string into literal text and commands.
fn tokens<'a>(s: &'a str, path: &str) -> Result<Vec<Token<'a>>> {
    let mut out = Vec::new();
    let mut lit = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        lit.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('%') {
            lit.push('%');
            rest = r;
            continue;
        }
        let end = rest
            .find('%')
            .ok_or_else(|| ConfigError::new(path, format!("unterminated '%' in '{s}'")))?;
        if !lit.is_empty() {
            out.push(Token::Lit(std::mem::take(&mut lit)));
        }
        out.push(Token::Cmd(&rest[..end]));
        rest = &rest[end + 1..];
    }
    lit.push_str(rest);
    if !lit.is_empty() {
        out.push(Token::Lit(lit));
    }
    Ok(out)
}

/// The first cookie `name` in the request's `cookie` headers, as Envoy
/// reads one: pairs split on `;`, leading whitespace dropped, the value
/// after the first `=`, one pair of surrounding quotes removed.
pub fn cookie(headers: &http::HeaderMap, name: &str) -> Option<String> {
    for h in headers.get_all(http::header::COOKIE) {
        let h = String::from_utf8_lossy(h.as_bytes());
        for part in h.split(';') {
            let Some((k, v)) = part.trim_start().split_once('=') else {
                continue;
            };
            if k == name {
                let v = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v);
                return Some(v.to_string());
            }
        }
    }
    None
}

/// Takes cookie `name` out of the request's `cookie` headers, which become
/// one header of the pairs left (`; `-joined), or none.
pub fn remove_cookie(req: &mut pingora_http::RequestHeader, name: &str) {
    let mut kept = Vec::new();
    for h in req.headers.get_all(http::header::COOKIE) {
        let h = String::from_utf8_lossy(h.as_bytes());
        for part in h.split(';') {
            let part = part.trim_start();
            if part.split_once('=').map_or(part, |(k, _)| k) != name && !part.is_empty() {
                kept.push(part.to_string());
            }
        }
    }
    req.remove_header(&http::header::COOKIE);
    if !kept.is_empty() {
        let _ = req.insert_header(http::header::COOKIE, kept.join("; "));
    }
}

/// Parses a format string into pieces: literal text through `lit`, each
/// command through `cmd` (which refuses the ones it does not know).
pub fn parse_pieces<P>(
    s: &str,
    path: &str,
    lit: fn(String) -> P,
    mut cmd: impl FnMut(&str) -> Result<P>,
) -> Result<Vec<P>> {
    tokens(s, path)?
        .into_iter()
        .map(|t| match t {
            Token::Lit(l) => Ok(lit(l)),
            Token::Cmd(c) => cmd(c),
        })
        .collect()
}

impl HeaderValueFormat {
    pub fn parse(s: &str, path: &str) -> Result<Self> {
        parse_pieces(s, path, Piece::Lit, |cmd| Self::command(cmd, path)).map(Self)
    }

    fn command(cmd: &str, path: &str) -> Result<Piece> {
        if let Some(l) = HeaderLookup::parse(cmd, "REQ", path)? {
            return Ok(Piece::Req(l));
        }
        if let Some(l) = HeaderLookup::parse(cmd, "RESP", path)? {
            return Ok(Piece::Resp(l));
        }
        Ok(match cmd {
            "DOWNSTREAM_REMOTE_ADDRESS" => Piece::RemoteAddr { port: true },
            "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Piece::RemoteAddr { port: false },
            "DOWNSTREAM_DIRECT_REMOTE_ADDRESS" => Piece::DirectRemoteAddr { port: true },
            "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT" => {
                Piece::DirectRemoteAddr { port: false }
            }
            "DOWNSTREAM_LOCAL_ADDRESS" => Piece::LocalAddr { port: true },
            "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => Piece::LocalAddr { port: false },
            "DOWNSTREAM_LOCAL_PORT" => Piece::LocalPort,
            "UPSTREAM_REMOTE_ADDRESS" => Piece::UpstreamRemoteAddr,
            "UPSTREAM_CLUSTER" => Piece::UpstreamCluster,
            "PROTOCOL" => Piece::Protocol,
            "HOSTNAME" => Piece::Hostname,
            "START_TIME" => Piece::StartTime,
            "RESPONSE_CODE" => Piece::ResponseCode,
            other => {
                return Err(ConfigError::new(
                    path,
                    format!("unsupported header formatter %{other}%"),
                ))
            }
        })
    }

    pub fn literal(&self) -> Option<&str> {
        match self.0.as_slice() {
            [] => Some(""),
            [Piece::Lit(s)] => Some(s),
            _ => None,
        }
    }

    pub fn render(&self, ctx: &FormatContext) -> String {
        let mut out = String::new();
        let addr = |a: Option<SocketAddr>, port: bool| match (a, port) {
            (Some(a), true) => a.to_string(),
            (Some(a), false) => a.ip().to_string(),
            (None, _) => String::new(),
        };
        for p in &self.0 {
            match p {
                Piece::Lit(s) => out.push_str(s),
                Piece::RemoteAddr { port } => out.push_str(&addr(ctx.downstream_remote, *port)),
                Piece::DirectRemoteAddr { port } => {
                    out.push_str(&addr(ctx.downstream_direct_remote, *port))
                }
                Piece::LocalAddr { port } => out.push_str(&addr(ctx.downstream_local, *port)),
                Piece::LocalPort => out.push_str(
                    &ctx.downstream_local
                        .map(|a| a.port().to_string())
                        .unwrap_or_default(),
                ),
                Piece::UpstreamRemoteAddr => out.push_str(&addr(ctx.upstream_remote, true)),
                Piece::UpstreamCluster => out.push_str(ctx.upstream_cluster),
                Piece::Protocol => out.push_str(ctx.protocol),
                Piece::Hostname => out.push_str(ctx.hostname),
                Piece::ResponseCode => {
                    out.push_str(&ctx.response_code.map_or("0".to_string(), |c| c.to_string()))
                }
                Piece::StartTime => {
                    out.push_str(&httpdate::fmt_http_date(std::time::SystemTime::now()))
                }
                Piece::Req(l) => out.push_str(
                    &l.value(ctx.request_headers, &ctx.pseudo)
                        .unwrap_or_default(),
                ),
                Piece::Resp(l) => {
                    let pseudo = crate::config::matcher::Pseudo {
                        status: ctx.response_code,
                        ..ctx.pseudo
                    };
                    out.push_str(&l.value(ctx.response_headers, &pseudo).unwrap_or_default())
                }
            }
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AppendAction {
    AppendIfExistsOrAdd,
    AddIfAbsent,
    OverwriteIfExistsOrAdd,
    OverwriteIfExists,
}

#[derive(Debug, Clone)]
pub struct HeaderAdd {
    pub name: HeaderName,
    pub value: HeaderValueFormat,
    pub action: AppendAction,
    pub keep_empty: bool,
}

/// The header mutations of one level (route config, vhost, route, weighted cluster).
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    pub request_add: Vec<HeaderAdd>,
    pub request_remove: Vec<HeaderName>,
    pub response_add: Vec<HeaderAdd>,
    pub response_remove: Vec<HeaderName>,
}

impl HeaderOps {
    /// Whether this level changes request headers at all.
    pub fn touches_request(&self) -> bool {
        !self.request_add.is_empty() || !self.request_remove.is_empty()
    }

    /// Whether this level changes response headers at all.
    pub fn touches_response(&self) -> bool {
        !self.response_add.is_empty() || !self.response_remove.is_empty()
    }
}

pub fn header_name(s: &str, path: &str) -> Result<HeaderName> {
    HeaderName::from_bytes(s.to_ascii_lowercase().as_bytes())
        .map_err(|_| ConfigError::new(path, format!("'{s}' is not a valid header name")))
}

fn adds(list: &[core::HeaderValueOption], path: &str, field: &str) -> Result<Vec<HeaderAdd>> {
    list.iter()
        .enumerate()
        .map(|(i, o)| header_add(o, &index(path, field, i)))
        .collect()
}

/// One `HeaderValueOption` at `p`, as route tables and the header mutation
/// filter read it.
pub fn header_add(o: &core::HeaderValueOption, p: &str) -> Result<HeaderAdd> {
    let h = o
        .header
        .as_ref()
        .ok_or_else(|| ConfigError::new(join(p, "header"), "header is required"))?;
    let name = header_name(&h.key, &join(p, "header.key"))?;
    // Envoy forbids mutating pseudo-headers and `host` this way.
    if h.key.starts_with(':') || name == http::header::HOST {
        return Err(ConfigError::new(
            join(p, "header.key"),
            format!("'{}' may not be modified", h.key),
        ));
    }
    // Envoy's route header parser reads `value` only: a `raw_value` alone
    // makes an empty value (dropped unless keep_empty_value).
    let raw = h.value.clone();
    let value = HeaderValueFormat::parse(&raw, &join(p, "header.value"))?;
    if let Some(lit) = value.literal() {
        if HeaderValue::from_str(lit).is_err() {
            return Err(ConfigError::new(
                join(p, "header.value"),
                "not a valid header value",
            ));
        }
    }
    use core::header_value_option::HeaderAppendAction as A;
    let action = match o.append.as_ref().map(|b| b.value) {
        Some(true) => AppendAction::AppendIfExistsOrAdd,
        Some(false) => AppendAction::OverwriteIfExistsOrAdd,
        None => match A::try_from(o.append_action).unwrap_or(A::AppendIfExistsOrAdd) {
            A::AppendIfExistsOrAdd => AppendAction::AppendIfExistsOrAdd,
            A::AddIfAbsent => AppendAction::AddIfAbsent,
            A::OverwriteIfExistsOrAdd => AppendAction::OverwriteIfExistsOrAdd,
            A::OverwriteIfExists => AppendAction::OverwriteIfExists,
        },
    };
    Ok(HeaderAdd {
        name,
        value,
        action,
        keep_empty: o.keep_empty_value,
    })
}

fn removes(list: &[String], path: &str, field: &str) -> Result<Vec<HeaderName>> {
    list.iter()
        .enumerate()
        .map(|(i, s)| {
            let p = index(path, field, i);
            if s.starts_with(':') || s.eq_ignore_ascii_case("host") {
                return Err(ConfigError::new(
                    p,
                    ":-prefixed or host headers may not be removed",
                ));
            }
            header_name(s, &p)
        })
        .collect()
}

impl HeaderOps {
    pub fn from_proto(
        req_add: &[core::HeaderValueOption],
        req_remove: &[String],
        resp_add: &[core::HeaderValueOption],
        resp_remove: &[String],
        path: &str,
    ) -> Result<Self> {
        Ok(Self {
            request_add: adds(req_add, path, "request_headers_to_add")?,
            request_remove: removes(req_remove, path, "request_headers_to_remove")?,
            response_add: adds(resp_add, path, "response_headers_to_add")?,
            response_remove: removes(resp_remove, path, "response_headers_to_remove")?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.request_add.is_empty()
            && self.request_remove.is_empty()
            && self.response_add.is_empty()
            && self.response_remove.is_empty()
    }
}

/// Something whose headers can be mutated (pingora's request and response
/// headers keep a case map, so they must be changed through their methods).
pub trait HeaderSink {
    fn map(&self) -> &HeaderMap;
    fn set(&mut self, name: HeaderName, value: HeaderValue);
    fn append(&mut self, name: HeaderName, value: HeaderValue);
    fn remove(&mut self, name: &HeaderName);
}

impl HeaderSink for HeaderMap {
    fn map(&self) -> &HeaderMap {
        self
    }
    fn set(&mut self, name: HeaderName, value: HeaderValue) {
        self.insert(name, value);
    }
    fn append(&mut self, name: HeaderName, value: HeaderValue) {
        HeaderMap::append(self, name, value);
    }
    fn remove(&mut self, name: &HeaderName) {
        HeaderMap::remove(self, name);
    }
}

impl HeaderSink for pingora_http::RequestHeader {
    fn map(&self) -> &HeaderMap {
        &self.headers
    }
    fn set(&mut self, name: HeaderName, value: HeaderValue) {
        let _ = self.insert_header(name, value);
    }
    fn append(&mut self, name: HeaderName, value: HeaderValue) {
        let _ = self.append_header(name, value);
    }
    fn remove(&mut self, name: &HeaderName) {
        let _ = self.remove_header(name);
    }
}

impl HeaderSink for pingora_http::ResponseHeader {
    fn map(&self) -> &HeaderMap {
        &self.headers
    }
    fn set(&mut self, name: HeaderName, value: HeaderValue) {
        let _ = self.insert_header(name, value);
    }
    fn append(&mut self, name: HeaderName, value: HeaderValue) {
        let _ = self.append_header(name, value);
    }
    fn remove(&mut self, name: &HeaderName) {
        let _ = self.remove_header(name);
    }
}

/// Applies removals, then additions, as Envoy's HeaderParser does.
pub fn apply(
    adds: &[HeaderAdd],
    removes: &[HeaderName],
    sink: &mut dyn HeaderSink,
    ctx: &FormatContext,
) {
    for name in removes {
        sink.remove(name);
    }
    for a in adds {
        let rendered = a.value.render(ctx);
        // Envoy drops a header whose formatted value is empty unless asked.
        if rendered.is_empty() && !a.keep_empty {
            continue;
        }
        let Ok(value) = HeaderValue::from_str(&rendered) else {
            continue;
        };
        let exists = sink.map().contains_key(&a.name);
        match a.action {
            AppendAction::AppendIfExistsOrAdd => sink.append(a.name.clone(), value),
            AppendAction::AddIfAbsent if !exists => sink.set(a.name.clone(), value),
            AppendAction::AddIfAbsent => {}
            AppendAction::OverwriteIfExistsOrAdd => sink.set(a.name.clone(), value),
            AppendAction::OverwriteIfExists if exists => sink.set(a.name.clone(), value),
            AppendAction::OverwriteIfExists => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatter_parses_and_renders() {
        let f = HeaderValueFormat::parse(
            "ip=%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% 100%% %REQ(X-A)%",
            "v",
        )
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-a", "aa".parse().unwrap());
        let ctx = FormatContext {
            downstream_remote: Some("10.0.0.1:5".parse().unwrap()),
            request_headers: Some(&h),
            ..Default::default()
        };
        assert_eq!(f.render(&ctx), "ip=10.0.0.1 100% aa");
        assert!(HeaderValueFormat::parse("%NOPE%", "v")
            .unwrap_err()
            .to_string()
            .contains("NOPE"));
    }

    #[test]
    fn append_actions() {
        let mk = |action| HeaderAdd {
            name: HeaderName::from_static("x"),
            value: HeaderValueFormat::parse("n", "").unwrap(),
            action,
            keep_empty: false,
        };
        let ctx = FormatContext::default();
        let mut h = HeaderMap::new();
        h.insert("x", "o".parse().unwrap());
        apply(&[mk(AppendAction::AppendIfExistsOrAdd)], &[], &mut h, &ctx);
        assert_eq!(h.get_all("x").iter().count(), 2);
        apply(
            &[mk(AppendAction::OverwriteIfExistsOrAdd)],
            &[],
            &mut h,
            &ctx,
        );
        assert_eq!(h.get_all("x").iter().collect::<Vec<_>>(), ["n"]);
        let mut empty = HeaderMap::new();
        apply(
            &[mk(AppendAction::OverwriteIfExists)],
            &[],
            &mut empty,
            &ctx,
        );
        assert!(empty.is_empty());
        apply(&[mk(AppendAction::AddIfAbsent)], &[], &mut empty, &ctx);
        assert_eq!(empty.get("x").unwrap(), "n");
    }
}
