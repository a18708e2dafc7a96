//! Clients that run inside a cgroup made for one test, for the kernel load
//! balancer's privileged tests: the cgroup's processes have their connects
//! rewritten, the test harness itself never joins it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Why the privileged kernel tests cannot run here, if they cannot.
/// `LEGATE_REQUIRE_BPF=1` (set by the test script when it runs as root)
/// turns a skip into a failure, so CI never skips silently.
pub fn skip_reason(ebpf_built: bool) -> Option<String> {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    let why = if !ebpf_built {
        Some("built without eBPF programs (bpf-linker missing at build time)")
    } else if !root {
        Some("not running as root")
    } else {
        None
    }?;
    assert!(
        std::env::var("LEGATE_REQUIRE_BPF").is_err(),
        "LEGATE_REQUIRE_BPF is set but the kernel tests cannot run: {why}"
    );
    eprintln!("skipped: {why}");
    Some(why.to_string())
}

/// A cgroup v2 directory for one test, removed on drop.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(root: &Path, name: &str) -> Self {
        let path = root.join(format!("legate-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&path).expect("mkdir cgroup");
        Cgroup { path }
    }

    fn command(&self, script: &str) -> Command {
        let mut c = Command::new("sh");
        // The shell moves itself into the cgroup, then becomes the client.
        c.arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec python3 -c \"$0\"",
                self.path.display()
            ))
            .arg(script);
        c
    }

    /// A command that runs `program` inside the cgroup (add its arguments).
    pub fn inside(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec \"$@\"",
                self.path.display()
            ))
            .arg("sh")
            .arg(program);
        c
    }

    /// Runs `program` inside the cgroup and waits for it.
    pub fn run(&self, program: &str, args: &[&str]) -> std::process::Output {
        self.inside(program)
            .args(args)
            .output()
            .expect("spawn in cgroup")
    }

    /// `n` connects to `vip` from inside the cgroup, one after another: for
    /// each, "peer-address reply-byte", or "refused".
    pub fn connect(&self, vip: SocketAddr, n: usize) -> Vec<String> {
        let script = format!("{CLIENT}\nfor _ in range({n}): print(once())\n");
        let out = self
            .command(
                &script
                    .replace("VIP_HOST", &vip.ip().to_string())
                    .replace("VIP_PORT", &vip.port().to_string()),
            )
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Connects to `vip` back to back from inside the cgroup until `stop`
    /// exists; [`LoopClient::finish`] returns every line as in `connect`.
    pub fn connect_until(&self, vip: SocketAddr, stop: &Path) -> LoopClient {
        let script = format!(
            "{CLIENT}\nimport os\nwhile not os.path.exists({:?}): print(once())\n",
            stop.display().to_string()
        );
        let child = self
            .command(
                &script
                    .replace("VIP_HOST", &vip.ip().to_string())
                    .replace("VIP_PORT", &vip.port().to_string()),
            )
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        LoopClient { child }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

pub struct LoopClient {
    child: Child,
}

impl LoopClient {
    pub fn finish(self) -> Vec<String> {
        let out = self.child.wait_with_output().expect("client");
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// One connect, one byte out, one byte back, and getpeername().
const CLIENT: &str = r#"
import socket
def once():
    v6 = ":" in "VIP_HOST"
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET)
    try:
        s.connect(("VIP_HOST", VIP_PORT))
        s.sendall(b"x")
        b = s.recv(1)
        if not b:
            return "refused"
        peer = s.getpeername()
        host = "[%s]" % peer[0] if v6 else peer[0]
        return "%s:%d %s" % (host, peer[1], b.decode())
    except OSError:
        return "refused"
    finally:
        s.close()
"#;

/// A TCP server that answers each connection's first byte with its tag,
/// so a client knows which backend it reached.
pub struct TagServer {
    pub addr: SocketAddr,
    pub accepted: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl TagServer {
    pub async fn start(tag: char) -> Self {
        Self::start_on(tag, "127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(tag: char, bind: SocketAddr) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind(bind).await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let n = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut b = [0u8; 1];
                    if s.read_exact(&mut b).await.is_ok() {
                        let _ = s.write_all(&[tag as u8]).await;
                    }
                });
            }
        });
        TagServer {
            addr,
            accepted,
            task,
        }
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for TagServer {
    /// Closes the listening socket: later connects are refused.
    fn drop(&mut self) {
        self.task.abort();
    }
}
