//! Applying xDS to the data plane.
//!
//! The [`Applier`] is the xDS client's [`Handler`]: every resource is
//! decoded, checked against Envoy's proto constraints and Legate's field
//! registry, translated into the validated model, and only then applied. A
//! bad resource is named in the NACK while the rest of its batch applies and
//! the last good config keeps serving.
//!
//! Dependencies follow Envoy's rules: listeners reference route tables
//! (RDS) and scopes (SRDS); clusters reference endpoints (EDS). A new or
//! changed listener warms until its route tables are present, and a new or
//! changed EDS cluster until its endpoints are, bounded by the source's
//! `initial_fetch_timeout`; meanwhile the previous version keeps serving.
//! RDS and EDS subscriptions follow the references, and a route table, scope
//! or endpoint set that nothing references any more is dropped.

use crate::cluster_manager::{Cluster, ClusterManager};
use crate::config::cluster::{ClusterConfig, Discovery};
use crate::config::listener::{Listener, RouteSource, ScopeList};
use crate::config::route::RouteConfig;
use crate::config::scoped::Scope;
use crate::config::source::{ApiKind, Spec, XdsSource};
use crate::config::{RuntimeLayer, Wrapped};
use crate::route_tables::RouteTables;
use crate::runtime::Runtime;
use crate::server::ListenerManager;
use crate::{registry, stats};
use arc_swap::ArcSwap;
use legate_proto::envoy_types::pb::envoy::config::cluster::v3 as cluster_pb;
use legate_proto::envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use legate_proto::envoy_types::pb::envoy::config::listener::v3 as listener_pb;
use legate_proto::envoy_types::pb::envoy::config::route::v3 as route_pb;
use legate_proto::envoy_types::pb::envoy::service::runtime::v3::Runtime as RuntimePb;
use legate_xds_client::client::{Source, Target, Transport, Via, XdsClient};
use legate_xds_client::types as t;
use legate_xds_client::{Any, Handler, Interest, Resource, ResourceError, Update};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

/// A dynamic resource as applied (or rejected), for `/config_dump`.
#[derive(Clone, Debug)]
pub struct Applied {
    pub version: String,
    pub last_updated: SystemTime,
    pub body: Any,
}

struct LdsEntry {
    config: Arc<Listener>,
    applied: Applied,
    active: bool,
    /// When it started warming (for `initial_fetch_timeout`).
    since: Instant,
}

struct CdsEntry {
    config: Arc<ClusterConfig>,
    applied: Applied,
    active: bool,
    since: Instant,
}

#[derive(Default)]
struct State {
    listeners: BTreeMap<String, LdsEntry>,
    clusters: BTreeMap<String, CdsEntry>,
    /// Route tables as received (VHDS virtual hosts are merged in on use).
    routes: BTreeMap<String, (route_pb::RouteConfiguration, Applied)>,
    vhosts: BTreeMap<String, BTreeMap<String, route_pb::VirtualHost>>,
    endpoints: BTreeMap<String, (ClusterLoadAssignment, Applied)>,
    scopes: BTreeMap<String, (Scope, Applied)>,
    scopes_received: bool,
    /// SDS secrets as received (their values live in `tls::secrets`).
    secrets: BTreeMap<String, Applied>,
    /// ECDS filter configs (the router's: the only HTTP filter there is).
    extensions: BTreeMap<String, Applied>,
    rtds: HashMap<String, serde_json::Value>,
    /// Route names that draining listeners still use, until the deadline.
    draining: Vec<(Instant, Vec<String>)>,
    /// How each type is fetched (the last source that referenced it).
    via: HashMap<&'static str, Via>,
    /// Last rejection per (type, name), for `/config_dump` error_state.
    errors: BTreeMap<(String, String), String>,
    lds_received: bool,
    cds_received: bool,
    /// Static listeners warming for their SDS secrets, since start-up.
    static_warming: Vec<(Arc<Listener>, Instant)>,
}

pub struct Applier {
    clusters: Arc<ClusterManager>,
    listeners: Arc<ListenerManager>,
    routes: Arc<RouteTables>,
    runtime: Arc<ArcSwap<Runtime>>,
    runtime_layers: Vec<RuntimeLayer>,
    /// Static clusters, which name the management servers.
    statics: HashMap<String, Arc<ClusterConfig>>,
    /// SDS secrets static listeners and clusters use.
    static_sds: Vec<(String, XdsSource)>,
    /// SDS secrets each published route table's per-route configs read,
    /// kept as tables are published (not walked on every update).
    route_sds: Mutex<HashMap<String, Vec<(String, XdsSource)>>>,
    drain_time: Duration,
    dynamic: Option<crate::config::Dynamic>,
    client: OnceLock<Arc<XdsClient>>,
    state: Mutex<State>,
    initialized: tokio::sync::watch::Sender<bool>,
    /// When the applier was made: static EDS clusters' initial fetch
    /// timeouts count from here.
    started: Instant,
    me: Weak<Applier>,
}

impl Applied {
    fn of(r: &Resource) -> Self {
        Self {
            version: r.version.clone(),
            last_updated: SystemTime::now(),
            body: r.body.clone(),
        }
    }
}

/// Parses each resource; a failure becomes that resource's error (so the
/// NACK names it) and the others go on to be applied.
fn parse_each<'u, T>(
    resources: impl IntoIterator<Item = &'u Resource>,
    errors: &mut Vec<ResourceError>,
    mut parse: impl FnMut(&Resource) -> Result<T, String>,
) -> Vec<(&'u Resource, T)> {
    let mut out = Vec::new();
    for r in resources {
        match parse(r) {
            Ok(v) => out.push((r, v)),
            Err(message) => errors.push(ResourceError {
                name: r.name.clone(),
                message,
            }),
        }
    }
    out
}

/// A resource decoded and checked against Envoy's constraints and the
/// field registry.
fn check<M: prost::Message + Default>(any: &Any) -> Result<M, String> {
    // `TypedStruct` configs are read as the messages they name, as Envoy
    // reads them, before anything looks at the fields.
    let expanded = legate_proto::typed_struct::expand_encoded(&any.type_url, &any.value)
        .map_err(|e| e.to_string())?;
    let (dynamic, bytes) = match expanded {
        Some((dynamic, bytes)) => (dynamic, std::borrow::Cow::Owned(bytes)),
        None => (
            legate_proto::walk::decode_any(&any.type_url, &any.value, "")
                .map_err(|e| e.to_string())?,
            std::borrow::Cow::Borrowed(any.value.as_slice()),
        ),
    };
    legate_proto::pgv::validate(&dynamic, "")
        .map_err(|e| format!("proto constraint validation failed: {e}"))?;
    for i in registry::validate(&dynamic).map_err(|e| e.to_string())? {
        tracing::warn!(path = %i.path, reason = i.reason, "config field accepted but not applied");
        stats::counter("legate.config.fields_ignored".into()).increment(1);
    }
    M::decode(bytes.as_ref()).map_err(|e| e.to_string())
}

/// Whether Legate can reach a management server through `cluster` over
/// TLS as configured: inline or file certificates over gRPC. Refused
/// rather than weakened: SDS secrets (the xDS connection would wait on what
/// it delivers), `transport_socket_matches`, and REST.
pub fn xds_tls_refusal(cluster: &ClusterConfig, rest: bool) -> Option<String> {
    let name = &cluster.name;
    if !cluster.tls_matches.is_empty() {
        return Some(format!(
            "xDS cluster '{name}': transport_socket_matches are not supported for management servers"
        ));
    }
    let tls = cluster.tls.as_ref()?;
    if !tls.sds.is_empty() {
        return Some(format!(
            "xDS cluster '{name}': TLS secrets from SDS are not supported for management servers"
        ));
    }
    rest.then(|| format!("xDS cluster '{name}': REST over TLS is not supported"))
}

fn target_of(cluster: &ClusterConfig) -> Option<Target> {
    let ep = cluster
        .localities
        .iter()
        .flat_map(|l| l.endpoints.iter())
        .next()?;
    if let Some(path) = &ep.pipe {
        return Some(Target::Unix(path.into()));
    }
    let ip: std::net::IpAddr =
        ep.host.parse().ok().or_else(|| {
            (ep.host == "localhost").then_some(std::net::IpAddr::from([127, 0, 0, 1]))
        })?;
    let addr = SocketAddr::new(ip, ep.port);
    Some(match &cluster.tls {
        None => Target::Tcp(addr),
        Some(tls) => {
            // gRPC over TLS needs ALPN h2; the context's own list, if any,
            // is offered after it.
            let mut config = (*tls.config).clone();
            if !config.alpn_protocols.iter().any(|p| p == b"h2") {
                config.alpn_protocols.insert(0, b"h2".to_vec());
            }
            Target::Tls(legate_xds_client::client::TlsTarget {
                addr,
                name: crate::tls::upstream::server_name(Some(&tls.sni), addr),
                config: Arc::new(config),
            })
        }
    })
}

/// A google_grpc `target_uri`: `unix:path`, `unix:///path`, `dns:///host:port`,
/// `ipv4:addr:port` or plain `host:port` (resolved once, at start-up).
pub fn parse_target_uri(uri: &str) -> Result<Target, String> {
    if let Some(path) = uri
        .strip_prefix("unix://")
        .or_else(|| uri.strip_prefix("unix:"))
    {
        return Ok(Target::Unix(path.into()));
    }
    let hostport = uri
        .strip_prefix("dns:///")
        .or_else(|| uri.strip_prefix("ipv4:"))
        .or_else(|| uri.strip_prefix("ipv6:"))
        .unwrap_or(uri);
    use std::net::ToSocketAddrs;
    hostport
        .to_socket_addrs()
        .map_err(|e| format!("google_grpc target_uri '{uri}': {e}"))?
        .next()
        .map(Target::Tcp)
        .ok_or_else(|| format!("google_grpc target_uri '{uri}' resolves to nothing"))
}

/// Clusters with Unix-socket endpoints reach management servers only: a
/// route or tcp_proxy that sends traffic to one is refused, not left to fail.
pub fn pipe_cluster_use<'a>(
    names: impl Iterator<Item = &'a str>,
    statics: &HashMap<String, Arc<ClusterConfig>>,
) -> Result<(), String> {
    for n in names {
        if statics.get(n).is_some_and(|c| c.has_pipe()) {
            return Err(format!(
                "cluster '{n}' has Unix-socket (pipe) endpoints, which Legate uses only to reach management servers; it cannot carry proxied traffic yet"
            ));
        }
    }
    Ok(())
}

/// The ECDS filter configs a listener needs before it can serve.
fn extension_deps(l: &Listener) -> Vec<(String, XdsSource)> {
    l.hcms().flat_map(|h| h.ecds.iter().cloned()).collect()
}

/// The route tables a listener needs before it can serve.
fn route_deps(l: &Listener) -> (Vec<String>, bool) {
    let (mut names, mut scopes) = (Vec::new(), false);
    for h in l.hcms() {
        match &h.routes {
            RouteSource::Static(_) => {}
            RouteSource::Rds { name, .. } => names.push(name.clone()),
            RouteSource::Scoped(s) => match &s.scopes {
                ScopeList::Inline(list) => names.extend(list.iter().map(|s| s.route.clone())),
                ScopeList::Srds(_) => scopes = true,
            },
        }
    }
    (names, scopes)
}

impl Applier {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        clusters: Arc<ClusterManager>,
        listeners: Arc<ListenerManager>,
        routes: Arc<RouteTables>,
        runtime: Arc<ArcSwap<Runtime>>,
        config: &crate::config::Config,
        drain_time: Duration,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            clusters,
            listeners,
            routes,
            runtime,
            runtime_layers: config.runtime_layers.clone(),
            statics: config
                .clusters
                .iter()
                .map(|c| (c.name.clone(), c.clone()))
                .collect(),
            static_sds: config
                .listeners
                .iter()
                .flat_map(|l| l.sds_refs().cloned().collect::<Vec<_>>())
                .chain(config.clusters.iter().flat_map(|c| c.sds_refs()))
                .collect(),
            route_sds: Mutex::default(),
            drain_time,
            dynamic: config.dynamic.clone(),
            client: OnceLock::new(),
            state: Mutex::new(State {
                static_warming: config
                    .listeners
                    .iter()
                    .filter(|l| l.sds_refs().next().is_some())
                    .map(|l| (l.clone(), Instant::now()))
                    .collect(),
                ..State::default()
            }),
            initialized: tokio::sync::watch::channel(false).0,
            started: Instant::now(),
            me: me.clone(),
        })
    }

    /// How a config source is reached.
    pub fn via(&self, source: &XdsSource) -> Result<Via, String> {
        match &source.spec {
            Spec::Ads => Ok(Via::Ads),
            Spec::Api(a) => Ok(Via::Source(self.api_source(a)?)),
        }
    }

    fn api_source(&self, a: &crate::config::source::ApiSource) -> Result<Source, String> {
        use crate::config::source::ApiTarget;
        let target = match &a.target {
            ApiTarget::Cluster(name) => {
                let c = self
                    .statics
                    .get(name)
                    .ok_or_else(|| format!("xDS cluster '{name}' is not a static cluster"))?;
                if let Some(why) = xds_tls_refusal(c, a.kind == ApiKind::Rest) {
                    return Err(why);
                }
                target_of(c).ok_or_else(|| {
                    format!("xDS cluster '{name}' has no IP or Unix-socket endpoint")
                })?
            }
            ApiTarget::Uri(uri) => parse_target_uri(uri)?,
        };
        let transport = match a.kind {
            ApiKind::Grpc => Transport::Grpc { delta: false },
            ApiKind::DeltaGrpc => Transport::Grpc { delta: true },
            ApiKind::Rest => Transport::Rest {
                refresh: a.refresh_delay,
            },
        };
        Ok(Source {
            target,
            transport,
            node_first_only: a.node_first_only,
        })
    }

    /// Starts the xDS client: CDS first, then LDS and the RTDS layers (the
    /// order of Envoy's initialization).
    pub fn start(&self, node: legate_xds_client::Node) -> Result<(), String> {
        // Static listeners and clusters may need SDS without any other
        // dynamic resources.
        if self.dynamic.is_none() && self.static_sds.is_empty() {
            self.initialized.send_replace(true);
            return Ok(());
        }
        let d = self.dynamic.clone().unwrap_or_default();
        let ads = d.ads.as_ref().map(|a| self.api_source(a)).transpose()?;
        let me = self.me.upgrade().expect("applier is alive");
        let client = XdsClient::new(node, me, ads);
        let _ = self.client.set(client.clone());
        {
            let mut st = self.state.lock().unwrap();
            st.cds_received = d.cds.is_none();
            st.lds_received = d.lds.is_none();
        }
        if let Some(cds) = &d.cds {
            let via = self.via(cds)?;
            client
                .watch(t::CLUSTER, &via, Interest::wildcard())
                .map_err(|e| e.to_string())?;
        }
        if let Some(lds) = &d.lds {
            let via = self.via(lds)?;
            client
                .watch(t::LISTENER, &via, Interest::wildcard())
                .map_err(|e| e.to_string())?;
        }
        let layers: Vec<(String, Via)> = self
            .runtime_layers
            .iter()
            .filter_map(|l| match l {
                RuntimeLayer::Rtds { name, source } => Some((name.clone(), source)),
                RuntimeLayer::Static(_) => None,
            })
            .map(|(n, s)| self.via(s).map(|v| (n, v)))
            .collect::<Result<_, _>>()?;
        if let Some((_, via)) = layers.first() {
            client
                .watch(
                    t::RUNTIME,
                    via,
                    Interest::names(layers.iter().map(|(n, _)| n.clone())),
                )
                .map_err(|e| e.to_string())?;
        }
        {
            let mut st = self.state.lock().unwrap();
            self.reconcile(&mut st, &mut Vec::new());
        }
        // Warming deadlines are checked once a second.
        let weak = self.me.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(a) = weak.upgrade() else { break };
                let mut st = a.state.lock().unwrap();
                a.reconcile(&mut st, &mut Vec::new());
            }
        });
        Ok(())
    }

    /// Resolves when initialization is over (every first fetch answered and
    /// warmed, or timed out).
    pub async fn initialized(&self) {
        let mut rx = self.initialized.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }

    fn fetch_timeout(&self) -> Option<Duration> {
        self.dynamic
            .as_ref()
            .and_then(|d| d.lds.as_ref().or(d.cds.as_ref()))
            .and_then(|s| s.initial_fetch_timeout)
    }

    fn timed_out(&self, since: Instant) -> bool {
        self.fetch_timeout().is_some_and(|t| since.elapsed() >= t)
    }

    fn apply_listeners(&self, st: &mut State, u: &Update, errors: &mut Vec<ResourceError>) {
        st.lds_received = true;
        stats::counter("listener_manager.lds.update_attempt".into()).increment(1);
        // An unchanged listener is left alone, as Envoy ignores it.
        let changed = u.updated.iter().filter(|r| {
            st.listeners
                .get(&r.name)
                .is_none_or(|e| e.applied.body != r.body)
        });
        let parsed = parse_each(changed, errors, |r| {
            let l = Listener::from_proto(&check::<listener_pb::Listener>(&r.body)?, "")
                .map_err(|e| e.to_string())?;
            pipe_cluster_use(
                l.static_cluster_refs().iter().map(String::as_str),
                &self.statics,
            )?;
            Ok(l)
        });
        for (r, l) in parsed {
            st.listeners.insert(
                r.name.clone(),
                LdsEntry {
                    config: Arc::new(l),
                    applied: Applied::of(r),
                    active: false,
                    since: Instant::now(),
                },
            );
        }
        for name in &u.removed {
            if let Some(e) = st.listeners.remove(name) {
                self.retire_routes(st, &e.config);
                self.listeners.remove(name);
            }
        }
    }

    /// Keeps a replaced or removed listener's route tables while its
    /// connections drain.
    fn retire_routes(&self, st: &mut State, l: &Listener) {
        let (names, _) = route_deps(l);
        if !names.is_empty() {
            st.draining.push((
                Instant::now() + self.drain_time + Duration::from_millis(500),
                names,
            ));
        }
    }

    fn apply_routes(&self, st: &mut State, u: &Update, errors: &mut Vec<ResourceError>) {
        let parsed = parse_each(&u.updated, errors, |r| {
            let pb = check::<route_pb::RouteConfiguration>(&r.body)?;
            let rc = self.translate_route(&pb, st.vhosts.get(&r.name))?;
            Ok((pb, rc))
        });
        for (r, (pb, rc)) in parsed {
            self.publish_route(&r.name, Some(rc));
            st.routes.insert(r.name.clone(), (pb, Applied::of(r)));
        }
        for name in &u.removed {
            st.routes.remove(name);
            self.publish_route(name, None);
        }
    }

    /// A route table with its VHDS virtual hosts merged in.
    fn translate_route(
        &self,
        pb: &route_pb::RouteConfiguration,
        vhosts: Option<&BTreeMap<String, route_pb::VirtualHost>>,
    ) -> Result<RouteConfig, String> {
        let mut pb = pb.clone();
        if pb.vhds.take().is_some() {
            pb.virtual_hosts
                .extend(vhosts.into_iter().flat_map(|m| m.values().cloned()));
        }
        let rc = RouteConfig::from_proto(&pb, "").map_err(|e| e.to_string())?;
        pipe_cluster_use(rc.cluster_names(), &self.statics)?;
        Ok(rc)
    }

    fn publish_route(&self, name: &str, rc: Option<RouteConfig>) {
        {
            let mut sds = self.route_sds.lock().unwrap_or_else(|e| e.into_inner());
            match rc.as_ref().map(|rc| rc.sds_refs()) {
                Some(refs) if !refs.is_empty() => {
                    sds.insert(name.to_string(), refs.into_iter().cloned().collect());
                }
                _ => {
                    sds.remove(name);
                }
            }
        }
        let rc = rc.map(Arc::new);
        self.routes.rds.rcu(|m| {
            let mut m = HashMap::clone(m);
            match &rc {
                Some(rc) => m.insert(name.to_string(), rc.clone()),
                None => m.remove(name),
            };
            m
        });
    }

    fn apply_vhosts(&self, st: &mut State, u: &Update, errors: &mut Vec<ResourceError>) {
        let mut touched = BTreeSet::new();
        let parsed = parse_each(&u.updated, errors, |r| {
            let (route, _) = r
                .name
                .split_once('/')
                .ok_or("VHDS names are <route configuration>/<host>")?;
            Ok((route.to_string(), check::<route_pb::VirtualHost>(&r.body)?))
        });
        for (r, (route, vh)) in parsed {
            st.vhosts
                .entry(route.clone())
                .or_default()
                .insert(r.name.clone(), vh);
            touched.insert(route);
        }
        for name in &u.removed {
            if let Some((route, _)) = name.split_once('/') {
                if let Some(m) = st.vhosts.get_mut(route) {
                    m.remove(name);
                }
                touched.insert(route.to_string());
            }
        }
        for route in touched {
            if let Some((pb, _)) = st.routes.get(&route) {
                match self.translate_route(pb, st.vhosts.get(&route)) {
                    Ok(rc) => self.publish_route(&route, Some(rc)),
                    Err(e) => errors.push(ResourceError {
                        name: route,
                        message: e,
                    }),
                }
            }
        }
    }

    fn apply_clusters(&self, st: &mut State, u: &Update, errors: &mut Vec<ResourceError>) {
        st.cds_received = true;
        stats::counter("cluster_manager.cds.update_attempt".into()).increment(1);
        let changed = u.updated.iter().filter(|r| {
            st.clusters
                .get(&r.name)
                .is_none_or(|e| e.applied.body != r.body)
        });
        let parsed = parse_each(changed, errors, |r| {
            if self.statics.contains_key(&r.name) {
                return Err(format!(
                    "cluster '{}' is static and cannot be updated by CDS",
                    r.name
                ));
            }
            let c = ClusterConfig::from_proto(&check::<cluster_pb::Cluster>(&r.body)?, "")
                .map_err(|e| e.to_string())?;
            if c.has_pipe() {
                return Err("pipe endpoints are supported in static clusters only".into());
            }
            if let Some(eds) = &c.eds {
                self.via(&eds.source)?;
            }
            Ok(c)
        });
        for (r, c) in parsed {
            st.clusters.insert(
                r.name.clone(),
                CdsEntry {
                    config: Arc::new(c),
                    applied: Applied::of(r),
                    active: false,
                    since: Instant::now(),
                },
            );
        }
        let removed: Vec<String> = u
            .removed
            .iter()
            .filter(|n| st.clusters.remove(*n).is_some())
            .cloned()
            .collect();
        stats::counter("cluster_manager.cluster_removed".into()).increment(removed.len() as u64);
        self.clusters.update(Vec::new(), &removed);
    }

    fn apply_endpoints(&self, st: &mut State, u: &Update, errors: &mut Vec<ResourceError>) {
        // Active clusters by the endpoint set they use (one pass, not one
        // per resource: EDS pushes can carry thousands).
        let mut users: HashMap<String, Vec<Arc<Cluster>>> = HashMap::new();
        for c in self.clusters.all() {
            if let Some(e) = &c.config.eds {
                users
                    .entry(e.service_name.clone())
                    .or_default()
                    .push(c.clone());
            }
        }
        let parsed = parse_each(&u.updated, errors, |r| {
            let cla = check::<ClusterLoadAssignment>(&r.body)?;
            crate::config::cluster::load_assignment(&cla, "", Discovery::Eds)
                .map_err(|e| e.to_string())?;
            Ok(cla)
        });
        for (r, cla) in parsed {
            // Active clusters take new endpoints at once.
            for c in users.get(&r.name).into_iter().flatten() {
                set_endpoints(c, &cla);
            }
            st.endpoints.insert(r.name.clone(), (cla, Applied::of(r)));
        }
        for name in &u.removed {
            st.endpoints.remove(name);
            for c in users.get(name).into_iter().flatten() {
                set_endpoints(c, &ClusterLoadAssignment::default());
            }
        }
    }

    fn apply_scopes(&self, st: &mut State, u: &Update, errors: &mut Vec<ResourceError>) {
        st.scopes_received = true;
        let parsed = parse_each(&u.updated, errors, |r| {
            let pb = check::<route_pb::ScopedRouteConfiguration>(&r.body)?;
            Scope::from_proto(&pb, "").map_err(|e| e.to_string())
        });
        for (r, s) in parsed {
            st.scopes.insert(r.name.clone(), (s, Applied::of(r)));
        }
        for name in &u.removed {
            st.scopes.remove(name);
        }
        self.routes.scopes.store(Arc::new(
            st.scopes.values().map(|(s, _)| s.clone()).collect(),
        ));
    }

    fn apply_extensions(&self, st: &mut State, u: &Update, errors: &mut Vec<ResourceError>) {
        use legate_proto::envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
        let parsed = parse_each(&u.updated, errors, |r| {
            let tec = check::<TypedExtensionConfig>(&r.body)?;
            let tn = tec
                .typed_config
                .as_ref()
                .map(|a| legate_proto::type_name(&a.type_url).to_string())
                .unwrap_or_default();
            if tn != crate::config::listener::ROUTER_TYPE {
                return Err(format!("HTTP filter {tn} is not supported"));
            }
            if let Some(a) = &tec.typed_config {
                crate::config::listener::discovered_router(a, "typed_config")
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        });
        for (r, ()) in parsed {
            st.extensions.insert(r.name.clone(), Applied::of(r));
        }
        for name in &u.removed {
            st.extensions.remove(name);
        }
    }

    /// SDS: a new or changed secret applies to the next handshake; nothing
    /// is rebuilt and no connection is touched.
    fn apply_secrets(&self, st: &mut State, u: &Update, errors: &mut Vec<ResourceError>) {
        use legate_proto::envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
        let changed = u
            .updated
            .iter()
            .filter(|r| st.secrets.get(&r.name).is_none_or(|a| a.body != r.body));
        let parsed = parse_each(changed, errors, |r| {
            let (name, v) = crate::config::tls::secret(&check::<Secret>(&r.body)?, "")
                .map_err(|e| e.to_string())?;
            if name != r.name {
                return Err(format!("secret named '{name}' sent as '{}'", r.name));
            }
            Ok(v)
        });
        for (r, v) in parsed {
            crate::tls::secrets::set_dynamic(&r.name, v);
            stats::counter("sds.update_success".into()).increment(1);
            tracing::info!(secret = %r.name, "secret updated");
            st.secrets.insert(r.name.clone(), Applied::of(r));
        }
        for name in &u.removed {
            st.secrets.remove(name);
            crate::tls::secrets::remove_dynamic(name);
        }
    }

    fn apply_runtime(&self, st: &mut State, u: &Update, errors: &mut Vec<ResourceError>) {
        let parsed = parse_each(&u.updated, errors, |r| check::<RuntimePb>(&r.body));
        for (r, pb) in parsed {
            let v = pb
                .layer
                .as_ref()
                .map(crate::bootstrap::struct_to_json)
                .unwrap_or_default();
            st.rtds.insert(r.name.clone(), v);
        }
        for name in &u.removed {
            st.rtds.remove(name);
        }
        let layers: Vec<serde_json::Value> = self
            .runtime_layers
            .iter()
            .filter_map(|l| match l {
                RuntimeLayer::Static(v) => Some(v.clone()),
                RuntimeLayer::Rtds { name, .. } => st.rtds.get(name).cloned(),
            })
            .collect();
        let runtime = Runtime::from_layers(&layers);
        crate::overload::set_runtime(&runtime);
        self.runtime.store(Arc::new(runtime));
    }

    /// Brings the data plane in line with the state: activates what has
    /// warmed, follows references with subscriptions, drops what nothing
    /// references.
    fn reconcile(&self, st: &mut State, errors: &mut Vec<ResourceError>) {
        let Some(client) = self.client.get() else {
            return;
        };
        // Clusters.
        let mut eds_names = BTreeSet::new();
        let mut eds_via = None;
        let mut warming_clusters = 0;
        let mut activated = Vec::new();
        for (name, e) in st.clusters.iter_mut() {
            if let Some(eds) = &e.config.eds {
                eds_names.insert(eds.service_name.clone());
                eds_via = eds_via.or_else(|| self.via(&eds.source).ok());
            }
            if e.active {
                continue;
            }
            let ready = (e
                .config
                .eds
                .as_ref()
                .is_none_or(|eds| st.endpoints.contains_key(&eds.service_name))
                && e.config
                    .sds_refs()
                    .iter()
                    .all(|(n, src)| secret_ready(&st.secrets, n, src, e.since)))
                || self.timed_out(e.since);
            if !ready {
                warming_clusters += 1;
                continue;
            }
            e.active = true;
            stats::counter("cluster_manager.cluster_added".into()).increment(1);
            let config = e.config.clone();
            match config.discovery {
                Discovery::StrictDns | Discovery::LogicalDns => {
                    let cm = self.clusters.clone();
                    tokio::spawn(async move {
                        cm.insert(ClusterManager::build(config).await);
                    });
                }
                _ => {
                    let c = Arc::new(Cluster::new(config.clone()));
                    if let Some(eds) = &config.eds {
                        if let Some((cla, _)) = st.endpoints.get(&eds.service_name) {
                            set_endpoints(&c, cla);
                        }
                    }
                    tracing::debug!(cluster = %name, "cluster active");
                    activated.push(c);
                }
            }
        }
        if !activated.is_empty() {
            tracing::info!(clusters = activated.len(), "clusters active");
        }
        self.clusters.update(activated, &[]);
        // Static EDS clusters hold initialization until their endpoints
        // arrive or their initial fetch times out, as Envoy's static
        // cluster phase does (no gauge: they are not CDS clusters warming).
        let mut static_eds_waiting = 0;
        for c in self.statics.values() {
            if let Some(eds) = &c.eds {
                eds_names.insert(eds.service_name.clone());
                eds_via = eds_via.or_else(|| self.via(&eds.source).ok());
                let waited_out = eds
                    .source
                    .initial_fetch_timeout
                    .is_some_and(|t| self.started.elapsed() >= t);
                // A source that cannot be subscribed to is not waited on.
                let reachable = self.via(&eds.source).is_ok();
                if reachable && !st.endpoints.contains_key(&eds.service_name) && !waited_out {
                    static_eds_waiting += 1;
                }
            }
        }
        st.endpoints.retain(|n, _| eds_names.contains(n));
        stats::gauge("cluster_manager.warming_clusters".into()).set(warming_clusters as f64);
        follow(st, client, t::ENDPOINT, eds_via, Interest::names(eds_names));

        // Listeners and what they reference.
        let now = Instant::now();
        st.draining.retain(|(deadline, _)| *deadline > now);
        let mut rds_names: BTreeSet<String> = st
            .draining
            .iter()
            .flat_map(|(_, n)| n.iter().cloned())
            .collect();
        let mut rds_via = None;
        let mut srds_via = None;
        for e in st.listeners.values() {
            for h in e.config.hcms() {
                match &h.routes {
                    RouteSource::Rds { name, source } => {
                        rds_names.insert(name.clone());
                        rds_via = rds_via.or_else(|| self.via(source).ok());
                    }
                    RouteSource::Scoped(s) => {
                        rds_via = rds_via.or_else(|| self.via(&s.rds_source).ok());
                        match &s.scopes {
                            ScopeList::Inline(list) => {
                                rds_names.extend(list.iter().map(|s| s.route.clone()))
                            }
                            ScopeList::Srds(src) => {
                                srds_via = srds_via.or_else(|| self.via(src).ok());
                            }
                        }
                    }
                    RouteSource::Static(_) => {}
                }
            }
        }
        if srds_via.is_some() {
            rds_names.extend(st.scopes.values().map(|(s, _)| s.route.clone()));
        }
        let mut warming_listeners = 0;
        let names: Vec<String> = st.listeners.keys().cloned().collect();
        for name in names {
            let e = &st.listeners[&name];
            if e.active {
                continue;
            }
            let (deps, needs_scopes) = route_deps(&e.config);
            let ready = (deps.iter().all(|d| st.routes.contains_key(d))
                && (!needs_scopes || st.scopes_received)
                && extension_deps(&e.config)
                    .iter()
                    .all(|(n, _)| st.extensions.contains_key(n))
                && e.config
                    .sds_refs()
                    .all(|(n, src)| secret_ready(&st.secrets, n, src, e.since)))
                || self.timed_out(e.since);
            if !ready {
                warming_listeners += 1;
                continue;
            }
            let config = e.config.clone();
            let old = self.listeners.get(&name);
            match self.listeners.upsert(config) {
                Ok(addr) => {
                    tracing::info!(listener = %name, %addr, "listener active");
                    if let Some(old) = old {
                        self.retire_routes(st, &old);
                    }
                    st.listeners.get_mut(&name).expect("present").active = true;
                }
                Err(e) => {
                    stats::counter("listener_manager.listener_create_failure".into()).increment(1);
                    errors.push(ResourceError {
                        name: name.clone(),
                        message: format!(
                            "cannot bind '{}': {e}",
                            st.listeners[&name].config.address
                        ),
                    });
                    st.listeners.remove(&name);
                }
            }
        }
        // Static listeners that waited for SDS secrets start once they are
        // there (or their fetch timed out).
        let secrets = &st.secrets;
        let (ready, still): (Vec<_>, Vec<_>) = std::mem::take(&mut st.static_warming)
            .into_iter()
            .partition(|(l, since)| {
                l.sds_refs()
                    .all(|(n, src)| secret_ready(secrets, n, src, *since))
            });
        st.static_warming = still;
        warming_listeners += st.static_warming.len();
        for (l, _) in ready {
            match self.listeners.add(l.clone()) {
                Ok(addr) => {
                    tracing::info!(listener = %l.name, %addr, "static listener active (its secrets arrived)")
                }
                Err(e) => {
                    stats::counter("listener_manager.listener_create_failure".into()).increment(1);
                    tracing::error!(listener = %l.name, address = %l.address, error = %e, "cannot bind static listener");
                }
            }
        }
        stats::gauge("listener_manager.total_listeners_warming".into())
            .set(warming_listeners as f64);
        for (_, names) in &st.draining {
            rds_names.extend(names.iter().cloned());
        }
        // Route tables nothing references any more go.
        let gone: Vec<String> = st
            .routes
            .keys()
            .filter(|n| !rds_names.contains(*n))
            .cloned()
            .collect();
        for n in gone {
            st.routes.remove(&n);
            st.vhosts.remove(&n);
            self.publish_route(&n, None);
        }
        follow(st, client, t::ROUTE, rds_via, Interest::names(rds_names));
        let interest = wildcard_if(srds_via.is_some());
        follow(st, client, t::SCOPED_ROUTE, srds_via, interest);
        // VHDS: every route table with `vhds` subscribes (Delta, wildcard).
        let vhds = st.routes.values().find_map(|(pb, _)| {
            pb.vhds
                .as_ref()
                .and_then(|v| v.config_source.as_ref())
                .and_then(|cs| XdsSource::from_proto(cs, "").ok())
                .and_then(|s| self.via(&s).ok())
        });
        let interest = wildcard_if(vhds.is_some());
        follow(st, client, t::VIRTUAL_HOST, vhds, interest);
        let mut ecds_names = BTreeSet::new();
        let mut ecds_via = None;
        for e in st.listeners.values() {
            for (n, src) in extension_deps(&e.config) {
                ecds_names.insert(n);
                ecds_via = ecds_via.or_else(|| self.via(&src).ok());
            }
        }
        st.extensions.retain(|n, _| ecds_names.contains(n));
        follow(
            st,
            client,
            t::EXTENSION_CONFIG,
            ecds_via,
            Interest::names(ecds_names),
        );
        self.follow_secrets(st, client);
        if st.lds_received
            && st.cds_received
            && warming_listeners == 0
            && warming_clusters == 0
            && static_eds_waiting == 0
        {
            self.initialized
                .send_if_modified(|v| !std::mem::replace(v, true));
        }
    }

    /// SDS: what listeners, clusters (static or dynamic) and route tables
    /// (their per-route filter configs) reference; secrets no longer
    /// referenced go.
    fn follow_secrets(&self, st: &mut State, client: &XdsClient) {
        let mut sds_names = BTreeSet::new();
        let mut sds_via = None;
        let routes: Vec<(String, XdsSource)> = self
            .route_sds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .flatten()
            .cloned()
            .collect();
        let refs = st
            .listeners
            .values()
            .flat_map(|e| e.config.sds_refs().cloned().collect::<Vec<_>>())
            .chain(st.clusters.values().flat_map(|e| e.config.sds_refs()))
            .chain(self.static_sds.iter().cloned())
            .chain(routes);
        for (n, src) in refs {
            sds_names.insert(n);
            sds_via = sds_via.or_else(|| self.via(&src).ok());
        }
        let unused: Vec<String> = st
            .secrets
            .keys()
            .filter(|n| !sds_names.contains(*n))
            .cloned()
            .collect();
        for n in unused {
            st.secrets.remove(&n);
            crate::tls::secrets::remove_dynamic(&n);
        }
        follow(st, client, t::SECRET, sds_via, Interest::names(sds_names));
    }

    /// Dynamic resources for `/config_dump`: (type URL, name, applied).
    pub fn dump(&self) -> Vec<(&'static str, String, Applied, bool)> {
        let st = self.state.lock().unwrap();
        let mut out = Vec::new();
        for (n, e) in &st.listeners {
            out.push((t::LISTENER, n.clone(), e.applied.clone(), e.active));
        }
        for (n, e) in &st.clusters {
            out.push((t::CLUSTER, n.clone(), e.applied.clone(), e.active));
        }
        for (n, (_, a)) in &st.routes {
            out.push((t::ROUTE, n.clone(), a.clone(), true));
        }
        for (n, (_, a)) in &st.scopes {
            out.push((t::SCOPED_ROUTE, n.clone(), a.clone(), true));
        }
        for (n, (_, a)) in &st.endpoints {
            out.push((t::ENDPOINT, n.clone(), a.clone(), true));
        }
        out
    }

    /// Rejections for `/config_dump` error_state: ((type, name), message).
    pub fn errors(&self) -> Vec<((String, String), String)> {
        let st = self.state.lock().unwrap();
        st.errors
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// Whether a warming resource may stop waiting for an SDS secret: it has
/// arrived, or its source's `initial_fetch_timeout` has passed (the
/// resource then activates and its handshakes fail until it comes).
fn secret_ready(
    secrets: &BTreeMap<String, Applied>,
    name: &str,
    src: &XdsSource,
    since: Instant,
) -> bool {
    secrets.contains_key(name)
        || src
            .initial_fetch_timeout
            .is_some_and(|t| since.elapsed() >= t)
}

/// Sets what a referenced type subscribes to, over the source the
/// references name (or, once nothing references it, the one used before,
/// so the now-smaller interest reaches the server).
fn follow(
    st: &mut State,
    client: &XdsClient,
    type_url: &'static str,
    via: Option<Via>,
    interest: Interest,
) {
    let Some(via) = via.or_else(|| st.via.get(type_url).cloned()) else {
        return;
    };
    st.via.insert(type_url, via.clone());
    if let Err(e) = client.watch(type_url, &via, interest) {
        tracing::warn!(%type_url, error = %e, "cannot subscribe");
    }
}

fn wildcard_if(on: bool) -> Interest {
    if on {
        Interest::wildcard()
    } else {
        Interest::default()
    }
}

/// Envoy's stat prefix of a subscription type.
fn stat_prefix(type_url: &str) -> Option<&'static str> {
    match type_url {
        t::LISTENER => Some("listener_manager.lds"),
        t::CLUSTER => Some("cluster_manager.cds"),
        _ => None,
    }
}

fn set_endpoints(c: &Cluster, cla: &ClusterLoadAssignment) {
    let (localities, opf) = crate::config::cluster::load_assignment(cla, "", Discovery::Eds)
        .unwrap_or_else(|_| (Vec::new(), 140));
    let opf = cla
        .policy
        .as_ref()
        .and_then(|p| p.overprovisioning_factor.val())
        .unwrap_or(opf);
    c.set_localities(&localities, opf);
}

impl Handler for Applier {
    fn apply(&self, update: Update) -> Vec<ResourceError> {
        let span = tracing::info_span!("xds_update", type_url = %update.type_url, version = %update.version_info, updated = update.updated.len(), removed = update.removed.len());
        let _g = span.enter();
        let mut errors = Vec::new();
        let mut st = self.state.lock().unwrap();
        match update.type_url.as_str() {
            t::LISTENER => self.apply_listeners(&mut st, &update, &mut errors),
            t::ROUTE => self.apply_routes(&mut st, &update, &mut errors),
            t::VIRTUAL_HOST => self.apply_vhosts(&mut st, &update, &mut errors),
            t::CLUSTER => self.apply_clusters(&mut st, &update, &mut errors),
            t::ENDPOINT => self.apply_endpoints(&mut st, &update, &mut errors),
            t::SCOPED_ROUTE => self.apply_scopes(&mut st, &update, &mut errors),
            t::RUNTIME => self.apply_runtime(&mut st, &update, &mut errors),
            t::EXTENSION_CONFIG => self.apply_extensions(&mut st, &update, &mut errors),
            t::SECRET => self.apply_secrets(&mut st, &update, &mut errors),
            other => errors.push(ResourceError {
                name: String::new(),
                message: format!("resource type {other} is not supported by Legate"),
            }),
        }
        self.reconcile(&mut st, &mut errors);
        if let Some(p) = stat_prefix(&update.type_url) {
            if errors.is_empty() {
                stats::counter(format!("{p}.update_success")).increment(1);
            } else {
                stats::counter(format!("{p}.update_rejected")).increment(1);
            }
        }
        for e in &errors {
            tracing::warn!(resource = %e.name, error = %e.message, "xDS resource rejected");
            st.errors
                .insert((update.type_url.clone(), e.name.clone()), e.message.clone());
        }
        for r in &update.updated {
            if !errors.iter().any(|e| e.name == r.name) {
                st.errors.remove(&(update.type_url.clone(), r.name.clone()));
            }
        }
        errors
    }

    fn rejected(&self, type_url: &str, error: &str) {
        tracing::warn!(%type_url, %error, "xDS response rejected whole");
        if let Some(p) = stat_prefix(type_url) {
            stats::counter(format!("{p}.update_rejected")).increment(1);
        }
    }

    fn connected(&self, up: bool) {
        stats::gauge("control_plane.connected_state".into()).set(if up { 1.0 } else { 0.0 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn google_grpc_target_uris() {
        assert_eq!(
            parse_target_uri("unix:///run/xds.sock").unwrap(),
            Target::Unix("/run/xds.sock".into())
        );
        assert_eq!(
            parse_target_uri("unix:rel.sock").unwrap(),
            Target::Unix("rel.sock".into())
        );
        assert_eq!(
            parse_target_uri("ipv4:127.0.0.1:18000").unwrap(),
            Target::Tcp("127.0.0.1:18000".parse().unwrap())
        );
        assert_eq!(
            parse_target_uri("dns:///localhost:18000").unwrap(),
            parse_target_uri("localhost:18000").unwrap()
        );
        assert!(parse_target_uri("no-port").is_err());
    }
}
