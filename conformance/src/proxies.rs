//! Starting the two proxies from the same bootstrap.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Envoy,
    Legate,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Envoy => "envoy",
            Kind::Legate => "legate",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Binaries {
    pub envoy: PathBuf,
    pub legate: PathBuf,
}

impl Binaries {
    pub fn path(&self, k: Kind) -> &Path {
        match k {
            Kind::Envoy => &self.envoy,
            Kind::Legate => &self.legate,
        }
    }
}

/// A running proxy, stopped on drop.
pub struct Running {
    child: Child,
    pub log: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Common flags both accept (Legate takes Envoy's command line).
/// Access logs are flushed every 100 ms, so a scenario can read them soon
/// after its last request.
fn base_args() -> [&'static str; 7] {
    [
        "--disable-hot-restart",
        "--concurrency",
        "1",
        "-l",
        "warning",
        "--file-flush-interval-msec",
        "100",
    ]
}

/// Runs `observe` with Envoy and then with Legate serving `config` (each
/// stopped before the next starts): their answers, Envoy's first.
pub fn each<T>(
    bins: &Binaries,
    config: &Path,
    admin_port: u16,
    work: &Path,
    observe: impl Fn() -> T,
) -> Result<[T; 2]> {
    let run = |kind| -> Result<T> {
        let _running = start(bins, kind, config, admin_port, work)?;
        Ok(tokio::task::block_in_place(&observe))
    };
    Ok([run(Kind::Envoy)?, run(Kind::Legate)?])
}

/// Starts `kind` with `config` and waits until its admin `/ready` says LIVE.
pub fn start(
    bins: &Binaries,
    kind: Kind,
    config: &Path,
    admin_port: u16,
    work: &Path,
) -> Result<Running> {
    start_in(None, bins, kind, config, admin_port, work)
}

/// As [`start`], inside a network namespace when one is given (the admin
/// port is then checked from inside it too).
pub fn start_in(
    netns: Option<&legate_tests::netns::Netns>,
    bins: &Binaries,
    kind: Kind,
    config: &Path,
    admin_port: u16,
    work: &Path,
) -> Result<Running> {
    let log = work.join(format!("{}.log", kind.name()));
    let logf = std::fs::File::create(&log)?;
    let bin = bins.path(kind).to_string_lossy().into_owned();
    let command = |program: &str| match netns {
        Some(ns) => ns.command(program),
        None => Command::new(program),
    };
    let child = command(&bin)
        .arg("-c")
        .arg(config)
        .args(base_args())
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .with_context(|| format!("starting {}", kind.name()))?;
    let mut r = Running { child, log };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = r.child.try_wait()? {
            bail!(
                "{} exited ({status}) before becoming ready: {}",
                kind.name(),
                std::fs::read_to_string(&r.log).unwrap_or_default()
            );
        }
        let ok = command("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "1",
            ])
            .arg(format!("http://127.0.0.1:{admin_port}/ready"))
            .output()
            .map(|o| o.stdout == b"200")
            .unwrap_or(false);
        if ok {
            return Ok(r);
        }
        if Instant::now() > deadline {
            bail!("{} did not become ready", kind.name());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `--mode validate`: (accepted, output).
pub fn validate(bins: &Binaries, kind: Kind, config: &Path) -> Result<(bool, String)> {
    let out = Command::new(bins.path(kind))
        .args(["--mode", "validate", "-c"])
        .arg(config)
        .args(base_args())
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}
