//! Access log filters (`AccessLog.filter`): whether an entry is written,
//! decided as Envoy decides it from the finished request or connection.

use super::Entry;
use crate::config::matcher::HeaderMatcher;
use crate::config::{index, join, ConfigError, Result};
use legate_proto::envoy_types::pb::envoy::config::accesslog::v3 as pb;

/// Envoy's response flag names, as `response_flag_filter` accepts them.
pub const FLAGS: &[&str] = &[
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC",
    "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR",
    "UDO",
];

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    Eq,
    Ge,
    Le,
    Ne,
}

impl Op {
    fn holds(self, value: u64, bound: u64) -> bool {
        match self {
            Op::Eq => value == bound,
            Op::Ge => value >= bound,
            Op::Le => value <= bound,
            Op::Ne => value != bound,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Filter {
    /// The response code (0 when none was sent) against a bound.
    Status(Op, u64),
    /// The request's duration in milliseconds against a bound.
    Duration(Op, u64),
    NotHealthCheck,
    Traceable,
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Header(HeaderMatcher),
    /// Any of these flags set (any flag at all when empty).
    Flags(Vec<String>),
    /// A CEL expression that must yield true.
    Cel(crate::cel::Expression),
    /// A filter Legate does not evaluate (runtime, gRPC status, metadata,
    /// log type): it keeps every entry, as the registry warns (logs change
    /// no traffic).
    Unevaluated,
}

impl Filter {
    pub fn from_proto(f: &pb::AccessLogFilter, path: &str) -> Result<Self> {
        use pb::access_log_filter::FilterSpecifier as S;
        Ok(match &f.filter_specifier {
            Some(S::StatusCodeFilter(s)) => {
                let (op, v) = comparison(s.comparison.as_ref(), &join(path, "status_code_filter"))?;
                Filter::Status(op, v)
            }
            Some(S::DurationFilter(d)) => {
                let (op, v) = comparison(d.comparison.as_ref(), &join(path, "duration_filter"))?;
                Filter::Duration(op, v)
            }
            Some(S::NotHealthCheckFilter(_)) => Filter::NotHealthCheck,
            Some(S::TraceableFilter(_)) => Filter::Traceable,
            Some(S::AndFilter(a)) => Filter::And(list(&a.filters, &join(path, "and_filter"))?),
            Some(S::OrFilter(o)) => Filter::Or(list(&o.filters, &join(path, "or_filter"))?),
            Some(S::HeaderFilter(h)) => {
                let p = join(path, "header_filter.header");
                let m = h
                    .header
                    .as_ref()
                    .ok_or_else(|| ConfigError::new(&p, "header is required"))?;
                Filter::Header(HeaderMatcher::from_proto(m, &p)?)
            }
            Some(S::ResponseFlagFilter(r)) => {
                for (i, f) in r.flags.iter().enumerate() {
                    if !FLAGS.contains(&f.as_str()) {
                        return Err(ConfigError::new(
                            index(&join(path, "response_flag_filter"), "flags", i),
                            format!("'{f}' is not a response flag"),
                        ));
                    }
                }
                Filter::Flags(r.flags.clone())
            }
            Some(S::ExtensionFilter(x)) => extension(x, &join(path, "extension_filter"))?,
            Some(
                S::RuntimeFilter(_)
                | S::GrpcStatusFilter(_)
                | S::MetadataFilter(_)
                | S::LogTypeFilter(_),
            ) => Filter::Unevaluated,
            None => return Err(ConfigError::new(path, "a filter is required")),
        })
    }

    pub fn evaluate(&self, e: &Entry) -> bool {
        let http = e.http.as_ref();
        match self {
            Filter::Status(op, v) => op.holds(http.map_or(0, |h| h.response_code.into()), *v),
            Filter::Duration(op, v) => op.holds(e.duration.as_millis() as u64, *v),
            Filter::NotHealthCheck => !http.is_some_and(|h| h.health_check),
            Filter::Traceable => http.is_some_and(|h| h.traced),
            Filter::And(fs) => fs.iter().all(|f| f.evaluate(e)),
            Filter::Or(fs) => fs.iter().any(|f| f.evaluate(e)),
            Filter::Header(m) => http.is_some_and(|h| m.matches_with(h.request, &h.pseudo)),
            Filter::Flags(want) => {
                let have = e.response_flags.split(',').filter(|f| !f.is_empty());
                if want.is_empty() {
                    have.count() > 0
                } else {
                    have.into_iter().any(|f| want.iter().any(|w| w == f))
                }
            }
            // Envoy writes nothing for an expression that fails or is not
            // a boolean.
            Filter::Cel(x) => matches!(x.evaluate(e), Some(cel::objects::Value::Bool(true))),
            Filter::Unevaluated => true,
        }
    }

    /// Whether every entry this filter keeps has the `NR` flag: what a
    /// listener's log (written only for connections no chain takes) must
    /// keep to write what Envoy writes.
    pub fn implies_no_route(&self) -> bool {
        match self {
            Filter::Flags(f) => !f.is_empty() && f.iter().all(|f| f == "NR"),
            Filter::And(fs) => fs.iter().any(Filter::implies_no_route),
            Filter::Or(fs) => !fs.is_empty() && fs.iter().all(Filter::implies_no_route),
            _ => false,
        }
    }
}

fn list(fs: &[pb::AccessLogFilter], path: &str) -> Result<Vec<Filter>> {
    fs.iter()
        .enumerate()
        .map(|(i, f)| Filter::from_proto(f, &index(path, "filters", i)))
        .collect()
}

/// `ComparisonFilter`: its operator and default value (a runtime key
/// overriding the value is refused: the logger reads no runtime).
fn comparison(c: Option<&pb::ComparisonFilter>, path: &str) -> Result<(Op, u64)> {
    let p = join(path, "comparison");
    let c = c.ok_or_else(|| ConfigError::new(&p, "comparison is required"))?;
    let op = match pb::comparison_filter::Op::try_from(c.op) {
        Ok(pb::comparison_filter::Op::Eq) => Op::Eq,
        Ok(pb::comparison_filter::Op::Ge) => Op::Ge,
        Ok(pb::comparison_filter::Op::Le) => Op::Le,
        Ok(pb::comparison_filter::Op::Ne) => Op::Ne,
        Err(_) => return Err(ConfigError::new(join(&p, "op"), "unknown operator")),
    };
    let v = c
        .value
        .as_ref()
        .ok_or_else(|| ConfigError::new(join(&p, "value"), "value is required"))?;
    if !v.runtime_key.is_empty() {
        return Err(ConfigError::new(
            join(&p, "value.runtime_key"),
            "runtime overrides of access log filters are not supported",
        ));
    }
    Ok((op, v.default_value.into()))
}

const CEL_FILTER: &str = "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter";

fn extension(x: &pb::ExtensionFilter, path: &str) -> Result<Filter> {
    let Some(pb::extension_filter::ConfigType::TypedConfig(any)) = &x.config_type else {
        return Err(ConfigError::new(
            join(path, "typed_config"),
            "typed_config is required",
        ));
    };
    let tc = join(path, "typed_config");
    match legate_proto::type_name(&any.type_url) {
        CEL_FILTER => {
            use legate_proto::envoy_types::pb::envoy::extensions::access_loggers::filters::cel::v3::ExpressionFilter;
            let f: ExpressionFilter = prost::Message::decode(any.value.as_slice())
                .map_err(|e| ConfigError::new(&tc, e.to_string()))?;
            Ok(Filter::Cel(crate::cel::Expression::parse(
                &f.expression,
                &join(&tc, "expression"),
            )?))
        }
        other => Err(ConfigError::new(
            tc,
            format!("access log filter {other} is not supported"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(yaml: &str) -> Result<Filter> {
        let v = legate_proto::json::parse_yaml(&format!("{{{yaml}}}")).expect("yaml");
        let f: pb::AccessLogFilter =
            legate_proto::json::to_message(v, "envoy.config.accesslog.v3.AccessLogFilter", true)
                .expect("an AccessLogFilter");
        Filter::from_proto(&f, "f")
    }

    #[test]
    fn status_duration_flags_and_logic_decide_as_envoy() {
        let e = crate::access_log::tests::http_entry(); // 503, 1234 ms, UF,NR
        let yes = |y: &str| filter(y).unwrap().evaluate(&e);
        assert!(yes(
            "status_code_filter: {comparison: {op: GE, value: {default_value: 500}}}"
        ));
        assert!(!yes(
            "status_code_filter: {comparison: {op: LE, value: {default_value: 499}}}"
        ));
        assert!(yes(
            "duration_filter: {comparison: {op: GE, value: {default_value: 1000}}}"
        ));
        assert!(yes("response_flag_filter: {flags: [UF]}"));
        assert!(yes("response_flag_filter: {}"));
        assert!(!yes("response_flag_filter: {flags: [UH]}"));
        assert!(yes("not_health_check_filter: {}"));
        assert!(!yes("traceable_filter: {}"));
        assert!(yes(
            "header_filter: {header: {name: user-agent, string_match: {exact: t/1}}}"
        ));
        assert!(!yes("and_filter: {filters: [{response_flag_filter: {flags: [UF]}}, {traceable_filter: {}}]}"));
        assert!(yes("or_filter: {filters: [{response_flag_filter: {flags: [UH]}}, {not_health_check_filter: {}}]}"));
        assert!(yes(
            r#"extension_filter: {name: cel, typed_config: {"@type": type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter, expression: "response.code >= 400"}}"#
        ));
        // A non-boolean or failing expression keeps nothing.
        assert!(!yes(
            r#"extension_filter: {name: cel, typed_config: {"@type": type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter, expression: "response.code"}}"#
        ));
    }

    #[test]
    fn only_filters_that_keep_nr_alone_suit_a_listener() {
        let nr = |y: &str| filter(y).unwrap().implies_no_route();
        assert!(nr("response_flag_filter: {flags: [NR]}"));
        assert!(nr("and_filter: {filters: [{status_code_filter: {comparison: {op: GE, value: {default_value: 0}}}}, {response_flag_filter: {flags: [NR]}}]}"));
        assert!(!nr("response_flag_filter: {flags: [NR, UF]}"));
        assert!(!nr(
            "or_filter: {filters: [{response_flag_filter: {flags: [NR]}}, {traceable_filter: {}}]}"
        ));
    }

    #[test]
    fn bad_flags_and_runtime_overrides_are_refused_naming_the_field() {
        let e = filter("response_flag_filter: {flags: [XX]}").unwrap_err();
        assert!(
            e.to_string().contains("f.response_flag_filter.flags[0]"),
            "{e}"
        );
        let e = filter(
            "status_code_filter: {comparison: {op: EQ, value: {default_value: 1, runtime_key: k}}}",
        )
        .unwrap_err();
        assert!(e.to_string().contains("runtime_key"), "{e}");
    }
}
