//! A workload as Istio's proxy extensions describe it: read from a node's
//! metadata (`NAME`, `NAMESPACE`, `LABELS`...), sent to peers as a "flat
//! node" `google.protobuf.Struct` (in the `x-envoy-peer-metadata` header,
//! base64, or in the TCP metadata exchange), and read back from one.

use crate::config::wkt::{value::Kind, Struct, Value};
use base64::Engine;
use prost::Message;
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::sync::Arc;

pub const CANONICAL_NAME: &str = "service.istio.io/canonical-name";
pub const CANONICAL_REVISION: &str = "service.istio.io/canonical-revision";

/// The owner kinds Istio names in `OWNER` and in the flat node's `OWNER`.
const KINDS: &[&str] = &["pod", "deployment", "job", "cronjob"];

/// One workload's identity, as a peer learns it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Workload {
    pub instance_name: String,
    pub namespace: String,
    pub workload_name: String,
    pub cluster: String,
    pub identity: String,
    pub region: String,
    pub zone: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub app: String,
    pub version: String,
    /// `pod`, `deployment`, `job` or `cronjob`, from `OWNER`.
    pub kind: Option<&'static str>,
    /// The `additional_labels` the reader asked for.
    pub labels: BTreeMap<String, String>,
}

fn text(m: &serde_json::Map<String, Json>, key: &str) -> String {
    m.get(key)
        .and_then(Json::as_str)
        .unwrap_or_default()
        .to_string()
}

/// One of the node's `LABELS` ("" when absent).
pub fn node_label(m: &serde_json::Map<String, Json>, key: &str) -> String {
    m.get("LABELS")
        .and_then(Json::as_object)
        .map(|l| text(l, key))
        .unwrap_or_default()
}

impl Workload {
    /// From node metadata (or a flat node read from a peer, which has the
    /// same keys), keeping the `additional` labels.
    pub fn from_metadata(
        m: &serde_json::Map<String, Json>,
        additional: &[String],
        locality: (&str, &str),
    ) -> Workload {
        let empty = serde_json::Map::new();
        let labels = m.get("LABELS").and_then(Json::as_object).unwrap_or(&empty);
        let label = |keys: &[&str]| {
            keys.iter()
                .map(|k| text(labels, k))
                .find(|v| !v.is_empty())
                .unwrap_or_default()
        };
        let workload_name = text(m, "WORKLOAD_NAME");
        let region = Some(text(m, "REGION"))
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| locality.0.to_string());
        let zone = Some(text(m, "AVAILABILITY_ZONE"))
            .filter(|z| !z.is_empty())
            .unwrap_or_else(|| locality.1.to_string());
        Workload {
            instance_name: text(m, "NAME"),
            namespace: text(m, "NAMESPACE"),
            kind: owner_kind(&text(m, "OWNER"), &workload_name),
            workload_name,
            cluster: text(m, "CLUSTER_ID"),
            identity: text(m, "IDENTITY"),
            region,
            zone,
            canonical_name: label(&[CANONICAL_NAME]),
            canonical_revision: label(&[CANONICAL_REVISION]),
            app: label(&["app.kubernetes.io/name", "app"]),
            version: label(&["app.kubernetes.io/version", "version"]),
            labels: additional
                .iter()
                .filter_map(|k| Some((k.clone(), labels.get(k)?.as_str()?.to_string())))
                .collect(),
        }
    }

    /// The flat node Istio's proxies exchange: each key only when set, but
    /// `LABELS` always.
    pub fn to_struct(&self) -> Struct {
        let mut f = BTreeMap::new();
        let mut put = |k: &str, v: &str| {
            if !v.is_empty() {
                f.insert(k.to_string(), string(v));
            }
        };
        put("NAME", &self.instance_name);
        put("NAMESPACE", &self.namespace);
        put("WORKLOAD_NAME", &self.workload_name);
        put("CLUSTER_ID", &self.cluster);
        put("IDENTITY", &self.identity);
        put("REGION", &self.region);
        put("AVAILABILITY_ZONE", &self.zone);
        if let Some(kind) = self.kind {
            put(
                "OWNER",
                &format!(
                    "kubernetes://apis/apps/v1/namespaces/{}/{kind}s/{}",
                    self.namespace, self.workload_name
                ),
            );
        }
        let mut labels = BTreeMap::new();
        for (k, v) in [
            (CANONICAL_NAME, &self.canonical_name),
            (CANONICAL_REVISION, &self.canonical_revision),
            ("app", &self.app),
            ("version", &self.version),
        ] {
            if !v.is_empty() {
                labels.insert(k.to_string(), string(v));
            }
        }
        for (k, v) in &self.labels {
            labels.insert(k.clone(), string(v));
        }
        f.insert(
            "LABELS".into(),
            Value {
                kind: Some(Kind::StructValue(Struct {
                    fields: labels.into_iter().collect(),
                })),
            },
        );
        Struct {
            fields: f.into_iter().collect(),
        }
    }

    /// The `x-envoy-peer-metadata` value: the flat node's encoding (map
    /// keys in order, as Istio's deterministic serialization), base64.
    pub fn header_value(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(encode_sorted(&self.to_struct()))
    }

    /// A peer from an `x-envoy-peer-metadata` value (padding optional).
    pub fn from_header(value: &[u8], additional: &[String]) -> Option<Workload> {
        let trimmed = value
            .iter()
            .rposition(|&b| b != b'=')
            .map_or(&value[..0], |i| &value[..=i]);
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(trimmed)
            .ok()?;
        let s = Struct::decode(bytes.as_slice()).ok()?;
        Some(Self::from_struct(&s, additional))
    }

    pub fn from_struct(s: &Struct, additional: &[String]) -> Workload {
        let json = match crate::bootstrap::struct_to_json(s) {
            Json::Object(m) => m,
            _ => Default::default(),
        };
        Workload::from_metadata(&json, additional, ("", ""))
    }
}

/// A `Struct`'s encoding with map keys in order (protobuf's deterministic
/// serialization, which Istio uses; prost's map has no order).
pub fn encode_sorted(s: &Struct) -> Vec<u8> {
    use prost::encoding::{encode_key, encode_varint, WireType};
    let mut keys: Vec<_> = s.fields.keys().collect();
    keys.sort();
    let mut out = Vec::new();
    for k in keys {
        let mut entry = Vec::new();
        prost::encoding::string::encode(1, k, &mut entry);
        let value = encode_value(&s.fields[k]);
        encode_key(2, WireType::LengthDelimited, &mut entry);
        encode_varint(value.len() as u64, &mut entry);
        entry.extend_from_slice(&value);
        encode_key(1, WireType::LengthDelimited, &mut out);
        encode_varint(entry.len() as u64, &mut out);
        out.extend_from_slice(&entry);
    }
    out
}

fn encode_value(v: &Value) -> Vec<u8> {
    use prost::encoding::{encode_key, encode_varint, WireType};
    let nested = |tag: u32, body: Vec<u8>| {
        let mut out = Vec::new();
        encode_key(tag, WireType::LengthDelimited, &mut out);
        encode_varint(body.len() as u64, &mut out);
        out.extend_from_slice(&body);
        out
    };
    match &v.kind {
        Some(Kind::StructValue(s)) => nested(5, encode_sorted(s)),
        Some(Kind::ListValue(l)) => nested(
            6,
            l.values
                .iter()
                .flat_map(|item| nested(1, encode_value(item)))
                .collect(),
        ),
        _ => v.encode_to_vec(),
    }
}

fn string(v: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(v.to_string())),
    }
}

/// The owner's kind: `OWNER` ends in `<kind>s/<workload>`.
fn owner_kind(owner: &str, workload: &str) -> Option<&'static str> {
    let rest = owner.strip_suffix(workload)?.strip_suffix("s/")?;
    let kind = rest.rsplit('/').next()?;
    KINDS.iter().copied().find(|k| *k == kind)
}

/// The peers a stream learned, in its filter state: the downstream one on
/// the request path, the upstream one from the response.
#[derive(Debug, Default)]
pub struct Peers {
    pub downstream: std::sync::OnceLock<Arc<Workload>>,
    pub upstream: std::sync::OnceLock<Arc<Workload>>,
}

/// This proxy's own workload, from its node.
pub fn local(additional: &[String]) -> Workload {
    let node = crate::config::local_node();
    Workload::from_metadata(&node.metadata, additional, (&node.region, &node.zone))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> serde_json::Map<String, Json> {
        serde_json::json!({
            "NAME": "productpage-v1-0", "NAMESPACE": "legate", "WORKLOAD_NAME": "productpage-v1",
            "OWNER": "kubernetes://apis/apps/v1/namespaces/legate/deployments/productpage-v1",
            "CLUSTER_ID": "Kubernetes", "MESH_ID": "cluster.local",
            "LABELS": {"app": "productpage", "version": "v1", "team": "a",
                CANONICAL_NAME: "productpage", CANONICAL_REVISION: "v1"}
        })
        .as_object()
        .unwrap()
        .clone()
    }

    #[test]
    fn a_node_round_trips_through_the_header() {
        let w = Workload::from_metadata(&node(), &["team".into()], ("r", "z"));
        assert_eq!(w.kind, Some("deployment"));
        assert_eq!((w.app.as_str(), w.region.as_str()), ("productpage", "r"));
        let h = w.header_value();
        assert_eq!(
            Workload::from_header(h.as_bytes(), &["team".into()]),
            Some(w.clone())
        );
        // Without padding too; the labels not asked for are not kept.
        let back = Workload::from_header(h.trim_end_matches('=').as_bytes(), &[]).unwrap();
        assert!(back.labels.is_empty());
        assert_eq!(back.workload_name, "productpage-v1");
        assert_eq!(Workload::from_header(b"!!", &[]), None);
    }

    /// Map entries go out in key order, whatever the map's own order.
    #[test]
    fn the_encoding_is_deterministic() {
        let w = Workload::from_metadata(&node(), &[], ("", ""));
        let bytes = encode_sorted(&w.to_struct());
        for _ in 0..5 {
            assert_eq!(encode_sorted(&w.to_struct()), bytes);
        }
        let back = Struct::decode(bytes.as_slice()).unwrap();
        assert_eq!(back, w.to_struct());
        let names: Vec<usize> = [
            "CLUSTER_ID",
            "LABELS",
            "NAME",
            "NAMESPACE",
            "OWNER",
            "WORKLOAD_NAME",
        ]
        .iter()
        .map(|k| {
            bytes
                .windows(k.len())
                .position(|x| x == k.as_bytes())
                .unwrap()
        })
        .collect();
        assert!(names.windows(2).all(|p| p[0] < p[1]), "{names:?}");
    }

    #[test]
    fn the_flat_node_has_istios_keys() {
        let s = Workload::from_metadata(&node(), &[], ("", "")).to_struct();
        let mut keys: Vec<_> = s.fields.keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "CLUSTER_ID",
                "LABELS",
                "NAME",
                "NAMESPACE",
                "OWNER",
                "WORKLOAD_NAME"
            ]
        );
        let empty = Workload::default().to_struct();
        assert_eq!(empty.fields.keys().collect::<Vec<_>>(), ["LABELS"]);
    }
}
