//! Running the real `legate` binary from tests.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port for a listener the test will start later.
///
/// Chosen below the kernel's ephemeral range (`ip_local_port_range`), so
/// that an upstream or client socket bound to port 0 meanwhile, in this or
/// a parallel test, can never take it before the proxy binds it (one did:
/// a test then talked to another test's upstream). Random, then checked
/// bindable, and never the same port twice in one process.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, span) = (10_000u16, low.saturating_sub(10_000).max(1));
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64)
        ^ (u64::from(std::process::id()) << 20)
        ^ (CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) << 40);
    for _ in 0..1000 {
        // xorshift: enough to spread parallel callers.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let port = from + (seed % u64::from(span)) as u16;
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free loopback port below {low}");
}

/// A port free for TCP on loopback (as [`free_port`]) and for UDP on every
/// address.
pub fn free_udp_port() -> u16 {
    loop {
        let p = free_port();
        if std::net::UdpSocket::bind(("0.0.0.0", p)).is_ok() {
            return p;
        }
    }
}

/// Writes `yaml` to a temporary file and returns its path.
pub fn write_config(yaml: &str) -> tempfile_path::TempPath {
    tempfile_path::TempPath::new(yaml)
}

pub mod tempfile_path {
    use super::*;
    /// A file removed on drop.
    pub struct TempPath(pub PathBuf);
    impl TempPath {
        pub fn new(content: &str) -> Self {
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p =
                std::env::temp_dir().join(format!("legate-test-{}-{n}.yaml", std::process::id()));
            std::fs::File::create(&p)
                .unwrap()
                .write_all(content.as_bytes())
                .unwrap();
            Self(p)
        }
    }
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Runs `legate --mode validate` on a config.
pub fn validate(bin: &str, yaml: &str) -> Output {
    let cfg = write_config(yaml);
    Command::new(bin)
        .args(["--mode", "validate", "-c"])
        .arg(&cfg.0)
        .output()
        .expect("run legate")
}

/// A running `legate` process, killed on drop.
pub struct Legate {
    pub child: Child,
    _cfg: tempfile_path::TempPath,
    pub admin: Option<SocketAddr>,
}

impl Drop for Legate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Legate {
    /// Starts legate and waits until every port in `wait_ports` accepts.
    pub fn start(bin: &str, yaml: &str, wait_ports: &[u16], admin: Option<u16>) -> Legate {
        Self::start_with_args(bin, yaml, &[], wait_ports, admin)
    }

    /// As [`Legate::start`], with extra command-line arguments.
    pub fn start_with_args(
        bin: &str,
        yaml: &str,
        args: &[&str],
        wait_ports: &[u16],
        admin: Option<u16>,
    ) -> Legate {
        let ports: Vec<u16> = wait_ports.iter().chain(admin.iter()).copied().collect();
        let mut l = Self::spawn(Command::new(bin), yaml, args, admin);
        l.wait_until(
            |p| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok(),
            &ports,
        );
        l
    }

    /// Starts `command` (legate, or a wrapper such as `ip netns exec NS
    /// legate`) with the config and `args`; does not wait.
    pub fn spawn(mut command: Command, yaml: &str, args: &[&str], admin: Option<u16>) -> Legate {
        let cfg = write_config(yaml);
        // One worker unless the test asks for more.
        if !args.contains(&"--concurrency") {
            command.args(["--concurrency", "1"]);
        }
        let child = command
            .args(["-l", "warning", "-c"])
            .arg(&cfg.0)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn legate");
        Legate {
            child,
            _cfg: cfg,
            admin: admin.map(|p| SocketAddr::from(([127, 0, 0, 1], p))),
        }
    }

    /// Waits (up to 20 s) until `open(port)` holds for every port.
    pub fn wait_until(&mut self, open: impl Fn(u16) -> bool, ports: &[u16]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for p in ports {
            while !open(*p) {
                if let Ok(Some(status)) = self.child.try_wait() {
                    panic!("legate exited early: {status}");
                }
                assert!(Instant::now() < deadline, "legate did not open port {p}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// What curl saw.
#[derive(Debug)]
pub struct CurlResult {
    /// The status line's protocol: `HTTP/1.1`, `HTTP/2`.
    pub version: String,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl CurlResult {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// The echo upstream's JSON body.
    pub fn echo(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not echo JSON ({e}): {}", self.body))
    }
}

/// Runs real curl; `args` are extra curl arguments (e.g. `-H`, `--http2-prior-knowledge`).
pub fn curl(url: &str, args: &[&str]) -> CurlResult {
    try_curl(url, args).unwrap_or_else(|e| panic!("curl failed: {e}"))
}

/// Runs real curl; Err when curl itself fails (no connection, a refused
/// TLS handshake), with curl's message.
pub fn try_curl(url: &str, args: &[&str]) -> Result<CurlResult, String> {
    let out = Command::new("curl")
        .args(["-s", "-S", "-D", "-", "--max-time", "10"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl must be installed");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(parse_curl(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_curl(raw: &str) -> CurlResult {
    // With -D - the header block(s) come first; the last block wins (1xx).
    let mut rest = raw;
    let mut status = 0;
    let mut version = String::new();
    let mut headers = Vec::new();
    while rest.starts_with("HTTP/") {
        let (head, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
        let mut lines = head.lines();
        let mut first = lines.next().unwrap_or("").split_whitespace();
        version = first.next().unwrap_or("").to_string();
        status = first.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        headers = lines
            .filter_map(|l| {
                l.split_once(':')
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            })
            .collect();
        rest = body;
    }
    CurlResult {
        version,
        status,
        headers,
        body: rest.to_string(),
    }
}
