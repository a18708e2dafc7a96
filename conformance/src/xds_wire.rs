//! The xds wire tier: our scripted ADS server (`legate_tests::xds_server`)
//! drives Envoy 1.40, then Legate, through the same steps, and the requests
//! each sent are compared type by type: versions, resource names, whether a
//! nonce, an error_detail and the node were present. Envoy's trace is the
//! reference; across types only the order within a type is compared (ADS
//! lets types interleave freely).

use crate::proxies::{self, Binaries, Kind};
use crate::report::{Outcome, Report};
use anyhow::{bail, Result};
use legate_tests::legate::free_port;
use legate_tests::xds_server::{any, ScriptedAds, CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

/// step → type → normalized requests.
type Trace = BTreeMap<&'static str, BTreeMap<String, Vec<String>>>;

const WAIT: Duration = Duration::from_secs(30);

fn addr(ip: &str, port: u16) -> Value {
    json!({"socket_address": {"address": ip, "port_value": port}})
}

fn bootstrap(xds: SocketAddr, admin: u16, delta: bool) -> String {
    let api = if delta { "DELTA_GRPC" } else { "GRPC" };
    json!({
        "node": {"id": "wire", "cluster": "wire"},
        "admin": {"address": addr("127.0.0.1", admin)},
        "dynamic_resources": {
            "ads_config": {"api_type": api, "transport_api_version": "V3", "set_node_on_first_message_only": true,
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [{
            "name": "xds", "type": "STATIC", "connect_timeout": "1s", "http2_protocol_options": {},
            "load_assignment": {"cluster_name": "xds", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": addr("127.0.0.1", xds.port())}}]}]},
        }]},
    })
    .to_string()
}

fn listener(port: u16) -> Value {
    json!({
        "name": "l1",
        "address": addr("127.0.0.1", port),
        "filter_chains": [{"filters": [{"name": "hcm", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "wire",
            "rds": {"route_config_name": "r1", "config_source": {"ads": {}, "resource_api_version": "V3"}},
            "http_filters": [{"name": "router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        }}]}],
    })
}

fn normalize(
    r: &legate_proto::envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest,
) -> String {
    let mut names = r.resource_names.clone();
    names.sort();
    format!(
        "version={:?} names={names:?} nonce={} error={} node={}",
        r.version_info,
        if r.response_nonce.is_empty() {
            "none"
        } else {
            "set"
        },
        r.error_detail.is_some(),
        r.node.is_some(),
    )
}

fn normalize_delta(
    r: &legate_proto::envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest,
) -> String {
    let sorted = |v: &[String]| {
        let mut v = v.to_vec();
        v.sort();
        v
    };
    let mut initial: Vec<String> = r
        .initial_resource_versions
        .iter()
        .map(|(k, v)| format!("{k}@{v}"))
        .collect();
    initial.sort();
    format!(
        "subscribe={:?} unsubscribe={:?} initial={initial:?} nonce={} error={} node={}",
        sorted(&r.resource_names_subscribe),
        sorted(&r.resource_names_unsubscribe),
        if r.response_nonce.is_empty() {
            "none"
        } else {
            "set"
        },
        r.error_detail.is_some(),
        r.node.is_some(),
    )
}

/// Every request so far, normalized: (stream, type, text).
fn requests(ads: &ScriptedAds, delta: bool) -> Vec<(u64, String, String)> {
    if delta {
        ads.delta_requests()
            .iter()
            .map(|(s, r)| (*s, r.type_url.clone(), normalize_delta(r)))
            .collect()
    } else {
        ads.requests()
            .iter()
            .map(|(s, r)| (*s, r.type_url.clone(), normalize(r)))
            .collect()
    }
}

/// Waits for a request matching `pred` (over normalized text for Delta,
/// the raw SotW request otherwise).
async fn wait_any(
    ads: &ScriptedAds,
    delta: bool,
    timeout: Duration,
    sotw: impl Fn(
        u64,
        &legate_proto::envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest,
    ) -> bool,
    dlt: impl Fn(
        u64,
        &legate_proto::envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest,
    ) -> bool,
) -> bool {
    if delta {
        ads.wait_for_delta(timeout, dlt).await.is_some()
    } else {
        ads.wait_for(timeout, sotw).await.is_some()
    }
}

/// Waits until every type has an ACK on `stream` (SotW: of `version`).
async fn settle(
    ads: &ScriptedAds,
    stream: u64,
    types: &[&str],
    version: &str,
    delta: bool,
) -> Result<()> {
    for t in types {
        let ok = wait_any(
            ads,
            delta,
            WAIT,
            |s, r| {
                s == stream
                    && r.type_url == *t
                    && r.version_info == version
                    && r.error_detail.is_none()
            },
            |s, r| {
                s == stream
                    && r.type_url == *t
                    && !r.response_nonce.is_empty()
                    && r.error_detail.is_none()
            },
        )
        .await;
        if !ok {
            bail!("no ACK of {t} version {version} on stream {stream}");
        }
    }
    // Let stragglers arrive before the step is cut.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

async fn scenario(
    bins: &Binaries,
    kind: Kind,
    work: &std::path::Path,
    delta: bool,
) -> Result<Trace> {
    let up = legate_tests::echo::start("up", "127.0.0.1:0".parse()?).await?;
    let mut ads = ScriptedAds::start("127.0.0.1:0".parse()?).await;
    let (port, admin) = (free_port(), free_port());
    let eds = json!({"name": "c1", "type": "EDS", "connect_timeout": "1s",
                     "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}}});
    let cla = json!({"cluster_name": "c1", "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": addr(&up.addr.ip().to_string(), up.addr.port())}}]}]});
    let route = json!({"name": "r1", "virtual_hosts": [{"name": "all", "domains": ["*"],
        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c1"}}]}]});
    ads.set(CLUSTER, "1", vec![any(CLUSTER, eds)]);
    ads.set(ENDPOINT, "1", vec![any(ENDPOINT, cla)]);
    ads.set(ROUTE, "1", vec![any(ROUTE, route)]);
    ads.set(LISTENER, "1", vec![any(LISTENER, listener(port))]);
    let cfg = work.join(format!("xds-wire-{}-{delta}.yaml", kind.name()));
    std::fs::write(&cfg, bootstrap(ads.addr, admin, delta))?;
    let proxy = tokio::task::block_in_place(|| proxies::start(bins, kind, &cfg, admin, work))?;
    let all = [CLUSTER, ENDPOINT, LISTENER, ROUTE];
    settle(&ads, 1, &all, "1", delta).await?;
    let mut trace = Trace::new();
    let mut cut = 0;
    let mut record = |step: &'static str, ads: &ScriptedAds, cut: &mut usize| {
        let reqs = requests(ads, delta);
        let entry = trace.entry(step).or_default();
        for (_, t, r) in &reqs[*cut..] {
            entry.entry(t.clone()).or_default().push(r.clone());
        }
        *cut = reqs.len();
    };
    record("initial", &ads, &mut cut);

    // A listener both reject (its port is out of range): NACKed with the
    // last accepted version, and the rest keeps serving.
    let mut bad = listener(port);
    bad["address"]["socket_address"]["port_value"] = json!(70000);
    ads.set(LISTENER, "2", vec![any(LISTENER, bad)]);
    let nonce = ads.last_nonce();
    let nacked = wait_any(
        &ads,
        delta,
        WAIT,
        |_, r| r.response_nonce == nonce && r.error_detail.is_some(),
        |_, r| r.response_nonce == nonce && r.error_detail.is_some(),
    )
    .await;
    if !nacked {
        bail!("no NACK of the bad listener");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    record("nack", &ads, &mut cut);

    // Envoy Gateway's OIDC shape: the route's OAuth2PerRoute reads its
    // secrets over SDS. Both subscribe to them, and once they arrive the
    // route sends users to sign in.
    oauth2_route_secrets(&ads, &up, port, delta).await?;
    record("route-secrets", &ads, &mut cut);
    let sign_in = signs_in(port).await;

    // The control plane goes away and comes back: a new stream re-requests
    // every type with the last accepted versions.
    ads.shutdown().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    ads.restart().await;
    for t in all {
        let again = wait_any(
            &ads,
            delta,
            Duration::from_secs(40),
            |s, r| s == 2 && r.type_url == t,
            |s, r| s == 2 && r.type_url == t,
        )
        .await;
        if !again {
            bail!("{t} was not re-requested after the reconnect");
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    record("reconnect", &ads, &mut cut);
    trace
        .entry("route-secrets")
        .or_default()
        .insert("http".into(), vec![sign_in]);
    drop(proxy);
    // Kept for reading: what each proxy sent, step by step.
    std::fs::write(
        work.join(format!(
            "xds-wire-{}-{}.json",
            kind.name(),
            if delta { "delta" } else { "sotw" }
        )),
        serde_json::to_string_pretty(&trace)?,
    )?;
    Ok(trace)
}

/// Pushes a route whose `OAuth2PerRoute` names SDS secrets, the secrets,
/// and a listener with the OAuth2 filter, and waits for their ACKs.
async fn oauth2_route_secrets(
    ads: &ScriptedAds,
    up: &legate_tests::echo::Echo,
    port: u16,
    delta: bool,
) -> Result<()> {
    let sds = |n: &str| json!({"name": n, "sds_config": {"ads": {}, "resource_api_version": "V3"}});
    let config = json!({
        "token_endpoint": {"cluster": "c1", "uri": format!("http://{}/token", up.addr), "timeout": "3s"},
        "authorization_endpoint": "https://idp.test/authorize",
        "redirect_uri": "https://app.test/callback",
        "redirect_path_matcher": {"path": {"exact": "/callback"}},
        "signout_path": {"path": {"exact": "/signout"}},
        "credentials": {"client_id": "app", "token_secret": sds("oauth2/tok"), "hmac_secret": sds("oauth2/hmac")},
    });
    let route = json!({"name": "r1", "virtual_hosts": [{"name": "all", "domains": ["*"],
        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c1"},
            "typed_per_filter_config": {"envoy.filters.http.oauth2": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.oauth2.v3.OAuth2PerRoute",
                "config": config}}}]}]});
    let secret = |n: &str, v: &str| {
        any(
            SECRET,
            json!({"name": n, "generic_secret": {"secret": {"inline_string": v}}}),
        )
    };
    let mut l = listener(port);
    l["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
        .as_array_mut()
        .expect("the listener has http_filters")
        .insert(
            0,
            json!({"name": "envoy.filters.http.oauth2", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.oauth2.v3.OAuth2"}}),
        );
    ads.set(
        SECRET,
        "1",
        vec![secret("oauth2/hmac", "h"), secret("oauth2/tok", "t")],
    );
    ads.set(ROUTE, "2", vec![any(ROUTE, route)]);
    ads.set(LISTENER, "3", vec![any(LISTENER, l)]);
    settle(ads, 1, &[ROUTE], "2", delta).await?;
    settle(ads, 1, &[LISTENER], "3", delta).await?;
    settle(ads, 1, &[SECRET], "1", delta).await
}

/// What a request to the OAuth2 route gets (within 10 s of the secrets):
/// its status and where it is sent.
async fn signs_in(port: u16) -> String {
    let mut last = String::from("no answer");
    for _ in 0..50 {
        let url = format!("http://127.0.0.1:{port}/page");
        if let Ok(r) = tokio::task::block_in_place(|| legate_tests::legate::try_curl(&url, &[])) {
            let location = r
                .header("location")
                .map_or("", |v| v.split('?').next().unwrap_or(""));
            last = format!("{} {location}", r.status);
            if r.status == 302 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    last
}

pub async fn run(bins: &Binaries, work: &std::path::Path, report: &mut Report) -> Result<()> {
    for delta in [false, true] {
        let name = if delta { "wire-delta" } else { "wire-sotw" };
        let envoy = match scenario(bins, Kind::Envoy, work, delta).await {
            Ok(t) => t,
            Err(e) => {
                report.add(
                    "xds",
                    name,
                    "*",
                    Outcome::HarnessError(vec![format!("envoy: {e:#}")]),
                );
                continue;
            }
        };
        let legate = scenario(bins, Kind::Legate, work, delta).await;
        for step in ["initial", "nack", "route-secrets", "reconnect"] {
            let outcome = match &legate {
                Err(e) => Outcome::Mismatch(vec![format!("legate: {e:#}")]),
                Ok(l) => {
                    let (e, l) = (
                        envoy.get(step).cloned().unwrap_or_default(),
                        l.get(step).cloned().unwrap_or_default(),
                    );
                    if step == "route-secrets" {
                        compare(&secrets_settled(e), &secrets_settled(l))
                    } else {
                        compare(&e, &l)
                    }
                }
            };
            report.add("xds", name, step, outcome);
        }
    }
    Ok(())
}

/// Envoy's secret providers subscribe one secret per request where Legate
/// asks for all at once: for secrets, the names subscribed in all and the
/// last request (the ACK) are compared, not how the asking was split.
fn secrets_settled(mut step: BTreeMap<String, Vec<String>>) -> BTreeMap<String, Vec<String>> {
    let re = regex::Regex::new(r"(?:names|subscribe)=\[([^\]]*)\]").unwrap();
    if let Some(reqs) = step.get_mut(legate_tests::xds_server::SECRET) {
        let mut names = std::collections::BTreeSet::new();
        for r in reqs.iter() {
            if let Some(c) = re.captures(r) {
                names.extend(
                    c[1].split(", ")
                        .filter(|n| !n.is_empty())
                        .map(str::to_string),
                );
            }
        }
        let last = reqs.last().cloned().unwrap_or_default();
        *reqs = vec![format!("subscribed {names:?}"), last];
    }
    step
}

/// Per type, Envoy's requests against Legate's.
fn compare(e: &BTreeMap<String, Vec<String>>, l: &BTreeMap<String, Vec<String>>) -> Outcome {
    let mut diffs = Vec::new();
    for t in e
        .keys()
        .chain(l.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let ev = e.get(t).cloned().unwrap_or_default();
        let lv = l.get(t).cloned().unwrap_or_default();
        if ev != lv {
            let short = t.rsplit('.').next().unwrap_or(t);
            diffs.push(format!("{short}: envoy {ev:?} legate {lv:?}"));
        }
    }
    if diffs.is_empty() {
        Outcome::Match
    } else {
        Outcome::Mismatch(diffs)
    }
}
