//! The static layers of Envoy's layered runtime, flattened to dotted keys.

use legate_proto::envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use std::collections::HashMap;

#[derive(Debug, Default, Clone)]
pub struct Runtime {
    values: HashMap<String, serde_json::Value>,
}

/// A FractionalPercent as parts per million.
pub fn per_million(f: &FractionalPercent) -> u32 {
    use legate_proto::envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType as D;
    let scale = match D::try_from(f.denominator).unwrap_or(D::Hundred) {
        D::Hundred => 10_000,
        D::TenThousand => 100,
        D::Million => 1,
    };
    (f.numerator.saturating_mul(scale)).min(1_000_000)
}

impl Runtime {
    /// Later layers override earlier ones, as in Envoy.
    pub fn from_layers(layers: &[serde_json::Value]) -> Self {
        let mut values = HashMap::new();
        for layer in layers {
            flatten("", layer, &mut values);
        }
        Self { values }
    }

    pub fn get(&self, key: &str) -> Option<&serde_json::Value> {
        self.values.get(key)
    }

    pub fn entries(&self) -> impl Iterator<Item = (&String, &serde_json::Value)> {
        self.values.iter()
    }

    /// Envoy's `featureEnabled(key, FractionalPercent)`: the runtime value may
    /// be a number (percent) or a FractionalPercent object.
    pub fn fraction_per_million(&self, key: &str, default: u32) -> u32 {
        match self.values.get(key) {
            Some(serde_json::Value::Number(n)) => n
                .as_f64()
                .map_or(default, |p| (p * 10_000.0).clamp(0.0, 1e6) as u32),
            Some(serde_json::Value::Object(o)) => {
                let num = o.get("numerator").and_then(|v| v.as_f64()).unwrap_or(0.0) as u32;
                let den = match o.get("denominator").and_then(|v| v.as_str()) {
                    Some("TEN_THOUSAND") => 1,
                    Some("MILLION") => 2,
                    _ => 0,
                };
                per_million(&FractionalPercent {
                    numerator: num,
                    denominator: den,
                })
            }
            _ => default,
        }
    }
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut HashMap<String, serde_json::Value>) {
    match v {
        // A FractionalPercent object is a leaf value, not a namespace.
        serde_json::Value::Object(o) if !o.contains_key("numerator") => {
            for (k, child) in o {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, child, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_flatten_and_override() {
        let rt = Runtime::from_layers(&[
            serde_json::json!({"a": {"b": 10}, "c": "x"}),
            serde_json::json!({"a.b": 50, "f": {"numerator": 5, "denominator": "TEN_THOUSAND"}}),
        ]);
        assert_eq!(rt.fraction_per_million("a.b", 0), 500_000);
        assert_eq!(rt.fraction_per_million("f", 0), 500);
        assert_eq!(rt.fraction_per_million("missing", 7), 7);
    }
}
