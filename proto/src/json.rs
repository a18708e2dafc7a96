//! proto3 JSON / YAML → typed Envoy messages.
//!
//! YAML is read into a JSON value first (Envoy does the same), `TypedStruct`
//! wrappers are replaced by the message they describe, and the value is then
//! deserialized with the descriptor pool so `Any` fields resolve by type URL.
//! Errors name the field path, e.g. `static_resources.listeners[0].address`.

use crate::{pool, type_name, ProtoError, TYPED_STRUCT_URLS};
use prost_reflect::{DeserializeOptions, DynamicMessage, MessageDescriptor};
use serde_json::Value;

/// Parses YAML (a superset of JSON) into a JSON value.
pub fn parse_yaml(text: &str) -> Result<Value, ProtoError> {
    let yaml: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| ProtoError::Yaml(e.to_string()))?;
    let mut json = serde_json::to_value(yaml).map_err(|e| ProtoError::Yaml(e.to_string()))?;
    // An empty document is an empty message, as in Envoy.
    if json.is_null() {
        json = Value::Object(Default::default());
    }
    Ok(json)
}

/// Rewrites every `{"@type": ".../TypedStruct", "type_url": T, "value": {...}}`
/// into `{"@type": T, ...value}`: a TypedStruct *is* that message in JSON form.
pub fn expand_typed_structs(v: &mut Value) {
    match v {
        Value::Object(map) => {
            let is_ts = map
                .get("@type")
                .and_then(Value::as_str)
                .is_some_and(|t| TYPED_STRUCT_URLS.contains(&type_name(t)));
            if is_ts {
                let url = map
                    .get("type_url")
                    .or_else(|| map.get("typeUrl"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let mut inner = match map.remove("value") {
                    Some(Value::Object(o)) => o,
                    _ => Default::default(),
                };
                inner.insert("@type".into(), Value::String(url));
                *map = inner;
            }
            for (_, child) in map.iter_mut() {
                expand_typed_structs(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(expand_typed_structs),
        _ => {}
    }
}

/// Envoy's JSON reader (protobuf's C++ converter) is lenient where
/// prost-reflect is strict; go-control-plane's sample bootstraps rely on it.
/// This rewrites, guided by the descriptor: a single value given for a
/// repeated field becomes a one-element list, and a Duration written as
/// `{seconds, nanos}` becomes its string form.
pub fn lenient(v: &mut Value, desc: &MessageDescriptor) {
    use prost_reflect::Kind;
    let Value::Object(map) = v else { return };
    if desc.full_name() == "google.protobuf.Any" {
        if let Some(inner) = map
            .get("@type")
            .and_then(Value::as_str)
            .and_then(|t| pool().get_message_by_name(type_name(t)))
        {
            lenient(v, &inner);
        }
        return;
    }
    if desc.full_name().starts_with("google.protobuf.") {
        return;
    }
    for (key, child) in map.iter_mut() {
        let Some(field) = desc
            .get_field_by_json_name(key)
            .or_else(|| desc.get_field_by_name(key))
        else {
            continue;
        };
        if field.is_list() && !child.is_array() && !child.is_null() {
            *child = Value::Array(vec![child.take()]);
        }
        let Kind::Message(m) = field.kind() else {
            continue;
        };
        if field.is_map() {
            if let Value::Object(entries) = child {
                let value_desc = m.map_entry_value_field();
                if let Kind::Message(vm) = value_desc.kind() {
                    entries.values_mut().for_each(|e| lenient(e, &vm));
                }
            }
            continue;
        }
        let fix = |c: &mut Value| {
            // An empty object for an `Any` is an empty Any, which protobuf's
            // C++ reader accepts and prost-reflect refuses (no `@type`). It
            // is read as an Any holding `google.protobuf.Empty`, set but
            // carrying nothing (Envoy Gateway writes `config: {}` in a
            // FilterConfig that only enables its filter; an unset config
            // there is an error in Envoy).
            if m.full_name() == "google.protobuf.Any" && c.as_object().is_some_and(|o| o.is_empty())
            {
                *c = serde_json::json!({"@type": EMPTY_ANY, "value": {}});
                return;
            }
            if m.full_name() == "google.protobuf.Duration" {
                if let Value::Object(d) = c {
                    let secs = d.get("seconds").and_then(Value::as_i64).unwrap_or(0);
                    let nanos = d.get("nanos").and_then(Value::as_i64).unwrap_or(0);
                    *c = Value::String(format!("{}s", secs as f64 + nanos as f64 / 1e9));
                }
            } else {
                lenient(c, &m);
            }
        };
        match child {
            Value::Array(items) => items.iter_mut().for_each(fix),
            c => fix(c),
        }
    }
}

/// What an empty JSON object in an `Any` position becomes (see [`lenient`]).
pub const EMPTY_ANY: &str = "type.googleapis.com/google.protobuf.Empty";

/// Looks up a message descriptor by full name.
pub fn descriptor(full_name: &str) -> Result<MessageDescriptor, ProtoError> {
    pool()
        .get_message_by_name(full_name)
        .ok_or_else(|| ProtoError::UnknownType(full_name.to_string()))
}

/// Decodes a JSON value into a dynamic message of `full_name`.
/// With `deny_unknown`, unknown fields are errors naming their path.
pub fn to_dynamic(
    mut value: Value,
    full_name: &str,
    deny_unknown: bool,
) -> Result<DynamicMessage, ProtoError> {
    expand_typed_structs(&mut value);
    let desc = descriptor(full_name)?;
    lenient(&mut value, &desc);
    let opts = DeserializeOptions::new().deny_unknown_fields(deny_unknown);
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(value, &mut track);
    DynamicMessage::deserialize_with_options(desc, de, &opts).map_err(|e| ProtoError::Json {
        path: track.path().to_string(),
        message: e.to_string(),
    })
}

/// Decodes JSON into the typed message `M` (whose proto name is `full_name`).
pub fn to_message<M: prost::Message + Default>(
    value: Value,
    full_name: &str,
    deny_unknown: bool,
) -> Result<M, ProtoError> {
    let dynamic = to_dynamic(value, full_name, deny_unknown)?;
    M::decode(prost::Message::encode_to_vec(&dynamic).as_slice()).map_err(|e| ProtoError::Binary {
        path: String::new(),
        type_name: full_name.to_string(),
        message: e.to_string(),
    })
}

/// Protobuf `MergeFrom` of `overlay` into `base`, as Envoy merges
/// `--config-yaml` over the config file: scalars replace, messages merge,
/// repeated fields append. Concatenating two encodings is exactly that.
pub fn merge<M: prost::Message + Default>(base: &M, overlay: &M) -> M {
    let mut bytes = base.encode_to_vec();
    bytes.extend(overlay.encode_to_vec());
    M::decode(bytes.as_slice()).expect("concatenated encodings decode")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenient_like_envoy_single_values_and_duration_objects() {
        let v = serde_json::json!({"dynamic_resources": {"cds_config": {"api_config_source": {
            "api_type": "REST", "cluster_names": "xds", "refresh_delay": {"nanos": 500000000}}}}});
        let b: Bootstrap = to_message(v, BOOT, true).unwrap();
        let a = b.dynamic_resources.unwrap().cds_config.unwrap();
        let Some(envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier::ApiConfigSource(a)) =
            a.config_source_specifier
        else {
            panic!("api_config_source")
        };
        assert_eq!(a.cluster_names, vec!["xds".to_string()]);
        assert_eq!(a.refresh_delay.unwrap().nanos, 500_000_000);
    }
    use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;

    #[test]
    fn an_empty_any_is_read_as_set_and_empty() {
        let mut v = parse_yaml(
            "{typed_per_filter_config: {f: {'@type': type.googleapis.com/envoy.config.route.v3.FilterConfig, config: {}}}}",
        )
        .unwrap();
        lenient(&mut v, &descriptor("envoy.config.route.v3.Route").unwrap());
        let m = to_dynamic(v, "envoy.config.route.v3.Route", true).unwrap();
        let r: envoy_types::pb::envoy::config::route::v3::Route = m.transcode_to().unwrap();
        let any = &r.typed_per_filter_config["f"];
        let fc: envoy_types::pb::envoy::config::route::v3::FilterConfig =
            prost::Message::decode(any.value.as_slice()).unwrap();
        assert_eq!(fc.config.unwrap().type_url, EMPTY_ANY);
    }

    #[test]
    fn protos_naming_the_common_packages_are_in_the_pool() {
        // These name `common.ratelimit.v3...` relatively, which the
        // one-pool compile cannot resolve; build.rs compiles them alone.
        for m in [
            "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "envoy.extensions.filters.network.ratelimit.v3.RateLimit",
            "envoy.extensions.filters.http.tap.v3.Tap",
        ] {
            assert!(crate::pool().get_message_by_name(m).is_some(), "{m}");
        }
        let v = parse_yaml(
            "{stat_prefix: s, descriptors: [{entries: [{key: k, value: v}], token_bucket: {max_tokens: 1, fill_interval: 1s}}]}",
        )
        .unwrap();
        let m = to_dynamic(
            v,
            "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            true,
        )
        .unwrap();
        let l: envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit =
            m.transcode_to().unwrap();
        assert_eq!(l.descriptors[0].entries[0].value, "v");
    }

    const BOOT: &str = "envoy.config.bootstrap.v3.Bootstrap";

    #[test]
    fn yaml_bootstrap_with_any_and_typed_struct() {
        let v = parse_yaml(
            r#"
static_resources:
  listeners:
  - name: l0
    address: {socket_address: {address: 127.0.0.1, port_value: 10000}}
    filter_chains:
    - filters:
      - name: hcm
        typed_config:
          "@type": type.googleapis.com/udpa.type.v1.TypedStruct
          type_url: type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          value: {stat_prefix: ingress, codec_type: AUTO}
"#,
        )
        .unwrap();
        let b: Bootstrap = to_message(v, BOOT, true).unwrap();
        let any = b.static_resources.unwrap().listeners[0].filter_chains[0].filters[0]
            .config_type
            .clone()
            .unwrap();
        let envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(any) =
            any
        else {
            panic!("expected typed_config")
        };
        assert!(any.type_url.ends_with("HttpConnectionManager"));
        assert!(!any.value.is_empty());
    }

    #[test]
    fn unknown_field_error_names_path() {
        let v = parse_yaml("static_resources:\n  listeners:\n  - name: a\n    bogus: 1\n").unwrap();
        let err = to_message::<Bootstrap>(v, BOOT, true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("static_resources.listeners[0]"), "{err}");
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn merge_appends_repeated_and_replaces_scalars() {
        let a: Bootstrap = to_message(
            parse_yaml("node: {id: a}\nstatic_resources: {clusters: [{name: c1}]}").unwrap(),
            BOOT,
            true,
        )
        .unwrap();
        let b: Bootstrap = to_message(
            parse_yaml("node: {id: b}\nstatic_resources: {clusters: [{name: c2}]}").unwrap(),
            BOOT,
            true,
        )
        .unwrap();
        let m = merge(&a, &b);
        assert_eq!(m.node.unwrap().id, "b");
        let names: Vec<_> = m
            .static_resources
            .unwrap()
            .clusters
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, ["c1", "c2"]);
    }
}
