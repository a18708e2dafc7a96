//! `TypedStruct` in binary messages (xDS), as [`crate::json`] does for JSON.
//!
//! A control plane may send an extension's config as `udpa.type.v1.TypedStruct`
//! or `xds.type.v3.TypedStruct`: the type URL of the real config and its
//! fields as a `google.protobuf.Struct` (proto3 JSON). Envoy converts it to
//! the named message before the extension's factory sees it; so does this,
//! rewriting each such `Any` in place into an `Any` of the named type, so
//! that everything after (the field registry, the typed translation) sees
//! the message itself. istiod sends Istio's metadata exchange configs so.

use crate::{json, pool, type_name, ProtoError, TYPED_STRUCT_URLS, TYPE_URL_PREFIX};
use prost::Message;
use prost_reflect::{DynamicMessage, ReflectMessage, Value};

/// Whether encoded bytes may hold a `TypedStruct` anywhere: its type URL is
/// written as plain text wherever an `Any` holds it, however deep.
pub fn may_hold(bytes: &[u8]) -> bool {
    bytes
        .windows(b"TypedStruct".len())
        .any(|w| w == b"TypedStruct")
}

/// Rewrites every `TypedStruct` `Any` under `msg`; returns whether any was.
pub fn expand(msg: &mut DynamicMessage, path: &str) -> Result<bool, ProtoError> {
    if msg.descriptor().full_name() == "google.protobuf.Any" {
        return expand_any(msg, path);
    }
    let mut changed = false;
    for (field, value) in msg.fields_mut() {
        let p = if path.is_empty() {
            field.name().to_string()
        } else {
            format!("{path}.{}", field.name())
        };
        match value {
            Value::Message(m) => changed |= expand(m, &p)?,
            Value::List(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    if let Value::Message(m) = item {
                        changed |= expand(m, &format!("{p}[{i}]"))?;
                    }
                }
            }
            Value::Map(entries) => {
                for (k, v) in entries.iter_mut() {
                    if let Value::Message(m) = v {
                        changed |= expand(m, &format!("{p}[{k:?}]"))?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(changed)
}

/// One `Any`: a `TypedStruct` becomes the message it names; any other
/// payload is looked into (it may hold `TypedStruct`s of its own).
fn expand_any(any: &mut DynamicMessage, path: &str) -> Result<bool, ProtoError> {
    let url = any
        .get_field_by_name("type_url")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let bytes = any
        .get_field_by_name("value")
        .and_then(|v| v.as_bytes().cloned())
        .unwrap_or_default();
    if !may_hold(url.as_bytes()) && !may_hold(&bytes) {
        return Ok(false);
    }
    let (new_url, mut inner) = if TYPED_STRUCT_URLS.contains(&type_name(&url)) {
        match unwrap_typed_struct(&url, &bytes, path) {
            // A type Legate does not know stays wrapped, as an unknown
            // plain `Any` stays, for what follows to name it.
            Err(ProtoError::UnknownType(_)) => return Ok(false),
            other => other?,
        }
    } else {
        // Types Legate does not know stay as they are: the walk that follows
        // names them.
        match crate::walk::decode_any(&url, &bytes, path) {
            Ok(m) => (url, m),
            Err(_) => return Ok(false),
        }
    };
    let nested = expand(&mut inner, path)?;
    if new_url
        == any
            .get_field_by_name("type_url")
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
        && !nested
    {
        return Ok(false);
    }
    any.set_field_by_name("type_url", Value::String(new_url));
    any.set_field_by_name("value", Value::Bytes(inner.encode_to_vec().into()));
    Ok(true)
}

/// A `TypedStruct`'s (type URL, message): its `value` Struct read as the
/// proto3 JSON of the type its `type_url` names.
fn unwrap_typed_struct(
    url: &str,
    bytes: &[u8],
    path: &str,
) -> Result<(String, DynamicMessage), ProtoError> {
    let desc = pool()
        .get_message_by_name(type_name(url))
        .ok_or_else(|| ProtoError::UnknownType(type_name(url).to_string()))?;
    let ts = DynamicMessage::decode(desc, bytes).map_err(|e| ProtoError::Binary {
        path: path.to_string(),
        type_name: type_name(url).to_string(),
        message: e.to_string(),
    })?;
    let inner_url = ts
        .get_field_by_name("type_url")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let fields = match ts.get_field_by_name("value").as_deref() {
        Some(Value::Message(s)) => serde_json::to_value(s).map_err(|e| ProtoError::Json {
            path: path.to_string(),
            message: e.to_string(),
        })?,
        _ => serde_json::Value::Object(Default::default()),
    };
    let inner = json::to_dynamic(fields, type_name(&inner_url), true).map_err(|e| match e {
        ProtoError::Json { path: p, message } => ProtoError::Json {
            path: if p.is_empty() || p == "." {
                path.to_string()
            } else {
                format!("{path}.{p}")
            },
            message,
        },
        other => other,
    })?;
    let inner_url = if inner_url.contains('/') {
        inner_url
    } else {
        format!("{TYPE_URL_PREFIX}{inner_url}")
    };
    Ok((inner_url, inner))
}

/// The encoding of `msg` with its `TypedStruct`s expanded, if it had any.
pub fn expand_encoded(
    full_name: &str,
    bytes: &[u8],
) -> Result<Option<(DynamicMessage, Vec<u8>)>, ProtoError> {
    if !may_hold(bytes) {
        return Ok(None);
    }
    let mut msg = crate::walk::decode_any(full_name, bytes, "")?;
    if !expand(&mut msg, "")? {
        return Ok(None);
    }
    let out = msg.encode_to_vec();
    Ok(Some((msg, out)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::listener::v3::{filter, Filter, FilterChain, Listener};
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        http_filter, HttpConnectionManager, HttpFilter,
    };
    use envoy_types::pb::google::protobuf::Any;

    const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

    /// A listener whose HTTP filter's config is `config`.
    fn listener(config: Any) -> Vec<u8> {
        let hcm = HttpConnectionManager {
            stat_prefix: "s".into(),
            http_filters: vec![HttpFilter {
                name: "r".into(),
                config_type: Some(http_filter::ConfigType::TypedConfig(config)),
                ..Default::default()
            }],
            ..Default::default()
        };
        Listener {
            name: "l".into(),
            filter_chains: vec![FilterChain {
                filters: vec![Filter {
                    name: "hcm".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(Any {
                        type_url: "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager".into(),
                        value: hcm.encode_to_vec(),
                    })),
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn typed_struct(wrapper: &str, url: &str, fields: serde_json::Value) -> Any {
        let ts = json::to_dynamic(
            serde_json::json!({"type_url": url, "value": fields}),
            "xds.type.v3.TypedStruct",
            true,
        )
        .unwrap();
        Any {
            type_url: format!("type.googleapis.com/{wrapper}"),
            value: ts.encode_to_vec(),
        }
    }

    /// A Listener whose HTTP filter is a `TypedStruct` naming the router:
    /// after expansion it is the router's own `Any`, under both wrappers.
    #[test]
    fn a_typed_struct_filter_becomes_its_message() {
        let router = json::to_dynamic(
            serde_json::json!({"suppress_envoy_headers": true}),
            "envoy.extensions.filters.http.router.v3.Router",
            true,
        )
        .unwrap();
        let plain = listener(Any {
            type_url: ROUTER.into(),
            value: router.encode_to_vec(),
        });
        assert!(!may_hold(&plain));
        assert!(expand_encoded("envoy.config.listener.v3.Listener", &plain)
            .unwrap()
            .is_none());
        for wrapper in TYPED_STRUCT_URLS {
            let wrapped = listener(typed_struct(
                wrapper,
                ROUTER,
                serde_json::json!({"suppress_envoy_headers": true}),
            ));
            let (_, out) = expand_encoded("envoy.config.listener.v3.Listener", &wrapped)
                .unwrap()
                .expect("a TypedStruct was there");
            assert_eq!(out, plain, "{wrapper}");
        }
    }

    /// A field the named type does not have is an error naming it (Envoy
    /// rejects it); an unknown type is left wrapped, as an unknown plain
    /// `Any` is.
    #[test]
    fn unknown_fields_are_named_and_unknown_types_left_wrapped() {
        let bytes = listener(typed_struct(
            "xds.type.v3.TypedStruct",
            ROUTER,
            serde_json::json!({"no_such_field": 1}),
        ));
        let err = expand_encoded("envoy.config.listener.v3.Listener", &bytes).unwrap_err();
        assert!(err.to_string().contains("no_such_field"), "{err}");
        let bytes = listener(typed_struct(
            "xds.type.v3.TypedStruct",
            "type.googleapis.com/no.such.Type",
            serde_json::json!({}),
        ));
        assert!(expand_encoded("envoy.config.listener.v3.Listener", &bytes)
            .unwrap()
            .is_none());
    }
}
