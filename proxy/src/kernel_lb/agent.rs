//! The thread that keeps the kernel maps in step with listeners and
//! endpoints, and reports what is offloaded.
//!
//! Every [`TICK`] it classifies the listeners, rebuilds the table of a
//! service only when its cluster published a new endpoint snapshot (so EDS
//! bursts are debounced per cluster, latest wins), and syncs the maps; map
//! updates are syscalls, so this runs on its own thread, off the proxy's
//! runtime. Once a second it folds the kernel's per-backend connection
//! counters into `cluster.<name>.upstream_cx_total`.

use super::offload::{classify, service_spec, Decision};
use super::Mode;
use crate::cluster_manager::{ClusterManager, HostSnapshot};
use crate::server::ListenerManager;
use crate::stats;
use legate_bpf::{KernelLb, OrigDst, Redirect, ServiceSpec};
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(100);
const COUNTERS_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    /// `None`: the root of the cgroup v2 hierarchy.
    pub cgroup: Option<PathBuf>,
    pub pin_dir: PathBuf,
}

/// A VIP's service as last written: the snapshot it was built from, and
/// the spec with its weights (None: not offloaded).
type Built = (Arc<HostSnapshot>, Option<(ServiceSpec, Vec<u32>)>);
impl Settings {
    /// The command line wins over the bootstrap's runtime keys; the default
    /// is `auto` on the root cgroup.
    pub fn resolve(
        cli_mode: Option<Mode>,
        cli_cgroup: &str,
        runtime: &crate::runtime::Runtime,
        base_id: u64,
    ) -> Result<Self, String> {
        let mode = match cli_mode {
            Some(m) => m,
            None => match runtime.get(super::RUNTIME_KEYS[0]) {
                None => Mode::Auto,
                Some(v) => v.as_str().and_then(Mode::parse).ok_or_else(|| {
                    format!("runtime key legate.kernel_lb.mode: {v} is not auto, required or off")
                })?,
            },
        };
        let cgroup = if !cli_cgroup.is_empty() {
            Some(PathBuf::from(cli_cgroup))
        } else {
            runtime
                .get(super::RUNTIME_KEYS[1])
                .and_then(|v| v.as_str())
                .map(PathBuf::from)
        };
        Ok(Self {
            mode,
            cgroup,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/legate/{base_id}")),
        })
    }
}

/// One listener as the admin API shows it.
#[derive(Debug, Clone)]
struct ListenerStatus {
    listener: String,
    address: SocketAddr,
    decision: Decision,
    /// Why a DIRECT listener is not in the kernel after all, if it is not.
    not_offloaded: Option<String>,
    backends: Vec<(SocketAddr, u32)>,
}

struct Loaded {
    lb: KernelLb,
    /// Legate's redirect listener on 127.0.0.1 and [::1], where REDIRECT
    /// services' connects arrive.
    redirect: RedirectListener,
    /// Last connection count per (VIP, backend), to add deltas to stats.
    counted: HashMap<(SocketAddr, SocketAddr), u64>,
}

/// The kernel LB's state, shared with the admin API.
pub struct Agent {
    settings: Settings,
    /// `Some(reason)` once loading failed (auto) or when off.
    unavailable: Mutex<Option<String>>,
    loaded: Mutex<Option<Loaded>>,
    status: Mutex<Vec<ListenerStatus>>,
    enabled: metrics::Gauge,
    offloaded: metrics::Gauge,
}

impl Agent {
    /// Starts the agent. With `required`, loads now and fails if the kernel
    /// refuses; with `off`, removes pins an earlier run left.
    pub fn start(
        settings: Settings,
        listeners: Arc<ListenerManager>,
        clusters: Arc<ClusterManager>,
    ) -> Result<Arc<Self>, String> {
        let agent = Arc::new(Agent {
            unavailable: Mutex::new(None),
            loaded: Mutex::new(None),
            status: Mutex::new(Vec::new()),
            enabled: stats::gauge("kernel_lb.enabled".into()),
            offloaded: stats::gauge("kernel_lb.services_offloaded".into()),
            settings,
        });
        agent.enabled.set(0.0);
        match agent.settings.mode {
            Mode::Off => {
                if let Ok(true) = legate_bpf::unpin(&agent.settings.pin_dir) {
                    tracing::info!(dir = %agent.settings.pin_dir.display(), "kernel LB off: removed what an earlier run pinned");
                }
                *agent.unavailable.lock().unwrap() = Some("--kernel-lb off".into());
                return Ok(agent);
            }
            Mode::Required => agent
                .load(&listeners)
                .map_err(|e| format!("--kernel-lb required: {e}"))?,
            Mode::Auto => {}
        }
        let a = agent.clone();
        // The fallback starts accept loops, which are tokio tasks.
        let rt = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("kernel-lb".into())
            .spawn(move || {
                let _rt = rt.enter();
                a.run(&listeners, &clusters)
            })
            .map_err(|e| e.to_string())?;
        Ok(agent)
    }

    fn load(&self, listeners: &Arc<ListenerManager>) -> Result<(), String> {
        let cgroup = match &self.settings.cgroup {
            Some(c) => c.clone(),
            None => legate_bpf::cgroup2_root().map_err(|e| e.to_string())?,
        };
        let opts = legate_bpf::Options {
            cgroup: cgroup.clone(),
            pin_dir: self.settings.pin_dir.clone(),
            self_tgid: std::process::id(),
        };
        let lb = KernelLb::load(&opts).map_err(|e| e.to_string())?;
        let redirect = start_redirect_listener(
            OrigDst::open(&opts.pin_dir).map_err(|e| e.to_string())?,
            listeners.clone(),
        )
        .map_err(|e| format!("redirect listener: {e}"))?;
        tracing::info!(cgroup = %cgroup.display(), pins = %opts.pin_dir.display(), "kernel LB loaded and attached");
        self.enabled.set(1.0);
        *self.loaded.lock().unwrap() = Some(Loaded {
            lb,
            redirect,
            counted: HashMap::new(),
        });
        Ok(())
    }

    fn run(&self, listeners: &Arc<ListenerManager>, clusters: &ClusterManager) {
        // Per VIP: the snapshot its spec was built from, and the spec.
        let mut built: HashMap<SocketAddr, Built> = HashMap::new();
        let mut last_counters = Instant::now();
        loop {
            std::thread::sleep(TICK);
            let mut status = Vec::new();
            let mut specs = Vec::new();
            let mut owners: HashMap<SocketAddr, String> = HashMap::new();
            let mut redirect_vips: Vec<SocketAddr> = Vec::new();
            for l in listeners.configs() {
                let decision = classify(&l);
                let mut s = ListenerStatus {
                    listener: l.name.clone(),
                    address: l.address,
                    decision: decision.clone(),
                    not_offloaded: None,
                    backends: Vec::new(),
                };
                if let Decision::Redirect(_) = &decision {
                    redirect_vips.push(l.address);
                }
                if let Decision::Direct { cluster } = &decision {
                    match clusters.get(cluster) {
                        None => {
                            s.not_offloaded = Some(format!("cluster '{cluster}' does not exist"))
                        }
                        Some(c) if c.config.has_pipe() => {
                            s.not_offloaded = Some("pipe endpoints are not IP addresses".into())
                        }
                        Some(c) if c.config.originates_tls() => {
                            s.not_offloaded =
                                Some("upstream TLS origination needs the proxy".into())
                        }
                        Some(c) => {
                            let snap = c.snapshot();
                            let entry = built
                                .entry(l.address)
                                .or_insert_with(|| (snap.clone(), None));
                            if !Arc::ptr_eq(&entry.0, &snap) || entry.1.is_none() {
                                *entry = (snap.clone(), service_spec(l.address, &snap));
                            }
                            match &entry.1 {
                                Some((spec, weights)) => {
                                    s.backends = spec
                                        .backends
                                        .iter()
                                        .copied()
                                        .zip(weights.iter().copied())
                                        .collect();
                                    specs.push(spec.clone());
                                    owners.insert(l.address, cluster.clone());
                                }
                                None => {
                                    s.not_offloaded = Some(
                                        "no healthy endpoint of the VIP's address family".into(),
                                    )
                                }
                            }
                        }
                    }
                }
                status.push(s);
            }
            built.retain(|vip, _| owners.contains_key(vip));
            status.sort_by(|a, b| a.listener.cmp(&b.listener));

            let unavailable = self.unavailable.lock().unwrap().clone();
            let wanted = !specs.is_empty() || !redirect_vips.is_empty();
            if unavailable.is_none() && wanted && self.loaded.lock().unwrap().is_none() {
                if let Err(e) = self.load(listeners) {
                    tracing::warn!(error = %e, "kernel LB unavailable; serving every listener from userspace");
                    *self.unavailable.lock().unwrap() = Some(e);
                }
            }
            let mut loaded = self.loaded.lock().unwrap();
            match loaded.as_mut() {
                Some(l) => {
                    // VIPs that cannot be redirected after all stay with
                    // userspace, as auto's fallback does.
                    let mut cannot: Vec<(SocketAddr, String)> = Vec::new();
                    if let Some(why) = &l.redirect.no_v6 {
                        for v in redirect_vips.iter().filter(|v| v.is_ipv6()) {
                            cannot.push((*v, format!("no IPv6 redirect listener: {why}")));
                        }
                    }
                    if !redirect_vips.is_empty() {
                        if let Err(e) = l.lb.attach_sockops() {
                            for v in &redirect_vips {
                                cannot.push((*v, format!("attaching sock_ops: {e}")));
                            }
                        }
                    }
                    for (vip, why) in &cannot {
                        redirect_vips.retain(|v| v != vip);
                        for s in status.iter_mut().filter(|s| s.address == *vip) {
                            s.not_offloaded = Some(match listeners.serve_unbound(&s.listener) {
                                Ok(_) => format!("served in userspace: {why}"),
                                Err(e) => format!("{why}; binding the VIP failed: {e}"),
                            });
                        }
                    }
                    let redirects: Vec<Redirect> = redirect_vips
                        .iter()
                        .map(|vip| Redirect {
                            vip: *vip,
                            port: l.redirect.port,
                        })
                        .collect();
                    if let Err(e) = l.lb.sync(&specs, &redirects) {
                        tracing::warn!(error = %e, "kernel LB: sync failed; retrying next tick");
                        for s in status.iter_mut().filter(|s| {
                            owners.contains_key(&s.address) || redirect_vips.contains(&s.address)
                        }) {
                            s.not_offloaded = Some(format!("map update failed: {e}"));
                        }
                    }
                    if last_counters.elapsed() >= COUNTERS_EVERY {
                        last_counters = Instant::now();
                        fold_counters(l, &owners, clusters);
                    }
                    self.offloaded
                        .set((specs.len() + redirect_vips.len()) as f64);
                }
                None => {
                    let failure = self.unavailable.lock().unwrap().clone();
                    let failed = failure.is_some();
                    let why = failure.unwrap_or_else(|| "not loaded".into());
                    for s in status.iter_mut().filter(|s| {
                        owners.contains_key(&s.address) || redirect_vips.contains(&s.address)
                    }) {
                        s.not_offloaded = Some(if failed {
                            // auto's fallback: Legate's own listener serves
                            // the VIP, from the same endpoints.
                            match listeners.serve_unbound(&s.listener) {
                                Ok(_) => {
                                    format!("served in userspace: kernel LB unavailable: {why}")
                                }
                                Err(e) => format!(
                                    "kernel LB unavailable ({why}) and binding the VIP failed: {e}"
                                ),
                            }
                        } else {
                            format!("kernel LB {why}")
                        });
                    }
                    self.offloaded.set(0.0);
                }
            }
            drop(loaded);
            *self.status.lock().unwrap() = status;
        }
    }

    /// `/kernel_lb`: the mode, whether the programs are loaded (or why not),
    /// and per listener whether the kernel serves it, and why not.
    pub fn status_json(&self) -> serde_json::Value {
        let loaded = self.loaded.lock().unwrap();
        let counts: HashMap<(SocketAddr, SocketAddr), u64> = loaded
            .as_ref()
            .map(|l| {
                l.lb.connections()
                    .into_iter()
                    .map(|(v, b, n)| ((v, b), n))
                    .collect()
            })
            .unwrap_or_default();
        let listeners: Vec<serde_json::Value> = self
            .status
            .lock()
            .unwrap()
            .iter()
            .map(|s| {
                let not_yet = || "kernel LB not loaded yet".to_string();
                let (mode, reason, cluster) = match (&s.decision, &s.not_offloaded) {
                    (Decision::Direct { cluster }, None) if loaded.is_some() => {
                        ("DIRECT", None, Some(cluster.clone()))
                    }
                    (Decision::Redirect(why), None) if loaded.is_some() => {
                        ("REDIRECT", Some(why.to_string()), None)
                    }
                    (Decision::Direct { cluster }, why) => (
                        "PASS",
                        Some(why.clone().unwrap_or_else(not_yet)),
                        Some(cluster.clone()),
                    ),
                    (Decision::Redirect(_), why) => {
                        ("PASS", Some(why.clone().unwrap_or_else(not_yet)), None)
                    }
                    (Decision::Pass(why), _) => ("PASS", Some(why.to_string()), None),
                };
                json!({
                    "listener": s.listener,
                    "address": s.address.to_string(),
                    "mode": mode,
                    "offloaded": mode == "DIRECT",
                    "redirected": mode == "REDIRECT",
                    "reason": reason,
                    "cluster": cluster,
                    "backends": s.backends.iter().map(|(a, w)| json!({
                        "address": a.to_string(),
                        "weight": w,
                        "connections": counts.get(&(s.address, *a)).copied().unwrap_or(0),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({
            "mode": self.settings.mode.as_str(),
            "loaded": loaded.is_some(),
            // sock_ops is attached only once a REDIRECT service needs it.
            "sock_ops_attached": loaded.as_ref().is_some_and(|l| l.lb.sockops_attached()),
            "unavailable_reason": self.unavailable.lock().unwrap().clone(),
            "pin_dir": self.settings.pin_dir.display().to_string(),
            "listeners": listeners,
        })
    }
}

/// Adds the kernel's new connections per backend to the owning cluster's
/// `upstream_cx_total`, so the stat counts kernel-balanced connections too.
fn fold_counters(l: &mut Loaded, owners: &HashMap<SocketAddr, String>, clusters: &ClusterManager) {
    for (vip, backend, n) in l.lb.connections() {
        let prev = l.counted.insert((vip, backend), n).unwrap_or(0);
        if n > prev {
            if let Some(c) = owners.get(&vip).and_then(|name| clusters.get(name)) {
                c.stats.upstream_cx_total.increment(n - prev);
            }
        }
    }
}

/// Legate's redirect listener: its port, on 127.0.0.1 and (unless the
/// reason is given) on [::1].
struct RedirectListener {
    port: u16,
    no_v6: Option<String>,
}

/// Binds Legate's redirect listener and serves what arrives with the
/// listener whose address the client dialled (from `ORIG_DST`). The kernel's
/// service entry carries one port, so both loopbacks use the same one.
fn start_redirect_listener(
    orig: OrigDst,
    listeners: Arc<ListenerManager>,
) -> std::io::Result<RedirectListener> {
    let orig = Arc::new(Mutex::new(orig));
    let mut no_v6 = String::new();
    for _ in 0..16 {
        let v4 = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = v4.local_addr()?.port();
        match std::net::TcpListener::bind((std::net::Ipv6Addr::LOCALHOST, port)) {
            Ok(v6) => {
                serve_redirects(v4, orig.clone(), listeners.clone())?;
                serve_redirects(v6, orig, listeners)?;
                return Ok(RedirectListener { port, no_v6: None });
            }
            // Another socket holds this port on [::1]: try another.
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => no_v6 = e.to_string(),
            Err(e) => {
                serve_redirects(v4, orig, listeners)?;
                return Ok(RedirectListener {
                    port,
                    no_v6: Some(format!("binding [::1]:{port}: {e}")),
                });
            }
        }
    }
    let v4 = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = v4.local_addr()?.port();
    serve_redirects(v4, orig, listeners)?;
    Ok(RedirectListener {
        port,
        no_v6: Some(format!("no port free on both loopbacks: {no_v6}")),
    })
}

fn serve_redirects(
    std_listener: std::net::TcpListener,
    orig: Arc<Mutex<OrigDst>>,
    listeners: Arc<ListenerManager>,
) -> std::io::Result<()> {
    std_listener.set_nonblocking(true)?;
    let tcp = tokio::net::TcpListener::from_std(std_listener)?;
    let no_dst = stats::counter("kernel_lb.redirect_no_original_dst".into());
    let no_listener = stats::counter("kernel_lb.redirect_no_listener".into());
    tokio::spawn(async move {
        loop {
            let Ok((sock, peer)) = tcp.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Some(vip) = orig.lock().unwrap().take(peer) else {
                no_dst.increment(1);
                tracing::debug!(%peer, "redirected connection without an original destination; closing");
                continue;
            };
            if !listeners.serve_redirected(vip, sock, peer) {
                no_listener.increment(1);
                tracing::debug!(%peer, %vip, "no listener for a redirected connection; closing");
            }
        }
    });
    Ok(())
}
