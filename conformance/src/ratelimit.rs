//! The global rate limit filter against the real rate limit service
//! (`github.com/envoyproxy/ratelimit`, built once from the Go module proxy
//! into `target/conformance/ratelimit`) backed by a real Redis
//! (`redis-server`): the scenarios in `scenarios/ratelimit/` through Envoy
//! and Legate (Redis emptied before each), then two instances of each proxy
//! sharing one limit, and the service or Redis going away.

use crate::proxies::{self, Binaries, Kind};
use crate::report::{Outcome, Report};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The service's version (a pseudo-version of its main branch), pinned so
/// every machine builds the same.
const VERSION: &str = "v1.4.1-0.20260122083618-3fb702589d36";

/// The service's limits for domain `legate`, the scenarios' and the
/// shared-limit case's.
const LIMITS: &str = r#"domain: legate
descriptors:
- key: generic_key
  value: limited
  rate_limit: {unit: hour, requests_per_unit: 2}
- key: generic_key
  value: free
- key: generic_key
  value: per-route
  rate_limit: {unit: hour, requests_per_unit: 1}
- key: generic_key
  value: shared
  rate_limit: {unit: hour, requests_per_unit: 3}
- key: user
  rate_limit: {unit: hour, requests_per_unit: 1}
- key: generic_key
  value: cost
  rate_limit: {unit: hour, requests_per_unit: 5}
- key: generic_key
  value: cost-format
  rate_limit: {unit: hour, requests_per_unit: 5}
- key: generic_key
  value: after
  rate_limit: {unit: hour, requests_per_unit: 3}
- key: generic_key
  value: headers
  rate_limit: {unit: hour, requests_per_unit: 10}
- key: generic_key
  value: headers-off
  rate_limit: {unit: hour, requests_per_unit: 4}
"#;

fn service_binary(root: &Path) -> Result<PathBuf> {
    let dir = root.join("../target/conformance/ratelimit");
    let bin = dir.join("bin/service_cmd");
    if bin.exists() {
        return Ok(bin);
    }
    std::fs::create_dir_all(&dir)?;
    crate::tools::output_ok(
        crate::tools::go()
            .env("GOBIN", dir.join("bin"))
            .args([
                "install",
                &format!("github.com/envoyproxy/ratelimit/src/service_cmd@{VERSION}"),
            ])
            .current_dir(&dir),
        "building the rate limit service",
    )?;
    Ok(bin)
}

/// Redis and the rate limit service, stopped when dropped.
pub struct Service {
    redis: Child,
    rls: Option<Child>,
    pub redis_port: u16,
    pub grpc_port: u16,
    /// Its HTTP port (`/healthcheck`).
    http_port: u16,
}

impl Drop for Service {
    fn drop(&mut self) {
        for c in self.rls.iter_mut().chain(std::iter::once(&mut self.redis)) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_port(port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not listen on {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn redis(port: u16) -> Result<Child> {
    let c = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting redis-server (scripts/setup.sh installs it)")?;
    wait_port(port, "redis-server")?;
    Ok(c)
}

impl Service {
    /// Starts Redis and the service again on the same ports.
    fn restart(&mut self, bin: &Path, work: &Path) -> Result<()> {
        self.stop_service();
        self.stop_redis();
        self.redis = redis(self.redis_port)?;
        self.rls = Some(self.spawn_service(bin, work)?);
        self.wait_ready()
    }

    /// Until `/healthcheck` says OK: its config is loaded and it serves.
    fn wait_ready(&self) -> Result<()> {
        wait_port(self.grpc_port, "the rate limit service")?;
        let url = format!("http://127.0.0.1:{}/healthcheck", self.http_port);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if legate_tests::legate::try_curl(&url, &[]).is_ok_and(|r| r.status == 200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the rate limit service did not become healthy");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn start(bin: &Path, work: &Path) -> Result<Self> {
        let redis_port = legate_tests::legate::free_port();
        let mut s = Self {
            redis: redis(redis_port)?,
            rls: None,
            redis_port,
            grpc_port: legate_tests::legate::free_port(),
            http_port: legate_tests::legate::free_port(),
        };
        s.rls = Some(s.spawn_service(bin, work)?);
        s.wait_ready()?;
        Ok(s)
    }

    fn spawn_service(&self, bin: &Path, work: &Path) -> Result<Child> {
        let (redis_port, grpc_port) = (self.redis_port, self.grpc_port);
        let runtime = work.join("ratelimit-runtime");
        std::fs::create_dir_all(runtime.join("ratelimit/config"))?;
        std::fs::write(runtime.join("ratelimit/config/legate.yaml"), LIMITS)?;
        let log = std::fs::File::create(work.join("ratelimit-service.log"))?;
        Command::new(bin)
            .env("USE_STATSD", "false")
            .env("LOG_LEVEL", "warn")
            .env("REDIS_SOCKET_TYPE", "tcp")
            .env("REDIS_URL", format!("127.0.0.1:{redis_port}"))
            .env("RUNTIME_ROOT", &runtime)
            .env("RUNTIME_SUBDIRECTORY", "ratelimit")
            .env("RUNTIME_WATCH_ROOT", "false")
            .env("HOST", "127.0.0.1")
            .env("GRPC_HOST", "127.0.0.1")
            .env("DEBUG_HOST", "127.0.0.1")
            .env("GRPC_PORT", grpc_port.to_string())
            .env("PORT", self.http_port.to_string())
            .env("HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED", "true")
            .env("STATS_FLUSH_INTERVAL", "3600s")
            .env("DEBUG_PORT", legate_tests::legate::free_port().to_string())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the rate limit service")
    }

    /// Empties Redis: every limit starts afresh.
    pub fn flush(&self) {
        let _ = Command::new("redis-cli")
            .args(["-p", &self.redis_port.to_string(), "flushall"])
            .stdout(Stdio::null())
            .status();
    }

    fn stop_service(&mut self) {
        if let Some(mut c) = self.rls.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn stop_redis(&mut self) {
        let _ = self.redis.kill();
        let _ = self.redis.wait();
    }
}

pub async fn run(bins: &Binaries, root: &Path, work: &Path, report: &mut Report) -> Result<()> {
    let bin = service_binary(root)?;
    let work = work.join("ratelimit");
    std::fs::create_dir_all(&work)?;
    let svc = Service::start(&bin, &work)?;
    let vars = [("RATELIMIT", svc.grpc_port.to_string())];
    for f in crate::tools::yaml_files(&root.join("scenarios/ratelimit"))? {
        let flush = || svc.flush();
        crate::routing::run_file_with(bins, &f, &work, report, "ratelimit", &vars, &flush).await?;
    }
    shared_limit(bins, &work, &svc, report).await?;
    drop(svc);
    outages(bins, root, &work, report).await
}

/// A bootstrap whose one route sends `generic_key: shared` to the service.
fn bootstrap(admin: u16, port: u16, upstream: u16, rls: u16, deny: bool) -> String {
    let mut text = crate::bootstrap::single_listener(
        admin,
        port,
        "rl",
        "",
        "route: {cluster: a, rate_limits: [{actions: [{generic_key: {descriptor_value: shared}}]}]}",
        Some(("a", upstream, "")),
    )
    .replace(
        "http_filters: [",
        &format!(
            r#"http_filters: [{{name: envoy.filters.http.ratelimit, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit, domain: legate, timeout: 1s, failure_mode_deny: {deny}, rate_limit_service: {{transport_api_version: V3, grpc_service: {{envoy_grpc: {{cluster_name: ratelimit}}}}}}}}}}, "#
        ),
    );
    // The service's cluster, over HTTP/2.
    text.push_str(&format!(
        r#"  - {{name: ratelimit, connect_timeout: 1s, typed_extension_protocol_options: {{envoy.extensions.upstreams.http.v3.HttpProtocolOptions: {{"@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions, explicit_http_config: {{http2_protocol_options: {{}}}}}}}}, load_assignment: {{cluster_name: ratelimit, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {rls}}}}}}}}}]}}]}}}}
"#
    ));
    text
}

fn status(port: u16) -> String {
    legate_tests::legate::try_curl(&format!("http://127.0.0.1:{port}/x"), &[])
        .map(|r| r.status.to_string())
        .unwrap_or_else(|e| format!("error: {e}"))
}

/// Two instances of one proxy, each with its own bootstrap and work dir.
struct Pair {
    _running: Vec<proxies::Running>,
    ports: [u16; 2],
    admins: [u16; 2],
}

fn pair(
    bins: &Binaries,
    kind: Kind,
    work: &Path,
    upstream: u16,
    rls: u16,
    deny: bool,
) -> Result<Pair> {
    let mut running = Vec::new();
    let mut ports = [0; 2];
    let mut admins = [0; 2];
    for i in 0..2 {
        let (port, admin) = (
            legate_tests::legate::free_port(),
            legate_tests::legate::free_port(),
        );
        let dir = work.join(format!("{}-{i}", kind.name()));
        std::fs::create_dir_all(&dir)?;
        let cfg = dir.join("bootstrap.yaml");
        std::fs::write(&cfg, bootstrap(admin, port, upstream, rls, deny))?;
        running.push(proxies::start(bins, kind, &cfg, admin, &dir)?);
        ports[i] = port;
        admins[i] = admin;
    }
    Ok(Pair {
        _running: running,
        ports,
        admins,
    })
}

/// Two Envoys share one limit of 3 through the service; so must two
/// Legates: six requests alternating between the instances.
async fn shared_limit(
    bins: &Binaries,
    work: &Path,
    svc: &Service,
    report: &mut Report,
) -> Result<()> {
    let up = legate_tests::echo::start("a", "127.0.0.1:0".parse().unwrap()).await?;
    let mut seen = Vec::new();
    for kind in [Kind::Envoy, Kind::Legate] {
        svc.flush();
        let p = pair(bins, kind, work, up.addr.port(), svc.grpc_port, false)?;
        let statuses: Vec<String> =
            tokio::task::block_in_place(|| (0..6).map(|i| status(p.ports[i % 2])).collect());
        seen.push(statuses);
    }
    let want: Vec<String> = ["200", "200", "200", "429", "429", "429"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let outcome = if seen[0] != want {
        Outcome::HarnessError(vec![format!("envoy: {:?}, expected {want:?}", seen[0])])
    } else if seen[0] == seen[1] {
        Outcome::Match
    } else {
        Outcome::Mismatch(vec![format!("envoy {:?} / legate {:?}", seen[0], seen[1])])
    };
    report.add(
        "ratelimit",
        "shared-limit",
        "two-instances-alternating",
        outcome,
    );
    Ok(())
}

/// Redis, then the service, going away and coming back, for each proxy
/// with a fresh service: with failure_mode_deny false requests go through
/// (`error` and `failure_mode_allowed` counted), with it true they get 500;
/// once both are back the limit holds again.
async fn outages(bins: &Binaries, root: &Path, work: &Path, report: &mut Report) -> Result<()> {
    let bin = service_binary(root)?;
    let up = legate_tests::echo::start("a", "127.0.0.1:0".parse().unwrap()).await?;
    let mut seen: Vec<Vec<String>> = Vec::new();
    for kind in [Kind::Envoy, Kind::Legate] {
        let dir = work.join(format!("outage-{}", kind.name()));
        std::fs::create_dir_all(&dir)?;
        let mut svc = Service::start(&bin, &dir)?;
        let allow = pair(bins, kind, &dir, up.addr.port(), svc.grpc_port, false)?;
        let deny = pair(bins, kind, &dir, up.addr.port(), svc.grpc_port, true)?;
        let mut row = Vec::new();
        let mut step = |what: &str| {
            row.push(format!(
                "{what}: allow {} deny {}",
                status(allow.ports[0]),
                status(deny.ports[0])
            ));
        };
        tokio::task::block_in_place(|| -> Result<()> {
            step("both up");
            svc.stop_redis();
            step("redis away");
            svc.stop_service();
            step("service away");
            svc.restart(&bin, &dir)?;
            // The limit of 3 holds again: two used above, one left.
            step("back");
            step("back, limit reached");
            Ok(())
        })?;
        for name in ["error", "failure_mode_allowed", "ok", "over_limit"] {
            let stat = format!("cluster.a.ratelimit.{name}");
            row.push(format!(
                "{stat}: {}",
                crate::resilience::stat(allow.admins[0], &stat)
            ));
        }
        seen.push(row);
    }
    eprintln!("ratelimit/outages: envoy saw {:?}", seen[0]);
    let outcome = if seen[0] == seen[1] {
        Outcome::Match
    } else {
        Outcome::Mismatch(vec![format!("envoy {:?} / legate {:?}", seen[0], seen[1])])
    };
    report.add(
        "ratelimit",
        "outages",
        "redis-then-service-away-and-back",
        outcome,
    );
    Ok(())
}
