//! Walks every field that is set in a message, recursing into `Any` by type
//! URL, and reports each with its path. The config validator uses this to
//! check every set field against the registry of what Legate supports, so no
//! field that changes traffic is silently ignored.

use crate::{pool, type_name, ProtoError};
use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, ReflectMessage, Value};

/// One set field met during a walk.
pub struct Visit<'a> {
    /// The field path, e.g. `static_resources.listeners[0].name`.
    pub path: &'a str,
    /// Full name of the message that holds the field.
    pub message: &'a str,
    pub field: &'a FieldDescriptor,
}

/// Decodes an `Any` payload with the pool.
pub fn decode_any(type_url: &str, bytes: &[u8], path: &str) -> Result<DynamicMessage, ProtoError> {
    let name = type_name(type_url);
    let desc = pool()
        .get_message_by_name(name)
        .ok_or_else(|| ProtoError::UnknownType(name.to_string()))?;
    DynamicMessage::decode(desc, bytes).map_err(|e| ProtoError::Binary {
        path: path.to_string(),
        type_name: name.to_string(),
        message: e.to_string(),
    })
}

/// If `msg` is a `google.protobuf.Any`, the message it holds.
pub fn unpack_any(msg: &DynamicMessage, path: &str) -> Option<Result<DynamicMessage, ProtoError>> {
    if msg.descriptor().full_name() != "google.protobuf.Any" {
        return None;
    }
    let url = msg
        .get_field_by_name("type_url")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let bytes = msg
        .get_field_by_name("value")
        .and_then(|v| v.as_bytes().cloned())
        .unwrap_or_default();
    Some(decode_any(&url, &bytes, path))
}

/// Whether `msg` says the extension it holds is optional.
fn optional(msg: &DynamicMessage) -> bool {
    msg.get_field_by_name("is_optional")
        .is_some_and(|v| v.as_bool() == Some(true))
}

/// Whether `m` is an `Any` of a type the pool does not have.
fn unknown_any(m: &DynamicMessage) -> bool {
    m.descriptor().full_name() == "google.protobuf.Any"
        && m.get_field_by_name("type_url")
            .and_then(|v| {
                v.as_str()
                    .map(|u| pool().get_message_by_name(type_name(u)).is_none())
            })
            .unwrap_or(false)
}

/// Calls `f` for every set field of `msg` (depth first). `Any` values are
/// decoded and walked as the message they hold; an `Any` whose type is not in
/// the pool is an error naming its path.
pub fn walk(
    msg: &DynamicMessage,
    path: &str,
    f: &mut dyn FnMut(&Visit) -> Result<(), String>,
) -> Result<(), String> {
    let desc = msg.descriptor();
    if let Some(inner) = unpack_any(msg, path) {
        let inner = inner.map_err(|e| format!("{path}: {e}"))?;
        return walk(&inner, path, f);
    }
    for (field, value) in msg.fields() {
        let p = if path.is_empty() {
            field.name().to_string()
        } else {
            format!("{path}.{}", field.name())
        };
        f(&Visit {
            path: &p,
            message: desc.full_name(),
            field: &field,
        })?;
        match value {
            // Envoy skips an optional extension (an HTTP filter's, a
            // per-route config's `is_optional`) whose type it does not
            // know; its translation skips it too.
            Value::Message(m) if optional(msg) && unknown_any(m) => {}
            Value::Message(m) => walk(m, &p, f)?,
            Value::List(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let Value::Message(m) = item {
                        walk(m, &format!("{p}[{i}]"), f)?;
                    }
                }
            }
            Value::Map(entries) => {
                if let Kind::Message(_) = field.kind() {
                    // In key order, so the first error found is always the
                    // same one (the map itself has no order).
                    let mut sorted: Vec<_> = entries.iter().collect();
                    sorted.sort_by(|a, b| format!("{:?}", a.0).cmp(&format!("{:?}", b.0)));
                    for (k, v) in sorted {
                        if let Value::Message(m) = v {
                            walk(m, &format!("{p}[{k:?}]"), f)?;
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}
