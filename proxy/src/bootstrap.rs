//! Loading the bootstrap: file and `--config-yaml`, decoded with the Envoy
//! descriptor pool, merged, checked against the field registry and
//! translated into the validated [`Config`].

use crate::cli::Cli;
use crate::config::{self, cluster::ClusterConfig, listener::Listener, Config, ConfigError, Node};
use crate::registry;
use legate_proto::envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
use legate_proto::json;
use legate_proto::prost_reflect::{DynamicMessage, ReflectMessage};
use std::collections::HashSet;
use std::sync::Arc;

pub const BOOTSTRAP: &str = "envoy.config.bootstrap.v3.Bootstrap";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("unable to read file: {0}")]
    Read(String),
    #[error(transparent)]
    Proto(#[from] legate_proto::ProtoError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("At least one of --config-path or --config-yaml or Options::configProto() should be non-empty")]
    Empty,
}

/// The loaded bootstrap with what validation found.
pub struct Loaded {
    pub bootstrap: Bootstrap,
    pub ignored: Vec<registry::Ignored>,
    pub config: Config,
}

fn decode_text(text: &str, allow_unknown: bool) -> Result<Bootstrap, LoadError> {
    let value = json::parse_yaml(text)?;
    match json::to_message::<Bootstrap>(value.clone(), BOOTSTRAP, true) {
        Ok(b) => Ok(b),
        Err(e) if allow_unknown => {
            tracing::warn!(error = %e, "unknown static fields ignored (--allow-unknown-static-fields)");
            Ok(json::to_message::<Bootstrap>(value, BOOTSTRAP, false)?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Reads and merges the bootstrap sources named on the command line.
pub fn read(cli: &Cli) -> Result<Bootstrap, LoadError> {
    if cli.config_path.is_empty() && cli.config_yaml.is_empty() {
        return Err(LoadError::Empty);
    }
    let mut boot = Bootstrap::default();
    if !cli.config_path.is_empty() {
        let bytes = std::fs::read(&cli.config_path)
            .map_err(|e| LoadError::Read(format!("{}: {e}", cli.config_path)))?;
        boot = if cli.config_path.ends_with(".pb") {
            prost::Message::decode(bytes.as_slice()).map_err(|e| LoadError::Read(e.to_string()))?
        } else {
            decode_text(
                &String::from_utf8_lossy(&bytes),
                cli.allow_unknown_static_fields,
            )?
        };
    }
    if !cli.config_yaml.is_empty() {
        let overlay = decode_text(&cli.config_yaml, cli.allow_unknown_static_fields)?;
        boot = json::merge(&boot, &overlay);
    }
    Ok(boot)
}

/// Reads, checks and translates the bootstrap.
pub fn load(cli: &Cli) -> Result<Loaded, LoadError> {
    let bootstrap = read(cli)?;
    let dynamic = DynamicMessage::decode(
        json::descriptor(BOOTSTRAP)?,
        prost::Message::encode_to_vec(&bootstrap).as_slice(),
    )
    .map_err(|e| LoadError::Read(e.to_string()))?;
    let _ = dynamic.descriptor();
    // Envoy's own constraints (protoc-gen-validate rules in its protos).
    legate_proto::pgv::validate(&dynamic, "").map_err(|e| {
        let (path, message) = e.split_once(": ").unwrap_or(("", &e));
        ConfigError::new(
            path,
            format!("proto constraint validation failed: {message}"),
        )
    })?;
    let ignored = registry::validate(&dynamic)?;
    for i in &ignored {
        tracing::warn!(path = %i.path, reason = i.reason, "config field accepted but not applied");
        crate::stats::counter("legate.config.fields_ignored".into()).increment(1);
    }
    let config = translate(&bootstrap, cli)?;
    Ok(Loaded {
        bootstrap,
        ignored,
        config,
    })
}

pub fn struct_to_json(s: &crate::config::wkt::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: &crate::config::wkt::Value) -> serde_json::Value {
    use crate::config::wkt::value::Kind;
    match &v.kind {
        Some(Kind::NullValue(_)) | None => serde_json::Value::Null,
        Some(Kind::NumberValue(n)) => serde_json::json!(n),
        Some(Kind::StringValue(s)) => serde_json::json!(s),
        Some(Kind::BoolValue(b)) => serde_json::json!(b),
        Some(Kind::StructValue(s)) => struct_to_json(s),
        Some(Kind::ListValue(l)) => {
            serde_json::Value::Array(l.values.iter().map(value_to_json).collect())
        }
    }
}

/// Bootstrap → validated model.
pub fn translate(b: &Bootstrap, cli: &Cli) -> Result<Config, ConfigError> {
    let node_pb = b.node.clone().unwrap_or_default();
    let node = Node {
        id: if cli.service_node.is_empty() {
            node_pb.id
        } else {
            cli.service_node.clone()
        },
        cluster: if cli.service_cluster.is_empty() {
            node_pb.cluster
        } else {
            cli.service_cluster.clone()
        },
        zone: if cli.service_zone.is_empty() {
            node_pb
                .locality
                .as_ref()
                .map(|l| l.zone.clone())
                .unwrap_or_default()
        } else {
            cli.service_zone.clone()
        },
        region: node_pb
            .locality
            .as_ref()
            .map(|l| l.region.clone())
            .unwrap_or_default(),
        metadata: Arc::new(match node_pb.metadata.as_ref().map(struct_to_json) {
            Some(serde_json::Value::Object(m)) => m,
            _ => Default::default(),
        }),
    };
    config::set_local_node(&node);
    let dynamic = match &b.dynamic_resources {
        Some(d) => Some(config::Dynamic::from_proto(d, "dynamic_resources")?),
        None => None,
    };
    let admin = match b.admin.as_ref().and_then(|a| a.address.as_ref()) {
        Some(a) => Some(config::socket_addr(a, "admin.address")?),
        None => None,
    };
    let sr = b.static_resources.clone().unwrap_or_default();
    // Secrets first: transport sockets name them.
    let mut secrets = std::collections::HashMap::new();
    for (i, sec) in sr.secrets.iter().enumerate() {
        let p = config::index("static_resources", "secrets", i);
        let (name, v) = config::tls::static_secret(sec, &p)?;
        if secrets.insert(name.clone(), v.map(Arc::new)).is_some() {
            return Err(ConfigError::new(
                config::join(&p, "name"),
                format!("duplicate static secret name {name}"),
            ));
        }
    }
    crate::tls::secrets::set_static(secrets);
    let mut clusters = Vec::new();
    let mut names = HashSet::new();
    for (i, c) in sr.clusters.iter().enumerate() {
        let p = config::index("static_resources", "clusters", i);
        let cc = ClusterConfig::from_proto(c, &p)?;
        if !names.insert(cc.name.clone()) {
            return Err(ConfigError::new(
                config::join(&p, "name"),
                format!("cluster manager: duplicate cluster '{}'", cc.name),
            ));
        }
        clusters.push(Arc::new(cc));
    }
    let statics: std::collections::HashMap<String, Arc<ClusterConfig>> = clusters
        .iter()
        .map(|c| (c.name.clone(), c.clone()))
        .collect();
    let mut listeners = Vec::new();
    let mut lnames = HashSet::new();
    let mut addrs = HashSet::new();
    for (i, l) in sr.listeners.iter().enumerate() {
        let p = config::index("static_resources", "listeners", i);
        let lc = Listener::from_proto(l, &p)?;
        if !lnames.insert(lc.name.clone()) {
            // Envoy keeps the first listener of a name and ignores the rest.
            tracing::warn!(path = %p, name = %lc.name, "duplicate listener name: keeping the first, as Envoy does");
            continue;
        }
        if lc.address.port() != 0 && !addrs.insert((lc.address, lc.udp.is_some())) {
            return Err(ConfigError::new(
                config::join(&p, "address"),
                format!(
                    "error adding listener '{}': duplicate address {}",
                    lc.name, lc.address
                ),
            ));
        }
        // Static route tables are checked against the clusters (Envoy's
        // validate_clusters defaults to true for inline route configs).
        check_route_clusters(
            &lc,
            &names,
            &config::join(&p, "filter_chains[0].filters[0].typed_config.route_config"),
        )?;
        let used = lc.static_cluster_refs();
        crate::xds::pipe_cluster_use(used.iter().map(String::as_str), &statics)
            .map_err(|e| ConfigError::new(&p, e))?;
        listeners.push(Arc::new(lc));
    }
    if let Some(lr) = &b.layered_runtime {
        let mut seen = HashSet::new();
        for (i, l) in lr.layers.iter().enumerate() {
            if !seen.insert(l.name.clone()) {
                return Err(ConfigError::new(
                    format!("layered_runtime.layers[{i}].name"),
                    format!("Duplicate layer name: {}", l.name),
                ));
            }
        }
    }
    let mut runtime_layers = Vec::new();
    if let Some(lr) = &b.layered_runtime {
        use legate_proto::envoy_types::pb::envoy::config::bootstrap::v3::runtime_layer::LayerSpecifier as L;
        for (i, l) in lr.layers.iter().enumerate() {
            let p = format!("layered_runtime.layers[{i}]");
            match &l.layer_specifier {
                Some(L::StaticLayer(s)) => {
                    runtime_layers.push(config::RuntimeLayer::Static(struct_to_json(s)))
                }
                Some(L::RtdsLayer(r)) => {
                    let cs = r.rtds_config.as_ref().ok_or_else(|| {
                        ConfigError::new(
                            format!("{p}.rtds_layer.rtds_config"),
                            "rtds_config is required",
                        )
                    })?;
                    runtime_layers.push(config::RuntimeLayer::Rtds {
                        name: r.name.clone(),
                        source: config::source::XdsSource::from_proto(
                            cs,
                            &format!("{p}.rtds_layer.rtds_config"),
                        )?,
                    });
                }
                // The admin layer is empty until /runtime_modify (unsupported).
                _ => {}
            }
        }
    }
    let layers: Vec<serde_json::Value> = runtime_layers
        .iter()
        .filter_map(|l| match l {
            config::RuntimeLayer::Static(v) => Some(v.clone()),
            config::RuntimeLayer::Rtds { .. } => None,
        })
        .collect();
    let runtime = crate::runtime::Runtime::from_layers(&layers);
    // Legate reads runtime keys only through route runtime_fraction and its
    // own kernel LB settings; any other key (Envoy reads many) is reported, never silently dropped.
    let used: HashSet<&str> = listeners
        .iter()
        .flat_map(|l| l.hcms().filter_map(|h| h.static_routes()))
        .flat_map(|rc| rc.virtual_hosts.iter())
        .flat_map(|v| v.routes.iter())
        .filter_map(|r| r.matcher.runtime_fraction.as_ref().map(|(k, _)| k.as_str()))
        .collect();
    for (key, _) in runtime.entries() {
        let known = crate::kernel_lb::RUNTIME_KEYS.contains(&key.as_str())
            || key == crate::overload::RUNTIME_KEY;
        if !used.contains(key.as_str()) && !known {
            tracing::warn!(%key, "runtime key is not read by Legate (only route runtime_fraction and legate.kernel_lb keys are)");
            crate::stats::counter("legate.config.runtime_keys_ignored".into()).increment(1);
        }
    }
    // TLS towards management servers: what Legate cannot do as configured
    // is refused here rather than talked to in plaintext or left to fail.
    if let Some(d) = &dynamic {
        let sources = d
            .ads
            .iter()
            .chain(
                [&d.lds, &d.cds]
                    .into_iter()
                    .flatten()
                    .filter_map(|s| match &s.spec {
                        config::source::Spec::Api(a) => Some(a),
                        config::source::Spec::Ads => None,
                    }),
            );
        for a in sources {
            if let config::source::ApiTarget::Cluster(name) = &a.target {
                let Some((i, c)) = clusters.iter().enumerate().find(|(_, c)| &c.name == name)
                else {
                    continue;
                };
                let rest = a.kind == config::source::ApiKind::Rest;
                if let Some(why) = crate::xds::xds_tls_refusal(c, rest) {
                    return Err(ConfigError::new(
                        config::join(
                            &config::index("static_resources", "clusters", i),
                            "transport_socket",
                        ),
                        why,
                    ));
                }
            }
        }
    }
    let overload = match &b.overload_manager {
        Some(o) => crate::overload::OverloadConfig::from_proto(o, "overload_manager")?,
        None => Default::default(),
    };
    Ok(Config {
        node,
        admin,
        admin_ignores_conn_limit: b.admin.as_ref().is_some_and(|a| a.ignore_global_conn_limit),
        overload,
        listeners,
        clusters,
        runtime,
        runtime_layers,
        dynamic,
    })
}

fn check_route_clusters(
    l: &Listener,
    clusters: &HashSet<String>,
    path: &str,
) -> Result<(), ConfigError> {
    for rc in l.hcms().filter_map(|h| h.static_routes()) {
        check_table_clusters(rc, clusters, path)?;
    }
    Ok(())
}

fn check_table_clusters(
    rc: &crate::config::route::RouteConfig,
    clusters: &HashSet<String>,
    path: &str,
) -> Result<(), ConfigError> {
    use crate::config::route::{Action, ClusterSpec};
    if !rc.validate_clusters {
        return Ok(());
    }
    for (vi, vh) in rc.virtual_hosts.iter().enumerate() {
        for (ri, r) in vh.routes.iter().enumerate() {
            let Action::Forward(ra) = &r.action else {
                continue;
            };
            let names: Vec<&String> = match &ra.cluster {
                ClusterSpec::Name(n) => vec![n],
                ClusterSpec::Weighted(w) => w.clusters.iter().map(|c| &c.name).collect(),
                ClusterSpec::Header(_) => vec![],
            };
            for n in names {
                if !clusters.contains(n) {
                    return Err(ConfigError::new(
                        format!("{path}.virtual_hosts[{vi}].routes[{ri}].route"),
                        format!("route: unknown cluster '{n}'"),
                    ));
                }
            }
        }
    }
    Ok(())
}
