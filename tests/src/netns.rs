//! Network namespaces made for one test (root only): iptables rules and
//! routes there touch nothing outside. Sockets made on a thread that entered
//! the namespace live in it, whichever thread uses them afterwards.

use std::process::Command;

pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A namespace with loopback up.
    pub fn new(tag: &str) -> std::io::Result<Self> {
        let name = format!("legate-{tag}-{}", std::process::id());
        // One a crashed run left behind.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let ns = Netns { name };
        ns.run("ip", &["netns", "add", &ns.name], false)?;
        ns.run("ip", &["link", "set", "lo", "up"], true)?;
        Ok(ns)
    }

    /// `program args` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs a command (inside the namespace when `inside`); an error when
    /// it fails.
    pub fn run(&self, program: &str, args: &[&str], inside: bool) -> std::io::Result<()> {
        let mut c = if inside {
            self.command(program)
        } else {
            Command::new(program)
        };
        let out = c.args(args).output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "{program} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }

    /// Istio's capture in miniature: `prefix` is routed over loopback (from
    /// 127.0.0.1, so replies come back) and every TCP connection to it is
    /// REDIRECTed by iptables to `port`, where SO_ORIGINAL_DST tells the
    /// address dialled.
    pub fn redirect(&self, prefix: &str, port: u16) -> std::io::Result<()> {
        let route = ["route", "add", prefix, "dev", "lo", "src", "127.0.0.1"];
        self.run("ip", &route, true)?;
        let port = port.to_string();
        let rule = [
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            prefix,
            "-j",
            "REDIRECT",
            "--to-ports",
            &port,
        ];
        self.run("iptables", &rule, true)
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let fd = std::fs::File::open(&path).expect("open the namespace");
                // Changes only this thread's namespace.
                nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("thread inside the namespace")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Why namespace tests cannot run here, if they cannot: they need root and
/// iptables. `LEGATE_REQUIRE_BPF=1` (set by the test script as root) turns
/// a skip into a failure, as for the kernel tests.
pub fn skip_reason() -> Option<String> {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    let iptables = Command::new("iptables")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let why = if !root {
        "not running as root"
    } else if !iptables {
        "iptables is not installed (scripts/setup.sh installs it)"
    } else {
        return None;
    };
    assert!(
        std::env::var("LEGATE_REQUIRE_BPF").is_err(),
        "LEGATE_REQUIRE_BPF is set but the namespace tests cannot run: {why}"
    );
    Some(why.to_string())
}
