//! HTTP/1 header name case, as Envoy writes it (`header_key_format`).
//!
//! Envoy keeps names lower case and its HTTP/1 codec writes them so,
//! unless the codec that *read* the message was told otherwise: with the
//! `preserve_case` stateful formatter the message remembers the first
//! spelling of each name it arrived with, and whichever side writes it
//! uses those spellings (names it did not arrive with, the ones Envoy
//! added, are lower case, or proper case with
//! `formatter_type_on_envoy_headers: PROPER_CASE`). Without a formatter
//! on the message, the writing codec's `proper_case_words` applies, else
//! lower case. So a request reaches the upstream as the connection
//! manager's config says, and a response reaches the client as the
//! cluster's does.
//!
//! pingora keeps the case a name arrived in and title-cases a few standard
//! names Legate adds; the rewrite here makes the names on the wire Envoy's.

use crate::config::{join, ConfigError, Result};
use bytes::Bytes;
use legate_proto::envoy_types::pb::envoy::config::core::v3 as core;
use legate_proto::envoy_types::pb::envoy::extensions::http::header_formatters::preserve_case::v3 as pc;
use pingora_http::{RequestHeader, ResponseHeader};

const PRESERVE_CASE: &str =
    "envoy.extensions.http.header_formatters.preserve_case.v3.PreserveCaseFormatterConfig";

/// One codec's `header_key_format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HeaderCase {
    /// None configured: lower case.
    #[default]
    Lower,
    /// `proper_case_words`.
    ProperCase,
    /// The `preserve_case` formatter; `proper_unknown`: names the message
    /// did not arrive with are proper-cased.
    Preserve { proper_unknown: bool },
}

impl HeaderCase {
    /// From `Http1ProtocolOptions` at `path` (its `header_key_format`).
    /// `upstream`: a cluster's, where `forward_reason_phrase` would apply
    /// (not supported; a connection manager's has no effect in Envoy).
    pub fn from_proto(
        h1: Option<&core::Http1ProtocolOptions>,
        path: &str,
        upstream: bool,
    ) -> Result<HeaderCase> {
        let Some(f) = h1.and_then(|h| h.header_key_format.as_ref()) else {
            return Ok(HeaderCase::Lower);
        };
        let fp = join(path, "header_key_format");
        use core::http1_protocol_options::header_key_format::HeaderFormat as F;
        match &f.header_format {
            Some(F::ProperCaseWords(_)) => Ok(HeaderCase::ProperCase),
            Some(F::StatefulFormatter(t)) => {
                let sp = join(&fp, "stateful_formatter");
                let any = t.typed_config.as_ref().ok_or_else(|| {
                    ConfigError::new(join(&sp, "typed_config"), "typed_config is required")
                })?;
                let tn = legate_proto::type_name(&any.type_url);
                if tn != PRESERVE_CASE {
                    return Err(ConfigError::new(
                        join(&sp, "typed_config"),
                        format!("stateful header formatter {tn} is not supported"),
                    ));
                }
                let c: pc::PreserveCaseFormatterConfig =
                    prost::Message::decode(any.value.as_slice())
                        .map_err(|e| ConfigError::new(join(&sp, "typed_config"), e.to_string()))?;
                if upstream && c.forward_reason_phrase {
                    return Err(ConfigError::new(
                        join(&sp, "typed_config.forward_reason_phrase"),
                        "forwarding the upstream's reason phrase is not supported",
                    ));
                }
                use pc::preserve_case_formatter_config::FormatterTypeOnEnvoyHeaders as T;
                Ok(HeaderCase::Preserve {
                    proper_unknown: c.formatter_type_on_envoy_headers == T::ProperCase as i32,
                })
            }
            None => Err(ConfigError::new(
                fp,
                "one of proper_case_words or stateful_formatter is required",
            )),
        }
    }
}

/// Envoy's `proper_case_words`: a letter that starts the name or follows
/// a character that is neither a letter nor a digit is upper-cased; the
/// rest are left as they are.
pub fn proper_case(name: &[u8]) -> Vec<u8> {
    let mut up = true;
    name.iter()
        .map(|&c| {
            let out = if up { c.to_ascii_uppercase() } else { c };
            up = !c.is_ascii_alphanumeric();
            out
        })
        .collect()
}

/// The spellings a message arrived with: the first of each name.
#[derive(Debug, Default, Clone)]
pub struct Spellings(Vec<Bytes>);

impl Spellings {
    fn record<'a>(names: impl Iterator<Item = &'a [u8]>) -> Spellings {
        let mut v: Vec<Bytes> = Vec::new();
        for n in names {
            if !v.iter().any(|s| s.eq_ignore_ascii_case(n)) {
                v.push(Bytes::copy_from_slice(n));
            }
        }
        Spellings(v)
    }

    pub fn of_request(r: &RequestHeader) -> Spellings {
        Self::record(r.case_header_iter().map(|(n, _)| n.as_slice()))
    }

    pub fn of_response(r: &ResponseHeader) -> Spellings {
        Self::record(r.case_header_iter().map(|(n, _)| n.as_slice()))
    }

    fn get(&self, lower: &[u8]) -> Option<&Bytes> {
        self.0.iter().find(|s| s.eq_ignore_ascii_case(lower))
    }
}

/// How names are written for one message: the spellings it arrived with
/// (and how the others are cased), else the writer's proper case, else
/// lower case.
#[derive(Debug, Clone, Copy)]
pub struct Writer<'a> {
    pub spellings: Option<&'a Spellings>,
    pub proper: bool,
}

impl Writer<'_> {
    fn name(&self, lower: &[u8]) -> Vec<u8> {
        if let Some(s) = self.spellings.and_then(|s| s.get(lower)) {
            return s.to_vec();
        }
        if self.proper {
            proper_case(lower)
        } else {
            lower.to_vec()
        }
    }
}

/// What both header types offer the rewrite.
trait Names {
    fn has_case(&self) -> bool;
    fn pairs(&self) -> Vec<(Vec<u8>, http::HeaderValue)>;
    fn lower_names(&self) -> Vec<http::HeaderName>;
    fn remove(&mut self, n: &http::HeaderName);
    fn append(&mut self, n: Vec<u8>, v: http::HeaderValue);
}

macro_rules! names_for {
    ($t:ty) => {
        impl Names for $t {
            fn has_case(&self) -> bool {
                <$t>::has_case(self)
            }
            fn pairs(&self) -> Vec<(Vec<u8>, http::HeaderValue)> {
                self.case_header_iter()
                    .map(|(n, v)| (n.as_slice().to_vec(), v.clone()))
                    .collect()
            }
            fn lower_names(&self) -> Vec<http::HeaderName> {
                self.headers.keys().cloned().collect()
            }
            fn remove(&mut self, n: &http::HeaderName) {
                self.remove_header(n);
            }
            fn append(&mut self, n: Vec<u8>, v: http::HeaderValue) {
                let _ = self.append_header(Bytes::from(n), v);
            }
        }
    };
}

names_for!(RequestHeader);
names_for!(ResponseHeader);

/// Rewrites the names to `w`'s spelling, in their order; nothing is
/// rebuilt when they already are. A message without a case map (one that
/// came over HTTP/2) cannot be given one and keeps pingora's spelling.
fn rewrite(h: &mut impl Names, w: Writer<'_>) {
    if !h.has_case() {
        return;
    }
    let pairs = h.pairs();
    let want: Vec<Vec<u8>> = pairs
        .iter()
        .map(|(n, _)| w.name(&n.to_ascii_lowercase()))
        .collect();
    if pairs.iter().zip(&want).all(|((n, _), w)| n == w) {
        return;
    }
    for n in h.lower_names() {
        h.remove(&n);
    }
    for ((_, v), n) in pairs.into_iter().zip(want) {
        h.append(n, v);
    }
}

/// Writes the request's names as its HTTP/1 upstream will send them.
pub fn write_request(r: &mut RequestHeader, w: Writer<'_>) {
    rewrite(r, w);
}

/// Writes the response's names as its HTTP/1 client will get them.
pub fn write_response(r: &mut ResponseHeader, w: Writer<'_>) {
    rewrite(r, w);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proper_case_is_envoys() {
        let p = |s: &str| String::from_utf8(proper_case(s.as_bytes())).unwrap();
        assert_eq!(p("content-type"), "Content-Type");
        assert_eq!(p("foo$b#$are"), "Foo$B#$Are");
        assert_eq!(p("te"), "Te");
        assert_eq!(p("x-2fa"), "X-2fa");
    }

    fn request() -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        r.append_header("Host", "h").unwrap();
        r.append_header("X-Mixed-Case", "1").unwrap();
        r.append_header("x-mixed-case", "2").unwrap();
        r.append_header(http::header::CONTENT_TYPE, "t").unwrap();
        r
    }

    fn names(r: &RequestHeader) -> Vec<String> {
        r.case_header_iter()
            .map(|(n, _)| String::from_utf8_lossy(n.as_slice()).into_owned())
            .collect()
    }

    #[test]
    fn lower_case_by_default_and_values_kept_in_order() {
        let mut r = request();
        write_request(
            &mut r,
            Writer {
                spellings: None,
                proper: false,
            },
        );
        assert_eq!(
            names(&r),
            ["host", "x-mixed-case", "x-mixed-case", "content-type"]
        );
        let v: Vec<_> = r.headers.get_all("x-mixed-case").iter().collect();
        assert_eq!(v, ["1", "2"]);
    }

    #[test]
    fn preserve_uses_the_first_spelling_and_cases_the_rest() {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        r.append_header("X-Mixed-Case", "1").unwrap();
        r.append_header("HOst", "h").unwrap();
        let s = Spellings::of_request(&r);
        let mut out = request();
        out.append_header("x-forwarded-proto", "http").unwrap();
        write_request(
            &mut out,
            Writer {
                spellings: Some(&s),
                proper: true,
            },
        );
        assert_eq!(
            names(&out),
            [
                "HOst",
                "X-Mixed-Case",
                "X-Mixed-Case",
                "Content-Type",
                "X-Forwarded-Proto"
            ]
        );
    }
}
