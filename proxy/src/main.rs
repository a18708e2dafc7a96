//! The `legate` binary: Envoy's command line, bootstrap, and serving.

use clap::Parser;
use legate::admin::{Admin, AdminState, STATE_LIVE};
use legate::bootstrap;
use legate::cli::{Cli, Mode};
use legate::cluster_manager::ClusterManager;
use legate::server::hcm::{HcmProxy, Shared};
use legate::server::ListenerManager;
use legate::stats;
use pingora_core::apps::{HttpServerOptions, ServerApp};
use pingora_core::server::configuration::ServerConf;
use std::process::ExitCode;
use std::sync::Arc;

/// mimalloc rather than glibc's malloc: a proxy allocates and frees small
/// buffers and header maps on every request, and glibc's allocator took a
/// quarter of Legate's userspace CPU under HTTP/1 load (perf, `bench/run`).
/// Called as `legate::allocator` explains.
#[global_allocator]
static ALLOCATOR: legate::allocator::MiMalloc = legate::allocator::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.version {
        println!("legate version: {}", legate::version_string());
        return ExitCode::SUCCESS;
    }
    let set_level = match legate::logging::init(&cli.log_level) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if cli.mode == Mode::Validate {
        // Validation opens no sockets and starts nothing.
        let checked = bootstrap::load(&cli).and_then(|l| {
            legate::kernel_lb::Settings::resolve(
                cli.kernel_lb,
                &cli.kernel_lb_cgroup,
                &l.config.runtime,
                cli.base_id,
            )
            .map_err(|e| {
                bootstrap::LoadError::Config(legate::config::ConfigError::new("layered_runtime", e))
            })
        });
        return match checked {
            Ok(_) => {
                println!("configuration '{}' OK", cli.config_path);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!(
                    "error initializing configuration '{}': {e}",
                    cli.config_path
                );
                ExitCode::FAILURE
            }
        };
    }
    let workers = if cli.concurrency == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        cli.concurrency
    };
    // The main thread, as Envoy's: xDS, admin, the cluster manager. The
    // connections run on `workers` threads of their own.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(serve(cli, workers, set_level))
}

/// How many idle upstream connections each worker's pingora pool keeps,
/// over all clusters. Envoy closes an idle upstream connection only when its
/// `idle_timeout` (1 h by default) passes, never because others are idle;
/// pingora's default, 128, closes the least recently used one beyond it, so
/// a burst of more concurrent requests than that (a few hundred multiplexed
/// HTTP/2 streams, each needing its own HTTP/1.1 upstream connection) made
/// every following burst connect again. The pool reserves an index of this
/// many slots up front: 0.1 MB more resident at start (49.3 against 49.2
/// MB).
const IDLE_UPSTREAM_CONNECTIONS: usize = 16 * 1024;

async fn serve(cli: Cli, workers: usize, set_level: legate::logging::LevelSetter) -> ExitCode {
    for f in cli.inert_flags() {
        tracing::info!(
            flag = f,
            "flag accepted for compatibility; it has no effect yet"
        );
    }
    let loaded = match bootstrap::load(&cli) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "error initializing configuration '{}': {e}",
                cli.config_path
            );
            return ExitCode::FAILURE;
        }
    };
    let config = loaded.config;
    legate::overload::set_limit(config.overload.max_connections);
    legate::overload::set_runtime(&config.runtime);
    // The admin listener bypasses the overload manager, as Envoy's does.
    let admin_exempt = legate::overload::Exempt {
        ignore_limit: config.admin_ignores_conn_limit,
        bypass: true,
    };
    let loaded_node = loaded.bootstrap.node.clone().unwrap_or_default();
    stats::gauge("server.state".into()).set(3.0); // INITIALIZING
    let clusters = ClusterManager::start(&config.clusters).await;
    let runtime = Arc::new(arc_swap::ArcSwap::from_pointee(config.runtime.clone()));
    let routes = Arc::new(legate::route_tables::RouteTables::default());
    let hostname = legate::server::request::hostname().to_string();
    let health_failed: Arc<std::sync::atomic::AtomicBool> = Default::default();
    let shared = Arc::new(Shared {
        clusters: clusters.clone(),
        runtime: runtime.clone(),
        routes: routes.clone(),
        hostname,
        local_ip: legate::server::request::local_ip(),
        service_cluster: config.node.cluster.clone(),
        health_failed: health_failed.clone(),
    });
    let conf = Arc::new(ServerConf {
        upstream_keepalive_pool_size: IDLE_UPSTREAM_CONNECTIONS,
        ..ServerConf::default()
    });
    let drain_time = std::time::Duration::from_secs(cli.drain_time_s);
    let workers = match legate::server::workers::Workers::start(workers) {
        Ok(w) => Arc::new(w),
        Err(e) => {
            eprintln!("cannot start {workers} worker threads: {e}");
            return ExitCode::FAILURE;
        }
    };
    // One proxy, and so one upstream connection pool, per worker, as each
    // Envoy worker has its own pools: a pooled connection is registered
    // with the I/O driver of the worker that opened it.
    let proxies = (0..workers.len())
        .map(|_| {
            let mut proxy = pingora_proxy::http_proxy(
                &conf,
                HcmProxy {
                    shared: shared.clone(),
                },
            );
            let mut opts = HttpServerOptions::default();
            opts.h2c = true;
            // CONNECT reaches the router (which answers 404, as Envoy does
            // without a connect_matcher route) instead of pingora's 405.
            opts.allow_connect_method_proxying = true;
            proxy.server_options = Some(opts);
            Arc::new(proxy)
        })
        .collect();
    let listeners = Arc::new(ListenerManager::new(
        proxies,
        clusters.clone(),
        drain_time,
        workers,
        health_failed,
    ));
    // A static listener with SDS certificates warms until they arrive: the
    // xDS applier adds it then.
    for l in config
        .listeners
        .iter()
        .filter(|l| l.sds_refs().next().is_none())
    {
        if let Err(e) = listeners.add(l.clone()) {
            eprintln!(
                "error initializing configuration '{}': listener '{}': cannot bind '{}': {e}",
                cli.config_path, l.name, l.address
            );
            return ExitCode::FAILURE;
        }
    }
    let state = Arc::new(AdminState {
        clusters: clusters.clone(),
        listeners: listeners.clone(),
        bootstrap: loaded.bootstrap,
        runtime: runtime.clone(),
        xds: Default::default(),
        state: std::sync::atomic::AtomicU8::new(legate::admin::STATE_INITIALIZING),
        started: std::time::SystemTime::now(),
        command_line: serde_json::json!({
            "concurrency": cli.concurrency, "log_level": cli.log_level, "drain_time": format!("{}s", cli.drain_time_s),
            "service_node": cli.service_node, "service_cluster": cli.service_cluster, "mode": format!("{:?}", cli.mode),
        }),
        node: config.node.clone(),
        set_log_level: set_level,
        log_level: std::sync::Mutex::new(cli.log_level.clone()),
        quit: tokio::sync::Notify::new(),
        kernel_lb: Default::default(),
    });
    if let Some(addr) = config.admin {
        let admin_proxy = Arc::new(pingora_proxy::http_proxy(
            &conf,
            Admin {
                state: state.clone(),
            },
        ));
        let tcp = match tokio::net::TcpListener::bind(addr).await {
            Ok(t) => t,
            Err(e) => {
                eprintln!("cannot bind admin address {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(address = %tcp.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin listening");
        tokio::spawn(async move {
            let (_tx, rx) = tokio::sync::watch::channel(false);
            loop {
                let Ok((sock, _)) = tcp.accept().await else {
                    continue;
                };
                let Ok(slot) = legate::overload::admit(admin_exempt, "listener.admin") else {
                    continue;
                };
                let p = admin_proxy.clone();
                let rx = rx.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let stream: pingora_core::protocols::l4::stream::Stream = sock.into();
                    p.process_new(Box::new(stream), &rx).await;
                });
            }
        });
    }
    let applier = legate::xds::Applier::new(
        clusters.clone(),
        listeners.clone(),
        routes,
        runtime.clone(),
        &config,
        drain_time,
    );
    if let Err(e) = applier.start(xds_node(&loaded_node, &config.node)) {
        eprintln!(
            "error initializing configuration '{}': {e}",
            cli.config_path
        );
        return ExitCode::FAILURE;
    }
    *state.xds.lock().unwrap() = Some(applier.clone());
    let kernel_settings = match legate::kernel_lb::Settings::resolve(
        cli.kernel_lb,
        &cli.kernel_lb_cgroup,
        &runtime.load(),
        cli.base_id,
    ) {
        Ok(k) => k,
        Err(e) => {
            eprintln!(
                "error initializing configuration '{}': {e}",
                cli.config_path
            );
            return ExitCode::FAILURE;
        }
    };
    match legate::kernel_lb::Agent::start(kernel_settings, listeners.clone(), clusters.clone()) {
        Ok(a) => *state.kernel_lb.lock().unwrap() = Some(a),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    // Envoy's init: LIVE once the first xDS fetches are answered and warmed.
    applier.initialized().await;
    state.set_state(STATE_LIVE);
    stats::gauge("listener_manager.workers_started".into()).set(1.0);
    tracing::info!("all listeners started; server is LIVE");
    if cli.mode == Mode::InitOnly {
        return ExitCode::SUCCESS;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = state.quit.notified() => tracing::info!("/quitquitquit: shutting down"),
    }
    listeners.drain_all(false);
    // Let the admin reply to /quitquitquit flush before exiting.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    ExitCode::SUCCESS
}

/// The node sent to management servers: the bootstrap's, with the command
/// line's overrides, and Legate's user agent.
fn xds_node(
    boot: &legate_proto::envoy_types::pb::envoy::config::core::v3::Node,
    node: &legate::config::Node,
) -> legate_xds_client::Node {
    let mut n = boot.clone();
    n.id = node.id.clone();
    n.cluster = node.cluster.clone();
    if !node.zone.is_empty() {
        n.locality.get_or_insert_with(Default::default).zone = node.zone.clone();
    }
    n.user_agent_name = "legate".into();
    n.user_agent_version_type = Some(
        legate_proto::envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType::UserAgentVersion(
            env!("CARGO_PKG_VERSION").into(),
        ),
    );
    n
}
