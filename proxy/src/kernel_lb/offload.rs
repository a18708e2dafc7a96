//! Which listeners the kernel can serve, and the table it serves them with:
//! pure functions over config and endpoint snapshots.
//!
//! Only a VIP Legate does not bind (`bind_to_port: false`, like Istio's
//! `<ClusterIP>_<port>` listeners) is the kernel's business. Such a listener
//! is `DIRECT` when Legate would add nothing but the choice of an endpoint:
//! its one filter chain is a plain `tcp_proxy` to one cluster. Any other
//! VIP listener is `REDIRECT`ed: connects to it go to Legate, which
//! serves them with that listener (the job iptables capture does for
//! Envoy). Everything else is `PASS`, with the reason on the admin API.
//!
//! What a DIRECT connection does not get, by construction: Envoy's
//! `tcp_proxy` idle timeout (the default hour; a non-default one keeps the
//! listener in userspace), the cluster's `connect_timeout` (the client's
//! own applies), and per-connection stats other than `upstream_cx_total`.

use crate::cluster_manager::HostSnapshot;
use crate::config::filter_chain::ChainMatch;
use crate::config::listener::{Listener, NetworkFilter};
use crate::lb::maglev::MaglevLb;
use crate::lb::LbHost;
use legate_bpf::{ServiceSpec, MAGLEV_SIZE};
use std::net::SocketAddr;
use std::time::Duration;

/// Envoy's default `tcp_proxy` idle timeout.
const DEFAULT_TCP_IDLE: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The kernel picks an endpoint of `cluster` at connect().
    Direct { cluster: String },
    /// Connects go to Legate's redirect listener; why not DIRECT.
    Redirect(&'static str),
    /// Left to userspace, for this reason.
    Pass(&'static str),
}

pub fn classify(l: &Listener) -> Decision {
    use Decision::Pass;
    if l.udp.is_some() {
        return Pass("UDP listeners are served by the UDP proxy");
    }
    if l.bind_to_port {
        return Pass("Legate accepts on this address itself; only bind_to_port: false listeners are VIPs the kernel serves");
    }
    if l.address.ip().is_unspecified() || l.address.port() == 0 {
        return Pass("a wildcard address or port is not a VIP");
    }
    match direct_blocker(l) {
        Ok(cluster) => Decision::Direct { cluster },
        Err(why) => Decision::Redirect(why),
    }
}

/// The cluster, if the kernel alone can serve the listener; else why not.
fn direct_blocker(l: &Listener) -> Result<String, &'static str> {
    if !l.listener_filters.is_empty() {
        return Err("listener filters need the proxy");
    }
    let chain = match (&l.chains[..], &l.default_chain) {
        ([(m, c)], None) if *m == ChainMatch::default() => c,
        ([], Some(c)) => c,
        _ => return Err("several filter chains (or a filter_chain_match) need the proxy to choose per connection"),
    };
    if chain.tls.is_some() {
        return Err("TLS termination needs the proxy");
    }
    if !chain.rbac.is_empty() || !chain.ratelimits.is_empty() {
        return Err("rbac and local_ratelimit need the proxy");
    }
    if !chain.limits.is_empty() {
        return Err("connection_limit needs the proxy");
    }
    let NetworkFilter::Tcp(tp) = &chain.filter else {
        return Err("L7 filters need the proxy");
    };
    if tp.clusters.len() != 1 {
        return Err("tcp_proxy weighted_clusters pick a cluster per connection in the proxy");
    }
    if tp.idle_timeout != Some(DEFAULT_TCP_IDLE) {
        return Err("a non-default tcp_proxy idle_timeout needs the proxy");
    }
    if tp.hash_source_ip {
        return Err("tcp_proxy hash_policy needs the proxy (the kernel picks a random slot)");
    }
    if tp.max_duration.is_some() {
        return Err("max_downstream_connection_duration needs the proxy");
    }
    if tp.max_connect_attempts > 1 {
        return Err("tcp_proxy max_connect_attempts > 1 needs the proxy to retry");
    }
    Ok(tp.clusters[0].0.clone())
}

/// Integer weights the Maglev builder takes, from shares of traffic.
const WEIGHT_SCALE: f64 = 1_000_000.0;

/// The kernel's view of a cluster for one VIP: endpoints of the VIP's
/// family with their effective weights, and the weighted Maglev table the
/// userspace Maglev balancer builds. `None` when no endpoint qualifies.
pub fn service_spec(vip: SocketAddr, snapshot: &HostSnapshot) -> Option<(ServiceSpec, Vec<u32>)> {
    let shares: Vec<(SocketAddr, f64)> = snapshot
        .effective_shares()
        .into_iter()
        .filter(|(a, s)| a.is_ipv4() == vip.is_ipv4() && *s > 0.0)
        .collect();
    if shares.is_empty() {
        return None;
    }
    let weights: Vec<u32> = shares
        .iter()
        .map(|(_, s)| ((s * WEIGHT_SCALE).round() as u32).max(1))
        .collect();
    let hosts: Vec<LbHost> = shares
        .iter()
        .zip(&weights)
        .map(|((a, _), w)| LbHost {
            hash_key: a.to_string(),
            weight: *w,
            active_requests: Default::default(),
        })
        .collect();
    let table = MaglevLb::new(&hosts, u64::from(MAGLEV_SIZE));
    Some((
        ServiceSpec {
            vip,
            backends: shares.iter().map(|(a, _)| *a).collect(),
            table: table.table().into(),
        },
        weights,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster_manager::UpstreamHost;
    use crate::lb::LbPolicy;
    use std::sync::Arc;

    fn snapshot(weights: &[u32]) -> HostSnapshot {
        let hosts = weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let addr = SocketAddr::from(([10, 0, 0, 1 + i as u8], 80));
                Arc::new(UpstreamHost {
                    addr,
                    hash_key: addr.to_string(),
                    hostname: String::new(),
                    weight: *w,
                    healthy: true,
                    degraded: false,
                    locality: 0,
                    locality_weight: 0,
                    active_requests: Default::default(),
                    tls: None,
                    istio_workload: None,
                })
            })
            .collect();
        HostSnapshot::build(&LbPolicy::RoundRobin, vec![hosts], 140)
    }

    fn slot_shares(spec: &ServiceSpec) -> Vec<f64> {
        let mut n = vec![0u32; spec.backends.len()];
        for &i in spec.table.iter() {
            n[i as usize] += 1;
        }
        n.iter()
            .map(|c| f64::from(*c) / f64::from(MAGLEV_SIZE))
            .collect()
    }

    #[test]
    fn maglev_slots_follow_the_weights_within_two_percent() {
        for weights in [
            vec![1, 3],
            vec![1, 2, 3, 4],
            vec![5; 7],
            vec![1, 1, 1, 10, 20],
        ] {
            let vip: SocketAddr = "127.100.0.1:80".parse().unwrap();
            let (spec, _) = service_spec(vip, &snapshot(&weights)).unwrap();
            let total: u32 = weights.iter().sum();
            for (got, w) in slot_shares(&spec).iter().zip(&weights) {
                let want = f64::from(*w) / f64::from(total);
                assert!(
                    (got - want).abs() / want <= 0.02,
                    "weights {weights:?}: share {got:.4}, want {want:.4}"
                );
            }
        }
    }

    #[test]
    fn removing_one_of_n_moves_about_one_nth_of_the_slots() {
        let vip: SocketAddr = "127.100.0.1:80".parse().unwrap();
        for n in [5usize, 10, 20] {
            let (before, _) = service_spec(vip, &snapshot(&vec![1; n])).unwrap();
            // Drop the last backend.
            let (after, _) = service_spec(vip, &snapshot(&vec![1; n - 1])).unwrap();
            let moved = before
                .table
                .iter()
                .zip(after.table.iter())
                .filter(|(b, a)| before.backends[**b as usize] != after.backends[**a as usize])
                .count() as f64
                / f64::from(MAGLEV_SIZE);
            let ideal = 1.0 / n as f64;
            assert!(
                moved >= ideal - 0.01 && moved <= ideal * 1.5,
                "n={n}: {moved:.4} of slots moved, ideal {ideal:.4}"
            );
        }
    }

    #[test]
    fn backends_of_the_other_family_are_left_out() {
        let v6 = Arc::new(UpstreamHost::direct("[::1]:80".parse().unwrap(), None));
        let snap = HostSnapshot::build(&LbPolicy::RoundRobin, vec![vec![v6]], 140);
        assert!(service_spec("127.100.0.1:80".parse().unwrap(), &snap).is_none());
        assert!(service_spec("[fd00::1]:80".parse().unwrap(), &snap).is_some());
    }

    fn listener(yaml: &str) -> Listener {
        let v: serde_json::Value = serde_yaml::from_str(yaml).unwrap();
        let pb =
            legate_proto::json::to_message(v, "envoy.config.listener.v3.Listener", true).unwrap();
        Listener::from_proto(&pb, "l").unwrap()
    }

    const TCP: &str = r#"{"name": "envoy.filters.network.tcp_proxy", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "stat_prefix": "t", "cluster": "svc"}}"#;

    /// Golden: a listener and a cluster as a control plane sends them, all
    /// the way to the map operations the loader applies.
    #[test]
    fn xds_resources_become_these_map_operations() {
        use crate::cluster_manager::Cluster;
        use crate::config::cluster::ClusterConfig;
        use legate_bpf::{MapOp, State};
        let l = listener(&format!(
            "{{name: vip, bind_to_port: false, address: {{socket_address: {{address: 10.96.0.10, port_value: 80}}}}, filter_chains: [{{filters: [{TCP}]}}]}}"
        ));
        let Decision::Direct { cluster } = classify(&l) else {
            panic!("not DIRECT")
        };
        let c: serde_json::Value = serde_yaml::from_str(&format!(
            "{{name: {cluster}, type: STATIC, load_assignment: {{cluster_name: {cluster}, endpoints: [{{lb_endpoints: [
                {{endpoint: {{address: {{socket_address: {{address: 10.0.0.1, port_value: 8080}}}}}}, load_balancing_weight: 1}},
                {{endpoint: {{address: {{socket_address: {{address: 10.0.0.2, port_value: 8080}}}}}}, load_balancing_weight: 3}}]}}]}}}}"
        ))
        .unwrap();
        let pb =
            legate_proto::json::to_message(c, "envoy.config.cluster.v3.Cluster", true).unwrap();
        let cluster = Cluster::new(Arc::new(ClusterConfig::from_proto(&pb, "c").unwrap()));
        let (spec, weights) = service_spec(l.address, &cluster.snapshot()).unwrap();
        assert_eq!(weights, vec![250_000, 750_000]);
        let ops = State::default().plan(&[spec], &[]).unwrap();
        let render: Vec<String> = ops
            .iter()
            .map(|op| match op {
                MapOp::UpsertBackend { id, addr } => {
                    format!("backend {id} = {}", legate_bpf::addr::from_kernel(addr))
                }
                MapOp::SetTable { service, slots } => format!(
                    "table {service}: {} slots to backend 0, {} to backend 1",
                    slots.iter().filter(|s| **s == 0).count(),
                    slots.iter().filter(|s| **s == 1).count()
                ),
                MapOp::UpsertService { key, value } => format!(
                    "service {} = id {} count {} mode {}",
                    legate_bpf::addr::from_kernel(&key.addr),
                    value.id,
                    value.count,
                    value.mode
                ),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            render,
            [
                "backend 0 = 10.0.0.1:8080",
                "backend 1 = 10.0.0.2:8080",
                "table 0: 4096 slots to backend 0, 12285 to backend 1",
                "service 10.96.0.10:80 = id 0 count 2 mode 1",
            ]
        );
    }

    #[test]
    fn only_unbound_plain_tcp_proxy_listeners_are_direct() {
        let direct = listener(&format!(
            "{{name: vip, bind_to_port: false, address: {{socket_address: {{address: 10.96.0.10, port_value: 80}}}}, filter_chains: [{{filters: [{TCP}]}}]}}"
        ));
        assert_eq!(
            classify(&direct),
            Decision::Direct {
                cluster: "svc".into()
            }
        );
        let bound = listener(&format!(
            "{{name: l, address: {{socket_address: {{address: 10.96.0.10, port_value: 80}}}}, filter_chains: [{{filters: [{TCP}]}}]}}"
        ));
        assert!(matches!(classify(&bound), Decision::Pass(_)));
        let wildcard = listener(&format!(
            "{{name: l, bind_to_port: false, address: {{socket_address: {{address: 0.0.0.0, port_value: 80}}}}, filter_chains: [{{filters: [{TCP}]}}]}}"
        ));
        assert!(matches!(classify(&wildcard), Decision::Pass(_)));
        let idle = TCP.replace(
            r#""cluster": "svc""#,
            r#""cluster": "svc", "idle_timeout": "5s""#,
        );
        let custom_idle = listener(&format!(
            "{{name: l, bind_to_port: false, address: {{socket_address: {{address: 10.96.0.10, port_value: 80}}}}, filter_chains: [{{filters: [{idle}]}}]}}"
        ));
        assert_eq!(
            classify(&custom_idle),
            Decision::Redirect("a non-default tcp_proxy idle_timeout needs the proxy")
        );
        let http = listener(
            r#"{name: l, bind_to_port: false, address: {socket_address: {address: 10.96.0.10, port_value: 80}}, filter_chains: [{filters: [{name: envoy.filters.network.http_connection_manager, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: h, route_config: {}, http_filters: [{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]}}]}]}"#,
        );
        assert_eq!(
            classify(&http),
            Decision::Redirect("L7 filters need the proxy")
        );
    }
}
