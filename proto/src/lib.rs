//! Envoy/xDS types for Legate.
//!
//! The Rust types come from the `envoy-types` crate. This crate adds what the
//! generated types lack: a descriptor pool of the Envoy API (compiled at build
//! time from the `.proto` sources `envoy-types` ships), so that bootstraps in
//! proto3 JSON or YAML can be decoded, `Any` resolved by type URL, and any
//! message walked field by field (see [`walk`]).

pub mod extra;
pub mod istio;
pub mod json;
pub mod pgv;
pub mod typed_struct;
pub mod walk;

pub use envoy_types;
pub use prost_reflect;

use prost_reflect::DescriptorPool;
use std::sync::OnceLock;

static DESCRIPTOR_BYTES: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptor.bin"));

/// The descriptor pool of every Envoy API message Legate knows by name.
pub fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let mut pool = DescriptorPool::decode(DESCRIPTOR_BYTES)
            .expect("embedded Envoy descriptor set is valid");
        extra::add_missing(&mut pool);
        pool
    })
}

/// Type URL prefix used by every Envoy `Any`.
pub const TYPE_URL_PREFIX: &str = "type.googleapis.com/";

/// The message name inside a type URL (`type.googleapis.com/a.b.C` → `a.b.C`).
pub fn type_name(type_url: &str) -> &str {
    type_url.rsplit_once('/').map_or(type_url, |(_, n)| n)
}

/// Type URLs of the two `TypedStruct` wrappers Envoy accepts for `typed_config`.
pub const TYPED_STRUCT_URLS: [&str; 2] = ["udpa.type.v1.TypedStruct", "xds.type.v3.TypedStruct"];

/// Errors from decoding Envoy configuration.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("{path}: {message}")]
    Json { path: String, message: String },
    #[error("invalid YAML: {0}")]
    Yaml(String),
    #[error("unknown message type {0}")]
    UnknownType(String),
    #[error("{path}: cannot decode {type_name}: {message}")]
    Binary {
        path: String,
        type_name: String,
        message: String,
    },
}
