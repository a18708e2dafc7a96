//! Scoped routes: `ScopedRouteConfiguration`s and matching a request's key.

use super::listener::KeyFragment;
use super::{join, ConfigError, Result};
use legate_proto::envoy_types::pb::envoy::config::route::v3 as pb;

/// One scope: requests whose key equals `key` use route table `route`.
#[derive(Debug, Clone, PartialEq)]
pub struct Scope {
    pub name: String,
    pub key: Vec<String>,
    pub route: String,
}

impl Scope {
    pub fn from_proto(s: &pb::ScopedRouteConfiguration, path: &str) -> Result<Self> {
        use pb::scoped_route_configuration::key::fragment::Type;
        if s.on_demand {
            return Err(ConfigError::new(
                join(path, "on_demand"),
                "on-demand scopes are not supported yet",
            ));
        }
        if s.route_configuration.is_some() {
            return Err(ConfigError::new(
                join(path, "route_configuration"),
                "inline route configurations in scopes are not supported yet",
            ));
        }
        let key = s
            .key
            .as_ref()
            .map(|k| {
                k.fragments
                    .iter()
                    .map(|f| match &f.r#type {
                        Some(Type::StringKey(v)) => v.clone(),
                        None => String::new(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            name: s.name.clone(),
            key,
            route: s.route_configuration_name.clone(),
        })
    }
}

/// The request's scope key, or None when a fragment is missing (Envoy then
/// finds no scope and answers 404).
pub fn request_key(
    fragments: &[KeyFragment],
    header: &dyn Fn(&str) -> Option<String>,
) -> Option<Vec<String>> {
    fragments
        .iter()
        .map(|f| {
            let v = header(&f.header)?;
            v.split(f.separator.as_str())
                .nth(f.index as usize)
                .map(str::to_string)
        })
        .collect()
}

/// The scope whose key equals the request's.
pub fn find<'a>(scopes: &'a [Scope], key: &[String]) -> Option<&'a Scope> {
    scopes.iter().find(|s| s.key == key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_from_header_elements() {
        let f = vec![KeyFragment {
            header: "x".into(),
            separator: ";".into(),
            index: 1,
        }];
        let h = |n: &str| (n == "x").then(|| "a;b;c".to_string());
        assert_eq!(request_key(&f, &h), Some(vec!["b".to_string()]));
        let none = |_: &str| None;
        assert_eq!(request_key(&f, &none), None);
        let scopes = vec![Scope {
            name: "s".into(),
            key: vec!["b".into()],
            route: "r".into(),
        }];
        assert_eq!(find(&scopes, &["b".to_string()]).unwrap().route, "r");
        assert!(find(&scopes, &["c".to_string()]).is_none());
    }
}
