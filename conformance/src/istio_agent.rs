//! The istio tier's pilot-agent part: Istio's real `pilot-agent` (built
//! with istiod, `istio/build-istiod.sh`) starts Legate as it starts Envoy:
//! its own command line, its own bootstrap (written from Istio's template,
//! with the Prometheus listener on 15090, the readiness listener on 15021,
//! `stats_config`, the overload manager, xDS and SDS over Unix sockets to
//! the agent). Without Kubernetes it runs as the productpage-v1 sidecar
//! (INTERCEPTION_MODE NONE) with `controlPlaneAuthPolicy: NONE`, so its
//! xDS proxy reaches the plaintext istiod; its certificate requests fail
//! (istiod's CA wants a Kubernetes token), which a plaintext mesh does not
//! need.
//!
//! Checked: istiod sees every type acknowledged through the agent; the
//! readiness listener answers 200 (the agent probes Legate's admin API as
//! it probes Envoy's); a request goes through the sidecar; Prometheus on
//! 15090 serves Istio's metrics for it; on SIGTERM the agent drains Legate
//! and both exit.

use crate::istio::{wait_acked, Istiod};
use crate::proxies::{Binaries, Kind};
use crate::report::{Outcome, Report};
use anyhow::{Context, Result};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TIER: &str = "istio";
const CASE: &str = "default-pilot-agent";
const PROXY_ID: &str = "productpage-v1-0.legate";
const LABELS: &str = r#"{"app":"productpage","version":"v1","service.istio.io/canonical-name":"productpage","service.istio.io/canonical-revision":"v1"}"#;

/// pilot-agent, stopped (SIGKILL) when dropped if it is still running.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http_status(url: &str) -> String {
    Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "2",
            url,
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn http_body(url: &str) -> String {
    Command::new("curl")
        .args(["-s", "--compressed", "--max-time", "3", url])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Polls `check` for up to `secs`.
fn wait(secs: u64, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    check()
}

fn start(bins: &Binaries, istiod_bin: &Path, dir: &Path, xds: u16, admin: u16) -> Result<Agent> {
    let bin_dir = istiod_bin.parent().context("istiod's folder")?;
    let agent = bin_dir.join("pilot-agent");
    let template = bin_dir.join("../src/tools/packaging/common/envoy_bootstrap.json");
    anyhow::ensure!(
        template.exists(),
        "no bootstrap template at {}",
        template.display()
    );
    let legate = bins.path(Kind::Legate);
    let status = legate_tests::legate::free_port();
    let mesh = format!(
        "defaultConfig:\n  binaryPath: {}\n  configPath: {}\n  discoveryAddress: 127.0.0.1:{xds}\n  controlPlaneAuthPolicy: NONE\n  proxyAdminPort: {admin}\n  statusPort: {status}\n  drainDuration: 2s\n  terminationDrainDuration: 2s\n",
        legate.display(),
        dir.join("out").display(),
    );
    std::fs::write(dir.join("mesh.yaml"), mesh)?;
    let log = std::fs::File::create(dir.join("pilot-agent.log"))?;
    let child = Command::new(agent)
        .args(["proxy", "sidecar", "--meshConfig"])
        .arg(dir.join("mesh.yaml"))
        .arg("--templateFile")
        .arg(&template)
        .current_dir(dir)
        .env("POD_NAME", "productpage-v1-0")
        .env("POD_NAMESPACE", "legate")
        .env("INSTANCE_IP", "127.0.0.10")
        .env("SERVICE_ACCOUNT", "productpage")
        .env("ISTIO_META_INTERCEPTION_MODE", "NONE")
        .env("ISTIO_META_WORKLOAD_NAME", "productpage-v1")
        .env("ISTIO_META_CLUSTER_ID", "Kubernetes")
        .env(
            "ISTIO_META_OWNER",
            "kubernetes://apis/apps/v1/namespaces/legate/deployments/productpage-v1",
        )
        .env("ISTIO_METAJSON_LABELS", LABELS)
        // The agent talks to a CA on Istio's plaintext port 15010 without
        // a root certificate (on any other port it wants one to start).
        // Nothing answers there: no certificates, which this plaintext
        // mesh does not use.
        .env("CA_ADDR", "127.0.0.1:15010")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting pilot-agent")?;
    Ok(Agent(child))
}

pub async fn run(
    bins: &Binaries,
    work: &Path,
    report: &mut Report,
    istiod: &Istiod,
    istiod_bin: &Path,
) -> Result<()> {
    let dir = work.join("istio-agent");
    std::fs::create_dir_all(&dir)?;
    let admin = legate_tests::legate::free_port();
    let mut agent = match start(bins, istiod_bin, &dir, istiod.xds, admin) {
        Ok(a) => a,
        Err(e) => {
            report.add(
                TIER,
                CASE,
                "starts",
                Outcome::Mismatch(vec![format!("{e:#}")]),
            );
            return Ok(());
        }
    };
    let ready = tokio::task::block_in_place(|| {
        wait(30, || {
            http_status("http://127.0.0.1:15021/healthz/ready") == "200"
        })
    });
    report.add(
        TIER,
        CASE,
        "ready on 15021",
        if ready {
            Outcome::Match
        } else {
            Outcome::Mismatch(vec![format!(
                "15021 answers {}; see {}",
                http_status("http://127.0.0.1:15021/healthz/ready"),
                dir.join("pilot-agent.log").display()
            )])
        },
    );
    let acked = tokio::task::block_in_place(|| wait_acked(istiod, PROXY_ID));
    report.add(
        TIER,
        CASE,
        "acknowledged through the agent",
        if acked == "all acknowledged" {
            Outcome::Match
        } else {
            Outcome::Mismatch(vec![acked])
        },
    );
    let request: crate::routing::Request = serde_yaml::from_str(
        "{name: details, path: /details/0, headers: {host: details.legate.svc.cluster.local}}",
    )?;
    let seen = tokio::task::block_in_place(|| crate::routing::try_send(18080, &request, &dir));
    report.add(
        TIER,
        CASE,
        "request through the sidecar",
        match seen {
            Ok(o) if o.status == 200 && o.served_by == "details-v1" => Outcome::Match,
            Ok(o) => Outcome::Mismatch(vec![format!("{} from {}", o.status, o.served_by)]),
            Err(e) => Outcome::Mismatch(vec![e]),
        },
    );
    // The request's metrics through the Prometheus listener (compressed
    // as the listener's filters choose), the peer named by its endpoint.
    let metrics = tokio::task::block_in_place(|| {
        let mut body = String::new();
        wait(3, || {
            body = http_body("http://127.0.0.1:15090/stats/prometheus");
            body.contains("istio_requests_total{")
        });
        body
    });
    let line = metrics
        .lines()
        .find(|l| l.starts_with("istio_requests_total{"))
        .unwrap_or("")
        .to_string();
    let want = [
        "reporter=\"source\"",
        "source_workload=\"productpage-v1\"",
        "destination_workload=\"details-v1\"",
        "destination_service=\"details.legate.svc.cluster.local\"",
        "response_code=\"200\"",
    ];
    let missing: Vec<&str> = want.iter().copied().filter(|w| !line.contains(w)).collect();
    report.add(
        TIER,
        CASE,
        "istio metrics on 15090",
        if missing.is_empty() && line.ends_with("} 1") {
            Outcome::Match
        } else {
            Outcome::Mismatch(vec![format!("missing {missing:?} in {line:?}")])
        },
    );
    // SIGTERM: the agent drains Legate (graceful inbound drain), waits its
    // termination drain, and both exit.
    let _ = Command::new("kill")
        .args(["-TERM", &agent.0.id().to_string()])
        .status();
    let ended = tokio::task::block_in_place(|| {
        wait(20, || matches!(agent.0.try_wait(), Ok(Some(_))))
            && wait(5, || {
                http_status(&format!("http://127.0.0.1:{admin}/ready")) == "000"
            })
    });
    let drained = std::fs::read_to_string(dir.join("pilot-agent.log")).unwrap_or_default();
    report.add(
        TIER,
        CASE,
        "drains and exits on SIGTERM",
        if ended && drained.contains("Agent draining Proxy for termination") {
            Outcome::Match
        } else {
            Outcome::Mismatch(vec![format!(
                "agent ended: {ended}; see {}",
                dir.join("pilot-agent.log").display()
            )])
        },
    );
    Ok(())
}
