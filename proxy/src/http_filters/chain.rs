//! The ordered filter chain of one connection manager, and the per-route
//! configs (`typed_per_filter_config`) that enable, disable and configure
//! its filters route by route.

use super::{HttpFilter, PerRoute};
use crate::config::{join, ConfigError, Result};
use legate_proto::envoy_types::pb::envoy::config::route::v3 as route_pb;
use legate_proto::envoy_types::pb::google::protobuf::Any;
use std::collections::HashMap;
use std::sync::Arc;

const FILTER_CONFIG_TYPE: &str = "envoy.config.route.v3.FilterConfig";

/// One configured filter.
#[derive(Debug)]
pub struct Entry {
    /// `HttpFilter.name`: the key of per-route configs.
    pub name: String,
    pub filter: Arc<dyn HttpFilter>,
    /// `HttpFilter.disabled`: off unless a route's per-filter config
    /// enables it.
    pub disabled: bool,
}

/// The filters before the router, in configured order.
#[derive(Debug, Default)]
pub struct FilterChain {
    pub entries: Vec<Entry>,
}

impl FilterChain {
    /// Builds the filter of one `http_filters` entry (not the router).
    pub fn entry(
        name: &str,
        typed: &Any,
        disabled: bool,
        hcm_prefix: &str,
        path: &str,
    ) -> Result<Option<Entry>> {
        let tn = legate_proto::type_name(&typed.type_url);
        let Some(factory) = super::factory(tn) else {
            return Ok(None);
        };
        Ok(Some(Entry {
            name: name.to_string(),
            filter: (factory.build)(typed, hcm_prefix, path)?,
            disabled,
        }))
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// One level's per-filter configs (route configuration, virtual host,
/// route or weighted cluster), by filter name.
#[derive(Debug, Default)]
pub struct PerFilterConfigs {
    by_name: HashMap<String, PerFilter>,
}

#[derive(Debug)]
struct PerFilter {
    /// None for a `FilterConfig` that only disables (or enables) the
    /// filter.
    config: Option<PerRoute>,
    disabled: bool,
}

impl PerFilterConfigs {
    /// The SDS secrets these configs read (an `OAuth2PerRoute`'s), for the
    /// route table's owner to subscribe to.
    pub fn sds_refs(&self) -> impl Iterator<Item = &(String, crate::config::source::XdsSource)> {
        self.by_name
            .values()
            .filter_map(|f| f.config.as_ref())
            .flat_map(super::per_route_sds)
    }

    pub fn from_proto(map: &HashMap<String, Any>, path: &str) -> Result<Self> {
        let mut by_name = HashMap::new();
        // Sorted so that the first error reported does not depend on the
        // map's order.
        let mut names: Vec<&String> = map.keys().collect();
        names.sort();
        for name in names {
            let p = format!("{}[\"{name}\"]", join(path, "typed_per_filter_config"));
            if let Some(pf) = per_filter(&map[name], &p)? {
                by_name.insert(name.clone(), pf);
            }
        }
        Ok(Self { by_name })
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Whether this level enables (false) or disables (true) the filter,
    /// if it says.
    pub fn disabled(&self, name: &str) -> Option<bool> {
        self.by_name.get(name).map(|p| p.disabled)
    }

    pub fn config(&self, name: &str) -> Option<&PerRoute> {
        self.by_name.get(name)?.config.as_ref()
    }
}

/// Envoy's per-filter config: either the filter's own per-route type, or
/// the `FilterConfig` wrapper (`disabled`, `is_optional`, `config`).
fn per_filter(a: &Any, path: &str) -> Result<Option<PerFilter>> {
    let tn = legate_proto::type_name(&a.type_url);
    if tn != FILTER_CONFIG_TYPE {
        return Ok(Some(PerFilter {
            config: Some(translate(a, path)?),
            disabled: false,
        }));
    }
    let fc: route_pb::FilterConfig = super::decode(a, path)?;
    if fc.disabled {
        return Ok(Some(PerFilter {
            config: None,
            disabled: true,
        }));
    }
    let Some(inner) = &fc.config else {
        return Err(ConfigError::new(
            path,
            "Empty route/virtual host per filter configuration: set config or disabled",
        ));
    };
    // An empty config (`config: {}`) only enables the filter.
    if inner.type_url == legate_proto::json::EMPTY_ANY || inner.type_url.is_empty() {
        return Ok(Some(PerFilter {
            config: None,
            disabled: false,
        }));
    }
    let ip = join(path, "config");
    let itn = legate_proto::type_name(&inner.type_url);
    if super::per_route_translator(itn).is_none()
        && fc.is_optional
        && legate_proto::pool().get_message_by_name(itn).is_none()
    {
        // Envoy skips an optional config of a type it does not know.
        tracing::warn!(path = %ip, config = %itn, "optional per-route filter config of an unknown type: skipped");
        return Ok(None);
    }
    Ok(Some(PerFilter {
        config: Some(translate(inner, &ip)?),
        disabled: false,
    }))
}

fn translate(a: &Any, path: &str) -> Result<PerRoute> {
    let tn = legate_proto::type_name(&a.type_url);
    let f = super::per_route_translator(tn)
        .ok_or_else(|| ConfigError::new(path, format!("per-route config {tn} is not supported")))?;
    f(a, path)
}

/// The per-filter configs that apply to one request, most specific first:
/// the weighted cluster, the route, the virtual host, the route
/// configuration (Envoy's `resolveMostSpecificPerFilterConfig`).
pub struct Levels<'a>(pub [Option<&'a PerFilterConfigs>; 4]);

impl Levels<'_> {
    /// Whether the filter runs: the most specific level that names it
    /// decides, else its `HttpFilter.disabled`. The weighted cluster's
    /// entry configures but does not enable or disable, as in Envoy.
    pub fn enabled(&self, e: &Entry) -> bool {
        let said = self.0[1..]
            .iter()
            .flatten()
            .find_map(|l| l.disabled(&e.name));
        !said.unwrap_or(e.disabled)
    }

    /// The filter's config at each level, most specific first.
    pub fn configs(&self, name: &str) -> [Option<&PerRoute>; 4] {
        self.0.map(|l| l.and_then(|l| l.config(name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configs(yaml: &str) -> PerFilterConfigs {
        let v = legate_proto::json::parse_yaml(yaml).unwrap();
        let m = legate_proto::json::to_dynamic(v, "envoy.config.route.v3.Route", true).unwrap();
        let r: route_pb::Route = m.transcode_to().unwrap();
        PerFilterConfigs::from_proto(&r.typed_per_filter_config, "route").unwrap()
    }

    fn entry(disabled: bool) -> Entry {
        let a = Any {
            type_url: "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors".into(),
            value: vec![],
        };
        FilterChain::entry("f", &a, disabled, "p", "f")
            .unwrap()
            .unwrap()
    }

    const DISABLE: &str = r#"{typed_per_filter_config: {f: {"@type": type.googleapis.com/envoy.config.route.v3.FilterConfig, disabled: true}}}"#;
    const ENABLE: &str = r#"{typed_per_filter_config: {f: {"@type": type.googleapis.com/envoy.config.route.v3.FilterConfig, config: {}}}}"#;
    const POLICY: &str = r#"{typed_per_filter_config: {f: {"@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy, max_age: "1"}}}"#;

    #[test]
    fn the_most_specific_level_that_names_the_filter_decides() {
        let (off, on, policy) = (configs(DISABLE), configs(ENABLE), configs(POLICY));
        // Disabled on the virtual host, enabled again on the route.
        assert!(Levels([None, Some(&on), Some(&off), None]).enabled(&entry(false)));
        assert!(!Levels([None, Some(&off), Some(&on), None]).enabled(&entry(false)));
        // HttpFilter.disabled holds until a level names the filter; a
        // plain per-route config enables it.
        assert!(!Levels([None, None, None, None]).enabled(&entry(true)));
        assert!(Levels([None, None, None, Some(&policy)]).enabled(&entry(true)));
        // The weighted cluster's entry configures but does not switch.
        assert!(!Levels([Some(&on), None, None, None]).enabled(&entry(true)));
        let l = Levels([Some(&policy), Some(&off), None, None]);
        assert!(l.configs("f")[0].is_some() && l.configs("f")[1].is_none());
    }

    #[test]
    fn unknown_per_route_types_are_refused_unless_optional_and_unknown_to_envoy() {
        let bad = r#"{typed_per_filter_config: {f: {"@type": type.googleapis.com/envoy.extensions.filters.http.lua.v3.LuaPerRoute, disabled: true}}}"#;
        let v = legate_proto::json::parse_yaml(bad).unwrap();
        let m = legate_proto::json::to_dynamic(v, "envoy.config.route.v3.Route", true).unwrap();
        let r: route_pb::Route = m.transcode_to().unwrap();
        let e = PerFilterConfigs::from_proto(&r.typed_per_filter_config, "route").unwrap_err();
        assert_eq!(e.path, "route.typed_per_filter_config[\"f\"]");
        let mut map = HashMap::new();
        let inner = Any {
            type_url: "type.googleapis.com/example.Unknown".into(),
            value: vec![],
        };
        let fc = route_pb::FilterConfig {
            config: Some(inner),
            is_optional: true,
            disabled: false,
        };
        map.insert(
            "f".to_string(),
            Any {
                type_url: "type.googleapis.com/envoy.config.route.v3.FilterConfig".into(),
                value: prost::Message::encode_to_vec(&fc),
            },
        );
        assert!(PerFilterConfigs::from_proto(&map, "route")
            .unwrap()
            .is_empty());
    }
}
