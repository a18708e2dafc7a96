//! The secret store: `static_resources.secrets` by name, as Envoy's secret
//! manager holds them for the whole server. Transport sockets resolve names
//! against it when they are translated.

use crate::config::tls::SecretValue;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, RwLock};

static STATIC: LazyLock<RwLock<HashMap<String, Arc<SecretValue>>>> =
    LazyLock::new(Default::default);

/// Replaces the static secrets (a bootstrap's whole set).
pub fn set_static(secrets: HashMap<String, Arc<SecretValue>>) {
    *STATIC.write().unwrap() = secrets;
}

/// Adds one static secret (tests).
pub fn insert_static(name: &str, v: SecretValue) {
    STATIC
        .write()
        .unwrap()
        .insert(name.to_string(), Arc::new(v));
}

pub fn get(name: &str) -> Option<Arc<SecretValue>> {
    STATIC.read().unwrap().get(name).cloned()
}
