//! Logging with Envoy's level names, changeable at run time (`/logging`).

use tracing_subscriber::{reload, EnvFilter};

/// Maps Envoy's level names to tracing's.
pub fn level_filter(level: &str) -> Result<String, String> {
    Ok(match level {
        "trace" | "debug" | "info" | "error" | "off" => level.to_string(),
        "warning" | "warn" => "warn".into(),
        "critical" => "error".into(),
        other => return Err(format!("invalid log level '{other}'")),
    })
}

/// Changes the log level at run time (`/logging?level=`).
pub type LevelSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Installs the subscriber; returns a setter for the level.
pub fn init(level: &str) -> Result<LevelSetter, String> {
    let filter = EnvFilter::new(level_filter(level)?);
    let (layer, handle) = reload::Layer::new(filter);
    use tracing_subscriber::prelude::*;
    tracing_subscriber::registry()
        .with(layer)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false),
        )
        .init();
    Ok(Box::new(move |l: &str| {
        let f = EnvFilter::new(level_filter(l)?);
        handle.reload(f).map_err(|e| e.to_string())
    }))
}
