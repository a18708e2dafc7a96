//! String, header and query-parameter matchers with Envoy's semantics.

use super::{join, ConfigError, Result};
use legate_proto::envoy_types::pb::envoy::config::route::v3 as route;
use legate_proto::envoy_types::pb::envoy::r#type::matcher::v3 as m;

/// A compiled RE2-style regex that must match the whole input, as Envoy's
/// `safe_regex` does.
#[derive(Debug, Clone)]
pub struct FullRegex(pub regex::Regex);

impl FullRegex {
    pub fn new(pattern: &str, path: &str) -> Result<Self> {
        regex::Regex::new(&format!("^(?:{pattern})$"))
            .map(FullRegex)
            .map_err(|e| ConfigError::new(join(path, "regex"), format!("invalid regex: {e}")))
    }
    pub fn is_match(&self, s: &str) -> bool {
        self.0.is_match(s)
    }
}

/// Compiles a `RegexMatcher` (only the default engine exists in Envoy 1.40).
pub fn regex(r: &m::RegexMatcher, path: &str) -> Result<FullRegex> {
    FullRegex::new(&r.regex, path)
}

#[derive(Debug, Clone)]
enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(FullRegex),
}

/// Envoy's `StringMatcher`.
#[derive(Debug, Clone)]
pub struct StringMatcher {
    pattern: Pattern,
    ignore_case: bool,
}

impl StringMatcher {
    pub fn from_proto(sm: &m::StringMatcher, path: &str) -> Result<Self> {
        use m::string_matcher::MatchPattern as P;
        let lower = |s: &String| {
            if sm.ignore_case {
                s.to_ascii_lowercase()
            } else {
                s.clone()
            }
        };
        let pattern = match &sm.match_pattern {
            Some(P::Exact(s)) => Pattern::Exact(lower(s)),
            Some(P::Prefix(s)) if !s.is_empty() => Pattern::Prefix(lower(s)),
            Some(P::Suffix(s)) if !s.is_empty() => Pattern::Suffix(lower(s)),
            Some(P::Contains(s)) if !s.is_empty() => Pattern::Contains(lower(s)),
            Some(P::Prefix(_)) => {
                return Err(ConfigError::new(join(path, "prefix"), "must not be empty"))
            }
            Some(P::Suffix(_)) => {
                return Err(ConfigError::new(join(path, "suffix"), "must not be empty"))
            }
            Some(P::Contains(_)) => {
                return Err(ConfigError::new(
                    join(path, "contains"),
                    "must not be empty",
                ))
            }
            Some(P::SafeRegex(r)) => {
                if sm.ignore_case {
                    return Err(ConfigError::new(
                        join(path, "ignore_case"),
                        "ignore_case has no effect for safe_regex",
                    ));
                }
                Pattern::Regex(regex(r, &join(path, "safe_regex"))?)
            }
            Some(P::Custom(_)) => {
                return Err(ConfigError::new(
                    join(path, "custom"),
                    "custom matchers are not supported",
                ))
            }
            None => return Err(ConfigError::new(path, "a match pattern is required")),
        };
        Ok(Self {
            pattern,
            ignore_case: sm.ignore_case,
        })
    }

    pub fn exact(s: &str) -> Self {
        Self {
            pattern: Pattern::Exact(s.to_string()),
            ignore_case: false,
        }
    }

    /// The string of an `exact` matcher.
    pub fn exact_value(&self) -> Option<&str> {
        match &self.pattern {
            Pattern::Exact(s) => Some(s),
            _ => None,
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        let owned;
        let v = if self.ignore_case && !matches!(self.pattern, Pattern::Regex(_)) {
            owned = value.to_ascii_lowercase();
            owned.as_str()
        } else {
            value
        };
        match &self.pattern {
            Pattern::Exact(s) => v == s,
            Pattern::Prefix(s) => v.starts_with(s.as_str()),
            Pattern::Suffix(s) => v.ends_with(s.as_str()),
            Pattern::Contains(s) => v.contains(s.as_str()),
            Pattern::Regex(r) => r.is_match(v),
        }
    }
}

#[derive(Debug, Clone)]
enum HeaderTest {
    String(StringMatcher),
    Present(bool),
    Range(i64, i64),
}

/// The request pseudo-headers a matcher may name (`:method`, ...), which
/// HTTP/1 and pingora keep outside the header map.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pseudo<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub authority: &'a str,
    pub scheme: &'a str,
    pub status: Option<u16>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum MatchName {
    Header(http::HeaderName),
    Pseudo(&'static str),
}

/// Envoy's `HeaderMatcher`.
#[derive(Debug, Clone)]
pub struct HeaderMatcher {
    pub name: MatchName,
    test: HeaderTest,
    invert: bool,
    treat_missing_as_empty: bool,
}

impl HeaderMatcher {
    pub fn from_proto(h: &route::HeaderMatcher, path: &str) -> Result<Self> {
        use route::header_matcher::HeaderMatchSpecifier as S;
        let lower = h.name.to_ascii_lowercase();
        let name = match lower.as_str() {
            ":method" => MatchName::Pseudo(":method"),
            ":path" => MatchName::Pseudo(":path"),
            ":authority" | "host" => MatchName::Pseudo(":authority"),
            ":scheme" => MatchName::Pseudo(":scheme"),
            ":status" => MatchName::Pseudo(":status"),
            _ => {
                MatchName::Header(http::HeaderName::from_bytes(lower.as_bytes()).map_err(|_| {
                    ConfigError::new(
                        join(path, "name"),
                        format!("'{}' is not a valid header name", h.name),
                    )
                })?)
            }
        };
        let sm = |p: m::string_matcher::MatchPattern| m::StringMatcher {
            match_pattern: Some(p),
            ignore_case: false,
        };
        use m::string_matcher::MatchPattern as P;
        let test = match &h.header_match_specifier {
            Some(S::ExactMatch(s)) => HeaderTest::String(StringMatcher::from_proto(
                &sm(P::Exact(s.clone())),
                &join(path, "exact_match"),
            )?),
            Some(S::PrefixMatch(s)) => HeaderTest::String(StringMatcher::from_proto(
                &sm(P::Prefix(s.clone())),
                &join(path, "prefix_match"),
            )?),
            Some(S::SuffixMatch(s)) => HeaderTest::String(StringMatcher::from_proto(
                &sm(P::Suffix(s.clone())),
                &join(path, "suffix_match"),
            )?),
            Some(S::ContainsMatch(s)) => HeaderTest::String(StringMatcher::from_proto(
                &sm(P::Contains(s.clone())),
                &join(path, "contains_match"),
            )?),
            Some(S::SafeRegexMatch(r)) => HeaderTest::String(StringMatcher::from_proto(
                &sm(P::SafeRegex(r.clone())),
                &join(path, "safe_regex_match"),
            )?),
            Some(S::StringMatch(s)) => {
                HeaderTest::String(StringMatcher::from_proto(s, &join(path, "string_match"))?)
            }
            Some(S::PresentMatch(p)) => HeaderTest::Present(*p),
            Some(S::RangeMatch(r)) => HeaderTest::Range(r.start, r.end),
            // No specifier: the header must be present (Envoy's default).
            None => HeaderTest::Present(true),
        };
        Ok(Self {
            name,
            test,
            invert: h.invert_match,
            treat_missing_as_empty: h.treat_missing_header_as_empty,
        })
    }

    /// Matches against all values of the header; several values are joined
    /// with "," first, as Envoy does.
    pub fn matches(&self, headers: &http::HeaderMap) -> bool {
        self.matches_with(headers, &Pseudo::default())
    }

    /// As [`Self::matches`], with the request's pseudo-headers.
    pub fn matches_with(&self, headers: &http::HeaderMap, pseudo: &Pseudo) -> bool {
        let name = match &self.name {
            MatchName::Header(n) => n,
            MatchName::Pseudo(p) => {
                let status;
                let v = match *p {
                    ":method" => Some(pseudo.method),
                    ":path" => Some(pseudo.path),
                    ":authority" => Some(pseudo.authority),
                    ":scheme" => Some(pseudo.scheme),
                    _ => {
                        status = pseudo.status.map(|s| s.to_string());
                        status.as_deref()
                    }
                };
                let v = v.filter(|v| !v.is_empty()).map(str::to_string);
                return self.test_value(v);
            }
        };
        let mut values = headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let joined: Option<String> = values
            .next()
            .map(|first| values.fold(first, |acc, v| acc + "," + &v));
        self.test_value(joined)
    }

    fn test_value(&self, value: Option<String>) -> bool {
        let value = match (value, self.treat_missing_as_empty) {
            (Some(v), _) => Some(v),
            (None, true) => Some(String::new()),
            (None, false) => None,
        };
        let result = match (&self.test, value) {
            (HeaderTest::Present(want), v) => {
                // present_match: false is "absent"; inversion applies after.
                v.is_some() == *want
            }
            // A missing header never matches, whatever `invert_match` says.
            (_, None) => return false,
            (HeaderTest::String(sm), Some(v)) => sm.matches(&v),
            (HeaderTest::Range(start, end), Some(v)) => {
                v.parse::<i64>().is_ok_and(|n| n >= *start && n < *end)
            }
        };
        result != self.invert
    }
}

/// Envoy's `QueryParameterMatcher`.
#[derive(Debug, Clone)]
pub struct QueryMatcher {
    pub name: String,
    test: Option<StringMatcher>,
}

impl QueryMatcher {
    pub fn from_proto(q: &route::QueryParameterMatcher, path: &str) -> Result<Self> {
        use route::query_parameter_matcher::QueryParameterMatchSpecifier as S;
        let test = match &q.query_parameter_match_specifier {
            Some(S::StringMatch(s)) => {
                Some(StringMatcher::from_proto(s, &join(path, "string_match"))?)
            }
            Some(S::PresentMatch(true)) | None => None,
            Some(S::PresentMatch(false)) => {
                return Err(ConfigError::new(
                    join(path, "present_match"),
                    "present_match must be true when set",
                ))
            }
        };
        Ok(Self {
            name: q.name.clone(),
            test,
        })
    }

    /// `params` are the decoded query parameters in order; the first value of
    /// the name is the one tested, as in Envoy.
    pub fn matches(&self, params: &[(String, String)]) -> bool {
        match params.iter().find(|(k, _)| *k == self.name) {
            None => false,
            Some((_, v)) => self.test.as_ref().is_none_or(|t| t.matches(v)),
        }
    }
}

/// `RouteMatch.cookies[]`: the named cookie's value against a string
/// matcher; an absent cookie does not match (so it does, inverted).
#[derive(Debug, Clone)]
pub struct CookieMatcher {
    pub name: String,
    test: StringMatcher,
    invert: bool,
}

impl CookieMatcher {
    pub fn from_proto(c: &route::CookieMatcher, path: &str) -> Result<Self> {
        if c.name.is_empty() {
            return Err(ConfigError::new(join(path, "name"), "name is required"));
        }
        let sm = c.string_match.as_ref().ok_or_else(|| {
            ConfigError::new(join(path, "string_match"), "string_match is required")
        })?;
        Ok(Self {
            name: c.name.clone(),
            test: StringMatcher::from_proto(sm, &join(path, "string_match"))?,
            invert: c.invert_match,
        })
    }

    pub fn matches(&self, headers: &http::HeaderMap) -> bool {
        let found =
            crate::headers::cookie(headers, &self.name).is_some_and(|v| self.test.matches(&v));
        found != self.invert
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sm(p: m::string_matcher::MatchPattern, ic: bool) -> StringMatcher {
        StringMatcher::from_proto(
            &m::StringMatcher {
                match_pattern: Some(p),
                ignore_case: ic,
            },
            "x",
        )
        .unwrap()
    }

    #[test]
    fn string_matcher_forms() {
        use m::string_matcher::MatchPattern as P;
        assert!(sm(P::Exact("Foo".into()), true).matches("fOO"));
        assert!(!sm(P::Exact("Foo".into()), false).matches("foo"));
        assert!(sm(P::Prefix("/a".into()), false).matches("/abc"));
        assert!(sm(P::Suffix(".js".into()), false).matches("x.js"));
        assert!(sm(P::Contains("mid".into()), false).matches("amidb"));
        let re = sm(
            P::SafeRegex(m::RegexMatcher {
                regex: "a+b".into(),
                ..Default::default()
            }),
            false,
        );
        assert!(re.matches("aab"));
        assert!(!re.matches("aabc"), "safe_regex is a full match");
    }

    #[test]
    fn header_matcher_invert_and_missing() {
        use route::header_matcher::HeaderMatchSpecifier as S;
        let hm = HeaderMatcher::from_proto(
            &route::HeaderMatcher {
                name: "X-A".into(),
                header_match_specifier: Some(S::ExactMatch("1".into())),
                invert_match: true,
                ..Default::default()
            },
            "h",
        )
        .unwrap();
        let mut h = http::HeaderMap::new();
        assert!(
            !hm.matches(&h),
            "missing header never matches, even inverted"
        );
        h.insert("x-a", "2".parse().unwrap());
        assert!(hm.matches(&h));
        let range = HeaderMatcher::from_proto(
            &route::HeaderMatcher {
                name: "x-n".into(),
                header_match_specifier: Some(S::RangeMatch(
                    legate_proto::envoy_types::pb::envoy::r#type::v3::Int64Range {
                        start: 10,
                        end: 20,
                    },
                )),
                ..Default::default()
            },
            "h",
        )
        .unwrap();
        h.insert("x-n", "19".parse().unwrap());
        assert!(range.matches(&h));
        h.insert("x-n", "20".parse().unwrap());
        assert!(!range.matches(&h), "range end is exclusive");
    }

    #[test]
    fn multiple_values_are_joined() {
        use route::header_matcher::HeaderMatchSpecifier as S;
        let hm = HeaderMatcher::from_proto(
            &route::HeaderMatcher {
                name: "x".into(),
                header_match_specifier: Some(S::ExactMatch("a,b".into())),
                ..Default::default()
            },
            "h",
        )
        .unwrap();
        let mut h = http::HeaderMap::new();
        h.append("x", "a".parse().unwrap());
        h.append("x", "b".parse().unwrap());
        assert!(hm.matches(&h));
    }
}
