//! Envoy `DataSource`: inline bytes, inline string, file or environment.

use crate::config::{join, ConfigError, Result};
use legate_proto::envoy_types::pb::envoy::config::core::v3 as core;

pub fn read(ds: &core::DataSource, path: &str) -> Result<bytes::Bytes> {
    use core::data_source::Specifier as S;
    match &ds.specifier {
        Some(S::InlineBytes(b)) => Ok(bytes::Bytes::from(b.clone())),
        Some(S::InlineString(s)) => Ok(bytes::Bytes::from(s.clone())),
        Some(S::Filename(f)) => std::fs::read(f).map(bytes::Bytes::from).map_err(|e| {
            ConfigError::new(join(path, "filename"), format!("cannot read '{f}': {e}"))
        }),
        Some(S::EnvironmentVariable(v)) => std::env::var(v).map(bytes::Bytes::from).map_err(|_| {
            ConfigError::new(
                join(path, "environment_variable"),
                format!("'{v}' is not set"),
            )
        }),
        None => Ok(bytes::Bytes::new()),
    }
}
