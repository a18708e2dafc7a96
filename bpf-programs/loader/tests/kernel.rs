//! Privileged tests against the real kernel: the verifier, cgroup connect4
//! rewriting, getpeername, table swaps and pin adoption. They need root and
//! an eBPF build; otherwise they print "skipped" and why. CI runs as root,
//! and there they must run (`LEGATE_REQUIRE_BPF=1` turns a skip into a
//! failure).

use legate_bpf::{KernelLb, Options, ServiceSpec, MAGLEV_SIZE};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

fn skip_reason() -> Option<String> {
    let why = if !legate_bpf::built_with_ebpf() {
        Some("built without eBPF programs (no bpf-linker)".to_string())
    } else if std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            !s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(true)
    {
        Some("not running as root".to_string())
    } else {
        None
    };
    if let Some(w) = &why {
        assert!(
            std::env::var("LEGATE_REQUIRE_BPF").is_err(),
            "LEGATE_REQUIRE_BPF is set but the kernel tests cannot run: {w}"
        );
        eprintln!("skipped: {w}");
    }
    why
}

/// A cgroup made for one test, removed (with the pins) on drop.
struct Sandbox {
    cgroup: PathBuf,
    pins: PathBuf,
}

impl Sandbox {
    fn new(name: &str) -> Self {
        let root = legate_bpf::cgroup2_root().expect("cgroup v2");
        let tag = format!("legate-test-{name}-{}", std::process::id());
        let cgroup = root.join(&tag);
        std::fs::create_dir_all(&cgroup).expect("mkdir cgroup");
        let pins = PathBuf::from("/sys/fs/bpf/legate").join(&tag);
        Sandbox { cgroup, pins }
    }

    fn options(&self) -> Options {
        Options {
            cgroup: self.cgroup.clone(),
            pin_dir: self.pins.clone(),
            self_tgid: 0,
        }
    }

    /// Runs `connections` connects to `vip` from a process inside the
    /// cgroup; returns per connection (peer name, the byte the server sent),
    /// or "refused".
    fn connect(&self, vip: SocketAddr, connections: usize) -> Vec<String> {
        let script = format!(
            r#"
import socket, sys
for _ in range({connections}):
    s = socket.socket()
    try:
        s.connect(("{ip}", {port}))
    except OSError as e:
        print("refused"); continue
    s.sendall(b"x")
    b = s.recv(1)
    peer = s.getpeername()
    print("%s:%d %s" % (peer[0], peer[1], b.decode()))
    s.close()
"#,
            ip = vip.ip(),
            port = vip.port()
        );
        // The shell moves itself into the cgroup, then becomes the client:
        // the test harness itself never joins it.
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec python3 -c \"$0\"",
                self.cgroup.display()
            ))
            .arg(script)
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
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = legate_bpf::unpin(&self.pins);
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// An echo server that answers each connection's first byte with `tag`.
fn backend(tag: char) -> (SocketAddr, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicU64::new(0));
    let count = n.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            count.fetch_add(1, Ordering::Relaxed);
            let mut b = [0u8; 1];
            if s.read_exact(&mut b).is_ok() {
                let _ = s.write_all(&[tag as u8]);
            }
        }
    });
    (addr, n)
}

/// A table giving `a` one slot in four and `b` the rest.
fn one_to_three(vip: SocketAddr, a: SocketAddr, b: SocketAddr) -> ServiceSpec {
    ServiceSpec {
        vip,
        backends: vec![a, b],
        table: (0..MAGLEV_SIZE).map(|i| u32::from(i % 4 != 0)).collect(),
    }
}

#[test]
fn connect_is_balanced_by_the_table_and_getpeername_shows_the_vip() {
    if skip_reason().is_some() {
        return;
    }
    let sb = Sandbox::new("balance");
    let (a, na) = backend('a');
    let (b, nb) = backend('b');
    let vip: SocketAddr = "127.100.0.1:80".parse().unwrap();
    // Loading runs the verifier on every program.
    let mut lb = KernelLb::load(&sb.options()).expect("load and attach");
    lb.sync(&[one_to_three(vip, a, b)]).unwrap();

    let lines = sb.connect(vip, 2000);
    assert_eq!(lines.len(), 2000);
    let mut per = [0u32; 2];
    for l in &lines {
        let (peer, tag) = l.split_once(' ').unwrap_or_else(|| panic!("bad line {l}"));
        assert_eq!(peer, "127.100.0.1:80", "getpeername must return the VIP");
        per[usize::from(tag == "b")] += 1;
    }
    let share_a = f64::from(per[0]) / 2000.0;
    assert!(
        (share_a - 0.25).abs() < 0.04,
        "a got {share_a:.3} of connections, want 0.25 ({per:?})"
    );
    assert_eq!(
        na.load(Ordering::Relaxed) + nb.load(Ordering::Relaxed),
        2000
    );

    // The kernel's per-backend counters agree with what the servers saw.
    let counted: std::collections::HashMap<SocketAddr, u64> = lb
        .connections()
        .into_iter()
        .map(|(_, be, n)| (be, n))
        .collect();
    assert_eq!(counted[&a], na.load(Ordering::Relaxed));
    assert_eq!(counted[&b], nb.load(Ordering::Relaxed));

    // A process outside the cgroup (this one) is not rewritten: nothing
    // listens on the VIP itself.
    assert!(std::net::TcpStream::connect(vip).is_err());
}

#[test]
fn swaps_and_removal_take_effect_for_new_connects() {
    if skip_reason().is_some() {
        return;
    }
    let sb = Sandbox::new("swap");
    let (a, _) = backend('a');
    let (b, _) = backend('b');
    let vip: SocketAddr = "127.100.0.2:80".parse().unwrap();
    let mut lb = KernelLb::load(&sb.options()).unwrap();
    lb.sync(&[one_to_three(vip, a, b)]).unwrap();
    // Only b remains.
    lb.sync(&[ServiceSpec {
        vip,
        backends: vec![b],
        table: vec![0; MAGLEV_SIZE as usize].into(),
    }])
    .unwrap();
    let lines = sb.connect(vip, 200);
    assert!(lines.iter().all(|l| l.ends_with(" b")), "{lines:?}");
    // Removed: connects go to the VIP itself, where nothing listens.
    lb.sync(&[]).unwrap();
    let lines = sb.connect(vip, 5);
    assert!(lines.iter().all(|l| l == "refused"), "{lines:?}");
}

#[test]
fn a_restart_adopts_pinned_maps_and_links() {
    if skip_reason().is_some() {
        return;
    }
    let sb = Sandbox::new("adopt");
    let (a, _) = backend('a');
    let (b, _) = backend('b');
    let vip: SocketAddr = "127.100.0.3:80".parse().unwrap();
    let mut lb = KernelLb::load(&sb.options()).unwrap();
    lb.sync(&[one_to_three(vip, a, b)]).unwrap();
    drop(lb);
    // The process that loaded the programs is gone (as after kill -9): the
    // pinned links and maps keep balancing.
    let lines = sb.connect(vip, 50);
    assert!(
        lines.iter().all(|l| l.starts_with("127.100.0.3:80 ")),
        "{lines:?}"
    );

    // A new loader adopts them: the service is known, the same desired
    // state swaps in a fresh table, and stale backends are dropped.
    let mut lb = KernelLb::load(&sb.options()).unwrap();
    let adopted: Vec<_> = lb.connections();
    assert!(
        adopted.is_empty(),
        "backends of adopted services are re-learned on sync"
    );
    let ops = lb
        .sync(&[ServiceSpec {
            vip,
            backends: vec![a],
            table: vec![0; MAGLEV_SIZE as usize].into(),
        }])
        .unwrap();
    assert!(
        ops >= 3,
        "upsert backend, swap table, update service, drop orphans: {ops}"
    );
    let lines = sb.connect(vip, 50);
    assert!(lines.iter().all(|l| l.ends_with(" a")), "{lines:?}");

    // Unpinning detaches: connects are left alone again.
    drop(lb);
    legate_bpf::unpin(&sb.pins).unwrap();
    let lines = sb.connect(vip, 3);
    assert!(lines.iter().all(|l| l == "refused"), "{lines:?}");
}
