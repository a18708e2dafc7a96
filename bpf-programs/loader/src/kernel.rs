//! Loading the programs, attaching them to a cgroup, pinning, and applying
//! [`MapOp`]s to the live maps.

use crate::addr::{from_kernel, to_kernel};
use crate::plan::{MapOp, Redirect, ServiceSpec, State};
use aya::maps::{Array, HashMap, HashOfMaps, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SockOps};
use aya::{Ebpf, EbpfLoader};
use legate_bpf_common::{Addr, Backend, Config, Service, ServiceKey, MAGLEV_SIZE, MODE_REDIRECT};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The programs and the map names the loader pins them under.
const PROGRAMS: [&str; 4] = [
    "legate_connect4",
    "legate_connect6",
    "legate_getpeername4",
    "legate_getpeername6",
];
const SOCKOPS: &str = "legate_sockops";
const MAPS: [&str; 8] = [
    "SERVICES",
    "MAGLEV",
    "BACKENDS",
    "REVNAT",
    "BACKEND_CX",
    "CONFIG",
    "ORIG_DST",
    "PENDING",
];

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("built without eBPF programs (bpf-linker or rust-src was missing at build time)")]
    NotBuilt,
    #[error("cgroup {0}: {1}")]
    Cgroup(PathBuf, std::io::Error),
    #[error("bpffs at {0}: {1}")]
    Bpffs(PathBuf, String),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {0}: {1}")]
    Program(&'static str, aya::programs::ProgramError),
    #[error("map {0}: {1}")]
    Map(&'static str, aya::maps::MapError),
    #[error("pinning link {0}: {1}")]
    Pin(PathBuf, String),
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Plan(#[from] crate::plan::PlanError),
    #[error("map update: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error(transparent)]
    Attach(#[from] LoadError),
}

/// Where and how to load.
#[derive(Debug, Clone)]
pub struct Options {
    /// The cgroup (v2 directory) whose processes' connects are balanced.
    pub cgroup: PathBuf,
    /// Pin maps and links here so a restart adopts them.
    pub pin_dir: PathBuf,
    /// Legate's own pid: its sockets are never rewritten.
    pub self_tgid: u32,
}

/// The loaded programs and their maps.
pub struct KernelLb {
    ebpf: Ebpf,
    cgroup: std::fs::File,
    pin_dir: PathBuf,
    sockops_attached: bool,
    services: HashMap<MapData, ServiceKey, Service>,
    maglev: HashOfMaps<MapData, u32, Array<MapData, u32>>,
    backends: HashMap<MapData, u32, Backend>,
    counters: PerCpuArray<MapData, u64>,
    _links: Vec<PinnedLink>,
    state: State,
    /// Counter value when each backend id was (re)allocated: ids are
    /// reused, the per-CPU counters are not reset.
    baseline: std::collections::HashMap<u32, u64>,
}

#[cfg(not(no_ebpf))]
fn object() -> Result<&'static [u8], LoadError> {
    Ok(aya::include_bytes_aligned!(concat!(
        env!("OUT_DIR"),
        "/legate-bpf"
    )))
}

#[cfg(no_ebpf)]
fn object() -> Result<&'static [u8], LoadError> {
    Err(LoadError::NotBuilt)
}

/// Whether this build carries the eBPF object.
pub fn built_with_ebpf() -> bool {
    object().is_ok()
}

impl KernelLb {
    /// Loads the programs (the kernel verifier runs here), adopts maps a
    /// previous process pinned under `pin_dir`, attaches to the cgroup and
    /// replaces any links pinned there before, so there is no moment
    /// without a program attached.
    pub fn load(opts: &Options) -> Result<Self, LoadError> {
        match Self::load_once(opts) {
            Err(e)
                if opts.pin_dir.exists()
                    && !matches!(e, LoadError::NotBuilt | LoadError::Cgroup(..)) =>
            {
                // Maps pinned by another version may not match this
                // object's layout: drop them and start clean.
                tracing::warn!(error = %e, dir = %opts.pin_dir.display(), "kernel LB: cannot adopt the pinned maps; removing them");
                let _ = unpin(&opts.pin_dir);
                Self::load_once(opts)
            }
            other => other,
        }
    }

    fn load_once(opts: &Options) -> Result<Self, LoadError> {
        let object = object()?;
        let cgroup = std::fs::File::open(&opts.cgroup)
            .map_err(|e| LoadError::Cgroup(opts.cgroup.clone(), e))?;
        ensure_bpffs(&opts.pin_dir)?;
        std::fs::create_dir_all(&opts.pin_dir)
            .map_err(|e| LoadError::Bpffs(opts.pin_dir.clone(), e.to_string()))?;
        let mut loader = EbpfLoader::new();
        let pins: Vec<(&'static str, PathBuf)> =
            MAPS.iter().map(|m| (*m, opts.pin_dir.join(m))).collect();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(object)?;

        let mut config: Array<MapData, Config> = take(&mut ebpf, "CONFIG")?;
        config
            .set(
                0,
                Config {
                    self_tgid: opts.self_tgid,
                    _pad: 0,
                },
                0,
            )
            .map_err(|e| LoadError::Map("CONFIG", e))?;
        let services: HashMap<MapData, ServiceKey, Service> = take(&mut ebpf, "SERVICES")?;
        let backends: HashMap<MapData, u32, Backend> = take(&mut ebpf, "BACKENDS")?;
        let maglev = take(&mut ebpf, "MAGLEV")?;
        let counters = take(&mut ebpf, "BACKEND_CX")?;
        let adopted: Vec<(ServiceKey, Service)> = services.iter().filter_map(Result::ok).collect();
        let adopted_backends: Vec<u32> = backends.keys().filter_map(Result::ok).collect();
        if !adopted.is_empty() {
            tracing::info!(
                services = adopted.len(),
                backends = adopted_backends.len(),
                dir = %opts.pin_dir.display(),
                "kernel LB: adopted pinned maps from a previous run"
            );
        }

        // Every program through the verifier before anything is attached
        // or a previous process's pins are touched: a refusal leaves the
        // old links balancing.
        for name in PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(|e| LoadError::Program(name, e))?;
        }
        // sock_ops runs on every TCP event of every socket in the cgroup,
        // about 0.1 µs each, five times per connection: it is verified now
        // but attached only once a REDIRECT service needs it (or the
        // adopted maps still hold one, whose connects must stay recorded).
        let sockops: &mut SockOps = program(&mut ebpf, SOCKOPS)?;
        sockops.load().map_err(|e| LoadError::Program(SOCKOPS, e))?;
        let mut links = Vec::new();
        for name in PROGRAMS {
            let err = |e| LoadError::Program(name, e);
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            let id = prog.attach(&cgroup, ATTACH_MODE).map_err(err)?;
            let link = FdLink::try_from(prog.take_link(id).map_err(err)?);
            links.push(replace_pinned(link, &opts.pin_dir, name)?);
        }
        let mut lb = Self {
            ebpf,
            cgroup,
            pin_dir: opts.pin_dir.clone(),
            sockops_attached: false,
            services,
            maglev,
            backends,
            counters,
            _links: links,
            state: State::restore(&adopted, &adopted_backends),
            baseline: Default::default(),
        };
        if adopted.iter().any(|(_, s)| s.mode == MODE_REDIRECT) {
            lb.attach_sockops()?;
        } else if let Ok(old) = PinnedLink::from_pin(link_pin(&opts.pin_dir, SOCKOPS)) {
            // Nothing pinned is redirected, so nothing needs recording.
            let _ = old.unpin();
        }
        Ok(lb)
    }

    /// Attaches sock_ops (once), replacing a pinned one: needed before any
    /// REDIRECT service is written. [`Self::sync`] does it too; calling it
    /// first lets a failure cost only the REDIRECT services.
    pub fn attach_sockops(&mut self) -> Result<(), LoadError> {
        if self.sockops_attached {
            return Ok(());
        }
        let err = |e| LoadError::Program(SOCKOPS, e);
        let prog: &mut SockOps = program(&mut self.ebpf, SOCKOPS)?;
        let id = prog.attach(&self.cgroup, ATTACH_MODE).map_err(err)?;
        let link = FdLink::try_from(prog.take_link(id).map_err(err)?);
        self._links
            .push(replace_pinned(link, &self.pin_dir, SOCKOPS)?);
        self.sockops_attached = true;
        Ok(())
    }

    /// Whether the sock_ops program is attached (a REDIRECT service needed
    /// it).
    pub fn sockops_attached(&self) -> bool {
        self.sockops_attached
    }

    /// Brings the maps to `desired`; returns how many map operations ran.
    /// On a failed update the next sync rewrites every service.
    pub fn sync(
        &mut self,
        desired: &[ServiceSpec],
        redirects: &[Redirect],
    ) -> Result<usize, SyncError> {
        if !redirects.is_empty() {
            // Before any REDIRECT service exists, so each redirected
            // connect is recorded.
            self.attach_sockops()?;
        }
        let ops = match self.state.plan(desired, redirects) {
            Ok(ops) => ops,
            Err(e) => {
                self.state.invalidate();
                return Err(e.into());
            }
        };
        let n = ops.len();
        for op in ops {
            if let Err(e) = self.apply(&op) {
                tracing::warn!(?op, error = %e, "kernel LB: map update failed");
                self.state.invalidate();
                return Err(e.into());
            }
        }
        Ok(n)
    }

    fn apply(&mut self, op: &MapOp) -> Result<(), aya::maps::MapError> {
        match op {
            MapOp::UpsertBackend { id, addr } => {
                self.backends.insert(id, Backend { addr: *addr }, 0)?;
                let now = self.count(*id);
                self.baseline.insert(*id, now);
            }
            MapOp::SetTable { service, slots } => {
                let mut inner = Array::<MapData, u32>::create(MAGLEV_SIZE, 0)?;
                for (i, id) in slots.iter().enumerate() {
                    inner.set(i as u32, id, 0)?;
                }
                self.maglev.insert(service, &inner, 0)?;
            }
            MapOp::UpsertService { key, value } => self.services.insert(key, value, 0)?,
            MapOp::DeleteService { key } => ignore_missing(self.services.remove(key))?,
            MapOp::DeleteTable { service } => ignore_missing(self.maglev.remove(service))?,
            MapOp::DeleteBackend { id } => {
                ignore_missing(self.backends.remove(id))?;
                self.baseline.remove(id);
            }
        }
        Ok(())
    }

    fn count(&self, id: u32) -> u64 {
        self.counters
            .get(&id, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    /// Connections the kernel sent to each programmed backend since it was
    /// added: (VIP, backend, connections).
    pub fn connections(&self) -> Vec<(SocketAddr, SocketAddr, u64)> {
        let mut out = Vec::new();
        for (vip, _, backends) in self.state.services() {
            for (addr, id) in backends {
                let base = self.baseline.get(&id).copied().unwrap_or(0);
                out.push((vip, addr, self.count(id).saturating_sub(base)));
            }
        }
        out
    }
}

/// Reads the original destinations of redirected connections, through its
/// own handle on the pinned `ORIG_DST` map (so the accept path needs no
/// lock shared with the map updates).
pub struct OrigDst {
    map: HashMap<MapData, Addr, Addr>,
}

impl OrigDst {
    pub fn open(pin_dir: &Path) -> Result<Self, LoadError> {
        let err = |e| LoadError::Map("ORIG_DST", e);
        let data = MapData::from_pin(pin_dir.join("ORIG_DST")).map_err(err)?;
        let map = aya::maps::Map::from_map_data(data).map_err(err)?;
        Ok(Self {
            map: HashMap::try_from(map).map_err(err)?,
        })
    }

    /// The VIP a redirected client dialled, by the client's address as the
    /// redirect listener sees it; the entry is consumed.
    pub fn take(&mut self, client: SocketAddr) -> Option<SocketAddr> {
        let key = to_kernel(client);
        let vip = self.map.get(&key, 0).ok()?;
        let _ = self.map.remove(&key);
        Some(from_kernel(&vip))
    }
}

/// A cgroup bpf_link is always multi-attach; the kernel rejects explicit
/// attach flags on link_create, and aya sends the mode as those flags, so
/// Single (0) it is.
const ATTACH_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// Where a program's link is pinned.
fn link_pin(dir: &Path, program: &str) -> PathBuf {
    dir.join(format!("link_{program}"))
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(LoadError::Program(
        name,
        aya::programs::ProgramError::NotLoaded,
    ))?;
    prog.try_into().map_err(|e| LoadError::Program(name, e))
}

/// Pins a freshly attached link, dropping the one a previous process
/// pinned for the same program only now, so there is no moment without a
/// program attached (both act on the same maps meanwhile).
fn replace_pinned(
    link: Result<FdLink, aya::programs::links::LinkError>,
    dir: &Path,
    name: &str,
) -> Result<PinnedLink, LoadError> {
    let path = link_pin(dir, name);
    let link = link.map_err(|e| LoadError::Pin(path.clone(), e.to_string()))?;
    if let Ok(old) = PinnedLink::from_pin(&path) {
        let _ = old.unpin();
    }
    link.pin(&path)
        .map_err(|e| LoadError::Pin(path.clone(), e.to_string()))
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::Map(
        name,
        aya::maps::MapError::InvalidName { name: name.into() },
    ))?;
    T::try_from(map).map_err(|e| LoadError::Map(name, e))
}

fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Mounts bpffs at `/sys/fs/bpf` when `dir` lies under it and it is not
/// mounted yet.
fn ensure_bpffs(dir: &Path) -> Result<(), LoadError> {
    let root = Path::new("/sys/fs/bpf");
    if !dir.starts_with(root) || fs_type(root).as_deref() == Some("bpf") {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()
        .map_err(|e| LoadError::Bpffs(root.into(), e.to_string()))?;
    if !status.success() {
        return Err(LoadError::Bpffs(
            root.into(),
            format!("mount -t bpf failed: {status}"),
        ));
    }
    Ok(())
}

/// (mount point, filesystem type) of every mount, from /proc/self/mounts.
fn mounts() -> std::io::Result<Vec<(PathBuf, String)>> {
    Ok(std::fs::read_to_string("/proc/self/mounts")?
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, at, ty) = (f.next()?, f.next()?, f.next()?);
            Some((PathBuf::from(at), ty.to_string()))
        })
        .collect())
}

/// The filesystem type mounted exactly at `path` (the last mount wins).
fn fs_type(path: &Path) -> Option<String> {
    mounts()
        .ok()?
        .into_iter()
        .rev()
        .find_map(|(at, ty)| (at == path).then_some(ty))
}

/// The root of the cgroup v2 hierarchy; mounts one under
/// `/run/legate/cgroup2` when none is mounted.
pub fn cgroup2_root() -> Result<PathBuf, LoadError> {
    let mounts = mounts().map_err(|e| LoadError::Cgroup("/proc/self/mounts".into(), e))?;
    if let Some((at, _)) = mounts.into_iter().find(|(_, ty)| ty == "cgroup2") {
        return Ok(at);
    }
    let at = PathBuf::from("/run/legate/cgroup2");
    std::fs::create_dir_all(&at).map_err(|e| LoadError::Cgroup(at.clone(), e))?;
    let status = std::process::Command::new("mount")
        .args(["-t", "cgroup2", "none"])
        .arg(&at)
        .status()
        .map_err(|e| LoadError::Cgroup(at.clone(), e))?;
    if !status.success() {
        return Err(LoadError::Cgroup(
            at,
            std::io::Error::other(format!("mount -t cgroup2 failed: {status}")),
        ));
    }
    Ok(at)
}

/// Removes what a previous run pinned under `dir`: its links detach and
/// its maps are freed once no program uses them.
pub fn unpin(dir: &Path) -> std::io::Result<bool> {
    if !dir.exists() {
        return Ok(false);
    }
    std::fs::remove_dir_all(dir)?;
    Ok(true)
}
