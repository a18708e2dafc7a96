//! The corpus tier: what a real control plane sends. Each case of Envoy
//! Gateway's translator output (`../shared/corpus/envoy-gateway/`, read its
//! README) is folded into one bootstrap, as the README describes, and
//! validated by Envoy 1.40 and by Legate (`--mode validate`). A case Envoy
//! rejects leaves the count with Envoy's reason (unless Legate accepts it:
//! a failure); a case Envoy accepts and Legate rejects is a known gap, listed
//! with Legate's reason in `conformance/corpus-gaps.tsv`, so the list can
//! only shrink (`CORPUS_WRITE_GAPS=1` rewrites it from a run).
//!
//! Folding: routes inlined where listeners name them over RDS (with
//! `validate_clusters: false`, as RDS has), EDS clusters given their
//! ClusterLoadAssignment (STATIC, or STRICT_DNS when an address is a name),
//! SDS secrets moved to static secrets, a node id for SDS. Repairs of test
//! data, each recorded: placeholder certificates and keys and paths that
//! exist only in Envoy Gateway's pods (`/certs/...`) become the run's PKI;
//! a secret name given twice keeps its first.

use crate::proxies::{self, Binaries, Kind};
use crate::report::{Outcome, Report};
use anyhow::{Context, Result};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const TIER: &str = "corpus";
const SOURCE: &str = "envoy-gateway";
const GAPS_FILE: &str = "corpus-gaps.tsv";

/// What the run found, for the compatibility doc.
#[derive(Default)]
pub struct Tally {
    pub cases: usize,
    pub envoy_accepts: usize,
    pub both_accept: usize,
    /// Legate's first error per rejected case, by the field it names.
    pub reasons: BTreeMap<String, usize>,
    /// Accepted cases with traffic (routes or UDP listeners) compared.
    pub with_traffic: usize,
    /// Of those, cases where every exchange matched Envoy.
    pub traffic_matched: usize,
    /// Requests and datagrams compared, and routes whose match no
    /// made-up request can satisfy.
    pub exchanges: usize,
    pub routes_skipped: usize,
}

/// One case's files, by kind.
fn load(dir: &Path, case: &str, kind: &str) -> Result<Vec<Value>> {
    let p = dir.join(format!("{case}.{kind}.yaml"));
    if !p.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&p)?;
    let v: Option<Vec<Value>> =
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
    Ok(v.unwrap_or_default())
}

fn cases(dir: &Path) -> Result<Vec<String>> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        for kind in ["listeners", "routes", "clusters", "endpoints", "secrets"] {
            if let Some(stem) = name.strip_suffix(&format!(".{kind}.yaml")) {
                out.insert(stem.to_string());
            }
        }
    }
    Ok(out.into_iter().collect())
}

/// Replaces every `rds` with the RouteConfiguration it names.
fn inline_routes(v: &mut Value, routes: &Map<String, Value>) {
    match v {
        Value::Object(o) => {
            if let Some(rds) = o.remove("rds") {
                let name = rds["routeConfigName"].as_str().unwrap_or_default();
                let mut rc = routes
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| json!({ "name": name }));
                rc["validateClusters"] = json!(false);
                o.insert("routeConfig".into(), rc);
            }
            o.values_mut().for_each(|x| inline_routes(x, routes));
        }
        Value::Array(a) => a.iter_mut().for_each(|x| inline_routes(x, routes)),
        _ => {}
    }
}

/// Drops every `sdsConfig`: secrets are then found by name among the
/// static secrets.
fn drop_sds_sources(v: &mut Value) {
    match v {
        Value::Object(o) => {
            o.remove("sdsConfig");
            o.values_mut().for_each(drop_sds_sources);
        }
        Value::Array(a) => a.iter_mut().for_each(drop_sds_sources),
        _ => {}
    }
}

/// Gives EDS clusters their endpoints.
fn static_endpoints(clusters: &mut [Value], endpoints: &[Value]) {
    for c in clusters.iter_mut() {
        if c["type"] != "EDS" {
            continue;
        }
        let name = c["edsClusterConfig"]["serviceName"]
            .as_str()
            .or_else(|| c["name"].as_str())
            .unwrap_or_default()
            .to_string();
        let la = endpoints
            .iter()
            .find(|e| e["clusterName"] == name.as_str())
            .cloned()
            .unwrap_or_else(|| json!({ "clusterName": name }));
        let all_ips = la["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|l| l["lbEndpoints"].as_array().into_iter().flatten())
            .all(|e| {
                e["endpoint"]["address"]["socketAddress"]["address"]
                    .as_str()
                    .is_some_and(|a| a.parse::<std::net::IpAddr>().is_ok())
            });
        let o = c.as_object_mut().expect("a cluster is an object");
        o.remove("edsClusterConfig");
        o.insert(
            "type".into(),
            json!(if all_ips { "STATIC" } else { "STRICT_DNS" }),
        );
        o.insert("loadAssignment".into(), la);
    }
}

/// Which PKI file stands in for a placeholder, by the field it fills.
fn pki_file(field: &str, pki: &Path) -> Option<PathBuf> {
    let f = match field {
        "certificateChain" => "server.pem",
        "privateKey" => "server.key",
        "trustedCa" | "ca" => "ca.pem",
        _ => return None,
    };
    Some(pki.join(f))
}

/// A data source that is not real PEM, or a path only Envoy Gateway's pods
/// have. (PEM starts "-----BEGIN": base64 "LS0tLS1CRUdJTi".)
fn placeholder(x: &Value) -> bool {
    match (
        x["inlineString"].as_str(),
        x["inlineBytes"].as_str(),
        x["filename"].as_str(),
    ) {
        (Some(s), _, _) => !s.contains("-----BEGIN"),
        (_, Some(b), _) => !b.starts_with("LS0tLS1CRUdJTi"),
        (_, _, Some(f)) => f.starts_with("/certs/") || f.starts_with("/etc/"),
        _ => false,
    }
}

/// Replaces placeholder PEM data and pod-only paths with the PKI's files.
/// A certificate and its key are replaced together, so they still match;
/// a placeholder OCSP staple is dropped.
fn repair_pki(v: &mut Value, pki: &Path, repairs: &mut BTreeSet<String>) {
    match v {
        Value::Object(o) => {
            let pair = ["certificateChain", "privateKey"];
            if pair.iter().any(|k| o.get(*k).is_some_and(placeholder)) {
                for k in pair {
                    if let (Some(x), Some(file)) = (o.get_mut(k), pki_file(k, pki)) {
                        *x = json!({ "filename": file.display().to_string() });
                    }
                }
                repairs
                    .insert("certificate and key: placeholders replaced by the run's PKI".into());
            }
            if o.get("ocspStaple").is_some_and(placeholder) {
                o.remove("ocspStaple");
                repairs.insert("ocspStaple: placeholder dropped".into());
            }
            for (k, x) in o.iter_mut() {
                match pki_file(k, pki) {
                    Some(file) if !pair.contains(&k.as_str()) && placeholder(x) => {
                        repairs.insert(format!("{k}: placeholder replaced by the run's PKI"));
                        *x = json!({ "filename": file.display().to_string() });
                    }
                    Some(_) => {}
                    None => repair_pki(x, pki, repairs),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| repair_pki(x, pki, repairs)),
        _ => {}
    }
}

/// The case as one bootstrap, and the repairs made to its test data.
fn fold(dir: &Path, case: &str, pki: &Path) -> Result<(Value, BTreeSet<String>)> {
    let mut repairs = BTreeSet::new();
    let routes: Map<String, Value> = load(dir, case, "routes")?
        .into_iter()
        .filter_map(|r| Some((r["name"].as_str()?.to_string(), r)))
        .collect();
    let mut listeners = Value::Array(load(dir, case, "listeners")?);
    inline_routes(&mut listeners, &routes);
    let mut clusters = load(dir, case, "clusters")?;
    static_endpoints(&mut clusters, &load(dir, case, "endpoints")?);
    let mut clusters = Value::Array(clusters);
    let mut seen = BTreeSet::new();
    let mut secrets = Vec::new();
    for s in load(dir, case, "secrets")? {
        let name = s["name"].as_str().unwrap_or_default().to_string();
        if seen.insert(name.clone()) {
            secrets.push(s);
        } else {
            repairs.insert(format!("secret {name} given twice: the first kept"));
        }
    }
    let mut secrets = Value::Array(secrets);
    for v in [&mut listeners, &mut clusters, &mut secrets] {
        drop_sds_sources(v);
        repair_pki(v, pki, &mut repairs);
    }
    let bootstrap = json!({
        "node": {"id": "corpus", "cluster": "corpus"},
        "admin": {"address": {"socketAddress": {"address": "127.0.0.1", "portValue": 0}}},
        "staticResources": {"listeners": listeners, "clusters": clusters, "secrets": secrets},
    });
    Ok((bootstrap, repairs))
}

/// The known gaps, from `corpus-gaps.tsv` (case, tab, Legate's reason).
pub fn gaps() -> &'static [crate::gaps::Gap] {
    static GAPS: std::sync::OnceLock<Vec<crate::gaps::Gap>> = std::sync::OnceLock::new();
    GAPS.get_or_init(|| {
        include_str!("../corpus-gaps.tsv")
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .filter_map(|l| l.split_once('\t'))
            .map(|(c, r)| crate::gaps::Gap {
                tier: TIER,
                scenario: SOURCE,
                request: Box::leak(c.to_string().into_boxed_str()),
                reason: Box::leak(format!("Legate rejects it: {r}").into_boxed_str()),
            })
            .collect()
    })
}

/// Legate's error without the config file's path: the field and why.
fn reason(out: &str) -> String {
    let last = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let r = match last.find("': ") {
        Some(i) => &last[i + 3..],
        None => last,
    };
    r.chars().take(400).collect()
}

/// The field an error names, with list indices dropped (to group reasons).
fn reason_key(reason: &str) -> String {
    let field = reason.split(": ").next().unwrap_or(reason);
    let re = regex::Regex::new(r"\[\d+\]").expect("a valid regex");
    re.replace_all(field, "[]").into_owned()
}

pub fn run(bins: &Binaries, root: &Path, work: &Path, report: &mut Report) -> Result<Tally> {
    let dir = root.join("../../shared/corpus").join(SOURCE);
    let mut tally = Tally::default();
    if !dir.is_dir() {
        println!("corpus: skipped: {} not found", dir.display());
        return Ok(tally);
    }
    let pki = crate::pki::ensure(work)?;
    let out_dir = work.join("corpus");
    std::fs::create_dir_all(&out_dir)?;
    let mut gaps_now = Vec::new();
    for case in cases(&dir)? {
        tally.cases += 1;
        let (bootstrap, repairs) = fold(&dir, &case, &pki)?;
        let file = out_dir.join(format!("{case}.json"));
        std::fs::write(&file, serde_json::to_vec_pretty(&bootstrap)?)?;
        let (e_ok, e_out) = proxies::validate(bins, Kind::Envoy, &file)?;
        let (l_ok, l_out) = proxies::validate(bins, Kind::Legate, &file)?;
        for r in &repairs {
            println!("corpus: {case}: repaired: {r}");
        }
        let outcome = match (e_ok, l_ok) {
            (false, false) => {
                println!(
                    "corpus: {case}: excluded: Envoy rejects it: {}",
                    reason(&e_out)
                );
                continue;
            }
            (false, true) => Outcome::Mismatch(vec![format!(
                "Legate accepts what Envoy rejects: {}",
                reason(&e_out)
            )]),
            (true, true) => {
                let t = crate::corpus_traffic::run_case(bins, &case, &bootstrap, work, report)?;
                tally.exchanges += t.compared;
                tally.routes_skipped += t.skipped;
                if t.compared > 0 {
                    tally.with_traffic += 1;
                    tally.traffic_matched += usize::from(t.matched);
                }
                Outcome::Match
            }
            (true, false) => {
                let why = reason(&l_out);
                *tally.reasons.entry(reason_key(&why)).or_default() += 1;
                gaps_now.push((case.clone(), why.clone()));
                Outcome::Mismatch(vec![format!("Legate rejects it: {why}")])
            }
        };
        tally.envoy_accepts += usize::from(e_ok);
        tally.both_accept += usize::from(e_ok && l_ok);
        report.add(TIER, SOURCE, &case, outcome);
    }
    if std::env::var_os("CORPUS_WRITE_GAPS").is_some() {
        let mut text = String::from("# Envoy Gateway corpus cases Envoy 1.40 accepts and Legate rejects, with Legate's reason.\n# Written by CORPUS_WRITE_GAPS=1 conformance/run corpus; the list may only shrink.\n");
        for (c, r) in &gaps_now {
            text.push_str(&format!("{c}\t{r}\n"));
        }
        std::fs::write(root.join(GAPS_FILE), text)?;
    }
    println!(
        "corpus: {} cases; Envoy 1.40 accepts {}; Legate accepts {} of those; traffic compared on {} ({} exchanges, {} routes left out), matching Envoy on {}",
        tally.cases, tally.envoy_accepts, tally.both_accept, tally.with_traffic, tally.exchanges, tally.routes_skipped, tally.traffic_matched
    );
    Ok(tally)
}

impl Tally {
    /// The compatibility doc's corpus section.
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "\n## Real control-plane output: Envoy Gateway's translator\n\n\
             `conformance/run corpus` over `shared/corpus/envoy-gateway/` ({} cases, each folded into one bootstrap):\n\
             Envoy 1.40 accepts {}, Legate accepts **{}** of those.\n\n\
             Traffic (one request per route, one datagram per UDP listener, each cluster an echo server of its own) \
             was compared on the {} accepted cases that route anything: **{}** match Envoy in every exchange \
             ({} exchanges; {} routes left out because no made-up request satisfies their match).\n\n\
             | most frequent first rejection (field) | cases |\n|---|---|\n",
            self.cases, self.envoy_accepts, self.both_accept, self.with_traffic, self.traffic_matched,
            self.exchanges, self.routes_skipped
        );
        let mut reasons: Vec<_> = self.reasons.iter().collect();
        reasons.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (r, n) in reasons.into_iter().take(15) {
            out.push_str(&format!("| `{r}` | {n} |\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rds_is_inlined_and_eds_gets_its_endpoints() {
        let routes: Map<String, Value> =
            [("r".to_string(), json!({"name": "r", "virtualHosts": []}))]
                .into_iter()
                .collect();
        let mut l = json!([{"filters": [{"typedConfig": {"rds": {"routeConfigName": "r"}}}]}]);
        inline_routes(&mut l, &routes);
        assert_eq!(
            l[0]["filters"][0]["typedConfig"]["routeConfig"],
            json!({"name": "r", "virtualHosts": [], "validateClusters": false})
        );
        let mut c =
            vec![json!({"name": "c", "type": "EDS", "edsClusterConfig": {"serviceName": "s"}})];
        let eps = [
            json!({"clusterName": "s", "endpoints": [{"lbEndpoints": [{"endpoint": {"address": {"socketAddress": {"address": "a.example", "portValue": 1}}}}]}]}),
        ];
        static_endpoints(&mut c, &eps);
        assert_eq!(c[0]["type"], "STRICT_DNS");
        assert_eq!(c[0]["loadAssignment"]["clusterName"], "s");
        assert!(c[0].get("edsClusterConfig").is_none());
    }

    #[test]
    fn placeholders_become_the_pki_and_real_pem_stays() {
        let pki = Path::new("/pki");
        let mut v = json!({"tlsCertificates": [{
            "certificateChain": {"inlineBytes": "W3JlZGFjdGVkXQ=="},
            "privateKey": {"inlineString": "-----BEGIN PRIVATE KEY-----\nx"},
        }], "trustedCa": {"filename": "/certs/ca.crt"}});
        let mut repairs = BTreeSet::new();
        repair_pki(&mut v, pki, &mut repairs);
        // The key is real PEM, but it goes with the placeholder certificate.
        assert_eq!(
            v["tlsCertificates"][0]["certificateChain"]["filename"],
            "/pki/server.pem"
        );
        assert_eq!(
            v["tlsCertificates"][0]["privateKey"]["filename"],
            "/pki/server.key"
        );
        assert_eq!(v["trustedCa"]["filename"], "/pki/ca.pem");
        assert_eq!(repairs.len(), 2);
        let mut real = json!({"certificateChain": {"inlineString": "-----BEGIN CERTIFICATE-----"}});
        repair_pki(&mut real, pki, &mut repairs);
        assert!(real["certificateChain"]["inlineString"].is_string());
    }
}
