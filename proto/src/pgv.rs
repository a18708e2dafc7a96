//! protoc-gen-validate rules, read from the descriptor pool and checked on a
//! whole message tree (into `Any` by type URL), as Envoy checks every config
//! it loads. Errors name the field path.

use crate::pool;
use prost_reflect::{
    DynamicMessage, ExtensionDescriptor, FieldDescriptor, Kind, MapKey, ReflectMessage, Value,
};
use std::sync::OnceLock;

fn rules_ext() -> Option<&'static ExtensionDescriptor> {
    static EXT: OnceLock<Option<ExtensionDescriptor>> = OnceLock::new();
    EXT.get_or_init(|| pool().get_extension_by_name("validate.rules"))
        .as_ref()
}

fn required_ext() -> Option<&'static ExtensionDescriptor> {
    static EXT: OnceLock<Option<ExtensionDescriptor>> = OnceLock::new();
    EXT.get_or_init(|| pool().get_extension_by_name("validate.required"))
        .as_ref()
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

type Check = Result<(), String>;

/// Checks every rule in `msg`'s tree.
pub fn validate(msg: &DynamicMessage, path: &str) -> Check {
    let desc = msg.descriptor();
    if let Some(inner) = crate::walk::unpack_any(msg, path) {
        // A type outside the pool has no rules to check here (the registry
        // rejects it).
        return inner.map_or(Ok(()), |m| validate(&m, path));
    }
    if let Some(req) = required_ext() {
        for oneof in desc.oneofs() {
            if oneof.is_synthetic() {
                continue;
            }
            let opts = oneof.options();
            if opts.has_extension(req)
                && opts.get_extension(req).as_bool() == Some(true)
                && !oneof.fields().any(|f| msg.has_field(&f))
            {
                let names: Vec<String> = oneof.fields().map(|f| f.name().to_string()).collect();
                return Err(format!(
                    "{}: one of [{}] is required",
                    join(path, oneof.name()),
                    names.join(", ")
                ));
            }
        }
    }
    for field in desc.fields() {
        let p = join(path, field.name());
        let set = msg.has_field(&field);
        // A oneof member's rules apply only when it is the member set.
        if !set && field.containing_oneof().is_some_and(|o| !o.is_synthetic()) {
            continue;
        }
        let value = msg.get_field(&field);
        let mut skip_children = false;
        if let Some(ext) = rules_ext() {
            let opts = field.options();
            if opts.has_extension(ext) {
                if let Some(rules) = opts.get_extension(ext).as_message() {
                    skip_children = check_field(&field, rules, set, &value, &p)?;
                }
            }
        }
        if !set || skip_children {
            continue;
        }
        match &*value {
            Value::Message(m) => validate(m, &p)?,
            Value::List(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let Value::Message(m) = item {
                        validate(m, &format!("{p}[{i}]"))?;
                    }
                }
            }
            Value::Map(entries) => {
                for (k, v) in entries {
                    if let Value::Message(m) = v {
                        validate(m, &format!("{p}[{}]", map_key(k)))?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn map_key(k: &MapKey) -> String {
    match k {
        MapKey::String(s) => format!("{s:?}"),
        other => format!("{other:?}"),
    }
}

fn get<'a>(m: &'a DynamicMessage, name: &str) -> Option<std::borrow::Cow<'a, Value>> {
    let f = m.descriptor().get_field_by_name(name)?;
    m.has_field(&f).then(|| m.get_field(&f))
}

/// Checks one field; returns whether its children must not be checked
/// (`message.skip`).
fn check_field(
    field: &FieldDescriptor,
    rules: &DynamicMessage,
    set: bool,
    value: &Value,
    p: &str,
) -> Result<bool, String> {
    let mut skip = false;
    if let Some(mr) = get(rules, "message").and_then(|v| v.as_message().cloned()) {
        if get(&mr, "required").and_then(|v| v.as_bool()) == Some(true) && !set {
            return Err(format!("{p}: value is required"));
        }
        skip = get(&mr, "skip").and_then(|v| v.as_bool()) == Some(true);
    }
    // The rule kind actually set in FieldRules' `type` oneof.
    let Some((kind, r)) = rules
        .fields()
        .find(|(f, _)| f.containing_oneof().is_some_and(|o| o.name() == "type"))
        .and_then(|(f, v)| v.as_message().map(|m| (f.name().to_string(), m.clone())))
    else {
        return Ok(skip);
    };
    match kind.as_str() {
        "repeated" => {
            let Value::List(items) = value else {
                return Ok(skip);
            };
            let n = items.len() as u64;
            if let Some(min) = get(&r, "min_items").and_then(|v| v.as_u64()) {
                if n < min {
                    return Err(format!("{p}: value must contain at least {min} item(s)"));
                }
            }
            if let Some(max) = get(&r, "max_items").and_then(|v| v.as_u64()) {
                if n > max {
                    return Err(format!(
                        "{p}: value must contain no more than {max} item(s)"
                    ));
                }
            }
            if let Some(item_rules) = get(&r, "items").and_then(|v| v.as_message().cloned()) {
                for (i, item) in items.iter().enumerate() {
                    check_field(field, &item_rules, true, item, &format!("{p}[{i}]"))?;
                }
            }
        }
        "map" => {
            let Value::Map(entries) = value else {
                return Ok(skip);
            };
            if let Some(min) = get(&r, "min_pairs").and_then(|v| v.as_u64()) {
                if (entries.len() as u64) < min {
                    return Err(format!("{p}: value must contain at least {min} pair(s)"));
                }
            }
        }
        "duration" => {
            if get(&r, "required").and_then(|v| v.as_bool()) == Some(true) && !set {
                return Err(format!("{p}: value is required"));
            }
            if set {
                if let Value::Message(d) = value {
                    check_ordered(&r, duration_nanos(d) as f64, p, |m| {
                        m.as_message().map(|d| duration_nanos(d) as f64)
                    })?;
                }
            }
        }
        "any" if get(&r, "required").and_then(|v| v.as_bool()) == Some(true) && !set => {
            return Err(format!("{p}: value is required"));
        }
        "string" => {
            let s = match value {
                Value::String(s) => s.clone(),
                Value::Message(m) => m
                    .get_field_by_name("value")
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                _ => return Ok(skip),
            };
            if !(field.kind() == Kind::String || set) {
                return Ok(skip);
            }
            if get(&r, "ignore_empty").and_then(|v| v.as_bool()) == Some(true) && s.is_empty() {
                return Ok(skip);
            }
            let chars = s.chars().count() as u64;
            if let Some(min) = get(&r, "min_len").and_then(|v| v.as_u64()) {
                if chars < min {
                    return Err(format!("{p}: value length must be at least {min} runes"));
                }
            }
            if let Some(max) = get(&r, "max_len").and_then(|v| v.as_u64()) {
                if chars > max {
                    return Err(format!("{p}: value length must be at most {max} runes"));
                }
            }
            if let Some(min) = get(&r, "min_bytes").and_then(|v| v.as_u64()) {
                if (s.len() as u64) < min {
                    return Err(format!("{p}: value length must be at least {min} bytes"));
                }
            }
            if let Some(max) = get(&r, "max_bytes").and_then(|v| v.as_u64()) {
                if (s.len() as u64) > max {
                    return Err(format!("{p}: value length must be at most {max} bytes"));
                }
            }
            if let Some(pre) = get(&r, "prefix").and_then(|v| v.as_str().map(str::to_owned)) {
                if !s.starts_with(&pre) {
                    return Err(format!("{p}: value does not have prefix {pre:?}"));
                }
            }
            if let Some(Value::List(ins)) = get(&r, "in").map(|c| c.into_owned()) {
                if !ins.is_empty() && !ins.iter().any(|v| v.as_str() == Some(s.as_str())) {
                    return Err(format!("{p}: value must be in list"));
                }
            }
        }
        "bytes" => {
            if let Value::Bytes(b) = value {
                if let Some(min) = get(&r, "min_len").and_then(|v| v.as_u64()) {
                    if (b.len() as u64) < min {
                        return Err(format!("{p}: value length must be at least {min} bytes"));
                    }
                }
            }
        }
        "enum" => {
            if get(&r, "defined_only").and_then(|v| v.as_bool()) == Some(true) {
                if let (Value::EnumNumber(n), Kind::Enum(e)) = (value, field.kind()) {
                    if e.get_value(*n).is_none() {
                        return Err(format!("{p}: value must be one of the defined enum values"));
                    }
                }
            }
            if let (Some(Value::List(ins)), Value::EnumNumber(n)) =
                (get(&r, "in").map(|c| c.into_owned()), value)
            {
                if !ins.is_empty() && !ins.iter().any(|v| v.as_i32() == Some(*n)) {
                    return Err(format!(
                        "{p}: value must be in list {:?}",
                        ins.iter().filter_map(|v| v.as_i32()).collect::<Vec<_>>()
                    ));
                }
            }
            if let (Some(Value::List(nots)), Value::EnumNumber(n)) =
                (get(&r, "not_in").map(|c| c.into_owned()), value)
            {
                if nots.iter().any(|v| v.as_i32() == Some(*n)) {
                    return Err(format!(
                        "{p}: value must not be in list {:?}",
                        nots.iter().filter_map(|v| v.as_i32()).collect::<Vec<_>>()
                    ));
                }
            }
        }
        "uint32" | "uint64" | "int32" | "int64" | "sint32" | "sint64" | "fixed32" | "fixed64"
        | "sfixed32" | "sfixed64" | "double" | "float" => {
            // Wrapper types are checked only when present.
            let n = match value {
                Value::Message(m) if set => m.get_field_by_name("value").and_then(|v| number(&v)),
                Value::Message(_) => None,
                other => number(other),
            };
            if let Some(n) = n {
                if get(&r, "ignore_empty").and_then(|v| v.as_bool()) == Some(true) && n == 0.0 {
                    return Ok(skip);
                }
                check_ordered(&r, n, p, number)?;
                if let Some(Value::List(nots)) = get(&r, "not_in").map(|c| c.into_owned()) {
                    if nots.iter().any(|v| number(v) == Some(n)) {
                        return Err(format!("{p}: value must not be in list"));
                    }
                }
            }
        }
        _ => {}
    }
    Ok(skip)
}

fn number(v: &Value) -> Option<f64> {
    Some(match v {
        Value::U32(n) => *n as f64,
        Value::U64(n) => *n as f64,
        Value::I32(n) => *n as f64,
        Value::I64(n) => *n as f64,
        Value::F32(n) => *n as f64,
        Value::F64(n) => *n,
        _ => return None,
    })
}

fn duration_nanos(d: &DynamicMessage) -> i128 {
    let s = get(d, "seconds").and_then(|v| v.as_i64()).unwrap_or(0) as i128;
    let n = get(d, "nanos").and_then(|v| v.as_i32()).unwrap_or(0) as i128;
    s * 1_000_000_000 + n
}

/// const / lt / lte / gt / gte, with PGV's exclusive-range reading when
/// both bounds are given and reversed.
fn check_ordered(
    r: &DynamicMessage,
    n: f64,
    p: &str,
    conv: impl Fn(&Value) -> Option<f64>,
) -> Check {
    let bound = |name: &str| get(r, name).and_then(|v| conv(&v));
    if let Some(c) = bound("const") {
        if n != c {
            return Err(format!("{p}: value must equal {c}"));
        }
    }
    let (lt, lte, gt, gte) = (bound("lt"), bound("lte"), bound("gt"), bound("gte"));
    let lower = gt
        .map(|g| (n > g, format!("greater than {g}")))
        .or(gte.map(|g| (n >= g, format!("greater than or equal to {g}"))));
    let upper = lt
        .map(|l| (n < l, format!("less than {l}")))
        .or(lte.map(|l| (n <= l, format!("less than or equal to {l}"))));
    match (lower, upper) {
        (Some((lo_ok, lo)), Some((up_ok, up))) => {
            let lo_v = gt.or(gte).unwrap_or(0.0);
            let up_v = lt.or(lte).unwrap_or(0.0);
            let ok = if up_v < lo_v {
                lo_ok || up_ok
            } else {
                lo_ok && up_ok
            };
            if !ok {
                return Err(format!("{p}: value must be {lo} and {up}"));
            }
        }
        (Some((ok, lo)), None) if !ok => return Err(format!("{p}: value must be {lo}")),
        (None, Some((ok, up))) if !ok => return Err(format!("{p}: value must be {up}")),
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(yaml: &str) -> Check {
        let v = crate::json::parse_yaml(yaml).unwrap();
        let m = crate::json::to_dynamic(v, "envoy.config.bootstrap.v3.Bootstrap", true).unwrap();
        validate(&m, "")
    }

    #[test]
    fn numeric_string_and_required_rules() {
        assert!(check("static_resources: {clusters: [{name: c}]}").is_ok());
        let e = check("static_resources: {clusters: [{name: c, load_assignment: {cluster_name: c, endpoints: [{load_balancing_weight: 0}]}}]}").unwrap_err();
        assert!(
            e.starts_with(
                "static_resources.clusters[0].load_assignment.endpoints[0].load_balancing_weight:"
            ),
            "{e}"
        );
        let e = check("static_resources: {clusters: [{name: ''}]}").unwrap_err();
        assert!(e.contains("static_resources.clusters[0].name"), "{e}");
        let e =
            check("static_resources: {clusters: [{name: c, connect_timeout: -1s}]}").unwrap_err();
        assert!(e.contains("connect_timeout"), "{e}");
    }
}
